//! Typed errors of the log store.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;

/// Everything that can go wrong in the log store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The disk (or its quota) is full. Nothing was appended; the log stays
    /// consistent and appends succeed again once space is freed.
    #[error("disk full while {context}")]
    DiskFull {
        /// What the log was doing.
        context: &'static str,
    },
    /// An I/O error outside the append path, with what the log was doing.
    #[error("I/O error while {context} ({path}): {source}")]
    Io {
        /// What the log was doing.
        context: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An fsync (or a write whose outcome is unknown) failed. The log refuses
    /// every further append until it is reopened; reopening recovers from disk.
    #[error("log is failed after an I/O error and must be reopened: {reason}")]
    Failed {
        /// The first error that failed the log.
        reason: String,
    },
    /// Stored bytes failed their checksum or structure check. No data from
    /// the damaged region is returned.
    #[error("corrupt batch in segment {segment_base_offset} at byte {position}: {error}")]
    Corrupt {
        /// The segment holding the damage.
        segment_base_offset: u64,
        /// Byte position of the damaged batch in that segment.
        position: u64,
        /// The first offset readable after the damage, if one is known.
        next_readable_offset: Option<u64>,
        /// What was wrong.
        error: BatchError,
    },
    /// The offset is before the log's start (deleted by retention).
    #[error("offset {offset} is before the log start {log_start_offset}")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The first offset still stored.
        log_start_offset: u64,
    },
    /// The caller's batch breaks a rule (empty, too large, bad id).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A truncation point that is not a batch boundary of the log (see
    /// [`crate::truncate_closed_log`]).
    #[error("cannot truncate at offset {offset}: {reason}")]
    BadTruncation {
        /// The offset asked for.
        offset: u64,
        /// Why it cannot be cut there.
        reason: String,
    },
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An index file could not be created or written.
    #[error("index error in segment {segment_base_offset}: {source}")]
    Index {
        /// The segment whose index failed.
        segment_base_offset: u64,
        /// The index error.
        source: dmq_index::IndexError,
    },
}

impl LogError {
    /// Wraps an OS error, mapping ENOSPC/EDQUOT to [`LogError::DiskFull`].
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        if is_disk_full(&source) {
            LogError::DiskFull { context }
        } else {
            LogError::Io {
                context,
                path: path.into(),
                source,
            }
        }
    }

    pub(crate) fn index(segment_base_offset: u64, source: dmq_index::IndexError) -> Self {
        if matches!(source, dmq_index::IndexError::DiskFull) {
            LogError::DiskFull {
                context: "writing an index",
            }
        } else {
            LogError::Index {
                segment_base_offset,
                source,
            }
        }
    }
}

/// Whether an OS error means "no space left" (ENOSPC or EDQUOT).
pub(crate) fn is_disk_full(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() || code == rustix::io::Errno::DQUOT.raw_os_error())
        || error.kind() == io::ErrorKind::StorageFull
}

/// Result alias for the log store.
pub type Result<T, E = LogError> = std::result::Result<T, E>;
