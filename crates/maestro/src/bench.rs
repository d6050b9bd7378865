//! Maestro's reverse proxy alone behind one fixed route, for benchmarks: `proxy-only` in
//! `crates/bench` (the `proxy-only` row of `benches/proxy`) calls [`serve_fixed_route`] and
//! nothing else of Maestro. What it serves is exactly Maestro's data path minus the supervisor:
//! the same `Proxy` with the default `ProxySettings` but for its worker threads, the same route
//! table types the supervisor fills in, and the same access-log pipeline as [`run`](crate::run).
//! It is one function, rather than the proxy's types, so that the proxy's internals stay private
//! to Maestro while a benchmark still measures them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logs::{self, Rotation};
use crate::proxy::{AccessLog, Proxy, ProxyError, ProxyMetrics, ProxySettings};
use crate::routes::{AppRoute, Backend, RouteTable, Routes};

/// The app name the route carries; it labels metrics and access records.
const APP: &str = "bench";
/// The release number the route carries.
const RELEASE: u64 = 1;

/// What happens to the proxy's access records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogMode {
    /// Maestro's own pipeline, as `run` starts it: records are formatted, then written and
    /// rotated to `access.log` in this directory, which must exist.
    File(PathBuf),
    /// Records are built and formatted into lines by a task, then discarded: the cost per
    /// request without the disk.
    Discard,
    /// No record is built at all.
    Off,
}

/// The one route served, and how.
#[derive(Debug, Clone)]
pub struct FixedRoute {
    /// The `Host` routed to `upstream` (compared lowercased); any other host gets Maestro's
    /// 404 page.
    pub host: String,
    /// Where every request for `host` goes.
    pub upstream: SocketAddr,
    /// Backends in the route, all at `upstream`: the proxy goes round them as over instances.
    pub instances: u32,
    /// The proxy's worker threads for the listener (`ProxySettings::workers`).
    pub workers: usize,
    pub access_log: AccessLogMode,
}

/// How serving went, once it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Access records dropped because their queue was full.
    pub dropped_access_records: u64,
}

/// Serves plain HTTP on `listener`, sending requests for `route.host` to `route.upstream`, until
/// `shutdown`; then drains as Maestro does and waits until the access log is written. Fails
/// only when the listener breaks, as it will never accept again.
pub async fn serve_fixed_route(
    listener: TcpListener,
    route: FixedRoute,
    shutdown: CancellationToken,
) -> Result<Served, ProxyError> {
    let backends = (0..route.instances)
        .map(|_| Backend::new(APP, RELEASE, route.upstream))
        .collect();
    let mut table = RouteTable::default();
    table.by_host.insert(
        route.host.to_ascii_lowercase(),
        Arc::new(AppRoute::new(APP, RELEASE, backends, Vec::new())),
    );
    let routes = Arc::new(Routes::default());
    routes.store(table);

    let tasks = TaskTracker::new();
    let access = match route.access_log {
        AccessLogMode::Off => AccessLog::disabled(),
        AccessLogMode::Discard => {
            let (access, mut records) = AccessLog::new(logs::ACCESS_LOG_QUEUE);
            tasks.spawn(async move {
                while let Some(record) = records.recv().await {
                    std::hint::black_box(record.to_line());
                }
            });
            access
        }
        AccessLogMode::File(dir) => {
            let (access, format, write) = logs::access_log(dir, Rotation::default());
            tasks.spawn(write);
            tasks.spawn(format);
            access
        }
    };

    let proxy = Proxy::new(
        routes,
        ProxySettings {
            workers: route.workers,
            ..ProxySettings::default()
        },
        Arc::new(ProxyMetrics::default()),
        access.clone(),
    );
    let served = proxy.clone().serve_http(listener, shutdown).await;

    // The proxy has drained: dropping the last handles lets the log tasks finish.
    let dropped_access_records = access.dropped();
    drop(proxy);
    drop(access);
    tasks.close();
    tasks.wait().await;
    served.map(|()| Served {
        dropped_access_records,
    })
}
