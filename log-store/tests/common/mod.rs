//! Helpers shared by the failure tests: backends, a seeded RNG, directory
//! copies, an expected-record model and whole-log checks.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{
    AppendInfo, BatchInput, Clock, IoBackend, Log, LogConfig, LogError, MessageId, Record,
    RecordInput,
};

/// The append backends every test runs over.
pub fn backends() -> Vec<IoBackend> {
    let mut backends = vec![IoBackend::Portable];
    if cfg!(feature = "io-uring") {
        backends.push(IoBackend::IoUring);
    }
    backends
}

/// Opens `dir` with `backend` and checks that the backend was really used
/// (with the io-uring feature on, no silent fallback).
pub fn open(
    dir: &Path,
    mut config: LogConfig,
    backend: IoBackend,
    clock: Arc<dyn Clock>,
) -> Result<Log, LogError> {
    config.io_backend = backend;
    let log = Log::open_with_clock(dir, config, clock)?;
    if cfg!(feature = "io-uring") {
        assert_eq!(log.io_backend(), backend, "backend fell back");
    }
    Ok(log)
}

/// The seed for a test: `DMQ_TEST_SEED` if set, else `default`. Printed.
pub fn seed(test: &str, default: u64) -> u64 {
    let seed = std::env::var("DMQ_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("{test}: seed {seed} (set DMQ_TEST_SEED to change)");
    seed
}

/// xorshift64*: tiny, seeded, good enough for test inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that small seeds still mix well; never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.fill(&mut out);
        out
    }
}

/// FNV-1a 64, for value hashes on the crash pipe.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in data {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A temporary directory on a RAM file system when there is one (fsyncs
/// are free there; for tests that reopen a log hundreds of times), else in
/// the default temporary directory.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Copies the regular files of `from` into `to` (created), skipping `LOCK`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        if name == "LOCK" || !entry.file_type().expect("file type").is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).expect("copy file");
    }
}

/// Removes every regular file of `dir` (keeps the directory).
pub fn clear_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::remove_file(entry.path()).expect("remove file");
        }
    }
}

/// Path of the segment data file with this base offset.
pub fn log_path(dir: &Path, base_offset: u64) -> std::path::PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

/// Base offsets of the segments in `dir`, ascending.
pub fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".log")?;
            (stem.len() == 20).then(|| stem.parse().ok()).flatten()
        })
        .collect();
    bases.sort_unstable();
    bases
}

/// What one appended record must read back as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub id: MessageId,
    pub key: Option<Bytes>,
    pub headers: Vec<(Bytes, Bytes)>,
    pub value: Bytes,
    pub deliver_at_ms: Option<i64>,
    pub expire_at_ms: Option<i64>,
}

impl Expected {
    /// The records of `batch` as appended with `info`.
    pub fn from_append(batch: &BatchInput, info: &AppendInfo) -> Vec<Expected> {
        assert_eq!(info.ids.len(), batch.records.len());
        assert_eq!(
            info.last_offset + 1 - info.base_offset,
            batch.records.len() as u64
        );
        batch
            .records
            .iter()
            .zip(&info.ids)
            .enumerate()
            .map(|(i, (record, id))| Expected::new(info.base_offset + i as u64, info, *id, record))
            .collect()
    }

    fn new(offset: u64, info: &AppendInfo, id: MessageId, record: &RecordInput) -> Self {
        Expected {
            offset,
            timestamp_ms: info.timestamp_ms,
            id,
            key: record.key.clone(),
            headers: record.headers.clone(),
            value: record.value.clone(),
            deliver_at_ms: record.deliver_at_ms,
            expire_at_ms: record.expire_at_ms,
        }
    }

    /// Panics unless `record` is exactly this record.
    pub fn check(&self, record: &Record) {
        assert_eq!(record.offset, self.offset, "offset");
        assert_eq!(
            record.timestamp_ms, self.timestamp_ms,
            "timestamp of {}",
            self.offset
        );
        assert_eq!(record.id, self.id, "id of {}", self.offset);
        assert_eq!(record.key, self.key, "key of {}", self.offset);
        assert_eq!(record.headers, self.headers, "headers of {}", self.offset);
        assert!(
            record.value == self.value,
            "value of {} differs",
            self.offset
        );
        assert_eq!(
            record.deliver_at_ms, self.deliver_at_ms,
            "deliver_at of {}",
            self.offset
        );
        assert_eq!(
            record.expire_at_ms, self.expire_at_ms,
            "expire_at of {}",
            self.offset
        );
    }

    /// Whether `record` is exactly this record.
    pub fn matches(&self, record: &Record) -> bool {
        record.offset == self.offset
            && record.timestamp_ms == self.timestamp_ms
            && record.id == self.id
            && record.key == self.key
            && record.headers == self.headers
            && record.value == self.value
            && record.deliver_at_ms == self.deliver_at_ms
            && record.expire_at_ms == self.expire_at_ms
    }
}

/// Reads the whole log with `read` from its start to `end_offset`, checking
/// that every batch decodes and offsets are dense. Returns every record.
pub fn read_all(log: &Log, max_bytes: usize) -> Vec<Record> {
    let end = log.end_offset();
    let mut offset = log.start_offset();
    let mut records = Vec::new();
    while offset < end {
        let batches = log
            .read(offset, max_bytes)
            .unwrap_or_else(|e| panic!("read at {offset} (end {end}): {e}"));
        assert!(
            !batches.is_empty(),
            "nothing readable at {offset} < end {end}"
        );
        for batch in &batches {
            assert!(
                batch.base_offset() <= offset,
                "gap: batch at {} while expecting {offset}",
                batch.base_offset()
            );
            for record in batch.records() {
                let record = record.expect("a verified batch decodes");
                if record.offset < offset {
                    continue;
                }
                assert_eq!(record.offset, offset, "offsets not dense");
                offset += 1;
                records.push(record);
            }
        }
    }
    assert_eq!(offset, end);
    assert!(
        log.read(end, max_bytes).expect("read at end").is_empty(),
        "records past end_offset"
    );
    records
}

/// Checks that the log holds exactly `expected` (offsets 0..), by batch reads
/// and by single-record reads.
pub fn check_log(log: &Log, expected: &[Expected]) {
    assert_eq!(log.start_offset(), 0);
    assert_eq!(log.end_offset(), expected.len() as u64, "end offset");
    let records = read_all(log, 4096);
    assert_eq!(records.len(), expected.len());
    for (record, expected) in records.iter().zip(expected) {
        expected.check(record);
    }
    for expected in expected {
        let record = log
            .read_record(expected.offset)
            .expect("read_record")
            .expect("record present");
        expected.check(&record);
    }
}

/// A batch of `count` small records whose values name `tag`.
pub fn small_batch(tag: u64, count: usize, value_len: usize) -> BatchInput {
    BatchInput::new(
        (0..count)
            .map(|i| {
                let mut value = format!("{tag}-{i}-").into_bytes();
                value.resize(value_len.max(value.len()), b'a' + (tag % 26) as u8);
                RecordInput::new(value).with_key(format!("k{}", (tag + i as u64) % 5))
            })
            .collect(),
    )
}

/// Appends `batch`, returning its expected records.
pub fn append(log: &Log, batch: &BatchInput) -> Vec<Expected> {
    let info = log.append(batch).expect("append");
    Expected::from_append(batch, &info)
}
