//! What the hub keeps on disk: the assignment generation (`generation.json`) and each app's
//! rollout history (`rollouts/<app>.json`), each written whole and durably through
//! `px_runtime::fs::write_atomic`, never while the hub's lock is held.
//!
//! # The order of writes
//!
//! The generation must never go backwards across a restart: a Maestro ignores an assignment
//! whose generation is not above the one it applied, so a Beacon that came back with an older
//! one would be ignored until the desired state changed enough times to catch up. Hence:
//!
//! 1. A desired-state update takes the hub's `publishing` lock (an async mutex, held across
//!    the write), then, under the state lock, computes the new generation and what to write,
//!    and releases the state lock.
//! 2. It writes `generation.json` (fsync, rename, directory fsync), with no lock on the state.
//! 3. Only then, under the state lock again, it marks the generation durable and publishes
//!    every node's assignment (the `watch` its link sends from). A node that attaches between
//!    1 and 3 is given no assignment at attach; step 3 publishes to it with the others.
//! 4. It releases `publishing`.
//!
//! Because updates hold `publishing` from 1 to 4, they write and publish one after the other:
//! a later generation is never written before an earlier one, so the file only grows, and
//! every generation a node was sent is on disk before it was sent. If the write fails, nothing
//! is published and the next update (the reconciler's next read at the latest) tries again.
//!
//! Rollout histories are a record for people, not state anything depends on; still, two
//! changes may write one app's history from different tasks. Each snapshot is numbered under
//! the state lock and written only if its number is above the last one written for that app,
//! so an older snapshot never replaces a newer one on disk.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use px_proto::beacon::RolloutRecord;
use serde::{Deserialize, Serialize};

use crate::shared_state::PendingHistories;

/// File, in the data directory, that keeps the generation across restarts.
const GENERATION_FILE: &str = "generation.json";
/// Directory, in the data directory, of each app's rollout history (`<app>.json`).
pub const ROLLOUTS_DIR: &str = "rollouts";
/// Rollouts remembered per app for `em releases`.
pub const MAX_ROLLOUT_HISTORY: usize = 20;

/// What survives a restart, so generations only grow and an unchanged desired state is not
/// assigned twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Persisted {
    pub generation: u64,
    /// `app@version` of every desired release at that generation.
    pub desired: Vec<String>,
}

/// One app's rollout history as it stood at one moment, to write.
pub(super) struct HistorySnapshot {
    pub app: String,
    /// Taken from `State::history_seq`: a higher number is a newer snapshot.
    pub seq: u64,
    pub records: Vec<RolloutRecord>,
}

/// The hub's files.
pub(super) struct Store {
    data_dir: PathBuf,
    /// The number of the last history snapshot written, per app. Held while writing, so the
    /// check and the write are one step.
    histories_written: Arc<Mutex<BTreeMap<String, u64>>>,
    /// With a lease: where each newer history also goes, for the shared storage's writer.
    shared: Option<Arc<PendingHistories>>,
}

impl Store {
    /// Reads the generation and every app's history, creating the history directory if
    /// needed. A missing generation file is generation 0 (a first start); one that does not
    /// parse is logged and read as 0 too, since refusing to start would not bring it back.
    pub fn open(
        data_dir: &Path,
        shared: Option<Arc<PendingHistories>>,
    ) -> io::Result<(Self, Persisted, BTreeMap<String, VecDeque<RolloutRecord>>)> {
        let path = data_dir.join(GENERATION_FILE);
        let persisted = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "unreadable assignment generation; starting from 0");
                Persisted::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the assignment generation; starting from 0");
                Persisted::default()
            }
        };
        let rollouts = data_dir.join(ROLLOUTS_DIR);
        if !rollouts.is_dir() {
            std::fs::create_dir_all(&rollouts)
                .and_then(|()| px_runtime::fs::sync_dir(data_dir))
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("creating {}: {e}", rollouts.display()))
                })?;
        }
        let history = load_history(&rollouts);
        let store = Self {
            data_dir: data_dir.to_path_buf(),
            histories_written: Arc::default(),
            shared,
        };
        Ok((store, persisted, history))
    }

    /// Writes the generation durably.
    pub async fn write_generation(&self, persisted: &Persisted) -> io::Result<()> {
        let bytes = serde_json::to_vec(persisted).map_err(io::Error::other)?;
        px_runtime::fs::write_atomic_async(self.data_dir.join(GENERATION_FILE), bytes).await
    }

    /// Writes an app's history unless a newer snapshot of it was written already; failures
    /// are logged (the history is a record, Beacon goes on without it).
    pub async fn write_history(&self, snapshot: HistorySnapshot) {
        let path = self
            .data_dir
            .join(ROLLOUTS_DIR)
            .join(format!("{}.json", snapshot.app));
        let written = self.histories_written.clone();
        let shared = self.shared.clone();
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut written = written.lock().unwrap_or_else(|p| p.into_inner());
            if written
                .get(&snapshot.app)
                .is_some_and(|last| *last >= snapshot.seq)
            {
                return Ok(());
            }
            if let Some(shared) = shared {
                shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(snapshot.app.clone(), snapshot.records.clone());
            }
            let bytes = serde_json::to_vec(&snapshot.records).map_err(io::Error::other)?;
            px_runtime::fs::write_atomic(&target, &bytes)?;
            written.insert(snapshot.app, snapshot.seq);
            Ok(())
        })
        .await
        .map_err(io::Error::other)
        .and_then(|written| written);
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot persist the rollout history");
        }
    }
}

/// Reads every app's rollout history; a file that does not parse is skipped with a warning
/// (the history is a record for people, not state anything depends on).
fn load_history(dir: &Path) -> BTreeMap<String, VecDeque<RolloutRecord>> {
    let mut history = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return history;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(app) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| px_proto::names::check_app_name(n).is_ok())
        else {
            continue;
        };
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<VecDeque<RolloutRecord>>(&b).map_err(|e| e.to_string())
            }) {
            Ok(mut records) => {
                records.truncate(MAX_ROLLOUT_HISTORY);
                history.insert(app.to_string(), records);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable rollout history")
            }
        }
    }
    history
}
