//! One instance of an app: started on a fresh port and checked healthy, handed to a waiter
//! task that reports its exit (or stops it on request, or when its heartbeats stop), its exit
//! classified, and its restarts spaced by capped exponential backoff. Also stopping and
//! draining a release's instances. The start, health check, waiter and drain are shared with
//! `crate::local`, which runs one app from a directory the same way.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use px_proto::link::{AppAssignment, ExitInfo, FailureKind, NodeEventKind};
use px_proto::manifest::HealthCheck;
use px_proto::size::ByteSize;
use rand::Rng;
use tokio::process::Child;

use super::error::DeployError;
use super::shared::Shared;
use super::store::PreparedRelease;
use crate::app_events::Registration;
use crate::limits::InstanceCgroup;
use crate::logs::LogTasks;
use crate::process::{self, Launch, StartFailure};
use crate::proxy;
use crate::routes::{Backend, ReleaseStats};

/// Restart backoff: doubling from the minimum to the cap, reset after a stable period.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Restarts in a row (without a stable period) that make a crash loop.
pub const CRASH_LOOP_RESTARTS: u32 = 5;
/// How long a failed instance's output may take to reach the logs after it stopped.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How long an instance whose handle is gone (Maestro stopping) gets to stop on SIGTERM.
const ORPHAN_STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a drain looks whether requests still hold the old instances.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// One running instance.
pub(super) struct Instance {
    pub(super) number: u32,
    pub(super) port: u16,
    pub(super) pid: u32,
    pub(super) backend: Arc<Backend>,
    pub(super) restarts: u32,
    pub(super) started: Instant,
    /// When it started, on the wall clock, as reports say it.
    pub(super) started_wall: SystemTime,
    pub(super) last_exit: Option<ExitInfo>,
    /// Resolves when the process ends: its exit status, and why Maestro ended it, if it did.
    exited: tokio::sync::oneshot::Receiver<Exit>,
    /// Asks the waiter to stop the process; `None` once it exited.
    pub(super) stop: Option<tokio::sync::oneshot::Sender<Duration>>,
}

impl Instance {
    /// Whether the process is still running (it has not been seen to exit).
    pub(super) fn is_live(&self) -> bool {
        self.stop.is_some()
    }
}

/// The RFC 3339 time of `at`, for reports.
pub(super) fn wall_time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// How an instance ended.
#[derive(Debug, Default)]
pub(crate) struct Exit {
    /// Its exit status, when it could be read.
    pub(crate) status: Option<std::process::ExitStatus>,
    /// Why Maestro stopped it on its own account (a missed heartbeat).
    pub(crate) reason: Option<String>,
    /// The kernel's OOM killer ended it.
    pub(crate) oom: bool,
    /// It was asked to stop and outlived its grace: SIGKILL ended it.
    pub(crate) killed: bool,
}

/// Starts instance `number` of `target` from `release` on a free port and waits until it is
/// healthy. On failure it is stopped, and its last output reaches the logs first, so that
/// the deploy-failed event can carry its stderr.
pub(super) async fn start(
    shared: &Shared,
    target: &AppAssignment,
    release: &PreparedRelease,
    number: u32,
    stats: &Arc<ReleaseStats>,
) -> Result<Instance, DeployError> {
    let app = target.app.as_str();
    let port = shared.take_port().ok_or(DeployError::NoFreePort)?;
    let registration = shared.app_events.register(app, target.release, number);
    let heartbeat = target.manifest.health.heartbeat_interval;
    let path = release.instance_path();
    let launch = Launch {
        app,
        release: target.release,
        dir: &release.dir,
        run: target.manifest.run.as_deref(),
        path: &path,
        env: &release.env,
        port: Some(port),
        extra_env: instance_env(number, &registration.url, heartbeat),
    };
    let spawned = shared
        .start_words(app, &release.dir, &target.manifest.limits)
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
            shared.give_back(port);
            return Err(DeployError::CannotStart(e));
        }
    };
    let pid = child.id().unwrap_or_default();
    shared.record_group(pid);
    let mut output = match (child.stdout.take(), child.stderr.take()) {
        (Some(stdout), Some(stderr)) => {
            Some(
                shared
                    .logs
                    .attach(app, target.release, number, stdout, stderr),
            )
        }
        _ => None,
    };
    // On failure its last output reaches the logs first, so the failed-deploy event can carry
    // its last stderr lines.
    if let Err(failure) = wait_healthy_or_stop(
        &mut child,
        &mut output,
        port,
        &target.manifest.health,
        &shared.http,
        shared.settings.stop_grace,
    )
    .await
    {
        shared.forget_group(pid);
        shared.give_back(port);
        let oom = cgroup.as_ref().is_some_and(InstanceCgroup::oom_killed);
        if let Some(cgroup) = cgroup {
            tokio::task::spawn_blocking(move || cgroup.remove());
        }
        return Err(if oom {
            DeployError::OutOfMemory(failure)
        } else {
            DeployError::NeverHealthy(failure)
        });
    }
    tracing::info!(%app, release = target.release, number, port, pid, "instance healthy");
    shared.event(
        NodeEventKind::InstanceStarted,
        app,
        target.release,
        format!(
            "{app} v{} instance {number} up on port {port}",
            target.release
        ),
        None,
    );
    Ok(hand_to_waiter(
        shared,
        child,
        registration,
        cgroup,
        target,
        number,
        port,
        pid,
        stats.clone(),
    ))
}

/// Hands the child to a waiter task that reports its exit or stops it on request.
#[allow(clippy::too_many_arguments)]
fn hand_to_waiter(
    shared: &Shared,
    child: tokio::process::Child,
    registration: Registration,
    cgroup: Option<InstanceCgroup>,
    target: &AppAssignment,
    number: u32,
    port: u16,
    pid: u32,
    stats: Arc<ReleaseStats>,
) -> Instance {
    let waiter = spawn_waiter(
        child,
        Watch {
            registration,
            heartbeat: Some(target.manifest.health.heartbeat_interval),
            cgroup,
            sandboxed: shared.sandboxed(),
            stop_grace: stop_grace_of(
                &target.manifest,
                px_proto::procfile::WEB_PROCESS,
                shared.settings.stop_grace,
            ),
            // A crash is reported at once; its event quotes what reached the tail by then.
            output: None,
        },
    );
    Instance {
        number,
        port,
        pid,
        backend: Backend::with_stats(
            &target.app,
            target.release,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            stats,
        ),
        restarts: 0,
        started: Instant::now(),
        started_wall: SystemTime::now(),
        last_exit: None,
        exited: waiter.exited,
        stop: Some(waiter.stop),
    }
}

/// An exit, classified: how it reads in the crash event, its kind, and what the node report
/// shows as the instance's last exit. `memory` is the app's `[limits] memory`, named when the
/// OOM killer ended it.
pub(super) fn classify_exit(
    Exit {
        status,
        reason,
        oom,
        killed: _,
    }: &Exit,
    memory: Option<ByteSize>,
) -> (String, FailureKind, ExitInfo) {
    let how = if *oom {
        let limit = memory.map_or_else(|| "?".to_string(), |m| m.to_string());
        format!("out of memory: the kernel's OOM killer ended it at its [limits] memory of {limit}")
    } else {
        status
            .as_ref()
            .map(process::describe_exit)
            .unwrap_or_else(|| "unknown exit".into())
    };
    let kind = if *oom {
        FailureKind::OutOfMemory
    } else if reason.is_some() {
        FailureKind::MissedHeartbeats
    } else {
        status
            .as_ref()
            .map_or(FailureKind::Signal, process::exit_kind)
    };
    let info = ExitInfo {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        oom: *oom,
        kind: Some(kind),
        at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    (how, kind, info)
}

/// An app's streak of exits, which spaces its restarts: capped exponential backoff, reset
/// after a stable period; a streak of `CRASH_LOOP_RESTARTS` is a crash loop, reported once.
#[derive(Debug, Default)]
pub(super) struct CrashStreak {
    exits: u32,
    loop_reported: bool,
}

impl CrashStreak {
    /// A release switch: its instances start with a clean slate.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }

    /// Counts one more exit (or failed restart); `stable` when the instance had run for
    /// `STABLE_AFTER`, which ends the previous streak. Returns the delay before the next
    /// start, and the streak's length when it just became a crash loop.
    pub(super) fn count(&mut self, stable: bool) -> (Duration, Option<u32>) {
        if stable {
            self.reset();
        }
        self.exits += 1;
        let crash_loop = (self.exits >= CRASH_LOOP_RESTARTS && !self.loop_reported).then(|| {
            self.loop_reported = true;
            self.exits
        });
        let exponent = self.exits.saturating_sub(1).min(16);
        let backoff = RESTART_BACKOFF_MIN
            .saturating_mul(1 << exponent)
            .min(RESTART_BACKOFF_MAX);
        let jittered = backoff.mul_f64(rand::rng().random_range(0.8..1.2));
        (jittered, crash_loop)
    }
}

/// Stops `instances` (SIGTERM, `grace`, SIGKILL) and waits until each has exited. Returns
/// how many outlived their grace and were killed.
pub(super) async fn stop_all(shared: &Shared, instances: Vec<Instance>, grace: Duration) -> u64 {
    let mut waits = Vec::new();
    for mut instance in instances {
        if let Some(stop) = instance.stop.take() {
            let _ = stop.send(grace);
            waits.push(instance);
        }
    }
    let mut killed = 0;
    for instance in waits {
        if instance.exited.await.is_ok_and(|exit| exit.killed) {
            killed += 1;
        }
        shared.forget_group(instance.pid);
        shared.give_back(instance.port);
    }
    killed
}

/// What draining and stopping a release's instances cost.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Drained {
    /// Long-lived connections closed with a reconnect hint, and cut at the deadline.
    pub(super) closed: u64,
    pub(super) cut: u64,
    /// Instances killed at the end of their stop grace.
    pub(super) killed: u64,
}

/// Drains `instances` of `app` over `budget` (the new release's `deploy.drain`), see [`drain`],
/// then stops them with `grace`.
pub(super) async fn drain_and_stop(
    shared: &Shared,
    app: &str,
    instances: Vec<Instance>,
    budget: Duration,
    grace: Duration,
) -> Drained {
    let backends: Vec<&Arc<Backend>> = instances.iter().map(|i| &i.backend).collect();
    let (closed, cut) = drain(app, &backends, budget).await;
    let killed = stop_all(shared, instances, grace).await;
    Drained {
        closed,
        cut,
        killed,
    }
}

/// The stop grace of `manifest`'s processes of type `kind` (`[processes.<kind>] stop_grace`,
/// `web` included), or the node's own.
pub(super) fn stop_grace_of(
    manifest: &px_proto::manifest::AppManifest,
    kind: &str,
    node: Duration,
) -> Duration {
    manifest
        .processes
        .get(kind)
        .and_then(|p| p.stop_grace)
        .unwrap_or(node)
}

/// Drains the `backends` of `app`'s replaced instances over `budget`: requests in flight
/// finish, long-lived connections close one by one with a reconnect hint (see
/// `proxy::drain`). Waits until no request holds them any more (in flight, or about to pick
/// them from a route looked up before the switch), up to the deadline; the caller then stops
/// the instances. Each backend must be held once by its caller, and otherwise only by routes
/// and requests. Returns how many long-lived connections closed with a hint, and how many
/// were cut.
pub(crate) async fn drain(app: &str, backends: &[&Arc<Backend>], budget: Duration) -> (u64, u64) {
    for backend in backends {
        backend.start_drain(budget);
    }
    let deadline = Instant::now() + budget + proxy::drain::DEADLINE_SLACK;
    while backends.iter().any(|b| Backend::held_elsewhere(b)) && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let left: usize = backends.iter().map(|b| b.in_flight()).sum();
    if left > 0 {
        tracing::warn!(%app, left, "drain deadline passed; stopping with requests in flight");
    }
    let (closed, cut) = backends.iter().fold((0, 0), |(closed, cut), b| {
        let outcome = b.drain_outcome();
        (closed + outcome.closed, cut + outcome.cut)
    });
    if closed + cut > 0 {
        tracing::info!(%app, closed, cut, ?budget, "long-lived connections of the old release: closed with a reconnect hint, or cut at the deadline");
    }
    (closed, cut)
}

/// What the app task's loop waits for besides orders.
pub(super) enum CrashEvent {
    /// Instance `index` exited.
    Exited(usize, Exit),
    /// The restart of instance `index` is due.
    RestartDue(usize),
}

/// Resolves when one of the live `instances` exits, or when the restart `pending` (instance
/// index, when) is due.
pub(super) async fn wait_crash(
    instances: Option<&mut Vec<Instance>>,
    pending: Option<(usize, Instant)>,
) -> CrashEvent {
    let Some(instances) = instances else {
        return std::future::pending().await;
    };
    let exits = instances
        .iter_mut()
        .enumerate()
        .filter(|(_, i)| i.is_live())
        .map(|(index, instance)| (index, &mut instance.exited));
    wait_exit_or_due(exits, pending).await
}

/// Resolves when one of `exits` (index, the waiter's end) resolves, or when the restart
/// `pending` (index, when) is due: what the app task waits for of its web instances and of its
/// other processes alike.
pub(super) async fn wait_exit_or_due<'a>(
    exits: impl Iterator<Item = (usize, &'a mut tokio::sync::oneshot::Receiver<Exit>)>,
    pending: Option<(usize, Instant)>,
) -> CrashEvent {
    let exits: Vec<_> = exits
        .map(|(index, exited)| {
            Box::pin(async move {
                let exit = exited.await.unwrap_or_default();
                CrashEvent::Exited(index, exit)
            })
        })
        .collect();
    let restart = async move {
        match pending {
            Some((index, at)) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                CrashEvent::RestartDue(index)
            }
            None => std::future::pending().await,
        }
    };
    if exits.is_empty() {
        return restart.await;
    }
    tokio::select! {
        (event, _, _) = futures_util::future::select_all(exits) => event,
        event = restart => event,
    }
}

/// The variables Maestro gives every instance besides those of the AppRunner contract
/// (`PORT`, `PX_APP`, `PX_RELEASE`): its number, its `PX_EVENTS_URL`, and the heartbeat
/// interval its events endpoint expects.
pub(crate) fn instance_env(
    number: u32,
    events_url: &str,
    heartbeat: Duration,
) -> Vec<(String, String)> {
    vec![
        ("PX_INSTANCE".into(), number.to_string()),
        ("PX_EVENTS_URL".into(), events_url.to_string()),
        ("PX_HEARTBEAT_INTERVAL".into(), format_seconds(heartbeat)),
    ]
}

/// Waits until a just-started instance passes its health check. If it does not, it is stopped
/// (SIGTERM, `grace`, SIGKILL) and its `output` readers get up to [`OUTPUT_DRAIN`] to reach
/// the end of its output, so whatever reports the failure can quote its last stderr lines.
pub(crate) async fn wait_healthy_or_stop(
    child: &mut Child,
    output: &mut Option<LogTasks>,
    port: u16,
    health: &HealthCheck,
    http: &reqwest::Client,
    grace: Duration,
) -> Result<(), StartFailure> {
    let failure = match process::wait_healthy(child, port, health, http).await {
        Ok(()) => return Ok(()),
        Err(failure) => failure,
    };
    process::stop(child, grace).await;
    if let Some(output) = output.take() {
        let _ = tokio::time::timeout(OUTPUT_DRAIN, output.wait()).await;
    }
    Err(failure)
}

/// What the waiter task of a healthy instance watches besides the process itself.
pub(crate) struct Watch {
    /// The instance's `PX_EVENTS_URL` registration: its secret stays valid exactly as long as
    /// the process runs.
    pub(crate) registration: Registration,
    /// The heartbeat interval to enforce once the instance sent a first heartbeat (missing
    /// `MISSED_HEARTBEATS` in a row stops it); `None` accepts heartbeats without enforcing them.
    pub(crate) heartbeat: Option<Duration>,
    /// Its cgroup, removed once the process is gone (and asked whether the OOM killer ended it).
    pub(crate) cgroup: Option<InstanceCgroup>,
    /// The grace of a stop the waiter decides on its own (missed heartbeats).
    pub(crate) stop_grace: Duration,
    /// Output readers the exit waits for (up to [`OUTPUT_DRAIN`]) before it is reported, so
    /// the report can quote the last stderr lines; `None` reports at once.
    pub(crate) output: Option<LogTasks>,
    /// It runs in bubblewrap, which reports a command killed by signal N as exit code
    /// 128 + N: read back as that signal.
    pub(crate) sandboxed: bool,
}

/// The other end of a waiter task.
pub(crate) struct Waiter {
    /// Resolves when the process has ended: its exit status, and why Maestro ended it, if it
    /// did.
    pub(crate) exited: tokio::sync::oneshot::Receiver<Exit>,
    /// Asks the waiter to stop the process (SIGTERM, this grace, SIGKILL); dropping it stops
    /// the process as well, with a short grace.
    pub(crate) stop: tokio::sync::oneshot::Sender<Duration>,
}

/// Hands `child` to a task of its own that waits for its exit, stops it when asked (or when
/// its heartbeats stop, see [`Watch::heartbeat`]), and reports how it ended.
pub(crate) fn spawn_waiter(mut child: Child, watch: Watch) -> Waiter {
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Duration>();
    let Watch {
        registration,
        heartbeat,
        cgroup,
        stop_grace,
        output,
        sandboxed,
    } = watch;
    tokio::spawn(async move {
        // The secret stays valid exactly as long as the process runs.
        let registration = registration;
        let silence = async {
            match heartbeat {
                Some(interval) => (registration.heartbeat.lost(interval).await, interval),
                None => std::future::pending().await,
            }
        };
        let ((status, killed), reason) = tokio::select! {
            status = child.wait() => ((status.ok(), false), None),
            (silence, interval) = silence => {
                let reason = format!(
                    "sent no heartbeat for {}s (PX_HEARTBEAT_INTERVAL={})",
                    silence.as_secs(),
                    format_seconds(interval)
                );
                (process::stop_counted(&mut child, stop_grace).await, Some(reason))
            }
            grace = stop_rx => match grace {
                Ok(grace) => (process::stop_counted(&mut child, grace).await, None),
                // The instance handle is gone (Maestro stopping): stop it anyway.
                Err(_) => (process::stop_counted(&mut child, ORPHAN_STOP_GRACE).await, None),
            },
        };
        drop(registration);
        if let Some(output) = output {
            let _ = tokio::time::timeout(OUTPUT_DRAIN, output.wait()).await;
        }
        let oom = cgroup.as_ref().is_some_and(InstanceCgroup::oom_killed);
        if let Some(cgroup) = cgroup {
            // Its process group was ended; the cgroup empties a moment later.
            tokio::task::spawn_blocking(move || cgroup.remove());
        }
        let status = match sandboxed {
            true => status.map(process::signal_of_sandboxed),
            false => status,
        };
        let _ = exit_tx.send(Exit {
            status,
            reason,
            oom,
            killed,
        });
    });
    Waiter {
        exited: exit_rx,
        stop: stop_tx,
    }
}

/// Seconds as `PX_HEARTBEAT_INTERVAL` gives them, to the millisecond: `10`, or `1.5`. Written
/// from whole milliseconds rather than rounded from a float, which turned 1.9999 s into `2.`.
pub fn format_seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
            .trim_end_matches('0')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_intervals_are_given_as_seconds_an_app_can_parse() {
        for (interval, text) in [
            (Duration::from_secs(10), "10"),
            (Duration::from_millis(1500), "1.5"),
            (Duration::from_millis(1250), "1.25"),
            (Duration::from_millis(1001), "1.001"),
            (Duration::from_micros(1_999_900), "1.999"),
            (Duration::from_micros(2_000_400), "2"),
        ] {
            let formatted = format_seconds(interval);
            assert_eq!(formatted, text, "{interval:?}");
            assert!(
                formatted.parse::<f64>().is_ok_and(|s| s > 0.0),
                "{formatted}"
            );
        }
    }
}
