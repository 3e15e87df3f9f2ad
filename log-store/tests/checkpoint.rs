//! The active segment's index checkpoint: a clean close writes the active
//! indexes, and the next open loads them and scans only what follows. Every
//! lookup answers as after a full scan. A checkpoint is used once; one that
//! does not fit the data (a cut, a damaged batch, an unclean stop after it)
//! is ignored and the whole segment is scanned; a stale one from an earlier
//! close still describes a prefix of the data and is usable.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::Expected;
use dmq_log_store::{FsyncPolicy, Log, LogConfig, ManualClock};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 20,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Always,
        // A forgotten log (the test's crashed process) keeps its lock.
        lock_directory: false,
        ..LogConfig::default()
    }
}

fn fill(log: &Log, clock: &ManualClock, expected: &mut Vec<Expected>, batches: u64) {
    let first = expected.len() as u64;
    for tag in first..first + batches {
        clock.advance_ms(7);
        let batch = common::small_batch(tag, 1 + (tag % 4) as usize, 60 + (tag % 9) as usize * 10);
        expected.extend(common::append(log, &batch));
    }
}

/// Every way of reading agrees with `expected`: reads, ids, keys, times.
fn check_everything(log: &Log, expected: &[Expected]) {
    common::check_log(log, expected);
    for e in expected.iter().step_by(3) {
        let record = log.find_by_id(&e.id).expect("find_by_id").expect("found");
        e.check(&record);
        let at = log
            .offset_for_timestamp(e.timestamp_ms)
            .expect("offset_for_timestamp")
            .expect("found");
        assert!(at <= e.offset, "time lookup for {}", e.offset);
        assert!(expected[at as usize].timestamp_ms >= e.timestamp_ms);
    }
    for key in 0..5 {
        let key = format!("k{key}");
        let found = log
            .find_by_key(key.as_bytes(), usize::MAX)
            .expect("find_by_key");
        let oracle = expected
            .iter()
            .filter(|e| e.key.as_deref() == Some(key.as_bytes()))
            .count();
        assert_eq!(found.len(), oracle, "key {key}");
    }
}

fn checkpoint_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.to_string_lossy().contains(".ckpt-"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_clean_close_checkpoints_the_active_indexes_and_the_next_open_scans_only_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut expected = Vec::new();
    let log = Log::open_with_clock(dir.path(), config(), clock.clone()).expect("open");
    fill(&log, &clock, &mut expected, 400);
    let written = log.size_bytes();
    drop(log);
    assert_eq!(
        checkpoint_files(dir.path()).len(),
        4,
        "a clean close checkpoints"
    );

    // Reopen: the checkpoint covers everything, nothing is scanned.
    let log = Log::open_with_clock(dir.path(), config(), clock.clone()).expect("reopen");
    let report = log.recovery_report().clone();
    assert_eq!(report.active_bytes_from_checkpoint, written, "{report:?}");
    assert_eq!(report.active_bytes_scanned, 0, "{report:?}");
    assert!(
        checkpoint_files(dir.path()).is_empty(),
        "a checkpoint is used once"
    );
    check_everything(&log, &expected);
    fill(&log, &clock, &mut expected, 150);
    check_everything(&log, &expected);
    let first_close = written;
    drop(log);

    // Keep this close's checkpoint aside: a stale one, later.
    let stale = tempfile::tempdir().expect("tempdir");
    for path in checkpoint_files(dir.path()) {
        std::fs::copy(&path, stale.path().join(path.file_name().expect("name"))).expect("copy");
    }

    // An unclean stop (no close, no checkpoint) after more appends: the
    // whole segment is scanned, and nothing is lost.
    let log = Log::open_with_clock(dir.path(), config(), clock.clone()).expect("reopen");
    assert!(log.recovery_report().active_bytes_from_checkpoint > first_close);
    fill(&log, &clock, &mut expected, 50);
    std::mem::forget(log); // a crash: no checkpoint (the data is durable)
    let log =
        Log::open_with_clock(dir.path(), config(), clock.clone()).expect("reopen after a crash");
    let report = log.recovery_report().clone();
    assert_eq!(report.active_bytes_from_checkpoint, 0, "{report:?}");
    assert_eq!(report.active_bytes_scanned, log.size_bytes(), "{report:?}");
    check_everything(&log, &expected);
    drop(log);

    // A stale checkpoint (an earlier close's, its deletion lost): it still
    // describes a prefix of the data, so it is used, and the rest scanned.
    for path in checkpoint_files(dir.path()) {
        std::fs::remove_file(path).expect("remove");
    }
    for entry in std::fs::read_dir(stale.path()).expect("read_dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    let log = Log::open_with_clock(dir.path(), config(), clock.clone()).expect("reopen");
    let report = log.recovery_report().clone();
    assert!(report.active_bytes_from_checkpoint > 0, "{report:?}");
    assert_eq!(
        report.active_bytes_from_checkpoint + report.active_bytes_scanned,
        log.size_bytes(),
        "{report:?}"
    );
    check_everything(&log, &expected);
    drop(log);

    // A checkpoint that does not fit the data (the last indexed batch
    // damaged): ignored, the whole segment scanned, the damage reported.
    let segment = common::log_path(dir.path(), 0);
    let mut bytes = std::fs::read(&segment).expect("read");
    let len = log_len(&bytes);
    bytes[len - 3] ^= 0x40;
    std::fs::write(&segment, &bytes).expect("write");
    let log = Log::open_with_clock(dir.path(), config(), clock).expect("reopen");
    let report = log.recovery_report().clone();
    assert_eq!(report.active_bytes_from_checkpoint, 0, "{report:?}");
    assert!(
        report.bytes_truncated > 0,
        "the damaged last batch is cut: {report:?}"
    );
}

/// End of the valid batches of a segment file (allocated zeros follow).
fn log_len(bytes: &[u8]) -> usize {
    let mut position = 0;
    while let Ok(header) = dmq_log_store::batch::verify_batch(&bytes[position..]) {
        position += header.batch_len as usize;
    }
    position
}

/// Found by `proptest_log`: each clean close gave the checkpoint's time
/// index a closing entry (the max timestamp, as a seal does), and the next
/// open loaded it as an entry of the active index. An active segment
/// closed and reopened often, with little appended each time, so gained
/// one time entry per restart and its append failed once the index, sized
/// for the segment's bytes, was full.
#[test]
fn many_restarts_with_little_appended_do_not_fill_the_active_time_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    // 16 KiB segments, an index entry every 4 KiB: 6 entries of room.
    let config = LogConfig {
        segment_bytes_max: 16 << 10,
        index_interval_bytes: 4 << 10,
        ..config()
    };
    let mut expected = Vec::new();
    for _restart in 0..6 {
        let log = Log::open_with_clock(dir.path(), config.clone(), clock.clone()).expect("open");
        fill(&log, &clock, &mut expected, 1);
        check_everything(&log, &expected);
    }
    let log = Log::open_with_clock(dir.path(), config, clock.clone()).expect("open");
    let report = log.recovery_report().clone();
    assert!(report.active_bytes_from_checkpoint > 0, "{report:?}");
    // Batches past two index intervals, still in the first segment.
    while log.size_bytes() < 12 << 10 {
        fill(&log, &clock, &mut expected, 1);
    }
    assert_eq!(log.segment_count(), 1, "all of it fits one segment");
    check_everything(&log, &expected);
}
