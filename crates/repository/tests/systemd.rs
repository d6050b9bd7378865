//! The `apprepo` binary under `systemd-socket-activate`, which passes its socket by name
//! (`api`; another one it has no use for is closed with a warning), with a datagram socket the test owns as systemd's notification socket: READY=1 once
//! serving with its storage checked, a status line, watchdog pings, a reload (the unit's
//! `kill -HUP`) that swaps the accepted tokens, then STOPPING=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use px_runtime::tokens::{generate, hash};
use px_test_support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_apprepo");
const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
/// Bounds how long a failing test hangs.
const WAIT: Duration = Duration::from_secs(20);

/// The notification socket systemd would own.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notifications {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    fn recv(&self, service: &Service) -> String {
        let mut buf = [0; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => String::from_utf8(buf[..n].to_vec()).unwrap(),
            Err(e) => panic!("no notification within {WAIT:?} ({e})\n{}", service.logs()),
        }
    }

    /// The next notification that is not a watchdog ping.
    fn next(&self, service: &Service) -> String {
        loop {
            let message = self.recv(service);
            if message != "WATCHDOG=1" {
                return message;
            }
        }
    }
}

/// The `systemd-socket-activate` process (apprepo, once it execs), killed on drop.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn logs(&self) -> String {
        format!(
            "apprepo's stderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` with a bearer token on a new connection; the status line of the answer.
fn get(port: u16, path: &str, token: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

fn write_tokens(path: &Path, name: &str, token: &str) {
    std::fs::write(
        path,
        format!(
            "[[token]]\nname = \"{name}\"\nrole = \"deploy\"\nsha256 = \"{}\"\n",
            hash(token)
        ),
    )
    .unwrap();
}

#[test]
fn activated_apprepo_is_ready_reports_pings_reloads_its_tokens_and_stops() {
    assert!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "{SOCKET_ACTIVATE} is missing: run scripts/install-test-tools"
    );
    let dir = tempfile::tempdir().unwrap();
    let tokens_file = dir.path().join("tokens.toml");
    let (old, new) = (generate(), generate());
    write_tokens(&tokens_file, "old", &old);
    let config = dir.path().join("apprepo.toml");
    let data_dir = dir.path().join("data");
    // The configured address is never bound: systemd passes the socket.
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\ntokens_file = \"{}\"\n",
            data_dir.display(),
            tokens_file.display(),
        ),
    )
    .unwrap();
    let systemd = Notifications::bind();
    // A second socket apprepo has no use for: closed, with a warning.
    let (api, unused) = (free_port(), free_port());
    let log = dir.path().join("apprepo.log");
    let child = Command::new(SOCKET_ACTIVATE)
        .arg(format!("--listen=127.0.0.1:{api}"))
        .arg(format!("--listen=127.0.0.1:{unused}"))
        .arg("--fdname=api:metrics")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", systemd.path.display()))
        .arg("--setenv=WATCHDOG_USEC=1000000")
        .arg("--setenv=PX_LOG=info")
        .arg(BIN)
        .arg("--config")
        .arg(&config)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut apprepo = Service { child, log };

    // The first connection starts apprepo; it waits in the socket's queue meanwhile.
    let first = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            match get(api, "/healthz", "") {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => return other,
            }
        }
    });
    assert_eq!(systemd.next(&apprepo), "READY=1", "READY=1 comes first");
    assert_eq!(get(api, "/v1/apps", &old).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(first.join().unwrap().unwrap(), "HTTP/1.1 200 OK");
    let logs = apprepo.logs();
    assert!(
        logs.contains("closing a socket systemd passed that this service does not use")
            && logs.contains("socket=metrics"),
        "{logs}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "the unused socket is closed"
    );
    assert_eq!(
        systemd.next(&apprepo),
        format!(
            "STATUS=storage filesystem at {} ok; 0 releases committed; no beacon configured",
            data_dir.join("storage").display()
        )
    );
    for _ in 0..2 {
        assert_eq!(systemd.recv(&apprepo), "WATCHDOG=1");
    }

    // A reload reads the tokens file again: the new token is accepted, the old one no more.
    write_tokens(&tokens_file, "new", &new);
    apprepo.signal("HUP");
    let reloading = systemd.next(&apprepo);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    assert_eq!(systemd.next(&apprepo), "READY=1");
    assert_eq!(get(api, "/v1/apps", &new).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(
        get(api, "/v1/apps", &old).unwrap(),
        "HTTP/1.1 401 Unauthorized"
    );

    apprepo.signal("TERM");
    assert_eq!(systemd.next(&apprepo), "STOPPING=1");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = apprepo.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running\n{}",
            apprepo.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", apprepo.logs());
}
