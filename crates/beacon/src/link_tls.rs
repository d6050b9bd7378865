//! The TLS of Beacon's side of a control link, driven through rustls's unbuffered API: the
//! records received and those waiting for the socket live in buffers this module owns and
//! releases whenever they are empty, so an idle link holds no TLS buffer.
//!
//! rustls's buffered connection (what `tokio_rustls` drives) keeps a 4 KiB receive buffer for
//! as long as the connection is open, resized to 4 KiB again whenever it empties; Beacon holds
//! up to `MAX_LINKS` links, nearly all idle between two heartbeats, and that buffer was the
//! largest part of an idle link's memory. Here a read waits on a buffer on the stack of the
//! poll that reads, and only a partial record is kept between two polls. The wire is the same
//! TLS either way: the peers still use `tokio_rustls`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read takes from the socket, into the stack of the poll that reads them: a TLS
/// record of the largest plaintext (16 KiB) and most of its header and tag, so a large frame
/// comes in few reads, while nothing of it stays allocated once the poll returns.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Most TLS bytes received and not yet processed: a partial record (at most 18 KiB with its
/// header and expansion) or, during the handshake, a handshake message rustls joins across
/// records (rustls allows 64 KiB). A peer that sends more without completing one is cut off.
pub const MAX_UNPROCESSED_TLS_BYTES: usize = 96 * 1024;
/// Most plaintext encrypted by one write: a large frame goes out in pieces, so the encrypted
/// copy waiting for the socket stays this small.
const WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// Room guessed for the TLS overhead of one record (header, content type, tag, padding); a
/// guess too small costs one more attempt, with the size rustls asks for.
const RECORD_OVERHEAD_BYTES: usize = 64;
/// Plaintext of one TLS record: the overhead above is per record of this size.
const RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

/// Beacon's end of one TLS connection over `S`: an [`AsyncRead`] and [`AsyncWrite`] of the
/// plaintext, like `tokio_rustls`'s stream, holding no buffer while idle.
pub struct ServerTls<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (a partial record); unallocated when empty.
    incoming: Vec<u8>,
    /// Plaintext decrypted and not yet read, from `plain_read` on; unallocated when empty.
    plain: Vec<u8>,
    plain_read: usize,
    /// TLS bytes for the peer, sent up to `sent`; unallocated when empty.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer's close_notify arrived: no more plaintext comes.
    peer_closed: bool,
    /// Ours was queued.
    close_queued: bool,
}

/// What to do once rustls has processed what was received, if the connection is open.
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// Where processing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reached {
    /// The handshake needs more from the peer.
    Handshaking,
    /// Application data may be written (and read once it comes).
    Open,
    /// Both sides sent their close_notify.
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerTls<S> {
    /// The TLS handshake over `io` with `config`, as `tokio_rustls::TlsAcceptor::accept`. An
    /// error rustls has an alert for is sent to the peer before the error is returned.
    pub async fn accept(io: S, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = Self {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_read: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            close_queued: false,
        };
        match std::future::poll_fn(|cx| tls.poll_handshake(cx)).await {
            Ok(()) => Ok(tls),
            Err(e) => {
                // Best effort, as tokio_rustls does: the peer learns why, if it still reads.
                if tls.queue_alerts().is_ok() {
                    let _ = std::future::poll_fn(|cx| tls.poll_send_outgoing(cx)).await;
                }
                Err(e)
            }
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_outgoing(cx))?;
            let (reached, _) = self.advance(Want::Nothing)?;
            if !self.outgoing.is_empty() {
                continue;
            }
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if reached == Reached::Closed || self.peer_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS connection during the handshake",
                )));
            }
            if !ready!(self.poll_receive(cx))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
        }
    }

    /// Lets rustls process what was received until it needs more from the peer, queueing
    /// what it has to send and the plaintext it decrypted; once the connection is open, does
    /// what `want` asks. Returns where it stopped and how much plaintext it encrypted.
    fn advance(&mut self, want: Want<'_>) -> io::Result<(Reached, usize)> {
        let mut encrypted = 0;
        let mut want = Some(want);
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming);
            let discard = status.discard;
            let state = status.state.map_err(io::Error::other)?;
            let reached = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(io::Error::other)?;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append_encoded(&mut self.outgoing, &mut data)?;
                    None
                }
                // What was encoded waits in `outgoing`, which goes out in order before anything
                // queued later.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Reached::Handshaking),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Reached::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    match want.take() {
                        Some(Want::Encrypt(data)) => {
                            append_encrypted(&mut self.outgoing, &mut traffic, data)?;
                            encrypted = data.len();
                        }
                        Some(Want::CloseNotify) => {
                            append_close_notify(&mut self.outgoing, &mut traffic)?;
                            self.close_queued = true;
                        }
                        Some(Want::Nothing) | None => {}
                    }
                    Some(Reached::Open)
                }
                // Beacon's TLS configuration accepts no early data.
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS early data, which this server does not accept",
                    ));
                }
                other => {
                    return Err(io::Error::other(format!(
                        "TLS connection in a state this server does not handle: {other:?}"
                    )));
                }
            };
            self.incoming.drain(..discard);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            if let Some(reached) = reached {
                return Ok((reached, encrypted));
            }
        }
    }

    /// Queues the alerts rustls holds after an error (they are sent as handshake data).
    fn queue_alerts(&mut self) -> io::Result<()> {
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append_encoded(&mut self.outgoing, &mut data)?
                }
                _ => return Ok(()),
            }
        }
    }

    /// Sends what is queued for the peer; releases the buffer once it is all sent.
    fn poll_send_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming`, through a buffer on this poll's stack.
    /// `false` at the end of the stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK_BYTES];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let got = buf.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(false));
        }
        if self.incoming.len() + got.len() > MAX_UNPROCESSED_TLS_BYTES {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "more than {MAX_UNPROCESSED_TLS_BYTES} bytes of TLS received without a complete record"
                ),
            )));
        }
        self.incoming.extend_from_slice(got);
        Poll::Ready(Ok(true))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_read < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_read);
                buf.put_slice(&this.plain[this.plain_read..this.plain_read + n]);
                this.plain_read += n;
                if this.plain_read == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // What rustls queued (a session ticket, a key update) goes out when the socket
            // takes it; a full socket must not stop the read, as both peers may be writing
            // a large frame at once and each reads only after.
            if let Poll::Ready(Err(e)) = this.poll_send_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
            this.advance(Want::Nothing)?;
            if !this.plain.is_empty() || this.peer_closed {
                continue;
            }
            if !ready!(this.poll_receive(cx))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one chunk waits for the socket.
        ready!(this.poll_send_outgoing(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed",
            )));
        }
        let take = data.len().min(WRITE_CHUNK_BYTES);
        let (reached, encrypted) = this.advance(Want::Encrypt(&data[..take]))?;
        if reached != Reached::Open || encrypted != take {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS connection is not open for writing",
            )));
        }
        // The bytes are queued either way; sending now saves a wake-up.
        if let Poll::Ready(Err(e)) = this.poll_send_outgoing(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_outgoing(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            ready!(this.poll_send_outgoing(cx))?;
            // Queued only on an open connection; one mid-handshake just closes.
            this.advance(Want::CloseNotify)?;
            this.close_queued = true;
        }
        ready!(this.poll_send_outgoing(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Appends to `out` what `write` puts into the room it is given: first `room` bytes, then as
/// many as `write`'s error says it needs (`required`), until it fits. Every rustls unbuffered
/// encoder reports too small a buffer this way.
fn append_growing<E: std::error::Error + Send + Sync + 'static>(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(needed) if needed > room => room = needed,
                _ => {
                    out.truncate(start);
                    return Err(io::Error::other(e));
                }
            },
        }
    }
}

/// The size an encryption needs when the buffer was too small.
fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// Appends a handshake record rustls has ready to `out`, sized as rustls asks.
fn append_encoded<D>(out: &mut Vec<u8>, data: &mut EncodeTlsData<'_, D>) -> io::Result<()> {
    // An empty room first: rustls says the size without copying.
    append_growing(
        out,
        0,
        |buf| data.encode(buf),
        |e| match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        },
    )
}

/// Appends `data` encrypted to `out`.
fn append_encrypted<D>(
    out: &mut Vec<u8>,
    traffic: &mut WriteTraffic<'_, D>,
    data: &[u8],
) -> io::Result<()> {
    let records = data.len().div_ceil(RECORD_PLAINTEXT_BYTES).max(1);
    let room = data.len() + records * RECORD_OVERHEAD_BYTES;
    append_growing(out, room, |buf| traffic.encrypt(data, buf), encrypt_needs)
}

/// Appends our close_notify alert to `out`.
fn append_close_notify<D>(out: &mut Vec<u8>, traffic: &mut WriteTraffic<'_, D>) -> io::Result<()> {
    append_growing(
        out,
        RECORD_OVERHEAD_BYTES,
        |buf| traffic.queue_close_notify(buf),
        encrypt_needs,
    )
}

#[cfg(test)]
#[path = "link_tls_tests.rs"]
mod tests;
