//! A stand-in for apprepo: `GET /v1/apps` over HTTP on loopback, answering the real
//! `Vec<px_proto::api::App>` JSON with one app whose current release the benchmark sets. Beacon
//! reads only this endpoint, so a stub keeps apprepo's own costs (storage, S3) out of the figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use px_proto::api::{App, BundleRef, Release, ReleaseCause};
use px_proto::manifest::AppManifest;
use tokio_util::sync::CancellationToken;

/// The one app the benchmark deploys.
pub const APP: &str = "bench";

struct StubState {
    token: String,
    current: Mutex<Option<Release>>,
    /// When `/v1/apps` was last read, as nanoseconds after `epoch` (0: never).
    last_read: AtomicU64,
    epoch: Instant,
}

pub struct RepoStub {
    state: Arc<StubState>,
    pub url: String,
}

impl RepoStub {
    /// Serves on `127.0.0.1:0` until `shutdown`; requests must carry `token`. `epoch` is the
    /// instant read times are measured from.
    pub async fn start(token: String, epoch: Instant, shutdown: CancellationToken) -> Result<Self> {
        let state = Arc::new(StubState {
            token,
            current: Mutex::new(None),
            last_read: AtomicU64::new(0),
            epoch,
        });
        let router = axum::Router::new()
            .route("/v1/apps", get(apps))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the repository stub")?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                eprintln!("beacon-loadgen: repository stub stopped: {e}");
            }
        });
        Ok(Self {
            state,
            url: format!("http://{addr}"),
        })
    }

    /// Makes `version` the current release of [`APP`], as a commit in apprepo would.
    pub fn set_release(&self, version: u64) -> Result<()> {
        let manifest = AppManifest::parse(&format!(
            "name = \"{APP}\"\nrun = \"python3 server.py\"\n[health]\npath = \"/healthz\"\n"
        ))
        .context("the stub's manifest")?;
        let release = Release {
            app: APP.into(),
            version,
            // A made-up digest: nothing downloads the bundle in this benchmark.
            bundle: BundleRef {
                sha256: format!("{version:064x}"),
                size: 4096,
                bundled_commands: Vec::new(),
                unpacked_size: None,
            },
            manifest,
            config: BTreeMap::from([("DATABASE_URL".to_string(), "postgres://db".to_string())]),
            cause: ReleaseCause::Deploy,
            description: format!("benchmark release {version}"),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            created_by: "beacon-loadgen".into(),
            build: None,
            phase: None,
            config_hidden: false,
        };
        *self
            .state
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(release);
        Ok(())
    }

    /// When Beacon last read `/v1/apps`, as time after the epoch given to [`RepoStub::start`].
    pub fn last_read(&self) -> Option<std::time::Duration> {
        match self.state.last_read.load(Ordering::Acquire) {
            0 => None,
            nanos => Some(std::time::Duration::from_nanos(nanos)),
        }
    }
}

async fn apps(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
) -> Result<axum::Json<Vec<App>>, StatusCode> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(state.token.as_str()) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let nanos = u64::try_from(state.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    state.last_read.store(nanos.max(1), Ordering::Release);
    let current = state
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let apps = current
        .map(|release| App {
            name: release.app.clone(),
            created_at: release.created_at.clone(),
            created_by: release.created_by.clone(),
            current: Some(release),
            formation: Default::default(),
            domains: Vec::new(),
        })
        .into_iter()
        .collect();
    Ok(axum::Json(apps))
}
