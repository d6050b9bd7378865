//! The simulated Maestros: one tokio task per link speaking the real protocol over TLS
//! (`Hello`, `Welcome`, the first `Assign`, then a heartbeat every period at a random phase),
//! recording when each link gets an assignment newer than its first. Shared counters and one
//! `Notify` let the driver wait for "all linked" and "all updated" without polling.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use px_proto::codec::FrameCodec;
use px_proto::link::{
    Assignment, FromBeacon, Hello, InstanceState, InstanceStatus, NodeReport, PROTOCOL_VERSION,
    PeerRole, ReleaseCommitted, ToBeacon,
};
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one link may take from its connect to its first assignment once it holds a
/// connect slot. Beacon's own handshake timeout is 10 s; the rest is room for a Beacon busy
/// with thousands of other handshakes.
pub const LINK_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

pub type Link =
    Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec<FromBeacon, ToBeacon>>;

/// What the simulated nodes report in their heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reports {
    /// As a real Maestro running its assignment: the applied generation and one healthy
    /// instance per assigned instance, at the assigned release.
    Running,
    /// The applied generation and no instances: the cheapest heartbeat Beacon can get.
    Empty,
}

/// Loopback source addresses the simulated nodes spread over (127.0.0.1 to 127.0.0.250): with
/// the default 256 connects at once, one or two per address, under Beacon's per-source cap.
pub const SOURCE_ADDRESSES: usize = 250;

/// Where and how the links connect.
#[derive(Clone)]
pub struct Dialer {
    pub addr: SocketAddr,
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl Dialer {
    /// A dialer trusting only the CA in `ca`. Session resumption is off: each simulated node is
    /// a different machine connecting once, so every handshake is a full one, as in production.
    pub fn new(addr: SocketAddr, ca: &std::path::Path) -> Result<Self> {
        let mut config = (*px_runtime::tls::client_config(ca)?).clone();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            addr,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: px_runtime::tls::server_name("localhost")?,
        })
    }

    /// TCP, TLS, `Hello`; returns the link once Beacon answered `Welcome`. Link `index`
    /// connects from a loopback address of its own among [`SOURCE_ADDRESSES`] when Beacon is
    /// on IPv4 loopback: Beacon holds each source address to a few connections that have not
    /// said `Hello` yet, and a fleet of real nodes comes from as many addresses.
    pub async fn open(&self, hello: Hello, index: usize) -> Result<Link> {
        let tcp = match self.addr {
            SocketAddr::V4(addr) if addr.ip().is_loopback() => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                let last = u8::try_from(1 + index % SOURCE_ADDRESSES).unwrap_or(1);
                socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
                socket.connect(self.addr).await.context("connect")?
            }
            _ => TcpStream::connect(self.addr).await.context("connect")?,
        };
        // Heartbeats are small frames; Nagle would hold them back behind unacknowledged ones.
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .context("tls handshake")?;
        let mut link = Framed::new(tls, FrameCodec::new());
        link.send(ToBeacon::Hello(hello)).await.context("hello")?;
        match link.next().await {
            Some(Ok(FromBeacon::Welcome { .. })) => Ok(link),
            Some(Ok(FromBeacon::Rejected { reason })) => bail!("rejected: {reason}"),
            Some(Ok(other)) => bail!("expected welcome, got {other:?}"),
            Some(Err(e)) => Err(anyhow!("reading welcome: {e}")),
            None => bail!("closed before welcome"),
        }
    }
}

/// The state all link tasks share with the driver.
pub struct Fleet {
    pub links: usize,
    /// Arrival times are nanoseconds after this instant.
    pub epoch: Instant,
    /// Links that got their first assignment.
    linked: AtomicUsize,
    /// Links that never got there.
    failed: AtomicUsize,
    /// Links that got there and later broke.
    lost: AtomicUsize,
    /// Links that got a newer assignment than their first.
    updated: AtomicUsize,
    /// Links that ended without a newer assignment: nothing more will arrive from them.
    gone_without_update: AtomicUsize,
    /// Per link: when its first newer assignment arrived (nanoseconds after `epoch`, 0: not
    /// yet), and the generation of its first assignment.
    arrivals: Vec<AtomicU64>,
    first_generations: Vec<AtomicU64>,
    pub heartbeats_sent: AtomicU64,
    first_error: Mutex<Option<String>>,
    changed: Notify,
}

impl Fleet {
    pub fn new(links: usize, epoch: Instant) -> Arc<Self> {
        Arc::new(Self {
            links,
            epoch,
            linked: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            updated: AtomicUsize::new(0),
            gone_without_update: AtomicUsize::new(0),
            arrivals: (0..links).map(|_| AtomicU64::new(0)).collect(),
            first_generations: (0..links).map(|_| AtomicU64::new(0)).collect(),
            heartbeats_sent: AtomicU64::new(0),
            first_error: Mutex::new(None),
            changed: Notify::new(),
        })
    }

    pub fn linked(&self) -> usize {
        self.linked.load(Ordering::Acquire)
    }
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }
    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::Acquire)
    }
    pub fn updated(&self) -> usize {
        self.updated.load(Ordering::Acquire)
    }
    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Generations of the first assignments, lowest and highest (all equal when Beacon did not
    /// change its desired state while the links connected).
    pub fn first_generations(&self) -> (u64, u64) {
        let gens = self
            .first_generations
            .iter()
            .map(|g| g.load(Ordering::Acquire))
            .filter(|&g| g > 0);
        gens.fold((u64::MAX, 0), |(lo, hi), g| (lo.min(g), hi.max(g)))
    }

    /// Arrival time of each link's newer assignment relative to `t0`, for the links that got one.
    pub fn arrivals_since(&self, t0: Instant) -> Vec<Duration> {
        let base = t0.saturating_duration_since(self.epoch);
        self.arrivals
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .filter(|&nanos| nanos > 0)
            .map(|nanos| Duration::from_nanos(nanos).saturating_sub(base))
            .collect()
    }

    fn note_error(&self, error: String) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(error);
    }

    /// Waits until `done` holds or `limit` passes; says which.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a change between the check and the wait wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return done(self);
            }
        }
    }

    /// Whether every link ended its set-up, linked or not.
    pub fn all_set_up(&self) -> bool {
        self.linked() + self.failed() >= self.links
    }

    /// Whether every link has the newer assignment or can no longer get it.
    pub fn all_updated_or_gone(&self) -> bool {
        self.updated() + self.gone_without_update.load(Ordering::Acquire) >= self.links
    }
}

/// What every link needs besides its index.
#[derive(Clone)]
pub struct LinkSettings {
    pub dialer: Dialer,
    /// Each link's token, by its index.
    pub tokens: Vec<String>,
    pub heartbeat: Duration,
    pub reports: Reports,
    pub connect_slots: Arc<Semaphore>,
    pub shutdown: CancellationToken,
}

/// Spawns the `fleet.links` link tasks on `tracker`.
pub fn spawn_links(fleet: &Arc<Fleet>, settings: &LinkSettings, tracker: &TaskTracker) {
    for index in 0..fleet.links {
        let fleet = fleet.clone();
        let settings = settings.clone();
        tracker.spawn(async move {
            let shutdown = settings.shutdown.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = run_link(index, &fleet, &settings) => {}
            }
        });
    }
}

impl LinkSettings {
    /// The token of link `index`; empty (and so refused) if the fleet has none for it.
    fn token(&self, index: usize) -> &str {
        self.tokens.get(index).map_or("", String::as_str)
    }
}

pub fn node_name(index: usize) -> String {
    format!("node-{:05}", index + 1)
}

fn maestro_hello(name: String, token: &str) -> Hello {
    Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Maestro,
        name,
        token: token.into(),
        software: concat!("beacon-loadgen ", env!("CARGO_PKG_VERSION")).into(),
        labels: BTreeMap::new(),
        // A fresh node: nothing applied, nothing running.
        state: Some(NodeReport::default()),
    }
}

/// What the node reports after applying `assignment`.
fn report_for(assignment: &Assignment, reports: Reports, index: usize) -> NodeReport {
    let instances = match reports {
        Reports::Empty => Vec::new(),
        Reports::Running => assignment
            .apps
            .iter()
            .flat_map(|app| {
                (0..app.instances).map(move |i| InstanceStatus {
                    app: app.app.clone(),
                    release: app.release,
                    state: InstanceState::Healthy,
                    pid: Some(10_000 + i),
                    port: Some(20_000 + (index % 40_000) as u16),
                    restarts: 0,
                    last_exit: None,
                    process: px_proto::procfile::WEB_PROCESS.to_string(),
                    number: i + 1,
                    started_at: None,
                    memory_bytes: None,
                    cpu_permille: None,
                })
            })
            .collect(),
    };
    NodeReport {
        generation: assignment.generation,
        instances,
        rollouts: Vec::new(),
        disk: None,
        builds: Vec::new(),
    }
}

async fn first_assignment(link: &mut Link) -> Result<Assignment> {
    loop {
        match link.next().await {
            Some(Ok(FromBeacon::Assign(a))) => return Ok(a),
            Some(Ok(FromBeacon::Heartbeat)) => continue,
            Some(Ok(other)) => bail!("expected an assignment, got {other:?}"),
            Some(Err(e)) => bail!("reading the first assignment: {e}"),
            None => bail!("closed before the first assignment"),
        }
    }
}

async fn run_link(index: usize, fleet: &Fleet, settings: &LinkSettings) {
    let set_up = async {
        // The permit bounds handshakes in flight, like a fleet of machines booting together
        // without all hitting Beacon in the same millisecond.
        let _permit = settings
            .connect_slots
            .acquire()
            .await
            .map_err(|_| anyhow!("connect slots closed"))?;
        tokio::time::timeout(LINK_SETUP_TIMEOUT, async {
            let mut link = settings
                .dialer
                .open(
                    maestro_hello(node_name(index), settings.token(index)),
                    index,
                )
                .await?;
            let first = first_assignment(&mut link).await?;
            anyhow::Ok((link, first))
        })
        .await
        .map_err(|_| anyhow!("no assignment within {LINK_SETUP_TIMEOUT:?}"))?
    };
    let (mut link, first) = match set_up.await {
        Ok(set_up) => set_up,
        Err(e) => {
            fleet.note_error(format!("{}: {e:#}", node_name(index)));
            fleet.failed.fetch_add(1, Ordering::AcqRel);
            fleet.gone_without_update.fetch_add(1, Ordering::AcqRel);
            fleet.changed.notify_one();
            return;
        }
    };
    fleet.first_generations[index].store(first.generation, Ordering::Release);
    if fleet.linked.fetch_add(1, Ordering::AcqRel) + 1 == fleet.links {
        fleet.changed.notify_one();
    }
    if let Err(e) = steady(index, fleet, settings, &mut link, first).await {
        fleet.note_error(format!("{}: {e:#}", node_name(index)));
        fleet.lost.fetch_add(1, Ordering::AcqRel);
        if fleet.arrivals[index].load(Ordering::Acquire) == 0 {
            fleet.gone_without_update.fetch_add(1, Ordering::AcqRel);
        }
        fleet.changed.notify_one();
    }
}

/// Heartbeats and reads until the link breaks (an error) or the task is cancelled.
async fn steady(
    index: usize,
    fleet: &Fleet,
    settings: &LinkSettings,
    link: &mut Link,
    first: Assignment,
) -> Result<()> {
    let first_generation = first.generation;
    let mut report = report_for(&first, settings.reports, index);
    // A random phase, so N links spread their heartbeats over the period as a fleet of
    // independent machines does, instead of sending them all in one burst.
    let phase = Duration::from_nanos(
        rand::rng().random_range(0..settings.heartbeat.as_nanos().max(1) as u64),
    );
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + phase, settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                link.send(ToBeacon::Heartbeat(report.clone())).await.context("sending a heartbeat")?;
                fleet.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
            }
            frame = link.next() => match frame {
                Some(Ok(FromBeacon::Assign(assignment))) => {
                    if assignment.generation > first_generation
                        && fleet.arrivals[index].load(Ordering::Acquire) == 0
                    {
                        let nanos = u64::try_from(fleet.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        fleet.arrivals[index].store(nanos.max(1), Ordering::Release);
                        if fleet.updated.fetch_add(1, Ordering::AcqRel) + 1 == fleet.links {
                            fleet.changed.notify_one();
                        }
                    }
                    // The next heartbeat reports it applied, as Maestro would once its new
                    // instances are healthy.
                    report = report_for(&assignment, settings.reports, index);
                }
                Some(Ok(FromBeacon::Heartbeat | FromBeacon::Restart { .. } | FromBeacon::Stop { .. })) => {}
                Some(Ok(other)) => bail!("unexpected {other:?}"),
                Some(Err(e)) => bail!("reading: {e}"),
                None => bail!("beacon closed the link"),
            },
        }
    }
}

/// Opens a link as a repository (apprepo) does.
pub async fn open_repository_link(dialer: &Dialer, token: &str) -> Result<Link> {
    let hello = Hello {
        runtimes: Default::default(),
        protocol: PROTOCOL_VERSION,
        role: PeerRole::Repository,
        name: "bench-repository".into(),
        token: token.into(),
        software: concat!("beacon-loadgen ", env!("CARGO_PKG_VERSION")).into(),
        labels: BTreeMap::new(),
        state: None,
    };
    dialer.open(hello, 0).await.context("repository link")
}

/// Announces release `version` of `app` on a repository link; returns the instant the notice
/// was handed to the socket, where the fan-out time starts.
pub async fn announce(
    link: &mut Link,
    app: &str,
    version: u64,
    bundle_sha256: String,
) -> Result<Instant> {
    let notice = ToBeacon::ReleaseCommitted(ReleaseCommitted {
        app: app.into(),
        version,
        bundle_sha256,
    });
    let sent = Instant::now();
    link.send(notice)
        .await
        .context("sending ReleaseCommitted")?;
    Ok(sent)
}
