//! Release phases on the filesystem backend: a release waits for its phase, a phase is
//! claimed exactly once (`O_EXCL`), and how it ends decides what serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Repo, phase_suite};

#[tokio::test]
async fn a_phase_gates_its_release() {
    let repo = Repo::start_fs().await;
    phase_suite::a_phase_gates_its_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_failed_phase_keeps_the_old_release() {
    let repo = Repo::start_fs().await;
    phase_suite::a_failed_phase_keeps_the_old_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_newer_release_supersedes_an_unclaimed_phase() {
    let repo = Repo::start_fs().await;
    phase_suite::a_newer_release_supersedes_an_unclaimed_phase(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_claims_one_wins() {
    let repo = Repo::start_fs().await;
    phase_suite::concurrent_claims_one_wins(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn an_abandoned_claim_is_failed_not_rerun() {
    let repo = Repo::start_fs().await;
    phase_suite::an_abandoned_claim_is_failed_not_rerun(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn only_nodes_claim_phases() {
    let repo = Repo::start_fs().await;
    phase_suite::only_nodes_claim_phases(&repo).await;
    repo.stop().await;
}
