//! The `maestro` binary: `--check-config`, and SIGKILL of Maestro itself — on restart it ends
//! what the killed one left running and serves its persisted assignment again, from the first
//! request on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BundleServer, alive, wait_gone};
use px_proto::link::Assignment;

const BIN: &str = env!("CARGO_BIN_EXE_maestro");

/// The config file. Without the app sandbox: what a killed Maestro leaves running is what this
/// tests, and a sandboxed app leaves nothing (bubblewrap's `--die-with-parent` ends it with
/// Maestro), so the leftovers a restart must end come from a node without the sandbox.
fn write_config(dir: &std::path::Path, http: u16, status: u16) -> std::path::PathBuf {
    let cfg = common::config(dir, None);
    let path = dir.join("maestro.toml");
    std::fs::write(
        &path,
        format!(
            "node_name = \"web-bin\"\nhttp_listen = \"127.0.0.1:{http}\"\nstatus_listen = \"127.0.0.1:{status}\"\nstate_dir = \"{}\"\nlog_dir = \"{}\"\nport_range = [{}, {}]\nstop_grace = \"2s\"\nrepository_token_file = \"{}\"\n[sandbox]\nmode = \"none\"\n",
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

fn spawn(config: &std::path::Path, http: u16) -> Child {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    px_test_support::wait_for_port(http, Duration::from_secs(20)).unwrap();
    child
}

async fn pid_of(http: u16) -> u32 {
    let client = reqwest::Client::new();
    let start = std::time::Instant::now();
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{http}/pid"))
            .header("host", "hello.localhost")
            .send()
            .await
            && r.status() == 200
        {
            return r.text().await.unwrap().parse().unwrap();
        }
        assert!(start.elapsed() < common::WAIT, "the app never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_a_restarted_maestro_leaves_nothing_stale_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let bundles = BundleServer::start().await;
    let (http, status) = (px_test_support::free_port(), px_test_support::free_port());
    let config = write_config(dir.path(), http, status);
    // The assignment a previous run persisted; no Beacon at all.
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let assignment = Assignment {
        generation: 3,
        apps: vec![bundles.python_app("hello", 1, "hi", "")],
        builds: Vec::new(),
        phases: Vec::new(),
    };
    px_maestro::internals::save_assignment(&state_dir, &assignment).unwrap();

    let mut first = spawn(&config, http);
    let orphan = pid_of(http).await;
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        alive(orphan),
        "SIGKILL leaves the app running (systemd's cgroup would end it; here the next maestro must)"
    );

    let mut second = spawn(&config, http);
    // The very first request after the restart is answered by the app, not with a 404 for a
    // host Maestro does not know yet: it accepts connections once the persisted apps serve.
    let first = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{http}/pid"))
        .header("host", "hello.localhost")
        .timeout(common::WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200, "the first request after a restart");
    let fresh: u32 = first.text().await.unwrap().parse().unwrap();
    assert_ne!(fresh, orphan);
    wait_gone(orphan).await;
    // SIGTERM: a clean stop takes the apps with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!alive(fresh), "a stopped maestro leaves no app behind");
}

#[test]
fn check_config_names_the_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1, 2);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The file named by PX_MAESTRO_CONFIG instead of --config, as containers and shells set
    // it: the variable names the file and is not read as a setting of its own.
    let out = Command::new(BIN)
        .env("PX_MAESTRO_CONFIG", &config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &config,
        "port_range = [30000, 20000]\nhttps_listen = \"127.0.0.1:8443\"\nhttps_redirect_port = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("port_range") && err.contains("https_redirect_port"),
        "{err}"
    );
}

#[test]
fn check_config_refuses_a_beacon_table_with_both_addr_and_addrs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1, 2);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "[beacon]\naddr = \"10.0.0.2:7443\"\naddrs = [\"10.0.0.2:7443\", \"10.0.0.3:7443\"]\nca_file = \"/ca.pem\"\ntoken_file = \"/token\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("beacon: give `addr` (one Beacon) or `addrs` (every Beacon), not both"),
        "{err}"
    );
}
