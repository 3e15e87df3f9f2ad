//! Per-log configuration: segment sizing, index density, fsync policy,
//! retention and the append I/O backend.

use std::time::Duration;

use crate::error::LogError;

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `append` returns only after fdatasync covers the batch. Appends that
    /// arrive while an fsync runs share the next one (group commit).
    Always,
    /// A background thread fdatasyncs at this interval; `append` returns after
    /// the write. A crash may lose up to one interval of acknowledged appends.
    Interval(Duration),
    /// Never fsync outside segment rolls; the OS writes back when it likes.
    Never,
}

/// Which code path writes appended bytes to the segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// pwrite + fdatasync on the calling thread.
    Portable,
    /// io_uring (tokio-uring) write + fdatasync on a dedicated ring thread.
    /// Needs the `io-uring` cargo feature; falls back to `Portable` with a
    /// warning where io_uring is unavailable.
    IoUring,
}

/// Configuration of one partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll the active segment before it would exceed this many bytes.
    /// The active segment file is preallocated to this size. Max 4 GiB - 1.
    pub segment_bytes_max: u32,
    /// Roll the active segment once its first batch is older than this.
    pub segment_age_max: Option<Duration>,
    /// One offset-index and time-index entry per this many bytes of log.
    pub index_interval_bytes: u32,
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_age: Option<Duration>,
    /// The append path.
    pub io_backend: IoBackend,
    /// A new segment is created only if the disk keeps at least this many
    /// bytes free after its preallocation: what the rest of the broker
    /// needs to write (acks, deletions, metadata) when produces have filled
    /// the disk. 0: no check.
    pub min_free_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_age_max: None,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            retention_bytes: None,
            retention_age: None,
            io_backend: IoBackend::Portable,
            min_free_bytes: 0,
        }
    }
}

impl LogConfig {
    /// Checks the limits the log relies on.
    pub fn validate(&self) -> Result<(), LogError> {
        if self.segment_bytes_max < 4096 {
            return Err(LogError::InvalidConfig(
                "segment_bytes_max must be at least 4096".into(),
            ));
        }
        if self.segment_bytes_max == u32::MAX {
            return Err(LogError::InvalidConfig(
                "segment_bytes_max must be below 4 GiB".into(),
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err(LogError::InvalidConfig(
                "index_interval_bytes must be positive".into(),
            ));
        }
        if let FsyncPolicy::Interval(interval) = self.fsync {
            if interval.is_zero() {
                return Err(LogError::InvalidConfig(
                    "fsync interval must be positive".into(),
                ));
            }
        }
        Ok(())
    }

    /// Index entries an active segment of `segment_bytes` can need.
    pub(crate) fn index_capacity(&self, segment_bytes: u64) -> u32 {
        let entries = segment_bytes / u64::from(self.index_interval_bytes) + 2;
        u32::try_from(entries).unwrap_or(u32::MAX)
    }
}
