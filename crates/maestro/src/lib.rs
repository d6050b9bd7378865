//! maestro, the Platform.X AppController: runs each assigned app's instances through its
//! AppRunner, switches releases with zero downtime, proxies HTTP(S) to them by host, writes
//! app and access logs, and keeps a control link to Beacon. It serves its last persisted
//! assignment at once on start-up, so web traffic never waits for the control plane.
//! On a node that builds (`[build] enabled`), it also runs the builds Beacon assigns and
//! delivers their layers to apprepo (`builds.rs`). [`run`] is the whole service; `main.rs`
//! only wires it up. [`local`] runs one app from a local directory the same way, for `em dev`.

mod acme_certs;
mod app_events;
mod builds;
mod delivery;
mod limits;
pub mod local;
mod logs;
mod process;
mod proxy;
mod routes;
mod runs;
mod runtimes;
pub mod sandbox;
mod supervisor;

pub mod bench;
pub mod cli;
pub mod config;
mod error;
mod link;

pub use error::Error;

/// What Maestro's own integration tests (`tests/`, another crate to the compiler) reach beyond
/// the service's interface: the proxy and its route table, tested alone on loopback; the limits
/// of the app events endpoint, which the tests push against; and the persisted assignment, which
/// a crash test writes before starting the binary. No other crate may use it; it is public, and
/// hidden from the docs, only because those tests cannot see `pub(crate)` items. A service crate
/// whose tests need such items exposes them here and nowhere else (apprepo has the same module;
/// Beacon's tests need none), so that everything else stays `pub(crate)` and what is public says
/// what other crates may use.
#[doc(hidden)]
pub mod internals {
    pub use crate::app_events::{
        EVENT_BURST, EVENTS_PER_SECOND, MAX_CONNECTIONS, MAX_DRAIN_BYTES, MAX_EVENT_BYTES,
        MAX_REQUESTS_IN_FLIGHT, MISSED_HEARTBEATS,
    };
    pub use crate::link::save_assignment;
    pub use crate::process::{Launch, instance_path, spawn, stop, wait_healthy};
    pub use crate::proxy::drain::SSE_RETRY_MS;
    pub use crate::proxy::protocol::H2_MAX_CONCURRENT_STREAMS;
    pub use crate::proxy::server::ACCEPT_BALANCE_SLACK;
    pub use crate::proxy::tls::CertStore;
    pub use crate::proxy::{
        AccessLog, AcmeAnswers, Proxy, ProxyError, ProxyMetrics, ProxySettings,
    };
    pub use crate::routes::{
        AppRoute, Backend, BodyPolicy, DrainOutcome, HttpsPolicy, RouteTable, Routes,
    };
}

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::response::IntoResponse;
use futures_util::future::BoxFuture;
use px_proto::link::{InstanceState, PeerRole};
use px_runtime::config::ConfigError;
use px_runtime::shutdown::CriticalTasks;
use px_runtime::systemd::{Reloaded, Systemd};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// How long stopping may take in all: drain plus instance stops.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(45);
/// Most unpacked releases kept per app (`keep_releases`).
const MAX_KEEP_RELEASES: usize = 100;
/// How long a starting Maestro waits for its persisted apps to serve before it accepts
/// connections anyway; well inside the unit's `TimeoutStartSec=`.
const RESTORE_WAIT: Duration = Duration::from_secs(30);

/// The already-bound sockets Maestro serves on.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<TcpListener>,
    pub status: TcpListener,
}

/// Everything in the config that can be checked without the network.
pub struct Checked {
    pub(crate) link: Option<px_link::LinkSettings>,
    pub(crate) repository_token: Option<String>,
    /// What apprepo's certificate is checked against (`None`: the system's roots).
    pub(crate) repository_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) certs: Option<Arc<proxy::CertStore>>,
}

pub fn check(config: &Config) -> Result<Checked, ConfigError> {
    let mut problems = Vec::new();
    if config.node_name.is_empty()
        || config
            .node_name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        problems.push(format!(
            "node_name {:?} must be a non-empty name without spaces",
            config.node_name
        ));
    }
    if config.port_range.0 == 0 || config.port_range.0 > config.port_range.1 {
        problems.push(format!(
            "port_range {:?} must be two ports, the first not above the second",
            config.port_range
        ));
    }
    if !(1..=MAX_KEEP_RELEASES).contains(&config.keep_releases) {
        problems.push(format!(
            "keep_releases {} must be from 1 (the serving release) to {MAX_KEEP_RELEASES}",
            config.keep_releases
        ));
    }
    let repository_token = config.repository_token_file.as_ref().and_then(|path| {
        px_runtime::secrets::read_secret_file(path)
            .map_err(|e| problems.push(format!("repository_token_file: {e}")))
            .ok()
    });
    let link = config.beacon.as_ref().and_then(|b| {
        b.resolve(PeerRole::Maestro, &config.node_name)
            .map_err(|e| problems.push(format!("beacon: {e}")))
            .ok()
    });
    let repository_ca = config
        .repository_ca_file
        .as_ref()
        .or(config.beacon.as_ref().map(|b| &b.ca_file));
    let repository_tls = repository_ca.and_then(|ca| {
        px_runtime::tls::client_config(ca)
            .map_err(|e| problems.push(format!("repository_ca_file: {e}")))
            .ok()
    });
    check_build(&config.build, &mut problems);
    if config.https_redirect_port == Some(0) {
        problems.push("https_redirect_port must be a port from 1 to 65535".into());
    }
    let certs = config.https_listen.and_then(|_| {
        cert_store(config)
            .map_err(|e| problems.push(e.to_string()))
            .ok()
    });
    if problems.is_empty() {
        Ok(Checked {
            link,
            repository_token,
            repository_tls,
            certs,
        })
    } else {
        Err(ConfigError { problems })
    }
}

/// The `[build]` settings that can be wrong: checked only when builds are on.
fn check_build(build: &config::BuildConfig, problems: &mut Vec<String>) {
    if !build.enabled {
        return;
    }
    if let Some(ca) = &build.ca_file
        && let Err(e) = std::fs::File::open(ca)
    {
        problems.push(format!("build.ca_file {}: {e}", ca.display()));
    }
    for (key, url) in [
        ("python_index", &build.python_index),
        ("npm_registry", &build.npm_registry),
    ] {
        if let Some(url) = url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            problems.push(format!(
                "build.{key} {url:?} must be an http:// or https:// URL"
            ));
        }
    }
    for (key, value) in [
        ("time_limit", build.time_limit.as_secs()),
        ("memory_limit", build.memory_limit.0),
        ("disk_limit", build.disk_limit.0),
        ("process_limit", build.process_limit),
        ("output_limit", build.output_limit.0),
    ] {
        if value == 0 {
            problems.push(format!("build.{key} must be more than 0"));
        }
    }
}

/// The HTTPS listener's certificates: `certs_dir`'s files, or with no `certs_dir` only those
/// ACME issues (Beacon's `[acme]`), as on `em up`.
fn cert_store(config: &Config) -> Result<Arc<proxy::CertStore>, String> {
    match &config.certs_dir {
        Some(dir) => proxy::CertStore::load(dir),
        None => proxy::CertStore::acme_only(),
    }
    .map_err(|e| format!("certs_dir: {e}"))
}

/// Settings a reload applies (see `config.rs`): none, since TLS certificates are read again
/// from `certs_dir` on every reload whether or not a setting changed.
const RELOADABLE: &[&str] = &[];

/// Runs Maestro on already-bound listeners until `shutdown`, then drains and stops its apps;
/// without a service manager (`em up`, tests). If one of its critical tasks (a proxy listener,
/// the app events endpoint, the status server, the Beacon link, the access log's two stages)
/// ends on its own, Maestro cancels `shutdown`, drains and stops its apps as at any shutdown,
/// and returns [`Error::TaskEnded`] naming it.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with(config, listeners, shutdown, Systemd::none()).await
}

/// [`run`], telling `systemd` when Maestro is ready (its listeners open and the persisted
/// assignment applied), what it serves, that it is alive, and answering its reload requests.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    systemd: Systemd<Config>,
) -> Result<(), Error> {
    let mut checked = check(&config)?;
    // A socket systemd passed as `https` turns HTTPS on even without `https_listen`.
    if listeners.https.is_some() && checked.certs.is_none() {
        checked.certs = Some(cert_store(&config).map_err(ConfigError::one)?);
    }
    tokio::fs::create_dir_all(&config.state_dir).await?;
    tokio::fs::create_dir_all(&config.log_dir).await?;
    let tracker = TaskTracker::new();
    let critical = CriticalTasks::new(&tracker, &shutdown);
    let routes = Arc::new(routes::Routes::default());
    let rotation = logs::Rotation::default();
    let app_logs = Arc::new(logs::AppLogs::new(&config.log_dir, rotation));

    // Access log: records → lines → rotating file.
    let (access, format_access, write_access) = logs::access_log(config.log_dir.clone(), rotation);
    critical.spawn("the access log writer", write_access);
    critical.spawn("the access log formatter", format_access);

    // Events for Beacon, from the supervisor and from the apps themselves.
    let (events_tx, events) = tokio::sync::mpsc::channel(supervisor::EVENT_QUEUE);
    let events_listener = TcpListener::bind(config.events_listen).await?;
    let app_events = Arc::new(app_events::AppEvents::new(
        events_listener.local_addr()?,
        app_logs.clone(),
        events_tx.clone(),
    ));
    // Apps stop when the service does, after the proxy stopped accepting.
    let apps_stop = CancellationToken::new();
    critical.spawn(
        "the app events endpoint",
        app_events.clone().serve(events_listener, apps_stop.clone()),
    );
    let build_events = events_tx.clone();
    let app_sandbox = sandbox::AppSandbox::new(
        config.sandbox.mode,
        &config.state_dir,
        config.sandbox.tmp_size,
        config.sandbox.app_dir_size,
    )
    .map_err(std::io::Error::from)
    .map(Arc::new)?;
    match app_sandbox.mode() {
        config::SandboxConfig::Bubblewrap => tracing::info!(
            users = ?app_sandbox.users(),
            tmp_size = %config.sandbox.tmp_size,
            app_dir_size = %config.sandbox.app_dir_size,
            "each app process runs in a bubblewrap sandbox of its own"
        ),
        config::SandboxConfig::None => tracing::warn!(
            "app processes run without a sandbox ([sandbox] mode = \"none\"): every app can read what Maestro reads and signal the other apps; use bubblewrap where apps do not all trust each other"
        ),
    }
    let supervisor = supervisor::Supervisor::new(
        supervisor::Settings {
            node_name: config.node_name.clone(),
            state_dir: config.state_dir.clone(),
            port_range: config.port_range,
            stop_grace: config.stop_grace,
            keep_releases: config.keep_releases,
            min_free_disk: config.min_free_disk.0,
            cgroup_limits: config.cgroup_limits,
            repository_token: checked.repository_token.clone(),
            repository_tls: checked.repository_tls.clone(),
            sandbox: app_sandbox.clone(),
        },
        routes.clone(),
        app_logs.clone(),
        app_events.clone(),
        events_tx,
        tracker.clone(),
        apps_stop.clone(),
    );
    match link::load_assignment(&config.state_dir) {
        Some(assignment) => {
            tracing::info!(
                generation = assignment.generation,
                apps = assignment.apps.len(),
                "serving the persisted assignment"
            );
            supervisor.apply(&assignment);
            if checked.link.is_some() {
                supervisor.apply_phases(&assignment.phases, supervisor::PhaseSource::Persisted);
            }
        }
        None => tracing::info!("no persisted assignment; waiting for beacon"),
    }

    // Open the doors only once the persisted apps serve (or failed): until then connections
    // wait in the listen backlog (the kernel's, and under socket activation systemd's) rather
    // than meeting a 404 for an app that is a second away from serving.
    let starting = supervisor.wait_first_deploys(RESTORE_WAIT).await;
    if !starting.is_empty() {
        tracing::warn!(apps = ?starting, "opening before these apps serve: they took longer than {RESTORE_WAIT:?}");
    }

    let metrics = Arc::new(proxy::ProxyMetrics::default());
    let settings = proxy::ProxySettings {
        https_redirect: config.https_redirect,
        https_redirect_port: config.https_redirect_port,
        drain: config.drain_deadline,
        ..Default::default()
    };
    let proxy = proxy::Proxy::new(routes, settings, metrics.clone(), access);
    // Certificates ACME issued earlier serve from the first handshake, before any link.
    let acme_held = acme_certs::load_kept(&config.state_dir, proxy.acme());
    let proxy_stop = CancellationToken::new();
    let http_addr = listeners.http.local_addr()?;
    // The proxy's listeners, waited for apart from the other tasks: the apps stop only once
    // they have drained.
    let serving = TaskTracker::new();
    critical.spawn(
        "the http proxy",
        serving.track_future(proxy.clone().serve_http(listeners.http, proxy_stop.clone())),
    );
    let certs = listeners.https.as_ref().and(checked.certs.clone());
    if let (Some(listener), Some(certs)) = (listeners.https, checked.certs) {
        critical.spawn(
            "the https proxy",
            serving.track_future(
                proxy
                    .clone()
                    .serve_https(listener, certs, proxy_stop.clone()),
            ),
        );
    }
    serving.close();

    let status_addr = listeners.status.local_addr()?;
    let status_stop = shutdown.clone();
    let status_supervisor = supervisor.clone();
    let metrics_supervisor = supervisor.clone();
    let status = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                let app_events = app_events.clone();
                let metrics_supervisor = metrics_supervisor.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        metrics.render()
                            + &app_events.render_metrics()
                            + &metrics_supervisor.render_disk_metrics()
                            + &metrics_supervisor.render_layer_metrics(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/v1/state",
            axum::routing::get(move || {
                let supervisor = status_supervisor.clone();
                async move { axum::Json(supervisor.report()) }
            }),
        );
    critical.spawn(
        "the status server",
        axum::serve(listeners.status, status)
            .with_graceful_shutdown(status_stop.cancelled_owned())
            .into_future(),
    );

    let linked = checked.link.as_ref().map(|l| l.linked.clone());
    if let Some(settings) = checked.link {
        let runtimes = runtimes::probe_host(&px_runtime::host::env().path).await;
        tracing::info!(?runtimes, "runtimes found on this host");
        if config.build.enabled {
            tracing::info!(sandbox = ?config.build.sandbox, runtimes_dir = %config.build.runtimes_dir.display(), "this node runs builds");
            if config.build.sandbox == config::SandboxConfig::None {
                tracing::warn!(
                    "builds run without a sandbox ([build] sandbox = \"none\"): a build's commands can read what Maestro reads; use bubblewrap on a node that builds other people's apps"
                );
            }
        }
        let mut build_settings = builds::BuildSettings::from_config(
            &config.build,
            &config.node_name,
            &config.state_dir,
            checked.repository_token.clone(),
            checked.repository_tls.clone(),
        );
        build_settings.app_uids = Some(app_sandbox.clone());
        let builds = builds::Builds::start(
            build_settings,
            {
                let supervisor = supervisor.clone();
                Arc::new(move |status| supervisor.report_build(status))
            },
            app_logs.clone(),
            build_events,
            &tracker,
            shutdown.clone(),
        );
        let (runs, run_frames) = runs::Runs::new(supervisor.clone(), app_logs.clone());
        let (acme_certs_tx, acme_certs_rx) = tokio::sync::watch::channel(Default::default());
        tracker.spawn(acme_certs::run(
            acme_certs_rx,
            delivery::repository_client(checked.repository_tls.clone()),
            checked.repository_token.clone(),
            config.state_dir.clone(),
            proxy.acme().clone(),
            acme_held,
            shutdown.clone(),
        ));
        let client = link::Client {
            supervisor: supervisor.clone(),
            runs,
            run_frames,
            builds,
            events,
            changes: supervisor.changes(),
            app_logs,
            state_dir: config.state_dir.clone(),
            labels: config.labels.clone(),
            runtimes,
            acme: proxy.acme().clone(),
            acme_certs: acme_certs_tx,
        };
        critical.spawn(
            "the beacon link",
            px_link::run(settings, client, shutdown.clone()),
        );
    } else {
        tracing::info!("no beacon configured; serving the persisted assignment only");
        drop(events);
        drop(build_events);
    }
    tracing::info!(http = %http_addr, status = %status_addr, node = %config.node_name, "maestro ready");
    systemd.ready(
        &tracker,
        &shutdown,
        status_line(supervisor.clone(), linked, certs.clone()),
        liveness_probe(supervisor.clone(), serving.clone()),
        move |new: Config| reload(config.clone(), new, certs.clone()),
    );

    shutdown.cancelled().await;
    tracing::info!("stopping: draining the proxy, then the apps");
    proxy_stop.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, serving.wait()).await;
    // The last handle on the access log: dropping it lets the writer flush and end.
    drop(proxy);
    apps_stop.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    match critical.ended() {
        Some(ended) => {
            tracing::error!(error = %ended, "maestro stopped");
            Err(ended.into())
        }
        None => {
            tracing::info!("maestro stopped");
            Ok(())
        }
    }
}

/// Maestro's STATUS= line: what it serves and whether Beacon is linked, e.g. `serving 3 apps
/// (5 instances); beacon linked`.
fn status_line(
    supervisor: Arc<supervisor::Supervisor>,
    linked: Option<Arc<AtomicBool>>,
    certs: Option<Arc<proxy::CertStore>>,
) -> impl FnMut() -> String + Send + 'static {
    let started = std::time::Instant::now();
    move || {
        let report = supervisor.report();
        let apps: BTreeSet<&str> = report.instances.iter().map(|i| i.app.as_str()).collect();
        let not_healthy = report
            .instances
            .iter()
            .filter(|i| i.state != InstanceState::Healthy)
            .count();
        let mut line = format!(
            "serving {} ({}",
            plural(apps.len(), "app"),
            plural(report.instances.len(), "instance")
        );
        if not_healthy > 0 {
            line += &format!(", {not_healthy} not healthy");
        }
        line += ")";
        if let Some(certs) = &certs {
            line += &format!(", {} over HTTPS", plural(certs.len(), "certificate"));
        }
        line += match &linked {
            None => "; no beacon configured",
            Some(linked) if linked.load(Ordering::Relaxed) => "; beacon linked",
            // The first attempt has not had its time yet.
            Some(_) if started.elapsed() < px_proto::link::HANDSHAKE_TIMEOUT => {
                "; connecting to beacon"
            }
            Some(_) => "; beacon unreachable, serving the persisted assignment",
        };
        line
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Maestro is alive while the proxy still accepts and the supervisor answers from a freshly
/// spawned task (so the runtime schedules work and the supervisor's state lock is free).
fn liveness_probe(
    supervisor: Arc<supervisor::Supervisor>,
    serving: TaskTracker,
) -> impl FnMut() -> BoxFuture<'static, Result<(), String>> + Send + 'static {
    move || {
        let supervisor = supervisor.clone();
        let serving = serving.clone();
        Box::pin(async move {
            if serving.is_empty() {
                return Err("the proxy no longer accepts connections".into());
            }
            tokio::spawn(async move { supervisor.report().generation })
                .await
                .map(drop)
                .map_err(|e| format!("the supervisor did not answer: {e}"))
        })
    }
}

/// A reload: the new configuration must pass [`check`]; the TLS certificates are read again
/// from `certs_dir` (served from the next handshake; open connections keep theirs); any other
/// changed setting needs a restart.
async fn reload(
    running: Config,
    new: Config,
    certs: Option<Arc<proxy::CertStore>>,
) -> Result<Reloaded, String> {
    check(&new).map_err(|e| e.to_string())?;
    let applied = match certs {
        Some(_) if running.certs_dir.is_none() => {
            "nothing to read again (no certs_dir; ACME's certificates come from Beacon)".into()
        }
        Some(certs) => {
            let count = tokio::task::spawn_blocking(move || certs.reload())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("certs_dir: {e}; still serving the previous certificates"))?;
            format!("{} read again", plural(count, "TLS certificate"))
        }
        None => "nothing to read again (no HTTPS)".into(),
    };
    Ok(Reloaded {
        applied,
        needs_restart: px_runtime::config::restart_needed(&running, &new, RELOADABLE),
    })
}
