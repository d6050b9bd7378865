//! The link frame codec: a 4-byte big-endian length, then that many bytes of JSON.
//! The length is checked against a maximum before anything is buffered.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

/// Largest frame accepted or sent. An assignment for a busy node is tens of KiB;
/// 4 MiB leaves room while bounding what a hostile peer can make us buffer.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
const LENGTH_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `Out` frames and decodes `In` frames. A clean close between frames decodes as
/// end-of-stream; a close inside a frame is an error.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        Self::with_max(MAX_FRAME_BYTES)
    }

    pub fn with_max(max: usize) -> Self {
        Self {
            max,
            _types: PhantomData,
        }
    }

    /// Changes the largest frame accepted or sent from the next frame on: a link starts small
    /// until its peer proved who it is, then gets the full [`MAX_FRAME_BYTES`].
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The largest frame accepted or sent now.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < LENGTH_BYTES {
            return Ok(None);
        }
        let mut len_bytes = [0u8; LENGTH_BYTES];
        len_bytes.copy_from_slice(&src[..LENGTH_BYTES]);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if src.len() < LENGTH_BYTES + len {
            src.reserve(LENGTH_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_BYTES);
        let body = src.split_to(len);
        Ok(Some(serde_json::from_slice(&body)?))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("link closed inside a frame ({} bytes pending)", buf.len()),
            ))),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = serde_json::to_vec(&item)?;
        if body.len() > self.max {
            return Err(FrameError::TooLarge {
                len: body.len(),
                max: self.max,
            });
        }
        dst.reserve(LENGTH_BYTES + body.len());
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{FromBeacon, Hello, PROTOCOL_VERSION, PeerRole, ReleaseCommitted, ToBeacon};
    use proptest::prelude::*;

    type PeerSide = FrameCodec<FromBeacon, ToBeacon>;
    type BeaconSide = FrameCodec<ToBeacon, FromBeacon>;

    fn hello() -> ToBeacon {
        ToBeacon::Hello(Hello {
            runtimes: Default::default(),
            protocol: PROTOCOL_VERSION,
            role: PeerRole::Repository,
            name: "repo-1".into(),
            token: "t".into(),
            software: "0.1.0".into(),
            labels: Default::default(),
            state: None,
        })
    }

    fn encode(msg: ToBeacon) -> BytesMut {
        let mut buf = BytesMut::new();
        PeerSide::new().encode(msg, &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip_several_frames_in_one_buffer() {
        let commit = ToBeacon::ReleaseCommitted(ReleaseCommitted {
            app: "hello".into(),
            version: 3,
            bundle_sha256: "ab".repeat(32),
        });
        let mut buf = encode(hello());
        buf.extend_from_slice(&encode(commit.clone()));
        let mut codec = BeaconSide::new();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(hello()));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(commit));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn truncated_frame_waits_then_fails_at_eof() {
        let full = encode(hello());
        for cut in 1..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            let mut codec = BeaconSide::new();
            assert_eq!(codec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            assert!(codec.decode_eof(&mut buf).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME_BYTES + 1) as u32);
        let err = BeaconSide::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_raised_limit_takes_the_frame_the_small_one_refused() {
        let frame = encode(hello());
        let mut codec = BeaconSide::with_max(8);
        let err = codec.decode(&mut frame.clone()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 8, .. }), "{err}");
        codec.set_max(MAX_FRAME_BYTES);
        assert_eq!(codec.max(), MAX_FRAME_BYTES);
        assert_eq!(codec.decode(&mut frame.clone()).unwrap(), Some(hello()));
    }

    #[test]
    fn the_largest_hello_without_state_fits_before_authentication() {
        use crate::link::{
            MAX_HELLO_BYTES, MAX_NODE_LABELS, MAX_PEER_NAME_LEN, MAX_REPORTED_RUNTIMES,
        };
        let hello = ToBeacon::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role: PeerRole::Maestro,
            name: "n".repeat(MAX_PEER_NAME_LEN),
            token: "t".repeat(256),
            software: "0.1.0-with-a-long-build-suffix".into(),
            labels: (0..MAX_NODE_LABELS)
                .map(|i| (format!("{i:063}"), "v".repeat(63)))
                .collect(),
            runtimes: (0..MAX_REPORTED_RUNTIMES)
                .map(|i| (format!("{i:032}"), "9".repeat(32)))
                .collect(),
            state: None,
        });
        let len = encode(hello).len();
        assert!(len <= MAX_HELLO_BYTES, "{len} bytes");
        assert!(
            len > MAX_HELLO_BYTES * 3 / 4,
            "{len} bytes: the limit could be smaller"
        );
    }

    #[test]
    fn oversized_message_is_not_sent() {
        let mut codec = FrameCodec::<FromBeacon, ToBeacon>::with_max(16);
        let err = codec.encode(hello(), &mut BytesMut::new()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn garbage_and_unknown_messages_are_malformed() {
        for body in [
            &b"\xff\xfe garbage"[..],
            br#"{"type":"format_disk"}"#,
            b"{}",
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.extend_from_slice(body);
            let err = BeaconSide::new().decode(&mut buf).unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = BeaconSide::with_max(1024);
            let _ = codec.decode(&mut buf);
            let _ = codec.decode_eof(&mut buf);
        }
    }
}
