//! The hub: Beacon's view of the cluster (nodes and what they report), the desired state read
//! from the repository, the assignment generation, and rollouts. Link tasks, the reconciler
//! and the HTTP API all go through it.
//!
//! One `std::sync::Mutex` guards the state; every method holds it briefly and never across an
//! await or any I/O. Events and alerts a change causes, and the files it must write, are
//! collected while locked and written and recorded after (`persist.rs` says in which order).
//! Placement and rollout verdicts are pure functions (`crate::placement`, `crate::judge`) the
//! hub applies.
//!
//! - `desired.rs`: the desired state, the generation and each node's assignment;
//! - `domains.rs`: the host names an app is served on (manifest, added, the cluster's);
//! - `builds.rs`: pending builds, where each runs, and their events;
//! - `processes.rs`: the formation (`em scale`'s counts over the defaults) and where each
//!   non-web process runs;
//! - `nodes.rs`: the node registry (attach, reports, events, detach, the sweep);
//! - `commands.rs`, `latest.rs`: a link's command queue and its node's latest assignment;
//! - `scope.rs`: what each node may report on (its assignment's apps and builds);
//! - `rollouts.rs`: rollout tracking, applying verdicts, rollback orders, the history;
//! - `repositories.rs`: the repository's links and reachability;
//! - `views.rs`: what the HTTP API and the status page read;
//! - `persist.rs`: the generation and rollout history on disk.

mod builds;
mod commands;
mod desired;
mod domains;
mod latest;
mod nodes;
mod persist;
mod processes;
mod release_phases;
mod repositories;
mod rollouts;
mod runs;

pub(crate) use persist::ROLLOUTS_DIR;
mod scope;
mod views;

pub(crate) use self::commands::{CommandSender, command_queue};
pub use self::domains::AddedDomains;
pub(crate) use self::nodes::Attached;
pub(crate) use self::runs::{RunNode, RunPlaceError};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use px_proto::api::Release;
use px_proto::beacon::{EventKind, RolloutRecord, RolloutState};
use px_proto::link::{DeployFigures, FromBeacon, NodeReport, RollbackOrder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::alerts::{Alert, Alerter};
use crate::events::{EventDraft, EventLog};
use crate::frames::Outgoing;
use crate::metrics::Metrics;
use crate::placement::{BuildKey, Fit, ProcessPlacement};

/// The counts each app's formation sets (`em scale`), by app then type; types not named take
/// the release's defaults (`px_proto::process::formation`).
pub type Formations = BTreeMap<String, BTreeMap<String, u32>>;

/// Commands (restart, stop) queued per link; a node that cannot take this many is too slow
/// and gets the next ones dropped (the operator can repeat them).
pub const COMMAND_QUEUE: usize = 16;

/// A command queued for a link, boxed: a queue holds pointers, not frames (`commands.rs`).
pub type Command = Box<FromBeacon>;

pub struct HubSettings {
    pub domain: String,
    pub repository_url: String,
    pub node_lost_after: Duration,
    pub data_dir: PathBuf,
    /// The generation this Beacon numbers above, whatever it persisted: `epoch << 32` for a
    /// Beacon that became active under the lease's `epoch` (`lease.rs`), 0 without a lease.
    pub generation_floor: u64,
    /// With a lease: where rollout histories go for the shared storage (`shared_state.rs`).
    pub shared_histories: Option<Arc<crate::shared_state::PendingHistories>>,
}

struct NodeEntry {
    labels: BTreeMap<String, String>,
    /// Runtimes the node found on its host (`python3` → `3.11.7`).
    runtimes: BTreeMap<String, String>,
    software: String,
    /// Identifies the current connection; a replaced connection's late calls are ignored.
    conn: u64,
    connected: bool,
    lost: bool,
    last_seen: Instant,
    last_seen_wall: SystemTime,
    report: NodeReport,
    assigned_generation: u64,
    assign_tx: latest::LatestSender<Option<Arc<Outgoing>>>,
    commands: CommandSender,
    closed: CancellationToken,
    /// What the node may report on (`scope.rs`).
    scope: scope::Scope,
    /// The SHA-256 of the token the node linked with (never the token): a `maestro` token
    /// reads over HTTP only the config of apps assigned to a node it linked.
    token_sha256: String,
}

impl NodeEntry {
    pub(super) fn fit(&self) -> Fit<'_> {
        Fit {
            labels: &self.labels,
            runtimes: &self.runtimes,
            report: Some(&self.report),
        }
    }
}

struct Rollout {
    release: u64,
    /// The desired release it replaced, when Beacon saw that one.
    previous: Option<u64>,
    state: RolloutState,
    started: Instant,
    started_wall: SystemTime,
    seconds: Option<f64>,
    healthy: BTreeSet<String>,
    /// Eligible nodes at the last evaluation: when a report brings `healthy` up to this, the
    /// rollout is evaluated at once instead of at the next sweep.
    eligible: usize,
    /// The nodes' figures for this switch, summed.
    figures: DeployFigures,
    /// Every node's watch window is over.
    verified: bool,
    /// The verdict in one sentence: verified with its figures, or rolled back and why.
    outcome: Option<String>,
}

struct RepositoryEntry {
    /// Links of this name open now (several apprepo processes may share a name).
    links: usize,
    last_seen_wall: SystemTime,
    disk: Option<px_proto::link::DiskReport>,
}

struct State {
    desired: BTreeMap<String, Release>,
    /// The counts set with `em scale`, read with `desired`.
    formations: Formations,
    /// The names added with `em domains add`, read with `desired`.
    added_domains: AddedDomains,
    /// Each app's creation time (apprepo's `created_at`), read with `desired`: the age of its
    /// claim on its domains, which decides a host two apps name (`AppAssignment::app_created_at`).
    created: BTreeMap<String, String>,
    /// Whether `desired` has been read from the repository since start-up.
    desired_known: bool,
    /// The generation [`Hub::served_domains`] was computed for; `None` before the first.
    served_for: Option<u64>,
    /// The assignment last published to every node that has nothing of its own (the same
    /// apps everywhere): a node that attaches later with the same assignment shares it, and
    /// its encoded frame, instead of holding a copy.
    shared: Option<Arc<Outgoing>>,
    /// The generation of `desired` and its fingerprint, as they are (or are about to be) on
    /// disk.
    persisted: persist::Persisted,
    /// The newest generation known to be on disk. Nodes are only ever sent this one: an
    /// assignment is published when `durable` reaches `persisted.generation`.
    durable: u64,
    /// Boxed: a map node holds eleven entries and is often half full, so entries held inline
    /// would cost every node the room of about two records.
    nodes: BTreeMap<String, Box<NodeEntry>>,
    /// When the sweep last passed over every node (`nodes::NODE_PASS_INTERVAL`).
    nodes_swept_at: Option<Instant>,
    rollouts: BTreeMap<String, Rollout>,
    next_conn: u64,
    repository_reachable: bool,
    /// Apps whose rollout must be re-evaluated at the next sweep.
    dirty: BTreeSet<String>,
    /// Each app's recent rollouts, newest first, as persisted under `rollouts/`.
    history: BTreeMap<String, VecDeque<RolloutRecord>>,
    /// Histories changed under the lock and not yet handed to a writer, newest per app.
    unwritten: BTreeMap<String, persist::HistorySnapshot>,
    /// Numbers history snapshots, so that an older one never overwrites a newer one.
    history_seq: u64,
    /// Automatic rollbacks asked of the repository and not yet seen in the desired state.
    rollbacks: BTreeMap<String, RollbackOrder>,
    /// Repositories that linked since start-up, by name, for the status page.
    repositories: BTreeMap<String, RepositoryEntry>,
    /// The pending builds read from the repository, each with the node that runs it.
    builds: BTreeMap<BuildKey, builds::BuildEntry>,
    /// Whether the pending builds have been read since start-up.
    builds_known: bool,
    /// Where builds ran before a restart (from the persisted generation), for the first read.
    placement_hints: BTreeMap<BuildKey, String>,
    /// Nodes not seen since start-up no longer keep their builds: they had the time a silent
    /// node has before it is lost.
    returning_over: bool,
    /// Builds whose end was announced.
    announced: builds::Announced,
    /// Where each process of a non-web type runs (from the persisted generation at start-up).
    processes: ProcessPlacement,
    /// The releases whose phase has not ended, each with the node that runs it.
    phases: BTreeMap<release_phases::PhaseKey, release_phases::PhaseEntry>,
    /// Whether the unended phases have been read since start-up.
    phases_known: bool,
    /// Where phases ran before a restart (from the persisted generation), for the first read.
    phase_hints: BTreeMap<release_phases::PhaseKey, String>,
}

/// An event to record after the lock is released, maybe with an alert.
struct Effect {
    draft: EventDraft,
    alert: Option<(String, String)>,
}

fn effect(
    kind: EventKind,
    node: Option<&str>,
    app: Option<&str>,
    release: Option<u64>,
    message: String,
) -> Effect {
    Effect {
        draft: EventDraft {
            kind,
            node: node.map(str::to_string),
            app: app.map(str::to_string),
            release,
            message,
            detail: None,
            level: None,
            failure: None,
            build: None,
        },
        alert: None,
    }
}

impl Effect {
    fn alert(mut self, key: String) -> Self {
        self.alert = Some((key, self.draft.message.clone()));
        self
    }
}

/// What a change leaves to do once the lock is released: histories to write, then events
/// (and alerts) to record, in that order, so an event never announces a verdict that a crash
/// right after it would forget.
struct Changes {
    histories: Vec<persist::HistorySnapshot>,
    effects: Vec<Effect>,
}

impl Changes {
    /// Ends a locked section: takes the histories it changed along with its events.
    fn of(state: &mut State, effects: Vec<Effect>) -> Self {
        Self {
            histories: std::mem::take(&mut state.unwritten).into_values().collect(),
            effects,
        }
    }
}

pub struct Hub {
    state: Mutex<State>,
    /// Held by one desired-state update from the moment it computes a generation until that
    /// generation is on disk and published (see `persist.rs`).
    publishing: tokio::sync::Mutex<()>,
    store: persist::Store,
    /// The pending rollbacks, for the repository links to send (whole, on every change).
    rollback_orders: watch::Sender<Arc<Vec<RollbackOrder>>>,
    /// Every host name the desired state serves, computed when a generation is published
    /// (`desired.rs`); `None` until the desired state has been read.
    served: watch::Sender<Option<Arc<BTreeSet<String>>>>,
    settings: HubSettings,
    events: Arc<EventLog>,
    alerts: Alerter,
    metrics: Arc<Metrics>,
    /// When the hub was made: nodes that ran builds before a restart have `node_lost_after`
    /// from here to come back to them.
    started: Instant,
}

impl Hub {
    /// Reads the persisted generation and rollout history from `settings.data_dir`; fails
    /// when the rollout history's directory cannot be created there.
    pub fn new(
        settings: HubSettings,
        events: Arc<EventLog>,
        alerts: Alerter,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (store, mut persisted, history) =
            persist::Store::open(&settings.data_dir, settings.shared_histories.clone())?;
        let on_disk = persisted.generation;
        let placement_hints = builds::placements_in(&persisted.desired);
        let processes = processes::placed_in(&persisted.desired);
        let phase_hints = release_phases::placements_in(&persisted.desired);
        // Another Beacon may have been active since this one persisted its generation: start
        // above anything it could have sent. Forgetting the fingerprint makes the first read
        // number a new generation (floor + 1), written to disk before any node is sent it.
        if persisted.generation < settings.generation_floor {
            tracing::info!(
                persisted = persisted.generation,
                floor = settings.generation_floor,
                "generations continue above the lease's epoch"
            );
            persisted.generation = settings.generation_floor;
            persisted.desired.clear();
        }
        Ok(Self {
            rollback_orders: watch::channel(Arc::new(Vec::new())).0,
            served: watch::channel(None).0,
            state: Mutex::new(State {
                desired: BTreeMap::new(),
                formations: Formations::new(),
                added_domains: AddedDomains::new(),
                created: BTreeMap::new(),
                desired_known: false,
                served_for: None,
                shared: None,
                durable: on_disk,
                persisted,
                nodes: BTreeMap::new(),
                nodes_swept_at: None,
                rollouts: BTreeMap::new(),
                next_conn: 1,
                repository_reachable: true,
                dirty: BTreeSet::new(),
                history,
                unwritten: BTreeMap::new(),
                history_seq: 0,
                rollbacks: BTreeMap::new(),
                repositories: BTreeMap::new(),
                builds: BTreeMap::new(),
                builds_known: false,
                placement_hints,
                returning_over: false,
                announced: builds::Announced::default(),
                processes,
                phases: BTreeMap::new(),
                phases_known: false,
                phase_hints,
            }),
            publishing: tokio::sync::Mutex::new(()),
            store,
            settings,
            events,
            alerts,
            metrics,
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, effects: Vec<Effect>) {
        for effect in effects {
            let event = self.events.record(effect.draft);
            if let Some((key, text)) = effect.alert {
                self.alerts.raise(Alert { key, text, event });
            }
        }
    }

    /// Carries out what a locked section left to do; call it with the lock released.
    async fn finish(&self, changes: Changes) {
        for snapshot in changes.histories {
            self.store.write_history(snapshot).await;
        }
        self.apply(changes.effects);
    }

    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// The generation nodes are sent: the newest one on disk.
    pub fn generation(&self) -> u64 {
        self.lock().durable
    }
}

#[cfg(test)]
mod tests;
