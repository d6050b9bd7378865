//! HTTP/2 to clients on the proxy's TLS listener (chosen by ALPN, the same limits, drain,
//! metrics and access log as HTTP/1.1), `h2c` refused on the plain listener, and the redirect
//! to HTTPS and HSTS per app: real app instances on loopback, the real proxy on both
//! listeners, hyper's HTTP/2 client, reqwest and curl as clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common_proxy;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common_proxy::*;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use px_maestro::internals::{
    AccessLog, BodyPolicy, CertStore, H2_MAX_CONCURRENT_STREAMS, HttpsPolicy, Proxy, ProxyError,
    ProxyMetrics, ProxySettings, RouteTable, Routes,
};
use px_test_support::Pki;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type ClientBody = BoxBody<Bytes, Infallible>;

/// The proxy with both listeners, its certificates read from `certs`.
struct Both {
    http: SocketAddr,
    https: SocketAddr,
    routes: Arc<Routes>,
    metrics: Arc<ProxyMetrics>,
    certs: Arc<CertStore>,
    shutdown: CancellationToken,
    https_task: Option<JoinHandle<Result<(), ProxyError>>>,
}

impl Drop for Both {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Both {
    async fn start(
        table: RouteTable,
        certs: &Path,
        settings: ProxySettings,
        access: AccessLog,
    ) -> Self {
        let routes = Arc::new(Routes::default());
        routes.store(table);
        let metrics = Arc::new(ProxyMetrics::default());
        let proxy = Proxy::new(routes.clone(), settings, metrics.clone(), access);
        let certs = CertStore::load(certs).unwrap();
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http, https) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(proxy.clone().serve_http(plain, shutdown.clone()));
        let https_task = tokio::spawn(proxy.serve_https(tls, certs.clone(), shutdown.clone()));
        Self {
            http,
            https,
            routes,
            metrics,
            certs,
            shutdown,
            https_task: Some(https_task),
        }
    }

    /// A plain-HTTP reqwest client (redirects not followed) sending `hosts` to the proxy.
    fn client(&self, hosts: &[&str]) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        for host in hosts {
            builder = builder.resolve(host, self.http);
        }
        builder.build().unwrap()
    }

    fn plain_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http.port())
    }
}

/// A directory of certificates, one `<name>.crt`/`.key` pair per entry of `files`, all of the
/// one certificate `pki` (made for every name the test uses).
fn cert_dir(pki: &Pki, files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in files {
        std::fs::copy(pki.cert(), dir.path().join(format!("{file}.crt"))).unwrap();
        std::fs::copy(pki.key(), dir.path().join(format!("{file}.key"))).unwrap();
    }
    dir
}

/// A TLS connection to `addr` for `host`, offering `alpn`; returns it with what was chosen.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    host: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    let mut config = (*px_runtime::tls::client_config(ca).unwrap()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = px_runtime::tls::server_name(host).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let chosen = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (stream, chosen)
}

/// An HTTP/2 connection to the proxy's TLS listener, checked to have been chosen by ALPN, and
/// the task driving it (it ends when the proxy closes the connection).
async fn h2(
    addr: SocketAddr,
    ca: &Path,
    host: &str,
) -> (
    SendRequest<ClientBody>,
    JoinHandle<Result<(), hyper::Error>>,
) {
    let (stream, chosen) = tls_connect(addr, ca, host, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        chosen.as_deref(),
        Some(&b"h2"[..]),
        "ALPN did not choose h2"
    );
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

fn get(host: &str, path: &str) -> Request<ClientBody> {
    Request::get(format!("https://{host}{path}"))
        .body(Empty::new().boxed())
        .unwrap()
}

async fn send(
    client: &mut SendRequest<ClientBody>,
    request: Request<ClientBody>,
) -> (Response<()>, Bytes) {
    client.ready().await.unwrap();
    let response = client.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), body)
}

fn one(host: &str, app: &Upstream) -> RouteTable {
    table(&[(host, route("app", vec![backend("app", app)], vec![]))])
}

#[tokio::test]
async fn http2_is_chosen_by_alpn_and_reaches_the_app_over_http1() {
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let (access, mut records) = AccessLog::new(16);
    let proxy = Both::start(
        one("app.test", &app),
        certs.path(),
        ProxySettings::default(),
        access,
    )
    .await;

    let (mut client, _conn) = h2(proxy.https, &pki.ca(), "app.test").await;
    let (response, body) = send(&mut client, get("app.test", "/headers?x=1")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert!(response.headers().contains_key("x-request-id"));
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // The app got an HTTP/1.1 request (its server speaks nothing else) in origin form, with
    // `:authority` as its Host and no HTTP/2 pseudo-header or connection header.
    assert_eq!(seen["server"], "app");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["target"], "/headers?x=1");
    assert_eq!(seen["headers"]["host"], "app.test");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["headers"]["x-forwarded-host"], "app.test");
    let names: Vec<&str> = seen["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with(':') && *n != "connection" && *n != "te"),
        "{names:?}"
    );

    assert_eq!(proxy.metrics.requests_in("HTTP/2.0"), 1);
    assert!(
        proxy
            .metrics
            .render()
            .contains("maestro_requests_by_protocol_total{protocol=\"HTTP/2.0\"} 1")
    );
    let record = records.recv().await.unwrap();
    assert_eq!((record.status, record.protocol), (200, "HTTP/2.0"));
    assert_eq!(record.path, "/headers?x=1");
    assert_eq!(record.host, "app.test");

    // A client that offers only HTTP/1.1 is served in HTTP/1.1 on the same listener.
    let (mut tls, chosen) = tls_connect(proxy.https, &pki.ca(), "app.test", &[b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    tls.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from app"), "{answer}");
    assert_eq!(records.recv().await.unwrap().protocol, "HTTP/1.1");
}

/// Runs curl with `args` against the proxy's TLS listener for `app.test`; returns its output.
async fn curl(proxy: &Both, pki: &Pki, args: &[&str]) -> String {
    let resolve = format!("app.test:{}:127.0.0.1", proxy.https.port());
    let output = tokio::process::Command::new("curl")
        .args(["--http2", "-sS", "--cacert"])
        .arg(pki.ca())
        .args(["--resolve", &resolve])
        .args(args)
        .output()
        .await
        .expect("curl (Debian's, with HTTP/2) is installed by scripts/install-test-tools");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn curl_speaks_http2_through_the_proxy_within_the_same_limits() {
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let table = table(&[(
        "app.test",
        Arc::new(
            px_maestro::internals::AppRoute::new("app", 1, vec![backend("app", &app)], vec![])
                .with_bodies(BodyPolicy {
                    max_bytes: 1024,
                    buffer: false,
                }),
        ),
    )]);
    let settings = ProxySettings {
        max_header_bytes: 16 * 1024,
        ..ProxySettings::default()
    };
    let proxy = Both::start(table, certs.path(), settings, AccessLog::disabled()).await;
    let url = format!("https://app.test:{}", proxy.https.port());

    let out = curl(
        &proxy,
        &pki,
        &["-w", "\n%{http_version}", &format!("{url}/")],
    )
    .await;
    assert_eq!(out, "hello from app\n2");

    let small = "x".repeat(100);
    let out = curl(&proxy, &pki, &["-d", &small, &format!("{url}/upload")]).await;
    let seen: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(seen["len"], 100);

    // A body over the app's limit gets 413 (one of unknown length is cut off at the limit: see
    // the next test).
    let large = "x".repeat(4096);
    let status = ["-o", "/dev/null", "-w", "%{http_code} %{http_version}"];
    let out = curl(
        &proxy,
        &pki,
        &[&status[..], &["-d", &large, &format!("{url}/upload")]].concat(),
    )
    .await;
    assert_eq!(out, "413 2");

    // A header list over the limit gets 431, as an HTTP/1.1 head over it does.
    let big = format!("X-Big: {}", "y".repeat(32 * 1024));
    let out = curl(
        &proxy,
        &pki,
        &[&status[..], &["-H", &big, &format!("{url}/")]].concat(),
    )
    .await;
    assert_eq!(out, "431 2");
    // The connection's other requests are unharmed.
    let out = curl(&proxy, &pki, &[&format!("{url}/")]).await;
    assert_eq!(out, "hello from app");
}

#[tokio::test]
async fn bodies_stream_to_the_app_and_are_cut_at_its_limit_over_http2() {
    const LIMIT: u64 = 64 * 1024;
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let table = table(&[(
        "app.test",
        Arc::new(
            px_maestro::internals::AppRoute::new("app", 1, vec![backend("app", &app)], vec![])
                .with_bodies(BodyPolicy {
                    max_bytes: LIMIT,
                    buffer: false,
                }),
        ),
    )]);
    let proxy = Both::start(
        table,
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    let (mut client, _conn) = h2(proxy.https, &pki.ca(), "app.test").await;
    let post = |body: ClientBody| Request::post("https://app.test/upload").body(body).unwrap();
    let streamed = |pieces: usize| -> ClientBody {
        let chunks =
            futures_util::stream::iter((0..pieces).map(|_| {
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![7u8; 8192])))
            }));
        StreamBody::new(chunks).boxed()
    };

    // Within the limit, a body of unknown length arrives whole.
    let (response, body) = send(&mut client, post(streamed(4))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["len"], 4 * 8192);
    assert_eq!(
        seen["sha256"],
        hex::encode(Sha256::digest(vec![7u8; 4 * 8192]))
    );

    // Over it: refused before the app sees it when the length is declared...
    let declared = Full::new(Bytes::from(vec![1u8; 2 * LIMIT as usize])).boxed();
    let (response, _) = send(&mut client, post(declared)).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // ...and cut off at the limit when it is not.
    let (response, _) = send(&mut client, post(streamed(16))).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The connection goes on.
    let (response, body) = send(&mut client, get("app.test", "/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, "hello from app");
}

#[tokio::test]
async fn more_concurrent_streams_than_the_limit_all_complete_on_one_connection() {
    let requests = 2 * H2_MAX_CONCURRENT_STREAMS as usize + 10;
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let proxy = Both::start(
        one("app.test", &app),
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    let (client, _conn) = h2(proxy.https, &pki.ca(), "app.test").await;
    let all = (0..requests).map(|i| {
        let mut client = client.clone();
        async move { send(&mut client, get("app.test", &format!("/n{i}"))).await }
    });
    let answers = futures_util::future::join_all(all).await;
    for (response, body) in &answers {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, "hello from app");
    }
    assert_eq!(app.paths.lock().unwrap().len(), requests);
    assert_eq!(proxy.metrics.requests_in("HTTP/2.0"), requests as u64);
    // One client connection carried them all.
    assert_eq!(
        proxy
            .metrics
            .open_connections("https")
            .iter()
            .sum::<usize>(),
        1
    );
}

#[tokio::test]
async fn a_deploy_and_then_a_shutdown_fail_no_http2_request() {
    const PARALLEL: usize = 8;
    /// Answers from the new release each loop waits for before it stops.
    const AFTER_SWITCH: usize = 5;
    /// Bound on each loop's requests, so a switch that never shows fails rather than hangs.
    const MAX_ROUNDS: usize = 5_000;
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let mut proxy = Both::start(
        one("app.test", &old),
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    let (client, conn) = h2(proxy.https, &pki.ca(), "app.test").await;

    // Requests keep flowing on one connection while the route switches to the new release,
    // as a deploy switches it; every one is answered by one release or the other.
    let loops = (0..PARALLEL).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut servers = Vec::new();
            let mut after_switch = 0;
            while after_switch < AFTER_SWITCH {
                assert!(servers.len() < MAX_ROUNDS, "the new release never answered");
                let (response, body) = send(&mut client, get("app.test", "/")).await;
                assert_eq!(response.status(), StatusCode::OK);
                let server = String::from_utf8(body.to_vec()).unwrap();
                after_switch += usize::from(server == "hello from new");
                servers.push(server);
            }
            servers
        })
    });
    let loops: Vec<_> = loops.collect();
    eventually("the first requests reached the old release", || {
        !old.paths.lock().unwrap().is_empty()
    })
    .await;
    proxy.routes.store(one("app.test", &new));
    let mut servers = Vec::new();
    for done in loops {
        servers.extend(done.await.unwrap());
    }
    assert!(
        servers
            .iter()
            .all(|s| s == "hello from old" || s == "hello from new")
    );
    assert!(servers.iter().any(|s| s == "hello from old"));

    // Shutdown with a response in flight: the connection gets a GOAWAY, the response still
    // finishes whole, then the connection closes cleanly and the listener's drain ends.
    let mut streaming = client.clone();
    streaming.ready().await.unwrap();
    let response = streaming
        .send_request(get("app.test", "/stream"))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first chunk\n");
    proxy.shutdown.cancel();
    new.release();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last chunk\n");
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the proxy never closed the HTTP/2 connection after its drain")
        .unwrap()
        .expect("the HTTP/2 connection did not close cleanly");
    let served = tokio::time::timeout(PATIENCE, proxy.https_task.take().unwrap())
        .await
        .expect("the HTTPS listener never finished its drain");
    served.unwrap().unwrap();
}

#[tokio::test]
async fn an_http2_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let settings = ProxySettings {
        header_read_timeout: Duration::from_millis(300),
        ..ProxySettings::default()
    };
    let proxy = Both::start(
        one("app.test", &app),
        certs.path(),
        settings,
        AccessLog::disabled(),
    )
    .await;
    let (_client, conn) = h2(proxy.https, &pki.ca(), "app.test").await;
    let closed = tokio::time::timeout(PATIENCE, conn).await;
    assert!(
        closed.is_ok(),
        "a silent HTTP/2 connection was never closed"
    );
    eventually("the connection is no longer counted", || {
        proxy
            .metrics
            .open_connections("https")
            .iter()
            .sum::<usize>()
            == 0
    })
    .await;
}

#[tokio::test]
async fn h2c_is_refused_on_the_plain_listener() {
    let app = Upstream::start("app").await;
    let proxy = Harness::start(one_app(&app), ProxySettings::default()).await;

    // Prior knowledge: HTTP/2's preface straight away over plain TCP.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let handshake = hyper::client::conn::http2::handshake::<_, _, ClientBody>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await;
    // The client's side of the handshake needs no answer; its first request does.
    if let Ok((mut client, conn)) = handshake {
        let _conn = tokio::spawn(conn);
        let sent = async {
            client.ready().await?;
            client
                .send_request(
                    Request::get("http://app.localhost/")
                        .body(Empty::new().boxed())
                        .unwrap(),
                )
                .await
        };
        assert!(sent.await.is_err(), "an h2c request was answered");
    }

    // Upgrade from HTTP/1.1: answered in HTTP/1.1, and the app never sees the upgrade.
    let mut raw = proxy.raw().await;
    raw.send(
        b"GET /headers HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = raw.response().await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("upgrade"), None);
    let seen: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    assert!(
        !headers.contains_key("upgrade") && !headers.contains_key("http2-settings"),
        "{headers:?}"
    );
    assert_eq!(app.paths.lock().unwrap().as_slice(), ["/headers"]);
}

#[tokio::test]
async fn websockets_still_upgrade_over_tls_beside_http2() {
    // A minimal upstream: answers 101 to the upgrade, then echoes raw bytes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        tcp.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => tcp.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    let pki = Pki::new(&["ws.test"]).unwrap();
    let certs = cert_dir(&pki, &["ws.test"]);
    let instance = px_maestro::internals::Backend::new("ws", 1, addr);
    let proxy = Both::start(
        table(&[("ws.test", route("ws", vec![instance], vec![]))]),
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    // A browser opens a WebSocket on an HTTP/1.1 connection, since the proxy does not offer
    // WebSockets over HTTP/2 (RFC 8441).
    let (mut tls, chosen) = tls_connect(proxy.https, &pki.ca(), "ws.test", &[b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    tls.write_all(
        b"GET /socket HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tls.write_all(b"hello through the tunnel").await.unwrap();
    let mut echoed = [0u8; 24];
    tls.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello through the tunnel");
    drop(tls);
    echo.await.unwrap();
}

#[tokio::test]
async fn plain_http_redirects_to_https_once_the_host_has_a_certificate() {
    let app = Upstream::start("app").await;
    let names = ["app.test", "*.apps.test", "off.test", "fallback.test"];
    let pki = Pki::new(&names).unwrap();
    let certs = cert_dir(
        &pki,
        &["app.test", "_wildcard.apps.test", "off.test", "_default"],
    );
    let routed = |redirect: bool| {
        Arc::new(
            px_maestro::internals::AppRoute::new("app", 1, vec![backend("app", &app)], vec![])
                .with_https(HttpsPolicy {
                    redirect,
                    hsts: None,
                }),
        )
    };
    let table = table(&[
        ("app.test", routed(true)),
        ("one.apps.test", routed(true)),
        ("fallback.test", routed(true)),
        ("off.test", routed(false)),
    ]);
    let proxy = Both::start(
        table,
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    let client = proxy.client(&["app.test", "one.apps.test", "fallback.test", "off.test"]);

    // A certificate of its own: 308 to the same path and query over HTTPS, the method kept.
    let r = client
        .post(proxy.plain_url("app.test", "/login?next=%2Fhome"))
        .body("user=a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        "https://app.test/login?next=%2Fhome"
    );
    // A wildcard's certificate counts as the host's.
    let r = client
        .get(proxy.plain_url("one.apps.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://one.apps.test/");
    // Only the default certificate: a browser would refuse it, so plain HTTP is served.
    let r = client
        .get(proxy.plain_url("fallback.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The app turned the redirect off.
    let r = client
        .get(proxy.plain_url("off.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from app");
    // ACME's HTTP-01 challenges are never redirected.
    let challenge = "/.well-known/acme-challenge/token123";
    let r = client
        .get(proxy.plain_url("app.test", challenge))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 308);
    assert!(r.headers().get("location").is_none());
    // Nothing reached the app but the answered ones.
    assert_eq!(app.paths.lock().unwrap().len(), 3);

    // Once the host gets a certificate of its own (a reload), it is redirected.
    let own = Pki::new(&["fallback.test"]).unwrap();
    std::fs::copy(own.cert(), certs.path().join("fallback.test.crt")).unwrap();
    std::fs::copy(own.key(), certs.path().join("fallback.test.key")).unwrap();
    proxy.certs.reload().unwrap();
    let r = client
        .get(proxy.plain_url("fallback.test", "/a?b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://fallback.test/a?b");
}

#[tokio::test]
async fn hsts_is_added_to_the_https_answers_of_apps_that_ask_for_it() {
    const POLICY: &str = "max-age=31536000; includeSubDomains";
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["hsts.test", "app.test"]).unwrap();
    let certs = cert_dir(&pki, &["hsts.test", "app.test"]);
    let hsts = Arc::new(
        px_maestro::internals::AppRoute::new("hsts", 1, vec![backend("hsts", &app)], vec![])
            .with_https(HttpsPolicy {
                redirect: false,
                hsts: Some(hyper::header::HeaderValue::from_static(POLICY)),
            }),
    );
    let plain = route("app", vec![backend("app", &app)], vec![]);
    let table = table(&[("hsts.test", hsts), ("app.test", plain)]);
    let proxy = Both::start(
        table,
        certs.path(),
        ProxySettings::default(),
        AccessLog::disabled(),
    )
    .await;
    let client = proxy.client(&["hsts.test", "app.test"]);

    // Over HTTPS, in HTTP/1.1 and in HTTP/2.
    let (mut tls, _) = tls_connect(proxy.https, &pki.ca(), "hsts.test", &[b"http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: hsts.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains(&format!(
            "strict-transport-security: {}",
            POLICY.to_ascii_lowercase()
        )),
        "{answer}"
    );
    let (mut client2, _conn) = h2(proxy.https, &pki.ca(), "hsts.test").await;
    let (response, _) = send(&mut client2, get("hsts.test", "/")).await;
    assert_eq!(response.headers()["strict-transport-security"], POLICY);
    // An app that did not ask gets none.
    let (mut client3, _conn3) = h2(proxy.https, &pki.ca(), "app.test").await;
    let (response, _) = send(&mut client3, get("app.test", "/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("strict-transport-security"));
    // Never over plain HTTP (RFC 6797 §7.2).
    let r = client
        .get(proxy.plain_url("hsts.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("strict-transport-security").is_none());
}

#[tokio::test]
async fn an_app_that_turned_the_redirect_off_is_not_redirected_even_when_the_operator_redirects_all()
 {
    let app = Upstream::start("app").await;
    let off = Arc::new(
        px_maestro::internals::AppRoute::new("off", 1, vec![backend("off", &app)], vec![])
            .with_https(HttpsPolicy {
                redirect: false,
                hsts: None,
            }),
    );
    let on = route("app", vec![backend("app", &app)], vec![]);
    let proxy = Harness::start(
        table(&[("off.localhost", off), ("app.localhost", on)]),
        ProxySettings {
            https_redirect: true,
            ..ProxySettings::default()
        },
    )
    .await;
    let client = proxy.client(&["off.localhost", "app.localhost"]);
    let r = client
        .get(proxy.url("app.localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    let r = client
        .get(proxy.url("off.localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from app");
}

/// The browser on this machine, as Beacon's status page test finds it: absent, the test is
/// skipped unless `PX_REQUIRE_CHROMIUM` says it must run (scripts/install-test-tools installs it).
fn chromium() -> Option<String> {
    for name in ["chromium", "chromium-browser"] {
        if let Ok(out) = std::process::Command::new("which").arg(name).output()
            && out.status.success()
        {
            return Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
    }
    assert!(
        std::env::var_os("PX_REQUIRE_CHROMIUM").is_none(),
        "PX_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)"
    );
    eprintln!("SKIPPING the HTTP/2 browser test: chromium not found");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_loads_a_page_over_http2() {
    let Some(browser) = chromium() else { return };
    let app = Upstream::start("app").await;
    let pki = Pki::new(&["app.test"]).unwrap();
    let certs = cert_dir(&pki, &["app.test"]);
    let (access, mut records) = AccessLog::new(16);
    let proxy = Both::start(
        one("app.test", &app),
        certs.path(),
        ProxySettings::default(),
        access,
    )
    .await;
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The certificate is signed by the test's own CA, which this profile does not
            // hold; what the test looks at is the protocol and the page.
            "--ignore-certificate-errors",
            "--host-resolver-rules=MAP app.test 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("https://app.test:{}/page", proxy.https.port()))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("chromium did not finish within a minute")
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("hello from app"),
        "page: {dom}\nchromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record = loop {
        let record = tokio::time::timeout(PATIENCE, records.recv())
            .await
            .expect("the page's request was never logged")
            .unwrap();
        if record.path == "/page" {
            break record;
        }
    };
    assert_eq!((record.status, record.protocol), (200, "HTTP/2.0"));
}
