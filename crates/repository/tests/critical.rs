//! apprepo's critical tasks: when one ends while apprepo runs, apprepo stops with an error
//! naming it (so systemd restarts the process) instead of staying up but unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use px_repository::StartError;
use tokio_util::sync::CancellationToken;

/// Long enough for apprepo to start or stop on a loaded machine; reached only when broken.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_broken_http_listener_stops_apprepo_with_an_error() {
    let data = tempfile::tempdir().unwrap();
    let (config, _, _) = common::test_config(data.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    // Another descriptor of the same socket, to break it under apprepo.
    let same_socket = listener.try_clone().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let healthz = format!("http://{}/healthz", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let apprepo = tokio::spawn(px_repository::run(config, listener, shutdown.clone()));
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    while client.get(&healthz).send().await.is_err() {
        assert!(started.elapsed() < WAIT, "apprepo did not start");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The socket stops listening: every accept on it now fails with EINVAL.
    rustix::net::shutdown(&same_socket, rustix::net::Shutdown::Read).unwrap();

    let result = tokio::time::timeout(WAIT, apprepo)
        .await
        .expect("apprepo kept running without its http server")
        .unwrap();
    let error = result.unwrap_err();
    assert!(matches!(error, StartError::TaskEnded(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("the http server failed: the http listener no longer accepts connections"),
        "{error}"
    );
    assert!(
        shutdown.is_cancelled(),
        "the root token is cancelled, so services sharing it (em up) stop too"
    );
}
