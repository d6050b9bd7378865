//! Builds and racing deploys through the real Beacon over real sockets: pending builds read
//! from a stand-in repository are placed on a node that may build, stay there, move when it is
//! lost, survive a Beacon restart, and leave the assignment once the repository has their
//! result; their events (queued, finished, failed, superseded) are recorded once; releases
//! committed in quick succession supersede the ones still rolling out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Beacon, Peer, RepoStub, Tokens, WAIT, config, labelled_hello, maestro_hello, open_link,
    repository_hello, webhook_receiver,
};
use futures_util::SinkExt;
use px_proto::beacon::{App, Event, EventKind, RolloutState};
use px_proto::build::{BuildProgress, BuildRequested, BuildResult, BuildStatus};
use px_proto::link::{
    InstanceState, InstanceStatus, LogBatch, LogLine, LogStream, NodeEvent, NodeEventKind,
    ReleaseCommitted, ToBeacon,
};
use px_test_support::Pki;

const BUILDER: &[(&str, &str)] = &[("build", "true")];

struct Setup {
    dir: tempfile::TempDir,
    repo: RepoStub,
    tokens: Tokens,
    pki: Arc<Pki>,
    beacon: Beacon,
}

async fn setup(adjust: impl FnOnce(&mut px_beacon::config::Config)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, "");
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut cfg = config(dir.path(), &pki, &tokens, &url);
    adjust(&mut cfg);
    let beacon = Beacon::start(cfg, pki.clone(), &tokens, 0).await;
    // Beacon has read the repository before any node joins.
    beacon
        .wait_for("/v1/apps", "the first read", |apps: &Vec<App>| {
            apps.len() == 1
        })
        .await;
    Setup {
        dir,
        repo,
        tokens,
        pki,
        beacon,
    }
}

/// The events of `kind` about build `build` of `app`.
fn build_events(events: &[Event], kind: EventKind, app: &str, build: u64) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.kind == kind && e.app.as_deref() == Some(app) && e.build == Some(build))
        .cloned()
        .collect()
}

/// Waits until Beacon has recorded an event of `kind` about build `build` of `app` whose
/// message contains `text`; returns the newest such event.
async fn wait_build_event_saying(
    beacon: &Beacon,
    kind: EventKind,
    app: &str,
    build: u64,
    text: &str,
) -> Event {
    let matching = |events: &[Event]| {
        build_events(events, kind, app, build)
            .into_iter()
            .filter(|e| e.message.contains(text))
            .collect::<Vec<_>>()
    };
    let events: Vec<Event> = beacon
        .wait_for(
            "/v1/events?limit=1000",
            &format!("{kind:?} of {app} build {build} saying {text:?}"),
            |events: &Vec<Event>| !matching(events).is_empty(),
        )
        .await;
    matching(&events).pop().unwrap()
}

/// Waits until Beacon has recorded an event of `kind` about build `build` of `app`.
async fn wait_build_event(beacon: &Beacon, kind: EventKind, app: &str, build: u64) -> Event {
    wait_build_event_saying(beacon, kind, app, build, "").await
}

fn running(app: &str, build: u64) -> BuildStatus {
    BuildStatus {
        app: app.into(),
        build,
        progress: BuildProgress::Running,
        release: None,
    }
}

fn node_event(kind: NodeEventKind, app: &str, build: u64, message: &str) -> NodeEvent {
    NodeEvent {
        kind,
        app: app.into(),
        release: 0,
        message: message.into(),
        detail: None,
        instance: None,
        level: None,
        failure: None,
        build: Some(build),
    }
}

fn build_event(kind: NodeEventKind, app: &str, build: u64, message: &str) -> ToBeacon {
    ToBeacon::Event(node_event(kind, app, build, message))
}

/// A repository link, for notices.
async fn repository_link(s: &Setup) -> common::Link {
    let (link, _) = open_link(
        &s.beacon.control_addr,
        &s.pki.ca(),
        repository_hello("apprepo", &s.tokens.repository),
    )
    .await;
    link
}

#[tokio::test]
async fn a_build_runs_on_the_one_node_that_may_build_stays_moves_when_it_is_lost_and_leaves_with_its_result()
 {
    // Reconciliation is slow here: only the repository's notices explain prompt changes.
    let s = setup(|c| {
        c.reconcile_interval = Duration::from_secs(3600);
        c.node_lost_after = Duration::from_millis(800);
    })
    .await;
    let maestro = &s.tokens.maestro;
    let web1 = Peer::link(&s.beacon, maestro_hello("web-1", maestro, 0)).await;
    let web2 = Peer::link(&s.beacon, maestro_hello("web-2", maestro, 0)).await;
    let build1 = Peer::link(&s.beacon, labelled_hello("build-1", maestro, BUILDER)).await;
    let mut notices = repository_link(&s).await;

    // An upload waits for build 2; apprepo's notice makes Beacon read it at once.
    s.repo.pending_build("hello", 2);
    notices
        .send(ToBeacon::BuildRequested(BuildRequested {
            app: "hello".into(),
            build: 2,
        }))
        .await
        .unwrap();
    build1.wait_builds(&["hello#2"]).await;
    let order = build1.assignments().last().unwrap().builds[0].clone();
    assert!(
        order
            .source_url
            .ends_with(&format!("/v1/bundles/{}", order.source_sha256)),
        "{order:?}"
    );
    assert_eq!(order.manifest.name, "hello");
    let queued = wait_build_event(&s.beacon, EventKind::BuildQueued, "hello", 2).await;
    assert_eq!(queued.message, "hello build 2 queued on build-1");
    for web in [&web1, &web2] {
        assert!(
            web.assignments().iter().all(|a| a.builds.is_empty()),
            "{} may not build: {:?}",
            web.name,
            web.assignments()
        );
    }

    // The node starts it and says so.
    build1.report.lock().unwrap().builds = vec![running("hello", 2)];
    build1.send(build_event(
        NodeEventKind::BuildStarted,
        "hello",
        2,
        "hello build 2 started on build-1",
    ));
    let started = wait_build_event(&s.beacon, EventKind::BuildStarted, "hello", 2).await;
    assert_eq!(started.node.as_deref(), Some("build-1"));
    assert_eq!(started.release, None);

    // A second node that may build joins: the build stays where it runs.
    let build2 = Peer::link(&s.beacon, labelled_hello("build-2", maestro, BUILDER)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(build2.builds().is_empty(), "{:?}", build2.assignments());
    assert_eq!(build1.builds(), ["hello#2"]);

    // build-1 goes silent until it is lost: the build moves to build-2.
    build1.stop().await;
    build2.wait_builds(&["hello#2"]).await;
    wait_build_event_saying(
        &s.beacon,
        EventKind::BuildQueued,
        "hello",
        2,
        "hello build 2 moves to build-2: build-1 is lost",
    )
    .await;

    // build-2 builds it; apprepo commits v2 from it and says so: the build leaves build-2's
    // assignment, the web servers get v2, and the build's end is announced with its release.
    s.repo
        .end_build("hello", 2, BuildResult::Succeeded { release: 2 });
    s.repo.release("hello", 2, "");
    notices
        .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 2,
            bundle_sha256: format!("{:064x}", 2),
        }))
        .await
        .unwrap();
    build2.wait_builds(&[]).await;
    let finished = wait_build_event(&s.beacon, EventKind::BuildFinished, "hello", 2).await;
    assert_eq!(finished.release, Some(2));
    assert_eq!(finished.message, "hello build 2 made v2");
    let start = std::time::Instant::now();
    while web1.assignments().last().unwrap().apps[0].release != 2 {
        assert!(start.elapsed() < WAIT, "web-1 never got v2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The node's own word on the same end comes later: it is not announced twice.
    build2.send(build_event(
        NodeEventKind::BuildFinished,
        "hello",
        2,
        "hello build 2 finished on build-2",
    ));
    // A later frame about the same build (still the node's to report on for a while after
    // it left its assignment), to know the one before it was handled.
    let later = "a later frame, to know the one before it was handled";
    build2.send(build_event(NodeEventKind::BuildStarted, "hello", 2, later));
    wait_build_event_saying(&s.beacon, EventKind::BuildStarted, "hello", 2, later).await;
    let events = s.beacon.events().await;
    assert_eq!(
        build_events(&events, EventKind::BuildFinished, "hello", 2).len(),
        1
    );
    s.beacon.stop().await;
}

#[tokio::test]
async fn with_no_node_that_may_build_a_build_is_queued_once_saying_how_to_label_one() {
    let s = setup(|c| c.reconcile_interval = Duration::from_millis(100)).await;
    let maestro = &s.tokens.maestro;
    let web1 = Peer::link(&s.beacon, maestro_hello("web-1", maestro, 0)).await;
    s.repo.pending_build("hello", 1);
    let queued = wait_build_event(&s.beacon, EventKind::BuildQueued, "hello", 1).await;
    assert!(
        queued.message.contains("no node may build")
            && queued.message.contains("build = \"true\"")
            && queued.message.contains("labels"),
        "{}",
        queued.message
    );
    // Many reconciles later, still one event.
    let reads = s.repo.requests.load(std::sync::atomic::Ordering::Relaxed);
    while s.repo.requests.load(std::sync::atomic::Ordering::Relaxed) < reads + 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = s.beacon.events().await;
    assert_eq!(
        build_events(&events, EventKind::BuildQueued, "hello", 1).len(),
        1,
        "{events:?}"
    );
    assert!(web1.builds().is_empty());

    // A node that may build joins: it gets the build, and the event says so.
    let build1 = Peer::link(&s.beacon, labelled_hello("build-1", maestro, BUILDER)).await;
    build1.wait_builds(&["hello#1"]).await;
    let events = s.beacon.events().await;
    let queued = build_events(&events, EventKind::BuildQueued, "hello", 1);
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[1].message, "hello build 1 goes to build-1");
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_restarted_beacon_keeps_each_build_where_it_runs_and_moves_it_once_its_node_stays_away() {
    let s = setup(|c| {
        c.reconcile_interval = Duration::from_millis(200);
        c.node_lost_after = Duration::from_secs(2);
    })
    .await;
    let maestro = s.tokens.maestro.clone();
    let build1 = Peer::link(&s.beacon, labelled_hello("build-1", &maestro, BUILDER)).await;
    let build2 = Peer::link(&s.beacon, labelled_hello("build-2", &maestro, BUILDER)).await;
    s.repo.pending_build("shop", 1);
    // Both are idle: the first by name takes it.
    build1.wait_builds(&["shop#1"]).await;
    build2.wait_builds(&[]).await;
    build1.report.lock().unwrap().builds = vec![running("shop", 1)];
    tokio::time::sleep(common::PEER_HEARTBEAT * 3).await;

    // Beacon restarts on the same data directory and address.
    let (config, port) = (s.beacon.config.clone(), s.beacon.control_port());
    s.beacon.stop().await;
    let report1 = build1.stop().await;
    let report2 = build2.stop().await;
    let beacon = Beacon::start(config.clone(), s.pki.clone(), &s.tokens, port).await;
    // build-2, idle, is back first: the build is not given to it while build-1 may return.
    let mut hello2 = labelled_hello("build-2", &maestro, BUILDER);
    hello2.state = Some(report2.clone());
    let build2 = Peer::link(&beacon, hello2).await;
    let mut hello1 = labelled_hello("build-1", &maestro, BUILDER);
    hello1.state = Some(report1.clone());
    let build1 = Peer::link(&beacon, hello1).await;
    // A new upload waits for a build: it goes to build-2, the one not building.
    s.repo.pending_build("blog", 1);
    build2.wait_builds(&["blog#1"]).await;
    build1.wait_builds(&["shop#1"]).await;
    assert!(
        build2
            .assignments()
            .iter()
            .all(|a| a.builds.iter().all(|b| b.app != "shop")),
        "shop#1 was never build-2's: {:?}",
        build2.assignments()
    );
    let events = beacon.events().await;
    assert_eq!(
        build_events(&events, EventKind::BuildQueued, "shop", 1).len(),
        1,
        "a restart announces nothing new about a build: {events:?}"
    );

    // Restarted again, and build-1 never comes back: once a silent node would be lost, its
    // build goes to build-2.
    beacon.stop().await;
    build1.stop().await;
    let report2 = build2.stop().await;
    let beacon = Beacon::start(config.clone(), s.pki.clone(), &s.tokens, port).await;
    let mut hello2 = labelled_hello("build-2", &maestro, BUILDER);
    hello2.state = Some(report2);
    let build2 = Peer::link(&beacon, hello2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !build2.builds().contains(&"shop#1".to_string()),
        "moved before build-1 had its time to return: {:?}",
        build2.assignments()
    );
    build2.wait_builds(&["blog#1", "shop#1"]).await;
    wait_build_event_saying(
        &beacon,
        EventKind::BuildQueued,
        "shop",
        1,
        "shop build 1 moves to build-2: build-1 did not come back",
    )
    .await;

    // Restarted once more, with a generation file that names no build (written by a Beacon
    // from before builds): the reports alone say where the builds run.
    build2.report.lock().unwrap().builds = vec![running("blog", 1), running("shop", 1)];
    tokio::time::sleep(common::PEER_HEARTBEAT * 3).await;
    beacon.stop().await;
    let report2 = build2.stop().await;
    let file = config.data_dir.join("generation.json");
    let mut persisted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    persisted["desired"]
        .as_array_mut()
        .unwrap()
        .retain(|entry| !entry.as_str().unwrap().starts_with("build "));
    std::fs::write(&file, serde_json::to_vec(&persisted).unwrap()).unwrap();
    // Both nodes are back before Beacon reads the builds, and the idle one comes first by name:
    // without the reports, it would take them.
    let down = |down: bool| {
        s.repo
            .down
            .store(down, std::sync::atomic::Ordering::Relaxed)
    };
    down(true);
    let beacon = Beacon::start(config, s.pki.clone(), &s.tokens, port).await;
    let build0 = Peer::link(&beacon, labelled_hello("build-0", &maestro, BUILDER)).await;
    let mut hello2 = labelled_hello("build-2", &maestro, BUILDER);
    hello2.state = Some(report2);
    let build2 = Peer::link(&beacon, hello2).await;
    down(false);
    build2.wait_builds(&["blog#1", "shop#1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        build0.assignments().iter().all(|a| a.builds.is_empty()),
        "{:?}",
        build0.assignments()
    );
    drop(s.dir);
    beacon.stop().await;
}

#[tokio::test]
async fn the_end_of_a_build_in_the_repository_is_announced_and_a_failure_alerts_once() {
    let (hook, received) = webhook_receiver().await;
    let s = setup(|c| {
        c.reconcile_interval = Duration::from_millis(100);
        c.alerts.webhooks = vec![hook];
    })
    .await;
    let builder = Peer::link(
        &s.beacon,
        labelled_hello("build-1", &s.tokens.maestro, BUILDER),
    )
    .await;
    s.repo.pending_build("api", 1);
    s.repo.pending_build("blog", 1);
    builder.wait_builds(&["api#1", "blog#1"]).await;

    // The node's failure comes first, then apprepo's record of it: one event, one alert.
    builder.send(ToBeacon::Event(NodeEvent {
        detail: Some("ERROR: No matching distribution found for djangoo".into()),
        ..node_event(
            NodeEventKind::BuildFailed,
            "api",
            1,
            "api build 1 failed: the installer failed",
        )
    }));
    let failed = wait_build_event(&s.beacon, EventKind::BuildFailed, "api", 1).await;
    assert_eq!(failed.node.as_deref(), Some("build-1"));
    assert!(failed.detail.unwrap().contains("djangoo"));
    s.repo.end_build(
        "api",
        1,
        BuildResult::Failed {
            reason: "the installer failed".into(),
        },
    );
    // A newer upload of blog supersedes its build in the repository.
    s.repo.end_build(
        "blog",
        1,
        BuildResult::Superseded {
            by: "build 2".into(),
        },
    );
    builder.wait_builds(&[]).await;
    let superseded = wait_build_event(&s.beacon, EventKind::DeploySuperseded, "blog", 1).await;
    assert_eq!(superseded.message, "blog build 1 was superseded by build 2");
    assert_eq!(superseded.release, None);
    let start = std::time::Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(start.elapsed() < WAIT, "no alert for the failed build");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alerts: Vec<serde_json::Value> = received.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["event"]["kind"], "build_failed");
    assert_eq!(alerts[0]["event"]["build"], 1);
    let events = s.beacon.events().await;
    assert_eq!(
        build_events(&events, EventKind::BuildFailed, "api", 1).len(),
        1
    );

    // A failure only the repository knows (the node's word was lost) is announced from it.
    s.repo.pending_build("api", 2);
    builder.wait_builds(&["api#2"]).await;
    s.repo.end_build(
        "api",
        2,
        BuildResult::Failed {
            reason: "the build took longer than 15 minutes".into(),
        },
    );
    let failed = wait_build_event(&s.beacon, EventKind::BuildFailed, "api", 2).await;
    assert_eq!(
        failed.message,
        "api build 2 failed: the build took longer than 15 minutes"
    );
    s.beacon.stop().await;
}

#[tokio::test]
async fn releases_committed_in_quick_succession_supersede_the_older_ones_once_each_and_the_newest_rolls_out()
 {
    let s = setup(|c| c.reconcile_interval = Duration::from_secs(3600)).await;
    let web1 = Peer::link(&s.beacon, maestro_hello("web-1", &s.tokens.maestro, 0)).await;
    let mut notices = repository_link(&s).await;
    // v1 rolls out: the node has not switched yet.
    let start = std::time::Instant::now();
    while web1.assignments().is_empty() {
        assert!(start.elapsed() < WAIT, "no assignment");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // v2, v3 and v4 are committed before Beacon reads again; each notice follows its commit.
    s.repo.release("hello", 4, "");
    for version in 2..=4 {
        notices
            .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
                app: "hello".into(),
                version,
                bundle_sha256: format!("{version:064x}"),
            }))
            .await
            .unwrap();
    }
    let start = std::time::Instant::now();
    while web1.assignments().last().unwrap().apps[0].release != 4 {
        assert!(start.elapsed() < WAIT, "web-1 never got v4");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let superseded = |events: &[Event]| -> Vec<(u64, String)> {
        events
            .iter()
            .filter(|e| e.kind == EventKind::DeploySuperseded)
            .map(|e| (e.release.unwrap(), e.message.clone()))
            .collect()
    };
    let events: Vec<Event> = s
        .beacon
        .wait_for(
            "/v1/events?limit=1000",
            "three superseded releases",
            |events: &Vec<Event>| superseded(events).len() >= 3,
        )
        .await;
    assert_eq!(
        superseded(&events),
        [
            (
                1,
                "hello v1 was superseded by v4 before it served everywhere".to_string()
            ),
            (
                2,
                "hello v2 was superseded by v4 before it was assigned".to_string()
            ),
            (
                3,
                "hello v3 was superseded by v4 before it was assigned".to_string()
            ),
        ]
    );

    // The node switches to v4: its rollout completes, and nothing more is superseded.
    web1.report.lock().unwrap().instances = vec![InstanceStatus {
        app: "hello".into(),
        release: 4,
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
    }];
    let apps: Vec<App> = s
        .beacon
        .wait_for("/v1/apps", "v4 rolled out", |apps: &Vec<App>| {
            apps[0].release == 4 && apps[0].rollout == RolloutState::RolledOut
        })
        .await;
    assert_eq!(apps[0].healthy_nodes, 1);
    // The event is recorded just after the rollout's state flips (once the hub's lock is
    // released and the rollout's history is durable), so it is waited for rather than read once.
    let events: Vec<Event> = s
        .beacon
        .wait_for(
            "/v1/events?limit=1000",
            "v4's deploy finished",
            |events: &Vec<Event>| {
                events.iter().any(|e| {
                    e.kind == EventKind::DeployFinished && e.release == Some(4) && e.node.is_none()
                })
            },
        )
        .await;
    assert_eq!(superseded(&events).len(), 3, "{events:?}");

    // A release that served everywhere is not superseded by the next one.
    s.repo.release("hello", 5, "");
    notices
        .send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 5,
            bundle_sha256: format!("{:064x}", 5),
        }))
        .await
        .unwrap();
    s.beacon
        .wait_for("/v1/apps", "v5 desired", |apps: &Vec<App>| {
            apps[0].release == 5
        })
        .await;
    assert_eq!(superseded(&s.beacon.events().await).len(), 3);
    s.beacon.stop().await;
}

#[tokio::test]
async fn a_builds_output_is_forwarded_with_its_number() {
    let s = setup(|_| {}).await;
    let builder = Peer::link(
        &s.beacon,
        labelled_hello("build-1", &s.tokens.maestro, BUILDER),
    )
    .await;
    // Beacon takes a build's output only from the node it gave the build to.
    let mut notices = repository_link(&s).await;
    s.repo.pending_build("hello", 3);
    notices
        .send(ToBeacon::BuildRequested(BuildRequested {
            app: "hello".into(),
            build: 3,
        }))
        .await
        .unwrap();
    builder.wait_builds(&["hello#3"]).await;
    let line = |text: &str| LogLine {
        app: "hello".into(),
        release: 0,
        instance: 0,
        stream: LogStream::Build,
        at: "2026-11-25T00:00:00.000Z".into(),
        line: text.into(),
        build: Some(3),
        process: None,
    };
    builder.send(ToBeacon::Logs(LogBatch {
        lines: vec![
            line("Collecting django"),
            line("Installing collected packages"),
        ],
        dropped: 0,
    }));
    let lines: Vec<px_proto::beacon::LogEntry> = s
        .beacon
        .wait_for(
            "/v1/apps/hello/logs?build=3",
            "the build's lines",
            |lines: &Vec<px_proto::beacon::LogEntry>| lines.len() == 2,
        )
        .await;
    assert_eq!(lines[0].line, "Collecting django");
    assert_eq!(lines[1].build, Some(3));
    assert_eq!(lines[1].node, "build-1");
    s.beacon.stop().await;
}
