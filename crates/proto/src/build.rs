//! Builds and layers (docs/src/design/builds.md): an upload that needs a build is a pending
//! [`Build`]; a node that may build runs it into the layers of a release ([`BuildOutput`]);
//! web servers assemble the release from those layers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::BundleRef;
use crate::manifest::AppManifest;

/// Label a node carries when it may run builds (`build = "true"`).
pub const BUILD_LABEL: &str = "build";
/// Placeholder in a [`BuildOutput::env`] value for the release directory on the node.
pub const RELEASE_DIR_PLACEHOLDER: &str = "{release}";
/// Largest build log kept with a build (its tail): enough for the failing lines and the
/// installer's summary, bounded so a build printing gigabytes stores no more than this.
pub const MAX_BUILD_LOG_BYTES: usize = 1024 * 1024;

/// What a layer holds; a built release stacks them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// The language runtime, under `.px/runtime/`.
    Runtime,
    /// What the installer produced (`.px/deps/`, `node_modules/`).
    Dependencies,
    /// The uploaded source and what the build step added.
    App,
}

impl LayerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Runtime => "runtime",
            Self::Dependencies => "dependencies",
            Self::App => "app",
        }
    }
}

/// One layer of a built release: a bundle-format archive stored under `layers/sha256/<digest>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub kind: LayerKind,
    /// Lowercase hex SHA-256 of the compressed archive; also its storage key.
    pub sha256: String,
    /// Compressed size in bytes.
    pub size: u64,
}

/// What a build made: the layers of the release, and what an instance of it needs on top of
/// the release's own environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOutput {
    /// The build that made it (its number within the app).
    pub build: u64,
    /// Runtime, dependencies (when the app has any), app; in the order they are stacked.
    pub layers: Vec<LayerRef>,
    /// Release-relative directories put first on `PATH`, in order (`.px/runtime/bin`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    /// Variables the build adds to every instance's environment; `{release}` in a value is the
    /// release directory on the node. Config vars override them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The runtime inside the release, as `name version` (`python3 3.12.1`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Commands the runtime layer provides (`python3`, `python`, `node`, `npm`), so placement
    /// and the node's checks know the release brings them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

/// How a build ended, once it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BuildResult {
    /// The build made release `release`.
    Succeeded { release: u64 },
    /// The build failed; `reason` is one sentence, the log holds the rest.
    Failed { reason: String },
    /// A newer upload or build of the app came first; this one never becomes a release.
    Superseded { by: String },
}

/// An upload waiting to be built, or built: `apps/<app>/builds/<n>.json` (and its result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub app: String,
    /// Per-app number, starting at 1.
    pub number: u64,
    /// The uploaded source.
    pub source: BundleRef,
    /// The manifest inside the source.
    pub manifest: AppManifest,
    pub description: String,
    /// RFC 3339 time of the upload.
    pub created_at: String,
    /// Name of the token that uploaded it.
    pub created_by: String,
    /// Absent while the build is pending or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<BuildResult>,
}

/// Body of `POST /v1/apps/{app}/builds/{n}/finish`, from the node that built it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildFinished {
    pub output: BuildOutput,
    /// The build's output, its last [`MAX_BUILD_LOG_BYTES`] at most.
    pub log: String,
}

/// Body of `POST /v1/apps/{app}/builds/{n}/fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildFailed {
    /// One sentence: what failed and what to do.
    pub reason: String,
    /// The build's output, its last [`MAX_BUILD_LOG_BYTES`] at most.
    pub log: String,
}

/// Body of a `202 Accepted` answer to an upload that needs a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildQueued {
    pub build: Build,
}

/// A build Beacon asks a node to run; part of the node's assignment until it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOrder {
    pub app: String,
    pub build: u64,
    /// Where to download the source (apprepo's `/v1/bundles/<sha256>`).
    pub source_url: String,
    pub source_sha256: String,
    pub source_size: u64,
    pub manifest: AppManifest,
}

/// Where a node's build stands, in its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildProgress {
    Running,
    Succeeded,
    Failed,
    /// It never becomes a release from this node: the repository had another result for it
    /// (a newer upload superseded it), or it left the node's assignment before it finished.
    Superseded,
}

/// One build a node runs or ran (the latest per app), reported with its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStatus {
    pub app: String,
    pub build: u64,
    pub progress: BuildProgress,
    /// The release it became, once the repository committed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
}

/// Notice from the repository that an upload of `app` waits for build `build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequested {
    pub app: String,
    pub build: u64,
}

/// A layer as a node should fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedLayer {
    pub kind: LayerKind,
    pub sha256: String,
    pub size: u64,
    /// Where to download it (apprepo's `/v1/layers/<sha256>`).
    pub url: String,
}

/// A built release as a node should assemble and run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedBuild {
    pub layers: Vec<AssignedLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn results_and_layers_have_a_stable_shape() {
        let failed = serde_json::to_value(BuildResult::Failed { reason: "x".into() }).unwrap();
        assert_eq!(
            failed,
            serde_json::json!({"state": "failed", "reason": "x"})
        );
        let layer = serde_json::to_value(LayerRef {
            kind: LayerKind::Dependencies,
            sha256: "ab".into(),
            size: 3,
        })
        .unwrap();
        assert_eq!(
            layer,
            serde_json::json!({"kind": "dependencies", "sha256": "ab", "size": 3})
        );
    }
}
