//! `Systemd::ready`: what a service starts once its listeners and state are good (READY=1, the
//! STATUS= line kept current, watchdog pings behind the liveness probe, reloads, STOPPING=1).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Systemd;
use super::notify::{Notifier, monotonic_usec};
use super::reload::{Reloaded, answer_reloads};
use super::watchdog::{run_probes, spawn_watchdog};

/// How often a running service's STATUS= line is recomputed. It is sent only when it changed,
/// so systemd gets at most one status message per interval (and one after each reload), and a
/// person reading `systemctl status` sees a change within five seconds.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

impl<C: Send + 'static> Systemd<C> {
    /// Call once the service is ready: its listeners are open and its state is loaded. Sends
    /// `READY=1`, then, on `tracker` until `shutdown`:
    /// - keeps `STATUS=` at what `status()` says (checked every [`STATUS_INTERVAL`]), with a
    ///   note after a reload that failed or changed settings that need a restart;
    /// - pings the watchdog while `probe()` keeps passing: it runs every half ping interval
    ///   and must answer within that time, and a ping is sent only if it passed within the
    ///   last interval. It should prove the service's own loops work (a task it spawns runs, a
    ///   lock it takes is free, its server answers), and do any blocking inside the future;
    /// - answers each reload request with `RELOADING=1`, the configuration read again and
    ///   given to `apply`, then `READY=1`; a configuration that does not load, or that `apply`
    ///   refuses, is logged and the service keeps running as it was;
    /// - sends `STOPPING=1` when `shutdown` is cancelled.
    pub fn ready<S, P, PF, A, AF>(
        self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        status: S,
        probe: P,
        apply: A,
    ) where
        S: FnMut() -> String + Send + 'static,
        P: FnMut() -> PF + Send + 'static,
        PF: Future<Output = Result<(), String>> + Send + 'static,
        A: FnMut(C) -> AF + Send + 'static,
        AF: Future<Output = Result<Reloaded, String>> + Send + 'static,
    {
        let notifier = self.notifier;
        notifier.ready();
        let note: Arc<Mutex<Option<String>>> = Arc::default();
        let poke = Arc::new(tokio::sync::Notify::new());
        if notifier.is_enabled() {
            tracker.spawn(keep_status(
                notifier.clone(),
                status,
                note.clone(),
                poke.clone(),
                shutdown.clone(),
            ));
            let stopping = notifier.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                stop.cancelled().await;
                stopping.stopping();
                stopping.status("stopping");
            });
            if let Some(interval) = self.watchdog {
                let last_pass = Arc::new(AtomicU64::new(monotonic_usec()));
                tracker.spawn(run_probes(
                    probe,
                    interval / 2,
                    last_pass.clone(),
                    shutdown.clone(),
                ));
                let fresh = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
                let pinging = spawn_watchdog(
                    notifier.clone(),
                    interval,
                    move || {
                        monotonic_usec().saturating_sub(last_pass.load(Ordering::SeqCst)) <= fresh
                    },
                    shutdown.clone(),
                );
                tracker.spawn(async move {
                    let _ = pinging.await;
                });
            }
        }
        if let Some(reload) = self.reload {
            tracker.spawn(answer_reloads(
                notifier,
                reload,
                apply,
                note,
                poke,
                shutdown.clone(),
            ));
        }
    }
}

/// Sends `status()` (and the reload note) whenever it changed, until `shutdown`.
async fn keep_status(
    notifier: Notifier,
    mut status: impl FnMut() -> String,
    note: Arc<Mutex<Option<String>>>,
    poke: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
            () = poke.notified() => {}
        }
        let mut line = status();
        if let Some(note) = note.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            line = format!("{line}; {note}");
        }
        if line != sent {
            notifier.status(&line);
            sent = line;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use crate::config::ConfigError;
    use crate::systemd::testing::{ARRIVAL_TIMEOUT, notifier_for};
    use crate::systemd::{Reload, ReloadRequests};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_service_reports_reloads_pings_and_stops_in_order() {
        // Short enough to see pings quickly; no assertion depends on its timing.
        const PING_INTERVAL: Duration = Duration::from_millis(40);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = tokio::net::UnixDatagram::bind(&path).unwrap();
        // Watchdog pings are counted as they come; every other notification is queued.
        let pings = Arc::new(AtomicU64::new(0));
        let (queue, mut others) = tokio::sync::mpsc::unbounded_channel();
        let counted = pings.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0; 512];
            while let Ok(n) = systemd.recv(&mut buf).await {
                let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                if message == "WATCHDOG=1" {
                    counted.fetch_add(1, Ordering::SeqCst);
                } else if queue.send(message).is_err() {
                    return;
                }
            }
        });
        let mut next = async || {
            tokio::time::timeout(ARRIVAL_TIMEOUT, others.recv())
                .await
                .expect("a notification")
                .unwrap()
        };
        let wait_for_pings = async |more: u64| {
            let from = pings.load(Ordering::SeqCst);
            let since = Instant::now();
            while pings.load(Ordering::SeqCst) < from + more {
                assert!(since.elapsed() < ARRIVAL_TIMEOUT, "no watchdog pings");
                tokio::time::sleep(PING_INTERVAL / 4).await;
            }
        };

        // Configurations are numbers here; 0 does not load and 13 is refused by `apply`.
        let (trigger, requests) = ReloadRequests::manual();
        let next_config = Arc::new(AtomicU64::new(0));
        let load_config = next_config.clone();
        let manager = Systemd {
            notifier: notifier_for(&path),
            watchdog: Some(PING_INTERVAL),
            reload: Some(Reload {
                requests,
                load: Box::new(move || match load_config.load(Ordering::SeqCst) {
                    0 => Err(ConfigError::one("`listen`: invalid socket address")),
                    n => Ok(n),
                }),
            }),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let probe_alive = alive.clone();
        let applied = Arc::new(AtomicU64::new(1));
        let apply_to = applied.clone();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        manager.ready(
            &tracker,
            &shutdown,
            || "serving 2 apps".to_owned(),
            move || {
                std::future::ready(if probe_alive.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("stuck".to_owned())
                })
            },
            move |config: u64| {
                let apply_to = apply_to.clone();
                async move {
                    if config == 13 {
                        return Err("certs_dir: no such directory".to_owned());
                    }
                    apply_to.store(config, Ordering::SeqCst);
                    Ok(Reloaded {
                        applied: format!("config {config}"),
                        needs_restart: if config == 3 {
                            vec!["listen".into()]
                        } else {
                            Vec::new()
                        },
                    })
                }
            },
        );

        assert_eq!(next().await, "READY=1");
        assert_eq!(next().await, "STATUS=serving 2 apps");
        wait_for_pings(2).await;

        // A configuration that does not load: the previous one stays, and the status says so.
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\nMONOTONIC_USEC="));
        let failed = "reload failed, previous configuration kept";
        assert!(next().await.contains("`listen`: invalid socket address"));
        assert_eq!(next().await, "READY=1");
        let status = next().await;
        assert!(
            status.starts_with(&format!(
                "STATUS=serving 2 apps; {failed}: invalid configuration:"
            )),
            "{status}"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 1);

        // One `apply` refuses.
        next_config.store(13, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert!(next().await.ends_with("certs_dir: no such directory"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(
            next().await,
            format!("STATUS=serving 2 apps; {failed}: certs_dir: no such directory")
        );

        // A good one, with a setting that needs a restart, then a good one without.
        next_config.store(3, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(
            next().await,
            "STATUS=serving 2 apps; restart needed to apply listen"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 3);
        next_config.store(4, Ordering::SeqCst);
        trigger.request();
        assert!(next().await.starts_with("RELOADING=1\n"));
        assert_eq!(next().await, "READY=1");
        assert_eq!(next().await, "STATUS=serving 2 apps");

        // A failing probe stops the pings; they come back once it passes.
        alive.store(false, Ordering::SeqCst);
        tokio::time::sleep(PING_INTERVAL * 3).await;
        let before = pings.load(Ordering::SeqCst);
        tokio::time::sleep(PING_INTERVAL * 5).await;
        assert!(
            pings.load(Ordering::SeqCst) <= before + 1,
            "pinged while the probe failed"
        );
        alive.store(true, Ordering::SeqCst);
        let resumed = pings.load(Ordering::SeqCst);
        let probe_back = Instant::now();
        while pings.load(Ordering::SeqCst) == resumed {
            assert!(
                probe_back.elapsed() < ARRIVAL_TIMEOUT,
                "pings never resumed"
            );
            tokio::time::sleep(PING_INTERVAL).await;
        }

        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(ARRIVAL_TIMEOUT, tracker.wait())
            .await
            .expect("every task ends on shutdown");
        assert_eq!(next().await, "STOPPING=1");
        assert_eq!(next().await, "STATUS=stopping");
        assert!(others.try_recv().is_err(), "nothing after stopping");
        reader.abort();
    }
}
