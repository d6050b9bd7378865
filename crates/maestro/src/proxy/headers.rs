//! Header rewriting between client and app: hop-by-hop headers (RFC 9110 §7.6.1), the
//! `X-Forwarded-*` family, and request ids.

use hyper::HeaderMap;
use hyper::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

/// Longest `X-Request-Id` taken from a trusted client; a longer one is replaced by a fresh id,
/// so ids stay loggable. 128 bytes fits every common format (UUIDs, trace ids with spans).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a `Connection` header lists `token` (case-insensitive, comma-separated).
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The protocol a request asks to upgrade to, if it does so properly (`Connection: upgrade`
/// and `Upgrade`). `h2c` is refused: the proxy speaks HTTP/1.1 to apps, and an h2c tunnel
/// would let a client talk past the proxy's request handling.
pub(crate) fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(UPGRADE)?;
    if !connection_has(headers, "upgrade") {
        return None;
    }
    let h2c = upgrade
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    (!h2c).then(|| upgrade.clone())
}

/// Removes hop-by-hop headers: the fixed list and whatever `Connection` names. When `upgrade`
/// is given, the message is an upgrade and `Connection: upgrade` + `Upgrade` are put back.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    if headers.contains_key(CONNECTION) {
        // Only names other than the usual tokens need a lookup; most clients send just
        // `keep-alive` or `close`, so this allocates nothing for them.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(CONNECTION) {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.is_empty()
                    || token.eq_ignore_ascii_case(b"keep-alive")
                    || token.eq_ignore_ascii_case(b"close")
                    || token.eq_ignore_ascii_case(b"upgrade")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ] {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
}

/// Sets the `X-Forwarded-*` headers for a request from `peer` (its IP address, as the
/// connection formatted it once) over `proto` to `host`. When the
/// client is trusted (Maestro sits behind a load balancer of the operator's), its
/// `X-Forwarded-For` chain is extended and its `-Proto`/`-Host` kept; otherwise all of them,
/// and `Forwarded`, are replaced, so an app never believes a client's claims about itself.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
    trusted: bool,
) {
    if trusted && headers.contains_key(&X_FORWARDED_FOR) {
        let mut chain = Vec::new();
        for value in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(value) = value.to_str() {
                chain.extend_from_slice(value.as_bytes());
                chain.extend_from_slice(b", ");
            }
        }
        chain.extend_from_slice(peer.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&chain) {
            headers.insert(&X_FORWARDED_FOR, value);
        }
    } else {
        headers.insert(&X_FORWARDED_FOR, peer.clone());
    }
    if !trusted {
        headers.remove(&FORWARDED);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => {
                headers.insert(&X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// The request id: the client's own when it is trusted and sensible, else 16 random hex digits.
pub(crate) fn request_id(headers: &HeaderMap, trusted: bool) -> HeaderValue {
    if trusted
        && let Some(id) = headers.get(&X_REQUEST_ID)
        && !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_BYTES
        && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return id.clone();
    }
    let mut hex = [0u8; 16];
    let mut n: u64 = rand::random();
    for slot in hex.iter_mut().rev() {
        *slot = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0000000000000000"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrades_are_kept_but_not_h2c() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        let up = upgrade_request(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        strip_hop_by_hop(&mut h, up);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(upgrade_request(&h).is_none());
    }

    #[test]
    fn forwarded_headers_trust_or_replace() {
        let host = HeaderValue::from_static("hello.localhost");
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let mut untrusted = h.clone();
        let peer = HeaderValue::from_static("10.0.0.1");
        set_forwarded(&mut untrusted, &peer, "http", Some(&host), false);
        assert_eq!(untrusted[&X_FORWARDED_FOR], "10.0.0.1");
        assert_eq!(untrusted[&X_FORWARDED_PROTO], "http");
        assert_eq!(untrusted[&X_FORWARDED_HOST], "hello.localhost");
        set_forwarded(&mut h, &peer, "http", Some(&host), true);
        assert_eq!(h[&X_FORWARDED_FOR], "6.6.6.6, 10.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn request_ids_are_generated_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-id"));
        let id = request_id(&h, false);
        assert_eq!(id.len(), 16);
        assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(request_id(&h, false), id);
        assert_eq!(request_id(&h, true), "client-id");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h, true), "has space");
    }
}
