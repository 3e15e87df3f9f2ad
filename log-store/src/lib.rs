//! `dmq-log-store`: the segmented, memory-mapped, CRC-checked commit log that
//! stores every DMQ partition.
//!
//! # Layout
//! - [`log`]: [`Log`], one partition's log: open and recover, append with
//!   group commit, read, lookups by offset, time, id and key, retention.
//! - `segment`: one segment file, its mapping, its four indexes (crate
//!   `dmq-index`) and its visible length.
//! - `scan`: the batch walk shared by recovery, index rebuilds and reads.
//! - [`batch`]: the on-disk record-batch format (`docs/storage.md`).
//! - `mmap`: the only module with `unsafe`: the read-only segment mapping.
//! - `io`: the append backends (portable pwrite, io_uring behind a feature).
//! - [`config`], [`clock`], [`error`], [`message_id`].
//!
//! # Guarantees
//! - Under [`FsyncPolicy::Always`] (the default) `append` returns only after
//!   an fdatasync covering the batch; concurrent appends share fsyncs.
//! - Readers see only whole batches, and under `Always` only durable ones.
//! - Recovery depends only on the bytes on disk: a torn tail is cut, damaged
//!   batches followed by valid ones are reported and never returned, indexes
//!   that are missing or fail their checks are rebuilt from the log.

pub mod batch;
pub mod clock;
pub mod config;
pub mod error;
mod io;
pub mod log;
pub mod message_id;
mod mmap;
mod scan;
mod segment;
#[cfg(feature = "io-uring")]
mod uring;

pub use batch::{BatchError, BatchHeader, BatchInput, Record, RecordBatch, RecordInput};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{FsyncPolicy, IoBackend, LogConfig};
pub use error::{LogError, Result};
pub use log::{AppendInfo, DeletedSegments, Log, RecoveryReport};
pub use message_id::{MessageId, ParseMessageIdError};
pub use scan::CorruptRegion;

/// Entry points for the fuzz targets in `fuzz/` and their corpus replay
/// tests. Each must never panic, whatever the input.
pub mod fuzzing {
    use crate::batch::RecordBatch;

    /// Decodes arbitrary bytes as one record batch and walks its records.
    pub fn decode_batch(data: &[u8]) {
        if let Ok(batch) = RecordBatch::decode(bytes::Bytes::copy_from_slice(data)) {
            for record in batch.records() {
                let _ = record;
            }
        }
        let _ = crate::batch::decode_header(data);
    }

    /// Scans arbitrary bytes as a segment, the way recovery does.
    pub fn scan_segment(data: &[u8]) {
        let outcome = crate::scan::scan_segment(data, 0, 0, 0, |_, _| {});
        assert!(outcome.valid_end <= data.len() as u64);
        assert!(outcome.torn_end >= outcome.valid_end);
    }
}
