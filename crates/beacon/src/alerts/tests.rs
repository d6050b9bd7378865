//! The alerter's tests: dedup, budgets, ordering, retries, reloads and shutdown.
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
