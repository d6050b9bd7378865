//! Every control link proves who it is: a Maestro token speaks only for its own node, a node
//! reports only on what it was given, a peer that has not proved itself is held to a small
//! frame, a short deadline and a few connections, and a reload closes the links whose token
//! no longer verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Beacon, Link, RepoStub, Tokens, WAIT, config, maestro_hello, next_assign, open_link};
use futures_util::{SinkExt, StreamExt};
use px_beacon::admission::{MAX_UNAUTHENTICATED_PER_SOURCE, PREAUTH_DEADLINE};
use px_proto::beacon::{App, Event, LogEntry, Node, NodeHealth};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    DeployFigures, FromBeacon, Hello, LogBatch, LogLine, LogStream, MAX_HELLO_BYTES, NodeEvent,
    NodeEventKind, RolloutFigures, ToBeacon,
};
use px_test_support::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

struct Setup {
    _dir: tempfile::TempDir,
    _repo: RepoStub,
    tokens: Tokens,
    beacon: Beacon,
}

/// A Beacon whose repository holds app `hello` v1.
async fn setup() -> Setup {
    setup_reloadable(&[], |_| {}).await.0
}

/// [`setup`] with the apps `more` (name, manifest lines) too, reloading on the trigger's request
/// to its configuration as `change` leaves it.
async fn setup_reloadable(
    more: &[(&str, &str)],
    change: impl FnOnce(&mut px_beacon::config::Config),
) -> (Setup, px_runtime::systemd::ReloadTrigger) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, "");
    for (app, manifest) in more {
        repo.release(app, 1, manifest);
    }
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let cfg = config(dir.path(), &pki, &tokens, &url);
    let mut next = cfg.clone();
    change(&mut next);
    let (beacon, trigger) =
        Beacon::start_reloadable(cfg, pki, &tokens, Arc::new(Mutex::new(next))).await;
    let setup = Setup {
        _dir: dir,
        _repo: repo,
        tokens,
        beacon,
    };
    (setup, trigger)
}

/// A TCP connection to `addr` from the loopback address `source`.
async fn connect_from(source: [u8; 4], addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// [`open_link`] from the loopback address `source`.
async fn open_link_from(source: [u8; 4], beacon: &Beacon, hello: Hello) -> (Link, FromBeacon) {
    let tcp = connect_from(source, &beacon.control_addr).await;
    let tls = px_runtime::tls::client_config(&beacon.pki.ca()).unwrap();
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

/// How long until `stream` is closed by Beacon (whatever it sent first is read and dropped).
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut buf))
        .await
        .expect("the connection was not closed in time");
    start.elapsed()
}

/// Waits until web node `name` is connected with `instances` instances in the node table.
async fn wait_reporting(beacon: &Beacon, name: &str, instances: usize) {
    beacon
        .wait_for("/v1/nodes", "the node's report", |nodes: &Vec<Node>| {
            nodes.iter().any(|n| {
                n.name == name
                    && n.health == NodeHealth::Connected
                    && n.instances.len() == instances
            })
        })
        .await;
}

fn rejection(answer: FromBeacon) -> String {
    match answer {
        FromBeacon::Rejected { reason } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stolen_maestro_token_cannot_link_as_another_node_nor_disconnect_it() {
    let s = setup().await;
    let (mut web1, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }), "{answer:?}");
    next_assign(&mut web1).await;

    // web-2's token, taken from its host, names web-1: refused, naming both.
    let (_, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", s.tokens.maestro.of("web-2"), 0),
    )
    .await;
    let reason = rejection(answer);
    assert!(
        reason.contains("\"web-2\"") && reason.contains("\"web-1\""),
        "{reason}"
    );

    // web-1 keeps its link: it is still connected, and its heartbeat is still taken.
    web1.send(ToBeacon::Heartbeat(common::report_of("hello", 1)))
        .await
        .unwrap();
    s.beacon
        .wait_for(
            "/v1/nodes",
            "web-1 still linked and reporting",
            |nodes: &Vec<Node>| {
                nodes.iter().any(|n| {
                    n.name == "web-1"
                        && n.health == px_proto::beacon::NodeHealth::Connected
                        && n.instances.len() == 1
                })
            },
        )
        .await;
    let nodes: Vec<Node> = s.beacon.get("/v1/nodes").await;
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["web-1"]
    );
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_large_frame_before_hello_is_cut_and_the_same_size_after_it_is_taken() {
    let s = setup().await;
    // Before the Hello: a length just over the limit is refused at once, naming the limit.
    let tcp = TcpStream::connect(&s.beacon.control_addr).await.unwrap();
    let tls = px_runtime::tls::client_config(&s.beacon.pki.ca()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut raw: Framed<_, FrameCodec<FromBeacon, ToBeacon>> =
        Framed::new(stream, FrameCodec::new());
    raw.get_mut()
        .write_all(&((MAX_HELLO_BYTES + 1) as u32).to_be_bytes())
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, raw.next()).await.unwrap();
    match answer {
        Some(Ok(FromBeacon::Rejected { reason })) => {
            assert!(reason.contains(&MAX_HELLO_BYTES.to_string()), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    closed_after(raw.get_mut(), WAIT).await;

    // After it: a heartbeat many times that size is taken.
    let (mut web1, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    next_assign(&mut web1).await;
    let mut report = common::report_of("hello", 1);
    let one = report.instances[0].clone();
    report.instances = (1..=500)
        .map(|number| px_proto::link::InstanceStatus {
            number,
            ..one.clone()
        })
        .collect();
    assert!(serde_json::to_vec(&report).unwrap().len() > 2 * MAX_HELLO_BYTES);
    web1.send(ToBeacon::Heartbeat(report)).await.unwrap();
    wait_reporting(&s.beacon, "web-1", 500).await;
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_cut_within_the_deadline() {
    let s = setup().await;
    let margin = Duration::from_secs(2);
    // One completes TLS and says nothing; one does not even start TLS.
    let silent_tls = async {
        let tcp = TcpStream::connect(&s.beacon.control_addr).await.unwrap();
        let tls = px_runtime::tls::client_config(&s.beacon.pki.ca()).unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        closed_after(&mut stream, PREAUTH_DEADLINE + margin).await
    };
    let silent_tcp = async {
        let mut tcp = TcpStream::connect(&s.beacon.control_addr).await.unwrap();
        closed_after(&mut tcp, PREAUTH_DEADLINE + margin).await
    };
    let (tls, tcp) = tokio::join!(silent_tls, silent_tcp);
    for waited in [tls, tcp] {
        assert!(
            waited + Duration::from_millis(500) >= PREAUTH_DEADLINE,
            "cut after {waited:?}, before the deadline"
        );
    }
    s.beacon.stop().await;
}

#[tokio::test]
async fn one_address_is_held_to_its_share_of_unverified_connections() {
    let s = setup().await;
    let addr = s.beacon.control_addr.clone();
    let mut held = Vec::new();
    for _ in 0..MAX_UNAUTHENTICATED_PER_SOURCE {
        held.push(connect_from([127, 0, 0, 1], &addr).await);
    }
    // One more from the same address is closed at once, long before the deadline.
    let mut over = connect_from([127, 0, 0, 1], &addr).await;
    let waited = closed_after(&mut over, PREAUTH_DEADLINE).await;
    assert!(
        waited < PREAUTH_DEADLINE / 2,
        "closed only after {waited:?}"
    );
    // Another address links meanwhile.
    let (_web2, answer) = open_link_from(
        [127, 0, 0, 2],
        &s.beacon,
        maestro_hello("web-2", &s.tokens.maestro, 0),
    )
    .await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }), "{answer:?}");
    // Once those go, the first address links again.
    drop(held);
    let (_web1, answer) = open_link_from(
        [127, 0, 0, 1],
        &s.beacon,
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }), "{answer:?}");
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_reload_that_removes_a_token_closes_that_nodes_link_and_keeps_the_others() {
    let (s, reload) = setup_reloadable(&[], |next| {
        next.tokens.retain(|t| t.node.as_deref() != Some("web-2"));
    })
    .await;
    let mut links = Vec::new();
    for node in ["web-1", "web-2"] {
        let (mut link, answer) = open_link(
            &s.beacon.control_addr,
            &s.beacon.pki.ca(),
            maestro_hello(node, &s.tokens.maestro, 0),
        )
        .await;
        assert!(matches!(answer, FromBeacon::Welcome { .. }), "{answer:?}");
        next_assign(&mut link).await;
        links.push(link);
    }
    let [mut web1, mut web2] = <[Link; 2]>::try_from(links).ok().unwrap();
    reload.request();
    // web-2's link ends; heartbeats before the close may still come.
    tokio::time::timeout(WAIT, async {
        while let Some(Ok(frame)) = web2.next().await {
            assert!(matches!(frame, FromBeacon::Heartbeat), "{frame:?}");
        }
    })
    .await
    .expect("web-2's link was not closed");
    let (_, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-2", &s.tokens.maestro, 0),
    )
    .await;
    assert!(matches!(answer, FromBeacon::Rejected { .. }), "{answer:?}");
    // web-1 is still linked and heard.
    web1.send(ToBeacon::Heartbeat(common::report_of("hello", 1)))
        .await
        .unwrap();
    wait_reporting(&s.beacon, "web-1", 1).await;
    s.beacon.stop().await;
}

#[tokio::test]
async fn what_a_node_says_about_an_app_it_was_not_given_is_not_stored() {
    let (s, _) = setup_reloadable(
        &[("api", "[placement]\nlabels = { role = \"api\" }\n")],
        |_| {},
    )
    .await;
    s.beacon
        .wait_for("/v1/apps", "both apps", |apps: &Vec<App>| apps.len() == 2)
        .await;
    let (mut web1, _) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    let given: Vec<String> = next_assign(&mut web1)
        .await
        .apps
        .into_iter()
        .map(|a| a.app)
        .collect();
    assert_eq!(given, ["hello"]);

    // web-1 reports on its own app and on api, which runs only on nodes labelled for it: an
    // instance, rollout figures full of errors, an error event and a log line each.
    let mut report = common::report_of("hello", 1);
    let mut api = report.instances[0].clone();
    api.app = "api".into();
    report.instances.push(api);
    report.rollouts = vec![RolloutFigures {
        app: "api".into(),
        release: 1,
        previous: None,
        watched_ms: 500,
        watch_ms: 2000,
        done: false,
        figures: DeployFigures {
            new_requests: 1000,
            new_errors: 1000,
            ..DeployFigures::default()
        },
    }];
    let event = |app: &str, message: &str| {
        ToBeacon::Event(NodeEvent {
            kind: NodeEventKind::AppEvent,
            app: app.into(),
            release: 1,
            message: message.into(),
            detail: None,
            instance: None,
            level: Some(px_proto::beacon::Level::Error),
            failure: None,
            build: None,
        })
    };
    let line = |app: &str, text: &str| LogLine {
        app: app.into(),
        release: 1,
        instance: 1,
        stream: LogStream::Stdout,
        at: "2026-12-06T00:00:00.000Z".into(),
        line: text.into(),
        build: None,
        process: None,
    };
    web1.send(ToBeacon::Heartbeat(report)).await.unwrap();
    web1.send(event("api", "forged failure")).await.unwrap();
    web1.send(ToBeacon::Logs(LogBatch {
        lines: vec![line("api", "forged line"), line("hello", "own line")],
        dropped: 0,
    }))
    .await
    .unwrap();
    // The node's own event comes last: once it is recorded, the frames before it were handled.
    web1.send(event("hello", "own failure")).await.unwrap();
    let events: Vec<Event> = s
        .beacon
        .wait_for(
            "/v1/events?limit=1000",
            "web-1's own event",
            |events: &Vec<Event>| events.iter().any(|e| e.message.contains("own failure")),
        )
        .await;
    assert!(
        !events.iter().any(|e| e.message.contains("forged")),
        "{events:?}"
    );
    wait_reporting(&s.beacon, "web-1", 1).await;
    let nodes: Vec<Node> = s.beacon.get("/v1/nodes").await;
    assert!(
        nodes[0].instances.iter().all(|i| i.app == "hello"),
        "{nodes:?}"
    );
    let api_logs: Vec<LogEntry> = s.beacon.get("/v1/apps/api/logs").await;
    assert!(api_logs.is_empty(), "{api_logs:?}");
    let hello_logs: Vec<LogEntry> = s.beacon.get("/v1/apps/hello/logs").await;
    assert_eq!(
        hello_logs
            .iter()
            .map(|e| e.line.as_str())
            .collect::<Vec<_>>(),
        ["own line"]
    );
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
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("beacon_reports_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        dropped, 4,
        "an instance, figures, an event, a log line: {metrics}"
    );
    s.beacon.stop().await;
}
