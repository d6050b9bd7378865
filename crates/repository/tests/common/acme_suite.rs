//! The ACME records' API, run against each storage backend: Beacon stores its account once and
//! writes certificates; a web server's token reads one with its key; a reader lists them
//! without keys; nobody else reads a key or writes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use px_proto::acme::{AcmeAccount, AcmeCert, AcmeCertSummary, CertState};
use px_repository::auth::Role;
use px_runtime::tokens::{TokenEntry, generate, hash};
use reqwest::StatusCode;

use super::Repo;

/// A `beacon` token, as Beacon's reconciler holds, added to a test config.
pub fn add_beacon_token(config: &mut px_repository::config::Config) -> String {
    let token = generate();
    config.tokens.push(TokenEntry {
        name: "beacon".into(),
        role: Role::Beacon,
        sha256: hash(&token),
        node: None,
        apps: None,
    });
    token
}

fn issued(domain: &str, serial: &str) -> AcmeCert {
    AcmeCert {
        domain: domain.into(),
        state: CertState::Issued,
        chain_pem: "-----BEGIN CERTIFICATE-----\nchain\n-----END CERTIFICATE-----\n".into(),
        key_pem: "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n".into(),
        issuer: "Pebble Intermediate CA".into(),
        not_before: "2026-01-01T00:00:00Z".into(),
        not_after: "2026-04-01T00:00:00Z".into(),
        renew_at: "2026-03-01T00:00:00Z".into(),
        last_error: String::new(),
        serial: serial.into(),
    }
}

async fn put_cert(repo: &Repo, cert: &AcmeCert, token: &str) -> reqwest::Response {
    repo.http
        .put(format!("{}/v1/acme/certs/{}", repo.url, cert.domain))
        .bearer_auth(token)
        .json(cert)
        .send()
        .await
        .unwrap()
}

/// The account is stored once: a second Beacon's is refused, and both read the first.
pub async fn the_account_is_stored_once_and_only_beacon_reads_it(repo: &Repo, beacon: &str) {
    let r = repo.get("/v1/acme/account", beacon).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let account = |id: &str| AcmeAccount {
        directory_url: "https://127.0.0.1:14000/dir".into(),
        credentials: serde_json::json!({ "id": id, "key_pkcs8": "secret" }),
    };
    let put = |a: AcmeAccount, token: String| async move {
        repo.http
            .put(format!("{}/v1/acme/account", repo.url))
            .bearer_auth(token)
            .json(&a)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(
        put(account("first"), repo.deploy_token.clone())
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        put(account("first"), beacon.into()).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        put(account("second"), beacon.into()).await.status(),
        StatusCode::CONFLICT
    );
    let r = repo.get("/v1/acme/account", beacon).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<AcmeAccount>().await.unwrap(), account("first"));
    for token in [&repo.read_token, &repo.build_token, &repo.deploy_token] {
        let r = repo.get("/v1/acme/account", token).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "the account key leaked");
    }
}

/// Beacon writes and replaces a certificate; a web server reads it with its key; a reader
/// lists it without the key; only Beacon writes.
pub async fn certificates_reach_web_servers_and_readers_see_no_keys(repo: &Repo, beacon: &str) {
    let first = issued("shop.example.com", "01");
    assert_eq!(
        put_cert(repo, &first, beacon).await.status(),
        StatusCode::OK
    );
    let renewed = issued("shop.example.com", "02");
    assert_eq!(
        put_cert(repo, &renewed, beacon).await.status(),
        StatusCode::OK
    );
    let failed = AcmeCert {
        state: CertState::Failed,
        last_error: "urn:ietf:params:acme:error:connection: connection refused".into(),
        ..issued("blog.example.com", "")
    };
    assert_eq!(
        put_cert(repo, &failed, beacon).await.status(),
        StatusCode::OK
    );

    // A web server (a build or release token) reads the newest one, key included.
    let r = repo
        .get("/v1/acme/certs/shop.example.com", &repo.build_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<AcmeCert>().await.unwrap(), renewed);

    // A reader sees both names, their states and the CA's reason, never a key.
    let r = repo
        .get("/v1/acme/certs", &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(!text.contains("PRIVATE KEY"), "a key is listed: {text}");
    let listed: Vec<AcmeCertSummary> = serde_json::from_str(&text).unwrap();
    assert_eq!(listed, vec![failed.summary(), renewed.summary()]);
    let r = repo
        .get("/v1/acme/certs/shop.example.com", &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("beacon, release or build"));

    // Only Beacon writes; a record must name its path's domain, a valid host name.
    assert_eq!(
        put_cert(repo, &issued("shop.example.com", "03"), &repo.build_token)
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let r = repo
        .http
        .put(format!("{}/v1/acme/certs/other.example.com", repo.url))
        .bearer_auth(beacon)
        .json(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = repo
        .get("/v1/acme/certs/..%2Fapps", beacon)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = repo
        .get("/v1/acme/certs/missing.example.com", beacon)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// A reader limited to `shop` lists the certificate of `shop`'s added name alone, not
/// `blog`'s; an unlimited reader lists both.
pub async fn a_scoped_reader_lists_only_its_apps_certificates(
    repo: &Repo,
    beacon: &str,
    scoped_reader: &str,
) {
    for (app, domain) in [("shop", "shop.example.com"), ("blog", "blog.example.com")] {
        repo.create_app(app).await;
        let r = repo
            .http
            .post(format!("{}/v1/apps/{app}/domains", repo.url))
            .bearer_auth(&repo.deploy_token)
            .json(&serde_json::json!({ "domain": domain }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(
            put_cert(repo, &issued(domain, "0a"), beacon).await.status(),
            StatusCode::OK
        );
    }
    let list = |token: String| async move {
        let r = repo.get("/v1/acme/certs", &token).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let mut names: Vec<String> = r
            .json::<Vec<AcmeCertSummary>>()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.domain)
            .collect();
        names.sort();
        names
    };
    assert_eq!(list(scoped_reader.to_string()).await, ["shop.example.com"]);
    assert_eq!(
        list(repo.read_token.clone()).await,
        ["blog.example.com", "shop.example.com"]
    );
}
