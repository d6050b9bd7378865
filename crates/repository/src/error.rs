//! The one mapping from failures to HTTP answers: client errors say what to fix, internal ones
//! are logged and answered with a generic 5xx.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use px_proto::api::ErrorBody;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    /// Another app holds the domain, in its current release or added with `em domains add`
    /// (`how` says which; docs/src/design/trust.md).
    #[error(
        "domain {domain:?} belongs to app {holder:?} ({how}); use another name, or remove it from {holder:?} first"
    )]
    DomainTaken {
        domain: String,
        holder: String,
        how: String,
    },
    #[error(
        "bundle is larger than the limit of {max} bytes; shrink it (see .emignore) or raise `limits.max_bundle_bytes`"
    )]
    TooLarge { max: u64 },
    #[error(
        "layer is larger than the limit of {max} bytes; layers share `limits.max_bundle_bytes` with bundles"
    )]
    LayerTooLarge { max: u64 },
    #[error(
        "bundle digest mismatch: declared sha256 {declared}, received {actual}; the upload was corrupted or the header is wrong, so nothing was stored"
    )]
    DigestMismatch { declared: String, actual: String },
    #[error("{0}")]
    InvalidBundle(String),
    #[error("storage unavailable: {0}; retry when it is back")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::DomainTaken { .. } => (StatusCode::CONFLICT, "domain_taken"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooLarge { .. } | ApiError::LayerTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            }
            ApiError::DigestMismatch { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch")
            }
            ApiError::InvalidBundle(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_bundle"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(m) => ApiError::Unavailable(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "request failed"),
            ApiError::Unavailable(detail) => tracing::warn!(%detail, "storage unavailable"),
            _ => tracing::debug!(%status, error = %self, "request refused"),
        }
        let body = ErrorBody {
            code: code.into(),
            message: self.to_string(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of an oversized body is not read; closing tells the client to stop.
            ApiError::TooLarge { .. } | ApiError::LayerTooLarge { .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
