//! Walking the batches of a segment's bytes: the one loop that recovery,
//! index rebuilds and reads share.
//!
//! Invariants: every batch handed to a visitor has a valid CRC and a base
//! offset equal to the previous batch's next offset (or, after damage, greater
//! than it); nothing here panics on any input.

use crate::batch::{verify_batch, BatchError, BatchHeader, BATCH_HEADER_LEN, BATCH_MAGIC};

/// A damaged stretch of a segment that valid batches follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRegion {
    /// Base offset of the segment.
    pub segment_base_offset: u64,
    /// First damaged byte.
    pub position: u64,
    /// Bytes up to the next valid batch (or the end of the data).
    pub len: u64,
    /// First offset the damage makes unreadable.
    pub first_lost_offset: u64,
    /// First offset readable after the damage.
    pub next_readable_offset: u64,
    /// What was wrong with the first damaged batch.
    pub error: BatchError,
}

/// What a scan of a segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanOutcome {
    /// End of the last valid batch.
    pub(crate) valid_end: u64,
    /// Offset after the last valid record (the segment base if none).
    pub(crate) next_offset: u64,
    /// Largest timestamp of the valid batches (`i64::MIN` if none).
    pub(crate) max_timestamp_ms: i64,
    /// Damage followed by valid batches.
    pub(crate) corrupt: Vec<CorruptRegion>,
    /// Non-zero bytes after the last valid batch that no valid batch follows
    /// (a torn or corrupt tail): `valid_end..torn_end`. Equal to `valid_end`
    /// when the rest of the data is zeros.
    pub(crate) torn_end: u64,
}

/// Index just past the last non-zero byte of `data[from..]`, or `from`.
pub(crate) fn end_of_nonzero(data: &[u8], from: usize) -> usize {
    let tail = data.get(from..).unwrap_or(&[]);
    // Compare 64-byte chunks first: the region is usually long and all zero.
    let chunked_len = tail.len() / 64 * 64;
    let mut end = tail.len();
    if tail[chunked_len..].iter().all(|&b| b == 0) {
        end = chunked_len;
        while end > 0 && tail[end - 64..end].iter().all(|&b| b == 0) {
            end -= 64;
        }
    }
    while end > 0 && tail[end - 1] == 0 {
        end -= 1;
    }
    from + end
}

/// The first valid batch starting in `data[from..starts_before]` whose base
/// offset is at least `min_offset`: found by its magic, then checked by its
/// CRC (against all of `data`, since a batch may end in zeros).
pub(crate) fn find_next_valid_batch(
    data: &[u8],
    from: usize,
    starts_before: usize,
    min_offset: u64,
) -> Option<(usize, BatchHeader)> {
    let starts_before = starts_before.min(data.len());
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut at = from;
    while at < starts_before && at + BATCH_HEADER_LEN <= data.len() {
        let window_end = (starts_before + 3).min(data.len());
        let found = data[at..window_end].windows(4).position(|w| w == magic)?;
        let candidate = at + found;
        if let Ok(header) = verify_batch(&data[candidate..]) {
            if header.base_offset >= min_offset {
                return Some((candidate, header));
            }
        }
        at = candidate + 1;
    }
    None
}

/// Walks `data` (a segment's bytes from position 0) from `start`, where the
/// batch with base offset `start_offset` is expected, handing each valid batch
/// to `visit(position, header)`. Stops at the first stretch of zeros or at
/// damage that no valid batch follows.
pub(crate) fn scan_segment(
    data: &[u8],
    segment_base_offset: u64,
    start: usize,
    start_offset: u64,
    mut visit: impl FnMut(u64, &BatchHeader),
) -> ScanOutcome {
    let mut position = start;
    let mut expected = start_offset;
    let mut max_timestamp_ms = i64::MIN;
    let mut corrupt = Vec::new();
    let mut torn_end = start;
    while position < data.len() {
        let error = match verify_batch(&data[position..]) {
            Ok(header) if header.base_offset == expected => {
                visit(position as u64, &header);
                max_timestamp_ms = max_timestamp_ms.max(header.max_timestamp_ms);
                expected = header.next_offset();
                position += header.batch_len as usize;
                torn_end = position;
                continue;
            }
            Ok(_) => BatchError::Malformed("batch base offset breaks the offset sequence"),
            Err(error) => error,
        };
        let nonzero_end = end_of_nonzero(data, position);
        if nonzero_end == position {
            break; // clean end: only zeros follow
        }
        match find_next_valid_batch(data, position + 1, nonzero_end, expected) {
            Some((next, header)) => {
                corrupt.push(CorruptRegion {
                    segment_base_offset,
                    position: position as u64,
                    len: (next - position) as u64,
                    first_lost_offset: expected,
                    next_readable_offset: header.base_offset,
                    error,
                });
                position = next;
                expected = header.base_offset;
            }
            None => {
                torn_end = nonzero_end;
                break;
            }
        }
    }
    let valid_end = position.min(data.len());
    ScanOutcome {
        valid_end: valid_end as u64,
        next_offset: expected,
        max_timestamp_ms,
        corrupt,
        torn_end: torn_end.max(valid_end) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{encode_batch, BatchInput, RecordInput};
    use crate::message_id::MessageId;

    fn segment_bytes(batches: &[(u64, usize)], tail_zeros: usize) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for &(base, count) in batches {
            starts.push(out.len());
            let input = BatchInput::new(
                (0..count)
                    .map(|i| RecordInput::new(vec![i as u8; 50]))
                    .collect(),
            );
            let ids: Vec<MessageId> = (0..count).map(|i| MessageId::new(5, i as u64)).collect();
            encode_batch(&mut out, base, 5, &input, &ids);
        }
        starts.push(out.len());
        out.resize(out.len() + tail_zeros, 0);
        (out, starts)
    }

    #[test]
    fn clean_segment_scans_to_the_zeros() {
        let (data, starts) = segment_bytes(&[(10, 2), (12, 3)], 1000);
        let mut seen = Vec::new();
        let outcome = scan_segment(&data, 10, 0, 10, |pos, h| seen.push((pos, h.base_offset)));
        assert_eq!(seen, vec![(0, 10), (starts[1] as u64, 12)]);
        assert_eq!(outcome.valid_end, starts[2] as u64);
        assert_eq!(outcome.torn_end, outcome.valid_end);
        assert_eq!(outcome.next_offset, 15);
        assert!(outcome.corrupt.is_empty());
    }

    #[test]
    fn torn_tail_is_reported_not_visited() {
        let (mut data, starts) = segment_bytes(&[(0, 2), (2, 2)], 100);
        data.truncate(starts[2] - 7);
        data.resize(data.len() + 100, 0);
        let outcome = scan_segment(&data, 0, 0, 0, |_, _| {});
        assert_eq!(outcome.valid_end, starts[1] as u64);
        assert_eq!(outcome.next_offset, 2);
        assert_eq!(outcome.torn_end, (starts[2] - 7) as u64);
    }

    #[test]
    fn damage_followed_by_valid_batches_is_skipped_and_reported() {
        let (mut data, starts) = segment_bytes(&[(0, 2), (2, 2), (4, 1)], 0);
        data[starts[1] + 80] ^= 0x10;
        let mut seen = Vec::new();
        let outcome = scan_segment(&data, 0, 0, 0, |_, h| seen.push(h.base_offset));
        assert_eq!(seen, vec![0, 4]);
        assert_eq!(outcome.corrupt.len(), 1);
        assert_eq!(outcome.corrupt[0].position, starts[1] as u64);
        assert_eq!(outcome.corrupt[0].first_lost_offset, 2);
        assert_eq!(outcome.corrupt[0].next_readable_offset, 4);
        assert_eq!(outcome.next_offset, 5);
        assert_eq!(outcome.valid_end, data.len() as u64);
    }

    #[test]
    fn end_of_nonzero_finds_the_last_byte() {
        let mut data = vec![0u8; 1000];
        assert_eq!(end_of_nonzero(&data, 0), 0);
        data[700] = 1;
        assert_eq!(end_of_nonzero(&data, 0), 701);
        assert_eq!(end_of_nonzero(&data, 701), 701);
        assert_eq!(end_of_nonzero(&data, 5000), 5000);
        data[999] = 3;
        assert_eq!(end_of_nonzero(&data, 10), 1000);
    }
}
