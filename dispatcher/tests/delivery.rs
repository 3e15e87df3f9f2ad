//! Delivery rules, one scenario each, on simulated storage and a manual clock.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use dmq_dispatcher::{
    Backoff, DeliveryMode, Dispatcher, DispatcherConfig, EventKind, GroupConfig, MemoryEventSink,
    MemoryStorage, StartPosition, Tombstone, TopicConfig,
};
use dmq_log_store::{Clock, ManualClock, RecordInput};

struct World {
    clock: Arc<ManualClock>,
    storage: MemoryStorage,
    events: MemoryEventSink,
    config: DispatcherConfig,
    dispatcher: Dispatcher,
}

impl World {
    fn new() -> World {
        World::with_config(DispatcherConfig::default())
    }

    fn with_config(config: DispatcherConfig) -> World {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let storage = MemoryStorage::new(clock.clone());
        let events = MemoryEventSink::default();
        let dispatcher = Dispatcher::open(
            Arc::new(storage.clone()),
            clock.clone(),
            Arc::new(events.clone()),
            config.clone(),
        )
        .unwrap();
        World {
            clock,
            storage,
            events,
            config,
            dispatcher,
        }
    }

    /// Drops the dispatcher without a checkpoint (a crash) and reopens it.
    fn crash_and_reopen(&mut self) {
        self.dispatcher = Dispatcher::open(
            Arc::new(self.storage.clone()),
            self.clock.clone(),
            Arc::new(self.events.clone()),
            self.config.clone(),
        )
        .unwrap();
    }

    fn produce(&mut self, topic: &str, values: &[&str]) -> Vec<u64> {
        let records = values
            .iter()
            .map(|v| RecordInput::new(v.to_string()))
            .collect();
        self.dispatcher
            .produce(topic, Some(0), records)
            .unwrap()
            .into_iter()
            .map(|p| p.offset.unwrap())
            .collect()
    }

    /// (offset, attempt) of what `member` fetches now (at most 10).
    fn fetched_attempts(&mut self, member: dmq_dispatcher::MemberId) -> Vec<(u64, u32)> {
        let got = self.dispatcher.fetch(member, 10).unwrap();
        got.iter().map(|d| (d.record.offset, d.attempt)).collect()
    }

    /// Partition 0: `member` gets offset 0 twice (attempts 1 and 2) and
    /// nacks it each time (retry in 10 ms, waited); it acks offset 1 the
    /// first time; whatever else it got stays in flight.
    fn fail_offset_0_twice_and_ack_offset_1(&mut self, member: dmq_dispatcher::MemberId) {
        for attempt in 1..=2 {
            let got = self.dispatcher.fetch(member, 3).unwrap();
            assert_eq!((got[0].record.offset, got[0].attempt), (0, attempt));
            if attempt == 1 {
                self.dispatcher.ack(member, 0, 1).unwrap();
            }
            self.dispatcher.nack(member, 0, 0, Some(10)).unwrap();
            self.clock.advance_ms(10);
        }
    }

    /// The payloads of `journal` once a poll past the ack-sync interval
    /// wrote what the groups hold.
    fn synced_journal(&mut self, journal: &str) -> Vec<Vec<u8>> {
        use dmq_dispatcher::Storage;
        self.clock.advance_ms(100);
        self.dispatcher.poll().unwrap();
        self.storage.open_journal(journal).unwrap().1
    }

    /// Records in partition 0 of dead-letter topic `dlq`.
    fn dead_letters(&self, dlq: &str) -> u64 {
        use dmq_dispatcher::PartitionLog;
        self.storage
            .memory_log(dlq, 0)
            .expect("dead-letter topic")
            .end_offset()
    }

    fn values(deliveries: &[dmq_dispatcher::Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8(d.record.value.to_vec()).unwrap())
            .collect()
    }
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

fn topic(world: &mut World, name: &str, ordered: bool) {
    world
        .dispatcher
        .create_topic(
            name,
            TopicConfig {
                partitions: 1,
                ordered,
            },
        )
        .unwrap();
}

#[test]
fn every_group_gets_every_message() {
    let mut w = World::new();
    topic(&mut w, "orders", false);
    let mut members = Vec::new();
    for group in ["billing", "shipping", "audit"] {
        w.dispatcher.subscribe("orders", group, config()).unwrap();
        let member = w.dispatcher.join("orders", group, "m").unwrap();
        w.dispatcher.add_credit(member, 100).unwrap();
        members.push(member);
    }
    w.produce("orders", &["a", "b", "c"]);
    let deliveries = w.dispatcher.poll().unwrap();
    for member in members {
        let mine: Vec<_> = deliveries
            .iter()
            .filter(|d| d.member == member)
            .cloned()
            .collect();
        assert_eq!(World::values(&mine), vec!["a", "b", "c"]);
        assert!(mine.iter().all(|d| d.attempt == 1));
    }
    // A new group subscribes with no change to producers and gets history.
    w.dispatcher.subscribe("orders", "late", config()).unwrap();
    let late = w.dispatcher.join("orders", "late", "m").unwrap();
    assert_eq!(
        World::values(&w.dispatcher.fetch(late, 10).unwrap()),
        vec!["a", "b", "c"]
    );
}

#[test]
fn acked_messages_are_not_redelivered_and_unacked_are() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["a", "b"]);
    let got = w.dispatcher.fetch(member, 10).unwrap();
    assert_eq!(got.len(), 2);
    assert!(w.dispatcher.ack(member, 0, got[0].record.offset).unwrap());
    assert!(!w.dispatcher.ack(member, 0, got[0].record.offset).unwrap());
    // Timeout + backoff: only "b" comes back, as attempt 2.
    w.clock.advance_ms(1_000);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    w.clock.advance_ms(100);
    let again = w.dispatcher.fetch(member, 10).unwrap();
    assert_eq!(World::values(&again), vec!["b"]);
    assert_eq!(again[0].attempt, 2);
    assert!(w.dispatcher.ack(member, 0, 5).is_err(), "never delivered");
}

/// PROTOCOL.md §4 "Redelivery": after failed attempt n the message comes
/// back no earlier than, and (with credit) exactly at: delivery +
/// ack timeout + backoff(n) for a timeout; NACK + its delay; NACK +
/// backoff(n) without one; and the last attempt's failure dead-letters at
/// once, whatever the NACK's delay. Time is the injected (wall) clock.
#[test]
fn redelivery_waits_exactly_the_documented_delay() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let config = GroupConfig {
        ack_timeout_ms: 1_000,
        max_attempts: 4,
        backoff: Backoff::Exponential {
            initial_ms: 100,
            max_ms: 10_000,
        },
        ..GroupConfig::default()
    };
    w.dispatcher.subscribe("t", "g", config).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["work"]);
    // Nothing comes back before `at`; then it does, as attempt `attempt`.
    let redelivered_at = |w: &mut World, at: i64, attempt: u32| {
        let early = at - 1 - w.clock.now_ms();
        w.clock.advance_ms(early);
        assert!(
            w.dispatcher.fetch(member, 1).unwrap().is_empty(),
            "attempt {attempt} came before its time"
        );
        w.clock.advance_ms(1);
        let got = w.dispatcher.fetch(member, 1).unwrap();
        assert_eq!(got.len(), 1, "attempt {attempt} not back at its time");
        assert_eq!(got[0].attempt, attempt);
    };

    let first = w.clock.now_ms();
    assert_eq!(w.dispatcher.fetch(member, 1).unwrap()[0].attempt, 1);
    // Attempt 1 times out (the broker polls at its deadline, as the
    // engine does at `next_wakeup_ms`): then backoff(1) = 100 ms.
    assert_eq!(w.dispatcher.next_wakeup_ms(), Some(first + 1_000));
    w.clock.advance_ms(1_000);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    redelivered_at(&mut w, first + 1_000 + 100, 2);
    // Attempt 2 is NACKed without a delay 10 ms later: backoff(2) = 200 ms.
    w.clock.advance_ms(10);
    let nacked = w.clock.now_ms();
    w.dispatcher.nack(member, 0, 0, None).unwrap();
    redelivered_at(&mut w, nacked + 200, 3);
    // Attempt 3 is NACKed with 50 ms: exactly that, no backoff.
    let nacked = w.clock.now_ms();
    w.dispatcher.nack(member, 0, 0, Some(50)).unwrap();
    redelivered_at(&mut w, nacked + 50, 4);
    // Attempt 4 is the last: its NACK dead-letters at once, delay ignored.
    w.dispatcher.nack(member, 0, 0, Some(60_000)).unwrap();
    use dmq_dispatcher::PartitionLog;
    let dead = w
        .storage
        .memory_log("t.g.dlq", 0)
        .expect("dead-letter topic");
    assert_eq!(dead.end_offset(), 1, "dead-lettered at once");
    w.clock.advance_ms(120_000);
    assert!(w.dispatcher.fetch(member, 1).unwrap().is_empty());

    // A NACK with delay 0 comes back at once; a last attempt that times
    // out is dead-lettered at its ack deadline, without a backoff.
    w.produce("t", &["again"]);
    let got = w.dispatcher.fetch(member, 1).unwrap();
    assert_eq!(got[0].attempt, 1);
    let offset = got[0].record.offset;
    w.dispatcher.nack(member, 0, offset, Some(0)).unwrap();
    assert_eq!(w.dispatcher.fetch(member, 1).unwrap()[0].attempt, 2);
    w.dispatcher.nack(member, 0, offset, Some(0)).unwrap();
    assert_eq!(w.dispatcher.fetch(member, 1).unwrap()[0].attempt, 3);
    w.dispatcher.nack(member, 0, offset, Some(0)).unwrap();
    assert_eq!(w.dispatcher.fetch(member, 1).unwrap()[0].attempt, 4);
    w.clock.advance_ms(999);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    assert_eq!(dead.end_offset(), 1);
    w.clock.advance_ms(1);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    assert_eq!(dead.end_offset(), 2, "dead-lettered at the deadline");
}

#[test]
fn max_attempts_moves_to_the_dead_letter_topic_with_the_same_id() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["poison"]);
    let mut id = None;
    for attempt in 1..=3 {
        let got = w.dispatcher.fetch(member, 1).unwrap();
        assert_eq!(got.len(), 1, "attempt {attempt}");
        assert_eq!(got[0].attempt, attempt);
        id = Some(got[0].record.id);
        w.dispatcher.nack(member, 0, 0, Some(10)).unwrap();
        w.clock.advance_ms(10);
    }
    assert!(w.dispatcher.fetch(member, 1).unwrap().is_empty());
    let dead = w
        .storage
        .memory_log("t.g.dlq", 0)
        .expect("dead-letter topic");
    use dmq_dispatcher::PartitionLog;
    let records = dead.read(0, 10).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, id.unwrap());
    let header = |name: &str| {
        records[0]
            .headers
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("dmq.dlq.topic"), Some(Bytes::from("t")));
    assert_eq!(header("dmq.dlq.offset"), Some(Bytes::from("0")));
    assert_eq!(header("dmq.dlq.attempts"), Some(Bytes::from("3")));
    let events = w.events.take();
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::DeadLettered { .. })));
    assert_eq!(w.dispatcher.group_stats("t", "g").unwrap()[0].ack_floor, 1);
}

#[test]
fn a_member_that_leaves_hands_its_messages_to_the_others_at_once() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let first = w.dispatcher.join("t", "g", "one").unwrap();
    let second = w.dispatcher.join("t", "g", "two").unwrap();
    w.produce("t", &["a", "b", "c", "d"]);
    let got = w.dispatcher.fetch(first, 4).unwrap();
    assert_eq!(got.len(), 4);
    w.dispatcher.ack(first, 0, 0).unwrap();
    w.dispatcher.leave(first).unwrap();
    w.dispatcher.add_credit(second, 10).unwrap();
    let moved = w.dispatcher.poll().unwrap();
    assert_eq!(World::values(&moved), vec!["b", "c", "d"]);
    assert!(moved.iter().all(|d| d.member == second && d.attempt == 2));
}

#[test]
fn members_take_consecutive_messages_of_a_partition_in_chunks() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let first = w.dispatcher.join("t", "g", "one").unwrap();
    let second = w.dispatcher.join("t", "g", "two").unwrap();
    w.dispatcher.add_credit(first, 1_000).unwrap();
    w.dispatcher.add_credit(second, 1_000).unwrap();
    let values: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    w.produce("t", &values);
    let deliveries = w.dispatcher.poll().unwrap();
    assert_eq!(deliveries.len(), 100);
    // One turn of a member is a run of consecutive offsets (one DELIVER
    // batch, one trace record), not every other message.
    let offsets = |member| -> Vec<u64> {
        deliveries
            .iter()
            .filter(|d| d.member == member)
            .map(|d| d.record.offset)
            .collect()
    };
    assert_eq!(offsets(first), (0..64).collect::<Vec<_>>());
    assert_eq!(offsets(second), (64..100).collect::<Vec<_>>());
    // Credit still bounds a turn.
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let first = w.dispatcher.join("t", "g", "one").unwrap();
    let second = w.dispatcher.join("t", "g", "two").unwrap();
    w.dispatcher.add_credit(first, 3).unwrap();
    w.dispatcher.add_credit(second, 3).unwrap();
    w.produce("t", &values[..10]);
    let deliveries = w.dispatcher.poll().unwrap();
    let by = |member| -> Vec<u64> {
        deliveries
            .iter()
            .filter(|d| d.member == member)
            .map(|d| d.record.offset)
            .collect()
    };
    assert_eq!(by(first), vec![0, 1, 2]);
    assert_eq!(by(second), vec![3, 4, 5]);
}

#[test]
fn a_fetched_message_returned_unsent_keeps_its_attempt_and_is_never_dead_lettered() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    // One attempt only: a NACK here would dead-letter at once.
    let once = GroupConfig {
        max_attempts: 1,
        ..config()
    };
    w.dispatcher.subscribe("t", "g", once).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    let other = w.dispatcher.join("t", "g", "other").unwrap();
    w.produce("t", &["a", "b", "c"]);
    let got = w.dispatcher.fetch(member, 3).unwrap();
    assert_eq!(World::values(&got), vec!["a", "b", "c"]);
    w.dispatcher.ack(member, 0, 0).unwrap();
    // "b" and "c" did not fit the caller's frame: handed back.
    for d in &got[1..] {
        assert!(w
            .dispatcher
            .return_unsent(member, 0, d.record.offset)
            .unwrap());
    }
    // Not twice, not by another member, not a message never delivered.
    assert!(!w.dispatcher.return_unsent(member, 0, 1).unwrap());
    assert!(!w.dispatcher.return_unsent(member, 0, 0).unwrap(), "acked");
    assert!(!w.dispatcher.return_unsent(other, 0, 1).unwrap());
    assert!(!w.dispatcher.return_unsent(member, 0, 9).unwrap());
    assert!(w.dispatcher.return_unsent(member, 3, 0).is_err());
    // Their ack deadline is gone: long after it, nothing was dead-lettered
    // and they come back first, as attempt 1 still.
    w.clock.advance_ms(5_000);
    let again = w.dispatcher.fetch(member, 10).unwrap();
    assert_eq!(World::values(&again), vec!["b", "c"]);
    assert!(again.iter().all(|d| d.attempt == 1));
    assert!(w.storage.memory_log("t.g.dlq", 0).is_none());
    assert!(!w
        .events
        .take()
        .iter()
        .any(|e| matches!(e.kind, EventKind::DeadLettered { .. })));
    // Sent this time and not acked: the one attempt counts as usual.
    w.clock.advance_ms(1_000);
    assert!(w.dispatcher.fetch(member, 10).unwrap().is_empty());
    assert_eq!(w.dispatcher.group_stats("t", "g").unwrap()[0].ack_floor, 3);
    assert!(w.storage.memory_log("t.g.dlq", 0).is_some());
}

#[test]
fn delayed_messages_arrive_at_their_time_not_before() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.dispatcher.add_credit(member, 100).unwrap();
    let due = w.clock.now_ms() + 600_000;
    let produced = w
        .dispatcher
        .produce(
            "t",
            Some(0),
            vec![RecordInput {
                deliver_at_ms: Some(due),
                ..RecordInput::new("remind to pay")
            }],
        )
        .unwrap();
    assert_eq!(produced[0].offset, None);
    assert_eq!(w.dispatcher.pending_delays(), 1);
    w.clock.advance_ms(599_999);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    w.crash_and_reopen(); // delays survive restarts
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.dispatcher.add_credit(member, 100).unwrap();
    assert!(w.dispatcher.poll().unwrap().is_empty());
    w.clock.advance_ms(1);
    let got = w.dispatcher.poll().unwrap();
    assert_eq!(World::values(&got), vec!["remind to pay"]);
    assert_eq!(
        got[0].record.id, produced[0].id,
        "same id through the delay"
    );
}

#[test]
fn expired_and_deleted_messages_are_never_delivered() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let now = w.clock.now_ms();
    w.dispatcher
        .produce(
            "t",
            Some(0),
            vec![
                RecordInput {
                    expire_at_ms: Some(now + 10),
                    ..RecordInput::new("short-lived")
                },
                RecordInput::new("delete me"),
                RecordInput::new("keep"),
            ],
        )
        .unwrap();
    w.dispatcher
        .delete(
            "t",
            Tombstone::OffsetRange {
                partition: 0,
                start: 1,
                end: 2,
            },
        )
        .unwrap();
    w.clock.advance_ms(10);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    assert_eq!(
        World::values(&w.dispatcher.fetch(member, 10).unwrap()),
        vec!["keep"]
    );
    let events = w.events.take();
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::Expired && e.offset == Some(0)));
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::Deleted && e.offset == Some(1)));
    // Deletion by id and by time range, persisted across a restart.
    let ids = w
        .dispatcher
        .produce("t", Some(0), vec![RecordInput::new("x")])
        .unwrap();
    w.dispatcher
        .delete("t", Tombstone::MessageId(ids[0].id.to_string()))
        .unwrap();
    w.crash_and_reopen();
    w.dispatcher.subscribe("t", "g2", config()).unwrap();
    let member = w.dispatcher.join("t", "g2", "m").unwrap();
    assert_eq!(
        World::values(&w.dispatcher.fetch(member, 10).unwrap()),
        vec!["keep"]
    );
}

#[test]
fn ordered_topics_deliver_one_message_per_key_at_a_time() {
    let mut w = World::new();
    topic(&mut w, "o", true);
    w.dispatcher.subscribe("o", "g", config()).unwrap();
    let a = w.dispatcher.join("o", "g", "a").unwrap();
    let b = w.dispatcher.join("o", "g", "b").unwrap();
    let records = ["k1:1", "k2:1", "k1:2", "k1:3", "k2:2"]
        .iter()
        .map(|v| RecordInput::new(v.to_string()).with_key(v.split(':').next().unwrap().to_string()))
        .collect();
    w.dispatcher.produce("o", Some(0), records).unwrap();
    w.dispatcher.add_credit(a, 10).unwrap();
    w.dispatcher.add_credit(b, 10).unwrap();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let got = w.dispatcher.poll().unwrap();
        // At most one message per key is in flight.
        let mut keys: Vec<_> = got.iter().map(|d| d.record.key.clone()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), got.len(), "two messages of one key in flight");
        for d in &got {
            seen.push(String::from_utf8(d.record.value.to_vec()).unwrap());
            w.dispatcher.ack(d.member, 0, d.record.offset).unwrap();
        }
    }
    let order = |key: &str| {
        seen.iter()
            .filter(|v| v.starts_with(key))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(order("k1"), vec!["k1:1", "k1:2", "k1:3"]);
    assert_eq!(order("k2"), vec!["k2:1", "k2:2"]);
}

#[test]
fn seek_to_a_timestamp_replays_with_a_dry_run_first() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["old"]);
    w.clock.advance_ms(1_000);
    let since = w.clock.now_ms();
    w.produce("t", &["new1", "new2"]);
    for d in w.dispatcher.fetch(member, 10).unwrap() {
        w.dispatcher.ack(member, 0, d.record.offset).unwrap();
    }
    let dry = w
        .dispatcher
        .seek("t", "g", None, StartPosition::Timestamp(since), true)
        .unwrap();
    assert_eq!(
        (dry[0].old_floor, dry[0].new_floor, dry[0].redelivered),
        (3, 1, 2)
    );
    assert!(
        w.dispatcher.fetch(member, 10).unwrap().is_empty(),
        "dry run changed nothing"
    );
    w.dispatcher
        .seek("t", "g", None, StartPosition::Timestamp(since), false)
        .unwrap();
    assert_eq!(
        World::values(&w.dispatcher.fetch(member, 10).unwrap()),
        vec!["new1", "new2"]
    );
}

/// Failed attempts are in the ack journal: a poison message nacked twice
/// before a restart is delivered as attempt 3 after it, and its third
/// failure dead-letters it (it used to start again at attempt 1, so a
/// broker that restarts, or a cluster whose serving node changes, more
/// often than `max_attempts` failures never dead-lettered it). An attempt
/// in flight at the restart is not counted; acked neighbours stay acked.
#[test]
fn failed_attempts_survive_a_restart_and_still_lead_to_the_dead_letter_topic() {
    // Also with the journal rewritten (compacted) at every sync: the
    // rewrite keeps the counts of the messages still unacked.
    for compact_bytes in [DispatcherConfig::default().ack_journal_compact_bytes, 1] {
        let mut w = World::with_config(DispatcherConfig {
            ack_journal_compact_bytes: compact_bytes,
            ..DispatcherConfig::default()
        });
        topic(&mut w, "t", false);
        w.dispatcher.subscribe("t", "g", config()).unwrap();
        let member = w.dispatcher.join("t", "g", "m").unwrap();
        w.produce("t", &["poison", "fine", "slow"]);
        w.fail_offset_0_twice_and_ack_offset_1(member);
        // "slow" (offset 2) is in flight at its first attempt.
        w.dispatcher.checkpoint().unwrap();
        w.crash_and_reopen();
        let member = w.dispatcher.join("t", "g", "m").unwrap();
        let compacting = format!("compact at {compact_bytes}");
        assert_eq!(w.fetched_attempts(member), [(0, 3), (2, 1)], "{compacting}");
        w.dispatcher.nack(member, 0, 0, Some(10)).unwrap();
        w.dispatcher.nack(member, 0, 2, Some(10)).unwrap();
        w.clock.advance_ms(10);
        w.dispatcher.checkpoint().unwrap();
        assert_eq!(w.dead_letters("t.g.dlq"), 1);
        // "slow" failed once: its second attempt after another restart.
        w.crash_and_reopen();
        let member = w.dispatcher.join("t", "g", "m").unwrap();
        assert_eq!(w.fetched_attempts(member), [(2, 2)], "{compacting}");
    }
}

#[test]
fn acks_survive_a_restart_and_unacked_messages_come_back() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    let values: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    w.produce("t", &refs);
    for d in w.dispatcher.fetch(member, 100).unwrap() {
        if d.record.offset % 3 != 0 {
            w.dispatcher.ack(member, 0, d.record.offset).unwrap();
        }
    }
    w.dispatcher.checkpoint().unwrap();
    w.crash_and_reopen();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    let again = w.dispatcher.fetch(member, 1_000).unwrap();
    let offsets: Vec<u64> = again.iter().map(|d| d.record.offset).collect();
    assert_eq!(
        offsets,
        (0..100).filter(|o| o % 3 == 0).collect::<Vec<u64>>()
    );
}

#[test]
fn broadcast_groups_give_every_member_every_message() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let config = GroupConfig {
        mode: DeliveryMode::Broadcast,
        ..config()
    };
    w.dispatcher.subscribe("t", "cache", config).unwrap();
    let a = w.dispatcher.join("t", "cache", "node-a").unwrap();
    let b = w.dispatcher.join("t", "cache", "node-b").unwrap();
    w.produce("t", &["x", "y"]);
    assert_eq!(
        World::values(&w.dispatcher.fetch(a, 10).unwrap()),
        vec!["x", "y"]
    );
    assert_eq!(
        World::values(&w.dispatcher.fetch(b, 10).unwrap()),
        vec!["x", "y"]
    );
}

#[test]
fn unacked_messages_are_capped_per_partition() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let config = GroupConfig {
        max_unacked_per_partition: 5,
        ..config()
    };
    w.dispatcher.subscribe("t", "g", config).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    let values: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    w.produce("t", &refs);
    assert_eq!(w.dispatcher.fetch(member, 100).unwrap().len(), 5);
    w.dispatcher.ack(member, 0, 2).unwrap();
    assert_eq!(w.dispatcher.fetch(member, 100).unwrap().len(), 1);
    assert_eq!(w.dispatcher.group_stats("t", "g").unwrap()[0].unacked, 5);
}

#[test]
fn rate_limit_caps_deliveries_per_second() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let config = GroupConfig {
        rate_limit_per_second: Some(10),
        ..config()
    };
    w.dispatcher.subscribe("t", "g", config).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.dispatcher.add_credit(member, 1_000).unwrap();
    let values: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    w.produce("t", &refs);
    assert_eq!(w.dispatcher.poll().unwrap().len(), 10);
    assert!(w.dispatcher.poll().unwrap().is_empty());
    w.clock.advance_ms(500);
    assert_eq!(w.dispatcher.poll().unwrap().len(), 5);
}

#[test]
fn group_stats_report_lag_age_and_delayed_messages() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["a", "b"]);
    let due = w.clock.now_ms() + 60_000;
    w.dispatcher
        .produce(
            "t",
            Some(0),
            vec![RecordInput {
                deliver_at_ms: Some(due),
                ..RecordInput::new("in the delay store")
            }],
        )
        .unwrap();
    w.clock.advance_ms(5_000);
    let stats = &w.dispatcher.group_stats("t", "g").unwrap()[0];
    assert_eq!((stats.lag, stats.oldest_unacked_age_ms), (2, Some(5_000)));
    assert_eq!(w.dispatcher.pending_delays(), 1);
    // `delayed` counts the partition's delays still in the delay store.
    assert_eq!(stats.delayed, 1);
    for d in w.dispatcher.fetch(member, 10).unwrap() {
        w.dispatcher.ack(member, 0, d.record.offset).unwrap();
    }
    let stats = &w.dispatcher.group_stats("t", "g").unwrap()[0];
    assert_eq!(
        (stats.lag, stats.oldest_unacked_age_ms, stats.in_flight),
        (0, None, 0)
    );
    assert_eq!(stats.delayed, 1);
}

/// `PartitionStats::delayed` (DESCRIBE_GROUP's `delayed`, PROTOCOL.md
/// §6.25): the delays pending for that partition of the topic, whichever
/// group asks, exact across a cancel, a crash and the delays firing.
#[test]
fn group_stats_count_each_partitions_pending_delays() {
    let mut w = World::new();
    w.dispatcher
        .create_topic(
            "t",
            TopicConfig {
                partitions: 2,
                ordered: false,
            },
        )
        .unwrap();
    topic(&mut w, "other", false);
    for group in ["g", "h"] {
        w.dispatcher.subscribe("t", group, config()).unwrap();
    }
    w.dispatcher.subscribe("other", "g", config()).unwrap();
    let now = w.clock.now_ms();
    let delayed = |partition, due_in_ms: i64| {
        (
            partition,
            RecordInput {
                deliver_at_ms: Some(now + due_in_ms),
                ..RecordInput::new("later")
            },
        )
    };
    let mut ids = Vec::new();
    for (partition, record) in [
        delayed(0, 60_000),
        delayed(1, 60_000),
        delayed(1, 120_000),
        delayed(1, 400 * 86_400_000),
    ] {
        let produced = w.dispatcher.produce("t", Some(partition), vec![record]);
        ids.push(produced.unwrap()[0].id);
    }
    w.dispatcher
        .produce("other", Some(0), vec![delayed(0, 60_000).1])
        .unwrap();
    let delayed_of = |w: &World, topic: &str, group: &str| -> Vec<u64> {
        w.dispatcher
            .group_stats(topic, group)
            .unwrap()
            .iter()
            .map(|stats| stats.delayed)
            .collect()
    };
    assert_eq!(delayed_of(&w, "t", "g"), [1, 3]);
    assert_eq!(delayed_of(&w, "t", "h"), [1, 3], "the same for every group");
    assert_eq!(delayed_of(&w, "other", "g"), [1]);
    assert!(w.dispatcher.cancel_delay(&ids[3]).unwrap());
    assert_eq!(delayed_of(&w, "t", "g"), [1, 2]);
    w.crash_and_reopen();
    for group in ["g", "h"] {
        w.dispatcher.join("t", group, "m").unwrap();
    }
    w.dispatcher.join("other", "g", "m").unwrap();
    assert_eq!(delayed_of(&w, "t", "g"), [1, 2], "counted again at open");
    w.clock.advance_ms(60_000);
    w.dispatcher.poll().unwrap();
    assert_eq!(delayed_of(&w, "t", "g"), [0, 1], "fired ones are stored");
    assert_eq!(delayed_of(&w, "other", "g"), [0]);
    w.clock.advance_ms(60_000);
    w.dispatcher.poll().unwrap();
    assert_eq!(delayed_of(&w, "t", "h"), [0, 0]);
}

#[test]
fn deleted_groups_and_topics_start_afresh_and_stay_deleted_after_a_restart() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["a", "b"]);
    for d in w.dispatcher.fetch(member, 10).unwrap() {
        w.dispatcher.ack(member, 0, d.record.offset).unwrap();
    }
    assert_eq!(w.dispatcher.delete_group("t", "g").unwrap(), vec![member]);
    assert!(
        w.dispatcher.ack(member, 0, 0).is_err(),
        "its members are gone"
    );
    assert!(w.dispatcher.group_stats("t", "g").is_err());
    // A group of the same name starts again from its start position.
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    assert_eq!(
        World::values(&w.dispatcher.fetch(member, 10).unwrap()),
        vec!["a", "b"]
    );

    w.dispatcher.delete_topic("t").unwrap();
    assert!(w
        .dispatcher
        .produce("t", Some(0), vec![RecordInput::new("x")])
        .is_err());
    w.crash_and_reopen();
    assert!(
        w.dispatcher.topics().is_empty(),
        "deleted topics stay deleted"
    );
    assert!(w.dispatcher.groups("t").is_empty());
    // Re-created, it is empty.
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    assert!(w.dispatcher.fetch(member, 10).unwrap().is_empty());
}

#[test]
fn delays_due_together_fire_in_one_append_per_partition() {
    let mut w = World::new();
    w.dispatcher
        .create_topic(
            "t",
            TopicConfig {
                partitions: 2,
                ordered: false,
            },
        )
        .unwrap();
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let due = w.clock.now_ms() + 60_000;
    for partition in 0..2 {
        let records = (0..3_000)
            .map(|i| RecordInput {
                deliver_at_ms: Some(due),
                ..RecordInput::new(format!("{partition}-{i}"))
            })
            .collect();
        w.dispatcher.produce("t", Some(partition), records).unwrap();
    }
    assert_eq!(w.dispatcher.pending_delays(), 6_000);
    w.clock.advance_ms(60_000);
    w.dispatcher.poll().unwrap();
    assert_eq!(w.dispatcher.pending_delays(), 0);
    for partition in 0..2 {
        let log = w.storage.memory_log("t", partition).unwrap();
        use dmq_dispatcher::PartitionLog;
        assert_eq!(log.end_offset(), 3_000, "partition {partition}");
        // Before batching, every fired message was its own append (its
        // own fdatasync under fsync `always`): 3,000 here.
        assert!(
            log.appends() <= 2,
            "partition {partition}: {} appends for 3,000 fired messages",
            log.appends()
        );
        // Due order is kept within the partition.
        let values: Vec<String> = log
            .read(0, 3_000)
            .unwrap()
            .iter()
            .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..3_000).map(|i| format!("{partition}-{i}")).collect();
        assert_eq!(values, expected);
    }
}

#[test]
fn a_burst_of_due_delays_is_fired_over_several_polls_and_none_is_lost() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let due = w.clock.now_ms() + 1_000;
    let total = 70_000;
    for chunk in 0..(total / 10_000) {
        let records = (0..10_000)
            .map(|i| RecordInput {
                deliver_at_ms: Some(due),
                ..RecordInput::new(format!("{}", chunk * 10_000 + i))
            })
            .collect();
        w.dispatcher.produce("t", Some(0), records).unwrap();
    }
    w.clock.advance_ms(1_000);
    // One poll fires a bounded share; the dispatcher asks to be polled
    // again at once while more are due.
    w.dispatcher.poll().unwrap();
    let left = w.dispatcher.pending_delays();
    assert!(left > 0, "one poll fired all {total}: it is not bounded");
    assert!(w.dispatcher.next_wakeup_ms().unwrap() <= w.clock.now_ms());
    let mut polls = 1;
    while w.dispatcher.pending_delays() > 0 {
        w.dispatcher.poll().unwrap();
        polls += 1;
        assert!(polls < 100, "the burst never drains");
    }
    use dmq_dispatcher::PartitionLog;
    let log = w.storage.memory_log("t", 0).unwrap();
    assert_eq!(log.end_offset(), total as u64);
}

#[test]
fn ack_timeouts_of_last_attempts_move_to_the_dead_letter_topic_in_one_append() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let group = GroupConfig {
        max_attempts: 1,
        ..config()
    };
    w.dispatcher.subscribe("t", "g", group).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    let values: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    w.produce("t", &values);
    assert_eq!(w.dispatcher.fetch(member, 500).unwrap().len(), 500);
    w.clock.advance_ms(1_000);
    w.dispatcher.poll().unwrap();
    let dead = w
        .storage
        .memory_log("t.g.dlq", 0)
        .expect("dead-letter topic");
    use dmq_dispatcher::PartitionLog;
    assert_eq!(dead.end_offset(), 500);
    // Before batching: one append (one fdatasync) per message.
    assert_eq!(dead.appends(), 1);
    let moved: Vec<String> = dead
        .read(0, 500)
        .unwrap()
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect();
    assert_eq!(moved, values);
    assert_eq!(
        w.dispatcher.group_stats("t", "g").unwrap()[0].ack_floor,
        500
    );
}

#[test]
fn a_dead_letter_of_a_dead_letter_carries_one_set_of_dlq_headers() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    let once = GroupConfig {
        max_attempts: 1,
        ..config()
    };
    w.dispatcher.subscribe("t", "g", once.clone()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.produce("t", &["poison"]);
    w.dispatcher.fetch(member, 1).unwrap();
    w.dispatcher.nack(member, 0, 0, None).unwrap();
    // The dead-letter topic's own consumer fails it too.
    w.dispatcher.subscribe("t.g.dlq", "h", once).unwrap();
    let second = w.dispatcher.join("t.g.dlq", "h", "m").unwrap();
    assert_eq!(w.dispatcher.fetch(second, 1).unwrap().len(), 1);
    w.dispatcher.nack(second, 0, 0, None).unwrap();
    use dmq_dispatcher::PartitionLog;
    let copy = w
        .storage
        .memory_log("t.g.dlq.h.dlq", 0)
        .expect("second dead-letter topic")
        .read(0, 1)
        .unwrap();
    let dlq_headers: Vec<String> = copy[0]
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with(b"dmq.dlq."))
        .map(|(name, value)| {
            format!(
                "{}={}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value)
            )
        })
        .collect();
    // Six headers (the frame headroom counts six), the latest move's.
    assert_eq!(dlq_headers.len(), 6, "{dlq_headers:?}");
    assert!(dlq_headers.contains(&"dmq.dlq.topic=t.g.dlq".to_string()));
    assert!(dlq_headers.contains(&"dmq.dlq.group=h".to_string()));
}

#[test]
fn a_rounds_events_carry_the_time_the_round_began() {
    let mut w = World::new();
    topic(&mut w, "t", false);
    w.dispatcher.subscribe("t", "g", config()).unwrap();
    let member = w.dispatcher.join("t", "g", "m").unwrap();
    w.dispatcher.add_credit(member, 10).unwrap();
    w.produce("t", &["a"]);
    // Without a round each event reads the clock.
    w.events.take();
    w.clock.advance_ms(5);
    let started = w.clock.now_ms();
    assert_eq!(w.dispatcher.poll().unwrap().len(), 1);
    let delivered = w.events.take();
    assert!(!delivered.is_empty());
    assert!(delivered.iter().all(|e| e.time_ms == started));
    // In a round, the clock read when the round began, even if the clock
    // moved on while the round ran.
    w.dispatcher.begin_round();
    let round = w.clock.now_ms();
    w.clock.advance_ms(7);
    assert!(w.dispatcher.ack(member, 0, 0).unwrap());
    let acked = w.events.take();
    assert!(acked.iter().any(|e| e.kind == EventKind::Acked));
    assert!(acked.iter().all(|e| e.time_ms == round));
    // The next round reads the clock again.
    w.produce("t", &["b"]);
    w.clock.advance_ms(3);
    w.dispatcher.begin_round();
    let next = w.clock.now_ms();
    w.events.take();
    assert_eq!(w.dispatcher.poll().unwrap().len(), 1);
    assert!(w.events.take().iter().all(|e| e.time_ms == next));
}

/// Two nodes' copies of topic "orders" (one partition, `values` stored)
/// and its group "billing", and the group's journal name.
fn two_copies(values: &[&str]) -> (World, World, String) {
    let journal = dmq_dispatcher::names::group_journal("orders", "billing", None);
    let mut here = World::new();
    let mut there = World::new();
    for world in [&mut here, &mut there] {
        topic(world, "orders", false);
        world
            .dispatcher
            .subscribe("orders", "billing", config())
            .unwrap();
        world.produce("orders", values);
    }
    (here, there, journal)
}

/// Cluster mode: acks another node's copy of a group made, merged here,
/// are neither delivered again nor redelivered when in flight here, and
/// merging them twice changes nothing.
#[test]
fn acks_merged_from_another_node_are_not_delivered_again() {
    let (mut here, mut there, journal) = two_copies(&["0", "1", "2", "3", "4", "5"]);
    // Here, a member has 0 and 1 in flight.
    let member = here.dispatcher.join("orders", "billing", "m").unwrap();
    assert_eq!(
        World::values(&here.dispatcher.fetch(member, 2).unwrap()),
        ["0", "1"]
    );
    // There, the group acks every message but 2, and syncs its journal.
    let other = there.dispatcher.join("orders", "billing", "m").unwrap();
    for delivery in there.dispatcher.fetch(other, 10).unwrap() {
        if delivery.record.value != "2" {
            there
                .dispatcher
                .ack(other, 0, delivery.record.offset)
                .unwrap();
        }
    }
    let payloads = there.synced_journal(&journal);

    assert_eq!(
        here.dispatcher
            .merge_replicated_acks(&journal, &payloads)
            .unwrap(),
        5
    );
    assert_eq!(
        here.dispatcher
            .merge_replicated_acks(&journal, &payloads)
            .unwrap(),
        0,
        "merging again changes nothing"
    );
    assert_eq!(
        World::values(&here.dispatcher.fetch(member, 10).unwrap()),
        ["2"]
    );
    // Past every ack deadline and the backoff: only 2 comes back, 0 and
    // 1 were settled.
    here.clock.advance_ms(1_000);
    here.dispatcher.poll().unwrap();
    here.clock.advance_ms(100);
    assert_eq!(
        World::values(&here.dispatcher.fetch(member, 10).unwrap()),
        ["2"]
    );
    assert!(!here.dispatcher.ack(member, 0, 0).unwrap(), "already acked");
    assert_eq!(
        here.dispatcher
            .merge_replicated_acks("group.orders.unknown", &payloads)
            .unwrap(),
        0,
        "a group not loaded here is left to read the journal when it loads"
    );
}

/// Cluster mode: failed attempts another node's copy of a group counted,
/// merged here before this node serves the group (a takeover), go on
/// counting: the message is delivered here as the next attempt and its
/// last failure dead-letters it.
#[test]
fn failed_attempts_merged_from_another_node_go_on_counting() {
    let (mut here, mut there, journal) = two_copies(&["poison", "fine"]);
    // There, "poison" fails twice and "fine" is acked.
    let other = there.dispatcher.join("orders", "billing", "m").unwrap();
    there.fail_offset_0_twice_and_ack_offset_1(other);
    let payloads = there.synced_journal(&journal);
    assert_eq!(
        here.dispatcher
            .merge_replicated_acks(&journal, &payloads)
            .unwrap(),
        1
    );
    let member = here.dispatcher.join("orders", "billing", "m").unwrap();
    assert_eq!(here.fetched_attempts(member), [(0, 3)]);
    here.dispatcher.nack(member, 0, 0, Some(10)).unwrap();
    here.clock.advance_ms(10);
    here.dispatcher.checkpoint().unwrap();
    assert_eq!(here.dead_letters("orders.billing.dlq"), 1);
}

/// Cluster mode: a node taking over a group it served before goes on with
/// the replay the other node's seek began. Its copy merged only the other
/// node's acks (merging never un-acks); loaded again from the journal
/// before the takeover (`reload_idle_groups`), it holds the seek and the
/// acks after it.
#[test]
fn a_copy_loaded_again_before_a_takeover_goes_on_with_the_other_nodes_replay() {
    use dmq_dispatcher::Storage;
    let (mut here, mut there, journal) = two_copies(&["0", "1", "2", "3", "4", "5"]);
    // Here served first: every message acked, then the member left.
    let member = here.dispatcher.join("orders", "billing", "m").unwrap();
    for delivery in here.dispatcher.fetch(member, 10).unwrap() {
        here.dispatcher
            .ack(member, 0, delivery.record.offset)
            .unwrap();
    }
    here.dispatcher.leave(member).unwrap();
    let payloads = here.synced_journal(&journal);
    there
        .dispatcher
        .merge_replicated_acks(&journal, &payloads)
        .unwrap();
    // There served next: a seek back to the start, and two of the replay
    // acked before it was lost.
    there
        .dispatcher
        .seek("orders", "billing", None, StartPosition::Earliest, false)
        .unwrap();
    let other = there.dispatcher.join("orders", "billing", "m").unwrap();
    let replay = there.dispatcher.fetch(other, 2).unwrap();
    assert_eq!(World::values(&replay), ["0", "1"]);
    for delivery in &replay {
        there
            .dispatcher
            .ack(other, 0, delivery.record.offset)
            .unwrap();
    }
    let payloads = there.synced_journal(&journal);
    // What the cluster's journal holds, here too; merged, it adds nothing.
    let (mut replicated, _) = here.storage.open_journal(&journal).unwrap();
    replicated.rewrite(&payloads).unwrap();
    here.dispatcher
        .merge_replicated_acks(&journal, &payloads)
        .unwrap();
    // Here takes over: its copy, synced, is loaded again from the journal.
    assert_eq!(here.dispatcher.sync_idle_groups(|_| true).unwrap(), 0);
    assert_eq!(here.dispatcher.reload_idle_groups(|_| false).unwrap(), 0);
    assert_eq!(here.dispatcher.reload_idle_groups(|_| true).unwrap(), 1);
    let stats = here.dispatcher.group_stats("orders", "billing").unwrap();
    assert_eq!(
        (stats.len(), stats[0].ack_floor),
        (1, 2),
        "described as loaded"
    );
    let member = here.dispatcher.join("orders", "billing", "m").unwrap();
    assert_eq!(
        World::values(&here.dispatcher.fetch(member, 10).unwrap()),
        ["2", "3", "4", "5"],
        "the rest of the replay"
    );
    // A group with a member is not loaded again.
    assert_eq!(here.dispatcher.reload_idle_groups(|_| true).unwrap(), 0);
}

/// A copy loaded again whose journal lacks a partition starts that
/// partition at the log's start, as a group loaded at open does: its
/// messages come again, none is skipped (its configured start, the log's
/// end, would skip them).
#[test]
fn a_copy_loaded_again_from_a_journal_without_it_starts_at_the_log_start() {
    use dmq_dispatcher::Storage;
    let mut world = World::new();
    topic(&mut world, "orders", false);
    world.produce("orders", &["0", "1", "2"]);
    let latest = GroupConfig {
        start: StartPosition::Latest,
        ..config()
    };
    world
        .dispatcher
        .subscribe("orders", "billing", latest)
        .unwrap();
    let journal = dmq_dispatcher::names::group_journal("orders", "billing", None);
    let (mut emptied, _) = world.storage.open_journal(&journal).unwrap();
    emptied.rewrite(&[]).unwrap();
    assert_eq!(world.dispatcher.reload_idle_groups(|_| true).unwrap(), 1);
    let member = world.dispatcher.join("orders", "billing", "m").unwrap();
    assert_eq!(
        World::values(&world.dispatcher.fetch(member, 10).unwrap()),
        ["0", "1", "2"]
    );
}
