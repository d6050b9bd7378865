//! The hardened HTTP/1 server that apprepo's and Beacon's APIs run on: HTTPS unless plain HTTP
//! is configured on purpose (`[api_tls]`), a cap on open connections, a deadline for each TLS
//! handshake and request head, an idle timeout, and a graceful stop.
//!
//! Why not `axum::serve`: it sets no timer, so a client that sends half a request head holds
//! its connection (and a task) forever, and it accepts without bound. Maestro's proxy has its
//! own server (worker threads, TLS); this one is the same idea for the services' APIs.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::shutdown::accept_error_is_fatal;

/// Default for [`HttpLimits::header_read_timeout`]: a real client sends a request head in one
/// round trip; thirty seconds allow for a slow link and an operator typing into `nc`, while a
/// client that sends half a head (slow loris) loses its connection within that time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`HttpLimits::idle_timeout`]: a connection on which no byte moved for this long
/// while nothing was being worked on is closed (a request body that stopped arriving, a
/// response the client stopped reading). Above Beacon's event streams' 15-second keep-alive
/// with room for a slow link, and well above the request head deadline, which already bounds
/// an idle keep-alive connection (hyper arms it whenever it waits for the next head).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`HttpLimits::max_connections`]: the APIs serve operators, `em`, Beacon and the
/// Maestros of a cluster, a few hundred clients at most; past this, new connections wait in the
/// kernel's accept backlog instead of each becoming a task. The units' `LimitNOFILE=` is sized
/// for it (a connection is one descriptor; storage, links and logs need the rest).
pub const MAX_CONNECTIONS: usize = 1024;
/// Largest request head: above the 8–16 KiB most servers allow, so long tokens pass, and
/// small enough that a connection's buffer stays small.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` that is worth a retry and is not about one connection
/// (typically out of file descriptors), so the loop does not spin while connections close.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// `[http]`: how long a client may take and how many may connect at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLimits {
    /// Longest a request head may take to arrive, from the moment the server waits for it
    /// (a new connection, or the next request on a kept-alive one). Default: 30s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection on which no byte moved for this long, while no request was being answered,
    /// is closed. Default: 60s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept backlog. Default: 1024.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// `[api_tls]`: the certificate the API presents, or plain HTTP chosen on purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// Certificate chain (PEM) the API presents, read again on reload. Default: none.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600). Default: none.
    pub key_file: Option<PathBuf>,
    /// Serve plain HTTP: only behind a TLS-terminating proxy on the same host, or on loopback.
    /// Default: false, so a service without a certificate refuses to start rather than send
    /// tokens in the clear.
    pub plain_http: bool,
}

impl ApiTls {
    /// The server config the API serves with (`None`: plain HTTP, as configured), or why it
    /// cannot start. `fallback` is a certificate and key the service already has for this host
    /// (Beacon's control-link ones), used when `cert_file` and `key_file` are not set.
    pub fn resolve(&self, fallback: Option<(&Path, &Path)>) -> Result<Option<ServerTls>, String> {
        let files = match (&self.cert_file, &self.key_file, self.plain_http) {
            (Some(_), Some(_), true) => {
                return Err(
                    "api_tls.plain_http = true and a certificate exclude each other: choose one"
                        .into(),
                );
            }
            (Some(cert), Some(key), false) => Some((cert.as_path(), key.as_path())),
            (None, None, true) => None,
            (None, None, false) => fallback,
            _ => return Err("api_tls.cert_file and api_tls.key_file go together".into()),
        };
        match (files, self.plain_http) {
            (None, true) => Ok(None),
            (Some((cert, key)), _) => crate::tls::server_config(cert, key)
                .map(|config| Some(ServerTls::new(config)))
                .map_err(|e| format!("api_tls: {e}")),
            (None, false) => Err(
                "the API needs api_tls.cert_file and api_tls.key_file (HTTPS), \
                 or api_tls.plain_http = true behind a TLS-terminating proxy or on loopback"
                    .into(),
            ),
        }
    }
}

/// The TLS config an HTTPS listener serves with, replaceable while it runs (a reload with a
/// renewed certificate): each new connection takes the current one.
#[derive(Clone, Debug)]
pub struct ServerTls(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl ServerTls {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// New connections present `new`'s certificate from now on; open ones keep theirs.
    pub fn replace(&self, new: &ServerTls) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = new.current();
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Why the HTTP server stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An `accept` failed in a way that means the listener will never accept again (the
    /// socket was shut down or closed under the service).
    #[error("the http listener no longer accepts connections: {0}")]
    ListenerBroken(io::Error),
    /// `max_connections` is zero: the server could never accept anything.
    #[error("http max_connections must be at least 1")]
    NoConnections,
}

/// Serves `service` on `listener` under `limits`, over TLS with `tls` (plain HTTP when `None`),
/// until `shutdown`; then stops accepting, lets
/// each connection finish the request it is answering, and returns once every connection is
/// closed (callers bound that wait with their drain deadline). Returns
/// [`ServeError::ListenerBroken`] when the listener will never accept again, so that the
/// service stops and is restarted instead of staying up but unreachable.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: HttpLimits,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    S: tower_service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if limits.max_connections == 0 {
        return Err(ServeError::NoConnections);
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connections = TaskTracker::new();
    // What connections watch to close: shutdown, or a listener that broke.
    let stop = shutdown.child_token();
    let result = loop {
        // A slot is taken before accepting, so connections beyond the cap wait in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; treat it as a stop all the same.
                Err(_) => break Ok(()),
            },
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if accept_error_is_fatal(&e) => break Err(ServeError::ListenerBroken(e)),
                // A connection that went away before it was accepted: the next may be fine.
                Err(e) if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let http1 = http1.clone();
        let service = service.clone();
        let stop = stop.clone();
        let tls = tls.as_ref().map(ServerTls::current);
        connections.spawn(async move {
            let activity = Arc::new(Activity::new());
            let tracked = Tracked {
                inner: tcp,
                activity: activity.clone(),
            };
            match tls {
                None => {
                    let io = TokioIo::new(tracked);
                    connection(
                        http1,
                        io,
                        peer,
                        activity,
                        service,
                        limits.idle_timeout,
                        stop,
                    )
                    .await;
                }
                Some(config) => {
                    // The handshake is held to the request head's deadline, so a client that
                    // stalls it (a slow loris one layer down) loses its slot as fast.
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tracked));
                    let tls = tokio::select! {
                        () = stop.cancelled() => None,
                        done = handshake => match done {
                            Ok(Ok(tls)) => Some(tls),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "tls handshake not done in time");
                                None
                            }
                        },
                    };
                    if let Some(tls) = tls {
                        let io = TokioIo::new(tls);
                        connection(
                            http1,
                            io,
                            peer,
                            activity,
                            service,
                            limits.idle_timeout,
                            stop,
                        )
                        .await;
                    }
                }
            }
            drop(permit);
        });
    };
    connections.close();
    if result.is_ok() {
        connections.wait().await;
    } else {
        // The service is about to stop: open connections finish their current response and
        // close, but the error is returned now so the service stops without waiting on them.
        stop.cancel();
    }
    result
}

/// Serves one connection until it closes, idles out, or shutdown closes it after its current
/// response.
async fn connection<I, S, B>(
    http1: http1::Builder,
    io: TokioIo<I>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    service: S,
    idle: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let per_request = activity.clone();
    let handler = service_fn(move |request: Request<Incoming>| {
        let mut service = service.clone();
        let working = Working::new(per_request.clone());
        let request = request.map(|inner| RequestBody {
            inner,
            unread: Some(Unread::new(per_request.clone())),
        });
        async move {
            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
            let response = service.call(request).await;
            drop(working);
            response
        }
    });
    let conn = http1.serve_connection(io, handler).with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                // Idle connections close now; busy ones after their current response.
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle(idle) => {
                tracing::debug!(%peer, "closing an http connection idle for {idle:?}");
                return;
            }
        }
    }
}

/// What moves on one connection, for the idle timeout.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_ms: AtomicU64,
    /// Requests whose handler has not answered yet.
    working: AtomicUsize,
    /// Request bodies a handler holds and has not read to the end: a handler waiting on one is
    /// waiting on the client, not working.
    unread: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            working: AtomicUsize::new(0),
            unread: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Whether the server, not the client, is what the connection waits on: a handler works on
    /// an answer and has every body it took in full.
    fn server_busy(&self) -> bool {
        self.working.load(Ordering::Relaxed) > 0 && self.unread.load(Ordering::Relaxed) == 0
    }

    /// Completes once nothing has moved for `limit` while the server was not busy.
    async fn idle(&self, limit: Duration) {
        loop {
            if self.server_busy() {
                // A long answer (a large upload being stored) is not the client's idleness.
                self.touch();
            }
            let quiet = self.quiet();
            if quiet >= limit {
                return;
            }
            // Woken at least once a second to notice a handler that finished or started.
            tokio::time::sleep((limit - quiet).min(Duration::from_secs(1))).await;
        }
    }
}

/// Counts one request as being worked on until its handler answers.
struct Working(Arc<Activity>);

impl Working {
    fn new(activity: Arc<Activity>) -> Self {
        activity.working.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one request body as unread until it ends or its handler drops it.
struct Unread(Arc<Activity>);

impl Unread {
    fn new(activity: Arc<Activity>) -> Self {
        activity.unread.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        self.0.unread.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request body as handlers get it: hyper's body, counted as unread until its end.
pub struct RequestBody {
    inner: Incoming,
    unread: Option<Unread>,
}

impl Body for RequestBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.unread = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client stream that notes when bytes move through it.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::tls::tests::{Pki, make_pki};

    /// Answers `ok` after reading the whole body, taking `delay` first.
    #[derive(Clone)]
    struct Slow {
        delay: Duration,
    }

    impl tower_service::Service<Request<RequestBody>> for Slow {
        type Response = Response<http_body_util::Full<hyper::body::Bytes>>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
            let delay = self.delay;
            Box::pin(async move {
                use http_body_util::BodyExt as _;
                let body = request.into_body().collect().await.map(|b| b.to_bytes());
                tokio::time::sleep(delay).await;
                let text = match body {
                    Ok(bytes) => format!("ok {}\n", bytes.len()),
                    Err(_) => "body failed\n".to_owned(),
                };
                Ok(Response::new(http_body_util::Full::new(text.into())))
            })
        }
    }

    async fn start(limits: HttpLimits, delay: Duration) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            Slow { delay },
            limits,
            None,
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    /// Starts the server over TLS with `pki`'s certificate.
    async fn start_tls(limits: HttpLimits, pki: &Pki) -> (SocketAddr, CancellationToken) {
        let p = |n: &str| pki.dir.path().join(n);
        let config = crate::tls::server_config(&p("cert.pem"), &p("key.pem")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let service = Slow {
            delay: Duration::ZERO,
        };
        let tls = Some(ServerTls::new(config));
        tokio::spawn(serve(listener, service, limits, tls, shutdown.clone()));
        (addr, shutdown)
    }

    async fn connect_tls(
        addr: SocketAddr,
        ca: &Path,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(crate::tls::client_config(ca).unwrap());
        let tcp = TcpStream::connect(addr).await?;
        let name = crate::tls::server_name("beacon.test").unwrap();
        connector.connect(name, tcp).await
    }

    /// Reads a TLS stream until the peer closes; returns what came and how long it took.
    async fn read_tls_to_close(
        tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    ) -> (String, Duration) {
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut got)).await;
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    }

    #[tokio::test]
    async fn https_answers_a_client_trusting_the_ca_and_another_ca_is_refused() {
        let pki = make_pki();
        let (addr, _shutdown) = start_tls(HttpLimits::default(), &pki).await;
        let mut tls = connect_tls(addr, &pki.dir.path().join("ca.pem"))
            .await
            .unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (got, _) = read_tls_to_close(&mut tls).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("ok 0\n"), "{got}");

        let other = make_pki();
        let refused = connect_tls(addr, &other.dir.path().join("ca.pem")).await;
        let err = refused.err().unwrap().to_string();
        assert!(err.contains("certificate"), "{err}");

        // A client speaking plain HTTP to the HTTPS port gets no answer in HTTP.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (got, _) = read_to_close(&mut tcp).await;
        assert!(!got.contains("ok"), "{got}");
    }

    #[tokio::test]
    async fn a_half_sent_request_over_tls_is_cut_at_the_header_deadline() {
        let pki = make_pki();
        let header = Duration::from_millis(500);
        let (addr, _shutdown) = start_tls(limits(header, Duration::from_secs(30), 8), &pki).await;
        let mut tls = connect_tls(addr, &pki.dir.path().join("ca.pem"))
            .await
            .unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (got, took) = read_tls_to_close(&mut tls).await;
        assert!(!got.contains("ok"), "{got}");
        assert!(
            took >= header - Duration::from_millis(50),
            "closed after {took:?}"
        );
        assert!(took < header * 4, "still open after {took:?}");
    }

    #[tokio::test]
    async fn the_liveness_probe_speaks_tls_to_an_https_listener() {
        let pki = make_pki();
        let (addr, _shutdown) = start_tls(HttpLimits::default(), &pki).await;
        crate::systemd::http_answers(addr, "/healthz", true)
            .await
            .unwrap();
        let plain = crate::systemd::http_answers(addr, "/healthz", false).await;
        assert!(plain.is_err(), "{plain:?}");
    }

    #[tokio::test]
    async fn a_stalled_tls_handshake_is_cut_at_the_header_deadline() {
        let pki = make_pki();
        let header = Duration::from_millis(500);
        let (addr, _shutdown) = start_tls(limits(header, Duration::from_secs(30), 8), &pki).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // The first bytes of a ClientHello record, and then nothing.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .unwrap();
        let (_, took) = read_to_close(&mut tcp).await;
        assert!(
            took >= header - Duration::from_millis(50),
            "closed after {took:?}"
        );
        assert!(took < header * 4, "still open after {took:?}");
    }

    #[test]
    fn the_api_serves_plain_http_only_when_told_and_never_with_half_a_certificate() {
        let pki = make_pki();
        let p = |n: &str| pki.dir.path().join(n);
        let err = ApiTls::default().resolve(None).unwrap_err();
        assert!(err.contains("api_tls.plain_http = true"), "{err}");
        let plain = ApiTls {
            plain_http: true,
            ..ApiTls::default()
        };
        assert!(plain.resolve(None).unwrap().is_none());
        let half = ApiTls {
            cert_file: Some(p("cert.pem")),
            ..ApiTls::default()
        };
        assert!(half.resolve(None).unwrap_err().contains("go together"));
        let both = ApiTls {
            cert_file: Some(p("cert.pem")),
            key_file: Some(p("key.pem")),
            plain_http: true,
        };
        assert!(
            both.resolve(None)
                .unwrap_err()
                .contains("exclude each other")
        );
        let https = ApiTls {
            plain_http: false,
            ..both.clone()
        };
        assert!(https.resolve(None).unwrap().is_some());
        // A service's own certificate for this host stands in for an unset pair.
        let (cert, key) = (p("cert.pem"), p("key.pem"));
        assert!(
            ApiTls::default()
                .resolve(Some((&cert, &key)))
                .unwrap()
                .is_some()
        );
        assert!(plain.resolve(Some((&cert, &key))).unwrap().is_none());
        let missing = ApiTls {
            cert_file: Some(p("none.pem")),
            key_file: Some(p("key.pem")),
            plain_http: false,
        };
        let err = missing.resolve(None).unwrap_err();
        assert!(err.contains("none.pem"), "{err}");
    }

    /// Reads until the peer closes; returns what came and how long it took.
    async fn read_to_close(tcp: &mut TcpStream) -> (String, Duration) {
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut got)).await;
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    }

    fn limits(header: Duration, idle: Duration, max: usize) -> HttpLimits {
        HttpLimits {
            header_read_timeout: header,
            idle_timeout: idle,
            max_connections: max,
        }
    }

    #[tokio::test]
    async fn a_half_sent_request_head_is_cut_at_the_header_deadline() {
        let header = Duration::from_millis(500);
        let (addr, _shutdown) =
            start(limits(header, Duration::from_secs(30), 8), Duration::ZERO).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (_, took) = read_to_close(&mut tcp).await;
        assert!(
            took >= header - Duration::from_millis(50),
            "closed after {took:?}"
        );
        assert!(took < header * 4, "still open after {took:?}");
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_and_a_whole_request_is_answered() {
        let header = Duration::from_millis(500);
        let (addr, _shutdown) =
            start(limits(header, Duration::from_secs(30), 8), Duration::ZERO).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (got, took) = read_to_close(&mut tcp).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("ok 0\n"), "{got}");
        assert!(took < header * 4, "kept alive for {took:?}");
    }

    #[tokio::test]
    async fn a_request_body_that_stops_arriving_is_cut_after_the_idle_timeout() {
        let idle = Duration::from_millis(700);
        let (addr, _shutdown) =
            start(limits(Duration::from_secs(30), idle, 8), Duration::ZERO).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            .await
            .unwrap();
        let (got, took) = read_to_close(&mut tcp).await;
        assert!(!got.contains("ok"), "{got}");
        assert!(
            took >= idle - Duration::from_millis(50),
            "closed after {took:?}"
        );
        assert!(took < idle * 4, "still open after {took:?}");
    }

    #[tokio::test]
    async fn a_handler_working_longer_than_the_idle_timeout_still_answers() {
        let idle = Duration::from_millis(300);
        let (addr, _shutdown) = start(limits(Duration::from_secs(30), idle, 8), idle * 4).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
        let (got, _) = read_to_close(&mut tcp).await;
        assert!(got.ends_with("ok 3\n"), "{got}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_until_one_closes() {
        let (addr, _shutdown) = start(
            limits(Duration::from_secs(30), Duration::from_secs(30), 2),
            Duration::ZERO,
        )
        .await;
        // Two connections hold both slots with half-sent heads.
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // A third connects (the kernel's backlog takes it) but is not served.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "the third connection was served beyond the cap"
        );
        // Once one closes, the third is served.
        drop(first);
        let (got, _) = read_to_close(&mut third).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        drop(second);
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_ends_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Slow {
                delay: Duration::ZERO,
            },
            HttpLimits::default(),
            None,
            shutdown.clone(),
        ));
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    #[tokio::test]
    async fn zero_connections_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = serve(
            listener,
            Slow {
                delay: Duration::ZERO,
            },
            limits(HEADER_READ_TIMEOUT, IDLE_TIMEOUT, 0),
            None,
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(served, Err(ServeError::NoConnections)));
    }
}
