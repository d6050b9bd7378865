//! The desired state read from the repository, the generation that numbers it (with where
//! each pending build runs), and each node's assignment: what it should run and build,
//! published on the node's `watch` once the generation is on disk. A move of an app's desired
//! release past releases still rolling out supersedes them, each with its event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use px_proto::api::Release;
use px_proto::beacon::{EventKind, RolloutState};
use px_proto::build::{AssignedBuild, AssignedLayer, Build};
use px_proto::link::{AppAssignment, Assignment};

use super::persist::Persisted;
use super::{AddedDomains, Changes, Effect, Formations, Hub, Rollout, State, effect};
use crate::frames::Outgoing;
use crate::placement::{BuildKey, Fit, places};

/// What the persisted generation numbers: `app@version` of every desired release,
/// `build <app> <n> <node>` of every placed build, `process <app> <type> <n> <node>` of
/// every placed process (a build or a process that moves is a new assignment),
/// `web <app> <n>` of every web count set with `em scale` and `domains <app> <names>` of
/// every app's added names.
fn fingerprint(state: &State) -> Vec<String> {
    let mut fingerprint: Vec<String> = state
        .desired
        .values()
        .map(|r| format!("{}@{}", r.app, r.version))
        .collect();
    fingerprint.extend(super::builds::placement_fingerprint(&state.builds));
    fingerprint.extend(super::processes::fingerprint(&state.processes));
    fingerprint.extend(super::processes::web_fingerprint(state));
    fingerprint.extend(super::release_phases::fingerprint(&state.phases));
    fingerprint.extend(super::domains::fingerprint(&state.added_domains));
    fingerprint
}

/// Most `deploy_superseded` events for releases Beacon never saw (committed and superseded
/// between two reads). A handful of deploys racing is the real case; a larger gap means
/// Beacon was away, and the newest of the skipped releases are the ones a waiting
/// `em deploy` may still be following.
pub const MAX_SKIPPED_SUPERSEDED: u64 = 64;

/// How many web instances of `release` each web server runs: the count set with `em scale`,
/// else the manifest's `instances`.
fn web_count(release: &Release, formation: Option<&BTreeMap<String, u32>>) -> u32 {
    let none = BTreeMap::new();
    px_proto::process::formation(&release.manifest, formation.unwrap_or(&none))
        .get(px_proto::procfile::WEB_PROCESS)
        .copied()
        .unwrap_or(release.manifest.instances)
}

impl Hub {
    /// The assignment for `node` at the current generation: the apps it should run and the
    /// builds placed on it.
    pub(super) fn assignment_for(&self, state: &State, node: &str, fit: &Fit<'_>) -> Assignment {
        Assignment {
            generation: state.persisted.generation,
            apps: self.apps_for(state, node, fit),
            builds: self.build_orders(state, node),
            phases: self.phase_orders(state, node),
        }
    }

    /// The apps `node` runs, each with the processes of non-web types placed on it.
    pub(super) fn apps_for(&self, state: &State, node: &str, fit: &Fit<'_>) -> Vec<AppAssignment> {
        let mut apps: Vec<AppAssignment> = state
            .desired
            .values()
            .filter(|r| places(r, fit))
            .map(|r| self.app_assignment(r, state))
            .collect();
        Self::add_processes(state, node, &mut apps);
        apps
    }

    /// Puts the processes placed on `node` into its apps' assignments.
    fn add_processes(state: &State, node: &str, apps: &mut [AppAssignment]) {
        for app in apps {
            app.processes = Self::processes_for(state, &app.app, node);
        }
    }

    /// What `node` should be sent when it attaches: its assignment, if the current generation
    /// is on disk and the node's report shows another one. The one published to every node
    /// when it is the same, so that thousands of nodes hold one copy.
    pub(super) fn attach_assignment(
        &self,
        state: &State,
        node: &str,
        fit: &Fit<'_>,
    ) -> Option<Arc<Outgoing>> {
        let generation = state.persisted.generation;
        let reported = fit.report.map_or(0, |r| r.generation);
        (state.desired_known && state.durable == generation && reported != generation).then(|| {
            let assignment = self.assignment_for(state, node, fit);
            match &state.shared {
                Some(shared) if shared.assignment == assignment => shared.clone(),
                _ => Arc::new(Outgoing::new(assignment)),
            }
        })
    }

    /// Every host name an app's desired release is served on (`domains.rs`), lowercase: what
    /// Beacon orders certificates for. `None` until the desired state has been read, so that
    /// no name counts as removed before it was known. Computed when a generation is published,
    /// not on each call.
    pub fn served_domains(&self) -> Option<Arc<std::collections::BTreeSet<String>>> {
        self.served.borrow().clone()
    }

    /// Computes [`Hub::served_domains`] again when the generation moved since the last time:
    /// every change of the desired releases or the added names numbers a new one.
    fn refresh_served_domains(&self, state: &mut State) {
        let generation = state.persisted.generation;
        if !state.desired_known || state.served_for == Some(generation) {
            return;
        }
        state.served_for = Some(generation);
        let served: std::collections::BTreeSet<String> = state
            .desired
            .values()
            .flat_map(|release| {
                super::domains::served(
                    release,
                    state.added_domains.get(&release.app),
                    &self.settings.domain,
                )
            })
            .map(|domain| domain.to_ascii_lowercase())
            .collect();
        self.served.send_if_modified(|current| {
            if current.as_deref() == Some(&served) {
                return false;
            }
            *current = Some(Arc::new(served));
            true
        });
    }

    /// The assignment of `release`, with the web count of its app's formation when one is set,
    /// every name it is served on (`domains.rs`) and its app's creation time when known.
    pub(super) fn app_assignment(&self, release: &Release, state: &State) -> AppAssignment {
        let formation = state.formations.get(&release.app);
        let created = state.created.get(&release.app);
        let domains = super::domains::served(
            release,
            state.added_domains.get(&release.app),
            &self.settings.domain,
        );
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
            instances: web_count(release, formation),
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
            processes: BTreeMap::new(),
            app_created_at: created.cloned(),
            bundle_unpacked_size: release.bundle.unpacked_size,
        }
    }

    /// The configuration a node runs an app with, for `/v1/apps/{app}/config`.
    pub fn app_config(&self, app: &str) -> Option<AppAssignment> {
        let state = self.lock();
        state
            .desired
            .get(app)
            .map(|r| self.app_assignment(r, &state))
    }

    /// Whether `app` is in the current assignment of a linked node whose link token has this
    /// SHA-256: what a `maestro` token may read the config of.
    pub fn assigned_to_token(&self, app: &str, token_sha256: &str) -> bool {
        let state = self.lock();
        state.nodes.values().any(|node| {
            node.connected
                && node.token_sha256 == token_sha256
                && node
                    .assign_tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|a| a.apps.iter().any(|assigned| assigned.app == app))
        })
    }

    /// Takes each app's creation time, read with the desired state; call it before
    /// [`Hub::set_state`] so the assignments that pass computes carry them.
    pub fn set_app_created(&self, created: BTreeMap<String, String>) {
        self.lock().created = created;
    }

    /// [`Hub::set_state`] without the builds, as the hub's own tests drive it.
    #[cfg(test)]
    pub async fn set_desired(&self, desired: BTreeMap<String, Release>) {
        self.set_state(desired, Formations::new(), AddedDomains::new(), None)
            .await;
    }

    /// Takes the desired state read from the repository, and the pending builds when they
    /// could be read (`None` keeps the last known ones). When the desired state or where
    /// builds run changes, the generation grows, is written to disk, and then every node gets
    /// its new assignment (the order is explained in `persist.rs`). Returns the builds that
    /// left the pending list, whose results the caller reads from the repository for
    /// [`Hub::build_results`].
    pub async fn set_state(
        &self,
        desired: BTreeMap<String, Release>,
        formations: Formations,
        added_domains: AddedDomains,
        builds: Option<Vec<Build>>,
    ) -> Vec<BuildKey> {
        self.update(|hub, state, effects| {
            hub.update_desired(state, desired, formations, added_domains, builds, effects)
        })
        .await
    }

    /// Changes the state under the `publishing` lock, in the order `persist.rs` explains:
    /// `change` runs under the state lock and says whether nodes may need a new assignment;
    /// a generation it numbered is written to disk, then the assignments are published, then
    /// its events are recorded.
    pub(super) async fn update<T>(
        &self,
        change: impl FnOnce(&Self, &mut State, &mut Vec<Effect>) -> (T, bool),
    ) -> T {
        let _publishing = self.publishing.lock().await;
        let started = Instant::now();
        let (value, changes, changed, unwritten) = {
            let mut effects = Vec::new();
            let mut state = self.lock();
            let (value, changed) = change(self, &mut state, &mut effects);
            // Also a generation an earlier update failed to write: it is tried again.
            let unwritten =
                (state.durable < state.persisted.generation).then(|| state.persisted.clone());
            (value, Changes::of(&mut state, effects), changed, unwritten)
        };
        let mut publish = changed;
        if let Some(persisted) = unwritten {
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
            let mut state = self.lock();
            if self.publish_assignments(&mut state) {
                tracing::info!(generation = state.durable, apps = state.desired.len(), builds = state.builds.len(), nodes = state.nodes.len(), elapsed = ?started.elapsed(), "desired state changed; assignments queued");
            }
        }
        self.finish(changes).await;
        value
    }

    /// Numbers the desired state and the build placement with a new generation, unless it is
    /// the one already numbered: after a restart, an unchanged state keeps its generation, so
    /// nodes that applied it are not sent it again.
    pub(super) fn renumber(state: &mut State) {
        let fingerprint = fingerprint(state);
        if state.persisted.desired != fingerprint || state.persisted.generation == 0 {
            state.persisted = Persisted {
                generation: state.persisted.generation + 1,
                desired: fingerprint,
            };
        }
    }

    /// Places the pending builds again, numbering a new generation when one moved; returns
    /// whether one did.
    pub(super) fn replace_builds(&self, state: &mut State, effects: &mut Vec<Effect>) -> bool {
        // Both are placed: `|`, not `||`.
        let phases_before = super::release_phases::fingerprint(&state.phases);
        self.place_phases(state);
        let phases_moved = phases_before != super::release_phases::fingerprint(&state.phases);
        let moved = self.place_builds(state, effects) | self.place_processes(state) | phases_moved;
        if moved {
            Self::renumber(state);
        }
        moved
    }

    /// The part of [`Hub::set_state`] under the lock: rollouts, superseded releases, rollback
    /// orders, the pending builds and their placement, the new generation, and the rollouts
    /// evaluated against the new state.
    fn update_desired(
        &self,
        state: &mut State,
        desired: BTreeMap<String, Release>,
        formations: Formations,
        added_domains: AddedDomains,
        builds: Option<Vec<Build>>,
        effects: &mut Vec<Effect>,
    ) -> (Vec<BuildKey>, bool) {
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
        let desired_changed = first_read || state.desired != desired;
        if desired_changed {
            self.take_desired(state, desired, first_read, effects);
        }
        // A new formation is no rollout: only the counts of running types change.
        let scaled = state.formations != formations;
        state.formations = formations;
        // Nor is a change of added names: only the nodes' route tables change.
        let rerouted = state.added_domains != added_domains;
        state.added_domains = added_domains;
        let departed = builds
            .map(|builds| self.take_pending(state, builds))
            .unwrap_or_default();
        let moved = self.place_builds(state, effects) | self.place_processes(state);
        // A build that left the list leaves its node's assignment too.
        let changed = desired_changed || scaled || rerouted || moved || !departed.is_empty();
        if changed {
            Self::renumber(state);
        }
        (departed, changed)
    }

    fn take_desired(
        &self,
        state: &mut State,
        desired: BTreeMap<String, Release>,
        first_read: bool,
        effects: &mut Vec<Effect>,
    ) {
        for release in desired.values() {
            let changed = state
                .rollouts
                .get(&release.app)
                .is_none_or(|r| r.release != release.version);
            if changed {
                let previous = state.desired.get(&release.app).map(|r| r.version);
                if !first_read {
                    effects.extend(Self::superseded(state, release));
                }
                let replaced = state.rollouts.get(&release.app).map(|r| r.release);
                if let Some(old) = replaced {
                    Self::remember(state, &release.app, old);
                }
                let mut rollout = Rollout::new(release.version, previous);
                // After a restart or a takeover (the history then comes from the shared
                // storage), a rollout already finished or judged keeps its state and verdict.
                let known = state
                    .history
                    .get(&release.app)
                    .and_then(|h| h.iter().find(|r| r.release == release.version));
                if let Some(known) = known {
                    rollout.previous = known.previous.or(previous);
                    rollout.figures = known.figures;
                    rollout.verified = known.verified;
                    rollout.outcome = known.outcome.clone();
                    rollout.seconds = known.rollout_seconds;
                    if matches!(
                        known.state,
                        RolloutState::RolledBack | RolloutState::RolledOut | RolloutState::Failed
                    ) {
                        rollout.state = known.state;
                    }
                }
                let was_known = known.is_some();
                state.rollouts.insert(release.app.clone(), rollout);
                let started_before = state
                    .persisted
                    .desired
                    .contains(&format!("{}@{}", release.app, release.version))
                    || was_known;
                if !(first_read && started_before) {
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
        let app_names: Vec<String> = state.desired.keys().cloned().collect();
        for app in app_names {
            effects.extend(self.evaluate_rollout(state, &app));
        }
    }

    /// The `deploy_superseded` events of a move of the app's desired release to `release`:
    /// one for the release it replaces if that one was still rolling out or waiting for a
    /// node (or, with an error
    /// budget, still watched, since `em deploy` waits for its verdict), and one for each
    /// release committed in between that Beacon never saw. Each names `release`, so the
    /// `em deploy` that waits for an older one can stop and say what came first.
    fn superseded(state: &State, release: &Release) -> Vec<Effect> {
        let app = &release.app;
        let newer = release.version;
        let previous = state.desired.get(app);
        let mut effects = Vec::new();
        if let Some((rollout, old)) = state.rollouts.get(app).zip(previous)
            && old.version < newer
        {
            let watched = old.manifest.deploy.max_error_rate.is_some() && rollout.outcome.is_none();
            let before = match rollout.state {
                // Unplaced too: with no node at all, `em deploy` was told nothing and waits.
                RolloutState::RollingOut | RolloutState::Unplaced => {
                    Some("before it served everywhere")
                }
                RolloutState::RolledOut if watched => Some("before its watch ended"),
                _ => None,
            };
            if let Some(before) = before {
                effects.push(effect(
                    EventKind::DeploySuperseded,
                    None,
                    Some(app),
                    Some(old.version),
                    format!("{app} v{} was superseded by v{newer} {before}", old.version),
                ));
            }
        }
        let seen = previous.map_or(0, |r| r.version);
        let first_skipped = (seen + 1).max(newer.saturating_sub(MAX_SKIPPED_SUPERSEDED));
        for skipped in first_skipped..newer {
            effects.push(effect(
                EventKind::DeploySuperseded,
                None,
                Some(app),
                Some(skipped),
                format!("{app} v{skipped} was superseded by v{newer} before it was assigned"),
            ));
        }
        effects
    }

    /// Sends every node whose report shows another generation its assignment, if the
    /// current generation is on disk; returns whether it was.
    fn publish_assignments(&self, state: &mut State) -> bool {
        self.refresh_served_domains(state);
        let generation = state.persisted.generation;
        if state.durable != generation {
            return false;
        }
        // When no release asks anything of a node, every node runs the same apps: they are
        // computed once, and only a node with builds gets an assignment of its own.
        let everywhere = state
            .desired
            .values()
            .all(|r| r.manifest.placement.is_everywhere() && r.manifest.runtime.is_none());
        // Computed for no node in particular: the processes of non-web types are added per
        // node, only to the nodes they are placed on.
        let shared = everywhere.then(|| {
            Arc::new(Outgoing::new(Assignment {
                generation,
                apps: self.apps_for(state, "", &Fit::BARE),
                builds: Vec::new(),
                phases: Vec::new(),
            }))
        });
        let mut sent = Vec::new();
        for (name, node) in &state.nodes {
            if node.report.generation == generation {
                continue;
            }
            let builds = self.build_orders(state, name);
            let phases = self.phase_orders(state, name);
            let runs_processes = Self::processes_on(state, &|n| n == name);
            let assignment = match &shared {
                Some(shared) if builds.is_empty() && phases.is_empty() && !runs_processes => {
                    shared.clone()
                }
                Some(shared) => {
                    let mut apps = shared.apps.clone();
                    Self::add_processes(state, name, &mut apps);
                    Arc::new(Outgoing::new(Assignment {
                        generation,
                        apps,
                        builds,
                        phases,
                    }))
                }
                None => Arc::new(Outgoing::new(Assignment {
                    generation,
                    apps: self.apps_for(state, name, &node.fit()),
                    builds,
                    phases,
                })),
            };
            node.assign_tx.send_replace(Some(assignment.clone()));
            sent.push((name.clone(), assignment));
        }
        // Each node's scope takes in what it was sent now, not only what it holds at its next
        // report: something assigned and taken back between two reports stays the node's to
        // report on for the grace.
        let now = std::time::Instant::now();
        for (name, assignment) in sent {
            if let Some(node) = state.nodes.get_mut(&name) {
                node.scope.refresh(Some(&assignment.assignment), now);
            }
        }
        state.shared = shared;
        true
    }
}
