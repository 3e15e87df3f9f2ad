//! The append I/O backends: how appended bytes reach a segment file and how
//! they are made durable. Reads never come here (they go through the mapping).
//!
//! Both backends write the same bytes at the same positions; they differ only
//! in the system calls. A backend must write all bytes or return an error, and
//! `sync_data` must not return before the file's data is durable.
//!
//! [`select_backend`] wraps the chosen backend in [`TimedIo`], which records
//! the duration of every `sync_data` in the process-wide fsync histogram
//! (`crate::fsync_stats`), whichever backend runs it.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::IoBackend;
use crate::resources::{CachedFile, OpenMode};

/// A segment file, as the append backends see it. It holds a descriptor
/// only while in use ([`crate::resources`]): [`SegmentFile::file`] opens it
/// again when the process-wide budget closed it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentFile {
    /// Unique in this process, so a backend can cache per-file state.
    #[cfg_attr(not(feature = "io-uring"), allow(dead_code))]
    pub(crate) id: u64,
    pub(crate) path: PathBuf,
    handle: CachedFile,
}

impl SegmentFile {
    /// Takes over `file`, open read-write at `path`.
    pub(crate) fn new(file: File, path: PathBuf) -> Self {
        let handle = CachedFile::new(file, path.clone(), OpenMode::ReadWrite);
        SegmentFile {
            id: handle.id(),
            path,
            handle,
        }
    }

    /// The open descriptor (opened again if it was closed).
    pub(crate) fn file(&self) -> io::Result<Arc<File>> {
        self.handle.get()
    }

    /// Closes the descriptor: the segment is sealed, reads use its mapping.
    pub(crate) fn close(&self) {
        self.handle.close();
    }
}

/// Writes appended bytes and makes them durable.
pub(crate) trait AppendIo: Send + Sync + Debug {
    /// Writes all of `data` at `position`; gives the buffer back for reuse.
    fn write_all_at(&self, file: &SegmentFile, position: u64, data: Vec<u8>)
        -> io::Result<Vec<u8>>;
    /// fdatasync: returns once the file's data is durable.
    fn sync_data(&self, file: &SegmentFile) -> io::Result<()>;
    /// The file will not be appended to again (sealed or deleted).
    fn release(&self, _file: &SegmentFile) {}
    /// Which backend this is, for logs and benchmarks.
    fn kind(&self) -> IoBackend;
}

/// pwrite + fdatasync on the calling thread.
#[derive(Debug, Default)]
pub(crate) struct PortableIo;

impl AppendIo for PortableIo {
    fn write_all_at(
        &self,
        file: &SegmentFile,
        position: u64,
        data: Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        file.file()?.write_all_at(&data, position)?;
        Ok(data)
    }

    fn sync_data(&self, file: &SegmentFile) -> io::Result<()> {
        file.file()?.sync_data()
    }

    fn kind(&self) -> IoBackend {
        IoBackend::Portable
    }
}

/// A backend whose `sync_data` calls are timed into the process-wide fsync
/// histogram; everything else is passed through unchanged.
#[derive(Debug)]
pub(crate) struct TimedIo(Arc<dyn AppendIo>);

impl AppendIo for TimedIo {
    fn write_all_at(
        &self,
        file: &SegmentFile,
        position: u64,
        data: Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        self.0.write_all_at(file, position, data)
    }

    fn sync_data(&self, file: &SegmentFile) -> io::Result<()> {
        crate::fsync_stats::timed(|| self.0.sync_data(file))
    }

    fn release(&self, file: &SegmentFile) {
        self.0.release(file);
    }

    fn kind(&self) -> IoBackend {
        self.0.kind()
    }
}

/// The backend for `requested`, falling back to the portable one (with a
/// warning) where io_uring is not compiled in or not permitted here; its
/// fdatasyncs are timed (see [`TimedIo`]).
pub(crate) fn select_backend(requested: IoBackend) -> Arc<dyn AppendIo> {
    let backend = match requested {
        IoBackend::Portable => Arc::new(PortableIo) as Arc<dyn AppendIo>,
        IoBackend::IoUring => uring_or_fallback(),
    };
    Arc::new(TimedIo(backend))
}

#[cfg(feature = "io-uring")]
fn uring_or_fallback() -> Arc<dyn AppendIo> {
    match crate::uring::UringIo::start() {
        Ok(uring) => Arc::new(uring),
        Err(error) => {
            tracing::warn!(%error, "io_uring is unavailable; appends use the portable pwrite path");
            Arc::new(PortableIo)
        }
    }
}

#[cfg(not(feature = "io-uring"))]
fn uring_or_fallback() -> Arc<dyn AppendIo> {
    tracing::warn!("built without the io-uring feature; appends use the portable pwrite path");
    Arc::new(PortableIo)
}
