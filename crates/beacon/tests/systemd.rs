//! The `beacon` binary under `systemd-socket-activate`, which passes its sockets by name (`api`,
//! `control`), with a datagram socket the test owns as systemd's notification socket: READY=1
//! once serving, a status line, watchdog pings, a reload (the unit's `kill -HUP`) that swaps
//! the accepted tokens, then STOPPING=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use px_runtime::tokens::{generate, hash};
use px_test_support::{Pki, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_beacon");
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

    fn recv(&self, beacon: &Beacon) -> String {
        let mut buf = [0; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => String::from_utf8(buf[..n].to_vec()).unwrap(),
            Err(e) => panic!("no notification within {WAIT:?} ({e})\n{}", beacon.logs()),
        }
    }

    /// The next notification that is not a watchdog ping.
    fn next(&self, beacon: &Beacon) -> String {
        loop {
            let message = self.recv(beacon);
            if message != "WATCHDOG=1" {
                return message;
            }
        }
    }
}

/// The `systemd-socket-activate` process (Beacon, once it execs), killed on drop.
struct Beacon {
    child: Child,
    log: PathBuf,
}

impl Beacon {
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
            "beacon's stderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Beacon {
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
            "[[token]]\nname = \"{name}\"\nrole = \"read\"\nsha256 = \"{}\"\n",
            hash(token)
        ),
    )
    .unwrap();
}

#[test]
fn activated_beacon_is_ready_reports_pings_reloads_its_tokens_and_stops() {
    assert!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "{SOCKET_ACTIVATE} is missing: run scripts/install-test-tools"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["localhost"]).unwrap();
    let repo_token = dir.path().join("repo-token");
    px_runtime::secrets::write_secret_file(&repo_token, &generate()).unwrap();
    let tokens_file = dir.path().join("tokens.toml");
    let (old, new) = (generate(), generate());
    write_tokens(&tokens_file, "old", &old);
    let config = dir.path().join("beacon.toml");
    // The configured addresses are never bound: systemd passes both sockets. No apprepo runs.
    std::fs::write(
        &config,
        format!(
            "http_listen = \"127.0.0.1:1\"\ncontrol_listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntokens_file = \"{}\"\n[repository]\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
            dir.path().join("data").display(),
            pki.cert().display(),
            pki.key().display(),
            tokens_file.display(),
            repo_token.display()
        ),
    )
    .unwrap();
    let systemd = Notifications::bind();
    let (api, control) = (free_port(), free_port());
    let log = dir.path().join("beacon.log");
    let child = Command::new(SOCKET_ACTIVATE)
        .arg(format!("--listen=127.0.0.1:{api}"))
        .arg(format!("--listen=127.0.0.1:{control}"))
        .arg("--fdname=api:control")
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
    let mut beacon = Beacon { child, log };

    // The first connection starts Beacon; it waits in the socket's queue meanwhile.
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
    assert_eq!(systemd.next(&beacon), "READY=1", "READY=1 comes first");
    assert_eq!(get(api, "/v1/nodes", &old).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(first.join().unwrap().unwrap(), "HTTP/1.1 200 OK");
    let status = systemd.next(&beacon);
    assert!(
        status.starts_with("STATUS=0 nodes connected, 0 apps, generation 0; apprepo "),
        "{status:?}"
    );
    let mut pings = 0;
    while pings < 2 {
        // Status changes (apprepo found unreachable) may come between the pings.
        match systemd.recv(&beacon) {
            ping if ping == "WATCHDOG=1" => pings += 1,
            message => assert!(message.starts_with("STATUS="), "{message:?}"),
        }
    }

    // A reload reads the tokens file again: the new token is accepted, the old one no more.
    write_tokens(&tokens_file, "new", &new);
    beacon.signal("HUP");
    let reloading = loop {
        let message = systemd.next(&beacon);
        if !message.starts_with("STATUS=") {
            break message;
        }
    };
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    assert_eq!(systemd.next(&beacon), "READY=1");
    assert_eq!(get(api, "/v1/nodes", &new).unwrap(), "HTTP/1.1 200 OK");
    assert_eq!(
        get(api, "/v1/nodes", &old).unwrap(),
        "HTTP/1.1 401 Unauthorized"
    );

    beacon.signal("TERM");
    loop {
        let message = systemd.next(&beacon);
        if message == "STOPPING=1" {
            break;
        }
        assert!(message.starts_with("STATUS="), "{message:?}");
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = beacon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running\n{}",
            beacon.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", beacon.logs());
}
