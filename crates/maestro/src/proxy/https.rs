//! Plain HTTP to HTTPS: which requests the plain listener answers with a redirect, and the
//! redirect itself. HSTS, the other half, is the app's header on HTTPS answers (`handle.rs`).

use hyper::header::{HeaderValue, LOCATION};
use hyper::http::uri::PathAndQuery;
use hyper::{Response, StatusCode, Uri};

use super::Proxy;
use super::body::ProxyBody;
use crate::routes::AppRoute;

/// Where ACME's HTTP-01 challenges are fetched (RFC 8555 §8.3): over plain HTTP, from any
/// web server, so a request for it is never redirected to HTTPS.
pub(crate) const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Whether a plain-HTTP request for `path` on `host` goes to HTTPS instead: when its app has
/// not turned the redirect off, and the HTTPS listener has a certificate for the host (or the
/// operator redirects every host); never for an ACME challenge.
pub(crate) fn redirects(proxy: &Proxy, route: &AppRoute, host: &str, path: &str) -> bool {
    route.https.redirect
        && !path.starts_with(ACME_CHALLENGE_PREFIX)
        && (proxy.settings.https_redirect || proxy.has_certificate(host_name(host)))
}

/// `host` without its port, if it has one.
fn host_name(host: &str) -> &str {
    host.rsplit_once(':')
        .filter(|(name, port)| !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// `https://host/path?query`, without the port of the plain listener, with `port` when the
/// HTTPS listener is reached on another port than 443.
pub(crate) fn redirect(host: &str, port: Option<u16>, uri: &Uri) -> Response<ProxyBody> {
    let host = host_name(host);
    let host = match port {
        Some(port) if port != 443 => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    let target = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let mut response = Response::new(ProxyBody::empty());
    // 308 rather than 301: the method and body are kept.
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::try_from(format!("https://{host}{target}")) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redirect_drops_the_plain_port_and_keeps_path_and_query() {
        assert_eq!(host_name("app.test:8080"), "app.test");
        assert_eq!(host_name("app.test"), "app.test");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        let uri: Uri = "/a/b?c=d%2F".parse().unwrap();
        let response = redirect("app.test:8080", None, &uri);
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(response.headers()[LOCATION], "https://app.test/a/b?c=d%2F");
        // An HTTPS listener on another port (`em up`'s) is named; 443 never is.
        let response = redirect("app.test:8080", Some(8443), &uri);
        assert_eq!(
            response.headers()[LOCATION],
            "https://app.test:8443/a/b?c=d%2F"
        );
        let response = redirect("[::1]:8080", Some(443), &uri);
        assert_eq!(response.headers()[LOCATION], "https://[::1]/a/b?c=d%2F");
    }
}
