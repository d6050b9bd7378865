//! The dedup state in and out of the shared storage (docs/src/design/control-hosts.md): when
//! each key was last sent, as wall-clock milliseconds, so a Beacon taking over suppresses what
//! its predecessor sent within the dedup window instead of sending it again.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use px_proto::beacon_state::AlertState;

use super::{Alerter, MAX_DEDUP_KEYS};

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Alerter {
    /// How many times the dedup state changed since start: the writer stores it again when
    /// this moved.
    pub fn dedup_changes(&self) -> u64 {
        self.inner.dedup_changes.load(Ordering::Acquire)
    }

    /// The keys sent within the dedup window, with when, for the shared storage.
    pub fn export_dedup(&self) -> AlertState {
        let now = Instant::now();
        let wall = unix_ms(SystemTime::now());
        let window = self.inner.dedup_window;
        let last_raised = self
            .inner
            .last_raised
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        AlertState {
            last_sent_unix_ms: last_raised
                .iter()
                .filter(|(_, at)| now.duration_since(**at) < window)
                .map(|(key, at)| {
                    let ago = u64::try_from(now.duration_since(*at).as_millis()).unwrap_or(0);
                    (key.clone(), wall.saturating_sub(ago))
                })
                .collect(),
        }
    }

    /// Takes in a predecessor's dedup state: each key it sent within the window counts as
    /// sent here at the same moment (by the wall clock), unless this Beacon sent it later.
    /// Returns how many keys were taken.
    pub fn adopt_dedup(&self, state: &AlertState) -> usize {
        let now = Instant::now();
        let wall = unix_ms(SystemTime::now());
        let window = self.inner.dedup_window;
        let mut last_raised = self
            .inner
            .last_raised
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut taken = 0;
        for (key, sent) in &state.last_sent_unix_ms {
            // A send in the future (clocks apart) counts as now: suppressed for a whole window.
            let ago = Duration::from_millis(wall.saturating_sub(*sent));
            if ago >= window || last_raised.len() >= MAX_DEDUP_KEYS {
                continue;
            }
            let at = now.checked_sub(ago).unwrap_or(now);
            let kept = last_raised.entry(key.clone()).or_insert(at);
            if *kept < at {
                *kept = at;
            }
            taken += 1;
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::alerts::{Alert, AlertSettings};

    fn alerter() -> Alerter {
        Alerter::start(
            AlertSettings::default(),
            &TaskTracker::new(),
            CancellationToken::new(),
        )
    }

    fn alert(key: &str) -> Alert {
        let event = px_proto::beacon::Event {
            seq: 1,
            at: "2026-01-01T00:00:00Z".into(),
            kind: px_proto::beacon::EventKind::NodeLost,
            level: px_proto::beacon::Level::Error,
            node: Some("web-1".into()),
            app: None,
            release: None,
            message: "lost".into(),
            detail: None,
            failure: None,
            build: None,
        };
        Alert {
            key: key.into(),
            text: "node web-1 lost".into(),
            event,
        }
    }

    #[tokio::test]
    async fn a_successor_suppresses_what_its_predecessor_sent_within_the_window() {
        let old = alerter();
        old.raise(alert("node_lost:web-1"));
        assert_eq!(old.dedup_changes(), 1);
        let state = old.export_dedup();
        assert_eq!(
            state.last_sent_unix_ms.keys().collect::<Vec<_>>(),
            ["node_lost:web-1"]
        );

        let new = alerter();
        assert_eq!(new.adopt_dedup(&state), 1);
        new.raise(alert("node_lost:web-1"));
        assert_eq!(new.stats().suppressed, 1, "sent already by the predecessor");
        new.raise(alert("node_recovered:web-1"));
        assert_eq!(new.stats().suppressed, 1, "another key is sent");

        // A send older than the window is not taken: the next alert goes out.
        let stale = AlertState {
            last_sent_unix_ms: BTreeMap::from([("crash_loop:web-1:shop".to_string(), 1)]),
        };
        assert_eq!(new.adopt_dedup(&stale), 0);
        new.raise(alert("crash_loop:web-1:shop"));
        assert_eq!(new.stats().suppressed, 1);
    }
}
