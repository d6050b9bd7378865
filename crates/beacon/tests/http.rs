//! Beacon's HTTP side over real sockets: token checks, event paging and the SSE stream, metrics,
//! and the status page rendered by a real browser (headless Chromium).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Beacon, RepoStub, Tokens, WAIT, config, maestro_hello, next_assign, open_link};
use futures_util::{SinkExt, StreamExt};
use px_proto::beacon::{Event, EventKind};
use px_proto::link::{InstanceState, InstanceStatus, NodeReport, ToBeacon};
use px_test_support::Pki;
use reqwest::StatusCode;

async fn start() -> (tempfile::TempDir, Tokens, Beacon) {
    start_with(|_| {}).await
}

/// [`start`], with the repository as `prepare` leaves it.
async fn start_with(prepare: impl FnOnce(&RepoStub)) -> (tempfile::TempDir, Tokens, Beacon) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 3, "");
    prepare(&repo);
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let beacon = Beacon::start(config(dir.path(), &pki, &tokens, &url), pki, &tokens, 0).await;
    (dir, tokens, beacon)
}

#[tokio::test]
async fn the_api_needs_a_reading_token() {
    let (_dir, tokens, beacon) = start().await;
    let url = format!("{}/v1/nodes", beacon.http_url);
    assert_eq!(
        beacon.http.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        beacon
            .http
            .get(&url)
            .bearer_auth("pxt_nope")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // A link-only token may not read the API.
    let r = beacon
        .http
        .get(&url)
        .bearer_auth(&tokens.repository)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        beacon
            .http
            .get(&url)
            .bearer_auth(&tokens.read)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = beacon
        .http
        .get(format!("{}/v1/apps/nosuch", beacon.http_url))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = beacon
        .http
        .get(format!("{}/v1/events?after=x", beacon.http_url))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    beacon.stop().await;
}

/// Stops Beacon while the test still follows one of its streams. An open stream is a request
/// that never ends, so Beacon's shutdown waits for it until its drain deadline (ten seconds),
/// then returns. That wait is on Beacon's own timer, so tokio's clock is paused: the runtime,
/// idle, moves it straight to the deadline. Whatever else is still running is cut at that same
/// deadline either way, and `stop` still fails if Beacon does not stop within its bound.
async fn stop_while_following(beacon: Beacon) {
    tokio::time::pause();
    beacon.stop().await;
}

#[tokio::test]
async fn events_page_and_stream_filtered_by_app() {
    let (_dir, tokens, beacon) = start().await;
    beacon
        .wait_for_event(EventKind::DeployStarted, "deploy started")
        .await;
    let all: Vec<Event> = beacon.get("/v1/events").await;
    let first = all[0].seq;
    let after_first: Vec<Event> = beacon.get(&format!("/v1/events?after={first}")).await;
    assert!(after_first.iter().all(|e| e.seq > first));
    assert_eq!(after_first.len(), all.len() - 1);
    let only_hello: Vec<Event> = beacon.get("/v1/events?app=hello").await;
    assert!(!only_hello.is_empty() && only_hello.iter().all(|e| e.app.as_deref() == Some("hello")));
    let config: px_proto::link::AppAssignment = beacon.get("/v1/apps/hello/config").await;
    assert_eq!(config.release, 3);

    // Follow the stream for app hello from the start; a node joining (no app) is filtered out,
    // its deploy finishing is not.
    let mut stream = beacon
        .http
        .get(format!(
            "{}/v1/events/stream?app=hello&after=0",
            beacon.http_url
        ))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let (mut link, _) = open_link(
        &beacon.control_addr,
        &beacon.pki.ca(),
        maestro_hello("web-1", &tokens.maestro, 0),
    )
    .await;
    let generation = next_assign(&mut link).await.generation;
    link.send(ToBeacon::Heartbeat(NodeReport {
        generation,
        instances: vec![InstanceStatus {
            app: "hello".into(),
            release: 3,
            state: InstanceState::Healthy,
            pid: None,
            port: None,
            restarts: 0,
            last_exit: None,
            process: "web".into(),
            number: 1,
            started_at: Some("2026-11-25T10:00:00Z".into()),
            memory_bytes: Some(43_200_000),
            cpu_permille: Some(30),
        }],
        rollouts: Vec::new(),
        disk: None,
        builds: Vec::new(),
    }))
    .await
    .unwrap();
    let mut text = String::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("deploy_finished") {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "stream so far: {text}");
    // `em ps` reads the reported process with its node and figures.
    let processes: Vec<px_proto::beacon::AppProcess> = beacon.get("/v1/apps/hello/processes").await;
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].node, "web-1");
    assert_eq!(
        (
            processes[0].status.memory_bytes,
            processes[0].status.cpu_permille
        ),
        (Some(43_200_000), Some(30))
    );
    let unknown = beacon
        .http
        .get(format!("{}/v1/apps/nosuch/processes", beacon.http_url))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);
    assert!(
        text.contains("deploy_started"),
        "the backlog comes first: {text}"
    );
    assert!(
        !text.contains("node_joined"),
        "other apps' and node events are filtered: {text}"
    );
    assert!(
        text.contains("id: "),
        "events carry ids for Last-Event-ID: {text}"
    );
    stop_while_following(beacon).await;
}

#[tokio::test]
async fn metrics_count_links_and_assignments() {
    let (_dir, tokens, beacon) = start().await;
    let (mut link, _) = open_link(
        &beacon.control_addr,
        &beacon.pki.ca(),
        maestro_hello("web-1", &tokens.maestro, 0),
    )
    .await;
    next_assign(&mut link).await;
    link.send(ToBeacon::Heartbeat(NodeReport::default()))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let m = beacon
            .http
            .get(format!("{}/metrics", beacon.http_url))
            .bearer_auth(&beacon.read_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("beacon_nodes_connected 1")
            && m.contains("beacon_assignments_sent_total 1")
            && m.contains("beacon_heartbeats_total 1")
        {
            break;
        }
        assert!(start.elapsed() < WAIT, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    beacon.stop().await;
}

fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser"] {
        if let Ok(out) = std::process::Command::new("which").arg(name).output()
            && out.status.success()
        {
            return Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
    }
    if std::env::var_os("PX_REQUIRE_CHROMIUM").is_some() {
        panic!(
            "PX_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)"
        );
    }
    eprintln!(
        "SKIPPING status page browser test: chromium not found (set PX_REQUIRE_CHROMIUM=1 to make this fail)"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_nodes_and_apps_in_a_browser() {
    let Some(browser) = chromium() else { return };
    let (_dir, tokens, beacon) = start().await;
    let (mut link, _) = open_link(
        &beacon.control_addr,
        &beacon.pki.ca(),
        maestro_hello("web-7", &tokens.maestro, 0),
    )
    .await;
    let assignment = next_assign(&mut link).await;
    // The node's disk, and a repository's storage, as their heartbeats carry them.
    let node_disk = px_proto::link::DiskReport {
        used_bytes: 45 << 20,
        objects: None,
        free_bytes: Some(20 << 30),
        floor_bytes: Some(512 << 20),
    };
    link.send(ToBeacon::Heartbeat(NodeReport {
        generation: assignment.generation,
        instances: Vec::new(),
        rollouts: Vec::new(),
        disk: Some(node_disk),
        builds: Vec::new(),
    }))
    .await
    .unwrap();
    let repo_hello = common::repository_hello("apprepo-1", &tokens.repository);
    let (mut repo_link, _) = open_link(&beacon.control_addr, &beacon.pki.ca(), repo_hello).await;
    repo_link
        .send(ToBeacon::Heartbeat(NodeReport {
            disk: Some(px_proto::link::DiskReport {
                used_bytes: 3 << 29,
                objects: Some(34),
                free_bytes: None,
                floor_bytes: None,
            }),
            ..NodeReport::default()
        }))
        .await
        .unwrap();
    beacon
        .wait_for("/v1/nodes", "node", |n: &Vec<px_proto::beacon::Node>| {
            n.first().is_some_and(|n| n.disk == Some(node_disk))
        })
        .await;
    beacon
        .wait_for(
            "/v1/repositories",
            "repository storage",
            |r: &Vec<px_proto::beacon::Repository>| r.first().is_some_and(|r| r.disk.is_some()),
        )
        .await;
    let profile = tempfile::tempdir().unwrap();
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("beacon-status.png");
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // Beacon's certificate is signed by the test's own CA, which this browser profile does
        // not hold; what the test looks at is the page, not the certificate check.
        "--ignore-certificate-errors",
    ];
    let page = format!("{}/", beacon.http_url);
    let run = |extra: Vec<String>| {
        let browser = browser.clone();
        let profile = profile.path().to_path_buf();
        let page = page.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(browser)
                .args(flags)
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(extra)
                .arg(page)
                .output()
                .unwrap()
        })
    };
    // Without a token the page is a sign-in form that shows nothing of the cluster.
    let dom = run(vec!["--dump-dom".into()]).await.unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("Sign in"), "no sign-in form: {dom}");
    assert!(
        !dom.contains("web-7"),
        "the page showed a node without a token: {dom}"
    );
    // Signing in with a reading token (the form posted as a person would) sets the cookie
    // that the browser then sends with the page.
    let sign_in = format!(
        "data:text/html,<form method=post action={}/login><input name=token value={}></form>\
         <script>document.forms[0].submit()</script>",
        beacon.http_url, tokens.read
    );
    let profile_dir = profile.path().to_path_buf();
    let signed_in = tokio::task::spawn_blocking({
        let browser = browser.clone();
        move || {
            std::process::Command::new(browser)
                .args(flags)
                .arg(format!("--user-data-dir={}", profile_dir.display()))
                .args(["--virtual-time-budget=5000", "--dump-dom"])
                .arg(sign_in)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(signed_in.status.success(), "{signed_in:?}");
    let dom = run(vec!["--dump-dom".into()]).await.unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("web-7"), "node missing from the page: {dom}");
    assert!(dom.contains("hello"), "app missing from the page: {dom}");
    assert!(dom.contains("connected"), "{dom}");
    assert!(
        dom.contains("45.0 MiB of releases · 20.0 GiB free (floor 512 MiB)"),
        "node disk missing: {dom}"
    );
    assert!(
        dom.contains("1.5 GiB in 34 bundles"),
        "repository storage missing: {dom}"
    );
    let out = run(vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1200,900".into(),
    ])
    .await
    .unwrap();
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    eprintln!("status page screenshot: {}", shot.display());
    beacon.stop().await;
}

#[tokio::test]
async fn app_output_forwarded_by_nodes_can_be_read_and_followed() {
    use px_proto::link::{LogBatch, LogLine, LogStream};
    let (_dir, tokens, beacon) = start().await;
    let (mut link, _) = open_link(
        &beacon.control_addr,
        &beacon.pki.ca(),
        maestro_hello("web-1", &tokens.maestro, 0),
    )
    .await;
    next_assign(&mut link).await;
    let line = |text: &str| LogLine {
        app: "hello".into(),
        release: 3,
        instance: 1,
        stream: LogStream::Stderr,
        at: "2026-11-25T00:00:00.000Z".into(),
        line: text.into(),
        build: None,
        process: None,
    };
    link.send(ToBeacon::Logs(LogBatch {
        lines: vec![line("first"), line("second")],
        dropped: 0,
    }))
    .await
    .unwrap();
    let entries: Vec<px_proto::beacon::LogEntry> = beacon
        .wait_for(
            "/v1/apps/hello/logs",
            "log lines",
            |e: &Vec<px_proto::beacon::LogEntry>| e.len() == 2,
        )
        .await;
    assert_eq!(
        (entries[0].node.as_str(), entries[1].line.as_str()),
        ("web-1", "second")
    );
    let mut stream = beacon
        .http
        .get(format!(
            "{}/v1/apps/hello/logs/stream?lines=1",
            beacon.http_url
        ))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    link.send(ToBeacon::Logs(LogBatch {
        lines: vec![line("third")],
        dropped: 0,
    }))
    .await
    .unwrap();
    let mut text = String::new();
    let done = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("third") {
                return;
            }
        }
    })
    .await;
    assert!(done.is_ok(), "{text}");
    assert!(
        text.contains("second") && !text.contains("first"),
        "backlog of one line, then live: {text}"
    );
    // A frame with too many lines ends the link.
    let lines = (0..=px_proto::link::MAX_LOG_BATCH)
        .map(|i| line(&i.to_string()))
        .collect();
    link.send(ToBeacon::Logs(LogBatch { lines, dropped: 0 }))
        .await
        .unwrap();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match link.next().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an oversized log batch must close the link");
    stop_while_following(beacon).await;
}

#[tokio::test]
async fn one_builds_output_can_be_read_and_followed_apart_from_the_apps() {
    use px_proto::beacon::LogEntry;
    use px_proto::link::{LogBatch, LogLine, LogStream};
    // build-1 runs hello and its builds 4 and 5: Beacon takes output only from the node it
    // gave an app or a build to.
    let (_dir, tokens, beacon) = start_with(|repo| {
        repo.pending_build("hello", 4);
        repo.pending_build("hello", 5);
    })
    .await;
    let mut hello = maestro_hello("build-1", &tokens.maestro, 0);
    hello.labels.insert("build".into(), "true".into());
    let (mut link, _) = open_link(&beacon.control_addr, &beacon.pki.ca(), hello).await;
    let assigned = next_assign(&mut link).await;
    assert_eq!(
        (assigned.apps.len(), assigned.builds.len()),
        (1, 2),
        "{assigned:?}"
    );
    let app_line = |text: &str| LogLine {
        app: "hello".into(),
        release: 3,
        instance: 1,
        stream: LogStream::Stdout,
        at: "2026-11-25T00:00:00.000Z".into(),
        line: text.into(),
        build: None,
        process: None,
    };
    let build_line = |build: u64, text: &str| LogLine {
        release: 0,
        instance: 0,
        stream: LogStream::Build,
        build: Some(build),
        ..app_line(text)
    };
    link.send(ToBeacon::Logs(LogBatch {
        lines: vec![
            build_line(4, "Collecting django"),
            app_line("GET / 200"),
            build_line(5, "Collecting flask"),
            build_line(4, "Successfully installed django"),
        ],
        dropped: 0,
    }))
    .await
    .unwrap();
    let texts =
        |entries: &[LogEntry]| -> Vec<String> { entries.iter().map(|e| e.line.clone()).collect() };
    let build4: Vec<LogEntry> = beacon
        .wait_for(
            "/v1/apps/hello/logs?build=4",
            "build 4's lines",
            |e: &Vec<LogEntry>| e.len() == 2,
        )
        .await;
    assert_eq!(
        texts(&build4),
        ["Collecting django", "Successfully installed django"]
    );
    let stdout: Vec<LogEntry> = beacon.get("/v1/apps/hello/logs?stream=stdout").await;
    assert_eq!(texts(&stdout), ["GET / 200"]);
    let builds: Vec<LogEntry> = beacon.get("/v1/apps/hello/logs?stream=build&lines=2").await;
    assert_eq!(
        texts(&builds),
        ["Collecting flask", "Successfully installed django"]
    );
    let refused = beacon
        .http
        .get(format!("{}/v1/apps/hello/logs?build=four", beacon.http_url))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

    // Following build 5: its backlog, then its new lines, and nothing of the app or build 4.
    let mut stream = beacon
        .http
        .get(format!(
            "{}/v1/apps/hello/logs/stream?build=5&lines=100",
            beacon.http_url
        ))
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    link.send(ToBeacon::Logs(LogBatch {
        lines: vec![
            app_line("GET /again 200"),
            build_line(4, "build 4 again"),
            build_line(5, "Successfully installed flask"),
        ],
        dropped: 0,
    }))
    .await
    .unwrap();
    let mut buffer = String::new();
    let mut followed: Vec<LogEntry> = Vec::new();
    let done = tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = buffer.find("\n\n") {
                let message: String = buffer.drain(..end + 2).collect();
                if let Some(data) = message.lines().find_map(|l| l.strip_prefix("data:")) {
                    followed.push(serde_json::from_str(data.trim()).unwrap());
                }
            }
            if followed.len() >= 2 {
                return;
            }
        }
    })
    .await;
    assert!(done.is_ok(), "{followed:?}");
    assert_eq!(
        texts(&followed),
        ["Collecting flask", "Successfully installed flask"]
    );
    assert!(followed.iter().all(|e| e.build == Some(5)));
    stop_while_following(beacon).await;
}

#[tokio::test]
async fn a_half_sent_request_is_cut_and_connections_beyond_the_cap_wait() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (_repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut config = config(dir.path(), &pki, &tokens, &url);
    let header = Duration::from_millis(800);
    config.http.header_read_timeout = header;
    config.http.max_connections = 2;
    let beacon = Beacon::start(config, pki, &tokens, 0).await;
    let port = beacon.http_url.rsplit_once(':').unwrap().1.to_owned();
    let addr = format!("127.0.0.1:{port}");
    // Over TLS, as every client speaks to Beacon's API: the handshake done, then half a head.
    let connector =
        tokio_rustls::TlsConnector::from(px_runtime::tls::client_config(&beacon.pki.ca()).unwrap());
    let connect = |connector: tokio_rustls::TlsConnector, addr: String| async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = px_runtime::tls::server_name("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    };
    // Two clients that send half a request head hold both connections...
    let mut first = connect(connector.clone(), addr.clone()).await;
    first.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut second = connect(connector.clone(), addr.clone()).await;
    second
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // ...so a third waits, not even through its handshake, beyond the cap...
    let third = tokio::spawn(async move {
        let mut third = connect(connector, addr).await;
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    tokio::time::sleep(header / 4).await;
    if third.is_finished() {
        panic!("a connection beyond the cap was served: {:?}", third.await);
    }
    // ...until the server cuts the half-sent heads at the deadline, and then it is answered.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut rest)).await;
    assert!(started.elapsed() < header * 4, "a half-sent head was kept");
    let answer = third.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
    beacon.stop().await;
}

#[tokio::test]
async fn metrics_and_the_status_page_need_a_reading_token_and_healthz_says_one_word() {
    let (_dir, tokens, beacon) = start().await;
    let get = |path: &str| beacon.http.get(format!("{}{path}", beacon.http_url));
    // /healthz answers anyone, with a fixed word.
    let health = get("/healthz").send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok\n");
    // /metrics wants a token that may read.
    assert_eq!(
        get("/metrics").send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let metrics = get("/metrics")
        .bearer_auth(&tokens.read)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("beacon_nodes_connected")
    );
    // The page shows only a sign-in form without one, and the cluster with one.
    let page = get("/").send().await.unwrap();
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    let page = page.text().await.unwrap();
    assert!(page.contains("<form method=post action=/login>"), "{page}");
    assert!(!page.contains("hello"), "{page}");
    let page = get("/").bearer_auth(&tokens.read).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // A link-only token signs in to nothing, and one no entry holds is named as unknown.
    let no_redirect = common::https_client_builder(&beacon.pki)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |token: &str| {
        no_redirect
            .post(format!("{}/login", beacon.http_url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };
    let refused = login(&px_runtime::tokens::generate()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get("set-cookie").is_none());
    assert!(refused.text().await.unwrap().contains("unknown token"));
    let refused = login(&tokens.repository).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.headers().get("set-cookie").is_none());
    // A reading token sets an HttpOnly, SameSite=Strict cookie that opens the page.
    let accepted = login(&tokens.read).await.unwrap();
    assert_eq!(accepted.status(), StatusCode::SEE_OTHER);
    let cookie = accepted.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    // Beacon serves HTTPS itself, so the cookie is sent back only over TLS.
    assert!(cookie.contains("; Secure"), "{cookie}");
    let pair = cookie.split(';').next().unwrap();
    let page = get("/").header("cookie", pair).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("hello"));
    // The cookie opens the page only: the API still wants the header.
    let api = get("/v1/apps").header("cookie", pair).send().await.unwrap();
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
    // Behind a TLS proxy the cookie is also Secure.
    let secure = no_redirect
        .post(format!("{}/login", beacon.http_url))
        .header("x-forwarded-proto", "https")
        .body(format!("token={}", tokens.read))
        .send()
        .await
        .unwrap();
    assert!(
        secure.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
    beacon.stop().await;
}
