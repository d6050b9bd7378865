//! What a node may report on: the apps, phases and builds of the assignment Beacon gave it,
//! and those that left it within [`REPORT_GRACE`]. Reports, events and log lines about
//! anything else are dropped, counted in `beacon_reports_dropped_total`, and logged at most
//! once per [`DROP_LOG_INTERVAL`] per node, so a node (or a stolen token) cannot speak for
//! another node's apps, and a flood of them cannot flood the log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use px_proto::link::{Assignment, LogBatch, LogStream, NodeEvent, NodeReport};

use super::{Hub, NodeEntry, State};
use crate::metrics::Metrics;

/// How long a node may still report on an app or build after it left its assignment: the node
/// drains and stops the app's instances (its `drain_deadline` and `stop_grace`, a minute or
/// two at most), and their last events and log lines follow; ten minutes covers a slow one.
pub const REPORT_GRACE: Duration = Duration::from_secs(600);
/// At most one log line per node per this long about what it reported out of its scope.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One thing a node may report on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// An app it runs, or whose release phase it runs.
    App(String),
    /// A build it runs.
    Build(String, u64),
}

/// A node's scope, refreshed from its latest assignment when that changes.
#[derive(Default)]
pub(super) struct Scope {
    /// The generation `current` was taken from; `None` before the first assignment.
    generation: Option<u64>,
    /// Sorted, without repeats. A slice, not a set: an assignment names a few apps, and a
    /// set's first map node alone (room for eleven keys) cost every node over 300 bytes.
    current: Box<[Key]>,
    /// What left the assignment, and when. Entries go after [`REPORT_GRACE`], so this holds
    /// at most what the assignments of the last ten minutes held.
    departed: BTreeMap<Key, Instant>,
    /// Dropped since the last log line, and when that line was written.
    dropped: u64,
    logged: Option<Instant>,
}

impl Scope {
    /// Takes in `assignment`, the node's for `generation`, unless `current` already reflects
    /// that generation; forgets what departed longer than [`REPORT_GRACE`] ago.
    pub(super) fn refresh(&mut self, assignment: Option<&Assignment>, now: Instant) {
        self.departed
            .retain(|_, left| now.duration_since(*left) < REPORT_GRACE);
        let Some(assignment) = assignment else {
            return;
        };
        if self.generation == Some(assignment.generation) {
            return;
        }
        let mut next: Vec<Key> = assignment
            .apps
            .iter()
            .map(|a| Key::App(a.app.clone()))
            .chain(
                assignment
                    .phases
                    .iter()
                    .map(|p| Key::App(p.release.app.clone())),
            )
            .chain(
                assignment
                    .builds
                    .iter()
                    .map(|b| Key::Build(b.app.clone(), b.build)),
            )
            .collect();
        next.sort();
        next.dedup();
        for gone in self
            .current
            .iter()
            .filter(|k| next.binary_search(k).is_err())
        {
            self.departed.insert(gone.clone(), now);
        }
        for back in &next {
            self.departed.remove(back);
        }
        self.current = next.into_boxed_slice();
        self.generation = Some(assignment.generation);
    }

    fn holds(&self, key: &Key) -> bool {
        self.current.binary_search(key).is_ok() || self.departed.contains_key(key)
    }

    /// Whether the scope holds `app`. Asked for every instance of every heartbeat, so the
    /// current apps are searched by `&str`, with no key built (`Key::App` sorts before every
    /// `Key::Build`).
    fn app(&self, app: &str) -> bool {
        let current = self.current.binary_search_by(|key| match key {
            Key::App(held) => held.as_str().cmp(app),
            Key::Build(..) => std::cmp::Ordering::Greater,
        });
        current.is_ok()
            || (!self.departed.is_empty() && self.departed.contains_key(&Key::App(app.to_string())))
    }

    /// Whether this scope reflects the assignment of `generation`.
    pub(super) fn is_of(&self, generation: u64) -> bool {
        self.generation == Some(generation)
    }

    fn build(&self, app: &str, build: u64) -> bool {
        self.holds(&Key::Build(app.to_string(), build))
    }

    /// Keeps what `report` says about this scope; the rest is counted and logged as dropped.
    pub(super) fn keep_own_report(
        &mut self,
        node: &str,
        report: &mut NodeReport,
        metrics: &Metrics,
        now: Instant,
    ) {
        let dropped = self.keep_report(report);
        self.note_dropped(node, dropped, "instances, figures or builds", now);
        metrics.reports_dropped.add(dropped as u64);
    }

    /// Keeps what `report` says about this scope; returns how many entries went.
    fn keep_report(&self, report: &mut NodeReport) -> usize {
        let before = report.instances.len() + report.rollouts.len() + report.builds.len();
        report.instances.retain(|i| self.app(&i.app));
        report.rollouts.retain(|f| self.app(&f.app));
        report.builds.retain(|b| self.build(&b.app, b.build));
        before - (report.instances.len() + report.rollouts.len() + report.builds.len())
    }

    /// Whether `event` is about this scope: a build's event about its build, any other about
    /// its app.
    fn event(&self, event: &NodeEvent) -> bool {
        match event.build {
            Some(build) => self.build(&event.app, build),
            None => self.app(&event.app),
        }
    }

    /// Keeps the lines of `batch` about this scope; returns how many went.
    fn keep_logs(&self, batch: &mut LogBatch) -> usize {
        let before = batch.lines.len();
        // Only build output names a build (as the log store reads it); other lines are the
        // app's.
        batch.lines.retain(
            |line| match line.build.filter(|_| line.stream == LogStream::Build) {
                Some(build) => self.build(&line.app, build),
                None => self.app(&line.app),
            },
        );
        before - batch.lines.len()
    }

    /// Counts `dropped` entries, and says so in the log unless it did within
    /// [`DROP_LOG_INTERVAL`].
    fn note_dropped(&mut self, node: &str, dropped: usize, what: &str, now: Instant) {
        if dropped == 0 {
            return;
        }
        self.dropped += dropped as u64;
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < DROP_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            %node,
            dropped = self.dropped,
            last = what,
            "dropped what a node reported about apps or builds not assigned to it"
        );
        self.dropped = 0;
        self.logged = Some(now);
    }
}

impl Hub {
    /// `node`'s scope (its link `conn`), brought up to the current generation: what it was
    /// assigned is computed once per generation, as the assignment it is (or would be) sent.
    /// `None` if the link was replaced, or while Beacon has not read the desired state since
    /// it started: it cannot tell then what a node runs, and keeps reports whole until its
    /// first read (seconds), after which every heartbeat is held to the scope.
    fn scope_now<'a>(
        &self,
        state: &'a mut State,
        node: &str,
        conn: u64,
        now: Instant,
    ) -> Option<&'a mut Scope> {
        let entry = state.nodes.get(node).filter(|n| n.conn == conn)?;
        if !state.desired_known {
            return None;
        }
        let fresh = self.scope_assignment(state, node, entry);
        let entry = state.nodes.get_mut(node)?;
        entry.scope.refresh(fresh.as_ref(), now);
        Some(&mut entry.scope)
    }

    /// The assignment `node`'s scope is to be taken from, if its scope (in `entry`, its
    /// record) is behind the current generation: once per generation per node. The caller
    /// checks that Beacon has read the desired state.
    pub(super) fn scope_assignment(
        &self,
        state: &State,
        node: &str,
        entry: &NodeEntry,
    ) -> Option<Assignment> {
        (!entry.scope.is_of(state.persisted.generation))
            .then(|| self.assignment_for(state, node, &entry.fit()))
    }

    /// Leaves in `report` only what concerns `node`'s scope.
    pub(super) fn keep_own_report(
        &self,
        state: &mut State,
        node: &str,
        conn: u64,
        report: &mut NodeReport,
    ) {
        let now = Instant::now();
        if let Some(scope) = self.scope_now(state, node, conn, now) {
            scope.keep_own_report(node, report, &self.metrics, now);
        }
    }

    /// Whether `event` from `node` (its link `conn`) concerns its scope; counted if not.
    pub fn own_event(&self, node: &str, conn: u64, event: &NodeEvent) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let Some(scope) = self.scope_now(&mut state, node, conn, now) else {
            return state.nodes.get(node).is_some_and(|n| n.conn == conn);
        };
        if scope.event(event) {
            return true;
        }
        scope.note_dropped(node, 1, "an event", now);
        self.metrics.reports_dropped.inc();
        false
    }

    /// Leaves in `batch` only the lines about `node`'s scope.
    pub fn keep_own_logs(&self, node: &str, conn: u64, batch: &mut LogBatch) {
        let mut state = self.lock();
        let now = Instant::now();
        if let Some(scope) = self.scope_now(&mut state, node, conn, now) {
            let dropped = scope.keep_logs(batch);
            scope.note_dropped(node, dropped, "log lines", now);
            self.metrics.reports_dropped.add(dropped as u64);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::link::AppAssignment;

    fn assignment(generation: u64, apps: &[&str]) -> Assignment {
        let app = |name: &&str| AppAssignment {
            app: name.to_string(),
            release: 1,
            bundle_sha256: String::new(),
            bundle_size: 0,
            bundle_url: String::new(),
            manifest: px_proto::manifest::AppManifest::parse(&format!(
                "name = \"{name}\"\nrun = \"python3 server.py\"\n"
            ))
            .unwrap(),
            env: Default::default(),
            instances: 1,
            domains: Vec::new(),
            build: None,
            processes: Default::default(),
            app_created_at: None,
            bundle_unpacked_size: None,
        };
        Assignment {
            generation,
            apps: apps.iter().map(app).collect(),
            builds: Vec::new(),
            phases: Vec::new(),
        }
    }

    #[test]
    fn an_app_that_left_the_assignment_is_heard_for_the_grace_then_not() {
        let start = Instant::now();
        let mut scope = Scope::default();
        scope.refresh(None, start);
        assert!(!scope.app("a"), "nothing before the first assignment");
        scope.refresh(Some(&assignment(1, &["a", "b"])), start);
        assert!(scope.app("a") && scope.app("b") && !scope.app("c"));
        scope.refresh(Some(&assignment(2, &["b"])), start);
        assert!(scope.app("a"), "a departed app is heard during the grace");
        scope.refresh(Some(&assignment(2, &["b"])), start + REPORT_GRACE);
        assert!(!scope.app("a"), "and not after it");
        assert!(scope.departed.is_empty());
        assert!(scope.app("b"));
    }

    #[test]
    fn a_build_of_an_app_does_not_put_the_app_itself_in_scope() {
        let now = Instant::now();
        let mut only_build = assignment(2, &[]);
        let manifest = assignment(2, &["a"]).apps.remove(0).manifest;
        only_build.builds.push(px_proto::build::BuildOrder {
            app: "a".into(),
            build: 7,
            source_url: String::new(),
            source_sha256: String::new(),
            source_size: 0,
            manifest,
        });
        let mut scope = Scope::default();
        scope.refresh(Some(&assignment(1, &["b", "d"])), now);
        assert!(scope.app("b") && scope.app("d"));
        assert!(!scope.app("a") && !scope.app("c") && !scope.app("e"));
        scope.refresh(Some(&only_build), now);
        assert!(scope.build("a", 7) && !scope.build("a", 8));
        assert!(!scope.app("a"), "building an app is not running it");
        assert!(scope.app("b"), "b departed and is heard for the grace");
    }
}
