//! Tells Beacon about committed releases over the TLS control link. Never blocks or fails an
//! upload: notices go through a bounded queue, and when it is full or Beacon is away they are
//! dropped, because Beacon re-reads the desired state from storage when it reconciles.
//!
//! The link also carries Beacon's automatic rollbacks (a release over its error budget):
//! each is committed here, once, and announced like any release.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use px_proto::api::Release;
use px_proto::codec::FrameCodec;
use px_proto::link::{
    DiskReport, FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_DEADLINE, HEARTBEAT_INTERVAL, Hello,
    NodeReport, PROTOCOL_VERSION, PeerRole, ReleaseCommitted, RollbackOrder, ToBeacon,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::releases::Releases;
use crate::rollback::{self, RollbackRequest};

/// Notices waiting for the link; a burst of deploys larger than this drops the oldest news,
/// which reconciliation repairs.
pub const NOTIFY_QUEUE: usize = 1024;
/// Notices kept across a reconnect.
pub const PENDING_MAX: usize = 256;
/// Who commits Beacon's automatic rollbacks, as the release's `created_by`.
pub const ROLLBACK_AUTHOR: &str = "beacon";
/// Reconnect backoff bounds; each failure doubles the wait, with ±50% jitter so many
/// repositories do not reconnect in step.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and how to reach Beacon, resolved from the config at start-up.
pub struct LinkSettings {
    pub addr: String,
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub token: String,
    pub name: String,
}

/// Handle used by request handlers; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<ReleaseCommitted>>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// A notifier that sends nothing (no Beacon configured).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Starts the link task on `tracker`; it stops when `shutdown` is cancelled.
    pub fn start(
        settings: LinkSettings,
        releases: Releases,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(NOTIFY_QUEUE);
        let notifier = Self {
            tx: Some(tx),
            metrics: metrics.clone(),
        };
        let rollbacks = Rollbacks {
            releases,
            notifier: notifier.clone(),
            tracker: tracker.clone(),
            in_progress: Arc::default(),
        };
        tracker.spawn(link_task(settings, rx, rollbacks, metrics, shutdown));
        notifier
    }

    /// Queues a notice without waiting.
    pub fn release_committed(&self, release: &Release) {
        let Some(tx) = &self.tx else { return };
        let notice = ReleaseCommitted {
            app: release.app.clone(),
            version: release.version,
            bundle_sha256: release.bundle.sha256.clone(),
        };
        if tx.try_send(notice).is_err() {
            self.metrics.notifications_dropped.inc();
        }
    }
}

/// Carries out Beacon's rollback orders, each in a task of its own so the link never waits on
/// storage, and one at a time per app.
#[derive(Clone)]
struct Rollbacks {
    releases: Releases,
    notifier: Notifier,
    tracker: TaskTracker,
    /// Apps with an order being committed; a repeat of the order meanwhile is ignored.
    in_progress: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Rollbacks {
    fn carry_out(&self, order: RollbackOrder) {
        let fresh = self
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(order.app.clone());
        if !fresh {
            return;
        }
        let this = self.clone();
        self.tracker.spawn(async move {
            let request = RollbackRequest {
                app: &order.app,
                to: order.to,
                only_from: Some(order.from),
                reason: Some(&order.reason),
            };
            match rollback::commit(&this.releases, ROLLBACK_AUTHOR, request).await {
                Ok(release) => {
                    tracing::warn!(app = %order.app, from = order.from, version = release.version, reason = %order.reason, "automatic rollback committed");
                    this.notifier.release_committed(&release);
                }
                // Already rolled back, or a newer deploy: nothing to do.
                Err(ApiError::Conflict(why)) => tracing::info!(app = %order.app, %why, "rollback order not needed"),
                Err(e) => tracing::error!(app = %order.app, from = order.from, error = %e, "cannot carry out a rollback order; beacon sends it again"),
            }
            this.in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&order.app);
        });
    }
}

type Link = Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    FrameCodec<FromBeacon, ToBeacon>,
>;

async fn connect(settings: &LinkSettings) -> Result<Link, String> {
    let tcp = tokio::net::TcpStream::connect(&settings.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
        .connect(settings.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut link = Framed::new(tls, FrameCodec::new());
    link.send(ToBeacon::Hello(Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Repository,
        name: settings.name.clone(),
        token: settings.token.clone(),
        software: px_proto::SOFTWARE_VERSION.into(),
        labels: Default::default(),
        state: None,
    }))
    .await
    .map_err(|e| format!("hello: {e}"))?;
    match link.next().await {
        Some(Ok(FromBeacon::Welcome { protocol, beacon })) => {
            tracing::info!(%beacon, protocol, addr = %settings.addr, "linked to beacon");
            Ok(link)
        }
        Some(Ok(FromBeacon::Rejected { reason })) => {
            Err(format!("beacon refused the link: {reason}"))
        }
        Some(Ok(other)) => Err(format!("expected welcome, got {other:?}")),
        Some(Err(e)) => Err(format!("handshake: {e}")),
        None => Err("beacon closed the link during the handshake".into()),
    }
}

fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1 << failures.min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

async fn link_task(
    settings: LinkSettings,
    mut rx: mpsc::Receiver<ReleaseCommitted>,
    rollbacks: Rollbacks,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut pending: VecDeque<ReleaseCommitted> = VecDeque::new();
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&settings)) => r.unwrap_or_else(|_| Err("handshake timed out".into())),
        };
        let mut link = match connected {
            Ok(link) => {
                failures = 0;
                link
            }
            Err(reason) => {
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(addr = %settings.addr, %reason, retry_in = ?wait, "beacon link down");
                // Keep accepting notices meanwhile, keeping the newest.
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = &mut sleep => break,
                        notice = rx.recv() => match notice {
                            Some(n) => keep(&mut pending, n, &metrics),
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Beacon heartbeats too; a link silent past the deadline is dead even if TCP says not.
        let silence = tokio::time::sleep(HEARTBEAT_DEADLINE);
        tokio::pin!(silence);
        let error = 'link: loop {
            while let Some(notice) = pending.pop_front() {
                if let Err(e) = link.send(ToBeacon::ReleaseCommitted(notice.clone())).await {
                    pending.push_front(notice);
                    break 'link e.to_string();
                }
                metrics.notifications_sent.inc();
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = link.close().await;
                    return;
                }
                notice = rx.recv() => match notice {
                    Some(n) => pending.push_back(n),
                    None => return,
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = link.send(ToBeacon::Heartbeat(report(&metrics))).await {
                        break 'link e.to_string();
                    }
                }
                _ = &mut silence => break 'link "beacon silent past the heartbeat deadline".to_string(),
                frame = link.next() => match frame.inspect(|_| silence.as_mut().reset(tokio::time::Instant::now() + HEARTBEAT_DEADLINE)) {
                    Some(Ok(FromBeacon::Heartbeat)) => {}
                    Some(Ok(FromBeacon::Rollback(order))) => rollbacks.carry_out(order),
                    Some(Ok(other)) => tracing::debug!(?other, "unexpected frame from beacon"),
                    Some(Err(e)) => break 'link e.to_string(),
                    None => break 'link "beacon closed the link".to_string(),
                },
            }
        };
        tracing::warn!(addr = %settings.addr, %error, "beacon link lost; reconnecting");
    }
}

/// The heartbeat's report: no instances, and the bundles stored as of the last retention
/// sweep (none before the first), for Beacon's status page.
fn report(metrics: &Metrics) -> NodeReport {
    let swept = metrics.retention_sweeps.get() > 0;
    NodeReport {
        disk: swept.then(|| DiskReport {
            used_bytes: metrics.bundle_bytes.get(),
            objects: Some(metrics.bundles.get()),
            free_bytes: None,
            floor_bytes: None,
        }),
        ..NodeReport::default()
    }
}

fn keep(pending: &mut VecDeque<ReleaseCommitted>, notice: ReleaseCommitted, metrics: &Metrics) {
    if pending.len() >= PENDING_MAX {
        pending.pop_front();
        metrics.notifications_dropped.inc();
    }
    pending.push_back(notice);
}
