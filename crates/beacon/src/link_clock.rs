//! One timer per link for both of its deadlines: Beacon's next heartbeat to the peer and the
//! end of the peer's allowed silence.
//!
//! A link that kept an `Interval` for its heartbeats and a `Sleep` reset on every frame for the
//! silence held two timers (the interval's boxed) and re-registered one with the timer wheel
//! for each of the 2,000 reports a second 10,000 links send. Here a frame only records when it
//! came; the one timer wakes at whichever deadline is first, and a wake-up at an old silence
//! deadline finds the peer heard since and sleeps on.

use std::time::Duration;

use tokio::time::Instant;

/// What is due when the link's timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing yet: sleep until [`LinkClock::wake_at`].
    Nothing,
    /// Send a heartbeat; the next one is due a beat after now.
    Beat,
    /// Nothing heard from the peer for the whole deadline.
    Silent,
}

/// The two deadlines of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkClock {
    beat: Duration,
    deadline: Duration,
    next_beat: Instant,
    heard: Instant,
}

impl LinkClock {
    /// A link opened at `now`: the first heartbeat is due at once, and the peer has `deadline`
    /// to send its first frame.
    pub fn new(now: Instant, beat: Duration, deadline: Duration) -> Self {
        Self {
            beat,
            deadline,
            next_beat: now,
            heard: now,
        }
    }

    /// A frame came from the peer at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// When the timer must fire next.
    pub fn wake_at(&self) -> Instant {
        self.next_beat.min(self.heard + self.deadline)
    }

    /// What is due at `now`. A beat that is due moves the next one a beat after `now`: a late
    /// beat delays the next rather than bunching them (as `MissedTickBehavior::Delay`).
    pub fn due(&mut self, now: Instant) -> Due {
        if now >= self.heard + self.deadline {
            return Due::Silent;
        }
        if now >= self.next_beat {
            self.next_beat = now + self.beat;
            return Due::Beat;
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_secs(2);
    const DEADLINE: Duration = Duration::from_secs(15);

    #[test]
    fn the_first_beat_is_due_at_once_and_the_next_a_beat_later() {
        let start = Instant::now();
        let mut clock = LinkClock::new(start, BEAT, DEADLINE);
        assert_eq!(clock.wake_at(), start);
        assert_eq!(clock.due(start), Due::Beat);
        assert_eq!(clock.wake_at(), start + BEAT);
        assert_eq!(clock.due(start + BEAT / 2), Due::Nothing);
        assert_eq!(clock.due(start + BEAT), Due::Beat);
    }

    #[test]
    fn a_late_beat_delays_the_next_instead_of_bunching() {
        let start = Instant::now();
        let mut clock = LinkClock::new(start, BEAT, DEADLINE);
        clock.due(start);
        let late = start + BEAT * 3;
        clock.heard(late);
        assert_eq!(clock.due(late), Due::Beat);
        assert_eq!(
            clock.due(late),
            Due::Nothing,
            "one beat, not the three missed"
        );
        assert_eq!(clock.wake_at(), late + BEAT);
    }

    #[test]
    fn a_peer_silent_for_the_deadline_is_silent_and_a_frame_moves_the_deadline() {
        let start = Instant::now();
        let mut clock = LinkClock::new(start, Duration::from_secs(60), DEADLINE);
        clock.due(start);
        assert_eq!(
            clock.wake_at(),
            start + DEADLINE,
            "the silence is due first"
        );
        clock.heard(start + Duration::from_secs(10));
        // The timer armed for the old deadline fires and finds the peer heard since.
        assert_eq!(clock.due(start + DEADLINE), Due::Nothing);
        assert_eq!(clock.wake_at(), start + Duration::from_secs(10) + DEADLINE);
        assert_eq!(
            clock.due(start + Duration::from_secs(10) + DEADLINE),
            Due::Silent
        );
    }
}
