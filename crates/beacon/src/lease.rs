//! Which of several Beacons is the active one (docs/src/design/control-hosts.md): the `beacon`
//! lease in apprepo's storage, taken through `PUT /v1/leases/beacon`. A standby asks for it
//! every third of its TTL and learns the active Beacon's URL from each refusal; the holder
//! renews it as often, and steps down (by ending the process) before it could lapse, so two
//! active Beacons never overlap. A holder that stops cleanly releases it.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use px_proto::lease::{BEACON_LEASE, Lease, LeaseClaim, LeaseHeld};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::reconcile::RepositoryClient;

/// File, in the data directory, that keeps this host's holder id across restarts: a Beacon
/// that comes back takes its own lease back at once instead of waiting for it to lapse.
pub const HOLDER_FILE: &str = "lease-holder";
/// Bits a generation leaves below the epoch: the first generation of an active Beacon is
/// `epoch << GENERATION_EPOCH_SHIFT`, above anything an earlier holder (a lower epoch) sent,
/// and one holder would need four billion desired-state changes to reach the next epoch's.
pub const GENERATION_EPOCH_SHIFT: u32 = 32;
/// How long after a refused lease's expiry a standby claims it: apprepo must see it lapsed.
const CLAIM_AFTER_LAPSE: Duration = Duration::from_millis(50);
/// Longest host name part of a holder id; the rest is a random suffix.
const MAX_HOST_PART: usize = 64;

/// Where this Beacon stands, shared by the lease loop, the HTTP front and the metrics.
pub struct Standing {
    active: AtomicBool,
    epoch: AtomicU64,
    /// The active Beacon's API URL, as the lease last named it (this one's own when active).
    active_url: Mutex<Option<String>>,
}

impl Standing {
    /// A standby that knows no active Beacon yet.
    pub fn standby() -> Self {
        Self {
            active: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            active_url: Mutex::new(None),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The active Beacon's API URL, when one is known.
    pub fn active_url(&self) -> Option<String> {
        self.active_url
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn saw(&self, lease: &Lease) {
        self.epoch.store(lease.epoch, Ordering::Relaxed);
        *self
            .active_url
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(lease.api_url.clone());
    }

    /// Marks this Beacon active without a lease: the only Beacon.
    pub fn activate_alone(&self, metrics: &Metrics) {
        self.active.store(true, Ordering::Release);
        metrics.lease_active.set(1);
    }

    /// Marks this Beacon active under `lease`.
    pub fn activate(&self, lease: &Lease, metrics: &Metrics) {
        self.saw(lease);
        self.active.store(true, Ordering::Release);
        metrics.lease_active.set(1);
        metrics.lease_epoch.set(lease.epoch);
    }
}

/// Milliseconds since the Unix epoch by this host's clock (0 before it).
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This host's holder id, from [`HOLDER_FILE`] or made (host name and a random suffix) and
/// kept there on the first start.
pub fn holder_id(data_dir: &Path) -> std::io::Result<String> {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(MAX_HOST_PART)
        .collect();
    holder_id_on(data_dir, if host.is_empty() { "beacon" } else { &host })
}

/// [`holder_id`] on the host named `host`. A kept id made on another host is not reused: a
/// data directory copied to a second control host (a cloned disk image) must not make two
/// Beacons one holder, which apprepo would grant the lease to both.
fn holder_id_on(data_dir: &Path, host: &str) -> std::io::Result<String> {
    let path = data_dir.join(HOLDER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let kept = text.trim();
            if kept
                .rsplit_once(':')
                .is_some_and(|(made_on, _)| made_on == host)
            {
                return Ok(kept.to_string());
            }
            if !kept.is_empty() {
                tracing::warn!(
                    kept,
                    host,
                    "the lease holder id was made on another host; making a new one"
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("{host}:{:016x}", rand::random::<u64>());
    px_runtime::fs::write_atomic(&path, id.as_bytes())?;
    Ok(id)
}

/// What one claim came to.
enum Answer {
    Granted(Lease),
    Held(Lease),
}

/// The lease loop's side of apprepo.
pub struct LeaseClient {
    client: RepositoryClient,
    claim: LeaseClaim,
    ttl: Duration,
}

impl LeaseClient {
    pub fn new(client: RepositoryClient, holder: String, ttl: Duration, api_url: String) -> Self {
        Self {
            client,
            claim: LeaseClaim {
                holder,
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                api_url,
            },
            ttl,
        }
    }

    pub fn holder(&self) -> &str {
        &self.claim.holder
    }

    /// How often the lease is asked for or renewed: a third of its TTL, so two renewals may
    /// fail before the holder steps down.
    fn period(&self) -> Duration {
        self.ttl / 3
    }

    async fn claim(&self, timeout: Duration) -> Result<Answer, String> {
        let path = format!("/v1/leases/{BEACON_LEASE}");
        let (status, body) = self
            .client
            .put_answered(&path, &self.claim, timeout)
            .await?;
        if status == reqwest::StatusCode::CONFLICT {
            let held: LeaseHeld = serde_json::from_slice(&body)
                .map_err(|e| format!("PUT {path}: 409 without a lease: {e}"))?;
            return Ok(Answer::Held(held.lease));
        }
        serde_json::from_slice(&body)
            .map(Answer::Granted)
            .map_err(|e| format!("PUT {path}: {status} without a lease: {e}"))
    }

    /// Asks for the lease until it is granted, every [`Self::period`] or sooner when the
    /// refused lease lapses sooner ([`next_claim_in`]); each refusal tells `standing`
    /// which Beacon is active. Returns the lease and when the claim that got it was sent (its
    /// TTL runs from no earlier); `None` when `shutdown` comes first.
    pub async fn acquire(
        &self,
        standing: &Standing,
        shutdown: &CancellationToken,
    ) -> Option<(Lease, Instant)> {
        let mut last_holder = String::new();
        loop {
            let sent = Instant::now();
            let wait = match self.claim(self.period()).await {
                Ok(Answer::Granted(lease)) => return Some((lease, sent)),
                Ok(Answer::Held(lease)) => {
                    if lease.holder != last_holder {
                        tracing::info!(active = %lease.holder, api_url = %lease.api_url, epoch = lease.epoch, "standing by: another Beacon holds the lease");
                        last_holder = lease.holder.clone();
                    }
                    standing.saw(&lease);
                    next_claim_in(self.period(), &lease, unix_ms_now())
                }
                Err(error) => {
                    tracing::warn!(%error, "standing by: cannot reach apprepo for the lease");
                    self.period()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Renews the lease granted at `granted_from` (when the claim that got it was sent) every
    /// [`Self::period`] until `shutdown` (`Ok`), or returns why this Beacon must step down:
    /// another holder has it, or no renewal got through and the lease would lapse within a
    /// sixth of its TTL, the time left to close the links before a standby may take over.
    pub async fn keep(
        &self,
        mut granted_from: Instant,
        standing: &Standing,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        loop {
            let step_down_at = granted_from + self.ttl - self.ttl / 6;
            let next = (Instant::now() + self.period()).min(step_down_at);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            if now >= step_down_at {
                return Err(format!(
                    "stepping down: the lease could not be renewed for {} and would lapse",
                    humantime::format_duration(round_ms(now - granted_from))
                ));
            }
            let sent = Instant::now();
            match self.claim(step_down_at - sent).await {
                Ok(Answer::Granted(lease)) => {
                    granted_from = sent;
                    standing.saw(&lease);
                }
                Ok(Answer::Held(lease)) => {
                    return Err(format!(
                        "stepping down: Beacon {:?} holds the lease now (epoch {})",
                        lease.holder, lease.epoch
                    ));
                }
                Err(error) => tracing::warn!(%error, "cannot renew the lease; retrying"),
            }
        }
    }
}

impl LeaseClient {
    /// Gives the lease up, once this Beacon has stopped acting (its links closed, its tasks
    /// drained), so a standby's next claim takes it at once rather than after the TTL. Best
    /// effort within `timeout`: if apprepo does not answer, the lease lapses as after a crash.
    pub async fn release(&self, timeout: Duration) {
        let path = format!("/v1/leases/{BEACON_LEASE}?holder={}", self.claim.holder);
        match self.client.delete(&path, timeout).await {
            Ok(reqwest::StatusCode::OK) => {
                tracing::info!(holder = %self.claim.holder, "lease released for a standby to take")
            }
            Ok(reqwest::StatusCode::CONFLICT) => {
                tracing::info!("lease not released: another Beacon holds it already")
            }
            Ok(_) => tracing::info!("lease not released: it had lapsed already"),
            Err(error) => {
                tracing::warn!(%error, "lease not released; a standby takes it once it lapses")
            }
        }
    }
}

/// When a standby refused `held` asks again, at `now_unix_ms` by its own clock, claiming every
/// `period` otherwise: just after the lease lapses, if that comes sooner. A holder that renews
/// keeps pushing its expiry out, so this costs no more claims than the period does; a holder
/// that vanished stops renewing, and its lease is taken as soon as it lapses rather than up to
/// a period later. Never sooner than a quarter of the period, so a clock ahead of apprepo's
/// (which the expiry is reckoned by) cannot make a standby ask in a loop.
fn next_claim_in(period: Duration, held: &Lease, now_unix_ms: u64) -> Duration {
    let until_lapse = Duration::from_millis(held.expires_at_unix_ms.saturating_sub(now_unix_ms));
    (until_lapse + CLAIM_AFTER_LAPSE).clamp(period / 4, period)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The generation a Beacon that became active under `epoch` starts above.
pub fn generation_floor(epoch: u64) -> u64 {
    epoch.saturating_mul(1 << GENERATION_EPOCH_SHIFT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_holder_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = holder_id(dir.path()).unwrap();
        assert!(
            px_proto::lease::check_claim(&LeaseClaim {
                holder: first.clone(),
                ttl_ms: 6000,
                api_url: "https://a".into()
            })
            .is_ok()
        );
        assert_eq!(holder_id(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(holder_id(other.path()).unwrap(), first);
    }

    #[test]
    fn a_standby_claims_just_after_the_refused_lease_lapses_within_a_period() {
        let period = Duration::from_secs(2);
        let held = |expires_at_unix_ms| Lease {
            holder: "control-1:1".into(),
            epoch: 1,
            expires_at: String::new(),
            expires_at_unix_ms,
            api_url: "https://a".into(),
        };
        let now = 1_000_000;
        // Renewed a moment ago: lapses in 6 s, so the next claim is a period away.
        assert_eq!(next_claim_in(period, &held(now + 6000), now), period);
        // Its holder stopped renewing 5 s ago: the claim comes just after the lapse.
        assert_eq!(
            next_claim_in(period, &held(now + 1000), now),
            Duration::from_millis(1000) + CLAIM_AFTER_LAPSE
        );
        // Lapsed by this host's clock but refused (apprepo's clock is behind): not a loop.
        assert_eq!(next_claim_in(period, &held(now - 3000), now), period / 4);
    }

    #[test]
    fn a_holder_id_copied_to_another_host_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = holder_id_on(dir.path(), "control-1").unwrap();
        assert!(first.starts_with("control-1:"));
        assert_eq!(holder_id_on(dir.path(), "control-1").unwrap(), first);
        let copied = holder_id_on(dir.path(), "control-2").unwrap();
        assert!(copied.starts_with("control-2:"), "{copied}");
        assert_eq!(holder_id_on(dir.path(), "control-2").unwrap(), copied);
    }

    #[test]
    fn each_epoch_starts_above_every_generation_of_the_one_before() {
        assert_eq!(generation_floor(1), 1 << 32);
        assert!(generation_floor(2) > generation_floor(1) + u64::from(u32::MAX));
    }
}
