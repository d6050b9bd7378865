//! The release store: everything about releases on this node's disk. A release lives in
//! `state_dir/apps/<app>/releases/<n>/`; `prepare` puts it there, `prune` keeps the newest
//! `keep_releases` and measures what they weigh for the disk report.
//!
//! A release as it was uploaded is downloaded (size limit, SHA-256 check) and unpacked with
//! `px_bundle::unpack`. A built release is assembled from its layers (`layers.rs`): only the
//! layers this node lacks are downloaded, and the release directory is hard links into them.
//! Either way the disk-floor check counts only what is downloaded and unpacked, and the deploy
//! task sees only [`ReleaseStore::prepare`] and the [`PreparedRelease`] it returns: where the
//! release is, the `PATH` and the variables its instances get.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use px_proto::build::{AssignedBuild, RELEASE_DIR_PLACEHOLDER};
use px_proto::link::AppAssignment;
use px_proto::size::ByteSize;
use sha2::{Digest, Sha256};

use super::Settings;
use super::error::DeployError;
use super::layers::{self, Layers};
use crate::process;

/// Largest bundle downloaded; apprepo's own limit is lower.
pub const MAX_BUNDLE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Releases on this node's disk, and the bundles and layers they come from.
pub(crate) struct ReleaseStore {
    state_dir: PathBuf,
    /// Unpacked releases kept per app, the serving one included.
    keep_releases: usize,
    /// Bytes of free disk a new release must leave under `state_dir`.
    min_free_disk: u64,
    /// Bytes past which a download is abandoned (`MAX_BUNDLE_BYTES`; lower in tests).
    max_bundle_bytes: u64,
    http: reqwest::Client,
    repository_token: Option<String>,
    layers: Layers,
    /// What each app's kept releases weigh, measured after its last prune.
    kept: Mutex<BTreeMap<String, Weight>>,
    /// Bytes of the unpacked layers, measured after the last collection.
    layer_bytes: Mutex<u64>,
    /// Per app, held shared while one of its releases is prepared and exclusively while its
    /// prune clears what is not a release. The app's task and a release phase's run both
    /// prepare releases, so a prune may meet a download or an unpack in progress; it then
    /// leaves those entries to the next prune rather than delete a file being written.
    preparing: Mutex<BTreeMap<String, Arc<tokio::sync::RwLock<()>>>>,
}

/// What a tree of files weighs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Weight {
    /// Bytes of its files, each inode once.
    pub(super) weight: u64,
    /// Bytes of the files no other path links to: what removing the tree would free.
    pub(super) own: u64,
}

/// A release ready to run: what its instances are started from.
#[derive(Debug, Clone)]
pub(crate) struct PreparedRelease {
    /// The release's files: the instances' working directory.
    pub(crate) dir: PathBuf,
    /// Directories of a built release put first on `PATH`, inside `dir`.
    path_first: Vec<PathBuf>,
    /// The instances' variables: the manifest's `[env]`, overridden by what the build adds,
    /// overridden by config vars.
    pub(crate) env: BTreeMap<String, String>,
}

impl PreparedRelease {
    /// Where `target` lives in `dir` and what its instances get, refusing a build output that
    /// reaches outside the release or sets what the platform sets.
    fn plan(dir: PathBuf, target: &AppAssignment) -> Result<Self, DeployError> {
        let Some(build) = &target.build else {
            return Ok(Self {
                dir,
                path_first: Vec::new(),
                env: target.env.clone(),
            });
        };
        check_build(build)?;
        let path_first = build.path.iter().map(|entry| dir.join(entry)).collect();
        let release = dir.display().to_string();
        let mut env = target.env.clone();
        for (key, value) in &build.env {
            // `target.env` is the manifest's `[env]` with the config vars laid over it: a key it
            // holds with another value than the manifest's, or that the manifest lacks, is a
            // config var, which wins over the build.
            let from_config = match (target.env.get(key), target.manifest.env.get(key)) {
                (Some(current), Some(manifest)) => current != manifest,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !from_config {
                env.insert(
                    key.clone(),
                    value.replace(RELEASE_DIR_PLACEHOLDER, &release),
                );
            }
        }
        Ok(Self {
            dir,
            path_first,
            env,
        })
    }

    /// The `PATH` the release's instances get, against which its `runtime` and `requires`
    /// are checked: a built release's own directories, its `bin/`, then Maestro's `PATH`.
    pub(crate) fn instance_path(&self) -> OsString {
        self.path_over(&px_runtime::host::env().path)
    }

    /// [`instance_path`](Self::instance_path) over `host` instead of Maestro's own `PATH`.
    pub(crate) fn path_over(&self, host: &OsStr) -> OsString {
        let release = process::instance_path_over(&self.dir, host);
        if self.path_first.is_empty() {
            return release;
        }
        let dirs = self
            .path_first
            .iter()
            .cloned()
            .chain(std::env::split_paths(&release));
        std::env::join_paths(dirs).unwrap_or(release)
    }
}

/// Checks what a build says a release needs: layer digests that can name directories, `PATH`
/// entries inside the release, variables an instance may be given.
fn check_build(build: &AssignedBuild) -> Result<(), DeployError> {
    let bad = |m: String| Err(DeployError::BadBuild(m));
    if build.layers.is_empty() {
        return bad("it has no layers".into());
    }
    for layer in &build.layers {
        if let Err(m) = px_proto::names::check_sha256_hex(&layer.sha256) {
            return bad(format!("layer digest: {m}"));
        }
    }
    for entry in &build.path {
        let relative = Path::new(entry);
        let inside = !entry.is_empty()
            && !entry.contains(':')
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            return bad(format!("PATH entry {entry:?} leaves the release"));
        }
    }
    for (key, value) in &build.env {
        if key == "PATH" {
            return bad("it sets PATH, which is made from its path entries".into());
        }
        if let Err(m) = px_proto::names::check_config_key(key) {
            return bad(format!("variable {m}"));
        }
        if value.contains('\0') {
            return bad(format!("variable {key} holds a NUL character"));
        }
    }
    Ok(())
}

impl ReleaseStore {
    /// The store under `settings.state_dir`, downloading with `http`.
    pub(crate) fn new(settings: &Settings, http: reqwest::Client) -> Self {
        Self {
            state_dir: settings.state_dir.clone(),
            keep_releases: settings.keep_releases,
            min_free_disk: settings.min_free_disk,
            max_bundle_bytes: MAX_BUNDLE_BYTES,
            http,
            repository_token: settings.repository_token.clone(),
            layers: Layers::new(&settings.state_dir),
            kept: Mutex::new(BTreeMap::new()),
            layer_bytes: Mutex::new(0),
            preparing: Mutex::new(BTreeMap::new()),
        }
    }

    /// The lock between `app`'s preparations and its prune's clearing.
    fn preparing_lock(&self, app: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.preparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// `state_dir/apps/<app>/releases`: one directory per release, by number.
    fn releases_dir(&self, app: &str) -> PathBuf {
        self.state_dir.join("apps").join(app).join("releases")
    }

    /// Makes sure the release is on disk (once per release) and says where and how its
    /// instances run. On failure nothing of the release is left behind.
    pub(crate) async fn prepare(
        &self,
        target: &AppAssignment,
    ) -> Result<PreparedRelease, DeployError> {
        let releases = self.releases_dir(&target.app);
        let dir = releases.join(target.release.to_string());
        let prepared = PreparedRelease::plan(dir.clone(), target)?;
        if dir.is_dir() {
            return Ok(prepared);
        }
        let _preparing = self.preparing_lock(&target.app).read_owned().await;
        tokio::fs::create_dir_all(&releases)
            .await
            .map_err(|source| DeployError::Storage {
                doing: "creating",
                path: releases.clone(),
                source,
            })?;
        match &target.build {
            Some(build) => self.assemble(build, &releases, &dir).await?,
            None => self.unpack_bundle(target, &releases, &dir).await?,
        }
        Ok(prepared)
    }

    /// A release as it was uploaded: its bundle downloaded, then unpacked beside it.
    async fn unpack_bundle(
        &self,
        target: &AppAssignment,
        releases: &Path,
        dir: &Path,
    ) -> Result<(), DeployError> {
        self.check_floor(releases, bundle_needs(target))?;
        let download = releases.join(format!(".download-{}", target.release));
        let fetched = fetch(
            &self.http,
            self.repository_token.as_deref(),
            &Fetch {
                url: &target.bundle_url,
                sha256: &target.bundle_sha256,
                what: "bundle",
                limit: self.max_bundle_bytes,
            },
            &download,
        )
        .await;
        let unpacked = match fetched {
            Ok(_) => unpack(download.clone(), dir.to_path_buf()).await,
            Err(e) => Err(e),
        };
        // The bundle is not kept: the unpacked release is what later starts use.
        let _ = tokio::fs::remove_file(&download).await;
        unpacked
    }

    /// A built release: the layers this node lacks downloaded and unpacked, then the release
    /// assembled from all of them.
    async fn assemble(
        &self,
        build: &AssignedBuild,
        releases: &Path,
        dir: &Path,
    ) -> Result<(), DeployError> {
        let _assembling = self.layers.assembling().await;
        let mut missing: Vec<&px_proto::build::AssignedLayer> = Vec::new();
        for layer in &build.layers {
            if !self.layers.has(&layer.sha256) && !missing.iter().any(|m| m.sha256 == layer.sha256)
            {
                missing.push(layer);
            }
        }
        // Each missing layer is downloaded, then unpacked (at least as large again); layers
        // already here cost nothing more, as the release only links to them.
        let needed = missing
            .iter()
            .map(|l| l.size.saturating_mul(2))
            .fold(0u64, u64::saturating_add);
        self.check_floor(releases, needed)?;
        // What a deploy downloads is what an operator checks first when a deploy is slow or
        // a node's disk fills: one line per release says it.
        let downloading = if missing.is_empty() {
            "nothing".to_string()
        } else {
            missing
                .iter()
                .map(|l| format!("{} {}", l.kind.as_str(), short_digest(&l.sha256)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        tracing::info!(
            release = %dir.display(),
            layers = build.layers.len(),
            %downloading,
            "assembling a release from its layers"
        );
        for layer in missing {
            self.layers
                .fetch(layer, &self.http, self.repository_token.as_deref())
                .await?;
        }
        let sources: Vec<PathBuf> = build
            .layers
            .iter()
            .map(|l| self.layers.path(&l.sha256))
            .collect();
        let digests: Vec<String> = build.layers.iter().map(|l| l.sha256.clone()).collect();
        let dest = dir.to_path_buf();
        tokio::task::spawn_blocking(move || layers::assemble(&sources, &digests, &dest))
            .await
            .map_err(DeployError::UnpackTask)?
            .map_err(|source| DeployError::Storage {
                doing: "assembling",
                path: dir.to_path_buf(),
                source,
            })
    }

    /// Refuses a release that would take the disk of `dir` under `min_free_disk` once `needed`
    /// more bytes are written.
    fn check_floor(&self, dir: &Path, needed: u64) -> Result<(), DeployError> {
        if let Some(free) = free_disk(dir)
            && free.saturating_sub(needed) < self.min_free_disk
        {
            return Err(DeployError::NotEnoughDisk {
                free: ByteSize(free),
                dir: dir.to_path_buf(),
                needed: ByteSize(needed),
                floor: ByteSize(self.min_free_disk),
            });
        }
        Ok(())
    }

    /// Keeps the newest `keep_releases` releases of `app` (and always `serving`), removes the
    /// others (and what an interrupted download or unpack left), records what the kept ones
    /// weigh, then removes the layers no kept release of any app uses.
    pub(crate) async fn prune(&self, app: &str, serving: u64) {
        let releases = self.releases_dir(app);
        let keep = self.keep_releases;
        let owner = app.to_string();
        // With a download or unpack of this app's in progress (a release phase's, while the
        // app's task prunes), the entries that are not releases wait for a prune without one;
        // holding the lock, no preparation starts until this one has cleared them.
        let clearing = self.preparing_lock(app).try_write_owned().ok();
        let measured = tokio::task::spawn_blocking(move || {
            let mut numbers = Vec::new();
            for entry in std::fs::read_dir(&releases).into_iter().flatten().flatten() {
                let name = entry.file_name();
                match name.to_str().and_then(|n| n.parse::<u64>().ok()) {
                    Some(number) => numbers.push(number),
                    None if clearing.is_none() => {}
                    // With no release of this app being prepared, anything else is what a
                    // killed Maestro (or a failed preparation) left half-made.
                    None => {
                        let path = entry.path();
                        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
            }
            numbers.sort_unstable_by(|a, b| b.cmp(a));
            let mut kept = Weight::default();
            let mut seen = HashSet::new();
            for (rank, number) in numbers.iter().enumerate() {
                let dir = releases.join(number.to_string());
                if rank < keep || *number == serving {
                    let weight = dir_bytes(&dir, &mut seen);
                    kept.weight += weight.weight;
                    kept.own += weight.own;
                } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(app = %owner, release = number, error = %e, "removing an old release failed");
                } else {
                    tracing::info!(app = %owner, release = number, "removed an old release");
                }
            }
            kept
        })
        .await
        .unwrap_or_default();
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), measured);
        if let Some(bytes) = self.layers.collect(self.state_dir.join("apps")).await {
            *self.layer_bytes.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
        }
    }

    /// Bytes of each app's kept releases (files shared between them counted once), as of its
    /// last switch.
    pub(crate) fn kept_bytes(&self) -> BTreeMap<String, u64> {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(app, w)| (app.clone(), w.weight))
            .collect()
    }

    /// Bytes this node's releases take on disk: what only releases hold, plus every layer
    /// once, however many releases link to it.
    pub(crate) fn used_bytes(&self) -> u64 {
        let own: u64 = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.own)
            .sum();
        own + *self.layer_bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Free bytes on the disk of `state_dir`, when the file system says.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        free_disk(&self.state_dir)
    }

    /// The free bytes a new release must leave (`min_free_disk`).
    pub(crate) fn floor_bytes(&self) -> u64 {
        self.min_free_disk
    }

    /// The `/metrics` lines of the layers this node downloaded.
    pub(crate) fn layer_fetch_metrics(&self) -> String {
        self.layers.render_metrics()
    }
}

/// One download: where from, what it must hash to, what it is (for messages), and the most
/// bytes taken before it is abandoned.
pub(crate) struct Fetch<'a> {
    pub(crate) url: &'a str,
    pub(crate) sha256: &'a str,
    pub(crate) what: &'a str,
    pub(crate) limit: u64,
}

/// Chunks of a download waiting for the thread that hashes and writes them: a few hundred KiB
/// in flight, enough to keep that thread busy while the next chunks arrive.
const FETCH_QUEUE_CHUNKS: usize = 16;

/// Downloads `what.url` into `path` (created, with the repository token, if any), stopping
/// past `what.limit` bytes, and checks its SHA-256 against `what.sha256`; the bytes received.
/// The request task only receives and counts; hashing and writing happen on a blocking thread
/// fed through a bounded queue, so a large layer does not keep an async worker busy for
/// seconds (minutes on a slow machine), which would starve the proxy and the watchdog's pings.
/// On failure the caller removes `path`.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    token: Option<&str>,
    what: &Fetch<'_>,
    path: &Path,
) -> Result<u64, DeployError> {
    use futures_util::StreamExt;
    let url = what.url;
    let failed = |source| DeployError::Download {
        url: url.to_string(),
        source,
    };
    let file_error = |doing, source| DeployError::Storage {
        doing,
        path: path.to_path_buf(),
        source,
    };
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(failed)?;
    if !response.status().is_success() {
        return Err(DeployError::DownloadRefused {
            url: url.to_string(),
            status: response.status(),
        });
    }
    let file = tokio::fs::File::create(path)
        .await
        .map_err(|e| file_error("creating", e))?
        .into_std()
        .await;
    let (chunks, mut received) = tokio::sync::mpsc::channel::<bytes::Bytes>(FETCH_QUEUE_CHUNKS);
    // The thread ends when the queue closes (the whole body, or the request task gave up) or
    // a write fails; it says which step failed.
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = file;
        let mut hasher = Sha256::new();
        while let Some(chunk) = received.blocking_recv() {
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| ("writing", e))?;
        }
        file.sync_all().map_err(|e| ("syncing", e))?;
        Ok::<_, (&'static str, std::io::Error)>(hex::encode(hasher.finalize()))
    });
    let mut size = 0u64;
    let mut body = response.bytes_stream();
    let mut received_all = Ok(());
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                received_all = Err(failed(e));
                break;
            }
        };
        size += chunk.len() as u64;
        if size > what.limit {
            received_all = Err(DeployError::TooLarge {
                what: what.what.to_string(),
                limit: what.limit,
            });
            break;
        }
        // A closed queue means the writer failed: its error is the one to report.
        if chunks.send(chunk).await.is_err() {
            break;
        }
    }
    drop(chunks);
    let written = writer.await.map_err(DeployError::UnpackTask)?;
    received_all?;
    let digest = written.map_err(|(doing, e)| file_error(doing, e))?;
    if digest != what.sha256 {
        return Err(DeployError::DigestMismatch {
            what: what.what.to_string(),
            expected: what.sha256.to_string(),
            actual: digest,
        });
    }
    Ok(size)
}

/// Unpacks the bundle at `bundle` into `dir` on a blocking thread; `px_bundle::unpack` leaves
/// no partial directory behind when it fails.
/// The disk a bundle release takes while it is prepared: the download, and the release
/// unpacked beside it. The unpacked size is apprepo's count when the assignment has it (a
/// compressed bundle may unpack to many times its size); for a bundle stored before apprepo
/// counted, it is guessed as large as the download again.
fn bundle_needs(target: &AppAssignment) -> u64 {
    let unpacked = target.bundle_unpacked_size.unwrap_or(target.bundle_size);
    target.bundle_size.saturating_add(unpacked)
}

async fn unpack(bundle: PathBuf, dir: PathBuf) -> Result<(), DeployError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&bundle).map_err(DeployError::ReadDownload)?;
        px_bundle::unpack(
            std::io::BufReader::new(file),
            &dir,
            &px_bundle::Limits::default(),
        )
        .map(drop)
        .map_err(DeployError::Unpack)
    })
    .await
    .map_err(DeployError::UnpackTask)?
}

/// A digest as people read it in a log line: its first 12 characters, enough to tell the
/// layers of one node apart.
fn short_digest(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Free bytes for an unprivileged user on the file system of `path`.
fn free_disk(path: &Path) -> Option<u64> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    Some(
        stats
            .blocks_available()
            .saturating_mul(stats.fragment_size()),
    )
}

/// What the regular files under `dir` weigh (symlinks not followed; iterative, so a deep tree
/// cannot exhaust the stack). A file with several links counts once in `weight` across every
/// call sharing `seen`, and never in `own`.
pub(super) fn dir_bytes(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> Weight {
    let mut total = Weight::default();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => {
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.nlink() == 1 {
                        total.weight += meta.len();
                        total.own += meta.len();
                    } else if seen.insert((meta.dev(), meta.ino())) {
                        total.weight += meta.len();
                    }
                }
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests;
