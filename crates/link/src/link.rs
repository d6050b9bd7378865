//! One established control link: TCP, TLS, the `Hello`/`Welcome` handshake, then frames both
//! ways with Beacon's silence watched.

use std::pin::Pin;

use futures_util::{SinkExt, StreamExt};
use px_proto::codec::{FrameCodec, FrameError};
use px_proto::link::{
    FromBeacon, HANDSHAKE_TIMEOUT, HEARTBEAT_ANSWER_DEADLINE, HEARTBEAT_INTERVAL, Hello,
    MAX_HELLO_BYTES, ToBeacon, beacon_silence_deadline,
};
use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use crate::{BeaconAddr, LinkSettings};

/// How long the TCP connect to one Beacon may take, within [`HANDSHAKE_TIMEOUT`]. Inside one
/// network a connect takes milliseconds; a host that leaves it unanswered is stopped or cut
/// off, and the next Beacon should be tried well before the handshake's whole allowance.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a link could not be made, or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
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
    /// Nothing came from Beacon for the deadline its `Welcome` set, or, from a Beacon that
    /// answers heartbeats, for [`HEARTBEAT_ANSWER_DEADLINE`] after one: its host may be gone
    /// without closing anything (power lost, kernel hung, network cut).
    #[error("beacon silent for {}s, past its heartbeat deadline", .0.as_secs_f32())]
    Silent(std::time::Duration),
}

/// A link Beacon welcomed. Beacon answers every heartbeat (or, before it did, beat on its own as
/// often as its `Welcome` said), so a link on which nothing arrives for
/// [`Link::silence_deadline`], or within [`HEARTBEAT_ANSWER_DEADLINE`] of a heartbeat sent, is
/// dead even if TCP says otherwise: [`Link::recv`] says so.
pub struct Link {
    frames: Framed<TlsStream<TcpStream>, FrameCodec<FromBeacon, ToBeacon>>,
    /// Fires at the earlier of the two deadlines below; moved lazily, by [`Link::recv`].
    timer: Pin<Box<Sleep>>,
    /// When the last frame came from Beacon.
    heard: Instant,
    /// [`beacon_silence_deadline`] of what the `Welcome` announced.
    deadline: std::time::Duration,
    /// Whether the `Welcome` said Beacon answers every heartbeat.
    answers: bool,
    /// When Beacon's answer to the oldest heartbeat not answered yet is due.
    answer_by: Option<Instant>,
}

impl Link {
    /// Sends one frame; a heartbeat to a Beacon that answers them starts waiting for the answer.
    pub async fn send(&mut self, frame: ToBeacon) -> Result<(), LinkError> {
        let heartbeat = matches!(frame, ToBeacon::Heartbeat(_));
        self.frames.send(frame).await?;
        if heartbeat && self.answers && self.answer_by.is_none() {
            self.answer_by = Some(Instant::now() + HEARTBEAT_ANSWER_DEADLINE);
        }
        Ok(())
    }

    /// How long Beacon may stay silent before [`Link::recv`] gives up on it: three of the
    /// heartbeats its `Welcome` announced (15 s), or 15 s for a Beacon that announced none.
    pub fn silence_deadline(&self) -> std::time::Duration {
        self.deadline
    }

    /// How long after a heartbeat Beacon's answer may take, when it answers them.
    pub fn answer_deadline(&self) -> Option<std::time::Duration> {
        self.answers.then_some(HEARTBEAT_ANSWER_DEADLINE)
    }

    /// The next frame from Beacon; an error once the link failed, closed, or was silent past
    /// [`Link::silence_deadline`] or a heartbeat's [`Link::answer_deadline`]. Cancel-safe: a
    /// `select!` may drop it and call it again.
    pub async fn recv(&mut self) -> Result<FromBeacon, LinkError> {
        loop {
            let silent_at = self.heard + self.deadline;
            let due = self.answer_by.map_or(silent_at, |at| at.min(silent_at));
            if self.timer.deadline() != due {
                self.timer.as_mut().reset(due);
            }
            tokio::select! {
                // Frames first: an answer that arrived while this side was busy elsewhere
                // counts, even when the timer is past due by the time it is read.
                biased;
                frame = self.frames.next() => {
                    // Any frame shows Beacon alive, an answer or not.
                    self.heard = Instant::now();
                    self.answer_by = None;
                    return match frame {
                        Some(Ok(frame)) => Ok(frame),
                        Some(Err(e)) => Err(e.into()),
                        None => Err(LinkError::Closed),
                    };
                }
                () = &mut self.timer => {
                    let now = Instant::now();
                    if now >= silent_at {
                        return Err(LinkError::Silent(self.deadline));
                    }
                    if self.answer_by.is_some_and(|at| now >= at) {
                        return Err(LinkError::Silent(HEARTBEAT_ANSWER_DEADLINE));
                    }
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

/// Connects to `beacon`, says `hello` and waits for Beacon's `Welcome`, all within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    settings: &LinkSettings,
    beacon: &BeaconAddr,
    hello: Hello,
) -> Result<Link, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(settings, beacon, hello))
        .await
        .unwrap_or(Err(LinkError::HandshakeTimeout))
}

/// `hello` as Beacon reads it before the peer proved itself: within [`MAX_HELLO_BYTES`]. A
/// `state` that takes it over is left out; the first heartbeat, sent at once, carries it.
fn fit_hello(mut hello: Hello) -> Hello {
    use tokio_util::codec::Encoder;
    let mut small = FrameCodec::<FromBeacon, ToBeacon>::with_max(MAX_HELLO_BYTES);
    let mut buf = tokio_util::bytes::BytesMut::new();
    if hello.state.is_some()
        && small
            .encode(ToBeacon::Hello(hello.clone()), &mut buf)
            .is_err()
    {
        tracing::debug!("hello too large with the node's state; the first heartbeat carries it");
        hello.state = None;
    }
    hello
}

async fn handshake(
    settings: &LinkSettings,
    beacon: &BeaconAddr,
    hello: Hello,
) -> Result<Link, LinkError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&beacon.addr))
        .await
        .map_err(|_| LinkError::ConnectTimeout)?
        .map_err(LinkError::Connect)?;
    // Frames are small and each is a whole message: Nagle's delay would only add latency. A
    // socket that refuses the option still works, so the link goes on without it.
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(settings.tls.clone())
        .connect(beacon.server_name.clone(), tcp)
        .await
        .map_err(LinkError::Tls)?;
    let addr = &beacon.addr;
    let mut frames = Framed::new(tls, FrameCodec::new());
    frames
        .send(ToBeacon::Hello(fit_hello(hello)))
        .await
        .map_err(LinkError::Hello)?;
    match frames.next().await {
        Some(Ok(FromBeacon::Welcome {
            protocol,
            beacon,
            heartbeat_ms,
            answers_heartbeats,
        })) => {
            let deadline = beacon_silence_deadline(heartbeat_ms);
            tracing::info!(%beacon, protocol, addr = %addr, silence_deadline = ?deadline, answers_heartbeats, "linked to beacon");
            let heard = Instant::now();
            Ok(Link {
                frames,
                timer: Box::pin(tokio::time::sleep_until(heard + deadline)),
                heard,
                deadline,
                answers: answers_heartbeats,
                answer_by: None,
            })
        }
        Some(Ok(FromBeacon::Rejected { reason })) => Err(LinkError::Rejected(reason)),
        Some(Ok(other)) => Err(LinkError::NotWelcome(Box::new(other))),
        Some(Err(e)) => Err(LinkError::Handshake(e)),
        None => Err(LinkError::ClosedInHandshake),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::link::{InstanceState, InstanceStatus, NodeReport, PROTOCOL_VERSION, PeerRole};

    fn hello(instances: usize) -> Hello {
        let instance = |number| InstanceStatus {
            app: "hello".into(),
            release: 1,
            state: InstanceState::Healthy,
            pid: Some(1),
            port: Some(20001),
            restarts: 0,
            last_exit: None,
            process: "web".into(),
            number,
            started_at: None,
            memory_bytes: None,
            cpu_permille: None,
        };
        Hello {
            protocol: PROTOCOL_VERSION,
            role: PeerRole::Maestro,
            name: "web-1".into(),
            token: "pxt_x".into(),
            software: "test".into(),
            labels: Default::default(),
            state: Some(NodeReport {
                instances: (0..instances as u32).map(instance).collect(),
                ..Default::default()
            }),
            runtimes: Default::default(),
        }
    }

    #[test]
    fn a_hello_keeps_a_state_that_fits_and_leaves_out_one_that_does_not() {
        assert_eq!(fit_hello(hello(3)), hello(3));
        let big = fit_hello(hello(1000));
        assert_eq!(big.state, None);
        assert_eq!(big.name, "web-1");
    }
}
