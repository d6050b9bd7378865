//! Platform.X benchmarks. `beacon-loadgen` (this library's [`run`]) measures docs/src/design/figures.md's
//! scale figure: one Beacon holding N Maestro links with heartbeats, and the time one new
//! release's `Assign` takes to reach all N. It starts the real `beacon` binary against a
//! stand-in repository, opens N simulated Maestro links over TLS, and reads Beacon's CPU and
//! memory from `/proc`.

pub mod beacon_proc;
pub mod fleet;
pub mod procfs;
pub mod repo_stub;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::beacon_proc::{BeaconProcess, TlsFiles, Tokens};
use crate::fleet::{Dialer, Fleet, LinkSettings, Reports};
use crate::procfs::{CpuMeter, CpuUse, Memory};
use crate::repo_stub::{APP, RepoStub};

/// File descriptors this process needs besides one per link (runtime, stub, Beacon's pipes,
/// the repository link, HTTP calls), with room to spare. The limit is per process and Beacon
/// (which inherits it) holds the other end of each link, so each side needs N plus a margin.
pub const SPARE_FDS: u64 = 256;
/// How long the links get to be set up, beyond one second per 100 links: a full TLS handshake
/// costs Beacon well under a millisecond, so this only trips when something is broken.
const CONNECT_BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often progress is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Links' tasks get this long to stop at the end before they are abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// `beacon-loadgen`'s arguments.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "beacon-loadgen",
    version,
    about = "Open N simulated Maestro links to a real beacon; report its CPU, RSS and the fan-out time of one release"
)]
pub struct Options {
    /// The `beacon` binary to start.
    #[arg(long)]
    pub beacon_bin: PathBuf,
    /// Simulated Maestro links.
    #[arg(long)]
    pub links: usize,
    /// Heartbeat period of each link (at a random phase). Beacon drops a link silent for 15 s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// How long heartbeats run, all links up, before Beacon's CPU and memory are read.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub steady: Duration,
    /// Links in set-up (connect, TLS, hello, first assignment) at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Run Beacon under `taskset -c LIST` (e.g. `0`), so "one core" is enforced, not assumed.
    #[arg(long, value_name = "LIST")]
    pub beacon_cpu: Option<String>,
    /// What heartbeats report: `running` (one healthy instance of the assigned release, as a
    /// real Maestro) or `empty` (no instances: Beacon's cheapest case).
    #[arg(long, value_enum, default_value_t = Reports::Running)]
    pub reports: Reports,
    /// How long to wait for the new assignment to reach every link.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub fanout_timeout: Duration,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Options {
    /// Options for `links` links with the command line's defaults.
    pub fn new(beacon_bin: PathBuf, links: usize) -> Self {
        Self {
            beacon_bin,
            links,
            heartbeat: Duration::from_secs(5),
            steady: Duration::from_secs(20),
            connect_concurrency: 256,
            beacon_cpu: None,
            reports: Reports::Running,
            fanout_timeout: Duration::from_secs(60),
            quiet: false,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub links: usize,
    pub heartbeat: Duration,
    pub steady: Duration,
    pub reports: Reports,
    /// CPUs online in the machine, and those each side could run on.
    pub cores: usize,
    pub beacon_cpus: String,
    pub loadgen_cpus: String,
    /// One clock tick: the resolution of every CPU time here.
    pub cpu_tick: Duration,
    /// Links that got their first assignment, and the time until all had.
    pub linked: usize,
    pub connect: Duration,
    pub connect_cpu: CpuUse,
    pub loadgen_connect_cpu: CpuUse,
    pub first_generation: u64,
    pub memory_linked: Memory,
    pub memory_steady: Memory,
    pub steady_cpu: CpuUse,
    pub loadgen_steady_cpu: CpuUse,
    /// Heartbeats the links sent during the steady window, and those Beacon counted.
    pub heartbeats_sent: u64,
    pub heartbeats_counted: Option<u64>,
    pub fanout: Fanout,
    pub memory_end: Memory,
    /// Links that broke after they were up, and the first error of any link.
    pub lost: usize,
    pub first_error: Option<String>,
}

/// The release fan-out: from sending `ReleaseCommitted` to every link having the new `Assign`.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    /// When Beacon read the repository after the notice.
    pub repository_read: Option<Duration>,
    /// Links that got the new assignment in time.
    pub received: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// When the last link got it, if all did.
    pub all: Option<Duration>,
    pub beacon_cpu: CpuUse,
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn progress(options: &Options, message: impl fmt::Display) {
    if !options.quiet {
        eprintln!("beacon-loadgen: {message}");
    }
}

/// Fails with what to do when this process cannot hold `links` sockets.
fn check_limits(links: usize) -> Result<()> {
    let needed = links as u64 + SPARE_FDS;
    if let Some(limit) = procfs::open_files_limit()?
        && limit < needed
    {
        bail!(
            "the open-file limit is {limit}, below the {needed} that {links} links need \
             (one per link in this process, and as many in Beacon, which inherits the limit); \
             run `ulimit -n {needed}` (or higher) first, as benches/beacon does"
        );
    }
    if let Some(ports) = procfs::ephemeral_ports()
        && ports < links as u64 + SPARE_FDS
    {
        bail!(
            "only {ports} local ports for outgoing connections (net.ipv4.ip_local_port_range), \
             fewer than {links} links need"
        );
    }
    Ok(())
}

/// Runs the whole benchmark once: Beacon up, N links, steady heartbeats, one release fan-out.
/// Beacon is stopped on return, also on error.
pub async fn run(options: &Options) -> Result<Report> {
    if options.links == 0 {
        bail!("--links must be at least 1");
    }
    if options.heartbeat.is_zero() || options.heartbeat >= px_proto::link::HEARTBEAT_DEADLINE {
        bail!(
            "--heartbeat must be above 0 and below {:?}, after which Beacon drops a silent link",
            px_proto::link::HEARTBEAT_DEADLINE
        );
    }
    if options.connect_concurrency == 0 {
        bail!("--connect-concurrency must be at least 1");
    }
    check_limits(options.links)?;
    let ticks = procfs::clock_ticks_per_second()?;
    let epoch = Instant::now();
    let shutdown = CancellationToken::new();
    // Stops the stub and every link however this function returns.
    let _stop_all = shutdown.clone().drop_guard();

    let work = tempfile::Builder::new()
        .prefix("px-beacon-loadgen.")
        .tempdir()
        .context("making a temporary directory")?;
    let pki = px_test_support::Pki::new(&["localhost"]).context("making a throwaway CA")?;
    let tokens = Tokens::generate(options.links);
    let stub = RepoStub::start(tokens.repo_read.clone(), epoch, shutdown.clone()).await?;
    stub.set_release(1)?;

    let mut beacon = BeaconProcess::spawn(
        &options.beacon_bin,
        options.beacon_cpu.as_deref(),
        work.path(),
        &TlsFiles {
            cert: pki.cert(),
            key: pki.key(),
            ca: pki.ca(),
        },
        &tokens,
        &stub.url,
    )?;
    let pid = beacon.pid.to_string();
    beacon.wait_ready(&tokens.read, APP, 1).await?;
    // Read from the running process, so the report says where Beacon really ran.
    let beacon_cpus = procfs::cpus_allowed(&pid).unwrap_or_else(|| "?".into());
    progress(
        options,
        format_args!(
            "beacon (pid {pid}) ready on {}; opening {} links",
            beacon.control, options.links
        ),
    );

    // Connect: every link to its first assignment.
    let dialer = Dialer::new(beacon.control, &pki.ca())?;
    let fleet = Fleet::new(options.links, epoch);
    let settings = LinkSettings {
        dialer: dialer.clone(),
        tokens: tokens.maestro.clone(),
        heartbeat: options.heartbeat,
        reports: options.reports,
        connect_slots: Arc::new(Semaphore::new(options.connect_concurrency)),
        shutdown: shutdown.clone(),
    };
    let tracker = TaskTracker::new();
    let connect_cpu = CpuMeter::start(&pid, ticks)?;
    let loadgen_connect_cpu = CpuMeter::start("self", ticks)?;
    let connect_start = Instant::now();
    fleet::spawn_links(&fleet, &settings, &tracker);
    tracker.close();
    let connect_limit = CONNECT_BASE_TIMEOUT + Duration::from_millis(10 * options.links as u64);
    loop {
        if fleet
            .wait_until(PROGRESS_EVERY, |f| f.all_set_up() || f.failed() > 0)
            .await
        {
            break;
        }
        beacon.check_alive()?;
        if connect_start.elapsed() > connect_limit {
            bail!(
                "only {} of {} links set up after {connect_limit:?}\n{}",
                fleet.linked(),
                options.links,
                beacon.log_tail()
            );
        }
        progress(
            options,
            format_args!("linked {}/{}", fleet.linked(), options.links),
        );
    }
    let connect = connect_start.elapsed();
    let connect_cpu = connect_cpu.read()?;
    let loadgen_connect_cpu = loadgen_connect_cpu.read()?;
    if fleet.failed() > 0 {
        bail!(
            "{} of {} links failed to set up; first error: {}\n{}",
            fleet.failed(),
            options.links,
            fleet.first_error().unwrap_or_default(),
            beacon.log_tail()
        );
    }
    let (first_generation, highest_first) = fleet.first_generations();
    if first_generation != highest_first {
        bail!(
            "links got first assignments of generations {first_generation}..={highest_first}; nothing else should change Beacon's desired state"
        );
    }
    let memory_linked = procfs::memory(&pid)?;
    progress(
        options,
        format_args!(
            "all {} linked in {connect:.2?}; {:?} of heartbeats",
            options.links, options.steady
        ),
    );

    // Steady: heartbeats only.
    let steady_cpu = CpuMeter::start(&pid, ticks)?;
    let loadgen_cpu = CpuMeter::start("self", ticks)?;
    let sent_before = fleet
        .heartbeats_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let counted_before = beacon
        .metric(&tokens.read, "beacon_heartbeats_total")
        .await
        .ok();
    tokio::time::sleep(options.steady).await;
    let steady_cpu = steady_cpu.read()?;
    let loadgen_steady_cpu = loadgen_cpu.read()?;
    let heartbeats_sent = fleet
        .heartbeats_sent
        .load(std::sync::atomic::Ordering::Relaxed)
        - sent_before;
    let counted_after = beacon
        .metric(&tokens.read, "beacon_heartbeats_total")
        .await
        .ok();
    let heartbeats_counted = counted_before
        .zip(counted_after)
        .map(|(before, after)| after.saturating_sub(before));
    let memory_steady = procfs::memory(&pid)?;
    beacon.check_alive()?;

    // Fan-out: release 2 committed, one notice, every link gets the new assignment.
    progress(options, "committing release 2 and notifying beacon");
    // The repository link stays open until the end, so Beacon does not see a peer leave in
    // the middle of the fan-out; its handshake is outside the measured window.
    let mut repository_link = fleet::open_repository_link(&dialer, &tokens.repository).await?;
    stub.set_release(2)?;
    let fanout_cpu = CpuMeter::start(&pid, ticks)?;
    let t0 = fleet::announce(&mut repository_link, APP, 2, format!("{:064x}", 2)).await?;
    let all_arrived = fleet
        .wait_until(options.fanout_timeout, Fleet::all_updated_or_gone)
        .await;
    let beacon_cpu = fanout_cpu.read()?;
    let mut arrivals = fleet.arrivals_since(t0);
    arrivals.sort();
    let received = arrivals.len();
    let fanout = Fanout {
        repository_read: stub
            .last_read()
            .map(|read| read.saturating_sub(t0.saturating_duration_since(epoch))),
        received,
        p50: quantile(&arrivals, 0.50),
        p99: quantile(&arrivals, 0.99),
        max: arrivals.last().copied().unwrap_or_default(),
        all: (all_arrived && received == options.links)
            .then(|| arrivals.last().copied())
            .flatten(),
        beacon_cpu,
    };
    let memory_end = procfs::memory(&pid)?;

    shutdown.cancel();
    let _ = tokio::time::timeout(STOP_TIMEOUT, tracker.wait()).await;
    drop(repository_link);
    let lost = fleet.lost();
    let first_error = fleet.first_error();
    beacon.stop().await;

    Ok(Report {
        links: options.links,
        heartbeat: options.heartbeat,
        steady: options.steady,
        reports: options.reports,
        cores: procfs::online_cpus()
            .or_else(|| std::thread::available_parallelism().map(|n| n.get()).ok())
            .unwrap_or(0),
        beacon_cpus,
        cpu_tick: Duration::from_secs(1) / u32::try_from(ticks).unwrap_or(u32::MAX),
        loadgen_cpus: procfs::cpus_allowed("self").unwrap_or_else(|| "?".into()),
        linked: fleet.linked(),
        connect,
        connect_cpu,
        loadgen_connect_cpu,
        first_generation,
        memory_linked,
        memory_steady,
        steady_cpu,
        loadgen_steady_cpu,
        heartbeats_sent,
        heartbeats_counted,
        fanout,
        memory_end,
        lost,
        first_error,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time per link, in microseconds.
fn per_link(total: Duration, links: usize) -> String {
    format!("{:.0} µs", total.as_secs_f64() * 1e6 / links.max(1) as f64)
}

fn cpu(c: &CpuUse) -> String {
    format!(
        "{:.1}% of one core ({} CPU in {:.2} s)",
        c.percent_of_one_core(),
        ms(c.cpu),
        c.wall.as_secs_f64()
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reports = match self.reports {
            Reports::Running => "one healthy instance each",
            Reports::Empty => "no instances",
        };
        writeln!(
            f,
            "beacon with N = {} Maestro links, heartbeat every {} at random phase (reporting {reports})",
            self.links,
            humantime::format_duration(self.heartbeat)
        )?;
        writeln!(
            f,
            "machine: {} CPUs online; beacon runs on CPUs {}, the load generator on CPUs {}: \
             the load generator shares the machine with beacon (CPU times to {})",
            self.cores,
            self.beacon_cpus,
            self.loadgen_cpus,
            ms(self.cpu_tick)
        )?;
        let rows: Vec<(String, String)> = vec![
            (
                "links up (first Assign received)".into(),
                format!("{} of {}", self.linked, self.links),
            ),
            (
                "connect all N".into(),
                format!(
                    "{:.2} s; beacon {}, {} per link; load generator {:.0}% of one core",
                    self.connect.as_secs_f64(),
                    cpu(&self.connect_cpu),
                    per_link(self.connect_cpu.cpu, self.links),
                    self.loadgen_connect_cpu.percent_of_one_core()
                ),
            ),
            (
                "beacon memory, all linked".into(),
                format!(
                    "VmRSS {}, VmHWM {}",
                    mib(self.memory_linked.rss_kib),
                    mib(self.memory_linked.hwm_kib)
                ),
            ),
            (
                format!(
                    "beacon memory, after {:.0} s steady",
                    self.steady.as_secs_f64()
                ),
                format!(
                    "VmRSS {}, VmHWM {}",
                    mib(self.memory_steady.rss_kib),
                    mib(self.memory_steady.hwm_kib)
                ),
            ),
            ("beacon CPU, steady".into(), cpu(&self.steady_cpu)),
            (
                "heartbeats in the steady window".into(),
                format!(
                    "{} sent ({:.0}/s), {} counted by beacon",
                    self.heartbeats_sent,
                    self.heartbeats_sent as f64 / self.steady_cpu.wall.as_secs_f64().max(1e-9),
                    self.heartbeats_counted
                        .map_or_else(|| "?".to_string(), |n| n.to_string())
                ),
            ),
            (
                "load generator CPU, steady".into(),
                format!(
                    "{:.1}% of one core",
                    self.loadgen_steady_cpu.percent_of_one_core()
                ),
            ),
            (
                "fan-out: notice to repository read".into(),
                self.fanout.repository_read.map_or_else(|| "-".into(), ms),
            ),
            (
                format!("fan-out: Assign gen {} per link", self.first_generation + 1),
                format!(
                    "p50 {}, p99 {}, max {}",
                    ms(self.fanout.p50),
                    ms(self.fanout.p99),
                    ms(self.fanout.max)
                ),
            ),
            (
                "fan-out: all N have it".into(),
                match self.fanout.all {
                    Some(all) => ms(all),
                    None => format!(
                        "NOT REACHED: {} of {} got it",
                        self.fanout.received, self.links
                    ),
                },
            ),
            (
                "beacon CPU, fan-out".into(),
                format!(
                    "{}, {} per link",
                    cpu(&self.fanout.beacon_cpu),
                    per_link(self.fanout.beacon_cpu.cpu, self.links)
                ),
            ),
            (
                "beacon memory, end".into(),
                format!(
                    "VmRSS {}, VmHWM {}",
                    mib(self.memory_end.rss_kib),
                    mib(self.memory_end.hwm_kib)
                ),
            ),
            (
                "links lost after set-up".into(),
                match &self.first_error {
                    Some(e) if self.lost > 0 => format!("{} (first: {e})", self.lost),
                    _ => self.lost.to_string(),
                },
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in rows {
            writeln!(f, "  {key:<width$}  {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&values, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&values[..1], 0.99), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
