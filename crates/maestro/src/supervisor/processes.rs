//! The processes of an app's non-web types (`worker`, `clock`; docs/src/design/processes.md)
//! that Beacon placed on this node: started like an instance (the AppRunner contract with the
//! type's command, the release's sandbox and limits, the type's own limits over the app's), but
//! with no port unless the type asks for one, no route and no health check: a process runs once
//! it has stayed up for [`SETTLE`]. Restarted with the same capped backoff as the web
//! instances, its exits classified the same way. A new release replaces each type in its
//! `replace` order, and the old processes are stopped with their `stop_grace` by a task of
//! their own, so a worker finishing a long job never holds up the app's supervision.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use px_proto::link::{AppAssignment, ExitInfo, InstanceState, InstanceStatus, NodeEventKind};
use px_proto::process::{MAX_PROCESSES_PER_TYPE, ReplaceOrder};
use tokio::sync::oneshot;

use super::app_task::FAILED_STDERR_LINES;
use super::instance::{self, CrashStreak, Exit, Watch, instance_env, spawn_waiter, stop_grace_of};
use super::shared::Shared;
use super::store::PreparedRelease;
use crate::process::{self, Launch};

/// How long a process must stay up after its start to count as running. It has no health
/// check, so this is what tells a worker that runs from one that dies at once of a missing
/// module or a bad setting (such failures end a process within a few hundred milliseconds);
/// a second also keeps short what a deploy waits before it stops the old processes of a
/// `start_first` type.
pub const SETTLE: Duration = Duration::from_secs(1);

/// One running process.
struct Live {
    pid: u32,
    port: Option<u16>,
    started: Instant,
    /// When it started, on the wall clock, as reports say it.
    started_wall: std::time::SystemTime,
    /// Resolves when the process has ended.
    exited: oneshot::Receiver<Exit>,
    /// Asks the waiter to stop it (SIGTERM, this grace, SIGKILL).
    stop: oneshot::Sender<Duration>,
}

/// One numbered process of a type on this node, across its restarts.
pub(super) struct Slot {
    kind: String,
    number: u32,
    /// The release it runs (or is to run).
    release: u64,
    /// Its type's `stop_grace` in that release, or the node's.
    grace: Duration,
    restarts: u32,
    last_exit: Option<ExitInfo>,
    streak: CrashStreak,
    live: Option<Live>,
    /// `stop_first`: the previous release's process of this type is still stopping; this one
    /// starts once it is gone.
    gate: Option<oneshot::Receiver<()>>,
    /// When its next start is due, after an exit (with backoff).
    due: Option<Instant>,
    /// Up for less than [`SETTLE`]: reported as starting until a timer says otherwise.
    settling: bool,
}

/// What the app task waits for of its processes.
pub(super) enum ProcessEvent {
    /// Process `index` exited.
    Exited(usize, Exit),
    /// Process `index` is to start: its restart backoff passed, or its predecessor is gone.
    StartDue(usize),
    /// Process `index` has been up for [`SETTLE`]: it runs.
    Settled(usize),
}

type EventFuture<'a> = Pin<Box<dyn Future<Output = ProcessEvent> + Send + 'a>>;

/// Resolves with the next event of `slots`; never, while there is nothing to wait for.
pub(super) async fn next_event(slots: Option<&mut Vec<Slot>>) -> ProcessEvent {
    let mut waits: Vec<EventFuture<'_>> = Vec::new();
    for (index, slot) in slots.into_iter().flatten().enumerate() {
        if let Some(live) = slot.live.as_mut() {
            if slot.settling {
                let at = live.started + SETTLE;
                waits.push(Box::pin(async move {
                    tokio::time::sleep_until(at.into()).await;
                    ProcessEvent::Settled(index)
                }));
            }
            waits.push(Box::pin(async move {
                ProcessEvent::Exited(index, (&mut live.exited).await.unwrap_or_default())
            }));
        } else if let Some(gate) = slot.gate.as_mut() {
            waits.push(Box::pin(async move {
                // Gone, or the task that stopped it ended: either way nothing is left to wait.
                let _ = gate.await;
                ProcessEvent::StartDue(index)
            }));
        } else if let Some(at) = slot.due {
            waits.push(Box::pin(async move {
                tokio::time::sleep_until(at.into()).await;
                ProcessEvent::StartDue(index)
            }));
        }
    }
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(waits).await.0
}

/// The processes `target` assigns this node, as (type, number), in order; types the release
/// does not run as processes (unknown, `web`, `release`) are left out, and so are numbers past
/// `MAX_PROCESSES_PER_TYPE`, whatever an assignment says.
fn assigned(target: &AppAssignment) -> Vec<(String, u32)> {
    let types = px_proto::process::process_types(&target.manifest);
    target
        .processes
        .iter()
        .filter(|(kind, _)| types.contains_key(kind.as_str()))
        .flat_map(|(kind, numbers)| {
            numbers
                .iter()
                .take(MAX_PROCESSES_PER_TYPE as usize)
                .map(move |n| (kind.clone(), *n))
        })
        .collect()
}

/// A gate that opens once every one of `gates` has.
fn all_of(mut gates: Vec<oneshot::Receiver<()>>) -> oneshot::Receiver<()> {
    if gates.len() == 1
        && let Some(gate) = gates.pop()
    {
        return gate;
    }
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        for gate in gates {
            let _ = gate.await;
        }
        let _ = tx.send(());
    });
    rx
}

fn new_slot(shared: &Shared, target: &AppAssignment, kind: &str, number: u32) -> Slot {
    Slot {
        kind: kind.to_string(),
        number,
        release: target.release,
        grace: stop_grace_of(&target.manifest, kind, shared.settings.stop_grace),
        restarts: 0,
        last_exit: None,
        streak: CrashStreak::default(),
        live: None,
        gate: None,
        due: None,
        settling: false,
    }
}

/// How a process is named in events: `shop v3 worker.1`.
fn name(app: &str, slot: &Slot) -> String {
    format!("{app} v{} {}.{}", slot.release, slot.kind, slot.number)
}

/// Starts `slot`'s process of `target` from `release`. On failure (no command, no free port,
/// nothing to run) it says why; the caller schedules another try.
fn start(
    shared: &Shared,
    target: &AppAssignment,
    release: &PreparedRelease,
    slot: &mut Slot,
) -> Result<(), String> {
    let app = target.app.as_str();
    let settings = target.manifest.processes.get(&slot.kind).ok_or_else(|| {
        format!(
            "release {} has no process type {}",
            target.release, slot.kind
        )
    })?;
    let command = settings
        .command
        .as_deref()
        .ok_or_else(|| format!("process type {} has no command", slot.kind))?;
    let port = match settings.port {
        true => Some(
            shared
                .take_port()
                .ok_or("no free port in the node's range")?,
        ),
        false => None,
    };
    let heartbeat = target.manifest.health.heartbeat_interval;
    let registration = shared.app_events.register(app, target.release, slot.number);
    let mut extra_env = instance_env(slot.number, &registration.url, heartbeat);
    extra_env.push(("PX_PROCESS".into(), slot.kind.clone()));
    let path = release.instance_path();
    let launch = Launch {
        app,
        release: target.release,
        dir: &release.dir,
        run: Some(command),
        path: &path,
        env: &release.env,
        port,
        extra_env,
    };
    let limits = settings.limits_over(&target.manifest.limits);
    let spawned = shared
        .start_words(app, &release.dir, &limits)
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
            if let Some(port) = port {
                shared.give_back(port);
            }
            return Err(format!("cannot start it: {e}"));
        }
    };
    let pid = child.id().unwrap_or_default();
    shared.record_group(pid);
    if let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) {
        // The readers run as long as the pipes are open; nothing waits for them.
        let _ = shared.logs.attach_process(
            app,
            target.release,
            &slot.kind,
            slot.number,
            stdout,
            stderr,
        );
    }
    slot.release = target.release;
    slot.grace = stop_grace_of(&target.manifest, &slot.kind, shared.settings.stop_grace);
    let waiter = spawn_waiter(
        child,
        Watch {
            registration,
            heartbeat: Some(heartbeat),
            cgroup,
            sandboxed: shared.sandboxed(),
            stop_grace: slot.grace,
            // An exit is reported at once; its event quotes what reached the tail by then.
            output: None,
        },
    );
    slot.live = Some(Live {
        pid,
        port,
        started: Instant::now(),
        started_wall: std::time::SystemTime::now(),
        exited: waiter.exited,
        stop: waiter.stop,
    });
    slot.settling = true;
    slot.due = None;
    slot.gate = None;
    tracing::info!(%app, release = target.release, process = %slot.kind, number = slot.number, pid, "process started");
    shared.event(
        NodeEventKind::InstanceStarted,
        app,
        target.release,
        format!("{} started (pid {pid})", name(app, slot)),
        None,
    );
    Ok(())
}

/// Starts `slot`, or schedules another try after a backoff when it cannot start.
fn start_or_retry(
    shared: &Shared,
    target: &AppAssignment,
    release: &PreparedRelease,
    slot: &mut Slot,
) {
    if let Err(reason) = start(shared, target, release, slot) {
        tracing::warn!(app = %target.app, process = %slot.kind, number = slot.number, %reason, "process did not start; trying again after a backoff");
        let detail = format!("{}: {reason}", name(&target.app, slot));
        schedule_restart(shared, &target.app, slot, false, detail);
    }
}

/// Counts one more exit (or failed start) of `slot` and sets when it starts again; a crash
/// loop is reported once.
fn schedule_restart(shared: &Shared, app: &str, slot: &mut Slot, stable: bool, detail: String) {
    let (backoff, crash_loop) = slot.streak.count(stable);
    if let Some(exits) = crash_loop {
        shared.event(
            NodeEventKind::CrashLoop,
            app,
            slot.release,
            format!(
                "{} keeps crashing ({exits} exits in a row); restarts are backing off",
                name(app, slot)
            ),
            (!detail.is_empty()).then_some(detail),
        );
    }
    slot.due = Some(Instant::now() + backoff);
}

/// Handles an event of `slots` (from [`next_event`]).
pub(super) fn on_event(
    shared: &Shared,
    target: &AppAssignment,
    release: &PreparedRelease,
    slots: &mut [Slot],
    event: ProcessEvent,
) {
    match event {
        ProcessEvent::Settled(index) => {
            if let Some(slot) = slots.get_mut(index) {
                slot.settling = false;
            }
        }
        ProcessEvent::StartDue(index) => {
            if let Some(slot) = slots.get_mut(index) {
                // A start after an exit is a restart; the first start after a `stop_first`
                // predecessor is not.
                if slot.due.take().is_some() {
                    slot.restarts += 1;
                }
                slot.gate = None;
                start_or_retry(shared, target, release, slot);
            }
        }
        ProcessEvent::Exited(index, exit) => {
            if let Some(slot) = slots.get_mut(index) {
                on_exit(shared, target, slot, exit);
            }
        }
    }
}

/// A process exited on its own: report it, schedule its restart.
fn on_exit(shared: &Shared, target: &AppAssignment, slot: &mut Slot, exit: Exit) {
    let Some(live) = slot.live.take() else {
        return;
    };
    slot.settling = false;
    shared.forget_group(live.pid);
    if let Some(port) = live.port {
        shared.give_back(port);
    }
    let app = target.app.as_str();
    let memory = target
        .manifest
        .processes
        .get(&slot.kind)
        .map_or(target.manifest.limits.memory, |s| {
            s.limits_over(&target.manifest.limits).memory
        });
    let (how, kind, last_exit) = instance::classify_exit(&exit, memory);
    slot.last_exit = Some(last_exit);
    let stable = live.started.elapsed() >= instance::STABLE_AFTER;
    let detail = shared
        .logs
        .stderr_tail(app, slot.release, FAILED_STDERR_LINES);
    match &exit.reason {
        Some(reason) => shared.failure_event(
            NodeEventKind::InstanceUnhealthy,
            app,
            slot.release,
            format!("{} {reason}; restarted it", name(app, slot)),
            None,
            kind,
        ),
        None => shared.failure_event(
            NodeEventKind::InstanceCrashed,
            app,
            slot.release,
            format!("{} exited ({how})", name(app, slot)),
            (!detail.is_empty()).then_some(detail.clone()),
            kind,
        ),
    }
    schedule_restart(shared, app, slot, stable, detail);
}

/// The node report's rows for `slots`.
pub(super) fn statuses<'a>(
    app: &'a str,
    slots: &'a [Slot],
) -> impl Iterator<Item = InstanceStatus> + 'a {
    slots.iter().map(move |slot| {
        let state = match &slot.live {
            Some(_) if slot.settling => InstanceState::Starting,
            Some(_) => InstanceState::Healthy,
            None if slot.gate.is_some() => InstanceState::Starting,
            None => InstanceState::Crashed,
        };
        InstanceStatus {
            app: app.to_string(),
            release: slot.release,
            state,
            pid: slot.live.as_ref().map(|l| l.pid),
            port: slot.live.as_ref().and_then(|l| l.port),
            restarts: slot.restarts,
            last_exit: slot.last_exit.clone(),
            process: slot.kind.clone(),
            number: slot.number,
            started_at: slot
                .live
                .as_ref()
                .map(|l| instance::wall_time(l.started_wall)),
            memory_bytes: None,
            cpu_permille: None,
        }
    })
}

/// A process asked to stop.
struct Stopping {
    kind: String,
    pid: u32,
    port: Option<u16>,
    exited: oneshot::Receiver<Exit>,
}

/// Processes being stopped, with what to do once each is gone.
struct Retiring {
    lives: Vec<Stopping>,
    /// `stop_first` types whose new process waits: told once every old one of the type is gone.
    gates: Vec<(String, oneshot::Sender<()>)>,
}

/// Sends every live process of `slots` its stop (SIGTERM now, SIGKILL after its grace) and
/// keeps it for [`retire`].
fn stop_slots(slots: Vec<Slot>, into: &mut Vec<Stopping>) {
    for slot in slots {
        if let Some(live) = slot.live {
            // An error means it already exited: its waiter still reports how.
            let _ = live.stop.send(slot.grace);
            into.push(Stopping {
                kind: slot.kind,
                pid: live.pid,
                port: live.port,
                exited: live.exited,
            });
        }
    }
}

/// Waits until every retiring process is gone, opening each `stop_first` gate once its type
/// has none left; returns how many were killed at the end of their grace, and their names.
async fn retire(shared: Arc<Shared>, retiring: Retiring) -> (u64, Vec<String>) {
    let Retiring { lives, mut gates } = retiring;
    let mut remaining: std::collections::BTreeMap<String, usize> = Default::default();
    for stopping in &lives {
        *remaining.entry(stopping.kind.clone()).or_default() += 1;
    }
    // Types with nothing to wait for start at once.
    gates.retain(|(kind, _)| remaining.contains_key(kind));
    let mut killed = 0;
    let mut names = Vec::new();
    let mut ends: Vec<_> = lives
        .into_iter()
        .map(|stopping| {
            Box::pin(async move {
                let exit = stopping.exited.await.unwrap_or_default();
                (stopping.kind, stopping.pid, stopping.port, exit)
            })
        })
        .collect();
    while !ends.is_empty() {
        let ((kind, pid, port, exit), _, rest) = futures_util::future::select_all(ends).await;
        ends = rest;
        shared.forget_group(pid);
        if let Some(port) = port {
            shared.give_back(port);
        }
        killed += u64::from(exit.killed);
        names.push(kind.clone());
        let left = remaining.entry(kind.clone()).or_default();
        *left = left.saturating_sub(1);
        if *left == 0 {
            let (open, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut gates)
                .into_iter()
                .partition(|(k, _)| *k == kind);
            gates = waiting;
            for (_, gate) in open {
                let _ = gate.send(());
            }
        }
    }
    (killed, names)
}

/// Replaces the processes of the previous release (`old`) by those `target` assigns this node,
/// type by type in its `replace` order: `start_first` starts the new ones, lets them settle,
/// then stops the old; `stop_first` stops the old and starts the new once they are gone.
/// Processes of types or numbers no longer assigned here are stopped. Returns the new slots
/// and the task that waits for the old ones to end (killed at their grace, and which types).
pub(super) async fn replace(
    shared: &Arc<Shared>,
    target: &AppAssignment,
    release: &PreparedRelease,
    old: Vec<Slot>,
) -> (Vec<Slot>, tokio::task::JoinHandle<(u64, Vec<String>)>) {
    let mut old_by_kind: std::collections::BTreeMap<String, Vec<Slot>> = Default::default();
    for slot in old {
        old_by_kind.entry(slot.kind.clone()).or_default().push(slot);
    }
    let mut retiring = Retiring {
        lives: Vec::new(),
        gates: Vec::new(),
    };
    let mut slots = Vec::new();
    let mut started_first = false;
    let mut replaced_after = Vec::new();
    for (kind, number) in assigned(target) {
        let order = target
            .manifest
            .processes
            .get(&kind)
            .map(|s| s.replace)
            .unwrap_or_default();
        let mut slot = new_slot(shared, target, &kind, number);
        match order {
            ReplaceOrder::StopFirst => {
                // A process of the type may still be stopping from a deploy before this one:
                // its successor's gate is inherited, so that one is waited for too.
                let mut gates: Vec<oneshot::Receiver<()>> = Vec::new();
                if let Some(previous) = old_by_kind.remove(&kind) {
                    let (gated, others): (Vec<Slot>, Vec<Slot>) =
                        previous.into_iter().partition(|s| s.gate.is_some());
                    gates.extend(gated.into_iter().filter_map(|s| s.gate));
                    stop_slots(others, &mut retiring.lives);
                }
                if retiring.lives.iter().any(|s| s.kind == kind) {
                    let (tx, rx) = oneshot::channel();
                    retiring.gates.push((kind.clone(), tx));
                    gates.push(rx);
                }
                if gates.is_empty() {
                    start_or_retry(shared, target, release, &mut slot);
                } else {
                    slot.gate = Some(all_of(gates));
                }
            }
            ReplaceOrder::StartFirst => {
                start_or_retry(shared, target, release, &mut slot);
                started_first = true;
                if let Some(previous) = old_by_kind.remove(&kind) {
                    replaced_after.extend(previous);
                }
            }
        }
        slots.push(slot);
    }
    // The old processes of `start_first` types stop once the new ones had time to settle, so
    // the work never stops while the new code comes up.
    if started_first && replaced_after.iter().any(|s| s.live.is_some()) {
        tokio::time::sleep(SETTLE).await;
    }
    stop_slots(replaced_after, &mut retiring.lives);
    // Types or numbers no longer assigned here.
    for (_, previous) in old_by_kind {
        stop_slots(previous, &mut retiring.lives);
    }
    let shared = shared.clone();
    let task = tokio::spawn(retire(shared, retiring));
    (slots, task)
}

/// Brings `slots` in line with `target` when only where processes run changed (the same
/// release): processes no longer assigned here are stopped, newly assigned ones started, the
/// others left running.
pub(super) fn reconcile(
    shared: &Arc<Shared>,
    target: &AppAssignment,
    release: &PreparedRelease,
    slots: Vec<Slot>,
) -> Vec<Slot> {
    let wanted = assigned(target);
    let (kept, gone): (Vec<Slot>, Vec<Slot>) = slots
        .into_iter()
        .partition(|s| wanted.iter().any(|(k, n)| *k == s.kind && *n == s.number));
    let mut retiring = Retiring {
        lives: Vec::new(),
        gates: Vec::new(),
    };
    stop_slots(gone, &mut retiring.lives);
    if !retiring.lives.is_empty() {
        tokio::spawn(retire(shared.clone(), retiring));
    }
    let mut slots = kept;
    for (kind, number) in wanted {
        if !slots.iter().any(|s| s.kind == kind && s.number == number) {
            let mut slot = new_slot(shared, target, &kind, number);
            start_or_retry(shared, target, release, &mut slot);
            slots.push(slot);
        }
    }
    slots
}

/// Stops every process of `slots` and waits until each is gone (the app is stopping).
pub(super) async fn stop_all(shared: &Arc<Shared>, slots: Vec<Slot>) {
    let mut retiring = Retiring {
        lives: Vec::new(),
        gates: Vec::new(),
    };
    stop_slots(slots, &mut retiring.lives);
    retire(shared.clone(), retiring).await;
}

/// Whether `a` and `b` assign the same release the same way, differing only in the formation:
/// how many web instances run here, or which processes of other types; in the host names it
/// is served on (`em domains add`, which changes only the route table); or in the app's
/// creation time, which only ranks its claim on its domains (a Beacon that starts sending it
/// must not redeploy every app).
pub(super) fn same_but_scale(a: &AppAssignment, b: &AppAssignment) -> bool {
    a != b
        && AppAssignment {
            processes: b.processes.clone(),
            instances: b.instances,
            domains: b.domains.clone(),
            app_created_at: b.app_created_at.clone(),
            ..a.clone()
        } == *b
}

/// The sentence of the deploy-finished event once the previous release is all gone: the
/// processes replaced, and how many processes were killed at their grace.
pub(super) fn replaced_message(app: &str, release: u64, names: &[String], killed: u64) -> String {
    let mut types: Vec<&str> = names.iter().map(String::as_str).collect();
    types.sort_unstable();
    types.dedup();
    let replaced = if types.is_empty() {
        String::new()
    } else {
        format!(
            " replaced its {} process(es) ({})",
            names.len(),
            types.join(", ")
        )
    };
    format!(
        "{app} v{release}{replaced}: the previous release is gone, {killed} process(es) killed at the end of their stop_grace"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replaced_message_counts_the_killed() {
        let names = vec!["worker".to_string(), "clock".into(), "worker".into()];
        assert_eq!(
            replaced_message("shop", 3, &names, 1),
            "shop v3 replaced its 3 process(es) (clock, worker): the previous release is gone, 1 process(es) killed at the end of their stop_grace"
        );
        assert_eq!(
            replaced_message("shop", 3, &[], 2),
            "shop v3: the previous release is gone, 2 process(es) killed at the end of their stop_grace"
        );
    }
}
