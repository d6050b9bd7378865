//! Beacon's state documents in the storage (docs/src/design/control-hosts.md, "What the next
//! active Beacon needs"): `beacon-state/<name>.json`, written only by the holder of the `beacon`
//! lease at its current epoch, read by its successor on takeover. Event chunks past
//! `MAX_EVENT_CHUNKS` are deleted here, oldest first, as each new one is written.

use bytes::Bytes;
use px_proto::beacon_state::{
    EVENTS_PREFIX, MAX_EVENT_CHUNKS, MAX_STATE_DOCUMENT_BYTES, MAX_STATE_DOCUMENTS, StateWriter,
    check_state_name,
};
use px_proto::lease::BEACON_LEASE;

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// Where the documents live, one `<name>.json` each.
pub const STATE_PREFIX: &str = "beacon-state/";
/// Attempts at writing one document when another write of it comes in between (a retried
/// request racing its first try): each attempt reads the version again.
const MAX_WRITE_ATTEMPTS: usize = 4;

fn state_key(name: &str) -> String {
    format!("{STATE_PREFIX}{name}.json")
}

fn check_name(name: &str) -> Result<(), ApiError> {
    check_state_name(name).map_err(ApiError::BadRequest)
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Releases {
    /// A document's bytes, or `None` when it was never written (or was pruned).
    pub(crate) async fn beacon_state(&self, name: &str) -> Result<Option<Bytes>, ApiError> {
        check_name(name)?;
        let stored = self.count_storage_error(self.storage().read(&state_key(name)).await)?;
        Ok(stored.map(|s| s.bytes))
    }

    /// The names of the stored documents that start with `prefix`, sorted.
    pub(crate) async fn beacon_state_names(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
        let names = self.count_storage_error(self.storage().list(STATE_PREFIX).await)?;
        Ok(names
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
            .filter(|n| n.starts_with(prefix) && check_state_name(n).is_ok())
            .collect())
    }

    /// Stores `bytes` (a JSON document of at most `MAX_STATE_DOCUMENT_BYTES`) as `name` for
    /// `writer`, who must hold the `beacon` lease at `writer.epoch` now: a Beacon that lost the
    /// lease is refused (409), whatever it believes. The check is a read of the lease before
    /// the write, not one atomic step; a holder steps down a sixth of its TTL before its lease
    /// could lapse, so a write it started while holding lands before a successor is granted.
    pub(crate) async fn put_beacon_state(
        &self,
        name: &str,
        writer: &StateWriter,
        bytes: Bytes,
    ) -> Result<(), ApiError> {
        check_name(name)?;
        if bytes.len() > MAX_STATE_DOCUMENT_BYTES {
            return Err(too_large(bytes.len()));
        }
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("a state document is JSON: {e}")))?;
        self.check_writer(writer).await?;
        let key = state_key(name);
        let is_chunk = name.starts_with(EVENTS_PREFIX);
        let mut names = None;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let stored = self.count_storage_error(self.storage().read(&key).await)?;
            let written = match &stored {
                Some(stored) => {
                    self.storage()
                        .replace(&key, bytes.clone(), &stored.version)
                        .await
                }
                None => {
                    // A new name counts against the bound; chunks are pruned right after.
                    let all = self.beacon_state_names("").await?;
                    let chunks = all.iter().filter(|n| n.starts_with(EVENTS_PREFIX)).count();
                    let others = all.len() - chunks;
                    if !is_chunk && others + MAX_EVENT_CHUNKS >= MAX_STATE_DOCUMENTS {
                        return Err(ApiError::Conflict(format!(
                            "apprepo keeps at most {MAX_STATE_DOCUMENTS} Beacon state documents ({MAX_EVENT_CHUNKS} of them event chunks); {name:?} would be one more"
                        )));
                    }
                    names = Some(all);
                    self.storage().create(&key, bytes.clone()).await
                }
            };
            match self.count_storage_error(written) {
                Ok(()) => {
                    if is_chunk && let Some(all) = names {
                        self.prune_event_chunks(all, name).await;
                    }
                    return Ok(());
                }
                Err(StorageError::AlreadyExists(_) | StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "{key} changed {MAX_WRITE_ATTEMPTS} times while being written; retry"
        )))
    }

    /// Refuses a writer that does not hold the `beacon` lease at its epoch now.
    async fn check_writer(&self, writer: &StateWriter) -> Result<(), ApiError> {
        let lease = self.lease(BEACON_LEASE).await?;
        match lease {
            Some(lease)
                if lease.holder == writer.holder
                    && lease.epoch == writer.epoch
                    && lease.expires_at_unix_ms > unix_ms_now() =>
            {
                Ok(())
            }
            Some(lease) => Err(ApiError::Conflict(format!(
                "stale epoch: {:?} at epoch {} may not write Beacon state; the beacon lease is {:?}'s at epoch {}{}",
                writer.holder,
                writer.epoch,
                lease.holder,
                lease.epoch,
                if lease.expires_at_unix_ms <= unix_ms_now() {
                    " and has lapsed"
                } else {
                    ""
                }
            ))),
            None => Err(ApiError::Conflict(format!(
                "stale epoch: no one holds the beacon lease, so {:?} at epoch {} may not write Beacon state",
                writer.holder, writer.epoch
            ))),
        }
    }

    /// Deletes the oldest event chunks past `MAX_EVENT_CHUNKS`, given the names stored before
    /// `written` was added. Best effort: a chunk left over is deleted on the next write.
    async fn prune_event_chunks(&self, mut all: Vec<String>, written: &str) {
        all.retain(|n| n.starts_with(EVENTS_PREFIX) && n != written);
        all.push(written.to_string());
        all.sort();
        let excess = all.len().saturating_sub(MAX_EVENT_CHUNKS);
        for old in all.into_iter().take(excess) {
            if let Err(e) = self.storage().delete(&state_key(&old)).await {
                self.metrics().storage_errors.inc();
                tracing::warn!(chunk = %old, "cannot delete an old event chunk: {e}");
            }
        }
    }
}

/// The answer to a document over the bound.
pub(crate) fn too_large(len: usize) -> ApiError {
    ApiError::BadRequest(format!(
        "a Beacon state document is at most {MAX_STATE_DOCUMENT_BYTES} bytes; this one is {len}: split it (event chunks) or keep fewer entries"
    ))
}
