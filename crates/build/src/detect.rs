//! What an app is, read from the files at its root: the stack and its installer input, the
//! runtime request and the file it came from, Django, and the `[build]` settings.
//!
//! This is the builder's own minimal detection, shaped like `px_proto::detect` (which is the
//! one place detection will live, shared with `em init` and apprepo): when that lands, `read`
//! becomes a call to it and this module goes away.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use px_proto::manifest::{AppManifest, MANIFEST_FILE};
use px_proto::runtime::Requirement;

use crate::BuildError;

/// Largest root file read for detection; a lockfile of a big Node app is a few megabytes, and
/// anything larger is not a file worth trusting to fit in memory.
pub(crate) const MAX_DETECT_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Which Python installer input the app has, in the order detection prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PythonInput {
    Requirements,
    UvLock,
    PoetryLock,
    PipfileLock,
}

impl PythonInput {
    /// The files whose bytes decide what gets installed (the dependencies key).
    pub(crate) fn files(self) -> &'static [&'static str] {
        match self {
            Self::Requirements => &["requirements.txt"],
            Self::UvLock => &["pyproject.toml", "uv.lock"],
            Self::PoetryLock => &["poetry.lock"],
            Self::PipfileLock => &["Pipfile.lock"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stack {
    Python(PythonInput),
    Node {
        /// `package-lock.json` or `npm-shrinkwrap.json` is there: `npm ci`.
        lockfile: Option<&'static str>,
        /// `scripts.build` in `package.json`.
        build_script: bool,
    },
    /// Nothing to install: only the `[build] command`, if any.
    None,
}

/// The app's runtime request and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeRequest {
    pub requirement: Requirement,
    /// `app.toml`, `.python-version`, `runtime.txt`, `pyproject.toml`, `package.json`.
    pub file: &'static str,
}

/// `[build]` in `app.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildSettings {
    pub command: Option<String>,
    pub collectstatic: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detection {
    pub stack: Stack,
    pub runtime: Option<RuntimeRequest>,
    /// `manage.py` at the root and `django` named in the installer input.
    pub django: bool,
    pub build: BuildSettings,
}

/// Reads the root files of `dir` and detects what the app is.
pub(crate) fn read(dir: &Path, manifest: &AppManifest) -> Result<Detection, BuildError> {
    let file = |name: &str| read_root_file(dir, name);
    let build = build_settings(file(MANIFEST_FILE)?.as_deref())?;

    let stack = if file("requirements.txt")?.is_some() {
        Stack::Python(PythonInput::Requirements)
    } else if file("uv.lock")?.is_some() && file("pyproject.toml")?.is_some() {
        Stack::Python(PythonInput::UvLock)
    } else if file("poetry.lock")?.is_some() {
        Stack::Python(PythonInput::PoetryLock)
    } else if file("Pipfile.lock")?.is_some() {
        Stack::Python(PythonInput::PipfileLock)
    } else if let Some(package) = file("package.json")? {
        let json: serde_json::Value =
            serde_json::from_str(&package).map_err(|e| BuildError::BadInput {
                file: "package.json".into(),
                reason: format!("is not valid JSON ({e})"),
            })?;
        let lockfile = if file("package-lock.json")?.is_some() {
            Some("package-lock.json")
        } else if file("npm-shrinkwrap.json")?.is_some() {
            Some("npm-shrinkwrap.json")
        } else {
            None
        };
        Stack::Node {
            lockfile,
            build_script: json["scripts"]["build"].is_string(),
        }
    } else {
        Stack::None
    };

    let django = match stack {
        Stack::Python(input) if dir.join("manage.py").is_file() => {
            let mut named = false;
            for name in input.files() {
                if let Some(text) = file(name)? {
                    named |= text.to_ascii_lowercase().contains("django");
                }
            }
            named
        }
        _ => false,
    };

    let runtime = runtime_request(&stack, manifest, &file)?;
    Ok(Detection {
        stack,
        runtime,
        django,
        build,
    })
}

/// Reads one root file, `None` when absent; refuses one over [`MAX_DETECT_FILE_BYTES`] or
/// not UTF-8, naming it.
pub(crate) fn read_root_file(dir: &Path, name: &str) -> Result<Option<String>, BuildError> {
    let path = dir.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BuildError::io(format!("reading {}", path.display()), e)),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_DETECT_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| BuildError::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_DETECT_FILE_BYTES {
        return Err(BuildError::BadInput {
            file: name.into(),
            reason: format!("is larger than {MAX_DETECT_FILE_BYTES} bytes"),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| BuildError::BadInput {
            file: name.into(),
            reason: "is not valid UTF-8".into(),
        })
}

/// `[build]` of `app.toml`: read from the file itself, since the manifest type does not carry
/// it yet.
fn build_settings(manifest: Option<&str>) -> Result<BuildSettings, BuildError> {
    let mut settings = BuildSettings {
        command: None,
        collectstatic: true,
    };
    let Some(text) = manifest else {
        return Ok(settings);
    };
    let bad = |reason: String| BuildError::BadInput {
        file: MANIFEST_FILE.into(),
        reason,
    };
    let value: toml::Table = text
        .parse()
        .map_err(|e| bad(format!("is not valid TOML ({e})")))?;
    let Some(build) = value.get("build") else {
        return Ok(settings);
    };
    let table = build
        .as_table()
        .ok_or_else(|| bad("`build` must be a table".into()))?;
    for (key, value) in table {
        match key.as_str() {
            "command" => {
                let command = value
                    .as_str()
                    .ok_or_else(|| bad("`build.command` must be a string".into()))?;
                settings.command = Some(command.to_string()).filter(|c| !c.trim().is_empty());
            }
            "collectstatic" => {
                settings.collectstatic = value
                    .as_bool()
                    .ok_or_else(|| bad("`build.collectstatic` must be true or false".into()))?;
            }
            other => {
                return Err(bad(format!(
                    "`build.{other}` is not a build setting; use `command` or `collectstatic`"
                )));
            }
        }
    }
    Ok(settings)
}

fn runtime_request(
    stack: &Stack,
    manifest: &AppManifest,
    file: &impl Fn(&str) -> Result<Option<String>, BuildError>,
) -> Result<Option<RuntimeRequest>, BuildError> {
    if let Some(requirement) = &manifest.runtime {
        return Ok(Some(RuntimeRequest {
            requirement: requirement.clone(),
            file: MANIFEST_FILE,
        }));
    }
    let request = |file: &'static str,
                   command: &str,
                   spec: &str|
     -> Result<Option<RuntimeRequest>, BuildError> {
        let requirement =
            requirement_from_spec(command, spec).map_err(|reason| BuildError::BadInput {
                file: file.into(),
                reason,
            })?;
        Ok(Some(RuntimeRequest { requirement, file }))
    };
    match stack {
        Stack::Python(_) => {
            if let Some(text) = file(".python-version")? {
                let line = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .unwrap_or("");
                return request(".python-version", "python3", line);
            }
            if let Some(text) = file("runtime.txt")? {
                let line = text.trim();
                let version = line
                    .strip_prefix("python-")
                    .ok_or_else(|| BuildError::BadInput {
                        file: "runtime.txt".into(),
                        reason: format!("{line:?} is not a runtime; write python-3.12.1"),
                    })?;
                return request("runtime.txt", "python3", version);
            }
            if let Some(text) = file("pyproject.toml")?
                && let Ok(table) = text.parse::<toml::Table>()
                && let Some(spec) = table
                    .get("project")
                    .and_then(|p| p.get("requires-python"))
                    .and_then(|v| v.as_str())
            {
                return request("pyproject.toml", "python3", spec);
            }
            Ok(None)
        }
        Stack::Node { .. } => {
            if let Some(text) = file("package.json")?
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(spec) = json["engines"]["node"].as_str()
            {
                return request("package.json", "node", spec);
            }
            Ok(None)
        }
        Stack::None => Ok(None),
    }
}

/// Turns the version specs people write (`3.12`, `>=3.11`, `~=3.11`, `==3.12.*`, `20.x`,
/// `^20.1`, `~20.1`, `>=18 <21`) into a requirement on `command`.
pub(crate) fn requirement_from_spec(command: &str, spec: &str) -> Result<Requirement, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err("names no version".into());
    }
    let mut parts = Vec::new();
    for part in spec
        .split([',', ' '])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let part = part
            .trim_end_matches(".*")
            .trim_end_matches(".x")
            .trim_end_matches(".X");
        if let Some(v) = part.strip_prefix("~=") {
            // Python's compatible release: `~=3.11` is `>=3.11,<4`, `~=3.11.2` is `<3.12`.
            let next = bump(v, v.matches('.').count().saturating_sub(1))
                .ok_or_else(|| format!("{spec:?} is not a version spec"))?;
            parts.push(format!(">={v}"));
            parts.push(format!("<{next}"));
        } else if let Some(v) = part.strip_prefix('^') {
            let next = bump(v, 0).ok_or_else(|| format!("{spec:?} is not a version spec"))?;
            parts.push(format!(">={v}"));
            parts.push(format!("<{next}"));
        } else if let Some(v) = part.strip_prefix('~') {
            let depth = if v.contains('.') { 1 } else { 0 };
            let next = bump(v, depth).ok_or_else(|| format!("{spec:?} is not a version spec"))?;
            parts.push(format!(">={v}"));
            parts.push(format!("<{next}"));
        } else if part.starts_with(['<', '>', '=']) {
            parts.push(part.to_string());
        } else {
            parts.push(format!("=={part}"));
        }
    }
    format!("{command}{}", parts.join(","))
        .parse()
        .map_err(|e: String| format!("{spec:?} is not a version spec ({e})"))
}

/// `3.11` bumped at part `depth` (0 = major): `4`; at depth 1: `3.12`.
fn bump(version: &str, depth: usize) -> Option<String> {
    let parts: Vec<u64> = version
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let depth = depth.min(parts.len().saturating_sub(1));
    let mut out: Vec<u64> = parts[..=depth].to_vec();
    *out.last_mut()? += 1;
    Some(out.iter().map(u64::to_string).collect::<Vec<_>>().join("."))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use px_proto::runtime::Version;

    #[test]
    fn version_specs_become_requirements() {
        let admits = |spec: &str, v: &str| {
            requirement_from_spec("node", spec)
                .unwrap()
                .admits(Some(&Version::parse(v).unwrap()))
        };
        for (spec, yes, no) in [
            ("3.12", "3.12.1", "3.13.0"),
            (">=3.11", "3.13.0", "3.10.13"),
            ("~=3.11", "3.12.1", "4.0"),
            ("==3.12.*", "3.12.9", "3.11.7"),
            ("20.x", "20.20.2", "21.0.0"),
            ("^20.1", "20.20.2", "21.1.0"),
            ("~20.1", "20.1.9", "20.2.0"),
            (">=18 <21", "20.1.0", "22.0.0"),
            ("20", "20.20.2", "18.1.0"),
        ] {
            assert!(admits(spec, yes), "{spec} should admit {yes}");
            assert!(!admits(spec, no), "{spec} should refuse {no}");
        }
        assert!(requirement_from_spec("python3", "pypy3.10").is_err());
        assert!(requirement_from_spec("python3", "").is_err());
    }

    #[test]
    fn build_settings_are_read_and_checked() {
        let s = build_settings(Some(
            "name = \"a\"\n[build]\ncommand = \"make\"\ncollectstatic = false\n",
        ))
        .unwrap();
        assert_eq!(s.command.as_deref(), Some("make"));
        assert!(!s.collectstatic);
        let e = build_settings(Some("[build]\ncolectstatic = false\n")).unwrap_err();
        assert!(e.to_string().contains("build.colectstatic"), "{e}");
    }
}
