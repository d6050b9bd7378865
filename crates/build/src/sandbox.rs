//! Running a build's commands: in bubblewrap (or bare, with [`Sandbox::None`]), with a cleared
//! environment, rlimits through `prlimit`, one wall-clock deadline for the whole build, a disk
//! watch, and output forwarded line by line up to the output limit.
//!
//! The sandbox shows a command the system's read-only parts, the build directory and the
//! app's cache read-write, and the runtime, the tools and the CA file read-only; nothing else
//! of the host (not `/etc/platformx`, `/run/credentials`, `/root`, `/home`, Maestro's state).
//! Who a command is outside the sandbox is `owner`'s: the build's uid where the builder can
//! switch users (`setpriv` inside bubblewrap as root, before it otherwise), so the process
//! limit counts that uid's processes (the kernel exempts root's, even from inside a user
//! namespace); otherwise a user namespace mapped from the builder's uid to `nobody`.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::{Instant, MissedTickBehavior};

use crate::lines::Lines;
use crate::owner::{self, NOBODY, RunAs, blocking, switch_args};
use crate::reap::{children_of, group_members, wait_gone};
use crate::{BuildError, BuildLimits, Sandbox, fsutil};

/// Who a build's commands are inside a user namespace: `nobody`, which owns nothing.
const INSIDE_ID: u32 = NOBODY;
/// The umask of a command run as a uid of its own: what it writes stays readable to the
/// builder, which watches the build's disk use, behind the gate of its lent tree
/// ([`owner::give_tree`]).
const SWITCHED_UMASK: &str = "022";

/// Lines kept from a command's output for its error message and for reading the installer's
/// verdict (an unknown package, an out-of-date lockfile): installers put those last.
pub(crate) const TAIL_LINES: usize = 40;

/// How often the build's disk use is measured. A walk of a large `node_modules` takes tens
/// of milliseconds; once a second keeps that small while a runaway writer is caught within
/// about a second's worth of writing (and `RLIMIT_FSIZE` caps any single file meanwhile).
const DISK_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How long output is still read once a command exited: what it wrote just before exiting.
/// Anything still holding the pipe after that (a background process without a sandbox to end
/// it) is killed with its process group.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

// What every sandbox shows of the system is shared with app processes.
use px_runtime::sandbox::{Bwrap, Identity, NIX_STORE, SYSTEM_ETC};

/// Words in a failed command's last lines that mean an allocation failed (Python, glibc,
/// C++, Rust, V8), i.e. the memory limit was hit.
const MEMORY_MARKERS: &[&str] = &[
    "MemoryError",
    "Cannot allocate memory",
    "out of memory",
    "std::bad_alloc",
    "memory allocation of",
    "heap out of memory",
];
/// Words in a failed command's last lines that mean a fork failed: the process limit.
const PROCESS_MARKERS: &[&str] = &[
    "Cannot fork",
    "can't fork",
    "fork: retry",
    "fork: Resource temporarily unavailable",
];
/// `SIGXFSZ`: a file grew past `RLIMIT_FSIZE`, which is set to the disk limit.
const SIGXFSZ: i32 = 25;

/// One command of a build.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// What the build calls it in messages (`npm ci`, `the [build] command`).
    pub label: String,
    pub program: OsString,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Directories put first on `PATH`, before the system's.
    pub path: Vec<PathBuf>,
    /// Variables on top of the build's own.
    pub env: Vec<(String, OsString)>,
    /// Words whose lines are kept wherever they appear in the output (an installer's verdict
    /// followed by pages of usage), for [`Finished::watched`].
    pub watch: &'static [&'static str],
}

/// How a command ended, when no limit stopped it.
#[derive(Debug)]
pub(crate) struct Finished {
    pub success: bool,
    /// `exit status 1`, `signal 9`.
    pub status: String,
    /// Its last [`TAIL_LINES`] lines.
    pub tail: Vec<String>,
    /// The first [`TAIL_LINES`] lines holding a word of [`Step::watch`] or a limit's marker.
    pub watched: Vec<String>,
}

impl Finished {
    pub(crate) fn tail_text(&self) -> String {
        self.tail.join("\n")
    }
}

/// The sandbox of one build: what it shows, the limits, and what the build used so far.
#[derive(Debug)]
pub(crate) struct Jail {
    sandbox: Sandbox,
    limits: BuildLimits,
    /// Read-write.
    writable: Vec<PathBuf>,
    /// Read-only.
    readable: Vec<PathBuf>,
    /// The build's own variables (HOME, caches, CA, registries).
    env: Vec<(String, OsString)>,
    deadline: Instant,
    output_used: u64,
    disk_baseline: u64,
    bwrap: PathBuf,
    prlimit: PathBuf,
    setpriv: PathBuf,
    /// Who the commands are outside the sandbox.
    run_as: RunAs,
    /// With [`RunAs::Switch`], the trees given to the uid for each command and taken back
    /// after it: the writable ones and the app's kept dependencies.
    lent: Vec<PathBuf>,
    /// With [`RunAs::Switch`], the read-only trees already made readable to the uid.
    shared: Vec<PathBuf>,
    /// Trees inside the lent ones that stay the builder's ([`Jail::withhold`]).
    withheld: Vec<PathBuf>,
}

/// Why the loop over a running command ended.
enum Ending {
    Exited(ExitStatus),
    Time,
    Disk,
    Output,
}

impl Jail {
    /// A jail over `writable` (the build directory and the app's cache), whose deadline starts
    /// now, its commands run as `uid` where the builder can switch users.
    pub(crate) async fn new(
        sandbox: Sandbox,
        limits: &BuildLimits,
        writable: Vec<PathBuf>,
        env: Vec<(String, OsString)>,
        uid: Option<u32>,
    ) -> Result<Self, BuildError> {
        let run_as = RunAs::choose(sandbox, uid)?;
        let find = |name: &str| find_on_path(name);
        let prlimit = find("prlimit").ok_or_else(|| BuildError::SandboxUnavailable {
            reason: "`prlimit` (util-linux) is not on PATH".into(),
        })?;
        let (bwrap, setpriv) = match sandbox {
            Sandbox::Bubblewrap => (
                find("bwrap").ok_or_else(|| BuildError::SandboxUnavailable {
                    reason: "`bwrap` is not on PATH".into(),
                })?,
                find("setpriv").unwrap_or_else(|| PathBuf::from("/usr/bin/setpriv")),
            ),
            Sandbox::None => (PathBuf::new(), PathBuf::new()),
        };
        if let RunAs::Root { uid } = run_as {
            for dir in &writable {
                fsutil::chown_tree(dir, uid, uid)?;
            }
        }
        let disk_baseline = {
            let paths = writable.clone();
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
                fsutil::disk_usage(&refs)
            })
            .await
            .unwrap_or(0)
        };
        let lent = match run_as {
            RunAs::Switch { .. } => writable.clone(),
            _ => Vec::new(),
        };
        Ok(Self {
            sandbox,
            limits: limits.clone(),
            writable,
            readable: Vec::new(),
            env,
            deadline: Instant::now() + limits.time,
            output_used: 0,
            disk_baseline,
            bwrap,
            prlimit,
            setpriv,
            lent,
            run_as,
            shared: Vec::new(),
            withheld: Vec::new(),
        })
    }

    /// Gives a tree the builder made after the jail to the build's user, so commands can
    /// write to it (when the builder runs as root in bubblewrap; a builder that switches
    /// users lends the whole build directory for each command, and without either the tree
    /// is the commands' own).
    pub(crate) fn hand_over(&self, path: &Path) -> Result<(), BuildError> {
        if let RunAs::Root { uid } = self.run_as {
            fsutil::chown_tree(path, uid, uid)?;
        }
        Ok(())
    }

    /// Keeps `path`, inside a lent tree, the builder's: what commands must not change, such as
    /// the layers' archives, which are hard links into the shared cache (giving one to the
    /// uid would give it the cached file).
    pub(crate) fn withhold(&mut self, path: &Path) {
        self.withheld.push(path.to_path_buf());
    }

    /// Shows `path` to every later command, read-only, lent to the build's uid with each
    /// command like the writable trees (the app's own kept dependency trees, which the uid
    /// could not read otherwise).
    pub(crate) fn lend_read(&mut self, path: &Path) {
        self.allow_read(path);
        if matches!(self.run_as, RunAs::Switch { .. }) && !self.lent.iter().any(|p| p == path) {
            self.lent.push(path.to_path_buf());
        }
    }

    /// Shows `path` to every later command, read-only.
    pub(crate) fn allow_read(&mut self, path: &Path) {
        if !self.readable.iter().any(|p| p == path) {
            self.readable.push(path.to_path_buf());
        }
    }

    /// Stops showing `path` (a temporary tree that was moved away).
    pub(crate) fn forget(&mut self, path: &Path) {
        self.readable.retain(|p| p != path);
        self.shared.retain(|p| p != path);
    }

    /// Checks that a sandbox starts, so a missing or broken bubblewrap fails the build with
    /// that reason rather than as the installer's failure.
    pub(crate) async fn probe(&mut self, cwd: &Path) -> Result<(), BuildError> {
        if self.sandbox == Sandbox::None {
            return Ok(());
        }
        let step = Step {
            label: "the sandbox check".into(),
            program: "true".into(),
            args: Vec::new(),
            cwd: cwd.to_path_buf(),
            path: Vec::new(),
            env: Vec::new(),
            watch: &[],
        };
        let finished = self.run(&step, &mut |_| {}).await?;
        if finished.success {
            Ok(())
        } else {
            Err(BuildError::SandboxUnavailable {
                reason: format!(
                    "bwrap could not start a command ({}): {}",
                    finished.status,
                    finished.tail_text()
                ),
            })
        }
    }

    /// Runs one command to its end. A limit it hits is the error; otherwise how it ended,
    /// with failures that the limits explain (an allocation, a fork, a file size) turned into
    /// that limit's error.
    pub(crate) async fn run(
        &mut self,
        step: &Step,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Finished, BuildError> {
        let RunAs::Switch { uid } = self.run_as else {
            return self.run_command(step, output).await;
        };
        self.lend(uid).await?;
        let ran = self.run_command(step, output).await;
        // Taken back however the command ended, so the builder packs, checks or removes what
        // it left; a failure to take it back is the build's error before the command's.
        let lent = self.lent.clone();
        blocking(move || lent.iter().try_for_each(|path| owner::take_back(path))).await?;
        ran
    }

    /// Gives the lent trees to `uid` and opens the way to every tree the command is shown.
    async fn lend(&mut self, uid: u32) -> Result<(), BuildError> {
        let lent = self.lent.clone();
        let withheld = self.withheld.clone();
        let share: Vec<PathBuf> = self
            .readable
            .iter()
            .filter(|path| !self.lent.contains(path) && !self.shared.contains(path))
            .cloned()
            .collect();
        self.shared.extend(share.iter().cloned());
        blocking(move || {
            for path in &lent {
                owner::open_ancestors(path)?;
                owner::give_tree(path, uid, &withheld)?;
            }
            for path in &share {
                owner::open_ancestors(path)?;
                owner::share_tree(path)?;
            }
            Ok(())
        })
        .await
    }

    async fn run_command(
        &mut self,
        step: &Step,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Finished, BuildError> {
        let (reader, writer) =
            std::io::pipe().map_err(|e| BuildError::io("creating the output pipe", e))?;
        let writer_err = writer
            .try_clone()
            .map_err(|e| BuildError::io("creating the output pipe", e))?;
        let mut command = self.command(step);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer_err))
            .process_group(0)
            .kill_on_drop(true);
        let spawned = command.spawn();
        // The command holds the pipe's write end until dropped; EOF needs every copy closed.
        drop(command);
        let mut child = spawned.map_err(|e| match self.sandbox {
            Sandbox::Bubblewrap => BuildError::SandboxUnavailable {
                reason: format!("cannot start bwrap: {e}"),
            },
            Sandbox::None => BuildError::io(format!("starting {}", step.label), e),
        })?;
        let group = child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
            .map_err(|e| BuildError::io("reading the command's output", e))?;

        let mut lines = Lines::default();
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let mut watched: Vec<String> = Vec::new();
        let watch = step.watch;
        let mut emit = |line: &str, tail: &mut VecDeque<String>| {
            output(line);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_string());
            let notable = [watch, MEMORY_MARKERS, PROCESS_MARKERS]
                .iter()
                .any(|words| words.iter().any(|w| line.contains(w)));
            if notable && watched.len() < TAIL_LINES {
                watched.push(line.to_string());
            }
        };
        let mut disk = tokio::time::interval(DISK_POLL_INTERVAL);
        disk.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut buffer = vec![0u8; 16 * 1024];
        let mut open = true;
        let mut exited: Option<ExitStatus> = None;
        let mut drain_until: Option<Instant> = None;
        let ending = loop {
            if exited.is_some() && !open {
                break Ending::Exited(exited.unwrap_or_default());
            }
            let drain = drain_until.unwrap_or(self.deadline);
            tokio::select! {
                read = pipe.read(&mut buffer), if open => match read {
                    Ok(0) | Err(_) => open = false,
                    Ok(n) => {
                        self.output_used += n as u64;
                        if self.output_used > self.limits.output_bytes {
                            break Ending::Output;
                        }
                        lines.push(&buffer[..n], &mut |line| emit(line, &mut tail));
                    }
                },
                status = child.wait(), if exited.is_none() => {
                    let status = status.map_err(|e| BuildError::io(format!("waiting for {}", step.label), e))?;
                    exited = Some(status);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                () = tokio::time::sleep_until(drain), if drain_until.is_some() => {
                    open = false;
                }
                () = tokio::time::sleep_until(self.deadline) => break Ending::Time,
                _ = disk.tick() => {
                    if self.disk_used().await > self.limits.disk_bytes {
                        break Ending::Disk;
                    }
                }
            }
        };
        // Whatever happened, nothing of the command outlives it: its process group (bwrap,
        // whose PID namespace ends with it, or the bare command and what it started). The
        // namespace's init and the group's members die a moment after the signal; the run
        // ends only once they are gone, so a build that returned has left nothing behind.
        if let Some(group) = group {
            let pgid = group.as_raw_nonzero().get().unsigned_abs();
            let mut doomed = group_members(pgid);
            if self.sandbox == Sandbox::Bubblewrap {
                doomed.extend(children_of(pgid));
            }
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            let _ = child.wait().await;
            wait_gone(&doomed).await;
        }
        let _ = child.wait().await;
        lines.finish(&mut |line| emit(line, &mut tail));
        let tail: Vec<String> = tail.into_iter().collect();
        let status = match ending {
            Ending::Time => {
                return Err(BuildError::TimeLimit {
                    seconds: self.limits.time.as_secs(),
                });
            }
            Ending::Disk => {
                return Err(BuildError::DiskLimit {
                    limit_bytes: self.limits.disk_bytes,
                });
            }
            Ending::Output => {
                return Err(BuildError::OutputLimit {
                    limit_bytes: self.limits.output_bytes,
                });
            }
            Ending::Exited(status) => status,
        };
        self.classify(step, status, tail, watched)
    }

    /// Turns a failure the limits explain into that limit's error.
    fn classify(
        &self,
        step: &Step,
        status: ExitStatus,
        tail: Vec<String>,
        watched: Vec<String>,
    ) -> Result<Finished, BuildError> {
        use std::os::unix::process::ExitStatusExt;
        if status.success() {
            return Ok(Finished {
                success: true,
                status: "exit status 0".into(),
                tail,
                watched,
            });
        }
        // bwrap reports a signal-killed command as 128 + the signal.
        let file_too_big = status.signal() == Some(SIGXFSZ) || status.code() == Some(128 + SIGXFSZ);
        let said = |markers: &[&str]| {
            watched
                .iter()
                .chain(&tail)
                .any(|line| markers.iter().any(|m| line.contains(m)))
        };
        if file_too_big {
            return Err(BuildError::DiskLimit {
                limit_bytes: self.limits.disk_bytes,
            });
        }
        if said(MEMORY_MARKERS) {
            return Err(BuildError::MemoryLimit {
                step: step.label.clone(),
                limit_bytes: self.limits.memory_bytes,
            });
        }
        if said(PROCESS_MARKERS) {
            return Err(BuildError::ProcessLimit {
                step: step.label.clone(),
                limit: self.limits.processes,
            });
        }
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => status.to_string(),
        };
        Ok(Finished {
            success: false,
            status,
            tail,
            watched,
        })
    }

    /// What the build added to its writable trees since it started.
    async fn disk_used(&self) -> u64 {
        let paths = self.writable.clone();
        let now = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            fsutil::disk_usage(&refs)
        })
        .await
        .unwrap_or(0);
        now.saturating_sub(self.disk_baseline)
    }

    /// The full command line: `prlimit` with the limits, then bubblewrap with its mounts (and
    /// `setpriv` when root), then the step's program.
    fn command(&self, step: &Step) -> tokio::process::Command {
        let limits = &self.limits;
        let mut command = tokio::process::Command::new(&self.prlimit);
        command
            .arg(format!("--data={0}:{0}", limits.memory_bytes))
            .arg(format!("--nproc={0}:{0}", limits.processes))
            .arg(format!("--fsize={0}:{0}", limits.disk_bytes))
            .arg("--");
        // A builder that is not root leaves its ambient capabilities (Maestro's, under
        // maestro.service) behind before bubblewrap or the bare command runs: the `setpriv`
        // that switches to the build's uid empties every set it may, as does the one inside
        // the sandbox that root's commands go through.
        match self.run_as {
            RunAs::Root { .. } => {}
            RunAs::Switch { uid } => {
                command.arg(&self.setpriv).args(switch_args(uid, false));
            }
            RunAs::Own => {
                command.args(px_runtime::caps::drop_words());
            }
        }
        if self.sandbox == Sandbox::Bubblewrap {
            command.arg(&self.bwrap).args(self.bwrap_args(step));
        }
        match self.run_as {
            RunAs::Root { uid } if self.sandbox == Sandbox::Bubblewrap => {
                command.arg(&self.setpriv).args(switch_args(uid, true));
            }
            RunAs::Switch { .. } => {
                // bubblewrap has no umask option; a shell sets it and becomes the program.
                let umask = format!("umask {SWITCHED_UMASK} && exec \"$0\" \"$@\"");
                command.args(["/bin/sh", "-c", &umask]);
            }
            _ => {}
        }
        command.arg(&step.program).args(&step.args);
        // A switched command's directory is its uid's, where the builder may not enter:
        // bubblewrap moves there inside the sandbox.
        match self.run_as {
            RunAs::Switch { .. } => command.current_dir("/"),
            _ => command.current_dir(&step.cwd),
        };
        command.env_clear();
        command.env(
            "PATH",
            build_path(&step.path, &px_runtime::host::env().path),
        );
        command.env("LANG", "C.UTF-8");
        if self.sandbox == Sandbox::Bubblewrap {
            command.env("TMPDIR", "/tmp");
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command.envs(step.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn bwrap_args(&self, step: &Step) -> Vec<OsString> {
        let identity = match self.run_as {
            RunAs::Root { .. } => Identity::Root,
            RunAs::Switch { .. } | RunAs::Own => Identity::Namespace {
                ids: Some((INSIDE_ID, INSIDE_ID)),
                no_nested: false,
            },
        };
        // A private /tmp in memory, as large as the disk limit lets the build's files be.
        let mut b = Bwrap::base(identity, true, self.limits.disk_bytes);
        let mounts: Vec<(&str, &Path)> = SYSTEM_ETC
            .iter()
            .map(|f| ("--ro-bind-try", Path::new(*f)))
            .chain(self.writable.iter().map(|p| ("--bind", p.as_path())))
            .chain(self.readable.iter().map(|p| ("--ro-bind", p.as_path())))
            .collect();
        let paths: Vec<&Path> = mounts.iter().map(|(_, path)| *path).collect();
        b.parents_of(&paths, &[]);
        for (how, path) in mounts {
            b.mount(how, path);
        }
        b.finish(&step.cwd)
    }
}

/// A build command's `PATH`: the step's own directories, then the directories every Unix has,
/// then the entries of the builder's own `PATH` that are in the Nix store. On NixOS the
/// system's programs (a shell's `true`, `make` for a `[build] command`) are in no directory of
/// [`px_runtime::host::DEFAULT_PATH`] but in the store, where the service's `PATH` (the
/// unit's `path =` packages) names them; the sandbox shows the store, so they run there.
/// Other entries of the builder's `PATH` (a home directory's tools) stay out, as before.
fn build_path(step_path: &[PathBuf], host_path: &std::ffi::OsStr) -> OsString {
    let mut path: Vec<OsString> = step_path.iter().map(|p| p.as_os_str().to_owned()).collect();
    path.push(px_runtime::host::DEFAULT_PATH.into());
    path.extend(
        std::env::split_paths(host_path)
            .filter(|dir| dir.starts_with(NIX_STORE))
            .map(PathBuf::into_os_string),
    );
    join_os(&path, ":")
}

fn join_os(parts: &[OsString], sep: &str) -> OsString {
    let mut out = OsString::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(sep);
        }
        out.push(part);
    }
    out
}

pub(crate) use px_runtime::sandbox::{find_on_path, is_executable};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_build_path_has_the_steps_dirs_the_systems_and_the_nix_store_entries_of_the_builders() {
        let host = std::ffi::OsStr::new(
            "/root/.cargo/bin:/nix/store/abc-coreutils-9.5/bin:/usr/bin:/nix/store/def-gnumake-4.4/bin:/home/dev/bin",
        );
        let path = build_path(&[PathBuf::from("/build/.px/runtime/bin")], host);
        assert_eq!(
            path,
            format!(
                "/build/.px/runtime/bin:{}:/nix/store/abc-coreutils-9.5/bin:/nix/store/def-gnumake-4.4/bin",
                px_runtime::host::DEFAULT_PATH
            )
            .as_str()
        );
        // A machine without Nix: nothing of the builder's PATH is added.
        let path = build_path(
            &[],
            std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/root/.pyenv/shims"),
        );
        assert_eq!(path, px_runtime::host::DEFAULT_PATH);
    }
}
