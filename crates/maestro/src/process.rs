//! One app instance as an operating-system process: started through the AppRunner contract
//! (docs/src/design/contracts.md) in its own process group, health-checked, and stopped with SIGTERM, a
//! grace period, then SIGKILL to the whole group, so nothing it spawned is left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use px_proto::link::FailureKind;
use px_proto::manifest::{APPRUNNER_FILE, HealthCheck};
use tokio::process::{Child, Command};

/// How often a starting instance is probed.
pub(crate) const HEALTH_POLL: Duration = Duration::from_millis(50);
/// How long one health probe may take.
pub(crate) const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Directory of a release whose commands come first on its instances' `PATH`: a bundle that
/// ships its own interpreter or static binaries puts them here.
pub(crate) const BUNDLE_BIN_DIR: &str = "bin";

/// The `PATH` of a release's instances: the release's own `bin/`, then Maestro's `PATH`.
pub fn instance_path(release_dir: &Path) -> std::ffi::OsString {
    instance_path_over(release_dir, &px_runtime::host::env().path)
}

/// The release's own `bin/`, then `host`.
pub(crate) fn instance_path_over(release_dir: &Path, host: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut dirs = vec![release_dir.join(BUNDLE_BIN_DIR)];
    dirs.extend(std::env::split_paths(host));
    std::env::join_paths(dirs).unwrap_or_else(|_| host.to_owned())
}

/// What to start.
pub struct Launch<'a> {
    pub app: &'a str,
    pub release: u64,
    pub dir: &'a Path,
    pub run: Option<&'a str>,
    /// The instance's `PATH`: [`instance_path`] for a release as it was uploaded; a built
    /// release puts its build's directories first.
    pub path: &'a std::ffi::OsStr,
    /// The release's variables: `[env]`, what a build adds, config vars.
    pub env: &'a BTreeMap<String, String>,
    /// Its `PORT` (also `$1`); `None` for a process that takes no port (a worker).
    pub port: Option<u16>,
    /// Extra variables set by Maestro (e.g. the instance number).
    pub extra_env: Vec<(String, String)>,
}

/// Starts an instance, its command after `prefix` (entering its cgroup, a `prlimit ... --` for
/// its rlimits, its sandbox, or nothing). Its stdout and stderr are piped for the caller to
/// attach to the logs.
pub fn spawn(launch: &Launch<'_>, prefix: &[std::ffi::OsString]) -> std::io::Result<Child> {
    let port = launch.port.map(|p| p.to_string());
    let mut words: Vec<std::ffi::OsString> = prefix.to_vec();
    match launch.run {
        // `sh -c CMD NAME ARG`: the port is also `$1`, as the AppRunner contract says.
        Some(run) => words.extend(
            ["/bin/sh", "-c", run, launch.app]
                .into_iter()
                .chain(port.as_deref())
                .map(Into::into),
        ),
        None => {
            words.push(launch.dir.join(APPRUNNER_FILE).into());
            words.extend(port.iter().map(Into::into));
        }
    }
    let mut command = command(&words, launch);
    if let Some(port) = &port {
        command.env("PORT", port);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a stop reaches everything it started.
        .process_group(0)
        .kill_on_drop(true);
    command.spawn()
}

/// The command `words` with an instance's working directory and environment (no `PORT`):
/// shared by instances and one-off runs (`crate::runs`), which choose their own stdio and
/// process group.
pub(crate) fn command(words: &[std::ffi::OsString], launch: &Launch<'_>) -> Command {
    let (program, args) = match words.split_first() {
        Some((program, args)) => (program.as_os_str(), args),
        None => (std::ffi::OsStr::new("/bin/false"), &[][..]),
    };
    let mut command = Command::new(program);
    command.args(args);
    command
        .current_dir(launch.dir)
        .env_clear()
        .env("PATH", launch.path)
        // Locale, time zone and `HOME` from Maestro's own environment; everything else an
        // instance sees comes from its release, so apps behave the same on every node.
        .envs(px_runtime::host::env().passed());
    command.envs(launch.env);
    command
        .env("PX_APP", launch.app)
        .env("PX_RELEASE", launch.release.to_string())
        .envs(launch.extra_env.iter().map(|(k, v)| (k, v)));
    command
}

/// Sends `signal` to the process group led by `pid`. A group that is already gone is fine.
///
/// A sandboxed process's group is led by bubblewrap, which a catchable signal such as SIGTERM
/// would end at once, and with it (`--die-with-parent`) the app, before its grace: so such a
/// signal goes to every member of the group and every descendant of the leader (a command
/// under a terminal has a session of its own inside the sandbox) but bubblewrap's own
/// processes (the leader and the sandbox's init), which end by themselves once the app has.
/// SIGKILL goes to the whole group, which ends the sandbox and everything in it.
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    if signal != Signal::SIGKILL && is_bubblewrap(pid) {
        for member in group_members(pid) {
            if !is_bubblewrap(member) {
                let _ = nix::sys::signal::kill(Pid::from_raw(member as i32), signal);
            }
        }
        return;
    }
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// Whether `pid` runs bubblewrap (its command name, from `/proc`).
fn is_bubblewrap(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end() == "bwrap")
}

/// The processes of the group `pgid` and the descendants of its leader `pgid`, from `/proc`
/// (the sandbox's members among them, seen from Maestro's PID namespace).
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(listing) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, parent, group) of every process.
    let table: Vec<(u32, u32, u32)> = listing
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name (in parentheses) may hold spaces; the fields after it do not:
            // state, parent, process group.
            let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ').skip(1);
            let parent = fields.next()?.parse().ok()?;
            let group = fields.next()?.parse().ok()?;
            Some((pid, parent, group))
        })
        .collect();
    let mut members: Vec<u32> = table
        .iter()
        .filter(|(_, _, group)| *group == pgid)
        .map(|(pid, _, _)| *pid)
        .collect();
    let mut frontier = vec![pgid];
    while let Some(parent) = frontier.pop() {
        for (pid, _, _) in table.iter().filter(|(_, p, _)| *p == parent) {
            if !members.contains(pid) {
                members.push(*pid);
            }
            frontier.push(*pid);
        }
    }
    members
}

/// Stops an instance: SIGTERM to its group, up to `grace` for it to exit, then SIGKILL.
/// Returns how it ended.
pub async fn stop(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    stop_counted(child, grace).await.0
}

/// [`stop`], also saying whether the process outlived its grace and was killed.
pub(crate) async fn stop_counted(
    child: &mut Child,
    grace: Duration,
) -> (Option<std::process::ExitStatus>, bool) {
    let Some(pid) = child.id() else {
        return (child.try_wait().ok().flatten(), false);
    };
    signal_group(pid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            // The leader is gone; make sure nothing else of the group stays.
            signal_group(pid, Signal::SIGKILL);
            (status.ok(), false)
        }
        Err(_) => {
            tracing::warn!(pid, "instance ignored SIGTERM for {grace:?}; killing it");
            signal_group(pid, Signal::SIGKILL);
            (child.wait().await.ok(), true)
        }
    }
}

/// Why an instance did not become healthy.
#[derive(Debug, thiserror::Error)]
pub enum StartFailure {
    #[error("exited before becoming healthy ({0})")]
    Exited(String, FailureKind),
    #[error("never listened on its port {1} within {0:?}")]
    NeverListened(Duration, u16),
    #[error("not healthy after {0:?}: {1}")]
    Unhealthy(Duration, String),
}

impl StartFailure {
    pub(crate) fn kind(&self) -> FailureKind {
        match self {
            Self::Exited(_, kind) => *kind,
            Self::NeverListened(..) => FailureKind::NeverListened,
            Self::Unhealthy(..) => FailureKind::HealthFailing,
        }
    }
}

/// How an exit status is classified.
pub(crate) fn exit_kind(status: &std::process::ExitStatus) -> FailureKind {
    use std::os::unix::process::ExitStatusExt;
    if status.signal().is_some() {
        FailureKind::Signal
    } else {
        FailureKind::ExitCode
    }
}

/// Waits until the instance passes its health check (HTTP GET 2xx on `path`, or a TCP
/// connect), fails if it exits first or the manifest's timeout passes.
pub async fn wait_healthy(
    child: &mut Child,
    port: u16,
    check: &HealthCheck,
    http: &reqwest::Client,
) -> Result<(), StartFailure> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartFailure::Exited(
                describe_exit(&status),
                exit_kind(&status),
            ));
        }
        let last = match probe(port, check, http).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if started.elapsed() >= check.timeout {
            return Err(match last {
                ProbeFailure::NotListening => StartFailure::NeverListened(check.timeout, port),
                ProbeFailure::Answered(why) => StartFailure::Unhealthy(check.timeout, why),
            });
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// Why one health probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeFailure {
    /// Nothing accepted the connection.
    NotListening,
    /// Something listened, and answered wrong (or too slowly): what it said.
    Answered(String),
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotListening => f.write_str("nothing listening on its port"),
            Self::Answered(why) => f.write_str(why),
        }
    }
}

/// One health probe.
pub(crate) async fn probe(
    port: u16,
    check: &HealthCheck,
    http: &reqwest::Client,
) -> Result<(), ProbeFailure> {
    match &check.path {
        Some(path) => {
            let url = format!("http://127.0.0.1:{port}{path}");
            match http.get(&url).timeout(HEALTH_PROBE_TIMEOUT).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(ProbeFailure::Answered(format!(
                    "GET {path} answered {}",
                    r.status()
                ))),
                Err(e) if e.is_connect() => Err(ProbeFailure::NotListening),
                Err(e) => Err(ProbeFailure::Answered(format!("GET {path}: {e}"))),
            }
        }
        None => match tokio::time::timeout(
            HEALTH_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ProbeFailure::NotListening),
        },
    }
}

/// Bubblewrap's exit status for a command the sandbox ran: a command killed by signal N
/// comes back as exit code 128 + N (as a shell reports it), here turned back into that
/// signal, so a crash reads the same inside a sandbox as outside. Bubblewrap killed itself
/// keeps its own status.
pub(crate) fn signal_of_sandboxed(status: std::process::ExitStatus) -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match status.code() {
        // A wait status whose low seven bits are N means "killed by signal N".
        Some(code) if code > SIGNAL_EXIT_BASE && code < SIGNAL_EXIT_BASE + 64 => {
            std::process::ExitStatus::from_raw(code - SIGNAL_EXIT_BASE)
        }
        _ => status,
    }
}

/// What bubblewrap (and shells) add to a signal's number to report it as an exit code.
const SIGNAL_EXIT_BASE: i32 = 128;

pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown exit".into(),
    }
}

/// Process groups Maestro started, kept on disk so that after a crash of Maestro itself the
/// next start can end what the previous one left running.
pub(crate) struct GroupFile {
    path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct GroupRecord {
    pub pid: u32,
    /// Process start time (clock ticks since boot, /proc/<pid>/stat field 22), so a reused
    /// pid is never mistaken for ours.
    pub start_ticks: u64,
}

/// A process's start time, if it exists.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl GroupFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn load(&self) -> Vec<GroupRecord> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save(&self, records: &[GroupRecord]) {
        // Durably: after a crash, the file must still name every group left running.
        let result = serde_json::to_vec(records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| px_runtime::fs::write_atomic(&self.path, &bytes));
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record instance process groups");
        }
    }

    /// Kills every recorded group whose leader is still the process we started; returns how many.
    pub(crate) fn kill_leftovers(&self) -> usize {
        let mut killed = 0;
        for record in self.load() {
            if start_ticks(record.pid) == Some(record.start_ticks) {
                signal_group(record.pid, Signal::SIGKILL);
                killed += 1;
            }
        }
        self.save(&[]);
        killed
    }
}
