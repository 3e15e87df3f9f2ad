//! Memory mapping: the only module with `unsafe`.
//!
//! Owns [`MappedFile`], the read-only map of a whole sealed index file.
//! Active indexes live in memory and are never mapped.
//!
//! # Contract
//!
//! A mapped file must not be shrunk (truncated) by anyone while it is
//! mapped: touching a page past the new end of file raises SIGBUS. This
//! crate maps only sealed files, which it never writes again (a new seal
//! of the same path replaces the file by `O_TRUNC` only after the old
//! table is dropped), and other components must not truncate index files
//! they did not create. Index files are private to this process (the log
//! directory is locked). Zero-length files are never mapped; they read as
//! an empty slice.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions, UncheckedAdvice};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
