//! Process types (docs/src/design/processes.md): the formation (the counts set with `em scale`
//! over the defaults: one process of every non-web type of each desired release, across the
//! cluster), where each process runs (decided
//! by `crate::placement::place_processes`), and the numbers each node's assignment carries.
//! Where processes run is part of the persisted generation's fingerprint, so a process that
//! moves is a new generation and a restarted Beacon leaves processes where they were.

use std::collections::BTreeMap;

use super::{Hub, State};
use crate::placement::{self, ProcessKey, ProcessNode, ProcessPlacement, places};

/// Reads where processes ran from a persisted fingerprint (`process <app> <type> <n> <node>`
/// entries), so a restarted Beacon keeps them there while their nodes come back.
pub(super) fn placed_in(fingerprint: &[String]) -> ProcessPlacement {
    let mut placed = ProcessPlacement::new();
    for entry in fingerprint {
        let Some(rest) = entry.strip_prefix("process ") else {
            continue;
        };
        let mut parts = rest.splitn(4, ' ');
        let (Some(app), Some(kind), Some(number), Some(node)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(number) = number.parse() else {
            continue;
        };
        placed
            .entry((app.to_string(), kind.to_string()))
            .or_default()
            .insert(number, node.to_string());
    }
    placed
}

/// The fingerprint entries of the placed processes.
pub(super) fn fingerprint(placed: &ProcessPlacement) -> Vec<String> {
    placed
        .iter()
        .flat_map(|((app, kind), numbers)| {
            numbers
                .iter()
                .map(move |(number, node)| format!("process {app} {kind} {number} {node}"))
        })
        .collect()
}

/// The fingerprint entries of the web counts set with `em scale` for desired apps: a new web
/// count is a new assignment, though nothing moves.
pub(super) fn web_fingerprint(state: &State) -> Vec<String> {
    state
        .formations
        .iter()
        .filter(|(app, _)| state.desired.contains_key(*app))
        .filter_map(|(app, counts)| {
            let web = counts.get(px_proto::procfile::WEB_PROCESS)?;
            Some(format!("web {app} {web}"))
        })
        .collect()
}

impl Hub {
    /// How many processes of each non-web type the desired releases want in total: the
    /// formation's count, else one (`px_proto::process::formation`).
    fn wanted_processes(state: &State) -> BTreeMap<ProcessKey, u32> {
        let none = BTreeMap::new();
        state
            .desired
            .values()
            .flat_map(|release| {
                let explicit = state.formations.get(&release.app).unwrap_or(&none);
                px_proto::process::formation(&release.manifest, explicit)
                    .into_iter()
                    .filter(|(kind, _)| px_proto::process::runs_as_process(kind))
                    .map(|(kind, count)| ((release.app.clone(), kind), count))
            })
            .collect()
    }

    /// Decides again where every process runs; returns whether any moved, started or stopped
    /// (the caller then numbers a new generation).
    pub(super) fn place_processes(&self, state: &mut State) -> bool {
        let wanted = Self::wanted_processes(state);
        if wanted.is_empty() && state.processes.is_empty() {
            return false;
        }
        let nodes: Vec<ProcessNode<'_>> = state
            .nodes
            .iter()
            .map(|(name, node)| {
                let fit = node.fit();
                ProcessNode {
                    name,
                    lost: node.lost,
                    linked: node.connected,
                    apps: state
                        .desired
                        .values()
                        .filter(|r| places(r, &fit))
                        .map(|r| r.app.as_str())
                        .collect(),
                }
            })
            .collect();
        let placed = placement::place_processes(
            &state.processes,
            &wanted,
            &nodes,
            self.absent_may_return(state),
        );
        let waiting = wanted.values().sum::<u32>() as usize
            > placed.values().map(BTreeMap::len).sum::<usize>();
        if waiting {
            tracing::warn!("a process of a non-web type waits for a node that may run its app");
        }
        let moved = placed != state.processes;
        state.processes = placed;
        moved
    }

    /// Whether a process waits for a node, or sits on `node`: a node that attaches may then
    /// change where processes run.
    pub(super) fn processes_may_move(state: &State, node: &str) -> bool {
        let wanted: u32 = Self::wanted_processes(state).values().sum();
        let placed: usize = state.processes.values().map(BTreeMap::len).sum();
        wanted as usize != placed
            || state
                .processes
                .values()
                .any(|numbers| numbers.values().any(|n| n == node))
    }

    /// Whether a process sits on a node for which `gone` holds.
    pub(super) fn processes_on(state: &State, gone: &dyn Fn(&str) -> bool) -> bool {
        state
            .processes
            .values()
            .any(|numbers| numbers.values().any(|n| gone(n)))
    }

    /// The processes `node` runs of `app`: per type, the numbers placed there.
    pub(super) fn processes_for(
        state: &State,
        app: &str,
        node: &str,
    ) -> BTreeMap<String, Vec<u32>> {
        state
            .processes
            .iter()
            .filter(|((a, _), _)| a == app)
            .filter_map(|((_, kind), numbers)| {
                let here: Vec<u32> = numbers
                    .iter()
                    .filter(|(_, n)| n.as_str() == node)
                    .map(|(number, _)| *number)
                    .collect();
                (!here.is_empty()).then(|| (kind.clone(), here))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_survive_in_the_fingerprint() {
        let mut placed = ProcessPlacement::new();
        placed
            .entry(("shop".into(), "worker".into()))
            .or_default()
            .extend([
                (1, "web-1".to_string()),
                (2, "node with spaces".to_string()),
            ]);
        placed
            .entry(("shop".into(), "clock".into()))
            .or_default()
            .insert(1, "web-2".into());
        let mut entries = fingerprint(&placed);
        assert!(entries.contains(&"process shop worker 2 node with spaces".to_string()));
        // Other entries of the fingerprint are not processes.
        entries.push("shop@3".into());
        entries.push("build shop 4 web-1".into());
        entries.push("process shop worker notanumber web-1".into());
        assert_eq!(placed_in(&entries), placed);
    }
}
