//! The reconciler: reads the desired state (every app's current release, formation and added
//! domains) and the pending builds from the repository on start-up, on every notice and on an
//! interval, and hands them to the hub; then reads the result of each build that left the
//! pending list, for its event. When the repository is away, the hub keeps the last known
//! state and the reconciler retries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use px_proto::api::{App, Release};
use px_proto::build::Build;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::{AddedDomains, Formations, Hub};
use crate::metrics::Metrics;
use crate::placement::BuildKey;

/// What one read of the repository's apps gives: each app's current release, its formation,
/// its added domains and its creation time.
type Desired = (
    BTreeMap<String, Release>,
    Formations,
    AddedDomains,
    BTreeMap<String, String>,
);

/// How long one read of the repository may take.
pub const REPOSITORY_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry bounds while the repository is unreachable (doubling, with jitter).
pub const RETRY_MIN: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Most build results read after one reconcile. Builds leave the pending list a few at a time
/// (each app has at most one); more at once means Beacon was away while they ended, and nobody
/// still waits for their events, so the rest are skipped rather than delay the next read.
pub const MAX_RESULTS_PER_RECONCILE: usize = 64;
/// Longest error body quoted from the repository.
const QUOTED_BODY_CHARS: usize = 300;

#[derive(Clone)]
pub struct RepositoryClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl RepositoryClient {
    /// A client of apprepo at `base`, trusting `tls` (the cluster CA) when given, else the
    /// system's roots.
    pub fn new(
        base: &str,
        token: String,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, String> {
        let mut http = reqwest::Client::builder().timeout(REPOSITORY_TIMEOUT);
        if let Some(tls) = tls {
            http = http.use_preconfigured_tls((*tls).clone());
        }
        let http = http.build().map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// GETs `path` as JSON; `None` when the repository answers 404.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, String> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!(
                "GET {url}: {status}: {}",
                body.chars().take(QUOTED_BODY_CHARS).collect::<String>()
            ));
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| format!("GET {url}: {e}"))
    }

    /// PUTs `body` as JSON to `path`; the repository's status when it is a success.
    pub(crate) async fn put<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<reqwest::StatusCode, String> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .put(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("PUT {url}: {e}"))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(status);
        }
        let body = response.text().await.unwrap_or_default();
        Err(format!(
            "PUT {url}: {status}: {}",
            body.chars().take(QUOTED_BODY_CHARS).collect::<String>()
        ))
    }

    /// PUTs `body` as JSON to `path` within `timeout`, for an answer that carries a body
    /// both on success and on 409 (a lease claim): the status and the body's bytes.
    pub(crate) async fn put_answered<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), String> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .put(&url)
            .bearer_auth(&self.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("PUT {url}: {e}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("PUT {url}: {e}"))?;
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok((status, bytes));
        }
        Err(format!(
            "PUT {url}: {status}: {}",
            String::from_utf8_lossy(&bytes)
                .chars()
                .take(QUOTED_BODY_CHARS)
                .collect::<String>()
        ))
    }

    /// DELETEs `path` within `timeout`: the repository's status when it is a success or 409.
    pub(crate) async fn delete(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<reqwest::StatusCode, String> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .delete(&url)
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("DELETE {url}: {e}"))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(status);
        }
        let body = response.text().await.unwrap_or_default();
        Err(format!(
            "DELETE {url}: {status}: {}",
            body.chars().take(QUOTED_BODY_CHARS).collect::<String>()
        ))
    }

    /// Every app's current release, the counts its formation sets (`em scale`), the names
    /// added to it (`em domains add`), and when each app was created.
    pub async fn desired(&self) -> Result<Desired, String> {
        let apps: Vec<App> = self
            .get("/v1/apps")
            .await?
            .ok_or_else(|| format!("GET {}/v1/apps: 404 Not Found", self.base))?;
        let mut releases = BTreeMap::new();
        let mut formations = Formations::new();
        let mut added_domains = AddedDomains::new();
        let mut created = BTreeMap::new();
        for app in apps {
            let Some(current) = app.current else { continue };
            // Assigning hidden values would start every instance with `(hidden)` in place
            // of its secrets: keep the last known state and say how to fix the token.
            if current.config_hidden {
                return Err(format!(
                    "GET {}/v1/apps: apprepo hides config values from Beacon's token; give that token the `beacon` role in apprepo's tokens",
                    self.base
                ));
            }
            created.insert(app.name.clone(), app.created_at);
            if !app.formation.is_empty() {
                formations.insert(app.name.clone(), app.formation);
            }
            if !app.domains.is_empty() {
                added_domains.insert(app.name.clone(), app.domains);
            }
            releases.insert(app.name, current);
        }
        Ok((releases, formations, added_domains, created))
    }

    /// Every build waiting to be built, across apps. A repository from before builds answers
    /// 404: it has none.
    pub async fn pending_builds(&self) -> Result<Vec<Build>, String> {
        Ok(self
            .get("/v1/builds?pending=true")
            .await?
            .unwrap_or_default())
    }

    /// Every release whose phase has not ended, across apps. A repository from before release
    /// phases answers 404: it has none.
    pub async fn unended_phases(&self) -> Result<Vec<Release>, String> {
        Ok(self.get("/v1/phases").await?.unwrap_or_default())
    }

    /// One build with its result; `None` when the repository does not know it.
    pub async fn build(&self, app: &str, number: u64) -> Result<Option<Build>, String> {
        self.get(&format!("/v1/apps/{app}/builds/{number}")).await
    }

    /// The builds of `keys` that have a result, read one after the other; a build that cannot
    /// be read is logged and skipped (its node's own event may still tell).
    async fn results(&self, keys: Vec<BuildKey>) -> Vec<Build> {
        if keys.len() > MAX_RESULTS_PER_RECONCILE {
            tracing::warn!(
                ended = keys.len(),
                read = MAX_RESULTS_PER_RECONCILE,
                "more builds ended than Beacon reads the results of at once; the others get no event"
            );
        }
        let mut results = Vec::new();
        for (app, number) in keys.into_iter().take(MAX_RESULTS_PER_RECONCILE) {
            match self.build(&app, number).await {
                Ok(Some(build)) if build.result.is_some() => results.push(build),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%app, build = number, %error, "cannot read how a build ended")
                }
            }
        }
        results
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
            Ok((desired, formations, added_domains, created)) => {
                failures = 0;
                // Without the builds, the apps are still worth taking; the hub keeps the
                // builds it knows until a later read succeeds.
                let builds = client
                    .pending_builds()
                    .await
                    .inspect_err(|error| tracing::warn!(%error, "cannot read the pending builds; keeping the last known ones"))
                    .ok();
                let phases = client
                    .unended_phases()
                    .await
                    .inspect_err(|error| tracing::warn!(%error, "cannot read the unended release phases; keeping the last known ones"))
                    .ok();
                hub.set_app_created(created);
                let ended = hub
                    .set_state(desired, formations, added_domains, builds)
                    .await;
                hub.set_phases(phases).await;
                if !ended.is_empty() {
                    hub.build_results(client.results(ended).await).await;
                }
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
