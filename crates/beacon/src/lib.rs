//! beacon, the Platform.X AppMonitor: accepts the control links of Maestros and repositories,
//! reads the desired state from the repository, pushes each node its assignment, tracks
//! rollouts, records events, alerts sysadmins, and serves an HTTP API and a status page.
//! [`run`] is the whole service; `main.rs` only wires it up.

pub(crate) mod acme;
pub(crate) mod active;
pub mod admission;
pub(crate) mod alert_budget;
pub(crate) mod alerts;
pub mod auth;
pub mod cli;
pub mod config;
pub(crate) mod events;
pub(crate) mod frames;
pub(crate) mod front;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod judge;
pub(crate) mod lease;
pub(crate) mod link_silence;
pub(crate) mod link_tls;
pub(crate) mod links;
pub(crate) mod login;
pub(crate) mod logstore;
pub(crate) mod metrics;
pub(crate) mod open_links;
pub(crate) mod placement;
pub(crate) mod reconcile;
pub(crate) mod runs;
pub(crate) mod shared_state;
pub(crate) mod status;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use px_runtime::config::ConfigError;
use px_runtime::http_server::ServerTls;
use px_runtime::shutdown::{CriticalTasks, TaskEnded};
use px_runtime::systemd::{Reloaded, Systemd};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// How long open requests and links get to finish at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The already-bound sockets Beacon serves on. With `[lease]`, `control` is released at once
/// (a standby accepts no links) and Beacon binds `control_listen` itself once it is active.
pub struct Listeners {
    pub http: TcpListener,
    pub control: TcpListener,
}

/// Everything in the config that can be checked without the network.
pub struct Checked {
    pub(crate) tokens: auth::Tokens,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) repository_token: String,
    /// The API's TLS config; `None` when `api_tls.plain_http` says so.
    pub(crate) api_tls: Option<ServerTls>,
    /// What Beacon trusts in apprepo's certificate: `repository.ca_file`, else the system's
    /// roots (`None`).
    pub(crate) repository_tls: Option<Arc<rustls::ClientConfig>>,
    /// `[acme]` checked; `None` while `acme.directory_url` is unset (ACME off).
    pub(crate) acme: Option<acme::AcmeSettings>,
}

pub fn check(config: &Config) -> Result<Checked, ConfigError> {
    let mut problems = Vec::new();
    let entries = px_runtime::tokens::gather(
        &config.tokens,
        config.tokens_file.as_deref(),
        "hash a token with `apprepo token-hash`",
    )
    .map_err(|m| problems.push(m))
    .unwrap_or_default();
    problems.extend(auth::check_nodes(&entries));
    let tokens = px_runtime::tokens::TokenTable::new(entries)
        .map_err(|m| problems.push(m))
        .ok();
    let tls = if config.tls_cert_file.as_os_str().is_empty()
        || config.tls_key_file.as_os_str().is_empty()
    {
        problems.push("tls_cert_file and tls_key_file are required (Beacon's certificate for the control links)".into());
        None
    } else {
        px_runtime::tls::server_config(&config.tls_cert_file, &config.tls_key_file)
            .map_err(|e| problems.push(format!("tls: {e}")))
            .ok()
    };
    let repository_token = if config.repository.token_file.as_os_str().is_empty() {
        problems.push("repository.token_file is required (a read token for apprepo)".into());
        None
    } else {
        px_runtime::secrets::read_secret_file(&config.repository.token_file)
            .map_err(|e| problems.push(format!("repository.token_file: {e}")))
            .ok()
    };
    if !config.repository.url.starts_with("http://")
        && !config.repository.url.starts_with("https://")
    {
        problems.push(format!(
            "repository.url {:?} must start with http:// or https://",
            config.repository.url
        ));
    }
    if let Err(m) = px_proto::names::check_domain(&config.domain) {
        problems.push(format!("domain: {m}"));
    }
    for url in &config.alerts.webhooks {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            problems.push(format!(
                "alerts.webhooks: {url:?} must start with http:// or https://"
            ));
        }
    }
    // The API presents the control links' certificate unless `[api_tls]` names another: both
    // are this host's.
    let fallback = (!config.tls_cert_file.as_os_str().is_empty()
        && !config.tls_key_file.as_os_str().is_empty())
    .then_some((
        config.tls_cert_file.as_path(),
        config.tls_key_file.as_path(),
    ));
    let api_tls = config
        .api_tls
        .resolve(fallback)
        .map_err(|m| problems.push(m))
        .ok()
        .flatten();
    let repository_tls = config.repository.ca_file.as_ref().and_then(|ca| {
        px_runtime::tls::client_config(ca)
            .map_err(|e| problems.push(format!("repository.ca_file: {e}")))
            .ok()
    });
    let acme = check_acme(&config.acme, &config.repository.url, &mut problems);
    check_lease(&config.lease, &mut problems);
    match (tokens, tls, repository_token) {
        (Some(tokens), Some(tls), Some(repository_token)) if problems.is_empty() => Ok(Checked {
            tokens: Arc::new(tokens),
            tls,
            repository_token,
            api_tls,
            repository_tls,
            acme,
        }),
        _ => Err(ConfigError { problems }),
    }
}

/// Checks `[lease]`: a TTL within apprepo's bounds, and the URL this Beacon advertises.
fn check_lease(config: &config::LeaseConfig, problems: &mut Vec<String>) {
    let (min, max) = (
        Duration::from_millis(px_proto::lease::MIN_LEASE_TTL_MS),
        Duration::from_millis(px_proto::lease::MAX_LEASE_TTL_MS),
    );
    if !(min..=max).contains(&config.ttl) {
        problems.push(format!(
            "lease.ttl {} must be between {} and {} (e.g. 6s)",
            humantime::format_duration(config.ttl),
            humantime::format_duration(min),
            humantime::format_duration(max),
        ));
    }
    match (&config.api_url, config.enabled) {
        (Some(url), _) => {
            if let Err(m) = px_proto::lease::check_api_url(url) {
                problems.push(format!("lease.{m}"));
            }
        }
        (None, true) => problems.push(
            "lease.api_url is required with lease.enabled: the URL of this Beacon's API that clients reach it at (e.g. https://10.0.1.5:7080)".into(),
        ),
        (None, false) => {}
    }
}

/// Checks `[acme]`: off without `directory_url`; an https URL, a readable `ca_file`, a plain
/// email address and profile name otherwise.
fn check_acme(
    config: &config::AcmeConfig,
    repository_url: &str,
    problems: &mut Vec<String>,
) -> Option<acme::AcmeSettings> {
    let directory_url = config.directory_url.as_ref()?;
    let before = problems.len();
    if !directory_url.starts_with("https://") {
        problems.push(format!(
            "acme.directory_url {directory_url:?} must start with https:// (e.g. {})",
            config::LETS_ENCRYPT_DIRECTORY
        ));
    }
    if let Some(email) = &config.email
        && (!email.contains('@') || email.chars().any(|c| c.is_whitespace() || c == ','))
    {
        problems.push(format!("acme.email {email:?} is not one email address"));
    }
    if let Some(profile) = &config.profile
        && (profile.is_empty()
            || profile.len() > MAX_ACME_PROFILE_LEN
            || !profile
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        problems.push(format!(
            "acme.profile {profile:?} must be 1 to {MAX_ACME_PROFILE_LEN} letters, digits, '-' or '_' (e.g. shortlived)"
        ));
    }
    if !(MIN_ACME_RETRY..=MAX_ACME_RETRY).contains(&config.retry_after_failure) {
        problems.push(format!(
            "acme.retry_after_failure {} must be between {} and {} (e.g. 15m)",
            humantime::format_duration(config.retry_after_failure),
            humantime::format_duration(MIN_ACME_RETRY),
            humantime::format_duration(MAX_ACME_RETRY),
        ));
    }
    let ca_tls = config.ca_file.as_ref().and_then(|ca| {
        px_runtime::tls::client_config(ca)
            .map_err(|e| problems.push(format!("acme.ca_file: {e}")))
            .ok()
    });
    (problems.len() == before).then(|| acme::AcmeSettings {
        directory_url: directory_url.clone(),
        repository_url: repository_url.to_string(),
        email: config.email.clone(),
        challenge: config.challenge,
        profile: config.profile.clone(),
        ca_tls,
        limits: acme::budget::Limits::LETS_ENCRYPT,
        publish_delay: acme::DEFAULT_PUBLISH_DELAY,
        retry_after_failure: config.retry_after_failure,
    })
}

/// Shortest `acme.retry_after_failure`: a second, for tests against a local CA; a real CA's
/// failure limits are kept by the budget (`acme/budget.rs`) whatever this says.
const MIN_ACME_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest `acme.retry_after_failure`: a day, past which a certificate in use could expire
/// between two tries.
const MAX_ACME_RETRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Longest `acme.profile`: CA profile names are short words (`classic`, `shortlived`).
const MAX_ACME_PROFILE_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
    /// A task Beacon cannot serve without ended (see [`CriticalTasks`]).
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
    "alerts.webhooks",
    "api_tls.cert_file",
    "api_tls.key_file",
];

/// Runs Beacon on already-bound listeners until `shutdown` is cancelled; without a service
/// manager (`em up`, tests). If one of its critical tasks (the link server, the HTTP server,
/// the reconciler, the sweeper) ends on its own, Beacon cancels `shutdown`, drains, and
/// returns [`StartError::TaskEnded`] naming it.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    run_with(config, listeners, shutdown, Systemd::none()).await
}

/// [`run`], telling `systemd` when Beacon is ready (listeners open, event log loaded), how
/// many nodes and apps it has, that it is alive, and answering its reload requests. With
/// `[lease]`, Beacon starts as a standby: its HTTP API redirects to the active Beacon, its
/// control port is closed, and it becomes active once it holds the lease; if it cannot keep
/// the lease it returns [`StartError::TaskEnded`] naming the lease keeper.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    systemd: Systemd<Config>,
) -> Result<(), StartError> {
    let mut checked = check(&config)?;
    let http_limits = config.http;
    tokio::fs::create_dir_all(&config.data_dir).await?;
    let tracker = TaskTracker::new();
    let metrics = Arc::new(metrics::Metrics::default());
    let alerter = alerts::Alerter::start(
        alerts::AlertSettings {
            webhooks: config.alerts.webhooks.clone(),
            dedup_window: config.alerts.dedup_window,
            backoff_base: alerts::DEFAULT_BACKOFF_BASE,
        },
        &tracker,
        shutdown.clone(),
    );
    let parts = active::Parts {
        critical: CriticalTasks::new(&tracker, &shutdown),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        events: Arc::new(events::EventLog::open(&config.data_dir)?),
        alerter: alerter.clone(),
        client: reconcile::RepositoryClient::new(
            &config.repository.url,
            checked.repository_token.clone(),
            checked.repository_tls.clone(),
        )
        .map_err(StartError::Other)?,
        app_logs: Arc::new(logstore::LogStore::default()),
        runs: Arc::new(runs::Runs::default()),
        open_links: Arc::new(open_links::OpenLinks::default()),
        swept: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
    };
    let critical = parts.critical.clone();
    // The HTTP listener serves from the start: a standby answers with redirects.
    let standing = Arc::new(lease::Standing::standby());
    let api = Arc::new(OnceLock::new());
    let http_addr = listeners.http.local_addr()?;
    let api_tls = checked.api_tls.clone();
    let https = api_tls.is_some();
    let front = front::Front {
        standing: standing.clone(),
        api: api.clone(),
        metrics: metrics.clone(),
        own_url: config.lease.api_url.clone(),
    };
    critical.spawn(
        "the http server",
        // The hardened server: a request head deadline, an idle timeout and a connection cap
        // (`px_runtime::http_server`), where `axum::serve` has none of them.
        px_runtime::http_server::serve(
            listeners.http,
            front::router(front),
            http_limits,
            api_tls.clone(),
            shutdown.clone(),
        ),
    );
    let scheme = if https {
        "https"
    } else {
        "http (plain, as configured)"
    };
    tracing::info!(http = %http_addr, scheme, "beacon listening");
    let active_hub: Arc<OnceLock<Arc<hub::Hub>>> = Arc::new(OnceLock::new());
    // Without a lease this Beacon is the only one: active before it says it is ready. With
    // one, the control listener it was given is released at once: a standby takes no links.
    if config.lease.enabled {
        drop(listeners.control);
    } else {
        standing.activate_alone(&metrics);
        let acme = checked.acme.take();
        let (hub, router) = active::start(
            &config,
            &checked,
            &parts,
            listeners.control,
            active::Under::default(),
            https,
            acme,
        )?;
        let _ = api.set(router);
        let _ = active_hub.set(hub);
    }
    let status_hub = active_hub.clone();
    let status_standing = standing.clone();
    let status_metrics = metrics.clone();
    let probe_hub = active_hub.clone();
    let swept = parts.swept.clone();
    let epoch = parts.epoch;
    let reload_tls = api_tls.clone();
    let reload_tokens = checked.tokens.clone();
    let open_links = parts.open_links.clone();
    let running = config.clone();
    systemd.ready(
        &tracker,
        &shutdown,
        move || match status_hub.get() {
            Some(hub) => status_line(hub, &status_metrics),
            None => standby_line(&status_standing),
        },
        move || {
            let hub = probe_hub.get().cloned();
            let swept = swept.clone();
            Box::pin(async move {
                if let Some(hub) = hub {
                    let since_sweep =
                        millis_since(epoch).saturating_sub(swept.load(Ordering::Relaxed));
                    if Duration::from_millis(since_sweep) > SWEEPER_SILENCE {
                        return Err(format!(
                            "the sweeper has not finished a pass for {since_sweep} ms"
                        ));
                    }
                    tokio::spawn(async move { hub.generation() })
                        .await
                        .map_err(|e| format!("the hub did not answer: {e}"))?;
                }
                px_runtime::systemd::http_answers(http_addr, "/healthz", https).await
            }) as BoxFuture<'static, Result<(), String>>
        },
        move |new: Config| {
            let reloaded = reload(
                &running,
                &new,
                &reload_tokens,
                &open_links,
                &alerter,
                reload_tls.as_ref(),
            );
            std::future::ready(reloaded)
        },
    );
    let mut held_lease = None;
    if config.lease.enabled
        && let Some((control, floor, keeper)) = await_lease(&config, &parts, &standing).await?
    {
        // What the previous active Beacon kept, read before this one acts on anything.
        let shared = shared_state::SharedState::new(
            parts.client.clone(),
            keeper.holder().into(),
            standing.epoch(),
        );
        shared
            .load(&config.data_dir, &parts.events, &parts.alerter)
            .await;
        let histories = Arc::new(shared_state::PendingHistories::default());
        let acme = checked.acme.take();
        let (hub, router) = active::start(
            &config,
            &checked,
            &parts,
            control,
            active::Under {
                generation_floor: floor,
                shared_histories: Some(histories.clone()),
            },
            https,
            acme,
        )?;
        tracker.spawn(shared.run(
            floor,
            parts.events.clone(),
            parts.alerter.clone(),
            histories,
            shutdown.clone(),
        ));
        let _ = api.set(router);
        let _ = active_hub.set(hub);
        held_lease = Some(keeper);
    }
    shutdown.cancelled().await;
    // Open requests and links, and the tasks, get one deadline to finish together.
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    // Only now, with the links closed, may a standby take over; not after a step-down (the
    // lease is another's or lapsing).
    if let Some(keeper) = held_lease
        && critical.ended().is_none()
    {
        keeper.release(LEASE_RELEASE_TIMEOUT).await;
    }
    match critical.ended() {
        Some(ended) => {
            tracing::error!(error = %ended, "beacon stopped");
            Err(ended.into())
        }
        None => {
            tracing::info!("beacon stopped");
            Ok(())
        }
    }
}

/// Longest a stopping Beacon waits for apprepo to take its lease back.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Stands by until this Beacon holds the lease, then starts the lease keeper and binds
/// `control_listen` (closed meanwhile, so Maestros are refused there and move on to the
/// active Beacon). Returns the listener, the generation floor of the lease's epoch and the
/// keeper (to release the lease on a clean stop); `None` when shutdown came first.
async fn await_lease(
    config: &Config,
    parts: &active::Parts,
    standing: &Arc<lease::Standing>,
) -> Result<Option<(TcpListener, u64, Arc<lease::LeaseClient>)>, StartError> {
    let holder = lease::holder_id(&config.data_dir)?;
    let api_url = config.lease.api_url.clone().unwrap_or_default();
    let keeper = Arc::new(lease::LeaseClient::new(
        parts.client.clone(),
        holder,
        config.lease.ttl,
        api_url,
    ));
    tracing::info!(holder = %keeper.holder(), ttl = ?config.lease.ttl, "standing by until this Beacon holds the lease");
    let Some((lease, granted_from)) = keeper.acquire(standing, &parts.shutdown).await else {
        return Ok(None);
    };
    let control = TcpListener::bind(config.control_listen).await?;
    standing.activate(&lease, &parts.metrics);
    tracing::info!(holder = %lease.holder, epoch = lease.epoch, "this Beacon holds the lease: active");
    let keeper_standing = standing.clone();
    let keeper_shutdown = parts.shutdown.clone();
    let renewing = keeper.clone();
    parts.critical.spawn("the lease keeper", async move {
        renewing
            .keep(granted_from, &keeper_standing, keeper_shutdown)
            .await
    });
    Ok(Some((
        control,
        lease::generation_floor(lease.epoch),
        keeper,
    )))
}

/// A standby's STATUS= line, e.g. `standby; active Beacon at https://10.0.1.5:7080 (epoch 3)`.
fn standby_line(standing: &lease::Standing) -> String {
    match standing.active_url() {
        Some(url) => format!(
            "standby; active Beacon at {url} (epoch {})",
            standing.epoch()
        ),
        None => "standby; no active Beacon known yet".into(),
    }
}

/// Longest the sweeper may go without finishing a pass before the liveness probe fails: many
/// times its interval, so only a sweeper that is stuck (not merely late under load) fails it.
const SWEEPER_SILENCE: Duration = Duration::from_secs(10);

pub(crate) fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Beacon's STATUS= line, e.g. `3 nodes connected, 2 apps, generation 14; apprepo reachable`.
fn status_line(hub: &hub::Hub, metrics: &metrics::Metrics) -> String {
    let nodes = metrics.nodes_connected.get();
    let apps = hub.apps().len();
    let repository = if hub.repository_reachable() {
        "apprepo reachable"
    } else {
        "apprepo unreachable, keeping the last known desired state"
    };
    format!(
        "{nodes} node{} connected, {apps} app{}, generation {}; {repository}",
        if nodes == 1 { "" } else { "s" },
        if apps == 1 { "" } else { "s" },
        hub.generation()
    )
}

/// A reload: the new configuration must pass [`check`]; its tokens (inline and `tokens_file`)
/// replace the accepted ones at once, for new requests and links, and every open link whose
/// token no longer verifies is closed; its alert webhooks replace the old ones; any other
/// changed setting needs a restart.
fn reload(
    running: &Config,
    new: &Config,
    tokens: &auth::Tokens,
    open_links: &open_links::OpenLinks,
    alerter: &alerts::Alerter,
    tls: Option<&ServerTls>,
) -> Result<Reloaded, String> {
    let checked = check(new).map_err(|e| e.to_string())?;
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
    let table = Arc::try_unwrap(checked.tokens).unwrap_or_else(|shared| (*shared).clone());
    let count = table.len();
    tokens.replace(table);
    let closed = open_links.recheck(tokens);
    let webhooks = new.alerts.webhooks.len();
    alerter.set_webhooks(new.alerts.webhooks.clone());
    Ok(Reloaded {
        applied: format!(
            "{count} token{}, {webhooks} webhook{}, {closed} link{} closed{certificate}",
            if count == 1 { "" } else { "s" },
            if webhooks == 1 { "" } else { "s" },
            if closed == 1 { "" } else { "s" }
        ),
        needs_restart,
    })
}
