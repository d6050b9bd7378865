//! Builds: the pending builds read from the repository, which node runs each (decided by
//! `crate::placement::place_builds`), the build orders in that node's assignment, and the
//! build events: queued (from the pending list), started, finished and failed (from the node,
//! or from the repository's result when the node's event did not come), and superseded (from
//! the repository's result). A build's end is announced once, whichever source comes first.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use px_proto::beacon::EventKind;
use px_proto::build::{Build, BuildOrder, BuildResult};
use px_proto::link::{NodeEvent, NodeEventKind};

use super::{Changes, Effect, Hub, State, effect};
use crate::placement::{self, BuildKey, BuildNode};

/// Most pending builds Beacon holds. The repository keeps at most one pending build per app (a
/// new upload supersedes the older one), so this is ten thousand apps building at once: far
/// more than any cluster, while a repository gone wrong cannot make Beacon hold without bound.
pub const MAX_PENDING_BUILDS: usize = 10_000;
/// Builds whose end is remembered as announced, so the node's event and the repository's
/// result make one event. A build's two sources arrive within seconds of each other; a
/// thousand builds ending in that time is far beyond any cluster.
pub const ANNOUNCED_BUILDS: usize = 1024;

/// A pending build as the hub holds it.
pub(super) struct BuildEntry {
    pub build: Build,
    /// The node that runs it; `None` while no node may.
    pub node: Option<String>,
    /// Read for the first time by this update: its queued event is still to be recorded.
    pub fresh: bool,
    /// That it waits for a node was said since it was last placed.
    pub waiting_said: bool,
}

/// Builds whose end was announced, the oldest forgotten first.
#[derive(Default)]
pub(super) struct Announced {
    order: VecDeque<BuildKey>,
    keys: BTreeSet<BuildKey>,
}

impl Announced {
    /// Remembers `key`; false when it was already announced.
    fn insert(&mut self, key: BuildKey) -> bool {
        if !self.keys.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > ANNOUNCED_BUILDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
        true
    }
}

/// Reads where builds ran from a persisted fingerprint (`build <app> <n> <node>` entries), so a
/// restarted Beacon keeps them there while their nodes come back.
pub(super) fn placements_in(fingerprint: &[String]) -> BTreeMap<BuildKey, String> {
    fingerprint
        .iter()
        .filter_map(|entry| {
            let mut parts = entry.strip_prefix("build ")?.splitn(3, ' ');
            let app = parts.next()?;
            let build = parts.next()?.parse().ok()?;
            let node = parts.next()?;
            Some(((app.to_string(), build), node.to_string()))
        })
        .collect()
}

/// The fingerprint entries of the placed builds.
pub(super) fn placement_fingerprint(builds: &BTreeMap<BuildKey, BuildEntry>) -> Vec<String> {
    builds
        .iter()
        .filter_map(|((app, build), entry)| {
            let node = entry.node.as_ref()?;
            Some(format!("build {app} {build} {node}"))
        })
        .collect()
}

fn build_effect(
    kind: EventKind,
    node: Option<&str>,
    app: &str,
    build: u64,
    text: String,
) -> Effect {
    let mut e = effect(kind, node, Some(app), None, text);
    e.draft.build = Some(build);
    e
}

impl Hub {
    /// Takes the pending builds read from the repository. Builds read for the first time are
    /// queued (their event is recorded once placed); on the first read after a start they are
    /// taken silently, where they ran before the restart. Returns the builds that left the
    /// list: they have a result, for the reconciler to read.
    pub(super) fn take_pending(&self, state: &mut State, mut pending: Vec<Build>) -> Vec<BuildKey> {
        if pending.len() > MAX_PENDING_BUILDS {
            tracing::warn!(
                pending = pending.len(),
                kept = MAX_PENDING_BUILDS,
                "the repository lists more pending builds than Beacon holds; placing the oldest"
            );
            pending.sort_by_key(|b| b.created_at.clone());
            pending.truncate(MAX_PENDING_BUILDS);
        }
        let first_read = !state.builds_known;
        state.builds_known = true;
        let mut listed = BTreeSet::new();
        for build in pending {
            let key = (build.app.clone(), build.number);
            listed.insert(key.clone());
            match state.builds.get_mut(&key) {
                Some(entry) => entry.build = build,
                None => {
                    let node = first_read
                        .then(|| state.placement_hints.get(&key).cloned())
                        .flatten();
                    state.builds.insert(
                        key,
                        BuildEntry {
                            build,
                            node,
                            fresh: !first_read,
                            // Before a restart, the previous Beacon said what there was to say.
                            waiting_said: first_read,
                        },
                    );
                }
            }
        }
        state.placement_hints.clear();
        let departed: Vec<BuildKey> = state
            .builds
            .keys()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect();
        for key in &departed {
            state.builds.remove(key);
        }
        departed
    }

    /// Whether a node not seen since Beacon started may still come back for its builds: for
    /// as long as a silent node takes to be lost.
    pub(super) fn absent_may_return(&self, state: &State) -> bool {
        !state.returning_over && self.started.elapsed() <= self.settings.node_lost_after
    }

    /// Decides again where every pending build runs, and records why a build was queued,
    /// moved or waits. Returns whether any build changed node.
    pub(super) fn place_builds(&self, state: &mut State, effects: &mut Vec<Effect>) -> bool {
        if state.builds.is_empty() {
            return false;
        }
        let current: BTreeMap<BuildKey, Option<String>> = state
            .builds
            .iter()
            .map(|(key, entry)| (key.clone(), entry.node.clone()))
            .collect();
        let nodes: Vec<BuildNode<'_>> = state
            .nodes
            .iter()
            .map(|(name, node)| BuildNode {
                name,
                may_build: placement::may_build(&node.labels),
                lost: node.lost,
                linked: node.connected,
                reported: &node.report.builds,
            })
            .collect();
        let placed = placement::place_builds(&current, &nodes, self.absent_may_return(state));
        // Why a build left a node, by node, for the event that says where it went.
        let left: BTreeMap<String, &str> = state
            .nodes
            .iter()
            .map(|(name, n)| {
                let why = if n.lost {
                    "is lost"
                } else {
                    "no longer builds"
                };
                (name.clone(), why)
            })
            .collect();
        let mut moved = false;
        for (key, node) in placed {
            let Some(entry) = state.builds.get_mut(&key) else {
                continue;
            };
            let (app, build) = (&key.0, key.1);
            let before = std::mem::replace(&mut entry.node, node.clone());
            moved |= before != node;
            let fresh = std::mem::take(&mut entry.fresh);
            let text = match (&before, &node) {
                (_, None) if entry.waiting_said => continue,
                (_, None) => {
                    entry.waiting_said = true;
                    placement::no_build_node_message(app, build)
                }
                (_, Some(to)) if fresh => format!("{app} build {build} queued on {to}"),
                (Some(from), Some(to)) if from != to => {
                    let why = left.get(from).copied().unwrap_or("did not come back");
                    format!("{app} build {build} moves to {to}: {from} {why}")
                }
                (None, Some(to)) => format!("{app} build {build} goes to {to}"),
                (Some(_), Some(_)) => continue,
            };
            if node.is_some() {
                entry.waiting_said = false;
            }
            effects.push(build_effect(EventKind::BuildQueued, None, app, build, text));
        }
        moved
    }

    /// The builds `node` should run, as orders in its assignment.
    pub(super) fn build_orders(&self, state: &State, node: &str) -> Vec<BuildOrder> {
        let base = self.settings.repository_url.trim_end_matches('/');
        state
            .builds
            .values()
            .filter(|entry| entry.node.as_deref() == Some(node))
            .map(|entry| {
                let build = &entry.build;
                BuildOrder {
                    app: build.app.clone(),
                    build: build.number,
                    source_url: format!("{base}/v1/bundles/{}", build.source.sha256),
                    source_sha256: build.source.sha256.clone(),
                    source_size: build.source.size,
                    manifest: build.manifest.clone(),
                }
            })
            .collect()
    }

    /// The event a node reported about a build: started, finished or failed. A finished or
    /// failed build the repository's result already announced is not announced again; a
    /// failed one alerts.
    pub(super) fn node_build_event(
        &self,
        state: &mut State,
        node: &str,
        event: &NodeEvent,
    ) -> Option<Effect> {
        let kind = EventKind::from(event.kind);
        let mut e = effect(
            kind,
            Some(node),
            Some(&event.app),
            // A build's events carry 0 for the release until there is one.
            (event.release != 0).then_some(event.release),
            event.message.clone(),
        );
        e.draft.detail = event.detail.clone();
        e.draft.failure = event.failure;
        e.draft.build = event.build;
        let Some(build) = event.build else {
            return Some(e);
        };
        match event.kind {
            NodeEventKind::BuildFinished => {
                if !state.announced.insert((event.app.clone(), build)) {
                    return None;
                }
                // The release the build became, from the node's report when it has it.
                e.draft.release = e.draft.release.or_else(|| {
                    state.nodes.get(node).and_then(|n| {
                        n.report
                            .builds
                            .iter()
                            .find(|b| b.app == event.app && b.build == build)
                            .and_then(|b| b.release)
                    })
                });
            }
            NodeEventKind::BuildFailed => {
                if !state.announced.insert((event.app.clone(), build)) {
                    return None;
                }
                e = e.alert(format!("build_failed:{}:{build}", event.app));
            }
            _ => {}
        }
        Some(e)
    }

    /// Announces the results of builds that left the pending list: made a release, failed
    /// (an alert), or superseded by a newer upload (naming it), unless the node that ran the
    /// build announced its end already.
    pub async fn build_results(&self, builds: Vec<Build>) {
        let changes = {
            let mut state = self.lock();
            let mut effects = Vec::new();
            for build in builds {
                let Some(result) = &build.result else {
                    continue;
                };
                let key = (build.app.clone(), build.number);
                let (app, number) = (&build.app, build.number);
                match result {
                    BuildResult::Superseded { by } => {
                        // Said even after a node's failure: the finish it was refused is not
                        // the app's fault, and `em deploy` waits to say what came first.
                        state.announced.insert(key);
                        effects.push(build_effect(
                            EventKind::DeploySuperseded,
                            None,
                            app,
                            number,
                            format!("{app} build {number} was superseded by {by}"),
                        ));
                    }
                    BuildResult::Succeeded { release } => {
                        if state.announced.insert(key) {
                            let mut e = build_effect(
                                EventKind::BuildFinished,
                                None,
                                app,
                                number,
                                format!("{app} build {number} made v{release}"),
                            );
                            e.draft.release = Some(*release);
                            effects.push(e);
                        }
                    }
                    BuildResult::Failed { reason } => {
                        if state.announced.insert(key) {
                            effects.push(
                                build_effect(
                                    EventKind::BuildFailed,
                                    None,
                                    app,
                                    number,
                                    format!("{app} build {number} failed: {reason}"),
                                )
                                .alert(format!("build_failed:{app}:{number}")),
                            );
                        }
                    }
                }
            }
            Changes::of(&mut state, effects)
        };
        self.finish(changes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_survive_in_the_fingerprint() {
        let fingerprint = vec![
            "shop@3".to_string(),
            "build shop 4 build-1".to_string(),
            "build api 12 node with@odd:name".to_string(),
            "build broken".to_string(),
            "build shop x build-1".to_string(),
        ];
        let hints = placements_in(&fingerprint);
        assert_eq!(
            hints,
            BTreeMap::from([
                (("api".to_string(), 12), "node with@odd:name".to_string()),
                (("shop".to_string(), 4), "build-1".to_string()),
            ])
        );
    }

    #[test]
    fn an_end_is_announced_once_and_old_ones_are_forgotten() {
        let mut announced = Announced::default();
        let key = |n: u64| ("shop".to_string(), n);
        assert!(announced.insert(key(1)));
        assert!(!announced.insert(key(1)));
        for n in 2..=ANNOUNCED_BUILDS as u64 + 1 {
            assert!(announced.insert(key(n)));
        }
        assert_eq!(announced.keys.len(), ANNOUNCED_BUILDS);
        assert!(announced.insert(key(1)), "the oldest was forgotten");
    }
}
