//! Message ids: 16 bytes, unique, assigned once at a message's first append
//! and kept for its whole life (delay, retry and dead-letter moves).
//!
//! Layout (big-endian so that byte order sorts by time, as ULIDs do):
//! bytes 0..8 are the first-append time in milliseconds since the Unix epoch,
//! bytes 8..16 a value from a per-log generator (a random start, then +1 per
//! message). The log relies on the time prefix: a record can only be stored at
//! or after its id's time, which lets id lookups skip older segments.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;

/// A message's unique, stable identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Builds an id from its time prefix and its unique suffix.
    pub fn new(timestamp_ms: i64, unique: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&(timestamp_ms.max(0) as u64).to_be_bytes());
        bytes[8..].copy_from_slice(&unique.to_be_bytes());
        MessageId(bytes)
    }

    /// The first-append time encoded in the id, in milliseconds.
    pub fn timestamp_ms(&self) -> i64 {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(prefix).min(i64::MAX as u64) as i64
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Error parsing a message id from its 32-hex-digit text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message id is 32 hexadecimal digits, got {0:?}")]
pub struct ParseMessageIdError(String);

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseMessageIdError(text.to_string());
        if text.len() != 32 || !text.is_ascii() {
            return Err(error());
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| error())?;
        }
        Ok(MessageId(bytes))
    }
}

/// Hands out unique ids for one log: a random 64-bit start, then +1 per id.
#[derive(Debug)]
pub(crate) struct MessageIdGenerator {
    next_unique: u64,
}

impl MessageIdGenerator {
    pub(crate) fn new() -> Self {
        // RandomState is seeded from the OS's randomness: no extra dependency.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        MessageIdGenerator { next_unique: seed }
    }

    pub(crate) fn next(&mut self, timestamp_ms: i64) -> MessageId {
        let unique = self.next_unique;
        self.next_unique = self.next_unique.wrapping_add(1);
        MessageId::new(timestamp_ms, unique)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_time_prefix() {
        let id = MessageId::new(1_700_000_000_123, 0xdead_beef);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<MessageId>(), Ok(id));
        assert_eq!(id.timestamp_ms(), 1_700_000_000_123);
        assert!("xyz".parse::<MessageId>().is_err());
        assert!("zz000000000000000000000000000000"
            .parse::<MessageId>()
            .is_err());
    }

    #[test]
    fn ids_sort_by_time_and_are_unique() {
        let mut generator = MessageIdGenerator::new();
        let a = generator.next(10);
        let b = generator.next(11);
        let c = generator.next(11);
        assert!(a < b);
        assert_ne!(b, c);
    }
}
