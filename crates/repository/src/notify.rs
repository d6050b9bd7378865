//! Tells Beacon about committed releases and builds waiting for a node over the TLS control
//! link (connecting and reconnecting are `px_link`'s). Never blocks or fails an upload: notices
//! go through a bounded queue, and when it is full or Beacon is away they are dropped, because
//! Beacon re-reads the desired state and the pending builds from storage when it reconciles.
//!
//! It also carries the minted tokens (hashes and scopes, never secrets): the whole list on
//! each connect and each change, so Beacon accepts what apprepo accepts.
//!
//! The link also carries Beacon's automatic rollbacks (a release over its error budget):
//! each is committed here, once, and announced like any release.

use std::collections::VecDeque;
use std::sync::Arc;

use px_link::{Link, LinkError, LinkSettings};
use px_proto::api::{Release, TokenGrant};
use px_proto::build::{Build, BuildRequested};
use px_proto::link::{
    DiskReport, FromBeacon, NodeReport, ReleaseCommitted, RollbackOrder, ToBeacon, TokenGrants,
};
use px_runtime::shutdown::CriticalTasks;
use tokio::sync::{mpsc, watch};
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

/// Handle used by request handlers; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    /// Only [`ToBeacon::ReleaseCommitted`] and [`ToBeacon::BuildRequested`] go through it.
    tx: Option<mpsc::Sender<ToBeacon>>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// A notifier that sends nothing (no Beacon configured).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Starts the link task as the critical task "the beacon link" (it stops when `shutdown`
    /// is cancelled); the rollback orders it receives are carried out in tasks on `tracker`.
    pub fn start(
        settings: LinkSettings,
        releases: Releases,
        grants: watch::Receiver<Arc<Vec<TokenGrant>>>,
        metrics: Arc<Metrics>,
        critical: &CriticalTasks,
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
        let client = Client {
            notices: rx,
            pending: VecDeque::new(),
            rollbacks,
            grants,
            metrics,
        };
        critical.spawn("the beacon link", px_link::run(settings, client, shutdown));
        notifier
    }

    /// Queues the notice of a committed release without waiting.
    pub fn release_committed(&self, release: &Release) {
        self.send(ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: release.app.clone(),
            version: release.version,
            bundle_sha256: release.bundle.sha256.clone(),
        }));
    }

    /// Queues the notice that `current`'s app was scaled or its domains changed, without waiting: the notice of its
    /// current release again, since what Beacon does with either is read the desired state
    /// (formations included) at once, so the change reaches the nodes in well under a second.
    pub fn formation_changed(&self, current: &Release) {
        self.release_committed(current);
    }

    /// Queues the notice that `build` waits for a node, without waiting.
    pub fn build_requested(&self, build: &Build) {
        self.send(ToBeacon::BuildRequested(BuildRequested {
            app: build.app.clone(),
            build: build.number,
        }));
    }

    fn send(&self, notice: ToBeacon) {
        let Some(tx) = &self.tx else { return };
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

/// apprepo on its link: notices out, rollback orders in.
struct Client {
    notices: mpsc::Receiver<ToBeacon>,
    /// Notices not sent yet, kept across a reconnect (at most [`PENDING_MAX`], the newest).
    pending: VecDeque<ToBeacon>,
    rollbacks: Rollbacks,
    /// The minted tokens Beacon must accept: the whole list on each connect and each change.
    grants: watch::Receiver<Arc<Vec<TokenGrant>>>,
    metrics: Arc<Metrics>,
}

impl Client {
    fn grants_frame(&mut self) -> ToBeacon {
        ToBeacon::Tokens(TokenGrants {
            grants: self.grants.borrow_and_update().as_ref().clone(),
        })
    }
}

impl px_link::Client for Client {
    async fn session(&mut self, link: &mut Link) -> Result<(), LinkError> {
        let mut heartbeat = px_link::heartbeats();
        let frame = self.grants_frame();
        link.send(frame).await?;
        loop {
            while let Some(notice) = self.pending.pop_front() {
                if let Err(e) = link.send(notice.clone()).await {
                    self.pending.push_front(notice);
                    return Err(e);
                }
                self.metrics.notifications_sent.inc();
            }
            tokio::select! {
                notice = self.notices.recv() => match notice {
                    Some(n) => self.pending.push_back(n),
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => link.send(ToBeacon::Heartbeat(report(&self.metrics))).await?,
                changed = self.grants.changed() => match changed {
                    Ok(()) => {
                        let frame = self.grants_frame();
                        link.send(frame).await?;
                    }
                    // The list's owner is gone: apprepo is stopping.
                    Err(_) => return Ok(()),
                },
                frame = link.recv() => match frame? {
                    FromBeacon::Heartbeat => {}
                    FromBeacon::Rollback(order) => self.rollbacks.carry_out(order),
                    other => tracing::debug!(?other, "unexpected frame from beacon"),
                },
            }
        }
    }

    /// Keeps accepting notices while Beacon is away, keeping the newest.
    async fn unlinked(&mut self) {
        while let Some(notice) = self.notices.recv().await {
            keep(&mut self.pending, notice, &self.metrics);
        }
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

fn keep(pending: &mut VecDeque<ToBeacon>, notice: ToBeacon, metrics: &Metrics) {
    if pending.len() >= PENDING_MAX {
        pending.pop_front();
        metrics.notifications_dropped.inc();
    }
    pending.push_back(notice);
}
