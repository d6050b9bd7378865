//! The builder (docs/src/design/builds.md): turns an app's uploaded source into the layers of a
//! release (runtime, dependencies, app), running every installer and build command in a
//! sandbox with limits. Maestro calls [`build`] once per build order.
//!
//! A build goes: detect what the app is (`detect`), resolve its runtime against the runtimes
//! the platform has (`runtimes`) and take that runtime's cached layer, install the
//! dependencies (`python`, `node`) unless the dependencies key is in the app's cache
//! (`deps`), run Django's `collectstatic` and the `[build] command`, and pack what is left as
//! the app layer. Every command goes through `sandbox`.

mod deps;
mod detect;
mod error;
mod fsutil;
mod lines;
mod node;
mod owner;
mod pipeline;
mod python;
mod reap;
mod runtime_layer;
mod runtimes;
mod sandbox;
pub mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use px_proto::build::LayerKind;
use px_proto::manifest::AppManifest;

pub use error::BuildError;
pub use pipeline::build;
pub use runtimes::{Runtime, RuntimeKind, discover};

/// Default for [`BuildLimits::time`]: a cold install of a large app (hundreds of packages, a
/// front-end bundle) takes a few minutes; a quarter of an hour means it is stuck.
pub const DEFAULT_BUILD_TIME: Duration = Duration::from_secs(15 * 60);
/// Default for [`BuildLimits::memory_bytes`]: webpack or a C extension's compiler needs about
/// a gigabyte; twice that leaves room without letting one build starve a node.
pub const DEFAULT_BUILD_MEMORY_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default for [`BuildLimits::disk_bytes`]: what a build may add to its directory and its
/// cache; a big `node_modules` is under a gigabyte, so 4 GiB is generous and still bounded.
pub const DEFAULT_BUILD_DISK_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Default for [`BuildLimits::processes`]: npm and uv run a few dozen processes and threads
/// at most; 512 stops a fork bomb long before the node notices.
pub const DEFAULT_BUILD_PROCESSES: u64 = 512;
/// Default for [`BuildLimits::output_bytes`]: four times the build log kept with a build
/// (`px_proto::build::MAX_BUILD_LOG_BYTES`), so a verbose installer is never cut while a
/// build that prints without end is stopped.
pub const DEFAULT_BUILD_OUTPUT_BYTES: u64 = 4 * px_proto::build::MAX_BUILD_LOG_BYTES as u64;

/// How the builder runs, from the node's configuration.
#[derive(Debug, Clone)]
pub struct BuilderSettings {
    /// Where each build gets a directory of its own (`<app>-<build>/`), emptied at the start.
    pub work_dir: PathBuf,
    /// The caches: `runtimes/` (one packed layer per runtime) and `<app>/` (the installers'
    /// caches and the dependency trees by key). Losing it only makes builds slower.
    pub cache_dir: PathBuf,
    /// Where runtimes come from.
    pub runtimes: RuntimeSources,
    /// Where the pinned uv is installed ([`tools::ensure_uv`]).
    pub tools_dir: PathBuf,
    /// How commands are isolated.
    pub sandbox: Sandbox,
    pub limits: BuildLimits,
    /// A CA bundle the installers must trust (an inspecting proxy, a private registry):
    /// passed as `SSL_CERT_FILE`, `PIP_CERT`, `REQUESTS_CA_BUNDLE` and `NODE_EXTRA_CA_CERTS`.
    pub ca_file: Option<PathBuf>,
    /// The Python package index (`UV_INDEX_URL`, and pip's `--index-url` for uv itself);
    /// PyPI when unset.
    pub python_index: Option<String>,
    /// The npm registry (`npm_config_registry`); npm's default when unset.
    pub npm_registry: Option<String>,
}

/// Where the builder finds runtimes.
#[derive(Debug, Clone, Default)]
pub struct RuntimeSources {
    /// Runtimes directories laid out as `<dir>/<name>/<version>/` with `bin/python3` or
    /// `bin/node` (what the Ansible role, the NixOS module and the images fill).
    pub dirs: Vec<PathBuf>,
    /// Also the interpreters found on this machine: pyenv, asdf, nvm and `PATH`'s `python3`
    /// and `node` (for `em up`).
    pub discover_host: bool,
}

/// How build commands are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap: `nobody` in a user namespace (the build's uid outside it, see
    /// [`BuildRequest::uid`]), a PID namespace, only the build directory,
    /// the app's cache, the runtime and the system's read-only parts visible.
    Bubblewrap,
    /// No isolation, only the limits: for machines without bubblewrap (`em up` on a laptop).
    /// The caller logs a warning.
    None,
}

/// What one build may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLimits {
    /// Wall time for the whole build.
    pub time: Duration,
    /// Memory of each command (its data segment).
    pub memory_bytes: u64,
    /// What the build may add to its directory and the app's cache.
    pub disk_bytes: u64,
    /// Processes and threads at once.
    pub processes: u64,
    /// Output of the build's commands.
    pub output_bytes: u64,
}

impl Default for BuildLimits {
    fn default() -> Self {
        Self {
            time: DEFAULT_BUILD_TIME,
            memory_bytes: DEFAULT_BUILD_MEMORY_BYTES,
            disk_bytes: DEFAULT_BUILD_DISK_BYTES,
            processes: DEFAULT_BUILD_PROCESSES,
            output_bytes: DEFAULT_BUILD_OUTPUT_BYTES,
        }
    }
}

/// One build to run.
#[derive(Debug, Clone, Copy)]
pub struct BuildRequest<'a> {
    pub app: &'a str,
    /// The build's number within the app.
    pub build: u64,
    /// The unpacked upload; only read.
    pub source_dir: &'a Path,
    pub manifest: &'a AppManifest,
    /// The uid (and gid) the build's commands run as outside their sandbox, where the builder
    /// can switch users (it is root, or holds `CAP_SETUID`, `CAP_SETGID` and `CAP_CHOWN`):
    /// Maestro gives the app's own. `None`: `nobody` for a builder running as root, the
    /// builder's own uid otherwise. Ignored without a sandbox.
    pub uid: Option<u32>,
}

/// What a build made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Runtime (when the app has one), dependencies (when it has any), app; in stacking order.
    pub layers: Vec<BuiltLayer>,
    /// Release-relative directories to put first on `PATH`, in order.
    pub path: Vec<String>,
    /// Variables to add to every instance's environment; `{release}` is the release directory.
    pub env: BTreeMap<String, String>,
    /// The runtime inside the release, as `name version`.
    pub runtime: Option<String>,
    /// Commands the runtime layer provides.
    pub commands: Vec<String>,
}

/// One packed layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltLayer {
    pub kind: LayerKind,
    /// What the layer was made from: the runtime's or the dependencies' cache key, or the
    /// app layer's own digest.
    pub key: String,
    /// Lowercase hex SHA-256 of the archive.
    pub sha256: String,
    /// Archive size in bytes.
    pub size: u64,
    /// The archive, in the build's directory under `work_dir`.
    pub archive: PathBuf,
    /// True when the layer came from the cache rather than from this build.
    pub reused: bool,
}
