//! The watchdog: how often `WatchdogSec=` asks for a ping, the task that pings while the
//! service's liveness check holds, and the probes that make up that check.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::env_string;
use super::notify::{Notifier, monotonic_usec};

/// The watchdog is pinged this many times per `WatchdogSec=`, as sd_watchdog_enabled(3)
/// advises (every half timeout), so one late ping does not get the service killed.
pub const PINGS_PER_WATCHDOG_TIMEOUT: u32 = 2;

/// How often to ping the watchdog: half of `WATCHDOG_USEC` ([`PINGS_PER_WATCHDOG_TIMEOUT`]),
/// or `None` when the unit has no `WatchdogSec=` (or `WATCHDOG_PID` names another process).
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        env_string("WATCHDOG_USEC").as_deref(),
        env_string("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(our_pid)
    {
        return None;
    }
    let usec = usec?;
    match usec.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(usec) => Some(Duration::from_micros(usec) / PINGS_PER_WATCHDOG_TIMEOUT),
        Err(_) => {
            tracing::warn!(
                WATCHDOG_USEC = usec,
                "not a number of microseconds; not pinging the watchdog"
            );
            None
        }
    }
}

/// Spawns, on the current tokio runtime, a task that pings the watchdog every `interval`
/// while `is_alive()` holds, until `shutdown` is cancelled. A service whose main loop is
/// wedged fails its own `is_alive` check, and a wedged runtime cannot run the task: either
/// way the pings stop and systemd restarts the service after `WatchdogSec=`.
pub fn spawn_watchdog(
    notifier: Notifier,
    interval: Duration,
    is_alive: impl Fn() -> bool + Send + 'static,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut was_alive = true;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let alive = is_alive();
            if alive {
                notifier.watchdog();
            }
            match (was_alive, alive) {
                (true, false) => tracing::warn!(
                    "liveness check failed: no longer pinging the systemd watchdog, which restarts the service unless it recovers"
                ),
                (false, true) => {
                    tracing::info!("liveness check passes again: pinging the systemd watchdog")
                }
                _ => {}
            }
            was_alive = alive;
        }
    })
}

/// Runs `probe` every `every` (each given as long to answer) and records when it last passed.
pub(super) async fn run_probes<P, PF>(
    mut probe: P,
    every: Duration,
    last_pass: Arc<AtomicU64>,
    shutdown: CancellationToken,
) where
    P: FnMut() -> PF,
    PF: Future<Output = Result<(), String>>,
{
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let outcome = tokio::time::timeout(every, probe())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {every:?}")));
        match outcome {
            Ok(()) => {
                last_pass.store(monotonic_usec(), Ordering::SeqCst);
                if failing {
                    tracing::info!("liveness probe passes again");
                }
                failing = false;
            }
            Err(reason) => {
                if !failing {
                    tracing::warn!(%reason, "liveness probe failed");
                }
                failing = true;
            }
        }
    }
}

/// Whether an HTTP server answers on `addr` (an unspecified address stands for this host): a
/// `GET path` whose response starts with a status line, over TLS when `tls` (any certificate
/// accepted: see [`crate::tls::self_probe_config`]). Any status counts: a liveness probe asks
/// whether the accept loop and the router run, not whether the service is healthy.
pub async fn http_answers(addr: SocketAddr, path: &str, tls: bool) -> Result<(), String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    if !tls {
        return ask(stream, addr, path).await;
    }
    let config = crate::tls::self_probe_config().map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("tls handshake with {addr}: {e}"))?;
    ask(stream, addr, path).await
}

/// Sends `GET path` on `stream` and checks that a status line comes back.
async fn ask<S>(mut stream: S, addr: SocketAddr, path: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("asking {addr}: {e}"))?;
    // "HTTP/1.1 200": the version and the status code.
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("reading the answer of {addr}: {e}"))?;
    if head.starts_with(b"HTTP/1.") {
        Ok(())
    } else {
        Err(format!(
            "{addr} answered {:?}, not HTTP",
            String::from_utf8_lossy(&head)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    use crate::systemd::testing::{ARRIVAL_TIMEOUT, notifier_for};

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid() {
        let cases = [
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("42"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("41"), None),
            (Some("30000000"), Some("pid"), None),
            (Some("1"), None, Some(Duration::from_nanos(500))),
            (Some("0"), None, None),
            (Some("soon"), None, None),
            (None, Some("42"), None),
            (None, None, None),
        ];
        for (usec, pid, expected) in cases {
            assert_eq!(parse_watchdog(usec, pid, 42), expected, "{usec:?} {pid:?}");
        }
    }

    // The watchdog waits on nothing but its own interval, and each ping is a datagram sent
    // before the tick returns, so the test runs on a paused clock: whenever every task waits,
    // the runtime moves the clock to the next tick, and the quiet window below is exactly thirty
    // ticks of the watchdog's timer, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_only_while_alive() {
        // Any interval would do on a paused clock; this one is a realistic order of magnitude.
        const PING_INTERVAL: Duration = Duration::from_millis(10);
        // A window of many intervals in which a running watchdog would surely ping.
        const QUIET_WINDOW: Duration = Duration::from_millis(300);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = tokio::net::UnixDatagram::bind(&path).unwrap();
        let next = || async {
            let mut buf = [0; 64];
            let n = systemd.recv(&mut buf).await.unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        };
        let alive = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let check = alive.clone();
        let task = spawn_watchdog(
            notifier_for(&path),
            PING_INTERVAL,
            move || check.load(Ordering::SeqCst),
            shutdown.clone(),
        );

        for _ in 0..3 {
            let ping = tokio::time::timeout(ARRIVAL_TIMEOUT, next()).await.unwrap();
            assert_eq!(ping, "WATCHDOG=1");
        }

        alive.store(false, Ordering::SeqCst);
        // A tick that checked just before the store may still deliver one ping; after that,
        // none may come.
        let mut late_pings = 0;
        while tokio::time::timeout(QUIET_WINDOW, next()).await.is_ok() {
            late_pings += 1;
            assert!(
                late_pings <= 1,
                "pinged {late_pings} times after failing its check"
            );
        }

        alive.store(true, Ordering::SeqCst);
        let ping = tokio::time::timeout(ARRIVAL_TIMEOUT, next()).await.unwrap();
        assert_eq!(ping, "WATCHDOG=1", "pings resume once alive again");

        shutdown.cancel();
        tokio::time::timeout(ARRIVAL_TIMEOUT, task)
            .await
            .expect("the watchdog stops on shutdown")
            .unwrap();
    }
}
