//! Scenarios every storage backend must pass, run by `api_fs.rs` and `api_s3.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use px_proto::api::{App, Release, ReleaseCause};
use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH};

use super::{Repo, sample_bundle, sha256_hex};

/// Create, deploy, read back, download, configure, roll back: the path `em` drives.
pub async fn deploy_flow(repo: &Repo) {
    repo.create_app("hello").await;
    let bundle = sample_bundle("hello", "one");
    let v1 = repo.deploy("hello", &bundle).await;
    assert_eq!(v1.version, 1);
    assert_eq!(v1.bundle.sha256, sha256_hex(&bundle));
    assert_eq!(v1.bundle.size, bundle.len() as u64);
    assert_eq!(v1.manifest.name, "hello");
    assert_eq!(v1.created_by, "ci");
    assert_eq!(v1.cause, ReleaseCause::Deploy);

    // The read token sees the app, its current release and the release list.
    let app: App = repo
        .get("/v1/apps/hello", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(app.current.as_ref().map(|r| r.version), Some(1));
    let current: Release = repo
        .get("/v1/apps/hello/releases/current", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current, v1);
    let apps: Vec<App> = repo
        .get("/v1/apps", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["hello"]
    );

    // Download: the same bytes, an ETag of the digest, 304 when the client has them.
    let r = repo
        .get(
            &format!("/v1/bundles/{}", v1.bundle.sha256),
            &repo.read_token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()[ETAG].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", v1.bundle.sha256));
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bundle[..]);
    let r = repo
        .get(
            &format!("/v1/bundles/{}", v1.bundle.sha256),
            &repo.read_token,
        )
        .header(IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert!(r.bytes().await.unwrap().is_empty());
    let missing = "0".repeat(64);
    let r = repo
        .get(&format!("/v1/bundles/{missing}"), &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A second deploy carries the config over; config changes make new releases.
    let v2 = repo.deploy("hello", &sample_bundle("hello", "two")).await;
    assert_eq!(v2.version, 2);
    let patch = |body: serde_json::Value| {
        repo.http
            .patch(format!("{}/v1/apps/hello/config", repo.url))
            .bearer_auth(&repo.deploy_token)
            .json(&body)
            .send()
    };
    let r = patch(serde_json::json!({"set": {"DATABASE_URL": "postgres://db/x", "MODE": "a"}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v3: Release = r.json().await.unwrap();
    assert_eq!(v3.version, 3);
    assert_eq!(v3.bundle, v2.bundle);
    assert_eq!(v3.config["DATABASE_URL"], "postgres://db/x");
    assert_eq!(v3.environment()["GREETING"], "hello");
    let v4: Release = patch(serde_json::json!({"unset": ["MODE"]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v4.version, 4);
    assert!(!v4.config.contains_key("MODE"));
    assert_eq!(v4.config["DATABASE_URL"], "postgres://db/x");
    let config: std::collections::BTreeMap<String, String> = repo
        .get("/v1/apps/hello/config", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config, v4.config);
    let r = patch(serde_json::json!({"set": {"PORT": "1"}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v5 = repo.deploy("hello", &sample_bundle("hello", "three")).await;
    assert_eq!(v5.config, v4.config, "a deploy keeps the config vars");

    // Rollback with no target goes to the previous release; with one, to that release.
    let rollback = |body: serde_json::Value| {
        repo.http
            .post(format!("{}/v1/apps/hello/rollback", repo.url))
            .bearer_auth(&repo.deploy_token)
            .json(&body)
            .send()
    };
    let v6: Release = rollback(serde_json::json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v6.version, v6.cause.clone()),
        (6, ReleaseCause::Rollback { to: 4 })
    );
    assert_eq!(
        (v6.bundle.clone(), v6.config.clone()),
        (v4.bundle.clone(), v4.config.clone())
    );
    let v7: Release = rollback(serde_json::json!({"to": 1}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v7.bundle, v1.bundle);
    assert!(v7.config.is_empty());
    let r = rollback(serde_json::json!({"to": 7})).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = rollback(serde_json::json!({"to": 99})).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let listed = repo.releases("hello").await;
    assert_eq!(
        listed.iter().map(|r| r.version).collect::<Vec<_>>(),
        [7, 6, 5, 4, 3, 2, 1]
    );
    let v3_again: Release = repo
        .get("/v1/apps/hello/releases/v3", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v3_again, v3);

    let metrics = repo
        .http
        .get(format!("{}/metrics", repo.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("apprepo_uploads_accepted_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apprepo_releases_committed_total 7"),
        "{metrics}"
    );
    let health = repo
        .http
        .get(format!("{}/healthz", repo.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// Uploads racing on one app all become releases, each with its own number.
pub async fn concurrent_uploads(repo: &Repo) {
    const UPLOADS: usize = 8;
    repo.create_app("racer").await;
    let bundles: Vec<Vec<u8>> = (0..UPLOADS)
        .map(|i| sample_bundle("racer", &format!("upload {i}")))
        .collect();
    let results =
        futures_util::future::join_all(bundles.iter().map(|b| repo.upload("racer", b))).await;
    let mut versions = Vec::new();
    for r in results {
        assert_eq!(r.status(), StatusCode::CREATED);
        let release: Release = r.json().await.unwrap();
        versions.push(release.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=UPLOADS as u64).collect::<Vec<_>>());
    let listed = repo.releases("racer").await;
    assert_eq!(listed.len(), UPLOADS);
    let mut digests: Vec<_> = listed.iter().map(|r| r.bundle.sha256.clone()).collect();
    digests.sort();
    let mut expected: Vec<_> = bundles.iter().map(|b| sha256_hex(b)).collect();
    expected.sort();
    assert_eq!(
        digests, expected,
        "every upload's bundle is in exactly one release"
    );
}

/// A wrong digest is refused with 422 and leaves no release and no spool file.
pub async fn digest_mismatch_stores_nothing(repo: &Repo) {
    repo.create_app("digest").await;
    let bundle = sample_bundle("digest", "x");
    let r = repo
        .http
        .post(format!("{}/v1/apps/digest/releases", repo.url))
        .bearer_auth(&repo.deploy_token)
        .header(px_proto::api::HEADER_BUNDLE_SHA256, "a".repeat(64))
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: px_proto::api::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "digest_mismatch");
    assert!(
        body.message.contains(&sha256_hex(&bundle)),
        "{}",
        body.message
    );
    assert!(repo.releases("digest").await.is_empty());
    let r = repo
        .get(
            &format!("/v1/bundles/{}", sha256_hex(&bundle)),
            &repo.read_token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the bundle must not be stored"
    );
    repo.assert_spool_empties().await;
}
