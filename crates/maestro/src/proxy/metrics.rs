//! Per-app request counters and latency histograms, and open connections per proxy worker
//! thread, rendered as Prometheus text for Maestro's `/metrics`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use hyper::Version;

use super::protocol::{VERSION_NAMES, version_index};

/// Upper bounds (seconds) of the latency histogram buckets: Prometheus' default buckets, which
/// span a fast static hit (a few ms) to a slow app page (10 s); slower ones land in `+Inf`.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one app. Atomics only, so recording a request never takes a write lock once the
/// app has been seen.
#[derive(Debug, Default)]
struct AppStats {
    /// Responses by status class: index 0 is 1xx, 4 is 5xx.
    classes: [AtomicU64; 5],
    /// Non-cumulative bucket counts (cumulated when rendered); the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl AppStats {
    fn add(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-app counters and latency histogram buckets (Prometheus text via [`ProxyMetrics::render`]).
/// Requests for unknown hosts are counted under `app=""`.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    apps: RwLock<HashMap<String, Arc<AppStats>>>,
    /// Open connections of each listener (`http`, `https`) by worker thread, in start order.
    listeners: Mutex<Vec<(&'static str, Arc<WorkerConnections>)>>,
    /// Requests by the HTTP version the client spoke, indexed as [`VERSION_NAMES`].
    versions: [AtomicU64; VERSION_NAMES.len()],
}

impl ProxyMetrics {
    /// The open-connection gauges of a listener with `workers` threads, shown as `listener`
    /// (replacing those of an earlier listener of that name).
    pub(crate) fn listener(
        &self,
        listener: &'static str,
        workers: usize,
    ) -> Arc<WorkerConnections> {
        let gauges = Arc::new(WorkerConnections {
            open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            running: AtomicUsize::new(workers.max(1)),
        });
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners.retain(|(name, _)| *name != listener);
        listeners.push((listener, gauges.clone()));
        gauges
    }

    /// Open client connections of `listener`, one count per worker thread; empty when no
    /// such listener runs. For tests and the status page.
    pub fn open_connections(&self, listener: &str) -> Vec<usize> {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        listeners
            .iter()
            .find(|(name, _)| *name == listener)
            .map(|(_, gauges)| {
                gauges
                    .open
                    .iter()
                    .map(|n| n.load(Ordering::Relaxed))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts one request the client sent in `version`.
    pub(crate) fn record_version(&self, version: Version) {
        self.versions[version_index(version)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted so far in the version HTTP names `name` (`HTTP/2.0`), for tests.
    pub fn requests_in(&self, name: &str) -> u64 {
        VERSION_NAMES
            .iter()
            .position(|known| *known == name)
            .map_or(0, |i| self.versions[i].load(Ordering::Relaxed))
    }

    /// Counts one response of `app` with `status`, answered after `elapsed`. Under the read
    /// lock, for an app already seen: no reference count taken and given back per request (an
    /// atomic on a cache line every worker thread shares).
    pub(crate) fn record(&self, app: &str, status: u16, elapsed: Duration) {
        {
            let apps = self.apps.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(stats) = apps.get(app) {
                stats.add(status, elapsed);
                return;
            }
        }
        let stats = self
            .apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(app.to_string())
            .or_default()
            .clone();
        stats.add(status, elapsed);
    }

    /// Total responses counted for `app` with a status in `class` (1 to 5), which the tests
    /// read (`render` is what `/metrics` shows).
    #[cfg(test)]
    pub(crate) fn count(&self, app: &str, class: u16) -> u64 {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        match (apps.get(app), usize::from(class).checked_sub(1)) {
            (Some(stats), Some(i)) if i < 5 => stats.classes[i].load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The metrics in the Prometheus text exposition format, apps in name order.
    pub fn render(&self) -> String {
        let mut apps: Vec<(String, Arc<AppStats>)> = self
            .apps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, stats)| (label(name), stats.clone()))
            .collect();
        apps.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = String::new();
        out.push_str(
            "# HELP maestro_requests_total Requests answered by the proxy, by app and status class.\n\
             # TYPE maestro_requests_total counter\n",
        );
        for (app, stats) in &apps {
            for (i, count) in stats.classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "maestro_requests_total{{app=\"{app}\",class=\"{}xx\"}} {}",
                    i + 1,
                    count.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str(
            "# HELP maestro_request_duration_seconds Time from request to response head, by app.\n\
             # TYPE maestro_request_duration_seconds histogram\n",
        );
        for (app, stats) in &apps {
            let mut cumulative = 0u64;
            for (i, count) in stats.buckets.iter().enumerate() {
                cumulative += count.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |le| le.to_string());
                let _ = writeln!(
                    out,
                    "maestro_request_duration_seconds_bucket{{app=\"{app}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = stats.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "maestro_request_duration_seconds_sum{{app=\"{app}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "maestro_request_duration_seconds_count{{app=\"{app}\"}} {}",
                stats.count.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP maestro_requests_by_protocol_total Requests the proxy received, by the HTTP version the client spoke.\n\
             # TYPE maestro_requests_by_protocol_total counter\n",
        );
        for (name, count) in VERSION_NAMES.iter().zip(&self.versions) {
            let _ = writeln!(
                out,
                "maestro_requests_by_protocol_total{{protocol=\"{name}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP maestro_proxy_open_connections Client connections open, by listener and proxy worker thread.\n\
             # TYPE maestro_proxy_open_connections gauge\n",
        );
        for (listener, gauges) in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            for (worker, open) in gauges.open.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "maestro_proxy_open_connections{{listener=\"{listener}\",worker=\"{worker}\"}} {}",
                    open.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// Open client connections of one listener, per worker thread: the gauge `/metrics` shows,
/// and what a worker looks at when it accepts (see `server::ACCEPT_BALANCE_SLACK`).
#[derive(Debug)]
pub(crate) struct WorkerConnections {
    open: Box<[AtomicUsize]>,
    /// Workers that accept: the first this many. Fewer than `open.len()` when some worker
    /// threads could not start; the others must not wait for them.
    running: AtomicUsize,
}

impl WorkerConnections {
    /// Counts a connection of `worker` as open until the returned guard is dropped.
    pub(crate) fn opened(self: &Arc<Self>, worker: usize) -> OpenConnection {
        self.open[worker].fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            gauges: self.clone(),
            worker,
        }
    }

    /// Only the first `count` workers accept connections (the others could not start).
    pub(crate) fn set_running(&self, count: usize) {
        self.running.store(count, Ordering::Relaxed);
    }

    /// The least busy other running worker, when `worker` holds more than `slack`
    /// connections over it.
    pub(crate) fn less_busy(&self, worker: usize, slack: usize) -> Option<usize> {
        let mine = self.open[worker].load(Ordering::Relaxed);
        let running = self.running.load(Ordering::Relaxed);
        let (least, open) = self
            .open
            .iter()
            .take(running)
            .enumerate()
            .filter(|(i, _)| *i != worker)
            .map(|(i, n)| (i, n.load(Ordering::Relaxed)))
            .min_by_key(|(_, open)| *open)?;
        (mine > open + slack).then_some(least)
    }
}

/// One open connection in [`WorkerConnections`]; dropping it counts the connection closed.
#[derive(Debug)]
pub(crate) struct OpenConnection {
    gauges: Arc<WorkerConnections>,
    worker: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauges.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Escapes a label value as the exposition format requires.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_classes_and_cumulative_buckets() {
        let m = ProxyMetrics::default();
        m.record("hello", 200, Duration::from_millis(3));
        m.record("hello", 204, Duration::from_millis(30));
        m.record("hello", 502, Duration::from_secs(20));
        m.record("", 404, Duration::from_millis(1));
        assert_eq!(m.count("hello", 2), 2);
        assert_eq!(m.count("hello", 5), 1);
        assert_eq!(m.count("", 4), 1);
        let text = m.render();
        assert!(text.contains("maestro_requests_total{app=\"hello\",class=\"2xx\"} 2"));
        assert!(text.contains("maestro_requests_total{app=\"\",class=\"4xx\"} 1"));
        assert!(
            text.contains("maestro_request_duration_seconds_bucket{app=\"hello\",le=\"0.005\"} 1")
        );
        assert!(
            text.contains("maestro_request_duration_seconds_bucket{app=\"hello\",le=\"0.05\"} 2")
        );
        assert!(
            text.contains("maestro_request_duration_seconds_bucket{app=\"hello\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("maestro_request_duration_seconds_count{app=\"hello\"} 3"));
    }

    #[test]
    fn requests_are_counted_by_protocol() {
        let m = ProxyMetrics::default();
        m.record_version(Version::HTTP_2);
        m.record_version(Version::HTTP_2);
        m.record_version(Version::HTTP_11);
        assert_eq!(m.requests_in("HTTP/2.0"), 2);
        assert_eq!(m.requests_in("HTTP/1.0"), 0);
        let text = m.render();
        assert!(text.contains("maestro_requests_by_protocol_total{protocol=\"HTTP/2.0\"} 2"));
        assert!(text.contains("maestro_requests_by_protocol_total{protocol=\"HTTP/1.1\"} 1"));
    }

    #[test]
    fn open_connections_count_per_worker_until_their_guards_drop() {
        let m = ProxyMetrics::default();
        let gauges = m.listener("http", 3);
        let a = gauges.opened(0);
        let b = gauges.opened(0);
        let c = gauges.opened(2);
        assert_eq!(m.open_connections("http"), vec![2, 0, 1]);
        assert_eq!(gauges.less_busy(0, 1), Some(1));
        assert_eq!(gauges.less_busy(0, 2), None);
        assert_eq!(gauges.less_busy(2, 0), Some(1));
        assert_eq!(gauges.less_busy(1, 0), None);
        assert!(
            m.render()
                .contains("maestro_proxy_open_connections{listener=\"http\",worker=\"0\"} 2")
        );
        drop((a, b, c));
        assert_eq!(m.open_connections("http"), vec![0, 0, 0]);
        assert!(m.open_connections("https").is_empty());
        // One worker has nobody to hand connections to, nor has one whose partners never
        // started.
        let alone = m.listener("https", 1);
        let _d = alone.opened(0);
        assert_eq!(alone.less_busy(0, 0), None);
        let _e = gauges.opened(0);
        assert_eq!(gauges.less_busy(0, 0), Some(1));
        gauges.set_running(1);
        assert_eq!(gauges.less_busy(0, 0), None);
    }
}
