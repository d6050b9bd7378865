//! What each running process group uses, for the node report (`em ps`): memory (its cgroup's
//! `memory.current` when it has a cgroup of its own, else the resident memory of the group's
//! processes) and CPU (the group's user and system time since the previous measurement, as a
//! share of one core), read from `/proc`. Every instance and process is the leader of its own
//! process group, so its pid names the group.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clock ticks per second of the times in `/proc/<pid>/stat`: the kernel reports them in
/// USER_HZ, which is 100 on every architecture Linux exports it for (it is part of the ABI,
/// unlike the kernel's own HZ).
const USER_HZ: u64 = 100;
/// Reports closer together than this reuse the last measurement: a report goes out on every
/// change, and a burst of changes need not scan `/proc` each time; a second is also the least
/// over which a CPU share means something.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Most `/proc` entries looked at in one measurement, so a node with a runaway number of
/// processes does not make each report scan without end; far above what a web server runs.
const MAX_PROC_ENTRIES: usize = 100_000;

/// The figures of one process group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) memory_bytes: Option<u64>,
    pub(super) cpu_permille: Option<u32>,
}

struct Sample {
    at: Instant,
    /// CPU ticks of each group, for the next share.
    ticks: HashMap<u32, u64>,
    figures: HashMap<u32, Usage>,
}

/// Measures process groups, keeping the previous measurement for CPU shares.
#[derive(Default)]
pub(super) struct Meter {
    last: Mutex<Option<Sample>>,
}

impl Meter {
    /// The figures of the groups led by `leaders`.
    pub(super) fn measure(&self, leaders: &[u32]) -> HashMap<u32, Usage> {
        // Taken out, so the lock is not held while `/proc` is read.
        let previous = self.last.lock().unwrap_or_else(|p| p.into_inner()).take();
        let fresh = previous.as_ref().is_some_and(|p| {
            p.at.elapsed() < MIN_SAMPLE_INTERVAL
                && leaders.iter().all(|pid| p.figures.contains_key(pid))
        });
        if fresh && let Some(previous) = previous {
            let figures = previous.figures.clone();
            self.put_back(previous);
            return figures;
        }
        let at = Instant::now();
        let groups = scan(&leaders.iter().copied().collect());
        let mut ticks = HashMap::new();
        let mut figures = HashMap::new();
        for &leader in leaders {
            let Some(group) = groups.get(&leader) else {
                continue;
            };
            ticks.insert(leader, group.ticks);
            let cpu_permille = previous.as_ref().and_then(|p| {
                let before = *p.ticks.get(&leader)?;
                let seconds = at.duration_since(p.at).as_secs_f64();
                let used = group.ticks.checked_sub(before)? as f64 / USER_HZ as f64;
                (seconds > 0.0).then(|| (used / seconds * 1000.0).round() as u32)
            });
            let memory_bytes = crate::limits::instance_memory(leader).or(group.rss_bytes);
            figures.insert(
                leader,
                Usage {
                    memory_bytes,
                    cpu_permille,
                },
            );
        }
        self.put_back(Sample {
            at,
            ticks,
            figures: figures.clone(),
        });
        figures
    }

    fn put_back(&self, sample: Sample) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample);
    }
}

/// What one group's processes use together.
#[derive(Debug, Default)]
struct Group {
    ticks: u64,
    rss_bytes: Option<u64>,
}

/// Reads every process of `/proc` and sums, per group of `leaders`, its CPU ticks and
/// resident memory.
fn scan(leaders: &HashSet<u32>) -> HashMap<u32, Group> {
    let mut groups: HashMap<u32, Group> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in entries.flatten().take(MAX_PROC_ENTRIES) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((group, ticks)) = parse_stat(&stat) else {
            continue;
        };
        if !leaders.contains(&group) {
            continue;
        }
        let entry = groups.entry(group).or_default();
        entry.ticks += ticks;
        if let Some(rss) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| parse_rss(&status))
        {
            *entry.rss_bytes.get_or_insert(0) += rss;
        }
    }
    groups
}

/// The process group and the user plus system ticks of a `/proc/<pid>/stat` line. The command
/// name in parentheses may hold spaces and parentheses, so fields are counted after the last
/// `)`: state, ppid, pgrp (5th field), ..., utime and stime (14th and 15th).
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let group = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((group, utime + stime))
}

/// `VmRSS` of a `/proc/<pid>/status`, in bytes (absent for kernel threads and zombies).
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let stat = "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 123 4567 89 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((4240, 300)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(parse_rss("Name:\tkthreadd\n"), None);
    }

    /// A spinning child in a process group of its own, killed when dropped (also when an
    /// assertion fails first).
    struct Spinner(std::process::Child);

    impl Drop for Spinner {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_busy_group_shows_its_memory_and_cpu() {
        // A group of its own: the test binary's group also holds other tests' children, whose
        // exits would make its tick sum go down between samples.
        use std::os::unix::process::CommandExt;
        let spinner = Spinner(
            std::process::Command::new("python3")
                .args(["-c", "while True: pass"])
                .process_group(0)
                .spawn()
                .expect("python3 starts"),
        );
        let leader = spinner.0.id();
        // Before its exec the child still counts the test binary's memory, and right after
        // it python has little: wait until python runs and has grown.
        let deadline = Instant::now() + Duration::from_secs(10);
        let meter = Meter::default();
        let first = loop {
            let python = std::fs::read_to_string(format!("/proc/{leader}/comm"))
                .is_ok_and(|comm| comm.trim() == "python3");
            let rss = scan(&HashSet::from([leader]))
                .get(&leader)
                .and_then(|g| g.rss_bytes)
                .unwrap_or(0);
            if python && rss > 4 * 1024 * 1024 {
                break meter.measure(&[leader]);
            }
            assert!(
                Instant::now() < deadline,
                "the spinner never ran python with 4 MiB"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(first[&leader].memory_bytes.unwrap_or(0) > 1024 * 1024);
        assert_eq!(
            first[&leader].cpu_permille, None,
            "no share before a second sample"
        );
        std::thread::sleep(MIN_SAMPLE_INTERVAL + Duration::from_millis(300));
        let second = meter.measure(&[leader]);
        let cpu = second[&leader].cpu_permille.unwrap();
        // A spinning process uses a whole core on an idle machine; a loaded one still gives it
        // far more than this.
        assert!(cpu > 50, "a spinning process used {cpu}‰ of a core");
    }
}
