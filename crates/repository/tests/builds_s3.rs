//! Builds and layers on the S3 backend against a real S3-compatible server (s3s-fs on
//! loopback, one per test), with what apprepo stored checked through the AWS CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{BUCKET, Repo, build_suite, sha256_hex};
use px_proto::api::Release;
use px_proto::build::{Build, BuildResult};
use px_test_support::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};

fn server() -> Option<S3Server> {
    S3Server::start(BUCKET)
}

async fn start(s3: &S3Server) -> Repo {
    Repo::start_with(|c| {
        common::use_s3(c, s3);
        common::no_periodic_retention(c);
    })
    .await
}

/// Runs the AWS CLI against the test server.
fn aws(s3: &S3Server, args: &[&str]) -> std::process::Output {
    Command::new("aws")
        .args(["--endpoint-url", &s3.endpoint()])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap_or_else(|e| {
            panic!("the AWS CLI is needed for this test (`pip install awscli`): {e}")
        })
}

/// The object at `key` as the AWS CLI reads it.
fn fetch(s3: &S3Server, key: &str) -> Vec<u8> {
    let out = aws(s3, &["s3", "cp", &format!("s3://{BUCKET}/{key}"), "-"]);
    assert!(
        out.status.success(),
        "{key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn listing(s3: &S3Server, prefix: &str) -> String {
    let out = aws(s3, &["s3", "ls", &format!("s3://{BUCKET}/{prefix}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn build_lifecycle_on_s3_stores_what_an_independent_client_reads() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::build_lifecycle(&repo).await;

    let made = build_suite::layers("one");
    for (_, bytes) in &made {
        let digest = sha256_hex(bytes);
        assert_eq!(fetch(&s3, &format!("layers/sha256/{digest}")), *bytes);
    }
    assert_eq!(listing(&s3, "layers/sha256/").lines().count(), made.len());
    let build: Build = serde_json::from_slice(&fetch(&s3, "apps/shop/builds/1.json")).unwrap();
    assert_eq!((build.number, build.result), (1, None));
    let result: BuildResult =
        serde_json::from_slice(&fetch(&s3, "apps/shop/builds/1.result.json")).unwrap();
    assert_eq!(result, BuildResult::Succeeded { release: 1 });
    let log = fetch(&s3, "apps/shop/builds/1.log");
    assert_eq!(log, b"Installing gunicorn\nbuild 1 done\n");
    let v1: Release = serde_json::from_slice(&fetch(&s3, "apps/shop/releases/1.json")).unwrap();
    assert_eq!(v1.build, Some(build_suite::output(1, &made)));
    repo.stop().await;
}

#[tokio::test]
async fn finish_on_s3_naming_a_missing_layer_commits_nothing() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::finish_needs_every_layer(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn finish_on_s3_twice_answers_the_same_release() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::finish_twice_answers_the_same_release(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn fail_on_s3_records_the_result_and_the_log() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::fail_records_the_result_and_the_log(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn newer_uploads_on_s3_supersede_pending_builds() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::newer_uploads_supersede_pending_builds(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn a_late_finish_on_s3_finds_the_newer_upload_itself() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::a_late_finish_finds_the_newer_upload_itself(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn roles_on_s3_keep_builders_and_deployers_apart() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::roles_keep_builders_and_deployers_apart(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn bad_layers_on_s3_store_nothing() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        build_suite::small_limit(c);
    })
    .await;
    build_suite::bad_layers_store_nothing(&repo).await;
    assert_eq!(listing(&s3, "layers/"), "", "no layer object at all");
    repo.stop().await;
}

#[tokio::test]
async fn retention_on_s3_collects_layers_and_builds() {
    let Some(s3) = server() else { return };
    let repo = start(&s3).await;
    build_suite::retention_collects_layers_and_builds(&repo).await;
    assert_eq!(listing(&s3, "layers/sha256/"), "");
    let builds = listing(&s3, "apps/shop/builds/");
    assert!(
        !builds.contains(" 1.json") && !builds.contains(" 2.json"),
        "{builds}"
    );
    assert!(
        builds.contains(" 3.json") && builds.contains(" 4.json"),
        "{builds}"
    );
    repo.stop().await;
}
