//! Test helpers shared by the index modules (compiled only for tests).
//!
//! Owns the corruption drivers: flip bits of a sealed file one at a time,
//! or truncate it at every length, and check that opening it fails.

use std::path::Path;

use crate::header::{crc32, INDEX_HEADER_LEN};
use crate::IndexError;

/// Flips each bit of the file at `path` (every bit if the file has at most
/// `max_bits` bits, else an evenly spread sample of `max_bits` of them),
/// asserting that `open` fails every time. Restores the file afterwards.
pub(crate) fn assert_every_bit_flip_fails(
    path: &Path,
    max_bits: usize,
    open: impl Fn(&Path) -> Result<(), IndexError>,
) {
    let original = std::fs::read(path).unwrap();
    let total_bits = original.len() * 8;
    let sample_bits = total_bits.min(max_bits);
    for i in 0..sample_bits {
        let bit = i * total_bits / sample_bits;
        let mut bytes = original.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(path, &bytes).unwrap();
        match open(path) {
            Err(IndexError::Corrupt { .. }) => {}
            other => panic!("flip of bit {bit} gave {other:?}, expected Corrupt"),
        }
    }
    std::fs::write(path, &original).unwrap();
    open(path).unwrap();
}

/// Truncates the file at `path` to every shorter length, asserting that
/// `open` fails each time. Restores the file afterwards.
pub(crate) fn assert_every_truncation_fails(
    path: &Path,
    open: impl Fn(&Path) -> Result<(), IndexError>,
) {
    let original = std::fs::read(path).unwrap();
    for len in 0..original.len() {
        std::fs::write(path, &original[..len]).unwrap();
        match open(path) {
            Err(IndexError::Corrupt { .. }) => {}
            other => panic!("truncation to {len} bytes gave {other:?}, expected Corrupt"),
        }
    }
    std::fs::write(path, &original).unwrap();
    open(path).unwrap();
}

/// Recomputes the CRC of a whole sealed file image in place.
pub(crate) fn rewrite_crc(bytes: &mut [u8]) {
    let mut header = [0u8; INDEX_HEADER_LEN];
    header.copy_from_slice(&bytes[..INDEX_HEADER_LEN]);
    let crc = crc32(&header, &bytes[INDEX_HEADER_LEN..]);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
}
