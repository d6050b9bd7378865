//! The small HTML pages the proxy answers with when it cannot hand a request to an app.

use bytes::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::body::ProxyBody;

/// What went wrong, as the page and the status code tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No app is served under this host name.
    UnknownHost,
    /// The app is known but none of its instances is up.
    NoInstance,
    /// The instance refused the connection or broke it before answering.
    Unreachable,
    /// The instance did not answer within the request timeout.
    Timeout,
    /// The instance answered something the proxy cannot pass on.
    BadAnswer,
    /// The request itself is malformed in a way the parser let through.
    BadRequest,
    /// The client stopped sending the request body.
    BodyAborted,
    /// The request body is larger than the app's `http.max_request_body`.
    BodyTooLarge,
    /// A buffered request body did not arrive within the body read timeout.
    BodyTimeout,
    /// A static path got a method other than GET or HEAD.
    MethodNotAllowed,
    /// A static path that names no file (or one outside the static directory).
    NotFound,
}

impl Failure {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::UnknownHost | Self::NotFound => StatusCode::NOT_FOUND,
            Self::NoInstance => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreachable | Self::BadAnswer => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest | Self::BodyAborted => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn explain(self, host: &str, app: &str) -> String {
        let host = escape(host);
        let app = escape(app);
        match self {
            Self::UnknownHost => format!("No app is served at <b>{host}</b> here."),
            Self::NoInstance => format!(
                "The app <b>{app}</b> has no instance running right now; it may be starting. Try again in a moment."
            ),
            Self::Unreachable => {
                format!(
                    "The app <b>{app}</b> could not be reached or closed the connection before answering."
                )
            }
            Self::Timeout => format!("The app <b>{app}</b> did not answer in time."),
            Self::BadAnswer => {
                format!("The app <b>{app}</b> gave an answer the proxy cannot pass on.")
            }
            Self::BadRequest => "The request is malformed.".to_string(),
            Self::BodyAborted => "The request body ended before it was complete.".to_string(),
            Self::BodyTooLarge => format!(
                "The request body is larger than <b>{app}</b> accepts (its <code>http.max_request_body</code>)."
            ),
            Self::BodyTimeout => "The request body did not arrive in time.".to_string(),
            Self::MethodNotAllowed => "Static files answer only GET and HEAD requests.".to_string(),
            Self::NotFound => format!("There is no such file in <b>{app}</b>."),
        }
    }
}

/// The page for `failure` on `host` (routed to `app`, empty when unknown), naming the request
/// id so a user can quote it.
pub(crate) fn page(
    failure: Failure,
    host: &str,
    app: &str,
    request_id: &str,
) -> Response<ProxyBody> {
    let status = failure.status();
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><h1>{title}</h1>\n<p>{}</p>\n<p><small>request id {}</small></p></body></html>\n",
        failure.explain(host, app),
        escape(request_id),
    );
    let mut response = Response::new(ProxyBody::full(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match failure {
        // A new instance is usually up within a second of the previous one going away.
        Failure::NoInstance => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        Failure::MethodNotAllowed => {
            headers.insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        _ => {}
    }
    response
}

/// Escapes text for HTML: host names and request ids come from the client.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_escaped() {
        assert_eq!(escape("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        let explained = Failure::UnknownHost.explain("<script>", "");
        assert!(!explained.contains("<script>"));
    }
}
