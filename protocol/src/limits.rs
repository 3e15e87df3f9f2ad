//! The maximum record size: how large a record may be so that every frame
//! the broker builds around it fits `max_frame_bytes` (PROTOCOL.md §8).
//!
//! **A record's size** ([`record_wire_size`]) is the encoded size of the
//! three fields a record keeps for life, exactly as they appear in a
//! PRODUCE `record` and in a `delivery` (PROTOCOL.md §3.1):
//!
//! ```text
//! record_bytes = key_bytes + headers_bytes + value_bytes
//!   key_bytes     = 1                      (option tag, key absent)
//!                 | 1 + 4 + len(key)       (key present)
//!   headers_bytes = 4 + Σ (4 + len(name) + 4 + len(value))
//!   value_bytes   = 4 + len(value)
//! ```
//!
//! **The limit** ([`max_record_bytes`]): a record is accepted when
//! `record_bytes ≤ max_frame_bytes − RECORD_HEADROOM_BYTES` (1,024 bytes).
//! The headroom covers, at their largest:
//!
//! | what | bytes |
//! |---|---|
//! | frame header (length, opcode, correlation id, flags) | 11 |
//! | DELIVERIES list count (a FETCH answer holding this one record) | 4 |
//! | the delivery's other fields, with a 100-byte topic name ([`DELIVERY_FIELDS_BYTES_MAX`]) | 168 |
//! | the `dmq.dlq.*` headers a dead-letter move adds ([`DEAD_LETTER_HEADERS_BYTES_MAX`]) | 407 |
//! | kept for broker headers a later version may add | 434 |
//!
//! so a record at the limit fits its DELIVER push, a DELIVERIES frame
//! holding it alone, and the DELIVER of its dead-letter copy. The headroom is
//! part of the protocol version: it never shrinks, so a record accepted once
//! is accepted again.
//!
//! Delayed records carry `dmq.delay.*` headers only inside the broker's
//! timer log; they are removed before the record is delivered.

use crate::decode::MIN_FRAME_BYTES;
use crate::error::ErrorCode;
use crate::frame::{Delivery, ErrorResponse, ProduceRecord};

/// Bytes of a frame kept beyond the record: see the module documentation.
pub const RECORD_HEADROOM_BYTES: u32 = 1024;

/// Longest topic or group name, in bytes (PROTOCOL.md §6.5).
pub const NAME_BYTES_MAX: usize = 100;

/// Longest `dmq.dlq.reason` value the broker writes, in bytes.
pub const DEAD_LETTER_REASON_BYTES_MAX: usize = 32;

/// The headers a dead-letter move adds to the copy, with the longest value
/// each may have: topic and group names, a `u32` partition, a `u64` offset
/// and a `u32` attempt count in decimal, and the reason.
pub const DEAD_LETTER_HEADERS: [(&str, usize); 6] = [
    ("dmq.dlq.topic", NAME_BYTES_MAX),
    ("dmq.dlq.partition", 10),
    ("dmq.dlq.offset", 20),
    ("dmq.dlq.group", NAME_BYTES_MAX),
    ("dmq.dlq.attempts", 10),
    ("dmq.dlq.reason", DEAD_LETTER_REASON_BYTES_MAX),
];

/// The most bytes the [`DEAD_LETTER_HEADERS`] add to a record: 407.
pub const DEAD_LETTER_HEADERS_BYTES_MAX: u32 = dead_letter_headers_bytes();

/// The most bytes a `delivery` takes besides its record's key, headers and
/// value: subscription id 8, topic `string` 2 + 100, partition 4, offset
/// 8, attempt 4, message id 16, timestamp 8, `deliver_at_ms` and
/// `expire_at_ms` 9 each: 168.
pub const DELIVERY_FIELDS_BYTES_MAX: u32 =
    8 + 2 + NAME_BYTES_MAX as u32 + 4 + 8 + 4 + 16 + 8 + 9 + 9;

/// Bytes of a DELIVERIES frame with an empty list: header 11 + count 4.
pub const DELIVERIES_FRAME_BYTES_MIN: u32 = MIN_FRAME_BYTES as u32 + 4;

const fn dead_letter_headers_bytes() -> u32 {
    let mut total = 0;
    let mut i = 0;
    while i < DEAD_LETTER_HEADERS.len() {
        let (name, value_max) = DEAD_LETTER_HEADERS[i];
        total += 8 + name.len() + value_max;
        i += 1;
    }
    total as u32
}

// The headroom covers the worst case it is documented to cover.
const _: () = assert!(
    DELIVERIES_FRAME_BYTES_MIN + DELIVERY_FIELDS_BYTES_MAX + DEAD_LETTER_HEADERS_BYTES_MAX
        <= RECORD_HEADROOM_BYTES
);

/// The largest record (as measured by [`record_wire_size`]) a broker with
/// this maximum frame size accepts: `max_frame_bytes − 1,024`, 0 for a
/// frame limit below the headroom.
pub const fn max_record_bytes(max_frame_bytes: u32) -> u32 {
    max_frame_bytes.saturating_sub(RECORD_HEADROOM_BYTES)
}

/// A record's size: the encoded size of its key, headers and value (see
/// the module documentation). Never overflows: the sum is a `u64`.
pub fn record_wire_size<'a>(
    key: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    value: &[u8],
) -> u64 {
    let key_bytes = match key {
        Some(key) => 1 + 4 + key.len() as u64,
        None => 1,
    };
    let headers_bytes: u64 = headers
        .into_iter()
        .map(|(name, value)| 8 + name.len() as u64 + value.len() as u64)
        .sum();
    key_bytes + 4 + headers_bytes + 4 + value.len() as u64
}

/// [`record_wire_size`] of a PRODUCE record.
pub fn produce_record_size(record: &ProduceRecord) -> u64 {
    record_wire_size(
        record.key.as_deref(),
        record
            .headers
            .iter()
            .map(|header| (header.name.as_ref(), header.value.as_ref())),
        &record.value,
    )
}

/// The encoded size of one `delivery` (a DELIVER push body, or one item of
/// DELIVERIES): its fields plus its record's [`record_wire_size`].
pub fn delivery_wire_size(delivery: &Delivery) -> u64 {
    let optional_time = |time: Option<i64>| if time.is_some() { 9 } else { 1 };
    let record = record_wire_size(
        delivery.key.as_deref(),
        delivery
            .headers
            .iter()
            .map(|header| (header.name.as_ref(), header.value.as_ref())),
        &delivery.value,
    );
    8 + 2
        + delivery.topic.len() as u64
        + 4
        + 8
        + 4
        + 16
        + 8
        + record
        + optional_time(delivery.deliver_at_ms)
        + optional_time(delivery.expire_at_ms)
}

/// A record over [`max_record_bytes`]: the PRODUCE is refused whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "record {index} is {bytes} bytes (key, headers and value as encoded), more than the \
     maximum record size of {max} bytes (max_frame_bytes {max_frame_bytes} - {RECORD_HEADROOM_BYTES})"
)]
pub struct RecordTooLarge {
    /// The record's index in its batch, from 0.
    pub index: usize,
    /// Its [`record_wire_size`].
    pub bytes: u64,
    /// [`max_record_bytes`] of `max_frame_bytes`.
    pub max: u32,
    /// The frame limit the maximum derives from.
    pub max_frame_bytes: u32,
}

/// Checks every record of a PRODUCE against [`max_record_bytes`]; the first
/// one over it is the error.
pub fn check_record_sizes(
    records: &[ProduceRecord],
    max_frame_bytes: u32,
) -> Result<(), RecordTooLarge> {
    let max = max_record_bytes(max_frame_bytes);
    match records
        .iter()
        .map(produce_record_size)
        .enumerate()
        .find(|(_, bytes)| *bytes > u64::from(max))
    {
        Some((index, bytes)) => Err(RecordTooLarge {
            index,
            bytes,
            max,
            max_frame_bytes,
        }),
        None => Ok(()),
    }
}

impl From<RecordTooLarge> for ErrorResponse {
    fn from(error: RecordTooLarge) -> Self {
        ErrorResponse::new(ErrorCode::RecordTooLarge, error.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::encode::encode_frame_to_vec;
    use crate::frame::{Deliveries, Frame, Push, Response};
    use crate::types::{Header, MessageId};

    #[test]
    fn the_documented_numbers_hold() {
        assert_eq!(DEAD_LETTER_HEADERS_BYTES_MAX, 407);
        assert_eq!(DELIVERY_FIELDS_BYTES_MAX, 168);
        assert_eq!(DELIVERIES_FRAME_BYTES_MIN, 15);
        assert_eq!(max_record_bytes(16 * 1024 * 1024), 16_776_192);
        assert_eq!(max_record_bytes(1024), 0);
        assert_eq!(max_record_bytes(0), 0);
    }

    fn delivery(topic_len: usize, record: &ProduceRecord) -> Delivery {
        Delivery {
            subscription_id: u64::MAX,
            topic: "t".repeat(topic_len),
            partition: u32::MAX,
            offset: u64::MAX,
            attempt: u32::MAX,
            message_id: MessageId([0xff; 16]),
            timestamp_ms: i64::MAX,
            key: record.key.clone(),
            headers: record.headers.clone(),
            value: record.value.clone(),
            deliver_at_ms: Some(i64::MAX),
            expire_at_ms: Some(i64::MAX),
        }
    }

    /// A record of exactly `bytes` (≥ 13, with a key and one header).
    fn record_of(bytes: usize) -> ProduceRecord {
        let mut record = ProduceRecord {
            key: Some(Bytes::from_static(b"k")),
            headers: vec![Header::new("h", "v")],
            ..ProduceRecord::default()
        };
        let fixed = produce_record_size(&record) as usize;
        record.value = Bytes::from(vec![b'x'; bytes - fixed]);
        assert_eq!(produce_record_size(&record), bytes as u64);
        record
    }

    #[test]
    fn sizes_match_the_encoder() {
        for record in [
            ProduceRecord::default(),
            record_of(100),
            ProduceRecord {
                key: Some(Bytes::new()),
                headers: vec![Header::new("", ""), Header::new("name", "a value")],
                value: Bytes::from_static(b"payload"),
                ..ProduceRecord::default()
            },
        ] {
            for topic_len in [0, 1, NAME_BYTES_MAX] {
                let mut delivery = delivery(topic_len, &record);
                let push =
                    encode_frame_to_vec(&Frame::push(Push::Deliver(delivery.clone()))).unwrap();
                assert_eq!(
                    push.len() as u64,
                    MIN_FRAME_BYTES as u64 + delivery_wire_size(&delivery)
                );
                delivery.deliver_at_ms = None;
                let answer = Deliveries {
                    deliveries: vec![delivery.clone(), delivery.clone()],
                };
                let frame =
                    encode_frame_to_vec(&Frame::response(1, Response::Deliveries(answer))).unwrap();
                assert_eq!(
                    frame.len() as u64,
                    u64::from(DELIVERIES_FRAME_BYTES_MIN) + 2 * delivery_wire_size(&delivery)
                );
            }
            // The record's part of the delivery is what the record's size says.
            let empty = ProduceRecord::default();
            assert_eq!(
                delivery_wire_size(&delivery(5, &record))
                    - delivery_wire_size(&delivery(5, &empty)),
                produce_record_size(&record) - produce_record_size(&empty)
            );
        }
        // The largest delivery fields are the documented constant.
        let empty = ProduceRecord::default();
        assert_eq!(
            delivery_wire_size(&delivery(NAME_BYTES_MAX, &empty)),
            u64::from(DELIVERY_FIELDS_BYTES_MAX) + produce_record_size(&empty)
        );
    }

    #[test]
    fn a_record_at_the_limit_fits_every_frame_that_carries_it() {
        for max_frame in [64 * 1024, 1 << 20, 16 * 1024 * 1024] {
            let record = record_of(max_record_bytes(max_frame) as usize);
            assert_eq!(
                check_record_sizes(std::slice::from_ref(&record), max_frame),
                Ok(())
            );
            // Its dead-letter copy, every header at its longest.
            let mut copy = record.clone();
            for (name, value_max) in DEAD_LETTER_HEADERS {
                copy.headers.push(Header::new(name, "9".repeat(value_max)));
            }
            for carried in [&record, &copy] {
                let delivery = delivery(NAME_BYTES_MAX, carried);
                let push =
                    encode_frame_to_vec(&Frame::push(Push::Deliver(delivery.clone()))).unwrap();
                assert!(
                    push.len() <= max_frame as usize,
                    "{} > {max_frame}",
                    push.len()
                );
                let answer = Deliveries {
                    deliveries: vec![delivery],
                };
                let frame =
                    encode_frame_to_vec(&Frame::response(u32::MAX, Response::Deliveries(answer)))
                        .unwrap();
                assert!(frame.len() <= max_frame as usize);
            }
            // One byte more is refused, naming the record, its size and the limit.
            let over = record_of(max_record_bytes(max_frame) as usize + 1);
            let error = check_record_sizes(&[record, over], max_frame).unwrap_err();
            assert_eq!(
                (error.index, error.bytes, error.max),
                (
                    1,
                    u64::from(max_record_bytes(max_frame)) + 1,
                    max_record_bytes(max_frame)
                )
            );
            let response = ErrorResponse::from(error);
            assert_eq!(response.code, ErrorCode::RecordTooLarge);
            assert!(
                response
                    .message
                    .contains(&max_record_bytes(max_frame).to_string()),
                "{}",
                response.message
            );
        }
    }
}
