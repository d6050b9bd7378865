//! One established control link: TCP, TLS, the `Hello`/`Welcome` handshake, then frames both
//! ways with Beacon's silence watched.

use std::pin::Pin;

use futures_util::{SinkExt, StreamExt};
use px_proto::codec::{FrameCodec, FrameError};
use px_proto::link::{
    FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_DEADLINE, HEARTBEAT_INTERVAL, Hello, ToBeacon,
};
use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use crate::LinkSettings;

/// Why a link could not be made, or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("hello: {0}")]
    Hello(FrameError),
    #[error("beacon refused the link: {0}")]
    Rejected(String),
    #[error("expected welcome, got {0:?}")]
    NotWelcome(Box<FromBeacon>),
    #[error("handshake: {0}")]
    Handshake(FrameError),
    #[error("beacon closed the link during the handshake")]
    ClosedInHandshake,
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A frame could not be sent (or a received one not decoded): the connection is unusable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("beacon closed the link")]
    Closed,
    #[error("beacon silent past the heartbeat deadline")]
    Silent,
}

/// A link Beacon welcomed. Beacon heartbeats too, so a link on which nothing arrives for
/// [`HEARTBEAT_DEADLINE`] is dead even if TCP says otherwise: [`Link::recv`] says so.
pub struct Link {
    frames: Framed<TlsStream<TcpStream>, FrameCodec<FromBeacon, ToBeacon>>,
    silence: Pin<Box<Sleep>>,
}

impl Link {
    /// Sends one frame.
    pub async fn send(&mut self, frame: ToBeacon) -> Result<(), LinkError> {
        Ok(self.frames.send(frame).await?)
    }

    /// The next frame from Beacon; an error once the link failed, closed, or was silent past
    /// [`HEARTBEAT_DEADLINE`]. Cancel-safe: a `select!` may drop it and call it again.
    pub async fn recv(&mut self) -> Result<FromBeacon, LinkError> {
        tokio::select! {
            () = &mut self.silence => Err(LinkError::Silent),
            frame = self.frames.next() => {
                self.silence.as_mut().reset(Instant::now() + HEARTBEAT_DEADLINE);
                match frame {
                    Some(Ok(frame)) => Ok(frame),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(LinkError::Closed),
                }
            }
        }
    }

    /// Ends the link with a TLS close, so Beacon sees a clean close rather than a reset.
    pub async fn close(&mut self) {
        let _ = self.frames.close().await;
    }
}

/// The client's heartbeat ticks: every [`HEARTBEAT_INTERVAL`], the first at once, delayed
/// rather than bunched after a stall.
pub fn heartbeats() -> Interval {
    let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

/// Connects, says `hello` and waits for Beacon's `Welcome`, all within [`HANDSHAKE_TIMEOUT`].
pub async fn connect(settings: &LinkSettings, hello: Hello) -> Result<Link, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(settings, hello))
        .await
        .unwrap_or(Err(LinkError::HandshakeTimeout))
}

async fn handshake(settings: &LinkSettings, hello: Hello) -> Result<Link, LinkError> {
    let tcp = TcpStream::connect(&settings.addr)
        .await
        .map_err(LinkError::Connect)?;
    // Frames are small and each is a whole message: Nagle's delay would only add latency. A
    // socket that refuses the option still works, so the link goes on without it.
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
        .connect(settings.server_name.clone(), tcp)
        .await
        .map_err(LinkError::Tls)?;
    let mut frames = Framed::new(tls, FrameCodec::new());
    frames
        .send(ToBeacon::Hello(hello))
        .await
        .map_err(LinkError::Hello)?;
    match frames.next().await {
        Some(Ok(FromBeacon::Welcome { protocol, beacon })) => {
            tracing::info!(%beacon, protocol, addr = %settings.addr, "linked to beacon");
            Ok(Link {
                frames,
                silence: Box::pin(tokio::time::sleep(HEARTBEAT_DEADLINE)),
            })
        }
        Some(Ok(FromBeacon::Rejected { reason })) => Err(LinkError::Rejected(reason)),
        Some(Ok(other)) => Err(LinkError::NotWelcome(Box::new(other))),
        Some(Err(e)) => Err(LinkError::Handshake(e)),
        None => Err(LinkError::ClosedInHandshake),
    }
}
