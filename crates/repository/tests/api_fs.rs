//! apprepo over HTTP with the filesystem backend: the deploy flow, concurrency, and every kind
//! of bad input with proof that nothing was stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Raw, Repo, bomb_bundle, domain_suite, raw_bundle, sample_bundle, sha256_hex, suite};
use px_proto::api::ErrorBody;
use reqwest::StatusCode;

#[tokio::test]
async fn deploy_flow() {
    let repo = Repo::start_fs().await;
    suite::deploy_flow(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_all_become_releases() {
    let repo = Repo::start_fs().await;
    suite::concurrent_uploads(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn digest_mismatch_stores_nothing() {
    let repo = Repo::start_fs().await;
    suite::digest_mismatch_stores_nothing(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn retention_keeps_what_the_policy_says() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    suite::retention_keeps_what_the_policy_says(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn retention_never_breaks_the_pointer_probe() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    suite::retention_never_breaks_the_pointer_probe(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn unreferenced_bundles_are_collected_after_the_grace() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    suite::unreferenced_bundles_are_collected_after_the_grace(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn bundles_stay_when_a_release_record_cannot_be_read() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    suite::bundles_stay_when_a_release_record_cannot_be_read(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn commits_refuse_a_bundle_that_is_gone() {
    let repo = Repo::start_with(common::no_periodic_retention).await;
    suite::commits_refuse_a_bundle_that_is_gone(&repo).await;
    repo.stop().await;
}

// The sweeps come from apprepo's own retention interval (a second here); every other wait is
// on apprepo itself, in this runtime, over loopback and its blocking pool, with no timeout on
// the way. So the test runs on a paused clock: whenever every task waits, the runtime moves the
// clock to the next timer instead of sleeping until it, and the sweeps come at once. (On S3
// the same test stays on the real clock: the S3 server is another process, and the SDK's
// timeouts would fire while it answers.)
#[tokio::test(start_paused = true)]
async fn periodic_sweeps_report_in_metrics() {
    let repo = Repo::start_with(suite::frequent_retention).await;
    suite::periodic_sweeps_report_in_metrics(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn retention_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, _, _) = common::test_config(dir.path());
    config.retention.keep_releases = 1;
    let err = px_repository::check(&config).err().unwrap();
    assert!(err.to_string().contains("retention.keep_releases"), "{err}");
}

#[tokio::test]
async fn identical_bundles_are_stored_once() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let bundle = sample_bundle("hello", "same");
    let v1 = repo.deploy("hello", &bundle).await;
    let v2 = repo.deploy("hello", &bundle).await;
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(v1.bundle, v2.bundle);
    let stored = std::fs::read_dir(repo.data.path().join("storage/bundles/sha256"))
        .unwrap()
        .count();
    assert_eq!(stored, 1);
    repo.stop().await;
}

#[tokio::test]
async fn tokens_are_required_and_roles_enforced() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let bundle = sample_bundle("hello", "x");
    let anonymous = repo
        .http
        .post(format!("{}/v1/apps/hello/releases", repo.url))
        .header(px_proto::api::HEADER_BUNDLE_SHA256, sha256_hex(&bundle))
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let wrong = repo
        .upload_request("hello", &bundle, "pxt_not-a-real-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let read_only = repo
        .upload_request("hello", &bundle, &repo.read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(read_only.status(), StatusCode::FORBIDDEN);
    let r = repo.get("/v1/apps", "pxt_nope").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = repo
        .http
        .post(format!("{}/v1/apps", repo.url))
        .bearer_auth(&repo.read_token)
        .json(&serde_json::json!({"name": "other"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        repo.releases("hello").await.is_empty(),
        "nothing was stored"
    );
    assert!(!repo.data.path().join("storage/bundles").exists());
    repo.assert_spool_empties().await;
    repo.stop().await;
}

#[tokio::test]
async fn app_names_and_duplicates_are_checked() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let post = |name: &str| {
        repo.http
            .post(format!("{}/v1/apps", repo.url))
            .bearer_auth(&repo.deploy_token)
            .json(&serde_json::json!({ "name": name }))
            .send()
    };
    assert_eq!(post("hello").await.unwrap().status(), StatusCode::CONFLICT);
    let bad = post("Not_A_Label").await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(bad.text().await.unwrap().contains("lowercase"));
    let r = repo
        .upload("nosuchapp", &sample_bundle("nosuchapp", "x"))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("em apps create"));
    repo.stop().await;
}

async fn refused(repo: &Repo, bundle: &[u8]) -> ErrorBody {
    let r = repo.upload("hello", bundle).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    r.json().await.unwrap()
}

#[tokio::test]
async fn hostile_bundles_are_refused_naming_the_path() {
    let repo = Repo::start_with(|c| c.limits.max_unpacked_bytes = 1024 * 1024).await;
    repo.create_app("hello").await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw_bundle(&[Raw::File("../x", b"escape")]), "../x"),
        (
            raw_bundle(&[Raw::File("a/../../x", b"escape")]),
            "a/../../x",
        ),
        (
            raw_bundle(&[Raw::File("/etc/cron.d/x", b"escape")]),
            "/etc/cron.d/x",
        ),
        (
            raw_bundle(&[Raw::Symlink("link", "../../etc/passwd")]),
            "link",
        ),
        (raw_bundle(&[Raw::Symlink("abs", "/etc/passwd")]), "abs"),
        (raw_bundle(&[Raw::CharDevice("dev/null")]), "dev/null"),
        (bomb_bundle(64 * 1024 * 1024), "1048576"),
    ];
    for (bundle, named) in cases {
        let body = refused(&repo, &bundle).await;
        assert_eq!(body.code, "invalid_bundle");
        assert!(body.message.contains(named), "{named}: {}", body.message);
    }
    assert!(repo.releases("hello").await.is_empty());
    assert!(!repo.data.path().join("storage/bundles").exists());
    repo.assert_spool_empties().await;
    repo.stop().await;
}

#[tokio::test]
async fn a_body_that_is_no_bundle_is_read_to_its_end_and_refused() {
    // The inspector gives up on the first bytes while the upload goes on far past its queue:
    // the digest is still checked over the whole body, and nothing is kept either way.
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let garbage: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let body = refused(&repo, &garbage).await;
    assert_eq!(body.code, "invalid_bundle", "{}", body.message);
    let r = repo
        .http
        .post(format!("{}/v1/apps/hello/releases", repo.url))
        .bearer_auth(&repo.deploy_token)
        .header(px_proto::api::HEADER_BUNDLE_SHA256, "b".repeat(64))
        .body(garbage.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "digest_mismatch", "{}", body.message);
    assert!(
        body.message.contains(&sha256_hex(&garbage)),
        "{}",
        body.message
    );
    assert!(repo.releases("hello").await.is_empty());
    assert!(!repo.data.path().join("storage/bundles").exists());
    repo.assert_spool_empties().await;
    repo.stop().await;
}

#[tokio::test]
async fn bad_manifests_are_refused_naming_the_field() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let cases: Vec<(&[u8], &str)> = vec![
        (
            b"name = \"hello\"\nrun = \"x\"\ninstances = 0\n",
            "instances",
        ),
        (
            b"name = \"hello\"\nrun = \"x\"\n[health]\ntimeout = \"soon\"\n",
            "health.timeout",
        ),
        (
            b"name = \"hello\"\nrun = \"x\"\n[http]\nstatic = { \"/a\" = \"../../etc\" }\n",
            "http.static",
        ),
        (b"name = \"other\"\nrun = \"x\"\n", "name"),
        (b"name = \"hello\"\n", "apprunner"),
        (
            b"name = \"hello\"\nrun = \"x\"\nruntime = \"python3>=three\"\n",
            "runtime",
        ),
        (
            b"name = \"hello\"\nrun = \"x\"\nrequires = [\"ffmpeg\", \"rm -rf\"]\n",
            "requires[1]",
        ),
    ];
    for (manifest, field) in cases {
        let body = refused(&repo, &raw_bundle(&[Raw::File("app.toml", manifest)])).await;
        assert!(body.message.contains(field), "{field}: {}", body.message);
    }
    let body = refused(&repo, &raw_bundle(&[Raw::File("app.toml", b"name = ")])).await;
    assert!(body.message.contains("app.toml"), "{}", body.message);
    let body = refused(&repo, b"definitely not zstd").await;
    assert!(
        body.message.contains("not a valid bundle"),
        "{}",
        body.message
    );
    assert!(repo.releases("hello").await.is_empty());
    repo.stop().await;
}

// Multi-threaded: the test reads with a blocking socket while the server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_upload_is_refused_early_and_the_connection_closed() {
    let repo = Repo::start_with(|c| c.limits.max_bundle_bytes = 64 * 1024).await;
    repo.create_app("hello").await;
    let addr = repo.url.trim_start_matches("http://").to_string();

    // Declared too large: answered before the body is sent, then the connection closes.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /v1/apps/hello/releases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{}: {}\r\nContent-Length: {}\r\n\r\n",
        repo.deploy_token,
        px_proto::api::HEADER_BUNDLE_SHA256,
        "a".repeat(64),
        100 * 1024 * 1024
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    // Undeclared (chunked) and too large: refused once the limit is crossed.
    let big = vec![7u8; 256 * 1024];
    let chunks = futures_util::stream::iter(
        big.chunks(8 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = repo
        .http
        .post(format!("{}/v1/apps/hello/releases", repo.url))
        .bearer_auth(&repo.deploy_token)
        .header(px_proto::api::HEADER_BUNDLE_SHA256, sha256_hex(&big))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    // The server may close before reqwest finishes sending; either way nothing is stored.
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(r.text().await.unwrap().contains("max_bundle_bytes"));
    }
    assert!(repo.releases("hello").await.is_empty());
    repo.assert_spool_empties().await;
    repo.stop().await;
}

#[tokio::test]
async fn client_disconnect_mid_upload_leaves_nothing() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let addr = repo.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST /v1/apps/hello/releases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{}: {}\r\nContent-Length: {}\r\n\r\n",
        repo.deploy_token,
        px_proto::api::HEADER_BUNDLE_SHA256,
        "a".repeat(64),
        10 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![1u8; 512 * 1024]).await.unwrap();
    stream.flush().await.unwrap();
    // Let the server spool what arrived, then vanish.
    for _ in 0..100 {
        if std::fs::read_dir(repo.spool_dir()).unwrap().count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    repo.assert_spool_empties().await;
    assert!(repo.releases("hello").await.is_empty());
    // The next upload works.
    assert_eq!(
        repo.deploy("hello", &sample_bundle("hello", "after"))
            .await
            .version,
        1
    );
    repo.stop().await;
}

#[tokio::test]
async fn config_changes_need_a_release_and_valid_keys() {
    let repo = Repo::start_fs().await;
    repo.create_app("hello").await;
    let patch = |body: serde_json::Value| {
        repo.http
            .patch(format!("{}/v1/apps/hello/config", repo.url))
            .bearer_auth(&repo.deploy_token)
            .json(&body)
            .send()
    };
    assert_eq!(
        patch(serde_json::json!({"set": {"A": "1"}}))
            .await
            .unwrap()
            .status(),
        StatusCode::CONFLICT
    );
    repo.deploy("hello", &sample_bundle("hello", "x")).await;
    assert_eq!(
        patch(serde_json::json!({})).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        patch(serde_json::json!({"set": {"1BAD": "x"}}))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        patch(serde_json::json!({"sett": {}}))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let r = repo
        .http
        .post(format!("{}/v1/apps/hello/rollback", repo.url))
        .bearer_auth(&repo.deploy_token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "only v1: nothing to roll back to"
    );
    assert_eq!(repo.releases("hello").await.len(), 1);
    repo.stop().await;
}

#[tokio::test]
async fn two_repositories_sharing_storage_never_lose_a_release() {
    // Two apprepo services over one storage directory: their per-process commit locks do not
    // see each other, so only the create-if-absent release records keep numbers unique.
    let first = Repo::start_fs().await;
    let shared = first.data.path().to_path_buf();
    let deploy = first.deploy_token.clone();
    let read = first.read_token.clone();
    let second = Repo::start_with(|c| {
        c.data_dir = shared;
        c.tokens = first.config.tokens.clone();
    })
    .await;
    first.create_app("shared").await;
    let bundles: Vec<Vec<u8>> = (0..12)
        .map(|i| sample_bundle("shared", &format!("b{i}")))
        .collect();
    let uploads = bundles.iter().enumerate().map(|(i, b)| {
        let repo = if i % 2 == 0 { &first } else { &second };
        repo.upload_request("shared", b, &deploy).send()
    });
    let mut versions = Vec::new();
    for r in futures_util::future::join_all(uploads).await {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        versions.push(r.json::<px_proto::api::Release>().await.unwrap().version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=12).collect::<Vec<u64>>());
    let listed: Vec<px_proto::api::Release> = second
        .get("/v1/apps/shared/releases", &read)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut digests: Vec<_> = listed.iter().map(|r| r.bundle.sha256.clone()).collect();
    digests.sort();
    let mut expected: Vec<_> = bundles.iter().map(|b| sha256_hex(b)).collect();
    expected.sort();
    assert_eq!(digests, expected);
    let current: px_proto::api::Release = first
        .get("/v1/apps/shared/releases/current", &read)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current.version, 12);
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn scaling_changes_only_the_named_types_and_makes_no_release() {
    let repo = Repo::start_fs().await;
    suite::formation(&repo).await;
    let stored = repo.data.path().join("storage/apps/shop/formation.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    assert_eq!(record["counts"]["web"], 2);
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_scales_lose_no_change() {
    let repo = Repo::start_fs().await;
    suite::concurrent_scales(&repo).await;
    repo.stop().await;
}

/// Reads what the server sends until it closes the connection, for at most `limit`.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> (String, Duration) {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, tcp.read_to_end(&mut got)).await;
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_half_sent_request_is_cut_and_connections_beyond_the_cap_wait() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let header = Duration::from_millis(800);
    let repo = Repo::start_with(|c| {
        c.http.header_read_timeout = header;
        c.http.max_connections = 2;
    })
    .await;
    let addr = repo.url.trim_start_matches("http://").to_owned();
    // Two clients that send half a request head hold both connections...
    let mut first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    first.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    second
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // ...so a third waits, unanswered, beyond the cap...
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(header / 4, third.read(&mut byte)).await;
    assert!(early.is_err(), "a connection beyond the cap was served");
    // ...until the server cuts the half-sent heads at the deadline, and then it is answered.
    let (_, took) = read_until_closed(&mut first, Duration::from_secs(10)).await;
    assert!(took < header * 4, "a half-sent head was kept {took:?}");
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
}

/// The sample app, serving `domains`.
fn bundle_with_domains(name: &str, domains: &[&str]) -> Vec<u8> {
    app_with_domains(name, domains, false)
}

/// The sample app serving `domains`, with a `requirements.txt` (so it needs a build) if `built`.
fn app_with_domains(name: &str, domains: &[&str], built: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    px_test_support::write_sample_app(dir.path(), name).unwrap();
    if built {
        std::fs::write(dir.path().join("requirements.txt"), "gunicorn==23.0.0\n").unwrap();
    }
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

#[tokio::test]
async fn a_domain_another_app_holds_is_refused_naming_the_holder() {
    let repo = Repo::start_fs().await;
    repo.create_app("shop").await;
    repo.create_app("rival").await;
    repo.deploy("shop", &bundle_with_domains("shop", &["shop.example.com"]))
        .await;
    // Another app claiming the same name is refused with the holder named, and keeps nothing.
    let r = repo
        .upload(
            "rival",
            &bundle_with_domains("rival", &["rival.example.com", "shop.example.com"]),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "domain_taken");
    assert!(
        body.message.contains("\"shop.example.com\""),
        "{}",
        body.message
    );
    assert!(
        body.message.contains("app \"shop\" (its release v1)"),
        "{}",
        body.message
    );
    assert!(repo.releases("rival").await.is_empty());
    repo.assert_spool_empties().await;
    // An upload that needs a build is refused before a build is queued for nothing.
    let r = repo
        .upload(
            "rival",
            &app_with_domains("rival", &["shop.example.com"], true),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(repo.pending_builds().await.is_empty());
    // The holder redeploys with its name, and a free name is taken by whoever asks.
    let again = repo
        .deploy("shop", &bundle_with_domains("shop", &["shop.example.com"]))
        .await;
    assert_eq!(again.version, 2);
    // The release records what its bundle unpacks to, for the web servers' disk check.
    let unpacked = again
        .bundle
        .unpacked_size
        .expect("no unpacked size recorded");
    assert!(unpacked > 0 && unpacked < 1 << 20, "{unpacked}");
    let rival = repo
        .deploy(
            "rival",
            &bundle_with_domains("rival", &["rival.example.com"]),
        )
        .await;
    assert_eq!(rival.manifest.http.domains, ["rival.example.com"]);
    // Once the holder lets the name go, the other app may take it.
    repo.deploy(
        "shop",
        &bundle_with_domains("shop", &["www.shop.example.com"]),
    )
    .await;
    let taken = repo
        .deploy(
            "rival",
            &bundle_with_domains("rival", &["shop.example.com"]),
        )
        .await;
    assert_eq!(taken.manifest.http.domains, ["shop.example.com"]);
    repo.stop().await;
}

/// A client that trusts `ca` alone, as `em` with the cluster's `ca_file` does.
fn trusting(ca: &std::path::Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_api_serves_https_to_a_client_trusting_its_ca_and_no_other() {
    let pki = px_test_support::Pki::new(&["localhost"]).unwrap();
    let data = tempfile::tempdir().unwrap();
    let (mut config, deploy, _) = common::test_config(data.path());
    config.api_tls = px_runtime::http_server::ApiTls {
        cert_file: Some(pki.cert()),
        key_file: Some(pki.key()),
        plain_http: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(px_repository::run(config, listener, shutdown.clone()));
    let apps = format!("https://localhost:{port}/v1/apps");
    let client = trusting(&pki.ca());
    let mut answered = None;
    for _ in 0..200 {
        if let Ok(response) = client.get(&apps).bearer_auth(&deploy).send().await {
            answered = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(answered, Some(StatusCode::OK));

    // A client trusting another CA, or only the public roots, is refused in the handshake, before
    // its token is sent.
    let other = px_test_support::Pki::new(&["localhost"]).unwrap();
    for client in [trusting(&other.ca()), reqwest::Client::new()] {
        let err = client
            .get(&apps)
            .bearer_auth(&deploy)
            .send()
            .await
            .unwrap_err();
        let chain = px_runtime::errors::error_chain(&err);
        assert!(chain.contains("certificate"), "{chain}");
    }
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/apps"))
        .bearer_auth(&deploy)
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[test]
fn an_api_with_neither_a_certificate_nor_plain_http_chosen_is_refused_at_start() {
    let data = tempfile::tempdir().unwrap();
    let (mut config, _, _) = common::test_config(data.path());
    config.api_tls = px_runtime::http_server::ApiTls::default();
    let err = px_repository::check(&config).err().unwrap().to_string();
    assert!(err.contains("api_tls.cert_file"), "{err}");
    assert!(err.contains("api_tls.plain_http = true"), "{err}");
}

#[tokio::test]
async fn domains_are_added_and_removed_without_a_release() {
    let repo = Repo::start_fs().await;
    domain_suite::added_domains(&repo).await;
    let stored = repo.data.path().join("storage/apps/shop/domains.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    assert_eq!(record["domains"], serde_json::json!(["api.shop.example"]));
    repo.stop().await;
}

#[tokio::test]
async fn an_app_adds_at_most_max_domains_names() {
    let repo = Repo::start_fs().await;
    domain_suite::the_added_names_have_a_limit(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn an_added_name_belongs_to_one_app() {
    let repo = Repo::start_fs().await;
    domain_suite::a_name_belongs_to_one_app(&repo).await;
    repo.stop().await;
}

#[tokio::test]
async fn concurrent_domain_adds_lose_none() {
    let repo = Repo::start_fs().await;
    domain_suite::concurrent_adds(&repo).await;
    repo.stop().await;
}
