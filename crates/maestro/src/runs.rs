//! One-off commands (`em run`, docs/src/design/processes.md) on this node: each run is a
//! process of the app's serving release, started like an instance (its directory, its
//! environment, its rlimits, Maestro's user) in a process group of its own, under a
//! pseudo-terminal when asked (`setsid --ctty` makes it the controlling terminal, so Ctrl-C
//! reaches the foreground group) or with pipes. Its frames go to Beacon through the link
//! within `px_proto::run`'s window; a detached run writes to the app's logs as `run.N`.
//! When Beacon hangs a run up or the link drops, the group gets SIGHUP, then SIGTERM, then
//! SIGKILL, and no process of it is left.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use px_proto::run::{
    MAX_RUN_CHUNK_BYTES, MAX_RUN_DURATION, MAX_RUNS_PER_NODE, NodeRunFrame, OutputStream,
    RUN_QUEUE_FRAMES, RUN_WINDOW_BYTES, RunExit, RunFromNode, RunSignal, RunStart, WindowSize,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::logs::AppLogs;
use crate::process::{self, Launch};
use crate::supervisor::{RunTarget, Supervisor};

/// How long a hung-up run has after SIGHUP before SIGTERM: a shell or an editor exits at once.
pub const RUN_HANGUP_GRACE: Duration = Duration::from_secs(2);
/// How long after SIGTERM before SIGKILL: enough for a command to clean up, short enough
/// that a disconnected user's process is gone within seconds.
pub const RUN_TERM_GRACE: Duration = Duration::from_secs(5);
/// Frames of run output queued for the link at once, across every run of the node; each run
/// also keeps within its window, so a slow link stops the runs' reads, never grows memory.
pub const RUN_OUT_QUEUE: usize = 256;
/// The process-type name of runs in the app's logs (`run.7`).
pub const RUN_PROCESS: &str = "run";

/// What a run's task hears from Beacon.
enum Control {
    Resize(WindowSize),
    Signal(RunSignal),
    Ack(u64),
}

/// A live attached run, as the link reaches it.
struct Handle {
    control: mpsc::Sender<Control>,
    /// Input in order, `None` for its end: one queue, so the end never overtakes input.
    input: mpsc::Sender<Option<Vec<u8>>>,
}

/// The runs of this node.
pub(crate) struct Runs {
    supervisor: Arc<Supervisor>,
    logs: Arc<AppLogs>,
    out: mpsc::Sender<RunFromNode>,
    attached: Mutex<HashMap<u64, Handle>>,
    live: Arc<AtomicUsize>,
}

impl Runs {
    /// The runs, and the queue of their frames for the link.
    pub(crate) fn new(
        supervisor: Arc<Supervisor>,
        logs: Arc<AppLogs>,
    ) -> (Arc<Self>, mpsc::Receiver<RunFromNode>) {
        let (out, rx) = mpsc::channel(RUN_OUT_QUEUE);
        let runs = Arc::new(Self {
            supervisor,
            logs,
            out,
            attached: Mutex::new(HashMap::new()),
            live: Arc::new(AtomicUsize::new(0)),
        });
        (runs, rx)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link dropped: every attached run is hung up (its handle dropped). Detached runs
    /// go on: nobody is attached to them.
    pub(crate) fn link_lost(&self) {
        self.lock().clear();
    }

    /// Takes a frame from Beacon. Never waits: a run whose queue is full faces a Beacon that
    /// ignored the window, and is hung up.
    pub(crate) fn handle(&self, frame: NodeRunFrame) {
        let run = frame.run();
        let control = match frame {
            NodeRunFrame::Start(start) => return self.start(start),
            NodeRunFrame::Close { .. } => {
                self.lock().remove(&run);
                return;
            }
            NodeRunFrame::Input { data, .. } => return self.input(run, Some(data)),
            NodeRunFrame::Eof { .. } => return self.input(run, None),
            NodeRunFrame::Resize { size, .. } => Control::Resize(size),
            NodeRunFrame::Signal { signal, .. } => Control::Signal(signal),
            NodeRunFrame::Ack { bytes, .. } => Control::Ack(bytes),
        };
        let mut runs = self.lock();
        if let Some(handle) = runs.get(&run)
            && handle.control.try_send(control).is_err()
        {
            runs.remove(&run);
        }
    }

    fn input(&self, run: u64, data: Option<Vec<u8>>) {
        let mut runs = self.lock();
        // Input after its end finds the writer gone, and is dropped; only a full queue (a
        // Beacon past the window) ends the run.
        if let Some(handle) = runs.get(&run)
            && let Err(mpsc::error::TrySendError::Full(_)) = handle.input.try_send(data)
        {
            runs.remove(&run);
        }
    }

    fn refuse(&self, run: u64, message: String) {
        tracing::info!(run, %message, "run refused");
        let _ = self.out.try_send(RunFromNode::Failed { run, message });
    }

    fn start(&self, start: RunStart) {
        let run = start.run;
        let Some(target) = self.supervisor.run_target(&start.app) else {
            return self.refuse(run, format!("{} does not run on this node", start.app));
        };
        if target.release != start.release {
            return self.refuse(
                run,
                format!(
                    "this node runs {} v{}, not v{}; try again once the deploy is done",
                    start.app, target.release, start.release
                ),
            );
        }
        if self.live.load(Ordering::SeqCst) >= MAX_RUNS_PER_NODE {
            return self.refuse(
                run,
                format!("this node already has {MAX_RUNS_PER_NODE} runs"),
            );
        }
        let spawned = self
            .supervisor
            .run_start(&start.app, &target.dir, &target.limits)
            .and_then(|begin| {
                let spawned = if start.tty {
                    spawn_tty(&start, &target, &begin.words, begin.sandboxed)
                } else {
                    spawn_pipes(&start, &target, &begin.words)
                };
                match spawned {
                    Ok(process) => Ok((process, begin.cgroup)),
                    Err(e) => {
                        if let Some(cgroup) = begin.cgroup {
                            cgroup.remove();
                        }
                        Err(e)
                    }
                }
            });
        let (process, cgroup) = match spawned {
            Ok(process) => process,
            Err(e) => {
                let program = start
                    .command
                    .first()
                    .map(String::as_str)
                    .unwrap_or_default();
                return self.refuse(run, format!("cannot start {program:?}: {e}"));
            }
        };
        let pid = process.child.id().unwrap_or_default();
        self.supervisor.track_group(pid, true);
        tracing::info!(app = %start.app, run, pid, tty = start.tty, detach = start.detach, "run started");
        let mut guard = LiveGuard::new(self.live.clone(), Some(self.supervisor.clone()), pid);
        guard.cgroup = cgroup;
        let _ = self.out.try_send(RunFromNode::Started { run, pid });
        if start.detach {
            tokio::spawn(detached(
                run,
                start.app,
                target.release,
                process,
                self.logs.clone(),
                self.out.clone(),
                guard,
            ));
            return;
        }
        let (control_tx, control_rx) = mpsc::channel(RUN_QUEUE_FRAMES);
        let (input_tx, input_rx) = mpsc::channel(RUN_QUEUE_FRAMES);
        self.lock().insert(
            run,
            Handle {
                control: control_tx,
                input: input_tx,
            },
        );
        tokio::spawn(attached(
            run,
            process,
            control_rx,
            input_rx,
            self.out.clone(),
            guard,
        ));
    }
}

/// Counts a run as live, and forgets its group, for as long as it lives.
struct LiveGuard {
    live: Arc<AtomicUsize>,
    /// Where the run's group is recorded (none in tests of a run alone).
    supervisor: Option<Arc<Supervisor>>,
    pid: u32,
    /// The run's cgroup under `cgroup_limits`, removed once the run is gone.
    cgroup: Option<crate::limits::InstanceCgroup>,
}

impl LiveGuard {
    fn new(live: Arc<AtomicUsize>, supervisor: Option<Arc<Supervisor>>, pid: u32) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self {
            live,
            supervisor,
            pid,
            cgroup: None,
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        if let Some(supervisor) = &self.supervisor {
            supervisor.track_group(self.pid, false);
        }
        if let Some(cgroup) = self.cgroup.take() {
            // Its process group was ended; the cgroup empties a moment later.
            tokio::task::spawn_blocking(move || cgroup.remove());
        }
    }
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A started run's process and its ends.
struct Process {
    child: Child,
    stdin: Option<Writer>,
    stdout: Option<Reader>,
    stderr: Option<Reader>,
    /// The terminal's master side, to resize it.
    master: Option<OwnedFd>,
}

fn launch<'a>(start: &'a RunStart, target: &'a RunTarget) -> Launch<'a> {
    Launch {
        app: &start.app,
        release: target.release,
        dir: &target.dir,
        run: None,
        path: &target.path,
        env: &target.env,
        port: None,
        extra_env: vec![
            ("PX_PROCESS".into(), RUN_PROCESS.into()),
            ("PX_RUN".into(), start.run.to_string()),
        ],
    }
}

fn words(prefix: &[std::ffi::OsString], start: &RunStart) -> Vec<std::ffi::OsString> {
    prefix
        .iter()
        .cloned()
        .chain(start.command.iter().map(Into::into))
        .collect()
}

fn spawn_pipes(
    start: &RunStart,
    target: &RunTarget,
    prefix: &[std::ffi::OsString],
) -> std::io::Result<Process> {
    let mut command = process::command(&words(prefix, start), &launch(start, target));
    let stdin = if start.detach {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdin = child.stdin.take().map(|s| Box::new(s) as Writer);
    let stdout = child.stdout.take().map(|s| Box::new(s) as Reader);
    let stderr = child.stderr.take().map(|s| Box::new(s) as Reader);
    Ok(Process {
        child,
        stdin,
        stdout,
        stderr,
        master: None,
    })
}

fn winsize(size: WindowSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Under a new pseudo-terminal: `setsid --ctty` puts the command in a session of its own,
/// whose controlling terminal is the terminal (no `unsafe` `pre_exec` needed). Its pid leads
/// the session and the process group, so the group can be signalled as an instance's is. In a
/// sandbox, `setsid` runs inside it, so the terminal's Ctrl-C reaches the command alone and
/// not bubblewrap outside (which would die of it and take the command's exit status along);
/// the sandbox then leads a process group of its own, whose signals reach the command as
/// [`process::signal_group`] says.
fn spawn_tty(
    start: &RunStart,
    target: &RunTarget,
    prefix: &[std::ffi::OsString],
    sandboxed: bool,
) -> std::io::Result<Process> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    if let Some(size) = start.size {
        rustix::termios::tcsetwinsize(&master, winsize(size))?;
    }
    let name = ptsname(&master, Vec::new())?;
    // O_NOCTTY: under systemd Maestro leads its own session with no terminal, and opening the
    // slave without it would make the terminal Maestro's; the command's `setsid --ctty` would
    // then be refused ("Operation not permitted").
    use std::os::unix::fs::OpenOptionsExt;
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(std::ffi::OsStr::from_bytes_path(name.as_bytes()))?
        .into();
    let setsid: [std::ffi::OsString; 2] = ["setsid".into(), "--ctty".into()];
    let all: Vec<std::ffi::OsString> = if sandboxed {
        prefix
            .iter()
            .chain(&setsid)
            .cloned()
            .chain(start.command.iter().map(Into::into))
            .collect()
    } else {
        setsid.iter().cloned().chain(words(prefix, start)).collect()
    };
    let mut command = process::command(&all, &launch(start, target));
    if sandboxed {
        command.process_group(0);
    }
    command
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .kill_on_drop(true);
    let child = command.spawn()?;
    // The parent's copies of the terminal's slave side are closed once `command` is dropped,
    // so the master reads end when the last process of the run closes it.
    drop(command);
    let reader = std::fs::File::from(master.try_clone()?);
    let writer = std::fs::File::from(master.try_clone()?);
    Ok(Process {
        child,
        stdin: Some(Box::new(tokio::fs::File::from_std(writer))),
        stdout: Some(Box::new(tokio::fs::File::from_std(reader))),
        stderr: None,
        master: Some(master),
    })
}

/// `OsStr` from the bytes of a path, as `ptsname` gives them.
trait FromBytesPath {
    fn from_bytes_path(bytes: &[u8]) -> &std::ffi::OsStr;
}

impl FromBytesPath for std::ffi::OsStr {
    fn from_bytes_path(bytes: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(bytes)
    }
}

fn unix_signal(signal: RunSignal) -> Signal {
    match signal {
        RunSignal::Int => Signal::SIGINT,
        RunSignal::Term => Signal::SIGTERM,
        RunSignal::Hup => Signal::SIGHUP,
        RunSignal::Quit => Signal::SIGQUIT,
        RunSignal::Kill => Signal::SIGKILL,
    }
}

fn exit_of(status: Option<ExitStatus>) -> RunExit {
    use std::os::unix::process::ExitStatusExt;
    RunExit {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
    }
}

/// Hangs a run up: SIGHUP to its group, SIGTERM after [`RUN_HANGUP_GRACE`], SIGKILL after
/// [`RUN_TERM_GRACE`]; then SIGKILL to the group in any case, so nothing of it stays.
async fn hang_up(child: &mut Child) -> Option<ExitStatus> {
    let Some(pid) = child.id() else {
        return child.try_wait().ok().flatten();
    };
    let mut status = None;
    for (signal, grace) in [
        (Signal::SIGHUP, RUN_HANGUP_GRACE),
        (Signal::SIGTERM, RUN_TERM_GRACE),
    ] {
        process::signal_group(pid, signal);
        if let Ok(exited) = tokio::time::timeout(grace, child.wait()).await {
            status = exited.ok();
            break;
        }
    }
    process::signal_group(pid, Signal::SIGKILL);
    match status {
        Some(status) => Some(status),
        None => child.wait().await.ok(),
    }
}

/// Reads one chunk; `None` at the end (a terminal whose last user left reads EIO).
async fn read_chunk(reader: &mut Option<Reader>) -> Option<Vec<u8>> {
    let Some(r) = reader.as_mut() else {
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; MAX_RUN_CHUNK_BYTES];
    match r.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
    }
}

/// Writes Beacon's input to the process, acknowledging each chunk once written; a process
/// that does not read its input holds its window, not this node's memory.
async fn write_input(
    run: u64,
    mut stdin: Option<Writer>,
    mut input: mpsc::Receiver<Option<Vec<u8>>>,
    out: mpsc::Sender<RunFromNode>,
) {
    // The end of input closes the process's stdin (dropping it), and ends this task.
    while let Some(Some(data)) = input.recv().await {
        let bytes = data.len() as u64;
        if let Some(w) = stdin.as_mut()
            && (w.write_all(&data).await.is_err() || w.flush().await.is_err())
        {
            stdin = None;
        }
        if out.send(RunFromNode::Ack { run, bytes }).await.is_err() {
            return;
        }
    }
}

/// An attached run: output to Beacon within the window, Beacon's controls to the process,
/// until it exits (then its remaining output, then its exit) or is hung up.
async fn attached(
    run: u64,
    mut process: Process,
    mut control: mpsc::Receiver<Control>,
    input: mpsc::Receiver<Option<Vec<u8>>>,
    out: mpsc::Sender<RunFromNode>,
    _guard: LiveGuard,
) {
    let pid = process.child.id().unwrap_or_default();
    let writer = tokio::spawn(write_input(run, process.stdin.take(), input, out.clone()));
    let deadline = tokio::time::sleep(MAX_RUN_DURATION);
    tokio::pin!(deadline);
    let mut in_flight: usize = 0;
    let mut status: Option<ExitStatus> = None;
    let hung_up = loop {
        if status.is_some() && process.stdout.is_none() && process.stderr.is_none() {
            break false;
        }
        let room = in_flight < RUN_WINDOW_BYTES;
        tokio::select! {
            chunk = read_chunk(&mut process.stdout), if room => match chunk {
                Some(data) => {
                    in_flight += data.len();
                    if out.send(RunFromNode::Output { run, stream: OutputStream::Stdout, data }).await.is_err() {
                        break true;
                    }
                }
                None => process.stdout = None,
            },
            chunk = read_chunk(&mut process.stderr), if room => match chunk {
                Some(data) => {
                    in_flight += data.len();
                    if out.send(RunFromNode::Output { run, stream: OutputStream::Stderr, data }).await.is_err() {
                        break true;
                    }
                }
                None => process.stderr = None,
            },
            exited = process.child.wait(), if status.is_none() => {
                status = exited.ok();
                // The leader is gone: what it left behind goes too, which also closes the
                // output pipes they held, so the remaining output ends.
                process::signal_group(pid, Signal::SIGKILL);
            }
            ctl = control.recv() => match ctl {
                Some(Control::Ack(bytes)) => in_flight = in_flight.saturating_sub(bytes as usize),
                Some(Control::Resize(size)) => {
                    if let Some(master) = &process.master {
                        let _ = rustix::termios::tcsetwinsize(master, winsize(size));
                    }
                }
                Some(Control::Signal(signal)) => process::signal_group(pid, unix_signal(signal)),
                None => break true,
            },
            _ = &mut deadline => {
                tracing::warn!(run, "run passed its maximum duration; hanging it up");
                break true;
            }
        }
    };
    writer.abort();
    if hung_up {
        let status = match status {
            Some(status) => Some(status),
            None => hang_up(&mut process.child).await,
        };
        tracing::info!(run, pid, exit = ?status, "run hung up");
        // Beacon may still wait for the exit for its event; a dropped link takes nothing.
        let _ = out.try_send(RunFromNode::Exited {
            run,
            exit: exit_of(status),
        });
        return;
    }
    tracing::info!(run, pid, exit = ?status, "run exited");
    let _ = out
        .send(RunFromNode::Exited {
            run,
            exit: exit_of(status),
        })
        .await;
}

/// A detached run: its output goes to the app's logs as `run.N`; its exit goes to Beacon.
async fn detached(
    run: u64,
    app: String,
    release: u64,
    mut process: Process,
    logs: Arc<AppLogs>,
    out: mpsc::Sender<RunFromNode>,
    _guard: LiveGuard,
) {
    let pid = process.child.id().unwrap_or_default();
    if let (Some(stdout), Some(stderr)) = (process.stdout.take(), process.stderr.take()) {
        let number = u32::try_from(run).unwrap_or(u32::MAX);
        let _ = logs.attach_process(&app, release, RUN_PROCESS, number, stdout, stderr);
    }
    let status = match tokio::time::timeout(MAX_RUN_DURATION, process.child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(
                run,
                "detached run passed its maximum duration; hanging it up"
            );
            hang_up(&mut process.child).await
        }
    };
    process::signal_group(pid, Signal::SIGKILL);
    tracing::info!(%app, run, pid, exit = ?status, "detached run ended");
    let _ = out.try_send(RunFromNode::Exited {
        run,
        exit: exit_of(status),
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn target(dir: &std::path::Path) -> RunTarget {
        RunTarget {
            release: 1,
            dir: dir.to_path_buf(),
            path: px_runtime::host::env().path.clone(),
            env: [("SOME_CONFIG".to_string(), "configured".to_string())].into(),
            limits: Default::default(),
        }
    }

    fn start(command: &str, tty: bool, size: Option<WindowSize>) -> RunStart {
        RunStart {
            run: 1,
            app: "hello".into(),
            release: 1,
            command: vec!["sh".into(), "-c".into(), command.into()],
            tty,
            size,
            detach: false,
        }
    }

    /// Beacon's side of a run the test holds.
    struct Held {
        control: mpsc::Sender<Control>,
        input: mpsc::Sender<Option<Vec<u8>>>,
        out: mpsc::Receiver<RunFromNode>,
        task: tokio::task::JoinHandle<()>,
    }

    /// Runs `process` attached, with the test holding Beacon's side.
    fn attach(process: Process) -> Held {
        let (control, control_rx) = mpsc::channel(RUN_QUEUE_FRAMES);
        let (input, input_rx) = mpsc::channel(RUN_QUEUE_FRAMES);
        let (out_tx, out) = mpsc::channel(RUN_OUT_QUEUE);
        let pid = process.child.id().unwrap();
        let guard = LiveGuard::new(Arc::new(AtomicUsize::new(0)), None, pid);
        let task = tokio::spawn(attached(1, process, control_rx, input_rx, out_tx, guard));
        Held {
            control,
            input,
            out,
            task,
        }
    }

    /// Output until the exit: the text, and the exit.
    async fn until_exit(out: &mut mpsc::Receiver<RunFromNode>) -> (String, RunExit) {
        let mut text = String::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), out.recv()).await {
                Ok(Some(RunFromNode::Output { data, .. })) => {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
                Ok(Some(RunFromNode::Exited { exit, .. })) => return (text, exit),
                Ok(Some(_)) => {}
                other => panic!("no exit: {other:?} after {text:?}"),
            }
        }
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    }

    #[tokio::test]
    async fn a_terminal_run_gets_a_terminal_of_the_size_asked_and_the_release_env() {
        let dir = tempfile::tempdir().unwrap();
        let size = WindowSize {
            rows: 33,
            cols: 101,
        };
        let process = spawn_tty(
            &start(
                "tty; stty size; echo \"$SOME_CONFIG\"; pwd",
                true,
                Some(size),
            ),
            &target(dir.path()),
            &[],
            false,
        )
        .unwrap();
        let mut held = attach(process);
        let (text, exit) = until_exit(&mut held.out).await;
        assert!(text.contains("/dev/pts/"), "{text:?}");
        assert!(text.contains("33 101"), "{text:?}");
        assert!(text.contains("configured"), "{text:?}");
        assert!(text.contains(&dir.path().display().to_string()), "{text:?}");
        assert_eq!(exit.code, Some(0));
    }

    #[tokio::test]
    async fn input_reaches_a_piped_run_and_its_eof_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let process = spawn_pipes(
            &start("cat; echo done >&2", false, None),
            &target(dir.path()),
            &[],
        )
        .unwrap();
        let mut held = attach(process);
        held.input.send(Some(b"typed\n".to_vec())).await.unwrap();
        held.input.send(None).await.unwrap();
        let (text, exit) = until_exit(&mut held.out).await;
        // Output and errors come through two pipes, so their order is the scheduler's: the
        // echo after `cat` shows that the end of input ended it.
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["done", "typed"], "{text:?}");
        assert_eq!(exit.code, Some(0));
    }

    #[tokio::test]
    async fn a_run_whose_link_drops_leaves_no_process_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        // The shell ignores SIGHUP (and so does its child), so the hang-up goes on to SIGTERM;
        // the background sleep would outlive a signal sent to the shell alone.
        let process = spawn_pipes(
            &start("trap '' HUP; sleep 1000 & echo $!; wait", false, None),
            &target(dir.path()),
            &[],
        )
        .unwrap();
        let leader = process.child.id().unwrap();
        let Held {
            control,
            input,
            mut out,
            task,
        } = attach(process);
        let sleeper: u32 = loop {
            match out.recv().await.unwrap() {
                RunFromNode::Output { data, .. } => {
                    break String::from_utf8_lossy(&data).trim().parse().unwrap();
                }
                _ => continue,
            }
        };
        assert!(alive(sleeper) && alive(leader));
        // What `Runs::link_lost` does: the run's handle goes.
        drop((control, input));
        tokio::time::timeout(
            RUN_HANGUP_GRACE + RUN_TERM_GRACE + Duration::from_secs(5),
            task,
        )
        .await
        .unwrap()
        .unwrap();
        let (_, exit) = until_exit(&mut out).await;
        assert_eq!(
            exit.signal,
            Some(15),
            "SIGHUP was ignored, SIGTERM ended it"
        );
        assert!(!alive(leader), "the run's shell outlived the hang-up");
        // The group got SIGTERM, then SIGKILL; a loaded machine may take a moment to end
        // the background sleep after the signal.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(sleeper) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !alive(sleeper),
            "a process of the run's group outlived the hang-up"
        );
    }
}
