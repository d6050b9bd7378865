//! `proxy-only`: Maestro's real reverse proxy (`px_maestro::proxy::Proxy::serve_http`, default
//! `ProxySettings`) with a fixed routing table sending one host to one upstream, so the proxy
//! can be benchmarked against nginx `proxy_pass` (`benches/proxy`). It is exactly Maestro's
//! data path minus the supervisor: the same `Proxy`, the same `Routes`/`RouteTable`/`AppRoute`
//! /`Backend` types the supervisor fills in, the same runtimes (a multi-threaded tokio runtime for
//! the rest, and the proxy's own worker threads, one per core unless `--threads` says
//! otherwise), and the same access-log pipeline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use px_maestro::proxy::{AccessLog, Proxy, ProxyMetrics, ProxySettings};
use px_maestro::routes::{AppRoute, Backend, RouteTable, Routes};
use tokio_util::task::TaskTracker;

/// The app name the route carries; it labels metrics and access records.
const APP: &str = "bench";
/// The release number the route carries.
const RELEASE: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AccessMode {
    /// Maestro's own writer (`px_maestro::logs::write_access_log`): records are formatted and
    /// written, rotated, to `<log-dir>/access.log`, exactly as the service does.
    File,
    /// Records go through `AccessLog::new` and are formatted (`AccessRecord::to_line`) by a
    /// task, then discarded: the per-request cost without the disk.
    Null,
    /// `AccessLog::disabled()`: no record is built at all.
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
    let tasks = TaskTracker::new();

    let backends = (0..args.instances)
        .map(|_| Backend::new(APP, RELEASE, args.upstream))
        .collect();
    let mut table = RouteTable::default();
    table.by_host.insert(
        args.host.to_ascii_lowercase(),
        Arc::new(AppRoute::new(APP, RELEASE, backends, Vec::new())),
    );
    let routes = Arc::new(Routes::default());
    routes.store(table);

    let access = match args.access_log {
        AccessMode::Off => AccessLog::disabled(),
        AccessMode::Null => {
            let (access, mut records) = AccessLog::new(px_maestro::ACCESS_LOG_QUEUE);
            tasks.spawn(async move {
                while let Some(record) = records.recv().await {
                    std::hint::black_box(record.to_line());
                }
            });
            access
        }
        AccessMode::File => {
            let dir = args.log_dir.clone().context("--log-dir")?;
            tokio::fs::create_dir_all(&dir)
                .await
                .with_context(|| format!("creating {}", dir.display()))?;
            // The same two stages as `px_maestro::run`: records → lines → rotating file.
            let (access, records) = AccessLog::new(px_maestro::ACCESS_LOG_QUEUE);
            let (lines_tx, lines_rx) = tokio::sync::mpsc::channel(px_maestro::ACCESS_LOG_QUEUE);
            tasks.spawn(px_maestro::logs::write_access_log(
                dir,
                px_maestro::logs::Rotation::default(),
                lines_rx,
            ));
            tasks.spawn(px_maestro::logs::format_access_records(records, lines_tx));
            access
        }
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let proxy = Proxy::new(
        routes,
        ProxySettings {
            workers: threads,
            ..ProxySettings::default()
        },
        Arc::new(ProxyMetrics::default()),
        access.clone(),
    );
    println!(
        "proxy-only: Maestro's data path minus the supervisor (px_maestro::proxy::Proxy::serve_http, \
         default ProxySettings) on {local}: host {} -> {} backend(s) at {}; {threads} proxy worker \
         thread(s); access log {}",
        args.host,
        args.instances,
        args.upstream,
        args.access_log.describe(),
    );
    proxy.clone().serve_http(listener, shutdown).await;

    // The proxy has drained: dropping the last senders lets the log tasks finish.
    let dropped = access.dropped();
    drop(proxy);
    drop(access);
    tasks.close();
    tasks.wait().await;
    if dropped > 0 {
        println!("proxy-only: {dropped} access records dropped (queue full)");
    }
    Ok(())
}
