//! A build's commands run as the uid they are given, outside their sandbox too, holding no
//! capability, and what they leave (even closed to others) is packed: with a builder running
//! as root, and with one running as an unprivileged user that holds the ambient capabilities
//! `maestro.service` gives Maestro (this test started again through `setpriv`, as
//! `crates/maestro/tests/app_uids.rs` starts Maestro). Two apps' builds get two uids.
//!
//! A plain `main` (`harness = false` in Cargo.toml): the second half is this program started
//! again as another user, which one process running tests in threads cannot become.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assemble, manifest, settings, write_tree};
use px_build::BuildRequest;
use px_proto::build::LayerKind;
use px_runtime::caps::CapSets;

/// Set in the environment of this program started again: the directory to build in.
const CHILD_VAR: &str = "PX_BUILD_UID_TEST_DIR";
/// Who the unprivileged builder is (Maestro's stand-in: `px-maestro` is a system user).
const BUILDER_UID: u32 = 65534;
/// The uids the two apps' builds are given (from the range Maestro hands apps).
const APP_UIDS: [u32; 2] = [1_860_000_101, 1_860_000_102];
/// The capabilities `maestro.service` gives Maestro, in `setpriv`'s words.
const MAESTRO_CAPS: &str = "+setuid,+setgid,+chown,+kill";
/// What the build command leaves, closed to everyone but its own uid.
const CLOSED_FILE: &str = "closed/file";
const CLOSED_TEXT: &str = "made by the build";
/// How long the build command of app `i` sleeps, as `sleep`'s argument: `2.<i>1` seconds,
/// long enough to be found in `/proc`, and a mark no other process has.
fn sleep_mark(i: usize) -> String {
    format!("2.{i}1")
}
/// How long the watcher looks for the build command's process.
const WATCH_FOR: Duration = Duration::from_secs(60);

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_VAR) {
        let dir = Path::new(&dir);
        for line in build_both(dir).into_iter().chain(build_python(dir)) {
            println!("{line}");
        }
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to give builds uids of their own");
        return;
    }
    a_root_builder_runs_each_build_as_its_uid_without_capabilities();
    a_builder_holding_maestros_capabilities_runs_each_build_as_its_uid_without_capabilities();
    println!("test result: ok. 2 passed");
}

/// The `/proc/<pid>/status` of the process running `sleep <mark>`, seen from outside every
/// sandbox (inside one, bubblewrap's nested user namespaces hide the uid outside).
fn watch(mark: String) -> String {
    let until = Instant::now() + WATCH_FOR;
    let wanted = format!("sleep\0{mark}\0");
    while Instant::now() < until {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let path = entry.path();
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            if cmdline == wanted.as_bytes()
                && let Ok(status) = std::fs::read_to_string(path.join("status"))
            {
                return status;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no process ran `sleep {mark}` within {WATCH_FOR:?}");
}

/// Builds one app per uid of [`APP_UIDS`] under `dir`; what each build command's process is
/// (its `/proc` status from outside) and what its release holds at [`CLOSED_FILE`], as lines
/// `<uid> <line>`.
fn build_both(dir: &Path) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut lines = Vec::new();
    for (i, uid) in APP_UIDS.into_iter().enumerate() {
        let app = format!("build-test-uid-{i}");
        let source = dir.join(format!("source-{i}"));
        let command = format!(
            "umask 077 && mkdir -p closed && echo '{CLOSED_TEXT}' > {CLOSED_FILE} && sleep {}",
            sleep_mark(i)
        );
        write_tree(
            &source,
            &[(
                "app.toml",
                &format!(
                    "name = \"{app}\"\nrun = \"./start\"\n\n[build]\ncommand = \"{command}\"\n"
                ),
            )],
        );
        // The builder's own cache: the shared one of the other tests is under root's home.
        let mut settings = settings(&dir.join(format!("work-{i}")), &app);
        settings.cache_dir = dir.join("cache");
        settings.tools_dir = dir.join("tools");
        let manifest = manifest(&source);
        let mark = sleep_mark(i);
        let watcher = std::thread::spawn(move || watch(mark));
        let mut output = Vec::new();
        let built = runtime.block_on(px_build::build(
            &BuildRequest {
                app: &app,
                build: 1,
                source_dir: &source,
                manifest: &manifest,
                uid: Some(uid),
            },
            &settings,
            &mut |line: &str| output.push(line.to_string()),
        ));
        let built = built.unwrap_or_else(|e| panic!("{e}\n{output:#?}"));
        let release = dir.join(format!("release-{i}"));
        assemble(&built, &release);
        let left = std::fs::read_to_string(release.join(CLOSED_FILE)).unwrap();
        output.push(format!("LEFT {}", left.trim()));
        output.extend(watcher.join().unwrap().lines().map(str::to_string));
        lines.extend(output.into_iter().map(|line| format!("{uid} {line}")));
    }
    lines
}

/// Builds the uv-locked fixture (`six` pinned) twice as [`APP_UIDS`]`[0]` under `dir`, the
/// second time from the app's kept dependencies: what the builder shares with the uid (the
/// runtime's copy, the pinned uv) and lends it (the caches) must do for a real install. One
/// line: `PY` with whether the second release holds `six` and took it from the kept
/// dependencies, or why a build failed.
fn build_python(dir: &Path) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = "build-test-uid-py";
    let source = dir.join("source-py");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uvlock");
    std::fs::create_dir_all(&source).unwrap();
    for file in ["app.py", "pyproject.toml", "uv.lock", ".python-version"] {
        std::fs::copy(fixture.join(file), source.join(file)).unwrap();
    }
    write_tree(
        &source,
        &[(
            "app.toml",
            &format!("name = \"{app}\"\nrun = \"python3 app.py\"\n"),
        )],
    );
    let mut settings = settings(&dir.join("work-py"), app);
    settings.cache_dir = dir.join("cache");
    settings.tools_dir = dir.join("tools");
    let manifest = manifest(&source);
    let mut last = String::new();
    for build in 1..=2 {
        let mut output = Vec::new();
        let built = runtime.block_on(px_build::build(
            &BuildRequest {
                app,
                build,
                source_dir: &source,
                manifest: &manifest,
                uid: Some(APP_UIDS[0]),
            },
            &settings,
            &mut |line: &str| output.push(line.to_string()),
        ));
        let built = match built {
            Ok(built) => built,
            Err(e) => return vec![format!("PY build {build} failed: {e}: {output:?}")],
        };
        let release = dir.join(format!("release-py-{build}"));
        assemble(&built, &release);
        // Not run here: bubblewrap refuses to start under a user holding capabilities.
        let six = find(&release, "six.py").is_some();
        let reused = built
            .layers
            .iter()
            .any(|layer| layer.kind == LayerKind::Dependencies && layer.reused);
        last = format!("PY six installed: {six}, reused: {reused}");
    }
    vec![last]
}

/// The first file called `name` under `dir`.
fn find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            return Some(path);
        }
        if entry.file_type().is_ok_and(|kind| kind.is_dir())
            && let Some(found) = find(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// Checks what each build's command was: its uid outside any namespace is the one it was
/// given (neither the builder's nor the other app's), it holds no capability, and what it
/// left closed to others was packed.
fn check(lines: &[String], builder: u32) {
    for uid in APP_UIDS {
        let own: Vec<&str> = lines
            .iter()
            .filter_map(|line| line.strip_prefix(&format!("{uid} ")))
            .collect();
        let status = own.join("\n");
        assert!(status.contains("CapAmb:"), "no status:\n{status}");
        let caps = CapSets::parse(&status);
        assert_eq!(
            caps,
            CapSets::default(),
            "uid {uid} holds capabilities:\n{status}"
        );
        let ids: Vec<u32> = own
            .iter()
            .find_map(|line| line.strip_prefix("Uid:"))
            .map(|ids| {
                ids.split_whitespace()
                    .map(|id| id.parse().unwrap())
                    .collect()
            })
            .unwrap_or_else(|| panic!("no Uid line:\n{status}"));
        assert_eq!(
            ids, [uid; 4],
            "real, effective, saved and file uid:\n{status}"
        );
        assert_ne!(uid, builder);
        assert!(
            own.contains(&format!("LEFT {CLOSED_TEXT}").as_str()),
            "what the build left was not packed:\n{status}"
        );
    }
}

fn a_root_builder_runs_each_build_as_its_uid_without_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    check(&build_both(dir.path()), 0);
}

fn a_builder_holding_maestros_capabilities_runs_each_build_as_its_uid_without_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    chown_tree(dir.path(), BUILDER_UID);
    let output = Command::new("setpriv")
        .args([
            format!("--reuid={BUILDER_UID}"),
            format!("--regid={BUILDER_UID}"),
            "--clear-groups".into(),
            format!("--inh-caps={MAESTRO_CAPS}"),
            format!("--ambient-caps={MAESTRO_CAPS}"),
            "--".into(),
        ])
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_VAR, dir.path())
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    check(&lines, BUILDER_UID);
    let python = lines.iter().find(|line| line.starts_with("PY "));
    assert_eq!(
        python.map(String::as_str),
        Some("PY six installed: true, reused: true"),
        "{stdout}"
    );
    // Between builds the app's kept dependencies are the builder's again, and another app's
    // uid cannot read them.
    let deps = dir.path().join("cache/apps/build-test-uid-py/deps");
    let six = find(&deps, "six.py").expect("six in the kept dependencies");
    let meta = std::fs::metadata(&deps).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o007), (BUILDER_UID, 0));
    let neighbour = Command::new("setpriv")
        .args([
            format!("--reuid={}", APP_UIDS[1]),
            format!("--regid={}", APP_UIDS[1]),
            "--clear-groups".into(),
            "--".into(),
            "cat".into(),
        ])
        .arg(&six)
        .output()
        .unwrap();
    assert!(
        !neighbour.status.success(),
        "another app's uid read {}",
        six.display()
    );
    assert!(
        String::from_utf8_lossy(&neighbour.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&neighbour.stderr)
    );
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
