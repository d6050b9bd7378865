//! The examples (the templates `em init` writes) run the way Maestro runs an app: the AppRunner
//! contract, the health check, SIGTERM at stop, and Maestro's real proxy in front, static paths
//! included. (`crates/em/tests/init.rs` checks that the templates are these examples.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use px_maestro::internals::{
    AccessLog, AppRoute, Backend, Launch, Proxy, ProxyMetrics, ProxySettings, RouteTable, Routes,
    instance_path, spawn, stop, wait_healthy,
};
use px_proto::manifest::AppManifest;
use px_test_support::free_port;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

/// How long a stopped instance may take to exit, as Maestro's `stop_grace`.
const GRACE: Duration = Duration::from_secs(10);

/// The release number the tests pretend to run.
const RELEASE: u64 = 7;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of `examples/<name>` under `tmp`, which a test may add files to.
fn example(tmp: &Path, name: &str) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let dir = tmp.join(name);
    copy(&examples_dir().join(name), &dir);
    dir
}

/// Packs `dir` and unpacks the bundle into a release directory, as a deploy does.
fn release(dir: &Path, into: &Path) -> (AppManifest, PathBuf) {
    let mut bundle = Vec::new();
    let (_, manifest) = px_bundle::pack_dir(dir, &mut bundle).unwrap();
    // The release directory itself must not exist yet: unpacking creates it.
    std::fs::create_dir_all(into.join("releases")).unwrap();
    let release_dir = into.join(format!("releases/{RELEASE}"));
    px_bundle::unpack(
        bundle.as_slice(),
        &release_dir,
        &px_bundle::Limits::default(),
    )
    .unwrap();
    (manifest, release_dir)
}

/// An instance started through the AppRunner contract, with its output collected.
struct Instance {
    child: Child,
    port: u16,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Instance {
    async fn start(manifest: &AppManifest, dir: &Path) -> Self {
        let port = free_port();
        let path = instance_path(dir);
        let mut child = spawn(
            &Launch {
                app: &manifest.name,
                release: RELEASE,
                dir,
                run: manifest.run.as_deref(),
                path: &path,
                env: &manifest.env,
                port: Some(port),
                extra_env: Vec::new(),
            },
            &[],
        )
        .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let http = reqwest::Client::new();
        let healthy = wait_healthy(&mut child, port, &manifest.health, &http).await;
        let instance = Self {
            child,
            port,
            stdout,
            stderr,
        };
        if let Err(e) = healthy {
            panic!(
                "{} did not become healthy: {e}\n{}",
                manifest.name,
                instance.output()
            );
        }
        instance
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Stops it as Maestro does; returns how it ended and how long that took.
    async fn stop(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let status = stop(&mut self.child, GRACE).await.unwrap();
        let took = started.elapsed();
        assert!(
            took < GRACE,
            "the instance ignored SIGTERM for {took:?}\n{}",
            self.output()
        );
        (status, took)
    }
}

fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(reader: R) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut sink = sink.lock().unwrap();
            sink.push_str(&line);
            sink.push('\n');
        }
    });
    text
}

/// Maestro's real proxy in front of one instance, with the manifest's static paths mapped
/// into the release directory exactly as the supervisor maps them.
struct Front {
    addr: SocketAddr,
    /// `<app>.localhost`, the host the route answers.
    host: String,
    stop: CancellationToken,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Front {
    async fn start(manifest: &AppManifest, release_dir: &Path, port: u16) -> Self {
        let static_dirs = manifest
            .http
            .static_dirs
            .iter()
            .map(|(prefix, dir)| {
                (
                    prefix.trim_end_matches('/').to_string(),
                    release_dir.join(dir),
                )
            })
            .collect();
        let host = format!("{}.localhost", manifest.name);
        let backend = Backend::new(
            &manifest.name,
            RELEASE,
            SocketAddr::from(([127, 0, 0, 1], port)),
        );
        let mut table = RouteTable::default();
        table.by_host.insert(
            host.clone(),
            Arc::new(AppRoute::new(
                &manifest.name,
                RELEASE,
                vec![backend],
                static_dirs,
            )),
        );
        let routes = Arc::new(Routes::default());
        routes.store(table);
        let proxy = Proxy::new(
            routes,
            ProxySettings::default(),
            Arc::new(ProxyMetrics::default()),
            AccessLog::disabled(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(proxy.serve_http(listener, stop.clone()));
        Self { addr, host, stop }
    }

    /// A client that sends the app's host to the proxy and does not follow redirects.
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .resolve(&self.host, self.addr)
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.addr.port())
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn python_template_runs_and_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = example(tmp.path(), "python-hello");
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "python-hello");
    assert_eq!(manifest.health.path.as_deref(), Some("/healthz"));

    let mut instance = Instance::start(&manifest, &release_dir).await;
    let direct = reqwest::Client::new();
    let (status, content_type, page) = get(&direct, &instance.url("/")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.contains("Hello from Platform.X"), "{page}");
    assert!(
        page.contains(&format!("release <code>{RELEASE}</code>")),
        "{page}"
    );
    assert!(page.contains("/static/style.css"), "{page}");
    assert_eq!(
        get(&direct, &instance.url("/healthz")).await,
        (200, "text/plain; charset=utf-8".into(), "ok\n".into())
    );
    assert_eq!(get(&direct, &instance.url("/nope")).await.0, 404);

    // Keep-alive: several requests over one connection, each delimited by Content-Length.
    let reused = raw_keep_alive(instance.port, &["/healthz", "/", "/healthz"]).await;
    assert_eq!(reused, 3);

    // Through Maestro's proxy: the page from the app, the stylesheet from public/.
    let front = Front::start(&manifest, &release_dir, instance.port).await;
    let client = front.client();
    let (status, _, proxied) = get(&client, &front.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(proxied, page);
    let (status, content_type, css) = get(&client, &front.url("/static/style.css")).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/css; charset=utf-8");
    assert_eq!(
        css,
        std::fs::read_to_string(dir.join("public/style.css")).unwrap()
    );

    let stdout = instance.stdout.lock().unwrap().clone();
    assert!(stdout.contains("GET / 200"), "{}", instance.output());
    assert!(stdout.contains("GET /healthz 200"), "{}", instance.output());
    assert!(
        !stdout.contains("/static/style.css"),
        "the app saw a static request\n{}",
        instance.output()
    );

    let (status, _) = instance.stop().await;
    assert!(status.success(), "{status:?}\n{}", instance.output());
    assert!(instance.stdout.lock().unwrap().contains("stopped"));
}

/// Sends GETs for `paths` over one connection; returns how many responses came back on it.
async fn raw_keep_alive(port: u16, paths: &[&str]) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut answered = 0;
    for path in paths {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        // Read the head, then exactly Content-Length bytes of body.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = text(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("a content-length header")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        answered += 1;
    }
    answered
}

#[tokio::test(flavor = "multi_thread")]
async fn node_template_chats_with_long_polling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = example(tmp.path(), "node-chat");
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "node-chat");
    assert_eq!(manifest.health.path.as_deref(), Some("/healthz"));

    let mut instance = Instance::start(&manifest, &release_dir).await;
    let direct = reqwest::Client::new();
    let (status, content_type, page) = get(&direct, &instance.url("/")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.contains("/messages?after="), "{page}");
    assert!(page.contains("/static/style.css"), "{page}");
    assert!(page.contains(&format!("<code>{RELEASE}</code>")), "{page}");
    assert_eq!(get(&direct, &instance.url("/healthz")).await.0, 200);

    // A message, then a poll from the start returns it at once.
    let posted = direct
        .post(instance.url("/messages"))
        .json(&json!({ "text": "first" }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let first: Value = posted.json().await.unwrap();
    assert_eq!(first["text"], "first");
    let started = Instant::now();
    let polled: Value = direct
        .get(instance.url("/messages?after=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(polled["messages"][0]["text"], "first");
    let last = polled["last"].as_u64().unwrap();
    assert_eq!(Some(last), first["id"].as_u64());

    // A poll with nothing new waits, and the next message ends the wait.
    let waiting = tokio::spawn({
        let client = direct.clone();
        let url = instance.url(&format!("/messages?after={last}"));
        async move {
            let response = client.get(url).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the poll did not wait");

    // That message goes through Maestro's proxy, which also serves the stylesheet.
    let front = Front::start(&manifest, &release_dir, instance.port).await;
    let client = front.client();
    let posted = client
        .post(front.url("/messages"))
        .json(&json!({ "text": "second" }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting poll got the new message")
        .unwrap();
    assert_eq!(status, 200);
    let texts: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["second"]);
    let last = body["last"].as_u64().unwrap();
    let (status, content_type, css) = get(&client, &front.url("/static/style.css")).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/css; charset=utf-8")
    );
    assert_eq!(
        css,
        std::fs::read_to_string(dir.join("public/style.css")).unwrap()
    );

    // Bad input: an oversized body and a body without text.
    let big = json!({ "text": "a".repeat(5000) }).to_string();
    let response = direct
        .post(instance.url("/messages"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let response = direct
        .post(instance.url("/messages"))
        .body("{\"nope\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        get(&direct, &instance.url("/messages?after=x")).await.0,
        400
    );

    // SIGTERM ends a waiting poll with 503 and Retry-After, then the server exits cleanly.
    let waiting = tokio::spawn({
        let client = direct.clone();
        let url = instance.url(&format!("/messages?after={last}"));
        async move {
            let response = client.get(url).send().await.unwrap();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), retry)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the poll did not wait");
    let (status, _) = instance.stop().await;
    assert!(status.success(), "{status:?}\n{}", instance.output());
    let (poll_status, retry_after) = waiting.await.unwrap();
    assert_eq!(poll_status, 503);
    assert_eq!(retry_after.as_deref(), Some("1"));

    let stdout = instance.stdout.lock().unwrap().clone();
    assert!(
        stdout.contains("POST /messages 201"),
        "{}",
        instance.output()
    );
    assert!(stdout.contains("stopped"), "{}", instance.output());
    assert!(!stdout.contains("/static/"), "{}", instance.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn static_template_is_served_by_maestro_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = example(tmp.path(), "static-site");
    // A subdirectory, to see how directories without a trailing slash are answered.
    std::fs::create_dir(dir.join("public/docs")).unwrap();
    std::fs::write(dir.join("public/docs/index.html"), "<p>docs</p>\n").unwrap();
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "static-site");
    assert_eq!(manifest.health.path, None);
    assert_eq!(manifest.http.static_dirs["/"], "public");

    let mut instance = Instance::start(&manifest, &release_dir).await;
    let index = std::fs::read_to_string(dir.join("public/index.html")).unwrap();
    // The stand-in process serves the same files when asked directly.
    let direct = reqwest::Client::new();
    assert_eq!(get(&direct, &instance.url("/")).await.2, index);
    // http.server logs each request on stderr: that is how a request reaching it is seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked_directly = instance.stderr.lock().unwrap().matches("GET ").count();
    assert_eq!(asked_directly, 1, "{}", instance.output());

    let front = Front::start(&manifest, &release_dir, instance.port).await;
    let client = front.client();
    let (status, content_type, body) = get(&client, &front.url("/")).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    assert_eq!(body, index);
    let (status, _, body) = get(&client, &front.url("/about.html")).await;
    assert_eq!(status, 200);
    assert!(body.contains("About this site"), "{body}");
    let (status, content_type, body) = get(&client, &front.url("/style.css")).await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/css; charset=utf-8")
    );
    assert_eq!(
        body,
        std::fs::read_to_string(dir.join("public/style.css")).unwrap()
    );
    // No pretty URLs, directories get their slash, and nothing falls through to the app.
    assert_eq!(get(&client, &front.url("/about")).await.0, 404);
    let response = client.get(front.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(response.headers()["location"], "/docs/");
    assert_eq!(get(&client, &front.url("/docs/")).await.2, "<p>docs</p>\n");
    let response = client.post(front.url("/")).body("x").send().await.unwrap();
    assert_eq!(response.status(), 405);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        instance.stderr.lock().unwrap().matches("GET ").count(),
        asked_directly,
        "a request through the proxy reached the app\n{}",
        instance.output()
    );

    // python's http.server has no SIGTERM handler: the signal ends it at once.
    let (status, _) = instance.stop().await;
    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        status.success() || status.signal() == Some(15),
        "{status:?}\n{}",
        instance.output()
    );
}
