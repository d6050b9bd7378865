//! Calls to apprepo after work a node did for it (a build's layers, finish and failure; a
//! release phase's claim and end): the repository token, retries with backoff for what is worth
//! another try, the message of an error answer, and the tail of the work's output that apprepo
//! keeps. Shared by `builds/` and `supervisor/release_phase.rs`. Also the one way Maestro
//! makes its HTTP client of apprepo (downloads included), so every call checks apprepo's
//! certificate the same way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use px_proto::api::ErrorBody;
use px_proto::build::MAX_BUILD_LOG_BYTES;

/// Tries at each call to apprepo after a build or a release phase: enough to ride out a
/// repository restart, bounded so an unreachable repository does not hold the work's slot.
pub(crate) const DELIVERY_ATTEMPTS: u32 = 5;
/// Backoff between those tries: about 1, 2, 4 and 8 s, so they span a restart's seconds.
const DELIVERY_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two tries, should `DELIVERY_ATTEMPTS` grow: half a minute, the
/// same order as a service's restart.
const DELIVERY_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Idle connections kept to apprepo (and, on the supervisor's client, to each app instance):
/// downloads and deliveries come in short bursts, and two cover one in flight and the next.
const MAX_IDLE_PER_HOST: usize = 2;

/// Maestro's HTTP client for apprepo: HTTPS checked against `tls` (the cluster CA) when given,
/// else against the system's roots.
pub(crate) fn repository_client(tls: Option<Arc<rustls::ClientConfig>>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(MAX_IDLE_PER_HOST);
    if let Some(tls) = tls {
        builder = builder.use_preconfigured_tls((*tls).clone());
    }
    builder.build().unwrap_or_else(|e| {
        // Building fails only when the TLS backend cannot start; a default client then
        // fails each call with the reason, which the release's events show.
        tracing::error!(error = %e, "the http client of apprepo could not be set up");
        reqwest::Client::default()
    })
}

/// One try at a call to the repository that did not give an answer.
pub(crate) enum Attempt {
    Retry(String),
    Stop(String),
}

/// Sends `request` with the repository token; the answer's status and body. Server errors and
/// transport failures are worth another try, anything else is the answer.
pub(crate) async fn authorized(
    token: Option<&str>,
    mut request: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, bytes::Bytes), Attempt> {
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Attempt::Retry(px_runtime::errors::error_chain(&e)))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| Attempt::Retry(px_runtime::errors::error_chain(&e)))?;
    if status.is_server_error() {
        return Err(Attempt::Retry(format!("{status}: {}", message_of(&body))));
    }
    Ok((status, body))
}

/// Runs `attempt` up to [`DELIVERY_ATTEMPTS`] times with backoff while it asks to retry.
pub(crate) async fn with_retries<T, F, Fut>(doing: &str, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Stop(reason)) => return Err(reason),
            Err(Attempt::Retry(reason)) => {
                tries += 1;
                if tries >= DELIVERY_ATTEMPTS {
                    return Err(format!(
                        "{doing} failed {tries} times, the last with: {reason}"
                    ));
                }
                tracing::warn!(%reason, tries, "{doing} failed; trying again");
                tokio::time::sleep(px_runtime::backoff::jittered(
                    DELIVERY_BACKOFF,
                    DELIVERY_BACKOFF_CAP,
                    tries - 1,
                ))
                .await;
            }
        }
    }
}

/// The message of an apprepo error answer, or its body as text.
pub(crate) fn message_of(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// The newest lines of a build's or a release phase's output, at most [`MAX_BUILD_LOG_BYTES`]
/// joined: what apprepo keeps with it.
#[derive(Default)]
pub(crate) struct LogTail {
    lines: VecDeque<String>,
    /// Bytes of `lines` joined with newlines.
    bytes: usize,
}

impl LogTail {
    pub(crate) fn push(&mut self, line: &str) {
        let mut line = line.to_string();
        if line.len() > MAX_BUILD_LOG_BYTES {
            let mut cut = MAX_BUILD_LOG_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.bytes += line.len() + usize::from(!self.lines.is_empty());
        self.lines.push_back(line);
        while self.bytes > MAX_BUILD_LOG_BYTES {
            let Some(oldest) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= oldest.len() + usize::from(!self.lines.is_empty());
        }
    }

    pub(crate) fn text(&self) -> String {
        let mut text = String::with_capacity(self.bytes);
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(line);
        }
        text
    }

    /// The last `n` lines joined.
    pub(crate) fn last(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        let lines: Vec<&str> = self.lines.iter().skip(skip).map(String::as_str).collect();
        lines.join("\n")
    }
}
