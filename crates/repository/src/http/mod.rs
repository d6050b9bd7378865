//! The `/v1` HTTP API (docs/src/reference/apprepo.md), `/healthz` and `/metrics`, and the
//! server that serves them ([`serve`]). Apps, releases, config and bundles are here; builds in
//! `builds.rs`, layers in `layers.rs`, added domains in `domains.rs`, leases in `leases.rs`, Beacon's state documents in
//! `beacon_state.rs`.

mod acme;
mod beacon_state;
mod builds;
mod domains;
mod layers;
mod leases;
mod phases;

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use px_bundle::Limits;
use px_proto::api::{
    self, App, BundleRef, ConfigChange, CreateApp, Formation, Release, ReleaseCause, Rollback,
};
use px_proto::build::BuildQueued;
use px_runtime::http_server::{HttpLimits, ServeError, ServerTls};
use std::collections::BTreeMap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Role, Tokens};
use crate::builds::{Builds, needs_build};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::releases::{Draft, Releases};
use crate::storage::Blob;
use crate::upload;

/// Largest JSON request body (app creation, config changes): config vars are small, and a
/// bound keeps a hostile client from making the service buffer much.
pub const MAX_JSON_BODY_BYTES: usize = 256 * 1024;
/// Longest upload description kept.
pub const MAX_DESCRIPTION_LEN: usize = 200;

#[derive(Clone)]
pub struct AppState {
    pub releases: Releases,
    pub builds: Builds,
    pub tokens: Tokens,
    pub minted: crate::minted::Minted,
    pub metrics: Arc<Metrics>,
    pub notifier: Notifier,
    pub spool_dir: PathBuf,
    pub max_bundle_bytes: u64,
    pub bundle_limits: Limits,
    pub uploads: Arc<Semaphore>,
}

/// Serves the API on `listener` (over TLS with `tls`, else plain HTTP) until `shutdown`, then lets open requests finish, through the
/// services' hardened server (`px_runtime::http_server`: a request head deadline, an idle
/// timeout, a connection cap). A listener that will never accept again ends the server with
/// [`ServeError::ListenerBroken`], so that apprepo stops (and is restarted) instead of staying
/// up but unreachable.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    limits: HttpLimits,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    px_runtime::http_server::serve(listener, router(state), limits, tls, shutdown).await
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{app}", get(get_app))
        .route(
            "/v1/apps/{app}/releases",
            get(list_releases).post(upload_release),
        )
        .route("/v1/apps/{app}/releases/current", get(current_release))
        .route("/v1/apps/{app}/releases/{version}", get(get_release))
        .route(
            "/v1/apps/{app}/config",
            get(get_config).patch(change_config),
        )
        .route("/v1/apps/{app}/rollback", post(rollback))
        .route(
            "/v1/apps/{app}/formation",
            get(get_formation).put(scale_formation),
        )
        .route(
            "/v1/apps/{app}/domains",
            get(domains::list).post(domains::add),
        )
        .route(
            "/v1/apps/{app}/domains/{domain}",
            axum::routing::delete(domains::remove),
        )
        .route("/v1/apps/{app}/builds", get(builds::list))
        .route("/v1/apps/{app}/builds/{number}", get(builds::get))
        .route("/v1/apps/{app}/builds/{number}/log", get(builds::log))
        .route(
            "/v1/apps/{app}/builds/{number}/finish",
            post(builds::finish).layer(DefaultBodyLimit::max(builds::MAX_BUILD_REPORT_BYTES)),
        )
        .route(
            "/v1/apps/{app}/builds/{number}/fail",
            post(builds::fail).layer(DefaultBodyLimit::max(builds::MAX_BUILD_REPORT_BYTES)),
        )
        .route("/v1/builds", get(builds::pending))
        .route("/v1/phases", get(phases::unended))
        .route(
            "/v1/apps/{app}/releases/{version}/phase/claim",
            post(phases::claim).layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES)),
        )
        .route(
            "/v1/apps/{app}/releases/{version}/phase/end",
            post(phases::end).layer(DefaultBodyLimit::max(phases::MAX_PHASE_REPORT_BYTES)),
        )
        .route(
            "/v1/apps/{app}/releases/{version}/phase/log",
            get(phases::log),
        )
        .route("/v1/bundles/{sha256}", get(download_bundle))
        .route("/v1/tokens", get(list_tokens).post(mint_token))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route(
            "/v1/layers/{sha256}",
            put(layers::upload)
                .get(layers::download_layer)
                .head(layers::exists),
        )
        .route(
            "/v1/acme/account",
            get(acme::get_account)
                .put(acme::put_account)
                .layer(DefaultBodyLimit::max(px_proto::acme::MAX_ACME_RECORD_BYTES)),
        )
        .route("/v1/acme/certs", get(acme::list_certs))
        .route(
            "/v1/acme/certs/{domain}",
            get(acme::get_cert)
                .put(acme::put_cert)
                .layer(DefaultBodyLimit::max(px_proto::acme::MAX_ACME_RECORD_BYTES)),
        )
        .route(
            "/v1/leases/{name}",
            get(leases::get)
                .put(leases::put)
                .delete(leases::delete)
                .layer(DefaultBodyLimit::max(
                    px_proto::lease::MAX_LEASE_REQUEST_BYTES,
                )),
        )
        .route("/v1/beacon-state", get(beacon_state::list))
        .route(
            "/v1/beacon-state/{name}",
            get(beacon_state::get)
                .put(beacon_state::put)
                .layer(DefaultBodyLimit::max(
                    px_proto::beacon_state::MAX_STATE_DOCUMENT_BYTES,
                )),
        )
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.releases.storage().check().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            // The storage's error names buckets, paths and endpoints: it goes to the log, and
            // an unauthenticated prober learns only that apprepo is not healthy.
            tracing::warn!(error = %e, "health check: storage unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn list_apps(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<App>>, ApiError> {
    caller.require(Role::Read)?;
    let mut apps = state.releases.apps().await?;
    apps.retain(|app| caller.sees(&app.name));
    for app in &mut apps {
        app.current = app.current.take().map(|r| caller.shown(r));
    }
    Ok(Json(apps))
}

async fn create_app(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<CreateApp>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    caller.require(Role::Deploy)?;
    let Json(body) =
        body.map_err(|e| ApiError::BadRequest(format!("expected {{\"name\": \"<app>\"}}: {e}")))?;
    // A scoped token may create only an app on its list: an app it could not touch after.
    caller.require_app(Role::Deploy, &body.name)?;
    let app = state.releases.create_app(&body.name, &caller.name).await?;
    tracing::info!(app = %app.name, by = %caller.name, "app created");
    Ok((StatusCode::CREATED, Json(app)))
}

async fn get_app(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<App>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let mut found = state.releases.app(&app).await?;
    found.current = found.current.take().map(|r| caller.shown(r));
    Ok(Json(found))
}

async fn list_releases(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Vec<Release>>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let releases = state.releases.list(&app).await?;
    Ok(Json(
        releases.into_iter().map(|r| caller.shown(r)).collect(),
    ))
}

async fn current_release(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Release>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    Ok(Json(caller.shown(state.releases.current(&app).await?)))
}

async fn get_release(
    caller: Caller,
    State(state): State<AppState>,
    Path((app, version)): Path<(String, String)>,
) -> Result<Json<Release>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    let number = parse_version(&version)?;
    Ok(Json(
        caller.shown(state.releases.release(&app, number).await?),
    ))
}

/// Accepts `7` and `v7`.
pub(crate) fn parse_version(text: &str) -> Result<u64, ApiError> {
    text.strip_prefix('v').unwrap_or(text).parse().map_err(|_| {
        ApiError::BadRequest(format!("{text:?} is not a release number such as 7 or v7"))
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn upload_release(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = receive_release(caller, &state, &app, &headers, body).await;
    match &result {
        Ok(_) => state.metrics.uploads_accepted.inc(),
        Err(e) => {
            state.metrics.uploads_rejected.inc();
            tracing::info!(%app, error = %e, "upload refused");
        }
    }
    result
}

/// Receives an upload: a release (201), or a pending build when it needs one (202).
async fn receive_release(
    caller: Caller,
    state: &AppState,
    app: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require_app(Role::Deploy, app)?;
    let declared = header_str(headers, api::HEADER_BUNDLE_SHA256).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "send the bundle's SHA-256 (lowercase hex) in the {} header",
            api::HEADER_BUNDLE_SHA256
        ))
    })?;
    px_proto::names::check_sha256_hex(declared)
        .map_err(|m| ApiError::BadRequest(format!("{}: {m}", api::HEADER_BUNDLE_SHA256)))?;
    // Refuse a declared oversize before reading a byte of it.
    if let Some(length) =
        header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok())
        && length > state.max_bundle_bytes
    {
        return Err(ApiError::TooLarge {
            max: state.max_bundle_bytes,
        });
    }
    let description: String = header_str(headers, api::HEADER_DESCRIPTION)
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_DESCRIPTION_LEN)
        .collect();
    // The app must exist before we spend disk on its upload.
    state.releases.app(app).await?;

    let _permit = state
        .uploads
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the repository is shutting down".into()))?;
    let (spooled, info) = upload::receive(
        body,
        &state.spool_dir,
        declared,
        state.max_bundle_bytes,
        state.bundle_limits.clone(),
    )
    .await?;
    state.metrics.upload_bytes.add(spooled.size);
    if info.manifest.name != app {
        return Err(ApiError::InvalidBundle(format!(
            "app.toml: field `name`: is {:?} but this upload is for app {app:?}; fix the name or deploy to {:?}",
            info.manifest.name, info.manifest.name
        )));
    }
    // Domains another app holds are refused before the bundle is stored or a build queued (a
    // build would be spent for nothing); the commit checks again under its claim lock.
    let current = state.releases.app(app).await?.current;
    let added = crate::domains::added(current.as_ref(), &info.manifest);
    if !added.is_empty() {
        state.releases.check_domains(app, &added).await?;
    }
    let storage = state.releases.storage();
    if storage.has_bundle(&spooled.sha256).await? {
        state.metrics.bundles_deduplicated.inc();
    } else {
        storage
            .put_bundle(&spooled.sha256, &spooled.file, spooled.size)
            .await?;
    }
    let bundle = BundleRef {
        sha256: spooled.sha256.clone(),
        size: spooled.size,
        bundled_commands: info
            .manifest
            .requirements()
            .map(|r| r.command.clone())
            .filter(|c| info.bin_commands.contains(c))
            .collect(),
        unpacked_size: Some(info.unpacked_bytes),
    };
    let description = if description.is_empty() {
        "deploy".to_string()
    } else {
        description
    };
    if needs_build(&info)? {
        let build = state
            .builds
            .queue(app, &caller.name, bundle, info.manifest, description)
            .await?;
        state.notifier.build_requested(&build);
        return Ok((StatusCode::ACCEPTED, Json(BuildQueued { build })).into_response());
    }
    let release = state
        .releases
        .commit(app, &caller.name, |current| {
            Ok(Draft {
                bundle: bundle.clone(),
                manifest: info.manifest.clone(),
                config: current.map(|r| r.config.clone()).unwrap_or_default(),
                cause: ReleaseCause::Deploy,
                description: description.clone(),
                build: None,
                phase: crate::phases::pending_phase(&info.manifest),
            })
        })
        .await?;
    // Before the notice, so that Beacon's reconcile no longer finds them pending.
    state
        .builds
        .superseded_by_release(app, release.version)
        .await;
    state.notifier.release_committed(&release);
    Ok((StatusCode::CREATED, Json(release)).into_response())
}

async fn get_config(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<std::collections::BTreeMap<String, String>>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    Ok(Json(
        caller.shown(state.releases.current(&app).await?).config,
    ))
}

async fn change_config(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    body: Result<Json<ConfigChange>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    caller.require_app(Role::Deploy, &app)?;
    let Json(change) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"set\": {{\"KEY\": \"value\"}}, \"unset\": [\"KEY\"]}}: {e}"
        ))
    })?;
    if change.set.is_empty() && change.unset.is_empty() {
        return Err(ApiError::BadRequest(
            "nothing to change: give vars to set or unset".into(),
        ));
    }
    for key in change.set.keys().chain(change.unset.iter()) {
        px_proto::names::check_config_key(key)
            .map_err(|m| ApiError::BadRequest(format!("config var: {m}")))?;
    }
    if change.set.len() + change.unset.len() > px_proto::manifest::MAX_ENV_VARS {
        return Err(ApiError::BadRequest(format!(
            "at most {} config vars per change",
            px_proto::manifest::MAX_ENV_VARS
        )));
    }
    let release = state
        .releases
        .commit(&app, &caller.name, |current| {
            let current = current.ok_or_else(|| {
                ApiError::Conflict(format!(
                    "app {app:?} has no release yet; deploy it before setting config"
                ))
            })?;
            let mut config = current.config.clone();
            for key in &change.unset {
                config.remove(key);
            }
            config.extend(change.set.iter().map(|(k, v)| (k.clone(), v.clone())));
            if config.len() > px_proto::manifest::MAX_ENV_VARS {
                return Err(ApiError::BadRequest(format!(
                    "an app may have at most {} config vars",
                    px_proto::manifest::MAX_ENV_VARS
                )));
            }
            let set: Vec<String> = change.set.keys().cloned().collect();
            Ok(Draft {
                bundle: current.bundle.clone(),
                manifest: current.manifest.clone(),
                // A built release keeps its layers: a config change never rebuilds.
                build: current.build.clone(),
                // A config change changes no code: there is nothing to migrate.
                phase: None,
                config,
                description: describe_config_change(&set, &change.unset),
                cause: ReleaseCause::Config {
                    set,
                    unset: change.unset.clone(),
                },
            })
        })
        .await?;
    state.notifier.release_committed(&release);
    Ok((StatusCode::CREATED, Json(release)))
}

fn describe_config_change(set: &[String], unset: &[String]) -> String {
    let mut parts = Vec::new();
    if !set.is_empty() {
        parts.push(format!("set {}", set.join(", ")));
    }
    if !unset.is_empty() {
        parts.push(format!("unset {}", unset.join(", ")));
    }
    parts.join("; ")
}

async fn rollback(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    body: Option<Json<Rollback>>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    caller.require_app(Role::Deploy, &app)?;
    let to = body.and_then(|Json(b)| b.to);
    let request = crate::rollback::RollbackRequest {
        app: &app,
        to,
        only_from: None,
        reason: None,
    };
    let release = crate::rollback::commit(&state.releases, &caller.name, request).await?;
    state.notifier.release_committed(&release);
    Ok((StatusCode::CREATED, Json(release)))
}

async fn get_formation(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Formation>, ApiError> {
    caller.require_app(Role::Read, &app)?;
    Ok(Json(state.releases.formation(&app).await?))
}

/// `em scale`: sets the counts of the types the body names (`{"web": 2, "worker": 3}`).
async fn scale_formation(
    caller: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    body: Result<Json<BTreeMap<String, u32>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Formation>, ApiError> {
    caller.require_app(Role::Deploy, &app)?;
    let Json(change) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected counts by process type such as {{\"web\": 2, \"worker\": 3}}: {e}"
        ))
    })?;
    if change.len() > px_proto::procfile::MAX_PROCESS_TYPES + 1 {
        return Err(ApiError::BadRequest(format!(
            "at most {} process types per change",
            px_proto::procfile::MAX_PROCESS_TYPES + 1
        )));
    }
    let (current, formation) = state.releases.scale(&app, &change).await?;
    tracing::info!(%app, by = %caller.name, "scaled");
    state.notifier.formation_changed(&current);
    Ok(Json(formation))
}

/// `em tokens list`: the minted tokens within the caller's apps, never a secret.
async fn list_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<api::TokenInfo>>, ApiError> {
    caller.require(Role::Read)?;
    Ok(Json(state.minted.list(&caller).await))
}

/// `em tokens create`: a new token within the caller's role and apps, shown this once.
async fn mint_token(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<api::MintToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<api::TokenMinted>), ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"name\": \"ci\", \"role\": \"deploy\", \"apps\": [\"shop\"], \"expires_in_secs\": 86400}}: {e}"
        ))
    })?;
    Ok((
        StatusCode::CREATED,
        Json(state.minted.mint(&caller, request).await?),
    ))
}

/// `em tokens revoke`: refused here at once, and by Beacon within `TOKEN_REFRESH`.
async fn revoke_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<api::TokenInfo>, ApiError> {
    Ok(Json(state.minted.revoke(&caller, &name).await?))
}

async fn download_bundle(
    caller: Caller,
    State(state): State<AppState>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    download(&state, Blob::Bundle, &sha256, &headers).await
}

/// Streams a stored bundle or layer: `ETag` is its digest, and a client that has those bytes
/// (`If-None-Match`) gets 304, since content-addressed objects never change.
pub(crate) async fn download(
    state: &AppState,
    blob: Blob,
    sha256: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    px_proto::names::check_sha256_hex(sha256).map_err(ApiError::BadRequest)?;
    let etag = format!("\"{sha256}\"");
    let matches = header_str(headers, header::IF_NONE_MATCH.as_str())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let cache = HeaderValue::from_static("public, max-age=31536000, immutable");
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| ApiError::Internal(e.to_string()))?;
    let storage = state.releases.storage();
    let missing = || ApiError::NotFound(format!("no {} {sha256}", blob.noun()));
    if matches {
        // Content-addressed: if the client has this digest, it has these bytes, but only
        // answer 304 for an object we actually hold.
        if storage.blob_size(blob, sha256).await?.is_none() {
            return Err(missing());
        }
        state.metrics.bundle_not_modified.inc();
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)],
        )
            .into_response());
    }
    let stored = storage.get_blob(blob, sha256).await?.ok_or_else(missing)?;
    match blob {
        Blob::Bundle => state.metrics.bundle_downloads.inc(),
        Blob::Layer => state.metrics.layer_downloads.inc(),
    }
    let mut response = Response::new(Body::from_stream(stored.body));
    let h = response.headers_mut();
    h.insert(header::ETAG, etag_value);
    h.insert(header::CACHE_CONTROL, cache);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(px_bundle::BUNDLE_MEDIA_TYPE),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.size));
    Ok(response)
}
