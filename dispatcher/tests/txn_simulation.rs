//! Transactions, simulated: the real [`Dispatcher`] over [`MemoryStorage`]
//! and a manual clock, driven by a seeded random workload against a
//! reference model. Each seed begins, fills, commits and rolls back
//! transactions across two topics, repeats and contradicts COMMITs and
//! ROLLBACKs (same handle, stale handles, reused ids), interleaves plain
//! produces, deliveries and acks, fills single topics' disks (so a commit
//! is durable but its move into a topic fails, or a half append fails),
//! and crashes (drops the dispatcher without a checkpoint) at random
//! points, including between a durable commit and its move.
//!
//! Checked at the end of every seed, after the disks are healed and the
//! dispatcher drained:
//! 1. every record of a transaction whose COMMIT was answered `Ok` is in
//!    its topic exactly once and was delivered to every group of it;
//! 2. no record of a transaction that rolled back, is still open, or
//!    whose produce failed ever reached a topic;
//! 3. a transaction whose end failed (no answer) is atomic: all of its
//!    records are in their topics, or none;
//! 4. every answer matches the model: repeated ends get the first answer,
//!    contradicting ones a conflict, unknown handles "unknown";
//! 5. after every crash the open transactions are listed again with their
//!    records;
//! 6. check-backs (timeout 1 s, at most 3) only ever ask about a
//!    transaction that may still be open; some are answered with an end;
//! 7. (half the seeds relocate open transactions after 6 records of the
//!    half log, so 1 to 6 hold across relocations and crashes after them)
//! 8. transactional acks (some deliveries are acked in a random open
//!    transaction instead of plainly): a message is acked by at most one
//!    open transaction and by at most one committed one per group; once a
//!    COMMIT is answered `Ok`, its acked messages are never delivered to
//!    their group again (also across crashes); a COMMIT is refused only
//!    when one of its messages was acked plainly since; after a crash
//!    open transactions are listed with their acks.
//!
//! 9. numbered produces (TXN_PRODUCE_SEQ; half of the produces, the
//!    others plain, both taking a number): a retry of a produce of an open
//!    transaction, also after crashes and relocations and also a retried
//!    begin (handle 0), is answered with the first answer's handle and
//!    ids and stores nothing (the listing's record count does not move);
//!    a number past the next one is refused (OutOfSequence), and a used
//!    one with other records is a conflict; a retry into an ended
//!    transaction is answered the same or refused, never stored.
//!
//! `DMQ_TXN_SIM_SEEDS=N` (default 1000), `DMQ_TXN_SIM_SEED=n` (one seed);
//! `DMQ_TXN_SIM_SHOW=1` prints the steps of a seed that passes.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use dmq_dispatcher::{
    DispatchError, Dispatcher, DispatcherConfig, GroupConfig, MemoryStorage, NullEventSink,
    PartitionLog, Storage, TopicConfig, TransactionLimits, TxnError, TxnKey, TxnOutcome,
};
use dmq_log_store::{ManualClock, MessageId, RecordInput};

mod common;
use common::Rng;

/// (topic, partitions, groups)
const TOPICS: [(&str, u32, &[&str]); 2] = [("a", 2, &["g1", "g2"]), ("b", 1, &["g3"])];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// COMMIT answered Ok.
    Committed,
    /// ROLLBACK answered Ok.
    RolledBack,
    /// An end whose answer was an error: it may or may not have happened.
    Unsure,
}

#[derive(Debug)]
struct Txn {
    key: TxnKey,
    handle: u64,
    state: State,
    /// (topic, id) of every record whose produce was answered Ok.
    records: Vec<(String, MessageId)>,
    /// (group, id) of every message its TXN_ACKs acked (answered Ok).
    acks: Vec<(String, MessageId)>,
    /// Each produce answered Ok, by its number: (topic, values, ids).
    steps: Vec<(String, Vec<String>, Vec<MessageId>)>,
    /// The crash count when it ended: a settled transaction's outcome is
    /// remembered (for repeated ends) until a restart.
    ended_at: Option<u64>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    clock: Arc<ManualClock>,
    storage: MemoryStorage,
    dispatcher: Option<Dispatcher>,
    members: Vec<(String, String, u64)>,
    txns: Vec<Txn>,
    crashes: u64,
    /// The transaction cache budget of this seed: none, a few records, or
    /// all (commits read the half log back, some of the time, or never).
    cache_bytes: u64,
    /// (group) -> ids delivered.
    delivered: HashMap<String, HashSet<MessageId>>,
    /// (group, id) acked by a transaction whose COMMIT was answered Ok:
    /// never delivered to the group again.
    committed_acks: HashSet<(String, MessageId)>,
    /// (group, id) acked plainly (newly), with the crash count then: a
    /// crash may lose a plain ack that was not synced yet.
    plain_acks: HashMap<(String, MessageId), u64>,
    full: Option<&'static str>,
    next_id: u64,
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let storage = MemoryStorage::new(clock.clone());
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            clock,
            storage,
            dispatcher: None,
            members: Vec::new(),
            txns: Vec::new(),
            crashes: 0,
            cache_bytes: [0, 64, 1 << 20][(seed % 3) as usize],
            delivered: HashMap::new(),
            committed_acks: HashSet::new(),
            plain_acks: HashMap::new(),
            full: None,
            next_id: 0,
            log: Vec::new(),
        };
        sim.open();
        for (topic, partitions, groups) in TOPICS {
            sim.d()
                .create_topic(
                    topic,
                    TopicConfig {
                        partitions,
                        ordered: false,
                    },
                )
                .unwrap();
            for group in groups {
                sim.d()
                    .subscribe(topic, group, GroupConfig::default())
                    .unwrap();
            }
        }
        sim.join();
        sim
    }

    fn d(&mut self) -> &mut Dispatcher {
        self.dispatcher.as_mut().unwrap()
    }

    fn open(&mut self) {
        self.dispatcher = None;
        let dispatcher = Dispatcher::open(
            Arc::new(self.storage.clone()),
            self.clock.clone(),
            Arc::new(NullEventSink),
            DispatcherConfig {
                transactions: TransactionLimits {
                    cache_bytes: self.cache_bytes,
                    // Half the seeds relocate open transactions often.
                    relocate_after_records: if self.seed % 2 == 0 { 6 } else { 262_144 },
                    // Check-backs within a run's simulated time.
                    timeout_ms: 1_000,
                    check_backoff_max_ms: 2_000,
                    max_checks: 3,
                    ..TransactionLimits::default()
                },
                ..DispatcherConfig::default()
            },
        )
        .unwrap_or_else(|e| panic!("seed {}: open failed: {e}", self.seed));
        self.dispatcher = Some(dispatcher);
    }

    fn join(&mut self) {
        self.members.clear();
        for (topic, _, groups) in TOPICS {
            for group in groups {
                let member = self.d().join(topic, group, "m").unwrap();
                self.d().add_credit(member, 1_000_000).unwrap();
                self.members
                    .push((topic.to_string(), group.to_string(), member));
            }
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what}\nlast steps:\n{}",
            self.seed,
            self.log[self.log.len().saturating_sub(
                if std::env::var_os("DMQ_TXN_SIM_SEED").is_some() {
                    usize::MAX
                } else {
                    40
                }
            )..]
                .join("\n")
        );
    }

    /// `count` new values.
    fn values(&mut self, count: usize) -> Vec<String> {
        (0..count)
            .map(|_| {
                self.next_id += 1;
                format!("r{}", self.next_id)
            })
            .collect()
    }

    /// A TXN_PRODUCE of `values` to random partitions of `topic`,
    /// numbered `sequence` (TXN_PRODUCE_SEQ) or not.
    fn produce(
        &mut self,
        key: &TxnKey,
        handle: u64,
        sequence: Option<u32>,
        topic: &str,
        values: &[String],
    ) -> Result<(u64, Vec<MessageId>), DispatchError> {
        let partitions = TOPICS.iter().find(|t| t.0 == topic).unwrap().1;
        let records = values
            .iter()
            .map(|value| {
                let partition = self.rng.below(u64::from(partitions)) as u32;
                (partition, RecordInput::new(value.clone()), 0)
            })
            .collect();
        let answered = common::answered(|reply| {
            self.d()
                .txn_produce(key.clone(), handle, sequence, topic, records, reply)
        });
        let result = answered;
        let result = result.unwrap_or_else(|| self.fail("txn_produce did not answer".into()));
        result.map(|p| (p.handle, p.records.into_iter().map(|r| r.id).collect()))
    }

    fn end(
        &mut self,
        key: &TxnKey,
        handle: u64,
        outcome: TxnOutcome,
    ) -> Result<TxnOutcome, DispatchError> {
        let answered =
            common::answered(|reply| self.d().txn_end(key.clone(), handle, outcome, reply));
        answered.unwrap_or_else(|| self.fail("txn_end did not answer".into()))
    }

    fn step(&mut self) {
        let open: Vec<usize> = (0..self.txns.len())
            .filter(|&i| self.txns[i].state == State::Open)
            .collect();
        let roll = self.rng.below(100);
        match roll {
            0..=19 => self.begin(),
            20..=34 if !open.is_empty() => {
                let i = *self.rng.pick(&open).unwrap();
                let topic = self.rng.pick(&["a", "b"]).unwrap().to_string();
                let count = self.rng.range(1, 3) as usize;
                let values = self.values(count);
                let (key, handle) = (self.txns[i].key.clone(), self.txns[i].handle);
                let sequence = self
                    .rng
                    .chance(50)
                    .then_some(self.txns[i].steps.len() as u32);
                match self.produce(&key, handle, sequence, &topic, &values) {
                    Ok((h, ids)) => {
                        if h != handle {
                            self.fail(format!("produce into {handle} answered handle {h}"));
                        }
                        self.log
                            .push(format!("produce {key} {handle} #{sequence:?} -> {ids:?}"));
                        self.txns[i]
                            .records
                            .extend(ids.iter().map(|id| (topic.clone(), *id)));
                        self.txns[i].steps.push((topic, values, ids));
                    }
                    // Past the timeout: refused whole.
                    Err(DispatchError::Transaction(TxnError::Limit { .. })) => {
                        self.log
                            .push(format!("produce {key} {handle} -> past timeout"));
                    }
                    Err(error) => {
                        self.log.push(format!("produce {key} {handle} -> {error}"));
                        if !is_store(&error) {
                            self.fail(format!("produce into an open transaction: {error}"));
                        }
                    }
                }
            }
            35..=49 if !open.is_empty() => {
                let i = *self.rng.pick(&open).unwrap();
                let outcome = if self.rng.chance(60) {
                    TxnOutcome::Commit
                } else {
                    TxnOutcome::Rollback
                };
                self.end_txn(i, outcome);
            }
            50..=57 if !self.txns.is_empty() => {
                // Repeat or contradict an end, maybe with a stale handle.
                let i = self.rng.below(self.txns.len() as u64) as usize;
                let outcome = if self.rng.chance(50) {
                    TxnOutcome::Commit
                } else {
                    TxnOutcome::Rollback
                };
                self.repeat_end(i, outcome);
            }
            58..=62 if !self.txns.is_empty() => self.retry(),
            63..=67 => {
                let topic = *self.rng.pick(&["a", "b"]).unwrap();
                let _ = self
                    .d()
                    .produce(topic, None, vec![RecordInput::new("plain")]);
            }
            68..=84 => self.deliver(),
            85..=89 => {
                let ms = self.rng.range(1, 200) as i64;
                self.clock.advance_ms(ms);
            }
            90..=95 => {
                // A full disk for one topic (or the end of it).
                match self.full.take() {
                    Some(topic) => {
                        self.storage.set_topic_full(topic, false);
                        self.log.push(format!("disk of {topic} healed"));
                    }
                    None => {
                        let topic = *self.rng.pick(&["a", "b", "__dmq_txn"]).unwrap();
                        self.storage.set_topic_full(topic, true);
                        self.full = Some(topic);
                        self.log.push(format!("disk of {topic} full"));
                    }
                }
            }
            _ => self.crash(),
        }
    }

    fn begin(&mut self) {
        // Mostly new ids; sometimes one used before (ended or not).
        let id = if !self.txns.is_empty() && self.rng.chance(20) {
            let i = self.rng.below(self.txns.len() as u64) as usize;
            self.txns[i].key.id.clone()
        } else {
            format!("t{}", self.txns.len())
        };
        let key = TxnKey::new("producers", id).unwrap();
        let topic = self.rng.pick(&["a", "b"]).unwrap().to_string();
        let count = self.rng.range(1, 3) as usize;
        let values = self.values(count);
        let open_with_key = self
            .txns
            .iter()
            .any(|t| t.key == key && matches!(t.state, State::Open | State::Unsure));
        let sequence = self.rng.chance(50).then_some(0);
        match self.produce(&key, 0, sequence, &topic, &values) {
            Ok((handle, ids)) => {
                if self
                    .txns
                    .iter()
                    .any(|t| t.key == key && t.state == State::Open)
                {
                    self.fail(format!("a second begin of open {key} was accepted"));
                }
                self.log.push(format!("begin {key} -> {handle} {ids:?}"));
                // An unsure earlier transaction with this key has ended
                // (its end happened, or a begin would be refused).
                self.txns.push(Txn {
                    key,
                    handle,
                    state: State::Open,
                    records: ids.iter().map(|id| (topic.clone(), *id)).collect(),
                    acks: Vec::new(),
                    steps: vec![(topic, values, ids)],
                    ended_at: None,
                });
            }
            Err(DispatchError::Transaction(TxnError::Conflict { .. })) if open_with_key => {
                self.log.push(format!("begin {key} -> conflict (open)"));
            }
            Err(error) if is_store(&error) => {
                self.log.push(format!("begin {key} -> disk full"));
            }
            Err(error) => self.fail(format!("begin {key}: {error}")),
        }
    }

    /// Sends a produce of a transaction again with its number (a retry
    /// after a lost answer), or probes the numbering: a number past the
    /// next one, or a used one with other records.
    fn retry(&mut self) {
        // Mostly an open transaction's (its producer retrying), sometimes
        // an ended one's (a late duplicate).
        let open: Vec<usize> = (0..self.txns.len())
            .filter(|&i| self.txns[i].state == State::Open)
            .collect();
        let i = match self.rng.pick(&open) {
            Some(&i) if self.rng.chance(70) => i,
            _ => self.rng.below(self.txns.len() as u64) as usize,
        };
        let (key, handle, state) = (
            self.txns[i].key.clone(),
            self.txns[i].handle,
            self.txns[i].state,
        );
        let steps = self.txns[i].steps.len() as u32;
        let probe = self.rng.below(10);
        if state == State::Open && probe < 2 {
            // A gap, or other records under a used number: refused whole.
            let topic = self.rng.pick(&["a", "b"]).unwrap().to_string();
            let values = self.values(1);
            let (sequence, gap) = if probe == 0 || steps == 0 {
                (steps + 1, true)
            } else {
                (self.rng.below(u64::from(steps)) as u32, false)
            };
            let result = self.produce(&key, handle, Some(sequence), &topic, &values);
            self.log.push(format!(
                "probe {key} {handle} #{sequence} (of {steps}) -> {result:?}"
            ));
            match (gap, &result) {
                (true, Err(DispatchError::Transaction(TxnError::OutOfSequence { .. })))
                | (false, Err(DispatchError::Transaction(TxnError::Conflict { .. }))) => {}
                _ => self.fail(format!("numbering probe answered {result:?}")),
            }
            self.check_listed(i);
            return;
        }
        let Some(sequence) = (steps > 0).then(|| self.rng.below(u64::from(steps)) as u32) else {
            return;
        };
        let (topic, values, ids) = self.txns[i].steps[sequence as usize].clone();
        // A begin's answer (the handle) may be what was lost.
        let given = if sequence == 0 && state == State::Open && self.rng.chance(50) {
            0
        } else {
            handle
        };
        let result = self.produce(&key, given, Some(sequence), &topic, &values);
        self.log.push(format!(
            "retry {key} {given} #{sequence} ({state:?}) -> {result:?}"
        ));
        match (state, result) {
            (_, Ok((h, got))) if h == handle && got == ids => {}
            (State::Open, other) => {
                self.fail(format!("a retry into an open transaction: {other:?}"))
            }
            (_, Ok(other)) => self.fail(format!("a retry into an ended one answered {other:?}")),
            (_, Err(error)) if is_store(&error) => {}
            (
                _,
                Err(DispatchError::Transaction(TxnError::Conflict { .. } | TxnError::Unknown(_))),
            ) => {}
            (_, Err(error)) => self.fail(format!("a retry into an ended one: {error}")),
        }
        self.check_listed(i);
    }

    /// An open transaction is listed with as many records as the model
    /// holds (a retry stored nothing).
    fn check_listed(&mut self, i: usize) {
        if self.txns[i].state != State::Open {
            return;
        }
        let handle = self.txns[i].handle;
        let listed = self
            .d()
            .transactions()
            .into_iter()
            .find(|t| t.handle == handle)
            .map(|t| t.records);
        if listed != Some(self.txns[i].records.len()) {
            self.fail(format!(
                "open {handle} listed with {listed:?} records, the model has {}",
                self.txns[i].records.len()
            ));
        }
    }

    fn end_txn(&mut self, i: usize, outcome: TxnOutcome) {
        let (key, handle) = (self.txns[i].key.clone(), self.txns[i].handle);
        let result = self.end(&key, handle, outcome);
        self.log
            .push(format!("end {key} {handle} {outcome:?} -> {result:?}"));
        self.txns[i].ended_at = Some(self.crashes);
        let state = match result {
            Ok(o) if o == outcome => match outcome {
                TxnOutcome::Commit => State::Committed,
                TxnOutcome::Rollback => State::RolledBack,
            },
            Ok(other) => self.fail(format!("end {outcome:?} answered {other:?}")),
            Err(error) if is_store(&error) => State::Unsure,
            Err(DispatchError::Transaction(TxnError::Conflict { .. }))
                if outcome == TxnOutcome::Commit && !self.txns[i].acks.is_empty() =>
            {
                // One of its messages was acked plainly since: it stays
                // open, for a rollback.
                self.txns[i].ended_at = None;
                State::Open
            }
            Err(error) => self.fail(format!("end of an open transaction: {error}")),
        };
        self.set_state(i, state);
    }

    /// Records a transaction's new state; a commit's acks take effect.
    fn set_state(&mut self, i: usize, state: State) {
        if state == State::Committed && self.txns[i].state != State::Committed {
            for ack in self.txns[i].acks.clone() {
                if self.plain_acks.get(&ack) == Some(&self.crashes) {
                    self.fail(format!(
                        "{} {}: committed although {ack:?} was acked plainly since its TXN_ACK",
                        self.txns[i].key, self.txns[i].handle
                    ));
                }
                if !self.committed_acks.insert(ack.clone()) {
                    self.fail(format!(
                        "{} {}: {ack:?} acked by two committed transactions",
                        self.txns[i].key, self.txns[i].handle
                    ));
                }
            }
        }
        self.txns[i].state = state;
    }

    fn repeat_end(&mut self, i: usize, outcome: TxnOutcome) {
        let (key, handle, state) = (
            self.txns[i].key.clone(),
            self.txns[i].handle,
            self.txns[i].state,
        );
        // The newest transaction with this key: a settled one's outcome
        // is remembered while it is the key's last, until a restart.
        let newest = self.txns.iter().rposition(|t| t.key == key) == Some(i);
        let remembered = newest && self.txns[i].ended_at == Some(self.crashes);
        if state == State::Open {
            self.txns[i].ended_at = Some(self.crashes);
        }
        let result = self.end(&key, handle, outcome);
        self.log.push(format!(
            "repeat end {key} {handle} ({state:?}) {outcome:?} -> {result:?}"
        ));
        let ended = match outcome {
            TxnOutcome::Commit => State::Committed,
            TxnOutcome::Rollback => State::RolledBack,
        };
        let acks = !self.txns[i].acks.is_empty();
        match (state, &result) {
            (State::Open, Ok(_)) => self.set_state(i, ended),
            (State::Open, Err(e)) if is_store(e) => self.txns[i].state = State::Unsure,
            (
                State::Open | State::Unsure,
                Err(DispatchError::Transaction(TxnError::Conflict { .. })),
            ) if outcome == TxnOutcome::Commit && acks => {
                // Acked plainly since: refused, still open.
                if state == State::Open {
                    self.txns[i].ended_at = None;
                }
            }
            (State::Open, Err(e)) => self.fail(format!("end of an open transaction: {e}")),
            (s, Ok(o)) if s == ended && *o == outcome => {}
            (s, Err(DispatchError::Transaction(TxnError::Conflict { .. })))
                if s != ended && s != State::Unsure => {}
            (State::Unsure, Ok(_)) => self.set_state(i, ended),
            (State::Unsure, Err(_)) => {}
            (_, Err(DispatchError::Transaction(TxnError::Unknown(_)))) if !remembered => {}
            (_, Err(e)) if is_store(e) => {}
            (s, r) => self.fail(format!("repeated end of a {s:?} transaction: {r:?}")),
        }
    }

    fn deliver(&mut self) {
        let deliveries = match self.d().poll() {
            Ok(deliveries) => deliveries,
            Err(error) => self.fail(format!("poll: {error}")),
        };
        // What committed before this poll's deliveries were made (a
        // check-back answered below may commit a transaction acking one of
        // them: delivered before that commit, which is fine).
        let committed_before = self.committed_acks.clone();
        // Check-backs: only of transactions that may still be open; some
        // are answered (a commit or a rollback, like a listener's).
        for check in self.d().take_txn_checks() {
            let Some(i) = self.txns.iter().position(|t| t.handle == check.handle) else {
                self.fail(format!("a check of unknown handle {}", check.handle));
            };
            if !matches!(self.txns[i].state, State::Open | State::Unsure) {
                self.fail(format!(
                    "{} {} checked although {:?}",
                    self.txns[i].key, check.handle, self.txns[i].state
                ));
            }
            self.log.push(format!(
                "check {} {} #{}",
                check.id, check.handle, check.checks
            ));
            if self.txns[i].state == State::Open && self.rng.chance(40) {
                let outcome = if self.rng.chance(50) {
                    TxnOutcome::Commit
                } else {
                    TxnOutcome::Rollback
                };
                self.end_txn(i, outcome);
            }
        }
        for delivery in deliveries {
            let group = delivery.group.to_string();
            let id = delivery.record.id;
            if committed_before.contains(&(group.clone(), id)) {
                self.fail(format!(
                    "{id} delivered to {group} again after a committed transaction acked it"
                ));
            }
            self.delivered.entry(group.clone()).or_default().insert(id);
            let open: Vec<usize> = (0..self.txns.len())
                .filter(|&i| self.txns[i].state == State::Open)
                .collect();
            let roll = self.rng.below(100);
            if roll < 15 && !open.is_empty() {
                let i = *self.rng.pick(&open).unwrap();
                let position = (delivery.partition, delivery.record.offset);
                self.txn_ack(i, delivery.member, &group, id, position);
            } else if roll < 90 {
                let acked =
                    self.d()
                        .ack(delivery.member, delivery.partition, delivery.record.offset);
                if let Ok(true) = acked {
                    self.plain_acks.insert((group, id), self.crashes);
                }
            }
        }
    }

    /// Acks a delivered message in the open transaction `i`.
    fn txn_ack(&mut self, i: usize, member: u64, group: &str, id: MessageId, position: (u32, u64)) {
        let (key, handle) = (self.txns[i].key.clone(), self.txns[i].handle);
        let answered = common::answered(|reply| {
            self.d()
                .txn_ack(key.clone(), handle, member, vec![position], reply)
        });
        let result = answered.unwrap_or_else(|| self.fail("txn_ack did not answer".into()));
        self.log
            .push(format!("txn ack {key} {handle} {group} {id} -> {result:?}"));
        let ack = (group.to_string(), id);
        match result {
            Ok(produced) => {
                if produced.handle != handle {
                    self.fail(format!("ack into {handle} answered {}", produced.handle));
                }
                let holder = self.txns.iter().position(|t| {
                    t.handle != handle && t.state == State::Open && t.acks.contains(&ack)
                });
                if let Some(j) = holder {
                    self.fail(format!(
                        "{ack:?} acked by {handle} while open {} acks it",
                        self.txns[j].handle
                    ));
                }
                if self.committed_acks.contains(&ack) {
                    self.fail(format!("{ack:?} acked by {handle} after a committed ack"));
                }
                if !self.txns[i].acks.contains(&ack) {
                    self.txns[i].acks.push(ack);
                }
            }
            // Acked already or by another transaction; past the timeout; a
            // failed earlier produce; a full disk.
            Err(DispatchError::Transaction(TxnError::Conflict { .. } | TxnError::Limit { .. })) => {
            }
            Err(error) if is_store(&error) => {}
            Err(error) => self.fail(format!("txn ack: {error}")),
        }
    }

    fn crash(&mut self) {
        let open: BTreeMap<u64, (usize, usize)> = self
            .txns
            .iter()
            .filter(|t| t.state == State::Open)
            .map(|t| (t.handle, (t.records.len(), t.acks.len())))
            .collect();
        self.log.push("crash".into());
        self.crashes += 1;
        self.open();
        self.join();
        let listed: BTreeMap<u64, (usize, usize)> = self
            .d()
            .transactions()
            .into_iter()
            .map(|t| (t.handle, (t.records, t.acks)))
            .collect();
        for (handle, records) in &open {
            match listed.get(handle) {
                // A failed produce may still add records the model does not
                // count (none with the simulated full disk, which stores
                // nothing).
                Some(n) if n == records => {}
                other => self.fail(format!(
                    "open transaction {handle} with (records, acks) {records:?} is {other:?} after a crash"
                )),
            }
        }
    }

    /// Heals the disks, drains, and checks the end state.
    fn finish(&mut self) {
        if let Some(topic) = self.full.take() {
            self.storage.set_topic_full(topic, false);
        }
        for _ in 0..3 {
            self.clock.advance_ms(2_000);
            for _ in 0..5 {
                self.deliver();
            }
        }
        let storage: Arc<dyn Storage> = Arc::new(self.storage.clone());
        let logs: HashMap<&str, Vec<Arc<dyn PartitionLog>>> = TOPICS
            .iter()
            .map(|(topic, partitions, _)| {
                (
                    *topic,
                    (0..*partitions)
                        .map(|p| storage.partition(topic, p).unwrap())
                        .collect(),
                )
            })
            .collect();
        let mut in_topics: HashMap<MessageId, usize> = HashMap::new();
        for partitions in logs.values() {
            for log in partitions {
                for record in log.read(0, usize::MAX).unwrap() {
                    *in_topics.entry(record.id).or_default() += 1;
                }
            }
        }
        for txn in &self.txns {
            let stored: Vec<usize> = txn
                .records
                .iter()
                .map(|(_, id)| in_topics.get(id).copied().unwrap_or(0))
                .collect();
            if stored.iter().any(|&n| n > 1) {
                self.fail(format!(
                    "{} {}: a record stored twice: {stored:?}",
                    txn.key, txn.handle
                ));
            }
            let all = stored.iter().all(|&n| n == 1);
            let none = stored.iter().all(|&n| n == 0);
            let fine = match txn.state {
                State::Committed => all,
                State::RolledBack | State::Open => none,
                State::Unsure => all || none,
            };
            if !fine {
                self.fail(format!(
                    "{} {} ({:?}): records in topics {stored:?}",
                    txn.key, txn.handle, txn.state
                ));
            }
            if all && !txn.records.is_empty() {
                for (topic, id) in &txn.records {
                    let groups = TOPICS.iter().find(|t| t.0 == topic).unwrap().2;
                    for group in groups {
                        let got = self
                            .delivered
                            .get(*group)
                            .is_some_and(|ids| ids.contains(id));
                        if !got {
                            self.fail(format!(
                                "{} {}: {id} never delivered to {group}",
                                txn.key, txn.handle
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// A storage failure, however wrapped.
fn is_store(error: &DispatchError) -> bool {
    matches!(
        error,
        DispatchError::Store(_) | DispatchError::Transaction(TxnError::Store(_))
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn transaction_simulation() {
    let seeds: Vec<u64> = match env_u64("DMQ_TXN_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("DMQ_TXN_SIM_SEEDS").unwrap_or(1_000)).collect(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let mut sim = Sim::new(seed);
                let steps = 150 + sim.rng.below(150);
                for _ in 0..steps {
                    sim.step();
                }
                sim.finish();
                if std::env::var_os("DMQ_TXN_SIM_SHOW").is_some() {
                    sim.fail("shown on request".into());
                }
            });
        }
    });
}
