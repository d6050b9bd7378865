//! Helpers for the proxy tests: real upstream servers on loopback, a proxy on `127.0.0.1:0`,
//! and a raw HTTP/1.1 client for what reqwest would refuse to send.

#![allow(dead_code)] // each test binary uses a part of these helpers
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use px_maestro::internals::{
    AccessLog, AppRoute, Backend, Proxy, ProxyError, ProxyMetrics, ProxySettings, RouteTable,
    Routes,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Polls `check` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A small app instance. Paths:
/// - `/headers`: JSON with the method, target and headers it received;
/// - `/upload`: reads the body, answers JSON `{len, sha256}`;
/// - `/stream`: sends `first chunk\n`, waits for [`Upstream::release`], sends `last chunk\n`;
/// - `/stall`: never answers;
/// - anything else: `hello from <name>`.
pub struct Upstream {
    pub addr: SocketAddr,
    gate: Arc<Semaphore>,
    pub paths: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (name2, gate2, paths2) = (name.to_string(), gate.clone(), paths.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (name, gate, paths) = (name2.clone(), gate2.clone(), paths2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        serve(name.clone(), gate.clone(), paths.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            gate,
            paths,
            task,
        }
    }

    /// Lets one `/stream` response send its last chunk.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    pub fn saw(&self, path: &str) -> bool {
        self.paths.lock().unwrap().iter().any(|p| p == path)
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

async fn serve(
    name: String,
    gate: Arc<Semaphore>,
    paths: Arc<Mutex<Vec<String>>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    paths.lock().unwrap().push(req.uri().path().to_string());
    let body = match req.uri().path() {
        "/headers" => {
            let mut headers = BTreeMap::<String, String>::new();
            for (k, v) in req.headers() {
                let v = v.to_str().unwrap_or("?").to_string();
                headers
                    .entry(k.as_str().to_string())
                    .and_modify(|e| {
                        e.push_str(", ");
                        e.push_str(&v);
                    })
                    .or_insert(v);
            }
            let json = serde_json::json!({
                "server": name,
                "method": req.method().as_str(),
                "target": req.uri().to_string(),
                "headers": headers,
            });
            full(json.to_string())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut hash = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(Response::new(full("broken body")));
                };
                if let Some(data) = frame.data_ref() {
                    hash.update(data);
                    len += data.len() as u64;
                }
            }
            let json = serde_json::json!({"len": len, "sha256": hex::encode(hash.finalize())});
            full(json.to_string())
        }
        "/stream" => {
            let chunks = futures_util::stream::unfold(0u8, move |step| {
                let gate = gate.clone();
                async move {
                    match step {
                        0 => Some((Bytes::from_static(b"first chunk\n"), 1)),
                        1 => {
                            gate.acquire().await.unwrap().forget();
                            Some((Bytes::from_static(b"last chunk\n"), 2))
                        }
                        _ => None,
                    }
                }
            });
            let frames =
                futures_util::StreamExt::map(chunks, |b| Ok::<_, Infallible>(Frame::data(b)));
            BodyExt::boxed(StreamBody::new(frames))
        }
        "/stall" => std::future::pending().await,
        _ => full(format!("hello from {name}")),
    };
    Ok(Response::new(body))
}

/// The proxy under test, serving plain HTTP on loopback.
pub struct Harness {
    pub addr: SocketAddr,
    pub routes: Arc<Routes>,
    pub metrics: Arc<ProxyMetrics>,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), ProxyError>>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    pub async fn start(table: RouteTable, settings: ProxySettings) -> Self {
        Self::start_with(table, settings, AccessLog::disabled()).await
    }

    pub async fn start_with(table: RouteTable, settings: ProxySettings, access: AccessLog) -> Self {
        let routes = Arc::new(Routes::default());
        routes.store(table);
        let metrics = Arc::new(ProxyMetrics::default());
        let proxy = Proxy::new(routes.clone(), settings, metrics.clone(), access);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy.clone().serve_http(listener, shutdown.clone()));
        Self {
            addr,
            routes,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    /// `http://<host>:<port><path>`, for a client that resolves `host` to the proxy.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }

    /// A reqwest client that sends each of `hosts` to the proxy.
    pub fn client(&self, hosts: &[&str]) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        for host in hosts {
            builder = builder.resolve(host, self.addr);
        }
        builder.build().unwrap()
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }
}

/// A route for `app` over `backends`, with optional static directories.
pub fn route(
    app: &str,
    backends: Vec<Arc<Backend>>,
    statics: Vec<(String, std::path::PathBuf)>,
) -> Arc<AppRoute> {
    Arc::new(AppRoute::new(app, 1, backends, statics))
}

pub fn table(entries: &[(&str, Arc<AppRoute>)]) -> RouteTable {
    let mut table = RouteTable::default();
    for (host, route) in entries {
        table.by_host.insert(host.to_string(), route.clone());
    }
    table
}

/// The table most tests need: `app.localhost` routed to the one instance `app`.
pub fn one_app(app: &Upstream) -> RouteTable {
    table(&[(
        "app.localhost",
        route("app", vec![backend("app", app)], vec![]),
    )])
}

pub fn backend(app: &str, upstream: &Upstream) -> Arc<Backend> {
    Backend::new(app, 1, upstream.addr)
}

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// One parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection speaking HTTP/1.1 by hand.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; a write the server refused (it closed first) is not an error here.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads more bytes; false at end of stream or on error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no answer within {PATIENCE:?}"),
        }
    }

    /// Reads exactly the head of the next response; `None` if the connection closed first.
    pub async fn head(&mut self) -> Option<RawResponse> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Some(RawResponse {
            status,
            headers,
            body: Vec::new(),
        })
    }

    /// Reads the next whole response (to a request that was not HEAD).
    pub async fn response(&mut self) -> Option<RawResponse> {
        let mut response = self.head().await?;
        if matches!(response.status, 101 | 204 | 304) {
            return Some(response);
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "body cut short");
            }
            response.body = self.buf.drain(..len).collect();
        } else if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "chunk cut short");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16)
                        .unwrap();
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "chunk cut short");
                }
                response.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        Some(response)
    }

    /// Reads bytes until `n` have arrived.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed early");
        }
        self.buf.drain(..n).collect()
    }

    /// Whether the server closed the connection (read end or reset) within [`PATIENCE`],
    /// discarding whatever else it sent.
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
