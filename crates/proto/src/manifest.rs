//! The `app.toml` manifest at the root of every bundle (docs/src/reference/manifest.md): schema, parsing and
//! validation with errors that name the field and say what to fix.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hsts::Hsts;
use crate::names;
use crate::process::ProcessSettings;
use crate::rate::Rate;
use crate::runtime::Requirement;
use crate::size::ByteSize;

/// File name of the manifest at the bundle root.
pub const MANIFEST_FILE: &str = "app.toml";
/// Name of the executable AppRunner a bundle may carry instead of a `run` command.
pub const APPRUNNER_FILE: &str = "apprunner";
/// Largest manifest accepted; a real one is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Most instances of one app on one web server; more is a typo or belongs on more servers.
pub const MAX_INSTANCES: u32 = 64;
/// Longest health check timeout: a release that takes longer to become healthy is broken.
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(600);
/// Default health check timeout (docs/src/reference/manifest.md).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Most domains per app, and most static path mappings; both are looked up per request.
pub const MAX_DOMAINS: usize = 32;
pub const MAX_STATIC_MAPPINGS: usize = 32;
/// Most node labels an app may require.
pub const MAX_PLACEMENT_LABELS: usize = 16;
/// Most env defaults in a manifest.
pub const MAX_ENV_VARS: usize = 256;
/// Most commands in `requires`.
pub const MAX_REQUIRES: usize = 16;
/// Default heartbeat interval handed to instances as `PX_HEARTBEAT_INTERVAL`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Default and largest request bodies (`http.max_request_body`), and the largest when the
/// proxy buffers them in memory (`http.buffer_requests`).
pub const DEFAULT_MAX_REQUEST_BODY: ByteSize = ByteSize::mib(100);
pub const MAX_REQUEST_BODY: ByteSize = ByteSize::mib(10 * 1024);
pub const MAX_BUFFERED_REQUEST_BODY: ByteSize = ByteSize::mib(64);
/// Bounds of `[limits]`: below these an app cannot start at all, above them the limit means
/// nothing.
pub const MIN_MEMORY_LIMIT: ByteSize = ByteSize::mib(16);
pub const MAX_MEMORY_LIMIT: ByteSize = ByteSize::mib(1024 * 1024);
pub const MAX_PROCESSES_LIMIT: u32 = 65_536;
pub const MIN_OPEN_FILES_LIMIT: u32 = 16;
pub const MAX_OPEN_FILES_LIMIT: u32 = 1_048_576;
/// Default drain budget of a release switch (`deploy.drain`).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Longest drain budget: long-lived connections get at most this to move to a new release.
pub const MAX_DRAIN: Duration = Duration::from_secs(15 * 60);
/// Default time a new release is watched after its switch (`deploy.watch`): its requests and
/// 5xx answers in this window are its deploy's figures, and its error budget applies in it.
pub const DEFAULT_WATCH: Duration = Duration::from_secs(60);
/// Bounds of `deploy.watch`.
pub const MIN_WATCH: Duration = Duration::from_secs(1);
pub const MAX_WATCH: Duration = Duration::from_secs(3600);
/// Longest `[build] command`: one shell line, with room for a few chained steps; a longer
/// build belongs in a script inside the app, which the command then runs.
pub const MAX_BUILD_COMMAND_BYTES: usize = 4096;
/// Bounds of `health.heartbeat_interval`.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);

/// A parsed, validated `app.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppManifest {
    /// The app's name, a lowercase DNS label.
    pub name: String,
    /// Shell command that starts one instance; `None` means the bundle has an `apprunner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Processes per web server.
    #[serde(default = "default_instances")]
    pub instances: u32,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default)]
    pub http: HttpSettings,
    /// Default environment; `em config set` overrides it per app.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The language runtime the app needs on the web server (or in its bundle's `bin/`),
    /// e.g. `"python3>=3.11"`; Beacon places the app only where it is found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Requirement>,
    /// Other commands the app runs, e.g. `["ffmpeg"]` or `["ffmpeg>=5"]`; Maestro checks them
    /// before it starts a release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
    /// Which web servers run the app; by default, all of them.
    #[serde(default, skip_serializing_if = "Placement::is_everywhere")]
    pub placement: Placement,
    /// How a new release takes over from the old one.
    #[serde(default, skip_serializing_if = "DeploySettings::is_default")]
    pub deploy: DeploySettings,
    /// What each instance may use, so apps on one web server cannot starve each other.
    #[serde(default, skip_serializing_if = "ResourceLimits::is_unlimited")]
    pub limits: ResourceLimits,
    /// How an upload is built into a release (`[build]`), beyond what detection decides.
    #[serde(default, skip_serializing_if = "BuildSettings::is_default")]
    pub build: BuildSettings,
    /// Process types (`[processes.<type>]`; docs/src/design/processes.md). In a release's
    /// manifest, resolved with the Procfile: every type the app runs, with its command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub processes: BTreeMap<String, ProcessSettings>,
}

/// The build of an upload (`[build]`; docs/src/design/builds.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSettings {
    /// A shell command run in the app's directory after the detected installer, or instead of
    /// one when detection finds none (`px_proto::detect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Whether a Django app's `python manage.py collectstatic --noinput` runs after the
    /// install; `false` turns it off (an app that serves no static files, or collects them in
    /// `command`).
    #[serde(default = "default_collectstatic", skip_serializing_if = "is_true")]
    pub collectstatic: bool,
}

impl Default for BuildSettings {
    fn default() -> Self {
        Self {
            command: None,
            collectstatic: true,
        }
    }
}

impl BuildSettings {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_collectstatic() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// Per-instance limits (`[limits]`); unset means the web server's own limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// Memory (RAM; no swap) the instance and its children may use; beyond it the kernel's
    /// OOM killer ends the instance, and Maestro reports it as out of memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Share of CPU under contention, 1 to 10000 (100 is every app's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Processes and threads the instance may have at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
    /// Open files and sockets per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u32>,
}

impl ResourceLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// How a new release takes over from the old one (`[deploy]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySettings {
    /// The old release's time after the switch: its requests in flight finish, its long-lived
    /// connections (WebSocket, server-sent events) are closed one by one across this budget,
    /// each with a hint to reconnect (to the new release), and what is still open at its end
    /// is cut.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain: Duration,
    /// How long after its switch a new release is watched: the 5xx answers it gives in this
    /// window count against `max_error_rate`, and are the deploy's figures in `em releases`.
    #[serde(default = "default_watch", with = "humantime_serde")]
    pub watch: Duration,
    /// The error budget: when more than this share of the new release's answers are 5xx
    /// during `watch`, Beacon rolls back to the previous release and `em deploy` fails.
    /// `"5%"` or `0.05`. Default: none (figures are recorded, nothing is rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<Rate>,
}

impl Default for DeploySettings {
    fn default() -> Self {
        Self {
            drain: DEFAULT_DRAIN,
            watch: DEFAULT_WATCH,
            max_error_rate: None,
        }
    }
}

impl DeploySettings {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_drain() -> Duration {
    DEFAULT_DRAIN
}

fn default_watch() -> Duration {
    DEFAULT_WATCH
}

impl AppManifest {
    /// Every requirement: the runtime first, then `requires`.
    pub fn requirements(&self) -> impl Iterator<Item = &Requirement> {
        self.runtime.iter().chain(self.requires.iter())
    }
}

/// Where an app runs: on every node whose labels include all of these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Placement {
    pub fn is_everywhere(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether a node with `labels` should run the app.
    pub fn admits(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

fn default_instances() -> u32 {
    1
}

/// How Maestro decides a new instance may take traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP path answered with 2xx when healthy; without it, a TCP connect is the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long a new instance has to become healthy.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Handed to instances as `PX_HEARTBEAT_INTERVAL`. An instance that sends one heartbeat
    /// to `PX_EVENTS_URL` has opted in: if it then stays silent for
    /// `MISSED_HEARTBEATS` intervals, Maestro restarts it.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: None,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }
}

fn default_heartbeat_interval() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}

fn default_health_timeout() -> Duration {
    DEFAULT_HEALTH_TIMEOUT
}

/// How Maestro routes to the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Host names served; empty means `<name>.<platform domain>`.
    #[serde(default)]
    pub domains: Vec<String>,
    /// URL path prefix → directory in the release, served by Maestro itself.
    #[serde(default, rename = "static")]
    pub static_dirs: BTreeMap<String, String>,
    /// Largest request body the proxy passes to the app; a larger one gets 413 before the app
    /// sees it (or, sent without a length, is cut off at the limit).
    #[serde(
        default = "default_max_request_body",
        skip_serializing_if = "is_default_max_request_body"
    )]
    pub max_request_body: ByteSize,
    /// Read every request body whole before the app sees the request, so slow uploads hold a
    /// proxy task rather than one of the app's workers; bodies are held in memory, so
    /// `max_request_body` is then at most [`MAX_BUFFERED_REQUEST_BODY`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub buffer_requests: bool,
    /// Answer plain HTTP for the app's hosts with a 308 to HTTPS once Maestro has a
    /// certificate for the host (its own or a wildcard, not only the default one). On by
    /// default; an app that must stay reachable over plain HTTP turns it off.
    #[serde(
        default = "default_https_redirect",
        skip_serializing_if = "is_default_https_redirect"
    )]
    pub https_redirect: bool,
    /// `Strict-Transport-Security` on the app's HTTPS answers; none unless asked for, since
    /// a browser that saw it refuses plain HTTP for the host until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Hsts>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            domains: Vec::new(),
            static_dirs: BTreeMap::new(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            buffer_requests: false,
            https_redirect: true,
            hsts: None,
        }
    }
}

fn default_https_redirect() -> bool {
    true
}

fn is_default_https_redirect(redirect: &bool) -> bool {
    *redirect
}

fn default_max_request_body() -> ByteSize {
    DEFAULT_MAX_REQUEST_BODY
}

fn is_default_max_request_body(size: &ByteSize) -> bool {
    *size == DEFAULT_MAX_REQUEST_BODY
}

/// What is wrong with a manifest: the field (dotted path) and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("app.toml: {}{message}", field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ManifestError {
    /// Dotted path of the offending field, when one can be named.
    pub field: Option<String>,
    pub message: String,
}

impl ManifestError {
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl AppManifest {
    /// Parses and validates manifest text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError {
                field: None,
                message: format!("is larger than {MAX_MANIFEST_BYTES} bytes; keep it small"),
            });
        }
        let deserializer = toml::Deserializer::new(text);
        let manifest: AppManifest =
            serde_path_to_error::deserialize(deserializer).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                // toml's message carries a source excerpt; the last line is the reason itself.
                let message = inner.message().trim().to_string();
                let where_ = inner.span().map(|s| line_of(text, s.start));
                let message = match where_ {
                    Some(line) => format!("{message} (line {line})"),
                    None => message,
                };
                if path == "." || path.is_empty() {
                    ManifestError {
                        field: None,
                        message,
                    }
                } else {
                    ManifestError {
                        field: Some(path),
                        message,
                    }
                }
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), ManifestError> {
        names::check_app_name(&self.name).map_err(|m| ManifestError::field("name", m))?;
        if let Some(run) = &self.run
            && run.trim().is_empty()
        {
            return Err(ManifestError::field(
                "run",
                "is empty; give the command that starts the app, e.g. \"python3 server.py\", or remove it and ship an executable `apprunner`",
            ));
        }
        if let Some(command) = &self.build.command {
            if command.trim().is_empty() {
                return Err(ManifestError::field(
                    "build.command",
                    "is empty; give the shell command that builds the app, e.g. \"npm run build\", or remove it",
                ));
            }
            if command.len() > MAX_BUILD_COMMAND_BYTES {
                return Err(ManifestError::field(
                    "build.command",
                    format!(
                        "is longer than {MAX_BUILD_COMMAND_BYTES} bytes; put the steps in a script in the app and run that"
                    ),
                ));
            }
            if command.contains('\0') {
                return Err(ManifestError::field(
                    "build.command",
                    "contains a NUL character, which no shell command can hold",
                ));
            }
        }
        if self.instances == 0 || self.instances > MAX_INSTANCES {
            return Err(ManifestError::field(
                "instances",
                format!(
                    "must be between 1 and {MAX_INSTANCES}, got {}",
                    self.instances
                ),
            ));
        }
        if let Some(path) = &self.health.path
            && (!path.starts_with('/') || path.contains(char::is_whitespace))
        {
            return Err(ManifestError::field(
                "health.path",
                format!("{path:?} must be a URL path starting with '/', e.g. \"/healthz\""),
            ));
        }
        let timeout = self.health.timeout;
        if timeout < Duration::from_secs(1) || timeout > MAX_HEALTH_TIMEOUT {
            return Err(ManifestError::field(
                "health.timeout",
                format!(
                    "must be between 1s and {}s, e.g. \"30s\"",
                    MAX_HEALTH_TIMEOUT.as_secs()
                ),
            ));
        }
        let heartbeat = self.health.heartbeat_interval;
        if !(MIN_HEARTBEAT_INTERVAL..=MAX_HEARTBEAT_INTERVAL).contains(&heartbeat) {
            return Err(ManifestError::field(
                "health.heartbeat_interval",
                format!(
                    "must be between 1s and {}s, e.g. \"10s\"",
                    MAX_HEARTBEAT_INTERVAL.as_secs()
                ),
            ));
        }
        if self.http.max_request_body > MAX_REQUEST_BODY {
            return Err(ManifestError::field(
                "http.max_request_body",
                format!("must be at most {MAX_REQUEST_BODY}, e.g. \"100MiB\""),
            ));
        }
        if self.http.buffer_requests && self.http.max_request_body > MAX_BUFFERED_REQUEST_BODY {
            return Err(ManifestError::field(
                "http.max_request_body",
                format!(
                    "must be at most {MAX_BUFFERED_REQUEST_BODY} with buffer_requests = true, since buffered bodies are held in memory; lower it or stop buffering"
                ),
            ));
        }
        if let Some(hsts) = &self.http.hsts {
            hsts.check()
                .map_err(|m| ManifestError::field("http.hsts.max_age", m))?;
        }
        validate_limits(&self.limits, "limits")?;
        crate::process::validate_all(self.processes.iter())?;
        if self.deploy.drain > MAX_DRAIN {
            return Err(ManifestError::field(
                "deploy.drain",
                format!("must be at most {}s, e.g. \"30s\"", MAX_DRAIN.as_secs()),
            ));
        }
        if !(MIN_WATCH..=MAX_WATCH).contains(&self.deploy.watch) {
            return Err(ManifestError::field(
                "deploy.watch",
                format!(
                    "must be from {}s to {}s, e.g. \"60s\"",
                    MIN_WATCH.as_secs(),
                    MAX_WATCH.as_secs()
                ),
            ));
        }
        if self.requires.len() > MAX_REQUIRES {
            return Err(ManifestError::field(
                "requires",
                format!("has more than {MAX_REQUIRES} entries"),
            ));
        }
        if self.http.domains.len() > MAX_DOMAINS {
            return Err(ManifestError::field(
                "http.domains",
                format!("has more than {MAX_DOMAINS} entries"),
            ));
        }
        for (i, domain) in self.http.domains.iter().enumerate() {
            names::check_domain(domain)
                .map_err(|m| ManifestError::field(format!("http.domains[{i}]"), m))?;
        }
        if self.http.static_dirs.len() > MAX_STATIC_MAPPINGS {
            return Err(ManifestError::field(
                "http.static",
                format!("has more than {MAX_STATIC_MAPPINGS} entries"),
            ));
        }
        for (prefix, dir) in &self.http.static_dirs {
            let field = format!("http.static.{prefix:?}");
            if !prefix.starts_with('/') || prefix.contains("..") {
                return Err(ManifestError::field(
                    field,
                    "the URL prefix must start with '/', e.g. \"/assets\"",
                ));
            }
            if !is_relative_inside(dir) {
                return Err(ManifestError::field(
                    field,
                    format!("{dir:?} must be a directory inside the bundle, e.g. \"public\""),
                ));
            }
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(ManifestError::field(
                "env",
                format!("has more than {MAX_ENV_VARS} entries"),
            ));
        }
        if self.placement.labels.len() > MAX_PLACEMENT_LABELS {
            return Err(ManifestError::field(
                "placement.labels",
                format!("has more than {MAX_PLACEMENT_LABELS} entries"),
            ));
        }
        for key in self.env.keys() {
            names::check_config_key(key)
                .map_err(|m| ManifestError::field(format!("env.{key}"), m))?;
        }
        Ok(())
    }
}

/// Checks `[limits]` (or a process type's limits), naming fields under `prefix`.
pub(crate) fn validate_limits(limits: &ResourceLimits, prefix: &str) -> Result<(), ManifestError> {
    if limits
        .memory
        .is_some_and(|m| m < MIN_MEMORY_LIMIT || m > MAX_MEMORY_LIMIT)
    {
        return Err(ManifestError::field(
            format!("{prefix}.memory"),
            format!("must be from {MIN_MEMORY_LIMIT} to {MAX_MEMORY_LIMIT}, e.g. \"512MiB\""),
        ));
    }
    if limits
        .cpu_weight
        .is_some_and(|w| !(1..=10_000).contains(&w))
    {
        return Err(ManifestError::field(
            format!("{prefix}.cpu_weight"),
            "must be from 1 to 10000 (100 is the default share)",
        ));
    }
    if limits
        .processes
        .is_some_and(|p| !(1..=MAX_PROCESSES_LIMIT).contains(&p))
    {
        return Err(ManifestError::field(
            format!("{prefix}.processes"),
            format!("must be from 1 to {MAX_PROCESSES_LIMIT}"),
        ));
    }
    if limits
        .open_files
        .is_some_and(|f| !(MIN_OPEN_FILES_LIMIT..=MAX_OPEN_FILES_LIMIT).contains(&f))
    {
        return Err(ManifestError::field(
            format!("{prefix}.open_files"),
            format!("must be from {MIN_OPEN_FILES_LIMIT} to {MAX_OPEN_FILES_LIMIT}"),
        ));
    }
    Ok(())
}

/// A relative path that stays inside its root: no leading '/', no '..' component.
fn is_relative_inside(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| c != ".." && !c.contains('\\'))
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "hello"
run = "python3 server.py"
instances = 2
runtime = "python3>=3.11"
requires = ["ffmpeg"]
[health]
path = "/healthz"
timeout = "10s"
[http]
domains = ["hello.example.com"]
static = { "/assets" = "public" }
max_request_body = "8MiB"
buffer_requests = true
[env]
GREETING = "hello"
[placement]
labels = { role = "web" }
[deploy]
drain = "2m"
watch = "90s"
max_error_rate = "5%"
[limits]
memory = "256MiB"
cpu_weight = 50
processes = 64
open_files = 1024
[build]
command = "npm run build:css"
collectstatic = false
"#;

    #[test]
    fn parses_the_design_example() {
        let m = AppManifest::parse(FULL).unwrap();
        assert_eq!(m.name, "hello");
        assert_eq!(m.run.as_deref(), Some("python3 server.py"));
        assert_eq!(m.instances, 2);
        assert_eq!(m.health.path.as_deref(), Some("/healthz"));
        assert_eq!(m.health.timeout, Duration::from_secs(10));
        assert_eq!(m.http.static_dirs["/assets"], "public");
        assert_eq!(m.env["GREETING"], "hello");
        assert_eq!(m.runtime.as_ref().unwrap().to_string(), "python3>=3.11");
        assert_eq!(m.requires[0].command, "ffmpeg");
        assert_eq!(m.requirements().count(), 2);
        let web = BTreeMap::from([("role".to_string(), "web".to_string())]);
        assert!(m.placement.admits(&web));
        assert!(!m.placement.admits(&BTreeMap::new()));
        assert!(Placement::default().admits(&BTreeMap::new()));
        assert_eq!(m.deploy.drain, Duration::from_secs(120));
        assert_eq!(m.deploy.watch, Duration::from_secs(90));
        assert_eq!(m.deploy.max_error_rate, Some(Rate::per_million(50_000)));
        assert_eq!(m.http.max_request_body, ByteSize::mib(8));
        assert_eq!(m.limits.memory, Some(ByteSize::mib(256)));
        assert_eq!(
            (m.limits.cpu_weight, m.limits.processes, m.limits.open_files),
            (Some(50), Some(64), Some(1024))
        );
        assert!(m.http.buffer_requests);
        assert_eq!(m.build.command.as_deref(), Some("npm run build:css"));
        assert!(!m.build.collectstatic);
    }

    #[test]
    fn build_defaults_run_collectstatic_and_no_command() {
        let m = AppManifest::parse("name = \"x\"\n[build]\ncommand = \"make assets\"").unwrap();
        assert_eq!(m.build.command.as_deref(), Some("make assets"));
        assert!(m.build.collectstatic);
        let m = AppManifest::parse("name = \"x\"").unwrap();
        assert_eq!(m.build, BuildSettings::default());
        assert!(m.build.collectstatic && m.build.command.is_none());
        // An unset [build] does not travel, so nodes that predate it still read the manifest.
        assert!(!serde_json::to_string(&m).unwrap().contains("build"));
        let longest = format!(
            "name = \"x\"\n[build]\ncommand = \"{}\"",
            "x".repeat(MAX_BUILD_COMMAND_BYTES)
        );
        assert!(AppManifest::parse(&longest).is_ok());
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = AppManifest::parse("name = \"x\"").unwrap();
        assert_eq!(m.instances, 1);
        assert_eq!(m.health, HealthCheck::default());
        assert!(m.run.is_none());
        assert_eq!(m.deploy.drain, DEFAULT_DRAIN);
        assert_eq!(m.deploy.watch, DEFAULT_WATCH);
        assert_eq!(m.deploy.max_error_rate, None);
        assert_eq!(m.http.max_request_body, DEFAULT_MAX_REQUEST_BODY);
        assert!(!m.http.buffer_requests);
        assert!(m.http.https_redirect);
        assert_eq!(m.http.hsts, None);
        // Defaults are left out when the manifest travels, so nodes that predate a section
        // still read manifests that do not use it.
        let travelling = serde_json::to_string(&m).unwrap();
        assert!(!travelling.contains("deploy") && !travelling.contains("max_request_body"));
        assert!(!travelling.contains("https_redirect") && !travelling.contains("hsts"));
    }

    #[test]
    fn https_redirect_and_hsts_are_read_and_travel() {
        let m = AppManifest::parse(
            "name = \"x\"\n[http]\nhttps_redirect = false\nhsts = { max_age = \"365days\", include_subdomains = true }",
        )
        .unwrap();
        assert!(!m.http.https_redirect);
        let hsts = m.http.hsts.unwrap();
        assert_eq!(hsts.max_age, Duration::from_secs(365 * 86_400));
        assert!(hsts.include_subdomains);
        let travelled: AppManifest =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(travelled, m);
        let short =
            AppManifest::parse("name = \"x\"\n[http]\nhsts = { max_age = \"1h\" }").unwrap();
        assert_eq!(short.http.hsts.unwrap().header_value(), "max-age=3600");
    }

    fn error_of(text: &str) -> ManifestError {
        AppManifest::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("name = \"Hello\"", "name"),
            ("name = \"x\"\ninstances = 0", "instances"),
            ("name = \"x\"\ninstances = \"two\"", "instances"),
            ("name = \"x\"\n[health]\npath = \"healthz\"", "health.path"),
            (
                "name = \"x\"\n[health]\ntimeout = \"soon\"",
                "health.timeout",
            ),
            ("name = \"x\"\n[health]\ntimeout = \"0s\"", "health.timeout"),
            (
                "name = \"x\"\n[http]\ndomains = [\"a..b\"]",
                "http.domains[0]",
            ),
            (
                "name = \"x\"\n[http]\nstatic = { \"/a\" = \"../etc\" }",
                "http.static.\"/a\"",
            ),
            ("name = \"x\"\n[env]\nPORT = \"1\"", "env.PORT"),
            ("name = \"x\"\nrun = \" \"", "run"),
            ("name = \"x\"\n[build]\ncommand = \"  \"", "build.command"),
            (
                "name = \"x\"\n[build]\ncommand = \"a\\u0000b\"",
                "build.command",
            ),
            (
                "name = \"x\"\n[build]\ncollectstatic = \"no\"",
                "build.collectstatic",
            ),
            ("name = \"x\"\n[build]\ncomand = \"x\"", "build.comand"),
            ("name = \"x\"\nruntime = \"python3>=three\"", "runtime"),
            ("name = \"x\"\nruntime = 3", "runtime"),
            (
                "name = \"x\"\nrequires = [\"ffmpeg\", \"rm -rf\"]",
                "requires[1]",
            ),
            (
                "name = \"x\"\n[health]\nheartbeat_interval = \"0s\"",
                "health.heartbeat_interval",
            ),
            ("name = \"x\"\n[deploy]\ndrain = \"1h\"", "deploy.drain"),
            ("name = \"x\"\n[deploy]\nwatch = \"0s\"", "deploy.watch"),
            (
                "name = \"x\"\n[deploy]\nmax_error_rate = \"150%\"",
                "deploy.max_error_rate",
            ),
            ("name = \"x\"\n[limits]\nmemory = \"1MiB\"", "limits.memory"),
            (
                "name = \"x\"\n[limits]\ncpu_weight = 0",
                "limits.cpu_weight",
            ),
            ("name = \"x\"\n[limits]\nprocesses = 0", "limits.processes"),
            (
                "name = \"x\"\n[limits]\nopen_files = 3",
                "limits.open_files",
            ),
            ("name = \"x\"\n[limits]\nswap = 1", "limits.swap"),
            (
                "name = \"x\"\n[http]\nmax_request_body = \"20 parsecs\"",
                "http.max_request_body",
            ),
            (
                "name = \"x\"\n[http]\nhttps_redirect = \"no\"",
                "http.https_redirect",
            ),
            (
                "name = \"x\"\n[http]\nhsts = { max_age = \"100y\" }",
                "http.hsts.max_age",
            ),
            (
                "name = \"x\"\n[http]\nhsts = { max_age = \"1y\", preload = true }",
                "http.hsts.preload",
            ),
            ("name = \"x\"\n[http]\nhsts = {}", "http.hsts"),
            (
                "name = \"x\"\n[http]\nmax_request_body = \"11GiB\"",
                "http.max_request_body",
            ),
            (
                "name = \"x\"\n[http]\nbuffer_requests = true\nmax_request_body = \"65MiB\"",
                "http.max_request_body",
            ),
            ("name = \"x\"\n[deploy]\ndrian = \"1s\"", "deploy.drian"),
        ];
        for (text, field) in cases {
            let e = error_of(text);
            assert_eq!(e.field.as_deref(), Some(*field), "{text}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let e = error_of("name = \"x\"\n[health]\npaht = \"/h\"");
        assert!(e.to_string().contains("paht"), "{e}");
        assert!(e.to_string().contains("health"), "{e}");
    }

    #[test]
    fn missing_name_and_syntax_errors_are_reported() {
        let e = error_of("run = \"x\"");
        assert!(e.message.contains("name"), "{e}");
        let e = error_of("name = ");
        assert!(e.message.contains("line 1"), "{e}");
    }

    #[test]
    fn an_overlong_build_command_is_refused() {
        let text = format!(
            "name = \"x\"\n[build]\ncommand = \"{}\"",
            "x".repeat(MAX_BUILD_COMMAND_BYTES + 1)
        );
        let e = error_of(&text);
        assert_eq!(e.field.as_deref(), Some("build.command"));
        assert!(e.message.contains("script"), "{e}");
    }

    #[test]
    fn oversized_manifest_is_refused() {
        let text = format!("name = \"x\"\n#{}", "a".repeat(MAX_MANIFEST_BYTES as usize));
        assert!(error_of(&text).message.contains("larger"));
    }

    #[test]
    fn round_trips_through_toml() {
        let m = AppManifest::parse(FULL).unwrap();
        let text = toml::to_string(&m).unwrap();
        assert_eq!(AppManifest::parse(&text).unwrap(), m);
    }
}
