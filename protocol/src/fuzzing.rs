//! Entry points for the cargo-fuzz target `frame_decode` (and for the test
//! that replays its corpus on stable). Not part of the stable API.

use bytes::{Bytes, BytesMut};

use crate::decode::{decode_frame, decode_frame_bytes};
use crate::encode::encode_frame;

/// Maximum frame size used while fuzzing.
pub const FUZZ_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Decodes every frame in `data`, one after the other. Must never panic
/// except on a broken invariant, which the asserts below check:
/// a decoded frame re-encodes to exactly the bytes it came from (the
/// encoding is canonical), its strict prefixes are incomplete, and the
/// zero-copy decoder agrees with the copying one.
pub fn decode(data: &[u8]) {
    let shared = Bytes::copy_from_slice(data);
    let mut at = 0;
    // Every iteration consumes at least 11 bytes, so this ends.
    while let Some(rest) = data.get(at..) {
        let outcome = decode_frame(rest, FUZZ_MAX_FRAME_BYTES);
        let zero_copy = decode_frame_bytes(&shared.slice(at..), FUZZ_MAX_FRAME_BYTES);
        assert_eq!(
            outcome, zero_copy,
            "copying and zero-copy decoders disagree"
        );
        let Ok(Some((frame, consumed))) = outcome else {
            return;
        };
        assert!(consumed >= crate::decode::MIN_FRAME_BYTES && consumed <= rest.len());
        let original = &rest[..consumed];
        let mut encoded = BytesMut::new();
        let written = encode_frame(&frame, &mut encoded).expect("a decoded frame encodes");
        assert_eq!(written, consumed);
        assert_eq!(&encoded[..], original, "re-encoding differs");
        assert_eq!(
            decode_frame(&original[..consumed - 1], FUZZ_MAX_FRAME_BYTES),
            Ok(None),
            "a strict prefix is not incomplete"
        );
        at += consumed;
    }
}
