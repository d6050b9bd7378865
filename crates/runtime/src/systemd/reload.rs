//! Reloads: the requests (SIGHUP, or a trigger in tests), how a service reads its configuration
//! again, and the task that answers each request with RELOADING=1 … READY=1.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use super::notify::Notifier;
use crate::config::ConfigError;

/// Reload requests: SIGHUP, which the units' `ExecReload=` sends. A service answers each with
/// [`Notifier::reload`].
#[derive(Debug)]
pub struct ReloadRequests {
    source: ReloadSource,
}

#[derive(Debug)]
enum ReloadSource {
    Hangup(tokio::signal::unix::Signal),
    Trigger(tokio::sync::mpsc::Receiver<()>),
}

/// Asks for reloads without a signal (tests, which share one process); see
/// [`ReloadRequests::manual`].
#[derive(Debug, Clone)]
pub struct ReloadTrigger {
    tx: tokio::sync::mpsc::Sender<()>,
}

impl ReloadTrigger {
    /// Asks for one reload; requests made while one waits count once, as SIGHUPs do.
    pub fn request(&self) {
        let _ = self.tx.try_send(());
    }
}

impl ReloadRequests {
    /// Starts catching SIGHUP, which from then on no longer ends the process. Call within a
    /// tokio runtime, once per process.
    pub fn listen() -> io::Result<Self> {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(Self {
            source: ReloadSource::Hangup(hangups),
        })
    }

    /// Requests that come from the returned trigger rather than from a signal.
    pub fn manual() -> (ReloadTrigger, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let requests = Self {
            source: ReloadSource::Trigger(rx),
        };
        (ReloadTrigger { tx }, requests)
    }

    /// Waits for the next request; requests that arrive before it is handled count once.
    /// `None` if no more can come (signals cannot be received, or every trigger is gone).
    pub async fn recv(&mut self) -> Option<()> {
        match &mut self.source {
            ReloadSource::Hangup(hangups) => hangups.recv().await,
            ReloadSource::Trigger(rx) => rx.recv().await,
        }
    }
}

/// Reload requests, and how to read the configuration again when one comes (the same file and
/// environment the service started with).
pub struct Reload<C> {
    pub requests: ReloadRequests,
    pub load: Box<dyn FnMut() -> Result<C, ConfigError> + Send>,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// For the log: what was read again and is in effect now, e.g. `3 tokens`.
    pub applied: String,
    /// Settings that differ from the running ones but take effect only after a restart
    /// (listen addresses, directories), as dotted keys; see
    /// [`crate::config::restart_needed`].
    pub needs_restart: Vec<String>,
}

/// Answers reload requests until `shutdown` (or until none can come).
pub(super) async fn answer_reloads<C, A, AF>(
    notifier: Notifier,
    mut reload: Reload<C>,
    mut apply: A,
    note: Arc<Mutex<Option<String>>>,
    poke: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) where
    A: FnMut(C) -> AF,
    AF: Future<Output = Result<Reloaded, String>>,
{
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            request = reload.requests.recv() => if request.is_none() { return },
        }
        tracing::info!("reload requested: reading the configuration again");
        let outcome = notifier
            .reload(async {
                match (reload.load)() {
                    Ok(config) => apply(config).await,
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
        let new_note = match outcome {
            Ok(reloaded) => {
                tracing::info!(applied = %reloaded.applied, "configuration reloaded");
                for key in &reloaded.needs_restart {
                    tracing::warn!(
                        setting = %key,
                        "changed in the configuration, but it takes effect only after a restart; still running with the previous value"
                    );
                }
                (!reloaded.needs_restart.is_empty()).then(|| {
                    format!(
                        "restart needed to apply {}",
                        reloaded.needs_restart.join(", ")
                    )
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; still running the previous configuration");
                Some(format!("reload failed, previous configuration kept: {e}"))
            }
        };
        *note.lock().unwrap_or_else(PoisonError::into_inner) = new_note;
        poke.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::systemd::testing::ARRIVAL_TIMEOUT;

    #[tokio::test]
    async fn sighup_is_a_reload_request() {
        let mut requests = ReloadRequests::listen().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
        let request = tokio::time::timeout(ARRIVAL_TIMEOUT, requests.recv()).await;
        assert_eq!(request, Ok(Some(())));
    }
}
