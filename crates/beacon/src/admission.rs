//! Who may start a control link: until a peer's `Hello` is verified it holds one of a few
//! slots, in total and per source address, so peers that never prove themselves cannot take
//! the room of those that do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most connections at once that have not had their `Hello` verified. A handshake takes
/// milliseconds, so even 10 000 Maestros reconnecting after a Beacon restart pass through 1024
/// slots in seconds, while what the unproved can hold (1024 × `MAX_HELLO_BYTES` buffered, 1024
/// TLS states) stays small next to `MAX_LINKS` established links. Beyond it, connections wait
/// in the kernel's backlog.
pub const MAX_UNAUTHENTICATED: usize = 1024;
/// Most unverified connections from one source address. One host runs one Maestro or one
/// apprepo, which opens one link at a time; 16 leaves room for a NAT in front of a few hosts and
/// for retries racing a slow handshake, and keeps one address from taking the global slots.
/// Beyond it, a connection is closed at once.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// How long a peer has for the TLS handshake and its `Hello`, from the accept. A real one needs
/// a few round trips; five seconds is ample on a slow network, and short enough that a peer
/// holding its slot silent gives it back soon. Below the clients' `HANDSHAKE_TIMEOUT`, so a
/// client sees Beacon's refusal rather than its own timeout.
pub const PREAUTH_DEADLINE: Duration = Duration::from_secs(5);

/// The slots of unverified connections.
pub struct Admission {
    total: Arc<Semaphore>,
    /// Unverified connections per source address; an address leaves the map when its count
    /// reaches zero, so the map holds at most [`MAX_UNAUTHENTICATED`] entries.
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One unverified connection's slot, given back when dropped (after its `Hello` was verified,
/// or when it was refused or cut).
pub struct Unverified {
    admission: Arc<Admission>,
    source: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(MAX_UNAUTHENTICATED)),
            per_source: Mutex::new(HashMap::new()),
        })
    }

    /// Waits for one of the [`MAX_UNAUTHENTICATED`] slots; `None` once closed.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().acquire_owned().await.ok()
    }

    /// Admits a connection from `source` holding a global `slot`, unless that address already
    /// has [`MAX_UNAUTHENTICATED_PER_SOURCE`] unverified connections.
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        slot: OwnedSemaphorePermit,
    ) -> Option<Unverified> {
        let mut per_source = self
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = per_source.entry(source).or_insert(0);
        if *count >= MAX_UNAUTHENTICATED_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(Unverified {
            admission: self.clone(),
            source,
            _total: slot,
        })
    }
}

impl Drop for Unverified {
    fn drop(&mut self) {
        let mut per_source = self
            .admission
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_address_is_held_to_its_share_and_gets_it_back() {
        let admission = Admission::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_UNAUTHENTICATED_PER_SOURCE {
            let slot = admission.slot().await.unwrap();
            held.push(admission.admit(a, slot).unwrap());
        }
        let slot = admission.slot().await.unwrap();
        assert!(admission.admit(a, slot).is_none());
        let slot = admission.slot().await.unwrap();
        assert!(admission.admit(b, slot).is_some());
        held.pop();
        let slot = admission.slot().await.unwrap();
        assert!(admission.admit(a, slot).is_some());
        drop(held);
        assert_eq!(admission.per_source.lock().unwrap().len(), 0);
        assert_eq!(admission.total.available_permits(), MAX_UNAUTHENTICATED);
    }
}
