//! Every control link proves who it is: a Maestro token speaks only for its own node, a node
//! reports only on what it was given, a peer that has not proved itself is held to a small
//! frame, a short deadline and a few connections, and a reload closes the links whose token
//! no longer verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Beacon, RepoStub, Tokens, config, maestro_hello, next_assign, open_link};
use futures_util::SinkExt;
use px_proto::beacon::Node;
use px_proto::link::{FromBeacon, ToBeacon};
use px_test_support::Pki;

struct Setup {
    _dir: tempfile::TempDir,
    _repo: RepoStub,
    tokens: Tokens,
    beacon: Beacon,
}

/// A Beacon whose repository holds app `hello` v1.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new();
    let (repo, url) = RepoStub::start(tokens.repo_read.clone()).await;
    repo.release("hello", 1, "");
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let cfg = config(dir.path(), &pki, &tokens, &url);
    let beacon = Beacon::start(cfg, pki, &tokens, 0).await;
    Setup {
        _dir: dir,
        _repo: repo,
        tokens,
        beacon,
    }
}

fn rejection(answer: FromBeacon) -> String {
    match answer {
        FromBeacon::Rejected { reason } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stolen_maestro_token_cannot_link_as_another_node_nor_disconnect_it() {
    let s = setup().await;
    let (mut web1, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", &s.tokens.maestro, 0),
    )
    .await;
    assert!(matches!(answer, FromBeacon::Welcome { .. }), "{answer:?}");
    next_assign(&mut web1).await;

    // web-2's token, taken from its host, names web-1: refused, naming both.
    let (_, answer) = open_link(
        &s.beacon.control_addr,
        &s.beacon.pki.ca(),
        maestro_hello("web-1", s.tokens.maestro.of("web-2"), 0),
    )
    .await;
    let reason = rejection(answer);
    assert!(
        reason.contains("\"web-2\"") && reason.contains("\"web-1\""),
        "{reason}"
    );

    // web-1 keeps its link: it is still connected, and its heartbeat is still taken.
    web1.send(ToBeacon::Heartbeat(common::report_of("hello", 1)))
        .await
        .unwrap();
    s.beacon
        .wait_for(
            "/v1/nodes",
            "web-1 still linked and reporting",
            |nodes: &Vec<Node>| {
                nodes.iter().any(|n| {
                    n.name == "web-1"
                        && n.health == px_proto::beacon::NodeHealth::Connected
                        && n.instances.len() == 1
                })
            },
        )
        .await;
    let nodes: Vec<Node> = s.beacon.get("/v1/nodes").await;
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["web-1"]
    );
    s.beacon.stop().await;
}
