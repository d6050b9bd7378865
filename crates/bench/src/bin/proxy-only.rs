//! `proxy-only`: Maestro's real reverse proxy with a fixed routing table sending one host to one
//! upstream (`px_maestro::bench::serve_fixed_route`, default `ProxySettings`), so the proxy can
//! be benchmarked against nginx `proxy_pass` (`benches/proxy`). It is exactly Maestro's data
//! path minus the supervisor: the same `Proxy`, the same route table types the supervisor fills
//! in, the same runtimes (a multi-threaded tokio runtime for the rest, and the proxy's own worker
//! threads, one per core unless `--threads` says otherwise), and the same access-log pipeline.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use px_maestro::bench::{AccessLogMode, FixedRoute, serve_fixed_route};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AccessMode {
    /// Maestro's own writer: records are formatted and written, rotated, to
    /// `<log-dir>/access.log`, exactly as the service does (`AccessLogMode::File`).
    File,
    /// Records are built and formatted by a task, then discarded: the per-request cost without
    /// the disk (`AccessLogMode::Discard`).
    Null,
    /// No record is built at all (`AccessLogMode::Off`).
    Off,
}

impl AccessMode {
    fn describe(self) -> &'static str {
        match self {
            Self::File => "on, Maestro's rotating writer to a file",
            Self::Null => "on, records formatted then discarded (/dev/null-equivalent)",
            Self::Off => "off (AccessLog::disabled)",
        }
    }
}

/// Maestro's reverse proxy alone, routing one host to one upstream.
#[derive(Debug, Parser)]
#[command(name = "proxy-only", version)]
struct Args {
    /// Address to serve plain HTTP on.
    #[arg(long)]
    listen: SocketAddr,
    /// The upstream every request for `--host` goes to.
    #[arg(long)]
    upstream: SocketAddr,
    /// The `Host` routed to the upstream (any other host gets Maestro's 404 page).
    #[arg(long, default_value = "bench.localhost")]
    host: String,
    /// Backends in the route, all at `--upstream` (round robin over them, as over instances).
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// Proxy worker threads (`ProxySettings::workers`); default one per core, as in Maestro.
    #[arg(long)]
    threads: Option<usize>,
    /// What happens to access records.
    #[arg(long, value_enum, default_value_t = AccessMode::Null)]
    access_log: AccessMode,
    /// Directory for `access.log` with `--access-log file`.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.instances == 0 {
        bail!("--instances must be at least 1");
    }
    if args.access_log == AccessMode::File && args.log_dir.is_none() {
        bail!("--access-log file needs --log-dir");
    }
    px_runtime::telemetry::init();
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(args, threads))
}

async fn serve(args: Args, threads: usize) -> Result<()> {
    let shutdown = px_runtime::shutdown::on_signals().context("installing signal handlers")?;
    let access_log = match args.access_log {
        AccessMode::Off => AccessLogMode::Off,
        AccessMode::Null => AccessLogMode::Discard,
        AccessMode::File => {
            let dir = args.log_dir.clone().context("--log-dir")?;
            tokio::fs::create_dir_all(&dir)
                .await
                .with_context(|| format!("creating {}", dir.display()))?;
            AccessLogMode::File(dir)
        }
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    println!(
        "proxy-only: Maestro's data path minus the supervisor (px_maestro::bench::serve_fixed_route, \
         default ProxySettings) on {local}: host {} -> {} backend(s) at {}; {threads} proxy worker \
         thread(s); access log {}",
        args.host,
        args.instances,
        args.upstream,
        args.access_log.describe(),
    );
    let route = FixedRoute {
        host: args.host,
        upstream: args.upstream,
        instances: args.instances,
        workers: threads,
        access_log,
    };
    let served = serve_fixed_route(listener, route, shutdown)
        .await
        .context("serving")?;
    if served.dropped_access_records > 0 {
        println!(
            "proxy-only: {} access records dropped (queue full)",
            served.dropped_access_records
        );
    }
    Ok(())
}
