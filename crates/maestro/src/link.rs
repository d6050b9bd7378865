//! The client side of the control link: connects to Beacon over TLS, says hello with the
//! node's full actual state, applies assignments (persisting each first), heartbeats with the
//! full state, forwards events, and reconnects with jittered backoff. Web traffic never waits
//! for any of this: the persisted assignment is served before the first connect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    Assignment, FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_DEADLINE, HEARTBEAT_INTERVAL, Hello,
    NodeEvent, PROTOCOL_VERSION, PeerRole, ToBeacon,
};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;

/// Reconnect backoff bounds (doubling, ±50% jitter, so a fleet does not reconnect in step
/// after a Beacon restart).
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Least time between two state reports sent because something changed; heartbeats still
/// go every interval.
pub const MIN_REPORT_GAP: Duration = Duration::from_millis(50);
/// How often forwarded log lines are sent, batched.
pub const LOG_FLUSH: Duration = Duration::from_millis(200);
/// Log lines forwarded per flush (10 000 a second): enough for `em logs -f` on a busy app,
/// bounded so a runaway app cannot flood the control link; the rest is counted as dropped
/// (the full output is always in the node's log files).
pub const LOG_LINES_PER_FLUSH: usize = 2000;
/// The persisted assignment, in the state directory.
pub const ASSIGNMENT_FILE: &str = "assignment.json";

pub struct LinkSettings {
    pub addr: String,
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub token: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Runtimes found on this host (`python3` → `3.11.7`), for Beacon's placement.
    pub runtimes: std::collections::BTreeMap<String, String>,
    /// Whether the link is up now, for the status systemd shows; set by [`run`].
    pub linked: Arc<std::sync::atomic::AtomicBool>,
}

type Link = Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    FrameCodec<FromBeacon, ToBeacon>,
>;

/// Reads the persisted assignment, if any.
pub fn load_assignment(state_dir: &Path) -> Option<Assignment> {
    let path = state_dir.join(ASSIGNMENT_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "persisted assignment unreadable; waiting for beacon");
            None
        }
    }
}

/// Writes the assignment atomically (temporary file, fsync, rename, directory fsync).
pub fn save_assignment(state_dir: &Path, assignment: &Assignment) -> std::io::Result<()> {
    use std::io::Write;
    let path = state_dir.join(ASSIGNMENT_FILE);
    let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
    tmp.write_all(&serde_json::to_vec_pretty(assignment).map_err(std::io::Error::other)?)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    std::fs::File::open(state_dir)?.sync_all()
}

async fn connect(settings: &LinkSettings, supervisor: &Supervisor) -> Result<Link, String> {
    let tcp = tokio::net::TcpStream::connect(&settings.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
        .connect(settings.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut link = Framed::new(tls, FrameCodec::new());
    link.send(ToBeacon::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Maestro,
        name: settings.name.clone(),
        token: settings.token.clone(),
        software: px_proto::SOFTWARE_VERSION.into(),
        labels: settings.labels.clone(),
        state: Some(supervisor.report()),
        runtimes: settings.runtimes.clone(),
    }))
    .await
    .map_err(|e| format!("hello: {e}"))?;
    match link.next().await {
        Some(Ok(FromBeacon::Welcome { beacon, .. })) => {
            tracing::info!(%beacon, addr = %settings.addr, "linked to beacon");
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
    BACKOFF_MIN
        .saturating_mul(1 << failures.min(16))
        .min(BACKOFF_MAX)
        .mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Applies an assignment: persist first, so a crash right after still serves it on restart.
fn apply(supervisor: &Supervisor, state_dir: &Path, assignment: &Assignment) {
    if assignment.generation == supervisor.generation() && supervisor.generation() != 0 {
        return;
    }
    if assignment.generation < supervisor.generation() {
        // Beacon is authoritative; a lower number means its state was reset.
        tracing::warn!(
            got = assignment.generation,
            had = supervisor.generation(),
            "assignment generation went backwards; applying it"
        );
    }
    if let Err(e) = save_assignment(state_dir, assignment) {
        tracing::error!(error = %e, "cannot persist the assignment; applying it anyway");
    }
    tracing::info!(
        generation = assignment.generation,
        apps = assignment.apps.len(),
        "applying assignment"
    );
    supervisor.apply(assignment);
}

/// Sends the node's state, after every event queued before it was read: the supervisor queues
/// an event before it changes the state, so Beacon never sees a state (a release serving
/// everywhere) ahead of the events that led to it (`instance_started`, `deploy_finished`),
/// which `em deploy` reads as its phases.
async fn send_report<S>(
    link: &mut S,
    supervisor: &Supervisor,
    events: &mut mpsc::Receiver<NodeEvent>,
) -> Result<(), String>
where
    S: futures_util::Sink<ToBeacon> + Unpin,
    S::Error: std::fmt::Display,
{
    let report = supervisor.report();
    while let Ok(event) = events.try_recv() {
        link.send(ToBeacon::Event(event))
            .await
            .map_err(|e| e.to_string())?;
    }
    link.send(ToBeacon::Heartbeat(report))
        .await
        .map_err(|e| e.to_string())
}

/// Runs the link until `shutdown`.
pub async fn run(
    settings: LinkSettings,
    supervisor: Arc<Supervisor>,
    mut events: mpsc::Receiver<NodeEvent>,
    mut changes: watch::Receiver<u64>,
    app_logs: Arc<crate::logs::AppLogs>,
    state_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&settings, &supervisor)) => r.unwrap_or_else(|_| Err("handshake timed out".into())),
        };
        let mut link = match connected {
            Ok(link) => {
                failures = 0;
                settings
                    .linked
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                link
            }
            Err(reason) => {
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(addr = %settings.addr, %reason, retry_in = ?wait, "beacon link down; apps keep serving");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence = tokio::time::sleep(HEARTBEAT_DEADLINE);
        tokio::pin!(silence);
        changes.borrow_and_update();
        let mut lines = app_logs.follow();
        let mut batch: Vec<px_proto::link::LogLine> = Vec::new();
        let mut dropped = 0u64;
        let mut budget = LOG_LINES_PER_FLUSH;
        let mut flush = tokio::time::interval(LOG_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let error: String = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = link.close().await;
                    return;
                }
                _ = &mut silence => break "beacon silent past the heartbeat deadline".into(),
                _ = heartbeat.tick() => {
                    if let Err(e) = send_report(&mut link, &supervisor, &mut events).await {
                        break e;
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    tokio::time::sleep(MIN_REPORT_GAP).await;
                    changes.borrow_and_update();
                    if let Err(e) = send_report(&mut link, &supervisor, &mut events).await {
                        break e;
                    }
                }
                line = lines.recv() => match line {
                    Ok(line) if budget > 0 => {
                        budget -= 1;
                        batch.push(line);
                        if batch.len() >= px_proto::link::MAX_LOG_BATCH {
                            let lines = std::mem::take(&mut batch);
                            if let Err(e) = link.send(ToBeacon::Logs(px_proto::link::LogBatch { lines, dropped: std::mem::take(&mut dropped) })).await {
                                break e.to_string();
                            }
                        }
                    }
                    Ok(_) => dropped += 1,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => dropped += n,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                _ = flush.tick() => {
                    budget = LOG_LINES_PER_FLUSH;
                    if !batch.is_empty() || dropped > 0 {
                        let lines = std::mem::take(&mut batch);
                        if let Err(e) = link.send(ToBeacon::Logs(px_proto::link::LogBatch { lines, dropped: std::mem::take(&mut dropped) })).await {
                            break e.to_string();
                        }
                    }
                }
                event = events.recv() => match event {
                    Some(event) => {
                        if let Err(e) = link.send(ToBeacon::Event(event)).await {
                            break e.to_string();
                        }
                    }
                    None => return,
                },
                frame = link.next() => {
                    silence.as_mut().reset(tokio::time::Instant::now() + HEARTBEAT_DEADLINE);
                    match frame {
                        Some(Ok(FromBeacon::Assign(assignment))) => apply(&supervisor, &state_dir, &assignment),
                        Some(Ok(FromBeacon::Restart { app })) => {
                            tracing::info!(%app, "restart requested by beacon");
                            supervisor.restart(&app);
                        }
                        Some(Ok(FromBeacon::Stop { app })) => {
                            tracing::info!(%app, "stop requested by beacon");
                            supervisor.stop_app(&app);
                        }
                        Some(Ok(FromBeacon::Heartbeat)) => {}
                        Some(Ok(other)) => tracing::debug!(?other, "unexpected frame from beacon"),
                        Some(Err(e)) => break e.to_string(),
                        None => break "beacon closed the link".into(),
                    }
                }
            }
        };
        settings
            .linked
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(addr = %settings.addr, %error, "beacon link lost; reconnecting, apps keep serving");
    }
}
