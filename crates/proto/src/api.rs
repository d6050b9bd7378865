//! JSON bodies of the apprepo HTTP API (`/v1`, docs/src/reference/apprepo.md), shared by the service and its clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::build::BuildOutput;
use crate::manifest::AppManifest;

/// Header carrying the SHA-256 (lowercase hex) the client computed over the bundle it uploads.
pub const HEADER_BUNDLE_SHA256: &str = "x-px-bundle-sha256";
/// Header carrying a one-line description of an upload, shown in `em releases`.
pub const HEADER_DESCRIPTION: &str = "x-px-description";

/// An app as the repository knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    /// RFC 3339 time of creation.
    pub created_at: String,
    /// Name of the token that created it.
    pub created_by: String,
    /// The newest release, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Release>,
    /// The counts set with `em scale` (docs/src/design/processes.md), only those set: the
    /// defaults come from the current release (`px_proto::process::formation`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub formation: BTreeMap<String, u32>,
    /// Host names added with `em domains add` (docs/src/reference/cli.md), lowercase and
    /// sorted: served beside the current release's `[http] domains`, and no release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// Body of `POST /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
}

/// Where a release's code lives: a content-addressed bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// Lowercase hex SHA-256 of the compressed bundle; also its storage key and ETag.
    pub sha256: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// Commands of the app's requirements that the bundle ships itself in `bin/` (a vendored
    /// interpreter, a static binary): they need not be installed on the web servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundled_commands: Vec<String>,
    /// Bytes of file content once unpacked, as apprepo's inspection counted them: what a web
    /// server needs free to unpack it (a compressed bundle may unpack to many times its size).
    /// Absent for bundles stored before apprepo recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_size: Option<u64>,
}

/// Why a release was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReleaseCause {
    /// A new bundle was uploaded.
    Deploy,
    /// Config vars changed.
    Config {
        set: Vec<String>,
        unset: Vec<String>,
    },
    /// An earlier release's code and config were restored.
    Rollback { to: u64 },
}

/// One immutable release of an app: code (bundle), manifest and config vars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub app: String,
    /// Per-app number, starting at 1 (shown as v1, v2, …).
    pub version: u64,
    pub bundle: BundleRef,
    /// The manifest inside the bundle, so consumers need not unpack to read it.
    pub manifest: AppManifest,
    /// Config vars set with `em config set` (they override `manifest.env`).
    pub config: BTreeMap<String, String>,
    pub cause: ReleaseCause,
    pub description: String,
    /// RFC 3339 time of the commit.
    pub created_at: String,
    /// Name of the token that made it.
    pub created_by: String,
    /// For a built release: its layers and what its instances need on top of its environment.
    /// Absent for a release that is its upload, run as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildOutput>,
    /// The release phase the release runs before it goes live (a deploy whose manifest names
    /// one); absent for a release that has none, and for config changes and rollbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ReleasePhase>,
    /// Whether `config` shows names only, its values hidden because the caller's token may not
    /// see them (a `read` token). Never stored; Beacon refuses to assign such a release.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_hidden: bool,
}

/// The role of a token minted through apprepo (`em tokens create`): what a CI pipeline or a
/// dashboard needs, never a service's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MintedRole {
    Read,
    Deploy,
}

impl MintedRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MintedRole::Read => "read",
            MintedRole::Deploy => "deploy",
        }
    }
}

/// Most minted tokens a cluster holds: one per CI pipeline or dashboard is tens to a few
/// hundred, and every request's token is compared with each of them.
pub const MAX_MINTED_TOKENS: usize = 256;
/// Most apps one minted token names: a pipeline deploys a few apps, and the list travels in
/// every grant Beacon is sent.
pub const MAX_TOKEN_APPS: usize = 32;

/// `POST /v1/tokens`: mint a token limited to `apps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintToken {
    pub name: String,
    pub role: MintedRole,
    /// The apps it may act on; at least one.
    pub apps: Vec<String>,
    /// Seconds until it expires; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// A minted token as listed: never its secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: MintedRole,
    pub apps: Vec<String>,
    /// RFC 3339 time of the mint.
    pub created_at: String,
    /// The name of the token that minted it.
    pub created_by: String,
    /// When it stops being accepted, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// The answer to a mint: the token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMinted {
    pub token: String,
    pub info: TokenInfo,
}

/// A minted token as apprepo stores it (`tokens/<name>.json`) and tells Beacon of it: its
/// hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub info: TokenInfo,
    pub sha256: String,
}

/// What a token that may not see config values gets in place of each one.
pub const HIDDEN_CONFIG_VALUE: &str = "(hidden)";

impl Release {
    /// Hides the config values, keeping their names, and says so in `config_hidden` (a
    /// release without config vars has nothing to hide and stays as it is).
    pub fn hide_config_values(&mut self) {
        for value in self.config.values_mut() {
            *value = HIDDEN_CONFIG_VALUE.to_string();
        }
        self.config_hidden = !self.config.is_empty();
    }
}

/// A release's release phase (docs/src/design/processes.md, "The release phase").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasePhase {
    /// The shell command, as the resolved manifest has it.
    pub command: String,
    /// How long it may run, in seconds.
    pub timeout_secs: u64,
    /// How far it got: `"state": "failed", "reason": "..."` beside the other fields.
    #[serde(flatten)]
    pub state: PhaseState,
}

impl ReleasePhase {
    /// Whether the phase has ended one way or another.
    pub fn ended(&self) -> bool {
        !matches!(self.state, PhaseState::Pending | PhaseState::Running { .. })
    }
}

/// Where a release phase stands. A release is current only once its phase succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PhaseState {
    /// Committed; no node claimed it yet.
    Pending,
    /// Claimed by `node`, which runs it.
    Running { node: String, claimed_at: String },
    /// It exited 0: the release may go live.
    Succeeded,
    /// It failed, timed out or was interrupted; the release never goes live.
    Failed { reason: String },
    /// A newer release came before any node claimed it; it never runs.
    Superseded { by: String },
}

/// Body of `POST /v1/apps/{app}/releases/{version}/phase/claim`, from the node that would run
/// the phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseClaim {
    /// The node's name.
    pub node: String,
    /// Unique per claiming process run: a retry of the same claim (its answer was lost) wins
    /// again, while a restarted node, or another one, is refused.
    pub attempt: String,
}

/// How a release phase ended, as the node that ran it (or found it abandoned) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PhaseOutcome {
    /// The command exited 0.
    Succeeded,
    /// It exited non-zero, was killed at its timeout, or its run was interrupted; `reason` is
    /// one sentence, the log holds the rest.
    Failed { reason: String },
}

/// Body of `POST /v1/apps/{app}/releases/{version}/phase/end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseEnded {
    /// The claim's `attempt`; only the claimant may report a success.
    pub attempt: String,
    pub outcome: PhaseOutcome,
    /// The phase's output, its last `MAX_BUILD_LOG_BYTES` at most.
    pub log: String,
}

impl Release {
    /// The environment an instance gets from this release: manifest defaults, then config vars.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = self.manifest.env.clone();
        env.extend(self.config.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// Body of `PATCH /v1/apps/{app}/config`: vars to set and to remove, in one new release.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// Body of `POST /v1/apps/{app}/rollback`; without `to`, the release before the current one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    #[serde(default)]
    pub to: Option<u64>,
}

/// Body of `GET /v1/apps/{app}/formation`: how many processes of each type run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formation {
    pub app: String,
    /// The release the defaults come from; none before the first deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// Every type the release runs, `web` first.
    pub processes: Vec<FormationEntry>,
}

/// One type of a [`Formation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormationEntry {
    /// The type: `web`, `worker`, ...
    pub process: String,
    /// How many run: per web server for `web`, across the cluster for the others.
    pub count: u32,
    /// Set with `em scale` (otherwise the release's default).
    pub explicit: bool,
}

/// Body of `POST /v1/apps/{app}/domains` (`em domains add`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDomain {
    pub domain: String,
}

/// Body of `GET /v1/apps/{app}/domains`, and the answer to adding or removing one: every
/// host name the app is served on that apprepo knows of, manifest's first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domains {
    pub app: String,
    pub domains: Vec<DomainEntry>,
}

/// One host name of [`Domains`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEntry {
    pub domain: String,
    pub source: DomainSource,
    /// The name's certificate from ACME, once the repository tracks them; `None` until then,
    /// and for a name with no certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<DomainCertificate>,
}

/// Where a host name of an app comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainSource {
    /// The current release's `[http] domains` in app.toml: changed by a deploy.
    Manifest,
    /// Added with `em domains add`: changed without a release.
    Added,
    /// `<app>.<cluster domain>`, from Beacon's `domain` setting (never stored by apprepo).
    Cluster,
}

impl DomainSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainSource::Manifest => "manifest",
            DomainSource::Added => "added",
            DomainSource::Cluster => "cluster",
        }
    }
}

/// A certificate's state as `em domains list` shows it: the fields of the ACME certificate
/// listing (domain aside), so that listing can fill it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCertificate {
    /// `pending`, `valid`, `failed`, ...
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// RFC 3339 expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Every error answer: a stable machine code and a sentence saying what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_release_phase_has_a_flat_stable_shape() {
        let phase = ReleasePhase {
            command: "./manage.py migrate --no-input".into(),
            timeout_secs: 600,
            state: PhaseState::Failed {
                reason: "exit code 1".into(),
            },
        };
        let json = serde_json::to_value(&phase).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "command": "./manage.py migrate --no-input",
                "timeout_secs": 600,
                "state": "failed",
                "reason": "exit code 1"
            })
        );
        assert_eq!(serde_json::from_value::<ReleasePhase>(json).unwrap(), phase);
        let running = serde_json::json!({
            "command": "x", "timeout_secs": 1, "state": "running", "node": "web-1",
            "claimed_at": "2026-12-06T11:11:53Z"
        });
        assert!(matches!(
            serde_json::from_value::<ReleasePhase>(running).unwrap().state,
            PhaseState::Running { node, .. } if node == "web-1"
        ));
    }
}
