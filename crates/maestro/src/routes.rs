//! The routing table: which host goes to which app, and to which instances. The supervisor
//! builds a new table whenever instances change and swaps it in whole; the proxy reads the
//! current one per request. A switch of release is therefore one atomic pointer swap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use tokio::sync::watch;
use tokio::time::Instant;

/// One running instance the proxy may send requests to.
#[derive(Debug)]
pub struct Backend {
    #[expect(
        dead_code,
        reason = "read by Debug only, so that a backend in a log or a failed test says whose it is"
    )]
    app: String,
    #[expect(
        dead_code,
        reason = "read by Debug only, so that a backend in a log or a failed test says whose it is"
    )]
    release: u64,
    pub(crate) addr: SocketAddr,
    /// `addr` as the authority of the proxy's requests to it, formatted once rather than per
    /// request.
    /// (`None` cannot happen for a socket address; the proxy would answer 400.)
    authority: Option<Authority>,
    /// Requests (and upgraded connections) in progress on this instance; the supervisor waits
    /// for it to reach zero before stopping a drained instance.
    in_flight: AtomicUsize,
    /// Set once when the instance leaves the route for good: long-lived connections watch it
    /// and close themselves across the drain budget.
    drain: watch::Sender<Option<Drain>>,
    /// Long-lived connections (upgraded, or server-sent events) open now, and how the drain
    /// ended them: closed with a reconnect hint before its deadline, or cut at it.
    long_lived: AtomicUsize,
    closed_for_drain: AtomicU64,
    cut_at_deadline: AtomicU64,
    /// The answers of the release this instance belongs to (shared by its instances).
    pub(crate) stats: Arc<ReleaseStats>,
}

/// Answers one release gave on this node, counted by the proxy when the answer's head is
/// sent: the figures of a deploy and its error budget. A release's instances share one, so a
/// restarted instance keeps counting into it.
#[derive(Debug, Default)]
pub(crate) struct ReleaseStats {
    requests: AtomicU64,
    server_errors: AtomicU64,
}

impl ReleaseStats {
    /// Counts one answer; a status of 500 or more (the proxy's own 502/504 for an instance
    /// that failed included) counts against the release.
    pub(crate) fn record(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (answers, of which 5xx) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.server_errors.load(Ordering::Relaxed),
        )
    }
}

/// A drain order: long-lived connections close at a moment of their own, spread over the
/// first part of `budget` (see `proxy::drain`), and none outlives `deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drain {
    pub started: Instant,
    pub budget: Duration,
    pub deadline: Instant,
}

/// How one drained instance's long-lived connections ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Closed before the deadline with a reconnect hint (WebSocket 1012, SSE `retry:`).
    pub closed: u64,
    /// Still open at the deadline, and cut.
    pub cut: u64,
}

impl Backend {
    pub fn new(app: &str, release: u64, addr: SocketAddr) -> Arc<Self> {
        Self::with_stats(app, release, addr, Arc::default())
    }

    /// A backend counting its answers into its release's `stats`.
    pub(crate) fn with_stats(
        app: &str,
        release: u64,
        addr: SocketAddr,
        stats: Arc<ReleaseStats>,
    ) -> Arc<Self> {
        Arc::new(Self {
            app: app.to_string(),
            release,
            addr,
            authority: Authority::try_from(addr.to_string()).ok(),
            in_flight: AtomicUsize::new(0),
            drain: watch::channel(None).0,
            long_lived: AtomicUsize::new(0),
            closed_for_drain: AtomicU64::new(0),
            cut_at_deadline: AtomicU64::new(0),
            stats,
        })
    }

    /// The instance's address as the authority of a request URI (`127.0.0.1:41234`).
    pub(crate) fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    /// Orders the instance's long-lived connections to close within `budget` (once; a second
    /// order is ignored).
    pub fn start_drain(&self, budget: Duration) {
        let started = Instant::now();
        self.drain.send_if_modified(|drain| {
            if drain.is_some() {
                return false;
            }
            *drain = Some(Drain {
                started,
                budget,
                deadline: started + budget,
            });
            true
        });
    }

    /// The drain order, for a long-lived connection to wait on.
    pub(crate) fn drain_order(&self) -> watch::Receiver<Option<Drain>> {
        self.drain.subscribe()
    }

    /// Counts a long-lived connection as open until the returned guard says how it ended.
    pub(crate) fn long_lived(self: &Arc<Self>) -> LongLived {
        self.long_lived.fetch_add(1, Ordering::SeqCst);
        LongLived(self.clone())
    }

    pub fn long_lived_open(&self) -> usize {
        self.long_lived.load(Ordering::SeqCst)
    }

    pub fn drain_outcome(&self) -> DrainOutcome {
        DrainOutcome {
            closed: self.closed_for_drain.load(Ordering::SeqCst),
            cut: self.cut_at_deadline.load(Ordering::SeqCst),
        }
    }

    /// Counts a request as in flight until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether anything besides its owner still holds this backend: a route a request looked
    /// up before the switch and may still pick it from, a request that picked it, or an
    /// in-flight guard. Once the backend is out of the current table and this is false, no
    /// request can reach it any more, so its instance may stop.
    pub(crate) fn held_elsewhere(this: &Arc<Self>) -> bool {
        Arc::strong_count(this) > 1
    }
}

/// Guard for one in-flight request; hold it until the response body (or the upgraded
/// connection) is finished.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open long-lived connection of a backend; say how it ended with `closed_for_drain` or
/// `cut`, or just drop it when the client or the instance ended it.
#[derive(Debug)]
pub(crate) struct LongLived(Arc<Backend>);

impl LongLived {
    pub(crate) fn closed_for_drain(self) {
        self.0.closed_for_drain.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn cut(self) {
        self.0.cut_at_deadline.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.0.long_lived.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How one app is served.
#[derive(Debug)]
pub struct AppRoute {
    /// Shared with each access record of a request to the app, rather than copied into it.
    pub(crate) app: Arc<str>,
    #[expect(
        dead_code,
        reason = "read by Debug only, so that a route in a log or a failed test says which release it serves"
    )]
    release: u64,
    /// Healthy instances of the serving release; empty while none is up (the proxy answers 503).
    pub(crate) backends: Vec<Arc<Backend>>,
    /// URL path prefix (starting with '/', no trailing '/') → absolute directory in the
    /// release, served by the proxy itself. Longest prefix wins.
    pub(crate) static_dirs: Vec<(String, PathBuf)>,
    pub(crate) bodies: BodyPolicy,
    pub(crate) https: HttpsPolicy,
    next: AtomicUsize,
}

/// What the proxy does about HTTPS for one app (`[http]` of its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsPolicy {
    /// Answer plain HTTP with a 308 to HTTPS for the app's hosts that have a certificate.
    pub redirect: bool,
    /// The `Strict-Transport-Security` value added to the app's HTTPS answers, when asked for.
    pub hsts: Option<HeaderValue>,
}

impl Default for HttpsPolicy {
    fn default() -> Self {
        Self {
            redirect: true,
            hsts: None,
        }
    }
}

impl HttpsPolicy {
    pub(crate) fn of(http: &px_proto::manifest::HttpSettings) -> Self {
        Self {
            redirect: http.https_redirect,
            // The value is digits and ASCII words, always a valid header value.
            hsts: http
                .hsts
                .and_then(|hsts| HeaderValue::try_from(hsts.header_value()).ok()),
        }
    }
}

/// How the proxy takes an app's request bodies (`[http]` of its manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPolicy {
    /// Larger bodies get 413.
    pub max_bytes: u64,
    /// Read each body whole before the app sees the request.
    pub buffer: bool,
}

impl Default for BodyPolicy {
    fn default() -> Self {
        Self {
            max_bytes: px_proto::manifest::DEFAULT_MAX_REQUEST_BODY.0,
            buffer: false,
        }
    }
}

impl BodyPolicy {
    pub(crate) fn of(http: &px_proto::manifest::HttpSettings) -> Self {
        Self {
            max_bytes: http.max_request_body.0,
            buffer: http.buffer_requests,
        }
    }
}

impl AppRoute {
    pub fn new(
        app: &str,
        release: u64,
        backends: Vec<Arc<Backend>>,
        static_dirs: Vec<(String, PathBuf)>,
    ) -> Self {
        Self {
            app: Arc::from(app),
            release,
            backends,
            static_dirs,
            bodies: BodyPolicy::default(),
            https: HttpsPolicy::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// The route with `bodies` instead of the default body policy.
    pub fn with_bodies(mut self, bodies: BodyPolicy) -> Self {
        self.bodies = bodies;
        self
    }

    /// The route with `https` instead of the default (redirect, no HSTS).
    pub fn with_https(mut self, https: HttpsPolicy) -> Self {
        self.https = https;
        self
    }

    /// The next backend, round robin; `None` when there is none.
    pub(crate) fn pick(&self) -> Option<Arc<Backend>> {
        if self.backends.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len();
        Some(self.backends[i].clone())
    }
}

/// Host name (lowercase, without port) → app route.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub by_host: HashMap<String, Arc<AppRoute>>,
}

impl RouteTable {
    /// Looks up a `Host` header value: case-insensitive, port ignored.
    pub(crate) fn lookup(&self, host: &str) -> Option<&Arc<AppRoute>> {
        let host = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.by_host.get(&host)
    }
}

/// The current table, swapped whole.
#[derive(Debug, Default)]
pub struct Routes {
    current: RwLock<Arc<RouteTable>>,
}

impl Routes {
    pub(crate) fn load(&self) -> Arc<RouteTable> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn store(&self, table: RouteTable) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_policy_follows_the_manifest() {
        let defaults = px_proto::manifest::AppManifest::parse("name = \"x\"").unwrap();
        assert_eq!(HttpsPolicy::of(&defaults.http), HttpsPolicy::default());
        assert!(HttpsPolicy::default().redirect);
        let asked = px_proto::manifest::AppManifest::parse(
            "name = \"x\"\n[http]\nhttps_redirect = false\nhsts = { max_age = \"2h\", include_subdomains = true }",
        )
        .unwrap();
        let policy = HttpsPolicy::of(&asked.http);
        assert!(!policy.redirect);
        assert_eq!(policy.hsts.unwrap(), "max-age=7200; includeSubDomains");
    }

    #[test]
    fn lookup_ignores_case_port_and_trailing_dot() {
        let mut table = RouteTable::default();
        table.by_host.insert(
            "hello.localhost".into(),
            Arc::new(AppRoute::new("hello", 1, Vec::new(), Vec::new())),
        );
        for host in [
            "hello.localhost",
            "HELLO.localhost:8080",
            "hello.localhost.",
        ] {
            assert!(table.lookup(host).is_some(), "{host}");
        }
        assert!(table.lookup("other.localhost").is_none());
    }

    #[test]
    fn round_robin_and_in_flight_guards() {
        let a = Backend::new("x", 1, "127.0.0.1:1".parse().unwrap());
        let b = Backend::new("x", 1, "127.0.0.1:2".parse().unwrap());
        let route = AppRoute::new("x", 1, vec![a.clone(), b.clone()], Vec::new());
        let picks: Vec<u16> = (0..4).map(|_| route.pick().unwrap().addr.port()).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        let guard = a.begin();
        assert_eq!(a.in_flight(), 1);
        drop(guard);
        assert_eq!(a.in_flight(), 0);
        assert!(
            AppRoute::new("y", 1, Vec::new(), Vec::new())
                .pick()
                .is_none()
        );
    }
}
