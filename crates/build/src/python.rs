//! Python apps: the installer input turned into requirements (`requirements.txt` as is, `uv
//! export --frozen` of a `uv.lock` checked against `pyproject.toml` first, the main packages
//! of `poetry.lock`, `Pipfile.lock`'s `default`), `uv pip install --prefix .px/deps` with the
//! release's own interpreter (the modules compiled to hash-checked bytecode), scripts made to
//! run from any release directory, and Django's `collectstatic`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use crate::BuildError;
use px_proto::detect::{PYPROJECT_TOML, PythonInput, UV_LOCK};

use crate::detect::{key_files, read_lockfile};
use crate::error::IoContext;
use crate::runtime_layer::RuntimeLayer;
use crate::sandbox::{Jail, Step};

/// The shebang installed scripts get: the release's `PATH` starts with `.px/runtime/bin`, so
/// this finds the release's interpreter wherever the release directory is.
const PORTABLE_SHEBANG: &str = "#!/usr/bin/env python3";
/// Largest script whose shebang is rewritten; console scripts are a few hundred bytes, and a
/// big binary in `bin/` is left alone.
const MAX_SCRIPT_BYTES: u64 = 1024 * 1024;

/// The file the installer reads, written under the build directory when the app's input is a
/// lockfile: `uv pip install -r` takes requirements.
const GENERATED_REQUIREMENTS: &str = "px-requirements.txt";

/// How the installed modules' bytecode is checked against their source: by hash, so the
/// `.pyc` files uv writes stay valid in a layer whose files get new times when unpacked, and a
/// release's first start does not compile every module again (seconds for a Django app).
/// Read by uv's compile step; part of the dependencies key, as it changes what is installed.
pub(crate) const BYTECODE_INVALIDATION: &str = "CHECKED_HASH";

/// What uv says when a requirement names a package the index does not have.
const UV_VERDICTS: &[&str] = &["was not found in the package registry"];

/// What a Python step needs to know about the build.
pub(crate) struct Python<'a> {
    pub app_dir: &'a Path,
    pub build_dir: &'a Path,
    pub uv: &'a Path,
    pub runtime: &'a RuntimeLayer,
}

impl Python<'_> {
    fn python(&self) -> PathBuf {
        self.runtime.bin().join("python3")
    }

    /// The runtime's own variables with the build-time paths.
    fn runtime_env(&self) -> Vec<(String, OsString)> {
        let release = self.runtime.dir();
        let release = release.parent().and_then(Path::parent).unwrap_or(&release);
        self.runtime
            .env(&release.display().to_string())
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect()
    }

    /// Installs the app's dependencies under `prefix` (its `lib/python3.X/site-packages` and
    /// `bin`), which the release reaches through `PYTHONUSERBASE`.
    pub(crate) async fn install(
        &self,
        jail: &mut Jail,
        input: PythonInput,
        prefix: &Path,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let file = key_files(input)
            .last()
            .copied()
            .unwrap_or("requirements.txt");
        let requirements = match input {
            PythonInput::Requirements => self.app_dir.join("requirements.txt"),
            PythonInput::UvLock => {
                self.check_uv_lock(jail, output).await?;
                let out = self.build_dir.join(GENERATED_REQUIREMENTS);
                let step = self.uv_step(
                    "uv export",
                    &[
                        "export",
                        "--frozen",
                        "--format",
                        "requirements-txt",
                        "--no-dev",
                        "--no-emit-project",
                        "--quiet",
                        "--output-file",
                    ],
                    Some(&out),
                );
                let finished = jail.run(&step, output).await?;
                if !finished.success {
                    return Err(BuildError::StepFailed {
                        step: "uv export --frozen (uv.lock)".into(),
                        status: finished.status.clone(),
                        tail: finished.tail_text(),
                    });
                }
                out
            }
            PythonInput::PoetryLock | PythonInput::PipfileLock => {
                let text = read_lockfile(self.app_dir, file)?;
                let converted = match input {
                    PythonInput::PoetryLock => from_poetry_lock(&text),
                    _ => from_pipfile_lock(&text),
                }
                .map_err(|reason| BuildError::BadInput {
                    file: file.into(),
                    reason,
                })?;
                let out = self.build_dir.join(GENERATED_REQUIREMENTS);
                fs::write(&out, converted).context(|| format!("writing {}", out.display()))?;
                out
            }
        };
        let mut args: Vec<OsString> = [
            "pip",
            "install",
            "--link-mode",
            "copy",
            "--compile-bytecode",
            "--prefix",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.push(prefix.into());
        args.push("--python".into());
        args.push(self.python().into());
        args.push("-r".into());
        args.push(requirements.into());
        let mut env = self.runtime_env();
        env.push(("PYC_INVALIDATION_MODE".into(), BYTECODE_INVALIDATION.into()));
        let step = Step {
            label: format!("uv pip install ({file})"),
            program: self.uv.into(),
            args,
            cwd: self.app_dir.to_path_buf(),
            path: vec![self.runtime.bin()],
            env,
            watch: UV_VERDICTS,
        };
        let finished = jail.run(&step, output).await?;
        if !finished.success {
            if let Some(name) = unknown_dependency(&finished.watched) {
                return Err(BuildError::UnknownDependency {
                    name,
                    file: file.into(),
                });
            }
            return Err(BuildError::StepFailed {
                step: step.label,
                status: finished.status.clone(),
                tail: finished.tail_text(),
            });
        }
        rewrite_shebangs(&prefix.join("bin"))
    }

    /// Fails the build when `uv.lock` no longer matches `pyproject.toml` (`uv lock --check`).
    /// The check runs offline, so it cannot resolve anew and passes only when the lock already
    /// answers the project's requirements, and with the configured index cleared (uv reads an
    /// empty `UV_INDEX_URL` as unset): a lock made against PyPI is not stale because this
    /// node installs from a mirror. `export --frozen` then trusts the checked lock.
    async fn check_uv_lock(
        &self,
        jail: &mut Jail,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let mut step = self.uv_step(
            "uv lock --check",
            &["lock", "--check", "--offline", "--quiet"],
            None,
        );
        step.env.push(("UV_INDEX_URL".into(), OsString::new()));
        let finished = jail.run(&step, output).await?;
        if finished.success {
            return Ok(());
        }
        Err(BuildError::LockfileOutOfDate {
            file: UV_LOCK.into(),
            manifest: PYPROJECT_TOML.into(),
            hint: "run `uv lock` and commit uv.lock".into(),
        })
    }

    fn uv_step(&self, label: &str, args: &[&str], out: Option<&Path>) -> Step {
        let mut args: Vec<OsString> = args.iter().map(Into::into).collect();
        if let Some(out) = out {
            args.push(out.into());
        }
        Step {
            label: label.into(),
            program: self.uv.into(),
            args,
            cwd: self.app_dir.to_path_buf(),
            path: vec![self.runtime.bin()],
            env: self.runtime_env(),
            watch: UV_VERDICTS,
        }
    }

    /// A command with the installed dependencies importable (`userbase` is the prefix they
    /// were installed into, or the cached tree) and the app's own environment.
    pub(crate) fn app_step(
        &self,
        label: &str,
        program: &str,
        args: &[&str],
        userbase: &Path,
        app_env: &[(String, OsString)],
    ) -> Step {
        let mut env = self.runtime_env();
        env.push(("PYTHONUSERBASE".into(), userbase.into()));
        env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
        env.extend(app_env.iter().cloned());
        Step {
            label: label.into(),
            program: program.into(),
            args: args.iter().map(Into::into).collect(),
            cwd: self.app_dir.to_path_buf(),
            path: vec![userbase.join("bin"), self.runtime.bin()],
            env,
            watch: &[],
        }
    }

    /// `python manage.py collectstatic --noinput`.
    pub(crate) async fn collectstatic(
        &self,
        jail: &mut Jail,
        userbase: &Path,
        app_env: &[(String, OsString)],
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let step = self.app_step(
            "python manage.py collectstatic",
            "python3",
            &["manage.py", "collectstatic", "--noinput"],
            userbase,
            app_env,
        );
        let finished = jail.run(&step, output).await?;
        if finished.success {
            Ok(())
        } else {
            Err(BuildError::CollectstaticFailed {
                tail: finished.tail_text(),
            })
        }
    }
}

/// The package uv says the registry does not have, from its resolution error.
fn unknown_dependency(tail: &[String]) -> Option<String> {
    const BEFORE: &str = "Because ";
    const AFTER: &str = " was not found in the package registry";
    tail.iter().find_map(|line| {
        let end = line.find(AFTER)?;
        let start = line[..end].rfind(BEFORE)? + BEFORE.len();
        Some(line[start..end].trim().to_string())
    })
}

/// Rewrites the shebang of every script in `bin` to [`PORTABLE_SHEBANG`]: the installer wrote
/// the build-time interpreter's path (directly, or through the `/bin/sh` trampoline it uses for
/// long paths), which does not exist on a web server.
pub(crate) fn rewrite_shebangs(bin: &Path) -> Result<(), BuildError> {
    let Ok(listing) = fs::read_dir(bin) else {
        return Ok(());
    };
    for entry in listing {
        let entry = entry.context(|| format!("listing {}", bin.display()))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() || meta.len() > MAX_SCRIPT_BYTES {
            continue;
        }
        let bytes = fs::read(&path).context(|| format!("reading {}", path.display()))?;
        if let Some(rewritten) = portable_script(&bytes) {
            fs::write(&path, rewritten).context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The script with its interpreter line made portable, or `None` when it is not a Python
/// script with an absolute interpreter.
fn portable_script(bytes: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (first, rest) = text.split_once('\n')?;
    let body = if first == "#!/bin/sh" && rest.starts_with("'''exec' ") {
        // The trampoline: `'''exec' '/long/path/python3' "$0" "$@"` then `' '''`.
        let (_, after) = rest.split_once("\n' '''\n")?;
        after
    } else if first.starts_with("#!/") && first.contains("python") && first != PORTABLE_SHEBANG {
        rest
    } else {
        return None;
    };
    Some(format!("{PORTABLE_SHEBANG}\n{body}").into_bytes())
}

/// `name==version` lines for the main (non-dev, non-optional) packages of a `poetry.lock`.
fn from_poetry_lock(text: &str) -> Result<String, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("is not valid TOML ({e})"))?;
    let packages = table
        .get("package")
        .and_then(|p| p.as_array())
        .ok_or("has no [[package]] entries")?;
    let mut lines = String::new();
    for package in packages {
        let name = package
            .get("name")
            .and_then(|v| v.as_str())
            .ok_or("has a package without a name")?;
        let version = package
            .get("version")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("package {name} has no version"))?;
        let category_main = package
            .get("category")
            .and_then(|v| v.as_str())
            .is_none_or(|c| c == "main");
        let group_main = package
            .get("groups")
            .and_then(|v| v.as_array())
            .is_none_or(|groups| groups.iter().any(|g| g.as_str() == Some("main")));
        let optional = package
            .get("optional")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if category_main && group_main && !optional {
            lines.push_str(&format!("{name}=={version}\n"));
        }
    }
    Ok(lines)
}

/// Requirement lines for `Pipfile.lock`'s `default` section.
fn from_pipfile_lock(text: &str) -> Result<String, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e})"))?;
    let default = json["default"]
        .as_object()
        .ok_or("has no `default` section")?;
    let mut lines = String::new();
    for (name, spec) in default {
        let version = spec["version"].as_str().ok_or_else(|| {
            format!("package {name} has no version (a path, git or editable entry); list it in requirements.txt instead")
        })?;
        match spec["markers"].as_str() {
            Some(markers) => lines.push_str(&format!("{name}{version} ; {markers}\n")),
            None => lines.push_str(&format!("{name}{version}\n")),
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scripts_get_a_portable_interpreter_line() {
        let direct = b"#!/build/app/.px/runtime/bin/python3\nimport sys\n";
        assert_eq!(
            portable_script(direct).unwrap(),
            b"#!/usr/bin/env python3\nimport sys\n"
        );
        let trampoline =
            b"#!/bin/sh\n'''exec' '/a/very/long/path/python3' \"$0\" \"$@\"\n' '''\nimport sys\n";
        assert_eq!(
            portable_script(trampoline).unwrap(),
            b"#!/usr/bin/env python3\nimport sys\n"
        );
        assert!(portable_script(b"#!/bin/sh\necho hi\n").is_none());
        assert!(portable_script(b"\x7fELF").is_none());
    }

    #[test]
    fn lockfiles_become_requirements() {
        let poetry = r#"
[[package]]
name = "django"
version = "5.1.4"
category = "main"
optional = false

[[package]]
name = "pytest"
version = "8.0.0"
category = "dev"

[[package]]
name = "gunicorn"
version = "23.0.0"
groups = ["main"]
"#;
        assert_eq!(
            from_poetry_lock(poetry).unwrap(),
            "django==5.1.4\ngunicorn==23.0.0\n"
        );
        let pipfile = r#"{"default": {"django": {"version": "==5.1.4", "markers": "python_version >= '3.10'"}}, "develop": {"pytest": {"version": "==8.0.0"}}}"#;
        assert_eq!(
            from_pipfile_lock(pipfile).unwrap(),
            "django==5.1.4 ; python_version >= '3.10'\n"
        );
        let e = from_pipfile_lock(r#"{"default": {"mylib": {"path": "."}}}"#).unwrap_err();
        assert!(e.contains("mylib"), "{e}");
    }

    #[test]
    fn the_missing_package_is_read_from_uv() {
        let tail = vec![
            "  × No solution found when resolving dependencies:".to_string(),
            "  ╰─▶ Because px-no-such-package was not found in the package registry and you require px-no-such-package, we can conclude that your requirements are unsatisfiable.".to_string(),
        ];
        assert_eq!(
            unknown_dependency(&tail).as_deref(),
            Some("px-no-such-package")
        );
    }
}
