//! Apps and their immutable, numbered releases on top of [`Storage`].
//!
//! Commit protocol: a release is committed when its record `apps/<app>/releases/<n>.json` is
//! created, which succeeds only if that number is free (create-if-absent). The pointer
//! `apps/<app>/app.json` then advances to `n` by compare-and-swap. The pointer is a lower bound
//! that readers probe forward from, so a crash between the two steps, or a lost race on the
//! pointer, loses nothing; two concurrent commits that pick the same number see one of them
//! refused, and the loser retries with the next number.
//!
//! Retention (`retention.rs`) deletes old records but never the newest one, nor the one the
//! pointer names or any above it, so the forward probe from the pointer always finds the
//! current release. While it collects bundles and layers, commits check that their bundle and
//! layers are still stored and announce them to the collection (see [`Collection`]), so
//! neither is ever deleted under a release being committed to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use px_proto::api::{App, BundleRef, Release, ReleaseCause, ReleasePhase};
use px_proto::build::BuildOutput;
use px_proto::manifest::AppManifest;
use serde::{Deserialize, Serialize};

use crate::condemned::{COMMIT_WINDOW, DELETE_WITHIN, RESCUE_SETTLE};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::storage::{Blob, Storage, StorageError};

/// Attempts at taking a release number before giving up; each failure means another commit
/// to the same app succeeded, so reaching this takes dozens of simultaneous deploys.
pub const MAX_COMMIT_ATTEMPTS: usize = 32;
/// Most releases listed in one answer, newest first.
pub const MAX_LISTED_RELEASES: usize = 100;

/// The stored form of `apps/<app>/app.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AppRecord {
    name: String,
    created_at: String,
    created_by: String,
    /// A release number known to be committed (0: none yet); newer ones may exist.
    latest: u64,
}

fn app_key(app: &str) -> String {
    format!("apps/{app}/app.json")
}

fn release_key(app: &str, version: u64) -> String {
    format!("apps/{app}/releases/{version}.json")
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// What a new release is made of, decided from the current one.
pub struct Draft {
    pub bundle: BundleRef,
    pub manifest: AppManifest,
    pub config: BTreeMap<String, String>,
    pub cause: ReleaseCause,
    pub description: String,
    /// The layers of a built release: a finished build's output, or the one a config change or
    /// rollback copies from the release it starts from, so that neither ever rebuilds.
    pub build: Option<BuildOutput>,
    /// The release phase it runs before it goes live: a deploy's, from its manifest
    /// ([`crate::phases::pending_phase`]); never a config change's or a rollback's.
    pub phase: Option<ReleasePhase>,
}

/// One async mutex per app, so that work on one app (taking a number) goes one at a time
/// within this process while other apps proceed.
#[derive(Clone, Default)]
pub(crate) struct AppLocks(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl AppLocks {
    pub(crate) async fn lock(&self, app: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            locks.entry(app.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// An app as a commit attempt starts from: its pointer record, that record's version (for the
/// compare-and-swap), the newest committed release (the next number follows it) and the
/// release that serves (a new one starts from it). The two differ while a release phase is
/// pending, or after one failed.
pub(crate) struct Head {
    record: AppRecord,
    pointer_version: String,
    pub(crate) newest: u64,
    pub(crate) current: Option<Release>,
}

#[derive(Clone)]
pub struct Releases {
    storage: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    /// One lock per app, so commits from this process take numbers one after the other
    /// instead of racing through the storage's conditional writes. Several repositories
    /// sharing a bucket still rely on those (atomic on AWS S3); some S3-compatible servers
    /// check then write, and this lock keeps a single repository correct on them too.
    commit_locks: AppLocks,
    /// Commits hold it shared from checking that their bundle and layers are stored until
    /// their record is created; a collection holds it exclusively while it deletes one object.
    collection_lock: Arc<tokio::sync::RwLock<()>>,
    /// Digests of bundles and layers committed since the running collection began (`None`:
    /// none runs). Bounded by the commits of one sweep.
    committed_during_collection: Arc<std::sync::Mutex<Option<HashSet<String>>>>,
    /// One collection at a time: a second would reset the first one's set.
    collections: Arc<tokio::sync::Mutex<()>>,
    /// Held by a commit that adds domains from their check until its release is created, so
    /// two apps cannot both take a free name through this apprepo (`domains.rs`).
    domain_claims: Arc<tokio::sync::Mutex<()>>,
}

/// A collection of bundles and layers in progress, from before it lists the release records
/// until it has deleted what it found unreferenced. A commit that creates its record after
/// that listing began has its bundle and layers noted here, and [`Collection::delete_blob`]
/// spares them; a commit that comes after a deletion finds its bundle or layer gone and is
/// refused instead of pointing at nothing.
pub(crate) struct Collection<'a> {
    releases: &'a Releases,
    _one_at_a_time: tokio::sync::MutexGuard<'a, ()>,
}

impl Collection<'_> {
    /// Deletes the bundle or layer unless a release was committed to it since the collection
    /// began; returns whether it was deleted.
    ///
    /// Across apprepos, it deletes only an object still marked (`condemned.rs`), starting the
    /// delete within [`DELETE_WITHIN`] of seeing the mark: a commit elsewhere that took the
    /// mark away keeps it.
    pub(crate) async fn delete_blob(&self, blob: Blob, sha256: &str) -> Result<bool, StorageError> {
        let _exclusive = self.releases.collection_lock.write().await;
        let committed = self
            .releases
            .committed_during_collection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|set| set.contains(sha256));
        if committed {
            return Ok(false);
        }
        let looked = Instant::now();
        if !self
            .releases
            .count_storage_error(self.releases.is_condemned(blob, sha256).await)?
            || looked.elapsed() >= DELETE_WITHIN
        {
            return Ok(false);
        }
        self.releases
            .count_storage_error(self.releases.storage.delete(&blob.key(sha256)).await)?;
        if let Err(e) = self.releases.unmark(blob, sha256).await {
            tracing::debug!(%sha256, error = %e, "mark of a deleted object left behind");
        }
        Ok(true)
    }
}

impl Drop for Collection<'_> {
    fn drop(&mut self) {
        *self
            .releases
            .committed_during_collection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// What [`Releases::hold`] returns: held until the record naming the objects is created.
pub(crate) struct Held<'a> {
    _shared: tokio::sync::RwLockReadGuard<'a, ()>,
    /// When the objects' marks were looked at.
    checked: Instant,
}

impl Held<'_> {
    /// Refuses to create the record when the check is older than [`COMMIT_WINDOW`]: a sweep
    /// on another apprepo may have marked and, after its wait, deleted an object since.
    pub(crate) fn in_time(&self) -> Result<(), ApiError> {
        if self.checked.elapsed() < COMMIT_WINDOW {
            Ok(())
        } else {
            Err(ApiError::Conflict(
                "the check that the bundle and layers are stored took too long to be trusted; retry".into(),
            ))
        }
    }
}

fn corrupt(key: &str, e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("{key} is not valid JSON: {e}"))
}

impl Releases {
    pub fn new(storage: Arc<dyn Storage>, metrics: Arc<Metrics>) -> Self {
        Self {
            storage,
            metrics,
            commit_locks: AppLocks::default(),
            collection_lock: Arc::default(),
            committed_during_collection: Arc::default(),
            collections: Arc::default(),
            domain_claims: Arc::default(),
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Begins a collection of bundles and layers; call it before listing the release records.
    /// Waits for a running one to finish.
    pub(crate) async fn begin_collection(&self) -> Collection<'_> {
        let one_at_a_time = self.collections.lock().await;
        // Exclusive, so every commit either created its record before this (and the listing
        // that follows sees it) or notes its bundle in the set.
        let _exclusive = self.collection_lock.write().await;
        *self
            .committed_during_collection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(HashSet::new());
        Collection {
            releases: self,
            _one_at_a_time: one_at_a_time,
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(crate) fn count_storage_error<T>(
        &self,
        r: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if r.is_err() {
            self.metrics.storage_errors.inc();
        }
        r
    }

    pub async fn create_app(&self, name: &str, by: &str) -> Result<App, ApiError> {
        px_proto::names::check_app_name(name)
            .map_err(|m| ApiError::BadRequest(format!("app name: {m}")))?;
        let record = AppRecord {
            name: name.into(),
            created_at: now_rfc3339(),
            created_by: by.into(),
            latest: 0,
        };
        let bytes =
            serde_json::to_vec_pretty(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
        match self.count_storage_error(self.storage.create(&app_key(name), bytes.into()).await) {
            Ok(()) => Ok(App {
                name: record.name,
                created_at: record.created_at,
                created_by: record.created_by,
                current: None,
                formation: BTreeMap::new(),
                domains: Vec::new(),
            }),
            Err(StorageError::AlreadyExists(_)) => {
                Err(ApiError::Conflict(format!("app {name:?} already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn record(&self, app: &str) -> Result<(AppRecord, String), ApiError> {
        px_proto::names::check_app_name(app)
            .map_err(|m| ApiError::NotFound(format!("no app {app:?}: {m}")))?;
        let key = app_key(app);
        let stored = self
            .count_storage_error(self.storage.read(&key).await)?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no app {app:?}; create it with `em apps create {app}`"
                ))
            })?;
        let record = serde_json::from_slice(&stored.bytes).map_err(|e| corrupt(&key, e))?;
        Ok((record, stored.version))
    }

    /// A 404 unless `app` exists.
    pub(crate) async fn require_app(&self, app: &str) -> Result<(), ApiError> {
        self.record(app).await.map(|_| ())
    }

    /// The pointer's `latest` (a lower bound on the current release), or `None` when the app
    /// has no `app.json` (never created, or its creation did not finish).
    pub(crate) async fn pointer(&self, app: &str) -> Result<Option<u64>, ApiError> {
        match self.record(app).await {
            Ok((record, _)) => Ok(Some(record.latest)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names under `apps/`: every app, and directories of apps whose creation did not finish.
    pub(crate) async fn app_names(&self) -> Result<Vec<String>, ApiError> {
        Ok(self.count_storage_error(self.storage.list("apps/").await)?)
    }

    /// Numbers of the release records stored for `app`, oldest first.
    pub(crate) async fn versions(&self, app: &str) -> Result<Vec<u64>, ApiError> {
        let names =
            self.count_storage_error(self.storage.list(&format!("apps/{app}/releases/")).await)?;
        let mut versions: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".json")?.parse().ok())
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    /// Deletes one release record; only retention calls this, and never for a record the
    /// forward probe needs.
    pub(crate) async fn delete_release(&self, app: &str, version: u64) -> Result<(), ApiError> {
        self.count_storage_error(self.storage.delete(&release_key(app, version)).await)?;
        self.delete_phase(app, version).await
    }

    pub(crate) async fn release_at(
        &self,
        app: &str,
        version: u64,
    ) -> Result<Option<Release>, ApiError> {
        let key = release_key(app, version);
        match self.count_storage_error(self.storage.read(&key).await)? {
            Some(stored) => {
                let mut release: Release =
                    serde_json::from_slice(&stored.bytes).map_err(|e| corrupt(&key, e))?;
                self.fill_phase_state(&mut release).await?;
                Ok(Some(release))
            }
            None => Ok(None),
        }
    }

    /// The release that serves: the newest at or below `newest` that has no release phase or
    /// whose phase succeeded. A release whose phase is pending, running or failed never
    /// serves, so the app keeps its earlier release.
    pub(crate) async fn live(
        &self,
        app: &str,
        newest: Option<Release>,
    ) -> Result<Option<Release>, ApiError> {
        let Some(newest) = newest else {
            return Ok(None);
        };
        if crate::phases::may_serve(&newest) {
            return Ok(Some(newest));
        }
        for version in (1..newest.version).rev() {
            // Retention never collects the release that serves, so a gap is only an older one.
            if let Some(release) = self.release_at(app, version).await?
                && crate::phases::may_serve(&release)
            {
                return Ok(Some(release));
            }
        }
        Ok(None)
    }

    /// The newest committed release, probing forward from the pointer.
    pub(crate) async fn newest(
        &self,
        app: &str,
        mut version: u64,
    ) -> Result<Option<Release>, ApiError> {
        let mut newest = if version == 0 {
            None
        } else {
            self.release_at(app, version).await?
        };
        while let Some(next) = self.release_at(app, version + 1).await? {
            version += 1;
            newest = Some(next);
        }
        Ok(newest)
    }

    pub async fn app(&self, app: &str) -> Result<App, ApiError> {
        let (record, _) = self.record(app).await?;
        let newest = self.newest(app, record.latest).await?;
        let current = self.live(app, newest).await?;
        let formation = self.explicit_formation(app).await?;
        let domains = self.added_domains(app).await?;
        Ok(App {
            name: record.name,
            created_at: record.created_at,
            created_by: record.created_by,
            current,
            formation,
            domains,
        })
    }

    pub async fn apps(&self) -> Result<Vec<App>, ApiError> {
        let names = self.count_storage_error(self.storage.list("apps/").await)?;
        let mut apps = Vec::with_capacity(names.len());
        for name in names {
            match self.app(&name).await {
                Ok(app) => apps.push(app),
                // A directory without app.json: an app whose creation did not finish.
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(apps)
    }

    pub async fn current(&self, app: &str) -> Result<Release, ApiError> {
        self.app(app).await?.current.ok_or_else(|| {
            ApiError::NotFound(format!(
                "app {app:?} has no releases yet; deploy it with `em deploy`"
            ))
        })
    }

    pub async fn release(&self, app: &str, version: u64) -> Result<Release, ApiError> {
        self.record(app).await?;
        self.release_at(app, version)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("app {app:?} has no release v{version}")))
    }

    /// Releases, newest first, at most [`MAX_LISTED_RELEASES`]: those stored, so the ones
    /// retention collected are simply absent.
    pub async fn list(&self, app: &str) -> Result<Vec<Release>, ApiError> {
        self.record(app).await?;
        let versions = self.versions(app).await?;
        let mut releases = Vec::new();
        for version in versions.into_iter().rev().take(MAX_LISTED_RELEASES) {
            // Gone between the listing and the read: collected by retention just now.
            if let Some(release) = self.release_at(app, version).await? {
                releases.push(release);
            }
        }
        Ok(releases)
    }

    /// Commits a new release built by `draft` from the current release (if any).
    pub async fn commit<F>(&self, app: &str, by: &str, mut draft: F) -> Result<Release, ApiError>
    where
        F: FnMut(Option<&Release>) -> Result<Draft, ApiError>,
    {
        let _serialised = self.lock_app(app).await;
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let head = self.head(app).await?;
            let parts = draft(head.current.as_ref())?;
            if let Some(release) = self.try_commit(app, by, head, parts).await? {
                return Ok(release);
            }
        }
        Err(too_many_commits(app))
    }

    /// Makes sure a collection has not just deleted these bundles and layers, and tells a
    /// running one that they are referenced now. The caller creates the record that names them
    /// (a release, a pending build) while it holds the guard returned, and checks
    /// [`Held::in_time`] just before: a collection either listed that record or spares what
    /// it names. An upload that found its bundle already stored skipped storing it, and the
    /// bundle may be old and unreferenced; so may a rollback's layers.
    ///
    /// A sweep on another apprepo marks what it means to delete (`condemned.rs`): a mark is
    /// taken away, and the check waits [`RESCUE_SETTLE`] so a delete already started shows.
    pub(crate) async fn hold(&self, needed: &[(Blob, &str)]) -> Result<Held<'_>, ApiError> {
        let shared = self.collection_lock.read().await;
        let checked = Instant::now();
        let mut rescued = false;
        for (blob, sha256) in needed {
            rescued |= self.count_storage_error(self.unmark(*blob, sha256).await)?;
        }
        if rescued {
            tokio::time::sleep(RESCUE_SETTLE).await;
        }
        for (blob, sha256) in needed {
            if self
                .count_storage_error(self.storage.blob_size(*blob, sha256).await)?
                .is_none()
            {
                return Err(ApiError::Conflict(format!(
                    "{} {sha256} is no longer stored (retention collects {}s no release points to); upload it again",
                    blob.noun(),
                    blob.noun()
                )));
            }
        }
        if let Some(set) = self
            .committed_during_collection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            set.extend(needed.iter().map(|(_, sha256)| sha256.to_string()));
        }
        Ok(Held {
            _shared: shared,
            checked,
        })
    }

    /// Takes this process's commit lock of `app`; [`Releases::commit`] holds it throughout, and
    /// a caller that composes its own attempts from [`Releases::head`] and
    /// [`Releases::try_commit`] (a build's finish) must too.
    pub(crate) async fn lock_app(&self, app: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.commit_locks.lock(app).await
    }

    /// Takes this process's domain claim lock (`domains.rs`): held from the check that a name
    /// is free until the release or record that claims it is written.
    pub(crate) async fn lock_domain_claims(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.domain_claims.clone().lock_owned().await
    }

    /// Where a commit attempt starts: the app's pointer and its newest release.
    pub(crate) async fn head(&self, app: &str) -> Result<Head, ApiError> {
        let (record, pointer_version) = self.record(app).await?;
        let newest = self.newest(app, record.latest).await?;
        let newest_version = newest.as_ref().map_or(0, |r| r.version);
        let current = self.live(app, newest).await?;
        Ok(Head {
            record,
            pointer_version,
            newest: newest_version,
            current,
        })
    }

    /// One attempt at committing `parts` as the release after `head`: `Ok(None)` when another
    /// commit took that number first (start again from a new [`Releases::head`]).
    pub(crate) async fn try_commit(
        &self,
        app: &str,
        by: &str,
        head: Head,
        parts: Draft,
    ) -> Result<Option<Release>, ApiError> {
        let Head {
            mut record,
            pointer_version,
            newest,
            current,
        } = head;
        let number = newest + 1;
        let release = Release {
            app: app.into(),
            version: number,
            bundle: parts.bundle,
            manifest: parts.manifest,
            config: parts.config,
            cause: parts.cause,
            description: parts.description,
            created_at: now_rfc3339(),
            created_by: by.into(),
            build: parts.build,
            phase: parts.phase,
            config_hidden: false,
        };
        let bytes =
            serde_json::to_vec_pretty(&release).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut needed = vec![(Blob::Bundle, release.bundle.sha256.as_str())];
        if let Some(build) = &release.build {
            needed.extend(
                build
                    .layers
                    .iter()
                    .map(|l| (Blob::Layer, l.sha256.as_str())),
            );
        }
        let added = crate::domains::added(current.as_ref(), &release.manifest);
        let _claim = if added.is_empty() {
            None
        } else {
            let claim = self.lock_domain_claims().await;
            self.check_domains(app, &added).await?;
            self.claim_domains(app, &added).await?.still_fresh()?;
            Some(claim)
        };
        let shared = self.hold(&needed).await?;
        shared.in_time()?;
        let created = self.count_storage_error(
            self.storage
                .create(&release_key(app, number), bytes.into())
                .await,
        );
        drop(shared);
        match created {
            Ok(()) => {}
            Err(StorageError::AlreadyExists(_)) => {
                self.metrics.commit_conflicts.inc();
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        self.metrics.releases_committed.inc();
        record.latest = number;
        let pointer =
            serde_json::to_vec_pretty(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
        // Losing this race is harmless: the pointer only has to be a lower bound.
        match self
            .storage
            .replace(&app_key(app), Bytes::from(pointer), &pointer_version)
            .await
        {
            Ok(()) | Err(StorageError::Conflict(_)) => {}
            Err(e) => {
                tracing::warn!(%app, error = %e, "release committed but pointer not advanced; readers probe forward")
            }
        }
        tracing::info!(%app, version = number, bundle = %release.bundle.sha256, by, phase = release.phase.is_some(), "release committed");
        // A newer release: the unclaimed phases below it can never serve.
        self.supersede_phases_below(app, number).await;
        // Names the previous release served and this one does not are free for other apps
        // at once (unless added with `em domains add`, which keeps them).
        let dropped = current
            .as_ref()
            .map(|previous| crate::domains::added(Some(&release), &previous.manifest))
            .unwrap_or_default();
        if !dropped.is_empty() {
            let kept = self.added_domains(app).await.unwrap_or_default();
            for domain in dropped.iter().filter(|d| !kept.contains(d)) {
                self.release_domain_claim(app, domain).await;
            }
        }
        Ok(Some(release))
    }
}

/// What a commit that lost [`MAX_COMMIT_ATTEMPTS`] races in a row answers.
pub(crate) fn too_many_commits(app: &str) -> ApiError {
    ApiError::Conflict(format!(
        "too many concurrent releases of {app:?}; retry in a moment"
    ))
}
