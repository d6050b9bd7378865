//! Several Beacons, one active (docs/src/design/control-hosts.md): apprepo on SeaweedFS, two
//! Beacons competing for the lease, and a Maestro and apprepo that list both Beacons' control
//! addresses. The standby refuses links and redirects its API to the active Beacon; when the
//! active one stops in the middle of a deploy's rollout (cleanly, so it releases the lease), the
//! standby takes the lease, finishes the rollout with a higher generation, and no release is
//! lost.
//! The same when the active Beacon is cut off without a word (its network cut, or its host
//! frozen: nothing closes, its lease lapses).
//! Prints the failover times (to the standby active, and to the new release served); they
//! assert only a generous bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::acme_stack::{Stack, StackOptions, WAIT};
use px_beacon::config::ChallengeKind;
use px_proto::api::Release;
use px_proto::beacon::{Event, Node};
use px_proto::lease::{BeaconHealth, BeaconRole, Lease};

/// A client that trusts the cluster CA and does not follow redirects, to see them.
fn no_redirects(stack: &Stack) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&stack.ca_file).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn health(http: &reqwest::Client, url: &str) -> Option<BeaconHealth> {
    let r = http.get(format!("{url}/v1/health")).send().await.ok()?;
    r.json().await.ok()
}

/// Waits until the Beacon at `url` says it is active; how long that took.
async fn wait_active(http: &reqwest::Client, url: &str) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{url}/v1/health/active")).send().await
            && r.status() == 200
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "{url} never became active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Uploads the shop again with another greeting: a new release, rolled out to the Maestro.
async fn deploy_greeting(stack: &Stack, greeting: &str) -> Release {
    let app_dir = tempfile::tempdir().unwrap();
    Stack::write_shop(app_dir.path(), greeting);
    stack.upload("shop", app_dir.path()).await
}

/// The events the Beacon at `beacon_url` serves after `after` (all it keeps with `None`).
async fn events(stack: &Stack, beacon_url: &str, after: Option<u64>) -> Vec<Event> {
    let query = after.map(|a| format!("?after={a}")).unwrap_or_default();
    stack
        .get_json(format!("{beacon_url}/v1/events{query}"))
        .await
}

/// The `beacon` lease as apprepo stores it.
async fn lease(stack: &Stack) -> Lease {
    stack
        .get_json(format!("{}/v1/leases/beacon", stack.repo_url))
        .await
}

fn unix_ms_now() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// apprepo lists the shop's first release and `last`, and nothing else: the failover lost no
/// release and made none twice.
async fn assert_no_release_lost(stack: &Stack, last: &Release) {
    let releases: Vec<Release> = stack
        .get_json(format!("{}/v1/apps/shop/releases", stack.repo_url))
        .await;
    let mut versions: Vec<u64> = releases.iter().map(|r| r.version).collect();
    versions.sort_unstable();
    assert_eq!(versions, vec![1, last.version], "no release was lost");
}

async fn node(stack: &Stack, beacon_url: &str) -> Node {
    let nodes: Vec<Node> = stack.get_json(format!("{beacon_url}/v1/nodes")).await;
    nodes.into_iter().find(|n| n.name == "web-1").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_finishes_a_rollout_the_stopped_active_beacon_started() {
    let options = StackOptions {
        seaweed: true,
        lease: true,
        ..Default::default()
    };
    let Some(mut stack) = Stack::start_with(ChallengeKind::Http01, true, options).await else {
        return;
    };
    let plain = no_redirects(&stack);
    let active_url = stack.beacon_url.clone();
    wait_active(&plain, &active_url).await;
    let standby_url = stack.start_standby_beacon().await;

    // The standby knows the active Beacon, and sends API calls there.
    let start = Instant::now();
    let seen = loop {
        match health(&plain, &standby_url).await {
            Some(h) if h.active_url.is_some() => break h,
            _ => {
                assert!(
                    start.elapsed() < WAIT,
                    "the standby never learned of the active Beacon"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(seen.role, BeaconRole::Standby);
    assert_eq!(seen.active_url.as_deref(), Some(active_url.as_str()));
    let standby_control = stack.standby_control.unwrap();
    assert!(
        tokio::net::TcpStream::connect(standby_control)
            .await
            .is_err(),
        "a standby's control port is closed, so link clients move on to the active Beacon"
    );
    let check = plain
        .get(format!("{standby_url}/v1/health/active"))
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 503, "a load balancer skips the standby");
    let redirected = plain
        .get(format!("{standby_url}/v1/apps?x=1"))
        .bearer_auth(&stack.deploy)
        .send()
        .await
        .unwrap();
    assert_eq!(redirected.status(), 307);
    assert_eq!(
        redirected.headers()["location"].to_str().unwrap(),
        format!("{active_url}/v1/apps?x=1")
    );
    let metrics = plain
        .get(format!("{standby_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("beacon_lease_active 0"), "{metrics}");
    // Following it (with the token again: a client drops it on a redirect to another origin,
    // so `em` sends it anew) reads the active Beacon's answer.
    let location = redirected.headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let apps = plain
        .get(location)
        .bearer_auth(&stack.deploy)
        .send()
        .await
        .unwrap();
    assert_eq!(apps.status(), 200);

    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let before = node(&stack, &active_url).await.applied_generation;
    assert!(
        before >= 1 << 32,
        "the first active Beacon numbers from epoch 1: {before}"
    );

    // A second deploy, and the active Beacon stops while it rolls out.
    let release = deploy_greeting(&stack, "hola").await;
    let last_seen = events(&stack, &active_url, None)
        .await
        .last()
        .map(|e| e.seq);
    let held = lease(&stack).await;
    let stopped = Instant::now();
    stack.stop_beacon().await;
    // A Beacon that stops cleanly gives its lease up once its links are closed: apprepo holds
    // it expired (or the standby has taken it already), not for the rest of its TTL.
    let after_stop = lease(&stack).await;
    assert!(
        after_stop.holder != held.holder || after_stop.expires_at_unix_ms <= unix_ms_now(),
        "the stopped Beacon kept its lease: {after_stop:?}"
    );
    let took_over = stopped
        .elapsed()
        .max(wait_active(&plain, &standby_url).await);
    let took_over = took_over.max(stopped.elapsed());
    stack.wait_https("hola").await;
    let deployed = stopped.elapsed();
    println!(
        "failover: standby active {:.2} s after the active Beacon stopped; new release served after {:.2} s",
        took_over.as_secs_f64(),
        deployed.as_secs_f64()
    );
    assert!(
        deployed < Duration::from_secs(90),
        "the rollout took {deployed:?} to finish through the standby"
    );

    assert!(
        tokio::net::TcpStream::connect(standby_control)
            .await
            .is_ok(),
        "the new active Beacon accepts links"
    );
    let now_active = health(&plain, &standby_url).await.unwrap();
    assert_eq!(now_active.role, BeaconRole::Active);
    assert_eq!(now_active.epoch, 2, "the lease changed holders once");
    // The new Beacon learns what the Maestro applied from its next report, which may arrive
    // after the release is served (seen once in eight runs on a quiet machine).
    let start = Instant::now();
    let after = loop {
        let applied = node(&stack, &standby_url).await.applied_generation;
        if applied > 2 << 32 || start.elapsed() > WAIT {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        after > before && after > 2 << 32,
        "the Maestro applied {after}, after {before}: the new Beacon's generations are above the old one's"
    );
    // A follower of the old Beacon's events (em deploy) resumes on the new one from the last
    // event it saw, and is sent what the new Beacon recorded since (the Maestro linking again,
    // at least), numbered above everything the old one gave.
    let last_seen = last_seen.expect("the old Beacon recorded the first deploy's events");
    let resumed = events(&stack, &standby_url, Some(last_seen)).await;
    assert!(
        !resumed.is_empty(),
        "a follower resuming after event {last_seen} is sent nothing by the new Beacon"
    );
    assert!(resumed.iter().all(|e| e.seq > last_seen && e.seq > 2 << 32));
    assert_no_release_lost(&stack, &release).await;
    stack.stop().await;
}

/// The active Beacon's host vanishes in the middle of a rollout: the network is cut, so no
/// connection closes and the lease is not released. The link clients notice Beacon's silence
/// (a heartbeat left unanswered), the lease lapses and the standby takes it as it lapses, and the
/// rollout finishes through it. Prints the seconds from the cut to the standby active and to
/// the new release served (the failover goal is under 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_finishes_a_rollout_whose_active_beacon_was_cut_off_without_a_word() {
    let options = StackOptions {
        seaweed: true,
        lease: true,
        cuttable_beacon: true,
        ..Default::default()
    };
    let Some(mut stack) = Stack::start_with(ChallengeKind::Http01, true, options).await else {
        return;
    };
    let plain = no_redirects(&stack);
    let active_url = stack.beacon_url.clone();
    wait_active(&plain, &active_url).await;
    let standby_url = stack.start_standby_beacon().await;
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let held = lease(&stack).await;

    let release = deploy_greeting(&stack, "hola").await;
    let cut = Instant::now();
    let old_beacon = stack.cut_off_beacon();
    let took_over = wait_active(&plain, &standby_url).await;
    stack.wait_https("hola").await;
    let served = cut.elapsed();
    println!(
        "failover after a cut: standby active {:.2} s after the active Beacon was cut off; new release served after {:.2} s",
        took_over.as_secs_f64(),
        served.as_secs_f64()
    );
    assert!(
        served < Duration::from_secs(90),
        "the rollout took {served:?} to finish through the standby"
    );
    let taken = lease(&stack).await;
    assert_ne!(taken.holder, held.holder, "the standby holds the lease");
    assert_eq!(taken.epoch, held.epoch + 1);

    // Cut off from apprepo, the old Beacon could not renew, and stepped down on its own
    // before its lease lapsed (the process exits; here its task ends with the reason).
    let ended = tokio::time::timeout(WAIT, old_beacon)
        .await
        .expect("the cut-off Beacon never stepped down");
    let reason = ended.expect_err("a Beacon that cannot renew ends with an error");
    assert!(reason.is_panic(), "{reason:?}");

    assert_no_release_lost(&stack, &release).await;
    stack.stop().await;
}
