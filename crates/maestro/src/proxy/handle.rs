//! One request: find the app by host, answer redirects to HTTPS, static files and failures
//! itself, or forward to an instance over HTTP/1.1 whatever the client spoke (retrying a
//! bodiless GET/HEAD once), pass upgrades through, add the app's HSTS header to HTTPS
//! answers, and record the outcome in metrics and the access log.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::body::{Body as _, Incoming};
use hyper::header::{
    CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, HeaderValue, STRICT_TRANSPORT_SECURITY,
    TRANSFER_ENCODING,
};
use hyper::http::uri::PathAndQuery;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use px_runtime::errors::error_chain;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, warn};

use super::Proxy;
use super::access::AccessRecord;
use super::body::{
    BodyTooLarge, PendingRecord, ProxyBody, ReadWholeError, UpstreamBody, read_whole,
};
use super::drain;
use super::headers::{self, X_REQUEST_ID};
use super::https;
use super::pages::{Failure, page};
use super::protocol::version_name;
use super::server::Conn;
use super::static_files;
use super::upstream::{Lease, UpstreamError};
use crate::routes::{AppRoute, Backend, InFlight};

/// Bytes read from an instance per read on an upgraded connection.
const TUNNEL_BUFFER_BYTES: usize = 16 * 1024;

pub(crate) async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    Ok(respond(&conn, req).await)
}

/// What finishing a response needs to know about its request.
struct Exchange<'a> {
    conn: &'a Arc<Conn>,
    started: Instant,
    request_id: HeaderValue,
    host: &'a str,
    pending: Option<Box<PendingRecord>>,
    /// The app's `Strict-Transport-Security` value, on the HTTPS listener only.
    hsts: Option<HeaderValue>,
}

impl Exchange<'_> {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// Stamps the request id, counts the response, and hands the body what must live as long
    /// as it: the instance's in-flight guard and the access record.
    fn finish(
        self,
        mut response: Response<ProxyBody>,
        app: &str,
        upstream: Option<SocketAddr>,
        guard: Option<InFlight>,
    ) -> Response<ProxyBody> {
        let status = response.status().as_u16();
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, self.request_id);
        if let Some(hsts) = self.hsts {
            response
                .headers_mut()
                .insert(STRICT_TRANSPORT_SECURITY, hsts);
        }
        self.conn
            .worker
            .proxy
            .metrics
            .record(app, status, self.started.elapsed());
        let body = response.body_mut();
        if let Some(mut pending) = self.pending {
            pending.record.status = status;
            pending.record.upstream = upstream;
            body.log_on_end(pending);
        }
        if let Some(guard) = guard {
            body.hold(guard);
        }
        response
    }
}

async fn respond(conn: &Arc<Conn>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    conn.activity.request();
    let proxy = &conn.worker.proxy;
    let settings = &proxy.settings;
    let request_id = headers::request_id(req.headers(), settings.trusted_forwarded);
    proxy.metrics.record_version(req.version());

    // RFC 9112 §3.2.2: for an absolute-form target, its authority is the host.
    if let Some(authority) = req.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(HOST, value);
    }
    let host_value = req.headers().get(HOST).cloned();
    let host = host_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Keep only this app's route, not the whole table: the supervisor stops an old instance
    // once nothing holds its backend, so a request must not pin every app's old routes.
    let route = proxy.routes.load().lookup(host).cloned();

    let pending = proxy.access.enabled().then(|| {
        Box::new(PendingRecord {
            record: AccessRecord {
                at: SystemTime::now(),
                host: host_value
                    .clone()
                    .filter(|_| !host.is_empty())
                    .unwrap_or_else(|| HeaderValue::from_static("")),
                method: req.method().clone(),
                // The origin form, as HTTP/1.1 sends it, whatever form the client used.
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| req.uri().clone(), |pq| Uri::from(pq.clone())),
                status: 0,
                bytes: 0,
                duration: Duration::ZERO,
                upstream: None,
                request_id: request_id.clone(),
                app: route.as_ref().map(|r| r.app.clone()),
                protocol: version_name(req.version()),
            },
            started,
            log: proxy.access.clone(),
        })
    });
    let exchange = Exchange {
        conn,
        started,
        request_id,
        host,
        pending,
        hsts: route
            .as_ref()
            .filter(|_| conn.worker.https)
            .and_then(|route| route.https.hsts.clone()),
    };

    // The CA's HTTP-01 check comes first, for any host and before any redirect: the name may
    // not route yet, and the CA follows no redirect to a listener that has no certificate.
    if let Some(token) = req.uri().path().strip_prefix(super::acme::HTTP01_PREFIX)
        && matches!(*req.method(), Method::GET | Method::HEAD)
        && let Some(key_authorization) = proxy.acme.http01(token)
    {
        let mut response = Response::new(ProxyBody::full(key_authorization.into()));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let app = route.as_ref().map_or("", |r| &*r.app).to_string();
        return exchange.finish(response, &app, None, None);
    }
    let Some(route) = route else {
        let response = page(Failure::UnknownHost, host, "", exchange.request_id());
        return exchange.finish(response, "", None, None);
    };
    let app = &*route.app;
    // Only origin-form targets reach an app: no CONNECT tunnels, no `OPTIONS *`.
    if req.method() == Method::CONNECT || !req.uri().path().starts_with('/') {
        let response = page(Failure::BadRequest, host, app, exchange.request_id());
        return exchange.finish(response, app, None, None);
    }
    if !conn.worker.https && https::redirects(proxy, &route, host, req.uri().path()) {
        let response = https::redirect(host, proxy.settings.https_redirect_port, req.uri());
        return exchange.finish(response, app, None, None);
    }
    if let Some((dir, rest)) = static_files::matching(&route.static_dirs, req.uri().path()) {
        let target = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let response =
            match static_files::serve(dir, rest, target, req.method(), req.headers()).await {
                Ok(response) => response,
                Err(failure) => page(failure, host, app, exchange.request_id()),
            };
        return exchange.finish(response, app, None, None);
    }
    forward(exchange, &route, req, host_value.as_ref()).await
}

/// Sends the request to an instance of `route` and answers with what it says.
async fn forward(
    exchange: Exchange<'_>,
    route: &AppRoute,
    mut req: Request<Incoming>,
    host_value: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let conn = exchange.conn;
    let proxy = &conn.worker.proxy;
    let settings = &proxy.settings;
    let app = &*route.app;
    let Some(mut backend) = route.pick() else {
        let response = page(
            Failure::NoInstance,
            exchange.host,
            app,
            exchange.request_id(),
        );
        return exchange.finish(response, app, None, None);
    };

    let upgrade = if req.version() == Version::HTTP_11 {
        headers::upgrade_request(req.headers())
    } else {
        None
    };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let mut headers = parts.headers;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    headers::strip_hop_by_hop(&mut headers, upgrade);
    // The proxy's own HTTP server answers `100-continue` when the body is first read.
    headers.remove(EXPECT);
    let proto = if conn.worker.https { "https" } else { "http" };
    headers::set_forwarded(
        &mut headers,
        &conn.peer_ip,
        proto,
        host_value,
        settings.trusted_forwarded,
    );
    headers.insert(&X_REQUEST_ID, exchange.request_id.clone());

    // A body over the app's limit is refused before the app sees the request when its length
    // is declared, and cut off at the limit when it is not.
    let policy = route.bodies;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > policy.max_bytes) {
        let response = page(
            Failure::BodyTooLarge,
            exchange.host,
            app,
            exchange.request_id(),
        );
        return exchange.finish(response, app, None, None);
    }
    // A GET or HEAD without a body can be sent again if the first instance fails before
    // answering: keep a copy of its headers for that.
    let bodiless = (method == Method::GET || method == Method::HEAD)
        && body.is_end_stream()
        && client_upgrade.is_none();
    let mut body = if body.is_end_stream() {
        UpstreamBody::Empty
    } else if policy.buffer && client_upgrade.is_none() {
        match read_whole(body, policy.max_bytes, settings.body_read_timeout).await {
            Ok(bytes) => {
                headers.remove(TRANSFER_ENCODING);
                headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                UpstreamBody::Buffered(Some(bytes))
            }
            Err(error) => {
                let failure = match error {
                    ReadWholeError::TooLarge => Failure::BodyTooLarge,
                    ReadWholeError::TimedOut => Failure::BodyTimeout,
                    ReadWholeError::Aborted => Failure::BodyAborted,
                };
                let response = page(failure, exchange.host, app, exchange.request_id());
                return exchange.finish(response, app, None, None);
            }
        }
    } else {
        UpstreamBody::Client {
            body,
            left: policy.max_bytes,
        }
    };
    let mut spare = bodiless.then(|| headers.clone());
    let deadline = tokio::time::Instant::from_std(exchange.started) + settings.request_timeout;

    loop {
        let addr = backend.addr;
        let mut upstream = Request::new(body);
        *upstream.method_mut() = method.clone();
        // The origin form, as it goes on the wire; an HTTP/1.0 client may have sent no `Host`,
        // and the instance gets its own address then.
        *upstream.uri_mut() = Uri::from(path_and_query.clone());
        if !headers.contains_key(HOST)
            && let Some(authority) = backend.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(HOST, value);
        }
        *upstream.headers_mut() = headers;
        let guard = backend.begin();
        let failure = match tokio::time::timeout_at(
            deadline,
            conn.worker.upstream.send(addr, upstream),
        )
        .await
        {
            Ok(Ok((response, lease))) => {
                backend.stats.record(response.status().as_u16());
                return answer(exchange, app, response, client_upgrade, guard, lease, addr);
            }
            Err(_) => {
                warn!(app, backend = %addr, "instance did not answer within {:?}", settings.request_timeout);
                Failure::Timeout
            }
            Ok(Err(e)) => {
                let failure = classify(&e);
                if failure == Failure::Unreachable
                    && let Some(copy) = spare.take()
                {
                    debug!(app, backend = %addr, error = %error_chain(&e), "retrying on the next instance");
                    drop(guard);
                    headers = copy;
                    body = UpstreamBody::Empty;
                    if let Some(next) = retry_backend(proxy, exchange.host, route, addr) {
                        backend = next;
                    }
                    continue;
                }
                // The client's own doing: not the instance's failure.
                if !matches!(failure, Failure::BodyAborted | Failure::BodyTooLarge) {
                    warn!(app, backend = %addr, error = %error_chain(&e), "request to instance failed");
                }
                failure
            }
        };
        let response = page(failure, exchange.host, app, exchange.request_id());
        backend.stats.record(response.status().as_u16());
        return exchange.finish(response, app, Some(addr), None);
    }
}

/// Another instance for a retry after `failed` could not be reached: from the current route
/// table first, since the failure is often a release switch that happened after this request
/// looked up its route (the old instance stopping), then from the request's own route. `None`
/// when only `failed` is left.
fn retry_backend(
    proxy: &Proxy,
    host: &str,
    route: &AppRoute,
    failed: SocketAddr,
) -> Option<Arc<Backend>> {
    let current = proxy
        .routes
        .load()
        .lookup(host)
        .filter(|r| r.app == route.app)
        .cloned();
    for candidate in current.iter().map(|r| &**r).chain([route]) {
        // Round robin may hand the same instance back under concurrency.
        for _ in 0..candidate.backends.len() {
            if let Some(next) = candidate.pick()
                && next.addr != failed
            {
                return Some(next);
            }
        }
    }
    None
}

/// The instance's answer, passed on: hop-by-hop headers go, the body streams with the guard;
/// a 101 to an upgrade request joins the two connections.
fn answer(
    exchange: Exchange<'_>,
    app: &str,
    mut response: Response<Incoming>,
    client_upgrade: Option<OnUpgrade>,
    guard: InFlight,
    lease: Lease,
    addr: SocketAddr,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upgrade = response.headers().get(hyper::header::UPGRADE).cloned();
        let (Some(client), Some(protocol)) = (client_upgrade, upgrade) else {
            warn!(app, backend = %addr, "instance switched protocols unasked");
            let page = page(
                Failure::BadAnswer,
                exchange.host,
                app,
                exchange.request_id(),
            );
            return exchange.finish(page, app, Some(addr), None);
        };
        let upstream = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let websocket = protocol.as_bytes().eq_ignore_ascii_case(b"websocket");
        headers::strip_hop_by_hop(&mut parts.headers, Some(protocol));
        exchange.conn.worker.tasks.spawn(tunnel(
            client,
            upstream,
            (guard, lease),
            exchange.conn.clone(),
            websocket,
        ));
        let response = Response::from_parts(parts, ProxyBody::empty());
        return exchange.finish(response, app, Some(addr), None);
    }
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, None);
    parts.version = Version::HTTP_11;
    let event_stream = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        });
    // A stream with a length cannot end early with an event of its own.
    let mut body = if event_stream && !parts.headers.contains_key(CONTENT_LENGTH) {
        ProxyBody::event_stream(body, guard.backend())
    } else {
        ProxyBody::upstream(body)
    };
    body.give_back_at_end(lease);
    let response = Response::from_parts(parts, body);
    exchange.finish(response, app, Some(addr), Some(guard))
}

/// Copies bytes both ways between an upgraded client and instance until either closes, the
/// connection idles out, or the instance is drained; the instance counts it as in flight all
/// along, and it keeps its client connection's slot. On a drain it closes at its own moment
/// of the budget: a WebSocket with a 1012 close frame sent to the client between two frames
/// of the instance, anything else by closing both sides; still open at the deadline, it is cut.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    (guard, lease): (InFlight, Lease),
    conn: Arc<Conn>,
    websocket: bool,
) {
    let backend = guard.backend().clone();
    let _guard = guard;
    // The instance connection is the tunnel's now, never to be pooled again.
    let _lease = lease;
    let long_lived = backend.long_lived();
    let idle = conn.worker.proxy.settings.idle_timeout;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(upstream));
    let to_upstream = tokio::io::copy(&mut client_read, &mut upstream_write);
    tokio::pin!(to_upstream);
    let turn = drain::turn(backend.drain_order());
    tokio::pin!(turn);
    let mut frames = drain::WebSocketFrames::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut buf = vec![0u8; TUNNEL_BUFFER_BYTES];
    loop {
        if deadline.is_some() && (!websocket || frames.at_boundary()) {
            if websocket {
                let _ = client_write
                    .write_all(&drain::websocket_close_frame())
                    .await;
            }
            let _ = client_write.shutdown().await;
            long_lived.closed_for_drain();
            return;
        }
        tokio::select! {
            read = upstream_read.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if websocket {
                        frames.feed(&buf[..n]);
                    }
                }
            },
            copied = &mut to_upstream => {
                if let Err(e) = copied {
                    debug!(error = %e, "upgraded connection ended with an error");
                }
                break;
            }
            at = &mut turn, if deadline.is_none() => deadline = Some(at),
            () = sleep_until_some(deadline) => {
                debug!("cutting an upgraded connection still open at the drain deadline");
                long_lived.cut();
                return;
            }
            () = conn.activity.idle(idle) => {
                debug!("closing an upgraded connection idle for {idle:?}");
                break;
            }
            () = conn.worker.force.cancelled() => break,
        }
    }
    let _ = client_write.shutdown().await;
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a failed exchange with an instance means for the client.
fn classify(error: &UpstreamError) -> Failure {
    let hyper = match error {
        UpstreamError::Connect(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            return Failure::Timeout;
        }
        UpstreamError::Connect(_) => return Failure::Unreachable,
        UpstreamError::Http(hyper) => hyper,
    };
    let mut source = hyper.source();
    while let Some(cause) = source {
        if cause.is::<BodyTooLarge>() {
            return Failure::BodyTooLarge;
        }
        source = cause.source();
    }
    if hyper.is_user() && hyper.source().is_some() {
        // A user error with a cause is the request body stream failing: the client went away
        // or sent a broken chunked body.
        return Failure::BodyAborted;
    }
    if hyper.is_timeout() {
        return Failure::Timeout;
    }
    if hyper.is_parse() {
        return Failure::BadAnswer;
    }
    let mut source = hyper.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return Failure::Timeout;
        }
        source = cause.source();
    }
    Failure::Unreachable
}
