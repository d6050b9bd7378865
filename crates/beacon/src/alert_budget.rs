//! How many alerts one app may cause: a token bucket per app, so an app that varies its
//! message (each a new dedup key) cannot flood the sysadmins' channel. Alerts of no app (a
//! node lost, the repository unreachable) are not counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Alerts one app may raise in a burst, e.g. a failed deploy, its crash loop and a few events
/// of its own, before the rate applies.
pub const APP_ALERT_BURST: u32 = 5;
/// One more alert per app per this long once the burst is spent: a lasting problem still
/// reaches people every few minutes, a flood at most 12 times an hour.
pub const APP_ALERT_REFILL: Duration = Duration::from_secs(300);
/// Apps whose buckets are remembered. Far above a cluster's apps; past it, full buckets are
/// forgotten first (forgetting one loses nothing), then the least recently used.
pub const MAX_APP_BUCKETS: usize = 4096;

/// What the budget says of one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it; `suppressed` alerts of the app were held back since the last one sent.
    Send { suppressed: u64 },
    /// Over the app's rate: count it, do not send it.
    Suppress,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the last token was added (or the bucket made).
    refilled: Instant,
    suppressed: u64,
}

/// The per-app token buckets.
#[derive(Debug, Default)]
pub struct AppBudget {
    buckets: HashMap<String, Bucket>,
}

impl AppBudget {
    /// Takes a token of `app` at `now`, if it has one.
    pub fn take(&mut self, app: &str, now: Instant) -> Verdict {
        if !self.buckets.contains_key(app) {
            self.make_room(now);
        }
        let bucket = self.buckets.entry(app.to_owned()).or_insert(Bucket {
            tokens: APP_ALERT_BURST,
            refilled: now,
            suppressed: 0,
        });
        refill(bucket, now);
        if bucket.tokens == 0 {
            bucket.suppressed += 1;
            return Verdict::Suppress;
        }
        bucket.tokens -= 1;
        Verdict::Send {
            suppressed: std::mem::take(&mut bucket.suppressed),
        }
    }

    /// Keeps the map under [`MAX_APP_BUCKETS`] before a new app is added.
    fn make_room(&mut self, now: Instant) {
        if self.buckets.len() < MAX_APP_BUCKETS {
            return;
        }
        self.buckets.retain(|_, bucket| {
            refill(bucket, now);
            bucket.tokens < APP_ALERT_BURST || bucket.suppressed > 0
        });
        if self.buckets.len() >= MAX_APP_BUCKETS
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.refilled)
                .map(|(app, _)| app.clone())
        {
            self.buckets.remove(&oldest);
        }
    }
}

fn refill(bucket: &mut Bucket, now: Instant) {
    let elapsed = now.saturating_duration_since(bucket.refilled);
    let earned = elapsed.as_secs() / APP_ALERT_REFILL.as_secs().max(1);
    if earned == 0 {
        return;
    }
    let earned = u32::try_from(earned).unwrap_or(u32::MAX);
    bucket.tokens = bucket.tokens.saturating_add(earned).min(APP_ALERT_BURST);
    bucket.refilled = if bucket.tokens == APP_ALERT_BURST {
        now
    } else {
        bucket.refilled + APP_ALERT_REFILL * earned
    };
}

/// The text of an alert sent after `suppressed` others of `app` were held back.
pub fn with_suppressed(text: &str, app: &str, suppressed: u64) -> String {
    if suppressed == 0 {
        return text.to_owned();
    }
    format!(
        "{text} ({suppressed} alerts of app {app} suppressed: over its rate of one per {}s after a burst of {APP_ALERT_BURST})",
        APP_ALERT_REFILL.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_gets_its_burst_then_one_alert_per_refill_and_hears_what_was_suppressed() {
        let mut budget = AppBudget::default();
        let start = Instant::now();
        for _ in 0..APP_ALERT_BURST {
            assert_eq!(budget.take("noisy", start), Verdict::Send { suppressed: 0 });
        }
        for _ in 0..100 {
            assert_eq!(budget.take("noisy", start), Verdict::Suppress);
        }
        // Another app is not held back by the noisy one.
        assert_eq!(budget.take("quiet", start), Verdict::Send { suppressed: 0 });
        // Just before a refill: still nothing.
        let almost = start + APP_ALERT_REFILL - Duration::from_secs(1);
        assert_eq!(budget.take("noisy", almost), Verdict::Suppress);
        // One token after a refill, with the count of what was held back.
        let later = start + APP_ALERT_REFILL;
        assert_eq!(
            budget.take("noisy", later),
            Verdict::Send { suppressed: 101 }
        );
        assert_eq!(budget.take("noisy", later), Verdict::Suppress);
        // A long quiet spell refills the burst, never more.
        let much_later = later + APP_ALERT_REFILL * 100;
        for _ in 0..APP_ALERT_BURST {
            assert!(matches!(
                budget.take("noisy", much_later),
                Verdict::Send { .. }
            ));
        }
        assert_eq!(budget.take("noisy", much_later), Verdict::Suppress);
    }

    #[test]
    fn the_suppressed_count_is_told_in_the_next_alert() {
        assert_eq!(with_suppressed("x failed", "x", 0), "x failed");
        assert!(
            with_suppressed("x failed", "x", 7)
                .starts_with("x failed (7 alerts of app x suppressed")
        );
    }

    #[test]
    fn the_buckets_stay_bounded() {
        let mut budget = AppBudget::default();
        let now = Instant::now();
        for i in 0..MAX_APP_BUCKETS + 10 {
            budget.take(&format!("app-{i}"), now);
        }
        assert!(budget.buckets.len() <= MAX_APP_BUCKETS);
    }
}
