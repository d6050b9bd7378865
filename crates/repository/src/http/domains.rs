//! `em domains`: the host names added to an app without a release, `GET/POST/DELETE
//! /v1/apps/{app}/domains[/{domain}]` (docs/src/reference/apprepo.md); the names and who may
//! hold them are `domains.rs`'s.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use px_proto::api::{AddDomain, Domains};

use super::AppState;
use crate::auth::{Caller, Role};
use crate::error::ApiError;

/// Every name the app is served on that apprepo knows of, with where it comes from.
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Domains>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    Ok(Json(state.releases.domains(&app).await?))
}

/// `em domains add`: 201 with the names when the name is new, 200 when the app had added it
/// already; Beacon hears of it at once, so the nodes route it without a deploy.
pub async fn add(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    body: Result<Json<AddDomain>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Domains>), ApiError> {
    caller.require_app(Role::Deploy, &app)?;
    let Json(body) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"domain\": \"shop.example.com\"}}: {e}"
        ))
    })?;
    let (domains, new) = state.releases.add_domain(&app, &body.domain).await?;
    if !new {
        return Ok((StatusCode::OK, Json(domains)));
    }
    tracing::info!(%app, domain = %body.domain, by = %caller.name, "domain added");
    announce(&state, &app).await;
    Ok((StatusCode::CREATED, Json(domains)))
}

/// `em domains remove`: the names left; the nodes stop routing it without a deploy.
pub async fn remove(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, domain)): Path<(String, String)>,
) -> Result<Json<Domains>, ApiError> {
    caller.require_app(Role::Deploy, &app)?;
    let domains = state.releases.remove_domain(&app, &domain).await?;
    tracing::info!(%app, %domain, by = %caller.name, "domain removed");
    announce(&state, &app).await;
    Ok(Json(domains))
}

/// Tells Beacon to read the desired state again, as a scale does; an app with no release yet
/// is in no assignment, and Beacon reads its names with its first release.
async fn announce(state: &AppState, app: &str) {
    if let Ok(current) = state.releases.current(app).await {
        state.notifier.formation_changed(&current);
    }
}
