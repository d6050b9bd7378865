//! Beacon over real sockets: Maestros and repositories link over TLS, get assignments, report
//! state; bad peers are refused while everyone else is served; lost nodes, restarts and an
//! absent repository are handled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Beacon, RepoStub, Tokens, WAIT, config, maestro_hello, next_assign, open_link,
    repository_hello, webhook_receiver,
};
use futures_util::{SinkExt, StreamExt};
use px_proto::api::ReleaseCause;
use px_proto::beacon::{App, EventKind, Node, NodeHealth, RolloutRecord, RolloutState};
use px_proto::link::{
    DeployFigures, FromBeacon, InstanceState, InstanceStatus, NodeEvent, NodeEventKind, NodeReport,
    PROTOCOL_VERSION, PeerRole, ReleaseCommitted, RollbackOrder, RolloutFigures, ToBeacon,
};
use px_test_support::Pki;

struct Setup {
    _dir: tempfile::TempDir,
    repo: RepoStub,
    tokens: Tokens,
    beacon: Beacon,
}

async fn setup(adjust: impl FnOnce(&mut px_beacon::config::Config)) -> Setup {
    setup_with_hello("", adjust).await
}

/// A Beacon whose repository holds `hello` v1 with `manifest_extra` from the start, so no
/// fetch can see another v1 first.
async fn setup_with_hello(
    manifest_extra: &str,
    adjust: impl FnOnce(&mut px_beacon::config::Config),
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, manifest_extra);
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut cfg = config(dir.path(), &pki, &tokens, &url);
    adjust(&mut cfg);
    let beacon = Beacon::start(cfg, pki, &tokens, 0).await;
    Setup {
        _dir: dir,
        repo,
        tokens,
        beacon,
    }
}

fn healthy(app: &str, release: u64, generation: u64) -> NodeReport {
    NodeReport {
        generation,
        instances: vec![InstanceStatus {
            app: app.into(),
            release,
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
        }],
        rollouts: Vec::new(),
        disk: None,
        builds: Vec::new(),
    }
}

#[tokio::test]
async fn a_maestro_gets_its_assignment_and_the_rollout_completes() {
    let s = setup(|_| {}).await;
    let (mut link, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    assert!(
        matches!(
            answer,
            FromBeacon::Welcome {
                protocol: PROTOCOL_VERSION,
                ..
            }
        ),
        "{answer:?}"
    );
    let assignment = next_assign(&mut link).await;
    assert!(assignment.generation >= 1);
    let [hello] = &assignment.apps[..] else {
        panic!("{assignment:?}")
    };
    assert_eq!((hello.app.as_str(), hello.release), ("hello", 1));
    assert_eq!(hello.domains, ["hello.localhost"]);
    assert_eq!(hello.env["DATABASE_URL"], "postgres://db");
    assert!(
        hello
            .bundle_url
            .ends_with(&format!("/v1/bundles/{}", hello.bundle_sha256)),
        "{}",
        hello.bundle_url
    );

    let apps: Vec<App> = s.beacon.get("/v1/apps").await;
    assert_eq!(apps[0].rollout, RolloutState::RollingOut);
    link.send(ToBeacon::Heartbeat(healthy(
        "hello",
        1,
        assignment.generation,
    )))
    .await
    .unwrap();
    let apps: Vec<App> = s
        .beacon
        .wait_for("/v1/apps", "rolled out", |apps: &Vec<App>| {
            apps[0].rollout == RolloutState::RolledOut
        })
        .await;
    assert_eq!(apps[0].healthy_nodes, 1);
    assert!(apps[0].rollout_seconds.is_some());
    let nodes: Vec<Node> = s.beacon.get("/v1/nodes").await;
    assert_eq!(nodes[0].name, "web-1");
    assert_eq!(nodes[0].health, NodeHealth::Connected);
    assert_eq!(nodes[0].instances[0].pid, Some(4242));
    // The finished event follows the rollout's state once its history is durable, so it is
    // waited for rather than read once.
    let finished = s
        .beacon
        .wait_for_event(EventKind::DeployFinished, "the deploy's finished event")
        .await;
    assert_eq!(finished.release, Some(1));
    let kinds: Vec<EventKind> = s.beacon.events().await.iter().map(|e| e.kind).collect();
    for kind in [EventKind::DeployStarted, EventKind::NodeJoined] {
        assert!(kinds.contains(&kind), "{kind:?} missing from {kinds:?}");
    }
    s.beacon.stop().await;
}

#[tokio::test]
async fn beacon_answers_each_heartbeat_at_once_and_beats_on_no_timer_of_its_own() {
    let s = setup(|_| {}).await;
    let (mut link, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    let FromBeacon::Welcome {
        heartbeat_ms,
        answers_heartbeats,
        ..
    } = answer
    else {
        panic!("{answer:?}")
    };
    assert!(answers_heartbeats);
    assert_eq!(heartbeat_ms, Some(px_proto::link::beacon_heartbeat_ms()));
    let assignment = next_assign(&mut link).await;
    // A silent peer is sent nothing: a Beacon that beat on its own did so every 2 s, which at
    // 10,000 links was most of its steady work.
    // (Other frames, such as the ACME task's certificate set, may come meanwhile.)
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(frame) = tokio::time::timeout_at(quiet_until, link.next()).await {
        assert!(
            !matches!(frame, Some(Ok(FromBeacon::Heartbeat)) | None | Some(Err(_))),
            "beacon sent {frame:?} to a silent peer"
        );
    }
    for _ in 0..3 {
        link.send(ToBeacon::Heartbeat(healthy(
            "hello",
            1,
            assignment.generation,
        )))
        .await
        .unwrap();
        let answered = tokio::time::timeout(WAIT, async {
            loop {
                match link.next().await {
                    Some(Ok(FromBeacon::Heartbeat)) => return,
                    Some(Ok(_)) => continue,
                    other => panic!("link ended: {other:?}"),
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "beacon did not answer a heartbeat");
    }
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_release_notice_reaches_every_maestro_without_waiting_for_reconciliation() {
    // Reconciliation is slow here, so only the notice can explain a prompt assignment.
    let s = setup(|c| c.reconcile_interval = Duration::from_secs(3600)).await;
    let mut links = Vec::new();
    for name in ["web-1", "web-2"] {
        let (mut link, _) = open_link(
            &s.beacon.control_addr,
            &s.beacon.pki.ca(),
            maestro_hello(name, &s.tokens.maestro, 0),
        )
        .await;
        let first = next_assign(&mut link).await;
        assert_eq!(first.apps[0].release, 1);
        links.push((link, first.generation));
    }
    s.repo.release("hello", 2, "");
    let hello = repository_hello("apprepo", &s.tokens.repository);
    let (mut repo_link, answer) =
        open_link(&s.beacon.control_addr, &s.beacon.pki.ca(), hello).await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }));
    repo_link
        .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 2,
            bundle_sha256: format!("{:064x}", 2),
        }))
        .await
        .unwrap();
    for (link, old_generation) in &mut links {
        let next = next_assign(link).await;
        assert!(next.generation > *old_generation);
        assert_eq!(next.apps[0].release, 2);
    }
    s.beacon.stop().await;
}

#[tokio::test]
async fn reconciliation_repairs_a_missed_notice() {
    let s = setup(|c| c.reconcile_interval = Duration::from_millis(300)).await;
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    assert_eq!(next_assign(&mut link).await.apps[0].release, 1);
    s.repo.release("hello", 2, "");
    s.repo.release("other", 1, "");
    let next = next_assign(&mut link).await;
    let mut got: Vec<(String, u64)> = next
        .apps
        .iter()
        .map(|a| (a.app.clone(), a.release))
        .collect();
    got.sort();
    assert_eq!(got, [("hello".to_string(), 2), ("other".to_string(), 1)]);
    // Each app carries its creation time, which ranks its claim on a shared host.
    assert!(
        next.apps
            .iter()
            .all(|a| a.app_created_at.as_deref() == Some("2026-11-25T00:00:00Z")),
        "{:?}",
        next.apps
    );
    s.beacon.stop().await;
}

#[tokio::test]
async fn placement_labels_choose_the_nodes() {
    // Beacon may read the repository before the second release is in it; a short reconcile
    // interval lets it see the release soon after, rather than at the default interval.
    let s = setup(|c| c.reconcile_interval = Duration::from_millis(300)).await;
    s.repo
        .release("api", 1, "[placement]\nlabels = { role = \"api\" }\n");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut api = maestro_hello("api-1", &s.tokens.maestro, 0);
    api.labels.insert("role".into(), "api".into());
    // Make sure Beacon has read the repository with both apps before the nodes join.
    s.beacon
        .wait_for("/v1/apps", "two apps", |apps: &Vec<App>| apps.len() == 2)
        .await;
    let (mut api_link, _) = open_link(&s.beacon.control_addr, &s.beacon.pki.ca(), api).await;
    let (mut web_link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    let mut on_api: Vec<String> = next_assign(&mut api_link)
        .await
        .apps
        .into_iter()
        .map(|a| a.app)
        .collect();
    on_api.sort();
    assert_eq!(on_api, ["api", "hello"]);
    let on_web: Vec<String> = next_assign(&mut web_link)
        .await
        .apps
        .into_iter()
        .map(|a| a.app)
        .collect();
    assert_eq!(on_web, ["hello"]);
    s.beacon.stop().await;
}

#[tokio::test]
async fn runtime_requirements_choose_the_nodes() {
    let s = setup(|c| c.reconcile_interval = Duration::from_millis(300)).await;
    s.repo.release("py", 1, "runtime = \"python3>=3.11\"\n");
    s.beacon
        .wait_for("/v1/apps", "two apps", |apps: &Vec<App>| apps.len() == 2)
        .await;
    // Each node reports the runtimes it found on its host in its Hello.
    let hello = |name: &str, python: Option<&str>| {
        let mut hello = maestro_hello(name, &s.tokens.maestro, 0);
        if let Some(version) = python {
            hello.runtimes.insert("python3".into(), version.into());
        }
        hello
    };
    let mut apps_on = Vec::new();
    for (name, python) in [
        ("new-py", Some("3.12.1")),
        ("old-py", Some("3.9.2")),
        ("no-py", None),
    ] {
        let (mut link, _) = open_link(
            &s.beacon.control_addr,
            &s.beacon.pki.ca(),
            hello(name, python),
        )
        .await;
        let mut apps: Vec<String> = next_assign(&mut link)
            .await
            .apps
            .into_iter()
            .map(|a| a.app)
            .collect();
        apps.sort();
        apps_on.push((name, apps, link));
    }
    let placed: Vec<(&str, Vec<String>)> = apps_on
        .iter()
        .map(|(name, apps, _)| (*name, apps.clone()))
        .collect();
    assert_eq!(
        placed,
        [
            ("new-py", vec!["hello".to_string(), "py".to_string()]),
            ("old-py", vec!["hello".to_string()]),
            ("no-py", vec!["hello".to_string()]),
        ]
    );
    s.beacon.stop().await;
}

/// Sends raw bytes after TLS and expects the link to be closed.
async fn tls_then(addr: &str, ca: &std::path::Path, bytes: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = px_runtime::tls::client_config(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("link not closed");
    true
}

#[tokio::test]
async fn bad_peers_are_refused_and_good_ones_keep_working() {
    let s = setup(|_| {}).await;
    let (mut good, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    next_assign(&mut good).await;

    let reason = |answer: FromBeacon| match answer {
        FromBeacon::Rejected { reason } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    };
    let (_, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("evil", "pxt_wrong", 0),
    )
    .await;
    assert!(reason(answer).contains("unknown token"));
    let mut wrong_role = maestro_hello("apprepo", s.tokens.maestro.of("web-1"), 0);
    wrong_role.role = PeerRole::Repository;
    let (_, answer) = open_link(&s.beacon.control_addr, &s.beacon.pki.ca(), wrong_role).await;
    assert!(reason(answer).contains("not a Repository token"));
    let mut old = maestro_hello("old", s.tokens.maestro.of("web-1"), 0);
    old.protocol = 0;
    let (_, answer) = open_link(&s.beacon.control_addr, &s.beacon.pki.ca(), old).await;
    assert!(reason(answer).contains("protocol version 0"));
    let (_, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("bad name", s.tokens.maestro.of("web-1"), 0),
    )
    .await;
    assert!(reason(answer).contains("invalid peer name"));

    // Garbage after TLS, an oversized frame, and garbage without TLS: all closed.
    assert!(
        tls_then(
            &s.beacon.control_addr,
            &s.beacon.pki.ca(),
            b"\x00\x00\x00\x05hello"
        )
        .await
    );
    assert!(
        tls_then(
            &s.beacon.control_addr,
            &s.beacon.pki.ca(),
            &u32::MAX.to_be_bytes()
        )
        .await
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(&s.beacon.control_addr)
            .await
            .unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut buf))
            .await
            .expect("plain tcp not closed")
            .ok();
    }
    // A client that trusts another CA refuses Beacon's certificate.
    let other = Pki::new(&["localhost"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(&s.beacon.control_addr)
        .await
        .unwrap();
    let refused =
        tokio_rustls::TlsConnector::from(px_runtime::tls::client_config(&other.ca()).unwrap())
            .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
            .await;
    assert!(refused.is_err());

    // The good link is still served: a heartbeat with a report shows up in the node table.
    good.send(ToBeacon::Heartbeat(healthy("hello", 1, 1)))
        .await
        .unwrap();
    s.beacon
        .wait_for(
            "/v1/nodes",
            "the good node's report",
            |nodes: &Vec<Node>| {
                nodes
                    .iter()
                    .any(|n| n.name == "web-1" && n.instances.len() == 1)
            },
        )
        .await;
    let metrics = s
        .beacon
        .http
        .get(format!("{}/metrics", s.beacon.http_url))
        .bearer_auth(&s.beacon.read_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rejected: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("beacon_links_rejected_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rejected >= 6, "{metrics}");
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_silent_node_is_lost_once_alerted_and_recovers() {
    let (hook, received) = webhook_receiver().await;
    let s = setup(|c| {
        c.node_lost_after = Duration::from_millis(600);
        c.alerts.webhooks = vec![hook];
    })
    .await;
    // The node links, then says nothing more (its TCP connection stays open).
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    next_assign(&mut link).await;
    let lost = s
        .beacon
        .wait_for_event(EventKind::NodeLost, "node lost")
        .await;
    assert_eq!(lost.node.as_deref(), Some("web-1"));
    let nodes: Vec<Node> = s.beacon.get("/v1/nodes").await;
    assert_eq!(nodes[0].health, NodeHealth::Lost);
    let start = std::time::Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(start.elapsed() < WAIT, "no alert sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alert = received.lock().unwrap()[0].clone();
    assert!(alert["text"].as_str().unwrap().contains("web-1"), "{alert}");
    assert_eq!(alert["event"]["kind"], "node_lost");

    // It comes back: recovered, and alerted as such.
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    link.send(ToBeacon::Heartbeat(NodeReport::default()))
        .await
        .unwrap();
    s.beacon
        .wait_for_event(EventKind::NodeRecovered, "node recovered")
        .await;
    let lost_events = s
        .beacon
        .events()
        .await
        .iter()
        .filter(|e| e.kind == EventKind::NodeLost)
        .count();
    assert_eq!(lost_events, 1, "lost is recorded once");
    let start = std::time::Instant::now();
    while !received
        .lock()
        .unwrap()
        .iter()
        .any(|a| a["event"]["kind"] == "node_recovered")
    {
        assert!(start.elapsed() < WAIT, "no recovery alert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(link);
    s.beacon.stop().await;
}

#[tokio::test]
async fn node_events_are_recorded_and_a_failed_deploy_fails_the_rollout() {
    let (hook, received) = webhook_receiver().await;
    let s = setup(|c| c.alerts.webhooks = vec![hook]).await;
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    next_assign(&mut link).await;
    for _ in 0..3 {
        link.send(ToBeacon::Event(NodeEvent {
            kind: NodeEventKind::CrashLoop,
            app: "hello".into(),
            release: 1,
            message: "hello v1 keeps crashing".into(),
            detail: Some("Traceback: boom".into()),
            instance: None,
            level: None,
            failure: None,
            build: None,
        }))
        .await
        .unwrap();
    }
    link.send(ToBeacon::Event(NodeEvent {
        kind: NodeEventKind::DeployFailed,
        app: "hello".into(),
        release: 1,
        message: "hello v1 never became healthy".into(),
        detail: Some("ImportError".into()),
        instance: None,
        level: None,
        failure: None,
        build: None,
    }))
    .await
    .unwrap();
    s.beacon
        .wait_for("/v1/apps", "failed rollout", |apps: &Vec<App>| {
            apps[0].rollout == RolloutState::Failed
        })
        .await;
    let crash = s
        .beacon
        .wait_for_event(EventKind::CrashLoop, "crash loop")
        .await;
    assert_eq!(crash.detail.as_deref(), Some("Traceback: boom"));
    let start = std::time::Instant::now();
    while received.lock().unwrap().len() < 2 {
        assert!(
            start.elapsed() < WAIT,
            "alerts missing: {:?}",
            received.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kinds: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|a| a["event"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "crash_loop").count(),
        1,
        "a crash loop alerts once: {kinds:?}"
    );
    assert!(kinds.contains(&"deploy_failed".to_string()), "{kinds:?}");
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_restarted_beacon_rebuilds_its_view_without_duplicate_assignments() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, "");
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let cfg = config(dir.path(), &pki, &tokens, &url);
    let beacon = Beacon::start(cfg.clone(), pki.clone(), &tokens, 0).await;
    let port = beacon.control_port();
    let (mut link, _) = open_link(
        &beacon.control_addr,
        &pki.ca(),
        maestro_hello("web-1", &tokens.maestro, 0),
    )
    .await;
    let applied = next_assign(&mut link).await.generation;
    link.send(ToBeacon::Heartbeat(healthy("hello", 1, applied)))
        .await
        .unwrap();
    beacon
        .wait_for("/v1/apps", "rolled out", |apps: &Vec<App>| {
            apps[0].rollout == RolloutState::RolledOut
        })
        .await;
    beacon.stop().await;
    drop(link);

    // Same data directory, same address; the node reconnects saying what it applied.
    let beacon = Beacon::start(cfg, pki.clone(), &tokens, port).await;
    let mut hello = maestro_hello("web-1", &tokens.maestro, applied);
    hello.state = Some(healthy("hello", 1, applied));
    let (mut link, answer) = open_link(&beacon.control_addr, &pki.ca(), hello).await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }));
    let apps: Vec<App> = beacon
        .wait_for("/v1/apps", "rebuilt view", |apps: &Vec<App>| {
            apps.len() == 1 && apps[0].rollout == RolloutState::RolledOut
        })
        .await;
    assert_eq!(apps[0].release, 1);
    // Heartbeats flow, and no assignment is sent for a state the node already runs.
    for _ in 0..3 {
        link.send(ToBeacon::Heartbeat(healthy("hello", 1, applied)))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(300), link.next()).await {
            Err(_) | Ok(Some(Ok(FromBeacon::Heartbeat))) => {}
            Ok(other) => panic!("expected no assignment after restart, got {other:?}"),
        }
    }
    let nodes: Vec<Node> = beacon.get("/v1/nodes").await;
    assert_eq!(nodes[0].applied_generation, applied);
    beacon.stop().await;
}

#[tokio::test]
async fn with_the_repository_away_beacon_keeps_the_last_desired_state() {
    let s = setup(|c| c.reconcile_interval = Duration::from_millis(200)).await;
    s.beacon
        .wait_for("/v1/apps", "first read", |apps: &Vec<App>| apps.len() == 1)
        .await;
    s.repo
        .down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    s.beacon
        .wait_for_event(EventKind::RepositoryUnreachable, "repository unreachable")
        .await;
    // A node joining now still gets the last known state.
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-2", &s.tokens.maestro, 0),
    )
    .await;
    let assignment = next_assign(&mut link).await;
    assert_eq!(assignment.apps[0].app, "hello");
    let apps: Vec<App> = s.beacon.get("/v1/apps").await;
    assert_eq!(apps.len(), 1);
    // Back again: recovered, and new releases flow.
    s.repo.release("hello", 2, "");
    s.repo
        .down
        .store(false, std::sync::atomic::Ordering::Relaxed);
    s.beacon
        .wait_for_event(EventKind::RepositoryRecovered, "repository recovered")
        .await;
    assert_eq!(next_assign(&mut link).await.apps[0].release, 2);
    s.beacon.stop().await;
}

/// A node's report: `app` healthy at `release`, with the switch's figures so far.
fn watched(
    app: &str,
    release: u64,
    generation: u64,
    figures: DeployFigures,
    done: bool,
) -> NodeReport {
    let mut report = healthy(app, release, generation);
    report.rollouts = vec![RolloutFigures {
        app: app.into(),
        release,
        previous: release.checked_sub(1).filter(|p| *p > 0),
        watched_ms: if done { 2000 } else { 500 },
        watch_ms: 2000,
        done,
        figures,
    }];
    report
}

/// Reads repository-link frames for `within`, returning the rollback orders among them.
async fn rollback_orders(link: &mut common::Link, within: Duration) -> Vec<RollbackOrder> {
    let mut orders = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, link.next()).await {
        if let FromBeacon::Rollback(order) = frame.unwrap() {
            orders.push(order);
        }
    }
    orders
}

#[tokio::test]
async fn an_error_budget_spent_orders_one_rollback_and_a_rollback_is_never_rolled_back() {
    let budget = "[deploy]\nwatch = \"2s\"\nmax_error_rate = \"5%\"";
    let s = setup_with_hello(budget, |c| {
        c.reconcile_interval = Duration::from_millis(200)
    })
    .await;
    let repo_hello = repository_hello("apprepo", &s.tokens.repository);
    let (mut repo_link, _) =
        open_link(&s.beacon.control_addr, &s.beacon.pki.ca(), repo_hello).await;
    let (mut link, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    let fine = DeployFigures {
        new_requests: 100,
        new_errors: 2,
        ..Default::default()
    };
    let broken = DeployFigures {
        new_requests: 40,
        new_errors: 30,
        old_requests: 3,
        closed: 2,
        cut: 0,
        killed: 0,
    };

    // v1 stays within its budget (2%): verified once its watch is over, nothing rolled back.
    let a = next_assign(&mut link).await;
    link.send(ToBeacon::Heartbeat(watched(
        "hello",
        1,
        a.generation,
        fine,
        true,
    )))
    .await
    .unwrap();
    let verified = s
        .beacon
        .wait_for_event(EventKind::DeployVerified, "v1 verified")
        .await;
    assert!(
        verified.message.contains("within its error budget of 5%"),
        "{verified:?}"
    );

    // v2 answers 5xx to 75%: Beacon asks the repository for a rollback to v1, alerts, and
    // says why.
    s.repo.release("hello", 2, budget);
    let a = next_assign(&mut link).await;
    assert_eq!(a.apps[0].release, 2);
    link.send(ToBeacon::Heartbeat(watched(
        "hello",
        2,
        a.generation,
        broken,
        false,
    )))
    .await
    .unwrap();
    let rolled = s
        .beacon
        .wait_for_event(EventKind::DeployRolledBack, "v2 rolled back")
        .await;
    assert_eq!(rolled.release, Some(2));
    assert!(rolled.message.contains("hello v2 rolled back to v1: 30 of 40 requests (75.0%) answered 5xx, over its error budget of 5%"), "{rolled:?}");
    let orders = rollback_orders(&mut repo_link, Duration::from_millis(500)).await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(
        (orders[0].app.as_str(), orders[0].from, orders[0].to),
        ("hello", 2, Some(1))
    );
    // Later reports of the same switch change nothing: one verdict, one order.
    link.send(ToBeacon::Heartbeat(watched(
        "hello",
        2,
        a.generation,
        broken,
        true,
    )))
    .await
    .unwrap();
    assert!(
        rollback_orders(&mut repo_link, Duration::from_millis(800))
            .await
            .is_empty()
    );

    // The repository commits v3, a rollback to v1. Over budget too, it is not rolled back again.
    s.repo.release("hello", 3, budget);
    s.repo.apps.lock().unwrap().get_mut("hello").unwrap().cause = ReleaseCause::Rollback { to: 1 };
    let a = next_assign(&mut link).await;
    assert_eq!(a.apps[0].release, 3);
    link.send(ToBeacon::Heartbeat(watched(
        "hello",
        3,
        a.generation,
        broken,
        false,
    )))
    .await
    .unwrap();
    let failed = s
        .beacon
        .wait_for(
            "/v1/events?limit=1000",
            "v3 judged",
            |events: &Vec<px_proto::beacon::Event>| {
                events
                    .iter()
                    .any(|e| e.kind == EventKind::DeployFailed && e.release == Some(3))
            },
        )
        .await
        .into_iter()
        .find(|e| e.kind == EventKind::DeployFailed && e.release == Some(3))
        .unwrap();
    assert!(
        failed
            .message
            .contains("not rolled back: it is itself a rollback"),
        "{failed:?}"
    );
    assert!(
        rollback_orders(&mut repo_link, Duration::from_millis(800))
            .await
            .is_empty()
    );

    // The history, newest first, with each rollout's figures and verdict.
    let rollouts: Vec<RolloutRecord> = s.beacon.get("/v1/apps/hello/rollouts").await;
    let summary: Vec<(u64, RolloutState)> = rollouts.iter().map(|r| (r.release, r.state)).collect();
    assert_eq!(
        summary,
        [
            (3, RolloutState::Failed),
            (2, RolloutState::RolledBack),
            (1, RolloutState::RolledOut)
        ]
    );
    assert_eq!(rollouts[1].figures, broken);
    assert!(rollouts[2].verified);
    let metrics = s
        .beacon
        .http
        .get(format!("{}/metrics", s.beacon.http_url))
        .bearer_auth(&s.beacon.read_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("beacon_rollbacks_total 1"), "{metrics}");

    // A restarted Beacon remembers the verdicts.
    let Setup {
        _dir,
        repo: _repo,
        tokens,
        beacon,
    } = s;
    let (config, pki) = (beacon.config.clone(), beacon.pki.clone());
    beacon.stop().await;
    let beacon = Beacon::start(config, pki, &tokens, 0).await;
    let rollouts: Vec<RolloutRecord> = beacon.get("/v1/apps/hello/rollouts").await;
    assert_eq!(rollouts.len(), 3, "{rollouts:?}");
    assert_eq!(rollouts[1].state, RolloutState::RolledBack);
    beacon.stop().await;
}
