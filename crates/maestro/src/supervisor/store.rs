//! The release store: everything about releases on this node's disk. A release lives
//! unpacked in `state_dir/apps/<app>/releases/<n>/`; `prepare` puts it there (disk-floor
//! check, download with a size limit and SHA-256 check, `px_bundle::unpack`), `prune` keeps
//! the newest `keep_releases` and measures what they weigh for the disk report.
//!
//! The deploy task sees only [`ReleaseStore::prepare`] and the [`PreparedRelease`] it returns,
//! so a release made of several content-addressed parts can later be assembled here without
//! the deploy task changing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use px_proto::link::AppAssignment;
use px_proto::size::ByteSize;
use sha2::{Digest, Sha256};

use super::Settings;
use super::error::DeployError;

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

