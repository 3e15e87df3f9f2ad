//! The sparse offset index: relative offset -> byte position in the segment.
//!
//! Owns [`OffsetIndex`] and [`OffsetEntry`]. Entries are 8 bytes,
//! `rel_offset: u32 LE` then `position: u32 LE`.
//!
//! Invariants: both fields are strictly increasing from entry to entry
//! (asserted on push, verified on open), so lookups are binary searches
//! over the mapping. The caller decides how sparse the index is.

use std::path::Path;

use crate::header::{read_u32, IndexKind};
use crate::table::IndexTable;
use crate::IndexError;

const ENTRY_BYTES: usize = 8;

/// One offset index entry: the batch starting at `rel_offset` (relative to
/// the segment base offset) begins at byte `position` of the segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Offset relative to the segment's base offset.
    pub rel_offset: u32,
    /// Byte position in the segment file.
    pub position: u32,
}

impl OffsetEntry {
    fn encode(self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0..4].copy_from_slice(&self.rel_offset.to_le_bytes());
        out[4..8].copy_from_slice(&self.position.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        OffsetEntry {
            rel_offset: read_u32(bytes, 0),
            position: read_u32(bytes, 4),
        }
    }
}

/// Sparse relative offset -> byte position index of one segment.
#[derive(Debug)]
pub struct OffsetIndex {
    table: IndexTable,
}

impl OffsetIndex {
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
            IndexKind::Offset,
            ENTRY_BYTES,
            base_offset,
            capacity_entries,
        )?;
        Ok(OffsetIndex { table })
    }

    /// Opens a sealed index read-only and verifies the header (magic,
    /// version, kind, sealed flag, base offset, exact length, CRC) and that
    /// entries are strictly increasing. Anything wrong is
    /// [`IndexError::Corrupt`]; a missing file is [`IndexError::Io`].
    pub fn open_sealed(path: &Path, expected_base_offset: u64) -> Result<Self, IndexError> {
        let table =
            IndexTable::open_sealed(path, IndexKind::Offset, ENTRY_BYTES, expected_base_offset)?;
        let index = OffsetIndex { table };
        let mut previous: Option<OffsetEntry> = None;
        for (i, bytes) in index.table.entries().chunks_exact(ENTRY_BYTES).enumerate() {
            let entry = OffsetEntry::decode(bytes);
            if let Some(previous) = previous {
                if entry.rel_offset <= previous.rel_offset || entry.position <= previous.position {
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

    /// Appends an entry. Both fields must be strictly greater than the
    /// previous entry's (asserted: a violation is a caller bug), and the
    /// index must not be sealed (asserted). `Err(Full)` at capacity.
    pub fn push(&mut self, rel_offset: u32, position: u32) -> Result<(), IndexError> {
        if let Some(last) = self.last() {
            assert!(
                rel_offset > last.rel_offset && position > last.position,
                "offset index push ({rel_offset}, {position}) does not follow {last:?}"
            );
        }
        self.table.push(
            &OffsetEntry {
                rel_offset,
                position,
            }
            .encode(),
        )
    }

    /// Greatest entry with `rel_offset <= target`, by binary search. `None`
    /// if `target` is before the first entry (or the index is empty).
    pub fn lookup(&self, rel_offset: u32) -> Option<OffsetEntry> {
        let count = self
            .table
            .partition_point(|bytes| OffsetEntry::decode(bytes).rel_offset <= rel_offset);
        count.checked_sub(1).and_then(|i| self.get(i))
    }

    /// First entry whose position is greater than `position` (used to
    /// resynchronise after a corrupt batch). `None` if there is none.
    pub fn next_after_position(&self, position: u32) -> Option<OffsetEntry> {
        let count = self
            .table
            .partition_point(|bytes| OffsetEntry::decode(bytes).position <= position);
        self.get(count)
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
    pub fn last(&self) -> Option<OffsetEntry> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }

    /// Entry number `i`, if it exists.
    pub fn get(&self, i: usize) -> Option<OffsetEntry> {
        self.table.entry(i).map(OffsetEntry::decode)
    }

    /// True once sealed (by [`OffsetIndex::seal`] or [`OffsetIndex::open_sealed`]).
    pub fn is_sealed(&self) -> bool {
        self.table.is_sealed()
    }

    /// Entry capacity (equal to `len()` once sealed).
    pub fn capacity(&self) -> u32 {
        self.table.capacity()
    }

    /// Seals: writes the header (count, `segment_bytes`, sealed flag, CRC)
    /// and the entries to the file, fsyncs it and maps it read-only. Afterwards `push` panics.
    /// On error the index reads as empty and its file should be rebuilt.
    /// Fsyncing the directory entry is the caller's job.
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

    fn entry(rel_offset: u32, position: u32) -> Option<OffsetEntry> {
        Some(OffsetEntry {
            rel_offset,
            position,
        })
    }

    fn sample(path: &Path) -> OffsetIndex {
        let mut index = OffsetIndex::create(path, 1000, 8).unwrap();
        for (rel, pos) in [(0, 0), (10, 100), (20, 250), (35, 400), (50, 900)] {
            index.push(rel, pos).unwrap();
        }
        index
    }

    fn check_sample_lookups(index: &OffsetIndex) {
        assert_eq!(index.len(), 5);
        assert_eq!(index.lookup(0), entry(0, 0));
        assert_eq!(index.lookup(9), entry(0, 0));
        assert_eq!(index.lookup(10), entry(10, 100));
        assert_eq!(index.lookup(34), entry(20, 250));
        assert_eq!(index.lookup(50), entry(50, 900));
        assert_eq!(index.lookup(u32::MAX), entry(50, 900));
        assert_eq!(index.next_after_position(0), entry(10, 100));
        assert_eq!(index.next_after_position(260), entry(35, 400));
        assert_eq!(index.next_after_position(900), None);
        assert_eq!(index.last(), entry(50, 900));
        assert_eq!(index.get(2), entry(20, 250));
        assert_eq!(index.get(5), None);
        assert_eq!(index.base_offset(), 1000);
    }

    #[test]
    fn round_trip_through_seal_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000001000.index");
        let mut index = sample(&path);
        assert!(!index.is_sealed());
        assert_eq!(index.capacity(), 8);
        assert_eq!(index.segment_bytes(), 0);
        check_sample_lookups(&index);
        index.seal(1234).unwrap();
        assert!(index.is_sealed());
        assert_eq!(index.segment_bytes(), 1234);
        check_sample_lookups(&index);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 + 5 * 8);
        drop(index);
        let index = OffsetIndex::open_sealed(&path, 1000).unwrap();
        assert!(index.is_sealed());
        assert_eq!(index.capacity(), 5);
        assert_eq!(index.segment_bytes(), 1234);
        check_sample_lookups(&index);
    }

    #[test]
    fn lookup_before_first_entry_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::create(&dir.path().join("i"), 0, 4).unwrap();
        assert_eq!(index.lookup(7), None);
        assert_eq!(index.last(), None);
        assert!(index.is_empty());
        index.push(5, 64).unwrap();
        assert_eq!(index.lookup(4), None);
        assert_eq!(index.lookup(5), entry(5, 64));
        assert_eq!(index.next_after_position(63), entry(5, 64));
    }

    #[test]
    fn full_at_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::create(&dir.path().join("i"), 0, 2).unwrap();
        index.push(1, 1).unwrap();
        index.push(2, 2).unwrap();
        assert!(matches!(
            index.push(3, 3),
            Err(IndexError::Full { capacity: 2 })
        ));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn empty_index_seals_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let mut index = OffsetIndex::create(&path, 7, 100).unwrap();
        index.seal(0).unwrap();
        let index = OffsetIndex::open_sealed(&path, 7).unwrap();
        assert!(index.is_empty());
        assert_eq!(index.lookup(0), None);
    }

    #[test]
    #[should_panic(expected = "does not follow")]
    fn non_monotonic_push_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::create(&dir.path().join("i"), 0, 4).unwrap();
        index.push(5, 100).unwrap();
        let _ = index.push(6, 100);
    }

    #[test]
    #[should_panic(expected = "sealed")]
    fn push_after_seal_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::create(&dir.path().join("i"), 0, 4).unwrap();
        index.seal(0).unwrap();
        let _ = index.push(1, 1);
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        match OffsetIndex::open_sealed(&dir.path().join("missing"), 0) {
            Err(IndexError::Io(error)) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_base_offset_and_unsealed_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let mut index = sample(&path);
        // An active index has no file; an older version's active file (an
        // unsealed header) is corrupt.
        assert!(!path.exists());
        let unsealed = crate::header::IndexHeader::active(IndexKind::Offset, 1000).encode();
        std::fs::write(&path, unsealed).unwrap();
        assert!(matches!(
            OffsetIndex::open_sealed(&path, 1000),
            Err(IndexError::Corrupt { .. })
        ));
        index.seal(10).unwrap();
        assert!(matches!(
            OffsetIndex::open_sealed(&path, 999),
            Err(IndexError::Corrupt { .. })
        ));
        assert!(matches!(
            crate::TimeIndex::open_sealed(&path, 1000),
            Err(IndexError::Corrupt { .. })
        ));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        sample(&path).seal(4096).unwrap();
        let open = |p: &Path| OffsetIndex::open_sealed(p, 1000).map(|_| ());
        assert_every_bit_flip_fails(&path, usize::MAX, open);
        assert_every_truncation_fails(&path, open);
    }

    #[test]
    fn unordered_entries_with_valid_crc_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        sample(&path).seal(4096).unwrap();
        // Swap two entries and fix up the CRC: only the order check catches it.
        let mut bytes = std::fs::read(&path).unwrap();
        let (first, second) = (64 + 8, 64 + 16);
        let tmp: Vec<u8> = bytes[first..first + 8].to_vec();
        bytes.copy_within(second..second + 8, first);
        bytes[second..second + 8].copy_from_slice(&tmp);
        crate::test_support::rewrite_crc(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let error = OffsetIndex::open_sealed(&path, 1000).unwrap_err();
        assert!(matches!(error, IndexError::Corrupt { .. }), "{error}");
    }

    /// Strictly increasing (rel_offset, position) pairs.
    fn monotone_entries() -> impl Strategy<Value = Vec<(u32, u32)>> {
        prop::collection::vec((1u32..50, 1u32..500), 0..60).prop_map(|steps| {
            let (mut rel, mut pos) = (0u32, 0u32);
            steps
                .into_iter()
                .map(|(d_rel, d_pos)| {
                    rel += d_rel;
                    pos += d_pos;
                    (rel, pos)
                })
                .collect()
        })
    }

    fn check_against_oracle(index: &OffsetIndex, oracle: &[(u32, u32)], probes: &[u32]) {
        assert_eq!(index.len(), oracle.len());
        for &probe in probes {
            let expected = oracle.iter().rev().find(|(rel, _)| *rel <= probe);
            let expected = expected.map(|&(rel_offset, position)| OffsetEntry {
                rel_offset,
                position,
            });
            assert_eq!(index.lookup(probe), expected, "lookup({probe})");
            let expected = oracle.iter().find(|(_, pos)| *pos > probe);
            let expected = expected.map(|&(rel_offset, position)| OffsetEntry {
                rel_offset,
                position,
            });
            assert_eq!(
                index.next_after_position(probe),
                expected,
                "next_after_position({probe})"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn lookups_match_linear_scan(
            entries in monotone_entries(),
            probes in prop::collection::vec(0u32..3000, 1..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("i");
            let mut index = OffsetIndex::create(&path, 5, entries.len() as u32 + 3).unwrap();
            for &(rel, pos) in &entries {
                index.push(rel, pos).unwrap();
            }
            check_against_oracle(&index, &entries, &probes);
            index.seal(77).unwrap();
            check_against_oracle(&index, &entries, &probes);
            drop(index);
            let index = OffsetIndex::open_sealed(&path, 5).unwrap();
            check_against_oracle(&index, &entries, &probes);
        }
    }
}
