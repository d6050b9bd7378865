//! Which app holds a host name, across every apprepo sharing the storage: one small object per
//! name, `claims/domains/<name>.json`, written only by conditional writes. An apprepo's own
//! lock (`Releases::lock_domain_claims`) keeps its requests apart; this record keeps two
//! apprepos apart, where each would otherwise find the name free and both take it.
//!
//! A claim is taken after the scan of every app (which names a holder precisely) and before
//! the name is written (into a release or `domains.json`), and it is held while that app still
//! names the name. A claim whose app no longer names it (the name
//! was removed, the app redeployed without it) is free to take, except in its first
//! [`CLAIM_GRACE`]: a claim that young may be a request still on its way to writing the name,
//! and the app that took it counts as holding it. A claimer checks, before it writes, that its
//! claim is younger than half that grace, so a stalled request cannot write a name another app
//! took meanwhile.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// How long a new claim counts as held even though its app does not name the name yet: far
/// beyond the time from a claim to the write of its release or record (milliseconds), and
/// beyond the clock difference of two control hosts.
pub const CLAIM_GRACE: Duration = Duration::from_secs(120);
/// Attempts at taking one name before giving up; each failure means another apprepo wrote the
/// same claim in between.
pub const MAX_CLAIM_ATTEMPTS: usize = 16;

fn claim_key(domain: &str) -> String {
    format!("claims/domains/{domain}.json")
}

/// The stored form of a claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimRecord {
    /// The app that took the name; `None` once it gave it back (`em domains remove`).
    app: Option<String>,
    /// When it was taken, in seconds since the epoch.
    claimed_at: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Names claimed by one request, and when: checked again before the names are written.
pub(crate) struct Claims {
    taken: Instant,
}

impl Claims {
    /// Refuses to go on when the claims were taken too long ago to be sure no other app took
    /// a name since (a request stalled between its claim and its write).
    pub(crate) fn still_fresh(&self) -> Result<(), ApiError> {
        if self.taken.elapsed() < CLAIM_GRACE / 2 {
            Ok(())
        } else {
            Err(ApiError::Conflict(
                "the domain check took too long to be trusted; retry".into(),
            ))
        }
    }
}

/// What one attempt at a claim found.
enum Attempt {
    Taken,
    /// Another app holds it: refuse, naming it.
    Held(String),
    /// Another apprepo wrote the claim in between: read it again.
    Raced,
}

impl Releases {
    /// Claims every name of `domains` for `app`, or refuses with the first one another app
    /// holds (the names this call claimed before it are given back then).
    pub(crate) async fn claim_domains(
        &self,
        app: &str,
        domains: &[String],
    ) -> Result<Claims, ApiError> {
        let taken = Instant::now();
        let mut new = Vec::new();
        for domain in domains {
            match self.claim_domain(app, domain).await {
                Ok(fresh) => {
                    if fresh {
                        new.push(domain.clone());
                    }
                }
                Err(e) => {
                    for domain in &new {
                        self.release_domain_claim(app, domain).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Claims { taken })
    }

    /// Takes one name; `Ok(true)` when this call wrote the claim, `Ok(false)` when the app
    /// held it already.
    async fn claim_domain(&self, app: &str, domain: &str) -> Result<bool, ApiError> {
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            match self.try_claim(app, domain).await? {
                (Attempt::Taken, wrote) => return Ok(wrote),
                (Attempt::Held(holder), _) => {
                    return Err(ApiError::DomainTaken {
                        domain: domain.to_string(),
                        holder,
                        how: "claimed through another apprepo".into(),
                    });
                }
                (Attempt::Raced, _) => continue,
            }
        }
        Err(ApiError::Conflict(format!(
            "too many concurrent claims of {domain:?}; retry in a moment"
        )))
    }

    async fn try_claim(&self, app: &str, domain: &str) -> Result<(Attempt, bool), ApiError> {
        let key = claim_key(domain);
        let mine = Bytes::from(
            serde_json::to_vec(&ClaimRecord {
                app: Some(app.to_string()),
                claimed_at: now_secs(),
            })
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        );
        let Some(stored) = self.count_storage_error(self.storage().read(&key).await)? else {
            return match self.storage().create(&key, mine).await {
                Ok(()) => Ok((Attempt::Taken, true)),
                Err(StorageError::AlreadyExists(_)) => Ok((Attempt::Raced, false)),
                Err(e) => Err(e.into()),
            };
        };
        let record: ClaimRecord = serde_json::from_slice(&stored.bytes)
            .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}")))?;
        match record.app {
            Some(holder) if holder == app => return Ok((Attempt::Taken, false)),
            Some(holder) if self.holds(&holder, domain, record.claimed_at).await? => {
                return Ok((Attempt::Held(holder), false));
            }
            _ => {}
        }
        match self.storage().replace(&key, mine, &stored.version).await {
            Ok(()) => Ok((Attempt::Taken, true)),
            Err(StorageError::Conflict(_)) => Ok((Attempt::Raced, false)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the claim of `holder`, taken at `claimed_at`, still stands: it is young, or
    /// the app names the domain in its current release or its added names.
    async fn holds(&self, holder: &str, domain: &str, claimed_at: u64) -> Result<bool, ApiError> {
        if now_secs().saturating_sub(claimed_at) < CLAIM_GRACE.as_secs() {
            return Ok(true);
        }
        let found = match self.app(holder).await {
            Ok(found) => found,
            Err(ApiError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let in_release = found.current.as_ref().is_some_and(|r| {
            r.manifest
                .http
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        });
        Ok(in_release || found.domains.iter().any(|d| d == domain))
    }

    /// Gives `domain` back if `app` holds its claim (after `em domains remove`, or when a
    /// later name of the same request was refused), so another app may take it at once. Best effort: a claim
    /// left behind is free once its app no longer names it and [`CLAIM_GRACE`] has passed.
    pub(crate) async fn release_domain_claim(&self, app: &str, domain: &str) {
        let key = claim_key(domain);
        let Ok(Some(stored)) = self.storage().read(&key).await else {
            return;
        };
        let Ok(record) = serde_json::from_slice::<ClaimRecord>(&stored.bytes) else {
            return;
        };
        if record.app.as_deref() != Some(app) {
            return;
        }
        let Ok(free) = serde_json::to_vec(&ClaimRecord {
            app: None,
            claimed_at: now_secs(),
        }) else {
            return;
        };
        // Compare-and-swap: a claim another app took in between is left alone.
        if let Err(e) = self
            .storage()
            .replace(&key, Bytes::from(free), &stored.version)
            .await
        {
            tracing::debug!(%app, %domain, error = %e, "domain claim not given back");
        }
    }
}
