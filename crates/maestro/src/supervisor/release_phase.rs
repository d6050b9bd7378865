//! Release phases on this node (docs/src/design/processes.md, "The release phase"): the
//! `phases` of each assignment Beacon sends, each run at most once. A run claims the phase in
//! apprepo first (a 409 means another run holds or ended it: then it is never run here), then
//! prepares the release as the deploy does (`store`: bundle or layers, assembly), runs the
//! command as a one-off process of the release (its environment, no `PORT`, the app's
//! `[limits]`, its own process group, recorded like an instance's), streams its output to the
//! app's logs and so to Beacon (marked as process `release`), ends it at its timeout (SIGTERM
//! to the group, then SIGKILL after `PHASE_KILL_GRACE`), and reports the end and the output's
//! tail to apprepo, with retries.
//!
//! A phase claimed by an earlier run (this node before a restart, or a node that was lost) is
//! failed, not run again: a half-run migration needs a human.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use px_proto::api::{PhaseClaim, PhaseEnded, PhaseOutcome, PhaseState, Release};
use px_proto::link::{NodeEventKind, PhaseOrder};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use crate::delivery::{LogTail, authorized, message_of, with_retries};
use crate::process::{self, Launch};

/// The process type a release phase's output is marked with in the logs (`em logs`, and the
/// lines `em deploy` shows).
pub(crate) const PHASE_PROCESS: &str = px_proto::process::RELEASE_PHASE;
/// How long a phase has after SIGTERM at its timeout before its group is killed: enough for a
/// migration tool to roll back its transaction and exit.
pub(crate) const PHASE_KILL_GRACE: Duration = Duration::from_secs(10);
/// Phases remembered as taken by this run of Maestro, so a phase that leaves the assignment
/// and comes back is not run twice. A node runs at most a few phases a minute; a thousand is
/// hours of deploys, and the oldest are long ended.
pub(crate) const MAX_REMEMBERED_PHASES: usize = 1024;
/// Lines of output sent with a `phase_failed` event: the migration's error, which is what
/// `em deploy` shows (the whole tail stays with the release in apprepo).
pub(crate) const FAILED_PHASE_LINES: usize = 20;
/// How long the output readers get to drain the pipes after the phase's process ended (a
/// child it left may hold them open; its group is killed, so this is only a bound).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// The phases this run of Maestro took, oldest first.
#[derive(Default)]
pub(super) struct Taken {
    order: VecDeque<(String, u64)>,
    keys: BTreeSet<(String, u64)>,
}

impl Taken {
    /// Takes `key`; false when it was taken before.
    fn take(&mut self, key: (String, u64)) -> bool {
        if !self.keys.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > MAX_REMEMBERED_PHASES
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
        true
    }
}

/// Where an order came from, which decides what a claim held by another node means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Beacon's assignment now: a claim held by any other run was abandoned (Beacon moved the
    /// phase here because its node was lost), and this run fails it.
    Beacon,
    /// The assignment persisted before a restart: Beacon may have moved the phase since, so
    /// only this node's own earlier claim is failed; another node's is left to it.
    Persisted,
}

/// Starts a run of every phase of `orders` this Maestro has not taken yet.
pub(super) fn apply(
    shared: &Arc<Shared>,
    orders: &[PhaseOrder],
    source: Source,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut taken = shared.phases.lock().unwrap_or_else(|p| p.into_inner());
    for order in orders {
        let key = (order.release.app.clone(), order.release.release);
        if taken.take(key) {
            tracker.spawn(run(shared.clone(), order.clone(), source, shutdown.clone()));
        }
    }
}

/// How a run ended.
enum Outcome {
    Succeeded,
    Failed {
        reason: String,
    },
    /// Maestro stops: the claim stays, and the next run fails it as interrupted.
    Stopped,
}

/// Runs one phase from its claim to its reported end.
async fn run(shared: Arc<Shared>, order: PhaseOrder, source: Source, shutdown: CancellationToken) {
    let app = order.release.app.clone();
    let version = order.release.release;
    let node = shared.settings.node_name.clone();
    let Some(repository) = repository_of(&order) else {
        tracing::error!(%app, version, url = %order.release.bundle_url, "the release phase's bundle URL is not a repository's; not running it");
        return;
    };
    // One attempt per run: a retried claim whose answer was lost wins again, a later run not.
    let attempt = px_runtime::tokens::generate();
    let claimed = claim(&shared, repository, &order, &node, &attempt).await;
    let mut log = LogTail::default();
    let outcome = match claimed {
        Claimed::Won => {
            shared.event(
                NodeEventKind::PhaseStarted,
                &app,
                version,
                format!(
                    "{app} v{version}'s release phase runs on {node}: {}",
                    order.command
                ),
                None,
            );
            tokio::select! {
                outcome = execute(&shared, &order, &mut log) => outcome,
                () = shutdown.cancelled() => Outcome::Stopped,
            }
        }
        Claimed::Abandoned { holder_node, .. }
            if source == Source::Persisted && holder_node != node =>
        {
            tracing::info!(%app, version, holder = %holder_node, "the release phase is claimed by another node since this one restarted; leaving it to that node");
            return;
        }
        Claimed::Abandoned { holder, .. } => Outcome::Failed {
            reason: format!(
                "its run on {holder} was interrupted (the node was lost or restarted); a release phase never runs twice, so check what it did (a migration may be half applied), then deploy again"
            ),
        },
        Claimed::Ended => return,
        Claimed::Unreachable(reason) => {
            tracing::warn!(%app, version, %reason, "cannot claim the release phase; it waits for the next assignment");
            // Taken no more: Beacon's next assignment tries again.
            let mut taken = shared.phases.lock().unwrap_or_else(|p| p.into_inner());
            taken.keys.remove(&(app.clone(), version));
            return;
        }
    };
    let ended = match outcome {
        Outcome::Stopped => return,
        Outcome::Succeeded => PhaseOutcome::Succeeded,
        Outcome::Failed { reason } => PhaseOutcome::Failed { reason },
    };
    let report = PhaseEnded {
        attempt,
        outcome: ended.clone(),
        log: log.text(),
    };
    match ended {
        PhaseOutcome::Succeeded => shared.event(
            NodeEventKind::PhaseSucceeded,
            &app,
            version,
            format!("{app} v{version}'s release phase succeeded on {node}"),
            None,
        ),
        PhaseOutcome::Failed { reason } => {
            let detail = log.last(FAILED_PHASE_LINES);
            shared.event(
                NodeEventKind::PhaseFailed,
                &app,
                version,
                format!("{app} v{version}'s release phase failed on {node}: {reason}"),
                (!detail.is_empty()).then_some(detail),
            );
        }
    }
    if let Err(e) = end(&shared, repository, &order, &report).await {
        tracing::error!(%app, version, error = %e, "could not report the end of the release phase to the repository");
    }
}

/// What a claim found.
enum Claimed {
    /// This run holds the phase: it runs it.
    Won,
    /// An earlier run holds it and never ended it: this run fails it.
    Abandoned { holder: String, holder_node: String },
    /// The phase ended already, or was superseded: nothing to do.
    Ended,
    /// The repository could not be asked.
    Unreachable(String),
}

async fn claim(
    shared: &Shared,
    repository: &str,
    order: &PhaseOrder,
    node: &str,
    attempt: &str,
) -> Claimed {
    let (app, version) = (&order.release.app, order.release.release);
    let url = format!("{repository}/v1/apps/{app}/releases/{version}/phase/claim");
    let body = PhaseClaim {
        node: node.to_string(),
        attempt: attempt.to_string(),
    };
    let token = shared.settings.repository_token.as_deref();
    let answer = with_retries("claiming the release phase", || {
        authorized(token, shared.http.post(&url).json(&body))
    })
    .await;
    match answer {
        Ok((status, _)) if status.is_success() => Claimed::Won,
        Ok((status, _)) if status == reqwest::StatusCode::CONFLICT => {
            // Who holds it, from the release itself.
            let url = format!("{repository}/v1/apps/{app}/releases/{version}");
            let read = with_retries("reading the release", || {
                authorized(token, shared.http.get(&url))
            })
            .await;
            let release = read.ok().and_then(|(status, body)| {
                status
                    .is_success()
                    .then(|| serde_json::from_slice::<Release>(&body).ok())
                    .flatten()
            });
            match release.and_then(|r| r.phase).map(|p| p.state) {
                Some(PhaseState::Running { node, claimed_at }) => Claimed::Abandoned {
                    holder: format!("{node} (claimed at {claimed_at})"),
                    holder_node: node,
                },
                Some(_) => Claimed::Ended,
                None => Claimed::Unreachable("the release's phase could not be read".into()),
            }
        }
        Ok((status, body)) => Claimed::Unreachable(format!("{status}: {}", message_of(&body))),
        Err(reason) => Claimed::Unreachable(reason),
    }
}

async fn end(
    shared: &Shared,
    repository: &str,
    order: &PhaseOrder,
    report: &PhaseEnded,
) -> Result<(), String> {
    let (app, version) = (&order.release.app, order.release.release);
    let url = format!("{repository}/v1/apps/{app}/releases/{version}/phase/end");
    let token = shared.settings.repository_token.as_deref();
    let (status, body) = with_retries("reporting the release phase's end", || {
        authorized(token, shared.http.post(&url).json(report))
    })
    .await?;
    if status.is_success() || status == reqwest::StatusCode::CONFLICT {
        Ok(())
    } else {
        Err(format!("{status}: {}", message_of(&body)))
    }
}

/// Prepares the release and runs the command to its end or its timeout.
async fn execute(shared: &Shared, order: &PhaseOrder, log: &mut LogTail) -> Outcome {
    let target = &order.release;
    let (app, version) = (target.app.as_str(), target.release);
    let prepared = match shared.store.prepare(target).await {
        Ok(prepared) => prepared,
        Err(e) => {
            return Outcome::Failed {
                reason: format!("preparing the release failed: {e}"),
            };
        }
    };
    let path = prepared.instance_path();
    let launch = Launch {
        app,
        release: version,
        dir: &prepared.dir,
        run: Some(&order.command),
        path: &path,
        env: &prepared.env,
        port: None,
        extra_env: vec![("PX_PROCESS".into(), PHASE_PROCESS.into())],
    };
    let limits = &target.manifest.limits;
    // Subscribed before the process starts, so no line is missed.
    let mut follow = shared.logs.follow();
    let spawned = shared
        .start_words(app, &prepared.dir, limits)
        .and_then(|start| match process::spawn(&launch, &start.words) {
            Ok(child) => Ok((child, start.cgroup)),
            Err(e) => {
                if let Some(cgroup) = start.cgroup {
                    cgroup.remove();
                }
                Err(e)
            }
        });
    let (mut child, cgroup) = match spawned {
        Ok(started) => started,
        Err(e) => {
            return Outcome::Failed {
                reason: format!("cannot start `{}`: {e}", order.command),
            };
        }
    };
    let pid = child.id().unwrap_or_default();
    shared.record_group(pid);
    let readers = match (child.stdout.take(), child.stderr.take()) {
        (Some(stdout), Some(stderr)) => {
            Some(
                shared
                    .logs
                    .attach_process(app, version, PHASE_PROCESS, 0, stdout, stderr),
            )
        }
        _ => None,
    };
    let timeout = Duration::from_secs(order.timeout_secs);
    let collect = async {
        let mut missed = 0u64;
        loop {
            match follow.recv().await {
                Ok(line) => {
                    if line.app == app
                        && line.release == version
                        && line.process.as_deref() == Some(PHASE_PROCESS)
                    {
                        log.push(&line.line);
                    }
                }
                Err(RecvError::Lagged(n)) => missed += n,
                Err(RecvError::Closed) => return missed,
            }
        }
    };
    let waited = async {
        let exit = tokio::time::timeout(timeout, child.wait()).await;
        let result = match exit {
            Ok(Ok(status)) => {
                // The leader is gone; nothing else of its group may stay behind.
                process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                Ok(match shared.sandboxed() {
                    true => process::signal_of_sandboxed(status),
                    false => status,
                })
            }
            Ok(Err(e)) => Err(format!("waiting for it failed: {e}")),
            Err(_) => {
                let (status, killed) = process::stop_counted(&mut child, PHASE_KILL_GRACE).await;
                Err(format!(
                    "it ran past its timeout of {} and was stopped ({}{})",
                    humantime::format_duration(timeout),
                    status
                        .as_ref()
                        .map_or("unknown exit".into(), process::describe_exit),
                    if killed { ", killed after SIGTERM" } else { "" },
                ))
            }
        };
        if let Some(readers) = readers {
            let _ = tokio::time::timeout(OUTPUT_DRAIN, readers.wait()).await;
        }
        result
    };
    // The collector ends when the output is drained: its lines reached the broadcast first.
    let (result, missed) = tokio::select! {
        result = waited => (result, None),
        missed = collect => (Err("the log stream closed".to_string()), Some(missed)),
    };
    // Lines still queued in the receiver belong to this phase's last moments.
    while let Ok(line) = follow.try_recv() {
        if line.app == app
            && line.release == version
            && line.process.as_deref() == Some(PHASE_PROCESS)
        {
            log.push(&line.line);
        }
    }
    if let Some(missed) = missed.filter(|m| *m > 0) {
        log.push(&format!("[{missed} lines of output not kept]"));
    }
    shared.forget_group(pid);
    if let Some(cgroup) = cgroup {
        let oom = cgroup.oom_killed();
        cgroup.remove();
        if oom {
            return Outcome::Failed {
                reason: "it ran out of memory (the kernel's OOM killer ended it at the app's [limits] memory)".into(),
            };
        }
    }
    match result {
        Ok(status) if status.success() => Outcome::Succeeded,
        Ok(status) => Outcome::Failed {
            reason: format!(
                "`{}` failed ({})",
                order.command,
                process::describe_exit(&status)
            ),
        },
        Err(reason) => Outcome::Failed { reason },
    }
}

/// The repository the order came from: its bundle URL without `/v1/bundles/<sha256>`.
fn repository_of(order: &PhaseOrder) -> Option<&str> {
    order
        .release
        .bundle_url
        .strip_suffix(&format!("/v1/bundles/{}", order.release.bundle_sha256))
        .filter(|base| base.starts_with("http://") || base.starts_with("https://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_taken_once_and_old_ones_are_forgotten() {
        let mut taken = Taken::default();
        let key = |n: u64| ("shop".to_string(), n);
        assert!(taken.take(key(1)));
        assert!(
            !taken.take(key(1)),
            "a phase that comes back is not run again"
        );
        for n in 2..=MAX_REMEMBERED_PHASES as u64 + 1 {
            assert!(taken.take(key(n)));
        }
        assert_eq!(taken.keys.len(), MAX_REMEMBERED_PHASES);
    }
}
