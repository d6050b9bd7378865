//! ACME records on the filesystem backend: the account stored once, certificates written by
//! Beacon, read with their key by web servers and listed without keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Repo, acme_suite, scope_suite};
use px_repository::auth::Role;

#[tokio::test]
async fn the_account_is_stored_once_and_only_beacon_reads_it() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    acme_suite::the_account_is_stored_once_and_only_beacon_reads_it(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn certificates_reach_web_servers_and_readers_see_no_keys() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    acme_suite::certificates_reach_web_servers_and_readers_see_no_keys(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_scoped_reader_lists_only_its_apps_certificates() {
    let (mut beacon, mut scoped) = (String::new(), String::new());
    let repo = Repo::start_with(|c| {
        beacon = acme_suite::add_beacon_token(c);
        scoped = scope_suite::add_scoped(c, "ci-shop", Role::Read, &["shop"]);
    })
    .await;
    acme_suite::a_scoped_reader_lists_only_its_apps_certificates(&repo, &beacon, &scoped).await;
    repo.stop().await;
}
