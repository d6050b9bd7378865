//! The supervisor: turns assignments into running instances. One task per app owns that
//! app's instances; it prepares a release (download, verify, unpack), starts the new
//! instances beside the old ones, switches the route once they are healthy, drains and stops
//! the old ones, and restarts crashed instances with backoff. Apps never wait on each other.
//!
//! This module is the handle the rest of Maestro holds ([`Supervisor`]: apply an assignment,
//! restart or stop an app, wait for the first deploys); the node report and disk metrics are
//! in `report.rs`. Behind it: `app_task.rs` (one app's deploy state machine), `instance.rs`
//! (start, watch, exit and restart of one instance; drain and stop), `processes.rs` (the
//! processes of other types than web: start, restart, replacement in `replace` order),
//! `rollout_watch.rs` (the
//! figures of a release switch), `store.rs` (releases on disk), `layers.rs` (the layers
//! built releases are assembled from), `error.rs` (`DeployError`
//! and the deploy-failed event), `shared.rs` (the port pool and the state the tasks share).

mod app_task;
mod domains;
mod error;
mod instance;
mod layers;
mod processes;
mod release_phase;
pub(crate) use release_phase::Source as PhaseSource;
mod report;
mod rollout_watch;
mod shared;
pub(crate) use shared::Start;
mod store;
mod usage;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use px_proto::link::{AppAssignment, Assignment, NodeEvent};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// The pieces of an instance's life that running an app locally (`crate::local`) shares with
// the supervisor, so the two cannot drift apart.
pub(crate) use app_task::FAILED_STDERR_LINES;
pub(crate) use instance::{
    Exit, Waiter, Watch, drain, instance_env, spawn_waiter, wait_healthy_or_stop,
};

pub(crate) use store::{Fetch, MAX_BUNDLE_BYTES, fetch};

use self::app_task::AppTask;
use self::shared::Shared;
use crate::app_events::AppEvents;
use crate::logs::AppLogs;
use crate::routes::Routes;

/// Events queued for the Beacon link; when Beacon is away and this fills, the oldest news
/// is dropped (heartbeats still carry the full state).
pub const EVENT_QUEUE: usize = 256;

/// What the supervisor takes from Maestro's configuration.
pub(crate) struct Settings {
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
    /// What apprepo's certificate is checked against (`None`: the system's roots).
    pub repository_tls: Option<Arc<rustls::ClientConfig>>,
    /// How app processes are isolated.
    pub sandbox: Arc<crate::sandbox::AppSandbox>,
}

/// What a one-off run of an app starts from: its serving release, as its instances get it.
#[derive(Debug, Clone)]
pub(crate) struct RunTarget {
    pub release: u64,
    pub dir: PathBuf,
    pub path: std::ffi::OsString,
    pub env: std::collections::BTreeMap<String, String>,
    pub limits: px_proto::manifest::ResourceLimits,
}

/// Handle to the supervisor.
pub(crate) struct Supervisor {
    shared: Arc<Shared>,
    apps: Mutex<HashMap<String, AppHandle>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Memory and CPU of the running processes, measured for each report.
    usage: usage::Meter,
}

struct AppHandle {
    desired: watch::Sender<Option<AppAssignment>>,
    restart: mpsc::Sender<()>,
    stop: CancellationToken,
}

impl Supervisor {
    /// Creates the supervisor, first ending any instance a previous Maestro left running.
    /// Events for Beacon go to `events` (bounded: news is dropped when it is full).
    pub fn new(
        settings: Settings,
        routes: Arc<Routes>,
        logs: Arc<AppLogs>,
        app_events: Arc<AppEvents>,
        events: mpsc::Sender<NodeEvent>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared: Arc::new(Shared::new(settings, routes, logs, app_events, events)),
            apps: Mutex::new(HashMap::new()),
            tracker,
            shutdown,
            usage: usage::Meter::default(),
        })
    }

    /// The release a one-off run of `app` starts from, when the app serves here.
    pub fn run_target(&self, app: &str) -> Option<RunTarget> {
        let runnable = self
            .shared
            .runnable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        runnable.get(app).cloned()
    }

    /// How a run's process starts, as an instance's: the words before its command (its
    /// cgroup, rlimits, sandbox) and the cgroup it enters.
    pub fn run_start(
        &self,
        app: &str,
        dir: &std::path::Path,
        limits: &px_proto::manifest::ResourceLimits,
    ) -> std::io::Result<Start> {
        self.shared.start_words(app, dir, limits)
    }

    /// Records a run's process group, so a Maestro killed with SIGKILL ends it on restart;
    /// `false` forgets it once it is gone.
    pub fn track_group(&self, pid: u32, live: bool) {
        if live {
            self.shared.record_group(pid);
        } else {
            self.shared.forget_group(pid);
        }
    }

    /// The generation of the last assignment applied.
    pub fn generation(&self) -> u64 {
        *self
            .shared
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the release phases of an assignment that this Maestro has not run yet. Those of
    /// the assignment persisted before a restart run too (Beacon sends no assignment again for
    /// a generation the node reports applied), but leave a phase another node claimed since.
    pub fn apply_phases(
        &self,
        orders: &[px_proto::link::PhaseOrder],
        source: release_phase::Source,
    ) {
        release_phase::apply(&self.shared, orders, source, &self.tracker, &self.shutdown);
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

    /// A receiver that changes whenever an instance starts, stops or crashes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}
