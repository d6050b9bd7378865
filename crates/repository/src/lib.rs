//! apprepo, the Platform.X AppRepository: receives bundle uploads over HTTP, stores bundles and
//! immutable numbered releases on disk or in S3, keeps the builds of uploads that need one and
//! the layers they make, serves bundles and layers to Maestros, and tells Beacon when a release
//! is committed or a build waits. [`run`] is the whole service; `main.rs` only wires it up.

pub(crate) mod acme;
pub mod auth;
pub(crate) mod beacon_state;
pub(crate) mod builds;
pub(crate) mod claims;
pub mod cli;
pub(crate) mod condemned;
pub mod config;
pub(crate) mod domains;
pub(crate) mod error;
pub(crate) mod formation;
pub(crate) mod http;
pub(crate) mod lease;
pub(crate) mod metrics;
pub(crate) mod minted;
pub(crate) mod notify;
pub(crate) mod phases;
pub(crate) mod releases;
pub(crate) mod retention;
pub(crate) mod rollback;
pub(crate) mod spool;
pub(crate) mod storage;
pub(crate) mod upload;

/// What apprepo's own integration tests (`tests/`, another crate to the compiler) reach beyond
/// the service's interface: the storage backends, tested against a real S3 server on their
/// own, and retention sweeps run at a chosen `now`. No other crate may use it; it is public,
/// and hidden from the docs, only because those tests cannot see `pub(crate)` items. A service
/// crate whose tests need such items exposes them here and nowhere else (Maestro has the same
/// module; Beacon's tests need none), so that everything else stays `pub(crate)` and what is
/// public says what other crates may use.
#[doc(hidden)]
pub mod internals {
    pub use crate::metrics::Metrics;
    pub use crate::releases::Releases;
    pub use crate::retention::{Policy, SweepReport, sweep};
    pub use crate::storage::s3::{MULTIPART_THRESHOLD, S3Storage};
    pub use crate::storage::{Blob, Storage, StorageError, bundle_key, open as open_storage};
}

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use px_link::LinkSettings;
use px_proto::link::PeerRole;
use px_runtime::config::ConfigError;
use px_runtime::http_server::ServerTls;
use px_runtime::shutdown::{CriticalTasks, TaskEnded};
use px_runtime::systemd::{Reloaded, Systemd};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Backend, Config};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::storage::Storage;

/// How long in-flight requests (uploads included) may take to finish after shutdown begins;
/// systemd's `TimeoutStopSec` is set above this.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Everything in the config that can be checked without touching the network: tokens, secret
/// files, TLS material. Used by `--check-config` and at start-up.
pub struct Checked {
    pub(crate) tokens: auth::Tokens,
    pub(crate) s3_secret: Option<String>,
    pub(crate) beacon: Option<LinkSettings>,
    /// The API's TLS config; `None` when `api_tls.plain_http` says so.
    pub(crate) api_tls: Option<ServerTls>,
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
    problems.extend(config.retention.problems());
    let beacon = config.beacon.as_ref().and_then(|b| {
        b.link()
            .resolve(PeerRole::Repository, &b.name)
            .map_err(|e| problems.push(format!("beacon: {e}")))
            .ok()
    });
    let api_tls = config
        .api_tls
        .resolve(None)
        .map_err(|m| problems.push(m))
        .ok()
        .flatten();
    match tokens {
        Some(tokens) if problems.is_empty() => Ok(Checked {
            tokens,
            s3_secret,
            beacon,
            api_tls,
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
    /// A task apprepo cannot serve without ended (see [`CriticalTasks`]).
    #[error("{0}")]
    TaskEnded(#[from] TaskEnded),
}

impl px_runtime::service::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_))
    }
}

/// Settings a reload applies (see `config.rs`); any other change needs a restart.
const RELOADABLE: &[&str] = &[
    "tokens",
    "tokens_file",
    "api_tls.cert_file",
    "api_tls.key_file",
];

/// How often the storage is checked again for the status systemd shows: S3 bills requests,
/// and a minute-old answer is fresh enough for a person reading `systemctl status`.
const STORAGE_RECHECK: Duration = Duration::from_secs(60);

/// Runs apprepo on an already-bound listener until `shutdown` is cancelled, then drains;
/// without a service manager (`em up`, tests). If one of its critical tasks (the HTTP server,
/// the Beacon link, retention) ends on its own, apprepo cancels `shutdown`, drains, and returns
/// [`StartError::TaskEnded`] naming it.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    run_with(config, listener, shutdown, Systemd::none()).await
}

/// [`run`], telling `systemd` when apprepo is ready (listening, storage opened and checked),
/// how its storage and Beacon notices fare, that it is alive, and answering its reload
/// requests.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    systemd: Systemd<Config>,
) -> Result<(), StartError> {
    let checked = check(&config)?;
    let spool_dir = config.data_dir.join("tmp");
    // Spool files left by a crash are partial uploads that never became releases.
    if spool_dir.exists() {
        tokio::fs::remove_dir_all(&spool_dir).await?;
    }
    tokio::fs::create_dir_all(&spool_dir).await?;
    let http_limits = config.http;
    let storage = storage::open(&config, checked.s3_secret).await?;
    let storage_state = match storage.check().await {
        Ok(()) => {
            tracing::info!(storage = %storage.describe(), "storage ready");
            Ok(())
        }
        // Keep serving: reads of cached data and /healthz stay useful, uploads answer 503.
        Err(e) => {
            tracing::warn!(storage = %storage.describe(), error = %e, "storage not reachable yet");
            Err(e.to_string())
        }
    };
    let storage_state = Arc::new(Mutex::new(storage_state));
    let metrics = Arc::new(Metrics::default());
    let tracker = TaskTracker::new();
    let critical = CriticalTasks::new(&tracker, &shutdown);
    if systemd.notifier.is_enabled() {
        tracker.spawn(recheck_storage(
            storage.clone(),
            storage_state.clone(),
            shutdown.clone(),
        ));
    }
    let beacon_addr = checked.beacon.as_ref().map(LinkSettings::addrs);
    let releases = releases::Releases::new(storage.clone(), metrics.clone());
    let minted = minted::Minted::new(storage.clone(), checked.tokens.clone());
    if let Err(e) = minted.refresh().await {
        tracing::warn!(error = %e, "cannot read the minted tokens yet; retrying");
    }
    tracker.spawn(minted.clone().keep_fresh(shutdown.clone()));
    let notifier = match checked.beacon {
        Some(settings) => Notifier::start(
            settings,
            releases.clone(),
            minted.subscribe(),
            metrics.clone(),
            &critical,
            &tracker,
            shutdown.clone(),
        ),
        None => {
            tracing::info!("no beacon configured; releases are picked up when beacon reconciles");
            Notifier::disabled(metrics.clone())
        }
    };
    let storage_name = storage.describe();
    retention::start(
        releases.clone(),
        &config.retention,
        &critical,
        shutdown.clone(),
    );
    let state = http::AppState {
        builds: builds::Builds::new(releases.clone()),
        releases,
        minted,
        tokens: checked.tokens.clone(),
        metrics: metrics.clone(),
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
    let tls = checked.api_tls.clone();
    let https = tls.is_some();
    let scheme = if https {
        "https"
    } else {
        "http (plain, as configured)"
    };
    tracing::info!(%addr, scheme, "apprepo listening");
    let reload_tls = tls.clone();
    systemd.ready(
        &tracker,
        &shutdown,
        move || {
            status_line(
                &storage_name,
                &storage_state,
                beacon_addr.as_deref(),
                &metrics,
            )
        },
        move || {
            Box::pin(async move {
                // The blocking pool runs the filesystem storage and bundle inspection.
                tokio::task::spawn_blocking(|| ())
                    .await
                    .map_err(|e| format!("the blocking pool did not answer: {e}"))?;
                // `/metrics` answers without touching storage or asking for a token.
                px_runtime::systemd::http_answers(addr, "/metrics", https).await
            }) as BoxFuture<'static, Result<(), String>>
        },
        move |new: Config| {
            std::future::ready(reload(&config, &new, &checked.tokens, reload_tls.as_ref()))
        },
    );
    critical.spawn(
        "the http server",
        http::serve(listener, state, http_limits, tls, shutdown.clone()),
    );
    shutdown.cancelled().await;
    // Open requests (uploads included) and the tasks get one deadline to finish together.
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    match critical.ended() {
        Some(ended) => {
            tracing::error!(error = %ended, "apprepo stopped");
            Err(ended.into())
        }
        None => {
            tracing::info!("apprepo stopped");
            Ok(())
        }
    }
}

/// Checks the storage every [`STORAGE_RECHECK`] for the status line.
async fn recheck_storage(
    storage: Arc<dyn Storage>,
    state: Arc<Mutex<Result<(), String>>>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(STORAGE_RECHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // The first tick is now, and start-up just checked.
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let checked = storage.check().await.map_err(|e| e.to_string());
        *state.lock().unwrap_or_else(PoisonError::into_inner) = checked;
    }
}

/// apprepo's STATUS= line, e.g. `storage filesystem at /var/lib/platformx/apprepo/storage ok;
/// beacon notices to 10.0.0.2:7443: 12 sent, 0 dropped`.
fn status_line(
    storage: &str,
    state: &Mutex<Result<(), String>>,
    beacon: Option<&str>,
    metrics: &Metrics,
) -> String {
    let storage = match &*state.lock().unwrap_or_else(PoisonError::into_inner) {
        Ok(()) => format!("storage {storage} ok"),
        Err(e) => format!("storage {storage} unreachable: {e}"),
    };
    let beacon = match beacon {
        Some(addr) => format!(
            "beacon notices to {addr}: {} sent, {} dropped",
            metrics.notifications_sent.get(),
            metrics.notifications_dropped.get()
        ),
        None => "no beacon configured".into(),
    };
    format!(
        "{storage}; {} releases committed; {beacon}",
        metrics.releases_committed.get()
    )
}

/// A reload: the new configuration must pass [`check`]; its tokens (inline and `tokens_file`)
/// replace the accepted ones from the next request on, and the API's certificate (read again)
/// the served one from the next connection on; any other changed setting needs a restart.
fn reload(
    running: &Config,
    new: &Config,
    tokens: &auth::Tokens,
    tls: Option<&ServerTls>,
) -> Result<Reloaded, String> {
    let checked = check(new).map_err(|e| e.to_string())?;
    let table = Arc::try_unwrap(checked.tokens).unwrap_or_else(|shared| (*shared).clone());
    let count = table.len();
    tokens.replace(table);
    let mut needs_restart = px_runtime::config::restart_needed(running, new, RELOADABLE);
    let certificate = match (tls, checked.api_tls) {
        (Some(tls), Some(config)) => {
            tls.replace(&config);
            ", the api certificate"
        }
        (None, None) => "",
        // Switching between HTTPS and plain HTTP changes what the listener speaks (listed
        // already when `plain_http` itself changed).
        _ => {
            if !needs_restart.iter().any(|key| key == "api_tls.plain_http") {
                needs_restart.push("api_tls.plain_http".into());
            }
            ""
        }
    };
    Ok(Reloaded {
        applied: format!(
            "{count} token{}{certificate}",
            if count == 1 { "" } else { "s" }
        ),
        needs_restart,
    })
}
