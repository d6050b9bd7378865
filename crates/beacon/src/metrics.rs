//! Counters and gauges exposed at `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A float sum, kept as microunits so it fits an atomic integer.
#[derive(Debug, Default)]
pub struct Sum(AtomicU64);

impl Sum {
    pub fn add_f64(&self, v: f64) {
        self.0.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// 1 while this Beacon is the active one (always, without `[lease]`), 0 on a standby.
    pub lease_active: Gauge,
    /// The lease's epoch as this Beacon last saw it (0 without `[lease]`).
    pub lease_epoch: Gauge,
    pub nodes_connected: Gauge,
    pub links_accepted: Counter,
    pub links_rejected: Counter,
    pub heartbeats: Counter,
    pub assignments_sent: Counter,
    pub releases_notified: Counter,
    pub reconciles: Counter,
    pub reconcile_failures: Counter,
    pub rollouts_finished: Counter,
    pub rollout_seconds_total: Sum,
    pub rollbacks_ordered: Counter,
    /// Connections closed at once: their source address had its share of unverified ones.
    pub links_over_source_cap: Counter,
    /// Parts of a node's frames about apps, builds or runs not assigned to it, dropped.
    pub reports_dropped: Counter,
}

impl Metrics {
    /// The lease's rows alone: all a standby has to show.
    pub fn render_lease(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP beacon_lease_active 1 on the active Beacon, 0 on a standby.\n# TYPE beacon_lease_active gauge\nbeacon_lease_active {}",
            self.lease_active.get()
        );
        let _ = writeln!(
            out,
            "# HELP beacon_lease_epoch The lease's epoch as this Beacon last saw it.\n# TYPE beacon_lease_epoch gauge\nbeacon_lease_epoch {}",
            self.lease_epoch.get()
        );
        out
    }

    pub fn render(&self, events: u64) -> String {
        let mut out = self.render_lease();
        let mut row = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        row(
            "beacon_nodes_connected",
            "gauge",
            "Maestro links up now.",
            self.nodes_connected.get().to_string(),
        );
        row(
            "beacon_links_accepted_total",
            "counter",
            "Links that completed the handshake.",
            self.links_accepted.get().to_string(),
        );
        row(
            "beacon_links_rejected_total",
            "counter",
            "Links refused (token, version, garbage, TLS).",
            self.links_rejected.get().to_string(),
        );
        row(
            "beacon_heartbeats_total",
            "counter",
            "Heartbeats received.",
            self.heartbeats.get().to_string(),
        );
        row(
            "beacon_assignments_sent_total",
            "counter",
            "Assign frames sent.",
            self.assignments_sent.get().to_string(),
        );
        row(
            "beacon_releases_notified_total",
            "counter",
            "ReleaseCommitted notices received.",
            self.releases_notified.get().to_string(),
        );
        row(
            "beacon_reconciles_total",
            "counter",
            "Reads of the desired state.",
            self.reconciles.get().to_string(),
        );
        row(
            "beacon_reconcile_failures_total",
            "counter",
            "Failed reads of the desired state.",
            self.reconcile_failures.get().to_string(),
        );
        row(
            "beacon_rollout_seconds_count",
            "counter",
            "Rollouts that finished.",
            self.rollouts_finished.get().to_string(),
        );
        row(
            "beacon_rollout_seconds_sum",
            "counter",
            "Seconds from assignment to rolled out, summed.",
            format!("{:.3}", self.rollout_seconds_total.get()),
        );
        row(
            "beacon_rollbacks_total",
            "counter",
            "Automatic rollbacks of releases over their error budget.",
            self.rollbacks_ordered.get().to_string(),
        );
        row(
            "beacon_links_over_source_cap_total",
            "counter",
            "Connections closed at once: too many unverified ones from their address.",
            self.links_over_source_cap.get().to_string(),
        );
        row(
            "beacon_reports_dropped_total",
            "counter",
            "Reports, events and log lines about apps or builds not assigned to their node, dropped.",
            self.reports_dropped.get().to_string(),
        );
        row(
            "beacon_events_total",
            "counter",
            "Events recorded.",
            events.to_string(),
        );
        out
    }
}
