//! Errors: the numeric [`ErrorCode`]s carried by ERROR frames, the decoder's
//! structured [`WireError`] and the encoder's [`EncodeError`].
//!
//! Error codes are part of the wire contract: every code has an explicit
//! number that is **never renumbered and never reused**. New codes are only
//! ever appended; a retired code keeps its number (and its row in
//! PROTOCOL.md) forever. A peer that receives a number it does not know gets
//! [`ErrorCode::Unknown`] from [`ErrorCode::from_u32`], never a panic.

use thiserror::Error;

macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])* $name:ident = $value:literal, )*) => {
        /// A stable numeric error code, sent in ERROR frames.
        ///
        /// The numbers are explicit and permanent: codes are only ever added,
        /// never renumbered or reused. `0` is not a code.
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $name = $value, )*
            /// A code this build does not know (sent by a newer peer).
            Unknown(u32) = u32::MAX,
        }

        impl ErrorCode {
            /// Every known code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a number; unknown numbers give [`ErrorCode::Unknown`].
            pub fn from_u32(value: u32) -> ErrorCode {
                match value {
                    $( $value => ErrorCode::$name, )*
                    other => ErrorCode::Unknown(other),
                }
            }

            /// The number sent on the wire.
            pub fn as_u32(self) -> u32 {
                match self {
                    $( ErrorCode::$name => $value, )*
                    ErrorCode::Unknown(value) => value,
                }
            }

            /// The code's name as in PROTOCOL.md, e.g. `"UnknownTopic"`.
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                    ErrorCode::Unknown(_) => "Unknown",
                }
            }
        }
    };
}

error_codes! {
    /// The frame could not be decoded (bad length, bad field, trailing bytes).
    /// The connection is closed after the ERROR.
    MalformedFrame = 1,
    /// The frame's declared length exceeds the maximum frame size. The body
    /// is not read; the connection is closed after the ERROR.
    FrameTooLarge = 2,
    /// HELLO offered no version the broker supports.
    UnsupportedVersion = 3,
    /// A frame other than HELLO (or PING) arrived before HELLO_OK. The
    /// connection is closed after the ERROR.
    NotAuthenticated = 4,
    /// HELLO's client id and secret were rejected.
    AuthenticationFailed = 5,
    /// The client may not do this (ACL).
    NotAuthorized = 6,
    /// The topic does not exist.
    UnknownTopic = 7,
    /// The consumer group does not exist.
    UnknownGroup = 8,
    /// The subscription id is not open on this connection.
    UnknownSubscription = 9,
    /// The partition does not exist in the topic.
    UnknownPartition = 10,
    /// CREATE_TOPIC for a name that exists, whatever its settings.
    TopicExists = 11,
    /// A frame decoded whole whose content is not acceptable (bad name,
    /// zero partitions, HELLO sent twice, a response or push opcode sent by
    /// a client, ...). The connection stays open.
    InvalidRequest = 12,
    /// The broker's disk is full; nothing was written.
    DiskFull = 13,
    /// Any other storage failure; nothing was acknowledged.
    StorageError = 14,
    /// The broker is overloaded (today: too many connections, sent with
    /// correlation id 0 before closing); retry later with backoff.
    Overloaded = 15,
    /// The broker is shutting down; reconnect elsewhere or later.
    ShuttingDown = 16,
    /// ACK or NACK of a message that is not delivered to this subscription.
    NotDelivered = 17,
    /// A bug in the broker. The request may or may not have taken effect.
    InternalError = 18,
    /// The opcode is unknown to this broker (a newer client). The connection
    /// is closed after the ERROR.
    UnknownOpcode = 19,
    /// SUBSCRIBE with group settings that differ from the existing group's.
    GroupConfigConflict = 20,
    /// An idempotent PRODUCE whose sequence is out of order for its producer.
    OutOfOrderSequence = 21,
    /// The handshake did not complete in time, or the connection was idle
    /// too long; sent with correlation id 0, then the connection is closed.
    Timeout = 22,
    /// A PRODUCE (or admin test message) holding a record larger than the
    /// maximum record size (PROTOCOL.md §8); nothing was stored.
    RecordTooLarge = 23,
    /// TXN_PRODUCE, TXN_ACK or TXN_END naming no open transaction with that producer
    /// group, id and handle (and none that ended recently).
    UnknownTransaction = 24,
    /// A transaction request that contradicts its state: a begin of an id
    /// still open, a produce into an ending transaction, a COMMIT after a
    /// ROLLBACK or the reverse, a COMMIT after a failed produce of it, a
    /// TXN_ACK of a message acked already or by another open transaction,
    /// a COMMIT whose acked message was acked otherwise since.
    TransactionConflict = 25,
    /// A transaction over its configured size, or past its timeout for a
    /// produce; nothing of the request was stored.
    TransactionLimit = 26,
    /// A transactional producer fenced by a newer instance of its producer
    /// id (TXN_INIT); nothing was changed.
    ProducerFenced = 27,
    /// A cluster topic's partition took no write: no leader was reachable
    /// within the broker's write timeout (an election, or no quorum of its
    /// replicas up), or the leader took the write but its answer was lost.
    /// The message says which; in the second case the records may be
    /// stored. Retry (an idempotent producer's retry is answered from its
    /// window if the first try was stored).
    Unavailable = 28,
    /// SUBSCRIBE or FETCH of a cluster topic at a node that does not serve
    /// consumers now: one node of a cluster delivers to every group of its
    /// cluster topics at a time. The message is exactly the client address
    /// (`host:port`) of the node that does, or empty while none is known
    /// (an election): reconnect there (or retry a moment later). Sent with
    /// correlation id 0, then the connection is closed, when a node stops
    /// serving consumers while this connection is subscribed.
    WrongNode = 29,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(value) => write!(f, "Unknown({value})"),
            known => write!(f, "{}({})", known.name(), known.as_u32()),
        }
    }
}

/// Why bytes are not a valid frame. Every variant is an error of the peer,
/// never of this process; [`WireError::code`] gives the code to answer with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame ends inside `field`: it needs `need` more bytes, `have` remain
    /// in the frame. (The frame itself is complete; its content is short.)
    #[error("frame ends inside field `{field}`: need {need} bytes, have {have}")]
    UnexpectedEof {
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the frame.
        have: usize,
    },
    /// The frame (length prefix included) is larger than allowed.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Total frame size declared: 4 + the length field.
        len: u64,
        /// The configured maximum.
        max: u32,
    },
    /// The length field is smaller than the fixed header after it (7 bytes).
    #[error("frame length {len} is shorter than the 7-byte header")]
    FrameTooShort {
        /// The declared length.
        len: u32,
    },
    /// The opcode is not defined.
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u16),
    /// The body is longer than its fields.
    #[error("{extra} trailing bytes after the body of opcode {opcode:#06x}")]
    TrailingBytes {
        /// The frame's opcode.
        opcode: u16,
        /// Unread bytes.
        extra: usize,
    },
    /// A string field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A field holds a value outside its domain (an enum tag, a bool other
    /// than 0/1, a push with a non-zero correlation id, ...).
    #[error("field `{field}` has invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value read.
        value: u64,
    },
}

impl WireError {
    /// The error code a broker answers this with (then closes the connection).
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Why a frame cannot be encoded. The output buffer is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or byte string is longer than its length prefix can say.
    #[error("field `{field}` is {len} bytes, more than the {max} its prefix allows")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The prefix's maximum.
        max: usize,
    },
    /// The whole frame does not fit the u32 length field.
    #[error("frame of {len} bytes does not fit the u32 length field")]
    FrameTooLarge {
        /// Bytes after the length prefix.
        len: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_stable() {
        // Pinned numbers: changing one of these is a wire break.
        let pinned = [
            (ErrorCode::MalformedFrame, 1),
            (ErrorCode::FrameTooLarge, 2),
            (ErrorCode::UnsupportedVersion, 3),
            (ErrorCode::NotAuthenticated, 4),
            (ErrorCode::AuthenticationFailed, 5),
            (ErrorCode::NotAuthorized, 6),
            (ErrorCode::UnknownTopic, 7),
            (ErrorCode::UnknownGroup, 8),
            (ErrorCode::UnknownSubscription, 9),
            (ErrorCode::UnknownPartition, 10),
            (ErrorCode::TopicExists, 11),
            (ErrorCode::InvalidRequest, 12),
            (ErrorCode::DiskFull, 13),
            (ErrorCode::StorageError, 14),
            (ErrorCode::Overloaded, 15),
            (ErrorCode::ShuttingDown, 16),
            (ErrorCode::NotDelivered, 17),
            (ErrorCode::InternalError, 18),
            (ErrorCode::UnknownOpcode, 19),
            (ErrorCode::GroupConfigConflict, 20),
            (ErrorCode::OutOfOrderSequence, 21),
            (ErrorCode::Timeout, 22),
            (ErrorCode::RecordTooLarge, 23),
            (ErrorCode::UnknownTransaction, 24),
            (ErrorCode::TransactionConflict, 25),
            (ErrorCode::TransactionLimit, 26),
            (ErrorCode::ProducerFenced, 27),
            (ErrorCode::Unavailable, 28),
            (ErrorCode::WrongNode, 29),
        ];
        assert_eq!(pinned.len(), ErrorCode::ALL.len());
        for (code, number) in pinned {
            assert_eq!(code.as_u32(), number);
            assert_eq!(ErrorCode::from_u32(number), code);
        }
        for number in [0, 30, 1000, u32::MAX] {
            assert_eq!(ErrorCode::from_u32(number), ErrorCode::Unknown(number));
            assert_eq!(ErrorCode::from_u32(number).as_u32(), number);
        }
    }
}
