//! The control-link server: TLS over TCP, the `Hello`/`Welcome` handshake, then one task per
//! link that owns its connection and selects over frames, assignments, commands and timers.
//! A repository's notices (a release committed, a build requested) trigger a reconcile.

use std::sync::Arc;
use std::time::Duration;

use px_proto::codec::MAX_FRAME_BYTES;
use px_proto::link::{
    FromBeacon, HEARTBEAT_DEADLINE, Hello, MAX_HELLO_BYTES, MAX_NODE_LABELS,
    MAX_REPORTED_INSTANCES, PROTOCOL_VERSION, PeerRole, ToBeacon,
};
use px_runtime::tokens::TokenEntry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, PREAUTH_DEADLINE, Unverified};
use crate::auth::{Role, Tokens};
use crate::frames::{FrameLink, Outgoing, Shared, heartbeat_frame};
use crate::hub::{Attached, Hub};
use crate::link_silence::Silence;
use crate::link_tls::ServerTls;
use crate::metrics::Metrics;
use crate::open_links::OpenLinks;

/// Most links at once; 10 000 Maestros is the design goal, so leave twice that.
pub const MAX_LINKS: usize = 20_000;
/// Notices queued from repository links to the reconciler; more are coalesced away, since one
/// reconcile reads everything.
pub const RECONCILE_TRIGGERS: usize = 64;
/// Most builds one node may report. A node reports the latest build per app it built, and the
/// repository keeps one pending build per app: as many as the instances a node may report is
/// more than any node builds, and bounds what one report makes Beacon hold.
pub const MAX_REPORTED_BUILDS: usize = MAX_REPORTED_INSTANCES;

/// rustls's unbuffered connection under the frames: an idle link holds no TLS buffer
/// (`crate::link_tls`).
type Link = FrameLink<ServerTls<TcpStream>, ToBeacon, FromBeacon>;

/// Answers the peer's heartbeat with Beacon's own, before anything else is done with it, so a
/// slow report does not hold the answer the peer waits for
/// (`px_proto::link::HEARTBEAT_ANSWER_DEADLINE`).
async fn answer_heartbeat(link: &mut Link) -> Result<(), String> {
    // Encoded once for every link and every answer (`frames::heartbeat_frame`): one write of a
    // few bytes, in the wake-up that read the heartbeat.
    link.send_encoded(heartbeat_frame()?)
        .await
        .map_err(|e| e.to_string())
}

/// The peer's allowed silence on a link opened now, on one timer (`crate::link_silence`).
fn peer_silence() -> Silence {
    Silence::new(tokio::time::Instant::now(), HEARTBEAT_DEADLINE)
}

/// The peer's name from its `Hello`, the rest of which is dropped: a link keeps only this for
/// its life, not the labels, runtimes, token and first report it was attached with.
fn peer_name(hello: Box<Hello>) -> Box<str> {
    hello.name.into_boxed_str()
}

pub struct LinkServer {
    pub hub: Arc<Hub>,
    pub tokens: Tokens,
    pub tls: tokio_rustls::TlsAcceptor,
    pub metrics: Arc<Metrics>,
    pub reconcile: mpsc::Sender<()>,
    pub logs: Arc<crate::logstore::LogStore>,
    pub name: String,
    pub runs: Arc<crate::runs::Runs>,
    /// The slots of connections whose `Hello` is not verified yet.
    pub admission: Arc<Admission>,
    /// The established links and their tokens, checked again on a reload.
    pub open: Arc<OpenLinks>,
    /// The ACME challenges every Maestro answers, sent on each link (`crate::acme`).
    pub challenges: crate::acme::Challenges,
}

/// Why the link server stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the control listener no longer accepts links: {0}")]
    ListenerBroken(std::io::Error),
}

impl LinkServer {
    /// Accepts links until `shutdown`; each runs on `tracker`. Returns an error only when the
    /// listener can never accept again, so that Beacon stops (and is restarted) rather than
    /// run on without links.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let slots = Arc::new(Semaphore::new(MAX_LINKS));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return Ok(()) },
            };
            // A connection is accepted only with a slot for an unverified one: beyond
            // `MAX_UNAUTHENTICATED`, peers wait in the kernel's backlog.
            let unverified = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                slot = self.admission.slot() => match slot { Some(s) => s, None => return Ok(()) },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) if px_runtime::shutdown::accept_error_is_fatal(&e) => {
                        return Err(ServeError::ListenerBroken(e));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a link failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(unverified) = self.admission.admit(peer.ip(), unverified) else {
                // Closed at once and not logged: a flood must not flood the log too.
                self.metrics.links_over_source_cap.inc();
                self.metrics.links_rejected.inc();
                drop(tcp);
                continue;
            };
            let server = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                if let Err(reason) = server.handle(tcp, unverified, shutdown).await {
                    server.metrics.links_rejected.inc();
                    tracing::info!(%peer, %reason, "link closed");
                }
            });
        }
    }

    async fn handle(
        &self,
        tcp: TcpStream,
        unverified: Unverified,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        // The futures of the handshake, the attach and a report are boxed for the time they
        // run: inline, the largest of them would size the task of every link for its life.
        let handshake = Box::pin(self.handshake(tcp));
        let (mut link, hello, entry) = tokio::time::timeout(PREAUTH_DEADLINE, handshake)
            .await
            .map_err(|_| {
            format!(
                "no verified hello within {}s of connecting",
                PREAUTH_DEADLINE.as_secs()
            )
        })??;
        // Proved: the slot goes back, and the link may carry frames of any allowed size.
        drop(unverified);
        link.set_max(MAX_FRAME_BYTES);
        let registered = self.open.register(&hello.name, entry, &shutdown);
        self.metrics.links_accepted.inc();
        let revoked = &registered.revoked;
        match hello.role {
            PeerRole::Repository => {
                let name = peer_name(hello);
                self.repository_link(&mut link, &name, revoked, shutdown)
                    .await
            }
            PeerRole::Maestro => {
                let attached = Box::pin(self.hub.attach_within(&hello, revoked)).await;
                let node = peer_name(hello);
                self.maestro_link(&mut link, &node, attached, revoked, shutdown)
                    .await
            }
        }
    }

    /// TLS, then the `Hello`, read with a limit of [`MAX_HELLO_BYTES`]. A refused peer gets
    /// `Rejected` with the reason before the close. Returns the token entry the peer proved.
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<(Link, Box<Hello>, Arc<TokenEntry<Role>>), String> {
        let tls = ServerTls::accept(tcp, self.tls.config().clone())
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let mut link = FrameLink::new(tls, MAX_HELLO_BYTES);
        let hello = match link.next().await {
            Some(Ok(ToBeacon::Hello(hello))) => hello,
            Some(Ok(other)) => {
                return Err(reject(
                    &mut link,
                    format!("expected hello first, got {}", frame_name(&other)),
                )
                .await);
            }
            Some(Err(e)) => return Err(reject(&mut link, format!("bad frame: {e}")).await),
            None => return Err("closed before hello".into()),
        };
        if hello.protocol != PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} is not supported (this beacon speaks {PROTOCOL_VERSION}); upgrade the peer",
                hello.protocol
            );
            return Err(reject(&mut link, reason).await);
        }
        let wanted = match hello.role {
            PeerRole::Maestro => Role::Maestro,
            PeerRole::Repository => Role::Repository,
        };
        let entry = match self.tokens.verify(&hello.token) {
            Some(entry) if entry.role == wanted => entry,
            Some(entry) => {
                let reason = format!("token {:?} is not a {:?} token", entry.name, wanted);
                return Err(reject(&mut link, reason).await);
            }
            None => return Err(reject(&mut link, "unknown token".into()).await),
        };
        if !crate::auth::valid_node_name(&hello.name) {
            return Err(reject(&mut link, format!("invalid peer name {:?}", hello.name)).await);
        }
        if let Err(reason) = token_admits(&entry, &hello.name) {
            return Err(reject(&mut link, reason).await);
        }
        if hello.labels.len() > MAX_NODE_LABELS
            || hello.runtimes.len() > px_proto::link::MAX_REPORTED_RUNTIMES
            || hello.state.as_ref().is_some_and(|s| {
                s.instances.len() > MAX_REPORTED_INSTANCES || s.builds.len() > MAX_REPORTED_BUILDS
            })
        {
            return Err(reject(
                &mut link,
                "too many labels, runtimes, instances or builds in hello".into(),
            )
            .await);
        }
        link.send(&FromBeacon::Welcome {
            protocol: PROTOCOL_VERSION,
            beacon: self.name.clone(),
            heartbeat_ms: Some(px_proto::link::beacon_heartbeat_ms()),
            answers_heartbeats: true,
        })
        .await
        .map_err(|e| format!("welcome: {e}"))?;
        Ok((link, Box::new(hello), entry))
    }

    async fn repository_link(
        &self,
        link: &mut Link,
        name: &str,
        revoked: &CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        tracing::info!(peer = %name, "repository linked");
        self.hub.repository_link(name, true);
        let result = self.repository_frames(link, name, revoked, shutdown).await;
        self.hub.repository_link(name, false);
        result
    }

    async fn repository_frames(
        &self,
        link: &mut Link,
        name: &str,
        revoked: &CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        // Pending rollbacks go out whole now and on every change: the repository ignores
        // one it already carried out.
        let mut rollbacks = self.hub.rollback_orders();
        rollbacks.mark_changed();
        let mut silence = peer_silence();
        let timer = tokio::time::sleep_until(silence.ends_at());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                // `revoked` is a child of `shutdown`: one wait for both.
                _ = revoked.cancelled() => {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    return Err(format!("repository {name}: its token is no longer accepted"));
                }
                _ = &mut timer => {
                    if silence.is_over(tokio::time::Instant::now()) {
                        return Err(format!("repository {name} silent past the deadline"));
                    }
                    timer.as_mut().reset(silence.ends_at());
                }
                r = rollbacks.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let orders = rollbacks.borrow_and_update().clone();
                    for order in orders.iter() {
                        tracing::info!(app = %order.app, from = order.from, "asking the repository for a rollback");
                        link.send(&FromBeacon::Rollback(order.clone())).await.map_err(|e| e.to_string())?;
                    }
                }
                frame = link.next() => match frame.inspect(|_| silence.heard(tokio::time::Instant::now())) {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(format!("bad frame from repository {name}: {e}")),
                    Some(Ok(ToBeacon::ReleaseCommitted(notice))) => {
                        self.metrics.releases_notified.inc();
                        tracing::info!(app = %notice.app, version = notice.version, "release committed");
                        // A full queue already holds a pending reconcile, which reads everything.
                        let _ = self.reconcile.try_send(());
                    }
                    Some(Ok(ToBeacon::BuildRequested(notice))) => {
                        tracing::info!(app = %notice.app, build = notice.build, "build requested");
                        // The reconcile reads the pending builds with the apps, as above.
                        let _ = self.reconcile.try_send(());
                    }
                    Some(Ok(ToBeacon::Heartbeat(report))) => {
                        answer_heartbeat(link).await?;
                        self.hub.repository_seen(name, &report);
                    }
                    Some(Ok(ToBeacon::Tokens(list))) => match crate::auth::accept_grants(&self.tokens, &list.grants) {
                        Ok(count) => tracing::info!(repository = %name, count, "minted tokens updated"),
                        Err(e) => return Err(format!("repository {name}: {e}")),
                    },
                    Some(Ok(other)) => return Err(format!("unexpected {} from a repository", frame_name(&other))),
                },
            }
        }
    }

    /// The frames of the Maestro `node`, attached to the hub as `attached`, until the link ends;
    /// detaches it then.
    async fn maestro_link(
        &self,
        link: &mut Link,
        node: &str,
        mut attached: Attached,
        revoked: &CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let conn = attached.conn;
        tracing::info!(%node, "maestro linked");
        let mut challenges = self.challenges.subscribe();
        let mut certificates = self.challenges.subscribe_certs();
        let result = async {
            // The certificates once the ACME task has named them all (an empty set too: a
            // node then drops what it kept of names no longer served).
            let current = certificates.borrow_and_update().clone();
            if let Some(current) = current {
                send_shared(link, &current).await?;
            }
            // The current challenge set first (a node that linked mid-order answers too), then
            // every change; an empty set is not sent to a node that never had one.
            let current = challenges.borrow_and_update().clone();
            if current.value != px_proto::acme::AcmeChallenges::default() {
                send_shared(link, &current).await?;
            }
            let initial = attached.assignments.borrow_and_update().clone();
            if let Some(assignment) = initial {
                self.send_assignment(link, node, conn, &assignment).await?;
            }
            let mut silence = peer_silence();
            let timer = tokio::time::sleep_until(silence.ends_at());
            tokio::pin!(timer);
            loop {
                tokio::select! {
                    // `closed` is a child of `revoked`, a child of `shutdown`: one wait for the
                    // three, each of which a select would register and drop on every wake-up.
                    _ = attached.closed.cancelled() => {
                        if shutdown.is_cancelled() {
                            return Ok(());
                        }
                        if revoked.is_cancelled() {
                            return Err(format!("node {node}: its token is no longer accepted"));
                        }
                        return Err(format!("node {node} replaced or lost"));
                    }
                    _ = &mut timer => {
                        if silence.is_over(tokio::time::Instant::now()) {
                            return Err(format!("node {node} silent past the deadline"));
                        }
                        timer.as_mut().reset(silence.ends_at());
                    }
                    changed = attached.assignments.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        let latest = attached.assignments.borrow_and_update().clone();
                        if let Some(assignment) = latest {
                            self.send_assignment(link, node, conn, &assignment).await?;
                        }
                    }
                    changed = challenges.changed() => {
                        if changed.is_ok() {
                            let current = challenges.borrow_and_update().clone();
                            send_shared(link, &current).await?;
                        }
                    }
                    changed = certificates.changed() => {
                        if changed.is_ok() {
                            let current = certificates.borrow_and_update().clone();
                            if let Some(current) = current {
                                send_shared(link, &current).await?;
                            }
                        }
                    }
                    command = attached.commands.recv() => match command {
                        Some(command) => link.send(&command).await.map_err(|e| e.to_string())?,
                        None => return Ok(()),
                    },
                    frame = link.next() => match frame.inspect(|_| silence.heard(tokio::time::Instant::now())) {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(format!("bad frame from node {node}: {e}")),
                        Some(Ok(ToBeacon::Heartbeat(report))) => {
                            answer_heartbeat(link).await?;
                            if report.instances.len() > MAX_REPORTED_INSTANCES {
                                return Err(format!("node {node} reported too many instances"));
                            }
                            if report.builds.len() > MAX_REPORTED_BUILDS {
                                return Err(format!("node {node} reported too many builds"));
                            }
                            self.metrics.heartbeats.inc();
                            Box::pin(self.hub.seen(node, conn, Some(report))).await;
                        }
                        Some(Ok(ToBeacon::Logs(mut batch))) => {
                            if batch.lines.len() > px_proto::link::MAX_LOG_BATCH {
                                return Err(format!("node {node} sent more than {} log lines in one frame", px_proto::link::MAX_LOG_BATCH));
                            }
                            Box::pin(self.hub.seen(node, conn, None)).await;
                            // Only lines about what this node was given are kept.
                            self.hub.keep_own_logs(node, conn, &mut batch);
                            self.logs.push(node, batch);
                        }
                        Some(Ok(ToBeacon::Event(event))) => {
                            Box::pin(self.hub.seen(node, conn, None)).await;
                            if self.hub.own_event(node, conn, &event) {
                                self.hub.node_event(node, event);
                            }
                        }
                        Some(Ok(ToBeacon::Run(frame))) => self.runs.route(node, frame),
                        Some(Ok(other)) => return Err(format!("unexpected {} from node {node}", frame_name(&other))),
                    },
                }
            }
        }
        .await;
        self.runs.node_gone(node, conn);
        self.hub.detach(node, conn);
        result
    }

    /// Sends `node` (its link `conn`) an assignment, as the frame encoded once for every link
    /// it goes to, and records that it was sent.
    async fn send_assignment(
        &self,
        link: &mut Link,
        node: &str,
        conn: u64,
        assignment: &Outgoing,
    ) -> Result<(), String> {
        let frame = assignment
            .frame()
            .map_err(|e| format!("assignment for node {node}: {e}"))?;
        link.send_encoded(frame).await.map_err(|e| e.to_string())?;
        self.metrics.assignments_sent.inc();
        self.hub.assigned(node, conn, assignment.generation);
        Ok(())
    }
}

/// Sends a set every Maestro link sends alike, as the frame encoded once for all of them.
async fn send_shared<T: Clone>(link: &mut Link, shared: &Shared<T>) -> Result<(), String> {
    let frame = shared.frame()?;
    link.send_encoded(frame).await.map_err(|e| e.to_string())
}

/// Whether `entry`'s token may link as `name`: a `maestro` token only as its own node. The
/// reason names both, so the operator sees which token was used where.
pub(crate) fn token_admits(entry: &TokenEntry<Role>, name: &str) -> Result<(), String> {
    if entry.role != Role::Maestro || entry.node.as_deref() == Some(name) {
        return Ok(());
    }
    Err(format!(
        "token {:?} belongs to node {:?}, not to node {name:?}",
        entry.name,
        entry.node.as_deref().unwrap_or("")
    ))
}

async fn reject(link: &mut Link, reason: String) -> String {
    let _ = link
        .send(&FromBeacon::Rejected {
            reason: reason.clone(),
        })
        .await;
    let _ = link.close().await;
    reason
}

fn frame_name(frame: &ToBeacon) -> &'static str {
    match frame {
        ToBeacon::Hello(_) => "hello",
        ToBeacon::Heartbeat(_) => "heartbeat",
        ToBeacon::ReleaseCommitted(_) => "release_committed",
        ToBeacon::BuildRequested(_) => "build_requested",
        ToBeacon::Event(_) => "event",
        ToBeacon::Logs(_) => "logs",
        ToBeacon::Run(_) => "run",
        ToBeacon::Tokens(_) => "tokens",
    }
}
