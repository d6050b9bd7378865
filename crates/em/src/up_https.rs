//! `em up`'s HTTPS: the ACME settings given as `--acme-*` flags, remembered in the data
//! directory (`acme.toml`) until given again or `--no-acme`, which become Beacon's `[acme]`,
//! and the port on which the local Maestro serves the certificates they bring.

use std::path::{Path, PathBuf};

use px_beacon::config::{AcmeConfig, ChallengeKind};
use serde::{Deserialize, Serialize};

use crate::cli::{AcmeChallenge, UpArgs};
use crate::failure::{Failure, Result};

/// The file in the data directory holding the remembered ACME settings.
pub const ACME_FILE: &str = "acme.toml";
/// Default `--https-port`: 8443 sits beside the HTTP default 8080 by long custom, and needs no
/// privilege to bind.
pub const DEFAULT_HTTPS_PORT: u16 = 8443;
/// Longest `--acme-directory`: CAs' directory URLs are well under a hundred characters.
const MAX_DIRECTORY_URL_LEN: usize = 2048;
/// Longest `--acme-email`: the longest address SMTP carries (RFC 5321's path limit).
const MAX_EMAIL_LEN: usize = 254;

/// What `acme.toml` holds: Beacon's `[acme]` as `em up` sets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    pub directory_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Absolute, since the next `em up` may start elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub challenge: ChallengeKind,
}

impl AcmeSettings {
    /// Beacon's `[acme]` for these settings.
    pub fn beacon_config(&self) -> AcmeConfig {
        AcmeConfig {
            directory_url: Some(self.directory_url.clone()),
            email: self.email.clone(),
            ca_file: self.ca_file.clone(),
            challenge: self.challenge,
            ..AcmeConfig::default()
        }
    }
}

/// HTTPS on this run of `em up`.
#[derive(Debug, PartialEq)]
pub struct Https {
    pub port: u16,
    pub acme: AcmeSettings,
}

impl Https {
    /// `em up`'s banner line on HTTPS: where names with a certificate are served, and which CA
    /// issues them.
    pub fn banner_line(&self) -> String {
        format!(
            "  https:       https://<name>:{}/ for each name `em domains add` gives an app, with a certificate from {}\n",
            self.port, self.acme.directory_url
        )
    }
}

impl From<AcmeChallenge> for ChallengeKind {
    fn from(challenge: AcmeChallenge) -> Self {
        match challenge {
            AcmeChallenge::Http01 => ChallengeKind::Http01,
            AcmeChallenge::TlsAlpn01 => ChallengeKind::TlsAlpn01,
        }
    }
}

/// Whether this run serves HTTPS, and with which ACME settings: `--acme-directory` starts the
/// settings afresh from this run's flags; without it, the other `--acme-*` flags amend the
/// remembered settings; `--no-acme` forgets them. What is used is remembered for the next run.
pub fn resolve(data_dir: &Path, args: &UpArgs) -> Result<Option<Https>> {
    let path = data_dir.join(ACME_FILE);
    if args.no_acme {
        match std::fs::remove_file(&path) {
            Ok(()) => println!("ACME settings forgotten: no new certificates, no HTTPS listener."),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Failure::failed(format!("{}: {e}", path.display()))),
        }
        return Ok(None);
    }
    // Settings given afresh replace a remembered file even when it no longer parses.
    let remembered = match read(&path) {
        Err(_) if args.acme_directory.is_some() => None,
        read => read?,
    };
    let mut settings = match (&args.acme_directory, &remembered) {
        (Some(url), _) => AcmeSettings {
            directory_url: url.trim().to_string(),
            email: None,
            ca_file: None,
            challenge: ChallengeKind::default(),
        },
        (None, Some(remembered)) => remembered.clone(),
        (None, None) => {
            let given = [
                (args.acme_email.is_some(), "--acme-email"),
                (args.acme_ca_file.is_some(), "--acme-ca-file"),
                (args.acme_challenge.is_some(), "--acme-challenge"),
                (args.https_port.is_some(), "--https-port"),
            ];
            if let Some((_, flag)) = given.iter().find(|(given, _)| *given) {
                return Err(Failure::usage(format!(
                    "{flag} needs --acme-directory URL: HTTPS on `em up` serves the certificates an ACME CA issues (such as Let's Encrypt's {})",
                    px_beacon::config::LETS_ENCRYPT_DIRECTORY
                )));
            }
            return Ok(None);
        }
    };
    if let Some(email) = &args.acme_email {
        settings.email = Some(email.trim().to_string());
    }
    if let Some(ca_file) = &args.acme_ca_file {
        settings.ca_file =
            Some(std::path::absolute(ca_file).map_err(|e| {
                Failure::usage(format!("--acme-ca-file {}: {e}", ca_file.display()))
            })?);
    }
    if let Some(challenge) = args.acme_challenge {
        settings.challenge = challenge.into();
    }
    check(&settings)?;
    let port = args.https_port.unwrap_or(DEFAULT_HTTPS_PORT);
    if port == 0 {
        return Err(Failure::usage(
            "--https-port must be a port from 1 to 65535: browsers are sent there",
        ));
    }
    if remembered.as_ref() != Some(&settings) {
        let text = toml::to_string(&settings)
            .map_err(|e| Failure::failed(format!("cannot write {}: {e}", path.display())))?;
        px_runtime::fs::write_atomic(&path, text.as_bytes())?;
    }
    Ok(Some(Https {
        port,
        acme: settings,
    }))
}

/// The remembered settings, if any.
fn read(path: &Path) -> Result<Option<AcmeSettings>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Failure::failed(format!("{}: {e}", path.display()))),
    };
    toml::from_str(&text).map(Some).map_err(|e| {
        Failure::failed(format!(
            "{} (em up's remembered ACME settings) does not parse: {e}; give --acme-directory again, or --no-acme",
            path.display()
        ))
    })
}

/// What Beacon would refuse, said in terms of the flags before anything starts.
fn check(settings: &AcmeSettings) -> Result<()> {
    let url = &settings.directory_url;
    if !url.starts_with("https://") || url.len() > MAX_DIRECTORY_URL_LEN {
        return Err(Failure::usage(format!(
            "--acme-directory {url:?} must be an https:// URL of at most {MAX_DIRECTORY_URL_LEN} characters, such as {}",
            px_beacon::config::LETS_ENCRYPT_DIRECTORY
        )));
    }
    if let Some(email) = &settings.email
        && (email.len() > MAX_EMAIL_LEN
            || email.chars().any(|c| c.is_whitespace() || c == ',')
            || !email.contains('@'))
    {
        return Err(Failure::usage(format!(
            "--acme-email {email:?} must be one email address of at most {MAX_EMAIL_LEN} characters"
        )));
    }
    if let Some(ca_file) = &settings.ca_file
        && let Err(e) = std::fs::File::open(ca_file)
    {
        return Err(Failure::usage(format!(
            "--acme-ca-file {}: {e}",
            ca_file.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::failure::EXIT_USAGE;

    fn args(flags: &[&str]) -> UpArgs {
        let cli = Cli::try_parse_from(["em", "up"].iter().chain(flags)).unwrap();
        match cli.command {
            Command::Up(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_acme_there_is_no_https_and_https_flags_alone_say_what_they_need() {
        let data = tempfile::tempdir().unwrap();
        assert_eq!(resolve(data.path(), &args(&[])).unwrap(), None);
        for flag in [
            &["--https-port", "9443"][..],
            &["--acme-email", "me@example.com"],
        ] {
            let failure = resolve(data.path(), &args(flag)).unwrap_err();
            assert_eq!(failure.code, EXIT_USAGE);
            assert!(
                failure
                    .message
                    .starts_with(&format!("{} needs --acme-directory URL", flag[0])),
                "{}",
                failure.message
            );
        }
        assert!(!data.path().join(ACME_FILE).exists());
    }

    #[test]
    fn settings_are_remembered_amended_replaced_and_forgotten() {
        let data = tempfile::tempdir().unwrap();
        let ca = data.path().join("ca.pem");
        std::fs::write(&ca, "a CA").unwrap();
        let ca_flag = ca.to_str().unwrap();
        let first = resolve(
            data.path(),
            &args(&[
                "--acme-directory",
                "https://127.0.0.1:14000/dir",
                "--acme-ca-file",
                ca_flag,
                "--acme-challenge",
                "tls-alpn-01",
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(first.port, DEFAULT_HTTPS_PORT);
        assert_eq!(first.acme.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(first.acme.challenge, ChallengeKind::TlsAlpn01);

        // The next run without flags gets the same; a flag amends one setting.
        let again = resolve(data.path(), &args(&["--https-port", "9443"]))
            .unwrap()
            .unwrap();
        assert_eq!(again.acme, first.acme);
        assert_eq!(again.port, 9443);
        let amended = resolve(data.path(), &args(&["--acme-email", "me@example.com"]))
            .unwrap()
            .unwrap();
        assert_eq!(amended.acme.email.as_deref(), Some("me@example.com"));
        assert_eq!(amended.acme.ca_file, first.acme.ca_file);

        // A new directory starts afresh: Pebble's CA file means nothing to Let's Encrypt.
        let staging = "https://acme-staging-v02.api.letsencrypt.org/directory";
        let replaced = resolve(data.path(), &args(&["--acme-directory", staging]))
            .unwrap()
            .unwrap();
        assert_eq!(
            replaced.acme,
            AcmeSettings {
                directory_url: staging.into(),
                email: None,
                ca_file: None,
                challenge: ChallengeKind::Http01,
            }
        );
        assert_eq!(
            resolve(data.path(), &args(&[])).unwrap().unwrap().acme,
            replaced.acme
        );

        assert_eq!(resolve(data.path(), &args(&["--no-acme"])).unwrap(), None);
        assert_eq!(resolve(data.path(), &args(&[])).unwrap(), None);
    }

    #[test]
    fn bad_settings_are_refused_before_anything_is_remembered() {
        let data = tempfile::tempdir().unwrap();
        let cases: [(&[&str], &str); 3] = [
            (
                &["--acme-directory", "http://ca.example/dir"],
                "--acme-directory \"http://ca.example/dir\" must be an https:// URL",
            ),
            (
                &[
                    "--acme-directory",
                    "https://ca.example/dir",
                    "--acme-email",
                    "a@b.example, c@d.example",
                ],
                "must be one email address",
            ),
            (
                &[
                    "--acme-directory",
                    "https://ca.example/dir",
                    "--acme-ca-file",
                    "/nonexistent/ca.pem",
                ],
                "--acme-ca-file /nonexistent/ca.pem: No such file",
            ),
        ];
        for (flags, message) in cases {
            let failure = resolve(data.path(), &args(flags)).unwrap_err();
            assert_eq!(failure.code, EXIT_USAGE);
            assert!(failure.message.contains(message), "{}", failure.message);
        }
        assert!(!data.path().join(ACME_FILE).exists());
        std::fs::write(data.path().join(ACME_FILE), "directory = 1\n").unwrap();
        let failure = resolve(data.path(), &args(&[])).unwrap_err();
        assert!(
            failure
                .message
                .contains("give --acme-directory again, or --no-acme"),
            "{}",
            failure.message
        );
        let failure = resolve(
            data.path(),
            &args(&[
                "--acme-directory",
                "https://ca.example/dir",
                "--https-port",
                "0",
            ]),
        )
        .unwrap_err();
        assert_eq!(failure.code, EXIT_USAGE);
        assert!(
            failure
                .message
                .starts_with("--https-port must be a port from 1 to 65535")
        );
        // Settings given afresh replace the broken file.
        let fresh = args(&["--acme-directory", "https://ca.example/dir"]);
        let given = resolve(data.path(), &fresh).unwrap().unwrap();
        assert_eq!(
            read(&data.path().join(ACME_FILE)).unwrap(),
            Some(given.acme)
        );
    }
}
