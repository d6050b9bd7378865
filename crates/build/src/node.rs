//! Node apps: `npm ci` (or `npm install` without a lockfile), `npm run build` when
//! `package.json` has a build script, then `npm prune --omit=dev`; `node_modules/` is the
//! dependencies layer.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::BuildError;
use crate::runtime_layer::RuntimeLayer;
use crate::sandbox::{Jail, Step};

/// npm's verdicts, which it prints before pages of usage: a lockfile out of sync, a package
/// the registry does not have.
const NPM_VERDICTS: &[&str] = &[
    "can only install packages when your package.json and",
    "is not in this registry",
    "404 Not Found - GET",
];

/// What a Node step needs to know about the build.
pub(crate) struct Node<'a> {
    pub app_dir: &'a Path,
    pub runtime: &'a RuntimeLayer,
    pub app_env: &'a [(String, OsString)],
}

impl Node<'_> {
    fn step(&self, label: &str, args: &[&str]) -> Step {
        let mut env: Vec<(String, OsString)> = vec![
            ("npm_config_update_notifier".into(), "false".into()),
            ("npm_config_fund".into(), "false".into()),
            ("npm_config_audit".into(), "false".into()),
        ];
        env.extend(self.app_env.iter().cloned());
        Step {
            label: label.into(),
            program: self.runtime.bin().join("npm").into(),
            args: args.iter().map(Into::into).collect(),
            cwd: self.app_dir.to_path_buf(),
            path: vec![self.runtime.bin(), self.bin_dir()],
            env,
            watch: NPM_VERDICTS,
        }
    }

    fn bin_dir(&self) -> PathBuf {
        self.app_dir.join("node_modules/.bin")
    }

    /// `npm ci` with a lockfile (`npm install` without).
    pub(crate) async fn install(
        &self,
        jail: &mut Jail,
        lockfile: Option<&str>,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let (label, args): (&str, &[&str]) = match lockfile {
            Some(_) => ("npm ci", &["ci"]),
            None => ("npm install", &["install"]),
        };
        let step = self.step(label, args);
        let finished = jail.run(&step, output).await?;
        if finished.success {
            return Ok(());
        }
        if let Some(file) = lockfile
            && finished.watched.iter().any(|l| l.contains(NPM_VERDICTS[0]))
        {
            return Err(BuildError::LockfileOutOfDate {
                file: file.into(),
                manifest: "package.json".into(),
                hint: "run `npm install` and commit the lockfile".into(),
            });
        }
        if let Some(name) = unknown_package(&finished.watched) {
            return Err(BuildError::UnknownDependency {
                name,
                file: lockfile
                    .map_or("package.json", |_| "package.json (or its lockfile)")
                    .into(),
            });
        }
        Err(BuildError::StepFailed {
            step: label.into(),
            status: finished.status.clone(),
            tail: finished.tail_text(),
        })
    }

    /// `npm run build`.
    pub(crate) async fn run_build(
        &self,
        jail: &mut Jail,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        self.plain(jail, "npm run build", &["run", "build"], output)
            .await
    }

    /// `npm prune --omit=dev`.
    pub(crate) async fn prune(
        &self,
        jail: &mut Jail,
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        self.plain(
            jail,
            "npm prune --omit=dev",
            &["prune", "--omit=dev"],
            output,
        )
        .await
    }

    async fn plain(
        &self,
        jail: &mut Jail,
        label: &str,
        args: &[&str],
        output: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), BuildError> {
        let step = self.step(label, args);
        let finished = jail.run(&step, output).await?;
        if finished.success {
            Ok(())
        } else {
            Err(BuildError::StepFailed {
                step: label.into(),
                status: finished.status.clone(),
                tail: finished.tail_text(),
            })
        }
    }
}

/// The package npm's registry does not have: `'name@range' is not in this registry`, or the
/// last part of a `404 Not Found - GET <url>` line.
fn unknown_package(tail: &[String]) -> Option<String> {
    let quoted = tail.iter().find_map(|line| {
        let end = line.find("' is not in this registry")?;
        let start = line[..end].rfind('\'')? + 1;
        let spec = &line[start..end];
        // A scoped name starts with `@`: the version's `@` is the last one after the first.
        let name = match spec[1..].rfind('@') {
            Some(at) => &spec[..at + 1],
            None => spec,
        };
        Some(name.to_string())
    });
    quoted.or_else(|| {
        tail.iter().find_map(|line| {
            let url = line.split("404 Not Found - GET ").nth(1)?;
            let url = url.split_whitespace().next()?;
            let name = url.rsplit('/').next()?;
            Some(name.replace("%2f", "/").replace("%2F", "/"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_package_is_read_from_npm() {
        let tail = |lines: &[&str]| lines.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unknown_package(&tail(&[
                "npm error 404 Not Found - GET https://registry.npmjs.org/px-nope - Not found",
                "npm error 404  'px-nope@^1.0.0' is not in this registry."
            ]))
            .as_deref(),
            Some("px-nope")
        );
        assert_eq!(
            unknown_package(&tail(&[
                "npm error 404  '@px/nope@1.0.0' is not in this registry."
            ]))
            .as_deref(),
            Some("@px/nope")
        );
        assert_eq!(
            unknown_package(&tail(&[
                "npm error 404 Not Found - GET https://registry.npmjs.org/@px%2fnope - Not found"
            ]))
            .as_deref(),
            Some("@px/nope")
        );
        assert_eq!(unknown_package(&tail(&["npm error code E401"])), None);
    }
}
