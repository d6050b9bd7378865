//! Maestro with real app processes and real sockets: deploys, zero-downtime switches, failed
//! releases that leave the old one serving, crashes and restarts, apps that ignore SIGTERM,
//! and the persisted assignment served before Beacon answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{
    BundleServer, FakeBeacon, Maestro, alive, assign, config, manifest, wait_event, wait_gone,
};
use px_proto::link::{FailureKind, InstanceState, NodeEventKind};

/// Waits until the load has had `at_least` answers.
async fn wait_count(counter: &AtomicU64, at_least: u64) {
    let start = std::time::Instant::now();
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < common::WAIT,
            "the load got only {} answers",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_switch_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, state) = beacon.accept().await;
    assert_eq!(state.generation, 0);
    assign(
        &mut link,
        1,
        vec![bundles.python_app("hello", 1, "one", "")],
    )
    .await;
    wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFinished && e.release == 1
    })
    .await;
    maestro.wait_body("hello.localhost", "one").await;
    let old_pid: u32 = maestro.pid("hello.localhost").await;

    // Steady load while the release switches.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url = maestro.http_url.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let outcome = match http
                    .get(&url)
                    .header("host", "hello.localhost")
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        r.text().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed request: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Load runs before the switch starts and after it ends.
    wait_count(&ok, 20).await;
    assign(
        &mut link,
        2,
        vec![bundles.python_app("hello", 2, "two", "")],
    )
    .await;
    wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFinished && e.release == 2
    })
    .await;
    maestro.wait_body("hello.localhost", "two").await;
    wait_count(&ok, ok.load(Ordering::Relaxed) + 20).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("during the switch: {ok} requests served, {failed} failed");
    assert_eq!(failed, 0);
    // The old release's process is stopped once drained.
    wait_gone(old_pid).await;
    let state = maestro.state().await;
    assert_eq!(state.generation, 2);
    assert_eq!(state.instances.len(), 1);
    assert_eq!(
        (state.instances[0].release, state.instances[0].state),
        (2, InstanceState::Healthy)
    );
    // Static files come from the release directory without touching the app.
    let (status, css) = maestro
        .get("hello.localhost", "/assets/site.css")
        .await
        .unwrap();
    assert_eq!((status, css.as_str()), (200, "body{}"));
    // App output is in the app's log directory.
    let stdout = std::fs::read_to_string(maestro.log_dir.join("hello/stdout.log")).unwrap();
    assert!(stdout.contains("request"), "{stdout}");
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_never_becomes_healthy_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    assign(
        &mut link,
        1,
        vec![bundles.python_app("hello", 1, "one", "")],
    )
    .await;
    maestro
        .wait_body_answering(&mut link, "hello.localhost", "one")
        .await;

    // Crashes at start, with something on stderr.
    let crashing = bundles.app(
        "hello",
        2,
        &manifest(
            "hello",
            "echo 'ImportError: no module named flask' >&2; exit 3",
            "5s",
        ),
        &[],
        &[],
    );
    assign(&mut link, 2, vec![crashing]).await;
    let failed = wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFailed && e.release == 2
    })
    .await;
    assert!(failed.message.contains("exit code 3"), "{}", failed.message);
    assert_eq!(failed.failure, Some(FailureKind::ExitCode));
    assert!(
        failed
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("ImportError"),
        "{failed:?}"
    );
    assert_eq!(
        maestro.get("hello.localhost", "/").await.unwrap(),
        (200, "one".into())
    );

    // Listens on the wrong port: never healthy within its timeout.
    let wrong_port = bundles.app(
        "hello",
        3,
        &manifest(
            "hello",
            "exec python3 -m http.server --bind 127.0.0.1 0",
            "2s",
        ),
        &[],
        &[],
    );
    assign(&mut link, 3, vec![wrong_port]).await;
    let failed = wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFailed && e.release == 3
    })
    .await;
    assert!(
        failed.message.contains("never listened on its port"),
        "{}",
        failed.message
    );
    assert_eq!(failed.failure, Some(FailureKind::NeverListened));
    assert_eq!(
        maestro.get("hello.localhost", "/").await.unwrap(),
        (200, "one".into())
    );

    // Listens, but its health check answers 404 until the timeout.
    let unhealthy = bundles.app(
        "hello",
        4,
        &format!(
            "{}path = \"/no-such-page\"\n",
            manifest(
                "hello",
                "exec python3 -m http.server --bind 127.0.0.1 \"$1\"",
                "2s",
            )
        ),
        &[],
        &[],
    );
    assign(&mut link, 4, vec![unhealthy]).await;
    let failed = wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFailed && e.release == 4
    })
    .await;
    assert!(
        failed
            .message
            .contains("not healthy after 2s: GET /no-such-page answered 404"),
        "{}",
        failed.message
    );
    assert_eq!(failed.failure, Some(FailureKind::HealthFailing));
    assert_eq!(
        maestro.get("hello.localhost", "/").await.unwrap(),
        (200, "one".into())
    );

    // A bundle whose digest does not match what Beacon assigned.
    let mut tampered = bundles.python_app("hello", 5, "five", "");
    tampered.bundle_sha256 = "0".repeat(64);
    tampered.bundle_url = format!(
        "{}/v1/bundles/{}",
        bundles.url,
        bundles.python_app("hello", 5, "five", "").bundle_sha256
    );
    assign(&mut link, 5, vec![tampered]).await;
    let failed = wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFailed && e.release == 5
    })
    .await;
    assert!(
        failed.message.contains("digest mismatch"),
        "{}",
        failed.message
    );
    assert_eq!(
        maestro.get("hello.localhost", "/").await.unwrap(),
        (200, "one".into())
    );
    let state = maestro.state().await;
    assert_eq!(
        state.instances.len(),
        1,
        "failed releases leave no instance behind: {state:?}"
    );
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_restarted_and_other_apps_are_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    assign(
        &mut link,
        1,
        vec![
            bundles.python_app("hello", 1, "hello", ""),
            bundles.python_app("other", 1, "other", ""),
        ],
    )
    .await;
    maestro.wait_body("hello.localhost", "hello").await;
    maestro.wait_body("other.localhost", "other").await;
    let victim: u32 = maestro.pid("hello.localhost").await;
    let bystander: u32 = maestro.pid("other.localhost").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let crashed = wait_event(&mut link, |e| e.kind == NodeEventKind::InstanceCrashed).await;
    assert_eq!(crashed.app, "hello");
    assert!(crashed.message.contains("signal 9"), "{}", crashed.message);
    assert_eq!(crashed.failure, Some(FailureKind::Signal));
    // Back, as a new process, after its backoff.
    let start = std::time::Instant::now();
    loop {
        if maestro.pid("hello.localhost").await != victim {
            break;
        }
        assert!(start.elapsed() < common::WAIT, "hello never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = maestro.state().await;
    let hello = state.instances.iter().find(|i| i.app == "hello").unwrap();
    assert_eq!(hello.restarts, 1);
    assert_eq!(hello.last_exit.as_ref().and_then(|e| e.signal), Some(9));
    assert_eq!(
        hello.last_exit.as_ref().and_then(|e| e.kind),
        Some(FailureKind::Signal)
    );
    assert_eq!(maestro.pid("other.localhost").await, bystander);
    maestro.stop().await;
    wait_gone(bystander).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    // SIG_IGN survives exec, so the Python server ignores SIGTERM too.
    let stubborn = bundles.app(
        "stubborn",
        1,
        &manifest(
            "stubborn",
            "trap '' TERM; exec python3 server.py \"$1\"",
            "20s",
        ),
        &[("server.py", common::SERVER_PY)],
        &[("GREETING", "still here")],
    );
    assign(&mut link, 1, vec![stubborn]).await;
    maestro.wait_body("stubborn.localhost", "still here").await;
    let pid: u32 = maestro.pid("stubborn.localhost").await;
    // Unassigned: stopped with SIGTERM, ignored, then SIGKILL after the 2 s grace.
    let started = std::time::Instant::now();
    assign(&mut link, 2, vec![]).await;
    wait_gone(pid).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it was killed before the grace period ended"
    );
    let (status, _) = maestro.get("stubborn.localhost", "/").await.unwrap();
    assert_eq!(status, 404, "an unassigned app is no longer routed");
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persisted_assignment_is_served_without_beacon_and_reconnects_later() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let cfg = config(dir.path(), Some(&beacon));
    let maestro = Maestro::start(cfg.clone()).await;
    let (mut link, _) = beacon.accept().await;
    assign(
        &mut link,
        7,
        vec![bundles.python_app("hello", 1, "persisted", "")],
    )
    .await;
    maestro.wait_body("hello.localhost", "persisted").await;
    let first_pid: u32 = maestro.pid("hello.localhost").await;
    maestro.stop().await;
    drop(link);
    assert!(!alive(first_pid), "a stopped maestro leaves no app running");

    // Beacon is away (nothing accepts on its address any more), the bundle server too.
    let _pki = beacon.pki.clone();
    drop(beacon);
    bundles.bundles.lock().unwrap().clear();
    let maestro = Maestro::start(cfg).await;
    maestro.wait_body("hello.localhost", "persisted").await;
    assert_eq!(maestro.state().await.generation, 7);
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_beacon_drops_the_link_apps_keep_serving_and_maestro_links_again() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    assign(&mut link, 4, vec![bundles.python_app("hello", 1, "up", "")]).await;
    wait_event(&mut link, |e| e.kind == NodeEventKind::DeployFinished).await;
    // Beacon goes away mid-link.
    drop(link);
    maestro.wait_body("hello.localhost", "up").await;
    // It comes back: Maestro links again and reports what it runs, by generation.
    let (_link, state) = beacon.accept().await;
    assert_eq!(state.generation, 4);
    assert_eq!(state.instances.len(), 1);
    assert_eq!(state.instances[0].state, InstanceState::Healthy);
    maestro.wait_body("hello.localhost", "up").await;
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_keeps_crashing_raises_one_crash_loop_event() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    // Healthy at once (it listens), then dies a moment later, every time.
    let flaky = bundles.app(
        "flaky",
        1,
        &manifest("flaky", "python3 -c 'import socket,sys,time; s=socket.socket(); s.bind((\"127.0.0.1\", int(sys.argv[1]))); s.listen(); time.sleep(0.3); sys.stderr.write(\"fatal: lost the database\\n\"); sys.exit(2)' \"$1\"", "10s"),
        &[],
        &[],
    );
    assign(&mut link, 1, vec![flaky]).await;
    let event = wait_event(&mut link, |e| e.kind == NodeEventKind::CrashLoop).await;
    assert_eq!(event.app, "flaky");
    assert!(
        event
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("lost the database"),
        "{event:?}"
    );
    let state = maestro.state().await;
    assert!(state.instances[0].restarts >= 4, "{state:?}");
    maestro.stop().await;
}

/// An app that streams server-sent events at `/events`: `data: $GREETING <n>` every 100 ms.
const EVENTS_PY: &str = r#"import os, sys, time, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/events":
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        n = 0
        try:
            while True:
                self.wfile.write(f"data: {os.environ['GREETING']} {n}\n\n".encode())
                self.wfile.flush()
                n += 1
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// What one event-stream client saw across a deploy.
#[derive(Debug, Default)]
struct StreamHistory {
    /// How each stream ended: the `retry:` hint it carried (`None`: ended without one).
    endings: Vec<Option<u64>>,
    /// The greetings of the events, in order.
    greetings: Vec<String>,
    /// When the awaited greeting first came.
    arrived: Option<std::time::Instant>,
}

/// Follows `/events` through Maestro, reconnecting after each end, until it sees `until`.
async fn follow_events(url: String, until: &'static str) -> StreamHistory {
    use futures_util::StreamExt as _;
    let http = reqwest::Client::new();
    let mut history = StreamHistory::default();
    let deadline = std::time::Instant::now() + common::WAIT;
    while !history.greetings.iter().any(|g| g == until) {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw {until}: {history:?}"
        );
        let response = http
            .get(&url)
            .header("host", "events.localhost")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut text = String::new();
        let mut body = response.bytes_stream();
        let mut ended = true;
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
            if text.contains(&format!("data: {until} ")) {
                history.arrived = Some(std::time::Instant::now());
                ended = false;
                break;
            }
        }
        let mut retry = None;
        for event in text.split("\n\n").filter(|e| !e.is_empty()) {
            if let Some(ms) = event.strip_prefix("retry: ") {
                retry = Some(ms.parse().unwrap());
            } else if let Some(data) = event.strip_prefix("data: ") {
                history
                    .greetings
                    .push(data.split(' ').next().unwrap().to_string());
            }
        }
        if ended {
            history.endings.push(retry);
        }
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_streams_move_to_the_new_release_over_the_drain_budget() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    let release = |n: u64, greeting: &str| {
        bundles.app(
            "events",
            n,
            "name = \"events\"\nrun = \"exec python3 server.py \\\"$1\\\"\"\n[health]\npath = \"/healthz\"\ntimeout = \"20s\"\n[deploy]\ndrain = \"2s\"\nwatch = \"5s\"\n",
            &[("server.py", EVENTS_PY)],
            &[("GREETING", greeting)],
        )
    };
    assign(&mut link, 1, vec![release(1, "one")]).await;
    wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFinished && e.release == 1
    })
    .await;
    let url = format!("{}/events", maestro.http_url);
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(follow_events(url.clone(), "two")))
        .collect();
    // Every client is streaming from release 1 before the deploy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let switched = std::time::Instant::now();
    assign(&mut link, 2, vec![release(2, "two")]).await;
    let mut reconnected = Vec::new();
    for client in clients {
        let history = tokio::time::timeout(common::WAIT * 2, client)
            .await
            .unwrap()
            .unwrap();
        reconnected.push(history.arrived.unwrap() - switched);
        assert!(!history.endings.is_empty(), "{history:?}");
        // One stream from release 1, ended by a retry hint; then release 2.
        let first_two = history.greetings.iter().position(|g| g == "two").unwrap();
        assert!(first_two > 0, "{history:?}");
        assert!(history.greetings[..first_two].iter().all(|g| g == "one"));
        assert!(history.greetings[first_two..].iter().all(|g| g == "two"));
        assert!(
            history.endings.iter().all(Option::is_some),
            "every stream of the old release ended with a retry hint: {history:?}"
        );
    }
    // The old release is stopped once its streams have moved (or the budget has passed).
    let start = std::time::Instant::now();
    loop {
        let state = maestro.state().await;
        if state.instances.iter().all(|i| i.release == 2) {
            break;
        }
        assert!(start.elapsed() < common::WAIT, "{state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("clients on release 2 after {reconnected:?} (drain budget 2s)");
    assert!(reconnected.iter().all(|t| *t < common::WAIT));
    // The switch's figures, as Beacon gets them: every stream moved with a hint, none cut,
    // and the new release answered the reconnections without a 5xx.
    let start = std::time::Instant::now();
    let figures = loop {
        let state = maestro.state().await;
        if let Some(f) = state.rollouts.iter().find(|f| f.release == 2 && f.done) {
            break f.clone();
        }
        assert!(start.elapsed() < common::WAIT, "{state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("figures of the switch: {figures:?}");
    assert_eq!(
        (figures.app.as_str(), figures.previous),
        ("events", Some(1))
    );
    assert_eq!((figures.figures.closed, figures.figures.cut), (4, 0));
    assert!(figures.figures.new_requests >= 4, "{figures:?}");
    assert_eq!(figures.figures.new_errors, 0);
    assert_eq!(figures.watched_ms, 5000);
}

/// The release directories of `app` under a Maestro's state directory, in order.
fn release_dirs(state_dir: &std::path::Path, app: &str) -> Vec<u64> {
    let mut numbers: Vec<u64> =
        std::fs::read_dir(state_dir.join("apps").join(app).join("releases"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .collect();
    numbers.sort_unstable();
    numbers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_releases_are_removed_and_a_kept_one_rolls_back_without_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let mut cfg = config(dir.path(), Some(&beacon));
    cfg.keep_releases = 2;
    let maestro = Maestro::start(cfg).await;
    let (mut link, _) = beacon.accept().await;
    let mut assignments = Vec::new();
    for n in 1..=4u64 {
        let app = bundles.python_app("hello", n, &format!("v{n}"), "");
        assignments.push(app.clone());
        assign(&mut link, n, vec![app]).await;
        wait_event(&mut link, |e| {
            e.kind == NodeEventKind::DeployFinished && e.release == n
        })
        .await;
    }
    maestro.wait_body("hello.localhost", "v4").await;
    // Pruning follows the old release's drain, a moment after the switch.
    let start = std::time::Instant::now();
    while release_dirs(&maestro.state_dir, "hello") != [3, 4] {
        assert!(
            start.elapsed() < common::WAIT,
            "releases kept: {:?}",
            release_dirs(&maestro.state_dir, "hello")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = reqwest::get(format!("{}/metrics", maestro.status_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("maestro_disk_free_bytes "), "{metrics}");
    assert!(
        metrics.contains("maestro_release_bytes{app=\"hello\"} "),
        "{metrics}"
    );
    // Releases uploaded as they run are bundles, not layers: no layer was downloaded.
    assert!(
        metrics.contains("maestro_layer_fetched_bytes_total{kind=\"app\"} 0\n"),
        "{metrics}"
    );

    // Back to release 3: it is still unpacked, so it starts with apprepo's copy gone.
    bundles.bundles.lock().unwrap().clear();
    assign(&mut link, 5, vec![assignments[2].clone()]).await;
    wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFinished && e.release == 3
    })
    .await;
    maestro.wait_body("hello.localhost", "v3").await;
    assert_eq!(release_dirs(&maestro.state_dir, "hello"), [3, 4]);
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_would_fill_the_disk_is_refused_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let cfg = config(dir.path(), Some(&beacon));
    let maestro = Maestro::start(cfg.clone()).await;
    let (mut link, _) = beacon.accept().await;
    assign(
        &mut link,
        1,
        vec![bundles.python_app("hello", 1, "one", "")],
    )
    .await;
    maestro.wait_body("hello.localhost", "one").await;
    maestro.stop().await;
    drop(link);

    // The same node, now asked to keep more free space than any disk has.
    let maestro = Maestro::start(px_maestro::config::Config {
        min_free_disk: px_proto::size::ByteSize(u64::MAX / 2),
        ..cfg
    })
    .await;
    let (mut link, _) = beacon.accept().await;
    maestro.wait_body("hello.localhost", "one").await;
    assign(
        &mut link,
        2,
        vec![bundles.python_app("hello", 2, "two", "")],
    )
    .await;
    let failed = wait_event(&mut link, |e| {
        e.kind == NodeEventKind::DeployFailed && e.release == 2
    })
    .await;
    assert!(
        failed.message.contains("not enough disk") && failed.message.contains("min_free_disk"),
        "{}",
        failed.message
    );
    assert!(
        failed.message.contains("v1 keeps serving"),
        "{}",
        failed.message
    );
    assert_eq!(
        maestro.get("hello.localhost", "/").await.unwrap(),
        (200, "one".into())
    );
    assert_eq!(
        release_dirs(&maestro.state_dir, "hello"),
        [1],
        "nothing half-written"
    );
    maestro.stop().await;
}

/// An app that answers `/limits` with its open-files and data-segment limits.
const LIMITS_PY: &str = r#"import resource, sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        data = resource.getrlimit(resource.RLIMIT_DATA)[0]
        body = f"{files} {data}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_delegated_cgroup_an_apps_limits_are_rlimits() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(config(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    let limited = bundles.app(
        "limited",
        1,
        "name = \"limited\"\nrun = \"exec python3 server.py \\\"$1\\\"\"\n[limits]\nopen_files = 64\nmemory = \"256MiB\"\n",
        &[("server.py", LIMITS_PY)],
        &[],
    );
    let free = bundles.app(
        "free",
        1,
        "name = \"free\"\nrun = \"exec python3 server.py \\\"$1\\\"\"\n",
        &[("server.py", LIMITS_PY)],
        &[],
    );
    assign(&mut link, 1, vec![limited, free]).await;
    let mut finished = std::collections::BTreeSet::new();
    while finished.len() < 2 {
        let event = wait_event(&mut link, |e| e.kind == NodeEventKind::DeployFinished).await;
        finished.insert(event.app);
    }
    let (status, body) = maestro.get("limited.localhost", "/limits").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, format!("64 {}", 256u64 << 20));
    // An app without [limits] keeps the web server's own.
    let (_, body) = maestro.get("free.localhost", "/limits").await.unwrap();
    assert_ne!(body.split(' ').next(), Some("64"), "{body}");
    maestro.stop().await;
}
