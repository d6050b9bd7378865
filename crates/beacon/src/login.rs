//! Who may see the status page: a reading token in an `Authorization: Bearer` header, or in a
//! cookie that a small sign-in form sets, so that a browser can show `/` as well.
//!
//! The cookie is `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page
//! sends it), and `Secure` when Beacon serves HTTPS or the request came through a TLS proxy.
//! Only the page reads it:
//! the API still wants the header, so a cookie can never make a browser change anything.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use crate::auth::Reader;
use crate::http::{ApiError, AppState};
use crate::status::{STYLE, escape};

/// The cookie that holds a reading token once the form accepted it.
pub(crate) const COOKIE: &str = "px_read_token";
/// Largest sign-in form body: a token is 68 characters; the field name and a margin fit well
/// under this, and nothing else is worth buffering.
pub(crate) const MAX_LOGIN_BODY_BYTES: usize = 1024;
/// How long a browser keeps the cookie: a working day, so a forgotten session does not last.
const COOKIE_MAX_AGE_SECS: u64 = 12 * 3600;

/// `GET /`: the status page for a reader, the sign-in form (401) for anyone else.
pub(crate) async fn status_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let token = bearer(&headers).or_else(|| cookie(&headers));
    match token.map(|token| Reader::verify(&state, token)) {
        Some(Ok(reader)) => match reader.require_every_app("the status page") {
            Ok(()) => Html(crate::status::render(&state.hub)).into_response(),
            Err(e) => form(StatusCode::FORBIDDEN, Some(&e.to_string())),
        },
        Some(Err(e)) => form(StatusCode::UNAUTHORIZED, Some(&e.to_string())),
        None => form(StatusCode::UNAUTHORIZED, None),
    }
}

/// `POST /login`: a form with `token=...`. A reading token sets the cookie and goes back to
/// the page; anything else shows the form again with why.
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = form_token(&body) else {
        return form(
            StatusCode::BAD_REQUEST,
            Some("paste a token such as pxt_0123…"),
        );
    };
    if let Err(e) = Reader::verify(&state, token) {
        let status = match e {
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        return form(status, Some(&e.to_string()));
    }
    let secure = state.https
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_SECS}{}",
        if secure { "; Secure" } else { "" }
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    // A token is ASCII letters, digits and `_` (checked by `form_token`), a valid header value.
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `token` field of a form body. Tokens are letters, digits and `_`, which a browser sends
/// unescaped; a value with anything else is not a token, so no percent-decoding is needed.
fn form_token(body: &[u8]) -> Option<&str> {
    let body = std::str::from_utf8(body).ok()?;
    let token = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?
        .trim_matches('+');
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then_some(token)
}

fn form(status: StatusCode, problem: Option<&str>) -> Response {
    let problem = problem
        .map(|p| format!("<p class=bad role=alert>{}</p>", escape(p)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Platform.X status: sign in</title>\
         <meta name=viewport content='width=device-width'><style>{STYLE}</style></head><body><main>\
         <h1>Platform.X</h1><p>The status page needs a token that may read Beacon's API \
         (role <code>read</code> or <code>deploy</code>).</p>{problem}\
         <form method=post action=/login><label>Token <input name=token type=password \
         autocomplete=current-password size=70 required></label> <button>Sign in</button></form>\
         </main></body></html>"
    );
    (status, Html(html)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_token_is_taken_only_when_it_looks_like_a_token() {
        assert_eq!(form_token(b"token=pxt_ab12"), Some("pxt_ab12"));
        assert_eq!(form_token(b"x=1&token=pxt_ab12"), Some("pxt_ab12"));
        assert_eq!(form_token(b"token=pxt%3Cscript"), None);
        assert_eq!(form_token(b"token="), None);
        assert_eq!(form_token(b"other=pxt_ab12"), None);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; px_read_token=pxt_1; c=d"),
        );
        assert_eq!(cookie(&headers), Some("pxt_1"));
        headers.insert(header::COOKIE, HeaderValue::from_static("px_read_tokenx=1"));
        assert_eq!(cookie(&headers), None);
    }
}
