//! The time index: maximum timestamp so far -> relative offset.
//!
//! Owns [`TimeIndex`] and [`TimeEntry`]. Entries are 12 bytes,
//! `timestamp_ms: i64 LE` then `rel_offset: u32 LE`. The caller defines an
//! entry as: after the batch ending at `rel_offset`, the maximum timestamp
//! seen so far in the segment is `timestamp_ms`.
//!
//! Invariants: timestamps are non-decreasing and relative offsets strictly
//! increasing from entry to entry (asserted on push, verified on open), so
//! searches by time are binary searches over the mapping.

use std::path::Path;

use crate::header::{read_i64, read_u32, IndexKind};
use crate::table::IndexTable;
use crate::IndexError;

const ENTRY_BYTES: usize = 12;

/// One time index entry: every record up to and including `rel_offset` has
/// a timestamp `<= timestamp_ms`, and `timestamp_ms` is the maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    /// Maximum record timestamp so far in the segment, in ms since the epoch.
    pub timestamp_ms: i64,
    /// Relative offset of the last record of the batch.
    pub rel_offset: u32,
}

impl TimeEntry {
    fn encode(self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0..8].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        out[8..12].copy_from_slice(&self.rel_offset.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        TimeEntry {
            timestamp_ms: read_i64(bytes, 0),
            rel_offset: read_u32(bytes, 8),
        }
    }
}

/// Maximum-timestamp -> relative offset index of one segment.
#[derive(Debug)]
pub struct TimeIndex {
    table: IndexTable,
}

impl TimeIndex {
    /// New active (writable) index with room for `capacity_entries`
    /// entries, kept in memory: nothing is written to `path` until
    /// [`Self::seal`].
    pub fn create(
        path: &Path,
        base_offset: u64,
        capacity_entries: u32,
    ) -> Result<Self, IndexError> {
        let table = IndexTable::create(
            path,
            IndexKind::Time,
            ENTRY_BYTES,
            base_offset,
            capacity_entries,
        )?;
        Ok(TimeIndex { table })
    }

    /// Opens a sealed index read-only and verifies the header (magic,
    /// version, kind, sealed flag, base offset, exact length, CRC) and entry
    /// monotonicity. Anything wrong is [`IndexError::Corrupt`].
    pub fn open_sealed(path: &Path, expected_base_offset: u64) -> Result<Self, IndexError> {
        let table =
            IndexTable::open_sealed(path, IndexKind::Time, ENTRY_BYTES, expected_base_offset)?;
        let index = TimeIndex { table };
        let mut previous: Option<TimeEntry> = None;
        for (i, bytes) in index.table.entries().chunks_exact(ENTRY_BYTES).enumerate() {
            let entry = TimeEntry::decode(bytes);
            if let Some(previous) = previous {
                if entry.timestamp_ms < previous.timestamp_ms
                    || entry.rel_offset <= previous.rel_offset
                {
                    return Err(index
                        .table
                        .corrupt(format!("entry {i} {entry:?} does not follow {previous:?}")));
                }
            }
            previous = Some(entry);
        }
        index.table.release_resident();
        Ok(index)
    }

    /// Appends an entry. The timestamp must be `>=` and the relative offset
    /// `>` the previous entry's (asserted), and the index must not be sealed
    /// (asserted). `Err(Full)` at capacity.
    pub fn push(&mut self, timestamp_ms: i64, rel_offset: u32) -> Result<(), IndexError> {
        if let Some(last) = self.last() {
            assert!(
                timestamp_ms >= last.timestamp_ms && rel_offset > last.rel_offset,
                "time index push ({timestamp_ms}, {rel_offset}) does not follow {last:?}"
            );
        }
        self.table.push(
            &TimeEntry {
                timestamp_ms,
                rel_offset,
            }
            .encode(),
        )
    }

    /// Last entry with `timestamp_ms < t`: every record up to and including
    /// its `rel_offset` is older than `t`. `None` if there is no such entry.
    pub fn last_before(&self, t: i64) -> Option<TimeEntry> {
        let count = self
            .table
            .partition_point(|bytes| TimeEntry::decode(bytes).timestamp_ms < t);
        count.checked_sub(1).and_then(|i| self.get(i))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True if there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last entry, if any.
    pub fn last(&self) -> Option<TimeEntry> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }

    /// Entry number `i`, if it exists.
    pub fn get(&self, i: usize) -> Option<TimeEntry> {
        self.table.entry(i).map(TimeEntry::decode)
    }

    /// True once sealed.
    pub fn is_sealed(&self) -> bool {
        self.table.is_sealed()
    }

    /// Entry capacity (equal to `len()` once sealed).
    pub fn capacity(&self) -> u32 {
        self.table.capacity()
    }

    /// Seals, exactly like [`crate::OffsetIndex::seal`]. Afterwards `push`
    /// panics.
    pub fn seal(&mut self, segment_bytes: u64) -> Result<(), IndexError> {
        self.table.seal(segment_bytes)
    }

    /// The segment base offset this index belongs to.
    pub fn base_offset(&self) -> u64 {
        self.table.base_offset()
    }

    /// Segment data length recorded at seal (0 while active).
    pub fn segment_bytes(&self) -> u64 {
        self.table.segment_bytes()
    }

    /// Path of the index file.
    pub fn path(&self) -> &Path {
        self.table.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_every_bit_flip_fails, assert_every_truncation_fails};
    use proptest::prelude::*;

    fn entry(timestamp_ms: i64, rel_offset: u32) -> Option<TimeEntry> {
        Some(TimeEntry {
            timestamp_ms,
            rel_offset,
        })
    }

    fn sample(path: &Path) -> TimeIndex {
        let mut index = TimeIndex::create(path, 500, 10).unwrap();
        for (ts, rel) in [(-5, 0), (100, 3), (100, 9), (250, 10), (400, 40)] {
            index.push(ts, rel).unwrap();
        }
        index
    }

    fn check_sample(index: &TimeIndex) {
        assert_eq!(index.len(), 5);
        assert_eq!(index.last_before(-5), None);
        assert_eq!(index.last_before(-4), entry(-5, 0));
        assert_eq!(index.last_before(100), entry(-5, 0));
        assert_eq!(index.last_before(101), entry(100, 9));
        assert_eq!(index.last_before(400), entry(250, 10));
        assert_eq!(index.last_before(i64::MAX), entry(400, 40));
        assert_eq!(index.last(), entry(400, 40));
        assert_eq!(index.get(1), entry(100, 3));
        assert_eq!(index.get(9), None);
    }

    #[test]
    fn round_trip_through_seal_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut index = sample(&path);
        check_sample(&index);
        index.seal(2048).unwrap();
        check_sample(&index);
        drop(index);
        let index = TimeIndex::open_sealed(&path, 500).unwrap();
        check_sample(&index);
        assert_eq!(index.segment_bytes(), 2048);
        assert_eq!(index.base_offset(), 500);
        assert!(index.is_sealed());
    }

    #[test]
    fn full_at_capacity_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = TimeIndex::create(&dir.path().join("t"), 0, 1).unwrap();
        assert!(index.is_empty());
        assert_eq!(index.last_before(0), None);
        index.push(1, 1).unwrap();
        assert!(matches!(
            index.push(2, 2),
            Err(IndexError::Full { capacity: 1 })
        ));
        match TimeIndex::open_sealed(&dir.path().join("missing"), 0) {
            Err(IndexError::Io(error)) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    #[should_panic(expected = "does not follow")]
    fn decreasing_timestamp_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = TimeIndex::create(&dir.path().join("t"), 0, 4).unwrap();
        index.push(10, 1).unwrap();
        let _ = index.push(9, 2);
    }

    #[test]
    fn corruption_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        sample(&path).seal(1).unwrap();
        assert!(matches!(
            TimeIndex::open_sealed(&path, 501),
            Err(IndexError::Corrupt { .. })
        ));
        assert!(matches!(
            crate::OffsetIndex::open_sealed(&path, 500),
            Err(IndexError::Corrupt { .. })
        ));
        let open = |p: &Path| TimeIndex::open_sealed(p, 500).map(|_| ());
        assert_every_bit_flip_fails(&path, usize::MAX, open);
        assert_every_truncation_fails(&path, open);
        // Decreasing timestamps under a valid CRC are caught by the order check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[64 + 12..64 + 20].copy_from_slice(&(-6i64).to_le_bytes());
        crate::test_support::rewrite_crc(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            TimeIndex::open_sealed(&path, 500),
            Err(IndexError::Corrupt { .. })
        ));
    }

    fn monotone_entries() -> impl Strategy<Value = Vec<(i64, u32)>> {
        prop::collection::vec((0i64..30, 1u32..20), 0..60).prop_map(|steps| {
            let (mut ts, mut rel) = (-100i64, 0u32);
            steps
                .into_iter()
                .map(|(d_ts, d_rel)| {
                    ts += d_ts;
                    rel += d_rel;
                    (ts, rel)
                })
                .collect()
        })
    }

    fn check_against_oracle(index: &TimeIndex, oracle: &[(i64, u32)], probes: &[i64]) {
        assert_eq!(index.len(), oracle.len());
        for &t in probes {
            let expected =
                oracle
                    .iter()
                    .rev()
                    .find(|(ts, _)| *ts < t)
                    .map(|&(timestamp_ms, rel_offset)| TimeEntry {
                        timestamp_ms,
                        rel_offset,
                    });
            assert_eq!(index.last_before(t), expected, "last_before({t})");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn last_before_matches_linear_scan(
            entries in monotone_entries(),
            probes in prop::collection::vec(-120i64..2000, 1..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t");
            let mut index = TimeIndex::create(&path, 9, entries.len() as u32).unwrap();
            for &(ts, rel) in &entries {
                index.push(ts, rel).unwrap();
            }
            check_against_oracle(&index, &entries, &probes);
            index.seal(3).unwrap();
            check_against_oracle(&index, &entries, &probes);
            drop(index);
            let index = TimeIndex::open_sealed(&path, 9).unwrap();
            check_against_oracle(&index, &entries, &probes);
        }
    }
}
