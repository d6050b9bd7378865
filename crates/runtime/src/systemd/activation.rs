//! Socket activation: the listening sockets systemd passed in `LISTEN_FDS`, taken by their
//! `FileDescriptorName=`, and the listeners a service binds itself for any name systemd did not
//! pass.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::env_string;

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`); 0 to 2 are stdio.
pub const LISTEN_FDS_START: RawFd = 3;

/// Most sockets one service takes from systemd. Maestro, which takes the most, has three
/// (`http`, `https`, `status`); a count far above that means LISTEN_FDS is not what we think.
pub const MAX_LISTEN_FDS: usize = 16;

/// The name `sd_listen_fds_with_names` gives every socket when LISTEN_FDNAMES is unset.
const UNNAMED_SOCKET: &str = "unknown";

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
    if let Some(passed) = passed_listener(activation, name)? {
        return Ok(passed);
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
        None => passed_listener(activation, name),
    }
}

/// The socket systemd passed as `name`, adopted by the current tokio runtime, if it passed one.
fn passed_listener(
    activation: &mut Activation,
    name: &str,
) -> io::Result<Option<tokio::net::TcpListener>> {
    let Some(passed) = activation.take(name)? else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::from_std(passed)?;
    tracing::info!(socket = name, addr = %listener.local_addr()?, "listening on the socket systemd passed");
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, IntoRawFd};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use crate::systemd::testing::ARRIVAL_TIMEOUT;

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
