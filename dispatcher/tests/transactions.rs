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
                .txn_produce(key.clone(), handle, None, topic, records, reply)
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

/// Transactional acks: consume from `audit` (group `log`), produce to
/// `orders`, in one transaction.
impl World {
    /// Every delivery of one poll, not acked: (group, member, partition,
    /// offset, value).
    fn deliver_unacked(&mut self) -> Vec<(String, u64, u32, u64, String)> {
        let mut out: Vec<_> = self
            .dispatcher
            .poll()
            .unwrap()
            .into_iter()
            .map(|d| {
                (
                    d.group.to_string(),
                    d.member,
                    d.partition,
                    d.record.offset,
                    String::from_utf8(d.record.value.to_vec()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn member(&self, group: &str) -> u64 {
        self.members.iter().find(|(g, _)| g == group).unwrap().1
    }

    fn txn_ack(
        &mut self,
        key: &TxnKey,
        handle: u64,
        group: &str,
        positions: &[(u32, u64)],
    ) -> Result<u64, DispatchError> {
        let member = self.member(group);
        let answered = common::answered(|reply| {
            self.dispatcher
                .txn_ack(key.clone(), handle, member, positions.to_vec(), reply)
        });
        let produced = answered.expect("the inline writer answers at once")?;
        assert!(produced.records.is_empty());
        Ok(produced.handle)
    }

    /// A plain message in `audit` partition 0, delivered to `log` and not
    /// acked: its offset.
    fn consumed(&mut self, value: &str) -> u64 {
        self.dispatcher
            .produce("audit", Some(0), vec![RecordInput::new(value.to_string())])
            .unwrap();
        let delivered = self.deliver_unacked();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert_eq!(delivered[0].4, value);
        delivered[0].3
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
            .txn_produce(k.clone(), 0, None, "orders", vec![(0, record, 0)], reply)
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
        store.half_written(handle, None, true);
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
            None,
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
    let events = MemoryEventSink::default();
    let open_dispatcher = |config: &DispatcherConfig| {
        Dispatcher::open(
            Arc::new(storage.clone()),
            clock.clone(),
            Arc::new(events.clone()),
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
                None,
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
    // Each check is in the trace of the transaction's records.
    let checked: Vec<u32> = events
        .take()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::TxnChecked { handle, checks } if handle == quiet => Some(checks),
            _ => None,
        })
        .collect();
    assert_eq!(checked, vec![1, 2, 3]);
    // A restart keeps its count: it stays unresolved, and is not checked
    // again (no check-back storm after every restart).
    drop(d);
    let mut d = open_dispatcher(&config);
    for _ in 0..20 {
        clock.advance_ms(1_000);
        d.poll().unwrap();
        assert!(d.take_txn_checks().is_empty());
    }
    let listed = d.transactions();
    assert!(listed[0].unresolved && listed[0].checks == 3, "{listed:?}");
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

/// Atomic consume-and-produce: the consumed message is acked exactly when
/// the produced ones are committed; a rollback leaves it to be delivered
/// again.
#[test]
fn a_transactional_ack_takes_effect_with_the_commit_only() {
    let mut w = World::new();
    let offset = w.consumed("order 30 paid");
    // First attempt: ack and produce, then roll back.
    let k = key("pipeline-1");
    let handle = w.txn_ack(&k, 0, "log", &[(0, offset)]).unwrap();
    let produced = w.produce(&k, handle, "orders", &["ship 30"]).unwrap();
    assert_eq!(produced.handle, handle);
    assert_eq!(w.dispatcher.transactions()[0].acks, 1);
    w.end(&k, handle, TxnOutcome::Rollback).unwrap();
    assert!(w.deliver_unacked().is_empty());
    // The ack never happened: after its ack timeout (and the backoff) the
    // message comes back.
    w.clock.advance_ms(60_000);
    assert!(w.deliver_unacked().is_empty());
    w.clock.advance_ms(200);
    let again = w.deliver_unacked();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((again[0].3, again[0].4.as_str()), (offset, "order 30 paid"));
    // Second attempt: commit.
    let k = key("pipeline-2");
    let handle = w.txn_ack(&k, 0, "log", &[(0, offset)]).unwrap();
    w.produce(&k, handle, "orders", &["ship 30"]).unwrap();
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    assert_eq!(
        w.deliver(),
        pairs(&[("billing", "ship 30"), ("shipping", "ship 30")])
    );
    // Acked: never delivered again.
    w.clock.advance_ms(120_000);
    assert!(w.deliver_unacked().is_empty());
    assert!(w
        .events
        .take()
        .iter()
        .any(|e| e.offset == Some(offset) && matches!(e.kind, EventKind::Acked)));
}

/// A TXN_ACK whose answer was lost is sent again (the client does, after a
/// reconnect): the repeat is answered as the first was and claims nothing
/// twice, also when it was the transaction's begin (handle 0). A begin
/// that differs from the open transaction's is still a second one.
#[test]
fn a_transactional_ack_sent_again_is_answered_as_the_first() {
    let mut w = World::new();
    let first = w.consumed("order 32 paid");
    let second = w.consumed("order 33 paid");
    let k = key("pipeline-3");
    let handle = w.txn_ack(&k, 0, "log", &[(0, first)]).unwrap();
    // The begin again (its answer lost): the same transaction.
    assert_eq!(w.txn_ack(&k, 0, "log", &[(0, first)]).unwrap(), handle);
    assert_eq!(w.dispatcher.transactions().len(), 1);
    // A begin of other messages, or of another group's, is not a repeat.
    assert!(matches!(
        w.txn_ack(&k, 0, "log", &[(0, first), (0, second)]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    // A later ack, twice: one claim.
    assert_eq!(
        w.txn_ack(&k, handle, "log", &[(0, second)]).unwrap(),
        handle
    );
    assert_eq!(
        w.txn_ack(&k, handle, "log", &[(0, second)]).unwrap(),
        handle
    );
    assert_eq!(w.dispatcher.transactions()[0].acks, 2);
    // Once it holds more than its begin, a begin is refused again.
    assert!(matches!(
        w.txn_ack(&k, 0, "log", &[(0, first)]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    w.produce(&k, handle, "orders", &["ship 32 and 33"])
        .unwrap();
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    assert_eq!(
        w.deliver(),
        pairs(&[
            ("billing", "ship 32 and 33"),
            ("shipping", "ship 32 and 33")
        ])
    );
    w.clock.advance_ms(120_000);
    assert!(w.deliver_unacked().is_empty(), "both acked at the commit");
}

/// A message is acked by one open transaction at most, and a commit whose
/// ack was overtaken by a plain ack is refused: so a committed
/// transaction's output matches exactly one consumption.
#[test]
fn transactional_acks_conflict_with_each_other_and_with_plain_acks() {
    let mut w = World::new();
    let offset = w.consumed("order 31 paid");
    let a = key("a");
    let b = key("b");
    let handle_a = w.txn_ack(&a, 0, "log", &[(0, offset)]).unwrap();
    // Repeating it in the same transaction is fine.
    assert_eq!(
        w.txn_ack(&a, handle_a, "log", &[(0, offset)]).unwrap(),
        handle_a
    );
    assert!(matches!(
        w.txn_ack(&b, 0, "log", &[(0, offset)]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    // Not delivered yet, or not in the group: clear errors.
    assert!(matches!(
        w.txn_ack(&b, 0, "log", &[(0, offset + 1)]),
        Err(DispatchError::NotDelivered { .. })
    ));
    assert!(matches!(
        w.txn_ack(&b, 0, "log", &[(7, 0)]),
        Err(DispatchError::UnknownPartition { .. })
    ));
    assert!(matches!(
        w.txn_ack(&b, 0, "log", &[]),
        Err(DispatchError::InvalidArgument(_))
    ));
    // A rollback frees the message for another transaction.
    w.end(&a, handle_a, TxnOutcome::Rollback).unwrap();
    let handle_b = w.txn_ack(&b, 0, "log", &[(0, offset)]).unwrap();
    w.produce(&b, handle_b, "orders", &["ship 31"]).unwrap();
    // A plain ack overtakes the transaction: its commit is refused, and
    // nothing of it is delivered.
    let log = w.member("log");
    w.dispatcher.ack(log, 0, offset).unwrap();
    assert!(matches!(
        w.end(&b, handle_b, TxnOutcome::Commit),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    w.end(&b, handle_b, TxnOutcome::Rollback).unwrap();
    assert!(w.deliver().is_empty());
    // Acked already: a new transaction cannot ack it.
    assert!(matches!(
        w.txn_ack(&key("c"), 0, "log", &[(0, offset)]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
}

/// Crash points: after the TXN_ACK (the claim comes back), and after a
/// durable commit whose acks were applied but not yet synced to the
/// group's journal (recovery applies them again: the message is not
/// delivered again).
#[test]
fn transactional_acks_survive_crashes_before_and_after_the_commit() {
    let mut w = World::new();
    let offset = w.consumed("order 32 paid");
    let k = key("pipeline-3");
    let handle = w.txn_ack(&k, 0, "log", &[(0, offset)]).unwrap();
    w.crash_and_reopen();
    let listed = w.dispatcher.transactions();
    assert_eq!((listed[0].handle, listed[0].acks), (handle, 1));
    // The message is redelivered after the restart (its delivery is
    // gone), and still claimed by the open transaction.
    let again = w.deliver_unacked();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(matches!(
        w.txn_ack(&key("other"), 0, "log", &[(0, offset)]),
        Err(DispatchError::Transaction(TxnError::Conflict { .. }))
    ));
    w.produce(&k, handle, "orders", &["ship 32"]).unwrap();
    w.end(&k, handle, TxnOutcome::Commit).unwrap();
    assert_eq!(
        w.deliver(),
        pairs(&[("billing", "ship 32"), ("shipping", "ship 32")])
    );
    // The group's journal has not synced the ack yet (no time passed):
    // the crash loses it there, and recovery applies it again. (The plain
    // acks of `orders` were not synced either: those messages come back,
    // within the documented ack window.)
    w.crash_and_reopen();
    let log_deliveries = |w: &mut World| {
        let delivered = w.deliver_unacked();
        delivered
            .into_iter()
            .filter(|d| d.0 == "log")
            .collect::<Vec<_>>()
    };
    assert_eq!(log_deliveries(&mut w), vec![]);
    w.clock.advance_ms(120_000);
    assert_eq!(log_deliveries(&mut w), vec![]);
    assert!(w.dispatcher.transactions().is_empty());
    // Once the watermark passed it, the ack is in the journal.
    w.clock.advance_ms(1_000);
    log_deliveries(&mut w);
    w.crash_and_reopen();
    assert_eq!(log_deliveries(&mut w), vec![]);
    w.clock.advance_ms(120_000);
    assert_eq!(log_deliveries(&mut w), vec![]);
}
