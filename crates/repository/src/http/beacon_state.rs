//! The Beacon state routes (docs/src/reference/apprepo.md, "Beacon state"): the active Beacon
//! writes its state documents, fenced by the `beacon` lease; a Beacon taking over reads them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use px_proto::api::ErrorBody;
use px_proto::beacon_state::{MAX_STATE_DOCUMENT_BYTES, StateList, StateWriter};

use super::AppState;
use crate::auth::{Caller, Role};
use crate::error::ApiError;

/// `?prefix=` of a listing.
#[derive(serde::Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
}

/// `GET /v1/beacon-state?prefix=`: the names of the stored documents, sorted. Beacon only.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<StateList>, ApiError> {
    caller.require(Role::Beacon)?;
    let names = state.releases.beacon_state_names(&query.prefix).await?;
    Ok(Json(StateList { names }))
}

/// `GET /v1/beacon-state/{name}`: the document as written; 404 when there is none. Beacon only.
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Beacon)?;
    match state.releases.beacon_state(&name).await? {
        Some(bytes) => Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no Beacon state document {name:?}"
        ))),
    }
}

/// `PUT /v1/beacon-state/{name}?holder=&epoch=`: stores the document (204) when `holder` holds
/// the `beacon` lease at `epoch`; 409 `stale epoch` otherwise; 413 over the size bound.
pub async fn put(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    writer: Result<Query<StateWriter>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Beacon)?;
    let Query(writer) = writer.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected ?holder=<lease holder>&epoch=<lease epoch>: {e}"
        ))
    })?;
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let body = ErrorBody {
                code: "too_large".into(),
                message: format!(
                    "a Beacon state document is at most {MAX_STATE_DOCUMENT_BYTES} bytes: split it (event chunks) or keep fewer entries"
                ),
            };
            return Ok((StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response());
        }
        Err(e) => {
            return Err(ApiError::BadRequest(format!(
                "cannot read the document: {e}"
            )));
        }
    };
    state
        .releases
        .put_beacon_state(&name, &writer, bytes)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
