//! maestro, the Platform.X AppController: runs each assigned app's instances through its
//! AppRunner, switches releases with zero downtime, proxies HTTP(S) to them by host, writes
//! app and access logs, and keeps a control link to Beacon. It serves its last persisted
//! assignment at once on start-up, so web traffic never waits for the control plane.
//! [`run`] is the whole service; `main.rs` only wires it up.

pub mod app_events;
pub mod cli;
pub mod config;
pub mod link;
pub mod logs;
pub mod process;
pub mod proxy;
pub mod routes;
pub mod runtimes;
pub mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use px_runtime::config::ConfigError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Access records waiting for the writer; a disk slower than the traffic drops records
/// (counted) rather than slowing requests.
pub const ACCESS_LOG_QUEUE: usize = 8192;
/// How long stopping may take in all: drain plus instance stops.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(45);

/// The already-bound sockets Maestro serves on.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<TcpListener>,
    pub status: TcpListener,
}

/// Everything in the config that can be checked without the network.
pub struct Checked {
    pub link: Option<link::LinkSettings>,
    pub repository_token: Option<String>,
    pub certs: Option<Arc<proxy::CertStore>>,
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
    let repository_token = config.repository_token_file.as_ref().and_then(|path| {
        px_runtime::secrets::read_secret_file(path)
            .map_err(|e| problems.push(format!("repository_token_file: {e}")))
            .ok()
    });
    let link = config.beacon.as_ref().and_then(|b| {
        let resolved = (|| {
            let (server_name, tls) =
                px_runtime::tls::link_client(&b.addr, b.server_name.as_deref(), &b.ca_file)
                    .map_err(|e| e.to_string())?;
            Ok::<_, String>(link::LinkSettings {
                addr: b.addr.clone(),
                server_name,
                tls,
                token: px_runtime::secrets::read_secret_file(&b.token_file)
                    .map_err(|e| e.to_string())?,
                name: config.node_name.clone(),
                labels: config.labels.clone(),
                runtimes: Default::default(),
            })
        })();
        resolved
            .map_err(|m| problems.push(format!("beacon: {m}")))
            .ok()
    });
    let certs = match (&config.https_listen, &config.certs_dir) {
        (Some(_), Some(dir)) => proxy::CertStore::load(dir)
            .map_err(|e| problems.push(format!("certs_dir: {e}")))
            .ok(),
        (Some(_), None) => {
            problems.push("https_listen needs certs_dir".into());
            None
        }
        _ => None,
    };
    if problems.is_empty() {
        Ok(Checked {
            link,
            repository_token,
            certs,
        })
    } else {
        Err(ConfigError { problems })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl px_runtime::service::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
}

/// Runs Maestro on already-bound listeners until `shutdown`, then drains and stops its apps.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let checked = check(&config)?;
    tokio::fs::create_dir_all(&config.state_dir).await?;
    tokio::fs::create_dir_all(&config.log_dir).await?;
    let tracker = TaskTracker::new();
    let routes = Arc::new(routes::Routes::default());
    let rotation = logs::Rotation::default();
    let app_logs = Arc::new(logs::AppLogs::new(&config.log_dir, rotation));

    // Access log: records → lines → rotating file.
    let (access, mut records) = proxy::AccessLog::new(ACCESS_LOG_QUEUE);
    let (lines_tx, lines_rx) = tokio::sync::mpsc::channel(ACCESS_LOG_QUEUE);
    tracker.spawn(logs::write_access_log(
        config.log_dir.clone(),
        rotation,
        lines_rx,
    ));
    tracker.spawn(async move {
        while let Some(record) = records.recv().await {
            if lines_tx.send(record.to_line()).await.is_err() {
                return;
            }
        }
    });

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
    tracker.spawn(app_events.clone().serve(events_listener, apps_stop.clone()));
    let supervisor = supervisor::Supervisor::new(
        supervisor::Settings {
            node_name: config.node_name.clone(),
            state_dir: config.state_dir.clone(),
            port_range: config.port_range,
            stop_grace: config.stop_grace,
            drain_deadline: config.drain_deadline,
            repository_token: checked.repository_token,
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
        }
        None => tracing::info!("no persisted assignment; waiting for beacon"),
    }

    let metrics = Arc::new(proxy::ProxyMetrics::default());
    let settings = proxy::ProxySettings {
        https_redirect: config.https_redirect,
        ..Default::default()
    };
    let proxy = proxy::Proxy::new(routes, settings, metrics.clone(), access);
    let proxy_stop = CancellationToken::new();
    let http_addr = listeners.http.local_addr()?;
    let serving = TaskTracker::new();
    serving.spawn(proxy.clone().serve_http(listeners.http, proxy_stop.clone()));
    if let (Some(listener), Some(certs)) = (listeners.https, checked.certs) {
        serving.spawn(
            proxy
                .clone()
                .serve_https(listener, certs, proxy_stop.clone()),
        );
    }
    serving.close();

    let status_addr = listeners.status.local_addr()?;
    let status_stop = shutdown.clone();
    let status_supervisor = supervisor.clone();
    let status = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                let app_events = app_events.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        metrics.render() + &app_events.render_metrics(),
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
    tracker.spawn(async move {
        let _ = axum::serve(listeners.status, status)
            .with_graceful_shutdown(status_stop.cancelled_owned())
            .await;
    });

    if let Some(mut settings) = checked.link {
        settings.runtimes =
            runtimes::probe_host(&std::env::var_os("PATH").unwrap_or_default()).await;
        tracing::info!(runtimes = ?settings.runtimes, "runtimes found on this host");
        let changes = supervisor.changes();
        tracker.spawn(link::run(
            settings,
            supervisor.clone(),
            events,
            changes,
            app_logs,
            config.state_dir.clone(),
            shutdown.clone(),
        ));
    } else {
        tracing::info!("no beacon configured; serving the persisted assignment only");
        drop(events);
    }
    tracing::info!(http = %http_addr, status = %status_addr, node = %config.node_name, "maestro ready");

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
    tracing::info!("maestro stopped");
    Ok(())
}
