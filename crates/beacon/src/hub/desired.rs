//! The desired state read from the repository, the generation that numbers it, and each
//! node's assignment: what it should run, published on the node's `watch` once the generation
//! is on disk.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use px_proto::api::Release;
use px_proto::beacon::{EventKind, RolloutState};
use px_proto::build::{AssignedBuild, AssignedLayer};
use px_proto::link::{AppAssignment, Assignment};

use super::persist::Persisted;
use super::{Changes, Hub, Rollout, State, effect};
use crate::placement::{Fit, places};

/// `app@version` of every desired release: what the persisted generation numbers.
fn fingerprint(desired: &BTreeMap<String, Release>) -> Vec<String> {
    desired
        .values()
        .map(|r| format!("{}@{}", r.app, r.version))
        .collect()
}

/// What a desired-state update did under the lock.
struct Update {
    changes: Changes,
    /// The desired state changed: nodes may need a new assignment.
    changed: bool,
    /// A generation not on disk yet, to write before anything is published.
    unwritten: Option<Persisted>,
}

impl Hub {
    /// The assignment for a node at the current generation.
    fn assignment_for(&self, state: &State, fit: &Fit<'_>) -> Arc<Assignment> {
        let apps = state
            .desired
            .values()
            .filter(|r| places(r, fit))
            .map(|r| self.app_assignment(r))
            .collect();
        Arc::new(Assignment {
            generation: state.persisted.generation,
            apps,
            builds: Vec::new(),
        })
    }

    /// What `node` should be sent when it attaches: its assignment, if the current generation
    /// is on disk and the node's report shows another one.
    pub(super) fn attach_assignment(
        &self,
        state: &State,
        fit: &Fit<'_>,
    ) -> Option<Arc<Assignment>> {
        let generation = state.persisted.generation;
        let reported = fit.report.map_or(0, |r| r.generation);
        (state.desired_known && state.durable == generation && reported != generation)
            .then(|| self.assignment_for(state, fit))
    }

    fn app_assignment(&self, release: &Release) -> AppAssignment {
        let domains = if release.manifest.http.domains.is_empty() {
            vec![format!("{}.{}", release.app, self.settings.domain)]
        } else {
            release.manifest.http.domains.clone()
        };
        AppAssignment {
            app: release.app.clone(),
            release: release.version,
            bundle_sha256: release.bundle.sha256.clone(),
            bundle_size: release.bundle.size,
            bundle_url: format!(
                "{}/v1/bundles/{}",
                self.settings.repository_url.trim_end_matches('/'),
                release.bundle.sha256
            ),
            manifest: release.manifest.clone(),
            env: release.environment(),
            instances: release.manifest.instances,
            domains,
            build: release.build.as_ref().map(|build| AssignedBuild {
                layers: build
                    .layers
                    .iter()
                    .map(|layer| AssignedLayer {
                        kind: layer.kind,
                        sha256: layer.sha256.clone(),
                        size: layer.size,
                        url: format!(
                            "{}/v1/layers/{}",
                            self.settings.repository_url.trim_end_matches('/'),
                            layer.sha256
                        ),
                    })
                    .collect(),
                path: build.path.clone(),
                env: build.env.clone(),
                commands: build.commands.clone(),
            }),
        }
    }

    /// The configuration a node runs an app with, for `/v1/apps/{app}/config`.
    pub fn app_config(&self, app: &str) -> Option<AppAssignment> {
        let state = self.lock();
        state.desired.get(app).map(|r| self.app_assignment(r))
    }

    /// Takes the desired state read from the repository. When it differs from the current
    /// one, the generation grows, is written to disk, and then every node gets its new
    /// assignment (the order is explained in `persist.rs`).
    pub async fn set_desired(&self, desired: BTreeMap<String, Release>) {
        let _publishing = self.publishing.lock().await;
        let started = Instant::now();
        let update = self.update_desired(desired);
        let mut publish = update.changed;
        if let Some(persisted) = update.unwritten {
            match self.store.write_generation(&persisted).await {
                Ok(()) => {
                    let mut state = self.lock();
                    state.durable = state.durable.max(persisted.generation);
                    publish = true;
                }
                Err(e) => {
                    tracing::error!(generation = persisted.generation, error = %e, "cannot persist the assignment generation; no node is sent it until it is written");
                }
            }
        }
        if publish {
            let state = self.lock();
            if self.publish_assignments(&state) {
                tracing::info!(generation = state.durable, apps = state.desired.len(), nodes = state.nodes.len(), elapsed = ?started.elapsed(), "desired state changed; assignments queued");
            }
        }
        self.finish(update.changes).await;
    }

    /// The part of [`Hub::set_desired`] under the lock: rollouts, rollback orders, the new
    /// generation, and the rollouts evaluated against the new state.
    fn update_desired(&self, desired: BTreeMap<String, Release>) -> Update {
        let mut effects = Vec::new();
        let mut state = self.lock();
        if !state.repository_reachable {
            state.repository_reachable = true;
            effects.push(effect(
                EventKind::RepositoryRecovered,
                None,
                None,
                None,
                "repository reachable again".into(),
            ));
        }
        let first_read = !state.desired_known;
        state.desired_known = true;
        let changed = first_read || state.desired != desired;
        if changed {
            self.take_desired(&mut state, desired, first_read, &mut effects);
        }
        // Also a generation an earlier update failed to write: it is tried again.
        let unwritten =
            (state.durable < state.persisted.generation).then(|| state.persisted.clone());
        Update {
            changes: Changes::of(&mut state, effects),
            changed,
            unwritten,
        }
    }

    fn take_desired(
        &self,
        state: &mut State,
        desired: BTreeMap<String, Release>,
        first_read: bool,
        effects: &mut Vec<super::Effect>,
    ) {
        let fingerprint = fingerprint(&desired);
        for release in desired.values() {
            let changed = state
                .rollouts
                .get(&release.app)
                .is_none_or(|r| r.release != release.version);
            if changed {
                let previous = state.desired.get(&release.app).map(|r| r.version);
                let replaced = state.rollouts.get(&release.app).map(|r| r.release);
                if let Some(old) = replaced {
                    Self::remember(state, &release.app, old);
                }
                let mut rollout = Rollout::new(release.version, previous);
                // After a restart, a rollout already judged keeps its verdict.
                if let Some(known) = state
                    .history
                    .get(&release.app)
                    .and_then(|h| h.iter().find(|r| r.release == release.version))
                {
                    rollout.previous = known.previous.or(previous);
                    rollout.figures = known.figures;
                    rollout.verified = known.verified;
                    rollout.outcome = known.outcome.clone();
                    if known.state == RolloutState::RolledBack {
                        rollout.state = RolloutState::RolledBack;
                    }
                }
                state.rollouts.insert(release.app.clone(), rollout);
                if !(first_read
                    && state
                        .persisted
                        .desired
                        .contains(&format!("{}@{}", release.app, release.version)))
                {
                    effects.push(effect(
                        EventKind::DeployStarted,
                        None,
                        Some(&release.app),
                        Some(release.version),
                        format!("rolling out {} v{}", release.app, release.version),
                    ));
                }
            }
        }
        state.rollouts.retain(|app, _| desired.contains_key(app));
        // A rollback is done once the desired release moved past the one it undoes.
        let before = state.rollbacks.len();
        state
            .rollbacks
            .retain(|app, order| desired.get(app).is_some_and(|r| r.version == order.from));
        if state.rollbacks.len() != before {
            self.publish_rollbacks(state);
        }
        state.desired = desired;
        // After a restart, an unchanged desired state keeps its generation: nodes that
        // applied it are not sent it again.
        if state.persisted.desired != fingerprint || state.persisted.generation == 0 {
            state.persisted = Persisted {
                generation: state.persisted.generation + 1,
                desired: fingerprint,
            };
        }
        let app_names: Vec<String> = state.desired.keys().cloned().collect();
        for app in app_names {
            effects.extend(self.evaluate_rollout(state, &app));
        }
    }

    /// Sends every node whose report shows another generation its assignment, if the
    /// current generation is on disk; returns whether it was.
    fn publish_assignments(&self, state: &State) -> bool {
        let generation = state.persisted.generation;
        if state.durable != generation {
            return false;
        }
        let shared = self.assignment_for(state, &Fit::BARE);
        let everywhere = state
            .desired
            .values()
            .all(|r| r.manifest.placement.is_everywhere() && r.manifest.runtime.is_none());
        for node in state.nodes.values() {
            if node.report.generation == generation {
                continue;
            }
            let assignment = if everywhere {
                shared.clone()
            } else {
                self.assignment_for(state, &node.fit())
            };
            node.assign_tx.send_replace(Some(assignment));
        }
        true
    }
}
