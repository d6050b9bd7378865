//! Processes of other types than web (a Procfile's `worker:`, `[processes.<type>]`) run by a real
//! Maestro beside the web instances: restarted after a crash, replaced after web is healthy
//! with their grace honoured, killed and counted when they ignore SIGTERM, and a `stop_first`
//! type never running twice at once. A new formation starts and stops only what it changes,
//! and new host names change only the routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{BundleServer, FakeBeacon, Maestro, assign, wait_event, wait_gone};
use px_proto::link::{AppAssignment, FailureKind, InstanceState, InstanceStatus, NodeEventKind};

/// A worker that says what it does in `$OUT`, one line per step: `<tag> <type>.<n> <what>`.
/// On SIGTERM it finishes its job in hand (`$FINISH` seconds), unless `$IGNORE_TERM` is set.
const WORKER_PY: &str = r#"import os, signal, sys, time
out, tag = os.environ["OUT"], os.environ["TAG"]
me = os.environ["PX_PROCESS"] + "." + os.environ["PX_INSTANCE"]
def log(what):
    with open(out, "a") as f:
        f.write(f"{tag} {me} {what}\n")
stopping = False
def term(*_):
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else term)
log(f"start pid={os.getpid()} port={os.environ.get('PORT', '-')}")
while not stopping:
    print("working", flush=True)
    time.sleep(0.1)
log("stopping")
time.sleep(float(os.environ.get("FINISH", "0")))
log("exit")
"#;

/// The test config without the app sandbox: these tests watch each process through a file of
/// the test's own that the worker writes, and through the pids it reports, which the sandbox
/// hides by design (its own PID namespace, nothing of the host writable). The sandbox's own
/// tests (`sandbox.rs`) run workers and web processes inside it.
fn unsandboxed(dir: &Path, beacon: Option<&FakeBeacon>) -> px_maestro::config::Config {
    let mut config = common::config(dir, beacon);
    config.sandbox.mode = px_maestro::config::SandboxConfig::None;
    config
}

/// The app `shop` at `release`: the test server as web, and the Procfile's `worker:` line (or
/// the type `processes` sets up) running `worker.py`, writing to `out` as `tag`.
fn shop(
    bundles: &BundleServer,
    release: u64,
    processes: &str,
    out: &Path,
    env: &[(&str, &str)],
) -> AppAssignment {
    let manifest = format!(
        "name = \"shop\"\nrun = \"exec python3 server.py \\\"$1\\\"\"\n[health]\ntimeout = \"20s\"\n{processes}"
    );
    let tag = format!("v{release}");
    let mut env = env.to_vec();
    env.extend([("OUT", out.to_str().unwrap()), ("TAG", tag.as_str())]);
    bundles.app(
        "shop",
        release,
        &manifest,
        &[
            ("server.py", common::SERVER_PY),
            ("worker.py", WORKER_PY),
            ("Procfile", "web: unused\nworker: exec python3 worker.py\n"),
        ],
        &env,
    )
}

/// The lines of `out` once `want` holds for them.
async fn wait_lines(out: &Path, want: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    loop {
        let lines: Vec<String> = std::fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if want(&lines) {
            return lines;
        }
        assert!(start.elapsed() < common::WAIT, "never came: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pid a `start` line names.
fn pid_of(line: &str) -> u32 {
    line.split("pid=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The node report's row for `worker.1` once it is in `state`.
async fn wait_process(
    maestro: &Maestro,
    kind: &str,
    want: impl Fn(&InstanceStatus) -> bool,
) -> InstanceStatus {
    let start = Instant::now();
    loop {
        let state = maestro.state().await;
        if let Some(row) = state
            .instances
            .iter()
            .find(|i| i.process == kind && want(i))
        {
            return row.clone();
        }
        assert!(
            start.elapsed() < common::WAIT,
            "no such {kind}: {state:?}\nlogs:{}",
            maestro.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_beside_web_without_a_port_and_is_restarted_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("worker.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    assign(&mut link, 1, vec![shop(&bundles, 1, "", &out, &[])]).await;
    maestro.wait_body("shop.localhost", "hi").await;
    let lines = wait_lines(&out, |l| !l.is_empty()).await;
    assert!(lines[0].starts_with("v1 worker.1 start"), "{lines:?}");
    assert!(
        lines[0].ends_with("port=-"),
        "a worker gets no PORT: {lines:?}"
    );
    let victim = pid_of(&lines[0]);
    // Running once it stayed up past its settle time; listed beside the web instance.
    let row = wait_process(&maestro, "worker", |i| i.state == InstanceState::Healthy).await;
    assert_eq!((row.number, row.release, row.pid), (1, 1, Some(victim)));
    assert_eq!(row.port, None);
    let state = maestro.state().await;
    assert!(state.instances.iter().any(|i| i.is_web() && i.number == 1));
    // Its output is in the app's log, marked with its type and number.
    let stdout = std::fs::read_to_string(maestro.log_dir.join("shop/stdout.log")).unwrap();
    assert!(stdout.contains(" v1 worker.1 working"), "{stdout}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let crashed = wait_event(&mut link, |e| e.kind == NodeEventKind::InstanceCrashed).await;
    assert_eq!(
        crashed.message,
        "shop v1 worker.1 exited (killed by signal 9)"
    );
    assert_eq!(crashed.failure, Some(FailureKind::Signal));
    // Back as a new process after its backoff, with the exit in the report.
    let lines = wait_lines(&out, |l| l.len() >= 2).await;
    assert!(lines[1].starts_with("v1 worker.1 start"), "{lines:?}");
    assert_ne!(pid_of(&lines[1]), victim);
    let row = wait_process(&maestro, "worker", |i| i.restarts == 1).await;
    assert_eq!(row.last_exit.as_ref().and_then(|e| e.signal), Some(9));
    // The web instance was not touched.
    let web = maestro.state().await;
    assert!(web.instances.iter().any(|i| i.is_web() && i.restarts == 0));
    maestro.stop().await;
    wait_gone(pid_of(&lines[1])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_replaced_after_web_is_healthy_and_finishes_its_job_within_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("worker.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    // The node's grace is 2 s; the worker's own 10 s lets it finish a 3 s job.
    let worker = "[processes.worker]\nstop_grace = \"10s\"\n";
    let finish = [("FINISH", "3")];
    assign(&mut link, 1, vec![shop(&bundles, 1, worker, &out, &finish)]).await;
    wait_process(&maestro, "worker", |i| i.state == InstanceState::Healthy).await;

    assign(&mut link, 2, vec![shop(&bundles, 2, worker, &out, &finish)]).await;
    // Web first: the switch, then the new worker, and only then the old one is told to stop.
    let mut order = Vec::new();
    let done = loop {
        let event = wait_event(&mut link, |e| e.release == 2).await;
        order.push((event.kind, event.message.clone()));
        if event.message.contains("previous release is gone") {
            break event;
        }
    };
    let switched = order
        .iter()
        .position(|(k, m)| *k == NodeEventKind::DeployFinished && m.contains("serving"))
        .unwrap();
    let started = order
        .iter()
        .position(|(k, m)| *k == NodeEventKind::InstanceStarted && m.contains("worker.1"))
        .unwrap();
    assert!(switched < started, "{order:?}");
    let lines = wait_lines(&out, |l| l.iter().any(|x| x == "v1 worker.1 exit")).await;
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(
        at("v2 worker.1 start") < at("v1 worker.1 stopping"),
        "start_first: the new one starts before the old one stops: {lines:?}"
    );
    assert!(at("v1 worker.1 stopping") < at("v1 worker.1 exit"));
    // It finished its job within its grace: nothing was killed.
    assert_eq!(
        done.message,
        "shop v2 replaced its 1 process(es) (worker): the previous release is gone, 0 process(es) killed at the end of their stop_grace"
    );
    let state = maestro.state().await;
    let figures = state.rollouts.iter().find(|r| r.release == 2).unwrap();
    assert_eq!(figures.figures.killed, 0);
    let row = wait_process(&maestro, "worker", |i| i.release == 2).await;
    assert_eq!(row.number, 1);
    assert_eq!(
        state
            .instances
            .iter()
            .filter(|i| i.process == "worker")
            .count(),
        1
    );
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_sigterm_is_killed_at_its_grace_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("worker.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    let worker = "[processes.worker]\nstop_grace = \"1s\"\n";
    let stubborn = [("IGNORE_TERM", "1")];
    assign(
        &mut link,
        1,
        vec![shop(&bundles, 1, worker, &out, &stubborn)],
    )
    .await;
    let lines = wait_lines(&out, |l| !l.is_empty()).await;
    let old = pid_of(&lines[0]);
    wait_process(&maestro, "worker", |i| i.state == InstanceState::Healthy).await;

    let replaced = Instant::now();
    assign(&mut link, 2, vec![shop(&bundles, 2, worker, &out, &[])]).await;
    let done = wait_event(&mut link, |e| {
        e.release == 2 && e.message.contains("previous release is gone")
    })
    .await;
    assert!(
        done.message
            .ends_with("1 process(es) killed at the end of their stop_grace"),
        "{}",
        done.message
    );
    assert!(!common::alive(old));
    assert!(
        replaced.elapsed() >= Duration::from_secs(1),
        "killed before its grace ended"
    );
    // It never got to say it stopped: SIGKILL ended it.
    let lines = wait_lines(&out, |l| l.len() >= 2).await;
    assert!(
        !lines.iter().any(|l| l.starts_with("v1 worker.1 stopping")),
        "{lines:?}"
    );
    // The deploy's figures count it, for `em releases`.
    let start = Instant::now();
    loop {
        let state = maestro.state().await;
        if let Some(r) = state.rollouts.iter().find(|r| r.release == 2)
            && r.figures.killed == 1
        {
            break;
        }
        assert!(start.elapsed() < common::WAIT, "{:?}", state.rollouts);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    maestro.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_first_type_never_runs_two_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clock.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    // A clock, from app.toml alone, that takes a second to wind down.
    let clock = "[processes.clock]\ncommand = \"exec python3 worker.py\"\nreplace = \"stop_first\"\nstop_grace = \"5s\"\n";
    let finish = [("FINISH", "1")];
    let with_clock = |release| {
        let mut app = shop(&bundles, release, clock, &out, &finish);
        // This node runs the clock, not the Procfile's worker.
        app.processes.remove("worker");
        app
    };
    assign(&mut link, 1, vec![with_clock(1)]).await;
    wait_process(&maestro, "clock", |i| i.state == InstanceState::Healthy).await;
    assign(&mut link, 2, vec![with_clock(2)]).await;
    // While the old clock winds down, the new one waits, reported as starting.
    let waiting = wait_process(&maestro, "clock", |i| i.release == 2).await;
    assert_eq!(waiting.state, InstanceState::Starting);
    assert_eq!(waiting.pid, None);
    let lines = wait_lines(&out, |l| {
        l.iter().any(|x| x.starts_with("v2 clock.1 start"))
    })
    .await;
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(
        at("v1 clock.1 exit") < at("v2 clock.1 start"),
        "the new clock started before the old one was gone: {lines:?}"
    );
    // No worker ran here at all: it is placed on another node.
    assert!(!lines.iter().any(|l| l.contains("worker.")), "{lines:?}");
    maestro.stop().await;
}

/// The pids of the node report's rows, as `type.number` → pid, once `want` holds for them.
async fn wait_pids(
    maestro: &Maestro,
    want: impl Fn(&std::collections::BTreeMap<String, u32>) -> bool,
) -> std::collections::BTreeMap<String, u32> {
    let start = Instant::now();
    loop {
        let state = maestro.state().await;
        let pids = state
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Healthy)
            .filter_map(|i| Some((format!("{}.{}", i.process, i.number), i.pid?)))
            .collect();
        if want(&pids) {
            return pids;
        }
        assert!(start.elapsed() < common::WAIT, "never came: {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_starts_and_stops_only_what_the_formation_changes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("worker.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    let scaled = |web: u32, workers: &[u32]| {
        let mut app = shop(&bundles, 1, "", &out, &[]);
        app.instances = web;
        app.processes.insert("worker".into(), workers.to_vec());
        app
    };
    let names = |pids: &std::collections::BTreeMap<String, u32>| -> Vec<String> {
        pids.keys().cloned().collect()
    };
    assign(&mut link, 1, vec![scaled(1, &[1])]).await;
    maestro.wait_body("shop.localhost", "hi").await;
    let first = wait_pids(&maestro, |p| p.len() == 2).await;
    assert_eq!(names(&first), ["web.1", "worker.1"]);

    // worker 1 → 3: two more start; web.1 and worker.1 are the same processes.
    assign(&mut link, 2, vec![scaled(1, &[1, 2, 3])]).await;
    let three = wait_pids(&maestro, |p| p.len() == 4).await;
    assert_eq!(names(&three), ["web.1", "worker.1", "worker.2", "worker.3"]);
    assert_eq!(three["web.1"], first["web.1"]);
    assert_eq!(three["worker.1"], first["worker.1"]);

    // worker 3 → 1: the two stop (with their grace), worker.1 and web.1 untouched.
    assign(&mut link, 3, vec![scaled(1, &[1])]).await;
    let one = wait_pids(&maestro, |p| p.len() == 2).await;
    assert_eq!(one, first);
    wait_gone(three["worker.2"]).await;
    wait_gone(three["worker.3"]).await;
    let lines = wait_lines(&out, |l| {
        l.iter().any(|x| x.starts_with("v1 worker.3 exit"))
    })
    .await;
    let starts = lines.iter().filter(|l| l.contains(" start ")).count();
    assert_eq!(
        starts, 3,
        "worker.1 started once, worker.2 and .3 once each: {lines:?}"
    );

    // web 1 → 2: a second instance joins, the worker and web.1 stay; 2 → 1 removes it.
    assign(&mut link, 4, vec![scaled(2, &[1])]).await;
    let two_web = wait_pids(&maestro, |p| p.len() == 3).await;
    assert_eq!(names(&two_web), ["web.1", "web.2", "worker.1"]);
    assert_eq!(two_web["web.1"], first["web.1"]);
    assert_eq!(two_web["worker.1"], first["worker.1"]);
    maestro.wait_body("shop.localhost", "hi").await;
    assign(&mut link, 5, vec![scaled(1, &[1])]).await;
    let back = wait_pids(&maestro, |p| p.len() == 2).await;
    assert_eq!(back, first);
    wait_gone(two_web["web.2"]).await;
    maestro.wait_body("shop.localhost", "hi").await;
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.matches("worker.1 start").count(), 1, "{lines}");
    maestro.stop().await;
    wait_gone(first["worker.1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_host_name_is_routed_without_restarting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("worker.out");
    let bundles = BundleServer::start().await;
    let beacon = FakeBeacon::start().await;
    let maestro = Maestro::start(unsandboxed(dir.path(), Some(&beacon))).await;
    let (mut link, _) = beacon.accept().await;
    let served_on = |domains: &[&str]| {
        let mut app = shop(&bundles, 1, "", &out, &[]);
        app.processes.insert("worker".into(), vec![1]);
        app.domains = domains.iter().map(|d| (*d).to_string()).collect();
        app
    };
    assign(&mut link, 1, vec![served_on(&["shop.localhost"])]).await;
    maestro.wait_body("shop.localhost", "hi").await;
    let first = wait_pids(&maestro, |p| p.len() == 2).await;
    assert_eq!(maestro.get("shop.example.com", "/").await.unwrap().0, 404);

    // `em domains add shop.example.com`: the same release with one more name.
    assign(
        &mut link,
        2,
        vec![served_on(&["shop.localhost", "shop.example.com"])],
    )
    .await;
    maestro.wait_body("shop.example.com", "hi").await;
    maestro.wait_body("shop.localhost", "hi").await;
    assert_eq!(wait_pids(&maestro, |p| p.len() == 2).await, first);

    // Removed again: the name answers 404 and still nothing restarted.
    assign(&mut link, 3, vec![served_on(&["shop.localhost"])]).await;
    let start = Instant::now();
    while maestro.get("shop.example.com", "/").await.unwrap().0 != 404 {
        assert!(
            start.elapsed() < common::WAIT,
            "shop.example.com is still routed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(wait_pids(&maestro, |p| p.len() == 2).await, first);
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.matches("worker.1 start").count(), 1, "{lines}");
    maestro.stop().await;
}
