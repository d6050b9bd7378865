//! Receiving a bundle or a layer: the request body streams into a spool file, hashed on the
//! way by the writer's blocking thread (`spool.rs`), and at the same time into the inspector on another, so
//! the archive is read once and the three stages (network, disk, inspection) overlap. Nothing
//! becomes visible until the caller stores it; on any error the spool file is deleted when the
//! [`Spooled`] value drops.

use std::io::Read;
use std::path::Path;

use axum::body::Body;
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use px_bundle::{BundleError, BundleInfo, Limits};
use tokio::sync::mpsc;

use crate::error::ApiError;

/// Body chunks on their way to the inspector: when it is slower than the network, receiving
/// waits for it rather than holding the bundle in memory. hyper hands over chunks of up to
/// about 400 KiB on a fast link, so this holds at most a few MiB.
pub const INSPECT_QUEUE_CHUNKS: usize = 16;
/// Body chunks on their way to the spool file's writer, bounded for the same reason.
pub const SPOOL_QUEUE_CHUNKS: usize = 16;

/// A fully received bundle whose digest matched.
pub struct Spooled {
    pub file: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
}

/// Streams `body` into a new file in `dir`, refusing it past `max_bytes` or when its SHA-256 is
/// not `declared`, and sends each chunk to `inspector` while it listens. Hashing and writing
/// run on a blocking thread of their own, so receiving the next chunk never waits for them.
async fn spool(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    inspector: mpsc::Sender<Bytes>,
) -> Result<Spooled, ApiError> {
    let named = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(dir)
        .map_err(|e| {
            ApiError::Internal(format!("creating spool file in {}: {e}", dir.display()))
        })?;
    let (file, path) = named.into_parts();
    let (to_disk, chunks) = mpsc::channel(SPOOL_QUEUE_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || crate::spool::write_and_hash(file, chunks));
    let mut size: u64 = 0;
    let mut inspector = Some(inspector);
    let mut stream = body.into_data_stream();
    let received = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::BadRequest(format!(
                    "upload interrupted after {size} bytes: {e}; nothing was stored"
                ))
            })?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(ApiError::TooLarge { max: max_bytes });
            }
            // An inspector that has stopped (it found an error, or the bundle's end) reads no
            // more.
            if let Some(tx) = &inspector
                && tx.send(chunk.clone()).await.is_err()
            {
                inspector = None;
            }
            // A writer that has stopped failed: its error is reported below.
            if to_disk.send(chunk).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(to_disk);
    let written = writer
        .await
        .map_err(|e| ApiError::Internal(format!("spool writer task: {e}")))?;
    received?;
    if size == 0 {
        return Err(ApiError::BadRequest(
            "the upload is empty; send the bundle as the request body".into(),
        ));
    }
    let actual = written.map_err(|e| ApiError::Internal(format!("writing spool file: {e}")))?;
    if actual != declared {
        return Err(ApiError::DigestMismatch {
            declared: declared.into(),
            actual,
        });
    }
    Ok(Spooled {
        file: path,
        sha256: actual,
        size,
    })
}

/// Receives a bundle: streams `body` into a spool file in `dir`, refusing it past `max_bytes`
/// or when its SHA-256 is not `declared`, while the bundle's entries are checked and its
/// manifest read from the same bytes as they arrive. The spool's errors (too large,
/// interrupted, digest mismatch) come before the inspection's.
pub async fn receive(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    limits: Limits,
) -> Result<(Spooled, BundleInfo), ApiError> {
    receive_with(body, dir, declared, max_bytes, "bundle", move |reader| {
        px_bundle::inspect(reader, &limits)
    })
    .await
}

/// Receives a layer as [`receive`] does a bundle: spooled, its digest checked against
/// `declared` (the key it is uploaded to), its entries checked as they arrive.
pub async fn receive_layer(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    limits: Limits,
) -> Result<Spooled, ApiError> {
    let (spooled, ()) = receive_with(body, dir, declared, max_bytes, "layer", move |reader| {
        inspect_layer(reader, &limits)
    })
    .await?;
    Ok(spooled)
}

/// Checks a layer's entries as it streams in, with the bundle format's entry checker (no
/// manifest: a layer is what a build produced).
fn inspect_layer(reader: ChunkReader, limits: &Limits) -> Result<(), BundleError> {
    px_bundle::inspect_layer(reader, limits).map(|_| ())
}

/// Spools `body` while `inspect` reads the same chunks on a blocking thread of its own.
async fn receive_with<T: Send + 'static>(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    what: &str,
    inspect: impl FnOnce(ChunkReader) -> Result<T, BundleError> + Send + 'static,
) -> Result<(Spooled, T), ApiError> {
    let (chunks, rx) = mpsc::channel(INSPECT_QUEUE_CHUNKS);
    let inspector = tokio::task::spawn_blocking(move || inspect(ChunkReader::new(rx)));
    let spooled = spool(body, dir, declared, max_bytes, chunks).await;
    let inspected = inspector
        .await
        .map_err(|e| ApiError::Internal(format!("inspect task: {e}")))?;
    let spooled = spooled?;
    let info = inspected.map_err(|e| inspect_error(e, what))?;
    Ok((spooled, info))
}

/// The bundle inspector's input: the body's chunks, in order, until the sender is gone.
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                // The whole body was sent (or receiving failed, and the spool's error wins).
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

fn inspect_error(e: BundleError, what: &str) -> ApiError {
    if e.is_client_error() {
        ApiError::InvalidBundle(format!("invalid {what}: {e}"))
    } else {
        ApiError::Internal(format!("inspecting {what}: {e}"))
    }
}
