//! The `maestro` binary under systemd's own tools: `systemd-socket-activate` passes the
//! proxy's sockets by name, and a datagram socket the test owns plays systemd's notification
//! socket (`NOTIFY_SOCKET`). Readiness, status, watchdog pings, reloads and stopping arrive in
//! order; a stopped Maestro misses its watchdog; and while Maestro restarts under steady load,
//! socket activation refuses no connection where a plain bind refuses some.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use px_test_support::systemd::{
    Notifications, SOCKET_ACTIVATE, Service, Signal, WAIT, WATCHDOG_TIMEOUT, http_status_line,
    require_socket_activate,
};
use px_test_support::{Pki, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_maestro");

/// Writes Maestro's config with its own state under `dir`; the HTTP address matters only when
/// systemd passes no socket.
fn write_config(dir: &Path, http_listen: &str, extra: &str) -> PathBuf {
    let path = dir.join("maestro.toml");
    std::fs::write(
        &path,
        format!(
            "node_name = \"web-systemd\"\nhttp_listen = \"{http_listen}\"\nstatus_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nlog_dir = \"{}\"\nstop_grace = \"2s\"\n{extra}",
            dir.join("state").display(),
            dir.join("logs").display(),
        ),
    )
    .unwrap();
    path
}

/// Maestro started by `systemd-socket-activate` with its sockets under their names.
fn activated(sockets: &[(u16, &str)], notify: &Path, config: &Path, dir: &Path) -> Service {
    Service::activated(BIN, sockets, notify, config, dir.join("maestro.log"))
}

/// One `GET /` on a new connection; the status line of the answer.
fn http_get(port: u16) -> std::io::Result<String> {
    http_status_line(
        port,
        "GET / HTTP/1.1\r\nHost: nothing.invalid\r\nConnection: close\r\n\r\n",
    )
}

/// [`http_get`] once the port accepts, which starts Maestro.
fn first_connection(port: u16) -> std::thread::JoinHandle<std::io::Result<String>> {
    px_test_support::systemd::first_connection(move || http_get(port))
}

/// An HTTP/1.1 connection kept open across requests.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn open(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// One `GET /` on this same connection; the status line of the answer.
    fn get(&mut self) -> String {
        self.reader
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: nothing.invalid\r\n\r\n")
            .unwrap();
        let mut status = String::new();
        self.reader.read_line(&mut status).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        status.trim_end().to_owned()
    }
}

/// Serves `pki`'s certificate for every name, as `certs_dir/_default.crt`.
fn install_certificate(pki: &Pki, certs_dir: &Path) {
    std::fs::create_dir_all(certs_dir).unwrap();
    std::fs::copy(pki.cert(), certs_dir.join("_default.crt")).unwrap();
    std::fs::copy(pki.key(), certs_dir.join("_default.key")).unwrap();
}

/// Whether a TLS handshake with `localhost:port` succeeds trusting only `ca`.
fn tls_handshake(port: u16, ca: &Path) -> Result<(), String> {
    let config = px_runtime::tls::client_config(ca).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map(drop)
        .map_err(|e| e.to_string())
    })
}

#[test]
fn activated_maestro_notifies_ready_status_watchdog_reloads_and_stopping_in_order() {
    require_socket_activate();
    let dir = tempfile::tempdir().unwrap();
    let mut systemd = Notifications::bind();
    let (first_ca, renewed_ca) = (
        Pki::new(&["localhost"]).unwrap(),
        Pki::new(&["localhost"]).unwrap(),
    );
    let certs_dir = dir.path().join("certs");
    install_certificate(&first_ca, &certs_dir);
    let certs = format!("certs_dir = \"{}\"\n", certs_dir.display());
    // The HTTP fallback address is never bound: systemd passes the `http` socket.
    let config = write_config(dir.path(), "127.0.0.1:1", &certs);
    let (http, https) = (free_port(), free_port());
    let mut maestro = activated(
        &[(http, "http"), (https, "https")],
        &systemd.path,
        &config,
        dir.path(),
    );

    // The first connection starts Maestro and waits in the socket's queue meanwhile.
    let first = first_connection(http);
    assert_eq!(systemd.next(&maestro), "READY=1", "READY=1 comes first");
    // Ready means serving: a new connection is answered at once, by the proxy.
    let answered = Instant::now();
    let status_line = http_get(http).unwrap();
    assert_eq!(status_line, "HTTP/1.1 404 Not Found", "{}", maestro.logs());
    assert!(answered.elapsed() < Duration::from_secs(2));
    assert!(first.join().unwrap().unwrap().starts_with("HTTP/1.1 404"));
    tls_handshake(https, &first_ca.ca()).unwrap();
    let serving =
        "STATUS=serving 0 apps (0 instances), 1 certificate over HTTPS; no beacon configured";
    assert_eq!(systemd.next(&maestro), serving);
    systemd.pings(3, &maestro);

    // A reload with renewed certificates: served from the next handshake, no connection dropped.
    let mut kept = KeepAlive::open(http);
    assert_eq!(kept.get(), "HTTP/1.1 404 Not Found");
    install_certificate(&renewed_ca, &certs_dir);
    maestro.signal(Signal::SIGHUP);
    let reloading = systemd.next(&maestro);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(systemd.next(&maestro), "READY=1");
    assert_eq!(
        kept.get(),
        "HTTP/1.1 404 Not Found",
        "the open connection still serves"
    );
    assert_eq!(http_get(http).unwrap(), "HTTP/1.1 404 Not Found");
    tls_handshake(https, &renewed_ca.ca()).unwrap();
    assert!(
        tls_handshake(https, &first_ca.ca()).is_err(),
        "the previous certificate is no longer served"
    );

    // A configuration that does not load: Maestro keeps running, and the status says why.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}listne = \"typo\"\n")).unwrap();
    maestro.signal(Signal::SIGHUP);
    assert!(systemd.next(&maestro).starts_with("RELOADING=1\n"));
    let failed = systemd.next(&maestro);
    assert!(
        failed.starts_with("STATUS=reload failed, still running the previous configuration: ")
            && failed.contains("listne"),
        "{failed:?}"
    );
    assert_eq!(systemd.next(&maestro), "READY=1");
    let status = systemd.next(&maestro);
    assert!(
        status.starts_with(&format!(
            "{serving}; reload failed, previous configuration kept: "
        )),
        "{status:?}"
    );
    assert_eq!(kept.get(), "HTTP/1.1 404 Not Found");

    // A setting that only a restart applies is named as such.
    std::fs::write(
        &config,
        good.replace(
            "status_listen = \"127.0.0.1:0\"",
            "status_listen = \"127.0.0.1:1\"",
        ),
    )
    .unwrap();
    maestro.signal(Signal::SIGHUP);
    assert!(systemd.next(&maestro).starts_with("RELOADING=1\n"));
    assert_eq!(systemd.next(&maestro), "READY=1");
    assert_eq!(
        systemd.next(&maestro),
        format!("{serving}; restart needed to apply status_listen")
    );
    assert_eq!(kept.get(), "HTTP/1.1 404 Not Found");

    maestro.signal(Signal::SIGTERM);
    assert_eq!(systemd.next(&maestro), "STOPPING=1");
    assert!(maestro.wait().success(), "{}", maestro.logs());
    assert!(systemd.pings >= 3);
}

#[test]
fn a_stopped_maestro_misses_its_watchdog_and_pings_again_once_continued() {
    require_socket_activate();
    let dir = tempfile::tempdir().unwrap();
    let mut systemd = Notifications::bind();
    let config = write_config(dir.path(), "127.0.0.1:1", "");
    let http = free_port();
    let mut maestro = activated(&[(http, "http")], &systemd.path, &config, dir.path());
    let first = first_connection(http);
    assert_eq!(systemd.next(&maestro), "READY=1");
    first.join().unwrap().unwrap();
    assert!(systemd.next(&maestro).starts_with("STATUS=serving 0 apps"));
    systemd.pings(2, &maestro);

    // A stopped process is the extreme of a wedged one: nothing of it runs.
    maestro.signal(Signal::SIGSTOP);
    systemd.during(Duration::from_millis(100)); // anything sent just before
    let quiet = systemd.during(WATCHDOG_TIMEOUT * 2);
    assert!(
        quiet.is_empty(),
        "notifications from a stopped maestro: {quiet:?}"
    );
    // systemd would have restarted it by now (WatchdogSec= passed without a ping).

    maestro.signal(Signal::SIGCONT);
    let continued = Instant::now();
    systemd.pings(1, &maestro);
    println!(
        "watchdog pings resumed {:?} after SIGCONT",
        continued.elapsed()
    );
    maestro.signal(Signal::SIGTERM);
    assert_eq!(systemd.next(&maestro), "STOPPING=1");
    assert!(maestro.wait().success(), "{}", maestro.logs());
}

/// What the clients of [`Load`] saw.
#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    answered: u64,
    /// Connections refused (`ECONNREFUSED`): nothing was listening.
    refused: u64,
    /// Anything else: a connection reset or closed before an answer, a timeout.
    failed: u64,
}

impl std::ops::AddAssign for Outcomes {
    fn add_assign(&mut self, other: Self) {
        self.answered += other.answered;
        self.refused += other.refused;
        self.failed += other.failed;
    }
}

/// Clients connecting over and over, each sending one request per connection.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Outcomes>>,
}

impl Load {
    /// Concurrent clients: enough to keep connections arriving throughout a restart.
    const CLIENTS: usize = 4;
    /// Pause between one client's connections, so the load is steady rather than flat out.
    const PAUSE: Duration = Duration::from_millis(2);

    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..Self::CLIENTS)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut seen = Outcomes::default();
                    while !stop.load(Ordering::Relaxed) {
                        match http_get(port) {
                            Ok(line) if line.starts_with("HTTP/1.1 ") => seen.answered += 1,
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                seen.refused += 1;
                            }
                            _ => seen.failed += 1,
                        }
                        std::thread::sleep(Self::PAUSE);
                    }
                    seen
                })
            })
            .collect();
        Self { stop, clients }
    }

    fn stop(self) -> Outcomes {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Outcomes::default();
        for client in self.clients {
            total += client.join().unwrap();
        }
        total
    }
}

/// Plays systemd's restarts: runs Maestro again each time it ends, until `$PX_TEST_STOP`
/// exists. Like systemd, it holds the listening socket (fd 3, when it was passed one) across
/// restarts; each Maestro gets `LISTEN_PID` set to its own pid (the inner `sh` execs it), and
/// its pid is written to `$PX_TEST_PIDFILE` first.
const RESTART_LOOP: &str = r#"
while [ ! -e "$PX_TEST_STOP" ]; do
  sh -c 'echo $$ > "$PX_TEST_PIDFILE"; LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"' \
    "$PX_TEST_MAESTRO" --config "$PX_TEST_CONFIG"
done
"#;

/// Restarts per run.
const RESTARTS: usize = 4;
/// Steady load before each restart.
const BETWEEN_RESTARTS: Duration = Duration::from_millis(300);

/// Runs Maestro under [`RESTART_LOOP`], with the socket held by `systemd-socket-activate` when
/// `activation`, else bound by each Maestro itself, ends it with `signal` [`RESTARTS`] times
/// under steady load (SIGTERM as `systemctl restart` does, SIGKILL as a crash), and returns
/// what the clients saw from the first start to the last.
fn restarts_under_load(activation: bool, signal: Signal) -> Outcomes {
    let dir = tempfile::tempdir().unwrap();
    let mut systemd = Notifications::bind();
    let port = free_port();
    let config = write_config(dir.path(), &format!("127.0.0.1:{port}"), "");
    let stop = dir.path().join("stop");
    let pidfile = dir.path().join("maestro.pid");
    let env = [
        ("PX_TEST_STOP", stop.display().to_string()),
        ("PX_TEST_PIDFILE", pidfile.display().to_string()),
        ("PX_TEST_MAESTRO", BIN.to_owned()),
        ("PX_TEST_CONFIG", config.display().to_string()),
        ("NOTIFY_SOCKET", systemd.path.display().to_string()),
        ("PX_LOG", "warn".to_owned()),
    ];
    let log = dir.path().join("maestro.log");
    let supervisor = if activation {
        let mut command = Command::new(SOCKET_ACTIVATE);
        command
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=http");
        for (name, value) in &env {
            command.arg(format!("--setenv={name}={value}"));
        }
        command.args(["/bin/sh", "-c", RESTART_LOOP]);
        Service::spawn(command, log)
    } else {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", RESTART_LOOP]).envs(env);
        Service::spawn(command, log)
    };
    let first = activation.then(|| first_connection(port));
    assert_eq!(systemd.next(&supervisor), "READY=1");
    if let Some(first) = first {
        first.join().unwrap().unwrap();
    }

    let load = Load::start(port);
    let mut last_pid = None;
    for _ in 0..RESTARTS {
        std::thread::sleep(BETWEEN_RESTARTS);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_ne!(Some(pid), last_pid, "maestro was not restarted");
        last_pid = Some(pid);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
        // The old one may still say STOPPING=1 and more; READY=1 is the new one.
        while systemd.next(&supervisor) != "READY=1" {}
    }
    std::thread::sleep(BETWEEN_RESTARTS);
    let seen = load.stop();

    std::fs::write(&stop, "").unwrap();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let mut supervisor = supervisor;
    supervisor.wait();
    seen
}

#[test]
fn socket_activation_refuses_no_connection_while_maestro_restarts() {
    require_socket_activate();
    let graceful = restarts_under_load(true, Signal::SIGTERM);
    let crashes = restarts_under_load(true, Signal::SIGKILL);
    let bound = restarts_under_load(false, Signal::SIGTERM);
    let line = |what: &str, o: &Outcomes| {
        println!(
            "{what}: {} refused, {} failed otherwise, {} answered, of {} connections",
            o.refused,
            o.failed,
            o.answered,
            o.answered + o.refused + o.failed
        )
    };
    println!(
        "{RESTARTS} Maestro restarts under steady load ({} clients, one request per connection):",
        Load::CLIENTS
    );
    line("socket activation, SIGTERM (systemctl restart)", &graceful);
    line("socket activation, SIGKILL (crash)", &crashes);
    line("plain bind, SIGTERM", &bound);
    // A graceful restart under socket activation fails no request at all: new connections
    // wait in the socket systemd holds, and accepted ones are answered before Maestro exits.
    assert_eq!(
        (graceful.refused, graceful.failed),
        (0, 0),
        "a graceful restart failed requests: {graceful:?}"
    );
    // A crash loses what the dead process had accepted, but refuses nothing.
    assert_eq!(crashes.refused, 0, "{crashes:?}");
    assert!(graceful.answered > 0 && crashes.answered > 0 && bound.answered > 0);
}
