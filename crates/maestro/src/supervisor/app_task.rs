//! The task that owns one app: it receives the app's desired `AppAssignment` through a
//! `watch` channel and runs the deploy state machine. A new release is prepared by the
//! release store, its instances start beside the old ones, the route switches once all are
//! healthy, and the old instances are drained and stopped. A release that fails anywhere
//! leaves the old one serving and is not retried until the assignment changes or a restart
//! is asked. Crashed instances leave the route at once and restart after a backoff.

use std::sync::Arc;
use std::time::Instant;

use px_proto::link::{AppAssignment, InstanceState, InstanceStatus, NodeEventKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::error::DeployError;
use super::instance::{self, CrashEvent, CrashStreak, Exit, Instance, stop_grace_of};
use super::processes::{self, Slot};
use super::rollout_watch;
use super::shared::Shared;
use super::store::PreparedRelease;
use crate::routes::{AppRoute, BodyPolicy, HttpsPolicy, ReleaseStats};
use crate::runtimes;

/// Stderr lines sent with a failed deploy.
pub const FAILED_STDERR_LINES: usize = 20;

/// A release as it runs: its assignment, files and instances.
struct Running {
    assignment: AppAssignment,
    release: PreparedRelease,
    instances: Vec<Instance>,
    /// The processes of other types than web that Beacon placed on this node.
    processes: Vec<Slot>,
    /// What the proxy counted for this release's answers.
    stats: Arc<ReleaseStats>,
}

impl Running {
    /// The stop grace of its web instances (`[processes.web] stop_grace`, or the node's).
    fn web_grace(&self, node: std::time::Duration) -> std::time::Duration {
        stop_grace_of(
            &self.assignment.manifest,
            px_proto::procfile::WEB_PROCESS,
            node,
        )
    }
}

pub(super) struct AppTask {
    shared: Arc<Shared>,
    app: String,
    /// A release that failed to deploy is not retried until the assignment changes or a
    /// restart is asked for; this keeps a broken release from looping.
    failed: Option<AppAssignment>,
    crashes: CrashStreak,
}

impl AppTask {
    pub(super) fn new(shared: Arc<Shared>, app: String) -> Self {
        Self {
            shared,
            app,
            failed: None,
            crashes: CrashStreak::default(),
        }
    }

    /// Runs the app until `stop`, or until the supervisor drops its handle: deploys what
    /// `desired` says, redeploys on `restart`, restarts crashed instances.
    pub(super) async fn run(
        mut self,
        mut desired: watch::Receiver<Option<AppAssignment>>,
        mut restart: mpsc::Receiver<()>,
        stop: CancellationToken,
    ) {
        let mut running: Option<Running> = None;
        // Restarts waiting for their backoff: (instance index, when).
        let mut pending: Vec<(usize, Instant)> = Vec::new();
        // The first value counts as a change.
        let mut changed = true;
        loop {
            if changed {
                changed = false;
                let target = desired.borrow_and_update().clone();
                if let Some(target) = target.as_ref()
                    && let Some(run) = running.as_mut()
                    && processes::same_but_scale(&run.assignment, target)
                {
                    // Only the formation or the host names changed (`em scale`, processes
                    // moved between nodes, `em domains`): web instances are added or removed,
                    // other processes started or stopped, routes changed, and nothing that
                    // keeps running is touched.
                    self.scale_web(run, target, &mut pending).await;
                    let slots = std::mem::take(&mut run.processes);
                    run.processes = processes::reconcile(&self.shared, target, &run.release, slots);
                    // The claim's age decides hosts another app names too.
                    let rerouted = run.assignment.app_created_at != target.app_created_at
                        || run.assignment.domains != target.domains;
                    run.assignment = target.clone();
                    if rerouted {
                        self.publish(run);
                    }
                    self.report(running.as_ref());
                } else if let Some(target) = target
                    && running.as_ref().is_none_or(|r| r.assignment != target)
                    && self.failed.as_ref() != Some(&target)
                {
                    running = self.deploy(running, target, &stop).await;
                    pending.clear();
                    self.shared
                        .tried
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(self.app.clone());
                    self.report(running.as_ref());
                }
            }
            let next_restart = pending.iter().min_by_key(|(_, at)| *at).copied();
            let (instances, slots) = match running.as_mut() {
                Some(r) => (Some(&mut r.instances), Some(&mut r.processes)),
                None => (None, None),
            };
            let crash = instance::wait_crash(instances, next_restart);
            let process_event = processes::next_event(slots);
            tokio::select! {
                _ = stop.cancelled() => break,
                r = desired.changed() => {
                    if r.is_err() { break; }
                    changed = true;
                }
                r = restart.recv() => {
                    if r.is_none() { break; }
                    self.failed = None;
                    if let Some(current) = running.as_ref().map(|r| r.assignment.clone()) {
                        // Redeploy the same release: new instances, then switch and drain.
                        running = self.deploy(running, current, &stop).await;
                        pending.clear();
                    } else {
                        changed = true;
                    }
                    self.report(running.as_ref());
                }
                event = process_event => {
                    if let Some(run) = running.as_mut() {
                        processes::on_event(
                            &self.shared,
                            &run.assignment,
                            &run.release,
                            &mut run.processes,
                            event,
                        );
                    }
                    self.report(running.as_ref());
                }
                event = crash => match event {
                    CrashEvent::Exited(index, exit) => {
                        pending.extend(self.on_exit(&mut running, index, exit));
                        self.report(running.as_ref());
                    }
                    CrashEvent::RestartDue(index) => {
                        pending.retain(|(i, _)| *i != index);
                        pending.extend(self.restart_instance(&mut running, index).await);
                        self.report(running.as_ref());
                    }
                },
            }
        }
        // Stopping: no more traffic to this app, then stop its instances.
        self.shared.unserve(&self.app);
        if let Some(running) = running.take() {
            let grace = running.web_grace(self.shared.settings.stop_grace);
            let (_, ()) = tokio::join!(
                instance::stop_all(&self.shared, running.instances, grace),
                processes::stop_all(&self.shared, running.processes),
            );
        }
        self.shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.app);
        self.shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.app);
        tracing::info!(app = %self.app, "app stopped");
    }

    /// Publishes the app's instances for the next state report, and asks the link to send it.
    fn report(&self, running: Option<&Running>) {
        let statuses = running
            .map(|r| {
                r.instances
                    .iter()
                    .map(|i| InstanceStatus {
                        app: self.app.clone(),
                        release: r.assignment.release,
                        state: if i.is_live() {
                            InstanceState::Healthy
                        } else {
                            InstanceState::Crashed
                        },
                        pid: i.is_live().then_some(i.pid),
                        port: Some(i.port),
                        restarts: i.restarts,
                        last_exit: i.last_exit.clone(),
                        process: px_proto::procfile::WEB_PROCESS.to_string(),
                        number: i.number,
                        started_at: i.is_live().then(|| instance::wall_time(i.started_wall)),
                        // Measured when the node report is made.
                        memory_bytes: None,
                        cpu_permille: None,
                    })
                    .chain(processes::statuses(&self.app, &r.processes))
                    .collect()
            })
            .unwrap_or_default();
        self.shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.app.clone(), statuses);
        // What a one-off run (`em run`) of the app starts from: the release that serves.
        let target = running.map(|r| super::RunTarget {
            release: r.assignment.release,
            dir: r.release.dir.clone(),
            path: r.release.instance_path(),
            env: r.release.env.clone(),
            limits: r.assignment.manifest.limits.clone(),
        });
        let mut runnable = self
            .shared
            .runnable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match target {
            Some(target) => runnable.insert(self.app.clone(), target),
            None => runnable.remove(&self.app),
        };
        drop(runnable);
        self.shared.changes.send_modify(|n| *n += 1);
    }

    /// Routes the app's traffic to the live instances of `running` (and its static files).
    fn publish(&self, running: &Running) {
        let backends = running
            .instances
            .iter()
            .filter(|i| i.is_live())
            .map(|i| i.backend.clone())
            .collect();
        let static_dirs = running
            .assignment
            .manifest
            .http
            .static_dirs
            .iter()
            .map(|(prefix, dir)| {
                (
                    prefix.trim_end_matches('/').to_string(),
                    running.release.dir.join(dir),
                )
            })
            .collect();
        let route = AppRoute::new(&self.app, running.assignment.release, backends, static_dirs)
            .with_bodies(BodyPolicy::of(&running.assignment.manifest.http))
            .with_https(HttpsPolicy::of(&running.assignment.manifest.http));
        self.shared.serve(
            &self.app,
            running.assignment.domains.clone(),
            route,
            running.assignment.release,
            running.assignment.app_created_at.clone(),
        );
    }

    /// Deploys `target` beside `current`; returns what runs afterwards (the new release, or
    /// the old one untouched when the new one fails).
    async fn deploy(
        &mut self,
        current: Option<Running>,
        target: AppAssignment,
        stop: &CancellationToken,
    ) -> Option<Running> {
        let release = target.release;
        let stats = Arc::new(ReleaseStats::default());
        let mut started = Vec::new();
        let prepared = match self.bring_up(&target, &stats, &mut started, stop).await {
            Ok(prepared) => prepared,
            Err(error) => {
                // The event goes out before the instances that did start are stopped, so its
                // stderr lines are the failed instance's, not what the others say on SIGTERM.
                let serving = current.as_ref().map(|c| c.assignment.release);
                self.shared.send(error.event(
                    &self.app,
                    release,
                    &self.shared.settings.node_name,
                    serving,
                    || {
                        self.shared
                            .logs
                            .stderr_tail(&self.app, release, FAILED_STDERR_LINES)
                    },
                ));
                let grace = stop_grace_of(
                    &target.manifest,
                    px_proto::procfile::WEB_PROCESS,
                    self.shared.settings.stop_grace,
                );
                instance::stop_all(&self.shared, started, grace).await;
                self.failed = Some(target);
                return current;
            }
        };
        let mut next = Running {
            assignment: target,
            release: prepared,
            instances: started,
            processes: Vec::new(),
            stats,
        };
        // The switch: one swap of the routing table.
        self.publish(&next);
        self.failed = None;
        self.crashes.reset();
        self.shared.event(
            NodeEventKind::DeployFinished,
            &self.app,
            release,
            format!(
                "{} v{release} serving with {} instance(s)",
                self.app,
                next.instances.len()
            ),
            None,
        );
        // Report the switch now: Beacon counts the rollout done when nodes say so, and
        // draining the old instances can take a while.
        self.report(Some(&next));
        let previous = current
            .as_ref()
            .map(|c| (c.assignment.release, c.stats.clone()));
        // A restart of the same release is not a rollout: its first switch keeps its figures.
        let watched = previous.as_ref().is_none_or(|(p, _)| *p != release);
        if watched {
            rollout_watch::watch(
                &self.shared,
                &self.app,
                release,
                next.assignment.manifest.deploy.watch,
                next.stats.clone(),
                previous,
            );
        }
        // Then the other process types, each in its `replace` order; their old processes
        // stop in a task of their own, which may take their whole `stop_grace`.
        let (old_instances, old_processes, old_grace) = match current {
            Some(old) => {
                let grace = old.web_grace(self.shared.settings.stop_grace);
                (Some(old.instances), old.processes, grace)
            }
            None => (None, Vec::new(), self.shared.settings.stop_grace),
        };
        let had_processes = !old_processes.is_empty();
        if had_processes && watched {
            rollout_watch::retiring(&self.shared, &self.app, release);
        }
        let (slots, retiring) =
            processes::replace(&self.shared, &next.assignment, &next.release, old_processes).await;
        next.processes = slots;
        self.report(Some(&next));
        let mut web_killed = 0;
        if let Some(old) = old_instances {
            let drained = instance::drain_and_stop(
                &self.shared,
                &self.app,
                old,
                next.assignment.manifest.deploy.drain,
                old_grace,
            )
            .await;
            web_killed = drained.killed;
            if watched {
                rollout_watch::drained(&self.shared, &self.app, release, drained);
            }
        }
        self.finish_retiring(release, watched, had_processes, web_killed, retiring);
        self.shared.store.prune(&self.app, release).await;
        Some(next)
    }

    /// Once the previous release's other processes are gone: their killed count joins the
    /// figures, and when there were such processes (or an instance was killed) a second
    /// deploy-finished event says how many were killed at their grace.
    fn finish_retiring(
        &self,
        release: u64,
        watched: bool,
        had_processes: bool,
        web_killed: u64,
        retiring: tokio::task::JoinHandle<(u64, Vec<String>)>,
    ) {
        let shared = self.shared.clone();
        let app = self.app.clone();
        tokio::spawn(async move {
            let (killed, names) = retiring.await.unwrap_or_default();
            if watched && had_processes {
                rollout_watch::retired(&shared, &app, release, killed);
            }
            if !names.is_empty() || killed + web_killed > 0 {
                shared.event(
                    NodeEventKind::DeployFinished,
                    &app,
                    release,
                    processes::replaced_message(&app, release, &names, killed + web_killed),
                    None,
                );
            }
        });
    }

    /// Brings the number of web instances of `run` to `target`'s, without touching the others:
    /// the highest numbers leave the route first and are drained and stopped in a task of their
    /// own; new ones start beside the running ones and join the route once healthy. One that
    /// does not start is reported, and the others keep serving.
    async fn scale_web(
        &mut self,
        run: &mut Running,
        target: &AppAssignment,
        pending: &mut Vec<(usize, Instant)>,
    ) {
        let wanted = target.instances as usize;
        if wanted < run.instances.len() {
            let removed = run.instances.split_off(wanted);
            // Restarts due for removed instances are dropped with them.
            pending.retain(|(index, _)| *index < wanted);
            self.publish(run);
            let shared = self.shared.clone();
            let app = self.app.clone();
            let budget = target.manifest.deploy.drain;
            let grace = run.web_grace(self.shared.settings.stop_grace);
            tracing::info!(app = %self.app, instances = wanted, "scaling web down");
            tokio::spawn(async move {
                instance::drain_and_stop(&shared, &app, removed, budget, grace).await;
            });
        }
        let release = run.assignment.release;
        for number in (run.instances.len() as u32 + 1)..=target.instances {
            match instance::start(&self.shared, target, &run.release, number, &run.stats).await {
                Ok(started) => {
                    run.instances.push(started);
                    self.publish(run);
                    tracing::info!(app = %self.app, number, "web instance added");
                }
                Err(error) => {
                    let detail =
                        self.shared
                            .logs
                            .stderr_tail(&self.app, release, FAILED_STDERR_LINES);
                    self.shared.event(
                        NodeEventKind::InstanceCrashed,
                        &self.app,
                        release,
                        format!(
                            "{} v{release} web instance {number} did not start when scaling up: {error}",
                            self.app
                        ),
                        (!detail.is_empty()).then_some(detail),
                    );
                    break;
                }
            }
        }
    }

    /// Everything before the switch: the release onto the disk, its requirements checked, and
    /// its instances started and healthy (pushed onto `started` as they come up, so that the
    /// caller stops them when a later one fails). Stops starting when `stop` is cancelled.
    async fn bring_up(
        &self,
        target: &AppAssignment,
        stats: &Arc<ReleaseStats>,
        started: &mut Vec<Instance>,
        stop: &CancellationToken,
    ) -> Result<PreparedRelease, DeployError> {
        let prepared = self.shared.store.prepare(target).await?;
        runtimes::check(&target.manifest, &prepared.instance_path())
            .await
            .map_err(DeployError::RuntimeUnmet)?;
        for number in 1..=target.instances {
            if stop.is_cancelled() {
                break;
            }
            started.push(instance::start(&self.shared, target, &prepared, number, stats).await?);
        }
        Ok(prepared)
    }

    /// An instance exited on its own: take it out of the route, report, schedule a restart.
    fn on_exit(
        &mut self,
        running: &mut Option<Running>,
        index: usize,
        exit: Exit,
    ) -> Option<(usize, Instant)> {
        let running = running.as_mut()?;
        let release = running.assignment.release;
        let (how, kind, last_exit) =
            instance::classify_exit(&exit, running.assignment.manifest.limits.memory);
        let instance = running.instances.get_mut(index)?;
        instance.stop = None;
        instance.last_exit = Some(last_exit);
        self.shared.forget_group(instance.pid);
        self.shared.give_back(instance.port);
        let stable = instance.started.elapsed() >= instance::STABLE_AFTER;
        let number = instance.number;
        let detail = self
            .shared
            .logs
            .stderr_tail(&self.app, release, FAILED_STDERR_LINES);
        match exit.reason {
            Some(reason) => self.shared.failure_event(
                NodeEventKind::InstanceUnhealthy,
                &self.app,
                release,
                format!(
                    "{} v{release} instance {number} {reason}; restarted it",
                    self.app
                ),
                None,
                kind,
            ),
            None => self.shared.failure_event(
                NodeEventKind::InstanceCrashed,
                &self.app,
                release,
                format!("{} v{release} instance {number} exited ({how})", self.app),
                (!detail.is_empty()).then_some(detail.clone()),
                kind,
            ),
        }
        self.publish(running);
        Some(self.schedule_restart(index, release, stable, detail))
    }

    /// Counts one more exit (or failed restart) and says when to try again; a crash loop is
    /// reported once.
    fn schedule_restart(
        &mut self,
        index: usize,
        release: u64,
        stable: bool,
        detail: String,
    ) -> (usize, Instant) {
        let (backoff, crash_loop) = self.crashes.count(stable);
        if let Some(exits) = crash_loop {
            self.shared.event(
                NodeEventKind::CrashLoop,
                &self.app,
                release,
                format!(
                    "{} v{release} keeps crashing ({exits} exits in a row); restarts are backing off",
                    self.app
                ),
                (!detail.is_empty()).then_some(detail),
            );
        }
        (index, Instant::now() + backoff)
    }

    /// Starts a crashed instance again; when that fails too, returns when to retry.
    async fn restart_instance(
        &mut self,
        running: &mut Option<Running>,
        index: usize,
    ) -> Option<(usize, Instant)> {
        let run = running.as_mut()?;
        let target = run.assignment.clone();
        let old = run.instances.get(index)?;
        let (number, restarts, last_exit) = (old.number, old.restarts + 1, old.last_exit.clone());
        match instance::start(&self.shared, &target, &run.release, number, &run.stats).await {
            Ok(mut instance) => {
                instance.restarts = restarts;
                instance.last_exit = last_exit;
                run.instances[index] = instance;
                self.publish(run);
                None
            }
            Err(reason) => {
                tracing::warn!(app = %self.app, number, %reason, "restart failed; trying again after a backoff");
                if let Some(instance) = run.instances.get_mut(index) {
                    instance.restarts = restarts;
                }
                let detail =
                    self.shared
                        .logs
                        .stderr_tail(&self.app, target.release, FAILED_STDERR_LINES);
                Some(self.schedule_restart(index, target.release, false, detail))
            }
        }
    }
}
