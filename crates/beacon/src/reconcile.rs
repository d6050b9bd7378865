//! The reconciler: reads the desired state (every app's current release) from the repository
//! on start-up, on every release notice and on an interval, and hands it to the hub. When the
//! repository is away, the hub keeps the last known state and the reconciler retries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use px_proto::api::{App, Release};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;

/// How long one read of the repository may take.
pub const REPOSITORY_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry bounds while the repository is unreachable (doubling, with jitter).
pub const RETRY_MIN: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct RepositoryClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl RepositoryClient {
    pub fn new(base: &str, token: String) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(REPOSITORY_TIMEOUT)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// Every app's current release.
    pub async fn desired(&self) -> Result<BTreeMap<String, Release>, String> {
        let url = format!("{}/v1/apps", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!(
                "GET {url}: {status}: {}",
                body.chars().take(300).collect::<String>()
            ));
        }
        let apps: Vec<App> = response
            .json()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        Ok(apps
            .into_iter()
            .filter_map(|a| a.current.map(|r| (a.name, r)))
            .collect())
    }
}

/// Runs until `shutdown`: reconciles now, then on each trigger or interval.
pub async fn run(
    client: RepositoryClient,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut triggers: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        metrics.reconciles.inc();
        let wait = match client.desired().await {
            Ok(desired) => {
                failures = 0;
                hub.set_desired(desired).await;
                interval
            }
            Err(error) => {
                metrics.reconcile_failures.inc();
                tracing::warn!(%error, "cannot read the desired state; keeping the last known one");
                hub.repository_unreachable(&error);
                let wait = retry_wait(failures, interval);
                failures = failures.saturating_add(1);
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            trigger = triggers.recv() => {
                if trigger.is_none() {
                    return;
                }
                // Several notices in a burst need one read.
                while triggers.try_recv().is_ok() {}
            }
        }
    }
}

/// The wait before retry number `retry` (0 for the first) after failed reads: the shared
/// jittered backoff from `RETRY_MIN` up to `RETRY_MAX`, and never longer than `interval`, the
/// wait before the next regular read.
fn retry_wait(retry: u32, interval: Duration) -> Duration {
    px_runtime::backoff::jittered(RETRY_MIN, RETRY_MAX, retry).min(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws per retry: enough that waits outside the jitter bounds would show.
    const DRAWS: usize = 500;
    /// A reconcile interval far above every retry wait, so it cuts none.
    const LONG_INTERVAL: Duration = Duration::from_secs(3600);

    #[test]
    fn retries_double_from_half_a_second_to_thirty_with_jitter() {
        let cases = [
            (0, Duration::from_millis(500)),
            (1, Duration::from_secs(1)),
            (5, Duration::from_secs(16)),
            (6, Duration::from_secs(30)),
            (u32::MAX, Duration::from_secs(30)),
        ];
        for (retry, nominal) in cases {
            for _ in 0..DRAWS {
                let wait = retry_wait(retry, LONG_INTERVAL);
                assert!(
                    wait >= nominal / 2 && wait < nominal * 3 / 2,
                    "retry {retry}: {wait:?} is outside ±50% of {nominal:?}"
                );
            }
        }
    }

    #[test]
    fn a_retry_never_waits_longer_than_the_reconcile_interval() {
        let interval = Duration::from_millis(300);
        for retry in [0, 1, 6, u32::MAX] {
            for _ in 0..DRAWS {
                assert!(retry_wait(retry, interval) <= interval, "retry {retry}");
            }
        }
    }
}
