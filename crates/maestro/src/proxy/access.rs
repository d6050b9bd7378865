//! The access log: one record per request, sent through a bounded channel to whoever writes
//! `access.log`, so a slow disk never slows a request.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use hyper::header::HeaderValue;
use hyper::{Method, Uri};
use tokio::sync::mpsc;

/// One request as the access log records it. The fields a client chose are the request's own
/// header values and target, shared rather than copied: building a record allocates nothing
/// per field, and the text is made once, by the formatter, off the request's thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// When the request arrived.
    pub at: SystemTime,
    /// The `Host` the client asked for, as sent; empty when it sent none, or one that is not
    /// visible ASCII.
    pub host: HeaderValue,
    pub method: Method,
    /// The request target's path and query, as sent (the whole target when it has none, as a
    /// `CONNECT`'s authority).
    pub path: Uri,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// From the request's arrival to the last byte of the response body (or its abandonment).
    pub duration: Duration,
    /// The instance that answered; `None` when the proxy answered itself.
    pub upstream: Option<SocketAddr>,
    pub request_id: HeaderValue,
    /// The app the host routes to; `None` for an unknown host.
    pub app: Option<Arc<str>>,
    /// The HTTP version the client spoke: `HTTP/1.1`, `HTTP/2.0` (or `HTTP/1.0`).
    pub protocol: &'static str,
}

impl AccessRecord {
    /// One line, fields separated by spaces: RFC 3339 time, host, method, path, status, bytes,
    /// duration in seconds, upstream (`-` when none), request id, app (`-` when none), protocol
    /// (last, so that tools reading the earlier fields by position keep working). Fields a
    /// client chooses are quoted with `"` and `\` escaped and control or non-ASCII bytes as
    /// `\xHH`, so a line can never be split or forged.
    pub fn to_line(&self) -> String {
        let host = self.host.as_bytes();
        let path = match self.path.path_and_query() {
            Some(pq) => std::borrow::Cow::Borrowed(pq.as_str()),
            None => std::borrow::Cow::Owned(self.path.to_string()),
        };
        let mut line = String::with_capacity(96 + path.len() + host.len());
        let _ = write!(line, "{} ", humantime::format_rfc3339_millis(self.at));
        quoted(&mut line, host);
        line.push(' ');
        quoted(&mut line, self.method.as_str().as_bytes());
        line.push(' ');
        quoted(&mut line, path.as_bytes());
        let _ = write!(
            line,
            " {} {} {:.6} ",
            self.status,
            self.bytes,
            self.duration.as_secs_f64()
        );
        match self.upstream {
            Some(addr) => {
                let _ = write!(line, "{addr}");
            }
            None => line.push('-'),
        }
        line.push(' ');
        quoted(&mut line, self.request_id.as_bytes());
        line.push(' ');
        match &self.app {
            Some(app) => quoted(&mut line, app.as_bytes()),
            None => line.push('-'),
        }
        line.push(' ');
        line.push_str(self.protocol);
        line
    }
}

fn quoted(out: &mut String, value: &[u8]) {
    out.push('"');
    for &b in value {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
}

/// Where access records go: a bounded channel; when it is full, records are dropped and
/// counted, never waited for.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// A log whose records arrive on the returned receiver; at most `capacity` wait there.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<AccessRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let log = Self {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (log, rx)
    }

    /// A log that records nothing (and costs nothing per request).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether records are wanted at all; the proxy skips building them otherwise.
    pub(crate) fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Records dropped because the channel was full or its reader gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `record` without waiting.
    pub(crate) fn send(&self, record: AccessRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            host: HeaderValue::from_static("hello.localhost"),
            method: Method::GET,
            path: Uri::from_static("/a\"b\\?x=1"),
            status: 200,
            bytes: 12,
            duration: Duration::from_micros(1500),
            upstream: Some("127.0.0.1:4000".parse().unwrap()),
            request_id: HeaderValue::from_static("0123456789abcdef"),
            app: Some("hello".into()),
            protocol: "HTTP/2.0",
        }
    }

    #[test]
    fn line_is_one_escaped_line() {
        let line = record().to_line();
        assert_eq!(
            line,
            "2023-11-14T22:13:20.123Z \"hello.localhost\" \"GET\" \"/a\\\"b\\\\?x=1\" 200 12 0.001500 127.0.0.1:4000 \"0123456789abcdef\" \"hello\" HTTP/2.0"
        );
        let none = AccessRecord {
            upstream: None,
            app: None,
            ..record()
        };
        assert!(
            none.to_line()
                .ends_with(" - \"0123456789abcdef\" - HTTP/2.0")
        );
    }

    #[test]
    fn quoted_fields_escape_quotes_backslashes_controls_and_non_ascii_bytes() {
        let mut out = String::new();
        quoted(&mut out, "a\u{e9}b\\c\"\td\u{1F600}".as_bytes());
        assert_eq!(out, "\"a\\xc3\\xa9b\\\\c\\\"\\x09d\\xf0\\x9f\\x98\\x80\"");
        out.clear();
        quoted(&mut out, b"");
        assert_eq!(out, "\"\"");
    }

    #[tokio::test]
    async fn full_channel_drops_and_counts() {
        let (log, mut rx) = AccessLog::new(1);
        log.send(record());
        log.send(record());
        assert_eq!(log.dropped(), 1);
        assert_eq!(rx.recv().await.unwrap().status, 200);
        AccessLog::disabled().send(record());
    }
}
