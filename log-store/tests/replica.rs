//! What replication needs from a log: a replica that appends its leader's
//! records with the leader's timestamps holds the same records, and a
//! closed log cut back to a batch boundary (Raft's truncation of an
//! uncommitted tail) reads, looks up and appends as if the cut records had
//! never been written.

mod common;

use std::sync::Arc;

use common::{append, check_log, small_batch, Expected};
use dmq_log_store::{
    restart_empty_log_at, truncate_closed_log, BatchInput, FsyncPolicy, Log, LogConfig, LogError,
    ManualClock, RecordInput,
};
use proptest::prelude::*;

fn config(segment_bytes_max: u32) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

/// The records `info` and `batch` describe, as a replica would be sent
/// them: every record with its id.
fn as_sent(batch: &BatchInput, ids: &[dmq_log_store::MessageId]) -> BatchInput {
    BatchInput {
        records: batch
            .records
            .iter()
            .zip(ids)
            .map(|(record, id)| RecordInput {
                id: Some(*id),
                ..record.clone()
            })
            .collect(),
        ..batch.clone()
    }
}

/// A log of 16 KiB segments under `dir` whose clock reads `now_ms`.
fn opened_at(dir: &std::path::Path, now_ms: i64) -> Log {
    Log::open_with_clock(dir, config(16 * 1024), Arc::new(ManualClock::new(now_ms))).expect("open")
}

#[test]
fn a_replica_appending_its_leaders_timestamps_holds_the_same_records() {
    let (leader_dir, replica_dir) = (common::scratch_dir(), common::scratch_dir());
    let leader = opened_at(leader_dir.path(), 1_000_000);
    // The replica's clock is an hour behind: it must not matter.
    let replica = opened_at(replica_dir.path(), 1_000_000 - 3_600_000);
    let mut expected = Vec::new();
    for tag in 0..40 {
        let batch = small_batch(tag, 1 + (tag as usize % 7), 100);
        let info = leader.append(&batch).expect("leader append");
        let sent = as_sent(&batch, &info.ids);
        let copy = replica
            .append_deferred_at(&sent, info.timestamp_ms)
            .expect("replica append");
        replica.wait_durable(&copy).expect("durable");
        assert_eq!(copy.base_offset, info.base_offset);
        assert_eq!(copy.ids, info.ids);
        expected.extend(Expected::from_append(&batch, &info));
    }
    check_log(&leader, &expected);
    check_log(&replica, &expected);
    // A timestamp going backwards means the replica diverged: refused.
    let late = as_sent(
        &small_batch(99, 1, 10),
        &[dmq_log_store::MessageId::new(4, 7)],
    );
    assert!(matches!(
        replica.append_deferred_at(&late, 5),
        Err(LogError::InvalidBatch(_))
    ));
}

#[test]
fn a_replica_appending_its_leaders_stored_batches_holds_the_same_bytes() {
    let (leader_dir, replica_dir) = (common::scratch_dir(), common::scratch_dir());
    let leader = opened_at(leader_dir.path(), 1_000_000);
    // The replica's clock is an hour behind: it must not matter.
    let replica = opened_at(replica_dir.path(), 1_000_000 - 3_600_000);
    let mut expected = Vec::new();
    for tag in 0..40 {
        let batch = small_batch(tag, 1 + (tag as usize % 7), 100);
        let info = leader.append(&batch).expect("leader append");
        let stored = leader.read(info.base_offset, 1).expect("read").remove(0);
        let copy = replica
            .append_stored_deferred(&stored)
            .expect("replica append");
        replica.wait_durable(&copy).expect("durable");
        assert_eq!(
            (copy.base_offset, copy.last_offset, copy.timestamp_ms),
            (info.base_offset, info.last_offset, info.timestamp_ms)
        );
        assert_eq!(copy.ids, info.ids);
        let held = replica.read(info.base_offset, 1).expect("read").remove(0);
        assert_eq!(held.as_bytes(), stored.as_bytes(), "batch {tag}");
        expected.extend(Expected::from_append(&batch, &info));
    }
    assert!(
        replica.segment_count() > 1,
        "the replica rolled its segments"
    );
    check_log(&leader, &expected);
    check_log(&replica, &expected);
    // Its indexes hold every record: by id, by key and by time.
    for record in &expected {
        let id = leader
            .read_record(record.offset)
            .expect("read")
            .expect("present")
            .id;
        assert_eq!(
            replica.offset_of_id(&id).expect("lookup"),
            Some(record.offset)
        );
    }
    assert_eq!(
        replica.find_by_key(b"k3", 1000).expect("by key").len(),
        leader.find_by_key(b"k3", 1000).expect("by key").len()
    );
    assert_eq!(
        replica.offset_for_timestamp(0).expect("by time"),
        leader.offset_for_timestamp(0).expect("by time")
    );

    // A batch that is not at the replica's end is refused, as is one
    // stamped before the last: the replica has diverged.
    let again = leader.read(0, 1).expect("read").remove(0);
    assert!(matches!(
        replica.append_stored_deferred(&again),
        Err(LogError::InvalidBatch(_))
    ));
    let other_dir = common::scratch_dir();
    let earlier = opened_at(other_dir.path(), 5);
    for tag in 0..40 {
        earlier
            .append(&small_batch(tag, 1 + (tag as usize % 7), 100))
            .expect("append");
    }
    let end = earlier.end_offset();
    assert_eq!(end, replica.end_offset());
    earlier.append(&small_batch(99, 1, 10)).expect("append");
    let stale = earlier.read(end, 1).expect("read").remove(0);
    assert!(matches!(
        replica.append_stored_deferred(&stale),
        Err(LogError::InvalidBatch(_))
    ));
    assert_eq!(replica.end_offset(), end);
}

#[test]
fn truncating_an_open_log_is_refused_and_a_cut_inside_a_batch_too() {
    let dir = common::scratch_dir();
    let log = Log::open(dir.path(), config(16 * 1024)).expect("open");
    append(&log, &small_batch(1, 5, 10));
    append(&log, &small_batch(2, 5, 10));
    assert!(
        truncate_closed_log(dir.path(), 5).is_err(),
        "the log is open"
    );
    drop(log);
    assert!(matches!(
        truncate_closed_log(dir.path(), 3),
        Err(LogError::BadTruncation { offset: 3, .. })
    ));
    assert!(matches!(
        truncate_closed_log(dir.path(), 11),
        Err(LogError::BadTruncation { offset: 11, .. })
    ));
    // At the end: nothing to cut.
    assert_eq!(
        truncate_closed_log(dir.path(), 10)
            .expect("end")
            .segments_removed,
        0
    );
    let log = Log::open(dir.path(), config(16 * 1024)).expect("reopen");
    assert_eq!(log.end_offset(), 10);
}

#[test]
fn a_closed_log_is_cut_where_damage_starts() {
    let dir = common::scratch_dir();
    let log = Log::open(dir.path(), config(16 * 1024)).expect("open");
    append(&log, &small_batch(1, 5, 10));
    append(&log, &small_batch(2, 5, 10));
    append(&log, &small_batch(3, 5, 10));
    let first_len = log.read(0, 1).expect("read")[0].as_bytes().len();
    drop(log);
    // One byte of the second batch flips; the checkpoint goes (a crash).
    let segment = dir.path().join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).expect("read");
    let position = first_len + 40;
    bytes[position] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");
    for entry in std::fs::read_dir(dir.path()).expect("list") {
        let path = entry.expect("entry").path();
        if path.to_string_lossy().contains("ckpt") {
            std::fs::remove_file(path).expect("remove");
        }
    }
    let log = Log::open(dir.path(), config(16 * 1024)).expect("open damaged");
    let region = log.recovery_report().corrupt_regions[0].clone();
    assert_eq!(region.first_lost_offset, 5);
    drop(log);
    // Offset 5 starts no readable batch, but damage makes it the first
    // lost offset: the cut is made there.
    truncate_closed_log(dir.path(), 5).expect("cut at the damage");
    let log = Log::open(dir.path(), config(16 * 1024)).expect("reopen");
    assert_eq!(log.end_offset(), 5);
    assert!(log.recovery_report().corrupt_regions.is_empty());
    let info = log.append(&small_batch(4, 2, 10)).expect("append");
    assert_eq!(info.base_offset, 5);
}

#[test]
fn an_empty_closed_log_restarts_at_a_later_offset_and_one_with_records_does_not() {
    let dir = common::scratch_dir();
    drop(Log::open(dir.path(), config(16 * 1024)).expect("open"));
    restart_empty_log_at(dir.path(), &config(16 * 1024), 1_000).expect("restart");
    let log = Log::open(dir.path(), config(16 * 1024)).expect("reopen");
    assert_eq!((log.start_offset(), log.end_offset()), (1_000, 1_000));
    let info = log.append(&small_batch(1, 3, 10)).expect("append");
    assert_eq!(info.base_offset, 1_000);
    drop(log);
    assert!(matches!(
        restart_empty_log_at(dir.path(), &config(16 * 1024), 5_000),
        Err(LogError::BadTruncation { offset: 5_000, .. })
    ));
    let log = Log::open(dir.path(), config(16 * 1024)).expect("reopen");
    assert_eq!((log.start_offset(), log.end_offset()), (1_000, 1_003));
}

fn run_truncation(
    segment_bytes_max: u32,
    batches: &[(usize, usize)],
    cut_batch: usize,
    reopen_before: bool,
) {
    let dir = common::scratch_dir();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut expected: Vec<Expected> = Vec::new();
    let mut boundaries = Vec::new();
    {
        let open = || {
            Log::open_with_clock(dir.path(), config(segment_bytes_max), clock.clone())
                .expect("open")
        };
        let mut log = open();
        for (i, &(count, value_len)) in batches.iter().enumerate() {
            if reopen_before && i == batches.len() / 2 {
                // A clean close in the middle writes checkpoints of the
                // active segment's indexes: a cut must not reuse them.
                drop(log);
                log = open();
            }
            boundaries.push(log.end_offset());
            clock.advance_ms(1);
            expected.extend(append(&log, &small_batch(i as u64, count, value_len)));
        }
        boundaries.push(log.end_offset());
    }
    let cut = boundaries[cut_batch.min(boundaries.len() - 1)];
    truncate_closed_log(dir.path(), cut).expect("truncate");
    let kept: Vec<Expected> = expected
        .iter()
        .filter(|e| e.offset < cut)
        .cloned()
        .collect();
    let log = Log::open_with_clock(dir.path(), config(segment_bytes_max), clock.clone())
        .expect("reopen after the cut");
    assert_eq!(log.recovery_report().corrupt_regions.len(), 0);
    check_log(&log, &kept);
    // Cut records are gone from every index.
    for gone in expected.iter().filter(|e| e.offset >= cut) {
        assert!(
            log.find_by_id(&gone.id).expect("lookup").is_none(),
            "id of {} still found",
            gone.offset
        );
        assert_eq!(log.offset_of_id(&gone.id).expect("lookup"), None);
    }
    for kept in &kept {
        let found = log
            .find_by_id(&kept.id)
            .expect("lookup")
            .expect("kept id found");
        assert_eq!(found.offset, kept.offset);
        assert_eq!(
            log.offset_of_id(&kept.id).expect("lookup"),
            Some(kept.offset)
        );
    }
    // Appends go on from the cut.
    clock.advance_ms(1);
    let more = append(&log, &small_batch(1_000, 3, 50));
    assert_eq!(more[0].offset, cut);
    drop(log);
    let log = Log::open_with_clock(dir.path(), config(segment_bytes_max), clock).expect("reopen");
    let mut all = kept;
    all.extend(more);
    check_log(&log, &all);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_cut_log_holds_exactly_the_records_before_the_cut(
        segment_bytes_max in prop_oneof![Just(4 * 1024u32), Just(8 * 1024u32), Just(64 * 1024u32)],
        batches in proptest::collection::vec((1usize..8, 10usize..400), 1..30),
        cut_batch in 0usize..32,
        reopen_before in any::<bool>(),
    ) {
        run_truncation(segment_bytes_max, &batches, cut_batch, reopen_before);
    }
}
