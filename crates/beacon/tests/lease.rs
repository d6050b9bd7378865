//! Beacon under `[lease]` against a stand-in apprepo whose lease route the test steers: a
//! standby refuses links and redirects its API, becomes active once granted the lease, and an
//! active Beacon that cannot renew steps down by ending with why. (The real lease route, and a
//! failover with a Maestro, are in `crates/e2e/tests/failover.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{LeaseMode, RepoStub, STUB_LEASE_EPOCH, Tokens, WAIT};
use px_beacon::StartError;
use px_proto::lease::{BeaconHealth, BeaconRole};
use px_test_support::Pki;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const OTHER: &str = "https://beacon-other.example.com:7080";

struct Standby {
    url: String,
    control: std::net::SocketAddr,
    http: reqwest::Client,
    stop: CancellationToken,
    task: JoinHandle<Result<(), StartError>>,
    stub: RepoStub,
    tokens: Tokens,
    _pki: Arc<Pki>,
    _dir: tempfile::TempDir,
}

/// A Beacon with `[lease]` on (TTL 1 s) over a stand-in apprepo answering as `mode` says.
async fn start(mode: LeaseMode) -> Standby {
    if std::env::var_os("PX_LOG").is_some() {
        px_runtime::telemetry::init();
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::new(&["localhost"]).unwrap());
    let tokens = Tokens::new();
    let (stub, repo_url) = RepoStub::start(tokens.repo_read.clone()).await;
    *stub.lease.lock().unwrap() = mode;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", http.local_addr().unwrap().port());
    let control = std::net::SocketAddr::from(([127, 0, 0, 1], px_test_support::free_port()));
    let mut config = common::config(dir.path(), &pki, &tokens, &repo_url);
    config.control_listen = control;
    config.lease = px_beacon::config::LeaseConfig {
        enabled: true,
        ttl: Duration::from_secs(1),
        api_url: Some(url.clone()),
    };
    let placeholder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        px_beacon::run(
            config,
            px_beacon::Listeners {
                http,
                control: placeholder,
            },
            token,
        )
        .await
    });
    let client = common::https_client_builder(&pki)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Standby {
        url,
        control,
        http: client,
        stop,
        task,
        stub,
        tokens,
        _pki: pki,
        _dir: dir,
    }
}

impl Standby {
    async fn health(&self) -> Option<BeaconHealth> {
        let r = self
            .http
            .get(format!("{}/v1/health", self.url))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    async fn wait_health(&self, what: &str, check: impl Fn(&BeaconHealth) -> bool) -> BeaconHealth {
        let start = Instant::now();
        loop {
            if let Some(h) = self.health().await
                && check(&h)
            {
                return h;
            }
            assert!(
                start.elapsed() < WAIT,
                "never {what}: {:?} (Beacon ended: {})",
                self.health().await,
                self.task.is_finished()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.tokens.read)
            .send()
            .await
            .unwrap()
    }

    async fn control_open(&self) -> bool {
        tokio::net::TcpStream::connect(self.control).await.is_ok()
    }

    async fn stop(self) {
        self.stop.cancel();
        // Beacon's own error, when it ended before the test stopped it.
        let _ = tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_standby_refuses_links_and_redirects_until_it_holds_the_lease() {
    let beacon = start(LeaseMode::HeldBy(OTHER.into())).await;
    let seen = beacon
        .wait_health("learned of the active Beacon", |h| h.active_url.is_some())
        .await;
    assert_eq!(seen.role, BeaconRole::Standby);
    assert_eq!(seen.active_url.as_deref(), Some(OTHER));
    assert_eq!(seen.epoch, STUB_LEASE_EPOCH);
    assert_eq!(beacon.get("/v1/health/active").await.status(), 503);
    let redirected = beacon.get("/v1/apps?x=1").await;
    assert_eq!(redirected.status(), 307);
    assert_eq!(
        redirected.headers()["location"].to_str().unwrap(),
        format!("{OTHER}/v1/apps?x=1")
    );
    assert!(
        !beacon.control_open().await,
        "a standby binds no control port"
    );
    let metrics = beacon.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("beacon_lease_active 0"), "{metrics}");

    // The other Beacon's lease lapses and this one is granted it.
    *beacon.stub.lease.lock().unwrap() = LeaseMode::Grant;
    let active = beacon
        .wait_health("became active", |h| h.role == BeaconRole::Active)
        .await;
    assert_eq!(active.active_url.as_deref(), Some(beacon.url.as_str()));
    assert_eq!(beacon.get("/v1/health/active").await.status(), 200);
    assert!(
        beacon.control_open().await,
        "the active Beacon accepts links"
    );
    assert_eq!(
        beacon.get("/v1/apps").await.status(),
        200,
        "the API is served"
    );
    let metrics = beacon.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("beacon_lease_active 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("beacon_lease_epoch {STUB_LEASE_EPOCH}")),
        "{metrics}"
    );
    beacon.stop().await;
}

#[tokio::test]
async fn with_no_active_beacon_known_a_standby_answers_503_with_retry_after() {
    let beacon = start(LeaseMode::Down).await;

    beacon.wait_health("answered", |_| true).await;
    let r = beacon.get("/v1/apps").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"].to_str().unwrap(), "2");
    let body: px_proto::api::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, "no_active_beacon");
    assert!(body.message.contains("standby"), "{}", body.message);
    assert_eq!(
        beacon.get("/healthz").await.status(),
        200,
        "the process is up"
    );
    beacon.stop().await;
}

#[tokio::test]
async fn an_active_beacon_that_cannot_renew_steps_down_and_ends_with_why() {
    let beacon = start(LeaseMode::Grant).await;
    beacon
        .wait_health("became active", |h| h.role == BeaconRole::Active)
        .await;
    assert!(beacon.control_open().await);
    *beacon.stub.lease.lock().unwrap() = LeaseMode::Down;
    let ended = tokio::time::timeout(WAIT, beacon.task)
        .await
        .expect("Beacon kept running without its lease")
        .unwrap();
    let error = ended.expect_err("stepping down is an error, so systemd restarts Beacon");
    let text = error.to_string();
    assert!(
        text.contains("lease keeper") && text.contains("stepping down"),
        "{text}"
    );
    assert!(
        tokio::net::TcpStream::connect(beacon.control)
            .await
            .is_err(),
        "the links' port is closed"
    );
}

#[tokio::test]
async fn a_beacon_that_loses_the_lease_to_another_steps_down() {
    let beacon = start(LeaseMode::Grant).await;
    beacon
        .wait_health("became active", |h| h.role == BeaconRole::Active)
        .await;
    *beacon.stub.lease.lock().unwrap() = LeaseMode::HeldBy(OTHER.into());
    let ended = tokio::time::timeout(WAIT, beacon.task)
        .await
        .expect("Beacon kept running after another took its lease")
        .unwrap();
    let text = ended.unwrap_err().to_string();
    assert!(text.contains("holds the lease now"), "{text}");
}

#[test]
fn a_lease_needs_an_api_url_and_a_ttl_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["localhost"]).unwrap();
    let mut config = common::config(dir.path(), &pki, &Tokens::new(), "http://127.0.0.1:1");
    config.lease.enabled = true;
    config.lease.ttl = Duration::from_millis(10);
    let Err(error) = px_beacon::check(&config) else {
        panic!("a lease without api_url passed the check");
    };
    let text = error.to_string();
    assert!(text.contains("lease.api_url is required"), "{text}");
    assert!(text.contains("lease.ttl"), "{text}");
    config.lease.ttl = Duration::from_secs(6);
    config.lease.api_url = Some("beacon-1:7080".into());
    let Err(error) = px_beacon::check(&config) else {
        panic!("a URL without a scheme passed the check");
    };
    assert!(error.to_string().contains("lease.api_url"), "{error}");
}
