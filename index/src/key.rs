//! The key index: message key -> candidate relative offsets, by key hash.
//!
//! Owns [`key_hash`], [`KeyIndexBuilder`] (in memory, for the active
//! segment) and [`SealedKeyIndex`] (the file written at seal). Entries are
//! 12 bytes: `hash: u64 LE`, then `rel_offset: u32 LE`.
//!
//! The index stores hashes, not keys: a lookup returns every record whose
//! key has the same hash, and the caller must compare the record's key.
//!
//! Invariants: each (hash, rel_offset) pair appears once; the sealed file is
//! sorted strictly ascending by (hash, rel_offset) (verified on open), so a
//! lookup is a binary search for the first entry of the hash followed by a
//! scan of that hash's run, which yields ascending offsets.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;

use crate::header::{read_u32, read_u64, IndexKind};
use crate::table::IndexTable;
use crate::IndexError;

const ENTRY_BYTES: usize = 12;
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The persisted key hash: 64-bit FNV-1a over the key bytes (offset basis
/// `0xcbf29ce484222325`, prime `0x100000001b3`). This function is part of
/// the file format and must never change.
pub fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

fn encode_entry(hash: u64, rel_offset: u32) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[0..8].copy_from_slice(&hash.to_le_bytes());
    out[8..12].copy_from_slice(&rel_offset.to_le_bytes());
    out
}

fn decode_entry(bytes: &[u8]) -> (u64, u32) {
    (read_u64(bytes, 0), read_u32(bytes, 8))
}

/// In-memory key index of the active segment.
///
/// Memory: a hash seen once costs one `(u64, u32)` map slot; only hashes
/// seen more than once get a (sorted) overflow vector.
#[derive(Debug, Default, Clone)]
pub struct KeyIndexBuilder {
    /// Smallest offset recorded for each hash.
    first: HashMap<u64, u32>,
    /// Further offsets for hashes seen more than once, ascending, all
    /// greater than the hash's entry in `first`.
    more: HashMap<u64, Vec<u32>>,
    /// Total (hash, offset) pairs.
    entries: usize,
}

impl KeyIndexBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the record at `rel_offset` has key `key`. Inserting the
    /// same (key, offset) twice is a no-op; offsets may arrive in any order.
    pub fn insert(&mut self, key: &[u8], rel_offset: u32) {
        self.insert_hash(key_hash(key), rel_offset);
    }

    /// [`KeyIndexBuilder::insert`] for a precomputed [`key_hash`].
    pub fn insert_hash(&mut self, hash: u64, rel_offset: u32) {
        match self.first.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(rel_offset);
                self.entries += 1;
            }
            Entry::Occupied(mut slot) => {
                let first = *slot.get();
                if rel_offset == first {
                    return;
                }
                let more = self.more.entry(hash).or_default();
                if rel_offset < first {
                    slot.insert(rel_offset);
                    more.insert(0, first);
                    self.entries += 1;
                } else if let Err(at) = more.binary_search(&rel_offset) {
                    more.insert(at, rel_offset);
                    self.entries += 1;
                }
            }
        }
    }

    /// Ascending offsets of every record whose key hashes like `key`
    /// (a superset of the exact matches).
    pub fn get(&self, key: &[u8]) -> Vec<u32> {
        self.get_hash(key_hash(key))
    }

    /// Ascending offsets recorded under `hash`.
    pub fn get_hash(&self, hash: u64) -> Vec<u32> {
        let Some(&first) = self.first.get(&hash) else {
            return Vec::new();
        };
        let more = self.more.get(&hash).map_or(&[][..], Vec::as_slice);
        let mut offsets = Vec::with_capacity(1 + more.len());
        offsets.push(first);
        offsets.extend_from_slice(more);
        offsets
    }

    /// Number of (hash, offset) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True if nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Forgets everything (e.g. after truncating the active segment).
    pub fn clear(&mut self) {
        self.first.clear();
        self.more.clear();
        self.entries = 0;
    }

    /// Writes the sealed file at `path` (entries sorted by (hash, offset),
    /// written and fsynced) and returns it reopened read-only and verified.
    /// Fsyncing the directory entry is the caller's job.
    pub fn write_sealed(
        &self,
        path: &Path,
        base_offset: u64,
        segment_bytes: u64,
    ) -> Result<SealedKeyIndex, IndexError> {
        let count =
            u32::try_from(self.entries).map_err(|_| IndexError::Full { capacity: u32::MAX })?;
        let mut sorted: Vec<(u64, u32)> = Vec::with_capacity(self.entries);
        for (&hash, &first) in &self.first {
            sorted.push((hash, first));
            if let Some(more) = self.more.get(&hash) {
                sorted.extend(more.iter().map(|&rel| (hash, rel)));
            }
        }
        assert_eq!(
            sorted.len(),
            self.entries,
            "key builder entry count drifted"
        );
        sorted.sort_unstable();
        let mut table = IndexTable::create(path, IndexKind::Key, ENTRY_BYTES, base_offset, count)?;
        for (hash, rel_offset) in sorted {
            table.push(&encode_entry(hash, rel_offset))?;
        }
        table.seal(segment_bytes)?;
        drop(table);
        SealedKeyIndex::open(path, base_offset)
    }
}

/// Read-only key index of a sealed segment.
#[derive(Debug)]
pub struct SealedKeyIndex {
    table: IndexTable,
}

impl SealedKeyIndex {
    /// Opens and verifies a sealed key index (header, length, CRC, entries
    /// strictly ascending by (hash, offset)). Anything wrong is
    /// [`IndexError::Corrupt`].
    pub fn open(path: &Path, expected_base_offset: u64) -> Result<Self, IndexError> {
        let table =
            IndexTable::open_sealed(path, IndexKind::Key, ENTRY_BYTES, expected_base_offset)?;
        let index = SealedKeyIndex { table };
        let mut previous: Option<(u64, u32)> = None;
        for (i, bytes) in index.table.entries().chunks_exact(ENTRY_BYTES).enumerate() {
            let entry = decode_entry(bytes);
            if previous.is_some_and(|previous| entry <= previous) {
                return Err(index
                    .table
                    .corrupt(format!("entry {i} {entry:?} does not follow {previous:?}")));
            }
            previous = Some(entry);
        }
        index.table.release_resident();
        Ok(index)
    }

    /// Ascending offsets of every record whose key hashes like `key`
    /// (a superset of the exact matches).
    pub fn get(&self, key: &[u8]) -> Vec<u32> {
        self.get_hash(key_hash(key))
    }

    /// Ascending offsets recorded under `hash`.
    pub fn get_hash(&self, hash: u64) -> Vec<u32> {
        let start = self
            .table
            .partition_point(|bytes| decode_entry(bytes).0 < hash);
        (start..)
            .map_while(|i| self.table.entry(i).map(decode_entry))
            .take_while(|&(entry_hash, _)| entry_hash == hash)
            .map(|(_, rel_offset)| rel_offset)
            .collect()
    }

    /// Number of (hash, offset) entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Every (key hash, relative offset), in (hash, offset) order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.table
            .entries()
            .chunks_exact(ENTRY_BYTES)
            .map(decode_entry)
    }

    /// True if the index holds no entry.
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

    #[test]
    fn fnv1a_64_reference_vectors() {
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn builder_orders_and_dedups_offsets() {
        let mut builder = KeyIndexBuilder::new();
        assert!(builder.is_empty());
        builder.insert(b"k", 10);
        builder.insert(b"k", 30);
        builder.insert(b"k", 5);
        builder.insert(b"k", 20);
        builder.insert(b"k", 20);
        builder.insert(b"k", 5);
        builder.insert(b"other", 7);
        assert_eq!(builder.get(b"k"), vec![5, 10, 20, 30]);
        assert_eq!(builder.get(b"other"), vec![7]);
        assert_eq!(builder.get(b"none"), Vec::<u32>::new());
        assert_eq!(builder.len(), 5);
        builder.clear();
        assert!(builder.is_empty());
        assert!(builder.get(b"k").is_empty());
    }

    #[test]
    fn colliding_hashes_share_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut builder = KeyIndexBuilder::new();
        builder.insert_hash(42, 3);
        builder.insert_hash(42, 1);
        builder.insert_hash(41, 2);
        builder.insert_hash(43, 0);
        let sealed = builder.write_sealed(&path, 0, 99).unwrap();
        assert_eq!(sealed.get_hash(42), vec![1, 3]);
        assert_eq!(sealed.get_hash(41), vec![2]);
        assert_eq!(sealed.get_hash(43), vec![0]);
        assert!(sealed.get_hash(44).is_empty());
        assert!(sealed.get_hash(0).is_empty());
        assert_eq!(sealed.len(), 4);
        assert_eq!(sealed.segment_bytes(), 99);
    }

    #[test]
    fn corruption_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut builder = KeyIndexBuilder::new();
        for (key, rel) in [(&b"a"[..], 0), (b"b", 1), (b"a", 2), (b"c", 3), (b"", 4)] {
            builder.insert(key, rel);
        }
        let sealed = builder.write_sealed(&path, 11, 500).unwrap();
        assert_eq!(sealed.get(b"a"), vec![0, 2]);
        assert_eq!(sealed.get(b""), vec![4]);
        assert!(matches!(
            SealedKeyIndex::open(&path, 12),
            Err(IndexError::Corrupt { .. })
        ));
        assert!(matches!(
            crate::SealedIdIndex::open(&path, 11),
            Err(IndexError::Corrupt { .. })
        ));
        match SealedKeyIndex::open(&dir.path().join("missing"), 11) {
            Err(IndexError::Io(error)) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
        let open = |p: &Path| SealedKeyIndex::open(p, 11).map(|_| ());
        assert_every_bit_flip_fails(&path, usize::MAX, open);
        assert_every_truncation_fails(&path, open);
        // A duplicated entry under a valid CRC is caught by the order check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.copy_within(64..64 + 12, 64 + 12);
        crate::test_support::rewrite_crc(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            SealedKeyIndex::open(&path, 11),
            Err(IndexError::Corrupt { .. })
        ));
    }

    #[test]
    fn bit_flip_sample_on_a_bigger_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mut builder = KeyIndexBuilder::new();
        for rel in 0..300u32 {
            builder.insert(format!("key-{}", rel % 97).as_bytes(), rel);
        }
        builder.write_sealed(&path, 0, 1).unwrap();
        assert_every_bit_flip_fails(&path, 256, |p| SealedKeyIndex::open(p, 0).map(|_| ()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn get_matches_hash_oracle(
            records in prop::collection::vec((0usize..12, any::<u32>()), 0..80),
            probe_keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..10),
        ) {
            let keys: Vec<Vec<u8>> = (0..12).map(|k| format!("k{k}").into_bytes()).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keys");
            let mut builder = KeyIndexBuilder::new();
            for &(k, rel) in &records {
                builder.insert(&keys[k], rel);
            }
            let sealed = builder.write_sealed(&path, 8, 16).unwrap();
            let reopened = SealedKeyIndex::open(&path, 8).unwrap();
            let mut all_pairs: Vec<(u64, u32)> =
                records.iter().map(|&(k, rel)| (key_hash(&keys[k]), rel)).collect();
            all_pairs.sort_unstable();
            all_pairs.dedup();
            prop_assert_eq!(builder.len(), all_pairs.len());
            prop_assert_eq!(reopened.len(), all_pairs.len());
            for probe in keys.iter().chain(probe_keys.iter()) {
                let hash = key_hash(probe);
                let expected: Vec<u32> = all_pairs
                    .iter()
                    .filter(|(h, _)| *h == hash)
                    .map(|&(_, rel)| rel)
                    .collect();
                for exact in records.iter().filter(|(k, _)| &keys[*k] == probe) {
                    prop_assert!(expected.contains(&exact.1));
                }
                prop_assert_eq!(&builder.get(probe), &expected);
                prop_assert_eq!(&sealed.get(probe), &expected);
                prop_assert_eq!(&reopened.get(probe), &expected);
            }
        }
    }
}
