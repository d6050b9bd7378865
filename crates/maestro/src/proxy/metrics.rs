//! Per-app request counters and latency histograms, rendered as Prometheus text for Maestro's
//! `/metrics`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// Per-app counters and latency histogram buckets (Prometheus text via [`ProxyMetrics::render`]).
/// Requests for unknown hosts are counted under `app=""`.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    apps: RwLock<HashMap<String, Arc<AppStats>>>,
}

impl ProxyMetrics {
    /// Counts one response of `app` with `status`, answered after `elapsed`.
    pub fn record(&self, app: &str, status: u16, elapsed: Duration) {
        let stats = self.stats(app);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        stats.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        stats.sum_micros.fetch_add(micros, Ordering::Relaxed);
        stats.count.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self, app: &str) -> Arc<AppStats> {
        if let Some(stats) = self.apps.read().unwrap_or_else(|p| p.into_inner()).get(app) {
            return stats.clone();
        }
        self.apps
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// Total responses counted for `app` with a status in `class` (1 to 5); for tests and the
    /// status page.
    pub fn count(&self, app: &str, class: u16) -> u64 {
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
        out
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
}
