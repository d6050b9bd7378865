//! The runtimes a builder can put in a release: discovery (runtimes directories, and with
//! `discover_host` pyenv, asdf, nvm and `PATH`) and resolution of an app's request (the newest
//! satisfying version, no fallback).

use std::path::{Path, PathBuf};
use std::time::Duration;

use px_proto::runtime::Version;

use crate::sandbox::is_executable;
use crate::{BuildError, RuntimeSources};
use px_proto::detect::RuntimeRequest;

/// How long `python3 -c ...` or `node --version` may take when probing `PATH`: both answer
/// in tens of milliseconds; a hung one must not hold a build.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most entries looked at in one runtimes or versions directory: a real one holds a handful;
/// the bound keeps a directory full of junk from slowing every build.
const MAX_VERSIONS_PER_DIR: usize = 256;

/// Which language a runtime is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Python,
    Node,
}

impl RuntimeKind {
    /// The runtime's name in requests, runtimes directories and the release record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Python => "python3",
            Self::Node => "node",
        }
    }

    /// The interpreter under a prefix's `bin/`.
    fn binary(self) -> &'static str {
        match self {
            Self::Python => "python3",
            Self::Node => "node",
        }
    }

    /// The kind a request's command names.
    pub(crate) fn for_command(command: &str) -> Option<Self> {
        match command {
            "python3" | "python" => Some(Self::Python),
            "node" | "nodejs" => Some(Self::Node),
            _ => None,
        }
    }
}

/// One runtime found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub kind: RuntimeKind,
    pub version: Version,
    /// The installation's prefix (the directory holding `bin/` and `lib/`).
    pub prefix: PathBuf,
    /// The interpreter itself, symlinks resolved.
    pub executable: PathBuf,
    /// Where it was found: `runtimes directory`, `pyenv`, `asdf`, `nvm` or `PATH`.
    pub found_in: &'static str,
}

impl Runtime {
    /// `python3 3.12.1`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.kind.name(), self.version)
    }
}

/// Every runtime `sources` offers, newest first per kind, each installation once.
pub fn discover(sources: &RuntimeSources) -> Vec<Runtime> {
    let mut found = Vec::new();
    for dir in &sources.dirs {
        for kind in [RuntimeKind::Python, RuntimeKind::Node] {
            for name in [kind.name(), alias(kind)] {
                versions_in(&dir.join(name), kind, "runtimes directory", "", &mut found);
            }
        }
    }
    if sources.discover_host {
        if let Some(home) = home() {
            versions_in(
                &home.join(".pyenv/versions"),
                RuntimeKind::Python,
                "pyenv",
                "",
                &mut found,
            );
            versions_in(
                &home.join(".asdf/installs/python"),
                RuntimeKind::Python,
                "asdf",
                "",
                &mut found,
            );
            versions_in(
                &home.join(".asdf/installs/nodejs"),
                RuntimeKind::Node,
                "asdf",
                "",
                &mut found,
            );
            versions_in(
                &home.join(".nvm/versions/node"),
                RuntimeKind::Node,
                "nvm",
                "v",
                &mut found,
            );
        }
        found.extend(probe_path(RuntimeKind::Python));
        found.extend(probe_path(RuntimeKind::Node));
    }
    let mut seen = std::collections::HashSet::new();
    found.retain(|r| seen.insert(r.executable.clone()));
    found.sort_by(|a, b| version_cmp(&b.version, &a.version));
    found
}

/// A version's numbers (`Version` keeps them private; its text is the dotted numbers).
fn version_parts(version: &Version) -> Vec<u64> {
    version
        .to_string()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Compares two versions part by part, missing parts counting as zero.
pub(crate) fn version_cmp(a: &Version, b: &Version) -> std::cmp::Ordering {
    let (a, b) = (version_parts(a), version_parts(b));
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    (0..len)
        .map(|i| at(&a, i).cmp(&at(&b, i)))
        .find(|o| o.is_ne())
        .unwrap_or(std::cmp::Ordering::Equal)
}

/// The other directory name a runtimes directory may use for a kind.
fn alias(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::Python => "python",
        RuntimeKind::Node => "nodejs",
    }
}

fn home() -> Option<PathBuf> {
    px_runtime::host::env()
        .passed()
        .find(|(key, _)| *key == "HOME")
        .map(|(_, value)| PathBuf::from(value))
}

/// `<dir>/<version>/bin/<binary>` entries, the version read from the directory's name (after
/// `prefix`, `v` for nvm). Names that are not versions (`pypy3.10`, `system`) are skipped.
fn versions_in(
    dir: &Path,
    kind: RuntimeKind,
    found_in: &'static str,
    prefix: &str,
    out: &mut Vec<Runtime>,
) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in listing.flatten().take(MAX_VERSIONS_PER_DIR) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(version) = name.strip_prefix(prefix).and_then(Version::parse) else {
            continue;
        };
        // Python 2 is not `python3`.
        if kind == RuntimeKind::Python
            && version_parts(&version)
                .first()
                .is_some_and(|major| *major < 3)
        {
            continue;
        }
        let root = entry.path();
        let binary = root.join("bin").join(kind.binary());
        if !is_executable(&binary) {
            continue;
        }
        let Ok(executable) = std::fs::canonicalize(&binary) else {
            continue;
        };
        out.push(Runtime {
            kind,
            version,
            prefix: root,
            executable,
            found_in,
        });
    }
}

/// `PATH`'s `python3` or `node`, asked for its version, prefix and real executable (a pyenv
/// shim or a Debian alternative leads to the installation behind it).
fn probe_path(kind: RuntimeKind) -> Option<Runtime> {
    let program = crate::sandbox::find_on_path(kind.binary())?;
    let script: &[&str] = match kind {
        RuntimeKind::Python => &[
            "-c",
            "import sys; print(sys.version.split()[0]); print(sys.base_prefix); print(sys.executable)",
        ],
        RuntimeKind::Node => &[
            "-e",
            "console.log(process.version); console.log(process.execPath)",
        ],
    };
    let output = run_with_timeout(&program, script)?;
    let mut lines = output.lines();
    let version = Version::parse(lines.next()?.trim())?;
    let (prefix, executable) = match kind {
        RuntimeKind::Python => {
            let _base = lines.next()?;
            let executable = std::fs::canonicalize(lines.next()?.trim()).ok()?;
            (executable.parent()?.parent()?.to_path_buf(), executable)
        }
        RuntimeKind::Node => {
            let executable = std::fs::canonicalize(lines.next()?.trim()).ok()?;
            (executable.parent()?.parent()?.to_path_buf(), executable)
        }
    };
    Some(Runtime {
        kind,
        version,
        prefix,
        executable,
        found_in: "PATH",
    })
}

/// Runs a probe with the builder's `PATH` and passed-on variables only, killed after
/// [`PROBE_TIMEOUT`].
fn run_with_timeout(program: &Path, args: &[&str]) -> Option<String> {
    let host = px_runtime::host::env();
    // Without the builder's ambient capabilities (Maestro's, under maestro.service).
    let mut child = px_runtime::caps::command(program)
        .args(args)
        .env_clear()
        .env("PATH", &host.path)
        .envs(host.passed())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if started.elapsed() > PROBE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut text = String::new();
    use std::io::Read;
    child
        .stdout
        .take()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The runtime a build uses: the newest of `kind` satisfying the request (any, without one).
pub(crate) fn resolve<'a>(
    kind: RuntimeKind,
    request: Option<&RuntimeRequest>,
    found: &'a [Runtime],
) -> Result<&'a Runtime, BuildError> {
    let mut candidates = found.iter().filter(|r| r.kind == kind);
    let chosen = match request {
        Some(request) => candidates.find(|r| request.requirement.admits(Some(&r.version))),
        None => candidates.next(),
    };
    chosen.ok_or_else(|| {
        let mut versions: Vec<String> = found
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.version.to_string())
            .collect();
        versions.dedup();
        BuildError::RuntimeUnavailable {
            file: request
                .map_or("the detected stack", |r| r.source.file())
                .to_string(),
            request: request.map_or_else(|| kind.name().to_string(), |r| r.requirement.to_string()),
            name: kind.name().to_string(),
            available: if versions.is_empty() {
                "none".into()
            } else {
                versions.join(", ")
            },
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use px_proto::detect::RuntimeSource;

    fn runtime(version: &str) -> Runtime {
        Runtime {
            kind: RuntimeKind::Python,
            version: Version::parse(version).unwrap(),
            prefix: PathBuf::from(format!("/r/{version}")),
            executable: PathBuf::from(format!("/r/{version}/bin/python3")),
            found_in: "runtimes directory",
        }
    }

    #[test]
    fn the_newest_satisfying_version_wins_and_nothing_else_does() {
        let found = vec![
            runtime("3.13.0"),
            runtime("3.12.9"),
            runtime("3.12.1"),
            runtime("3.11.7"),
        ];
        let request = |spec: &str| RuntimeRequest {
            requirement: format!("python3{spec}").parse().unwrap(),
            source: RuntimeSource::PythonVersionFile,
        };
        assert_eq!(
            resolve(RuntimeKind::Python, Some(&request("==3.12")), &found)
                .unwrap()
                .version
                .to_string(),
            "3.12.9"
        );
        assert_eq!(
            resolve(RuntimeKind::Python, None, &found)
                .unwrap()
                .version
                .to_string(),
            "3.13.0"
        );
        let e = resolve(RuntimeKind::Python, Some(&request("==3.99")), &found).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(".python-version")
                && text.contains("3.99")
                && text.contains("3.13.0, 3.12.9, 3.12.1, 3.11.7"),
            "{text}"
        );
        let e = resolve(RuntimeKind::Node, None, &found).unwrap_err();
        assert!(e.to_string().contains("it has none"), "{e}");
    }

    #[test]
    fn a_runtimes_directory_is_read_by_name_and_version() {
        let dir = tempfile::tempdir().unwrap();
        for (name, version, binary) in [
            ("python3", "3.12.1", "python3"),
            ("node", "20.1.0", "node"),
            ("python3", "junk", "python3"),
            ("node", "18.0.0", "missing"),
        ] {
            let bin = dir.path().join(name).join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join(binary), b"#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(bin.join(binary), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let found = discover(&RuntimeSources {
            dirs: vec![dir.path().to_path_buf()],
            discover_host: false,
        });
        let names: Vec<String> = found.iter().map(Runtime::describe).collect();
        assert_eq!(names, ["node 20.1.0", "python3 3.12.1"]);
    }
}
