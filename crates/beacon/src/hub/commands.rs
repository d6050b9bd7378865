//! The bounded queue of commands (restart, stop, a run's frames) from the hub and the run
//! relay to one link's task, sized for a link that almost never gets one.
//!
//! A tokio `mpsc` channel cost every link about 800 bytes while it idled: its shared part is
//! padded to cache lines, and it allocates its first block of 32 slots when made. This one is a
//! mutex around a `VecDeque` that is unallocated while empty, the receiving task's waker, and a
//! `Notify` for senders waiting for room: about 130 bytes a link.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use super::Command;

/// A queue of at most `capacity` commands: its sending and its receiving end.
pub fn command_queue(capacity: usize) -> (CommandSender, CommandReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            capacity,
            senders: 1,
            receiver: true,
            waker: None,
        }),
        room: Notify::new(),
    });
    (
        CommandSender {
            shared: shared.clone(),
        },
        CommandReceiver { shared },
    )
}

struct Shared {
    state: Mutex<State>,
    /// Wakes senders waiting for room: one per command taken, all when the receiver goes.
    room: Notify,
}

struct State {
    queue: VecDeque<Command>,
    capacity: usize,
    /// Senders alive: the receiver sees the end once the last is gone and the queue is empty.
    senders: usize,
    /// The receiver is alive: sending fails once it is gone.
    receiver: bool,
    /// The receiving task, woken when a command comes or the last sender goes.
    waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a command was not queued; it comes back with the error.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The queue holds `capacity` commands already.
    Full(Command),
    /// The link's task is gone.
    Closed(Command),
}

/// The sending end; clones send into the same queue.
pub struct CommandSender {
    shared: Arc<Shared>,
}

impl CommandSender {
    /// Queues `command` if there is room and the receiver is alive.
    pub fn try_send(&self, command: Command) -> Result<(), SendError> {
        let mut state = self.shared.lock();
        if !state.receiver {
            return Err(SendError::Closed(command));
        }
        if state.queue.len() >= state.capacity {
            return Err(SendError::Full(command));
        }
        state.queue.push_back(command);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `command`, waiting for room; gives it back if the receiver is gone.
    pub async fn send(&self, mut command: Command) -> Result<(), Command> {
        loop {
            // Registered before the attempt, so room made between the two is not missed.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(command) {
                Ok(()) => return Ok(()),
                Err(SendError::Closed(c)) => return Err(c),
                Err(SendError::Full(c)) => command = c,
            }
            room.await;
        }
    }
}

impl Clone for CommandSender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for CommandSender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let waker = if state.senders == 0 {
            state.waker.take()
        } else {
            None
        };
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl fmt::Debug for CommandSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("CommandSender")
            .field("queued", &state.queue.len())
            .field("capacity", &state.capacity)
            .finish()
    }
}

/// The receiving end, owned by the link's task.
pub struct CommandReceiver {
    shared: Arc<Shared>,
}

impl CommandReceiver {
    /// The next command; `None` once every sender is gone and the queue is empty. Cancel-safe:
    /// a command is taken only when it is returned.
    pub async fn recv(&mut self) -> Option<Command> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Command>> {
        let mut state = self.shared.lock();
        if let Some(command) = state.queue.pop_front() {
            if state.queue.is_empty() {
                // A link holds no queue room while it idles.
                state.queue = VecDeque::new();
            }
            drop(state);
            self.shared.room.notify_one();
            return Poll::Ready(Some(command));
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for CommandReceiver {
    fn drop(&mut self) {
        self.shared.lock().receiver = false;
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use px_proto::link::FromBeacon;

    use super::*;

    fn command() -> Command {
        Box::new(FromBeacon::Heartbeat)
    }

    #[tokio::test]
    async fn commands_arrive_in_order_up_to_the_capacity_and_the_rest_are_refused() {
        let (tx, mut rx) = command_queue(2);
        tx.try_send(command()).unwrap();
        tx.clone().try_send(command()).unwrap();
        assert!(matches!(tx.try_send(command()), Err(SendError::Full(_))));
        assert_eq!(rx.recv().await, Some(command()));
        tx.try_send(command()).unwrap();
        assert_eq!(rx.recv().await, Some(command()));
        assert_eq!(rx.recv().await, Some(command()));
        drop(tx);
        assert_eq!(rx.recv().await, None, "every sender gone: the end");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_command_and_by_the_last_sender_going() {
        let (tx, mut rx) = command_queue(1);
        let receiver = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.try_send(command()).unwrap();
        drop(tx);
        assert_eq!(receiver.await.unwrap(), (Some(command()), None));
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_fails_once_the_receiver_is_gone() {
        let (tx, mut rx) = command_queue(1);
        tx.send(command()).await.unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(command()).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room: the send waits");
        assert_eq!(rx.recv().await, Some(command()));
        waiting.await.unwrap().unwrap();
        let blocked = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(command()).await })
        };
        drop(rx);
        assert!(blocked.await.unwrap().is_err(), "the receiver went");
        assert!(matches!(tx.try_send(command()), Err(SendError::Closed(_))));
    }
}
