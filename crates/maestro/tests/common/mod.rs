//! Shared set-up for Maestro's tests: Maestro itself (in-process through `run`, or the real
//! binary), a Beacon played by a TLS listener speaking the real link protocol, a bundle server
//! standing in for apprepo's `/v1/bundles`, and small real apps written in Python.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use px_maestro::config::{BeaconConfig, Config};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    AppAssignment, Assignment, FromBeacon, NodeEvent, NodeReport, PROTOCOL_VERSION, ToBeacon,
};
use px_proto::manifest::AppManifest;
use px_test_support::Pki;
use sha2::{Digest, Sha256};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);
pub const BUNDLE_TOKEN: &str = "pxt_bundle-reader";
pub const LINK_TOKEN: &str = "pxt_maestro-link";

/// A small HTTP app: answers every path with `$GREETING`, `/pid` with its pid.
pub const SERVER_PY: &str = r#"import os, sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (str(os.getpid()) if self.path == "/pid" else os.environ.get("GREETING", "hi")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        print("request", *a, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Bundles by digest, served over HTTP like apprepo's `/v1/bundles/{sha256}`.
#[derive(Clone, Default)]
pub struct BundleServer {
    pub bundles: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub url: String,
}

impl BundleServer {
    pub async fn start() -> Self {
        let bundles: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let b = bundles.clone();
        let app = axum::Router::new().route(
            "/v1/bundles/{sha}",
            axum::routing::get(
                move |axum::extract::Path(sha): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap| {
                    let b = b.clone();
                    async move {
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some(&format!("Bearer {BUNDLE_TOKEN}"))
                        {
                            return Err(axum::http::StatusCode::UNAUTHORIZED);
                        }
                        b.lock()
                            .unwrap()
                            .get(&sha)
                            .cloned()
                            .ok_or(axum::http::StatusCode::NOT_FOUND)
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { bundles, url }
    }

    /// Packs an app directory with `app.toml` text and files, stores it, and returns the
    /// assignment entry for it.
    pub fn app(
        &self,
        name: &str,
        release: u64,
        manifest: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> AppAssignment {
        let files: Vec<(&str, &str, u32)> = files.iter().map(|(p, c)| (*p, *c, 0o644)).collect();
        self.app_with_modes(name, release, manifest, &files, env)
    }

    /// [`BundleServer::app`] with a mode per file, so a bundle can ship executables.
    pub fn app_with_modes(
        &self,
        name: &str,
        release: u64,
        manifest: &str,
        files: &[(&str, &str, u32)],
        env: &[(&str, &str)],
    ) -> AppAssignment {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.toml"), manifest).unwrap();
        for (path, content, mode) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        let mut bundle = Vec::new();
        let (summary, parsed) = px_bundle::pack_dir(dir.path(), &mut bundle).unwrap();
        self.bundles
            .lock()
            .unwrap()
            .insert(summary.sha256.clone(), bundle);
        let mut environment = parsed.env.clone();
        environment.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // Beacon's default formation on a one-node cluster: one process of every type.
        let processes = parsed
            .processes
            .keys()
            .filter(|t| px_proto::process::runs_as_process(t))
            .map(|t| (t.clone(), vec![1]))
            .collect();
        AppAssignment {
            app: name.into(),
            release,
            bundle_sha256: summary.sha256.clone(),
            bundle_size: summary.size,
            bundle_url: format!("{}/v1/bundles/{}", self.url, summary.sha256),
            instances: parsed.instances,
            manifest: parsed,
            env: environment,
            domains: vec![format!("{name}.localhost")],
            build: None,
            processes,
            app_created_at: None,
            bundle_unpacked_size: None,
        }
    }

    /// The standard Python app, greeting with `greeting`.
    pub fn python_app(
        &self,
        name: &str,
        release: u64,
        greeting: &str,
        extra_manifest: &str,
    ) -> AppAssignment {
        let manifest = format!(
            "name = \"{name}\"\nrun = \"exec python3 server.py \\\"$1\\\"\"\n[health]\npath = \"/healthz\"\ntimeout = \"20s\"\n[http]\nstatic = {{ \"/assets\" = \"public\" }}\n{extra_manifest}"
        );
        self.app(
            name,
            release,
            &manifest,
            &[("server.py", SERVER_PY), ("public/site.css", "body{}")],
            &[("GREETING", greeting)],
        )
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Beacon's side of one Maestro link, over real TLS.
pub struct FakeBeacon {
    pub addr: String,
    pub pki: Arc<Pki>,
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    /// What its `Welcome` announces: none by default, as a Beacon that predates heartbeat
    /// announcements (so a Maestro keeps the 15 s deadline), since the tests answer the
    /// Maestro's heartbeats only while they read the link.
    pub heartbeat_ms: Option<u64>,
    /// Whether its `Welcome` says it answers every heartbeat: no by default, as above.
    pub answers_heartbeats: bool,
}

pub type BeaconLink = Framed<
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    FrameCodec<ToBeacon, FromBeacon>,
>;

impl FakeBeacon {
    pub async fn start() -> Self {
        let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
        Self::start_at("127.0.0.1:0", pki).await
    }

    /// A Beacon on `addr` whose certificate `pki` issued, as another control host of the same
    /// cluster (whose CA signs every Beacon's certificate) would run it.
    pub async fn start_at(addr: &str, pki: Arc<Pki>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
        );
        Self {
            addr,
            pki,
            listener,
            acceptor,
            heartbeat_ms: None,
            answers_heartbeats: false,
        }
    }

    /// Accepts the next link, checks its hello, welcomes it; returns it and the reported state.
    pub async fn accept(&self) -> (BeaconLink, NodeReport) {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("maestro never linked")
            .unwrap();
        let mut link = Framed::new(self.acceptor.accept(tcp).await.unwrap(), FrameCodec::new());
        let Some(Ok(ToBeacon::Hello(hello))) = link.next().await else {
            panic!("expected hello")
        };
        assert_eq!(hello.token, LINK_TOKEN);
        link.send(FromBeacon::Welcome {
            protocol: PROTOCOL_VERSION,
            beacon: "fake".into(),
            heartbeat_ms: self.heartbeat_ms,
            answers_heartbeats: self.answers_heartbeats,
        })
        .await
        .unwrap();
        (link, hello.state.unwrap_or_default())
    }
}

pub async fn assign(link: &mut BeaconLink, generation: u64, apps: Vec<AppAssignment>) {
    link.send(FromBeacon::Assign(Assignment {
        generation,
        apps,
        builds: Vec::new(),
        phases: Vec::new(),
    }))
    .await
    .unwrap();
}

/// Reads frames until an event satisfying `want` arrives.
pub async fn wait_event(link: &mut BeaconLink, want: impl Fn(&NodeEvent) -> bool) -> NodeEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, link.next())
            .await
            .expect("no such event in time");
        match frame {
            Some(Ok(ToBeacon::Event(event))) if want(&event) => return event,
            // Answer heartbeats as Beacon does, or Maestro leaves a silent link after 15 s.
            Some(Ok(ToBeacon::Heartbeat(_))) => link.send(FromBeacon::Heartbeat).await.unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("link ended: {other:?}"),
        }
    }
}

pub struct Maestro {
    pub http_url: String,
    pub status_url: String,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub http: reqwest::Client,
}

/// A config for tests: its own directories, a port range of its own, short grace periods.
pub fn config(dir: &Path, beacon: Option<&FakeBeacon>) -> Config {
    let token_file = dir.join("bundle-token");
    px_runtime::secrets::write_secret_file(&token_file, BUNDLE_TOKEN).unwrap();
    let link_token = dir.join("link-token");
    px_runtime::secrets::write_secret_file(&link_token, LINK_TOKEN).unwrap();
    // Spread test runs over the range so parallel tests rarely collide (and skip taken ports).
    let base = 30000 + (std::process::id() % 200) as u16 * 100 + (rand_u16() % 100);
    Config {
        node_name: "web-test".into(),
        labels: BTreeMap::new(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        status_listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.join("state"),
        log_dir: dir.join("logs"),
        port_range: (base, base + 2000),
        stop_grace: Duration::from_secs(2),
        drain_deadline: Duration::from_secs(10),
        repository_token_file: Some(token_file),
        beacon: beacon.map(|b| BeaconConfig {
            addr: Some(b.addr.clone()),
            addrs: Vec::new(),
            server_name: Some("localhost".into()),
            ca_file: b.pki.ca(),
            token_file: link_token,
        }),
        ..Config::default()
    }
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos % 65_536) as u16
}

impl Maestro {
    pub async fn start(config: Config) -> Self {
        if std::env::var_os("PX_LOG").is_some() {
            px_runtime::telemetry::init();
        }
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let status = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_url = format!("http://{}", http.local_addr().unwrap());
        let status_url = format!("http://{}", status.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (state_dir, log_dir) = (config.state_dir.clone(), config.log_dir.clone());
        let task = tokio::spawn(async move {
            px_maestro::run(
                config,
                px_maestro::Listeners {
                    http,
                    https: None,
                    status,
                },
                token,
            )
            .await
            .unwrap();
        });
        Self {
            http_url,
            status_url,
            state_dir,
            log_dir,
            shutdown,
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    /// The last lines of every log file Maestro wrote (the apps' output), for a failure's
    /// message: a test that times out then says what the processes said.
    pub fn log_tails(&self) -> String {
        const LINES: usize = 20;
        let mut out = String::new();
        let mut stack = vec![self.log_dir.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(text) = std::fs::read_to_string(&path) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
                    out.push_str(&format!("\n--- {}:\n{tail}", path.display()));
                }
            }
        }
        out
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// GET through the proxy with a Host header.
    pub async fn get(&self, host: &str, path: &str) -> Result<(u16, String), reqwest::Error> {
        let r = self
            .http
            .get(format!("{}{path}", self.http_url))
            .header("host", host)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// Polls until the app answers 200 with `body`.
    pub async fn wait_body(&self, host: &str, body: &str) {
        let start = std::time::Instant::now();
        loop {
            if let Ok((200, text)) = self.get(host, "/").await
                && text == body
            {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{host} never answered {body:?}; last: {:?}",
                self.get(host, "/").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Maestro::wait_body`] while answering `link`'s heartbeats as Beacon does: an app slow to
    /// start on a loaded machine must not leave the link silent past Maestro's deadline, or
    /// Maestro links again and what it says next never reaches `link`.
    pub async fn wait_body_answering(&self, link: &mut BeaconLink, host: &str, body: &str) {
        let served = self.wait_body(host, body);
        tokio::pin!(served);
        loop {
            tokio::select! {
                () = &mut served => return,
                frame = link.next() => match frame {
                    Some(Ok(ToBeacon::Heartbeat(_))) => {
                        link.send(FromBeacon::Heartbeat).await.unwrap();
                    }
                    Some(Ok(_)) => {}
                    other => panic!("the link ended while waiting for {host}: {other:?}"),
                },
            }
        }
    }

    /// The pid of the process that serves `host` (`<app>.localhost`), as Maestro reports it:
    /// the leader of the instance's sandbox, whose end is the instance's end. The app itself
    /// sees another pid inside its own PID namespace, so it cannot tell this one.
    pub async fn pid(&self, host: &str) -> u32 {
        let app = host.trim_end_matches(".localhost");
        let start = std::time::Instant::now();
        loop {
            let state = self.state().await;
            let serving = state
                .instances
                .iter()
                .filter(|i| {
                    i.app == app
                        && i.process == px_proto::procfile::WEB_PROCESS
                        && i.state == px_proto::link::InstanceState::Healthy
                })
                .max_by_key(|i| i.release)
                .and_then(|i| i.pid);
            if let Some(pid) = serving {
                return pid;
            }
            assert!(
                start.elapsed() < WAIT,
                "{app} has no healthy instance: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn state(&self) -> NodeReport {
        self.http
            .get(format!("{}/v1/state", self.status_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub async fn wait_gone(pid: u32) {
    let start = std::time::Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < WAIT, "process {pid} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Manifest text for an app whose instances are this shell command.
pub fn manifest(name: &str, run: &str, timeout: &str) -> String {
    format!("name = \"{name}\"\nrun = {run:?}\n[health]\ntimeout = \"{timeout}\"\n")
}

pub fn _unused(_: AppManifest) {}
