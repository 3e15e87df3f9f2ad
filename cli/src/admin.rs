//! The admin HTTP API client behind `dmq message|trace|stats|dlq`
//! (docs/admin-api.md): blocking `ureq` calls, run outside the async
//! runtime.
//!
//! - The base URL is `--admin` (env `DMQ_ADMIN`); a bare `host:port` means
//!   `http://host:port`.
//! - `--token` (env `DMQ_ADMIN_TOKEN`) is sent as `Authorization: Bearer`.
//! - A 4xx or 5xx answer becomes an [`ApiError`] naming the status and the
//!   API's `error.message`; a refused connection says that the admin API
//!   cannot be reached at the URL.
//! - Reads are bounded by `--timeout`; calls that change or scan data
//!   (`message delete`, `dlq resend`) only bound connecting, and wait for
//!   the broker's answer however long it takes.

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::Value;
use ureq::http::Response;
use ureq::{Agent, Body};

use crate::Cli;

/// A 4xx or 5xx answer of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.code` (`not_found`, `unauthorized`, ...), if the body had one.
    pub code: Option<String>,
    /// `error.message`, or the body (or the status text) when it is not
    /// the API's JSON error.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "admin API: {}", self.status)?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        write!(f, ": {}", self.message)?;
        match self.status {
            401 => write!(f, " (pass the admin token with --token or DMQ_ADMIN_TOKEN)"),
            429 => write!(f, " (wait a minute before trying again)"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Reads an error answer: the API's `{"error": {"code", "message"}}`,
    /// else the body text, else the status's reason phrase.
    pub fn from_body(status: u16, body: &str) -> ApiError {
        if let Ok(value) = serde_json::from_str::<Value>(body) {
            let error = &value["error"];
            if let Some(message) = error["message"].as_str() {
                return ApiError {
                    status,
                    code: error["code"].as_str().map(str::to_string),
                    message: message.to_string(),
                };
            }
        }
        let text = body.trim();
        let message = if text.is_empty() {
            ureq::http::StatusCode::from_u16(status)
                .ok()
                .and_then(|status| status.canonical_reason())
                .unwrap_or("request failed")
                .to_string()
        } else {
            crate::output::truncate(text, 200, false)
        };
        ApiError {
            status,
            code: None,
            message,
        }
    }
}

/// A connection to the admin API.
pub struct Admin {
    agent: Agent,
    base: String,
    token: Option<String>,
    timeout: Duration,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `--admin` as a base URL: `http://` added to a bare `host:port`, no
/// trailing slash.
pub fn base_url(admin: &str) -> String {
    let admin = admin.trim();
    let url = if admin.contains("://") {
        admin.to_string()
    } else {
        format!("http://{admin}")
    };
    url.trim_end_matches('/').to_string()
}

/// Percent-encodes one path segment (everything but `A-Z a-z 0-9 - . _ ~`).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl Admin {
    /// The admin API of the global options.
    pub fn new(cli: &Cli) -> Admin {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(cli.timeout))
            .build();
        Admin {
            agent: config.into(),
            base: base_url(&cli.admin),
            token: cli.token.clone().filter(|token| !token.is_empty()),
            timeout: cli.timeout,
        }
    }

    /// `GET path?query`, the JSON answer.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .get(&url)
            .config()
            .timeout_global(Some(self.timeout))
            .build();
        for (name, value) in query {
            request = request.query(*name, value);
        }
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.answer(request.call())
    }

    /// `POST path` with a JSON body, the JSON answer (`null` for an empty
    /// body). Only connecting is bounded by `--timeout`: the posts change
    /// data (deletions, resends) and are answered when done.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.post(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.answer(request.send_json(body))
    }

    fn answer(&self, result: Result<Response<Body>, ureq::Error>) -> Result<Value> {
        let mut response = result.map_err(|error| self.transport_error(error))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_string()
            .map_err(|error| {
                anyhow!(
                    "reading the answer of the admin API at {} failed: {error}",
                    self.base
                )
            })?;
        if status >= 400 {
            return Err(ApiError::from_body(status, &text).into());
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|error| {
            anyhow!(
                "the admin API at {} answered {status} with invalid JSON: {error}",
                self.base
            )
        })
    }

    fn transport_error(&self, error: ureq::Error) -> anyhow::Error {
        let unreachable = match &error {
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
            // Before any answer: refused, reset, name not resolved...
            ureq::Error::Io(_) => true,
            ureq::Error::Timeout(timeout) => {
                matches!(timeout, ureq::Timeout::Connect | ureq::Timeout::Resolve)
            }
            _ => false,
        };
        if unreachable {
            anyhow!(
                "cannot reach the admin API at {}: {error} (is dmqd running? set --admin or DMQ_ADMIN)",
                self.base
            )
        } else if matches!(error, ureq::Error::Timeout(_)) {
            anyhow!(
                "admin API request to {} failed: {error} (raise --timeout?)",
                self.base
            )
        } else {
            anyhow!("admin API request to {} failed: {error}", self.base)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(base_url("http://127.0.0.1:7080/"), "http://127.0.0.1:7080");
        assert_eq!(base_url("127.0.0.1:7080"), "http://127.0.0.1:7080");
        assert_eq!(
            base_url("https://dmq.example/admin"),
            "https://dmq.example/admin"
        );
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(
            segment("prod.payments.order-paid"),
            "prod.payments.order-paid"
        );
        assert_eq!(segment("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn api_errors_show_status_code_and_message() {
        let error = ApiError::from_body(
            400,
            r#"{"error": {"code": "bad_request", "message": "from_ms must be before to_ms"}}"#,
        );
        assert_eq!(error.code.as_deref(), Some("bad_request"));
        assert_eq!(
            error.to_string(),
            "admin API: 400 bad_request: from_ms must be before to_ms"
        );
        let unauthorized = ApiError::from_body(
            401,
            r#"{"error": {"code": "unauthorized", "message": "missing or wrong token"}}"#,
        );
        assert!(unauthorized.to_string().contains("--token"));
        let plain = ApiError::from_body(404, "");
        assert_eq!(plain.to_string(), "admin API: 404: Not Found");
        let text = ApiError::from_body(502, "bad gateway\n");
        assert_eq!(text.message, "bad gateway");
    }
}
