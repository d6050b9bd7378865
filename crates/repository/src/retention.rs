//! Release retention and bundle garbage collection: a periodic [`sweep`] deletes release records
//! the policy no longer keeps, then bundles no remaining release points to.
//!
//! The two phases run in this order so that a bundle is only judged unreferenced after the
//! records that will go are gone, and only from a complete listing: if any release record
//! cannot be listed or read, no bundle is deleted in that sweep. Both backends go through the
//! same code; only [`Storage::list_bundles`] and [`Storage::delete`] differ.
//!
//! [`Storage::list_bundles`]: crate::storage::Storage::list_bundles
//! [`Storage::delete`]: crate::storage::Storage::delete

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use px_proto::api::ReleaseCause;
use px_runtime::shutdown::CriticalTasks;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::error::ApiError;
use crate::releases::Releases;

/// Wait before the first sweep: long enough that start-up (storage check, readiness, Beacon's
/// first reconcile reading every app) is not slowed by a sweep's listing, short enough that
/// a service restarted often still sweeps.
pub const FIRST_SWEEP_DELAY: Duration = Duration::from_secs(30);

/// What a sweep keeps; see `[retention]` in `config.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Newest release records kept per app whatever their age.
    pub keep_releases: usize,
    /// Releases younger than this are kept even beyond `keep_releases`.
    pub keep_for: Duration,
    /// Unreferenced bundles younger than this are kept (their release may be committing).
    pub bundle_grace: Duration,
}

impl From<&RetentionConfig> for Policy {
    fn from(config: &RetentionConfig) -> Self {
        Self {
            keep_releases: config.keep_releases,
            keep_for: config.keep_for,
            bundle_grace: config.bundle_grace,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub releases_deleted: u64,
    pub bundles_deleted: u64,
    pub bytes_freed: u64,
    /// Bundles still stored after the sweep, and their bytes (when the bundle phase ran).
    pub bundles_kept: u64,
    pub bytes_kept: u64,
    /// Whether the bundle phase ran; it is skipped when the release records could not all be
    /// read, because a bundle must never be deleted on partial knowledge.
    pub bundles_swept: bool,
    /// What went wrong, one sentence each; the sweep carried on where that was safe.
    pub errors: Vec<String>,
}

/// Runs one sweep as of `now` and records it in the metrics.
pub async fn sweep(releases: &Releases, policy: &Policy, now: SystemTime) -> SweepReport {
    let mut report = SweepReport::default();
    // Records are immutable, so a bundle digest read in the first phase holds in the second.
    let mut known = HashMap::new();
    collect_releases(releases, policy, now, &mut known, &mut report).await;
    collect_bundles(releases, policy, now, &known, &mut report).await;

    let metrics = releases.metrics();
    metrics.retention_sweeps.inc();
    metrics.releases_collected.add(report.releases_deleted);
    metrics.bundles_collected.add(report.bundles_deleted);
    metrics.bundle_bytes_collected.add(report.bytes_freed);
    if report.bundles_swept {
        metrics.bundles.set(report.bundles_kept);
        metrics.bundle_bytes.set(report.bytes_kept);
    }
    for error in &report.errors {
        tracing::warn!(%error, "retention sweep problem");
    }
    tracing::info!(
        releases_deleted = report.releases_deleted,
        bundles_deleted = report.bundles_deleted,
        bytes_freed = report.bytes_freed,
        bundles_kept = report.bundles_kept,
        bytes_kept = report.bytes_kept,
        bundles_swept = report.bundles_swept,
        errors = report.errors.len(),
        "retention sweep done"
    );
    report
}

/// Bundle digests of release records, by app and number.
type Known = HashMap<(String, u64), String>;

/// Phase one: per app, deletes the records the policy does not keep. A failure with one app
/// is reported and the next app is swept: deleting records is safe app by app.
async fn collect_releases(
    releases: &Releases,
    policy: &Policy,
    now: SystemTime,
    known: &mut Known,
    report: &mut SweepReport,
) {
    let apps = match releases.app_names().await {
        Ok(apps) => apps,
        Err(e) => {
            report
                .errors
                .push(format!("listing apps: {}", describe(&e)));
            return;
        }
    };
    for app in apps {
        if let Err(e) = collect_app_releases(releases, policy, now, &app, known, report).await {
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
    let current = releases.newest(app, pointer).await?;
    let mut protected = BTreeSet::from([newest_record]);
    if let Some(current) = &current {
        protected.insert(current.version);
        // The release a rollback without a target goes to.
        protected.insert(current.version.saturating_sub(1));
        if let ReleaseCause::Rollback { to } = current.cause {
            protected.insert(to);
        }
        known.insert(
            (app.to_string(), current.version),
            current.bundle.sha256.clone(),
        );
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
        known.insert((app.to_string(), version), release.bundle.sha256.clone());
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

/// Phase two: deletes the bundles that no release record points to and that are older than
/// the grace, unless a release was committed to one meanwhile.
async fn collect_bundles(
    releases: &Releases,
    policy: &Policy,
    now: SystemTime,
    known: &Known,
    report: &mut SweepReport,
) {
    // Before the listing, so commits that the listing misses are noted by the collection.
    let collection = releases.begin_collection().await;
    let referenced = match referenced_bundles(releases, known).await {
        Ok(referenced) => referenced,
        Err(e) => {
            report.errors.push(format!(
                "listing release records failed, so no bundle was collected: {}",
                describe(&e)
            ));
            return;
        }
    };
    let bundles = match releases.storage().list_bundles().await {
        Ok(bundles) => bundles,
        Err(e) => {
            report.errors.push(format!("listing bundles: {e}"));
            return;
        }
    };
    report.bundles_swept = true;
    for bundle in bundles {
        let age = now.duration_since(bundle.modified).unwrap_or_default();
        let keep = referenced.contains(&bundle.sha256) || age < policy.bundle_grace;
        let deleted = if keep {
            false
        } else {
            match collection.delete_bundle(&bundle.sha256).await {
                Ok(deleted) => deleted,
                Err(e) => {
                    report
                        .errors
                        .push(format!("deleting bundle {}: {e}", bundle.sha256));
                    false
                }
            }
        };
        if deleted {
            report.bundles_deleted += 1;
            report.bytes_freed += bundle.size;
            tracing::info!(sha256 = %bundle.sha256, size = bundle.size, age = %humantime::format_duration(age), "unreferenced bundle collected");
        } else {
            report.bundles_kept += 1;
            report.bytes_kept += bundle.size;
        }
    }
}

/// The digest of every bundle a stored release record points to, in every app directory
/// (even one without `app.json`: its records still reference bundles). Any failure fails it.
async fn referenced_bundles(
    releases: &Releases,
    known: &Known,
) -> Result<HashSet<String>, ApiError> {
    let mut referenced = HashSet::new();
    for app in releases.app_names().await? {
        for version in releases.versions(&app).await? {
            if let Some(sha256) = known.get(&(app.clone(), version)) {
                referenced.insert(sha256.clone());
            } else if let Some(release) = releases.release_at(&app, version).await? {
                referenced.insert(release.bundle.sha256);
            }
        }
    }
    Ok(referenced)
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
        tracing::info!("retention disabled; releases and bundles are kept forever");
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
    use crate::storage::Storage;
    use crate::storage::fs::FsStorage;

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
            },
            manifest: AppManifest::parse("name = \"app\"\nrun = \"true\"\n").unwrap(),
            config: Default::default(),
            cause: ReleaseCause::Deploy,
            description: "deploy".into(),
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
        // Here the sweep lists the release records (none), then a commit takes `a`.
        releases
            .commit("app", "test", |_| Ok(draft(&"a".repeat(64))))
            .await
            .unwrap();
        assert!(!collection.delete_bundle(&"a".repeat(64)).await.unwrap());
        assert!(collection.delete_bundle(&"b".repeat(64)).await.unwrap());
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
