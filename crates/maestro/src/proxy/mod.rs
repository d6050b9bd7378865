//! The reverse proxy: routes requests by `Host` to the healthy instances of each app (round
//! robin), serves static paths itself, terminates TLS, and records metrics and access logs.
//!
//! The hot path per request is one read of the route table (an `Arc` clone), a header rewrite,
//! and a pooled keep-alive connection to the instance; bodies stream both ways, never buffered.
//! Each listener runs [`ProxySettings::workers`] threads, each with its own event loop and
//! pool of connections to instances (see `server.rs` for why, and `upstream.rs`).

mod access;
pub(crate) mod acme;
mod activity;
mod body;
pub(crate) mod drain;
mod handle;
mod headers;
mod https;
mod metrics;
mod pages;
pub(crate) mod protocol;
pub(crate) mod server;
mod static_files;
pub(crate) mod tls;
mod upstream;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::AccessLog;
pub(crate) use access::AccessRecord;
pub use acme::AcmeAnswers;
pub use metrics::ProxyMetrics;
pub(crate) use tls::CertStore;

use crate::routes::Routes;

/// Default for [`ProxySettings::request_timeout`]: as nginx's `proxy_read_timeout`, long enough
/// for a slow report page, short enough that a hung instance shows up as 504s quickly.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ProxySettings::idle_timeout`]: nginx's `keepalive_timeout`.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default for [`ProxySettings::header_read_timeout`]: a real client sends its headers in one
/// round trip; ten seconds allow for a bad mobile link while a slow-loris client holding many
/// connections open is cut off quickly.
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ProxySettings::max_header_bytes`]: above the 8–16 KiB most servers allow, so
/// large cookies pass, and small enough that a connection's buffer stays small.
pub(crate) const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default for [`ProxySettings::body_read_timeout`].
pub(crate) const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ProxySettings::drain`]: requests still running this long after shutdown
/// was asked are cut; matches the supervisor's drain of an old instance.
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Smallest header limit hyper accepts for its read buffer.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// Open client connections per listener; beyond it, new connections wait in the kernel's
/// accept backlog. Each proxied connection holds two file descriptors, so Maestro's unit needs a
/// `LimitNOFILE` of at least twice this (the default soft limit of 1024 would fail first).
pub(crate) const MAX_CONNECTIONS: usize = 16 * 1024;
/// Connecting to an instance on loopback is immediate unless its accept queue is full; after
/// this long the instance counts as unreachable (504).
pub(crate) const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle pooled connection to an instance is closed after this long: below the keep-alive
/// timeouts of common app servers (Node.js and uvicorn use 5 s), so the proxy never sends a
/// request on a connection the app is closing at the same moment.
pub(crate) const UPSTREAM_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle pooled connections kept per instance: enough for the concurrency of a busy app
/// between bursts, bounded so a spike does not leave thousands of sockets open.
pub(crate) const UPSTREAM_MAX_IDLE_PER_INSTANCE: usize = 1024;

/// Default for [`ProxySettings::workers`]: one per core the process may run on, as nginx's
/// `worker_processes auto`.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// How the proxy behaves; see the `DEFAULT_*` constants for the defaults and why.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Threads accepting and serving each listener's connections, each with its own event
    /// loop and connections to instances (default: one per core). With 1, the listener is
    /// served by tasks on the caller's runtime.
    pub workers: usize,
    /// The whole response head of the instance must arrive within this, or the client gets a
    /// 504 (default 60 s).
    pub request_timeout: Duration,
    /// A client connection on which no byte moves for this long is closed (default 75 s).
    /// This covers stalled bodies and upgraded connections; keep it above `request_timeout`.
    /// A keep-alive connection waiting for its next request is closed after
    /// `header_read_timeout` already, since hyper's header timer runs from the end of the
    /// previous response; an idle HTTP/2 connection after this (as nginx's `keepalive_timeout`).
    pub idle_timeout: Duration,
    /// A client must send a complete request head within this (slow loris), default 10 s;
    /// also the limit for a TLS handshake, and for an HTTP/2 connection's first request.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (default 64 KiB, at least 8 KiB); beyond it the client
    /// gets a 431 and the connection is closed. Over HTTP/2, the largest header list: beyond
    /// it that request gets a 431 and the connection goes on.
    pub max_header_bytes: usize,
    /// On the plain listener, redirect every request for a known host to
    /// `https://host/path` with a 308 (default false), even a host served only by the default
    /// certificate. Without it, an app's hosts are redirected once a certificate of their own
    /// (or a wildcard) is loaded; an app's `[http] https_redirect = false` turns both off.
    pub https_redirect: bool,
    /// The port written into those redirects (`https://host:PORT/path`) when clients reach
    /// the HTTPS listener on another port than 443, as on `em up` (default none: 443, left
    /// out of the URL).
    pub https_redirect_port: Option<u16>,
    /// Trust `X-Forwarded-*` and `X-Request-Id` from clients, extending them instead of
    /// replacing them (default false): only when Maestro sits behind the operator's own load
    /// balancer.
    pub trusted_forwarded: bool,
    /// On shutdown, open requests (and upgraded connections) get this long to finish
    /// (default 30 s).
    pub drain: Duration,
    /// For an app that buffers requests (`[http] buffer_requests`), the whole body must
    /// arrive within this, or the client gets a 408 (default 30 s): slow-client protection.
    pub body_read_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            https_redirect: false,
            https_redirect_port: None,
            trusted_forwarded: false,
            drain: DEFAULT_DRAIN,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// What can go wrong setting the proxy up, or serving a listener.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read the certificate directory {path}: {source}")]
    CertDir {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate {path}: {detail}")]
    Cert { path: String, detail: String },
    #[error("tls set-up: {0}")]
    Tls(#[from] rustls::Error),
    /// An `accept` on the listener failed in a way that means it will never accept again
    /// (the socket was shut down or closed under the proxy).
    #[error("the listener no longer accepts connections: {0}")]
    ListenerBroken(std::io::Error),
}

/// The reverse proxy. One per Maestro, shared by its plain and TLS listeners.
pub struct Proxy {
    routes: Arc<Routes>,
    settings: ProxySettings,
    metrics: Arc<ProxyMetrics>,
    access: AccessLog,
    /// The HTTPS listener's certificates, once it serves: which hosts plain HTTP redirects.
    certs: OnceLock<Arc<CertStore>>,
    /// ACME challenge answers and issued certificates, set from Beacon's link.
    acme: Arc<AcmeAnswers>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(
        routes: Arc<Routes>,
        settings: ProxySettings,
        metrics: Arc<ProxyMetrics>,
        access: AccessLog,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes,
            settings,
            metrics,
            access,
            certs: OnceLock::new(),
            acme: Arc::new(AcmeAnswers::default()),
        })
    }

    /// Whether the HTTPS listener serves a certificate of `host`'s own (or a wildcard's)
    /// rather than only the default one. `host` is a name without a port.
    pub(crate) fn has_certificate(&self, host: &str) -> bool {
        self.certs.get().is_some_and(|certs| certs.covers(host))
    }

    /// Where the link puts ACME's challenge answers and issued certificates.
    pub fn acme(&self) -> &Arc<AcmeAnswers> {
        &self.acme
    }

    /// Serves plain HTTP on `listener` until `shutdown`; then stops accepting and lets open
    /// requests finish, giving up after [`ProxySettings::drain`]. Fails, after the same drain,
    /// when the listener breaks ([`ProxyError::ListenerBroken`]): the proxy would never accept
    /// again, so its service must not go on as if it served.
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ProxyError> {
        server::serve(self, listener, None, shutdown)
            .await
            .map_err(ProxyError::ListenerBroken)
    }

    /// Same over TLS, with certificates chosen by SNI from `certs`. From the call on (before
    /// the first connection), the plain listener redirects the hosts these certificates cover.
    pub fn serve_https(
        self: Arc<Self>,
        listener: TcpListener,
        certs: Arc<CertStore>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), ProxyError>> + Send + 'static {
        certs.attach_acme(self.acme.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
        // One HTTPS listener per proxy; a second would serve the same store.
        let _ = self.certs.set(certs);
        async move {
            server::serve(self, listener, Some(acceptor), shutdown)
                .await
                .map_err(ProxyError::ListenerBroken)
        }
    }
}
