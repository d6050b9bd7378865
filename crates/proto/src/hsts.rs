//! `[http] hsts` of `app.toml`: the `Strict-Transport-Security` policy (RFC 6797) the proxy
//! adds to an app's HTTPS answers when the app asks for it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest `max_age` accepted: five years, past what any browser or preload list asks for
/// (two years is the usual ceiling); a longer one is a typo such as `"365y"`.
pub const MAX_HSTS_MAX_AGE: Duration = Duration::from_secs(5 * 31_557_600);

/// What browsers are told to remember about the app's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    /// How long a browser goes straight to HTTPS for the host after it saw the header
    /// (whole seconds; `"0s"` tells browsers to forget an earlier policy).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Whether the policy covers every subdomain of the host as well.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_subdomains: bool,
}

impl Hsts {
    /// What is wrong with the policy, if anything, as a message for `http.hsts.max_age`.
    pub fn check(&self) -> Result<(), String> {
        if self.max_age > MAX_HSTS_MAX_AGE {
            return Err(format!(
                "must be at most {}s (five years), e.g. \"365days\"",
                MAX_HSTS_MAX_AGE.as_secs()
            ));
        }
        Ok(())
    }

    /// The `Strict-Transport-Security` header value, e.g. `max-age=31536000; includeSubDomains`.
    pub fn header_value(&self) -> String {
        let mut value = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_value_says_seconds_and_subdomains() {
        let hsts = Hsts {
            max_age: Duration::from_secs(365 * 24 * 3600),
            include_subdomains: false,
        };
        assert_eq!(hsts.header_value(), "max-age=31536000");
        let both = Hsts {
            include_subdomains: true,
            ..hsts
        };
        assert_eq!(both.header_value(), "max-age=31536000; includeSubDomains");
        assert!(both.check().is_ok());
        let forget = Hsts {
            max_age: Duration::ZERO,
            include_subdomains: false,
        };
        assert_eq!(forget.header_value(), "max-age=0");
        let typo = Hsts {
            max_age: MAX_HSTS_MAX_AGE + Duration::from_secs(1),
            include_subdomains: false,
        };
        assert!(typo.check().unwrap_err().contains("at most"));
    }
}
