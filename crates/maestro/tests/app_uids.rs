//! A Maestro that is not root but holds `CAP_SETUID`, `CAP_SETGID`, `CAP_CHOWN` and `CAP_KILL`
//! as ambient capabilities, as `maestro.service` starts it: the real binary, started so by
//! `setpriv` under an unprivileged uid, runs two apps. Each app's processes are a uid of their
//! own, neither Maestro's nor the other app's, and hold no capability (read from outside in
//! `/proc/<pid>/status` and from inside by the app); that uid, as an app that escaped its
//! sandbox would be, reads nothing of Maestro's state nor of the other app's files; and
//! Maestro, signalling processes of other uids, stops them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BundleServer, alive, wait_gone};
use px_proto::link::Assignment;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_maestro");
/// The unprivileged uid (and gid) Maestro runs as here, as `px-maestro` under systemd.
const MAESTRO_UID: u32 = 65534;
/// The capabilities `maestro.service` gives Maestro, in `setpriv`'s words.
const MAESTRO_CAPS: &str = "+setuid,+setgid,+chown,+kill";
/// Those four as a `/proc/<pid>/status` mask: CAP_CHOWN (0), CAP_KILL (5), CAP_SETGID (6) and
/// CAP_SETUID (7).
const MAESTRO_CAP_MASK: u64 = 0xe1;

/// An app answering `/` with its name and `/status` with its own `/proc/self/status`.
const APP_PY: &str = r#"import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/status":
            body = open("/proc/self/status").read().encode()
        else:
            body = os.environ["PX_APP"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The config file: the app sandbox, everything under `dir`.
fn write_config(dir: &Path, http: u16, status: u16) -> PathBuf {
    let cfg = common::config(dir, None);
    let path = dir.join("maestro.toml");
    std::fs::write(
        &path,
        format!(
            "node_name = \"web-uids\"\nhttp_listen = \"127.0.0.1:{http}\"\nstatus_listen = \"127.0.0.1:{status}\"\nstate_dir = \"{}\"\nlog_dir = \"{}\"\nport_range = [{}, {}]\nstop_grace = \"2s\"\nrepository_token_file = \"{}\"\n[sandbox]\nmode = \"bubblewrap\"\n",
            cfg.state_dir.display(),
            cfg.log_dir.display(),
            cfg.port_range.0,
            cfg.port_range.1,
            cfg.repository_token_file.unwrap().display()
        ),
    )
    .unwrap();
    path
}

/// Gives `path` and everything under it to `uid`.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

/// `setpriv` words that make the command `uid` with `caps` ambient (none when empty).
fn as_user(uid: u32, caps: &str) -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
    ]);
    if !caps.is_empty() {
        command.args([
            format!("--inh-caps={caps}"),
            format!("--ambient-caps={caps}"),
        ]);
    }
    command.arg("--");
    command
}

/// The capability sets and uid a `/proc/<pid>/status` text shows.
fn caps_and_uid(status: &str) -> (px_runtime::caps::CapSets, u32) {
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap();
    (px_runtime::caps::CapSets::parse(status), uid)
}

/// `pid` and every process below it, from `/proc`.
fn tree(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit(')').next()?.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if ppid == Some(parent) {
                found.push(child);
            }
        }
        i += 1;
    }
    found
}

async fn get(http: u16, app: &str, path: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{http}{path}"))
        .header("host", format!("{app}.localhost"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// The pid of `app`'s healthy web instance (its sandbox's leader), from Maestro's state.
async fn instance_pid(status: u16, app: &str) -> u32 {
    let start = std::time::Instant::now();
    loop {
        let state: Option<Value> = async {
            reqwest::get(format!("http://127.0.0.1:{status}/v1/state"))
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        let pid = state.as_ref().and_then(|s| {
            s["instances"].as_array()?.iter().find_map(|i| {
                (i["app"] == app && i["state"] == "healthy").then(|| i["pid"].as_u64())?
            })
        });
        if let Some(pid) = pid {
            return pid as u32;
        }
        assert!(
            start.elapsed() < common::WAIT,
            "{app} never became healthy: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maestro_holding_setuid_runs_each_app_as_its_own_uid_without_capabilities() {
    // Giving a process capabilities it did not have takes root; so does every sandbox test.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to start Maestro with ambient capabilities");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let (http, status) = (px_test_support::free_port(), px_test_support::free_port());
    let config = write_config(dir.path(), http, status);
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let app = |name: &str| {
        bundles.app(
            name,
            1,
            &common::manifest(name, "exec python3 server.py \"$1\"", "20s"),
            &[("server.py", APP_PY), ("secret.txt", "this app's own")],
            &[],
        )
    };
    let assignment = Assignment {
        generation: 1,
        apps: vec![app("alpha"), app("beta")],
        builds: Vec::new(),
        phases: Vec::new(),
    };
    px_maestro::internals::save_assignment(&state_dir, &assignment).unwrap();
    // A file alpha wrote in its data directory while it ran as Maestro's user.
    let earlier = state_dir.join("data/alpha/earlier.db");
    std::fs::create_dir_all(earlier.parent().unwrap()).unwrap();
    std::fs::write(&earlier, "alpha's").unwrap();
    // As a previous Maestro under the unit's UMask=0077 would have left them.
    for (path, mode) in [
        (state_dir.join("assignment.json"), 0o600),
        (earlier.clone(), 0o600),
        (state_dir.join("data/alpha"), 0o700),
        (state_dir.join("data"), 0o700),
        (state_dir.clone(), 0o700),
    ] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    // The binary where Maestro's uid can run it (the target directory may be under /root).
    let bin = dir.path().join("maestro");
    std::fs::copy(BIN, &bin).unwrap();
    chown_tree(dir.path(), MAESTRO_UID);
    // Its log in a file, read when it fails: a pipe nobody reads could fill and stop it.
    let log = dir.path().join("maestro.log");
    let log_file = std::fs::File::create(&log).unwrap();

    // With the unit's UMask=0077, so what Maestro writes is as private as under systemd.
    let mut maestro: Child = as_user(MAESTRO_UID, MAESTRO_CAPS)
        .args(["/bin/sh", "-c", "umask 077 && exec \"$@\"", "maestro"])
        .arg(&bin)
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", px_runtime::host::DEFAULT_PATH)
        .env("HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let (alpha, beta) = (
        instance_pid(status, "alpha").await,
        instance_pid(status, "beta").await,
    );
    let (held, maestro_uid) =
        caps_and_uid(&std::fs::read_to_string(format!("/proc/{}/status", maestro.id())).unwrap());
    assert_eq!(maestro_uid, MAESTRO_UID);
    assert_eq!(
        held.ambient, MAESTRO_CAP_MASK,
        "Maestro holds what the unit gives"
    );

    // From outside: every process of each app's sandbox is the app's uid, with nothing held.
    let mut uids = Vec::new();
    for (name, leader) in [("alpha", alpha), ("beta", beta)] {
        let processes = tree(leader);
        assert!(
            processes.len() >= 2,
            "{name}: bubblewrap and the app: {processes:?}"
        );
        let mut seen = std::collections::BTreeSet::new();
        for pid in processes {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let (caps, uid) = caps_and_uid(&text);
            assert_eq!(
                (
                    caps.inheritable,
                    caps.permitted,
                    caps.effective,
                    caps.ambient
                ),
                (0, 0, 0, 0),
                "{name}'s process {pid} holds capabilities:\n{text}"
            );
            seen.insert(uid);
        }
        assert_eq!(seen.len(), 1, "{name}'s processes are one uid: {seen:?}");
        let uid = *seen.first().unwrap();
        assert!(uid != 0 && uid != MAESTRO_UID, "{name} runs as {uid}");
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "each app has a uid of its own");
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("app-uids.json")).unwrap()).unwrap();
    assert_eq!(recorded["apps"]["alpha"].as_u64(), Some(u64::from(uids[0])));

    // From inside: the app sees no capability in its own status either.
    let inside = get(http, "alpha", "/status").await.unwrap();
    let (caps, _) = caps_and_uid(&inside);
    assert_eq!(caps, px_runtime::caps::CapSets::default(), "{inside}");

    // What Maestro keeps stays its own; each app's directories are the app's alone.
    for secret in ["assignment.json", "app-uids.json"] {
        let meta = std::fs::metadata(state_dir.join(secret)).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o077),
            (MAESTRO_UID, 0),
            "{secret}"
        );
    }
    let data = std::fs::metadata(state_dir.join("data/alpha")).unwrap();
    assert_eq!((data.uid(), data.mode() & 0o777), (uids[0], 0o700));
    assert_eq!(
        std::fs::metadata(&earlier).unwrap().uid(),
        uids[0],
        "what alpha wrote before it had a uid of its own is its own"
    );
    let releases = std::fs::metadata(state_dir.join("apps/alpha")).unwrap();
    assert_eq!(
        (releases.uid(), releases.gid(), releases.mode() & 0o777),
        (MAESTRO_UID, uids[0], 0o710)
    );

    // alpha's uid outside any sandbox, as an app that escaped its own would be: it reaches
    // its own release and data directory, and nothing of Maestro's or of beta's.
    let reads = |path: PathBuf| {
        as_user(uids[0], "")
            .args(["cat", path.to_str().unwrap()])
            .stderr(Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(reads(state_dir.join("apps/alpha/releases/1/secret.txt")));
    std::fs::write(state_dir.join("data/beta/kept.txt"), "beta's").unwrap();
    for path in [
        "assignment.json",
        "app-uids.json",
        "apps/beta/releases/1/secret.txt",
        "data/beta/kept.txt",
    ] {
        assert!(!reads(state_dir.join(path)), "alpha's uid read {path}");
    }
    let lists = |path: &Path| {
        as_user(uids[0], "")
            .arg("ls")
            .arg(path)
            .stderr(Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!lists(&state_dir), "alpha's uid listed Maestro's state");
    assert!(
        !lists(&state_dir.join("data")),
        "alpha's uid listed the data directories"
    );

    // SIGTERM: Maestro stops every app, processes of other uids, and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(maestro.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::task::spawn_blocking(move || maestro.wait().unwrap())
        .await
        .unwrap();
    assert!(
        exit.success(),
        "{exit:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for pid in [alpha, beta] {
        wait_gone(pid).await;
        assert!(!alive(pid));
    }
}
