//! The end of a peer's allowed silence on one link, on one timer moved lazily.
//!
//! Resetting a `Sleep` on every frame would re-register it with the timer wheel for each of the
//! 2,000 reports a second that 10,000 links send. Here a frame only records when it came; the
//! timer, armed for the deadline as it stood, fires, finds the peer heard since, and sleeps on
//! to the new deadline: about one timer-wheel registration per deadline, not one per frame.
//!
//! Beacon keeps no heartbeat timer of its own on a link: it answers each of the peer's
//! heartbeats in the wake-up that reads it (`px_proto::link::HEARTBEAT_ANSWER_DEADLINE`).

use std::time::Duration;

use tokio::time::Instant;

/// When a link's peer was last heard, and how long it may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    deadline: Duration,
    heard: Instant,
}

impl Silence {
    /// A link opened at `now`: the peer has `deadline` to send its first frame.
    pub fn new(now: Instant, deadline: Duration) -> Self {
        Self {
            deadline,
            heard: now,
        }
    }

    /// A frame came from the peer at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// When the peer's silence ends the link unless a frame comes first: when the timer must
    /// fire next.
    pub fn ends_at(&self) -> Instant {
        self.heard + self.deadline
    }

    /// Whether the peer has been silent for the whole deadline at `now`; a timer that fires at
    /// an old deadline finds it was heard since.
    pub fn is_over(&self, now: Instant) -> bool {
        now >= self.ends_at()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(15);

    #[test]
    fn a_peer_silent_for_the_deadline_is_silent_and_a_frame_moves_the_deadline() {
        let start = Instant::now();
        let mut silence = Silence::new(start, DEADLINE);
        assert_eq!(silence.ends_at(), start + DEADLINE);
        assert!(!silence.is_over(start + DEADLINE / 2));
        silence.heard(start + Duration::from_secs(10));
        // The timer armed for the old deadline fires and finds the peer heard since.
        assert!(!silence.is_over(start + DEADLINE));
        assert_eq!(
            silence.ends_at(),
            start + Duration::from_secs(10) + DEADLINE
        );
        assert!(silence.is_over(start + Duration::from_secs(10) + DEADLINE));
    }
}
