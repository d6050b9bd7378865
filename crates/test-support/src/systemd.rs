//! systemd as the services' tests play it: `systemd-socket-activate` passes the listening
//! sockets by name (`FileDescriptorName=`), and a datagram socket the test owns stands for
//! systemd's notification socket (`NOTIFY_SOCKET`), collecting what the service says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Where Debian's `systemd` package installs the tool.
pub const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
/// How long a test waits for something that should happen at once; it only bounds how long a
/// failing test hangs.
pub const WAIT: Duration = Duration::from_secs(20);
/// `WatchdogSec=` as the tests set it: one second, so a service pings every half second.
pub const WATCHDOG_USEC: u64 = 1_000_000;
/// The watchdog timeout [`WATCHDOG_USEC`] sets.
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_micros(WATCHDOG_USEC);
/// Largest notification read; a status line is bounded well below this.
const MAX_NOTIFICATION_BYTES: usize = 4096;

/// Fails the test, saying how to get the tool, when `systemd-socket-activate` is missing.
pub fn require_socket_activate() {
    assert!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "{SOCKET_ACTIVATE} is missing: run scripts/install-test-tools (apt-get install systemd)"
    );
}

/// The notification socket systemd would own, and what arrived on it.
pub struct Notifications {
    socket: UnixDatagram,
    /// The socket's path, for `NOTIFY_SOCKET`.
    pub path: PathBuf,
    /// Watchdog pings passed over by [`Notifications::next`] or counted by
    /// [`Notifications::pings`].
    pub pings: u64,
    _dir: tempfile::TempDir,
}

impl Notifications {
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temporary directory: {e}"));
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        Self {
            socket,
            path,
            pings: 0,
            _dir: dir,
        }
    }

    /// The next notification within `limit`, if one comes.
    pub fn recv(&self, limit: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(limit.max(Duration::from_millis(1))))
            .unwrap_or_else(|e| panic!("setting a read timeout: {e}"));
        let mut buf = [0; MAX_NOTIFICATION_BYTES];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading notifications: {e}"),
        }
    }

    /// The next notification, watchdog pings included; fails the test, showing the service's
    /// logs, when none comes within [`WAIT`].
    pub fn next_or_ping(&self, service: &Service) -> String {
        self.recv(WAIT)
            .unwrap_or_else(|| panic!("no notification within {WAIT:?}\n{}", service.logs()))
    }

    /// The next notification that is not a watchdog ping (those are counted).
    pub fn next(&mut self, service: &Service) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Some(ping) if ping == "WATCHDOG=1" => self.pings += 1,
                Some(message) => return message,
                None => panic!("no notification within {WAIT:?}\n{}", service.logs()),
            }
        }
    }

    /// Waits for `count` more watchdog pings, with nothing else in between.
    pub fn pings(&mut self, count: u64, service: &Service) {
        for _ in 0..count {
            let message = self.recv(WAIT);
            assert_eq!(message.as_deref(), Some("WATCHDOG=1"), "{}", service.logs());
            self.pings += 1;
        }
    }

    /// Everything that arrives within `window`.
    pub fn during(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(message) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            got.push(message);
        }
        got
    }
}

/// A process group started by the test (a service, or what supervises it, such as
/// `systemd-socket-activate` until it execs the service), killed on drop so a failing test
/// leaves nothing running.
pub struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `command` in a process group of its own, its stderr written to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let stderr = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Self { child, log }
    }

    /// `bin --config config` started by `systemd-socket-activate`, which listens on each port
    /// and passes the sockets under their names once the first connection arrives, with
    /// `notify` as its notification socket and a watchdog of [`WATCHDOG_USEC`].
    pub fn activated(
        bin: &str,
        sockets: &[(u16, &str)],
        notify: &Path,
        config: &Path,
        log: PathBuf,
    ) -> Self {
        let mut command = Command::new(SOCKET_ACTIVATE);
        for (port, _) in sockets {
            command.arg(format!("--listen=127.0.0.1:{port}"));
        }
        let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
        command
            .arg(format!("--fdname={}", names.join(":")))
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
            .arg(format!("--setenv=WATCHDOG_USEC={WATCHDOG_USEC}"))
            .arg("--setenv=PX_LOG=info")
            .arg(bin)
            .arg("--config")
            .arg(config);
        Self::spawn(command, log)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal}: {e}"));
    }

    /// What the process wrote on stderr so far, to show when a test fails.
    pub fn logs(&self) -> String {
        format!(
            "stderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Waits (up to [`WAIT`]) for the process to end; its exit status.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("waiting for the process: {e}"),
            }
            assert!(Instant::now() < deadline, "still running\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Sends `request` (a whole HTTP/1.1 request, ending the connection) to `127.0.0.1:port` on a
/// new connection; the status line of the answer.
pub fn http_status_line(port: u16, request: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

/// `GET path` with a bearer token on a new connection to `127.0.0.1:port`; the status line of
/// the answer.
pub fn get_with_token(port: u16, path: &str, token: &str) -> std::io::Result<String> {
    http_status_line(
        port,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// Runs `request` on a thread of its own, again while the connection is refused:
/// `systemd-socket-activate` listens a moment after it starts, and starts the service on this
/// first connection, which waits in the socket's queue meanwhile.
pub fn first_connection<T: Send + 'static>(
    request: impl Fn() -> std::io::Result<T> + Send + 'static,
) -> JoinHandle<std::io::Result<T>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            match request() {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    })
}
