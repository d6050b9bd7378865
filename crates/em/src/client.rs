//! Talking to apprepo and Beacon over HTTPS (trusting the remote's `ca_file` when it names
//! one; plain HTTP only to this machine or when told `--insecure`), with every failure turned
//! into a sentence that says what to do. Beacon calls follow the active Beacon
//! ([`crate::beacons`]); its Server-Sent Events streams are read by [`crate::feed`].

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use px_proto::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::failure::{EXIT_REFUSED, EXIT_UNREACHABLE, Failure, Result};
use crate::settings::EmConfig;

/// How long a plain API call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TCP connect may take before em gives up on that host (and tries the next
/// Beacon): a reachable host answers within a round trip; one that stays silent this long is
/// down or cut off.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::feed::Feed;

#[derive(Clone)]
pub struct Client {
    /// For apprepo: redirects followed as reqwest does.
    pub http: reqwest::Client,
    /// For Beacon: redirects are followed by [`crate::beacons`], which decides where the token
    /// may go.
    pub(crate) beacon_http: reqwest::Client,
    pub config: EmConfig,
    /// Every Beacon API base URL, without a trailing slash, in the configured order.
    pub(crate) beacons: Arc<[String]>,
    /// The Beacon that answered last: the next call starts there.
    pub(crate) active: Arc<AtomicUsize>,
    /// The Beacon a followed stream found silent, and when (see
    /// [`crate::beacons::SILENT_BEACON_PASSED_OVER_FOR`]).
    pub(crate) silent: Arc<std::sync::Mutex<Option<(usize, std::time::Instant)>>>,
    /// Plain HTTP to other machines allowed (`--insecure`), redirects included.
    pub(crate) insecure: bool,
}

impl Client {
    /// A client of the platform in `config`: its URLs checked (see [`check_url`]; `insecure`
    /// is the command line's `--insecure`, which the config's `insecure` key also sets), and
    /// its HTTPS trusting the config's `ca_file` alone when it names one, else the public roots.
    pub fn new(config: EmConfig, insecure: bool) -> Result<Self> {
        let insecure = insecure || config.insecure;
        check_url("remote", &config.remote, insecure)?;
        let beacons: Arc<[String]> = config
            .beacon_urls()?
            .into_iter()
            .map(|url| {
                check_url("beacon", url, insecure)?;
                Ok(url.trim_end_matches('/').to_owned())
            })
            .collect::<Result<_>>()?;
        let tls = match &config.ca_file {
            // The cluster's own CA alone: it signed apprepo's and Beacon's certificates, and a
            // public CA has no business vouching for them.
            Some(ca_file) => Some(
                px_runtime::tls::client_config(ca_file)
                    .map_err(|e| Failure::usage(format!("ca_file: {e}")))?,
            ),
            None => None,
        };
        let build = |redirects: reqwest::redirect::Policy| {
            let mut http = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .redirect(redirects);
            if let Some(tls) = &tls {
                http = http.use_preconfigured_tls((**tls).clone());
            }
            http.build()
                .map_err(|e| Failure::failed(format!("cannot set up https: {e}")))
        };
        Ok(Self {
            http: build(reqwest::redirect::Policy::default())?,
            beacon_http: build(reqwest::redirect::Policy::none())?,
            config,
            beacons,
            active: Arc::default(),
            silent: Arc::default(),
            insecure,
        })
    }

    pub fn repo(&self, path: &str) -> String {
        format!("{}{path}", self.config.remote.trim_end_matches('/'))
    }

    /// `path` on the Beacon that answered last; the calls below go to whichever Beacon
    /// answers (see [`crate::beacons`]).
    pub fn beacon(&self, path: &str) -> String {
        let active = self.active.load(std::sync::atomic::Ordering::Relaxed);
        let base = self.beacons.get(active).or(self.beacons.first());
        format!("{}{path}", base.map_or("", String::as_str))
    }

    pub async fn get<T: DeserializeOwned>(&self, url: &str) -> Result<T> {
        let response = self
            .send(url, |http, url| http.get(url).timeout(CALL_TIMEOUT))
            .await?;
        decode(url, Ok(response)).await
    }

    /// Opens a Server-Sent Events stream from Beacon.
    pub async fn open_stream(
        &self,
        url: &str,
    ) -> Result<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>>
    {
        self.open_stream_after(url, None).await
    }

    /// Opens a Server-Sent Events stream from Beacon, resuming after the event `last_id` when
    /// given (`Last-Event-ID`: Beacon first sends what came after it).
    pub async fn open_stream_after(
        &self,
        url: &str,
        last_id: Option<&str>,
    ) -> Result<impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>>
    {
        let response = self
            .send(url, |http, url| {
                let request = http.get(url);
                match last_id {
                    Some(id) => request.header("last-event-id", id),
                    None => request,
                }
            })
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(refusal(status, response.text().await.unwrap_or_default()));
        }
        Ok(response.bytes_stream())
    }

    /// GETs a text body (a build log).
    pub async fn get_text(&self, url: &str) -> Result<String> {
        let response = self
            .send(url, |http, url| http.get(url).timeout(CALL_TIMEOUT))
            .await?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| Failure::failed(format!("unexpected answer from {url}: {e}")))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(refusal(status, body))
        }
    }

    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: &B,
    ) -> Result<T> {
        let response = self
            .send(url, |http, url| {
                http.request(method.clone(), url)
                    .json(body)
                    .timeout(CALL_TIMEOUT)
            })
            .await?;
        decode(url, Ok(response)).await
    }
}

/// Refuses a URL that would send the token in the clear over a network: `http://` to a host
/// other than this machine (`localhost`, `127.0.0.0/8`, `::1`), unless `insecure`.
pub fn check_url(what: &str, url: &str, insecure: bool) -> Result<()> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Failure::usage(format!("the {what} URL {url:?} is not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if insecure || is_loopback(&parsed) => Ok(()),
        "http" => Err(Failure::usage(format!(
            "the {what} URL {url} is plain http to another machine: the token would cross the network in the clear; use https:// (with the cluster's CA: `em login --remote https://... --ca-file ca.pem`), or pass --insecure if this network is trusted"
        ))),
        other => Err(Failure::usage(format!(
            "the {what} URL {url} uses {other}://; em speaks https:// (or http:// to this machine)"
        ))),
    }
}

/// Whether `url`'s host is this machine.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Turns a transport error into a failure naming the service and the fix.
pub fn unreachable(url: &str, error: &reqwest::Error) -> Failure {
    // reqwest's own message hides the cause (a refused connection, an unknown certificate).
    let cause = px_runtime::errors::error_chain(error);
    let hint = if cause.contains("certificate") || cause.contains("UnknownIssuer") {
        "the remote's certificate is not trusted: name the cluster's CA with `ca_file` in em's config (`em login --ca-file ca.pem`)"
    } else {
        "is `em up` running, or is the remote in `em login` right?"
    };
    Failure::new(
        EXIT_UNREACHABLE,
        format!("cannot reach {url} ({cause}); {hint}"),
    )
}

/// Reads a response: the JSON body on success, else a failure with the server's message.
pub async fn decode<T: DeserializeOwned>(
    url: &str,
    response: reqwest::Result<reqwest::Response>,
) -> Result<T> {
    let response = response.map_err(|e| unreachable(url, &e))?;
    let status = response.status();
    if status.is_success() {
        return response
            .json()
            .await
            .map_err(|e| Failure::failed(format!("unexpected answer from {url}: {e}")));
    }
    Err(refusal(status, response.text().await.unwrap_or_default()))
}

/// A failure for a non-2xx answer.
pub fn refusal(status: reqwest::StatusCode, body: String) -> Failure {
    let message = serde_json::from_str::<ErrorBody>(&body)
        .map(|b| b.message)
        .unwrap_or(body);
    match status.as_u16() {
        401 => Failure::new(
            EXIT_REFUSED,
            format!(
                "the platform refused the token ({message}); run `em login` again, or `em up` for a local platform"
            ),
        ),
        403 => Failure::new(EXIT_REFUSED, format!("not allowed: {message}")),
        404 | 409 | 413 | 422 | 400 => Failure::new(EXIT_REFUSED, message),
        _ => Failure::failed(format!("the platform answered {status}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_allowed_to_this_machine_only_unless_insecure() {
        for url in [
            "https://apprepo.example.com",
            "http://127.0.0.1:7070",
            "http://127.8.0.1:7070",
            "http://[::1]:7070",
            "http://LocalHost:7070",
        ] {
            assert!(check_url("remote", url, false).is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.5:7070",
            "http://apprepo.example.com",
            "http://localhost.example.com",
            "http://[::2]:7070",
        ] {
            let refused = check_url("remote", url, false).unwrap_err();
            assert_eq!(refused.code, crate::failure::EXIT_USAGE, "{url}");
            assert!(
                refused.message.contains("--insecure"),
                "{}",
                refused.message
            );
            assert!(check_url("remote", url, true).is_ok(), "{url}");
        }
        assert!(check_url("remote", "ftp://x", true).is_err());
        assert!(check_url("remote", "not a url", true).is_err());
    }
}
