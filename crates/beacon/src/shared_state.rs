//! What the next active Beacon needs, kept in the shared storage through apprepo
//! (docs/src/design/control-hosts.md, "What the next active Beacon needs"): with `[lease]`, the
//! active Beacon writes its new events as append-only chunks, its alert dedup state and each
//! app's rollout history to `/v1/beacon-state/*`, fenced by its lease's epoch; a Beacon that
//! takes the lease over reads them before it starts acting, so `em events` goes on from the
//! predecessor's events, no alert it sent is sent again within the window, and no finished
//! rollout is recorded again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use px_proto::beacon::{Event, RolloutRecord};
use px_proto::beacon_state::{
    ALERTS_DOCUMENT, AlertState, EVENT_CHUNK_INTERVAL_MS, EVENTS_PREFIX, EventChunk,
    MAX_STATE_DOCUMENT_BYTES, ROLLOUTS_PREFIX, RolloutHistory, StateList, event_chunk_name,
    rollouts_name,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::alerts::Alerter;
use crate::events::{EVENTS_IN_MEMORY, EventLog, MAX_PAGE};
use crate::reconcile::RepositoryClient;

/// Rollout histories written since the writer's last pass, newest per app: the hub's store
/// puts them here, the writer takes them. Bounded by the number of apps.
pub type PendingHistories = Mutex<BTreeMap<String, Vec<RolloutRecord>>>;

/// Bytes of events one chunk takes at most: half the document bound, leaving room for the
/// JSON around them and for an event's serialized form being longer than estimated.
const CHUNK_BUDGET_BYTES: usize = MAX_STATE_DOCUMENT_BYTES / 2;
/// Event chunks read at once on takeover: the tail of 256 chunks in a few round trips.
const PARALLEL_READS: usize = 8;
/// Deadline of one write to apprepo: a write that hangs is retried on the next pass.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a write did not land.
enum WriteError {
    /// apprepo refused the epoch: another Beacon holds the lease now. Nothing more is written.
    Stale(String),
    /// apprepo could not be reached or failed; the next pass tries again.
    Failed(String),
}

/// The active Beacon's side of `/v1/beacon-state`.
pub struct SharedState {
    client: RepositoryClient,
    holder: String,
    epoch: u64,
}

impl SharedState {
    /// Writes as `holder` under the lease's `epoch`.
    pub fn new(client: RepositoryClient, holder: String, epoch: u64) -> Self {
        Self {
            client,
            holder,
            epoch,
        }
    }

    async fn put<T: Serialize>(&self, name: &str, document: &T) -> Result<(), WriteError> {
        let path = format!(
            "/v1/beacon-state/{name}?holder={}&epoch={}",
            self.holder, self.epoch
        );
        match self
            .client
            .put_answered(&path, document, WRITE_TIMEOUT)
            .await
        {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((_, body)) => Err(WriteError::Stale(String::from_utf8_lossy(&body).into())),
            Err(e) => Err(WriteError::Failed(e)),
        }
    }

    async fn names(&self, prefix: &str) -> Result<Vec<String>, String> {
        let list: Option<StateList> = self
            .client
            .get(&format!("/v1/beacon-state?prefix={prefix}"))
            .await?;
        Ok(list.unwrap_or_default().names)
    }

    /// Reads what the predecessor kept, before this Beacon acts: the dedup state into
    /// `alerter`, each app's rollout history into `data_dir/rollouts/` (where the hub reads
    /// it), and the newest event chunks, up to `EVENTS_IN_MEMORY` events, into `events`. What
    /// cannot be read is logged and skipped: a Beacon that holds the lease acts, with less
    /// history rather than none at all.
    pub async fn load(&self, data_dir: &Path, events: &EventLog, alerter: &Alerter) {
        match self
            .client
            .get::<AlertState>(&format!("/v1/beacon-state/{ALERTS_DOCUMENT}"))
            .await
        {
            Ok(Some(state)) => {
                let taken = alerter.adopt_dedup(&state);
                tracing::info!(keys = taken, "took over the alert dedup state");
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "cannot read the alert dedup state; alerts the previous Beacon sent may be sent again")
            }
        }
        if let Err(error) = self.load_histories(data_dir).await {
            tracing::error!(%error, "cannot read the rollout histories; finished rollouts may be recorded again");
        }
        match self.load_events().await {
            Ok(tail) => {
                let read = tail.len();
                let adopted = events.adopt(tail);
                tracing::info!(read, adopted, "took over the event log's tail");
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the event log's tail; `em events` starts with this Beacon's")
            }
        }
    }

    async fn load_histories(&self, data_dir: &Path) -> Result<(), String> {
        let dir = data_dir.join(crate::hub::ROLLOUTS_DIR);
        for name in self.names(ROLLOUTS_PREFIX).await? {
            let Some(app) = name
                .strip_prefix(ROLLOUTS_PREFIX)
                .filter(|app| px_proto::names::check_app_name(app).is_ok())
            else {
                continue;
            };
            let Some(history) = self
                .client
                .get::<RolloutHistory>(&format!("/v1/beacon-state/{name}"))
                .await?
            else {
                continue;
            };
            let bytes = serde_json::to_vec(&history).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    px_runtime::fs::write_atomic(&dir.join(format!("{app}.json")), &bytes)
                })
                .map_err(|e| format!("writing {app}'s rollout history: {e}"))?;
        }
        Ok(())
    }

    /// The newest chunks' events, oldest first, about `EVENTS_IN_MEMORY` of them.
    async fn load_events(&self) -> Result<Vec<Event>, String> {
        let mut names = self.names(EVENTS_PREFIX).await?;
        names.sort();
        let mut newest_first: Vec<Vec<Event>> = Vec::new();
        let mut count = 0;
        for batch in names.rchunks(PARALLEL_READS) {
            let reads = batch.iter().rev().map(|name| async move {
                let path = format!("/v1/beacon-state/{name}");
                self.client.get::<EventChunk>(&path).await
            });
            for chunk in join_all(reads).await {
                // A chunk pruned since the listing is simply not there.
                let events = chunk?.map(|c| c.events).unwrap_or_default();
                count += events.len();
                newest_first.push(events);
            }
            if count >= EVENTS_IN_MEMORY {
                break;
            }
        }
        Ok(newest_first.into_iter().rev().flatten().collect())
    }

    /// Writes, every `EVENT_CHUNK_INTERVAL_MS`, the events recorded above `floor` since the
    /// last pass (one chunk, or more when they do not fit one), the dedup state when it
    /// changed, and the rollout histories written meanwhile; once more at shutdown, before the
    /// lease is released. Stops writing when apprepo says another Beacon holds the lease.
    pub async fn run(
        self,
        floor: u64,
        events: Arc<EventLog>,
        alerter: Alerter,
        histories: Arc<PendingHistories>,
        shutdown: CancellationToken,
    ) {
        let mut pass = Pass {
            flushed_seq: floor,
            alerts_written: alerter.dedup_changes(),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(EVENT_CHUNK_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            match self.pass(&mut pass, &events, &alerter, &histories).await {
                Ok(()) => {}
                Err(WriteError::Failed(error)) => {
                    tracing::warn!(%error, "cannot write Beacon state to apprepo; retrying")
                }
                Err(WriteError::Stale(error)) => {
                    tracing::error!(%error, "apprepo refused Beacon state: another Beacon holds the lease; no more state is written");
                    return;
                }
            }
            if last {
                return;
            }
        }
    }

    async fn pass(
        &self,
        pass: &mut Pass,
        events: &EventLog,
        alerter: &Alerter,
        histories: &PendingHistories,
    ) -> Result<(), WriteError> {
        loop {
            let page = events.page(Some(pass.flushed_seq), MAX_PAGE, None);
            let full = page.len() == MAX_PAGE;
            for chunk in chunks(page) {
                let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                    continue;
                };
                let (name, last) = (event_chunk_name(first.seq), last.seq);
                self.put(&name, &EventChunk { events: chunk }).await?;
                pass.flushed_seq = last;
            }
            if !full {
                break;
            }
        }
        let changes = alerter.dedup_changes();
        if changes != pass.alerts_written {
            self.put(ALERTS_DOCUMENT, &alerter.export_dedup()).await?;
            pass.alerts_written = changes;
        }
        let pending =
            std::mem::take(&mut *histories.lock().unwrap_or_else(PoisonError::into_inner));
        let mut unwritten = pending.into_iter();
        while let Some((app, records)) = unwritten.next() {
            if let Err(e) = self.put(&rollouts_name(&app), &records).await {
                // Put back what is left, unless a newer history came meanwhile.
                let mut again = histories.lock().unwrap_or_else(PoisonError::into_inner);
                for (app, records) in std::iter::once((app, records)).chain(unwritten) {
                    again.entry(app).or_insert(records);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Where the writer stands.
struct Pass {
    /// The newest event written to a chunk (the floor before the first).
    flushed_seq: u64,
    /// `Alerter::dedup_changes` when the dedup state was last written.
    alerts_written: u64,
}

/// Cuts events into chunks of at most `CHUNK_BUDGET_BYTES` of serialized events each.
fn chunks(events: Vec<Event>) -> Vec<Vec<Event>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for event in events {
        let size = serde_json::to_vec(&event).map_or(0, |b| b.len()) + 1;
        if !current.is_empty() && bytes + size > CHUNK_BUDGET_BYTES {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(event);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::events::{EventDraft, MAX_DETAIL_BYTES};

    #[test]
    fn chunks_stay_within_the_document_bound_and_keep_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for _ in 0..MAX_PAGE {
            let mut draft = EventDraft::new(px_proto::beacon::EventKind::AppEvent, "big");
            draft.detail = Some("d".repeat(MAX_DETAIL_BYTES));
            log.record(draft);
        }
        let page = log.page(None, MAX_PAGE, None);
        let cut = chunks(page.clone());
        assert!(cut.len() > 1, "a page of big events takes several chunks");
        for chunk in &cut {
            let bytes = serde_json::to_vec(&EventChunk {
                events: chunk.clone(),
            })
            .unwrap();
            assert!(bytes.len() <= MAX_STATE_DOCUMENT_BYTES, "{}", bytes.len());
        }
        assert_eq!(cut.concat(), page);
        assert!(chunks(Vec::new()).is_empty());
    }
}
