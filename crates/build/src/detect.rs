//! What the builder needs of [`px_proto::detect`]: the detection of the copied source (its root
//! files collected as its bundle holds them), and the files each installer input is keyed by.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use px_proto::detect::{
    Detection, PIPFILE_LOCK, POETRY_LOCK, PYPROJECT_TOML, PythonInput, REQUIREMENTS_TXT, UV_LOCK,
};
use px_proto::manifest::AppManifest;

use crate::BuildError;

/// Largest lockfile the builder reads itself (a `poetry.lock` or `Pipfile.lock` it turns into
/// requirements): a big app's lockfile is a few MiB; more is no lockfile worth trusting to
/// memory.
const MAX_LOCKFILE_BYTES: u64 = 16 * 1024 * 1024;

/// Detects what the app in `dir` is, exactly as `em init` and apprepo do.
pub(crate) fn read(dir: &Path, manifest: &AppManifest) -> Result<Detection, BuildError> {
    let files = px_bundle::root_files(dir).map_err(BuildError::Source)?;
    Ok(px_proto::detect::detect(Some(manifest), &files)?)
}

/// The files whose bytes decide what a Python input installs (the dependencies key).
pub(crate) fn key_files(input: PythonInput) -> &'static [&'static str] {
    match input {
        PythonInput::Requirements => &[REQUIREMENTS_TXT],
        PythonInput::UvLock => &[PYPROJECT_TOML, UV_LOCK],
        PythonInput::PoetryLock => &[POETRY_LOCK],
        PythonInput::PipfileLock => &[PIPFILE_LOCK],
    }
}

/// Reads a lockfile at the root of `dir`, refusing one over [`MAX_LOCKFILE_BYTES`] or not
/// UTF-8, naming it.
pub(crate) fn read_lockfile(dir: &Path, name: &str) -> Result<String, BuildError> {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_LOCKFILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| BuildError::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_LOCKFILE_BYTES {
        return Err(BuildError::BadInput {
            file: name.into(),
            reason: format!("is larger than {MAX_LOCKFILE_BYTES} bytes"),
        });
    }
    String::from_utf8(bytes).map_err(|_| BuildError::BadInput {
        file: name.into(),
        reason: "is not valid UTF-8".into(),
    })
}
