//! Scenarios every storage backend must pass, run by `api_fs.rs` and `api_s3.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::{Duration, SystemTime};

use px_proto::api::{App, ErrorBody, Formation, Release, ReleaseCause};
use px_repository::config::{Config, RetentionConfig};
use px_repository::internals::{Policy, bundle_key, sweep};
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
    // The deploy token that set them reads the values (a read token sees names only).
    let config: std::collections::BTreeMap<String, String> = repo
        .get("/v1/apps/hello/config", &repo.deploy_token)
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
        .get("/v1/apps/hello/releases/v3", &repo.deploy_token)
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

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn policy(keep_releases: usize, keep_for: Duration, bundle_grace: Duration) -> Policy {
    Policy {
        keep_releases,
        keep_for,
        bundle_grace,
        condemn_wait: Duration::ZERO,
    }
}

/// Release numbers as the API lists them, newest first.
async fn versions(repo: &Repo, app: &str) -> Vec<u64> {
    repo.releases(app).await.iter().map(|r| r.version).collect()
}

async fn current_version(repo: &Repo, app: &str) -> u64 {
    let r = repo
        .get(
            &format!("/v1/apps/{app}/releases/current"),
            &repo.read_token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Release>().await.unwrap().version
}

/// The value of one metric in `/metrics` text.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Release records go by the policy: outside the newest `keep_releases` *and* older than
/// `keep_for`; the current release, the one before it and its rollback target always stay.
pub async fn retention_keeps_what_the_policy_says(repo: &Repo) {
    repo.create_app("keep").await;
    for i in 1..=8 {
        repo.deploy("keep", &sample_bundle("keep", &format!("v{i}")))
            .await;
    }
    let (sweeper, _) = repo.sweeper().await;
    let now = SystemTime::now();

    // Young releases are kept beyond keep_releases.
    let report = sweep(&sweeper, &policy(2, DAY, HOUR), now).await;
    assert_eq!(report.releases_deleted, 0, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(versions(repo, "keep").await, [8, 7, 6, 5, 4, 3, 2, 1]);

    // Exactly the newest three stay, and the list shows them.
    let report = sweep(&sweeper, &policy(3, Duration::ZERO, HOUR), now).await;
    assert_eq!(report.releases_deleted, 5, "{report:?}");
    assert_eq!(versions(repo, "keep").await, [8, 7, 6]);
    let r = repo
        .get("/v1/apps/keep/releases/5", &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A rollback's target stays beside the current and previous releases.
    let r = repo.rollback("keep", serde_json::json!({"to": 6})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v9: Release = r.json().await.unwrap();
    assert_eq!(
        (v9.version, v9.cause),
        (9, ReleaseCause::Rollback { to: 6 })
    );
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), now).await;
    assert_eq!(report.releases_deleted, 1, "{report:?}");
    assert_eq!(versions(repo, "keep").await, [9, 8, 6]);
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), now).await;
    assert_eq!(
        report.releases_deleted, 0,
        "a second sweep finds nothing more"
    );

    // Once a deploy follows, the old target is just old; keep_releases = 2 still keeps the
    // current release and the one before it.
    let v10 = repo.deploy("keep", &sample_bundle("keep", "v10")).await;
    assert_eq!(v10.version, 10);
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), now).await;
    assert_eq!(report.releases_deleted, 2, "{report:?}");
    assert_eq!(versions(repo, "keep").await, [10, 9]);
    assert_eq!(current_version(repo, "keep").await, 10);
    // A rollback without a target still finds the previous release.
    let r = repo.rollback("keep", serde_json::json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v11: Release = r.json().await.unwrap();
    assert_eq!(v11.cause, ReleaseCause::Rollback { to: 9 });
}

/// The pointer in `app.json` is a lower bound readers probe forward from: the record it names
/// and those above it stay, even outside the newest `keep_releases`.
pub async fn retention_never_breaks_the_pointer_probe(repo: &Repo) {
    repo.create_app("probe").await;
    let mut last = None;
    for i in 1..=3 {
        last = Some(
            repo.deploy("probe", &sample_bundle("probe", &format!("v{i}")))
                .await,
        );
    }
    let v3 = last.unwrap();
    let (sweeper, _) = repo.sweeper().await;
    // Records 4 to 6 as commits leave them when they crash before advancing the pointer.
    for version in 4..=6 {
        let record = Release {
            version,
            ..v3.clone()
        };
        sweeper
            .storage()
            .create(
                &format!("apps/probe/releases/{version}.json"),
                serde_json::to_vec(&record).unwrap().into(),
            )
            .await
            .unwrap();
    }
    assert_eq!(current_version(repo, "probe").await, 6);
    let report = sweep(
        &sweeper,
        &policy(2, Duration::ZERO, HOUR),
        SystemTime::now(),
    )
    .await;
    assert_eq!(report.releases_deleted, 2, "{report:?}");
    assert_eq!(versions(repo, "probe").await, [6, 5, 4, 3]);
    assert_eq!(current_version(repo, "probe").await, 6);
    let v7 = repo.deploy("probe", &sample_bundle("probe", "v7")).await;
    assert_eq!(v7.version, 7);
}

/// Bundles: kept while a release points to them or while younger than the grace (an upload
/// stores its bundle before committing), collected otherwise; the app stays deployable,
/// readable and can roll back to a kept release; the metrics count it all.
pub async fn unreferenced_bundles_are_collected_after_the_grace(repo: &Repo) {
    repo.create_app("gc").await;
    let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(|x| sample_bundle("gc", x));
    for bundle in [&a, &b, &a, &c, &d] {
        repo.deploy("gc", bundle).await;
    }
    let (sweeper, metrics) = repo.sweeper().await;
    // `e` as an upload leaves it between storing the bundle and committing its release.
    let spool = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spool.path(), &e).unwrap();
    sweeper
        .storage()
        .put_bundle(&sha256_hex(&e), spool.path(), e.len() as u64)
        .await
        .unwrap();

    let start = SystemTime::now();
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), start).await;
    assert!(
        report.bundles_swept && report.errors.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        (
            report.releases_deleted,
            report.bundles_deleted,
            report.bundles_kept
        ),
        (3, 0, 5),
        "young bundles stay, referenced or not"
    );
    for bundle in [&a, &b, &e] {
        assert_eq!(repo.download(&sha256_hex(bundle)).await.0, StatusCode::OK);
    }
    // The upload of `e` commits, finding its bundle stored.
    let v6 = repo.deploy("gc", &e).await;
    assert_eq!(v6.version, 6);

    // Two hours on: v4 goes (outside the newest two), and with it the last reference to `c`.
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), start + 2 * HOUR).await;
    assert!(
        report.bundles_swept && report.errors.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.releases_deleted, 1, "{report:?}");
    assert_eq!(report.bundles_deleted, 3, "{report:?}");
    let freed = (a.len() + b.len() + c.len()) as u64;
    let kept = (d.len() + e.len()) as u64;
    assert_eq!(report.bytes_freed, freed);
    assert_eq!((report.bundles_kept, report.bytes_kept), (2, kept));
    for bundle in [&a, &b, &c] {
        assert_eq!(
            repo.download(&sha256_hex(bundle)).await.0,
            StatusCode::NOT_FOUND
        );
    }
    for bundle in [&d, &e] {
        assert_eq!(
            repo.download(&sha256_hex(bundle)).await,
            (StatusCode::OK, bundle.clone())
        );
    }

    // A collected bundle is stored anew when deployed again; a kept release rolls back.
    let v7 = repo.deploy("gc", &a).await;
    assert_eq!(v7.version, 7);
    assert_eq!(
        repo.download(&sha256_hex(&a)).await,
        (StatusCode::OK, a.clone())
    );
    let r = repo.rollback("gc", serde_json::json!({"to": 5})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v8: Release = r.json().await.unwrap();
    assert_eq!(
        (v8.version, v8.cause, v8.bundle.sha256),
        (8, ReleaseCause::Rollback { to: 5 }, sha256_hex(&d))
    );
    assert_eq!(current_version(repo, "gc").await, 8);
    assert_eq!(versions(repo, "gc").await, [8, 7, 6, 5]);

    let text = metrics.render();
    assert_eq!(metric(&text, "apprepo_retention_sweeps_total"), 2);
    assert_eq!(metric(&text, "apprepo_releases_collected_total"), 4);
    assert_eq!(metric(&text, "apprepo_bundles_collected_total"), 3);
    assert_eq!(metric(&text, "apprepo_bundle_bytes_collected_total"), freed);
    assert_eq!(metric(&text, "apprepo_bundles"), 2);
    assert_eq!(metric(&text, "apprepo_bundle_bytes"), kept);
}

/// A release record that cannot be read stops the bundle phase: no bundle is collected on
/// partial knowledge, though release records of other apps still go by the policy.
pub async fn bundles_stay_when_a_release_record_cannot_be_read(repo: &Repo) {
    repo.create_app("whole").await;
    let [a, b, c] = ["a", "b", "c"].map(|x| sample_bundle("whole", x));
    for bundle in [&a, &b, &c] {
        repo.deploy("whole", bundle).await;
    }
    let (sweeper, metrics) = repo.sweeper().await;
    sweeper
        .storage()
        .create("apps/orphan/releases/1.json", "{ not json".into())
        .await
        .unwrap();
    let later = SystemTime::now() + 2 * HOUR;
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), later).await;
    assert_eq!(report.releases_deleted, 1, "{report:?}");
    assert!(!report.bundles_swept, "{report:?}");
    assert_eq!(report.bundles_deleted, 0);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("apps/orphan/releases/1.json")),
        "{report:?}"
    );
    assert_eq!(repo.download(&sha256_hex(&a)).await.0, StatusCode::OK);
    assert_eq!(versions(repo, "whole").await, [3, 2]);
    assert_eq!(
        metric(&metrics.render(), "apprepo_bundles_collected_total"),
        0
    );

    // Once the record is readable again (here: gone), the bundle phase runs.
    sweeper
        .storage()
        .delete("apps/orphan/releases/1.json")
        .await
        .unwrap();
    let report = sweep(&sweeper, &policy(2, Duration::ZERO, HOUR), later).await;
    assert!(report.bundles_swept, "{report:?}");
    assert_eq!(report.bundles_deleted, 1, "{report:?}");
    assert_eq!(
        repo.download(&sha256_hex(&a)).await.0,
        StatusCode::NOT_FOUND
    );
}

/// A commit never points at a bundle that is gone: it is refused with a sentence saying to
/// upload again, and the upload that follows stores the bundle anew.
pub async fn commits_refuse_a_bundle_that_is_gone(repo: &Repo) {
    repo.create_app("gone").await;
    let a = sample_bundle("gone", "a");
    repo.deploy("gone", &a).await;
    repo.deploy("gone", &sample_bundle("gone", "b")).await;
    let (sweeper, _) = repo.sweeper().await;
    sweeper
        .storage()
        .delete(&bundle_key(&sha256_hex(&a)))
        .await
        .unwrap();
    let r = repo.rollback("gone", serde_json::json!({"to": 1})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: px_proto::api::ErrorBody = r.json().await.unwrap();
    assert!(body.message.contains("upload it again"), "{}", body.message);
    assert_eq!(versions(repo, "gone").await, [2, 1]);
    assert_eq!(repo.deploy("gone", &a).await.version, 3);
    assert_eq!(repo.download(&sha256_hex(&a)).await, (StatusCode::OK, a));
}

/// Settings for [`periodic_sweeps_report_in_metrics`]: a sweep every second, keeping two
/// releases of any age, and bundles for the default grace.
pub fn frequent_retention(config: &mut Config) {
    config.retention = RetentionConfig {
        keep_releases: 2,
        keep_for: Duration::ZERO,
        interval: Duration::from_secs(1),
        ..RetentionConfig::default()
    };
}

/// The service sweeps on its own and reports it at `/metrics`, disk use included.
pub async fn periodic_sweeps_report_in_metrics(repo: &Repo) {
    repo.create_app("tick").await;
    let bundles: Vec<Vec<u8>> = (1..=4)
        .map(|i| sample_bundle("tick", &format!("v{i}")))
        .collect();
    for bundle in &bundles {
        repo.deploy("tick", bundle).await;
    }
    let stored: u64 = bundles.iter().map(|b| b.len() as u64).sum();
    // Sweeps run whenever they do; wait (boundedly) for one that saw all four deploys.
    let mut text = String::new();
    for _ in 0..600 {
        text = repo.metrics().await;
        if metric(&text, "apprepo_releases_collected_total") == 2
            && metric(&text, "apprepo_bundles") == 4
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&text, "apprepo_releases_collected_total"),
        2,
        "{text}"
    );
    assert_eq!(metric(&text, "apprepo_bundles"), 4, "{text}");
    assert_eq!(metric(&text, "apprepo_bundle_bytes"), stored, "{text}");
    assert!(
        metric(&text, "apprepo_retention_sweeps_total") >= 1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "apprepo_bundles_collected_total"),
        0,
        "{text}"
    );
    assert_eq!(versions(repo, "tick").await, [4, 3]);
    // Within the grace, the bundles of the collected releases are still served.
    for bundle in &bundles {
        assert_eq!(repo.download(&sha256_hex(bundle)).await.0, StatusCode::OK);
    }
}

/// Packs the sample app with a Procfile naming `types` beside `web`.
fn bundle_with_types(name: &str, types: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    let mut procfile = String::from("web: python3 server.py\n");
    for kind in types {
        procfile.push_str(&format!("{kind}: python3 server.py\n"));
    }
    std::fs::write(dir.path().join("Procfile"), procfile).unwrap();
    let mut out = Vec::new();
    px_bundle::pack_dir(dir.path(), &mut out).unwrap();
    out
}

impl Repo {
    /// `PUT /v1/apps/{app}/formation` with `body` as the deploy token.
    pub async fn scale(&self, app: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .put(format!("{}/v1/apps/{app}/formation", self.url))
            .bearer_auth(&self.deploy_token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The formation as `type=count` pairs, `web` first, each marked `*` when set explicitly.
    pub async fn formation(&self, app: &str) -> Vec<String> {
        let r = self
            .get(&format!("/v1/apps/{app}/formation"), &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let formation: Formation = r.json().await.unwrap();
        formation
            .processes
            .iter()
            .map(|e| {
                let mark = if e.explicit { "*" } else { "" };
                format!("{}={}{mark}", e.process, e.count)
            })
            .collect()
    }
}

/// Asserts that `response` is a 400 whose message contains `expected`.
async fn refused(response: reqwest::Response, expected: &str) {
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: ErrorBody = response.json().await.unwrap();
    assert!(
        body.message.contains(expected),
        "{:?} does not say {expected:?}",
        body.message
    );
}

/// `em scale`'s path: the formation's defaults, changes of only the named types, refusals
/// that say what to fix, no release made, and the counts in `GET /v1/apps` for Beacon.
pub async fn formation(repo: &Repo) {
    repo.create_app("shop").await;
    let before = repo.scale("shop", serde_json::json!({"web": 2})).await;
    assert_eq!(before.status(), StatusCode::NOT_FOUND);
    assert!(before.text().await.unwrap().contains("em deploy"));

    repo.deploy("shop", &bundle_with_types("shop", &["worker"]))
        .await;
    assert_eq!(repo.formation("shop").await, ["web=1", "worker=1"]);

    let r = repo.scale("shop", serde_json::json!({"worker": 3})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(repo.formation("shop").await, ["web=1", "worker=3*"]);
    let r = repo.scale("shop", serde_json::json!({"web": 2})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answered: Formation = r.json().await.unwrap();
    assert_eq!(answered.release, Some(1));
    assert_eq!(repo.formation("shop").await, ["web=2*", "worker=3*"]);
    let r = repo.scale("shop", serde_json::json!({"worker": 0})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(repo.formation("shop").await, ["web=2*", "worker=0*"]);

    // Refused, each saying what to fix, and nothing changed.
    refused(
        repo.scale("shop", serde_json::json!({"nosuch": 1})).await,
        "no process type \"nosuch\"; its types are web, worker",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!({"worker": 1000}))
            .await,
        "limit of 100 processes of one type",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!({"web": 65})).await,
        "limit of 64 web instances per web server",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!({"web": 0})).await,
        "web=0 would leave",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!({"worker": -1})).await,
        "expected counts by process type",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!(["worker", 2])).await,
        "expected counts by process type",
    )
    .await;
    refused(
        repo.scale("shop", serde_json::json!({})).await,
        "nothing to scale",
    )
    .await;
    let many: serde_json::Map<String, serde_json::Value> =
        (0..40).map(|n| (format!("t{n}"), 1.into())).collect();
    refused(
        repo.scale("shop", serde_json::Value::Object(many)).await,
        "at most 33 process types per change",
    )
    .await;
    let read_only = repo
        .http
        .put(format!("{}/v1/apps/shop/formation", repo.url))
        .bearer_auth(&repo.read_token)
        .json(&serde_json::json!({"worker": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(read_only.status(), StatusCode::FORBIDDEN);
    assert_eq!(repo.formation("shop").await, ["web=2*", "worker=0*"]);

    // Scaling made no release; Beacon reads the counts with the apps.
    assert_eq!(repo.releases("shop").await.len(), 1);
    let apps: Vec<App> = repo
        .get("/v1/apps", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let shop = apps.iter().find(|a| a.name == "shop").unwrap();
    assert_eq!(
        shop.formation
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["web=2", "worker=0"]
    );

    // A new release keeps the counts of the types it still has.
    repo.deploy("shop", &bundle_with_types("shop", &["worker", "clock"]))
        .await;
    assert_eq!(
        repo.formation("shop").await,
        ["web=2*", "clock=1", "worker=0*"]
    );
}

/// Many `em scale` calls at once, each of another type: every change is kept.
pub async fn concurrent_scales(repo: &Repo) {
    const TYPES: u32 = 8;
    let names: Vec<String> = (1..=TYPES).map(|n| format!("t{n}")).collect();
    repo.create_app("busy").await;
    let kinds: Vec<&str> = names.iter().map(String::as_str).collect();
    repo.deploy("busy", &bundle_with_types("busy", &kinds))
        .await;
    let scales = names.iter().zip(1..).map(|(kind, count)| {
        let body = serde_json::json!({ kind.as_str(): count + 1 });
        async move { repo.scale("busy", body).await.status() }
    });
    for status in futures_util::future::join_all(scales).await {
        assert_eq!(status, StatusCode::OK);
    }
    let mut expected = vec!["web=1".to_string()];
    let mut sorted: Vec<(String, u32)> = names.iter().cloned().zip(2..).collect();
    sorted.sort();
    expected.extend(sorted.iter().map(|(k, c)| format!("{k}={c}*")));
    assert_eq!(repo.formation("busy").await, expected);
}
