//! The release store: everything about releases on this node's disk. A release lives
//! unpacked in `state_dir/apps/<app>/releases/<n>/`; `prepare` puts it there (disk-floor
//! check, download with a size limit and SHA-256 check, `px_bundle::unpack`), `prune` keeps
//! the newest `keep_releases` and measures what they weigh for the disk report.
//!
//! The deploy task sees only [`ReleaseStore::prepare`] and the [`PreparedRelease`] it returns,
//! so a release made of several content-addressed parts can later be assembled here without
//! the deploy task changing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use px_proto::link::AppAssignment;
use px_proto::size::ByteSize;
use sha2::{Digest, Sha256};

use super::Settings;
use super::error::DeployError;
use crate::process;

/// Largest bundle downloaded; apprepo's own limit is lower.
pub const MAX_BUNDLE_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Unpacked releases on this node's disk, and the bundles they come from.
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
    /// Bytes of each app's kept releases, measured after its last prune.
    kept_bytes: Mutex<BTreeMap<String, u64>>,
}

/// A release ready to run: what its instances are started from.
#[derive(Debug, Clone)]
pub(crate) struct PreparedRelease {
    /// The unpacked bundle: the instances' working directory.
    pub(crate) dir: PathBuf,
}

impl PreparedRelease {
    /// The `PATH` the release's instances get (its own `bin/` first), against which its
    /// `runtime` and `requires` are checked.
    pub(crate) fn instance_path(&self) -> OsString {
        process::instance_path(&self.dir)
    }
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
            kept_bytes: Mutex::new(BTreeMap::new()),
        }
    }

    /// `state_dir/apps/<app>/releases`: one directory per unpacked release, by number.
    fn releases_dir(&self, app: &str) -> PathBuf {
        self.state_dir.join("apps").join(app).join("releases")
    }

    /// Makes sure the release is on disk (download, verify, unpack, once per release) and says
    /// where. On failure nothing of the release is left behind.
    pub(crate) async fn prepare(
        &self,
        target: &AppAssignment,
    ) -> Result<PreparedRelease, DeployError> {
        let releases = self.releases_dir(&target.app);
        let dir = releases.join(target.release.to_string());
        if dir.is_dir() {
            return Ok(PreparedRelease { dir });
        }
        tokio::fs::create_dir_all(&releases)
            .await
            .map_err(|source| DeployError::Storage {
                doing: "creating",
                path: releases.clone(),
                source,
            })?;
        // The bundle is downloaded, then unpacked beside it (at least as large again).
        let needed = target.bundle_size.saturating_mul(2);
        if let Some(free) = free_disk(&releases)
            && free.saturating_sub(needed) < self.min_free_disk
        {
            return Err(DeployError::NotEnoughDisk {
                free: ByteSize(free),
                dir: releases,
                needed: ByteSize(needed),
                floor: ByteSize(self.min_free_disk),
            });
        }
        let download = releases.join(format!(".download-{}", target.release));
        let unpacked = match self.download(target, &download).await {
            Ok(()) => unpack(download.clone(), dir.clone()).await,
            Err(e) => Err(e),
        };
        // The bundle is not kept: the unpacked release is what later starts use.
        let _ = tokio::fs::remove_file(&download).await;
        unpacked.map(|()| PreparedRelease { dir })
    }

    /// Streams the bundle to `path`, checking its size as it arrives and its SHA-256 at the end.
    async fn download(&self, target: &AppAssignment, path: &Path) -> Result<(), DeployError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let url = &target.bundle_url;
        let failed = |source| DeployError::Download {
            url: url.clone(),
            source,
        };
        let file_error = |doing, source| DeployError::Storage {
            doing,
            path: path.to_path_buf(),
            source,
        };
        let mut request = self.http.get(url);
        if let Some(token) = &self.repository_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(DeployError::DownloadRefused {
                url: url.clone(),
                status: response.status(),
            });
        }
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| file_error("creating", e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(failed)?;
            size += chunk.len() as u64;
            if size > self.max_bundle_bytes {
                return Err(DeployError::TooLarge {
                    limit: self.max_bundle_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| file_error("writing", e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| file_error("syncing", e))?;
        let digest = hex::encode(hasher.finalize());
        if digest != target.bundle_sha256 {
            return Err(DeployError::DigestMismatch {
                expected: target.bundle_sha256.clone(),
                actual: digest,
            });
        }
        Ok(())
    }

    /// Keeps the newest `keep_releases` unpacked releases of `app` (and always `serving`),
    /// removes the others, and records what the kept ones weigh.
    pub(crate) async fn prune(&self, app: &str, serving: u64) {
        let releases = self.releases_dir(app);
        let keep = self.keep_releases;
        let owner = app.to_string();
        let measured = tokio::task::spawn_blocking(move || {
            let mut numbers: Vec<u64> = std::fs::read_dir(&releases)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            numbers.sort_unstable_by(|a, b| b.cmp(a));
            let mut kept = 0u64;
            for (rank, number) in numbers.iter().enumerate() {
                let dir = releases.join(number.to_string());
                if rank < keep || *number == serving {
                    kept += dir_bytes(&dir);
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
        self.kept_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app.to_string(), measured);
    }

    /// Bytes of each app's kept releases, as of its last switch.
    pub(crate) fn kept_bytes(&self) -> BTreeMap<String, u64> {
        self.kept_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Free bytes on the disk of `state_dir`, when the file system says.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        free_disk(&self.state_dir)
    }

    /// The free bytes a new release must leave (`min_free_disk`).
    pub(crate) fn floor_bytes(&self) -> u64 {
        self.min_free_disk
    }
}

/// Unpacks the bundle at `bundle` into `dir` on a blocking thread; `px_bundle::unpack` leaves
/// no partial directory behind when it fails.
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

/// Free bytes for an unprivileged user on the file system of `path`.
fn free_disk(path: &Path) -> Option<u64> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    Some(
        stats
            .blocks_available()
            .saturating_mul(stats.fragment_size()),
    )
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};

    use super::*;

    const TOKEN: &str = "bundle-reader";

    /// Bundles by digest behind a bearer token, like apprepo's `/v1/bundles/{sha256}`, counting
    /// the downloads it serves.
    #[derive(Clone, Default)]
    struct Served {
        bundles: Arc<Mutex<HashMap<String, Vec<u8>>>>,
        downloads: Arc<AtomicUsize>,
    }

    struct Repository {
        url: String,
        served: Served,
    }

    async fn bundle(
        State(served): State<Served>,
        UrlPath(sha): UrlPath<String>,
        headers: HeaderMap,
    ) -> Result<Vec<u8>, StatusCode> {
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {TOKEN}"))
        {
            return Err(StatusCode::UNAUTHORIZED);
        }
        let bytes = served.bundles.lock().unwrap().get(&sha).cloned();
        let bytes = bytes.ok_or(StatusCode::NOT_FOUND)?;
        served.downloads.fetch_add(1, Ordering::SeqCst);
        Ok(bytes)
    }

    impl Repository {
        async fn start() -> Self {
            let served = Served::default();
            let app = axum::Router::new()
                .route("/v1/bundles/{sha}", axum::routing::get(bundle))
                .with_state(served.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            Self { url, served }
        }

        /// Packs release `release` of `app` holding `data` (besides its `app.toml`), serves
        /// it, and returns its assignment and the bytes its unpacked files take.
        fn release(&self, app: &str, release: u64, data: &str) -> (AppAssignment, u64) {
            let dir = tempfile::tempdir().unwrap();
            let manifest = format!("name = \"{app}\"\nrun = \"true\"\n");
            std::fs::write(dir.path().join("app.toml"), &manifest).unwrap();
            std::fs::write(dir.path().join("data.txt"), data).unwrap();
            let mut bytes = Vec::new();
            let (summary, parsed) = px_bundle::pack_dir(dir.path(), &mut bytes).unwrap();
            self.served
                .bundles
                .lock()
                .unwrap()
                .insert(summary.sha256.clone(), bytes);
            let assignment = AppAssignment {
                app: app.into(),
                release,
                bundle_sha256: summary.sha256.clone(),
                bundle_size: summary.size,
                bundle_url: format!("{}/v1/bundles/{}", self.url, summary.sha256),
                instances: 1,
                manifest: parsed,
                env: BTreeMap::new(),
                domains: Vec::new(),
                build: None,
            };
            (assignment, (manifest.len() + data.len()) as u64)
        }

        fn downloads(&self) -> usize {
            self.served.downloads.load(Ordering::SeqCst)
        }
    }

    fn store(state_dir: &Path, keep_releases: usize, min_free_disk: u64) -> ReleaseStore {
        let settings = Settings {
            node_name: "node-a".into(),
            state_dir: state_dir.to_path_buf(),
            port_range: (20000, 20010),
            stop_grace: Duration::from_secs(1),
            keep_releases,
            min_free_disk,
            cgroup_limits: false,
            repository_token: Some(TOKEN.into()),
        };
        ReleaseStore::new(&settings, reqwest::Client::new())
    }

    /// What the app's releases directory holds, by name, sorted.
    fn entries(state_dir: &Path, app: &str) -> Vec<String> {
        let dir = state_dir.join("apps").join(app).join("releases");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_release_is_downloaded_verified_and_unpacked_once() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 3, 0);
        let (v1, _) = repository.release("shop", 1, "first");

        let prepared = store.prepare(&v1).await.unwrap();
        assert_eq!(
            prepared.dir,
            state.path().join("apps/shop/releases/1"),
            "where a release lives"
        );
        assert_eq!(
            std::fs::read_to_string(prepared.dir.join("data.txt")).unwrap(),
            "first"
        );
        // The bundle itself is not kept once unpacked.
        assert_eq!(entries(state.path(), "shop"), ["1"]);

        // A release already on disk (a restart, a rollback) is not downloaded again.
        let again = store.prepare(&v1).await.unwrap();
        assert_eq!(again.dir, prepared.dir);
        assert_eq!(repository.downloads(), 1);
    }

    #[tokio::test]
    async fn the_disk_floor_refuses_a_release_before_downloading_and_names_the_sizes() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        // A floor no disk reaches.
        let floor = u64::MAX / 2;
        let store = store(state.path(), 3, floor);
        let (v1, _) = repository.release("shop", 1, "first");

        let error = store.prepare(&v1).await.unwrap_err();
        assert!(
            matches!(error, DeployError::NotEnoughDisk { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        let releases = state.path().join("apps/shop/releases");
        let sizes = format!(
            " free under {}, this release needs about {} and Maestro keeps {} free (min_free_disk); free some space (old releases, logs) or lower min_free_disk",
            releases.display(),
            ByteSize(v1.bundle_size * 2),
            ByteSize(floor)
        );
        assert!(
            message.starts_with("not enough disk: ") && message.ends_with(&sizes),
            "{message}"
        );
        // What is free comes first, as a size a person reads.
        let free = &message["not enough disk: ".len()..message.len() - sizes.len()];
        assert!(
            free.ends_with('B') && free.starts_with(|c: char| c.is_ascii_digit()),
            "{free}"
        );
        assert_eq!(repository.downloads(), 0);
        assert!(entries(state.path(), "shop").is_empty());
    }

    #[tokio::test]
    async fn a_digest_mismatch_leaves_no_file_and_no_release_behind() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 3, 0);
        let (v1, _) = repository.release("shop", 1, "first");
        let forged = AppAssignment {
            bundle_sha256: "0".repeat(64),
            ..v1.clone()
        };

        let error = store.prepare(&forged).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "bundle digest mismatch: expected {}, got {}",
                "0".repeat(64),
                v1.bundle_sha256
            )
        );
        assert_eq!(repository.downloads(), 1);
        assert!(
            entries(state.path(), "shop").is_empty(),
            "{:?}",
            entries(state.path(), "shop")
        );

        // The store is not wedged: the right bundle deploys.
        store.prepare(&v1).await.unwrap();
        assert_eq!(entries(state.path(), "shop"), ["1"]);
    }

    #[tokio::test]
    async fn a_bundle_over_the_size_limit_is_abandoned_and_removed() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        let mut store = store(state.path(), 3, 0);
        store.max_bundle_bytes = 16;
        let (v1, _) = repository.release("shop", 1, "first");

        let error = store.prepare(&v1).await.unwrap_err();
        assert_eq!(error.to_string(), "bundle larger than 16 bytes");
        assert!(entries(state.path(), "shop").is_empty());
    }

    #[tokio::test]
    async fn a_download_the_repository_refuses_names_the_url_and_status() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 3, 0);
        let (v1, _) = repository.release("shop", 1, "first");
        let missing = AppAssignment {
            bundle_url: format!("{}/v1/bundles/{}", repository.url, "f".repeat(64)),
            ..v1
        };

        let error = store.prepare(&missing).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("downloading {}: 404 Not Found", missing.bundle_url)
        );
        assert!(entries(state.path(), "shop").is_empty());
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_releases_and_the_serving_one() {
        let repository = Repository::start().await;
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 2, 0);
        let mut weights = BTreeMap::new();
        for (release, data) in [(1, "one"), (2, "two two"), (3, "three"), (4, "four four")] {
            let (assignment, bytes) = repository.release("shop", release, data);
            store.prepare(&assignment).await.unwrap();
            weights.insert(release, bytes);
        }
        // Another app's releases are not this app's to prune.
        let (other, other_bytes) = repository.release("blog", 7, "other");
        store.prepare(&other).await.unwrap();

        // A rollback to v1: it serves, so it stays beside the newest two.
        store.prune("shop", 1).await;
        assert_eq!(entries(state.path(), "shop"), ["1", "3", "4"]);
        assert_eq!(
            store.kept_bytes().get("shop"),
            Some(&(weights[&1] + weights[&3] + weights[&4]))
        );

        // Back on the newest: only the newest two are kept.
        store.prune("shop", 4).await;
        assert_eq!(entries(state.path(), "shop"), ["3", "4"]);
        assert_eq!(
            store.kept_bytes().get("shop"),
            Some(&(weights[&3] + weights[&4]))
        );
        assert_eq!(entries(state.path(), "blog"), ["7"]);
        store.prune("blog", 7).await;
        assert_eq!(store.kept_bytes().get("blog"), Some(&other_bytes));
    }
}
