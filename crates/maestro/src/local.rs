//! Running one app from a local directory the way Maestro runs it on a web server. This is the
//! supported way for other crates to run an app locally (`em dev` is built on it); no other
//! part of Maestro is meant for them.
//!
//! # Why a facade
//!
//! Services never depend on each other's internals. `em dev` used to assemble Maestro's
//! process, proxy, route, log and app-event modules itself and repeat the deploy's sequence
//! (start the new instance beside the old, check its health, switch the route, drain and stop
//! the old) with them: two copies of the same rules, every change to Maestro's internals made
//! twice, and the copies drifting apart. Here the sequence is Maestro's own code. An instance
//! starts through the AppRunner contract (`process`) with the variables every instance gets
//! (`PX_INSTANCE`, `PX_EVENTS_URL`, `PX_HEARTBEAT_INTERVAL`), passes the same health check,
//! is watched by the same waiter task, and a replaced one drains as on a web server: these
//! pieces are shared with the supervisor (`supervisor/instance.rs`). In front runs Maestro's
//! [`Proxy`], serving the manifest's static directories and applying its body limits, beside
//! the same app events endpoint, the same logs and the same `runtime`/`requires` check. So
//! what works locally works on the platform, and a change to how Maestro runs apps reaches
//! local runs without a second edit.
//!
//! # What differs from a web server, and why
//!
//! - The instance runs in the directory itself, not in an unpacked release: an edit is picked
//!   up by the next [`LocalApp::restart`], which the caller asks for (`em dev` on a change).
//! - One instance, `PX_INSTANCE=1`, on a free loopback port.
//! - `[limits]` through rlimits: a workstation has no cgroup delegated to us, and a local run
//!   must never rearrange the cgroup of the session that started it.
//! - Heartbeats are accepted but not enforced: a breakpoint in a debugger would trip them.
//! - An instance that exits is reported, not restarted with backoff: the caller decides when
//!   to start again, usually after the developer changed something.
//! - Nothing is sent to Beacon; app events show in the logs (and so to log followers).
//!
//! # Restarts
//!
//! [`LocalApp::restart`] reads `app.toml` again and starts a new instance beside the serving
//! one; once it is healthy the route switches to it in one swap, and the replaced instance is
//! drained and stopped in the background. A manifest that does not read, or a new instance
//! that does not become healthy, leaves the old instance serving; with no old instance the
//! proxy answers 503 (static files are served all the same) until a restart succeeds.

use std::io::{ErrorKind, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use px_proto::manifest::{AppManifest, MANIFEST_FILE, MAX_MANIFEST_BYTES, ManifestError};
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app_events::{AppEvents, Registration};
use crate::limits::Enforcer;
use crate::logs::{AppLogs, LogLine, LogTasks, Rotation};
use crate::process::{self, Launch};
use crate::proxy::{AccessLog, Proxy, ProxyMetrics, ProxySettings};
use crate::routes::{AppRoute, Backend, BodyPolicy, HttpsPolicy, RouteTable, Routes};
use crate::runtimes;
use crate::supervisor::{
    EVENT_QUEUE, Exit, FAILED_STDERR_LINES, Waiter, Watch, drain, instance_env, spawn_waiter,
    wait_healthy_or_stop,
};

/// How long SIGTERM may take before an instance is killed: enough for an app to finish its
/// requests and close its files, short enough that stopping a local run feels prompt.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a replaced instance may finish the requests it still serves (its long-lived
/// connections are closed with a reconnect hint within it). Local requests are short, and a
/// stuck one must not keep old instances piling up while the developer keeps saving; the
/// manifest's `deploy.drain` (30 s by default) is for production traffic.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// On [`LocalApp::stop`], open requests get this long to finish before the proxy closes them:
/// the developer wants the prompt back, and a request cut locally is one reload away.
pub const PROXY_DRAIN: Duration = Duration::from_secs(2);
/// The app's log files: one small file per stream, started afresh when full. Lines are
/// followed live ([`LocalApp::follow`]); the files only need to bound the disk they use.
const LOG_ROTATION: Rotation = Rotation {
    max_file_bytes: 1024 * 1024,
    keep_files: 0,
};
/// The number of the one instance.
const INSTANCE: u32 = 1;

/// What [`LocalApp::start`] needs.
pub struct LocalSettings {
    /// The app's directory: `app.toml` is read from it and the instances run in it.
    pub dir: PathBuf,
    /// Where the proxy listens, e.g. `127.0.0.1:8080` (port 0 for any free one).
    pub listen: SocketAddr,
    /// Where the app's log files go (`<app>/stdout.log`, `stderr.log`, `events.log`).
    pub logs_dir: PathBuf,
    /// Variables every instance gets unless the manifest's `env` sets them.
    pub default_env: Vec<(String, String)>,
    /// Variables every instance gets, over the manifest's `env`.
    pub extra_env: Vec<(String, String)>,
    /// Called with what the caller should tell the developer (see [`Notice`]), as it happens.
    pub on_notice: Box<dyn Fn(Notice) + Send + Sync>,
}

/// Why a local run could not start, or the app's files could not be read for a restart.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("no {MANIFEST_FILE} in {}", dir.display())]
    NoManifest { dir: PathBuf },
    #[error("cannot open {}: {source}; check the path and its permissions", dir.display())]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not UTF-8 text; save it as UTF-8", path.display())]
    ManifestNotUtf8 { path: PathBuf },
    #[error("cannot read {}: {source}; check its permissions", path.display())]
    ManifestUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    InvalidManifest(#[from] ManifestError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the app events endpoint: {0}")]
    EventsEndpoint(std::io::Error),
    #[error("cannot set up the health check client: {0}")]
    HealthClient(reqwest::Error),
}

impl LocalError {
    /// Whether the app's directory or its `app.toml` is at fault (rather than this machine).
    pub fn is_bad_app(&self) -> bool {
        matches!(
            self,
            Self::NoManifest { .. }
                | Self::Directory { .. }
                | Self::ManifestNotUtf8 { .. }
                | Self::ManifestUnreadable { .. }
                | Self::InvalidManifest(_)
        )
    }
}

/// Something the developer should know that stops nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A `[http] static` directory does not exist (yet).
    MissingStaticDir { prefix: String, dir: String },
    /// The manifest's `runtime` or `requires` is not met here; a web server refuses the app.
    RuntimeUnmet { app: String, unmet: String },
    /// At [`LocalApp::stop`] the proxy did not finish its drain in time.
    ProxySlowToStop,
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingStaticDir { prefix, dir } => write!(
                f,
                "static directory {dir:?} for {prefix} does not exist; create it (requests under {prefix} answer 404 until then)"
            ),
            Self::RuntimeUnmet { app, unmet } => write!(
                f,
                "{app} {unmet}; it may not start here, and web servers without it refuse it"
            ),
            Self::ProxySlowToStop => {
                f.write_str("the proxy did not stop in time; stopping the app anyway")
            }
        }
    }
}

/// Why a new instance is not serving; the one serving before, if any, still is.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no free port for the app: {0}")]
    NoFreePort(std::io::Error),
    #[error("cannot start app {app}: {source}; {fix}")]
    CannotStart {
        app: String,
        source: std::io::Error,
        fix: &'static str,
    },
    /// `failure` says how (exited, never listened, unhealthy); `stderr` is the instance's
    /// last stderr lines as an indented block after a newline, or empty.
    #[error("app {app} failed to start: {failure}{stderr}")]
    NeverHealthy {
        app: String,
        failure: String,
        stderr: String,
    },
}

/// How [`LocalApp::restart`] ended.
#[derive(Debug)]
pub enum RestartOutcome {
    /// The new instance is healthy and takes the app's requests; the one it replaced, if
    /// any, drains and stops in the background.
    Serving { app: String },
    /// The new instance did not start or become healthy, and was stopped.
    Failed(StartError),
    /// The shutdown token was cancelled before the new instance was healthy; it was stopped.
    Stopping,
}

/// The serving instance exited on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceExit {
    pub app: String,
    /// `exit code 3`, `killed by signal 9`.
    pub how: String,
    /// Its last stderr lines as an indented block after a newline, or empty.
    pub stderr: String,
}

impl std::fmt::Display for InstanceExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "app {} exited ({}){}", self.app, self.how, self.stderr)
    }
}

/// One app run from a local directory behind Maestro's proxy; see the module documentation.
pub struct LocalApp {
    dir: PathBuf,
    addr: SocketAddr,
    default_env: Vec<(String, String)>,
    extra_env: Vec<(String, String)>,
    on_notice: Box<dyn Fn(Notice) + Send + Sync>,
    /// The manifest as last read.
    loaded: Loaded,
    /// `loaded` was read by `start` and no instance used it yet: the first restart takes it
    /// rather than reading (and noticing) the same file again.
    loaded_unused: bool,
    /// Counts instances started; the release number their logs and events carry.
    generation: u64,
    logs: Arc<AppLogs>,
    events: Arc<AppEvents>,
    /// Ends the app events endpoint.
    events_stop: CancellationToken,
    http: reqwest::Client,
    routes: Arc<Routes>,
    proxy_stop: CancellationToken,
    proxy: JoinHandle<()>,
    shutdown: CancellationToken,
    current: Option<Instance>,
    /// An instance whose start was abandoned (the restart future was dropped before it was
    /// healthy); stopped by the next restart, or by `stop`.
    starting: Option<Starting>,
    /// Replaced instances being drained and stopped.
    retiring: TaskTracker,
}

/// A validated manifest and what it resolves to in the directory.
struct Loaded {
    manifest: AppManifest,
    /// URL prefix (no trailing '/') → absolute directory, as the proxy wants them.
    static_dirs: Vec<(String, PathBuf)>,
}

/// An instance started and not yet healthy.
struct Starting {
    child: Child,
    output: Option<LogTasks>,
    /// Its `PX_EVENTS_URL` secret, handed to the waiter once healthy.
    registration: Registration,
    port: u16,
}

/// The healthy instance, or one being retired.
struct Instance {
    /// The app's name when it started (a later manifest may rename it).
    app: String,
    generation: u64,
    backend: Arc<Backend>,
    waiter: Waiter,
}

impl LocalApp {
    /// Reads the app's manifest, opens the proxy on `settings.listen` (static files served,
    /// other requests answered 503 until an instance is healthy) and the app events endpoint.
    /// No instance runs until [`restart`](Self::restart). `shutdown` interrupts a restart.
    pub async fn start(
        settings: LocalSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, LocalError> {
        let given = settings.dir;
        let dir = match given.canonicalize() {
            Ok(dir) => dir,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(LocalError::NoManifest { dir: given });
            }
            Err(source) => return Err(LocalError::Directory { dir: given, source }),
        };
        let loaded = match Loaded::read(&dir, &*settings.on_notice) {
            // Said with the directory as the caller named it.
            Err(LocalError::NoManifest { .. }) => {
                return Err(LocalError::NoManifest { dir: given });
            }
            other => other?,
        };
        // The port before anything runs, so a taken port fails at once.
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| LocalError::Listen {
                    addr: settings.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| LocalError::Listen {
            addr: settings.listen,
            source,
        })?;
        let http = reqwest::Client::builder()
            // Health checks go to 127.0.0.1; an HTTP_PROXY in the environment must not catch them.
            .no_proxy()
            .build()
            .map_err(LocalError::HealthClient)?;
        let logs = Arc::new(AppLogs::new(&settings.logs_dir, LOG_ROTATION));

        // The same events endpoint as on a web server, so an app's `report(...)` shows in its
        // logs. There is no Beacon to forward events to: they are read and dropped.
        let events_listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(LocalError::EventsEndpoint)?;
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
        let events = Arc::new(AppEvents::new(
            events_listener
                .local_addr()
                .map_err(LocalError::EventsEndpoint)?,
            logs.clone(),
            events_tx,
        ));
        tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
        let events_stop = shutdown.child_token();
        tokio::spawn(events.clone().serve(events_listener, events_stop.clone()));

        let routes = Arc::new(Routes::default());
        let proxy = Proxy::new(
            routes.clone(),
            ProxySettings {
                drain: PROXY_DRAIN,
                ..ProxySettings::default()
            },
            Arc::new(ProxyMetrics::default()),
            AccessLog::disabled(),
        );
        let proxy_stop = CancellationToken::new();
        let serving = proxy.serve_http(listener, proxy_stop.clone());
        let proxy = tokio::spawn(async move {
            // Only a listener that can no longer accept ends the proxy early; say so, since
            // nothing else will.
            if let Err(e) = serving.await {
                tracing::error!(error = %e, "the local proxy stopped");
            }
        });

        let app = Self {
            dir,
            addr,
            default_env: settings.default_env,
            extra_env: settings.extra_env,
            on_notice: settings.on_notice,
            loaded,
            loaded_unused: true,
            generation: 0,
            logs,
            events,
            events_stop,
            http,
            routes,
            proxy_stop,
            proxy,
            shutdown,
            current: None,
            starting: None,
            retiring: TaskTracker::new(),
        };
        app.publish(None);
        Ok(app)
    }

    /// The app's directory, resolved.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the proxy listens (the port chosen when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a healthy instance takes the app's requests.
    pub fn is_serving(&self) -> bool {
        self.current.is_some()
    }

    /// The app's output and events, line by line, from now on (a slow reader is told how
    /// many lines it missed). Ends once the app is stopped and its last output read.
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.logs.follow()
    }

    /// Reads `app.toml` again and starts a new instance beside the serving one; once it is
    /// healthy the route switches to it and the old one is drained and stopped in the
    /// background. A manifest that does not read is an error and starts nothing; an instance
    /// that fails is [`RestartOutcome::Failed`]. Either way the old instance keeps serving;
    /// without one the proxy answers 503.
    ///
    /// Cancel safe: dropped before the new instance is healthy (the files changed again), that
    /// instance is left aside and stopped first thing by the next restart, or by `stop`.
    pub async fn restart(&mut self) -> Result<RestartOutcome, LocalError> {
        if let Some(abandoned) = self.starting.as_mut() {
            process::stop(&mut abandoned.child, STOP_GRACE).await;
            self.starting = None;
        }
        if self.shutdown.is_cancelled() {
            return Ok(RestartOutcome::Stopping);
        }
        if !std::mem::take(&mut self.loaded_unused) {
            self.loaded = Loaded::read(&self.dir, &*self.on_notice)?;
        }
        self.generation += 1;
        let generation = self.generation;
        let manifest = &self.loaded.manifest;
        let app = manifest.name.clone();
        let port = match free_port() {
            Ok(port) => port,
            Err(e) => return Ok(RestartOutcome::Failed(StartError::NoFreePort(e))),
        };
        // Locally a missing runtime is worth a notice; on a web server it fails the deploy.
        if let Err(unmet) = runtimes::check(manifest, &process::instance_path(&self.dir)).await {
            (self.on_notice)(Notice::RuntimeUnmet {
                app: app.clone(),
                unmet,
            });
        }
        let registration = self.events.register(&app, generation, INSTANCE);
        let mut extra_env: Vec<(String, String)> = self
            .default_env
            .iter()
            .filter(|(key, _)| !manifest.env.contains_key(key))
            .chain(&self.extra_env)
            .cloned()
            .collect();
        extra_env.extend(instance_env(
            INSTANCE,
            &registration.url,
            manifest.health.heartbeat_interval,
        ));
        let path = process::instance_path(&self.dir);
        let launch = Launch {
            app: &app,
            release: generation,
            dir: &self.dir,
            run: manifest.run.as_deref(),
            path: &path,
            env: &manifest.env,
            port: Some(port),
            extra_env,
        };
        // The app's [limits] as rlimits, as a web server without delegated cgroups gives them.
        let prefix: Vec<std::ffi::OsString> = Enforcer::Rlimits
            .command_prefix(&manifest.limits)
            .into_iter()
            .map(Into::into)
            .collect();
        let mut child = match process::spawn(&launch, &prefix) {
            Ok(child) => child,
            Err(source) => {
                let fix = match &manifest.run {
                    Some(_) => "check that /bin/sh exists",
                    None => "set `run` in app.toml or make `apprunner` an executable file",
                };
                return Ok(RestartOutcome::Failed(StartError::CannotStart {
                    app,
                    source,
                    fix,
                }));
            }
        };
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(stdout), Some(stderr)) => {
                Some(self.logs.attach(&app, generation, INSTANCE, stdout, stderr))
            }
            _ => None,
        };
        let starting = self.starting.insert(Starting {
            child,
            output,
            registration,
            port,
        });
        let healthy = tokio::select! {
            healthy = wait_healthy_or_stop(
                &mut starting.child,
                &mut starting.output,
                port,
                &self.loaded.manifest.health,
                &self.http,
                STOP_GRACE,
            ) => healthy,
            () = self.shutdown.cancelled() => {
                process::stop(&mut starting.child, STOP_GRACE).await;
                self.starting = None;
                return Ok(RestartOutcome::Stopping);
            }
        };
        // Set above, and cleared meanwhile only by the shutdown branch, which returned.
        let Some(started) = self.starting.take() else {
            return Ok(RestartOutcome::Stopping);
        };
        if let Err(failure) = healthy {
            if self.current.is_none() {
                // Static files are served as the new manifest says all the same.
                self.publish(None);
            }
            return Ok(RestartOutcome::Failed(StartError::NeverHealthy {
                failure: failure.to_string(),
                stderr: self.stderr_tail(&app, generation),
                app,
            }));
        }
        let instance = Instance {
            backend: Backend::new(
                &app,
                generation,
                SocketAddr::from(([127, 0, 0, 1], started.port)),
            ),
            waiter: spawn_waiter(
                started.child,
                Watch {
                    registration: started.registration,
                    heartbeat: None,
                    cgroup: None,
                    sandboxed: false,
                    stop_grace: STOP_GRACE,
                    output: started.output,
                },
            ),
            app: app.clone(),
            generation,
        };
        self.publish(Some(&instance.backend));
        if let Some(old) = self.current.replace(instance) {
            self.retiring.spawn(retire(old));
        }
        Ok(RestartOutcome::Serving { app })
    }

    /// Resolves when the serving instance exits on its own, with how and its last stderr
    /// lines; the proxy answers 503 from then on. Never resolves while no instance serves.
    /// Cancel safe.
    pub async fn exited(&mut self) -> InstanceExit {
        let Some(instance) = self.current.as_mut() else {
            return std::future::pending().await;
        };
        // The waiter reports once the instance's last output reached the logs.
        let Exit { status, .. } = (&mut instance.waiter.exited).await.unwrap_or_default();
        let app = instance.app.clone();
        let generation = instance.generation;
        self.current = None;
        self.publish(None);
        InstanceExit {
            how: status
                .as_ref()
                .map_or_else(|| "unknown exit".to_string(), process::describe_exit),
            stderr: self.stderr_tail(&app, generation),
            app,
        }
    }

    /// Stops everything: first the proxy (so no request reaches an instance being stopped,
    /// open ones get [`PROXY_DRAIN`]), then the instances (SIGTERM, [`STOP_GRACE`], SIGKILL),
    /// then the events endpoint. Replaced instances still draining get their deadline.
    pub async fn stop(mut self) {
        self.proxy_stop.cancel();
        if tokio::time::timeout(PROXY_DRAIN + STOP_GRACE, &mut self.proxy)
            .await
            .is_err()
        {
            (self.on_notice)(Notice::ProxySlowToStop);
        }
        if let Some(mut abandoned) = self.starting.take() {
            process::stop(&mut abandoned.child, STOP_GRACE).await;
        }
        if let Some(instance) = self.current.take() {
            stop_instance(instance).await;
        }
        self.events_stop.cancel();
        self.retiring.close();
        let _ = tokio::time::timeout(DRAIN_DEADLINE + STOP_GRACE, self.retiring.wait()).await;
    }

    /// Swaps in a route table that sends the local host names to `backend` (503 without one)
    /// and serves the manifest's static directories with its body limits.
    fn publish(&self, backend: Option<&Arc<Backend>>) {
        let manifest = &self.loaded.manifest;
        let name = &manifest.name;
        let route = Arc::new(
            AppRoute::new(
                name,
                self.generation,
                backend.into_iter().cloned().collect(),
                self.loaded.static_dirs.clone(),
            )
            .with_bodies(BodyPolicy::of(&manifest.http))
            .with_https(HttpsPolicy::of(&manifest.http)),
        );
        let mut table = RouteTable::default();
        for host in [
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            format!("{name}.localhost"),
        ] {
            table.by_host.insert(host, route.clone());
        }
        self.routes.store(table);
    }

    /// The instance's last stderr lines as an indented block after a newline, or nothing.
    fn stderr_tail(&self, app: &str, generation: u64) -> String {
        let tail = self.logs.stderr_tail(app, generation, FAILED_STDERR_LINES);
        if tail.is_empty() {
            return String::new();
        }
        let mut quoted = String::from("\nits last stderr lines:");
        for line in tail.lines() {
            quoted.push_str("\n  ");
            quoted.push_str(line);
        }
        quoted
    }
}

impl Drop for LocalApp {
    /// Dropped without [`stop`](LocalApp::stop) (an early return, a panic), the proxy and the
    /// events endpoint still close; the serving instance is stopped by its waiter once its
    /// handle is gone, and one still starting is killed with its `Child`.
    fn drop(&mut self) {
        self.proxy_stop.cancel();
        self.events_stop.cancel();
    }
}

impl Loaded {
    /// Reads and validates `dir/app.toml`, noticing static directories that do not exist.
    fn read(dir: &Path, on_notice: &dyn Fn(Notice)) -> Result<Self, LocalError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = String::new();
        let read = std::fs::File::open(&path).and_then(|file| {
            // One byte over the limit is enough for `parse` to say the file is too large.
            file.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text)
        });
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(LocalError::NoManifest {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(LocalError::ManifestNotUtf8 { path });
            }
            Err(source) => return Err(LocalError::ManifestUnreadable { path, source }),
        }
        let manifest = AppManifest::parse(&text)?;
        let static_dirs = manifest
            .http
            .static_dirs
            .iter()
            .map(|(prefix, relative)| {
                let joined = dir.join(relative);
                // Resolved now so that a missing directory is noticed at once (the proxy
                // resolves it again per request, to keep every request inside it).
                let resolved = joined.canonicalize().unwrap_or_else(|_| {
                    on_notice(Notice::MissingStaticDir {
                        prefix: prefix.clone(),
                        dir: relative.clone(),
                    });
                    joined
                });
                (prefix.trim_end_matches('/').to_string(), resolved)
            })
            .collect();
        Ok(Self {
            manifest,
            static_dirs,
        })
    }
}

/// Drains a replaced instance (it gets no new requests), then stops it.
async fn retire(old: Instance) {
    drain(&old.app, &[&old.backend], DRAIN_DEADLINE).await;
    stop_instance(old).await;
}

/// Stops an instance through its waiter and waits until it has exited.
async fn stop_instance(instance: Instance) {
    let Waiter { exited, stop } = instance.waiter;
    // A waiter whose process already exited has gone; its exit is still there to read.
    let _ = stop.send(STOP_GRACE);
    let _ = exited.await;
}

/// A port that was free a moment ago. The app binds it itself, so a race with another
/// program is possible but shows as a failed health check, fixed by the next restart.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
