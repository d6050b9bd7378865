//! systemd integration shared by the three services: listening sockets passed by socket
//! activation (`LISTEN_FDS`), readiness and status notifications (`NOTIFY_SOCKET`), watchdog
//! pings (`WATCHDOG_USEC`) and reload requests (SIGHUP). Outside systemd every part is a no-op
//! or a fallback, so the same binaries run under `em up`, in tests and as units.
//!
//! A service binary takes its sockets by name ([`Activation`], [`listener`]), then hands
//! [`Systemd::from_env`] to its `run_with`, which calls [`Systemd::ready`] once its listeners
//! and state are good: READY=1, a STATUS= line kept current, watchdog pings while the service's
//! own liveness probe passes, RELOADING=1 … READY=1 around each reload, STOPPING=1 at
//! shutdown. `em up` runs the three services in one process with [`Systemd::none`].
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigError;

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

/// The listener named `name` when there is one: the socket systemd passed under that name,
/// or else `fallback` bound now, or else none (an optional listener, such as HTTPS, that is
/// neither configured nor passed). Call within a tokio runtime.
pub async fn optional_listener(
    activation: &mut Activation,
    name: &str,
    fallback: Option<SocketAddr>,
) -> io::Result<Option<tokio::net::TcpListener>> {
    match fallback {
        Some(fallback) => listener(activation, name, fallback).await.map(Some),
        None => match activation.take(name)? {
            Some(passed) => {
                let listener = tokio::net::TcpListener::from_std(passed)?;
                tracing::info!(socket = name, addr = %listener.local_addr()?, "listening on the socket systemd passed");
                Ok(Some(listener))
            }
            None => Ok(None),
        },
    }
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
    source: ReloadSource,
}

#[derive(Debug)]
enum ReloadSource {
    Hangup(tokio::signal::unix::Signal),
    Trigger(tokio::sync::mpsc::Receiver<()>),
}

/// Asks for reloads without a signal (tests, which share one process); see
/// [`ReloadRequests::manual`].
#[derive(Debug, Clone)]
pub struct ReloadTrigger {
    tx: tokio::sync::mpsc::Sender<()>,
}

impl ReloadTrigger {
    /// Asks for one reload; requests made while one waits count once, as SIGHUPs do.
    pub fn request(&self) {
        let _ = self.tx.try_send(());
    }
}

impl ReloadRequests {
    /// Starts catching SIGHUP, which from then on no longer ends the process. Call within a
    /// tokio runtime, once per process.
    pub fn listen() -> io::Result<Self> {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(Self {
            source: ReloadSource::Hangup(hangups),
        })
    }

    /// Requests that come from the returned trigger rather than from a signal.
    pub fn manual() -> (ReloadTrigger, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let requests = Self {
            source: ReloadSource::Trigger(rx),
        };
        (ReloadTrigger { tx }, requests)
    }

    /// Waits for the next request; requests that arrive before it is handled count once.
    /// `None` if no more can come (signals cannot be received, or every trigger is gone).
    pub async fn recv(&mut self) -> Option<()> {
        match &mut self.source {
            ReloadSource::Hangup(hangups) => hangups.recv().await,
            ReloadSource::Trigger(rx) => rx.recv().await,
        }
    }
}

/// How often a running service's STATUS= line is recomputed. It is sent only when it changed,
/// so systemd gets at most one status message per interval (and one after each reload), and a
/// person reading `systemctl status` sees a change within five seconds.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// What a service's `run` gets from the service manager: where to send notifications, how
/// often to ping the watchdog, and reload requests with the way to read the configuration
/// again. [`Systemd::none`] (`em up`, tests) sends nothing and never reloads.
pub struct Systemd<C> {
    pub notifier: Notifier,
    /// Ping interval: half of `WatchdogSec=`; `None` without a watchdog.
    pub watchdog: Option<Duration>,
    pub reload: Option<Reload<C>>,
}

/// Reload requests, and how to read the configuration again when one comes (the same file and
/// environment the service started with).
pub struct Reload<C> {
    pub requests: ReloadRequests,
    pub load: Box<dyn FnMut() -> Result<C, ConfigError> + Send>,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// For the log: what was read again and is in effect now, e.g. `3 tokens`.
    pub applied: String,
    /// Settings that differ from the running ones but take effect only after a restart
    /// (listen addresses, directories), as dotted keys; see
    /// [`crate::config::restart_needed`].
    pub needs_restart: Vec<String>,
}

impl<C: Send + 'static> Systemd<C> {
    /// No service manager: nothing is sent, the watchdog is off, reloads never come.
    pub fn none() -> Self {
        Self {
            notifier: Notifier::disabled(),
            watchdog: None,
            reload: None,
        }
    }

    /// The service manager this process runs under, as its environment says (nothing outside
    /// systemd), with SIGHUP as the reload request and `load` to read the configuration
    /// again. Call within a tokio runtime, once per process (it takes over SIGHUP).
    pub fn from_env(
        load: impl FnMut() -> Result<C, ConfigError> + Send + 'static,
    ) -> io::Result<Self> {
        let notifier = Notifier::from_env();
        let watchdog = watchdog_interval();
        if let Some(target) = &notifier.target {
            tracing::info!(socket = %target.shown, watchdog_ping = ?watchdog, "notifying systemd");
        }
        Ok(Self {
            notifier,
            watchdog,
            reload: Some(Reload {
                requests: ReloadRequests::listen()?,
                load: Box::new(load),
            }),
        })
    }

    /// Call once the service is ready: its listeners are open and its state is loaded. Sends
    /// `READY=1`, then, on `tracker` until `shutdown`:
    /// - keeps `STATUS=` at what `status()` says (checked every [`STATUS_INTERVAL`]), with a
    ///   note after a reload that failed or changed settings that need a restart;
    /// - pings the watchdog while `probe()` keeps passing: it runs every half ping interval
    ///   and must answer within that time, and a ping is sent only if it passed within the
    ///   last interval. It should prove the service's own loops work (a task it spawns runs, a
    ///   lock it takes is free, its server answers), and do any blocking inside the future;
    /// - answers each reload request with `RELOADING=1`, the configuration read again and
    ///   given to `apply`, then `READY=1`; a configuration that does not load, or that `apply`
    ///   refuses, is logged and the service keeps running as it was;
    /// - sends `STOPPING=1` when `shutdown` is cancelled.
    pub fn ready<S, P, PF, A, AF>(
        self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        status: S,
        probe: P,
        apply: A,
    ) where
        S: FnMut() -> String + Send + 'static,
        P: FnMut() -> PF + Send + 'static,
        PF: Future<Output = Result<(), String>> + Send + 'static,
        A: FnMut(C) -> AF + Send + 'static,
        AF: Future<Output = Result<Reloaded, String>> + Send + 'static,
    {
        let notifier = self.notifier;
        notifier.ready();
        let note: Arc<Mutex<Option<String>>> = Arc::default();
        let poke = Arc::new(tokio::sync::Notify::new());
        if notifier.is_enabled() {
            tracker.spawn(keep_status(
                notifier.clone(),
                status,
                note.clone(),
                poke.clone(),
                shutdown.clone(),
            ));
            let stopping = notifier.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                stop.cancelled().await;
                stopping.stopping();
                stopping.status("stopping");
            });
            if let Some(interval) = self.watchdog {
                let last_pass = Arc::new(AtomicU64::new(monotonic_usec()));
                tracker.spawn(run_probes(
                    probe,
                    interval / 2,
                    last_pass.clone(),
                    shutdown.clone(),
                ));
                let fresh = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
                let pinging = spawn_watchdog(
                    notifier.clone(),
                    interval,
                    move || {
                        monotonic_usec().saturating_sub(last_pass.load(Ordering::SeqCst)) <= fresh
                    },
                    shutdown.clone(),
                );
                tracker.spawn(async move {
                    let _ = pinging.await;
                });
            }
        }
        if let Some(reload) = self.reload {
            tracker.spawn(answer_reloads(
                notifier,
                reload,
                apply,
                note,
                poke,
                shutdown.clone(),
            ));
        }
    }
}

/// Sends `status()` (and the reload note) whenever it changed, until `shutdown`.
async fn keep_status(
    notifier: Notifier,
    mut status: impl FnMut() -> String,
    note: Arc<Mutex<Option<String>>>,
    poke: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
            () = poke.notified() => {}
        }
        let mut line = status();
        if let Some(note) = note.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            line = format!("{line}; {note}");
        }
        if line != sent {
            notifier.status(&line);
            sent = line;
        }
    }
}

/// Runs `probe` every `every` (each given as long to answer) and records when it last passed.
async fn run_probes<P, PF>(
    mut probe: P,
    every: Duration,
    last_pass: Arc<AtomicU64>,
    shutdown: CancellationToken,
) where
    P: FnMut() -> PF,
    PF: Future<Output = Result<(), String>>,
{
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let outcome = tokio::time::timeout(every, probe())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {every:?}")));
        match outcome {
            Ok(()) => {
                last_pass.store(monotonic_usec(), Ordering::SeqCst);
                if failing {
                    tracing::info!("liveness probe passes again");
                }
                failing = false;
            }
            Err(reason) => {
                if !failing {
                    tracing::warn!(%reason, "liveness probe failed");
                }
                failing = true;
            }
        }
    }
}

/// Answers reload requests until `shutdown` (or until none can come).
async fn answer_reloads<C, A, AF>(
    notifier: Notifier,
    mut reload: Reload<C>,
    mut apply: A,
    note: Arc<Mutex<Option<String>>>,
    poke: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) where
    A: FnMut(C) -> AF,
    AF: Future<Output = Result<Reloaded, String>>,
{
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            request = reload.requests.recv() => if request.is_none() { return },
        }
        tracing::info!("reload requested: reading the configuration again");
        let outcome = notifier
            .reload(async {
                match (reload.load)() {
                    Ok(config) => apply(config).await,
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
        let new_note = match outcome {
            Ok(reloaded) => {
                tracing::info!(applied = %reloaded.applied, "configuration reloaded");
                for key in &reloaded.needs_restart {
                    tracing::warn!(
                        setting = %key,
                        "changed in the configuration, but it takes effect only after a restart; still running with the previous value"
                    );
                }
                (!reloaded.needs_restart.is_empty()).then(|| {
                    format!(
                        "restart needed to apply {}",
                        reloaded.needs_restart.join(", ")
                    )
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; still running the previous configuration");
                Some(format!("reload failed, previous configuration kept: {e}"))
            }
        };
        *note.lock().unwrap_or_else(PoisonError::into_inner) = new_note;
        poke.notify_one();
    }
}

/// Whether an HTTP server answers on `addr` (an unspecified address stands for this host): a
/// `GET path` whose response starts with a status line. Any status counts: a liveness probe
/// asks whether the accept loop and the router run, not whether the service is healthy.
pub async fn http_answers(addr: SocketAddr, path: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("asking {addr}: {e}"))?;
    // "HTTP/1.1 200": the version and the status code.
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("reading the answer of {addr}: {e}"))?;
    if head.starts_with(b"HTTP/1.") {
        Ok(())
    } else {
        Err(format!(
            "{addr} answered {:?}, not HTTP",
            String::from_utf8_lossy(&head)
        ))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_service_reports_reloads_pings_and_stops_in_order() {
        // Short enough to see pings quickly; no assertion depends on its timing.
        const PING_INTERVAL: Duration = Duration::from_millis(40);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = tokio::net::UnixDatagram::bind(&path).unwrap();
        // Watchdog pings are counted as they come; every other notification is queued.
        let pings = Arc::new(AtomicU64::new(0));
        let (queue, mut others) = tokio::sync::mpsc::unbounded_channel();
        let counted = pings.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0; 512];
            while let Ok(n) = systemd.recv(&mut buf).await {
                let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                if message == "WATCHDOG=1" {
                    counted.fetch_add(1, Ordering::SeqCst);
                } else if queue.send(message).is_err() {
                    return;
                }
            }
        });
        let mut next = async || {
            tokio::time::timeout(ARRIVAL_TIMEOUT, others.recv())
                .await
                .expect("a notification")
                .unwrap()
        };
        let wait_for_pings = async |more: u64| {
            let from = pings.load(Ordering::SeqCst);
            let since = Instant::now();
            while pings.load(Ordering::SeqCst) < from + more {
                assert!(since.elapsed() < ARRIVAL_TIMEOUT, "no watchdog pings");
                tokio::time::sleep(PING_INTERVAL / 4).await;
            }
        };

        // Configurations are numbers here; 0 does not load and 13 is refused by `apply`.
        let (trigger, requests) = ReloadRequests::manual();
        let next_config = Arc::new(AtomicU64::new(0));
        let load_config = next_config.clone();
        let manager = Systemd {
            notifier: notifier_for(&path),
            watchdog: Some(PING_INTERVAL),
            reload: Some(Reload {
                requests,
                load: Box::new(move || match load_config.load(Ordering::SeqCst) {
                    0 => Err(ConfigError::one("`listen`: invalid socket address")),
                    n => Ok(n),
                }),
            }),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let probe_alive = alive.clone();
        let applied = Arc::new(AtomicU64::new(1));
        let apply_to = applied.clone();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        manager.ready(
            &tracker,
            &shutdown,
            || "serving 2 apps".to_owned(),
            move || {
                std::future::ready(if probe_alive.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("stuck".to_owned())
                })
            },
            move |config: u64| {
                let apply_to = apply_to.clone();
                async move {
                    if config == 13 {
                        return Err("certs_dir: no such directory".to_owned());
                    }
                    apply_to.store(config, Ordering::SeqCst);
                    Ok(Reloaded {
                        applied: format!("config {config}"),
                        needs_restart: if config == 3 {
                            vec!["listen".into()]
                        } else {
                            Vec::new()
                        },
                    })
                }
            },
        );

        assert_eq!(next().await, "READY=1");
        assert_eq!(next().await, "STATUS=serving 2 apps");
        wait_for_pings(2).await;

        // A configuration that does not load: the previous one stays, and the status says so.
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\nMONOTONIC_USEC="));
        let failed = "reload failed, previous configuration kept";
        assert!(next().await.contains("`listen`: invalid socket address"));
        assert_eq!(next().await, "READY=1");
        let status = next().await;
        assert!(
            status.starts_with(&format!(
                "STATUS=serving 2 apps; {failed}: invalid configuration:"
            )),
            "{status}"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 1);

        // One `apply` refuses.
        next_config.store(13, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert!(next().await.ends_with("certs_dir: no such directory"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(
            next().await,
            format!("STATUS=serving 2 apps; {failed}: certs_dir: no such directory")
        );

        // A good one, with a setting that needs a restart, then a good one without.
        next_config.store(3, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(
            next().await,
            "STATUS=serving 2 apps; restart needed to apply listen"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 3);
        next_config.store(4, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(next().await, "STATUS=serving 2 apps");

        // A failing probe stops the pings; they come back once it passes.
        alive.store(false, Ordering::SeqCst);
        tokio::time::sleep(PING_INTERVAL * 3).await;
        let before = pings.load(Ordering::SeqCst);
        tokio::time::sleep(PING_INTERVAL * 5).await;
        assert!(
            pings.load(Ordering::SeqCst) <= before + 1,
            "pinged while the probe failed"
        );
        alive.store(true, Ordering::SeqCst);
        let resumed = pings.load(Ordering::SeqCst);
        let probe_back = Instant::now();
        while pings.load(Ordering::SeqCst) == resumed {
            assert!(
                probe_back.elapsed() < ARRIVAL_TIMEOUT,
                "pings never resumed"
            );
            tokio::time::sleep(PING_INTERVAL).await;
        }

        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(ARRIVAL_TIMEOUT, tracker.wait())
            .await
            .expect("every task ends on shutdown");
        assert_eq!(next().await, "STOPPING=1");
        assert_eq!(next().await, "STATUS=stopping");
        assert!(others.try_recv().is_err(), "nothing after stopping");
        reader.abort();
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
