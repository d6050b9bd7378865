//! Build scenarios every storage backend must pass, run by `builds_fs.rs` and `builds_s3.rs`:
//! an upload that needs a build, the layers a node uploads, the finish that commits the
//! release, failures, supersession, roles, and retention of layers and build records.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use px_proto::api::{ErrorBody, Release, ReleaseCause};
use px_proto::build::{
    Build, BuildFailed, BuildFinished, BuildOutput, BuildQueued, BuildResult, LayerKind, LayerRef,
};
use px_repository::internals::{Policy, sweep};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, ETAG};

use super::{Repo, built_bundle, layer, sample_bundle, sha256_hex};

const HOUR: Duration = Duration::from_secs(3600);

/// The runtime, dependencies and app layers of one build, different for each `tag`.
pub fn layers(tag: &str) -> Vec<(LayerKind, Vec<u8>)> {
    vec![
        (
            LayerKind::Runtime,
            layer(".px/runtime/bin/python3", &format!("python {tag}")),
        ),
        (
            LayerKind::Dependencies,
            layer(".px/deps/lib/gunicorn.py", &format!("gunicorn {tag}")),
        ),
        (LayerKind::App, layer("server.py", &format!("app {tag}"))),
    ]
}

/// What a builder reports for build `number` that made `layers`.
pub fn output(number: u64, layers: &[(LayerKind, Vec<u8>)]) -> BuildOutput {
    BuildOutput {
        build: number,
        layers: layers
            .iter()
            .map(|(kind, bytes)| LayerRef {
                kind: *kind,
                sha256: sha256_hex(bytes),
                size: bytes.len() as u64,
            })
            .collect(),
        path: vec![".px/deps/bin".into(), ".px/runtime/bin".into()],
        env: BTreeMap::from([("PYTHONUSERBASE".into(), "{release}/.px/deps".into())]),
        runtime: Some("python3 3.12.1".into()),
        commands: vec!["python3".into()],
    }
}

impl Repo {
    /// Uploads `bundle`, which must become a pending build (202).
    pub async fn queue(&self, app: &str, bundle: &[u8]) -> Build {
        let r = self
            .upload_request(app, bundle, &self.deploy_token)
            .header(px_proto::api::HEADER_DESCRIPTION, "add gunicorn")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        r.json::<BuildQueued>().await.unwrap().build
    }

    pub async fn put_layer(&self, bytes: &[u8], token: &str) -> reqwest::Response {
        self.put_layer_at(&sha256_hex(bytes), bytes, token).await
    }

    pub async fn put_layer_at(&self, sha256: &str, bytes: &[u8], token: &str) -> reqwest::Response {
        self.http
            .put(format!("{}/v1/layers/{sha256}", self.url))
            .bearer_auth(token)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap()
    }

    pub async fn head_layer(&self, sha256: &str) -> reqwest::Response {
        self.http
            .head(format!("{}/v1/layers/{sha256}", self.url))
            .bearer_auth(&self.build_token)
            .send()
            .await
            .unwrap()
    }

    /// Uploads each layer as a builder does: only those `HEAD` says are missing.
    pub async fn upload_layers(&self, layers: &[(LayerKind, Vec<u8>)]) {
        for (_, bytes) in layers {
            if self.head_layer(&sha256_hex(bytes)).await.status() == StatusCode::OK {
                continue;
            }
            let r = self.put_layer(bytes, &self.build_token).await;
            assert_eq!(
                r.status(),
                StatusCode::CREATED,
                "{}",
                r.text().await.unwrap()
            );
        }
    }

    pub async fn download_layer(&self, sha256: &str) -> (StatusCode, Vec<u8>) {
        let r = self
            .get(&format!("/v1/layers/{sha256}"), &self.read_token)
            .send()
            .await
            .unwrap();
        (r.status(), r.bytes().await.unwrap().to_vec())
    }

    pub async fn finish_as(
        &self,
        app: &str,
        number: u64,
        body: &BuildFinished,
        token: &str,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/apps/{app}/builds/{number}/finish", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn finish(&self, app: &str, number: u64, body: &BuildFinished) -> reqwest::Response {
        self.finish_as(app, number, body, &self.build_token).await
    }

    pub async fn fail(&self, app: &str, number: u64, body: &BuildFailed) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/apps/{app}/builds/{number}/fail", self.url))
            .bearer_auth(&self.build_token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn pending_builds(&self) -> Vec<Build> {
        let r = self
            .get("/v1/builds?pending=true", &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn build_record(&self, app: &str, number: u64) -> Build {
        let r = self
            .get(&format!("/v1/apps/{app}/builds/{number}"), &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn build_log(&self, app: &str, number: u64) -> (StatusCode, String) {
        let r = self
            .get(
                &format!("/v1/apps/{app}/builds/{number}/log"),
                &self.read_token,
            )
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }
}

async fn conflict(r: reqwest::Response) -> String {
    assert_eq!(r.status(), StatusCode::CONFLICT);
    r.json::<ErrorBody>().await.unwrap().message
}

fn finished(number: u64, layers: &[(LayerKind, Vec<u8>)]) -> BuildFinished {
    BuildFinished {
        output: output(number, layers),
        log: format!("Installing gunicorn\nbuild {number} done\n"),
    }
}

/// Upload → 202 and a pending build → layers (HEAD before and after) → finish → a release with
/// its layers; a config change and a rollback keep them; the build's record, result and log.
pub async fn build_lifecycle(repo: &Repo) {
    repo.create_app("shop").await;
    let source = built_bundle("shop", "one");
    let build = repo.queue("shop", &source).await;
    assert_eq!(
        (build.app.as_str(), build.number, build.result.as_ref()),
        ("shop", 1, None)
    );
    assert_eq!(build.source.sha256, sha256_hex(&source));
    assert_eq!(build.description, "add gunicorn");
    assert_eq!(build.created_by, "ci");
    assert!(repo.releases("shop").await.is_empty(), "no release yet");
    assert_eq!(repo.pending_builds().await, vec![build.clone()]);
    // The source is served to the builder like any bundle.
    assert_eq!(
        repo.download(&build.source.sha256).await,
        (StatusCode::OK, source.clone())
    );

    let made = layers("one");
    let first = sha256_hex(&made[0].1);
    assert_eq!(
        repo.head_layer(&first).await.status(),
        StatusCode::NOT_FOUND
    );
    repo.upload_layers(&made).await;
    let head = repo.head_layer(&first).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[CONTENT_LENGTH].to_str().unwrap(),
        made[0].1.len().to_string()
    );
    // Stored once: the same layer again is answered 200.
    let again = repo.put_layer(&made[0].1, &repo.build_token).await;
    assert_eq!(again.status(), StatusCode::OK);
    let r = repo
        .get(&format!("/v1/layers/{first}"), &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[ETAG].to_str().unwrap(), format!("\"{first}\""));
    assert_eq!(r.bytes().await.unwrap().as_ref(), &made[0].1[..]);

    let r = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let v1: Release = r.json().await.unwrap();
    assert_eq!(v1.version, 1);
    assert_eq!(v1.cause, ReleaseCause::Deploy);
    assert_eq!(v1.bundle, build.source);
    assert_eq!(v1.manifest, build.manifest);
    assert_eq!(v1.description, "add gunicorn");
    assert_eq!(v1.created_by, "ci", "the release is the uploader's deploy");
    assert_eq!(v1.build, Some(output(1, &made)));
    assert!(repo.pending_builds().await.is_empty());
    let done = repo.build_record("shop", 1).await;
    assert_eq!(done.result, Some(BuildResult::Succeeded { release: 1 }));
    assert_eq!(
        repo.build_log("shop", 1).await,
        (StatusCode::OK, "Installing gunicorn\nbuild 1 done\n".into())
    );
    let listed: Vec<Build> = repo
        .get("/v1/apps/shop/builds", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, vec![done]);

    // A config change and a rollback reuse the build: nothing rebuilds.
    let r = repo
        .http
        .patch(format!("{}/v1/apps/shop/config", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&serde_json::json!({"set": {"WORKERS": "4"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v2: Release = r.json().await.unwrap();
    assert_eq!(v2.build, v1.build);
    assert_eq!(v2.config["WORKERS"], "4");
    let v3 = repo.deploy("shop", &sample_bundle("shop", "plain")).await;
    assert_eq!((v3.version, v3.build.as_ref()), (3, None));
    let r = repo.rollback("shop", serde_json::json!({"to": 2})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v4: Release = r.json().await.unwrap();
    assert_eq!(v4.cause, ReleaseCause::Rollback { to: 2 });
    assert_eq!(v4.build, v1.build);
    assert_eq!(v4.bundle, v1.bundle);
    assert!(repo.pending_builds().await.is_empty(), "nothing rebuilds");
}

/// A finish naming a layer that is not stored is refused, naming it, and commits nothing.
pub async fn finish_needs_every_layer(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let made = layers("one");
    let missing = sha256_hex(&made[1].1);
    repo.put_layer(&made[0].1, &repo.build_token).await;
    repo.put_layer(&made[2].1, &repo.build_token).await;
    let message = conflict(repo.finish("shop", 1, &finished(1, &made)).await).await;
    assert!(message.contains(&missing), "{message}");
    assert!(repo.releases("shop").await.is_empty());
    assert_eq!(
        repo.pending_builds().await.len(),
        1,
        "the build still waits"
    );
    assert_eq!(repo.build_log("shop", 1).await.0, StatusCode::NOT_FOUND);

    // Once the layer is there, the same finish commits.
    repo.upload_layers(&made).await;
    let r = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
}

/// A finish repeated (a retry after a lost answer) answers the same release; a finish with
/// other layers is refused; one release in all.
pub async fn finish_twice_answers_the_same_release(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let made = layers("one");
    repo.upload_layers(&made).await;
    let first = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Release = first.json().await.unwrap();
    let second = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.json::<Release>().await.unwrap(), first);
    let other = layers("other");
    repo.upload_layers(&other).await;
    let message = conflict(repo.finish("shop", 1, &finished(1, &other)).await).await;
    assert!(message.contains("already finished as v1"), "{message}");

    // A finish that stopped after its commit, before recording the result: the next finish
    // finds the release its build made, records the result, and commits nothing more.
    let (storage, _) = repo.sweeper().await;
    storage
        .storage()
        .delete("apps/shop/builds/1.result.json")
        .await
        .unwrap();
    assert_eq!(repo.pending_builds().await.len(), 1);
    let message = conflict(repo.finish("shop", 1, &finished(1, &other)).await).await;
    assert!(message.contains("with other layers"), "{message}");
    assert_eq!(
        repo.build_record("shop", 1).await.result,
        Some(BuildResult::Succeeded { release: 1 })
    );
    let again = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Release>().await.unwrap(), first);
    assert_eq!(repo.releases("shop").await, vec![first]);
}

/// A failure records its reason and log; nothing becomes a release, and the build can no
/// longer finish.
pub async fn fail_records_the_result_and_the_log(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let failure = BuildFailed {
        reason: "uv could not find gunicorn==99: no such version".into(),
        log: "Resolving dependencies\nerror: gunicorn==99 not found\n".into(),
    };
    let r = repo.fail("shop", 1, &failure).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let failed: Build = r.json().await.unwrap();
    let result = Some(BuildResult::Failed {
        reason: failure.reason.clone(),
    });
    assert_eq!(failed.result, result);
    assert_eq!(repo.build_record("shop", 1).await.result, result);
    assert_eq!(
        repo.build_log("shop", 1).await,
        (StatusCode::OK, failure.log.clone())
    );
    assert!(repo.pending_builds().await.is_empty());
    // Reported again (a retry): the same answer.
    let r = repo.fail("shop", 1, &failure).await;
    assert_eq!(r.status(), StatusCode::OK);
    let made = layers("one");
    repo.upload_layers(&made).await;
    let message = conflict(repo.finish("shop", 1, &finished(1, &made)).await).await;
    assert!(message.contains("already failed"), "{message}");
    assert!(repo.releases("shop").await.is_empty());
}

/// A log longer than what is kept (a build printing without end) keeps its last lines, within
/// a body the finish and failure endpoints accept.
pub async fn a_long_log_keeps_its_tail(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let line = "Collecting gunicorn from the index, downloading and unpacking its wheel\n";
    let max = px_proto::build::MAX_BUILD_LOG_BYTES;
    let mut log = line.repeat(2 * max / line.len());
    log.push_str("error: no space left on device\n");
    let failure = BuildFailed {
        reason: "the build filled its disk".into(),
        log: log.clone(),
    };
    let r = repo.fail("shop", 1, &failure).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let (status, stored) = repo.build_log("shop", 1).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored.len(), max);
    assert!(log.ends_with(&stored));
    assert!(stored.ends_with("error: no space left on device\n"));
}

/// The latest upload wins: a newer build supersedes a pending one, a plain upload supersedes
/// every pending build, and a late finish of a superseded build commits nothing and says what
/// superseded it.
pub async fn newer_uploads_supersede_pending_builds(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let second = repo.queue("shop", &built_bundle("shop", "two")).await;
    assert_eq!(second.number, 2);
    assert_eq!(
        repo.build_record("shop", 1).await.result,
        Some(BuildResult::Superseded {
            by: "build 2".into()
        })
    );
    assert_eq!(repo.pending_builds().await, vec![second]);
    let v1 = repo.deploy("shop", &sample_bundle("shop", "plain")).await;
    assert_eq!(
        repo.build_record("shop", 2).await.result,
        Some(BuildResult::Superseded { by: "v1".into() })
    );
    assert!(repo.pending_builds().await.is_empty());

    let made = layers("late");
    repo.upload_layers(&made).await;
    let message = conflict(repo.finish("shop", 1, &finished(1, &made)).await).await;
    assert!(message.contains("superseded by build 2"), "{message}");
    let message = conflict(repo.finish("shop", 2, &finished(2, &made)).await).await;
    assert!(message.contains("superseded by v1"), "{message}");
    assert_eq!(repo.releases("shop").await, vec![v1]);
}

/// A plain upload committed after a build was queued wins even when the superseding step
/// never ran (another repository stopped between its commit and it): the late finish finds the
/// newer release itself and records the build superseded.
pub async fn a_late_finish_finds_the_newer_upload_itself(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let v1 = repo.deploy("shop", &sample_bundle("shop", "plain")).await;
    // That deploy superseded build 1; take back the record of it, as if the repository that
    // committed v1 had stopped before its superseding step.
    let (other, _) = repo.sweeper().await;
    for suffix in ["result.json", "claim.json"] {
        other
            .storage()
            .delete(&format!("apps/shop/builds/1.{suffix}"))
            .await
            .unwrap();
    }
    assert_eq!(repo.pending_builds().await.len(), 1);
    let made = layers("late");
    repo.upload_layers(&made).await;
    let message = conflict(repo.finish("shop", 1, &finished(1, &made)).await).await;
    assert!(message.contains("superseded by v1"), "{message}");
    assert_eq!(
        repo.build_record("shop", 1).await.result,
        Some(BuildResult::Superseded { by: "v1".into() })
    );
    assert_eq!(repo.releases("shop").await, vec![v1]);
}

/// What each role may do with builds and layers: `build` finishes and uploads layers but never
/// deploys; `read` and `deploy` never upload layers or finish builds.
pub async fn roles_keep_builders_and_deployers_apart(repo: &Repo) {
    repo.create_app("shop").await;
    repo.queue("shop", &built_bundle("shop", "one")).await;
    let made = layers("one");
    for token in [&repo.read_token, &repo.deploy_token] {
        let r = repo.put_layer(&made[0].1, token).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        repo.head_layer(&sha256_hex(&made[0].1)).await.status(),
        StatusCode::NOT_FOUND,
        "a refused layer is not stored"
    );
    repo.upload_layers(&made).await;
    for token in [&repo.read_token, &repo.deploy_token] {
        let r = repo.finish_as("shop", 1, &finished(1, &made), token).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let message = r.json::<ErrorBody>().await.unwrap().message;
        assert!(message.contains("needs a build token"), "{message}");
    }
    assert!(repo.releases("shop").await.is_empty());

    let build = &repo.build_token;
    let r = repo
        .upload_request("shop", &sample_bundle("shop", "x"), build)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a builder cannot deploy");
    let r = repo
        .http
        .post(format!("{}/v1/apps", repo.url))
        .bearer_auth(build)
        .json(&serde_json::json!({"name": "other"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // It may finish, and then it reads what any reader may.
    let r = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = repo
        .http
        .patch(format!("{}/v1/apps/shop/config", repo.url))
        .bearer_auth(build)
        .json(&serde_json::json!({"set": {"A": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = repo
        .http
        .post(format!("{}/v1/apps/shop/rollback", repo.url))
        .bearer_auth(build)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = repo
        .get("/v1/apps/shop/releases", build)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(repo.releases("shop").await.len(), 1);
}

/// A layer whose bytes are not its digest, whose entries are hostile, or over the limit,
/// stores nothing.
pub async fn bad_layers_store_nothing(repo: &Repo) {
    let good = layer("server.py", "print('hi')");
    let wrong = "a".repeat(64);
    let r = repo.put_layer_at(&wrong, &good, &repo.build_token).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "digest_mismatch");
    assert!(
        body.message.contains(&sha256_hex(&good)),
        "{}",
        body.message
    );
    assert_eq!(
        repo.head_layer(&wrong).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        repo.head_layer(&sha256_hex(&good)).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = repo
        .put_layer_at("not-a-digest", &good, &repo.build_token)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A layer is checked entry by entry, as bundles are: nothing may leave its directory, and
    // what is no archive at all is refused.
    let hostile = super::raw_bundle(&[super::Raw::File("../escape", b"x")]);
    let r = repo.put_layer(&hostile, &repo.build_token).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "invalid_bundle");
    assert!(body.message.contains("invalid layer"), "{}", body.message);
    assert!(body.message.contains("../escape"), "{}", body.message);
    let garbage = b"not a layer at all".to_vec();
    let r = repo.put_layer(&garbage, &repo.build_token).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    for bytes in [&hostile, &garbage] {
        assert_eq!(
            repo.head_layer(&sha256_hex(bytes)).await.status(),
            StatusCode::NOT_FOUND
        );
    }

    // Over the limit (the tests' repositories allow 1 MiB): refused, nothing stored.
    let big: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sent = repo
        .http
        .put(format!("{}/v1/layers/{}", repo.url, sha256_hex(&big)))
        .bearer_auth(&repo.build_token)
        .body(big.clone())
        .send()
        .await;
    // The answer comes before the body is read, and the connection closes: the client may
    // see the answer or only the closed connection. Either way nothing is stored.
    if let Ok(r) = sent {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(r.text().await.unwrap().contains("max_bundle_bytes"));
    }
    assert_eq!(
        repo.head_layer(&sha256_hex(&big)).await.status(),
        StatusCode::NOT_FOUND
    );
    repo.assert_spool_empties().await;
}

/// Settings for [`bad_layers_store_nothing`].
pub fn small_limit(config: &mut px_repository::config::Config) {
    config.limits.max_bundle_bytes = 1024 * 1024;
}

fn policy(keep_releases: usize) -> Policy {
    Policy {
        keep_releases,
        keep_for: Duration::ZERO,
        bundle_grace: HOUR,
        condemn_wait: Duration::ZERO,
    }
}

/// Layers are collected like bundles: kept while a release names them (a rollback target
/// included), deleted once none does and they are past the grace; build records go with the
/// releases; the source of a pending build is never collected.
pub async fn retention_collects_layers_and_builds(repo: &Repo) {
    repo.create_app("shop").await;
    let made = layers("one");
    repo.queue("shop", &built_bundle("shop", "one")).await;
    repo.upload_layers(&made).await;
    let r = repo.finish("shop", 1, &finished(1, &made)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // A layer a builder uploaded for a build that then failed: nothing names it.
    let stray = layer("stray.txt", "never named");
    repo.put_layer(&stray, &repo.build_token).await;
    repo.deploy("shop", &sample_bundle("shop", "v2")).await;
    repo.deploy("shop", &sample_bundle("shop", "v3")).await;
    let r = repo.rollback("shop", serde_json::json!({"to": 1})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let (sweeper, metrics) = repo.sweeper().await;
    let start = SystemTime::now();

    // v2 goes (v4, v3 and the rollback's target v1 stay); within the grace, every layer stays.
    let report = sweep(&sweeper, &policy(2), start).await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.releases_deleted, 1, "{report:?}");
    assert!(report.layers_swept, "{report:?}");
    assert_eq!((report.layers_deleted, report.layers_kept), (0, 4));

    // Past the grace the stray layer goes; the build's layers stay, named by v1 and v4.
    let report = sweep(&sweeper, &policy(2), start + 2 * HOUR).await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.releases_deleted, 0, "{report:?}");
    assert_eq!((report.layers_deleted, report.layers_kept), (1, 3));
    assert_eq!(report.layer_bytes_freed, stray.len() as u64);
    assert_eq!(
        repo.download_layer(&sha256_hex(&stray)).await.0,
        StatusCode::NOT_FOUND
    );
    for (_, bytes) in &made {
        assert_eq!(
            repo.download_layer(&sha256_hex(bytes)).await,
            (StatusCode::OK, bytes.clone())
        );
    }
    assert_eq!(report.builds_deleted, 0);

    // A pending build's source is kept however old, and so is its record.
    let pending_source = built_bundle("shop", "pending");
    repo.queue("shop", &pending_source).await;
    repo.deploy("shop", &sample_bundle("shop", "v5")).await;
    // v5 superseded build 2, and v6 supersedes build 3; build 4 stays pending.
    let waiting = repo.queue("shop", &built_bundle("shop", "waiting")).await;
    assert_eq!(waiting.number, 3);
    repo.deploy("shop", &sample_bundle("shop", "v6")).await;
    let third = built_bundle("shop", "third");
    let pending = repo.queue("shop", &third).await;
    assert_eq!(pending.number, 4);
    let report = sweep(&sweeper, &policy(2), start + 4 * HOUR).await;
    assert!(report.errors.is_empty(), "{report:?}");
    // v6 and v5 stay; v4, v3 and v1 go, and with them the last names of the build's layers.
    assert_eq!(report.releases_deleted, 3, "{report:?}");
    assert_eq!(report.layers_deleted, 3, "{report:?}");
    for (_, bytes) in &made {
        assert_eq!(
            repo.download_layer(&sha256_hex(bytes)).await.0,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(repo.download(&sha256_hex(&third)).await.0, StatusCode::OK);
    assert_eq!(
        repo.download(&sha256_hex(&pending_source)).await.0,
        StatusCode::NOT_FOUND,
        "a superseded build's source goes like any unreferenced bundle"
    );
    // Builds 3 and 4 are the newest two; 1 and 2 go.
    assert_eq!(report.builds_deleted, 2, "{report:?}");
    let numbers: Vec<u64> = repo
        .get("/v1/apps/shop/builds", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json::<Vec<Build>>()
        .await
        .unwrap()
        .iter()
        .map(|b| b.number)
        .collect();
    assert_eq!(numbers, [4, 3]);
    assert_eq!(repo.pending_builds().await, vec![pending]);
    assert_eq!(repo.build_log("shop", 1).await.0, StatusCode::NOT_FOUND);

    let text = metrics.render();
    assert_eq!(
        super::suite::metric(&text, "apprepo_layers_collected_total"),
        4
    );
    assert_eq!(
        super::suite::metric(&text, "apprepo_build_records_collected_total"),
        2
    );
    assert_eq!(super::suite::metric(&text, "apprepo_layers"), 0);
}

/// Two repositories over one storage finish the same build at once (a retry that went to the
/// other one): one release, both answered with it.
pub async fn two_repositories_finish_one_build(first: &Repo, second: &Repo) {
    first.create_app("shop").await;
    first.queue("shop", &built_bundle("shop", "one")).await;
    let made = layers("one");
    first.upload_layers(&made).await;
    let body = finished(1, &made);
    let (a, b) = tokio::join!(
        first.finish("shop", 1, &body),
        second.finish_as("shop", 1, &body, &first.build_token)
    );
    let mut statuses = vec![a.status(), b.status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    let a: Release = a.json().await.unwrap();
    let b: Release = b.json().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(first.releases("shop").await, vec![a]);
    assert_eq!(
        first.build_record("shop", 1).await.result,
        Some(BuildResult::Succeeded { release: 1 })
    );
}
