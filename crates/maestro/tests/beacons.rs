//! A Maestro given every Beacon's address (`[beacon] addrs`) links to whichever accepts: the
//! first address dead, it links to the second; that Beacon gone and another up on the first
//! address (a failover: a standby does not listen until it is active), it follows, and tells
//! the new Beacon what it applied. Beacons are played by TLS listeners speaking the real link
//! protocol, with certificates from one cluster CA. A Beacon that falls silent without closing
//! (its host vanished) is left for the next one once it leaves a heartbeat unanswered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{BeaconLink, FakeBeacon, Maestro, WAIT, assign, config};
use futures_util::{SinkExt, StreamExt};
use px_proto::link::{FromBeacon, ToBeacon};
use px_test_support::Pki;

/// Reads `link` (answering heartbeats as Beacon does) until a heartbeat reports `generation`.
async fn wait_generation(link: &mut BeaconLink, generation: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, link.next())
            .await
            .expect("the maestro never reported the generation");
        match frame {
            Some(Ok(ToBeacon::Heartbeat(report))) => {
                link.send(FromBeacon::Heartbeat).await.unwrap();
                if report.generation == generation {
                    return;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("link ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_maestro_links_to_whichever_beacon_is_active_and_follows_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    // The first control host's Beacon is down (its port refuses connections); the second's is
    // active.
    let first_addr = {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        held.local_addr().unwrap().to_string()
    };
    let second = FakeBeacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let mut config = config(dir.path(), Some(&second));
    let beacon = config.beacon.as_mut().unwrap();
    beacon.addr = None;
    beacon.addrs = vec![first_addr.clone(), second.addr.clone()];
    let maestro = Maestro::start(config).await;

    let (mut link, report) = second.accept().await;
    assert_eq!(report.generation, 0);
    assign(&mut link, 3, Vec::new()).await;
    wait_generation(&mut link, 3).await;

    // The second Beacon steps down: it closes its link and its listener. The first control
    // host's Beacon takes over on its address.
    drop(link);
    drop(second);
    let first = FakeBeacon::start_at(&first_addr, Arc::clone(&pki)).await;
    let (mut link, report) = first.accept().await;
    assert_eq!(
        report.generation, 3,
        "the maestro tells the new active beacon what it applied"
    );
    wait_generation(&mut link, 3).await;
    maestro.stop().await;
}

#[tokio::test]
async fn a_maestro_leaves_a_beacon_that_falls_silent_without_closing_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    // The first Beacon is active and answers heartbeats, as Beacon does; the second stands by
    // on its own address (here: listening, as it will once it has taken over).
    let mut first = FakeBeacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    first.heartbeat_ms = Some(px_proto::link::beacon_heartbeat_ms());
    first.answers_heartbeats = true;
    let second = FakeBeacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let mut config = config(dir.path(), Some(&first));
    let beacon = config.beacon.as_mut().unwrap();
    beacon.addr = None;
    beacon.addrs = vec![first.addr.clone(), second.addr.clone()];
    let maestro = Maestro::start(config).await;

    let (mut frozen, _) = first.accept().await;
    assign(&mut frozen, 3, Vec::new()).await;
    wait_generation(&mut frozen, 3).await;

    // The first control host vanishes: its Beacon says nothing more and closes nothing (the
    // test holds the connection open and reads nothing from it). Once its next heartbeat goes
    // unanswered the Maestro links to the second Beacon, telling it what it applied.
    let deadline = px_proto::link::HEARTBEAT_INTERVAL + px_proto::link::HEARTBEAT_ANSWER_DEADLINE;
    let frozen_at = tokio::time::Instant::now();
    let (mut link, report) = tokio::time::timeout(deadline + WAIT, second.accept())
        .await
        .expect("the maestro never left the silent beacon");
    assert_eq!(
        report.generation, 3,
        "the maestro tells the new active beacon what it applied"
    );
    // Well before the 15 s a Beacon silent between heartbeats would be allowed.
    let left_after = frozen_at.elapsed();
    assert!(
        left_after < px_proto::link::HEARTBEAT_DEADLINE,
        "left the silent beacon after {left_after:?}"
    );
    wait_generation(&mut link, 3).await;
    drop(frozen);
    maestro.stop().await;
}
