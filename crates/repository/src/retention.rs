//! Retention and garbage collection: a periodic [`sweep`] deletes release records the policy no
//! longer keeps, then build records no kept release names, then bundles and layers no
//! remaining record points to.
//!
//! Phase three (`retention/blobs.rs`) marks what it means to delete and waits before deleting
//! it, so that it is safe against commits through other apprepos sharing the storage
//! (`condemned.rs`).
//!
//! The phases run in this order so that an object is only judged unreferenced after the
//! records that will go are gone, and only from a complete listing: if any release or build
//! record cannot be listed or read, no bundle or layer is deleted in that sweep. Both backends
//! go through the same code; only [`Storage::list_blobs`] and [`Storage::delete`] differ.
//!
//! [`Storage::list_blobs`]: crate::storage::Storage::list_blobs
//! [`Storage::delete`]: crate::storage::Storage::delete

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use px_proto::api::{Release, ReleaseCause};
use px_runtime::shutdown::CriticalTasks;
use tokio_util::sync::CancellationToken;

use crate::builds::Builds;
use crate::config::RetentionConfig;
use crate::error::ApiError;
use crate::releases::Releases;

mod blobs;

/// Wait before the first sweep: long enough that start-up (storage check, readiness, Beacon's
/// first reconcile reading every app) is not slowed by a sweep's listing, short enough that
/// a service restarted often still sweeps.
pub const FIRST_SWEEP_DELAY: Duration = Duration::from_secs(30);

/// What a sweep keeps; see `[retention]` in `config.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Newest release records kept per app whatever their age; as many newest build records
    /// are kept too.
    pub keep_releases: usize,
    /// Releases younger than this are kept even beyond `keep_releases`.
    pub keep_for: Duration,
    /// Unreferenced bundles and layers younger than this are kept (their release may be
    /// committing).
    pub bundle_grace: Duration,
    /// How long a sweep waits between marking what it means to delete and deleting it
    /// (`condemned.rs`); zero only where one apprepo uses the storage.
    pub condemn_wait: Duration,
}

impl From<&RetentionConfig> for Policy {
    fn from(config: &RetentionConfig) -> Self {
        Self {
            keep_releases: config.keep_releases,
            keep_for: config.keep_for,
            bundle_grace: config.bundle_grace,
            condemn_wait: config.condemn_wait,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub releases_deleted: u64,
    /// Builds whose records (and result, log) were deleted.
    pub builds_deleted: u64,
    pub bundles_deleted: u64,
    pub bytes_freed: u64,
    /// Bundles still stored after the sweep, and their bytes (when the bundle phase ran).
    pub bundles_kept: u64,
    pub bytes_kept: u64,
    /// Whether the bundle phase ran; it is skipped when the release or build records could
    /// not all be read, because a bundle must never be deleted on partial knowledge.
    pub bundles_swept: bool,
    pub layers_deleted: u64,
    pub layer_bytes_freed: u64,
    /// Layers still stored after the sweep, and their bytes (when the layer phase ran).
    pub layers_kept: u64,
    pub layer_bytes_kept: u64,
    /// Whether the layer phase ran, on the same condition as the bundle phase.
    pub layers_swept: bool,
    /// What went wrong, one sentence each; the sweep carried on where that was safe.
    pub errors: Vec<String>,
}

/// Runs one sweep as of `now` and records it in the metrics.
pub async fn sweep(releases: &Releases, policy: &Policy, now: SystemTime) -> SweepReport {
    let mut report = SweepReport::default();
    let builds = Builds::new(releases.clone());
    // Records are immutable, so what a record names, read in one phase, holds in the next.
    let mut known = HashMap::new();
    // Phases one and two sweep the apps listed once; phase three lists them again, since an
    // app created meanwhile may already reference blobs.
    match releases.app_names().await {
        Ok(apps) => {
            collect_releases(releases, &apps, policy, now, &mut known, &mut report).await;
            collect_builds(releases, &builds, &apps, policy, &mut known, &mut report).await;
        }
        Err(e) => report
            .errors
            .push(format!("listing apps: {}", describe(&e))),
    }
    blobs::collect_blobs(releases, &builds, policy, now, &known, &mut report).await;

    let metrics = releases.metrics();
    metrics.retention_sweeps.inc();
    metrics.releases_collected.add(report.releases_deleted);
    metrics.build_records_collected.add(report.builds_deleted);
    metrics.bundles_collected.add(report.bundles_deleted);
    metrics.bundle_bytes_collected.add(report.bytes_freed);
    metrics.layers_collected.add(report.layers_deleted);
    metrics.layer_bytes_collected.add(report.layer_bytes_freed);
    if report.bundles_swept {
        metrics.bundles.set(report.bundles_kept);
        metrics.bundle_bytes.set(report.bytes_kept);
    }
    if report.layers_swept {
        metrics.layers.set(report.layers_kept);
        metrics.layer_bytes.set(report.layer_bytes_kept);
    }
    for error in &report.errors {
        tracing::warn!(%error, "retention sweep problem");
    }
    tracing::info!(
        releases_deleted = report.releases_deleted,
        builds_deleted = report.builds_deleted,
        bundles_deleted = report.bundles_deleted,
        bytes_freed = report.bytes_freed,
        bundles_kept = report.bundles_kept,
        bytes_kept = report.bytes_kept,
        layers_deleted = report.layers_deleted,
        layers_kept = report.layers_kept,
        bundles_swept = report.bundles_swept,
        layers_swept = report.layers_swept,
        errors = report.errors.len(),
        "retention sweep done"
    );
    report
}

/// What a release record names: its bundle, its layers, the build that made it.
#[derive(Debug, Clone)]
struct Names {
    bundle: String,
    layers: Vec<String>,
    build: Option<u64>,
}

impl From<&Release> for Names {
    fn from(release: &Release) -> Self {
        Self {
            bundle: release.bundle.sha256.clone(),
            layers: release
                .build
                .iter()
                .flat_map(|b| b.layers.iter().map(|l| l.sha256.clone()))
                .collect(),
            build: release.build.as_ref().map(|b| b.build),
        }
    }
}

/// What release records name, by app and number.
type Known = HashMap<(String, u64), Names>;

/// What the release records of `app` still stored name, each read once (from `known` when an
/// earlier phase read it). Any failure fails it.
async fn remaining(
    releases: &Releases,
    app: &str,
    known: &mut Known,
) -> Result<Vec<Names>, ApiError> {
    let mut names = Vec::new();
    for version in releases.versions(app).await? {
        let key = (app.to_string(), version);
        if let Some(found) = known.get(&key) {
            names.push(found.clone());
        } else if let Some(release) = releases.release_at(app, version).await? {
            let found = Names::from(&release);
            known.insert(key, found.clone());
            names.push(found);
        }
    }
    Ok(names)
}

/// Phase one: per app, deletes the records the policy does not keep. A failure with one app
/// is reported and the next app is swept: deleting records is safe app by app.
async fn collect_releases(
    releases: &Releases,
    apps: &[String],
    policy: &Policy,
    now: SystemTime,
    known: &mut Known,
    report: &mut SweepReport,
) {
    for app in apps {
        if let Err(e) = collect_app_releases(releases, policy, now, app, known, report).await {
            report.errors.push(format!(
                "sweeping the releases of {app:?}: {}",
                describe(&e)
            ));
        }
    }
}

async fn collect_app_releases(
    releases: &Releases,
    policy: &Policy,
    now: SystemTime,
    app: &str,
    known: &mut Known,
    report: &mut SweepReport,
) -> Result<(), ApiError> {
    // No app.json: a creation that did not finish, or not an app at all; leave it be.
    let Some(pointer) = releases.pointer(app).await? else {
        return Ok(());
    };
    let versions = releases.versions(app).await?;
    let Some(&newest_record) = versions.last() else {
        return Ok(());
    };
    let newest = releases.newest(app, pointer).await?;
    // The release that serves, which may be below releases whose phase failed or is pending.
    let current = releases.live(app, newest).await?;
    let mut protected = BTreeSet::from([newest_record]);
    if let Some(current) = &current {
        protected.insert(current.version);
        // The release a rollback without a target goes to.
        protected.insert(current.version.saturating_sub(1));
        if let ReleaseCause::Rollback { to } = current.cause {
            protected.insert(to);
        }
        known.insert((app.to_string(), current.version), Names::from(current));
    }
    let newest_kept: BTreeSet<u64> = versions
        .iter()
        .rev()
        .take(policy.keep_releases)
        .copied()
        .collect();
    // Oldest first, so an interrupted sweep leaves the newest records, as the policy wants.
    for &version in &versions {
        // Readers probe forward from the pointer: the record it names and every one above it
        // must stay, or the probe would stop short of the current release.
        if version >= pointer || protected.contains(&version) || newest_kept.contains(&version) {
            continue;
        }
        let Some(release) = releases.release_at(app, version).await? else {
            continue; // Collected since the listing, by another repository's sweep.
        };
        known.insert((app.to_string(), version), Names::from(&release));
        let created = match humantime::parse_rfc3339_weak(&release.created_at) {
            Ok(created) => created,
            Err(e) => {
                report.errors.push(format!(
                    "{app} v{version} keeps an unreadable created_at {:?} ({e}); kept",
                    release.created_at
                ));
                continue;
            }
        };
        // A record from the future (clocks disagree) has age zero: kept.
        let age = now.duration_since(created).unwrap_or_default();
        if age < policy.keep_for {
            continue;
        }
        releases.delete_release(app, version).await?;
        known.remove(&(app.to_string(), version));
        report.releases_deleted += 1;
        tracing::info!(%app, version, bundle = %release.bundle.sha256, created_at = %release.created_at, "release record collected");
    }
    Ok(())
}

/// Phase two: per app, deletes the build records outside the newest `keep_releases` that no
/// remaining release names and that have a result (a pending build stays: it is the newest
/// upload). A failure with one app is reported and the next app is swept.
async fn collect_builds(
    releases: &Releases,
    builds: &Builds,
    apps: &[String],
    policy: &Policy,
    known: &mut Known,
    report: &mut SweepReport,
) {
    for app in apps {
        if let Err(e) = collect_app_builds(releases, builds, policy, app, known, report).await {
            report
                .errors
                .push(format!("sweeping the builds of {app:?}: {}", describe(&e)));
        }
    }
}

async fn collect_app_builds(
    releases: &Releases,
    builds: &Builds,
    policy: &Policy,
    app: &str,
    known: &mut Known,
    report: &mut SweepReport,
) -> Result<(), ApiError> {
    if releases.pointer(app).await?.is_none() {
        return Ok(());
    }
    let listing = builds.listing(app).await?;
    if listing.all.is_empty() {
        return Ok(());
    }
    let mut kept: BTreeSet<u64> = listing
        .records
        .iter()
        .rev()
        .take(policy.keep_releases)
        .copied()
        .collect();
    kept.extend(listing.pending());
    kept.extend(
        remaining(releases, app, known)
            .await?
            .iter()
            .filter_map(|names| names.build),
    );
    // Oldest first, as for releases; every number, so what an interrupted sweep left goes too.
    for &number in &listing.all {
        if kept.contains(&number) {
            continue;
        }
        builds.delete(app, number).await?;
        if listing.records.contains(&number) {
            report.builds_deleted += 1;
            tracing::info!(%app, build = number, "build record collected");
        }
    }
    Ok(())
}

/// An error as an operator needs it: [`ApiError::Internal`] shows clients a generic sentence,
/// but its message says what is wrong.
fn describe(e: &ApiError) -> String {
    match e {
        ApiError::Internal(message) => message.clone(),
        other => other.to_string(),
    }
}

/// Starts the periodic sweep as the critical task "retention", stopped by `shutdown` (a sweep
/// in progress is abandoned: every step of it is safe to stop after).
pub fn start(
    releases: Releases,
    config: &RetentionConfig,
    critical: &CriticalTasks,
    shutdown: CancellationToken,
) {
    if !config.enabled {
        tracing::info!("retention disabled; releases, builds, bundles and layers are kept forever");
        return;
    }
    let policy = Policy::from(config);
    let interval = config.interval;
    tracing::info!(
        keep_releases = policy.keep_releases,
        keep_for = %humantime::format_duration(policy.keep_for),
        bundle_grace = %humantime::format_duration(policy.bundle_grace),
        interval = %humantime::format_duration(interval),
        "retention sweeps scheduled"
    );
    critical.spawn("retention", async move {
        let first = tokio::time::Instant::now() + interval.min(FIRST_SWEEP_DELAY);
        let mut ticks = tokio::time::interval_at(first, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sweep(&releases, &policy, SystemTime::now()) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use px_proto::api::BundleRef;
    use px_proto::manifest::AppManifest;

    use super::*;
    use crate::metrics::Metrics;
    use crate::releases::Draft;
    use crate::storage::fs::FsStorage;
    use crate::storage::{Blob, Storage};

    async fn store_bundle(storage: &FsStorage, dir: &std::path::Path, sha256: &str) {
        let spool = dir.join(format!("spool-{sha256}"));
        std::fs::write(&spool, sha256).unwrap();
        storage.put_bundle(sha256, &spool, 64).await.unwrap();
    }

    fn draft(sha256: &str) -> Draft {
        Draft {
            bundle: BundleRef {
                sha256: sha256.into(),
                size: 64,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest: AppManifest::parse("name = \"app\"\nrun = \"true\"\n").unwrap(),
            config: Default::default(),
            cause: ReleaseCause::Deploy,
            description: "deploy".into(),
            build: None,
            phase: None,
        }
    }

    /// The race an upload of an already-stored bundle runs against a sweep: the sweep listed
    /// the release records before the commit, so only the collection's note of the commit
    /// keeps the bundle; and a commit after the deletion is refused.
    #[tokio::test]
    async fn a_bundle_committed_during_a_collection_is_spared() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(FsStorage::open(&dir.path().join("storage")).await.unwrap());
        store_bundle(&storage, dir.path(), &"a".repeat(64)).await;
        store_bundle(&storage, dir.path(), &"b".repeat(64)).await;
        let releases = Releases::new(storage.clone(), Arc::new(Metrics::default()));
        releases.create_app("app", "test").await.unwrap();

        let collection = releases.begin_collection().await;
        // Here the sweep lists the release records (none) and marks both, then a commit
        // takes `a`.
        for sha256 in ["a".repeat(64), "b".repeat(64)] {
            releases.condemn(Blob::Bundle, &sha256).await.unwrap();
        }
        releases
            .commit("app", "test", |_| Ok(draft(&"a".repeat(64))))
            .await
            .unwrap();
        assert!(
            !collection
                .delete_blob(Blob::Bundle, &"a".repeat(64))
                .await
                .unwrap()
        );
        assert!(
            collection
                .delete_blob(Blob::Bundle, &"b".repeat(64))
                .await
                .unwrap()
        );
        assert!(storage.has_bundle(&"a".repeat(64)).await.unwrap());
        assert!(!storage.has_bundle(&"b".repeat(64)).await.unwrap());
        // Deleted while no release pointed to it: a commit to it now is refused.
        let refused = releases
            .commit("app", "test", |_| Ok(draft(&"b".repeat(64))))
            .await
            .err()
            .unwrap();
        assert!(matches!(refused, ApiError::Conflict(_)), "{refused}");
        drop(collection);

        // The next collection starts with a clean slate, and `a` is referenced by v1 anyway.
        let report = sweep(
            &releases,
            &Policy {
                keep_releases: 2,
                keep_for: Duration::ZERO,
                bundle_grace: Duration::ZERO,
                condemn_wait: Duration::ZERO,
            },
            SystemTime::now(),
        )
        .await;
        assert_eq!(
            (report.bundles_deleted, report.bundles_kept),
            (0, 1),
            "{report:?}"
        );
    }
}
