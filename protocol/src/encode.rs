//! The frame encoder: appends a frame's bytes to a `BytesMut`.

use bytes::{BufMut, BytesMut};

use crate::codec::{put_body, Writer};
use crate::decode::LENGTH_PREFIX_BYTES;
use crate::error::EncodeError;
use crate::frame::Frame;

/// Appends `frame` to `buf` and returns the bytes written (the whole frame,
/// length prefix included). On error (a string longer than its prefix
/// allows, a frame over 4 GiB) `buf` is left as it was.
///
/// A push is always written with correlation id 0, whatever
/// `frame.correlation_id` says.
///
/// The caller compares the returned size with the peer's maximum frame
/// size (HELLO_OK) if it wants to avoid sending a frame that is rejected.
pub fn encode_frame(frame: &Frame, buf: &mut BytesMut) -> Result<usize, EncodeError> {
    let start = buf.len();
    match encode_at(frame, buf, start) {
        Ok(written) => Ok(written),
        Err(error) => {
            buf.truncate(start);
            Err(error)
        }
    }
}

/// Encodes `frame` into a fresh buffer.
pub fn encode_frame_to_vec(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf)?;
    Ok(buf.to_vec())
}

fn encode_at(frame: &Frame, buf: &mut BytesMut, start: usize) -> Result<usize, EncodeError> {
    buf.put_u32_le(0); // patched below
    buf.put_u16_le(frame.opcode().as_u16());
    // Pushes always carry 0, whatever the struct says.
    let correlation_id = match frame.body {
        crate::frame::Body::Push(_) => 0,
        _ => frame.correlation_id,
    };
    buf.put_u32_le(correlation_id);
    buf.put_u8(frame.flags);
    put_body(&frame.body, &mut Writer { buf })?;
    let total = buf.len() - start;
    let len = total - LENGTH_PREFIX_BYTES;
    let len = u32::try_from(len).map_err(|_| EncodeError::FrameTooLarge { len })?;
    if let Some(prefix) = buf.get_mut(start..start + LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&len.to_le_bytes());
    }
    Ok(total)
}
