//! The builds API: pending builds for Beacon, an app's builds and their logs for people, and
//! the finish and failure a node that built reports (docs/src/reference/apprepo.md).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use px_proto::api::Release;
use px_proto::build::{Build, BuildFailed, BuildFinished, MAX_BUILD_LOG_BYTES};
use serde::Deserialize;

use super::AppState;
use crate::auth::{Caller, Role};
use crate::builds::Finished;
use crate::error::ApiError;

/// Largest finish or failure body: the log's tail at most [`MAX_BUILD_LOG_BYTES`], which JSON
/// may escape to six bytes each (`\u001b` for a terminal's escape codes), and the output's
/// small, bounded fields besides.
pub const MAX_BUILD_REPORT_BYTES: usize = 6 * MAX_BUILD_LOG_BYTES + 256 * 1024;

/// `?pending=true`, the one listing across apps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildsQuery {
    #[serde(default)]
    pending: bool,
}

/// Accepts `7`: builds have no `v` (that names releases).
fn parse_build_number(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not a build number such as 7")))
}

/// `GET /v1/builds?pending=true`: the builds without a result, across apps (Beacon reads it at
/// every reconcile and places them).
pub async fn pending(
    caller: Caller,
    State(state): State<AppState>,
    query: Result<Query<BuildsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Build>>, ApiError> {
    caller.require(Role::Read)?;
    let Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("{e}; ask with ?pending=true")))?;
    if !query.pending {
        return Err(ApiError::BadRequest(
            "only ?pending=true is listed across apps; an app's builds are at /v1/apps/{app}/builds"
                .into(),
        ));
    }
    let mut pending = state.builds.pending().await?;
    pending.retain(|build| caller.sees(&build.app));
    Ok(Json(pending))
}

pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Vec<Build>>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    Ok(Json(state.builds.list(&app).await?))
}

pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, number)): Path<(String, String)>,
) -> Result<Json<Build>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let number = parse_build_number(&number)?;
    Ok(Json(state.builds.build(&app, number).await?))
}

/// The build's log as text: what `em releases --build-log` prints.
pub async fn log(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, number)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let number = parse_build_number(&number)?;
    let log = state.builds.log(&app, number).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        log,
    )
        .into_response())
}

/// `POST .../finish`: commits the build's release (201), or answers the release an earlier
/// finish of it committed (200).
pub async fn finish(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, number)): Path<(String, String)>,
    body: Result<Json<BuildFinished>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    caller.require_app(Role::Build, &app)?;
    let number = parse_build_number(&number)?;
    let Json(finished) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"output\": {{...}}, \"log\": \"...\"}}: {e}"
        ))
    })?;
    match state.builds.finish(&app, number, finished).await? {
        Finished::Committed(release) => {
            tracing::info!(%app, build = number, version = release.version, by = %caller.name, "build finished into a release");
            state.notifier.release_committed(&release);
            Ok((StatusCode::CREATED, Json(caller.shown(release))))
        }
        Finished::AlreadyCommitted(release) => Ok((StatusCode::OK, Json(caller.shown(release)))),
    }
}

/// `POST .../fail`: records the failure and its log; nothing changes in what serves.
pub async fn fail(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, number)): Path<(String, String)>,
    body: Result<Json<BuildFailed>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Build>, ApiError> {
    caller.require_app(Role::Build, &app)?;
    let number = parse_build_number(&number)?;
    let Json(failed) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"reason\": \"...\", \"log\": \"...\"}}: {e}"
        ))
    })?;
    let build = state.builds.fail(&app, number, failed).await?;
    tracing::info!(%app, build = number, by = %caller.name, "build failed");
    Ok(Json(build))
}
