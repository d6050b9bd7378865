//! The one retry backoff every service uses: doubling from a base, capped, with ±50% jitter.

use std::time::Duration;

use rand::Rng;

/// The wait before retry number `retry` (0 for the first retry after a failure): `base · 2^retry`
/// capped at `cap`, times a random factor in [0.5, 1.5), so that many clients failing together
/// (a fleet of Maestros when Beacon restarts, many alerts to one webhook) do not retry in step.
/// Saturates rather than overflows, however large `retry`, `base` or `cap`.
pub fn jittered(base: Duration, cap: Duration, retry: u32) -> Duration {
    let nominal = nominal(base, cap, retry);
    let factor = rand::rng().random_range(0.5..1.5);
    Duration::try_from_secs_f64(nominal.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// The wait before retry number `retry` without jitter: `base · 2^retry`, capped at `cap`.
pub fn nominal(base: Duration, cap: Duration, retry: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(retry)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(250);
    const CAP: Duration = Duration::from_secs(30);
    /// Draws per check: enough that a jitter spread that is too narrow or too wide shows.
    const DRAWS: usize = 2000;

    #[test]
    fn each_retry_doubles_the_wait_until_the_cap() {
        let waits: Vec<Duration> = (0..10).map(|retry| nominal(BASE, CAP, retry)).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
                .map(Duration::from_millis)
        );
        // A base already above the cap is capped from the first retry.
        assert_eq!(nominal(Duration::from_secs(3600), CAP, 0), CAP);
    }

    #[test]
    fn jitter_stays_within_half_below_and_half_above_and_does_spread() {
        for retry in [0, 3, 7, 20] {
            let nominal = nominal(BASE, CAP, retry);
            let waits: Vec<Duration> = (0..DRAWS).map(|_| jittered(BASE, CAP, retry)).collect();
            for wait in &waits {
                assert!(
                    *wait >= nominal / 2 && *wait < nominal * 3 / 2,
                    "retry {retry}: {wait:?} is outside ±50% of {nominal:?}"
                );
            }
            // Jitter that does not spread would let a fleet retry in step.
            let (least, most) = (waits.iter().min(), waits.iter().max());
            assert!(
                least < Some(&(nominal * 3 / 5)) && most > Some(&(nominal * 7 / 5)),
                "retry {retry}: waits from {least:?} to {most:?} around {nominal:?}"
            );
        }
    }

    #[test]
    fn huge_retry_counts_and_durations_saturate_instead_of_overflowing() {
        assert_eq!(nominal(BASE, CAP, u32::MAX), CAP);
        assert!(jittered(BASE, CAP, u32::MAX) < CAP * 3 / 2);
        assert_eq!(
            nominal(Duration::MAX, Duration::MAX, u32::MAX),
            Duration::MAX
        );
        assert!(jittered(Duration::MAX, Duration::MAX, u32::MAX) >= Duration::MAX / 2);
        assert_eq!(nominal(Duration::ZERO, CAP, u32::MAX), Duration::ZERO);
    }
}
