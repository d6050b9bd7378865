//! What the HTTP API and the status page read from the hub: nodes, apps, repositories, an
//! app's rollouts and its processes (`em ps`), each a copy taken under the lock.

use px_proto::beacon::{self, NodeHealth, RolloutRecord, RolloutState};

use super::Hub;

impl Hub {
    /// Every process of `app` in the nodes' latest reports (lost nodes left out), web first,
    /// then by type, number and node; `None` when the app is not deployed.
    pub fn app_processes(&self, app: &str) -> Option<Vec<beacon::AppProcess>> {
        let state = self.lock();
        if !state.desired.contains_key(app) {
            return None;
        }
        let mut rows: Vec<beacon::AppProcess> = state
            .nodes
            .iter()
            .filter(|(_, n)| !n.lost)
            .flat_map(|(name, n)| {
                n.report
                    .instances
                    .iter()
                    .filter(|i| i.app == app)
                    .map(|i| beacon::AppProcess {
                        node: name.clone(),
                        status: i.clone(),
                    })
            })
            .collect();
        rows.sort_by(|a, b| {
            let key = |r: &beacon::AppProcess| {
                (
                    !r.status.is_web(),
                    r.status.process.clone(),
                    r.status.number,
                )
            };
            key(a).cmp(&key(b)).then_with(|| a.node.cmp(&b.node))
        });
        Some(rows)
    }

    pub fn nodes(&self) -> Vec<beacon::Node> {
        let state = self.lock();
        state
            .nodes
            .iter()
            .map(|(name, n)| beacon::Node {
                name: name.clone(),
                health: if n.lost {
                    NodeHealth::Lost
                } else {
                    NodeHealth::Connected
                },
                software: n.software.clone(),
                labels: n.labels.clone(),
                runtimes: n.runtimes.clone(),
                last_seen: humantime::format_rfc3339_seconds(n.last_seen_wall).to_string(),
                assigned_generation: n.assigned_generation,
                applied_generation: n.report.generation,
                instances: n.report.instances.clone(),
                disk: n.report.disk,
            })
            .collect()
    }

    /// Whether the desired state has been read since start-up.
    pub fn desired_known(&self) -> bool {
        self.lock().desired_known
    }

    /// Whether `app` is in the desired state.
    pub fn app_exists(&self, app: &str) -> bool {
        self.lock().desired.contains_key(app)
    }

    pub fn apps(&self) -> Vec<beacon::App> {
        let state = self.lock();
        state
            .desired
            .values()
            .map(|release| {
                let rollout = state.rollouts.get(&release.app);
                beacon::App {
                    name: release.app.clone(),
                    release: release.version,
                    bundle_sha256: release.bundle.sha256.clone(),
                    rollout: rollout.map_or(RolloutState::RollingOut, |r| r.state),
                    nodes: Self::eligible(&state, release).cloned().collect(),
                    healthy_nodes: rollout.map_or(0, |r| r.healthy.len()),
                    rollout_seconds: rollout.and_then(|r| r.seconds),
                    figures: rollout.map(|r| r.figures).unwrap_or_default(),
                    outcome: rollout.and_then(|r| r.outcome.clone()),
                    domains: super::domains::served(
                        release,
                        state.added_domains.get(&release.app),
                        &self.settings.domain,
                    ),
                }
            })
            .collect()
    }

    pub fn repositories(&self) -> Vec<beacon::Repository> {
        let state = self.lock();
        state
            .repositories
            .iter()
            .map(|(name, r)| beacon::Repository {
                name: name.clone(),
                connected: r.links > 0,
                last_seen: humantime::format_rfc3339_seconds(r.last_seen_wall).to_string(),
                disk: r.disk,
            })
            .collect()
    }

    /// The app's rollouts, newest first: the current one as it stands, then the history.
    pub fn rollouts(&self, app: &str) -> Option<Vec<RolloutRecord>> {
        let state = self.lock();
        let current = state
            .rollouts
            .get(app)
            .zip(state.desired.get(app))
            .map(|(rollout, release)| rollout.record(release));
        let history = state.history.get(app);
        if current.is_none() && history.is_none() {
            return None;
        }
        let current_release = current.as_ref().map(|c| c.release);
        let mut records: Vec<RolloutRecord> = current.into_iter().collect();
        records.extend(
            history
                .into_iter()
                .flatten()
                .filter(|r| Some(r.release) != current_release)
                .cloned(),
        );
        Some(records)
    }
}
