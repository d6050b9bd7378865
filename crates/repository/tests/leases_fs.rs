//! Leases and the Beacon state they fence on the filesystem backend (`em up`, one control host):
//! one holder at a time, the next one after expiry, checked claims, state written by the holder
//! alone. The disk's compare-and-swap holds within one apprepo process, which is all a single
//! host runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Repo, acme_suite, lease_suite, state_suite};

#[tokio::test]
async fn one_holder_at_a_time_and_the_next_after_expiry() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    lease_suite::one_holder_at_a_time_and_the_next_after_expiry(&repo, &repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claimants_get_one_lease() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    lease_suite::racing_claimants_get_one_lease(&repo, &repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn claims_are_checked() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    lease_suite::claims_are_checked(&repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_released_lease_goes_to_the_next_claimant_at_once() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    lease_suite::a_released_lease_goes_to_the_next_claimant_at_once(&repo, &repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn beacon_state_is_written_by_the_lease_holder_alone() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    state_suite::only_the_lease_holder_at_its_epoch_writes(&repo, &repo, &beacon).await;
    repo.stop().await;
}

#[tokio::test]
async fn beacon_state_documents_are_bounded_and_old_chunks_pruned() {
    let mut beacon = String::new();
    let repo = Repo::start_with(|c| beacon = acme_suite::add_beacon_token(c)).await;
    state_suite::documents_are_bounded_and_old_chunks_pruned(&repo, &beacon).await;
    repo.stop().await;
}
