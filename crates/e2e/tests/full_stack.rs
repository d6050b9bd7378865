//! The whole deploy path on one machine with every real service: an upload to apprepo becomes
//! a release, Beacon assigns it, Maestro downloads, starts and health-checks it and serves it
//! through its proxy; a config change rolls out as a new release with no failed request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use px_runtime::tokens::{TokenEntry, generate, hash};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

async fn wait_body(http: &reqwest::Client, url: &str, body: &str) {
    let start = std::time::Instant::now();
    loop {
        if let Ok(r) = http.get(url).header("host", "hello.localhost").send().await
            && r.status() == 200
            && r.text().await.unwrap_or_default() == body
        {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "hello.localhost never answered {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the load has had `at_least` answers, so it runs before and after the change.
async fn wait_count(counter: &AtomicU64, at_least: u64) {
    let start = std::time::Instant::now();
    while counter.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < WAIT,
            "the load got only {} answers",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_and_reconfigure_through_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let pki = px_test_support::Pki::new(&["localhost"]).unwrap();
    let (deploy, repo_read, maestro_token, repo_link) =
        (generate(), generate(), generate(), generate());
    let secret = |name: &str, value: &str| {
        let path = dir.path().join(name);
        px_runtime::secrets::write_secret_file(&path, value).unwrap();
        path
    };
    let repo_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Both APIs serve HTTPS under the cluster CA, as Ansible installs them; every client
    // (this test as em, Beacon's reconciler, Maestro's downloads) trusts that CA alone.
    let repo_url = format!(
        "https://localhost:{}",
        repo_listener.local_addr().unwrap().port()
    );
    let beacon_http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let beacon_url = format!(
        "https://localhost:{}",
        beacon_http.local_addr().unwrap().port()
    );
    let beacon_control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = beacon_control.local_addr().unwrap().to_string();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}/", proxy.local_addr().unwrap());
    let status = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();

    let repo_config = px_repository::config::Config {
        data_dir: dir.path().join("apprepo"),
        tokens: vec![
            TokenEntry {
                name: "dev".into(),
                role: px_repository::auth::Role::Deploy,
                sha256: hash(&deploy),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "cluster".into(),
                role: px_repository::auth::Role::Beacon,
                sha256: hash(&repo_read),
                node: None,
                apps: None,
            },
        ],
        beacon: Some(px_repository::config::BeaconConfig {
            addr: Some(control_addr.clone()),
            addrs: Vec::new(),
            server_name: Some("localhost".into()),
            ca_file: pki.ca(),
            token_file: secret("repo-link", &repo_link),
            name: "apprepo".into(),
        }),
        api_tls: px_runtime::http_server::ApiTls {
            cert_file: Some(pki.cert()),
            key_file: Some(pki.key()),
            plain_http: false,
        },
        ..Default::default()
    };
    let mut beacon_config = px_beacon::config::Config {
        data_dir: dir.path().join("beacon"),
        tls_cert_file: pki.cert(),
        tls_key_file: pki.key(),
        tokens: vec![
            TokenEntry {
                name: "web".into(),
                role: px_beacon::auth::Role::Maestro,
                sha256: hash(&maestro_token),
                node: Some("web-1".into()),
                apps: None,
            },
            TokenEntry {
                name: "apprepo".into(),
                role: px_beacon::auth::Role::Repository,
                sha256: hash(&repo_link),
                node: None,
                apps: None,
            },
            TokenEntry {
                name: "dev".into(),
                role: px_beacon::auth::Role::Deploy,
                sha256: hash(&deploy),
                node: None,
                apps: None,
            },
        ],
        reconcile_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    beacon_config.repository.url = repo_url.clone();
    beacon_config.repository.token_file = secret("beacon-repo", &repo_read);
    beacon_config.repository.ca_file = Some(pki.ca());
    let port_base = 43000 + (std::process::id() % 100) as u16 * 20;
    let maestro_config = px_maestro::config::Config {
        node_name: "web-1".into(),
        state_dir: dir.path().join("maestro/state"),
        log_dir: dir.path().join("maestro/logs"),
        port_range: (port_base, port_base + 19),
        stop_grace: Duration::from_secs(3),
        repository_token_file: Some(secret("maestro-repo", &repo_read)),
        beacon: Some(px_maestro::config::BeaconConfig {
            addr: Some(control_addr.clone()),
            addrs: Vec::new(),
            server_name: Some("localhost".into()),
            ca_file: pki.ca(),
            token_file: secret("maestro-link", &maestro_token),
        }),
        ..Default::default()
    };
    let mut tasks = Vec::new();
    let t = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        px_repository::run(repo_config, repo_listener, t)
            .await
            .unwrap()
    }));
    let t = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        px_beacon::run(
            beacon_config,
            px_beacon::Listeners {
                http: beacon_http,
                control: beacon_control,
            },
            t,
        )
        .await
        .unwrap()
    }));
    let t = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        px_maestro::run(
            maestro_config,
            px_maestro::Listeners {
                http: proxy,
                https: None,
                status,
            },
            t,
        )
        .await
        .unwrap()
    }));

    // `em deploy`, by hand: create the app and upload its bundle.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let app_dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(app_dir.path(), "hello").unwrap();
    let mut bundle = Vec::new();
    px_bundle::pack_dir(app_dir.path(), &mut bundle).unwrap();
    let start = std::time::Instant::now();
    loop {
        match http
            .post(format!("{repo_url}/v1/apps"))
            .bearer_auth(&deploy)
            .json(&serde_json::json!({"name": "hello"}))
            .send()
            .await
        {
            Ok(r) if r.status() == 201 => break,
            _ if start.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("apprepo never came up: {other:?}"),
        }
    }
    let deployed = std::time::Instant::now();
    let r = http
        .post(format!("{repo_url}/v1/apps/hello/releases"))
        .bearer_auth(&deploy)
        .header(
            px_proto::api::HEADER_BUNDLE_SHA256,
            hex::encode(Sha256::digest(&bundle)),
        )
        .body(bundle)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_body(&http, &proxy_url, "hello").await;
    eprintln!(
        "upload to serving through apprepo, beacon and maestro: {:?}",
        deployed.elapsed()
    );

    // Beacon sees the rollout finish.
    let start = std::time::Instant::now();
    loop {
        let apps: Vec<px_proto::beacon::App> = http
            .get(format!("{beacon_url}/v1/apps"))
            .bearer_auth(&deploy)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if apps
            .first()
            .is_some_and(|a| a.rollout == px_proto::beacon::RolloutState::RolledOut)
        {
            break;
        }
        assert!(start.elapsed() < WAIT, "rollout never finished: {apps:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `em logs`: the app's output reaches Beacon from the node (http.server logs each request
    // on stderr).
    let start = std::time::Instant::now();
    loop {
        let lines: Vec<px_proto::beacon::LogEntry> = http
            .get(format!("{beacon_url}/v1/apps/hello/logs?lines=50"))
            .bearer_auth(&deploy)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if lines
            .iter()
            .any(|l| l.node == "web-1" && l.line.contains("GET / "))
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no request line reached beacon: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `em config set GREETING=bonjour` under steady traffic: no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failed, served, url) = (
            stop.clone(),
            failed.clone(),
            served.clone(),
            proxy_url.clone(),
        );
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match http
                    .get(&url)
                    .header("host", "hello.localhost")
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed request during the rollout: {outcome:?}");
                    }
                }
            }
        })
    };
    wait_count(&served, 5).await;
    let r = http
        .patch(format!("{repo_url}/v1/apps/hello/config"))
        .bearer_auth(&deploy)
        .json(&serde_json::json!({"set": {"GREETING": "bonjour"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_body(&http, &proxy_url, "bonjour").await;
    wait_count(&served, served.load(Ordering::Relaxed) + 5).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the config rollout"
    );

    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
}
