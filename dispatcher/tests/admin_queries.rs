//! What the admin API asks the dispatcher: find a message, its state in
//! every group, the dead-letter topics, and deletions of every kind with an
//! exact dry-run count; deletions durable across a restart on a real disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dmq_dispatcher::{
    Backoff, DeadLetterTopic, DeliveryMode, DispatchError, Dispatcher, DispatcherConfig,
    FileStorage, GroupConfig, GroupMessageState, MemoryStorage, NullEventSink, Storage, Tombstone,
    TopicConfig,
};
use dmq_log_store::{Clock, FsyncPolicy, LogConfig, ManualClock, MessageId, RecordInput};

fn open(storage: Arc<dyn Storage>, clock: &Arc<ManualClock>) -> Dispatcher {
    Dispatcher::open(
        storage,
        clock.clone(),
        Arc::new(NullEventSink),
        DispatcherConfig::default(),
    )
    .unwrap()
}

fn memory() -> (Arc<ManualClock>, MemoryStorage, Dispatcher) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = MemoryStorage::new(clock.clone());
    let dispatcher = open(Arc::new(storage.clone()), &clock);
    (clock, storage, dispatcher)
}

fn config() -> GroupConfig {
    GroupConfig {
        ack_timeout_ms: 1_000,
        max_attempts: 3,
        backoff: Backoff::Fixed {
            delays_ms: vec![100],
        },
        ..GroupConfig::default()
    }
}

fn topic(dispatcher: &mut Dispatcher, name: &str, partitions: u32) {
    dispatcher
        .create_topic(
            name,
            TopicConfig {
                partitions,
                ordered: false,
            },
        )
        .unwrap();
}

/// Produces `values` to one partition; returns their ids.
fn produce(dispatcher: &mut Dispatcher, partition: u32, values: &[&str]) -> Vec<MessageId> {
    let records = values
        .iter()
        .map(|v| RecordInput::new(v.to_string()))
        .collect();
    dispatcher
        .produce("t", Some(partition), records)
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

fn produce_keyed(dispatcher: &mut Dispatcher, partition: u32, key: &str, value: &str) -> MessageId {
    let record = RecordInput::new(value.to_string()).with_key(key.to_string());
    dispatcher
        .produce("t", Some(partition), vec![record])
        .unwrap()[0]
        .id
}

/// Everything a new group (from the earliest offset) gets, as values.
fn delivered_to_a_new_group(dispatcher: &mut Dispatcher, group: &str) -> BTreeSet<String> {
    dispatcher.subscribe("t", group, config()).unwrap();
    let member = dispatcher.join("t", group, "m").unwrap();
    let got = dispatcher.fetch(member, 1_000).unwrap();
    got.iter()
        .map(|d| String::from_utf8(d.record.value.to_vec()).unwrap())
        .collect()
}

fn values(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|v| v.to_string()).collect()
}

fn state(group: &str, member: Option<&str>) -> GroupMessageState {
    GroupMessageState {
        group: group.to_string(),
        member: member.map(str::to_string),
        acked: false,
        attempts: 0,
        in_flight: false,
        next_delivery_ms: None,
    }
}

#[test]
fn find_a_message_and_its_state_in_every_group() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 2);
    d.subscribe("t", "g", config()).unwrap();
    let broadcast = GroupConfig {
        mode: DeliveryMode::Broadcast,
        ..config()
    };
    d.subscribe("t", "b", broadcast.clone()).unwrap();
    d.subscribe("t", "idle", broadcast).unwrap();
    let n1 = d.join("t", "b", "n1").unwrap();
    d.join("t", "b", "n2").unwrap();
    let g = d.join("t", "g", "m").unwrap();
    produce(&mut d, 0, &["other"]);
    let id = produce(&mut d, 1, &["wanted"])[0];

    let (partition, record) = d.find_message("t", &id).unwrap().unwrap();
    assert_eq!((partition, record.offset), (1, 0));
    assert_eq!(record.value, "wanted");
    assert!(d
        .find_message("t", &MessageId::new(5, 5))
        .unwrap()
        .is_none());
    assert!(matches!(
        d.find_message("nope", &id),
        Err(DispatchError::UnknownTopic(_))
    ));
    assert!(matches!(
        d.message_states("t", 2, &record),
        Err(DispatchError::UnknownPartition { .. })
    ));

    // Nothing read yet: one entry per group, per loaded broadcast member.
    let states = d.message_states("t", 1, &record).unwrap();
    assert_eq!(
        states,
        vec![
            state("b", Some("n1")),
            state("b", Some("n2")),
            state("g", None),
            state("idle", None),
        ]
    );

    // Delivered: in flight, attempt 1.
    let got = d.fetch(g, 10).unwrap();
    assert_eq!(got.len(), 2);
    let in_g = |d: &Dispatcher| {
        d.message_states("t", 1, &record)
            .unwrap()
            .into_iter()
            .find(|s| s.group == "g")
            .unwrap()
    };
    let s = in_g(&d);
    assert!(s.in_flight && !s.acked);
    assert_eq!(s.attempts, 1);
    // Nacked: waiting for the retry, whose time is reported.
    d.nack(g, 1, 0, Some(250)).unwrap();
    let s = in_g(&d);
    assert!(!s.in_flight && !s.acked);
    assert_eq!(s.attempts, 1);
    assert_eq!(s.next_delivery_ms, Some(clock.now_ms() + 250));
    clock.advance_ms(250);
    let again = d.fetch(g, 10).unwrap();
    assert_eq!(again.len(), 1);
    let s = in_g(&d);
    assert!(s.in_flight);
    assert_eq!(s.attempts, 2);
    assert_eq!(s.next_delivery_ms, None);
    d.ack(g, 1, 0).unwrap();
    let s = in_g(&d);
    assert!(s.acked && !s.in_flight);

    // Broadcast members each have their own state.
    d.fetch(n1, 10).unwrap();
    d.ack(n1, 1, 0).unwrap();
    let states = d.message_states("t", 1, &record).unwrap();
    assert!(states[0].acked && states[0].member.as_deref() == Some("n1"));
    assert!(!states[1].acked && states[1].member.as_deref() == Some("n2"));
}

#[test]
fn deliver_at_times_are_reported_while_ahead() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 1);
    d.subscribe("t", "g", config()).unwrap();
    let g = d.join("t", "g", "m").unwrap();
    // The broker may append straight to a partition: a record whose
    // deliver-at is ahead then waits in the group's timing wheel.
    let due = clock.now_ms() + 5_000;
    let logs = d.partitions("t").unwrap();
    let log = &logs[0];
    log.append(vec![RecordInput {
        deliver_at_ms: Some(due),
        ..RecordInput::new("later")
    }])
    .unwrap();
    let record = log.read(0, 1).unwrap().remove(0);
    // Not read yet: the record's own deliver-at.
    assert_eq!(
        d.message_states("t", 0, &record).unwrap()[0].next_delivery_ms,
        Some(due)
    );
    // Read and parked until its time: the timer's.
    assert!(d.fetch(g, 10).unwrap().is_empty());
    let s = &d.message_states("t", 0, &record).unwrap()[0];
    assert_eq!(
        (s.next_delivery_ms, s.attempts, s.in_flight),
        (Some(due), 0, false)
    );
    clock.advance_ms(5_000);
    assert_eq!(d.fetch(g, 10).unwrap().len(), 1);
    assert_eq!(
        d.message_states("t", 0, &record).unwrap()[0].next_delivery_ms,
        None
    );
}

#[test]
fn deleted_and_expired_records_are_acked_once_the_group_passed_them() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 1);
    d.subscribe("t", "g", config()).unwrap();
    let g = d.join("t", "g", "m").unwrap();
    let now = clock.now_ms();
    d.produce(
        "t",
        Some(0),
        vec![
            RecordInput {
                expire_at_ms: Some(now + 10),
                ..RecordInput::new("short-lived")
            },
            RecordInput::new("deleted"),
            RecordInput::new("kept"),
        ],
    )
    .unwrap();
    let records = d.partitions("t").unwrap()[0].read(0, 10).unwrap();
    d.delete("t", Tombstone::MessageId(records[1].id.to_string()))
        .unwrap();
    assert!(d.is_deleted("t", 0, &records[1]));
    assert!(!d.is_deleted("t", 0, &records[0]) && !d.is_deleted("t", 0, &records[2]));
    assert!(!d.is_deleted("nope", 0, &records[1]));
    // Not passed yet: the state says so.
    assert!(!d.message_states("t", 0, &records[1]).unwrap()[0].acked);
    clock.advance_ms(10);
    let got = d.fetch(g, 10).unwrap();
    assert_eq!(got.len(), 1);
    let acked: Vec<bool> = records
        .iter()
        .map(|r| d.message_states("t", 0, r).unwrap()[0].acked)
        .collect();
    assert_eq!(acked, vec![true, true, false]);
}

#[test]
fn dead_letter_topics_are_listed_before_they_exist() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 1);
    d.subscribe("t", "g", config()).unwrap();
    let custom = GroupConfig {
        dead_letter_topic: Some("custom.dlq".into()),
        ..config()
    };
    d.subscribe("t", "h", custom).unwrap();
    let expected = vec![
        DeadLetterTopic {
            topic: "t.g.dlq".into(),
            source_topic: "t".into(),
            group: "g".into(),
        },
        DeadLetterTopic {
            topic: "custom.dlq".into(),
            source_topic: "t".into(),
            group: "h".into(),
        },
    ];
    assert_eq!(d.dead_letter_topics(), expected);
    assert!(d.topic_exists("t"));
    assert!(!d.topic_exists("t.g.dlq") && !d.topic_exists("custom.dlq"));
    // The first dead letter creates the listed topic.
    let g = d.join("t", "g", "m").unwrap();
    produce(&mut d, 0, &["poison"]);
    for _ in 0..3 {
        assert_eq!(d.fetch(g, 1).unwrap().len(), 1);
        d.nack(g, 0, 0, Some(0)).unwrap();
        clock.advance_ms(1);
    }
    assert!(d.topic_exists("t.g.dlq"));
    assert_eq!(d.dead_letter_topics(), expected);
    d.delete_group("t", "h").unwrap();
    assert_eq!(d.dead_letter_topics(), expected[..1].to_vec());
}

#[test]
fn a_key_deletion_spares_messages_produced_later() {
    let (_clock, _storage, mut d) = memory();
    topic(&mut d, "t", 2);
    produce_keyed(&mut d, 0, "k", "k-old-0");
    produce_keyed(&mut d, 1, "k", "k-old-1");
    produce_keyed(&mut d, 1, "other", "other");
    produce(&mut d, 0, &["plain"]);
    let key = Tombstone::Key(b"k".to_vec());
    assert_eq!(d.count_covered("t", &key).unwrap(), 2);
    assert_eq!(d.delete_counted("t", key.clone()).unwrap(), 2);
    assert_eq!(d.count_covered("t", &key).unwrap(), 0);
    produce_keyed(&mut d, 0, "k", "k-new-0");
    produce_keyed(&mut d, 1, "k", "k-new-1");
    assert_eq!(d.count_covered("t", &key).unwrap(), 2);
    assert_eq!(
        delivered_to_a_new_group(&mut d, "g"),
        values(&["other", "plain", "k-new-0", "k-new-1"])
    );
}

#[test]
fn ranges_cover_only_what_is_stored_when_they_are_made() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 1);
    produce(&mut d, 0, &["a", "b", "c"]);
    let past_the_end = Tombstone::OffsetRange {
        partition: 0,
        start: 1,
        end: 100,
    };
    assert_eq!(d.count_covered("t", &past_the_end).unwrap(), 2);
    d.delete("t", past_the_end.clone()).unwrap();
    // A time range reaching into the future.
    let now = clock.now_ms();
    let future = Tombstone::TimeRange {
        start_ms: now - 1,
        end_ms: now + 1_000_000,
    };
    assert_eq!(d.delete_counted("t", future).unwrap(), 1);
    clock.advance_ms(10);
    produce(&mut d, 0, &["d", "e"]);
    assert_eq!(d.count_covered("t", &past_the_end).unwrap(), 2);
    assert_eq!(delivered_to_a_new_group(&mut d, "g"), values(&["d", "e"]));
    // Checked: a partition outside the topic, an id that does not parse.
    let outside = Tombstone::OffsetRange {
        partition: 1,
        start: 0,
        end: 1,
    };
    assert!(matches!(
        d.count_covered("t", &outside),
        Err(DispatchError::UnknownPartition { .. })
    ));
    assert!(matches!(
        d.delete("t", outside),
        Err(DispatchError::UnknownPartition { .. })
    ));
    let garbage = Tombstone::MessageId("not an id".into());
    assert!(matches!(
        d.count_covered("t", &garbage),
        Err(DispatchError::InvalidArgument(_))
    ));
    assert!(matches!(
        d.count_covered("nope", &Tombstone::Key(vec![])),
        Err(DispatchError::UnknownTopic(_))
    ));
}

#[test]
fn counts_leave_out_what_earlier_deletions_cover() {
    let (clock, _storage, mut d) = memory();
    topic(&mut d, "t", 2);
    // Offsets 0..10 of partition 0 at times t0 + 10 * offset; partition 1
    // has three records at t0 + 45.
    let t0 = clock.now_ms();
    let mut ids = Vec::new();
    for i in 0..10 {
        let key = if i % 3 == 0 { "k" } else { "j" };
        ids.push(produce_keyed(&mut d, 0, key, &format!("p0-{i}")));
        if i == 4 {
            clock.advance_ms(5);
            produce(&mut d, 1, &["p1-0", "p1-1", "p1-2"]);
            clock.advance_ms(5);
        } else {
            clock.advance_ms(10);
        }
    }
    let offsets = |start, end| Tombstone::OffsetRange {
        partition: 0,
        start,
        end,
    };
    let time = Tombstone::TimeRange {
        start_ms: t0 + 40,
        end_ms: t0 + 80,
    }; // p0 offsets 4..8, and partition 1
    assert_eq!(d.count_covered("t", &time).unwrap(), 4 + 3);
    assert_eq!(d.delete_counted("t", offsets(2, 5)).unwrap(), 3);
    assert_eq!(d.count_covered("t", &time).unwrap(), 3 + 3);
    d.delete("t", Tombstone::MessageId(ids[6].to_string()))
        .unwrap();
    assert_eq!(d.count_covered("t", &time).unwrap(), 2 + 3);
    // Key k: offsets 0, 3, 6, 9; 3 is in the range, 6 deleted by id.
    let key = Tombstone::Key(b"k".to_vec());
    assert_eq!(d.count_covered("t", &key).unwrap(), 2);
    assert_eq!(d.delete_counted("t", key).unwrap(), 2);
    // Offsets 4..8: 4 deleted by range, 6 by id (and key): 5 and 7 left.
    assert_eq!(d.count_covered("t", &time).unwrap(), 2 + 3);
    assert_eq!(d.delete_counted("t", time.clone()).unwrap(), 5);
    assert_eq!(d.count_covered("t", &time).unwrap(), 0);
    assert_eq!(d.count_covered("t", &offsets(0, 10)).unwrap(), 2);
    // An id already deleted, or covered by another deletion, counts 0.
    let id = |i: usize| Tombstone::MessageId(ids[i].to_string());
    assert_eq!(d.count_covered("t", &id(6)).unwrap(), 0);
    assert_eq!(d.count_covered("t", &id(3)).unwrap(), 0);
    assert_eq!(d.count_covered("t", &id(1)).unwrap(), 1);
    assert_eq!(
        delivered_to_a_new_group(&mut d, "g"),
        values(&["p0-1", "p0-8"])
    );
}

#[test]
fn metadata_journals_from_before_bounds_still_parse_unbounded() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = MemoryStorage::new(clock.clone());
    let append = |entries: &[String]| {
        let (mut meta, _) = storage.open_journal("meta").unwrap();
        for entry in entries {
            meta.append(entry.as_bytes());
        }
        meta.sync().unwrap();
    };
    // Entries as an older version wrote them (no bounds).
    append(&[r#"{"Topic":{"name":"t","config":{"partitions":1,"ordered":false}}}"#.into()]);
    let id = {
        let mut d = open(Arc::new(storage.clone()), &clock);
        produce(&mut d, 0, &["0", "1", "2", "3", "4", "5", "6"])[3]
    };
    append(&[
        r#"{"Tombstone":{"topic":"t","tombstone":{"OffsetRange":{"partition":0,"start":4,"end":8}}}}"#.into(),
        format!(r#"{{"Tombstone":{{"topic":"t","tombstone":{{"MessageId":"{id}"}}}}}}"#),
        r#"{"Tombstone":{"topic":"t","tombstone":{"TimeRange":{"start_ms":1000010,"end_ms":1000020}}}}"#.into(),
    ]);
    let mut d = open(Arc::new(storage.clone()), &clock);
    // Deletions written before bounds cover records produced after them.
    produce(&mut d, 0, &["7"]);
    clock.advance_ms(10);
    produce(&mut d, 0, &["in time range"]);
    clock.advance_ms(10);
    produce(&mut d, 0, &["last"]);
    assert_eq!(
        delivered_to_a_new_group(&mut d, "g"),
        values(&["0", "1", "2", "last"])
    );
    // New entries are written in the same format, plus the bound.
    d.delete("t", Tombstone::Key(b"k".to_vec())).unwrap();
    d.delete("t", Tombstone::MessageId(id.to_string())).unwrap();
    let (_, payloads) = storage.open_journal("meta").unwrap();
    let last: Vec<String> = payloads[payloads.len() - 2..]
        .iter()
        .map(|p| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(
        last,
        vec![
            r#"{"Tombstone":{"topic":"t","tombstone":{"Key":[107]},"below":[10]}}"#.to_string(),
            format!(r#"{{"Tombstone":{{"topic":"t","tombstone":{{"MessageId":"{id}"}}}}}}"#),
        ]
    );
}

// ----- on disk -------------------------------------------------------------

fn file_storage(dir: &Path) -> Arc<dyn Storage> {
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    Arc::new(FileStorage::new(dir, config).unwrap())
}

#[test]
fn deletions_of_every_kind_survive_a_restart_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let deletions;
    {
        let mut d = open(file_storage(dir.path()), &clock);
        topic(&mut d, "t", 2);
        // A group that reads nothing before the restart.
        d.subscribe("t", "before", config()).unwrap();
        produce(&mut d, 0, &["r0", "r1", "r2", "r3"]);
        let by_id = produce(&mut d, 1, &["s0", "by id", "s2"])[1];
        produce_keyed(&mut d, 0, "k", "key k 0");
        produce_keyed(&mut d, 1, "k", "key k 1");
        // Broker timestamps come from the system clock here: a record alone
        // in its milliseconds.
        std::thread::sleep(Duration::from_millis(3));
        let by_time = produce(&mut d, 1, &["by time"])[0];
        std::thread::sleep(Duration::from_millis(3));
        produce(&mut d, 1, &["s4"]);
        let stamp = d
            .find_message("t", &by_time)
            .unwrap()
            .unwrap()
            .1
            .timestamp_ms;
        deletions = [
            Tombstone::OffsetRange {
                partition: 0,
                start: 1,
                end: 3,
            },
            Tombstone::MessageId(by_id.to_string()),
            Tombstone::TimeRange {
                start_ms: stamp,
                end_ms: stamp + 1,
            },
            Tombstone::Key(b"k".to_vec()),
        ];
        for tombstone in &deletions {
            // Ok means durable: the dispatcher is dropped right after,
            // without a checkpoint (a crash, as far as it is concerned).
            let expected = match tombstone {
                Tombstone::OffsetRange { .. } | Tombstone::Key(_) => 2,
                _ => 1,
            };
            assert_eq!(d.delete_counted("t", tombstone.clone()).unwrap(), expected);
        }
    }
    let kept = values(&["r0", "r3", "s0", "s2", "s4"]);
    {
        let mut d = open(file_storage(dir.path()), &clock);
        for tombstone in &deletions {
            assert_eq!(d.count_covered("t", tombstone).unwrap(), 0, "{tombstone:?}");
        }
        let member = d.join("t", "before", "m").unwrap();
        let got: BTreeSet<String> = d
            .fetch(member, 100)
            .unwrap()
            .iter()
            .map(|d| String::from_utf8(d.record.value.to_vec()).unwrap())
            .collect();
        assert_eq!(got, kept);
        assert_eq!(delivered_to_a_new_group(&mut d, "after"), kept);
        // One more deletion, then a crash that tears its journal entry.
        d.delete(
            "t",
            Tombstone::OffsetRange {
                partition: 0,
                start: 0,
                end: 1,
            },
        )
        .unwrap();
    }
    let meta = dir.path().join("dispatcher").join("meta.journal");
    let bytes = std::fs::read(&meta).unwrap();
    std::fs::write(&meta, &bytes[..bytes.len() - 3]).unwrap();
    let mut d = open(file_storage(dir.path()), &clock);
    // The torn deletion is gone as a whole; the earlier ones are intact.
    assert_eq!(delivered_to_a_new_group(&mut d, "third"), kept);
    // Messages with a deleted key produced later are delivered.
    produce_keyed(&mut d, 0, "k", "key k again");
    assert_eq!(
        delivered_to_a_new_group(&mut d, "fourth"),
        kept.iter()
            .cloned()
            .chain(["key k again".to_string()])
            .collect()
    );
}

#[test]
fn deleted_prefixes_are_unlinked_once_every_group_passed_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = || -> Arc<dyn Storage> {
        let config = LogConfig {
            segment_bytes_max: 64 * 1024,
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        };
        Arc::new(FileStorage::new(dir.path(), config).unwrap())
    };
    let value = "x".repeat(1000);
    let segments_before;
    {
        let mut d = open(storage(), &clock);
        topic(&mut d, "t", 1);
        d.subscribe("t", "lazy", config()).unwrap();
        d.subscribe("t", "busy", config()).unwrap();
        for _ in 0..30 {
            let batch: Vec<&str> = vec![value.as_str(); 10];
            produce(&mut d, 0, &batch);
        }
        let log = d.partitions("t").unwrap()[0].clone();
        assert_eq!(log.end_offset(), 300);
        segments_before = log.size_bytes();
        // "busy" reads and acks 200 messages; "lazy" reads nothing.
        let busy = d.join("t", "busy", "m").unwrap();
        let mut acked = 0;
        while acked < 200 {
            for delivery in d.fetch(busy, 200 - acked).unwrap() {
                d.ack(busy, 0, delivery.record.offset).unwrap();
                acked += 1;
            }
        }
        d.delete(
            "t",
            Tombstone::OffsetRange {
                partition: 0,
                start: 0,
                end: 250,
            },
        )
        .unwrap();
        // "lazy" has not passed them: nothing is unlinked.
        assert_eq!(d.reclaim_deleted("t").unwrap(), 0);
        assert_eq!(log.start_offset(), 0);
        d.delete_group("t", "lazy").unwrap();
        // Now up to busy's floor (200): whole sealed segments only.
        let unlinked = d.reclaim_deleted("t").unwrap();
        assert!(unlinked > 0);
        let start = log.start_offset();
        assert!(start > 0 && start <= 200, "start {start}");
        assert!(log.size_bytes() < segments_before);
        // busy gets what is left past the deletion, then everything up to
        // 250 can go.
        let rest: Vec<u64> = d
            .fetch(busy, 1_000)
            .unwrap()
            .iter()
            .map(|delivery| delivery.record.offset)
            .collect();
        assert_eq!(rest, (250..300).collect::<Vec<_>>());
        for offset in rest {
            d.ack(busy, 0, offset).unwrap();
        }
        d.reclaim_deleted("t").unwrap();
        let start = log.start_offset();
        assert!(start <= 250, "never past the deletion: {start}");
        assert!(
            d.count_covered(
                "t",
                &Tombstone::OffsetRange {
                    partition: 0,
                    start: 0,
                    end: 300,
                }
            )
            .unwrap()
                == 50
        );
        d.checkpoint().unwrap();
    }
    // After a restart: a new group gets exactly what was not deleted.
    let mut d = open(storage(), &clock);
    d.subscribe("t", "after", config()).unwrap();
    let member = d.join("t", "after", "m").unwrap();
    let offsets: Vec<u64> = d
        .fetch(member, 1_000)
        .unwrap()
        .iter()
        .map(|delivery| delivery.record.offset)
        .collect();
    assert_eq!(offsets, (250..300).collect::<Vec<_>>());
}
