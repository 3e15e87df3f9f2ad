//! What a log costs (issue 10): an empty log allocates nothing and has no
//! index file; its segment grows in steps (64 KiB, then doubling, at most
//! 64 MiB at a time) and `disk_bytes` says what it takes; a sealed segment
//! holds no descriptor; and many logs stay within the process-wide budget
//! of open files, appending and syncing correctly while the budget closes
//! and reopens their files under them; and a log with many sealed
//! segments keeps at most the budget of them mapped, reading, seeking and
//! finding by id and key correctly from several threads while the budget
//! unmaps and maps them again under them.
//!
//! One binary of its own: the budgets are process-wide.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::Expected;
use dmq_log_store::resources::{
    mapped_segments, open_files, set_max_mapped_segments, set_max_open_files,
};
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

/// `disk_bytes` against the file system's count of blocks, which may add
/// a block or two of extent tree per file.
fn assert_disk_bytes(dir: &Path, disk_bytes: u64) {
    let allocated = allocated(dir);
    assert!(
        (disk_bytes..=disk_bytes + 16 * 1024).contains(&allocated),
        "{}: {allocated} bytes allocated, disk_bytes says {disk_bytes}",
        dir.display()
    );
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
    assert_disk_bytes(&dir, log.disk_bytes());
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
        assert_disk_bytes(dir, log.disk_bytes());
    }
    drop(logs);
    assert_eq!(open_files(), 0, "every descriptor closed with its log");
    for (i, expected) in expected.iter().enumerate() {
        let dir = root.path().join(format!("many-{i}"));
        let log = Log::open_with_clock(&dir, config.clone(), clock.clone()).expect("reopen");
        common::check_log(&log, expected);
    }

    // Many sealed segments, a budget of 4 mapped: reads from 4 threads in
    // a scattered order, lookups by id, key and time, while the budget
    // unmaps and maps segments under them.
    set_max_mapped_segments(4);
    let dir = root.path().join("sealed");
    let config = LogConfig {
        segment_bytes_max: 16 << 10,
        index_interval_bytes: 1024,
        fsync: FsyncPolicy::Never,
        lock_directory: false,
        ..LogConfig::default()
    };
    let log = Log::open_with_clock(&dir, config.clone(), clock.clone()).expect("open");
    let mut expected = Vec::new();
    for i in 0..600u32 {
        clock.advance_ms(10);
        let next = batch(200 + (i as usize % 7) * 50, (i % 251) as u8);
        expected.extend(Expected::from_append(
            &next,
            &log.append(&next).expect("append"),
        ));
    }
    let segments = log.segment_count();
    assert!(segments > 12, "{segments} segments");
    assert!(mapped_segments() <= 4, "{} mapped", mapped_segments());
    let mappings = || {
        std::fs::read_to_string("/proc/self/maps")
            .expect("/proc/self/maps")
            .lines()
            .filter(|line| line.contains(dir.to_str().expect("utf-8")))
            .count()
    };
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (log, expected) = (&log, &expected);
            scope.spawn(move || {
                let mut at = thread * 7919;
                for _ in 0..400 {
                    at = at
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        % expected.len() as u64;
                    let want = &expected[at as usize];
                    let record = log.read_record(want.offset).expect("read").expect("found");
                    want.check(&record);
                    let by_id = log
                        .find_by_id(&want.id)
                        .expect("find_by_id")
                        .expect("found");
                    want.check(&by_id);
                    let by_time = log
                        .offset_for_timestamp(want.timestamp_ms)
                        .expect("offset_for_timestamp")
                        .expect("found");
                    assert!(by_time <= want.offset);
                }
            });
        }
    });
    assert!(mapped_segments() <= 4, "{} mapped", mapped_segments());
    // Segment data and index files mapped: five per mapped sealed segment
    // at most, plus the active segment's data.
    assert!(
        mappings() <= 4 * 5 + 1,
        "{} mappings of the log's files",
        mappings()
    );
    let keyed = log.find_by_key(&[7], usize::MAX).expect("find_by_key");
    let oracle = expected
        .iter()
        .filter(|e| e.key.as_deref() == Some(&[7][..]))
        .count();
    assert_eq!(keyed.len(), oracle);
    common::check_log(&log, &expected);
    drop(log);
    assert_eq!(mapped_segments(), 0, "every sealed segment left the budget");
    let log = Log::open_with_clock(&dir, config, clock).expect("reopen");
    assert!(
        mapped_segments() <= 4,
        "{} mapped after open",
        mapped_segments()
    );
    common::check_log(&log, &expected);
}
