//! Bundles and layers a sweep is about to delete, marked in the shared storage
//! (`condemned/bundles/<digest>`, `condemned/layers/<digest>`), so that a sweep on one apprepo
//! and a commit through another, which share no lock, never leave a release pointing at
//! nothing. Within one apprepo the collection lock (`releases.rs`) already keeps them apart.
//!
//! The protocol, for an object no record points to:
//! 1. The sweep marks it, waits `retention.condemn_wait` (longer than [`COMMIT_WINDOW`]), lists
//!    the records again, and deletes only what is still unreferenced and still marked,
//!    starting the delete within [`DELETE_WITHIN`] of seeing the mark.
//! 2. A commit that names an object first removes its mark if there is one (and then waits
//!    [`RESCUE_SETTLE`], longer than `DELETE_WITHIN`, so a delete already started has
//!    happened), then checks that the object is stored, and creates its record within
//!    `COMMIT_WINDOW` of that check, or is refused.
//!
//! So either the commit saw no mark, and its record existed before the sweep listed the
//! records again (the mark came after the check, and the listing more than `COMMIT_WINDOW`
//! after the mark); or it took the mark away, and the sweep either saw that and kept the
//! object, or had already started the delete, which the commit's second look sees: it is
//! refused ("upload it again") instead of pointing at nothing.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::releases::Releases;
use crate::storage::{Blob, StorageError};

/// The longest a commit may take from its check that its objects are stored to the creation of
/// its record (milliseconds in practice); a slower one is refused and retried.
pub const COMMIT_WINDOW: Duration = Duration::from_secs(30);
/// How long a commit that took a mark away waits before it checks the object is stored.
pub const RESCUE_SETTLE: Duration = Duration::from_secs(5);
/// A sweep starts a delete within this of reading the object's mark, or keeps the object.
pub const DELETE_WITHIN: Duration = Duration::from_millis(2500);

fn mark_key(blob: Blob, sha256: &str) -> String {
    match blob {
        Blob::Bundle => format!("condemned/bundles/{sha256}"),
        Blob::Layer => format!("condemned/layers/{sha256}"),
    }
}

/// The stored form of a mark.
#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    /// When the sweep marked the object, in seconds since the epoch (for operators).
    condemned_at: u64,
}

impl Releases {
    /// Marks an unreferenced object the sweep means to delete after its wait.
    pub(crate) async fn condemn(&self, blob: Blob, sha256: &str) -> Result<(), StorageError> {
        let condemned_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let bytes = Bytes::from(
            serde_json::to_vec(&Mark { condemned_at })
                .map_err(|e| StorageError::Failed(e.to_string()))?,
        );
        let key = mark_key(blob, sha256);
        match self.storage().create(&key, bytes.clone()).await {
            Ok(()) => Ok(()),
            // A mark from an earlier sweep: mark it afresh, so the wait counts from now.
            Err(StorageError::AlreadyExists(_)) => match self.storage().read(&key).await? {
                Some(stored) => match self.storage().replace(&key, bytes, &stored.version).await {
                    Ok(()) | Err(StorageError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e),
                },
                None => self.storage().create(&key, bytes).await,
            },
            Err(e) => Err(e),
        }
    }

    /// Whether the object is marked.
    pub(crate) async fn is_condemned(
        &self,
        blob: Blob,
        sha256: &str,
    ) -> Result<bool, StorageError> {
        Ok(self
            .storage()
            .read(&mark_key(blob, sha256))
            .await?
            .is_some())
    }

    /// Removes the object's mark; whether there was one (a commit rescuing it, or a sweep
    /// that found it referenced again).
    pub(crate) async fn unmark(&self, blob: Blob, sha256: &str) -> Result<bool, StorageError> {
        let key = mark_key(blob, sha256);
        if self.storage().read(&key).await?.is_none() {
            return Ok(false);
        }
        self.storage().delete(&key).await?;
        Ok(true)
    }
}
