//! App and access logs on disk: every instance's stdout and stderr, line by line, in
//! `log_dir/<app>/{stdout,stderr}.log`, one line per request in `log_dir/access.log`, all rotated
//! by size with a bounded number of old files; plus the newest lines of each app in memory (for
//! `em logs` and deploy-failed events) and a broadcast that live followers (`em logs -f`) read.
//!
//! # How a line travels
//!
//! `AppLogs::attach` starts one reader task per pipe. The reader splits the output on `\n`
//! (dropping a trailing `\r`, converting invalid UTF-8 lossily, cutting lines longer than
//! `MAX_LINE_BYTES`), stamps each line with the time, puts it in the app's in-memory tail,
//! broadcasts it to followers, emits it through `tracing` at debug level, and then queues it
//! for the file. One writer task per log file owns that file: it takes whatever lines are
//! queued (up to `WRITE_BATCH_LINES`) and writes them in one `spawn_blocking` call with plain
//! `std::fs`. `tokio::fs` would also hop to the blocking pool, but once per operation; one hop
//! per batch is cheaper and keeps a rotation (several renames) one synchronous step.
//!
//! # Back-pressure, not dropping
//!
//! The file queue is bounded (`WRITE_QUEUE_LINES`) and a reader waits for room in it. So when
//! the disk is slower than an app's output, the reader stops reading, the pipe fills and the
//! app blocks in `write(2)`, as it would on a slow terminal. This was chosen over dropping
//! lines because a log with silent holes misleads whoever debugs from it, and because it keeps
//! one order per stream without bookkeeping. A *failing* disk is different from a slow one:
//! write errors drop the line for the file (it still reaches the tail and followers), are
//! counted (`AppLogs::dropped_lines`) and logged once per outage, and never hold the reader,
//! so an app never stalls because its log cannot be written. The tail and followers get each
//! line before the reader waits on the file queue, so `em logs` stays live under back-pressure.
//!
//! # Bounds
//!
//! Disk: `(1 + keep_files) * max_file_bytes` per log file (a file passes `max_file_bytes` only
//! when a single line is longer than that); when a rotation fails, lines are dropped rather
//! than growing the live file. Memory per app: `2 * TAIL_LINES` lines in the tail and
//! `2 * WRITE_QUEUE_LINES` in the file queues, each at most `MAX_LINE_BYTES` of input; per
//! attached pipe one `READ_BUFFER_BYTES` buffer; followers share one `FOLLOW_BUFFER` ring.
//! Open files: a log file idle for `IDLE_CLOSE` is closed and reopened on the next line.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Size at which a log file is rotated. 10 MiB holds tens of thousands of lines, enough to see
/// what led up to a problem, while `tail`, `less` and `grep` on it stay instant.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept per log (`stdout.log.1` to `.5`); older ones are deleted, so an app that
/// logs without pause takes at most 60 MiB per stream on disk.
pub const DEFAULT_KEEP_FILES: usize = 5;
/// Most rotated files kept whatever the configuration says: every rotation renames each kept
/// file, and 100 files of the default size are already a gigabyte for one stream of one app.
pub const MAX_KEEP_FILES: usize = 100;
/// Longest line kept, in bytes of input. Longer lines are cut there and end with `CUT_MARKER`;
/// the rest, up to the next newline, is skipped. So one runaway line (a binary blob, a
/// minified bundle printed by mistake) cannot eat memory, while any sensible line, stack
/// trace frames and JSON log records included, is far shorter.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Appended to a line that was cut at `MAX_LINE_BYTES`.
pub const CUT_MARKER: &str = " …[line cut]";
/// Recent lines kept in memory per app and per stream, for `em logs` and for the stderr of a
/// failed deploy: a screenful of context several times over, and at most a few megabytes per
/// app even when every line is as long as allowed.
pub const TAIL_LINES: usize = 200;
/// Broadcast capacity for live followers, shared by all apps. A follower that falls this far
/// behind gets `RecvError::Lagged` (and can say so) instead of holding memory or slowing the
/// apps down.
pub const FOLLOW_BUFFER: usize = 1024;
/// Lines queued per log file before readers wait (back-pressure, see the module doc). Enough to
/// ride out a slow `write` or a rotation without pausing a busy app.
pub const WRITE_QUEUE_LINES: usize = 256;
/// Most lines written in one blocking call: amortises the hop to the blocking pool while
/// keeping each call short.
pub const WRITE_BATCH_LINES: usize = 256;
/// How long each of the access log's two stages (formatting, writing) lets records gather
/// after the first one before it handles them: under load one wake-up and one write per batch
/// rather than per request, which the proxy benchmark showed costing a fifth of its
/// throughput; a line reaches the file up to twice this later.
pub const ACCESS_LOG_GATHER: Duration = Duration::from_millis(20);
/// A log file not written for this long is closed (and reopened on the next line), so a
/// quiet or removed app does not hold file descriptors, and a log file an operator moved or
/// deleted is recreated.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// Read buffer per attached pipe: the capacity of a Linux pipe, so one read can drain it.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Name of the stdout log inside `log_dir/<app>/`.
pub const STDOUT_FILE: &str = "stdout.log";
/// Name of the stderr log inside `log_dir/<app>/`.
pub const STDERR_FILE: &str = "stderr.log";
/// Events the app posted to `PX_EVENTS_URL`.
pub const EVENTS_FILE: &str = "events.log";
/// Name of the access log inside `log_dir`.
pub const ACCESS_LOG_FILE: &str = "access.log";

/// Log files may hold whatever apps print, secrets included: readable by the owner and its
/// group (typically `adm` for log readers), not by every local user.
const FILE_MODE: u32 = 0o640;
/// Directories for log files, matching `FILE_MODE`.
const DIR_MODE: u32 = 0o750;

/// When a log file rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The live file is rotated when the next line would make it larger than this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`.1` newest); at most `MAX_KEEP_FILES`. With 0 the live file is
    /// simply started afresh.
    pub keep_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            keep_files: DEFAULT_KEEP_FILES,
        }
    }
}

/// A file that rotates by size. Lines are appended whole, a batch of them with one `write`
/// call; when a line would take the file past `max_file_bytes`, the file is first renamed to
/// `.1` (shifting `.1` to `.2` and so on, dropping the one beyond `keep_files`) and a new one is
/// opened. After an error the file is reopened on the next write rather than failing forever.
///
/// It uses blocking `std::fs`: call it from a blocking thread (as the writers here do).
pub struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    /// `None` after an error or a rotation; the next write opens the file again.
    file: Option<File>,
    /// Bytes in the live file, for the rotation check without a `stat` per line.
    size: u64,
    /// A write failed part-way, so the file may end in a torn line: the next line starts with
    /// a newline to keep itself whole.
    torn: bool,
}

impl RotatingFile {
    /// Opens (creating it and its directory) `path` for appending; the bytes already in it
    /// count towards the next rotation.
    pub fn open(path: &Path, rotation: Rotation) -> io::Result<Self> {
        let rotation = Rotation {
            keep_files: rotation.keep_files.min(MAX_KEEP_FILES),
            ..rotation
        };
        let (file, size) = open_for_append(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            rotation,
            file: Some(file),
            size,
            torn: false,
        })
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` and a newline, rotating first when needed. A `\n` inside `line` is
    /// written as the two characters `\n`, so one call is always one line in the file (and an
    /// access-log field cannot forge a record).
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self.write_lines(&[line]) {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    /// Appends each of `lines` as [`write_line`](Self::write_line) would, with one `write` per
    /// run of lines that fits before the next rotation rather than one per line: a busy access
    /// log or app writes thousands of lines a second. Returns how many lines were not written
    /// and the first error; after an error the rest of the batch still gets a chance (the file
    /// is reopened), as one `write_line` per line would give it.
    pub fn write_lines<S: AsRef<str>>(&mut self, lines: &[S]) -> (u64, Option<io::Error>) {
        let mut dropped = 0;
        let mut first_error = None;
        let mut run = Run::default();
        for line in lines {
            let start = run.bytes.len();
            run.push(line.as_ref());
            if let Err(e) = self.ensure_open() {
                // Nothing can be written until the file opens again: this line is lost.
                run.pop(start);
                dropped += 1;
                first_error.get_or_insert(e);
                continue;
            }
            let line_bytes = (run.bytes.len() - start) as u64;
            let before = self.size + u64::from(self.torn) + start as u64;
            if before > 0 && before.saturating_add(line_bytes) > self.rotation.max_file_bytes {
                // The lines before this one go into the current file; this one starts the next.
                let tail = run.split_off(start);
                self.flush(&mut run, &mut dropped, &mut first_error);
                run = tail;
                // After a failed write the file is reopened, so the size is the real one.
                let rotated = match self.ensure_open().map(|_| ()) {
                    Ok(()) if self.size == 0 => Ok(()),
                    Ok(()) => self.rotate(),
                    Err(e) => Err(e),
                };
                if let Err(e) = rotated {
                    // The line is not written: the disk stays bounded, and the next line
                    // tries the rotation again.
                    run.pop(0);
                    dropped += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        self.flush(&mut run, &mut dropped, &mut first_error);
        (dropped, first_error)
    }

    /// Writes `run` (emptying it) with as few `write` calls as the kernel allows, counting the
    /// lines that did not make it whole.
    fn flush(&mut self, run: &mut Run, dropped: &mut u64, first_error: &mut Option<io::Error>) {
        if run.lines == 0 {
            return;
        }
        let torn = self.torn;
        let result = self.ensure_open().and_then(|file| {
            if torn {
                file.write_all(b"\n")?;
            }
            file.write_all(&run.bytes)
        });
        match result {
            Ok(()) => {
                self.size += run.bytes.len() as u64 + u64::from(torn);
                self.torn = false;
            }
            Err(e) => {
                // Some lines may have reached the file before the error; which ones is not
                // known, so all count as lost and the next write starts on a fresh line.
                // Reopening reads the real size back; the handle may be what is broken.
                *dropped += run.lines;
                self.torn = true;
                self.file = None;
                first_error.get_or_insert(annotate(e, "writing", &self.path));
            }
        }
        run.bytes.clear();
        run.lines = 0;
    }

    /// Closes the file; the next write reopens it.
    pub fn close(&mut self) {
        self.file = None;
    }

    fn ensure_open(&mut self) -> io::Result<&mut File> {
        match &mut self.file {
            Some(file) => Ok(file),
            slot @ None => {
                let (file, size) = open_for_append(&self.path)?;
                self.size = size;
                Ok(slot.insert(file))
            }
        }
    }

    /// Shifts the rotated files up by one and renames the live file to `.1`. Only the last
    /// rename decides success: a rotated file that cannot be moved is logged and overwritten
    /// or left behind, which loses old lines but never grows the disk use.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let keep = self.rotation.keep_files;
        if keep == 0 {
            remove_if_exists(&self.path).map_err(|e| annotate(e, "removing", &self.path))?;
        } else {
            // Oldest first, so that no rename lands on a file still to be moved.
            let oldest = rotated_path(&self.path, keep);
            if let Err(e) = remove_if_exists(&oldest) {
                tracing::warn!(path = %oldest.display(), "log rotation: removing: {e}");
            }
            for n in (1..keep).rev() {
                let from = rotated_path(&self.path, n);
                let to = rotated_path(&self.path, n + 1);
                match std::fs::rename(&from, &to) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %from.display(), "log rotation: renaming: {e}");
                    }
                }
            }
            let first = rotated_path(&self.path, 1);
            std::fs::rename(&self.path, &first).map_err(|e| annotate(e, "rotating", &first))?;
        }
        self.size = 0;
        self.torn = false;
        tracing::debug!(path = %self.path.display(), "log file rotated");
        Ok(())
    }
}

/// Lines encoded for one `write`: each ends with a newline, and a newline inside a line is
/// written as the two characters `\n`.
#[derive(Default)]
struct Run {
    bytes: Vec<u8>,
    lines: u64,
}

impl Run {
    fn push(&mut self, line: &str) {
        for chunk in line.as_bytes().split_inclusive(|&b| b == b'\n') {
            match chunk.strip_suffix(b"\n") {
                Some(text) => {
                    self.bytes.extend_from_slice(text);
                    self.bytes.extend_from_slice(b"\\n");
                }
                None => self.bytes.extend_from_slice(chunk),
            }
        }
        self.bytes.push(b'\n');
        self.lines += 1;
    }

    /// Drops the last line, which starts at byte `start`.
    fn pop(&mut self, start: usize) {
        self.bytes.truncate(start);
        self.lines -= 1;
    }

    /// The lines from byte `start` on, which must be where a line starts.
    fn split_off(&mut self, start: usize) -> Run {
        let bytes = self.bytes.split_off(start);
        let moved = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.lines -= moved;
        Run {
            bytes,
            lines: moved,
        }
    }
}

/// `path.<n>`, the n-th rotated file (1 is the newest).
fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_for_append(path: &Path) -> io::Result<(File, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| annotate(e, "creating", dir))?;
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| annotate(e, "opening", path))?;
    let size = file
        .metadata()
        .map_err(|e| annotate(e, "reading the size of", path))?
        .len();
    Ok((file, size))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

// The line types are wire types: Maestro forwards lines to Beacon, which streams them to `em logs`.
pub use px_proto::link::{LogLine, LogStream as Stream};

/// All app logs of one Maestro. Share it with `Arc`; every method takes `&self`.
pub struct AppLogs {
    log_dir: PathBuf,
    rotation: Rotation,
    /// Apps that had an instance attached (until `remove`). The lock is held only to look up
    /// or insert an entry, never across I/O or an await.
    apps: Mutex<HashMap<String, Arc<AppState>>>,
    follow: broadcast::Sender<LogLine>,
    dropped: Arc<AtomicU64>,
}

struct AppState {
    tail: Mutex<Tail>,
    /// The queues of the app's two writer tasks; `None` when the app name is not one that is
    /// safe as a directory name (files are then not written at all).
    files: Option<Files>,
}

struct Files {
    stdout: mpsc::Sender<Write>,
    stderr: mpsc::Sender<Write>,
    events: mpsc::Sender<Write>,
}

/// What a reader sends to a file's writer task.
enum Write {
    Line(String),
    /// Answered once every line queued before it has been written (or dropped on error).
    Sync(oneshot::Sender<()>),
}

/// The newest lines of one app, per stream, numbered in arrival order so that `tail` can
/// interleave the streams. Two rings rather than one, so that a chatty stdout never pushes
/// out the stderr lines a failed deploy needs.
#[derive(Default)]
struct Tail {
    next_seq: u64,
    stdout: VecDeque<(u64, LogLine)>,
    stderr: VecDeque<(u64, LogLine)>,
}

impl Tail {
    fn push(&mut self, line: LogLine) {
        let seq = self.next_seq;
        self.next_seq += 1;
        // Events are few and read like output, so they share the stdout ring.
        let ring = match line.stream {
            Stream::Stdout | Stream::Event => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        if ring.len() >= TAIL_LINES {
            ring.pop_front();
        }
        ring.push_back((seq, line));
    }
}

impl AppState {
    fn tail(&self) -> MutexGuard<'_, Tail> {
        // A panic while holding the lock leaves at worst one line missing; keep logging.
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AppLogs {
    /// Logs under `log_dir`; nothing is created until the first line arrives.
    pub fn new(log_dir: &Path, rotation: Rotation) -> Self {
        let (follow, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            log_dir: log_dir.to_path_buf(),
            rotation,
            apps: Mutex::new(HashMap::new()),
            follow,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts one task per pipe that reads it line by line until EOF: each line goes to
    /// `log_dir/<app>/stdout.log` or `stderr.log` prefixed with time, release and instance
    /// (`2026-11-25T10:00:00.123Z v3 #1 <line>`), to the app's in-memory tail, to followers,
    /// and to `tracing` at debug level. Must be called inside a Tokio runtime.
    ///
    /// Dropping the returned `LogTasks` does not stop the tasks (the pipes must be read for as
    /// long as the instance lives); `wait` on it to know both pipes are drained and their lines
    /// are in the files.
    pub fn attach<O, E>(
        &self,
        app: &str,
        release: u64,
        instance: u32,
        stdout: O,
        stderr: E,
    ) -> LogTasks
    where
        O: AsyncRead + Unpin + Send + 'static,
        E: AsyncRead + Unpin + Send + 'static,
    {
        let state = self.app_state(app);
        let app: Arc<str> = Arc::from(app);
        let reader = |stream: Stream| Reader {
            app: app.clone(),
            release,
            instance,
            stream,
            state: state.clone(),
            file: state.files.as_ref().map(|files| match stream {
                Stream::Stdout => files.stdout.clone(),
                Stream::Stderr => files.stderr.clone(),
                Stream::Event => files.events.clone(),
            }),
            follow: self.follow.clone(),
        };
        let handles = vec![
            tokio::spawn(reader(Stream::Stdout).run(stdout)),
            tokio::spawn(reader(Stream::Stderr).run(stderr)),
        ];
        LogTasks { handles }
    }

    /// Logs one event an instance posted: to `events.log`, the tail and followers, like a line
    /// of output. Never waits: when the file's queue is full the line is counted as dropped
    /// (it still reached the tail and followers). Must be called inside a Tokio runtime.
    pub fn record_event(&self, app: &str, release: u64, instance: u32, text: String) {
        let state = self.app_state(app);
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut text = text;
        cut_line(&mut text);
        let text = text.replace(['\n', '\r'], " ");
        if let Some(files) = &state.files {
            let file_line = format!("{at} v{release} #{instance} {text}");
            if files.events.try_send(Write::Line(file_line)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let line = LogLine {
            app: app.to_string(),
            release,
            instance,
            stream: Stream::Event,
            at,
            line: text,
        };
        if self.follow.receiver_count() > 0 {
            let _ = self.follow.send(line.clone());
        }
        state.tail().push(line);
    }

    /// The last `n` lines (at most `TAIL_LINES`) of an app, oldest first, both streams
    /// interleaved in arrival order; only those of `release` when given.
    pub fn tail(&self, app: &str, n: usize, release: Option<u64>) -> Vec<LogLine> {
        let Some(state) = self.existing(app) else {
            return Vec::new();
        };
        let n = n.min(TAIL_LINES);
        let tail = state.tail();
        let wanted = |(_, line): &&(u64, LogLine)| release.is_none_or(|r| line.release == r);
        let mut lines: Vec<&(u64, LogLine)> = tail
            .stdout
            .iter()
            .rev()
            .filter(wanted)
            .take(n)
            .chain(tail.stderr.iter().rev().filter(wanted).take(n))
            .collect();
        lines.sort_unstable_by_key(|(seq, _)| *seq);
        let skip = lines.len().saturating_sub(n);
        lines
            .into_iter()
            .skip(skip)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// The last `n` stderr lines (at most `TAIL_LINES`) of one release of an app, joined with
    /// `\n`; empty when there are none. For the detail of a deploy-failed event.
    pub fn stderr_tail(&self, app: &str, release: u64, n: usize) -> String {
        let Some(state) = self.existing(app) else {
            return String::new();
        };
        let tail = state.tail();
        let mut lines: Vec<&str> = tail
            .stderr
            .iter()
            .rev()
            .filter(|(_, line)| line.release == release)
            .take(n.min(TAIL_LINES))
            .map(|(_, line)| line.line.as_str())
            .collect();
        lines.reverse();
        lines.join("\n")
    }

    /// Live lines of all apps, from now on; followers of one app filter on `LogLine::app`. A
    /// receiver more than `FOLLOW_BUFFER` lines behind gets `RecvError::Lagged`.
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }

    /// Forgets an app removed from this node: its tail goes, and its log files close once the
    /// pipes still attached are drained. Call it after its instances have stopped; the files on
    /// disk stay.
    pub fn remove(&self, app: &str) {
        self.lock_apps().remove(app);
    }

    /// Lines that could not be written to their file because of disk errors, since start (for
    /// metrics). They still reached the tail and followers.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock_apps(&self) -> MutexGuard<'_, HashMap<String, Arc<AppState>>> {
        // The map stays consistent whatever panicked while holding the lock.
        self.apps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn existing(&self, app: &str) -> Option<Arc<AppState>> {
        self.lock_apps().get(app).cloned()
    }

    fn app_state(&self, app: &str) -> Arc<AppState> {
        let mut apps = self.lock_apps();
        if let Some(state) = apps.get(app) {
            return state.clone();
        }
        // The name becomes a directory: anything but a valid app name (say `..`) could write
        // outside `log_dir`. Callers only attach validated apps, so this is a bug elsewhere;
        // the pipes are still drained so the instance does not block.
        let files = match px_proto::names::check_app_name(app) {
            Ok(()) => {
                let dir = self.log_dir.join(app);
                Some(Files {
                    stdout: self.spawn_writer(dir.join(STDOUT_FILE)),
                    stderr: self.spawn_writer(dir.join(STDERR_FILE)),
                    events: self.spawn_writer(dir.join(EVENTS_FILE)),
                })
            }
            Err(e) => {
                tracing::warn!(app, "not writing log files for an invalid app name: {e}");
                None
            }
        };
        let state = Arc::new(AppState {
            tail: Mutex::new(Tail::default()),
            files,
        });
        apps.insert(app.to_string(), state.clone());
        state
    }

    fn spawn_writer(&self, path: PathBuf) -> mpsc::Sender<Write> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_LINES);
        let sink = FileSink::new(path, self.rotation, self.dropped.clone());
        tokio::spawn(write_app_log(sink, rx));
        tx
    }
}

/// The reader tasks of one attached instance.
pub struct LogTasks {
    handles: Vec<JoinHandle<()>>,
}

impl LogTasks {
    /// Waits until both pipes reached EOF and every line read from them is written to its
    /// file (or dropped on a disk error).
    pub async fn wait(self) {
        for handle in self.handles {
            if let Err(e) = handle.await {
                tracing::error!("an instance output reader failed: {e}");
            }
        }
    }
}

/// Reads one pipe of one instance.
struct Reader {
    app: Arc<str>,
    release: u64,
    instance: u32,
    stream: Stream,
    state: Arc<AppState>,
    file: Option<mpsc::Sender<Write>>,
    follow: broadcast::Sender<LogLine>,
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(self, pipe: R) {
        let mut lines = LineReader::new(pipe);
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => self.emit(line).await,
                Ok(None) => break,
                Err(e) => {
                    // Pipes do not fail in practice; if one does, closing it is all we can do
                    // (the instance then gets EPIPE rather than blocking).
                    tracing::warn!(
                        app = %self.app,
                        release = self.release,
                        instance = self.instance,
                        stream = self.stream.as_str(),
                        "reading instance output: {e}"
                    );
                    break;
                }
            }
        }
        if let Some(file) = &self.file {
            let (done, written) = oneshot::channel();
            if file.send(Write::Sync(done)).await.is_ok() {
                // An error means the writer is gone: nothing more will be written anyway.
                let _ = written.await;
            }
        }
    }

    async fn emit(&self, line: String) {
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        tracing::debug!(
            app = %self.app,
            release = self.release,
            instance = self.instance,
            stream = self.stream.as_str(),
            "{line}"
        );
        let file_line = self
            .file
            .as_ref()
            .map(|_| format!("{at} v{} #{} {line}", self.release, self.instance));
        let log_line = LogLine {
            app: self.app.to_string(),
            release: self.release,
            instance: self.instance,
            stream: self.stream,
            at,
            line,
        };
        if self.follow.receiver_count() > 0 {
            // An error only means every follower left since the check.
            let _ = self.follow.send(log_line.clone());
        }
        self.state.tail().push(log_line);
        if let (Some(file), Some(file_line)) = (&self.file, file_line) {
            // Waiting here is the back-pressure the module doc describes. An error means the
            // writer is gone (the runtime is shutting down): the line stays in the tail.
            let _ = file.send(Write::Line(file_line)).await;
        }
    }
}

/// Splits a byte stream into lines without ever buffering more than `MAX_LINE_BYTES` of one.
struct LineReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
    /// The current line was cut: skip input up to and including the next newline.
    skipping: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R) -> Self {
        Self::with_capacity(READ_BUFFER_BYTES, inner)
    }

    fn with_capacity(capacity: usize, inner: R) -> Self {
        Self {
            inner: BufReader::with_capacity(capacity, inner),
            line: Vec::new(),
            skipping: false,
        }
    }

    /// The next line; `None` at EOF. A last line without a newline is still returned.
    async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if self.skipping || self.line.is_empty() {
                    // The cut line was already returned, or there is nothing left.
                    self.skipping = false;
                    return Ok(None);
                }
                return Ok(Some(self.finish(false)));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let content = newline.unwrap_or(available.len());
            let consumed = newline.map_or(available.len(), |at| at + 1);
            if self.skipping {
                self.inner.consume(consumed);
                self.skipping = newline.is_none();
                continue;
            }
            let room = MAX_LINE_BYTES.saturating_sub(self.line.len());
            if content > room {
                self.line.extend_from_slice(&available[..room]);
                self.inner.consume(consumed);
                self.skipping = newline.is_none();
                return Ok(Some(self.finish(true)));
            }
            self.line.extend_from_slice(&available[..content]);
            self.inner.consume(consumed);
            if newline.is_some() {
                return Ok(Some(self.finish(false)));
            }
        }
    }

    fn finish(&mut self, cut: bool) -> String {
        let mut bytes = std::mem::take(&mut self.line);
        if cut {
            trim_partial_char(&mut bytes);
        } else if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let mut line = match String::from_utf8(bytes) {
            Ok(line) => line,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        if cut {
            line.push_str(CUT_MARKER);
        }
        line
    }
}

/// Drops an incomplete UTF-8 sequence at the end of `bytes` (left by cutting a line in the
/// middle of a character), so the cut does not show up as a replacement character.
fn trim_partial_char(bytes: &mut Vec<u8>) {
    // Walk back over at most three continuation bytes to the lead byte of the last character.
    let mut start = bytes.len();
    while start > 0 && bytes.len() - start < 3 && bytes[start - 1] & 0xC0 == 0x80 {
        start -= 1;
    }
    let Some(lead_at) = start.checked_sub(1) else {
        return;
    };
    let needed = match bytes[lead_at] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => return,
    };
    if bytes.len() - lead_at < needed {
        bytes.truncate(lead_at);
    }
}

/// Cuts `line` at `MAX_LINE_BYTES` (on a character boundary) and marks it.
fn cut_line(line: &mut String) {
    if line.len() <= MAX_LINE_BYTES {
        return;
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line.push_str(CUT_MARKER);
}

/// One log file as a writer task sees it: written on the blocking pool, closed when idle,
/// errors logged once per outage.
struct FileSink {
    path: PathBuf,
    rotation: Rotation,
    /// `None` until the first line, and again after `IDLE_CLOSE` without one.
    file: Option<RotatingFile>,
    dropped: Arc<AtomicU64>,
    /// Lines dropped since writing last failed, while it keeps failing.
    failing: Option<u64>,
}

impl FileSink {
    fn new(path: PathBuf, rotation: Rotation, dropped: Arc<AtomicU64>) -> Self {
        Self {
            path,
            rotation,
            file: None,
            dropped,
            failing: None,
        }
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }

    fn close(&mut self) {
        self.file = None;
    }

    async fn write(&mut self, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let count = lines.len() as u64;
        let file = self.file.take();
        let path = self.path.clone();
        let rotation = self.rotation;
        let outcome =
            tokio::task::spawn_blocking(move || write_batch(file, &path, rotation, &lines)).await;
        let (file, dropped, error) = match outcome {
            Ok(outcome) => outcome,
            Err(e) => (None, count, Some(io::Error::other(e.to_string()))),
        };
        self.file = file;
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        match (error, self.failing) {
            (Some(e), None) => {
                tracing::error!(
                    path = %self.path.display(),
                    "cannot write log file, dropping its lines until it works again: {e}"
                );
                self.failing = Some(dropped);
            }
            (Some(_), Some(so_far)) => self.failing = Some(so_far + dropped),
            (None, Some(so_far)) => {
                tracing::info!(
                    path = %self.path.display(),
                    dropped_lines = so_far,
                    "log file writable again"
                );
                self.failing = None;
            }
            (None, None) => {}
        }
    }
}

/// Writes `lines` (opening the file first if needed) on a blocking thread. Returns the file
/// for the next batch, how many lines were dropped, and the first error.
fn write_batch(
    file: Option<RotatingFile>,
    path: &Path,
    rotation: Rotation,
    lines: &[String],
) -> (Option<RotatingFile>, u64, Option<io::Error>) {
    let mut file = match file {
        Some(file) => file,
        None => match RotatingFile::open(path, rotation) {
            Ok(file) => file,
            Err(e) => return (None, lines.len() as u64, Some(e)),
        },
    };
    let (dropped, first_error) = file.write_lines(lines);
    (Some(file), dropped, first_error)
}

/// Receives the next batch into `batch`; `false` when every sender is gone and the queue is
/// empty. While the file is open, waiting longer than `IDLE_CLOSE` closes it.
async fn next_batch<M>(
    rx: &mut mpsc::Receiver<M>,
    batch: &mut Vec<M>,
    sink: &mut FileSink,
) -> bool {
    loop {
        if !sink.is_open() {
            return rx.recv_many(batch, WRITE_BATCH_LINES).await > 0;
        }
        match tokio::time::timeout(IDLE_CLOSE, rx.recv_many(batch, WRITE_BATCH_LINES)).await {
            Ok(received) => return received > 0,
            Err(_) => sink.close(),
        }
    }
}

/// The writer task of one app log file; ends when its app is gone and its readers are done.
async fn write_app_log(mut sink: FileSink, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_LINES);
    while next_batch(&mut rx, &mut batch, &mut sink).await {
        let mut lines = Vec::with_capacity(batch.len());
        let mut syncs = Vec::new();
        for message in batch.drain(..) {
            match message {
                Write::Line(line) => lines.push(line),
                Write::Sync(done) => syncs.push(done),
            }
        }
        sink.write(lines).await;
        for done in syncs {
            // The reader may have stopped waiting; nothing to tell it then.
            let _ = done.send(());
        }
    }
}

/// The access log writer: writes each line received on `rx` to `log_dir/access.log`, rotated
/// like the app logs. Lines are cut at `MAX_LINE_BYTES`. Disk errors are logged and counted in
/// the log, never returned: serving must not stop because the access log cannot be written.
/// Ends once every sender is dropped and the queued lines are written.
pub async fn write_access_log(
    log_dir: PathBuf,
    rotation: Rotation,
    mut rx: mpsc::Receiver<String>,
) {
    let dropped = Arc::new(AtomicU64::new(0));
    let mut sink = FileSink::new(log_dir.join(ACCESS_LOG_FILE), rotation, dropped);
    let mut batch = Vec::with_capacity(WRITE_BATCH_LINES);
    while next_batch(&mut rx, &mut batch, &mut sink).await {
        gather(&mut rx, &mut batch).await;
        let mut lines = std::mem::take(&mut batch);
        lines.iter_mut().for_each(cut_line);
        sink.write(lines).await;
    }
}

/// Waits `ACCESS_LOG_GATHER`, then takes what arrived meanwhile (up to a full batch) without
/// waiting again: senders do not wake a receiver that is not waiting.
async fn gather<M>(rx: &mut mpsc::Receiver<M>, batch: &mut Vec<M>) {
    if batch.len() >= WRITE_BATCH_LINES {
        return;
    }
    tokio::time::sleep(ACCESS_LOG_GATHER).await;
    while batch.len() < WRITE_BATCH_LINES {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// The access log's first stage: formats the proxy's records into lines for
/// [`write_access_log`], a batch at a time. Ends when the proxy is gone or the writer is.
pub async fn format_access_records(
    mut records: mpsc::Receiver<crate::proxy::AccessRecord>,
    lines: mpsc::Sender<String>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_LINES);
    while records.recv_many(&mut batch, WRITE_BATCH_LINES).await > 0 {
        gather(&mut records, &mut batch).await;
        for record in batch.drain(..) {
            if lines.send(record.to_line()).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;

    /// Generous bound for anything that should happen promptly; only reached when broken.
    const DEADLINE: Duration = Duration::from_secs(30);

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    fn lines_of(path: &Path) -> Vec<String> {
        read(path).lines().map(str::to_string).collect()
    }

    /// Checks the `<time> v<release> #<instance> ` prefix and returns the rest.
    fn strip_prefix(file_line: &str, release: u64, instance: u32) -> String {
        let (at, rest) = file_line.split_once(' ').unwrap();
        humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at:?}: {e}"));
        assert!(
            at.ends_with('Z') && at.len() == "2026-11-25T10:00:00.123Z".len(),
            "{at}"
        );
        let prefix = format!("v{release} #{instance} ");
        rest.strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{file_line:?} lacks {prefix:?}"))
            .to_string()
    }

    fn texts(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    fn shell(script: &str) -> tokio::process::Child {
        tokio::process::Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Runs `script` as instance `instance` of `app`/`release` and waits for its output.
    async fn run_instance(logs: &AppLogs, app: &str, release: u64, instance: u32, script: &str) {
        let mut child = shell(script);
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tasks = logs.attach(app, release, instance, stdout, stderr);
        tokio::time::timeout(DEADLINE, tasks.wait()).await.unwrap();
        assert!(child.wait().await.unwrap().success());
    }

    async fn recv(rx: &mut broadcast::Receiver<LogLine>) -> LogLine {
        tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("no line before the deadline")
            .unwrap()
    }

    #[test]
    fn rotation_happens_at_the_size_bound_and_keeps_only_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app").join(STDOUT_FILE);
        let rotation = Rotation {
            max_file_bytes: 100,
            keep_files: 2,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        // 29 characters + newline = 30 bytes: three lines fit in 100 bytes, a fourth does not.
        let written: Vec<String> = (0..20)
            .map(|i| format!("line {i:02} {}", "x".repeat(21)))
            .collect();
        for line in &written {
            file.write_line(line).unwrap();
        }

        let rotated_1 = rotated_path(&path, 1);
        let rotated_2 = rotated_path(&path, 2);
        for p in [&path, &rotated_1, &rotated_2] {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= 100, "{} has {len} bytes", p.display());
        }
        assert_eq!(lines_of(&rotated_1).len(), 3);
        assert_eq!(lines_of(&rotated_2).len(), 3);
        assert!(
            !rotated_path(&path, 3).exists(),
            "a third old file was kept"
        );
        // The kept files, oldest first, are the newest lines written, in order and complete.
        let kept: Vec<String> = [&rotated_2, &rotated_1, &path]
            .into_iter()
            .flat_map(|p| lines_of(p))
            .collect();
        assert_eq!(kept, written[written.len() - kept.len()..]);
        assert_eq!(kept.len(), 8);

        // Reopening counts the 60 bytes the file holds, so 50 more make it rotate.
        drop(file);
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        file.write_line(&"y".repeat(49)).unwrap();
        assert_eq!(lines_of(&path), vec!["y".repeat(49)]);
        assert_eq!(
            lines_of(&rotated_1).last().unwrap(),
            written.last().unwrap()
        );
    }

    #[test]
    fn batches_land_in_the_same_files_as_lines_written_one_by_one() {
        let rotation = Rotation {
            max_file_bytes: 100,
            keep_files: 3,
        };
        // Lengths that straddle the bound at different places, one longer than the bound,
        // and a newline that must stay inside its line.
        let written: Vec<String> = (0..23)
            .map(|i| match i {
                9 => "a line far longer than the whole bound of this file ".repeat(3),
                14 => format!("line {i} with\na newline"),
                _ => format!("line {i:02} {}", "x".repeat(i * 3 % 40)),
            })
            .collect();
        let one_by_one = tempfile::tempdir().unwrap();
        let mut file = RotatingFile::open(&one_by_one.path().join("a.log"), rotation).unwrap();
        for line in &written {
            file.write_line(line).unwrap();
        }
        for batch_size in [1, 2, 7, 23] {
            let batched = tempfile::tempdir().unwrap();
            let mut file = RotatingFile::open(&batched.path().join("a.log"), rotation).unwrap();
            for batch in written.chunks(batch_size) {
                let (dropped, error) = file.write_lines(batch);
                assert_eq!((dropped, error.map(|e| e.to_string())), (0, None));
            }
            for name in ["a.log", "a.log.1", "a.log.2", "a.log.3"] {
                assert_eq!(
                    read(&batched.path().join(name)),
                    read(&one_by_one.path().join(name)),
                    "{name} with batches of {batch_size}"
                );
            }
        }
    }

    #[test]
    fn a_batch_that_cannot_be_written_counts_every_line_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app").join(STDOUT_FILE);
        let mut file = RotatingFile::open(&path, Rotation::default()).unwrap();
        file.write_line("before").unwrap();
        // The directory is replaced by a file: the log cannot be reopened there.
        file.close();
        std::fs::remove_dir_all(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app"), "").unwrap();
        let (dropped, error) = file.write_lines(&["one", "two", "three"]);
        assert_eq!(dropped, 3);
        assert!(error.unwrap().to_string().contains("creating"));
        // Once the directory is back, writing works again.
        std::fs::remove_file(dir.path().join("app")).unwrap();
        assert_eq!(file.write_lines(&["four"]).0, 0);
        assert_eq!(read(&path), "four\n");
    }

    #[test]
    fn without_kept_files_the_log_starts_afresh_and_long_lines_stand_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_LOG_FILE);
        let rotation = Rotation {
            max_file_bytes: 10,
            keep_files: 0,
        };
        let mut file = RotatingFile::open(&path, rotation).unwrap();
        file.write_line("first").unwrap();
        file.write_line("a line longer than the bound").unwrap();
        assert_eq!(read(&path), "a line longer than the bound\n");
        file.write_line("next").unwrap();
        assert_eq!(read(&path), "next\n");
        assert!(!rotated_path(&path, 1).exists());
    }

    #[test]
    fn an_embedded_newline_cannot_make_two_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_LOG_FILE);
        let mut file = RotatingFile::open(&path, Rotation::default()).unwrap();
        file.write_line("GET /a\nforged 200").unwrap();
        assert_eq!(read(&path), "GET /a\\nforged 200\n");
    }

    #[tokio::test]
    async fn a_real_child_is_logged_to_files_tail_and_stderr_tail() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        run_instance(
            &logs,
            "hello",
            3,
            1,
            "echo out; echo err 1>&2; printf partial",
        )
        .await;

        let stdout: Vec<String> = lines_of(&dir.path().join("hello").join(STDOUT_FILE))
            .iter()
            .map(|l| strip_prefix(l, 3, 1))
            .collect();
        assert_eq!(stdout, ["out", "partial"]);
        let stderr: Vec<String> = lines_of(&dir.path().join("hello").join(STDERR_FILE))
            .iter()
            .map(|l| strip_prefix(l, 3, 1))
            .collect();
        assert_eq!(stderr, ["err"]);

        let tail = logs.tail("hello", TAIL_LINES, None);
        assert_eq!(tail.len(), 3);
        let mut seen = texts(&tail);
        seen.sort_unstable();
        assert_eq!(seen, ["err", "out", "partial"]);
        // Within a stream the order is the order printed.
        let out: Vec<&LogLine> = tail.iter().filter(|l| l.stream == Stream::Stdout).collect();
        assert_eq!(out[0].line, "out");
        assert_eq!(out[1].line, "partial");
        for line in &tail {
            assert_eq!(
                (line.app.as_str(), line.release, line.instance),
                ("hello", 3, 1)
            );
            humantime::parse_rfc3339(&line.at).unwrap();
        }
        assert_eq!(
            tail.iter().find(|l| l.line == "err").unwrap().stream,
            Stream::Stderr
        );

        // Another release of the same app, failing on stderr.
        run_instance(
            &logs,
            "hello",
            4,
            1,
            "echo starting; echo boom 1>&2; echo bang 1>&2",
        )
        .await;
        assert_eq!(logs.stderr_tail("hello", 3, 10), "err");
        assert_eq!(logs.stderr_tail("hello", 4, 10), "boom\nbang");
        assert_eq!(logs.stderr_tail("hello", 4, 1), "bang");
        assert_eq!(logs.stderr_tail("hello", 5, 10), "");
        assert_eq!(logs.stderr_tail("nope", 3, 10), "");
        assert_eq!(
            texts(&logs.tail("hello", 10, Some(4))),
            ["starting", "boom", "bang"]
        );
        assert_eq!(texts(&logs.tail("hello", 2, Some(4))), ["boom", "bang"]);
        assert_eq!(logs.tail("hello", 10, None).len(), 6);
        assert!(logs.tail("nope", 10, None).is_empty());

        // Both releases appended to the same files.
        let stderr = lines_of(&dir.path().join("hello").join(STDERR_FILE));
        assert_eq!(strip_prefix(&stderr[2], 4, 1), "bang");
        assert_eq!(logs.dropped_lines(), 0);
    }

    #[tokio::test]
    async fn the_tail_keeps_the_newest_lines_and_stderr_survives_a_chatty_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        let script = format!(
            "echo early-error 1>&2; i=0; while [ $i -lt {} ]; do echo line-$i; i=$((i+1)); done",
            TAIL_LINES + 50
        );
        run_instance(&logs, "chatty", 1, 1, &script).await;

        let tail = logs.tail("chatty", usize::MAX, None);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(
            tail.last().unwrap().line,
            format!("line-{}", TAIL_LINES + 49)
        );
        assert_eq!(logs.stderr_tail("chatty", 1, 10), "early-error");
        let stdout = lines_of(&dir.path().join("chatty").join(STDOUT_FILE));
        assert_eq!(stdout.len(), TAIL_LINES + 50);
    }

    #[tokio::test]
    async fn followers_receive_lines_while_the_pipe_is_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        let mut follower = logs.follow();
        let (mut stdout, pipe) = tokio::io::duplex(1024);
        let tasks = logs.attach("live", 7, 2, pipe, tokio::io::empty());

        stdout.write_all(b"one\n").await.unwrap();
        let line = recv(&mut follower).await;
        assert_eq!(
            (
                line.app.as_str(),
                line.release,
                line.instance,
                line.stream,
                line.line.as_str()
            ),
            ("live", 7, 2, Stream::Stdout, "one")
        );
        stdout.write_all(b"two\r\n").await.unwrap();
        assert_eq!(recv(&mut follower).await.line, "two");

        drop(stdout);
        tokio::time::timeout(DEADLINE, tasks.wait()).await.unwrap();
        let file: Vec<String> = lines_of(&dir.path().join("live").join(STDOUT_FILE))
            .iter()
            .map(|l| strip_prefix(l, 7, 2))
            .collect();
        assert_eq!(file, ["one", "two"]);
    }

    #[tokio::test]
    async fn an_overlong_line_is_cut_with_a_marker_and_the_next_line_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        let (mut stdout, pipe) = tokio::io::duplex(64 * 1024);
        let tasks = logs.attach("long", 1, 1, pipe, tokio::io::empty());
        let writer = tokio::spawn(async move {
            let mut input = "x".repeat(MAX_LINE_BYTES * 3).into_bytes();
            input.extend_from_slice(b"\n");
            input.extend_from_slice("y".repeat(MAX_LINE_BYTES).as_bytes());
            input.extend_from_slice(b"\nnext\n");
            stdout.write_all(&input).await.unwrap();
        });
        tokio::time::timeout(DEADLINE, tasks.wait()).await.unwrap();
        writer.await.unwrap();

        let cut = format!("{}{CUT_MARKER}", "x".repeat(MAX_LINE_BYTES));
        let exact = "y".repeat(MAX_LINE_BYTES);
        assert_eq!(
            texts(&logs.tail("long", 10, None)),
            [cut.as_str(), exact.as_str(), "next"]
        );
        let file: Vec<String> = lines_of(&dir.path().join("long").join(STDOUT_FILE))
            .iter()
            .map(|l| strip_prefix(l, 1, 1))
            .collect();
        assert_eq!(file, [cut, exact, "next".to_string()]);
    }

    #[tokio::test]
    async fn line_splitting_holds_across_small_reads() {
        // A 7-byte buffer makes every line, and the cut, straddle reads.
        let mut input = b"ab\r\n\nc".repeat(3);
        input.extend_from_slice(&[b'z'; MAX_LINE_BYTES + 20]);
        input.extend_from_slice(b"\r\nend");
        let mut reader = LineReader::with_capacity(7, &input[..]);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            lines.push(line);
        }
        let cut = format!("c{}{CUT_MARKER}", "z".repeat(MAX_LINE_BYTES - 1));
        assert_eq!(lines, ["ab", "", "cab", "", "cab", "", &cut, "end"]);
    }

    #[tokio::test]
    async fn a_cut_inside_a_character_leaves_no_replacement_character() {
        let mut input = "a".repeat(MAX_LINE_BYTES - 1).into_bytes();
        input.extend_from_slice("é and more\n".as_bytes());
        let mut reader = LineReader::new(&input[..]);
        let line = reader.next_line().await.unwrap().unwrap();
        assert_eq!(
            line,
            format!("{}{CUT_MARKER}", "a".repeat(MAX_LINE_BYTES - 1))
        );
        assert_eq!(reader.next_line().await.unwrap(), None);
    }

    #[tokio::test]
    async fn invalid_utf8_is_logged_lossily() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        run_instance(
            &logs,
            "bytes",
            1,
            1,
            r"printf 'caf\351 ok\r\n'; printf '\377\376' 1>&2",
        )
        .await;

        assert_eq!(logs.tail("bytes", 10, None)[0].line, "caf\u{FFFD} ok");
        assert_eq!(logs.stderr_tail("bytes", 1, 10), "\u{FFFD}\u{FFFD}");
        let file = lines_of(&dir.path().join("bytes").join(STDOUT_FILE));
        assert_eq!(strip_prefix(&file[0], 1, 1), "caf\u{FFFD} ok");
    }

    #[tokio::test]
    async fn two_apps_do_not_mix() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Arc::new(AppLogs::new(dir.path(), Rotation::default()));
        let script = |app: &str| {
            format!("for i in 1 2 3 4 5; do echo {app}-$i; echo {app}-err-$i 1>&2; done")
        };
        let (a, b) = (script("alpha"), script("beta"));
        tokio::join!(
            run_instance(&logs, "alpha", 1, 1, &a),
            run_instance(&logs, "beta", 9, 2, &b),
        );

        for (app, release, instance) in [("alpha", 1, 1), ("beta", 9, 2)] {
            let app_dir = dir.path().join(app);
            let out: Vec<String> = lines_of(&app_dir.join(STDOUT_FILE))
                .iter()
                .map(|l| strip_prefix(l, release, instance))
                .collect();
            let expected: Vec<String> = (1..=5).map(|i| format!("{app}-{i}")).collect();
            assert_eq!(out, expected);
            let err: Vec<String> = lines_of(&app_dir.join(STDERR_FILE))
                .iter()
                .map(|l| strip_prefix(l, release, instance))
                .collect();
            let expected: Vec<String> = (1..=5).map(|i| format!("{app}-err-{i}")).collect();
            assert_eq!(err, expected);
            let tail = logs.tail(app, TAIL_LINES, None);
            assert_eq!(tail.len(), 10);
            assert!(tail.iter().all(|l| l.app == app && l.line.starts_with(app)));
        }
        assert_eq!(logs.stderr_tail("alpha", 9, 10), "");
    }

    #[tokio::test]
    async fn an_invalid_app_name_never_becomes_a_path_but_its_pipes_are_drained() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("logs");
        let logs = AppLogs::new(&log_dir, Rotation::default());
        run_instance(&logs, "..", 1, 1, "echo escaped; echo oops 1>&2").await;
        assert_eq!(logs.stderr_tail("..", 1, 10), "oops");
        assert!(!log_dir.exists());
        assert!(!dir.path().join(STDOUT_FILE).exists());
    }

    #[tokio::test]
    async fn the_access_log_writes_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            max_file_bytes: 200,
            keep_files: 1,
        };
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_access_log(dir.path().to_path_buf(), rotation, rx));
        // 49 bytes + newline: four lines per file.
        let sent: Vec<String> = (0..10)
            .map(|i| format!("GET /{i} 200 {}", "-".repeat(38)))
            .collect();
        for line in &sent {
            tx.send(line.clone()).await.unwrap();
        }
        tx.send(format!("GET /{}", "l".repeat(MAX_LINE_BYTES)))
            .await
            .unwrap();
        drop(tx);
        tokio::time::timeout(DEADLINE, writer)
            .await
            .unwrap()
            .unwrap();

        let path = dir.path().join(ACCESS_LOG_FILE);
        let live = lines_of(&path);
        let cut = format!("GET /{}{CUT_MARKER}", "l".repeat(MAX_LINE_BYTES - 5));
        assert_eq!(live, [cut]);
        assert_eq!(lines_of(&rotated_path(&path, 1)), sent[8..]);
        assert!(!rotated_path(&path, 2).exists());
    }

    #[tokio::test]
    async fn an_unwritable_log_drops_lines_for_the_file_only_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the app's directory should be: every open fails.
        let blocker = dir.path().join("stuck");
        std::fs::write(&blocker, "not a directory").unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        run_instance(&logs, "stuck", 1, 1, "echo a; echo b; echo c 1>&2").await;
        assert_eq!(logs.dropped_lines(), 3);
        assert_eq!(texts(&logs.tail("stuck", 10, Some(1))).len(), 3);

        // Once the disk is usable again, the same writers write again.
        std::fs::remove_file(&blocker).unwrap();
        run_instance(&logs, "stuck", 2, 1, "echo d").await;
        let file = lines_of(&blocker.join(STDOUT_FILE));
        assert_eq!(file.len(), 1);
        assert_eq!(strip_prefix(&file[0], 2, 1), "d");
        assert_eq!(logs.dropped_lines(), 3);
    }

    #[tokio::test]
    async fn removed_apps_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        run_instance(&logs, "gone", 1, 1, "echo bye 1>&2").await;
        assert_eq!(logs.stderr_tail("gone", 1, 10), "bye");
        logs.remove("gone");
        assert_eq!(logs.stderr_tail("gone", 1, 10), "");
        // Attaching again starts a new writer that appends to the same file.
        run_instance(&logs, "gone", 2, 1, "echo back 1>&2").await;
        let file = lines_of(&dir.path().join("gone").join(STDERR_FILE));
        assert_eq!(file.len(), 2);
        assert_eq!(strip_prefix(&file[1], 2, 1), "back");
    }

    #[test]
    fn stream_names_serialize_lowercase() {
        assert_eq!(
            serde_json::to_string(&Stream::Stderr).unwrap(),
            "\"stderr\""
        );
        let line: LogLine = serde_json::from_str(
            r#"{"app":"a","release":1,"instance":0,"stream":"stdout","at":"t","line":"l"}"#,
        )
        .unwrap();
        assert_eq!(line.stream, Stream::Stdout);
    }

    #[test]
    fn app_logs_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<AppLogs>();
        shareable::<LogTasks>();
    }
}
