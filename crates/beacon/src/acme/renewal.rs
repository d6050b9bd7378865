//! When a certificate is renewed and when it counts as close to expiry: the CA's renewal
//! window (ACME Renewal Information, RFC 9773) where it offers one, else two thirds into the
//! lifetime, with jitter so a cluster's certificates do not all renew in the same second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::Account;
use px_proto::acme::{AcmeCert, CertState};
use rand::Rng;

use super::order::{Issued, certificate_id};

/// A certificate this close to its expiry, not renewed yet, raises an alert...
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// ...or, for a short-lived one (Let's Encrypt's `shortlived` profile lasts 6 days), once a
/// third of its lifetime is left.
const EXPIRY_WARNING_SHARE: u32 = 3;
/// Without renewal information, renew this far into the lifetime (two thirds)...
const RENEW_NUMERATOR: u32 = 2;
const RENEW_DENOMINATOR: u32 = 3;
/// ...give or take up to this share of the lifetime (1/50: about a day of a 90-day one).
const JITTER_SHARE: u32 = 50;

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
    fn a_90_day_certificate_warns_at_7_days_and_a_6_day_one_at_2() {
        let start = UNIX_EPOCH + 1000 * DAY;
        let long = start + 90 * DAY;
        assert!(!expiring(start, long, long - 8 * DAY));
        assert!(expiring(start, long, long - 6 * DAY));
        let short = start + 6 * DAY;
        assert!(!expiring(start, short, short - 3 * DAY));
        assert!(expiring(start, short, short - DAY));
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
