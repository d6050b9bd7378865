//! What an app is, decided in one place from the files at its root (docs/src/design/builds.md,
//! "Detection"): its stack and installer input, the runtime version it asks for and the file
//! that asks, Django, its Procfile, whether an upload needs a build, and lines saying so for
//! people. `em init`, `em deploy`, apprepo and the builder all call [`detect`]; nothing here
//! does I/O, the callers collect [`RootFiles`].

use std::collections::BTreeMap;
use std::fmt;

use crate::manifest::{AppManifest, MANIFEST_FILE};
use crate::procfile::{PROCFILE, Procfile, ProcfileError};
use crate::runtime::{Requirement, Version};

pub const REQUIREMENTS_TXT: &str = "requirements.txt";
pub const PYPROJECT_TOML: &str = "pyproject.toml";
pub const UV_LOCK: &str = "uv.lock";
pub const POETRY_LOCK: &str = "poetry.lock";
pub const PIPFILE: &str = "Pipfile";
pub const PIPFILE_LOCK: &str = "Pipfile.lock";
pub const PACKAGE_JSON: &str = "package.json";
pub const PACKAGE_LOCK_JSON: &str = "package-lock.json";
pub const NPM_SHRINKWRAP_JSON: &str = "npm-shrinkwrap.json";
pub const YARN_LOCK: &str = "yarn.lock";
pub const PNPM_LOCK_YAML: &str = "pnpm-lock.yaml";
pub const PYTHON_VERSION_FILE: &str = ".python-version";
pub const RUNTIME_TXT: &str = "runtime.txt";
pub const MANAGE_PY: &str = "manage.py";

/// Every root file detection looks at; no other file changes what an app is.
pub const DETECT_FILES: &[&str] = &[
    PROCFILE,
    REQUIREMENTS_TXT,
    PYPROJECT_TOML,
    UV_LOCK,
    POETRY_LOCK,
    PIPFILE,
    PIPFILE_LOCK,
    PACKAGE_JSON,
    PACKAGE_LOCK_JSON,
    NPM_SHRINKWRAP_JSON,
    YARN_LOCK,
    PNPM_LOCK_YAML,
    PYTHON_VERSION_FILE,
    RUNTIME_TXT,
    MANAGE_PY,
];

/// Files whose presence is all detection needs: lockfiles are the installer's business (a
/// `package-lock.json` of a large app is tens of MiB), `manage.py` only marks Django.
const PRESENCE_ONLY: &[&str] = &[
    UV_LOCK,
    POETRY_LOCK,
    PIPFILE,
    PACKAGE_LOCK_JSON,
    NPM_SHRINKWRAP_JSON,
    YARN_LOCK,
    PNPM_LOCK_YAML,
    MANAGE_PY,
];

/// Largest root file whose content detection reads. The files it reads are written by hand
/// or small (a large `package.json` or a `requirements.txt` with hashes is tens of KiB), so
/// 1 MiB leaves a wide margin, while the eight such files bound what an upload's inspection
/// keeps in memory to 8 MiB.
pub const MAX_DETECT_FILE_BYTES: u64 = 1024 * 1024;

/// How much of a file's odd content an error message quotes.
const MAX_SHOWN_CHARS: usize = 80;

/// What detection needs of a root file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// Only that it is there.
    Presence,
    /// Its content, up to [`MAX_DETECT_FILE_BYTES`].
    Content,
}

/// A root file as its collector saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFile {
    pub size: u64,
    /// The bytes, for a file detection reads and only when within [`MAX_DETECT_FILE_BYTES`].
    pub content: Option<Vec<u8>>,
}

/// The detection files at an app's root (regular files only: a symlink is not followed, as
/// the bundle does not follow it either), collected by whoever reads the app: `px_bundle`
/// while it packs or streams a bundle, `em` from a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFiles {
    files: BTreeMap<&'static str, RootFile>,
}

impl RootFiles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether detection looks at a root file called `name`, and at what of it; `None` for
    /// every other name.
    pub fn file_use(name: &str) -> Option<FileUse> {
        DETECT_FILES.contains(&name).then(|| {
            if PRESENCE_ONLY.contains(&name) {
                FileUse::Presence
            } else {
                FileUse::Content
            }
        })
    }

    /// Records the root file `name` of `size` bytes. Its content is kept only when detection
    /// reads it and it is within [`MAX_DETECT_FILE_BYTES`]: a collector may pass `None` for
    /// anything else and never read it. Names detection does not know are ignored.
    pub fn insert(&mut self, name: &str, size: u64, content: Option<Vec<u8>>) {
        let Some(known) = DETECT_FILES.iter().copied().find(|f| *f == name) else {
            return;
        };
        let content = content.filter(|c| {
            Self::file_use(known) == Some(FileUse::Content)
                && size <= MAX_DETECT_FILE_BYTES
                && c.len() as u64 == size
        });
        self.files.insert(known, RootFile { size, content });
    }

    /// The same files with `name` holding `text`; for tests and callers that build the set
    /// by hand.
    pub fn with(mut self, name: &str, text: &str) -> Self {
        self.insert(name, text.len() as u64, Some(text.as_bytes().to_vec()));
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&RootFile> {
        self.files.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The names present, in byte order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.files.keys().copied()
    }

    /// The text of a file detection reads, when present.
    fn text(&self, name: &'static str) -> Result<Option<&str>, DetectError> {
        let Some(file) = self.files.get(name) else {
            return Ok(None);
        };
        let Some(bytes) = &file.content else {
            return Err(if file.size > MAX_DETECT_FILE_BYTES {
                DetectError::TooLarge {
                    file: name,
                    max: MAX_DETECT_FILE_BYTES,
                }
            } else {
                DetectError::Unread { file: name }
            });
        };
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| DetectError::NotUtf8 { file: name })
    }
}

/// Which Python dependency file the installer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonInput {
    /// `requirements.txt`, installed with `uv pip install -r`.
    Requirements,
    /// `uv.lock` beside `pyproject.toml` (`uv export --frozen`).
    UvLock,
    /// `poetry.lock` beside `pyproject.toml`, its main packages.
    PoetryLock,
    /// `Pipfile.lock`, its `default` packages.
    PipfileLock,
}

impl PythonInput {
    /// The file the installer reads.
    pub fn file(self) -> &'static str {
        match self {
            Self::Requirements => REQUIREMENTS_TXT,
            Self::UvLock => UV_LOCK,
            Self::PoetryLock => POETRY_LOCK,
            Self::PipfileLock => PIPFILE_LOCK,
        }
    }

    /// The file that names the app's dependencies (where Django is looked for).
    pub fn dependency_file(self) -> &'static str {
        match self {
            Self::Requirements => REQUIREMENTS_TXT,
            Self::UvLock | Self::PoetryLock => PYPROJECT_TOML,
            Self::PipfileLock => PIPFILE_LOCK,
        }
    }
}

/// How a Node app's dependencies are installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeInstall {
    /// `npm ci` from the lockfile (`package-lock.json` or `npm-shrinkwrap.json`).
    NpmCi { lockfile: &'static str },
    /// `npm install`: no lockfile, so versions are resolved at build time.
    NpmInstall,
    /// A yarn or pnpm lockfile: `[build] command` installs, npm does not run.
    ByBuildCommand { lockfile: &'static str },
}

impl NodeInstall {
    /// The npm command that installs, when npm does.
    pub fn npm_command(self) -> Option<&'static str> {
        match self {
            Self::NpmCi { .. } => Some("npm ci"),
            Self::NpmInstall => Some("npm install"),
            Self::ByBuildCommand { .. } => None,
        }
    }
}

/// A Node app, from its `package.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeApp {
    pub install: NodeInstall,
    /// `scripts.build` exists: `npm run build` follows the install.
    pub build_script: bool,
    /// `scripts.start`, as written; `npm start` runs it.
    pub start_script: Option<String>,
}

/// The language and installer of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stack {
    /// No dependency file: nothing to install.
    None,
    Python {
        input: PythonInput,
    },
    Node(NodeApp),
}

/// Where a runtime request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeSource {
    /// `runtime` in `app.toml`, which wins over every file.
    Manifest,
    PythonVersionFile,
    RuntimeTxt,
    /// `[project] requires-python` in `pyproject.toml`.
    RequiresPython,
    /// `engines.node` in `package.json`.
    EnginesNode,
}

impl RuntimeSource {
    /// The file the request is written in.
    pub fn file(self) -> &'static str {
        match self {
            Self::Manifest => MANIFEST_FILE,
            Self::PythonVersionFile => PYTHON_VERSION_FILE,
            Self::RuntimeTxt => RUNTIME_TXT,
            Self::RequiresPython => PYPROJECT_TOML,
            Self::EnginesNode => PACKAGE_JSON,
        }
    }
}

impl fmt::Display for RuntimeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manifest => f.write_str("app.toml `runtime`"),
            Self::RequiresPython => f.write_str("pyproject.toml `requires-python`"),
            Self::EnginesNode => f.write_str("package.json `engines.node`"),
            other => f.write_str(other.file()),
        }
    }
}

/// The runtime an app asks for, and where it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeRequest {
    pub requirement: Requirement,
    pub source: RuntimeSource,
}

/// What an app is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub stack: Stack,
    /// The runtime version asked for, by `app.toml` or the first file that names one.
    pub runtime: Option<RuntimeRequest>,
    /// `manage.py` is there and the dependency file names `django`.
    pub django: bool,
    /// Django's `collectstatic` runs after the install (Django, and not turned off).
    pub collectstatic: bool,
    /// The parsed Procfile, when there is one.
    pub procfile: Option<Procfile>,
    /// Where `app.toml` replaces a Procfile line, one sentence each
    /// (`worker: app.toml's command replaces the Procfile's line 2`); also in `lines`.
    pub overrides: Vec<String>,
    /// `[build] command`.
    pub build_command: Option<String>,
    /// What was found, one sentence a line, for people (`em init`'s comments, `em deploy`'s
    /// hint, a build's log).
    pub lines: Vec<String>,
}

impl Detection {
    /// Whether an upload of this app is built: it has an installer input or a
    /// `[build] command`. Otherwise the upload is its release.
    pub fn needs_build(&self) -> bool {
        !matches!(self.stack, Stack::None) || self.build_command.is_some()
    }

    /// Whether a file told anything about the app (a stack, a Procfile, a runtime version),
    /// as opposed to a directory that holds nothing detection knows.
    pub fn recognised(&self) -> bool {
        !matches!(self.stack, Stack::None)
            || self.procfile.is_some()
            || self
                .runtime
                .as_ref()
                .is_some_and(|r| r.source != RuntimeSource::Manifest)
    }
}

/// Why the root files do not make an app detection can build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("{file} is larger than {max} bytes; no real one is, so leave it out with .emignore")]
    TooLarge { file: &'static str, max: u64 },
    #[error("{file} was not read by the code that collected the app's files; this is a bug")]
    Unread { file: &'static str },
    #[error("{file} is not valid UTF-8; save it as UTF-8")]
    NotUtf8 { file: &'static str },
    #[error("{file} is not valid JSON: {error}")]
    Json { file: &'static str, error: String },
    #[error("{file} is not valid TOML: {error}")]
    Toml { file: &'static str, error: String },
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: &'static str,
        field: &'static str,
        message: String,
    },
    /// `.python-version` or `runtime.txt` that names no version Platform.X can provide.
    #[error("{file}: {message}")]
    Version { file: &'static str, message: String },
    #[error(transparent)]
    Procfile(#[from] ProcfileError),
    #[error("found both {first} and {second}: {hint}")]
    Conflict {
        first: &'static str,
        second: &'static str,
        hint: &'static str,
    },
    #[error("{file} without {needs}: {hint}")]
    Missing {
        file: &'static str,
        needs: &'static str,
        hint: &'static str,
    },
    #[error(
        "{file}: npm is the Node installer, and {installer} does not run by itself; a {file} app needs `[build] command` in app.toml that installs, e.g. \"{example}\", or a package-lock.json instead (run `npm install` to make one)"
    )]
    UnsupportedInstaller {
        file: &'static str,
        installer: &'static str,
        example: &'static str,
    },
}

/// Reads what the app is from its manifest (when it has one yet) and its root files.
pub fn detect(manifest: Option<&AppManifest>, files: &RootFiles) -> Result<Detection, DetectError> {
    let mut lines = Vec::new();
    let procfile = match files.text(PROCFILE)? {
        Some(text) => Some(Procfile::parse(text.as_bytes())?),
        None => None,
    };
    if let Some(procfile) = &procfile {
        if procfile.processes.is_empty() {
            lines.push("Procfile: no process types".to_string());
        }
        for process in &procfile.processes {
            lines.push(format!("Procfile: {}: {}", process.name, process.command));
        }
    }
    let overrides = match (manifest, &procfile) {
        (Some(manifest), Some(procfile)) => crate::process::overrides(manifest, procfile),
        _ => Vec::new(),
    };
    lines.extend(overrides.iter().cloned());
    let build_command = manifest.and_then(|m| m.build.command.clone());

    let python = python::python_input(files)?;
    let node = node::node_install(files, build_command.is_some())?;
    let stack = match (python, node) {
        (Some(input), None) => Stack::Python { input },
        (None, Some(install)) => Stack::Node(node::node_app(files, install)?),
        (None, None) => Stack::None,
        (Some(input), Some(_)) => {
            return Err(DetectError::Conflict {
                first: input.file(),
                second: PACKAGE_JSON,
                hint: "an app is built for one language; leave the other language's files out with .emignore",
            });
        }
    };
    match &stack {
        Stack::Python { input } => lines.push(format!(
            "Python app: {} installs the dependencies in {} with uv",
            match input {
                PythonInput::Requirements => "the build",
                PythonInput::UvLock => "the build (uv export --frozen)",
                PythonInput::PoetryLock => "the build (main packages)",
                PythonInput::PipfileLock => "the build (default packages)",
            },
            input.file()
        )),
        Stack::Node(node) => {
            lines.push(match node.install {
                NodeInstall::NpmCi { lockfile } => format!("Node app: `npm ci` from {lockfile}"),
                NodeInstall::NpmInstall => format!(
                    "Node app: `npm install` (no {PACKAGE_LOCK_JSON}, so versions are resolved at each build; commit one for repeatable builds)"
                ),
                NodeInstall::ByBuildCommand { lockfile } => {
                    format!("Node app with {lockfile}: `[build] command` installs, npm does not")
                }
            });
            if node.build_script {
                lines.push(
                    "package.json scripts.build: `npm run build` after the install, then dev dependencies are pruned"
                        .to_string(),
                );
            }
            if let Some(start) = &node.start_script {
                lines.push(format!("package.json scripts.start: {start}"));
            }
        }
        Stack::None => {
            lines.push(
                "no dependency file (requirements.txt, pyproject.toml with uv.lock or poetry.lock, Pipfile.lock, package.json): nothing to install"
                    .to_string(),
            );
            if files.contains(PYPROJECT_TOML) {
                lines.push(format!(
                    "{PYPROJECT_TOML} without {UV_LOCK} or {POETRY_LOCK}: its dependencies are not installed (lock them with `uv lock`, or list them in {REQUIREMENTS_TXT})"
                ));
            }
        }
    }

    let runtime = runtime_request(manifest, files, &stack)?;
    match &runtime {
        Some(request) => lines.push(format!(
            "runtime {} (from {})",
            request.requirement, request.source
        )),
        None => match stack {
            Stack::Python { .. } => lines.push(
                "no Python version named (.python-version, runtime.txt or pyproject.toml requires-python): the platform's newest Python is used"
                    .to_string(),
            ),
            Stack::Node(_) => lines.push(
                "no Node version named (package.json engines.node): the platform's newest Node is used"
                    .to_string(),
            ),
            Stack::None => {}
        },
    }

    let django = python::django(files, &stack, &mut lines)?;
    let collectstatic = django && manifest.is_none_or(|m| m.build.collectstatic);
    if django {
        lines.push(if collectstatic {
            "Django: `python manage.py collectstatic --noinput` runs after the install".to_string()
        } else {
            "Django: collectstatic is off ([build] collectstatic = false)".to_string()
        });
    }
    if let Some(command) = &build_command {
        lines.push(match stack {
            Stack::None => format!("[build] command: {command} (the whole build)"),
            _ => format!("[build] command: {command} (after the install)"),
        });
    }
    Ok(Detection {
        stack,
        runtime,
        django,
        collectstatic,
        procfile,
        overrides,
        build_command,
        lines,
    })
}

/// The runtime request: `app.toml` first, then the stack's own files in order. A file after
/// the one that answered is not read, so `runtime` in `app.toml` settles a file the platform
/// cannot read.
fn runtime_request(
    manifest: Option<&AppManifest>,
    files: &RootFiles,
    stack: &Stack,
) -> Result<Option<RuntimeRequest>, DetectError> {
    if let Some(requirement) = manifest.and_then(|m| m.runtime.clone()) {
        return Ok(Some(RuntimeRequest {
            requirement,
            source: RuntimeSource::Manifest,
        }));
    }
    match stack {
        Stack::Node(_) => node::runtime_request(files),
        _ => python::runtime_request(files),
    }
}

mod node;
mod python;

#[cfg(test)]
mod tests;
