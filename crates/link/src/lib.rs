//! The client side of the Beacon control link, shared by the two services that connect to
//! Beacon (Maestro and apprepo; Beacon is the server): the `[beacon]` config table and its
//! resolution, connecting over TCP and TLS, the `Hello`/`Welcome` handshake, and the
//! reconnect loop that tries every configured Beacon in turn (only the active one accepts
//! links) with jittered exponential backoff between failed rounds. What a service does on an established
//! link is its own [`Client`].

mod config;
mod link;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use px_proto::link::Hello;
use tokio_util::sync::CancellationToken;

pub use crate::config::{BeaconAddr, BeaconConfig, LinkSettings, MAX_BEACON_ADDRS, ResolveError};
pub use crate::link::{CONNECT_TIMEOUT, Link, LinkError, connect, heartbeats};

/// First wait before connecting again after a round in which no Beacon took the link; each
/// failed round in a row doubles it (with
/// ±50% jitter, so a fleet does not reconnect in step after a Beacon restart).
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts: a Beacon back from an outage is found within half a minute,
/// while thousands of clients cost it at most one attempt each per 15 to 45 seconds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long after a Beacon fell silent the rounds leave it out (when other Beacons are
/// configured): its host may be gone for good, and a connect to it only waits for
/// [`CONNECT_TIMEOUT`], while the Beacon taking over opens its port within a lease's TTL
/// (6 s by default). Afterwards it is tried again, last in each round.
pub const SILENT_BEACON_SKIPPED_FOR: Duration = Duration::from_secs(30);
/// Longest wait between rounds while a silent Beacon is left out (before the ±50% jitter): the
/// next active Beacon is found within a second and a half of opening its port. Each failed round costs the Beacons a refused
/// connect (no TLS), so even a large fleet trying once a second is cheap.
pub const FAILOVER_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a service does with its link to Beacon.
pub trait Client: Send {
    /// Said after "beacon link down" and "beacon link lost; reconnecting" in the logs: what
    /// carries on meanwhile, e.g. "; apps keep serving". Default: nothing.
    const MEANWHILE: &'static str = "";

    /// Completes the `Hello` for the next connect (its protocol, role, name and token are
    /// set): built afresh for every connect, as a Maestro's carries its state of the moment.
    /// Default: sent as it is.
    fn introduce(&mut self, hello: &mut Hello) {
        let _ = hello;
    }

    /// Runs on an established link until the link fails (an error: [`run`] reconnects) or
    /// the service has nothing more to send (`Ok`: [`run`] ends). Dropped at shutdown, after
    /// which the link is closed.
    fn session(&mut self, link: &mut Link) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Runs while the link is down, between two attempts, and is dropped when the next attempt
    /// starts, so it must be cancel-safe; returning ends [`run`], as the service has nothing
    /// more to send. Default: waits for the next attempt.
    fn unlinked(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Keeps `client` linked to Beacon until `shutdown` (or until the client has nothing more to
/// send): connects, runs [`Client::session`] and, whenever the link fails or cannot be made,
/// connects again. A round tries every configured Beacon in turn, starting from the one that
/// last took the link and moving on at once when one refuses the connection or fails the
/// handshake (a standby Beacon does not listen, and one stepping down closes its links), so a
/// client follows a failover within one round; only once a whole round failed does it wait a
/// jittered, doubling backoff. A Beacon that fell silent (its host vanished: no FIN, no RST)
/// is left out of the rounds for [`SILENT_BEACON_SKIPPED_FOR`], as a connect to it would only
/// wait for its timeout, and the backoff meanwhile stays under [`FAILOVER_BACKOFF_MAX`], so
/// the client links to the Beacon taking over within 1.5 s of its opening its port; a
/// client that knows no other Beacon keeps trying the silent one. `settings.linked` says
/// whether a link is up.
pub async fn run<C: Client>(settings: LinkSettings, mut client: C, shutdown: CancellationToken) {
    let count = settings.beacons.len();
    let mut failed_rounds = 0u32;
    // The Beacon a round starts with: the one that last took the link, which is the active
    // one unless it has just stepped down.
    let mut first = 0;
    // The Beacon that fell silent, and when: left out of the rounds for a while.
    let mut silent: Option<(usize, tokio::time::Instant)> = None;
    loop {
        let mut last_failure = None;
        let mut linked = None;
        silent = silent.filter(|(_, since)| since.elapsed() < SILENT_BEACON_SKIPPED_FOR);
        for offset in 0..count {
            let index = (first + offset) % count;
            if silent.is_some_and(|(left_out, _)| left_out == index) {
                continue;
            }
            let beacon = &settings.beacons[index];
            let mut hello = settings.hello();
            client.introduce(&mut hello);
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                connected = connect(&settings, beacon, hello) => connected,
            };
            match connected {
                Ok(link) => {
                    linked = Some((index, link));
                    break;
                }
                Err(reason) => {
                    if offset + 1 < count {
                        tracing::info!(addr = %beacon.addr, %reason, "beacon did not take the link; trying the next");
                    }
                    last_failure = Some((beacon.addr.as_str(), reason));
                }
            }
        }
        let Some((index, mut link)) = linked else {
            let cap = if silent.is_some() {
                FAILOVER_BACKOFF_MAX
            } else {
                BACKOFF_MAX
            };
            let wait = px_runtime::backoff::jittered(BACKOFF_MIN, cap, failed_rounds);
            failed_rounds = failed_rounds.saturating_add(1);
            if let Some((addr, reason)) = last_failure {
                tracing::warn!(%addr, %reason, retry_in = ?wait, "beacon link down{}", C::MEANWHILE);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => continue,
                () = client.unlinked() => return,
            }
        };
        first = index;
        failed_rounds = 0;
        settings.linked.store(true, Ordering::Relaxed);
        let ended = tokio::select! {
            () = shutdown.cancelled() => {
                link.close().await;
                return;
            }
            ended = client.session(&mut link) => ended,
        };
        settings.linked.store(false, Ordering::Relaxed);
        match ended {
            Ok(()) => return,
            Err(error) => {
                let addr = &settings.beacons[index].addr;
                tracing::warn!(%addr, %error, "beacon link lost; reconnecting{}", C::MEANWHILE);
                if matches!(error, LinkError::Silent(_)) && count > 1 {
                    first = (index + 1) % count;
                    silent = Some((index, tokio::time::Instant::now()));
                }
            }
        }
    }
}
