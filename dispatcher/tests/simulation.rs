//! Deterministic simulation of the dispatcher (in the spirit of TigerBeetle's
//! VOPR): the real [`Dispatcher`] over [`MemoryStorage`], a [`ManualClock`]
//! and a [`MemoryEventSink`], driven by a seeded PRNG, checked against a small
//! reference model after every step. One seed determines a whole run.
//!
//! - `DMQ_SIM_SEED=1234`: run only that seed (prints the trace on failure).
//! - `DMQ_SIM_SEEDS=N`: number of seeds (default 1000), starting at
//!   `DMQ_SIM_SEED_BASE` (default 0).
//!
//! What the model checks (see [`Sim::on_delivery`], [`Sim::final_checks`]):
//! 1. nothing is delivered before its deliver-at, at or after its expire-at,
//!    or while a tombstone covers it;
//! 2. nothing is delivered to a group (or broadcast member) after it acked it
//!    (consumer ack, or Expired / Deleted / DeadLettered), except after a
//!    crash for acks that were not yet durable (a checkpoint, or a poll at
//!    least `ack_sync_interval_ms` after the ack, makes them durable), or
//!    after a real seek;
//! 3. ordered topics: per (group, partition, key) one message in flight at a
//!    time and offsets in increasing order; a keyed batch produced without a
//!    partition lands on the key's partition;
//! 4. attempts count 1, 2, 3... per message and never exceed max_attempts;
//!    a dead letter happens exactly after max_attempts deliveries; across a
//!    restart a message's next attempt is at most one more than its last,
//!    and after a clean restart at least its last (failed attempts are in
//!    the ack journal; one in flight at the restart is not counted; a crash
//!    may lose the failures of the last sync interval);
//! 5. after a drain phase every log record reached every group (every
//!    broadcast member name) by a delivery or an Expired / Deleted /
//!    DeadLettered event whose reason is true; dead letters are in the
//!    dead-letter topic with the same id; every produced, not cancelled
//!    message reached its topic's log; after a final clean restart nothing is
//!    delivered again;
//! 6. `group_stats(..)[p].unacked <= max_unacked_per_partition`; the
//!    `delayed` counts of every topic's groups agree with each other and,
//!    summed over the topics, equal `pending_delays` (the clock never goes
//!    back here, so `delayed` is the delay store's count);
//! 7. deletions (offset range, id, time range, key) cover exactly what the
//!    model says (a bounded deletion only records stored when it was made):
//!    `count_covered` and `delete_counted` match the model's count and
//!    `is_deleted` matches it for every stored record.
//!
//! Plus two restart tests on a real disk ([`FileStorage`]): scattered acks
//! across a clean restart, and across a crash after a timed ack sync.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dmq_dispatcher::{
    Backoff, Delivery, DeliveryMode, DispatchError, Dispatcher, DispatcherConfig, EventKind,
    FileStorage, GroupConfig, MemberId, MemoryEventSink, MemoryStorage, PartitionLog,
    StartPosition, Storage, Tombstone, TopicConfig,
};
use dmq_log_store::{Clock, FsyncPolicy, LogConfig, ManualClock, MessageId, Record, RecordInput};

// ----- seeded randomness ------------------------------------------------------

mod common;
use common::Rng;

// ----- the reference model ----------------------------------------------------

/// A delivery state: a clustering group, or one member name of a broadcast group.
type StateName = (String, String, Option<String>);

struct TopicModel {
    name: String,
    partitions: u32,
    ordered: bool,
    /// Each deletion with its bound (the partitions' ends when it was made;
    /// `None` for a message id).
    tombstones: Vec<(Tombstone, Option<Vec<u64>>)>,
}

struct GroupModel {
    topic: String,
    name: String,
    config: GroupConfig,
    /// Broadcast member names that ever joined.
    names: BTreeSet<String>,
}

#[derive(Default)]
struct StateModel {
    /// (partition, offset) -> (ack time, durable).
    acked: HashMap<(u32, u64), (i64, bool)>,
    /// Ever delivered (for completeness).
    delivered: HashSet<(u32, u64)>,
    /// The last attempt seen per message in this seek epoch, and the
    /// incarnation (restarts so far) it was seen in.
    attempts: HashMap<(u32, u64), (u32, u64)>,
    /// Ordered topics: the unresolved delivered offset of each key.
    key_owner: HashMap<(u32, Bytes), u64>,
    /// Ordered topics: the last offset delivered of each key.
    key_last: HashMap<(u32, Bytes), u64>,
    /// Last real seek's floor per partition (0: never sought).
    seek_floor: HashMap<u32, u64>,
    /// Bumped on every seek and restart: older consumer actions are stale.
    epoch: u64,
}

impl StateModel {
    fn forget_partition(&mut self, partition: Option<u32>) {
        let keep = |p: u32| partition.is_some_and(|only| only != p);
        self.acked.retain(|(p, _), _| keep(*p));
        self.attempts.retain(|(p, _), _| keep(*p));
        self.key_owner.retain(|(p, _), _| keep(*p));
        self.key_last.retain(|(p, _), _| keep(*p));
        self.epoch += 1;
    }
}

#[derive(Clone, Copy, Debug)]
enum ActionKind {
    Ack,
    Nack(Option<u64>),
}

#[derive(Clone, Debug)]
struct Action {
    due_ms: i64,
    partition: u32,
    offset: u64,
    epoch: u64,
    kind: ActionKind,
}

struct MemberModel {
    id: MemberId,
    state: StateName,
    actions: Vec<Action>,
    /// Push credit granted and not used (flow control).
    credit: u64,
}

struct MessageModel {
    topic: String,
    partition: u32,
    delayed: bool,
    /// `cancel_delay` returned true; whether the id was already in the log.
    cancelled: Option<bool>,
}

#[derive(Clone, Debug, PartialEq)]
enum Skip {
    Expired,
    Deleted,
    DeadLettered(String),
}

#[derive(Clone, Debug)]
struct SkipEvent {
    time_ms: i64,
    id: MessageId,
    skip: Skip,
}

/// (partition, offset) -> skip events of one group.
type SkipsByPlace = HashMap<(u32, u64), Vec<SkipEvent>>;

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const BROADCAST_NAMES: [&str; 3] = ["a", "b", "c"];
const MESSAGES_MAX: usize = 220;

struct Sim {
    seed: u64,
    rng: Rng,
    clock: Arc<ManualClock>,
    storage: MemoryStorage,
    events: MemoryEventSink,
    config: DispatcherConfig,
    dispatcher: Dispatcher,
    topics: Vec<TopicModel>,
    groups: Vec<GroupModel>,
    states: BTreeMap<StateName, StateModel>,
    /// Broadcast states loaded in this incarnation (joined since the restart).
    loaded_broadcast: BTreeSet<StateName>,
    members: Vec<MemberModel>,
    messages: HashMap<MessageId, MessageModel>,
    produced_order: Vec<MessageId>,
    /// (topic, group) -> (partition, offset) -> skip events.
    skips: HashMap<(String, String), SkipsByPlace>,
    draining: bool,
    /// Deliver-at and expire-at times produced: the clock sometimes jumps
    /// exactly to one (off-by-one edges).
    boundaries: Vec<i64>,
    value_counter: u64,
    trace: VecDeque<String>,
    trace_max: usize,
    steps: usize,
    deliveries: u64,
    crashes: u64,
    /// `crashes` after the last restart that was not clean.
    last_unclean: u64,
}

fn check(condition: bool, message: impl FnOnce() -> String) {
    if !condition {
        panic!("INVARIANT VIOLATED: {}", message());
    }
}

fn open(
    storage: &MemoryStorage,
    clock: &Arc<ManualClock>,
    events: &MemoryEventSink,
    config: &DispatcherConfig,
) -> Dispatcher {
    Dispatcher::open(
        Arc::new(storage.clone()),
        clock.clone(),
        Arc::new(events.clone()),
        config.clone(),
    )
    .unwrap()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed ^ 0xD1CE_5EED_0000_0000);
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let storage = MemoryStorage::new(clock.clone());
        let events = MemoryEventSink::default();
        let config = DispatcherConfig {
            tick_ms: *rng.pick(&[1, 1, 5, 10]).unwrap(),
            ack_sync_interval_ms: rng.range(5, 300),
            read_batch_records: rng.range(1, 16) as usize,
            ack_journal_compact_bytes: rng.range(64, 4096),
            ..DispatcherConfig::default()
        };
        let dispatcher = open(&storage, &clock, &events, &config);
        Sim {
            seed,
            rng,
            clock,
            storage,
            events,
            config,
            dispatcher,
            topics: Vec::new(),
            groups: Vec::new(),
            states: BTreeMap::new(),
            loaded_broadcast: BTreeSet::new(),
            members: Vec::new(),
            messages: HashMap::new(),
            produced_order: Vec::new(),
            skips: HashMap::new(),
            draining: false,
            boundaries: Vec::new(),
            value_counter: 0,
            trace: VecDeque::new(),
            trace_max: 400,
            steps: 0,
            deliveries: 0,
            crashes: 0,
            last_unclean: 0,
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= self.trace_max {
            self.trace.pop_front();
        }
        let now = self.now();
        self.trace
            .push_back(format!("[step {} t={}] {line}", self.steps, now));
    }

    fn topic_model(&self, name: &str) -> &TopicModel {
        self.topics.iter().find(|t| t.name == name).unwrap()
    }

    fn group_model(&self, topic: &str, group: &str) -> &GroupModel {
        self.groups
            .iter()
            .find(|g| g.topic == topic && g.name == group)
            .unwrap()
    }

    // ----- the run ---------------------------------------------------------

    fn run(&mut self) {
        let topic_count = self.rng.range(1, 3);
        for i in 0..topic_count {
            self.create_topic(i);
        }
        for _ in 0..self.rng.range(1, 3) {
            self.subscribe();
        }
        let steps = self.rng.range(150, 300) as usize;
        for _ in 0..steps {
            self.steps += 1;
            self.step();
            self.process_actions();
            self.check_stats();
        }
        self.drain();
        self.final_checks();
    }

    fn step(&mut self) {
        let roll = self.rng.range(0, 999);
        match roll {
            0..=219 => self.produce(),
            220..=399 => self.poll(),
            400..=459 => self.fetch(),
            460..=549 => self.add_credit(),
            550..=699 => {
                let delta = self.rng.range(1, 200) as i64;
                self.log(format!("advance {delta}"));
                self.clock.advance_ms(delta);
            }
            700..=719 => {
                let delta = self.rng.range(1_000, 30_000) as i64;
                self.log(format!("advance {delta}"));
                self.clock.advance_ms(delta);
            }
            720..=739 => {
                let now = self.now();
                let ahead: Vec<i64> = self
                    .boundaries
                    .iter()
                    .filter(|&&t| t > now)
                    .copied()
                    .collect();
                if let Some(&to) = self.rng.pick(&ahead) {
                    let to = to - self.rng.range(0, 1) as i64;
                    self.log(format!("advance to boundary {}", to - now));
                    self.clock.set_ms(to.max(now));
                    self.poll();
                }
            }
            740..=799 => self.join(),
            800..=829 => self.leave(),
            830..=849 => self.subscribe(),
            850..=869 => self.seek(),
            870..=894 => self.delete(),
            895..=919 => self.cancel_delay(),
            920..=939 => self.checkpoint(),
            940..=954 => self.restart(false),
            955..=969 => self.restart(true),
            _ => self.poll(),
        }
    }

    // ----- operations --------------------------------------------------------

    fn create_topic(&mut self, index: u64) {
        let name = format!("t{index}");
        let config = TopicConfig {
            partitions: self.rng.range(1, 2) as u32,
            ordered: self.rng.chance(45),
        };
        self.log(format!("create_topic {name} {config:?}"));
        self.dispatcher.create_topic(&name, config.clone()).unwrap();
        self.topics.push(TopicModel {
            name,
            partitions: config.partitions,
            ordered: config.ordered,
            tombstones: Vec::new(),
        });
    }

    fn random_group_config(&mut self) -> GroupConfig {
        let backoff = if self.rng.chance(50) {
            let count = self.rng.range(1, 3);
            Backoff::Fixed {
                delays_ms: (0..count).map(|_| self.rng.range(0, 500)).collect(),
            }
        } else {
            Backoff::Exponential {
                initial_ms: self.rng.range(1, 200),
                max_ms: self.rng.range(100, 3_000),
            }
        };
        GroupConfig {
            mode: if self.rng.chance(20) {
                DeliveryMode::Broadcast
            } else {
                DeliveryMode::Clustering
            },
            start: StartPosition::Earliest,
            ack_timeout_ms: self.rng.range(20, 1_500),
            max_attempts: self.rng.range(1, 4) as u32,
            backoff,
            max_unacked_per_partition: self.rng.range(1, 8) as u32,
            rate_limit_per_second: if self.rng.chance(15) {
                Some(self.rng.range(2, 50) as u32)
            } else {
                None
            },
            dead_letter_topic: None,
        }
    }

    fn subscribe(&mut self) {
        let Some(topic) = self.rng.pick(&self.topics).map(|t| t.name.clone()) else {
            return;
        };
        let existing = self.groups.iter().filter(|g| g.topic == topic).count();
        if existing >= 3 {
            return;
        }
        let name = format!("g{existing}");
        let config = self.random_group_config();
        self.log(format!("subscribe {topic} {name} {config:?}"));
        self.dispatcher
            .subscribe(&topic, &name, config.clone())
            .unwrap();
        if config.mode == DeliveryMode::Clustering {
            self.states
                .entry((topic.clone(), name.clone(), None))
                .or_default();
        }
        self.groups.push(GroupModel {
            topic,
            name,
            config,
            names: BTreeSet::new(),
        });
    }

    fn produce(&mut self) {
        if self.messages.len() >= MESSAGES_MAX {
            return;
        }
        let Some(topic) = self.rng.pick(&self.topics) else {
            return;
        };
        let (name, partitions, ordered) = (topic.name.clone(), topic.partitions, topic.ordered);
        let now = self.now();
        let count = self.rng.range(1, 5);
        let mut records = Vec::new();
        for _ in 0..count {
            self.value_counter += 1;
            let mut record = RecordInput::new(format!("s{}-m{}", self.seed, self.value_counter));
            if (ordered && self.rng.chance(90)) || self.rng.chance(30) {
                record = record.with_key(*self.rng.pick(&KEYS).unwrap());
            }
            if self.rng.chance(20) {
                record.deliver_at_ms = Some(now + self.rng.range(1, 30_000) as i64);
            } else if self.rng.chance(5) {
                record.deliver_at_ms = Some(now - self.rng.range(0, 1_000) as i64);
            }
            if self.rng.chance(15) {
                record.expire_at_ms = Some(now + self.rng.range(1, 8_000) as i64);
            }
            self.boundaries
                .extend(record.deliver_at_ms.into_iter().chain(record.expire_at_ms));
            records.push(record);
        }
        let partition = if self.rng.chance(50) {
            None
        } else {
            Some(self.rng.range(0, u64::from(partitions) - 1) as u32)
        };
        let inputs = records.clone();
        let produced = self.dispatcher.produce(&name, partition, records).unwrap();
        check(produced.len() == inputs.len(), || {
            format!("produce returned {} of {}", produced.len(), inputs.len())
        });
        let mut line = format!("produce {name} p={partition:?}:");
        for (input, out) in inputs.iter().zip(&produced) {
            let delayed = input.deliver_at_ms.is_some_and(|due| due > now);
            check(delayed == out.offset.is_none(), || {
                format!("produce: delayed {delayed} but offset {:?}", out.offset)
            });
            if let Some(p) = partition {
                check(out.partition == p, || "produce: wrong partition".into());
            }
            // 3. Ordered topics: the same key always goes to the same partition.
            if let (true, None, Some(key)) = (ordered, partition, &input.key) {
                let expected = (dmq_log_store::key_hash(key) % u64::from(partitions)) as u32;
                check(out.partition == expected, || {
                    format!(
                        "ordered topic {name}: key {key:?} went to partition {} instead of its \
                         hash partition {expected}",
                        out.partition
                    )
                });
            }
            line += &format!(
                " [{} p{} o{:?} key={:?} at={:?} exp={:?}]",
                out.id,
                out.partition,
                out.offset,
                input.key,
                input.deliver_at_ms.map(|d| d - now),
                input.expire_at_ms.map(|e| e - now)
            );
            self.messages.insert(
                out.id,
                MessageModel {
                    topic: name.clone(),
                    partition: out.partition,
                    delayed,
                    cancelled: None,
                },
            );
            self.produced_order.push(out.id);
        }
        self.log(line);
        self.take_events();
    }

    fn poll(&mut self) {
        let deliveries = self.dispatcher.poll().unwrap();
        let now = self.now();
        let interval = self.config.ack_sync_interval_ms as i64;
        for state in self.states.values_mut() {
            for (time, durable) in state.acked.values_mut() {
                if *time + interval <= now {
                    *durable = true;
                }
            }
        }
        self.log(format!("poll -> {}", deliveries.len()));
        self.take_events_then(deliveries);
    }

    fn fetch(&mut self) {
        let Some(member) = self.rng.pick(&self.members).map(|m| m.id) else {
            return;
        };
        let max = self.rng.range(1, 5) as u32;
        let deliveries = self.dispatcher.fetch(member, max).unwrap();
        check(deliveries.len() <= max as usize, || "fetch over max".into());
        check(deliveries.iter().all(|d| d.member == member), || {
            "fetch returned another member's delivery".into()
        });
        self.log(format!("fetch m{member} {max} -> {}", deliveries.len()));
        // A fetch is its own credit; the member's push credit is untouched.
        let index = self.members.iter().position(|m| m.id == member).unwrap();
        let push_credit = self.members[index].credit;
        self.members[index].credit = deliveries.len() as u64;
        self.take_events_then(deliveries);
        self.members[index].credit = push_credit;
    }

    fn add_credit(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let index = self.rng.range(0, self.members.len() as u64 - 1) as usize;
        let member = self.members[index].id;
        let credit = self.rng.range(1, 10) as u32;
        self.log(format!("add_credit m{member} {credit}"));
        self.dispatcher.add_credit(member, credit).unwrap();
        self.members[index].credit += u64::from(credit);
    }

    fn join(&mut self) {
        let Some(index) = (!self.groups.is_empty())
            .then(|| self.rng.range(0, self.groups.len() as u64 - 1) as usize)
        else {
            return;
        };
        let (topic, group) = (
            self.groups[index].topic.clone(),
            self.groups[index].name.clone(),
        );
        let live = self
            .members
            .iter()
            .filter(|m| m.state.0 == topic && m.state.1 == group)
            .count();
        if live >= 3 {
            return;
        }
        let name = match self.groups[index].config.mode {
            DeliveryMode::Clustering => format!("c{}", self.rng.range(0, 99)),
            DeliveryMode::Broadcast => self.rng.pick(&BROADCAST_NAMES).unwrap().to_string(),
        };
        self.join_as(&topic, &group, &name);
        if self.rng.chance(70) {
            let member = self.members.last_mut().unwrap();
            let credit = self.rng.range(1, 8) as u32;
            member.credit += u64::from(credit);
            self.dispatcher.add_credit(member.id, credit).unwrap();
        }
    }

    fn join_as(&mut self, topic: &str, group: &str, name: &str) -> MemberId {
        let id = self.dispatcher.join(topic, group, name).unwrap();
        let mode = self.group_model(topic, group).config.mode;
        let state = match mode {
            DeliveryMode::Clustering => (topic.to_string(), group.to_string(), None),
            DeliveryMode::Broadcast => {
                let state = (topic.to_string(), group.to_string(), Some(name.to_string()));
                self.states.entry(state.clone()).or_default();
                self.loaded_broadcast.insert(state.clone());
                let index = self
                    .groups
                    .iter()
                    .position(|g| g.topic == topic && g.name == group)
                    .unwrap();
                self.groups[index].names.insert(name.to_string());
                state
            }
        };
        self.log(format!("join {topic} {group} {name} -> m{id}"));
        self.members.push(MemberModel {
            id,
            state,
            actions: Vec::new(),
            credit: 0,
        });
        id
    }

    fn leave(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let index = self.rng.range(0, self.members.len() as u64 - 1) as usize;
        let member = self.members.remove(index);
        self.log(format!("leave m{}", member.id));
        self.dispatcher.leave(member.id).unwrap();
        self.take_events();
    }

    fn seek(&mut self) {
        let Some(index) = (!self.groups.is_empty())
            .then(|| self.rng.range(0, self.groups.len() as u64 - 1) as usize)
        else {
            return;
        };
        let (topic, group, mode) = {
            let g = &self.groups[index];
            (g.topic.clone(), g.name.clone(), g.config.mode)
        };
        let partitions = self.topic_model(&topic).partitions;
        let partition = if self.rng.chance(50) {
            None
        } else {
            Some(self.rng.range(0, u64::from(partitions) - 1) as u32)
        };
        let now = self.now();
        let target = match self.rng.range(0, 3) {
            0 => StartPosition::Earliest,
            1 => StartPosition::Latest,
            2 => StartPosition::Timestamp(now - self.rng.range(0, 60_000) as i64),
            _ => StartPosition::Offset(self.rng.range(0, 30)),
        };
        let dry_run = self.rng.chance(40);
        let before = self.dispatcher.group_stats(&topic, &group).unwrap();
        let report = self
            .dispatcher
            .seek(&topic, &group, partition, target, dry_run)
            .unwrap();
        self.log(format!(
            "seek {topic} {group} p={partition:?} {target:?} dry={dry_run} -> {report:?}"
        ));
        if dry_run {
            let after = self.dispatcher.group_stats(&topic, &group).unwrap();
            check(before == after, || {
                format!("a dry-run seek changed the group: {before:?} -> {after:?}")
            });
            return;
        }
        let affected: Vec<StateName> = match mode {
            DeliveryMode::Clustering => vec![(topic.clone(), group.clone(), None)],
            DeliveryMode::Broadcast => self
                .loaded_broadcast
                .iter()
                .filter(|s| s.0 == topic && s.1 == group)
                .cloned()
                .collect(),
        };
        for name in affected {
            let state = self.states.get_mut(&name).unwrap();
            state.forget_partition(partition);
            for entry in &report {
                state.seek_floor.insert(entry.partition, entry.new_floor);
            }
        }
        self.take_events();
    }

    fn delete(&mut self) {
        let Some(topic) = self.rng.pick(&self.topics).map(|t| t.name.clone()) else {
            return;
        };
        let partitions = self.topic_model(&topic).partitions;
        let now = self.now();
        let tombstone = match self.rng.range(0, 3) {
            0 => {
                let partition = self.rng.range(0, u64::from(partitions) - 1) as u32;
                let end = self
                    .storage
                    .memory_log(&topic, partition)
                    .map_or(0, |log| log.end_offset());
                let start = self.rng.range(0, end + 1);
                Tombstone::OffsetRange {
                    partition,
                    start,
                    end: start + self.rng.range(1, 4),
                }
            }
            1 => {
                let ids: Vec<MessageId> = self
                    .produced_order
                    .iter()
                    .filter(|id| self.messages[*id].topic == topic)
                    .copied()
                    .collect();
                let Some(id) = self.rng.pick(&ids).copied() else {
                    return;
                };
                Tombstone::MessageId(id.to_string())
            }
            2 => {
                let start_ms = now - self.rng.range(0, 20_000) as i64;
                Tombstone::TimeRange {
                    start_ms,
                    // Now and then reaching into the future.
                    end_ms: start_ms + self.rng.range(1, 25_000) as i64,
                }
            }
            _ => Tombstone::Key(self.rng.pick(&KEYS).unwrap().as_bytes().to_vec()),
        };
        self.log(format!("delete {topic} {tombstone:?}"));
        let ends: Vec<u64> = (0..partitions)
            .map(|p| {
                self.storage
                    .memory_log(&topic, p)
                    .map_or(0, |log| log.end_offset())
            })
            .collect();
        let below = match tombstone {
            Tombstone::MessageId(_) => None,
            _ => Some(ends),
        };
        // 7. The count of newly covered records, per the model.
        let records = self.topic_records(&topic, partitions);
        let old = &self.topic_model(&topic).tombstones;
        let newly = |(p, r): &&(u32, Record)| {
            covers(&tombstone, below.as_deref(), *p, r)
                && !old.iter().any(|(t, b)| covers(t, b.as_deref(), *p, r))
        };
        let expected = match &tombstone {
            // Ids count messages, not copies (a delayed message may fire
            // twice around a crash): per partition, its first copy.
            Tombstone::MessageId(_) => (0..partitions)
                .filter(|&p| {
                    records
                        .iter()
                        .find(|(q, r)| *q == p && covers(&tombstone, None, p, r))
                        .is_some_and(|first| newly(&first))
                })
                .count() as u64,
            _ => records.iter().filter(newly).count() as u64,
        };
        let counted = self.dispatcher.count_covered(&topic, &tombstone).unwrap();
        check(counted == expected, || {
            format!("count_covered {tombstone:?}: {counted}, the model says {expected}")
        });
        if self.rng.chance(50) {
            let counted = self
                .dispatcher
                .delete_counted(&topic, tombstone.clone())
                .unwrap();
            check(counted == expected, || {
                format!("delete_counted {tombstone:?}: {counted}, the model says {expected}")
            });
        } else {
            self.dispatcher.delete(&topic, tombstone.clone()).unwrap();
        }
        let index = self.topics.iter().position(|t| t.name == topic).unwrap();
        self.topics[index].tombstones.push((tombstone, below));
        let model = &self.topic_model(&topic).tombstones;
        for (partition, record) in &records {
            let deleted = model
                .iter()
                .any(|(t, b)| covers(t, b.as_deref(), *partition, record));
            check(
                self.dispatcher.is_deleted(&topic, *partition, record) == deleted,
                || format!("is_deleted p{partition} {record:?}: the model says {deleted}"),
            );
        }
    }

    /// Every record stored in the topic's partitions, with its partition.
    fn topic_records(&self, topic: &str, partitions: u32) -> Vec<(u32, Record)> {
        (0..partitions)
            .flat_map(|p| {
                let records = self
                    .storage
                    .memory_log(topic, p)
                    .map(|log| log.read(0, usize::MAX).unwrap())
                    .unwrap_or_default();
                records.into_iter().map(move |r| (p, r))
            })
            .collect()
    }

    fn cancel_delay(&mut self) {
        let delayed: Vec<MessageId> = self
            .produced_order
            .iter()
            .filter(|id| self.messages[*id].delayed)
            .copied()
            .collect();
        let Some(id) = self.rng.pick(&delayed).copied() else {
            return;
        };
        let present = self.log_contains(&id);
        let cancelled = self.dispatcher.cancel_delay(&id).unwrap();
        self.log(format!(
            "cancel_delay {id} -> {cancelled} (in log: {present})"
        ));
        if cancelled {
            let message = self.messages.get_mut(&id).unwrap();
            message.cancelled.get_or_insert(present);
        }
        self.take_events();
    }

    fn log_contains(&self, id: &MessageId) -> bool {
        let message = &self.messages[id];
        self.storage
            .memory_log(&message.topic, message.partition)
            .is_some_and(|log| log.read(0, usize::MAX).unwrap().iter().any(|r| r.id == *id))
    }

    fn checkpoint(&mut self) {
        self.log("checkpoint".into());
        self.dispatcher.checkpoint().unwrap();
        self.mark_all_durable();
    }

    fn mark_all_durable(&mut self) {
        for state in self.states.values_mut() {
            for (_, durable) in state.acked.values_mut() {
                *durable = true;
            }
        }
    }

    /// A crash (drop without checkpoint) or a clean restart.
    fn restart(&mut self, clean: bool) {
        self.crashes += 1;
        if !clean {
            self.last_unclean = self.crashes;
        }
        if clean {
            self.dispatcher.checkpoint().unwrap();
            self.mark_all_durable();
        }
        self.log(format!("restart clean={clean}"));
        self.take_events();
        self.dispatcher = open(&self.storage, &self.clock, &self.events, &self.config);
        self.members.clear();
        self.loaded_broadcast.clear();
        for state in self.states.values_mut() {
            // Acks not yet durable may be lost: those messages may come again.
            state.acked.retain(|_, (_, durable)| *durable);
            state.key_owner.clear();
            state.key_last.clear();
            state.epoch += 1;
        }
        self.take_events();
    }

    // ----- consumers ---------------------------------------------------------

    fn process_actions(&mut self) {
        let now = self.now();
        let mut due = Vec::new();
        for member in &mut self.members {
            let (ready, later): (Vec<Action>, Vec<Action>) =
                member.actions.drain(..).partition(|a| a.due_ms <= now);
            member.actions = later;
            for action in ready {
                due.push((member.id, member.state.clone(), action));
            }
        }
        for (member, state_name, action) in due {
            self.perform(member, &state_name, &action);
        }
    }

    fn perform(&mut self, member: MemberId, state_name: &StateName, action: &Action) {
        let (partition, offset) = (action.partition, action.offset);
        let stale = self.states[state_name].epoch != action.epoch;
        match action.kind {
            ActionKind::Ack => {
                let result = self.dispatcher.ack(member, partition, offset);
                self.log(format!(
                    "ack m{member} p{partition} o{offset} stale={stale} -> {result:?}"
                ));
                match result {
                    Ok(newly) => {
                        let now = self.now();
                        let state = self.states.get_mut(state_name).unwrap();
                        if newly {
                            state.acked.insert((partition, offset), (now, false));
                        }
                        state
                            .key_owner
                            .retain(|(p, _), owner| !(*p == partition && *owner == offset));
                    }
                    Err(DispatchError::NotDelivered { .. }) if stale => {}
                    Err(error) => check(false, || {
                        format!("ack m{member} p{partition} o{offset} failed: {error}")
                    }),
                }
            }
            ActionKind::Nack(delay) => {
                let result = self.dispatcher.nack(member, partition, offset, delay);
                self.log(format!(
                    "nack m{member} p{partition} o{offset} {delay:?} stale={stale} -> {result:?}"
                ));
                match result {
                    Ok(()) => {}
                    Err(DispatchError::NotDelivered { .. }) if stale => {}
                    Err(error) => check(false, || {
                        format!("nack m{member} p{partition} o{offset} failed: {error}")
                    }),
                }
            }
        }
        self.take_events();
    }

    // ----- checks on every delivery and event ----------------------------------

    fn take_events_then(&mut self, deliveries: Vec<Delivery>) {
        // Events first: a skip or dead letter in the same call resolves keys.
        self.take_events();
        for delivery in deliveries {
            self.on_delivery(delivery);
        }
    }

    fn take_events(&mut self) {
        for event in self.events.take() {
            let skip = match &event.kind {
                EventKind::Expired => Skip::Expired,
                EventKind::Deleted => Skip::Deleted,
                EventKind::DeadLettered { dead_letter_topic } => {
                    Skip::DeadLettered(dead_letter_topic.clone())
                }
                _ => continue,
            };
            let (Some(group), Some(partition), Some(offset)) =
                (event.group.as_deref(), event.partition, event.offset)
            else {
                check(false, || format!("skip event without a place: {event:?}"));
                continue;
            };
            let group = &group.to_string();
            let event_topic = event.topic.to_string();
            self.log(format!(
                "event {skip:?} {} {group} p{partition} o{offset} {}",
                event.topic, event.message_id
            ));
            self.skips
                .entry((event_topic.clone(), group.clone()))
                .or_default()
                .entry((partition, offset))
                .or_default()
                .push(SkipEvent {
                    time_ms: event.time_ms,
                    id: event.message_id,
                    skip: skip.clone(),
                });
            let Some(group_model) = self
                .groups
                .iter()
                .find(|g| g.topic == event_topic && &g.name == group)
            else {
                check(false, || format!("event for an unknown group: {event:?}"));
                continue;
            };
            let (mode, max_attempts) = (group_model.config.mode, group_model.config.max_attempts);
            let names: Vec<StateName> = match mode {
                DeliveryMode::Clustering => vec![(event_topic.clone(), group.clone(), None)],
                DeliveryMode::Broadcast => self
                    .loaded_broadcast
                    .iter()
                    .filter(|s| s.0 == event_topic && &s.1 == group)
                    .cloned()
                    .collect(),
            };
            for name in names {
                let state = self.states.get_mut(&name).unwrap();
                state
                    .key_owner
                    .retain(|(p, _), owner| !(*p == partition && *owner == offset));
                if mode == DeliveryMode::Clustering {
                    if let Skip::DeadLettered(_) = skip {
                        let attempts = state
                            .attempts
                            .get(&(partition, offset))
                            .map(|&(attempt, _)| attempt);
                        check(attempts == Some(max_attempts.max(1)), || {
                            format!(
                                "{name:?} p{partition} o{offset} dead-lettered after {attempts:?} \
                                 attempts, max_attempts {max_attempts}"
                            )
                        });
                    }
                    state
                        .acked
                        .insert((partition, offset), (event.time_ms, false));
                }
            }
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        self.deliveries += 1;
        let now = self.now();
        let (partition, record) = (delivery.partition, &delivery.record);
        let offset = record.offset;
        self.log(format!(
            "deliver m{} {} {} p{partition} o{offset} attempt {} {} key={:?}",
            delivery.member,
            delivery.topic,
            delivery.group,
            delivery.attempt,
            record.id,
            record.key
        ));
        let Some(member_index) = self.members.iter().position(|m| m.id == delivery.member) else {
            check(false, || {
                format!("delivery to an unknown member: {delivery:?}")
            });
            return;
        };
        let state_name = self.members[member_index].state.clone();
        // Flow control: never more than the member's credit.
        check(self.members[member_index].credit > 0, || {
            format!(
                "delivery beyond the credit of m{}: {delivery:?}",
                delivery.member
            )
        });
        self.members[member_index].credit -= 1;
        check(
            *state_name.0 == *delivery.topic && *state_name.1 == *delivery.group,
            || format!("delivery to a member of another group: {delivery:?}"),
        );
        let config = self
            .group_model(&delivery.topic, &delivery.group)
            .config
            .clone();
        let topic = self.topic_model(&delivery.topic);
        let ordered = topic.ordered;
        // 1. Timing and deletion.
        check(record.deliver_at_ms.is_none_or(|due| due <= now), || {
            format!(
                "{state_name:?} got {} before its deliver-at: {record:?}",
                record.id
            )
        });
        check(
            record.expire_at_ms.is_none_or(|expire| now < expire),
            || {
                format!(
                    "{state_name:?} got {} after it expired: {record:?}",
                    record.id
                )
            },
        );
        check(
            !topic
                .tombstones
                .iter()
                .any(|(t, below)| covers(t, below.as_deref(), partition, record)),
            || {
                format!(
                    "{state_name:?} got deleted message {}: {record:?}",
                    record.id
                )
            },
        );
        let known = self.messages.get(&record.id);
        check(
            known.is_some_and(|m| *m.topic == *delivery.topic && m.partition == partition),
            || format!("delivered a message that was never produced there: {record:?}"),
        );
        let state = self.states.get_mut(&state_name).unwrap();
        // 2. Never after an ack.
        if let Some((time, durable)) = state.acked.get(&(partition, offset)) {
            check(false, || {
                format!(
                    "{state_name:?} got p{partition} o{offset} ({}) again although it was \
                     acked at {time} (durable {durable})",
                    record.id
                )
            });
        }
        // 4. Attempts.
        let (previous, seen_in) = state
            .attempts
            .get(&(partition, offset))
            .copied()
            .unwrap_or((0, self.crashes));
        let lowest = if seen_in == self.crashes {
            previous + 1
        } else if seen_in >= self.last_unclean {
            // Only clean restarts since: every failure was synced; the
            // attempt in flight then (if any) is not counted.
            previous.max(1)
        } else {
            1
        };
        check((lowest..=previous + 1).contains(&delivery.attempt), || {
            format!(
                "{state_name:?} p{partition} o{offset}: attempt {} after attempt {previous} \
                     (seen {} restarts ago, last crash {} restarts ago)",
                delivery.attempt,
                self.crashes - seen_in,
                self.crashes - self.last_unclean
            )
        });
        check(delivery.attempt <= config.max_attempts.max(1), || {
            format!(
                "{state_name:?} p{partition} o{offset}: attempt {} > max {}",
                delivery.attempt, config.max_attempts
            )
        });
        state
            .attempts
            .insert((partition, offset), (delivery.attempt, self.crashes));
        state.delivered.insert((partition, offset));
        // 3. Ordering per key.
        if let (true, Some(key)) = (ordered, &record.key) {
            let slot = (partition, key.clone());
            if let Some(&owner) = state.key_owner.get(&slot) {
                check(owner == offset, || {
                    format!(
                        "{state_name:?} key {key:?}: got o{offset} while o{owner} is still \
                         unacked"
                    )
                });
            }
            if let Some(&last) = state.key_last.get(&slot) {
                check(last <= offset, || {
                    format!("{state_name:?} key {key:?}: got o{offset} after o{last}")
                });
            }
            state.key_owner.insert(slot.clone(), offset);
            state.key_last.insert(slot, offset);
        }
        // The consumer decides what it will do with it.
        let epoch = state.epoch;
        let kind = if self.draining {
            Some(ActionKind::Ack)
        } else {
            match self.rng.range(0, 99) {
                0..=74 => Some(ActionKind::Ack),
                75..=84 => Some(ActionKind::Nack(if self.rng.chance(50) {
                    None
                } else {
                    Some(self.rng.range(0, 600))
                })),
                _ => None, // dropped: never acked, times out
            }
        };
        if let Some(kind) = kind {
            let delay = if self.draining {
                0
            } else {
                self.rng.range(0, 2 * config.ack_timeout_ms) as i64
            };
            self.members[member_index].actions.push(Action {
                due_ms: now + delay,
                partition,
                offset,
                epoch,
                kind,
            });
        }
    }

    /// 6. Memory bound per partition.
    fn check_stats(&mut self) {
        // topic -> `delayed` per partition, from the first group whose state
        // is loaded (every group of a topic must report the same).
        let mut delayed: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for group in &self.groups {
            let stats = self
                .dispatcher
                .group_stats(&group.topic, &group.name)
                .unwrap();
            if !stats.is_empty() {
                let counts: Vec<u64> = stats.iter().map(|s| s.delayed).collect();
                let first = delayed
                    .entry(&group.topic)
                    .or_insert_with(|| counts.clone());
                check(*first == counts, || {
                    format!(
                        "{} {}: delayed {counts:?}, another group says {first:?}",
                        group.topic, group.name
                    )
                });
            }
            for s in stats {
                check(
                    s.unacked <= u64::from(group.config.max_unacked_per_partition),
                    || {
                        format!(
                            "{} {} p{}: {} unacked > max {}",
                            group.topic,
                            group.name,
                            s.partition,
                            s.unacked,
                            group.config.max_unacked_per_partition
                        )
                    },
                );
                check(s.in_flight <= s.unacked, || format!("stats {s:?}"));
            }
        }
        if self
            .topics
            .iter()
            .all(|t| delayed.contains_key(t.name.as_str()))
        {
            let total: u64 = delayed.values().flatten().sum();
            let pending = self.dispatcher.pending_delays();
            check(total == pending, || {
                format!("delayed per partition {delayed:?} sum to {total}, {pending} pending")
            });
        }
    }

    // ----- drain and final checks ----------------------------------------------

    fn ensure_drain_members(&mut self) {
        let groups: Vec<(String, String, DeliveryMode, Vec<String>)> = self
            .groups
            .iter()
            .map(|g| {
                (
                    g.topic.clone(),
                    g.name.clone(),
                    g.config.mode,
                    g.names.iter().cloned().collect(),
                )
            })
            .collect();
        for (topic, group, mode, names) in groups {
            let wanted: Vec<StateName> = match mode {
                DeliveryMode::Clustering => vec![(topic.clone(), group.clone(), None)],
                DeliveryMode::Broadcast => names
                    .iter()
                    .map(|n| (topic.clone(), group.clone(), Some(n.clone())))
                    .collect(),
            };
            for state in wanted {
                if !self.members.iter().any(|m| m.state == state) {
                    let name = state.2.clone().unwrap_or_else(|| "drain".into());
                    self.join_as(&topic, &group, &name);
                }
            }
        }
        for member in &mut self.members {
            self.dispatcher.add_credit(member.id, 1_000_000).unwrap();
            member.credit += 1_000_000;
        }
    }

    fn drain(&mut self) {
        self.draining = true;
        self.log("drain".into());
        self.ensure_drain_members();
        let started = self.now();
        // Done once everything reached every group and then two quiet periods,
        // each longer than any ack timeout plus backoff, delivered nothing
        // (messages dropped in the workload are still in flight at first).
        let mut quiet_periods = 0;
        for _ in 0..20_000 {
            self.process_actions();
            let deliveries = self.dispatcher.poll().unwrap();
            let count = deliveries.len();
            self.mark_all_durable_by_time();
            self.take_events_then(deliveries);
            self.process_actions();
            self.check_stats();
            if count > 0 {
                quiet_periods = 0;
                continue;
            }
            let now = self.now();
            if self.dispatcher.pending_delays() == 0 && self.missing().is_empty() {
                if quiet_periods == 2 {
                    break;
                }
                quiet_periods += 1;
                self.clock.set_ms(now + 30_000);
                continue;
            }
            let next = self
                .dispatcher
                .next_wakeup_ms()
                .filter(|&t| t > now)
                .unwrap_or(now + 100)
                .min(now + 60_000);
            self.clock.set_ms(next);
            check(self.now() - started < 7 * 86_400_000, || {
                "the drain did not converge in a simulated week".into()
            });
        }
    }

    fn mark_all_durable_by_time(&mut self) {
        let now = self.now();
        let interval = self.config.ack_sync_interval_ms as i64;
        for state in self.states.values_mut() {
            for (time, durable) in state.acked.values_mut() {
                if *time + interval <= now {
                    *durable = true;
                }
            }
        }
    }

    /// Log records of user topics that some state has neither received nor
    /// skipped with an event.
    fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for group in &self.groups {
            let topic = self.topic_model(&group.topic);
            let names: Vec<StateName> = match group.config.mode {
                DeliveryMode::Clustering => vec![(group.topic.clone(), group.name.clone(), None)],
                DeliveryMode::Broadcast => group
                    .names
                    .iter()
                    .map(|n| (group.topic.clone(), group.name.clone(), Some(n.clone())))
                    .collect(),
            };
            let skips = self.skips.get(&(group.topic.clone(), group.name.clone()));
            for partition in 0..topic.partitions {
                let Some(log) = self.storage.memory_log(&topic.name, partition) else {
                    continue;
                };
                let records = log.read(0, usize::MAX).unwrap();
                for name in &names {
                    let state = &self.states[name];
                    let floor = state.seek_floor.get(&partition).copied().unwrap_or(0);
                    for record in records.iter().filter(|r| r.offset >= floor) {
                        let place = (partition, record.offset);
                        if state.delivered.contains(&place)
                            || skips.is_some_and(|s| s.contains_key(&place))
                        {
                            continue;
                        }
                        missing.push(format!(
                            "{name:?} p{partition} o{} {}",
                            record.offset, record.id
                        ));
                    }
                }
            }
        }
        missing
    }

    fn final_checks(&mut self) {
        // 5. Everything reached every group.
        let missing = self.missing();
        check(missing.is_empty(), || {
            format!(
                "after the drain {} log records never reached their group: {:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            )
        });
        check(self.dispatcher.pending_delays() == 0, || {
            format!("{} delays still pending", self.dispatcher.pending_delays())
        });
        // Every produced, not cancelled message reached its topic's log;
        // cancelled ones that were not there never did.
        let mut in_log: HashMap<MessageId, usize> = HashMap::new();
        let mut records_by_place: HashMap<(String, u32, u64), Record> = HashMap::new();
        for topic in &self.topics {
            for partition in 0..topic.partitions {
                let Some(log) = self.storage.memory_log(&topic.name, partition) else {
                    continue;
                };
                for record in log.read(0, usize::MAX).unwrap() {
                    *in_log.entry(record.id).or_default() += 1;
                    records_by_place.insert((topic.name.clone(), partition, record.offset), record);
                }
            }
        }
        for id in &self.produced_order {
            let message = &self.messages[id];
            match message.cancelled {
                None => check(in_log.contains_key(id), || {
                    format!("produced message {id} never reached {}", message.topic)
                }),
                Some(false) => check(!in_log.contains_key(id), || {
                    format!("cancelled delay {id} was appended to {}", message.topic)
                }),
                Some(true) => {}
            }
            if !message.delayed {
                check(in_log.get(id) == Some(&1), || {
                    format!("message {id} is {:?} times in its log", in_log.get(id))
                });
            }
        }
        // Skip events tell the truth.
        for ((topic, group), places) in &self.skips {
            let tombstones = &self.topic_model(topic).tombstones;
            for (&(partition, offset), events) in places {
                let record = records_by_place.get(&(topic.clone(), partition, offset));
                let Some(record) = record else {
                    check(false, || {
                        format!("skip event for a missing record {topic} p{partition} o{offset}")
                    });
                    continue;
                };
                for event in events {
                    check(event.id == record.id, || {
                        format!(
                            "{group} {topic} p{partition} o{offset}: event id {} != record {}",
                            event.id, record.id
                        )
                    });
                    match &event.skip {
                        Skip::Expired => check(
                            record.expire_at_ms.is_some_and(|e| e <= event.time_ms),
                            || format!("{group}: Expired event for a live record {record:?}"),
                        ),
                        Skip::Deleted => check(
                            tombstones
                                .iter()
                                .any(|(t, below)| covers(t, below.as_deref(), partition, record)),
                            || format!("{group}: Deleted event for an undeleted record {record:?}"),
                        ),
                        Skip::DeadLettered(dead_letter_topic) => {
                            check(*dead_letter_topic == format!("{topic}.{group}.dlq"), || {
                                format!("dead-letter topic {dead_letter_topic}")
                            });
                            let dlq = self.storage.memory_log(dead_letter_topic, 0);
                            check(
                                dlq.is_some_and(|log| {
                                    log.read(0, usize::MAX)
                                        .unwrap()
                                        .iter()
                                        .any(|r| r.id == record.id)
                                }),
                                || format!("dead letter {} not in {dead_letter_topic}", record.id),
                            );
                        }
                    }
                }
            }
        }
        // After a clean restart nothing comes again: every ack was durable.
        self.restart(true);
        self.ensure_drain_members();
        let again = self.dispatcher.poll().unwrap();
        check(again.is_empty(), || {
            format!(
                "after the drain and a clean restart {} deliveries came again: {:?}",
                again.len(),
                again
                    .iter()
                    .take(5)
                    .map(|d| (&d.topic, &d.group, d.partition, d.record.offset))
                    .collect::<Vec<_>>()
            )
        });
        for group in &self.groups {
            if group.config.mode == DeliveryMode::Clustering {
                for s in self
                    .dispatcher
                    .group_stats(&group.topic, &group.name)
                    .unwrap()
                {
                    check(s.lag == 0 && s.unacked == 0, || {
                        format!("{} {}: after the drain {s:?}", group.topic, group.name)
                    });
                }
            }
        }
    }
}

/// The model of a deletion: `below` bounds offsets per partition (the
/// partitions' ends when it was made).
fn covers(tombstone: &Tombstone, below: Option<&[u64]>, partition: u32, record: &Record) -> bool {
    let stored_then = below.is_none_or(|below| record.offset < below[partition as usize]);
    stored_then
        && match tombstone {
            Tombstone::OffsetRange {
                partition: p,
                start,
                end,
            } => *p == partition && (*start..*end).contains(&record.offset),
            Tombstone::MessageId(text) => text.parse::<MessageId>().is_ok_and(|id| id == record.id),
            Tombstone::TimeRange { start_ms, end_ms } => {
                (*start_ms..*end_ms).contains(&record.timestamp_ms)
            }
            Tombstone::Key(key) => record.key.as_deref() == Some(key.as_slice()),
        }
}

// ----- the test ------------------------------------------------------------------

struct Outcome {
    seed: u64,
    failure: Option<String>,
    trace: Vec<String>,
    steps: usize,
    deliveries: u64,
    crashes: u64,
    messages: usize,
}

fn run_seed(seed: u64, trace_max: usize) -> Outcome {
    let mut sim = Sim::new(seed);
    sim.trace_max = trace_max;
    let result = catch_unwind(AssertUnwindSafe(|| sim.run()));
    let failure = result.err().map(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    });
    Outcome {
        seed,
        failure,
        trace: sim.trace.into_iter().collect(),
        steps: sim.steps,
        deliveries: sim.deliveries,
        crashes: sim.crashes,
        messages: sim.messages.len(),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn simulation() {
    let (seeds, single): (Vec<u64>, bool) = match env_u64("DMQ_SIM_SEED") {
        Some(seed) => (vec![seed], true),
        None => {
            let count = env_u64("DMQ_SIM_SEEDS").unwrap_or(1_000);
            let base = env_u64("DMQ_SIM_SEED_BASE").unwrap_or(0);
            ((base..base + count).collect(), false)
        }
    };
    let began = Instant::now();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&seed) = seeds.get(i) else { break };
                        let outcome = run_seed(seed, if single { usize::MAX } else { 400 });
                        let failed = outcome.failure.is_some();
                        mine.push(outcome);
                        if failed {
                            // Stop early: one failure is enough to report.
                            next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let (steps, deliveries, crashes, messages) = outcomes.iter().fold((0, 0, 0, 0), |acc, o| {
        (
            acc.0 + o.steps,
            acc.1 + o.deliveries,
            acc.2 + o.crashes,
            acc.3 + o.messages,
        )
    });
    println!(
        "simulation: {} seeds, {steps} steps, {messages} messages, {deliveries} deliveries, \
         {crashes} restarts in {:.1?}",
        outcomes.len(),
        began.elapsed()
    );
    let mut failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    failures.sort_by_key(|o| o.seed);
    if let Some(first) = failures.first() {
        if single {
            for line in &first.trace {
                println!("{line}");
            }
        } else {
            for line in first.trace.iter().rev().take(40).rev() {
                println!("{line}");
            }
        }
        panic!(
            "seed {} failed: {}\nrepro: DMQ_SIM_SEED={} cargo test -p dmq-dispatcher --test \
             simulation simulation -- --nocapture",
            first.seed,
            first.failure.as_deref().unwrap_or(""),
            first.seed
        );
    }
}

// ----- scenarios found by the simulation ------------------------------------------

/// Found by seed 0: `produce(topic, None, batch)` put the whole batch on the
/// first record's key partition, so one key could end up on two partitions
/// of an ordered topic (and be processed by two members at once).
#[test]
fn a_keyed_batch_without_partition_puts_each_key_on_its_partition() {
    let clock = Arc::new(ManualClock::new(1_000));
    let storage = MemoryStorage::new(clock.clone());
    let events = MemoryEventSink::default();
    let mut dispatcher = open(&storage, &clock, &events, &DispatcherConfig::default());
    let config = TopicConfig {
        partitions: 2,
        ordered: true,
    };
    dispatcher.create_topic("o", config).unwrap();
    let home = |key: &str| (dmq_log_store::key_hash(key.as_bytes()) % 2) as u32;
    let (first, other) = KEYS
        .iter()
        .flat_map(|a| KEYS.iter().map(move |b| (*a, *b)))
        .find(|(a, b)| home(a) != home(b))
        .unwrap();
    let now = clock.now_ms();
    let records = [first, other, other]
        .iter()
        .enumerate()
        .map(|(i, key)| RecordInput {
            deliver_at_ms: (i == 2).then_some(now + 100),
            ..RecordInput::new("v").with_key(*key)
        })
        .collect();
    let produced = dispatcher.produce("o", None, records).unwrap();
    let partitions: Vec<u32> = produced.iter().map(|p| p.partition).collect();
    assert_eq!(partitions, vec![home(first), home(other), home(other)]);
    assert_eq!(produced[0].offset, Some(0));
    assert_eq!(
        produced[1].offset,
        Some(0),
        "first record of the other partition"
    );
    assert_eq!(produced[2].offset, None, "delayed");
}

/// Found by seed 3238: an ack of a message that is held behind its key (here
/// a consumer's ack from before a seek) removed it from the pending set but
/// left it in the key's hold queue; when the key was released it became the
/// owner of a key nothing would ever release again, and every later message
/// of the key (then the whole partition, at the unacked cap) was stuck.
#[test]
fn acking_a_held_message_does_not_block_its_key() {
    let clock = Arc::new(ManualClock::new(1_000));
    let storage = MemoryStorage::new(clock.clone());
    let events = MemoryEventSink::default();
    let mut dispatcher = open(&storage, &clock, &events, &DispatcherConfig::default());
    let config = TopicConfig {
        partitions: 1,
        ordered: true,
    };
    dispatcher.create_topic("o", config).unwrap();
    dispatcher
        .subscribe("o", "g", GroupConfig::default())
        .unwrap();
    let member = dispatcher.join("o", "g", "m").unwrap();
    let records = (0..3)
        .map(|i| RecordInput::new(format!("v{i}")).with_key("k"))
        .collect();
    dispatcher.produce("o", Some(0), records).unwrap();
    let offsets = |deliveries: Vec<Delivery>| -> Vec<u64> {
        deliveries.iter().map(|d| d.record.offset).collect()
    };
    assert_eq!(offsets(dispatcher.fetch(member, 10).unwrap()), vec![0]);
    assert!(dispatcher.ack(member, 0, 0).unwrap());
    assert_eq!(offsets(dispatcher.fetch(member, 10).unwrap()), vec![1]);
    // Replay; offset 1 is now held behind offset 0.
    dispatcher
        .seek("o", "g", None, StartPosition::Earliest, false)
        .unwrap();
    assert_eq!(offsets(dispatcher.fetch(member, 10).unwrap()), vec![0]);
    // The consumer finishes its pre-seek work on offset 1.
    assert!(dispatcher.ack(member, 0, 1).unwrap());
    assert!(dispatcher.ack(member, 0, 0).unwrap());
    assert_eq!(
        offsets(dispatcher.fetch(member, 10).unwrap()),
        vec![2],
        "the key must move on to its next message"
    );
}

// ----- restarts on a real disk ------------------------------------------------------

fn disk_storage(dir: &std::path::Path) -> Arc<dyn Storage> {
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        segment_bytes_max: 64 << 20,
        ..LogConfig::default()
    };
    Arc::new(FileStorage::new(dir, config).unwrap())
}

fn open_disk(storage: &Arc<dyn Storage>, clock: &Arc<ManualClock>) -> Dispatcher {
    Dispatcher::open(
        Arc::clone(storage),
        clock.clone(),
        Arc::new(MemoryEventSink::default()),
        DispatcherConfig::default(),
    )
    .unwrap()
}

/// About half of the offsets, scattered (a hash decides).
fn scattered(offset: u64) -> bool {
    Rng(offset.wrapping_mul(0x2545_F491_4F6C_DD1D)).next() & 1 == 0
}

fn disk_group_config(count: u64) -> GroupConfig {
    GroupConfig {
        ack_timeout_ms: 86_400_000,
        max_unacked_per_partition: count as u32,
        ..GroupConfig::default()
    }
}

/// Produces `count` records to `t` and has one member of `g` fetch them all;
/// returns the member.
fn produce_and_fetch_all(dispatcher: &mut Dispatcher, count: u64) -> (MemberId, Vec<u64>) {
    let topic = TopicConfig {
        partitions: 1,
        ordered: false,
    };
    dispatcher.create_topic("t", topic).unwrap();
    dispatcher
        .subscribe("t", "g", disk_group_config(count))
        .unwrap();
    let mut produced = 0;
    while produced < count {
        let batch = (count - produced).min(10_000);
        let records = (0..batch).map(|_| RecordInput::new("x")).collect();
        dispatcher.produce("t", Some(0), records).unwrap();
        produced += batch;
    }
    let member = dispatcher.join("t", "g", "m").unwrap();
    let mut offsets = Vec::with_capacity(count as usize);
    while (offsets.len() as u64) < count {
        let got = dispatcher.fetch(member, 10_000).unwrap();
        assert!(!got.is_empty(), "stalled at {}", offsets.len());
        offsets.extend(got.iter().map(|d| d.record.offset));
    }
    (member, offsets)
}

fn fetch_everything(dispatcher: &mut Dispatcher, member: MemberId) -> Vec<u64> {
    let mut offsets = Vec::new();
    loop {
        let got = dispatcher.fetch(member, 10_000).unwrap();
        if got.is_empty() {
            return offsets;
        }
        offsets.extend(got.iter().map(|d| d.record.offset));
    }
}

/// 1M scattered acks with `DMQ_LONG_TESTS` set, 100k otherwise (debug speed).
#[test]
fn scattered_acks_survive_a_clean_restart_on_disk() {
    let count: u64 = if std::env::var_os("DMQ_LONG_TESTS").is_some() {
        1_000_000
    } else {
        100_000
    };
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let storage = disk_storage(dir.path());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut dispatcher = open_disk(&storage, &clock);
    let (member, offsets) = produce_and_fetch_all(&mut dispatcher, count);
    assert_eq!(offsets, (0..count).collect::<Vec<_>>());
    for (i, &offset) in offsets.iter().enumerate() {
        if scattered(offset) {
            assert!(dispatcher.ack(member, 0, offset).unwrap());
        }
        if i % 10_000 == 0 {
            // The timed ack sync (and journal compaction) runs from poll.
            clock.advance_ms(100);
            dispatcher.poll().unwrap();
        }
    }
    dispatcher.checkpoint().unwrap();
    drop(dispatcher);
    let journal = dir.path().join("dispatcher/group.t.g.journal");
    let journal_bytes = std::fs::metadata(&journal).unwrap().len();

    let mut dispatcher = open_disk(&storage, &clock);
    let member = dispatcher.join("t", "g", "m").unwrap();
    let again = fetch_everything(&mut dispatcher, member);
    let expected: Vec<u64> = (0..count).filter(|&o| !scattered(o)).collect();
    let acked = count - expected.len() as u64;
    assert_eq!(again.len(), expected.len(), "redelivered count");
    assert!(again == expected, "exactly the unacked offsets come back");
    println!(
        "{count} messages, {acked} scattered acks: ack journal {journal_bytes} bytes on disk \
         ({:.2} bytes per message); {} redelivered after the restart; {:.1?}",
        journal_bytes as f64 / count as f64,
        again.len(),
        began.elapsed()
    );
    // Deltas (12 bytes per ack) until the journal passes the compaction
    // threshold, then a bitmap snapshot plus the deltas since.
    let bound = DispatcherConfig::default().ack_journal_compact_bytes + 12 * 10_000 + 4096;
    assert!(journal_bytes <= bound, "{journal_bytes} > {bound}");
}

/// A crash (no checkpoint): acks synced by the timed sync survive, acks made
/// since are lost and those messages come back; nothing synced comes back.
#[test]
fn timed_ack_sync_survives_a_crash_on_disk() {
    let count = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let storage = disk_storage(dir.path());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut dispatcher = open_disk(&storage, &clock);
    let (member, offsets) = produce_and_fetch_all(&mut dispatcher, count);
    let half = offsets.len() / 2;
    for &offset in offsets[..half].iter().filter(|&&o| scattered(o)) {
        dispatcher.ack(member, 0, offset).unwrap();
    }
    clock.advance_ms(DispatcherConfig::default().ack_sync_interval_ms as i64);
    dispatcher.poll().unwrap(); // syncs the first half's acks
    for &offset in offsets[half..].iter().filter(|&&o| scattered(o)) {
        dispatcher.ack(member, 0, offset).unwrap();
    }
    drop(dispatcher); // crash: the second half's acks were never synced

    let mut dispatcher = open_disk(&storage, &clock);
    let member = dispatcher.join("t", "g", "m").unwrap();
    let again = fetch_everything(&mut dispatcher, member);
    let expected: Vec<u64> = offsets
        .iter()
        .enumerate()
        .filter(|&(i, &o)| i >= half || !scattered(o))
        .map(|(_, &o)| o)
        .collect();
    assert!(
        again == expected,
        "synced acks hold, unsynced ones come back"
    );
}

/// Found by seed 15: after a restart the ack bitmap holds acks above the
/// floor that the cursor has not passed yet; acking the floor moves the floor
/// past the cursor, and `cursor - floor` (the span check in the cursor)
/// underflowed: a panic in debug, a partition stalled forever in release.
#[test]
fn the_ack_floor_may_pass_the_cursor_after_a_restart() {
    let clock = Arc::new(ManualClock::new(1_000));
    let storage = MemoryStorage::new(clock.clone());
    let events = MemoryEventSink::default();
    let config = DispatcherConfig::default();
    let mut dispatcher = open(&storage, &clock, &events, &config);
    let topic = TopicConfig {
        partitions: 1,
        ordered: false,
    };
    dispatcher.create_topic("t", topic).unwrap();
    dispatcher
        .subscribe("t", "g", GroupConfig::default())
        .unwrap();
    let member = dispatcher.join("t", "g", "m").unwrap();
    let records = (0..4).map(|i| RecordInput::new(format!("v{i}"))).collect();
    dispatcher.produce("t", Some(0), records).unwrap();
    assert_eq!(dispatcher.fetch(member, 10).unwrap().len(), 4);
    dispatcher.ack(member, 0, 2).unwrap();
    dispatcher.ack(member, 0, 3).unwrap();
    dispatcher.checkpoint().unwrap();
    let mut dispatcher = open(&storage, &clock, &events, &config);
    let member = dispatcher.join("t", "g", "m").unwrap();
    for offset in [0, 1] {
        let got = dispatcher.fetch(member, 1).unwrap();
        assert_eq!(got[0].record.offset, offset);
        dispatcher.ack(member, 0, offset).unwrap();
    }
    // Floor 4, cursor 2.
    dispatcher
        .produce("t", Some(0), vec![RecordInput::new("v4")])
        .unwrap();
    let got = dispatcher.fetch(member, 10).unwrap();
    assert_eq!(
        got.iter().map(|d| d.record.offset).collect::<Vec<_>>(),
        vec![4]
    );
}
