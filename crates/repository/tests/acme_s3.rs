//! ACME records on the S3 backend against a real S3-compatible server (s3s-fs on loopback):
//! the account is a create-only write, so a second Beacon's account is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{BUCKET, Repo, acme_suite};
use px_test_support::S3Server;

async fn start(s3: &S3Server) -> (Repo, String) {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| {
        common::use_s3(c, s3);
        common::no_periodic_retention(c);
        beacon = acme_suite::add_beacon_token(c);
    })
    .await;
    (repo, beacon)
}

#[tokio::test]
async fn the_account_on_s3_is_stored_once_and_only_beacon_reads_it() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let (repo, beacon) = start(&s3).await;
    acme_suite::the_account_is_stored_once_and_only_beacon_reads_it(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn certificates_on_s3_reach_web_servers_and_readers_see_no_keys() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let (repo, beacon) = start(&s3).await;
    acme_suite::certificates_reach_web_servers_and_readers_see_no_keys(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_scoped_reader_lists_only_its_apps_certificates_on_s3() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let (mut beacon, mut scoped) = (String::new(), String::new());
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
        beacon = acme_suite::add_beacon_token(c);
        scoped = common::scope_suite::add_scoped(
            c,
            "ci-shop",
            px_repository::auth::Role::Read,
            &["shop"],
        );
    })
    .await;
    acme_suite::a_scoped_reader_lists_only_its_apps_certificates(&repo, &beacon, &scoped).await;
    repo.stop().await;
}
