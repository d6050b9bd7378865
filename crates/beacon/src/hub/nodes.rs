//! The node registry: Maestros attach with their `Hello`, report with every heartbeat, send
//! events, detach, and are marked lost by the sweep when silent too long. Commands for an
//! app's nodes are queued here too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use px_proto::beacon::{EventKind, Level, RolloutState};
use px_proto::link::{Assignment, FromBeacon, Hello, NodeEvent, NodeEventKind, NodeReport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{COMMAND_QUEUE, Changes, Hub, NodeEntry, effect};
use crate::judge;
use crate::placement::Fit;

/// What a link task gets when its node attaches.
pub struct Attached {
    pub conn: u64,
    pub assignments: watch::Receiver<Option<Arc<Assignment>>>,
    pub commands: mpsc::Receiver<FromBeacon>,
    /// Cancelled when a newer connection of the same node replaces this one.
    pub closed: CancellationToken,
}

impl Hub {
    /// Registers a Maestro that completed its handshake, replacing an older link of the same
    /// name. Its assignment is queued unless its report shows it already applied it.
    pub async fn attach(&self, hello: &Hello) -> Attached {
        let (attached, changes) = self.attach_locked(hello);
        self.finish(changes).await;
        attached
    }

    fn attach_locked(&self, hello: &Hello) -> (Attached, Changes) {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let conn = state.next_conn;
        state.next_conn += 1;
        let report = hello.state.clone().unwrap_or_default();
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let closed = CancellationToken::new();
        let assignment = self.attach_assignment(
            &state,
            &Fit {
                labels: &hello.labels,
                runtimes: &hello.runtimes,
                report: Some(&report),
            },
        );
        let (assign_tx, assign_rx) = watch::channel(assignment);
        let now = Instant::now();
        let entry = NodeEntry {
            labels: hello.labels.clone(),
            runtimes: hello.runtimes.clone(),
            software: hello.software.clone(),
            conn,
            connected: true,
            lost: false,
            last_seen: now,
            last_seen_wall: SystemTime::now(),
            assigned_generation: report.generation,
            report,
            assign_tx,
            commands: commands_tx,
            closed: closed.clone(),
        };
        match state.nodes.insert(hello.name.clone(), entry) {
            Some(old) => {
                if old.connected {
                    tracing::warn!(node = %hello.name, "a new link replaces this node's previous one");
                    old.closed.cancel();
                }
                if old.lost {
                    effects.push(
                        effect(
                            EventKind::NodeRecovered,
                            Some(&hello.name),
                            None,
                            None,
                            format!("node {} is back", hello.name),
                        )
                        .alert(format!("node_recovered:{}", hello.name)),
                    );
                }
            }
            None => effects.push(effect(
                EventKind::NodeJoined,
                Some(&hello.name),
                None,
                None,
                format!("node {} joined ({})", hello.name, hello.software),
            )),
        }
        let apps: Vec<String> = state.desired.keys().cloned().collect();
        // An app waiting for its first eligible node may have one now: say so at once.
        let unplaced: Vec<String> = state
            .rollouts
            .iter()
            .filter(|(_, r)| r.state == RolloutState::Unplaced)
            .map(|(app, _)| app.clone())
            .collect();
        for app in unplaced {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        state.dirty.extend(apps);
        let attached = Attached {
            conn,
            assignments: assign_rx,
            commands: commands_rx,
            closed,
        };
        (attached, Changes::of(&mut state, effects))
    }

    /// Records that the link sent an assignment.
    pub fn assigned(&self, node: &str, conn: u64, generation: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) {
            entry.assigned_generation = generation;
        }
    }

    /// Records any frame from a node (heartbeats carry a report).
    pub async fn seen(&self, node: &str, conn: u64, report: Option<NodeReport>) {
        let changes = self.seen_locked(node, conn, report);
        self.finish(changes).await;
    }

    fn seen_locked(&self, node: &str, conn: u64, report: Option<NodeReport>) -> Changes {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) else {
            return Changes::of(&mut state, effects);
        };
        entry.last_seen = Instant::now();
        entry.last_seen_wall = SystemTime::now();
        if entry.lost {
            entry.lost = false;
            effects.push(
                effect(
                    EventKind::NodeRecovered,
                    Some(node),
                    None,
                    None,
                    format!("node {node} is back"),
                )
                .alert(format!("node_recovered:{node}")),
            );
        }
        if let Some(report) = report {
            // Only apps whose instances on this node changed need their rollout looked at;
            // most heartbeats change nothing.
            let apps: BTreeSet<String> = report
                .instances
                .iter()
                .map(|i| i.app.clone())
                .chain(entry.report.instances.iter().map(|i| i.app.clone()))
                .filter(|app| {
                    let of = |r: &NodeReport| {
                        r.instances
                            .iter()
                            .filter(|i| &i.app == app)
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    let figures = |r: &NodeReport| {
                        r.rollouts
                            .iter()
                            .filter(|f| &f.app == app)
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    of(&report) != of(&entry.report) || figures(&report) != figures(&entry.report)
                })
                .collect();
            // A node whose report may complete a rollout has it evaluated now: the last
            // node's switch ends `em deploy` without waiting for the sweep. Checking that is
            // cheap (this node against the last evaluation's counts); the full evaluation, one
            // pass over the nodes, then runs once per rollout.
            let completing: Vec<String> = apps
                .iter()
                .filter(|app| {
                    state.rollouts.get(*app).is_some_and(|rollout| {
                        rollout.state == RolloutState::RollingOut
                            && rollout.eligible > 0
                            && !rollout.healthy.contains(node)
                            && rollout.healthy.len() + 1 >= rollout.eligible
                            && judge::runs_healthy(
                                &report,
                                app,
                                rollout.release,
                                state.desired.get(*app),
                            )
                    })
                })
                .cloned()
                .collect();
            if let Some(entry) = state.nodes.get_mut(node) {
                entry.report = report;
            }
            for app in &completing {
                effects.extend(self.evaluate_rollout(&mut state, app));
            }
            state
                .dirty
                .extend(apps.into_iter().filter(|a| !completing.contains(a)));
        }
        Changes::of(&mut state, effects)
    }

    /// Records an event a node reported.
    pub fn node_event(&self, node: &str, event: NodeEvent) {
        let mut state = self.lock();
        let kind = EventKind::from(event.kind);
        let mut e = effect(
            kind,
            Some(node),
            Some(&event.app),
            Some(event.release),
            event.message.clone(),
        );
        e.draft.detail = event.detail.clone();
        e.draft.failure = event.failure;
        if event.kind == NodeEventKind::AppEvent {
            let level = event.level.unwrap_or(Level::Info);
            e.draft.level = Some(level);
            if let Some(instance) = event.instance {
                e.draft.message = format!("{} #{instance}: {}", event.app, event.message);
            }
            if level >= Level::Error {
                // One alert per app and message within the dedup window, however often the
                // app repeats it.
                e = e.alert(format!("app_event:{}:{}", event.app, event.message));
            }
        }
        match event.kind {
            NodeEventKind::CrashLoop => e = e.alert(format!("crash_loop:{node}:{}", event.app)),
            NodeEventKind::DeployFailed => {
                e = e.alert(format!("deploy_failed:{}:{}", event.app, event.release));
                if let Some(rollout) = state
                    .rollouts
                    .get_mut(&event.app)
                    .filter(|r| r.release == event.release)
                {
                    rollout.state = RolloutState::Failed;
                }
            }
            _ => {}
        }
        drop(state);
        self.apply(vec![e]);
    }

    /// The link of `node` ended. The node stays known; it is lost if it does not return in time.
    pub fn detach(&self, node: &str, conn: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) {
            entry.connected = false;
        }
    }

    /// Marks nodes silent for too long as lost (once), and re-evaluates rollouts they were in.
    pub async fn sweep(&self) {
        let changes = self.sweep_locked();
        self.finish(changes).await;
    }

    fn sweep_locked(&self) -> Changes {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let deadline = self.settings.node_lost_after;
        let mut lost = Vec::new();
        for (name, node) in state.nodes.iter_mut() {
            if !node.lost && node.last_seen.elapsed() > deadline {
                node.lost = true;
                node.closed.cancel();
                lost.push(name.clone());
            }
        }
        for name in &lost {
            effects.push(
                effect(
                    EventKind::NodeLost,
                    Some(name),
                    None,
                    None,
                    format!(
                        "node {name} lost: nothing heard for {}s",
                        deadline.as_secs()
                    ),
                )
                .alert(format!("node_lost:{name}")),
            );
        }
        if !lost.is_empty() {
            let apps: Vec<String> = state.desired.keys().cloned().collect();
            state.dirty.extend(apps);
        }
        // Rollouts are evaluated here, for the apps whose reports changed since the last
        // sweep, rather than on every heartbeat: one pass over the nodes per app per sweep
        // instead of one per heartbeat, which is what lets one Beacon hold 10 000 links.
        let dirty = std::mem::take(&mut state.dirty);
        for app in dirty {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        self.metrics
            .nodes_connected
            .set(state.nodes.values().filter(|n| n.connected).count() as u64);
        Changes::of(&mut state, effects)
    }

    /// Queues a command for every connected node that runs `app`; returns how many.
    pub fn command(&self, app: &str, command: FromBeacon) -> usize {
        let state = self.lock();
        let Some(release) = state.desired.get(app) else {
            return 0;
        };
        let mut sent = 0;
        for name in Self::eligible(&state, release) {
            if let Some(node) = state.nodes.get(name).filter(|n| n.connected)
                && node.commands.try_send(command.clone()).is_ok()
            {
                sent += 1;
            }
        }
        sent
    }
}
