//! What a log costs (issue 10): an empty log allocates nothing and has no
//! index file; its segment grows in steps (64 KiB, then doubling, at most
//! 64 MiB at a time) and `disk_bytes` says what it takes; a sealed segment
//! holds no descriptor; and many logs stay within the process-wide budget
//! of open files, appending and syncing correctly while the budget closes
//! and reopens their files under them.
//!
//! One binary of its own: the budget is process-wide.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::Expected;
use dmq_log_store::open_files::{open_files, set_max_open_files};
use dmq_log_store::{BatchInput, FsyncPolicy, Log, LogConfig, ManualClock, RecordInput};

fn batch(bytes: usize, tag: u8) -> BatchInput {
    BatchInput::new(vec![
        RecordInput::new(Bytes::from(vec![tag; bytes])).with_key(vec![tag])
    ])
}

/// Allocated bytes of every file in `dir`.
fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| entry.expect("entry").metadata().expect("metadata").blocks() * 512)
        .sum()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    names.sort();
    names
}

fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn logs_cost_what_they_hold_and_stay_within_the_descriptor_budget() {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let root = tempfile::tempdir().expect("tempdir");

    // An empty log: one empty segment file, no index file, nothing allocated.
    let dir = root.path().join("growth");
    let config = LogConfig {
        segment_bytes_max: 1 << 30,
        fsync: FsyncPolicy::Always,
        lock_directory: false,
        ..LogConfig::default()
    };
    let log = Log::open_with_clock(&dir, config.clone(), clock.clone()).expect("open");
    assert_eq!(files(&dir), ["00000000000000000000.log"]);
    assert_eq!(allocated(&dir), 0);
    assert_eq!(log.disk_bytes(), 0);

    // One small batch: the first step, 64 KiB.
    let mut expected = Vec::new();
    let first = batch(100, 1);
    expected.extend(Expected::from_append(
        &first,
        &log.append(&first).expect("append"),
    ));
    assert_eq!(log.disk_bytes(), 64 << 10);
    assert_eq!(allocated(&dir), 64 << 10);
    // Doubling: after 1 MiB of data the file is 1 MiB (+ one step at most).
    let mut steps = vec![log.disk_bytes()];
    while log.size_bytes() < 1 << 20 {
        let next = batch(8 << 10, 2);
        expected.extend(Expected::from_append(
            &next,
            &log.append(&next).expect("append"),
        ));
        if *steps.last().expect("steps") != log.disk_bytes() {
            steps.push(log.disk_bytes());
        }
    }
    assert_eq!(
        steps,
        [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20],
        "the file doubles"
    );
    assert_eq!(allocated(&dir), log.disk_bytes());
    common::check_log(&log, &expected);
    drop(log);
    // Reopened: the allocated room is kept (not allocated again), the data
    // is all there.
    let log = Log::open_with_clock(&dir, config, clock.clone()).expect("reopen");
    assert_eq!(log.disk_bytes(), 2 << 20);
    common::check_log(&log, &expected);
    drop(log);

    // Many logs, a budget of 8 descriptors: every log is appended to in
    // turn, so the budget closes files that are written again a moment
    // later. Sealed segments hold none.
    set_max_open_files(8);
    let before = descriptors();
    let config = LogConfig {
        segment_bytes_max: 64 << 10,
        fsync: FsyncPolicy::Always,
        lock_directory: false,
        ..LogConfig::default()
    };
    let logs: Vec<(Log, std::path::PathBuf)> = (0..40)
        .map(|i| {
            let dir = root.path().join(format!("many-{i}"));
            let log = Log::open_with_clock(&dir, config.clone(), clock.clone()).expect("open");
            (log, dir)
        })
        .collect();
    let mut expected: Vec<Vec<Expected>> = vec![Vec::new(); logs.len()];
    for round in 0..30u8 {
        for (i, (log, _)) in logs.iter().enumerate() {
            let next = batch(4 << 10, round);
            let info = log.append(&next).expect("append under a tight budget");
            expected[i].extend(Expected::from_append(&next, &info));
        }
        assert!(open_files() <= 8, "{} files open", open_files());
        assert!(
            descriptors() <= before + 8,
            "{} descriptors, {before} before",
            descriptors()
        );
    }
    for ((log, dir), expected) in logs.iter().zip(&expected) {
        assert!(log.segment_count() > 1, "segments rolled");
        common::check_log(log, expected);
        assert_eq!(allocated(dir), log.disk_bytes(), "{}", dir.display());
    }
    drop(logs);
    assert_eq!(open_files(), 0, "every descriptor closed with its log");
    for (i, expected) in expected.iter().enumerate() {
        let dir = root.path().join(format!("many-{i}"));
        let log = Log::open_with_clock(&dir, config.clone(), clock.clone()).expect("reopen");
        common::check_log(&log, expected);
    }
}
