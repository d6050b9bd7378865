//! Helpers shared by the builder's tests: settings over a shared installer cache, app trees
//! written from text, layers assembled into a release directory, and running a command from
//! that release with the host's interpreters hidden.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use px_build::{
    BuildError, BuildLimits, BuildRequest, BuilderSettings, Built, RuntimeSources, Sandbox,
};
use px_proto::manifest::AppManifest;

/// The installers' caches and the runtime layers, shared by every test and every run so a
/// rerun is fast; content can be lost at any time (a test passes with it empty).
pub fn shared_cache() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    let dir = PathBuf::from(home).join(".cache/platformx/build-test-cache");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Settings for one test: its own work directory, the shared cache with this app's cached
/// dependency trees removed (so the first build of a test always installs), the host's
/// runtimes, bubblewrap, and the machine's CA bundle.
pub fn settings(work: &Path, app: &str) -> BuilderSettings {
    let cache = shared_cache();
    let _ = fs::remove_dir_all(cache.join("apps").join(app).join("deps"));
    BuilderSettings {
        work_dir: work.to_path_buf(),
        cache_dir: cache.clone(),
        runtimes: RuntimeSources {
            dirs: Vec::new(),
            discover_host: true,
        },
        tools_dir: cache.join("tools"),
        sandbox: Sandbox::Bubblewrap,
        limits: BuildLimits::default(),
        ca_file: std::env::var_os("SSL_CERT_FILE").map(PathBuf::from),
        python_index: None,
        npm_registry: None,
    }
}

/// Writes `files` (path, content) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let path = dir.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
    }
}

pub fn manifest(dir: &Path) -> AppManifest {
    AppManifest::parse(&fs::read_to_string(dir.join("app.toml")).unwrap()).unwrap()
}

/// Runs a build, collecting its output.
pub async fn run_build(
    app: &str,
    number: u64,
    source: &Path,
    settings: &BuilderSettings,
) -> (Result<Built, BuildError>, Vec<String>) {
    let manifest = manifest(source);
    let mut lines = Vec::new();
    let result = {
        let mut output = |line: &str| lines.push(line.to_string());
        px_build::build(
            &BuildRequest {
                app,
                build: number,
                source_dir: source,
                manifest: &manifest,
                uid: None,
            },
            settings,
            &mut output,
        )
        .await
    };
    (result, lines)
}

/// Unpacks every layer of `built` and stacks them into `release` (as a web server does, with
/// hard links).
pub fn assemble(built: &Built, release: &Path) {
    fs::create_dir_all(release).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for (i, layer) in built.layers.iter().enumerate() {
        let dest = scratch.path().join(i.to_string());
        let file = fs::File::open(&layer.archive).unwrap();
        let info = px_bundle::unpack_layer(file, &dest, &px_bundle::Limits::default()).unwrap();
        assert!(info.entries > 0, "{:?} layer is empty", layer.kind);
        link_tree(&dest, release);
    }
}

fn link_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            fs::create_dir_all(&target).unwrap();
            link_tree(&entry.path(), &target);
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            fs::hard_link(entry.path(), &target).unwrap();
        }
    }
}

/// Runs `script` with `sh -c` in `release` as an instance would (the build's `PATH` entries
/// and variables, `{release}` replaced), in bubblewrap with `/root` and `/home` hidden, so
/// the host's pyenv and caches cannot be what makes it work.
pub fn run_in_release(built: &Built, release: &Path, script: &str) -> (bool, String) {
    let mut path: Vec<String> = built
        .path
        .iter()
        .map(|p| release.join(p).display().to_string())
        .collect();
    path.push("/usr/bin:/bin".into());
    let mut command = Command::new("bwrap");
    command
        .args([
            "--ro-bind",
            "/",
            "/",
            "--tmpfs",
            "/root",
            "--tmpfs",
            "/home",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ])
        .arg("--ro-bind")
        .arg(release)
        .arg(release)
        .arg("--chdir")
        .arg(release)
        .args(["--", "/bin/sh", "-c", script])
        .env_clear()
        .env("PATH", path.join(":"))
        .env("HOME", release);
    for (key, value) in &built.env {
        command.env(
            key,
            value.replace("{release}", &release.display().to_string()),
        );
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn make_executable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Whether a process whose command line contains `marker` is still running.
pub fn process_with(marker: &str) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        fs::read(entry.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
            .unwrap_or(false)
    })
}
