//! A local budget that mirrors the CA's rate limits, so Beacon refuses to send an order the CA
//! would refuse anyway (and that would count against the account for hours). The numbers are
//! Let's Encrypt's, as published at https://letsencrypt.org/docs/rate-limits/ ("New Orders per
//! Account", "Authorization Failures per Identifier per Account", "New Certificates per
//! Registered Domain"); other CAs allow as much or more.
//!
//! The budget lives in memory: a restarted Beacon starts it empty, and the CA's own limits
//! still hold behind it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Let's Encrypt: 300 new orders per account per 3 hours.
pub(crate) const MAX_ORDERS_PER_ACCOUNT: usize = 300;
pub(crate) const ORDERS_WINDOW: Duration = Duration::from_secs(3 * 3600);
/// Let's Encrypt: 5 authorization failures per identifier per account per hour.
pub(crate) const MAX_FAILURES_PER_IDENTIFIER: usize = 5;
pub(crate) const FAILURES_WINDOW: Duration = Duration::from_secs(3600);
/// Let's Encrypt: 50 new certificates per registered domain per 7 days.
pub(crate) const MAX_CERTS_PER_REGISTERED_DOMAIN: usize = 50;
pub(crate) const CERTS_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The limits in force; [`Limits::LETS_ENCRYPT`] in production, smaller in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) orders: usize,
    pub(crate) failures: usize,
    pub(crate) certs: usize,
}

impl Limits {
    pub(crate) const LETS_ENCRYPT: Limits = Limits {
        orders: MAX_ORDERS_PER_ACCOUNT,
        failures: MAX_FAILURES_PER_IDENTIFIER,
        certs: MAX_CERTS_PER_REGISTERED_DOMAIN,
    };
}

/// Sliding windows of what was sent, failed and issued.
#[derive(Debug)]
pub(crate) struct Budget {
    limits: Limits,
    orders: VecDeque<Instant>,
    failures: BTreeMap<String, VecDeque<Instant>>,
    certs: BTreeMap<String, VecDeque<Instant>>,
}

/// The registered domain a host name counts against: its last two labels. Without the Public
/// Suffix List this over-counts names under a public suffix of two labels (`co.uk`), which
/// makes the budget stricter, never looser.
pub(crate) fn registered_domain(domain: &str) -> &str {
    let mut dots = domain.rmatch_indices('.');
    dots.next();
    match dots.next() {
        Some((at, _)) => &domain[at + 1..],
        None => domain,
    }
}

fn trim(times: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            orders: VecDeque::new(),
            failures: BTreeMap::new(),
            certs: BTreeMap::new(),
        }
    }

    /// Takes one order for `domain` from the budget, or says which limit it would break.
    pub(crate) fn take_order(&mut self, domain: &str, now: Instant) -> Result<(), String> {
        trim(&mut self.orders, ORDERS_WINDOW, now);
        if self.orders.len() >= self.limits.orders {
            return Err(format!(
                "{} new orders in the last 3 hours, the CA's limit per account; waiting",
                self.orders.len()
            ));
        }
        if let Some(failed) = self.failures.get_mut(domain) {
            trim(failed, FAILURES_WINDOW, now);
            if failed.len() >= self.limits.failures {
                return Err(format!(
                    "{} failed validations of {domain} in the last hour, the CA's limit per name; fix what the last error says, the next try is within the hour",
                    failed.len()
                ));
            }
        }
        let registered = registered_domain(domain);
        if let Some(issued) = self.certs.get_mut(registered) {
            trim(issued, CERTS_WINDOW, now);
            if issued.len() >= self.limits.certs {
                return Err(format!(
                    "{} certificates for {registered} in the last 7 days, the CA's limit per registered domain",
                    issued.len()
                ));
            }
        }
        self.orders.push_back(now);
        Ok(())
    }

    /// Counts a failed validation of `domain`.
    pub(crate) fn failed(&mut self, domain: &str, now: Instant) {
        self.failures
            .entry(domain.to_string())
            .or_default()
            .push_back(now);
    }

    /// Counts a certificate issued for `domain`.
    pub(crate) fn issued(&mut self, domain: &str, now: Instant) {
        self.certs
            .entry(registered_domain(domain).to_string())
            .or_default()
            .push_back(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registered_domain_is_the_last_two_labels() {
        assert_eq!(registered_domain("shop.example.com"), "example.com");
        assert_eq!(registered_domain("a.b.example.com"), "example.com");
        assert_eq!(registered_domain("example.com"), "example.com");
        assert_eq!(registered_domain("localhost"), "localhost");
    }

    #[test]
    fn each_limit_refuses_the_order_over_it_and_frees_when_its_window_passes() {
        let start = Instant::now();
        let mut budget = Budget::new(Limits {
            orders: 4,
            failures: 2,
            certs: 1,
        });
        // Failed validations of one name: the third order of it is refused, others are not.
        budget.take_order("a.example.com", start).unwrap();
        budget.failed("a.example.com", start);
        budget.take_order("a.example.com", start).unwrap();
        budget.failed("a.example.com", start);
        let refused = budget.take_order("a.example.com", start).unwrap_err();
        assert!(
            refused.contains("failed validations of a.example.com"),
            "{refused}"
        );
        // A certificate per registered domain: a second name under it is refused.
        budget.take_order("b.example.org", start).unwrap();
        budget.issued("b.example.org", start);
        let refused = budget.take_order("c.example.org", start).unwrap_err();
        assert!(refused.contains("example.org"), "{refused}");
        // Orders per account: the fourth is the last.
        budget.take_order("d.example.net", start).unwrap();
        let refused = budget.take_order("e.example.net", start).unwrap_err();
        assert!(refused.contains("new orders"), "{refused}");
        // An hour on, the failures are forgiven, but the orders' 3 hours are not over.
        let later = start + FAILURES_WINDOW;
        assert!(budget.take_order("a.example.com", later).is_err());
        let much_later = start + ORDERS_WINDOW;
        budget.take_order("a.example.com", much_later).unwrap();
    }
}
