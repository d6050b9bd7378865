//! What the benchmark reads about processes from `/proc`: CPU time, memory, CPU affinity, the
//! open-file limit, and the clock-tick rate that CPU times are counted in.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// CPU time (user + system) a process has used so far, in clock ticks.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces, so fields are counted
    // from the last `)`: what follows starts at field 3 (state), so utime (14) and stime (15)
    // are the 12th and 13th words after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{path}: no `)` after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize, name: &str| -> Result<u64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("{path}: no {name} field"))?
            .parse()
            .with_context(|| format!("{path}: {name} is not a number"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// Resident memory now and at its peak, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (the peak of `VmRSS`), KiB.
    pub hwm_kib: u64,
}

pub fn memory(pid: &str) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| -> Result<u64> {
        status_value(&status, key)
            .and_then(|v| v.split_whitespace().next())
            .ok_or_else(|| anyhow!("{path}: no {key}"))?
            .parse()
            .with_context(|| format!("{path}: {key} is not a number"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS")?,
        hwm_kib: kib("VmHWM")?,
    })
}

/// The CPUs a process may run on, as the kernel lists them (`0-1`, `0`), if readable.
pub fn cpus_allowed(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_value(&status, "Cpus_allowed_list").map(str::to_string)
}

/// How many CPUs a kernel CPU list (`0-3,6`) names.
pub fn cpu_list_len(list: &str) -> usize {
    list.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|range| match range.split_once('-') {
            Some((lo, hi)) => match (lo.parse::<usize>(), hi.parse::<usize>()) {
                (Ok(lo), Ok(hi)) if hi >= lo => hi - lo + 1,
                _ => 0,
            },
            None => usize::from(range.parse::<usize>().is_ok()),
        })
        .sum()
}

/// CPUs online in the machine, whatever this process is pinned to.
pub fn online_cpus() -> Option<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    Some(cpu_list_len(&list)).filter(|&n| n > 0)
}

fn status_value<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` CPU times. Asked of `getconf`
/// because `sysconf` needs `unsafe` (forbidden here) or a crate the workspace does not have.
pub fn clock_ticks_per_second() -> Result<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running `getconf CLK_TCK` (install libc-bin)")?;
    if !out.status.success() {
        bail!("`getconf CLK_TCK` failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ticks: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("`getconf CLK_TCK` printed {text:?}"))?;
    if ticks == 0 {
        bail!("`getconf CLK_TCK` printed 0");
    }
    Ok(ticks)
}

/// The soft open-file limit of this process (`None`: unlimited), from `/proc/self/limits`;
/// reading it there needs neither `unsafe` nor a crate.
pub fn open_files_limit() -> Result<Option<u64>> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow!("/proc/self/limits has no `Max open files` line"))?;
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("/proc/self/limits: `{line}` has no soft limit"))?;
    if soft == "unlimited" {
        return Ok(None);
    }
    soft.parse()
        .map(Some)
        .with_context(|| format!("/proc/self/limits: soft open-file limit {soft:?}"))
}

/// How many local ports the kernel hands out for outgoing connections; every link to Beacon
/// takes one, as all of them go to the same address.
pub fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_whitespace().map(|b| b.parse::<u64>().ok());
    let (low, high) = (bounds.next()??, bounds.next()??);
    Some(high.saturating_sub(low) + 1)
}

/// A CPU-time counter started at one moment, read as a share of one core later.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pid: String,
    ticks_per_second: u64,
    start_ticks: u64,
    start: std::time::Instant,
}

/// CPU used over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    /// CPU time used (user + system), to the clock-tick resolution (usually 10 ms).
    pub cpu: Duration,
    /// Wall-clock length of the window.
    pub wall: Duration,
}

impl CpuUse {
    /// CPU time as a percentage of one core over the window.
    pub fn percent_of_one_core(&self) -> f64 {
        if self.wall.is_zero() {
            return 0.0;
        }
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
}

impl CpuMeter {
    pub fn start(pid: &str, ticks_per_second: u64) -> Result<Self> {
        Ok(Self {
            pid: pid.to_string(),
            ticks_per_second,
            start_ticks: cpu_ticks(pid)?,
            start: std::time::Instant::now(),
        })
    }

    pub fn read(&self) -> Result<CpuUse> {
        let ticks = cpu_ticks(&self.pid)?.saturating_sub(self.start_ticks);
        Ok(CpuUse {
            cpu: Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64),
            wall: self.start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(cpu_ticks("self").is_ok());
        let mem = memory("self").unwrap();
        assert!(mem.rss_kib > 0 && mem.hwm_kib >= mem.rss_kib, "{mem:?}");
        assert!(clock_ticks_per_second().unwrap() > 0);
        assert!(cpus_allowed("self").is_some());
        // Whatever the limit, it parses.
        open_files_limit().unwrap();
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_list_len("0-3,6\n"), 5);
        assert_eq!(cpu_list_len("0"), 1);
        assert_eq!(cpu_list_len("1,3-4"), 3);
        assert_eq!(cpu_list_len(""), 0);
    }

    #[test]
    fn status_values_are_found_by_exact_key() {
        let status = "VmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nCpus_allowed_list:\t0-1\n";
        assert_eq!(status_value(status, "VmRSS"), Some("1024 kB"));
        assert_eq!(status_value(status, "Cpus_allowed_list"), Some("0-1"));
        assert_eq!(status_value(status, "Vm"), None);
    }
}
