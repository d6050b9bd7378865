//! Events and heartbeats from app instances: a loopback HTTP endpoint where each instance
//! POSTs small JSON events to `PX_EVENTS_URL` (which carries a secret of its own, so one app
//! cannot speak for another). Accepted events go to the app's logs beside its output and to
//! Beacon over the link; a heartbeat arms a watchdog on that instance. The endpoint has its
//! own listener, connection limit, timeouts and per-instance rate limit, so a noisy or hostile
//! app can never stall the proxy or other apps. When the connection limit is reached, the
//! connection idle the longest is cut to make room, and each instance may have only a few
//! requests in progress at once: holding connections open, or posts half sent, never locks
//! other apps out (their heartbeats would stop arriving, and Maestro would restart them).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use px_proto::beacon::Level;
use px_proto::link::{NodeEvent, NodeEventKind};
use px_runtime::shutdown::accept_error_is_fatal;
use rand::Rng;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::logs::AppLogs;

/// Largest event body; an event is a sentence and a few fields.
pub const MAX_EVENT_BYTES: usize = 8 * 1024;
/// Longest message, in characters.
pub(crate) const MAX_MESSAGE_CHARS: usize = 2000;
/// Most fields in one event.
pub(crate) const MAX_FIELDS: usize = 32;
/// Sustained events per second per instance, and the burst above it.
pub const EVENTS_PER_SECOND: f64 = 10.0;
pub const EVENT_BURST: f64 = 50.0;
/// Connections open at once. A new one beyond this cuts the connection idle the longest
/// (before its first request or between two); only when every one is answering a request do
/// new ones wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// Requests one instance may have in progress at once; more are answered 429 at once. A post
/// is answered in well under a millisecond, so an app needs one at a time, eight leave room for
/// a multi-threaded one; the bound keeps one app's posts from filling `MAX_CONNECTIONS`.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 8;
/// How much of an oversized body is read and thrown away before answering 413. A client that
/// sends its whole body before reading the answer (Python's urllib, Ruby's Net::HTTP) would
/// otherwise see a reset connection instead of the 413 that says what to do. Beyond this the
/// connection is cut: a megabyte is already far more than anyone posts by mistake.
pub const MAX_DRAIN_BYTES: u64 = 1024 * 1024;
/// Time to send the request head, and to send the whole request.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals an opted-in instance may miss before it is restarted.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Pause after a failed `accept` that is worth a retry (typically out of file descriptors), so
/// the loop does not spin while connections close.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes of randomness in an instance's secret.
const SECRET_BYTES: usize = 24;
/// Path prefix of the endpoint; the instance's secret follows it.
pub(crate) const EVENTS_PATH: &str = "/v1/events/";

/// Why the endpoint stopped serving before its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// An `accept` failed in a way that means the listener will never accept again (the
    /// socket was shut down or closed under Maestro).
    #[error("the app events listener no longer accepts connections: {0}")]
    ListenerBroken(std::io::Error),
}

/// How a POST ended, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Heartbeat,
    TooLarge,
    RateLimited,
    Malformed,
    Unauthorized,
    /// Accepted, but Beacon's queue was full: the event is in the node's logs only.
    NotForwarded,
}

const OUTCOMES: [(Outcome, &str); 7] = [
    (Outcome::Accepted, "accepted"),
    (Outcome::Heartbeat, "heartbeat"),
    (Outcome::TooLarge, "too_large"),
    (Outcome::RateLimited, "rate_limited"),
    (Outcome::Malformed, "malformed"),
    (Outcome::Unauthorized, "unauthorized"),
    (Outcome::NotForwarded, "not_forwarded"),
];

/// What an instance posts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostedEvent {
    #[serde(default)]
    level: Option<Level>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, serde_json::Value>,
    /// `true` for a heartbeat; it may come alone (`{"heartbeat": true}`) or with an event.
    #[serde(default)]
    heartbeat: bool,
}

/// One instance's last sign of life.
pub(crate) struct Heartbeat {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last heartbeat.
    last_ms: AtomicU64,
    /// Set by the first heartbeat: the instance has opted in.
    armed: AtomicBool,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            armed: AtomicBool::new(false),
        }
    }

    fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        self.armed.store(true, Ordering::Release);
    }

    /// How long since the last heartbeat, once armed.
    fn silence(&self) -> Option<Duration> {
        self.armed.load(Ordering::Acquire).then(|| {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            self.epoch.elapsed().saturating_sub(last)
        })
    }

    /// Resolves when an armed heartbeat has been silent for `MISSED_HEARTBEATS` intervals,
    /// with how long it was silent. Never resolves for an instance that never opted in.
    pub(crate) async fn lost(&self, interval: Duration) -> Duration {
        let deadline = interval * MISSED_HEARTBEATS;
        let tick = (interval / 2).min(Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            if let Some(silence) = self.silence()
                && silence >= deadline
            {
                return silence;
            }
        }
    }
}

/// Token bucket of one instance.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * EVENTS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(EVENT_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the endpoint knows of one live instance.
struct Channel {
    app: String,
    release: u64,
    number: u32,
    heartbeat: Arc<Heartbeat>,
    bucket: Mutex<Bucket>,
    /// `MAX_REQUESTS_IN_FLIGHT` permits.
    in_flight: Arc<Semaphore>,
}

/// The endpoint's state: live instances by secret, counters, and where events go.
pub struct AppEvents {
    base_url: String,
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    logs: Arc<AppLogs>,
    beacon: mpsc::Sender<NodeEvent>,
    counts: [AtomicU64; OUTCOMES.len()],
}

/// An instance's registration; dropping it retires the secret.
pub struct Registration {
    events: Arc<AppEvents>,
    secret: String,
    /// `PX_EVENTS_URL` for the instance.
    pub url: String,
    pub(crate) heartbeat: Arc<Heartbeat>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.events.lock().remove(&self.secret);
    }
}

impl AppEvents {
    /// Events posted to `addr` (the bound listener's address) are logged in `logs` and
    /// forwarded through `beacon`.
    pub fn new(addr: SocketAddr, logs: Arc<AppLogs>, beacon: mpsc::Sender<NodeEvent>) -> Self {
        Self {
            base_url: format!("http://{addr}{EVENTS_PATH}"),
            channels: Mutex::new(HashMap::new()),
            logs,
            beacon,
            counts: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Channel>>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives a new instance its own secret and URL.
    pub fn register(self: &Arc<Self>, app: &str, release: u64, number: u32) -> Registration {
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rng().fill(&mut bytes[..]);
        let secret = hex::encode(bytes);
        let heartbeat = Arc::new(Heartbeat::new());
        let channel = Arc::new(Channel {
            app: app.to_string(),
            release,
            number,
            heartbeat: heartbeat.clone(),
            bucket: Mutex::new(Bucket {
                tokens: EVENT_BURST,
                at: Instant::now(),
            }),
            in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
        });
        self.lock().insert(secret.clone(), channel);
        Registration {
            events: self.clone(),
            url: format!("{}{secret}", self.base_url),
            secret,
            heartbeat,
        }
    }

    fn count(&self, outcome: Outcome) {
        if let Some(i) = OUTCOMES.iter().position(|(o, _)| *o == outcome) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus lines for Maestro's `/metrics`.
    pub(crate) fn render_metrics(&self) -> String {
        let mut out = String::from(
            "# HELP px_maestro_app_events_total Posts to PX_EVENTS_URL by outcome.\n# TYPE px_maestro_app_events_total counter\n",
        );
        for (i, (_, name)) in OUTCOMES.iter().enumerate() {
            out.push_str(&format!(
                "px_maestro_app_events_total{{result=\"{name}\"}} {}\n",
                self.counts[i].load(Ordering::Relaxed)
            ));
        }
        out
    }

    /// Serves the endpoint until `shutdown`. Fails when the listener breaks (see
    /// `accept_error_is_fatal`): apps could never post again, so Maestro must not go on
    /// without the endpoint.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), EndpointError> {
        let connections = Arc::new(Connections::new());
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) if accept_error_is_fatal(&e) => {
                        return Err(EndpointError::ListenerBroken(e));
                    }
                    Err(e) => {
                        tracing::warn!("app events endpoint: accept failed: {e}");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let connection = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                connection = connections.admit() => connection,
            };
            let events = self.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                let mut builder = http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true);
                let service = {
                    let (connections, connection) = (connections.clone(), connection.clone());
                    service_fn(move |request| {
                        let (events, connections, connection) =
                            (events.clone(), connections.clone(), connection.clone());
                        async move {
                            connections.busy(&connection);
                            let response = events.handle(request).await;
                            connections.idle(&connection);
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    })
                };
                let serving = builder.serve_connection(TokioIo::new(stream), service);
                // A connection is for a handful of small requests; a client that holds one
                // open without finishing is cut, and so is one idle the longest when the
                // endpoint is full.
                tokio::select! {
                    _ = connection.cut.cancelled() => {}
                    _ = tokio::time::timeout(REQUEST_TIMEOUT * 6, serving) => {}
                }
                connections.close(&connection);
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (outcome, status, message) = self.accept(request).await;
        self.count(outcome);
        let body = serde_json::json!({ "result": OUTCOMES.iter().find(|(o, _)| *o == outcome).map(|(_, n)| *n), "message": message });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    async fn accept(&self, request: Request<Incoming>) -> (Outcome, StatusCode, String) {
        let secret = request
            .uri()
            .path()
            .strip_prefix(EVENTS_PATH)
            .unwrap_or_default()
            .to_string();
        let channel = self.lock().get(&secret).cloned();
        let Some(channel) = channel else {
            return (
                Outcome::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "unknown secret: post to the PX_EVENTS_URL your instance was started with".into(),
            );
        };
        if request.method() != Method::POST {
            return (
                Outcome::Malformed,
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST with a JSON body".into(),
            );
        }
        let declared = request
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Held until the answer: one instance cannot fill the endpoint with posts half sent.
        let Ok(_in_flight) = channel.in_flight.clone().try_acquire_owned() else {
            return (
                Outcome::RateLimited,
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "more than {MAX_REQUESTS_IN_FLIGHT} posts at once from one instance; wait for an answer before sending more"
                ),
            );
        };
        let mut body = request.into_body();
        if let Some(declared) = declared
            && declared > MAX_EVENT_BYTES as u64
        {
            if declared <= MAX_DRAIN_BYTES {
                drain(&mut body, declared).await;
            }
            return too_large();
        }
        let read = async {
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if bytes.len() + data.len() > MAX_EVENT_BYTES {
                        return Ok(None);
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            Ok::<_, hyper::Error>(Some(bytes))
        };
        let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Err(_) => {
                return (
                    Outcome::Malformed,
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {REQUEST_TIMEOUT:?}"),
                );
            }
            Ok(Err(e)) => {
                return (
                    Outcome::Malformed,
                    StatusCode::BAD_REQUEST,
                    format!("reading the body: {e}"),
                );
            }
            Ok(Ok(None)) => {
                drain(&mut body, MAX_DRAIN_BYTES).await;
                return too_large();
            }
            Ok(Ok(Some(bytes))) => bytes,
        };
        if !channel
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return (
                Outcome::RateLimited,
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "more than {EVENTS_PER_SECOND} events a second (burst {EVENT_BURST}); send fewer"
                ),
            );
        }
        let posted: PostedEvent = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                return (
                    Outcome::Malformed,
                    StatusCode::BAD_REQUEST,
                    format!(
                        "not an event: {e}; send {{\"level\": \"info\", \"message\": \"…\", \"fields\": {{…}}}} or {{\"heartbeat\": true}}"
                    ),
                );
            }
        };
        if let Err(problem) = validate(&posted) {
            return (Outcome::Malformed, StatusCode::BAD_REQUEST, problem);
        }
        if posted.heartbeat {
            channel.heartbeat.beat();
        }
        let Some(message) = posted.message else {
            return (Outcome::Heartbeat, StatusCode::ACCEPTED, "heartbeat".into());
        };
        let level = posted.level.unwrap_or(Level::Info);
        let fields = render_fields(&posted.fields);
        let line = if fields.is_empty() {
            format!("[{}] {message}", level.as_str())
        } else {
            format!("[{}] {message} {fields}", level.as_str())
        };
        self.logs
            .record_event(&channel.app, channel.release, channel.number, line);
        let forwarded = self.beacon.try_send(NodeEvent {
            kind: NodeEventKind::AppEvent,
            app: channel.app.clone(),
            release: channel.release,
            message,
            detail: (!fields.is_empty()).then_some(fields),
            instance: Some(channel.number),
            level: Some(level),
            failure: None,
            build: None,
        });
        if forwarded.is_err() {
            return (
                Outcome::NotForwarded,
                StatusCode::ACCEPTED,
                "logged on this node; the queue to Beacon is full".into(),
            );
        }
        (Outcome::Accepted, StatusCode::ACCEPTED, "accepted".into())
    }
}

/// Reads and throws away the rest of an oversized body, up to `limit` bytes (at most
/// `MAX_DRAIN_BYTES`) and `REQUEST_TIMEOUT`, so that a client still sending it reads the 413
/// rather than a reset connection.
async fn drain(body: &mut Incoming, limit: u64) {
    let mut left = limit.min(MAX_DRAIN_BYTES);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                match left.checked_sub(data.len() as u64) {
                    Some(rest) => left = rest,
                    None => return,
                }
            }
        }
    })
    .await;
}

/// The endpoint's open connections, so that a full endpoint can make room.
struct Connections {
    epoch: Instant,
    open: Mutex<OpenConnections>,
    /// Signalled when a connection closes or finishes a request.
    changed: Notify,
}

#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    by_id: HashMap<u64, Arc<Connection>>,
}

struct Connection {
    id: u64,
    /// Milliseconds after `Connections::epoch` since it has been idle (opened, or finished
    /// its last request); `BUSY` while it answers one. Changed only under the `open` lock, so
    /// the choice of which connection to cut never races with one starting to answer.
    idle_since: AtomicU64,
    /// Cancelled to cut the connection.
    cut: CancellationToken,
}

const BUSY: u64 = u64::MAX;

impl Connections {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            open: Mutex::new(OpenConnections::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(BUSY - 1)
    }

    /// Room for one more connection: at once while there are fewer than `MAX_CONNECTIONS`,
    /// else by cutting the connection idle the longest; when every connection is answering a
    /// request, waits for one to finish.
    async fn admit(&self) -> Arc<Connection> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(connection) = self.try_admit() {
                return connection;
            }
            changed.await;
        }
    }

    fn try_admit(&self) -> Option<Arc<Connection>> {
        let mut open = self.lock();
        if open.by_id.len() >= MAX_CONNECTIONS {
            let (_, idlest) = open
                .by_id
                .values()
                .map(|c| (c.idle_since.load(Ordering::Relaxed), c.id))
                .filter(|(since, _)| *since != BUSY)
                .min()?;
            if let Some(cut) = open.by_id.remove(&idlest) {
                tracing::debug!("app events endpoint full; cutting its longest idle connection");
                cut.cut.cancel();
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let connection = Arc::new(Connection {
            id,
            idle_since: AtomicU64::new(self.now()),
            cut: CancellationToken::new(),
        });
        open.by_id.insert(id, connection.clone());
        Some(connection)
    }

    fn busy(&self, connection: &Connection) {
        let _open = self.lock();
        connection.idle_since.store(BUSY, Ordering::Relaxed);
    }

    fn idle(&self, connection: &Connection) {
        {
            let _open = self.lock();
            connection.idle_since.store(self.now(), Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    fn close(&self, connection: &Connection) {
        self.lock().by_id.remove(&connection.id);
        self.changed.notify_waiters();
    }
}

fn too_large() -> (Outcome, StatusCode, String) {
    (
        Outcome::TooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("an event may be at most {MAX_EVENT_BYTES} bytes; log bulk output to stdout"),
    )
}

fn validate(posted: &PostedEvent) -> Result<(), String> {
    match &posted.message {
        None if !posted.heartbeat => {
            return Err("an event needs a \"message\" (or send {\"heartbeat\": true})".into());
        }
        Some(m) if m.trim().is_empty() => return Err("\"message\" is empty".into()),
        Some(m) if m.chars().count() > MAX_MESSAGE_CHARS => {
            return Err(format!(
                "\"message\" is longer than {MAX_MESSAGE_CHARS} characters"
            ));
        }
        _ => {}
    }
    if posted.fields.len() > MAX_FIELDS {
        return Err(format!("more than {MAX_FIELDS} fields"));
    }
    if posted.message.is_none() && (posted.level.is_some() || !posted.fields.is_empty()) {
        return Err("\"level\" and \"fields\" need a \"message\"".into());
    }
    Ok(())
}

/// `key=value` pairs, strings unquoted when they have no spaces.
fn render_fields(fields: &BTreeMap<String, serde_json::Value>) -> String {
    fields
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => {
                format!("{k}={s}")
            }
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
