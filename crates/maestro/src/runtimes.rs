//! What this host can run: the language runtimes found on `PATH` (reported to Beacon in the
//! `Hello`, for placement), and the check of a release's `runtime` and `requires` against the
//! `PATH` its instances will have (the release's own `bin/` first), made before it starts.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use px_proto::manifest::AppManifest;
use px_proto::runtime::{KNOWN_RUNTIMES, Requirement, Version};

/// How long `<command> --version` may take; a JVM starting cold takes about a second.
pub(crate) const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of `--version` output read.
pub(crate) const MAX_VERSION_OUTPUT: usize = 4096;
/// How long the output of a `--version` that has exited may take to end: a background
/// process it started may hold the pipes open long after.
pub(crate) const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// The first executable file called `command` in the directories of `path`.
pub(crate) fn find(command: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(command))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `<exe> --version` in the environment its instances will have (`path` as `PATH`, and
/// the variables `px_runtime::host::PASSED_ENV` passes through: some runtimes print nothing without
/// `HOME`) and reads the version it prints, on stdout or stderr. It runs in a process group of
/// its own, ended afterwards, so nothing it started is left behind; once it has exited, whatever
/// it started cannot hold the check up by keeping its output open.
pub(crate) async fn version_of(exe: &Path, path: &OsStr) -> Option<Version> {
    use tokio::io::AsyncReadExt;
    // Maestro's ambient capabilities stay behind: this is an operator's program, not an app's.
    let mut command = tokio::process::Command::from(px_runtime::caps::command(exe));
    command
        .arg("--version")
        .env_clear()
        .env("PATH", path)
        .envs(px_runtime::host::env().passed());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let pid = child.id();
    let (mut stdout, mut stderr) = (child.stdout.take()?, child.stderr.take()?);
    let mut out = Vec::new();
    let mut err = Vec::new();
    {
        let limit = MAX_VERSION_OUTPUT as u64;
        let mut stdout = (&mut stdout).take(limit);
        let mut stderr = (&mut stderr).take(limit);
        let read = async {
            let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        };
        let exited = async {
            let _ = child.wait().await;
            tokio::time::sleep(OUTPUT_GRACE).await;
        };
        // What was read by then counts, even when it is cut short.
        let _ = tokio::time::timeout(VERSION_TIMEOUT, async {
            tokio::select! {
                () = read => {}
                () = exited => {}
            }
        })
        .await;
    }
    if let Some(pid) = pid {
        crate::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    }
    out.extend_from_slice(b"\n");
    out.extend_from_slice(&err);
    Version::find_in(&String::from_utf8_lossy(&out))
}

/// The known runtimes found on `path`, with their versions (`"?"` when the version could not
/// be read), for the node's `Hello`.
pub(crate) async fn probe_host(path: &OsStr) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for command in KNOWN_RUNTIMES {
        if let Some(exe) = find(command, path) {
            let version = version_of(&exe, path)
                .await
                .map_or_else(|| "?".to_string(), |v| v.to_string());
            found.insert((*command).to_string(), version);
        }
    }
    found
}

/// Checks every requirement of `manifest` against `path` (the instances' `PATH`). The error
/// names each unmet requirement and what was found instead.
pub async fn check(manifest: &AppManifest, path: &OsStr) -> Result<(), String> {
    let mut unmet = Vec::new();
    for requirement in manifest.requirements() {
        if let Err(problem) = check_one(requirement, path).await {
            unmet.push(problem);
        }
    }
    if unmet.is_empty() {
        Ok(())
    } else {
        Err(unmet.join("; "))
    }
}

async fn check_one(requirement: &Requirement, path: &OsStr) -> Result<(), String> {
    let Some(exe) = find(&requirement.command, path) else {
        return Err(format!(
            "needs {requirement}, but `{}` is not installed (not on PATH)",
            requirement.command
        ));
    };
    if requirement.constraints.is_empty() {
        return Ok(());
    }
    let found = version_of(&exe, path).await;
    if requirement.admits(found.as_ref()) {
        return Ok(());
    }
    Err(match found {
        Some(v) => format!(
            "needs {requirement}, found {} {v} ({})",
            requirement.command,
            exe.display()
        ),
        None => format!(
            "needs {requirement}, but `{} --version` printed no version",
            exe.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> AppManifest {
        AppManifest::parse(&format!("name = \"x\"\n{extra}")).unwrap()
    }

    /// A directory with a fake `tool` that prints `output` for `--version`.
    fn fake_tool(dir: &Path, name: &str, output: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{output}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn the_host_python_is_found_with_its_version() {
        let path = std::env::var_os("PATH").unwrap();
        let found = probe_host(&path).await;
        let python = found
            .get("python3")
            .expect("python3 is on every test machine");
        assert!(Version::parse(python).is_some(), "{python}");
    }

    /// A fake `tool` with its own shell script.
    fn script_tool(dir: &Path, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn the_version_is_read_in_the_environment_instances_get() {
        let bin = tempfile::tempdir().unwrap();
        let home = std::env::var("HOME").expect("HOME is set on every test machine");
        // Like runtimes that cannot start without a home directory.
        script_tool(
            bin.path(),
            "homebound",
            &format!("[ \"$HOME\" = '{home}' ] || exit 1\necho 'homebound 1.2.3'"),
        );
        let found = version_of(&bin.path().join("homebound"), bin.path().as_os_str()).await;
        assert_eq!(found.map(|v| v.to_string()).as_deref(), Some("1.2.3"));
    }

    #[tokio::test]
    async fn what_a_version_command_leaves_running_neither_delays_the_check_nor_survives_it() {
        let bin = tempfile::tempdir().unwrap();
        let pid_file = bin.path().join("helper.pid");
        // Prints its version, then leaves a helper that holds the output open.
        script_tool(
            bin.path(),
            "chatty",
            &format!(
                "echo 'chatty 4.5.6'\nsleep 60 &\necho $! > '{}'",
                pid_file.display()
            ),
        );
        let host = std::env::var_os("PATH").unwrap();
        let path = std::env::join_paths(
            std::iter::once(bin.path().to_path_buf()).chain(std::env::split_paths(&host)),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let found = version_of(&bin.path().join("chatty"), &path).await;
        assert_eq!(found.map(|v| v.to_string()).as_deref(), Some("4.5.6"));
        assert!(
            started.elapsed() < VERSION_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        let helper: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie waiting for whoever adopted it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{helper}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the helper {helper} outlived the check"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn requirements_are_checked_against_the_first_match_on_path() {
        let bundle_bin = tempfile::tempdir().unwrap();
        let host_bin = tempfile::tempdir().unwrap();
        fake_tool(host_bin.path(), "tool", "tool 1.4.2");
        fake_tool(bundle_bin.path(), "tool", "tool version 2.0.1");
        let host_only = host_bin.path().as_os_str().to_owned();
        let bundle_first = std::env::join_paths([bundle_bin.path(), host_bin.path()]).unwrap();

        let wants_two = manifest("runtime = \"tool>=2\"");
        let e = check(&wants_two, &host_only).await.unwrap_err();
        assert!(e.contains("needs tool>=2, found tool 1.4.2"), "{e}");
        // The bundled copy earlier on PATH wins.
        check(&wants_two, &bundle_first).await.unwrap();

        let missing = manifest("requires = [\"ffmpeg-not-installed\", \"tool\"]");
        let e = check(&missing, &host_only).await.unwrap_err();
        assert!(e.contains("`ffmpeg-not-installed` is not installed"), "{e}");
        assert!(!e.contains("tool"), "{e}");
        check(&manifest(""), &host_only).await.unwrap();
    }
}
