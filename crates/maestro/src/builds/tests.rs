//! Tests of the build runner against a repository stand-in: uploads only what apprepo lacks,
//! failures reported once, superseded finishes, builds that leave the assignment.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, head, post};
use px_proto::api::ErrorBody;
use px_proto::build::MAX_BUILD_LOG_BYTES;
use px_proto::link::LogStream;

use super::*;
use crate::logs::Rotation;
use crate::sandbox::AppSandbox;

/// How long a test waits for a build of a few files without a sandbox; they take well
/// under a second.
const WAIT: Duration = Duration::from_secs(60);

/// A stand-in for apprepo's build endpoints (its own tests cover the real ones): sources
/// by digest, layers (`HEAD`, `PUT`), finish and fail, recording what it was sent.
#[derive(Clone, Default)]
struct Repo {
    blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    layers: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    puts: Arc<Mutex<Vec<String>>>,
    finishes: Arc<Mutex<Vec<BuildFinished>>>,
    fails: Arc<Mutex<Vec<BuildFailed>>>,
    /// Answer finishes with 409, as when a newer upload superseded the build.
    superseded: Arc<Mutex<bool>>,
}

async fn blob(
    State(repo): State<Repo>,
    UrlPath(sha): UrlPath<String>,
) -> Result<Vec<u8>, StatusCode> {
    repo.blobs
        .lock()
        .unwrap()
        .get(&sha)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)
}

async fn has_layer(State(repo): State<Repo>, UrlPath(sha): UrlPath<String>) -> StatusCode {
    if repo.layers.lock().unwrap().contains_key(&sha) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn put_layer(
    State(repo): State<Repo>,
    UrlPath(sha): UrlPath<String>,
    body: axum::body::Bytes,
) -> StatusCode {
    use sha2::Digest;
    if hex::encode(sha2::Sha256::digest(&body)) != sha {
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    repo.puts.lock().unwrap().push(sha.clone());
    repo.layers.lock().unwrap().insert(sha, body.to_vec());
    StatusCode::CREATED
}

async fn finish(
    State(repo): State<Repo>,
    UrlPath((app, _n)): UrlPath<(String, u64)>,
    axum::Json(finished): axum::Json<BuildFinished>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    repo.finishes.lock().unwrap().push(finished.clone());
    if *repo.superseded.lock().unwrap() {
        let body = ErrorBody {
            code: "conflict".into(),
            message: format!(
                "build {} of {app:?} was superseded by v8 (a newer upload); it will not become a release",
                finished.output.build
            ),
        };
        return (StatusCode::CONFLICT, axum::Json(body)).into_response();
    }
    let release: Release = serde_json::from_value(serde_json::json!({
        "app": app, "version": 7,
        "bundle": {"sha256": "0".repeat(64), "size": 1},
        "manifest": {"name": app}, "config": {}, "cause": {"kind": "deploy"},
        "description": "", "created_at": "2026-01-01T00:00:00Z", "created_by": "node",
        "build": finished.output,
    }))
    .unwrap();
    (StatusCode::CREATED, axum::Json(release)).into_response()
}

async fn fail(State(repo): State<Repo>, axum::Json(failed): axum::Json<BuildFailed>) -> StatusCode {
    repo.fails.lock().unwrap().push(failed);
    StatusCode::OK
}

/// One runner against the stand-in, with what it reported.
struct Node {
    url: String,
    repo: Repo,
    builds: Arc<Builds>,
    statuses: Arc<Mutex<Vec<BuildStatus>>>,
    events: mpsc::Receiver<NodeEvent>,
    logs: Arc<AppLogs>,
    state: tempfile::TempDir,
    log_dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

impl Node {
    async fn start(enabled: bool) -> Self {
        Self::start_with(enabled, None).await
    }

    /// A runner whose builds run in bubblewrap as their apps' uids from `app_uids`, when
    /// given; without a sandbox otherwise.
    async fn start_with(enabled: bool, app_uids: Option<Arc<AppSandbox>>) -> Self {
        let repo = Repo::default();
        let router = axum::Router::new()
            .route("/v1/bundles/{sha}", get(blob))
            .route("/v1/layers/{sha}", head(has_layer).put(put_layer))
            .route("/v1/apps/{app}/builds/{n}/finish", post(finish))
            .route("/v1/apps/{app}/builds/{n}/fail", post(fail))
            .with_state(repo.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

        let state = tempfile::tempdir().unwrap();
        let log_dir = tempfile::tempdir().unwrap();
        let config = BuildConfig {
            enabled,
            // No runtime anywhere: these apps need none, and one that asks fails.
            runtimes_dir: state.path().join("runtimes"),
            sandbox: if app_uids.is_some() {
                SandboxConfig::Bubblewrap
            } else {
                SandboxConfig::None
            },
            ..BuildConfig::default()
        };
        let mut settings = BuildSettings::from_config(&config, "node-b", state.path(), None, None);
        settings.app_uids = app_uids;
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let report: ReportStatus = {
            let statuses = statuses.clone();
            Arc::new(move |status| statuses.lock().unwrap().push(status))
        };
        let logs = Arc::new(AppLogs::new(log_dir.path(), Rotation::default()));
        let (events_tx, events) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let builds = Builds::start(
            settings,
            report,
            logs.clone(),
            events_tx,
            &tracker,
            stop.clone(),
        );
        Self {
            url,
            repo,
            builds,
            statuses,
            events,
            logs,
            state,
            log_dir,
            _stop: stop.drop_guard(),
        }
    }

    /// Packs `files` as the upload of `app` and serves it; the order to build it as `build`.
    fn order(&self, app: &str, build: u64, files: &[(&str, &str)]) -> BuildOrder {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.toml"),
            format!("name = \"{app}\"\nrun = \"true\"\n"),
        )
        .unwrap();
        for (path, content) in files {
            std::fs::write(dir.path().join(path), content).unwrap();
        }
        let mut bytes = Vec::new();
        let (summary, manifest) = px_bundle::pack_dir(dir.path(), &mut bytes).unwrap();
        self.repo
            .blobs
            .lock()
            .unwrap()
            .insert(summary.sha256.clone(), bytes);
        BuildOrder {
            app: app.into(),
            build,
            source_url: format!("{}/v1/bundles/{}", self.url, summary.sha256),
            source_sha256: summary.sha256,
            source_size: summary.size,
            manifest,
        }
    }

    /// Waits until build `build` of `app` is reported ended; how it ended.
    async fn ended(&self, app: &str, build: u64) -> BuildStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = self
                .statuses
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|s| s.app == app && s.build == build)
                .cloned();
            if let Some(status) = last
                && status.progress != BuildProgress::Running
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "build {build} of {app} never ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the stand-in has been sent `n` failures (reported after the status,
    /// since the report may be retried); the failures so far.
    async fn fails(&self, n: usize) -> Vec<BuildFailed> {
        let deadline = Instant::now() + WAIT;
        loop {
            let fails = self.repo.fails.lock().unwrap().clone();
            if fails.len() >= n {
                return fails;
            }
            assert!(
                Instant::now() < deadline,
                "only {} failures reported",
                fails.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The events sent so far.
    fn events(&mut self) -> Vec<NodeEvent> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    fn runs_of(&self, app: &str, build: u64) -> usize {
        self.statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.app == app && s.build == build && s.progress == BuildProgress::Running)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_uploads_only_what_the_repository_lacks_and_becomes_its_release() {
    let mut node = Node::start(true).await;
    let mut followed = node.logs.follow();
    let order = node.order("site", 3, &[("index.html", "<h1>hello</h1>")]);

    node.builds.apply(std::slice::from_ref(&order));
    let status = node.ended("site", 3).await;

    assert_eq!(
        (status.progress, status.release),
        (BuildProgress::Succeeded, Some(7))
    );
    let events = node.events();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| (e.kind, e.release, e.build))
        .collect();
    assert_eq!(
        kinds,
        [
            (NodeEventKind::BuildStarted, 0, Some(3)),
            (NodeEventKind::BuildFinished, 7, Some(3)),
        ]
    );
    assert_eq!(events[1].message, "site build 3 made v7 on node-b");
    // The one layer of a plain app was uploaded, then the build finished with it and its log.
    let finished = node.repo.finishes.lock().unwrap()[0].clone();
    assert_eq!(finished.output.build, 3);
    let layers: Vec<String> = finished
        .output
        .layers
        .iter()
        .map(|l| l.sha256.clone())
        .collect();
    assert_eq!(*node.repo.puts.lock().unwrap(), layers);
    assert!(
        finished.log.contains("-----> Packing the app layer"),
        "{}",
        finished.log
    );
    assert!(
        finished.log.contains("-----> Uploaded the app layer"),
        "{}",
        finished.log
    );
    // Every line also went to followers (the Beacon link) and to build.log.
    let line = followed.recv().await.unwrap();
    assert_eq!(
        (
            line.app.as_str(),
            line.stream,
            line.build,
            line.release,
            line.instance
        ),
        ("site", LogStream::Build, Some(3), 0, 0)
    );
    let build_log = node.log_dir.path().join("site/build.log");
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&build_log).is_ok_and(|t| t.contains("build 3 -----> Packing")) {
        assert!(Instant::now() < deadline, "build.log never got the output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing of the build is left but the cache.
    let builds = node.state.path().join(BUILDS_DIR);
    assert!(!builds.join("source/site-3").exists());
    assert!(!builds.join("work/site-3").exists());
    assert!(!builds.join("site-3.bundle").exists());

    // The same source built again: the repository has its layer, so nothing is uploaded.
    let again = node.order("site", 4, &[("index.html", "<h1>hello</h1>")]);
    node.builds.apply(&[order, again]);
    node.ended("site", 4).await;
    assert_eq!(node.repo.puts.lock().unwrap().len(), 1);
    let log = &node.repo.finishes.lock().unwrap()[1].log;
    assert!(
        log.contains("-----> The repository has the app layer already"),
        "{log}"
    );
    assert_eq!(node.runs_of("site", 3), 1, "build 3 ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_as_its_apps_own_uid_where_maestro_gives_apps_uids() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let uids_dir = tempfile::tempdir().unwrap();
    let sandbox = AppSandbox::new(
        SandboxConfig::Bubblewrap,
        uids_dir.path(),
        crate::sandbox::DEFAULT_TMP_SIZE,
        crate::sandbox::DEFAULT_APP_DIR_SIZE,
    )
    .unwrap();
    let other = sandbox.uid("neighbour").unwrap();
    let own = sandbox.uid("site").unwrap();
    let node = Node::start_with(true, Some(Arc::new(sandbox))).await;
    let manifest = "name = \"site\"\nrun = \"true\"\n\n[build]\ncommand = \"echo uid=$(id -u)\"\n";
    let order = node.order("site", 1, &[("app.toml", manifest)]);

    node.builds.apply(std::slice::from_ref(&order));
    let status = node.ended("site", 1).await;

    assert_eq!(status.progress, BuildProgress::Succeeded, "{status:?}");
    let log = node.repo.finishes.lock().unwrap()[0].log.clone();
    // A root Maestro's build command runs without a user namespace: `id` shows the real uid.
    assert!(log.contains(&format!("uid={own}\n")), "{log}");
    assert_ne!(own, other);
    assert!(!log.contains("uid=0\n"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_build_is_reported_with_its_reason_and_runs_again_only_when_re_added() {
    let mut node = Node::start(true).await;
    let order = node.order(
        "notes",
        1,
        &[
            (".python-version", "3.99\n"),
            ("requirements.txt", "django\n"),
        ],
    );

    node.builds.apply(std::slice::from_ref(&order));
    let status = node.ended("notes", 1).await;

    assert_eq!(status.progress, BuildProgress::Failed);
    let failed = node.fails(1).await[0].clone();
    assert!(
        failed.reason.starts_with(".python-version asks for ") && failed.reason.contains("3.99"),
        "{}",
        failed.reason
    );
    let events = node.events();
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind, last.build),
        (NodeEventKind::BuildFailed, Some(1))
    );
    assert_eq!(
        last.message,
        format!("notes build 1 failed on node-b: {}", failed.reason)
    );
    assert!(node.repo.finishes.lock().unwrap().is_empty());

    // Dropped and added again, even before the runner looks, the build runs again.
    node.builds.apply(&[]);
    node.builds.apply(std::slice::from_ref(&order));
    node.fails(2).await;
    assert_eq!(node.runs_of("notes", 1), 2);

    // A later assignment that still holds it does not run it again: another app's build,
    // listed after it, runs and ends while it is not taken a third time.
    let other = node.order("other", 1, &[("index.html", "x")]);
    node.builds.apply(&[order, other]);
    assert_eq!(
        node.ended("other", 1).await.progress,
        BuildProgress::Succeeded
    );
    assert_eq!(node.runs_of("notes", 1), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_finish_is_no_failure() {
    let mut node = Node::start(true).await;
    *node.repo.superseded.lock().unwrap() = true;
    let order = node.order("site", 2, &[("index.html", "v2")]);

    node.builds.apply(&[order]);
    let status = node.ended("site", 2).await;

    assert_eq!(
        (status.progress, status.release),
        (BuildProgress::Superseded, None)
    );
    assert!(node.repo.fails.lock().unwrap().is_empty());
    let kinds: Vec<_> = node.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [NodeEventKind::BuildStarted]);
}

/// Whether a process with exactly these arguments runs.
fn running(args: &[&str]) -> bool {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|entry| std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == wanted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_leaves_the_assignment_is_ended_with_its_commands() {
    let mut node = Node::start(true).await;
    let mut followed = node.logs.follow();
    let order = node.order(
        "slow",
        1,
        &[(
            "app.toml",
            "name = \"slow\"\nrun = \"true\"\n[build]\ncommand = \"echo sleeping; exec sleep 4242\"\n",
        )],
    );

    node.builds.apply(std::slice::from_ref(&order));
    let deadline = Instant::now() + WAIT;
    while !followed.recv().await.unwrap().line.contains("sleeping") {
        assert!(Instant::now() < deadline, "the build command never ran");
    }
    while !running(&["sleep", "4242"]) {
        assert!(Instant::now() < deadline, "the build's sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Beacon drops it (apprepo has a result, say): it ends now, not in 4242 s.
    node.builds.apply(&[]);
    assert_eq!(
        node.ended("slow", 1).await.progress,
        BuildProgress::Superseded
    );
    while running(&["sleep", "4242"]) {
        assert!(Instant::now() < deadline, "the build's command outlived it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing is reported to apprepo for it, and nothing of it is left.
    assert!(node.repo.fails.lock().unwrap().is_empty());
    assert!(node.repo.finishes.lock().unwrap().is_empty());
    let kinds: Vec<_> = node.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [NodeEventKind::BuildStarted]);
    assert!(
        !node
            .state
            .path()
            .join(BUILDS_DIR)
            .join("work/slow-1")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_an_app_name_that_is_no_name_touches_nothing() {
    let mut node = Node::start(true).await;
    let mut order = node.order("site", 1, &[("index.html", "x")]);
    order.app = "../escape".into();
    // What `state_dir/builds/../escape-1` names: not the build's to touch.
    let outside = node.state.path().join("escape-1");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), "mine").unwrap();

    node.builds.apply(&[order]);
    assert_eq!(
        node.ended("../escape", 1).await.progress,
        BuildProgress::Failed
    );

    let failed = node.events().pop().unwrap();
    assert!(
        failed.message.contains("the app name"),
        "{}",
        failed.message
    );
    assert!(node.repo.fails.lock().unwrap().is_empty());
    assert_eq!(
        std::fs::read_to_string(outside.join("keep.txt")).unwrap(),
        "mine"
    );
    assert!(!node.state.path().join("escape-1.bundle").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_builds_off_fails_what_it_is_sent_saying_how_to_fix_it() {
    let node = Node::start(false).await;
    let order = node.order("site", 1, &[("index.html", "x")]);

    node.builds.apply(&[order]);
    assert_eq!(node.ended("site", 1).await.progress, BuildProgress::Failed);

    let reason = node.fails(1).await[0].reason.clone();
    assert_eq!(
        reason,
        "node node-b is labelled build = \"true\" but builds are off in its configuration; set [build] enabled = true in its maestro.toml, or remove the label"
    );
}

#[test]
fn the_log_tail_keeps_the_newest_lines_within_the_limit() {
    let mut tail = LogTail::default();
    let line = "x".repeat(1000);
    for n in 0..2000 {
        tail.push(&format!("{n:04}{line}"));
    }
    let text = tail.text();
    assert!(text.len() <= MAX_BUILD_LOG_BYTES, "{}", text.len());
    assert!(text.len() > MAX_BUILD_LOG_BYTES - 2000);
    assert!(text.ends_with(&format!("1999{line}")));
    assert_eq!(tail.last(2), format!("1998{line}\n1999{line}"));
}

#[test]
fn a_failure_reason_is_one_line_of_bounded_length() {
    let step = BuildError::StepFailed {
        step: "uv pip install".into(),
        status: "exit status: 1".into(),
        tail: "error: no such package\nhint: check".into(),
    };
    assert_eq!(reason_of(&step), "uv pip install failed (exit status: 1)");
    assert_eq!(one_sentence("first\nsecond"), "first");
    assert_eq!(
        one_sentence(&"é".repeat(5000)).chars().count(),
        MAX_FAIL_REASON_CHARS
    );
}

#[test]
fn the_repository_is_where_the_source_comes_from() {
    let order = |url: &str| BuildOrder {
        app: "a".into(),
        build: 1,
        source_url: url.into(),
        source_sha256: "ab".into(),
        source_size: 1,
        manifest: px_proto::manifest::AppManifest::parse("name = \"a\"").unwrap(),
    };
    assert_eq!(
        repository_of(&order("http://repo:7070/v1/bundles/ab")),
        Some("http://repo:7070")
    );
    assert_eq!(repository_of(&order("http://repo:7070/bundles/ab")), None);
    assert_eq!(repository_of(&order("file:///v1/bundles/ab")), None);
}
