//! Maestro's facade for local runs (`px_maestro::local`) with a real Python app, real sockets
//! and real processes: a restart switches to the directory's new files and retires the old
//! instance, a broken start or manifest leaves the old instance serving (or 503, static files
//! still served, when there is none), an instance's own exit is reported with its last stderr
//! lines, a restart abandoned before its instance is healthy leaves no process behind, and
//! `stop` ends everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use px_maestro::local::{LocalApp, LocalSettings, Notice, RestartOutcome, StartError};
use tokio_util::sync::CancellationToken;

/// Generous for a loaded machine; each step takes well under a second on a quiet one.
const WAIT: Duration = Duration::from_secs(30);
const APP: &str = "localapp";

/// The app: `/` answers `$GREETING`, `/pid` its process id, `/crash` writes a line to stderr
/// and exits with code 3. With `$PID_FILE` it writes its pid there first, and with
/// `$SLOW_START` it never listens.
const SERVER_PY: &str = r#"import os, sys, time, http.server
if os.environ.get("PID_FILE"):
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
if os.environ.get("SLOW_START"):
    time.sleep(3600)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/crash":
            print("crashing now", file=sys.stderr, flush=True)
            os._exit(3)
        body = str(os.getpid()) if self.path == "/pid" else os.environ.get("GREETING", "")
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

fn write_manifest(dir: &Path, env: &str) {
    std::fs::write(
        dir.join("app.toml"),
        format!(
            "name = \"{APP}\"\nrun = \"exec python3 server.py\"\n[http]\nstatic = {{ \"/static\" = \"public\" }}\n[env]\n{env}\n"
        ),
    )
    .unwrap();
}

/// A local run of the app in `dir` on a free port; its notices are collected.
struct Run {
    app: LocalApp,
    notices: Arc<Mutex<Vec<Notice>>>,
    _logs: tempfile::TempDir,
}

impl Run {
    async fn start(dir: &Path) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let notices = Arc::new(Mutex::new(Vec::new()));
        let collected = notices.clone();
        let app = LocalApp::start(
            LocalSettings {
                dir: dir.to_path_buf(),
                listen: "127.0.0.1:0".parse().unwrap(),
                logs_dir: logs.path().to_path_buf(),
                default_env: Vec::new(),
                extra_env: Vec::new(),
                on_notice: Box::new(move |n| collected.lock().unwrap().push(n)),
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        Self {
            app,
            notices,
            _logs: logs,
        }
    }

    async fn restart(&mut self) -> RestartOutcome {
        tokio::time::timeout(WAIT, self.app.restart())
            .await
            .expect("the restart did not end")
            .unwrap()
    }

    /// One GET through the proxy: (status, body).
    async fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.app.local_addr());
        let response = client().get(url).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn pid(&self) -> u32 {
        let (status, body) = self.get("/pid").await;
        assert_eq!(status, 200, "{body}");
        body.parse().unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
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

async fn wait_gone(pid: u32) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < WAIT, "process {pid} is still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid an instance wrote into `path`, once it did.
async fn wait_for_pid(path: PathBuf) -> u32 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid) = text.parse()
        {
            return pid;
        }
        assert!(start.elapsed() < WAIT, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.py"), SERVER_PY).unwrap();
    dir
}

#[tokio::test]
async fn restarts_switch_to_the_new_files_and_a_broken_one_leaves_the_old_instance_serving() {
    let dir = app_dir();
    let d = dir.path();
    write_manifest(d, "GREETING = \"one\"");
    let mut run = Run::start(d).await;
    // The static directory is missing: said once, though both `start` and the first restart
    // use that manifest.
    assert!(matches!(
        run.restart().await,
        RestartOutcome::Serving { app } if app == APP
    ));
    assert_eq!(
        *run.notices.lock().unwrap(),
        [Notice::MissingStaticDir {
            prefix: "/static".into(),
            dir: "public".into()
        }]
    );
    assert_eq!(run.get("/").await, (200, "one".to_string()));
    let first = run.pid().await;

    write_manifest(d, "GREETING = \"two\"");
    assert!(matches!(
        run.restart().await,
        RestartOutcome::Serving { .. }
    ));
    assert_eq!(run.get("/").await, (200, "two".to_string()));
    let second = run.pid().await;
    assert_ne!(first, second);
    // The replaced instance is drained and stopped.
    wait_gone(first).await;

    // A syntax error: the new instance fails, with its stderr; the old one keeps serving.
    std::fs::write(d.join("server.py"), "def broken(:\n").unwrap();
    let RestartOutcome::Failed(failed) = run.restart().await else {
        panic!("a broken server started");
    };
    let said = failed.to_string();
    assert!(
        said.starts_with(&format!(
            "app {APP} failed to start: exited before becoming healthy (exit code 1)"
        )),
        "{said}"
    );
    assert!(said.contains("its last stderr lines:"), "{said}");
    assert!(said.contains("SyntaxError"), "{said}");
    assert!(run.app.is_serving());
    assert_eq!(run.get("/").await, (200, "two".to_string()));

    // An invalid manifest starts nothing; the old instance keeps serving.
    std::fs::write(d.join("server.py"), SERVER_PY).unwrap();
    std::fs::write(d.join("app.toml"), "name = \"Not A Name\"\n").unwrap();
    let error = run.app.restart().await.unwrap_err();
    assert!(error.is_bad_app());
    assert!(error.to_string().contains("field `name`"), "{error}");
    assert_eq!(run.pid().await, second);

    let addr = run.app.local_addr();
    run.app.stop().await;
    assert!(!alive(second), "the app outlived stop");
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn without_a_healthy_instance_the_proxy_answers_503_and_still_serves_static_files() {
    let dir = app_dir();
    let d = dir.path();
    write_manifest(d, "");
    std::fs::create_dir(d.join("public")).unwrap();
    std::fs::write(d.join("public/x.css"), "body { color: teal }\n").unwrap();
    std::fs::write(
        d.join("server.py"),
        "import sys\nprint('cannot start: no database', file=sys.stderr)\nsys.exit(3)\n",
    )
    .unwrap();
    let mut run = Run::start(d).await;
    assert_eq!(run.get("/").await.0, 503);

    let RestartOutcome::Failed(StartError::NeverHealthy {
        app,
        failure,
        stderr,
    }) = run.restart().await
    else {
        panic!("a failing server started");
    };
    assert_eq!(app, APP);
    assert!(failure.contains("exit code 3"), "{failure}");
    assert_eq!(
        stderr,
        "\nits last stderr lines:\n  cannot start: no database"
    );
    assert!(!run.app.is_serving());
    assert_eq!(run.get("/").await.0, 503);
    assert_eq!(
        run.get("/static/x.css").await,
        (200, "body { color: teal }\n".to_string())
    );
    assert!(run.notices.lock().unwrap().is_empty());
    run.app.stop().await;
}

#[tokio::test]
async fn an_instance_that_exits_on_its_own_is_reported_with_its_last_stderr_lines() {
    let dir = app_dir();
    write_manifest(dir.path(), "");
    let mut run = Run::start(dir.path()).await;
    assert!(matches!(
        run.restart().await,
        RestartOutcome::Serving { .. }
    ));
    let pid = run.pid().await;

    // The instance dies while answering: the proxy reports a failure of its own.
    let (status, _) = run.get("/crash").await;
    assert!(status >= 500, "{status}");
    let exit = tokio::time::timeout(WAIT, run.app.exited())
        .await
        .expect("the exit was not reported");
    assert_eq!(exit.app, APP);
    assert_eq!(exit.how, "exit code 3");
    assert_eq!(exit.stderr, "\nits last stderr lines:\n  crashing now");
    assert_eq!(
        exit.to_string(),
        format!("app {APP} exited (exit code 3)\nits last stderr lines:\n  crashing now")
    );
    assert!(!alive(pid));
    assert!(!run.app.is_serving());
    assert_eq!(run.get("/").await.0, 503);

    // The next restart brings it back.
    assert!(matches!(
        run.restart().await,
        RestartOutcome::Serving { .. }
    ));
    assert_eq!(run.get("/").await.0, 200);
    run.app.stop().await;
}

#[tokio::test]
async fn a_restart_abandoned_before_its_instance_is_healthy_leaves_no_process_behind() {
    let dir = app_dir();
    let d = dir.path();
    let pids = tempfile::tempdir().unwrap();
    let pid_file = |n: u32| -> PathBuf { pids.path().join(format!("{n}.pid")) };
    let slow = |n: u32| {
        format!(
            "SLOW_START = \"1\"\nPID_FILE = \"{}\"",
            pid_file(n).display()
        )
    };
    write_manifest(d, &slow(1));
    let mut run = Run::start(d).await;

    // Dropped once the instance runs (the files changed again, say).
    let first = tokio::select! {
        outcome = run.app.restart() => panic!("a restart of a never-listening app ended: {outcome:?}"),
        pid = wait_for_pid(pid_file(1)) => pid,
    };
    assert!(alive(first));
    // The next restart stops it first.
    write_manifest(d, &format!("PID_FILE = \"{}\"", pid_file(2).display()));
    assert!(matches!(
        run.restart().await,
        RestartOutcome::Serving { .. }
    ));
    assert!(
        !alive(first),
        "the abandoned instance outlived the next restart"
    );
    let second = run.pid().await;

    // And `stop` stops one abandoned after that, with the serving one.
    write_manifest(d, &slow(3));
    let third = tokio::select! {
        outcome = run.app.restart() => panic!("a restart of a never-listening app ended: {outcome:?}"),
        pid = wait_for_pid(pid_file(3)) => pid,
    };
    assert!(alive(third));
    assert_eq!(run.pid().await, second);
    run.app.stop().await;
    assert!(!alive(second));
    assert!(!alive(third));
}
