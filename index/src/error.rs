//! The crate's error type.
//!
//! Owns [`IndexError`], the single error enum returned by every fallible
//! operation in this crate. Invariant: bad file contents always surface as
//! [`IndexError::Corrupt`] (never a panic); `assert!` failures are reserved
//! for caller bugs such as a non-monotonic push.

use std::path::PathBuf;

/// Everything that can go wrong while creating, writing, sealing or opening
/// an index file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// An operating-system I/O error (open, map, set_len, fsync, ...).
    /// A missing file on open arrives here with kind `NotFound`.
    #[error("index I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The file system has no room for the sealed index file.
    #[error("disk full while writing an index file")]
    DiskFull,

    /// The file's bytes do not form a valid index of the expected kind and
    /// segment: short file, bad magic, wrong kind/version/base offset, a
    /// count that does not fit the file, a CRC mismatch or unordered entries.
    #[error("corrupt index file {path}: {reason}")]
    Corrupt {
        /// The index file that failed verification.
        path: PathBuf,
        /// Human-readable description of the first problem found.
        reason: String,
    },

    /// An active index reached the entry capacity it was created with.
    #[error("index full: capacity of {capacity} entries reached")]
    Full {
        /// The capacity, in entries, the index was created with.
        capacity: u32,
    },
}

impl IndexError {
    /// Builds an [`IndexError::Corrupt`] for `path`.
    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> Self {
        IndexError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
