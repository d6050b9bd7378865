//! The lease routes (docs/src/reference/apprepo.md, "Leases"): any reader reads a lease;
//! Beacon takes or renews one, learns who holds it when it may not, and gives it up when it
//! stops.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use px_proto::api::ErrorBody;
use px_proto::lease::{Lease, LeaseClaim, LeaseHeld, MAX_LEASE_REQUEST_BYTES};

use super::AppState;
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::lease::{ClaimOutcome, ReleaseOutcome};

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

/// `?holder=` of a release.
#[derive(serde::Deserialize)]
pub struct ReleaseQuery {
    holder: String,
}

/// `DELETE /v1/leases/{name}?holder=<id>`: the holder gives the lease up (200 with the record,
/// expired now); 204 when there is nothing of its own to give up (no lease, or it lapsed); 409
/// with the current lease when another holder has it. Beacon only.
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<ReleaseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Beacon)?;
    let Query(ReleaseQuery { holder }) =
        query.map_err(|e| ApiError::BadRequest(format!("expected ?holder=<id>: {e}")))?;
    match state.releases.release_lease(&name, &holder).await? {
        ReleaseOutcome::Released(lease) => {
            tracing::info!(%name, %holder, epoch = lease.epoch, "lease released by its holder");
            Ok((StatusCode::OK, Json(lease)).into_response())
        }
        ReleaseOutcome::NotHeld => Ok(StatusCode::NO_CONTENT.into_response()),
        ReleaseOutcome::HeldByAnother(lease) => {
            let body = LeaseHeld {
                code: "lease_held".into(),
                message: format!(
                    "lease {name:?} is held by {:?} (epoch {}), not {holder:?}: it is not yours to release",
                    lease.holder, lease.epoch
                ),
                lease,
            };
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
    }
}
