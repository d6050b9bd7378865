//! Python's root files: the installer input, the version files (`.python-version`,
//! `runtime.txt`, `requires-python`) and the dependency names Django is looked for in.

use super::*;

/// The Python installer input, refusing a directory that offers two.
pub(super) fn python_input(files: &RootFiles) -> Result<Option<PythonInput>, DetectError> {
    if files.contains(UV_LOCK) && !files.contains(PYPROJECT_TOML) {
        return Err(DetectError::Missing {
            file: UV_LOCK,
            needs: PYPROJECT_TOML,
            hint: "uv installs from a lock together with its project; add pyproject.toml or leave uv.lock out",
        });
    }
    if files.contains(POETRY_LOCK) && !files.contains(PYPROJECT_TOML) {
        return Err(DetectError::Missing {
            file: POETRY_LOCK,
            needs: PYPROJECT_TOML,
            hint: "poetry.lock belongs with its pyproject.toml; add it or leave poetry.lock out",
        });
    }
    if files.contains(PIPFILE) && !files.contains(PIPFILE_LOCK) {
        return Err(DetectError::Missing {
            file: PIPFILE,
            needs: PIPFILE_LOCK,
            hint: "the build installs the locked versions; run `pipenv lock` and add Pipfile.lock",
        });
    }
    let present: Vec<PythonInput> = [
        PythonInput::UvLock,
        PythonInput::PoetryLock,
        PythonInput::PipfileLock,
        PythonInput::Requirements,
    ]
    .into_iter()
    .filter(|input| files.contains(input.file()))
    .collect();
    match present.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        [first, second, ..] => Err(DetectError::Conflict {
            first: first.file(),
            second: second.file(),
            hint: "an app is installed from one dependency file; leave the others out with .emignore",
        }),
    }
}

/// `.python-version`, then `runtime.txt`, then `requires-python` in `pyproject.toml`.
pub(super) fn runtime_request(files: &RootFiles) -> Result<Option<RuntimeRequest>, DetectError> {
    let request = |requirement, source| {
        Ok(Some(RuntimeRequest {
            requirement,
            source,
        }))
    };
    if let Some(text) = files.text(PYTHON_VERSION_FILE)? {
        return request(python_version_file(text)?, RuntimeSource::PythonVersionFile);
    }
    if let Some(text) = files.text(RUNTIME_TXT)? {
        return request(runtime_txt(text)?, RuntimeSource::RuntimeTxt);
    }
    if files.contains(PYPROJECT_TOML) {
        let pyproject = pyproject(files)?;
        let requires = pyproject
            .get("project")
            .and_then(|p| p.as_table())
            .and_then(|p| p.get("requires-python"));
        return match requires {
            None => Ok(None),
            Some(toml::Value::String(spec)) => request(
                Requirement::from_python_specifiers("python3", spec).map_err(|message| {
                    DetectError::Field {
                        file: PYPROJECT_TOML,
                        field: "project.requires-python",
                        message,
                    }
                })?,
                RuntimeSource::RequiresPython,
            ),
            Some(other) => Err(DetectError::Field {
                file: PYPROJECT_TOML,
                field: "project.requires-python",
                message: format!(
                    "must be a string such as \">=3.11\", not a {}",
                    other.type_str()
                ),
            }),
        };
    }
    Ok(None)
}

/// `.python-version`: its first line that is not blank or a comment, a CPython version.
fn python_version_file(text: &str) -> Result<Requirement, DetectError> {
    let error = |message: String| DetectError::Version {
        file: PYTHON_VERSION_FILE,
        message,
    };
    let Some(line) = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
    else {
        return Err(error(
            "is empty; write a Python version such as 3.12, or delete the file".to_string(),
        ));
    };
    if line.to_ascii_lowercase().starts_with("pypy") {
        return Err(error(format!(
            "{} asks for PyPy, which Platform.X does not provide; write a CPython version such as 3.12, or set `runtime` in app.toml",
            shown(line)
        )));
    }
    cpython_version(line)
        .and_then(|v| Requirement::exactly("python3", v).ok())
        .ok_or_else(|| {
            error(format!(
                "{} is not a Python version; write one such as 3.12 or 3.12.1, or set `runtime` in app.toml",
                shown(line)
            ))
        })
}

/// `runtime.txt`: `python-3.12.1`, as Heroku writes it.
fn runtime_txt(text: &str) -> Result<Requirement, DetectError> {
    let trimmed = text.trim();
    trimmed
        .strip_prefix("python-")
        .and_then(cpython_version)
        .and_then(|v| Requirement::exactly("python3", v).ok())
        .ok_or_else(|| DetectError::Version {
            file: RUNTIME_TXT,
            message: format!(
                "{} is not `python-<version>`; write e.g. python-3.12.1, or set `runtime` in app.toml",
                shown(trimmed)
            ),
        })
}

/// A plain CPython version: one to three dotted numbers, nothing else.
fn cpython_version(text: &str) -> Option<Version> {
    let plain = !text.is_empty()
        && text.split('.').count() <= 3
        && text
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if plain { Version::parse(text) } else { None }
}

fn pyproject(files: &RootFiles) -> Result<toml::Table, DetectError> {
    let text = files.text(PYPROJECT_TOML)?.unwrap_or_default();
    text.parse::<toml::Table>().map_err(|e| DetectError::Toml {
        file: PYPROJECT_TOML,
        error: match e.span() {
            Some(span) => format!(
                "{} (line {})",
                e.message().trim(),
                line_of(text, span.start)
            ),
            None => e.message().trim().to_string(),
        },
    })
}

/// Whether the app is a Django app: `manage.py` and `django` in its dependency file. Adds a
/// line when `manage.py` is there but Django is not found, since that is likely a surprise.
/// The dependency file is read for every Python app, so one the installer could not read
/// either is refused here, whether or not Django is in question.
pub(super) fn django(
    files: &RootFiles,
    stack: &Stack,
    lines: &mut Vec<String>,
) -> Result<bool, DetectError> {
    let names = match stack {
        Stack::Python { input } => dependency_names(files, *input)?,
        _ => Vec::new(),
    };
    if !files.contains(MANAGE_PY) {
        return Ok(false);
    }
    let Stack::Python { input } = stack else {
        lines.push(
            "manage.py, but no Python dependency file: nothing is installed and collectstatic does not run"
                .to_string(),
        );
        return Ok(false);
    };
    let found = names.iter().any(|n| n == "django");
    if !found {
        lines.push(format!(
            "manage.py, but {} does not name django: collectstatic does not run",
            input.dependency_file()
        ));
    }
    Ok(found)
}

/// The normalised names of the packages the dependency file names (PEP 503: lowercase, runs
/// of `-`, `_` and `.` as one `-`).
fn dependency_names(files: &RootFiles, input: PythonInput) -> Result<Vec<String>, DetectError> {
    Ok(match input {
        PythonInput::Requirements => {
            let text = files.text(REQUIREMENTS_TXT)?.unwrap_or_default();
            text.lines()
                .map(|line| line.split(" #").next().unwrap_or(line).trim())
                // Options (`-r`, `-e`, `--hash` continuations) and comments name no package.
                .filter(|line| !line.is_empty() && !line.starts_with(['-', '#']))
                .map(requirement_name)
                .collect()
        }
        PythonInput::UvLock | PythonInput::PoetryLock => {
            let pyproject = pyproject(files)?;
            let mut names: Vec<String> = pyproject
                .get("project")
                .and_then(|p| p.get("dependencies"))
                .and_then(|d| d.as_array())
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str())
                .map(requirement_name)
                .collect();
            let poetry = pyproject
                .get("tool")
                .and_then(|t| t.get("poetry"))
                .and_then(|p| p.get("dependencies"))
                .and_then(|d| d.as_table());
            names.extend(poetry.into_iter().flatten().map(|(k, _)| normalise(k)));
            names
        }
        PythonInput::PipfileLock => {
            let text = files.text(PIPFILE_LOCK)?.unwrap_or_default();
            let lock: serde_json::Value =
                serde_json::from_str(text).map_err(|e| DetectError::Json {
                    file: PIPFILE_LOCK,
                    error: e.to_string(),
                })?;
            lock.get("default")
                .and_then(|d| d.as_object())
                .into_iter()
                .flatten()
                .map(|(k, _)| normalise(k))
                .collect()
        }
    })
}

/// The package name at the start of a PEP 508 requirement (`Django[argon2]>=5 ; ...`).
fn requirement_name(requirement: &str) -> String {
    let end = requirement
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(requirement.len());
    normalise(&requirement[..end])
}

fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// A file's text quoted in a message, cut short.
fn shown(text: &str) -> String {
    if text.chars().count() <= MAX_SHOWN_CHARS {
        return format!("{text:?}");
    }
    let cut: String = text.chars().take(MAX_SHOWN_CHARS).collect();
    format!("{cut:?}…")
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}
