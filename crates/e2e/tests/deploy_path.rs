//! The deploy path across real services (docs/src/design/deploy-path.md): an upload to apprepo is committed,
//! apprepo tells Beacon over the TLS link, Beacon reads the new desired state from apprepo and
//! assigns it to a Maestro link, which downloads and unpacks the exact bundle that was uploaded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    Assignment, FromBeacon, Hello, NodeReport, PROTOCOL_VERSION, PeerRole, ToBeacon,
};
use px_runtime::tokens::{TokenEntry, generate, hash};
use sha2::{Digest, Sha256};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

type Link = Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    FrameCodec<FromBeacon, ToBeacon>,
>;

async fn next_assign(link: &mut Link) -> Assignment {
    loop {
        match tokio::time::timeout(WAIT, link.next())
            .await
            .expect("no assignment in time")
        {
            Some(Ok(FromBeacon::Assign(a))) => return a,
            Some(Ok(FromBeacon::Heartbeat)) => continue,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_reaches_a_maestro_through_beacon() {
    let dir = tempfile::tempdir().unwrap();
    let pki = px_test_support::Pki::new(&["localhost"]).unwrap();
    let deploy = generate();
    let repo_read = generate();
    let maestro = generate();
    let repo_link = generate();

    let repo_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let repo_url = format!(
        "https://localhost:{}",
        repo_listener.local_addr().unwrap().port()
    );
    let beacon_http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let beacon_control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = beacon_control.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();

    // apprepo, notifying Beacon.
    let link_token_file = dir.path().join("repo-link-token");
    px_runtime::secrets::write_secret_file(&link_token_file, &repo_link).unwrap();
    let repo_config = px_repository::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
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
                name: "beacon".into(),
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
            token_file: link_token_file,
            name: "apprepo".into(),
        }),
        api_tls: px_runtime::http_server::ApiTls {
            cert_file: Some(pki.cert()),
            key_file: Some(pki.key()),
            plain_http: false,
        },
        ..Default::default()
    };
    let token = shutdown.clone();
    let repo_task = tokio::spawn(async move {
        px_repository::run(repo_config, repo_listener, token)
            .await
            .unwrap()
    });

    // Beacon, reading from apprepo; reconciliation is slow so only the notice explains speed.
    let read_token_file = dir.path().join("beacon-repo-token");
    px_runtime::secrets::write_secret_file(&read_token_file, &repo_read).unwrap();
    let mut beacon_config = px_beacon::config::Config {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("beacon"),
        tls_cert_file: pki.cert(),
        tls_key_file: pki.key(),
        tokens: vec![
            TokenEntry {
                name: "web".into(),
                role: px_beacon::auth::Role::Maestro,
                sha256: hash(&maestro),
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
        ],
        reconcile_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    beacon_config.repository.url = repo_url.clone();
    beacon_config.repository.token_file = read_token_file;
    beacon_config.repository.ca_file = Some(pki.ca());
    let token = shutdown.clone();
    let listeners = px_beacon::Listeners {
        http: beacon_http,
        control: beacon_control,
    };
    let beacon_task = tokio::spawn(async move {
        px_beacon::run(beacon_config, listeners, token)
            .await
            .unwrap()
    });

    // A Maestro links up; with no apps yet, its first assignment is empty.
    let tls = px_runtime::tls::client_config(&pki.ca()).unwrap();
    let mut link: Link = {
        let start = std::time::Instant::now();
        let tcp = loop {
            match tokio::net::TcpStream::connect(&control_addr).await {
                Ok(tcp) => break tcp,
                Err(_) if start.elapsed() < WAIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("beacon not listening: {e}"),
            }
        };
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(px_runtime::tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        Framed::new(stream, FrameCodec::new())
    };
    link.send(ToBeacon::Hello(Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Maestro,
        name: "web-1".into(),
        token: maestro.clone(),
        software: "test".into(),
        labels: Default::default(),
        state: Some(NodeReport::default()),
    }))
    .await
    .unwrap();
    assert!(matches!(
        link.next().await,
        Some(Ok(FromBeacon::Welcome { .. }))
    ));

    // Deploy: create the app and upload a bundle to apprepo.
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
    let digest = hex::encode(Sha256::digest(&bundle));
    let r = http
        .post(format!("{repo_url}/v1/apps"))
        .bearer_auth(&deploy)
        .json(&serde_json::json!({"name": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{repo_url}/v1/apps/hello/releases"))
        .bearer_auth(&deploy)
        .header(px_proto::api::HEADER_BUNDLE_SHA256, &digest)
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let assignment = loop {
        let a = next_assign(&mut link).await;
        if !a.apps.is_empty() {
            break a;
        }
    };
    let app = &assignment.apps[0];
    assert_eq!(
        (app.app.as_str(), app.release, app.bundle_sha256.as_str()),
        ("hello", 1, digest.as_str())
    );
    assert_eq!(app.env["GREETING"], "hello");

    // The Maestro side: download the bundle from where Beacon says, verify and unpack it.
    let downloaded = http
        .get(&app.bundle_url)
        .bearer_auth(&repo_read)
        .send()
        .await
        .unwrap();
    assert_eq!(downloaded.status(), 200);
    let bytes = downloaded.bytes().await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), app.bundle_sha256);
    let releases = tempfile::tempdir().unwrap();
    let dest = releases.path().join("hello-1");
    let info = px_bundle::unpack(&bytes[..], &dest, &px_bundle::Limits::default()).unwrap();
    assert_eq!(info.manifest.name, "hello");
    assert!(dest.join("server.py").is_file());

    // A config change is a new release, and it reaches the Maestro as a new assignment.
    let r = http
        .patch(format!("{repo_url}/v1/apps/hello/config"))
        .bearer_auth(&deploy)
        .json(&serde_json::json!({"set": {"GREETING": "bonjour"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let next = next_assign(&mut link).await;
    assert!(next.generation > assignment.generation);
    assert_eq!(next.apps[0].release, 2);
    assert_eq!(next.apps[0].env["GREETING"], "bonjour");
    assert_eq!(next.apps[0].bundle_sha256, digest, "same code, new config");

    shutdown.cancel();
    repo_task.await.unwrap();
    beacon_task.await.unwrap();
}
