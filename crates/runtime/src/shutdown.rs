//! The process-wide shutdown signal: SIGTERM or Ctrl-C cancels one root token that every task
//! watches; a second signal is left to the default handler's successor (the drain deadline).
//! [`CriticalTasks`] ties a service's lifetime to the tasks it cannot live without: when one of
//! them ends on its own, the root token is cancelled and the service stops with an error, so
//! its service manager restarts it instead of leaving it running half deaf.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Returns a token cancelled on SIGTERM or SIGINT. Call once, from `main`.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}

/// How a critical task ended while its service was running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskEnded {
    #[error("{task} stopped while the service was running")]
    Returned { task: &'static str },
    #[error("{task} failed: {error}")]
    Failed { task: &'static str, error: String },
    #[error("{task} panicked: {message}")]
    Panicked { task: &'static str, message: String },
}

impl TaskEnded {
    /// The name the task was spawned with.
    pub fn task(&self) -> &'static str {
        match self {
            Self::Returned { task } | Self::Failed { task, .. } | Self::Panicked { task, .. } => {
                task
            }
        }
    }
}

/// What a critical task's future returns: nothing, or a result whose error says why it
/// stopped (logged and kept in [`TaskEnded::Failed`]).
pub trait TaskOutcome {
    fn into_error(self) -> Option<String>;
}

impl TaskOutcome for () {
    fn into_error(self) -> Option<String> {
        None
    }
}

impl<E: std::fmt::Display> TaskOutcome for Result<(), E> {
    fn into_error(self) -> Option<String> {
        self.err().map(|e| e.to_string())
    }
}

/// Spawns a service's critical tasks (its servers, its periodic work) on its `TaskTracker`.
/// Such a task runs until shutdown; if it returns or panics while `shutdown` is not
/// cancelled, the error is logged naming the task, kept for [`CriticalTasks::ended`], and
/// `shutdown` is cancelled, so the service drains and its `run` returns an error: under
/// systemd the process exits non-zero and is restarted.
#[derive(Clone)]
pub struct CriticalTasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    ended: Arc<Mutex<Option<TaskEnded>>>,
}

impl CriticalTasks {
    pub fn new(tracker: &TaskTracker, shutdown: &CancellationToken) -> Self {
        Self {
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            ended: Arc::new(Mutex::new(None)),
        }
    }

    /// Spawns `future` as the critical task `task` (a name people read in the log).
    pub fn spawn<F>(&self, task: &'static str, future: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutcome + Send + 'static,
    {
        let handle = self.tracker.spawn(future);
        let this = self.clone();
        // A second task waits for the first, so a panic is seen too (it unwinds only the
        // task that panicked).
        self.tracker.spawn(async move {
            let ended = match handle.await {
                Ok(outcome) => match outcome.into_error() {
                    None => TaskEnded::Returned { task },
                    Some(error) => TaskEnded::Failed { task, error },
                },
                Err(e) if e.is_panic() => TaskEnded::Panicked {
                    task,
                    message: panic_message(e.into_panic()),
                },
                // Aborted: the runtime itself is going away.
                Err(_) => return,
            };
            if this.shutdown.is_cancelled() {
                if let TaskEnded::Panicked { .. } = ended {
                    tracing::error!(task, error = %ended, "a critical task panicked during shutdown");
                }
                return;
            }
            tracing::error!(task, error = %ended, "a critical task ended; stopping the service so that it is restarted");
            this.ended
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert(ended);
            this.shutdown.cancel();
        });
    }

    /// The first critical task that ended while the service was running, if any: the reason
    /// the service stopped, for its `run` to return.
    pub fn ended(&self) -> Option<TaskEnded> {
        self.ended
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Whether an error from `accept` means the listener will never accept again: the socket is
/// not listening any more (`EINVAL`), or is not an open socket at all. An accept loop, being a
/// critical task, should then end instead of retrying forever; every other error (out of file
/// descriptors, a connection aborted before it was accepted, network errors `accept(2)` passes
/// on) is worth a retry.
pub fn accept_error_is_fatal(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e).is_some_and(|errno| {
        matches!(
            errno,
            Errno::INVAL | Errno::BADF | Errno::NOTSOCK | Errno::FAULT
        )
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    /// Long enough for any task here to end; the tests wait on tokens and trackers, not time.
    const WAIT: Duration = Duration::from_secs(10);

    fn out_of_range() {
        panic!("index out of range")
    }

    async fn drained(tracker: &TaskTracker) {
        tracker.close();
        tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    }

    #[tokio::test]
    async fn a_task_that_returns_while_running_stops_the_service_and_is_named() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let critical = CriticalTasks::new(&tracker, &shutdown);
        let other = shutdown.clone();
        critical.spawn("sweeper", async move { other.cancelled().await });
        critical.spawn("link server", async {});
        tokio::time::timeout(WAIT, shutdown.cancelled())
            .await
            .unwrap();
        drained(&tracker).await;
        assert_eq!(
            critical.ended(),
            Some(TaskEnded::Returned {
                task: "link server"
            })
        );
        assert_eq!(
            critical.ended().unwrap().to_string(),
            "link server stopped while the service was running"
        );
    }

    #[tokio::test]
    async fn a_task_that_fails_or_panics_stops_the_service_with_its_reason() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let critical = CriticalTasks::new(&tracker, &shutdown);
        critical.spawn("http server", async {
            Err::<(), _>("address in use".to_string())
        });
        drained(&tracker).await;
        assert!(shutdown.is_cancelled());
        assert_eq!(
            critical.ended().unwrap().to_string(),
            "http server failed: address in use"
        );

        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let critical = CriticalTasks::new(&tracker, &shutdown);
        critical.spawn("reconciler", async { out_of_range() });
        drained(&tracker).await;
        assert!(shutdown.is_cancelled());
        assert_eq!(
            critical.ended(),
            Some(TaskEnded::Panicked {
                task: "reconciler",
                message: "index out of range".into()
            })
        );
    }

    #[tokio::test]
    async fn tasks_that_end_because_of_shutdown_are_no_failure() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let critical = CriticalTasks::new(&tracker, &shutdown);
        for task in ["link server", "sweeper"] {
            let token = shutdown.clone();
            critical.spawn(task, async move { token.cancelled().await });
        }
        // Nothing ends before the signal.
        tokio::task::yield_now().await;
        assert!(!shutdown.is_cancelled());
        shutdown.cancel();
        drained(&tracker).await;
        assert_eq!(critical.ended(), None);
    }

    #[test]
    fn only_a_broken_listener_ends_an_accept_loop() {
        use rustix::io::Errno;
        let error = |errno: Errno| std::io::Error::from_raw_os_error(errno.raw_os_error());
        for fatal in [Errno::INVAL, Errno::BADF, Errno::NOTSOCK] {
            assert!(accept_error_is_fatal(&error(fatal)), "{fatal:?}");
        }
        for transient in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::CONNABORTED,
            Errno::PERM,
            Errno::PROTO,
            Errno::NETDOWN,
            Errno::HOSTUNREACH,
        ] {
            assert!(!accept_error_is_fatal(&error(transient)), "{transient:?}");
        }
        assert!(!accept_error_is_fatal(&std::io::Error::other(
            "not an errno"
        )));
    }

    #[tokio::test]
    async fn only_the_first_task_to_end_is_kept() {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let critical = CriticalTasks::new(&tracker, &shutdown);
        let (first_done, first_ended) = tokio::sync::oneshot::channel::<()>();
        critical.spawn("first", async move {
            let _ = first_done.send(());
        });
        first_ended.await.ok();
        tokio::time::timeout(WAIT, shutdown.cancelled())
            .await
            .unwrap();
        // The second returns after the shutdown the first caused: not a failure of its own.
        critical.spawn("second", async {});
        drained(&tracker).await;
        assert_eq!(critical.ended().unwrap().task(), "first");
    }
}
