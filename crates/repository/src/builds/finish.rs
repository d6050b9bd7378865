//! A build's end: its finish, which commits the release it made, and its failure.
//!
//! Why a finish checks again after its claim: a newer upload may have been stored between the
//! finish's first look and its claim, on another repository sharing the storage. So a finish
//! commits its release only if no plain upload was committed after the build was queued and no
//! newer build exists, checked at each attempt at taking a release number. Release numbers are
//! taken by create-if-absent, so either the finished release comes first (and the newer upload
//! after it, and wins) or the finish sees the newer upload and records itself superseded.

use px_proto::api::ReleaseCause;
use px_proto::build::{Build, BuildFailed, BuildFinished, BuildOutput, BuildResult};

use super::{
    BuildRecord, Builds, Claim, Finished, MAX_BUILD_COMMANDS, MAX_BUILD_LAYERS, MAX_BUILD_NAME_LEN,
    MAX_BUILD_PATH_ENTRIES, MAX_BUILD_VALUE_LEN, MAX_FAIL_REASON_CHARS,
};
use crate::error::ApiError;
use crate::releases::{Draft, MAX_COMMIT_ATTEMPTS};
use crate::storage::Blob;

impl Builds {
    /// Finishes build `number` into a release (see the module's protocol). Every layer must be
    /// stored; a build that already succeeded with this output answers its release again.
    pub async fn finish(
        &self,
        app: &str,
        number: u64,
        finished: BuildFinished,
    ) -> Result<Finished, ApiError> {
        check_output(number, &finished.output)?;
        let record = self.existing(app, number).await?;
        if let Some(result) = self.result(app, number).await? {
            return self
                .finished_before(app, number, &result, &finished.output)
                .await;
        }
        for layer in &finished.output.layers {
            let stored = self.releases.count_storage_error(
                self.releases
                    .storage()
                    .blob_size(Blob::Layer, &layer.sha256)
                    .await,
            )?;
            match stored {
                None => {
                    return Err(ApiError::Conflict(format!(
                        "layer {} ({}) is not stored; upload it with PUT /v1/layers/{} before finishing the build",
                        layer.sha256,
                        layer.kind.as_str(),
                        layer.sha256
                    )));
                }
                Some(size) if size != layer.size => {
                    return Err(ApiError::Conflict(format!(
                        "layer {} is stored with {size} bytes but the build says {}",
                        layer.sha256, layer.size
                    )));
                }
                Some(_) => {}
            }
        }
        match self.claim(app, number, Claim::Finish).await? {
            Claim::Finish => {}
            Claim::Fail => return Err(already_failing(app, number)),
            Claim::Supersede { by } => {
                let result = self
                    .record_result(app, number, &BuildResult::Superseded { by })
                    .await?;
                return Err(ended(app, number, &result));
            }
        }
        self.store_log(app, number, &finished.log).await?;
        let committed = self
            .commit(app, number, &record, finished.output.clone())
            .await?;
        let release = match &committed {
            Finished::Committed(release) | Finished::AlreadyCommitted(release) => release,
        };
        let result = BuildResult::Succeeded {
            release: release.version,
        };
        let held = self.record_result(app, number, &result).await?;
        if held != result {
            tracing::error!(%app, build = number, ?held, version = release.version, "a build committed a release but holds another result");
        }
        match &committed {
            Finished::Committed(_) => {
                self.releases.metrics().builds_finished.inc();
                tracing::info!(%app, build = number, version = release.version, "build finished");
            }
            // An earlier finish (another repository, or one that stopped before recording
            // the result) committed other layers: this output is not what serves.
            Finished::AlreadyCommitted(release)
                if release.build.as_ref() != Some(&finished.output) =>
            {
                return Err(other_layers(app, number, release.version));
            }
            Finished::AlreadyCommitted(_) => {}
        }
        Ok(committed)
    }

    /// A finish of a build that already has a result: its release again when it succeeded with
    /// this very output, a conflict saying how it ended otherwise.
    async fn finished_before(
        &self,
        app: &str,
        number: u64,
        result: &BuildResult,
        output: &BuildOutput,
    ) -> Result<Finished, ApiError> {
        let BuildResult::Succeeded { release } = result else {
            return Err(ended(app, number, result));
        };
        let Some(release) = self.releases.release_at(app, *release).await? else {
            // Collected by retention since: the build ended long ago.
            return Err(ended(app, number, result));
        };
        if release.build.as_ref() == Some(output) {
            Ok(Finished::AlreadyCommitted(release))
        } else {
            Err(other_layers(app, number, release.version))
        }
    }

    /// Commits the finished build's release, unless a newer upload of the app came after it
    /// or an earlier finish of it (another repository, a retry) committed it already.
    async fn commit(
        &self,
        app: &str,
        number: u64,
        record: &BuildRecord,
        output: BuildOutput,
    ) -> Result<Finished, ApiError> {
        let _serialised = self.releases.lock_app(app).await;
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let head = self.releases.head(app).await?;
            let newest = head.newest;
            for version in record.base_release + 1..=newest {
                let Some(release) = self.releases.release_at(app, version).await? else {
                    continue; // Collected by retention: older than what it keeps.
                };
                let built_from = release.build.as_ref().map(|b| b.build);
                if built_from == Some(number) {
                    return Ok(Finished::AlreadyCommitted(release));
                }
                let newer_upload = release.cause == ReleaseCause::Deploy
                    && built_from.is_none_or(|other| other > number);
                if newer_upload {
                    return Err(self.superseded(app, number, &format!("v{version}")).await);
                }
            }
            if let Some(&newer) = self.listing(app).await?.records.range(number + 1..).last() {
                return Err(self
                    .superseded(app, number, &format!("build {newer}"))
                    .await);
            }
            let build = &record.build;
            let parts = Draft {
                bundle: build.source.clone(),
                manifest: build.manifest.clone(),
                config: head
                    .current
                    .as_ref()
                    .map(|r| r.config.clone())
                    .unwrap_or_default(),
                cause: ReleaseCause::Deploy,
                description: build.description.clone(),
                build: Some(output.clone()),
                phase: crate::phases::pending_phase(&build.manifest),
            };
            // The release is the upload's deploy: made by whoever uploaded it.
            if let Some(release) = self
                .releases
                .try_commit(app, &build.created_by, head, parts)
                .await?
            {
                return Ok(Finished::Committed(release));
            }
        }
        Err(crate::releases::too_many_commits(app))
    }

    /// Records that build `number` was superseded by `by` (its finish found the newer upload)
    /// and returns the conflict a finish answers.
    async fn superseded(&self, app: &str, number: u64, by: &str) -> ApiError {
        let result = BuildResult::Superseded { by: by.into() };
        match self.record_result(app, number, &result).await {
            Ok(held) => {
                if held == result {
                    self.releases.metrics().builds_superseded.inc();
                }
                ended(app, number, &held)
            }
            Err(e) => e,
        }
    }

    /// Records that build `number` failed, with its log. A repeated failure answers the build
    /// as it stands; a build that ended otherwise, or is finishing, is a conflict.
    pub async fn fail(
        &self,
        app: &str,
        number: u64,
        failed: BuildFailed,
    ) -> Result<Build, ApiError> {
        let reason: String = failed
            .reason
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_FAIL_REASON_CHARS)
            .collect();
        if reason.trim().is_empty() {
            return Err(ApiError::BadRequest(
                "say why the build failed in `reason`".into(),
            ));
        }
        let record = self.existing(app, number).await?;
        if let Some(result) = self.result(app, number).await? {
            return match result {
                BuildResult::Failed { .. } => Ok(Build {
                    result: Some(result),
                    ..record.build
                }),
                other => Err(ended(app, number, &other)),
            };
        }
        match self.claim(app, number, Claim::Fail).await? {
            Claim::Fail => {}
            Claim::Finish => {
                return Err(ApiError::Conflict(format!(
                    "build {number} of {app:?} is being finished into a release; it can no longer fail"
                )));
            }
            Claim::Supersede { by } => {
                let result = self
                    .record_result(app, number, &BuildResult::Superseded { by })
                    .await?;
                return Err(ended(app, number, &result));
            }
        }
        self.store_log(app, number, &failed.log).await?;
        let result = self
            .record_result(app, number, &BuildResult::Failed { reason })
            .await?;
        self.releases.metrics().builds_failed.inc();
        tracing::info!(%app, build = number, ?result, "build failed");
        Ok(Build {
            result: Some(result),
            ..record.build
        })
    }
}

/// The conflict a finish or failure of a build that already ended answers.
fn ended(app: &str, number: u64, result: &BuildResult) -> ApiError {
    ApiError::Conflict(match result {
        BuildResult::Superseded { by } => format!(
            "build {number} of {app:?} was superseded by {by} (a newer upload); it will not become a release"
        ),
        BuildResult::Failed { reason } => {
            format!("build {number} of {app:?} already failed: {reason}")
        }
        BuildResult::Succeeded { release } => {
            format!("build {number} of {app:?} already finished as v{release}")
        }
    })
}

fn other_layers(app: &str, number: u64, version: u64) -> ApiError {
    ApiError::Conflict(format!(
        "build {number} of {app:?} already finished as v{version} with other layers"
    ))
}

fn already_failing(app: &str, number: u64) -> ApiError {
    ApiError::Conflict(format!(
        "build {number} of {app:?} was reported failed; it cannot finish"
    ))
}

/// Checks what a builder says it made: the build's own number, a bounded set of well-formed
/// layers, and paths and variables that stay inside the release.
fn check_output(number: u64, output: &BuildOutput) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if output.build != number {
        return bad(format!(
            "output.build is {} but this is build {number}",
            output.build
        ));
    }
    if output.layers.is_empty() || output.layers.len() > MAX_BUILD_LAYERS {
        return bad(format!(
            "output.layers must name 1 to {MAX_BUILD_LAYERS} layers"
        ));
    }
    for (i, layer) in output.layers.iter().enumerate() {
        px_proto::names::check_sha256_hex(&layer.sha256)
            .or_else(|m| bad(format!("output.layers[{i}].sha256: {m}")))?;
    }
    if output.path.len() > MAX_BUILD_PATH_ENTRIES {
        return bad(format!(
            "output.path has more than {MAX_BUILD_PATH_ENTRIES} entries"
        ));
    }
    for (i, entry) in output.path.iter().enumerate() {
        let escapes = entry.is_empty()
            || entry.starts_with('/')
            || entry.contains(':')
            || entry.split('/').any(|part| part == "..")
            || entry.len() > MAX_BUILD_VALUE_LEN;
        if escapes {
            return bad(format!(
                "output.path[{i}] {entry:?} must be a relative directory inside the release"
            ));
        }
    }
    if output.env.len() > px_proto::manifest::MAX_ENV_VARS {
        return bad(format!(
            "output.env has more than {} variables",
            px_proto::manifest::MAX_ENV_VARS
        ));
    }
    for (key, value) in &output.env {
        px_proto::names::check_config_key(key).or_else(|m| bad(format!("output.env: {m}")))?;
        if value.len() > MAX_BUILD_VALUE_LEN || value.contains('\0') {
            return bad(format!(
                "output.env.{key} must be at most {MAX_BUILD_VALUE_LEN} bytes, without NUL"
            ));
        }
    }
    let names = output.runtime.iter().chain(&output.commands);
    if output.commands.len() > MAX_BUILD_COMMANDS
        || names.clone().any(|n| n.len() > MAX_BUILD_NAME_LEN)
    {
        return bad(format!(
            "output.runtime and output.commands are limited to {MAX_BUILD_COMMANDS} names of {MAX_BUILD_NAME_LEN} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use px_proto::build::{LayerKind, LayerRef};

    use super::*;

    fn output(number: u64) -> BuildOutput {
        BuildOutput {
            build: number,
            layers: vec![LayerRef {
                kind: LayerKind::App,
                sha256: "a".repeat(64),
                size: 1,
            }],
            path: vec![".px/runtime/bin".into()],
            env: BTreeMap::from([("PYTHONUSERBASE".into(), "{release}/.px/deps".into())]),
            runtime: Some("python3 3.12.1".into()),
            commands: vec!["python3".into()],
        }
    }

    #[test]
    fn a_build_output_is_checked_before_anything_is_stored() {
        assert!(check_output(3, &output(3)).is_ok());
        type Change = Box<dyn Fn(&mut BuildOutput)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|o| o.build = 4), "output.build"),
            (Box::new(|o| o.layers.clear()), "output.layers"),
            (
                Box::new(|o| o.layers = vec![o.layers[0].clone(); MAX_BUILD_LAYERS + 1]),
                "output.layers",
            ),
            (
                Box::new(|o| o.layers[0].sha256 = "../etc".into()),
                "output.layers[0].sha256",
            ),
            (
                Box::new(|o| o.path = vec!["../bin".into()]),
                "output.path[0]",
            ),
            (
                Box::new(|o| o.path = vec!["/usr/bin".into()]),
                "output.path[0]",
            ),
            (
                Box::new(|o| {
                    o.env.insert("PX_APP".into(), "x".into());
                }),
                "output.env",
            ),
            (
                Box::new(|o| {
                    o.env
                        .insert("A".into(), "x".repeat(MAX_BUILD_VALUE_LEN + 1));
                }),
                "output.env.A",
            ),
            (
                Box::new(|o| o.commands = vec!["x".into(); MAX_BUILD_COMMANDS + 1]),
                "output.commands",
            ),
        ];
        for (change, named) in cases {
            let mut bad = output(3);
            change(&mut bad);
            let err = check_output(3, &bad).unwrap_err();
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
    }
}
