//! The platform event log: an append-only JSON-lines file (`events.jsonl`, with one rotated
//! predecessor `events.jsonl.1`), the newest events in memory for paging and the status page,
//! and a broadcast that live followers (the SSE stream behind `em deploy` and `em logs -f`) read.
//!
//! Recording never fails: Beacon keeps working when its disk does not, so write errors are
//! logged and counted (for `/metrics`) instead of returned.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use px_proto::beacon::{Event, EventKind, Level};
use tokio::sync::broadcast;

/// Size at which `events.jsonl` is rotated to `events.jsonl.1` (replacing the previous one), so
/// the log takes at most twice this on disk. 16 MiB holds on the order of 100 000 events, far
/// more than anyone pages through, and reloads in well under a second at start-up.
pub const MAX_EVENT_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Events kept in memory for paging and the status page: enough for hours of history on a busy
/// cluster, while staying a few megabytes (typical events are a few hundred bytes).
pub const EVENTS_IN_MEMORY: usize = 10_000;
/// Broadcast capacity for live followers. A follower that falls this far behind gets
/// `RecvError::Lagged` and can catch up by paging from the last `seq` it saw, so a slow client
/// never holds memory or slows recording.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Largest page `page` returns, whatever the caller asks for: bounds the size of one response.
pub const MAX_PAGE: usize = 1000;
/// Longest `message` kept (bytes; longer ones are cut at a character boundary and end with
/// `…`). A message is one human sentence; this bounds memory for `EVENTS_IN_MEMORY` events.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest `detail` kept, cut like the message. Room for the tail of a crashed instance's
/// stderr, while `EVENTS_IN_MEMORY` events stay within tens of megabytes at worst.
pub const MAX_DETAIL_BYTES: usize = 4096;

/// Name of the live log file inside the event directory.
pub const EVENT_LOG_FILE: &str = "events.jsonl";
/// Name of the one rotated predecessor kept.
pub const ROTATED_EVENT_LOG_FILE: &str = "events.jsonl.1";

/// What a caller records; the log assigns seq, time and level (from kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDraft {
    pub kind: EventKind,
    pub node: Option<String>,
    pub app: Option<String>,
    pub release: Option<u64>,
    pub message: String,
    pub detail: Option<String>,
    /// Overrides the kind's level (an app gives its own events theirs).
    pub level: Option<Level>,
    pub failure: Option<px_proto::link::FailureKind>,
    /// For a build's events: the build's number.
    pub build: Option<u64>,
}

impl EventDraft {
    /// A draft with only a kind and a message; set the other fields directly.
    #[cfg(test)]
    pub fn new(kind: EventKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            node: None,
            app: None,
            release: None,
            message: message.into(),
            detail: None,
            level: None,
            failure: None,
            build: None,
        }
    }
}

/// The append-only event log. Shared by reference (`Arc<EventLog>`); every method takes `&self`.
pub struct EventLog {
    path: PathBuf,
    rotated_path: PathBuf,
    max_bytes: u64,
    /// One lock over file, ring and seq, so seq order, file order, ring order and broadcast
    /// order are all the same. Critical sections are one small append each.
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    write_errors: AtomicU64,
}

struct Inner {
    /// `None` after the file could not be (re)opened; the next record tries again.
    file: Option<File>,
    /// Bytes in the live file, for the rotation check without a `stat` per event.
    size: u64,
    /// A write failed part-way, so the file may end in a torn line: the next line starts with
    /// a newline to keep itself whole.
    torn: bool,
    last_seq: u64,
    /// The newest events, strictly increasing by seq.
    ring: VecDeque<Event>,
}

impl EventLog {
    /// Opens (creating) `dir/events.jsonl`; reloads the last `EVENTS_IN_MEMORY` events from
    /// `events.jsonl.1` + `events.jsonl` so paging survives a restart, and continues seq after
    /// the highest one found. A torn last line (crash mid-write) or garbage lines are skipped
    /// with a warning, never fatal. Fails only when the directory or the live file cannot be
    /// created, opened or read.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with_limit(dir, MAX_EVENT_LOG_BYTES)
    }

    /// `open` with another rotation size (tests use a small one).
    pub fn open_with_limit(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| annotate(e, "creating", dir))?;
        let path = dir.join(EVENT_LOG_FILE);
        let rotated_path = dir.join(ROTATED_EVENT_LOG_FILE);

        let mut history = History::default();
        history.load(&rotated_path)?;
        history.load(&path)?;
        let (file, size) = open_for_append(&path)?;
        tracing::info!(
            path = %path.display(),
            events = history.ring.len(),
            last_seq = history.last_seq,
            "event log opened"
        );

        let (events, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Ok(Self {
            path,
            rotated_path,
            max_bytes,
            inner: Mutex::new(Inner {
                file: Some(file),
                size,
                torn: false,
                last_seq: history.last_seq,
                ring: history.ring,
            }),
            events,
            write_errors: AtomicU64::new(0),
        })
    }

    /// Appends (one JSON line, written with a single write call), rotates when the file would
    /// grow over the size bound, keeps the event in memory and broadcasts it. Disk errors are
    /// logged and counted, never returned: an event log failure must not stop Beacon.
    ///
    /// The write is synchronous: one small append to the page cache, cheaper than a hop to a
    /// blocking thread. There is no fsync per event: a process crash loses nothing (the kernel
    /// has the bytes), and losing the last events of a host crash is acceptable for a log.
    pub fn record(&self, draft: EventDraft) -> Event {
        let mut inner = self.lock();
        let event = Event {
            seq: inner.last_seq + 1,
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            kind: draft.kind,
            level: draft.level.unwrap_or_else(|| draft.kind.level()),
            node: draft.node,
            app: draft.app,
            release: draft.release,
            message: clip(draft.message, MAX_MESSAGE_BYTES),
            detail: draft.detail.map(|d| clip(d, MAX_DETAIL_BYTES)),
            failure: draft.failure,
            build: draft.build,
        };
        inner.last_seq = event.seq;
        self.append(&mut inner, &event);
        if inner.ring.len() >= EVENTS_IN_MEMORY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event.clone());
        // Sent under the lock so followers see events in seq order. An error only means nobody
        // is following right now.
        let _ = self.events.send(event.clone());
        event
    }

    /// Events with seq > `after` (all kept in memory when `None`), oldest first, at most
    /// `min(limit, MAX_PAGE)`, only those of `app` when given. Events older than the
    /// `EVENTS_IN_MEMORY` newest are no longer served; a page then starts at the oldest kept.
    pub fn page(&self, after: Option<u64>, limit: usize, app: Option<&str>) -> Vec<Event> {
        let limit = limit.min(MAX_PAGE);
        let inner = self.lock();
        let start = match after {
            Some(after) => inner.ring.partition_point(|e| e.seq <= after),
            None => 0,
        };
        inner
            .ring
            .range(start..)
            .filter(|e| app.is_none() || e.app.as_deref() == app)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The newest `n` events, newest first (status page).
    pub fn recent(&self, n: usize) -> Vec<Event> {
        self.lock().ring.iter().rev().take(n).cloned().collect()
    }

    /// Follows events recorded from now on. To follow without a gap, subscribe first, then
    /// page from the last seq already shown and skip repeats by seq.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Numbers the next events above `floor` when the log is below it. A Beacon that becomes
    /// active under a later lease epoch passes that epoch's generation floor: every seq its
    /// predecessor could have given is below it, so a follower that resumes here with the old
    /// Beacon's `Last-Event-ID` is sent what this one recorded since, not nothing until the
    /// numbers catch up.
    pub fn raise_floor(&self, floor: u64) {
        let mut inner = self.lock();
        if inner.last_seq < floor {
            tracing::info!(
                last_seq = inner.last_seq,
                floor,
                "events continue above the lease's epoch"
            );
            inner.last_seq = floor;
        }
    }

    /// Seq of the newest event (0 before the first one).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Disk errors since start (writes, rotations, re-opens), which the tests read.
    #[cfg(test)]
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the state consistent enough to keep logging
        // (at worst one event is missing from the ring), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disk_error(&self, what: &str, path: &Path, error: &dyn std::fmt::Display) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(path = %path.display(), "event log: {what}: {error}");
    }

    fn append(&self, inner: &mut Inner, event: &Event) {
        let mut line = Vec::with_capacity(256);
        if inner.torn {
            line.push(b'\n');
        }
        if let Err(e) = serde_json::to_writer(&mut line, event) {
            self.disk_error("serializing event", &self.path, &e);
            return;
        }
        line.push(b'\n');
        let len = line.len() as u64;

        if inner.size > 0 && inner.size.saturating_add(len) > self.max_bytes {
            self.rotate(inner);
        }
        if inner.file.is_none() {
            match open_for_append(&self.path) {
                Ok((file, size)) => {
                    inner.file = Some(file);
                    inner.size = size;
                }
                Err(e) => {
                    self.disk_error("reopening", &self.path, &e);
                    return;
                }
            }
        }
        let Some(file) = inner.file.as_mut() else {
            return;
        };
        // A std `File` has no user-space buffer: once `write_all` returns, the line is in the
        // kernel, which is what "flushed" means here. One buffer means one write call.
        match file.write_all(&line) {
            Ok(()) => {
                inner.size += len;
                inner.torn = false;
            }
            Err(e) => {
                inner.torn = true;
                inner.size = file.metadata().map_or(inner.size, |m| m.len());
                self.disk_error("appending", &self.path, &e);
            }
        }
    }

    /// Renames the live file over the previous rotated one and starts a new live file. On
    /// failure the old file stays live (and grows) and rotation is tried again next event.
    fn rotate(&self, inner: &mut Inner) {
        if let Err(e) = std::fs::rename(&self.path, &self.rotated_path) {
            self.disk_error("rotating", &self.rotated_path, &e);
            return;
        }
        // The open handle now points at the rotated file; the next append opens a new one.
        inner.file = None;
        inner.size = 0;
        inner.torn = false;
        tracing::info!(path = %self.path.display(), "event log rotated");
    }
}

/// Events read back at start-up.
#[derive(Default)]
struct History {
    last_seq: u64,
    ring: VecDeque<Event>,
}

impl History {
    /// Reads one log file (absent is fine), keeping the newest `EVENTS_IN_MEMORY` events.
    fn load(&mut self, path: &Path) -> io::Result<()> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(annotate(e, "opening", path)),
        };
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            // Bytes, not `lines()`: invalid UTF-8 is one more kind of garbage to skip.
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| annotate(e, "reading", path))?;
            if n == 0 {
                return Ok(());
            }
            line_no += 1;
            let complete = buf.last() == Some(&b'\n');
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Event>(text) {
                Ok(event) if event.seq > self.last_seq => {
                    self.last_seq = event.seq;
                    if self.ring.len() >= EVENTS_IN_MEMORY {
                        self.ring.pop_front();
                    }
                    self.ring.push_back(event);
                }
                Ok(event) => tracing::warn!(
                    path = %path.display(),
                    line = line_no,
                    seq = event.seq,
                    "event log: skipping an event out of seq order"
                ),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    line = line_no,
                    torn = !complete,
                    "event log: skipping an unreadable line: {e}"
                ),
            }
        }
    }
}

/// Opens the live file for appending. When it ends without a newline (a crash mid-write), one
/// is added, so the torn line stays a line of its own and the next event is not glued to it.
fn open_for_append(path: &Path) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| annotate(e, "opening", path))?;
    let mut size = file
        .metadata()
        .map_err(|e| annotate(e, "inspecting", path))?
        .len();
    if size > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::End(-1))
            .and_then(|_| file.read_exact(&mut last))
            .map_err(|e| annotate(e, "reading", path))?;
        if last[0] != b'\n' {
            tracing::warn!(path = %path.display(), "event log ends in a torn line; terminating it");
            file.write_all(b"\n")
                .map_err(|e| annotate(e, "repairing", path))?;
            size += 1;
        }
    }
    Ok((file, size))
}

/// Cuts `text` to at most `max` bytes at a character boundary, marking the cut with `…`.
fn clip(mut text: String, max: usize) -> String {
    const MARK: char = '…';
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(MARK.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(MARK);
    text
}

/// Says which file an I/O error is about; `io::Error` alone does not.
fn annotate(error: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("event log: {doing} {}: {error}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::beacon::Level;

    fn draft(kind: EventKind, app: Option<&str>, message: &str) -> EventDraft {
        EventDraft {
            app: app.map(str::to_owned),
            ..EventDraft::new(kind, message)
        }
    }

    #[test]
    fn events_after_a_raised_floor_follow_a_resume_from_the_previous_beacons_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let floor = crate::lease::generation_floor(2);
        {
            let log = EventLog::open(dir.path()).unwrap();
            log.record(draft(EventKind::NodeJoined, None, "before the takeover"));
            log.raise_floor(floor);
            let after = log.record(draft(EventKind::NodeJoined, None, "after the takeover"));
            assert_eq!(after.seq, floor + 1);
            // A follower of the previous Beacon (epoch 1) resumes from a seq of its own numbers.
            let resumed = log.page(Some(crate::lease::generation_floor(1) + 40), 100, None);
            assert_eq!(seqs(&resumed), [floor + 1]);
            // A lower floor changes nothing.
            log.raise_floor(1);
            assert_eq!(
                log.record(draft(EventKind::NodeJoined, None, "next")).seq,
                floor + 2
            );
        }
        let reopened = EventLog::open(dir.path()).unwrap();
        assert_eq!(
            reopened
                .record(draft(EventKind::NodeJoined, None, "after a restart"))
                .seq,
            floor + 3
        );
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn record_assigns_seq_time_and_level_and_pages_filter_by_app_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.last_seq(), 0);

        let first = log.record(EventDraft {
            level: None,
            node: Some("web-1".into()),
            release: Some(7),
            detail: Some("exit status 1".into()),
            ..draft(
                EventKind::CrashLoop,
                Some("hello"),
                "hello crash-loops on web-1",
            )
        });
        assert_eq!(first.seq, 1);
        assert_eq!(first.level, Level::Error);
        assert_eq!(first.node.as_deref(), Some("web-1"));
        assert_eq!(first.release, Some(7));
        assert_eq!(first.detail.as_deref(), Some("exit status 1"));
        humantime::parse_rfc3339(&first.at).unwrap();

        let second = log.record(draft(EventKind::DeployStarted, Some("other"), "deploy"));
        assert_eq!(second.level, Level::Info);
        log.record(draft(EventKind::InstanceCrashed, Some("hello"), "crashed"));
        log.record(draft(EventKind::NodeJoined, None, "web-2 joined"));
        log.record(draft(EventKind::DeployFinished, Some("hello"), "done"));
        assert_eq!(log.last_seq(), 5);

        assert_eq!(seqs(&log.page(None, 100, None)), [1, 2, 3, 4, 5]);
        assert_eq!(seqs(&log.page(Some(2), 100, None)), [3, 4, 5]);
        assert_eq!(seqs(&log.page(None, 2, None)), [1, 2]);
        assert_eq!(seqs(&log.page(Some(5), 100, None)), Vec::<u64>::new());
        assert_eq!(seqs(&log.page(None, 100, Some("hello"))), [1, 3, 5]);
        assert_eq!(seqs(&log.page(Some(1), 1, Some("hello"))), [3]);
        assert_eq!(log.page(None, 100, None)[0], first);

        assert_eq!(seqs(&log.recent(2)), [5, 4]);
        assert_eq!(seqs(&log.recent(100)), [5, 4, 3, 2, 1]);
        assert_eq!(log.write_errors(), 0);

        // Every event is one line of the file, in order.
        let text = std::fs::read_to_string(dir.path().join(EVENT_LOG_FILE)).unwrap();
        let on_disk: Vec<Event> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(seqs(&on_disk), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_page_is_at_most_max_page_and_memory_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        for i in 0..EVENTS_IN_MEMORY + 10 {
            log.record(draft(EventKind::NodeJoined, None, &format!("event {i}")));
        }
        assert_eq!(log.page(None, usize::MAX, None).len(), MAX_PAGE);
        // The ten oldest fell out of memory: an unpaged listing starts after them.
        assert_eq!(log.page(None, 1, None)[0].seq, 11);
        assert_eq!(log.page(Some(3), 1, None)[0].seq, 11);
        assert_eq!(log.recent(usize::MAX).len(), EVENTS_IN_MEMORY);
    }

    #[test]
    fn restart_keeps_history_and_continues_seq() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let log = EventLog::open(dir.path()).unwrap();
            log.record(draft(EventKind::NodeJoined, None, "one"));
            log.record(draft(EventKind::DeployStarted, Some("hello"), "two"));
            log.record(draft(EventKind::DeployFinished, Some("hello"), "three"));
            log.page(None, 100, None)
        };
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.last_seq(), 3);
        assert_eq!(log.page(None, 100, None), before);
        assert_eq!(seqs(&log.page(Some(1), 100, Some("hello"))), [2, 3]);
        assert_eq!(log.record(draft(EventKind::NodeLost, None, "four")).seq, 4);
    }

    #[test]
    fn the_file_rotates_at_the_size_bound_keeping_one_old_file() {
        const LIMIT: u64 = 2000;
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join(EVENT_LOG_FILE);
        let rotated = dir.path().join(ROTATED_EVENT_LOG_FILE);
        let log = EventLog::open_with_limit(dir.path(), LIMIT).unwrap();

        let mut n = 0;
        while !rotated.exists() {
            n += 1;
            assert!(n < 100, "no rotation after {n} events");
            log.record(draft(
                EventKind::NodeJoined,
                None,
                "a node joined the cluster",
            ));
            assert!(std::fs::metadata(&live).unwrap().len() <= LIMIT);
        }
        let first_rotation = std::fs::read(&rotated).unwrap();
        assert!(first_rotation.len() as u64 <= LIMIT);
        // The rotation happened because the next line would not fit: it is at least as long
        // as the last line of the rotated file (same message, seq no shorter).
        let last_line = first_rotation[..first_rotation.len() - 1]
            .split(|b| *b == b'\n')
            .next_back()
            .unwrap();
        assert!(first_rotation.len() + last_line.len() + 1 > LIMIT as usize);

        // Rotating again replaces the old file: disk stays bounded.
        for _ in 0..2 * n {
            log.record(draft(
                EventKind::NodeJoined,
                None,
                "a node joined the cluster",
            ));
            assert!(std::fs::metadata(&live).unwrap().len() <= LIMIT);
            assert!(std::fs::metadata(&rotated).unwrap().len() <= LIMIT);
        }
        assert_ne!(std::fs::read(&rotated).unwrap(), first_rotation);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(log.write_errors(), 0);

        // A restart reloads both files, contiguous up to the newest event.
        let last = log.last_seq();
        drop(log);
        let log = EventLog::open_with_limit(dir.path(), LIMIT).unwrap();
        assert_eq!(log.last_seq(), last);
        let reloaded = seqs(&log.page(None, MAX_PAGE, None));
        let oldest = reloaded[0];
        assert!(
            reloaded.len() as u64 > n,
            "only {} events reloaded",
            reloaded.len()
        );
        assert_eq!(reloaded, (oldest..=last).collect::<Vec<_>>());
    }

    #[test]
    fn torn_and_garbage_lines_are_skipped_and_new_events_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join(EVENT_LOG_FILE);
        {
            let log = EventLog::open(dir.path()).unwrap();
            log.record(draft(EventKind::NodeJoined, None, "one"));
            log.record(draft(EventKind::NodeJoined, None, "two"));
        }
        let mut file = OpenOptions::new().append(true).open(&live).unwrap();
        file.write_all(b"not json at all\n\xff\xfe\n").unwrap();
        file.write_all(br#"{"seq":3,"at":"2024-01-01T00:00:00Z","kind":"node_jo"#)
            .unwrap();
        drop(file);

        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(seqs(&log.page(None, 100, None)), [1, 2]);
        let three = log.record(draft(EventKind::NodeLost, None, "three"));
        assert_eq!(three.seq, 3);
        drop(log);

        // Had the new line been glued to the torn one, event 3 would be lost here.
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(log.page(None, 100, None).last(), Some(&three));
        assert_eq!(seqs(&log.page(None, 100, None)), [1, 2, 3]);
    }

    #[test]
    fn subscribers_receive_new_events_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.record(draft(EventKind::NodeJoined, None, "before"));
        let mut rx = log.subscribe();
        let a = log.record(draft(EventKind::DeployStarted, Some("hello"), "a"));
        let b = log.record(draft(EventKind::DeployFinished, Some("hello"), "b"));
        assert_eq!(rx.try_recv().unwrap(), a);
        assert_eq!(rx.try_recv().unwrap(), b);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_slow_subscriber_lags_instead_of_holding_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let mut rx = log.subscribe();
        for _ in 0..SUBSCRIBER_BUFFER + 5 {
            log.record(draft(EventKind::NodeJoined, None, "x"));
        }
        assert_eq!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(5))
        );
        assert_eq!(rx.try_recv().unwrap().seq, 6);
    }

    #[test]
    fn disk_errors_are_counted_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with_limit(dir.path(), 100).unwrap();
        // A non-empty directory where the rotated file goes makes the rename fail, even as root.
        std::fs::create_dir_all(dir.path().join(ROTATED_EVENT_LOG_FILE).join("x")).unwrap();
        log.record(draft(EventKind::NodeJoined, None, "fits before rotating"));
        assert_eq!(log.write_errors(), 0);
        let event = log.record(draft(EventKind::NodeLost, None, "needs a rotation"));
        assert!(log.write_errors() >= 1);
        assert_eq!(event.seq, 2);
        assert_eq!(log.page(Some(1), 10, None), [event]);
    }

    #[test]
    fn long_messages_and_details_are_clipped_at_a_char_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let event = log.record(EventDraft {
            level: None,
            detail: Some("é".repeat(MAX_DETAIL_BYTES)),
            ..draft(
                EventKind::InstanceCrashed,
                None,
                &"x".repeat(5 * MAX_MESSAGE_BYTES),
            )
        });
        assert!(event.message.len() <= MAX_MESSAGE_BYTES);
        assert!(event.message.len() > MAX_MESSAGE_BYTES - 8);
        assert!(event.message.ends_with('…'));
        let detail = event.detail.unwrap();
        assert!(detail.len() <= MAX_DETAIL_BYTES);
        assert!(detail.ends_with('…'));
        assert_eq!(clip("short".into(), 10), "short");
    }
}
