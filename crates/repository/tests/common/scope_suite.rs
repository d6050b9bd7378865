//! Scenarios of least privilege every storage backend must pass, run by `scopes_fs.rs` and
//! `scopes_s3.rs`: tokens limited to some apps, and what each role sees.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use px_proto::api::{App, ErrorBody, Release};
use px_proto::build::Build;
use px_repository::auth::Role;
use px_repository::config::Config;
use px_runtime::tokens::{TokenEntry, generate, hash};
use reqwest::StatusCode;

use super::{Repo, sample_bundle};

/// The lifetime of the token the expiry scenario mints.
const SHORT_TOKEN_SECS: u64 = 5;

/// Adds a token of `role` limited to `apps` to a config; returns the secret.
pub fn add_scoped(config: &mut Config, name: &str, role: Role, apps: &[&str]) -> String {
    let secret = generate();
    config.tokens.push(TokenEntry {
        name: name.into(),
        role,
        sha256: hash(&secret),
        apps: Some(apps.iter().map(|a| a.to_string()).collect()),
        node: None,
    });
    secret
}

/// Adds a token of `role` for every app to a config; returns the secret.
pub fn add_unscoped(config: &mut Config, name: &str, role: Role) -> String {
    let secret = generate();
    config.tokens.push(TokenEntry {
        name: name.into(),
        role,
        sha256: hash(&secret),
        apps: None,
        node: None,
    });
    secret
}

/// Asserts a 403 whose message names the token and its limit.
async fn assert_not_its_app(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{what}");
    let body: ErrorBody = response.json().await.unwrap();
    assert!(
        body.message.contains("\"ci-shop") && body.message.contains("limited to its apps"),
        "{what}: {}",
        body.message
    );
}

/// A deploy token limited to `shop` deploys, configures and rolls back `shop`, and is refused
/// on `blog` for every route that names an app; lists show it only `shop`.
pub async fn a_scoped_token_acts_only_on_its_apps(repo: &Repo, scoped: &str) {
    repo.create_app("shop").await;
    repo.create_app("blog").await;
    let blog_v1 = repo.deploy("blog", &sample_bundle("blog", "one")).await;

    // Its own app: deploy, configure, roll back, read.
    let r = repo
        .upload_request("shop", &sample_bundle("shop", "one"), scoped)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let r = repo
        .http
        .patch(format!("{}/v1/apps/shop/config", repo.url))
        .bearer_auth(scoped)
        .json(&serde_json::json!({ "set": { "MODE": "live" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let r = repo
        .http
        .post(format!("{}/v1/apps/shop/rollback", repo.url))
        .bearer_auth(scoped)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );

    // Another app: every route refuses, naming the token.
    let r = repo
        .upload_request("blog", &sample_bundle("blog", "two"), scoped)
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "upload").await;
    for path in [
        "/v1/apps/blog",
        "/v1/apps/blog/releases",
        "/v1/apps/blog/releases/current",
        "/v1/apps/blog/releases/1",
        "/v1/apps/blog/config",
        "/v1/apps/blog/formation",
        "/v1/apps/blog/domains",
        "/v1/apps/blog/builds",
        "/v1/apps/blog/builds/1",
        "/v1/apps/blog/builds/1/log",
        "/v1/apps/blog/releases/1/phase/log",
    ] {
        let r = repo.get(path, scoped).send().await.unwrap();
        assert_not_its_app(r, path).await;
    }
    let r = repo
        .http
        .patch(format!("{}/v1/apps/blog/config", repo.url))
        .bearer_auth(scoped)
        .json(&serde_json::json!({ "set": { "MODE": "stolen" } }))
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "config").await;
    let r = repo
        .http
        .post(format!("{}/v1/apps/blog/rollback", repo.url))
        .bearer_auth(scoped)
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "rollback").await;
    let r = repo
        .http
        .put(format!("{}/v1/apps/blog/formation", repo.url))
        .bearer_auth(scoped)
        .json(&serde_json::json!({ "web": 3 }))
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "scale").await;
    let r = repo
        .http
        .post(format!("{}/v1/apps/blog/domains", repo.url))
        .bearer_auth(scoped)
        .json(&serde_json::json!({ "domain": "blog.example.com" }))
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "add a domain").await;
    let r = repo
        .http
        .delete(format!(
            "{}/v1/apps/blog/domains/blog.example.com",
            repo.url
        ))
        .bearer_auth(scoped)
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "remove a domain").await;
    let r = repo
        .http
        .post(format!("{}/v1/apps", repo.url))
        .bearer_auth(scoped)
        .json(&serde_json::json!({ "name": "other" }))
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "create").await;

    // Nothing of blog changed.
    let releases: Vec<Release> = repo.releases("blog").await;
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].version, blog_v1.version);
    assert!(releases[0].config.is_empty());

    // Lists show only its apps.
    let apps: Vec<App> = repo
        .get("/v1/apps", scoped)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["shop"]);
    let pending: Vec<Build> = repo
        .get("/v1/builds?pending=true", scoped)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(pending.iter().all(|b| b.app == "shop"));
    let all: Vec<App> = repo
        .get("/v1/apps", &repo.deploy_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "an unscoped token still sees every app");
}

/// A `read` token sees config names with their values hidden, wherever a release shows (the
/// config route, release records, the app list); deploy and beacon tokens see the values.
pub async fn a_read_token_sees_config_names_only(repo: &Repo, beacon: &str) {
    repo.create_app("shop").await;
    repo.deploy("shop", &sample_bundle("shop", "one")).await;
    let r = repo
        .http
        .patch(format!("{}/v1/apps/shop/config", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&serde_json::json!({ "set": { "DATABASE_URL": "postgres://secret" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let config_of = |token: &str| {
        let request = repo.get("/v1/apps/shop/config", token);
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<std::collections::BTreeMap<String, String>>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        config_of(&repo.read_token).await["DATABASE_URL"],
        "(hidden)"
    );
    assert_eq!(
        config_of(&repo.build_token).await["DATABASE_URL"],
        "(hidden)"
    );
    assert_eq!(
        config_of(&repo.deploy_token).await["DATABASE_URL"],
        "postgres://secret"
    );
    assert_eq!(config_of(beacon).await["DATABASE_URL"], "postgres://secret");
    for path in [
        "/v1/apps/shop",
        "/v1/apps",
        "/v1/apps/shop/releases",
        "/v1/apps/shop/releases/current",
        "/v1/apps/shop/releases/2",
    ] {
        let text = repo
            .get(path, &repo.read_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains("postgres://secret"), "{path}: {text}");
        assert!(
            text.contains("DATABASE_URL") && text.contains("\"config_hidden\":true"),
            "{path}: {text}"
        );
        let text = repo
            .get(path, beacon)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("postgres://secret"), "{path}: {text}");
    }
}

/// Mints through `/v1/tokens` with `token`; returns the response.
pub async fn mint(repo: &Repo, token: &str, body: serde_json::Value) -> reqwest::Response {
    repo.http
        .post(format!("{}/v1/tokens", repo.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A minted token deploys its app and is refused on another; it is listed without its secret;
/// a name is minted once; a scoped or read token cannot mint wider; a revoked or expired token
/// is refused at once.
pub async fn minted_tokens_act_within_their_scope_until_revoked_or_expired(repo: &Repo) {
    repo.create_app("shop").await;
    repo.create_app("blog").await;
    let r = mint(
        repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "ci-shop", "role": "deploy", "apps": ["shop"] }),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let minted: px_proto::api::TokenMinted = r.json().await.unwrap();
    assert_eq!(minted.info.created_by, "ci");
    let ci = minted.token;

    let r = repo
        .upload_request("shop", &sample_bundle("shop", "one"), &ci)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let release: Release = r.json().await.unwrap();
    assert_eq!(release.created_by, "ci-shop");
    let r = repo
        .upload_request("blog", &sample_bundle("blog", "one"), &ci)
        .send()
        .await
        .unwrap();
    assert_not_its_app(r, "upload to blog").await;

    // Listed, never with its secret or hash; stored only as a hash.
    let listed = repo
        .get("/v1/tokens", &repo.deploy_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains("\"ci-shop\"") && !listed.contains(&ci),
        "{listed}"
    );
    assert!(!listed.contains(&px_runtime::tokens::hash(&ci)), "{listed}");

    // One name, one token.
    let again = mint(
        repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "ci-shop", "role": "deploy", "apps": ["shop"] }),
    )
    .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);

    // No token mints wider than itself.
    let wider = mint(
        repo,
        &ci,
        serde_json::json!({ "name": "sneaky", "role": "deploy", "apps": ["shop", "blog"] }),
    )
    .await;
    let message = wider.json::<ErrorBody>().await.unwrap().message;
    assert!(message.contains("limited to its apps"), "{message}");
    let narrower = mint(
        repo,
        &ci,
        serde_json::json!({ "name": "ci-shop-read", "role": "read", "apps": ["shop"] }),
    )
    .await;
    assert_eq!(narrower.status(), StatusCode::CREATED);
    let from_read = mint(
        repo,
        &repo.read_token,
        serde_json::json!({ "name": "up", "role": "deploy", "apps": ["shop"] }),
    )
    .await;
    assert_eq!(from_read.status(), StatusCode::FORBIDDEN);
    let too_long = mint(
        repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "forever", "role": "deploy", "apps": ["shop"], "expires_in_secs": 400 * 86_400 }),
    )
    .await;
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
    let bad_name = mint(
        repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "../x", "role": "deploy", "apps": ["shop"] }),
    )
    .await;
    assert_eq!(bad_name.status(), StatusCode::BAD_REQUEST);

    // Revoked: refused at once.
    let r = repo
        .http
        .delete(format!("{}/v1/tokens/ci-shop", repo.url))
        .bearer_auth(&repo.deploy_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = repo.get("/v1/apps/shop", &ci).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Expired: refused from its expiry on, without anyone revoking it. Five seconds, so the
    // first use comes before it even on a loaded machine (a second was not always enough).
    let short: px_proto::api::TokenMinted = mint(
        repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "short", "role": "read", "apps": ["shop"], "expires_in_secs": SHORT_TOKEN_SECS }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        repo.get("/v1/apps/shop", &short.token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    tokio::time::sleep(std::time::Duration::from_millis(
        SHORT_TOKEN_SECS * 1000 + 1100,
    ))
    .await;
    let r = repo
        .get("/v1/apps/shop", &short.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
