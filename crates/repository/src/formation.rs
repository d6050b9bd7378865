//! An app's formation (docs/src/design/processes.md, "Formation"): the counts set with
//! `em scale`, stored beside the app's releases in `apps/<app>/formation.json`. It is no
//! release: scaling makes none and rebuilds nothing. Only the counts set are stored; the
//! defaults come from the current release (`px_proto::process::formation`), so a deploy that
//! adds a type runs one of it without anyone scaling it.
//!
//! Two `em scale` calls at once lose no change: each reads the record with its version,
//! merges its own counts, and writes back only if the record is still that version (created
//! only if absent the first time), starting again from a fresh read when another write came
//! first (and within one repository, one at a time per app).

use std::collections::BTreeMap;

use bytes::Bytes;
use px_proto::api::{Formation, FormationEntry, Release};
use px_proto::procfile::WEB_PROCESS;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// Attempts at writing a formation before giving up; each failure means another `em scale`
/// of the same app wrote in between, so reaching this takes dozens of them at once.
pub const MAX_SCALE_ATTEMPTS: usize = 32;

/// The stored form of `apps/<app>/formation.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FormationRecord {
    /// The counts set, by type.
    counts: BTreeMap<String, u32>,
}

fn formation_key(app: &str) -> String {
    format!("apps/{app}/formation.json")
}

impl Releases {
    /// The stored record and its version (`None`: never scaled).
    async fn formation_record(
        &self,
        app: &str,
    ) -> Result<(FormationRecord, Option<String>), ApiError> {
        let key = formation_key(app);
        match self.count_storage_error(self.storage().read(&key).await)? {
            None => Ok((FormationRecord::default(), None)),
            Some(stored) => {
                let record = serde_json::from_slice(&stored.bytes)
                    .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}")))?;
                Ok((record, Some(stored.version)))
            }
        }
    }

    /// The counts set with `em scale` for `app` (empty when never scaled).
    pub(crate) async fn explicit_formation(
        &self,
        app: &str,
    ) -> Result<BTreeMap<String, u32>, ApiError> {
        Ok(self.formation_record(app).await?.0.counts)
    }

    /// Sets the counts of the types `change` names, checked against the current release (so
    /// an unknown type is refused naming the types it has); the other types keep theirs.
    /// Returns the current release and the whole formation.
    pub async fn scale(
        &self,
        app: &str,
        change: &BTreeMap<String, u32>,
    ) -> Result<(Release, Formation), ApiError> {
        // Scales of one app in this process go one at a time, and not during a commit of it,
        // so the release checked is the one current when the record is written. Several
        // repositories sharing storage still rely on its compare-and-swap; some S3-compatible
        // servers check then write, and this lock keeps a single repository correct on them.
        let _serialised = self.lock_app(app).await;
        let current = self.current(app).await?;
        px_proto::process::check_scale(&current.manifest, change).map_err(ApiError::BadRequest)?;
        let key = formation_key(app);
        for _ in 0..MAX_SCALE_ATTEMPTS {
            let (mut record, version) = self.formation_record(app).await?;
            record
                .counts
                .extend(change.iter().map(|(k, v)| (k.clone(), *v)));
            let bytes = Bytes::from(
                serde_json::to_vec_pretty(&record)
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            let written = match &version {
                Some(version) => self.storage().replace(&key, bytes, version).await,
                None => self.storage().create(&key, bytes).await,
            };
            match self.count_storage_error(written) {
                Ok(()) => {
                    tracing::info!(%app, ?change, "formation changed");
                    let formation = view(app, Some(&current), &record.counts);
                    return Ok((current, formation));
                }
                Err(StorageError::Conflict(_) | StorageError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "too many concurrent changes of {app:?}'s formation; retry in a moment"
        )))
    }

    /// The whole formation of `app`: every type of its current release with its count.
    pub async fn formation(&self, app: &str) -> Result<Formation, ApiError> {
        let app_record = self.app(app).await?;
        Ok(view(
            app,
            app_record.current.as_ref(),
            &app_record.formation,
        ))
    }
}

/// The formation as `GET /v1/apps/{app}/formation` answers it, `web` first.
fn view(app: &str, current: Option<&Release>, explicit: &BTreeMap<String, u32>) -> Formation {
    let mut processes: Vec<FormationEntry> = current
        .map(|release| px_proto::process::formation(&release.manifest, explicit))
        .unwrap_or_default()
        .into_iter()
        .map(|(process, count)| FormationEntry {
            explicit: explicit.contains_key(&process),
            process,
            count,
        })
        .collect();
    processes.sort_by_key(|e| (e.process != WEB_PROCESS, e.process.clone()));
    Formation {
        app: app.to_string(),
        release: current.map(|r| r.version),
        processes,
    }
}
