//! The `em` binary with several Beacons: `em login --beacon URL --beacon URL` records them all,
//! and `em status` reaches the active Beacon past a dead first URL and through a standby's
//! redirect. The Beacons are small axum servers: the standby is a test double (every call
//! answered with `307` to the active one, as the real standby Beacon answers), and the active
//! one answers `em status`'s two calls with empty lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;

const BIN: &str = env!("CARGO_BIN_EXE_em");
const TOKEN: &str = "pxt_em-binary-test-token";

/// What one server got: the path and the `Authorization` header of each request.
type Hits = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves `answer` to every request on `127.0.0.1`, recording each; returns its URL.
async fn serve(
    answer: impl Fn(&str) -> axum::response::Response + Clone + Send + Sync + 'static,
) -> (String, Hits) {
    let hits: Hits = Arc::default();
    let recorded = Arc::clone(&hits);
    let router = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let (recorded, answer) = (Arc::clone(&recorded), answer.clone());
        async move {
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let authorization = headers
                .get(header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned());
            recorded.lock().unwrap().push((path.clone(), authorization));
            answer(&path)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, hits)
}

fn em(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("HOME", home)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_logs_in_to_every_beacon_and_reaches_the_active_one_past_a_dead_url_and_a_standby() {
    let home = tempfile::tempdir().unwrap();
    let empty_list = |_: &str| axum::Json(serde_json::json!([])).into_response();
    let (remote, _) = serve(empty_list).await;
    let (active, active_hits) = serve(empty_list).await;
    let target = active.clone();
    let (standby, standby_hits) = serve(move |path| {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, format!("{target}{path}"))],
        )
            .into_response()
    })
    .await;
    let dead = {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", held.local_addr().unwrap())
    };
    let token_file = home.path().join("token");
    px_runtime::secrets::write_secret_file(&token_file, TOKEN).unwrap();

    let out = em(
        home.path(),
        &[
            "login",
            "--remote",
            &remote,
            "--beacon",
            &dead,
            "--beacon",
            &standby,
            "--beacon",
            &active,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config = std::fs::read_to_string(home.path().join("config/em/config.toml")).unwrap();
    let config: toml::Table = toml::from_str(&config).unwrap();
    assert_eq!(
        config["beacons"],
        toml::Value::Array(vec![
            dead.clone().into(),
            standby.clone().into(),
            active.clone().into()
        ])
    );
    assert!(!config.contains_key("beacon"), "{config:?}");

    let out = em(home.path(), &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(none linked yet)"),
        "{}",
        text(&out.stdout)
    );
    let bearer = Some(format!("Bearer {TOKEN}"));
    assert_eq!(
        *active_hits.lock().unwrap(),
        [
            ("/v1/nodes".to_owned(), bearer.clone()),
            ("/v1/apps".to_owned(), bearer.clone())
        ]
    );
    // The standby was asked once; the second call went straight to the Beacon that answered.
    assert_eq!(
        *standby_hits.lock().unwrap(),
        [("/v1/nodes".to_owned(), bearer)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_both_beacon_and_beacons_is_refused_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config/em/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        "remote = \"http://127.0.0.1:9\"\nbeacon = \"http://127.0.0.1:9\"\nbeacons = [\"http://127.0.0.1:9\", \"http://127.0.0.2:9\"]\ntoken = \"pxt_x\"\n",
    )
    .unwrap();
    let out = em(home.path(), &["status"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        text(&out.stderr).contains("em's config gives both `beacon` and `beacons`; keep one"),
        "{}",
        text(&out.stderr)
    );
}

/// An event of the app `shop`'s release 1, as Beacon's event stream sends it.
fn sse_event(seq: u64, kind: px_proto::beacon::EventKind) -> String {
    let event = px_proto::beacon::Event {
        seq,
        at: "2026-12-06T00:00:00Z".into(),
        kind,
        level: px_proto::beacon::Level::Info,
        node: None,
        app: Some("shop".into()),
        release: Some(1),
        message: format!("{kind:?}"),
        detail: None,
        failure: None,
        build: None,
    };
    format!(
        "id: {seq}\nevent: event\ndata: {}\n\n",
        serde_json::to_string(&event).unwrap()
    )
}

/// `shop`'s release 1, as apprepo answers its upload.
fn release() -> px_proto::api::Release {
    px_proto::api::Release {
        app: "shop".into(),
        version: 1,
        bundle: px_proto::api::BundleRef {
            sha256: "0".repeat(64),
            size: 100,
            bundled_commands: Vec::new(),
            unpacked_size: None,
        },
        manifest: px_proto::manifest::AppManifest::parse(
            "name = \"shop\"\nrun = \"python3 server.py\"\n",
        )
        .unwrap(),
        config: Default::default(),
        cause: px_proto::api::ReleaseCause::Deploy,
        description: "deploy".into(),
        created_at: "2026-12-06T00:00:00Z".into(),
        created_by: "em".into(),
        build: None,
        phase: None,
        config_hidden: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_deploy_follows_the_rollout_across_a_beacon_failover() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let home = tempfile::tempdir().unwrap();
    let uploaded = Arc::new(tokio::sync::Notify::new());
    // apprepo: the app exists, and the upload is release 1.
    let (remote, _) = {
        let uploaded = Arc::clone(&uploaded);
        serve(move |path| {
            if path.ends_with("/releases") {
                uploaded.notify_one();
                (StatusCode::CREATED, axum::Json(release())).into_response()
            } else {
                StatusCode::CREATED.into_response()
            }
        })
        .await
    };
    // The Beacon that takes over: it resumes the stream after the last event em saw.
    let (second, second_hits) = serve(|path| {
        if path.starts_with("/v1/events/stream") {
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                sse_event(2, px_proto::beacon::EventKind::DeployFinished),
            )
                .into_response()
        } else {
            StatusCode::NOT_FOUND.into_response()
        }
    })
    .await;
    // The active Beacon at first: its event stream says the rollout started once the upload
    // is in, then ends as the Beacon steps down; from then on it redirects to the second.
    let stepped_down = Arc::new(AtomicBool::new(false));
    let (first, _) = {
        let (second, stepped_down) = (second.clone(), Arc::clone(&stepped_down));
        serve(move |path| {
            if stepped_down.load(Ordering::Relaxed) {
                return (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, format!("{second}{path}"))],
                )
                    .into_response();
            }
            if !path.starts_with("/v1/events/stream") {
                return StatusCode::NOT_FOUND.into_response();
            }
            let (uploaded, stepped_down) = (Arc::clone(&uploaded), Arc::clone(&stepped_down));
            let body = futures_util::stream::once(async move {
                uploaded.notified().await;
                stepped_down.store(true, Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(sse_event(
                    1,
                    px_proto::beacon::EventKind::DeployStarted,
                ))
            });
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        })
        .await
    };

    let config = home.path().join("config/em/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "remote = \"{remote}\"\nbeacons = [\"{first}\", \"{second}\"]\ntoken = \"{TOKEN}\"\n"
        ),
    )
    .unwrap();
    let app = home.path().join("shop");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("app.toml"),
        "name = \"shop\"\nrun = \"python3 server.py\"\n",
    )
    .unwrap();
    std::fs::write(app.join("server.py"), "print('hello')\n").unwrap();

    let dir = app.to_str().unwrap().to_owned();
    let home_path = home.path().to_owned();
    let out = tokio::task::spawn_blocking(move || em(&home_path, &["deploy", &dir]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(stepped_down.load(Ordering::Relaxed));
    let resumed: Vec<_> = second_hits
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.starts_with("/v1/events/stream"))
        .cloned()
        .collect();
    assert_eq!(
        resumed,
        [(
            "/v1/events/stream?app=shop".to_owned(),
            Some(format!("Bearer {TOKEN}"))
        )],
        "the second Beacon served the rest of the rollout"
    );
}
