//! The filesystem backend: every write goes to a temporary file that is fsynced and then
//! renamed (or hard-linked, for create-only writes) into place, and the directory is fsynced,
//! so a crash leaves either the old or the new object, never a torn one. Deletes fsync the
//! directory too, so a collected object does not reappear after a crash.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio_util::io::ReaderStream;

use super::{Blob, BlobEntry, Result, Storage, StorageError, StoredBlob, Versioned, is_digest};

/// Directory under the root for temporary files; emptied at start-up.
const TMP_DIR: &str = ".tmp";

pub struct FsStorage {
    root: PathBuf,
    /// Serialises compare-and-swap within this process. The filesystem backend serves one
    /// apprepo process; several repositories share state through S3.
    cas_lock: Mutex<()>,
}

fn failed(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Failed(format!("{what} {}: {e}", path.display()))
}

impl FsStorage {
    /// Opens (creating if needed) the storage root and clears temporary files a crash left.
    pub async fn open(root: &Path) -> Result<Self> {
        let tmp = root.join(TMP_DIR);
        if tmp.exists() {
            tokio::fs::remove_dir_all(&tmp)
                .await
                .map_err(|e| failed("clearing", &tmp, e))?;
        }
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(|e| failed("creating", &tmp, e))?;
        Ok(Self {
            root: root.to_path_buf(),
            cas_lock: Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes `bytes` to a fresh, fsynced temporary file and returns its path.
    async fn write_temp(&self, bytes: &[u8]) -> Result<tempfile::TempPath> {
        let tmp_dir = self.root.join(TMP_DIR);
        let bytes = bytes.to_vec();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = tempfile::NamedTempFile::new_in(&tmp_dir)
                .map_err(|e| failed("creating temporary file in", &tmp_dir, e))?;
            file.write_all(&bytes)
                .map_err(|e| failed("writing", file.path(), e))?;
            file.as_file()
                .sync_all()
                .map_err(|e| failed("syncing", file.path(), e))?;
            Ok(file.into_temp_path())
        })
        .await
        .map_err(|e| StorageError::Failed(format!("write task: {e}")))?
    }

    async fn ensure_parent(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| failed("creating", parent, e))?;
        }
        Ok(())
    }
}

/// Makes a rename or link in `dir` durable.
async fn sync_dir(path: &Path) -> Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed("syncing", &dir, e))
    })
    .await
    .map_err(|e| StorageError::Failed(format!("sync task: {e}")))?
}

fn version_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[async_trait]
impl Storage for FsStorage {
    fn describe(&self) -> String {
        format!("filesystem at {}", self.root.display())
    }

    async fn check(&self) -> Result<()> {
        tokio::fs::metadata(&self.root)
            .await
            .map(|_| ())
            .map_err(|e| failed("reading", &self.root, e))
    }

    async fn blob_size(&self, blob: Blob, sha256: &str) -> Result<Option<u64>> {
        let path = self.path(&blob.key(sha256));
        match tokio::fs::metadata(&path).await {
            Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed("checking", &path, e)),
        }
    }

    async fn put_blob(&self, blob: Blob, sha256: &str, file: &Path, _size: u64) -> Result<()> {
        let dest = self.path(&blob.key(sha256));
        if tokio::fs::try_exists(&dest)
            .await
            .map_err(|e| failed("checking", &dest, e))?
        {
            return Ok(());
        }
        self.ensure_parent(&dest).await?;
        match tokio::fs::rename(file, &dest).await {
            Ok(()) => {}
            // The spool directory is on another filesystem: copy through a temporary file.
            Err(e) if e.raw_os_error() == Some(18 /* EXDEV */) => {
                let tmp = tempfile::NamedTempFile::new_in(self.root.join(TMP_DIR))
                    .map_err(|e| failed("creating temporary file in", &self.root, e))?
                    .into_temp_path();
                tokio::fs::copy(file, &tmp)
                    .await
                    .map_err(|e| failed("copying", file, e))?;
                let synced = tokio::fs::File::open(&tmp)
                    .await
                    .map_err(|e| failed("opening", &tmp, e))?;
                synced
                    .sync_all()
                    .await
                    .map_err(|e| failed("syncing", &tmp, e))?;
                tmp.persist(&dest)
                    .map_err(|e| failed("renaming to", &dest, e.error))?;
            }
            Err(e) => return Err(failed(&format!("moving {} to", blob.noun()), &dest, e)),
        }
        sync_dir(&dest).await
    }

    async fn get_blob(&self, blob: Blob, sha256: &str) -> Result<Option<StoredBlob>> {
        let path = self.path(&blob.key(sha256));
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(failed("opening", &path, e)),
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| failed("reading", &path, e))?
            .len();
        Ok(Some(StoredBlob {
            size,
            body: Box::pin(ReaderStream::with_capacity(file, 256 * 1024)),
        }))
    }

    async fn read(&self, key: &str) -> Result<Option<Versioned>> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Versioned {
                version: version_of(&bytes),
                bytes: bytes.into(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed("reading", &path, e)),
        }
    }

    async fn create(&self, key: &str, bytes: Bytes) -> Result<()> {
        let dest = self.path(key);
        self.ensure_parent(&dest).await?;
        let tmp = self.write_temp(&bytes).await?;
        // link(2) fails with EEXIST if the name is taken: an atomic create-if-absent.
        match tokio::fs::hard_link(&tmp, &dest).await {
            Ok(()) => sync_dir(&dest).await,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StorageError::AlreadyExists(key.into()))
            }
            Err(e) => Err(failed("linking", &dest, e)),
        }
    }

    async fn replace(&self, key: &str, bytes: Bytes, expected: &str) -> Result<()> {
        let dest = self.path(key);
        let _guard = self.cas_lock.lock().await;
        let current = self.read(key).await?;
        if current.map(|c| c.version).as_deref() != Some(expected) {
            return Err(StorageError::Conflict(key.into()));
        }
        let tmp = self.write_temp(&bytes).await?;
        tmp.persist(&dest)
            .map_err(|e| failed("renaming to", &dest, e.error))?;
        sync_dir(&dest).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.path(prefix);
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(failed("listing", &dir, e)),
        };
        let mut names = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| failed("listing", &dir, e))?
        {
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    async fn list_blobs(&self, blob: Blob) -> Result<Vec<BlobEntry>> {
        let dir = self.path(blob.prefix());
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(failed("listing", &dir, e)),
        };
        let mut bundles = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| failed("listing", &dir, e))?
        {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !is_digest(&name) {
                continue;
            }
            let metadata = match entry.metadata().await {
                Ok(metadata) => metadata,
                // Deleted since the directory was read (another sweep): not stored any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed("reading", &entry.path(), e)),
            };
            if !metadata.is_file() {
                continue;
            }
            let modified = metadata
                .modified()
                .map_err(|e| failed("reading the mtime of", &entry.path(), e))?;
            bundles.push(BlobEntry {
                sha256: name,
                modified,
                size: metadata.len(),
            });
        }
        bundles.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        Ok(bundles)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => sync_dir(&path).await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed("deleting", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BUNDLES_PREFIX, bundle_key};
    use super::*;

    #[tokio::test]
    async fn create_is_exclusive_and_replace_checks_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).await.unwrap();
        storage
            .create("apps/a/app.json", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let err = storage
            .create("apps/a/app.json", Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists(_)));
        let v1 = storage.read("apps/a/app.json").await.unwrap().unwrap();
        assert_eq!(&v1.bytes[..], b"one");
        storage
            .replace("apps/a/app.json", Bytes::from_static(b"two"), &v1.version)
            .await
            .unwrap();
        let err = storage
            .replace("apps/a/app.json", Bytes::from_static(b"three"), &v1.version)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Conflict(_)));
        assert_eq!(
            &storage
                .read("apps/a/app.json")
                .await
                .unwrap()
                .unwrap()
                .bytes[..],
            b"two"
        );
        assert_eq!(storage.list("apps/").await.unwrap(), vec!["a"]);
        assert!(storage.read("apps/b/app.json").await.unwrap().is_none());
        // No temporary files are left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn bundles_are_listed_with_their_mtime_and_deleted_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).await.unwrap();
        assert!(storage.list_bundles().await.unwrap().is_empty());
        let digest = "ab".repeat(32);
        let spool = dir.path().join("spooled");
        std::fs::write(&spool, b"bundle bytes").unwrap();
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(5);
        storage.put_bundle(&digest, &spool, 12).await.unwrap();
        // Not a digest: never listed, so never collected.
        std::fs::write(dir.path().join(BUNDLES_PREFIX).join("notes.txt"), b"x").unwrap();
        let listed = storage.list_bundles().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].sha256.as_str(), listed[0].size), (&*digest, 12));
        assert!(listed[0].modified >= before);
        storage.delete(&bundle_key(&digest)).await.unwrap();
        storage.delete(&bundle_key(&digest)).await.unwrap();
        assert!(!storage.has_bundle(&digest).await.unwrap());
        assert!(storage.list_bundles().await.unwrap().is_empty());
        assert!(dir.path().join(BUNDLES_PREFIX).join("notes.txt").exists());
    }

    #[tokio::test]
    async fn leftover_temporary_files_are_cleared_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(TMP_DIR)).unwrap();
        std::fs::write(dir.path().join(TMP_DIR).join("half-written"), b"x").unwrap();
        FsStorage::open(dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(),
            0
        );
    }
}
