//! The frame decoder: bytes in, `(Frame, consumed)` out.
//!
//! [`decode_frame`] separates three outcomes, as a read loop needs:
//! `Ok(None)` — the buffer holds no whole frame yet, read more;
//! `Ok(Some((frame, consumed)))` — a frame, and how many bytes to drop;
//! `Err(WireError)` — the bytes are not a valid frame: answer ERROR with
//! [`WireError::code`] and close the connection (the stream cannot be
//! resynchronised).
//!
//! The declared length is checked against `max_frame_bytes` as soon as the
//! 4-byte length prefix is there, before anything else is read or
//! allocated, so a broker can reject an oversize frame without reading its
//! body ([`frame_len`], [`peek_frame_len`]).

use bytes::Bytes;
use nom::number::streaming;

use crate::codec::{get_body, Cx, Fail};
use crate::error::WireError;
use crate::frame::{Body, Frame, Opcode};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes of the header after the length prefix: opcode, correlation id, flags.
pub const HEADER_AFTER_LENGTH_BYTES: usize = 7;
/// Bytes of a frame with an empty body: 4 + 7.
pub const MIN_FRAME_BYTES: usize = LENGTH_PREFIX_BYTES + HEADER_AFTER_LENGTH_BYTES;

/// The frame's length field, once its 4 bytes are in `buf`: the number of
/// bytes that follow the length prefix (header rest + body). The whole
/// frame is `4 + length` bytes. No check is made.
pub fn peek_frame_len(buf: &[u8]) -> Option<u32> {
    match streaming::le_u32::<_, nom::error::Error<&[u8]>>(buf) {
        Ok((_, len)) => Some(len),
        Err(_) => None,
    }
}

/// The total size of the frame starting at `buf` (length prefix included),
/// once its length prefix is there; `Ok(None)` before. Errors if the
/// declared length is below the header size or the frame exceeds
/// `max_frame_bytes`: call this first to reject an oversize frame without
/// reading its body.
pub fn frame_len(buf: &[u8], max_frame_bytes: u32) -> Result<Option<usize>, WireError> {
    let Some(len) = peek_frame_len(buf) else {
        return Ok(None);
    };
    let total = LENGTH_PREFIX_BYTES as u64 + u64::from(len);
    if total > u64::from(max_frame_bytes) {
        return Err(WireError::FrameTooLarge {
            len: total,
            max: max_frame_bytes,
        });
    }
    if (len as usize) < HEADER_AFTER_LENGTH_BYTES {
        return Err(WireError::FrameTooShort { len });
    }
    match usize::try_from(total) {
        Ok(total) => Ok(Some(total)),
        Err(_) => Err(WireError::FrameTooLarge {
            len: total,
            max: max_frame_bytes,
        }),
    }
}

/// Decodes the first frame in `buf`. Byte strings in the frame are copied;
/// see [`decode_frame_bytes`] for zero-copy decoding.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((frame, consumed)))`: a frame
/// made of `buf[..consumed]`. `Err`: invalid; close the connection.
pub fn decode_frame(buf: &[u8], max_frame_bytes: u32) -> Result<Option<(Frame, usize)>, WireError> {
    decode_with(Cx { base: None }, buf, max_frame_bytes)
}

/// Like [`decode_frame`], but keys, values and headers of the decoded frame
/// are slices of `buf` (no copy): a broker that reads into a `BytesMut`
/// can `split_to(frame_len).freeze()` and decode that.
pub fn decode_frame_bytes(
    buf: &Bytes,
    max_frame_bytes: u32,
) -> Result<Option<(Frame, usize)>, WireError> {
    decode_with(Cx { base: Some(buf) }, buf, max_frame_bytes)
}

fn decode_with(
    cx: Cx<'_>,
    buf: &[u8],
    max_frame_bytes: u32,
) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(total) = frame_len(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(LENGTH_PREFIX_BYTES..total) else {
        return Ok(None);
    };
    match parse_frame(&cx, frame) {
        Ok(frame) => Ok(Some((frame, total))),
        Err(nom::Err::Error(Fail(error)) | nom::Err::Failure(Fail(error))) => Err(error),
        // The complete parsers never ask for more: the frame is whole.
        Err(nom::Err::Incomplete(_)) => Err(WireError::UnexpectedEof {
            field: "frame",
            need: 0,
            have: frame.len(),
        }),
    }
}

/// Parses the bytes after the length prefix: header, then body.
fn parse_frame(cx: &Cx<'_>, frame: &[u8]) -> Result<Frame, nom::Err<Fail>> {
    use nom::number::complete::{le_u16, le_u32, le_u8};
    use nom::Parser;

    let (body, (opcode, correlation_id, flags)) = (le_u16, le_u32, le_u8).parse(frame)?;
    let Some(op) = Opcode::from_u16(opcode) else {
        return crate::codec::fail(WireError::UnknownOpcode(opcode));
    };
    let (rest, body) = get_body(cx, op, body)?;
    if !rest.is_empty() {
        return crate::codec::fail(WireError::TrailingBytes {
            opcode,
            extra: rest.len(),
        });
    }
    if matches!(body, Body::Push(_)) && correlation_id != 0 {
        return crate::codec::fail(WireError::InvalidValue {
            field: "correlation_id",
            value: u64::from(correlation_id),
        });
    }
    Ok(Frame {
        correlation_id,
        flags,
        body,
    })
}
