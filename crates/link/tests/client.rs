//! The link client against a Beacon played by the test: a TLS listener speaking the real
//! codec. Each test checks what Beacon (or the service) would see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use px_link::{BeaconConfig, Link, LinkError, LinkSettings};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_ANSWER_DEADLINE, HEARTBEAT_DEADLINE, Hello,
    MISSED_BEACON_HEARTBEATS, NodeReport, PROTOCOL_VERSION, PeerRole, ToBeacon,
    beacon_heartbeat_ms,
};
use px_test_support::Pki;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "pxt_link-token-for-tests";
/// Bounds how long a failing test hangs.
const WAIT: Duration = Duration::from_secs(10);
/// How late a deadline may be met on a paused clock: tokio's timers count whole milliseconds,
/// and the clock jumps to the millisecond at or after a deadline, so a timer fires a moment
/// late, never early.
const TIMER_SLACK: Duration = Duration::from_millis(5);

type BeaconSide = Framed<
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    FrameCodec<ToBeacon, FromBeacon>,
>;

/// Beacon's end: a listener with a certificate for `beacon.test`.
struct Beacon {
    pki: Arc<Pki>,
    listener: TcpListener,
    _secrets: tempfile::TempDir,
    settings: Option<LinkSettings>,
}

impl Beacon {
    async fn start() -> Self {
        let pki = Arc::new(Pki::new(&["beacon.test"]).unwrap());
        Self::start_at("127.0.0.1:0", pki).await
    }

    /// A Beacon on `addr` with a certificate from `pki`, the cluster CA every Beacon's
    /// certificate comes from; its client settings name it alone.
    async fn start_at(addr: &str, pki: Arc<Pki>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let settings = settings_for(
            &pki,
            secrets.path(),
            vec![listener.local_addr().unwrap().to_string()],
        );
        Self {
            pki,
            listener,
            _secrets: secrets,
            settings: Some(settings),
        }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    /// The client's settings (once).
    fn settings(&mut self) -> LinkSettings {
        self.settings.take().unwrap()
    }

    /// Accepts the next link and reads its `Hello`.
    async fn accept(&self) -> (BeaconSide, Hello) {
        let acceptor = tokio_rustls::TlsAcceptor::from(
            px_runtime::tls::server_config(&self.pki.cert(), &self.pki.key()).unwrap(),
        );
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the client connects")
            .unwrap();
        let mut link = Framed::new(acceptor.accept(tcp).await.unwrap(), FrameCodec::new());
        let Some(Ok(ToBeacon::Hello(hello))) = link.next().await else {
            panic!("expected hello")
        };
        (link, hello)
    }

    /// Accepts the next link and welcomes it as a Beacon that predates heartbeat announcements
    /// (so the client keeps the 15 s deadline): these tests send Beacon's heartbeats only when
    /// they say so.
    async fn welcome(&self) -> (BeaconSide, Hello) {
        self.welcome_announcing(None, false).await
    }

    /// Accepts the next link and welcomes it, announcing heartbeats every `heartbeat_ms`, and
    /// answers to every heartbeat when `answers`.
    async fn welcome_announcing(
        &self,
        heartbeat_ms: Option<u64>,
        answers: bool,
    ) -> (BeaconSide, Hello) {
        let (mut link, hello) = self.accept().await;
        link.send(FromBeacon::Welcome {
            protocol: PROTOCOL_VERSION,
            beacon: "test".into(),
            heartbeat_ms,
            answers_heartbeats: answers,
        })
        .await
        .unwrap();
        (link, hello)
    }
}

/// A client's settings for the Beacons at `addrs`, whose certificates `pki` issued.
fn settings_for(pki: &Pki, secrets: &std::path::Path, addrs: Vec<String>) -> LinkSettings {
    let token_file = secrets.join("token");
    px_runtime::secrets::write_secret_file(&token_file, TOKEN).unwrap();
    BeaconConfig {
        addr: None,
        addrs,
        server_name: Some("beacon.test".into()),
        ca_file: pki.ca(),
        token_file,
    }
    .resolve(PeerRole::Maestro, "web-1")
    .unwrap()
}

/// A service on the link: numbers its connects in the `Hello`, sends one heartbeat when
/// linked, ends when Beacon says `Stop { app: "end" }`, and collects what it is given while
/// unlinked.
struct Service {
    connects: u32,
    queued: mpsc::Receiver<u32>,
    kept: Arc<Mutex<Vec<u32>>>,
}

impl Service {
    fn new() -> (Self, mpsc::Sender<u32>, Arc<Mutex<Vec<u32>>>) {
        let (tx, queued) = mpsc::channel(8);
        let kept = Arc::default();
        let service = Self {
            connects: 0,
            queued,
            kept: Arc::clone(&kept),
        };
        (service, tx, kept)
    }
}

impl px_link::Client for Service {
    fn introduce(&mut self, hello: &mut Hello) {
        self.connects += 1;
        hello
            .labels
            .insert("connect".into(), self.connects.to_string());
    }

    async fn session(&mut self, link: &mut Link) -> Result<(), LinkError> {
        link.send(ToBeacon::Heartbeat(NodeReport::default()))
            .await?;
        loop {
            if let FromBeacon::Stop { app } = link.recv().await?
                && app == "end"
            {
                return Ok(());
            }
        }
    }

    async fn unlinked(&mut self) {
        while let Some(item) = self.queued.recv().await {
            self.kept.lock().unwrap().push(item);
        }
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_connect_says_a_fresh_hello_and_a_refused_link_is_tried_again() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let linked = Arc::clone(&settings.linked);
    let (service, _tx, _) = Service::new();
    let run = tokio::spawn(px_link::run(settings, service, CancellationToken::new()));

    let (mut refused, hello) = beacon.accept().await;
    assert_eq!(
        (
            hello.protocol,
            hello.role,
            hello.name.as_str(),
            hello.token.as_str()
        ),
        (PROTOCOL_VERSION, PeerRole::Maestro, "web-1", TOKEN)
    );
    assert_eq!(hello.software, px_proto::SOFTWARE_VERSION);
    assert_eq!(hello.labels["connect"], "1");
    refused
        .send(FromBeacon::Rejected {
            reason: "unknown token".into(),
        })
        .await
        .unwrap();
    assert!(!linked.load(Ordering::Relaxed));

    let (mut link, hello) = beacon.welcome().await;
    assert_eq!(hello.labels["connect"], "2", "the hello is built again");
    assert!(matches!(
        link.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    eventually("linked", || linked.load(Ordering::Relaxed)).await;

    // The service has nothing more to say: the run ends, not linked.
    link.send(FromBeacon::Stop { app: "end".into() })
        .await
        .unwrap();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert!(!linked.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_lost_link_is_made_again() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));
    let (first, _) = beacon.welcome().await;
    drop(first);
    let (_second, hello) = beacon.welcome().await;
    assert_eq!(hello.labels["connect"], "2");
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_closes_an_established_link_cleanly() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));
    let (mut link, _) = beacon.welcome().await;
    assert!(matches!(
        link.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    // A TLS close, not a reset: Beacon reads the end of the stream.
    let end = tokio::time::timeout(WAIT, link.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test]
async fn while_unlinked_the_service_keeps_working_and_may_end_the_run() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let linked = Arc::clone(&settings.linked);
    // Nobody listens at Beacon's address any more: every attempt fails.
    drop(beacon.listener);
    let (service, tx, kept) = Service::new();
    let run = tokio::spawn(px_link::run(settings, service, CancellationToken::new()));
    for item in 1..=3 {
        tx.send(item).await.unwrap();
    }
    eventually("the service got what was queued", || {
        *kept.lock().unwrap() == [1, 2, 3]
    })
    .await;
    drop(tx);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert!(!linked.load(Ordering::Relaxed));
}

/// Links to a Beacon that welcomes the client announcing `heartbeat_ms`, then says nothing
/// while holding the connection open; checks the link gives up exactly `deadline` after the
/// welcome, and says so.
async fn silent_beacon_is_given_up_after(heartbeat_ms: Option<u64>, deadline: Duration) {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let started = tokio::time::Instant::now();
    let (link, beacon_side) = tokio::join!(
        px_link::connect(&settings, &settings.beacons[0], settings.hello()),
        beacon.welcome_announcing(heartbeat_ms, false)
    );
    let mut link = link.unwrap();
    let linked = tokio::time::Instant::now();
    assert_eq!(link.silence_deadline(), deadline);
    // Beacon stays connected and says nothing, so the link waits on nothing but its own silence
    // deadline, armed at the welcome. With tokio's clock paused, the runtime, idle, moves the
    // clock straight to that deadline: the test takes no time, and the clock reads exactly when
    // the link gave up. The handshake above ran on the real clock, as a paused one would also
    // move to the handshake timeout whenever both ends wait on the socket.
    tokio::time::pause();
    let err = tokio::time::timeout(deadline + WAIT, link.recv())
        .await
        .expect("the link never noticed the silence")
        .err()
        .unwrap();
    assert!(
        matches!(err, LinkError::Silent(d) if d == deadline),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "beacon silent for {}s, past its heartbeat deadline",
            deadline.as_secs()
        )
    );
    // Not before the deadline counted from before the connect, nor after it counted from once
    // the link was up.
    let (since_connect, since_linked) = (started.elapsed(), linked.elapsed());
    assert!(since_connect >= deadline, "{since_connect:?}");
    assert!(since_linked <= deadline + TIMER_SLACK, "{since_linked:?}");
    drop(beacon_side);
}

#[tokio::test]
async fn a_silent_beacon_ends_the_link_after_three_of_the_heartbeats_it_announced() {
    // As a Beacon that beat every 2 s on its own, before it answered heartbeats, announced.
    let deadline = Duration::from_secs(2) * MISSED_BEACON_HEARTBEATS;
    assert_eq!(deadline, Duration::from_secs(6));
    silent_beacon_is_given_up_after(Some(2000), deadline).await;
}

#[tokio::test]
async fn a_beacon_that_answers_heartbeats_is_given_up_once_one_goes_unanswered() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let (link, beacon_side) = tokio::join!(
        px_link::connect(&settings, &settings.beacons[0], settings.hello()),
        beacon.welcome_announcing(Some(beacon_heartbeat_ms()), true)
    );
    let (mut link, (mut beacon_side, _)) = (link.unwrap(), beacon_side);
    assert_eq!(link.answer_deadline(), Some(HEARTBEAT_ANSWER_DEADLINE));
    assert_eq!(link.silence_deadline(), HEARTBEAT_DEADLINE);
    // Answered heartbeats keep the link.
    for _ in 0..2 {
        link.send(ToBeacon::Heartbeat(NodeReport::default()))
            .await
            .unwrap();
        assert!(matches!(
            beacon_side.next().await,
            Some(Ok(ToBeacon::Heartbeat(_)))
        ));
        beacon_side.send(FromBeacon::Heartbeat).await.unwrap();
        let answer = tokio::time::timeout(WAIT, link.recv()).await.unwrap();
        assert!(matches!(answer, Ok(FromBeacon::Heartbeat)), "{answer:?}");
    }
    // The next one is read and never answered: the Beacon's host vanished.
    link.send(ToBeacon::Heartbeat(NodeReport::default()))
        .await
        .unwrap();
    let sent = tokio::time::Instant::now();
    assert!(matches!(
        beacon_side.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    // On a paused clock, as in `silent_beacon_is_given_up_after`: the clock reads exactly when
    // the link gave up, well before the 15 s of silence it would allow between heartbeats.
    tokio::time::pause();
    let err = tokio::time::timeout(HEARTBEAT_DEADLINE + WAIT, link.recv())
        .await
        .expect("the link never noticed the unanswered heartbeat")
        .err()
        .unwrap();
    assert!(
        matches!(err, LinkError::Silent(d) if d == HEARTBEAT_ANSWER_DEADLINE),
        "{err}"
    );
    let waited = sent.elapsed();
    assert!(waited >= HEARTBEAT_ANSWER_DEADLINE, "{waited:?}");
    assert!(
        waited <= HEARTBEAT_ANSWER_DEADLINE + TIMER_SLACK + Duration::from_millis(100),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_beacon_that_answers_heartbeats_may_stay_silent_between_them() {
    silent_beacon_is_given_up_after(Some(beacon_heartbeat_ms()), HEARTBEAT_DEADLINE).await;
}

#[tokio::test]
async fn a_silent_beacon_that_announced_no_heartbeats_ends_the_link_at_the_old_deadline() {
    silent_beacon_is_given_up_after(None, HEARTBEAT_DEADLINE).await;
}

#[tokio::test]
async fn a_beacon_that_goes_silent_without_closing_is_left_for_the_next_one() {
    let pki = Arc::new(Pki::new(&["beacon.test"]).unwrap());
    let first = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let second = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let secrets = tempfile::tempdir().unwrap();
    let settings = settings_for(&pki, secrets.path(), vec![first.addr(), second.addr()]);
    let linked = Arc::clone(&settings.linked);
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));

    // The first Beacon welcomes the client, saying it answers heartbeats, reads one heartbeat,
    // and then its host vanishes: no answer comes, and nothing closes the connection (the
    // test holds it open, and its listener still accepts).
    let (mut frozen, hello) = first
        .welcome_announcing(Some(beacon_heartbeat_ms()), true)
        .await;
    assert_eq!(hello.labels["connect"], "1");
    assert!(matches!(
        frozen.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    eventually("linked", || linked.load(Ordering::Relaxed)).await;

    // Once that heartbeat goes unanswered, the client links to the second Beacon, in the very
    // next attempt: the silent one is left out.
    let deadline = HEARTBEAT_ANSWER_DEADLINE;
    let (mut link, hello) = tokio::time::timeout(deadline + WAIT, second.welcome())
        .await
        .expect("the client never left the silent beacon");
    assert_eq!(
        hello.labels["connect"], "2",
        "the next attempt went to the next beacon"
    );
    assert!(matches!(
        link.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    // The client dropped the silent link on its side: what the frozen host reads once it runs
    // again is the end of the connection.
    let end = tokio::time::timeout(WAIT, frozen.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
}

#[tokio::test]
async fn after_a_beacon_falls_silent_the_client_waits_for_the_next_one_without_trying_it_again() {
    let pki = Arc::new(Pki::new(&["beacon.test"]).unwrap());
    let first = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    // The Beacon that takes over has not opened its port yet (a standby does not listen).
    let next_addr = {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        held.local_addr().unwrap().to_string()
    };
    let secrets = tempfile::tempdir().unwrap();
    let settings = settings_for(&pki, secrets.path(), vec![first.addr(), next_addr.clone()]);
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));

    let (frozen, hello) = first
        .welcome_announcing(Some(beacon_heartbeat_ms()), true)
        .await;
    assert_eq!(hello.labels["connect"], "1");
    // Silent from here on; the lease takes a while to lapse, so the next Beacon opens its port
    // some seconds after the client gave up on the first: long enough that a doubling backoff
    // would wait several seconds more.
    let deadline = HEARTBEAT_ANSWER_DEADLINE;
    tokio::time::sleep(deadline + Duration::from_secs(6)).await;
    let opened = std::time::Instant::now();
    let next = Beacon::start_at(&next_addr, Arc::clone(&pki)).await;
    let (_link, _) = tokio::time::timeout(WAIT, next.welcome())
        .await
        .expect("the client never linked to the next beacon");
    let waited = opened.elapsed();
    assert!(
        waited < px_link::FAILOVER_BACKOFF_MAX * 3,
        "linked {waited:?} after the next beacon opened its port"
    );
    // Meanwhile the silent Beacon got no connection: each would have waited for its timeout.
    let tried = tokio::time::timeout(Duration::from_millis(200), first.listener.accept()).await;
    assert!(
        tried.is_err(),
        "the silent beacon was tried again: {tried:?}"
    );
    drop(frozen);
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_beacon_that_never_answers_the_handshake_is_given_up_at_the_timeout() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    // Beacon's listener accepts the connection and never speaks TLS. Once the connection is
    // accepted, the client waits on nothing but its handshake timeout, so tokio's clock is
    // paused there: the runtime, idle, moves it straight to that timeout. (Pausing before the
    // accept could let the timeout fire before the connection even reached the listener, which
    // would then wait for it forever.)
    let started = tokio::time::Instant::now();
    let handshake = async {
        tokio::join!(
            px_link::connect(&settings, &settings.beacons[0], settings.hello()),
            async {
                let accepted = beacon.listener.accept().await.unwrap();
                tokio::time::pause();
                accepted
            }
        )
    };
    let (timed_out, _held) = tokio::time::timeout(HANDSHAKE_TIMEOUT + WAIT, handshake)
        .await
        .expect("the client never gave up the handshake");
    let timed_out = timed_out.err().unwrap();
    assert!(
        matches!(timed_out, LinkError::HandshakeTimeout),
        "{timed_out}"
    );
    assert_eq!(timed_out.to_string(), "handshake timed out");
    // The timeout is armed as the connect starts, so it is met exactly, however long the
    // connection took on the real clock.
    let waited = started.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT && waited <= HANDSHAKE_TIMEOUT + TIMER_SLACK,
        "{waited:?}"
    );
}

#[tokio::test]
async fn handshake_failures_say_what_went_wrong() {
    let mut beacon = Beacon::start().await;
    let settings = beacon.settings();
    let hello = || settings.hello();

    let (refused, _) = tokio::join!(
        px_link::connect(&settings, &settings.beacons[0], hello()),
        async {
            let (mut link, _) = beacon.accept().await;
            link.send(FromBeacon::Rejected {
                reason: "unknown token".into(),
            })
            .await
            .unwrap();
            link
        }
    );
    assert_eq!(
        refused.err().unwrap().to_string(),
        "beacon refused the link: unknown token"
    );

    let (closed, _) = tokio::join!(
        px_link::connect(&settings, &settings.beacons[0], hello()),
        async {
            let (mut link, _) = beacon.accept().await;
            link.close().await.unwrap();
        }
    );
    assert_eq!(
        closed.err().unwrap().to_string(),
        "beacon closed the link during the handshake"
    );

    let (unexpected, _) = tokio::join!(
        px_link::connect(&settings, &settings.beacons[0], hello()),
        async {
            let (mut link, _) = beacon.accept().await;
            link.send(FromBeacon::Heartbeat).await.unwrap();
            link
        }
    );
    assert_eq!(
        unexpected.err().unwrap().to_string(),
        "expected welcome, got Heartbeat"
    );

    drop(beacon.listener);
    let unreachable = px_link::connect(&settings, &settings.beacons[0], hello())
        .await
        .err()
        .unwrap();
    assert!(
        unreachable.to_string().starts_with("connect: "),
        "{unreachable}"
    );
}

#[tokio::test]
async fn the_client_links_to_whichever_beacon_accepts_and_follows_a_failover() {
    let pki = Arc::new(Pki::new(&["beacon.test"]).unwrap());
    // The first Beacon's port is closed (a standby does not listen); the second is active.
    let first_addr = {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        held.local_addr().unwrap().to_string()
    };
    let second = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let secrets = tempfile::tempdir().unwrap();
    let settings = settings_for(
        &pki,
        secrets.path(),
        vec![first_addr.clone(), second.addr()],
    );
    let linked = Arc::clone(&settings.linked);
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));

    let (link, hello) = second.welcome().await;
    assert_eq!(
        hello.labels["connect"], "2",
        "the refused first address was tried, then the second in the same round"
    );
    eventually("linked", || linked.load(Ordering::Relaxed)).await;

    // The second steps down (its link and listener closed) and the first takes over.
    drop(link);
    drop(second);
    let first = Beacon::start_at(&first_addr, Arc::clone(&pki)).await;
    let (mut link, _) = first.welcome().await;
    assert!(matches!(
        link.next().await,
        Some(Ok(ToBeacon::Heartbeat(_)))
    ));
    eventually("linked again", || linked.load(Ordering::Relaxed)).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_beacon_that_refuses_the_link_is_passed_over_for_the_next_and_the_round_starts_from_the_one_that_took_it()
 {
    let pki = Arc::new(Pki::new(&["beacon.test"]).unwrap());
    let first = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let second = Beacon::start_at("127.0.0.1:0", Arc::clone(&pki)).await;
    let secrets = tempfile::tempdir().unwrap();
    let settings = settings_for(&pki, secrets.path(), vec![first.addr(), second.addr()]);
    let (service, _tx, _) = Service::new();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(px_link::run(settings, service, shutdown.clone()));

    let (mut refused, hello) = first.accept().await;
    assert_eq!(hello.labels["connect"], "1");
    refused
        .send(FromBeacon::Rejected {
            reason: "standing by".into(),
        })
        .await
        .unwrap();
    let (link, hello) = second.welcome().await;
    assert_eq!(hello.labels["connect"], "2");

    // The link drops: the next round starts from the second, which took the link last.
    drop(link);
    let (_link, hello) = second.welcome().await;
    assert_eq!(hello.labels["connect"], "3");
    shutdown.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
}
