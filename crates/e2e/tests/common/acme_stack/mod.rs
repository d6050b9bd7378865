//! An ACME stack for end-to-end tests: apprepo, Beacon with `[acme]` pointed at a real Pebble
//! and (optionally) a Maestro with an HTTPS listener, all in this process; Pebble's DNS answers
//! every name with 127.0.0.1 and its validations go to the proxy's ports. [`StackOptions`]
//! adds short-lived certificates, a quick retry, an alert receiver and a second web server.
#![allow(dead_code)]

mod reads;

// Not every test that includes the stack reads certificates.
#[allow(unused_imports)]
pub use reads::{leaf_of, served_leaf};

use std::time::{Duration, Instant};

use px_beacon::config::ChallengeKind;
use px_runtime::tokens::{TokenEntry, generate, hash};
use px_test_support::Pki;
use px_test_support::pebble::{Pebble, PebbleOptions};

use super::relay::Relay;
pub use super::webhook::Alerts;
use super::webhook::alert_receiver;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(120);
pub const DOMAIN: &str = "shop.example.com";
/// The bucket apprepo stores in with [`StackOptions::seaweed`].
pub const SEAWEED_BUCKET: &str = "px-control";

pub fn token<R>(name: &str, role: R, secret: &str) -> TokenEntry<R> {
    TokenEntry {
        name: name.into(),
        role,
        sha256: hash(secret),
        node: None,
        apps: None,
    }
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// What a test changes of the stack; the default is [`Stack::start`]'s.
#[derive(Debug, Clone, Copy, Default)]
pub struct StackOptions {
    /// How long Pebble's certificates are valid (default: Pebble's 5 years).
    pub certificate_validity: Option<Duration>,
    /// `acme.retry_after_failure` (default: Beacon's).
    pub retry_after_failure: Option<Duration>,
    /// Beacon's alerts go to a webhook the test reads ([`Stack::alerts`]).
    pub alert_webhook: bool,
    /// apprepo keeps its storage in a SeaweedFS bucket (which honours conditional writes)
    /// instead of on disk, as several control hosts share it.
    pub seaweed: bool,
    /// Beacon competes for the lease (`[lease]`), so that a standby
    /// ([`Stack::start_standby_beacon`]) can take over from it.
    pub lease: bool,
    /// The first Beacon reaches apprepo, and the Maestro and apprepo reach it, through relays
    /// that [`Stack::cut_off_beacon`] cuts without closing anything: a control host whose
    /// network is cut or that froze. With [`StackOptions::lease`].
    pub cuttable_beacon: bool,
    /// Beacon's `domain`, under which each app is served as `<app>.<domain>` (default:
    /// Beacon's, `localhost`, which no CA issues for).
    pub cluster_domain: Option<&'static str>,
}

/// apprepo, Beacon with `[acme]` and (optionally) a Maestro with an HTTPS listener.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub _pki: Pki,
    pub pebble: Pebble,
    pub http: reqwest::Client,
    pub deploy: String,
    pub beacon_repo_token: String,
    pub repo_url: String,
    pub beacon_url: String,
    pub https_port: u16,
    pub beacon_config: px_beacon::config::Config,
    pub beacon_addrs: (std::net::SocketAddr, std::net::SocketAddr),
    pub beacon_stop: CancellationToken,
    pub beacon_task: Option<JoinHandle<()>>,
    pub shutdown: CancellationToken,
    pub tasks: Vec<JoinHandle<()>>,
    /// Stops the first web server alone ([`Stack::stop_web`]).
    pub web_stop: CancellationToken,
    /// What the alert webhook received, with [`StackOptions::alert_webhook`].
    pub alerts: Alerts,
    /// What a second web server ([`Stack::start_second_web`]) needs.
    pub control_addr: String,
    pub ca_file: std::path::PathBuf,
    pub node_repo_token: String,
    pub second_link_token: String,
    /// The S3 server apprepo stores in, with [`StackOptions::seaweed`].
    pub seaweed: Option<px_test_support::seaweed::SeaweedServer>,
    /// A standby Beacon ([`Stack::start_standby_beacon`]): its URL, its stop and its task.
    pub standby: Option<(String, CancellationToken, JoinHandle<()>)>,
    /// The standby's control address, listed to the link clients, with [`StackOptions::lease`].
    pub standby_control: Option<std::net::SocketAddr>,
    /// The relays to and from the first Beacon, with [`StackOptions::cuttable_beacon`].
    pub beacon_relays: Vec<super::relay::Relay>,
}

impl Stack {
    /// Starts the stack, or `None` when Pebble is missing (and not required). With
    /// `answering` false, no Maestro runs and Pebble's checks go to a port nobody serves.
    pub async fn start(challenge: ChallengeKind, answering: bool) -> Option<Self> {
        Self::start_with(challenge, answering, StackOptions::default()).await
    }

    /// [`Stack::start`] changed as `options` say.
    pub async fn start_with(
        challenge: ChallengeKind,
        answering: bool,
        options: StackOptions,
    ) -> Option<Self> {
        // The services' logs on stderr when asked for (`PX_LOG=debug cargo test ...`).
        if std::env::var_os("PX_LOG").is_some() {
            px_runtime::telemetry::init();
        }
        let proxy_http = bind().await;
        let proxy_https = bind().await;
        let proxy_http_port = proxy_http.local_addr().unwrap().port();
        let https_port = proxy_https.local_addr().unwrap().port();
        let pebble_http_port = if answering {
            proxy_http_port
        } else {
            px_test_support::free_port()
        };
        let pebble = Pebble::start_with(
            pebble_http_port,
            https_port,
            PebbleOptions {
                certificate_validity: options.certificate_validity,
            },
        )?;
        let seaweed = if options.seaweed {
            Some(px_test_support::seaweed::SeaweedServer::start(
                SEAWEED_BUCKET,
            )?)
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&["localhost"]).unwrap();
        let (deploy, beacon_repo, node_repo, maestro_link, repo_link) =
            (generate(), generate(), generate(), generate(), generate());
        let second_link = generate();
        let secret = |name: &str, value: &str| {
            let path = dir.path().join(name);
            px_runtime::secrets::write_secret_file(&path, value).unwrap();
            path
        };
        let repo_listener = bind().await;
        let repo_url = format!(
            "https://localhost:{}",
            repo_listener.local_addr().unwrap().port()
        );
        let beacon_http = bind().await;
        let beacon_control = bind().await;
        let beacon_addrs = (
            beacon_http.local_addr().unwrap(),
            beacon_control.local_addr().unwrap(),
        );
        let beacon_url = format!("https://localhost:{}", beacon_addrs.0.port());
        let control_addr = beacon_addrs.1.to_string();
        // With a lease, a standby Beacon ([`Stack::start_standby_beacon`]) gets a control
        // address of its own, and the link clients list both.
        let standby_control: Option<std::net::SocketAddr> = options
            .lease
            .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], px_test_support::free_port())));
        let shutdown = CancellationToken::new();
        // A cuttable first Beacon is reached through a relay, and reaches apprepo through one.
        let mut beacon_relays = Vec::new();
        let (first_control, first_repo_url) = if options.cuttable_beacon {
            assert!(
                options.lease,
                "a cuttable Beacon needs a standby to take over"
            );
            let control = Relay::start(beacon_addrs.1, shutdown.clone()).await;
            let repo = Relay::start(repo_listener.local_addr().unwrap(), shutdown.clone()).await;
            let urls = (
                control.addr.to_string(),
                format!("https://localhost:{}", repo.addr.port()),
            );
            beacon_relays.extend([control, repo]);
            urls
        } else {
            (control_addr.clone(), repo_url.clone())
        };
        let (link_addr, link_addrs) = match standby_control {
            Some(standby) => (None, vec![first_control, standby.to_string()]),
            None => (Some(control_addr.clone()), Vec::new()),
        };
        let mut repo_config = px_repository::config::Config {
            data_dir: dir.path().join("apprepo"),
            tokens: vec![
                token("dev", px_repository::auth::Role::Deploy, &deploy),
                token("beacon", px_repository::auth::Role::Beacon, &beacon_repo),
                // A web server's token: it reads certificates with their keys, nothing secret else.
                token("web-1", px_repository::auth::Role::Release, &node_repo),
            ],
            beacon: Some(px_repository::config::BeaconConfig {
                addr: link_addr.clone(),
                addrs: link_addrs.clone(),
                server_name: Some("localhost".into()),
                ca_file: pki.ca(),
                token_file: secret("repo-link", &repo_link),
                name: "apprepo".into(),
            }),
            api_tls: px_runtime::http_server::ApiTls {
                cert_file: Some(pki.cert()),
                key_file: Some(pki.key()),
                plain_http: false,
            },
            ..Default::default()
        };
        if let Some(s3) = &seaweed {
            let secret_file = secret("s3-secret", px_test_support::S3_SECRET_KEY);
            repo_config.storage = px_repository::config::StorageConfig {
                backend: px_repository::config::Backend::S3,
                s3: Some(px_repository::config::S3Config {
                    bucket: SEAWEED_BUCKET.into(),
                    region: "us-east-1".into(),
                    endpoint: Some(s3.endpoint()),
                    path_style: true,
                    prefix: String::new(),
                    access_key_id: Some(px_test_support::S3_ACCESS_KEY.into()),
                    secret_access_key_file: Some(secret_file),
                }),
            };
        }
        let mut beacon_config = px_beacon::config::Config {
            data_dir: dir.path().join("beacon"),
            tls_cert_file: pki.cert(),
            tls_key_file: pki.key(),
            tokens: vec![
                TokenEntry {
                    node: Some("web-1".into()),
                    ..token("web", px_beacon::auth::Role::Maestro, &maestro_link)
                },
                token("apprepo", px_beacon::auth::Role::Repository, &repo_link),
                token("dev", px_beacon::auth::Role::Deploy, &deploy),
                TokenEntry {
                    node: Some("web-2".into()),
                    ..token("web-2", px_beacon::auth::Role::Maestro, &second_link)
                },
            ],
            reconcile_interval: Duration::from_secs(3600),
            ..Default::default()
        };
        beacon_config.repository.url = first_repo_url;
        beacon_config.repository.token_file = secret("beacon-repo", &beacon_repo);
        beacon_config.repository.ca_file = Some(pki.ca());
        beacon_config.acme = px_beacon::config::AcmeConfig {
            directory_url: Some(pebble.directory_url()),
            email: Some("ops@example.com".into()),
            ca_file: Some(pebble.listener_pki.ca()),
            challenge,
            profile: None,
            ..Default::default()
        };
        if options.lease {
            beacon_config.lease = px_beacon::config::LeaseConfig {
                enabled: true,
                api_url: Some(beacon_url.clone()),
                ..Default::default()
            };
            // With a lease Beacon binds `control_listen` itself, once it is active.
            beacon_config.control_listen = beacon_addrs.1;
        }
        if let Some(domain) = options.cluster_domain {
            beacon_config.domain = domain.into();
        }
        if let Some(retry) = options.retry_after_failure {
            beacon_config.acme.retry_after_failure = retry;
        }
        let alerts = Alerts::default();
        if options.alert_webhook {
            let url = alert_receiver(alerts.clone(), shutdown.clone()).await;
            beacon_config.alerts.webhooks = vec![url];
        }
        let web_stop = shutdown.child_token();
        let mut tasks = Vec::new();
        let t = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            px_repository::run(repo_config, repo_listener, t)
                .await
                .unwrap()
        }));
        if answering {
            let certs_dir = dir.path().join("certs");
            std::fs::create_dir_all(&certs_dir).unwrap();
            let port_base = instance_ports(44000);
            let maestro_config = px_maestro::config::Config {
                node_name: "web-1".into(),
                state_dir: dir.path().join("maestro/state"),
                log_dir: dir.path().join("maestro/logs"),
                port_range: (port_base, port_base + 19),
                stop_grace: Duration::from_secs(3),
                https_listen: Some(proxy_https.local_addr().unwrap()),
                certs_dir: Some(certs_dir),
                repository_token_file: Some(secret("maestro-repo", &node_repo)),
                repository_ca_file: Some(pki.ca()),
                beacon: Some(px_maestro::config::BeaconConfig {
                    addr: link_addr.clone(),
                    addrs: link_addrs.clone(),
                    server_name: Some("localhost".into()),
                    ca_file: pki.ca(),
                    token_file: secret("maestro-link", &maestro_link),
                }),
                ..Default::default()
            };
            let status = bind().await;
            let t = web_stop.clone();
            tasks.push(tokio::spawn(async move {
                px_maestro::run(
                    maestro_config,
                    px_maestro::Listeners {
                        http: proxy_http,
                        https: Some(proxy_https),
                        status,
                    },
                    t,
                )
                .await
                .unwrap()
            }));
        }
        let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let ca_file = pki.ca();
        let mut stack = Self {
            dir,
            _pki: pki,
            pebble,
            http,
            deploy,
            beacon_repo_token: beacon_repo,
            repo_url,
            beacon_url,
            https_port,
            beacon_config,
            beacon_addrs,
            beacon_stop: CancellationToken::new(),
            beacon_task: None,
            shutdown,
            tasks,
            web_stop,
            alerts,
            control_addr,
            ca_file,
            node_repo_token: node_repo,
            second_link_token: second_link,
            seaweed,
            standby: None,
            standby_control,
            beacon_relays,
        };
        stack
            .start_beacon(Some((beacon_http, beacon_control)))
            .await;
        Some(stack)
    }

    /// Starts Beacon on the given listeners, or on new ones at the same addresses.
    pub async fn start_beacon(&mut self, listeners: Option<(TcpListener, TcpListener)>) {
        let (http, control) = match listeners {
            Some(bound) => bound,
            None => (
                TcpListener::bind(self.beacon_addrs.0).await.unwrap(),
                TcpListener::bind(self.beacon_addrs.1).await.unwrap(),
            ),
        };
        self.beacon_stop = self.shutdown.child_token();
        let (config, stop) = (self.beacon_config.clone(), self.beacon_stop.clone());
        self.beacon_task = Some(tokio::spawn(async move {
            px_beacon::run(config, px_beacon::Listeners { http, control }, stop)
                .await
                .unwrap()
        }));
    }

    /// Starts a second Beacon as the first is configured (`[lease]` on), with its own data
    /// directory, API and control addresses (the latter listed to the Maestro and apprepo): it
    /// stands by while the first holds the lease. Returns its API URL.
    pub async fn start_standby_beacon(&mut self) -> String {
        let http = bind().await;
        let url = format!("https://localhost:{}", http.local_addr().unwrap().port());
        let mut config = self.beacon_config.clone();
        config.data_dir = self.dir.path().join("beacon-2");
        config.repository.url = self.repo_url.clone();
        config.lease.api_url = Some(url.clone());
        config.control_listen = self
            .standby_control
            .expect("a standby needs StackOptions::lease");
        // `run` releases it at once: with a lease Beacon binds `control_listen` when active.
        let control = bind().await;
        let stop = self.shutdown.child_token();
        let task_stop = stop.clone();
        let task = tokio::spawn(async move {
            px_beacon::run(config, px_beacon::Listeners { http, control }, task_stop)
                .await
                .unwrap()
        });
        self.standby = Some((url.clone(), stop, task));
        url
    }

    /// Cuts the first Beacon off ([`StackOptions::cuttable_beacon`]): from now on nothing
    /// reaches it or comes from it, and no connection closes. Returns its task, which ends
    /// once it steps down (it can no longer renew its lease).
    pub fn cut_off_beacon(&mut self) -> JoinHandle<()> {
        assert!(
            !self.beacon_relays.is_empty(),
            "needs StackOptions::cuttable_beacon"
        );
        for relay in &self.beacon_relays {
            relay.cut();
        }
        self.beacon_task.take().expect("the first Beacon runs")
    }

    /// Stops the first Beacon, as its host going away would, and waits for it to end.
    pub async fn stop_beacon(&mut self) {
        self.beacon_stop.cancel();
        if let Some(task) = self.beacon_task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    pub async fn restart_beacon(&mut self) {
        self.beacon_stop.cancel();
        if let Some(task) = self.beacon_task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap();
        }
        self.start_beacon(None).await;
    }

    /// `em deploy` by hand: an app whose manifest names [`DOMAIN`].
    pub async fn deploy_shop(&self) {
        let app_dir = tempfile::tempdir().unwrap();
        Self::write_shop(app_dir.path(), "hello");
        self.deploy_app("shop", app_dir.path()).await;
    }

    /// Writes the shop into `app_dir`: the sample app under [`DOMAIN`], answering `greeting`.
    pub fn write_shop(app_dir: &std::path::Path, greeting: &str) {
        px_test_support::write_sample_app(app_dir, "shop").unwrap();
        std::fs::write(
            app_dir.join("app.toml"),
            format!(
                "name = \"shop\"\nrun = \"python3 server.py\"\n[health]\npath = \"/healthz\"\n[http]\ndomains = [\"{DOMAIN}\"]\n[env]\nGREETING = \"{greeting}\"\n"
            ),
        )
        .unwrap();
    }

    /// Stops the first web server (its listeners close; Pebble's checks then fail).
    pub fn stop_web(&self) {
        self.web_stop.cancel();
    }

    /// Starts a second web server (`web-2`) with its own proxy ports, linked to Beacon;
    /// returns its HTTPS port.
    pub async fn start_second_web(&mut self) -> u16 {
        let proxy_http = bind().await;
        let proxy_https = bind().await;
        let https_port = proxy_https.local_addr().unwrap().port();
        let root = self.dir.path().join("web-2");
        let secret = |name: &str, value: &str| {
            let path = root.join(name);
            std::fs::create_dir_all(&root).unwrap();
            px_runtime::secrets::write_secret_file(&path, value).unwrap();
            path
        };
        let certs_dir = root.join("certs");
        std::fs::create_dir_all(&certs_dir).unwrap();
        // Beside the first web server's range (see `start_with`).
        let port_base = instance_ports(46000);
        let config = px_maestro::config::Config {
            node_name: "web-2".into(),
            state_dir: root.join("state"),
            log_dir: root.join("logs"),
            port_range: (port_base, port_base + 19),
            stop_grace: Duration::from_secs(3),
            https_listen: Some(proxy_https.local_addr().unwrap()),
            certs_dir: Some(certs_dir),
            repository_token_file: Some(secret("repo", &self.node_repo_token)),
            repository_ca_file: Some(self.ca_file.clone()),
            beacon: Some(px_maestro::config::BeaconConfig {
                addr: Some(self.control_addr.clone()),
                addrs: Vec::new(),
                server_name: Some("localhost".into()),
                ca_file: self.ca_file.clone(),
                token_file: secret("link", &self.second_link_token),
            }),
            ..Default::default()
        };
        let status = bind().await;
        let t = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            px_maestro::run(
                config,
                px_maestro::Listeners {
                    http: proxy_http,
                    https: Some(proxy_https),
                    status,
                },
                t,
            )
            .await
            .unwrap()
        }));
        https_port
    }

    /// `em deploy` by hand of the app in `app_dir` (its own `app.toml`), as app `name`.
    pub async fn deploy_app(&self, name: &str, app_dir: &std::path::Path) {
        let mut bundle = Vec::new();
        px_bundle::pack_dir(app_dir, &mut bundle).unwrap();
        let start = Instant::now();
        loop {
            match self
                .http
                .post(format!("{}/v1/apps", self.repo_url))
                .bearer_auth(&self.deploy)
                .json(&serde_json::json!({ "name": name }))
                .send()
                .await
            {
                Ok(r) if r.status() == 201 => break,
                _ if start.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("apprepo never came up: {other:?}"),
            }
        }
        self.upload_bundle(name, bundle).await;
    }

    /// Uploads `app_dir` as a new release of the existing app `name` (what `em deploy` does
    /// once the app exists); the release apprepo committed.
    pub async fn upload(&self, name: &str, app_dir: &std::path::Path) -> px_proto::api::Release {
        let mut bundle = Vec::new();
        px_bundle::pack_dir(app_dir, &mut bundle).unwrap();
        self.upload_bundle(name, bundle).await
    }

    async fn upload_bundle(&self, name: &str, bundle: Vec<u8>) -> px_proto::api::Release {
        let r = self
            .http
            .post(format!("{}/v1/apps/{name}/releases", self.repo_url))
            .bearer_auth(&self.deploy)
            .header(
                px_proto::api::HEADER_BUNDLE_SHA256,
                hex::encode(Sha256::digest(&bundle)),
            )
            .body(bundle)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        r.json().await.unwrap()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.beacon_task.take() {
            self.tasks.push(task);
        }
        if let Some((_, _, task)) = self.standby.take() {
            self.tasks.push(task);
        }
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

/// The first of 20 ports for a Maestro's instances, in the 2000 from `base`: its own slice for
/// each of the first four stacks of a test process (a test file runs its tests at once), and
/// apart from other processes' as far as their ids differ.
fn instance_ports(base: u16) -> u16 {
    static STACKS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let stack = STACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
    let process = (std::process::id() % 25) as u16;
    base + (process * 4 + stack) * 20
}
