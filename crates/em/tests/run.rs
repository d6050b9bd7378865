//! `em run` against the real platform (`em up`, the real binary): a command of the current
//! release with its config and exit code, under a terminal the test opens (its name, its
//! size, Ctrl-C reaching the command), a killed `em` ending the remote process, `--detach`
//! into the app's logs, and every run in Beacon's events with who, what and how it ended.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_em");
const WAIT: Duration = Duration::from_secs(60);

struct Env {
    home: tempfile::TempDir,
    http_port: u16,
    port_base: u16,
}

impl Env {
    fn new() -> Self {
        let port_base = loop {
            let base = px_test_support::free_port();
            if base < 60000
                && (1..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            {
                break base;
            }
        };
        Self {
            home: tempfile::tempdir().unwrap(),
            http_port: px_test_support::free_port(),
            port_base,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("XDG_DATA_HOME", self.home.path().join("data"))
            .env("HOME", self.home.path())
            .env("PX_LOG", "warn");
        command
    }

    fn em(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    fn up(&self) -> Child {
        let (http_port, port_base) = (self.http_port.to_string(), self.port_base.to_string());
        let child = self
            .command(&["up", "--http-port", &http_port, "--port-base", &port_base])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        px_test_support::wait_for_port(self.http_port, Duration::from_secs(30)).unwrap();
        let config = self.home.path().join("config/em/config.toml");
        let start = Instant::now();
        while !config.exists() {
            assert!(start.elapsed() < WAIT, "em up never wrote its config");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Beacon's URL and em's token, from the config `em up` wrote.
    fn beacon(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.home.path().join("config/em/config.toml")).unwrap();
        let config: toml::Value = toml::from_str(&text).unwrap();
        (
            config["beacon"].as_str().unwrap().to_string(),
            config["token"].as_str().unwrap().to_string(),
        )
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < WAIT, "em up did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn example_copy(env: &Env, name: &str) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let to = env.home.path().join(name);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    to
}

/// `em run` with stdin closed, retried while the node has not reported the new release yet.
fn em_run(env: &Env, args: &[&str]) -> Output {
    let mut all = vec!["run", "--app", "python-hello"];
    all.extend_from_slice(args);
    let start = Instant::now();
    loop {
        let out = env.em(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("no linked node runs") && !stderr.contains("not v") {
            return out;
        }
        assert!(start.elapsed() < WAIT, "no node took the run: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The pid of the (only) `sleep SECONDS` running on this machine.
fn sleeping_for(seconds: &str) -> u32 {
    let want = format!("sleep\0{seconds}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes())
        })
        .expect("the remote sleep runs")
}

/// Reads the terminal until `needle` shows up; everything read so far.
fn read_until(master: &mut std::fs::File, seen: &mut String, needle: &str) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(start.elapsed() < WAIT, "never saw {needle:?} in {seen:?}");
        match master.read(&mut buf) {
            Ok(0) | Err(_) => panic!("the terminal closed before {needle:?}: {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_run_runs_a_command_of_the_release_with_its_config_a_terminal_and_its_exit_code() {
    let env = Env::new();
    let up = env.up();
    let dir = example_copy(&env, "python-hello");
    let out = env.em(&["deploy", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = env.em(&[
        "config",
        "set",
        "SOME_CONFIG=from-config",
        "--app",
        "python-hello",
    ]);
    assert!(out.status.success(), "{out:?}");

    // The config reaches the command; em exits with the command's code.
    let started = Instant::now();
    let mut out = em_run(&env, &["--", "sh", "-c", "echo \"$SOME_CONFIG\""]);
    while String::from_utf8_lossy(&out.stdout).trim() != "from-config" {
        // The node may still run v1 (without the var) for a moment after `config set`.
        assert!(started.elapsed() < WAIT, "{out:?}");
        std::thread::sleep(Duration::from_millis(200));
        out = em_run(&env, &["--", "sh", "-c", "echo \"$SOME_CONFIG\""]);
    }
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = em_run(&env, &["--", "sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    let out = em_run(&env, &["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{out:?}");
    let out = em_run(&env, &["--", "no-such-command-here"]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");

    // Piped input reaches the command, and its end ends the command's input.
    let mut cat = env
        .command(&["run", "--app", "python-hello", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(b"piped-in\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped-in\n",
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(0));

    // An app with no release is refused with a sentence saying so.
    let out = env.em(&["run", "--app", "no-such-app", "--", "true"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no-such-app has no current release"),
        "{said}"
    );

    // A terminal: the command gets one of the size em's has, and Ctrl-C reaches it.
    let master = rustix::pty::openpt(
        rustix::pty::OpenptFlags::RDWR
            | rustix::pty::OpenptFlags::NOCTTY
            | rustix::pty::OpenptFlags::CLOEXEC,
    )
    .unwrap();
    rustix::pty::grantpt(&master).unwrap();
    rustix::pty::unlockpt(&master).unwrap();
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
    let name = rustix::pty::ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    let script =
        "tty; stty size; trap 'echo got-INT; exit 7' INT; echo ready; while :; do sleep 0.1; done";
    let mut em = env
        .command(&["run", "--app", "python-hello", "--", "sh", "-c", script])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(master);
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "ready");
    // A terminal: in the app's sandbox, bubblewrap shows it as the sandbox's /dev/console (its
    // /dev/pts is a new, empty instance, so no other terminal of the node is there).
    assert!(
        seen.contains("/dev/pts/") || seen.contains("/dev/console"),
        "{seen:?}"
    );
    assert!(seen.contains("33 101"), "{seen:?}");
    master.write_all(b"\x03").unwrap();
    read_until(&mut master, &mut seen, "got-INT");
    let status = em.wait().unwrap();
    assert_eq!(status.code(), Some(7), "{seen:?}");

    // Killing em ends the remote process within seconds.
    let mut em = env
        .command(&[
            "run",
            "--app",
            "python-hello",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 1000.5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(em.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    // Its pid here: in its sandbox it has a PID namespace of its own, so it cannot say it.
    let remote = sleeping_for("1000.5");
    assert!(pid_alive(remote));
    em.kill().unwrap();
    em.wait().unwrap();
    let start = Instant::now();
    while pid_alive(remote) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the remote process {remote} outlived em"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Detached: em returns at once, the output goes to the app's logs as run.N.
    let out = em_run(&env, &["--detach", "--", "sh", "-c", "echo detached-hello"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("em logs -f --app python-hello"), "{said}");
    let start = Instant::now();
    loop {
        let logs = env.em(&["logs", "--app", "python-hello"]);
        let text = String::from_utf8_lossy(&logs.stdout);
        if text.contains("detached-hello") {
            assert!(text.contains("run."), "{text}");
            break;
        }
        assert!(start.elapsed() < WAIT, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every run is an event: who, what, how it ended.
    let (beacon, token) = env.beacon();
    // Beacon's API serves HTTPS under the CA `em up` made in its data directory.
    let ca = std::fs::read(env.home.path().join("data/platformx/pki/ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        let events: Vec<serde_json::Value> = http
            .get(format!("{beacon}/v1/events?app=python-hello&limit=1000"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages: Vec<String> = events
            .iter()
            .filter(|e| e["kind"] == "run_started" || e["kind"] == "run_finished")
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect();
        let started = messages
            .iter()
            .any(|m| m.contains("started by") && m.contains("exit 3"));
        let finished = messages
            .iter()
            .any(|m| m.contains("exited with code 3") && m.contains("exit 3"));
        let killed = messages.iter().any(|m| m.contains("hung up when em left"));
        if started && finished && killed {
            break;
        }
        assert!(start.elapsed() < WAIT, "{messages:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(up);
}
