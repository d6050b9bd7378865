//! What the supervisor tells the outside: the node report Beacon receives (instances,
//! rollout figures, builds, disk) and the disk and layer download lines of `/metrics`.

use px_proto::build::BuildStatus;
use px_proto::link::{DiskReport, NodeReport};

use super::Supervisor;

impl Supervisor {
    /// Prometheus lines on the disk of `state_dir`: free bytes, the floor, and the bytes of
    /// each app's unpacked releases as of its last switch.
    pub fn render_disk_metrics(&self) -> String {
        let mut out = String::new();
        let store = &self.shared.store;
        if let Some(free) = store.free_bytes() {
            out.push_str("# TYPE maestro_disk_free_bytes gauge\n");
            out.push_str(&format!("maestro_disk_free_bytes {free}\n"));
        }
        out.push_str("# TYPE maestro_disk_floor_bytes gauge\n");
        out.push_str(&format!(
            "maestro_disk_floor_bytes {}\n",
            store.floor_bytes()
        ));
        let kept = store.kept_bytes();
        if !kept.is_empty() {
            out.push_str("# TYPE maestro_release_bytes gauge\n");
        }
        for (app, bytes) in kept.iter() {
            out.push_str(&format!("maestro_release_bytes{{app=\"{app}\"}} {bytes}\n"));
        }
        out
    }

    /// Prometheus lines on the layers this node downloaded, by kind: how many and their bytes.
    pub fn render_layer_metrics(&self) -> String {
        self.shared.store.layer_fetch_metrics()
    }

    /// The node's full actual state, with what each running process uses measured now.
    pub fn report(&self) -> NodeReport {
        let statuses = self
            .shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut instances: Vec<_> = statuses.values().flatten().cloned().collect();
        drop(statuses);
        let leaders: Vec<u32> = instances.iter().filter_map(|i| i.pid).collect();
        let usage = self.usage.measure(&leaders);
        for instance in &mut instances {
            if let Some(figures) = instance.pid.and_then(|pid| usage.get(&pid)) {
                instance.memory_bytes = figures.memory_bytes;
                instance.cpu_permille = figures.cpu_permille;
            }
        }
        let rollouts = self
            .shared
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.figures.clone())
            .collect();
        let builds = self
            .shared
            .builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let store = &self.shared.store;
        let used_bytes = store.used_bytes();
        NodeReport {
            generation: self.generation(),
            instances,
            rollouts,
            builds,
            disk: Some(DiskReport {
                used_bytes,
                objects: None,
                free_bytes: store.free_bytes(),
                floor_bytes: Some(store.floor_bytes()),
            }),
        }
    }

    /// Records where an app's latest build on this node stands (the build runner's), for the
    /// next report, and asks the link to send it.
    pub(crate) fn report_build(&self, status: BuildStatus) {
        self.shared
            .builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(status.app.clone(), status);
        self.shared.changes.send_modify(|n| *n += 1);
    }
}
