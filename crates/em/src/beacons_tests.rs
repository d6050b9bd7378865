//! em's Beacon calls against small axum servers on this machine: an active Beacon that
//! answers, a standby that redirects to it, a dead address. The standby is a test double (it
//! answers every `/v1/` call with `307` to the active one, as the real standby Beacon does
//! once it runs beside an active one); the real pair is tested where both Beacons run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::IntoResponse;

use super::*;
use crate::settings::EmConfig;

pub(crate) const TOKEN: &str = "pxt_em-test-token";

/// One request a test server got: method, path and query, `Authorization`,
/// `Last-Event-ID`, body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hit {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) authorization: Option<String>,
    pub(crate) last_event_id: Option<String>,
    pub(crate) body: String,
}

/// A server on `127.0.0.1`, recording what it got.
pub(crate) struct Server {
    pub(crate) url: String,
    pub(crate) hits: Arc<Mutex<Vec<Hit>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Server {
    /// Serves `answer` (given the request's path and query) to every request.
    pub(crate) async fn start(
        answer: impl Fn(&str) -> axum::response::Response + Clone + Send + Sync + 'static,
    ) -> Self {
        Self::start_router(|hits| {
            axum::Router::new().fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, body: String| {
                    let (hits, answer) = (Arc::clone(&hits), answer.clone());
                    async move {
                        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                        hits.lock().unwrap().push(Hit {
                            method: method.to_string(),
                            path: path.clone(),
                            authorization: headers
                                .get(header::AUTHORIZATION)
                                .map(|v| v.to_str().unwrap().to_owned()),
                            last_event_id: headers
                                .get("last-event-id")
                                .map(|v| v.to_str().unwrap().to_owned()),
                            body,
                        });
                        answer(&path)
                    }
                },
            )
        })
        .await
    }

    /// Serves the router `make` builds around the list of hits.
    pub(crate) async fn start_router(
        make: impl FnOnce(Arc<Mutex<Vec<Hit>>>) -> axum::Router,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::default();
        let router = make(Arc::clone(&hits));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            url,
            hits,
            task: Some(task),
        }
    }

    /// Stops serving: once this returns, the port refuses connections.
    pub(crate) async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// The active Beacon: answers JSON naming itself and the path.
    pub(crate) async fn active(name: &'static str) -> Self {
        Self::start(move |path| {
            axum::Json(serde_json::json!({ "served_by": name, "path": path })).into_response()
        })
        .await
    }

    /// A standby: `307` to the same path on `active`.
    pub(crate) async fn standby(active: &str) -> Self {
        let active = active.to_owned();
        Self::start(move |path| redirect(&format!("{active}{path}"))).await
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

pub(crate) fn redirect(location: &str) -> axum::response::Response {
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location.to_owned())],
    )
        .into_response()
}

/// An address on this machine where nothing listens: bound, then let go.
pub(crate) fn dead_url() -> String {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", held.local_addr().unwrap())
}

/// A client of a platform with these Beacon URLs (apprepo's is never called here).
pub(crate) fn client(beacons: &[&str]) -> Client {
    let mut config = EmConfig {
        remote: "http://127.0.0.1:9".into(),
        beacon: None,
        beacons: Vec::new(),
        token: TOKEN.into(),
        app_url: None,
        ca_file: None,
        insecure: false,
    };
    config.set_beacon_urls(beacons.iter().map(|u| (*u).to_owned()).collect());
    Client::new(config, false).unwrap()
}

fn bearer() -> Option<String> {
    Some(format!("Bearer {TOKEN}"))
}

#[tokio::test]
async fn a_standbys_redirect_is_followed_with_the_token_and_the_next_call_goes_straight_to_the_active_one()
 {
    let active = Server::active("active").await;
    let standby = Server::standby(&active.url).await;
    let client = client(&[&standby.url, &active.url]);

    let answer: serde_json::Value = client.get(&client.beacon("/v1/apps?x=1")).await.unwrap();
    assert_eq!(
        answer,
        serde_json::json!({ "served_by": "active", "path": "/v1/apps?x=1" })
    );
    // A POST is sent again as a POST with its body (307 keeps both).
    let body = serde_json::json!({ "web": 2 });
    let answer: serde_json::Value = client
        .send_json(
            reqwest::Method::POST,
            &client.beacon("/v1/apps/shop/restart"),
            &body,
        )
        .await
        .unwrap();
    assert_eq!(answer["served_by"], "active");

    let got = active.hits();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0],
        Hit {
            method: "GET".into(),
            path: "/v1/apps?x=1".into(),
            authorization: bearer(),
            last_event_id: None,
            body: String::new(),
        }
    );
    assert_eq!(
        got[1],
        Hit {
            method: "POST".into(),
            path: "/v1/apps/shop/restart".into(),
            authorization: bearer(),
            last_event_id: None,
            body: body.to_string(),
        }
    );
    // The standby was asked once: em remembered which Beacon answered.
    assert_eq!(standby.hits().len(), 1, "{:?}", standby.hits());
}

#[tokio::test]
async fn a_dead_first_url_is_passed_over_for_the_next_beacon() {
    let active = Server::active("second").await;
    let client = client(&[&dead_url(), &active.url]);
    let answer: serde_json::Value = client.get(&client.beacon("/v1/nodes")).await.unwrap();
    assert_eq!(answer["served_by"], "second");
    assert_eq!(active.hits()[0].authorization, bearer());
}

#[tokio::test]
async fn with_every_beacon_dead_the_failure_names_the_last_one_tried() {
    let (first, second) = (dead_url(), dead_url());
    let client = client(&[&first, &second]);
    let failure = client
        .get::<serde_json::Value>(&client.beacon("/v1/nodes"))
        .await
        .unwrap_err();
    assert_eq!(failure.code, crate::failure::EXIT_UNREACHABLE);
    assert!(
        failure
            .message
            .starts_with(&format!("cannot reach {second}/v1/nodes")),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_redirect_to_a_host_em_was_not_given_is_refused_and_gets_no_token() {
    let elsewhere = Server::active("elsewhere").await;
    // The same server under another host name: not one of em's Beacon URLs' hosts.
    let other_host = elsewhere.url.replace("127.0.0.1", "localhost");
    let standby = Server::standby(&other_host).await;
    let client = client(&[&standby.url]);
    let failure = client
        .get::<serde_json::Value>(&client.beacon("/v1/apps"))
        .await
        .unwrap_err();
    assert_eq!(
        failure.message,
        format!(
            "{}/v1/apps redirected em to {other_host}/v1/apps, which is not one of em's Beacon URLs, and em sends its token only to those; if it is a Beacon of this cluster, run `em login` again with a --beacon for each Beacon",
            standby.url
        )
    );
    assert!(elsewhere.hits().is_empty(), "{:?}", elsewhere.hits());
}

#[tokio::test]
async fn redirects_that_go_round_end_after_the_limit() {
    // Two standbys that each believe the other is active.
    let first_target = Arc::new(Mutex::new(String::new()));
    let target = Arc::clone(&first_target);
    let first =
        Server::start(move |path| redirect(&format!("{}{path}", target.lock().unwrap()))).await;
    let second = Server::standby(&first.url).await;
    first_target.lock().unwrap().clone_from(&second.url);
    let client = client(&[&first.url, &second.url]);
    let failure = client
        .get::<serde_json::Value>(&client.beacon("/v1/apps"))
        .await
        .unwrap_err();
    assert!(
        failure.message.starts_with(&format!(
            "the Beacons redirected em more than {MAX_BEACON_REDIRECTS} times"
        )),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_standby_that_knows_no_active_beacon_is_passed_over_and_its_answer_shown_if_none_is() {
    let unavailable = |_: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "2")],
            "{\"message\":\"no active beacon yet\"}",
        )
            .into_response()
    };
    let waiting = Server::start(unavailable).await;
    let active = Server::active("active").await;
    let client = client(&[&waiting.url, &active.url]);
    let answer: serde_json::Value = client.get(&client.beacon("/v1/apps")).await.unwrap();
    assert_eq!(answer["served_by"], "active");

    let alone = self::client(&[&waiting.url]);
    let failure = alone
        .get::<serde_json::Value>(&alone.beacon("/v1/apps"))
        .await
        .unwrap_err();
    assert!(
        failure.message.contains("no active beacon yet"),
        "{}",
        failure.message
    );
}
