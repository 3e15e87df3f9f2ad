//! Who may call the admin listener at all, checked before any route and
//! in both modes (docs/admin-api.md, "Who may call"):
//!
//! - **Host.** Every request must name an allowed host: the listener's own
//!   address, `localhost`, `127.0.0.1`, `[::1]` (with the listener's port
//!   or none), or a name of `admin_allowed_hosts`. A page whose DNS name
//!   was rebound to 127.0.0.1 sends its own name, and is refused: it
//!   cannot read the answers.
//! - **Origin.** A request with an `Origin` header (a browser's) must come
//!   from the same origin as its allowed `Host` (the console's own pages),
//!   for every `/api/*` and `/metrics` request and every state-changing
//!   method. A foreign page cannot drive the API, even in development mode
//!   where no token is asked.
//! - **JSON bodies.** A POST, PUT or PATCH body must be
//!   `Content-Type: application/json` (`415` otherwise): that is never a
//!   "simple" CORS request, so a browser never sends it cross-origin
//!   without a preflight, which this listener does not grant. The body
//!   must arrive within `admin_body_timeout_ms` (`408`) and be at most
//!   [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES) (`413`, refused from its
//!   `Content-Length` before it is read).
//! - Every answer carries `X-Content-Type-Options: nosniff`, and every
//!   error of `/api/*` and `/metrics` is JSON, whoever produced it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, MAX_BODY_BYTES};
use crate::services::Services;

/// One allowed `Host`: a lowercase name (an IPv6 address in brackets) and
/// maybe a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    name: String,
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses `name` or `name:port` (`[v6]` or `[v6]:port`), as in a
    /// `Host` header; no scheme, path or user.
    pub fn parse(text: &str) -> Result<AllowedHost, String> {
        let text = text.trim();
        let (name, port) = if let Some(rest) = text.strip_prefix('[') {
            let (address, after) = rest
                .split_once(']')
                .ok_or_else(|| "an IPv6 address needs its closing ]".to_string())?;
            let address = address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| "not an IPv6 address between [ ]".to_string())?;
            let port = match after {
                "" => None,
                port => Some(port.strip_prefix(':').ok_or("junk after ]")?),
            };
            (format!("[{address}]"), port)
        } else {
            match text.rsplit_once(':') {
                Some((name, port)) => (name.to_ascii_lowercase(), Some(port)),
                None => (text.to_ascii_lowercase(), None),
            }
        };
        let port = port
            .map(|port| {
                port.parse::<u16>()
                    .map_err(|_| "the port must be a number up to 65535".to_string())
            })
            .transpose()?;
        let plain_name = name.len() <= 253
            && !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if !plain_name && !name.starts_with('[') {
            return Err("a host name is letters, digits, . and - (no scheme or path)".into());
        }
        Ok(AllowedHost { name, port })
    }

    fn ip(address: IpAddr) -> AllowedHost {
        let name = match address {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        AllowedHost { name, port: None }
    }
}

/// The hosts one listener answers to.
#[derive(Debug)]
pub(super) struct HostPolicy {
    /// The listener's own port: a name without a port of its own matches
    /// with this port or none.
    port: u16,
    allowed: Vec<AllowedHost>,
}

impl HostPolicy {
    pub(super) fn new(listen: SocketAddr, configured: &[String]) -> HostPolicy {
        let mut allowed = vec![
            AllowedHost::ip(listen.ip()),
            AllowedHost {
                name: "localhost".into(),
                port: None,
            },
            AllowedHost::ip(IpAddr::from([127, 0, 0, 1])),
            AllowedHost::ip(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ];
        // Checked at start (`BrokerConfig::validate`).
        allowed.extend(
            configured
                .iter()
                .filter_map(|host| AllowedHost::parse(host).ok()),
        );
        HostPolicy {
            port: listen.port(),
            allowed,
        }
    }

    /// Whether `host` (a `Host` header's value) is allowed.
    fn allows(&self, host: &AllowedHost) -> bool {
        self.allowed.iter().any(|allowed| {
            allowed.name == host.name
                && match allowed.port {
                    Some(port) => host.port == Some(port),
                    None => host.port.is_none_or(|port| port == self.port),
                }
        })
    }
}

/// Whether `origin` (an `Origin` header's value) is the origin of `host`.
fn same_origin(origin: &str, host: &AllowedHost) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null", or junk
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let Ok(origin) = AllowedHost::parse(authority) else {
        return false;
    };
    origin.name == host.name
        && origin.port.unwrap_or(default_port) == host.port.unwrap_or(default_port)
}

/// Paths whose every request is an API call.
fn is_api(path: &str) -> bool {
    path == "/metrics" || path == "/api" || path.starts_with("/api/")
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

/// The host a request names: its absolute URI's authority, else `Host`.
fn requested_host(request: &Request) -> Result<AllowedHost, String> {
    let host_header = request
        .headers()
        .get(header::HOST)
        .map(|value| value.to_str().map_err(|_| "an unreadable Host".to_string()))
        .transpose()?;
    let named = match (request.uri().authority(), host_header) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host) => {
            return Err("a Host that differs from the request's URI".into())
        }
        (Some(authority), _) => authority.as_str().to_string(),
        (None, Some(host)) => host.to_string(),
        (None, None) => return Err("no Host".into()),
    };
    AllowedHost::parse(&named).map_err(|_| format!("Host {}", super::shown(&named)))
}

/// The listener-wide checks: Host, Origin, nosniff, JSON errors.
pub(super) async fn guard(
    State(policy): State<Arc<HostPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let api = is_api(request.uri().path());
    let mut response = match check(&policy, &request, api) {
        Err(refusal) => refusal.into_response(),
        Ok(()) => {
            let response = next.run(request).await;
            if api {
                json_errors(response).await
            } else {
                response
            }
        }
    };
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn check(policy: &HostPolicy, request: &Request, api: bool) -> Result<(), ApiError> {
    let host = match requested_host(request) {
        Ok(host) if policy.allows(&host) => host,
        Ok(host) => {
            return Err(forbidden(format!(
                "Host {} is not a name of this broker's admin listener (add it to \
                 admin_allowed_hosts to allow it)",
                super::shown(&host.name)
            )))
        }
        Err(what) => return Err(forbidden(format!("{what}: refused (Host is required)"))),
    };
    let reads_only = matches!(*request.method(), Method::GET | Method::HEAD);
    if api || !reads_only {
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !same_origin(origin, &host) {
                return Err(forbidden(format!(
                    "requests from origin {} are refused: only the console's own pages \
                     may call the admin API from a browser",
                    super::shown(origin)
                )));
            }
        }
    }
    Ok(())
}

/// Turns a non-JSON error answer (axum's own rejections) into the API's
/// JSON error shape.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let mut converted = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name == header::ALLOW {
            converted.headers_mut().insert(name, value.clone());
        }
    }
    converted
}

/// Whether `headers` say the body is JSON (`application/json`, any
/// parameters).
fn is_json(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let essence = value
        .to_str()
        .ok()
        .and_then(|text| text.split(';').next())
        .map(|essence| essence.trim().to_ascii_lowercase());
    Some(essence.as_deref() == Some("application/json"))
}

/// Whether the request announces a non-empty body by its length.
fn announces_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length.as_bytes() != b"0")
}

/// For API routes, after the token check: a POST, PUT or PATCH body must
/// be JSON, within the size limit, and arrive within the body timeout; it
/// is read whole here, so handlers never wait on a slow client.
pub(super) async fn json_body(
    State(services): State<Services>,
    request: Request,
    next: Next,
) -> Response {
    let writes = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    if !writes {
        return next.run(request).await;
    }
    let headers = request.headers();
    let declared_json = match is_json(headers) {
        Some(false) => return unsupported_media_type(),
        Some(true) => true,
        // No type: only an empty body is accepted (checked once read, as
        // some clients send an empty body in chunks).
        None if announces_body(headers) => return unsupported_media_type(),
        None => false,
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok())
        .and_then(|length| length.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let timeout = Duration::from_millis(services.config.admin_body_timeout_ms);
    let (parts, body) = request.into_parts();
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_BODY_BYTES));
    let bytes = match tokio::time::timeout(timeout, read).await {
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms",
                    services.config.admin_body_timeout_ms
                ),
            )
            .into_response()
        }
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(error)) => {
            return ApiError::bad_request(format!("reading the request body failed: {error}"))
                .into_response()
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if !declared_json && !bytes.is_empty() {
        return unsupported_media_type();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn unsupported_media_type() -> Response {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a request body must be JSON, sent with Content-Type: application/json",
    )
    .into_response()
}

fn too_large() -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("a request body may be at most {MAX_BODY_BYTES} bytes"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> AllowedHost {
        AllowedHost::parse(text).unwrap()
    }

    #[test]
    fn hosts_parse_like_host_headers() {
        assert_eq!(
            host("LocalHost:7080"),
            AllowedHost {
                name: "localhost".into(),
                port: Some(7080)
            }
        );
        assert_eq!(host("[::1]").name, "[::1]");
        assert_eq!(host("[::1]:80").port, Some(80));
        for bad in [
            "",
            "http://x",
            "a/b",
            "user@host",
            "x:99999",
            "[::1",
            "[nope]",
            "a b",
            ":80",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_policy_allows_local_names_and_configured_ones() {
        let policy = HostPolicy::new(
            "0.0.0.0:7080".parse().unwrap(),
            &["dmq.example".into(), "proxy:8443".into()],
        );
        for ok in [
            "localhost",
            "localhost:7080",
            "127.0.0.1:7080",
            "[::1]:7080",
            "0.0.0.0:7080",
            "dmq.example",
            "DMQ.example:7080",
            "proxy:8443",
        ] {
            assert!(policy.allows(&host(ok)), "{ok}");
        }
        for refused in [
            "localhost:7081",
            "evil.example:7080",
            "127.0.0.2:7080",
            "proxy",
            "proxy:7080",
            "dmq.example.evil:7080",
        ] {
            assert!(!policy.allows(&host(refused)), "{refused}");
        }
    }

    #[test]
    fn origins_must_match_the_host() {
        let local = host("127.0.0.1:7080");
        assert!(same_origin("http://127.0.0.1:7080", &local));
        assert!(!same_origin("http://127.0.0.1:7081", &local));
        assert!(!same_origin("http://localhost:7080", &local));
        assert!(!same_origin("null", &local));
        assert!(!same_origin("file://", &local));
        assert!(same_origin("https://proxy", &host("proxy")));
        assert!(same_origin("https://proxy:443", &host("proxy")));
        assert!(same_origin("http://proxy", &host("proxy:80")));
        assert!(!same_origin("http://proxy:8080", &host("proxy")));
    }

    #[test]
    fn json_content_types() {
        let mut headers = HeaderMap::new();
        assert_eq!(is_json(&headers), None);
        for (value, json) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
            ("multipart/form-data; boundary=x", false),
            ("application/jsonp", false),
        ] {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&headers), Some(json), "{value}");
        }
    }
}
