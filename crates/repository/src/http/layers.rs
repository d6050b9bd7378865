//! The layers API: a node that built uploads each layer (`PUT`), after asking whether it is
//! stored already (`HEAD`); nodes download them (`GET`) to assemble a built release.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AppState, download, header_str};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::storage::Blob;
use crate::upload;

fn check_digest(sha256: &str) -> Result<(), ApiError> {
    px_proto::names::check_sha256_hex(sha256)
        .map_err(|m| ApiError::BadRequest(format!("the layer's digest in the path: {m}")))
}

/// `PUT /v1/layers/{sha256}`: the body is the layer, refused unless its SHA-256 is the path's.
/// 201 when it was stored now, 200 when it was stored already (the body is still checked).
pub async fn upload(
    caller: Caller,
    State(state): State<AppState>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(Role::Build)?;
    check_digest(&sha256)?;
    let max = state.max_bundle_bytes;
    // Refuse a declared oversize before reading a byte of it.
    if let Some(length) =
        header_str(&headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok())
        && length > max
    {
        return Err(ApiError::LayerTooLarge { max });
    }
    let _permit = state
        .uploads
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the repository is shutting down".into()))?;
    let spooled = upload::receive_layer(
        body,
        &state.spool_dir,
        &sha256,
        max,
        state.bundle_limits.clone(),
    )
    .await
    .map_err(|e| match e {
        ApiError::TooLarge { max } => ApiError::LayerTooLarge { max },
        other => other,
    })?;
    let storage = state.releases.storage();
    let status = if storage.blob_size(Blob::Layer, &sha256).await?.is_some() {
        state.metrics.layers_deduplicated.inc();
        StatusCode::OK
    } else {
        storage
            .put_blob(Blob::Layer, &sha256, &spooled.file, spooled.size)
            .await?;
        state.metrics.layer_uploads.inc();
        tracing::info!(%sha256, size = spooled.size, by = %caller.name, "layer stored");
        StatusCode::CREATED
    };
    Ok((status, [(header::ETAG, etag(&sha256)?)]).into_response())
}

/// `HEAD /v1/layers/{sha256}`: 200 with its size when stored, 404 otherwise, so that a builder
/// uploads only what the repository lacks.
pub async fn exists(
    caller: Caller,
    State(state): State<AppState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    check_digest(&sha256)?;
    match state
        .releases
        .storage()
        .blob_size(Blob::Layer, &sha256)
        .await?
    {
        Some(size) => Ok((
            StatusCode::OK,
            [
                (header::ETAG, etag(&sha256)?),
                (header::CONTENT_LENGTH, HeaderValue::from(size)),
            ],
        )
            .into_response()),
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

/// `GET /v1/layers/{sha256}`: streams the layer, as bundles are.
pub async fn download_layer(
    caller: Caller,
    State(state): State<AppState>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    download(&state, Blob::Layer, &sha256, &headers).await
}

fn etag(sha256: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!("\"{sha256}\"")).map_err(|e| ApiError::Internal(e.to_string()))
}
