//! The watch after a release switch: what the switch costs, counted for Beacon. The new
//! release's answers (5xx among them) during its `[deploy] watch` window, the old release's
//! answers after the switch, and how its long-lived connections ended once drained. The
//! figures travel in every node report until the app's next switch; Beacon sums them over the
//! nodes and judges them against the app's error budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use px_proto::link::{DeployFigures, RolloutFigures};

use super::instance::Drained;
use super::shared::Shared;
use crate::routes::ReleaseStats;

/// How often a watched release's figures are brought up to date (and reported if changed).
pub const WATCH_TICK: Duration = Duration::from_secs(1);

/// A release switch being watched: its figures so far, whether the release it replaced has
/// finished draining, and whether the previous release's other processes are still stopping.
pub(super) struct WatchedRollout {
    pub(super) figures: RolloutFigures,
    drained: bool,
    retiring: bool,
}

/// Starts counting what the switch of `app` to `release` costs: answers of the release it
/// replaced (`previous`) from now on, and answers of the new one (`new`) during `window`.
/// The task holds only the stats, never a `Backend`, so it cannot delay a drain.
pub(super) fn watch(
    shared: &Arc<Shared>,
    app: &str,
    release: u64,
    window: Duration,
    new: Arc<ReleaseStats>,
    previous: Option<(u64, Arc<ReleaseStats>)>,
) {
    let figures = RolloutFigures {
        app: app.to_string(),
        release,
        previous: previous.as_ref().map(|(p, _)| *p),
        watched_ms: 0,
        watch_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        done: false,
        figures: DeployFigures::default(),
    };
    shared
        .rollouts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            app.to_string(),
            WatchedRollout {
                figures,
                drained: previous.is_none(),
                retiring: false,
            },
        );
    let shared = shared.clone();
    let app = app.to_string();
    // The new release's stats are fresh: it has answered nothing before its switch; the old
    // one's count from here.
    let old = previous.map(|(_, stats)| {
        let (base, _) = stats.counts();
        (stats, base)
    });
    let started = Instant::now();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_TICK).await;
            let elapsed = started.elapsed();
            let mut rollouts = shared.rollouts.lock().unwrap_or_else(|p| p.into_inner());
            // A newer switch of the app replaced this one, or the app went.
            let Some(watched) = rollouts
                .get_mut(&app)
                .filter(|w| w.figures.release == release && !w.figures.done)
            else {
                return;
            };
            let before = watched.figures.clone();
            let f = &mut watched.figures;
            if elapsed < window {
                let (requests, errors) = new.counts();
                f.figures.new_requests = requests;
                f.figures.new_errors = errors;
                f.watched_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            } else {
                f.watched_ms = f.watch_ms;
            }
            if let Some((old, base)) = &old {
                f.figures.old_requests = old.counts().0 - base;
            }
            f.done = elapsed >= window && watched.drained && !watched.retiring;
            let changed = watched.figures != before;
            let done = watched.figures.done;
            drop(rollouts);
            if changed {
                shared.changes.send_modify(|n| *n += 1);
            }
            if done {
                return;
            }
        }
    });
}

/// The release that `release` of `app` replaced has stopped: record how its long-lived
/// connections ended, and let the watch finish.
pub(super) fn drained(shared: &Shared, app: &str, release: u64, drained: Drained) {
    let mut rollouts = shared.rollouts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(watched) = rollouts
        .get_mut(app)
        .filter(|w| w.figures.release == release)
    {
        watched.drained = true;
        watched.figures.figures.closed = drained.closed;
        watched.figures.figures.cut = drained.cut;
        watched.figures.figures.killed += drained.killed;
    }
}

/// The previous release's other processes are being stopped: the figures are final only once
/// they are gone ([`retired`]), since some may yet be killed at their grace.
pub(super) fn retiring(shared: &Shared, app: &str, release: u64) {
    let mut rollouts = shared.rollouts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(watched) = rollouts
        .get_mut(app)
        .filter(|w| w.figures.release == release)
    {
        watched.retiring = true;
    }
}

/// The previous release's other processes are gone; `killed` of them outlived their grace.
pub(super) fn retired(shared: &Shared, app: &str, release: u64, killed: u64) {
    let mut rollouts = shared.rollouts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(watched) = rollouts
        .get_mut(app)
        .filter(|w| w.figures.release == release)
    {
        watched.retiring = false;
        watched.figures.figures.killed += killed;
    }
    drop(rollouts);
    shared.changes.send_modify(|n| *n += 1);
}
