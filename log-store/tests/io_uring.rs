//! The io_uring append backend end to end: it is really selected here, it
//! keeps every acknowledged record across concurrent appends, rolls and a
//! reopen, and it writes the same bytes as the portable backend.
#![cfg(feature = "io-uring")]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{
    AppendInfo, BatchInput, FsyncPolicy, IoBackend, Log, LogConfig, ManualClock, MessageId, Record,
    RecordInput,
};

fn config(io_backend: IoBackend) -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Always,
        io_backend,
        ..LogConfig::default()
    }
}

fn value(thread: usize, append: usize, record: usize) -> Bytes {
    let filler = (thread * 31 + append * 7 + record) % 500 + 100;
    Bytes::from(format!(
        "t{thread}-a{append}-r{record}-{}",
        "v".repeat(filler)
    ))
}

fn all_records(log: &Log) -> Vec<Record> {
    let mut records = Vec::new();
    let mut offset = log.start_offset();
    while offset < log.end_offset() {
        let batches = log.read(offset, 16 * 1024).expect("read");
        assert!(!batches.is_empty(), "nothing readable at {offset}");
        for batch in &batches {
            for record in batch.records() {
                let record = record.expect("record decodes");
                if record.offset >= offset {
                    offset = record.offset + 1;
                    records.push(record);
                }
            }
        }
    }
    records
}

#[test]
fn concurrent_durable_appends_survive_rolls_and_reopen() {
    const THREADS: usize = 4;
    const APPENDS: usize = 40;
    const RECORDS: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    // offset -> (value, id, timestamp) of every acknowledged record.
    let mut acked: BTreeMap<u64, (Bytes, MessageId, i64)> = BTreeMap::new();
    {
        let log = Arc::new(Log::open(dir.path(), config(IoBackend::IoUring)).expect("open"));
        assert_eq!(log.io_backend(), IoBackend::IoUring);
        let results: Vec<Vec<(usize, AppendInfo)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let log = Arc::clone(&log);
                    scope.spawn(move || {
                        (0..APPENDS)
                            .map(|a| {
                                let batch = BatchInput::new(
                                    (0..RECORDS)
                                        .map(|r| {
                                            RecordInput::new(value(t, a, r))
                                                .with_key(format!("k{}", r))
                                        })
                                        .collect(),
                                );
                                (a, log.append(&batch).expect("append"))
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("appender thread"))
                .collect()
        });
        for (t, infos) in results.into_iter().enumerate() {
            for (a, info) in infos {
                assert_eq!(info.last_offset - info.base_offset + 1, RECORDS as u64);
                for r in 0..RECORDS {
                    let previous = acked.insert(
                        info.base_offset + r as u64,
                        (value(t, a, r), info.ids[r], info.timestamp_ms),
                    );
                    assert!(previous.is_none(), "offset assigned twice");
                }
            }
        }
        let total = (THREADS * APPENDS * RECORDS) as u64;
        assert_eq!(log.end_offset(), total);
        assert!(log.segment_count() >= 3, "{} segments", log.segment_count());
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (0..total).collect::<Vec<_>>()
        );
    }
    let log = Log::open(dir.path(), config(IoBackend::IoUring)).expect("reopen");
    assert_eq!(log.io_backend(), IoBackend::IoUring);
    let report = log.recovery_report();
    assert_eq!(report.bytes_truncated, 0, "{report:?}");
    assert!(report.corrupt_regions.is_empty(), "{report:?}");
    let records = all_records(&log);
    assert_eq!(records.len(), acked.len());
    for record in records {
        let (value, id, timestamp_ms) = &acked[&record.offset];
        assert_eq!(&record.value, value, "value at {}", record.offset);
        assert_eq!(&record.id, id, "id at {}", record.offset);
        assert_eq!(record.timestamp_ms, *timestamp_ms);
    }
}

/// Appends the same deterministic batches (explicit ids, a manual clock) and
/// returns every record read back.
fn write_fixed_input(dir: &Path, io_backend: IoBackend) -> Vec<Record> {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let log = Log::open_with_clock(dir, config(io_backend), clock.clone()).expect("open");
    assert_eq!(log.io_backend(), io_backend);
    let mut unique = 0u64;
    for a in 0..120 {
        clock.advance_ms(3);
        let now = 1_700_000_000_000 + 3 * (a + 1);
        let records = (0..4)
            .map(|r| {
                unique += 1;
                RecordInput {
                    id: Some(MessageId::new(now, unique)),
                    headers: vec![(Bytes::from("h"), Bytes::from(format!("{a}")))],
                    ..RecordInput::new(value(0, a as usize, r)).with_key(format!("key-{r}"))
                }
            })
            .collect();
        log.append(&BatchInput::new(records)).expect("append");
    }
    assert!(log.segment_count() >= 3, "{} segments", log.segment_count());
    all_records(&log)
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|entry| {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).expect("read file"))
        })
        .collect()
}

#[test]
fn writes_the_same_bytes_as_the_portable_backend() {
    let portable = tempfile::tempdir().expect("tempdir");
    let uring = tempfile::tempdir().expect("tempdir");
    let portable_records = write_fixed_input(portable.path(), IoBackend::Portable);
    let uring_records = write_fixed_input(uring.path(), IoBackend::IoUring);
    assert_eq!(portable_records, uring_records);
    // Logs closed: every file, segments and indexes, is byte-identical.
    let portable_files = files(portable.path());
    let uring_files = files(uring.path());
    assert_eq!(
        portable_files.keys().collect::<Vec<_>>(),
        uring_files.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &portable_files {
        assert!(
            bytes == &uring_files[name],
            "{name} differs between backends"
        );
    }
}
