//! Maestro's configuration: one typed struct, layered defaults < TOML file < `PX_MAESTRO_*`.
//!
//! Under systemd, the sockets passed as `http`, `https` and `status` (`FileDescriptorName=`)
//! replace `http_listen`, `https_listen` and `status_listen`; an `https` socket turns HTTPS
//! on even without `https_listen`. HTTPS serves `certs_dir`'s files and the certificates ACME
//! issues (Beacon's `[acme]`); without `certs_dir`, ACME's alone.
//!
//! Reload (SIGHUP, `systemctl reload maestro`): the file and environment are read again and
//! must pass the same checks as at start-up, else the reload fails, is logged, and Maestro
//! keeps running as it was. What a reload applies: the TLS certificates in `certs_dir`,
//! read again whether or not a setting changed (renewed certificates serve from the next
//! handshake; open connections are not touched). Every other setting (listen addresses,
//! directories, `certs_dir` itself, the Beacon link, timings) takes effect only after a
//! restart; a reload that finds one changed logs it and says so in the status line.
//!
//! `[build]` ([`BuildConfig`]) says whether and how this node runs builds
//! (docs/src/design/builds.md); a node builds only when it is enabled here *and* labelled
//! `build = "true"`, which is what Beacon places builds by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use px_proto::size::ByteSize;
use serde::{Deserialize, Serialize};

pub(crate) const ENV_PREFIX: &str = "PX_MAESTRO_";
/// Default proxy address; `em up` and single machines use 8080, Ansible sets 80 (or systemd
/// passes the sockets).
pub(crate) const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default local status endpoint (`/healthz`, `/metrics`): loopback only.
pub(crate) const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:7090";
/// Default address of the app events endpoint (`PX_EVENTS_URL`): loopback, any free port, as
/// only the instances this Maestro starts (and is told the port) post to it.
pub(crate) const DEFAULT_EVENTS_LISTEN: &str = "127.0.0.1:0";
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/platformx/maestro";
pub(crate) const DEFAULT_LOG_DIR: &str = "/var/log/platformx";
/// Ports handed to instances: 10 000 of them, far above ephemeral-port ranges' usual start
/// (32768), so outgoing connections never take an instance's port.
pub(crate) const DEFAULT_PORT_RANGE: (u16, u16) = (20000, 29999);
/// How long an instance has to exit after SIGTERM before SIGKILL; web frameworks finish
/// their requests well within this.
pub(crate) const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long in-flight requests on a replaced release may take before it is stopped anyway.
pub(crate) const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Default for [`Config::keep_releases`].
pub(crate) const DEFAULT_KEEP_RELEASES: usize = 3;
/// Default for [`Config::min_free_disk`].
pub(crate) const DEFAULT_MIN_FREE_DISK: ByteSize = ByteSize::mib(512);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name on the control link and status page. Default: the host name.
    pub node_name: String,
    /// Labels apps may require (`[placement] labels` in app.toml). Default: none.
    pub labels: BTreeMap<String, String>,
    /// Plain HTTP proxy address, unless systemd passes a socket named `http`. Default:
    /// `127.0.0.1:8080`.
    pub http_listen: SocketAddr,
    /// HTTPS proxy address, unless systemd passes a socket named `https`. It serves
    /// `certs_dir`'s certificates and those ACME issues. Default: none.
    pub https_listen: Option<SocketAddr>,
    /// Certificates per domain (`<domain>.crt` + `<domain>.key`), read again on each reload.
    /// Default: none (HTTPS then serves only the certificates ACME issues).
    pub certs_dir: Option<PathBuf>,
    /// Redirect plain HTTP to HTTPS for every host, even one served only by the default
    /// certificate. Default: false, which still redirects the hosts that have a certificate of
    /// their own unless their app says `[http] https_redirect = false`.
    pub https_redirect: bool,
    /// The port clients reach the HTTPS listener on, written into redirects from plain HTTP
    /// when it is not 443 (`em up` sets its `--https-port`). Default: none (443, left out of
    /// the URL).
    pub https_redirect_port: Option<u16>,
    /// Local `/healthz` and `/metrics`, unless systemd passes a socket named `status`.
    /// Default: `127.0.0.1:7090`.
    pub status_listen: SocketAddr,
    /// Where instances post events and heartbeats (`PX_EVENTS_URL`); keep it on loopback.
    /// Default: `127.0.0.1:0` (a free port).
    pub events_listen: SocketAddr,
    /// Releases and the persisted assignment. Default: `/var/lib/platformx/maestro`.
    pub state_dir: PathBuf,
    /// App logs and the access log. Default: `/var/log/platformx`.
    pub log_dir: PathBuf,
    /// First and last port handed to instances. Default: 20000-29999.
    pub port_range: (u16, u16),
    /// SIGTERM → SIGKILL grace. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How long a stopping Maestro lets requests in flight finish, closing long-lived
    /// connections one by one across it; a release switch drains over the app's own
    /// `deploy.drain` instead. Default: 30s.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Unpacked releases kept per app (the serving one included), so that rolling back to
    /// one of them starts at once, with no download. Older ones are removed after each
    /// switch. Default: 3.
    pub keep_releases: usize,
    /// Free space Maestro keeps on the disk of `state_dir`: a release whose download and
    /// unpacking would leave less is refused (the serving one stays). Default: 512MiB.
    pub min_free_disk: ByteSize,
    /// Give each instance a cgroup of its own under Maestro's (which systemd must delegate:
    /// `Delegate=yes`, as `maestro.service` does and sets this with), for its `[limits]` and
    /// to tell OOM kills apart. Off: limits are rlimits. Default: false.
    pub cgroup_limits: bool,
    /// File with a `read` token for apprepo, to download bundles. Default: none (bundles
    /// must then be served without auth, which apprepo never does).
    pub repository_token_file: Option<PathBuf>,
    /// PEM file of the CA that signed apprepo's API certificate, trusted alone for bundle and
    /// layer downloads and build uploads. Default: `[beacon] ca_file` (the cluster CA, which
    /// signs apprepo's certificate too); with no `[beacon]` either, the system's roots.
    pub repository_ca_file: Option<PathBuf>,
    /// The Beacons to link to (`[beacon]`: `addr` or `addrs`, `server_name`, `ca_file`,
    /// `token_file`); Maestro links to whichever is active.
    /// Default: none (serve the persisted assignment only).
    pub beacon: Option<BeaconConfig>,
    /// Builds on this node (`[build]`). Default: off.
    pub build: BuildConfig,
    /// How app processes are isolated (`[sandbox]`). Default: bubblewrap.
    pub sandbox: AppSandboxConfig,
}

/// `[sandbox]`: how each app process (instance, release phase, one-off run) is isolated from
/// the others and from the node (docs/src/design/trust.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppSandboxConfig {
    /// `bubblewrap`: each process in namespaces of its own, seeing only the system's
    /// read-only parts and its own release, as a user of its own when Maestro is root.
    /// `none`: only the limits, for hosts without bubblewrap or user namespaces (Maestro
    /// warns at start). Default: `bubblewrap`.
    pub mode: SandboxConfig,
    /// Size of each process's private, in-memory `/tmp`. Default: 256MiB.
    pub tmp_size: ByteSize,
    /// How much each process may write into its app directory (new files beside the
    /// release's, in memory, gone when it exits). Default: 256MiB.
    pub app_dir_size: ByteSize,
}

impl Default for AppSandboxConfig {
    fn default() -> Self {
        Self {
            mode: SandboxConfig::Bubblewrap,
            tmp_size: crate::sandbox::DEFAULT_TMP_SIZE,
            app_dir_size: crate::sandbox::DEFAULT_APP_DIR_SIZE,
        }
    }
}

/// Default for [`BuildConfig::runtimes_dir`]: software the operator installs, beside the
/// platform's other read-only files rather than in its state.
pub(crate) const DEFAULT_RUNTIMES_DIR: &str = "/opt/platformx/runtimes";
/// Under `state_dir`: the builder's caches when [`BuildConfig::cache_dir`] is unset.
pub(crate) const DEFAULT_CACHE_SUBDIR: &str = "build-cache";
/// Under `state_dir`: the builder's own tools (the pinned uv) when [`BuildConfig::tools_dir`]
/// is unset.
pub(crate) const DEFAULT_TOOLS_SUBDIR: &str = "build-tools";

/// `[build]`: whether this node runs builds, where the builder finds runtimes and keeps its
/// caches, how it isolates the build's commands and what a build may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildConfig {
    /// Run the builds Beacon assigns to this node. Beacon sends builds only to nodes labelled
    /// `build = "true"`; a node so labelled with builds off fails each build it is sent,
    /// saying so. Default: false.
    pub enabled: bool,
    /// Runtimes the builder copies into releases, as `<runtimes_dir>/<name>/<version>/` with
    /// `bin/python3` or `bin/node` (a missing directory holds none). Default:
    /// `/opt/platformx/runtimes`.
    pub runtimes_dir: PathBuf,
    /// Also use the interpreters found on this machine (pyenv, asdf, nvm, `PATH`'s `python3`
    /// and `node`): what `em up` does on a workstation. Default: false.
    pub discover_host_runtimes: bool,
    /// Where the builder installs its own tools (the pinned uv). Default:
    /// `<state_dir>/build-tools`.
    pub tools_dir: Option<PathBuf>,
    /// The builder's caches (the installers' caches, dependency trees by key, runtime layers);
    /// losing it only makes builds slower. Default: `<state_dir>/build-cache`.
    pub cache_dir: Option<PathBuf>,
    /// How build commands are isolated: `bubblewrap` (an unprivileged user, only the build's
    /// own directories writable, nothing of the node's secrets visible) or `none` (only the
    /// limits; Maestro warns at start). Default: `bubblewrap`.
    pub sandbox: SandboxConfig,
    /// Wall time of one build. Default: 15m (a cold install of a large app takes a few
    /// minutes; a quarter of an hour means it is stuck).
    #[serde(with = "humantime_serde")]
    pub time_limit: Duration,
    /// Memory of each build command. Default: 2GiB (webpack or a C extension's compiler needs
    /// about a gigabyte; twice that leaves room without one build starving the node).
    pub memory_limit: ByteSize,
    /// What a build may add to its directory and its app's cache. Default: 4GiB (a large
    /// `node_modules` is under a gigabyte).
    pub disk_limit: ByteSize,
    /// Processes and threads of a build at once. Default: 512 (npm and uv use a few dozen; a
    /// fork bomb stops long before the node notices).
    pub process_limit: u64,
    /// Output of a build's commands. Default: 4MiB (four times the build log kept with a
    /// build, so a verbose installer is never cut while endless output is stopped).
    pub output_limit: ByteSize,
    /// A CA bundle the installers trust besides the system's (an inspecting proxy, a private
    /// registry), passed as `SSL_CERT_FILE`, `PIP_CERT`, `REQUESTS_CA_BUNDLE` and
    /// `NODE_EXTRA_CA_CERTS`. Default: none.
    pub ca_file: Option<PathBuf>,
    /// The Python package index uv installs from (`https://...`). Default: none (PyPI).
    pub python_index: Option<String>,
    /// The npm registry (`https://...`). Default: none (npm's own default).
    pub npm_registry: Option<String>,
}

/// `[build] sandbox` and `[sandbox] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxConfig {
    Bubblewrap,
    None,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            runtimes_dir: DEFAULT_RUNTIMES_DIR.into(),
            discover_host_runtimes: false,
            tools_dir: None,
            cache_dir: None,
            sandbox: SandboxConfig::Bubblewrap,
            time_limit: px_build::DEFAULT_BUILD_TIME,
            memory_limit: ByteSize(px_build::DEFAULT_BUILD_MEMORY_BYTES),
            disk_limit: ByteSize(px_build::DEFAULT_BUILD_DISK_BYTES),
            process_limit: px_build::DEFAULT_BUILD_PROCESSES,
            output_limit: ByteSize(px_build::DEFAULT_BUILD_OUTPUT_BYTES),
            ca_file: None,
            python_index: None,
            npm_registry: None,
        }
    }
}

/// `[beacon]`, the table every link client shares; on the link this node is `node_name`.
pub use px_link::BeaconConfig;

impl Default for Config {
    fn default() -> Self {
        #[allow(clippy::unwrap_used)] // constants that parse
        Self {
            node_name: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "maestro".into()),
            labels: BTreeMap::new(),
            http_listen: DEFAULT_HTTP_LISTEN.parse().unwrap(),
            https_listen: None,
            certs_dir: None,
            https_redirect: false,
            https_redirect_port: None,
            status_listen: DEFAULT_STATUS_LISTEN.parse().unwrap(),
            events_listen: DEFAULT_EVENTS_LISTEN.parse().unwrap(),
            state_dir: DEFAULT_STATE_DIR.into(),
            log_dir: DEFAULT_LOG_DIR.into(),
            port_range: DEFAULT_PORT_RANGE,
            stop_grace: DEFAULT_STOP_GRACE,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
            keep_releases: DEFAULT_KEEP_RELEASES,
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            cgroup_limits: false,
            repository_token_file: None,
            repository_ca_file: None,
            beacon: None,
            build: BuildConfig::default(),
            sandbox: AppSandboxConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `text` as Maestro's config file (no environment: the prefix is one nobody sets).
    fn load(text: &str) -> Result<Config, px_runtime::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("maestro.toml");
        std::fs::write(&file, text).unwrap();
        px_runtime::config::load(&Config::default(), Some(&file), "PX_MAESTRO_TEST_UNSET_")
    }

    #[test]
    fn builds_are_off_unless_configured_and_the_build_table_keeps_its_defaults() {
        let config = load("").unwrap();
        assert_eq!(config.build, BuildConfig::default());
        assert!(!config.build.enabled);
        assert_eq!(config.build.sandbox, SandboxConfig::Bubblewrap);

        let config = load(
            "[build]\nenabled = true\nsandbox = \"none\"\ntime_limit = \"5m\"\nmemory_limit = \"1GiB\"\npython_index = \"https://pypi.internal/simple\"\n",
        )
        .unwrap();
        assert!(config.build.enabled);
        assert_eq!(config.build.sandbox, SandboxConfig::None);
        assert_eq!(config.build.time_limit, Duration::from_secs(300));
        assert_eq!(config.build.memory_limit, ByteSize(1 << 30));
        assert_eq!(
            config.build.python_index.as_deref(),
            Some("https://pypi.internal/simple")
        );
        // What the file does not name keeps its default.
        assert_eq!(config.build.disk_limit, BuildConfig::default().disk_limit);
        assert_eq!(config.build.runtimes_dir, Path::new(DEFAULT_RUNTIMES_DIR));
    }

    #[test]
    fn https_without_certs_dir_serves_the_names_acme_issued_alone() {
        let config = load("https_listen = \"127.0.0.1:8443\"\n").unwrap();
        assert_eq!(config.certs_dir, None);
        let certs = crate::check(&config).ok().unwrap().certs.unwrap();
        assert!(certs.is_empty());
        let acme = std::sync::Arc::new(crate::proxy::AcmeAnswers::default());
        certs.attach_acme(acme.clone());
        assert!(!certs.covers("shop.example.com"));
        let pki = px_test_support::Pki::new(&["shop.example.com"]).unwrap();
        acme.set_issued(
            "shop.example.com",
            &std::fs::read_to_string(pki.cert()).unwrap(),
            &std::fs::read_to_string(pki.key()).unwrap(),
        )
        .unwrap();
        assert!(certs.covers("shop.example.com"));
        assert!(!certs.covers("other.example.com"));
        // Nothing to read again on a reload, and nothing lost.
        assert_eq!(certs.reload().unwrap(), 0);
        assert!(certs.covers("shop.example.com"));

        // A certs_dir that is named must exist; a redirect to port 0 goes nowhere.
        let mut config = config;
        config.certs_dir = Some("/nonexistent/certs".into());
        config.https_redirect_port = Some(0);
        let problems = crate::check(&config).err().unwrap().problems.join("\n");
        for part in [
            "certs_dir: cannot read the certificate directory /nonexistent/certs",
            "https_redirect_port must be a port from 1 to 65535",
        ] {
            assert!(problems.contains(part), "{problems}");
        }
    }

    #[test]
    fn a_misspelt_build_key_and_bad_build_settings_are_named() {
        let e = load("[build]\nenable = true\n").unwrap_err().to_string();
        assert!(e.contains("enable"), "{e}");
        let e = load("[build]\nsandbox = \"docker\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("docker"), "{e}");

        let mut config = load("[build]\nenabled = true\n").unwrap();
        config.build.ca_file = Some("/nonexistent/ca.pem".into());
        config.build.npm_registry = Some("registry.internal".into());
        config.build.process_limit = 0;
        let problems = crate::check(&config).err().unwrap().problems.join("\n");
        for part in [
            "build.ca_file /nonexistent/ca.pem",
            "build.npm_registry \"registry.internal\" must be an http:// or https:// URL",
            "build.process_limit must be more than 0",
        ] {
            assert!(problems.contains(part), "{problems}");
        }
        // The same settings with builds off are not this node's concern.
        config.build.enabled = false;
        assert!(crate::check(&config).is_ok());
    }
}
