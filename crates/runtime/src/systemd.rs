//! systemd integration shared by the three services: listening sockets passed by socket
//! activation (`LISTEN_FDS`), readiness and status notifications (`NOTIFY_SOCKET`), watchdog
//! pings (`WATCHDOG_USEC`) and reload requests (SIGHUP). Outside systemd every part is a no-op
//! or a fallback, so the same binaries run under `em up`, in tests and as units.
//!
//! The environment variables are read but not unset: `std::env::remove_var` is `unsafe` in
//! edition 2024 and the workspace forbids `unsafe_code`. That is harmless here because the
//! sockets themselves never reach a child (each is re-opened close-on-exec and its inherited
//! number closed), `LISTEN_PID` names this process so a child's `sd_listen_fds` ignores the
//! rest, and Maestro starts apps with a cleared environment. Code that starts a child without
//! clearing its environment removes [`SYSTEMD_ENV_VARS`] from it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// The variables systemd sets for this service alone. A child started without a cleared
/// environment should not see them (`Command::env_remove`); see the module comment.
pub const SYSTEMD_ENV_VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`); 0 to 2 are stdio.
pub const LISTEN_FDS_START: RawFd = 3;

/// Most sockets one service takes from systemd. Maestro, which takes the most, has three
/// (`http`, `https`, `status`); a count far above that means LISTEN_FDS is not what we think.
pub const MAX_LISTEN_FDS: usize = 16;

/// The name `sd_listen_fds_with_names` gives every socket when LISTEN_FDNAMES is unset.
const UNNAMED_SOCKET: &str = "unknown";

/// Longest STATUS= text sent, in bytes. systemd drops a notification longer than its 4 KiB
/// buffer whole, and `systemctl status` shows one line; a longer status is cut here instead.
pub const MAX_STATUS_BYTES: usize = 512;

/// Longest a notification may block when systemd's queue is full. Notifications are sent from
/// runtime threads, so they must not block for long; a stuck systemd loses one message.
pub const NOTIFY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The watchdog is pinged this many times per `WatchdogSec=`, as sd_watchdog_enabled(3)
/// advises (every half timeout), so one late ping does not get the service killed.
pub const PINGS_PER_WATCHDOG_TIMEOUT: u32 = 2;

/// Whether this process has taken the sockets of its LISTEN_FDS. Their inherited numbers are
/// closed once taken and may then be reused by any file, so they must never be taken twice.
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the sockets systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "LISTEN_PID={0:?} is not a process id; systemd sets it, so check the unit's Environment="
    )]
    BadPid(String),
    #[error(
        "LISTEN_FDS={0:?} is not a number of sockets; systemd sets it, so check the unit's Environment="
    )]
    BadCount(String),
    #[error(
        "LISTEN_FDS={0} is more than the {MAX_LISTEN_FDS} sockets a Platform.X service takes; check the .socket units"
    )]
    TooMany(usize),
    #[error(
        "LISTEN_FDNAMES has {names} names for the {fds} sockets of LISTEN_FDS; give each .socket unit a FileDescriptorName="
    )]
    NameCount { names: usize, fds: usize },
    #[error(
        "systemd passed more than one socket named {0:?}; a service takes one socket per name, so give each ListenStream= its own .socket unit and FileDescriptorName="
    )]
    DuplicateName(String),
    #[error(
        "cannot take the socket systemd passed as {name:?} (fd {fd}): {source} (this needs Linux 5.6 and `pidfd_getfd` allowed by the unit's SystemCallFilter=)"
    )]
    Take {
        name: String,
        fd: RawFd,
        source: io::Error,
    },
    #[error(
        "the socket systemd passed as {name:?} is {reason}, not a listening TCP socket; its .socket unit needs ListenStream= with a port or address"
    )]
    NotTcpListener { name: String, reason: &'static str },
    #[error("cannot use the socket systemd passed as {name:?}: {source}")]
    Io { name: String, source: io::Error },
}

impl From<ActivationError> for io::Error {
    fn from(error: ActivationError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, error)
    }
}

/// The socket-activation variables as found in the environment.
#[derive(Debug, Default, Clone)]
struct ListenVars {
    pid: Option<String>,
    fds: Option<String>,
    names: Option<String>,
}

impl ListenVars {
    fn from_env() -> Self {
        Self {
            pid: env_string("LISTEN_PID"),
            fds: env_string("LISTEN_FDS"),
            names: env_string("LISTEN_FDNAMES"),
        }
    }
}

fn env_string(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// One descriptor systemd passed: its `FileDescriptorName=` and number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PassedFd {
    name: String,
    fd: RawFd,
}

/// Which descriptors systemd passed to `our_pid`, from the variables alone, as
/// sd_listen_fds(3) reads them: none unless LISTEN_PID names this process (otherwise the
/// variables were inherited from an activated parent and the sockets are not ours).
fn parse_listen_vars(vars: &ListenVars, our_pid: u32) -> Result<Vec<PassedFd>, ActivationError> {
    let (Some(pid), Some(count)) = (&vars.pid, &vars.fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.clone()))?;
    if pid != our_pid {
        return Ok(Vec::new());
    }
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(count.clone()))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_LISTEN_FDS {
        return Err(ActivationError::TooMany(count));
    }
    let names: Vec<String> = match &vars.names {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec![UNNAMED_SOCKET.to_owned(); count],
    };
    if names.len() != count {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: count,
        });
    }
    let mut passed: Vec<PassedFd> = Vec::with_capacity(count);
    for (fd, name) in (LISTEN_FDS_START..).zip(names) {
        if passed.iter().any(|p| p.name == name) {
            return Err(ActivationError::DuplicateName(name));
        }
        passed.push(PassedFd { name, fd });
    }
    Ok(passed)
}

/// Takes ownership of a descriptor this process inherited, without `unsafe`: the kernel
/// duplicates it through a pidfd of this very process (`pidfd_getfd`, which always sets
/// close-on-exec, so no app child inherits it), then the inherited number is closed.
fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let this_process = pidfd_open(getpid(), PidfdFlags::empty())?;
    let owned = pidfd_getfd(&this_process, fd, PidfdGetfdFlags::empty())?;
    nix::unistd::close(fd)?;
    Ok(owned)
}

/// Why `fd` is not a listening IPv4/IPv6 TCP socket, if it is not.
fn check_tcp_listener(fd: &OwnedFd) -> Result<(), &'static str> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let family = sockopt::socket_domain(fd).map_err(|_| "not a socket")?;
    if family != AddressFamily::INET && family != AddressFamily::INET6 {
        return Err("not an IPv4 or IPv6 socket");
    }
    if sockopt::socket_type(fd).map_err(|_| "not a socket")? != SocketType::STREAM {
        return Err("not a stream socket");
    }
    if !sockopt::socket_acceptconn(fd).map_err(|_| "not a socket")? {
        return Err("a TCP socket that is not listening");
    }
    Ok(())
}

/// The sockets systemd passed to this process, by `FileDescriptorName=`, each taken at most
/// once. Sockets nobody takes are closed (with a warning) when this is dropped.
#[derive(Debug, Default)]
pub struct Activation {
    sockets: BTreeMap<String, OwnedFd>,
}

impl Activation {
    /// The sockets systemd passed, if any. Call early in `main`; a second call returns none,
    /// since the inherited numbers are closed by the first.
    pub fn from_env() -> Result<Self, ActivationError> {
        if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
            tracing::warn!("systemd's sockets were already taken once; taking none this time");
            return Ok(Self::none());
        }
        let activation = Self::adopt(parse_listen_vars(
            &ListenVars::from_env(),
            std::process::id(),
        )?)?;
        if !activation.sockets.is_empty() {
            let names: Vec<&str> = activation.sockets.keys().map(String::as_str).collect();
            tracing::info!(sockets = %names.join(", "), "systemd passed listening sockets");
        }
        Ok(activation)
    }

    /// No sockets: every listener is bound from its fallback address.
    pub fn none() -> Self {
        Self::default()
    }

    /// Owns the given inherited descriptors. Private because it closes their numbers: only
    /// numbers systemd handed to this process may be given (and tests' own duplicates).
    fn adopt(passed: Vec<PassedFd>) -> Result<Self, ActivationError> {
        let mut sockets = BTreeMap::new();
        for PassedFd { name, fd } in passed {
            match take_inherited_fd(fd) {
                Ok(owned) => sockets.insert(name, owned),
                Err(source) => return Err(ActivationError::Take { name, fd, source }),
            };
        }
        Ok(Self { sockets })
    }

    /// Takes the listening TCP socket systemd passed as `name`, set non-blocking so tokio can
    /// adopt it; `None` when systemd passed no socket of that name (or it was taken already).
    pub fn take(&mut self, name: &str) -> Result<Option<std::net::TcpListener>, ActivationError> {
        let Some(fd) = self.sockets.remove(name) else {
            return Ok(None);
        };
        check_tcp_listener(&fd).map_err(|reason| ActivationError::NotTcpListener {
            name: name.to_owned(),
            reason,
        })?;
        let listener = std::net::TcpListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|source| ActivationError::Io {
                name: name.to_owned(),
                source,
            })?;
        Ok(Some(listener))
    }
}

impl Drop for Activation {
    fn drop(&mut self) {
        for name in self.sockets.keys() {
            tracing::warn!(
                socket = %name,
                "closing a socket systemd passed that this service does not use; check the FileDescriptorName= of its .socket unit"
            );
        }
    }
}

/// The listener named `name`: the socket systemd passed under that name, or else `fallback`
/// bound now. Call within a tokio runtime.
pub async fn listener(
    activation: &mut Activation,
    name: &str,
    fallback: SocketAddr,
) -> io::Result<tokio::net::TcpListener> {
    if let Some(passed) = activation.take(name)? {
        let listener = tokio::net::TcpListener::from_std(passed)?;
        tracing::info!(socket = name, addr = %listener.local_addr()?, "listening on the socket systemd passed");
        return Ok(listener);
    }
    let listener = tokio::net::TcpListener::bind(fallback).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {fallback} for {name}: {e}"),
        )
    })?;
    tracing::info!(socket = name, addr = %listener.local_addr()?, "listening");
    Ok(listener)
}

/// Sends sd_notify(3) messages to systemd; every method is a no-op when `NOTIFY_SOCKET` was
/// unset. Failures are logged, never returned: a lost notification must not stop a service.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<NotifyTarget>>,
}

#[derive(Debug)]
struct NotifyTarget {
    socket: UnixDatagram,
    addr: UnixSocketAddr,
    /// The address as given, for log lines.
    shown: String,
}

impl Notifier {
    /// Notifies the socket named by `NOTIFY_SOCKET`, or nothing when it is unset (or unusable,
    /// which is logged).
    pub fn from_env() -> Self {
        let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::disabled();
        };
        Self::new(&address).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "not notifying systemd");
            Self::disabled()
        })
    }

    /// Notifies the datagram socket at `address`: an absolute path, or `@name` for an
    /// abstract socket, as in `NOTIFY_SOCKET`.
    pub fn new(address: &OsStr) -> io::Result<Self> {
        let addr = match address.as_bytes() {
            [b'@', name @ ..] => UnixSocketAddr::from_abstract_name(name)?,
            [b'/', ..] => UnixSocketAddr::from_pathname(address)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={address:?} is neither an absolute path nor @name"),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(NOTIFY_SEND_TIMEOUT))?;
        let shown = address.to_string_lossy().into_owned();
        Ok(Self {
            target: Some(Arc::new(NotifyTarget {
                socket,
                addr,
                shown,
            })),
        })
    }

    /// Sends nothing, ever.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: start-up (or a reload) is complete. Send only once listeners and state are good.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// `STATUS=`: one line a person reads in `systemctl status`. Line breaks become spaces
    /// (a new line would start another assignment) and the text is cut at [`MAX_STATUS_BYTES`].
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", status_line(text)));
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`, which systemd 253 and later need to match the
    /// reload to the request (older ones ignore it). Follow with `READY=1` once reloaded.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`: shutdown has begun, so systemd shows the service as deactivating.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `WATCHDOG=1`: the service is alive; see [`spawn_watchdog`].
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Runs one reload the way systemd expects: `RELOADING=1`, then `reload`, then `READY=1`
    /// whether it succeeded or not (the unit would otherwise stay "reloading"); a failure also
    /// sets a STATUS line saying the previous configuration still runs.
    pub async fn reload<T, E: Display>(
        &self,
        reload: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.reloading();
        let outcome = reload.await;
        if let Err(e) = &outcome {
            self.status(&format!(
                "reload failed, still running the previous configuration: {e}"
            ));
        }
        self.ready();
        outcome
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            let first_line = message.lines().next().unwrap_or_default();
            tracing::warn!(socket = %target.shown, message = first_line, error = %e, "cannot notify systemd");
        }
    }
}

/// `text` as one STATUS= line of at most [`MAX_STATUS_BYTES`], cut at a character boundary.
fn status_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut end = line.len().min(MAX_STATUS_BYTES);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with (std's
/// `Instant` does not expose its value).
fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let seconds = u64::try_from(now.tv_sec).unwrap_or_default();
    let nanos = u64::try_from(now.tv_nsec).unwrap_or_default();
    seconds * 1_000_000 + nanos / 1_000
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC` ([`PINGS_PER_WATCHDOG_TIMEOUT`]),
/// or `None` when the unit has no `WatchdogSec=` (or `WATCHDOG_PID` names another process).
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        env_string("WATCHDOG_USEC").as_deref(),
        env_string("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(our_pid)
    {
        return None;
    }
    let usec = usec?;
    match usec.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(usec) => Some(Duration::from_micros(usec) / PINGS_PER_WATCHDOG_TIMEOUT),
        Err(_) => {
            tracing::warn!(
                WATCHDOG_USEC = usec,
                "not a number of microseconds; not pinging the watchdog"
            );
            None
        }
    }
}

/// Spawns, on the current tokio runtime, a task that pings the watchdog every `interval`
/// while `is_alive()` holds, until `shutdown` is cancelled. A service whose main loop is
/// wedged fails its own `is_alive` check, and a wedged runtime cannot run the task: either
/// way the pings stop and systemd restarts the service after `WatchdogSec=`.
pub fn spawn_watchdog(
    notifier: Notifier,
    interval: Duration,
    is_alive: impl Fn() -> bool + Send + 'static,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut was_alive = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let alive = is_alive();
            if alive {
                notifier.watchdog();
            }
            match (was_alive, alive) {
                (true, false) => tracing::warn!(
                    "liveness check failed: no longer pinging the systemd watchdog, which restarts the service unless it recovers"
                ),
                (false, true) => {
                    tracing::info!("liveness check passes again: pinging the systemd watchdog")
                }
                _ => {}
            }
            was_alive = alive;
        }
    })
}

/// Reload requests: SIGHUP, which the units' `ExecReload=` sends. A service answers each with
/// [`Notifier::reload`].
#[derive(Debug)]
pub struct ReloadRequests {
    hangups: tokio::signal::unix::Signal,
}

impl ReloadRequests {
    /// Starts catching SIGHUP, which from then on no longer ends the process. Call within a
    /// tokio runtime, once per process.
    pub fn listen() -> io::Result<Self> {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(Self { hangups })
    }

    /// Waits for the next request; SIGHUPs that arrive before it is handled count once.
    /// `None` if signals can no longer be received.
    pub async fn recv(&mut self) -> Option<()> {
        self.hangups.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, IntoRawFd};
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    /// How long a test waits for something that should happen at once; generous, since it
    /// only bounds how long a failing test hangs.
    const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

    fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenVars {
        ListenVars {
            pid: pid.map(str::to_owned),
            fds: fds.map(str::to_owned),
            names: names.map(str::to_owned),
        }
    }

    fn passed(list: &[(&str, RawFd)]) -> Vec<PassedFd> {
        list.iter()
            .map(|&(name, fd)| PassedFd {
                name: name.to_owned(),
                fd,
            })
            .collect()
    }

    #[test]
    fn listen_vars_name_sockets_from_fd_3_only_for_our_pid() {
        let cases = [
            (vars(None, None, None), vec![]),
            (vars(None, Some("1"), Some("http")), vec![]),
            (vars(Some("41"), Some("1"), Some("http")), vec![]),
            (vars(Some("42"), Some("0"), None), vec![]),
            (vars(Some("42"), Some("1"), None), passed(&[("unknown", 3)])),
            (
                vars(Some("42"), Some("2"), Some("http:https")),
                passed(&[("http", 3), ("https", 4)]),
            ),
            (
                vars(Some(" 42\n"), Some("3"), Some("api:control:status")),
                passed(&[("api", 3), ("control", 4), ("status", 5)]),
            ),
        ];
        for (vars, expected) in cases {
            let got = parse_listen_vars(&vars, 42).unwrap();
            assert_eq!(got, expected, "for {vars:?}");
        }
    }

    #[test]
    fn bad_listen_vars_are_explained() {
        let cases = [
            (vars(Some("x"), Some("1"), None), "LISTEN_PID=\"x\""),
            (vars(Some("42"), Some("-1"), None), "LISTEN_FDS=\"-1\""),
            (vars(Some("42"), Some("two"), None), "LISTEN_FDS=\"two\""),
            (
                vars(Some("42"), Some("17"), None),
                "more than the 16 sockets",
            ),
            (
                vars(Some("42"), Some("2"), Some("http")),
                "1 names for the 2 sockets",
            ),
            (
                vars(Some("42"), Some("1"), Some("http:https")),
                "2 names for the 1 sockets",
            ),
            (
                vars(Some("42"), Some("2"), Some("http:http")),
                "more than one socket named \"http\"",
            ),
            (
                vars(Some("42"), Some("2"), None),
                "more than one socket named \"unknown\"",
            ),
        ];
        for (vars, expected) in cases {
            let error = parse_listen_vars(&vars, 42).unwrap_err().to_string();
            assert!(error.contains(expected), "for {vars:?}: {error}");
        }
    }

    /// The socket behind descriptor `fd` of this process, as `/proc` names it
    /// (`socket:[inode]`), or `None` if `fd` is closed.
    fn fd_target(fd: RawFd) -> Option<String> {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .ok()
            .map(|target| target.display().to_string())
    }

    /// A duplicate of `fd` under a new number that nothing owns, as systemd would pass it.
    fn inherited_copy(fd: impl AsFd) -> RawFd {
        fd.as_fd().try_clone_to_owned().unwrap().into_raw_fd()
    }

    #[tokio::test]
    async fn passed_listening_socket_is_taken_and_accepts() {
        let original = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = original.local_addr().unwrap();
        let number = inherited_copy(&original);
        let socket = fd_target(number).unwrap();
        drop(original);

        let mut activation = Activation::adopt(passed(&[("http", number)])).unwrap();
        // The inherited number is closed (or, if another test's file reused it, that file
        // is not our socket), so no child can inherit the socket through it.
        assert_ne!(fd_target(number), Some(socket));

        let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let listener = listener(&mut activation, "http", unused).await.unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        let flags = rustix::io::fcntl_getfd(&listener).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));

        let client = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"hi")
                .await
                .unwrap();
        });
        let (mut conn, _) = tokio::time::timeout(ARRIVAL_TIMEOUT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b"hi");
        client.await.unwrap();

        assert!(activation.take("http").unwrap().is_none(), "taken twice");
        assert!(activation.take("https").unwrap().is_none());
    }

    #[test]
    fn passed_fd_that_is_not_a_tcp_listener_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connected = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let cases: [(&str, RawFd, &str); 4] = [
            ("status", inherited_copy(&udp), "not a stream socket"),
            (
                "control",
                inherited_copy(&unix),
                "not an IPv4 or IPv6 socket",
            ),
            (
                "api",
                inherited_copy(&connected),
                "a TCP socket that is not listening",
            ),
            ("https", inherited_copy(&file), "not a socket"),
        ];
        let list: Vec<(&str, RawFd)> = cases.iter().map(|&(n, fd, _)| (n, fd)).collect();
        let mut activation = Activation::adopt(passed(&list)).unwrap();
        for (name, _, reason) in cases {
            let error = activation.take(name).unwrap_err().to_string();
            let expected = format!(
                "the socket systemd passed as {name:?} is {reason}, not a listening TCP socket"
            );
            assert!(error.contains(&expected), "{error}");
        }
    }

    #[test]
    fn closed_passed_fd_is_refused_by_name() {
        let error = Activation::adopt(passed(&[("http", i32::MAX)])).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot take the socket systemd passed as \"http\" (fd 2147483647)"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn listener_binds_the_fallback_when_systemd_passed_none() {
        let mut activation = Activation::none();
        let fallback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = listener(&mut activation, "http", fallback).await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), async {
            tokio::time::timeout(ARRIVAL_TIMEOUT, listener.accept()).await
        });
        accepted.unwrap().unwrap();

        let error = super::listener(&mut activation, "status", addr)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("cannot listen on {addr} for status")),
            "{error}"
        );
    }

    /// A datagram socket standing in for systemd's notification socket.
    struct FakeSystemd {
        socket: UnixDatagram,
        _dir: tempfile::TempDir,
    }

    impl FakeSystemd {
        fn bind() -> (Self, std::path::PathBuf) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_read_timeout(Some(ARRIVAL_TIMEOUT)).unwrap();
            (Self { socket, _dir: dir }, path)
        }

        fn next(&self) -> String {
            let mut buf = [0; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }
    }

    fn notifier_for(path: &Path) -> Notifier {
        Notifier::new(path.as_os_str()).unwrap()
    }

    #[test]
    fn notifier_sends_each_state_in_order() {
        let (systemd, path) = FakeSystemd::bind();
        let notifier = notifier_for(&path);
        assert!(notifier.is_enabled());

        let before_reload = monotonic_usec();
        notifier.ready();
        notifier.status("serving 3 apps");
        notifier.watchdog();
        notifier.reloading();
        let after_reload = monotonic_usec();
        notifier.ready();
        notifier.stopping();

        assert_eq!(systemd.next(), "READY=1");
        assert_eq!(systemd.next(), "STATUS=serving 3 apps");
        assert_eq!(systemd.next(), "WATCHDOG=1");
        let reloading = systemd.next();
        let usec = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{reloading:?}"));
        let usec: u64 = usec.parse().unwrap();
        assert!((before_reload..=after_reload).contains(&usec), "{usec}");
        assert_eq!(systemd.next(), "READY=1");
        assert_eq!(systemd.next(), "STOPPING=1");
    }

    #[test]
    fn status_is_one_bounded_line() {
        let (systemd, path) = FakeSystemd::bind();
        let notifier = notifier_for(&path);
        notifier.status("reload failed\nREADY=1\r");
        assert_eq!(systemd.next(), "STATUS=reload failed READY=1 ");

        let long = "é".repeat(MAX_STATUS_BYTES); // two bytes each
        notifier.status(&long);
        let got = systemd.next();
        let text = got.strip_prefix("STATUS=").unwrap();
        assert_eq!(text.len(), MAX_STATUS_BYTES);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn reload_brackets_the_work_and_reports_failure() {
        let (systemd, path) = FakeSystemd::bind();
        let notifier = notifier_for(&path);

        let ok: Result<u32, String> = notifier.reload(async { Ok(7) }).await;
        assert_eq!(ok, Ok(7));
        assert!(systemd.next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
        assert_eq!(systemd.next(), "READY=1");

        let failed: Result<(), String> = notifier
            .reload(async { Err("unknown key `listne`".to_owned()) })
            .await;
        assert!(failed.is_err());
        assert!(systemd.next().starts_with("RELOADING=1\n"));
        assert_eq!(
            systemd.next(),
            "STATUS=reload failed, still running the previous configuration: unknown key `listne`"
        );
        assert_eq!(systemd.next(), "READY=1");
    }

    #[test]
    fn notifier_reaches_abstract_sockets() {
        let name = format!("px-runtime-test-notify-{}", std::process::id());
        let addr = UnixSocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_read_timeout(Some(ARRIVAL_TIMEOUT)).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.ready();
        let mut buf = [0; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn notifier_outlives_a_vanished_socket() {
        let (systemd, path) = FakeSystemd::bind();
        let notifier = notifier_for(&path);
        drop(systemd.socket);
        std::fs::remove_file(&path).unwrap();
        notifier.ready(); // logged, not fatal

        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(ARRIVAL_TIMEOUT)).unwrap();
        notifier.status("back");
        let mut buf = [0; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=back");
    }

    #[test]
    fn notifier_refuses_relative_addresses() {
        let error = Notifier::new(OsStr::new("run/notify")).unwrap_err();
        assert!(error.to_string().contains("absolute path"), "{error}");
        assert!(!Notifier::disabled().is_enabled());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid() {
        let cases = [
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("42"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("41"), None),
            (Some("30000000"), Some("pid"), None),
            (Some("1"), None, Some(Duration::from_nanos(500))),
            (Some("0"), None, None),
            (Some("soon"), None, None),
            (None, Some("42"), None),
            (None, None, None),
        ];
        for (usec, pid, expected) in cases {
            assert_eq!(parse_watchdog(usec, pid, 42), expected, "{usec:?} {pid:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchdog_pings_only_while_alive() {
        // Short enough to see several pings quickly; no assertion depends on its timing.
        const PING_INTERVAL: Duration = Duration::from_millis(10);
        // A window of many intervals in which a running watchdog would surely ping.
        const QUIET_WINDOW: Duration = Duration::from_millis(300);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = tokio::net::UnixDatagram::bind(&path).unwrap();
        let next = || async {
            let mut buf = [0; 64];
            let n = systemd.recv(&mut buf).await.unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        };
        let alive = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let check = alive.clone();
        let task = spawn_watchdog(
            notifier_for(&path),
            PING_INTERVAL,
            move || check.load(Ordering::SeqCst),
            shutdown.clone(),
        );

        for _ in 0..3 {
            let ping = tokio::time::timeout(ARRIVAL_TIMEOUT, next()).await.unwrap();
            assert_eq!(ping, "WATCHDOG=1");
        }

        alive.store(false, Ordering::SeqCst);
        // A tick that checked just before the store may still deliver one ping; after that,
        // none may come.
        let mut late_pings = 0;
        while tokio::time::timeout(QUIET_WINDOW, next()).await.is_ok() {
            late_pings += 1;
            assert!(
                late_pings <= 1,
                "pinged {late_pings} times after failing its check"
            );
        }

        alive.store(true, Ordering::SeqCst);
        let ping = tokio::time::timeout(ARRIVAL_TIMEOUT, next()).await.unwrap();
        assert_eq!(ping, "WATCHDOG=1", "pings resume once alive again");

        shutdown.cancel();
        tokio::time::timeout(ARRIVAL_TIMEOUT, task)
            .await
            .expect("the watchdog stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn sighup_is_a_reload_request() {
        let mut requests = ReloadRequests::listen().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
        let request = tokio::time::timeout(ARRIVAL_TIMEOUT, requests.recv()).await;
        assert_eq!(request, Ok(Some(())));
    }

    /// Set in the child of the test below, which then plays the activated service.
    const ACTIVATED_CHILD_ENV: &str = "PX_RUNTIME_TEST_ACTIVATED_CHILD";

    /// The real `systemd-socket-activate` listens, passes the socket named `http` to this test
    /// binary re-run as its child, and a client's connection is answered through it.
    #[test]
    fn systemd_socket_activate_passes_a_named_socket() {
        if std::env::var_os(ACTIVATED_CHILD_ENV).is_some() {
            return serve_one_connection_as_activated_child();
        }
        const TOOL: &str = "/usr/bin/systemd-socket-activate";
        assert!(
            Path::new(TOOL).exists(),
            "{TOOL} is missing: apt-get install systemd"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let test_name = format!(
            "{}::systemd_socket_activate_passes_a_named_socket",
            module_path!().trim_start_matches("px_runtime::")
        );
        let child = std::process::Command::new(TOOL)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=http")
            .arg(format!("--setenv={ACTIVATED_CHILD_ENV}=1"))
            .arg(std::env::current_exe().unwrap())
            .args([
                test_name.as_str(),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();

        // The tool starts its child on the first connection, so connecting is what starts it.
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        let mut stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("systemd-socket-activate never listened on {port}: {e}"),
            }
        };
        stream.set_read_timeout(Some(ARRIVAL_TIMEOUT)).unwrap();
        let mut answer = String::new();
        let read = stream.read_to_string(&mut answer);
        let output = child.wait_with_output().unwrap();
        let logs = format!(
            "child stdout:\n{}\nchild stderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        read.unwrap_or_else(|e| panic!("reading the answer: {e}\n{logs}"));
        assert_eq!(answer, format!("http 127.0.0.1:{port}\n"), "{logs}");
        assert!(output.status.success(), "{logs}");
    }

    fn serve_one_connection_as_activated_child() {
        let mut activation = Activation::from_env().unwrap();
        let listener = activation
            .take("http")
            .unwrap()
            .expect("systemd-socket-activate passed a socket named http");
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        writeln!(conn, "http {}", listener.local_addr().unwrap()).unwrap();
    }
}
