//! Shared set-up for Beacon's integration tests: Beacon itself on `127.0.0.1:0` (through
//! `run`), a stand-in repository serving the real `/v1/apps` JSON over HTTP (apprepo is a
//! separate service; the end-to-end path with the real one is tested by `em up`), Maestro and
//! repository links speaking the real protocol over TLS, a Maestro peer that keeps its link
//! alive on its own, and a webhook receiver.
//!
//! The stand-in also serves apprepo's build endpoints (`GET /v1/builds?pending=true`,
//! `GET /v1/apps/{app}/builds/{n}`), which the real apprepo does not have yet in this tree:
//! an end-to-end test with the real apprepo replaces them once it does.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path as UrlPath;
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use px_beacon::auth::Role;
use px_beacon::config::Config;
use px_proto::api::{App, BundleRef, Release, ReleaseCause};
use px_proto::build::{Build, BuildResult};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    Assignment, FromBeacon, Hello, NodeReport, PROTOCOL_VERSION, PeerRole, ToBeacon,
};
use px_proto::manifest::AppManifest;
use px_runtime::tokens::{TokenEntry, generate, hash};
use px_test_support::Pki;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(15);

/// A repository stand-in whose app list and builds the test edits; it can also be made to
/// fail.
#[derive(Clone, Default)]
pub struct RepoStub {
    pub apps: Arc<Mutex<BTreeMap<String, Release>>>,
    /// Builds by app and number, pending while they have no result.
    pub builds: Arc<Mutex<BTreeMap<(String, u64), Build>>>,
    /// Releases whose release phase has not ended (`GET /v1/phases`).
    pub phases: Arc<Mutex<Vec<Release>>>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    pub requests: Arc<std::sync::atomic::AtomicU64>,
    /// How `PUT /v1/leases/beacon` answers (apprepo's lease route; the real one is tested
    /// with apprepo in `crates/e2e/tests/failover.rs`).
    pub lease: Arc<Mutex<LeaseMode>>,
}

/// How the stand-in answers lease claims.
#[derive(Debug, Clone, Default)]
pub enum LeaseMode {
    /// Grants every claim, with this epoch.
    #[default]
    Grant,
    /// Another Beacon, at this API URL, holds it (409).
    HeldBy(String),
    /// apprepo cannot be reached for it (503).
    Down,
}

/// What the stand-in's lease epoch is.
pub const STUB_LEASE_EPOCH: u64 = 7;

impl RepoStub {
    pub async fn start(token: String) -> (Self, String) {
        let stub = RepoStub::default();
        let s = stub.clone();
        let pending = stub.builds.clone();
        let builds = stub.builds.clone();
        let phases = stub.phases.clone();
        let lease = stub.lease.clone();
        let app = axum::Router::new()
            .route(
                "/v1/leases/beacon",
                axum::routing::put(
                    move |axum::Json(claim): axum::Json<px_proto::lease::LeaseClaim>| {
                        let mode = lease.lock().unwrap().clone();
                        async move {
                            use axum::response::IntoResponse;
                            let granted =
                                |holder: String, api_url: String| px_proto::lease::Lease {
                                    holder,
                                    epoch: STUB_LEASE_EPOCH,
                                    expires_at: String::new(),
                                    expires_at_unix_ms: 0,
                                    api_url,
                                };
                            match mode {
                                LeaseMode::Grant => {
                                    axum::Json(granted(claim.holder, claim.api_url)).into_response()
                                }
                                LeaseMode::HeldBy(url) => (
                                    axum::http::StatusCode::CONFLICT,
                                    axum::Json(px_proto::lease::LeaseHeld {
                                        code: "lease_held".into(),
                                        message: "held".into(),
                                        lease: granted("other".into(), url),
                                    }),
                                )
                                    .into_response(),
                                LeaseMode::Down => {
                                    axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                                }
                            }
                        }
                    },
                ),
            )
            .route(
                "/v1/phases",
                get(move || {
                    let phases = phases.clone();
                    async move { axum::Json(phases.lock().unwrap().clone()) }
                }),
            )
            .route(
                "/v1/builds",
                get(
                    move |axum::extract::Query(q): axum::extract::Query<
                        BTreeMap<String, String>,
                    >| {
                        let pending = pending.clone();
                        async move {
                            assert_eq!(q.get("pending").map(String::as_str), Some("true"));
                            let list: Vec<Build> = pending
                                .lock()
                                .unwrap()
                                .values()
                                .filter(|b| b.result.is_none())
                                .cloned()
                                .collect();
                            axum::Json(list)
                        }
                    },
                ),
            )
            .route(
                "/v1/apps/{app}/builds/{n}",
                get(move |UrlPath((app, n)): UrlPath<(String, u64)>| {
                    let builds = builds.clone();
                    async move {
                        builds
                            .lock()
                            .unwrap()
                            .get(&(app, n))
                            .cloned()
                            .map(axum::Json)
                            .ok_or(axum::http::StatusCode::NOT_FOUND)
                    }
                }),
            )
            .route(
                "/v1/apps",
                get(move |headers: axum::http::HeaderMap| {
                    let s = s.clone();
                    let token = token.clone();
                    async move {
                        s.requests
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if s.down.load(std::sync::atomic::Ordering::Relaxed) {
                            return Err(axum::http::StatusCode::SERVICE_UNAVAILABLE);
                        }
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some(&format!("Bearer {token}"))
                        {
                            return Err(axum::http::StatusCode::UNAUTHORIZED);
                        }
                        let apps: Vec<App> = s
                            .apps
                            .lock()
                            .unwrap()
                            .values()
                            .map(|r| App {
                                name: r.app.clone(),
                                created_at: r.created_at.clone(),
                                created_by: "ci".into(),
                                current: Some(r.clone()),
                                formation: Default::default(),
                                domains: Vec::new(),
                            })
                            .collect();
                        Ok(axum::Json(apps))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (stub, url)
    }

    pub fn release(&self, app: &str, version: u64, manifest_extra: &str) {
        let manifest = AppManifest::parse(&format!(
            "name = \"{app}\"\nrun = \"python3 server.py\"\n{manifest_extra}"
        ))
        .unwrap();
        let release = Release {
            app: app.into(),
            version,
            bundle: BundleRef {
                sha256: format!("{version:064x}"),
                size: 1000 + version,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest,
            config: BTreeMap::from([("DATABASE_URL".to_string(), "postgres://db".to_string())]),
            cause: ReleaseCause::Deploy,
            description: "deploy".into(),
            created_at: "2026-11-25T00:00:00Z".into(),
            created_by: "ci".into(),
            build: None,
            phase: None,
            config_hidden: false,
        };
        self.apps.lock().unwrap().insert(app.into(), release);
    }

    /// Release `version` of `app` waiting for its release phase `command` (the current release
    /// stays what `release` set).
    pub fn pending_phase(&self, app: &str, version: u64, command: &str) {
        let mut release = self.apps.lock().unwrap()[app].clone();
        release.version = version;
        release.phase = Some(px_proto::api::ReleasePhase {
            command: command.into(),
            timeout_secs: 600,
            state: px_proto::api::PhaseState::Pending,
        });
        self.phases.lock().unwrap().push(release);
    }

    /// The phases' end: none is unended any more.
    pub fn end_phases(&self) {
        self.phases.lock().unwrap().clear();
    }

    /// An upload of `app` waiting for build `number`.
    pub fn pending_build(&self, app: &str, number: u64) {
        let build = Build {
            app: app.into(),
            number,
            source: BundleRef {
                sha256: format!("{:064x}", 0xb000 + number),
                size: 2000 + number,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest: AppManifest::parse(&format!(
                "name = \"{app}\"\nrun = \"python3 server.py\"\n"
            ))
            .unwrap(),
            description: "deploy".into(),
            created_at: "2026-11-25T00:00:00Z".into(),
            created_by: "ci".into(),
            result: None,
        };
        self.builds
            .lock()
            .unwrap()
            .insert((app.into(), number), build);
    }

    /// Gives build `number` of `app` its result: it leaves the pending list.
    pub fn end_build(&self, app: &str, number: u64, result: BuildResult) {
        self.builds
            .lock()
            .unwrap()
            .get_mut(&(app.to_string(), number))
            .unwrap()
            .result = Some(result);
    }
}

pub struct Beacon {
    pub http_url: String,
    pub control_addr: String,
    pub pki: Arc<Pki>,
    pub read_token: String,
    pub maestro_token: NodeTokens,
    pub repository_token: String,
    pub data_dir: PathBuf,
    pub config: Config,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub http: reqwest::Client,
}

pub struct Tokens {
    pub read: String,
    /// One link token per node name, each bound to its node as Beacon requires.
    pub maestro: NodeTokens,
    pub repository: String,
    pub repo_read: String,
}

impl Tokens {
    pub fn new() -> Self {
        Self {
            read: generate(),
            maestro: NodeTokens::new(),
            repository: generate(),
            repo_read: generate(),
        }
    }
}

/// An HTTP client that trusts `pki`'s CA alone, as `em` with the cluster's `ca_file` does.
pub fn https_client(pki: &Pki) -> reqwest::Client {
    https_client_builder(pki).build().unwrap()
}

/// [`https_client`]'s builder, for tests that set more.
pub fn https_client_builder(pki: &Pki) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
}

/// Writes a Beacon config into `dir`.
pub fn config(dir: &Path, pki: &Pki, tokens: &Tokens, repo_url: &str) -> Config {
    let repo_token_file = dir.join("repo-token");
    px_runtime::secrets::write_secret_file(&repo_token_file, &tokens.repo_read).unwrap();
    let mut config = Config {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        tls_cert_file: pki.cert(),
        tls_key_file: pki.key(),
        tokens: vec![
            TokenEntry {
                name: "em".into(),
                role: Role::Read,
                sha256: hash(&tokens.read),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "apprepo".into(),
                role: Role::Repository,
                sha256: hash(&tokens.repository),
                node: None,
                apps: None,
            },
        ],
        ..Config::default()
    };
    config.tokens.extend(tokens.maestro.entries());
    config.repository.url = repo_url.into();
    config.repository.token_file = repo_token_file;
    config
}

impl Beacon {
    /// Starts Beacon with `config` (whose listen addresses are ignored: it binds port 0, or
    /// `control_port` when given so a restarted Beacon keeps its address).
    pub async fn start(config: Config, pki: Arc<Pki>, tokens: &Tokens, control_port: u16) -> Self {
        Self::start_with(config, pki, tokens, control_port, None).await
    }

    /// [`Beacon::start`], reloading when the returned trigger asks, with the configuration
    /// `next` holds then.
    pub async fn start_reloadable(
        config: Config,
        pki: Arc<Pki>,
        tokens: &Tokens,
        next: Arc<Mutex<Config>>,
    ) -> (Self, px_runtime::systemd::ReloadTrigger) {
        let (trigger, requests) = px_runtime::systemd::ReloadRequests::manual();
        let reload = px_runtime::systemd::Reload {
            requests,
            load: Box::new(move || Ok(next.lock().unwrap().clone())),
        };
        let beacon = Self::start_with(config, pki, tokens, 0, Some(reload)).await;
        (beacon, trigger)
    }

    async fn start_with(
        config: Config,
        pki: Arc<Pki>,
        tokens: &Tokens,
        control_port: u16,
        reload: Option<px_runtime::systemd::Reload<Config>>,
    ) -> Self {
        if std::env::var_os("PX_LOG").is_some() {
            px_runtime::telemetry::init();
        }
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control = tokio::net::TcpListener::bind(("127.0.0.1", control_port))
            .await
            .unwrap();
        // Beacon's API serves HTTPS with its control-link certificate (for `localhost`).
        let http_url = format!("https://localhost:{}", http.local_addr().unwrap().port());
        let control_addr = control.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let run_config = config.clone();
        let systemd = px_runtime::systemd::Systemd {
            notifier: px_runtime::systemd::Notifier::disabled(),
            watchdog: None,
            reload,
        };
        let pki_for_client = pki.clone();
        let task = tokio::spawn(async move {
            px_beacon::run_with(
                run_config,
                px_beacon::Listeners { http, control },
                token,
                systemd,
            )
            .await
            .unwrap();
        });
        let beacon = Self {
            http_url,
            control_addr,
            pki,
            read_token: tokens.read.clone(),
            maestro_token: tokens.maestro.clone(),
            repository_token: tokens.repository.clone(),
            data_dir: config.data_dir.clone(),
            config,
            shutdown,
            task: Some(task),
            http: https_client(&pki_for_client),
        };
        // A client of its own, dropped with its kept-alive connection, so that a test counting
        // connections starts from none.
        let probe = https_client(&beacon.pki);
        for _ in 0..200 {
            if probe
                .get(format!("{}/healthz", beacon.http_url))
                .send()
                .await
                .is_ok()
            {
                return beacon;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("beacon did not start");
    }

    pub fn control_port(&self) -> u16 {
        self.control_addr
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let r = self
            .http
            .get(format!("{}{path}", self.http_url))
            .bearer_auth(&self.read_token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Polls `check` on the API until it holds.
    pub async fn wait_for<T, F>(&self, path: &str, what: &str, check: F) -> T
    where
        T: serde::de::DeserializeOwned + std::fmt::Debug,
        F: Fn(&T) -> bool,
    {
        let start = std::time::Instant::now();
        loop {
            let value: T = self.get(path).await;
            if check(&value) {
                return value;
            }
            if start.elapsed() > WAIT {
                panic!("timed out waiting for {what}; last {path}: {value:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn events(&self) -> Vec<px_proto::beacon::Event> {
        self.get("/v1/events?limit=1000").await
    }

    pub async fn wait_for_event(
        &self,
        kind: px_proto::beacon::EventKind,
        what: &str,
    ) -> px_proto::beacon::Event {
        let events: Vec<px_proto::beacon::Event> = self
            .wait_for(
                "/v1/events?limit=1000",
                what,
                |events: &Vec<px_proto::beacon::Event>| events.iter().any(|e| e.kind == kind),
            )
            .await;
        events.into_iter().find(|e| e.kind == kind).unwrap()
    }
}

pub type Link = Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    FrameCodec<FromBeacon, ToBeacon>,
>;

/// Opens a TLS link trusting `ca` and sends `hello`; returns the link and Beacon's answer.
pub async fn open_link(addr: &str, ca: &Path, hello: Hello) -> (Link, FromBeacon) {
    let tls = px_runtime::tls::client_config(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut link = Framed::new(stream, FrameCodec::new());
    link.send(ToBeacon::Hello(hello)).await.unwrap();
    let answer = tokio::time::timeout(WAIT, link.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (link, answer)
}

pub fn repository_hello(name: &str, token: &str) -> Hello {
    Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Repository,
        name: name.into(),
        token: token.into(),
        software: "test".into(),
        labels: BTreeMap::new(),
        state: None,
    }
}

/// The node names the tests link as; each gets a Maestro token of its own.
pub const TEST_NODES: &[&str] = &[
    "web-0", "web-1", "web-2", "web-3", "web-4", "web-5", "web-6", "web-7", "web-8", "web-9",
    "build-0", "build-1", "build-2", "api-1", "local", "new-py", "old-py", "no-py",
];

/// Maestro link tokens, one per node of [`TEST_NODES`], each bound to that node's name.
#[derive(Clone)]
pub struct NodeTokens(BTreeMap<String, String>);

impl NodeTokens {
    pub fn new() -> Self {
        Self(
            TEST_NODES
                .iter()
                .map(|node| (node.to_string(), generate()))
                .collect(),
        )
    }

    /// The token bound to `node`.
    pub fn of(&self, node: &str) -> &str {
        self.0
            .get(node)
            .unwrap_or_else(|| panic!("no test token for node {node:?}; add it to TEST_NODES"))
    }

    /// Beacon's entries for these tokens.
    pub fn entries(&self) -> Vec<TokenEntry<Role>> {
        self.0
            .iter()
            .map(|(node, token)| TokenEntry {
                name: format!("maestro-{node}"),
                role: Role::Maestro,
                sha256: hash(token),
                node: Some(node.clone()),
                apps: None,
            })
            .collect()
    }
}

/// What a hello helper takes as its token: a token itself, or the per-node tokens, from which
/// the one bound to the hello's node is taken.
pub trait TokenFor {
    fn token_for(&self, node: &str) -> String;
}

impl TokenFor for str {
    fn token_for(&self, _node: &str) -> String {
        self.to_string()
    }
}

impl TokenFor for String {
    fn token_for(&self, _node: &str) -> String {
        self.clone()
    }
}

impl TokenFor for NodeTokens {
    fn token_for(&self, node: &str) -> String {
        self.of(node).to_string()
    }
}

pub fn maestro_hello(name: &str, token: &(impl TokenFor + ?Sized), generation: u64) -> Hello {
    Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Maestro,
        name: name.into(),
        token: token.token_for(name),
        software: "test".into(),
        labels: BTreeMap::new(),
        state: Some(NodeReport {
            generation,
            instances: Vec::new(),
            rollouts: Vec::new(),
            disk: None,
            builds: Vec::new(),
        }),
    }
}

/// Reads frames until an `Assign` arrives (heartbeats are skipped).
pub async fn next_assign(link: &mut Link) -> px_proto::link::Assignment {
    loop {
        match tokio::time::timeout(WAIT, link.next())
            .await
            .expect("no assignment in time")
        {
            Some(Ok(FromBeacon::Assign(a))) => return a,
            Some(Ok(FromBeacon::Heartbeat)) => continue,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}

/// A webhook receiver recording every body it gets.
pub async fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let r = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let r = r.clone();
            async move {
                r.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// How often a [`Peer`] sends its report: well within any `node_lost_after` a test sets.
pub const PEER_HEARTBEAT: Duration = Duration::from_millis(100);

/// A Maestro that keeps its link alive on its own: it sends its report every
/// [`PEER_HEARTBEAT`] (taking each assignment's generation as applied, as Maestro does), sends
/// what the test gives it, and keeps every assignment it receives.
pub struct Peer {
    pub name: String,
    /// What it reports; the test edits it (instances, builds).
    pub report: Arc<Mutex<NodeReport>>,
    assignments: Arc<Mutex<Vec<Assignment>>>,
    frames: tokio::sync::mpsc::UnboundedSender<ToBeacon>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    /// Links `hello` to Beacon; panics unless it is welcomed.
    pub async fn link(beacon: &Beacon, hello: Hello) -> Self {
        let name = hello.name.clone();
        let report = Arc::new(Mutex::new(hello.state.clone().unwrap_or_default()));
        let (mut link, answer) = open_link(&beacon.control_addr, &beacon.pki.ca(), hello).await;
        assert!(
            matches!(answer, FromBeacon::Welcome { .. }),
            "{name}: {answer:?}"
        );
        let assignments: Arc<Mutex<Vec<Assignment>>> = Arc::default();
        let (frames, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<ToBeacon>();
        let (kept, shared) = (assignments.clone(), report.clone());
        let task = tokio::spawn(async move {
            let mut beat = tokio::time::interval(PEER_HEARTBEAT);
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        let report = shared.lock().unwrap().clone();
                        if link.send(ToBeacon::Heartbeat(report)).await.is_err() {
                            return;
                        }
                    }
                    frame = outgoing.recv() => match frame {
                        Some(frame) => if link.send(frame).await.is_err() { return },
                        None => return,
                    },
                    frame = link.next() => match frame {
                        Some(Ok(FromBeacon::Assign(assignment))) => {
                            shared.lock().unwrap().generation = assignment.generation;
                            kept.lock().unwrap().push(assignment);
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
        });
        Self {
            name,
            report,
            assignments,
            frames,
            task,
        }
    }

    /// Sends a frame (an event, logs) on the link.
    pub fn send(&self, frame: ToBeacon) {
        self.frames.send(frame).unwrap();
    }

    /// Every assignment received so far.
    pub fn assignments(&self) -> Vec<Assignment> {
        self.assignments.lock().unwrap().clone()
    }

    /// The builds of the latest assignment, as `app#n`.
    pub fn builds(&self) -> Vec<String> {
        self.assignments
            .lock()
            .unwrap()
            .last()
            .map(|a| {
                a.builds
                    .iter()
                    .map(|b| format!("{}#{}", b.app, b.build))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the latest assignment's builds are `expected`.
    pub async fn wait_builds(&self, expected: &[&str]) {
        let start = std::time::Instant::now();
        while self.builds() != expected {
            assert!(
                start.elapsed() < WAIT,
                "{} was never assigned builds {expected:?}; its assignments: {:?}",
                self.name,
                self.assignments()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the link, as a Maestro that crashed; returns what it last reported.
    pub async fn stop(self) -> NodeReport {
        self.task.abort();
        let _ = self.task.await;
        self.report.lock().unwrap().clone()
    }
}

/// A Maestro's `Hello` with labels.
pub fn labelled_hello(
    name: &str,
    token: &(impl TokenFor + ?Sized),
    labels: &[(&str, &str)],
) -> Hello {
    let mut hello = maestro_hello(name, token, 0);
    hello.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    hello
}

/// A report of one healthy `web` instance of `app` at `release`.
pub fn report_of(app: &str, release: u64) -> NodeReport {
    NodeReport {
        generation: 1,
        instances: vec![px_proto::link::InstanceStatus {
            app: app.into(),
            release,
            state: px_proto::link::InstanceState::Healthy,
            pid: Some(4242),
            port: Some(20001),
            restarts: 0,
            last_exit: None,
            process: "web".into(),
            number: 1,
            started_at: None,
            memory_bytes: None,
            cpu_permille: None,
        }],
        rollouts: Vec::new(),
        disk: None,
        builds: Vec::new(),
    }
}
