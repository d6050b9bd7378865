//! Beacon's configuration: one typed struct, layered defaults < TOML file < `PX_BEACON_*`.
//!
//! Under systemd, sockets passed as `api` and `control` (`FileDescriptorName=`) replace
//! `http_listen` and `control_listen`.
//!
//! Reload (SIGHUP, `systemctl reload beacon`): the file and environment are read again and
//! must pass the same checks as at start-up, else the reload fails, is logged, and Beacon
//! keeps running as it was. What a reload applies: `tokens` and `tokens_file` (the file is
//! read again even when its name did not change), checked from the next API request and the
//! next link handshake on (links already open stay open), `alerts.webhooks` (new alerts
//! go to the new set; alerts already queued for a removed webhook are still delivered), and
//! `[api_tls]`'s certificate and key (read again, for new connections). Every
//! other setting takes effect only after a restart, among them the listen addresses,
//! `data_dir`, the TLS certificate and key, `[repository]` and `alerts.dedup_window`; a
//! reload that finds one changed logs it and says so in the status line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use px_runtime::http_server::{ApiTls, HttpLimits};
use px_runtime::tokens::TokenEntry;
use serde::{Deserialize, Serialize};

use crate::auth::Role;

/// Environment prefix; nested keys use `__`, e.g. `PX_BEACON_REPOSITORY__URL`.
pub(crate) const ENV_PREFIX: &str = "PX_BEACON_";
/// Default HTTP address (API, status page): loopback until the operator opens it.
pub(crate) const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7080";
/// Default control-link address (TLS): loopback until the operator opens it.
pub(crate) const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:7443";
/// Default data directory, as the systemd unit's `StateDirectory=platformx/beacon` makes it.
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/platformx/beacon";
/// How often Beacon re-reads the desired state even without a notification: a missed
/// notification is repaired within this time.
pub(crate) const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
/// A node silent this long is lost: three missed heartbeats.
pub(crate) const DEFAULT_NODE_LOST_AFTER: Duration = px_proto::link::HEARTBEAT_DEADLINE;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP API and status page, unless systemd passes a socket named `api`. Default:
    /// `127.0.0.1:7080`.
    pub http_listen: SocketAddr,
    /// TLS control links from Maestros and repositories, unless systemd passes a socket named
    /// `control`. Default: `127.0.0.1:7443`.
    pub control_listen: SocketAddr,
    /// Event log and the persisted assignment generation. Default: `/var/lib/platformx/beacon`.
    pub data_dir: PathBuf,
    /// Certificate chain (PEM) Beacon presents on control links. Required.
    pub tls_cert_file: PathBuf,
    /// Its private key (PEM, mode 0600). Required.
    pub tls_key_file: PathBuf,
    /// A TOML file of `[[token]]` entries (`name`, `role`, `sha256`), read again on each
    /// reload. Default: none.
    pub tokens_file: Option<PathBuf>,
    /// Tokens given inline. Roles: `read`, `deploy` (HTTP API), `maestro`, `repository` (links).
    pub tokens: Vec<TokenEntry<Role>>,
    /// Where the desired state comes from.
    pub repository: RepositoryConfig,
    /// Domain apps are served under when their manifest names none: `<app>.<domain>`.
    /// Default: `localhost`.
    pub domain: String,
    /// Re-read the desired state this often. Default: 30s.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Mark a node lost after this long without a frame. Default: 15s.
    #[serde(with = "humantime_serde")]
    pub node_lost_after: Duration,
    /// Sysadmin alerts.
    pub alerts: AlertsConfig,
    /// `[http]`: the API's request head deadline, idle timeout and connection cap. Defaults:
    /// 30s, 60s, 1024.
    pub http: HttpLimits,
    /// `[api_tls]`: the certificate the API and status page serve HTTPS with. Default: the
    /// control links' `tls_cert_file` and `tls_key_file` (the same host); `plain_http = true`
    /// serves plain HTTP instead (only behind a TLS-terminating proxy or on loopback).
    pub api_tls: ApiTls,
    /// `[acme]`: certificates from an ACME CA for every host name an app serves. Off until
    /// `acme.directory_url` is set.
    pub acme: AcmeConfig,
    /// `[lease]`: several Beacons over one apprepo, one active at a time. Off by default (one
    /// Beacon, active from the start).
    pub lease: LeaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        #[allow(clippy::unwrap_used)] // constants that parse
        Self {
            http_listen: DEFAULT_HTTP_LISTEN.parse().unwrap(),
            control_listen: DEFAULT_CONTROL_LISTEN.parse().unwrap(),
            data_dir: DEFAULT_DATA_DIR.into(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            tokens_file: None,
            tokens: Vec::new(),
            repository: RepositoryConfig::default(),
            domain: "localhost".into(),
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            node_lost_after: DEFAULT_NODE_LOST_AFTER,
            alerts: AlertsConfig::default(),
            http: HttpLimits::default(),
            api_tls: ApiTls::default(),
            acme: AcmeConfig::default(),
            lease: LeaseConfig::default(),
        }
    }
}

/// `[repository]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// apprepo's base URL; Maestros download bundles from it too. Default: `https://127.0.0.1:7070`.
    pub url: String,
    /// File holding a `read` token for apprepo (mode 0600). Required.
    pub token_file: PathBuf,
    /// PEM file of the CA that signed apprepo's API certificate (the cluster CA), trusted
    /// instead of the system's roots. Default: none (the system's roots, for an apprepo behind
    /// a proxy with a public certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        Self {
            url: "https://127.0.0.1:7070".into(),
            token_file: PathBuf::new(),
            ca_file: None,
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// URLs that receive a JSON POST (`{"text": ..., "event": ...}`) per alert. Default: none.
    pub webhooks: Vec<String>,
    /// The same alert (node, app, kind) is sent at most once per window. Default: 10m.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// Let's Encrypt's production directory, named in the docs and messages.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How the CA checks that Beacon's cluster serves a host name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeKind {
    /// `GET http://<name>/.well-known/acme-challenge/<token>` on port 80, answered by every
    /// Maestro's proxy.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A TLS handshake on port 443 asking for `acme-tls/1`, answered by every Maestro's TLS
    /// listener with a challenge certificate (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// `[acme]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL, e.g. Let's Encrypt's production
    /// `https://acme-v02.api.letsencrypt.org/directory` or staging
    /// `https://acme-staging-v02.api.letsencrypt.org/directory`. Default: none (ACME is off).
    pub directory_url: Option<String>,
    /// Contact address given to the CA for the account (expiry notices). Default: none.
    pub email: Option<String>,
    /// PEM file of the CA that signed the ACME server's certificate (a private CA such as
    /// Pebble), trusted instead of the system's roots. Default: none.
    pub ca_file: Option<PathBuf>,
    /// `http-01` or `tls-alpn-01`. Default: `http-01`.
    pub challenge: ChallengeKind,
    /// The CA's certificate profile (e.g. Let's Encrypt's `shortlived`). Default: none (the
    /// CA's default).
    pub profile: Option<String>,
    /// How long after a second failed order in a row a name is ordered again (the first is
    /// tried again within a minute: most are passing); each further failure in a row doubles
    /// the wait, up to 6 hours, and a certificate still in use is tried at least a few times
    /// before it expires. Default: 15m (Let's Encrypt allows 5 failed validations of a name
    /// per hour).
    #[serde(default = "default_retry_after_failure", with = "humantime_serde")]
    pub retry_after_failure: Duration,
}

/// Let's Encrypt allows 5 failed validations per name and hour: a first retry after 15 minutes
/// keeps well inside that while a sysadmin fixes DNS or the firewall.
pub const DEFAULT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15 * 60);

fn default_retry_after_failure() -> Duration {
    DEFAULT_RETRY_AFTER_FAILURE
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory_url: None,
            email: None,
            ca_file: None,
            challenge: ChallengeKind::default(),
            profile: None,
            retry_after_failure: DEFAULT_RETRY_AFTER_FAILURE,
        }
    }
}

/// How long the lease lasts unless renewed: a failover takes about this long after the active
/// Beacon's host stops (the goal is under 10 s), while a renewal every 2 s leaves room for two
/// to fail on a slow network before the holder steps down.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);

/// `[lease]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// Whether this Beacon competes for the `beacon` lease in apprepo's storage: it starts as
    /// a standby and becomes active (binds `control_listen`, reads the desired state, runs
    /// rollouts, alerts and ACME) only while it holds the lease. Needs a `beacon` token in
    /// `repository.token_file`. Default: false.
    pub enabled: bool,
    /// How long the lease lasts unless renewed; it is renewed every third of it. 1s to 5m.
    /// Default: 6s.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// This Beacon's API URL as the others and clients reach it (e.g.
    /// `https://10.0.1.5:7080`): where a standby redirects API calls while this one is
    /// active. Required when `enabled`.
    pub api_url: Option<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: DEFAULT_LEASE_TTL,
            api_url: None,
        }
    }
}
