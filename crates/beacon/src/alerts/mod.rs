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
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};
    use px_proto::beacon::EventKind;

    /// A webhook receiver on loopback that records what it accepts and refuses the first
    /// `refuse_first` requests with `refuse_with`.
    #[derive(Clone)]
    struct Receiver {
        url: String,
        attempts: Arc<AtomicUsize>,
        bodies: Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>,
    }

    #[derive(Clone)]
    struct ReceiverState {
        refuse_first: usize,
        refuse_with: StatusCode,
        attempts: Arc<AtomicUsize>,
        bodies: Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>,
    }

    async fn hook(
        State(state): State<ReceiverState>,
        headers: HeaderMap,
        Json(body): Json<serde_json::Value>,
    ) -> StatusCode {
        let n = state.attempts.fetch_add(1, Ordering::SeqCst);
        if n < state.refuse_first {
            return state.refuse_with;
        }
        state.bodies.lock().unwrap().push((headers, body));
        StatusCode::OK
    }

    async fn receiver(refuse_first: usize, refuse_with: StatusCode) -> Receiver {
        let state = ReceiverState {
            refuse_first,
            refuse_with,
            attempts: Arc::default(),
            bodies: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hooks/secret-token", post(hook))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url: format!("http://{addr}/hooks/secret-token"),
            attempts: state.attempts,
            bodies: state.bodies,
        }
    }

    impl Receiver {
        fn texts(&self) -> Vec<String> {
            self.bodies
                .lock()
                .unwrap()
                .iter()
                .map(|(_, b)| b["text"].as_str().unwrap().to_owned())
                .collect()
        }
        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::SeqCst)
        }
    }

    /// A URL where nothing listens: bound once, then released.
    async fn closed_port_url() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}/hook")
    }

    fn alert(key: &str, text: &str) -> Alert {
        Alert {
            key: key.to_owned(),
            text: text.to_owned(),
            event: Event {
                seq: 42,
                at: "2025-01-01T00:00:00Z".to_owned(),
                kind: EventKind::NodeLost,
                level: Level::Error,
                node: Some("web-1".to_owned()),
                app: None,
                release: None,
                message: text.to_owned(),
                detail: None,
                failure: None,
                build: None,
            },
        }
    }

    struct Harness {
        alerter: Alerter,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    }

    fn start(webhooks: Vec<String>, dedup_window: Duration, backoff_base: Duration) -> Harness {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let settings = AlertSettings {
            webhooks,
            dedup_window,
            backoff_base,
        };
        let alerter = Alerter::start(settings, &tracker, shutdown.clone());
        Harness {
            alerter,
            tracker,
            shutdown,
        }
    }

    impl Harness {
        /// Cancels and checks that every delivery task ends promptly.
        async fn stop(self) {
            self.shutdown.cancel();
            self.tracker.close();
            tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
                .await
                .expect("delivery tasks did not end on shutdown");
        }
    }

    /// Polls `cond` until it holds, failing after a generous deadline.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    const FAST: Duration = Duration::from_millis(5);

    #[tokio::test]
    async fn delivers_text_and_event_as_json() {
        let rx = receiver(0, StatusCode::OK).await;
        let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        let sent = alert("node_lost:web-1", "node web-1 lost: no heartbeat for 15s");
        h.alerter.raise(sent.clone());

        eventually("the delivery", || h.alerter.stats().sent == 1).await;
        let bodies = rx.bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 1);
        let (headers, body) = &bodies[0];
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body["text"], "node web-1 lost: no heartbeat for 15s");
        let event: Event = serde_json::from_value(body["event"].clone()).unwrap();
        assert_eq!(event, sent.event);
        assert_eq!(
            h.alerter.stats(),
            AlertStats {
                sent: 1,
                ..AlertStats::default()
            }
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn an_app_varying_its_message_is_held_to_its_rate_and_others_are_not() {
        use crate::alert_budget::APP_ALERT_BURST;
        let rx = receiver(0, StatusCode::OK).await;
        let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        // Every message is new, so dedup lets each through; the app's bucket does not.
        for i in 0..50 {
            let mut flood = alert(&format!("app_event:noisy:{i}"), &format!("noisy says {i}"));
            flood.event.app = Some("noisy".into());
            h.alerter.raise(flood);
        }
        let mut other = alert("app_event:calm:1", "calm says hello");
        other.event.app = Some("calm".into());
        h.alerter.raise(other);
        h.alerter.raise(alert("node_lost:web-1", "node web-1 lost"));
        let expected = u64::from(APP_ALERT_BURST) + 2;
        eventually("the deliveries", || h.alerter.stats().sent == expected).await;
        let texts = rx.texts();
        assert_eq!(
            texts.iter().filter(|t| t.starts_with("noisy says")).count(),
            APP_ALERT_BURST as usize,
            "{texts:?}"
        );
        assert!(texts.contains(&"calm says hello".to_owned()), "{texts:?}");
        assert!(texts.contains(&"node web-1 lost".to_owned()), "{texts:?}");
        assert_eq!(
            h.alerter.stats().suppressed,
            50 - u64::from(APP_ALERT_BURST)
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn new_webhooks_take_the_next_alerts_and_the_old_ones_stop() {
        let old = receiver(0, StatusCode::OK).await;
        let new = receiver(0, StatusCode::OK).await;
        let h = start(vec![old.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        h.alerter.raise(alert("a", "before the reload"));
        eventually("the first delivery", || h.alerter.stats().sent == 1).await;
        h.alerter.set_webhooks(vec![new.url.clone()]);
        h.alerter.raise(alert("b", "after the reload"));
        eventually("the second delivery", || h.alerter.stats().sent == 2).await;
        assert_eq!(old.texts(), ["before the reload"]);
        assert_eq!(new.texts(), ["after the reload"]);
        // No webhooks at all: alerts are only logged, and nothing more is sent.
        h.alerter.set_webhooks(Vec::new());
        h.alerter.raise(alert("c", "logged only"));
        assert_eq!(h.alerter.stats().sent, 2);
        assert_eq!(old.attempts() + new.attempts(), 2);
        h.stop().await;
    }

    #[tokio::test]
    async fn the_same_key_is_suppressed_within_the_window_but_other_keys_are_sent() {
        let rx = receiver(0, StatusCode::OK).await;
        let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        h.alerter
            .raise(alert("crash_loop:hello", "hello crash-loops"));
        h.alerter
            .raise(alert("crash_loop:hello", "hello crash-loops again"));
        h.alerter
            .raise(alert("crash_loop_ended:hello", "hello recovered"));

        eventually("two deliveries", || h.alerter.stats().sent == 2).await;
        // One webhook gets alerts in order, so a second crash_loop would have come first.
        assert_eq!(rx.texts(), ["hello crash-loops", "hello recovered"]);
        assert_eq!(h.alerter.stats().suppressed, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn a_key_alerts_again_after_the_window() {
        let rx = receiver(0, StatusCode::OK).await;
        let window = Duration::from_millis(20);
        let h = start(vec![rx.url.clone()], window, FAST);
        h.alerter.raise(alert("node_lost:web-1", "first"));
        eventually("the first delivery", || h.alerter.stats().sent == 1).await;
        // Not a timing assertion: sleep lasts at least this long, so the window has passed.
        tokio::time::sleep(window * 2).await;
        h.alerter.raise(alert("node_lost:web-1", "second"));
        eventually("the second delivery", || h.alerter.stats().sent == 2).await;
        assert_eq!(rx.texts(), ["first", "second"]);
        assert_eq!(h.alerter.stats().suppressed, 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn server_errors_and_rate_limits_are_retried_until_the_receiver_recovers() {
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::TOO_MANY_REQUESTS,
        ] {
            let rx = receiver(3, status).await;
            let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
            h.alerter
                .raise(alert("deploy_failed:hello", "deploy of hello failed"));
            eventually("the delivery", || h.alerter.stats().sent == 1).await;
            assert_eq!(rx.attempts(), 4, "after {status}");
            assert_eq!(rx.texts(), ["deploy of hello failed"]);
            assert_eq!(h.alerter.stats().failed, 0);
            h.stop().await;
        }
    }

    #[tokio::test]
    async fn delivery_gives_up_after_max_attempts() {
        let rx = receiver(usize::MAX, StatusCode::SERVICE_UNAVAILABLE).await;
        let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        h.alerter.raise(alert("node_lost:web-1", "lost"));
        eventually("giving up", || h.alerter.stats().failed == 1).await;
        assert_eq!(rx.attempts(), MAX_ATTEMPTS as usize);
        assert_eq!(h.alerter.stats().sent, 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried() {
        let rx = receiver(usize::MAX, StatusCode::BAD_REQUEST).await;
        let h = start(vec![rx.url.clone()], DEFAULT_DEDUP_WINDOW, FAST);
        h.alerter.raise(alert("node_lost:web-1", "lost"));
        // A retried delivery counts as failed only after MAX_ATTEMPTS attempts.
        eventually("the refusal", || h.alerter.stats().failed == 1).await;
        assert_eq!(rx.attempts(), 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn a_dead_webhook_does_not_delay_a_working_one() {
        let rx = receiver(0, StatusCode::OK).await;
        // A production-like backoff: were the working webhook behind the dead one, its first
        // alert would wait at least 0.5 · (2 + 4 + 8 + 16) = 15 s, past the polling deadline.
        let h = start(
            vec![closed_port_url().await, rx.url.clone()],
            DEFAULT_DEDUP_WINDOW,
            Duration::from_secs(2),
        );
        h.alerter.raise(alert("a", "one"));
        h.alerter.raise(alert("b", "two"));
        h.alerter.raise(alert("c", "three"));
        // The receiver records a body before the sender has read the answer and counted it.
        eventually("deliveries to the working webhook", || {
            rx.texts().len() == 3 && h.alerter.stats().sent == 3
        })
        .await;
        assert_eq!(rx.texts(), ["one", "two", "three"]);
        let stats = h.alerter.stats();
        assert_eq!((stats.sent, stats.failed), (3, 0));
        // Shutdown cuts the dead webhook's retries short; `stop` checks the tasks end.
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn raise_on_a_full_queue_drops_without_blocking() {
        // On a current-thread runtime the delivery task cannot run between these synchronous
        // calls, so exactly ALERT_QUEUE alerts fit and the rest must be dropped, not waited on.
        let h = start(vec![closed_port_url().await], DEFAULT_DEDUP_WINDOW, FAST);
        for i in 0..ALERT_QUEUE + 10 {
            h.alerter.raise(alert(&format!("key-{i}"), "x"));
        }
        assert_eq!(h.alerter.stats().dropped, 10);
        // A dropped alert's key is not remembered: raising it again is another drop, not a
        // suppression.
        h.alerter.raise(alert(&format!("key-{}", ALERT_QUEUE), "x"));
        assert_eq!(h.alerter.stats().dropped, 11);
        assert_eq!(h.alerter.stats().suppressed, 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn without_webhooks_alerts_are_only_logged_and_still_deduplicated() {
        let h = start(Vec::new(), DEFAULT_DEDUP_WINDOW, FAST);
        h.alerter.raise(alert("k", "x"));
        h.alerter.raise(alert("k", "x"));
        assert_eq!(
            h.alerter.stats(),
            AlertStats {
                suppressed: 1,
                ..AlertStats::default()
            }
        );
        h.stop().await;
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(1);
        for attempt in 1..MAX_ATTEMPTS {
            let nominal = base * 2u32.pow(attempt - 1);
            for _ in 0..100 {
                let wait = backoff(base, attempt);
                assert!(wait >= nominal / 2 && wait < nominal * 3 / 2, "{wait:?}");
            }
        }
        assert!(backoff(Duration::from_secs(3600), 4) < MAX_BACKOFF * 3 / 2);
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let mut map = HashMap::new();
        let now = Instant::now();
        for i in 0..MAX_DEDUP_KEYS + 10 {
            remember(&mut map, &format!("k{i}"), now, DEFAULT_DEDUP_WINDOW);
        }
        assert_eq!(map.len(), MAX_DEDUP_KEYS);
        assert!(map.contains_key(&format!("k{}", MAX_DEDUP_KEYS + 9)));
    }

    #[test]
    fn logs_never_show_a_webhook_path_or_query() {
        assert_eq!(
            redact("https://hooks.slack.com/services/T0/B0/SECRET?x=1"),
            "https://hooks.slack.com"
        );
        assert_eq!(
            redact("http://127.0.0.1:8080/hook"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(redact("not a url"), "<invalid url>");
        let settings = AlertSettings {
            webhooks: vec!["https://chat.example.com/hooks/SECRET".into()],
            ..AlertSettings::default()
        };
        assert!(!format!("{settings:?}").contains("SECRET"));
    }
}
