//! apprepo tells Beacon about committed releases and builds waiting for a node over the TLS
//! link, and an absent Beacon never holds up an upload. Beacon's side is played by a listener speaking the real codec.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Repo, build_suite, sample_bundle};
use futures_util::{SinkExt, StreamExt};
use px_proto::api::ReleaseCause;
use px_proto::build::{BuildFinished, BuildRequested};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_ANSWER_DEADLINE, PROTOCOL_VERSION, PeerRole,
    ReleaseCommitted, RollbackOrder, ToBeacon, beacon_heartbeat_ms,
};
use px_repository::config::BeaconConfig;
use px_test_support::Pki;
use tokio_util::codec::Framed;

const LINK_TOKEN: &str = "pxt_link-token-for-tests";
/// How late deadlines may be met on a paused clock: tokio's timers count whole milliseconds,
/// and the clock jumps to the millisecond at or after a deadline, so each timer fires a moment
/// late (never early), and this test waits on two in a row.
const TIMER_SLACK: Duration = Duration::from_millis(10);

fn beacon_config(dir: &std::path::Path, pki: &Pki, port: u16) -> BeaconConfig {
    let token_file = dir.join("beacon-token");
    px_runtime::secrets::write_secret_file(&token_file, LINK_TOKEN).unwrap();
    BeaconConfig {
        addr: Some(format!("127.0.0.1:{port}")),
        addrs: Vec::new(),
        server_name: Some("beacon.test".into()),
        ca_file: pki.ca(),
        token_file,
        name: "repo-test".into(),
    }
}

#[tokio::test]
async fn committed_releases_reach_beacon_over_tls() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
    );
    let secrets = tempfile::tempdir().unwrap();
    let beacon = beacon_config(secrets.path(), &pki, port);
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;

    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let tls = acceptor.accept(tcp).await.unwrap();
    let mut link = Framed::new(tls, FrameCodec::<ToBeacon, FromBeacon>::new());
    let Some(Ok(ToBeacon::Hello(hello))) = link.next().await else {
        panic!("expected hello")
    };
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.role, PeerRole::Repository);
    assert_eq!(hello.token, LINK_TOKEN);
    assert_eq!(hello.name, "repo-test");
    link.send(FromBeacon::Welcome {
        protocol: PROTOCOL_VERSION,
        beacon: "test".into(),
        // As a Beacon that predates heartbeat announcements and answers: the test sends none.
        heartbeat_ms: None,
        answers_heartbeats: false,
    })
    .await
    .unwrap();

    repo.create_app("hello").await;
    let release = repo.deploy("hello", &sample_bundle("hello", "x")).await;
    let notice = loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            Some(Ok(ToBeacon::ReleaseCommitted(n))) => break n,
            // The minted tokens' list comes on every connect.
            Some(Ok(ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let expected = ReleaseCommitted {
        app: "hello".into(),
        version: release.version,
        bundle_sha256: release.bundle.sha256,
    };
    assert_eq!(notice, expected);

    // Scaling makes no release, but Beacon hears of it at once the same way, and rereads.
    let scaled = repo.scale("hello", serde_json::json!({"web": 2})).await;
    assert_eq!(scaled.status(), reqwest::StatusCode::OK);
    let notice = loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            Some(Ok(ToBeacon::ReleaseCommitted(n))) => break n,
            // The minted tokens' list comes on every connect.
            Some(Ok(ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(notice, expected);

    // So do an added domain and a removed one: each is a notice of the current release.
    for change in [
        repo.add_domain("hello", "hello.example.com").await,
        repo.remove_domain("hello", "hello.example.com").await,
    ] {
        assert!(change.status().is_success(), "{}", change.status());
        let notice = loop {
            match tokio::time::timeout(Duration::from_secs(10), link.next())
                .await
                .unwrap()
            {
                Some(Ok(ToBeacon::ReleaseCommitted(n))) => break n,
                Some(Ok(ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_))) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(notice, expected);
    }
    repo.stop().await;
}

#[tokio::test]
async fn release_notifications_reach_the_active_beacon_on_the_second_address() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    // The first control host's Beacon is down (nothing listens there); the second's is active.
    let dead = px_test_support::free_port();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let active = listener.local_addr().unwrap().to_string();
    let secrets = tempfile::tempdir().unwrap();
    let beacon = BeaconConfig {
        addr: None,
        addrs: vec![format!("127.0.0.1:{dead}"), active],
        ..beacon_config(secrets.path(), &pki, dead)
    };
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;
    let mut link = accept_link(&listener, &pki).await;

    repo.create_app("hello").await;
    let release = repo.deploy("hello", &sample_bundle("hello", "x")).await;
    let notice = loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            Some(Ok(ToBeacon::ReleaseCommitted(n))) => break n,
            Some(Ok(ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_))) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        notice,
        ReleaseCommitted {
            app: "hello".into(),
            version: release.version,
            bundle_sha256: release.bundle.sha256,
        }
    );
    repo.stop().await;
}

#[tokio::test]
async fn uploads_succeed_while_beacon_is_away_and_news_arrives_when_it_returns() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let port = px_test_support::free_port();
    let secrets = tempfile::tempdir().unwrap();
    let beacon = beacon_config(secrets.path(), &pki, port);
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;
    repo.create_app("hello").await;
    let started = std::time::Instant::now();
    let release = tokio::time::timeout(
        Duration::from_secs(10),
        repo.deploy("hello", &sample_bundle("hello", "x")),
    )
    .await
    .expect("an upload must not wait for beacon");
    assert_eq!(release.version, 1);
    eprintln!("upload with beacon away took {:?}", started.elapsed());

    // Beacon comes up: the notifier reconnects and delivers what it kept.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
    );
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut link = Framed::new(
        acceptor.accept(tcp).await.unwrap(),
        FrameCodec::<ToBeacon, FromBeacon>::new(),
    );
    assert!(matches!(link.next().await, Some(Ok(ToBeacon::Hello(_)))));
    link.send(FromBeacon::Welcome {
        protocol: PROTOCOL_VERSION,
        beacon: "test".into(),
        // As a Beacon that predates heartbeat announcements and answers: the test sends none.
        heartbeat_ms: None,
        answers_heartbeats: false,
    })
    .await
    .unwrap();
    // The minted tokens' list comes first on every connect, then the kept notice.
    let tokens = tokio::time::timeout(Duration::from_secs(10), link.next())
        .await
        .unwrap();
    assert!(
        matches!(tokens, Some(Ok(ToBeacon::Tokens(_)))),
        "{tokens:?}"
    );
    let next = tokio::time::timeout(Duration::from_secs(10), link.next())
        .await
        .unwrap();
    assert!(
        matches!(next, Some(Ok(ToBeacon::ReleaseCommitted(ref n))) if n.version == 1),
        "{next:?}"
    );
    repo.stop().await;
}

#[tokio::test]
async fn a_rejected_link_is_retried_without_affecting_uploads() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
    );
    let secrets = tempfile::tempdir().unwrap();
    let repo =
        Repo::start_with(|c| c.beacon = Some(beacon_config(secrets.path(), &pki, port))).await;
    for _ in 0..2 {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut link = Framed::new(
            acceptor.accept(tcp).await.unwrap(),
            FrameCodec::<ToBeacon, FromBeacon>::new(),
        );
        assert!(matches!(link.next().await, Some(Ok(ToBeacon::Hello(_)))));
        link.send(FromBeacon::Rejected {
            reason: "unknown token".into(),
        })
        .await
        .unwrap();
    }
    repo.create_app("hello").await;
    assert_eq!(
        repo.deploy("hello", &sample_bundle("hello", "x"))
            .await
            .version,
        1
    );
    repo.stop().await;
}

#[tokio::test]
async fn a_silent_beacon_is_left_and_linked_again() {
    // A Beacon that welcomes the repository, saying it answers heartbeats, and then never
    // speaks (its host vanished, without closing the connection): once its first heartbeat
    // goes unanswered the notifier gives the link up and connects again.
    let deadline = HEARTBEAT_ANSWER_DEADLINE;
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
    );
    let secrets = tempfile::tempdir().unwrap();
    let repo =
        Repo::start_with(|c| c.beacon = Some(beacon_config(secrets.path(), &pki, port))).await;
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut silent = Framed::new(
        acceptor.accept(tcp).await.unwrap(),
        FrameCodec::<ToBeacon, FromBeacon>::new(),
    );
    assert!(matches!(silent.next().await, Some(Ok(ToBeacon::Hello(_)))));
    let welcomed = tokio::time::Instant::now();
    silent
        .send(FromBeacon::Welcome {
            protocol: PROTOCOL_VERSION,
            beacon: "test".into(),
            heartbeat_ms: Some(beacon_heartbeat_ms()),
            answers_heartbeats: true,
        })
        .await
        .unwrap();
    // The notifier's first frame (the minted tokens' list) says it took the welcome, so its
    // silence deadline is armed.
    assert!(matches!(silent.next().await, Some(Ok(ToBeacon::Tokens(_)))));
    let heard = tokio::time::Instant::now();
    // From here the notifier waits on its own timers only (heartbeats, the silence deadline),
    // so tokio's clock is paused: the runtime, idle, moves it from timer to timer, and the
    // seconds of silence take no time. The handshake above ran on the real clock, as a
    // paused one would also move to the handshake timeout whenever both ends wait on the socket.
    tokio::time::pause();
    let guard = deadline + Duration::from_secs(15);
    let second = tokio::time::timeout(guard, listener.accept()).await;
    assert!(
        second.is_ok(),
        "the notifier never reconnected after beacon went silent"
    );
    // Not before the deadline. The runtime sees the new connection at its next wake-up, and a
    // paused clock moves on to the next timer at each one, here at the latest the new
    // connection's handshake timeout: so the accept comes within that of the deadline.
    let (since_welcome, since_heard) = (welcomed.elapsed(), heard.elapsed());
    assert!(since_welcome >= deadline, "{since_welcome:?}");
    assert!(
        since_heard <= deadline + HANDSHAKE_TIMEOUT + TIMER_SLACK,
        "{since_heard:?}"
    );
    drop(silent);
    repo.stop().await;
}

/// Accepts apprepo's link as Beacon would, answering its hello.
async fn accept_link(
    listener: &tokio::net::TcpListener,
    pki: &Pki,
) -> Framed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, FrameCodec<ToBeacon, FromBeacon>>
{
    let acceptor = tokio_rustls::TlsAcceptor::from(
        px_runtime::tls::server_config(&pki.cert(), &pki.key()).unwrap(),
    );
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut link = Framed::new(acceptor.accept(tcp).await.unwrap(), FrameCodec::new());
    let Some(Ok(ToBeacon::Hello(_))) = link.next().await else {
        panic!("expected hello")
    };
    link.send(FromBeacon::Welcome {
        protocol: PROTOCOL_VERSION,
        beacon: "test".into(),
        // As a Beacon that predates heartbeat announcements and answers: the test sends none.
        heartbeat_ms: None,
        answers_heartbeats: false,
    })
    .await
    .unwrap();
    link
}

#[tokio::test]
async fn beacons_rollback_orders_are_committed_once_and_stale_ones_ignored() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let secrets = tempfile::tempdir().unwrap();
    let beacon = beacon_config(secrets.path(), &pki, port);
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;
    let mut link = accept_link(&listener, &pki).await;
    repo.create_app("hello").await;
    let good = repo.deploy("hello", &sample_bundle("hello", "good")).await;
    let bad = repo.deploy("hello", &sample_bundle("hello", "bad")).await;
    assert_eq!((good.version, bad.version), (1, 2));

    // The order arrives twice (Beacon repeats pending orders on every change and reconnect).
    let order = RollbackOrder {
        app: "hello".into(),
        from: 2,
        to: Some(1),
        reason: "automatic rollback of v2: 30 of 40 requests (75.0%) answered 5xx".into(),
    };
    for _ in 0..2 {
        link.send(FromBeacon::Rollback(order.clone()))
            .await
            .unwrap();
    }
    let notice = loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            // The deploys' own notices come first.
            Some(Ok(ToBeacon::ReleaseCommitted(n))) if n.version > 2 => break n,
            Some(Ok(
                ToBeacon::ReleaseCommitted(_) | ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_),
            )) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((notice.app.as_str(), notice.version), ("hello", 3));
    assert_eq!(notice.bundle_sha256, good.bundle.sha256);
    // Once more, after it was carried out: v2 is no longer current, so nothing happens.
    link.send(FromBeacon::Rollback(order)).await.unwrap();
    // And an order about a release that was never current changes nothing either.
    link.send(FromBeacon::Rollback(RollbackOrder {
        app: "hello".into(),
        from: 7,
        to: None,
        reason: "stale".into(),
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let releases = repo.releases("hello").await;
    assert_eq!(releases.len(), 3, "{releases:?}");
    let rollback = &releases[0];
    assert_eq!(rollback.version, 3);
    assert_eq!(rollback.cause, ReleaseCause::Rollback { to: 1 });
    assert_eq!(rollback.created_by, "beacon");
    assert!(
        rollback.description.contains("75.0%"),
        "{}",
        rollback.description
    );
    repo.stop().await;
}

/// An upload that needs a build tells Beacon to place it; its finish tells Beacon of the
/// release, as any commit does.
#[tokio::test]
async fn builds_waiting_for_a_node_and_their_releases_reach_beacon() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let secrets = tempfile::tempdir().unwrap();
    let beacon = beacon_config(secrets.path(), &pki, port);
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;
    let mut link = accept_link(&listener, &pki).await;
    repo.create_app("shop").await;
    let build = repo
        .queue("shop", &common::built_bundle("shop", "one"))
        .await;
    let mut next = async || loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            // The minted tokens' list comes on every connect.
            Some(Ok(ToBeacon::Heartbeat(_) | ToBeacon::Tokens(_))) => continue,
            Some(Ok(frame)) => break frame,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        next().await,
        ToBeacon::BuildRequested(BuildRequested {
            app: "shop".into(),
            build: build.number
        })
    );
    let made = build_suite::layers("one");
    repo.upload_layers(&made).await;
    let finished = BuildFinished {
        output: build_suite::output(build.number, &made),
        log: "done\n".into(),
    };
    let r = repo.finish("shop", build.number, &finished).await;
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let release: px_proto::api::Release = r.json().await.unwrap();
    assert_eq!(
        next().await,
        ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "shop".into(),
            version: release.version,
            bundle_sha256: build.source.sha256,
        })
    );
    repo.stop().await;
}

#[tokio::test]
async fn minted_tokens_reach_beacon_as_hashes_on_connect_on_mint_and_on_revoke() {
    let pki = Pki::new(&["beacon.test"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let secrets = tempfile::tempdir().unwrap();
    let beacon = beacon_config(secrets.path(), &pki, port);
    let repo = Repo::start_with(|c| c.beacon = Some(beacon)).await;
    let mut link = accept_link(&listener, &pki).await;
    let mut next_list = async || loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .unwrap()
        {
            Some(Ok(ToBeacon::Tokens(list))) => break list.grants,
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(next_list().await.is_empty(), "none minted yet");
    repo.create_app("shop").await;
    let minted: px_proto::api::TokenMinted = common::scope_suite::mint(
        &repo,
        &repo.deploy_token,
        serde_json::json!({ "name": "ci-shop", "role": "deploy", "apps": ["shop"] }),
    )
    .await
    .json()
    .await
    .unwrap();
    let grants = next_list().await;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].info.apps, ["shop"]);
    assert_eq!(grants[0].sha256, px_runtime::tokens::hash(&minted.token));
    assert!(
        !format!("{grants:?}").contains(&minted.token),
        "never the secret"
    );
    let r = repo
        .http
        .delete(format!("{}/v1/tokens/ci-shop", repo.url))
        .bearer_auth(&repo.deploy_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert!(next_list().await.is_empty(), "revoked");
    repo.stop().await;
}
