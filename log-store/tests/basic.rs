//! End-to-end behaviour of one log on a real disk: append, read, lookups,
//! rolls, reopen, retention.

use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{BatchInput, FsyncPolicy, Log, LogConfig, ManualClock, RecordInput};

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn batch(prefix: &str, n: usize) -> BatchInput {
    BatchInput::new(
        (0..n)
            .map(|i| {
                RecordInput::new(format!("{prefix}-{i}-{}", "x".repeat(100)))
                    .with_key(format!("key-{}", i % 3))
            })
            .collect(),
    )
}

#[test]
fn append_read_reopen_and_lookups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut appended = Vec::new();
    {
        let log = Log::open_with_clock(dir.path(), small_config(), clock.clone()).expect("open");
        for i in 0..200 {
            clock.advance_ms(10);
            let info = log.append(&batch(&format!("b{i}"), 5)).expect("append");
            assert_eq!(info.base_offset, i * 5);
            appended.push(info);
        }
        assert!(
            log.segment_count() >= 3,
            "segments: {}",
            log.segment_count()
        );
        assert_eq!(log.end_offset(), 1000);
    }
    let log = Log::open_with_clock(dir.path(), small_config(), clock.clone()).expect("reopen");
    let report = log.recovery_report().clone();
    assert_eq!(report.bytes_truncated, 0, "{report:?}");
    assert!(report.indexes_rebuilt.is_empty(), "{report:?}");
    assert_eq!(log.end_offset(), 1000);
    // Read everything back in order.
    let mut offset = 0;
    while offset < 1000 {
        let batches = log.read(offset, 4096).expect("read");
        assert!(!batches.is_empty(), "nothing at {offset}");
        for b in &batches {
            for record in b.records() {
                let record = record.expect("record");
                if record.offset < offset {
                    continue;
                }
                assert_eq!(record.offset, offset);
                let info = &appended[(offset / 5) as usize];
                assert_eq!(record.id, info.ids[(offset % 5) as usize]);
                assert!(record
                    .value
                    .starts_with(format!("b{}-{}-", offset / 5, offset % 5).as_bytes()));
                offset += 1;
            }
        }
    }
    // Lookups.
    for (i, info) in appended.iter().enumerate().step_by(17) {
        let record = log.find_by_id(&info.ids[2]).expect("find").expect("found");
        assert_eq!(record.offset, info.base_offset + 2);
        assert_eq!(
            log.offset_for_timestamp(info.timestamp_ms).expect("ts"),
            Some(info.base_offset),
            "batch {i}"
        );
        assert_eq!(
            log.offset_for_timestamp(info.timestamp_ms - 5).expect("ts"),
            Some(info.base_offset),
            "batch {i}"
        );
    }
    assert_eq!(log.offset_for_timestamp(i64::MAX).expect("ts"), None);
    assert_eq!(log.offset_for_timestamp(0).expect("ts"), Some(0));
    let with_key = log.find_by_key(b"key-1", usize::MAX).expect("key");
    assert_eq!(with_key.len(), 400);
    assert!(with_key
        .iter()
        .all(|r| r.key.as_deref() == Some(&b"key-1"[..])));
    assert!(with_key.windows(2).all(|w| w[0].offset < w[1].offset));
    // Appends continue after reopen.
    let info = log.append(&batch("after", 1)).expect("append");
    assert_eq!(info.base_offset, 1000);
    assert_eq!(
        log.read_record(1000).expect("read").expect("some").value,
        Bytes::from(format!("after-0-{}", "x".repeat(100)))
    );
}

#[test]
fn retention_deletes_whole_sealed_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut config = small_config();
    config.retention_bytes = Some(200 * 1024);
    let log = Log::open_with_clock(dir.path(), config, clock.clone()).expect("open");
    for i in 0..500 {
        log.append(&batch(&format!("b{i}"), 5)).expect("append");
    }
    let before = log.size_bytes();
    let deleted = log.apply_retention().expect("retention");
    assert!(deleted.segments > 0);
    assert!(
        log.size_bytes() <= 200 * 1024 + 64 * 1024,
        "{} -> {}",
        before,
        log.size_bytes()
    );
    assert_eq!(log.start_offset(), deleted.log_start_offset);
    assert!(log.read(0, 100).is_err());
    assert!(!log.read(log.start_offset(), 100).expect("read").is_empty());
    drop(log);
    let log = Log::open_with_clock(dir.path(), small_config(), clock).expect("reopen");
    assert_eq!(log.start_offset(), deleted.log_start_offset);
    assert_eq!(log.end_offset(), 2500);
}

#[test]
fn a_log_directory_is_opened_by_one_log_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Log::open(dir.path(), small_config()).expect("open");
    let second = Log::open(dir.path(), small_config());
    assert!(
        matches!(second, Err(dmq_log_store::LogError::InvalidConfig(ref m)) if m.contains("in use")),
        "{second:?}"
    );
    drop(first);
    Log::open(dir.path(), small_config()).expect("open after the first closed");
}
