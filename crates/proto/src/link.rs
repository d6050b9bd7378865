//! Messages of the TCP control links (docs/src/design/contracts.md). Every link is TLS over TCP carrying
//! frames of [`crate::codec`]; the peer speaks first with [`Hello`], Beacon answers
//! [`FromBeacon::Welcome`] or [`FromBeacon::Rejected`], then both sides send heartbeats and
//! whatever their role calls for:
//!
//! - repository → Beacon: [`ToBeacon::ReleaseCommitted`];
//! - Maestro → Beacon: its full actual state in the `Hello` and in every
//!   [`ToBeacon::Heartbeat`], and [`ToBeacon::Event`]s as things happen;
//! - Beacon → Maestro: [`FromBeacon::Assign`] (the node's full desired state, with a
//!   generation number), [`FromBeacon::Restart`] and [`FromBeacon::Stop`].
//!
//! State is sent whole, never as deltas, so a lost frame or a reconnect is repaired by the
//! next one (level-triggered).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::beacon::Level;
use crate::build::{AssignedBuild, BuildOrder, BuildRequested, BuildStatus};
use crate::manifest::AppManifest;

/// Version of the link protocol; a peer with another version is refused with a reason.
pub const PROTOCOL_VERSION: u32 = 1;
/// How often a peer (Maestro, repository) sends Beacon a heartbeat carrying its report. Beacon
/// reads and records every one of them, for 10,000 links: this interval sets its steady CPU.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Beacon drops a peer silent for this long: three missed heartbeats. Also the deadline a peer
/// keeps on a Beacon whose [`FromBeacon::Welcome`] announces no `heartbeat_ms` (one that predates
/// it beats every [`HEARTBEAT_INTERVAL`]).
pub const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(15);
/// How long a peer waits for Beacon's answer to one of its heartbeats, from a Beacon whose
/// `Welcome` says it answers them ([`FromBeacon::Welcome`]'s `answers_heartbeats`): any frame
/// from Beacon within this counts. A peer notices a Beacon whose host vanished (power lost,
/// kernel hung, network cut: no FIN, no RST) only by its silence, and so within a heartbeat
/// interval and this, 3 to 8 s, while the host's Beacon lease lapses (4 to 6 s after its last
/// renewal). Beacon answers in the wake-up that reads the heartbeat, one write more on a
/// wake-up it has anyway, instead of waking every link every 2 s for a beat of its own: at
/// 10,000 links, 2,000 wake-ups and 4,000 system calls a second instead of 7,000 and 7,000.
pub const HEARTBEAT_ANSWER_DEADLINE: Duration = Duration::from_secs(3);
/// A peer gives up on a Beacon that missed this many of the heartbeats it announced.
pub const MISSED_BEACON_HEARTBEATS: u32 = 3;
/// The shortest and longest Beacon heartbeat interval a peer accepts from a `Welcome`: a
/// shorter one is counted as this floor (a few lost beats on a loaded host must not end a
/// link), a longer one as [`HEARTBEAT_INTERVAL`] (never a deadline past [`HEARTBEAT_DEADLINE`]).
pub const MIN_BEACON_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a peer has to complete the handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest peer name accepted in a `Hello`.
pub const MAX_PEER_NAME_LEN: usize = 253;
/// Most labels a node may carry, and most instances it may report.
pub const MAX_NODE_LABELS: usize = 64;
pub const MAX_REPORTED_INSTANCES: usize = 4096;
/// Most runtimes a node may report in its `Hello`.
pub const MAX_REPORTED_RUNTIMES: usize = 64;
/// Largest frame Beacon reads before the peer proved who it is: its `Hello`. The largest
/// `Hello` without `state` (a 253-byte name, a 256-byte token, 64 labels of 63-byte keys and
/// values, 64 runtimes of 32-byte names and versions) measures about 14 KiB
/// (`codec` test `the_largest_hello_without_state_fits_before_authentication`); a `Hello` whose
/// `state` would take it over this is sent without it, and the first heartbeat brings the state.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// What Beacon announces in its `Welcome` as `heartbeat_ms`: it answers every heartbeat, and a
/// peer heartbeats every [`HEARTBEAT_INTERVAL`], so a peer hears from it at least that often.
/// A peer that predates the answers gives up after three of these (15 s).
pub fn beacon_heartbeat_ms() -> u64 {
    u64::try_from(HEARTBEAT_INTERVAL.as_millis()).unwrap_or(u64::MAX)
}

/// How long a peer waits on a silent Beacon that announced `heartbeat_ms` in its `Welcome`
/// before giving up on it: [`MISSED_BEACON_HEARTBEATS`] beats, the interval taken within
/// [`MIN_BEACON_HEARTBEAT_INTERVAL`] and [`HEARTBEAT_INTERVAL`]; [`HEARTBEAT_DEADLINE`] for a
/// Beacon that announced none.
pub fn beacon_silence_deadline(heartbeat_ms: Option<u64>) -> Duration {
    match heartbeat_ms {
        None => HEARTBEAT_DEADLINE,
        Some(ms) => Duration::from_millis(ms)
            .clamp(MIN_BEACON_HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL)
            .saturating_mul(MISSED_BEACON_HEARTBEATS),
    }
}

/// What kind of peer opens a link to Beacon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    Repository,
    Maestro,
}

/// First frame a peer sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub role: PeerRole,
    /// Host or node name: unique per Maestro, shown on the status page.
    pub name: String,
    /// The peer's token; Beacon compares its hash.
    pub token: String,
    /// Software version, for the status page.
    pub software: String,
    /// Node labels (`role = "web"`, `zone = "a"`) that apps may require. Maestro only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The node's full actual state. Maestro only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeReport>,
    /// Language runtimes found on the node (`python3` → `3.11.7`), for placement. Maestro only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runtimes: BTreeMap<String, String>,
}

/// A node's full actual state: the assignment it last applied and every instance it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Generation of the last assignment the node applied (0: none yet).
    pub generation: u64,
    pub instances: Vec<InstanceStatus>,
    /// What each app's latest release switch on this node cost so far (one per app).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutFigures>,
    /// Disk use, for the status page: a Maestro's releases, a repository's bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskReport>,
    /// The builds this node runs or ran (the latest per app).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<BuildStatus>,
}

/// How much disk a peer uses and has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    /// Bytes the peer's data takes: a Maestro's unpacked releases, a repository's bundles (as
    /// of its last retention sweep).
    pub used_bytes: u64,
    /// Objects behind `used_bytes`, when counted (a repository's bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// Free bytes on the file system holding the data (none for S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Free space below which a Maestro refuses new releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_bytes: Option<u64>,
}

/// What a release switch cost, counted by the proxy: the figures of `em releases`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployFigures {
    /// Requests the previous release answered after the switch (those in flight finishing).
    pub old_requests: u64,
    /// Requests the new release answered in its watch window, and how many of them were 5xx
    /// (the proxy's own 502/504 for it included).
    pub new_requests: u64,
    pub new_errors: u64,
    /// Long-lived connections of the previous release closed with a reconnect hint, and cut
    /// at the drain deadline.
    pub closed: u64,
    pub cut: u64,
    /// Processes of the previous release (of any type) that ignored SIGTERM and were killed
    /// at the end of their `stop_grace`.
    #[serde(default)]
    pub killed: u64,
}

impl std::ops::AddAssign for DeployFigures {
    fn add_assign(&mut self, other: Self) {
        self.old_requests += other.old_requests;
        self.new_requests += other.new_requests;
        self.new_errors += other.new_errors;
        self.closed += other.closed;
        self.cut += other.cut;
        self.killed += other.killed;
    }
}

/// One node's figures for the switch to `release` of `app`, updated while it is watched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutFigures {
    pub app: String,
    pub release: u64,
    /// The release it replaced on this node; none for a first deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    /// Milliseconds since the switch that these figures cover, out of the watch window.
    pub watched_ms: u64,
    pub watch_ms: u64,
    /// The window is over (and the old release drained): these figures are final.
    pub done: bool,
    #[serde(flatten)]
    pub figures: DeployFigures,
}

/// Lifecycle of one app instance on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Started, health check not passed yet.
    Starting,
    /// Passing its health check and taking traffic.
    Healthy,
    /// Running but failing its health check.
    Unhealthy,
    /// Exited; waiting for its restart backoff.
    Crashed,
    /// Being stopped (draining).
    Stopping,
}

/// Why an instance stopped serving, or never started to, classified so that alerts and
/// dashboards need not parse sentences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// It exited with a status code.
    ExitCode,
    /// A signal ended it (not the OOM killer).
    Signal,
    /// The kernel's OOM killer ended it at its `[limits] memory`.
    OutOfMemory,
    /// It never accepted connections on its port within the health timeout.
    NeverListened,
    /// It listened, but its health check kept failing until the timeout.
    HealthFailing,
    /// It opted in to heartbeats (`PX_EVENTS_URL`) and stopped sending them.
    MissedHeartbeats,
    /// It could not be started at all (no free port, the command failed to spawn).
    CannotStart,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExitCode => "exit_code",
            Self::Signal => "signal",
            Self::OutOfMemory => "out_of_memory",
            Self::NeverListened => "never_listened",
            Self::HealthFailing => "health_failing",
            Self::MissedHeartbeats => "missed_heartbeats",
            Self::CannotStart => "cannot_start",
        }
    }
}

/// How an instance last ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (over its `[limits] memory`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom: bool,
    /// The exit, classified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
    /// RFC 3339 time of the exit.
    pub at: String,
}

/// One instance as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub app: String,
    pub release: u64,
    pub state: InstanceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// Its process type: `web` for the instances behind the proxy (and from a Maestro that
    /// predates process types), or the type of a process from the release's `processes`.
    #[serde(default = "web_process", skip_serializing_if = "is_web_process")]
    pub process: String,
    /// Its number within its type: per node for `web` (1 to `instances`), cluster-wide for the
    /// other types (Beacon's assignment). 0 from a Maestro that predates numbers, whose web
    /// instances are numbered by their place in its report.
    #[serde(default)]
    pub number: u32,
    /// RFC 3339 time the running process started (none while it is not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Memory its process group uses: its cgroup's `memory.current` when it has one, else
    /// the resident memory of the group's processes. None when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU its process group used since the node's previous measurement, in thousandths of
    /// one core (1500: one and a half cores). None before a second measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_permille: Option<u32>,
}

impl InstanceStatus {
    /// Whether it is a web instance (health-checked, behind the proxy).
    pub fn is_web(&self) -> bool {
        is_web_process(&self.process)
    }
}

fn web_process() -> String {
    crate::procfile::WEB_PROCESS.to_string()
}

fn is_web_process(process: &str) -> bool {
    process == crate::procfile::WEB_PROCESS
}

/// Something that happened on a node, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    pub kind: NodeEventKind,
    pub app: String,
    pub release: u64,
    /// One human sentence.
    pub message: String,
    /// Supporting text, such as the last lines of a failed instance's stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The instance it concerns, when one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// The level the app gave an `AppEvent`; other kinds have a level of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// For a crash, an unhealthy instance or a failed deploy: why, classified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// For a build's events: the build's number (`release` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeEventKind {
    InstanceStarted,
    InstanceCrashed,
    InstanceUnhealthy,
    /// An instance keeps crashing; restarts are backing off.
    CrashLoop,
    /// The node switched traffic to the release.
    DeployFinished,
    /// The release never became healthy on this node; the previous one keeps serving.
    DeployFailed,
    /// An instance reported an event of its own through `PX_EVENTS_URL`.
    AppEvent,
    /// The node started a build.
    BuildStarted,
    /// The build succeeded and the repository committed its release.
    BuildFinished,
    /// The build failed; nothing changes in what serves.
    BuildFailed,
    /// The node claimed a release's release phase and started its command.
    PhaseStarted,
    /// The release phase exited 0; the release goes live.
    PhaseSucceeded,
    /// The release phase failed, timed out or was interrupted; the old release keeps serving.
    PhaseFailed,
    /// Two apps name the same host; the node routes it to the app created first (the older
    /// claim) and sends this once per host and pair of apps.
    DomainConflict,
}

/// Most log lines in one `Logs` frame; Maestro batches lines and sends at most this many.
pub const MAX_LOG_BATCH: usize = 512;

/// Which pipe of an instance a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// An event the instance posted to `PX_EVENTS_URL`, logged beside its output.
    Event,
    /// The output of a build (`LogLine::build` names it).
    Build,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Event => "event",
            Self::Build => "build",
        }
    }
}

/// One line an instance printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub app: String,
    pub release: u64,
    pub instance: u32,
    pub stream: LogStream,
    /// When Maestro read the line: RFC 3339, UTC, with milliseconds.
    pub at: String,
    /// The line without its newline.
    pub line: String,
    /// For a build's output: the build's number (`release` and `instance` are then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
    /// The process type of a line from a process other than a web instance (`worker`);
    /// `instance` is then its number. Absent for web instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

/// App output forwarded by a Maestro, so `em logs -f` can follow an app across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
    /// Lines this node dropped since its last batch (rate limit, or a lagging reader).
    #[serde(default)]
    pub dropped: u64,
}

/// A frame from a peer (repository or Maestro) to Beacon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToBeacon {
    Hello(Hello),
    /// Keeps the link alive; Maestro includes its full actual state (the repository sends
    /// an empty report).
    Heartbeat(NodeReport),
    /// A release was committed; Beacon should assign it.
    ReleaseCommitted(ReleaseCommitted),
    /// An upload waits for a build; Beacon should place it. From the repository.
    BuildRequested(BuildRequested),
    Event(NodeEvent),
    Logs(LogBatch),
    /// A frame of a one-off run (`em run`), keyed by its run id. Maestro only.
    Run(crate::run::RunFromNode),
    /// Every token minted through the repository that has not expired (hashes and scopes,
    /// never secrets), sent on each connect and whenever the list changes; it replaces the
    /// list sent before. From the repository.
    Tokens(TokenGrants),
}

/// The minted tokens Beacon accepts besides its configured ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrants {
    pub grants: Vec<crate::api::TokenGrant>,
}

/// A frame from Beacon to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromBeacon {
    Welcome {
        protocol: u32,
        beacon: String,
        /// How often at least this Beacon sends the link a frame, in milliseconds
        /// ([`beacon_heartbeat_ms`]); the peer gives up on it after
        /// [`MISSED_BEACON_HEARTBEATS`] of them ([`beacon_silence_deadline`]). Absent from a
        /// Beacon that predates it, which beats every [`HEARTBEAT_INTERVAL`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u64>,
        /// Whether this Beacon answers every heartbeat at once with one of its own, so that a
        /// peer may give up on it when an answer is [`HEARTBEAT_ANSWER_DEADLINE`] late. False
        /// (absent) from a Beacon that predates it, which beat every 2 s on its own instead.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        answers_heartbeats: bool,
    },
    /// The handshake failed; the peer should log `reason` and back off.
    Rejected {
        reason: String,
    },
    Heartbeat,
    /// The node's full desired state; replaces any earlier assignment.
    Assign(Assignment),
    /// Restart every instance of an app (rolling, as for a deploy).
    Restart {
        app: String,
    },
    /// Stop every instance of an app until the next assignment that includes it.
    Stop {
        app: String,
    },
    /// To the repository: commit a rollback of `app` to `to` (the release before `from` when
    /// none), only if `from` is still its current release. Sent again on every reconnect
    /// until the desired state moves past `from`, so the repository must ignore a stale one.
    Rollback(RollbackOrder),
    /// A frame of a one-off run (`em run`), keyed by its run id. To a Maestro.
    Run(crate::run::NodeRunFrame),
    /// Every ACME challenge the cluster answers now; replaces the set sent before. To a
    /// Maestro, on each connect and whenever the set changes.
    AcmeChallenges(crate::acme::AcmeChallenges),
    /// Every certificate ACME issued for the cluster; replaces the set sent before. To a
    /// Maestro, on each connect and whenever one is issued or renewed.
    AcmeCertificates(crate::acme::AcmeCertVersions),
}

/// An automatic rollback Beacon asks the repository for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOrder {
    pub app: String,
    pub from: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// Why, for the new release's description.
    pub reason: String,
}

/// Notice that a release of an app is committed in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseCommitted {
    pub app: String,
    pub version: u64,
    pub bundle_sha256: String,
}

/// Everything one node should run. Generations only grow; a node ignores an assignment
/// older than the one it applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub generation: u64,
    pub apps: Vec<AppAssignment>,
    /// Builds this node should run (only a node labelled `build = "true"` gets any); a build
    /// stays here until the repository has its result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds: Vec<BuildOrder>,
    /// Release phases this node should run (docs/src/design/processes.md): each stays here
    /// until the repository has its end, and the node runs it once, after claiming it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseOrder>,
}

/// A release phase Beacon asks a node to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseOrder {
    /// The release, as the node prepares it for its instances (its files, its environment);
    /// no instance of it starts from this order.
    pub release: AppAssignment,
    /// The release phase's shell command.
    pub command: String,
    /// How long it may run, in seconds.
    pub timeout_secs: u64,
}

/// One app as a node should run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppAssignment {
    pub app: String,
    pub release: u64,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    /// Where to download the bundle (apprepo's `/v1/bundles/<sha256>`).
    pub bundle_url: String,
    pub manifest: AppManifest,
    /// The instance environment: manifest defaults overridden by config vars.
    pub env: BTreeMap<String, String>,
    pub instances: u32,
    /// Host names routed to the app.
    pub domains: Vec<String>,
    /// For a built release: the layers to assemble it from instead of the bundle, and what its
    /// instances need on top of `env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<AssignedBuild>,
    /// The processes of non-web types this node runs (docs/src/design/processes.md): per type
    /// of the release's `processes`, the cluster-wide numbers placed here (`worker` → `[1, 3]`).
    /// Numbers are Beacon's, so logs and `em ps` name each process once across the cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub processes: BTreeMap<String, Vec<u32>>,
    /// When the app was created (apprepo's `created_at`, RFC 3339): of two apps that name the
    /// same host, the node routes it to the one created first (docs/src/design/trust.md).
    /// Absent from a Beacon that predates it; such an app ranks after every dated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_created_at: Option<String>,
    /// The bundle's size once unpacked (`BundleRef::unpacked_size`), for the node's disk check
    /// before it downloads; absent for bundles stored before apprepo recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_unpacked_size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_tagged_shape() {
        let hb = serde_json::to_value(ToBeacon::Heartbeat(NodeReport::default())).unwrap();
        assert_eq!(
            hb,
            serde_json::json!({"type": "heartbeat", "generation": 0, "instances": []})
        );
        let stop = serde_json::to_value(FromBeacon::Stop { app: "a".into() }).unwrap();
        assert_eq!(stop, serde_json::json!({"type": "stop", "app": "a"}));
        let hello: ToBeacon = serde_json::from_value(serde_json::json!({
            "type": "hello", "protocol": 1, "role": "repository", "name": "r", "token": "t", "software": "0.1.0"
        }))
        .unwrap();
        assert!(
            matches!(hello, ToBeacon::Hello(Hello { labels, state: None, .. }) if labels.is_empty())
        );
    }

    #[test]
    fn a_welcome_announces_beacon_heartbeats_and_one_without_them_still_reads() {
        let welcome = FromBeacon::Welcome {
            protocol: PROTOCOL_VERSION,
            beacon: "b".into(),
            heartbeat_ms: Some(beacon_heartbeat_ms()),
            answers_heartbeats: true,
        };
        assert_eq!(
            serde_json::to_value(&welcome).unwrap(),
            serde_json::json!({"type": "welcome", "protocol": 1, "beacon": "b", "heartbeat_ms": 5000, "answers_heartbeats": true})
        );
        // What a Beacon that beat every 2 s on its own sends.
        let beating: FromBeacon = serde_json::from_value(
            serde_json::json!({"type": "welcome", "protocol": 1, "beacon": "b", "heartbeat_ms": 2000}),
        )
        .unwrap();
        assert!(matches!(
            beating,
            FromBeacon::Welcome {
                heartbeat_ms: Some(2000),
                answers_heartbeats: false,
                ..
            }
        ));
        // What a Beacon that predates the announcement sends.
        let old: FromBeacon = serde_json::from_value(
            serde_json::json!({"type": "welcome", "protocol": 1, "beacon": "b"}),
        )
        .unwrap();
        assert!(matches!(
            old,
            FromBeacon::Welcome {
                heartbeat_ms: None,
                answers_heartbeats: false,
                ..
            }
        ));
    }

    #[test]
    fn a_peer_gives_up_on_a_beacon_after_three_announced_heartbeats_within_bounds() {
        assert_eq!(
            beacon_silence_deadline(Some(beacon_heartbeat_ms())),
            HEARTBEAT_DEADLINE
        );
        assert_eq!(beacon_silence_deadline(Some(2000)), Duration::from_secs(6));
        assert_eq!(beacon_silence_deadline(None), HEARTBEAT_DEADLINE);
        // A Beacon announcing beats too fast or too slow is held to the bounds.
        assert_eq!(beacon_silence_deadline(Some(0)), Duration::from_secs(3));
        assert_eq!(beacon_silence_deadline(Some(u64::MAX)), HEARTBEAT_DEADLINE);
    }

    #[test]
    fn reports_of_a_maestro_without_process_types_still_read() {
        // What a Maestro that predates process types sends: no `process`, no `number`.
        let old: InstanceStatus = serde_json::from_value(serde_json::json!({
            "app": "a", "release": 3, "state": "healthy", "restarts": 0
        }))
        .unwrap();
        assert!(old.is_web());
        assert_eq!((old.process.as_str(), old.number), ("web", 0));
        let worker = InstanceStatus {
            process: "worker".into(),
            number: 2,
            ..old.clone()
        };
        let json = serde_json::to_value(&worker).unwrap();
        assert_eq!(json["process"], "worker");
        assert_eq!(
            serde_json::from_value::<InstanceStatus>(json).unwrap(),
            worker
        );
        // A web instance travels as before, so older Beacons read it.
        assert!(serde_json::to_value(&old).unwrap().get("process").is_none());
        let figures: DeployFigures = serde_json::from_value(serde_json::json!({
            "old_requests": 1, "new_requests": 2, "new_errors": 0, "closed": 0, "cut": 0
        }))
        .unwrap();
        assert_eq!(figures.killed, 0);
    }
}
