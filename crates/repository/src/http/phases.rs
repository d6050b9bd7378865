//! The release-phase API: unended phases for Beacon, a phase's claim and end from the node that
//! runs it, and its log for people (docs/src/reference/apprepo.md).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use px_proto::api::{PhaseClaim, PhaseEnded, Release};

use super::{AppState, parse_version};
use crate::auth::{Caller, Role};
use crate::error::ApiError;

/// Largest end report: the same bound as a build's, whose log it shares.
pub const MAX_PHASE_REPORT_BYTES: usize = super::builds::MAX_BUILD_REPORT_BYTES;

/// `GET /v1/phases`: releases whose phase has not ended, across apps (Beacon reads it at every
/// reconcile and places them).
pub async fn unended(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<Release>>, ApiError> {
    caller.require(Role::Read)?;
    let mut unended = state.releases.unended_phases().await?;
    unended.retain(|release| caller.sees(&release.app));
    Ok(Json(unended.into_iter().map(|r| caller.shown(r)).collect()))
}

/// `POST .../phase/claim`: the release, its phase now running on the caller's node (200), or a
/// conflict naming who holds it (409); the node runs the phase only on a 200.
pub async fn claim(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, version)): Path<(String, String)>,
    body: Result<Json<PhaseClaim>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Release>, ApiError> {
    caller.require_app(Role::Release, &app)?;
    let version = parse_version(&version)?;
    let Json(claim) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"node\": \"...\", \"attempt\": \"...\"}}: {e}"
        ))
    })?;
    Ok(Json(caller.shown(
        state.releases.claim_phase(&app, version, claim).await?,
    )))
}

/// `POST .../phase/end`: records how the phase ended and its log; a success makes the release
/// the one that serves, and Beacon hears of it either way.
pub async fn end(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, version)): Path<(String, String)>,
    body: Result<Json<PhaseEnded>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Release>, ApiError> {
    caller.require_app(Role::Release, &app)?;
    let version = parse_version(&version)?;
    let Json(ended) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"attempt\": \"...\", \"outcome\": {{\"outcome\": \"succeeded\"}}, \"log\": \"...\"}}: {e}"
        ))
    })?;
    let release = state.releases.end_phase(&app, version, ended).await?;
    tracing::info!(%app, version, by = %caller.name, state = ?release.phase.as_ref().map(|p| &p.state), "release phase reported");
    state.notifier.release_committed(&release);
    Ok(Json(caller.shown(release)))
}

/// The phase's output as text.
pub async fn log(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let version = parse_version(&version)?;
    let log = state.releases.phase_log(&app, version).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        log,
    )
        .into_response())
}
