//! The client's error type, [`ClientError`], and its `Result` alias.
//!
//! Errors are `Clone` (I/O errors are shared behind an `Arc`) because one
//! failure often answers many waiters: a failed PRODUCE batch fails every
//! `send` in it, a dropped connection fails every request in flight.

use std::sync::Arc;
use std::time::Duration;

use dmq_protocol::{EncodeError, ErrorCode, Opcode, WireError};
use thiserror::Error;

/// What can go wrong talking to a broker.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker answered ERROR.
    #[error("broker error {code}: {message}")]
    Broker {
        /// The stable error code.
        code: ErrorCode,
        /// The broker's message, for people.
        message: String,
    },
    /// The first connection to the broker could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// The broker sent bytes that are not a valid frame (or a frame over
    /// the size limit). Ends the connection and every subscription.
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    /// A request could not be encoded (a field too long for its prefix).
    #[error("cannot encode request: {0}")]
    Encode(#[from] EncodeError),
    /// The broker answered with a response of the wrong kind.
    #[error("unexpected response {got:?} (expected {expected})")]
    UnexpectedResponse {
        /// What the request expects.
        expected: &'static str,
        /// What came.
        got: Opcode,
    },
    /// No answer within the request timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The connection dropped while the request was in flight; it may or
    /// may not have taken effect. The client is reconnecting.
    #[error("connection to the broker lost: {0}")]
    ConnectionLost(String),
    /// A request too large for the broker's maximum frame size.
    #[error("request of {bytes} bytes exceeds the broker's maximum frame of {max} bytes")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// The broker's maximum (HELLO_OK).
        max: u32,
    },
    /// A message larger than the broker's maximum record size
    /// (`max_frame_bytes − 1024`, PROTOCOL.md §8), refused before sending.
    #[error(
        "record of {bytes} bytes (key, headers and value as encoded) exceeds the broker's \
         maximum record size of {max} bytes"
    )]
    RecordTooLarge {
        /// The record's size as PROTOCOL.md §8 measures it.
        bytes: u64,
        /// The maximum.
        max: u32,
    },
    /// An ack or nack of a message delivered before a reconnect: the
    /// subscription was re-established, the broker redelivers the message.
    #[error("the message was delivered on a previous connection and will be redelivered")]
    StaleDelivery,
    /// A value the client refuses before sending (empty topic, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client (or the producer/consumer) is closed.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// The broker's error code, if this is a broker error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for failures a retry on a new connection may cure.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::ConnectionLost(_) | ClientError::Timeout(_) => true,
            ClientError::Broker { code, .. } => matches!(
                code,
                ErrorCode::Overloaded
                    | ErrorCode::ShuttingDown
                    | ErrorCode::Timeout
                    | ErrorCode::WrongNode
            ),
            _ => false,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        ClientError::Io(Arc::new(error))
    }
}

/// `Result` with [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
