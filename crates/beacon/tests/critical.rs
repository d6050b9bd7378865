//! Beacon's critical tasks: when one ends while Beacon runs, Beacon stops with an error naming
//! it (so systemd restarts the process) instead of serving on half deaf.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{RepoStub, Tokens, WAIT, config};
use px_beacon::StartError;
use px_test_support::Pki;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_broken_link_listener_stops_beacon_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (_repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let cfg = config(dir.path(), &pki, &tokens, &url);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_url = format!("https://localhost:{}", http.local_addr().unwrap().port());
    let control = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    control.set_nonblocking(true).unwrap();
    // Another descriptor of the same socket, to break it under Beacon.
    let same_socket = control.try_clone().unwrap();
    let control = tokio::net::TcpListener::from_std(control).unwrap();
    let shutdown = CancellationToken::new();
    let beacon = tokio::spawn(px_beacon::run(
        cfg,
        px_beacon::Listeners { http, control },
        shutdown.clone(),
    ));
    let client = common::https_client(&pki);
    let healthz = format!("{http_url}/healthz");
    let started = std::time::Instant::now();
    while client.get(&healthz).send().await.is_err() {
        assert!(started.elapsed() < WAIT, "beacon did not start");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    // The socket stops listening: every accept on it now fails with EINVAL.
    rustix::net::shutdown(&same_socket, rustix::net::Shutdown::Read).unwrap();

    let result = tokio::time::timeout(WAIT, beacon)
        .await
        .expect("beacon kept running without its link server")
        .unwrap();
    let error = result.unwrap_err();
    assert!(matches!(error, StartError::TaskEnded(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("the link server failed: the control listener no longer accepts links"),
        "{error}"
    );
    assert!(
        shutdown.is_cancelled(),
        "the root token is cancelled, so services sharing it (em up) stop too"
    );
    assert!(
        client.get(&healthz).send().await.is_err(),
        "the http server stopped with it"
    );
}
