//! Release phases on the S3 backend against a real S3-compatible server (s3s-fs on loopback):
//! the claim is a create-only write (`If-None-Match: *`), so one of many concurrent claims wins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{BUCKET, Repo, phase_suite};
use px_test_support::S3Server;

async fn start(s3: &S3Server) -> Repo {
    Repo::start_with(|c| {
        common::use_s3(c, s3);
        common::no_periodic_retention(c);
    })
    .await
}

#[tokio::test]
async fn a_phase_on_s3_gates_its_release() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let repo = start(&s3).await;
    phase_suite::a_phase_gates_its_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_failed_phase_on_s3_keeps_the_old_release() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let repo = start(&s3).await;
    phase_suite::a_failed_phase_keeps_the_old_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_claims_on_s3_one_wins() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let repo = start(&s3).await;
    phase_suite::concurrent_claims_one_wins(&repo).await;
    repo.stop().await;
}

/// Two repositories sharing a bucket see one claim: the second is refused and names the first
/// one's node. (Claims at the same instant through two repositories rely on the server's
/// conditional write alone, which AWS S3 makes atomic; s3s-fs checks and then writes, so that
/// race is not tested here.)
#[tokio::test]
async fn a_second_repository_on_s3_refuses_a_claimed_phase() {
    let Some(s3) = S3Server::start(BUCKET) else {
        return;
    };
    let first = start(&s3).await;
    // The same tokens on both, as two apprepos of one cluster have.
    let second = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
        c.tokens = first.config.tokens.clone();
    })
    .await;
    first.create_app("hello").await;
    first
        .deploy("hello", &phase_suite::phase_bundle("hello", "1"))
        .await;
    let token = first.build_token.clone();
    let r = first.claim_phase("hello", 1, "node-a", "a1", &token).await;
    assert_eq!(r.status().as_u16(), 200);
    let r = second.claim_phase("hello", 1, "node-b", "b1", &token).await;
    assert_eq!(r.status().as_u16(), 409);
    assert!(r.text().await.unwrap().contains("claimed by node-a"));
    first.stop().await;
    second.stop().await;
}
