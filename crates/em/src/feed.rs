//! Beacon's Server-Sent Events streams, read message by message; a followed stream (a deploy's
//! events) that drops, or falls silent (its Beacon's host vanished), is opened again, on
//! whichever Beacon answers, from the last event seen.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::failure::Result;

/// How long a followed stream is tried again after it dropped: a failover to another Beacon
/// takes seconds (the platform's goal is under ten), and a minute covers a slow one without
/// leaving `em` hanging on a platform that is gone.
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// First wait between two attempts to reopen a followed stream; it doubles (with jitter) up to
/// [`RESUME_BACKOFF_MAX`].
const RESUME_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between two attempts, so a Beacon that took over is found within seconds.
const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A followed stream on which nothing (not even Beacon's keep-alive comment, sent every
/// `SSE_KEEP_ALIVE`, 2 s) arrives for this long is lost: its Beacon's host vanished without
/// closing the connection (power lost, network cut). It is reopened from the next Beacon on.
/// Three keep-alives, so that a few late ones on a loaded host do not end the stream.
pub const STREAM_SILENCE_DEADLINE: Duration = Duration::from_secs(6);
/// How long one attempt to reopen a followed stream may take until Beacon's answer: a
/// connection kept from an earlier call to a host that has since vanished would otherwise
/// wait for ever. A Beacon answers a stream's request at once.
pub const REOPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A Server-Sent Events stream from Beacon, read one message at a time as `T`.
pub struct Feed<T> {
    /// `None` once the stream ended and until it is reopened.
    stream: Option<BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buffer: String,
    ready: VecDeque<T>,
    /// When a followed stream counts as silent unless something arrives first: an instant
    /// rather than a timeout per read, so that a caller's `select!` that drops [`Feed::next`]
    /// now and then does not restart it.
    silent_at: tokio::time::Instant,
    /// For a followed stream: how to reopen it.
    resume: Option<Resume>,
}

/// What reopening a followed stream needs.
struct Resume {
    client: Client,
    url: String,
    /// The `id:` of the last message read, sent as `Last-Event-ID`.
    last_id: Option<String>,
    /// When the stream ended, and why, while it is being reopened.
    lost: Option<(Instant, FeedEnd)>,
    /// Failed attempts to reopen it since it ended.
    attempts: u32,
    /// When the next attempt may start: a deadline rather than a sleep, so that a caller's
    /// `select!` that drops [`Feed::next`] now and then does not restart the wait.
    retry_at: Option<tokio::time::Instant>,
}

/// Why a [`Feed`] ended.
#[derive(Debug)]
pub enum FeedEnd {
    /// The connection failed.
    Lost(reqwest::Error),
    /// Beacon closed the stream.
    Closed,
    /// Nothing came for [`STREAM_SILENCE_DEADLINE`].
    Silent,
    /// A followed stream ended (as said first) and could not be opened again within
    /// [`RESUME_WINDOW`] (for the reason said second).
    NotResumed(Box<FeedEnd>, String),
}

impl std::fmt::Display for FeedEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lost(e) => write!(f, "lost ({e})"),
            Self::Closed => f.write_str("closed by Beacon"),
            Self::Silent => write!(
                f,
                "silent for {}s (no keep-alive)",
                STREAM_SILENCE_DEADLINE.as_secs()
            ),
            Self::NotResumed(end, why) => write!(
                f,
                "{end}, and could not be opened again within {}s ({why})",
                RESUME_WINDOW.as_secs()
            ),
        }
    }
}

impl<T: DeserializeOwned> Feed<T> {
    /// Opens the stream at `url`; it ends when the connection does.
    pub async fn open(client: &Client, url: &str) -> Result<Self> {
        Ok(Self {
            stream: Some(client.open_stream(url).await?.boxed()),
            buffer: String::new(),
            ready: VecDeque::new(),
            silent_at: tokio::time::Instant::now() + STREAM_SILENCE_DEADLINE,
            resume: None,
        })
    }

    /// Opens the stream at `url` to follow it: when it drops (a Beacon stepping down closes
    /// its streams), it is opened again on whichever Beacon answers, after the last event
    /// read, for up to [`RESUME_WINDOW`].
    pub async fn follow(client: &Client, url: &str) -> Result<Self> {
        Self::follow_from(client, url, url).await
    }

    /// [`Feed::follow`], reopened at `reopen_url` rather than `url`: for a stream whose first
    /// request asks for a backlog (`em logs -f`'s last lines) that a reopened one must not
    /// repeat.
    pub async fn follow_from(client: &Client, url: &str, reopen_url: &str) -> Result<Self> {
        Ok(Self {
            resume: Some(Resume {
                client: client.clone(),
                url: reopen_url.to_owned(),
                last_id: None,
                lost: None,
                attempts: 0,
                retry_at: None,
            }),
            ..Self::open(client, url).await?
        })
    }

    /// The next message. Safe to cancel (in `select!`): a message is taken only when returned,
    /// and a stream being reopened is reopened by the next call.
    pub async fn next(&mut self) -> std::result::Result<T, FeedEnd> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Ok(message);
            }
            let Some(stream) = self.stream.as_mut() else {
                self.reopen().await?;
                continue;
            };
            // Only a followed stream has somewhere else to go once its Beacon falls silent.
            let next = match self.resume {
                Some(_) => tokio::time::timeout_at(self.silent_at, stream.next()).await,
                None => Ok(stream.next().await),
            };
            let Ok(next) = next else {
                self.stream = None;
                self.buffer.clear();
                if let Some(resume) = self.resume.as_mut() {
                    // The silent Beacon is tried last: a request to it would only wait.
                    resume.client.pass_over_active_beacon();
                    resume.lost = Some((Instant::now(), FeedEnd::Silent));
                }
                continue;
            };
            let end = match next {
                Some(Ok(chunk)) => {
                    self.silent_at = tokio::time::Instant::now() + STREAM_SILENCE_DEADLINE;
                    self.buffer.push_str(&String::from_utf8_lossy(&chunk));
                    let last_id = self.resume.as_mut().map(|r| &mut r.last_id);
                    self.ready
                        .extend(take_sse_after::<T>(&mut self.buffer, last_id));
                    continue;
                }
                Some(Err(e)) => FeedEnd::Lost(e),
                None => FeedEnd::Closed,
            };
            self.stream = None;
            // A message cut off by the drop comes again after the last whole one.
            self.buffer.clear();
            match self.resume.as_mut() {
                Some(resume) => resume.lost = Some((Instant::now(), end)),
                None => return Err(end),
            }
        }
    }

    /// One attempt to reopen a followed stream that ended, once the backoff after the last
    /// failed one has passed; the end, once [`RESUME_WINDOW`] has passed.
    async fn reopen(&mut self) -> std::result::Result<(), FeedEnd> {
        let Some(resume) = self.resume.as_mut() else {
            return Err(FeedEnd::Closed);
        };
        if let Some(at) = resume.retry_at {
            tokio::time::sleep_until(at).await;
        }
        let attempt = tokio::time::timeout(
            REOPEN_TIMEOUT,
            resume
                .client
                .open_stream_after(&resume.url, resume.last_id.as_deref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(crate::failure::Failure::failed(format!(
                "no answer within {}s",
                REOPEN_TIMEOUT.as_secs()
            )))
        });
        match attempt {
            Ok(stream) => {
                self.stream = Some(stream.boxed());
                self.silent_at = tokio::time::Instant::now() + STREAM_SILENCE_DEADLINE;
                resume.lost = None;
                resume.attempts = 0;
                resume.retry_at = None;
                Ok(())
            }
            Err(failure) => {
                let wait = px_runtime::backoff::jittered(
                    RESUME_BACKOFF_MIN,
                    RESUME_BACKOFF_MAX,
                    resume.attempts,
                );
                resume.attempts = resume.attempts.saturating_add(1);
                resume.retry_at = Some(tokio::time::Instant::now() + wait);
                let lost_at = resume
                    .lost
                    .as_ref()
                    .map_or_else(Instant::now, |(at, _)| *at);
                if lost_at.elapsed() < RESUME_WINDOW {
                    return Ok(());
                }
                let end = resume.lost.take().map_or(FeedEnd::Closed, |(_, end)| end);
                self.resume = None;
                Err(FeedEnd::NotResumed(Box::new(end), failure.message))
            }
        }
    }
}

/// Takes every complete Server-Sent Events message out of `buffer` and parses its `data:` line
/// as `T` (messages without one, or that do not parse, are skipped); a partial message stays.
/// Keeps in `last_id`, when given, the `id:` of the last message taken that had one.
fn take_sse_after<T: DeserializeOwned>(
    buffer: &mut String,
    mut last_id: Option<&mut Option<String>>,
) -> Vec<T> {
    let mut parsed = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let message: String = buffer.drain(..end + 2).collect();
        if let Some(id) = message.lines().find_map(|l| l.strip_prefix("id:"))
            && let Some(last_id) = last_id.as_deref_mut()
        {
            *last_id = Some(id.trim().to_owned());
        }
        if let Some(data) = message.lines().find_map(|l| l.strip_prefix("data:"))
            && let Ok(value) = serde_json::from_str(data.trim())
        {
            parsed.push(value);
        }
    }
    parsed
}

#[cfg(test)]
#[path = "feed_tests.rs"]
mod tests;
