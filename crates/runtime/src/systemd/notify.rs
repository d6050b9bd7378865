//! sd-notify: the datagrams (READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1) a service
//! sends to the socket named by `NOTIFY_SOCKET`.

use std::ffi::OsStr;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Longest STATUS= text sent, in bytes. systemd drops a notification longer than its 4 KiB
/// buffer whole, and `systemctl status` shows one line; a longer status is cut here instead.
pub const MAX_STATUS_BYTES: usize = 512;

/// Longest a notification may block when systemd's queue is full. Notifications are sent from
/// runtime threads, so they must not block for long; a stuck systemd loses one message.
pub const NOTIFY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

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

    /// The socket messages go to, as `NOTIFY_SOCKET` gave it, for log lines.
    pub(super) fn socket(&self) -> Option<&str> {
        self.target.as_ref().map(|target| target.shown.as_str())
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

    /// `WATCHDOG=1`: the service is alive; see [`spawn_watchdog`](super::spawn_watchdog).
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
pub(super) fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let seconds = u64::try_from(now.tv_sec).unwrap_or_default();
    let nanos = u64::try_from(now.tv_nsec).unwrap_or_default();
    seconds * 1_000_000 + nanos / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::systemd::testing::{ARRIVAL_TIMEOUT, notifier_for};

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
}
