//! Per-app resource limits (`[limits]` in app.toml) on each instance, and telling an OOM kill
//! from other exits. Under systemd with `Delegate=yes`, Maestro owns its unit's cgroup (v2):
//! it moves itself into a `maestro` leaf and gives each instance a cgroup of its own with
//! `memory.max` (and no swap), `pids.max` and `cpu.weight`; the kernel's OOM killer then ends
//! only the instance over its memory, and `memory.events` says so. Without a delegated cgroup
//! (`em up`, tests, other init systems) the instance gets rlimits instead: open files, and its
//! data segment for memory; processes and CPU weight are not enforced then.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use px_proto::manifest::ResourceLimits;

/// Where the unified cgroup hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The leaf Maestro moves itself into: cgroup v2 lets only leaves hold processes.
const MAESTRO_LEAF: &str = "maestro";
/// Prefix of the instances' cgroups, so leftovers of a previous run are recognised.
const INSTANCE_PREFIX: &str = "instance-";
/// Controllers the instances' cgroups use.
const CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];

/// How this Maestro applies limits.
#[derive(Debug)]
pub enum Enforcer {
    /// A delegated cgroup: its directory.
    Cgroups { dir: PathBuf, next: AtomicU64 },
    /// No cgroup of its own to manage: rlimits.
    Rlimits,
}

impl Enforcer {
    /// With `cgroups` (the `cgroup_limits` setting, which the unit turns on beside
    /// `Delegate=yes`), sets up Maestro's own cgroup: Maestro into a leaf of its own, the
    /// controllers on for the instances, leftovers of a previous run removed. Off, or anything
    /// failing (with a warning), means rlimits. Never on by default: run by hand or in tests,
    /// Maestro must not rearrange the cgroup of whatever session started it.
    pub(crate) fn detect(cgroups: bool) -> Self {
        if !cgroups {
            return Self::Rlimits;
        }
        match delegated_cgroup() {
            Ok(dir) => {
                tracing::info!(cgroup = %dir.display(), "app limits through cgroups");
                Self::Cgroups {
                    dir,
                    next: AtomicU64::new(0),
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "cgroup_limits is on but the cgroup cannot be used; app limits through rlimits");
                Self::Rlimits
            }
        }
    }

    /// Words to put before an instance's command: `prlimit` with its rlimits, when this
    /// enforcer uses rlimits and the app has any.
    pub fn command_prefix(&self, limits: &ResourceLimits) -> Vec<String> {
        if !matches!(self, Self::Rlimits) {
            return Vec::new();
        }
        let mut words = Vec::new();
        if let Some(files) = limits.open_files {
            words.push(format!("--nofile={files}:{files}"));
        }
        if let Some(memory) = limits.memory {
            words.push(format!("--data={0}:{0}", memory.0));
        }
        if words.is_empty() {
            return words;
        }
        words.insert(0, "prlimit".into());
        words.push("--".into());
        words
    }

    /// Makes a cgroup of its own with the app's limits for a process about to start, which
    /// enters it through [`InstanceCgroup::enter_words`] before anything else runs, so every
    /// process it forks (bubblewrap's sandbox first) is born inside. `None` with rlimits, or
    /// when the cgroup could not be made (logged: the process then runs without them).
    pub(crate) fn prepare(&self, app: &str, limits: &ResourceLimits) -> Option<InstanceCgroup> {
        let Self::Cgroups { dir, next } = self else {
            return None;
        };
        let n = next.fetch_add(1, Ordering::Relaxed);
        let cgroup = dir.join(format!("{INSTANCE_PREFIX}{app}-{n}"));
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir(&cgroup)?;
            if let Some(memory) = limits.memory {
                std::fs::write(cgroup.join("memory.max"), memory.0.to_string())?;
                // Swapping would hide the limit behind a slow machine.
                let _ = std::fs::write(cgroup.join("memory.swap.max"), "0");
            }
            if let Some(processes) = limits.processes {
                std::fs::write(cgroup.join("pids.max"), processes.to_string())?;
            }
            if let Some(weight) = limits.cpu_weight {
                std::fs::write(cgroup.join("cpu.weight"), weight.to_string())?;
            }
            Ok(())
        })();
        match made {
            Ok(()) => Some(InstanceCgroup { dir: cgroup }),
            Err(e) => {
                tracing::warn!(app, cgroup = %cgroup.display(), error = %e, "cannot give the process its cgroup; it runs without its limits");
                let _ = std::fs::remove_dir(&cgroup);
                None
            }
        }
    }
}

/// The memory the cgroup of the instance led by `pid` uses (`memory.current`), when the
/// instance has a cgroup of its own (`cgroup_limits`); `None` otherwise.
pub(crate) fn instance_memory(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let leaf = path.rsplit('/').next()?;
    if !leaf.starts_with(INSTANCE_PREFIX) {
        return None;
    }
    let dir = std::path::Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
    std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// An instance's own cgroup.
#[derive(Debug)]
pub(crate) struct InstanceCgroup {
    dir: PathBuf,
}

impl InstanceCgroup {
    /// Words before a command that move its process into this cgroup and then run the rest:
    /// a shell writes its own pid into `cgroup.procs` and execs, so the command and all it
    /// starts are inside before they run (moving the process after it started would leave
    /// out what it forked meanwhile, such as bubblewrap's sandbox). A failed move fails the
    /// start rather than running the app without its limits.
    pub(crate) fn enter_words(&self) -> Vec<std::ffi::OsString> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            self.dir.join("cgroup.procs").into_os_string(),
        ]
    }

    /// Whether the kernel's OOM killer ended a process of the instance.
    pub(crate) fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .ok()
            .and_then(|events| {
                events.lines().find_map(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
            })
            .is_some_and(|kills| kills > 0)
    }

    /// Removes the cgroup once its processes are gone (the instance's group was stopped).
    pub(crate) fn remove(self) {
        remove_when_empty(&self.dir);
    }
}

fn remove_when_empty(dir: &Path) {
    // The last processes may take a moment to leave after SIGKILL.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    tracing::warn!(cgroup = %dir.display(), "an instance's cgroup stayed busy; left in place");
}

/// Maestro's own cgroup, when it is on the unified hierarchy and delegated to it: Maestro is
/// moved into its `maestro` leaf and the instance controllers are enabled.
fn delegated_cgroup() -> Result<PathBuf, String> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").is_file() {
        return Err(format!("{CGROUP_ROOT} is not a cgroup v2 hierarchy"));
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let dir = root.join(path.trim_start_matches('/'));
    let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "controllers {missing:?} are not delegated to {}",
            dir.display()
        ));
    }
    // A cgroup with controllers on for its children cannot hold processes itself.
    let leaf = dir.join(MAESTRO_LEAF);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", leaf.display())),
    }
    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("moving into {}: {e}", leaf.display()))?;
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    std::fs::write(dir.join("cgroup.subtree_control"), enable.join(" "))
        .map_err(|e| format!("{}/cgroup.subtree_control: {e}", dir.display()))?;
    // Instances of a previous run are gone with it (systemd ends the unit's processes).
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(INSTANCE_PREFIX))
            {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use px_proto::size::ByteSize;

    #[test]
    fn rlimits_become_a_prlimit_prefix() {
        let limits = ResourceLimits {
            memory: Some(ByteSize::mib(64)),
            open_files: Some(256),
            ..ResourceLimits::default()
        };
        assert_eq!(
            Enforcer::Rlimits.command_prefix(&limits),
            [
                "prlimit",
                "--nofile=256:256",
                "--data=67108864:67108864",
                "--"
            ]
        );
        assert!(
            Enforcer::Rlimits
                .command_prefix(&ResourceLimits::default())
                .is_empty()
        );
        let cgroups = Enforcer::Cgroups {
            dir: PathBuf::from("/nonexistent"),
            next: AtomicU64::new(0),
        };
        assert!(cgroups.command_prefix(&limits).is_empty());
    }
}
