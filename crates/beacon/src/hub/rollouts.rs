//! Rollout tracking: each app's rollout is evaluated against the nodes' reports (through
//! `crate::judge`), and what the verdicts say is applied here: the rollout's state, metrics,
//! events and alerts, rollback orders for the repository, and the history kept on disk.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use px_proto::api::{Release, ReleaseCause};
use px_proto::beacon::{EventKind, RolloutRecord, RolloutState};
use px_proto::link::{DeployFigures, RollbackOrder};
use tokio::sync::watch;

use super::persist::{HistorySnapshot, MAX_ROLLOUT_HISTORY};
use super::{Effect, Hub, Rollout, State, effect};
use crate::judge::{self, Judging, Step, Verdict};
use crate::placement::{self, Candidate};

impl Rollout {
    pub(super) fn new(release: u64, previous: Option<u64>) -> Self {
        Self {
            release,
            previous,
            state: RolloutState::RollingOut,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            seconds: None,
            healthy: BTreeSet::new(),
            eligible: 0,
            figures: DeployFigures::default(),
            verified: false,
            outcome: None,
        }
    }

    fn judged(&self) -> bool {
        self.outcome.is_some()
    }

    pub(super) fn record(&self, release: &Release) -> RolloutRecord {
        RolloutRecord {
            release: self.release,
            previous: self.previous,
            state: self.state,
            started_at: humantime::format_rfc3339_seconds(self.started_wall).to_string(),
            rollout_seconds: self.seconds,
            figures: self.figures,
            watch_seconds: release.manifest.deploy.watch.as_secs(),
            max_error_rate: release.manifest.deploy.max_error_rate,
            verified: self.verified,
            outcome: self.outcome.clone(),
        }
    }
}

impl Hub {
    /// Nodes that should run `release`: not lost, and admitted by its placement.
    pub(super) fn eligible<'a>(
        state: &'a State,
        release: &'a Release,
    ) -> impl Iterator<Item = &'a String> + 'a {
        state
            .nodes
            .iter()
            .filter(move |(_, n)| !n.lost && placement::places(release, &n.fit()))
            .map(|(name, _)| name)
    }

    /// Looks at where the app's rollout stands now: which eligible nodes run it healthy,
    /// whether it finished or has no node to run on, then judges its figures.
    pub(super) fn evaluate_rollout(&self, state: &mut State, app: &str) -> Vec<Effect> {
        let Some(release) = state.desired.get(app) else {
            return Vec::new();
        };
        let version = release.version;
        let eligible: Vec<String> = Self::eligible(state, release).cloned().collect();
        let healthy: BTreeSet<String> = eligible
            .iter()
            .filter(|name| {
                state
                    .nodes
                    .get(*name)
                    .is_some_and(|n| judge::runs_healthy(&n.report, app, version, Some(release)))
            })
            .cloned()
            .collect();
        let Some(rollout) = state.rollouts.get_mut(app) else {
            return Vec::new();
        };
        rollout.healthy = healthy;
        rollout.eligible = eligible.len();
        let mut effects = Vec::new();
        let mut newly_unplaced = false;
        match judge::step(rollout.state, eligible.len(), rollout.healthy.len()) {
            Step::Unplaced { newly } => {
                newly_unplaced = newly;
                rollout.state = RolloutState::Unplaced;
            }
            Step::RolledOut => {
                let seconds = rollout.started.elapsed().as_secs_f64();
                rollout.state = RolloutState::RolledOut;
                rollout.seconds = Some(seconds);
                self.metrics.rollouts_finished.inc();
                self.metrics.rollout_seconds_total.add_f64(seconds);
                effects.push(effect(
                    EventKind::DeployFinished,
                    None,
                    Some(app),
                    Some(version),
                    judge::rolled_out_message(app, version, eligible.len(), seconds),
                ));
                // Kept now, not only once judged: a Beacon that takes over (or restarts)
                // within the watch knows the release rolled out, and does not say so again.
                Self::remember(state, app, version);
            }
            Step::RollingOut => rollout.state = RolloutState::RollingOut,
            Step::Settled => {}
        }
        if newly_unplaced && !state.nodes.is_empty() {
            effects.push(Self::unplaced_event(state, app));
        }
        effects.extend(self.judge(state, app));
        effects
    }

    /// Sums the nodes' figures for the app's rollout and has them judged, then applies the
    /// verdict: a rollback order for the repository, the rollout's new state, its event and
    /// alert, and its record in the history. Judged once.
    fn judge(&self, state: &mut State, app: &str) -> Vec<Effect> {
        let Some(release) = state.desired.get(app) else {
            return Vec::new();
        };
        let version = release.version;
        let eligible: BTreeSet<&str> = Self::eligible(state, release).map(String::as_str).collect();
        let (figures, done) = judge::sum_figures(
            state
                .nodes
                .iter()
                .map(|(name, n)| (name.as_str(), &n.report)),
            app,
            version,
        );
        let watched = eligible.intersection(&done).count();
        let eligible = eligible.len();
        let is_rollback = matches!(release.cause, ReleaseCause::Rollback { .. });
        let max_error_rate = release.manifest.deploy.max_error_rate;
        let watch_seconds = release.manifest.deploy.watch.as_secs();
        let Some(rollout) = state.rollouts.get_mut(app).filter(|r| r.release == version) else {
            return Vec::new();
        };
        if rollout.judged() {
            return Vec::new();
        }
        rollout.figures = figures;
        let verdict = judge::judge(&Judging {
            app,
            release: version,
            previous: rollout.previous,
            is_rollback,
            max_error_rate,
            watch_seconds,
            state: rollout.state,
            judged: false,
            figures,
            eligible,
            watched,
        });
        let Some(verdict) = verdict else {
            return Vec::new();
        };
        if let Some(next) = verdict.state() {
            rollout.state = next;
        }
        if let Verdict::Verified { .. } = verdict {
            rollout.verified = true;
        }
        rollout.outcome = Some(verdict.outcome().to_string());
        let mut e = effect(
            verdict.event_kind(),
            None,
            Some(app),
            Some(version),
            verdict.outcome().to_string(),
        );
        e.draft.detail = verdict.detail().map(str::to_string);
        if let Some(key) = verdict.alert_key(app, version) {
            e = e.alert(key);
        }
        if let Verdict::RolledBack { order, .. } = verdict {
            self.metrics.rollbacks_ordered.inc();
            state.rollbacks.insert(app.to_string(), order);
            self.publish_rollbacks(state);
        }
        Self::remember(state, app, version);
        vec![e]
    }

    /// Records the app's rollout of `version` in its history (replacing an older record of
    /// the same release); the history file is written once the lock is released.
    pub(super) fn remember(state: &mut State, app: &str, version: u64) {
        let Some(record) = state
            .rollouts
            .get(app)
            .filter(|r| r.release == version)
            .zip(state.desired.get(app))
            .map(|(rollout, release)| rollout.record(release))
        else {
            return;
        };
        let history = state.history.entry(app.to_string()).or_default();
        history.retain(|r| r.release != version);
        history.push_front(record);
        history
            .make_contiguous()
            .sort_by_key(|r| std::cmp::Reverse(r.release));
        history.truncate(MAX_ROLLOUT_HISTORY);
        let records = history.iter().cloned().collect();
        state.history_seq += 1;
        let snapshot = HistorySnapshot {
            app: app.to_string(),
            seq: state.history_seq,
            records,
        };
        state.unwritten.insert(app.to_string(), snapshot);
    }

    pub(super) fn publish_rollbacks(&self, state: &State) {
        self.rollback_orders
            .send_replace(Arc::new(state.rollbacks.values().cloned().collect()));
    }

    /// The rollbacks to ask of the repository, for its links to follow.
    pub fn rollback_orders(&self) -> watch::Receiver<Arc<Vec<RollbackOrder>>> {
        self.rollback_orders.subscribe()
    }

    /// The `deploy_failed` event of a release no node can run, naming what each node lacks,
    /// so `em deploy` can stop waiting and tell the user.
    fn unplaced_event(state: &State, app: &str) -> Effect {
        let Some(release) = state.desired.get(app) else {
            return effect(
                EventKind::DeployFailed,
                None,
                Some(app),
                None,
                String::new(),
            );
        };
        let nodes = state.nodes.iter().map(|(name, node)| Candidate {
            name,
            lost: node.lost,
            fit: node.fit(),
        });
        effect(
            EventKind::DeployFailed,
            None,
            Some(app),
            Some(release.version),
            placement::unplaced_message(release, nodes),
        )
        .alert(format!("deploy_failed:{app}:{}", release.version))
    }
}
