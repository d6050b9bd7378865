//! Release phases (docs/src/design/processes.md, "The release phase"): a deploy whose manifest
//! names a `release` command is committed with its phase pending and is not current until the
//! phase succeeded. A node claims the phase before it runs it, and reports how it ended.
//!
//! Keys, under `apps/<app>/phases/`, all created only if absent (as a build's are):
//! - `<n>.claim.json`: who decides the phase of release `n`: the node that runs it (with its
//!   attempt), or a newer release superseding it before any node claimed it. Exactly one
//!   creates it, so a phase runs at most once: a retrying Beacon, a second Beacon, a second
//!   node or a restarted Maestro finds the claim and is refused.
//! - `<n>.result.json`: how it ended. The first result wins.
//! - `<n>.log`: its output, the last [`MAX_BUILD_LOG_BYTES`].
//!
//! A claim whose node was lost or restarted is never run again: a half-run migration needs a
//! human. The node that is given the phase next finds the claim of another attempt and fails
//! the phase, saying so.

use bytes::Bytes;
use px_proto::api::{PhaseClaim, PhaseEnded, PhaseOutcome, PhaseState, Release, ReleasePhase};
use px_proto::build::MAX_BUILD_LOG_BYTES;
use px_proto::manifest::AppManifest;
use serde::{Deserialize, Serialize};

use crate::builds::tail;
use crate::error::ApiError;
use crate::releases::{Releases, now_rfc3339};
use crate::storage::StorageError;

/// Release phases listed across apps in one answer. An app has at most a few unended phases
/// (a newer release supersedes the unclaimed ones), so this bounds what Beacon reads at every
/// reconcile on a platform with that many apps deploying at once.
pub const MAX_LISTED_PHASES: usize = 1000;
/// Longest failure reason kept, in characters: one sentence, the log holds the rest.
pub const MAX_PHASE_REASON_CHARS: usize = crate::builds::MAX_FAIL_REASON_CHARS;
/// Longest node name or attempt a claim may carry, in bytes: node names are DNS-like and an
/// attempt is a random token; the bound keeps the claim small.
pub const MAX_CLAIM_FIELD_LEN: usize = 256;

/// The stored form of `<n>.claim.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
enum Claim {
    Run {
        node: String,
        attempt: String,
        claimed_at: String,
    },
    Supersede {
        by: String,
    },
}

/// The stored form of `<n>.result.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Ended {
    Succeeded,
    Failed { reason: String },
    Superseded { by: String },
}

impl From<Ended> for PhaseState {
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Succeeded => PhaseState::Succeeded,
            Ended::Failed { reason } => PhaseState::Failed { reason },
            Ended::Superseded { by } => PhaseState::Superseded { by },
        }
    }
}

fn claim_key(app: &str, version: u64) -> String {
    format!("apps/{app}/phases/{version}.claim.json")
}

fn result_key(app: &str, version: u64) -> String {
    format!("apps/{app}/phases/{version}.result.json")
}

fn log_key(app: &str, version: u64) -> String {
    format!("apps/{app}/phases/{version}.log")
}

/// The pending release phase of a new deploy whose manifest names one. Config changes and
/// rollbacks never get one (see the design page: a rollback must not run old migrations).
pub fn pending_phase(manifest: &AppManifest) -> Option<ReleasePhase> {
    let (command, timeout) = px_proto::process::release_phase(manifest)?;
    Some(ReleasePhase {
        command: command.to_string(),
        timeout_secs: timeout.as_secs(),
        state: PhaseState::Pending,
    })
}

/// Whether `release` may serve: it has no phase, or its phase succeeded.
pub fn may_serve(release: &Release) -> bool {
    release
        .phase
        .as_ref()
        .is_none_or(|phase| phase.state == PhaseState::Succeeded)
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Keeps a caller's text to one printable line of at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

fn describe(app: &str, version: u64, state: &PhaseState) -> String {
    match state {
        PhaseState::Pending => format!("the release phase of {app:?} v{version} is pending"),
        PhaseState::Running { node, claimed_at } => {
            format!("the release phase of {app:?} v{version} was claimed by {node} at {claimed_at}")
        }
        PhaseState::Succeeded => format!("the release phase of {app:?} v{version} succeeded"),
        PhaseState::Failed { reason } => {
            format!("the release phase of {app:?} v{version} failed: {reason}")
        }
        PhaseState::Superseded { by } => {
            format!("the release phase of {app:?} v{version} was superseded by {by} before it ran")
        }
    }
}

impl Releases {
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.count_storage_error(self.storage().read(key).await)? {
            Some(stored) => Ok(Some(serde_json::from_slice(&stored.bytes).map_err(
                |e| ApiError::Internal(format!("{key} is not valid JSON: {e}")),
            )?)),
            None => Ok(None),
        }
    }

    /// Creates `key` unless it exists; returns whether this call created it.
    async fn create_once(&self, key: &str, bytes: Bytes) -> Result<bool, ApiError> {
        match self.count_storage_error(self.storage().create(key, bytes).await) {
            Ok(()) => Ok(true),
            Err(StorageError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn phase_claim(&self, app: &str, version: u64) -> Result<Option<Claim>, ApiError> {
        self.read_json(&claim_key(app, version)).await
    }

    /// Claims the phase of `version` with `claim`, or returns the claim that holds.
    async fn claim_phase_as(
        &self,
        app: &str,
        version: u64,
        claim: Claim,
    ) -> Result<Claim, ApiError> {
        let key = claim_key(app, version);
        if self.create_once(&key, to_json(&claim)?).await? {
            return Ok(claim);
        }
        self.phase_claim(app, version)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{key} vanished after it was created")))
    }

    /// Records how the phase ended unless it has a result; returns the result that holds.
    async fn record_phase_result(
        &self,
        app: &str,
        version: u64,
        ended: Ended,
    ) -> Result<Ended, ApiError> {
        let key = result_key(app, version);
        if self.create_once(&key, to_json(&ended)?).await? {
            return Ok(ended);
        }
        self.read_json(&key)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{key} vanished after it was created")))
    }

    /// Fills in where the phase of a release just read stands (its record always says
    /// pending: records are never rewritten).
    pub(crate) async fn fill_phase_state(&self, release: &mut Release) -> Result<(), ApiError> {
        let (app, version) = (release.app.clone(), release.version);
        let Some(phase) = release.phase.as_mut() else {
            return Ok(());
        };
        if let Some(ended) = self.read_json::<Ended>(&result_key(&app, version)).await? {
            phase.state = ended.into();
            return Ok(());
        }
        phase.state = match self.phase_claim(&app, version).await? {
            Some(Claim::Run {
                node, claimed_at, ..
            }) => PhaseState::Running { node, claimed_at },
            // A superseding call that stopped between its claim and its result.
            Some(Claim::Supersede { by }) => PhaseState::Superseded { by },
            None => PhaseState::Pending,
        };
        Ok(())
    }

    /// Supersedes the unclaimed phases of the releases below `version`, down to the release
    /// that serves: a newer release came, and they can never go live. A claimed one goes on
    /// (its release will not serve while a newer one does). Failures are logged: the commit
    /// has succeeded, and a phase left pending is superseded by the next commit or refused
    /// when it ends, since its release is no longer the newest.
    pub(crate) async fn supersede_phases_below(&self, app: &str, version: u64) {
        let by = format!("v{version}");
        for older in (1..version).rev() {
            let release = match self.release_at(app, older).await {
                Ok(Some(release)) => release,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%app, version = older, error = %e, "cannot read a release to supersede its phase");
                    return;
                }
            };
            let Some(phase) = &release.phase else {
                break;
            };
            match &phase.state {
                PhaseState::Succeeded => break,
                PhaseState::Pending => {}
                _ => continue,
            }
            let claim = Claim::Supersede { by: by.clone() };
            let superseded = async {
                if let Claim::Supersede { by } = self.claim_phase_as(app, older, claim).await? {
                    self.record_phase_result(app, older, Ended::Superseded { by })
                        .await?;
                }
                Ok::<(), ApiError>(())
            };
            match superseded.await {
                Ok(()) => {
                    tracing::info!(%app, version = older, by, "pending release phase superseded")
                }
                Err(e) => {
                    tracing::warn!(%app, version = older, error = %e, "cannot supersede a pending release phase")
                }
            }
        }
    }

    /// The release of a phase a node claims or ends, or an answer saying why there is none.
    async fn phase_release(&self, app: &str, version: u64) -> Result<Release, ApiError> {
        let release = self.release(app, version).await?;
        if release.phase.is_none() {
            return Err(ApiError::NotFound(format!(
                "{app:?} v{version} has no release phase"
            )));
        }
        Ok(release)
    }

    /// Claims the phase of `version` for the node that is about to run it. A retry of the same
    /// attempt wins again; anything else is a conflict naming who holds it.
    pub async fn claim_phase(
        &self,
        app: &str,
        version: u64,
        claim: PhaseClaim,
    ) -> Result<Release, ApiError> {
        for (field, value) in [("node", &claim.node), ("attempt", &claim.attempt)] {
            if value.trim().is_empty() || value.len() > MAX_CLAIM_FIELD_LEN {
                return Err(ApiError::BadRequest(format!(
                    "`{field}` must be 1 to {MAX_CLAIM_FIELD_LEN} bytes"
                )));
            }
        }
        let release = self.phase_release(app, version).await?;
        if let Some(phase) = &release.phase
            && phase.ended()
        {
            return Err(ApiError::Conflict(describe(app, version, &phase.state)));
        }
        let wanted = Claim::Run {
            node: one_line(&claim.node, MAX_CLAIM_FIELD_LEN),
            attempt: claim.attempt.clone(),
            claimed_at: now_rfc3339(),
        };
        // Claims of this process go one at a time, as commits do: some S3-compatible servers
        // check `If-None-Match` and then write, so two claims at once could both succeed there.
        let serialised = self.lock_app(app).await;
        let held = self.claim_phase_as(app, version, wanted).await?;
        drop(serialised);
        match held {
            Claim::Run { attempt, .. } if attempt == claim.attempt => {}
            Claim::Run {
                node, claimed_at, ..
            } => {
                return Err(ApiError::Conflict(describe(
                    app,
                    version,
                    &PhaseState::Running { node, claimed_at },
                )));
            }
            Claim::Supersede { by } => {
                return Err(ApiError::Conflict(describe(
                    app,
                    version,
                    &PhaseState::Superseded { by },
                )));
            }
        }
        tracing::info!(%app, version, node = %claim.node, "release phase claimed");
        let mut release = release;
        self.fill_phase_state(&mut release).await?;
        Ok(release)
    }

    /// Records how the phase of `version` ended, with its log. Only the claimant's attempt may
    /// report a success; any node may fail a claimed phase (one it found abandoned). A repeated
    /// report of the result that holds answers the release again.
    pub async fn end_phase(
        &self,
        app: &str,
        version: u64,
        ended: PhaseEnded,
    ) -> Result<Release, ApiError> {
        let result = match &ended.outcome {
            PhaseOutcome::Succeeded => Ended::Succeeded,
            PhaseOutcome::Failed { reason } => {
                let reason = one_line(reason, MAX_PHASE_REASON_CHARS);
                if reason.trim().is_empty() {
                    return Err(ApiError::BadRequest(
                        "say why the release phase failed in `reason`".into(),
                    ));
                }
                Ended::Failed { reason }
            }
        };
        let release = self.phase_release(app, version).await?;
        match self.phase_claim(app, version).await? {
            None => {
                return Err(ApiError::Conflict(format!(
                    "the release phase of {app:?} v{version} is not claimed; claim it before running it"
                )));
            }
            Some(Claim::Supersede { by }) => {
                return Err(ApiError::Conflict(describe(
                    app,
                    version,
                    &PhaseState::Superseded { by },
                )));
            }
            Some(Claim::Run { attempt, node, .. }) => {
                if result == Ended::Succeeded && attempt != ended.attempt {
                    return Err(ApiError::Conflict(format!(
                        "the release phase of {app:?} v{version} is claimed by another run on {node}; only that run may report a success"
                    )));
                }
            }
        }
        // One end at a time within this process, for the same reason as claims.
        let _serialised = self.lock_app(app).await;
        // The log first, so a result never stands without the output that explains it.
        self.create_once(
            &log_key(app, version),
            Bytes::copy_from_slice(tail(&ended.log, MAX_BUILD_LOG_BYTES).as_bytes()),
        )
        .await?;
        let held = self
            .record_phase_result(app, version, result.clone())
            .await?;
        if held != result {
            let mut release = release;
            self.fill_phase_state(&mut release).await?;
            let state = release
                .phase
                .map(|p| p.state)
                .unwrap_or(PhaseState::Pending);
            return Err(ApiError::Conflict(describe(app, version, &state)));
        }
        tracing::info!(%app, version, ?result, "release phase ended");
        let mut release = release;
        self.fill_phase_state(&mut release).await?;
        Ok(release)
    }

    /// The stored output of the phase of `version`, or a 404 when it has none yet.
    pub async fn phase_log(&self, app: &str, version: u64) -> Result<Bytes, ApiError> {
        self.phase_release(app, version).await?;
        match self.count_storage_error(self.storage().read(&log_key(app, version)).await)? {
            Some(stored) => Ok(stored.bytes),
            None => Err(ApiError::NotFound(format!(
                "the release phase of {app:?} v{version} has no log; one is stored when it ends"
            ))),
        }
    }

    /// Releases whose phase has not ended, across apps, oldest first within an app, at most
    /// [`MAX_LISTED_PHASES`]: what Beacon places on nodes. They sit above the release that
    /// serves, so each app's walk stops there.
    pub async fn unended_phases(&self) -> Result<Vec<Release>, ApiError> {
        let mut listed = Vec::new();
        for app in self.app_names().await? {
            let Some(pointer) = self.pointer(&app).await? else {
                continue;
            };
            let Some(newest) = self.newest(&app, pointer).await? else {
                continue;
            };
            let mut unended = Vec::new();
            for version in (1..=newest.version).rev() {
                let Some(release) = self.release_at(&app, version).await? else {
                    break;
                };
                let Some(phase) = &release.phase else {
                    break;
                };
                match phase.state {
                    PhaseState::Succeeded => break,
                    PhaseState::Pending | PhaseState::Running { .. } => unended.push(release),
                    _ => {}
                }
            }
            for release in unended.into_iter().rev() {
                if listed.len() >= MAX_LISTED_PHASES {
                    return Ok(listed);
                }
                listed.push(release);
            }
        }
        Ok(listed)
    }

    /// Deletes the phase objects of release `version` (retention, with its record).
    pub(crate) async fn delete_phase(&self, app: &str, version: u64) -> Result<(), ApiError> {
        for key in [
            result_key(app, version),
            log_key(app, version),
            claim_key(app, version),
        ] {
            self.count_storage_error(self.storage().delete(&key).await)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_deploy_naming_a_release_command_has_a_phase() {
        let with = AppManifest::parse(
            "name = \"a\"\nrun = \"serve\"\n[processes.release]\ncommand = \"migrate\"\ntimeout = \"3s\"\n",
        )
        .unwrap();
        let phase = pending_phase(&with).unwrap();
        assert_eq!(phase.command, "migrate");
        assert_eq!(phase.timeout_secs, 3);
        assert_eq!(phase.state, PhaseState::Pending);
        let without = AppManifest::parse("name = \"a\"\nrun = \"serve\"\n").unwrap();
        assert_eq!(pending_phase(&without), None);
    }
}
