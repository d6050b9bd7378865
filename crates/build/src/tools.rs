//! The builder's own tools: the pinned uv, installed once per builder from the configured
//! Python index (uv is a static binary shipped in a wheel, so pip can install it anywhere).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::BuildError;

/// The uv every Python build uses. Pinned, so the same lockfile installs the same way on every
/// builder, and part of the dependencies key, so a new uv makes new dependency layers.
pub const UV_VERSION: &str = "0.13.9";

/// How long installing uv may take: a 20 MB wheel downloads in seconds; minutes mean the
/// index is unreachable.
const TOOL_INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Most bytes of pip's output kept for an error message.
const MAX_TOOL_OUTPUT_BYTES: usize = 4096;

/// The uv binary for [`UV_VERSION`] under `tools_dir`, installed with
/// `python -m pip install --target` when missing (from `index`, PyPI when `None`, trusting
/// `ca_file` too when given). Installed into a temporary directory renamed into place, so a
/// half-finished install is never used.
pub async fn ensure_uv(
    tools_dir: &Path,
    python: &Path,
    index: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<PathBuf, BuildError> {
    let dest = tools_dir.join(format!("uv-{UV_VERSION}"));
    let uv = dest.join("bin/uv");
    if crate::sandbox::is_executable(&uv) {
        return Ok(uv);
    }
    let failed = |reason: String| BuildError::ToolInstall {
        version: UV_VERSION.into(),
        dir: tools_dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(tools_dir)
        .map_err(|e| failed(format!("creating the directory: {e}")))?;
    let temp = tempfile::Builder::new()
        .prefix(".uv-install-")
        .tempdir_in(tools_dir)
        .map_err(|e| failed(format!("creating a temporary directory: {e}")))?;
    let host = px_runtime::host::env();
    // Without the builder's ambient capabilities (Maestro's, under maestro.service).
    let mut command = tokio::process::Command::from(px_runtime::caps::command(python));
    command
        .args([
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--target",
        ])
        .arg(temp.path())
        .arg(format!("uv=={UV_VERSION}"))
        .env_clear()
        .env("PATH", &host.path)
        .envs(host.passed())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(index) = index {
        command.arg("--index-url").arg(index);
    }
    for (key, value) in ca_env(ca_file) {
        command.env(key, value);
    }
    let output = tokio::time::timeout(TOOL_INSTALL_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            failed(format!(
                "pip did not finish within {} s",
                TOOL_INSTALL_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| failed(format!("cannot run {} -m pip: {e}", python.display())))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        if text.len() > MAX_TOOL_OUTPUT_BYTES {
            let mut start = text.len() - MAX_TOOL_OUTPUT_BYTES;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            text = text[start..].to_string();
        }
        return Err(failed(format!(
            "pip failed ({}): {}",
            output.status,
            text.trim()
        )));
    }
    if !crate::sandbox::is_executable(&temp.path().join("bin/uv")) {
        return Err(failed("pip installed no bin/uv".into()));
    }
    crate::fsutil::publish(&temp.keep(), &dest)?;
    Ok(uv)
}

/// The variables that make Python, uv and npm trust `ca_file`.
pub(crate) fn ca_env(ca_file: Option<&Path>) -> Vec<(String, OsString)> {
    let Some(file) = ca_file else {
        return Vec::new();
    };
    [
        "SSL_CERT_FILE",
        "PIP_CERT",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
    ]
    .iter()
    .map(|key| (key.to_string(), file.as_os_str().to_owned()))
    .collect()
}
