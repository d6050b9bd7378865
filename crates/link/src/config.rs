//! The `[beacon]` settings a link client reads from its config, and their resolution (CA and
//! token files read, TLS config built) into what a connection needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use px_proto::link::{Hello, PROTOCOL_VERSION, PeerRole};
use px_runtime::secrets::SecretError;
use px_runtime::tls::TlsError;
use serde::{Deserialize, Serialize};

/// Most Beacon addresses one `[beacon]` table may list. A control plane runs a few Beacons (one
/// active, the others standing by); the bound keeps a round of failed connects short, as each
/// dead address may cost up to [`crate::CONNECT_TIMEOUT`] before the next is tried.
pub const MAX_BEACON_ADDRS: usize = 16;

/// `[beacon]`: the Beacons to link to, and how this client proves who it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconConfig {
    /// One Beacon's control address, `host:port`. Give this or `addrs`, not both. No default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Every Beacon's control address, `host:port`, at most [`MAX_BEACON_ADDRS`]: the client
    /// links to whichever is active (standby Beacons do not accept links). Give this or
    /// `addr`, not both. No default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<String>,
    /// Name in every Beacon's certificate: one name each control host's certificate carries
    /// (the cluster CA issues them, so it can put a shared name in each). Default: the host
    /// part of each address, checked against that Beacon's certificate.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the cluster CA, which signed Beacon's certificate. No default.
    pub ca_file: PathBuf,
    /// File holding this client's link token (mode 0600): a `maestro` token for a Maestro, a
    /// `repository` one for apprepo. No default.
    pub token_file: PathBuf,
}

/// Why `[beacon]` cannot be used; the TLS and token messages are those of `px_runtime`, which
/// name the file.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("give `addr` (one Beacon) or `addrs` (every Beacon), not both")]
    BothAddrKeys,
    #[error("give `addr` (one Beacon) or `addrs` (every Beacon)")]
    NoAddr,
    #[error("`addrs` lists {0} addresses; at most {MAX_BEACON_ADDRS}")]
    TooManyAddrs(usize),
    #[error("`addrs` lists {0:?} twice")]
    RepeatedAddr(String),
    #[error("{0:?} is not a `host:port` address")]
    NotHostPort(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Token(#[from] SecretError),
}

/// One Beacon the client may link to: its address and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct BeaconAddr {
    pub addr: String,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// Where and how to reach Beacon, resolved from [`BeaconConfig`] at start-up.
pub struct LinkSettings {
    /// Every Beacon, in the configured order; [`crate::run`] tries them in turn.
    pub beacons: Vec<BeaconAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    pub token: String,
    /// The name this client gives itself in its `Hello`.
    pub name: String,
    pub role: PeerRole,
    /// Whether the link is up now, for the status systemd shows; set by [`crate::run`].
    pub linked: Arc<AtomicBool>,
}

impl BeaconConfig {
    /// The configured addresses, whichever key holds them, checked: one key of the two, at
    /// most [`MAX_BEACON_ADDRS`], none twice, each `host:port`.
    pub fn addrs(&self) -> Result<Vec<&str>, ResolveError> {
        let addrs: Vec<&str> = match (&self.addr, self.addrs.as_slice()) {
            (Some(_), [_, ..]) => return Err(ResolveError::BothAddrKeys),
            (None, []) => return Err(ResolveError::NoAddr),
            (Some(addr), []) => vec![addr.as_str()],
            (None, addrs) => addrs.iter().map(String::as_str).collect(),
        };
        if addrs.len() > MAX_BEACON_ADDRS {
            return Err(ResolveError::TooManyAddrs(addrs.len()));
        }
        for (i, addr) in addrs.iter().enumerate() {
            if !is_host_port(addr) {
                return Err(ResolveError::NotHostPort((*addr).to_owned()));
            }
            if addrs[..i].contains(addr) {
                return Err(ResolveError::RepeatedAddr((*addr).to_owned()));
            }
        }
        Ok(addrs)
    }

    /// Checks the addresses, reads the CA file and the token file (which must not be readable
    /// by others) into the settings of a link on which this client calls itself `name` in
    /// `role`.
    pub fn resolve(&self, role: PeerRole, name: &str) -> Result<LinkSettings, ResolveError> {
        let beacons = self
            .addrs()?
            .into_iter()
            .map(|addr| {
                let host = addr
                    .rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_matches(['[', ']']);
                Ok(BeaconAddr {
                    addr: addr.to_owned(),
                    server_name: px_runtime::tls::server_name(
                        self.server_name.as_deref().unwrap_or(host),
                    )?,
                })
            })
            .collect::<Result<Vec<_>, ResolveError>>()?;
        Ok(LinkSettings {
            beacons,
            tls: px_runtime::tls::client_config(&self.ca_file)?,
            token: px_runtime::secrets::read_secret_file(&self.token_file)?,
            name: name.to_owned(),
            role,
            linked: Arc::default(),
        })
    }
}

/// Whether `addr` has a host and a port number, as `TcpStream::connect` resolves it.
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.trim_matches(['[', ']']).is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

impl LinkSettings {
    /// Every Beacon address, comma-separated, for logs and status lines.
    pub fn addrs(&self) -> String {
        let addrs: Vec<&str> = self.beacons.iter().map(|b| b.addr.as_str()).collect();
        addrs.join(", ")
    }

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
            addr: Some("beacon.internal:7443".into()),
            addrs: Vec::new(),
            server_name: None,
            ca_file,
            token_file,
        }
    }

    #[test]
    fn the_table_takes_its_keys_and_refuses_any_other() {
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
        assert_eq!(settings.beacons.len(), 1);
        assert_eq!(settings.beacons[0].addr, "beacon.internal:7443");
        assert_eq!(
            settings.beacons[0].server_name,
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

    fn addrs_config(addr: Option<&str>, addrs: &[&str]) -> BeaconConfig {
        BeaconConfig {
            addr: addr.map(str::to_owned),
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
            ..beacon("/ca.pem".into(), "/t".into())
        }
    }

    #[test]
    fn addrs_lists_every_beacon_and_resolving_names_each_after_its_host() {
        let config: BeaconConfig = toml::from_str(
            "addrs = [\"control-a:7443\", \"control-b:7443\"]\nca_file = \"/ca.pem\"\ntoken_file = \"/t\"\n",
        )
        .unwrap();
        assert_eq!(
            config.addrs().unwrap(),
            ["control-a:7443", "control-b:7443"]
        );

        let pki = px_test_support::Pki::new(&["control-a", "control-b"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        px_runtime::secrets::write_secret_file(&token_file, "pxt_secret").unwrap();
        let config = BeaconConfig {
            ca_file: pki.ca(),
            token_file,
            ..config
        };
        let names = |settings: &LinkSettings| -> Vec<(String, String)> {
            settings
                .beacons
                .iter()
                .map(|b| (b.addr.clone(), b.server_name.to_str().into_owned()))
                .collect()
        };
        let settings = config.resolve(PeerRole::Maestro, "web-1").unwrap();
        assert_eq!(
            names(&settings),
            [
                ("control-a:7443".to_owned(), "control-a".to_owned()),
                ("control-b:7443".to_owned(), "control-b".to_owned())
            ]
        );
        assert_eq!(settings.addrs(), "control-a:7443, control-b:7443");
        // One `server_name` is the name every Beacon's certificate carries.
        let shared = BeaconConfig {
            server_name: Some("beacon.internal".into()),
            ..config
        }
        .resolve(PeerRole::Maestro, "web-1")
        .unwrap();
        assert_eq!(
            names(&shared),
            [
                ("control-a:7443".to_owned(), "beacon.internal".to_owned()),
                ("control-b:7443".to_owned(), "beacon.internal".to_owned())
            ]
        );
    }

    #[test]
    fn addresses_are_refused_with_what_to_fix() {
        let refused = |addr: Option<&str>, addrs: &[&str]| {
            addrs_config(addr, addrs).addrs().unwrap_err().to_string()
        };
        assert_eq!(
            refused(Some("a:1"), &["b:1"]),
            "give `addr` (one Beacon) or `addrs` (every Beacon), not both"
        );
        assert_eq!(
            refused(None, &[]),
            "give `addr` (one Beacon) or `addrs` (every Beacon)"
        );
        let many: Vec<String> = (1..=MAX_BEACON_ADDRS + 1)
            .map(|i| format!("c{i}:7443"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            refused(None, &many),
            format!("`addrs` lists 17 addresses; at most {MAX_BEACON_ADDRS}")
        );
        assert!(
            addrs_config(None, &many[..MAX_BEACON_ADDRS])
                .addrs()
                .is_ok()
        );
        assert_eq!(
            refused(None, &["a:7443", "b:7443", "a:7443"]),
            "`addrs` lists \"a:7443\" twice"
        );
        for bad in ["control-a", ":7443", "control-a:port", "control-a:0"] {
            assert_eq!(
                refused(None, &["b:7443", bad]),
                format!("{bad:?} is not a `host:port` address")
            );
        }
        assert_eq!(
            addrs_config(Some("[::1]:7443"), &[]).addrs().unwrap(),
            ["[::1]:7443"]
        );
    }

    #[test]
    fn a_table_with_both_address_keys_is_refused_at_resolution() {
        let config: BeaconConfig = toml::from_str(
            "addr = \"a:7443\"\naddrs = [\"a:7443\", \"b:7443\"]\nca_file = \"/ca.pem\"\ntoken_file = \"/t\"\n",
        )
        .unwrap();
        let err = config
            .resolve(PeerRole::Repository, "apprepo")
            .err()
            .unwrap();
        assert!(matches!(err, ResolveError::BothAddrKeys), "{err}");
    }
}
