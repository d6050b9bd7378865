//! Rollout arithmetic: how far a rollout got (no eligible node, every one healthy, not yet),
//! and the verdict on a release's figures (over its error budget → rolled back or failed; every
//! node's watch over → verified). Pure functions over plain data returning what happened, with
//! the sentences people read; the hub applies them (state, metrics, events, alerts, rollback
//! orders, history).

use std::collections::BTreeSet;

use px_proto::api::Release;
use px_proto::beacon::{EventKind, RolloutState};
use px_proto::link::{DeployFigures, InstanceState, NodeReport, RollbackOrder};
use px_proto::rate::Rate;

/// Fewest answers of a new release before its error rate is judged, so one unlucky request
/// out of two is not a 50% error rate.
pub const MIN_JUDGED_REQUESTS: u64 = 10;

/// Whether a report shows `app` at `release` with all its instances healthy (as many as the
/// desired release asks for; one when it is not known).
pub fn runs_healthy(
    report: &NodeReport,
    app: &str,
    release: u64,
    desired: Option<&Release>,
) -> bool {
    let wanted = desired.map_or(1, |r| r.manifest.instances as usize);
    report
        .instances
        .iter()
        // Only web instances are health-checked; a worker says nothing of the rollout.
        .filter(|i| {
            i.is_web() && i.app == app && i.release == release && i.state == InstanceState::Healthy
        })
        .count()
        >= wanted
}

/// Where a rollout goes from `state`, given how many nodes should run the release and how
/// many of them run it healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No node can run it; `newly` when it was rolling out until now (say so once).
    Unplaced { newly: bool },
    /// Every eligible node runs it healthy.
    RolledOut,
    /// Some eligible nodes do not run it healthy yet.
    RollingOut,
    /// The rollout is over (rolled out, failed or rolled back): node changes do not move it.
    Settled,
}

pub fn step(state: RolloutState, eligible: usize, healthy: usize) -> Step {
    match state {
        RolloutState::RollingOut | RolloutState::Unplaced => {
            if eligible == 0 {
                Step::Unplaced {
                    newly: state == RolloutState::RollingOut,
                }
            } else if healthy == eligible {
                Step::RolledOut
            } else {
                Step::RollingOut
            }
        }
        RolloutState::RolledOut | RolloutState::Failed | RolloutState::RolledBack => Step::Settled,
    }
}

/// The `deploy_finished` sentence.
pub fn rolled_out_message(app: &str, version: u64, nodes: usize, seconds: f64) -> String {
    format!("{app} v{version} rolled out to {nodes} node(s) in {seconds:.1}s")
}

/// The figures every node reported for its switch to `release` of `app`, summed, and the
/// nodes whose watch of it is over.
pub fn sum_figures<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a NodeReport)>,
    app: &str,
    release: u64,
) -> (DeployFigures, BTreeSet<&'a str>) {
    let mut sum = DeployFigures::default();
    let mut done = BTreeSet::new();
    for (name, report) in nodes {
        for f in report
            .rollouts
            .iter()
            .filter(|f| f.app == app && f.release == release)
        {
            sum += f.figures;
            if f.done {
                done.insert(name);
            }
        }
    }
    (sum, done)
}

/// What the judge looks at: one release's rollout and its figures so far.
#[derive(Debug, Clone)]
pub struct Judging<'a> {
    pub app: &'a str,
    pub release: u64,
    /// The desired release it replaced, when Beacon saw that one.
    pub previous: Option<u64>,
    /// The release is itself a rollback: it is never rolled back in turn (no loops).
    pub is_rollback: bool,
    pub max_error_rate: Option<Rate>,
    pub watch_seconds: u64,
    pub state: RolloutState,
    /// A verdict was already given (judged once).
    pub judged: bool,
    /// The nodes' figures for this switch, summed.
    pub figures: DeployFigures,
    /// Nodes that should run the release, and how many of those finished their watch.
    pub eligible: usize,
    pub watched: usize,
}

/// The judge's verdict on a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Over its error budget: the repository is asked to roll back to the previous release.
    RolledBack {
        order: RollbackOrder,
        outcome: String,
        detail: String,
    },
    /// Over its error budget with nothing to roll back to, or a rollback itself.
    Failed { outcome: String, detail: String },
    /// Every eligible node watched it through within its budget (or without one).
    Verified { outcome: String },
}

impl Verdict {
    /// The verdict in one sentence: the event's message and the rollout's outcome.
    pub fn outcome(&self) -> &str {
        match self {
            Self::RolledBack { outcome, .. }
            | Self::Failed { outcome, .. }
            | Self::Verified { outcome } => outcome,
        }
    }

    pub fn event_kind(&self) -> EventKind {
        match self {
            Self::RolledBack { .. } => EventKind::DeployRolledBack,
            Self::Failed { .. } => EventKind::DeployFailed,
            Self::Verified { .. } => EventKind::DeployVerified,
        }
    }

    /// The rollout's new state; a verified rollout stays rolled out.
    pub fn state(&self) -> Option<RolloutState> {
        match self {
            Self::RolledBack { .. } => Some(RolloutState::RolledBack),
            Self::Failed { .. } => Some(RolloutState::Failed),
            Self::Verified { .. } => None,
        }
    }

    /// The figures so far, for the event's detail, when the budget was breached.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::RolledBack { detail, .. } | Self::Failed { detail, .. } => Some(detail),
            Self::Verified { .. } => None,
        }
    }

    /// The alert a breached budget raises (deduplicated by this key); none when verified.
    pub fn alert_key(&self, app: &str, release: u64) -> Option<String> {
        match self {
            Self::RolledBack { .. } | Self::Failed { .. } => {
                Some(format!("deploy_rolled_back:{app}:{release}"))
            }
            Self::Verified { .. } => None,
        }
    }
}

/// Judges a rollout once: over its error budget (with at least [`MIN_JUDGED_REQUESTS`]
/// answers) → rolled back to the previous release, or failed when there is none or the release
/// is itself a rollback; rolled out with every eligible node's watch over → verified;
/// otherwise no verdict yet (`None`, also when it was already judged).
pub fn judge(j: &Judging<'_>) -> Option<Verdict> {
    if j.judged {
        return None;
    }
    let (app, version, sum) = (j.app, j.release, j.figures);
    let breached = j.max_error_rate.filter(|rate| {
        sum.new_requests >= MIN_JUDGED_REQUESTS
            && rate.exceeded_by(sum.new_errors, sum.new_requests)
    });
    if let Some(rate) = breached {
        let reason = format!(
            "{} of {} requests ({}) answered 5xx, over its error budget of {rate}",
            sum.new_errors,
            sum.new_requests,
            share(sum.new_errors, sum.new_requests)
        );
        let detail = format!(
            "figures so far: {} requests to v{version} ({} 5xx), {} to the previous release after the switch, {} long-lived connections moved, {} cut",
            sum.new_requests, sum.new_errors, sum.old_requests, sum.closed, sum.cut
        );
        let target = j.previous.or((version > 1).then(|| version - 1));
        return Some(match target {
            Some(to) if !j.is_rollback => Verdict::RolledBack {
                order: RollbackOrder {
                    app: app.to_string(),
                    from: version,
                    to: j.previous,
                    reason: format!("automatic rollback of v{version}: {reason}"),
                },
                outcome: format!("{app} v{version} rolled back to v{to}: {reason}"),
                detail,
            },
            _ => {
                let why = if j.is_rollback {
                    "it is itself a rollback; fix the app and deploy again"
                } else {
                    "there is no earlier release"
                };
                Verdict::Failed {
                    outcome: format!(
                        "{app} v{version} is over its error budget: {reason}; not rolled back: {why}"
                    ),
                    detail,
                }
            }
        });
    }
    if j.eligible > 0 && j.state == RolloutState::RolledOut && j.watched == j.eligible {
        let within = j
            .max_error_rate
            .map(|rate| format!(", within its error budget of {rate}"))
            .unwrap_or_default();
        return Some(Verdict::Verified {
            outcome: format!(
                "{app} v{version} verified: {} requests, {} answered 5xx ({}) in its first {}s{within}; {} long-lived connections moved, {} cut{}",
                sum.new_requests,
                sum.new_errors,
                share(sum.new_errors, sum.new_requests),
                j.watch_seconds,
                sum.closed,
                sum.cut,
                killed_clause(sum.killed)
            ),
        });
    }
    None
}

/// `part` of `whole` as a percentage with one decimal (`0%` of nothing).
fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0%".to_string()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// What a verdict adds when processes of the previous release were killed at their grace;
/// nothing when none were, the usual case.
fn killed_clause(killed: u64) -> String {
    if killed == 0 {
        String::new()
    } else {
        format!(
            "; {killed} process(es) of the previous release killed at the end of their stop grace"
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use px_proto::link::RolloutFigures;

    use super::*;
    use crate::placement::tests::{release, running};

    fn figures(new_requests: u64, new_errors: u64) -> DeployFigures {
        DeployFigures {
            old_requests: 3,
            new_requests,
            new_errors,
            closed: 2,
            cut: 1,
            killed: 0,
        }
    }

    /// v5 of `hello`, which replaced v4, rolled out to two nodes whose watch is over, with a
    /// 10% budget: each case changes what it tests.
    fn base() -> Judging<'static> {
        Judging {
            app: "hello",
            release: 5,
            previous: Some(4),
            is_rollback: false,
            max_error_rate: Some(Rate::parse("10%").unwrap()),
            watch_seconds: 60,
            state: RolloutState::RolledOut,
            judged: false,
            figures: figures(100, 0),
            eligible: 2,
            watched: 2,
        }
    }

    const BREACH_DETAIL: &str = "figures so far: 100 requests to v5 (11 5xx), 3 to the previous release after the switch, 2 long-lived connections moved, 1 cut";

    #[test]
    fn every_verdict_of_the_judge() {
        let rolled_back = |outcome: &str, to: Option<u64>| {
            Some(Verdict::RolledBack {
                order: RollbackOrder {
                    app: "hello".into(),
                    from: 5,
                    to,
                    reason: "automatic rollback of v5: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%".into(),
                },
                outcome: outcome.into(),
                detail: BREACH_DETAIL.into(),
            })
        };
        let verified = |outcome: &str| {
            Some(Verdict::Verified {
                outcome: outcome.into(),
            })
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Box<dyn Fn(&mut Judging<'static>)>, Option<Verdict>)> = vec![
            (
                "all nodes watched it within budget: verified",
                Box::new(|_| {}),
                verified(
                    "hello v5 verified: 100 requests, 0 answered 5xx (0.0%) in its first 60s, within its error budget of 10%; 2 long-lived connections moved, 1 cut",
                ),
            ),
            (
                "no budget: verified with the figures alone",
                Box::new(|j| {
                    j.max_error_rate = None;
                    j.figures = figures(0, 0);
                }),
                verified(
                    "hello v5 verified: 0 requests, 0 answered 5xx (0%) in its first 60s; 2 long-lived connections moved, 1 cut",
                ),
            ),
            (
                "processes killed at their grace are said",
                Box::new(|j| {
                    j.max_error_rate = None;
                    j.figures = DeployFigures {
                        killed: 2,
                        ..figures(0, 0)
                    };
                }),
                verified(
                    "hello v5 verified: 0 requests, 0 answered 5xx (0%) in its first 60s; 2 long-lived connections moved, 1 cut; 2 process(es) of the previous release killed at the end of their stop grace",
                ),
            ),
            (
                "exactly at the budget is within it",
                Box::new(|j| j.figures = figures(100, 10)),
                verified(
                    "hello v5 verified: 100 requests, 10 answered 5xx (10.0%) in its first 60s, within its error budget of 10%; 2 long-lived connections moved, 1 cut",
                ),
            ),
            (
                "exactly at the budget, not all watched: nothing yet",
                Box::new(|j| {
                    j.figures = figures(100, 10);
                    j.watched = 1;
                }),
                None,
            ),
            (
                "over the budget with a previous release: rolled back to it",
                Box::new(|j| j.figures = figures(100, 11)),
                rolled_back(
                    "hello v5 rolled back to v4: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%",
                    Some(4),
                ),
            ),
            (
                "over the budget while still rolling out: judged at once",
                Box::new(|j| {
                    j.figures = figures(100, 11);
                    j.state = RolloutState::RollingOut;
                    j.watched = 0;
                }),
                rolled_back(
                    "hello v5 rolled back to v4: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%",
                    Some(4),
                ),
            ),
            (
                "over the budget, previous unseen: rolled back to the release before, the order names none",
                Box::new(|j| {
                    j.figures = figures(100, 11);
                    j.previous = None;
                }),
                rolled_back(
                    "hello v5 rolled back to v4: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%",
                    None,
                ),
            ),
            (
                "over the budget with no earlier release: failed",
                Box::new(|j| {
                    j.figures = figures(100, 11);
                    j.previous = None;
                    j.release = 1;
                }),
                Some(Verdict::Failed {
                    outcome: "hello v1 is over its error budget: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%; not rolled back: there is no earlier release".into(),
                    detail: BREACH_DETAIL.replace("to v5", "to v1"),
                }),
            ),
            (
                "over the budget for a release that is itself a rollback: failed, never rolled back",
                Box::new(|j| {
                    j.figures = figures(100, 11);
                    j.is_rollback = true;
                }),
                Some(Verdict::Failed {
                    outcome: "hello v5 is over its error budget: 11 of 100 requests (11.0%) answered 5xx, over its error budget of 10%; not rolled back: it is itself a rollback; fix the app and deploy again".into(),
                    detail: BREACH_DETAIL.into(),
                }),
            ),
            (
                "under MIN_JUDGED_REQUESTS answers nothing is judged on the rate",
                Box::new(|j| {
                    j.figures = figures(MIN_JUDGED_REQUESTS - 1, MIN_JUDGED_REQUESTS - 1);
                    j.watched = 1;
                }),
                None,
            ),
            (
                "under MIN_JUDGED_REQUESTS and all watched: verified, figures and all",
                Box::new(|j| j.figures = figures(2, 1)),
                verified(
                    "hello v5 verified: 2 requests, 1 answered 5xx (50.0%) in its first 60s, within its error budget of 10%; 2 long-lived connections moved, 1 cut",
                ),
            ),
            (
                "at MIN_JUDGED_REQUESTS the rate counts",
                Box::new(|j| j.figures = figures(MIN_JUDGED_REQUESTS, 2)),
                Some(Verdict::RolledBack {
                    order: RollbackOrder {
                        app: "hello".into(),
                        from: 5,
                        to: Some(4),
                        reason: "automatic rollback of v5: 2 of 10 requests (20.0%) answered 5xx, over its error budget of 10%".into(),
                    },
                    outcome: "hello v5 rolled back to v4: 2 of 10 requests (20.0%) answered 5xx, over its error budget of 10%".into(),
                    detail: "figures so far: 10 requests to v5 (2 5xx), 3 to the previous release after the switch, 2 long-lived connections moved, 1 cut".into(),
                }),
            ),
            (
                "some eligible nodes still watching: nothing yet",
                Box::new(|j| j.watched = 1),
                None,
            ),
            (
                "not rolled out everywhere yet: nothing yet",
                Box::new(|j| j.state = RolloutState::RollingOut),
                None,
            ),
            (
                "no eligible node: nothing to verify",
                Box::new(|j| {
                    j.eligible = 0;
                    j.watched = 0;
                }),
                None,
            ),
            (
                "already judged: judged once",
                Box::new(|j| {
                    j.judged = true;
                    j.figures = figures(100, 50);
                }),
                None,
            ),
        ];
        for (what, adjust, expected) in cases {
            let mut j = base();
            adjust(&mut j);
            assert_eq!(judge(&j), expected, "{what}");
        }
    }

    #[test]
    fn verdicts_say_what_the_hub_applies() {
        let rolled_back = judge(&Judging {
            figures: figures(100, 11),
            ..base()
        })
        .unwrap();
        assert_eq!(rolled_back.event_kind(), EventKind::DeployRolledBack);
        assert_eq!(rolled_back.state(), Some(RolloutState::RolledBack));
        assert_eq!(
            rolled_back.alert_key("hello", 5).as_deref(),
            Some("deploy_rolled_back:hello:5")
        );
        assert_eq!(rolled_back.detail(), Some(BREACH_DETAIL));
        let failed = judge(&Judging {
            figures: figures(100, 11),
            is_rollback: true,
            ..base()
        })
        .unwrap();
        assert_eq!(failed.event_kind(), EventKind::DeployFailed);
        assert_eq!(failed.state(), Some(RolloutState::Failed));
        assert_eq!(
            failed.alert_key("hello", 5).as_deref(),
            Some("deploy_rolled_back:hello:5")
        );
        let verified = judge(&base()).unwrap();
        assert_eq!(verified.event_kind(), EventKind::DeployVerified);
        assert_eq!(
            verified.state(),
            None,
            "a verified rollout stays rolled out"
        );
        assert_eq!(verified.alert_key("hello", 5), None);
        assert_eq!(verified.detail(), None);
    }

    #[test]
    fn rollout_steps() {
        use RolloutState::*;
        let cases = [
            (RollingOut, 0, 0, Step::Unplaced { newly: true }),
            (Unplaced, 0, 0, Step::Unplaced { newly: false }),
            (RollingOut, 3, 3, Step::RolledOut),
            (Unplaced, 1, 1, Step::RolledOut),
            (RollingOut, 3, 2, Step::RollingOut),
            (Unplaced, 2, 0, Step::RollingOut),
            (RolledOut, 0, 0, Step::Settled),
            (RolledOut, 3, 1, Step::Settled),
            (Failed, 3, 3, Step::Settled),
            (RolledBack, 3, 3, Step::Settled),
        ];
        for (state, eligible, healthy, expected) in cases {
            assert_eq!(
                step(state, eligible, healthy),
                expected,
                "{state:?} with {healthy} of {eligible} healthy"
            );
        }
        assert_eq!(
            rolled_out_message("hello", 3, 2, 12.34),
            "hello v3 rolled out to 2 node(s) in 12.3s"
        );
    }

    #[test]
    fn figures_are_summed_over_the_nodes_for_that_release_only() {
        let watched = |app: &str, release: u64, new_requests: u64, done: bool| RolloutFigures {
            app: app.into(),
            release,
            previous: Some(release - 1),
            watched_ms: 1000,
            watch_ms: 60_000,
            done,
            figures: figures(new_requests, 1),
        };
        let mut a = running("hello", 5, InstanceState::Healthy);
        a.rollouts = vec![
            watched("hello", 5, 40, true),
            watched("other", 5, 1000, true),
        ];
        let mut b = running("hello", 5, InstanceState::Healthy);
        b.rollouts = vec![
            watched("hello", 5, 60, false),
            watched("hello", 4, 1000, true),
        ];
        let c = running("hello", 5, InstanceState::Healthy);
        let (sum, done) = sum_figures([("a", &a), ("b", &b), ("c", &c)], "hello", 5);
        assert_eq!(
            sum,
            DeployFigures {
                old_requests: 6,
                new_requests: 100,
                new_errors: 2,
                closed: 4,
                cut: 2,
                killed: 0,
            }
        );
        assert_eq!(done, BTreeSet::from(["a"]));
    }

    #[test]
    fn healthy_means_every_wanted_instance_of_that_release() {
        let two = release("hello", 5, "instances = 2");
        let one_healthy = running("hello", 5, InstanceState::Healthy);
        assert!(runs_healthy(&one_healthy, "hello", 5, None));
        assert!(!runs_healthy(&one_healthy, "hello", 5, Some(&two)));
        let mut both = one_healthy.clone();
        both.instances.push(both.instances[0].clone());
        assert!(runs_healthy(&both, "hello", 5, Some(&two)));
        assert!(
            !runs_healthy(&one_healthy, "hello", 4, None),
            "another release"
        );
        assert!(!runs_healthy(&one_healthy, "other", 5, None), "another app");
        let starting = running("hello", 5, InstanceState::Starting);
        assert!(!runs_healthy(&starting, "hello", 5, None));
        // A worker runs, but only web instances say a release serves.
        let mut worker = one_healthy.clone();
        worker.instances[0].process = "worker".into();
        assert!(!runs_healthy(&worker, "hello", 5, None));
        let mut web_and_worker = one_healthy.clone();
        web_and_worker.instances.push(worker.instances[0].clone());
        assert!(!runs_healthy(&web_and_worker, "hello", 5, Some(&two)));
    }
}
