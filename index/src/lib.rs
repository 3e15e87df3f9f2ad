//! Per-segment indexes for the DMQ commit log.
//!
//! This crate knows nothing about the log's record format. Inside a
//! segment, offsets are `u32` relative offsets (offset minus the segment's
//! base offset) and byte positions are `u32`.
//!
//! # Layout
//!
//! - `header` — the 64-byte header shared by every index file (magic
//!   "DMDX", version, kind, base offset, segment bytes, count, sealed flag,
//!   CRC-32 over header and entries). [`INDEX_HEADER_LEN`].
//! - `mmap` — the only module with `unsafe`: the read-only mapping of a
//!   sealed index file, with its contract.
//! - `table` — fixed-width entries behind the header: in memory while
//!   active, written and fsynced in one go at seal, then mapped read-only;
//!   verified open. Shared by all four kinds.
//! - `offset` — [`OffsetIndex`]: sparse relative offset -> byte position.
//! - `time` — [`TimeIndex`]: maximum timestamp so far -> relative offset.
//! - `id` — [`IdIndexBuilder`] (in memory, active segment) and
//!   [`SealedIdIndex`]: exact 16-byte message id -> relative offset.
//! - `key` — [`KeyIndexBuilder`] and [`SealedKeyIndex`]: [`key_hash`] ->
//!   candidate relative offsets, to be verified against the record's key.
//! - `error` — [`IndexError`].
//!
//! # Life cycle
//!
//! While a segment is active all four of its indexes live in memory: an
//! active segment has no index file, so an empty or quiet partition costs
//! nothing here. At roll-over the caller seals all four; sealed files are
//! read-only, exactly sized and CRC-protected. Any index file that fails
//! verification on open is reported as [`IndexError::Corrupt`] and the
//! caller rebuilds it from the log. An unsealed file (crash while active)
//! never opens: the caller rebuilds it too.

// Tests may unwrap; library code may not (checked by the non-test clippy pass).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
mod header;
mod id;
mod key;
mod mmap;
mod offset;
mod table;
#[cfg(test)]
mod test_support;
mod time;

pub use error::IndexError;
pub use header::INDEX_HEADER_LEN;
pub use id::{IdIndexBuilder, SealedIdIndex};
pub use key::{key_hash, KeyIndexBuilder, SealedKeyIndex};
pub use offset::{OffsetEntry, OffsetIndex};
pub use time::{TimeEntry, TimeIndex};

/// A message id: 16 bytes, unique, stable for the message's whole life.
pub type MessageIdBytes = [u8; 16];

/// Entry point for the `index_open` fuzz target in `fuzz/` and its corpus
/// replay test (`tests/fuzz_corpus.rs`). It must never panic, whatever the
/// input: a panic is a bug in this crate.
pub mod fuzzing {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::{key_hash, OffsetIndex, SealedIdIndex, SealedKeyIndex, TimeIndex};

    /// A scratch directory for one fuzz call, removed on drop. Also used by
    /// `dmq-log-store`'s fuzz entry points.
    #[derive(Debug)]
    pub struct ScratchDir {
        /// The directory.
        pub path: PathBuf,
    }

    impl ScratchDir {
        /// Creates a fresh, empty directory under the system temp dir.
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "dmq-fuzz-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("creating a fuzz scratch directory");
            ScratchDir { path }
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    fn u32_at(data: &[u8], at: usize) -> Option<u32> {
        let bytes = data.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64_at(data: &[u8], at: usize) -> Option<u64> {
        let bytes: [u8; 8] = data.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// Values to look up: the extremes and a few taken from the input.
    fn probes(data: &[u8]) -> Vec<u64> {
        let mut probes = vec![0, 1, u64::from(u32::MAX), u64::MAX];
        for at in (crate::INDEX_HEADER_LEN..data.len()).step_by(29).take(8) {
            probes.extend(u64_at(data, at));
            probes.extend(u32_at(data, at).map(u64::from));
        }
        probes
    }

    /// Writes `data` as a sealed index file of each kind (offset, time, id,
    /// key), opens each with the base offset its header names and with 0,
    /// and runs lookups on whatever opens, checking their postconditions.
    /// The first entry of a file that opens (at byte 64) must be found.
    pub fn open_index_files(data: &[u8]) {
        let dir = ScratchDir::new();
        let mut bases = vec![u64_at(data, 8).unwrap_or(0)];
        if bases[0] != 0 {
            bases.push(0);
        }
        let probes = probes(data);
        let first_entry = crate::INDEX_HEADER_LEN;
        for (name, open) in [
            (
                "offset",
                open_offset as fn(&Path, u64, &[u8], &[u64], usize),
            ),
            ("time", open_time),
            ("id", open_id),
            ("key", open_key),
        ] {
            let path = dir.path.join(format!("00000000000000000000.{name}"));
            std::fs::write(&path, data).expect("writing a fuzz index file");
            for &base in &bases {
                open(&path, base, data, &probes, first_entry);
            }
        }
    }

    fn open_offset(path: &Path, base: u64, data: &[u8], probes: &[u64], first: usize) {
        let Ok(index) = OffsetIndex::open_sealed(path, base) else {
            return;
        };
        assert!(index.is_sealed());
        assert_eq!(index.base_offset(), base);
        if let (Some(rel_offset), Some(position)) = (u32_at(data, first), u32_at(data, first + 4)) {
            let entry = index.lookup(rel_offset).expect("the first entry is found");
            assert_eq!((entry.rel_offset, entry.position), (rel_offset, position));
        }
        for &probe in probes {
            let target = u32::try_from(probe).unwrap_or(u32::MAX);
            if let Some(entry) = index.lookup(target) {
                assert!(entry.rel_offset <= target);
            }
            if let Some(entry) = index.next_after_position(target) {
                assert!(entry.position > target);
            }
        }
        assert!(index.get(index.len()).is_none());
        assert_eq!(
            index.last(),
            index.len().checked_sub(1).and_then(|i| index.get(i))
        );
    }

    fn open_time(path: &Path, base: u64, data: &[u8], probes: &[u64], first: usize) {
        let Ok(index) = TimeIndex::open_sealed(path, base) else {
            return;
        };
        assert!(index.is_sealed());
        if let (Some(timestamp), Some(rel_offset)) = (u64_at(data, first), u32_at(data, first + 8))
        {
            let entry = index.get(0).expect("the first entry is readable");
            assert_eq!(
                (entry.timestamp_ms, entry.rel_offset),
                (timestamp as i64, rel_offset)
            );
        }
        for &probe in probes.iter().chain(&[i64::MIN as u64, i64::MAX as u64]) {
            let t = probe as i64;
            if let Some(entry) = index.last_before(t) {
                assert!(entry.timestamp_ms < t);
            }
        }
        assert!(index.get(index.len()).is_none());
    }

    fn open_id(path: &Path, base: u64, data: &[u8], probes: &[u64], first: usize) {
        let Ok(index) = SealedIdIndex::open(path, base) else {
            return;
        };
        if let (Some(id), Some(rel_offset)) = (
            data.get(first..first + 16)
                .and_then(|id| <[u8; 16]>::try_from(id).ok()),
            u32_at(data, first + 16),
        ) {
            assert_eq!(index.get(&id), Some(rel_offset), "the first id is found");
        }
        for &probe in probes {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&probe.to_be_bytes());
            let _ = index.get(&id);
        }
        let _ = index.get(&[0xFF; 16]);
        let _ = (index.len(), index.is_empty());
    }

    fn open_key(path: &Path, base: u64, data: &[u8], probes: &[u64], first: usize) {
        let Ok(index) = SealedKeyIndex::open(path, base) else {
            return;
        };
        if let (Some(hash), Some(rel_offset)) = (u64_at(data, first), u32_at(data, first + 8)) {
            let found = index.get_hash(hash);
            assert!(found.contains(&rel_offset), "the first key entry is found");
            assert!(found.windows(2).all(|pair| pair[0] < pair[1]));
        }
        for &probe in probes {
            let found = index.get_hash(probe);
            assert!(found.windows(2).all(|pair| pair[0] < pair[1]));
            let _ = index.get(&probe.to_le_bytes());
        }
        let _ = index.get(b"");
        let _ = key_hash(data);
    }
}
