//! Shared helpers for the DMQ benchmarks (`benches/*.rs`).
//!
//! # Layout
//! - Sizes: [`env_u64`] reads the `DMQ_BENCH_*` variables that shrink a
//!   bench's data set (each bench documents its own).
//! - Places: [`bench_dir`] makes a temporary directory (under
//!   `DMQ_BENCH_DIR` if set, else the system temp dir) that is deleted when
//!   dropped, so no bench leaves gigabytes behind.
//! - Data: [`payload`], [`value_batch`], [`keyed_batch`] and [`key_for`]
//!   generate records; [`Spread`] generates reproducible pseudo-random
//!   positions to look up.
//! - Logs: [`log_config`], [`backends`], [`build_lookup_log`],
//!   [`fill_segment`] and [`index_file_paths`] build the logs the benches
//!   time.
//! - Indexes: [`build_sealed_indexes`] writes sealed `dmq-index` files of a
//!   realistic size directly.
//! - Reporting: [`Rate`] accumulates bytes, items and time outside criterion
//!   to print MB/s and records/s figures.
//!
//! Everything here panics (with a message) on I/O errors: a bench that cannot
//! build its data set has nothing to measure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmq_index::{
    key_hash, IdIndexBuilder, KeyIndexBuilder, OffsetIndex, SealedIdIndex, SealedKeyIndex,
    TimeIndex,
};
use dmq_log_store::{
    BatchInput, FsyncPolicy, IoBackend, Log, LogConfig, ManualClock, MessageId, RecordInput,
};
use tempfile::TempDir;

/// One KiB.
pub const KIB: usize = 1024;
/// One MiB.
pub const MIB: usize = 1024 * 1024;

/// The value of the environment variable `name` as a `u64`, or `default`
/// when it is unset or not a number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(default)
}

/// A fresh temporary directory for one bench's files, deleted on drop.
/// Created under `DMQ_BENCH_DIR` when set (to bench another disk), else
/// under the system temp directory.
pub fn bench_dir(label: &str) -> TempDir {
    let root = std::env::var_os("DMQ_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root).expect("creating the bench root directory");
    tempfile::Builder::new()
        .prefix(&format!("dmq-bench-{label}-"))
        .tempdir_in(&root)
        .expect("creating a bench temp directory")
}

/// SplitMix64: a tiny, fast, reproducible generator for bench data. Not for
/// anything that needs real randomness.
#[derive(Debug, Clone)]
pub struct Spread {
    state: u64,
}

impl Spread {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Spread { state: seed }
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A pseudo-random value in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "Spread::below needs a positive bound");
        self.next_u64() % bound
    }

    /// `count` pseudo-random values in `0..bound`.
    pub fn sample(&mut self, count: usize, bound: u64) -> Vec<u64> {
        (0..count).map(|_| self.below(bound)).collect()
    }
}

/// `len` pseudo-random (incompressible) bytes derived from `seed`.
pub fn payload(len: usize, seed: u64) -> Bytes {
    let mut spread = Spread::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&spread.next_u64().to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A batch of `records` records without keys, each holding `value` (the
/// bytes are shared, not copied, until the log encodes the batch).
pub fn value_batch(records: usize, value: &Bytes) -> BatchInput {
    BatchInput::new(
        (0..records)
            .map(|_| RecordInput::new(value.clone()))
            .collect(),
    )
}

/// The key of the record with index `index` in the lookup logs: unique per
/// record, 14 bytes.
pub fn key_for(index: u64) -> Bytes {
    Bytes::from(format!("key-{index:010}"))
}

/// A batch of `records` records holding `value`, the i-th keyed
/// [`key_for`]`(first_index + i)`.
pub fn keyed_batch(first_index: u64, records: usize, value: &Bytes) -> BatchInput {
    BatchInput::new(
        (0..records as u64)
            .map(|i| RecordInput::new(value.clone()).with_key(key_for(first_index + i)))
            .collect(),
    )
}

/// A log configuration for benches: the given fsync policy, backend and
/// segment size, the default index interval, no retention.
pub fn log_config(fsync: FsyncPolicy, io_backend: IoBackend, segment_bytes_max: u32) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        fsync,
        io_backend,
        ..LogConfig::default()
    }
}

/// The append backends compiled into this bench build, with a short name:
/// `portable` always, `io_uring` with the bench crate's `io-uring` feature.
pub fn backends() -> Vec<(&'static str, IoBackend)> {
    #[allow(unused_mut)]
    let mut backends = vec![("portable", IoBackend::Portable)];
    #[cfg(feature = "io-uring")]
    backends.push(("io_uring", IoBackend::IoUring));
    backends
}

/// The four index files of the segment with base offset `base_offset`, in
/// the log's naming (`docs/storage.md`): `.index`, `.timeindex`, `.idindex`,
/// `.keyindex`, each named by the base offset in 20 digits.
pub fn index_file_paths(dir: &Path, base_offset: u64) -> [PathBuf; 4] {
    ["index", "timeindex", "idindex", "keyindex"]
        .map(|extension| dir.join(format!("{base_offset:020}.{extension}")))
}

/// The data file of the segment with base offset `base_offset`.
pub fn segment_file_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

/// A log built for lookups, with what the lookups need to find.
#[derive(Debug)]
pub struct BuiltLog {
    /// The open log. Declared before `dir` so it is closed before the
    /// directory is deleted.
    pub log: Log,
    /// The log's directory (deleted on drop).
    pub dir: TempDir,
    /// Records appended (offsets `0..records`).
    pub records: u64,
    /// The clock the log was opened with (1 ms per batch).
    pub clock: Arc<ManualClock>,
    /// Broker timestamp of the first batch.
    pub first_timestamp_ms: i64,
    /// Broker timestamp of the last batch.
    pub last_timestamp_ms: i64,
    /// Ids of records spread over the whole log, with their offsets.
    pub sample_ids: Vec<(u64, MessageId)>,
}

/// Builds a log of `records` records (each a `value_len`-byte value keyed
/// [`key_for`] its index) appended in batches of `batch_records` with
/// `FsyncPolicy::Never` into segments of `segment_bytes_max` bytes. The
/// clock advances 1 ms per batch. Keeps about `id_samples` ids.
pub fn build_lookup_log(
    records: u64,
    batch_records: usize,
    value_len: usize,
    segment_bytes_max: u32,
    id_samples: usize,
) -> BuiltLog {
    assert!(records > 0 && batch_records > 0, "an empty lookup log");
    let dir = bench_dir("lookups");
    let first_timestamp_ms = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(first_timestamp_ms));
    let config = log_config(FsyncPolicy::Never, IoBackend::Portable, segment_bytes_max);
    let log = Log::open_with_clock(dir.path(), config, clock.clone()).expect("opening a bench log");
    let value = payload(value_len, 7);
    let keep_every = (records / id_samples.max(1) as u64).max(1);
    let mut sample_ids = Vec::with_capacity(id_samples + 1);
    let mut appended = 0u64;
    let mut last_timestamp_ms = first_timestamp_ms;
    while appended < records {
        let count = batch_records.min((records - appended) as usize);
        let info = log
            .append(&keyed_batch(appended, count, &value))
            .expect("appending to a bench log");
        for (i, id) in info.ids.iter().enumerate() {
            let offset = info.base_offset + i as u64;
            if offset % keep_every == keep_every / 2 {
                sample_ids.push((offset, *id));
            }
        }
        last_timestamp_ms = info.timestamp_ms;
        appended += count as u64;
        clock.advance_ms(1);
    }
    assert_eq!(log.end_offset(), records, "the bench log lost records");
    BuiltLog {
        log,
        dir,
        records,
        clock,
        first_timestamp_ms,
        last_timestamp_ms,
        sample_ids,
    }
}

/// Appends `batch` to `log` until its active segment holds about
/// `target_bytes` (never more than `segment_bytes_max` allows: the caller
/// picks the size so that no roll happens unless it wants one). Returns the
/// bytes appended.
pub fn fill_segment(log: &Log, batch: &BatchInput, target_bytes: u64) -> u64 {
    let batch_bytes = batch.encoded_len() as u64;
    let mut written = 0u64;
    while written + batch_bytes <= target_bytes {
        log.append(batch).expect("appending to a bench log");
        written += batch_bytes;
    }
    written
}

/// Sealed index files of one segment, opened, with things to look up.
#[derive(Debug)]
pub struct SealedIndexes {
    /// Sparse offset index.
    pub offset: OffsetIndex,
    /// Sparse time index.
    pub time: TimeIndex,
    /// Message-id index.
    pub ids: SealedIdIndex,
    /// Key-hash index.
    pub keys: SealedKeyIndex,
    /// Number of records the id and key indexes describe.
    pub records: u32,
    /// Number of entries of the offset and time indexes.
    pub sparse_entries: u32,
    /// First timestamp of the time index.
    pub first_timestamp_ms: i64,
    /// Declared last so the files are closed before it is deleted.
    pub dir: TempDir,
}

/// The id of record `index` in [`build_sealed_indexes`] files.
pub fn synthetic_id(index: u32) -> [u8; 16] {
    MessageId::new(
        1_700_000_000_000 + i64::from(index / 1000),
        u64::from(index),
    )
    .0
}

/// Writes and opens the sealed index files of a segment holding `records`
/// records, with `sparse_entries` offset- and time-index entries (one per
/// 4 KiB of a 1 GiB segment is 262 144). Record `i` has id
/// [`synthetic_id`]`(i)` and key [`key_for`]`(i)`.
pub fn build_sealed_indexes(records: u32, sparse_entries: u32) -> SealedIndexes {
    assert!(records > 0 && sparse_entries > 0, "empty sealed indexes");
    let dir = bench_dir("indexes");
    let [offset_path, time_path, id_path, key_path] = index_file_paths(dir.path(), 0);
    let segment_bytes = u64::from(sparse_entries) * 4096;
    let records_per_entry = (records / sparse_entries).max(1);
    let first_timestamp_ms = 1_700_000_000_000;

    let mut offset =
        OffsetIndex::create(&offset_path, 0, sparse_entries).expect("creating an offset index");
    let mut time = TimeIndex::create(&time_path, 0, sparse_entries).expect("creating a time index");
    for i in 0..sparse_entries {
        offset
            .push(i * records_per_entry, i * 4096)
            .expect("filling an offset index");
        time.push(first_timestamp_ms + i64::from(i), i * records_per_entry)
            .expect("filling a time index");
    }
    offset.seal(segment_bytes).expect("sealing an offset index");
    time.seal(segment_bytes).expect("sealing a time index");

    let mut id_builder = IdIndexBuilder::new();
    let mut key_builder = KeyIndexBuilder::new();
    for i in 0..records {
        id_builder.insert(synthetic_id(i), i);
        key_builder.insert_hash(key_hash(&key_for(u64::from(i))), i);
    }
    let ids = id_builder
        .write_sealed(&id_path, 0, segment_bytes)
        .expect("writing a sealed id index");
    drop(id_builder);
    let keys = key_builder
        .write_sealed(&key_path, 0, segment_bytes)
        .expect("writing a sealed key index");
    drop(offset);
    drop(time);
    SealedIndexes {
        offset: OffsetIndex::open_sealed(&offset_path, 0).expect("reopening an offset index"),
        time: TimeIndex::open_sealed(&time_path, 0).expect("reopening a time index"),
        ids,
        keys,
        records,
        sparse_entries,
        first_timestamp_ms,
        dir,
    }
}

/// Bytes, items and time accumulated over a bench's timed loops, to print
/// rates criterion does not (records/s next to bytes/s, ratios).
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    /// Bytes processed.
    pub bytes: u64,
    /// Items (records, reads) processed.
    pub items: u64,
    /// Time spent.
    pub elapsed: Duration,
}

impl Rate {
    /// Adds one timed loop.
    pub fn add(&mut self, bytes: u64, items: u64, elapsed: Duration) {
        self.bytes += bytes;
        self.items += items;
        self.elapsed += elapsed;
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-12)
    }

    /// Items per second.
    pub fn items_per_s(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_reproducible_and_bounded() {
        let a = Spread::new(3).sample(100, 17);
        let b = Spread::new(3).sample(100, 17);
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v < 17));
    }

    #[test]
    fn small_lookup_log_and_indexes_build() {
        let built = build_lookup_log(2_500, 1000, 64, 1 << 20, 10);
        assert_eq!(built.log.end_offset(), 2_500);
        assert!(!built.sample_ids.is_empty());
        let (offset, id) = built.sample_ids[0];
        let record = built
            .log
            .find_by_id(&id)
            .expect("find_by_id")
            .expect("sampled id is stored");
        assert_eq!(record.offset, offset);

        let indexes = build_sealed_indexes(5_000, 100);
        assert_eq!(indexes.ids.get(&synthetic_id(4_321)), Some(4_321));
        assert!(indexes.keys.get(&key_for(17)).contains(&17));
        assert_eq!(
            indexes.offset.lookup(u32::MAX).map(|e| e.position),
            Some(99 * 4096)
        );
    }
}
