//! The handshake and the client's rights: HELLO (version, credentials,
//! development mode), and what the registry lets this client do with a topic.

use super::*;

impl Session {
    pub(super) async fn hello(&mut self, correlation_id: u32, request: Request) -> bool {
        if let Request::Ping = request {
            // Allowed before HELLO (PROTOCOL.md §4): a liveness probe.
            self.send(Frame::response(correlation_id, Response::Pong))
                .await;
            return true;
        }
        let Request::Hello(hello) = request else {
            let error = ErrorResponse::new(
                ErrorCode::NotAuthenticated,
                "the first request must be HELLO",
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        };
        let Some(version) = wire::negotiate_version(hello.min_version, hello.max_version) else {
            self.shared
                .engine
                .telemetry()
                .connection_rejected("unsupported_version");
            let error = ErrorResponse::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this broker speaks protocol versions {}..={}",
                    wire::MIN_PROTOCOL_VERSION,
                    wire::PROTOCOL_VERSION
                ),
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        };
        if self.shared.development && !crate::auth::admits_anonymous(self.peer.ip()) {
            tracing::warn!(peer = %self.peer, "development mode: remote client refused");
            self.shared
                .engine
                .telemetry()
                .connection_rejected("authentication_failed");
            let error = ErrorResponse::new(
                ErrorCode::AuthenticationFailed,
                "development mode admits local clients only; configure [clients]",
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        }
        if !self.shared.development {
            let credentials = Arc::clone(&self.shared.credentials);
            let address = self.peer.ip();
            let client_id = hello.client_id.clone();
            let secret = hello.secret.clone();
            // argon2 takes tens of milliseconds: not on an async thread.
            let verdict = tokio::task::spawn_blocking(move || {
                credentials.verify_client(address, &client_id, &secret)
            })
            .await
            .unwrap_or(Verdict::Refused);
            let message = match verdict {
                Verdict::Admitted => None,
                Verdict::Refused => Some("unknown client id or wrong secret"),
                Verdict::RateLimited => {
                    Some("too many failed attempts from this address; try again in a minute")
                }
            };
            if let Some(message) = message {
                tracing::warn!(peer = %self.peer, client = hello.client_id, ?verdict, "authentication failed");
                self.shared
                    .engine
                    .telemetry()
                    .connection_rejected("authentication_failed");
                let error = ErrorResponse::new(ErrorCode::AuthenticationFailed, message);
                self.send(error_frame(correlation_id, error)).await;
                return false;
            }
        }
        self.client_id = if hello.client_id.is_empty() {
            ANONYMOUS_CLIENT.to_string()
        } else {
            hello.client_id.clone()
        };
        self.authenticated = true;
        let config = &self.shared.config;
        let response = Response::HelloOk(wire::HelloOk {
            version,
            max_frame_bytes: config.max_frame_bytes,
            // A cluster node says which node it is (a client follows
            // `WrongNode` redirects and may want to know where it is).
            broker_id: config
                .cluster
                .as_ref()
                .map_or_else(|| "dmqd".to_string(), |cluster| cluster.node_id.to_string()),
        });
        self.send(Frame::response(correlation_id, response)).await;
        true
    }

    /// What the registry says of `right` on `topic` for this client. In
    /// development mode only the topic's status counts; in production the
    /// client must also be listed.
    pub(super) fn registry_access(
        &self,
        topic: &str,
        right: Right,
    ) -> Result<Access, ErrorResponse> {
        registry_access(
            &self.shared.registry,
            self.shared.development,
            &self.client_id,
            topic,
            right,
        )
    }

    /// Checks `right` on `topic`. A dead-letter topic is not registered:
    /// whoever may consume its source topic may consume it.
    pub(super) async fn authorize(
        &self,
        topic: &str,
        right: Right,
    ) -> Result<Access, ErrorResponse> {
        match self.registry_access(topic, right)? {
            granted @ Access::Granted { .. } => Ok(granted),
            Access::Unregistered => {
                let refused = || {
                    ErrorResponse::new(
                        ErrorCode::NotAuthorized,
                        crate::registry::Registry::refusal(topic, &self.client_id, right),
                    )
                };
                if right != Right::Consume {
                    return Err(refused());
                }
                let name = topic.to_string();
                let source = self
                    .shared
                    .engine
                    .call(move |dispatcher, _| dead_letter_source(dispatcher, &name))
                    .await
                    .map_err(|error| convert::engine_error(&error))?;
                match source {
                    Some(source) => match self.registry_access(&source, Right::Consume)? {
                        Access::Granted { .. } => Ok(Access::WITHOUT_DEFAULTS),
                        Access::Unregistered => Err(refused()),
                    },
                    None => Err(refused()),
                }
            }
        }
    }

    /// Checks that the client may consume from or produce to `topic`
    /// (either will do): what describing a topic needs. The refusal is
    /// the produce right's.
    pub(super) async fn authorize_either(&self, topic: &str) -> Result<(), ErrorResponse> {
        if self.authorize(topic, Right::Consume).await.is_err() {
            self.authorize(topic, Right::Produce).await?;
        }
        Ok(())
    }

    /// Refuses `what` outside development mode: it is done through the
    /// admin API there.
    pub(super) fn development_only(&self, what: &str) -> Result<(), ErrorResponse> {
        if self.shared.development {
            Ok(())
        } else {
            Err(ErrorResponse::new(
                ErrorCode::NotAuthorized,
                format!("{what} is done through the admin API (clients may not)"),
            ))
        }
    }
}

/// What the registry says of `right` on `topic` for `client_id` (see
/// [`Session::registry_access`]); a free function so that a check can run
/// where no session is, such as inside a dispatcher job.
pub(super) fn registry_access(
    registry: &SharedRegistry,
    development: bool,
    client_id: &str,
    topic: &str,
    right: Right,
) -> Result<Access, ErrorResponse> {
    let registry = registry.read().unwrap_or_else(|p| p.into_inner());
    let Some(record) = registry.get(topic) else {
        return Ok(if development {
            Access::WITHOUT_DEFAULTS
        } else {
            Access::Unregistered
        });
    };
    // In development mode every client holds every right; the status
    // still counts.
    let allowed = if development {
        record.check_in_use()
    } else {
        registry.allows(topic, client_id, right)
    };
    allowed.map_err(|message| ErrorResponse::new(ErrorCode::NotAuthorized, message))?;
    Ok(Access::Granted {
        default_ttl_ms: record.default_ttl_ms,
        max_attempts: Some(record.max_attempts),
        ack_timeout_ms: Some(record.ack_timeout_ms),
    })
}
