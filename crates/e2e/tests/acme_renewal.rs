//! ACME renewal through every real service against Pebble issuing short-lived certificates:
//! Beacon orders a new certificate before the old one expires and every web server serves it;
//! one close to expiry and not renewed raises an alert; a web server that joins serves the
//! existing certificates at once; a name removed from its app is no longer served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::acme_stack::*;
use px_beacon::config::ChallengeKind;
use px_proto::acme::CertState;
use px_proto::beacon::EventKind;

/// Short enough for a test to see two renewals' worth of time pass, long enough that a
/// renewal (seconds against Pebble) ends well before the next one is due.
const SHORT_VALIDITY: Duration = Duration::from_secs(60);

fn time(s: &str) -> SystemTime {
    humantime::parse_rfc3339_weak(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_lived_certificate_is_renewed_before_it_expires_and_every_web_server_serves_the_new_one()
 {
    let Some(mut stack) = Stack::start_with(
        ChallengeKind::Http01,
        true,
        StackOptions {
            certificate_validity: Some(SHORT_VALIDITY),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let (first, first_leaf) = stack.stored_leaf().await;
    let (not_before, not_after) = (time(&first.not_before), time(&first.not_after));
    let lifetime = not_after.duration_since(not_before).unwrap();
    assert!(
        lifetime <= SHORT_VALIDITY,
        "Pebble issued for {lifetime:?}, not the short validity asked"
    );
    // Renewal is planned two thirds into the lifetime (Pebble 2.4 offers no ARI).
    let renew_at = time(&first.renew_at);
    assert!(
        renew_at > not_before + lifetime / 2 && renew_at < not_after - lifetime / 4,
        "{first:?}"
    );
    let second_port = stack.start_second_web().await;

    // Beacon orders anew before the first certificate expires.
    let start = Instant::now();
    let renewed = loop {
        let (stored, leaf) = stack.stored_leaf().await;
        if stored.serial != first.serial && stored.state == CertState::Issued {
            break (stored, leaf);
        }
        assert!(
            start.elapsed() < SHORT_VALIDITY + WAIT,
            "never renewed: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (renewed, renewed_leaf) = renewed;
    assert!(
        SystemTime::now() < not_after,
        "renewed only after the first certificate expired"
    );
    assert_ne!(renewed_leaf, first_leaf);
    assert!(time(&renewed.not_after) > not_after, "{renewed:?}");
    println!(
        "renewed {:?} after issue, {:?} before expiry",
        time(&renewed.not_before)
            .duration_since(not_before)
            .unwrap(),
        not_after.duration_since(time(&renewed.not_before)).unwrap()
    );

    // Every web server serves the new certificate (the client checks it is valid).
    for port in [stack.https_port, second_port] {
        let start = Instant::now();
        loop {
            let leaf = stack.wait_https_at(DOMAIN, port, "hello").await;
            if leaf == renewed_leaf {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "the web server on port {port} still serves the first certificate"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The API `em domains list` reads shows the new expiry.
    let listed = stack.certs().await;
    let listed = listed.iter().find(|c| c.domain == DOMAIN).unwrap();
    assert_eq!(listed.state, CertState::Issued);
    assert_eq!(listed.not_after, renewed.not_after);
    assert_eq!(stack.events(EventKind::CertificateExpiring).await.len(), 0);
    assert!(stack.events(EventKind::CertificateIssued).await.len() >= 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_close_to_expiry_and_not_renewed_raises_an_alert() {
    let Some(stack) = Stack::start_with(
        ChallengeKind::Http01,
        true,
        StackOptions {
            certificate_validity: Some(SHORT_VALIDITY),
            alert_webhook: true,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let first = stack.stored().await;
    // Nothing answers Pebble's checks from now on: every renewal fails.
    stack.stop_web();
    let start = Instant::now();
    let expiring = loop {
        let expiring = stack.events(EventKind::CertificateExpiring).await;
        if !expiring.is_empty() {
            break expiring;
        }
        assert!(
            start.elapsed() < SHORT_VALIDITY + WAIT,
            "no certificate_expiring event; record: {:?}",
            stack.stored().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(expiring[0].message.contains(DOMAIN), "{expiring:?}");
    // It names the expiry of the certificate in storage, the one being served: the first one,
    // or a renewal that was already past its challenge when the web server stopped (on a
    // loaded machine, deploying can take most of the 40 s before the first renewal).
    let current = stack.stored().await;
    assert!(time(&current.not_after) >= time(&first.not_after));
    assert!(
        expiring[0].message.contains(&current.not_after),
        "{expiring:?} {current:?}"
    );
    // Only after a renewal failed, whose reason it carries; the failures carry Pebble's.
    assert!(expiring[0].detail.is_some(), "{expiring:?}");
    let failed = stack.events(EventKind::CertificateFailed).await;
    assert!(
        failed.iter().any(|e| e
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("urn:ietf:params:acme:error:connection"))),
        "{failed:?}"
    );
    let start = Instant::now();
    while stack.alerts_with("is not renewed yet").is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "no expiry alert reached the webhook: {:?}",
            stack.alerts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alert = &stack.alerts_with("is not renewed yet")[0];
    assert!(alert["text"].as_str().unwrap().contains(DOMAIN), "{alert}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_web_server_that_joins_serves_the_existing_certificate_within_seconds() {
    let Some(mut stack) = Stack::start(ChallengeKind::Http01, true).await else {
        return;
    };
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let (stored, leaf) = stack.stored_leaf().await;
    let joined = Instant::now();
    let port = stack.start_second_web().await;
    let served = stack.wait_https_at(DOMAIN, port, "hello").await;
    println!(
        "the joining web server served the page over HTTPS {:?} after it started",
        joined.elapsed()
    );
    assert_eq!(
        served, leaf,
        "the joining server serves the stored certificate"
    );
    // It was fetched, not ordered again.
    assert_eq!(stack.stored().await.serial, stored.serial);
    assert_eq!(stack.events(EventKind::CertificateIssued).await.len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_removed_from_its_app_is_no_longer_served_nor_renewed() {
    let Some(stack) = Stack::start_with(
        ChallengeKind::Http01,
        true,
        StackOptions {
            certificate_validity: Some(SHORT_VALIDITY),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    const EXTRA: &str = "extra.example.com";
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let added = stack
        .http
        .post(format!("{}/v1/apps/shop/domains", stack.repo_url))
        .bearer_auth(&stack.deploy)
        .json(&serde_json::json!({ "domain": EXTRA }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    stack.wait_https_at(EXTRA, stack.https_port, "hello").await;
    let removed = stack
        .http
        .delete(format!("{}/v1/apps/shop/domains/{EXTRA}", stack.repo_url))
        .bearer_auth(&stack.deploy)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    // The web server stops serving it (no default certificate: the handshake fails).
    let url = format!("https://{EXTRA}:{}/", stack.https_port);
    let start = Instant::now();
    loop {
        let client = stack.pebble_client_for(EXTRA, stack.https_port).await;
        if client.get(&url).send().await.is_err() {
            break;
        }
        assert!(start.elapsed() < WAIT, "{EXTRA} is still served over HTTPS");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The other name serves on; the removed one is not renewed when its time comes.
    stack.wait_https("hello").await;
    let record = || async {
        stack
            .http
            .get(format!("{}/v1/acme/certs/{EXTRA}", stack.repo_url))
            .bearer_auth(&stack.beacon_repo_token)
            .send()
            .await
            .unwrap()
            .json::<px_proto::acme::AcmeCert>()
            .await
            .unwrap()
    };
    let before = record().await;
    let due = time(&before.renew_at);
    // Several of Beacon's passes (one a second) past the time it would have renewed.
    let past_due = due + Duration::from_secs(5);
    if let Ok(wait) = past_due.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert_eq!(
        record().await.serial,
        before.serial,
        "the removed name was renewed"
    );
    stack.stop().await;
}
