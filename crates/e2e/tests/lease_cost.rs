//! What the Beacon lease costs a deploy: two stacks side by side, apprepo on SeaweedFS in
//! both, one Beacon holding the lease (renewing it, and writing its events, alert state and
//! rollout histories to apprepo for a successor) and one without `[lease]`. The same app is
//! redeployed on each in turn, and each deploy is timed from the upload to the new release
//! served and to Beacon's rollout-level `deploy_finished` event (what `em deploy` waits for).
//! Prints the medians and their ratio (`benches/failover` runs it with more deploys); it
//! asserts only that every deploy was served and finished, never a timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::acme_stack::{DOMAIN, Stack, StackOptions, WAIT};
use px_beacon::config::ChallengeKind;
use px_proto::beacon::{Event, EventKind};

/// Redeploys per stack; `PX_LEASE_COST_DEPLOYS` changes it.
const DEPLOYS: usize = 3;
/// How often the measure looks for the new release: the resolution of the figures.
const POLL: Duration = Duration::from_millis(20);

struct Timed {
    served: Duration,
    finished: Duration,
}

/// Uploads the shop answering `greeting` and times it to served and to finished.
async fn timed_deploy(stack: &Stack, client: &reqwest::Client, greeting: &str) -> Timed {
    let app_dir = tempfile::tempdir().unwrap();
    Stack::write_shop(app_dir.path(), greeting);
    let url = format!("https://{DOMAIN}:{}/", stack.https_port);
    let last_seq = events(stack).await.last().map_or(0, |e| e.seq);
    let start = Instant::now();
    let release = stack.upload("shop", app_dir.path()).await;
    let (mut served, mut finished) = (None, None);
    while served.is_none() || finished.is_none() {
        assert!(
            start.elapsed() < WAIT,
            "release {} not served and finished",
            release.version
        );
        if served.is_none()
            && let Ok(r) = client.get(&url).send().await
            && r.status() == 200
            && r.text().await.unwrap() == greeting
        {
            served = Some(start.elapsed());
        }
        if finished.is_none()
            && events(stack).await.iter().any(|e| {
                e.seq > last_seq
                    && e.kind == EventKind::DeployFinished
                    && e.node.is_none()
                    && e.release == Some(release.version)
            })
        {
            finished = Some(start.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
    Timed {
        served: served.unwrap(),
        finished: finished.unwrap(),
    }
}

async fn events(stack: &Stack) -> Vec<Event> {
    stack
        .get_json(format!("{}/v1/events?limit=1000", stack.beacon_url))
        .await
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_under_the_lease_is_timed_beside_one_without() {
    let deploys: usize = std::env::var("PX_LEASE_COST_DEPLOYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEPLOYS);
    let start = |lease| {
        Stack::start_with(
            ChallengeKind::Http01,
            true,
            StackOptions {
                seaweed: true,
                lease,
                ..Default::default()
            },
        )
    };
    let Some(with_lease) = start(true).await else {
        return;
    };
    let Some(without) = start(false).await else {
        return;
    };
    let mut clients = Vec::new();
    for stack in [&with_lease, &without] {
        stack.deploy_shop().await;
        stack.wait_https("hello").await;
        clients.push(stack.pebble_client().await);
    }
    let (mut leased, mut alone) = (Vec::new(), Vec::new());
    for round in 0..deploys {
        // Alternate which goes first, so neither side always meets a warmer machine.
        let greeting = format!("round {round}");
        if round % 2 == 0 {
            leased.push(timed_deploy(&with_lease, &clients[0], &greeting).await);
            alone.push(timed_deploy(&without, &clients[1], &greeting).await);
        } else {
            alone.push(timed_deploy(&without, &clients[1], &greeting).await);
            leased.push(timed_deploy(&with_lease, &clients[0], &greeting).await);
        }
    }
    let report = |what: &str, pick: fn(&Timed) -> Duration| {
        let a = median(leased.iter().map(pick).collect());
        let b = median(alone.iter().map(pick).collect());
        println!(
            "lease cost: upload to {what}: {:.3} s with the lease, {:.3} s without ({:.2}x), median of {deploys}",
            a.as_secs_f64(),
            b.as_secs_f64(),
            a.as_secs_f64() / b.as_secs_f64()
        );
    };
    report("served", |t| t.served);
    report("deploy_finished", |t| t.finished);
    with_lease.stop().await;
    without.stop().await;
}
