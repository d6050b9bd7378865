//! Receiving a bundle or a layer: the request task copies the body into large blocks as it
//! arrives, and each block is hashed, written to a spool file and read by the inspector, each on
//! a blocking thread of its own (`spool.rs`), so the archive is read once and the stages
//! (network, hashing, disk, inspection) overlap. Nothing becomes visible until the caller
//! stores it; on any error the spool file is deleted when the [`Spooled`] value drops.

use std::io::{BufRead, Read};
use std::path::Path;

use axum::body::Body;
use futures_util::StreamExt;
use px_bundle::{BundleError, BundleInfo, Limits};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::spool::{SPOOL_BLOCKS, SharedBlock, Spooler};

/// A fully received bundle whose digest matched.
pub struct Spooled {
    pub file: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
}

/// Streams `body` into a new file in `dir`, refusing it past `max_bytes` or when its SHA-256 is
/// not `declared`, and hands each block to `inspector` while it listens. Hashing and writing
/// run on blocking threads of their own, so receiving the next chunk waits for them only when
/// the upload's blocks are all in use.
async fn spool(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    inspector: mpsc::Sender<SharedBlock>,
) -> Result<Spooled, ApiError> {
    let named = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(dir)
        .map_err(|e| {
            ApiError::Internal(format!("creating spool file in {}: {e}", dir.display()))
        })?;
    let (file, path) = named.into_parts();
    let mut spooler = Spooler::start(file, inspector);
    let mut size: u64 = 0;
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
            // A writer or hasher that has stopped failed: `finish` reports why.
            if !spooler.push(&chunk).await {
                break;
            }
        }
        Ok(())
    }
    .await;
    let written = spooler.finish().await;
    received?;
    if size == 0 {
        return Err(ApiError::BadRequest(
            "the upload is empty; send the bundle as the request body".into(),
        ));
    }
    let (actual, _) =
        written.map_err(|e| ApiError::Internal(format!("writing spool file: {e}")))?;
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
fn inspect_layer(reader: BlockReader, limits: &Limits) -> Result<(), BundleError> {
    px_bundle::inspect_layer(reader, limits).map(|_| ())
}

/// Spools `body` while `inspect` reads the same blocks on a blocking thread of its own.
async fn receive_with<T: Send + 'static>(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
    what: &str,
    inspect: impl FnOnce(BlockReader) -> Result<T, BundleError> + Send + 'static,
) -> Result<(Spooled, T), ApiError> {
    // The upload's block pool bounds what is in flight, so this queue never makes receiving wait.
    let (blocks, rx) = mpsc::channel(SPOOL_BLOCKS);
    let inspector = tokio::task::spawn_blocking(move || inspect(BlockReader::new(rx)));
    let spooled = spool(body, dir, declared, max_bytes, blocks).await;
    let inspected = inspector
        .await
        .map_err(|e| ApiError::Internal(format!("inspect task: {e}")))?;
    let spooled = spooled?;
    let info = inspected.map_err(|e| inspect_error(e, what))?;
    Ok((spooled, info))
}

/// The bundle inspector's input: the body's blocks, in order, until the sender is gone. The
/// decoder reads straight from each block (`BufRead`), with no copy into a buffer of its own.
struct BlockReader {
    rx: mpsc::Receiver<SharedBlock>,
    block: Option<SharedBlock>,
    /// Bytes of `block` already read.
    read: usize,
}

impl BlockReader {
    fn new(rx: mpsc::Receiver<SharedBlock>) -> Self {
        Self {
            rx,
            block: None,
            read: 0,
        }
    }
}

impl BufRead for BlockReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self
            .block
            .as_ref()
            .is_none_or(|block| self.read == block.body().len())
        {
            // Dropped first, so a block read to its end goes back to the pool while we wait.
            self.block = None;
            self.read = 0;
            match self.rx.blocking_recv() {
                Some(block) => self.block = Some(block),
                // The whole body was sent (or receiving failed, and the spool's error wins).
                None => return Ok(&[]),
            }
        }
        Ok(self
            .block
            .as_ref()
            .map_or(&[], |block| &block.body()[self.read..]))
    }

    fn consume(&mut self, n: usize) {
        self.read += n;
    }
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
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
