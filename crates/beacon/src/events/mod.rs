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

    /// Takes in events a predecessor recorded (read from the shared storage on takeover),
    /// before this Beacon records any of its own: merged with those in memory by seq (one seq
    /// is one event, whoever kept it), the newest `EVENTS_IN_MEMORY` kept, numbering continuing
    /// above the highest. They stay out of this Beacon's file, which holds what it recorded.
    /// Returns how many were new here.
    pub fn adopt(&self, events: Vec<Event>) -> usize {
        let mut inner = self.lock();
        let mut merged: std::collections::BTreeMap<u64, Event> =
            inner.ring.drain(..).map(|e| (e.seq, e)).collect();
        let before = merged.len();
        for event in events {
            merged.entry(event.seq).or_insert(event);
        }
        let adopted = merged.len() - before;
        let skip = merged.len().saturating_sub(EVENTS_IN_MEMORY);
        inner.ring = merged.into_values().skip(skip).collect();
        if let Some(newest) = inner.ring.back() {
            inner.last_seq = inner.last_seq.max(newest.seq);
        }
        adopted
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
mod tests;
