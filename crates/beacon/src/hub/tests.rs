//! The hub across restarts: a new `Hub` on the same data directory starts at or above every
//! generation the old one sent, keeps the rollout verdicts, and no node is sent a generation
//! before it is on disk.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use px_proto::beacon::EventKind;
use px_proto::link::{Hello, InstanceState, PROTOCOL_VERSION, PeerRole, RolloutFigures};
use tokio_util::task::TaskTracker;

use super::nodes::Attached;
use super::persist::{HistorySnapshot, Persisted, Store};
use super::*;
use crate::alerts::AlertSettings;
use crate::placement::tests::{release, running};

/// A hub on `dir`, as `run` makes one.
fn open(dir: &Path) -> Hub {
    open_above(dir, 0)
}

/// A hub on `dir` that numbers generations above `generation_floor`, as an active Beacon
/// under a lease makes one.
fn open_above(dir: &Path, generation_floor: u64) -> Hub {
    open_sharing(dir, generation_floor, None)
}

/// [`open_above`], handing rollout histories to `shared` as under a lease.
fn open_sharing(
    dir: &Path,
    generation_floor: u64,
    shared: Option<Arc<crate::shared_state::PendingHistories>>,
) -> Hub {
    let events = Arc::new(EventLog::open(dir).unwrap());
    let alerts = Alerter::start(
        AlertSettings::default(),
        &TaskTracker::new(),
        CancellationToken::new(),
    );
    Hub::new(
        HubSettings {
            domain: "localhost".into(),
            repository_url: "http://repository".into(),
            node_lost_after: Duration::from_secs(60),
            data_dir: dir.to_path_buf(),
            generation_floor,
            shared_histories: shared,
        },
        events,
        alerts,
        Arc::new(Metrics::default()),
    )
    .unwrap()
}

fn hello(name: &str, generation: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Maestro,
        name: name.into(),
        token: "unused: the hub trusts the link server's check".into(),
        software: "test".into(),
        labels: BTreeMap::new(),
        state: Some(NodeReport {
            generation,
            ..NodeReport::default()
        }),
        runtimes: BTreeMap::new(),
    }
}

fn desired(releases: &[Release]) -> BTreeMap<String, Release> {
    releases
        .iter()
        .map(|r| (r.app.clone(), r.clone()))
        .collect()
}

/// The generation in `generation.json`, as a restarted Beacon reads it.
fn on_disk(dir: &Path) -> u64 {
    let bytes = std::fs::read(dir.join("generation.json")).unwrap();
    serde_json::from_slice::<Persisted>(&bytes)
        .unwrap()
        .generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hub_starts_at_or_above_every_generation_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(open(dir.path()));
    let mut attached = hub.attach(&hello("web-1", 0)).await;
    // The node's link: every assignment it is given must already be on disk.
    let data_dir = dir.path().to_path_buf();
    let link = tokio::spawn(async move {
        let mut sent = 0;
        while attached.assignments.changed().await.is_ok() {
            let Some(assignment) = attached.assignments.borrow_and_update().clone() else {
                continue;
            };
            assert!(
                on_disk(&data_dir) >= assignment.generation,
                "generation {} was sent before it was on disk",
                assignment.generation
            );
            sent = sent.max(assignment.generation);
        }
        sent
    });
    // Concurrent updates, each to another desired state.
    let updates: Vec<_> = (1..=20)
        .map(|version| {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.set_desired(desired(&[release("hello", version, "")]))
                    .await
            })
        })
        .collect();
    for update in updates {
        update.await.unwrap();
    }
    let last = hub.generation();
    assert_eq!(on_disk(dir.path()), last);
    // Dropping the hub closes the node's watch, which ends the link.
    drop(hub);
    let sent = tokio::time::timeout(Duration::from_secs(10), link)
        .await
        .unwrap()
        .unwrap();
    assert!(sent >= 1, "the node was sent an assignment");

    let restarted = open(dir.path());
    assert!(
        restarted.generation() >= sent,
        "restarted at {}, below the {sent} it sent",
        restarted.generation()
    );
    assert_eq!(restarted.generation(), last);
    restarted
        .set_desired(desired(&[release("hello", 99, "")]))
        .await;
    assert_eq!(restarted.generation(), last + 1);
    assert_eq!(on_disk(dir.path()), last + 1);
}

/// A Beacon that becomes active under a later epoch numbers its first generation above the
/// epoch's floor, even for the desired state it persisted: a standby that took over sends
/// nodes a generation above anything the Beacon before it sent, and writes it first.
#[tokio::test]
async fn a_hub_under_a_later_epoch_starts_above_its_floor() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    hub.set_desired(desired(&[release("hello", 1, "")])).await;
    assert_eq!(hub.generation(), 1);
    drop(hub);
    let floor = crate::lease::generation_floor(3);
    let active = open_above(dir.path(), floor);
    assert_eq!(
        active.generation(),
        1,
        "nothing above the floor is on disk yet"
    );
    active
        .set_desired(desired(&[release("hello", 1, "")]))
        .await;
    assert_eq!(active.generation(), floor + 1);
    assert_eq!(on_disk(dir.path()), floor + 1);
    active
        .set_desired(desired(&[release("hello", 2, "")]))
        .await;
    assert_eq!(active.generation(), floor + 2);
}

#[tokio::test]
async fn a_generation_that_cannot_be_written_is_sent_to_no_node_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let mut web1 = hub.attach(&hello("web-1", 0)).await;
    hub.set_desired(desired(&[release("hello", 1, "")])).await;
    let first = web1.assignments.borrow_and_update().clone().unwrap();
    assert_eq!((first.generation, first.apps[0].release), (1, 1));

    // The disk refuses the next write: a directory stands where the file goes.
    let file = dir.path().join("generation.json");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    hub.set_desired(desired(&[release("hello", 2, "")])).await;
    assert!(!web1.assignments.has_changed().unwrap(), "nothing was sent");
    assert_eq!(hub.generation(), 1);
    // A node attaching meanwhile is not given the unwritten generation either.
    let mut web2 = hub.attach(&hello("web-2", 0)).await;
    assert!(web2.assignments.borrow_and_update().is_none());

    // The next read of the same desired state writes it, then sends it to both.
    std::fs::remove_dir(&file).unwrap();
    hub.set_desired(desired(&[release("hello", 2, "")])).await;
    assert_eq!(on_disk(dir.path()), 2);
    assert_eq!(hub.generation(), 2);
    for link in [&mut web1, &mut web2] {
        let assignment = link.assignments.borrow_and_update().clone().unwrap();
        assert_eq!((assignment.generation, assignment.apps[0].release), (2, 2));
    }
}

#[tokio::test]
async fn the_rollout_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let web1 = hub.attach(&hello("web-1", 0)).await;
    let v1 = release("hello", 1, "[deploy]\nmax_error_rate = \"5%\"");
    hub.set_desired(desired(std::slice::from_ref(&v1))).await;
    // The node switched and watched v1 through: 200 answers, none 5xx.
    let mut report = running("hello", 1, InstanceState::Healthy);
    report.generation = hub.generation();
    report.rollouts = vec![RolloutFigures {
        app: "hello".into(),
        release: 1,
        previous: None,
        watched_ms: 60_000,
        watch_ms: 60_000,
        done: true,
        figures: DeployFigures {
            new_requests: 200,
            ..DeployFigures::default()
        },
    }];
    hub.seen("web-1", web1.conn, Some(report)).await;
    let verified = hub
        .events()
        .recent(10)
        .into_iter()
        .find(|e| e.kind == EventKind::DeployVerified)
        .unwrap();
    // The verdict is on disk by the time its event is out.
    assert!(dir.path().join("rollouts/hello.json").is_file());
    let before = hub.rollouts("hello").unwrap();
    assert_eq!(before.len(), 1);
    assert!(before[0].verified);
    assert_eq!(
        before[0].outcome.as_deref(),
        Some(verified.message.as_str())
    );
    drop(hub);

    let restarted = open(dir.path());
    let after = restarted.rollouts("hello").unwrap();
    let [record] = &after[..] else {
        panic!("{after:?}")
    };
    assert_eq!(record.release, 1);
    assert_eq!(record.state, RolloutState::RolledOut);
    assert!(record.verified);
    assert_eq!(record.figures.new_requests, 200);
    assert_eq!(record.outcome, before[0].outcome);
    // Once the same desired state is read again, the app shows its verdict, not judged twice.
    restarted.set_desired(desired(&[v1])).await;
    assert_eq!(restarted.apps()[0].outcome, before[0].outcome);
}

fn record(release: u64) -> RolloutRecord {
    RolloutRecord {
        release,
        previous: release.checked_sub(1).filter(|p| *p > 0),
        state: RolloutState::RolledOut,
        started_at: "2026-11-25T00:00:00Z".into(),
        rollout_seconds: Some(1.0),
        figures: DeployFigures::default(),
        watch_seconds: 60,
        max_error_rate: None,
        verified: true,
        outcome: Some(format!("hello v{release} verified")),
    }
}

#[tokio::test]
async fn an_older_history_snapshot_never_replaces_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = Store::open(dir.path(), None).unwrap();
    let snapshot = |seq: u64, releases: &[u64]| HistorySnapshot {
        app: "hello".into(),
        seq,
        records: releases.iter().map(|r| record(*r)).collect(),
    };
    store.write_history(snapshot(2, &[2, 1])).await;
    // Taken before the one above, handed to the writer after it.
    store.write_history(snapshot(1, &[1])).await;
    let (_, _, history) = Store::open(dir.path(), None).unwrap();
    let releases: Vec<u64> = history["hello"].iter().map(|r| r.release).collect();
    assert_eq!(releases, [2, 1]);
    store.write_history(snapshot(3, &[3, 2, 1])).await;
    let (_, _, history) = Store::open(dir.path(), None).unwrap();
    assert_eq!(history["hello"].len(), 3);
}

/// The `deploy_superseded` events recorded so far, oldest first, as (release, message).
fn superseded(hub: &Hub) -> Vec<(u64, String)> {
    let mut events: Vec<(u64, String)> = hub
        .events()
        .recent(100)
        .into_iter()
        .filter(|e| e.kind == EventKind::DeploySuperseded)
        .map(|e| (e.release.unwrap(), e.message))
        .collect();
    events.reverse();
    events
}

#[tokio::test]
async fn a_release_still_watched_is_superseded_and_one_judged_or_failed_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let web1 = hub.attach(&hello("web-1", 0)).await;
    let budget = "[deploy]\nmax_error_rate = \"5%\"";
    hub.set_desired(desired(&[release("hello", 1, budget)]))
        .await;
    // v1 serves everywhere but its watch is not over: `em deploy` still waits for a verdict.
    let mut report = running("hello", 1, InstanceState::Healthy);
    report.generation = hub.generation();
    hub.seen("web-1", web1.conn, Some(report)).await;
    hub.sweep().await;
    assert_eq!(hub.apps()[0].rollout, RolloutState::RolledOut);
    hub.set_desired(desired(&[release("hello", 2, budget)]))
        .await;
    assert_eq!(
        superseded(&hub),
        [(
            1,
            "hello v1 was superseded by v2 before its watch ended".to_string()
        )]
    );
    // v2 failed on its node: the next release does not supersede it, it replaces a failure.
    hub.node_event(
        "web-1",
        px_proto::link::NodeEvent {
            kind: px_proto::link::NodeEventKind::DeployFailed,
            app: "hello".into(),
            release: 2,
            message: "hello v2 never became healthy".into(),
            detail: None,
            instance: None,
            level: None,
            failure: None,
            build: None,
        },
    );
    hub.set_desired(desired(&[release("hello", 3, "")])).await;
    // Without an error budget, a release serving everywhere is done: v4 supersedes nothing.
    let mut report = running("hello", 3, InstanceState::Healthy);
    report.generation = hub.generation();
    hub.seen("web-1", web1.conn, Some(report)).await;
    hub.sweep().await;
    hub.set_desired(desired(&[release("hello", 4, "")])).await;
    assert_eq!(superseded(&hub).len(), 1, "{:?}", superseded(&hub));
}

#[tokio::test]
async fn a_restarted_hub_supersedes_nothing_it_did_not_see_roll_out() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    hub.set_desired(desired(&[release("hello", 1, "")])).await;
    drop(hub);
    // Releases committed while Beacon was away are history, not a race.
    let restarted = open(dir.path());
    restarted
        .set_desired(desired(&[release("hello", 7, "")]))
        .await;
    assert!(superseded(&restarted).is_empty());
    // A gap after the first read is a race; only the newest skipped releases are named.
    restarted
        .set_desired(desired(&[release(
            "hello",
            8 + super::desired::MAX_SKIPPED_SUPERSEDED + 5,
            "",
        )]))
        .await;
    let events = superseded(&restarted);
    assert_eq!(
        events.len() as u64,
        1 + super::desired::MAX_SKIPPED_SUPERSEDED
    );
    assert_eq!(events[0].0, 7, "the release that was rolling out");
    assert_eq!(events[1].0, 13, "the oldest of the skipped ones named");
}

/// The processes of `app` in `node`'s latest assignment: (type, numbers).
fn processes_of(attached: &mut Attached, app: &str) -> Vec<(String, Vec<u32>)> {
    let assignment = attached.assignments.borrow_and_update().clone().unwrap();
    let app = assignment.apps.iter().find(|a| a.app == app).unwrap();
    app.processes
        .iter()
        .map(|(kind, numbers)| (kind.clone(), numbers.clone()))
        .collect()
}

#[tokio::test]
async fn one_process_of_each_type_runs_across_the_cluster_and_stays_put_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let mut web1 = hub.attach(&hello("web-1", 0)).await;
    let mut web2 = hub.attach(&hello("web-2", 0)).await;
    let workers = "[processes.worker]\ncommand = \"python3 worker.py\"\n[processes.clock]\ncommand = \"python3 clock.py\"\n[processes.release]\ncommand = \"python3 migrate.py\"";
    hub.set_desired(desired(&[release("shop", 1, workers)]))
        .await;
    // Spread: one each, the clock on web-1 and the worker on web-2 (ties by name); never the
    // release phase; web instances on both as before.
    let on1 = processes_of(&mut web1, "shop");
    let on2 = processes_of(&mut web2, "shop");
    assert_eq!(on1, [("clock".to_string(), vec![1])]);
    assert_eq!(on2, [("worker".to_string(), vec![1])]);

    // A new release keeps every process where it is.
    hub.set_desired(desired(&[release("shop", 2, workers)]))
        .await;
    assert_eq!(processes_of(&mut web1, "shop"), on1);
    assert_eq!(processes_of(&mut web2, "shop"), on2);
    let generation = hub.generation();
    drop(hub);

    // A restarted Beacon whose nodes come back in the other order leaves them there too, and
    // renumbers nothing.
    let restarted = open(dir.path());
    let mut web2 = restarted.attach(&hello("web-2", generation)).await;
    let mut web1 = restarted.attach(&hello("web-1", generation)).await;
    restarted
        .set_desired(desired(&[release("shop", 2, workers)]))
        .await;
    assert_eq!(restarted.generation(), generation);
    // Nodes that applied the generation are not sent it again; ask for what they would get.
    for (attached, node, expected) in [(&mut web1, "web-1", &on1), (&mut web2, "web-2", &on2)] {
        assert!(attached.assignments.borrow_and_update().is_none());
        let state = restarted.lock();
        let apps = restarted.apps_for(&state, node, &Fit::BARE);
        let got: Vec<(String, Vec<u32>)> = apps[0].processes.clone().into_iter().collect();
        assert_eq!(&got, expected, "{node}");
    }
}

/// The web instances `node`'s latest assignment gives `app`.
fn instances_of(attached: &mut Attached, app: &str) -> u32 {
    let assignment = attached.assignments.borrow().clone().unwrap();
    assignment
        .apps
        .iter()
        .find(|a| a.app == app)
        .unwrap()
        .instances
}

#[tokio::test]
async fn a_formation_sets_web_per_node_and_other_types_across_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let mut web1 = hub.attach(&hello("web-1", 0)).await;
    let mut web2 = hub.attach(&hello("web-2", 0)).await;
    let workers = "[processes.worker]\ncommand = \"python3 worker.py\"";
    let shop = desired(&[release("shop", 1, workers)]);
    let scaled = |pairs: &[(&str, u32)]| -> Formations {
        let counts = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        [("shop".to_string(), counts)].into()
    };
    hub.set_state(shop.clone(), Formations::new(), AddedDomains::new(), None)
        .await;
    let first = hub.generation();
    assert_eq!(instances_of(&mut web1, "shop"), 1);
    assert_eq!(
        processes_of(&mut web1, "shop"),
        [("worker".into(), vec![1])]
    );
    assert_eq!(processes_of(&mut web2, "shop"), []);

    // worker=3: the running one stays, two more spread; web=2 on every web server.
    hub.set_state(
        shop.clone(),
        scaled(&[("web", 2), ("worker", 3)]),
        AddedDomains::new(),
        None,
    )
    .await;
    assert!(
        hub.generation() > first,
        "a new formation is a new generation"
    );
    for node in [&mut web1, &mut web2] {
        assert_eq!(instances_of(node, "shop"), 2);
    }
    assert_eq!(
        processes_of(&mut web1, "shop"),
        [("worker".into(), vec![1, 3])]
    );
    assert_eq!(
        processes_of(&mut web2, "shop"),
        [("worker".into(), vec![2])]
    );

    // The same formation read again changes nothing.
    let generation = hub.generation();
    hub.set_state(
        shop.clone(),
        scaled(&[("web", 2), ("worker", 3)]),
        AddedDomains::new(),
        None,
    )
    .await;
    assert_eq!(hub.generation(), generation);

    // worker=1: the highest numbers go, worker.1 stays on its node.
    hub.set_state(
        shop.clone(),
        scaled(&[("web", 2), ("worker", 1)]),
        AddedDomains::new(),
        None,
    )
    .await;
    assert_eq!(
        processes_of(&mut web1, "shop"),
        [("worker".into(), vec![1])]
    );
    assert_eq!(processes_of(&mut web2, "shop"), []);
    // web back to the manifest's count once the formation names it no more.
    hub.set_state(shop, scaled(&[("worker", 1)]), AddedDomains::new(), None)
        .await;
    assert_eq!(instances_of(&mut web1, "shop"), 1);
}

#[tokio::test]
async fn a_node_lost_for_a_day_is_forgotten_and_a_connected_one_never() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let _gone = hub.attach(&hello("gone", 0)).await;
    let _here = hub.attach(&hello("here", 0)).await;
    {
        let mut state = hub.lock();
        let gone = state.nodes.get_mut("gone").unwrap();
        gone.connected = false;
        gone.lost = true;
        let now = std::time::Instant::now();
        Hub::forget_departed_nodes(&mut state, now);
        assert_eq!(state.nodes.len(), 2, "lost a moment ago: still known");
        Hub::forget_departed_nodes(&mut state, now + super::nodes::FORGET_LOST_NODE_AFTER);
        assert_eq!(
            state.nodes.keys().collect::<Vec<_>>(),
            ["here"],
            "the connected node stays however long"
        );
    }
}

/// The hosts of `app` in the node's latest assignment.
fn domains_of(node: &mut Attached, app: &str) -> Vec<String> {
    node.assignments
        .borrow_and_update()
        .clone()
        .unwrap()
        .apps
        .iter()
        .find(|a| a.app == app)
        .unwrap()
        .domains
        .clone()
}

#[tokio::test]
async fn an_added_domain_reaches_the_nodes_in_a_new_generation_of_the_same_release() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let mut web1 = hub.attach(&hello("web-1", 0)).await;
    // Before the desired state is read, no name is known to be served or not.
    assert!(hub.served_domains().is_none());
    let shop = desired(&[release("shop", 1, "")]);
    hub.set_state(shop.clone(), Formations::new(), AddedDomains::new(), None)
        .await;
    let first = hub.generation();
    assert_eq!(domains_of(&mut web1, "shop"), ["shop.localhost"]);
    let served =
        |hub: &Hub| -> Vec<String> { hub.served_domains().unwrap().iter().cloned().collect() };
    assert_eq!(served(&hub), ["shop.localhost"]);
    let before = web1.assignments.borrow().clone().unwrap();

    let added: AddedDomains = [("shop".to_string(), vec!["shop.example.com".to_string()])].into();
    hub.set_state(shop.clone(), Formations::new(), added.clone(), None)
        .await;
    assert!(
        hub.generation() > first,
        "an added domain is a new generation"
    );
    let after = web1.assignments.borrow().clone().unwrap();
    let (was, now) = (&before.apps[0], &after.apps[0]);
    assert_eq!(now.domains, ["shop.example.com", "shop.localhost"]);
    // The same release, the same bundle and instances: Maestro changes only its routes.
    assert_eq!(
        (now.release, &now.bundle_sha256, now.instances),
        (was.release, &was.bundle_sha256, was.instances)
    );
    assert_eq!(
        hub.apps()[0].domains,
        ["shop.example.com", "shop.localhost"]
    );
    assert_eq!(served(&hub), ["shop.example.com", "shop.localhost"]);

    // Read again, nothing changes; removed, the name leaves the assignment.
    let generation = hub.generation();
    hub.set_state(shop.clone(), Formations::new(), added, None)
        .await;
    assert_eq!(hub.generation(), generation);
    hub.set_state(shop, Formations::new(), AddedDomains::new(), None)
        .await;
    assert_eq!(domains_of(&mut web1, "shop"), ["shop.localhost"]);
    assert_eq!(
        served(&hub),
        ["shop.localhost"],
        "the removed name is not served"
    );
    // An app deleted: none of its names is served.
    hub.set_state(desired(&[]), Formations::new(), AddedDomains::new(), None)
        .await;
    assert!(served(&hub).is_empty());
}

#[tokio::test]
async fn nodes_with_the_same_assignment_share_one_copy_and_one_encoded_frame() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let mut web1 = hub.attach(&hello("web-1", 0)).await;
    let mut web2 = hub.attach(&hello("web-2", 0)).await;
    hub.set_desired(desired(&[release("hello", 1, "")])).await;
    // A node that attaches after the publication gets the same assignment, and shares it.
    let mut web3 = hub.attach(&hello("web-3", 0)).await;
    let sent: Vec<_> = [&mut web1, &mut web2, &mut web3]
        .into_iter()
        .map(|link| link.assignments.borrow_and_update().clone().unwrap())
        .collect();
    assert_eq!((sent[0].generation, sent[0].apps[0].release), (1, 1));
    assert!(sent.iter().all(|a| Arc::ptr_eq(a, &sent[0])), "one copy");
    let frame = sent[2].frame().unwrap();
    assert_eq!(
        frame.as_ptr(),
        sent[0].frame().unwrap().as_ptr(),
        "encoded once"
    );
    let body: px_proto::link::FromBeacon = serde_json::from_slice(&frame[4..]).unwrap();
    assert_eq!(body, FromBeacon::Assign(sent[0].assignment.clone()));
}

#[tokio::test]
async fn a_hub_taking_over_a_finished_rollout_records_it_neither_started_nor_finished_again() {
    let first_dir = tempfile::tempdir().unwrap();
    let shared = Arc::new(crate::shared_state::PendingHistories::default());
    let first = open_sharing(
        first_dir.path(),
        crate::lease::generation_floor(1),
        Some(shared.clone()),
    );
    let web1 = first.attach(&hello("web-1", 0)).await;
    let v1 = release("hello", 1, "");
    first.set_desired(desired(std::slice::from_ref(&v1))).await;
    let mut report = running("hello", 1, InstanceState::Healthy);
    report.generation = first.generation();
    first.seen("web-1", web1.conn, Some(report.clone())).await;
    let kinds = |hub: &Hub| -> Vec<EventKind> {
        hub.events()
            .page(None, 100, Some("hello"))
            .iter()
            .map(|e| e.kind)
            .collect()
    };
    assert_eq!(
        kinds(&first),
        [EventKind::DeployStarted, EventKind::DeployFinished]
    );
    // Rolled out, still in its watch: kept for the shared storage already.
    let history = shared.lock().unwrap().get("hello").cloned().unwrap();
    assert_eq!(history[0].state, RolloutState::RolledOut);

    // Another Beacon takes over: the history is written into its data directory, as
    // `SharedState::load` does, before its hub starts.
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(second_dir.path().join(ROLLOUTS_DIR)).unwrap();
    std::fs::write(
        second_dir.path().join(ROLLOUTS_DIR).join("hello.json"),
        serde_json::to_vec(&history).unwrap(),
    )
    .unwrap();
    let second = open_above(second_dir.path(), crate::lease::generation_floor(2));
    let web1 = second.attach(&hello("web-1", report.generation)).await;
    second.set_desired(desired(&[v1])).await;
    report.generation = second.generation();
    second.seen("web-1", web1.conn, Some(report)).await;
    assert_eq!(
        kinds(&second),
        Vec::<EventKind>::new(),
        "nothing recorded again"
    );
    assert_eq!(
        second.rollouts("hello").unwrap()[0].state,
        RolloutState::RolledOut
    );
}
