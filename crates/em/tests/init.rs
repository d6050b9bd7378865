//! `em init` and the examples it is made from: the real binary writes each template, the result
//! packs as a bundle, runs the way Maestro runs it (AppRunner, health check, SIGTERM) and is
//! served through Maestro's real proxy, static paths included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use px_maestro::process::{Launch, spawn, stop, wait_healthy};
use px_maestro::proxy::{AccessLog, Proxy, ProxyMetrics, ProxySettings};
use px_maestro::routes::{AppRoute, Backend, RouteTable, Routes};
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
const EXAMPLES: [(&str, &str); 3] = [
    ("python", "python-hello"),
    ("node", "node-chat"),
    ("static", "static-site"),
];

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn em(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_em"));
    command.args(args);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `em init <tmp>/x --template T --name x`, checked to succeed; returns the app directory.
fn init(tmp: &Path, template: &str) -> PathBuf {
    let dir = tmp.join("x");
    let out = em(
        &[
            "init",
            dir.to_str().unwrap(),
            "--template",
            template,
            "--name",
            "x",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "em init failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("app x"), "{stdout}");
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
        let mut child = spawn(
            &Launch {
                app: &manifest.name,
                release: RELEASE,
                dir,
                run: manifest.run.as_deref(),
                env: &manifest.env,
                port,
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
        let backend = Backend::new(
            &manifest.name,
            RELEASE,
            SocketAddr::from(([127, 0, 0, 1], port)),
        );
        let mut table = RouteTable::default();
        table.by_host.insert(
            format!("{}.localhost", manifest.name),
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
        Self { addr, stop }
    }

    /// A client that sends `x.localhost` to the proxy and does not follow redirects.
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .resolve("x.localhost", self.addr)
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://x.localhost:{}{path}", self.addr.port())
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
    let dir = init(tmp.path(), "python");
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "x");
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
    let dir = init(tmp.path(), "node");
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "x");
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
    let dir = init(tmp.path(), "static");
    // A subdirectory, to see how directories without a trailing slash are answered.
    std::fs::create_dir(dir.join("public/docs")).unwrap();
    std::fs::write(dir.join("public/docs/index.html"), "<p>docs</p>\n").unwrap();
    let (manifest, release_dir) = release(&dir, tmp.path());
    assert_eq!(manifest.name, "x");
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

#[test]
fn templates_are_the_examples() {
    for (template, example) in EXAMPLES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = init(tmp.path(), template);
        let source = examples_dir().join(example);
        let written = files_under(&dir);
        let expected = files_under(&source);
        assert_eq!(
            written.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{example}: em init must write every file of the example"
        );
        for (path, original) in &expected {
            let original = text(original);
            let wanted = match path.as_str() {
                "app.toml" => original.replace(&format!("name = \"{example}\""), "name = \"x\""),
                "README.md" => original.replace(example, "x"),
                _ => original,
            };
            assert_eq!(text(&written[path]), wanted, "{example}/{path}");
        }
    }
}

/// Relative path → content of every file under `root`, minus what the runtimes leave behind.
fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let name = entry.file_name();
            if name == "__pycache__" || name == "node_modules" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn examples_parse_and_pack() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let manifest =
            AppManifest::parse(&std::fs::read_to_string(dir.join("app.toml")).unwrap()).unwrap();
        assert_eq!(
            manifest.name, name,
            "examples/{name}: name must match the directory"
        );
        let (summary, packed) = px_bundle::pack_dir(&dir, std::io::sink()).unwrap();
        assert_eq!(packed, manifest);
        assert!(summary.entries >= 4, "examples/{name}: {summary:?}");
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["node-chat", "python-hello", "static-site"]);
}

#[test]
fn init_refuses_a_directory_that_is_not_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("busy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let out = em(&["init", dir.to_str().unwrap(), "--name", "busy"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(dir.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert!(stderr.contains("empty one"), "{stderr}");
    // Nothing was touched.
    assert_eq!(files_under(&dir).len(), 1);

    // Nor a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = em(&["init", file.to_str().unwrap(), "--name", "file"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
}

#[test]
fn init_refuses_a_bad_name_and_suggests_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("y");
    let out = em(&["init", dir.to_str().unwrap(), "--name", "Bad_Name"], None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Bad_Name"), "{stderr}");
    assert!(
        stderr.contains("only lowercase letters, digits and '-'"),
        "{stderr}"
    );
    assert!(stderr.contains("--name bad-name"), "{stderr}");
    assert!(
        !dir.exists(),
        "a refused init must not create the directory"
    );

    // A directory name that is not a valid app name gets the same advice.
    let out = em(&["init", tmp.path().join("My_App").to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("--name my-app"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn init_names_the_app_after_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-site");
    let out = em(
        &["init", dir.to_str().unwrap(), "--template", "static"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("my-site"));
    let manifest =
        AppManifest::parse(&std::fs::read_to_string(dir.join("app.toml")).unwrap()).unwrap();
    assert_eq!(manifest.name, "my-site");

    // `em init` in the current, empty directory (nested, to check the parent is untouched).
    let here = tmp.path().join("nested/hello-2");
    std::fs::create_dir_all(&here).unwrap();
    let out = em(&["init", "--template", "node"], Some(&here));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello-2"),
        "{}",
        text(&out.stdout)
    );
    let manifest =
        AppManifest::parse(&std::fs::read_to_string(here.join("app.toml")).unwrap()).unwrap();
    assert_eq!(manifest.name, "hello-2");
    assert!(here.join("server.js").is_file());
    let readme = std::fs::read_to_string(here.join("README.md")).unwrap();
    assert!(readme.starts_with("# hello-2:"), "{readme}");
}
