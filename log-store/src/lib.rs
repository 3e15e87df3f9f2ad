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
//! - [`fsync_stats`]: the process-wide histogram of fdatasync durations.
//! - [`resources`]: the process-wide budgets of open descriptors (segment
//!   files being appended to, and the dispatcher's journals) and of mapped
//!   sealed segments.
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
pub mod fsync_stats;
mod io;
pub mod log;
pub mod message_id;
mod mmap;
pub mod resources;
mod scan;
mod segment;
#[cfg(feature = "io-uring")]
mod uring;

pub use batch::{BatchError, BatchHeader, BatchInput, Record, RecordBatch, RecordInput};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{FsyncPolicy, IoBackend, LogConfig};
/// The stable key hash the key index uses; also picks partitions by key.
pub use dmq_index::key_hash;
pub use error::{LogError, Result};
pub use fsync_stats::{fsync_histogram, FsyncHistogram};
pub use log::{
    allocate_file, available_bytes, lock_exclusive, restart_empty_log_at, truncate_closed_log,
    AppendInfo, DeletedSegments, Log, ReadDamage, RecoveryReport, Truncation,
};
pub use message_id::{MessageId, ParseMessageIdError};
pub use scan::CorruptRegion;

/// Entry points for the fuzz targets in `fuzz/` and their corpus replay
/// tests. Each must never panic, whatever the input.
pub mod fuzzing {
    use crate::batch::RecordBatch;
    use crate::{FsyncPolicy, Log, LogConfig, RecoveryReport};
    use dmq_index::fuzzing::ScratchDir;

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

    fn fuzz_config() -> LogConfig {
        LogConfig {
            segment_bytes_max: 64 * 1024,
            index_interval_bytes: 256,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        }
    }

    /// Real recovery of arbitrary bytes: writes them as the only segment
    /// (`00000000000000000000.log`) of a fresh log directory, opens the log,
    /// reads every record up to `end_offset` (stepping over reported damage),
    /// runs the lookups, appends one batch, and opens the log again.
    ///
    /// Errors are fine; panics are bugs. Checked on the way: reads return
    /// ascending offsets below `end_offset`; the second open, being a
    /// function of the same bytes plus one clean batch, cuts nothing and ends
    /// after the appended batch.
    pub fn recover_segment(data: &[u8]) {
        let dir = ScratchDir::new();
        std::fs::write(dir.path.join("00000000000000000000.log"), data)
            .expect("writing the fuzz segment");
        let Ok(log) = Log::open(&dir.path, fuzz_config()) else {
            return;
        };
        let report = log.recovery_report().clone();
        assert!(report.bytes_truncated <= data.len() as u64);
        read_everything(&log, &report, data.len());
        let end_before = log.end_offset();
        let batch = crate::BatchInput::new(vec![
            crate::RecordInput::new(&b"fuzz"[..]).with_key(&b"fuzz-key"[..])
        ]);
        let end_offset = match log.append(&batch) {
            Ok(info) => {
                assert_eq!(info.base_offset, end_before, "an append left a gap");
                let record = log
                    .read_record(info.base_offset)
                    .expect("reading the batch just appended");
                assert!(record.is_some_and(|r| r.value.as_ref() == b"fuzz"));
                info.last_offset + 1
            }
            Err(_) => end_before,
        };
        drop(log);
        let Ok(log) = Log::open(&dir.path, fuzz_config()) else {
            return;
        };
        assert_eq!(
            log.recovery_report().bytes_truncated,
            0,
            "a second recovery cut bytes"
        );
        assert_eq!(
            log.end_offset(),
            end_offset,
            "a second recovery changed the end"
        );
    }

    /// Reads from the start to the end of `log`, jumping over the damaged
    /// regions `report` lists; at most one step per input byte.
    fn read_everything(log: &Log, report: &RecoveryReport, steps_max: usize) {
        let end_offset = log.end_offset();
        let mut offset = log.start_offset();
        let mut steps = 0usize;
        let mut first_id = None;
        let mut first_key = None;
        while offset < end_offset && steps <= steps_max {
            steps += 1;
            match log.read(offset, 4096) {
                Ok(batches) => {
                    let Some(last) = batches.last() else { break };
                    let next = last.last_offset() + 1;
                    let mut previous = None;
                    for batch in &batches {
                        for record in batch.records() {
                            let record = record.expect("a verified batch yields its records");
                            assert!(record.offset < end_offset, "a record past the end");
                            assert!(previous.is_none_or(|p| record.offset > p));
                            previous = Some(record.offset);
                            first_id.get_or_insert(record.id);
                            if let Some(key) = &record.key {
                                first_key.get_or_insert(key.clone());
                            }
                        }
                    }
                    assert!(next > offset, "a read did not move forward");
                    offset = next;
                }
                Err(_) => {
                    let resume = report
                        .corrupt_regions
                        .iter()
                        .filter(|region| {
                            region.first_lost_offset <= offset
                                && offset < region.next_readable_offset
                        })
                        .map(|region| region.next_readable_offset)
                        .min();
                    match resume {
                        Some(resume) => offset = resume,
                        None => break,
                    }
                }
            }
        }
        let _ = log.read_record(log.start_offset());
        let _ = log.read_record(end_offset.saturating_sub(1));
        let _ = log.read_record(end_offset);
        for timestamp in [i64::MIN, 0, i64::MAX] {
            let _ = log.offset_for_timestamp(timestamp);
        }
        if let Some(id) = first_id {
            let _ = log.find_by_id(&id);
        }
        if let Some(key) = first_key {
            let _ = log.find_by_key(&key, 4);
        }
    }
}
