//! Builds (docs/src/design/builds.md): an upload that needs a build becomes a pending build
//! record instead of a release; the node that ran it finishes it into a release with its
//! layers, or fails it; a newer upload of the app supersedes it.
//!
//! Keys, under `apps/<app>/builds/`, all created only if absent:
//! - `<n>.json`: the [`Build`] as queued, numbered per app as releases are (the next number
//!   after the highest stored, probing forward; create-if-absent is what takes it).
//! - `<n>.claim.json`: who decides how the build ends: its finish, its failure, or a newer
//!   upload superseding it. Exactly one creates it, so a late finish and a newer upload
//!   never both win; only the claimant writes the result (or a reader repairing a claimant
//!   that stopped halfway).
//! - `<n>.result.json`: the [`BuildResult`]. Its creation is final: the first result wins, so
//!   two builders, or a retry, never record two.
//! - `<n>.log`: the build's output, its last [`MAX_BUILD_LOG_BYTES`].
//!
//! Queueing, listing and superseding are here; a build's finish and failure in `finish.rs`.

use std::collections::BTreeSet;

use bytes::Bytes;
use px_bundle::BundleInfo;
use px_proto::api::{BundleRef, Release};
use px_proto::build::{Build, BuildResult, MAX_BUILD_LOG_BYTES};
use px_proto::manifest::AppManifest;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::releases::{AppLocks, MAX_COMMIT_ATTEMPTS, Releases, now_rfc3339};
use crate::storage::{Blob, StorageError};

mod finish;

/// Builds listed in one answer for an app, newest first: as many as releases.
pub const MAX_LISTED_BUILDS: usize = crate::releases::MAX_LISTED_RELEASES;
/// Pending builds listed across apps in one answer. A newer upload supersedes an app's
/// pending builds, so there is about one per app with a build under way; this bounds the
/// answer Beacon reads at every reconcile on a platform with that many apps building at once.
pub const MAX_LISTED_PENDING: usize = 1000;
/// Most layers one build may name: a runtime, dependencies and the app make three, and the
/// margin leaves room for a stack that splits one of them, while bounding what a release
/// record carries and what a finish checks.
pub const MAX_BUILD_LAYERS: usize = 8;
/// Most `PATH` entries a build may add: a runtime's `bin` and an installer's make two.
pub const MAX_BUILD_PATH_ENTRIES: usize = 16;
/// Longest `PATH` entry or environment value a build may add, in bytes: paths inside a
/// release are short, and the bound keeps a release record small.
pub const MAX_BUILD_VALUE_LEN: usize = 4096;
/// Longest failure reason kept, in characters: one sentence, the log holds the rest.
pub const MAX_FAIL_REASON_CHARS: usize = 1000;
/// Longest `runtime` string and command name a build may report, in bytes.
pub const MAX_BUILD_NAME_LEN: usize = 128;
/// Most commands a runtime layer may say it provides (`python3`, `python`, `pip`, `node`,
/// `npm`, `npx`, ...).
pub const MAX_BUILD_COMMANDS: usize = 32;

/// Decides whether an upload needs a build before it can run: [`px_proto::detect`] over the
/// root files [`px_bundle::inspect`] collected, so an installer input at the root (such as
/// `requirements.txt`) or `[build] command` in `app.toml` needs one. The one place this is
/// decided for apprepo.
pub(crate) fn needs_build(info: &BundleInfo) -> Result<bool, ApiError> {
    px_proto::detect::detect(Some(&info.manifest), &info.root_files)
        .map(|detection| detection.needs_build())
        .map_err(|e| ApiError::InvalidBundle(format!("invalid bundle: {e}")))
}

/// The stored form of `<n>.json`: the [`Build`], and what a finish needs to tell a newer
/// upload from an older one.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildRecord {
    #[serde(flatten)]
    build: Build,
    /// The newest release when the build was queued: a plain upload committed above it came
    /// after this build, and supersedes it.
    #[serde(default)]
    base_release: u64,
}

/// The stored form of `<n>.claim.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
enum Claim {
    Finish,
    Fail,
    Supersede { by: String },
}

fn builds_prefix(app: &str) -> String {
    format!("apps/{app}/builds/")
}

fn record_key(app: &str, number: u64) -> String {
    format!("apps/{app}/builds/{number}.json")
}

fn claim_key(app: &str, number: u64) -> String {
    format!("apps/{app}/builds/{number}.claim.json")
}

fn result_key(app: &str, number: u64) -> String {
    format!("apps/{app}/builds/{number}.result.json")
}

fn log_key(app: &str, number: u64) -> String {
    format!("apps/{app}/builds/{number}.log")
}

/// The number an object under `apps/<app>/builds/` belongs to, and whether it is the record
/// itself (`<n>.json`).
pub(crate) fn parse_build_object(name: &str) -> Option<(u64, bool)> {
    let (number, rest) = name.split_once('.')?;
    let number = number.parse().ok()?;
    Some((number, rest == "json"))
}

/// The last `max` bytes of `log` at most, cut at a character boundary.
pub(crate) fn tail(log: &str, max: usize) -> &str {
    if log.len() <= max {
        return log;
    }
    let mut start = log.len() - max;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

fn corrupt(key: &str, e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("{key} is not valid JSON: {e}"))
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// What `apps/<app>/builds/` holds, by build number.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// Numbers with a record (`<n>.json`).
    pub(crate) records: BTreeSet<u64>,
    /// Numbers with a result.
    pub(crate) results: BTreeSet<u64>,
    /// Every number any object belongs to (records, and what a sweep interrupted left).
    pub(crate) all: BTreeSet<u64>,
}

impl Listing {
    /// Builds with a record and no result yet, oldest first.
    pub(crate) fn pending(&self) -> impl Iterator<Item = u64> + '_ {
        self.records
            .iter()
            .copied()
            .filter(|n| !self.results.contains(n))
    }
}

/// What a finish did: the release it committed, or the one an earlier finish of the same
/// build committed (an idempotent retry).
pub enum Finished {
    Committed(Release),
    AlreadyCommitted(Release),
}

/// Builds and their records, over the same storage as releases.
#[derive(Clone)]
pub struct Builds {
    releases: Releases,
    /// Queueing takes a build number per app one at a time within this process.
    locks: AppLocks,
}

impl Builds {
    pub fn new(releases: Releases) -> Self {
        Self {
            releases,
            locks: AppLocks::default(),
        }
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ApiError> {
        let storage = self.releases.storage();
        match self.releases.count_storage_error(storage.read(key).await)? {
            Some(stored) => Ok(Some(
                serde_json::from_slice(&stored.bytes).map_err(|e| corrupt(key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Creates `key` unless it exists; returns whether this call created it.
    async fn create(&self, key: &str, bytes: Bytes) -> Result<bool, ApiError> {
        let storage = self.releases.storage();
        match self
            .releases
            .count_storage_error(storage.create(key, bytes).await)
        {
            Ok(()) => Ok(true),
            Err(StorageError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn listing(&self, app: &str) -> Result<Listing, ApiError> {
        let storage = self.releases.storage();
        let names = self
            .releases
            .count_storage_error(storage.list(&builds_prefix(app)).await)?;
        let mut listing = Listing::default();
        for name in names {
            let Some((number, is_record)) = parse_build_object(&name) else {
                continue;
            };
            listing.all.insert(number);
            if is_record {
                listing.records.insert(number);
            } else if name == format!("{number}.result.json") {
                listing.results.insert(number);
            }
        }
        Ok(listing)
    }

    async fn record(&self, app: &str, number: u64) -> Result<Option<BuildRecord>, ApiError> {
        self.read(&record_key(app, number)).await
    }

    async fn result(&self, app: &str, number: u64) -> Result<Option<BuildResult>, ApiError> {
        self.read(&result_key(app, number)).await
    }

    /// The build as the API shows it, its result filled in; `None` when not stored.
    pub(crate) async fn build_at(&self, app: &str, number: u64) -> Result<Option<Build>, ApiError> {
        let Some(record) = self.record(app, number).await? else {
            return Ok(None);
        };
        let mut build = record.build;
        build.result = self.result(app, number).await?;
        Ok(Some(build))
    }

    /// Build `number` of `app`, or a 404 naming what is missing.
    pub async fn build(&self, app: &str, number: u64) -> Result<Build, ApiError> {
        self.releases.require_app(app).await?;
        self.build_at(app, number)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("app {app:?} has no build {number}")))
    }

    /// The app's builds, newest first, at most [`MAX_LISTED_BUILDS`].
    pub async fn list(&self, app: &str) -> Result<Vec<Build>, ApiError> {
        self.releases.require_app(app).await?;
        let listing = self.listing(app).await?;
        let mut builds = Vec::new();
        for &number in listing.records.iter().rev().take(MAX_LISTED_BUILDS) {
            // Gone between the listing and the read: collected by retention just now.
            if let Some(build) = self.build_at(app, number).await? {
                builds.push(build);
            }
        }
        Ok(builds)
    }

    /// Builds without a result across every app, oldest first within an app, at most
    /// [`MAX_LISTED_PENDING`]: what Beacon places on nodes that may build.
    pub async fn pending(&self) -> Result<Vec<Build>, ApiError> {
        let mut pending = Vec::new();
        for app in self.releases.app_names().await? {
            let listing = self.listing(&app).await?;
            for number in listing.pending() {
                if pending.len() >= MAX_LISTED_PENDING {
                    return Ok(pending);
                }
                let Some(record) = self.record(&app, number).await? else {
                    continue;
                };
                pending.push(record.build);
            }
        }
        Ok(pending)
    }

    /// The build's stored log, or a 404 when it has none yet.
    pub async fn log(&self, app: &str, number: u64) -> Result<Bytes, ApiError> {
        self.build(app, number).await?;
        let storage = self.releases.storage();
        match self
            .releases
            .count_storage_error(storage.read(&log_key(app, number)).await)?
        {
            Some(stored) => Ok(stored.bytes),
            None => Err(ApiError::NotFound(format!(
                "build {number} of {app:?} has no log; one is stored when a build finishes or fails"
            ))),
        }
    }

    /// Queues an upload that needs a build: creates its record with the next build number,
    /// then supersedes the app's older pending builds. The source bundle is stored already.
    pub async fn queue(
        &self,
        app: &str,
        by: &str,
        source: BundleRef,
        manifest: AppManifest,
        description: String,
    ) -> Result<Build, ApiError> {
        let queued = {
            let _serialised = self.locks.lock(app).await;
            self.take_number(app, by, source, manifest, description)
                .await?
        };
        self.releases.metrics().builds_queued.inc();
        tracing::info!(%app, build = queued.number, source = %queued.source.sha256, by, "build queued");
        self.supersede(app, &format!("build {}", queued.number), |pending| {
            pending.build.number < queued.number
        })
        .await;
        Ok(queued)
    }

    async fn take_number(
        &self,
        app: &str,
        by: &str,
        source: BundleRef,
        manifest: AppManifest,
        description: String,
    ) -> Result<Build, ApiError> {
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let listing = self.listing(app).await?;
            let mut number = listing.all.last().copied().unwrap_or(0) + 1;
            // The listing may lag a record just created by another repository: probe forward.
            while self.record(app, number).await?.is_some() {
                number += 1;
            }
            let base_release = self
                .releases
                .head(app)
                .await?
                .current
                .map_or(0, |r| r.version);
            let build = Build {
                app: app.into(),
                number,
                source: source.clone(),
                manifest: manifest.clone(),
                description: description.clone(),
                created_at: now_rfc3339(),
                created_by: by.into(),
                result: None,
            };
            let record = BuildRecord {
                build,
                base_release,
            };
            // The source must outlive a collection running now: a pending build's source is
            // referenced as a release's bundle is.
            let held = self
                .releases
                .hold(&[(Blob::Bundle, source.sha256.as_str())])
                .await?;
            held.in_time()?;
            let created = self
                .create(&record_key(app, number), to_json(&record)?)
                .await?;
            drop(held);
            if created {
                return Ok(record.build);
            }
        }
        Err(ApiError::Conflict(format!(
            "too many concurrent uploads of {app:?}; retry in a moment"
        )))
    }

    /// Supersedes a newly committed plain upload's older pending builds: those queued before
    /// release `version` was committed.
    pub async fn superseded_by_release(&self, app: &str, version: u64) {
        self.supersede(app, &format!("v{version}"), |pending| {
            pending.base_release < version
        })
        .await;
    }

    /// Records every pending build of `app` that `older` selects as superseded by `by`,
    /// unless a finish or a failure claimed it first. The upload that supersedes has
    /// succeeded already, so a failure here is logged, not answered: a finish of such a build
    /// finds the newer upload itself and records the same.
    async fn supersede(&self, app: &str, by: &str, older: impl Fn(&BuildRecord) -> bool) {
        let pending: Vec<u64> = match self.listing(app).await {
            Ok(listing) => listing.pending().collect(),
            Err(e) => {
                tracing::warn!(%app, error = %e, "cannot list pending builds to supersede them");
                return;
            }
        };
        for number in pending {
            let superseded = async {
                let Some(record) = self.record(app, number).await? else {
                    return Ok::<bool, ApiError>(false);
                };
                if !older(&record) {
                    return Ok(false);
                }
                let claim = Claim::Supersede { by: by.into() };
                match self.claim(app, number, claim).await? {
                    Claim::Supersede { by } => {
                        self.record_result(app, number, &BuildResult::Superseded { by })
                            .await?;
                        Ok(true)
                    }
                    // The build is ending on its own; its finish checks for newer uploads.
                    Claim::Finish | Claim::Fail => Ok(false),
                }
            };
            match superseded.await {
                Ok(true) => {
                    self.releases.metrics().builds_superseded.inc();
                    tracing::info!(%app, build = number, by, "pending build superseded");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%app, build = number, by, error = %e, "cannot supersede a pending build")
                }
            }
        }
    }

    /// Claims how build `number` ends; returns the claim that holds (this one, or an earlier).
    async fn claim(&self, app: &str, number: u64, claim: Claim) -> Result<Claim, ApiError> {
        let key = claim_key(app, number);
        if self.create(&key, to_json(&claim)?).await? {
            return Ok(claim);
        }
        self.read(&key)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{key} vanished after it was created")))
    }

    /// Creates the build's result unless one exists; returns the result that holds.
    async fn record_result(
        &self,
        app: &str,
        number: u64,
        result: &BuildResult,
    ) -> Result<BuildResult, ApiError> {
        let key = result_key(app, number);
        if self.create(&key, to_json(result)?).await? {
            return Ok(result.clone());
        }
        self.read(&key)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{key} vanished after it was created")))
    }

    /// Stores the build's log (its tail) unless one is stored.
    async fn store_log(&self, app: &str, number: u64, log: &str) -> Result<(), ApiError> {
        let tail = tail(log, MAX_BUILD_LOG_BYTES);
        self.create(
            &log_key(app, number),
            Bytes::copy_from_slice(tail.as_bytes()),
        )
        .await?;
        Ok(())
    }

    /// The record of a build that a finish or failure names, or a 404.
    async fn existing(&self, app: &str, number: u64) -> Result<BuildRecord, ApiError> {
        self.releases.require_app(app).await?;
        self.record(app, number)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("app {app:?} has no build {number}")))
    }

    /// Deletes every object of build `number` (retention): the record first, so that an
    /// interrupted deletion never leaves a build that looks pending.
    pub(crate) async fn delete(&self, app: &str, number: u64) -> Result<(), ApiError> {
        let storage = self.releases.storage();
        for key in [
            record_key(app, number),
            result_key(app, number),
            log_key(app, number),
            claim_key(app, number),
        ] {
            self.releases
                .count_storage_error(storage.delete(&key).await)?;
        }
        Ok(())
    }

    /// The source bundle of a stored build, for retention.
    pub(crate) async fn source_of(
        &self,
        app: &str,
        number: u64,
    ) -> Result<Option<String>, ApiError> {
        Ok(self
            .record(app, number)
            .await?
            .map(|record| record.build.source.sha256))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_log_keeps_its_tail_at_a_character_boundary() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("0123456789", 4), "6789");
        // "é" is two bytes: a cut inside it moves past it.
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }

    #[test]
    fn build_objects_are_told_apart_by_name() {
        assert_eq!(parse_build_object("12.json"), Some((12, true)));
        assert_eq!(parse_build_object("12.result.json"), Some((12, false)));
        assert_eq!(parse_build_object("12.claim.json"), Some((12, false)));
        assert_eq!(parse_build_object("12.log"), Some((12, false)));
        assert_eq!(parse_build_object("notes.txt"), None);
        assert_eq!(parse_build_object("12"), None);
    }

    #[test]
    fn an_upload_needs_a_build_when_detection_says_so() {
        let plain = "name = \"app\"\nrun = \"python3 app.py\"\n";
        let built = "name = \"app\"\nrun = \"true\"\n[build]\ncommand = \"make\"\n";
        // The manifest, the root files with their content, and whether it needs a build.
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let cases: [Case; 4] = [
            (plain, &[], false),
            (plain, &[("requirements.txt", "gunicorn\n")], true),
            (
                plain,
                &[("package.json", "{}"), ("package-lock.json", "{}")],
                true,
            ),
            (built, &[], true),
        ];
        for (manifest, files, expected) in cases {
            let mut root_files = px_proto::detect::RootFiles::new();
            for (name, content) in files {
                root_files.insert(
                    name,
                    content.len() as u64,
                    Some(content.as_bytes().to_vec()),
                );
            }
            let info = BundleInfo {
                manifest: AppManifest::parse(manifest).unwrap(),
                root_files,
                entries: 1,
                unpacked_bytes: 1,
                bin_commands: Default::default(),
            };
            assert_eq!(
                needs_build(&info).unwrap(),
                expected,
                "{manifest} {files:?}"
            );
        }
    }
}
