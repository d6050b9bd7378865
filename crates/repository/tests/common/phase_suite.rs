//! Release phases, backend-agnostic: a deploy with a `release:` command waits for its phase
//! before it serves, a phase is claimed exactly once, and how it ends decides what serves.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use px_proto::api::{App, PhaseState, Release};
use reqwest::StatusCode;
use serde_json::json;

use super::Repo;

/// The sample app with a Procfile naming a release phase; `extra` makes bundles differ.
pub fn phase_bundle(name: &str, extra: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    std::fs::write(dir.path().join("extra.txt"), extra).unwrap();
    std::fs::write(
        dir.path().join("Procfile"),
        "web: python3 server.py\nrelease: python3 migrate.py\n",
    )
    .unwrap();
    let mut out = Vec::new();
    px_bundle::pack_dir(dir.path(), &mut out).unwrap();
    out
}

impl Repo {
    pub async fn app(&self, app: &str) -> App {
        let r = self
            .get(&format!("/v1/apps/{app}"), &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    pub async fn current_version(&self, app: &str) -> Option<u64> {
        self.app(app).await.current.map(|r| r.version)
    }

    pub async fn release_state(&self, app: &str, version: u64) -> PhaseState {
        let r = self
            .get(
                &format!("/v1/apps/{app}/releases/{version}"),
                &self.read_token,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let release: Release = r.json().await.unwrap();
        release.phase.expect("the release has a phase").state
    }

    pub async fn unended_phases(&self) -> Vec<(String, u64)> {
        let r = self
            .get("/v1/phases", &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let releases: Vec<Release> = r.json().await.unwrap();
        releases.into_iter().map(|r| (r.app, r.version)).collect()
    }

    pub async fn claim_phase(
        &self,
        app: &str,
        version: u64,
        node: &str,
        attempt: &str,
        token: &str,
    ) -> reqwest::Response {
        self.http
            .post(format!(
                "{}/v1/apps/{app}/releases/{version}/phase/claim",
                self.url
            ))
            .bearer_auth(token)
            .json(&json!({ "node": node, "attempt": attempt }))
            .send()
            .await
            .unwrap()
    }

    pub async fn end_phase(
        &self,
        app: &str,
        version: u64,
        attempt: &str,
        outcome: serde_json::Value,
        log: &str,
    ) -> reqwest::Response {
        self.http
            .post(format!(
                "{}/v1/apps/{app}/releases/{version}/phase/end",
                self.url
            ))
            .bearer_auth(&self.build_token)
            .json(&json!({ "attempt": attempt, "outcome": outcome, "log": log }))
            .send()
            .await
            .unwrap()
    }

    pub async fn phase_log(&self, app: &str, version: u64) -> (StatusCode, String) {
        let r = self
            .get(
                &format!("/v1/apps/{app}/releases/{version}/phase/log"),
                &self.read_token,
            )
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }
}

fn succeeded() -> serde_json::Value {
    json!({ "outcome": "succeeded" })
}

fn failed(reason: &str) -> serde_json::Value {
    json!({ "outcome": "failed", "reason": reason })
}

/// v1 serves; v2 names a release phase and waits for it; its claim and success make it serve.
pub async fn a_phase_gates_its_release(repo: &Repo) {
    repo.create_app("hello").await;
    let v1 = repo
        .deploy("hello", &super::sample_bundle("hello", "1"))
        .await;
    assert_eq!(
        v1.phase, None,
        "a release without a release command has no phase"
    );
    let v2 = repo.deploy("hello", &phase_bundle("hello", "2")).await;
    let phase = v2.phase.clone().expect("v2 names a release phase");
    assert_eq!(phase.command, "python3 migrate.py");
    assert_eq!(phase.timeout_secs, 600, "the default timeout");
    assert_eq!(phase.state, PhaseState::Pending);
    assert_eq!(
        repo.current_version("hello").await,
        Some(1),
        "v1 still serves"
    );
    assert_eq!(repo.unended_phases().await, vec![("hello".to_string(), 2)]);

    let token = repo.build_token.clone();
    let r = repo.claim_phase("hello", 2, "node-a", "a1", &token).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let claimed: Release = r.json().await.unwrap();
    assert!(
        matches!(&claimed.phase.unwrap().state, PhaseState::Running { node, .. } if node == "node-a")
    );
    // A retry of the same claim (its answer was lost) wins again; another attempt does not.
    let r = repo.claim_phase("hello", 2, "node-a", "a1", &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = repo.claim_phase("hello", 2, "node-a", "a2", &token).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("claimed by node-a"));
    assert_eq!(
        repo.current_version("hello").await,
        Some(1),
        "running is not serving"
    );
    assert_eq!(
        repo.unended_phases().await,
        vec![("hello".to_string(), 2)],
        "a running phase is still listed, so Beacon keeps it on its node"
    );

    // Only the claimant reports a success.
    let r = repo.end_phase("hello", 2, "a2", succeeded(), "").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = repo
        .end_phase(
            "hello",
            2,
            "a1",
            succeeded(),
            "Applying notes.0001_initial... OK\n",
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(repo.release_state("hello", 2).await, PhaseState::Succeeded);
    assert_eq!(
        repo.current_version("hello").await,
        Some(2),
        "v2 serves now"
    );
    assert!(repo.unended_phases().await.is_empty());
    let (status, log) = repo.phase_log("hello", 2).await;
    assert_eq!(status, StatusCode::OK);
    assert!(log.contains("Applying notes.0001_initial... OK"), "{log}");
    // Ended: no second run, and a repeated report of the same end changes nothing.
    let r = repo.claim_phase("hello", 2, "node-b", "b1", &token).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("succeeded"));
}

/// A failed phase keeps the old release serving; config changes and rollbacks start from the
/// release that serves and run no phase, and a release that never served is no rollback target.
pub async fn a_failed_phase_keeps_the_old_release(repo: &Repo) {
    repo.create_app("hello").await;
    repo.deploy("hello", &super::sample_bundle("hello", "1"))
        .await;
    repo.deploy("hello", &phase_bundle("hello", "2")).await;
    let token = repo.build_token.clone();
    let r = repo.claim_phase("hello", 2, "node-a", "a1", &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = repo
        .end_phase(
            "hello",
            2,
            "a1",
            failed("the release command exited with status 1"),
            "django.db.utils.OperationalError: no such table\n",
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(
        repo.release_state("hello", 2).await,
        PhaseState::Failed {
            reason: "the release command exited with status 1".into()
        }
    );
    assert_eq!(repo.current_version("hello").await, Some(1));
    assert!(repo.unended_phases().await.is_empty());
    // A success reported after the failure changes nothing: the first end wins.
    let r = repo.end_phase("hello", 2, "a1", succeeded(), "").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(repo.current_version("hello").await, Some(1));

    // A config change starts from v1, the release that serves, and runs no phase.
    let r = repo
        .http
        .patch(format!("{}/v1/apps/hello/config", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&json!({ "set": { "GREETING": "hey" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v3: Release = r.json().await.unwrap();
    assert_eq!(v3.version, 3, "numbers go on above the failed release");
    assert_eq!(v3.phase, None);
    let v1 = repo.releases("hello").await.pop().unwrap();
    assert_eq!(v3.bundle, v1.bundle, "v1's code, not the failed v2's");
    assert_eq!(repo.current_version("hello").await, Some(3));

    // v2 never served: no rollback to it.
    let r = repo
        .http
        .post(format!("{}/v1/apps/hello/rollback", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&json!({ "to": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("never served"));
    // A rollback to v1 restores it without a phase.
    let r = repo
        .http
        .post(format!("{}/v1/apps/hello/rollback", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&json!({ "to": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v4: Release = r.json().await.unwrap();
    assert_eq!(v4.phase, None);
    assert_eq!(repo.current_version("hello").await, Some(4));
}

/// A newer release supersedes a phase no node claimed yet: it never runs.
pub async fn a_newer_release_supersedes_an_unclaimed_phase(repo: &Repo) {
    repo.create_app("hello").await;
    repo.deploy("hello", &super::sample_bundle("hello", "1"))
        .await;
    repo.deploy("hello", &phase_bundle("hello", "2")).await;
    repo.deploy("hello", &phase_bundle("hello", "3")).await;
    assert_eq!(
        repo.release_state("hello", 2).await,
        PhaseState::Superseded { by: "v3".into() }
    );
    assert_eq!(repo.unended_phases().await, vec![("hello".to_string(), 3)]);
    let token = repo.build_token.clone();
    let r = repo.claim_phase("hello", 2, "node-a", "a1", &token).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("superseded by v3"));
    assert_eq!(repo.current_version("hello").await, Some(1));
}

/// Many nodes claim one phase at once: exactly one wins, every other is refused.
pub async fn concurrent_claims_one_wins(repo: &Repo) {
    repo.create_app("hello").await;
    repo.deploy("hello", &phase_bundle("hello", "1")).await;
    assert_eq!(
        repo.current_version("hello").await,
        None,
        "nothing serves yet"
    );
    let token = repo.build_token.clone();
    let claims = (0..8).map(|i| {
        let token = token.clone();
        async move {
            repo.claim_phase(
                "hello",
                1,
                &format!("node-{i}"),
                &format!("attempt-{i}"),
                &token,
            )
            .await
            .status()
        }
    });
    let statuses = futures_util::future::join_all(claims).await;
    let won = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((won, refused), (1, 7), "{statuses:?}");
}

/// A claim whose node was lost or restarted is failed by the next node, never run again.
pub async fn an_abandoned_claim_is_failed_not_rerun(repo: &Repo) {
    repo.create_app("hello").await;
    repo.deploy("hello", &super::sample_bundle("hello", "1"))
        .await;
    repo.deploy("hello", &phase_bundle("hello", "2")).await;
    let token = repo.build_token.clone();
    let r = repo.claim_phase("hello", 2, "node-a", "a1", &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    // node-a is lost; Beacon gives the phase to node-b, whose claim is refused.
    let r = repo.claim_phase("hello", 2, "node-b", "b1", &token).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = repo
        .end_phase(
            "hello",
            2,
            "b1",
            failed("node-a, which ran it, was lost; a release phase is not run twice"),
            "",
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert!(matches!(
        repo.release_state("hello", 2).await,
        PhaseState::Failed { reason } if reason.contains("not run twice")
    ));
    assert_eq!(repo.current_version("hello").await, Some(1));
}

/// Read and deploy tokens may not claim or end a phase.
pub async fn only_nodes_claim_phases(repo: &Repo) {
    repo.create_app("hello").await;
    repo.deploy("hello", &phase_bundle("hello", "1")).await;
    for token in [repo.read_token.clone(), repo.deploy_token.clone()] {
        let r = repo.claim_phase("hello", 1, "node-a", "a1", &token).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(repo.release_state("hello", 1).await, PhaseState::Pending);
}
