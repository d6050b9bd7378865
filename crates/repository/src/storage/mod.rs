//! Storage of bundles, layers, release and build records behind one trait, with a local
//! filesystem backend and an S3 backend. Keys are the same on both
//! (docs/src/design/storage.md): `bundles/sha256/<digest>` and `layers/sha256/<digest>`
//! (immutable, content-addressed), `apps/<app>/releases/<n>.json` and the build records under
//! `apps/<app>/builds/` (immutable, created only if absent), `apps/<app>/app.json` and
//! `apps/<app>/formation.json` and `apps/<app>/domains.json` (replaced by compare-and-swap). Only retention (`retention.rs`) deletes: old release and build
//! records, and bundles and layers no record points to.

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

/// A stream of bundle or layer bytes, as served to downloaders.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// The two kinds of content-addressed object: each is stored once under the SHA-256 of its
/// bytes, never changed, and deleted only by retention. They live under separate prefixes so
/// that retention judges each against the records that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blob {
    /// An uploaded bundle: a release's code, or a build's source.
    Bundle,
    /// A layer a build made (runtime, dependencies, app).
    Layer,
}

impl Blob {
    /// Where objects of this kind live, listed whole by [`Storage::list_blobs`].
    pub fn prefix(self) -> &'static str {
        match self {
            Blob::Bundle => BUNDLES_PREFIX,
            Blob::Layer => LAYERS_PREFIX,
        }
    }

    /// The key of the object with this digest.
    pub fn key(self, sha256: &str) -> String {
        format!("{}{sha256}", self.prefix())
    }

    /// The word for it in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Blob::Bundle => "bundle",
            Blob::Layer => "layer",
        }
    }
}

/// A stored bundle or layer opened for reading.
pub struct StoredBlob {
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

/// A stored bundle or layer as listed for garbage collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
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
    /// The size of the bundle or layer with this digest, or `None` when it is not stored.
    async fn blob_size(&self, blob: Blob, sha256: &str) -> Result<Option<u64>>;
    /// Stores the verified bundle or layer in `file` under its digest, unless already there.
    /// The file may be moved (filesystem) or read (S3); the caller removes it afterwards if it
    /// remains.
    async fn put_blob(&self, blob: Blob, sha256: &str, file: &Path, size: u64) -> Result<()>;
    /// Opens a bundle or layer for streaming, or `None` if it is not stored.
    async fn get_blob(&self, blob: Blob, sha256: &str) -> Result<Option<StoredBlob>>;
    /// Reads a small object, or `None` if absent.
    async fn read(&self, key: &str) -> Result<Option<Versioned>>;
    /// Writes a small object only if the key is absent, atomically.
    async fn create(&self, key: &str, bytes: Bytes) -> Result<()>;
    /// Replaces a small object only if its version is still `expected`, atomically.
    async fn replace(&self, key: &str, bytes: Bytes, expected: &str) -> Result<()>;
    /// Names directly under `prefix` (which ends with '/'): object names and sub-"directories"
    /// (without the trailing '/'), sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Every stored bundle or layer with its modification time and size, sorted by digest.
    /// Objects under the prefix whose name is not a digest are left out.
    async fn list_blobs(&self, blob: Blob) -> Result<Vec<BlobEntry>>;
    /// Removes an object. Idempotent: an absent key is not an error, so a sweep that was
    /// interrupted, or two repositories sweeping at once, can simply delete again.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Whether a bundle with this digest is stored.
    async fn has_bundle(&self, sha256: &str) -> Result<bool> {
        Ok(self.blob_size(Blob::Bundle, sha256).await?.is_some())
    }
    /// [`Storage::put_blob`] for a bundle.
    async fn put_bundle(&self, sha256: &str, file: &Path, size: u64) -> Result<()> {
        self.put_blob(Blob::Bundle, sha256, file, size).await
    }
    /// [`Storage::list_blobs`] for bundles.
    async fn list_bundles(&self) -> Result<Vec<BlobEntry>> {
        self.list_blobs(Blob::Bundle).await
    }
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
    Blob::Bundle.key(sha256)
}

/// Where bundles live.
pub const BUNDLES_PREFIX: &str = "bundles/sha256/";
/// Where layers live.
pub const LAYERS_PREFIX: &str = "layers/sha256/";

/// Whether a name under a blob prefix is a digest (and not, say, a temporary file some tool
/// left there, which garbage collection must not touch).
pub fn is_digest(name: &str) -> bool {
    px_proto::names::check_sha256_hex(name).is_ok()
}
