//! The lease routes (docs/src/reference/apprepo.md, "Leases"): any reader reads a lease;
//! Beacon takes or renews one, and learns who holds it when it may not.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use px_proto::api::ErrorBody;
use px_proto::lease::{Lease, LeaseClaim, LeaseHeld, MAX_LEASE_REQUEST_BYTES};

use super::AppState;
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::lease::ClaimOutcome;

/// `GET /v1/leases/{name}`: the lease as stored (expired or not), for any reader; 404 if no
/// one ever took it.
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Lease>, ApiError> {
    caller.require(Role::Read)?;
    state
        .releases
        .lease(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no one has taken lease {name:?} yet")))
}

/// `PUT /v1/leases/{name}`: takes or renews the lease (200 with the record); 409 with the
/// current lease when another holder has it. Beacon only.
pub async fn put(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    claim: Result<Json<LeaseClaim>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Beacon)?;
    let claim = match claim {
        Ok(Json(claim)) => claim,
        // A claim is a few hundred bytes: a larger body is no claim, and is not read on.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let body = ErrorBody {
                code: "too_large".into(),
                message: format!(
                    "a lease claim is at most {MAX_LEASE_REQUEST_BYTES} bytes; send holder, ttl_ms and api_url alone"
                ),
            };
            return Ok((StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response());
        }
        Err(e) => {
            return Err(ApiError::BadRequest(format!(
                "expected {{\"holder\": \"<id>\", \"ttl_ms\": 6000, \"api_url\": \"https://...\"}}: {e}"
            )));
        }
    };
    match state.releases.claim_lease(&name, &claim).await? {
        ClaimOutcome::Granted(lease) => Ok((StatusCode::OK, Json(lease)).into_response()),
        ClaimOutcome::Held(lease) => {
            tracing::debug!(%name, holder = %lease.holder, claimant = %claim.holder, "lease held by another");
            let body = LeaseHeld {
                code: "lease_held".into(),
                message: format!(
                    "lease {name:?} is held by {:?} (epoch {}) until {}",
                    lease.holder, lease.epoch, lease.expires_at
                ),
                lease,
            };
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
    }
}
