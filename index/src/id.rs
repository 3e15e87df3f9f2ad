//! The message-id index: 16-byte message id -> relative offset, exact.
//!
//! Owns [`IdIndexBuilder`] (in memory, for the active segment) and
//! [`SealedIdIndex`] (the file written when the segment is sealed).
//! Entries are 20 bytes: the id's 16 bytes, then `rel_offset: u32 LE`.
//!
//! Invariants: a duplicate id keeps its FIRST offset; the sealed file holds
//! each id once, sorted strictly ascending by id bytes (verified on open),
//! so lookups are binary searches over the mapping.

use std::collections::HashMap;
use std::path::Path;

use crate::header::{read_u32, IndexKind};
use crate::table::IndexTable;
use crate::{IndexError, MessageIdBytes};

const ID_BYTES: usize = 16;
const ENTRY_BYTES: usize = ID_BYTES + 4;

fn encode_entry(id: &MessageIdBytes, rel_offset: u32) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[..ID_BYTES].copy_from_slice(id);
    out[ID_BYTES..].copy_from_slice(&rel_offset.to_le_bytes());
    out
}

/// In-memory id index of the active segment.
///
/// The log's own ids ascend (time prefix, then a counter), so they are kept
/// in a vector in arrival order: an insert is a push, with no hashing and
/// no cache miss, and a lookup a binary search. Ids that arrive out of
/// order (chosen by a caller: fired delays, dead letters, moves keep their
/// id; or a clock that stepped back) go to a small hash map beside it.
/// Each id is in one of the two, at its first offset.
#[derive(Debug, Default, Clone)]
pub struct IdIndexBuilder {
    /// Strictly ascending by id.
    ascending: Vec<(MessageIdBytes, u32)>,
    /// Ids not in `ascending`.
    others: HashMap<MessageIdBytes, u32>,
}

impl IdIndexBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that message `id` is at `rel_offset`. If the id is already
    /// present the first offset is kept.
    pub fn insert(&mut self, id: MessageIdBytes, rel_offset: u32) {
        let after_last = self.ascending.last().is_none_or(|(last, _)| id > *last);
        if after_last {
            // (An empty map answers without hashing.)
            if !self.others.contains_key(&id) {
                self.ascending.push((id, rel_offset));
            }
        } else if self.ascending_position(&id).is_err() {
            self.others.entry(id).or_insert(rel_offset);
        }
    }

    /// Relative offset of message `id`, if present.
    pub fn get(&self, id: &MessageIdBytes) -> Option<u32> {
        match self.ascending_position(id) {
            Ok(index) => self.ascending.get(index).map(|(_, rel)| *rel),
            Err(_) => self.others.get(id).copied(),
        }
    }

    fn ascending_position(&self, id: &MessageIdBytes) -> Result<usize, usize> {
        self.ascending.binary_search_by(|(probe, _)| probe.cmp(id))
    }

    /// Number of distinct ids.
    pub fn len(&self) -> usize {
        self.ascending.len() + self.others.len()
    }

    /// True if no id was inserted.
    pub fn is_empty(&self) -> bool {
        self.ascending.is_empty() && self.others.is_empty()
    }

    /// Forgets every id (e.g. after truncating the active segment).
    pub fn clear(&mut self) {
        self.ascending.clear();
        self.others.clear();
    }

    /// Writes the sealed file at `path` (entries sorted by id, written and
    /// fsynced)
    /// and returns it reopened read-only and verified. Fsyncing the
    /// directory entry is the caller's job.
    pub fn write_sealed(
        &self,
        path: &Path,
        base_offset: u64,
        segment_bytes: u64,
    ) -> Result<SealedIdIndex, IndexError> {
        let count =
            u32::try_from(self.len()).map_err(|_| IndexError::Full { capacity: u32::MAX })?;
        let mut others: Vec<(&MessageIdBytes, u32)> =
            self.others.iter().map(|(id, &rel)| (id, rel)).collect();
        others.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut table = IndexTable::create(path, IndexKind::Id, ENTRY_BYTES, base_offset, count)?;
        // Merge the two sorted runs (they share no id).
        let mut ascending = self.ascending.iter().map(|(id, rel)| (id, *rel)).peekable();
        let mut others = others.into_iter().peekable();
        loop {
            let next = match (ascending.peek(), others.peek()) {
                (Some(a), Some(o)) if a.0 < o.0 => ascending.next(),
                (Some(_), Some(_)) | (None, Some(_)) => others.next(),
                (Some(_), None) => ascending.next(),
                (None, None) => break,
            };
            if let Some((id, rel_offset)) = next {
                table.push(&encode_entry(id, rel_offset))?;
            }
        }
        table.seal(segment_bytes)?;
        drop(table);
        SealedIdIndex::open(path, base_offset)
    }
}

/// Read-only id index of a sealed segment.
#[derive(Debug)]
pub struct SealedIdIndex {
    table: IndexTable,
}

impl SealedIdIndex {
    /// Opens and verifies a sealed id index (header, length, CRC, strictly
    /// ascending ids). Anything wrong is [`IndexError::Corrupt`].
    pub fn open(path: &Path, expected_base_offset: u64) -> Result<Self, IndexError> {
        let table =
            IndexTable::open_sealed(path, IndexKind::Id, ENTRY_BYTES, expected_base_offset)?;
        let index = SealedIdIndex { table };
        let mut previous: Option<&[u8]> = None;
        for (i, entry) in index.table.entries().chunks_exact(ENTRY_BYTES).enumerate() {
            let id = &entry[..ID_BYTES];
            if previous.is_some_and(|previous| id <= previous) {
                return Err(index
                    .table
                    .corrupt(format!("entry {i}: ids not strictly ascending")));
            }
            previous = Some(id);
        }
        index.table.release_resident();
        Ok(index)
    }

    /// Relative offset of message `id`, by binary search; `None` if absent.
    pub fn get(&self, id: &MessageIdBytes) -> Option<u32> {
        let at = self
            .table
            .partition_point(|entry| entry[..ID_BYTES] < id[..]);
        let entry = self.table.entry(at)?;
        (entry[..ID_BYTES] == id[..]).then(|| read_u32(entry, ID_BYTES))
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Every (id, relative offset), in id order.
    pub fn iter(&self) -> impl Iterator<Item = (MessageIdBytes, u32)> + '_ {
        self.table.entries().chunks_exact(ENTRY_BYTES).map(|entry| {
            let mut id = [0u8; ID_BYTES];
            id.copy_from_slice(&entry[..ID_BYTES]);
            (id, read_u32(entry, ID_BYTES))
        })
    }

    /// True if the index holds no id.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segment base offset this index belongs to.
    pub fn base_offset(&self) -> u64 {
        self.table.base_offset()
    }

    /// Segment data length recorded at seal.
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

    fn id(n: u8) -> MessageIdBytes {
        let mut id = [0u8; 16];
        id[0] = n.wrapping_mul(37);
        id[15] = n;
        id
    }

    #[test]
    fn builder_keeps_first_offset_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let mut builder = IdIndexBuilder::new();
        assert!(builder.is_empty());
        for n in 0..6u8 {
            builder.insert(id(n), u32::from(n) * 10);
        }
        builder.insert(id(2), 999);
        assert_eq!(builder.len(), 6);
        assert_eq!(builder.get(&id(2)), Some(20));
        assert_eq!(builder.get(&id(9)), None);
        let sealed = builder.write_sealed(&path, 70, 4000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 + 6 * 20);
        assert_eq!(sealed.len(), 6);
        assert_eq!(sealed.segment_bytes(), 4000);
        assert_eq!(sealed.base_offset(), 70);
        for n in 0..6u8 {
            assert_eq!(sealed.get(&id(n)), Some(u32::from(n) * 10));
        }
        assert_eq!(sealed.get(&id(9)), None);
        assert_eq!(sealed.get(&[0xFF; 16]), None);
        assert_eq!(sealed.get(&[1; 16]), None);
        builder.clear();
        assert!(builder.is_empty());
    }

    #[test]
    fn empty_builder_writes_empty_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let sealed = IdIndexBuilder::new().write_sealed(&path, 0, 0).unwrap();
        assert!(sealed.is_empty());
        assert_eq!(sealed.get(&[0; 16]), None);
        assert_eq!(SealedIdIndex::open(&path, 0).unwrap().len(), 0);
    }

    #[test]
    fn corruption_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids");
        let mut builder = IdIndexBuilder::new();
        for n in 0..5u8 {
            builder.insert(id(n), u32::from(n));
        }
        builder.write_sealed(&path, 3, 10).unwrap();
        assert!(matches!(
            SealedIdIndex::open(&path, 4),
            Err(IndexError::Corrupt { .. })
        ));
        match SealedIdIndex::open(&dir.path().join("missing"), 3) {
            Err(IndexError::Io(error)) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
        let open = |p: &Path| SealedIdIndex::open(p, 3).map(|_| ());
        assert_every_bit_flip_fails(&path, usize::MAX, open);
        assert_every_truncation_fails(&path, open);
        // A duplicated id under a valid CRC is caught by the order check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.copy_within(64..64 + 16, 64 + 20);
        crate::test_support::rewrite_crc(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            SealedIdIndex::open(&path, 3),
            Err(IndexError::Corrupt { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn mostly_ascending_ids_match_the_oracle(
            steps in prop::collection::vec((0u8..8, 0u8..4, any::<u32>()), 0..200),
        ) {
            // The log's own ids ascend; now and then a caller's id (older,
            // or equal to one already in) or a clock step back arrives.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ids");
            let mut builder = IdIndexBuilder::new();
            let mut oracle: HashMap<MessageIdBytes, u32> = HashMap::new();
            let mut next: u16 = 100;
            let mut seen: Vec<MessageIdBytes> = Vec::new();
            for &(kind, back, rel) in &steps {
                let id = match kind {
                    // An id seen before (a duplicate).
                    0 if !seen.is_empty() => seen[rel as usize % seen.len()],
                    // An id below the last one.
                    1 => {
                        let mut id = [0u8; 16];
                        id[14..].copy_from_slice(&next.saturating_sub(u16::from(back) * 7 + 1).to_be_bytes());
                        id[15] ^= 1;
                        id
                    }
                    // The next ascending id.
                    _ => {
                        next += 1 + u16::from(back);
                        let mut id = [0u8; 16];
                        id[14..].copy_from_slice(&next.to_be_bytes());
                        id
                    }
                };
                seen.push(id);
                builder.insert(id, rel);
                oracle.entry(id).or_insert(rel);
                prop_assert_eq!(builder.len(), oracle.len());
            }
            for id in seen.iter().chain([[0u8; 16], [0xff; 16]].iter()) {
                prop_assert_eq!(builder.get(id), oracle.get(id).copied());
            }
            let sealed = builder.write_sealed(&path, 1, 2).unwrap();
            prop_assert_eq!(sealed.len(), oracle.len());
            let mut expected: Vec<(MessageIdBytes, u32)> = oracle.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(sealed.iter().collect::<Vec<_>>(), expected);
        }

        #[test]
        fn get_matches_hashmap_oracle(
            inserts in prop::collection::vec((0u8..40, any::<[u8; 2]>(), any::<u32>()), 0..80),
            probes in prop::collection::vec(0u8..50, 0..30),
        ) {
            // Ids are drawn from a small space so duplicates are common.
            let make_id = |n: u8, salt: [u8; 2]| {
                let mut id = [0u8; 16];
                id[0] = n;
                id[7] = salt[0] % 2;
                id[15] = salt[1] % 2;
                id
            };
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ids");
            let mut builder = IdIndexBuilder::new();
            let mut oracle: HashMap<MessageIdBytes, u32> = HashMap::new();
            for &(n, salt, rel) in &inserts {
                builder.insert(make_id(n, salt), rel);
                oracle.entry(make_id(n, salt)).or_insert(rel);
            }
            let sealed = builder.write_sealed(&path, 1, 2).unwrap();
            let reopened = SealedIdIndex::open(&path, 1).unwrap();
            prop_assert_eq!(builder.len(), oracle.len());
            prop_assert_eq!(sealed.len(), oracle.len());
            let all_ids = oracle.keys().copied().chain(
                probes.iter().map(|&n| make_id(n, [1, 0])),
            );
            for id in all_ids {
                let expected = oracle.get(&id).copied();
                prop_assert_eq!(builder.get(&id), expected);
                prop_assert_eq!(sealed.get(&id), expected);
                prop_assert_eq!(reopened.get(&id), expected);
            }
        }
    }
}
