//! apprepo with the S3 backend against a real S3-compatible server (s3s-fs on loopback, one per
//! test), checked through an independent client (the AWS CLI), and S3 outages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{BUCKET, Repo, domain_suite, sample_bundle, sha256_hex, suite};
use px_proto::api::{ErrorBody, Release};
use px_test_support::{S3_ACCESS_KEY, S3_SECRET_KEY, S3Server};
use reqwest::StatusCode;

fn server() -> Option<S3Server> {
    S3Server::start(BUCKET)
}

#[tokio::test]
async fn deploy_flow_on_s3() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    suite::deploy_flow(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_on_s3_all_become_releases() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    suite::concurrent_uploads(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn digest_mismatch_on_s3_stores_nothing() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    suite::digest_mismatch_stores_nothing(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn retention_on_s3_keeps_what_the_policy_says() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
    })
    .await;
    suite::retention_keeps_what_the_policy_says(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn retention_on_s3_never_breaks_the_pointer_probe() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
    })
    .await;
    suite::retention_never_breaks_the_pointer_probe(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn unreferenced_bundles_on_s3_are_collected_after_the_grace() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
    })
    .await;
    suite::unreferenced_bundles_are_collected_after_the_grace(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn bundles_on_s3_stay_when_a_release_record_cannot_be_read() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
    })
    .await;
    suite::bundles_stay_when_a_release_record_cannot_be_read(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn commits_on_s3_refuse_a_bundle_that_is_gone() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        common::no_periodic_retention(c);
    })
    .await;
    suite::commits_refuse_a_bundle_that_is_gone(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn periodic_sweeps_on_s3_report_in_metrics() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
        suite::frequent_retention(c);
    })
    .await;
    suite::periodic_sweeps_report_in_metrics(&repo).await;
    repo.stop().await;
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

#[tokio::test]
async fn what_apprepo_stores_is_what_an_independent_client_reads() {
    let Some(s3) = server() else { return };
    // Over the multipart threshold, so both upload paths are covered.
    let big = {
        let dir = tempfile::tempdir().unwrap();
        px_test_support::write_sample_app(dir.path(), "big").unwrap();
        let mut noise = vec![0u8; 80 * 1024 * 1024];
        let mut state = 0x9e3779b97f4a7c15u64;
        for chunk in noise.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.path().join("noise.bin"), &noise).unwrap();
        let mut out = Vec::new();
        px_bundle::pack_dir(dir.path(), &mut out).unwrap();
        out
    };
    assert!(big.len() as u64 > px_repository::internals::MULTIPART_THRESHOLD);
    let repo = Repo::start_with(|c| {
        common::use_s3(c, &s3);
    })
    .await;
    repo.create_app("big").await;
    let release = repo.deploy("big", &big).await;
    repo.create_app("hello").await;
    let small = repo.deploy("hello", &sample_bundle("hello", "small")).await;

    let fetched = tempfile::tempdir().unwrap();
    for r in [&release, &small] {
        let dest = fetched.path().join(&r.bundle.sha256);
        let key = format!("s3://{BUCKET}/bundles/sha256/{}", r.bundle.sha256);
        let out = aws(&s3, &["s3", "cp", &key, dest.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&dest).unwrap();
        assert_eq!(sha256_hex(&bytes), r.bundle.sha256);
        assert_eq!(bytes.len() as u64, r.bundle.size);
    }
    let out = aws(
        &s3,
        &[
            "s3",
            "cp",
            &format!("s3://{BUCKET}/apps/big/releases/1.json"),
            "-",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: Release = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stored, release);
    let out = aws(&s3, &["s3", "ls", &format!("s3://{BUCKET}/apps/")]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("big/") && listing.contains("hello/"),
        "{listing}"
    );
    // Downloads through apprepo stream the same bytes back.
    let r = repo
        .get(
            &format!("/v1/bundles/{}", release.bundle.sha256),
            &repo.read_token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), release.bundle.sha256);
    repo.stop().await;
}

#[tokio::test]
async fn s3_outage_answers_503_and_retries_succeed_once_it_returns() {
    let Some(mut s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    repo.create_app("hello").await;
    s3.pause();
    let bundle = sample_bundle("hello", "during outage");
    let r = repo.upload("hello", &bundle).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "storage_unavailable");
    assert!(body.message.contains("retry"), "{}", body.message);
    let health = repo
        .http
        .get(format!("{}/healthz", repo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    // One fixed word: the storage's error (endpoint, bucket) goes to the log, not to a prober.
    assert_eq!(health.text().await.unwrap(), "unavailable\n");
    repo.assert_spool_empties().await;

    s3.resume().unwrap();
    let release = repo.deploy("hello", &bundle).await;
    assert_eq!(
        release.version, 1,
        "the failed attempt left no release behind"
    );
    assert_eq!(repo.releases("hello").await.len(), 1);
    repo.stop().await;
}

#[tokio::test]
async fn s3_conditional_writes_refuse_taken_keys_and_stale_versions() {
    use bytes::Bytes;
    use px_repository::internals::{S3Storage, Storage, StorageError};
    let Some(s3) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path()).0;
    common::use_s3(&mut config, &s3);
    let s3_config = config.storage.s3.clone().unwrap();
    let storage = S3Storage::connect(&s3_config, Some(S3_SECRET_KEY.into()))
        .await
        .unwrap();
    storage
        .create("apps/x/releases/1.json", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let taken = storage
        .create("apps/x/releases/1.json", Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert!(matches!(taken, StorageError::AlreadyExists(_)), "{taken}");
    let v1 = storage
        .read("apps/x/releases/1.json")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&v1.bytes[..], b"first", "a refused create changes nothing");
    storage
        .replace(
            "apps/x/releases/1.json",
            Bytes::from_static(b"third"),
            &v1.version,
        )
        .await
        .unwrap();
    let stale = storage
        .replace(
            "apps/x/releases/1.json",
            Bytes::from_static(b"fourth"),
            &v1.version,
        )
        .await
        .unwrap_err();
    assert!(matches!(stale, StorageError::Conflict(_)), "{stale}");
    assert_eq!(
        &storage
            .read("apps/x/releases/1.json")
            .await
            .unwrap()
            .unwrap()
            .bytes[..],
        b"third"
    );
    assert_eq!(storage.list("apps/").await.unwrap(), vec!["x"]);
    assert_eq!(
        storage.list("apps/x/releases/").await.unwrap(),
        vec!["1.json"]
    );
    assert!(storage.read("apps/y/app.json").await.unwrap().is_none());
}

#[tokio::test]
async fn s3_lists_bundles_with_their_times_and_deletes_idempotently() {
    use px_repository::internals::{S3Storage, Storage, bundle_key};
    let Some(s3) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path()).0;
    common::use_s3(&mut config, &s3);
    let s3_config = config.storage.s3.clone().unwrap();
    let storage = S3Storage::connect(&s3_config, Some(S3_SECRET_KEY.into()))
        .await
        .unwrap();
    assert!(storage.list_bundles().await.unwrap().is_empty());
    let bundle = sample_bundle("hello", "listed");
    let digest = sha256_hex(&bundle);
    let spool = dir.path().join("spooled");
    std::fs::write(&spool, &bundle).unwrap();
    // S3 keeps whole seconds: allow for the rounding.
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(5);
    storage
        .put_bundle(&digest, &spool, bundle.len() as u64)
        .await
        .unwrap();
    // Under the bundle prefix but not a digest: never listed, so never collected.
    let out = aws(
        &s3,
        &[
            "s3",
            "cp",
            spool.to_str().unwrap(),
            &format!("s3://{BUCKET}/bundles/sha256/notes.txt"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = storage.list_bundles().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].sha256.as_str(), listed[0].size),
        (digest.as_str(), bundle.len() as u64)
    );
    assert!(listed[0].modified >= before, "{listed:?}");
    storage.delete(&bundle_key(&digest)).await.unwrap();
    storage.delete(&bundle_key(&digest)).await.unwrap();
    assert!(!storage.has_bundle(&digest).await.unwrap());
    assert!(storage.list_bundles().await.unwrap().is_empty());
    let out = aws(
        &s3,
        &["s3", "ls", &format!("s3://{BUCKET}/bundles/sha256/")],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("notes.txt"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn scaling_on_s3_changes_only_the_named_types_and_makes_no_release() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    suite::formation(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_scales_on_s3_lose_no_change() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    suite::concurrent_scales(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn domains_on_s3_are_added_and_removed_without_a_release() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    domain_suite::added_domains(&repo).await;
    domain_suite::the_added_names_have_a_limit(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn an_added_name_on_s3_belongs_to_one_app() {
    let Some(s3) = server() else { return };
    let repo = Repo::start_s3(&s3).await;
    domain_suite::a_name_belongs_to_one_app(&repo).await;
    domain_suite::concurrent_adds(&repo).await;
    repo.stop().await;
}
