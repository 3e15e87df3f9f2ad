//! Protocol versions and their negotiation in HELLO.
//!
//! The client sends the range of versions it speaks; the broker answers
//! HELLO_OK with the highest version in both ranges, or ERROR
//! `UnsupportedVersion` if the ranges do not meet.

/// The version this crate speaks best.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Default maximum frame size (length prefix included): 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// The highest version in both `[client_min, client_max]` and this crate's
/// `[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]`, if any.
pub fn negotiate_version(client_min: u16, client_max: u16) -> Option<u16> {
    negotiate_between(
        client_min,
        client_max,
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    )
}

/// The highest version in both ranges, if any (an empty range, min > max,
/// meets nothing).
pub fn negotiate_between(a_min: u16, a_max: u16, b_min: u16, b_max: u16) -> Option<u16> {
    let low = a_min.max(b_min);
    let high = a_max.min(b_max);
    (low <= high).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate_version(1, 1), Some(1));
        assert_eq!(negotiate_version(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(2, 9), None);
        assert_eq!(negotiate_version(0, 0), None);
        assert_eq!(negotiate_version(3, 1), None);
        assert_eq!(negotiate_between(1, 5, 3, 7), Some(5));
        assert_eq!(negotiate_between(6, 9, 3, 7), Some(7));
    }
}
