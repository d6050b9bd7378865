//! `em domains`' scenarios every storage backend must pass, run by `api_fs.rs` and
//! `api_s3.rs`: names added without a release, each held by one app, within their limit.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use px_proto::api::{App, Domains, ErrorBody};
use reqwest::StatusCode;

use super::Repo;

/// The sample app, serving `domains` from its app.toml.
pub fn bundle_with_domains(name: &str, domains: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("app.toml")).unwrap();
    let list: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
    let manifest = manifest.replace(
        "[http]\n",
        &format!("[http]\ndomains = [{}]\n", list.join(", ")),
    );
    std::fs::write(dir.path().join("app.toml"), manifest).unwrap();
    let mut out = Vec::new();
    px_bundle::pack_dir(dir.path(), &mut out).unwrap();
    out
}

impl Repo {
    /// `POST /v1/apps/{app}/domains` as the deploy token.
    pub async fn add_domain(&self, app: &str, domain: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/apps/{app}/domains", self.url))
            .bearer_auth(&self.deploy_token)
            .json(&serde_json::json!({ "domain": domain }))
            .send()
            .await
            .unwrap()
    }

    /// `DELETE /v1/apps/{app}/domains/{domain}` as the deploy token.
    pub async fn remove_domain(&self, app: &str, domain: &str) -> reqwest::Response {
        self.http
            .delete(format!("{}/v1/apps/{app}/domains/{domain}", self.url))
            .bearer_auth(&self.deploy_token)
            .send()
            .await
            .unwrap()
    }

    /// The app's names as `name source` pairs, as the read token sees them.
    pub async fn domains(&self, app: &str) -> Vec<String> {
        let r = self
            .get(&format!("/v1/apps/{app}/domains"), &self.read_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let domains: Domains = r.json().await.unwrap();
        domains
            .domains
            .iter()
            .map(|e| format!("{} {}", e.domain, e.source.as_str()))
            .collect()
    }
}

/// Asserts that `response` has `status` and a message that contains each of `expected`.
async fn refused(response: reqwest::Response, status: StatusCode, expected: &[&str]) {
    assert_eq!(response.status(), status);
    let body: ErrorBody = response.json().await.unwrap();
    for part in expected {
        assert!(
            body.message.contains(part),
            "{:?} does not say {part:?}",
            body.message
        );
    }
}

/// Adding, listing and removing names: no release is made, the names are in `GET /v1/apps`
/// for Beacon, a name the manifest serves is not added or removed here, and refusals say
/// what to fix.
pub async fn added_domains(repo: &Repo) {
    repo.create_app("shop").await;
    // An app with no release may have names; they are served with its first release.
    let r = repo.add_domain("shop", "www.shop.example").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(repo.domains("shop").await, ["www.shop.example added"]);
    repo.deploy("shop", &bundle_with_domains("shop", &["shop.example"]))
        .await;
    let r = repo.add_domain("shop", "api.shop.example").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let answered: Domains = r.json().await.unwrap();
    assert_eq!(answered.domains.len(), 3);
    assert!(answered.domains.iter().all(|e| e.certificate.is_none()));
    assert_eq!(
        repo.domains("shop").await,
        [
            "shop.example manifest",
            "api.shop.example added",
            "www.shop.example added"
        ]
    );
    // Again: nothing changes.
    let r = repo.add_domain("shop", "api.shop.example").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(repo.releases("shop").await.len(), 1, "no release is made");
    let app: App = repo
        .get("/v1/apps/shop", &repo.read_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(app.domains, ["api.shop.example", "www.shop.example"]);

    // Refused, each saying what to fix.
    refused(
        repo.add_domain("shop", "Shop..Example").await,
        StatusCode::BAD_REQUEST,
        &["domain: \"Shop..Example\" is not a valid lowercase host name"],
    )
    .await;
    refused(
        repo.add_domain("shop", "shop.example").await,
        StatusCode::CONFLICT,
        &["already serves \"shop.example\" from its app.toml"],
    )
    .await;
    refused(
        repo.remove_domain("shop", "shop.example").await,
        StatusCode::CONFLICT,
        &["comes from \"shop\"'s app.toml", "deploy"],
    )
    .await;
    refused(
        repo.remove_domain("shop", "nosuch.example").await,
        StatusCode::NOT_FOUND,
        &["no added domain \"nosuch.example\"", "em domains list"],
    )
    .await;
    refused(
        repo.add_domain("nosuch", "x.example").await,
        StatusCode::NOT_FOUND,
        &["no app \"nosuch\""],
    )
    .await;
    let r = repo
        .http
        .post(format!("{}/v1/apps/shop/domains", repo.url))
        .bearer_auth(&repo.read_token)
        .json(&serde_json::json!({ "domain": "read.example" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the read role adds none");

    // Removed: gone from the list, the manifest's stays.
    let r = repo.remove_domain("shop", "www.shop.example").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        repo.domains("shop").await,
        ["shop.example manifest", "api.shop.example added"]
    );
    assert_eq!(repo.releases("shop").await.len(), 1, "no release is made");
}

/// At most `MAX_DOMAINS` added names per app, the limit named in the refusal.
pub async fn the_added_names_have_a_limit(repo: &Repo) {
    repo.create_app("many").await;
    let max = px_proto::manifest::MAX_DOMAINS;
    for n in 0..max {
        let r = repo.add_domain("many", &format!("n{n}.many.example")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    refused(
        repo.add_domain("many", "one-more.many.example").await,
        StatusCode::BAD_REQUEST,
        &[
            &format!("{max} added domains, the most an app may have"),
            "em domains remove",
        ],
    )
    .await;
    assert_eq!(repo.domains("many").await.len(), max);
}

/// A name belongs to one app: adding one another app serves (from its release or added) is
/// refused naming it, and so is a release that names one another app added.
pub async fn a_name_belongs_to_one_app(repo: &Repo) {
    repo.create_app("shop").await;
    repo.create_app("rival").await;
    repo.deploy("shop", &bundle_with_domains("shop", &["shop.example"]))
        .await;
    assert_eq!(
        repo.add_domain("shop", "www.shop.example").await.status(),
        StatusCode::CREATED
    );

    let r = repo.add_domain("rival", "shop.example").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "domain_taken");
    assert!(
        body.message.contains("app \"shop\" (its release v1)"),
        "{}",
        body.message
    );
    refused(
        repo.add_domain("rival", "www.shop.example").await,
        StatusCode::CONFLICT,
        &["\"www.shop.example\" belongs to app \"shop\" (added with `em domains add`)"],
    )
    .await;
    // A release naming it is refused the same way, and stores nothing.
    let r = repo
        .upload(
            "rival",
            &bundle_with_domains("rival", &["rival.example", "www.shop.example"]),
        )
        .await;
    refused(
        r,
        StatusCode::CONFLICT,
        &["\"www.shop.example\" belongs to app \"shop\" (added with `em domains add`)"],
    )
    .await;
    assert!(repo.releases("rival").await.is_empty());
    assert!(repo.domains("rival").await.is_empty());

    // Once shop lets it go, rival may take it.
    assert_eq!(
        repo.remove_domain("shop", "www.shop.example")
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        repo.add_domain("rival", "www.shop.example").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(repo.domains("rival").await, ["www.shop.example added"]);
}

/// Many adds to one app at once lose none (the record's compare-and-swap).
pub async fn concurrent_adds(repo: &Repo) {
    repo.create_app("busy").await;
    let names: Vec<String> = (0..8).map(|n| format!("n{n}.busy.example")).collect();
    let adds = names.iter().map(|name| repo.add_domain("busy", name));
    for r in futures_util::future::join_all(adds).await {
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    assert_eq!(repo.domains("busy").await.len(), 8);
}
