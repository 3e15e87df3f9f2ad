//! The admin HTTP API (docs/admin-api.md): JSON over axum, on its own
//! listener, beside the console and `/metrics`.
//!
//! # Layout
//! - this module: the router, the token check, the JSON error type, and
//!   the retention task;
//! - `guard`: Host, Origin and JSON-body checks, `nosniff`, JSON errors;
//! - `listener`: the accept loop, its connection limits and timeouts;
//! - `topics`: the registry and groups;
//! - `messages`: query, per-group state, deletion, test messages, dead
//!   letters;
//! - `observe`: broker info, trace, statistics, metrics.
//!
//! Rules: every request passes `guard` first (allowed `Host`, same-origin
//! `Origin`, `nosniff`, JSON errors); every `/api/*` route but
//! `POST /api/login`, and `/metrics`, pass the token check (none in
//! development mode), then the JSON body check; every error is a JSON
//! [`ApiError`] with a 4xx/5xx status, never a bare text or a panic; bodies
//! are parsed by [`parse_json`] so malformed JSON gets the same shape.

mod guard;
mod listener;
mod messages;
mod observe;
mod topics;
mod transactions;

pub use crate::connection_limits::{ConnectionLimits, Refusal};
pub use guard::AllowedHost;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::auth::Verdict;
use crate::engine::EngineError;
use crate::services::Services;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

/// An error answer: status plus `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 409: conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    /// 500: the broker failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: bounded(message.into()),
        }
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::INSUFFICIENT_STORAGE => "disk_full",
            StatusCode::SERVICE_UNAVAILABLE => "shutting_down",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            _ => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.code() {
            // A 4xx without a code of its own (axum's 422, a 431): the
            // request is wrong, not the broker.
            "internal" if self.status.is_client_error() => "bad_request",
            code => code,
        };
        let body = serde_json::json!({
            "error": {"code": code, "message": self.message}
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<dmq_protocol::ErrorResponse> for ApiError {
    fn from(error: dmq_protocol::ErrorResponse) -> ApiError {
        ApiError::new(crate::convert::http_status(error.code), error.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match &error {
            // Not a wire condition of its own: the topic or group exists
            // but cannot be used until it is deleted.
            EngineError::Dispatch(dmq_dispatcher::DispatchError::Quarantined { .. }) => {
                ApiError::conflict(error.to_string())
            }
            _ => ApiError::new(
                crate::convert::http_status(crate::convert::engine_error(&error).code),
                error.to_string(),
            ),
        }
    }
}

impl From<dmq_dispatcher::DispatchError> for ApiError {
    fn from(error: dmq_dispatcher::DispatchError) -> ApiError {
        ApiError::from(EngineError::Dispatch(error))
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(error: crate::registry::RegistryError) -> ApiError {
        use crate::registry::RegistryError;
        match error {
            RegistryError::Exists(_) | RegistryError::StatusForbids { .. } => {
                ApiError::conflict(error.to_string())
            }
            RegistryError::Unknown(_) => ApiError::not_found(error.to_string()),
            _ => ApiError::internal(error.to_string()),
        }
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body into `T`; any failure is a 400 that says why.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The query string as a map; a malformed one is a 400.
pub fn query_map(uri: &Uri) -> ApiResult<HashMap<String, String>> {
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|query| query.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

/// An optional query parameter parsed as `T`.
pub fn query_param<T: std::str::FromStr>(
    query: &HashMap<String, String>,
    name: &str,
) -> ApiResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    query
        .get(name)
        .map(|text| {
            text.parse::<T>()
                .map_err(|e| ApiError::bad_request(format!("{name}={}: {e}", shown(text))))
        })
        .transpose()
}

/// Runs blocking work (log reads, argon2, the trace) off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
}

/// Most characters of user input an error message repeats.
pub const MAX_ECHO_CHARS: usize = dmq_dispatcher::names::SHOWN_CHARS_MAX;

/// `text` quoted, cut after [`MAX_ECHO_CHARS`] characters with an
/// ellipsis: the dispatcher's rule, so both listeners echo alike.
pub(crate) use dmq_dispatcher::names::shown;

/// Longest error message.
const MAX_MESSAGE_CHARS: usize = 1000;

/// An error message safe to send back, whatever input it repeats (a serde
/// error names an unknown field, an engine error a topic): any word longer
/// than [`MAX_ECHO_CHARS`] (with room for the quotes and ellipsis of
/// [`shown`]) is cut with an ellipsis, and so is the whole message past
/// [`MAX_MESSAGE_CHARS`].
fn bounded(message: String) -> String {
    let long_word = |word: &str| word.chars().count() > MAX_ECHO_CHARS + 8;
    if message.chars().count() <= MAX_MESSAGE_CHARS && !message.split(' ').any(long_word) {
        return message;
    }
    let mut out = String::new();
    for (index, word) in message.split(' ').enumerate() {
        if index > 0 {
            out.push(' ');
        }
        if long_word(word) {
            out.extend(word.chars().take(MAX_ECHO_CHARS));
            out.push('…');
        } else {
            out.push_str(word);
        }
        if out.chars().count() > MAX_MESSAGE_CHARS {
            out = out.chars().take(MAX_MESSAGE_CHARS).collect();
            out.push('…');
            break;
        }
    }
    out
}

/// The whole HTTP surface: API, metrics, console.
pub fn router(services: Services) -> Router {
    let hosts = Arc::new(guard::HostPolicy::new(
        services.admin_addr,
        &services.config.admin_allowed_hosts,
    ));
    let protected = Router::new()
        .route("/api/info", get(observe::info))
        .route("/api/health", get(observe::health))
        .route("/api/cluster", get(observe::cluster))
        .route(
            "/api/cluster/nodes/{node}/replace",
            axum::routing::post(observe::replace_node),
        )
        .route(
            "/api/cluster/transfer-leader",
            axum::routing::post(observe::transfer_leader),
        )
        .route(
            "/api/cluster/nodes/{node}/add",
            axum::routing::post(observe::add_node),
        )
        .route(
            "/api/cluster/nodes/{node}/remove",
            axum::routing::post(observe::remove_node),
        )
        .merge(topics::routes())
        .merge(messages::routes())
        .merge(transactions::routes())
        .route("/api/trace/{id}", get(observe::trace))
        .route("/api/stats", get(observe::stats))
        .route("/metrics", get(observe::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            services.clone(),
            guard::json_body,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            services.clone(),
            require_token,
        ));
    let login = Router::new().route("/api/login", post(login)).route_layer(
        axum::middleware::from_fn_with_state(services.clone(), guard::json_body),
    );
    Router::new()
        .merge(login)
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(services)
        .merge(crate::console::router())
        .layer(axum::middleware::from_fn_with_state(hosts, guard::guard))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", shown(uri.path())))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", shown(uri.path())),
    )
}

fn bearer(request: &Request) -> Option<&[u8]> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .as_bytes()
        .strip_prefix(b"Bearer ")
}

async fn check_token(services: &Services, address: SocketAddr, token: Vec<u8>) -> Verdict {
    let credentials = std::sync::Arc::clone(&services.credentials);
    tokio::task::spawn_blocking(move || credentials.verify_admin(address.ip(), &token))
        .await
        .unwrap_or(Verdict::Refused)
}

fn refusal(verdict: Verdict) -> Option<ApiError> {
    match verdict {
        Verdict::Admitted => None,
        Verdict::Refused => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid admin token is needed (Authorization: Bearer <token>)",
        )),
        Verdict::RateLimited => Some(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts from this address; try again in a minute",
        )),
    }
}

async fn require_token(
    State(services): State<Services>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if services.config.development_mode() {
        if crate::auth::admits_anonymous(peer.ip()) {
            return next.run(request).await;
        }
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "development mode: the admin API answers local clients only",
        )
        .into_response();
    }
    let Some(token) = bearer(&request).map(<[u8]>::to_vec) else {
        // No token at all is not a guess: not counted as a failure.
        return refusal(Verdict::Refused)
            .map(IntoResponse::into_response)
            .unwrap_or_default();
    };
    match refusal(check_token(&services, peer, token).await) {
        None => next.run(request).await,
        Some(error) => {
            tracing::warn!(%peer, path = %request.uri().path(), "admin API: token refused");
            error.into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(
    State(services): State<Services>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let mode = observe::mode_name(&services);
    if services.config.development_mode() {
        return Ok(Json(serde_json::json!({ "mode": mode })));
    }
    let login: Login = parse_json(&body)?;
    match refusal(check_token(&services, peer, login.token.into_bytes()).await) {
        None => Ok(Json(serde_json::json!({ "mode": mode }))),
        Some(error) => Err(error),
    }
}

/// Serves the admin API on `listener` until `shutdown` completes, within
/// the configured connection limits and timeouts.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let config = Arc::clone(&services.config);
    let connections = Arc::new(ConnectionLimits::new(
        config.admin_max_connections,
        config.admin_max_connections_per_address,
    ));
    let timeouts = listener::ConnectionTimeouts {
        header: Duration::from_millis(config.admin_header_timeout_ms),
    };
    let app = router(services).layer(axum::Extension(Arc::clone(&connections)));
    listener::serve(listener, app, connections, timeouts, shutdown).await;
}

/// How often per-topic retention is applied.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Applies each registered topic's `retention_hours` every minute, and
/// unlinks segments whose messages are all deleted and passed by every
/// group, and the delay store's segments no pending delay needs, until
/// `stop` turns true.
pub async fn enforce_retention(services: Services, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let reclaimed = services
            .engine
            .call(|dispatcher, _| {
                let mut freed = match dispatcher.reclaim_delay_log() {
                    Ok(n) => n,
                    Err(error) => {
                        tracing::warn!(%error, "deleting the delay store's fired segments failed");
                        0
                    }
                };
                for (topic, _) in dispatcher.topics() {
                    match dispatcher.reclaim_deleted(&topic) {
                        Ok(n) => freed += n,
                        Err(error) => {
                            tracing::warn!(topic, %error, "unlinking deleted segments failed")
                        }
                    }
                }
                freed
            })
            .await;
        if let Ok(freed @ 1..) = reclaimed {
            tracing::info!(segments = freed, "unlinked segments of deleted messages");
        }
        let topics: Vec<(String, u64)> = services
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list()
            .into_iter()
            .filter_map(|topic| topic.retention_hours.map(|hours| (topic.name, hours)))
            .collect();
        for (name, hours) in topics {
            let Some(crate::engine::TopicHandle { logs, .. }) = services.engine.topic(&name) else {
                continue;
            };
            let max_age_ms = hours.saturating_mul(3_600_000);
            let now = crate::services::now_ms();
            let result = tokio::task::spawn_blocking(move || {
                let mut deleted = 0;
                for log in logs {
                    deleted += log.apply_retention(Some(max_age_ms), None, now)?;
                }
                Ok::<u64, dmq_dispatcher::StoreError>(deleted)
            })
            .await;
            match result {
                Ok(Ok(0)) => {}
                Ok(Ok(deleted)) => {
                    tracing::info!(topic = name, deleted, "retention deleted segments")
                }
                Ok(Err(error)) => tracing::warn!(topic = name, %error, "retention failed"),
                Err(error) => tracing::warn!(topic = name, %error, "retention task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_cut() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = "x".repeat(5000);
        let cut = shown(&long);
        assert_eq!(cut.chars().count(), MAX_ECHO_CHARS + 3);
        assert!(cut.ends_with("\"…"));
        let message = format!("unknown topic {cut}");
        assert_eq!(bounded(message.clone()), message, "shown() is left alone");
        let raw = bounded(format!("unknown field `{long}`, expected one of `a`"));
        assert!(raw.chars().count() < 200, "{raw}");
        assert!(
            raw.contains('…') && raw.ends_with("expected one of `a`"),
            "{raw}"
        );
        let many = bounded("word ".repeat(1000));
        assert!(many.chars().count() <= MAX_MESSAGE_CHARS + 1);
        let multibyte = bounded("é".repeat(3000));
        assert!(multibyte.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }
}
