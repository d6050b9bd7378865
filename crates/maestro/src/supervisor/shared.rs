//! What the supervisor's per-app tasks share: the port pool, the routes being served, the
//! instance statuses, rollout figures and builds the node report is made of, the process-group file,
//! the release store, and the queue of events for Beacon.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use px_proto::build::BuildStatus;
use px_proto::link::{FailureKind, InstanceStatus, NodeEvent, NodeEventKind};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use super::Settings;
use super::domains::{Conflict, Served, newly_reported, route_table};
use super::rollout_watch::WatchedRollout;
use super::store::ReleaseStore;
use crate::app_events::AppEvents;
use crate::limits::Enforcer;
use crate::logs::AppLogs;
use crate::process::{self, GroupFile, GroupRecord};
use crate::routes::{AppRoute, Routes};

/// Ports in use by live instances; a port is never handed to two.
struct Ports {
    range: (u16, u16),
    used: BTreeSet<u16>,
    next: u16,
}

impl Ports {
    fn new(range: (u16, u16)) -> Self {
        Self {
            range,
            used: BTreeSet::new(),
            // Start somewhere random in the range: a restarted Maestro does not reach for
            // ports its previous run just left in TIME_WAIT, and several Maestros on one
            // machine (tests, `em up` beside a node) rarely race for the same port.
            next: range.0 + rand::rng().random_range(0..=(range.1 - range.0)),
        }
    }

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

/// The state all app tasks of one supervisor share. Each lock is taken for a lookup or an
/// update and never held across an await.
pub(super) struct Shared {
    pub(super) settings: Settings,
    routes: Arc<Routes>,
    pub(super) logs: Arc<AppLogs>,
    pub(super) app_events: Arc<AppEvents>,
    events: mpsc::Sender<NodeEvent>,
    /// For health checks (and, through the store, downloads).
    pub(super) http: reqwest::Client,
    pub(super) store: ReleaseStore,
    ports: Mutex<Ports>,
    /// app → its domains and route as currently served.
    served: Mutex<BTreeMap<String, Served>>,
    /// The hosts several apps name, as last reported to Beacon: each conflict is reported once
    /// while it lasts. Bounded by the apps' domains.
    conflicts: Mutex<BTreeSet<Conflict>>,
    /// app → instance statuses for reports.
    pub(super) statuses: Mutex<BTreeMap<String, Vec<InstanceStatus>>>,
    groups: GroupFile,
    live_groups: Mutex<HashMap<u32, GroupRecord>>,
    pub(super) generation: Mutex<u64>,
    /// Apps whose first deploy in this run has been tried (serving or failed).
    pub(super) tried: Mutex<BTreeSet<String>>,
    /// app → the figures of its latest release switch, reported to Beacon.
    pub(super) rollouts: Mutex<BTreeMap<String, WatchedRollout>>,
    /// app → its latest build on this node, reported to Beacon.
    pub(super) builds: Mutex<BTreeMap<String, BuildStatus>>,
    /// How instances get their `[limits]`.
    pub(super) limits: Enforcer,
    /// Per app, the release a one-off run starts from (the one its instances run).
    pub(super) runnable: Mutex<BTreeMap<String, super::RunTarget>>,
    /// Bumped whenever an instance changes, so the link reports at once.
    pub(super) changes: watch::Sender<u64>,
    /// The release phases this run of Maestro took from assignments.
    pub(super) phases: Mutex<super::release_phase::Taken>,
}

/// How an app process starts: the words before its command and the cgroup it enters.
pub(crate) struct Start {
    /// Into its cgroup, its rlimits, its sandbox.
    pub words: Vec<std::ffi::OsString>,
    /// Its cgroup under `cgroup_limits`, to be removed once it is gone.
    pub cgroup: Option<crate::limits::InstanceCgroup>,
    /// It starts in bubblewrap.
    pub sandboxed: bool,
}

impl Shared {
    /// How a process of `app` whose release is `dir` starts (see [`Start`]). An error when the
    /// sandbox cannot hold it (the release, or the app's uid).
    pub(crate) fn start_words(
        &self,
        app: &str,
        dir: &std::path::Path,
        limits: &px_proto::manifest::ResourceLimits,
    ) -> std::io::Result<Start> {
        let cgroup = self.limits.prepare(app, limits);
        let mut words = cgroup
            .as_ref()
            .map(crate::limits::InstanceCgroup::enter_words)
            .unwrap_or_default();
        words.extend(
            self.limits
                .command_prefix(limits)
                .into_iter()
                .map(Into::into),
        );
        match self.settings.sandbox.prefix(app, dir) {
            Ok(sandbox) => words.extend(sandbox),
            Err(e) => {
                if let Some(cgroup) = cgroup {
                    cgroup.remove();
                }
                return Err(e.into());
            }
        }
        Ok(Start {
            words,
            cgroup,
            sandboxed: self.sandboxed(),
        })
    }

    /// Whether app processes start in bubblewrap.
    pub(crate) fn sandboxed(&self) -> bool {
        self.settings.sandbox.mode() == crate::config::SandboxConfig::Bubblewrap
    }

    /// The shared state, first ending any instance a previous Maestro left running.
    pub(super) fn new(
        settings: Settings,
        routes: Arc<Routes>,
        logs: Arc<AppLogs>,
        app_events: Arc<AppEvents>,
        events: mpsc::Sender<NodeEvent>,
    ) -> Self {
        let groups = GroupFile::new(settings.state_dir.join("instances.json"));
        let killed = groups.kill_leftovers();
        if killed > 0 {
            tracing::warn!(killed, "ended instances a previous maestro left running");
        }
        let http = crate::delivery::repository_client(settings.repository_tls.clone());
        Self {
            store: ReleaseStore::new(&settings, http.clone()),
            ports: Mutex::new(Ports::new(settings.port_range)),
            limits: Enforcer::detect(settings.cgroup_limits),
            settings,
            routes,
            logs,
            app_events,
            events,
            http,
            served: Mutex::new(BTreeMap::new()),
            conflicts: Mutex::new(BTreeSet::new()),
            statuses: Mutex::new(BTreeMap::new()),
            groups,
            live_groups: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            tried: Mutex::new(BTreeSet::new()),
            rollouts: Mutex::new(BTreeMap::new()),
            builds: Mutex::new(BTreeMap::new()),
            runnable: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            phases: Mutex::default(),
        }
    }

    fn publish_routes(&self) {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let (table, conflicts) = route_table(&served);
        let releases: BTreeMap<String, u64> = served
            .iter()
            .map(|(app, served)| (app.clone(), served.release))
            .collect();
        drop(served);
        self.routes.store(table);
        let new = newly_reported(
            &mut self.conflicts.lock().unwrap_or_else(|p| p.into_inner()),
            conflicts,
        );
        for conflict in new {
            // Reported as an event of the app that lost the host: its own log says why.
            if let Some(app) = conflict.losers.first() {
                let release = releases.get(app).copied().unwrap_or_default();
                self.event(
                    NodeEventKind::DomainConflict,
                    app,
                    release,
                    conflict.message(),
                    None,
                );
            }
        }
    }

    /// Serves `app` on `domains` through `route` (one swap of the routing table); a host
    /// another app names too goes to the app created first (`domains.rs`).
    pub(super) fn serve(
        &self,
        app: &str,
        domains: Vec<String>,
        route: AppRoute,
        release: u64,
        created_at: Option<String>,
    ) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                app.to_string(),
                Served {
                    domains,
                    route: Arc::new(route),
                    release,
                    created_at,
                },
            );
        self.publish_routes();
    }

    pub(super) fn unserve(&self, app: &str) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(app);
        self.publish_routes();
    }

    pub(super) fn event(
        &self,
        kind: NodeEventKind,
        app: &str,
        release: u64,
        message: String,
        detail: Option<String>,
    ) {
        self.send(app_event(kind, app, release, message, detail, None));
    }

    /// An event about an instance that failed, with the failure classified.
    pub(super) fn failure_event(
        &self,
        kind: NodeEventKind,
        app: &str,
        release: u64,
        message: String,
        detail: Option<String>,
        failure: FailureKind,
    ) {
        self.send(app_event(
            kind,
            app,
            release,
            message,
            detail,
            Some(failure),
        ));
    }

    /// Logs `event` and queues it for Beacon; when the queue is full the news is dropped
    /// (the next report still carries the state).
    pub(super) fn send(&self, event: NodeEvent) {
        tracing::info!(app = %event.app, release = event.release, kind = ?event.kind, failure = ?event.failure, message = %event.message, "app event");
        let _ = self.events.try_send(event);
    }

    pub(super) fn take_port(&self) -> Option<u16> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub(super) fn give_back(&self, port: u16) {
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give_back(port);
    }

    pub(super) fn record_group(&self, pid: u32) {
        let mut live = self.live_groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(start_ticks) = process::start_ticks(pid) {
            live.insert(pid, GroupRecord { pid, start_ticks });
        }
        self.groups
            .save(&live.values().cloned().collect::<Vec<_>>());
    }

    pub(super) fn forget_group(&self, pid: u32) {
        let mut live = self.live_groups.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&pid);
        self.groups
            .save(&live.values().cloned().collect::<Vec<_>>());
    }
}

/// An event of the supervisor's about `app` at `release`. It names no instance and carries no
/// level: those are for the events apps post themselves (`app_events.rs`).
pub(super) fn app_event(
    kind: NodeEventKind,
    app: &str,
    release: u64,
    message: String,
    detail: Option<String>,
    failure: Option<FailureKind>,
) -> NodeEvent {
    NodeEvent {
        kind,
        app: app.into(),
        release,
        message,
        detail,
        instance: None,
        level: None,
        failure,
        build: None,
    }
}
