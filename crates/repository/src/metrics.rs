//! Counters and gauges exposed at `/metrics` in the Prometheus text format. Plain atomics: the
//! set is small and fixed, so a metrics library would add more than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, such as what is stored now.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub uploads_accepted: Counter,
    pub uploads_rejected: Counter,
    pub upload_bytes: Counter,
    pub bundles_deduplicated: Counter,
    pub releases_committed: Counter,
    pub commit_conflicts: Counter,
    pub bundle_downloads: Counter,
    pub bundle_not_modified: Counter,
    pub auth_failures: Counter,
    pub storage_errors: Counter,
    pub notifications_sent: Counter,
    pub notifications_dropped: Counter,
    pub retention_sweeps: Counter,
    pub releases_collected: Counter,
    pub bundles_collected: Counter,
    pub bundle_bytes_collected: Counter,
    pub builds_queued: Counter,
    pub builds_finished: Counter,
    pub builds_failed: Counter,
    pub builds_superseded: Counter,
    pub layer_uploads: Counter,
    pub layers_deduplicated: Counter,
    pub layer_downloads: Counter,
    pub layers_collected: Counter,
    pub layer_bytes_collected: Counter,
    pub build_records_collected: Counter,
    /// Bundles stored, as of the last sweep that listed them.
    pub bundles: Gauge,
    /// Bytes of bundles stored, as of the last sweep that listed them.
    pub bundle_bytes: Gauge,
    /// Layers stored, as of the last sweep that listed them.
    pub layers: Gauge,
    /// Bytes of layers stored, as of the last sweep that listed them.
    pub layer_bytes: Gauge,
}

impl Metrics {
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &Counter); 26] = [
            (
                "apprepo_uploads_accepted_total",
                "Uploads that became releases or pending builds.",
                &self.uploads_accepted,
            ),
            (
                "apprepo_uploads_rejected_total",
                "Uploads refused (auth, limits, digest, bundle content).",
                &self.uploads_rejected,
            ),
            (
                "apprepo_upload_bytes_total",
                "Bundle bytes received.",
                &self.upload_bytes,
            ),
            (
                "apprepo_bundles_deduplicated_total",
                "Uploads whose bundle was already stored.",
                &self.bundles_deduplicated,
            ),
            (
                "apprepo_releases_committed_total",
                "Releases committed (deploys, config changes, rollbacks).",
                &self.releases_committed,
            ),
            (
                "apprepo_commit_conflicts_total",
                "Commits retried because a concurrent one took the number.",
                &self.commit_conflicts,
            ),
            (
                "apprepo_bundle_downloads_total",
                "Bundles served.",
                &self.bundle_downloads,
            ),
            (
                "apprepo_bundle_not_modified_total",
                "Bundle requests answered 304.",
                &self.bundle_not_modified,
            ),
            (
                "apprepo_auth_failures_total",
                "Requests with a missing or unknown token.",
                &self.auth_failures,
            ),
            (
                "apprepo_storage_errors_total",
                "Storage operations that failed.",
                &self.storage_errors,
            ),
            (
                "apprepo_notifications_sent_total",
                "Release notices sent to Beacon.",
                &self.notifications_sent,
            ),
            (
                "apprepo_notifications_dropped_total",
                "Release notices dropped while Beacon was away (it reconciles).",
                &self.notifications_dropped,
            ),
            (
                "apprepo_retention_sweeps_total",
                "Retention sweeps run (failed ones included).",
                &self.retention_sweeps,
            ),
            (
                "apprepo_releases_collected_total",
                "Release records deleted by retention.",
                &self.releases_collected,
            ),
            (
                "apprepo_bundles_collected_total",
                "Bundles deleted because no release pointed to them.",
                &self.bundles_collected,
            ),
            (
                "apprepo_bundle_bytes_collected_total",
                "Bytes of the bundles deleted by retention.",
                &self.bundle_bytes_collected,
            ),
            (
                "apprepo_builds_queued_total",
                "Uploads that became pending builds.",
                &self.builds_queued,
            ),
            (
                "apprepo_builds_finished_total",
                "Builds finished into a release.",
                &self.builds_finished,
            ),
            (
                "apprepo_builds_failed_total",
                "Builds reported failed.",
                &self.builds_failed,
            ),
            (
                "apprepo_builds_superseded_total",
                "Pending builds superseded by a newer upload.",
                &self.builds_superseded,
            ),
            (
                "apprepo_layer_uploads_total",
                "Layers received and stored.",
                &self.layer_uploads,
            ),
            (
                "apprepo_layers_deduplicated_total",
                "Layer uploads whose layer was already stored.",
                &self.layers_deduplicated,
            ),
            (
                "apprepo_layer_downloads_total",
                "Layers served.",
                &self.layer_downloads,
            ),
            (
                "apprepo_layers_collected_total",
                "Layers deleted because no release named them.",
                &self.layers_collected,
            ),
            (
                "apprepo_layer_bytes_collected_total",
                "Bytes of the layers deleted by retention.",
                &self.layer_bytes_collected,
            ),
            (
                "apprepo_build_records_collected_total",
                "Build records deleted by retention.",
                &self.build_records_collected,
            ),
        ];
        let gauges: [(&str, &str, &Gauge); 4] = [
            (
                "apprepo_bundles",
                "Bundles stored, as of the last retention sweep.",
                &self.bundles,
            ),
            (
                "apprepo_bundle_bytes",
                "Bytes of bundles stored, as of the last retention sweep.",
                &self.bundle_bytes,
            ),
            (
                "apprepo_layers",
                "Layers stored, as of the last retention sweep.",
                &self.layers,
            ),
            (
                "apprepo_layer_bytes",
                "Bytes of layers stored, as of the last retention sweep.",
                &self.layer_bytes,
            ),
        ];
        let mut out = String::new();
        for (name, help, counter) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        for (name, help, gauge) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                gauge.get()
            );
        }
        out
    }
}
