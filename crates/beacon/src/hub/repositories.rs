//! The repository as the hub sees it: whether its API answers (the reconciler says), and the
//! control links repositories open, with their storage figures.

use std::time::SystemTime;

use px_proto::beacon::EventKind;
use px_proto::link::NodeReport;

use super::{Hub, RepositoryEntry, effect};

impl Hub {
    /// The reconciler could not read the desired state; said once until it can again.
    pub fn repository_unreachable(&self, error: &str) {
        let mut state = self.lock();
        if !state.repository_reachable {
            return;
        }
        state.repository_reachable = false;
        drop(state);
        let mut e = effect(
            EventKind::RepositoryUnreachable,
            None,
            None,
            None,
            "repository unreachable; keeping the last known desired state".into(),
        );
        e.draft.detail = Some(error.to_string());
        self.apply(vec![e]);
    }

    pub fn repository_reachable(&self) -> bool {
        self.lock().repository_reachable
    }

    /// A repository linked (`up`), or its link ended.
    pub fn repository_link(&self, name: &str, up: bool) {
        let mut state = self.lock();
        let entry = state
            .repositories
            .entry(name.to_string())
            .or_insert(RepositoryEntry {
                links: 0,
                last_seen_wall: SystemTime::now(),
                disk: None,
            });
        if up {
            entry.links += 1;
        } else {
            entry.links = entry.links.saturating_sub(1);
        }
        entry.last_seen_wall = SystemTime::now();
    }

    /// A repository's heartbeat, with its storage figures when it has them.
    pub fn repository_seen(&self, name: &str, report: &NodeReport) {
        let mut state = self.lock();
        if let Some(entry) = state.repositories.get_mut(name) {
            entry.last_seen_wall = SystemTime::now();
            if report.disk.is_some() {
                entry.disk = report.disk;
            }
        }
    }
}
