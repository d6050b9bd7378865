//! The `/v1` HTTP API (docs/src/reference/beacon.md), the event stream, `/healthz`, `/metrics` and the
//! status page at `/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use px_proto::api::ErrorBody;
use px_proto::beacon::{App, Event, LogEntry, Node, Repository, RolloutRecord};
use px_proto::link::{AppAssignment, FromBeacon, LogStream};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::auth::{Reader, Role, Tokens};
use crate::hub::Hub;
use crate::logstore::LogFilter;
use crate::metrics::Metrics;

/// Events per page when the client does not say.
pub const DEFAULT_PAGE: usize = 100;
/// How often the SSE stream sends a keep-alive comment: so proxies do not cut it, and so `em`,
/// which gives up on a followed stream silent for three of them, notices a Beacon whose host
/// vanished (no FIN, no RST) within seconds, as link peers do from its heartbeat answers. A
/// few streams at a time, unlike links: a beat of their own costs nothing that shows.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    pub logs: Arc<crate::logstore::LogStore>,
    pub runs: Arc<crate::runs::Runs>,
    /// Whether this listener serves HTTPS itself (the sign-in cookie is then `Secure`).
    pub https: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        let body = ErrorBody {
            code: code.into(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(crate::login::status_page))
        .route(
            "/login",
            post(crate::login::login).layer(axum::extract::DefaultBodyLimit::max(
                crate::login::MAX_LOGIN_BODY_BYTES,
            )),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(nodes))
        .route("/v1/repositories", get(repositories))
        .route("/v1/apps", get(apps))
        .route("/v1/apps/{app}", get(app))
        .route("/v1/apps/{app}/config", get(app_config))
        .route("/v1/apps/{app}/rollouts", get(app_rollouts))
        .route("/v1/apps/{app}/restart", post(restart))
        .route("/v1/apps/{app}/logs", get(app_logs))
        .route("/v1/apps/{app}/logs/stream", get(app_log_stream))
        .route("/v1/events", get(events))
        .route("/v1/events/stream", get(event_stream))
        .route("/v1/apps/{app}/run", post(crate::runs::run))
        .route("/v1/apps/{app}/processes", get(app_processes))
        .with_state(state)
}

async fn metrics(reader: Reader, State(state): State<AppState>) -> Result<Response, ApiError> {
    reader.require_every_app("/metrics")?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.hub.events().last_seq()),
    )
        .into_response())
}

/// The nodes, each with only the instances of apps the caller's token may see.
async fn nodes(reader: Reader, State(state): State<AppState>) -> Json<Vec<Node>> {
    let mut nodes = state.hub.nodes();
    for node in &mut nodes {
        node.instances.retain(|i| reader.sees(&i.app));
    }
    Json(nodes)
}

async fn repositories(_: Reader, State(state): State<AppState>) -> Json<Vec<Repository>> {
    Json(state.hub.repositories())
}

async fn apps(reader: Reader, State(state): State<AppState>) -> Json<Vec<App>> {
    let mut apps = state.hub.apps();
    apps.retain(|a| reader.sees(&a.name));
    Json(apps)
}

async fn app(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<App>, ApiError> {
    reader.require_app(&app)?;
    state
        .hub
        .apps()
        .into_iter()
        .find(|a| a.name == app)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no app {app:?} is deployed")))
}

/// The app's recent rollouts with their figures, newest first.
async fn app_rollouts(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Vec<RolloutRecord>>, ApiError> {
    reader.require_app(&app)?;
    state
        .hub
        .rollouts(&app)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no rollouts of {app:?} are known")))
}

/// `em ps`: every process of the app the nodes report, from their latest reports.
async fn app_processes(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<Vec<px_proto::beacon::AppProcess>>, ApiError> {
    reader.require_app(&app)?;
    state
        .hub
        .app_processes(&app)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no app {app:?} is deployed")))
}

async fn app_config(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Json<AppAssignment>, ApiError> {
    reader.require_app(&app)?;
    if reader.role == Role::Maestro && !state.hub.assigned_to_token(&app, &reader.sha256) {
        return Err(ApiError::Forbidden(format!(
            "token {:?} is a maestro token; it reads the config of the apps assigned to its node only, and app {app:?} is not",
            reader.name
        )));
    }
    let mut config = state
        .hub
        .app_config(&app)
        .ok_or_else(|| ApiError::NotFound(format!("no app {app:?} is deployed")))?;
    if reader.role == Role::Read {
        mask_values(&mut config);
    }
    Ok(Json(config))
}

/// What a `read` token sees in place of each environment value: the names tell what an app
/// is configured with, the values (database passwords, API keys) are for deployers and the
/// nodes that run the app.
pub const MASKED_VALUE: &str = "(hidden)";

/// Hides every value of an app's environment, and of its build's.
fn mask_values(config: &mut AppAssignment) {
    for value in config.env.values_mut() {
        *value = MASKED_VALUE.to_string();
    }
    if let Some(build) = &mut config.build {
        for value in build.env.values_mut() {
            *value = MASKED_VALUE.to_string();
        }
    }
}

async fn restart(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> Result<Response, ApiError> {
    // A restart changes what runs: deploy tokens only, and only on their apps.
    reader.require_deploy(&app)?;
    let nodes = state
        .hub
        .command(&app, FromBeacon::Restart { app: app.clone() });
    tracing::info!(%app, nodes, by = %reader.name, "restart requested");
    if state.hub.app_config(&app).is_none() {
        return Err(ApiError::NotFound(format!("no app {app:?} is deployed")));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "app": app, "nodes": nodes })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    after: Option<u64>,
    limit: Option<usize>,
    app: Option<String>,
}

async fn events(
    reader: Reader,
    State(state): State<AppState>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::BadRequest(format!("expected ?after=<seq>&limit=<n>&app=<name>: {e}"))
    })?;
    if let Some(app) = &q.app {
        reader.require_app(app)?;
    }
    let mut page =
        state
            .hub
            .events()
            .page(q.after, q.limit.unwrap_or(DEFAULT_PAGE), q.app.as_deref());
    page.retain(|e| reader.sees_event(e));
    Ok(Json(page))
}

/// Server-Sent Events: first what the client missed (after `Last-Event-ID` or `?after=`),
/// then every new event as it is recorded, filtered by `?app=`.
async fn event_stream(
    reader: Reader,
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::BadRequest(format!("expected ?after=<seq>&app=<name>: {e}")))?;
    if let Some(app) = &q.app {
        reader.require_app(app)?;
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(q.after);
    let log = state.hub.events().clone();
    // Subscribe before reading the backlog, so nothing falls between the two.
    let live = log.subscribe();
    let mut backlog = match resume {
        Some(after) => log.page(Some(after), crate::events::MAX_PAGE, q.app.as_deref()),
        None => Vec::new(),
    };
    backlog.retain(|e| reader.sees_event(e));
    let last = backlog.last().map(|e| e.seq).or(resume).unwrap_or(0);
    let app = q.app;
    let stream = futures_util::stream::unfold(
        (backlog.into_iter(), live, last, app),
        move |(mut backlog, mut live, mut last, app)| {
            let reader = reader.clone();
            async move {
                if let Some(event) = backlog.next() {
                    return Some((Ok(to_sse(&event)), (backlog, live, event.seq, app)));
                }
                loop {
                    match live.recv().await {
                        Ok(event) if event.seq <= last => continue,
                        Ok(event)
                            if app.as_ref().is_some_and(|a| event.app.as_ref() != Some(a))
                                || !reader.sees_event(&event) =>
                        {
                            last = event.seq;
                            continue;
                        }
                        Ok(event) => {
                            return Some((Ok(to_sse(&event)), (backlog, live, event.seq, app)));
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let note = SseEvent::default().event("lagged").data(format!(
                            "{missed} events were skipped; fetch /v1/events?after={last} to catch up"
                        ));
                            return Some((Ok(note), (backlog, live, last, app)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    lines: Option<usize>,
    /// Only the output of this build.
    build: Option<u64>,
    /// Only lines of this stream (`stdout`, `stderr`, `event`, `build`).
    stream: Option<LogStream>,
}

impl LogQuery {
    fn filter(&self) -> LogFilter {
        LogFilter {
            build: self.build,
            stream: self.stream,
        }
    }
}

/// What a bad log query is told.
const LOG_QUERY_HELP: &str =
    "expected ?lines=<n>&build=<number>&stream=<stdout|stderr|event|build>";

/// Lines shown when the client does not say how many.
pub const DEFAULT_LOG_LINES: usize = 100;

async fn app_logs(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    reader.require_app(&app)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("{LOG_QUERY_HELP}: {e}")))?;
    Ok(Json(state.logs.recent(
        &app,
        q.lines.unwrap_or(DEFAULT_LOG_LINES),
        q.filter(),
    )))
}

/// Server-Sent Events: the app's last `?lines=` lines, then every new one as nodes forward it;
/// with `?build=` only that build's output, with `?stream=` only that stream. The follower
/// subscribes before it reads the backlog, so a line forwarded in between is sent twice at
/// worst, never missed.
async fn app_log_stream(
    reader: Reader,
    State(state): State<AppState>,
    Path(app): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    reader.require_app(&app)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("{LOG_QUERY_HELP}: {e}")))?;
    let filter = q.filter();
    let live = state.logs.subscribe();
    let backlog = state
        .logs
        .recent(&app, q.lines.unwrap_or(DEFAULT_LOG_LINES), filter);
    let stream = futures_util::stream::unfold(
        (backlog.into_iter(), live, app),
        move |(mut backlog, mut live, app)| async move {
            if let Some(entry) = backlog.next() {
                return Some((Ok(log_sse(&entry)), (backlog, live, app)));
            }
            loop {
                match live.recv().await {
                    Ok(entry) if entry.app == app && filter.matches(&entry) => {
                        return Some((Ok(log_sse(&entry)), (backlog, live, app)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let note = SseEvent::default()
                            .event("lagged")
                            .data(format!("{missed} lines were skipped"));
                        return Some((Ok(note), (backlog, live, app)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE)))
}

fn log_sse(entry: &LogEntry) -> SseEvent {
    SseEvent::default()
        .event("log")
        .data(serde_json::to_string(entry).unwrap_or_default())
}

fn to_sse(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.seq.to_string())
        .event("event")
        .data(serde_json::to_string(event).unwrap_or_default())
}
