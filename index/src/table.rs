//! A file of fixed-width entries behind the common header.
//!
//! Owns [`IndexTable`], the storage engine shared by all four index kinds:
//! an active table is entries in memory (no file, no mapping: an empty or
//! quiet segment costs nothing on disk); sealing writes header and entries
//! to the file in one go, fsyncs it and maps it read-only; a sealed file
//! opens with full header/length/CRC verification. It knows nothing about
//! what an entry means; each kind decodes and orders entries itself.
//!
//! Invariants:
//! - `len <= capacity`; an active table has no file on disk (a file at its
//!   path is a leftover of a crash and is overwritten at seal).
//! - A sealed table's file is exactly `INDEX_HEADER_LEN + len * entry_bytes`
//!   bytes, its header says sealed, and its CRC matches.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::header::{crc32, IndexHeader, IndexKind, INDEX_HEADER_LEN};
use crate::mmap::MappedFile;
use crate::IndexError;

#[derive(Debug)]
enum Mapping {
    /// Active: the entries, in memory.
    Memory(Vec<u8>),
    /// Sealed: read-only over the exact file.
    Sealed(MappedFile),
    /// A seal failed midway; the table reads as empty.
    Unmapped,
}

/// Header + fixed-width entries, active (appendable) or sealed (read-only).
#[derive(Debug)]
pub(crate) struct IndexTable {
    path: PathBuf,
    kind: IndexKind,
    entry_bytes: usize,
    base_offset: u64,
    segment_bytes: u64,
    len: u32,
    capacity: u32,
    sealed: bool,
    mapping: Mapping,
}

impl IndexTable {
    /// An active table for `path` with room for `capacity` entries. Nothing
    /// is written until [`IndexTable::seal`]: entries are kept in memory.
    pub fn create(
        path: &Path,
        kind: IndexKind,
        entry_bytes: usize,
        base_offset: u64,
        capacity: u32,
    ) -> Result<Self, IndexError> {
        assert!(entry_bytes > 0, "entry_bytes must be positive");
        Ok(IndexTable {
            path: path.to_path_buf(),
            kind,
            entry_bytes,
            base_offset,
            segment_bytes: 0,
            len: 0,
            capacity,
            sealed: false,
            mapping: Mapping::Memory(Vec::new()),
        })
    }

    /// Releases the resident pages of a sealed table's mapping (its
    /// verification at open touches every page; lookups touch only a few).
    pub fn release_resident(&self) {
        if let Mapping::Sealed(map) = &self.mapping {
            map.release_resident();
        }
    }

    /// Opens a sealed table read-only, verifying magic, version, kind,
    /// sealed flag, base offset, exact file length and CRC. Entry ordering
    /// is the caller's to verify (see [`IndexTable::corrupt`]).
    pub fn open_sealed(
        path: &Path,
        kind: IndexKind,
        entry_bytes: usize,
        expected_base_offset: u64,
    ) -> Result<Self, IndexError> {
        let file = File::open(path)?;
        let map = MappedFile::map(&file)?;
        let bytes = map.as_slice();
        let corrupt = |reason: String| IndexError::corrupt(path, reason);
        let header = IndexHeader::decode(bytes).map_err(corrupt)?;
        if header.kind != kind {
            return Err(corrupt(format!(
                "kind is {:?}, expected {kind:?}",
                header.kind
            )));
        }
        if !header.sealed {
            return Err(corrupt("index is not sealed".to_string()));
        }
        if header.base_offset != expected_base_offset {
            return Err(corrupt(format!(
                "base offset is {}, expected {expected_base_offset}",
                header.base_offset
            )));
        }
        let expected_len = file_bytes(entry_bytes, header.entry_count);
        if bytes.len() as u64 != expected_len {
            return Err(corrupt(format!(
                "file is {} bytes but {} entries need {expected_len}",
                bytes.len(),
                header.entry_count
            )));
        }
        let mut header_bytes = [0u8; INDEX_HEADER_LEN];
        header_bytes.copy_from_slice(&bytes[..INDEX_HEADER_LEN]);
        let actual_crc = crc32(&header_bytes, &bytes[INDEX_HEADER_LEN..]);
        if actual_crc != header.crc {
            return Err(corrupt(format!(
                "crc mismatch: stored {:#010x}, computed {actual_crc:#010x}",
                header.crc
            )));
        }
        Ok(IndexTable {
            path: path.to_path_buf(),
            kind,
            entry_bytes,
            base_offset: header.base_offset,
            segment_bytes: header.segment_bytes,
            len: header.entry_count,
            capacity: header.entry_count,
            sealed: true,
            mapping: Mapping::Sealed(map),
        })
    }

    /// An [`IndexError::Corrupt`] naming this table's file.
    pub fn corrupt(&self, reason: impl Into<String>) -> IndexError {
        IndexError::corrupt(&self.path, reason)
    }

    /// Appends one entry of exactly `entry_bytes` bytes.
    pub fn push(&mut self, entry: &[u8]) -> Result<(), IndexError> {
        assert!(
            !self.sealed,
            "push on a sealed index {}",
            self.path.display()
        );
        assert_eq!(entry.len(), self.entry_bytes, "entry has the wrong width");
        if self.len >= self.capacity {
            return Err(IndexError::Full {
                capacity: self.capacity,
            });
        }
        match &mut self.mapping {
            Mapping::Memory(entries) => entries.extend_from_slice(entry),
            Mapping::Sealed(_) | Mapping::Unmapped => {
                unreachable!("an unsealed table is always in memory")
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Seals: writes the header (count, `segment_bytes`, the sealed flag,
    /// the CRC) and the entries to the file, replacing whatever was there,
    /// fsyncs it and maps it read-only. If any step fails the table is left
    /// sealed and empty (its file should be discarded and rebuilt); a full
    /// disk is [`IndexError::DiskFull`].
    pub fn seal(&mut self, segment_bytes: u64) -> Result<(), IndexError> {
        assert!(
            !self.sealed,
            "seal of an already sealed index {}",
            self.path.display()
        );
        self.sealed = true;
        let result = self.seal_inner(segment_bytes);
        if result.is_err() {
            self.mapping = Mapping::Unmapped;
            self.len = 0;
        }
        result
    }

    fn seal_inner(&mut self, segment_bytes: u64) -> Result<(), IndexError> {
        let Mapping::Memory(entries) = std::mem::replace(&mut self.mapping, Mapping::Unmapped)
        else {
            unreachable!("an unsealed table is always in memory");
        };
        let mut header = IndexHeader {
            kind: self.kind,
            base_offset: self.base_offset,
            segment_bytes,
            entry_count: self.len,
            sealed: true,
            crc: 0,
        };
        header.crc = crc32(&header.encode(), &entries);
        let disk_full = |error: std::io::Error| match error.kind() {
            std::io::ErrorKind::StorageFull => IndexError::DiskFull,
            _ => IndexError::Io(error),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        file.write_all(&header.encode()).map_err(disk_full)?;
        file.write_all(&entries).map_err(disk_full)?;
        file.sync_all().map_err(disk_full)?;
        let map = MappedFile::map(&file)?;
        assert_eq!(
            map.as_slice().len() as u64,
            file_bytes(self.entry_bytes, self.len)
        );
        self.mapping = Mapping::Sealed(map);
        self.segment_bytes = segment_bytes;
        Ok(())
    }

    /// The entry region `[INDEX_HEADER_LEN, INDEX_HEADER_LEN + len * entry_bytes)`.
    pub fn entries(&self) -> &[u8] {
        match &self.mapping {
            Mapping::Memory(entries) => entries,
            Mapping::Sealed(map) => {
                let end = INDEX_HEADER_LEN + self.len as usize * self.entry_bytes;
                &map.as_slice()[INDEX_HEADER_LEN..end]
            }
            Mapping::Unmapped => &[],
        }
    }

    /// Bytes of entry `index`, or `None` past the end.
    pub fn entry(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(self.entry_bytes)?;
        self.entries().get(start..start + self.entry_bytes)
    }

    /// Number of leading entries for which `predicate` holds, assuming it
    /// holds for a prefix of the entries (binary search).
    pub fn partition_point(&self, predicate: impl Fn(&[u8]) -> bool) -> usize {
        let entries = self.entries();
        let (mut low, mut high) = (0usize, entries.len() / self.entry_bytes);
        while low < high {
            let middle = low + (high - low) / 2;
            let start = middle * self.entry_bytes;
            if predicate(&entries[start..start + self.entry_bytes]) {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low
    }

    pub fn len(&self) -> usize {
        self.entries().len() / self.entry_bytes
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Length of a table file holding `count` entries.
fn file_bytes(entry_bytes: usize, count: u32) -> u64 {
    INDEX_HEADER_LEN as u64 + entry_bytes as u64 * u64::from(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_push_seal_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut table = IndexTable::create(&path, IndexKind::Offset, 3, 42, 4).unwrap();
        assert!(!path.exists(), "an active table writes nothing");
        table.push(b"abc").unwrap();
        table.push(b"def").unwrap();
        assert_eq!(table.entry(1), Some(&b"def"[..]));
        assert_eq!(table.entry(2), None);
        table.seal(999).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 + 6);
        assert_eq!(table.entries(), b"abcdef");
        drop(table);
        let table = IndexTable::open_sealed(&path, IndexKind::Offset, 3, 42).unwrap();
        assert_eq!(table.entries(), b"abcdef");
        assert_eq!(table.segment_bytes(), 999);
        assert_eq!(table.partition_point(|e| e < &b"b"[..]), 1);
        assert!(IndexTable::open_sealed(&path, IndexKind::Time, 3, 42).is_err());
        assert!(IndexTable::open_sealed(&path, IndexKind::Offset, 3, 43).is_err());
    }

    #[test]
    fn unsealed_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut table = IndexTable::create(&path, IndexKind::Id, 2, 0, 0).unwrap();
        assert!(matches!(
            table.push(b"ab"),
            Err(IndexError::Full { capacity: 0 })
        ));
        // An active file of an older version (or a crash's leftover) on disk.
        std::fs::write(&path, IndexHeader::active(IndexKind::Id, 0).encode()).unwrap();
        let error = IndexTable::open_sealed(&path, IndexKind::Id, 2, 0).unwrap_err();
        assert!(matches!(error, IndexError::Corrupt { .. }), "{error}");
    }
}
