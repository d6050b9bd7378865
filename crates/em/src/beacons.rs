//! Beacon calls that follow the active Beacon: a cluster may run several, one active and the
//! others standing by. A call starts at the Beacon that answered last, moves on to the next
//! URL when one cannot be reached (or answers 503: no active Beacon known to it yet), and
//! follows a standby's `307` to the active one, sending the token only to configured hosts.

use std::sync::atomic::Ordering;

use reqwest::StatusCode;

use crate::client::{Client, check_url, unreachable};
use crate::failure::{Failure, Result};

/// Most redirects one Beacon call follows: a standby sends em to the active Beacon (one hop),
/// and a takeover between the two requests may add one more; past that the Beacons disagree
/// on which is active, and waiting for them is better than going round.
pub const MAX_BEACON_REDIRECTS: usize = 3;
/// How long after a followed stream found a Beacon silent (its host vanished) a standby's
/// redirect to it is not followed: the standby still names it active until its lease lapses
/// (seconds), and a call sent there would only wait for a timeout. Meanwhile the call counts
/// as answered by a standby that knows no active Beacon, and em tries again shortly.
pub const SILENT_BEACON_PASSED_OVER_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl Client {
    /// Sends the request `request` makes (from the HTTP client to use and a URL) to `url`,
    /// with the token. A Beacon URL (one starting with a configured Beacon's base) is sent to
    /// each Beacon in turn until one answers, following redirects (see [`Client::follow`]),
    /// but for one a followed stream found silent lately ([`SILENT_BEACON_PASSED_OVER_FOR`]);
    /// any other URL is sent as it is.
    pub(crate) async fn send(
        &self,
        url: &str,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let Some(path) = self.beacon_path(url) else {
            return request(&self.http, url)
                .bearer_auth(&self.config.token)
                .send()
                .await
                .map_err(|e| unreachable(url, &e));
        };
        let count = self.beacons.len();
        let first = self.active.load(Ordering::Relaxed);
        let mut unavailable = None;
        let mut unreached = None;
        for offset in 0..count {
            let index = (first + offset) % count;
            let url = format!("{}{path}", self.beacons[index]);
            // Its host may be gone: a call there would only wait for a timeout.
            if self.fell_silent(&url) {
                continue;
            }
            match self.follow(url.clone(), &request).await? {
                // A standby that knows no active Beacon yet: another may be the active one.
                Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    unavailable = Some(Ok(response));
                }
                // A standby that still names the Beacon that fell silent: not followed.
                Ok(response) if response.status().is_redirection() => {
                    unavailable = Some(Err(Failure::failed(format!(
                        "the standby Beacon at {url} still names as active the Beacon that fell silent ({}); no other Beacon has taken over yet: try again in a few seconds",
                        response
                            .headers()
                            .get(reqwest::header::LOCATION)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                    ))));
                }
                Ok(response) => {
                    // The Beacon that answered: the one a redirect led to, when it is one of
                    // the configured URLs, so the next call skips the standby.
                    let answered = self.beacon_index(response.url().as_str());
                    self.active
                        .store(answered.unwrap_or(index), Ordering::Relaxed);
                    return Ok(response);
                }
                // Refused, timed out or failed TLS: that host is down or not a Beacon now.
                Err(error) if error.is_connect() => unreached = Some(unreachable(&url, &error)),
                Err(error) => return Err(unreachable(&url, &error)),
            }
        }
        match (unavailable, unreached) {
            (Some(answer), _) => answer,
            (None, Some(failure)) => Err(failure),
            (None, None) => Err(Failure::usage("em's config names no Beacon")),
        }
    }

    /// Makes the next call start at the Beacon after the one that answered last: that one fell
    /// silent (a followed stream got nothing, not even a keep-alive), so its host may be gone,
    /// and a call to it would only wait for a timeout while another has taken over.
    /// A standby's redirect to the silent one is not followed for a while either
    /// ([`SILENT_BEACON_PASSED_OVER_FOR`]).
    pub(crate) fn pass_over_active_beacon(&self) {
        let count = self.beacons.len().max(1);
        if let Ok(silent) =
            self.active
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |index| {
                    Some((index + 1) % count)
                })
            && count > 1
        {
            *self.silent.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((silent, std::time::Instant::now()));
        }
    }

    /// Whether `url` is on the Beacon a followed stream recently found silent.
    fn fell_silent(&self, url: &str) -> bool {
        let silent = *self.silent.lock().unwrap_or_else(|p| p.into_inner());
        silent.is_some_and(|(index, since)| {
            since.elapsed() < SILENT_BEACON_PASSED_OVER_FOR && self.beacon_index(url) == Some(index)
        })
    }

    /// Sends to `url` and follows `307`/`308` redirects, at most [`MAX_BEACON_REDIRECTS`]. The
    /// token goes along only to the hosts of the configured Beacon URLs: a redirect is the
    /// server's say, and the operator's list is where the token was meant to go, so a redirect
    /// elsewhere (a misconfigured or hostile host) is refused rather than handed the token.
    /// (reqwest's own policy cannot do this: it drops the token on every cross-host redirect,
    /// and a standby always redirects to another host.) A redirect to a Beacon that fell
    /// silent ([`SILENT_BEACON_PASSED_OVER_FOR`]) is not followed: the redirect itself is the
    /// answer. The outer error ends the call; the
    /// inner one is a transport error the caller may answer by trying the next Beacon.
    async fn follow(
        &self,
        mut url: String,
        request: &impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<std::result::Result<reqwest::Response, reqwest::Error>> {
        for _ in 0..=MAX_BEACON_REDIRECTS {
            let response = match request(&self.beacon_http, &url)
                .bearer_auth(&self.config.token)
                .send()
                .await
            {
                Ok(response) => response,
                Err(error) => return Ok(Err(error)),
            };
            if !matches!(
                response.status(),
                StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
            ) {
                return Ok(Ok(response));
            }
            let target = self.redirect_target(&url, &response)?;
            if self.fell_silent(&target) {
                return Ok(Ok(response));
            }
            url = target;
        }
        Err(Failure::failed(format!(
            "the Beacons redirected em more than {MAX_BEACON_REDIRECTS} times, last to {url}; they do not agree on which one is active yet: try again in a few seconds"
        )))
    }

    /// Where a redirect from `from` leads, if em may send its token there.
    fn redirect_target(&self, from: &str, response: &reqwest::Response) -> Result<String> {
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Failure::failed(format!("{from} answered {status} without a Location"))
            })?;
        let target = reqwest::Url::parse(from)
            .and_then(|base| base.join(location))
            .map_err(|e| {
                Failure::failed(format!(
                    "{from} redirected to {location:?}, which is not a URL: {e}"
                ))
            })?;
        if !self.is_beacon_host(&target) {
            return Err(Failure::failed(format!(
                "{from} redirected em to {target}, which is not one of em's Beacon URLs, and em sends its token only to those; if it is a Beacon of this cluster, run `em login` again with a --beacon for each Beacon"
            )));
        }
        // A redirect to plain HTTP on another machine would send the token in the clear.
        check_url("redirected Beacon", target.as_str(), self.insecure)?;
        Ok(target.into())
    }

    /// Whether `url`'s host is the host of a configured Beacon URL.
    fn is_beacon_host(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        self.beacons.iter().any(|base| {
            reqwest::Url::parse(base)
                .ok()
                .and_then(|b| b.host_str().map(|h| h.eq_ignore_ascii_case(host)))
                .unwrap_or(false)
        })
    }

    /// The path and query of `url` after the configured Beacon base it starts with, if any.
    fn beacon_path<'u>(&self, url: &'u str) -> Option<&'u str> {
        self.beacon_index(url)
            .and_then(|index| url.strip_prefix(self.beacons[index].as_str()))
    }

    /// Which configured Beacon base `url` starts with, if any.
    fn beacon_index(&self, url: &str) -> Option<usize> {
        self.beacons.iter().position(|base| {
            url.strip_prefix(base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        })
    }
}

#[cfg(test)]
#[path = "beacons_tests.rs"]
pub(crate) mod tests;
