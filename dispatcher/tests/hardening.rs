//! Hostile and faulty input on a real disk: names and counts that used to
//! be journaled before they were validated (and then failed every replay),
//! quarantine at replay, logs cut back at recovery, and journal damage told
//! apart from a torn tail.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use dmq_dispatcher::storage::repair_journals;
use dmq_dispatcher::{
    DispatchError, Dispatcher, DispatcherConfig, FileStorage, GroupConfig, NullEventSink, Storage,
    StoreError, TopicConfig,
};
use dmq_log_store::{FsyncPolicy, LogConfig, ManualClock, RecordInput};

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1 << 20,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn open_config(
    dir: &Path,
    log: LogConfig,
    config: DispatcherConfig,
) -> Result<Dispatcher, DispatchError> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir, log).unwrap());
    Dispatcher::open(
        storage,
        Arc::new(ManualClock::new(1_000_000)),
        Arc::new(NullEventSink),
        config,
    )
}

fn open_with(dir: &Path, log: LogConfig) -> Result<Dispatcher, DispatchError> {
    open_config(dir, log, DispatcherConfig::default())
}

fn open(dir: &Path) -> Dispatcher {
    open_with(dir, log_config()).unwrap()
}

fn topic(partitions: u32) -> TopicConfig {
    TopicConfig {
        partitions,
        ordered: false,
    }
}

fn produce(d: &mut Dispatcher, name: &str, count: usize) -> Vec<u64> {
    let records = (0..count)
        .map(|i| RecordInput::new(format!("m{i}")))
        .collect();
    d.produce(name, Some(0), records)
        .unwrap()
        .into_iter()
        .map(|p| p.offset.unwrap())
        .collect()
}

/// Joins `group` and fetches until nothing comes; returns the offsets.
fn drain(d: &mut Dispatcher, name: &str, group: &str, ack: bool) -> Vec<u64> {
    let member = d.join(name, group, "m").unwrap();
    let mut offsets = Vec::new();
    loop {
        let batch = d.fetch(member, 1000).unwrap();
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            offsets.push(delivery.record.offset);
            if ack {
                d.ack(member, delivery.partition, delivery.record.offset)
                    .unwrap();
            }
        }
    }
    d.leave(member).unwrap();
    offsets
}

#[test]
fn names_refused_before_anything_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = open(dir.path());
        for bad in [".", "..", "", "a/b", "__dmq_delay", "__mine"] {
            let error = d.create_topic(bad, topic(1)).unwrap_err();
            assert!(
                matches!(error, DispatchError::InvalidName(_)),
                "{bad:?}: {error}"
            );
        }
        let long = "t".repeat(94);
        d.create_topic(&long, topic(1)).unwrap();
        // `<94>.gg.dlq` would be 101 bytes: refused unless the group names
        // its own dead-letter topic, and nothing is journaled.
        assert!(matches!(
            d.subscribe(&long, "gg", GroupConfig::default()),
            Err(DispatchError::InvalidName(_))
        ));
        let own = GroupConfig {
            dead_letter_topic: Some("..".into()),
            ..GroupConfig::default()
        };
        assert!(d.subscribe(&long, "gg", own).is_err());
        let internal = GroupConfig {
            dead_letter_topic: Some("__dmq_delay".into()),
            ..GroupConfig::default()
        };
        assert!(d.subscribe(&long, "gg", internal).is_err());
        let fine = GroupConfig {
            dead_letter_topic: Some("dead".into()),
            ..GroupConfig::default()
        };
        d.subscribe(&long, "gg", fine).unwrap();
        d.checkpoint().unwrap();
    }
    // Every restart works, and only what was accepted is there.
    let d = open(dir.path());
    assert_eq!(d.topics().len(), 1);
    assert!(d.quarantined().is_empty());
}

#[test]
fn partition_counts_are_capped_and_a_failed_create_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small_caps = DispatcherConfig {
        max_partitions_per_topic: 8,
        max_partitions_total: 20,
        ..DispatcherConfig::default()
    };
    let mut d = open_config(dir.path(), log_config(), small_caps).unwrap();
    assert!(matches!(
        d.create_topic("zero", topic(0)),
        Err(DispatchError::InvalidArgument(_))
    ));
    assert!(matches!(
        d.create_topic("wide", topic(9)),
        Err(DispatchError::InvalidArgument(_))
    ));
    d.create_topic("t1", topic(8)).unwrap();
    d.create_topic("t2", topic(8)).unwrap();
    // 20 partitions in total at most: 5 more are refused, 4 are fine.
    assert!(matches!(
        d.create_topic("one-more", topic(5)),
        Err(DispatchError::InvalidArgument(_))
    ));
    d.create_topic("t3", topic(4)).unwrap();
    drop(d);
    for refused in ["zero", "wide", "one-more"] {
        assert!(
            !dir.path().join("topics").join(refused).exists(),
            "{refused}"
        );
    }
    assert_eq!(DispatcherConfig::default().max_partitions_per_topic, 256);

    // A topic wider than the disk (each partition's first allocation is
    // 64 MiB here): refused before any file is made.
    let dir = tempfile::tempdir().unwrap();
    let big = LogConfig {
        segment_bytes_max: 64 << 20,
        preallocate_min_bytes: 64 << 20,
        preallocate_step_max_bytes: 64 << 20,
        ..log_config()
    };
    let uncapped = DispatcherConfig {
        max_partitions_per_topic: u32::MAX,
        max_partitions_total: u32::MAX,
        ..DispatcherConfig::default()
    };
    let free = dmq_log_store::available_bytes(dir.path()).unwrap();
    let partitions = u32::try_from(free / (64 << 20) + 1).unwrap();
    let mut d = open_config(dir.path(), big.clone(), uncapped.clone()).unwrap();
    let error = d.create_topic("wide", topic(partitions)).unwrap_err();
    assert!(
        matches!(error, DispatchError::Store(StoreError::NoRoom { .. })),
        "{error}"
    );
    assert!(!dir.path().join("topics/wide").exists());
    drop(d);
    let d = open_config(dir.path(), big, uncapped).unwrap();
    assert!(d.topics().is_empty(), "the failed topic came back");
}

/// The metadata journal as an older broker could have written it: entries
/// today's rules refuse. The broker still starts; they are quarantined.
#[test]
fn entries_that_cannot_be_replayed_are_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = open(dir.path());
        d.create_topic("good", topic(1)).unwrap();
        produce(&mut d, "good", 3);
    }
    // Append what an older broker journaled for `dmq topic create ..`, a
    // group whose dead-letter name is too long, and a group on `..`.
    let storage = FileStorage::new(dir.path(), log_config()).unwrap();
    let (mut meta, _) = storage.open_journal("meta").unwrap();
    let long = "g".repeat(100);
    for entry in [
        r#"{"Topic":{"name":"..","config":{"partitions":1,"ordered":false}}}"#.to_string(),
        r#"{"Group":{"topic":"..","group":"g","config":GROUP}}"#.to_string(),
        format!(r#"{{"Group":{{"topic":"good","group":"{long}","config":GROUP}}}}"#),
        r#"{"Topic":{"name":"__dmq_delay","config":{"partitions":1,"ordered":false}}}"#.to_string(),
    ] {
        let group = serde_json_group();
        meta.append(entry.replace("GROUP", &group).as_bytes());
    }
    meta.sync().unwrap();
    drop(meta);
    drop(storage);

    let mut d = open(dir.path());
    let quarantined = d.quarantined();
    let names: Vec<(String, Option<String>)> = quarantined
        .iter()
        .map(|q| (q.topic.clone(), q.group.clone()))
        .collect();
    assert!(names.contains(&("..".into(), None)), "{quarantined:?}");
    assert!(names.contains(&("good".into(), Some(long.clone()))));
    assert!(names.contains(&("__dmq_delay".into(), None)));
    // The good topic serves; the quarantined ones say why.
    d.subscribe("good", "ok", GroupConfig::default()).unwrap();
    assert_eq!(drain(&mut d, "good", "ok", true), vec![0, 1, 2]);
    assert!(matches!(
        d.join("good", &long, "m"),
        Err(DispatchError::Quarantined { .. })
    ));
    // Deleting clears them, durably, and never touches `..` on disk.
    d.delete_topic("..").unwrap();
    d.delete_group("good", &long).unwrap();
    d.delete_topic("__dmq_delay").unwrap();
    assert!(d.quarantined().is_empty());
    assert!(dir.path().join("topics").exists());
    drop(d);
    let d = open(dir.path());
    assert!(d.quarantined().is_empty(), "{:?}", d.quarantined());
    // The delay store's timer log is still there.
    assert!(dir.path().join("topics/__dmq_delay/0").exists());
}

fn serde_json_group() -> String {
    // The JSON of a default group configuration, as the journal holds it.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = open(dir.path());
        d.create_topic("x", topic(1)).unwrap();
        d.subscribe("x", "y", GroupConfig::default()).unwrap();
    }
    let storage = FileStorage::new(dir.path(), log_config()).unwrap();
    let (_, payloads) = storage.open_journal("meta").unwrap();
    let text = String::from_utf8(payloads[1].clone()).unwrap();
    let start = text.find(r#""config":"#).unwrap() + r#""config":"#.len();
    text[start..text.len() - 2].to_string()
}

/// Regression: a group had acked offsets 0..100; recovery cut the log's
/// damaged last batch (offsets 50..100); 20 new messages took offsets
/// 50..70, and the group skipped them as already acked.
#[test]
fn a_log_cut_at_recovery_never_makes_a_group_skip_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = open(dir.path());
        d.create_topic("t", topic(1)).unwrap();
        d.subscribe("t", "g", GroupConfig::default()).unwrap();
        produce(&mut d, "t", 50);
        produce(&mut d, "t", 50);
        assert_eq!(drain(&mut d, "t", "g", true).len(), 100);
        d.checkpoint().unwrap();
    }
    // Damage the last batch: recovery sees a torn tail and cuts it.
    let segment = dir.path().join("topics/t/0/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let first_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    bytes[first_len + 100] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let mut d = open(dir.path());
    assert_eq!(d.partitions("t").unwrap()[0].end_offset(), 50);
    let new = produce(&mut d, "t", 20);
    assert_eq!(new, (50..70).collect::<Vec<_>>());
    assert_eq!(drain(&mut d, "t", "g", true), new);
    d.checkpoint().unwrap();
    drop(d);
    // And the clamp itself was durable: nothing comes back, nothing skips.
    let mut d = open(dir.path());
    assert!(drain(&mut d, "t", "g", false).is_empty());
    let more = produce(&mut d, "t", 5);
    assert_eq!(drain(&mut d, "t", "g", true), more);
}

/// Builds a metadata journal of several entries; returns its path.
fn meta_with_entries(dir: &Path) -> std::path::PathBuf {
    let mut d = open(dir);
    d.create_topic("a", topic(1)).unwrap();
    d.create_topic("b", topic(2)).unwrap();
    d.subscribe("a", "g", GroupConfig::default()).unwrap();
    produce(&mut d, "a", 10);
    d.delete(
        "a",
        dmq_dispatcher::Tombstone::OffsetRange {
            partition: 0,
            start: 0,
            end: 5,
        },
    )
    .unwrap();
    d.create_topic("c", topic(1)).unwrap();
    dir.join("dispatcher/meta.journal")
}

/// What a restart restored, to compare with the undamaged journal's, and
/// the journals whose tail it cut.
type Restored = (Vec<String>, usize, usize, Vec<(String, u64)>);

fn restored(dir: &Path) -> Result<Restored, DispatchError> {
    let mut d = open_with(dir, log_config())?;
    let topics = d.topics().into_iter().map(|(name, _)| name).collect();
    let groups = d.groups("a").len();
    let deleted = d.count_covered(
        "a",
        &dmq_dispatcher::Tombstone::OffsetRange {
            partition: 0,
            start: 0,
            end: 10,
        },
    );
    // 10 stored, 5 deleted: 5 still to delete if the deletion survived.
    let left = deleted.unwrap_or(10) as usize;
    d.checkpoint().unwrap();
    Ok((topics, groups, left, d.journal_tail_cuts()))
}

#[test]
fn a_byte_flipped_anywhere_in_the_meta_journal_is_refused_or_reported_never_undone_silently() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_with_entries(dir.path());
    let good = std::fs::read(&path).unwrap();
    let expected = restored(dir.path()).unwrap();
    assert_eq!(expected.2, 5);
    // Where the last frame starts: a flip there is a torn tail (cut and
    // reported), anywhere before it is damage (refused).
    let mut last_frame = 0;
    let mut at = 0;
    while at < good.len() {
        last_frame = at;
        at += 8 + u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) as usize;
    }
    let (mut refused, mut cut) = (0, 0);
    for position in 0..good.len() {
        let mut bytes = good.clone();
        bytes[position] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        match restored(dir.path()) {
            Err(DispatchError::Store(StoreError::CorruptJournal { at, .. })) => {
                assert!(
                    position < last_frame,
                    "refused a flip in the tail at {position}"
                );
                assert!(at as usize <= position);
                refused += 1;
            }
            Err(other) => panic!("flip at {position}: unexpected error {other}"),
            Ok(state) => {
                // Only the last entry (topic "c") may be cut, as a torn tail.
                assert!(position >= last_frame, "flip at {position} accepted");
                assert_eq!(state.0, vec!["a".to_string(), "b".to_string()]);
                assert_eq!((state.1, state.2), (expected.1, expected.2));
                // Not silent: the cut is reported.
                assert!(
                    state
                        .3
                        .iter()
                        .any(|(journal, bytes)| journal == "meta" && *bytes > 0),
                    "flip at {position}: the cut was not reported ({:?})",
                    state.3
                );
                cut += 1;
            }
        }
        // The refused file is untouched; the cut one lost only its tail.
        std::fs::write(&path, &good).unwrap();
    }
    assert_eq!(refused, last_frame);
    assert_eq!(cut, good.len() - last_frame);
}

#[test]
fn repair_sets_damage_aside_and_keeps_every_valid_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = meta_with_entries(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Damage inside the second entry (topic "b").
    let first = 8 + u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    bytes[first + 12] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let error = open_with(dir.path(), log_config()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("dmqd repair"), "{message}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a refusal changes nothing"
    );

    let repairs = repair_journals(dir.path()).unwrap();
    assert_eq!(repairs.len(), 1);
    assert_eq!(repairs[0].damaged.len(), 1);
    assert_eq!(std::fs::read(&repairs[0].copy).unwrap(), bytes);
    let (topics, groups, left, _) = restored(dir.path()).unwrap();
    // Topic "b" is lost (its entry was the damage), everything else kept.
    assert_eq!(topics, vec!["a".to_string(), "c".to_string()]);
    assert_eq!((groups, left), (1, 5));
    // A second repair finds nothing.
    assert!(repair_journals(dir.path()).unwrap().is_empty());
}

#[test]
fn a_damaged_ack_journal_quarantines_its_group_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = open(dir.path());
        d.create_topic("t", topic(1)).unwrap();
        d.subscribe("t", "g", GroupConfig::default()).unwrap();
        d.subscribe("t", "h", GroupConfig::default()).unwrap();
        produce(&mut d, "t", 3);
        drain(&mut d, "t", "g", true);
        d.checkpoint().unwrap();
        produce(&mut d, "t", 3);
        drain(&mut d, "t", "g", true);
        d.checkpoint().unwrap();
    }
    let path = dir.path().join("dispatcher/group.t.g.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 30, "two frames expected");
    bytes[9] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut d = open(dir.path());
    let quarantined = d.quarantined();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].group.as_deref(), Some("g"));
    assert!(quarantined[0].reason.contains("damaged"));
    assert_eq!(drain(&mut d, "t", "h", true).len(), 6);
}

/// A byte flipped anywhere in a group's ack journal: the group is
/// quarantined (damage before the last frame) or loses acks (a cut last
/// frame: redelivery), but never skips an unacked message — also when the
/// cut takes its only snapshot and the group started at `Latest`.
#[test]
fn a_byte_flipped_anywhere_in_an_ack_journal_never_skips_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let latest = GroupConfig {
        start: dmq_dispatcher::StartPosition::Latest,
        ..GroupConfig::default()
    };
    // Every sync compacts: the journal is one snapshot frame.
    let compacting = || DispatcherConfig {
        ack_journal_compact_bytes: 1,
        ..DispatcherConfig::default()
    };
    let open = |dir: &Path| open_config(dir, log_config(), compacting()).unwrap();
    {
        let mut d = open(dir.path());
        d.create_topic("t", topic(1)).unwrap();
        d.subscribe("t", "g", latest.clone()).unwrap();
        produce(&mut d, "t", 10);
        // Deliver all ten, ack the first five.
        let member = d.join("t", "g", "m").unwrap();
        for delivery in d.fetch(member, 100).unwrap() {
            if delivery.record.offset < 5 {
                d.ack(member, 0, delivery.record.offset).unwrap();
            }
        }
        d.checkpoint().unwrap();
    }
    let path = dir.path().join("dispatcher/group.t.g.journal");
    let good = std::fs::read(&path).unwrap();
    let frame_len = 8 + u32::from_le_bytes(good[0..4].try_into().unwrap()) as usize;
    assert_eq!(frame_len, good.len(), "one snapshot frame");
    let (mut quarantined, mut served) = (0, 0);
    for position in 0..good.len() {
        let mut bytes = good.clone();
        bytes[position] ^= 0x41;
        std::fs::write(&path, &bytes).unwrap();
        let mut d = open(dir.path());
        if d.quarantined()
            .iter()
            .any(|q| q.group.as_deref() == Some("g"))
        {
            quarantined += 1;
        } else {
            let delivered = drain(&mut d, "t", "g", false);
            for unacked in 5..10 {
                assert!(
                    delivered.contains(&unacked),
                    "flip at {position}: offset {unacked} skipped ({delivered:?})"
                );
            }
            served += 1;
        }
        drop(d);
        std::fs::write(&path, &good).unwrap();
    }
    // One frame: every flip is a cut (never damage followed by a frame).
    assert_eq!((quarantined, served), (0, good.len()));
}

/// Regression: a dead-letter move that failed (here: the dead-letter topic
/// cannot be created, the partition cap is reached) made `poll` return
/// early, stranding every other ack timeout of that tick, and left its own
/// message in flight with no timer: stuck until a restart.
#[test]
fn a_failed_dead_letter_move_is_retried_and_strands_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let capped = DispatcherConfig {
        max_partitions_total: 3,
        ..DispatcherConfig::default()
    };
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path(), log_config()).unwrap());
    let mut d = Dispatcher::open(storage, clock.clone(), Arc::new(NullEventSink), capped).unwrap();
    d.create_topic("t", topic(1)).unwrap();
    d.create_topic("dead-ok", topic(1)).unwrap();
    d.create_topic("filler", topic(1)).unwrap();
    let one_attempt = |dead_letter: &str| GroupConfig {
        ack_timeout_ms: 100,
        max_attempts: 1,
        dead_letter_topic: Some(dead_letter.to_string()),
        ..GroupConfig::default()
    };
    // Group "a" dead-letters into a topic that cannot be created (cap);
    // group "b" into one that exists.
    d.subscribe("t", "a", one_attempt("dead-new")).unwrap();
    d.subscribe("t", "b", one_attempt("dead-ok")).unwrap();
    produce(&mut d, "t", 20);
    let a = d.join("t", "a", "m").unwrap();
    let b = d.join("t", "b", "m").unwrap();
    assert_eq!(d.fetch(a, 100).unwrap().len(), 20);
    assert_eq!(d.fetch(b, 100).unwrap().len(), 20);
    clock.advance_ms(200);
    d.poll()
        .expect("a failed dead-letter move does not fail the poll");
    let dead_ok = d.partitions("dead-ok").unwrap()[0].end_offset();
    assert_eq!(dead_ok, 20, "group b's timeouts were stranded");
    assert!(!d.topic_exists("dead-new"));
    // Room again (a topic deleted): group a's messages get there, retried.
    d.delete_topic("filler").unwrap();
    for _ in 0..5 {
        clock.advance_ms(1_000);
        d.poll().unwrap();
    }
    assert_eq!(d.partitions("dead-new").unwrap()[0].end_offset(), 20);
    let stats = d.group_stats("t", "a").unwrap();
    assert_eq!(stats[0].unacked, 0, "{stats:?}");
}

/// Regression: a delayed message whose append to its topic failed (a full
/// disk) was dropped from the batch and stayed "in flight" in the delay
/// store, never fired until a restart; the rest of its batch too.
#[test]
fn delays_due_on_a_full_disk_fire_once_there_is_room() {
    use dmq_dispatcher::MemoryStorage;
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = MemoryStorage::new(clock.clone());
    let mut d = Dispatcher::open(
        Arc::new(storage.clone()),
        clock.clone(),
        Arc::new(NullEventSink),
        DispatcherConfig::default(),
    )
    .unwrap();
    d.create_topic("t", topic(1)).unwrap();
    d.subscribe("t", "g", GroupConfig::default()).unwrap();
    let records = (0..10)
        .map(|i| {
            let mut record = RecordInput::new(format!("d{i}"));
            record.deliver_at_ms = Some(1_000_500);
            record
        })
        .collect();
    d.produce("t", Some(0), records).unwrap();
    storage.set_logs_full(true);
    clock.advance_ms(1_000);
    d.poll().expect("a full disk does not fail the poll");
    assert_eq!(d.partitions("t").unwrap()[0].end_offset(), 0);
    storage.set_logs_full(false);
    d.poll().unwrap();
    assert_eq!(d.partitions("t").unwrap()[0].end_offset(), 10);
    assert_eq!(drain(&mut d, "t", "g", true).len(), 10);
}

/// Regression: a NACK of a message on its last attempt whose dead-letter
/// copy could not be written (a full disk) returned an error and left the
/// message in flight with no deadline: never moved, never redelivered,
/// until its member left. Now the move is retried a second later, and the
/// message is moved once there is room.
#[test]
fn a_dead_letter_move_on_a_full_disk_is_retried_until_there_is_room() {
    use dmq_dispatcher::MemoryStorage;
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = MemoryStorage::new(clock.clone());
    let mut d = Dispatcher::open(
        Arc::new(storage.clone()),
        clock.clone(),
        Arc::new(NullEventSink),
        DispatcherConfig::default(),
    )
    .unwrap();
    d.create_topic("t", topic(1)).unwrap();
    let config = GroupConfig {
        max_attempts: 1,
        dead_letter_topic: Some("t-dead".into()),
        ..GroupConfig::default()
    };
    d.subscribe("t", "g", config).unwrap();
    produce(&mut d, "t", 1);
    let member = d.join("t", "g", "m").unwrap();
    let delivered = d.fetch(member, 10).unwrap();
    assert_eq!(delivered.len(), 1);
    storage.set_logs_full(true);
    d.nack(member, 0, 0, None)
        .expect("the nack is taken; the move is the broker's to retry");
    assert_eq!(d.partitions("t-dead").unwrap()[0].end_offset(), 0);
    // Still full a second later: tried again, not redelivered.
    clock.advance_ms(1_000);
    d.poll().unwrap();
    assert!(d.fetch(member, 10).unwrap().is_empty());
    assert_eq!(d.partitions("t-dead").unwrap()[0].end_offset(), 0);
    storage.set_logs_full(false);
    clock.advance_ms(1_000);
    d.poll().unwrap();
    assert_eq!(d.partitions("t-dead").unwrap()[0].end_offset(), 1);
    let stats = d.group_stats("t", "g").unwrap();
    assert_eq!(stats[0].unacked, 0, "{stats:?}");
    assert!(d.fetch(member, 10).unwrap().is_empty());
}
