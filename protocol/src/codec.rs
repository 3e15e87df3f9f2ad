//! Body encoding and decoding, one [`Wire`] impl per type with its `put`
//! (encoder) and `get` (nom decoder) side by side, so that the two cannot
//! drift apart unnoticed.
//!
//! Decoding works on one complete frame's body (the frame layer in
//! [`crate::decode`] has already checked that every byte of the frame is
//! present), so the nom parsers here are the `complete` ones: running out
//! of bytes inside a frame is an error ([`WireError::UnexpectedEof`]), not
//! "read more". Every length and list count is checked against the bytes
//! left in the frame before anything is allocated.

use bytes::{BufMut, Bytes, BytesMut};
use nom::error::{ErrorKind, ParseError};
use nom::number::complete::{le_i64, le_u16, le_u32, le_u64, le_u8};
use nom::IResult;

use crate::error::{EncodeError, ErrorCode, WireError};
use crate::frame::*;
use crate::types::*;

// ----- decoder plumbing ---------------------------------------------------------

/// The nom error type: always a structured [`WireError`].
#[derive(Debug)]
pub(crate) struct Fail(pub(crate) WireError);

impl<'a> ParseError<&'a [u8]> for Fail {
    fn from_error_kind(input: &'a [u8], _kind: ErrorKind) -> Self {
        // Only reached if a nom primitive fails despite the length checks
        // done before every call; report it as a short frame all the same.
        Fail(WireError::UnexpectedEof {
            field: "nom primitive",
            need: 0,
            have: input.len(),
        })
    }

    fn append(_: &'a [u8], _: ErrorKind, other: Self) -> Self {
        other
    }
}

/// A nom result over a frame body.
pub(crate) type PResult<'a, T> = IResult<&'a [u8], T, Fail>;

/// Stops decoding with `error`.
pub(crate) fn fail<T>(error: WireError) -> Result<T, nom::Err<Fail>> {
    Err(nom::Err::Failure(Fail(error)))
}

/// Decoding context: where byte strings come from. With a shared `Bytes`
/// buffer, byte strings are zero-copy slices of it; otherwise copies.
#[derive(Clone, Copy)]
pub(crate) struct Cx<'b> {
    /// The buffer every decoded slice points into, if shared.
    pub(crate) base: Option<&'b Bytes>,
}

impl Cx<'_> {
    fn bytes(&self, slice: &[u8]) -> Bytes {
        match self.base {
            // `slice` was cut from `&base[..]` by the parsers below.
            Some(base) => base.slice_ref(slice),
            None => Bytes::copy_from_slice(slice),
        }
    }
}

fn need(input: &[u8], field: &'static str, need: usize) -> Result<(), nom::Err<Fail>> {
    if input.len() < need {
        return fail(WireError::UnexpectedEof {
            field,
            need,
            have: input.len(),
        });
    }
    Ok(())
}

fn get_u8<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, u8> {
    need(input, field, 1)?;
    le_u8(input)
}

fn get_u16<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, u16> {
    need(input, field, 2)?;
    le_u16(input)
}

fn get_u32<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, u32> {
    need(input, field, 4)?;
    le_u32(input)
}

fn get_u64<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, u64> {
    need(input, field, 8)?;
    le_u64(input)
}

fn get_i64<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, i64> {
    need(input, field, 8)?;
    le_i64(input)
}

fn take<'a>(input: &'a [u8], field: &'static str, len: usize) -> PResult<'a, &'a [u8]> {
    need(input, field, len)?;
    nom::bytes::complete::take(len)(input)
}

fn get_bool<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, bool> {
    let (input, value) = get_u8(input, field)?;
    match value {
        0 => Ok((input, false)),
        1 => Ok((input, true)),
        other => fail(WireError::InvalidValue {
            field,
            value: u64::from(other),
        }),
    }
}

/// Short string: u16 length + UTF-8.
fn get_str<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, String> {
    let (input, len) = get_u16(input, field)?;
    let (input, raw) = take(input, field, usize::from(len))?;
    match std::str::from_utf8(raw) {
        Ok(text) => Ok((input, text.to_owned())),
        Err(_) => fail(WireError::InvalidUtf8 { field }),
    }
}

/// Byte string: u32 length + bytes.
fn get_bytes<'a>(cx: &Cx<'_>, input: &'a [u8], field: &'static str) -> PResult<'a, Bytes> {
    let (input, len) = get_u32(input, field)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let (input, raw) = take(input, field, len)?;
    Ok((input, cx.bytes(raw)))
}

/// Option: u8 tag 0 (none) or 1 (some, then the value).
fn get_opt<'a, T>(
    input: &'a [u8],
    field: &'static str,
    value: impl FnOnce(&'a [u8]) -> PResult<'a, T>,
) -> PResult<'a, Option<T>> {
    let (input, tag) = get_u8(input, field)?;
    match tag {
        0 => Ok((input, None)),
        1 => {
            let (input, value) = value(input)?;
            Ok((input, Some(value)))
        }
        other => fail(WireError::InvalidValue {
            field,
            value: u64::from(other),
        }),
    }
}

/// List: u32 count, then the items. The count is checked against the bytes
/// left (each item takes at least `T::MIN_BYTES`) before any allocation.
fn get_list<'a, T: Wire>(cx: &Cx<'_>, input: &'a [u8], field: &'static str) -> PResult<'a, Vec<T>> {
    let (mut input, count) = get_u32(input, field)?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    need(input, field, count.saturating_mul(T::MIN_BYTES))?;
    // Bounded by the frame, and capped again so that a list of large
    // structs cannot reserve much more than the frame's size.
    let mut items = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let (rest, item) = T::get(cx, input)?;
        items.push(item);
        input = rest;
    }
    Ok((input, items))
}

fn get_message_id<'a>(input: &'a [u8], field: &'static str) -> PResult<'a, MessageId> {
    let (input, raw) = take(input, field, 16)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(raw);
    Ok((input, MessageId(id)))
}

// ----- encoder plumbing ---------------------------------------------------------

/// Appends fields to a frame being encoded.
pub(crate) struct Writer<'b> {
    pub(crate) buf: &'b mut BytesMut,
}

impl Writer<'_> {
    fn u8(&mut self, value: u8) {
        self.buf.put_u8(value);
    }

    fn u16(&mut self, value: u16) {
        self.buf.put_u16_le(value);
    }

    fn u32(&mut self, value: u32) {
        self.buf.put_u32_le(value);
    }

    fn u64(&mut self, value: u64) {
        self.buf.put_u64_le(value);
    }

    fn i64(&mut self, value: i64) {
        self.buf.put_i64_le(value);
    }

    fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    fn str(&mut self, field: &'static str, value: &str) -> Result<(), EncodeError> {
        let len = u16::try_from(value.len()).map_err(|_| EncodeError::FieldTooLong {
            field,
            len: value.len(),
            max: usize::from(u16::MAX),
        })?;
        self.u16(len);
        self.buf.put_slice(value.as_bytes());
        Ok(())
    }

    fn bytes(&mut self, field: &'static str, value: &[u8]) -> Result<(), EncodeError> {
        let len = u32::try_from(value.len()).map_err(|_| EncodeError::FieldTooLong {
            field,
            len: value.len(),
            max: u32::MAX as usize,
        })?;
        self.u32(len);
        self.buf.put_slice(value);
        Ok(())
    }

    fn opt<T>(
        &mut self,
        value: Option<&T>,
        put: impl FnOnce(&mut Self, &T) -> Result<(), EncodeError>,
    ) -> Result<(), EncodeError> {
        match value {
            None => {
                self.u8(0);
                Ok(())
            }
            Some(value) => {
                self.u8(1);
                put(self, value)
            }
        }
    }

    fn opt_u32(&mut self, value: Option<u32>) {
        self.u8(u8::from(value.is_some()));
        if let Some(value) = value {
            self.u32(value);
        }
    }

    fn opt_u64(&mut self, value: Option<u64>) {
        self.u8(u8::from(value.is_some()));
        if let Some(value) = value {
            self.u64(value);
        }
    }

    fn opt_i64(&mut self, value: Option<i64>) {
        self.u8(u8::from(value.is_some()));
        if let Some(value) = value {
            self.i64(value);
        }
    }

    fn list<T: Wire>(&mut self, field: &'static str, items: &[T]) -> Result<(), EncodeError> {
        let count = u32::try_from(items.len()).map_err(|_| EncodeError::FieldTooLong {
            field,
            len: items.len(),
            max: u32::MAX as usize,
        })?;
        self.u32(count);
        for item in items {
            item.put(self)?;
        }
        Ok(())
    }

    fn message_id(&mut self, id: &MessageId) {
        self.buf.put_slice(&id.0);
    }
}

// ----- the trait ----------------------------------------------------------------

/// A type with a wire form.
pub(crate) trait Wire: Sized {
    /// The fewest bytes any value takes (bounds list counts).
    const MIN_BYTES: usize;
    /// Appends the value.
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
    /// Reads a value.
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self>;
}

impl Wire for u32 {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(*self);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        get_u32(input, "u32 item")
    }
}

impl Wire for u64 {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(*self);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        get_u64(input, "u64 item")
    }
}

impl Wire for String {
    const MIN_BYTES: usize = 2;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("string item", self)
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        get_str(input, "string item")
    }
}

// ----- shared types -------------------------------------------------------------

impl Wire for Header {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("header.name", &self.name)?;
        w.bytes("header.value", &self.value)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, name) = get_bytes(cx, input, "header.name")?;
        let (input, value) = get_bytes(cx, input, "header.value")?;
        Ok((input, Header { name, value }))
    }
}

impl Wire for DeliveryMode {
    const MIN_BYTES: usize = 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(match self {
            DeliveryMode::Clustering => 0,
            DeliveryMode::Broadcast => 1,
        });
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, tag) = get_u8(input, "mode")?;
        match tag {
            0 => Ok((input, DeliveryMode::Clustering)),
            1 => Ok((input, DeliveryMode::Broadcast)),
            other => fail(WireError::InvalidValue {
                field: "mode",
                value: u64::from(other),
            }),
        }
    }
}

impl Wire for StartPosition {
    const MIN_BYTES: usize = 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match *self {
            StartPosition::Earliest => w.u8(0),
            StartPosition::Latest => w.u8(1),
            StartPosition::Timestamp(ms) => {
                w.u8(2);
                w.i64(ms);
            }
            StartPosition::Offset(offset) => {
                w.u8(3);
                w.u64(offset);
            }
        }
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, tag) = get_u8(input, "position")?;
        match tag {
            0 => Ok((input, StartPosition::Earliest)),
            1 => Ok((input, StartPosition::Latest)),
            2 => {
                let (input, ms) = get_i64(input, "position.timestamp_ms")?;
                Ok((input, StartPosition::Timestamp(ms)))
            }
            3 => {
                let (input, offset) = get_u64(input, "position.offset")?;
                Ok((input, StartPosition::Offset(offset)))
            }
            other => fail(WireError::InvalidValue {
                field: "position",
                value: u64::from(other),
            }),
        }
    }
}

impl Wire for DeliveryTime {
    const MIN_BYTES: usize = 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match *self {
            DeliveryTime::Immediate => w.u8(0),
            DeliveryTime::DelayMs(ms) => {
                w.u8(1);
                w.u64(ms);
            }
            DeliveryTime::AtMs(ms) => {
                w.u8(2);
                w.i64(ms);
            }
        }
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, tag) = get_u8(input, "delivery_time")?;
        match tag {
            0 => Ok((input, DeliveryTime::Immediate)),
            1 => {
                let (input, ms) = get_u64(input, "delivery_time.delay_ms")?;
                Ok((input, DeliveryTime::DelayMs(ms)))
            }
            2 => {
                let (input, ms) = get_i64(input, "delivery_time.at_ms")?;
                Ok((input, DeliveryTime::AtMs(ms)))
            }
            other => fail(WireError::InvalidValue {
                field: "delivery_time",
                value: u64::from(other),
            }),
        }
    }
}

impl Wire for Backoff {
    const MIN_BYTES: usize = 5;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Backoff::Fixed { delays_ms } => {
                w.u8(0);
                w.list("backoff.delays_ms", delays_ms)
            }
            Backoff::Exponential { initial_ms, max_ms } => {
                w.u8(1);
                w.u64(*initial_ms);
                w.u64(*max_ms);
                Ok(())
            }
        }
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, tag) = get_u8(input, "backoff")?;
        match tag {
            0 => {
                let (input, delays_ms) = get_list(cx, input, "backoff.delays_ms")?;
                Ok((input, Backoff::Fixed { delays_ms }))
            }
            1 => {
                let (input, initial_ms) = get_u64(input, "backoff.initial_ms")?;
                let (input, max_ms) = get_u64(input, "backoff.max_ms")?;
                Ok((input, Backoff::Exponential { initial_ms, max_ms }))
            }
            other => fail(WireError::InvalidValue {
                field: "backoff",
                value: u64::from(other),
            }),
        }
    }
}

impl Wire for GroupSettings {
    const MIN_BYTES: usize = 6;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.opt_u64(self.ack_timeout_ms);
        w.opt_u32(self.max_attempts);
        w.opt(self.backoff.as_ref(), |w, backoff| backoff.put(w))?;
        w.opt_u32(self.max_unacked_per_partition);
        w.opt_u32(self.rate_limit_per_second);
        w.opt(self.dead_letter_topic.as_ref(), |w, topic| {
            w.str("dead_letter_topic", topic)
        })
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, ack_timeout_ms) =
            get_opt(input, "ack_timeout_ms", |i| get_u64(i, "ack_timeout_ms"))?;
        let (input, max_attempts) = get_opt(input, "max_attempts", |i| get_u32(i, "max_attempts"))?;
        let (input, backoff) = get_opt(input, "backoff", |i| Backoff::get(cx, i))?;
        let (input, max_unacked_per_partition) =
            get_opt(input, "max_unacked_per_partition", |i| {
                get_u32(i, "max_unacked_per_partition")
            })?;
        let (input, rate_limit_per_second) = get_opt(input, "rate_limit_per_second", |i| {
            get_u32(i, "rate_limit_per_second")
        })?;
        let (input, dead_letter_topic) = get_opt(input, "dead_letter_topic", |i| {
            get_str(i, "dead_letter_topic")
        })?;
        Ok((
            input,
            GroupSettings {
                ack_timeout_ms,
                max_attempts,
                backoff,
                max_unacked_per_partition,
                rate_limit_per_second,
                dead_letter_topic,
            },
        ))
    }
}

impl Wire for MessagePosition {
    const MIN_BYTES: usize = 12;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.u64(self.offset);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "message.partition")?;
        let (input, offset) = get_u64(input, "message.offset")?;
        Ok((input, MessagePosition { partition, offset }))
    }
}

impl Wire for Tombstone {
    const MIN_BYTES: usize = 17;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Tombstone::OffsetRange {
                partition,
                start,
                end,
            } => {
                w.u8(0);
                w.u32(*partition);
                w.u64(*start);
                w.u64(*end);
            }
            Tombstone::MessageId(id) => {
                w.u8(1);
                w.message_id(id);
            }
            Tombstone::TimeRange { start_ms, end_ms } => {
                w.u8(2);
                w.i64(*start_ms);
                w.i64(*end_ms);
            }
        }
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, tag) = get_u8(input, "tombstone")?;
        match tag {
            0 => {
                let (input, partition) = get_u32(input, "tombstone.partition")?;
                let (input, start) = get_u64(input, "tombstone.start")?;
                let (input, end) = get_u64(input, "tombstone.end")?;
                Ok((
                    input,
                    Tombstone::OffsetRange {
                        partition,
                        start,
                        end,
                    },
                ))
            }
            1 => {
                let (input, id) = get_message_id(input, "tombstone.message_id")?;
                Ok((input, Tombstone::MessageId(id)))
            }
            2 => {
                let (input, start_ms) = get_i64(input, "tombstone.start_ms")?;
                let (input, end_ms) = get_i64(input, "tombstone.end_ms")?;
                Ok((input, Tombstone::TimeRange { start_ms, end_ms }))
            }
            other => fail(WireError::InvalidValue {
                field: "tombstone",
                value: u64::from(other),
            }),
        }
    }
}

// ----- requests -----------------------------------------------------------------

impl Wire for Hello {
    const MIN_BYTES: usize = 10;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.min_version);
        w.u16(self.max_version);
        w.str("client_id", &self.client_id)?;
        w.bytes("secret", &self.secret)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, min_version) = get_u16(input, "min_version")?;
        let (input, max_version) = get_u16(input, "max_version")?;
        let (input, client_id) = get_str(input, "client_id")?;
        let (input, secret) = get_bytes(cx, input, "secret")?;
        Ok((
            input,
            Hello {
                min_version,
                max_version,
                client_id,
                secret,
            },
        ))
    }
}

impl Wire for ProducerSequence {
    const MIN_BYTES: usize = 16;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.producer_id);
        w.u64(self.sequence);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_id) = get_u64(input, "producer_id")?;
        let (input, sequence) = get_u64(input, "sequence")?;
        Ok((
            input,
            ProducerSequence {
                producer_id,
                sequence,
            },
        ))
    }
}

impl Wire for ProduceRecord {
    const MIN_BYTES: usize = 11;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.opt(self.key.as_ref(), |w, key| w.bytes("key", key))?;
        w.list("headers", &self.headers)?;
        w.bytes("value", &self.value)?;
        self.delivery_time.put(w)?;
        w.opt_u64(self.ttl_ms);
        Ok(())
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, key) = get_opt(input, "key", |i| get_bytes(cx, i, "key"))?;
        let (input, headers) = get_list(cx, input, "headers")?;
        let (input, value) = get_bytes(cx, input, "value")?;
        let (input, delivery_time) = DeliveryTime::get(cx, input)?;
        let (input, ttl_ms) = get_opt(input, "ttl_ms", |i| get_u64(i, "ttl_ms"))?;
        Ok((
            input,
            ProduceRecord {
                key,
                headers,
                value,
                delivery_time,
                ttl_ms,
            },
        ))
    }
}

impl Wire for Produce {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("topic", &self.topic)?;
        w.opt_u32(self.partition);
        w.opt(self.idempotence.as_ref(), |w, seq| seq.put(w))?;
        w.list("records", &self.records)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topic) = get_str(input, "topic")?;
        let (input, partition) = get_opt(input, "partition", |i| get_u32(i, "partition"))?;
        let (input, idempotence) = get_opt(input, "idempotence", |i| ProducerSequence::get(cx, i))?;
        let (input, records) = get_list(cx, input, "records")?;
        Ok((
            input,
            Produce {
                topic,
                partition,
                idempotence,
                records,
            },
        ))
    }
}

impl Wire for CancelDelay {
    const MIN_BYTES: usize = 16;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.message_id(&self.message_id);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, message_id) = get_message_id(input, "message_id")?;
        Ok((input, CancelDelay { message_id }))
    }
}

impl Wire for DeleteMessages {
    const MIN_BYTES: usize = 2 + Tombstone::MIN_BYTES;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("topic", &self.topic)?;
        self.tombstone.put(w)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topic) = get_str(input, "topic")?;
        let (input, tombstone) = Tombstone::get(cx, input)?;
        Ok((input, DeleteMessages { topic, tombstone }))
    }
}

impl Wire for Subscribe {
    const MIN_BYTES: usize = 6 + 1 + 1 + 4 + GroupSettings::MIN_BYTES;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("topic", &self.topic)?;
        w.str("group", &self.group)?;
        w.str("member_name", &self.member_name)?;
        self.mode.put(w)?;
        self.start.put(w)?;
        w.u32(self.credit);
        self.settings.put(w)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topic) = get_str(input, "topic")?;
        let (input, group) = get_str(input, "group")?;
        let (input, member_name) = get_str(input, "member_name")?;
        let (input, mode) = DeliveryMode::get(cx, input)?;
        let (input, start) = StartPosition::get(cx, input)?;
        let (input, credit) = get_u32(input, "credit")?;
        let (input, settings) = GroupSettings::get(cx, input)?;
        Ok((
            input,
            Subscribe {
                topic,
                group,
                member_name,
                mode,
                start,
                credit,
                settings,
            },
        ))
    }
}

impl Wire for Unsubscribe {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        Ok((input, Unsubscribe { subscription_id }))
    }
}

impl Wire for Credit {
    const MIN_BYTES: usize = 12;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.u32(self.credit);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, credit) = get_u32(input, "credit")?;
        Ok((
            input,
            Credit {
                subscription_id,
                credit,
            },
        ))
    }
}

impl Wire for Fetch {
    const MIN_BYTES: usize = 16;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.u32(self.max_messages);
        w.u32(self.max_wait_ms);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, max_messages) = get_u32(input, "max_messages")?;
        let (input, max_wait_ms) = get_u32(input, "max_wait_ms")?;
        Ok((
            input,
            Fetch {
                subscription_id,
                max_messages,
                max_wait_ms,
            },
        ))
    }
}

impl Wire for Ack {
    const MIN_BYTES: usize = 12;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.list("messages", &self.messages)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, messages) = get_list(cx, input, "messages")?;
        Ok((
            input,
            Ack {
                subscription_id,
                messages,
            },
        ))
    }
}

impl Wire for Nack {
    const MIN_BYTES: usize = 13;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.list("messages", &self.messages)?;
        w.opt_u64(self.delay_ms);
        Ok(())
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, messages) = get_list(cx, input, "messages")?;
        let (input, delay_ms) = get_opt(input, "delay_ms", |i| get_u64(i, "delay_ms"))?;
        Ok((
            input,
            Nack {
                subscription_id,
                messages,
                delay_ms,
            },
        ))
    }
}

impl Wire for Seek {
    const MIN_BYTES: usize = 7;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("topic", &self.topic)?;
        w.str("group", &self.group)?;
        w.opt_u32(self.partition);
        self.target.put(w)?;
        w.bool(self.dry_run);
        Ok(())
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topic) = get_str(input, "topic")?;
        let (input, group) = get_str(input, "group")?;
        let (input, partition) = get_opt(input, "partition", |i| get_u32(i, "partition"))?;
        let (input, target) = StartPosition::get(cx, input)?;
        let (input, dry_run) = get_bool(input, "dry_run")?;
        Ok((
            input,
            Seek {
                topic,
                group,
                partition,
                target,
                dry_run,
            },
        ))
    }
}

impl Wire for CreateTopic {
    const MIN_BYTES: usize = 7;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("name", &self.name)?;
        w.u32(self.partitions);
        w.bool(self.ordered);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, name) = get_str(input, "name")?;
        let (input, partitions) = get_u32(input, "partitions")?;
        let (input, ordered) = get_bool(input, "ordered")?;
        Ok((
            input,
            CreateTopic {
                name,
                partitions,
                ordered,
            },
        ))
    }
}

/// Bodies that are one short string.
macro_rules! name_body {
    ($type:ident, $field:ident) => {
        impl Wire for $type {
            const MIN_BYTES: usize = 2;
            fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                w.str(stringify!($field), &self.$field)
            }
            fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
                let (input, $field) = get_str(input, stringify!($field))?;
                Ok((input, $type { $field }))
            }
        }
    };
}

name_body!(DeleteTopic, name);
name_body!(DescribeTopic, name);
name_body!(PartitionLeaders, topic);
name_body!(ListGroups, topic);

/// Bodies that are a topic and a group.
macro_rules! topic_group_body {
    ($type:ident) => {
        impl Wire for $type {
            const MIN_BYTES: usize = 4;
            fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                w.str("topic", &self.topic)?;
                w.str("group", &self.group)
            }
            fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
                let (input, topic) = get_str(input, "topic")?;
                let (input, group) = get_str(input, "group")?;
                Ok((input, $type { topic, group }))
            }
        }
    };
}

topic_group_body!(DescribeGroup);
topic_group_body!(DeleteGroup);

// ----- responses ----------------------------------------------------------------

impl Wire for HelloOk {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.version);
        w.u32(self.max_frame_bytes);
        w.str("broker_id", &self.broker_id)
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, version) = get_u16(input, "version")?;
        let (input, max_frame_bytes) = get_u32(input, "max_frame_bytes")?;
        let (input, broker_id) = get_str(input, "broker_id")?;
        Ok((
            input,
            HelloOk {
                version,
                max_frame_bytes,
                broker_id,
            },
        ))
    }
}

impl Wire for ProducedRecord {
    const MIN_BYTES: usize = 22;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.opt_u64(self.offset);
        w.message_id(&self.message_id);
        w.opt_i64(self.deliver_at_ms);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "partition")?;
        let (input, offset) = get_opt(input, "offset", |i| get_u64(i, "offset"))?;
        let (input, message_id) = get_message_id(input, "message_id")?;
        let (input, deliver_at_ms) =
            get_opt(input, "deliver_at_ms", |i| get_i64(i, "deliver_at_ms"))?;
        Ok((
            input,
            ProducedRecord {
                partition,
                offset,
                message_id,
                deliver_at_ms,
            },
        ))
    }
}

impl Wire for ProduceOk {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.list("records", &self.records)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, records) = get_list(cx, input, "records")?;
        Ok((input, ProduceOk { records }))
    }
}

impl TxnOutcome {
    fn byte(self) -> u8 {
        match self {
            TxnOutcome::Commit => 1,
            TxnOutcome::Rollback => 2,
        }
    }
}

fn get_outcome(input: &[u8]) -> PResult<'_, TxnOutcome> {
    let (rest, byte) = get_u8(input, "outcome")?;
    match byte {
        1 => Ok((rest, TxnOutcome::Commit)),
        2 => Ok((rest, TxnOutcome::Rollback)),
        other => fail(WireError::InvalidValue {
            field: "outcome",
            value: u64::from(other),
        }),
    }
}

impl Wire for TxnProduce {
    const MIN_BYTES: usize = 2 + 2 + 8 + 2 + 1 + 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)?;
        w.str("transaction_id", &self.transaction_id)?;
        w.u64(self.handle);
        w.str("topic", &self.topic)?;
        w.opt_u32(self.partition);
        w.list("records", &self.records)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        let (input, transaction_id) = get_str(input, "transaction_id")?;
        let (input, handle) = get_u64(input, "handle")?;
        let (input, topic) = get_str(input, "topic")?;
        let (input, partition) = get_opt(input, "partition", |i| get_u32(i, "partition"))?;
        let (input, records) = get_list(cx, input, "records")?;
        Ok((
            input,
            TxnProduce {
                producer_group,
                transaction_id,
                handle,
                topic,
                partition,
                records,
            },
        ))
    }
}

impl Wire for TxnProduceSeq {
    const MIN_BYTES: usize = TxnProduce::MIN_BYTES + 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.produce.put(w)?;
        w.u32(self.sequence);
        Ok(())
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, produce) = TxnProduce::get(cx, input)?;
        let (input, sequence) = get_u32(input, "sequence")?;
        Ok((input, TxnProduceSeq { produce, sequence }))
    }
}

impl Wire for TxnEnd {
    const MIN_BYTES: usize = 2 + 2 + 8 + 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)?;
        w.str("transaction_id", &self.transaction_id)?;
        w.u64(self.handle);
        w.u8(self.outcome.byte());
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        let (input, transaction_id) = get_str(input, "transaction_id")?;
        let (input, handle) = get_u64(input, "handle")?;
        let (input, outcome) = get_outcome(input)?;
        Ok((
            input,
            TxnEnd {
                producer_group,
                transaction_id,
                handle,
                outcome,
            },
        ))
    }
}

impl Wire for TxnListen {
    const MIN_BYTES: usize = 2;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        Ok((input, TxnListen { producer_group }))
    }
}

impl Wire for TxnInit {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)?;
        w.str("producer_id", &self.producer_id)?;
        w.u32(self.epoch);
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        let (input, producer_id) = get_str(input, "producer_id")?;
        let (input, epoch) = get_u32(input, "epoch")?;
        Ok((
            input,
            TxnInit {
                producer_group,
                producer_id,
                epoch,
            },
        ))
    }
}

impl Wire for TxnAck {
    const MIN_BYTES: usize = 2 + 2 + 8 + 8 + 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)?;
        w.str("transaction_id", &self.transaction_id)?;
        w.u64(self.handle);
        w.u64(self.subscription_id);
        w.list("messages", &self.messages)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        let (input, transaction_id) = get_str(input, "transaction_id")?;
        let (input, handle) = get_u64(input, "handle")?;
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, messages) = get_list(cx, input, "messages")?;
        Ok((
            input,
            TxnAck {
                producer_group,
                transaction_id,
                handle,
                subscription_id,
                messages,
            },
        ))
    }
}

impl Wire for TxnAcked {
    const MIN_BYTES: usize = 8;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.handle);
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, handle) = get_u64(input, "handle")?;
        Ok((input, TxnAcked { handle }))
    }
}

impl Wire for TxnInitOk {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.epoch);
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, epoch) = get_u32(input, "epoch")?;
        Ok((input, TxnInitOk { epoch }))
    }
}

impl Wire for TxnCheck {
    const MIN_BYTES: usize = 2 + 2 + 8 + 8 + 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("producer_group", &self.producer_group)?;
        w.str("transaction_id", &self.transaction_id)?;
        w.u64(self.handle);
        w.i64(self.opened_ms);
        w.u32(self.checks);
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, producer_group) = get_str(input, "producer_group")?;
        let (input, transaction_id) = get_str(input, "transaction_id")?;
        let (input, handle) = get_u64(input, "handle")?;
        let (input, opened_ms) = get_i64(input, "opened_ms")?;
        let (input, checks) = get_u32(input, "checks")?;
        Ok((
            input,
            TxnCheck {
                producer_group,
                transaction_id,
                handle,
                opened_ms,
                checks,
            },
        ))
    }
}

impl Wire for TxnProduceOk {
    const MIN_BYTES: usize = 8 + 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.handle);
        w.list("records", &self.records)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, handle) = get_u64(input, "handle")?;
        let (input, records) = get_list(cx, input, "records")?;
        Ok((input, TxnProduceOk { handle, records }))
    }
}

impl Wire for TxnEnded {
    const MIN_BYTES: usize = 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(self.outcome.byte());
        Ok(())
    }
    fn get<'a>(_cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, outcome) = get_outcome(input)?;
        Ok((input, TxnEnded { outcome }))
    }
}

impl Wire for CancelDelayOk {
    const MIN_BYTES: usize = 1;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bool(self.cancelled);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, cancelled) = get_bool(input, "cancelled")?;
        Ok((input, CancelDelayOk { cancelled }))
    }
}

impl Wire for Subscribed {
    const MIN_BYTES: usize = 12;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.list("partitions", &self.partitions)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, partitions) = get_list(cx, input, "partitions")?;
        Ok((
            input,
            Subscribed {
                subscription_id,
                partitions,
            },
        ))
    }
}

impl Wire for Delivery {
    const MIN_BYTES: usize = 61;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.subscription_id);
        w.str("topic", &self.topic)?;
        w.u32(self.partition);
        w.u64(self.offset);
        w.u32(self.attempt);
        w.message_id(&self.message_id);
        w.i64(self.timestamp_ms);
        w.opt(self.key.as_ref(), |w, key| w.bytes("key", key))?;
        w.list("headers", &self.headers)?;
        w.bytes("value", &self.value)?;
        w.opt_i64(self.deliver_at_ms);
        w.opt_i64(self.expire_at_ms);
        Ok(())
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, subscription_id) = get_u64(input, "subscription_id")?;
        let (input, topic) = get_str(input, "topic")?;
        let (input, partition) = get_u32(input, "partition")?;
        let (input, offset) = get_u64(input, "offset")?;
        let (input, attempt) = get_u32(input, "attempt")?;
        let (input, message_id) = get_message_id(input, "message_id")?;
        let (input, timestamp_ms) = get_i64(input, "timestamp_ms")?;
        let (input, key) = get_opt(input, "key", |i| get_bytes(cx, i, "key"))?;
        let (input, headers) = get_list(cx, input, "headers")?;
        let (input, value) = get_bytes(cx, input, "value")?;
        let (input, deliver_at_ms) =
            get_opt(input, "deliver_at_ms", |i| get_i64(i, "deliver_at_ms"))?;
        let (input, expire_at_ms) = get_opt(input, "expire_at_ms", |i| get_i64(i, "expire_at_ms"))?;
        Ok((
            input,
            Delivery {
                subscription_id,
                topic,
                partition,
                offset,
                attempt,
                message_id,
                timestamp_ms,
                key,
                headers,
                value,
                deliver_at_ms,
                expire_at_ms,
            },
        ))
    }
}

impl Wire for Deliveries {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.list("deliveries", &self.deliveries)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, deliveries) = get_list(cx, input, "deliveries")?;
        Ok((input, Deliveries { deliveries }))
    }
}

impl Wire for SeekPartition {
    const MIN_BYTES: usize = 36;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.u64(self.old_floor);
        w.u64(self.new_floor);
        w.u64(self.redelivered);
        w.u64(self.skipped);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "partition")?;
        let (input, old_floor) = get_u64(input, "old_floor")?;
        let (input, new_floor) = get_u64(input, "new_floor")?;
        let (input, redelivered) = get_u64(input, "redelivered")?;
        let (input, skipped) = get_u64(input, "skipped")?;
        Ok((
            input,
            SeekPartition {
                partition,
                old_floor,
                new_floor,
                redelivered,
                skipped,
            },
        ))
    }
}

impl Wire for SeekReport {
    const MIN_BYTES: usize = 5;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bool(self.dry_run);
        w.list("partitions", &self.partitions)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, dry_run) = get_bool(input, "dry_run")?;
        let (input, partitions) = get_list(cx, input, "partitions")?;
        Ok((
            input,
            SeekReport {
                dry_run,
                partitions,
            },
        ))
    }
}

impl Wire for TopicSummary {
    const MIN_BYTES: usize = 7;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("name", &self.name)?;
        w.u32(self.partitions);
        w.bool(self.ordered);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, name) = get_str(input, "name")?;
        let (input, partitions) = get_u32(input, "partitions")?;
        let (input, ordered) = get_bool(input, "ordered")?;
        Ok((
            input,
            TopicSummary {
                name,
                partitions,
                ordered,
            },
        ))
    }
}

impl Wire for Topics {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.list("topics", &self.topics)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topics) = get_list(cx, input, "topics")?;
        Ok((input, Topics { topics }))
    }
}

impl Wire for PartitionInfo {
    const MIN_BYTES: usize = 36;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.u64(self.start_offset);
        w.u64(self.end_offset);
        w.u64(self.size_bytes);
        w.u64(self.disk_bytes);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "partition")?;
        let (input, start_offset) = get_u64(input, "start_offset")?;
        let (input, end_offset) = get_u64(input, "end_offset")?;
        let (input, size_bytes) = get_u64(input, "size_bytes")?;
        let (input, disk_bytes) = get_u64(input, "disk_bytes")?;
        Ok((
            input,
            PartitionInfo {
                partition,
                start_offset,
                end_offset,
                size_bytes,
                disk_bytes,
            },
        ))
    }
}

impl Wire for TopicDescription {
    const MIN_BYTES: usize = 11;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("name", &self.name)?;
        w.bool(self.ordered);
        w.list("partitions", &self.partitions)?;
        w.list("groups", &self.groups)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, name) = get_str(input, "name")?;
        let (input, ordered) = get_bool(input, "ordered")?;
        let (input, partitions) = get_list(cx, input, "partitions")?;
        let (input, groups) = get_list(cx, input, "groups")?;
        Ok((
            input,
            TopicDescription {
                name,
                ordered,
                partitions,
                groups,
            },
        ))
    }
}

impl Wire for PartitionLeader {
    const MIN_BYTES: usize = 14;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.u64(self.node_id);
        w.str("address", &self.address)
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "partition")?;
        let (input, node_id) = get_u64(input, "node_id")?;
        let (input, address) = get_str(input, "address")?;
        Ok((
            input,
            PartitionLeader {
                partition,
                node_id,
                address,
            },
        ))
    }
}

impl Wire for Leaders {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.list("partitions", &self.partitions)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partitions) = get_list(cx, input, "partitions")?;
        Ok((input, Leaders { partitions }))
    }
}

impl Wire for GroupSummary {
    const MIN_BYTES: usize = 3 + GroupSettings::MIN_BYTES;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("name", &self.name)?;
        self.mode.put(w)?;
        self.settings.put(w)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, name) = get_str(input, "name")?;
        let (input, mode) = DeliveryMode::get(cx, input)?;
        let (input, settings) = GroupSettings::get(cx, input)?;
        Ok((
            input,
            GroupSummary {
                name,
                mode,
                settings,
            },
        ))
    }
}

impl Wire for Groups {
    const MIN_BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.list("groups", &self.groups)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, groups) = get_list(cx, input, "groups")?;
        Ok((input, Groups { groups }))
    }
}

impl Wire for GroupPartition {
    const MIN_BYTES: usize = 53;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition);
        w.u64(self.ack_floor);
        w.u64(self.end_offset);
        w.u64(self.lag);
        w.u64(self.unacked);
        w.u64(self.in_flight);
        w.opt_u64(self.oldest_unacked_age_ms);
        w.u64(self.delayed);
        Ok(())
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, partition) = get_u32(input, "partition")?;
        let (input, ack_floor) = get_u64(input, "ack_floor")?;
        let (input, end_offset) = get_u64(input, "end_offset")?;
        let (input, lag) = get_u64(input, "lag")?;
        let (input, unacked) = get_u64(input, "unacked")?;
        let (input, in_flight) = get_u64(input, "in_flight")?;
        let (input, oldest_unacked_age_ms) = get_opt(input, "oldest_unacked_age_ms", |i| {
            get_u64(i, "oldest_unacked_age_ms")
        })?;
        let (input, delayed) = get_u64(input, "delayed")?;
        Ok((
            input,
            GroupPartition {
                partition,
                ack_floor,
                end_offset,
                lag,
                unacked,
                in_flight,
                oldest_unacked_age_ms,
                delayed,
            },
        ))
    }
}

impl Wire for GroupDescription {
    const MIN_BYTES: usize = 9;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.str("topic", &self.topic)?;
        w.str("group", &self.group)?;
        self.mode.put(w)?;
        w.list("partitions", &self.partitions)
    }
    fn get<'a>(cx: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, topic) = get_str(input, "topic")?;
        let (input, group) = get_str(input, "group")?;
        let (input, mode) = DeliveryMode::get(cx, input)?;
        let (input, partitions) = get_list(cx, input, "partitions")?;
        Ok((
            input,
            GroupDescription {
                topic,
                group,
                mode,
                partitions,
            },
        ))
    }
}

impl Wire for ErrorResponse {
    const MIN_BYTES: usize = 6;
    fn put(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.code.as_u32());
        w.str("message", &self.message)
    }
    fn get<'a>(_: &Cx<'_>, input: &'a [u8]) -> PResult<'a, Self> {
        let (input, code) = get_u32(input, "code")?;
        let (input, message) = get_str(input, "message")?;
        Ok((
            input,
            ErrorResponse {
                code: ErrorCode::from_u32(code),
                message,
            },
        ))
    }
}

// ----- bodies by opcode ---------------------------------------------------------

/// Appends the body of `body` (not the header).
pub(crate) fn put_body(body: &Body, w: &mut Writer<'_>) -> Result<(), EncodeError> {
    match body {
        Body::Request(request) => match request {
            Request::Hello(b) => b.put(w),
            Request::Ping | Request::ListTopics => Ok(()),
            Request::Produce(b) => b.put(w),
            Request::CancelDelay(b) => b.put(w),
            Request::TxnProduce(b) => b.put(w),
            Request::TxnEnd(b) => b.put(w),
            Request::TxnListen(b) => b.put(w),
            Request::TxnInit(b) => b.put(w),
            Request::TxnAck(b) => b.put(w),
            Request::TxnProduceSeq(b) => b.put(w),
            Request::DeleteMessages(b) => b.put(w),
            Request::Subscribe(b) => b.put(w),
            Request::Unsubscribe(b) => b.put(w),
            Request::Credit(b) => b.put(w),
            Request::Fetch(b) => b.put(w),
            Request::Ack(b) => b.put(w),
            Request::Nack(b) => b.put(w),
            Request::Seek(b) => b.put(w),
            Request::CreateTopic(b) => b.put(w),
            Request::DeleteTopic(b) => b.put(w),
            Request::DescribeTopic(b) => b.put(w),
            Request::PartitionLeaders(b) => b.put(w),
            Request::ListGroups(b) => b.put(w),
            Request::DescribeGroup(b) => b.put(w),
            Request::DeleteGroup(b) => b.put(w),
        },
        Body::Response(response) => match response {
            Response::Ok | Response::Pong => Ok(()),
            Response::HelloOk(b) => b.put(w),
            Response::ProduceOk(b) => b.put(w),
            Response::CancelDelayOk(b) => b.put(w),
            Response::TxnProduceOk(b) => b.put(w),
            Response::TxnEnded(b) => b.put(w),
            Response::TxnInitOk(b) => b.put(w),
            Response::TxnAcked(b) => b.put(w),
            Response::Subscribed(b) => b.put(w),
            Response::Deliveries(b) => b.put(w),
            Response::SeekReport(b) => b.put(w),
            Response::Topics(b) => b.put(w),
            Response::TopicDescription(b) => b.put(w),
            Response::Leaders(b) => b.put(w),
            Response::Groups(b) => b.put(w),
            Response::GroupDescription(b) => b.put(w),
            Response::Error(b) => b.put(w),
        },
        Body::Push(Push::Deliver(b)) => b.put(w),
        Body::Push(Push::TxnCheck(b)) => b.put(w),
    }
}

fn get_into<'a, T: Wire, B>(
    cx: &Cx<'_>,
    input: &'a [u8],
    wrap: impl FnOnce(T) -> B,
) -> PResult<'a, B> {
    let (input, value) = T::get(cx, input)?;
    Ok((input, wrap(value)))
}

/// Reads the body of a frame with `opcode`.
pub(crate) fn get_body<'a>(cx: &Cx<'_>, opcode: Opcode, input: &'a [u8]) -> PResult<'a, Body> {
    use Body::{Push as P, Request as Q, Response as R};
    match opcode {
        Opcode::Hello => get_into(cx, input, |b| Q(Request::Hello(b))),
        Opcode::Ping => Ok((input, Q(Request::Ping))),
        Opcode::Produce => get_into(cx, input, |b| Q(Request::Produce(b))),
        Opcode::CancelDelay => get_into(cx, input, |b| Q(Request::CancelDelay(b))),
        Opcode::TxnProduce => get_into(cx, input, |b| Q(Request::TxnProduce(b))),
        Opcode::TxnEnd => get_into(cx, input, |b| Q(Request::TxnEnd(b))),
        Opcode::TxnListen => get_into(cx, input, |b| Q(Request::TxnListen(b))),
        Opcode::TxnInit => get_into(cx, input, |b| Q(Request::TxnInit(b))),
        Opcode::TxnAck => get_into(cx, input, |b| Q(Request::TxnAck(b))),
        Opcode::TxnProduceSeq => get_into(cx, input, |b| Q(Request::TxnProduceSeq(b))),
        Opcode::DeleteMessages => get_into(cx, input, |b| Q(Request::DeleteMessages(b))),
        Opcode::Subscribe => get_into(cx, input, |b| Q(Request::Subscribe(b))),
        Opcode::Unsubscribe => get_into(cx, input, |b| Q(Request::Unsubscribe(b))),
        Opcode::Credit => get_into(cx, input, |b| Q(Request::Credit(b))),
        Opcode::Fetch => get_into(cx, input, |b| Q(Request::Fetch(b))),
        Opcode::Ack => get_into(cx, input, |b| Q(Request::Ack(b))),
        Opcode::Nack => get_into(cx, input, |b| Q(Request::Nack(b))),
        Opcode::Seek => get_into(cx, input, |b| Q(Request::Seek(b))),
        Opcode::CreateTopic => get_into(cx, input, |b| Q(Request::CreateTopic(b))),
        Opcode::DeleteTopic => get_into(cx, input, |b| Q(Request::DeleteTopic(b))),
        Opcode::ListTopics => Ok((input, Q(Request::ListTopics))),
        Opcode::DescribeTopic => get_into(cx, input, |b| Q(Request::DescribeTopic(b))),
        Opcode::PartitionLeaders => get_into(cx, input, |b| Q(Request::PartitionLeaders(b))),
        Opcode::ListGroups => get_into(cx, input, |b| Q(Request::ListGroups(b))),
        Opcode::DescribeGroup => get_into(cx, input, |b| Q(Request::DescribeGroup(b))),
        Opcode::DeleteGroup => get_into(cx, input, |b| Q(Request::DeleteGroup(b))),
        Opcode::Ok => Ok((input, R(Response::Ok))),
        Opcode::HelloOk => get_into(cx, input, |b| R(Response::HelloOk(b))),
        Opcode::Pong => Ok((input, R(Response::Pong))),
        Opcode::ProduceOk => get_into(cx, input, |b| R(Response::ProduceOk(b))),
        Opcode::CancelDelayOk => get_into(cx, input, |b| R(Response::CancelDelayOk(b))),
        Opcode::TxnProduceOk => get_into(cx, input, |b| R(Response::TxnProduceOk(b))),
        Opcode::TxnEnded => get_into(cx, input, |b| R(Response::TxnEnded(b))),
        Opcode::TxnInitOk => get_into(cx, input, |b| R(Response::TxnInitOk(b))),
        Opcode::TxnAcked => get_into(cx, input, |b| R(Response::TxnAcked(b))),
        Opcode::Subscribed => get_into(cx, input, |b| R(Response::Subscribed(b))),
        Opcode::Deliveries => get_into(cx, input, |b| R(Response::Deliveries(b))),
        Opcode::SeekReport => get_into(cx, input, |b| R(Response::SeekReport(b))),
        Opcode::Topics => get_into(cx, input, |b| R(Response::Topics(b))),
        Opcode::TopicDescription => get_into(cx, input, |b| R(Response::TopicDescription(b))),
        Opcode::Leaders => get_into(cx, input, |b| R(Response::Leaders(b))),
        Opcode::Groups => get_into(cx, input, |b| R(Response::Groups(b))),
        Opcode::GroupDescription => get_into(cx, input, |b| R(Response::GroupDescription(b))),
        Opcode::Error => get_into(cx, input, |b| R(Response::Error(b))),
        Opcode::Deliver => get_into(cx, input, |b| P(Push::Deliver(b))),
        Opcode::TxnCheck => get_into(cx, input, |b| P(Push::TxnCheck(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MIN_BYTES` is what the decoder trusts to bound list counts: it must
    /// be exactly the size of the smallest value (the `Default` one).
    fn min_size<T: Wire + Default>() -> usize {
        let mut buf = BytesMut::new();
        let mut w = Writer { buf: &mut buf };
        T::default().put(&mut w).expect("encodes");
        buf.len()
    }

    #[test]
    fn min_bytes_match_smallest_encodings() {
        assert_eq!(min_size::<Header>(), Header::MIN_BYTES);
        assert_eq!(min_size::<MessagePosition>(), MessagePosition::MIN_BYTES);
        assert_eq!(min_size::<GroupSettings>(), GroupSettings::MIN_BYTES);
        assert_eq!(min_size::<ProduceRecord>(), ProduceRecord::MIN_BYTES);
        assert_eq!(min_size::<ProducedRecord>(), ProducedRecord::MIN_BYTES);
        assert_eq!(min_size::<Delivery>(), Delivery::MIN_BYTES);
        assert_eq!(min_size::<SeekPartition>(), SeekPartition::MIN_BYTES);
        assert_eq!(min_size::<TopicSummary>(), TopicSummary::MIN_BYTES);
        assert_eq!(min_size::<PartitionInfo>(), PartitionInfo::MIN_BYTES);
        assert_eq!(min_size::<GroupSummary>(), GroupSummary::MIN_BYTES);
        assert_eq!(min_size::<GroupPartition>(), GroupPartition::MIN_BYTES);
        assert_eq!(min_size::<String>(), String::MIN_BYTES);
        assert_eq!(min_size::<u32>(), u32::MIN_BYTES);
        assert_eq!(min_size::<u64>(), u64::MIN_BYTES);
        assert_eq!(min_size::<Hello>(), Hello::MIN_BYTES);
        assert_eq!(min_size::<Produce>(), Produce::MIN_BYTES);
        assert_eq!(min_size::<Subscribe>(), Subscribe::MIN_BYTES);
        assert_eq!(min_size::<Nack>(), Nack::MIN_BYTES);
        assert_eq!(min_size::<Seek>(), Seek::MIN_BYTES);
        assert_eq!(min_size::<TopicDescription>(), TopicDescription::MIN_BYTES);
        assert_eq!(min_size::<PartitionLeader>(), PartitionLeader::MIN_BYTES);
        assert_eq!(min_size::<Leaders>(), Leaders::MIN_BYTES);
        assert_eq!(min_size::<GroupDescription>(), GroupDescription::MIN_BYTES);
        assert_eq!(min_size::<SeekReport>(), SeekReport::MIN_BYTES);
        assert_eq!(min_size::<Subscribed>(), Subscribed::MIN_BYTES);
        assert_eq!(min_size::<HelloOk>(), HelloOk::MIN_BYTES);
        assert_eq!(min_size::<TxnAck>(), TxnAck::MIN_BYTES);
        assert_eq!(min_size::<TxnProduceSeq>(), TxnProduceSeq::MIN_BYTES);
        assert_eq!(min_size::<TxnAcked>(), TxnAcked::MIN_BYTES);
    }

    #[test]
    fn list_count_is_checked_before_allocating() {
        // A u32::MAX count of u64 items in a 4-byte body.
        let body = u32::MAX.to_le_bytes();
        let cx = Cx { base: None };
        match get_list::<u64>(&cx, &body, "items") {
            Err(nom::Err::Failure(Fail(WireError::UnexpectedEof { field, have, .. }))) => {
                assert_eq!(field, "items");
                assert_eq!(have, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
