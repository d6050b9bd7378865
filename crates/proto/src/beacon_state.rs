//! Beacon's state in apprepo's storage (docs/src/design/control-hosts.md, "What the next active
//! Beacon needs"): small documents the active Beacon writes under `beacon-state/` through
//! `PUT /v1/beacon-state/{name}?holder=&epoch=`, fenced by the `beacon` lease, and its successor
//! reads on takeover: the alert dedup state, each app's rollout history and the event log's
//! tail as append-only chunks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::beacon::{Event, RolloutRecord};

/// Largest document apprepo stores: an event chunk of a busy second, the dedup state of a few
/// thousand keys or a rollout history of twenty records each fit with room to spare, and the
/// successor reads the whole tail within a second or two.
pub const MAX_STATE_DOCUMENT_BYTES: usize = 512 * 1024;
/// Most documents apprepo keeps under `beacon-state/`, whatever their kind: event chunks are
/// pruned to [`MAX_EVENT_CHUNKS`], so the rest leaves room for this many apps' histories.
pub const MAX_STATE_DOCUMENTS: usize = 2048;
/// Event chunks kept: apprepo deletes the oldest past this count on each new chunk. The
/// active Beacon writes at most one chunk per [`EVENT_CHUNK_INTERVAL_MS`] while events come,
/// so this is at least four minutes of a busy cluster and days of a quiet one.
pub const MAX_EVENT_CHUNKS: usize = 256;
/// How often the active Beacon writes a chunk of its new events (and the dedup state, when it
/// changed): what a crash of the active Beacon may lose of the log.
pub const EVENT_CHUNK_INTERVAL_MS: u64 = 1_000;
/// Longest document name.
pub const MAX_STATE_NAME_LEN: usize = 100;
/// The alert dedup state's document.
pub const ALERTS_DOCUMENT: &str = "alerts";
/// Prefix of each app's rollout history document: `rollouts-<app>`.
pub const ROLLOUTS_PREFIX: &str = "rollouts-";
/// Prefix of each event chunk: `events-<first seq, 20 digits>`, so names sort as seqs do.
pub const EVENTS_PREFIX: &str = "events-";

/// The name of the event chunk whose first event has `first_seq`.
pub fn event_chunk_name(first_seq: u64) -> String {
    format!("{EVENTS_PREFIX}{first_seq:020}")
}

/// The name of `app`'s rollout history document.
pub fn rollouts_name(app: &str) -> String {
    format!("{ROLLOUTS_PREFIX}{app}")
}

/// Checks a document name: 1 to [`MAX_STATE_NAME_LEN`] lowercase letters, digits and `-`,
/// starting with a letter. Returns what to fix.
pub fn check_state_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STATE_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "state document name {name:?} must be 1 to {MAX_STATE_NAME_LEN} lowercase letters, digits and '-', starting with a letter (e.g. \"alerts\", \"rollouts-shop\")"
        ))
    }
}

/// `?holder=&epoch=` of a write: who writes, under which epoch of the `beacon` lease. apprepo
/// stores the document only while that holder holds the lease at that epoch, so a Beacon that
/// lost the lease (stalled, cut off) can no longer overwrite what its successor keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateWriter {
    pub holder: String,
    pub epoch: u64,
}

/// `GET /v1/beacon-state?prefix=`: the names of the stored documents, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateList {
    pub names: Vec<String>,
}

/// The [`ALERTS_DOCUMENT`]: when each alert key was last sent, in milliseconds since the Unix
/// epoch, so a successor suppresses what its predecessor sent within the dedup window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertState {
    pub last_sent_unix_ms: BTreeMap<String, u64>,
}

/// An event chunk: events in seq order, all recorded under one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChunk {
    pub events: Vec<Event>,
}

/// A rollout history document: the records, newest first, as `rollouts/<app>.json` holds them.
pub type RolloutHistory = Vec<RolloutRecord>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunk_names_sort_as_their_seqs_and_every_name_made_here_passes() {
        let low = event_chunk_name(9);
        let high = event_chunk_name(1 << 33);
        assert!(low < high);
        for name in [low, high, rollouts_name("shop"), ALERTS_DOCUMENT.into()] {
            assert!(check_state_name(&name).is_ok(), "{name}");
        }
        for bad in [
            "",
            "../x",
            "Alerts",
            "1x",
            &"a".repeat(MAX_STATE_NAME_LEN + 1),
        ] {
            assert!(check_state_name(bad).is_err(), "{bad}");
        }
    }
}
