//! The `[beacon]` settings a link client reads from its config, and their resolution (CA and
//! token files read, TLS config built) into what a connection needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use px_proto::link::{Hello, PROTOCOL_VERSION, PeerRole};
use px_runtime::secrets::SecretError;
use px_runtime::tls::TlsError;
use serde::{Deserialize, Serialize};

/// `[beacon]`: the Beacon to link to, and how this client proves who it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconConfig {
    /// Beacon's control address, `host:port`. No default.
    pub addr: String,
    /// Name in Beacon's certificate. Default: the host part of `addr`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the cluster CA, which signed Beacon's certificate. No default.
    pub ca_file: PathBuf,
    /// File holding this client's link token (mode 0600): a `maestro` token for a Maestro, a
    /// `repository` one for apprepo. No default.
    pub token_file: PathBuf,
}

/// Why `[beacon]` cannot be used; the messages are those of `px_runtime`, which name the file.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Token(#[from] SecretError),
}

/// Where and how to reach Beacon, resolved from [`BeaconConfig`] at start-up.
pub struct LinkSettings {
    pub addr: String,
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub token: String,
    /// The name this client gives itself in its `Hello`.
    pub name: String,
    pub role: PeerRole,
    /// Whether the link is up now, for the status systemd shows; set by [`crate::run`].
    pub linked: Arc<AtomicBool>,
}

impl BeaconConfig {
    /// Reads the CA file and the token file (which must not be readable by others) into the
    /// settings of a link on which this client calls itself `name` in `role`.
    pub fn resolve(&self, role: PeerRole, name: &str) -> Result<LinkSettings, ResolveError> {
        let (server_name, tls) =
            px_runtime::tls::link_client(&self.addr, self.server_name.as_deref(), &self.ca_file)?;
        Ok(LinkSettings {
            addr: self.addr.clone(),
            server_name,
            tls,
            token: px_runtime::secrets::read_secret_file(&self.token_file)?,
            name: name.to_owned(),
            role,
            linked: Arc::default(),
        })
    }
}

impl LinkSettings {
    /// This client's `Hello`, with no labels, state or runtimes: a [`crate::Client`] adds its
    /// own.
    pub fn hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            role: self.role,
            name: self.name.clone(),
            token: self.token.clone(),
            software: px_proto::SOFTWARE_VERSION.into(),
            labels: Default::default(),
            state: None,
            runtimes: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn beacon(ca_file: PathBuf, token_file: PathBuf) -> BeaconConfig {
        BeaconConfig {
            addr: "beacon.internal:7443".into(),
            server_name: None,
            ca_file,
            token_file,
        }
    }

    #[test]
    fn the_table_takes_its_four_keys_and_refuses_any_other() {
        let config: BeaconConfig = toml::from_str(
            "addr = \"10.0.0.2:7443\"\nca_file = \"/ca.pem\"\ntoken_file = \"/t\"\n",
        )
        .unwrap();
        assert_eq!(config.server_name, None);
        assert_eq!(config.ca_file, PathBuf::from("/ca.pem"));
        let typo = toml::from_str::<BeaconConfig>(
            "addr = \"10.0.0.2:7443\"\nca_file = \"/ca.pem\"\ntoken_file = \"/t\"\nserver = \"x\"\n",
        )
        .unwrap_err();
        assert!(
            typo.to_string().contains("unknown field `server`"),
            "{typo}"
        );
    }

    #[test]
    fn resolving_reads_the_token_and_names_the_server_after_the_address() {
        let pki = px_test_support::Pki::new(&["beacon.internal"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        px_runtime::secrets::write_secret_file(&token_file, "pxt_secret").unwrap();
        let settings = beacon(pki.ca(), token_file)
            .resolve(PeerRole::Repository, "apprepo")
            .unwrap();
        assert_eq!(settings.token, "pxt_secret");
        assert_eq!(settings.name, "apprepo");
        assert_eq!(settings.role, PeerRole::Repository);
        assert_eq!(
            settings.server_name,
            rustls_pki_types::ServerName::try_from("beacon.internal").unwrap()
        );
    }

    #[test]
    fn unusable_files_give_px_runtimes_own_messages() {
        let pki = px_test_support::Pki::new(&["beacon.internal"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        px_runtime::secrets::write_secret_file(&token_file, "pxt_secret").unwrap();

        let missing_ca = dir.path().join("no-ca.pem");
        let err = beacon(missing_ca.clone(), token_file.clone())
            .resolve(PeerRole::Maestro, "web-1")
            .err()
            .unwrap();
        let expected = px_runtime::tls::client_config(&missing_ca).err().unwrap();
        assert_eq!(err.to_string(), expected.to_string());
        assert!(err.to_string().contains("no-ca.pem"), "{err}");

        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = beacon(pki.ca(), token_file.clone())
            .resolve(PeerRole::Maestro, "web-1")
            .err()
            .unwrap();
        let expected = px_runtime::secrets::read_secret_file(&token_file).unwrap_err();
        assert_eq!(err.to_string(), expected.to_string());
    }
}
