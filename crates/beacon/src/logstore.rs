//! App output forwarded by Maestros: the last lines of each app in memory, the output of each
//! app's latest builds kept apart, and a broadcast that `em logs -f` and `em deploy` follow
//! through the HTTP API. Logs live on the web servers' disks; Beacon only relays, so nothing
//! here is written to disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use px_proto::beacon::LogEntry;
use px_proto::link::{LogBatch, LogStream};
use tokio::sync::broadcast;

/// Lines kept per app for `em logs` without `-f`.
pub const LOG_LINES_PER_APP: usize = 1000;
/// Lines kept per build, apart from the app's own output, so a busy app cannot push a build's
/// output out before `em deploy` reads it: as many as the app keeps, which holds an
/// installer's whole output for a typical app (the full log is apprepo's).
pub const LOG_LINES_PER_BUILD: usize = 1000;
/// Builds whose output is kept per app: the one running and the one before it. The repository
/// keeps at most one pending build per app (a new upload supersedes it), so older ones are
/// over and their logs are apprepo's to serve.
pub const BUILDS_KEPT_PER_APP: usize = 2;
/// Followers' buffer; a follower slower than the apps' output lags and is told so.
pub const LOG_FOLLOW_BUFFER: usize = 4096;
/// Most apps whose lines are kept. Only apps a node was given reach the store, so this bounds
/// it against a desired state of more apps than any cluster runs; lines of a new app beyond it
/// are relayed live but not kept. The rings of apps that no longer exist are dropped every
/// `LOG_PRUNE_INTERVAL` (`lib.rs`).
pub const MAX_LOGGED_APPS: usize = 10_000;
/// Longest line relayed; longer ones are cut (Maestro already cuts at 16 KiB).
pub const MAX_RELAYED_LINE: usize = 16 * 1024;

/// Which lines a reader wants: all of an app's, one build's, or one stream's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// Only the output of this build.
    pub build: Option<u64>,
    /// Only lines of this stream (`build` for every build's output).
    pub stream: Option<LogStream>,
}

impl LogFilter {
    pub fn matches(&self, entry: &LogEntry) -> bool {
        self.build.is_none_or(|b| entry.build == Some(b))
            && self.stream.is_none_or(|s| entry.stream == s)
    }
}

/// One app's kept output.
#[derive(Default)]
struct AppLines {
    /// Every line, build output included, newest last.
    all: VecDeque<LogEntry>,
    /// The output of the latest builds, oldest build first.
    builds: VecDeque<(u64, VecDeque<LogEntry>)>,
}

impl AppLines {
    fn push(&mut self, entry: LogEntry) {
        if let Some(build) = entry.build.filter(|_| entry.stream == LogStream::Build) {
            let index = match self.builds.iter().position(|(b, _)| *b == build) {
                Some(index) => index,
                None => {
                    if self.builds.len() >= BUILDS_KEPT_PER_APP {
                        // The build with the lowest number is the oldest: numbers only grow.
                        let oldest = (0..self.builds.len())
                            .min_by_key(|i| self.builds[*i].0)
                            .unwrap_or(0);
                        self.builds.remove(oldest);
                    }
                    self.builds.push_back((build, VecDeque::new()));
                    self.builds.len() - 1
                }
            };
            let lines = &mut self.builds[index].1;
            if lines.len() >= LOG_LINES_PER_BUILD {
                lines.pop_front();
            }
            lines.push_back(entry.clone());
        }
        if self.all.len() >= LOG_LINES_PER_APP {
            self.all.pop_front();
        }
        self.all.push_back(entry);
    }
}

pub struct LogStore {
    recent: Mutex<HashMap<String, AppLines>>,
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
                // Only build output names a build; a number on other lines means nothing.
                build: line.build.filter(|_| line.stream == LogStream::Build),
                // A type name is bounded like a Procfile's; anything else is not one.
                process: line
                    .process
                    .filter(|p| px_proto::process::check_process_name(p).is_ok()),
            };
            if recent.len() < MAX_LOGGED_APPS || recent.contains_key(&entry.app) {
                recent
                    .entry(entry.app.clone())
                    .or_default()
                    .push(entry.clone());
            }
            let _ = self.live.send(entry);
        }
        if batch.dropped > 0 {
            tracing::warn!(%node, dropped = batch.dropped, "a node dropped log lines (rate limit)");
        }
    }

    /// Drops the kept lines of every app `exists` says no longer exists.
    pub fn retain_apps(&self, exists: impl Fn(&str) -> bool) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|app, _| exists(app));
    }

    /// The last `n` lines of `app` that `filter` admits, oldest first. One build's lines come
    /// from that build's own ring, so the app's output never crowds them out.
    pub fn recent(&self, app: &str, n: usize, filter: LogFilter) -> Vec<LogEntry> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lines) = recent.get(app) else {
            return Vec::new();
        };
        let source: Box<dyn DoubleEndedIterator<Item = &LogEntry>> = match filter.build {
            Some(build) => Box::new(
                lines
                    .builds
                    .iter()
                    .filter(move |(b, _)| *b == build)
                    .flat_map(|(_, l)| l.iter()),
            ),
            None => Box::new(lines.all.iter()),
        };
        let mut newest: Vec<LogEntry> = source
            .rev()
            .filter(|e| filter.matches(e))
            .take(n)
            .cloned()
            .collect();
        newest.reverse();
        newest
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use px_proto::link::LogLine;

    fn line(app: &str, text: &str) -> LogLine {
        LogLine {
            app: app.into(),
            release: 1,
            instance: 1,
            stream: LogStream::Stdout,
            at: "t".into(),
            line: text.into(),
            build: None,
            process: None,
        }
    }

    fn build_line(app: &str, build: u64, text: &str) -> LogLine {
        LogLine {
            release: 0,
            instance: 0,
            stream: LogStream::Build,
            build: Some(build),
            ..line(app, text)
        }
    }

    fn texts(entries: &[LogEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.line.as_str()).collect()
    }

    #[test]
    fn the_lines_of_an_app_that_is_gone_are_dropped_and_others_kept() {
        let store = LogStore::default();
        store.push(
            "web-1",
            LogBatch {
                lines: vec![line("kept", "a"), line("deleted", "b")],
                dropped: 0,
            },
        );
        store.retain_apps(|app| app == "kept");
        let all = LogFilter::default();
        assert_eq!(texts(&store.recent("kept", 10, all)), ["a"]);
        assert!(store.recent("deleted", 10, all).is_empty());
        assert_eq!(store.recent.lock().unwrap().len(), 1);
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
        let all = LogFilter::default();
        let a = store.recent("a", usize::MAX, all);
        assert_eq!(a.len(), LOG_LINES_PER_APP);
        assert_eq!(a.last().unwrap().line, (LOG_LINES_PER_APP + 4).to_string());
        assert_eq!(store.recent("a", 2, all).len(), 2);
        assert_eq!(store.recent("b", 10, all)[0].node, "web-2");
        assert!(store.recent("../bad", 10, all).is_empty());
        assert_eq!(live.try_recv().unwrap().line, "0");
    }

    #[test]
    fn a_builds_output_is_kept_apart_from_a_busy_apps_and_read_alone() {
        let store = LogStore::default();
        let mut lines = vec![
            build_line("a", 1, "old build"),
            build_line("a", 2, "Collecting django"),
        ];
        // The app prints far more than the app ring holds while build 2 runs.
        lines.extend((0..LOG_LINES_PER_APP).map(|i| line("a", &format!("GET /{i}"))));
        lines.push(build_line("a", 2, "Successfully installed django"));
        // A number on a line that is not build output names no build.
        lines.push(LogLine {
            build: Some(2),
            ..line("a", "not build output")
        });
        store.push("build-1", LogBatch { lines, dropped: 0 });
        let build2 = LogFilter {
            build: Some(2),
            stream: None,
        };
        assert_eq!(
            texts(&store.recent("a", 100, build2)),
            ["Collecting django", "Successfully installed django"]
        );
        assert_eq!(
            texts(&store.recent("a", 1, build2)),
            ["Successfully installed django"]
        );
        let builds = LogFilter {
            build: None,
            stream: Some(LogStream::Build),
        };
        assert_eq!(
            texts(&store.recent("a", 100, builds)),
            ["Successfully installed django"],
            "the app ring holds only what the app's output left of the builds"
        );
        let last = store.recent("a", 1, LogFilter::default());
        assert_eq!(texts(&last), ["not build output"]);
        assert_eq!(last[0].build, None);

        // A third build pushes out the oldest one's output, never the newer ones'.
        store.push(
            "build-1",
            LogBatch {
                lines: vec![build_line("a", 3, "third")],
                dropped: 0,
            },
        );
        let of = |build| LogFilter {
            build: Some(build),
            stream: None,
        };
        assert!(store.recent("a", 100, of(1)).is_empty());
        assert_eq!(store.recent("a", 100, of(2)).len(), 2);
        assert_eq!(texts(&store.recent("a", 100, of(3))), ["third"]);
    }

    #[test]
    fn a_builds_ring_keeps_its_newest_lines() {
        let store = LogStore::default();
        let lines: Vec<LogLine> = (0..LOG_LINES_PER_BUILD + 3)
            .map(|i| build_line("a", 7, &i.to_string()))
            .collect();
        store.push("build-1", LogBatch { lines, dropped: 0 });
        let kept = store.recent(
            "a",
            usize::MAX,
            LogFilter {
                build: Some(7),
                stream: None,
            },
        );
        assert_eq!(kept.len(), LOG_LINES_PER_BUILD);
        assert_eq!(kept[0].line, "3");
    }
}
