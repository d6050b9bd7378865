//! `em deploy` of an app that needs a build, and of deploys that a newer one supersedes: the
//! real `em` binary and the real Beacon (`px_beacon::run`), with a scripted build node that
//! speaks the real link protocol over TLS (it builds by script: started, output lines, then
//! success or failure) and a stand-in apprepo.
//!
//! The stand-in answers uploads with `202 BuildQueued` and serves the build endpoints
//! (`GET /v1/builds?pending=true`, `/v1/apps/{app}/builds/{n}` and its `/log`), which the real
//! apprepo does not have yet in this tree; it sends apprepo's notices on a real repository
//! link. An end-to-end test with the real apprepo and Maestro replaces it once they build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use px_proto::api::{App, BundleRef, Release, ReleaseCause};
use px_proto::beacon::{Event, EventKind};
use px_proto::build::{
    BUILD_LABEL, Build, BuildOutput, BuildProgress, BuildQueued, BuildRequested, BuildResult,
    BuildStatus,
};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    FromBeacon, Hello, InstanceState, InstanceStatus, LogBatch, LogLine, LogStream, NodeEvent,
    NodeEventKind, NodeReport, PROTOCOL_VERSION, PeerRole, ReleaseCommitted, ToBeacon,
};
use px_proto::manifest::AppManifest;
use px_runtime::tokens::{TokenEntry, generate, hash};
use px_test_support::Pki;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_em");
const WAIT: Duration = Duration::from_secs(30);
/// How soon a superseded `em deploy` must return once the newer upload is in.
const PROMPTLY: Duration = Duration::from_secs(1);
/// How often the scripted node reports, as Maestro does, only faster.
const NODE_HEARTBEAT: Duration = Duration::from_millis(200);
/// Between two lines of a scripted build's output: it prints over time, as a build does.
const LINE_EVERY: Duration = Duration::from_millis(30);

/// What the scripted build node does with a build.
#[derive(Clone)]
enum Script {
    /// Prints `lines`, then finishes: apprepo commits the release.
    Succeed(Vec<String>),
    /// Prints `lines`, then fails with `reason`.
    Fail(Vec<String>, String),
    /// Starts, prints one line, and never ends.
    Hang,
}

/// What apprepo makes of an upload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uploads {
    /// A pending build (`202`).
    Build,
    /// The release itself (`201`).
    Release,
}

struct RepoState {
    uploads: Uploads,
    releases: BTreeMap<String, Vec<Release>>,
    builds: BTreeMap<(String, u64), Build>,
    logs: BTreeMap<(String, u64), String>,
    /// When the last upload superseded a build.
    superseded_at: Option<Instant>,
    /// When the last release was committed.
    committed_at: Option<Instant>,
}

/// The apprepo stand-in: its state, and the sender of its notices to Beacon.
#[derive(Clone)]
struct Repo {
    state: Arc<Mutex<RepoState>>,
    notices: mpsc::UnboundedSender<ToBeacon>,
}

impl Repo {
    fn notify(&self, frame: ToBeacon) {
        let _ = self.notices.send(frame);
    }

    /// Commits a release of `app` (from build `build`, when given), without telling Beacon.
    fn commit(&self, app: &str, sha256: String, build: Option<u64>) -> Release {
        let mut state = self.state.lock().unwrap();
        state.committed_at = Some(Instant::now());
        let releases = state.releases.entry(app.to_string()).or_default();
        let release = Release {
            app: app.into(),
            version: releases.len() as u64 + 1,
            bundle: BundleRef {
                sha256: sha256.clone(),
                size: 100,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest: AppManifest::parse(&format!(
                "name = \"{app}\"\nrun = \"python3 server.py\"\n"
            ))
            .unwrap(),
            config: BTreeMap::new(),
            cause: ReleaseCause::Deploy,
            description: "deploy".into(),
            created_at: "2026-11-25T00:00:00Z".into(),
            created_by: "em".into(),
            build: build.map(|build| BuildOutput {
                build,
                layers: Vec::new(),
                path: Vec::new(),
                env: BTreeMap::new(),
                runtime: None,
                commands: Vec::new(),
            }),
            phase: None,
            config_hidden: false,
        };
        releases.push(release.clone());
        release
    }

    /// Tells Beacon that `release` was committed.
    fn committed(&self, release: &Release) {
        self.notify(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: release.app.clone(),
            version: release.version,
            bundle_sha256: release.bundle.sha256.clone(),
        }));
    }

    /// An upload: every pending build of the app is superseded by what it makes.
    fn upload(&self, app: &str, sha256: String) -> (StatusCode, serde_json::Value) {
        let uploads = self.state.lock().unwrap().uploads;
        let next_build = {
            let state = self.state.lock().unwrap();
            state.builds.keys().filter(|(a, _)| a == app).count() as u64 + 1
        };
        let next_release = {
            let state = self.state.lock().unwrap();
            state.releases.get(app).map_or(0, Vec::len) as u64 + 1
        };
        let by = match uploads {
            Uploads::Build => format!("build {next_build}"),
            Uploads::Release => format!("v{next_release}"),
        };
        {
            let mut state = self.state.lock().unwrap();
            let mut superseded = false;
            for build in state.builds.values_mut() {
                if build.app == app && build.result.is_none() {
                    build.result = Some(BuildResult::Superseded { by: by.clone() });
                    superseded = true;
                }
            }
            if superseded {
                state.superseded_at = Some(Instant::now());
            }
        }
        match uploads {
            Uploads::Release => {
                let release = self.commit(app, sha256, None);
                self.committed(&release);
                (StatusCode::CREATED, serde_json::to_value(release).unwrap())
            }
            Uploads::Build => {
                let build = Build {
                    app: app.into(),
                    number: next_build,
                    source: BundleRef {
                        sha256,
                        size: 100,
                        bundled_commands: Vec::new(),
                        unpacked_size: None,
                    },
                    manifest: AppManifest::parse(&format!(
                        "name = \"{app}\"\nrun = \"python3 server.py\"\n"
                    ))
                    .unwrap(),
                    description: "deploy".into(),
                    created_at: "2026-11-25T00:00:00Z".into(),
                    created_by: "em".into(),
                    result: None,
                };
                self.state
                    .lock()
                    .unwrap()
                    .builds
                    .insert((app.into(), next_build), build.clone());
                self.notify(ToBeacon::BuildRequested(BuildRequested {
                    app: app.into(),
                    build: next_build,
                }));
                (
                    StatusCode::ACCEPTED,
                    serde_json::to_value(BuildQueued { build }).unwrap(),
                )
            }
        }
    }

    /// Records how build `n` of `app` ended, with its log; a success commits its release.
    fn end_build(&self, app: &str, n: u64, log: String, failure: Option<String>) -> Option<u64> {
        let key = (app.to_string(), n);
        let source = {
            let mut state = self.state.lock().unwrap();
            state.logs.insert(key.clone(), log);
            let build = state.builds.get(&key).unwrap();
            if build.result.is_some() {
                return None;
            }
            build.source.sha256.clone()
        };
        // As apprepo does: the release and the build's result first, then the notice.
        let (result, release) = match failure {
            Some(reason) => (BuildResult::Failed { reason }, None),
            None => {
                let release = self.commit(app, source, Some(n));
                let result = BuildResult::Succeeded {
                    release: release.version,
                };
                (result, Some(release))
            }
        };
        self.state
            .lock()
            .unwrap()
            .builds
            .get_mut(&key)
            .unwrap()
            .result = Some(result);
        let version = release.as_ref().map(|r| r.version);
        if let Some(release) = release {
            self.committed(&release);
        }
        version
    }
}

type NoticeLink = Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    FrameCodec<FromBeacon, ToBeacon>,
>;

async fn open_link(addr: &str, ca: &Path, hello: Hello) -> NoticeLink {
    let tls = px_runtime::tls::client_config(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    link.send(ToBeacon::Hello(hello)).await.unwrap();
    match link.next().await {
        Some(Ok(FromBeacon::Welcome { .. })) => link,
        other => panic!("not welcomed: {other:?}"),
    }
}

fn hello(role: PeerRole, name: &str, token: &str) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        role,
        name: name.into(),
        token: token.into(),
        software: "test".into(),
        labels: BTreeMap::new(),
        state: (role == PeerRole::Maestro).then(NodeReport::default),
        runtimes: BTreeMap::new(),
    }
}

/// The real Beacon, the stand-in apprepo and the scripted build node, and an em config that
/// points at them.
struct Platform {
    home: tempfile::TempDir,
    beacon_url: String,
    read_token: String,
    repo: Repo,
    /// Whether the node runs the releases it is assigned healthy.
    serve: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
    beacon: tokio::task::JoinHandle<()>,
}

impl Platform {
    async fn start(script: Script) -> Self {
        let home = tempfile::tempdir().unwrap();
        let pki = Pki::new(&["localhost"]).unwrap();
        let (read, maestro, repository) = (generate(), generate(), generate());
        // The repository stand-in: its HTTP API now, its link to Beacon once Beacon runs.
        let (notices, mut outgoing) = mpsc::unbounded_channel::<ToBeacon>();
        let repo = Repo {
            state: Arc::new(Mutex::new(RepoState {
                uploads: Uploads::Build,
                releases: BTreeMap::new(),
                builds: BTreeMap::new(),
                logs: BTreeMap::new(),
                superseded_at: None,
                committed_at: None,
            })),
            notices,
        };
        let repo_url = serve_repo(repo.clone()).await;

        let token_file = home.path().join("repo-token");
        px_runtime::secrets::write_secret_file(&token_file, &generate()).unwrap();
        let mut config = px_beacon::config::Config {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            control_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: home.path().join("beacon"),
            tls_cert_file: pki.cert(),
            tls_key_file: pki.key(),
            tokens: vec![
                TokenEntry {
                    name: "em".into(),
                    role: px_beacon::auth::Role::Deploy,
                    sha256: hash(&read),
                    node: None,
                    apps: None,
                },
                TokenEntry {
                    name: "local".into(),
                    role: px_beacon::auth::Role::Maestro,
                    sha256: hash(&maestro),
                    node: Some("local".into()),
                    apps: None,
                },
                TokenEntry {
                    name: "apprepo".into(),
                    role: px_beacon::auth::Role::Repository,
                    sha256: hash(&repository),
                    node: None,
                    apps: None,
                },
            ],
            ..Default::default()
        };
        config.repository.url = repo_url.clone();
        config.repository.token_file = token_file;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Beacon's API serves HTTPS with its link certificate (for `localhost`), which em
        // checks against the CA its config names.
        let beacon_url = format!("https://localhost:{}", http.local_addr().unwrap().port());
        let ca_file = home.path().join("ca.pem");
        std::fs::copy(pki.ca(), &ca_file).unwrap();
        let control_addr = control.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let beacon = tokio::spawn(async move {
            px_beacon::run(config, px_beacon::Listeners { http, control }, token)
                .await
                .unwrap();
        });

        let mut notice_link = open_link(
            &control_addr,
            &pki.ca(),
            hello(PeerRole::Repository, "apprepo", &repository),
        )
        .await;
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(Duration::from_secs(1));
            loop {
                let frame = tokio::select! {
                    _ = beat.tick() => ToBeacon::Heartbeat(NodeReport::default()),
                    frame = outgoing.recv() => match frame {
                        Some(frame) => frame,
                        None => return,
                    },
                    frame = notice_link.next() => match frame {
                        Some(Ok(_)) => continue,
                        _ => return,
                    },
                };
                if notice_link.send(frame).await.is_err() {
                    return;
                }
            }
        });

        let script = Arc::new(Mutex::new(script));
        let serve = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut node = hello(PeerRole::Maestro, "local", &maestro);
        node.labels.insert(BUILD_LABEL.into(), "true".into());
        let link = open_link(&control_addr, &pki.ca(), node).await;
        tokio::spawn(run_node(link, repo.clone(), script.clone(), serve.clone()));

        let config_dir = home.path().join("config/em");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(
            config_dir.join("config.toml"),
            format!(
                "remote = \"{repo_url}\"\nbeacon = \"{beacon_url}\"\ntoken = \"{read}\"\nca_file = \"{}\"\n",
                ca_file.display()
            ),
        )
        .unwrap();
        Self {
            home,
            beacon_url,
            read_token: read,
            repo,
            serve,
            shutdown,
            beacon,
        }
    }

    /// An app directory that `em deploy` accepts.
    fn app(&self, name: &str) -> PathBuf {
        let dir = self.home.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("app.toml"),
            format!("name = \"{name}\"\nrun = \"python3 server.py\"\n"),
        )
        .unwrap();
        std::fs::write(dir.join("requirements.txt"), "django\n").unwrap();
        std::fs::write(dir.join("server.py"), "print('hello')\n").unwrap();
        dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("XDG_DATA_HOME", self.home.path().join("data"))
            .env("HOME", self.home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn em(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().unwrap()
    }

    /// Beacon's events so far.
    async fn events(&self) -> Vec<Event> {
        let ca = std::fs::read(self.home.path().join("ca.pem")).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
            .get(format!("{}/v1/events?limit=1000", self.beacon_url))
            .bearer_auth(&self.read_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until Beacon has recorded an event that `matches`.
    async fn wait_event(&self, what: &str, matches: impl Fn(&Event) -> bool) {
        let start = Instant::now();
        while !self.events().await.iter().any(&matches) {
            assert!(start.elapsed() < WAIT, "no event: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.beacon)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Serves the apprepo stand-in on `127.0.0.1:0`; returns its URL.
async fn serve_repo(repo: Repo) -> String {
    let app = axum::Router::new()
        .route(
            "/v1/apps",
            get(|State(repo): State<Repo>| async move {
                let state = repo.state.lock().unwrap();
                let apps: Vec<App> = state
                    .releases
                    .iter()
                    .map(|(name, releases)| App {
                        name: name.clone(),
                        created_at: "2026-11-25T00:00:00Z".into(),
                        created_by: "em".into(),
                        current: releases.last().cloned(),
                        formation: Default::default(),
                        domains: Vec::new(),
                    })
                    .collect();
                axum::Json(apps)
            })
            .post(|| async { StatusCode::CREATED }),
        )
        .route(
            "/v1/apps/{app}/releases",
            post(
                |State(repo): State<Repo>,
                 UrlPath(app): UrlPath<String>,
                 headers: axum::http::HeaderMap,
                 _body: axum::body::Bytes| async move {
                    let sha256 = headers
                        .get(px_proto::api::HEADER_BUNDLE_SHA256)
                        .and_then(|v| v.to_str().ok())
                        .unwrap()
                        .to_string();
                    let (status, body) = repo.upload(&app, sha256);
                    (status, axum::Json(body))
                },
            ),
        )
        .route(
            "/v1/apps/{app}/releases/{version}",
            get(
                |State(repo): State<Repo>,
                 UrlPath((app, version)): UrlPath<(String, u64)>| async move {
                    let state = repo.state.lock().unwrap();
                    state
                        .releases
                        .get(&app)
                        .and_then(|r| r.iter().find(|r| r.version == version))
                        .cloned()
                        .map(axum::Json)
                        .ok_or(StatusCode::NOT_FOUND)
                },
            ),
        )
        .route(
            "/v1/builds",
            get(
                |State(repo): State<Repo>,
                 Query(q): Query<BTreeMap<String, String>>| async move {
                    assert_eq!(q.get("pending").map(String::as_str), Some("true"));
                    let state = repo.state.lock().unwrap();
                    let pending: Vec<Build> = state
                        .builds
                        .values()
                        .filter(|b| b.result.is_none())
                        .cloned()
                        .collect();
                    axum::Json(pending)
                },
            ),
        )
        .route(
            "/v1/apps/{app}/builds/{n}",
            get(
                |State(repo): State<Repo>, UrlPath(key): UrlPath<(String, u64)>| async move {
                    let state = repo.state.lock().unwrap();
                    state
                        .builds
                        .get(&key)
                        .cloned()
                        .map(axum::Json)
                        .ok_or(StatusCode::NOT_FOUND)
                },
            ),
        )
        .route(
            "/v1/apps/{app}/builds/{n}/log",
            get(
                |State(repo): State<Repo>, UrlPath(key): UrlPath<(String, u64)>| async move {
                    let state = repo.state.lock().unwrap();
                    state.logs.get(&key).cloned().ok_or(StatusCode::NOT_FOUND)
                },
            ),
        )
        .with_state(repo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The scripted build node: it reports every [`NODE_HEARTBEAT`] (the releases it is assigned
/// healthy, when `serve` is on, and its builds), and runs each build order it is given by the
/// script.
async fn run_node(
    mut link: NoticeLink,
    repo: Repo,
    script: Arc<Mutex<Script>>,
    serve: Arc<std::sync::atomic::AtomicBool>,
) {
    let report = Arc::new(Mutex::new(NodeReport::default()));
    let (frames, mut outgoing) = mpsc::unbounded_channel::<ToBeacon>();
    let mut started = std::collections::BTreeSet::new();
    let mut beat = tokio::time::interval(NODE_HEARTBEAT);
    loop {
        let frame = tokio::select! {
            _ = beat.tick() => ToBeacon::Heartbeat(report.lock().unwrap().clone()),
            frame = outgoing.recv() => match frame {
                Some(frame) => frame,
                None => return,
            },
            frame = link.next() => {
                let Some(Ok(FromBeacon::Assign(assignment))) = frame else {
                    if matches!(frame, Some(Ok(_))) {
                        continue;
                    }
                    return;
                };
                let mut now = report.lock().unwrap();
                now.generation = assignment.generation;
                now.instances = if serve.load(std::sync::atomic::Ordering::Relaxed) {
                    assignment
                        .apps
                        .iter()
                        .map(|a| InstanceStatus {
                            app: a.app.clone(),
                            release: a.release,
                            state: InstanceState::Healthy,
                            pid: Some(4242),
                            port: Some(20001),
                            restarts: 0,
                            last_exit: None,
                            process: "web".into(),
                            number: 1,
                            started_at: None,
                            memory_bytes: None,
                            cpu_permille: None,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                for order in assignment.builds {
                    if started.insert((order.app.clone(), order.build)) {
                        now.builds.push(BuildStatus {
                            app: order.app.clone(),
                            build: order.build,
                            progress: BuildProgress::Running,
                            release: None,
                        });
                        let script = script.lock().unwrap().clone();
                        tokio::spawn(run_build(
                            order.app,
                            order.build,
                            script,
                            repo.clone(),
                            frames.clone(),
                        ));
                    }
                }
                continue;
            }
        };
        if link.send(frame).await.is_err() {
            return;
        }
    }
}

fn node_event(kind: NodeEventKind, app: &str, build: u64, message: String) -> ToBeacon {
    ToBeacon::Event(NodeEvent {
        kind,
        app: app.into(),
        release: 0,
        message,
        detail: None,
        instance: None,
        level: None,
        failure: None,
        build: Some(build),
    })
}

/// Runs one build by the script, as Maestro's build runner reports one.
async fn run_build(
    app: String,
    build: u64,
    script: Script,
    repo: Repo,
    frames: mpsc::UnboundedSender<ToBeacon>,
) {
    let send = |frame| {
        let _ = frames.send(frame);
    };
    send(node_event(
        NodeEventKind::BuildStarted,
        &app,
        build,
        format!("{app} build {build} started on local"),
    ));
    let lines = match &script {
        Script::Succeed(lines) | Script::Fail(lines, _) => lines.clone(),
        Script::Hang => vec!["Resolving dependencies".to_string()],
    };
    for text in &lines {
        send(ToBeacon::Logs(LogBatch {
            lines: vec![LogLine {
                app: app.clone(),
                release: 0,
                instance: 0,
                stream: LogStream::Build,
                at: "2026-11-25T00:00:00.000Z".into(),
                line: text.clone(),
                build: Some(build),
                process: None,
            }],
            dropped: 0,
        }));
        tokio::time::sleep(LINE_EVERY).await;
    }
    let log = lines.join("\n") + "\n";
    match script {
        Script::Hang => {}
        Script::Succeed(_) => {
            if repo.end_build(&app, build, log, None).is_some() {
                send(node_event(
                    NodeEventKind::BuildFinished,
                    &app,
                    build,
                    format!("{app} build {build} finished"),
                ));
            }
        }
        Script::Fail(_, reason) => {
            repo.end_build(&app, build, log, Some(reason.clone()));
            send(node_event(
                NodeEventKind::BuildFailed,
                &app,
                build,
                format!("{app} build {build} failed: {reason}"),
            ));
        }
    }
}

/// Where each of `needles` is in `text`, in order; panics naming the first one missing or out
/// of order.
fn assert_in_order(text: &str, needles: &[&str]) {
    let mut from = 0;
    for needle in needles {
        let Some(at) = text[from..].find(needle) else {
            panic!("{needle:?} is missing or out of order in:\n{text}");
        };
        from += at + needle.len();
    }
}

/// Waits for `child` to exit; returns its output and when it exited.
fn wait_exit(mut child: Child) -> (Output, Instant) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let exited = Instant::now();
            return (child.wait_with_output().unwrap(), exited);
        }
        assert!(start.elapsed() < WAIT, "em deploy did not return");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_shows_its_output_live_then_the_release_rolls_out_and_its_log_stays() {
    let output = [
        "Resolving dependencies from requirements.txt",
        "Downloading django-5.1.4-py3-none-any.whl (8.3 MB)",
        "Installing collected packages: asgiref, sqlparse, django",
        "Successfully installed asgiref-3.8.1 django-5.1.4 sqlparse-0.5.3",
    ];
    let platform = Platform::start(Script::Succeed(
        output.iter().map(|l| l.to_string()).collect(),
    ))
    .await;
    let dir = platform.app("shop");
    let out = platform.em(&["deploy", dir.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("em deploy said:\n{stderr}{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The output comes on its own stream, apart from the events: its lines keep their order,
    // and all of them are shown before the build's end.
    let mut expected = output.to_vec();
    expected.push("build 1 made shop v1");
    assert_in_order(&stderr, &expected);
    assert!(stderr.starts_with("-----> shop build 1 queued"), "{stderr}");
    assert!(stderr.contains("-----> building on local"), "{stderr}");
    assert!(stdout.contains("shop v1 is live"), "{stdout}");
    assert!(stdout.contains("· build "), "the build's time: {stdout}");

    // The release's build log, from apprepo.
    let out = platform.em(&["releases", "--app", "shop", "--build-log", "v1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), output.join("\n") + "\n");
    // A release that was not built has none, and em says why.
    platform.repo.state.lock().unwrap().uploads = Uploads::Release;
    let out = platform.em(&["deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = platform.em(&["releases", "--app", "shop", "--build-log", "2"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        text(&out.stderr).contains("shop v2 was not built"),
        "{}",
        text(&out.stderr)
    );
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_exits_1_with_its_last_lines_and_the_reason() {
    let output = [
        "Resolving dependencies from requirements.txt",
        "ERROR: Could not find a version that satisfies the requirement djangoo",
        "ERROR: No matching distribution found for djangoo",
    ];
    let platform = Platform::start(Script::Fail(
        output.iter().map(|l| l.to_string()).collect(),
        "the installer failed; check requirements.txt".into(),
    ))
    .await;
    let dir = platform.app("shop");
    let out = platform.em(&["deploy", dir.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    eprintln!("em deploy said:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The failure paragraph, after the live output: the reason, then the failing lines.
    let failure = &stderr[stderr.find("em: ").expect(&stderr)..];
    assert_in_order(
        failure,
        &[
            "shop build 1 failed: the installer failed; check requirements.txt",
            "No matching distribution found for djangoo",
            "nothing changed in what serves",
        ],
    );
    assert!(!text(&out.stdout).contains("is live"));
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_deploy_returns_at_once_naming_what_came_first() {
    let platform = Platform::start(Script::Hang).await;
    let dir = platform.app("shop");
    let dir = dir.to_str().unwrap();

    // A build that runs; a newer upload supersedes it.
    let first = platform.spawn(&["deploy", dir]);
    platform
        .wait_event("build 1 started", |e| {
            e.kind == EventKind::BuildStarted && e.build == Some(1)
        })
        .await;
    let mut second = platform.spawn(&["deploy", dir]);
    let (out, exited) = tokio::task::spawn_blocking(move || wait_exit(first))
        .await
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("shop build 1 was superseded by build 2"),
        "{stderr}"
    );
    let superseded_at = platform.repo.state.lock().unwrap().superseded_at.unwrap();
    assert!(
        exited.duration_since(superseded_at) < PROMPTLY,
        "returned {:?} after it was superseded",
        exited.duration_since(superseded_at)
    );
    second.kill().unwrap();
    second.wait().unwrap();

    // A release that never becomes healthy; a newer one supersedes it.
    platform.repo.state.lock().unwrap().uploads = Uploads::Release;
    platform
        .serve
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let third = platform.spawn(&["deploy", dir]);
    platform
        .wait_event("v1 rolling out", |e| {
            e.kind == EventKind::DeployStarted && e.release == Some(1)
        })
        .await;
    let mut fourth = platform.spawn(&["deploy", dir]);
    let (out, exited) = tokio::task::spawn_blocking(move || wait_exit(third))
        .await
        .unwrap();
    let committed = platform.repo.state.lock().unwrap().committed_at.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("shop v1 was superseded by v2 before it served everywhere"),
        "{stderr}"
    );
    assert!(
        exited.saturating_duration_since(committed) < PROMPTLY,
        "returned {:?} after v2 was committed",
        exited.saturating_duration_since(committed)
    );
    fourth.kill().unwrap();
    fourth.wait().unwrap();
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_output_with_terminal_escapes_is_shown_escaped_live_and_in_the_failure() {
    // A hostile build prints sequences that would clear the screen, retitle the window and
    // rewrite the line: each must reach the terminal as visible text, never as control bytes.
    let output = [
        "Collecting\tpackages",
        "\x1b[2J\x1b]0;pwned\x07cleared",
        "progress 10%\rdone",
    ];
    let platform = Platform::start(Script::Fail(
        output.iter().map(|l| l.to_string()).collect(),
        "the installer failed".into(),
    ))
    .await;
    let dir = platform.app("shop");
    let out = platform.em(&["deploy", dir.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "an escape reached the terminal: {stderr:?}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x07'),
        "{stderr:?}"
    );
    assert!(
        stderr.contains("\\x1b[2J\\x1b]0;pwned\\x07cleared"),
        "{stderr}"
    );
    assert!(stderr.contains("progress 10%\\rdone"), "{stderr}");
    // Tabs stay tabs.
    assert!(stderr.contains("Collecting\tpackages"), "{stderr:?}");
    // The failure paragraph quotes the same lines, escaped the same way.
    let failure = &stderr[stderr.find("em: ").expect(&stderr)..];
    assert!(failure.contains("\\x1b[2J"), "{failure}");
    platform.stop().await;
}
