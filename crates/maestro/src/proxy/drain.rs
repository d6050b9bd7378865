//! Draining long-lived connections: when an instance leaves the route, each of its WebSocket
//! and server-sent-event connections picks its own moment in the drain budget and closes with
//! a reconnect hint at a message boundary, so clients move to the new release a few at a time
//! instead of all at once; what is still open at the deadline is cut.

use std::time::Duration;

use rand::Rng as _;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::routes::Drain;

/// Part of the drain budget over which connections choose their closing moment; the rest
/// leaves room for a close to wait for a message boundary before the deadline.
pub const SPREAD_FRACTION: f64 = 0.8;
/// WebSocket close code 1012, "Service Restart": the server is restarting, reconnect.
pub const WEBSOCKET_SERVICE_RESTART: u16 = 1012;
/// The reason text sent with it.
const WEBSOCKET_CLOSE_REASON: &[u8] = b"service restart";
/// Range of the `retry:` (milliseconds) an event stream gets before it ends: clients wait that
/// long before reconnecting, each a different time.
pub const SSE_RETRY_MS: std::ops::RangeInclusive<u64> = 500..=3000;

/// Waits for the drain order, then until this connection's moment in it; returns the deadline
/// by which the connection must be gone. Never returns when no drain is ordered.
pub async fn turn(mut order: watch::Receiver<Option<Drain>>) -> Instant {
    let drain = loop {
        if let Some(drain) = *order.borrow_and_update() {
            break drain;
        }
        if order.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let spread = drain.budget.mul_f64(SPREAD_FRACTION);
    let offset = spread.mul_f64(rand::rng().random_range(0.0..=1.0));
    tokio::time::sleep_until(drain.started + offset).await;
    drain.deadline
}

/// The close frame a server sends: FIN + opcode 8, unmasked, code 1012 and its reason.
pub fn websocket_close_frame() -> Vec<u8> {
    let payload_len = 2 + WEBSOCKET_CLOSE_REASON.len();
    let mut frame = vec![0x88, payload_len as u8];
    frame.extend_from_slice(&WEBSOCKET_SERVICE_RESTART.to_be_bytes());
    frame.extend_from_slice(WEBSOCKET_CLOSE_REASON);
    frame
}

/// The last event of a stream that ends for a drain: a reconnection delay and a blank line
/// (an event without data, which clients do not dispatch).
pub fn sse_retry_event() -> Vec<u8> {
    let ms = rand::rng().random_range(SSE_RETRY_MS);
    format!("retry: {ms}\n\n").into_bytes()
}

/// Follows the frames of one direction of a WebSocket connection, to know when the bytes
/// sent so far end exactly at a frame boundary, where a frame of our own may go.
#[derive(Debug, Default)]
pub struct WebSocketFrames {
    /// Bytes of the current frame's header seen so far (at most 14).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come, once its header is complete.
    payload_left: u64,
}

impl WebSocketFrames {
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let take = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some(payload) = header_complete(&self.header) {
                self.header.clear();
                self.payload_left = payload;
            }
        }
    }
}

/// The payload length once `header` holds a whole frame header, else `None`.
fn header_complete(header: &[u8]) -> Option<u64> {
    if header.len() < 2 {
        return None;
    }
    let masked = header[1] & 0x80 != 0;
    let mask_len = if masked { 4 } else { 0 };
    let (len_bytes, payload) = match header[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let needed = 2 + len_bytes + mask_len;
    if header.len() < needed {
        return None;
    }
    let payload = payload.unwrap_or_else(|| {
        header[2..2 + len_bytes]
            .iter()
            .fold(0u64, |n, b| (n << 8) | u64::from(*b))
    });
    Some(payload)
}

/// Follows an event stream (`text/event-stream`) to know when the bytes sent so far end with
/// a blank line: between two events, where a `retry:` event may go. Lines end with LF, CR or
/// CR LF.
#[derive(Debug, Default)]
pub struct EventBoundary {
    /// Line ends in a row at the end of what was sent.
    line_ends: u8,
    /// The last byte was a CR (an LF right after it is the same line end).
    after_cr: bool,
    started: bool,
}

impl EventBoundary {
    pub fn at_boundary(&self) -> bool {
        !self.started || self.line_ends >= 2
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.started = true;
            match b {
                b'\r' => {
                    self.line_ends = self.line_ends.saturating_add(1);
                    self.after_cr = true;
                }
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' => self.line_ends = self.line_ends.saturating_add(1),
                _ => {
                    self.line_ends = 0;
                    self.after_cr = false;
                }
            }
        }
    }
}

/// How long after the deadline the supervisor still waits for connections to report how they
/// ended: they close themselves at the deadline, this is only scheduling slack.
pub const DEADLINE_SLACK: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x81];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(mask_bit | payload_len as u8),
            126..=65535 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    #[test]
    fn websocket_boundaries_hold_across_any_split() {
        let mut stream = Vec::new();
        let mut ends = vec![0];
        for (len, masked) in [
            (0, false),
            (5, false),
            (125, true),
            (126, false),
            (70_000, false),
        ] {
            stream.extend(frame(len, masked));
            ends.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 64, 1000, stream.len()] {
            let mut frames = WebSocketFrames::default();
            let mut at = 0;
            assert!(frames.at_boundary());
            for piece in stream.chunks(chunk) {
                frames.feed(piece);
                at += piece.len();
                assert_eq!(
                    frames.at_boundary(),
                    ends.contains(&at),
                    "chunk {chunk}, at {at}"
                );
            }
        }
    }

    #[test]
    fn the_close_frame_says_1012() {
        let frame = websocket_close_frame();
        assert_eq!(frame[0], 0x88);
        assert_eq!(frame[1] as usize, frame.len() - 2);
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1012);
        let mut frames = WebSocketFrames::default();
        frames.feed(&frame);
        assert!(frames.at_boundary());
    }

    #[test]
    fn event_boundaries_with_any_line_ending() {
        for (stream, boundary_after) in [
            (&b"data: a\n\ndata: b\n\n"[..], &[9, 18][..]),
            (b"data: a\r\n\r\ndata: b\r\n\r\n", &[10, 11, 21, 22]),
            (b"data: a\r\rdata: b\n", &[9]),
            (b": comment\n\n", &[11]),
        ] {
            let mut events = EventBoundary::default();
            assert!(events.at_boundary());
            for (i, b) in stream.iter().enumerate() {
                events.feed(&[*b]);
                assert_eq!(
                    events.at_boundary(),
                    boundary_after.contains(&(i + 1)),
                    "{:?} after {} bytes",
                    String::from_utf8_lossy(stream),
                    i + 1
                );
            }
        }
    }

    #[test]
    fn retry_events_are_whole_and_spread() {
        let events: std::collections::BTreeSet<Vec<u8>> =
            (0..50).map(|_| sse_retry_event()).collect();
        assert!(events.len() > 10, "retry hints should differ: {events:?}");
        for event in &events {
            let text = std::str::from_utf8(event).unwrap();
            let ms: u64 = text
                .strip_prefix("retry: ")
                .unwrap()
                .trim_end()
                .parse()
                .unwrap();
            assert!(SSE_RETRY_MS.contains(&ms));
            assert!(text.ends_with("\n\n"));
        }
    }

    #[tokio::test]
    async fn turns_fall_inside_the_budget_and_spread_over_it() {
        let (order, _) = watch::channel(None);
        // Long enough that the slack after the spread (400 ms) absorbs a busy machine's
        // scheduling delays.
        let budget = Duration::from_secs(2);
        let turns: Vec<_> = (0..20)
            .map(|_| {
                let order = order.subscribe();
                tokio::spawn(async move { (turn(order).await, Instant::now()) })
            })
            .collect();
        let started = Instant::now();
        order.send_replace(Some(Drain {
            started,
            budget,
            deadline: started + budget,
        }));
        let mut moments = Vec::new();
        for t in turns {
            let (deadline, at) = t.await.unwrap();
            assert_eq!(deadline, started + budget);
            moments.push(at - started);
        }
        // Each moment is at most the spread (plus scheduling), always before the deadline.
        assert!(moments.iter().all(|m| *m < budget), "{moments:?}");
        let (first, last) = (moments.iter().min().unwrap(), moments.iter().max().unwrap());
        assert!(
            *last - *first > budget / 5,
            "moments are spread: {moments:?}"
        );
    }
}
