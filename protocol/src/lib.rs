//! # dmq-protocol: the DMQ wire protocol
//!
//! A sans-IO codec: bytes in, `(Frame, consumed)` out; frames in, bytes
//! appended to a `BytesMut`. No sockets, no async, nothing of the broker's
//! storage or dispatch types. PROTOCOL.md at the repository root is the
//! byte-by-byte specification; this crate is its reference implementation.
//!
//! # Layout
//!
//! - [`frame`]: [`Frame`] = correlation id + flags + [`Body`]; the body is a
//!   [`Request`] (client → broker), a [`Response`] (broker → client,
//!   answering one request) or a [`Push`] (broker-initiated, correlation id
//!   0); [`Opcode`]s and one struct per body.
//! - [`types`]: value types shared by bodies ([`MessageId`], [`Header`],
//!   [`StartPosition`], [`GroupSettings`], ...).
//! - [`decode`]: [`decode_frame`] (nom; `Ok(None)` = read more),
//!   [`frame_len`] / [`peek_frame_len`] to reject oversize frames early.
//! - [`encode`]: [`encode_frame`], [`encode_frame_to_vec`].
//! - [`error`]: [`ErrorCode`] (stable numbers, never renumbered),
//!   [`WireError`] (structured decode errors), [`EncodeError`].
//! - [`limits`]: the maximum record size ([`max_record_bytes`]), how a
//!   record is measured ([`record_wire_size`]) and the refusal of a
//!   PRODUCE over it ([`check_record_sizes`]).
//! - [`partitioning`]: [`key_partition`], the partition of a keyed record,
//!   for clients that route produces to partition leaders.
//! - [`version`]: [`PROTOCOL_VERSION`] and [`negotiate_version`].
//! - [`fuzzing`]: the fuzz target's entry point.
//!
//! ```
//! use bytes::BytesMut;
//! use dmq_protocol::{decode_frame, encode_frame, Frame, Request, DEFAULT_MAX_FRAME_BYTES};
//!
//! let frame = Frame::request(7, Request::Ping);
//! let mut buf = BytesMut::new();
//! encode_frame(&frame, &mut buf).unwrap();
//! assert_eq!(decode_frame(&buf[..5], DEFAULT_MAX_FRAME_BYTES), Ok(None)); // read more
//! let (decoded, consumed) = decode_frame(&buf, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
//! assert_eq!((decoded, consumed), (frame, buf.len()));
//! ```

#![forbid(unsafe_code)]

mod codec;
pub mod decode;
pub mod encode;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod limits;
pub mod partitioning;
pub mod types;
pub mod version;

pub use decode::{
    decode_frame, decode_frame_bytes, frame_len, peek_frame_len, HEADER_AFTER_LENGTH_BYTES,
    LENGTH_PREFIX_BYTES, MIN_FRAME_BYTES,
};
pub use encode::{encode_frame, encode_frame_to_vec};
pub use error::{EncodeError, ErrorCode, WireError};
pub use frame::*;
pub use limits::{
    check_record_sizes, delivery_wire_size, max_record_bytes, produce_record_size,
    record_wire_size, RecordTooLarge, RECORD_HEADROOM_BYTES,
};
pub use partitioning::{key_hash, key_partition};
pub use types::*;
pub use version::{
    negotiate_between, negotiate_version, DEFAULT_MAX_FRAME_BYTES, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
