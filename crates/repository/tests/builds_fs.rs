//! Builds and layers on the filesystem backend: the lifecycle from an upload that needs a build
//! to its release, and everything that must not happen on the way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Repo, build_suite};

#[tokio::test]
async fn build_lifecycle() {
    let repo = Repo::start_fs().await;
    build_suite::build_lifecycle(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn finish_naming_a_missing_layer_commits_nothing() {
    let repo = Repo::start_fs().await;
    build_suite::finish_needs_every_layer(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn finish_twice_answers_the_same_release() {
    let repo = Repo::start_fs().await;
    build_suite::finish_twice_answers_the_same_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn fail_records_the_result_and_the_log() {
    let repo = Repo::start_fs().await;
    build_suite::fail_records_the_result_and_the_log(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_long_log_keeps_its_tail() {
    let repo = Repo::start_fs().await;
    build_suite::a_long_log_keeps_its_tail(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn newer_uploads_supersede_pending_builds() {
    let repo = Repo::start_fs().await;
    build_suite::newer_uploads_supersede_pending_builds(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_late_finish_finds_the_newer_upload_itself() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    build_suite::a_late_finish_finds_the_newer_upload_itself(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn roles_keep_builders_and_deployers_apart() {
    let repo = Repo::start_fs().await;
    build_suite::roles_keep_builders_and_deployers_apart(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn bad_layers_store_nothing() {
    let repo = Repo::start_with(build_suite::small_limit).await;
    build_suite::bad_layers_store_nothing(&repo).await;
    assert!(!repo.data.path().join("storage/layers").exists());
    repo.stop().await;
}

#[tokio::test]
async fn retention_collects_layers_and_builds() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    build_suite::retention_collects_layers_and_builds(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn two_repositories_finishing_one_build_commit_one_release() {
    let first = Repo::start_fs().await;
    let shared = first.data.path().to_path_buf();
    let second = Repo::start_with(|c| {
        c.data_dir = shared;
        c.tokens = first.config.tokens.clone();
    })
    .await;
    build_suite::two_repositories_finish_one_build(&first, &second).await;
    second.stop().await;
    first.stop().await;
}
