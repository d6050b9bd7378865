//! Least privilege on Beacon's API: tokens limited to some apps, restarts only for deploy
//! tokens, config values only for the roles that need them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Beacon, Peer, RepoStub, Tokens, WAIT, config, maestro_hello};
use px_beacon::auth::Role;
use px_proto::api::ErrorBody;
use px_proto::beacon::{App, Event, Node};
use px_proto::link::{AppAssignment, InstanceState, InstanceStatus};
use px_runtime::tokens::{TokenEntry, generate, hash};
use px_test_support::Pki;
use reqwest::StatusCode;

/// The extra tokens each test uses, beside the common ones.
struct Extra {
    deploy: String,
    shop_deploy: String,
    shop_read: String,
}

/// Beacon with two apps, `shop` and `blog` (which only nodes labelled `role = blog` run), a
/// deploy token of every app, a deploy token and a read token limited to `shop`.
async fn start() -> (tempfile::TempDir, Tokens, Extra, Beacon) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("shop", 1, "");
    repo.release("blog", 1, "[placement]\nlabels = { role = \"blog\" }\n");
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut config = config(dir.path(), &pki, &tokens, &url);
    let extra = Extra {
        deploy: generate(),
        shop_deploy: generate(),
        shop_read: generate(),
    };
    let entry = |name: &str, role, secret: &str, apps: Option<&[&str]>| TokenEntry {
        name: name.into(),
        role,
        sha256: hash(secret),
        apps: apps.map(|a| a.iter().map(|s| s.to_string()).collect()),
        node: None,
    };
    config.tokens.extend([
        entry("em-admin", Role::Deploy, &extra.deploy, None),
        entry("ci-shop", Role::Deploy, &extra.shop_deploy, Some(&["shop"])),
        entry("dash-shop", Role::Read, &extra.shop_read, Some(&["shop"])),
    ]);
    let beacon = Beacon::start(config, pki, &tokens, 0).await;
    // Both apps are known before the test asks about them.
    beacon
        .wait_for("/v1/apps", "both apps", |apps: &Vec<App>| apps.len() == 2)
        .await;
    (dir, tokens, extra, beacon)
}

async fn get(beacon: &Beacon, path: &str, token: &str) -> reqwest::Response {
    beacon
        .http
        .get(format!("{}{path}", beacon.http_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn post(beacon: &Beacon, path: &str, token: &str) -> reqwest::Response {
    beacon
        .http
        .post(format!("{}{path}", beacon.http_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn refused(response: reqwest::Response, what: &str) -> String {
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "{what}");
    response.json::<ErrorBody>().await.unwrap().message
}

fn instance(app: &str) -> InstanceStatus {
    InstanceStatus {
        app: app.into(),
        release: 1,
        state: InstanceState::Healthy,
        pid: None,
        port: None,
        restarts: 0,
        last_exit: None,
        process: "web".into(),
        number: 1,
        started_at: None,
        memory_bytes: None,
        cpu_permille: None,
    }
}

#[tokio::test]
async fn a_scoped_token_cannot_read_restart_run_or_log_another_app_and_lists_show_only_its_own() {
    let (_dir, tokens, extra, beacon) = start().await;
    let mut hello = maestro_hello("web-1", &tokens.maestro, 0);
    hello.labels.insert("role".into(), "blog".into());
    let node = Peer::link(&beacon, hello).await;
    node.report.lock().unwrap().instances = vec![instance("shop"), instance("blog")];
    beacon
        .wait_for("/v1/nodes", "both instances", |nodes: &Vec<Node>| {
            nodes.iter().any(|n| n.instances.len() == 2)
        })
        .await;

    for path in [
        "/v1/apps/blog",
        "/v1/apps/blog/config",
        "/v1/apps/blog/rollouts",
        "/v1/apps/blog/processes",
        "/v1/apps/blog/logs",
        "/v1/apps/blog/logs/stream",
        "/v1/events?app=blog",
        "/v1/events/stream?app=blog",
    ] {
        for token in [&extra.shop_deploy, &extra.shop_read] {
            let message = refused(get(&beacon, path, token).await, path).await;
            assert!(
                message.contains("limited to its apps") && message.contains("\"blog\""),
                "{path}: {message}"
            );
        }
    }
    let message = refused(
        post(&beacon, "/v1/apps/blog/restart", &extra.shop_deploy).await,
        "restart",
    )
    .await;
    assert!(message.contains("\"ci-shop\""), "{message}");
    refused(
        post(&beacon, "/v1/apps/blog/run", &extra.shop_deploy).await,
        "run",
    )
    .await;
    // Where every app shows, a scoped token is refused.
    refused(get(&beacon, "/metrics", &extra.shop_read).await, "/metrics").await;
    let page = get(&beacon, "/", &extra.shop_read).await;
    assert_eq!(page.status(), StatusCode::FORBIDDEN);

    // Its own app answers.
    let r = post(&beacon, "/v1/apps/shop/restart", &extra.shop_deploy).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        get(&beacon, "/v1/apps/shop/logs", &extra.shop_read)
            .await
            .status(),
        StatusCode::OK
    );

    // Lists show only its apps.
    let apps: Vec<App> = get(&beacon, "/v1/apps", &extra.shop_read)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["shop"]
    );
    let nodes: Vec<Node> = get(&beacon, "/v1/nodes", &extra.shop_read)
        .await
        .json()
        .await
        .unwrap();
    let seen: Vec<&str> = nodes
        .iter()
        .flat_map(|n| &n.instances)
        .map(|i| i.app.as_str())
        .collect();
    assert_eq!(seen, ["shop"]);
    let events: Vec<Event> = get(&beacon, "/v1/events?limit=1000", &extra.shop_read)
        .await
        .json()
        .await
        .unwrap();
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e.app.as_deref() == Some("shop")),
        "{events:?}"
    );
    let all: Vec<Event> = get(&beacon, "/v1/events?limit=1000", &extra.deploy)
        .await
        .json()
        .await
        .unwrap();
    assert!(all.iter().any(|e| e.app.as_deref() == Some("blog")));
    drop(node);
}

#[tokio::test]
async fn a_read_token_sees_config_names_with_values_masked_and_cannot_restart() {
    let (_dir, tokens, extra, beacon) = start().await;
    let message = refused(
        post(&beacon, "/v1/apps/shop/restart", &tokens.read).await,
        "restart",
    )
    .await;
    assert!(message.contains("deploy token"), "{message}");
    let masked: AppAssignment = get(&beacon, "/v1/apps/shop/config", &tokens.read)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        masked.env.get("DATABASE_URL").map(String::as_str),
        Some("(hidden)")
    );
    let shown: AppAssignment = get(&beacon, "/v1/apps/shop/config", &extra.deploy)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        shown.env.get("DATABASE_URL").map(String::as_str),
        Some("postgres://db")
    );
    let r = post(&beacon, "/v1/apps/shop/restart", &extra.deploy).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_maestro_token_reads_config_only_of_the_apps_assigned_to_its_node() {
    let (_dir, tokens, _extra, beacon) = start().await;
    // Before its node links, the token reads no config at all.
    let message = refused(
        get(&beacon, "/v1/apps/shop/config", tokens.maestro.of("web-1")).await,
        "unlinked",
    )
    .await;
    assert!(message.contains("assigned to its node"), "{message}");
    // Linked without the `blog` label, its node runs `shop` only.
    let node = Peer::link(&beacon, maestro_hello("web-1", &tokens.maestro, 0)).await;
    let start = std::time::Instant::now();
    loop {
        let r = get(&beacon, "/v1/apps/shop/config", tokens.maestro.of("web-1")).await;
        if r.status() == StatusCode::OK {
            let config: AppAssignment = r.json().await.unwrap();
            assert_eq!(
                config.env.get("DATABASE_URL").map(String::as_str),
                Some("postgres://db")
            );
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "shop's config never readable: {}",
            r.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    refused(
        get(&beacon, "/v1/apps/blog/config", tokens.maestro.of("web-1")).await,
        "blog",
    )
    .await;
    drop(node);
}

#[tokio::test]
async fn a_release_whose_config_values_apprepo_hid_is_never_assigned() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("shop", 1, "");
    repo.apps
        .lock()
        .unwrap()
        .get_mut("shop")
        .unwrap()
        .hide_config_values();
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let mut config = config(dir.path(), &pki, &tokens, &url);
    config.reconcile_interval = std::time::Duration::from_millis(100);
    let beacon = Beacon::start(config, pki, &tokens, 0).await;
    let node = Peer::link(&beacon, maestro_hello("web-1", &tokens.maestro, 0)).await;
    // Beacon has read the list (and refused it) a few times by now.
    let start = std::time::Instant::now();
    while repo.requests.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(start.elapsed() < WAIT, "Beacon never read the apps");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let apps: Vec<App> = beacon.get("/v1/apps").await;
    assert!(apps.is_empty(), "{apps:?}");
    assert!(
        node.assignments().iter().all(|a| a.apps.is_empty()),
        "a node was sent (hidden) in place of a secret"
    );
    // With the values shown again (the token's role fixed), the app is assigned.
    repo.release("shop", 1, "");
    beacon
        .wait_for("/v1/apps", "shop assigned", |apps: &Vec<App>| {
            apps.len() == 1
        })
        .await;
    drop(node);
}

/// A grant for `shop` of a minted deploy token, expiring in `secs` seconds from now (negative
/// for one already expired).
fn grant(name: &str, token: &str, secs: i64) -> px_proto::api::TokenGrant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    px_proto::api::TokenGrant {
        info: px_proto::api::TokenInfo {
            name: name.into(),
            role: px_proto::api::MintedRole::Deploy,
            apps: vec!["shop".into()],
            created_at: "2026-12-06T00:00:00Z".into(),
            created_by: "em".into(),
            expires_at: (now + secs) as u64,
        },
        sha256: hash(token),
    }
}

#[tokio::test]
async fn minted_tokens_a_repository_announces_act_on_their_apps_until_revoked_or_expired() {
    use futures_util::SinkExt;
    use px_proto::link::{ToBeacon, TokenGrants};
    let (_dir, tokens, _extra, beacon) = start().await;
    let (mut link, answer) = common::open_link(
        &beacon.control_addr,
        &beacon.pki.ca(),
        common::repository_hello("apprepo", &tokens.repository),
    )
    .await;
    assert!(matches!(answer, px_proto::link::FromBeacon::Welcome { .. }));
    let (ci, old) = (generate(), generate());
    link.send(ToBeacon::Tokens(TokenGrants {
        grants: vec![grant("ci-shop", &ci, 3600), grant("old", &old, -10)],
    }))
    .await
    .unwrap();
    let start = std::time::Instant::now();
    while post(&beacon, "/v1/apps/shop/restart", &ci).await.status() != StatusCode::ACCEPTED {
        assert!(
            start.elapsed() < WAIT,
            "the minted token was never accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let message = refused(post(&beacon, "/v1/apps/blog/restart", &ci).await, "blog").await;
    assert!(message.contains("\"ci-shop\""), "{message}");
    assert_eq!(
        get(&beacon, "/v1/apps", &old).await.status(),
        StatusCode::UNAUTHORIZED,
        "an expired grant is refused"
    );
    // The repository's next list leaves it out: revoked.
    link.send(ToBeacon::Tokens(TokenGrants { grants: Vec::new() }))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while get(&beacon, "/v1/apps", &ci).await.status() != StatusCode::UNAUTHORIZED {
        assert!(
            start.elapsed() < WAIT,
            "the revoked token is still accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
