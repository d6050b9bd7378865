//! Body types: what the proxy sends upstream, and what it answers with. The answer body carries
//! the backend's in-flight guard and the pending access record, so both end exactly when the
//! last byte has gone out or the client went away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::AsyncReadExt as _;

use super::access::{AccessLog, AccessRecord};
use super::drain;
use super::upstream::Lease;
use crate::routes::{Backend, InFlight, LongLived};

/// Bytes read from a static file per frame: large enough that a big file streams in few
/// reads on the blocking pool, small enough that many concurrent downloads stay cheap.
pub const STATIC_CHUNK_BYTES: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body sent to an instance: the client's own stream (cut off with
/// [`BodyTooLarge`] past the app's limit), a body the proxy read whole first, or nothing
/// (which lets a bodiless GET be sent again to another instance).
pub(crate) enum UpstreamBody {
    Client { body: Incoming, left: u64 },
    Buffered(Option<Bytes>),
    Empty,
}

/// The request body went past the app's `http.max_request_body`.
#[derive(Debug)]
pub(crate) struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is larger than the app accepts")
    }
}

impl std::error::Error for BodyTooLarge {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Client { body, left } => match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *left {
                        return Poll::Ready(Some(Err(BoxError::from(BodyTooLarge))));
                    }
                    *left -= len;
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(BoxError::from(e)))),
                None => Poll::Ready(None),
            },
            Self::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client { body, .. } => body.is_end_stream(),
            Self::Buffered(bytes) => bytes.is_none(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client { body, .. } => body.size_hint(),
            Self::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Why a body could not be read whole.
pub(crate) enum ReadWholeError {
    TooLarge,
    TimedOut,
    Aborted,
}

/// Reads a request body whole, refusing one over `max` bytes or slower than `timeout`.
pub(crate) async fn read_whole(
    body: Incoming,
    max: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, ReadWholeError> {
    use http_body_util::BodyExt as _;
    let limited = http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ReadWholeError::TimedOut),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadWholeError::TooLarge),
        Ok(Err(_)) => Err(ReadWholeError::Aborted),
    }
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream(Incoming),
    EventStream(Box<EventStream>),
    File {
        file: tokio::io::Take<tokio::fs::File>,
        remaining: u64,
        buf: BytesMut,
    },
}

/// An instance's server-sent events, passed on until the instance is drained: then, at this
/// stream's moment of the drain budget and between two events, a `retry:` event ends it (the
/// client reconnects, to the new release); still open at the deadline, it is cut.
struct EventStream {
    body: Incoming,
    boundary: drain::EventBoundary,
    turn: Pin<Box<dyn Future<Output = tokio::time::Instant> + Send + Sync>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    long_lived: Option<LongLived>,
    done: bool,
}

impl EventStream {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.is_none()
            && let Poll::Ready(at) = self.turn.as_mut().poll(cx)
        {
            self.deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        if let Some(deadline) = &mut self.deadline {
            if self.boundary.at_boundary() {
                self.done = true;
                if let Some(open) = self.long_lived.take() {
                    open.closed_for_drain();
                }
                let retry = Bytes::from(drain::sse_retry_event());
                return Poll::Ready(Some(Ok(Frame::data(retry))));
            }
            if deadline.as_mut().poll(cx).is_ready() {
                self.done = true;
                if let Some(open) = self.long_lived.take() {
                    open.cut();
                }
                return Poll::Ready(None);
            }
        }
        match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.boundary.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(BoxError::from(e)))),
            None => {
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

/// An access record waiting for the body to end, with what it needs to complete itself.
pub(crate) struct PendingRecord {
    pub(crate) record: AccessRecord,
    pub(crate) started: Instant,
    pub(crate) log: AccessLog,
}

/// The body of every response the proxy sends.
pub struct ProxyBody {
    kind: Kind,
    guard: Option<InFlight>,
    pending: Option<Box<PendingRecord>>,
    /// The instance connection the answer came on, pooled again once it has been read whole.
    lease: Option<Lease>,
    sent: u64,
}

impl ProxyBody {
    fn of(kind: Kind) -> Self {
        Self {
            kind,
            guard: None,
            pending: None,
            lease: None,
            sent: 0,
        }
    }

    pub(crate) fn empty() -> Self {
        Self::of(Kind::Empty)
    }

    pub(crate) fn full(bytes: Bytes) -> Self {
        Self::of(Kind::Full(Some(bytes)))
    }

    pub(crate) fn upstream(body: Incoming) -> Self {
        Self::of(Kind::Upstream(body))
    }

    /// An instance's `text/event-stream` answer, which `backend`'s drain ends gracefully.
    pub(crate) fn event_stream(body: Incoming, backend: &Arc<Backend>) -> Self {
        Self::of(Kind::EventStream(Box::new(EventStream {
            body,
            boundary: drain::EventBoundary::default(),
            turn: Box::pin(drain::turn(backend.drain_order())),
            deadline: None,
            long_lived: Some(backend.long_lived()),
            done: false,
        })))
    }

    /// Streams the first `len` bytes of `file`.
    pub(crate) fn file(file: tokio::fs::File, len: u64) -> Self {
        Self::of(Kind::File {
            file: file.take(len),
            remaining: len,
            buf: BytesMut::new(),
        })
    }

    /// Keeps `guard` until the body has been sent or dropped.
    pub(crate) fn hold(&mut self, guard: InFlight) {
        self.guard = Some(guard);
    }

    /// Sends `pending` to the access log when the body has been sent or dropped.
    pub(crate) fn log_on_end(&mut self, pending: Box<PendingRecord>) {
        self.pending = Some(pending);
    }

    /// Gives `lease` back to its pool when the instance's answer has been read to its end;
    /// closes that connection when the body ends any other way.
    pub(crate) fn give_back_at_end(&mut self, lease: Lease) {
        self.lease = Some(lease);
    }

    /// Releases the guard and the instance connection (pooled again when the instance's answer
    /// was read whole: `ended`), and writes the access record: the response is over.
    fn finish(&mut self, ended: bool) {
        self.guard = None;
        // A stream of events may have been ended by the proxy (a drain) rather than by the
        // instance: its connection is never reused.
        if let Some(lease) = self.lease.take()
            && ended
            && !matches!(self.kind, Kind::EventStream(_))
        {
            lease.give_back();
        }
        if let Some(pending) = self.pending.take() {
            let PendingRecord {
                mut record,
                started,
                log,
            } = *pending;
            record.bytes = self.sent;
            record.duration = started.elapsed();
            log.send(record);
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // An answer with no body (to a HEAD, a 204 or a 304) is never polled: it has ended.
        let ended = self.is_end_stream();
        self.finish(ended);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled: Option<Result<Frame<Bytes>, BoxError>> = match &mut this.kind {
            Kind::Empty => None,
            Kind::Full(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            Kind::Upstream(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
            Kind::EventStream(stream) => ready!(stream.poll_frame(cx)),
            Kind::File {
                file,
                remaining,
                buf,
            } => {
                if *remaining == 0 {
                    None
                } else {
                    if buf.capacity() == 0 {
                        let want = usize::try_from(*remaining)
                            .unwrap_or(STATIC_CHUNK_BYTES)
                            .min(STATIC_CHUNK_BYTES);
                        buf.reserve(want);
                    }
                    match ready!(tokio_util::io::poll_read_buf(Pin::new(file), cx, buf)) {
                        Ok(0) => Some(Err(BoxError::from(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "static file shrank while it was being sent",
                        )))),
                        Ok(n) => {
                            *remaining = remaining.saturating_sub(n as u64);
                            Some(Ok(Frame::data(buf.split().freeze())))
                        }
                        Err(e) => Some(Err(BoxError::from(e))),
                    }
                }
            }
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Some(Err(_)) => this.finish(false),
            None => this.finish(true),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::EventStream(stream) => stream.done || stream.body.is_end_stream(),
            Kind::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
            // It may end early, with a retry event of its own.
            Kind::EventStream(_) => SizeHint::default(),
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
