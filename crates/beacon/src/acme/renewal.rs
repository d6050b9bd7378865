//! When a certificate is renewed and when it counts as close to expiry: the CA's renewal
//! window (ACME Renewal Information, RFC 9773) where it offers one, else two thirds into the
//! lifetime, with jitter so a cluster's certificates do not all renew in the same second; and
//! how long a name that failed waits before it is ordered again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::Account;
use px_proto::acme::{AcmeCert, CertState};
use rand::Rng;

use super::order::{Issued, certificate_id};

/// A certificate this close to its expiry, not renewed yet, raises an alert...
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// ...or, for a short-lived one (Let's Encrypt's `shortlived` profile lasts 6 days), once a
/// sixth of its lifetime is left: half of the third left at renewal time, so a renewal that
/// succeeds on its first tries never warns, and one that keeps failing warns with days left.
const EXPIRY_WARNING_SHARE: u32 = 6;
/// Without renewal information, renew this far into the lifetime (two thirds)...
const RENEW_NUMERATOR: u32 = 2;
const RENEW_DENOMINATOR: u32 = 3;
/// ...give or take up to this share of the lifetime (1/50: about a day of a 90-day one).
const JITTER_SHARE: u32 = 50;

/// Longest wait between two orders of a name that keeps failing, whatever
/// `acme.retry_after_failure` says: a fixed DNS record or firewall is noticed within hours.
pub(crate) const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// A certificate still in use gets at least this many tries in the time it has left.
const TRIES_BEFORE_EXPIRY: u32 = 4;
/// Shortest wait after a failure, however little time a certificate has left.
const MIN_RETRY: Duration = Duration::from_secs(1);
/// Doublings of the wait stop here (2^16 times the first wait is past any cap).
const MAX_DOUBLINGS: u32 = 16;
/// Longest wait after a name's first failure in a row. A first failure is most often a
/// passing one: the CA checked while the web servers restarted, or before they had linked
/// again to a Beacon that had just started (a configuration change turning ACME on restarts
/// both; so does an upgrade or a failover), and found no answer to the challenge. A second try
/// a minute later then gets the certificate, instead of a quarter of an hour later; it is one
/// of the 5 failures an hour a CA allows per name (`budget.rs`).
pub(crate) const FIRST_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// How long a name waits after its `failures`-th failure in a row (1 for the first): after the
/// first, `base` or [`FIRST_RETRY_AFTER_FAILURE`] if shorter; after the second, `base`,
/// doubled for each failure after it, at most [`MAX_RETRY_BACKOFF`] (or `base` when it is
/// longer); and while a certificate valid until `not_after` is still served, at most a
/// [`TRIES_BEFORE_EXPIRY`]th of the time it has left, so that a short-lived one is tried again
/// before it expires.
pub(crate) fn retry_after(
    base: Duration,
    failures: u32,
    not_after: Option<SystemTime>,
    now: SystemTime,
) -> Duration {
    let mut wait = if failures <= 1 {
        base.min(FIRST_RETRY_AFTER_FAILURE)
    } else {
        let doublings = (failures - 2).min(MAX_DOUBLINGS);
        base.saturating_mul(1 << doublings)
            .min(MAX_RETRY_BACKOFF.max(base))
    };
    if let Some(left) = not_after.and_then(|at| at.duration_since(now).ok()) {
        wait = wait.min(left / TRIES_BEFORE_EXPIRY).max(MIN_RETRY);
    }
    wait
}

/// Whether a name's record calls for an order now.
pub(crate) fn due(record: Option<&AcmeCert>, now: SystemTime) -> bool {
    let Some(record) = record else {
        return true;
    };
    if record.state == CertState::Pending {
        // An order a stopped Beacon left unfinished.
        return true;
    }
    humantime::parse_rfc3339_weak(&record.renew_at).map_or(true, |at| at <= now)
}

/// Whether a certificate valid from `not_before` to `not_after` is close to expiry at `now`.
pub(crate) fn expiring(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let threshold = EXPIRY_WARNING.min(lifetime / EXPIRY_WARNING_SHARE);
    not_after.duration_since(now).unwrap_or_default() < threshold
}

/// Two thirds into the lifetime, with jitter.
pub(crate) fn default_renewal(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let base = not_before + lifetime * RENEW_NUMERATOR / RENEW_DENOMINATOR;
    let jitter = (lifetime / JITTER_SHARE).as_secs();
    let offset = rand::rng().random_range(0..=jitter * 2);
    (base + Duration::from_secs(offset))
        .checked_sub(Duration::from_secs(jitter))
        .unwrap_or(base)
}

/// When to renew `issued`: a random time in the CA's suggested window where it offers renewal
/// information, else [`default_renewal`].
pub(crate) async fn renew_at(account: &Account, issued: &Issued) -> SystemTime {
    if let Some(id) = certificate_id(&issued.chain_pem) {
        match account.renewal_info(&id).await {
            Ok((info, _)) => {
                let start = info.suggested_window.start.unix_timestamp();
                let end = info.suggested_window.end.unix_timestamp().max(start);
                let at = rand::rng().random_range(start..=end);
                if let Ok(secs) = u64::try_from(at) {
                    return UNIX_EPOCH + Duration::from_secs(secs);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "acme: no renewal information; renewing at two thirds")
            }
        }
    }
    default_renewal(issued.not_before, issued.not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_90_day_certificate_warns_at_7_days_and_a_6_day_one_at_1() {
        let start = UNIX_EPOCH + 1000 * DAY;
        let long = start + 90 * DAY;
        assert!(!expiring(start, long, long - 8 * DAY));
        assert!(expiring(start, long, long - 6 * DAY));
        let short = start + 6 * DAY;
        assert!(!expiring(start, short, short - 2 * DAY));
        assert!(expiring(start, short, short - DAY / 2));
    }

    #[test]
    fn no_certificate_warns_before_its_latest_renewal_time() {
        // Whatever the lifetime, from 30 seconds to 90 days, the latest jittered renewal time
        // leaves more than the warning threshold: only a renewal that failed warns.
        let start = UNIX_EPOCH + 1000 * DAY;
        for lifetime in [
            Duration::from_secs(30),
            Duration::from_secs(3600),
            6 * DAY,
            90 * DAY,
        ] {
            let end = start + lifetime;
            let latest =
                start + lifetime * RENEW_NUMERATOR / RENEW_DENOMINATOR + lifetime / JITTER_SHARE;
            assert!(!expiring(start, end, latest), "{lifetime:?}");
            assert!(expiring(start, end, end - lifetime / 20), "{lifetime:?}");
        }
    }

    #[test]
    fn a_failing_name_waits_twice_as_long_each_time_and_a_served_one_gets_tries_before_expiry() {
        let now = UNIX_EPOCH + 1000 * DAY;
        let base = Duration::from_secs(15 * 60);
        // A first failure is tried again within a minute, then the configured wait, doubled.
        assert_eq!(retry_after(base, 1, None, now), FIRST_RETRY_AFTER_FAILURE);
        assert_eq!(retry_after(base, 2, None, now), base);
        assert_eq!(retry_after(base, 3, None, now), 2 * base);
        assert_eq!(retry_after(base, 4, None, now), 4 * base);
        assert_eq!(retry_after(base, 100, None, now), MAX_RETRY_BACKOFF);
        // A configured wait shorter than the first retry's is kept from the first failure on.
        let short = Duration::from_secs(5);
        assert_eq!(retry_after(short, 1, None, now), short);
        assert_eq!(retry_after(short, 2, None, now), short);
        assert_eq!(retry_after(short, 3, None, now), 2 * short);
        // A certificate with 10 seconds left is tried again within its time.
        let soon = now + Duration::from_secs(10);
        assert_eq!(
            retry_after(base, 1, Some(soon), now),
            Duration::from_millis(2500)
        );
        // One that has expired waits as if none were served.
        assert_eq!(retry_after(base, 3, Some(now - DAY), now), 2 * base);
    }

    #[test]
    fn without_renewal_information_renewal_is_near_two_thirds_in() {
        let start = UNIX_EPOCH + 1000 * DAY;
        for _ in 0..100 {
            let at = default_renewal(start, start + 90 * DAY);
            assert!(at >= start + 58 * DAY && at <= start + 62 * DAY, "{at:?}");
        }
    }

    #[test]
    fn a_name_without_record_or_past_its_renewal_time_is_due() {
        let now = UNIX_EPOCH + 1000 * DAY;
        assert!(due(None, now));
        let mut record = AcmeCert {
            domain: "a.example.com".into(),
            state: CertState::Issued,
            chain_pem: String::new(),
            key_pem: String::new(),
            issuer: String::new(),
            not_before: String::new(),
            not_after: String::new(),
            renew_at: humantime::format_rfc3339_seconds(now + DAY).to_string(),
            last_error: String::new(),
            serial: String::new(),
        };
        assert!(!due(Some(&record), now));
        assert!(due(Some(&record), now + 2 * DAY));
        record.state = CertState::Pending;
        assert!(due(Some(&record), now));
    }
}
