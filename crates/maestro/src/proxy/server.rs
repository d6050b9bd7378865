//! Listening: the accept loop, one task per client connection (TLS handshake, hyper's HTTP/1
//! connection, idle watch), and the graceful drain on shutdown.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{MAX_CONNECTIONS, MIN_HEADER_BYTES, Proxy, handle};

/// Pause after a failed `accept` (typically out of file descriptors) so the loop does not spin
/// while connections close.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// On shutdown, how long a connection that has not been answered yet may take to send its
/// first request. A client that connected just before the drain began has a request on the
/// way; closing its connection unanswered would fail that request, and under socket activation
/// Maestro's restart is meant to fail none.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// What every connection of one listener shares.
pub(crate) struct Listener {
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) https: bool,
    http1: http1::Builder,
    shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: whatever still runs is cut.
    pub(crate) force: CancellationToken,
    /// Connection and upgraded-tunnel tasks, waited for on shutdown.
    pub(crate) tasks: TaskTracker,
}

/// One client connection, as the request handler sees it.
pub(crate) struct Conn {
    pub(crate) listener: Arc<Listener>,
    pub(crate) peer: SocketAddr,
    pub(crate) activity: Arc<Activity>,
    /// The connection's slot under [`MAX_CONNECTIONS`], held by the connection and, after an
    /// upgrade, by its tunnel.
    _slot: OwnedSemaphorePermit,
}

pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let settings = &proxy.settings;
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(settings.max_header_bytes.max(MIN_HEADER_BYTES))
        .keep_alive(true);
    let drain = settings.drain;
    let handshake_timeout = settings.header_read_timeout;
    let ctx = Arc::new(Listener {
        https: tls.is_some(),
        proxy: proxy.clone(),
        http1,
        shutdown: shutdown.clone(),
        force: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = ctx.https, "proxy listening");
    }
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accepting a connection failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx2 = ctx.clone();
        match &tls {
            None => {
                ctx.tasks.spawn(connection(ctx2, tcp, peer, permit));
            }
            Some(acceptor) => {
                let accept = acceptor.accept(tcp);
                ctx.tasks.spawn(async move {
                    let stream = tokio::select! {
                        stream = tokio::time::timeout(handshake_timeout, accept) => stream,
                        () = ctx2.force.cancelled() => return,
                    };
                    match stream {
                        Ok(Ok(stream)) => connection(ctx2, stream, peer, permit).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    // Long-lived connections close one by one across the drain, each with its reconnect hint
    // (see `drain.rs`), rather than all at once when it ends.
    for route in proxy.routes.load().by_host.values() {
        for backend in &route.backends {
            backend.start_drain(drain);
        }
    }
    ctx.tasks.close();
    if tokio::time::timeout(drain, ctx.tasks.wait()).await.is_err() {
        warn!(
            remaining = ctx.tasks.len(),
            "drain deadline passed, closing the remaining connections"
        );
        ctx.force.cancel();
        ctx.tasks.wait().await;
    }
    info!(tls = ctx.https, "proxy stopped");
}

/// Serves one client connection until it closes, is idle too long, or shutdown ends it.
async fn connection<IO>(ctx: Arc<Listener>, io: IO, peer: SocketAddr, slot: OwnedSemaphorePermit)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let state = Arc::new(Conn {
        listener: ctx.clone(),
        peer,
        activity: activity.clone(),
        _slot: slot,
    });
    let service = service_fn(move |req| handle::handle(state.clone(), req));
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
    });
    let conn = ctx.http1.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let idle = ctx.proxy.settings.idle_timeout;
    let mut draining = false;
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            () = ctx.shutdown.cancelled(), if !draining => {
                draining = true;
                // Idle connections close now; busy ones after their current response.
                if activity.answered() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = activity.first_answer(FIRST_REQUEST_GRACE), if draining && !closing => {
                // Answered its first request (or never sent one): close after it.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = ctx.force.cancelled() => return,
            () = activity.idle(idle) => {
                debug!(%peer, "closing a connection idle for {idle:?}");
                return;
            }
        }
    }
}

/// When bytes last moved on a client connection, for the idle timeout.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last read or write.
    last_ms: AtomicU64,
    /// Whether anything was ever written to the client (a response has begun).
    wrote: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            wrote: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn answered(&self) -> bool {
        self.wrote.load(Ordering::Relaxed)
    }

    /// Completes once a response has begun on the connection, or after `limit`.
    async fn first_answer(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.answered() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Completes once nothing has moved for `limit`.
    pub(crate) async fn idle(&self, limit: Duration) {
        loop {
            let quiet = self.quiet();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A client stream that notes when bytes move through it.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
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

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
            this.activity.wrote.store(true, Ordering::Relaxed);
        }
        polled
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
            this.activity.wrote.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
