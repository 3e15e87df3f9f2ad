//! The trace record: how message events are stored in the trace log, and
//! how they read back as [`TraceEvent`]s.
//!
//! A record is about **one message** or about a **run** of messages, in one
//! topic:
//! - *One message* (form 1): the record's key is the message's 16-byte id;
//!   it holds consecutive events of that message (a produce yields
//!   `produced` and `stored`; a flush's consecutive events of one message
//!   share a record).
//! - *A run* (form 2): messages whose ids are consecutive (same 8-byte time
//!   prefix, unique part +1 each, as the log assigns them within one append)
//!   and that had the same event at the same time, with consecutive offsets:
//!   the messages of one produce batch, one partition's deliveries of a
//!   poll, a batch of acks. The record's key is the ids' 8-byte time prefix;
//!   message `i` of the run has the unique part `first_unique + i`
//!   (wrapping) and the entries' offsets plus `i`. One record then stands
//!   for a whole batch, which is what keeps the trace cheap (a record costs
//!   two index entries and ~60 bytes of framing in the log).
//!
//! Every record carries the telemetry thread's **sequence number** of its
//! events (a run: of each message's event), which orders a message's
//! events that share a millisecond: records are written in the order of
//! their first event, so a message's later event may sit in a run that was
//! started earlier.
//!
//! So `Log::find_by_key` with the full id finds a message's own records and
//! with its time prefix the runs that may cover it; the reader compares the
//! keys (the key index stores hashes) and checks the run's range. The
//! record's own id and timestamp are the trace log's and mean nothing here.
//!
//! Value layout (integers are unsigned LEB128 varints unless marked; `zz`
//! is a zigzag-encoded signed varint; `str` is a varint length then UTF-8):
//!
//! ```text
//! value   := form:u8 topic:str [run] seq entry+             (run iff form = 2)
//! run     := first_unique:u64 LE count seq_mode:u8
//!            (seq_mode 0: every message has `seq`; 1: `count - 1` varint
//!            deltas follow `seq`, message i's number is the previous + delta)
//! entry   := kind:u8 flags:u8 time:zz
//!            [partition]          if flags & 1
//!            [offset]             if flags & 2   (of the run's first message)
//!            [group:str]          if flags & 4
//!            payload              by kind, below
//!            [reason:str]         if flags & 8
//! ```
//!
//! `count` is at least 2. `time` is the event time in ms since the epoch
//! for the first entry and the difference to the previous entry's time for
//! the others. Payloads:
//!
//! | kind | name | payload |
//! |---|---|---|
//! | 1 | produced | client id `str`, peer `addr` |
//! | 2 | stored | — |
//! | 3 | delivered | attempt, member |
//! | 4 | acked | — |
//! | 5 | nacked | retry_in_ms |
//! | 6 | redelivered | next_attempt |
//! | 7 | expired | — |
//! | 8 | deleted | — |
//! | 9 | dead_lettered | dead-letter topic `str` |
//! | 10 | delay_scheduled | due_ms `zz` |
//! | 11 | delay_fired | — |
//! | 12 | delay_cancelled | — |
//! | 13 | txn_half_stored | transaction handle |
//! | 14 | txn_committed | transaction handle |
//! | 15 | txn_rolled_back | transaction handle |
//!
//! `addr` is `4` + 4 address bytes + port `u16` LE, or `6` + 16 address
//! bytes + port `u16` LE. The produce of a batch with a 20-byte topic and
//! client id is one record of about 75 bytes of value.
//!
//! Invariants: decoding never panics; any structural error (unknown form,
//! kind or flag, truncation, bad UTF-8, a run shorter than 2, trailing
//! bytes) rejects the whole record; `decode(encode(x)) == x`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use dmq_dispatcher::{Event, EventKind};
use dmq_log_store::MessageId;

use super::TraceEvent;

/// Form of a record about one message.
const FORM_ONE: u8 = 1;
/// Form of a record about a run of messages.
const FORM_RUN: u8 = 2;

const HAS_PARTITION: u8 = 1;
const HAS_OFFSET: u8 = 2;
const HAS_GROUP: u8 = 4;
const HAS_REASON: u8 = 8;
const KNOWN_FLAGS: u8 = HAS_PARTITION | HAS_OFFSET | HAS_GROUP | HAS_REASON;

/// What happened, with its kind-specific data. `S` is `&str` when encoding
/// and `String` after decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum What<S> {
    /// The session received the message.
    Produced {
        /// The producing client.
        client_id: S,
        /// Its address.
        peer: SocketAddr,
    },
    /// The message was durable in its partition.
    Stored,
    /// Handed to a member.
    Delivered {
        /// Attempt, from 1.
        attempt: u32,
        /// The member.
        member: u64,
    },
    /// Acked by the group.
    Acked,
    /// Nacked; retried after `retry_in_ms`.
    Nacked {
        /// Delay before the retry.
        retry_in_ms: u64,
    },
    /// Scheduled for another attempt.
    Redelivered {
        /// The next attempt number.
        next_attempt: u32,
    },
    /// Expired (skipped).
    Expired,
    /// Deleted (skipped).
    Deleted,
    /// Moved to a dead-letter topic.
    DeadLettered {
        /// That topic.
        dead_letter_topic: S,
    },
    /// Stored in the delay store.
    DelayScheduled {
        /// When it becomes deliverable.
        due_ms: i64,
    },
    /// Moved from the delay store to its topic.
    DelayFired,
    /// A pending delay was cancelled.
    DelayCancelled,
    /// Stored as a half message of a transaction.
    TxnHalfStored {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction committed: in its topic (or the delay store).
    TxnCommitted {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction rolled back: never delivered.
    TxnRolledBack {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction was checked back.
    TxnChecked {
        /// The transaction's handle.
        handle: u64,
        /// Check number (from 1).
        checks: u32,
    },
}

/// One event of a record (the message id and the topic are the record's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry<S> {
    /// When (ms since the epoch).
    pub time_ms: i64,
    /// Partition, if known.
    pub partition: Option<u32>,
    /// Offset, if known.
    pub offset: Option<u64>,
    /// Group, for group events.
    pub group: Option<S>,
    /// What happened.
    pub what: What<S>,
    /// Why, in words.
    pub reason: Option<S>,
}

/// A dispatcher event as an entry (borrowing its strings); `None` for a
/// kind this broker does not know.
pub(crate) fn entry_of(event: &Event) -> Option<Entry<&str>> {
    let what = match &event.kind {
        EventKind::Delivered { attempt, member } => What::Delivered {
            attempt: *attempt,
            member: *member,
        },
        EventKind::Acked => What::Acked,
        EventKind::Nacked { retry_in_ms } => What::Nacked {
            retry_in_ms: *retry_in_ms,
        },
        EventKind::Redelivered { next_attempt } => What::Redelivered {
            next_attempt: *next_attempt,
        },
        EventKind::Expired => What::Expired,
        EventKind::Deleted => What::Deleted,
        EventKind::DeadLettered { dead_letter_topic } => What::DeadLettered {
            dead_letter_topic: dead_letter_topic.as_str(),
        },
        EventKind::DelayScheduled { due_ms } => What::DelayScheduled { due_ms: *due_ms },
        EventKind::DelayFired => What::DelayFired,
        EventKind::DelayCancelled => What::DelayCancelled,
        EventKind::TxnHalfStored { handle } => What::TxnHalfStored { handle: *handle },
        EventKind::TxnCommitted { handle } => What::TxnCommitted { handle: *handle },
        EventKind::TxnRolledBack { handle } => What::TxnRolledBack { handle: *handle },
        EventKind::TxnChecked { handle, checks } => What::TxnChecked {
            handle: *handle,
            checks: *checks,
        },
        _ => return None,
    };
    Some(Entry {
        time_ms: event.time_ms,
        partition: event.partition,
        offset: event.offset,
        group: event.group.as_deref(),
        what,
        reason: event.reason.as_deref(),
    })
}

/// Why a record value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The value ended inside a field.
    #[error("truncated trace record")]
    Truncated,
    /// A form this code does not read.
    #[error("unknown trace record form {0}")]
    Form(u8),
    /// A run of fewer than two messages.
    #[error("trace record run of {0} messages")]
    Run(u64),
    /// An unknown event kind.
    #[error("unknown trace event kind {0}")]
    Kind(u8),
    /// An unknown flag bit.
    #[error("unknown trace event flags {0:#x}")]
    Flags(u8),
    /// A varint longer than 10 bytes or out of range.
    #[error("bad varint in trace record")]
    Varint,
    /// A string that is not UTF-8.
    #[error("bad UTF-8 in trace record")]
    Utf8,
    /// An address family other than 4 and 6.
    #[error("bad address family {0}")]
    Address(u8),
    /// A value with no entry.
    #[error("trace record without events")]
    Empty,
}

/// Appends record values to one buffer (a flush's records share it).
pub(crate) struct RecordWriter<'b> {
    buf: &'b mut Vec<u8>,
    previous_time_ms: i64,
}

impl<'b> RecordWriter<'b> {
    /// Starts the value of a record about one message of `topic`, with
    /// sequence number `seq`, at the end of `buf`.
    pub(crate) fn start(buf: &'b mut Vec<u8>, topic: &str, seq: u64) -> RecordWriter<'b> {
        buf.push(FORM_ONE);
        put_str(buf, topic);
        put_varint(buf, seq);
        RecordWriter {
            buf,
            previous_time_ms: 0,
        }
    }

    /// Starts the value of a record about the run of `count` (at least 2)
    /// messages of `topic` whose unique id parts start at `first_unique`.
    /// The first message's sequence number is `seq`; `deltas` are the
    /// others' differences to their predecessor's (`count - 1` of them), or
    /// empty when every message has `seq`.
    pub(crate) fn start_run(
        buf: &'b mut Vec<u8>,
        topic: &str,
        first_unique: u64,
        count: u64,
        seq: u64,
        deltas: &[u64],
    ) -> RecordWriter<'b> {
        buf.push(FORM_RUN);
        put_str(buf, topic);
        buf.extend_from_slice(&first_unique.to_le_bytes());
        put_varint(buf, count);
        buf.push(u8::from(!deltas.is_empty()));
        put_varint(buf, seq);
        for delta in deltas {
            put_varint(buf, *delta);
        }
        RecordWriter {
            buf,
            previous_time_ms: 0,
        }
    }

    /// Appends one entry.
    pub(crate) fn entry<S: AsRef<str>>(&mut self, entry: &Entry<S>) {
        let buf = &mut *self.buf;
        let mut flags = 0;
        if entry.partition.is_some() {
            flags |= HAS_PARTITION;
        }
        if entry.offset.is_some() {
            flags |= HAS_OFFSET;
        }
        if entry.group.is_some() {
            flags |= HAS_GROUP;
        }
        if entry.reason.is_some() {
            flags |= HAS_REASON;
        }
        buf.push(kind_code(&entry.what));
        buf.push(flags);
        put_signed(buf, entry.time_ms.wrapping_sub(self.previous_time_ms));
        self.previous_time_ms = entry.time_ms;
        if let Some(partition) = entry.partition {
            put_varint(buf, u64::from(partition));
        }
        if let Some(offset) = entry.offset {
            put_varint(buf, offset);
        }
        if let Some(group) = &entry.group {
            put_str(buf, group.as_ref());
        }
        match &entry.what {
            What::Produced { client_id, peer } => {
                put_str(buf, client_id.as_ref());
                put_addr(buf, peer);
            }
            What::Delivered { attempt, member } => {
                put_varint(buf, u64::from(*attempt));
                put_varint(buf, *member);
            }
            What::Nacked { retry_in_ms } => put_varint(buf, *retry_in_ms),
            What::Redelivered { next_attempt } => put_varint(buf, u64::from(*next_attempt)),
            What::DeadLettered { dead_letter_topic } => put_str(buf, dead_letter_topic.as_ref()),
            What::DelayScheduled { due_ms } => put_signed(buf, *due_ms),
            What::TxnHalfStored { handle }
            | What::TxnCommitted { handle }
            | What::TxnRolledBack { handle } => put_varint(buf, *handle),
            What::TxnChecked { handle, checks } => {
                put_varint(buf, *handle);
                put_varint(buf, u64::from(*checks));
            }
            What::Stored
            | What::Acked
            | What::Expired
            | What::Deleted
            | What::DelayFired
            | What::DelayCancelled => {}
        }
        if let Some(reason) = &entry.reason {
            put_str(buf, reason.as_ref());
        }
    }
}

fn kind_code<S>(what: &What<S>) -> u8 {
    match what {
        What::Produced { .. } => 1,
        What::Stored => 2,
        What::Delivered { .. } => 3,
        What::Acked => 4,
        What::Nacked { .. } => 5,
        What::Redelivered { .. } => 6,
        What::Expired => 7,
        What::Deleted => 8,
        What::DeadLettered { .. } => 9,
        What::DelayScheduled { .. } => 10,
        What::DelayFired => 11,
        What::DelayCancelled => 12,
        What::TxnHalfStored { .. } => 13,
        What::TxnCommitted { .. } => 14,
        What::TxnRolledBack { .. } => 15,
        What::TxnChecked { .. } => 16,
    }
}

/// A decoded record value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// The messages' topic.
    pub topic: String,
    /// `(first_unique, count)` of a run; `None` for one message.
    pub run: Option<(u64, u64)>,
    /// Sequence number of the (first) message's events.
    pub seq: u64,
    /// A run's per-message sequence deltas (empty: all have `seq`).
    pub deltas: Vec<u64>,
    /// The events, in order (offsets are the run's first message's).
    pub entries: Vec<Entry<String>>,
}

/// Decodes a record value.
pub(crate) fn decode(value: &[u8]) -> Result<Decoded, DecodeError> {
    let mut input = Reader(value);
    let form = input.byte()?;
    let topic = input.string()?;
    let (run, seq_mode) = match form {
        FORM_ONE => (None, 0),
        FORM_RUN => {
            let mut first = [0u8; 8];
            first.copy_from_slice(input.take(8)?);
            let count = input.varint()?;
            if count < 2 {
                return Err(DecodeError::Run(count));
            }
            let mode = input.byte()?;
            if mode > 1 {
                return Err(DecodeError::Flags(mode));
            }
            (Some((u64::from_le_bytes(first), count)), mode)
        }
        other => return Err(DecodeError::Form(other)),
    };
    let seq = input.varint()?;
    let mut deltas = Vec::new();
    if let (Some((_, count)), 1) = (run, seq_mode) {
        for _ in 1..count {
            // Each delta takes at least one byte: a bogus count fails here.
            deltas.push(input.varint()?);
        }
    }
    let mut entries = Vec::new();
    let mut previous_time_ms = 0i64;
    while !input.0.is_empty() {
        let kind = input.byte()?;
        let flags = input.byte()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::Flags(flags));
        }
        let time_ms = previous_time_ms.wrapping_add(input.signed()?);
        previous_time_ms = time_ms;
        let partition = if flags & HAS_PARTITION != 0 {
            Some(input.u32()?)
        } else {
            None
        };
        let offset = if flags & HAS_OFFSET != 0 {
            Some(input.varint()?)
        } else {
            None
        };
        let group = if flags & HAS_GROUP != 0 {
            Some(input.string()?)
        } else {
            None
        };
        let what = match kind {
            1 => What::Produced {
                client_id: input.string()?,
                peer: input.addr()?,
            },
            2 => What::Stored,
            3 => What::Delivered {
                attempt: input.u32()?,
                member: input.varint()?,
            },
            4 => What::Acked,
            5 => What::Nacked {
                retry_in_ms: input.varint()?,
            },
            6 => What::Redelivered {
                next_attempt: input.u32()?,
            },
            7 => What::Expired,
            8 => What::Deleted,
            9 => What::DeadLettered {
                dead_letter_topic: input.string()?,
            },
            10 => What::DelayScheduled {
                due_ms: input.signed()?,
            },
            11 => What::DelayFired,
            12 => What::DelayCancelled,
            13 => What::TxnHalfStored {
                handle: input.varint()?,
            },
            14 => What::TxnCommitted {
                handle: input.varint()?,
            },
            15 => What::TxnRolledBack {
                handle: input.varint()?,
            },
            16 => What::TxnChecked {
                handle: input.varint()?,
                checks: u32::try_from(input.varint()?).unwrap_or(u32::MAX),
            },
            other => return Err(DecodeError::Kind(other)),
        };
        let reason = if flags & HAS_REASON != 0 {
            Some(input.string()?)
        } else {
            None
        };
        entries.push(Entry {
            time_ms,
            partition,
            offset,
            group,
            what,
            reason,
        });
    }
    if entries.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(Decoded {
        topic,
        run,
        seq,
        deltas,
        entries,
    })
}

/// The unique (non-time) part of a message id.
pub(crate) fn unique_part(id: &MessageId) -> u64 {
    let mut unique = [0u8; 8];
    unique.copy_from_slice(&id.0[8..]);
    u64::from_be_bytes(unique)
}

/// Whether `next` is the id the log assigns right after `previous` in one
/// append (same time prefix, unique part + 1).
pub(crate) fn follows(previous: &MessageId, next: &MessageId) -> bool {
    previous.0[..8] == next.0[..8] && unique_part(next) == unique_part(previous).wrapping_add(1)
}

/// A trace event with what orders it among events of the same time: its
/// sequence number and its position in its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequenced {
    pub event: TraceEvent,
    pub seq: u64,
    pub position: usize,
}

/// The events `decoded` records about message `id` (found under `key`):
/// all of them for a one-message record keyed by the id, those of the
/// covering run (offsets shifted to the message's) for a run keyed by the
/// id's time prefix, none otherwise.
pub(crate) fn events_of(id: &MessageId, key: &[u8], decoded: Decoded) -> Vec<Sequenced> {
    let index = match decoded.run {
        None if key == id.0.as_slice() => 0,
        Some((first, count)) if key == &id.0[..8] => {
            let index = unique_part(id).wrapping_sub(first);
            if index >= count {
                return Vec::new();
            }
            index
        }
        _ => return Vec::new(),
    };
    let steps = usize::try_from(index).unwrap_or(usize::MAX);
    let seq = decoded
        .deltas
        .iter()
        .take(steps)
        .fold(decoded.seq, |seq, delta| seq.wrapping_add(*delta));
    let topic = decoded.topic;
    decoded
        .entries
        .into_iter()
        .enumerate()
        .map(|(position, mut entry)| {
            entry.offset = entry.offset.map(|o| o.saturating_add(index));
            Sequenced {
                event: trace_event(&topic, entry),
                seq,
                position,
            }
        })
        .collect()
}

/// The API form of a decoded entry: kind name and detail in words.
pub(crate) fn trace_event(topic: &str, entry: Entry<String>) -> TraceEvent {
    let (kind, mut detail) = match &entry.what {
        What::Produced { client_id, peer } => (
            "produced",
            Some(format!("by client {client_id} from {peer}")),
        ),
        What::Stored => ("stored", None),
        What::Delivered { attempt, member } => (
            "delivered",
            Some(format!("attempt {attempt} to member {member}")),
        ),
        What::Acked => ("acked", None),
        What::Nacked { retry_in_ms } => ("nacked", Some(format!("retry in {retry_in_ms} ms"))),
        What::Redelivered { next_attempt } => {
            ("redelivered", Some(format!("attempt {next_attempt} next")))
        }
        What::Expired => ("expired", None),
        What::Deleted => ("deleted", None),
        What::DeadLettered { dead_letter_topic } => {
            ("dead_lettered", Some(format!("to {dead_letter_topic}")))
        }
        What::DelayScheduled { due_ms } => ("delay_scheduled", Some(format!("due at {due_ms}"))),
        What::DelayFired => ("delay_fired", None),
        What::DelayCancelled => ("delay_cancelled", None),
        What::TxnHalfStored { handle } => {
            ("txn_half_stored", Some(format!("in transaction {handle}")))
        }
        What::TxnCommitted { handle } => ("txn_committed", Some(format!("transaction {handle}"))),
        What::TxnRolledBack { handle } => {
            ("txn_rolled_back", Some(format!("transaction {handle}")))
        }
        What::TxnChecked { handle, checks } => (
            "txn_checked",
            Some(format!("check {checks} of transaction {handle}")),
        ),
    };
    if let Some(reason) = &entry.reason {
        detail = Some(match detail {
            Some(mut text) => {
                let _ = write!(text, " ({reason})");
                text
            }
            None => reason.clone(),
        });
    }
    TraceEvent {
        time_ms: entry.time_ms,
        kind: kind.to_string(),
        topic: topic.to_string(),
        partition: entry.partition,
        offset: entry.offset,
        group: entry.group,
        detail,
    }
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_signed(buf: &mut Vec<u8>, value: i64) {
    put_varint(buf, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_str(buf: &mut Vec<u8>, text: &str) {
    put_varint(buf, text.len() as u64);
    buf.extend_from_slice(text.as_bytes());
}

fn put_addr(buf: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            buf.push(4);
            buf.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.push(6);
            buf.extend_from_slice(&ip.octets());
        }
    }
    buf.extend_from_slice(&addr.port().to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Varint);
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Varint)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Varint)
    }

    fn signed(&mut self) -> Result<i64, DecodeError> {
        let raw = self.varint()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Varint)?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| DecodeError::Utf8)
    }

    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.byte()? {
            4 => {
                let mut octets = [0u8; 4];
                octets.copy_from_slice(self.take(4)?);
                IpAddr::V4(Ipv4Addr::from(octets))
            }
            6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            other => return Err(DecodeError::Address(other)),
        };
        let mut port = [0u8; 2];
        port.copy_from_slice(self.take(2)?);
        Ok(SocketAddr::new(ip, u16::from_le_bytes(port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z.\\-]{1,24}", "\\PC{0,8}"]
    }

    fn what() -> impl Strategy<Value = What<String>> {
        let addr = prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ];
        prop_oneof![
            (text(), addr).prop_map(|(client_id, peer)| What::Produced { client_id, peer }),
            Just(What::Stored),
            (any::<u32>(), any::<u64>())
                .prop_map(|(attempt, member)| What::Delivered { attempt, member }),
            Just(What::Acked),
            any::<u64>().prop_map(|retry_in_ms| What::Nacked { retry_in_ms }),
            any::<u32>().prop_map(|next_attempt| What::Redelivered { next_attempt }),
            Just(What::Expired),
            Just(What::Deleted),
            text().prop_map(|dead_letter_topic| What::DeadLettered { dead_letter_topic }),
            any::<i64>().prop_map(|due_ms| What::DelayScheduled { due_ms }),
            Just(What::DelayFired),
            Just(What::DelayCancelled),
            any::<u64>().prop_map(|handle| What::TxnHalfStored { handle }),
            any::<u64>().prop_map(|handle| What::TxnCommitted { handle }),
            any::<u64>().prop_map(|handle| What::TxnRolledBack { handle }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(handle, checks)| What::TxnChecked { handle, checks }),
        ]
    }

    fn entry() -> impl Strategy<Value = Entry<String>> {
        (
            any::<i64>(),
            any::<Option<u32>>(),
            any::<Option<u64>>(),
            proptest::option::of(text()),
            what(),
            proptest::option::of(text()),
        )
            .prop_map(|(time_ms, partition, offset, group, what, reason)| Entry {
                time_ms,
                partition,
                offset,
                group,
                what,
                reason,
            })
    }

    proptest! {
        #[test]
        fn round_trip(
            topic in text(),
            run in proptest::option::of((any::<u64>(), 2..u64::MAX)),
            deltas in proptest::collection::vec(any::<u64>(), 1..5),
            each in any::<bool>(),
            seq in any::<u64>(),
            entries in proptest::collection::vec(entry(), 1..6),
        ) {
            let mut buf = vec![0xAA]; // records share a buffer: start mid-way
            let (run, deltas) = match run {
                Some((first, _)) if each => (Some((first, deltas.len() as u64 + 1)), deltas),
                other => (other, Vec::new()),
            };
            let mut writer = match run {
                None => RecordWriter::start(&mut buf, &topic, seq),
                Some((first, count)) => {
                    RecordWriter::start_run(&mut buf, &topic, first, count, seq, &deltas)
                }
            };
            for entry in &entries {
                writer.entry(entry);
            }
            let decoded = decode(&buf[1..]);
            prop_assert_eq!(decoded, Ok(Decoded { topic, run, seq, deltas, entries }));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(topic in text(), entry in entry()) {
            let mut buf = Vec::new();
            RecordWriter::start(&mut buf, &topic, 7).entry(&entry);
            for cut in 0..buf.len() {
                // A cut at an entry boundary leaves a shorter valid record
                // only if an entry remains; there is just one here.
                prop_assert!(decode(&buf[..cut]).is_err());
            }
        }
    }

    #[test]
    fn a_produce_entry_is_small_and_renders_its_detail() {
        let mut buf = Vec::new();
        let mut writer = RecordWriter::start(&mut buf, "prod.payments.order-paid", 0);
        let peer: SocketAddr = "127.0.0.1:50123".parse().expect("addr");
        writer.entry(&Entry {
            time_ms: 1_764_246_000_000,
            partition: Some(0),
            offset: None,
            group: None,
            what: What::Produced {
                client_id: "orders-service",
                peer,
            },
            reason: None,
        });
        writer.entry(&Entry::<&str> {
            time_ms: 1_764_246_000_002,
            partition: Some(0),
            offset: Some(42),
            group: None,
            what: What::Stored,
            reason: None,
        });
        assert!(buf.len() < 70, "{} bytes", buf.len());
        let id = MessageId::new(1_764_246_000_000, 7);
        let events: Vec<TraceEvent> = events_of(&id, id.as_bytes(), decode(&buf).expect("decode"))
            .into_iter()
            .map(|s| s.event)
            .collect();
        assert_eq!(events[0].kind, "produced");
        assert_eq!(
            events[0].detail.as_deref(),
            Some("by client orders-service from 127.0.0.1:50123")
        );
        assert_eq!(events[1].kind, "stored");
        assert_eq!(events[1].offset, Some(42));
        assert_eq!(events[1].time_ms, 1_764_246_000_002);
    }

    #[test]
    fn a_run_covers_its_messages_only() {
        let first = MessageId::new(1_764_246_000_000, u64::MAX - 1); // wraps
        let mut buf = Vec::new();
        RecordWriter::start_run(&mut buf, "t", unique_part(&first), 3, 10, &[4, 1]).entry(
            &Entry::<&str> {
                time_ms: 5,
                partition: Some(2),
                offset: Some(100),
                group: Some("g"),
                what: What::Acked,
                reason: None,
            },
        );
        let decoded = decode(&buf).expect("decode");
        let prefix = &first.0[..8];
        for (unique, offset, seq) in [(u64::MAX - 1, 100, 10), (u64::MAX, 101, 14), (0, 102, 15)] {
            let id = MessageId::new(1_764_246_000_000, unique);
            let events = events_of(&id, prefix, decoded.clone());
            assert_eq!(events.len(), 1, "{unique}");
            assert_eq!(events[0].seq, seq);
            let event = &events[0].event;
            assert_eq!((event.offset, event.kind.as_str()), (Some(offset), "acked"));
            // A run is never found under a full id.
            assert!(events_of(&id, id.as_bytes(), decoded.clone()).is_empty());
        }
        for outside in [
            MessageId::new(1_764_246_000_000, 1),
            MessageId::new(1_764_246_000_001, u64::MAX),
        ] {
            assert!(events_of(&outside, prefix, decoded.clone()).is_empty());
        }
        assert!(follows(
            &first,
            &MessageId::new(1_764_246_000_000, u64::MAX)
        ));
        assert!(follows(&MessageId::new(9, u64::MAX), &MessageId::new(9, 0)));
        assert!(!follows(
            &first,
            &MessageId::new(1_764_246_000_001, u64::MAX)
        ));
        let mut short = Vec::new();
        RecordWriter::start_run(&mut short, "t", 0, 1, 0, &[]).entry(&Entry::<&str> {
            time_ms: 5,
            partition: None,
            offset: None,
            group: None,
            what: What::Acked,
            reason: None,
        });
        assert_eq!(decode(&short), Err(DecodeError::Run(1)));
    }

    #[test]
    fn reasons_join_the_detail() {
        let entry = Entry {
            time_ms: 5,
            partition: Some(1),
            offset: Some(2),
            group: Some("g".to_string()),
            what: What::DeadLettered {
                dead_letter_topic: "t.g.dlq".to_string(),
            },
            reason: Some("max attempts".to_string()),
        };
        let event = trace_event("t", entry);
        assert_eq!(event.kind, "dead_lettered");
        assert_eq!(event.detail.as_deref(), Some("to t.g.dlq (max attempts)"));
        assert_eq!(event.group.as_deref(), Some("g"));
    }
}
