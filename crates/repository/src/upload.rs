//! Receiving a bundle: the request body streams into a spool file while it is hashed and
//! counted, then the bundle's content is inspected. Nothing becomes visible until the caller
//! commits; on any error the spool file is deleted when the [`Spooled`] value drops.

use std::path::Path;

use axum::body::Body;
use futures_util::StreamExt;
use px_bundle::{BundleError, BundleInfo, Limits};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;

/// A fully received bundle whose digest matched.
pub struct Spooled {
    pub file: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
}

/// Streams `body` into a new file in `dir`, refusing it past `max_bytes` or when its SHA-256 is
/// not `declared`.
pub async fn spool(
    body: Body,
    dir: &Path,
    declared: &str,
    max_bytes: u64,
) -> Result<Spooled, ApiError> {
    let named = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(dir)
        .map_err(|e| {
            ApiError::Internal(format!("creating spool file in {}: {e}", dir.display()))
        })?;
    let (std_file, path) = named.into_parts();
    let mut file =
        tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(std_file));
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
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
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing spool file: {e}")))?;
    }
    if size == 0 {
        return Err(ApiError::BadRequest(
            "the upload is empty; send the bundle as the request body".into(),
        ));
    }
    file.flush()
        .await
        .map_err(|e| ApiError::Internal(format!("writing spool file: {e}")))?;
    file.get_ref()
        .sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("syncing spool file: {e}")))?;
    let actual = hex::encode(hasher.finalize());
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

/// Checks every entry of a spooled bundle and reads its manifest (blocking work, on a
/// blocking thread).
pub async fn inspect(file: &Path, limits: Limits) -> Result<BundleInfo, ApiError> {
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::new(
            std::fs::File::open(&path)
                .map_err(|e| ApiError::Internal(format!("reopening spool file: {e}")))?,
        );
        px_bundle::inspect(reader, &limits).map_err(|e: BundleError| {
            if e.is_client_error() {
                ApiError::InvalidBundle(format!("invalid bundle: {e}"))
            } else {
                ApiError::Internal(format!("inspecting bundle: {e}"))
            }
        })
    })
    .await
    .map_err(|e| ApiError::Internal(format!("inspect task: {e}")))?
}
