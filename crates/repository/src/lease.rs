//! Leases in the storage (docs/src/design/control-hosts.md): `leases/<name>.json`, taken and
//! renewed by a compare-and-swap on the record, with expiry judged by this process's clock.
//! Several Beacons compete for the `beacon` lease; the holder is the active one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use px_proto::lease::{Lease, LeaseClaim};

use crate::error::ApiError;
use crate::releases::Releases;
use crate::storage::StorageError;

/// Where the lease records live, one `<name>.json` each.
pub const LEASES_PREFIX: &str = "leases/";
/// Attempts at the compare-and-swap before giving up; each failure means another claimant
/// wrote the record in between, and the next attempt judges against what it wrote.
const MAX_WRITE_ATTEMPTS: usize = 8;

fn lease_key(name: &str) -> String {
    format!("{LEASES_PREFIX}{name}.json")
}

/// What a release came to.
#[derive(Debug)]
pub enum ReleaseOutcome {
    /// The releaser held the lease; it is stored expired now, so the next claim takes it.
    Released(Lease),
    /// Nothing of the releaser's to release: no one took the lease, or it had lapsed already.
    NotHeld,
    /// Another holder has it and it has not expired: left as it is.
    HeldByAnother(Lease),
}

/// What a claim came to.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The claimant holds the lease (taken or renewed), as now stored.
    Granted(Lease),
    /// Another holder has it and it has not expired.
    Held(Lease),
}

pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    px_proto::lease::check_lease_name(name)
        .map_err(|m| ApiError::BadRequest(format!("lease name: {m}")))
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Releases {
    /// The lease as stored, expired or not; `None` if no one ever took it.
    pub(crate) async fn lease(&self, name: &str) -> Result<Option<Lease>, ApiError> {
        check_name(name)?;
        let key = lease_key(name);
        match self.count_storage_error(self.storage().read(&key).await)? {
            None => Ok(None),
            Some(stored) => serde_json::from_slice(&stored.bytes)
                .map(Some)
                .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}"))),
        }
    }

    /// Takes or renews the lease for `claim.holder`: granted when the record is absent,
    /// expired, or already the claimant's; held otherwise. The epoch goes up by one whenever
    /// the holder changes. The write is a create-if-absent or a replace-if-unchanged, so of
    /// two claimants racing through two apprepos one is granted and the other sees its lease.
    pub(crate) async fn claim_lease(
        &self,
        name: &str,
        claim: &LeaseClaim,
    ) -> Result<ClaimOutcome, ApiError> {
        check_name(name)?;
        px_proto::lease::check_claim(claim).map_err(ApiError::BadRequest)?;
        let key = lease_key(name);
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let stored = self.count_storage_error(self.storage().read(&key).await)?;
            let current: Option<(Lease, String)> = match stored {
                None => None,
                Some(stored) => Some((
                    serde_json::from_slice(&stored.bytes)
                        .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}")))?,
                    stored.version,
                )),
            };
            // Judged after the read, so a lease expires no earlier than its holder was told.
            let now = SystemTime::now();
            let epoch = match &current {
                None => 1,
                Some((lease, _)) if lease.holder == claim.holder => lease.epoch,
                Some((lease, _)) if lease.expires_at_unix_ms <= unix_ms(now) => {
                    lease.epoch.saturating_add(1)
                }
                Some((lease, _)) => return Ok(ClaimOutcome::Held(lease.clone())),
            };
            let expires = now + Duration::from_millis(claim.ttl_ms);
            let lease = Lease {
                holder: claim.holder.clone(),
                epoch,
                expires_at: humantime::format_rfc3339_millis(expires).to_string(),
                expires_at_unix_ms: unix_ms(expires),
                api_url: claim.api_url.clone(),
            };
            let bytes: Bytes = serde_json::to_vec_pretty(&lease)
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .into();
            let written = match &current {
                None => self.storage().create(&key, bytes).await,
                Some((_, version)) => self.storage().replace(&key, bytes, version).await,
            };
            match self.count_storage_error(written) {
                Ok(()) => return Ok(ClaimOutcome::Granted(lease)),
                Err(StorageError::AlreadyExists(_) | StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "{key} changed {MAX_WRITE_ATTEMPTS} times while being claimed; retry"
        )))
    }

    /// Gives the lease up for `holder`, who is stopping: the record is replaced, if unchanged,
    /// by one that expired now (same holder and epoch), so a standby's next claim is granted
    /// at once with the next epoch instead of after the TTL. Only the holder can release it.
    pub(crate) async fn release_lease(
        &self,
        name: &str,
        holder: &str,
    ) -> Result<ReleaseOutcome, ApiError> {
        check_name(name)?;
        let key = lease_key(name);
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let Some(stored) = self.count_storage_error(self.storage().read(&key).await)? else {
                return Ok(ReleaseOutcome::NotHeld);
            };
            let mut lease: Lease = serde_json::from_slice(&stored.bytes)
                .map_err(|e| ApiError::Internal(format!("{key} is not valid JSON: {e}")))?;
            let now = SystemTime::now();
            if lease.expires_at_unix_ms <= unix_ms(now) {
                return Ok(ReleaseOutcome::NotHeld);
            }
            if lease.holder != holder {
                return Ok(ReleaseOutcome::HeldByAnother(lease));
            }
            lease.expires_at = humantime::format_rfc3339_millis(now).to_string();
            lease.expires_at_unix_ms = unix_ms(now);
            let bytes: Bytes = serde_json::to_vec_pretty(&lease)
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .into();
            match self
                .count_storage_error(self.storage().replace(&key, bytes, &stored.version).await)
            {
                Ok(()) => return Ok(ReleaseOutcome::Released(lease)),
                Err(StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "{key} changed {MAX_WRITE_ATTEMPTS} times while being released; retry"
        )))
    }
}
