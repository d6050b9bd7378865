//! Maestro on its control link to Beacon (connecting and reconnecting is `px_link`'s): says
//! hello with the node's full actual state, applies assignments (persisting each first) and
//! hands their builds to the build runner, heartbeats with the full state, forwards events,
//! app logs and build output. Web traffic never waits for
//! any of this: the persisted assignment is served before the first connect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use px_link::{Link, LinkError};
use px_proto::acme::{MAX_ACME_CHALLENGES, MAX_ANNOUNCED_CERTS};
use px_proto::link::{Assignment, FromBeacon, Hello, LogBatch, LogLine, NodeEvent, ToBeacon};
use px_proto::run::RunFromNode;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};

use crate::builds::Builds;
use crate::logs::AppLogs;
use crate::runs::Runs;
use crate::supervisor::Supervisor;

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

/// What Maestro brings to its link: the node it describes and the queues it forwards.
pub struct Client {
    pub supervisor: Arc<Supervisor>,
    /// One-off runs (`em run`) on this node, and the frames they send Beacon.
    pub(crate) runs: Arc<Runs>,
    pub(crate) run_frames: mpsc::Receiver<RunFromNode>,
    /// Runs the builds of each assignment.
    pub(crate) builds: Arc<Builds>,
    /// Events from the supervisor and the apps, for Beacon.
    pub events: mpsc::Receiver<NodeEvent>,
    /// Bumped by the supervisor whenever the node's state changes.
    pub changes: watch::Receiver<u64>,
    pub app_logs: Arc<AppLogs>,
    /// Where the assignment is persisted.
    pub state_dir: PathBuf,
    /// This node's labels, for Beacon's placement.
    pub labels: BTreeMap<String, String>,
    /// Runtimes found on this host (`python3` → `3.11.7`), for Beacon's placement.
    pub runtimes: BTreeMap<String, String>,
    /// The proxy's ACME challenge answers, replaced by each set Beacon sends.
    pub acme: Arc<crate::proxy::AcmeAnswers>,
    /// The certificates Beacon names, for the task that fetches them (`acme_certs.rs`).
    pub acme_certs: watch::Sender<Arc<px_proto::acme::AcmeCertVersions>>,
}

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
    let bytes = serde_json::to_vec_pretty(assignment).map_err(std::io::Error::other)?;
    px_runtime::fs::write_atomic(&state_dir.join(ASSIGNMENT_FILE), &bytes)
}

/// Applies an assignment: persist first, so a crash right after still serves it on restart.
/// Its builds go to the build runner every time, even for a generation already applied: the
/// persisted assignment served at start-up carries its apps but never starts builds, which
/// wait for Beacon's word that they are still wanted.
fn apply(supervisor: &Supervisor, builds: &Builds, state_dir: &Path, assignment: &Assignment) {
    builds.apply(&assignment.builds);
    supervisor.apply_phases(&assignment.phases, crate::supervisor::PhaseSource::Beacon);
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
async fn send_report(
    link: &mut Link,
    supervisor: &Supervisor,
    events: &mut mpsc::Receiver<NodeEvent>,
) -> Result<(), LinkError> {
    let report = supervisor.report();
    while let Ok(event) = events.try_recv() {
        link.send(ToBeacon::Event(event)).await?;
    }
    link.send(ToBeacon::Heartbeat(report)).await
}

/// App log lines on their way to Beacon: batched, and at most [`LOG_LINES_PER_FLUSH`] per
/// flush, the rest counted as dropped.
struct LogForwarding {
    batch: Vec<LogLine>,
    dropped: u64,
    budget: usize,
}

impl LogForwarding {
    fn new() -> Self {
        Self {
            batch: Vec::new(),
            dropped: 0,
            budget: LOG_LINES_PER_FLUSH,
        }
    }

    /// Takes one line; a full batch to send at once, if it made one.
    fn push(&mut self, line: LogLine) -> Option<LogBatch> {
        if self.budget == 0 {
            self.dropped += 1;
            return None;
        }
        self.budget -= 1;
        self.batch.push(line);
        (self.batch.len() >= px_proto::link::MAX_LOG_BATCH).then(|| self.take())
    }

    /// Starts a new flush period; what is waiting, if anything.
    fn flush(&mut self) -> Option<LogBatch> {
        self.budget = LOG_LINES_PER_FLUSH;
        (!self.batch.is_empty() || self.dropped > 0).then(|| self.take())
    }

    fn take(&mut self) -> LogBatch {
        LogBatch {
            lines: std::mem::take(&mut self.batch),
            dropped: std::mem::take(&mut self.dropped),
        }
    }
}

impl px_link::Client for Client {
    const MEANWHILE: &'static str = "; apps keep serving";

    fn introduce(&mut self, hello: &mut Hello) {
        hello.labels = self.labels.clone();
        hello.runtimes = self.runtimes.clone();
        hello.state = Some(self.supervisor.report());
    }

    async fn session(&mut self, link: &mut Link) -> Result<(), LinkError> {
        // A run is bound to the link it started on: Beacon ends it when the link drops, so
        // this side hangs it up too.
        let result = self.linked(link).await;
        self.runs.link_lost();
        result
    }
}

impl Client {
    async fn linked(&mut self, link: &mut Link) -> Result<(), LinkError> {
        let mut heartbeat = px_link::heartbeats();
        self.changes.borrow_and_update();
        let mut lines = self.app_logs.follow();
        let mut logs = LogForwarding::new();
        let mut flush = tokio::time::interval(LOG_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => send_report(link, &self.supervisor, &mut self.events).await?,
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    tokio::time::sleep(MIN_REPORT_GAP).await;
                    self.changes.borrow_and_update();
                    send_report(link, &self.supervisor, &mut self.events).await?;
                }
                line = lines.recv() => {
                    let full = match line {
                        Ok(line) => logs.push(line),
                        Err(RecvError::Lagged(n)) => {
                            logs.dropped += n;
                            None
                        }
                        Err(RecvError::Closed) => None,
                    };
                    if let Some(batch) = full {
                        link.send(ToBeacon::Logs(batch)).await?;
                    }
                }
                _ = flush.tick() => {
                    if let Some(batch) = logs.flush() {
                        link.send(ToBeacon::Logs(batch)).await?;
                    }
                }
                event = self.events.recv() => match event {
                    Some(event) => link.send(ToBeacon::Event(event)).await?,
                    None => return Ok(()),
                },
                Some(frame) = self.run_frames.recv() => link.send(ToBeacon::Run(frame)).await?,
                frame = link.recv() => match frame? {
                    FromBeacon::Assign(assignment) => apply(&self.supervisor, &self.builds, &self.state_dir, &assignment),
                    FromBeacon::Restart { app } => {
                        tracing::info!(%app, "restart requested by beacon");
                        self.supervisor.restart(&app);
                    }
                    FromBeacon::Stop { app } => {
                        tracing::info!(%app, "stop requested by beacon");
                        self.supervisor.stop_app(&app);
                    }
                    FromBeacon::Heartbeat => {}
                    FromBeacon::Run(frame) => self.runs.handle(frame),
                    FromBeacon::AcmeChallenges(set) => {
                        if set.http01.len() > MAX_ACME_CHALLENGES || set.tls_alpn01.len() > MAX_ACME_CHALLENGES {
                            tracing::warn!("beacon sent more than {MAX_ACME_CHALLENGES} ACME challenges of a kind; ignored");
                        } else {
                            tracing::debug!(http01 = set.http01.len(), tls_alpn01 = set.tls_alpn01.len(), "acme challenges from beacon");
                            self.acme.set_challenges(&set);
                        }
                    }
                    FromBeacon::AcmeCertificates(versions) => {
                        if versions.certs.len() > MAX_ANNOUNCED_CERTS {
                            tracing::warn!("beacon named more than {MAX_ANNOUNCED_CERTS} certificates; ignored");
                        } else {
                            self.acme_certs.send_replace(Arc::new(versions));
                        }
                    }
                    other => tracing::debug!(?other, "unexpected frame from beacon"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use px_proto::link::{LogStream, MAX_LOG_BATCH};

    use super::*;

    fn line(n: usize) -> LogLine {
        LogLine {
            app: "hello".into(),
            release: 1,
            instance: 0,
            stream: LogStream::Stdout,
            at: "2025-01-01T00:00:00.000Z".into(),
            line: format!("line {n}"),
            build: None,
            process: None,
        }
    }

    #[test]
    fn log_lines_go_in_full_batches_up_to_the_budget_and_the_rest_are_counted() {
        let mut logs = LogForwarding::new();
        let mut sent = Vec::new();
        for n in 0..LOG_LINES_PER_FLUSH + 100 {
            sent.extend(logs.push(line(n)));
        }
        // 2000 lines make three full batches; the 464 after them wait for the flush.
        assert_eq!(sent.len(), LOG_LINES_PER_FLUSH / MAX_LOG_BATCH);
        assert!(
            sent.iter()
                .all(|b| b.lines.len() == MAX_LOG_BATCH && b.dropped == 0)
        );
        let flushed = logs.flush().unwrap();
        assert_eq!(flushed.lines.len(), LOG_LINES_PER_FLUSH % MAX_LOG_BATCH);
        assert_eq!(flushed.dropped, 100, "lines over the budget are counted");
        assert_eq!(flushed.lines.last().unwrap().line, "line 1999");

        // The flush gave a new budget, and a quiet period sends nothing.
        assert!(logs.flush().is_none());
        assert!(logs.push(line(0)).is_none());
        assert_eq!(logs.flush().unwrap().lines.len(), 1);
    }
}
