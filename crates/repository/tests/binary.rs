//! The `apprepo` binary itself: config checking with exit code 78, and SIGKILL in the middle of
//! an upload, after which nothing partial is visible and the next upload works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{sample_bundle, sha256_hex};
use px_runtime::tokens::{generate, hash};
use reqwest::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_apprepo");

fn write_config(dir: &Path, port: u16, deploy: &str) -> std::path::PathBuf {
    let path = dir.join("apprepo.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[api_tls]\nplain_http = true\n[[tokens]]\nname = \"ci\"\nrole = \"deploy\"\nsha256 = \"{}\"\n",
            dir.join("data").display(),
            hash(deploy)
        ),
    )
    .unwrap();
    path
}

fn spawn(config: &Path, port: u16) -> Child {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    px_test_support::wait_for_port(port, Duration::from_secs(20)).unwrap();
    child
}

#[test]
fn check_config_accepts_good_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 7070, &generate());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(&config, "listen = \"nowhere\"\nlisten_adress = 1\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apprepo.toml"), "{err}");
    assert!(err.contains("listen"), "{err}");

    // No tokens at all is a config error that says how to make one.
    std::fs::write(&config, "").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("apprepo token-new"));

    // Environment variables override the file, and are checked too.
    let out = Command::new(BIN)
        .arg("--check-config")
        .env("PX_APPREPO_LIMITS__MAX_BUNDLE_BYTES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bundle_bytes"));
}

#[test]
fn token_new_prints_a_token_whose_hash_it_shows() {
    for role in ["deploy", "read", "build"] {
        let out = Command::new(BIN)
            .args(["token-new", "--name", "ci", "--role", role])
            .output()
            .unwrap();
        assert!(out.status.success());
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let entry = String::from_utf8(out.stderr).unwrap();
        assert!(entry.contains(&hash(&token)), "{entry}");
        assert!(entry.contains(&format!("role = \"{role}\"")), "{entry}");
    }
    let out = Command::new(BIN)
        .args(["token-new", "--name", "ci", "--role", "admin"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`build`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_leaves_no_partial_release() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = generate();
    let port = px_test_support::free_port();
    let config = write_config(dir.path(), port, &deploy);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut child = spawn(&config, port);

    let r = http
        .post(format!("{url}/v1/apps"))
        .bearer_auth(&deploy)
        .json(&serde_json::json!({"name": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // An upload that sends half its bytes and then stalls.
    let bundle = sample_bundle("hello", &"x".repeat(1 << 20));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let half = bundle[..bundle.len() / 2].to_vec();
    tx.send(Ok(half)).await.unwrap();
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let pending = tokio::spawn(
        http.post(format!("{url}/v1/apps/hello/releases"))
            .bearer_auth(&deploy)
            .header(px_proto::api::HEADER_BUNDLE_SHA256, sha256_hex(&bundle))
            .header("content-length", bundle.len())
            .body(body)
            .send(),
    );
    let spool = dir.path().join("data/tmp");
    for _ in 0..200 {
        if std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        std::fs::read_dir(&spool).unwrap().count() > 0,
        "the upload reached the spool"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    drop(tx);
    assert!(
        pending.await.unwrap().is_err(),
        "the client sees the connection die"
    );

    let mut child = spawn(&config, port);
    // The port opens (bound by `main`) before start-up has cleared the spool; the first answer
    // comes after.
    let r = http
        .get(format!("{url}/v1/apps/hello/releases"))
        .bearer_auth(&deploy)
        .send()
        .await
        .unwrap();
    let releases: Vec<px_proto::api::Release> = r.json().await.unwrap();
    assert!(releases.is_empty(), "no partial release: {releases:?}");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "start-up clears partial uploads"
    );
    let r = http
        .post(format!("{url}/v1/apps/hello/releases"))
        .bearer_auth(&deploy)
        .header(px_proto::api::HEADER_BUNDLE_SHA256, sha256_hex(&bundle))
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let release: px_proto::api::Release = r.json().await.unwrap();
    assert_eq!(release.version, 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
