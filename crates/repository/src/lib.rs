//! apprepo, the Platform.X AppRepository: receives bundle uploads over HTTP, stores bundles and
//! immutable numbered releases on disk or in S3, serves bundles to Maestros, and tells Beacon
//! when a release is committed. [`run`] is the whole service; `main.rs` only wires it up.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod releases;
pub mod storage;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use px_runtime::config::ConfigError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Backend, Config};
use crate::metrics::Metrics;
use crate::notify::{LinkSettings, Notifier};
use crate::storage::Storage;

/// How long in-flight requests (uploads included) may take to finish after shutdown begins;
/// systemd's `TimeoutStopSec` is set above this.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Everything in the config that can be checked without touching the network: tokens, secret
/// files, TLS material. Used by `--check-config` and at start-up.
pub struct Checked {
    pub tokens: auth::Tokens,
    pub s3_secret: Option<String>,
    pub beacon: Option<LinkSettings>,
}

pub fn check(config: &Config) -> Result<Checked, ConfigError> {
    let mut problems = Vec::new();
    let entries = px_runtime::tokens::gather(
        &config.tokens,
        config.tokens_file.as_deref(),
        "create one with `apprepo token-new`",
    )
    .map_err(|m| problems.push(m))
    .unwrap_or_default();
    let tokens = auth::table(entries).map_err(|m| problems.push(m)).ok();
    let mut s3_secret = None;
    match (&config.storage.backend, &config.storage.s3) {
        (Backend::S3, None) => problems.push(
            "storage.backend is \"s3\" but there is no [storage.s3] section with a bucket".into(),
        ),
        (Backend::S3, Some(s3)) => {
            if !(3..=63).contains(&s3.bucket.len()) {
                problems.push(format!(
                    "storage.s3.bucket {:?} must be 3 to 63 characters",
                    s3.bucket
                ));
            }
            match (&s3.access_key_id, &s3.secret_access_key_file) {
                (Some(_), Some(file)) => match px_runtime::secrets::read_secret_file(file) {
                    Ok(secret) => s3_secret = Some(secret),
                    Err(e) => problems.push(format!("storage.s3.secret_access_key_file: {e}")),
                },
                (Some(_), None) => {
                    problems.push("storage.s3.access_key_id needs secret_access_key_file".into())
                }
                (None, Some(_)) => {
                    problems.push("storage.s3.secret_access_key_file needs access_key_id".into())
                }
                (None, None) => {}
            }
        }
        (Backend::Fs, _) => {}
    }
    if config.limits.max_bundle_bytes == 0 || config.limits.max_concurrent_uploads == 0 {
        problems.push(
            "limits.max_bundle_bytes and limits.max_concurrent_uploads must be above 0".into(),
        );
    }
    let beacon = config.beacon.as_ref().and_then(|b| {
        let resolved = (|| {
            let (server_name, tls) =
                px_runtime::tls::link_client(&b.addr, b.server_name.as_deref(), &b.ca_file)
                    .map_err(|e| e.to_string())?;
            Ok::<_, String>(LinkSettings {
                addr: b.addr.clone(),
                server_name,
                tls,
                token: px_runtime::secrets::read_secret_file(&b.token_file)
                    .map_err(|e| e.to_string())?,
                name: b.name.clone(),
            })
        })();
        resolved
            .map_err(|m| problems.push(format!("beacon: {m}")))
            .ok()
    });
    match tokens {
        Some(tokens) if problems.is_empty() => Ok(Checked {
            tokens,
            s3_secret,
            beacon,
        }),
        _ => Err(ConfigError { problems }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Storage(#[from] storage::StorageError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl px_runtime::service::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
}

/// Opens the configured storage backend.
pub async fn open_storage(
    config: &Config,
    s3_secret: Option<String>,
) -> Result<Arc<dyn Storage>, StartError> {
    Ok(match (&config.storage.backend, &config.storage.s3) {
        (Backend::S3, Some(s3)) => Arc::new(storage::s3::S3Storage::connect(s3, s3_secret).await?),
        _ => Arc::new(storage::fs::FsStorage::open(&config.data_dir.join("storage")).await?),
    })
}

/// Runs apprepo on an already-bound listener until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let checked = check(&config)?;
    let spool_dir = config.data_dir.join("tmp");
    // Spool files left by a crash are partial uploads that never became releases.
    if spool_dir.exists() {
        tokio::fs::remove_dir_all(&spool_dir).await?;
    }
    tokio::fs::create_dir_all(&spool_dir).await?;
    let storage = open_storage(&config, checked.s3_secret).await?;
    match storage.check().await {
        Ok(()) => tracing::info!(storage = %storage.describe(), "storage ready"),
        // Keep serving: reads of cached data and /healthz stay useful, uploads answer 503.
        Err(e) => {
            tracing::warn!(storage = %storage.describe(), error = %e, "storage not reachable yet")
        }
    }
    let metrics = Arc::new(Metrics::default());
    let tracker = TaskTracker::new();
    let notifier = match checked.beacon {
        Some(settings) => Notifier::start(settings, metrics.clone(), &tracker, shutdown.clone()),
        None => {
            tracing::info!("no beacon configured; releases are picked up when beacon reconciles");
            Notifier::disabled(metrics.clone())
        }
    };
    let state = http::AppState {
        releases: releases::Releases::new(storage, metrics.clone()),
        tokens: checked.tokens,
        metrics,
        notifier,
        spool_dir,
        max_bundle_bytes: config.limits.max_bundle_bytes,
        bundle_limits: px_bundle::Limits {
            max_entries: config.limits.max_entries,
            max_unpacked_bytes: config.limits.max_unpacked_bytes,
            ..px_bundle::Limits::default()
        },
        uploads: Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_concurrent_uploads,
        )),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "apprepo listening");
    let server = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let served = server.into_future();
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => r?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(DRAIN_DEADLINE).await } => {
            tracing::warn!("drain deadline passed; closing remaining connections");
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    tracing::info!("apprepo stopped");
    Ok(())
}
