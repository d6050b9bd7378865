//! Connections to instances: each worker thread's pool of kept-alive HTTP/1.1 connections by
//! instance address, a request sent on one of them, and the lease that gives the connection
//! back once the answer's body has been read to its end.
//!
//! Why not hyper-util's pooled client: a profile of `proxy-only` under `wrk -t2 -c32` put the
//! client's per-request machinery among the proxy's largest user-space costs: a task spawned
//! per request to watch the connection become idle again, its request future boxed and moved
//! (the largest `memmove`s), and a checkout raced against a lazy connect. Here the connection is
//! taken from a `Vec`, the request sent on hyper's own connection handle, and the handle put
//! back by the response body when it ends: no task, no box, no race.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use super::body::UpstreamBody;
use super::{UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_MAX_IDLE_PER_INSTANCE, UPSTREAM_POOL_IDLE_TIMEOUT};

/// How often a worker closes the connections idle longer than [`UPSTREAM_POOL_IDLE_TIMEOUT`]:
/// a connection is never used past that age anyway (checked when it is taken), so this only
/// bounds how long an unused socket stays open.
pub const UPSTREAM_POOL_SWEEP: Duration = Duration::from_secs(1);

/// A request to an instance failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be made (refused, or not within [`UPSTREAM_CONNECT_TIMEOUT`]).
    #[error("cannot connect to the instance: {0}")]
    Connect(io::Error),
    /// The connection was made but the exchange failed: the request could not be sent (its
    /// body failed), or the answer did not come or could not be read.
    #[error("exchange with the instance failed: {0}")]
    Http(#[from] hyper::Error),
}

/// An idle connection with the time it was last given back.
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's connections to instances. The worker's tasks all run on its thread, so the
/// lock is never contended; it is there because tasks must be `Send`.
#[derive(Default)]
pub(crate) struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Whether this worker's sweep task runs (started with the first connection, on the
    /// worker's own runtime).
    sweeping: std::sync::atomic::AtomicBool,
}

/// A connection lent to one request; [`Lease::give_back`] returns it to the pool once the
/// answer has been read whole. Dropped instead, the connection closes (an answer cut short
/// leaves it in an unknown state).
pub(crate) struct Lease {
    sender: SendRequest<UpstreamBody>,
    addr: SocketAddr,
    pool: Weak<UpstreamPool>,
}

impl Lease {
    /// Puts the connection back for the next request to `addr` if it is ready for one. It is
    /// not when the instance answered before reading the whole request body, which may still
    /// be coming from a slow client: a request taking that connection would wait for it, so it
    /// closes instead.
    pub(crate) fn give_back(self) {
        if !self.sender.is_ready() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.addr, self.sender);
        }
    }
}

impl UpstreamPool {
    /// Sends `req` to the instance at `addr` on an idle connection, or a new one. A request
    /// that a reused connection could not even start sending (the instance closed it as it
    /// was taken) goes once more, on a new connection, as hyper-util's client does.
    pub(crate) async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let mut reused_failed = false;
        loop {
            let (mut sender, reused) = match self.take(addr) {
                Some(sender) if !reused_failed => (sender, true),
                _ => (self.connect(addr).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        sender,
                        addr,
                        pool: Arc::downgrade(self),
                    };
                    return Ok((response, lease));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused && !reused_failed => {
                        debug!(backend = %addr, error = %failed.error(), "a pooled connection closed before the request went out; sending it on a new one");
                        reused_failed = true;
                        req = unsent;
                    }
                    _ => return Err(UpstreamError::Http(failed.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to `addr` that is still open and ready, young
    /// enough that the instance has not begun closing it.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut pools = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = pools.get_mut(&addr)?;
        while let Some(Idle { sender, since }) = idle.pop() {
            if since.elapsed() < UPSTREAM_POOL_IDLE_TIMEOUT && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        let mut pools = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = pools.entry(addr).or_default();
        if idle.len() < UPSTREAM_MAX_IDLE_PER_INSTANCE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// A new connection to `addr`, its task running on the current (the worker's) runtime.
    async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        self.start_sweeping();
        let tcp =
            match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => {
                    return Err(UpstreamError::Connect(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {UPSTREAM_CONNECT_TIMEOUT:?}"),
                    )));
                }
            };
        // Small requests and responses must not wait for Nagle's delayed ACK dance.
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                debug!(backend = %addr, error = %e, "connection to an instance ended with an error");
            }
        });
        Ok(sender)
    }

    /// Starts, once, the task that closes connections idle too long.
    fn start_sweeping(self: &Arc<Self>) {
        if self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPSTREAM_POOL_SWEEP);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Closes the connections idle for [`UPSTREAM_POOL_IDLE_TIMEOUT`] or closed by their
    /// instance, and forgets instances with none left.
    fn sweep(&self) {
        let mut pools = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|_, idle| {
            idle.retain(|c| {
                c.since.elapsed() < UPSTREAM_POOL_IDLE_TIMEOUT && !c.sender.is_closed()
            });
            !idle.is_empty()
        });
    }

    /// Idle connections kept for `addr`, for tests.
    #[cfg(test)]
    fn idle_to(&self, addr: SocketAddr) -> usize {
        let pools = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        pools.get(&addr).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An instance answering every request on a connection with `hello`, counting connections.
    async fn instance() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if tcp.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::Empty);
        *req.uri_mut() = hyper::Uri::from_static("/");
        req.headers_mut()
            .insert(hyper::header::HOST, "app".parse().unwrap());
        req
    }

    #[tokio::test]
    async fn a_connection_given_back_after_its_answer_serves_the_next_request() {
        let (addr, accepted) = instance().await;
        let pool = Arc::new(UpstreamPool::default());
        for _ in 0..3 {
            let (response, lease) = pool.send(addr, get()).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
            lease.give_back();
            assert_eq!(pool.idle_to(addr), 1);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lease_dropped_mid_answer_closes_its_connection() {
        let (addr, accepted) = instance().await;
        let pool = Arc::new(UpstreamPool::default());
        let (_response, lease) = pool.send(addr, get()).await.unwrap();
        drop(lease);
        assert_eq!(pool.idle_to(addr), 0);
        let (response, _lease) = pool.send(addr, get()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_instance_that_is_gone_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Arc::new(UpstreamPool::default());
        let error = pool.send(addr, get()).await.err().unwrap();
        assert!(matches!(error, UpstreamError::Connect(_)), "{error}");
    }
}
