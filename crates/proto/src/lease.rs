//! Leases in apprepo's storage (docs/src/design/control-hosts.md): which of several Beacons is
//! the active one. A lease is a record `leases/<name>.json` that one holder keeps by renewing
//! it before it expires; apprepo judges expiry by its own clock and writes the record with a
//! compare-and-swap, so of two claimants exactly one wins.

use serde::{Deserialize, Serialize};

/// Largest lease request apprepo reads: a holder id, a TTL and a URL are well under a KiB.
pub const MAX_LEASE_REQUEST_BYTES: usize = 4 * 1024;
/// Longest lease name: a DNS label, like an app name.
pub const MAX_LEASE_NAME_LEN: usize = 63;
/// Longest holder id: a host name and a random suffix fit with room to spare.
pub const MAX_HOLDER_LEN: usize = 128;
/// Longest advertised API URL.
pub const MAX_API_URL_LEN: usize = 2048;
/// Shortest TTL a claimant may ask for: below a second a renewal's round trip to apprepo (and
/// apprepo's to S3) would eat the whole lease.
pub const MIN_LEASE_TTL_MS: u64 = 1_000;
/// Longest TTL: past five minutes a crashed holder would stop every deploy for too long.
pub const MAX_LEASE_TTL_MS: u64 = 5 * 60 * 1_000;
/// The lease the Beacons of one cluster compete for.
pub const BEACON_LEASE: &str = "beacon";

/// `leases/<name>.json`, as stored and as `GET`/`PUT /v1/leases/<name>` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it: a claimant's stable id (Beacon keeps its own in its `data_dir`).
    pub holder: String,
    /// Goes up by one each time the holder changes (never on a renewal): what a new holder
    /// fences its predecessor with (Beacon's generations start at `epoch << 32`).
    pub epoch: u64,
    /// When the lease lapses unless renewed, by apprepo's clock (RFC 3339, milliseconds).
    pub expires_at: String,
    /// The same instant in milliseconds since the Unix epoch, for comparisons.
    pub expires_at_unix_ms: u64,
    /// Where the holder serves its API: where a standby redirects clients.
    pub api_url: String,
}

/// The body of `PUT /v1/leases/<name>`: take the lease, or renew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseClaim {
    /// The claimant's stable id.
    pub holder: String,
    /// How long the lease lasts from apprepo's receipt of this claim, in milliseconds
    /// ([`MIN_LEASE_TTL_MS`] to [`MAX_LEASE_TTL_MS`]).
    pub ttl_ms: u64,
    /// Where the claimant serves its API.
    pub api_url: String,
}

/// The body of a 409 answer to `PUT /v1/leases/<name>`: another holder has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHeld {
    pub code: String,
    pub message: String,
    /// The lease as it stands: its holder, and the URL of its API.
    pub lease: Lease,
}

/// Whether a Beacon is the active one or a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BeaconRole {
    Active,
    Standby,
}

/// `GET /v1/health` on a Beacon: its role, and where the active one is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeaconHealth {
    pub role: BeaconRole,
    /// The active Beacon's API URL as the lease names it; `None` while no active one is known,
    /// and without a lease (a single Beacon).
    pub active_url: Option<String>,
    /// The lease's epoch as this Beacon last saw it (0 without a lease).
    pub epoch: u64,
}

/// Checks a lease name: a lowercase DNS label. Returns what to fix.
pub fn check_lease_name(name: &str) -> Result<(), String> {
    crate::names::check_app_name(name).map_err(|m| m.replace("\"hello\"", "\"beacon\""))
}

/// Checks a claim's fields: a holder id of letters, digits, `.`, `-`, `_`, `:`; a TTL within
/// bounds; an http(s) URL without spaces or control characters. Returns what to fix.
pub fn check_claim(claim: &LeaseClaim) -> Result<(), String> {
    let holder = &claim.holder;
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
        return Err(format!("holder must be 1 to {MAX_HOLDER_LEN} characters"));
    }
    if !holder
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
    {
        return Err(format!(
            "holder {holder:?} may contain only letters, digits, '.', '-', '_' and ':'"
        ));
    }
    if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(&claim.ttl_ms) {
        return Err(format!(
            "ttl_ms {} must be between {MIN_LEASE_TTL_MS} and {MAX_LEASE_TTL_MS}",
            claim.ttl_ms
        ));
    }
    check_api_url(&claim.api_url)
}

/// Checks an advertised API URL: `http://` or `https://`, at most [`MAX_API_URL_LEN`] bytes,
/// no whitespace or control characters (it goes into a `Location` header).
pub fn check_api_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_API_URL_LEN {
        return Err(format!("api_url must be at most {MAX_API_URL_LEN} bytes"));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty() && !url.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "api_url {url:?} must be an http:// or https:// URL without spaces (e.g. https://beacon-1.example.com:7080)"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claim(holder: &str, ttl_ms: u64, api_url: &str) -> LeaseClaim {
        LeaseClaim {
            holder: holder.into(),
            ttl_ms,
            api_url: api_url.into(),
        }
    }

    #[test]
    fn a_good_claim_passes_and_each_bad_field_is_named() {
        assert!(check_claim(&claim("web-1:3f2a", 6_000, "https://10.0.0.5:7080")).is_ok());
        assert!(
            check_claim(&claim("", 6_000, "https://a"))
                .unwrap_err()
                .contains("holder")
        );
        assert!(
            check_claim(&claim("a/b", 6_000, "https://a"))
                .unwrap_err()
                .contains("holder")
        );
        assert!(
            check_claim(&claim("a", 10, "https://a"))
                .unwrap_err()
                .contains("ttl_ms")
        );
        assert!(
            check_claim(&claim("a", 6_000, "ftp://a"))
                .unwrap_err()
                .contains("api_url")
        );
        assert!(
            check_claim(&claim("a", 6_000, "https://a b"))
                .unwrap_err()
                .contains("api_url")
        );
    }

    #[test]
    fn lease_names_are_dns_labels() {
        assert!(check_lease_name(BEACON_LEASE).is_ok());
        assert!(check_lease_name("../x").is_err());
        assert!(check_lease_name("").unwrap_err().contains("beacon"));
    }
}
