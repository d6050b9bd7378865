//! A node's latest assignment, from the hub to its one link task: a value that is replaced,
//! and a receiver that wakes when it was, sized for one receiver.
//!
//! tokio's `watch` channel serves any number of receivers: its shared part holds eight
//! `Notify`s (to spread their wake-ups) and a lock, about 350 bytes a link while it idled. A
//! node's assignment has exactly one receiver, so a mutex around the value, its version and
//! that receiver's waker does: about 70 bytes.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

/// A value, replaced by its sender and read by one receiver, which starts having seen it.
pub fn latest<T: Clone>(value: T) -> (LatestSender<T>, LatestReceiver<T>) {
    let shared = Arc::new(Mutex::new(Slot {
        value,
        version: 0,
        sender: true,
        waker: None,
    }));
    (
        LatestSender {
            shared: shared.clone(),
        },
        LatestReceiver { shared, seen: 0 },
    )
}

struct Slot<T> {
    value: T,
    /// Counts replacements: the receiver has seen the value when its version is this.
    version: u64,
    /// The sender is alive: once it is gone, `changed` ends.
    sender: bool,
    /// The receiving task, woken by a replacement or the sender going.
    waker: Option<Waker>,
}

fn lock<T>(shared: &Mutex<Slot<T>>) -> MutexGuard<'_, Slot<T>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The sender is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sender is gone")]
pub struct Closed;

/// The sending end (the hub's node record).
pub struct LatestSender<T> {
    shared: Arc<Mutex<Slot<T>>>,
}

impl<T: Clone> LatestSender<T> {
    /// Replaces the value and wakes the receiver; returns the value replaced.
    pub fn send_replace(&self, value: T) -> T {
        let mut slot = lock(&self.shared);
        let old = std::mem::replace(&mut slot.value, value);
        slot.version += 1;
        let waker = slot.waker.take();
        drop(slot);
        if let Some(waker) = waker {
            waker.wake();
        }
        old
    }

    /// The current value.
    pub fn borrow(&self) -> T {
        lock(&self.shared).value.clone()
    }
}

impl<T> Drop for LatestSender<T> {
    fn drop(&mut self) {
        let mut slot = lock(&self.shared);
        slot.sender = false;
        let waker = slot.waker.take();
        drop(slot);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The receiving end (the link's task; tests also peek with `borrow` and `has_changed`).
pub struct LatestReceiver<T> {
    shared: Arc<Mutex<Slot<T>>>,
    seen: u64,
}

impl<T: Clone> LatestReceiver<T> {
    /// Waits until the value was replaced since this receiver last marked it seen; `Err` once
    /// the sender is gone with nothing new. Cancel-safe: nothing is marked seen here.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        poll_fn(|cx| {
            let mut slot = lock(&self.shared);
            if slot.version != self.seen {
                return Poll::Ready(Ok(()));
            }
            if !slot.sender {
                return Poll::Ready(Err(Closed));
            }
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// The current value, marked seen.
    pub fn borrow_and_update(&mut self) -> T {
        let slot = lock(&self.shared);
        self.seen = slot.version;
        slot.value.clone()
    }

    /// The current value, not marked seen.
    #[cfg(test)]
    pub fn borrow(&self) -> T {
        lock(&self.shared).value.clone()
    }

    /// Whether the value was replaced since it was last marked seen; `Err` once the sender is
    /// gone.
    #[cfg(test)]
    pub fn has_changed(&self) -> Result<bool, Closed> {
        let slot = lock(&self.shared);
        if !slot.sender {
            return Err(Closed);
        }
        Ok(slot.version != self.seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_receiver_sees_the_latest_value_once_and_the_end_when_the_sender_goes() {
        let (tx, mut rx) = latest(0);
        assert!(
            !rx.has_changed().unwrap(),
            "it starts having seen the first"
        );
        tx.send_replace(1);
        tx.send_replace(2);
        assert_eq!(rx.borrow(), 2);
        assert!(rx.has_changed().unwrap(), "borrow marks nothing seen");
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update(),
            2,
            "replaced twice, seen once: the latest"
        );
        assert!(!rx.has_changed().unwrap());
        let waiting = tokio::spawn(async move {
            let changed = rx.changed().await;
            (changed, rx.borrow_and_update(), rx.changed().await)
        });
        tokio::task::yield_now().await;
        assert_eq!(tx.send_replace(3), 2);
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Ok(()), 3, Err(Closed)));
    }
}
