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
    /// Max 4 GiB - 1. The active segment is not preallocated to this size:
    /// it grows in steps (see `preallocate_min_bytes`).
    pub segment_bytes_max: u32,
    /// The first allocation of a segment's file, made by the append that
    /// first needs room (an empty segment holds no blocks). Each later
    /// growth allocates as much again as the file holds (doubling), at least
    /// this and at most `preallocate_step_max_bytes`, capped at
    /// `segment_bytes_max`. Growth is an `fallocate` made before the write,
    /// so a full disk is found before the batch is written, and appends
    /// inside the allocated room change no file metadata.
    pub preallocate_min_bytes: u32,
    /// The largest single growth of a segment file.
    pub preallocate_step_max_bytes: u32,
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
    /// A segment file grows only if the disk keeps at least this many
    /// bytes free after the growth: what the rest of the broker needs to
    /// write (acks, deletions, metadata) when produces have filled the
    /// disk. 0: no check.
    pub min_free_bytes: u64,
    /// Take the directory's own lock (`LOCK`, one descriptor held while the
    /// log is open). A caller that opens many logs under one directory it
    /// has locked itself (the broker's data directory) turns it off.
    pub lock_directory: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            preallocate_min_bytes: 64 << 10,
            preallocate_step_max_bytes: 64 << 20,
            segment_age_max: None,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            retention_bytes: None,
            retention_age: None,
            io_backend: IoBackend::Portable,
            min_free_bytes: 0,
            lock_directory: true,
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
        if self.preallocate_min_bytes < 4096 {
            return Err(LogError::InvalidConfig(
                "preallocate_min_bytes must be at least 4096".into(),
            ));
        }
        if self.preallocate_step_max_bytes < self.preallocate_min_bytes {
            return Err(LogError::InvalidConfig(
                "preallocate_step_max_bytes must be at least preallocate_min_bytes".into(),
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

    /// The capacity a segment file of `capacity` bytes grows to so that
    /// `needed` bytes fit: one step (the current size, clamped to the
    /// preallocation bounds) or `needed`, whichever is more, rounded up to
    /// 4 KiB, and at most `limit` (never below `needed`).
    pub(crate) fn grown_capacity(&self, capacity: u64, needed: u64, limit: u64) -> u64 {
        let step = capacity.clamp(
            u64::from(self.preallocate_min_bytes),
            u64::from(self.preallocate_step_max_bytes),
        );
        let grown = (capacity + step).max(needed).next_multiple_of(4096);
        grown.min(limit).max(needed)
    }

    /// Bytes a new partition needs before it can take its first batch.
    pub fn initial_allocation_bytes(&self) -> u64 {
        u64::from(self.preallocate_min_bytes.min(self.segment_bytes_max))
    }

    /// Index entries an active segment of `segment_bytes` can need.
    pub(crate) fn index_capacity(&self, segment_bytes: u64) -> u32 {
        let entries = segment_bytes / u64::from(self.index_interval_bytes) + 2;
        u32::try_from(entries).unwrap_or(u32::MAX)
    }
}
