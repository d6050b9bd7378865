//! App output forwarded by Maestros: the last lines of each app in memory, and a broadcast
//! that `em logs -f` follows through the HTTP API. Logs live on the web servers' disks; Beacon
//! only relays, so nothing here is written to disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use px_proto::beacon::LogEntry;
use px_proto::link::LogBatch;
use tokio::sync::broadcast;

/// Lines kept per app for `em logs` without `-f`.
pub const LOG_LINES_PER_APP: usize = 1000;
/// Followers' buffer; a follower slower than the apps' output lags and is told so.
pub const LOG_FOLLOW_BUFFER: usize = 4096;
/// Longest line relayed; longer ones are cut (Maestro already cuts at 16 KiB).
pub const MAX_RELAYED_LINE: usize = 16 * 1024;

pub struct LogStore {
    recent: Mutex<HashMap<String, VecDeque<LogEntry>>>,
    live: broadcast::Sender<LogEntry>,
}

impl Default for LogStore {
    fn default() -> Self {
        Self {
            recent: Mutex::new(HashMap::new()),
            live: broadcast::channel(LOG_FOLLOW_BUFFER).0,
        }
    }
}

impl LogStore {
    /// Takes a batch from `node`. Lines of apps with invalid names are ignored.
    pub fn push(&self, node: &str, batch: LogBatch) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for mut line in batch.lines {
            if px_proto::names::check_app_name(&line.app).is_err() {
                continue;
            }
            if line.line.len() > MAX_RELAYED_LINE {
                let mut cut = MAX_RELAYED_LINE;
                while !line.line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.line.truncate(cut);
            }
            let entry = LogEntry {
                node: node.to_string(),
                app: line.app,
                release: line.release,
                instance: line.instance,
                stream: line.stream,
                at: line.at,
                line: line.line,
            };
            let ring = recent.entry(entry.app.clone()).or_default();
            if ring.len() >= LOG_LINES_PER_APP {
                ring.pop_front();
            }
            ring.push_back(entry.clone());
            let _ = self.live.send(entry);
        }
        if batch.dropped > 0 {
            tracing::warn!(%node, dropped = batch.dropped, "a node dropped log lines (rate limit)");
        }
    }

    /// The last `n` lines of `app`, oldest first.
    pub fn recent(&self, app: &str, n: usize) -> Vec<LogEntry> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .get(app)
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::link::{LogLine, LogStream};

    fn line(app: &str, text: &str) -> LogLine {
        LogLine {
            app: app.into(),
            release: 1,
            instance: 1,
            stream: LogStream::Stdout,
            at: "t".into(),
            line: text.into(),
            build: None,
        }
    }

    #[test]
    fn keeps_the_newest_lines_per_app_and_broadcasts() {
        let store = LogStore::default();
        let mut live = store.subscribe();
        let lines: Vec<LogLine> = (0..LOG_LINES_PER_APP + 5)
            .map(|i| line("a", &i.to_string()))
            .collect();
        store.push("web-1", LogBatch { lines, dropped: 0 });
        store.push(
            "web-2",
            LogBatch {
                lines: vec![line("b", "x"), line("../bad", "y")],
                dropped: 0,
            },
        );
        let a = store.recent("a", usize::MAX);
        assert_eq!(a.len(), LOG_LINES_PER_APP);
        assert_eq!(a.last().unwrap().line, (LOG_LINES_PER_APP + 4).to_string());
        assert_eq!(store.recent("a", 2).len(), 2);
        assert_eq!(store.recent("b", 10)[0].node, "web-2");
        assert!(store.recent("../bad", 10).is_empty());
        assert_eq!(live.try_recv().unwrap().line, "0");
    }
}
