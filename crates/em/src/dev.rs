//! `em dev`: run an app locally the way Maestro would, and restart it when its files change.
//!
//! The pieces are Maestro's own: the instance is started with [`process::spawn`] (the
//! AppRunner contract of docs/src/design/contracts.md: `PORT`, `$1`, the manifest's env, the app directory
//! as working directory), it takes traffic only after [`process::wait_healthy`], and the
//! Maestro [`Proxy`] sits in front on `127.0.0.1:<port>`, serving the `[http] static`
//! directories itself. So what works under `em dev` works on the platform.
//!
//! # Restarts
//!
//! A watcher task walks the directory every [`WATCH_INTERVAL`] and compares a fingerprint
//! (paths, sizes, times, inodes). Polling rather than inotify: it needs no new dependency,
//! works the same on every file system (network and container mounts included), and at the
//! bounded tree size ([`MAX_WATCH_ENTRIES`]) a walk costs milliseconds. On a change the
//! manifest is read again, a new instance starts on a new port beside the old one, and only
//! once it is healthy the route table is swapped and the old instance drained and stopped:
//! the same zero-downtime switch Maestro does, so a browser reloading while the developer
//! saves never sees an error. A new instance that fails leaves the old one serving; with no
//! old one the proxy answers 503 until a change brings a healthy one.
//!
//! # What is not watched
//!
//! Names skipped at any depth: [`SKIP_NAMES`] (version control, dependency and build caches),
//! editor swap and backup files ([`SKIP_PREFIXES`], [`SKIP_SUFFIXES`]), and the simple
//! patterns of the root `.gitignore` and `.emignore`: plain names (`dist/`, `.env`), `*suffix`
//! (`*.log`) and `prefix*` (`npm-debug.log*`). Patterns with a `/` inside, other globs and
//! `!` negations are not understood and watch more rather than less. A full gitignore matcher
//! would need a new crate; this covers what app templates and typical ignore files hold. Files
//! the app itself writes inside its directory (a SQLite database, uploads) must be ignored
//! this way, or every write restarts it.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt::Display;
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use px_maestro::app_events::{AppEvents, Registration};
use px_maestro::logs::{AppLogs, LogLine, LogTasks, Rotation, Stream};
use px_maestro::process::{self, Launch};
use px_maestro::proxy::{AccessLog, Proxy, ProxyMetrics, ProxySettings};
use px_maestro::routes::{AppRoute, Backend, RouteTable, Routes};
use px_proto::manifest::{AppManifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use tokio::process::Child;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::failure::{Failure, Result};

/// How often the directory is walked. Half a second feels immediate after a save, and even a
/// tree at [`MAX_WATCH_ENTRIES`] costs only a small fraction of it to stat.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// After a change is seen, the tree is walked again this much later until two walks agree, so
/// an editor's save in several steps (write a temp file, rename, chmod) causes one restart of
/// the finished files, not one of a half-written file.
pub const SETTLE_INTERVAL: Duration = Duration::from_millis(100);
/// Most extra walks waiting for the tree to settle (one second); a tree that keeps changing
/// (a build writing into it) is restarted for anyway rather than never.
pub const MAX_SETTLE_ROUNDS: u32 = 10;
/// Most files and directories watched. Beyond it a walk every [`WATCH_INTERVAL`] would cost
/// real CPU and memory (a fingerprint entry is about 100 bytes); such trees almost always hold
/// a dependency or build directory that belongs in `.emignore`, so watching stops with a
/// warning that says so.
pub const MAX_WATCH_ENTRIES: usize = 50_000;
/// Largest `.gitignore`/`.emignore` read; real ones are a few hundred bytes.
pub const MAX_IGNORE_FILE_BYTES: u64 = 64 * 1024;
/// Directory and file names never watched, at any depth: version control data, dependency
/// directories and caches change without the app's own code changing (or hold too many files
/// to walk twice a second), and `4913` is the probe file Vim writes before every save.
pub const SKIP_NAMES: &[&str] = &[
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    "__pycache__",
    "target",
    ".venv",
    "venv",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".tox",
    ".DS_Store",
    "4913",
];
/// Editors' lock files (Emacs `.#name`).
pub const SKIP_PREFIXES: &[&str] = &[".#"];
/// Editors' swap, backup and temporary files (Vim, Emacs, JetBrains), and Python bytecode.
pub const SKIP_SUFFIXES: &[&str] = &[
    "~",
    ".swp",
    ".swo",
    ".swx",
    ".pyc",
    "___jb_tmp___",
    "___jb_old___",
];
/// How long SIGTERM may take before the instance is killed, as the issue asks: enough for an
/// app to finish its requests and close files, short enough that Ctrl-C feels prompt.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a replaced instance may finish the requests it still serves before it is stopped.
/// Requests in development are short; a stuck one must not keep old instances piling up
/// while the developer keeps saving.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// A request that read the route table an instant before the swap still goes to the old
/// instance, and counts as in flight only once it is sent; waiting this long before looking
/// at the count lets such requests register, so none is cut by the stop.
const SWAP_SETTLE: Duration = Duration::from_millis(100);
/// How often a draining instance's in-flight count is checked.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// On Ctrl-C, open requests get this long to finish before the proxy closes them: a developer
/// wants the prompt back, and a request cut in development is one reload away.
pub const PROXY_DRAIN: Duration = Duration::from_secs(2);
/// How long to wait for a failed instance's last output to reach the tail before quoting it.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// Stderr lines quoted when an instance fails: enough for a Python or Node stack trace.
pub const LAST_STDERR_LINES: usize = 20;
/// The instance's log files live in a temporary directory and are never read (lines are shown
/// from memory); one small file per stream, started afresh when full, bounds that disk use.
const DEV_LOG_ROTATION: Rotation = Rotation {
    max_file_bytes: 1024 * 1024,
    keep_files: 0,
};
/// Prefix of the app's output lines, so they stand apart from what `em` says.
const APP_PREFIX: &str = "[app]";

/// Set for every instance `em dev` starts, so apps may turn on development conveniences
/// (verbose errors, template reloading).
const PX_DEV: (&str, &str) = ("PX_DEV", "1");
/// Defaults the manifest's env may override. `PYTHONUNBUFFERED` makes Python's `print` output
/// show as it happens rather than in 8 KiB blocks on a pipe; it changes nothing else.
const DEV_DEFAULT_ENV: &[(&str, &str)] = &[("PYTHONUNBUFFERED", "1")];

/// Runs the app in `dir` behind a local proxy on `127.0.0.1:port` until Ctrl-C or SIGTERM.
pub async fn dev(dir: &Path, port: u16) -> Result<()> {
    let given = dir;
    let dir = match dir.canonicalize() {
        Ok(dir) => dir,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_manifest(given)),
        Err(e) => {
            return Err(Failure::bad_app(format!(
                "cannot open {}: {e}; check the path and its permissions",
                given.display()
            )));
        }
    };
    let loaded = Loaded::read(&dir, given)?;

    // Signals first: from here on something runs that Ctrl-C must stop properly (the app runs
    // in its own process group, so the terminal's SIGINT never reaches it).
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone())?;

    // The port before the app, so a taken port fails at once rather than after a start.
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            return Err(Failure::failed(format!(
                "port {port} is taken; pass --port with a free one, e.g. `em dev --port {}`",
                port.wrapping_add(1).max(1024)
            )));
        }
        Err(e) => {
            return Err(Failure::failed(format!(
                "cannot listen on 127.0.0.1:{port}: {e}; pass --port with a port above 1023"
            )));
        }
    };
    // `--port 0` asks for any free port; say the one it got.
    let port = listener.local_addr().map_or(port, |a| a.port());

    let log_dir = tempfile::Builder::new()
        .prefix("em-dev-logs-")
        .tempdir()
        .map_err(|e| {
            Failure::failed(format!(
                "cannot create a temporary directory for the app's logs: {e}; check TMPDIR"
            ))
        })?;
    let logs = Arc::new(AppLogs::new(log_dir.path(), DEV_LOG_ROTATION));
    let printer = tokio::spawn(print_output(logs.follow()));
    let http = reqwest::Client::builder()
        // Health checks go to 127.0.0.1; an HTTP_PROXY in the environment must not catch them.
        .no_proxy()
        .build()
        .map_err(|e| Failure::failed(format!("cannot set up the health check client: {e}")))?;

    // The same events endpoint as on a web server, so `report(...)` in the app prints here.
    // Heartbeats are accepted but not enforced: a breakpoint in a debugger would trip them.
    let events_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| Failure::failed(format!("cannot open the app events endpoint: {e}")))?;
    let (events_tx, mut events_rx) = mpsc::channel(px_maestro::supervisor::EVENT_QUEUE);
    let events = Arc::new(AppEvents::new(
        events_listener
            .local_addr()
            .map_err(|e| Failure::failed(format!("app events endpoint: {e}")))?,
        logs.clone(),
        events_tx,
    ));
    // Events are printed through the logs; there is no Beacon to forward them to.
    tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    tokio::spawn(
        events
            .clone()
            .serve(events_listener, shutdown.child_token()),
    );

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
    let proxy_task = tokio::spawn(proxy.serve_http(listener, proxy_stop.clone()));

    // The first fingerprint before the first start, so an edit made while it starts counts.
    let changes = match fingerprint_in_background(dir.clone()).await {
        Ok(first) => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(watch_files(dir.clone(), first, tx));
            Some(rx)
        }
        Err(e) => {
            warn(e.warning(&dir));
            None
        }
    };

    let session = Session {
        dir,
        port,
        logs: logs.clone(),
        events,
        http,
        routes,
        shutdown: shutdown.clone(),
        retiring: TaskTracker::new(),
    };
    // Static files are served and other paths answer 503 while the first instance starts.
    session.publish(&loaded, 0, None);
    let current = session.run(loaded, changes).await;

    // Stop: first the proxy (so no request reaches an instance being stopped), then the apps.
    proxy_stop.cancel();
    if tokio::time::timeout(PROXY_DRAIN + STOP_GRACE, proxy_task)
        .await
        .is_err()
    {
        warn("the proxy did not stop in time; stopping the app anyway");
    }
    if let Some(mut instance) = current {
        process::stop(&mut instance.child, STOP_GRACE).await;
    }
    session.retiring.close();
    let _ = tokio::time::timeout(DRAIN_DEADLINE + STOP_GRACE, session.retiring.wait()).await;
    // The printer ends once every reader has reached the end of its pipe and the logs are gone.
    drop(session);
    drop(logs);
    let _ = tokio::time::timeout(OUTPUT_DRAIN, printer).await;
    say("stopped");
    Ok(())
}

fn no_manifest(dir: &Path) -> Failure {
    Failure::bad_app(format!(
        "no {MANIFEST_FILE} in {}; run `em init` first",
        dir.display()
    ))
}

/// Cancels `shutdown` on the first Ctrl-C (SIGINT) or SIGTERM. The handlers are installed
/// before this returns, so a signal arriving at any later point is caught.
fn watch_signals(shutdown: CancellationToken) -> Result<()> {
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Failure::failed(format!("cannot catch Ctrl-C and SIGTERM: {e}")))
    };
    let mut interrupt = install(SignalKind::interrupt())?;
    let mut terminate = install(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        shutdown.cancel();
    });
    Ok(())
}

/// A validated manifest and what it resolves to in the directory.
struct Loaded {
    manifest: AppManifest,
    /// URL prefix (no trailing '/') → absolute directory, as the proxy wants them.
    static_dirs: Vec<(String, PathBuf)>,
}

impl Loaded {
    /// Reads and validates `dir/app.toml`; `shown` is the directory as the user named it.
    fn read(dir: &Path, shown: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = String::new();
        let read = std::fs::File::open(&path).and_then(|file| {
            // One byte over the limit is enough for `parse` to say the file is too large.
            file.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text)
        });
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_manifest(shown)),
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(Failure::bad_app(format!(
                    "{} is not UTF-8 text; save it as UTF-8",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(Failure::bad_app(format!(
                    "cannot read {}: {e}; check its permissions",
                    path.display()
                )));
            }
        }
        let manifest = AppManifest::parse(&text).map_err(|e| Failure::bad_app(e.to_string()))?;
        let static_dirs = manifest
            .http
            .static_dirs
            .iter()
            .map(|(prefix, relative)| {
                let joined = dir.join(relative);
                // Resolved now so that a missing directory is reported at once (the proxy
                // resolves it again per request, to keep every request inside it).
                let resolved = joined.canonicalize().unwrap_or_else(|_| {
                    warn(format!(
                        "static directory {relative:?} for {prefix} does not exist; create it (requests under {prefix} answer 404 until then)"
                    ));
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

/// One running instance.
struct Instance {
    /// The app's name when it started (a later manifest may rename it).
    app: String,
    child: Child,
    backend: Arc<Backend>,
    generation: u64,
    /// The readers of its output, to wait for before quoting its last lines.
    output: Option<LogTasks>,
    /// Its `PX_EVENTS_URL` secret, valid while the instance is kept.
    _events: Registration,
}

/// How an attempt to start an instance ended.
enum Started {
    Ready(Box<Instance>),
    /// It did not become healthy; the message says why, with its last stderr lines.
    Failed(String),
    /// A file changed (the path) or `em dev` is stopping (`None`) before it was healthy.
    Interrupted(Option<PathBuf>),
}

/// Why the next instance is started.
enum Trigger {
    First,
    Changed(PathBuf),
}

struct Session {
    dir: PathBuf,
    port: u16,
    logs: Arc<AppLogs>,
    events: Arc<AppEvents>,
    http: reqwest::Client,
    routes: Arc<Routes>,
    shutdown: CancellationToken,
    /// Replaced instances being drained and stopped.
    retiring: TaskTracker,
}

impl Session {
    /// Starts instances, on start-up and on every change, until `shutdown`; returns the one
    /// serving at that moment for the caller to stop after the proxy.
    async fn run(
        &self,
        mut loaded: Loaded,
        mut changes: Option<mpsc::Receiver<PathBuf>>,
    ) -> Option<Instance> {
        let mut current: Option<Instance> = None;
        let mut generation = 0;
        let mut announced = false;
        let mut pending = Some(Trigger::First);
        loop {
            // A signal during the previous step: do not start an instance only to stop it.
            if self.shutdown.is_cancelled() {
                return current;
            }
            if let Some(trigger) = pending.take() {
                if let Trigger::Changed(_) = trigger {
                    match Loaded::read(&self.dir, &self.dir) {
                        Ok(fresh) => loaded = fresh,
                        Err(e) => {
                            warn(format!(
                                "{e}{}",
                                if current.is_some() {
                                    " (the running instance keeps serving)"
                                } else {
                                    ""
                                }
                            ));
                            continue;
                        }
                    }
                }
                generation += 1;
                match self.start(&loaded, generation, &mut changes).await {
                    Started::Ready(instance) => {
                        self.publish(&loaded, generation, Some(&instance.backend));
                        if let Some(old) = current.replace(*instance) {
                            self.retiring.spawn(retire(old));
                        }
                        match trigger {
                            Trigger::Changed(path) if announced => {
                                say(format!("restarted (changed: {})", path.display()));
                            }
                            _ => {
                                say(format!(
                                    "serving {} at http://localhost:{}/ (Ctrl-C to stop)",
                                    loaded.manifest.name, self.port
                                ));
                                announced = true;
                            }
                        }
                    }
                    Started::Failed(why) => {
                        if current.is_some() {
                            warn(format!(
                                "{why}\nfix it and save; the running instance keeps serving meanwhile"
                            ));
                        } else {
                            // Static files are served as the new manifest says all the same.
                            self.publish(&loaded, generation, None);
                            warn(format!(
                                "{why}\nfix it and save; until then the proxy answers 503"
                            ));
                        }
                    }
                    Started::Interrupted(Some(path)) => pending = Some(Trigger::Changed(path)),
                    Started::Interrupted(None) => return current,
                }
                continue;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return current,
                status = exited(&mut current) => {
                    self.publish(&loaded, generation, None);
                    if let Some(gone) = current.take() {
                        self.report_exit(gone, &status).await;
                    }
                }
                path = next_change(&mut changes) => pending = Some(Trigger::Changed(path)),
            }
        }
    }

    /// Starts one instance and waits until it is healthy, a file changes, or `em dev` stops.
    async fn start(
        &self,
        loaded: &Loaded,
        generation: u64,
        changes: &mut Option<mpsc::Receiver<PathBuf>>,
    ) -> Started {
        let manifest = &loaded.manifest;
        let app = manifest.name.as_str();
        let port = match free_port() {
            Ok(port) => port,
            Err(e) => return Started::Failed(format!("no free port for the app: {e}")),
        };
        // A missing runtime is worth a warning here, and fails the deploy on a web server.
        if let Err(unmet) =
            px_maestro::runtimes::check(manifest, &process::instance_path(&self.dir)).await
        {
            warn(format!(
                "{app} {unmet}; it may not start here, and web servers without it refuse it"
            ));
        }
        let registration = self.events.register(app, generation, 1);
        let mut extra_env: Vec<(String, String)> = DEV_DEFAULT_ENV
            .iter()
            .filter(|(k, _)| !manifest.env.contains_key(*k))
            .chain([&PX_DEV, &("PX_INSTANCE", "1")])
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        extra_env.push(("PX_EVENTS_URL".into(), registration.url.clone()));
        extra_env.push((
            "PX_HEARTBEAT_INTERVAL".into(),
            px_maestro::supervisor::format_seconds(manifest.health.heartbeat_interval),
        ));
        let launch = Launch {
            app,
            release: generation,
            dir: &self.dir,
            run: manifest.run.as_deref(),
            env: &manifest.env,
            port,
            extra_env,
        };
        // The app's [limits] as rlimits, as a web server without delegated cgroups gives them.
        let prefix = px_maestro::limits::Enforcer::Rlimits.command_prefix(&manifest.limits);
        let mut child = match process::spawn(&launch, &prefix) {
            Ok(child) => child,
            Err(e) => {
                let fix = match &manifest.run {
                    Some(_) => "check that /bin/sh exists",
                    None => "set `run` in app.toml or make `apprunner` an executable file",
                };
                return Started::Failed(format!("cannot start app {app}: {e}; {fix}"));
            }
        };
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(stdout), Some(stderr)) => {
                Some(self.logs.attach(app, generation, 1, stdout, stderr))
            }
            _ => None,
        };
        let outcome = tokio::select! {
            healthy = process::wait_healthy(&mut child, port, &manifest.health, &self.http) => Ok(healthy),
            () = self.shutdown.cancelled() => Err(None),
            path = next_change(changes) => Err(Some(path)),
        };
        match outcome {
            Ok(Ok(())) => Started::Ready(Box::new(Instance {
                app: app.to_string(),
                child,
                backend: Backend::new(
                    app,
                    generation,
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                ),
                generation,
                output,
                _events: registration,
            })),
            Ok(Err(failure)) => {
                process::stop(&mut child, STOP_GRACE).await;
                // Let the readers reach the end of its output, so the quote holds its last words.
                if let Some(output) = output {
                    let _ = tokio::time::timeout(OUTPUT_DRAIN, output.wait()).await;
                }
                Started::Failed(format!(
                    "app {app} failed to start: {failure}{}",
                    self.stderr_tail(app, generation)
                ))
            }
            Err(interrupt) => {
                process::stop(&mut child, STOP_GRACE).await;
                Started::Interrupted(interrupt)
            }
        }
    }

    /// Says that the serving instance exited on its own, with its last stderr lines.
    async fn report_exit(
        &self,
        gone: Instance,
        status: &std::io::Result<std::process::ExitStatus>,
    ) {
        let how = status
            .as_ref()
            .map_or_else(|_| "unknown exit".to_string(), process::describe_exit);
        if let Some(output) = gone.output {
            let _ = tokio::time::timeout(OUTPUT_DRAIN, output.wait()).await;
        }
        warn(format!(
            "app {} exited ({how}){}\nfix it and save a file to start it again; until then the proxy answers 503",
            gone.app,
            self.stderr_tail(&gone.app, gone.generation)
        ));
    }

    /// The instance's last stderr lines as an indented block after a newline, or nothing.
    fn stderr_tail(&self, app: &str, generation: u64) -> String {
        let tail = self.logs.stderr_tail(app, generation, LAST_STDERR_LINES);
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

    /// Swaps in a route table that sends the local host names to `backend` (503 without one)
    /// and serves the manifest's static directories.
    fn publish(&self, loaded: &Loaded, generation: u64, backend: Option<&Arc<Backend>>) {
        let name = &loaded.manifest.name;
        let route = Arc::new(AppRoute::new(
            name,
            generation,
            backend.into_iter().cloned().collect(),
            loaded.static_dirs.clone(),
        ));
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
}

/// Waits for the serving instance to exit on its own; never resolves without one.
async fn exited(current: &mut Option<Instance>) -> std::io::Result<std::process::ExitStatus> {
    match current.as_mut() {
        // `Child::wait` is cancel safe: the select may drop this future at any time.
        Some(instance) => instance.child.wait().await,
        None => std::future::pending().await,
    }
}

/// The next changed path; never resolves once watching has stopped.
async fn next_change(changes: &mut Option<mpsc::Receiver<PathBuf>>) -> PathBuf {
    loop {
        let Some(rx) = changes.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Some(path) => return path,
            // The watcher gave up (and said why); keep serving without it.
            None => *changes = None,
        }
    }
}

/// Drains a replaced instance (it gets no new requests), then stops it.
async fn retire(mut old: Instance) {
    tokio::time::sleep(SWAP_SETTLE).await;
    let deadline = Instant::now() + DRAIN_DEADLINE;
    while old.backend.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    process::stop(&mut old.child, STOP_GRACE).await;
}

/// A port that was free a moment ago. The app binds it itself, so a race with another
/// program is possible but shows as a failed health check, fixed by the next save.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Prints the app's output lines, stdout to stdout and stderr to stderr, until the logs end.
async fn print_output(mut lines: broadcast::Receiver<LogLine>) {
    loop {
        match lines.recv().await {
            Ok(line) => {
                // A closed terminal must not take `em dev` down (`println!` would panic).
                let _ = match line.stream {
                    Stream::Stdout | Stream::Event => {
                        writeln!(std::io::stdout().lock(), "{APP_PREFIX} {}", line.line)
                    }
                    Stream::Stderr => {
                        writeln!(std::io::stderr().lock(), "{APP_PREFIX} {}", line.line)
                    }
                };
            }
            Err(broadcast::error::RecvError::Lagged(skipped)) => warn(format!(
                "{skipped} lines of app output were not shown; the terminal is slower than the app"
            )),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One line of what `em dev` does, on stdout.
fn say(line: impl Display) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// One problem `em dev` lives with, on stderr.
fn warn(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "em: {line}");
}

// ---- watching ----

/// One watched entry as last seen. Directories count by presence only: their times change
/// whenever an entry inside does, which the entry itself already shows, and the path named
/// in "restarted (changed: …)" should be the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Dir,
    Other {
        len: u64,
        mtime: (i64, i64),
        /// Catches a chmod (an `apprunner` made executable) and same-size rewrites within
        /// one mtime tick.
        ctime: (i64, i64),
        /// Catches an editor's save by rename.
        ino: u64,
    },
}

/// Relative path → stamp of every watched entry.
type Fingerprint = BTreeMap<PathBuf, Stamp>;

#[derive(Debug)]
enum WalkError {
    TooMany,
    Failed(String),
}

impl WalkError {
    fn warning(&self, dir: &Path) -> String {
        match self {
            WalkError::TooMany => format!(
                "{} holds more than {MAX_WATCH_ENTRIES} files and directories, too many to watch; not restarting on changes (leave dependency and build directories out with .emignore, or restart em dev by hand)",
                dir.display()
            ),
            WalkError::Failed(e) => format!(
                "cannot watch {} for changes ({e}); not restarting on changes (restart em dev by hand)",
                dir.display()
            ),
        }
    }
}

/// What the walk leaves out; see the module documentation.
#[derive(Debug, Default)]
struct Skip {
    names: HashSet<OsString>,
    prefixes: Vec<Vec<u8>>,
    suffixes: Vec<Vec<u8>>,
}

impl Skip {
    fn new() -> Self {
        Self {
            names: SKIP_NAMES.iter().map(OsString::from).collect(),
            prefixes: SKIP_PREFIXES
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
            suffixes: SKIP_SUFFIXES
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        }
    }

    /// The built-in rules plus the simple patterns of the root `.gitignore` and `.emignore`,
    /// read afresh on every walk (they are small, and editing them should take effect).
    fn for_dir(dir: &Path) -> Self {
        let mut skip = Self::new();
        for file in [".gitignore", px_bundle::EMIGNORE_FILE] {
            let mut text = String::new();
            let read = std::fs::File::open(dir.join(file))
                .and_then(|f| f.take(MAX_IGNORE_FILE_BYTES).read_to_string(&mut text));
            if read.is_ok() {
                text.lines().for_each(|line| skip.add_pattern(line));
            }
        }
        skip
    }

    fn add_pattern(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            return;
        }
        // `/name` (anchored) and `name/` (directories only) are taken as plain names: at worst
        // a same-named entry deeper down is not watched.
        let pattern = line.trim_start_matches('/').trim_end_matches('/');
        if pattern.is_empty() || pattern.contains('/') || pattern.contains(['?', '[', '\\']) {
            return;
        }
        match pattern.matches('*').count() {
            0 => {
                self.names.insert(OsString::from(pattern));
            }
            1 if pattern.len() > 1 && pattern.starts_with('*') => {
                self.suffixes.push(pattern.as_bytes()[1..].to_vec());
            }
            1 if pattern.len() > 1 && pattern.ends_with('*') => {
                self.prefixes
                    .push(pattern.as_bytes()[..pattern.len() - 1].to_vec());
            }
            _ => {}
        }
    }

    fn skips(&self, name: &OsStr) -> bool {
        // The manifest always counts, whatever an ignore file says.
        if name == MANIFEST_FILE {
            return false;
        }
        let bytes = name.as_bytes();
        self.names.contains(name)
            || self.prefixes.iter().any(|p| bytes.starts_with(p))
            || self.suffixes.iter().any(|s| bytes.ends_with(s))
    }
}

/// Walks `dir` (without following symlinks, iteratively so depth cannot overflow the stack).
/// Entries that vanish or cannot be read during the walk are left out: the next walk sees
/// the tree again.
fn fingerprint(dir: &Path) -> std::result::Result<Fingerprint, WalkError> {
    walk(dir, MAX_WATCH_ENTRIES)
}

/// [`fingerprint`] with the entry limit as a parameter, so tests need not make 50 000 files.
fn walk(dir: &Path, max_entries: usize) -> std::result::Result<Fingerprint, WalkError> {
    let skip = Skip::for_dir(dir);
    let mut found = Fingerprint::new();
    let mut pending = vec![PathBuf::new()];
    let mut first = true;
    while let Some(relative) = pending.pop() {
        let entries = match std::fs::read_dir(dir.join(&relative)) {
            Ok(entries) => entries,
            // The directory itself gone or unreadable is worth saying; a subdirectory that
            // vanished mid-walk is not.
            Err(e) if first => return Err(WalkError::Failed(e.to_string())),
            Err(_) => continue,
        };
        first = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if skip.skips(&name) {
                continue;
            }
            // `DirEntry::metadata` does not follow symlinks, so a link loop is one entry.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if found.len() >= max_entries {
                return Err(WalkError::TooMany);
            }
            let path = relative.join(&name);
            if meta.is_dir() {
                found.insert(path.clone(), Stamp::Dir);
                pending.push(path);
            } else {
                found.insert(
                    path,
                    Stamp::Other {
                        len: meta.len(),
                        mtime: (meta.mtime(), meta.mtime_nsec()),
                        ctime: (meta.ctime(), meta.ctime_nsec()),
                        ino: meta.ino(),
                    },
                );
            }
        }
    }
    Ok(found)
}

/// [`fingerprint`] on the blocking pool: a walk is many `stat` calls.
async fn fingerprint_in_background(dir: PathBuf) -> std::result::Result<Fingerprint, WalkError> {
    tokio::task::spawn_blocking(move || fingerprint(&dir))
        .await
        .map_err(|e| WalkError::Failed(e.to_string()))?
}

/// The first path (in sorted order) that was added, removed or changed.
fn first_difference(old: &Fingerprint, new: &Fingerprint) -> Option<PathBuf> {
    let changed = new
        .iter()
        .filter(|(path, stamp)| old.get(*path) != Some(stamp))
        .map(|(path, _)| path)
        .next();
    let removed = old.keys().find(|path| !new.contains_key(*path));
    match (changed, removed) {
        (Some(a), Some(b)) => Some(a.min(b).clone()),
        (a, b) => a.or(b).cloned(),
    }
}

/// Walks `dir` every [`WATCH_INTERVAL`] and sends the first changed path of each change.
/// The channel holds one change: while one waits, later ones are dropped, since the restart
/// it triggers reads the files after them anyway. Ends (with a warning) when the tree grows
/// too large or cannot be read, and when the receiver is gone.
async fn watch_files(dir: PathBuf, mut last: Fingerprint, changes: mpsc::Sender<PathBuf>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if changes.is_closed() {
            return;
        }
        let mut now = match fingerprint_in_background(dir.clone()).await {
            Ok(now) => now,
            Err(e) => {
                warn(e.warning(&dir));
                return;
            }
        };
        let Some(path) = first_difference(&last, &now) else {
            continue;
        };
        for _ in 0..MAX_SETTLE_ROUNDS {
            tokio::time::sleep(SETTLE_INTERVAL).await;
            match fingerprint_in_background(dir.clone()).await {
                Ok(again) if again == now => break,
                Ok(again) => now = again,
                Err(e) => {
                    warn(e.warning(&dir));
                    return;
                }
            }
        }
        last = now;
        match changes.try_send(path) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn ignore_patterns_skip_names_suffixes_and_prefixes_but_never_the_manifest() {
        let mut skip = Skip::new();
        for line in [
            "# comment",
            "dist/",
            "/.env",
            "*.log",
            "npm-debug.log*",
            "!keep.log",
            "data/*.db",
            "*",
            "app.toml",
        ] {
            skip.add_pattern(line);
        }
        for skipped in [
            "dist",
            ".env",
            "x.log",
            "npm-debug.log.1",
            "node_modules",
            ".#a.py",
            "a.py~",
            "4913",
        ] {
            assert!(skip.skips(OsStr::new(skipped)), "{skipped}");
        }
        for kept in ["server.py", "data", "x.db", "keep", "app.toml", "public"] {
            assert!(!skip.skips(OsStr::new(kept)), "{kept}");
        }
    }

    #[test]
    fn the_fingerprint_sees_edits_additions_and_removals_but_not_skipped_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("app.toml"), "name = \"x\"").unwrap();
        std::fs::create_dir_all(d.join("src/deep")).unwrap();
        std::fs::write(d.join("src/deep/a.py"), "1").unwrap();
        std::fs::create_dir_all(d.join("node_modules/pkg")).unwrap();
        std::fs::write(d.join(".gitignore"), "*.sqlite\n").unwrap();
        let first = fingerprint(d).unwrap();
        assert!(first.contains_key(Path::new("src/deep/a.py")));
        assert!(!first.keys().any(|p| p.starts_with("node_modules")));

        std::fs::write(d.join("node_modules/pkg/index.js"), "x").unwrap();
        std::fs::write(d.join("data.sqlite"), "x").unwrap();
        std::fs::write(d.join("src/deep/a.py~"), "x").unwrap();
        assert_eq!(first_difference(&first, &fingerprint(d).unwrap()), None);

        std::fs::write(d.join("src/deep/a.py"), "22").unwrap();
        let edited = fingerprint(d).unwrap();
        assert_eq!(
            first_difference(&first, &edited),
            Some(PathBuf::from("src/deep/a.py"))
        );
        std::fs::remove_file(d.join("src/deep/a.py")).unwrap();
        std::fs::write(d.join("src/new.py"), "").unwrap();
        let now = fingerprint(d).unwrap();
        assert_eq!(
            first_difference(&edited, &now),
            Some(PathBuf::from("src/deep/a.py"))
        );
        assert_eq!(first_difference(&now, &now), None);
    }

    #[test]
    fn too_many_entries_stop_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("many");
        std::fs::create_dir(&d).unwrap();
        for i in 0..10 {
            std::fs::File::create(d.join(i.to_string())).unwrap();
        }
        // The directory and its ten files.
        assert_eq!(walk(dir.path(), 11).unwrap().len(), 11);
        assert!(matches!(walk(dir.path(), 10), Err(WalkError::TooMany)));
    }
}
