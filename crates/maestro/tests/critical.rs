//! Maestro's critical tasks: when one ends while Maestro runs, Maestro stops (its apps too) with
//! an error naming it, so systemd restarts the process instead of leaving it serving half deaf.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{WAIT, config};
use px_maestro::Error;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_broken_proxy_listener_stops_maestro_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None);
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    http.set_nonblocking(true).unwrap();
    // Another descriptor of the same socket, to break it under Maestro.
    let same_socket = http.try_clone().unwrap();
    let http = tokio::net::TcpListener::from_std(http).unwrap();
    let status = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let healthz = format!("http://{}/healthz", status.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let maestro = tokio::spawn(px_maestro::run(
        cfg,
        px_maestro::Listeners {
            http,
            https: None,
            status,
        },
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    while client.get(&healthz).send().await.is_err() {
        assert!(started.elapsed() < WAIT, "maestro did not start");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The socket stops listening: every accept on it now fails with EINVAL.
    rustix::net::shutdown(&same_socket, rustix::net::Shutdown::Read).unwrap();

    let result = tokio::time::timeout(WAIT, maestro)
        .await
        .expect("maestro kept running without its proxy")
        .unwrap();
    let error = result.unwrap_err();
    assert!(matches!(error, Error::TaskEnded(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("the http proxy failed: the listener no longer accepts connections"),
        "{error}"
    );
    assert!(
        shutdown.is_cancelled(),
        "the root token is cancelled, so services sharing it (em up) stop too"
    );
    assert!(
        client.get(&healthz).send().await.is_err(),
        "the status server stopped with it"
    );
}
