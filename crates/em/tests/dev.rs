//! `em dev` end to end: the real binary, a real Python app, real sockets. Edits to the app's
//! files restart it with no failed request, a broken edit leaves the old instance serving,
//! and SIGTERM stops everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use px_test_support::free_port;

/// Generous for a loaded CI machine; a restart takes well under a second on a quiet one.
const LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
const APP: &str = "devapp";

fn write_manifest(dir: &Path, greeting: &str) {
    std::fs::write(
        dir.join("app.toml"),
        format!(
            r#"name = "{APP}"
run = "exec python3 server.py \"$1\""
[health]
path = "/healthz"
[http]
static = {{ "/static" = "public" }}
[env]
GREETING = "{greeting}"
"#
        ),
    )
    .unwrap();
}

/// The app: `/` answers `$GREETING`, then ` <message.txt>` when that file existed at start,
/// then `mark`; `/pid` its process id; `/healthz` ok.
fn server_py(mark: &str) -> String {
    format!(
        r#"import os, sys, http.server
MARK = "{mark}"
MESSAGE = ""
if os.path.exists("message.txt"):
    with open("message.txt") as f:
        MESSAGE = " " + f.read().strip()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = "ok"
        elif self.path == "/pid":
            body = str(os.getpid())
        else:
            body = os.environ.get("GREETING", "") + MESSAGE + MARK
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

print("listening on", sys.argv[1], "PX_DEV=" + os.environ.get("PX_DEV", ""), flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#
    )
}

fn write_app(dir: &Path) {
    write_manifest(dir, "one");
    std::fs::write(dir.join("server.py"), server_py("")).unwrap();
    std::fs::create_dir_all(dir.join("public")).unwrap();
    std::fs::write(dir.join("public/x.css"), "body { color: teal }\n").unwrap();
}

/// One HTTP/1.1 GET over a fresh connection: (status, body), or why it failed.
fn get(port: u16, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

fn get_local(port: u16, path: &str) -> Result<(u16, String), String> {
    get(port, &format!("localhost:{port}"), path)
}

/// Polls `path` until it answers 200 with `body`.
fn wait_for_body(port: u16, path: &str, body: &str) {
    let start = Instant::now();
    let mut last = Err(String::from("not asked yet"));
    while start.elapsed() < LIMIT {
        last = get_local(port, path);
        if matches!(&last, Ok((200, b)) if b == body) {
            return;
        }
        std::thread::sleep(POLL);
    }
    panic!("GET {path} never answered {body:?}; last answer {last:?}");
}

fn pid_of_app(port: u16) -> u32 {
    let (status, body) = get_local(port, "/pid").unwrap();
    assert_eq!(status, 200, "{body}");
    body.parse().unwrap()
}

/// Whether a process runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn wait_gone(pid: u32) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < LIMIT, "process {pid} is still running");
        std::thread::sleep(POLL);
    }
}

fn send_sigterm(pid: u32) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(POLL);
    }
    None
}

/// A running `em dev`, its stdout and stderr in files outside the app directory (so they do
/// not count as changes). Stopped with SIGTERM, then SIGKILL, if a test fails midway.
struct Dev {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    _logs: tempfile::TempDir,
}

impl Dev {
    fn start(dir: &Path, port: u16) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let out = logs.path().join("stdout");
        let err = logs.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_em"))
            .arg("dev")
            .arg(dir)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            out,
            err,
            _logs: logs,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn wait_for_stdout(&self, needle: &str) {
        self.wait_for(needle, Self::stdout);
    }

    fn wait_for_stderr(&self, needle: &str) {
        self.wait_for(needle, Self::stderr);
    }

    fn wait_for(&self, needle: &str, read: fn(&Self) -> String) {
        let start = Instant::now();
        while !read(self).contains(needle) {
            assert!(
                start.elapsed() < LIMIT,
                "em dev never printed {needle:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM; returns how it exited.
    fn terminate(&mut self) -> ExitStatus {
        send_sigterm(self.child.id());
        wait_exit(&mut self.child, LIMIT).unwrap_or_else(|| {
            panic!(
                "em dev did not exit after SIGTERM\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            send_sigterm(self.child.id());
            if wait_exit(&mut self.child, LIMIT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Requests `/` over and over until stopped, and remembers every answer that was not a 200.
struct Hammer {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match get_local(port, "/") {
                        Ok((200, _)) => {}
                        Ok((status, body)) => {
                            failures.lock().unwrap().push(format!("{status}: {body}"))
                        }
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            stop,
            sent,
            failures,
            thread: Some(thread),
        }
    }

    /// Stops and returns (requests sent, failures).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.sent.load(Ordering::SeqCst), failures)
    }
}

#[test]
fn serves_restarts_on_changes_without_a_failed_request_and_stops_on_sigterm() {
    let app = tempfile::tempdir().unwrap();
    let dir = app.path();
    write_app(dir);
    let port = free_port();
    let mut dev = Dev::start(dir, port);

    wait_for_body(port, "/", "one");
    dev.wait_for_stdout(&format!(
        "serving {APP} at http://localhost:{port}/ (Ctrl-C to stop)"
    ));
    // The app's own output, prefixed, with the dev marker in its env.
    dev.wait_for_stdout("[app] listening on");
    assert!(dev.stdout().contains("PX_DEV=1"), "{}", dev.stdout());
    // Static paths are served by the proxy from public/.
    assert_eq!(
        get_local(port, "/static/x.css").unwrap(),
        (200, "body { color: teal }\n".to_string())
    );
    // Every local host name reaches the app.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("{APP}.localhost:{port}"),
    ] {
        assert_eq!(get(port, &host, "/").unwrap(), (200, "one".to_string()));
    }
    let mut pids = vec![pid_of_app(port)];

    let hammer = Hammer::start(port);

    // A data file the app reads at start.
    std::fs::write(dir.join("message.txt"), "hello\n").unwrap();
    wait_for_body(port, "/", "one hello");
    dev.wait_for_stdout("restarted (changed: message.txt)");
    pids.push(pid_of_app(port));
    assert_ne!(pids[0], pids[1]);
    wait_gone(pids[0]);

    // The manifest's env.
    write_manifest(dir, "two");
    wait_for_body(port, "/", "two hello");
    dev.wait_for_stdout("restarted (changed: app.toml)");
    pids.push(pid_of_app(port));
    wait_gone(pids[1]);

    // A syntax error: the new instance fails, the old one keeps serving.
    std::fs::write(dir.join("server.py"), "def broken(:\n").unwrap();
    dev.wait_for_stderr(&format!(
        "app {APP} failed to start: exited before becoming healthy"
    ));
    dev.wait_for_stderr("SyntaxError");
    assert_eq!(
        get_local(port, "/").unwrap(),
        (200, "two hello".to_string())
    );
    assert_eq!(pid_of_app(port), pids[2]);

    // An invalid manifest: reported, the old instance keeps serving.
    let manifest = std::fs::read_to_string(dir.join("app.toml")).unwrap();
    std::fs::write(dir.join("app.toml"), "name = \"Not A Name\"\n").unwrap();
    dev.wait_for_stderr("field `name`");
    assert_eq!(pid_of_app(port), pids[2]);
    std::fs::write(dir.join("app.toml"), manifest).unwrap();

    // Fixed: a new instance with the new code.
    std::fs::write(dir.join("server.py"), server_py("!")).unwrap();
    wait_for_body(port, "/", "two hello!");
    pids.push(pid_of_app(port));
    wait_gone(pids[2]);

    let (sent, failures) = hammer.finish();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during restarts: {failures:?}",
        failures.len()
    );
    assert!(sent > 20, "only {sent} requests were sent");

    // Ignored paths do not restart the app.
    std::fs::create_dir_all(dir.join("__pycache__")).unwrap();
    std::fs::write(dir.join("__pycache__/x.pyc"), "x").unwrap();
    std::fs::write(dir.join("server.py~"), "backup").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pid_of_app(port), pids[3]);

    let status = dev.terminate();
    assert!(
        status.success(),
        "em dev exited with {status}\nstderr:\n{}",
        dev.stderr()
    );
    for pid in pids {
        assert!(!alive(pid), "app process {pid} outlived em dev");
    }
    assert!(dev.stdout().contains("stopped"), "{}", dev.stdout());
    // The port is free again.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn an_app_that_never_becomes_healthy_gets_503_until_it_is_fixed() {
    let app = tempfile::tempdir().unwrap();
    let dir = app.path();
    write_app(dir);
    std::fs::write(
        dir.join("server.py"),
        "import sys\nprint('cannot start: no database', file=sys.stderr)\nsys.exit(3)\n",
    )
    .unwrap();
    let port = free_port();
    let mut dev = Dev::start(dir, port);

    dev.wait_for_stderr(&format!(
        "app {APP} failed to start: exited before becoming healthy"
    ));
    dev.wait_for_stderr("cannot start: no database");
    dev.wait_for_stderr("exit code 3");
    let (status, _) = get_local(port, "/").unwrap();
    assert_eq!(status, 503);
    // Static files do not need the app.
    assert_eq!(get_local(port, "/static/x.css").unwrap().0, 200);

    std::fs::write(dir.join("server.py"), server_py("")).unwrap();
    wait_for_body(port, "/", "one");
    dev.wait_for_stdout(&format!("serving {APP} at http://localhost:{port}/"));
    let pid = pid_of_app(port);

    assert!(dev.terminate().success(), "{}", dev.stderr());
    assert!(!alive(pid));
}

#[test]
fn an_instance_that_exits_on_its_own_is_reported_and_restarted_by_the_next_change() {
    let app = tempfile::tempdir().unwrap();
    let dir = app.path();
    write_app(dir);
    let port = free_port();
    let mut dev = Dev::start(dir, port);
    wait_for_body(port, "/", "one");
    let pid = pid_of_app(port);

    send_sigterm(pid);
    dev.wait_for_stderr(&format!("app {APP} exited"));
    wait_gone(pid);
    assert_eq!(get_local(port, "/").unwrap().0, 503);

    std::fs::write(dir.join("message.txt"), "back").unwrap();
    wait_for_body(port, "/", "one back");
    assert!(dev.terminate().success(), "{}", dev.stderr());
}

#[test]
fn a_directory_without_app_toml_points_to_em_init() {
    let empty = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(empty.path(), free_port());
    let status = wait_exit(&mut dev.child, LIMIT).expect("em dev did not exit");
    assert!(!status.success());
    let stderr = dev.stderr();
    assert!(stderr.contains("no app.toml in"), "{stderr}");
    assert!(stderr.contains("em init"), "{stderr}");
}

#[test]
fn a_taken_port_says_to_pass_another() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut dev = Dev::start(app.path(), port);
    let status = wait_exit(&mut dev.child, LIMIT).expect("em dev did not exit");
    assert!(!status.success());
    let stderr = dev.stderr();
    assert!(
        stderr.contains(&format!("port {port} is taken")),
        "{stderr}"
    );
    assert!(stderr.contains("--port"), "{stderr}");
    // It failed before starting the app.
    assert!(!dev.stdout().contains("[app]"), "{}", dev.stdout());
}

#[test]
fn an_app_event_prints_in_the_terminal_and_a_missing_runtime_is_a_warning() {
    let app = tempfile::tempdir().unwrap();
    let dir = app.path();
    write_app(dir);
    let manifest = std::fs::read_to_string(dir.join("app.toml")).unwrap();
    std::fs::write(
        dir.join("app.toml"),
        manifest.replace("run = ", "requires = [\"px-not-on-this-machine\"]\nrun = "),
    )
    .unwrap();
    // Report an event through PX_EVENTS_URL with the standard library, as the examples do.
    let server = server_py("");
    let reporting = server.replace(
        "print(\"listening on\"",
        "import json, urllib.request\n\
         urllib.request.urlopen(urllib.request.Request(os.environ[\"PX_EVENTS_URL\"], \
         data=json.dumps({\"level\": \"warning\", \"message\": \"cache is cold\", \
         \"fields\": {\"entries\": 0}}).encode(), method=\"POST\"), timeout=5).close()\n\
         print(\"listening on\"",
    );
    assert_ne!(server, reporting);
    std::fs::write(dir.join("server.py"), reporting).unwrap();
    let port = free_port();
    let mut dev = Dev::start(dir, port);
    dev.wait_for_stdout("[warning] cache is cold entries=0");
    dev.wait_for_stderr("`px-not-on-this-machine` is not installed");
    wait_for_body(port, "/", "one");
    assert!(dev.terminate().success());
}
