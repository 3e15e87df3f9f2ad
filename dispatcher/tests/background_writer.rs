//! Fired delays written by the background writer: a slow durable write of
//! one partition does not stop the dispatcher, and nothing is lost or
//! reordered on the way. Also a numbered transactional produce retried
//! while its first try is still being written.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use dmq_dispatcher::delay_store::TIMER_TOPIC;
use dmq_dispatcher::storage::{OpenedJournal, Storage};
use dmq_dispatcher::transactions::TXN_TOPIC;
use dmq_dispatcher::{
    Delivery, DispatchError, Dispatcher, DispatcherConfig, EventKind, GroupConfig, MemoryEventSink,
    MemoryStorage, PartitionLog, StoreError, TopicConfig, TxnKey, TxnProduced,
};
use dmq_log_store::{AppendInfo, BatchInput, Clock, ManualClock, Record, RecordInput};

/// Durable writes of the partitions it wraps wait until it opens.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
    /// Durable waits that pass fail (a disk that lost the writes).
    failing: AtomicBool,
    /// Writes waiting at the gate now.
    waiting: AtomicU64,
}

impl Gate {
    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }

    fn pass(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn wait_for_a_writer(&self) {
        for _ in 0..1_000 {
            if self.waiting.load(Ordering::SeqCst) > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no write reached the gate");
    }
}

/// A partition whose durable waits pass the gate, and whose readers see
/// only what is durable (as a `Log` under fsync `always`).
#[derive(Debug)]
struct GatedLog {
    inner: Arc<dyn PartitionLog>,
    gate: Arc<Gate>,
    durable_end: AtomicU64,
}

impl PartitionLog for GatedLog {
    fn append_batch_deferred(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError> {
        self.inner.append_batch_deferred(batch)
    }

    fn wait_durable(&self, info: &AppendInfo) -> Result<(), StoreError> {
        self.gate.pass();
        if self.gate.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Journal {
                name: "gated".into(),
                source: std::io::Error::other("the simulated disk failed the sync"),
            });
        }
        self.inner.wait_durable(info)?;
        let end = info.base_offset + info.ids.len() as u64;
        self.durable_end.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        let end = self.end_offset();
        let mut records = self.inner.read(from, max_records)?;
        records.retain(|r| r.offset < end);
        Ok(records)
    }

    fn start_offset(&self) -> u64 {
        self.inner.start_offset()
    }

    fn end_offset(&self) -> u64 {
        self.durable_end.load(Ordering::SeqCst)
    }

    fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StoreError> {
        self.inner.offset_for_timestamp(timestamp_ms)
    }
}

/// Memory storage whose topic `slow`, timer log and half log are gated.
#[derive(Debug)]
struct GatedStorage {
    inner: MemoryStorage,
    gate: Arc<Gate>,
    logs: Mutex<Vec<(String, u32, Arc<GatedLog>)>>,
}

impl Storage for GatedStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError> {
        let inner = self.inner.partition(topic, partition)?;
        if topic != "slow" && topic != TIMER_TOPIC && topic != TXN_TOPIC {
            return Ok(inner);
        }
        let mut logs = self.logs.lock().unwrap();
        if let Some((_, _, log)) = logs.iter().find(|(t, p, _)| t == topic && *p == partition) {
            return Ok(Arc::clone(log) as Arc<dyn PartitionLog>);
        }
        let log = Arc::new(GatedLog {
            durable_end: AtomicU64::new(inner.end_offset()),
            inner,
            gate: Arc::clone(&self.gate),
        });
        logs.push((topic.to_string(), partition, Arc::clone(&log)));
        Ok(log)
    }

    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError> {
        self.inner.open_journal(name)
    }

    fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
        self.inner.remove_journal(name)
    }

    fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        self.inner.remove_topic(topic)
    }

    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_journals(prefix)
    }
}

struct World {
    clock: Arc<ManualClock>,
    storage: MemoryStorage,
    gate: Arc<Gate>,
    events: MemoryEventSink,
    dispatcher: Dispatcher,
    woken: mpsc::Receiver<()>,
}

impl World {
    fn new() -> World {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let gate = Arc::new(Gate::default());
        gate.set(true);
        let memory = MemoryStorage::new(clock.clone());
        let storage = GatedStorage {
            inner: memory.clone(),
            gate: Arc::clone(&gate),
            logs: Mutex::default(),
        };
        let events = MemoryEventSink::default();
        let mut dispatcher = Dispatcher::open(
            Arc::new(storage),
            clock.clone(),
            Arc::new(events.clone()),
            DispatcherConfig::default(),
        )
        .unwrap();
        let (wake, woken) = mpsc::channel();
        let wake = Mutex::new(wake);
        dispatcher
            .write_in_background(Box::new(move || {
                let _ = wake.lock().unwrap().send(());
            }))
            .unwrap();
        for name in ["slow", "fast"] {
            dispatcher
                .create_topic(
                    name,
                    TopicConfig {
                        partitions: 2,
                        ordered: false,
                    },
                )
                .unwrap();
            dispatcher
                .subscribe(name, "g", GroupConfig::default())
                .unwrap();
        }
        World {
            clock,
            storage: memory,
            gate,
            events,
            dispatcher,
            woken,
        }
    }

    fn delay(&mut self, topic: &str, partition: u32, count: usize, due_ms: i64) {
        let records = (0..count)
            .map(|i| RecordInput {
                deliver_at_ms: Some(due_ms),
                ..RecordInput::new(format!("{partition}-{i}"))
            })
            .collect();
        self.dispatcher
            .produce(topic, Some(partition), records)
            .unwrap();
    }

    fn fired_events(&self) -> usize {
        self.events
            .take()
            .iter()
            .filter(|e| e.kind == EventKind::DelayFired)
            .count()
    }
}

fn values_of(deliveries: &[Delivery], topic: &str, partition: u32) -> Vec<String> {
    deliveries
        .iter()
        .filter(|d| &*d.topic == topic && d.partition == partition)
        .map(|d| String::from_utf8(d.record.value.to_vec()).unwrap())
        .collect()
}

#[test]
fn a_slow_durable_write_of_fired_delays_does_not_stop_delivery() {
    let mut w = World::new();
    let member_slow = w.dispatcher.join("slow", "g", "m").unwrap();
    let member_fast = w.dispatcher.join("fast", "g", "m").unwrap();
    w.dispatcher.add_credit(member_slow, 1_000_000).unwrap();
    w.dispatcher.add_credit(member_fast, 1_000_000).unwrap();
    let due = w.clock.now_ms() + 1_000;
    w.delay("slow", 0, 300, due);
    w.delay("slow", 1, 200, due);
    w.gate.set(false);
    w.clock.advance_ms(1_000);
    // The poll hands the fired batches to the writer, which now waits at
    // the gate; the poll itself returns.
    let deliveries = w.dispatcher.poll().unwrap();
    assert!(deliveries.is_empty());
    w.gate.wait_for_a_writer();
    // While the slow partition's fdatasync hangs, other topics flow.
    let produced = w
        .dispatcher
        .produce("fast", Some(1), vec![RecordInput::new("now")])
        .unwrap();
    assert_eq!(produced.len(), 1);
    let deliveries = w.dispatcher.poll().unwrap();
    assert_eq!(values_of(&deliveries, "fast", 1), vec!["now"]);
    assert!(values_of(&deliveries, "slow", 0).is_empty());
    // Not fired yet: still counted as delayed, no fired event.
    assert_eq!(w.dispatcher.pending_delays(), 500);
    let stats = w.dispatcher.group_stats("slow", "g").unwrap();
    assert_eq!(stats.iter().map(|s| s.delayed).sum::<u64>(), 500);
    assert_eq!(w.fired_events(), 0);
    // The disk answers: the outcome wakes the owner, the next poll records
    // it and delivers every fired message in due order. A fired record
    // is readable once durable, which may be a poll before its outcome is
    // recorded (each outcome wakes the owner once more).
    w.gate.set(true);
    let mut delivered = Vec::new();
    while delivered.len() < 500 || w.dispatcher.pending_delays() > 0 {
        w.woken.recv_timeout(Duration::from_secs(10)).unwrap();
        delivered.extend(w.dispatcher.poll().unwrap());
    }
    let expected = |partition: u32, count: usize| -> Vec<String> {
        (0..count).map(|i| format!("{partition}-{i}")).collect()
    };
    assert_eq!(values_of(&delivered, "slow", 0), expected(0, 300));
    assert_eq!(values_of(&delivered, "slow", 1), expected(1, 200));
    assert_eq!(w.dispatcher.pending_delays(), 0);
    assert_eq!(w.fired_events(), 500);
}

#[test]
fn a_burst_is_fired_through_the_writer_in_order_and_checkpoint_waits_for_it() {
    let mut w = World::new();
    let due = w.clock.now_ms() + 1_000;
    for partition in 0..2 {
        w.delay("slow", partition, 40_000, due);
    }
    w.clock.advance_ms(1_000);
    w.gate.set(false);
    w.dispatcher.poll().unwrap();
    w.gate.wait_for_a_writer();
    // At most a bounded number of fired messages is out with the writer.
    assert!(
        w.dispatcher.pending_delays() >= 80_000 - 4 * 4_096 - 4_096,
        "{} still pending: firing ran ahead of the writer",
        w.dispatcher.pending_delays()
    );
    // A checkpoint (the broker's shutdown) waits for the writer.
    let opened = Arc::new(AtomicBool::new(false));
    let opener = {
        let gate = Arc::clone(&w.gate);
        let opened = Arc::clone(&opened);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            opened.store(true, Ordering::SeqCst);
            gate.set(true);
        })
    };
    w.dispatcher.checkpoint().unwrap();
    assert!(opened.load(Ordering::SeqCst), "checkpoint did not wait");
    opener.join().unwrap();
    let mut polls = 0;
    while w.dispatcher.pending_delays() > 0 {
        let _ = w.woken.recv_timeout(Duration::from_millis(100));
        w.dispatcher.poll().unwrap();
        polls += 1;
        assert!(polls < 1_000, "the burst never drains");
    }
    // Every fired message is in its partition once, in due order.
    let mut ids = std::collections::HashSet::new();
    for partition in 0..2 {
        let log = w.storage.memory_log("slow", partition).unwrap();
        let records = log.read(0, 100_000).unwrap();
        let values: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..40_000).map(|i| format!("{partition}-{i}")).collect();
        assert_eq!(values.len(), expected.len(), "partition {partition}");
        assert!(
            values == expected,
            "partition {partition}: out of due order"
        );
        ids.extend(records.iter().map(|r| r.id));
    }
    assert_eq!(ids.len(), 80_000);
    assert_eq!(w.fired_events(), 80_000);
}

#[test]
fn a_dead_letter_move_waits_for_its_copy_without_stopping_the_group() {
    let mut w = World::new();
    // Group "dlq" of `fast` moves its dead letters to the gated topic.
    w.dispatcher
        .subscribe(
            "fast",
            "dlq",
            GroupConfig {
                max_attempts: 1,
                ack_timeout_ms: 1_000,
                dead_letter_topic: Some("slow".into()),
                ..GroupConfig::default()
            },
        )
        .unwrap();
    let member = w.dispatcher.join("fast", "dlq", "m").unwrap();
    w.dispatcher.add_credit(member, 1_000).unwrap();
    w.dispatcher
        .produce("fast", Some(0), vec![RecordInput::new("poison")])
        .unwrap();
    assert_eq!(w.dispatcher.poll().unwrap().len(), 1);
    w.gate.set(false);
    w.clock.advance_ms(1_000);
    // The deadline of the last attempt fires: the copy goes to the writer,
    // which holds it at the gate; the poll returns.
    assert!(w.dispatcher.poll().unwrap().is_empty());
    w.gate.wait_for_a_writer();
    // The group goes on with other messages meanwhile, and the poison
    // message is neither redelivered nor acked yet.
    w.dispatcher
        .produce("fast", Some(1), vec![RecordInput::new("next")])
        .unwrap();
    let deliveries = w.dispatcher.poll().unwrap();
    assert_eq!(values_of(&deliveries, "fast", 1), vec!["next"]);
    assert!(values_of(&deliveries, "fast", 0).is_empty());
    w.dispatcher.ack(member, 1, 0).unwrap();
    let stats = w.dispatcher.group_stats("fast", "dlq").unwrap();
    assert_eq!((stats[0].unacked, stats[0].in_flight), (1, 0), "{stats:?}");
    w.clock.advance_ms(5_000);
    assert!(values_of(&w.dispatcher.poll().unwrap(), "fast", 0).is_empty());
    // The copy is durable: the message leaves the group.
    w.gate.set(true);
    for _ in 0..100 {
        let _ = w.woken.recv_timeout(Duration::from_millis(100));
        w.dispatcher.poll().unwrap();
        if w.dispatcher.group_stats("fast", "dlq").unwrap()[0].unacked == 0 {
            break;
        }
    }
    assert_eq!(
        w.dispatcher.group_stats("fast", "dlq").unwrap()[0].unacked,
        0
    );
    assert!(w
        .events
        .take()
        .iter()
        .any(|e| matches!(&e.kind, EventKind::DeadLettered { dead_letter_topic } if dead_letter_topic == "slow")));
    let copy = w
        .storage
        .memory_log("slow", 0)
        .unwrap()
        .read(0, 10)
        .unwrap();
    assert_eq!(copy.len(), 1, "{copy:?}");
    assert_eq!(&copy[0].value[..], b"poison");
}

#[test]
fn a_delayed_produce_is_answered_once_durable_without_stopping_the_dispatcher() {
    let mut w = World::new();
    let member = w.dispatcher.join("fast", "g", "m").unwrap();
    w.dispatcher.add_credit(member, 1_000).unwrap();
    let due = w.clock.now_ms() + 10_000;
    w.gate.set(false);
    let (reply, answer) = mpsc::channel();
    let record = RecordInput {
        deliver_at_ms: Some(due),
        ..RecordInput::new("later")
    };
    w.dispatcher.schedule_delayed(
        "slow",
        vec![(1, record)],
        Box::new(move |result| {
            let _ = reply.send(result);
        }),
    );
    // The timer-log append waits at the gate on the writer's thread: no
    // answer yet, and the dispatcher goes on.
    w.gate.wait_for_a_writer();
    assert!(answer.try_recv().is_err(), "answered before durable");
    w.dispatcher
        .produce("fast", Some(0), vec![RecordInput::new("now")])
        .unwrap();
    assert_eq!(
        values_of(&w.dispatcher.poll().unwrap(), "fast", 0),
        vec!["now"]
    );
    assert_eq!(
        w.dispatcher.pending_delays(),
        0,
        "not pending before durable"
    );
    w.gate.set(true);
    w.woken.recv_timeout(Duration::from_secs(10)).unwrap();
    w.dispatcher.poll().unwrap();
    let produced = answer
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert_eq!(produced.len(), 1);
    assert_eq!(
        (
            produced[0].partition,
            produced[0].offset,
            produced[0].delayed_until_ms
        ),
        (1, None, Some(due))
    );
    assert_eq!(w.dispatcher.pending_delays(), 1);
    // And it fires at its time, into its partition.
    w.clock.advance_ms(10_000);
    for _ in 0..100 {
        w.dispatcher.poll().unwrap();
        if w.dispatcher.pending_delays() == 0 {
            break;
        }
        let _ = w.woken.recv_timeout(Duration::from_millis(100));
    }
    let log = w.storage.memory_log("slow", 1).unwrap();
    let records = log.read(0, 10).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, produced[0].id);
}

type TxnAnswer = mpsc::Receiver<Result<TxnProduced, DispatchError>>;

/// A TXN_PRODUCE_SEQ numbered 0 of one record into `key` (`handle` 0: the
/// begin); its answer arrives on the returned channel.
fn numbered_begin(w: &mut World, key: &TxnKey, handle: u64) -> TxnAnswer {
    let (reply, answer) = mpsc::channel();
    w.dispatcher.txn_produce(
        key.clone(),
        handle,
        Some(0),
        "fast",
        vec![(0, RecordInput::new("created"), 0)],
        Box::new(move |result| {
            let _ = reply.send(result);
        }),
    );
    answer
}

/// Polls until `answer` comes.
fn answer_of(w: &mut World, answer: &TxnAnswer) -> Result<TxnProduced, DispatchError> {
    loop {
        w.dispatcher.poll().unwrap();
        match answer.try_recv() {
            Ok(got) => return got,
            Err(_) => {
                let _ = w.woken.recv_timeout(Duration::from_millis(100));
            }
        }
    }
}

fn is_conflict(result: &Result<TxnProduced, DispatchError>) -> bool {
    matches!(
        result,
        Err(DispatchError::Transaction(
            dmq_dispatcher::TxnError::Conflict { .. }
        ))
    )
}

#[test]
fn a_numbered_produce_retried_while_its_first_try_is_written_gets_its_answer() {
    let mut w = World::new();
    let key = TxnKey::new("shop", "order-17").unwrap();
    w.gate.set(false);
    let first = numbered_begin(&mut w, &key, 0);
    w.gate.wait_for_a_writer();
    // The begin's answer is lost: the producer retries it (handle 0,
    // number 0) while the first try still waits for its durability.
    let retry = numbered_begin(&mut w, &key, 0);
    w.dispatcher.poll().unwrap();
    assert!(first.try_recv().is_err(), "answered before durable");
    assert!(
        retry.try_recv().is_err(),
        "the retry answered before durable"
    );
    w.gate.set(true);
    let first = answer_of(&mut w, &first).unwrap();
    let retried = answer_of(&mut w, &retry).unwrap();
    assert_eq!(first, retried, "the retry got the first answer");
    // Once durable, a retry is answered at once, from the half log.
    let late = numbered_begin(&mut w, &key, first.handle);
    assert_eq!(late.try_recv().unwrap().unwrap(), first);
    let listed = w.dispatcher.transactions();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].records, 1, "stored once: {listed:?}");
}

#[test]
fn a_retry_waiting_for_a_first_try_that_fails_is_refused_and_stores_nothing() {
    let mut w = World::new();
    let key = TxnKey::new("shop", "order-18").unwrap();
    w.gate.set(false);
    let first = numbered_begin(&mut w, &key, 0);
    w.gate.wait_for_a_writer();
    let retry = numbered_begin(&mut w, &key, 0);
    w.gate.failing.store(true, Ordering::SeqCst);
    w.gate.set(true);
    let first = answer_of(&mut w, &first);
    let retried = answer_of(&mut w, &retry);
    assert!(first.is_err(), "the first try failed: {first:?}");
    assert!(
        is_conflict(&retried),
        "the waiting retry is refused: {retried:?}"
    );
    // A later retry of the failed produce is refused too: the
    // transaction can only roll back.
    w.gate.failing.store(false, Ordering::SeqCst);
    let handle = w.dispatcher.transactions()[0].handle;
    let late = numbered_begin(&mut w, &key, handle);
    let late = late.try_recv().unwrap();
    assert!(
        is_conflict(&late),
        "a late retry of a failed produce: {late:?}"
    );
}
