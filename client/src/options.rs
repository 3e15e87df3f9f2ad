//! Settings of a [`Client`](crate::Client) and of the [`Producer`](crate::Producer):
//! identity, limits, timeouts, reconnect backoff, batching.

use std::time::Duration;

use bytes::Bytes;
use dmq_protocol::DEFAULT_MAX_FRAME_BYTES;

/// How a [`Client`](crate::Client) connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in HELLO; names the client for auth, ACLs and logs.
    pub client_id: String,
    /// Sent in HELLO; empty when the broker runs without auth.
    pub secret: Bytes,
    /// Largest frame accepted from the broker (length prefix included)
    /// during HELLO; after it, frames up to the larger of this and the
    /// broker's announced `max_frame_bytes` (HELLO_OK) are accepted.
    pub max_frame_bytes: u32,
    /// A request without an answer after this fails with
    /// [`ClientError::Timeout`](crate::ClientError::Timeout). Also bounds the
    /// wait for a connection while reconnecting.
    pub request_timeout: Duration,
    /// Bound on opening a TCP connection plus the HELLO exchange.
    pub connect_timeout: Duration,
    /// First delay before a reconnect attempt; doubled after each failure
    /// (a connection that dropped before it lived `reconnect_backoff_max`
    /// counts as one).
    pub reconnect_backoff_initial: Duration,
    /// Cap on the reconnect delay; also how long a connection must live for
    /// the delay to start again from `reconnect_backoff_initial`.
    pub reconnect_backoff_max: Duration,
    /// Frames queued for the socket writer at most (backpressure beyond).
    pub write_queue_frames: usize,
    /// A connection that sent nothing for this long sends a PING, so that
    /// the broker's idle timeout (`idle_timeout_ms`, 300 s by default) never
    /// closes a consumer that only receives pushes. `None`: never.
    pub keepalive: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_id: "dmq-client".to_owned(),
            secret: Bytes::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_backoff_initial: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
            write_queue_frames: 1024,
            keepalive: Some(Duration::from_secs(60)),
        }
    }
}

impl ClientOptions {
    /// Default options with this client id.
    pub fn new(client_id: impl Into<String>) -> Self {
        ClientOptions {
            client_id: client_id.into(),
            ..ClientOptions::default()
        }
    }

    /// Sets the secret.
    pub fn secret(mut self, secret: impl Into<Bytes>) -> Self {
        self.secret = secret.into();
        self
    }

    /// Sets the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// How a [`Producer`](crate::Producer) batches and retries.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// A batch is sent at most this long after its first message; at once
    /// if no PRODUCE of the producer is in flight.
    pub linger: Duration,
    /// A batch is sent as soon as it holds this many messages.
    pub max_batch_messages: usize,
    /// A batch is sent before it would exceed this many (estimated) bytes;
    /// also capped by the broker's maximum frame size.
    pub max_batch_bytes: usize,
    /// PRODUCE requests in flight at once (pipelining).
    pub max_in_flight_batches: usize,
    /// Messages accepted by `send` but not yet acknowledged, at most;
    /// `send` waits beyond (backpressure).
    pub max_pending_messages: usize,
    /// Send a producer id and a sequence per batch, and retry batches that
    /// failed on a lost connection: the broker returns the original offsets
    /// of a batch it already stored.
    pub idempotence: bool,
    /// Retries of one batch after a transient failure (idempotence only).
    pub max_retries: u32,
    /// On a cluster, send each partition's batches to the node that leads
    /// it (asked with PARTITION_LEADERS), over a connection of the
    /// producer's own, instead of through the client's node, which would
    /// forward them. No effect on a single broker.
    pub route_to_leaders: bool,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            linger: Duration::from_millis(1),
            max_batch_messages: 1000,
            max_batch_bytes: 1024 * 1024,
            max_in_flight_batches: 16,
            max_pending_messages: 100_000,
            idempotence: false,
            max_retries: 5,
            route_to_leaders: true,
        }
    }
}
