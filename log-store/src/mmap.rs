//! The only module of this crate that maps files or uses `unsafe`.
//!
//! [`SegmentMap`] is a read-only, shared mapping of a segment file, and hands
//! out zero-copy [`Bytes`] views of it. Appends never write through the
//! mapping: they `pwrite` into the allocated file (measured faster for
//! durable appends than writing the mapping and msync-ing it; see
//! BENCHMARKS.md), and the kernel's page cache makes those bytes visible
//! through every shared mapping of the file.
//!
//! # Contract
//! Touching a mapped page that lies wholly past the end of the file raises
//! SIGBUS. The log therefore keeps one invariant: **nobody reads a mapping
//! past the segment's visible length, and a segment file is never shrunk
//! below its visible length.** A segment file is allocated (`fallocate`) to
//! a length before it is mapped at that length (a growth maps it again,
//! longer), the only shrink is the trim of a sealed segment to exactly its
//! data length, and recovery truncates before it maps.
//! The data directory is locked against other processes (see `Log::open`), so
//! no one else shrinks our files either.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions, UncheckedAdvice};

/// A read-only shared mapping of the first `len` bytes of a segment file.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMap {
    map: Option<Arc<Mmap>>,
}

/// An owner for `Bytes::from_owner`: keeps the mapping alive while any view
/// of it lives.
struct MapSlice {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl SegmentMap {
    /// Maps the first `len` bytes of `file`, which must be at least `len`
    /// bytes long. A zero length maps nothing.
    pub(crate) fn new(file: &File, len: u64) -> io::Result<Self> {
        if len == 0 {
            return Ok(SegmentMap { map: None });
        }
        let file_len = file.metadata()?.len();
        if file_len < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mapping {len} bytes of a {file_len}-byte file"),
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        // SAFETY: the file is at least `len` bytes long (checked above) and is
        // allocated, so every page of the mapping is backed by the file now.
        // The log only shrinks a segment file to its data length, and reads
        // stay below the visible length (module contract), so no page that is
        // read can fall past the end of the file later. The data directory is
        // locked against other processes. Concurrent pwrites to the region
        // past the visible length are never read, so readers do not observe
        // bytes while they change.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(SegmentMap {
            map: Some(Arc::new(map)),
        })
    }

    /// No mapping (an unmapped sealed segment, an empty active one).
    pub(crate) fn empty() -> Self {
        SegmentMap { map: None }
    }

    /// Length of the mapping.
    pub(crate) fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }

    /// The mapped bytes. Callers read only below the segment's visible length.
    pub(crate) fn as_slice(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |map| &map[..])
    }

    /// Drops this process's pages of `start..end` (rounded inward to whole
    /// pages) from its resident set; the bytes stay in the file and the page
    /// cache and read back the same. Recovery calls it behind its scan, so
    /// that scanning a large segment does not grow the resident set by the
    /// segment's size.
    pub(crate) fn release_pages(&self, start: usize, end: usize) {
        let Some(map) = &self.map else { return };
        let page = rustix::param::page_size();
        let start = start.div_ceil(page) * page;
        let end = end.min(map.len()) / page * page;
        if start >= end {
            return;
        }
        // SAFETY: MADV_DONTNEED on a shared, file-backed, read-only mapping
        // only unmaps the pages from this process: a later access faults the
        // file's current contents back in (from the page cache or the disk),
        // so no data changes and no reference into the range is invalidated
        // (the `Bytes` views read through the same mapping and see the same
        // bytes). The range lies inside the mapping (clamped above).
        let advised =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        if let Err(error) = advised {
            tracing::debug!(%error, "madvise(DONTNEED) failed; pages stay resident");
        }
    }

    /// A zero-copy view of `start..end`, which must lie inside the mapping.
    pub(crate) fn bytes(&self, start: usize, end: usize) -> Bytes {
        assert!(
            start <= end && end <= self.len(),
            "view outside the mapping"
        );
        match &self.map {
            Some(map) if start < end => Bytes::from_owner(MapSlice {
                map: Arc::clone(map),
                start,
                end,
            }),
            _ => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn map_sees_pwrites_and_views_outlive_the_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("segment");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        file.set_len(8192).expect("set_len");
        let map = SegmentMap::new(&file, 8192).expect("map");
        file.write_all_at(b"hello", 4096).expect("write");
        let view = map.bytes(4096, 4101);
        drop(map);
        assert_eq!(&view[..], b"hello");
        assert_eq!(view.slice(1..3), Bytes::from_static(b"el"));
    }

    #[test]
    fn released_pages_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("segment"))
            .expect("open");
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).expect("write");
        let map = SegmentMap::new(&file, data.len() as u64).expect("map");
        let view = map.bytes(100, 5000);
        assert_eq!(map.as_slice(), &data[..]);
        map.release_pages(0, data.len());
        map.release_pages(10, 20); // less than a page: nothing
        map.release_pages(60 * 1024, 1 << 20); // clamped to the mapping
        assert_eq!(map.as_slice(), &data[..]);
        assert_eq!(&view[..], &data[100..5000]);
    }

    #[test]
    fn refuses_to_map_past_the_end_of_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create(dir.path().join("short")).expect("create");
        file.set_len(100).expect("set_len");
        assert!(SegmentMap::new(&file, 4096).is_err());
        let empty = SegmentMap::new(&file, 0).expect("empty map");
        assert_eq!(empty.len(), 0);
        assert!(empty.as_slice().is_empty());
        assert!(empty.bytes(0, 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "view outside the mapping")]
    fn views_outside_the_mapping_are_a_bug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("open");
        file.set_len(10).expect("set_len");
        let map = SegmentMap::new(&file, 10).expect("map");
        let _ = map.bytes(5, 11);
    }
}
