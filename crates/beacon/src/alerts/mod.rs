//! Sysadmin alerts by webhook: crash loops, failed deploys, lost nodes and their recoveries are
//! POSTed as JSON with a human `text` field (which Slack- and Mattermost-style receivers show),
//! deduplicated by key, retried with jittered exponential backoff, and never allowed to block
//! the code that raises them.
//!
//! Each webhook has its own bounded queue and its own delivery task, so a slow or dead
//! receiver only delays itself, and each receiver gets alerts in the order they were raised
//! (a "lost" is never shown after its "recovered").

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use px_proto::beacon::{Event, Level};
// reqwest's own message alone does not say what went wrong; its causes do.
use px_runtime::errors::error_chain;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert_budget::{AppBudget, Verdict, with_suppressed};

mod shared;

/// Alerts waiting per webhook. `raise` never blocks; when a webhook's queue is full the alert
/// is dropped for it and counted. Dedup keeps real traffic far below this; 256 covers a whole
/// cluster failing at once while a receiver is briefly slow.
pub const ALERT_QUEUE: usize = 256;
/// The same key alerts at most once per window, so a crash loop does not send a storm; ten
/// minutes reminds a sysadmin of a lasting problem without flooding the channel.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Deadline of one webhook request, connecting included: chat services answer in well under
/// a second, and a hung receiver must not hold its queue for long.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per alert and webhook; with the default base the waits are 1s, 2s, 4s, 8s (each
/// ±50% jitter), which rides out a receiver restart, then the alert is given up and logged.
pub const MAX_ATTEMPTS: u32 = 5;
/// First retry wait in production.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest single retry wait, whatever the base: a misconfigured base cannot park a queue.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Keys remembered for dedup. Keys name a node or app and a condition, so a cluster has far
/// fewer; past this, expired keys are forgotten first, then the oldest.
pub const MAX_DEDUP_KEYS: usize = 4096;

/// One notification for sysadmins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// Dedup key, e.g. `node_lost:web-1`. A recovery uses another key than the failure it
    /// ends (`node_recovered:web-1`), so it is always sent.
    pub key: String,
    /// One human line, e.g. `node web-1 lost: no heartbeat for 15s`.
    pub text: String,
    /// The event that caused it, sent along for receivers that read structure.
    pub event: Event,
}

/// Where and how to deliver alerts.
#[derive(Clone)]
pub struct AlertSettings {
    /// Webhook URLs (http or https). Empty: alerts are only logged. They often embed a secret,
    /// so logs show only their scheme, host and port.
    pub webhooks: Vec<String>,
    /// `DEFAULT_DEDUP_WINDOW` in production.
    pub dedup_window: Duration,
    /// First retry wait, doubled per attempt: `DEFAULT_BACKOFF_BASE` in production; tests pass
    /// something small.
    pub backoff_base: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            backoff_base: DEFAULT_BACKOFF_BASE,
        }
    }
}

impl fmt::Debug for AlertSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Webhook URLs are credentials: never print their path or query.
        let webhooks: Vec<String> = self.webhooks.iter().map(|u| redact(u)).collect();
        f.debug_struct("AlertSettings")
            .field("webhooks", &webhooks)
            .field("dedup_window", &self.dedup_window)
            .field("backoff_base", &self.backoff_base)
            .finish()
    }
}

/// Counts since start, which the tests read. `sent`, `failed` and `dropped` count deliveries
/// (one alert to one webhook); `suppressed` counts alerts.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertStats {
    /// Deliveries a webhook accepted (2xx).
    pub sent: u64,
    /// Deliveries given up: attempts exhausted, refused with a 4xx, or cut short by shutdown.
    pub failed: u64,
    /// Alerts not sent because the same key alerted within the dedup window.
    pub suppressed: u64,
    /// Deliveries dropped because the webhook's queue was full (or closed at shutdown).
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    suppressed: AtomicU64,
    dropped: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Raises alerts; cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    inner: Arc<Inner>,
}

struct Inner {
    /// One lane per webhook; replaced whole by [`Alerter::set_webhooks`].
    lanes: Mutex<Vec<Lane>>,
    /// What starting a lane takes, kept for reloads.
    spawner: Spawner,
    dedup_window: Duration,
    /// When each key last alerted. Checked and updated under one lock, so two concurrent
    /// raises of one key send it once.
    last_raised: Mutex<HashMap<String, Instant>>,
    /// Each app's token bucket, so an app cannot alert without bound by varying its message.
    budget: Mutex<AppBudget>,
    counters: Arc<Counters>,
    /// Goes up each time `last_raised` changes, so the shared state is written only then.
    dedup_changes: AtomicU64,
}

/// Starts delivery tasks; `client` is `None` when it could not be built (alerts are then
/// only logged).
struct Spawner {
    client: Option<reqwest::Client>,
    backoff_base: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Spawner {
    /// One lane and delivery task per webhook.
    fn lanes(&self, webhooks: Vec<String>, counters: &Arc<Counters>) -> Vec<Lane> {
        let Some(client) = &self.client else {
            return Vec::new();
        };
        let mut lanes = Vec::with_capacity(webhooks.len());
        for url in webhooks {
            let label = redact(&url);
            if reqwest::Url::parse(&url).is_err() {
                tracing::error!(
                    webhook = %label,
                    "alert webhook is not a valid url; every alert to it will fail"
                );
            }
            let (tx, rx) = mpsc::channel(ALERT_QUEUE);
            let worker = Worker {
                client: client.clone(),
                url,
                label: label.clone(),
                backoff_base: self.backoff_base,
                counters: counters.clone(),
                shutdown: self.shutdown.clone(),
            };
            self.tracker.spawn(worker.run(rx));
            lanes.push(Lane { label, tx });
        }
        if lanes.is_empty() {
            tracing::info!("no alert webhooks; alerts are only logged");
        } else {
            let labels: Vec<&str> = lanes.iter().map(|l| l.label.as_str()).collect();
            tracing::info!(webhooks = ?labels, "alerts go to {} webhook(s)", lanes.len());
        }
        lanes
    }
}

/// The queue in front of one webhook's delivery task.
struct Lane {
    label: String,
    tx: mpsc::Sender<Arc<Alert>>,
}

/// What one webhook's delivery task needs.
struct Worker {
    client: reqwest::Client,
    url: String,
    label: String,
    backoff_base: Duration,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
}

/// The webhook body: `text` for chat receivers, `event` for anything that wants structure.
#[derive(Serialize)]
struct WebhookBody<'a> {
    text: &'a str,
    event: &'a Event,
}

enum Delivery {
    Sent,
    Failed,
    /// Shutdown came first.
    Abandoned,
}

impl Alerter {
    /// Starts one delivery task per webhook on `tracker`; they end when `shutdown` is
    /// cancelled (an attempt in flight is cut short) or when every `Alerter` is dropped. With
    /// no webhooks, alerts are only logged.
    pub fn start(
        settings: AlertSettings,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            // A redirected POST may turn into a GET without the body; a webhook URL that
            // redirects is a configuration error to report, not to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .inspect_err(|e| {
                tracing::error!(
                    "cannot build the webhook client, alerts will only be logged: {}",
                    error_chain(e)
                )
            })
            .ok();
        let spawner = Spawner {
            client,
            backoff_base: settings.backoff_base,
            tracker: tracker.clone(),
            shutdown,
        };
        let lanes = spawner.lanes(settings.webhooks, &counters);
        Self {
            inner: Arc::new(Inner {
                lanes: Mutex::new(lanes),
                spawner,
                dedup_window: settings.dedup_window,
                last_raised: Mutex::new(HashMap::new()),
                budget: Mutex::new(AppBudget::default()),
                counters,
                dedup_changes: AtomicU64::new(0),
            }),
        }
    }

    /// Queues an alert without waiting. Dedup is by key within the window: a later alert with
    /// the same key inside the window is counted as suppressed, not sent. A key whose alert
    /// was dropped everywhere (queues full) is not remembered, so its next alert is tried.
    pub fn raise(&self, mut alert: Alert) {
        let inner = &*self.inner;
        let now = Instant::now();
        let mut last_raised = inner
            .last_raised
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = last_raised.get(&alert.key)
            && now.duration_since(*at) < inner.dedup_window
        {
            bump(&inner.counters.suppressed);
            tracing::debug!(key = %alert.key, "alert suppressed: raised within the dedup window");
            return;
        }
        // Then the app's rate: a new key per message passes dedup, not the bucket.
        if let Some(app) = alert.event.app.clone() {
            let verdict = inner
                .budget
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(&app, now);
            match verdict {
                Verdict::Suppress => {
                    bump(&inner.counters.suppressed);
                    tracing::debug!(key = %alert.key, %app, "alert suppressed: over the app's alert rate");
                    return;
                }
                Verdict::Send { suppressed } => {
                    alert.text = with_suppressed(&alert.text, &app, suppressed);
                }
            }
        }

        // The journal gets every alert, webhooks or not.
        match alert.event.level {
            Level::Error | Level::Critical => {
                tracing::error!(key = %alert.key, "alert: {}", alert.text)
            }
            Level::Warning => tracing::warn!(key = %alert.key, "alert: {}", alert.text),
            Level::Info => tracing::info!(key = %alert.key, "alert: {}", alert.text),
        }

        let alert = Arc::new(alert);
        let lanes = inner.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut accepted = lanes.is_empty();
        for lane in lanes.iter() {
            match lane.tx.try_send(alert.clone()) {
                Ok(()) => accepted = true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    bump(&inner.counters.dropped);
                    tracing::warn!(
                        webhook = %lane.label,
                        key = %alert.key,
                        "alert queue full; alert dropped for this webhook"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    bump(&inner.counters.dropped);
                    tracing::debug!(webhook = %lane.label, "alert not queued: shutting down");
                }
            }
        }
        if accepted {
            remember(&mut last_raised, &alert.key, now, inner.dedup_window);
            inner.dedup_changes.fetch_add(1, Ordering::Release);
        }
    }

    /// Replaces the webhooks (a config reload): new alerts go to the new set at once; the
    /// old webhooks' tasks deliver what they already queued, then end.
    pub fn set_webhooks(&self, webhooks: Vec<String>) {
        let lanes = self.inner.spawner.lanes(webhooks, &self.inner.counters);
        *self
            .inner
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = lanes;
    }

    #[cfg(test)]
    pub fn stats(&self) -> AlertStats {
        let c = &self.inner.counters;
        AlertStats {
            sent: c.sent.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            suppressed: c.suppressed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Records that `key` alerted at `now`, keeping the map within `MAX_DEDUP_KEYS`.
fn remember(map: &mut HashMap<String, Instant>, key: &str, now: Instant, window: Duration) {
    if map.len() >= MAX_DEDUP_KEYS && !map.contains_key(key) {
        map.retain(|_, at| now.duration_since(*at) < window);
        if map.len() >= MAX_DEDUP_KEYS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
    map.insert(key.to_owned(), now);
}

impl Worker {
    /// Delivers this webhook's alerts one at a time, in order.
    async fn run(self, mut rx: mpsc::Receiver<Arc<Alert>>) {
        loop {
            let alert = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                next = rx.recv() => match next {
                    Some(alert) => alert,
                    None => break,
                },
            };
            match self.deliver(&alert).await {
                Delivery::Sent => bump(&self.counters.sent),
                Delivery::Failed => bump(&self.counters.failed),
                Delivery::Abandoned => {
                    bump(&self.counters.failed);
                    tracing::warn!(
                        webhook = %self.label,
                        key = %alert.key,
                        "alert not delivered: shutting down"
                    );
                    break;
                }
            }
        }
        let left = rx.len();
        if left > 0 {
            tracing::warn!(webhook = %self.label, "{left} queued alert(s) not delivered: shutting down");
        }
    }

    async fn deliver(&self, alert: &Alert) -> Delivery {
        let body = WebhookBody {
            text: &alert.text,
            event: &alert.event,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            // `json` sets `Content-Type: application/json`.
            let send = self.client.post(&self.url).json(&body).send();
            let result = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Delivery::Abandoned,
                result = send => result,
            };
            let reason = match result {
                Ok(response) if response.status().is_success() => {
                    tracing::debug!(webhook = %self.label, key = %alert.key, attempt, "alert delivered");
                    return Delivery::Sent;
                }
                Ok(response) if is_retryable(response.status()) => {
                    format!("answered {}", response.status())
                }
                Ok(response) => {
                    tracing::error!(
                        webhook = %self.label,
                        key = %alert.key,
                        status = %response.status(),
                        "webhook refused the alert; not retrying (check the webhook url)"
                    );
                    return Delivery::Failed;
                }
                // The request could not even be built (a bad URL): retrying cannot help.
                Err(e) if e.is_builder() => {
                    tracing::error!(
                        webhook = %self.label,
                        key = %alert.key,
                        "cannot send to the webhook: {}",
                        error_chain(&e.without_url())
                    );
                    return Delivery::Failed;
                }
                // Connection errors and timeouts: the receiver may be restarting.
                Err(e) => error_chain(&e.without_url()),
            };
            if attempt >= MAX_ATTEMPTS {
                tracing::error!(
                    webhook = %self.label,
                    key = %alert.key,
                    attempts = attempt,
                    "giving up on alert: {reason}"
                );
                return Delivery::Failed;
            }
            let wait = backoff(self.backoff_base, attempt);
            tracing::warn!(
                webhook = %self.label,
                key = %alert.key,
                attempt,
                "alert delivery failed ({reason}); retrying in {wait:?}"
            );
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Delivery::Abandoned,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Server errors, rate limiting and request timeouts may pass; other client errors will not.
fn is_retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

/// Wait before the retry that follows failed attempt `attempt` (1-based): `base · 2^(attempt-1)`
/// capped at `MAX_BACKOFF`, times a random factor in [0.5, 1.5) so that many Beacons (or many
/// alerts) do not retry in step.
fn backoff(base: Duration, attempt: u32) -> Duration {
    px_runtime::backoff::jittered(base, MAX_BACKOFF, attempt.saturating_sub(1))
}

/// `scheme://host:port` of a webhook URL: the path and query often hold its secret.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(port) => format!("{}://{host}:{port}", u.scheme()),
                None => format!("{}://{host}", u.scheme()),
            }
        }
        Err(_) => "<invalid url>".to_owned(),
    }
}

#[cfg(test)]
mod tests;
