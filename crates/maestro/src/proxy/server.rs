//! Listening: worker threads, each with its own event loop, accept loop and pool of connections
//! to instances, handing connections to each other to stay balanced; one task per client
//! connection (TLS handshake, hyper's HTTP/1.1 or HTTP/2 connection as ALPN chose, idle
//! watch); and the graceful drain on shutdown.
//!
//! Why threads of their own rather than tasks on Maestro's work-stealing runtime: a proxied
//! request hops between the client connection's task and the pooled instance connection's task
//! several times. On one thread each hop is a queue push; across threads it is a wake-up of a
//! parked thread (a futex and a context switch), which profiles showed as most of the proxy's
//! CPU. nginx's workers avoid the same cost the same way.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use px_runtime::shutdown::accept_error_is_fatal;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::activity::{Activity, Tracked};
use super::metrics::{OpenConnection, WorkerConnections};
use super::protocol::{Builders, Graceful, Protocol};
use super::upstream::UpstreamPool;
use super::{MAX_CONNECTIONS, Proxy, handle};

/// Pause after a failed `accept` (typically out of file descriptors) so the loop does not spin
/// while connections close.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// On shutdown, how long a connection that has not been answered yet may take to send its
/// first request. A client that connected just before the drain began has a request on the
/// way; closing its connection unanswered would fail that request, and under socket activation
/// Maestro's restart is meant to fail none.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// How many more open connections than its listener's least busy worker a worker may hold
/// before it hands the connections it accepts to that worker. The kernel wakes every worker
/// for a new connection and the first to call `accept` wins, which in a burst is the one
/// already running: without this, one thread could end up holding most keep-alive or
/// WebSocket connections (or all of a load balancer's few), with one core for all of them,
/// while another thread idles.
pub const ACCEPT_BALANCE_SLACK: usize = 4;
/// Connections waiting to be taken over by one worker. When its queue is full (the worker is
/// stuck or swamped), the worker that accepted a connection serves it itself.
pub const HANDOFF_QUEUE: usize = 64;

/// One worker thread of a listener, as its connections see it.
pub(crate) struct Worker {
    /// This worker's place among its listener's workers, from 0.
    index: usize,
    /// Open connections of each worker of the listener, this one's included.
    connections: Arc<WorkerConnections>,
    /// Where to hand each worker of the listener a connection, by index.
    handoffs: Arc<[mpsc::Sender<Handoff>]>,
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) https: bool,
    /// This worker's connections to instances, so that a request and the instance connection
    /// it uses run on the same thread.
    pub(crate) upstream: Arc<UpstreamPool>,
    builders: Builders,
    shutdown: CancellationToken,
    /// Cancelled when the drain deadline has passed: whatever still runs is cut (shared by
    /// the listener's workers).
    pub(crate) force: CancellationToken,
    /// Connection and upgraded-tunnel tasks of every worker of the listener, waited for on
    /// shutdown.
    pub(crate) tasks: TaskTracker,
}

/// One client connection, as the request handler sees it.
pub(crate) struct Conn {
    pub(crate) worker: Arc<Worker>,
    /// The peer's IP address as the `X-Forwarded-For` value, formatted once per connection.
    pub(crate) peer_ip: HeaderValue,
    pub(crate) activity: Arc<Activity>,
    /// Held by the connection and, after an upgrade, by its tunnel.
    _slot: Slot,
}

/// What an accepted connection holds until it closes: its place under [`MAX_CONNECTIONS`]
/// and its count in its worker's open connections.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _open: OpenConnection,
}

/// A connection one worker accepted for another, less busy one: its own handle of the socket
/// (registered with the other worker's event loop on arrival) and its slot, already counted
/// for the other worker.
struct Handoff {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
}

/// Serves `listener` until `shutdown`, then drains. Returns the error of an `accept` that
/// showed the listener will never accept again (see `accept_error_is_fatal`): the first worker
/// to meet one stops every worker of the listener, so the listener's service ends as a whole,
/// is drained like at shutdown, and its caller learns why.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> Result<(), io::Error> {
    let settings = &proxy.settings;
    let drain = settings.drain;
    let https = tls.is_some();
    // Dropping this future (an aborted task) stops the workers' accept loops as well.
    let stop = shutdown.child_token();
    let _stop_on_drop = stop.clone().drop_guard();
    let force = CancellationToken::new();
    let tasks = TaskTracker::new();
    let builders = Builders::new(settings, tasks.clone(), force.clone());
    let workers = settings.workers.max(1);
    let connections = proxy
        .metrics
        .listener(if https { "https" } else { "http" }, workers);
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::channel(HANDOFF_QUEUE)).unzip();
    let handoffs: Arc<[mpsc::Sender<Handoff>]> = senders.into();
    let new_worker = |index| {
        Arc::new(Worker {
            index,
            connections: connections.clone(),
            handoffs: handoffs.clone(),
            proxy: proxy.clone(),
            https,
            upstream: Arc::new(UpstreamPool::default()),
            builders: builders.clone(),
            shutdown: stop.clone(),
            force: force.clone(),
            tasks: tasks.clone(),
        })
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = https, workers, "proxy listening");
    }
    let accepted = if workers == 1 {
        accept_loop(new_worker(0), listener, tls, slots, receivers.remove(0)).await
    } else {
        match spawn_workers(&listener, &tls, &slots, &connections, receivers, new_worker) {
            Ok(finished) => {
                drop(listener);
                let mut broken = None;
                for done in finished {
                    if let Ok(Err(e)) = done.await {
                        broken.get_or_insert(e);
                    }
                }
                broken.map_or(Ok(()), Err)
            }
            Err(e) => {
                warn!(error = %e, "cannot start the proxy's worker threads; serving from one task");
                connections.set_running(1);
                // The first worker's queue was dropped with the threads; nothing was handed off.
                let (_, handoffs) = mpsc::channel(1);
                accept_loop(new_worker(0), listener, tls, slots, handoffs).await
            }
        }
    };
    // Long-lived connections close one by one across the drain, each with its reconnect hint
    // (see `drain.rs`), rather than all at once when it ends.
    for route in proxy.routes.load().by_host.values() {
        for backend in &route.backends {
            backend.start_drain(drain);
        }
    }
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(
            remaining = tasks.len(),
            "drain deadline passed, closing the remaining connections"
        );
        force.cancel();
        tasks.wait().await;
    }
    info!(tls = https, "proxy stopped");
    accepted
}

/// Starts a worker thread per queue of `handoffs`, each with a single-threaded runtime
/// accepting on its own handle of `listener`; each receiver completes when that worker has
/// stopped accepting, with what its accept loop returned. A worker thread ends once every
/// connection of the listener has (its runtime drives its own).
fn spawn_workers(
    listener: &TcpListener,
    tls: &Option<tokio_rustls::TlsAcceptor>,
    slots: &Arc<Semaphore>,
    connections: &WorkerConnections,
    handoffs: Vec<mpsc::Receiver<Handoff>>,
    new_worker: impl Fn(usize) -> Arc<Worker>,
) -> io::Result<Vec<oneshot::Receiver<io::Result<()>>>> {
    let count = handoffs.len();
    // A duplicate of the descriptor per worker: the kernel hands each connection to one of
    // the threads waiting in accept.
    let handles = (0..count)
        .map(|_| {
            let fd = listener.as_fd().try_clone_to_owned()?;
            Ok(std::net::TcpListener::from(fd))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let runtimes = (0..count)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<_>>>()?;
    // `proxy-<port>-<n>`: within the 15 bytes Linux keeps of a thread's name, and it tells
    // the listeners apart in `top -H`.
    let port = listener.local_addr().map_or(0, |addr| addr.port());
    let mut finished = Vec::with_capacity(count);
    let threads = handles.into_iter().zip(runtimes).zip(handoffs).enumerate();
    for (index, ((handle, runtime), handoffs)) in threads {
        let (done, finished_rx) = oneshot::channel();
        let worker = new_worker(index);
        let tls = tls.clone();
        let slots = slots.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-{port}-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let accepted = match TcpListener::from_std(handle) {
                        Ok(listener) => {
                            accept_loop(worker.clone(), listener, tls, slots, handoffs).await
                        }
                        // This worker's event loop refused the socket; the others serve it.
                        Err(e) => {
                            warn!(error = %e, "a proxy worker cannot listen");
                            Ok(())
                        }
                    };
                    let _ = done.send(accepted);
                    worker.tasks.wait().await;
                });
            });
        match spawned {
            Ok(_) => finished.push(finished_rx),
            // The workers already running serve the listener alone.
            Err(e) if !finished.is_empty() => {
                warn!(error = %e, started = finished.len(), "cannot start every proxy worker thread");
                connections.set_running(finished.len());
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(finished)
}

/// Accepts connections on `listener` until shutdown, and takes those other workers hand over
/// on `handoffs`; one task each on the current runtime. A connection accepted while this
/// worker holds more than [`ACCEPT_BALANCE_SLACK`] connections over the least busy one goes to
/// that one instead. An `accept` error that means the listener is broken stops every worker of
/// the listener (their shared stop token) and is returned; any other is retried.
async fn accept_loop(
    worker: Arc<Worker>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    mut handoffs: mpsc::Receiver<Handoff>,
) -> io::Result<()> {
    let shutdown = worker.shutdown.clone();
    let mut broken = None;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(handoff) = handoffs.recv() => {
                take_over(&worker, &tls, handoff);
                continue;
            }
            accepted = accept(&listener, &slots) => accepted,
        };
        let (tcp, peer, permit) = match accepted {
            Ok(accepted) => accepted,
            Err(None) => break,
            Err(Some(e)) if accept_error_is_fatal(&e) => {
                warn!(error = %e, "the proxy's listener no longer accepts connections; stopping it");
                shutdown.cancel();
                broken = Some(e);
                break;
            }
            Err(Some(e)) => {
                warn!(error = %e, "accepting a connection failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tcp, permit) = match worker
            .connections
            .less_busy(worker.index, ACCEPT_BALANCE_SLACK)
        {
            Some(other) => match hand_off(&worker, other, tcp, peer, permit) {
                Ok(()) => continue,
                Err(kept) => kept,
            },
            None => (tcp, permit),
        };
        let slot = Slot {
            _permit: permit,
            _open: worker.connections.opened(worker.index),
        };
        serve_connection(&worker, &tls, tcp, peer, slot);
    }
    // Connections handed over just before the end are served like any accepted one: they are
    // answered or closed by the drain, never dropped unanswered.
    handoffs.close();
    while let Ok(handoff) = handoffs.try_recv() {
        take_over(&worker, &tls, handoff);
    }
    broken.map_or(Ok(()), Err)
}

/// The next connection with its slot under [`MAX_CONNECTIONS`]; `Err(None)` once the slots
/// are closed. Cancel-safe: dropped before a connection arrives, it has accepted nothing.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Result<(TcpStream, SocketAddr, OwnedSemaphorePermit), Option<io::Error>> {
    let permit = slots.clone().acquire_owned().await.map_err(|_| None)?;
    let (tcp, peer) = listener.accept().await.map_err(Some)?;
    Ok((tcp, peer, permit))
}

/// Passes `tcp` to worker `other`, counted as its connection. When that is not possible (no
/// descriptor left for the handle, the worker's queue full or gone), gives the connection back
/// for this worker to serve.
fn hand_off(
    worker: &Worker,
    other: usize,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> Result<(), (TcpStream, OwnedSemaphorePermit)> {
    // A handle of the socket of its own, rather than `into_std`, so that a failure leaves
    // `tcp` as it was. Dropping `tcp` then only deregisters it from this worker's loop.
    let Ok(handle) = tcp.as_fd().try_clone_to_owned() else {
        return Err((tcp, permit));
    };
    let handoff = Handoff {
        tcp: std::net::TcpStream::from(handle),
        peer,
        slot: Slot {
            _permit: permit,
            _open: worker.connections.opened(other),
        },
    };
    match worker.handoffs[other].try_send(handoff) {
        Ok(()) => Ok(()),
        Err(refused) => Err((tcp, refused.into_inner().slot._permit)),
    }
}

/// Serves a connection another worker accepted for this one.
fn take_over(worker: &Arc<Worker>, tls: &Option<tokio_rustls::TlsAcceptor>, handoff: Handoff) {
    match TcpStream::from_std(handoff.tcp) {
        Ok(tcp) => serve_connection(worker, tls, tcp, handoff.peer, handoff.slot),
        Err(e) => warn!(peer = %handoff.peer, error = %e, "cannot take over a connection"),
    }
}

/// Starts the task of one accepted connection: the TLS handshake if any, then [`connection`].
fn serve_connection(
    worker: &Arc<Worker>,
    tls: &Option<tokio_rustls::TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let worker2 = worker.clone();
    match tls {
        None => {
            worker
                .tasks
                .spawn(connection(worker2, tcp, peer, slot, Protocol::Http1));
        }
        Some(acceptor) => {
            let handshake_timeout = worker.proxy.settings.header_read_timeout;
            let accept = acceptor.accept(tcp);
            worker.tasks.spawn(async move {
                let stream = tokio::select! {
                    stream = tokio::time::timeout(handshake_timeout, accept) => stream,
                    () = worker2.force.cancelled() => return,
                };
                match stream {
                    Ok(Ok(stream)) => {
                        let protocol = Protocol::negotiated(stream.get_ref().1.alpn_protocol());
                        connection(worker2, stream, peer, slot, protocol).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "tls handshake failed"),
                    Err(_) => debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    }
}

/// Serves one client connection in `protocol` until it closes, is idle too long, or shutdown
/// ends it.
async fn connection<IO>(ctx: Arc<Worker>, io: IO, peer: SocketAddr, slot: Slot, protocol: Protocol)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let state = Arc::new(Conn {
        worker: ctx.clone(),
        // An IP address always makes a valid header value.
        peer_ip: HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        activity: activity.clone(),
        _slot: slot,
    });
    let service = service_fn(move |req| handle::handle(state.clone(), req));
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
    });
    match protocol {
        Protocol::Http1 => {
            let conn = ctx.builders.http1.serve_connection(io, service);
            drive(&ctx, conn.with_upgrades(), &activity, peer, protocol).await;
        }
        Protocol::Http2 => {
            let conn = ctx.builders.http2.serve_connection(io, service);
            drive(&ctx, conn, &activity, peer, protocol).await;
        }
    }
}

/// Runs a served connection to its end, closing it gracefully when the drain begins: an idle
/// HTTP/1.1 connection at once and a busy one after its response (one that has not sent its
/// first request yet gets [`FIRST_REQUEST_GRACE`] to do so); an HTTP/2 connection at once with
/// a GOAWAY, which lets every request already sent finish and tells the client to send the
/// next ones elsewhere. An HTTP/2 connection that sends no request within the header read
/// timeout is closed, as HTTP/1.1's header timer closes a silent one.
async fn drive<C: Graceful>(
    ctx: &Worker,
    conn: C,
    activity: &Activity,
    peer: SocketAddr,
    protocol: Protocol,
) {
    let mut conn = pin!(conn);
    let idle = ctx.proxy.settings.idle_timeout;
    let first_request = ctx.proxy.settings.header_read_timeout;
    let mut first_request_due = pin!(tokio::time::sleep(first_request));
    let mut waiting_for_request = protocol == Protocol::Http2;
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
                if protocol == Protocol::Http2 || activity.answered() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = activity.first_answer(FIRST_REQUEST_GRACE), if draining && !closing => {
                // Answered its first request (or never sent one): close after it.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut first_request_due, if waiting_for_request => {
                if !activity.requested() {
                    debug!(%peer, "closing an HTTP/2 connection with no request for {first_request:?}");
                    return;
                }
                waiting_for_request = false;
            }
            () = ctx.force.cancelled() => return,
            () = activity.idle(idle) => {
                debug!(%peer, "closing a connection idle for {idle:?}");
                return;
            }
        }
    }
}
