//! The apps' logs: `AppLogs::attach` reads an instance's pipes line by line into the app's
//! in-memory tail, to live followers and to `log_dir/<app>/{stdout,stderr,events}.log`, one
//! writer task per file; `AppLogs::record_build` takes a build's output to followers and
//! `log_dir/<app>/build.log`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::io::AsyncRead;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::lines::{LineReader, cut_line};
use super::rotation::Rotation;
use super::sink::{FileSink, WRITE_BATCH_LINES, next_batch};
use super::{LogLine, Stream};

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

/// Name of the stdout log inside `log_dir/<app>/`.
pub const STDOUT_FILE: &str = "stdout.log";
/// Name of the stderr log inside `log_dir/<app>/`.
pub const STDERR_FILE: &str = "stderr.log";
/// Events the app posted to `PX_EVENTS_URL`.
pub const EVENTS_FILE: &str = "events.log";
/// The output of the app's builds on this node.
pub const BUILD_FILE: &str = "build.log";

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
    build: mpsc::Sender<Write>,
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
            Stream::Stdout | Stream::Event | Stream::Build => &mut self.stdout,
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
        self.attach_as(app, release, None, instance, stdout, stderr)
    }

    /// [`AppLogs::attach`] for process `number` of a non-web type `process` (`worker`): its
    /// lines are marked `worker.1` in the files (`<time> v3 worker.1 <line>`) and carry the
    /// type in `LogLine::process`, so `em logs` tells them from the web instances'.
    pub fn attach_process<O, E>(
        &self,
        app: &str,
        release: u64,
        process: &str,
        number: u32,
        stdout: O,
        stderr: E,
    ) -> LogTasks
    where
        O: AsyncRead + Unpin + Send + 'static,
        E: AsyncRead + Unpin + Send + 'static,
    {
        self.attach_as(app, release, Some(process), number, stdout, stderr)
    }

    fn attach_as<O, E>(
        &self,
        app: &str,
        release: u64,
        process: Option<&str>,
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
        let process: Option<Arc<str>> = process.map(Arc::from);
        let reader = |stream: Stream| Reader {
            app: app.clone(),
            release,
            process: process.clone(),
            instance,
            stream,
            state: state.clone(),
            file: state.files.as_ref().map(|files| match stream {
                Stream::Stdout => files.stdout.clone(),
                Stream::Stderr => files.stderr.clone(),
                Stream::Event => files.events.clone(),
                Stream::Build => files.build.clone(),
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
    pub(crate) fn record_event(&self, app: &str, release: u64, instance: u32, text: String) {
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
            build: None,
            process: None,
        };
        if self.follow.receiver_count() > 0 {
            let _ = self.follow.send(line.clone());
        }
        state.tail().push(line);
    }

    /// Logs one line of build `build`'s output: to `build.log` and to followers (so the Beacon
    /// link forwards it, batched and bounded like an app's output), not to the app's tail,
    /// which keeps its instances' lines for a failed deploy. Never waits: the builder calls it
    /// from its output loop, and when the file's queue is full the line is counted as dropped
    /// (the builder keeps the log's tail itself). Must be called inside a Tokio runtime.
    pub(crate) fn record_build(&self, app: &str, build: u64, text: &str) {
        let state = self.app_state(app);
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut text = text.replace(['\n', '\r'], " ");
        cut_line(&mut text);
        if let Some(files) = &state.files {
            let file_line = format!("{at} build {build} {text}");
            if files.build.try_send(Write::Line(file_line)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.follow.receiver_count() > 0 {
            let _ = self.follow.send(LogLine {
                app: app.to_string(),
                release: 0,
                instance: 0,
                stream: Stream::Build,
                at,
                line: text,
                build: Some(build),
                process: None,
            });
        }
    }

    /// The last `n` lines (at most `TAIL_LINES`) of an app, oldest first, both streams
    /// interleaved in arrival order; only those of `release` when given. Only the tests read
    /// the whole tail; Maestro quotes stderr (`stderr_tail`) and streams lines to Beacon.
    #[cfg(test)]
    pub(crate) fn tail(&self, app: &str, n: usize, release: Option<u64>) -> Vec<LogLine> {
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
    /// disk stay. Only the tests call it so far: the supervisor keeps a removed app's tail.
    #[cfg(test)]
    pub(crate) fn remove(&self, app: &str) {
        self.lock_apps().remove(app);
    }

    /// Lines that could not be written to their file because of disk errors, since start,
    /// which the tests read (no metric shows it yet). They still reached the tail and followers.
    #[cfg(test)]
    pub(crate) fn dropped_lines(&self) -> u64 {
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
                    build: self.spawn_writer(dir.join(BUILD_FILE)),
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
    /// The type of a non-web process; `None` for a web instance.
    process: Option<Arc<str>>,
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
        let file_line = self.file.as_ref().map(|_| match &self.process {
            Some(process) => format!("{at} v{} {process}.{} {line}", self.release, self.instance),
            None => format!("{at} v{} #{} {line}", self.release, self.instance),
        });
        let log_line = LogLine {
            app: self.app.to_string(),
            release: self.release,
            instance: self.instance,
            stream: self.stream,
            at,
            line,
            build: None,
            process: self.process.as_deref().map(str::to_string),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;

    use crate::logs::lines::{CUT_MARKER, MAX_LINE_BYTES};
    use crate::logs::testing::{DEADLINE, lines_of};

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

    #[tokio::test]
    async fn a_process_of_another_type_is_marked_with_its_type_and_number() {
        let dir = tempfile::tempdir().unwrap();
        let logs = AppLogs::new(dir.path(), Rotation::default());
        let mut follow = logs.follow();
        run_instance(&logs, "shop", 4, 1, "echo served").await;
        let mut child = shell("echo job done; echo retrying 1>&2");
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let tasks = logs.attach_process("shop", 4, "worker", 2, stdout, stderr);
        tokio::time::timeout(DEADLINE, tasks.wait()).await.unwrap();
        child.wait().await.unwrap();

        // The files: web lines as before, the worker's marked with its type and number.
        let stdout = lines_of(&dir.path().join("shop").join(STDOUT_FILE));
        let rests: Vec<&str> = stdout
            .iter()
            .map(|l| l.split_once(' ').unwrap().1)
            .collect();
        assert_eq!(rests, ["v4 #1 served", "v4 worker.2 job done"]);
        let stderr = lines_of(&dir.path().join("shop").join(STDERR_FILE));
        assert!(stderr[0].ends_with(" v4 worker.2 retrying"), "{stderr:?}");
        // What followers (and so Beacon and `em logs`) get.
        let mut marks = Vec::new();
        for _ in 0..3 {
            let line = recv(&mut follow).await;
            marks.push((line.process.clone(), line.instance, line.line.clone()));
        }
        marks.sort();
        assert_eq!(
            marks,
            [
                (None, 1, "served".to_string()),
                (Some("worker".to_string()), 2, "job done".to_string()),
                (Some("worker".to_string()), 2, "retrying".to_string()),
            ]
        );
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
