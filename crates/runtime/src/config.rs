//! Layered configuration: defaults < TOML file < `PX_<SERVICE>_*` environment variables,
//! with every bad key reported with the place it came from.

use std::path::Path;

use std::collections::BTreeSet;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use serde::{Serialize, de::DeserializeOwned};

/// Every problem found in a configuration, one per line, each naming the key and its source.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// The variable after the prefix that names the config file (`PX_MAESTRO_CONFIG`), not a key.
pub const CONFIG_FILE_VAR: &str = "CONFIG";

/// Loads `T` from its defaults, then `file` (when given; a missing file is an error), then
/// environment variables named `<env_prefix><KEY>`, where `__` separates nested keys
/// (`PX_APPREPO_STORAGE__BUCKET`), except `<env_prefix>CONFIG`.
pub fn load<T>(defaults: &T, file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.is_file() {
            return Err(ConfigError::one(format!(
                "config file {} does not exist or is not a file",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    // `<prefix>CONFIG` names the file (the binaries' `--config` reads it) and is no setting.
    figment = figment.merge(
        Env::prefixed(env_prefix)
            .ignore(&[CONFIG_FILE_VAR])
            .split("__"),
    );
    figment.extract::<T>().map_err(|error| ConfigError {
        problems: error
            .into_iter()
            .map(|e| format!("  - {}", describe(&e)))
            .collect(),
    })
}

/// The settings that differ between the configuration a service runs with and one read again
/// on a reload, as dotted keys (`storage.s3.bucket`), leaving out those at or under a key of
/// `reloadable`: what a reload cannot apply, so the service logs that it needs a restart.
/// Only key names are returned, never values, which may be secrets (webhook URLs, tokens).
pub fn restart_needed<T: Serialize>(running: &T, new: &T, reloadable: &[&str]) -> Vec<String> {
    let (running, new) = match (Value::serialize(running), Value::serialize(new)) {
        (Ok(running), Ok(new)) => (running, new),
        // Both are the same type, which serialized when it was loaded; this does not happen.
        _ => return vec!["(configuration)".into()],
    };
    let mut changed = Vec::new();
    diff_values("", &running, &new, &mut changed);
    changed.retain(|key| {
        !reloadable.iter().any(|r| {
            key == r
                || key
                    .strip_prefix(r)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    });
    changed
}

fn diff_values(key: &str, old: &Value, new: &Value, changed: &mut Vec<String>) {
    match (old, new) {
        (Value::Dict(_, old), Value::Dict(_, new)) => {
            let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            for name in keys {
                let path = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                match (old.get(name), new.get(name)) {
                    (Some(o), Some(n)) => diff_values(&path, o, n, changed),
                    _ => changed.push(path),
                }
            }
        }
        (old, new) if old != new => changed.push(key.to_owned()),
        _ => {}
    }
}

fn describe(error: &figment::Error) -> String {
    let key = if error.path.is_empty() {
        None
    } else {
        Some(error.path.join("."))
    };
    let source = error.metadata.as_ref().map(|m| match &m.source {
        Some(source) => format!("{} ({source})", m.name),
        None => m.name.to_string(),
    });
    match (key, source) {
        (Some(key), Some(source)) => format!("`{key}`: {} [from {source}]", error.kind),
        (Some(key), None) => format!("`{key}`: {}", error.kind),
        (None, Some(source)) => format!("{} [from {source}]", error.kind),
        (None, None) => error.kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        limit: u64,
        nested: Nested,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        flag: bool,
    }

    fn defaults() -> Sample {
        Sample {
            listen: "127.0.0.1:1".into(),
            limit: 5,
            nested: Nested { flag: false },
        }
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "limit = 7\n[nested]\nflag = true\n").unwrap();
        let loaded = load(&defaults(), Some(&file), "PX_RUNTIME_TEST_A_").unwrap();
        assert_eq!(loaded.limit, 7);
        assert!(loaded.nested.flag);
        assert_eq!(loaded.listen, "127.0.0.1:1");
    }

    #[test]
    fn bad_keys_are_named_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "limt = 7\n").unwrap();
        let text = load(&defaults(), Some(&file), "PX_RUNTIME_TEST_B_")
            .unwrap_err()
            .to_string();
        assert!(text.contains("limt"), "{text}");
        assert!(text.contains("c.toml"), "{text}");
        std::fs::write(&file, "limit = \"many\"\n").unwrap();
        let text = load(&defaults(), Some(&file), "PX_RUNTIME_TEST_B_")
            .unwrap_err()
            .to_string();
        assert!(text.contains("`limit`") && text.contains("u64"), "{text}");
    }

    #[test]
    fn restart_needed_names_changed_keys_outside_the_reloadable_ones() {
        let running = defaults();
        assert!(restart_needed(&running, &defaults(), &[]).is_empty());
        let new = Sample {
            listen: "0.0.0.0:1".into(),
            limit: 6,
            nested: Nested { flag: true },
        };
        assert_eq!(
            restart_needed(&running, &new, &[]),
            ["limit", "listen", "nested.flag"]
        );
        assert_eq!(
            restart_needed(&running, &new, &["limit", "nested"]),
            ["listen"]
        );
        // A key that merely starts like a reloadable one is not one.
        assert_eq!(
            restart_needed(&running, &new, &["list", "nested.fl"]),
            ["limit", "listen", "nested.flag"]
        );
        let optional = |v: Option<u8>| std::collections::BTreeMap::from([("tls", v)]);
        assert_eq!(
            restart_needed(&optional(None), &optional(Some(1)), &[]),
            ["tls"]
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load(
            &defaults(),
            Some(Path::new("/nonexistent/x.toml")),
            "PX_RUNTIME_TEST_C_",
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.toml"));
    }
}
