//! Node's root files: the installer (npm's lockfiles, refused yarn and pnpm ones) and what
//! `package.json` says (`scripts.build`, `scripts.start`, `engines.node`).

use super::*;

/// The Node installer, refusing lockfiles of two installers and lockfiles without
/// `package.json`.
pub(super) fn node_install(
    files: &RootFiles,
    has_build_command: bool,
) -> Result<Option<NodeInstall>, DetectError> {
    let lockfiles: Vec<&'static str> = [
        NPM_SHRINKWRAP_JSON,
        PACKAGE_LOCK_JSON,
        YARN_LOCK,
        PNPM_LOCK_YAML,
    ]
    .into_iter()
    .filter(|f| files.contains(f))
    .collect();
    if !files.contains(PACKAGE_JSON) {
        return match lockfiles.first() {
            Some(lockfile) => Err(DetectError::Missing {
                file: lockfile,
                needs: PACKAGE_JSON,
                hint: "a Node app's dependencies are named in package.json; add it or leave the lockfile out",
            }),
            None => Ok(None),
        };
    }
    let npm_lock = lockfiles
        .iter()
        .copied()
        .find(|f| *f == NPM_SHRINKWRAP_JSON || *f == PACKAGE_LOCK_JSON);
    let other_lock = lockfiles
        .iter()
        .copied()
        .find(|f| *f == YARN_LOCK || *f == PNPM_LOCK_YAML);
    let other_locks = lockfiles
        .iter()
        .filter(|f| **f == YARN_LOCK || **f == PNPM_LOCK_YAML)
        .count();
    match (npm_lock, other_lock) {
        (Some(npm), Some(other)) => Err(DetectError::Conflict {
            first: npm,
            second: other,
            hint: "lockfiles of two installers; keep the one you install with and leave the other out with .emignore",
        }),
        (None, Some(_)) if other_locks > 1 => Err(DetectError::Conflict {
            first: YARN_LOCK,
            second: PNPM_LOCK_YAML,
            hint: "lockfiles of two installers; keep the one you install with and leave the other out with .emignore",
        }),
        (None, Some(other)) if has_build_command => {
            Ok(Some(NodeInstall::ByBuildCommand { lockfile: other }))
        }
        (None, Some(other)) => {
            let (installer, example) = if other == YARN_LOCK {
                ("yarn", "corepack yarn install --frozen-lockfile")
            } else {
                ("pnpm", "corepack pnpm install --frozen-lockfile")
            };
            Err(DetectError::UnsupportedInstaller {
                file: other,
                installer,
                example,
            })
        }
        (Some(npm), None) => Ok(Some(NodeInstall::NpmCi { lockfile: npm })),
        (None, None) => Ok(Some(NodeInstall::NpmInstall)),
    }
}

/// Reads `package.json` for what the build and `em init` need.
pub(super) fn node_app(files: &RootFiles, install: NodeInstall) -> Result<NodeApp, DetectError> {
    let package = package_json(files)?;
    let scripts = object_field(&package, "scripts", "scripts")?;
    let script = |name: &str, field: &'static str| -> Result<Option<String>, DetectError> {
        match scripts.and_then(|s| s.get(name)) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(DetectError::Field {
                file: PACKAGE_JSON,
                field,
                message: format!(
                    "must be a string (a shell command), not {}",
                    json_kind(other)
                ),
            }),
        }
    };
    Ok(NodeApp {
        install,
        build_script: script("build", "scripts.build")?.is_some(),
        start_script: script("start", "scripts.start")?,
    })
}

fn package_json(
    files: &RootFiles,
) -> Result<serde_json::Map<String, serde_json::Value>, DetectError> {
    let text = files.text(PACKAGE_JSON)?.unwrap_or_default();
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => Err(DetectError::Json {
            file: PACKAGE_JSON,
            error: format!("the top level is {}, not an object", json_kind(&other)),
        }),
        Err(e) => Err(DetectError::Json {
            file: PACKAGE_JSON,
            error: e.to_string(),
        }),
    }
}

/// `package[key]` when it is an object; absent is `None`, another type an error.
fn object_field<'a>(
    package: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a serde_json::Map<String, serde_json::Value>>, DetectError> {
    match package.get(key) {
        None => Ok(None),
        Some(serde_json::Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(DetectError::Field {
            file: PACKAGE_JSON,
            field,
            message: format!("must be an object, not {}", json_kind(other)),
        }),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `engines.node` in `package.json`.
pub(super) fn runtime_request(files: &RootFiles) -> Result<Option<RuntimeRequest>, DetectError> {
    let package = package_json(files)?;
    let engines = object_field(&package, "engines", "engines")?;
    match engines.and_then(|e| e.get("node")) {
        None => Ok(None),
        Some(serde_json::Value::String(range)) => {
            let requirement = Requirement::from_npm_range("node", range).map_err(|message| {
                DetectError::Field {
                    file: PACKAGE_JSON,
                    field: "engines.node",
                    message,
                }
            })?;
            Ok(Some(RuntimeRequest {
                requirement,
                source: RuntimeSource::EnginesNode,
            }))
        }
        Some(other) => Err(DetectError::Field {
            file: PACKAGE_JSON,
            field: "engines.node",
            message: format!(
                "must be a version range such as \">=20\", not {}",
                json_kind(other)
            ),
        }),
    }
}
