//! apprepo's configuration: one typed struct, layered defaults < TOML file < `PX_APPREPO_*`.
//!
//! Under systemd, a socket passed as `api` (`FileDescriptorName=`) replaces `listen`.
//!
//! Reload (SIGHUP, `systemctl reload apprepo`): the file and environment are read again and
//! must pass the same checks as at start-up, else the reload fails, is logged, and apprepo
//! keeps running as it was. What a reload applies: `tokens` and `tokens_file` (the file is
//! read again even when its name did not change), checked from the next request on, and
//! `[api_tls]`'s certificate and key (read again, for new connections; switching between
//! HTTPS and plain HTTP needs a restart). Every
//! other setting takes effect only after a restart, among them `listen`, `data_dir`,
//! `[storage]`, `[limits]`, `[retention]` and `[beacon]`; a reload that finds one changed logs
//! it and says so in the status line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use px_runtime::http_server::{ApiTls, HttpLimits};
use px_runtime::tokens::TokenEntry;
use serde::{Deserialize, Serialize};

use crate::auth::Role;

/// Environment prefix; nested keys use `__`, e.g. `PX_APPREPO_STORAGE__BACKEND=s3`.
pub(crate) const ENV_PREFIX: &str = "PX_APPREPO_";

/// Default listen address: loopback, so a fresh install exposes nothing until the operator
/// chooses an address (Ansible sets the control network's one).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default data directory, as the systemd unit's `StateDirectory=platformx/apprepo` creates it.
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/platformx/apprepo";
/// Default largest bundle: 2 GiB compressed holds any web app with its dependencies; bigger
/// uploads are almost always a data directory packed by mistake.
pub(crate) const DEFAULT_MAX_BUNDLE_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default uploads processed at once; each holds a spool file and, while inspected, a zstd
/// window (16 MiB at most), so this bounds disk and memory under a burst of deploys.
pub(crate) const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 8;
/// Default release records kept per app whatever their age: enough to roll back through a
/// bad week of deploys, few enough that listing and sweeping an app stay cheap.
pub(crate) const DEFAULT_KEEP_RELEASES: usize = 20;
/// Default age under which a release is kept even beyond `keep_releases`: a month covers the
/// time a regression takes to be noticed in a quiet app.
pub(crate) const DEFAULT_KEEP_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default age under which an unreferenced bundle is kept: an upload stores its bundle before
/// it commits the release that points to it, and an hour is far beyond any upload's commit.
pub(crate) const DEFAULT_BUNDLE_GRACE: Duration = Duration::from_secs(3600);
/// Default time between sweeps: garbage only costs disk, so there is no hurry, and each sweep
/// reads every release record (S3 bills requests).
pub(crate) const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a sweep waits between marking and deleting (`retention.condemn_wait`).
pub(crate) const DEFAULT_CONDEMN_WAIT: Duration = Duration::from_secs(60);
/// Fewest releases `keep_releases` may keep: the current one and the one before it, which a
/// rollback with no target goes to.
pub(crate) const MIN_KEEP_RELEASES: usize = 2;

/// The whole apprepo configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP API, unless systemd passes a socket named `api`. Default:
    /// `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Spool files for uploads live here (`tmp/`), and with the `fs` backend the storage too
    /// (`storage/`). Default: `/var/lib/platformx/apprepo`.
    pub data_dir: PathBuf,
    /// Where bundles and release records are kept. Default: the local filesystem.
    pub storage: StorageConfig,
    /// Size and count limits on uploads.
    pub limits: LimitsConfig,
    /// Which releases are kept, and when bundles no release points to are collected.
    pub retention: RetentionConfig,
    /// A TOML file of `[[token]]` entries (`name`, `role`, `sha256`), the usual place for
    /// tokens; read again on each reload. Default: none.
    pub tokens_file: Option<PathBuf>,
    /// Tokens given inline, same fields as in `tokens_file`. Default: none.
    pub tokens: Vec<TokenEntry<Role>>,
    /// The Beacon to notify of committed releases. Default: none (no notifications; Beacon
    /// still learns of releases when it reconciles).
    pub beacon: Option<BeaconConfig>,
    /// `[http]`: the API's request head deadline, idle timeout and connection cap. Defaults:
    /// 30s, 60s, 1024.
    pub http: HttpLimits,
    /// `[api_tls]`: `cert_file` and `key_file` the API serves HTTPS with, or `plain_http =
    /// true` (only behind a TLS-terminating proxy or on loopback). Default: neither, which is
    /// refused at start, so tokens never cross a network in the clear by omission.
    pub api_tls: ApiTls,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            #[allow(clippy::unwrap_used)] // a constant that parses
            listen: DEFAULT_LISTEN.parse().unwrap(),
            data_dir: DEFAULT_DATA_DIR.into(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            retention: RetentionConfig::default(),
            tokens_file: None,
            tokens: Vec::new(),
            beacon: None,
            http: HttpLimits::default(),
            api_tls: ApiTls::default(),
        }
    }
}

/// Which storage backend holds bundles and release records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Files under `data_dir/storage`.
    #[default]
    Fs,
    /// An S3 bucket (`[storage.s3]`).
    S3,
}

/// `[storage]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `fs` or `s3`. Default: `fs`.
    pub backend: Backend,
    /// Required when `backend = "s3"`.
    pub s3: Option<S3Config>,
}

/// `[storage.s3]`: any S3-compatible service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name (3 to 63 characters). No default.
    pub bucket: String,
    /// Region. Default: `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Endpoint URL for S3-compatible servers, e.g. `http://127.0.0.1:8014`. Default: AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most self-hosted servers need.
    /// Default: false.
    #[serde(default)]
    pub path_style: bool,
    /// Key prefix inside the bucket, so one bucket can hold several platforms. Default: none.
    #[serde(default)]
    pub prefix: String,
    /// Access key id. Default: none, which means the standard AWS chain (environment,
    /// instance profile) supplies credentials.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// File holding the secret access key (mode 0600). Required with `access_key_id`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest compressed bundle, in bytes. Default: 2 GiB.
    pub max_bundle_bytes: u64,
    /// Largest unpacked bundle, in bytes (decompression bombs). Default: 4 GiB.
    pub max_unpacked_bytes: u64,
    /// Most files, directories and links in a bundle. Default: 100 000.
    pub max_entries: u64,
    /// Uploads processed at once; more wait. Default: 8.
    pub max_concurrent_uploads: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            max_unpacked_bytes: px_bundle::DEFAULT_MAX_UNPACKED_BYTES,
            max_entries: px_bundle::DEFAULT_MAX_ENTRIES,
            max_concurrent_uploads: DEFAULT_MAX_CONCURRENT_UPLOADS,
        }
    }
}

/// `[retention]`: a release record is collected only when it is outside the newest
/// `keep_releases` of its app *and* older than `keep_for`; an app's current release, the one
/// before it and the one the current release rolled back to are kept whatever the policy.
/// Bundles no remaining release points to are collected once older than `bundle_grace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Whether sweeps run at all. Default: true.
    pub enabled: bool,
    /// Release records kept per app whatever their age (at least 2). Default: 20.
    pub keep_releases: usize,
    /// Releases younger than this are kept even beyond `keep_releases`, e.g. `"30d"`.
    /// Default: 30 days.
    #[serde(with = "humantime_duration")]
    pub keep_for: Duration,
    /// Bundles younger than this are never collected, referenced or not, because an upload
    /// stores its bundle before it commits the release. Default: 1h.
    #[serde(with = "humantime_duration")]
    pub bundle_grace: Duration,
    /// Time between sweeps; the first runs shortly after start. Default: 1h.
    #[serde(with = "humantime_duration")]
    pub interval: Duration,
    /// How long a sweep waits between marking the bundles and layers it means to delete and
    /// deleting them, so that a commit through another apprepo sharing the storage keeps
    /// them or is refused (at least the 30 s a commit may take). Default: 1m.
    #[serde(with = "humantime_duration")]
    pub condemn_wait: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keep_releases: DEFAULT_KEEP_RELEASES,
            keep_for: DEFAULT_KEEP_FOR,
            bundle_grace: DEFAULT_BUNDLE_GRACE,
            interval: DEFAULT_RETENTION_INTERVAL,
            condemn_wait: DEFAULT_CONDEMN_WAIT,
        }
    }
}

impl RetentionConfig {
    /// What is wrong with these settings, one sentence per problem.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.keep_releases < MIN_KEEP_RELEASES {
            problems.push(format!(
                "retention.keep_releases is {} but must be at least {MIN_KEEP_RELEASES} (the current release and the one before it)",
                self.keep_releases
            ));
        }
        if self.interval.is_zero() {
            problems.push("retention.interval must be above 0, e.g. \"1h\"".into());
        }
        if self.condemn_wait <= crate::condemned::COMMIT_WINDOW {
            problems.push(format!(
                "retention.condemn_wait is {} but must be above {} (the longest a commit may take), e.g. \"1m\"",
                humantime::format_duration(self.condemn_wait),
                humantime::format_duration(crate::condemned::COMMIT_WINDOW)
            ));
        }
        problems
    }
}

/// Durations written the human way (`"90s"`, `"1h"`, `"30d"`), as `humantime` parses them.
mod humantime_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration such as \"90s\", \"1h\" or \"30d\": {e}"
            ))
        })
    }
}

/// `[beacon]`: where to send release notifications. The keys of every link client's table
/// ([`px_link::BeaconConfig`]: Maestro's names itself by its `node_name`), and `name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconConfig {
    /// One Beacon's control address, `host:port`. Give this or `addrs`, not both. No default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Every Beacon's control address, `host:port` (at most [`px_link::MAX_BEACON_ADDRS`]):
    /// notifications go to whichever is active. Give this or `addr`, not both. No default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<String>,
    /// Name every Beacon's certificate carries. Default: the host part of each address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the CA that signed Beacon's certificate. No default.
    pub ca_file: PathBuf,
    /// File holding this repository's `repository` link token (mode 0600). No default.
    pub token_file: PathBuf,
    /// Name this repository gives itself on the link. Default: `apprepo`.
    #[serde(default = "default_peer_name")]
    pub name: String,
}

impl BeaconConfig {
    /// The link client's part of the table, which `px_link` resolves and connects with.
    pub(crate) fn link(&self) -> px_link::BeaconConfig {
        px_link::BeaconConfig {
            addr: self.addr.clone(),
            addrs: self.addrs.clone(),
            server_name: self.server_name.clone(),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

fn default_peer_name() -> String {
    "apprepo".into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retention_durations_read_the_human_way_and_bad_settings_are_named() {
        let defaults = Config::default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apprepo.toml");
        std::fs::write(
            &file,
            "[retention]\nkeep_releases = 5\nkeep_for = \"7d\"\nbundle_grace = \"10m\"\n",
        )
        .unwrap();
        let loaded = px_runtime::config::load(&defaults, Some(&file), "PX_APPREPO_TEST_").unwrap();
        assert_eq!(
            loaded.retention,
            RetentionConfig {
                keep_releases: 5,
                keep_for: Duration::from_secs(7 * 24 * 3600),
                bundle_grace: Duration::from_secs(600),
                ..RetentionConfig::default()
            }
        );
        assert!(loaded.retention.problems().is_empty());

        std::fs::write(&file, "[retention]\nkeep_for = \"a while\"\n").unwrap();
        let err = px_runtime::config::load(&defaults, Some(&file), "PX_APPREPO_TEST_").unwrap_err();
        assert!(err.to_string().contains("a while"), "{err}");
        std::fs::write(&file, "[retention]\nkeep_everything = true\n").unwrap();
        assert!(px_runtime::config::load(&defaults, Some(&file), "PX_APPREPO_TEST_").is_err());

        let bad = RetentionConfig {
            keep_releases: 1,
            interval: Duration::ZERO,
            condemn_wait: Duration::from_secs(30),
            ..RetentionConfig::default()
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("retention.keep_releases"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("retention.condemn_wait is 30s but must be above 30s"),
            "{problems:?}"
        );
    }
}
