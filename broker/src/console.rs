//! The web console: a single-page app served by `dmqd` on the admin
//! listener, next to the JSON API it calls (docs/admin-api.md).
//!
//! Its files live in `broker/console/` (plain HTML, ES modules and CSS, no
//! build step) and are embedded in the binary with `include_bytes!`, as is
//! the vendored chart library (uPlot, `console/vendor/`): the console loads
//! nothing from the network at run time.
//!
//! - `GET /` serves `index.html`, with a content security policy that only
//!   admits the broker's own scripts, styles and API.
//! - `GET /assets/<path>` serves one embedded file with its content type;
//!   an unknown path is `404`.
//!
//! Every answer carries an `ETag` (a hash of the file, computed at compile
//! time) and `Cache-Control: no-cache`: browsers keep the files but
//! revalidate them on each load (`304 Not Modified` when unchanged), so an
//! upgraded broker never serves a mix of old and new modules.
//!
//! Loading the page needs no credentials; every API call it makes does.

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    /// Path below `/assets/` (and below `broker/console/`).
    path: &'static str,
    /// The file's bytes.
    bytes: &'static [u8],
    /// FNV-1a hash of `bytes`: the ETag.
    hash: u64,
}

/// FNV-1a, 64 bits: a stable fingerprint of a file for its ETag (not a
/// security measure).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut index = 0;
    while index < bytes.len() {
        hash ^= bytes[index] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        index += 1;
    }
    hash
}

/// Embeds `broker/console/<path>` as an [`Asset`].
macro_rules! asset {
    ($path:literal) => {{
        const BYTES: &[u8] = include_bytes!(concat!("../console/", $path));
        Asset {
            path: $path,
            bytes: BYTES,
            hash: fnv1a(BYTES),
        }
    }};
}

/// The page itself.
const INDEX: Asset = asset!("index.html");

/// Everything below `/assets/`. A file added to `broker/console/` must be
/// listed here (a unit test checks that none is forgotten).
const ASSETS: &[Asset] = &[
    asset!("style.css"),
    asset!("favicon.svg"),
    asset!("js/app.js"),
    asset!("js/api.js"),
    asset!("js/dom.js"),
    asset!("js/router.js"),
    asset!("js/chart.js"),
    asset!("js/deletepanel.js"),
    asset!("js/topicactions.js"),
    asset!("js/pages/login.js"),
    asset!("js/pages/transactions.js"),
    asset!("js/pages/topics.js"),
    asset!("js/pages/topic.js"),
    asset!("js/pages/messages.js"),
    asset!("js/pages/message.js"),
    asset!("js/pages/dlq.js"),
    asset!("js/pages/trace.js"),
    asset!("js/pages/stats.js"),
    asset!("js/pages/cluster.js"),
    asset!("vendor/uPlot.iife.min.js"),
    asset!("vendor/uPlot.min.css"),
    asset!("vendor/uPlot.LICENSE"),
];

/// What the page may load and connect to: only this origin, no inline
/// scripts or styles (uPlot styles its elements through the CSSOM, which
/// the policy allows), no framing.
const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Routes serving the console: `GET /` and `GET /assets/{*path}`.
pub(crate) fn router() -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
}

/// `GET /`: the page, with a strict content security policy.
async fn index(headers: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &headers);
    let extra = response.headers_mut();
    extra.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    extra.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /assets/{*path}`: one embedded file, or 404.
async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match find(&path) {
        Some(asset) => serve(asset, &headers),
        None => (
            StatusCode::NOT_FOUND,
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            "no such console asset\n",
        )
            .into_response(),
    }
}

/// The embedded file at `path` (below `/assets/`).
fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.path == path)
}

/// The content type of a file, from its name.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("LICENSE" | "txt" | "md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Whether an `If-None-Match` header names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// Answers with `asset`, or `304` when the browser's copy is current.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let status = if not_modified(request, &etag) {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut response = if status == StatusCode::OK {
        asset.bytes.into_response()
    } else {
        status.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(content_type(asset.path)),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(ETAG, value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// Sends `GET path` (with optional extra headers) to the console router.
    async fn fetch(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    /// Every `/assets/...` path that `text` mentions in quotes.
    fn asset_references(text: &str) -> Vec<String> {
        text.split('"')
            .filter(|piece| piece.starts_with("/assets/"))
            .map(str::to_string)
            .collect()
    }

    /// The `/assets/...` paths a module imports (`from "./x.js"`, relative to it).
    fn module_imports(module_path: &str, text: &str) -> Vec<String> {
        let directory: Vec<&str> = module_path.split('/').collect();
        let directory = &directory[..directory.len() - 1];
        text.lines()
            .filter_map(|line| line.split(" from \"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .map(|relative| {
                let mut parts: Vec<&str> = directory.to_vec();
                for part in relative.split('/') {
                    match part {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        other => parts.push(other),
                    }
                }
                format!("/assets/{}", parts.join("/"))
            })
            .collect()
    }

    #[tokio::test]
    async fn index_is_served_with_its_policy() {
        let (status, headers, body) = fetch("/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(headers.contains_key(CONTENT_SECURITY_POLICY));
        assert_eq!(headers[CACHE_CONTROL], "no-cache");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("/assets/js/app.js"));
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "the page must not load anything from elsewhere"
        );
    }

    #[tokio::test]
    async fn every_asset_the_page_references_is_served() {
        let index = std::str::from_utf8(INDEX.bytes).unwrap();
        let mut wanted = asset_references(index);
        assert!(wanted.len() >= 5, "{wanted:?}");
        // Modules import each other: follow the imports too.
        let mut checked = Vec::new();
        while let Some(path) = wanted.pop() {
            if checked.contains(&path) {
                continue;
            }
            let (status, headers, body) = fetch(&path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(
                headers[CONTENT_TYPE],
                content_type(&path),
                "content type of {path}"
            );
            assert!(
                headers[CONTENT_TYPE] != "application/octet-stream",
                "{path}"
            );
            assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
            assert!(headers.contains_key(ETAG), "{path}");
            if path.ends_with(".js") && !path.contains("/vendor/") {
                let text = String::from_utf8(body).unwrap();
                let relative = path.trim_start_matches("/assets/");
                wanted.extend(module_imports(relative, &text));
            }
            checked.push(path);
        }
        for expected in [
            "/assets/js/pages/stats.js",
            "/assets/vendor/uPlot.iife.min.js",
        ] {
            assert!(checked.iter().any(|path| path == expected), "{expected}");
        }
    }

    #[tokio::test]
    async fn unknown_assets_are_not_found() {
        for path in [
            "/assets/nope.js",
            "/assets/js/../../src/console.rs",
            "/assets/",
            "/assets/index.html",
            "/assets/vendor/README.md",
        ] {
            let (status, _, _) = fetch(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[tokio::test]
    async fn a_current_copy_is_not_sent_again() {
        let (_, headers, _) = fetch("/assets/js/api.js", &[]).await;
        let etag = headers[ETAG].to_str().unwrap().to_string();
        let (status, headers, body) = fetch("/assets/js/api.js", &[("if-none-match", &etag)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(headers[ETAG].to_str().unwrap(), etag);
        let (status, _, _) = fetch("/assets/js/api.js", &[("if-none-match", "\"0000\"")]).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// Every file in broker/console/ is embedded (a new module cannot be
    /// forgotten in [`ASSETS`]), and nothing in the table is missing there.
    #[test]
    fn every_console_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut files = Vec::new();
        let mut directories = vec![root.clone()];
        while let Some(directory) = directories.pop() {
            for entry in std::fs::read_dir(&directory).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    directories.push(path);
                } else {
                    let relative = path.strip_prefix(&root).unwrap();
                    files.push(relative.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        for file in &files {
            if file == "index.html" || file == "vendor/README.md" {
                continue;
            }
            assert!(find(file).is_some(), "console/{file} is not in ASSETS");
        }
        for asset in ASSETS {
            assert!(
                files.iter().any(|file| file == asset.path),
                "{}",
                asset.path
            );
        }
    }
}
