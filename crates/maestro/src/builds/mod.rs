//! Builds on this node (docs/src/design/builds.md): the `builds` of each applied assignment,
//! run by one task, one at a time (`MAX_CONCURRENT_BUILDS`) from a bounded queue, each at most
//! once per (app, build) unless the assignment drops it and adds it again.
//!
//! One build: the source bundle downloaded (size and SHA-256 checked) and unpacked under
//! `state_dir/builds/`, `px_build::build` with the `[build]` settings, every output line
//! forwarded to Beacon as a `build` log line and written to `log_dir/<app>/build.log`, then
//! the layers apprepo lacks uploaded (`HEAD`, then `PUT` streamed from the archive) and the
//! build finished (`POST .../finish`), or its failure reported (`POST .../fail`). The events
//! `build_started`, `build_finished` and `build_failed` go to Beacon, and each app's latest
//! build is in the node report. A finish apprepo answers 409 (a newer upload superseded the
//! build, or it ended before) is no failure of the build. The build directory is removed
//! afterwards; the builder's cache is kept.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use px_build::{BuildError, BuildRequest, BuilderSettings, Built};
use px_proto::api::Release;
use px_proto::build::{
    BuildFailed, BuildFinished, BuildOrder, BuildOutput, BuildProgress, BuildStatus, LayerRef,
};
use px_proto::link::{NodeEvent, NodeEventKind};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BuildConfig, DEFAULT_CACHE_SUBDIR, DEFAULT_TOOLS_SUBDIR, SandboxConfig};
use crate::delivery::{Attempt, LogTail, authorized, message_of, with_retries};
use crate::logs::AppLogs;
use crate::supervisor::{Fetch, MAX_BUNDLE_BYTES, fetch};

/// Where the runner reports each build's progress: the supervisor's node report.
pub(crate) type ReportStatus = Arc<dyn Fn(BuildStatus) + Send + Sync>;

/// Builds running at once on one node. One: a build is bounded by its limits, but two would
/// share the node's cores and disk with each other and with the apps this node serves.
pub(crate) const MAX_CONCURRENT_BUILDS: usize = 1;
/// Builds waiting for their turn. Beacon places at most one pending build per app on a node,
/// and spreads them over the nodes that build; an order past this waits in the assignment and
/// is queued when a place frees.
pub(crate) const MAX_QUEUED_BUILDS: usize = 64;
/// Output lines sent with a `build_failed` event: the installer's or the step's verdict,
/// which is what `em deploy` shows (the whole log stays with the build).
pub(crate) const FAILED_BUILD_LINES: usize = 20;
/// Longest failure reason sent to apprepo, in characters: its own limit for one sentence.
pub(crate) const MAX_FAIL_REASON_CHARS: usize = 1000;
/// Directory of the builds in progress, in `state_dir`: emptied at start, each build's part
/// removed when it ends.
pub(crate) const BUILDS_DIR: &str = "builds";

/// What the build runner takes from Maestro's configuration.
pub(crate) struct BuildSettings {
    pub(crate) enabled: bool,
    /// This node's name, for events a person reads.
    pub(crate) node_name: String,
    /// `state_dir/builds`.
    pub(crate) dir: PathBuf,
    /// A token with the repository's `build` role: it downloads sources, uploads layers and
    /// finishes builds.
    pub(crate) repository_token: Option<String>,
    /// What apprepo's certificate is checked against (`None`: the system's roots).
    pub(crate) repository_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) builder: BuilderSettings,
    /// Where the apps' uids come from: a build runs as its app's uid outside its sandbox
    /// wherever the app sandbox gives apps uids of their own; `None` (and a Maestro that
    /// cannot switch users): as the builder's default.
    pub(crate) app_uids: Option<Arc<crate::sandbox::AppSandbox>>,
}

impl BuildSettings {
    /// The runner's settings from `[build]`, with builds under `state_dir/builds/` and the
    /// caches and tools under `state_dir` unless configured elsewhere.
    pub(crate) fn from_config(
        config: &BuildConfig,
        node_name: &str,
        state_dir: &Path,
        repository_token: Option<String>,
        repository_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let dir = state_dir.join(BUILDS_DIR);
        let builder = BuilderSettings {
            work_dir: dir.join("work"),
            cache_dir: config
                .cache_dir
                .clone()
                .unwrap_or_else(|| state_dir.join(DEFAULT_CACHE_SUBDIR)),
            runtimes: px_build::RuntimeSources {
                dirs: vec![config.runtimes_dir.clone()],
                discover_host: config.discover_host_runtimes,
            },
            tools_dir: config
                .tools_dir
                .clone()
                .unwrap_or_else(|| state_dir.join(DEFAULT_TOOLS_SUBDIR)),
            sandbox: match config.sandbox {
                SandboxConfig::Bubblewrap => px_build::Sandbox::Bubblewrap,
                SandboxConfig::None => px_build::Sandbox::None,
            },
            limits: px_build::BuildLimits {
                time: config.time_limit,
                memory_bytes: config.memory_limit.0,
                disk_bytes: config.disk_limit.0,
                processes: config.process_limit,
                output_bytes: config.output_limit.0,
            },
            ca_file: config.ca_file.clone(),
            python_index: config.python_index.clone(),
            npm_registry: config.npm_registry.clone(),
        };
        Self {
            enabled: config.enabled,
            node_name: node_name.to_string(),
            dir,
            repository_token,
            repository_tls,
            builder,
            app_uids: None,
        }
    }
}

/// The handle the link applies assignments through.
pub(crate) struct Builds {
    wanted: Arc<Mutex<Wanted>>,
    changed: Arc<Notify>,
}

/// The builds the latest assignment holds, and those assignments dropped since the runner
/// last looked: kept apart, so a build dropped and added again between two looks is seen as
/// both, and runs again.
#[derive(Default)]
struct Wanted {
    orders: Vec<BuildOrder>,
    dropped: BTreeSet<Key>,
}

impl Builds {
    /// Starts the runner's task on `tracker`; it stops with `shutdown`, ending a running build.
    pub(crate) fn start(
        settings: BuildSettings,
        report: ReportStatus,
        logs: Arc<AppLogs>,
        events: mpsc::Sender<NodeEvent>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let http = crate::delivery::repository_client(settings.repository_tls.clone());
        let ctx = Arc::new(Ctx {
            settings,
            report,
            logs,
            events,
            http,
        });
        let builds = Arc::new(Self {
            wanted: Arc::new(Mutex::new(Wanted::default())),
            changed: Arc::new(Notify::new()),
        });
        tracker.spawn(run(
            ctx,
            builds.wanted.clone(),
            builds.changed.clone(),
            shutdown,
        ));
        builds
    }

    /// The builds of the latest assignment: new ones are queued, dropped ones forgotten (and
    /// ended, if running).
    pub(crate) fn apply(&self, orders: &[BuildOrder]) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if wanted.orders.as_slice() == orders {
            return;
        }
        let kept: BTreeSet<Key> = orders.iter().map(key).collect();
        let dropped: Vec<Key> = wanted
            .orders
            .iter()
            .map(key)
            .filter(|k| !kept.contains(k))
            .collect();
        wanted.dropped.extend(dropped);
        wanted.orders = orders.to_vec();
        drop(wanted);
        // A permit is stored when the runner is busy, so no change is missed.
        self.changed.notify_one();
    }
}

/// What every build shares.
struct Ctx {
    settings: BuildSettings,
    report: ReportStatus,
    logs: Arc<AppLogs>,
    events: mpsc::Sender<NodeEvent>,
    http: reqwest::Client,
}

type Key = (String, u64);

fn key(order: &BuildOrder) -> Key {
    (order.app.clone(), order.build)
}

/// The runner: owns the queue, what ran, and what runs.
async fn run(
    ctx: Arc<Ctx>,
    wanted: Arc<Mutex<Wanted>>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    // What a killed Maestro left half-built is of no use: the builds are level-triggered and
    // run again from the assignment.
    let dir = ctx.settings.dir.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    // Builds taken from an assignment (queued, run or running), not taken again until an
    // assignment drops them.
    let mut taken: BTreeSet<Key> = BTreeSet::new();
    let mut queue: VecDeque<BuildOrder> = VecDeque::new();
    let mut running: JoinSet<()> = JoinSet::new();
    // The running builds, by task, with what ends each.
    let mut stops: HashMap<tokio::task::Id, (Key, CancellationToken)> = HashMap::new();
    loop {
        let (current, dropped) = {
            let mut wanted = wanted.lock().unwrap_or_else(|p| p.into_inner());
            (wanted.orders.clone(), std::mem::take(&mut wanted.dropped))
        };
        let kept: BTreeSet<Key> = current.iter().map(key).collect();
        let gone = |k: &Key| dropped.contains(k) || !kept.contains(k);
        taken.retain(|k| !gone(k));
        queue.retain(|o| !gone(&key(o)));
        for (k, stop) in stops.values() {
            if gone(k) && !stop.is_cancelled() {
                tracing::info!(app = %k.0, build = k.1, "the build left the assignment; ending it");
                stop.cancel();
            }
        }
        for order in &current {
            if taken.contains(&key(order)) {
                continue;
            }
            if queue.len() >= MAX_QUEUED_BUILDS {
                tracing::warn!(app = %order.app, build = order.build, "the build queue is full; the build waits in the assignment");
                break;
            }
            taken.insert(key(order));
            queue.push_back(order.clone());
        }
        // A build dropped and added again waits until its ended run has cleaned up after it.
        while running.len() < MAX_CONCURRENT_BUILDS
            && let Some(next) = queue
                .iter()
                .position(|o| !stops.values().any(|(k, _)| *k == key(o)))
            && let Some(order) = queue.remove(next)
        {
            let stop = shutdown.child_token();
            let k = key(&order);
            let task = running.spawn(run_one(ctx.clone(), order, stop.clone()));
            stops.insert(task.id(), (k, stop));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = changed.notified() => {}
            Some(ended) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "a build task failed");
                        e.id()
                    }
                };
                stops.remove(&id);
            }
        }
    }
    running.shutdown().await;
}

/// How one build ended.
#[derive(Debug)]
enum Outcome {
    /// The repository committed release `release`.
    Finished { release: u64 },
    /// The repository already had another result for it (superseded, or ended before).
    Ended { message: String },
    /// The build, or delivering it, failed.
    Failed { reason: String },
    /// The build left the assignment, or Maestro is stopping.
    Stopped,
}

/// Runs one build from start to end, reporting it, and removes its directories.
async fn run_one(ctx: Arc<Ctx>, order: BuildOrder, stop: CancellationToken) {
    let (app, number) = (order.app.clone(), order.build);
    let node = &ctx.settings.node_name;
    ctx.send(
        NodeEventKind::BuildStarted,
        &order,
        0,
        format!("{app} build {number} started on {node}"),
        None,
    );
    ctx.status(&order, BuildProgress::Running, None);
    let mut log = LogTail::default();
    let outcome = tokio::select! {
        outcome = build_and_deliver(&ctx, &order, &mut log) => outcome,
        () = stop.cancelled() => Outcome::Stopped,
    };
    // The app's name makes paths: an invalid one (refused above) touches nothing on disk and
    // is reported nowhere but in the events.
    let valid_name = px_proto::names::check_app_name(&app).is_ok();
    // Only this task writes these paths, and its build has ended.
    let scratch = valid_name.then(|| {
        [
            ctx.settings.dir.join(format!("{app}-{number}.bundle")),
            ctx.settings
                .dir
                .join("source")
                .join(format!("{app}-{number}")),
            ctx.settings
                .builder
                .work_dir
                .join(format!("{app}-{number}")),
        ]
    });
    let _ = tokio::task::spawn_blocking(move || {
        for path in scratch.into_iter().flatten() {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    })
    .await;
    match outcome {
        Outcome::Finished { release } => {
            tracing::info!(%app, build = number, release, "build finished");
            ctx.send(
                NodeEventKind::BuildFinished,
                &order,
                release,
                format!("{app} build {number} made v{release} on {node}"),
                None,
            );
            ctx.status(&order, BuildProgress::Succeeded, Some(release));
        }
        Outcome::Ended { message } => {
            tracing::info!(%app, build = number, %message, "the repository had another result for the build");
            ctx.logs.record_build(
                &app,
                number,
                &format!("-----> Not made a release: {message}"),
            );
            ctx.status(&order, BuildProgress::Superseded, None);
        }
        Outcome::Failed { reason } => {
            tracing::warn!(%app, build = number, %reason, "build failed");
            let detail = log.last(FAILED_BUILD_LINES);
            ctx.send(
                NodeEventKind::BuildFailed,
                &order,
                0,
                format!("{app} build {number} failed on {node}: {reason}"),
                (!detail.is_empty()).then_some(detail),
            );
            ctx.status(&order, BuildProgress::Failed, None);
            if let Some(repository) = repository_of(&order).filter(|_| valid_name) {
                let failed = BuildFailed {
                    reason,
                    log: log.text(),
                };
                if let Err(e) = ctx.report_failure(repository, &order, &failed).await {
                    tracing::warn!(%app, build = number, error = %e, "could not report the failed build to the repository");
                }
            }
        }
        Outcome::Stopped => {
            tracing::info!(%app, build = number, "build ended before it finished");
            ctx.status(&order, BuildProgress::Superseded, None);
        }
    }
}

/// Everything that can fail: the source, the build, the delivery.
async fn build_and_deliver(ctx: &Ctx, order: &BuildOrder, log: &mut LogTail) -> Outcome {
    let failed = |reason: String| Outcome::Failed {
        reason: one_sentence(&reason),
    };
    if !ctx.settings.enabled {
        return failed(format!(
            "node {} is labelled build = \"true\" but builds are off in its configuration; set [build] enabled = true in its maestro.toml, or remove the label",
            ctx.settings.node_name
        ));
    }
    if let Err(e) = px_proto::names::check_app_name(&order.app) {
        return failed(format!("the app name: {e}"));
    }
    let Some(repository) = repository_of(order) else {
        return failed(format!(
            "the source URL {} is not a repository's /v1/bundles/<sha256>",
            order.source_url
        ));
    };
    let source = match ctx.fetch_source(order).await {
        Ok(source) => source,
        Err(reason) => return failed(reason),
    };
    let app = order.app.clone();
    let logs = ctx.logs.clone();
    let mut output = |line: &str| {
        log.push(line);
        logs.record_build(&app, order.build, line);
    };
    let uid = match &ctx.settings.app_uids {
        Some(sandbox) => match sandbox.build_uid(&order.app) {
            Ok(uid) => uid,
            Err(e) => return failed(e.to_string()),
        },
        None => None,
    };
    let request = BuildRequest {
        app: &order.app,
        build: order.build,
        source_dir: &source,
        manifest: &order.manifest,
        uid,
    };
    let built = match px_build::build(&request, &ctx.settings.builder, &mut output).await {
        Ok(built) => built,
        Err(e) => return failed(reason_of(&e)),
    };
    ctx.deliver(repository, order, &built, log).await
}

impl Ctx {
    fn send(
        &self,
        kind: NodeEventKind,
        order: &BuildOrder,
        release: u64,
        message: String,
        detail: Option<String>,
    ) {
        tracing::info!(app = %order.app, build = order.build, ?kind, %message, "build event");
        // When the queue is full the news is dropped; the next report still carries the state.
        let _ = self.events.try_send(NodeEvent {
            kind,
            app: order.app.clone(),
            release,
            message,
            detail,
            instance: None,
            level: None,
            failure: None,
            build: Some(order.build),
        });
    }

    fn status(&self, order: &BuildOrder, progress: BuildProgress, release: Option<u64>) {
        (self.report)(BuildStatus {
            app: order.app.clone(),
            build: order.build,
            progress,
            release,
        });
    }

    /// Downloads and unpacks the source; where it is unpacked.
    async fn fetch_source(&self, order: &BuildOrder) -> Result<PathBuf, String> {
        let dir = &self.settings.dir;
        let source = dir
            .join("source")
            .join(format!("{}-{}", order.app, order.build));
        tokio::fs::create_dir_all(source.parent().unwrap_or(dir))
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let bundle = dir.join(format!("{}-{}.bundle", order.app, order.build));
        fetch(
            &self.http,
            self.settings.repository_token.as_deref(),
            &Fetch {
                url: &order.source_url,
                sha256: &order.source_sha256,
                what: "source bundle",
                limit: order.source_size.min(MAX_BUNDLE_BYTES),
            },
            &bundle,
        )
        .await
        .map_err(|e| format!("fetching the source: {e}"))?;
        let dest = source.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&bundle)?;
            px_bundle::unpack(
                std::io::BufReader::new(file),
                &dest,
                &px_bundle::Limits::default(),
            )
            .map(drop)
            .map_err(std::io::Error::other)
        })
        .await
        .map_err(|e| format!("unpacking the source: {e}"))?
        .map_err(|e| format!("unpacking the source: {e}"))?;
        Ok(source)
    }

    /// Uploads the layers the repository lacks and finishes the build.
    async fn deliver(
        &self,
        repository: &str,
        order: &BuildOrder,
        built: &Built,
        log: &mut LogTail,
    ) -> Outcome {
        let mut uploaded = BTreeSet::new();
        for layer in &built.layers {
            if !uploaded.insert(layer.sha256.clone()) {
                continue;
            }
            let kind = layer.kind.as_str();
            let line = match self.upload_layer(repository, layer).await {
                Ok(true) => format!(
                    "-----> Uploaded the {kind} layer ({})",
                    px_proto::size::human(layer.size)
                ),
                Ok(false) => format!("-----> The repository has the {kind} layer already"),
                Err(reason) => {
                    return Outcome::Failed {
                        reason: one_sentence(&format!("uploading the {kind} layer: {reason}")),
                    };
                }
            };
            log.push(&line);
            self.logs.record_build(&order.app, order.build, &line);
        }
        let finished = BuildFinished {
            output: BuildOutput {
                build: order.build,
                layers: built
                    .layers
                    .iter()
                    .map(|l| LayerRef {
                        kind: l.kind,
                        sha256: l.sha256.clone(),
                        size: l.size,
                    })
                    .collect(),
                path: built.path.clone(),
                env: built.env.clone(),
                runtime: built.runtime.clone(),
                commands: built.commands.clone(),
            },
            log: log.text(),
        };
        let url = format!(
            "{repository}/v1/apps/{}/builds/{}/finish",
            order.app, order.build
        );
        let answer = with_retries("finishing the build", || {
            authorized(
                self.settings.repository_token.as_deref(),
                self.http.post(&url).json(&finished),
            )
        })
        .await;
        match answer {
            Ok((status, body)) if status.is_success() => {
                match serde_json::from_slice::<Release>(&body) {
                    Ok(release) => Outcome::Finished {
                        release: release.version,
                    },
                    Err(e) => Outcome::Failed {
                        reason: format!("the repository's answer to the finish is unreadable: {e}"),
                    },
                }
            }
            Ok((status, body)) if status == reqwest::StatusCode::CONFLICT => Outcome::Ended {
                message: message_of(&body),
            },
            Ok((status, body)) => Outcome::Failed {
                reason: one_sentence(&format!(
                    "the repository refused the finished build ({status}): {}",
                    message_of(&body)
                )),
            },
            Err(reason) => Outcome::Failed {
                reason: one_sentence(&reason),
            },
        }
    }

    /// Uploads one layer unless the repository has it; true when it was uploaded.
    async fn upload_layer(
        &self,
        repository: &str,
        layer: &px_build::BuiltLayer,
    ) -> Result<bool, String> {
        let url = format!("{repository}/v1/layers/{}", layer.sha256);
        let (status, body) = with_retries("asking for a layer", || {
            authorized(
                self.settings.repository_token.as_deref(),
                self.http.head(&url),
            )
        })
        .await?;
        match status {
            reqwest::StatusCode::OK => return Ok(false),
            reqwest::StatusCode::NOT_FOUND => {}
            other => return Err(format!("{other}: {}", message_of(&body))),
        }
        let (status, body) = with_retries("uploading a layer", || async {
            // Streamed from the archive, which is opened again for each try.
            let file = tokio::fs::File::open(&layer.archive)
                .await
                .map_err(|e| Attempt::Stop(format!("{}: {e}", layer.archive.display())))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            authorized(
                self.settings.repository_token.as_deref(),
                self.http
                    .put(&url)
                    .header(reqwest::header::CONTENT_LENGTH, layer.size)
                    .body(body),
            )
            .await
        })
        .await?;
        if status.is_success() {
            Ok(true)
        } else {
            Err(format!("{status}: {}", message_of(&body)))
        }
    }

    /// `POST .../fail`: a 409 means the repository has a result already, which is fine.
    async fn report_failure(
        &self,
        repository: &str,
        order: &BuildOrder,
        failed: &BuildFailed,
    ) -> Result<(), String> {
        let url = format!(
            "{repository}/v1/apps/{}/builds/{}/fail",
            order.app, order.build
        );
        let (status, body) = with_retries("reporting the failure", || {
            authorized(
                self.settings.repository_token.as_deref(),
                self.http.post(&url).json(failed),
            )
        })
        .await?;
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            Ok(())
        } else {
            Err(format!("{status}: {}", message_of(&body)))
        }
    }
}

/// The repository the order came from: its source URL without `/v1/bundles/<sha256>`.
fn repository_of(order: &BuildOrder) -> Option<&str> {
    order
        .source_url
        .strip_suffix(&format!("/v1/bundles/{}", order.source_sha256))
        .filter(|base| base.starts_with("http://") || base.starts_with("https://"))
}

/// Why a build failed, as the one sentence apprepo keeps with it and the event shows: the
/// step and its status, not the output lines the error quotes (those are the event's detail
/// and in the log).
fn reason_of(error: &BuildError) -> String {
    match error {
        BuildError::StepFailed { step, status, .. } => format!("{step} failed ({status})"),
        BuildError::CollectstaticFailed { .. } => {
            "python manage.py collectstatic --noinput failed; fix it, or set `[build] collectstatic = false` in app.toml to skip it".into()
        }
        other => other.to_string(),
    }
}

/// The first line of `text`, at most [`MAX_FAIL_REASON_CHARS`] characters.
fn one_sentence(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    match first.char_indices().nth(MAX_FAIL_REASON_CHARS) {
        Some((cut, _)) => first[..cut].to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests;
