//! Release phases (docs/src/design/processes.md, "The release phase"): the releases whose phase
//! has not ended, read from the repository; which node runs each; and the phase orders in that
//! node's assignment. Per app only the oldest unended phase is placed, so two migrations of
//! one app never run at once. A placed phase stays on its node, which the generation's
//! fingerprint records (`phase <app> <version> <node>`), so neither a reconnect nor a Beacon
//! restart moves it; it moves only when its node is lost or may no longer run the app, and
//! the node it moves to finds the claim of the lost one and fails the phase instead of running
//! it twice.

use std::collections::BTreeMap;

use px_proto::api::Release;
use px_proto::link::PhaseOrder;

use super::{Hub, State};
use crate::placement::{Fit, places};

/// Most unended phases Beacon holds: the repository lists at most a few per app, so this is
/// thousands of apps deploying at once, while a repository gone wrong cannot make Beacon hold
/// without bound.
pub const MAX_UNENDED_PHASES: usize = 10_000;

/// An app and a release number.
pub(crate) type PhaseKey = (String, u64);

/// An unended phase as the hub holds it.
pub(super) struct PhaseEntry {
    pub release: Release,
    /// The node that runs it; `None` while it waits (an older phase of the app runs, or no
    /// node may run the app).
    pub node: Option<String>,
}

/// A node as phase placement sees it.
pub(crate) struct PhaseNode<'a> {
    pub name: &'a str,
    pub fit: Fit<'a>,
    /// Silent past the deadline, or not linked now.
    pub unavailable: bool,
    /// It runs instances of the app: preferred, it has the app's runtime and neighbours.
    pub runs_app: bool,
}

/// Where the phase of `release` runs: where it runs already while that node may still run it
/// (or, just after a restart, may still come back); otherwise the first available node that
/// may run the release, preferring one that runs the app.
pub(crate) fn place_phase(
    release: &Release,
    current: Option<&str>,
    nodes: &[PhaseNode<'_>],
    absent_may_return: bool,
) -> Option<String> {
    if let Some(current) = current {
        match nodes.iter().find(|n| n.name == current) {
            Some(node) if !node.unavailable && places(release, &node.fit) => {
                return Some(current.to_string());
            }
            None if absent_may_return => return Some(current.to_string()),
            _ => {}
        }
    }
    let eligible = nodes
        .iter()
        .filter(|n| !n.unavailable && places(release, &n.fit));
    let preferred = eligible.clone().find(|n| n.runs_app);
    preferred
        .or_else(|| eligible.clone().next())
        .map(|n| n.name.to_string())
}

/// Reads where phases ran from a persisted fingerprint (`phase <app> <n> <node>` entries).
pub(super) fn placements_in(fingerprint: &[String]) -> BTreeMap<PhaseKey, String> {
    fingerprint
        .iter()
        .filter_map(|entry| {
            let mut parts = entry.strip_prefix("phase ")?.splitn(3, ' ');
            let app = parts.next()?;
            let version = parts.next()?.parse().ok()?;
            let node = parts.next()?;
            Some(((app.to_string(), version), node.to_string()))
        })
        .collect()
}

/// The fingerprint entries of the placed phases.
pub(super) fn fingerprint(phases: &BTreeMap<PhaseKey, PhaseEntry>) -> Vec<String> {
    phases
        .iter()
        .filter_map(|((app, version), entry)| {
            let node = entry.node.as_ref()?;
            Some(format!("phase {app} {version} {node}"))
        })
        .collect()
}

impl Hub {
    /// Takes the unended phases read from the repository (`None`: they could not be read, keep
    /// the last known ones) and places them; a change of where phases run is a new generation.
    pub async fn set_phases(&self, phases: Option<Vec<Release>>) {
        let Some(mut phases) = phases else {
            return;
        };
        if phases.len() > MAX_UNENDED_PHASES {
            tracing::warn!(
                unended = phases.len(),
                kept = MAX_UNENDED_PHASES,
                "the repository lists more unended release phases than Beacon holds; placing the first"
            );
            phases.truncate(MAX_UNENDED_PHASES);
        }
        self.update(|hub, state, _effects| {
            let changed = hub.take_phases(state, phases);
            if changed {
                Self::renumber(state);
            }
            ((), changed)
        })
        .await;
    }

    fn take_phases(&self, state: &mut State, phases: Vec<Release>) -> bool {
        let before = fingerprint(&state.phases);
        let first_read = !state.phases_known;
        state.phases_known = true;
        let mut taken = BTreeMap::new();
        for release in phases {
            if release.phase.is_none() {
                continue;
            }
            let key = (release.app.clone(), release.version);
            let node = match state.phases.remove(&key) {
                Some(entry) => entry.node,
                None if first_read => state.phase_hints.get(&key).cloned(),
                None => None,
            };
            taken.insert(key, PhaseEntry { release, node });
        }
        state.phase_hints.clear();
        state.phases = taken;
        self.place_phases(state);
        before != fingerprint(&state.phases)
    }

    /// Places each app's oldest unended phase; the others wait for it.
    pub(super) fn place_phases(&self, state: &mut State) {
        let absent_may_return = self.absent_may_return(state);
        let nodes: Vec<PhaseNode<'_>> = state
            .nodes
            .iter()
            .map(|(name, node)| PhaseNode {
                name,
                fit: node.fit(),
                unavailable: node.lost || !node.connected,
                runs_app: false,
            })
            .collect();
        let mut placed: BTreeMap<PhaseKey, Option<String>> = BTreeMap::new();
        let mut app_seen = std::collections::BTreeSet::new();
        for (key, entry) in &state.phases {
            if !app_seen.insert(key.0.clone()) {
                placed.insert(key.clone(), None);
                continue;
            }
            let runs: Vec<PhaseNode<'_>> = nodes
                .iter()
                .map(|n| PhaseNode {
                    name: n.name,
                    fit: n.fit,
                    unavailable: n.unavailable,
                    runs_app: n
                        .fit
                        .report
                        .is_some_and(|r| r.instances.iter().any(|i| i.app == key.0)),
                })
                .collect();
            let node = place_phase(
                &entry.release,
                entry.node.as_deref(),
                &runs,
                absent_may_return,
            );
            if node != entry.node {
                match (&entry.node, &node) {
                    (Some(from), Some(to)) => {
                        tracing::warn!(app = %key.0, version = key.1, %from, %to, "release phase moves: its node is lost or may no longer run the app")
                    }
                    (None, Some(to)) => {
                        tracing::info!(app = %key.0, version = key.1, %to, "release phase placed")
                    }
                    (_, None) => {
                        tracing::warn!(app = %key.0, version = key.1, "no node may run the release phase now")
                    }
                }
            }
            placed.insert(key.clone(), node);
        }
        for (key, node) in placed {
            if let Some(entry) = state.phases.get_mut(&key) {
                entry.node = node;
            }
        }
    }

    /// The phases `node` should run, as orders in its assignment.
    pub(super) fn phase_orders(&self, state: &State, node: &str) -> Vec<PhaseOrder> {
        state
            .phases
            .values()
            .filter(|entry| entry.node.as_deref() == Some(node))
            .filter_map(|entry| {
                let phase = entry.release.phase.as_ref()?;
                Some(PhaseOrder {
                    release: self.app_assignment(&entry.release, state),
                    command: phase.command.clone(),
                    timeout_secs: phase.timeout_secs,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{map, release};

    fn node<'a>(
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        unavailable: bool,
        runs_app: bool,
    ) -> PhaseNode<'a> {
        PhaseNode {
            name,
            fit: Fit {
                labels,
                runtimes: Fit::BARE.runtimes,
                report: None,
            },
            unavailable,
            runs_app,
        }
    }

    #[test]
    fn phase_placement_rules() {
        let none = map(&[]);
        let eu = map(&[("region", "eu")]);
        let plain = release("shop", 2, "");
        let in_eu = release("shop", 2, "[placement]\nlabels = { region = \"eu\" }");
        // A node that runs the app is preferred over the first one.
        let nodes = [
            node("a", &none, false, false),
            node("b", &none, false, true),
        ];
        assert_eq!(
            place_phase(&plain, None, &nodes, false).as_deref(),
            Some("b")
        );
        // A placed phase stays, even where another node runs the app.
        assert_eq!(
            place_phase(&plain, Some("a"), &nodes, false).as_deref(),
            Some("a")
        );
        // Its node lost: it moves.
        let lost = [
            node("a", &none, true, false),
            node("b", &none, false, false),
        ];
        assert_eq!(
            place_phase(&plain, Some("a"), &lost, false).as_deref(),
            Some("b")
        );
        // Its node not back yet after a restart: it waits for it while it may return.
        let absent = [node("b", &none, false, false)];
        assert_eq!(
            place_phase(&plain, Some("a"), &absent, true).as_deref(),
            Some("a")
        );
        assert_eq!(
            place_phase(&plain, Some("a"), &absent, false).as_deref(),
            Some("b")
        );
        // Placement labels decide which nodes may run it.
        let labelled = [node("a", &none, false, true), node("b", &eu, false, false)];
        assert_eq!(
            place_phase(&in_eu, None, &labelled, false).as_deref(),
            Some("b")
        );
        let nowhere = [node("a", &none, false, true)];
        assert_eq!(place_phase(&in_eu, None, &nowhere, false), None);
    }
}
