//! What Beacon's HTTP listener answers first (docs/src/reference/beacon.md, "Several
//! Beacons"): `/v1/health` and `/v1/health/active` on every Beacon; everything else goes to
//! the API (`http.rs`) on the active Beacon, while a standby redirects it (307) to the active
//! one's URL, or answers 503 with `Retry-After` while it knows none.

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use px_proto::api::ErrorBody;
use px_proto::lease::{BeaconHealth, BeaconRole};
use tower_service::Service;

use crate::lease::Standing;
use crate::metrics::Metrics;

/// Seconds a client is told to wait when no active Beacon is known: about one renewal period
/// of the default lease, after which a standby may have taken over.
pub const RETRY_AFTER_SECS: u32 = 2;

#[derive(Clone)]
pub struct Front {
    pub standing: Arc<Standing>,
    /// The API, set once this Beacon is active and its hub is up.
    pub api: Arc<OnceLock<Router>>,
    pub metrics: Arc<Metrics>,
    /// This Beacon's own advertised URL: a lease naming it is never redirected to (a loop).
    pub own_url: Option<String>,
}

pub fn router(front: Front) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/health/active", get(health_active))
        .fallback(dispatch)
        .with_state(front)
}

fn role(front: &Front) -> BeaconRole {
    if front.standing.is_active() && front.api.get().is_some() {
        BeaconRole::Active
    } else {
        BeaconRole::Standby
    }
}

/// `GET /v1/health`: this Beacon's role and the active one's URL; for anyone, like `/healthz`.
async fn health(State(front): State<Front>) -> Json<BeaconHealth> {
    Json(BeaconHealth {
        role: role(&front),
        active_url: front.standing.active_url(),
        epoch: front.standing.epoch(),
    })
}

/// `GET /v1/health/active`: 200 on the active Beacon, 503 on a standby; what a load balancer
/// checks to send API traffic to the active Beacon alone.
async fn health_active(State(front): State<Front>) -> Response {
    match role(&front) {
        BeaconRole::Active => (StatusCode::OK, "active\n").into_response(),
        BeaconRole::Standby => (StatusCode::SERVICE_UNAVAILABLE, "standby\n").into_response(),
    }
}

async fn dispatch(State(front): State<Front>, request: Request) -> Response {
    if role(&front) == BeaconRole::Active
        && let Some(api) = front.api.get()
    {
        let mut api = api.clone();
        return match api.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    let path = request.uri().path();
    match path {
        // The process is up; whether it is the active one is `/v1/health/active`'s question.
        "/healthz" => return (StatusCode::OK, "ok\n").into_response(),
        "/metrics" => {
            return (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                front.metrics.render_lease(),
            )
                .into_response();
        }
        _ => {}
    }
    let target = front
        .standing
        .active_url()
        .filter(|url| Some(url) != front.own_url.as_ref());
    let Some(base) = target else {
        let body = ErrorBody {
            code: "no_active_beacon".into(),
            message: format!(
                "this Beacon is a standby and knows no active Beacon yet (one takes over within the lease's TTL); retry in {RETRY_AFTER_SECS} s"
            ),
        };
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        return response;
    };
    let tail = request.uri().path_and_query().map_or(path, |p| p.as_str());
    let location = format!("{}{tail}", base.trim_end_matches('/'));
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        // The URL was checked by apprepo; a path that makes it unusable is the client's.
        Err(_) => (StatusCode::BAD_REQUEST, "unusable path\n").into_response(),
    }
}
