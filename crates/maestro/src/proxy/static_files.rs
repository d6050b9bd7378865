//! Static paths of `app.toml` (`[http] static`), served straight from the release directory
//! without touching the app: content types, validators (ETag, Last-Modified) and conditional
//! requests, and no way out of the directory.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::header::{
    CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, LOCATION,
};
use hyper::{Method, Response, StatusCode};

use super::body::ProxyBody;
use super::pages::Failure;

/// The file served for a directory.
const INDEX_FILE: &str = "index.html";

/// The static directory of `static_dirs` whose prefix matches `path`, longest prefix first, with
/// the rest of the path after it (still percent-encoded).
pub(crate) fn matching<'a>(
    static_dirs: &'a [(String, PathBuf)],
    path: &'a str,
) -> Option<(&'a Path, &'a str)> {
    let mut best: Option<(usize, &Path, &str)> = None;
    for (prefix, dir) in static_dirs {
        let prefix = prefix.trim_end_matches('/');
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        // "/assets" matches "/assets" and "/assets/x", not "/assetsx".
        if !(rest.is_empty() || rest.starts_with('/')) {
            continue;
        }
        if best.is_none_or(|(len, _, _)| prefix.len() > len) {
            best = Some((prefix.len(), dir.as_path(), rest));
        }
    }
    best.map(|(_, dir, rest)| (dir, rest))
}

/// What a request path resolved to.
enum Resolved {
    File(std::fs::File, Metadata),
    /// A directory asked for without its trailing slash: redirect, so relative links in its
    /// index resolve against the directory.
    AddSlash,
}

/// Serves `rest` (the path after the static prefix) from `dir`. `path_and_query` is the whole
/// request target, for the trailing-slash redirect.
pub(crate) async fn serve(
    dir: &Path,
    rest: &str,
    path_and_query: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response<ProxyBody>, Failure> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Failure::MethodNotAllowed);
    }
    let relative = relative_path(rest).ok_or(Failure::NotFound)?;
    let wants_dir = rest.ends_with('/');
    let root = dir.to_path_buf();
    // One trip to the blocking pool for every file system call of the request.
    let resolved = tokio::task::spawn_blocking(move || resolve(&root, &relative, wants_dir))
        .await
        .map_err(|_| Failure::NotFound)??;
    let (file, meta) = match resolved {
        Resolved::File(file, meta) => (file, meta),
        Resolved::AddSlash => {
            let (path, query) = path_and_query
                .split_once('?')
                .map_or((path_and_query, None), |(p, q)| (p, Some(q)));
            // One leading slash only: `//host/dir` would send the browser to another site.
            let path = path.trim_start_matches('/');
            let location = match query {
                Some(q) => format!("/{path}/?{q}"),
                None => format!("/{path}/"),
            };
            let mut response = Response::new(ProxyBody::empty());
            *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
            if let Ok(location) = HeaderValue::try_from(location) {
                response.headers_mut().insert(LOCATION, location);
            }
            return Ok(response);
        }
    };

    let len = meta.len();
    let modified = meta.modified().ok();
    let etag = etag(len, modified);
    let last_modified = modified.map(httpdate::fmt_http_date);
    let not_modified = match headers.get(IF_NONE_MATCH) {
        Some(tags) => etag_matches(tags, &etag),
        None => match (headers.get(IF_MODIFIED_SINCE), modified) {
            (Some(since), Some(modified)) => since
                .to_str()
                .ok()
                .and_then(|s| httpdate::parse_http_date(s).ok())
                .is_some_and(|since| whole_seconds(modified) <= since),
            _ => false,
        },
    };

    let (status, body) = if not_modified {
        (StatusCode::NOT_MODIFIED, ProxyBody::empty())
    } else if method == Method::HEAD {
        (StatusCode::OK, ProxyBody::empty())
    } else {
        (
            StatusCode::OK,
            ProxyBody::file(tokio::fs::File::from_std(file), len),
        )
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    if let Ok(etag) = HeaderValue::try_from(etag) {
        h.insert(ETAG, etag);
    }
    if let Some(Ok(date)) = last_modified.map(HeaderValue::try_from) {
        h.insert(LAST_MODIFIED, date);
    }
    if status == StatusCode::OK {
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(content_type(dir_name(rest))),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(response)
}

/// The last path segment, to pick a content type; a directory's index is HTML.
fn dir_name(rest: &str) -> &str {
    if rest.is_empty() || rest.ends_with('/') {
        INDEX_FILE
    } else {
        rest.rsplit('/').next().unwrap_or(rest)
    }
}

/// Decodes the request path below the prefix into a relative path, or `None` when it is not
/// a plain descent: `..` and `.` segments, NUL, backslashes and bad escapes are refused.
fn relative_path(rest: &str) -> Option<PathBuf> {
    let decoded = percent_decode(rest)?;
    if decoded.iter().any(|b| *b == 0 || *b == b'\\') {
        return None;
    }
    let mut path = PathBuf::new();
    for segment in decoded.split(|b| *b == b'/') {
        match segment {
            b"" => continue,
            b"." | b".." => return None,
            segment => path.push(OsStr::from_bytes(segment)),
        }
    }
    Some(path)
}

fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Resolves `relative` under `root`, following symlinks, and opens it, refusing anything whose
/// real path is outside the real `root`.
fn resolve(root: &Path, relative: &Path, wants_dir: bool) -> Result<Resolved, Failure> {
    let root = root.canonicalize().map_err(|_| Failure::NotFound)?;
    let inside = |path: &Path| -> Result<(PathBuf, Metadata), Failure> {
        let real = path.canonicalize().map_err(|_| Failure::NotFound)?;
        if !real.starts_with(&root) {
            return Err(Failure::NotFound);
        }
        let meta = std::fs::metadata(&real).map_err(|_| Failure::NotFound)?;
        Ok((real, meta))
    };
    let (mut real, mut meta) = inside(&root.join(relative))?;
    if meta.is_dir() {
        if !wants_dir {
            return Ok(Resolved::AddSlash);
        }
        (real, meta) = inside(&real.join(INDEX_FILE))?;
    }
    // Only regular files: never a FIFO or device that a read would hang on.
    if !meta.is_file() {
        return Err(Failure::NotFound);
    }
    let file = std::fs::File::open(&real).map_err(|_| Failure::NotFound)?;
    let meta = file.metadata().map_err(|_| Failure::NotFound)?;
    Ok(Resolved::File(file, meta))
}

/// A strong validator from size and modification time, as nginx does: releases are immutable,
/// so these change exactly when the content does.
fn etag(len: u64, modified: Option<SystemTime>) -> String {
    let since = modified
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    format!(
        "\"{:x}.{:x}-{len:x}\"",
        since.as_secs(),
        since.subsec_nanos()
    )
}

/// `If-None-Match` against our tag, with the weak comparison RFC 9110 §13.1.2 asks for.
fn etag_matches(header: &HeaderValue, etag: &str) -> bool {
    let Ok(header) = header.to_str() else {
        return false;
    };
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// HTTP dates have whole seconds; compare the file's time at that precision.
fn whole_seconds(time: SystemTime) -> SystemTime {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => UNIX_EPOCH + std::time::Duration::from_secs(since.as_secs()),
        Err(_) => time,
    }
}

/// The content type for a file name, by extension.
pub(crate) fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map_or("", |(_, ext)| ext);
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "wasm" => "application/wasm",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let dirs = vec![
            ("/assets".to_string(), PathBuf::from("/a")),
            ("/assets/img".to_string(), PathBuf::from("/b")),
        ];
        assert_eq!(
            matching(&dirs, "/assets/img/x.png"),
            Some((Path::new("/b"), "/x.png"))
        );
        assert_eq!(
            matching(&dirs, "/assets/x.css"),
            Some((Path::new("/a"), "/x.css"))
        );
        assert_eq!(matching(&dirs, "/assets"), Some((Path::new("/a"), "")));
        assert_eq!(matching(&dirs, "/assetsx"), None);
        let root = vec![("/".to_string(), PathBuf::from("/r"))];
        assert_eq!(matching(&root, "/x"), Some((Path::new("/r"), "/x")));
    }

    #[test]
    fn escapes_are_refused() {
        assert_eq!(
            relative_path("/a/b%20c.txt"),
            Some(PathBuf::from("a/b c.txt"))
        );
        for bad in [
            "/../x",
            "/a/%2e%2e/x",
            "/a/%2E%2E%2Fx/..",
            "/a%00",
            "/a%5c..",
            "/%zz",
            "/a/./b",
        ] {
            assert_eq!(relative_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn types_and_validators() {
        assert_eq!(content_type("app.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("x.woff2"), "font/woff2");
        assert_eq!(content_type("noext"), "application/octet-stream");
        let tag = etag(10, Some(UNIX_EPOCH));
        assert!(etag_matches(
            &HeaderValue::from_str(&format!("W/{tag}, \"x\"")).unwrap(),
            &tag
        ));
        assert!(etag_matches(&HeaderValue::from_static("*"), &tag));
        assert!(!etag_matches(&HeaderValue::from_static("\"other\""), &tag));
    }
}
