//! Memory mapping and file preallocation: the only module with `unsafe`.
//!
//! Owns [`MappedFile`] (read-only map of a whole file), [`MappedFileMut`]
//! (read-write map over a preallocated file) and [`preallocate`].
//!
//! # Contract
//!
//! A mapped file must not be shrunk (truncated) by anyone while it is
//! mapped: touching a page past the new end of file raises SIGBUS. This
//! crate only truncates its own files after dropping its own mapping, and
//! other components must not truncate index files they did not create.
//! Concurrent writers to a mapped file from outside the process would
//! change bytes under our feet; index files are private to this process.
//!
//! Files are preallocated with `fallocate` before they are mapped
//! read-write, so a full disk is reported as [`IndexError::DiskFull`] at
//! create time and writes through the mapping never hit ENOSPC (which would
//! be a SIGBUS). Zero-length files are never mapped; they read as an empty
//! slice.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapMut, MmapOptions, UncheckedAdvice};

use crate::IndexError;

/// Read-only mapping of a whole file (empty for a zero-length file).
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps the whole of `file`, whose length is read from its metadata.
    pub fn map(file: &File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        // SAFETY: the mapping covers exactly the file's current length, and
        // the module contract forbids anyone from shrinking the file while
        // it is mapped, so every byte of the slice stays backed by the file.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(MappedFile { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.map {
            Some(map) => map,
            None => &[],
        }
    }

    /// Drops this process's resident pages of the mapping (after a full
    /// verification pass touched them all); the bytes read back the same.
    pub fn release_resident(&self) {
        let Some(map) = &self.map else { return };
        // SAFETY: MADV_DONTNEED on a shared, read-only, file-backed mapping
        // only unmaps the pages from this process; a later access faults the
        // file's unchanged contents back in, so every slice borrowed from
        // the mapping keeps reading the same bytes.
        let advised =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, 0, map.len()) };
        // Best effort: if the kernel refuses, the pages simply stay resident.
        let _ = advised;
    }
}

/// Read-write mapping of the first `len` bytes of a preallocated file.
#[derive(Debug)]
pub(crate) struct MappedFileMut {
    map: Option<MmapMut>,
}

impl MappedFileMut {
    /// Maps the first `len` bytes of `file` read-write. The file must be at
    /// least `len` bytes long (checked) and should have been allocated with
    /// [`preallocate`] so that stores never need new disk blocks.
    pub fn map(file: &File, len: usize) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        if (len as u64) > file_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes of a {file_len}-byte file"),
            ));
        }
        if len == 0 {
            return Ok(MappedFileMut { map: None });
        }
        // SAFETY: `len` was checked against the file length above, and the
        // module contract forbids shrinking the file while mapped, so every
        // byte of the mapping stays backed by the file. The file was opened
        // read-write by this crate and is not written through other handles.
        let map = unsafe { MmapOptions::new().len(len).map_mut(file)? };
        Ok(MappedFileMut { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.map {
            Some(map) => map,
            None => &[],
        }
    }

    /// Copies `bytes` into the mapping at `position`. Panics if the range
    /// falls outside the mapping: callers compute positions from their own
    /// capacity, so that would be a bug in this crate.
    pub fn write_at(&mut self, position: usize, bytes: &[u8]) {
        let end = position.checked_add(bytes.len());
        let target = match (&mut self.map, end) {
            (Some(map), Some(end)) => map.get_mut(position..end),
            (None, Some(end)) if end == position => return,
            _ => None,
        };
        match target {
            Some(target) => target.copy_from_slice(bytes),
            None => panic!(
                "write of {} bytes at {position} outside a {}-byte mapping",
                bytes.len(),
                self.as_slice().len()
            ),
        }
    }

    /// Writes dirty pages back to the file (msync) and waits for it.
    pub fn flush(&self) -> io::Result<()> {
        match &self.map {
            Some(map) => map.flush(),
            None => Ok(()),
        }
    }
}

/// Allocates disk blocks for bytes `[0, len)` of `file`, extending it to
/// `len` bytes. ENOSPC becomes [`IndexError::DiskFull`]. On a file system
/// without `fallocate` support, falls back to writing zeros, which also
/// allocates blocks and reports ENOSPC.
pub(crate) fn preallocate(file: &File, len: u64) -> Result<(), IndexError> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) => Err(IndexError::DiskFull),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => write_zeros(file, len)
            .map_err(|error| match error.kind() {
                io::ErrorKind::StorageFull => IndexError::DiskFull,
                _ => IndexError::Io(error),
            }),
        Err(errno) => Err(IndexError::Io(errno.into())),
    }
}

/// Fallback for [`preallocate`]: writes `len` zero bytes from offset 0.
fn write_zeros(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK_BYTES: usize = 64 * 1024;
    let zeros = [0u8; CHUNK_BYTES];
    let mut written: u64 = 0;
    while written < len {
        let chunk =
            usize::try_from(len - written).map_or(CHUNK_BYTES, |rest| rest.min(CHUNK_BYTES));
        file.write_all_at(&zeros[..chunk], written)?;
        written += chunk as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open_rw(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn released_pages_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let data: Vec<u8> = (0..32 * 1024).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let map = MappedFile::map(&file).unwrap();
        assert_eq!(map.as_slice(), &data[..]);
        map.release_resident();
        assert_eq!(map.as_slice(), &data[..]);
        let empty = File::create(dir.path().join("empty")).unwrap();
        MappedFile::map(&empty).unwrap().release_resident();
    }

    #[test]
    fn preallocate_extends_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir.path().join("a"));
        preallocate(&file, 4096 + 3).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4099);
        let map = MappedFile::map(&file).unwrap();
        assert_eq!(map.as_slice().len(), 4099);
        assert!(map.as_slice().iter().all(|&b| b == 0));
        preallocate(&file, 0).unwrap();
        write_zeros(&file, 10).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4099);
    }

    #[test]
    fn write_through_mapping_is_visible_in_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let file = open_rw(&path);
        preallocate(&file, 100).unwrap();
        let mut map = MappedFileMut::map(&file, 64).unwrap();
        map.write_at(10, b"hello");
        map.write_at(59, b"world");
        map.write_at(64, b"");
        assert_eq!(&map.as_slice()[10..15], b"hello");
        map.flush().unwrap();
        drop(map);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 100);
        assert_eq!(&bytes[10..15], b"hello");
        assert_eq!(&bytes[59..64], b"world");
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn write_past_mapping_panics() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir.path().join("c"));
        preallocate(&file, 8).unwrap();
        let mut map = MappedFileMut::map(&file, 8).unwrap();
        map.write_at(6, b"abc");
    }

    #[test]
    fn zero_length_files_are_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir.path().join("d"));
        assert!(MappedFile::map(&file).unwrap().as_slice().is_empty());
        let mut map = MappedFileMut::map(&file, 0).unwrap();
        assert!(map.as_slice().is_empty());
        map.write_at(0, b"");
        map.flush().unwrap();
    }

    #[test]
    fn refuses_to_map_past_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = open_rw(&dir.path().join("e"));
        preallocate(&file, 10).unwrap();
        let error = MappedFileMut::map(&file, 11).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
