//! Certificates from a real ACME server (Pebble) for an app's domain, through every real
//! service: Beacon orders, every Maestro answers the challenge and serves the certificate, and
//! apprepo keeps the state. Pebble's DNS answers every name with 127.0.0.1 and its validations
//! go to the proxy's ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::acme_stack::*;
use px_beacon::config::ChallengeKind;
use px_proto::acme::CertState;
use px_proto::beacon::EventKind;

fn certs_dir_is_untouched(path: PathBuf) {
    assert_eq!(std::fs::read_dir(path).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_domain_serves_https_under_an_acme_certificate_from_http_01_and_a_restarted_beacon_orders_nothing()
 {
    let Some(mut stack) = Stack::start(ChallengeKind::Http01, true).await else {
        return;
    };
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let listed = stack.certs().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].domain, DOMAIN);
    assert_eq!(listed[0].state, CertState::Issued);
    assert!(listed[0].issuer.contains("Pebble"), "{listed:?}");
    assert_eq!(stack.events(EventKind::CertificateIssued).await.len(), 1);
    certs_dir_is_untouched(stack.dir.path().join("certs"));

    // A restarted Beacon finds the certificate in apprepo and orders nothing.
    let before = stack.stored().await;
    stack.restart_beacon().await;
    let start = Instant::now();
    while stack
        .http
        .get(format!("{}/v1/apps/shop", stack.beacon_url))
        .bearer_auth(&stack.deploy)
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(
            start.elapsed() < WAIT,
            "the restarted beacon never read the app"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several of its passes over the routed names (one a second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = stack.stored().await;
    assert_eq!(
        after.serial, before.serial,
        "the restarted beacon ordered again"
    );
    assert_eq!(stack.events(EventKind::CertificateIssued).await.len(), 1);
    stack.wait_https("hello").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_domain_serves_https_under_an_acme_certificate_from_tls_alpn_01() {
    let Some(stack) = Stack::start(ChallengeKind::TlsAlpn01, true).await else {
        return;
    };
    stack.deploy_shop().await;
    stack.wait_https("hello").await;
    let listed = stack.certs().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, CertState::Issued);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_validation_becomes_an_event_an_alert_and_a_record_with_pebbles_reason_and_is_retried()
 {
    let Some(stack) = Stack::start_with(
        ChallengeKind::Http01,
        false,
        StackOptions {
            retry_after_failure: Some(Duration::from_secs(1)),
            alert_webhook: true,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    stack.deploy_shop().await;
    // The name is ordered again after a failure: a second failure follows the first.
    let start = Instant::now();
    let failed = loop {
        let failed = stack.events(EventKind::CertificateFailed).await;
        if failed.len() >= 2 {
            break failed;
        }
        assert!(
            start.elapsed() < WAIT,
            "fewer than two certificate_failed events: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let detail = failed[0].detail.clone().unwrap_or_default();
    // Pebble's own problem: nothing answered its HTTP-01 request.
    assert!(
        detail.contains("urn:ietf:params:acme:error:connection"),
        "{failed:?}"
    );
    assert!(failed[0].message.contains(DOMAIN), "{failed:?}");
    let listed = stack.certs().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, CertState::Failed);
    assert!(
        listed[0]
            .last_error
            .contains("urn:ietf:params:acme:error:connection"),
        "{listed:?}"
    );
    // The sysadmin is alerted with Pebble's reason.
    let start = Instant::now();
    while stack.alerts_with("not issued").is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "no alert reached the webhook: {:?}",
            stack.alerts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alert = &stack.alerts_with("not issued")[0];
    let text = alert["text"].as_str().unwrap();
    assert!(text.contains(DOMAIN), "{alert}");
    assert!(
        text.contains("urn:ietf:params:acme:error:connection"),
        "{alert}"
    );
    stack.stop().await;
}

/// The cluster's domain in [`an_apps_name_under_the_cluster_domain_gets_a_certificate_too`]:
/// Pebble's DNS answers its names with 127.0.0.1, as a wildcard record pointing at the web
/// servers would.
const CLUSTER_DOMAIN: &str = "apps.example.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_apps_name_under_the_cluster_domain_gets_a_certificate_too() {
    let Some(stack) = Stack::start_with(
        ChallengeKind::Http01,
        true,
        StackOptions {
            cluster_domain: Some(CLUSTER_DOMAIN),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    stack.deploy_shop().await;
    let cluster_name = format!("shop.{CLUSTER_DOMAIN}");
    // Both the manifest's name and `<app>.<cluster domain>` are served under Pebble's
    // certificates, each its own.
    let cluster_leaf = stack
        .wait_https_at(&cluster_name, stack.https_port, "hello")
        .await;
    let domain_leaf = stack.wait_https_at(DOMAIN, stack.https_port, "hello").await;
    assert_ne!(cluster_leaf, domain_leaf);
    let start = Instant::now();
    let listed = loop {
        let listed = stack.certs().await;
        if listed.len() == 2 && listed.iter().all(|c| c.state == CertState::Issued) {
            break listed;
        }
        assert!(start.elapsed() < WAIT, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut names: Vec<&str> = listed.iter().map(|c| c.domain.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, [cluster_name.as_str(), DOMAIN], "{listed:?}");
    assert!(
        listed.iter().all(|c| c.issuer.contains("Pebble")),
        "{listed:?}"
    );
    stack.stop().await;
}
