//! The supervisor: turns assignments into running instances. One task per app owns that
//! app's instances; it prepares a release (download, verify, unpack), starts the new
//! instances beside the old ones, switches the route once they are healthy, drains and stops
//! the old ones, and restarts crashed instances with backoff. Apps never wait on each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use px_proto::link::{
    AppAssignment, Assignment, DeployFigures, DiskReport, ExitInfo, FailureKind, InstanceState,
    InstanceStatus, NodeEvent, NodeEventKind, NodeReport, RolloutFigures,
};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use px_proto::size::ByteSize;

use crate::app_events::{AppEvents, Registration};
use crate::limits::{Enforcer, InstanceCgroup};
use crate::logs::AppLogs;
use crate::process::{self, GroupFile, GroupRecord, Launch};
use crate::proxy;
use crate::routes::{AppRoute, Backend, BodyPolicy, ReleaseStats, RouteTable, Routes};
use crate::runtimes;

/// Events queued for the Beacon link; when Beacon is away and this fills, the oldest news
/// is dropped (heartbeats still carry the full state).
pub const EVENT_QUEUE: usize = 256;
/// Restart backoff: doubling from the minimum to the cap, reset after a stable period.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Restarts in a row (without a stable period) that make a crash loop.
pub const CRASH_LOOP_RESTARTS: u32 = 5;
/// Stderr lines sent with a failed deploy.
pub const FAILED_STDERR_LINES: usize = 20;
/// How long a failed instance's output may take to reach the logs after it stopped.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How often a watched release's figures are brought up to date (and reported if changed).
pub const WATCH_TICK: Duration = Duration::from_secs(1);
/// Largest bundle downloaded; apprepo's own limit is lower.
pub const MAX_BUNDLE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

pub struct Settings {
    /// This node's name, for events a person reads.
    pub node_name: String,
    pub state_dir: PathBuf,
    pub port_range: (u16, u16),
    pub stop_grace: Duration,
    /// Unpacked releases kept per app, the serving one included.
    pub keep_releases: usize,
    /// Bytes of free disk a new release must leave under `state_dir`.
    pub min_free_disk: u64,
    /// Instances get cgroups of their own (see `limits.rs`).
    pub cgroup_limits: bool,
    pub repository_token: Option<String>,
}

/// Ports in use by live instances; a port is never handed to two.
struct Ports {
    range: (u16, u16),
    used: BTreeSet<u16>,
    next: u16,
}

impl Ports {
    fn take(&mut self) -> Option<u16> {
        let span = u32::from(self.range.1 - self.range.0) + 1;
        for _ in 0..span {
            let port = self.next;
            self.next = if self.next >= self.range.1 {
                self.range.0
            } else {
                self.next + 1
            };
            // Also skip ports something else on the machine holds.
            if !self.used.contains(&port)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                self.used.insert(port);
                return Some(port);
            }
        }
        None
    }

    fn give_back(&mut self, port: u16) {
        self.used.remove(&port);
    }
}

/// An app as the proxy serves it: its host names and route.
type Served = (Vec<String>, Arc<AppRoute>);

struct Shared {
    settings: Settings,
    routes: Arc<Routes>,
    logs: Arc<AppLogs>,
    app_events: Arc<AppEvents>,
    events: mpsc::Sender<NodeEvent>,
    http: reqwest::Client,
    ports: Mutex<Ports>,
    /// app → (domains, route) as currently served.
    served: Mutex<BTreeMap<String, Served>>,
    /// app → instance statuses for reports.
    statuses: Mutex<BTreeMap<String, Vec<InstanceStatus>>>,
    groups: GroupFile,
    live_groups: Mutex<HashMap<u32, GroupRecord>>,
    generation: Mutex<u64>,
    /// Apps whose first deploy in this run has been tried (serving or failed).
    tried: Mutex<BTreeSet<String>>,
    /// Bytes of each app's kept releases, measured after its last switch.
    release_bytes: Mutex<BTreeMap<String, u64>>,
    /// app → the figures of its latest release switch, reported to Beacon.
    rollouts: Mutex<BTreeMap<String, WatchedRollout>>,
    /// How instances get their `[limits]`.
    limits: Enforcer,
    /// Bumped whenever an instance changes, so the link reports at once.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn publish_routes(&self) {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = RouteTable::default();
        for (domains, route) in served.values() {
            for domain in domains {
                table
                    .by_host
                    .insert(domain.to_ascii_lowercase(), route.clone());
            }
        }
        drop(served);
        self.routes.store(table);
    }

    fn serve(&self, app: &str, domains: Vec<String>, route: AppRoute) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), (domains, Arc::new(route)));
        self.publish_routes();
    }

    fn unserve(&self, app: &str) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
        self.publish_routes();
    }

    fn event(
        &self,
        kind: NodeEventKind,
        app: &str,
        release: u64,
        message: String,
        detail: Option<String>,
    ) {
        self.send_event(kind, app, release, message, detail, None);
    }

    /// An event about an instance that failed, with the failure classified.
    fn failure_event(
        &self,
        kind: NodeEventKind,
        app: &str,
        release: u64,
        message: String,
        detail: Option<String>,
        failure: FailureKind,
    ) {
        self.send_event(kind, app, release, message, detail, Some(failure));
    }

    fn send_event(
        &self,
        kind: NodeEventKind,
        app: &str,
        release: u64,
        message: String,
        detail: Option<String>,
        failure: Option<FailureKind>,
    ) {
        tracing::info!(%app, release, ?kind, ?failure, %message, "app event");
        let _ = self.events.try_send(NodeEvent {
            kind,
            app: app.into(),
            release,
            message,
            detail,
            instance: None,
            level: None,
            failure,
        });
    }

    fn take_port(&self) -> Option<u16> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn give_back(&self, port: u16) {
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give_back(port);
    }

    fn record_group(&self, pid: u32) {
        let mut live = self.live_groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(start_ticks) = process::start_ticks(pid) {
            live.insert(pid, GroupRecord { pid, start_ticks });
        }
        self.groups
            .save(&live.values().cloned().collect::<Vec<_>>());
    }

    fn forget_group(&self, pid: u32) {
        let mut live = self.live_groups.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&pid);
        self.groups
            .save(&live.values().cloned().collect::<Vec<_>>());
    }
}

/// Handle to the supervisor.
pub struct Supervisor {
    shared: Arc<Shared>,
    apps: Mutex<HashMap<String, AppHandle>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

struct AppHandle {
    desired: watch::Sender<Option<AppAssignment>>,
    restart: mpsc::Sender<()>,
    stop: CancellationToken,
}

impl Supervisor {
    /// Creates the supervisor, first ending any instance a previous Maestro left running.
    /// Events for Beacon go to `events` (bounded: news is dropped when it is full).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        routes: Arc<Routes>,
        logs: Arc<AppLogs>,
        app_events: Arc<AppEvents>,
        events: mpsc::Sender<NodeEvent>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let groups = GroupFile::new(settings.state_dir.join("instances.json"));
        let killed = groups.kill_leftovers();
        if killed > 0 {
            tracing::warn!(killed, "ended instances a previous maestro left running");
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(2)
            .build()
            .unwrap_or_default();
        let range = settings.port_range;
        let limits = Enforcer::detect(settings.cgroup_limits);
        let shared = Arc::new(Shared {
            settings,
            routes,
            logs,
            app_events,
            events,
            http,
            ports: Mutex::new(Ports {
                range,
                used: BTreeSet::new(),
                // Start somewhere random in the range: a restarted Maestro does not reach for
                // ports its previous run just left in TIME_WAIT, and several Maestros on one
                // machine (tests, `em up` beside a node) rarely race for the same port.
                next: range.0 + rand::rng().random_range(0..=(range.1 - range.0)),
            }),
            served: Mutex::new(BTreeMap::new()),
            statuses: Mutex::new(BTreeMap::new()),
            groups,
            live_groups: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            tried: Mutex::new(BTreeSet::new()),
            release_bytes: Mutex::new(BTreeMap::new()),
            rollouts: Mutex::new(BTreeMap::new()),
            limits,
            changes: watch::channel(0).0,
        });
        Arc::new(Self {
            shared,
            apps: Mutex::new(HashMap::new()),
            tracker,
            shutdown,
        })
    }

    /// The generation of the last assignment applied.
    pub fn generation(&self) -> u64 {
        *self
            .shared
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a whole assignment: new and changed apps are (re)deployed, missing ones stopped.
    pub fn apply(&self, assignment: &Assignment) {
        *self
            .shared
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = assignment.generation;
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeSet<&str> = assignment.apps.iter().map(|a| a.app.as_str()).collect();
        apps.retain(|name, handle| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                tracing::info!(app = %name, "app no longer assigned; stopping it");
                handle.stop.cancel();
            }
            keep
        });
        for app in &assignment.apps {
            match apps.get(&app.app) {
                Some(handle) => {
                    handle.desired.send_if_modified(|current| {
                        if current.as_ref() == Some(app) {
                            false
                        } else {
                            *current = Some(app.clone());
                            true
                        }
                    });
                }
                None => {
                    let (desired_tx, desired_rx) = watch::channel(Some(app.clone()));
                    let (restart_tx, restart_rx) = mpsc::channel(1);
                    let stop = self.shutdown.child_token();
                    let task = AppTask::new(self.shared.clone(), app.app.clone());
                    self.tracker
                        .spawn(task.run(desired_rx, restart_rx, stop.clone()));
                    apps.insert(
                        app.app.clone(),
                        AppHandle {
                            desired: desired_tx,
                            restart: restart_tx,
                            stop,
                        },
                    );
                }
            }
        }
    }

    /// Restarts an app's instances (rolling, like a deploy of the same release).
    pub fn restart(&self, app: &str) -> bool {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.get(app).is_some_and(|h| {
            let _ = h.restart.try_send(());
            true
        })
    }

    /// Stops an app until an assignment brings it back.
    pub fn stop_app(&self, app: &str) -> bool {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        match apps.remove(app) {
            Some(handle) => {
                handle.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Waits, up to `limit`, until every app assigned so far has had its first deploy tried,
    /// so that a restarted Maestro opens its doors with its apps already serving. Returns the
    /// apps still starting when `limit` passed.
    pub async fn wait_first_deploys(&self, limit: Duration) -> Vec<String> {
        let mut changes = self.changes();
        let deadline = Instant::now() + limit;
        loop {
            let waiting: Vec<String> = {
                let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
                let tried = self.shared.tried.lock().unwrap_or_else(|p| p.into_inner());
                apps.keys()
                    .filter(|a| !tried.contains(*a))
                    .cloned()
                    .collect()
            };
            if waiting.is_empty() {
                return waiting;
            }
            match tokio::time::timeout_at(deadline.into(), changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return waiting,
            }
        }
    }

    /// Prometheus lines on the disk of `state_dir`: free bytes, the floor, and the bytes of
    /// each app's unpacked releases as of its last switch.
    pub fn render_disk_metrics(&self) -> String {
        let mut out = String::new();
        if let Some(free) = free_disk(&self.shared.settings.state_dir) {
            out.push_str("# TYPE maestro_disk_free_bytes gauge\n");
            out.push_str(&format!("maestro_disk_free_bytes {free}\n"));
        }
        out.push_str("# TYPE maestro_disk_floor_bytes gauge\n");
        out.push_str(&format!(
            "maestro_disk_floor_bytes {}\n",
            self.shared.settings.min_free_disk
        ));
        let kept = self
            .shared
            .release_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !kept.is_empty() {
            out.push_str("# TYPE maestro_release_bytes gauge\n");
        }
        for (app, bytes) in kept.iter() {
            out.push_str(&format!("maestro_release_bytes{{app=\"{app}\"}} {bytes}\n"));
        }
        out
    }

    /// A receiver that changes whenever an instance starts, stops or crashes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// The node's full actual state.
    pub fn report(&self) -> NodeReport {
        let statuses = self
            .shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let instances = statuses.values().flatten().cloned().collect();
        drop(statuses);
        let rollouts = self
            .shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.figures.clone())
            .collect();
        let used_bytes = self
            .shared
            .release_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum();
        NodeReport {
            generation: self.generation(),
            instances,
            rollouts,
            disk: Some(DiskReport {
                used_bytes,
                objects: None,
                free_bytes: free_disk(&self.shared.settings.state_dir),
                floor_bytes: Some(self.shared.settings.min_free_disk),
            }),
        }
    }
}

/// One running instance.
struct Instance {
    number: u32,
    port: u16,
    pid: u32,
    backend: Arc<Backend>,
    restarts: u32,
    started: Instant,
    last_exit: Option<ExitInfo>,
    /// Resolves when the process ends: its exit status, and why Maestro ended it, if it did.
    exited: tokio::sync::oneshot::Receiver<Exit>,
    /// Asks the waiter to stop the process.
    stop: Option<tokio::sync::oneshot::Sender<Duration>>,
}

/// How an instance ended: its exit status, the reason when Maestro stopped it on its own
/// account (a missed heartbeat), and whether the kernel's OOM killer ended it.
type Exit = (Option<std::process::ExitStatus>, Option<String>, bool);

/// A release as it runs: its assignment, directory and instances.
struct Running {
    assignment: AppAssignment,
    dir: PathBuf,
    instances: Vec<Instance>,
    /// What the proxy counted for this release's answers.
    stats: Arc<ReleaseStats>,
}

/// A release switch being watched: its figures so far, and whether the release it replaced
/// has finished draining.
struct WatchedRollout {
    figures: RolloutFigures,
    drained: bool,
}

struct AppTask {
    shared: Arc<Shared>,
    app: String,
    /// A release that failed to deploy is not retried until the assignment changes or a
    /// restart is asked for; this keeps a broken release from looping.
    failed: Option<AppAssignment>,
    crash_streak: u32,
    crash_loop_reported: bool,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl AppTask {
    fn new(shared: Arc<Shared>, app: String) -> Self {
        Self {
            shared,
            app,
            failed: None,
            crash_streak: 0,
            crash_loop_reported: false,
        }
    }

    async fn run(
        mut self,
        mut desired: watch::Receiver<Option<AppAssignment>>,
        mut restart: mpsc::Receiver<()>,
        stop: CancellationToken,
    ) {
        let mut running: Option<Running> = None;
        // Restarts waiting for their backoff: (instance index, when).
        let mut pending: Vec<(usize, Instant)> = Vec::new();
        // The first value counts as a change.
        let mut changed = true;
        loop {
            if changed {
                changed = false;
                let target = desired.borrow_and_update().clone();
                if let Some(target) = target
                    && running.as_ref().is_none_or(|r| r.assignment != target)
                    && self.failed.as_ref() != Some(&target)
                {
                    running = self.deploy(running, target, &stop).await;
                    pending.clear();
                    self.shared
                        .tried
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(self.app.clone());
                    self.report(&running);
                }
            }
            let next_restart = pending.iter().min_by_key(|(_, at)| *at).copied();
            let crash = wait_crash(&mut running, next_restart);
            tokio::select! {
                _ = stop.cancelled() => break,
                r = desired.changed() => {
                    if r.is_err() { break; }
                    changed = true;
                }
                r = restart.recv() => {
                    if r.is_none() { break; }
                    self.failed = None;
                    if let Some(current) = running.as_ref().map(|r| r.assignment.clone()) {
                        // Redeploy the same release: new instances, then switch and drain.
                        running = self.deploy(running, current, &stop).await;
                        pending.clear();
                    } else {
                        changed = true;
                    }
                    self.report(&running);
                }
                event = crash => match event {
                    CrashEvent::Exited(index, status) => {
                        pending.extend(self.on_exit(&mut running, index, status));
                        self.report(&running);
                    }
                    CrashEvent::RestartDue(index) => {
                        pending.retain(|(i, _)| *i != index);
                        pending.extend(self.restart_instance(&mut running, index).await);
                        self.report(&running);
                    }
                },
            }
        }
        // Stopping: no more traffic to this app, then stop its instances.
        self.shared.unserve(&self.app);
        if let Some(running) = running.take() {
            self.stop_all(running.instances).await;
        }
        self.shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.app);
        self.shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.app);
        tracing::info!(app = %self.app, "app stopped");
    }

    fn report(&self, running: &Option<Running>) {
        self.report_instances(running.as_ref());
    }

    /// Publishes the app's instances for the next state report, and asks the link to send it.
    fn report_instances(&self, running: Option<&Running>) {
        let statuses = running
            .map(|r| {
                r.instances
                    .iter()
                    .map(|i| InstanceStatus {
                        app: self.app.clone(),
                        release: r.assignment.release,
                        state: if i.stop.is_some() {
                            InstanceState::Healthy
                        } else {
                            InstanceState::Crashed
                        },
                        pid: (i.stop.is_some()).then_some(i.pid),
                        port: Some(i.port),
                        restarts: i.restarts,
                        last_exit: i.last_exit.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.app.clone(), statuses);
        self.shared.changes.send_modify(|n| *n += 1);
    }

    fn publish(&self, running: &Running) {
        let backends = running
            .instances
            .iter()
            .filter(|i| i.stop.is_some())
            .map(|i| i.backend.clone())
            .collect();
        let static_dirs = running
            .assignment
            .manifest
            .http
            .static_dirs
            .iter()
            .map(|(prefix, dir)| {
                (
                    prefix.trim_end_matches('/').to_string(),
                    running.dir.join(dir),
                )
            })
            .collect();
        let route = AppRoute::new(&self.app, running.assignment.release, backends, static_dirs)
            .with_bodies(BodyPolicy::of(&running.assignment.manifest.http));
        self.shared
            .serve(&self.app, running.assignment.domains.clone(), route);
    }

    /// Deploys `target` beside `current`; returns what runs afterwards (the new release, or
    /// the old one untouched when the new one fails).
    async fn deploy(
        &mut self,
        current: Option<Running>,
        target: AppAssignment,
        stop: &CancellationToken,
    ) -> Option<Running> {
        let release = target.release;
        let dir = match self.prepare(&target).await {
            Ok(dir) => dir,
            Err(reason) => {
                self.shared.event(
                    NodeEventKind::DeployFailed,
                    &self.app,
                    release,
                    format!(
                        "{} v{release} not deployed on {}: {reason}; {}",
                        self.app,
                        self.shared.settings.node_name,
                        what_keeps_serving(current.as_ref())
                    ),
                    None,
                );
                self.failed = Some(target);
                return current;
            }
        };
        if let Err(unmet) = runtimes::check(&target.manifest, &process::instance_path(&dir)).await {
            self.shared.event(
                NodeEventKind::DeployFailed,
                &self.app,
                release,
                format!(
                    "{} v{release} not started on {}: {unmet}; {}",
                    self.app,
                    self.shared.settings.node_name,
                    what_keeps_serving(current.as_ref())
                ),
                None,
            );
            self.failed = Some(target);
            return current;
        }
        let stats = Arc::new(ReleaseStats::default());
        let mut started = Vec::new();
        for number in 1..=target.instances {
            if stop.is_cancelled() {
                break;
            }
            match self.start_instance(&target, &dir, number, &stats).await {
                Ok(instance) => started.push(instance),
                Err(reason) => {
                    let detail =
                        self.shared
                            .logs
                            .stderr_tail(&self.app, release, FAILED_STDERR_LINES);
                    self.shared.failure_event(
                        NodeEventKind::DeployFailed,
                        &self.app,
                        release,
                        format!(
                            "{} v{release} never became healthy: {reason}; {}",
                            self.app,
                            what_keeps_serving(current.as_ref())
                        ),
                        (!detail.is_empty()).then_some(detail),
                        reason.kind,
                    );
                    self.stop_all(started).await;
                    self.failed = Some(target);
                    return current;
                }
            }
        }
        let next = Running {
            assignment: target,
            dir,
            instances: started,
            stats,
        };
        // The switch: one swap of the routing table.
        self.publish(&next);
        self.failed = None;
        self.crash_streak = 0;
        self.crash_loop_reported = false;
        self.shared.event(
            NodeEventKind::DeployFinished,
            &self.app,
            release,
            format!(
                "{} v{release} serving with {} instance(s)",
                self.app,
                next.instances.len()
            ),
            None,
        );
        // Report the switch now: Beacon counts the rollout done when nodes say so, and
        // draining the old instances can take a while.
        self.report_instances(Some(&next));
        let previous = current
            .as_ref()
            .map(|c| (c.assignment.release, c.stats.clone()));
        // A restart of the same release is not a rollout: its first switch keeps its figures.
        let watched = previous.as_ref().is_none_or(|(p, _)| *p != release);
        if watched {
            self.watch_rollout(&next, previous);
        }
        if let Some(old) = current {
            let (closed, cut) = self
                .drain_and_stop(old.instances, next.assignment.manifest.deploy.drain)
                .await;
            if watched {
                self.drained(release, closed, cut);
            }
        }
        self.prune_releases(release).await;
        Some(next)
    }

    /// `state_dir/apps/<app>/releases`: one directory per unpacked release, by number.
    fn releases_dir(&self) -> PathBuf {
        self.shared
            .settings
            .state_dir
            .join("apps")
            .join(&self.app)
            .join("releases")
    }

    /// Makes sure the release directory exists: download, verify, unpack (once per release).
    async fn prepare(&self, target: &AppAssignment) -> Result<PathBuf, String> {
        let releases = self.releases_dir();
        let dir = releases.join(target.release.to_string());
        if dir.is_dir() {
            return Ok(dir);
        }
        tokio::fs::create_dir_all(&releases)
            .await
            .map_err(|e| format!("creating {}: {e}", releases.display()))?;
        // The bundle is downloaded, then unpacked beside it (at least as large again).
        let needed = target.bundle_size.saturating_mul(2);
        let floor = self.shared.settings.min_free_disk;
        if let Some(free) = free_disk(&releases)
            && free.saturating_sub(needed) < floor
        {
            return Err(format!(
                "not enough disk: {} free under {}, this release needs about {} and Maestro keeps {} free (min_free_disk); free some space (old releases, logs) or lower min_free_disk",
                ByteSize(free),
                releases.display(),
                ByteSize(needed),
                ByteSize(floor)
            ));
        }
        let download = releases.join(format!(".download-{}", target.release));
        let fetched = self.download(target, &download).await;
        if let Err(e) = fetched {
            let _ = tokio::fs::remove_file(&download).await;
            return Err(e);
        }
        let unpack_dir = dir.clone();
        let bundle_path = download.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&bundle_path).map_err(|e| e.to_string())?;
            px_bundle::unpack(
                std::io::BufReader::new(file),
                &unpack_dir,
                &px_bundle::Limits::default(),
            )
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?;
        let _ = tokio::fs::remove_file(&download).await;
        unpacked.map_err(|e| format!("unpacking: {e}"))?;
        Ok(dir)
    }

    /// Keeps the newest `keep_releases` unpacked releases of the app (and always `serving`),
    /// removes the others, and records what the kept ones weigh.
    async fn prune_releases(&self, serving: u64) {
        let releases = self.releases_dir();
        let keep = self.shared.settings.keep_releases;
        let app = self.app.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let mut numbers: Vec<u64> = std::fs::read_dir(&releases)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            numbers.sort_unstable_by(|a, b| b.cmp(a));
            let mut kept = 0u64;
            for (rank, number) in numbers.iter().enumerate() {
                let dir = releases.join(number.to_string());
                if rank < keep || *number == serving {
                    kept += dir_bytes(&dir);
                } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(app = %app, release = number, error = %e, "removing an old release failed");
                } else {
                    tracing::info!(app = %app, release = number, "removed an old release");
                }
            }
            kept
        })
        .await
        .unwrap_or_default();
        self.shared
            .release_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.app.clone(), measured);
    }

    async fn download(&self, target: &AppAssignment, path: &Path) -> Result<(), String> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut request = self.shared.http.get(&target.bundle_url);
        if let Some(token) = &self.shared.settings.repository_token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("downloading {}: {e}", target.bundle_url))?;
        if !response.status().is_success() {
            return Err(format!(
                "downloading {}: {}",
                target.bundle_url,
                response.status()
            ));
        }
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("downloading {}: {e}", target.bundle_url))?;
            size += chunk.len() as u64;
            if size > MAX_BUNDLE_BYTES {
                return Err(format!("bundle larger than {MAX_BUNDLE_BYTES} bytes"));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        file.sync_all()
            .await
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
        let digest = hex::encode(hasher.finalize());
        if digest != target.bundle_sha256 {
            return Err(format!(
                "bundle digest mismatch: expected {}, got {digest}",
                target.bundle_sha256
            ));
        }
        Ok(())
    }

    async fn start_instance(
        &self,
        target: &AppAssignment,
        dir: &Path,
        number: u32,
        stats: &Arc<ReleaseStats>,
    ) -> Result<Instance, StartError> {
        let port = self.shared.take_port().ok_or_else(|| StartError {
            message: "no free port in the configured range".into(),
            kind: FailureKind::CannotStart,
        })?;
        let registration = self
            .shared
            .app_events
            .register(&self.app, target.release, number);
        let heartbeat = target.manifest.health.heartbeat_interval;
        let launch = Launch {
            app: &self.app,
            release: target.release,
            dir,
            run: target.manifest.run.as_deref(),
            env: &target.env,
            port,
            extra_env: vec![
                ("PX_INSTANCE".into(), number.to_string()),
                ("PX_EVENTS_URL".into(), registration.url.clone()),
                ("PX_HEARTBEAT_INTERVAL".into(), format_seconds(heartbeat)),
            ],
        };
        let mut child = match process::spawn(
            &launch,
            &self.shared.limits.command_prefix(&target.manifest.limits),
        ) {
            Ok(child) => child,
            Err(e) => {
                self.shared.give_back(port);
                return Err(StartError {
                    message: format!("cannot start: {e}"),
                    kind: FailureKind::CannotStart,
                });
            }
        };
        let pid = child.id().unwrap_or_default();
        self.shared.record_group(pid);
        let cgroup = self
            .shared
            .limits
            .place(&self.app, pid, &target.manifest.limits);
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(stdout), Some(stderr)) => {
                Some(
                    self.shared
                        .logs
                        .attach(&self.app, target.release, number, stdout, stderr),
                )
            }
            _ => None,
        };
        if let Err(failure) =
            process::wait_healthy(&mut child, port, &target.manifest.health, &self.shared.http)
                .await
        {
            process::stop(&mut child, self.shared.settings.stop_grace).await;
            // Let the log readers reach the end of its output, so the failed-deploy event can
            // carry its last stderr lines.
            if let Some(output) = output {
                let _ = tokio::time::timeout(OUTPUT_DRAIN, output.wait()).await;
            }
            self.shared.forget_group(pid);
            self.shared.give_back(port);
            let oom = cgroup.as_ref().is_some_and(InstanceCgroup::oom_killed);
            if let Some(cgroup) = cgroup {
                tokio::task::spawn_blocking(move || cgroup.remove());
            }
            if oom {
                return Err(StartError {
                    message: format!(
                        "{failure}: it ran out of memory (the kernel's OOM killer ended it at its [limits] memory)"
                    ),
                    kind: FailureKind::OutOfMemory,
                });
            }
            return Err(StartError {
                message: failure.to_string(),
                kind: failure.kind(),
            });
        }
        tracing::info!(app = %self.app, release = target.release, number, port, pid, "instance healthy");
        self.shared.event(
            NodeEventKind::InstanceStarted,
            &self.app,
            target.release,
            format!(
                "{} v{} instance {number} up on port {port}",
                self.app, target.release
            ),
            None,
        );
        Ok(self.watch(
            child,
            registration,
            cgroup,
            target,
            number,
            port,
            pid,
            stats.clone(),
        ))
    }

    /// Hands the child to a waiter task that reports its exit or stops it on request.
    #[allow(clippy::too_many_arguments)]
    fn watch(
        &self,
        mut child: tokio::process::Child,
        registration: Registration,
        cgroup: Option<InstanceCgroup>,
        target: &AppAssignment,
        number: u32,
        port: u16,
        pid: u32,
        stats: Arc<ReleaseStats>,
    ) -> Instance {
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Duration>();
        let heartbeat_interval = target.manifest.health.heartbeat_interval;
        let stop_grace = self.shared.settings.stop_grace;
        tokio::spawn(async move {
            // The secret stays valid exactly as long as the process runs.
            let registration = registration;
            let (status, reason) = tokio::select! {
                status = child.wait() => (status.ok(), None),
                silence = registration.heartbeat.lost(heartbeat_interval) => {
                    let reason = format!(
                        "sent no heartbeat for {}s (PX_HEARTBEAT_INTERVAL={})",
                        silence.as_secs(),
                        format_seconds(heartbeat_interval)
                    );
                    (process::stop(&mut child, stop_grace).await, Some(reason))
                }
                grace = stop_rx => match grace {
                    Ok(grace) => (process::stop(&mut child, grace).await, None),
                    // The instance handle is gone (Maestro stopping): stop it anyway.
                    Err(_) => (process::stop(&mut child, Duration::from_secs(2)).await, None),
                },
            };
            drop(registration);
            let oom = cgroup.as_ref().is_some_and(InstanceCgroup::oom_killed);
            if let Some(cgroup) = cgroup {
                // Its process group was ended; the cgroup empties a moment later.
                tokio::task::spawn_blocking(move || cgroup.remove());
            }
            let _ = exit_tx.send((status, reason, oom));
        });
        Instance {
            number,
            port,
            pid,
            backend: Backend::with_stats(
                &self.app,
                target.release,
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                stats,
            ),
            restarts: 0,
            started: Instant::now(),
            last_exit: None,
            exited: exit_rx,
            stop: Some(stop_tx),
        }
    }

    /// An instance exited on its own: take it out of the route, report, schedule a restart.
    fn on_exit(
        &mut self,
        running: &mut Option<Running>,
        index: usize,
        (status, reason, oom): Exit,
    ) -> Option<(usize, Instant)> {
        let running = running.as_mut()?;
        let release = running.assignment.release;
        let instance = running.instances.get_mut(index)?;
        instance.stop = None;
        let how = if oom {
            let limit = running
                .assignment
                .manifest
                .limits
                .memory
                .map_or_else(|| "?".to_string(), |m| m.to_string());
            format!(
                "out of memory: the kernel's OOM killer ended it at its [limits] memory of {limit}"
            )
        } else {
            status
                .as_ref()
                .map(process::describe_exit)
                .unwrap_or_else(|| "unknown exit".into())
        };
        let kind = if oom {
            FailureKind::OutOfMemory
        } else if reason.is_some() {
            FailureKind::MissedHeartbeats
        } else {
            status
                .as_ref()
                .map_or(FailureKind::Signal, process::exit_kind)
        };
        instance.last_exit = Some(ExitInfo {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            oom,
            kind: Some(kind),
            at: now_rfc3339(),
        });
        self.shared.forget_group(instance.pid);
        self.shared.give_back(instance.port);
        let stable = instance.started.elapsed() >= STABLE_AFTER;
        let number = instance.number;
        let detail = self
            .shared
            .logs
            .stderr_tail(&self.app, release, FAILED_STDERR_LINES);
        match reason {
            Some(reason) => self.shared.failure_event(
                NodeEventKind::InstanceUnhealthy,
                &self.app,
                release,
                format!(
                    "{} v{release} instance {number} {reason}; restarted it",
                    self.app
                ),
                None,
                kind,
            ),
            None => self.shared.failure_event(
                NodeEventKind::InstanceCrashed,
                &self.app,
                release,
                format!("{} v{release} instance {number} exited ({how})", self.app),
                (!detail.is_empty()).then_some(detail.clone()),
                kind,
            ),
        }
        self.publish(running);
        Some(self.schedule_restart(index, release, stable, detail))
    }

    /// Counts one more exit (or failed restart) and says when to try again: capped
    /// exponential backoff, reset after a stable period; a crash loop is reported once.
    fn schedule_restart(
        &mut self,
        index: usize,
        release: u64,
        stable: bool,
        detail: String,
    ) -> (usize, Instant) {
        if stable {
            self.crash_streak = 0;
            self.crash_loop_reported = false;
        }
        self.crash_streak += 1;
        if self.crash_streak >= CRASH_LOOP_RESTARTS && !self.crash_loop_reported {
            self.crash_loop_reported = true;
            self.shared.event(
                NodeEventKind::CrashLoop,
                &self.app,
                release,
                format!(
                    "{} v{release} keeps crashing ({} exits in a row); restarts are backing off",
                    self.app, self.crash_streak
                ),
                (!detail.is_empty()).then_some(detail),
            );
        }
        let exponent = self.crash_streak.saturating_sub(1).min(16);
        let backoff = RESTART_BACKOFF_MIN
            .saturating_mul(1 << exponent)
            .min(RESTART_BACKOFF_MAX);
        let jittered = backoff.mul_f64(rand::rng().random_range(0.8..1.2));
        (index, Instant::now() + jittered)
    }

    /// Starts a crashed instance again; when that fails too, returns when to retry.
    async fn restart_instance(
        &mut self,
        running: &mut Option<Running>,
        index: usize,
    ) -> Option<(usize, Instant)> {
        let run = running.as_mut()?;
        let target = run.assignment.clone();
        let dir = run.dir.clone();
        let stats = run.stats.clone();
        let old = run.instances.get(index)?;
        let (number, restarts, last_exit) = (old.number, old.restarts + 1, old.last_exit.clone());
        match self.start_instance(&target, &dir, number, &stats).await {
            Ok(mut instance) => {
                instance.restarts = restarts;
                instance.last_exit = last_exit;
                run.instances[index] = instance;
                self.publish(run);
                None
            }
            Err(reason) => {
                tracing::warn!(app = %self.app, number, %reason, "restart failed; trying again after a backoff");
                if let Some(instance) = run.instances.get_mut(index) {
                    instance.restarts = restarts;
                }
                let detail =
                    self.shared
                        .logs
                        .stderr_tail(&self.app, target.release, FAILED_STDERR_LINES);
                Some(self.schedule_restart(index, target.release, false, detail))
            }
        }
    }

    /// Drains `instances` over `budget` (the new release's `deploy.drain`): requests in flight
    /// finish, long-lived connections close one by one with a reconnect hint (see
    /// `proxy::drain`). Waits until no request holds them any more (in flight, or about to
    /// pick them from a route looked up before the switch), up to the deadline, then stops
    /// them.
    async fn drain_and_stop(&self, instances: Vec<Instance>, budget: Duration) -> (u64, u64) {
        for instance in &instances {
            instance.backend.start_drain(budget);
        }
        let deadline = Instant::now() + budget + proxy::drain::DEADLINE_SLACK;
        while instances
            .iter()
            .any(|i| Backend::held_elsewhere(&i.backend))
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left: usize = instances.iter().map(|i| i.backend.in_flight()).sum();
        if left > 0 {
            tracing::warn!(app = %self.app, left, "drain deadline passed; stopping with requests in flight");
        }
        let (closed, cut) = instances.iter().fold((0, 0), |(closed, cut), i| {
            let outcome = i.backend.drain_outcome();
            (closed + outcome.closed, cut + outcome.cut)
        });
        if closed + cut > 0 {
            tracing::info!(app = %self.app, closed, cut, ?budget, "long-lived connections of the old release: closed with a reconnect hint, or cut at the deadline");
        }
        self.stop_all(instances).await;
        (closed, cut)
    }

    /// Starts counting what the switch to `next` costs: answers of the release it replaced
    /// from now on, and answers (5xx among them) of the new one during its watch window. The
    /// figures travel in every report until the next switch; Beacon sums them over the nodes
    /// and judges them against the app's error budget.
    fn watch_rollout(&self, next: &Running, previous: Option<(u64, Arc<ReleaseStats>)>) {
        let window = next.assignment.manifest.deploy.watch;
        let release = next.assignment.release;
        let figures = RolloutFigures {
            app: self.app.clone(),
            release,
            previous: previous.as_ref().map(|(p, _)| *p),
            watched_ms: 0,
            watch_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            done: false,
            figures: DeployFigures::default(),
        };
        self.shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                self.app.clone(),
                WatchedRollout {
                    figures,
                    drained: previous.is_none(),
                },
            );
        let shared = self.shared.clone();
        let app = self.app.clone();
        // The new release's stats are fresh: it has answered nothing before its switch.
        let new = next.stats.clone();
        let old = previous.map(|(_, stats)| {
            let (base, _) = stats.counts();
            (stats, base)
        });
        let started = Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_TICK).await;
                let elapsed = started.elapsed();
                let mut rollouts = shared.rollouts.lock().unwrap_or_else(|p| p.into_inner());
                // A newer switch of the app replaced this one, or the app went.
                let Some(watched) = rollouts
                    .get_mut(&app)
                    .filter(|w| w.figures.release == release && !w.figures.done)
                else {
                    return;
                };
                let before = watched.figures.clone();
                let f = &mut watched.figures;
                if elapsed < window {
                    let (requests, errors) = new.counts();
                    f.figures.new_requests = requests;
                    f.figures.new_errors = errors;
                    f.watched_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                } else {
                    f.watched_ms = f.watch_ms;
                }
                if let Some((old, base)) = &old {
                    f.figures.old_requests = old.counts().0 - base;
                }
                f.done = elapsed >= window && watched.drained;
                let changed = watched.figures != before;
                let done = watched.figures.done;
                drop(rollouts);
                if changed {
                    shared.changes.send_modify(|n| *n += 1);
                }
                if done {
                    return;
                }
            }
        });
    }

    /// The release `release` replaced has stopped: record how its long-lived connections
    /// ended, and let the watch finish.
    fn drained(&self, release: u64, closed: u64, cut: u64) {
        let mut rollouts = self
            .shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = rollouts
            .get_mut(&self.app)
            .filter(|w| w.figures.release == release)
        {
            watched.drained = true;
            watched.figures.figures.closed = closed;
            watched.figures.figures.cut = cut;
        }
    }

    async fn stop_all(&self, instances: Vec<Instance>) {
        let grace = self.shared.settings.stop_grace;
        let mut waits = Vec::new();
        for mut instance in instances {
            if let Some(stop) = instance.stop.take() {
                let _ = stop.send(grace);
                waits.push(instance);
            }
        }
        for instance in waits {
            let _ = instance.exited.await;
            self.shared.forget_group(instance.pid);
            self.shared.give_back(instance.port);
        }
    }
}

/// Why an instance could not be started: the sentence for events, and its class.
#[derive(Debug)]
struct StartError {
    message: String,
    kind: FailureKind,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The end of a failed deploy's event: which release still serves.
fn what_keeps_serving(current: Option<&Running>) -> String {
    current.map_or("nothing was serving before".to_string(), |c| {
        format!("v{} keeps serving", c.assignment.release)
    })
}

/// Free bytes for an unprivileged user on the file system of `path`.
fn free_disk(path: &Path) -> Option<u64> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    Some(
        stats
            .blocks_available()
            .saturating_mul(stats.fragment_size()),
    )
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Seconds as `PX_HEARTBEAT_INTERVAL` gives them, to the millisecond: `10`, or `1.5`. Written
/// from whole milliseconds rather than rounded from a float, which turned 1.9999 s into `2.`.
pub fn format_seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
            .trim_end_matches('0')
            .to_string()
    }
}

enum CrashEvent {
    Exited(usize, Exit),
    RestartDue(usize),
}

/// Resolves when a live instance exits, or when a scheduled restart is due.
async fn wait_crash(
    running: &mut Option<Running>,
    pending: Option<(usize, Instant)>,
) -> CrashEvent {
    let Some(run) = running.as_mut() else {
        return std::future::pending().await;
    };
    let exits = run
        .instances
        .iter_mut()
        .enumerate()
        .filter(|(_, i)| i.stop.is_some())
        .map(|(index, instance)| {
            Box::pin(async move {
                let exit = (&mut instance.exited).await.unwrap_or((None, None, false));
                CrashEvent::Exited(index, exit)
            })
        });
    let exits: Vec<_> = exits.collect();
    let restart = async move {
        match pending {
            Some((index, at)) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                CrashEvent::RestartDue(index)
            }
            None => std::future::pending().await,
        }
    };
    if exits.is_empty() {
        return restart.await;
    }
    tokio::select! {
        (event, _, _) = futures_util::future::select_all(exits) => event,
        event = restart => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_intervals_are_given_as_seconds_an_app_can_parse() {
        for (interval, text) in [
            (Duration::from_secs(10), "10"),
            (Duration::from_millis(1500), "1.5"),
            (Duration::from_millis(1250), "1.25"),
            (Duration::from_millis(1001), "1.001"),
            (Duration::from_micros(1_999_900), "1.999"),
            (Duration::from_micros(2_000_400), "2"),
        ] {
            let formatted = format_seconds(interval);
            assert_eq!(formatted, text, "{interval:?}");
            assert!(
                formatted.parse::<f64>().is_ok_and(|s| s > 0.0),
                "{formatted}"
            );
        }
    }
}
