//! The node registry: Maestros attach with their `Hello`, report with every heartbeat, send
//! events, detach, and are marked lost by the sweep when silent too long (their builds then
//! move). Commands for an app's nodes are queued here too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use px_proto::beacon::{EventKind, Level, RolloutState};
use px_proto::link::{FromBeacon, Hello, NodeEvent, NodeEventKind, NodeReport};
use tokio_util::sync::CancellationToken;

use crate::frames::Outgoing;

use super::{COMMAND_QUEUE, Changes, Effect, Hub, NodeEntry, State, effect};

/// How long a lost node stays on the status page and in the node table: a day covers a host
/// that is being repaired; one that comes back later joins anew.
pub const FORGET_LOST_NODE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often the sweep passes over every node to find the lost ones (or a quarter of
/// `node_lost_after`, when that is shorter): a node is lost at most this long after its
/// deadline, while the sweep's other work (rollouts whose reports changed) runs every 250 ms.
pub const NODE_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// Most nodes known at once, connected or lost: as many as the links Beacon holds. Beyond it
/// the lost nodes silent longest are forgotten first (connected ones never are).
pub const MAX_KNOWN_NODES: usize = crate::links::MAX_LINKS;
use crate::judge;
use crate::placement;

/// What a link task gets when its node attaches.
pub struct Attached {
    pub conn: u64,
    pub assignments: super::latest::LatestReceiver<Option<Arc<Outgoing>>>,
    pub commands: super::commands::CommandReceiver,
    /// Cancelled when a newer connection of the same node replaces this one, when the sweep
    /// finds the node lost, and with the token it was attached within.
    pub closed: CancellationToken,
}

/// The apps of the instances in a node's `report` or its `previous` one whose instances or
/// rollout figures differ between the two.
fn changed_apps<'a>(report: &'a NodeReport, previous: &'a NodeReport) -> BTreeSet<String> {
    let differs = |app: &str| {
        let instances = |r: &'a NodeReport| r.instances.iter().filter(move |i| i.app == app);
        let figures = |r: &'a NodeReport| r.rollouts.iter().filter(move |f| f.app == app);
        !instances(report).eq(instances(previous)) || !figures(report).eq(figures(previous))
    };
    report
        .instances
        .iter()
        .chain(previous.instances.iter())
        .map(|i| i.app.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|app| differs(app))
        .map(str::to_string)
        .collect()
}

impl Hub {
    /// [`Hub::attach_within`] a token of its own, as tests attach nodes.
    #[cfg(test)]
    pub async fn attach(&self, hello: &Hello) -> Attached {
        self.attach_within(hello, &CancellationToken::new()).await
    }

    /// Registers a Maestro that completed its handshake, replacing an older link of the same
    /// name. Its assignment is queued unless its report shows it already applied it. A node
    /// that may build, reports builds, or had builds placed on it may change where builds run,
    /// and one that had processes, or comes while a process waits for a node, where processes
    /// run: it attaches through [`Hub::update`], so a build or process that moves is numbered
    /// and written before any node is sent it.
    ///
    /// The link's `closed` token is a child of `link`: a link task that makes `link` the token
    /// of everything else that ends it (shutdown, a revoked token) waits on one token instead
    /// of several.
    pub async fn attach_within(&self, hello: &Hello, link: &CancellationToken) -> Attached {
        if self.may_move_builds(hello) {
            return self
                .update(|hub, state, effects| hub.attach_in(state, hello, link, effects, true))
                .await;
        }
        let changes;
        let attached = {
            let mut effects = Vec::new();
            let mut state = self.lock();
            let (attached, _) = self.attach_in(&mut state, hello, link, &mut effects, false);
            changes = Changes::of(&mut state, effects);
            attached
        };
        self.finish(changes).await;
        attached
    }

    /// Whether attaching the node of `hello` may change where builds run.
    fn may_move_builds(&self, hello: &Hello) -> bool {
        let state = self.lock();
        if state.desired_known && Self::processes_may_move(&state, &hello.name) {
            return true;
        }
        !state.builds.is_empty()
            && (placement::may_build(&hello.labels)
                || hello.state.as_ref().is_some_and(|r| !r.builds.is_empty())
                || state
                    .builds
                    .values()
                    .any(|b| b.node.as_deref() == Some(hello.name.as_str())))
    }

    /// The part of [`Hub::attach`] under the lock; with `place`, builds are placed again
    /// with the node among the candidates. Returns whether a build moved.
    fn attach_in(
        &self,
        state: &mut State,
        hello: &Hello,
        link: &CancellationToken,
        effects: &mut Vec<Effect>,
        place: bool,
    ) -> (Attached, bool) {
        let conn = state.next_conn;
        state.next_conn += 1;
        let report = hello.state.clone().unwrap_or_default();
        let (commands_tx, commands_rx) = super::command_queue(COMMAND_QUEUE);
        let closed = link.child_token();
        let (assign_tx, assign_rx) = super::latest::latest(None);
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
            scope: Default::default(),
            token_sha256: px_runtime::tokens::hash(&hello.token),
        };
        match state.nodes.insert(hello.name.clone(), Box::new(entry)) {
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
        let moved = place && state.desired_known && self.replace_builds(state, effects);
        // A generation numbered just now is not on disk yet: the node gets it when it is
        // published, with the others.
        if let Some(node) = state.nodes.get(&hello.name)
            && let Some(assignment) = self.attach_assignment(state, &hello.name, &node.fit())
        {
            node.assign_tx.send_replace(Some(assignment));
        }
        // What the Hello reported counts only for what the node was given.
        if let Some(node) = state.nodes.get_mut(&hello.name) {
            // A clone: the scope is computed with the node's report (an app it runs stays
            // its own while placement keeps it there).
            let mut report = node.report.clone();
            self.keep_own_report(state, &hello.name, conn, &mut report);
            if let Some(node) = state.nodes.get_mut(&hello.name) {
                node.report = report;
            }
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
            effects.extend(self.evaluate_rollout(state, &app));
        }
        state.dirty.extend(apps);
        let attached = Attached {
            conn,
            assignments: assign_rx,
            commands: commands_rx,
            closed,
        };
        (attached, moved)
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

    fn seen_locked(&self, node: &str, conn: u64, mut report: Option<NodeReport>) -> Changes {
        let mut effects = Vec::new();
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = Instant::now();
        // The node's record is looked up by name once per heartbeat (twice on its first
        // heartbeat of a generation): among 10,000 nodes a lookup is a few dozen name
        // comparisons, most of them cache misses, and four lookups a heartbeat were Beacon's
        // largest own cost at steady state.
        let Some(mut entry) = state.nodes.get_mut(node).filter(|n| n.conn == conn) else {
            return Changes::of(state, effects);
        };
        // Before Beacon has read the desired state it cannot tell what a node runs, and keeps
        // reports whole (seconds after it starts).
        if let Some(report) = report.as_mut()
            && state.desired_known
        {
            let fresh = if entry.scope.is_of(state.persisted.generation) {
                None
            } else {
                let fresh = state
                    .nodes
                    .get(node)
                    .and_then(|stale| self.scope_assignment(state, node, stale));
                let Some(again) = state.nodes.get_mut(node) else {
                    return Changes::of(state, effects);
                };
                entry = again;
                fresh
            };
            entry.scope.refresh(fresh.as_ref(), now);
            entry
                .scope
                .keep_own_report(node, report, &self.metrics, now);
        }
        entry.last_seen = now;
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
            // most heartbeats change nothing, and those are told by one comparison, with
            // nothing copied.
            let apps: BTreeSet<String> = if report.instances == entry.report.instances
                && report.rollouts == entry.report.rollouts
            {
                BTreeSet::new()
            } else {
                changed_apps(&report, &entry.report)
            };
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
            entry.report = report;
            for app in &completing {
                effects.extend(self.evaluate_rollout(state, app));
            }
            state
                .dirty
                .extend(apps.into_iter().filter(|a| !completing.contains(a)));
        }
        Changes::of(state, effects)
    }

    /// Records an event a node reported.
    pub fn node_event(&self, node: &str, event: NodeEvent) {
        let mut state = self.lock();
        let kind = EventKind::from(event.kind);
        if matches!(
            event.kind,
            NodeEventKind::BuildStarted | NodeEventKind::BuildFinished | NodeEventKind::BuildFailed
        ) {
            let e = self.node_build_event(&mut state, node, &event);
            drop(state);
            self.apply(e.into_iter().collect());
            return;
        }
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

    /// Marks nodes silent for too long as lost (once), re-evaluates rollouts they were in,
    /// and moves the builds they ran (and, once the wait after a start is over, those of nodes
    /// that did not come back).
    pub async fn sweep(&self) {
        let (changes, move_builds) = self.sweep_locked();
        self.finish(changes).await;
        if move_builds {
            self.update(|hub, state, effects| ((), hub.replace_builds(state, effects)))
                .await;
        }
    }

    fn sweep_locked(&self) -> (Changes, bool) {
        let mut effects = Vec::new();
        let mut state = self.lock();
        let deadline = self.settings.node_lost_after;
        let mut lost = Vec::new();
        // One clock read for the pass, not one per node, and one pass over the nodes for what
        // the sweep needs of each (lost, connected, to be forgotten), every
        // `NODE_PASS_INTERVAL` rather than every sweep: at 10,000 nodes and four sweeps a
        // second, the three passes it took were about 8% of Beacon's steady samples, each node
        // a cache miss.
        let now = Instant::now();
        let pass_every = NODE_PASS_INTERVAL.min(deadline / 4);
        if state
            .nodes_swept_at
            .is_none_or(|at| now.saturating_duration_since(at) >= pass_every)
        {
            state.nodes_swept_at = Some(now);
            let mut connected = 0u64;
            let mut departed = false;
            for (name, node) in state.nodes.iter_mut() {
                let silent = now.saturating_duration_since(node.last_seen);
                if !node.lost && silent > deadline {
                    node.lost = true;
                    node.closed.cancel();
                    lost.push(name.clone());
                }
                connected += u64::from(node.connected);
                departed |= Self::departed(node, silent);
            }
            if departed || state.nodes.len() > MAX_KNOWN_NODES {
                Self::forget_departed_nodes(&mut state, now);
            }
            // Forgetting took no connected node, so the count of the pass holds.
            self.metrics.nodes_connected.set(connected);
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
        let placed_on = |state: &super::State, node: &dyn Fn(&str) -> bool| {
            state
                .builds
                .values()
                .any(|b| b.node.as_deref().is_some_and(node))
        };
        let mut move_builds = placed_on(&state, &|n| lost.iter().any(|l| l == n))
            || Self::processes_on(&state, &|n| lost.iter().any(|l| l == n));
        if !state.returning_over && self.started.elapsed() > deadline {
            state.returning_over = true;
            move_builds |= placed_on(&state, &|n| !state.nodes.contains_key(n))
                || Self::processes_on(&state, &|n| !state.nodes.contains_key(n));
        }
        // Rollouts are evaluated here, for the apps whose reports changed since the last
        // sweep, rather than on every heartbeat: one pass over the nodes per app per sweep
        // instead of one per heartbeat, which is what lets one Beacon hold 10 000 links.
        let dirty = std::mem::take(&mut state.dirty);
        for app in dirty {
            effects.extend(self.evaluate_rollout(&mut state, &app));
        }
        (Changes::of(&mut state, effects), move_builds)
    }

    /// Whether `node`, silent for `silent`, is to be forgotten: lost and unlinked for
    /// [`FORGET_LOST_NODE_AFTER`].
    fn departed(node: &NodeEntry, silent: Duration) -> bool {
        !node.connected && node.lost && silent >= FORGET_LOST_NODE_AFTER
    }

    /// Forgets nodes lost longer than [`FORGET_LOST_NODE_AFTER`], and while more than
    /// [`MAX_KNOWN_NODES`] are known, the lost ones silent longest. A node that comes back
    /// after that joins anew.
    pub(super) fn forget_departed_nodes(state: &mut State, now: Instant) {
        let before = state.nodes.len();
        state.nodes.retain(|name, node| {
            let keep = !Self::departed(node, now.saturating_duration_since(node.last_seen));
            if !keep {
                tracing::info!(node = %name, "forgetting a node lost for a day");
            }
            keep
        });
        if state.nodes.len() > MAX_KNOWN_NODES {
            let mut lost: Vec<(Instant, String)> = state
                .nodes
                .iter()
                .filter(|(_, n)| n.lost && !n.connected)
                .map(|(name, n)| (n.last_seen, name.clone()))
                .collect();
            lost.sort();
            let excess = state.nodes.len() - MAX_KNOWN_NODES;
            for (_, name) in lost.into_iter().take(excess) {
                tracing::info!(node = %name, "forgetting a lost node: too many nodes known");
                state.nodes.remove(&name);
            }
        }
        if state.nodes.len() != before {
            let apps: Vec<String> = state.desired.keys().cloned().collect();
            state.dirty.extend(apps);
        }
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
                && node.commands.try_send(Box::new(command.clone())).is_ok()
            {
                sent += 1;
            }
        }
        sent
    }
}
