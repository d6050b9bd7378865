//! What only the active Beacon runs (docs/src/design/control-hosts.md): the hub over its
//! persisted generation, the reconciler, ACME, the sweeper and the link server on the control
//! listener. Without `[lease]` it starts at once; with it, once this Beacon holds the lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use px_runtime::shutdown::CriticalTasks;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::{Checked, StartError, acme, admission, alerts, events, http, hub, links, logstore};
use crate::{metrics, open_links, reconcile, runs};

/// How often changed rollouts are evaluated (and lost nodes looked for, every
/// `hub::nodes::NODE_PASS_INTERVAL` of these): short enough that a finished rollout shows within a
/// quarter second, long enough that the sweep stays a small share of one core at 10 000 links.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How often the kept log lines of apps that no longer exist are dropped: a deleted app's
/// lines stay readable for about this long, and the pass over the store stays rare.
const LOG_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// What a Beacon makes before it knows whether it is active: shared by the standby's HTTP
/// front, the reload handler and the active machinery.
pub(crate) struct Parts {
    pub tracker: TaskTracker,
    pub critical: CriticalTasks,
    pub shutdown: CancellationToken,
    pub metrics: Arc<metrics::Metrics>,
    pub events: Arc<events::EventLog>,
    pub alerter: alerts::Alerter,
    pub client: reconcile::RepositoryClient,
    pub app_logs: Arc<logstore::LogStore>,
    pub runs: Arc<runs::Runs>,
    pub open_links: Arc<open_links::OpenLinks>,
    /// When the sweeper last finished a pass (milliseconds since `epoch`), for the watchdog.
    pub swept: Arc<AtomicU64>,
    pub epoch: Instant,
}

/// What this Beacon is active under: without a lease, floor 0 and nothing shared.
#[derive(Default)]
pub(crate) struct Under {
    /// The lease epoch's generation floor (`lease::generation_floor`).
    pub generation_floor: u64,
    /// Where the hub hands each rollout history it writes, for the shared storage.
    pub shared_histories: Option<Arc<crate::shared_state::PendingHistories>>,
}

/// Starts the active machinery: a hub numbering generations (and the event log its events)
/// above `generation_floor`, the reconciler, ACME (with `acme`), the sweeper and the link server
/// on `control`; returns the hub and the API's router.
pub(crate) fn start(
    config: &Config,
    checked: &Checked,
    parts: &Parts,
    control: TcpListener,
    under: Under,
    https: bool,
    acme: Option<acme::AcmeSettings>,
) -> Result<(Arc<hub::Hub>, axum::Router), StartError> {
    let Under {
        generation_floor,
        shared_histories,
    } = under;
    let Parts {
        tracker,
        critical,
        shutdown,
        metrics,
        ..
    } = parts;
    // Events are numbered from the same floor as generations (see EventLog::raise_floor).
    parts.events.raise_floor(generation_floor);
    let hub = Arc::new(hub::Hub::new(
        hub::HubSettings {
            domain: config.domain.clone(),
            repository_url: config.repository.url.clone(),
            node_lost_after: config.node_lost_after,
            data_dir: config.data_dir.clone(),
            generation_floor,
            shared_histories,
        },
        parts.events.clone(),
        parts.alerter.clone(),
        metrics.clone(),
    )?);
    let (reconcile_tx, reconcile_rx) = tokio::sync::mpsc::channel(links::RECONCILE_TRIGGERS);
    let challenges = acme::Challenges::default();
    if let Some(settings) = acme {
        tracing::info!(directory = %settings.directory_url, challenge = ?settings.challenge, "acme on: ordering certificates for every app's host names");
        tracker.spawn(acme::run(
            settings,
            acme::Store(parts.client.clone()),
            hub.clone(),
            challenges.clone(),
            parts.alerter.clone(),
            shutdown.clone(),
        ));
    }
    critical.spawn(
        "the reconciler",
        reconcile::run(
            parts.client.clone(),
            hub.clone(),
            metrics.clone(),
            config.reconcile_interval,
            reconcile_rx,
            shutdown.clone(),
        ),
    );
    let sweeper_hub = hub.clone();
    let sweeper_logs = parts.app_logs.clone();
    let sweeper_shutdown = shutdown.clone();
    let sweeper_swept = parts.swept.clone();
    let epoch = parts.epoch;
    critical.spawn("the sweeper", async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(LOG_PRUNE_INTERVAL);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweeper_shutdown.cancelled() => return,
                _ = tick.tick() => {
                    sweeper_hub.sweep().await;
                    sweeper_swept.store(crate::millis_since(epoch), Ordering::Relaxed);
                }
                _ = prune.tick() => {
                    // Until the desired state is read, every app is unknown: keep them all.
                    if sweeper_hub.desired_known() {
                        sweeper_logs.retain_apps(|app| sweeper_hub.app_exists(app));
                    }
                }
            }
        }
    });
    let link_server = Arc::new(links::LinkServer {
        hub: hub.clone(),
        tokens: checked.tokens.clone(),
        tls: tokio_rustls::TlsAcceptor::from(checked.tls.clone()),
        metrics: metrics.clone(),
        reconcile: reconcile_tx,
        logs: parts.app_logs.clone(),
        name: "beacon".into(),
        runs: parts.runs.clone(),
        admission: admission::Admission::new(),
        open: parts.open_links.clone(),
        challenges,
    });
    let control_addr = control.local_addr()?;
    critical.spawn(
        "the link server",
        link_server.serve(control, tracker.clone(), shutdown.clone()),
    );
    tracing::info!(control = %control_addr, "accepting control links");
    let state = http::AppState {
        hub: hub.clone(),
        tokens: checked.tokens.clone(),
        metrics: metrics.clone(),
        logs: parts.app_logs.clone(),
        runs: parts.runs.clone(),
        https,
    };
    Ok((hub, http::router(state)))
}
