//! JSON bodies of Beacon's HTTP API (`/v1`, docs/src/reference/beacon.md): nodes, apps and their rollouts,
//! and the platform event stream that `em deploy` and `em logs -f` follow.

use serde::{Deserialize, Serialize};

use crate::link::{InstanceStatus, NodeEventKind};

/// How serious an event is; `error` and above alert sysadmins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    #[serde(alias = "warn")]
    Warning,
    Error,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
            Level::Critical => "critical",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    NodeJoined,
    NodeLost,
    NodeRecovered,
    InstanceStarted,
    InstanceCrashed,
    InstanceUnhealthy,
    CrashLoop,
    DeployStarted,
    DeployFinished,
    DeployFailed,
    /// The new release went over its error budget during its watch; Beacon rolls it back.
    DeployRolledBack,
    /// The new release's watch window ended; its figures are final.
    DeployVerified,
    /// The repository could not be reached; Beacon keeps the last known desired state.
    RepositoryUnreachable,
    RepositoryRecovered,
    /// An app reported something itself (through `PX_EVENTS_URL`); its level is the app's.
    AppEvent,
    /// An upload of the app waits for a build.
    BuildQueued,
    /// A node started the build.
    BuildStarted,
    /// The build made a release.
    BuildFinished,
    /// The build failed; nothing changes in what serves.
    BuildFailed,
    /// A newer release of the app came before this one was serving everywhere; this one
    /// stops rolling out.
    DeploySuperseded,
    /// A one-off command (`em run`) started: who, what, on which node.
    RunStarted,
    /// A one-off command ended: its exit status and how long it ran.
    RunFinished,
    /// A node started a release's release phase.
    PhaseStarted,
    /// The release phase succeeded; the release goes live.
    PhaseSucceeded,
    /// The release phase failed; the old release keeps serving.
    PhaseFailed,
    /// Two apps name the same host; it is routed to the app created first.
    DomainConflict,
    /// The ACME CA issued a certificate for a host name (first or renewed).
    CertificateIssued,
    /// An ACME order for a host name failed (the CA's reason in `detail`), or the local
    /// budget refused to send it.
    CertificateFailed,
    /// A certificate from ACME is close to its expiry and no renewal succeeded yet.
    CertificateExpiring,
}

impl EventKind {
    pub fn level(self) -> Level {
        match self {
            EventKind::NodeLost
            | EventKind::CrashLoop
            | EventKind::BuildFailed
            | EventKind::PhaseFailed
            | EventKind::DeployFailed
            | EventKind::DeployRolledBack
            | EventKind::CertificateFailed
            | EventKind::CertificateExpiring => Level::Error,
            EventKind::InstanceCrashed
            | EventKind::InstanceUnhealthy
            | EventKind::RepositoryUnreachable
            | EventKind::DomainConflict => Level::Warning,
            _ => Level::Info,
        }
    }
}

impl From<NodeEventKind> for EventKind {
    fn from(kind: NodeEventKind) -> Self {
        match kind {
            NodeEventKind::InstanceStarted => EventKind::InstanceStarted,
            NodeEventKind::InstanceCrashed => EventKind::InstanceCrashed,
            NodeEventKind::InstanceUnhealthy => EventKind::InstanceUnhealthy,
            NodeEventKind::CrashLoop => EventKind::CrashLoop,
            NodeEventKind::DeployFinished => EventKind::DeployFinished,
            NodeEventKind::DeployFailed => EventKind::DeployFailed,
            NodeEventKind::AppEvent => EventKind::AppEvent,
            NodeEventKind::BuildStarted => EventKind::BuildStarted,
            NodeEventKind::BuildFinished => EventKind::BuildFinished,
            NodeEventKind::BuildFailed => EventKind::BuildFailed,
            NodeEventKind::PhaseStarted => EventKind::PhaseStarted,
            NodeEventKind::PhaseSucceeded => EventKind::PhaseSucceeded,
            NodeEventKind::PhaseFailed => EventKind::PhaseFailed,
            NodeEventKind::DomainConflict => EventKind::DomainConflict,
        }
    }
}

/// One entry of Beacon's append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log, strictly increasing; page with `?after=<seq>`.
    pub seq: u64,
    /// RFC 3339 time Beacon recorded it.
    pub at: String,
    pub kind: EventKind,
    pub level: Level,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// One human sentence.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a crash, an unhealthy instance or a failed deploy: why, classified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::link::FailureKind>,
    /// For a build's events: the build's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
}

/// Whether a node's link is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeHealth {
    Connected,
    /// Missed heartbeats past the deadline, or disconnected for longer than that.
    Lost,
}

/// A Maestro node as Beacon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub health: NodeHealth,
    pub software: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Language runtimes the node found on its host, with their versions.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub runtimes: std::collections::BTreeMap<String, String>,
    /// RFC 3339 time of the last frame received.
    pub last_seen: String,
    /// Generation of the last assignment sent, and of the last one the node applied.
    pub assigned_generation: u64,
    pub applied_generation: u64,
    pub instances: Vec<InstanceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<crate::link::DiskReport>,
}

/// A repository linked to Beacon, with its storage figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub name: String,
    pub connected: bool,
    /// RFC 3339 time of the last frame received.
    pub last_seen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<crate::link::DiskReport>,
}

/// Where a release's rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Assigned; not every node reports it healthy yet.
    RollingOut,
    /// Every assigned node runs it healthy.
    RolledOut,
    /// A node reported that it never became healthy.
    Failed,
    /// No node is eligible to run it (placement labels match none).
    Unplaced,
    /// It went over its error budget and is being (or was) rolled back.
    RolledBack,
}

/// One rollout of an app as Beacon recorded it, for `em releases` (newest first in
/// `GET /v1/apps/{app}/rollouts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub release: u64,
    /// The desired release before it, when Beacon knew one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    pub state: RolloutState,
    /// RFC 3339 time Beacon assigned it.
    pub started_at: String,
    /// Seconds from assignment to rolled out, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_seconds: Option<f64>,
    /// Summed over the nodes that reported.
    pub figures: crate::link::DeployFigures,
    pub watch_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<crate::rate::Rate>,
    /// Whether the watch window is over on every node.
    pub verified: bool,
    /// The verdict in one sentence, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// An app with its desired release and rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub release: u64,
    pub bundle_sha256: String,
    pub rollout: RolloutState,
    /// Nodes assigned the app, and how many of them run the desired release healthy.
    pub nodes: Vec<String>,
    pub healthy_nodes: usize,
    /// Seconds from assignment to rolled out, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_seconds: Option<f64>,
    /// What the switch cost so far, summed over the nodes (see `RolloutRecord`).
    #[serde(default)]
    pub figures: crate::link::DeployFigures,
    /// The rollout's verdict once its watch is over or its error budget spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The host names the app is served on, as its assignment names them (the manifest's,
    /// those added with `em domains add`, and `<app>.<cluster domain>` when served).
    #[serde(default)]
    pub domains: Vec<String>,
}

/// One process of an app as `GET /v1/apps/{app}/processes` lists it (`em ps`): the node that
/// runs it and its row of that node's latest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProcess {
    pub node: String,
    #[serde(flatten)]
    pub status: crate::link::InstanceStatus,
}

/// One line of app output as Beacon serves it: which node, then the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub node: String,
    pub app: String,
    pub release: u64,
    pub instance: u32,
    pub stream: crate::link::LogStream,
    pub at: String,
    pub line: String,
    /// For a build's output: the build's number (`release` and `instance` are then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
    /// The process type of a line from a process other than a web instance (`worker`);
    /// `instance` is then its cluster-wide number. Absent for web instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}
