//! The HTTP version a client connection speaks and hyper's connection for it: HTTP/1.1 (with
//! upgrades) on both listeners, HTTP/2 on the TLS listener when the client chose it by ALPN;
//! the limits of each, and the graceful close a drain asks of either.
//!
//! Apps are reached over HTTP/1.1 whatever the client spoke: an HTTP/2 request becomes an
//! HTTP/1.1 one in `handle.rs` (`:authority` is its `Host`, and HTTP/2 has no
//! connection-specific headers to strip).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;

use hyper::Version;
use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::rt::{Executor, Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::TokioTimer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MIN_HEADER_BYTES, ProxySettings};

/// ALPN name of HTTP/2 over TLS (RFC 9113 §3.2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN name of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Requests one HTTP/2 connection may have open at once; a client that wants more waits for
/// one to end. nginx's default (`http2_max_concurrent_streams`): a browser loads a page's
/// assets over one connection without queueing, while one client holds no more of the proxy
/// than a hundred-odd HTTP/1.1 connections would.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// The protocols the TLS listener offers by ALPN, most preferred first: HTTP/2, then HTTP/1.1
/// for the clients that need it, WebSockets among them (this proxy upgrades only over
/// HTTP/1.1: it does not offer RFC 8441's extended CONNECT, so a browser opens an HTTP/1.1
/// connection for a WebSocket).
pub(crate) fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
}

/// The HTTP version of one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// What a TLS handshake chose; HTTP/1.1 when the client named no protocol. The plain
    /// listener always speaks HTTP/1.1: `h2c`, by upgrade or by prior knowledge, is refused
    /// (hyper's HTTP/1 server closes a connection that opens with HTTP/2's preface).
    pub(crate) fn negotiated(alpn: Option<&[u8]>) -> Self {
        if alpn == Some(ALPN_H2) {
            Self::Http2
        } else {
            Self::Http1
        }
    }
}

/// The versions counted apart in metrics and named in the access log, as HTTP writes them.
pub(crate) const VERSION_NAMES: [&str; 3] = ["HTTP/1.0", "HTTP/1.1", "HTTP/2.0"];

/// Where `version` is in [`VERSION_NAMES`]. The proxy's servers take no other version (HTTP/0.9
/// is refused by hyper and HTTP/3 is not served).
pub(crate) fn version_index(version: Version) -> usize {
    if version == Version::HTTP_10 {
        0
    } else if version == Version::HTTP_2 {
        2
    } else {
        1
    }
}

/// `version` as the access log writes it.
pub(crate) fn version_name(version: Version) -> &'static str {
    VERSION_NAMES[version_index(version)]
}

/// hyper's connection builders of one listener, set up once from the proxy's settings: the
/// same limits for both versions, each in its own terms.
#[derive(Clone)]
pub(crate) struct Builders {
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<StreamExecutor>,
}

impl Builders {
    /// The builders for a listener whose connection tasks are `tasks`, cut at `force`.
    pub(crate) fn new(
        settings: &ProxySettings,
        tasks: TaskTracker,
        force: CancellationToken,
    ) -> Self {
        let header_bytes = settings.max_header_bytes.max(MIN_HEADER_BYTES);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(header_bytes)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(StreamExecutor { tasks, force });
        // HTTP/1.1's head limit is HTTP/2's header list limit: a larger list gets a 431, as a
        // larger head does. The header read timeout becomes the time a new connection has to
        // send its first request (see `server::connection`), and the idle timeout closes a
        // connection on which nothing moves, pings included: the proxy sends none, so an idle
        // connection is not kept alive by the proxy itself.
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));
        Self { http1, http2 }
    }
}

/// Runs the task of each HTTP/2 stream on the connection's own thread and in its listener's
/// tasks, so the drain waits for streams as it waits for connections, and the drain deadline
/// cuts them too.
#[derive(Clone)]
pub(crate) struct StreamExecutor {
    tasks: TaskTracker,
    force: CancellationToken,
}

impl<F> Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let force = self.force.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = stream => {}
                () = force.cancelled() => {}
            }
        });
    }
}

/// A served client connection that a drain can close gracefully: HTTP/1.1 after the
/// response in progress, HTTP/2 with a GOAWAY that lets every stream already sent finish.
pub(crate) trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
    E: Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_prefers_h2_and_anything_else_is_http1() {
        assert_eq!(alpn_protocols(), vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(Protocol::negotiated(Some(b"h2")), Protocol::Http2);
        assert_eq!(Protocol::negotiated(Some(b"http/1.1")), Protocol::Http1);
        assert_eq!(Protocol::negotiated(None), Protocol::Http1);
    }

    #[test]
    fn versions_are_named_as_http_writes_them() {
        assert_eq!(version_name(Version::HTTP_2), "HTTP/2.0");
        assert_eq!(version_name(Version::HTTP_11), "HTTP/1.1");
        assert_eq!(version_name(Version::HTTP_10), "HTTP/1.0");
    }
}
