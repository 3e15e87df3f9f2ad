//! Acknowledgement state of one (consumer group, partition): which offsets
//! the group has acked.
//!
//! # What it owns
//! - The **ack floor**: every offset below it is acked; the floor itself is
//!   always *unacked* (it is the smallest unacked offset at or above the
//!   floor the bitmap was created or reset with).
//! - A **bitmap** of the acked offsets above the floor, in a ring of 64-bit
//!   words: bit `i` of word `w` stands for offset `base + 64 * w + i`, where
//!   `base` is the floor rounded down to a multiple of 64. Acks arrive in
//!   any order; when the floor's offset is acked the floor advances over
//!   every contiguous acked offset and whole words are dropped from the
//!   front as it passes them.
//!
//! # Invariants (checked by `check_invariants` in tests)
//! - `base == floor & !63`.
//! - The bits of word 0 below the floor are set; the floor's bit is clear.
//! - `acked_above_floor` is the number of set bits at or above the floor.
//! - Canonical form: the ring is empty exactly when nothing above the floor
//!   is acked, and otherwise its last word holds the highest acked offset.
//!   Two bitmaps holding the same acks are therefore `==`.
//! - The highest acked offset is below `floor + SPAN_OFFSETS_MAX`, so the
//!   ring holds at most `SPAN_OFFSETS_MAX / 64 + 1` words (4 MiB): memory
//!   is bounded by that limit, not by the backlog. Acking further ahead is
//!   a caller bug (the dispatcher stops handing out messages that far
//!   ahead of a stuck floor).
//! - Offset `u64::MAX` is never acked, so `end()` (highest acked + 1)
//!   always fits in a `u64`.
//!
//! # Encoding (format version 1)
//! Used for group-state persistence; the caller frames it (length, CRC).
//! "varint" is unsigned LEB128: 7 bits per byte, low groups first, the high
//! bit of a byte set when another byte follows, at most 10 bytes, the 10th
//! at most `0x01`.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, `0x01` |
//! | varint | `floor` |
//! | varint | `span` = `end() - floor`: 0 when nothing above the floor is acked, and then the encoding ends here; at most `SPAN_OFFSETS_MAX` |
//! | tokens | describe the offsets `floor .. floor + span` in ascending order, exactly covering them |
//!
//! A token is a varint `header`, `tag = header & 3`, `count = header >> 2`
//! (`count >= 1`):
//! - tag 0: `count` unacked offsets;
//! - tag 1: `count` acked offsets;
//! - tag 2: `count` raw words follow, 8 bytes each, little-endian `u64`;
//!   bit `i` of word `k` set means offset `cursor + 64 * k + i` is acked
//!   (`64 * count` offsets in all);
//! - tag 3: reserved, rejected.
//!
//! The encoder walks the span in 64-offset chunks from the floor: a whole
//! chunk with 8 or more acked/unacked transitions is written raw (8 bytes
//! beat 9+ run tokens), anything else extends runs. So long contiguous
//! spans cost a few bytes, and scattered acks cost at most about one bit
//! per offset (1M acks scattered over 2M offsets: about 250 KB).
//!
//! The decoder never panics: it rejects a bad version, a varint longer
//! than 10 bytes or over `u64`, a span over the limit or past `u64::MAX`,
//! a zero count, a reserved tag, a token running past the span, missing
//! bytes, trailing bytes, and a non-canonical span (floor acked, or the
//! last offset of the span unacked). Encoding and decoding are O(span / 64
//! + tokens).

use std::collections::VecDeque;

const WORD_BITS: u64 = 64;
/// A whole chunk written raw when it has at least this many transitions.
const RAW_TRANSITIONS_MIN: u32 = 8;
const TAG_UNACKED: u64 = 0;
const TAG_ACKED: u64 = 1;
const TAG_RAW: u64 = 2;
const VARINT_BYTES_MAX: usize = 10;

/// Why [`AckBitmap::decode`] rejected its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckBitmapError {
    /// The input ended inside a field.
    #[error("ack bitmap truncated at byte {position}: need {need} more bytes, have {have}")]
    UnexpectedEnd {
        /// Byte position where the field starts.
        position: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The version byte is not one this code reads.
    #[error("unsupported ack bitmap version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// A varint is longer than 10 bytes or overflows a `u64`.
    #[error("malformed varint at byte {position}")]
    VarintOverflow {
        /// Byte position of the varint.
        position: usize,
    },
    /// The span of acked offsets is larger than [`AckBitmap::SPAN_OFFSETS_MAX`].
    #[error("ack bitmap span of {span_offsets} offsets exceeds the maximum {span_offsets_max}")]
    SpanTooLarge {
        /// The span found.
        span_offsets: u64,
        /// The maximum.
        span_offsets_max: u64,
    },
    /// `floor + span` overflows a `u64`.
    #[error("ack bitmap floor {floor} plus span {span_offsets} overflows")]
    OffsetOverflow {
        /// The floor found.
        floor: u64,
        /// The span found.
        span_offsets: u64,
    },
    /// A token with a zero count.
    #[error("empty token at byte {position}")]
    EmptyToken {
        /// Byte position of the token.
        position: usize,
    },
    /// A token with the reserved tag.
    #[error("reserved token tag {tag} at byte {position}")]
    ReservedTag {
        /// Byte position of the token.
        position: usize,
        /// The tag found.
        tag: u8,
    },
    /// A token describes offsets past the end of the span.
    #[error("token at byte {position} runs past the end of the span")]
    TokenPastEnd {
        /// Byte position of the token.
        position: usize,
    },
    /// The encoding marks the floor acked (the floor is the first unacked offset).
    #[error("ack bitmap marks its floor acked")]
    FloorAcked,
    /// The last offset of the span is unacked (the span ends at the highest ack).
    #[error("ack bitmap span does not end with an acked offset")]
    SpanEndUnacked,
    /// Bytes follow the encoding.
    #[error("{remaining} trailing bytes after the ack bitmap at byte {position}")]
    TrailingBytes {
        /// Byte position where the encoding ended.
        position: usize,
        /// Bytes left over.
        remaining: usize,
    },
}

/// The ack state of one (consumer group, partition). See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckBitmap {
    /// Smallest unacked offset; everything below is acked.
    floor: u64,
    /// Offset of bit 0 of `words[0]`: `floor & !63`.
    base: u64,
    /// Bitmap from `base`; bits below the floor set.
    words: VecDeque<u64>,
    /// Set bits at or above the floor.
    acked_above_floor: u64,
}

/// The `count` lowest bits set (`count < 64`).
fn low_mask(count: u64) -> u64 {
    debug_assert!(count < WORD_BITS);
    (1u64 << count) - 1
}

fn align_down(offset: u64) -> u64 {
    offset & !(WORD_BITS - 1)
}

impl AckBitmap {
    /// Maximum distance from the floor of an acked offset (2^28 offsets:
    /// a 32 MiB bitmap at most).
    pub const SPAN_OFFSETS_MAX: u64 = 1 << 28;
    /// Encoding format version written by [`AckBitmap::encode`].
    pub const FORMAT_VERSION: u8 = 1;

    /// An empty bitmap: every offset below `floor` acked, none above.
    pub fn new(floor: u64) -> Self {
        AckBitmap {
            floor,
            base: align_down(floor),
            words: VecDeque::new(),
            acked_above_floor: 0,
        }
    }

    /// The ack floor: every offset below it is acked, it is not.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Marks `offset` acked; returns true if it was not acked before.
    /// Offsets below the floor are already acked (false). Advances the floor
    /// over contiguous acked offsets, dropping whole words as they fill.
    ///
    /// Panics (caller bug) if `offset` is `u64::MAX` or at least
    /// [`AckBitmap::SPAN_OFFSETS_MAX`] above the floor.
    #[inline]
    pub fn ack(&mut self, offset: u64) -> bool {
        if offset < self.floor {
            return false;
        }
        let relative = offset - self.base;
        if relative >= self.words.len() as u64 * WORD_BITS {
            self.grow(offset);
        }
        let bit = 1u64 << (relative % WORD_BITS);
        let Some(word) = self.words.get_mut((relative / WORD_BITS) as usize) else {
            unreachable!("grow covers offset {offset}");
        };
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.acked_above_floor += 1;
        if offset == self.floor {
            self.skip_acked();
        }
        true
    }

    /// Extends the ring so that it covers `offset` (cold path of `ack`).
    #[cold]
    fn grow(&mut self, offset: u64) {
        assert!(
            offset < u64::MAX,
            "offset u64::MAX cannot be acked (end() would overflow)"
        );
        assert!(
            offset - self.floor < Self::SPAN_OFFSETS_MAX,
            "ack of offset {offset} is {} offsets above the floor {}, over the limit {}",
            offset - self.floor,
            self.floor,
            Self::SPAN_OFFSETS_MAX
        );
        if self.words.is_empty() {
            self.words.push_back(low_mask(self.floor - self.base));
        }
        let words_needed = ((offset - self.base) / WORD_BITS + 1) as usize;
        self.words.resize(words_needed, 0);
    }

    /// Moves the floor from an acked position to the next unacked one,
    /// dropping full words; empties the ring when nothing is left above.
    fn skip_acked(&mut self) {
        while let Some(&word) = self.words.front() {
            let position = self.floor - self.base;
            let ones = u64::from(word.trailing_ones());
            debug_assert!(ones >= position, "bits below the floor must be set");
            if ones < WORD_BITS {
                self.acked_above_floor -= ones - position;
                self.floor = self.base + ones;
                break;
            }
            // `base + 64` cannot overflow: the bit of u64::MAX is never set.
            self.acked_above_floor -= WORD_BITS - position;
            self.words.pop_front();
            self.base += WORD_BITS;
            self.floor = self.base;
        }
        if self.acked_above_floor == 0 {
            self.words.clear();
            self.base = align_down(self.floor);
        }
    }

    /// Whether `offset` is acked.
    pub fn is_acked(&self, offset: u64) -> bool {
        if offset < self.floor {
            return true;
        }
        let relative = offset - self.base;
        match self.words.get((relative / WORD_BITS) as usize) {
            Some(word) if relative < self.words.len() as u64 * WORD_BITS => {
                word & (1u64 << (relative % WORD_BITS)) != 0
            }
            _ => false,
        }
    }

    /// Number of acked offsets at or above the floor.
    pub fn acked_above_floor(&self) -> u64 {
        self.acked_above_floor
    }

    /// Highest acked offset + 1, or the floor if none above it is acked.
    pub fn end(&self) -> u64 {
        match self.words.back() {
            Some(&last) if self.acked_above_floor > 0 => {
                debug_assert!(last != 0, "the last word holds the highest ack");
                let last_base = self.base + (self.words.len() as u64 - 1) * WORD_BITS;
                last_base + (WORD_BITS - u64::from(last.leading_zeros()))
            }
            _ => self.floor,
        }
    }

    /// Unacked offsets in `[from, to)`, ascending, at most `limit` (used to
    /// find redeliveries after a restart).
    pub fn unacked_in(&self, from: u64, to: u64, limit: usize) -> Vec<u64> {
        let mut unacked = Vec::new();
        let mut offset = from.max(self.floor);
        while offset < to && unacked.len() < limit {
            let relative = offset - self.base;
            let bit_position = relative % WORD_BITS;
            let word_start = offset - bit_position;
            let word = match self.words.get((relative / WORD_BITS) as usize) {
                Some(&word) if relative < self.words.len() as u64 * WORD_BITS => word,
                _ => {
                    // Past the ring: every offset is unacked.
                    let count = (to - offset).min((limit - unacked.len()) as u64);
                    unacked.extend(offset..offset + count);
                    break;
                }
            };
            let mut bits = !word & (u64::MAX << bit_position);
            if to - word_start < WORD_BITS {
                bits &= low_mask(to - word_start);
            }
            while bits != 0 && unacked.len() < limit {
                unacked.push(word_start + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
            match word_start.checked_add(WORD_BITS) {
                Some(next) => offset = next,
                None => break,
            }
        }
        unacked
    }

    /// Forgets everything and restarts at `floor` (seek, replay). Frees the
    /// ring.
    pub fn reset(&mut self, floor: u64) {
        *self = AckBitmap::new(floor);
    }

    /// Forgets every ack at or above `end` (the log was cut back to `end` at
    /// recovery, so those offsets will be used again by new messages): the
    /// floor drops to `end` if it was above, acks below `end` stay. Returns
    /// true if anything changed.
    pub fn forget_from(&mut self, end: u64) -> bool {
        if self.end() <= end {
            return false;
        }
        if self.floor >= end {
            self.reset(end);
            return true;
        }
        let mut kept = AckBitmap::new(self.floor);
        for offset in self.floor..end {
            if self.is_acked(offset) {
                kept.ack(offset);
            }
        }
        *self = kept;
        true
    }

    /// Marks every offset below `offset` acked: moves the floor up (then on
    /// over contiguous acks) and keeps the acks above. No-op when `offset`
    /// is at or below the floor.
    pub fn ack_below(&mut self, offset: u64) {
        if offset <= self.floor {
            return;
        }
        let relative = offset - self.base;
        if relative >= self.words.len() as u64 * WORD_BITS {
            // Every stored ack is below `offset`.
            self.words.clear();
            self.floor = offset;
            self.base = align_down(offset);
            self.acked_above_floor = 0;
            return;
        }
        for _ in 0..relative / WORD_BITS {
            let Some(word) = self.words.pop_front() else {
                break;
            };
            let below_floor = if self.floor > self.base {
                low_mask(self.floor - self.base)
            } else {
                0
            };
            self.acked_above_floor -= u64::from((word & !below_floor).count_ones());
            self.base += WORD_BITS;
        }
        let position_old = self.floor.saturating_sub(self.base);
        let position_new = offset - self.base;
        if let Some(word) = self.words.front_mut() {
            let newly_below = low_mask(position_new) & !low_mask(position_old);
            self.acked_above_floor -= u64::from((*word & newly_below).count_ones());
            *word |= low_mask(position_new);
        }
        self.floor = offset;
        self.skip_acked();
    }

    /// Acks every offset `other` holds acked: below its floor, and each
    /// acked above it, except those too far above this bitmap's floor to
    /// hold ([`AckBitmap::SPAN_OFFSETS_MAX`]; left unacked, so delivered
    /// again, never lost).
    pub fn union(&mut self, other: &AckBitmap) {
        self.ack_below(other.floor());
        for offset in other.acked_offsets_above_floor() {
            if offset.saturating_sub(self.floor) < Self::SPAN_OFFSETS_MAX {
                self.ack(offset);
            }
        }
    }

    /// The acked offsets above the floor, in order.
    fn acked_offsets_above_floor(&self) -> impl Iterator<Item = u64> + '_ {
        let floor = self.floor;
        let base = self.base;
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(index, &word)| {
                let word_base = base + index as u64 * WORD_BITS;
                (0..WORD_BITS)
                    .filter(move |bit| word & (1u64 << bit) != 0)
                    .map(move |bit| word_base + bit)
            })
            .filter(move |offset| *offset >= floor)
    }

    /// Heap bytes used (for bounds reporting).
    pub fn memory_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }

    /// The 64 bits of offsets `floor + 64 * chunk ..`, bit 0 first, zero
    /// past the ring.
    fn chunk_bits(&self, chunk: u64) -> u64 {
        let relative = self.floor - self.base + chunk * WORD_BITS;
        let index = (relative / WORD_BITS) as usize;
        let shift = relative % WORD_BITS;
        let low = self.words.get(index).copied().unwrap_or(0) >> shift;
        if shift == 0 {
            return low;
        }
        let high = self.words.get(index + 1).copied().unwrap_or(0) << (WORD_BITS - shift);
        low | high
    }

    /// Appends the encoding described in the module doc to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(Self::FORMAT_VERSION);
        write_varint(out, self.floor);
        let span = self.end() - self.floor;
        write_varint(out, span);
        let chunk_count = span.div_ceil(WORD_BITS);
        let full_chunks = span / WORD_BITS;
        let is_raw = |chunk: u64, bits: u64| {
            chunk < full_chunks && (bits ^ (bits >> 1)) & (u64::MAX >> 1) != 0 && {
                ((bits ^ (bits >> 1)) & (u64::MAX >> 1)).count_ones() >= RAW_TRANSITIONS_MIN
            }
        };
        let mut runs = RunWriter::default();
        let mut chunk = 0;
        while chunk < chunk_count {
            let bits = self.chunk_bits(chunk);
            if is_raw(chunk, bits) {
                runs.flush(out);
                let mut raw_chunks = 1;
                while chunk + raw_chunks < chunk_count
                    && is_raw(chunk + raw_chunks, self.chunk_bits(chunk + raw_chunks))
                {
                    raw_chunks += 1;
                }
                write_varint(out, raw_chunks << 2 | TAG_RAW);
                for raw in chunk..chunk + raw_chunks {
                    out.extend_from_slice(&self.chunk_bits(raw).to_le_bytes());
                }
                chunk += raw_chunks;
                continue;
            }
            let mut remaining = (span - chunk * WORD_BITS).min(WORD_BITS);
            let mut bits = bits;
            while remaining > 0 {
                let acked = bits & 1 == 1;
                let length = if acked {
                    bits.trailing_ones()
                } else {
                    bits.trailing_zeros()
                };
                let length = u64::from(length).min(remaining);
                runs.extend(out, acked, length);
                bits = bits.checked_shr(length as u32).unwrap_or(0);
                remaining -= length;
            }
            chunk += 1;
        }
        runs.flush(out);
    }

    /// Reads an encoding written by [`AckBitmap::encode`]; rejects anything
    /// else with a typed error, never panics.
    pub fn decode(bytes: &[u8]) -> Result<AckBitmap, AckBitmapError> {
        let mut reader = Reader { bytes, position: 0 };
        let version = reader.byte()?;
        if version != Self::FORMAT_VERSION {
            return Err(AckBitmapError::UnsupportedVersion { version });
        }
        let floor = reader.varint()?;
        let span = reader.varint()?;
        if span > Self::SPAN_OFFSETS_MAX {
            return Err(AckBitmapError::SpanTooLarge {
                span_offsets: span,
                span_offsets_max: Self::SPAN_OFFSETS_MAX,
            });
        }
        let end = floor
            .checked_add(span)
            .ok_or(AckBitmapError::OffsetOverflow {
                floor,
                span_offsets: span,
            })?;
        let mut bitmap = AckBitmap::new(floor);
        if span == 0 {
            reader.finish()?;
            return Ok(bitmap);
        }
        let word_count = ((end - 1 - bitmap.base) / WORD_BITS + 1) as usize;
        bitmap.words.resize(word_count, 0);
        bitmap.set_range(bitmap.base, floor);
        let mut cursor = floor;
        while cursor < end {
            let position = reader.position;
            let header = reader.varint()?;
            let tag = header & 3;
            let count = header >> 2;
            if count == 0 {
                return Err(AckBitmapError::EmptyToken { position });
            }
            match tag {
                TAG_UNACKED | TAG_ACKED => {
                    if count > end - cursor {
                        return Err(AckBitmapError::TokenPastEnd { position });
                    }
                    if tag == TAG_ACKED {
                        bitmap.set_range(cursor, cursor + count);
                    }
                    cursor += count;
                }
                TAG_RAW => {
                    if count > (end - cursor) / WORD_BITS {
                        return Err(AckBitmapError::TokenPastEnd { position });
                    }
                    for _ in 0..count {
                        let bits = reader.u64_le()?;
                        bitmap.or_bits(cursor, bits);
                        cursor += WORD_BITS;
                    }
                }
                _ => {
                    return Err(AckBitmapError::ReservedTag {
                        position,
                        tag: tag as u8,
                    })
                }
            }
        }
        reader.finish()?;
        if bitmap.bit(floor) {
            return Err(AckBitmapError::FloorAcked);
        }
        if !bitmap.bit(end - 1) {
            return Err(AckBitmapError::SpanEndUnacked);
        }
        let set_bits: u64 = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        bitmap.acked_above_floor = set_bits - (floor - bitmap.base);
        Ok(bitmap)
    }

    /// Sets the bits of `[from, to)` (inside the ring; decode only).
    fn set_range(&mut self, from: u64, to: u64) {
        let mut offset = from;
        while offset < to {
            let relative = offset - self.base;
            let shift = relative % WORD_BITS;
            let bits = (to - offset).min(WORD_BITS - shift);
            let mask = if bits == WORD_BITS {
                u64::MAX
            } else {
                low_mask(bits) << shift
            };
            if let Some(word) = self.words.get_mut((relative / WORD_BITS) as usize) {
                *word |= mask;
            }
            offset += bits;
        }
    }

    /// ORs the 64 bits of offsets `from ..` into the ring (decode only).
    fn or_bits(&mut self, from: u64, bits: u64) {
        let relative = from - self.base;
        let index = (relative / WORD_BITS) as usize;
        let shift = relative % WORD_BITS;
        if let Some(word) = self.words.get_mut(index) {
            *word |= bits << shift;
        }
        if shift > 0 {
            if let Some(word) = self.words.get_mut(index + 1) {
                *word |= bits >> (WORD_BITS - shift);
            }
        }
    }

    /// The raw bit of `offset` in the ring (false outside it).
    fn bit(&self, offset: u64) -> bool {
        let Some(relative) = offset.checked_sub(self.base) else {
            return false;
        };
        self.words
            .get((relative / WORD_BITS) as usize)
            .is_some_and(|word| word & (1u64 << (relative % WORD_BITS)) != 0)
    }

    /// Asserts every invariant of the module doc (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        assert_eq!(self.base, align_down(self.floor));
        assert_eq!(self.words.is_empty(), self.acked_above_floor == 0);
        if let Some(&first) = self.words.front() {
            let position = self.floor - self.base;
            assert_eq!(first & low_mask(position), low_mask(position));
            assert_eq!(first & (1 << position), 0, "floor bit set");
            let set_bits: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
            assert_eq!(set_bits - position, self.acked_above_floor);
            assert_ne!(self.words.back().copied(), Some(0));
            assert!(self.end() - self.floor <= Self::SPAN_OFFSETS_MAX);
        }
    }
}

/// Accumulates alternating runs and writes them as tokens.
#[derive(Default)]
struct RunWriter {
    acked: bool,
    length: u64,
}

impl RunWriter {
    fn extend(&mut self, out: &mut Vec<u8>, acked: bool, length: u64) {
        if length == 0 {
            return;
        }
        if self.length > 0 && self.acked != acked {
            self.flush(out);
        }
        self.acked = acked;
        self.length += length;
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if self.length > 0 {
            let tag = if self.acked { TAG_ACKED } else { TAG_UNACKED };
            write_varint(out, self.length << 2 | tag);
            self.length = 0;
        }
    }
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A cursor over the input of `decode`.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn take(&mut self, need: usize) -> Result<&[u8], AckBitmapError> {
        let have = self.bytes.len() - self.position;
        let Some(taken) = self.bytes.get(self.position..self.position + need) else {
            return Err(AckBitmapError::UnexpectedEnd {
                position: self.position,
                need,
                have,
            });
        };
        self.position += need;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, AckBitmapError> {
        let taken = self.take(1)?;
        Ok(taken.first().copied().unwrap_or(0))
    }

    fn u64_le(&mut self) -> Result<u64, AckBitmapError> {
        let taken = self.take(8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(taken);
        Ok(u64::from_le_bytes(word))
    }

    fn varint(&mut self) -> Result<u64, AckBitmapError> {
        let start = self.position;
        let mut value = 0u64;
        for index in 0..VARINT_BYTES_MAX {
            let byte = self.byte()?;
            let group = u64::from(byte & 0x7f);
            if index == VARINT_BYTES_MAX - 1 && byte > 1 {
                return Err(AckBitmapError::VarintOverflow { position: start });
            }
            value |= group << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(AckBitmapError::VarintOverflow { position: start })
    }

    fn finish(&self) -> Result<(), AckBitmapError> {
        let remaining = self.bytes.len() - self.position;
        if remaining > 0 {
            return Err(AckBitmapError::TrailingBytes {
                position: self.position,
                remaining,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_union_holds_every_offset_either_bitmap_acked() {
        let mut left = AckBitmap::new(10);
        for offset in [12, 70, 200] {
            left.ack(offset);
        }
        let mut right = AckBitmap::new(5);
        for offset in [10, 11, 64, 70, 130, 5000] {
            right.ack(offset);
        }
        let mut union = left.clone();
        union.union(&right);
        for offset in 0..6000 {
            assert_eq!(
                union.is_acked(offset),
                left.is_acked(offset) || right.is_acked(offset),
                "offset {offset}"
            );
        }
        union.check_invariants();
        // A bitmap whose floor is far above takes the other's floor too.
        let mut high = AckBitmap::new(1_000);
        high.union(&left);
        assert_eq!(high.floor(), 1_000);
        let mut low = AckBitmap::new(0);
        low.union(&high);
        assert_eq!(low.floor(), 1_000);
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn round_trip(bitmap: &AckBitmap) -> Vec<u8> {
        let mut bytes = Vec::new();
        bitmap.encode(&mut bytes);
        let decoded = AckBitmap::decode(&bytes).unwrap();
        decoded.check_invariants();
        assert_eq!(&decoded, bitmap);
        bytes
    }

    /// SplitMix64 for reproducible test data.
    struct Spread(u64);
    impl Spread {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn in_order_acks_advance_the_floor_and_keep_the_ring_empty() {
        let mut bitmap = AckBitmap::new(10);
        for offset in 10..1000 {
            assert!(bitmap.ack(offset));
            assert_eq!(bitmap.floor(), offset + 1);
            assert_eq!(bitmap.acked_above_floor(), 0);
            bitmap.check_invariants();
        }
        assert!(!bitmap.ack(500));
        assert!(bitmap.is_acked(999));
        assert!(!bitmap.is_acked(1000));
        assert_eq!(bitmap.end(), 1000);
        assert_eq!(round_trip(&bitmap).len(), 4);
    }

    #[test]
    fn out_of_order_acks_fill_a_gap() {
        let mut bitmap = AckBitmap::new(0);
        assert!(bitmap.ack(5));
        assert!(bitmap.ack(200));
        assert!(!bitmap.ack(200));
        assert_eq!(bitmap.floor(), 0);
        assert_eq!(bitmap.acked_above_floor(), 2);
        assert_eq!(bitmap.end(), 201);
        assert_eq!(bitmap.unacked_in(0, 8, 100), vec![0, 1, 2, 3, 4, 6, 7]);
        assert_eq!(bitmap.unacked_in(198, 203, 100), vec![198, 199, 201, 202]);
        assert_eq!(bitmap.unacked_in(0, 1000, 3), vec![0, 1, 2]);
        round_trip(&bitmap);
        for offset in 0..5 {
            bitmap.ack(offset);
        }
        assert_eq!(bitmap.floor(), 6);
        assert_eq!(bitmap.acked_above_floor(), 1);
        for offset in 6..200 {
            bitmap.ack(offset);
            bitmap.check_invariants();
        }
        assert_eq!(bitmap.floor(), 201);
        assert_eq!(bitmap.acked_above_floor(), 0);
        assert_eq!(bitmap.end(), 201);
        round_trip(&bitmap);
    }

    #[test]
    fn ack_below_and_reset() {
        let mut bitmap = AckBitmap::new(3);
        bitmap.ack(70);
        bitmap.ack(71);
        bitmap.ack(300);
        bitmap.ack_below(50);
        assert_eq!(bitmap.floor(), 50);
        assert_eq!(bitmap.acked_above_floor(), 3);
        bitmap.ack_below(70);
        assert_eq!(bitmap.floor(), 72);
        assert_eq!(bitmap.acked_above_floor(), 1);
        bitmap.check_invariants();
        bitmap.ack_below(10);
        assert_eq!(bitmap.floor(), 72);
        bitmap.ack_below(1000);
        assert_eq!(bitmap.floor(), 1000);
        assert_eq!(bitmap.acked_above_floor(), 0);
        bitmap.check_invariants();
        bitmap.reset(5);
        assert_eq!(bitmap, AckBitmap::new(5));
        assert_eq!(bitmap.memory_bytes(), 0);
    }

    #[test]
    fn near_the_top_of_the_offset_space() {
        let start = u64::MAX - 130;
        let mut bitmap = AckBitmap::new(start);
        for offset in (start..u64::MAX).rev() {
            bitmap.ack(offset);
            bitmap.check_invariants();
        }
        assert_eq!(bitmap.floor(), u64::MAX);
        assert!(!bitmap.is_acked(u64::MAX));
        assert_eq!(bitmap.unacked_in(0, u64::MAX, 10), Vec::<u64>::new());
        round_trip(&bitmap);
        bitmap.reset(u64::MAX - 3);
        bitmap.ack(u64::MAX - 1);
        assert_eq!(bitmap.end(), u64::MAX);
        assert_eq!(
            bitmap.unacked_in(0, u64::MAX, 10),
            vec![u64::MAX - 3, u64::MAX - 2]
        );
        round_trip(&bitmap);
        bitmap.ack_below(u64::MAX);
        assert_eq!(bitmap.floor(), u64::MAX);
    }

    #[test]
    #[should_panic(expected = "over the limit")]
    fn acking_too_far_ahead_is_a_caller_bug() {
        AckBitmap::new(0).ack(AckBitmap::SPAN_OFFSETS_MAX);
    }

    #[test]
    fn decode_rejects_malformed_input() {
        let mut bitmap = AckBitmap::new(7);
        bitmap.ack(9);
        let mut bytes = Vec::new();
        bitmap.encode(&mut bytes);
        assert_eq!(bytes, vec![1, 7, 3, 2 << 2, 1 << 2 | 1]);
        let decode = AckBitmap::decode;
        assert!(matches!(
            decode(&[]),
            Err(AckBitmapError::UnexpectedEnd { .. })
        ));
        assert_eq!(
            decode(&[2, 0, 0]),
            Err(AckBitmapError::UnsupportedVersion { version: 2 })
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(AckBitmapError::TrailingBytes { .. })
        ));
        assert!(matches!(
            decode(&bytes[..4]),
            Err(AckBitmapError::UnexpectedEnd { .. })
        ));
        assert_eq!(
            decode(&[1, 7, 3, 3 << 2]),
            Err(AckBitmapError::SpanEndUnacked)
        );
        assert_eq!(
            decode(&[1, 7, 3, 1 << 2 | 1, 2 << 2]),
            Err(AckBitmapError::FloorAcked)
        );
        assert!(matches!(
            decode(&[1, 7, 3, 4 << 2]),
            Err(AckBitmapError::TokenPastEnd { .. })
        ));
        assert!(matches!(
            decode(&[1, 7, 3, 0]),
            Err(AckBitmapError::EmptyToken { .. })
        ));
        assert!(matches!(
            decode(&[1, 7, 3, 1 << 2 | 3]),
            Err(AckBitmapError::ReservedTag { tag: 3, .. })
        ));
        let mut overflow = vec![1];
        overflow.extend_from_slice(&[0xff; 10]);
        assert!(matches!(
            decode(&overflow),
            Err(AckBitmapError::VarintOverflow { .. })
        ));
        let mut huge_span = vec![1, 0];
        write_varint(&mut huge_span, AckBitmap::SPAN_OFFSETS_MAX + 1);
        assert!(matches!(
            decode(&huge_span),
            Err(AckBitmapError::SpanTooLarge { .. })
        ));
        let mut past_max = vec![1];
        write_varint(&mut past_max, u64::MAX - 1);
        write_varint(&mut past_max, 2);
        assert!(matches!(
            decode(&past_max),
            Err(AckBitmapError::OffsetOverflow { .. })
        ));
    }

    #[test]
    fn a_million_scattered_acks_encode_compactly() {
        let total = 2_000_000u64;
        let mut offsets: Vec<u64> = (0..total).collect();
        let mut spread = Spread(42);
        for i in (1..offsets.len()).rev() {
            let j = (spread.next() % (i as u64 + 1)) as usize;
            offsets.swap(i, j);
        }
        offsets.truncate(1_000_000);
        let mut bitmap = AckBitmap::new(0);
        for &offset in &offsets {
            assert!(bitmap.ack(offset));
        }
        bitmap.check_invariants();
        let acked: BTreeSet<u64> = offsets.iter().copied().collect();
        let expected_above = acked.range(bitmap.floor()..).count() as u64;
        assert_eq!(bitmap.acked_above_floor(), expected_above);
        let bytes = round_trip(&bitmap);
        println!(
            "ack bitmap: 1M acks scattered over 2M offsets encode to {} bytes ({:.2} bits per offset), {} heap bytes",
            bytes.len(),
            bytes.len() as f64 * 8.0 / total as f64,
            bitmap.memory_bytes()
        );
        assert!(bytes.len() < 260_000, "{} bytes", bytes.len());
    }

    #[derive(Debug, Clone)]
    enum Operation {
        Ack(u64),
        AckBelow(u64),
        Reset(u64),
        ForgetFrom(u64),
        Query {
            from: u64,
            length: u64,
            limit: usize,
        },
    }

    fn operation(window: u64) -> impl Strategy<Value = Operation> {
        prop_oneof![
            20 => (0..window).prop_map(Operation::Ack),
            // Clustered acks near the floor, to make the floor move.
            20 => (0..64u64).prop_map(|offset| Operation::Ack(u64::MAX - offset)),
            2 => (0..window).prop_map(Operation::AckBelow),
            1 => (0..window).prop_map(Operation::Reset),
            1 => (0..window).prop_map(Operation::ForgetFrom),
            3 => (0..window, 0..300u64, 0..50usize)
                .prop_map(|(from, length, limit)| Operation::Query { from, length, limit }),
        ]
    }

    /// Reference model: a floor and the set of acked offsets at or above it.
    struct Oracle {
        floor: u64,
        acked: BTreeSet<u64>,
    }

    impl Oracle {
        fn normalize(&mut self) {
            while self.acked.remove(&self.floor) {
                self.floor += 1;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]

        #[test]
        fn matches_a_btreeset_oracle(
            start in prop_oneof![
                0..1000u64,
                (u64::MAX - (1 << 20))..(u64::MAX - 10_000),
                any::<u64>().prop_map(|v| v >> 2),
            ],
            window in 64..4000u64,
            operations in prop::collection::vec(operation(4000), 1..300),
        ) {
            let mut bitmap = AckBitmap::new(start);
            let mut oracle = Oracle { floor: start, acked: BTreeSet::new() };
            for operation in operations {
                match operation {
                    Operation::Ack(relative) => {
                        // u64::MAX - k encodes "k above the current floor".
                        let offset = if relative > u64::MAX - 64 {
                            oracle.floor + (u64::MAX - relative)
                        } else {
                            start + relative % window
                        };
                        let newly = offset >= oracle.floor && oracle.acked.insert(offset);
                        oracle.normalize();
                        prop_assert_eq!(bitmap.ack(offset), newly);
                    }
                    Operation::AckBelow(relative) => {
                        let offset = start + relative % window;
                        if offset > oracle.floor {
                            oracle.acked = oracle.acked.split_off(&offset);
                            oracle.floor = offset;
                            oracle.normalize();
                        }
                        bitmap.ack_below(offset);
                    }
                    Operation::Reset(relative) => {
                        let floor = start + relative % window;
                        oracle.floor = floor;
                        oracle.acked.clear();
                        bitmap.reset(floor);
                    }
                    Operation::ForgetFrom(relative) => {
                        let end = start + relative % window;
                        let changed = oracle.floor > end
                            || oracle.acked.range(end..).next().is_some();
                        oracle.acked.retain(|offset| *offset < end);
                        if oracle.floor > end {
                            oracle.floor = end;
                        }
                        prop_assert_eq!(bitmap.forget_from(end), changed);
                    }
                    Operation::Query { from, length, limit } => {
                        let from = start + from;
                        let to = from + length;
                        let expected: Vec<u64> = (from.max(oracle.floor)..to)
                            .filter(|offset| !oracle.acked.contains(offset))
                            .take(limit)
                            .collect();
                        prop_assert_eq!(bitmap.unacked_in(from, to, limit), expected);
                    }
                }
                bitmap.check_invariants();
                prop_assert_eq!(bitmap.floor(), oracle.floor);
                prop_assert_eq!(bitmap.acked_above_floor(), oracle.acked.len() as u64);
                let end = oracle.acked.last().map_or(oracle.floor, |last| last + 1);
                prop_assert_eq!(bitmap.end(), end);
            }
            for offset in start.saturating_sub(70)..start + window + 70 {
                let acked = offset < oracle.floor || oracle.acked.contains(&offset);
                prop_assert_eq!(bitmap.is_acked(offset), acked, "offset {}", offset);
            }
            round_trip(&bitmap);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = AckBitmap::decode(&bytes);
            let mut versioned = vec![AckBitmap::FORMAT_VERSION];
            versioned.extend_from_slice(&bytes);
            if let Ok(bitmap) = AckBitmap::decode(&versioned) {
                bitmap.check_invariants();
                round_trip(&bitmap);
            }
        }

        #[test]
        fn decode_never_panics_on_mutated_encodings(
            acks in prop::collection::vec(0..2000u64, 0..400),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bitmap = AckBitmap::new(100);
            for offset in acks {
                bitmap.ack(100 + offset);
            }
            let mut bytes = Vec::new();
            bitmap.encode(&mut bytes);
            for (index, value) in flips {
                let index = index.index(bytes.len());
                bytes[index] ^= value;
            }
            if let Ok(decoded) = AckBitmap::decode(&bytes) {
                decoded.check_invariants();
            }
            let cut = cut.index(bytes.len());
            if let Ok(decoded) = AckBitmap::decode(&bytes[..cut]) {
                decoded.check_invariants();
            }
        }
    }
}
