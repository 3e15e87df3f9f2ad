//! Transactions through the dispatcher, one scenario each, on simulated
//! storage and a manual clock: half messages reach no group until their
//! transaction commits, never once it rolls back, and every crash point
//! between the durable steps keeps that.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use dmq_dispatcher::{
    Backoff, DispatchError, Dispatcher, DispatcherConfig, EventKind, GroupConfig, HalfInput,
    MemoryEventSink, MemoryStorage, Storage, TopicConfig, TransactionLimits, TransactionLog,
    TxnError, TxnKey, TxnOutcome, TxnProduced,
};
use dmq_log_store::{Clock, ManualClock, MessageId, RecordInput};

mod common;

struct World {
    clock: Arc<ManualClock>,
    storage: MemoryStorage,
    events: MemoryEventSink,
    dispatcher: Dispatcher,
    members: Vec<(String, u64)>,
}

fn open(storage: &MemoryStorage, clock: &Arc<ManualClock>, events: &MemoryEventSink) -> Dispatcher {
    Dispatcher::open(
        Arc::new(storage.clone()),
        clock.clone(),
        Arc::new(events.clone()),
        DispatcherConfig::default(),
    )
    .unwrap()
}

fn group_config() -> GroupConfig {
    GroupConfig {
        ack_timeout_ms: 60_000,
        max_attempts: 3,
        backoff: Backoff::Fixed {
            delays_ms: vec![100],
        },
        ..GroupConfig::default()
    }
}

impl World {
    /// Topics `orders` and `audit` (2 partitions each), groups `billing`
    /// and `shipping` on `orders`, `log` on `audit`.
    fn new() -> World {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let storage = MemoryStorage::new(clock.clone());
        let events = MemoryEventSink::default();
        let dispatcher = open(&storage, &clock, &events);
        let mut world = World {
            clock,
            storage,
            events,
            dispatcher,
            members: Vec::new(),
        };
        for topic in ["orders", "audit"] {
            world
                .dispatcher
                .create_topic(
                    topic,
                    TopicConfig {
                        partitions: 2,
                        ordered: false,
                    },
                )
                .unwrap();
        }
        for (topic, group) in [
            ("orders", "billing"),
            ("orders", "shipping"),
            ("audit", "log"),
        ] {
            world
                .dispatcher
                .subscribe(topic, group, group_config())
                .unwrap();
        }
        world.join();
        world
    }

    fn join(&mut self) {
        self.members.clear();
        for (topic, group) in [
            ("orders", "billing"),
            ("orders", "shipping"),
            ("audit", "log"),
        ] {
            let member = self.dispatcher.join(topic, group, "m").unwrap();
            self.dispatcher.add_credit(member, 10_000).unwrap();
            self.members.push((group.to_string(), member));
        }
    }

    /// Drops the dispatcher without a checkpoint and reopens it.
    fn crash_and_reopen(&mut self) {
        self.dispatcher = open(&self.storage, &self.clock, &self.events);
        self.join();
    }

    /// (group, value) of every delivery of one poll, acked at once.
    fn deliver(&mut self) -> Vec<(String, String)> {
        let deliveries = self.dispatcher.poll().unwrap();
        let mut out = Vec::new();
        for d in deliveries {
            let group = d.group.to_string();
            out.push((group, String::from_utf8(d.record.value.to_vec()).unwrap()));
            self.dispatcher
                .ack(d.member, d.partition, d.record.offset)
                .unwrap();
        }
        out.sort();
        out
    }

    fn produce(
        &mut self,
        key: &TxnKey,
        handle: u64,
        topic: &str,
        values: &[&str],
    ) -> Result<TxnProduced, DispatchError> {
        let records = values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u32 % 2, RecordInput::new(v.to_string()), 0))
            .collect();
        let answered = common::answered(|reply| {
            self.dispatcher
                .txn_produce(key.clone(), handle, topic, records, reply)
        });
        answered.expect("the inline writer answers at once")
    }

    fn end(
        &mut self,
        key: &TxnKey,
        handle: u64,
        outcome: TxnOutcome,
    ) -> Result<TxnOutcome, DispatchError> {
        let answered =
            common::answered(|reply| self.dispatcher.txn_end(key.clone(), handle, outcome, reply));
        answered.expect("the inline writer answers at once")
    }
}

fn key(id: &str) -> TxnKey {
    TxnKey::new("order-service", id).unwrap()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<_> = items
        .iter()
        .map(|(g, v)| (g.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

#[test]
fn half_messages_reach_every_group_only_after_the_commit() {
    let mut w = World::new();
    let k = key("order-17");
    let first = w.produce(&k, 0, "orders", &["created"]).unwrap();
    assert!(first.handle > 0);
    assert!(first.records.iter().all(|r| r.offset.is_none()));
    let second = w
        .produce(&k, first.handle, "audit", &["order 17 created"])
        .unwrap();
    assert_eq!(second.handle, first.handle);
    // Other messages of the same partitions flow meanwhile.
    w.dispatcher
        .produce("orders", Some(0), vec![RecordInput::new("plain")])
        .unwrap();
    assert_eq!(
        w.deliver(),
        pairs(&[("billing", "plain"), ("shipping", "plain")])
    );
    assert_eq!(w.dispatcher.transactions().len(), 1);
    assert_eq!(
        w.end(&k, first.handle, TxnOutcome::Commit).unwrap(),
        TxnOutcome::Commit
    );
    assert_eq!(
        w.deliver(),
        pairs(&[
            ("billing", "created"),
            ("log", "order 17 created"),
            ("shipping", "created"),
        ])
    );
    assert!(w.dispatcher.transactions().is_empty());
    // The ids the produce answered are the ids in the topics.
    let id = first.records[0].id;
    let events = w.events.take();
    assert!(events
        .iter()
        .any(|e| e.message_id == id && matches!(e.kind, EventKind::TxnHalfStored { .. })));
    assert!(events.iter().any(|e| e.message_id == id
        && matches!(e.kind, EventKind::TxnCommitted { .. })
        && e.offset.is_some()));
    assert!(events
        .iter()
        .any(|e| e.message_id == id && matches!(e.kind, EventKind::Delivered { .. })));
}

#[test]
fn a_rolled_back_transaction_is_never_delivered() {
    let mut w = World::new();
    let k = key("order-18");
    let produced = w.produce(&k, 0, "orders", &["a", "b"]).unwrap();
    w.end(&k, produced.handle, TxnOutcome::Rollback).unwrap();
    assert!(w.deliver().is_empty());
    w.crash_and_reopen();
    assert!(w.deliver().is_empty());
    assert!(w
        .events
        .take()
        .iter()
        .any(|e| matches!(e.kind, EventKind::TxnRolledBack { .. })));
}

#[test]
fn repeated_and_contradicting_ends_get_clear_answers() {
    let mut w = World::new();
    let k = key("order-19");
    let handle = w.produce(&k, 0, "orders", &["x"]).unwrap().handle;
    assert!(matches!(
        w.end(&k, handle + 1, TxnOutcome::Commit),
        Err(DispatchError::Transaction(TxnError::Unknown(_)))
    ));
    assert!(matches!(
        w.end(&key("never-begun"), 1, TxnOutcome::Commit),
        Err(DispatchError::Transaction(TxnError::Unknown(_)))
    ));
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    // A repeated COMMIT (a retry after a lost answer) gets the same answer
    // and stores nothing again.
    assert_eq!(
        w.end(&k, handle, TxnOutcome::Commit).unwrap(),
        TxnOutcome::Commit
    );
    assert!(matches!(
        w.end(&k, handle, TxnOutcome::Rollback),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    assert!(matches!(
        w.produce(&k, handle, "orders", &["late"]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    assert_eq!(w.deliver(), pairs(&[("billing", "x"), ("shipping", "x")]));
    // The id may be used again: a new transaction with a new handle, which
    // the old handle never reaches.
    let again = w.produce(&k, 0, "orders", &["y"]).unwrap().handle;
    assert_ne!(again, handle);
    // A late COMMIT of the old transaction gets the old answer and does
    // not commit the new one.
    assert_eq!(
        w.end(&k, handle, TxnOutcome::Commit).unwrap(),
        TxnOutcome::Commit
    );
    assert!(w.deliver().is_empty());
    assert_eq!(w.dispatcher.transactions()[0].stage, "open");
    w.end(&k, again, TxnOutcome::Commit).unwrap();
    assert_eq!(w.deliver(), pairs(&[("billing", "y"), ("shipping", "y")]));
}

#[test]
fn reserved_headers_and_unknown_topics_store_nothing() {
    let mut w = World::new();
    let k = key("bad");
    assert!(matches!(
        w.produce(&k, 0, "nope", &["x"]),
        Err(DispatchError::UnknownTopic(_))
    ));
    let mut record = RecordInput::new("x");
    record.headers.push(("dmq.txn.group".into(), "g".into()));
    let answered = common::answered(|reply| {
        w.dispatcher
            .txn_produce(k.clone(), 0, "orders", vec![(0, record, 0)], reply)
    });
    assert!(matches!(
        answered,
        Some(Err(DispatchError::InvalidArgument(_)))
    ));
    assert!(w.dispatcher.transactions().is_empty());
}

#[test]
fn an_open_transaction_survives_a_crash_and_commits_after_it() {
    let mut w = World::new();
    let k = key("order-20");
    let handle = w.produce(&k, 0, "orders", &["a", "b", "c"]).unwrap().handle;
    w.crash_and_reopen();
    assert!(w.deliver().is_empty());
    let listed = w.dispatcher.transactions();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].handle, listed[0].records), (handle, 3));
    w.produce(&k, handle, "orders", &["d"]).unwrap();
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    let delivered = w.deliver();
    assert_eq!(delivered.len(), 8, "{delivered:?}");
}

/// The crash point between a durable commit record and the move into the
/// topics: the reopened dispatcher moves the records, once.
#[test]
fn a_commit_durable_before_a_crash_is_moved_at_reopen() {
    let mut w = World::new();
    drop(w.dispatcher.checkpoint());
    let storage: Arc<dyn Storage> = Arc::new(w.storage.clone());
    let k = key("order-21");
    let ids: Vec<MessageId>;
    {
        // The transaction store alone: half records and a durable commit
        // record, and nothing moved (the crash came right after).
        let (mut store, _) =
            TransactionLog::open(Arc::clone(&storage), TransactionLimits::default()).unwrap();
        let halves = ["a", "b", "c"]
            .iter()
            .map(|v| HalfInput {
                topic: "orders".to_string(),
                partition: 1,
                record: RecordInput::new(v.to_string()),
                relative: 0,
            })
            .collect();
        let (handle, info) = store.append_half(&k, 0, halves, w.clock.now_ms()).unwrap();
        ids = info.ids.clone();
        store.half_written(handle, true);
        store.append_outcome(handle, TxnOutcome::Commit).unwrap();
        store.outcome_written(handle, TxnOutcome::Commit, true);
        // One of the three made it to its topic before the crash.
        let orders = storage.partition("orders", 1).unwrap();
        let mut moved = RecordInput::new("a");
        moved.id = Some(ids[0]);
        orders.append(vec![moved]).unwrap();
    }
    w.crash_and_reopen();
    let delivered = w.deliver();
    assert_eq!(
        delivered,
        pairs(&[
            ("billing", "a"),
            ("billing", "b"),
            ("billing", "c"),
            ("shipping", "a"),
            ("shipping", "b"),
            ("shipping", "c"),
        ])
    );
    let orders = storage.partition("orders", 1).unwrap();
    assert_eq!(orders.end_offset(), 3, "no record is stored twice");
    for id in &ids {
        assert!(orders.find_by_id(id).unwrap().is_some());
    }
    assert!(w.dispatcher.transactions().is_empty());
    // Settled: a second restart moves nothing again.
    w.dispatcher.checkpoint().unwrap();
    w.crash_and_reopen();
    assert!(w.deliver().is_empty());
    assert_eq!(orders.end_offset(), 3);
}

#[test]
fn a_delayed_record_starts_its_delay_at_the_commit() {
    let mut w = World::new();
    let k = key("remind");
    let now = w.clock.now_ms();
    let mut record = RecordInput::new("pay now");
    record.deliver_at_ms = Some(now + 600_000);
    let answered = common::answered(|reply| {
        w.dispatcher.txn_produce(
            k.clone(),
            0,
            "orders",
            vec![(0, record, dmq_dispatcher::transactions::RELATIVE_DELIVER_AT)],
            reply,
        )
    });
    let handle = answered.unwrap().unwrap().handle;
    // The commit comes 5 minutes later: the message is due 10 minutes
    // after the commit, not after the produce.
    w.clock.advance_ms(300_000);
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    // The next poll moves it into the delay store.
    assert!(w.deliver().is_empty());
    assert_eq!(w.dispatcher.pending_delays(), 1);
    w.clock.advance_ms(599_000);
    assert!(w.deliver().is_empty());
    w.clock.advance_ms(1_000);
    assert_eq!(
        w.deliver(),
        pairs(&[("billing", "pay now"), ("shipping", "pay now")])
    );
}

#[test]
fn a_failed_half_append_leaves_only_rollback() {
    let mut w = World::new();
    let k = key("order-22");
    let handle = w.produce(&k, 0, "orders", &["a"]).unwrap().handle;
    w.storage.set_logs_full(true);
    assert!(w.produce(&k, handle, "orders", &["b"]).is_err());
    w.storage.set_logs_full(false);
    // The failed append stored nothing, so the transaction can still go
    // on; the commit delivers what was stored.
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    assert_eq!(w.deliver(), pairs(&[("billing", "a"), ("shipping", "a")]));
}

/// Check-back: an open transaction past its timeout is checked, with
/// backoff; a late COMMIT (after checks began) is honoured and stops them;
/// one nobody answers runs out of checks and is left unresolved, still
/// open, still committable; a restart checks the open ones again.
#[test]
fn transactions_left_open_are_checked_back_until_unresolved() {
    let limits = TransactionLimits {
        timeout_ms: 1_000,
        check_backoff_max_ms: 4_000,
        max_checks: 3,
        // One check per millisecond and group: checks due together are
        // spread 1 ms apart.
        checks_per_second: 1_000,
        ..TransactionLimits::default()
    };
    let clock = Arc::new(ManualClock::new(1_000_000));
    let storage = MemoryStorage::new(clock.clone());
    let config = DispatcherConfig {
        transactions: limits,
        ..DispatcherConfig::default()
    };
    let open_dispatcher = |config: &DispatcherConfig| {
        Dispatcher::open(
            Arc::new(storage.clone()),
            clock.clone(),
            Arc::new(MemoryEventSink::default()),
            config.clone(),
        )
        .unwrap()
    };
    let mut d = open_dispatcher(&config);
    d.create_topic(
        "orders",
        TopicConfig {
            partitions: 1,
            ordered: false,
        },
    )
    .unwrap();
    let begin = |d: &mut Dispatcher, id: &str| {
        let answered = common::answered(|reply| {
            d.txn_produce(
                key(id),
                0,
                "orders",
                vec![(0, RecordInput::new(id.to_string()), 0)],
                reply,
            )
        });
        answered.unwrap().unwrap().handle
    };
    let quiet = begin(&mut d, "quiet");
    let late = begin(&mut d, "late");
    // Nothing before the timeout.
    clock.advance_ms(999);
    d.poll().unwrap();
    assert!(d.take_txn_checks().is_empty());
    assert_eq!(d.next_wakeup_ms(), Some(clock.now_ms() + 1));
    clock.advance_ms(1);
    d.poll().unwrap();
    let mut checks = d.take_txn_checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    clock.advance_ms(1);
    d.poll().unwrap();
    checks.extend(d.take_txn_checks());
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(checks
        .iter()
        .all(|c| c.checks == 1 && c.group == "order-service"));
    // The second check comes after the backoff (1 s + jitter ≤ 250 ms).
    clock.advance_ms(998);
    d.poll().unwrap();
    assert!(d.take_txn_checks().is_empty());
    let mut second = Vec::new();
    for _ in 0..260 {
        clock.advance_ms(1);
        d.poll().unwrap();
        second.extend(d.take_txn_checks());
    }
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.iter().all(|c| c.checks == 2));
    // A late COMMIT of one: honoured, and no more checks of it.
    let answered =
        common::answered(|reply| d.txn_end(key("late"), late, TxnOutcome::Commit, reply));
    assert_eq!(answered.unwrap().unwrap(), TxnOutcome::Commit);
    // The other: a third check (2 s later), then unresolved.
    let mut sent = Vec::new();
    for _ in 0..20 {
        clock.advance_ms(500);
        d.poll().unwrap();
        sent.extend(d.take_txn_checks());
    }
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].handle, sent[0].checks), (quiet, 3));
    let listed = d.transactions();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].unresolved && listed[0].overdue && listed[0].checks == 3);
    assert_eq!(d.transaction_counts().unresolved, 1);
    assert_eq!(d.transaction_counts().checks_sent, 5);
    // A restart checks it again from its timeout (counts are not kept).
    drop(d);
    let mut d = open_dispatcher(&config);
    d.poll().unwrap();
    let again = d.take_txn_checks();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].handle, again[0].checks), (quiet, 1));
    // Still committable.
    let answered =
        common::answered(|reply| d.txn_end(key("quiet"), quiet, TxnOutcome::Rollback, reply));
    assert!(answered.unwrap().is_ok());
    for _ in 0..20 {
        clock.advance_ms(1_000);
        d.poll().unwrap();
        assert!(d.take_txn_checks().is_empty());
    }
}
