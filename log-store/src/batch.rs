//! The record-batch format: encoding, CRC and zero-copy decoding.
//!
//! A producer's batch is stored as one record batch: a fixed 64-byte header
//! followed by its records, all integers little-endian. `docs/storage.md`
//! specifies every byte; this module is the only code that knows them.
//!
//! Invariants checked on decode (any violation is a [`BatchError`], never a
//! panic): the magic and version match, `batch_len` covers the header and fits
//! the buffer, the CRC over bytes `12..batch_len` matches, `record_count >= 1`,
//! every record lies inside the batch, offset deltas are `0, 1, 2, ...`, no
//! unknown flag bit is set, and no byte is left over.

use bytes::Bytes;

use crate::message_id::MessageId;

/// "DMB1" in file order.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"DMB1");
/// Length of the fixed batch header.
pub const BATCH_HEADER_LEN: usize = 64;
/// The only batch format version this code writes and reads.
pub const BATCH_FORMAT_VERSION: u8 = 1;
/// Bytes of a record before its optional fields: length, offset delta,
/// timestamp, id, flags.
const RECORD_FIXED_LEN: usize = 4 + 4 + 8 + 16 + 1;

const FLAG_KEY: u8 = 1;
const FLAG_DELIVER_AT: u8 = 2;
const FLAG_EXPIRE_AT: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_KEY | FLAG_DELIVER_AT | FLAG_EXPIRE_AT;

/// Why bytes are not a valid record batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Fewer bytes than the header or the batch length needs.
    #[error("incomplete batch: need {need} bytes, have {have}")]
    Incomplete {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The first four bytes are not the batch magic (zeros mean "no batch").
    #[error("bad batch magic {found:#010x}")]
    BadMagic {
        /// What was found instead.
        found: u32,
    },
    /// A version this code does not know.
    #[error("unsupported batch format version {0}")]
    UnsupportedVersion(u8),
    /// The stored CRC does not match the bytes.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A structural rule is broken (lengths, counts, deltas, flags).
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
}

/// A record handed to [`crate::Log::append`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordInput {
    /// Keep this id (a message moved from another log); `None` assigns a new one.
    pub id: Option<MessageId>,
    /// Optional key (ordering, lookup by key).
    pub key: Option<Bytes>,
    /// Application headers, in order.
    pub headers: Vec<(Bytes, Bytes)>,
    /// The payload.
    pub value: Bytes,
    /// Deliver no earlier than this time (ms since the epoch).
    pub deliver_at_ms: Option<i64>,
    /// Never deliver after this time (ms since the epoch).
    pub expire_at_ms: Option<i64>,
}

impl RecordInput {
    /// A record with just a value.
    pub fn new(value: impl Into<Bytes>) -> Self {
        RecordInput {
            value: value.into(),
            ..RecordInput::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Bytes this record takes in a batch.
    pub fn encoded_len(&self) -> usize {
        let mut len = RECORD_FIXED_LEN;
        len += 8 * usize::from(self.deliver_at_ms.is_some());
        len += 8 * usize::from(self.expire_at_ms.is_some());
        if let Some(key) = &self.key {
            len += 4 + key.len();
        }
        len += 2;
        for (name, value) in &self.headers {
            len += 2 + name.len() + 4 + value.len();
        }
        len + 4 + self.value.len()
    }
}

/// A batch handed to [`crate::Log::append`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchInput {
    /// Producer id for idempotence (0: none).
    pub producer_id: u64,
    /// Sequence of the batch's first record for that producer.
    pub producer_seq: u64,
    /// The records, at least one.
    pub records: Vec<RecordInput>,
}

impl BatchInput {
    /// A batch without producer identity.
    pub fn new(records: Vec<RecordInput>) -> Self {
        BatchInput {
            producer_id: 0,
            producer_seq: 0,
            records,
        }
    }

    /// Bytes the encoded batch takes on disk.
    pub fn encoded_len(&self) -> usize {
        BATCH_HEADER_LEN
            + self
                .records
                .iter()
                .map(RecordInput::encoded_len)
                .sum::<usize>()
    }
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total bytes of the batch, header included.
    pub batch_len: u32,
    /// CRC32 over bytes `12..batch_len`.
    pub crc: u32,
    /// Reserved attribute bits (0 today).
    pub attributes: u16,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records (>= 1).
    pub record_count: u32,
    /// Smallest record timestamp.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
    /// Producer id (0: none).
    pub producer_id: u64,
    /// Producer sequence of the first record.
    pub producer_seq: u64,
}

impl BatchHeader {
    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count) - 1
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Reads and sanity-checks a batch header without verifying the CRC.
///
/// `buf` starts at the batch; it may hold more (the rest of a segment) or, for
/// [`BatchError::Incomplete`], less than the whole batch.
pub fn decode_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    if buf.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Incomplete {
            need: BATCH_HEADER_LEN,
            have: buf.len(),
        });
    }
    let magic = u32_at(buf, 0);
    if magic != BATCH_MAGIC {
        return Err(BatchError::BadMagic { found: magic });
    }
    let version = buf[12];
    if version != BATCH_FORMAT_VERSION {
        return Err(BatchError::UnsupportedVersion(version));
    }
    let header = BatchHeader {
        batch_len: u32_at(buf, 4),
        crc: u32_at(buf, 8),
        attributes: u16_at(buf, 14),
        base_offset: u64_at(buf, 16),
        record_count: u32_at(buf, 24),
        first_timestamp_ms: u64_at(buf, 32) as i64,
        max_timestamp_ms: u64_at(buf, 40) as i64,
        producer_id: u64_at(buf, 48),
        producer_seq: u64_at(buf, 56),
    };
    let min_len = BATCH_HEADER_LEN + RECORD_FIXED_LEN + 2 + 4;
    if (header.batch_len as usize) < min_len {
        return Err(BatchError::Malformed(
            "batch length shorter than one record",
        ));
    }
    if header.record_count == 0 {
        return Err(BatchError::Malformed("record count is zero"));
    }
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return Err(BatchError::Malformed("offsets overflow"));
    }
    if buf[13] != 0 || u32_at(buf, 28) != 0 {
        return Err(BatchError::Malformed("reserved header bytes are not zero"));
    }
    if header.first_timestamp_ms > header.max_timestamp_ms {
        return Err(BatchError::Malformed("first timestamp after max timestamp"));
    }
    Ok(header)
}

/// CRC32 of a batch's covered bytes (`12..`).
fn batch_crc(batch: &[u8]) -> u32 {
    crc32fast::hash(&batch[12..])
}

/// Decodes the header and verifies the CRC of the batch at the start of `buf`.
/// Returns the header; the batch is `buf[..header.batch_len]`.
pub fn verify_batch(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = decode_header(buf)?;
    let len = header.batch_len as usize;
    if buf.len() < len {
        return Err(BatchError::Incomplete {
            need: len,
            have: buf.len(),
        });
    }
    let computed = batch_crc(&buf[..len]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// Appends the encoding of one batch to `out`.
///
/// `ids` holds one id per record. Every record gets `timestamp_ms`.
pub(crate) fn encode_batch(
    out: &mut Vec<u8>,
    base_offset: u64,
    timestamp_ms: i64,
    batch: &BatchInput,
    ids: &[MessageId],
) {
    assert_eq!(ids.len(), batch.records.len());
    assert!(!batch.records.is_empty());
    let start = out.len();
    let batch_len = batch.encoded_len();
    let record_count = u32::try_from(batch.records.len()).expect("record count fits u32");
    let batch_len_u32 = u32::try_from(batch_len).expect("batch length fits u32");
    out.reserve(batch_len);
    out.extend_from_slice(&BATCH_MAGIC.to_le_bytes());
    out.extend_from_slice(&batch_len_u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // CRC, filled below
    out.push(BATCH_FORMAT_VERSION);
    out.push(0);
    out.extend_from_slice(&0u16.to_le_bytes()); // attributes
    out.extend_from_slice(&base_offset.to_le_bytes());
    out.extend_from_slice(&record_count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&batch.producer_id.to_le_bytes());
    out.extend_from_slice(&batch.producer_seq.to_le_bytes());
    debug_assert_eq!(out.len() - start, BATCH_HEADER_LEN);
    for (delta, (record, id)) in batch.records.iter().zip(ids).enumerate() {
        let record_start = out.len();
        let body_len = u32::try_from(record.encoded_len() - 4).expect("record fits u32");
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&(delta as u32).to_le_bytes());
        out.extend_from_slice(&timestamp_ms.to_le_bytes());
        out.extend_from_slice(id.as_bytes());
        let mut flags = 0u8;
        if record.key.is_some() {
            flags |= FLAG_KEY;
        }
        if record.deliver_at_ms.is_some() {
            flags |= FLAG_DELIVER_AT;
        }
        if record.expire_at_ms.is_some() {
            flags |= FLAG_EXPIRE_AT;
        }
        out.push(flags);
        if let Some(deliver_at) = record.deliver_at_ms {
            out.extend_from_slice(&deliver_at.to_le_bytes());
        }
        if let Some(expire_at) = record.expire_at_ms {
            out.extend_from_slice(&expire_at.to_le_bytes());
        }
        if let Some(key) = &record.key {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
        }
        let header_count = u16::try_from(record.headers.len()).expect("header count fits u16");
        out.extend_from_slice(&header_count.to_le_bytes());
        for (name, value) in &record.headers {
            let name_len = u16::try_from(name.len()).expect("header name fits u16");
            out.extend_from_slice(&name_len.to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&record.value);
        debug_assert_eq!(out.len() - record_start, record.encoded_len());
    }
    assert_eq!(out.len() - start, batch_len);
    let crc = batch_crc(&out[start..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the limits [`encode_batch`] relies on; the log calls it before
/// assigning offsets so that a bad batch is an error, not a panic.
pub(crate) fn validate_input(batch: &BatchInput) -> Result<(), &'static str> {
    if batch.records.is_empty() {
        return Err("a batch needs at least one record");
    }
    if u32::try_from(batch.records.len()).is_err() {
        return Err("too many records in one batch");
    }
    for record in &batch.records {
        if record.headers.len() > usize::from(u16::MAX) {
            return Err("more than 65535 headers in one record");
        }
        if record
            .headers
            .iter()
            .any(|(name, _)| name.len() > usize::from(u16::MAX))
        {
            return Err("a header name is longer than 65535 bytes");
        }
    }
    if u32::try_from(batch.encoded_len()).is_err() {
        return Err("batch longer than 4 GiB");
    }
    Ok(())
}

/// One record of a verified batch; byte fields share the batch's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its partition.
    pub offset: u64,
    /// Broker timestamp (ms since the epoch).
    pub timestamp_ms: i64,
    /// Stable message id.
    pub id: MessageId,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Application headers.
    pub headers: Vec<(Bytes, Bytes)>,
    /// The payload.
    pub value: Bytes,
    /// Deliver no earlier than this time.
    pub deliver_at_ms: Option<i64>,
    /// Never deliver after this time.
    pub expire_at_ms: Option<i64>,
}

/// A CRC-verified record batch, sharing its bytes with the segment mapping.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Verifies `bytes` (exactly one batch: header, CRC and every record).
    pub fn decode(bytes: Bytes) -> Result<Self, BatchError> {
        let header = verify_batch(&bytes)?;
        if header.batch_len as usize != bytes.len() {
            return Err(BatchError::Malformed("bytes after the batch"));
        }
        let batch = RecordBatch { header, bytes };
        // Walk every record once so that iteration cannot meet a bad one.
        let mut count = 0u32;
        for record in batch.records() {
            record?;
            count += 1;
        }
        if count != header.record_count {
            return Err(BatchError::Malformed("record count does not match records"));
        }
        Ok(batch)
    }

    /// Wraps bytes whose header and CRC the caller has just verified with
    /// [`verify_batch`] (avoids computing the CRC twice on the read path).
    pub(crate) fn from_verified(header: BatchHeader, bytes: Bytes) -> Self {
        debug_assert_eq!(header.batch_len as usize, bytes.len());
        RecordBatch { header, bytes }
    }

    /// The batch header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The whole batch as stored (header included).
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        self.header.base_offset
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.header.last_offset()
    }

    /// The record at `offset`, reached by skipping the records before it by
    /// their lengths (no decoding); `None` if the batch does not hold it.
    pub fn record(&self, offset: u64) -> Option<Result<Record, BatchError>> {
        if offset < self.header.base_offset || offset > self.header.last_offset() {
            return None;
        }
        let skip = offset - self.header.base_offset;
        let mut position = BATCH_HEADER_LEN;
        for _ in 0..skip {
            let next = self
                .bytes
                .get(position..position + 4)
                .map(|len| u32_at(len, 0) as usize)
                .and_then(|len| (position + 4).checked_add(len))
                .filter(|next| *next <= self.bytes.len());
            match next {
                Some(next) => position = next,
                None => return Some(Err(BatchError::Malformed("record runs past the batch"))),
            }
        }
        let mut records = RecordIter {
            batch: self,
            position,
            delta: skip as u32,
        };
        records.next()
    }

    /// Iterates the records; each item is a `Result` only because the walk
    /// re-checks bounds (a verified batch never yields an error).
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter {
            batch: self,
            position: BATCH_HEADER_LEN,
            delta: 0,
        }
    }
}

/// Iterator over a batch's records.
#[derive(Debug)]
pub struct RecordIter<'a> {
    batch: &'a RecordBatch,
    position: usize,
    delta: u32,
}

/// Bounds-checked reader over one record's bytes.
struct Cursor<'a> {
    bytes: &'a Bytes,
    at: usize,
    end: usize,
}

impl Cursor<'_> {
    fn take(&mut self, len: usize) -> Result<usize, BatchError> {
        let start = self.at;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.end)
            .ok_or(BatchError::Malformed("record field runs past the record"))?;
        self.at = end;
        Ok(start)
    }

    fn u16(&mut self) -> Result<u16, BatchError> {
        let at = self.take(2)?;
        Ok(u16_at(self.bytes, at))
    }

    fn u32(&mut self) -> Result<u32, BatchError> {
        let at = self.take(4)?;
        Ok(u32_at(self.bytes, at))
    }

    fn i64(&mut self) -> Result<i64, BatchError> {
        let at = self.take(8)?;
        Ok(u64_at(self.bytes, at) as i64)
    }

    fn slice(&mut self, len: usize) -> Result<Bytes, BatchError> {
        let at = self.take(len)?;
        Ok(self.bytes.slice(at..at + len))
    }
}

impl RecordIter<'_> {
    fn decode_next(&mut self) -> Result<Record, BatchError> {
        let bytes = &self.batch.bytes;
        let header = &self.batch.header;
        if self.position + 4 > bytes.len() {
            return Err(BatchError::Malformed("record length runs past the batch"));
        }
        let body_len = u32_at(bytes, self.position) as usize;
        let end = (self.position + 4)
            .checked_add(body_len)
            .filter(|end| *end <= bytes.len())
            .ok_or(BatchError::Malformed("record runs past the batch"))?;
        let mut cursor = Cursor {
            bytes,
            at: self.position + 4,
            end,
        };
        let offset_delta = cursor.u32()?;
        if offset_delta != self.delta {
            return Err(BatchError::Malformed("offset deltas are not 0, 1, 2, ..."));
        }
        let timestamp_ms = cursor.i64()?;
        let id_at = cursor.take(16)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[id_at..id_at + 16]);
        let flags_at = cursor.take(1)?;
        let flags = bytes[flags_at];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(BatchError::Malformed("unknown record flag"));
        }
        let deliver_at_ms = if flags & FLAG_DELIVER_AT != 0 {
            Some(cursor.i64()?)
        } else {
            None
        };
        let expire_at_ms = if flags & FLAG_EXPIRE_AT != 0 {
            Some(cursor.i64()?)
        } else {
            None
        };
        let key = if flags & FLAG_KEY != 0 {
            let len = cursor.u32()? as usize;
            Some(cursor.slice(len)?)
        } else {
            None
        };
        let header_count = cursor.u16()?;
        let mut headers = Vec::with_capacity(usize::from(header_count).min(64));
        for _ in 0..header_count {
            let name_len = usize::from(cursor.u16()?);
            let name = cursor.slice(name_len)?;
            let value_len = cursor.u32()? as usize;
            let value = cursor.slice(value_len)?;
            headers.push((name, value));
        }
        let value_len = cursor.u32()? as usize;
        let value = cursor.slice(value_len)?;
        if cursor.at != end {
            return Err(BatchError::Malformed("bytes left over in a record"));
        }
        if timestamp_ms < header.first_timestamp_ms || timestamp_ms > header.max_timestamp_ms {
            return Err(BatchError::Malformed(
                "record timestamp outside the batch's range",
            ));
        }
        self.position = end;
        self.delta += 1;
        Ok(Record {
            offset: header.base_offset + u64::from(offset_delta),
            timestamp_ms,
            id: MessageId(id),
            key,
            headers,
            value,
            deliver_at_ms,
            expire_at_ms,
        })
    }
}

impl Iterator for RecordIter<'_> {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.delta >= self.batch.header.record_count {
            if self.position != self.batch.bytes.len() && self.delta != u32::MAX {
                self.delta = u32::MAX;
                return Some(Err(BatchError::Malformed("bytes after the last record")));
            }
            return None;
        }
        match self.decode_next() {
            Ok(record) => Some(Ok(record)),
            Err(error) => {
                self.delta = u32::MAX; // stop after the first error
                self.position = self.batch.bytes.len();
                Some(Err(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BatchInput {
        BatchInput {
            producer_id: 7,
            producer_seq: 42,
            records: vec![
                RecordInput::new("hello").with_key("k1"),
                RecordInput {
                    id: None,
                    key: None,
                    headers: vec![(Bytes::from("h"), Bytes::from("v"))],
                    value: Bytes::from(vec![1u8; 300]),
                    deliver_at_ms: Some(99),
                    expire_at_ms: Some(1234),
                },
                RecordInput::new(Bytes::new()),
            ],
        }
    }

    fn encode(batch: &BatchInput) -> (Vec<u8>, Vec<MessageId>) {
        let ids: Vec<MessageId> = (0..batch.records.len())
            .map(|i| MessageId::new(1000, i as u64))
            .collect();
        let mut out = Vec::new();
        encode_batch(&mut out, 500, 1000, batch, &ids);
        (out, ids)
    }

    #[test]
    fn round_trip() {
        let input = sample();
        let (bytes, ids) = encode(&input);
        assert_eq!(bytes.len(), input.encoded_len());
        let batch = RecordBatch::decode(Bytes::from(bytes)).expect("valid");
        assert_eq!(batch.base_offset(), 500);
        assert_eq!(batch.last_offset(), 502);
        assert_eq!(batch.header().producer_id, 7);
        assert_eq!(batch.header().producer_seq, 42);
        let records: Vec<Record> = batch.records().map(|r| r.expect("record")).collect();
        assert_eq!(records.len(), 3);
        for (i, (record, input)) in records.iter().zip(&input.records).enumerate() {
            assert_eq!(record.offset, 500 + i as u64);
            assert_eq!(record.id, ids[i]);
            assert_eq!(record.timestamp_ms, 1000);
            assert_eq!(record.key, input.key);
            assert_eq!(record.headers, input.headers);
            assert_eq!(record.value, input.value);
            assert_eq!(record.deliver_at_ms, input.deliver_at_ms);
            assert_eq!(record.expire_at_ms, input.expire_at_ms);
        }
    }

    #[test]
    fn record_by_offset_matches_iteration() {
        let input = sample();
        let (bytes, _) = encode(&input);
        let batch = RecordBatch::decode(Bytes::from(bytes)).expect("valid");
        let all: Vec<Record> = batch.records().map(|r| r.expect("record")).collect();
        for record in &all {
            assert_eq!(
                batch
                    .record(record.offset)
                    .expect("in batch")
                    .expect("valid"),
                *record
            );
        }
        assert!(batch.record(499).is_none());
        assert!(batch.record(503).is_none());
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let (bytes, _) = encode(&sample());
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordBatch::decode(Bytes::from(flipped)).is_err(),
                "bit {bit} flip not detected"
            );
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let (bytes, _) = encode(&sample());
        for len in 0..bytes.len() {
            let result = verify_batch(&bytes[..len]);
            assert!(result.is_err(), "truncation to {len} accepted");
        }
    }

    /// The example in docs/storage.md §3, byte for byte (CRC and id aside).
    #[test]
    fn documented_example_layout() {
        let input = BatchInput::new(vec![RecordInput::new("hi")]);
        let id = MessageId([0xab; 16]);
        let mut out = Vec::new();
        encode_batch(&mut out, 500, 1000, &input, &[id]);
        let mut expected: Vec<u8> = Vec::new();
        expected.extend_from_slice(b"DMB1");
        expected.extend_from_slice(&[0x69, 0, 0, 0]);
        expected.extend_from_slice(&out[8..12]); // CRC
        expected.extend_from_slice(&[1, 0, 0, 0, 0xf4, 1, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0xe8, 3, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0xab; 16]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, b'h', b'i']);
        assert_eq!(out, expected);
        assert_eq!(
            u32::from_le_bytes([out[8], out[9], out[10], out[11]]),
            crc32fast::hash(&out[12..])
        );
    }

    #[test]
    fn validate_input_rejects_empty() {
        assert!(validate_input(&BatchInput::new(vec![])).is_err());
        assert!(validate_input(&sample()).is_ok());
    }
}
