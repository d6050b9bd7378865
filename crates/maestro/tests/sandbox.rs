//! Each app process in a sandbox of its own (`[sandbox] mode = "bubblewrap"`, the default): a
//! real instance tries to read what Maestro keeps, its neighbour's files and processes, to
//! change its release and its limits, and reports what happened; every attempt fails, while
//! what an app needs (writing beside its code, its own `/tmp`, its data directory) works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{BundleServer, FakeBeacon, Maestro, assign, config};
use serde_json::Value;

/// The tenant: a small HTTP app whose `/probe` tries each attack named by the test's
/// variables and answers what happened, as JSON.
const PROBE_PY: &str = r#"
import http.server, json, os, signal, sys

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__}

def read(path):
    with open(path, "rb") as f:
        return f.read(64).decode("latin-1")

def write(path):
    with open(path, "a") as f:
        f.write("tampered")
    return "written"

def probe():
    t = json.loads(os.environ["TARGETS"])
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {
        "uid": os.getuid(),
        "pids": pids,
        "assignment": attempt(lambda: read(t["assignment"])),
        "state_listing": attempt(lambda: os.listdir(t["state_dir"])),
        "token": attempt(lambda: read(t["token"])),
        "neighbour_release": attempt(lambda: read(t["neighbour_file"])),
        "neighbour_environ": attempt(lambda: read("/proc/%d/environ" % t["neighbour_pid"])),
        "signal_neighbour": attempt(lambda: os.kill(t["neighbour_pid"], signal.SIGTERM)),
        "write_own_release": attempt(lambda: write("server.py")),
        "replace_own_release": attempt(lambda: os.rename("probe.py", "gone.py")),
        "cgroupfs": attempt(lambda: os.listdir("/sys/fs/cgroup")),
        "host_tmp": attempt(lambda: read(t["host_tmp_marker"])),
        "etc_shadow": attempt(lambda: read("/etc/shadow")),
        "scratch_before": os.path.exists("scratch.txt"),
        "scratch": attempt(lambda: write("scratch.txt")),
        "tmp": attempt(lambda: write("/tmp/tenant-marker")),
        "data": attempt(lambda: write(os.path.join(os.environ["PX_DATA_DIR"], "kept.txt"))),
        "data_dir": os.environ.get("PX_DATA_DIR"),
    }

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/probe":
            body = json.dumps(probe()).encode()
        elif self.path == "/tmp-marker":
            body = str(os.path.exists("/tmp/tenant-marker")).encode()
        else:
            body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The neighbour: answers `/tmp-marker` with whether the tenant's `/tmp` file is in its own
/// `/tmp`, and `/uid` with its uid.
const NEIGHBOUR_PY: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/tmp-marker":
            body = str(os.path.exists("/tmp/tenant-marker")).encode()
        elif self.path == "/uid":
            body = str(os.getuid()).encode()
        else:
            body = b"neighbour serving"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

fn failed(report: &Value, attack: &str) -> bool {
    report[attack]["ok"] == Value::Bool(false)
}

async fn probe(maestro: &Maestro) -> Value {
    let (status, body) = maestro.get("tenant.localhost", "/probe").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_instance_reaches_nothing_of_the_node_or_its_neighbour_but_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let cfg = config(dir.path(), Some(&beacon));
    let state_dir = cfg.state_dir.clone();
    let token = cfg.repository_token_file.clone().unwrap();
    let maestro = Maestro::start(cfg).await;
    let (mut link, _) = beacon.accept().await;

    let neighbour = bundles.app(
        "neighbour",
        1,
        &common::manifest("neighbour", "exec python3 server.py \"$1\"", "20s"),
        &[
            ("server.py", NEIGHBOUR_PY),
            ("secret.txt", "neighbour's own"),
        ],
        &[("NEIGHBOUR_SECRET", "not for the tenant")],
    );
    assign(&mut link, 1, vec![neighbour.clone()]).await;
    maestro
        .wait_body("neighbour.localhost", "neighbour serving")
        .await;
    let neighbour_pid = maestro.pid("neighbour.localhost").await;
    // A file of the host's own /tmp, which no sandbox shows.
    let host_marker = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host_marker.path(), "host").unwrap();

    let targets = serde_json::json!({
        "assignment": state_dir.join("assignment.json"),
        "state_dir": state_dir,
        "token": token,
        "neighbour_file": state_dir.join("apps/neighbour/releases/1/secret.txt"),
        "neighbour_pid": neighbour_pid,
        "host_tmp_marker": host_marker.path(),
    })
    .to_string();
    let tenant = bundles.app(
        "tenant",
        1,
        &common::manifest("tenant", "exec python3 probe.py \"$1\"", "20s"),
        &[
            ("probe.py", PROBE_PY),
            ("server.py", "# the tenant's own\n"),
        ],
        &[("TARGETS", targets.as_str())],
    );
    assign(&mut link, 2, vec![neighbour.clone(), tenant.clone()]).await;
    maestro.wait_body("tenant.localhost", "ok").await;
    // What the test read of the neighbour's release is really there, for Maestro.
    assert!(
        state_dir
            .join("apps/neighbour/releases/1/secret.txt")
            .is_file()
    );
    assert!(state_dir.join("assignment.json").is_file());

    let report = probe(&maestro).await;
    for attack in [
        "assignment",
        "token",
        "neighbour_release",
        "neighbour_environ",
        "signal_neighbour",
        "write_own_release",
        "replace_own_release",
        "cgroupfs",
        "host_tmp",
        "etc_shadow",
    ] {
        assert!(failed(&report, attack), "{attack} succeeded: {report:#}");
    }
    // Of Maestro's state it sees the empty directories that lead to its own release and
    // data directory, nothing Maestro keeps there.
    let listing = &report["state_listing"]["value"];
    assert!(
        listing
            .as_array()
            .unwrap()
            .iter()
            .all(|name| name == "apps" || name == "data"),
        "{listing}"
    );
    // Its /proc shows its own PID namespace alone: bubblewrap's init and the app.
    let pids: Vec<u64> = report["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(pids.len() <= 3, "{pids:?}");
    assert!(!pids.contains(&u64::from(neighbour_pid)), "{pids:?}");
    // As root, each app runs as a uid of its own, never root.
    let tenant_uid = report["uid"].as_u64().unwrap();
    let neighbour_uid: u64 = maestro
        .get("neighbour.localhost", "/uid")
        .await
        .unwrap()
        .1
        .parse()
        .unwrap();
    if rustix::process::geteuid().is_root() {
        assert_ne!(tenant_uid, 0);
        assert_ne!(tenant_uid, neighbour_uid);
        let uids: Value =
            serde_json::from_slice(&std::fs::read(state_dir.join("app-uids.json")).unwrap())
                .unwrap();
        assert_eq!(uids["apps"]["tenant"].as_u64(), Some(tenant_uid), "{uids}");
        assert_eq!(uids["apps"]["neighbour"].as_u64(), Some(neighbour_uid));
    }
    // What an app needs works: a new file beside its code, its /tmp, its data directory.
    assert!(!failed(&report, "scratch"), "{report:#}");
    assert_eq!(report["scratch_before"], Value::Bool(false));
    assert!(!failed(&report, "tmp"), "{report:#}");
    assert!(!failed(&report, "data"), "{report:#}");
    let data_dir = state_dir.join("data/tenant");
    assert_eq!(report["data_dir"], data_dir.to_str().unwrap());

    // Nothing of it reached the release, the host's /tmp or the neighbour.
    let release = state_dir.join("apps/tenant/releases/1");
    assert_eq!(
        std::fs::read_to_string(release.join("server.py")).unwrap(),
        "# the tenant's own\n"
    );
    assert!(release.join("probe.py").is_file());
    assert!(!release.join("scratch.txt").exists());
    assert!(!std::path::Path::new("/tmp/tenant-marker").exists());
    let (_, seen) = maestro
        .get("neighbour.localhost", "/tmp-marker")
        .await
        .unwrap();
    assert_eq!(seen, "False", "the neighbour's /tmp is its own");
    let (_, seen) = maestro
        .get("tenant.localhost", "/tmp-marker")
        .await
        .unwrap();
    assert_eq!(
        seen, "True",
        "the tenant's /tmp keeps its file while it runs"
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.join("kept.txt")).unwrap(),
        "tampered"
    );
    assert_eq!(
        maestro.get("neighbour.localhost", "/").await.unwrap(),
        (200, "neighbour serving".to_string())
    );
    assert_eq!(maestro.pid("neighbour.localhost").await, neighbour_pid);

    // Restarted (its process killed), the instance no longer sees what it wrote beside its
    // code or in /tmp; its data directory keeps its file.
    let tenant_pid = maestro.pid("tenant.localhost").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tenant_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let start = Instant::now();
    while maestro.pid("tenant.localhost").await == tenant_pid {
        assert!(start.elapsed() < common::WAIT, "the tenant never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, seen) = maestro
        .get("tenant.localhost", "/tmp-marker")
        .await
        .unwrap();
    assert_eq!(seen, "False", "a restarted instance's /tmp is new");
    let again = probe(&maestro).await;
    assert_eq!(again["scratch_before"], Value::Bool(false), "{again:#}");
    assert_eq!(again["uid"], report["uid"], "an app keeps its uid");
    assert_eq!(
        std::fs::read_to_string(data_dir.join("kept.txt")).unwrap(),
        "tamperedtampered"
    );
    maestro.stop().await;
}
