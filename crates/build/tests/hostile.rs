//! Hostile builds: a `[build] command` that sleeps, allocates, writes, prints or forks without
//! end, or reads what is not its own. Each ends with a clear error and leaves no process
//! behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{process_with, run_build, settings, shared_cache, write_tree};
use px_build::{BuildError, BuilderSettings};

/// An app that is only its `[build] command`: no installer, no runtime layer.
fn command_app(dir: &Path, name: &str, command: &str) {
    let command = command
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    write_tree(
        dir,
        &[(
            "app.toml",
            &format!("name = \"{name}\"\nrun = \"./start\"\n\n[build]\ncommand = \"{command}\"\n"),
        )],
    );
}

async fn hostile(
    app: &str,
    command: &str,
    tune: impl FnOnce(&mut BuilderSettings),
) -> (BuildError, Vec<String>, Duration) {
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    command_app(source.path(), app, command);
    let mut settings = settings(work.path(), app);
    tune(&mut settings);
    let started = Instant::now();
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let took = started.elapsed();
    let e = built.expect_err("a hostile build succeeded");
    (e, output, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_sleeps_forever_hits_the_time_limit_and_leaves_nothing_running() {
    let (e, output, took) = hostile("build-test-sleep", "sleep 31415 & sleep 31416", |s| {
        s.limits.time = Duration::from_secs(3)
    })
    .await;
    assert!(
        matches!(e, BuildError::TimeLimit { seconds: 3 }),
        "{e:?}\n{output:#?}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(e.to_string().contains("time limit of 3 s"), "{e}");
    assert!(
        !process_with("sleep 31415") && !process_with("sleep 31416"),
        "a sleeper survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_allocates_without_end_hits_the_memory_limit() {
    let (e, output, _) = hostile(
        "build-test-memory",
        "python3 -c 'x = []\nwhile True: x.append(bytearray(10 ** 7))'",
        |s| s.limits.memory_bytes = 256 * 1024 * 1024,
    )
    .await;
    assert!(
        matches!(&e, BuildError::MemoryLimit { step, limit_bytes: 268_435_456 } if step == "the [build] command"),
        "{e:?}\n{output:#?}"
    );
    assert!(e.to_string().contains("ran out of memory"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_writes_without_end_hits_the_disk_limit() {
    let (e, output, _) = hostile(
        "build-test-disk",
        "i=0; while true; do head -c 4000000 /dev/zero > fill-$i; i=$((i+1)); sleep 0.05; done",
        |s| s.limits.disk_bytes = 64 * 1024 * 1024,
    )
    .await;
    assert!(
        matches!(
            e,
            BuildError::DiskLimit {
                limit_bytes: 67_108_864
            }
        ),
        "{e:?}\n{output:#?}"
    );
    // One big file is stopped by the same limit, at once.
    let (e, output, took) = hostile("build-test-disk-file", "cat /dev/zero > big", |s| {
        s.limits.disk_bytes = 64 * 1024 * 1024
    })
    .await;
    assert!(
        matches!(e, BuildError::DiskLimit { .. }),
        "{e:?}\n{output:#?}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_prints_without_end_hits_the_output_limit() {
    let (e, output, _) = hostile("build-test-output", "yes px-output-flood", |s| {
        s.limits.output_bytes = 64 * 1024
    })
    .await;
    assert!(
        matches!(
            e,
            BuildError::OutputLimit {
                limit_bytes: 65_536
            }
        ),
        "{e:?}"
    );
    let forwarded: usize = output
        .iter()
        .filter(|l| l.contains("px-output-flood"))
        .map(|l| l.len() + 1)
        .sum();
    assert!(
        forwarded <= 64 * 1024,
        "forwarded {forwarded} bytes past the limit"
    );
    assert!(!process_with("px-output-flood"), "yes survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_forks_without_end_hits_the_process_limit_and_leaves_nothing_running() {
    let (e, output, _) = hostile(
        "build-test-fork",
        "i=0; while [ $i -lt 2000 ]; do sleep 27182 & i=$((i+1)); done; wait",
        |s| s.limits.processes = 32,
    )
    .await;
    assert!(
        matches!(&e, BuildError::ProcessLimit { limit: 32, .. }),
        "{e:?}\n{output:#?}"
    );
    assert!(!process_with("sleep 27182"), "a forked sleeper survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_sees_no_secret_of_the_platform_nor_another_apps_files() {
    // Stand-ins for what a node holds: Maestro's state with its token, another app's cache.
    let state = tempfile::Builder::new()
        .prefix("maestro-state-")
        .tempdir_in(shared_cache())
        .unwrap();
    let token = "px-secret-token-7f3a9c";
    write_tree(state.path(), &[("beacon.token", token)]);
    let other = shared_cache().join("apps/build-test-other-app");
    write_tree(&other, &[("uv/secret", token)]);
    let targets = [
        state.path().join("beacon.token").display().to_string(),
        other.join("uv/secret").display().to_string(),
        "/etc/platformx/maestro.toml".to_string(),
        "/run/credentials/maestro/token".to_string(),
        "/root/.bash_history".to_string(),
        "/etc/shadow".to_string(),
    ];
    let command = format!(
        "for f in {}; do cat \"$f\" || echo \"unreadable: $f\"; done; ls -A /root /home; exit 3",
        targets.join(" ")
    );
    let (e, output, _) = hostile("build-test-secrets", &command, |_| {}).await;
    assert!(
        matches!(&e, BuildError::StepFailed { step, .. } if step == "the [build] command"),
        "{e:?}\n{output:#?}"
    );
    assert!(
        !output.iter().any(|l| l.contains(token)),
        "a secret leaked: {output:#?}"
    );
    for target in &targets {
        assert!(
            output.iter().any(|l| l == &format!("unreadable: {target}")),
            "{target} was readable: {output:#?}"
        );
    }
    // `/root` holds only the parents of the build's own paths; `/home` is not there at all.
    assert!(
        !output
            .iter()
            .any(|l| l == ".pyenv" || l == ".bash_history" || l == ".cargo"),
        "{output:#?}"
    );
    assert!(
        output.iter().any(|l| l.contains("cannot access '/home'")),
        "{output:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_runs_as_nobody_with_a_cleared_environment() {
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    let app = "build-test-whoami";
    command_app(
        source.path(),
        app,
        "id -u; env | sort; test ! -e /etc/platformx",
    );
    let settings = settings(work.path(), app);
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    built.unwrap_or_else(|e| panic!("{e}\n{output:#?}"));
    assert!(output.iter().any(|l| l == "65534"), "{output:#?}");
    let names: Vec<&str> = output
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for name in &names {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "TMPDIR",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD",
                "UV_CACHE_DIR",
                "npm_config_cache",
                "UV_PYTHON_DOWNLOADS",
                "UV_NO_PROGRESS",
                "SSL_CERT_FILE",
                "PIP_CERT",
                "REQUESTS_CA_BUNDLE",
                "NODE_EXTRA_CA_CERTS"
            ]
            .contains(name),
            "{name} leaked into the build: {output:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sandbox_the_limits_still_hold_and_nothing_is_left_running() {
    let (e, output, took) = hostile(
        "build-test-nosandbox",
        "sleep 16180 & echo started; sleep 16181",
        |s| {
            s.sandbox = px_build::Sandbox::None;
            s.limits.time = Duration::from_secs(2);
        },
    )
    .await;
    assert!(
        matches!(e, BuildError::TimeLimit { seconds: 2 }),
        "{e:?}\n{output:#?}"
    );
    assert!(output.iter().any(|l| l == "started"), "{output:#?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        !process_with("sleep 16180") && !process_with("sleep 16181"),
        "a sleeper survived"
    );

    // A command that works leaves its output in the app layer.
    let work = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    let app = "build-test-nosandbox-ok";
    command_app(
        source.path(),
        app,
        "mkdir -p public && echo built > public/index.html",
    );
    let mut settings = settings(work.path(), app);
    settings.sandbox = px_build::Sandbox::None;
    let (built, output) = run_build(app, 1, source.path(), &settings).await;
    let built = built.unwrap_or_else(|e| panic!("{e}\n{output:#?}"));
    assert_eq!(
        built.layers.len(),
        1,
        "only an app layer: no runtime, no dependencies"
    );
    let dest = work.path().join("unpacked");
    px_bundle::unpack_layer(
        std::fs::File::open(&built.layers[0].archive).unwrap(),
        &dest,
        &px_bundle::Limits::default(),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.join("public/index.html")).unwrap(),
        "built\n"
    );
}
