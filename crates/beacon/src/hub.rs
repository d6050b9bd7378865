//! The hub: Beacon's view of the cluster (nodes and what they report), the desired state read
//! from the repository, the assignment generation, and rollouts. Link tasks, the reconciler
//! and the HTTP API all go through it.
//!
//! One `std::sync::Mutex` guards the state; every method holds it briefly and never across an
//! await. Events and alerts a change causes are collected while locked and recorded after.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use px_proto::api::{Release, ReleaseCause};
use px_proto::beacon::{self, EventKind, Level, NodeHealth, RolloutRecord, RolloutState};
use px_proto::link::{
    AppAssignment, Assignment, DeployFigures, FromBeacon, Hello, InstanceState, NodeEvent,
    NodeEventKind, NodeReport, RollbackOrder,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::alerts::{Alert, Alerter};
use crate::events::{EventDraft, EventLog};
use crate::metrics::Metrics;

/// Commands (restart, stop) queued per link; a node that cannot take this many is too slow
/// and gets the next ones dropped (the operator can repeat them).
pub const COMMAND_QUEUE: usize = 16;
/// File, in the data directory, that keeps the generation across restarts.
const GENERATION_FILE: &str = "generation.json";
/// Directory, in the data directory, of each app's rollout history (`<app>.json`).
const ROLLOUTS_DIR: &str = "rollouts";
/// Rollouts remembered per app for `em releases`.
pub const MAX_ROLLOUT_HISTORY: usize = 20;
/// Fewest answers of a new release before its error rate is judged, so one unlucky request
/// out of two is not a 50% error rate.
pub const MIN_JUDGED_REQUESTS: u64 = 10;

pub struct HubSettings {
    pub domain: String,
    pub repository_url: String,
    pub node_lost_after: Duration,
    pub data_dir: PathBuf,
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
    assign_tx: watch::Sender<Option<Arc<Assignment>>>,
    commands: mpsc::Sender<FromBeacon>,
    closed: CancellationToken,
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

impl Rollout {
    fn new(release: u64, previous: Option<u64>) -> Self {
        Self {
            release,
            previous,
            state: RolloutState::RollingOut,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            seconds: None,
            healthy: BTreeSet::new(),
            eligible: 0,
            figures: DeployFigures::default(),
            verified: false,
            outcome: None,
        }
    }

    fn judged(&self) -> bool {
        self.outcome.is_some()
    }

    fn record(&self, release: &Release) -> RolloutRecord {
        RolloutRecord {
            release: self.release,
            previous: self.previous,
            state: self.state,
            started_at: humantime::format_rfc3339_seconds(self.started_wall).to_string(),
            rollout_seconds: self.seconds,
            figures: self.figures,
            watch_seconds: release.manifest.deploy.watch.as_secs(),
            max_error_rate: release.manifest.deploy.max_error_rate,
            verified: self.verified,
            outcome: self.outcome.clone(),
        }
    }
}

/// What survives a restart, so generations only grow and an unchanged desired state is not
/// assigned twice.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    generation: u64,
    /// `app@version` of every desired release at that generation.
    desired: Vec<String>,
}

struct State {
    desired: BTreeMap<String, Release>,
    /// Whether `desired` has been read from the repository since start-up.
    desired_known: bool,
    persisted: Persisted,
    nodes: BTreeMap<String, NodeEntry>,
    rollouts: BTreeMap<String, Rollout>,
    next_conn: u64,
    repository_reachable: bool,
    /// Apps whose rollout must be re-evaluated at the next sweep.
    dirty: BTreeSet<String>,
    /// Each app's recent rollouts, newest first, as persisted under `rollouts/`.
    history: BTreeMap<String, VecDeque<RolloutRecord>>,
    /// Automatic rollbacks asked of the repository and not yet seen in the desired state.
    rollbacks: BTreeMap<String, RollbackOrder>,
    /// Repositories that linked since start-up, by name, for the status page.
    repositories: BTreeMap<String, RepositoryEntry>,
}

struct RepositoryEntry {
    /// Links of this name open now (several apprepo processes may share a name).
    links: usize,
    last_seen_wall: SystemTime,
    disk: Option<px_proto::link::DiskReport>,
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
        },
        alert: None,
    }
}

/// What placement looks at on a node.
struct Fit<'a> {
    labels: &'a BTreeMap<String, String>,
    runtimes: &'a BTreeMap<String, String>,
    report: Option<&'a NodeReport>,
}

impl<'a> Fit<'a> {
    fn of(node: &'a NodeEntry) -> Self {
        Self {
            labels: &node.labels,
            runtimes: &node.runtimes,
            report: Some(&node.report),
        }
    }
}

/// Whether the node has the runtime `release` needs: found on its host in a version that
/// satisfies it, or shipped in the bundle itself. An app without a `runtime` runs anywhere.
fn has_runtime(release: &Release, runtimes: &BTreeMap<String, String>) -> bool {
    let Some(runtime) = &release.manifest.runtime else {
        return true;
    };
    if release.bundle.bundled_commands.contains(&runtime.command) {
        return true;
    }
    let found = runtimes
        .get(&runtime.command)
        .and_then(|v| px_proto::runtime::Version::parse(v));
    runtime.admits(found.as_ref())
}

/// Whether a report shows `app` at `release` with all its instances healthy.
fn runs_healthy(report: &NodeReport, app: &str, release: u64, desired: Option<&Release>) -> bool {
    let wanted = desired.map_or(1, |r| r.manifest.instances as usize);
    report
        .instances
        .iter()
        .filter(|i| i.app == app && i.release == release && i.state == InstanceState::Healthy)
        .count()
        >= wanted
}

/// Whether a node should run `release`: its labels admit it and it has the runtime. A node
/// that already runs the app stays assigned even without the runtime, so that its Maestro
/// refuses the new release with a clear event and keeps the old one serving, rather than the
/// app vanishing from it.
fn places(release: &Release, fit: &Fit<'_>) -> bool {
    release.manifest.placement.admits(fit.labels)
        && (has_runtime(release, fit.runtimes)
            || fit
                .report
                .is_some_and(|r| r.instances.iter().any(|i| i.app == release.app)))
}

/// Reads every app's rollout history; a file that does not parse is skipped with a warning
/// (the history is a record for people, not state anything depends on).
fn load_history(dir: &std::path::Path) -> BTreeMap<String, VecDeque<RolloutRecord>> {
    let mut history = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return history;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(app) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| px_proto::names::check_app_name(n).is_ok())
        else {
            continue;
        };
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<VecDeque<RolloutRecord>>(&b).map_err(|e| e.to_string())
            }) {
            Ok(mut records) => {
                records.truncate(MAX_ROLLOUT_HISTORY);
                history.insert(app.to_string(), records);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable rollout history")
            }
        }
    }
    history
}

impl Effect {
    fn alert(mut self, key: String) -> Self {
        self.alert = Some((key, self.draft.message.clone()));
        self
    }
}

/// What a link task gets when its node attaches.
pub struct Attached {
    pub conn: u64,
    pub assignments: watch::Receiver<Option<Arc<Assignment>>>,
    pub commands: mpsc::Receiver<FromBeacon>,
    /// Cancelled when a newer connection of the same node replaces this one.
    pub closed: CancellationToken,
}

pub struct Hub {
    state: Mutex<State>,
    /// The pending rollbacks, for the repository links to send (whole, on every change).
    rollback_orders: watch::Sender<Arc<Vec<RollbackOrder>>>,
    settings: HubSettings,
    events: Arc<EventLog>,
    alerts: Alerter,
    metrics: Arc<Metrics>,
}

fn fingerprint(desired: &BTreeMap<String, Release>) -> Vec<String> {
    desired
        .values()
        .map(|r| format!("{}@{}", r.app, r.version))
        .collect()
}

impl Hub {
    pub fn new(
        settings: HubSettings,
        events: Arc<EventLog>,
        alerts: Alerter,
        metrics: Arc<Metrics>,
    ) -> Self {
        let path = settings.data_dir.join(GENERATION_FILE);
        let persisted = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let history = load_history(&settings.data_dir.join(ROLLOUTS_DIR));
        Self {
            rollback_orders: watch::channel(Arc::new(Vec::new())).0,
            state: Mutex::new(State {
                desired: BTreeMap::new(),
                desired_known: false,
                persisted,
                nodes: BTreeMap::new(),
                rollouts: BTreeMap::new(),
                next_conn: 1,
                repository_reachable: true,
                dirty: BTreeSet::new(),
                history,
                rollbacks: BTreeMap::new(),
                repositories: BTreeMap::new(),
            }),
            settings,
            events,
            alerts,
            metrics,
        }
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

    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    pub fn generation(&self) -> u64 {
        self.lock().persisted.generation
    }

    fn persist(&self, persisted: &Persisted) {
        let path = self.settings.data_dir.join(GENERATION_FILE);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(persisted)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot persist the assignment generation");
        }
    }

    /// The assignment for a node at the current generation.
    fn assignment_for(&self, state: &State, fit: &Fit<'_>) -> Arc<Assignment> {
        let apps = state
            .desired
            .values()
            .filter(|r| places(r, fit))
            .map(|r| self.app_assignment(r))
            .collect();
        Arc::new(Assignment {
            generation: state.persisted.generation,
            apps,
        })
    }

    fn app_assignment(&self, release: &Release) -> AppAssignment {
        let domains = if release.manifest.http.domains.is_empty() {
            vec![format!("{}.{}", release.app, self.settings.domain)]
        } else {
            release.manifest.http.domains.clone()
        };
        AppAssignment {
            app: release.app.clone(),
            release: release.version,
            bundle_sha256: release.bundle.sha256.clone(),
            bundle_size: release.bundle.size,
            bundle_url: format!(
                "{}/v1/bundles/{}",
                self.settings.repository_url.trim_end_matches('/'),
                release.bundle.sha256
            ),
            manifest: release.manifest.clone(),
            env: release.environment(),
            instances: release.manifest.instances,
            domains,
        }
    }

    /// The configuration a node runs an app with, for `/v1/apps/{app}/config`.
    pub fn app_config(&self, app: &str) -> Option<AppAssignment> {
        let state = self.lock();
        state.desired.get(app).map(|r| self.app_assignment(r))
    }

    /// Takes the desired state read from the repository. When it differs from the current
    /// one, the generation grows and every node gets its new assignment.
    pub fn set_desired(&self, desired: BTreeMap<String, Release>) {
        let mut effects = Vec::new();
        let started = Instant::now();
        let mut state = self.lock();
        if !state.repository_reachable {
            state.repository_reachable = true;
            effects.push(effect(
                EventKind::RepositoryRecovered,
                None,
                None,
                None,
                "repository reachable again".into(),
            ));
        }
        let first_read = !state.desired_known;
        state.desired_known = true;
        if !first_read && state.desired == desired {
            drop(state);
            self.apply(effects);
            return;
        }
        let fingerprint = fingerprint(&desired);
        for release in desired.values() {
            let changed = state
                .rollouts
                .get(&release.app)
                .is_none_or(|r| r.release != release.version);
            if changed {
                let previous = state.desired.get(&release.app).map(|r| r.version);
                let replaced = state.rollouts.get(&release.app).map(|r| r.release);
                if let Some(old) = replaced {
                    self.remember(&mut state, &release.app, old);
                }
                let mut rollout = Rollout::new(release.version, previous);
                // After a restart, a rollout already judged keeps its verdict.
                if let Some(known) = state
                    .history
                    .get(&release.app)
                    .and_then(|h| h.iter().find(|r| r.release == release.version))
                {
                    rollout.previous = known.previous.or(previous);
                    rollout.figures = known.figures;
                    rollout.verified = known.verified;
                    rollout.outcome = known.outcome.clone();
                    if known.state == RolloutState::RolledBack {
                        rollout.state = RolloutState::RolledBack;
                    }
                }
                state.rollouts.insert(release.app.clone(), rollout);
                if !(first_read
                    && state
                        .persisted
                        .desired
                        .contains(&format!("{}@{}", release.app, release.version)))
                {
                    effects.push(effect(
                        EventKind::DeployStarted,
                        None,
                        Some(&release.app),
                        Some(release.version),
                        format!("rolling out {} v{}", release.app, release.version),
                    ));
                }
            }
        }
        state.rollouts.retain(|app, _| desired.contains_key(app));
        // A rollback is done once the desired release moved past the one it undoes.
        let before = state.rollbacks.len();
        state
            .rollbacks
            .retain(|app, order| desired.get(app).is_some_and(|r| r.version == order.from));
        if state.rollbacks.len() != before {
            self.publish_rollbacks(&state);
        }
        state.desired = desired;
        // After a restart, an unchanged desired state keeps its generation: nodes that
        // applied it are not sent it again.
        if state.persisted.desired != fingerprint || state.persisted.generation == 0 {
            state.persisted = Persisted {
                generation: state.persisted.generation + 1,
                desired: fingerprint,
            };
            self.persist(&state.persisted);
        }
        let generation = state.persisted.generation;
        let none = BTreeMap::new();
        let shared = self.assignment_for(
            &state,
            &Fit {
                labels: &none,
                runtimes: &none,
                report: None,
            },
        );
        let everywhere = state
            .desired
            .values()
            .all(|r| r.manifest.placement.is_everywhere() && r.manifest.runtime.is_none());
        let names: Vec<String> = state.nodes.keys().cloned().collect();
        for name in names {
            let Some(node) = state.nodes.get(&name) else {
                continue;
            };
            if node.report.generation == generation {
                continue;
            }
            let assignment = if everywhere {
                shared.clone()
            } else {
                self.assignment_for(&state, &Fit::of(node))
            };
            if let Some(node) = state.nodes.get(&name) {
                node.assign_tx.send_replace(Some(assignment));
            }
        }
        let app_names: Vec<String> = state.desired.keys().cloned().collect();
        for app in app_names {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        tracing::info!(generation, apps = state.desired.len(), nodes = state.nodes.len(), elapsed = ?started.elapsed(), "desired state changed; assignments queued");
        drop(state);
        self.apply(effects);
    }

    pub fn repository_unreachable(&self, error: &str) {
        let mut state = self.lock();
        if !state.repository_reachable {
            return;
        }
        state.repository_reachable = false;
        drop(state);
        let mut e = effect(
            EventKind::RepositoryUnreachable,
            None,
            None,
            None,
            "repository unreachable; keeping the last known desired state".into(),
        );
        e.draft.detail = Some(error.to_string());
        self.apply(vec![e]);
    }

    pub fn repository_reachable(&self) -> bool {
        self.lock().repository_reachable
    }

    /// A repository linked (`up`), or its link ended.
    pub fn repository_link(&self, name: &str, up: bool) {
        let mut state = self.lock();
        let entry = state
            .repositories
            .entry(name.to_string())
            .or_insert(RepositoryEntry {
                links: 0,
                last_seen_wall: SystemTime::now(),
                disk: None,
            });
        if up {
            entry.links += 1;
        } else {
            entry.links = entry.links.saturating_sub(1);
        }
        entry.last_seen_wall = SystemTime::now();
    }

    /// A repository's heartbeat, with its storage figures when it has them.
    pub fn repository_seen(&self, name: &str, report: &NodeReport) {
        let mut state = self.lock();
        if let Some(entry) = state.repositories.get_mut(name) {
            entry.last_seen_wall = SystemTime::now();
            if report.disk.is_some() {
                entry.disk = report.disk;
            }
        }
    }

    pub fn repositories(&self) -> Vec<beacon::Repository> {
        let state = self.lock();
        state
            .repositories
            .iter()
            .map(|(name, r)| beacon::Repository {
                name: name.clone(),
                connected: r.links > 0,
                last_seen: humantime::format_rfc3339_seconds(r.last_seen_wall).to_string(),
                disk: r.disk,
            })
            .collect()
    }

    /// Registers a Maestro that completed its handshake, replacing an older link of the same
    /// name. Its assignment is queued unless its report shows it already applied it.
    pub fn attach(&self, hello: &Hello) -> Attached {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let conn = state.next_conn;
        state.next_conn += 1;
        let report = hello.state.clone().unwrap_or_default();
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let closed = CancellationToken::new();
        let needs_assignment =
            state.desired_known && report.generation != state.persisted.generation;
        let assignment = needs_assignment.then(|| {
            self.assignment_for(
                &state,
                &Fit {
                    labels: &hello.labels,
                    runtimes: &hello.runtimes,
                    report: Some(&report),
                },
            )
        });
        let (assign_tx, assign_rx) = watch::channel(assignment);
        let now = Instant::now();
        let entry = NodeEntry {
            labels: hello.labels.clone(),
            runtimes: hello.runtimes.clone(),
            software: hello.software.clone(),
            conn,
            connected: true,
            lost: false,
            last_seen: now,
            last_seen_wall: SystemTime::now(),
            assigned_generation: report.generation,
            report,
            assign_tx,
            commands: commands_tx,
            closed: closed.clone(),
        };
        match state.nodes.insert(hello.name.clone(), entry) {
            Some(old) => {
                if old.connected {
                    tracing::warn!(node = %hello.name, "a new link replaces this node's previous one");
                    old.closed.cancel();
                }
                if old.lost {
                    effects.push(
                        effect(
                            EventKind::NodeRecovered,
                            Some(&hello.name),
                            None,
                            None,
                            format!("node {} is back", hello.name),
                        )
                        .alert(format!("node_recovered:{}", hello.name)),
                    );
                }
            }
            None => effects.push(effect(
                EventKind::NodeJoined,
                Some(&hello.name),
                None,
                None,
                format!("node {} joined ({})", hello.name, hello.software),
            )),
        }
        let apps: Vec<String> = state.desired.keys().cloned().collect();
        // An app waiting for its first eligible node may have one now: say so at once.
        let unplaced: Vec<String> = state
            .rollouts
            .iter()
            .filter(|(_, r)| r.state == RolloutState::Unplaced)
            .map(|(app, _)| app.clone())
            .collect();
        for app in unplaced {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        state.dirty.extend(apps);
        drop(state);
        self.apply(effects);
        Attached {
            conn,
            assignments: assign_rx,
            commands: commands_rx,
            closed,
        }
    }

    /// Records that the link sent an assignment.
    pub fn assigned(&self, node: &str, conn: u64, generation: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) {
            entry.assigned_generation = generation;
        }
    }

    /// Records any frame from a node (heartbeats carry a report).
    pub fn seen(&self, node: &str, conn: u64, report: Option<NodeReport>) {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) else {
            return;
        };
        entry.last_seen = Instant::now();
        entry.last_seen_wall = SystemTime::now();
        if entry.lost {
            entry.lost = false;
            effects.push(
                effect(
                    EventKind::NodeRecovered,
                    Some(node),
                    None,
                    None,
                    format!("node {node} is back"),
                )
                .alert(format!("node_recovered:{node}")),
            );
        }
        if let Some(report) = report {
            // Only apps whose instances on this node changed need their rollout looked at;
            // most heartbeats change nothing.
            let apps: BTreeSet<String> = report
                .instances
                .iter()
                .map(|i| i.app.clone())
                .chain(entry.report.instances.iter().map(|i| i.app.clone()))
                .filter(|app| {
                    let of = |r: &NodeReport| {
                        r.instances
                            .iter()
                            .filter(|i| &i.app == app)
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    let figures = |r: &NodeReport| {
                        r.rollouts
                            .iter()
                            .filter(|f| &f.app == app)
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    of(&report) != of(&entry.report) || figures(&report) != figures(&entry.report)
                })
                .collect();
            // A node whose report may complete a rollout has it evaluated now: the last
            // node's switch ends `em deploy` without waiting for the sweep. Checking that is
            // cheap (this node against the last evaluation's counts); the full evaluation, one
            // pass over the nodes, then runs once per rollout.
            let completing: Vec<String> = apps
                .iter()
                .filter(|app| {
                    state.rollouts.get(*app).is_some_and(|rollout| {
                        rollout.state == RolloutState::RollingOut
                            && rollout.eligible > 0
                            && !rollout.healthy.contains(node)
                            && rollout.healthy.len() + 1 >= rollout.eligible
                            && runs_healthy(&report, app, rollout.release, state.desired.get(*app))
                    })
                })
                .cloned()
                .collect();
            if let Some(entry) = state.nodes.get_mut(node) {
                entry.report = report;
            }
            for app in &completing {
                effects.extend(self.evaluate_rollout(&mut state, app));
            }
            state
                .dirty
                .extend(apps.into_iter().filter(|a| !completing.contains(a)));
        }
        drop(state);
        self.apply(effects);
    }

    /// Records an event a node reported.
    pub fn node_event(&self, node: &str, event: NodeEvent) {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let kind = EventKind::from(event.kind);
        let mut e = effect(
            kind,
            Some(node),
            Some(&event.app),
            Some(event.release),
            event.message.clone(),
        );
        e.draft.detail = event.detail.clone();
        e.draft.failure = event.failure;
        if event.kind == NodeEventKind::AppEvent {
            let level = event.level.unwrap_or(Level::Info);
            e.draft.level = Some(level);
            if let Some(instance) = event.instance {
                e.draft.message = format!("{} #{instance}: {}", event.app, event.message);
            }
            if level >= Level::Error {
                // One alert per app and message within the dedup window, however often the
                // app repeats it.
                e = e.alert(format!("app_event:{}:{}", event.app, event.message));
            }
        }
        match event.kind {
            NodeEventKind::CrashLoop => e = e.alert(format!("crash_loop:{node}:{}", event.app)),
            NodeEventKind::DeployFailed => {
                e = e.alert(format!("deploy_failed:{}:{}", event.app, event.release));
                if let Some(rollout) = state
                    .rollouts
                    .get_mut(&event.app)
                    .filter(|r| r.release == event.release)
                {
                    rollout.state = RolloutState::Failed;
                }
            }
            _ => {}
        }
        effects.push(e);
        drop(state);
        self.apply(effects);
    }

    /// The link of `node` ended. The node stays known; it is lost if it does not return in time.
    pub fn detach(&self, node: &str, conn: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) {
            entry.connected = false;
        }
    }

    /// Marks nodes silent for too long as lost (once), and re-evaluates rollouts they were in.
    pub fn sweep(&self) {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let deadline = self.settings.node_lost_after;
        let mut lost = Vec::new();
        for (name, node) in state.nodes.iter_mut() {
            if !node.lost && node.last_seen.elapsed() > deadline {
                node.lost = true;
                node.closed.cancel();
                lost.push(name.clone());
            }
        }
        for name in &lost {
            effects.push(
                effect(
                    EventKind::NodeLost,
                    Some(name),
                    None,
                    None,
                    format!(
                        "node {name} lost: nothing heard for {}s",
                        deadline.as_secs()
                    ),
                )
                .alert(format!("node_lost:{name}")),
            );
        }
        if !lost.is_empty() {
            let apps: Vec<String> = state.desired.keys().cloned().collect();
            state.dirty.extend(apps);
        }
        // Rollouts are evaluated here, for the apps whose reports changed since the last
        // sweep, rather than on every heartbeat: one pass over the nodes per app per sweep
        // instead of one per heartbeat, which is what lets one Beacon hold 10 000 links.
        let dirty = std::mem::take(&mut state.dirty);
        for app in dirty {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        self.metrics
            .nodes_connected
            .set(state.nodes.values().filter(|n| n.connected).count() as u64);
        drop(state);
        self.apply(effects);
    }

    /// Nodes that should run `release`: not lost, and admitted by its placement.
    fn eligible<'a>(
        state: &'a State,
        release: &'a Release,
    ) -> impl Iterator<Item = &'a String> + 'a {
        state
            .nodes
            .iter()
            .filter(move |(_, n)| !n.lost && places(release, &Fit::of(n)))
            .map(|(name, _)| name)
    }

    fn evaluate_rollout(&self, state: &mut State, app: &str) -> Vec<Effect> {
        let Some(release) = state.desired.get(app) else {
            return Vec::new();
        };
        let version = release.version;
        let eligible: Vec<String> = Self::eligible(state, release).cloned().collect();
        let healthy: BTreeSet<String> = eligible
            .iter()
            .filter(|name| {
                state
                    .nodes
                    .get(*name)
                    .is_some_and(|n| runs_healthy(&n.report, app, version, Some(release)))
            })
            .cloned()
            .collect();
        let Some(rollout) = state.rollouts.get_mut(app) else {
            return Vec::new();
        };
        rollout.healthy = healthy;
        rollout.eligible = eligible.len();
        let mut effects = Vec::new();
        let mut newly_unplaced = false;
        match rollout.state {
            RolloutState::RollingOut | RolloutState::Unplaced => {
                if eligible.is_empty() {
                    newly_unplaced = rollout.state == RolloutState::RollingOut;
                    rollout.state = RolloutState::Unplaced;
                } else if rollout.healthy.len() == eligible.len() {
                    let seconds = rollout.started.elapsed().as_secs_f64();
                    rollout.state = RolloutState::RolledOut;
                    rollout.seconds = Some(seconds);
                    self.metrics.rollouts_finished.inc();
                    self.metrics.rollout_seconds_total.add_f64(seconds);
                    effects.push(effect(
                        EventKind::DeployFinished,
                        None,
                        Some(app),
                        Some(version),
                        format!(
                            "{app} v{version} rolled out to {} node(s) in {seconds:.1}s",
                            eligible.len()
                        ),
                    ));
                } else {
                    rollout.state = RolloutState::RollingOut;
                }
            }
            RolloutState::RolledOut | RolloutState::Failed | RolloutState::RolledBack => {}
        }
        if newly_unplaced && !state.nodes.is_empty() {
            effects.push(self.unplaced_event(state, app));
        }
        effects.extend(self.judge(state, app));
        effects
    }

    /// Sums the nodes' figures for the app's rollout and judges them: over its error budget
    /// → ask the repository for a rollback to the previous release; every node's watch over
    /// → verified. Judged once.
    fn judge(&self, state: &mut State, app: &str) -> Vec<Effect> {
        let Some(release) = state.desired.get(app) else {
            return Vec::new();
        };
        let version = release.version;
        let eligible: BTreeSet<String> = Self::eligible(state, release).cloned().collect();
        let mut sum = DeployFigures::default();
        let mut done = BTreeSet::new();
        for (name, node) in &state.nodes {
            for f in node
                .report
                .rollouts
                .iter()
                .filter(|f| f.app == app && f.release == version)
            {
                sum += f.figures;
                if f.done {
                    done.insert(name.clone());
                }
            }
        }
        let budget = release.manifest.deploy.max_error_rate;
        let watch = release.manifest.deploy.watch.as_secs();
        let rollback_of_rollback = matches!(release.cause, ReleaseCause::Rollback { .. });
        let Some(rollout) = state.rollouts.get_mut(app).filter(|r| r.release == version) else {
            return Vec::new();
        };
        if rollout.judged() {
            return Vec::new();
        }
        rollout.figures = sum;
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                "0%".to_string()
            } else {
                format!("{:.1}%", part as f64 * 100.0 / whole as f64)
            }
        };
        let breached = budget.filter(|rate| {
            sum.new_requests >= MIN_JUDGED_REQUESTS
                && rate.exceeded_by(sum.new_errors, sum.new_requests)
        });
        let mut effects = Vec::new();
        if let Some(rate) = breached {
            let reason = format!(
                "{} of {} requests ({}) answered 5xx, over its error budget of {rate}",
                sum.new_errors,
                sum.new_requests,
                share(sum.new_errors, sum.new_requests)
            );
            let target = rollout.previous.or((version > 1).then(|| version - 1));
            let (kind, outcome) = match target {
                Some(to) if !rollback_of_rollback => {
                    self.metrics.rollbacks_ordered.inc();
                    rollout.state = RolloutState::RolledBack;
                    state.rollbacks.insert(
                        app.to_string(),
                        RollbackOrder {
                            app: app.to_string(),
                            from: version,
                            to: rollout.previous,
                            reason: format!("automatic rollback of v{version}: {reason}"),
                        },
                    );
                    (
                        EventKind::DeployRolledBack,
                        format!("{app} v{version} rolled back to v{to}: {reason}"),
                    )
                }
                _ => {
                    rollout.state = RolloutState::Failed;
                    let why = if rollback_of_rollback {
                        "it is itself a rollback; fix the app and deploy again"
                    } else {
                        "there is no earlier release"
                    };
                    (
                        EventKind::DeployFailed,
                        format!(
                            "{app} v{version} is over its error budget: {reason}; not rolled back: {why}"
                        ),
                    )
                }
            };
            rollout.outcome = Some(outcome.clone());
            let mut e = effect(kind, None, Some(app), Some(version), outcome);
            e.draft.detail = Some(format!(
                "figures so far: {} requests to v{version} ({} 5xx), {} to the previous release after the switch, {} long-lived connections moved, {} cut",
                sum.new_requests, sum.new_errors, sum.old_requests, sum.closed, sum.cut
            ));
            effects.push(e.alert(format!("deploy_rolled_back:{app}:{version}")));
            self.publish_rollbacks(state);
        } else if !eligible.is_empty()
            && rollout.state == RolloutState::RolledOut
            && eligible.iter().all(|n| done.contains(n))
        {
            rollout.verified = true;
            let within = budget
                .map(|rate| format!(", within its error budget of {rate}"))
                .unwrap_or_default();
            let outcome = format!(
                "{app} v{version} verified: {} requests, {} answered 5xx ({}) in its first {watch}s{within}; {} long-lived connections moved, {} cut",
                sum.new_requests,
                sum.new_errors,
                share(sum.new_errors, sum.new_requests),
                sum.closed,
                sum.cut
            );
            rollout.outcome = Some(outcome.clone());
            effects.push(effect(
                EventKind::DeployVerified,
                None,
                Some(app),
                Some(version),
                outcome,
            ));
        } else {
            return effects;
        }
        self.remember(state, app, version);
        effects
    }

    /// Records the app's rollout of `version` in its history (replacing an older record of
    /// the same release) and writes the history file.
    fn remember(&self, state: &mut State, app: &str, version: u64) {
        let Some(record) = state
            .rollouts
            .get(app)
            .filter(|r| r.release == version)
            .zip(state.desired.get(app))
            .map(|(rollout, release)| rollout.record(release))
        else {
            return;
        };
        let history = state.history.entry(app.to_string()).or_default();
        history.retain(|r| r.release != version);
        history.push_front(record);
        history
            .make_contiguous()
            .sort_by_key(|r| std::cmp::Reverse(r.release));
        history.truncate(MAX_ROLLOUT_HISTORY);
        let dir = self.settings.data_dir.join(ROLLOUTS_DIR);
        let path = dir.join(format!("{app}.json"));
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| serde_json::to_vec(&history).map_err(std::io::Error::other))
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot persist the rollout history");
        }
    }

    fn publish_rollbacks(&self, state: &State) {
        self.rollback_orders
            .send_replace(Arc::new(state.rollbacks.values().cloned().collect()));
    }

    /// The rollbacks to ask of the repository, for its links to follow.
    pub fn rollback_orders(&self) -> watch::Receiver<Arc<Vec<RollbackOrder>>> {
        self.rollback_orders.subscribe()
    }

    /// The app's rollouts, newest first: the current one as it stands, then the history.
    pub fn rollouts(&self, app: &str) -> Option<Vec<RolloutRecord>> {
        let state = self.lock();
        let current = state
            .rollouts
            .get(app)
            .zip(state.desired.get(app))
            .map(|(rollout, release)| rollout.record(release));
        let history = state.history.get(app);
        if current.is_none() && history.is_none() {
            return None;
        }
        let current_release = current.as_ref().map(|c| c.release);
        let mut records: Vec<RolloutRecord> = current.into_iter().collect();
        records.extend(
            history
                .into_iter()
                .flatten()
                .filter(|r| Some(r.release) != current_release)
                .cloned(),
        );
        Some(records)
    }

    /// Says why no node can run an app's desired release, naming what each node lacks, so
    /// `em deploy` can stop waiting and tell the user.
    fn unplaced_event(&self, state: &State, app: &str) -> Effect {
        let Some(release) = state.desired.get(app) else {
            return effect(
                EventKind::DeployFailed,
                None,
                Some(app),
                None,
                String::new(),
            );
        };
        let version = release.version;
        let mut reasons = Vec::new();
        for (name, node) in &state.nodes {
            if node.lost {
                reasons.push(format!("{name} is lost"));
            } else if !release.manifest.placement.admits(&node.labels) {
                reasons.push(format!("{name} lacks the placement labels"));
            } else if let Some(runtime) = &release.manifest.runtime {
                let found = node.runtimes.get(&runtime.command).map_or_else(
                    || "none".to_string(),
                    |v| format!("{} {v}", runtime.command),
                );
                reasons.push(format!("{name} has {found}"));
            }
        }
        let needs = release
            .manifest
            .runtime
            .as_ref()
            .map(|r| format!(" it needs {r};"))
            .unwrap_or_default();
        let mut e = effect(
            EventKind::DeployFailed,
            None,
            Some(app),
            Some(version),
            format!(
                "{app} v{version} has no node to run on:{needs} {}",
                reasons.join(", ")
            ),
        );
        e = e.alert(format!("deploy_failed:{app}:{version}"));
        e
    }

    /// Queues a command for every connected node that runs `app`; returns how many.
    pub fn command(&self, app: &str, command: FromBeacon) -> usize {
        let state = self.lock();
        let Some(release) = state.desired.get(app) else {
            return 0;
        };
        let mut sent = 0;
        for name in Self::eligible(&state, release) {
            if let Some(node) = state.nodes.get(name).filter(|n| n.connected)
                && node.commands.try_send(command.clone()).is_ok()
            {
                sent += 1;
            }
        }
        sent
    }

    pub fn nodes(&self) -> Vec<beacon::Node> {
        let state = self.lock();
        state
            .nodes
            .iter()
            .map(|(name, n)| beacon::Node {
                name: name.clone(),
                health: if n.lost {
                    NodeHealth::Lost
                } else {
                    NodeHealth::Connected
                },
                software: n.software.clone(),
                labels: n.labels.clone(),
                runtimes: n.runtimes.clone(),
                last_seen: humantime::format_rfc3339_seconds(n.last_seen_wall).to_string(),
                assigned_generation: n.assigned_generation,
                applied_generation: n.report.generation,
                instances: n.report.instances.clone(),
                disk: n.report.disk,
            })
            .collect()
    }

    pub fn apps(&self) -> Vec<beacon::App> {
        let state = self.lock();
        state
            .desired
            .values()
            .map(|release| {
                let rollout = state.rollouts.get(&release.app);
                beacon::App {
                    name: release.app.clone(),
                    release: release.version,
                    bundle_sha256: release.bundle.sha256.clone(),
                    rollout: rollout.map_or(RolloutState::RollingOut, |r| r.state),
                    nodes: Self::eligible(&state, release).cloned().collect(),
                    healthy_nodes: rollout.map_or(0, |r| r.healthy.len()),
                    rollout_seconds: rollout.and_then(|r| r.seconds),
                    figures: rollout.map(|r| r.figures).unwrap_or_default(),
                    outcome: rollout.and_then(|r| r.outcome.clone()),
                }
            })
            .collect()
    }
}
