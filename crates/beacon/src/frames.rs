//! A control link's frames on Beacon's side, with buffers sized for an idle link: Beacon holds
//! up to `MAX_LINKS` of them, nearly all silent between two heartbeats, so what an idle link
//! holds is what bounds Beacon's memory. Also the assignment a node is sent, encoded once for
//! every link it goes to.
//!
//! `tokio_util`'s `Framed` keeps an 8 KiB read and an 8 KiB write buffer per connection for its
//! whole life (grown, never shrunk, after a large frame); at 10 000 links that alone was most of
//! Beacon's memory. Here the read buffer is released whenever it holds no partial frame, an
//! idle read takes a little into a buffer on the stack of the poll that reads, and a frame is
//! written straight from its encoding. The wire format is [`FrameCodec`]'s, whose decoder this reuses. The ACME sets
//! ([`Shared`]) are likewise encoded once for every link.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{LazyLock, OnceLock};
use std::task::{Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use px_proto::codec::{FrameCodec, FrameError, MAX_FRAME_BYTES};
use px_proto::link::{Assignment, FromBeacon};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::codec::Decoder;

/// What an idle link's read takes at most for the start of its next frame, into the stack of
/// the poll that reads: a heartbeat's report or a small frame fits, and the frame's header
/// tells how much more to take. Nothing of it is kept between polls.
pub const IDLE_READ_BYTES: usize = 256;
/// Bytes of a frame's length prefix.
const LENGTH_BYTES: usize = 4;

/// One link's frames: `In` read, `Out` written, each within the codec's maximum.
pub struct FrameLink<S, In, Out> {
    io: S,
    codec: FrameCodec<In, Out>,
    /// The part of a frame (or of several) read and not yet decoded; unallocated when empty.
    read: BytesMut,
}

impl<S, In, Out> FrameLink<S, In, Out>
where
    S: AsyncRead + AsyncWrite + Unpin,
    In: DeserializeOwned,
    Out: Serialize,
{
    /// Frames over `io`, none larger than `max` bytes either way.
    pub fn new(io: S, max: usize) -> Self {
        Self {
            io,
            codec: FrameCodec::with_max(max),
            read: BytesMut::new(),
        }
    }

    /// Changes the largest frame accepted or sent, from the next frame on.
    pub fn set_max(&mut self, max: usize) {
        self.codec.set_max(max);
    }

    /// The next frame; `None` at a clean close between frames. Cancel-safe: whatever was read
    /// is kept for the next call.
    pub async fn next(&mut self) -> Option<Result<In, FrameError>> {
        loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(frame)) => {
                    self.release_if_empty();
                    return Some(Ok(frame));
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            let read = if self.read.capacity() > self.read.len() {
                self.io.read_buf(&mut self.read).await
            } else {
                // Nothing partial to grow (the decoder reserves a whole frame once it knows
                // its length): wait with a small buffer on the stack of each poll, not in
                // this future, which every idle link holds between two frames. A read that
                // is pending took nothing, so the buffer holds nothing between two polls.
                std::future::poll_fn(|cx| {
                    let mut start = [MaybeUninit::<u8>::uninit(); IDLE_READ_BYTES];
                    let mut buf = ReadBuf::uninit(&mut start);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
                    self.read.extend_from_slice(buf.filled());
                    Poll::Ready(Ok::<_, std::io::Error>(buf.filled().len()))
                })
                .await
            };
            match read {
                Ok(0) => {
                    return match self.codec.decode_eof(&mut self.read) {
                        Ok(Some(frame)) => Some(Ok(frame)),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    };
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    /// Encodes and sends one frame.
    pub async fn send(&mut self, frame: &Out) -> Result<(), FrameError> {
        let encoded = encode(frame, self.codec.max())?;
        self.send_encoded(&encoded).await
    }

    /// Sends a frame [`encode`]d beforehand (the same bytes may go to many links).
    pub async fn send_encoded(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        self.io.write_all(frame).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Ends the link cleanly (for TLS, with a close notification before the TCP close).
    pub async fn close(&mut self) -> Result<(), FrameError> {
        Ok(self.io.shutdown().await?)
    }

    /// Gives the read buffer back once it holds nothing: a link that received a large frame
    /// must not keep its room while it idles.
    fn release_if_empty(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
    }
}

/// `frame` as it goes on the wire (length prefix and JSON), within `max` bytes.
pub fn encode<T: Serialize>(frame: &T, max: usize) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::new().writer();
    out.get_mut().put_u32(0);
    serde_json::to_writer(&mut out, frame)?;
    let mut out = out.into_inner();
    let len = out.len() - LENGTH_BYTES;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..LENGTH_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(out.freeze())
}

static HEARTBEAT: LazyLock<Result<Bytes, String>> =
    LazyLock::new(|| encode(&FromBeacon::Heartbeat, MAX_FRAME_BYTES).map_err(|e| e.to_string()));

/// Beacon's heartbeat frame, the same bytes on every link: encoded once, not 2,000 times a
/// second at 10 000 links.
pub fn heartbeat_frame() -> Result<&'static Bytes, String> {
    HEARTBEAT.as_ref().map_err(Clone::clone)
}

/// An assignment as the hub publishes it: shared by every node whose assignment is the same,
/// and encoded as a frame once, by the first link that sends it, for all of them.
#[derive(Debug)]
pub struct Outgoing {
    pub assignment: Assignment,
    frame: OnceLock<Result<Bytes, String>>,
}

impl Outgoing {
    pub fn new(assignment: Assignment) -> Self {
        Self {
            assignment,
            frame: OnceLock::new(),
        }
    }

    /// The `Assign` frame of this assignment, within [`MAX_FRAME_BYTES`] (an established
    /// link's limit); encoded on the first call.
    pub fn frame(&self) -> Result<&Bytes, String> {
        self.frame
            .get_or_init(|| {
                encode(
                    &FromBeacon::Assign(self.assignment.clone()),
                    MAX_FRAME_BYTES,
                )
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// A frame every Maestro link sends alike (the ACME sets): encoded once, by the first link
/// that sends it, and shared by all, as [`Outgoing`] shares an assignment.
#[derive(Debug)]
pub struct Shared<T> {
    pub value: T,
    wrap: fn(T) -> FromBeacon,
    frame: OnceLock<Result<Bytes, String>>,
}

impl<T: Clone> Shared<T> {
    /// `value`, sent as the frame `wrap` makes of it.
    pub fn new(value: T, wrap: fn(T) -> FromBeacon) -> Self {
        Self {
            value,
            wrap,
            frame: OnceLock::new(),
        }
    }

    /// The frame, within [`MAX_FRAME_BYTES`]; encoded on the first call.
    pub fn frame(&self) -> Result<&Bytes, String> {
        self.frame
            .get_or_init(|| {
                encode(&(self.wrap)(self.value.clone()), MAX_FRAME_BYTES).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl std::ops::Deref for Outgoing {
    type Target = Assignment;

    fn deref(&self) -> &Assignment {
        &self.assignment
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::link::{ReleaseCommitted, ToBeacon};
    use tokio::io::duplex;
    use tokio_util::codec::Encoder;

    type Beacon<S> = FrameLink<S, ToBeacon, FromBeacon>;
    type Peer<S> = FrameLink<S, FromBeacon, ToBeacon>;

    fn notice(sha: String) -> ToBeacon {
        ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 3,
            bundle_sha256: sha,
        })
    }

    #[test]
    fn a_frame_is_encoded_as_the_codec_encodes_it() {
        let frame = notice("ab".repeat(32));
        let mut codec = FrameCodec::<FromBeacon, ToBeacon>::new();
        let mut expected = BytesMut::new();
        codec.encode(frame.clone(), &mut expected).unwrap();
        assert_eq!(encode(&frame, MAX_FRAME_BYTES).unwrap(), expected.freeze());
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_with_its_size() {
        let err = encode(&notice("x".repeat(100)), 50).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 50, len } if len > 50),
            "{err}"
        );
    }

    #[tokio::test]
    async fn small_and_large_frames_arrive_whole_and_the_buffer_is_released_after() {
        let (a, b) = duplex(64 * 1024);
        let mut peer: Peer<_> = FrameLink::new(a, MAX_FRAME_BYTES);
        let mut beacon: Beacon<_> = FrameLink::new(b, MAX_FRAME_BYTES);
        // Larger than the idle read, so it arrives in several reads.
        let large = notice("l".repeat(20 * IDLE_READ_BYTES));
        let small = notice("s".into());
        let sender = tokio::spawn(async move {
            peer.send(&small).await.unwrap();
            peer.send(&large).await.unwrap();
            peer.send(&notice("s".into())).await.unwrap();
            peer.close().await.unwrap();
        });
        assert_eq!(beacon.next().await.unwrap().unwrap(), notice("s".into()));
        let got = beacon.next().await.unwrap().unwrap();
        assert_eq!(got, notice("l".repeat(20 * IDLE_READ_BYTES)));
        assert_eq!(beacon.next().await.unwrap().unwrap(), notice("s".into()));
        assert_eq!(
            beacon.read.capacity(),
            0,
            "an idle link holds no read buffer"
        );
        assert!(
            beacon.next().await.is_none(),
            "a clean close ends the frames"
        );
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_close_inside_a_frame_is_an_error_and_an_oversized_frame_is_refused() {
        let (mut a, b) = duplex(1024);
        let mut beacon: Beacon<_> = FrameLink::new(b, 100);
        a.write_all(&1000u32.to_be_bytes()).await.unwrap();
        let err = beacon.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 1000,
                    max: 100
                }
            ),
            "{err}"
        );

        let (mut a, b) = duplex(1024);
        let mut beacon: Beacon<_> = FrameLink::new(b, 100);
        a.write_all(&[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        let err = beacon.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("inside a frame"), "{err}");
    }

    #[test]
    fn the_heartbeat_frame_is_the_codecs_heartbeat() {
        let mut codec = FrameCodec::<ToBeacon, FromBeacon>::new();
        let mut expected = BytesMut::new();
        codec.encode(FromBeacon::Heartbeat, &mut expected).unwrap();
        assert_eq!(*heartbeat_frame().unwrap(), expected.freeze());
    }

    #[test]
    fn a_shared_frame_is_encoded_once_for_every_link() {
        let shared = Shared::new(
            px_proto::acme::AcmeCertVersions::default(),
            FromBeacon::AcmeCertificates,
        );
        let first = shared.frame().unwrap().clone();
        assert_eq!(
            first.as_ptr(),
            shared.frame().unwrap().as_ptr(),
            "encoded once"
        );
        let mut codec = FrameCodec::<FromBeacon, ToBeacon>::new();
        let decoded = codec
            .decode(&mut BytesMut::from(&first[..]))
            .unwrap()
            .unwrap();
        assert_eq!(decoded, FromBeacon::AcmeCertificates(shared.value.clone()));
    }

    #[test]
    fn an_outgoing_assignment_is_encoded_once_as_an_assign_frame() {
        let outgoing = Outgoing::new(Assignment {
            generation: 7,
            apps: Vec::new(),
            builds: Vec::new(),
            phases: Vec::new(),
        });
        let first = outgoing.frame().unwrap().clone();
        let again = outgoing.frame().unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "encoded once");
        let mut codec = FrameCodec::<FromBeacon, ToBeacon>::new();
        let decoded = codec
            .decode(&mut BytesMut::from(&first[..]))
            .unwrap()
            .unwrap();
        assert_eq!(decoded, FromBeacon::Assign(outgoing.assignment.clone()));
    }
}
