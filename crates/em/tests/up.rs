//! The developer's day against the real platform: `em up` (the real binary, all three services)
//! and the real `em`: init → deploy → the app through the proxy → change a file → deploy again
//! with a client polling throughout and no failed request → config set → rollback → logs;
//! then Ctrl-C, and `em up` again brings the same app back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use px_proto::beacon::AppProcess;

const BIN: &str = env!("CARGO_BIN_EXE_em");
const WAIT: Duration = Duration::from_secs(60);

struct Env {
    home: tempfile::TempDir,
    http_port: u16,
    port_base: u16,
}

impl Env {
    fn new() -> Self {
        // Four consecutive free ports for the platform's services.
        let port_base = loop {
            let base = px_test_support::free_port();
            if base < 60000
                && (1..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            {
                break base;
            }
        };
        // The kernel hands out free ports near each other: the proxy's stays out of the four.
        let http_port = loop {
            let port = px_test_support::free_port();
            if !(port_base..port_base + 4).contains(&port) {
                break port;
            }
        };
        Self {
            home: tempfile::tempdir().unwrap(),
            http_port,
            port_base,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("XDG_DATA_HOME", self.home.path().join("data"))
            .env("HOME", self.home.path())
            .env("PX_LOG", "warn");
        command
    }

    fn em(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "em {args:?} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn up(&self) -> Child {
        self.up_with(&[])
    }

    fn up_with(&self, extra: &[&str]) -> Child {
        let (http_port, port_base) = (self.http_port.to_string(), self.port_base.to_string());
        let mut args = vec!["up", "--http-port", &http_port, "--port-base", &port_base];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        px_test_support::wait_for_port(self.http_port, Duration::from_secs(30)).unwrap();
        px_test_support::wait_for_port(self.port_base, Duration::from_secs(30)).unwrap();
        // The ports are bound before the services start; the em config comes once they run.
        let config = self.home.path().join("config/em/config.toml");
        let start = Instant::now();
        while !config.exists() {
            assert!(
                start.elapsed() < WAIT,
                "em up never wrote {}",
                config.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http_port)
    }
}

fn stop(mut child: Child) {
    nix_kill(child.id(), "INT");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "em up exited with {status:?}");
            return;
        }
        assert!(start.elapsed() < WAIT, "em up did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nix_kill(pid: u32, signal: &str) {
    assert!(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
}

async fn body(http: &reqwest::Client, url: &str, host: &str) -> Option<String> {
    let r = http.get(url).header("host", host).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

async fn wait_for(http: &reqwest::Client, url: &str, host: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(text) = body(http, url, host).await
            && text.contains(needle)
        {
            return text;
        }
        assert!(start.elapsed() < WAIT, "{host} never showed {needle:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a counter reaches `at_least` (how many requests a poller has had answered).
async fn wait_count(counter: &AtomicU64, at_least: u64) {
    let start = Instant::now();
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < WAIT,
            "the poller got only {} answers",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_deploy_change_configure_roll_back_and_read_logs() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("shop");
    let app_dir_s = app_dir.to_str().unwrap();
    let host = "shop.localhost";

    let out = env.em(&["init", app_dir_s, "--template", "python"]);
    assert!(out.status.success());
    let out = env.em(&["deploy", app_dir_s, "--json"]);
    assert!(out.status.success());
    let deployed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deployed["app"], "shop");
    assert_eq!(deployed["release"], 1);
    assert_eq!(deployed["rolled_out"], true);
    assert_eq!(
        deployed["url"],
        format!("http://shop.localhost:{}/", env.http_port)
    );
    let first = wait_for(&http, &env.url(), host, "Platform.X").await;

    // Change a file and deploy again while a client polls: no request may fail.
    let server = app_dir.join("server.py");
    let greeting_file = app_dir.join("app.toml");
    replace_in(
        &greeting_file,
        "Hello from Platform.X",
        "Hello again from Platform.X",
    );
    let stop_polling = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let poller = {
        let (stop, served, failed, url) = (
            stop_polling.clone(),
            served.clone(),
            failed.clone(),
            env.url(),
        );
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match body(&http, &url, host).await {
                    Some(_) => served.fetch_add(1, Ordering::Relaxed),
                    None => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    // The poller is running before the deploy starts, and keeps running after it ends.
    wait_count(&served, 5).await;
    let out = env.em(&["deploy", app_dir_s]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("shop v2 is live"), "{stdout}");
    let second = wait_for(&http, &env.url(), host, "Hello again").await;
    assert_ne!(first, second);
    wait_count(&served, served.load(Ordering::Relaxed) + 5).await;
    stop_polling.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the redeploy"
    );
    assert!(server.exists());

    // Config vars are a new release; rollback is another.
    let out = env.em(&[
        "config",
        "set",
        "GREETING=Configured greeting",
        "--app",
        "shop",
    ]);
    assert!(out.status.success());
    wait_for(&http, &env.url(), host, "Configured greeting").await;
    let out = env.em(&["config", "--app", "shop", "--json"]);
    let vars: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vars["GREETING"], "Configured greeting");
    let out = env.em(&["rollback", "--app", "shop"]);
    assert!(out.status.success());
    wait_for(&http, &env.url(), host, "Hello again").await;
    let out = env.em(&["releases", "--app", "shop", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(releases.len(), 4);
    assert_eq!(releases[0]["cause"]["kind"], "rollback");

    // Logs: the app's request lines, from the node.
    let start = Instant::now();
    loop {
        let out = env.em(&["logs", "--app", "shop", "--lines", "200"]);
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains("GET /") {
            assert!(text.contains("local"), "{text}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no request lines in em logs: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = env.em(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["nodes"][0]["name"], "local");

    // Ctrl-C stops everything, apps included; `em up` again serves the same release.
    stop(up);
    assert!(
        body(&http, &env.url(), host).await.is_none(),
        "nothing serves after Ctrl-C"
    );
    let up = env.up();
    wait_for(&http, &env.url(), host, "Hello again").await;
    stop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_release_makes_deploy_fail_and_the_old_one_keeps_serving() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("fragile");
    let app_dir_s = app_dir.to_str().unwrap();
    assert!(env.em(&["init", app_dir_s]).status.success());
    assert!(env.em(&["deploy", app_dir_s]).status.success());
    wait_for(&http, &env.url(), "fragile.localhost", "Platform.X").await;
    // Break the server: it dies at start with a traceback.
    let server = app_dir.join("server.py");
    let text = std::fs::read_to_string(&server).unwrap();
    std::fs::write(
        &server,
        format!("raise SystemExit('fragile: cannot connect to the database')\n{text}"),
    )
    .unwrap();
    let out = env.em(&["deploy", app_dir_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("failed on local"), "{err}");
    assert!(
        err.contains("cannot connect to the database"),
        "the app's stderr is shown: {err}"
    );
    // v1 still serves.
    wait_for(&http, &env.url(), "fragile.localhost", "Platform.X").await;
    stop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_over_its_error_budget_is_rolled_back_and_deploy_says_why() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("budget");
    let app_dir_s = app_dir.to_str().unwrap();
    let host = "budget.localhost";
    assert!(env.em(&["init", app_dir_s]).status.success());
    let manifest = app_dir.join("app.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("\n[deploy]\nwatch = \"3s\"\nmax_error_rate = \"10%\"\n");
    std::fs::write(&manifest, text).unwrap();

    // v1 is healthy: `em deploy` waits through the watch and reports the verdict.
    let out = env.em(&["deploy", app_dir_s]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("budget v1 verified"), "{stdout}");
    assert!(
        stdout.contains("within its error budget of 10%"),
        "{stdout}"
    );
    wait_for(&http, &env.url(), host, "Platform.X").await;

    // v2 passes its health check but answers 500 on every page, under steady traffic.
    replace_in(
        &app_dir.join("server.py"),
        "self.reply(200, \"text/html; charset=utf-8\", body)",
        "self.reply(500, \"text/plain; charset=utf-8\", \"broken\\n\")",
    );
    let stop_polling = Arc::new(AtomicBool::new(false));
    let (ok, broken) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let poller = {
        let (stop, ok, broken, url) = (stop_polling.clone(), ok.clone(), broken.clone(), env.url());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).header("host", host).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => broken.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_count(&ok, 5).await;
    let out = env.em(&["deploy", app_dir_s]);
    assert_eq!(out.status.code(), Some(1), "em deploy must fail");
    let err = String::from_utf8(out.stderr).unwrap();
    eprintln!("em deploy of v2 said:\n{err}");
    assert!(err.contains("budget v2 rolled back to v1"), "{err}");
    assert!(err.contains("over its error budget of 10%"), "{err}");
    assert!(err.contains("answered 5xx"), "{err}");

    // v1's code serves again, as v3, and the rollback is in the releases with its figures.
    let served_before = ok.load(Ordering::Relaxed);
    wait_for(&http, &env.url(), host, "Platform.X").await;
    wait_count(&ok, served_before + 5).await;
    stop_polling.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    assert!(broken.load(Ordering::Relaxed) > 0, "v2 never answered 500");
    let out = env.em(&["releases", "--app", "budget", "--json"]);
    let releases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(releases[0]["version"], 3);
    assert_eq!(releases[0]["cause"]["kind"], "rollback");
    assert_eq!(releases[0]["created_by"], "beacon");
    let v2 = &releases[1]["rollout"];
    assert_eq!(v2["state"], "rolled_back", "{v2}");
    let figures = &v2["figures"];
    assert!(figures["new_errors"].as_u64().unwrap() >= 1, "{figures}");
    assert!(
        figures["new_errors"].as_u64() <= figures["new_requests"].as_u64(),
        "{figures}"
    );
    assert_eq!(releases[2]["rollout"]["verified"], true);
    let out = env.em(&["releases", "--app", "budget"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("rolled back to v1"), "{text}");
    assert!(text.contains("by beacon"), "{text}");
    stop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_deploy_as_they_are() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for (name, needle) in [
        ("python-hello", "Hello from Platform.X"),
        ("node-chat", "<html"),
        ("static-site", "<html"),
    ] {
        let dir = examples.join(name);
        let out = env.em(&["deploy", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{name}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let url = format!("http://{name}.localhost:{}/", env.http_port);
        assert!(
            stdout.contains(&format!("{name} v1 is live at {url}")),
            "{stdout}"
        );
        wait_for(&http, &env.url(), &format!("{name}.localhost"), needle).await;
    }
    stop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_and_a_wrong_token_are_explained() {
    let env = Env::new();
    // Something else holds the proxy port: em up says which and what to pass.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", env.http_port)).unwrap();
    let out = env.em(&[
        "up",
        "--http-port",
        &env.http_port.to_string(),
        "--port-base",
        &env.port_base.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!("port {}", env.http_port)) && err.contains("--http-port"),
        "{err}"
    );
    drop(squatter);

    // A token the platform does not know: refused, with the way out.
    let up = env.up();
    let config = env.home.path().join("config/em/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let token_line = text
        .lines()
        .find(|l| l.starts_with("token"))
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        text.replace(&token_line, "token = \"pxt_not-the-token\""),
    )
    .unwrap();
    let out = env.em(&["apps"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("em login"));
    // `em login` with the right token (from a file, never an argument) fixes it.
    let token_file = env.home.path().join("token");
    let token = env.home.path().join("data/platformx/secrets/deploy-token");
    std::fs::copy(&token, &token_file).unwrap();
    // apprepo serves HTTPS under em up's own CA: without that CA, em refuses the certificate
    // (before any token is sent) and says how to name the CA.
    let remote = format!("https://127.0.0.1:{}", env.port_base);
    let login = |extra: &[&str]| {
        let mut args = vec![
            "login",
            "--remote",
            &remote,
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        env.em(&args)
    };
    let out = login(&[]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") && err.contains("--ca-file"),
        "{err}"
    );
    let ca = env.home.path().join("data/platformx/pki/ca.pem");
    let out = login(&["--ca-file", ca.to_str().unwrap()]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("remote = \"https://"), "{text}");
    assert!(
        text.contains(&format!("ca_file = \"{}\"", ca.display())),
        "{text}"
    );
    assert!(env.em(&["apps"]).status.success());
    stop(up);
}

#[test]
fn em_refuses_plain_http_to_another_machine_unless_told_insecure() {
    let env = Env::new();
    let token_file = env.home.path().join("token");
    px_runtime::secrets::write_secret_file(&token_file, "pxt_x").unwrap();
    // 192.0.2.1 is TEST-NET-1: nothing answers there, so a login that got past the check
    // fails as unreachable (exit 4), never as refused for plain http (exit 2).
    let login = |remote: &str, extra: &[&str]| {
        let mut args = vec![
            "login",
            "--remote",
            remote,
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        env.em(&args)
    };
    let out = login("http://192.0.2.1:7070", &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in the clear") && err.contains("https://") && err.contains("--insecure"),
        "{err}"
    );
    // Loopback is this machine: allowed (and unreachable here, port 9 being closed).
    let out = login("http://127.0.0.1:9", &[]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = login("http://localhost:9", &[]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // --insecure lets it through; the attempt then fails only as unreachable. 0.0.0.0 is not
    // loopback to em's check, but connecting to it reaches this machine's closed port 9 at
    // once, where a real remote would make the test wait on a timeout.
    let out = login("http://0.0.0.0:9", &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = login(
        "http://0.0.0.0:9",
        &["--insecure", "--beacon", "http://127.0.0.1:9"],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // A saved config with a plain http remote elsewhere is refused for every command, and
    // its `insecure = true` key lets it through as the flag does.
    let config = env.home.path().join("config/em/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let plain =
        "remote = \"http://0.0.0.0:9\"\nbeacon = \"http://127.0.0.1:9\"\ntoken = \"pxt_x\"\n";
    std::fs::write(&config, plain).unwrap();
    let out = env.em(&["apps"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    let out = env.em(&["--insecure", "apps"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    std::fs::write(&config, format!("{plain}insecure = true\n")).unwrap();
    let out = env.em(&["apps"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

/// Collects the JSON bodies POSTed to it, like a chat webhook would.
async fn webhook_receiver() -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let received: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// `em logs` until its output contains `needle`.
async fn wait_logs(env: &Env, app: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let out = env.em(&["logs", "--app", app, "--lines", "200"]);
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < WAIT,
            "em logs never showed {needle:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_events_reach_em_logs_and_the_webhook_and_a_missing_runtime_refuses_the_deploy() {
    let env = Env::new();
    let (hook, received) = webhook_receiver().await;
    let up = env.up_with(&["--webhook", &hook]);
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("billing");
    let app_dir_s = app_dir.to_str().unwrap();
    assert!(
        env.em(&["init", app_dir_s, "--template", "python"])
            .status
            .success()
    );
    // The app reports a problem of its own as it starts, with the template's `report`.
    replace_in(
        &app_dir.join("server.py"),
        "    report(\"info\", \"started\", release=RELEASE)\n",
        "    report(\"info\", \"started\", release=RELEASE)\n    report(\"error\", \"payment provider unreachable\", provider=\"acme\")\n",
    );
    assert!(env.em(&["deploy", app_dir_s]).status.success());
    wait_for(&http, &env.url(), "billing.localhost", "Platform.X").await;

    // Beside the app's output in `em logs`, with its level and fields.
    let logs = wait_logs(&env, "billing", "payment provider unreachable").await;
    let line = logs
        .lines()
        .find(|l| l.contains("payment provider unreachable"))
        .unwrap();
    assert!(line.contains("event"), "{line}");
    assert!(
        line.contains("[error]") && line.contains("provider=acme"),
        "{line}"
    );
    assert!(logs.contains("[info] started"), "{logs}");

    // An error event alerts the sysadmins' webhook; the info one does not.
    let start = Instant::now();
    loop {
        let texts: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.to_string())
            .collect();
        if texts
            .iter()
            .any(|t| t.contains("payment provider unreachable"))
        {
            assert!(!texts.iter().any(|t| t.contains("started")), "{texts:?}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no alert reached the webhook: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A release that needs a Python this machine lacks is refused; v1 keeps serving.
    replace_in(
        &app_dir.join("app.toml"),
        "runtime = \"python3>=3.9\"",
        "runtime = \"python3>=99\"",
    );
    let out = env.em(&["deploy", app_dir_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("v2 failed on local"), "{err}");
    assert!(err.contains("needs python3>=99, found python3 3."), "{err}");
    assert!(err.contains("v1 keeps serving"), "{err}");
    let page = wait_for(&http, &env.url(), "billing.localhost", "Platform.X").await;
    assert!(page.contains("<code>1</code>"), "v1 serves: {page}");

    // A new app whose runtime no node has is never placed, and deploy says why.
    let other = env.home.path().join("future");
    let other_s = other.to_str().unwrap();
    assert!(
        env.em(&["init", other_s, "--template", "python"])
            .status
            .success()
    );
    replace_in(
        &other.join("app.toml"),
        "runtime = \"python3>=3.9\"",
        "runtime = \"node>=99\"",
    );
    let out = env.em(&["deploy", other_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("v1 cannot be placed"), "{err}");
    assert!(
        err.contains("needs node>=99") && err.contains("local has node"),
        "{err}"
    );

    // A requirement that does not parse is refused at upload, naming the field.
    replace_in(&other.join("app.toml"), "node>=99", "node>=ninety");
    let out = env.em(&["deploy", other_s]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("runtime") && err.contains("not a version"),
        "{err}"
    );
    stop(up);
}

/// How long a deploy that a newer one superseded may take to return, from its start: it packs,
/// uploads and waits for the newer commit, a few seconds on a loaded machine, against the 90 s
/// a superseded deploy used to wait before failing.
const SUPERSEDED_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_deploys_at_once_all_return_promptly_and_only_the_newest_goes_out() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("race");
    let app_dir_s = app_dir.to_str().unwrap();
    assert!(
        env.em(&["init", app_dir_s, "--template", "python"])
            .status
            .success()
    );
    // The app starts slowly, so that all four uploads land while the first still rolls out.
    replace_in(
        &app_dir.join("server.py"),
        "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n",
        "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n\ntime.sleep(4)\n",
    );
    let started = Instant::now();
    let deploys: Vec<Child> = (0..4)
        .map(|_| {
            env.command(&["deploy", app_dir_s])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let waits: Vec<_> = deploys
        .into_iter()
        .map(|child| {
            tokio::task::spawn_blocking(move || {
                let out = child.wait_with_output().unwrap();
                (out, started.elapsed())
            })
        })
        .collect();
    let mut live = Vec::new();
    let mut superseded = Vec::new();
    for wait in waits {
        let (out, took) = tokio::time::timeout(WAIT, wait).await.unwrap().unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        eprintln!(
            "an em deploy returned after {took:?} with {:?}:\n{stderr}{stdout}",
            out.status.code()
        );
        match out.status.code() {
            Some(0) => live.push(stdout),
            Some(7) => {
                assert!(
                    took < SUPERSEDED_WITHIN,
                    "superseded, but only after {took:?}"
                );
                superseded.push(stderr);
            }
            other => panic!("em deploy exited with {other:?}:\n{stderr}"),
        }
    }
    let [live] = &live[..] else {
        panic!("not one deploy went out: {live:?}");
    };
    assert!(live.contains("race v4 is live"), "{live}");
    assert_eq!(superseded.len(), 3);
    // Each says which newer release came first.
    let mut releases: Vec<u64> = superseded
        .iter()
        .map(|text| {
            let said = text
                .split("em: race v")
                .nth(1)
                .unwrap_or_else(|| panic!("{text}"));
            let (older, rest) = said.split_once(" was superseded by v").expect(text);
            let newer: u64 = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let older: u64 = older.parse().unwrap();
            assert!(newer > older, "{text}");
            older
        })
        .collect();
    releases.sort();
    assert_eq!(releases, [1, 2, 3]);
    let page = wait_for(&http, &env.url(), "race.localhost", "Platform.X").await;
    assert!(page.contains("<code>4</code>"), "v4 serves: {page}");
    stop(up);
}

/// How long a build may take here: the first build of an `em up` packs a Python runtime and
/// installs from PyPI or npm (tens of seconds on a loaded 2-core machine).
const BUILD_WAIT: Duration = Duration::from_secs(300);

/// `examples/<name>` copied under the test's home, to be changed.
fn example_copy(env: &Env, name: &str) -> std::path::PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let to = env.home.path().join(name);
    let mut pending = vec![(from, to.clone())];
    while let Some((from, to)) = pending.pop() {
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                pending.push((entry.path(), target));
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    to
}

/// `em deploy` of `dir`, with stdout and stderr together (where the build's output goes is
/// `em deploy`'s choice).
fn deploy(env: &Env, dir: &Path) -> (Option<i32>, String) {
    let out = env.em(&["deploy", dir.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Waits until `path` on `host` answers 200 with `needle` in its body.
async fn wait_for_path(http: &reqwest::Client, env: &Env, host: &str, path: &str, needle: &str) {
    let url = format!("{}{}", env.url(), path.trim_start_matches('/'));
    let start = Instant::now();
    loop {
        if let Some(text) = body(http, &url, host).await
            && text.contains(needle)
        {
            return;
        }
        assert!(
            start.elapsed() < BUILD_WAIT,
            "{host}{path} never showed {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The layers Maestro holds, by digest, with the inode of each layer's directory.
fn layers_on_node(env: &Env) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = env.home.path().join("data/platformx/maestro/state/layers");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_with_dependencies_are_built_and_a_code_only_change_reuses_them() {
    let env = Env::new();
    // The machine's interpreters are under the real home's pyenv; the test's home shows them,
    // as a developer's own home would.
    let real_home = std::env::var_os("HOME").unwrap();
    for dir in [".pyenv", ".nvm"] {
        let real = Path::new(&real_home).join(dir);
        if real.is_dir() {
            std::os::unix::fs::symlink(&real, env.home.path().join(dir)).unwrap();
        }
    }
    let up = env.up();
    let http = reqwest::Client::new();

    // A Django app laid out for Heroku: requirements, .python-version, and a Procfile whose
    // release phase migrates its database and whose worker processes the notes posted.
    let notes = example_copy(&env, "django-notes");
    let host = "django-notes.localhost";
    // The database is in the app's data directory under this test's own `em up` data, so no
    // other run of the example shares it.
    let (code, output) = deploy(&env, &notes);
    eprintln!("em deploy django-notes v1:\n{output}");
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("Installing dependencies with uv"),
        "{output}"
    );
    assert!(output.contains("collectstatic"), "{output}");
    // The release phase's migration, shown live before the release went out.
    assert!(output.contains("release phase of v1"), "{output}");
    assert!(
        output.contains("Applying notes.0001_initial... OK"),
        "{output}"
    );
    // The page reads the notes table, which the migration made.
    wait_for_path(&http, &env, host, "/", "No notes yet").await;
    // A note posted on the page is processed by the worker.
    let posted = http
        .post(env.url())
        .header("host", host)
        .form(&[("text", "posted by the test")])
        .send()
        .await
        .unwrap();
    assert!(
        posted.status().is_success() || posted.status().is_redirection(),
        "{}",
        posted.status()
    );
    wait_for_path(&http, &env, host, "/", "processed: 4 words").await;
    wait_for_path(
        &http,
        &env,
        host,
        "/static/notes/style.css",
        "notes-stylesheet",
    )
    .await;
    let first = layers_on_node(&env);
    assert_eq!(first.len(), 3, "runtime, dependencies, app: {first:?}");

    // Only the code changes: the dependencies are reused, and the web server fetches only
    // the new app layer.
    replace_in(
        &notes.join("notes/views.py"),
        "The platform built this release",
        "The platform built this second release",
    );
    let (code, output) = deploy(&env, &notes);
    eprintln!("em deploy django-notes v2:\n{output}");
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("No migrations to apply"), "{output}");
    assert!(output.contains("Dependencies unchanged"), "{output}");
    assert!(!output.contains("Installing dependencies"), "{output}");
    wait_for_path(&http, &env, host, "/", "this second release").await;
    let second = layers_on_node(&env);
    let added: Vec<&String> = second.keys().filter(|d| !first.contains_key(*d)).collect();
    assert_eq!(added.len(), 1, "only the app layer is new: {second:?}");
    for (digest, inode) in &first {
        if let Some(again) = second.get(digest) {
            assert_eq!(again, inode, "layer {digest} was fetched again");
        }
    }
    assert_eq!(
        first.keys().filter(|d| second.contains_key(*d)).count(),
        3,
        "v1's layers stay while v1 is kept: {second:?}"
    );

    // A migration that raises fails the release phase: deploy exits 1 with its error, and v2,
    // with the notes posted, keeps serving.
    let broken = notes.join("notes/migrations/0002_broken.py");
    std::fs::write(
        &broken,
        "from django.db import migrations\n\n\ndef fail(apps, schema_editor):\n    raise RuntimeError('the notes table is locked by the test')\n\n\nclass Migration(migrations.Migration):\n    dependencies = [('notes', '0001_initial')]\n    operations = [migrations.RunPython(fail)]\n",
    )
    .unwrap();
    let (code, output) = deploy(&env, &notes);
    eprintln!("em deploy django-notes with a failing migration:\n{output}");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("RuntimeError: the notes table is locked by the test"),
        "{output}"
    );
    assert!(output.contains("v2 still serves"), "{output}");
    wait_for_path(&http, &env, host, "/", "posted by the test").await;
    wait_for_path(&http, &env, host, "/", "this second release").await;
    std::fs::remove_file(&broken).unwrap();

    // A dependency that does not exist fails the build; deploy says why and v2 keeps serving.
    replace_in(
        &notes.join("requirements.txt"),
        "whitenoise>=6.9\n",
        "whitenoise>=6.9\nplatformx-no-such-package-4242==1.0\n",
    );
    let (code, output) = deploy(&env, &notes);
    eprintln!("em deploy django-notes with a missing dependency:\n{output}");
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("platformx-no-such-package-4242"),
        "{output}"
    );
    wait_for_path(&http, &env, host, "/", "this second release").await;

    // An Express app with its lockfile, run with `npm start`.
    let hello = example_copy(&env, "express-hello");
    let host = "express-hello.localhost";
    let (code, output) = deploy(&env, &hello);
    eprintln!("em deploy express-hello:\n{output}");
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("npm"), "{output}");
    wait_for_path(&http, &env, host, "/", "Hello from Express").await;
    wait_for_path(&http, &env, host, "/style.css", "express-stylesheet").await;
    stop(up);
}

/// Counts of the python-worker example's queue, from its `/stats`.
async fn queue_stats(http: &reqwest::Client, env: &Env) -> Option<serde_json::Value> {
    let text = body(
        http,
        &format!("{}stats", env.url()),
        "python-worker.localhost",
    )
    .await?;
    serde_json::from_str(&text).ok()
}

/// Most jobs the load below posts: it stops by itself, whatever happens to the deploy.
const MAX_POSTED_JOBS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_redeployed_under_load_loses_no_job_and_does_none_twice() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app = example_copy(&env, "python-worker");
    // The queue is in the app's data directory, under this test's own `em up` data.
    let jobs_dir = data_dir(&env, "python-worker").join("python-worker-jobs");
    replace_in(
        &app.join("app.toml"),
        "WORK_SECONDS = \"0.2\"",
        "WORK_SECONDS = \"0.05\"",
    );
    let (code, text) = deploy(&env, &app);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("python-worker v1 is live"), "{text}");
    wait_for_path(&http, &env, "python-worker.localhost", "/healthz", "ok").await;

    // Jobs come in all along: every one the web process took must be done, exactly once.
    let halt = Arc::new(AtomicBool::new(false));
    let (taken, failed) = (
        Arc::new(std::sync::Mutex::new(Vec::new())),
        Arc::new(AtomicU64::new(0)),
    );
    let posted = Arc::new(AtomicU64::new(0));
    let load = {
        let (halt, taken, failed, posted) =
            (halt.clone(), taken.clone(), failed.clone(), posted.clone());
        let url = format!("{}jobs", env.url());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0..MAX_POSTED_JOBS {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let answer = http
                    .post(&url)
                    .header("host", "python-worker.localhost")
                    .body(format!("job {n}"))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 201 => {
                        let id: serde_json::Value = r.json().await.unwrap();
                        taken
                            .lock()
                            .unwrap()
                            .push(id["id"].as_str().unwrap().to_string());
                        posted.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("a job was refused: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_count(&posted, 20).await;
    // A new release of the worker while jobs keep coming.
    let worker = app.join("worker.py");
    let mut code_text = std::fs::read_to_string(&worker).unwrap();
    code_text.push_str("# v2: the same work, a new release\n");
    std::fs::write(&worker, code_text).unwrap();
    let (code, text) = deploy(&env, &app);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("python-worker v2 is live"), "{text}");
    wait_count(&posted, posted.load(Ordering::Relaxed) + 20).await;
    halt.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "the web process refused jobs"
    );

    // The queue drains: nothing new, nothing claimed.
    let start = Instant::now();
    loop {
        if let Some(stats) = queue_stats(&http, &env).await
            && stats["new"] == 0
            && stats["claimed"] == 0
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "{:?}",
            queue_stats(&http, &env).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken = taken.lock().unwrap().clone();
    let done: std::collections::BTreeSet<String> = std::fs::read_dir(jobs_dir.join("done"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_string()
        })
        .collect();
    let wanted: std::collections::BTreeSet<String> = taken.iter().cloned().collect();
    assert_eq!(wanted.len(), taken.len());
    assert_eq!(done, wanted, "jobs lost or unknown ones done");
    let twice = std::fs::read_dir(jobs_dir.join("twice")).unwrap().count();
    assert_eq!(twice, 0, "a job was done twice");
    // Both releases' workers did jobs: the old one until its SIGTERM, then the new one.
    let releases: std::collections::BTreeSet<String> = std::fs::read_dir(jobs_dir.join("done"))
        .unwrap()
        .map(|e| {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
            record["result"]["release"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        releases,
        ["1", "2"].map(String::from).into(),
        "{releases:?}"
    );
    // `em logs` names the worker, and the old one said it finished its job in hand.
    let logs = wait_logs(&env, "python-worker", "worker.1 of v1 stops").await;
    assert!(
        logs.contains("v2 worker.1 stdout: worker.1 of v2 takes jobs"),
        "{logs}"
    );
    stop(up);
}

/// `em ps --json` of `app` once `want` holds for its rows, by `type.number`.
async fn wait_ps(
    env: &Env,
    app: &str,
    want: impl Fn(&std::collections::BTreeMap<String, AppProcess>) -> bool,
) -> std::collections::BTreeMap<String, AppProcess> {
    let start = Instant::now();
    loop {
        let out = env.em(&["ps", "--app", app, "--json"]);
        let rows: Vec<AppProcess> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let by_name = rows
            .into_iter()
            .map(|r| (format!("{}.{}", r.status.process, r.status.number), r))
            .collect();
        if want(&by_name) {
            return by_name;
        }
        assert!(start.elapsed() < WAIT, "em ps never showed it: {by_name:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether exactly `names` run, every one of them running.
fn running_exactly(rows: &std::collections::BTreeMap<String, AppProcess>, names: &[&str]) -> bool {
    rows.keys().map(String::as_str).eq(names.iter().copied())
        && rows
            .values()
            .all(|r| r.status.state == px_proto::link::InstanceState::Healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_a_worker_touches_only_what_changes_and_em_ps_shows_every_process() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app = example_copy(&env, "python-worker");
    let (code, text) = deploy(&env, &app);
    assert_eq!(code, Some(0), "{text}");
    wait_for_path(&http, &env, "python-worker.localhost", "/healthz", "ok").await;
    let first = wait_ps(&env, "python-worker", |r| {
        running_exactly(r, &["web.1", "worker.1"])
    })
    .await;
    let web = &first["web.1"].status;
    assert!(
        web.started_at.is_some() && web.memory_bytes.is_some(),
        "{web:?}"
    );

    // worker=3: two more, and the web instance and worker.1 are the same processes.
    let out = env.em(&["scale", "worker=3", "--app", "python-worker"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("worker=3  across the cluster (set with em scale)"),
        "{said}"
    );
    let three = wait_ps(&env, "python-worker", |r| {
        running_exactly(r, &["web.1", "worker.1", "worker.2", "worker.3"])
    })
    .await;
    for kept in ["web.1", "worker.1"] {
        let (before, now) = (&first[kept].status, &three[kept].status);
        assert_eq!(
            (before.pid, &before.started_at),
            (now.pid, &now.started_at),
            "{kept}"
        );
    }
    let table =
        String::from_utf8_lossy(&env.em(&["ps", "--app", "python-worker"]).stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("worker.3 ") && l.contains(" running ")),
        "{table}"
    );
    // The formation made no release.
    let releases = String::from_utf8_lossy(&env.em(&["releases", "--app", "python-worker"]).stdout)
        .to_string();
    assert!(!releases.contains("v2"), "{releases}");

    // worker=1: worker.2 and worker.3 go, worker.1 and web stay.
    assert!(
        env.em(&["scale", "worker=1", "--app", "python-worker"])
            .status
            .success()
    );
    let one = wait_ps(&env, "python-worker", |r| {
        running_exactly(r, &["web.1", "worker.1"])
    })
    .await;
    for kept in ["web.1", "worker.1"] {
        assert_eq!(first[kept].status.pid, one[kept].status.pid, "{kept}");
    }

    // What the platform refuses, em says and exits 5.
    for (args, says) in [
        (["scale", "nosuch=1"], "its types are web, worker"),
        (
            ["scale", "worker=1000"],
            "limit of 100 processes of one type",
        ),
    ] {
        let out = env
            .command(&[args[0], args[1], "--app", "python-worker"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    stop(up);
}

/// Whether process `pid` still runs: it exists and is no zombie (one whose parent died waits
/// for init to reap it, which some containers' init does late).
/// The data directory `em up` gives `app` (`PX_DATA_DIR`), where its processes may leave files
/// the test reads: nothing else of the test's directories is in an app's sandbox.
fn data_dir(env: &Env, app: &str) -> std::path::PathBuf {
    env.home
        .path()
        .join("data/platformx/maestro/state/data")
        .join(app)
}

/// The pids (in the test's PID namespace) of the processes running `program` for the app whose
/// data directory is `data`: found by their command line and environment, since a sandboxed
/// process sees only its own PID namespace and cannot say its pid here.
fn app_processes(data: &Path, program: &str) -> Vec<u32> {
    let marker = format!("PX_DATA_DIR={}", data.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let read = |what| std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&read("cmdline")).into_owned();
            let environ = read("environ");
            cmdline.contains(program)
                && !cmdline.contains("bwrap")
                && environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
                && process_exists(*pid)
        })
        .collect()
}

fn process_exists(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command, which is in parentheses.
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    !state.starts_with('Z')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_phase_runs_before_its_release_and_a_failing_or_hanging_one_keeps_the_old() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    let app_dir = env.home.path().join("phased");
    let app_dir_s = app_dir.to_str().unwrap();
    assert!(env.em(&["init", app_dir_s]).status.success());
    assert!(env.em(&["deploy", app_dir_s]).status.success());
    wait_for(&http, &env.url(), "phased.localhost", "Platform.X").await;

    // A release line: its output shows in `em deploy`, and the release serves after it.
    std::fs::write(
        app_dir.join("Procfile"),
        "web: python3 server.py\nrelease: python3 migrate.py\n",
    )
    .unwrap();
    std::fs::write(
        app_dir.join("migrate.py"),
        "print('migrating: applying 0001_initial', flush=True)\nprint('migrating: done')\n",
    )
    .unwrap();
    replace_in(
        &app_dir.join("app.toml"),
        "Hello from Platform.X",
        "Hello from Platform.X, migrated",
    );
    let (code, output) = deploy(&env, &app_dir);
    eprintln!("em deploy with a release phase:\n{output}");
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("release phase of v2"), "{output}");
    assert!(
        output.contains("migrating: applying 0001_initial"),
        "{output}"
    );
    assert!(output.contains("migrating: done"), "{output}");
    assert!(output.contains("release phase of v2 succeeded"), "{output}");
    assert!(output.contains("phased v2 is live"), "{output}");
    wait_for(
        &http,
        &env.url(),
        "phased.localhost",
        "Platform.X, migrated",
    )
    .await;

    // A phase that fails: deploy exits 1 with its error, and v2 keeps serving.
    std::fs::write(
        app_dir.join("migrate.py"),
        "print('migrating: applying 0002_broken', flush=True)\nraise RuntimeError('the migration broke: no such column notes.done')\n",
    )
    .unwrap();
    replace_in(
        &app_dir.join("app.toml"),
        "Platform.X, migrated",
        "Platform.X, v3",
    );
    let (code, output) = deploy(&env, &app_dir);
    eprintln!("em deploy with a failing release phase:\n{output}");
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("no such column notes.done"), "{output}");
    assert!(output.contains("v2 still serves"), "{output}");
    let page = body(&http, &env.url(), "phased.localhost").await.unwrap();
    assert!(page.contains("Platform.X, migrated"), "{page}");

    // A phase that hangs past its timeout is stopped, and deploy names the timeout.
    std::fs::write(
        app_dir.join("migrate.py"),
        "print('migrating: waiting for a lock', flush=True)\nimport time\ntime.sleep(600)\n",
    )
    .unwrap();
    let manifest = std::fs::read_to_string(app_dir.join("app.toml")).unwrap();
    std::fs::write(
        app_dir.join("app.toml"),
        format!("{manifest}\n[processes.release]\ntimeout = \"3s\"\n"),
    )
    .unwrap();
    let (code, output) = deploy(&env, &app_dir);
    eprintln!("em deploy with a hanging release phase:\n{output}");
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("timeout of 3s"), "{output}");
    assert!(output.contains("v2 still serves"), "{output}");
    let left = app_processes(&data_dir(&env, "phased"), "migrate.py");
    assert!(left.is_empty(), "the hanging phase is gone: {left:?}");
    let page = body(&http, &env.url(), "phased.localhost").await.unwrap();
    assert!(page.contains("Platform.X, migrated"), "{page}");
    stop(up);
}

/// apprepo's URL and the deploy token, from the config `em up` wrote.
/// A client of the platform `em up` runs: its APIs serve HTTPS under the CA it made in its
/// data directory, which this client trusts alone, as em does.
fn platform_client(env: &Env) -> reqwest::Client {
    let ca = std::fs::read(env.home.path().join("data/platformx/pki/ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
}

fn repository_access(env: &Env) -> (String, String) {
    let text = std::fs::read_to_string(env.home.path().join("config/em/config.toml")).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no {key} in em's config: {text}"))
    };
    (value("remote"), value("token"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_phase_interrupted_by_a_crash_is_failed_and_not_run_again() {
    let env = Env::new();
    let up = env.up();
    let http = platform_client(&env);
    let app_dir = env.home.path().join("phased");
    let app_dir_s = app_dir.to_str().unwrap();
    assert!(env.em(&["init", app_dir_s]).status.success());
    assert!(env.em(&["deploy", app_dir_s]).status.success());
    wait_for(&http, &env.url(), "phased.localhost", "Platform.X").await;

    // A migration that takes long; each run of it leaves a line in `runs`, in the app's data
    // directory.
    let data = data_dir(&env, "phased");
    let runs = data.join("phase-runs");
    std::fs::write(
        app_dir.join("Procfile"),
        "web: python3 server.py\nrelease: python3 migrate.py\n",
    )
    .unwrap();
    std::fs::write(
        app_dir.join("migrate.py"),
        "import os, time\nopen(os.path.join(os.environ['PX_DATA_DIR'], 'phase-runs'), 'a').write('run\\n')\ntime.sleep(600)\n",
    )
    .unwrap();
    let mut deploying = env
        .command(&["deploy", app_dir_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pids = loop {
        let pids = app_processes(&data, "migrate.py");
        if runs.exists() && !pids.is_empty() {
            break pids;
        }
        assert!(start.elapsed() < WAIT, "the release phase never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The whole platform dies mid-migration, then comes back.
    nix_kill(up.id(), "KILL");
    let _ = deploying.kill();
    let _ = deploying.wait();
    let mut up = up;
    let _ = up.wait();
    let up = env.up();

    // The restarted node finds its own earlier claim: the phase is failed, not run again, its
    // process is gone, and v1 keeps serving.
    let (repo, token) = repository_access(&env);
    let start = Instant::now();
    let release = loop {
        let release: serde_json::Value = http
            .get(format!("{repo}/v1/apps/phased/releases/2"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if release["phase"]["state"] == "failed" {
            // `"state": "failed", "reason": ...` beside the phase's command.
            break release;
        }
        assert!(
            start.elapsed() < WAIT,
            "the interrupted phase was never failed: {release}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = release["phase"]["reason"].as_str().unwrap();
    assert!(reason.contains("was interrupted"), "{reason}");
    assert!(reason.contains("never runs twice"), "{reason}");
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "the migration ran once"
    );
    for pid in pids {
        assert!(!process_exists(pid), "the interrupted phase {pid} is gone");
    }
    let page = body(&http, &env.url(), "phased.localhost").await;
    assert!(page.is_some_and(|p| p.contains("Hello from Platform.X")));
    stop(up);
}

/// Polls `url` with `token` until it answers `status`.
async fn wait_status(http: &reqwest::Client, url: &str, token: &str, status: u16) {
    let start = Instant::now();
    loop {
        let got = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status();
        if got.as_u16() == status {
            return;
        }
        assert!(start.elapsed() < WAIT, "{url} answered {got}, not {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_tokens_create_makes_a_token_for_its_app_only_on_apprepo_and_beacon_until_revoked() {
    let env = Env::new();
    let up = env.up();
    let http = platform_client(&env);
    let repo = format!("https://127.0.0.1:{}", env.port_base);
    let beacon = format!("https://127.0.0.1:{}", env.port_base + 1);

    let out = env.em(&[
        "tokens",
        "create",
        "ci-shop",
        "--apps",
        "shop",
        "--expires",
        "1d",
    ]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("pxt_"), "{token}");
    let listed = String::from_utf8(env.em(&["tokens", "list"]).stdout).unwrap();
    assert!(
        listed.contains("ci-shop") && !listed.contains(&token),
        "{listed}"
    );

    // apprepo: it creates its app, and is refused another.
    let create = |name: &str| {
        http.post(format!("{repo}/v1/apps"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": name }))
            .send()
    };
    assert_eq!(create("shop").await.unwrap().status().as_u16(), 201);
    assert_eq!(create("blog").await.unwrap().status().as_u16(), 403);
    // Beacon: known once apprepo's list reaches it, and limited to its app.
    wait_status(&http, &format!("{beacon}/v1/apps"), &token, 200).await;
    let r = http
        .post(format!("{beacon}/v1/apps/blog/restart"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Revoked: apprepo refuses it at once, Beacon within seconds.
    assert!(env.em(&["tokens", "revoke", "ci-shop"]).status.success());
    let r = http
        .get(format!("{repo}/v1/apps"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    wait_status(&http, &format!("{beacon}/v1/apps"), &token, 401).await;
    stop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_domain_is_served_without_a_deploy_and_no_other_app_can_take_it() {
    let env = Env::new();
    let up = env.up();
    let http = reqwest::Client::new();
    for name in ["python-hello", "static-site"] {
        let (code, text) = deploy(&env, &example_copy(&env, name));
        assert_eq!(code, Some(0), "{text}");
    }
    let url = env.url();
    wait_for(
        &http,
        &url,
        "python-hello.localhost",
        "Hello from Platform.X",
    )
    .await;
    let first = wait_ps(&env, "python-hello", |r| running_exactly(r, &["web.1"])).await;
    assert!(body(&http, &url, "hello.example.com").await.is_none());

    // Written as a person might: any case, a final dot.
    let out = env.em(&[
        "domains",
        "add",
        "Hello.Example.com.",
        "--app",
        "python-hello",
    ]);
    assert!(out.status.success());
    wait_for(&http, &url, "hello.example.com", "Hello from Platform.X").await;
    // The cluster's name stays served, by the same instance: nothing was deployed or restarted.
    wait_for(
        &http,
        &url,
        "python-hello.localhost",
        "Hello from Platform.X",
    )
    .await;
    let now = wait_ps(&env, "python-hello", |r| running_exactly(r, &["web.1"])).await;
    let (before, after) = (&first["web.1"].status, &now["web.1"].status);
    assert_eq!(
        (before.release, before.pid, &before.started_at),
        (after.release, after.pid, &after.started_at)
    );
    let list =
        String::from_utf8_lossy(&env.em(&["domains", "list", "--app", "python-hello"]).stdout)
            .to_string();
    let rows: Vec<Vec<&str>> = list
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["DOMAIN", "SOURCE", "CERTIFICATE", "EXPIRES", "ISSUER"],
            vec!["hello.example.com", "added", "-", "-", "-"],
            vec!["python-hello.localhost", "cluster", "-", "-", "-"],
        ],
        "{list}"
    );

    // Another app cannot take it: em says who holds it and exits 5.
    let out = env
        .command(&[
            "domains",
            "add",
            "hello.example.com",
            "--app",
            "static-site",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"hello.example.com\" belongs to app \"python-hello\""),
        "{err}"
    );

    // Removed: the name is no longer served, the app still is.
    assert!(
        env.em(&[
            "domains",
            "remove",
            "hello.example.com",
            "--app",
            "python-hello"
        ])
        .status
        .success()
    );
    let start = Instant::now();
    while body(&http, &url, "hello.example.com").await.is_some() {
        assert!(start.elapsed() < WAIT, "hello.example.com is still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(
        &http,
        &url,
        "python-hello.localhost",
        "Hello from Platform.X",
    )
    .await;
    stop(up);
}
