//! Storage of bundles and release records behind one trait, with a local filesystem backend and
//! an S3 backend. Keys are the same on both (docs/src/design/storage.md):
//! `bundles/sha256/<digest>` (immutable), `apps/<app>/releases/<n>.json` (immutable, created only
//! if absent), `apps/<app>/app.json` (replaced by compare-and-swap). Only retention
//! (`retention.rs`) deletes: old release records and bundles no release points to.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

use crate::config::{Backend, Config};

pub mod fs;
pub mod s3;

/// A stream of bundle bytes, as served to downloaders.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A stored bundle opened for reading.
pub struct StoredBundle {
    pub size: u64,
    pub body: ByteStream,
}

/// A small object read together with its version, for compare-and-swap.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub bytes: Bytes,
    /// Opaque version: a content hash on disk, the ETag in S3.
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// `create` found the key already there.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// `replace` found another version than expected.
    #[error("{0} changed concurrently")]
    Conflict(String),
    /// The backend cannot be reached (S3 down, network); the request may be retried.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a bug, a full disk, a permissions problem.
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// A stored bundle as listed for garbage collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEntry {
    pub sha256: String,
    /// When the object was written: the file's mtime on disk, `LastModified` in S3.
    pub modified: SystemTime,
    pub size: u64,
}

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// One line for logs: where the data lives.
    fn describe(&self) -> String;
    /// Cheap check that the backend answers, for `/healthz` and start-up.
    async fn check(&self) -> Result<()>;
    /// Whether a bundle with this digest is stored.
    async fn has_bundle(&self, sha256: &str) -> Result<bool>;
    /// Stores the verified bundle in `file` under its digest, unless already there. The file
    /// may be moved (filesystem) or read (S3); the caller removes it afterwards if it remains.
    async fn put_bundle(&self, sha256: &str, file: &Path, size: u64) -> Result<()>;
    /// Opens a bundle for streaming, or `None` if it is not stored.
    async fn get_bundle(&self, sha256: &str) -> Result<Option<StoredBundle>>;
    /// Reads a small object, or `None` if absent.
    async fn read(&self, key: &str) -> Result<Option<Versioned>>;
    /// Writes a small object only if the key is absent, atomically.
    async fn create(&self, key: &str, bytes: Bytes) -> Result<()>;
    /// Replaces a small object only if its version is still `expected`, atomically.
    async fn replace(&self, key: &str, bytes: Bytes, expected: &str) -> Result<()>;
    /// Names directly under `prefix` (which ends with '/'): object names and sub-"directories"
    /// (without the trailing '/'), sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Every stored bundle with its modification time and size, sorted by digest. Objects under
    /// `bundles/sha256/` whose name is not a digest are no bundles and are left out.
    async fn list_bundles(&self) -> Result<Vec<BundleEntry>>;
    /// Removes an object. Idempotent: an absent key is not an error, so a sweep that was
    /// interrupted, or two repositories sweeping at once, can simply delete again.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Opens the configured backend: the S3 bucket of `[storage.s3]`, with the secret key read from
/// its `secret_access_key_file`, or else the `storage` directory under `data_dir`.
pub async fn open(config: &Config, s3_secret: Option<String>) -> Result<Arc<dyn Storage>> {
    Ok(match (&config.storage.backend, &config.storage.s3) {
        (Backend::S3, Some(s3)) => Arc::new(s3::S3Storage::connect(s3, s3_secret).await?),
        _ => Arc::new(fs::FsStorage::open(&config.data_dir.join("storage")).await?),
    })
}

/// Key of a bundle.
pub fn bundle_key(sha256: &str) -> String {
    format!("{BUNDLES_PREFIX}{sha256}")
}

/// Where bundles live, listed whole by [`Storage::list_bundles`].
pub const BUNDLES_PREFIX: &str = "bundles/sha256/";

/// Whether a name under [`BUNDLES_PREFIX`] is a bundle's digest (and not, say, a temporary
/// file some tool left there, which garbage collection must not touch).
pub fn is_digest(name: &str) -> bool {
    px_proto::names::check_sha256_hex(name).is_ok()
}
