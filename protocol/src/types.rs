//! Value types shared by several frame bodies: message ids, headers, delivery
//! modes, start positions, backoff schedules, group settings, deletion
//! targets. They mirror the broker's concepts but belong to the wire: the
//! broker converts them to and from its own types.

use bytes::Bytes;
use std::fmt;

/// A message's 16-byte id: unique, and stable for the message's whole life
/// (delay, retries, dead-letter moves). Opaque to clients.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    /// 32 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl From<[u8; 16]> for MessageId {
    fn from(bytes: [u8; 16]) -> Self {
        MessageId(bytes)
    }
}

/// An application header: a name and a value, both arbitrary bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Name.
    pub name: Bytes,
    /// Value.
    pub value: Bytes,
}

impl Header {
    /// A header from anything byte-like.
    pub fn new(name: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// How a group spreads messages over its members. Wire: u8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeliveryMode {
    /// `0`: each message goes to one member of the group.
    #[default]
    Clustering,
    /// `1`: every member gets every message (a cursor per member).
    Broadcast,
}

/// Where a new group starts, or where a seek moves it. Wire: u8 tag + value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StartPosition {
    /// Tag `0`: the oldest stored message.
    #[default]
    Earliest,
    /// Tag `1`: only messages produced from now on.
    Latest,
    /// Tag `2` + i64: the first message at or after this time (ms since the
    /// Unix epoch).
    Timestamp(i64),
    /// Tag `3` + u64: this offset in every partition (clamped to what is
    /// stored).
    Offset(u64),
}

/// When a produced record becomes deliverable. Wire: u8 tag + value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeliveryTime {
    /// Tag `0`: at once.
    #[default]
    Immediate,
    /// Tag `1` + u64: this many milliseconds after the broker receives it.
    DelayMs(u64),
    /// Tag `2` + i64: at this time (ms since the Unix epoch); a time in the
    /// past means at once.
    AtMs(i64),
}

/// Delay before redelivering a message after a failed attempt. Wire: u8 tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backoff {
    /// Tag `0` + list of u64: attempt n waits `delays_ms[min(n, len) - 1]`.
    Fixed {
        /// The delays, in order.
        delays_ms: Vec<u64>,
    },
    /// Tag `1` + u64 + u64: attempt n waits `initial_ms * 2^(n-1)`, at most
    /// `max_ms`.
    Exponential {
        /// First delay.
        initial_ms: u64,
        /// Cap.
        max_ms: u64,
    },
}

/// A consumer group's delivery rules, each optional: in SUBSCRIBE, `None`
/// means "the broker's default" (or, for an existing group, "unchanged");
/// in GROUPS the broker fills every field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct GroupSettings {
    /// A delivered message not acked within this is redelivered.
    pub ack_timeout_ms: Option<u64>,
    /// Attempts before the message goes to the dead-letter topic.
    pub max_attempts: Option<u32>,
    /// Delay before a redelivery.
    pub backoff: Option<Backoff>,
    /// Cap on unacked messages per partition.
    pub max_unacked_per_partition: Option<u32>,
    /// Cap on deliveries per second for the whole group.
    pub rate_limit_per_second: Option<u32>,
    /// Dead-letter topic (default `<topic>.<group>.dlq`).
    pub dead_letter_topic: Option<String>,
}

/// One message to acknowledge or reject: its partition and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MessagePosition {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
}

/// What DELETE_MESSAGES deletes: records it covers are never delivered
/// again to any group. Wire: u8 tag + value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tombstone {
    /// Tag `0`: offsets `start..end` of one partition.
    OffsetRange {
        /// Partition.
        partition: u32,
        /// First offset deleted.
        start: u64,
        /// First offset kept.
        end: u64,
    },
    /// Tag `1`: one message, wherever it is (also a pending delayed one).
    MessageId(MessageId),
    /// Tag `2`: records whose broker timestamp is in `start_ms..end_ms`.
    TimeRange {
        /// First millisecond deleted.
        start_ms: i64,
        /// First millisecond kept.
        end_ms: i64,
    },
}
