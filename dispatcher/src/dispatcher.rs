//! The [`Dispatcher`]: topics, consumer groups and members, and the pump that
//! turns log records into deliveries.
//!
//! The dispatcher is a single-threaded state machine: every call takes the
//! time from the injected clock and changes state synchronously, so a seeded
//! simulation reproduces any run. The broker owns it behind one lock (or one
//! task) and calls [`Dispatcher::poll`] when something may have changed
//! (a produce, a credit, an ack) or at [`Dispatcher::next_wakeup_ms`].
//!
//! # The life of a message, per group
//! 1. The group's cursor reads it from the partition log. Acked ones (after a
//!    restart) are skipped; deleted or expired ones are acked with an event;
//!    one whose deliver-at is still ahead waits in the timing wheel; on an
//!    ordered topic one whose key is busy is held.
//! 2. It is delivered to a member with credit (round robin), with an ack
//!    deadline in the timing wheel.
//! 3. An ACK sets its bit in the group's [`crate::AckBitmap`]. A NACK, a
//!    missed deadline or the member leaving schedules a redelivery after the
//!    group's backoff (the member leaving: at once); after `max_attempts` it
//!    goes to the dead-letter topic and is acked.
//!
//! Memory is bounded by configuration: per partition at most
//! `max_unacked_per_partition` pending messages and one read batch.
//!
//! # Queries and deletion (for the admin API)
//! [`Dispatcher::find_message`], [`Dispatcher::message_states`],
//! [`Dispatcher::is_deleted`] and [`Dispatcher::dead_letter_topics`] read
//! state without changing it. [`Dispatcher::delete`] records a
//! [`Tombstone`] durably before it returns; [`Dispatcher::count_covered`]
//! (a dry run) and [`Dispatcher::delete_counted`] count exactly the stored
//! records it covers that no earlier deletion did. A deletion covers only
//! records stored when it is made (offset ranges, time ranges and keys are
//! bounded by every partition's end offset at that time), except a message
//! id, which also covers a delayed message with that id appended later.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{Clock, MessageId, Record, RecordInput};
use serde::{Deserialize, Serialize};

use crate::ack_bitmap::AckBitmap;
use crate::config::{DeliveryMode, DispatcherConfig, GroupConfig, StartPosition, TopicConfig};
use crate::delay_store::{DelayConfig, DelayError, DelayStore, DueMessage};
use crate::events::{Event, EventKind, EventSink};
use crate::group::{
    AckJournalError, GroupState, MemberId, PartitionState, Pending, Stage, StateKey,
};
use crate::names::{self, NameError};
use crate::routing::Router;
use crate::storage::{Journal, PartitionLog, RecoveryDamage, Storage, StoreError};
use crate::timing_wheel::TimingWheel;
use crate::tombstones::{CountPlan, Tombstones};

/// Errors returned to the dispatcher's callers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// No such topic.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// No such group on that topic.
    #[error("unknown group {group:?} on topic {topic:?}")]
    UnknownGroup {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// No such member (never joined, or left).
    #[error("unknown member {0}")]
    UnknownMember(MemberId),
    /// A partition number outside the topic.
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
    },
    /// A topic, group or member name (or a name derived from them) that
    /// [`crate::names`] refuses.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// An argument outside its limits (partition count, message id text).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A topic or group that the metadata replay could not restore: it is
    /// set aside until an operator deletes it (or fixes its cause and
    /// restarts).
    #[error("{what} is quarantined: {reason}")]
    Quarantined {
        /// `topic "x"` or `group "g" of topic "x"`.
        what: String,
        /// Why it could not be restored.
        reason: String,
    },
    /// `create_topic` of a name that exists, whatever its configuration.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// An ack or nack for an offset the group was never given.
    #[error("offset {offset} of partition {partition} was not delivered to this group")]
    NotDelivered {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The delay store failed.
    #[error(transparent)]
    Delay(#[from] DelayError),
    /// A group's ack journal is damaged.
    #[error(transparent)]
    AckJournal(#[from] AckJournalError),
    /// The metadata journal is damaged.
    #[error("corrupt dispatcher metadata: {0}")]
    CorruptMetadata(String),
    /// Writing the metadata journal failed earlier: whether that change is
    /// durable is unknown, so no metadata change (topics, groups,
    /// deletions) is accepted until the dispatcher is reopened.
    #[error("the dispatcher metadata journal failed ({0}); reopen the dispatcher")]
    MetadataFailed(String),
}

/// Result alias.
pub type Result<T, E = DispatchError> = std::result::Result<T, E>;

/// A message handed to a member.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Who gets it.
    pub member: MemberId,
    /// Topic (shared by every delivery of the group).
    pub topic: Arc<str>,
    /// Group (shared by every delivery of the group).
    pub group: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The record (payload shared with the log's mapping).
    pub record: Record,
}

/// What [`Dispatcher::produce`] did with one record, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    /// Partition.
    pub partition: u32,
    /// Offset in the topic, or `None` while it waits in the delay store.
    pub offset: Option<u64>,
    /// The message id.
    pub id: MessageId,
    /// Deliver-at time when it was delayed.
    pub delayed_until_ms: Option<i64>,
}

/// A deletion: records it covers are never delivered again to any group.
///
/// [`Dispatcher::delete`] bounds every kind except `MessageId` by each
/// partition's end offset at the time of the deletion: records produced
/// later are not covered, even with the same key, in the same time range or
/// at an offset of the range. A `MessageId` deletion has no bound: it also
/// covers a delayed message with that id that is appended later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tombstone {
    /// Offsets `start..end` of one partition.
    OffsetRange {
        /// Partition.
        partition: u32,
        /// First offset deleted.
        start: u64,
        /// First offset kept.
        end: u64,
    },
    /// One message, wherever it is.
    MessageId(String),
    /// Records whose broker timestamp is in `start_ms..end_ms`.
    TimeRange {
        /// First millisecond deleted.
        start_ms: i64,
        /// First millisecond kept.
        end_ms: i64,
    },
    /// Every stored record whose key is exactly these bytes, in any
    /// partition.
    Key(Vec<u8>),
}

/// A message's state in one group (or one member of a broadcast group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessageState {
    /// The group.
    pub group: String,
    /// The member whose cursor this is, for a broadcast group (whose
    /// members each have their own); `None` for a clustering group.
    pub member: Option<String>,
    /// Below the ack floor or its ack bit set: consumer-acked, or passed
    /// by the group as deleted, expired or dead-lettered.
    pub acked: bool,
    /// Deliveries so far of a message still unacked, since the dispatcher
    /// started (attempt counts are not persisted); 0 when unknown, e.g.
    /// once acked.
    pub attempts: u32,
    /// Delivered and waiting for its ack.
    pub in_flight: bool,
    /// When the message is delivered next: a pending retry, or its
    /// deliver-at time while it is ahead. `None` when no such time is known
    /// (acked, in flight, ready now, held behind its key).
    pub next_delivery_ms: Option<i64>,
}

/// A group's dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadLetterTopic {
    /// The dead-letter topic (it may not exist yet: it is created with the
    /// first dead letter).
    pub topic: String,
    /// The topic the group consumes.
    pub source_topic: String,
    /// The group.
    pub group: String,
}

/// Where a seek moves a group.
pub type SeekTarget = StartPosition;

/// What a seek did (or, in a dry run, would do) to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekPartition {
    /// Partition.
    pub partition: u32,
    /// Ack floor before.
    pub old_floor: u64,
    /// Ack floor (and cursor) after.
    pub new_floor: u64,
    /// Messages that will be delivered again although acked.
    pub redelivered: u64,
    /// Unacked messages that will be skipped (treated as acked).
    pub skipped: u64,
}

/// Per-partition state of a group, for `dmq group describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    /// Partition.
    pub partition: u32,
    /// Every offset below is acked.
    pub ack_floor: u64,
    /// Next offset the group reads.
    pub cursor: u64,
    /// The partition's end offset.
    pub end_offset: u64,
    /// Messages not yet acked: `end_offset - ack_floor - acked above floor`.
    pub lag: u64,
    /// Unacked messages the group is tracking (in flight, retrying, held).
    pub unacked: u64,
    /// Delivered and waiting for an ack.
    pub in_flight: u64,
    /// Age of the oldest unacked message (the one at the ack floor), from
    /// its broker timestamp; `None` when everything is acked.
    pub oldest_unacked_age_ms: Option<u64>,
    /// Delayed messages of this partition whose delivery time is still
    /// ahead: those waiting in the delay store (not yet fired or cancelled;
    /// the same for every group of the topic), plus records already in the
    /// partition that this group holds until their deliver-at (only after
    /// the clock stepped back). Counted, not scanned: see
    /// [`DelayStore::pending_in_topic`](crate::DelayStore::pending_in_topic).
    pub delayed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum MetaEntry {
    Topic {
        name: String,
        config: TopicConfig,
    },
    Group {
        topic: String,
        group: String,
        config: GroupConfig,
    },
    GroupDeleted {
        topic: String,
        group: String,
    },
    Tombstone {
        topic: String,
        tombstone: Tombstone,
        /// Every partition's end offset when the deletion was made: only
        /// records below are covered. Absent for message ids and in entries
        /// written before bounds existed (then unbounded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        below: Option<Vec<u64>>,
    },
    TopicDeleted {
        name: String,
    },
    /// Recovery cut a partition's log back to `end` (a torn or damaged
    /// tail, or a power loss under a lazy fsync policy): every earlier
    /// bounded deletion of that partition stops at `end`, so that records
    /// which later take the lost offsets are not deleted with them.
    LogCut {
        topic: String,
        partition: u32,
        end: u64,
    },
}

#[derive(Debug)]
struct TopicState {
    config: TopicConfig,
    partitions: Vec<Arc<dyn PartitionLog>>,
    tombstones: Tombstones,
    router: Arc<Router>,
}

#[derive(Debug)]
struct Member {
    state: usize,
    name: String,
    credit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    AckDeadline,
    Retry,
}

/// A timing-wheel entry: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct TimerTask {
    state: u32,
    partition: u32,
    offset: u64,
    attempt: u32,
    kind: TimerKind,
}

/// Where an event happened.
struct Place<'a> {
    topic: Name<'a>,
    partition: Option<u32>,
    offset: Option<u64>,
    group: Option<Name<'a>>,
}

/// A topic or group name for an event: the shared one of a group's state
/// on the hot path (delivered, acked: a reference count, no copy), or a
/// plain one elsewhere (copied once).
enum Name<'a> {
    Shared(&'a Arc<str>),
    Plain(&'a str),
}

impl Name<'_> {
    fn to_arc(&self) -> Arc<str> {
        match self {
            Name::Shared(name) => Arc::clone(name),
            Name::Plain(name) => Arc::from(*name),
        }
    }
}

/// What the cursor found next in a partition.
enum Next {
    Deliver(Record),
    Nothing,
}

/// A topic or group the metadata replay set aside (see
/// [`Dispatcher::quarantined`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    /// The topic (of the group).
    pub topic: String,
    /// The group, for a quarantined group.
    pub group: Option<String>,
    /// Why it could not be restored.
    pub reason: String,
}

impl Quarantined {
    fn error(&self) -> DispatchError {
        let what = match &self.group {
            Some(group) => format!(
                "group {} of topic {}",
                names::shown(group),
                names::shown(&self.topic)
            ),
            None => format!("topic {}", names::shown(&self.topic)),
        };
        DispatchError::Quarantined {
            what,
            reason: self.reason.clone(),
        }
    }
}

/// Every delivery rule of DMQ over a [`Storage`].
#[derive(Debug)]
pub struct Dispatcher {
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    events: Arc<dyn EventSink>,
    config: DispatcherConfig,
    meta: Box<dyn Journal>,
    topics: BTreeMap<String, TopicState>,
    group_configs: BTreeMap<(String, String), GroupConfig>,
    states: Vec<GroupState>,
    state_index: HashMap<StateKey, usize>,
    members: BTreeMap<MemberId, Member>,
    next_member_id: MemberId,
    wheel: TimingWheel<TimerTask>,
    delays: DelayStore,
    outbox: Vec<Delivery>,
    /// Set when a metadata write failed: later ones are refused.
    meta_failed: Option<String>,
    /// Topics and groups the replay could not restore, by (topic, group).
    quarantined: BTreeMap<(String, Option<String>), Quarantined>,
    /// When this dispatcher opened: a delayed message due before may have
    /// fired before a crash already (its fired mark is lazy).
    opened_at_ms: i64,
    /// Due messages whose append failed (at most one poll's batch): fired
    /// first at the next poll.
    unfired: VecDeque<DueMessage>,
}

impl Dispatcher {
    /// Opens the dispatcher over `storage`, restoring topics, groups, ack
    /// state, tombstones and pending delays.
    pub fn open(
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
        config: DispatcherConfig,
    ) -> Result<Dispatcher> {
        let now = clock.now_ms();
        let (meta, payloads) = storage.open_journal("meta")?;
        // The delay store logs what its recovery did.
        let (delays, _recovery) =
            DelayStore::open(Arc::clone(&storage), DelayConfig::default(), now)?;
        let mut dispatcher = Dispatcher {
            wheel: TimingWheel::new(config.tick_ms, now),
            storage,
            clock,
            events,
            config,
            meta,
            topics: BTreeMap::new(),
            group_configs: BTreeMap::new(),
            states: Vec::new(),
            state_index: HashMap::new(),
            members: BTreeMap::new(),
            next_member_id: 1,
            delays,
            outbox: Vec::new(),
            meta_failed: None,
            quarantined: BTreeMap::new(),
            opened_at_ms: now,
            unfired: VecDeque::new(),
        };
        let entries = payloads
            .iter()
            .map(|payload| serde_json::from_slice::<MetaEntry>(payload))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DispatchError::CorruptMetadata(e.to_string()))?;
        // A topic created and later deleted is not opened at all (opening
        // would create its files again).
        let mut last_deleted: HashMap<&str, usize> = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            if let MetaEntry::TopicDeleted { name } = entry {
                last_deleted.insert(name, index);
            }
        }
        for (index, entry) in entries.iter().enumerate() {
            if let MetaEntry::Topic { name, .. } = entry {
                if last_deleted
                    .get(name.as_str())
                    .is_some_and(|&deleted| deleted > index)
                {
                    continue;
                }
            }
            dispatcher.replay(entry.clone());
        }
        dispatcher.journal_log_cuts()?;
        let groups: Vec<(String, String)> = dispatcher.group_configs.keys().cloned().collect();
        for (topic, group) in groups {
            let clustering = dispatcher
                .group_configs
                .get(&(topic.clone(), group.clone()))
                .is_some_and(|c| c.mode == DeliveryMode::Clustering);
            if clustering {
                let key = StateKey {
                    topic: topic.as_str().into(),
                    group: group.as_str().into(),
                    member: None,
                };
                if let Err(error) = dispatcher.load_existing_state(key) {
                    dispatcher.quarantine(&topic, Some(&group), error.to_string());
                }
            }
        }
        Ok(dispatcher)
    }

    /// Applies one journaled entry at open. An entry that cannot be applied
    /// (a name today's rules refuse, a partition that does not open) never
    /// stops the broker: its topic or group is quarantined.
    fn replay(&mut self, entry: MetaEntry) {
        let (topic, group) = match &entry {
            MetaEntry::Topic { name, config } => {
                let valid = names::check_topic(name)
                    .map_err(|e| e.to_string())
                    .and_then(|()| check_partition_count(config.partitions));
                if let Err(reason) = valid {
                    self.quarantine(name, None, reason);
                    return;
                }
                // A topic created again after its quarantine was deleted.
                self.quarantined.remove(&(name.clone(), None));
                (name.clone(), None)
            }
            MetaEntry::Group {
                topic,
                group,
                config,
            } => {
                if let Err(error) =
                    names::check_group(topic, group, config.dead_letter_topic.as_deref())
                {
                    self.quarantine(topic, Some(group), error.to_string());
                    return;
                }
                self.quarantined
                    .remove(&(topic.clone(), Some(group.clone())));
                (topic.clone(), Some(group.clone()))
            }
            MetaEntry::GroupDeleted { topic, group } => {
                self.quarantined
                    .remove(&(topic.clone(), Some(group.clone())));
                (topic.clone(), Some(group.clone()))
            }
            MetaEntry::TopicDeleted { name } => {
                self.quarantined.retain(|(topic, _), _| topic != name);
                (name.clone(), None)
            }
            MetaEntry::Tombstone { topic, .. } | MetaEntry::LogCut { topic, .. } => {
                (topic.clone(), None)
            }
        };
        if self.quarantined.contains_key(&(topic.clone(), None))
            && !matches!(entry, MetaEntry::TopicDeleted { .. })
        {
            return;
        }
        if let Err(error) = self.apply_meta(entry) {
            self.quarantine(&topic, group.as_deref(), error.to_string());
        }
    }

    /// Sets a topic (`group: None`) or a group aside, loudly.
    fn quarantine(&mut self, topic: &str, group: Option<&str>, reason: String) {
        tracing::error!(
            topic = %names::shown(topic),
            group = group.map(names::shown),
            %reason,
            "quarantined: the broker starts without it; delete it or fix the cause and restart"
        );
        if let Some(group) = group {
            self.group_configs
                .remove(&(topic.to_string(), group.to_string()));
        } else {
            self.topics.remove(topic);
        }
        self.quarantined.insert(
            (topic.to_string(), group.map(str::to_string)),
            Quarantined {
                topic: topic.to_string(),
                group: group.map(str::to_string),
                reason,
            },
        );
    }

    /// Topics and groups that the metadata replay could not restore at
    /// open: they are not served, and are reported (log, metrics, admin
    /// API) until they are deleted or their cause fixed.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.quarantined.values().cloned().collect()
    }

    /// Every partition whose log recovery found damage (regions its
    /// readers skip) or cut a torn tail, with what it found.
    pub fn recovery_damage(&self) -> Vec<(String, u32, RecoveryDamage)> {
        let mut damaged = Vec::new();
        for (name, topic) in &self.topics {
            for (partition, log) in topic.partitions.iter().enumerate() {
                let damage = log.recovery_damage();
                if damage != RecoveryDamage::default() {
                    damaged.push((name.clone(), partition as u32, damage));
                }
            }
        }
        damaged
    }

    /// Journals whose torn tail was cut when they were opened (see
    /// [`Storage::journal_tail_cuts`]), with the bytes cut.
    pub fn journal_tail_cuts(&self) -> Vec<(String, u64)> {
        self.storage.journal_tail_cuts()
    }

    fn check_not_quarantined(&self, topic: &str, group: Option<&str>) -> Result<()> {
        let topic_key = (topic.to_string(), None);
        if let Some(q) = self.quarantined.get(&topic_key) {
            return Err(q.error());
        }
        if let Some(group) = group {
            if let Some(q) = self
                .quarantined
                .get(&(topic.to_string(), Some(group.to_string())))
            {
                return Err(q.error());
            }
        }
        Ok(())
    }

    fn apply_meta(&mut self, entry: MetaEntry) -> Result<()> {
        match entry {
            MetaEntry::Topic { name, config } => {
                let partitions = (0..config.partitions)
                    .map(|p| self.storage.partition(&name, p))
                    .collect::<Result<Vec<_>, _>>()?;
                self.topics.insert(
                    name,
                    TopicState {
                        router: Arc::new(Router::new(config.partitions)),
                        config,
                        partitions,
                        tombstones: Tombstones::default(),
                    },
                );
            }
            MetaEntry::Group {
                topic,
                group,
                config,
            } => {
                self.group_configs.insert((topic, group), config);
            }
            MetaEntry::GroupDeleted { topic, group } => {
                self.group_configs.remove(&(topic, group));
            }
            MetaEntry::Tombstone {
                topic,
                tombstone,
                below,
            } => {
                if let Some(state) = self.topics.get_mut(&topic) {
                    let partitions = state.config.partitions;
                    state
                        .tombstones
                        .add(&tombstone, below.as_deref(), partitions);
                }
            }
            MetaEntry::TopicDeleted { name } => {
                self.topics.remove(&name);
                self.group_configs.retain(|(topic, _), _| *topic != name);
            }
            MetaEntry::LogCut {
                topic,
                partition,
                end,
            } => {
                if let Some(state) = self.topics.get_mut(&topic) {
                    state.tombstones.cut(partition, end);
                }
            }
        }
        Ok(())
    }

    /// After replay: a partition whose log ends below a deletion's bound
    /// was cut back by recovery; the cut is journaled (see
    /// [`MetaEntry::LogCut`]) before any new record can take those offsets.
    fn journal_log_cuts(&mut self) -> Result<()> {
        let mut cuts = Vec::new();
        for (name, topic) in &self.topics {
            for (partition, log) in topic.partitions.iter().enumerate() {
                let end = log.end_offset();
                if topic.tombstones.bounded_past(partition as u32, end) {
                    cuts.push(MetaEntry::LogCut {
                        topic: name.clone(),
                        partition: partition as u32,
                        end,
                    });
                }
            }
        }
        for cut in cuts {
            tracing::warn!(
                entry = ?cut,
                "a partition's log ends below an earlier deletion's bound (cut at \
                 recovery): the deletion now stops at the log's end"
            );
            self.persist_meta(&cut)?;
            self.apply_meta(cut)?;
        }
        Ok(())
    }

    /// Makes `entry` durable: one CRC-framed payload, fsynced before this
    /// returns. A crash before the fsync completes leaves the entry whole
    /// or cut on replay (never half-applied). After a failed write every
    /// later one is refused ([`DispatchError::MetadataFailed`]): the failed
    /// entry could otherwise become durable with a later sync although its
    /// caller was told it failed.
    fn persist_meta(&mut self, entry: &MetaEntry) -> Result<()> {
        if let Some(reason) = &self.meta_failed {
            return Err(DispatchError::MetadataFailed(reason.clone()));
        }
        let payload =
            serde_json::to_vec(entry).map_err(|e| DispatchError::CorruptMetadata(e.to_string()))?;
        self.meta.append(&payload);
        if let Err(error) = self.meta.sync() {
            self.meta_failed = Some(error.to_string());
            return Err(error.into());
        }
        Ok(())
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn emit(&self, message_id: MessageId, place: Place<'_>, kind: EventKind, reason: Option<&str>) {
        if !self.events.enabled() {
            return;
        }
        self.events.emit(Event {
            time_ms: self.now(),
            message_id,
            topic: place.topic.to_arc(),
            partition: place.partition,
            offset: place.offset,
            group: place.group.as_ref().map(Name::to_arc),
            kind,
            reason: reason.map(str::to_string),
        });
    }

    /// Emits an event about a message of a group's partition.
    fn emit_in_group(
        &self,
        state_index: usize,
        partition: u32,
        offset: u64,
        message_id: MessageId,
        kind: EventKind,
        reason: Option<&str>,
    ) {
        let key = &self.states[state_index].key;
        let place = Place {
            topic: Name::Shared(&key.topic),
            partition: Some(partition),
            offset: Some(offset),
            group: Some(Name::Shared(&key.group)),
        };
        self.emit(message_id, place, kind, reason);
    }

    // ----- topics ---------------------------------------------------------

    /// Creates a topic. A name that exists is [`DispatchError::TopicExists`],
    /// even with the same configuration: creation is not idempotent, so a
    /// caller learns that the topic (and its messages and groups) was there
    /// before it.
    ///
    /// Validate, then create, then journal: the name and partition count
    /// are checked ([`crate::names`], [`DispatcherConfig`]'s caps), the
    /// disk must have room for every partition's preallocated segment, the
    /// partitions are opened, and only then is the topic journaled. A
    /// failure at any step leaves no files and no journal entry behind.
    pub fn create_topic(&mut self, name: &str, config: TopicConfig) -> Result<()> {
        names::check_topic(name)?;
        check_partition_count(config.partitions).map_err(DispatchError::InvalidArgument)?;
        self.check_not_quarantined(name, None)?;
        if self.topics.contains_key(name) {
            return Err(DispatchError::TopicExists(name.to_string()));
        }
        if config.partitions > self.config.max_partitions_per_topic {
            return Err(DispatchError::InvalidArgument(format!(
                "{} partitions: at most {} per topic",
                config.partitions, self.config.max_partitions_per_topic
            )));
        }
        let total: u64 = self
            .topics
            .values()
            .map(|t| u64::from(t.config.partitions))
            .sum();
        if total + u64::from(config.partitions) > u64::from(self.config.max_partitions_total) {
            return Err(DispatchError::InvalidArgument(format!(
                "{} more partitions would make {} in total: at most {} (max_partitions_total)",
                config.partitions,
                total + u64::from(config.partitions),
                self.config.max_partitions_total
            )));
        }
        if let Some(reason) = &self.meta_failed {
            return Err(DispatchError::MetadataFailed(reason.clone()));
        }
        self.storage.check_room(config.partitions)?;
        let opened = (0..config.partitions)
            .map(|p| self.storage.partition(name, p))
            .collect::<Result<Vec<_>, _>>();
        let entry = MetaEntry::Topic {
            name: name.to_string(),
            config: config.clone(),
        };
        let created = match opened {
            Ok(partitions) => self.persist_meta(&entry).map(|()| partitions),
            Err(error) => Err(error.into()),
        };
        match created {
            Ok(partitions) => {
                self.topics.insert(
                    name.to_string(),
                    TopicState {
                        router: Arc::new(Router::new(config.partitions)),
                        config,
                        partitions,
                        tombstones: Tombstones::default(),
                    },
                );
                Ok(())
            }
            Err(error) => {
                if let Err(cleanup) = self.storage.remove_topic(name) {
                    tracing::error!(topic = name, %cleanup, "removing a failed topic's files failed");
                }
                Err(error)
            }
        }
    }

    /// Topic names and configurations.
    pub fn topics(&self) -> Vec<(String, TopicConfig)> {
        self.topics
            .iter()
            .map(|(name, state)| (name.clone(), state.config.clone()))
            .collect()
    }

    /// The partition logs of a topic, so that a caller can append to them
    /// without going through the dispatcher (the broker appends from many
    /// connections at once to share group commits, then calls `poll`).
    pub fn partitions(&self, topic: &str) -> Result<Vec<Arc<dyn PartitionLog>>> {
        Ok(self.topic(topic)?.partitions.clone())
    }

    fn topic(&self, name: &str) -> Result<&TopicState> {
        self.topics
            .get(name)
            .ok_or_else(|| DispatchError::UnknownTopic(name.to_string()))
    }

    /// The partition router of a topic: shared with whoever appends to it
    /// without going through the dispatcher, so that every produce path
    /// follows one rule and one round-robin counter.
    pub fn router(&self, topic: &str) -> Result<Arc<Router>> {
        Ok(Arc::clone(&self.topic(topic)?.router))
    }

    /// Stores records in `topic`, routed by the topic's [`Router`]: an
    /// explicit partition takes them all; else each keyed record goes to
    /// its key's hash partition (so a key never spans two partitions) and
    /// the keyless ones to one partition, round robin. See
    /// [`produce_routed`](Self::produce_routed).
    pub fn produce(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<RecordInput>,
    ) -> Result<Vec<Produced>> {
        let routes = self
            .topic(topic)?
            .router
            .route(partition, records.iter().map(|r| r.key.as_deref()))
            .map_err(|e| DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition: e.partition,
            })?;
        self.produce_routed(topic, routes.into_iter().zip(records).collect())
    }

    /// Stores records already routed to their partitions: those whose
    /// deliver-at is in the future go to the delay store, the rest are
    /// appended to their partition (one durable append per partition).
    /// The answer is in the records' order.
    pub fn produce_routed(
        &mut self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
    ) -> Result<Vec<Produced>> {
        if records.iter().any(|(_, r)| {
            r.headers
                .iter()
                .any(|(name, _)| names::is_reserved_header(name))
        }) {
            return Err(DispatchError::InvalidArgument(format!(
                "headers starting with {:?} are reserved for the broker",
                names::DELAY_HEADER_PREFIX
            )));
        }
        let now = self.now();
        let partitions = self.topic(topic)?.config.partitions;
        if let Some((partition, _)) = records.iter().find(|(p, _)| *p >= partitions) {
            return Err(DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition: *partition,
            });
        }
        let mut immediate: BTreeMap<u32, Vec<RecordInput>> = BTreeMap::new();
        let mut delayed = Vec::new();
        let mut order = Vec::with_capacity(records.len());
        for (partition, record) in records {
            match record.deliver_at_ms {
                Some(due) if due > now => {
                    order.push((true, due, partition));
                    delayed.push((topic.to_string(), partition, record));
                }
                _ => {
                    order.push((false, 0, partition));
                    immediate.entry(partition).or_default().push(record);
                }
            }
        }
        let mut appended = HashMap::new();
        for (partition, records) in immediate {
            let offsets = self.topic(topic)?.partitions[partition as usize].append(records)?;
            appended.insert(partition, offsets.into_iter());
        }
        let delayed_ids = if delayed.is_empty() {
            Vec::new()
        } else {
            self.delays.schedule(delayed, now)?
        };
        let mut delayed_ids = delayed_ids.into_iter();
        let mut produced = Vec::with_capacity(order.len());
        for (is_delayed, due, partition) in order {
            if is_delayed {
                let Some(id) = delayed_ids.next() else { break };
                self.emit(
                    id,
                    Place {
                        topic: Name::Plain(topic),
                        partition: Some(partition),
                        offset: None,
                        group: None,
                    },
                    EventKind::DelayScheduled { due_ms: due },
                    None,
                );
                produced.push(Produced {
                    partition,
                    offset: None,
                    id,
                    delayed_until_ms: Some(due),
                });
            } else {
                let Some((offset, id)) = appended.get_mut(&partition).and_then(Iterator::next)
                else {
                    break;
                };
                produced.push(Produced {
                    partition,
                    offset: Some(offset),
                    id,
                    delayed_until_ms: None,
                });
            }
        }
        Ok(produced)
    }

    /// Cancels a pending delayed message; true if it was pending.
    pub fn cancel_delay(&mut self, id: &MessageId) -> Result<bool> {
        // A message due before this dispatcher opened may have fired before
        // a crash that lost its fired mark: its copy is already in its
        // topic. Those are handled first (appended, or found there), so a
        // cancel never returns true for a message that was delivered.
        self.fire_delays(self.opened_at_ms, usize::MAX)?;
        let cancelled = self.delays.cancel(id)?;
        if cancelled {
            self.emit(
                *id,
                Place {
                    topic: Name::Plain(""),
                    partition: None,
                    offset: None,
                    group: None,
                },
                EventKind::DelayCancelled,
                None,
            );
        }
        Ok(cancelled)
    }

    /// Delayed messages not yet fired.
    pub fn pending_delays(&self) -> u64 {
        self.delays.pending()
    }

    /// Deletes messages: honoured by every later delivery (messages already
    /// in flight may still be acked). The deletion is one metadata journal
    /// entry, fsynced before this returns `Ok`: a crash after the return
    /// never loses it, a crash before leaves it whole or absent.
    ///
    /// Offset ranges, time ranges and keys cover only records stored now
    /// (below each partition's current end offset; see [`Tombstone`]); a
    /// message id also covers a delayed message with that id appended
    /// later. Errors: unknown topic, an offset range's partition outside
    /// the topic, a message id that does not parse
    /// ([`DispatchError::InvalidName`]).
    pub fn delete(&mut self, topic: &str, tombstone: Tombstone) -> Result<()> {
        let below = self.deletion_bound(topic, &tombstone)?;
        self.persist_tombstone(topic, tombstone, below)
    }

    /// [`Dispatcher::delete`], returning what [`Dispatcher::count_covered`]
    /// would have returned just before: the stored records the deletion
    /// covers that no earlier one did. Exact even while other threads
    /// append to the partitions: the count and the deletion use the same
    /// end offsets. Costs what `count_covered` costs.
    pub fn delete_counted(&mut self, topic: &str, tombstone: Tombstone) -> Result<u64> {
        let below = self.deletion_bound(topic, &tombstone)?;
        let state = self.topic(topic)?;
        let ends = match &below {
            Some(ends) => ends.clone(),
            None => state
                .partitions
                .iter()
                .map(|log| log.end_offset())
                .collect(),
        };
        let count = state.tombstones.count_new(
            &state.partitions,
            &tombstone,
            &ends,
            CountPlan::default(),
        )?;
        self.persist_tombstone(topic, tombstone, below)?;
        Ok(count)
    }

    /// Frees the disk of deleted messages: unlinks the sealed segments of
    /// `topic` all of whose records are covered by offset- or time-range
    /// deletions and are below the ack floor of every group state loaded
    /// for the topic (so each group has passed them, recording their
    /// `Deleted` events). Returns the number of segments unlinked. The
    /// active segment is never unlinked; a member of a broadcast group that
    /// has not joined since the dispatcher opened is not waited for (it
    /// would skip those records anyway, without their events).
    pub fn reclaim_deleted(&mut self, topic: &str) -> Result<u64> {
        let state = self.topic(topic)?;
        let mut unlinked = 0;
        for (p, log) in state.partitions.iter().enumerate() {
            let partition = p as u32;
            let mut upto = state
                .tombstones
                .covered_prefix_end(partition, log.as_ref())?;
            for group in self
                .states
                .iter()
                .filter(|s| !s.retired && *s.key.topic == *topic)
            {
                if let Some(part) = group.partitions.get(p) {
                    upto = upto.min(part.acks.floor());
                }
            }
            if upto > log.start_offset() {
                unlinked += log.delete_before(upto)?;
            }
        }
        Ok(unlinked)
    }

    /// How many stored records (from each partition's start offset to its
    /// end offset now) `tombstone` would cover that no earlier deletion of
    /// the topic covers: the dry run of a deletion. Exact (one caveat:
    /// the id index finds one record per id and partition, so a `MessageId`
    /// stored more than once in a partition, which only a dead-letter topic
    /// can hold, counts once).
    ///
    /// Cost: offset and time ranges are counted by interval arithmetic on
    /// offsets (a time range becomes an offset interval through two
    /// timestamp lookups per partition, as broker timestamps never decrease
    /// within a partition) without reading records, unless earlier `Key` or
    /// `MessageId` deletions exist: then the records of the range no
    /// earlier range covers are either looked up through the key and id
    /// indexes (one lookup per earlier deletion and partition, reading only
    /// the records those keys and ids have in the range) or, when that part
    /// of the range holds at most 65 536 records or there are more than
    /// 1 024 earlier key and id deletions, read in batches of 1 024 records
    /// (memory stays bounded; time grows with the range). A `Key` reads the
    /// key's records through the key index, a page at a time; a
    /// `MessageId` is one id lookup per partition. A log without indexes
    /// ([`crate::storage::MemoryLog`]) scans instead.
    pub fn count_covered(&self, topic: &str, tombstone: &Tombstone) -> Result<u64> {
        self.check_tombstone(topic, tombstone)?;
        let state = self.topic(topic)?;
        let ends: Vec<u64> = state
            .partitions
            .iter()
            .map(|log| log.end_offset())
            .collect();
        Ok(state
            .tombstones
            .count_new(&state.partitions, tombstone, &ends, CountPlan::default())?)
    }

    /// True if a deletion of `topic` covers `record` of `partition` (false
    /// for an unknown topic).
    pub fn is_deleted(&self, topic: &str, partition: u32, record: &Record) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|state| state.tombstones.covers(partition, record))
    }

    /// Checks a tombstone against its topic.
    fn check_tombstone(&self, topic: &str, tombstone: &Tombstone) -> Result<()> {
        let state = self.topic(topic)?;
        match tombstone {
            Tombstone::OffsetRange { partition, .. } if *partition >= state.config.partitions => {
                Err(DispatchError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: *partition,
                })
            }
            Tombstone::MessageId(text) if text.parse::<MessageId>().is_err() => {
                Err(DispatchError::InvalidArgument(format!(
                    "message id {}: 32 hex digits expected",
                    names::shown(text)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Checks a tombstone and returns the bound it is stored with: every
    /// partition's end offset now (`None` for a message id: unbounded).
    fn deletion_bound(&self, topic: &str, tombstone: &Tombstone) -> Result<Option<Vec<u64>>> {
        self.check_tombstone(topic, tombstone)?;
        if let Tombstone::MessageId(_) = tombstone {
            return Ok(None);
        }
        let state = self.topic(topic)?;
        Ok(Some(
            state
                .partitions
                .iter()
                .map(|log| log.end_offset())
                .collect(),
        ))
    }

    fn persist_tombstone(
        &mut self,
        topic: &str,
        tombstone: Tombstone,
        below: Option<Vec<u64>>,
    ) -> Result<()> {
        let entry = MetaEntry::Tombstone {
            topic: topic.to_string(),
            tombstone,
            below,
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)
    }

    /// The stored record with message id `id` in `topic`, and its
    /// partition: one id-index lookup per partition, in partition order.
    /// Deleted records are found too (see [`Dispatcher::is_deleted`]).
    pub fn find_message(&self, topic: &str, id: &MessageId) -> Result<Option<(u32, Record)>> {
        for (partition, log) in self.topic(topic)?.partitions.iter().enumerate() {
            if let Some(record) = log.find_by_id(id)? {
                return Ok(Some((partition as u32, record)));
            }
        }
        Ok(None)
    }

    /// The state of `record` (stored at `partition` of `topic`) in every
    /// group subscribed to the topic, sorted by group: one entry per
    /// clustering group; for a broadcast group one per member name whose
    /// state is loaded (members that joined since the dispatcher opened),
    /// sorted by name, or a single entry with `member: None` that reports
    /// nothing acked when there is none. What the group's state says is
    /// reported as is: a deleted, expired or dead-lettered record is acked
    /// once the group's cursor has passed it.
    pub fn message_states(
        &self,
        topic: &str,
        partition: u32,
        record: &Record,
    ) -> Result<Vec<GroupMessageState>> {
        let topic_state = self.topic(topic)?;
        if partition >= topic_state.config.partitions {
            return Err(DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            });
        }
        let now = self.now();
        let mut found = Vec::new();
        for ((_, group), config) in self
            .group_configs
            .range((topic.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == topic)
        {
            let mut states: Vec<&GroupState> = self
                .states
                .iter()
                .filter(|s| {
                    !s.retired
                        && *s.key.topic == *topic
                        && *s.key.group == **group
                        && (s.key.member.is_some() == (config.mode == DeliveryMode::Broadcast))
                })
                .collect();
            states.sort_by(|a, b| a.key.member.cmp(&b.key.member));
            if states.is_empty() {
                found.push(GroupMessageState {
                    group: group.clone(),
                    member: None,
                    acked: false,
                    attempts: 0,
                    in_flight: false,
                    next_delivery_ms: record.deliver_at_ms.filter(|&due| due > now),
                });
            }
            for state in states {
                found.push(self.message_state(state, partition, record, now));
            }
        }
        Ok(found)
    }

    fn message_state(
        &self,
        state: &GroupState,
        partition: u32,
        record: &Record,
        now: i64,
    ) -> GroupMessageState {
        let offset = record.offset;
        let part = state.partitions.get(partition as usize);
        let acked = part.is_some_and(|part| part.acks.is_acked(offset));
        let pending = part.and_then(|part| part.pending.get(&offset));
        let not_read = part.is_none_or(|part| offset >= part.cursor);
        let next_delivery_ms = match pending.map(|p| p.stage) {
            Some(Stage::Waiting { timer }) => self.wheel.due_ms(timer),
            None if !acked && not_read => record.deliver_at_ms.filter(|&due| due > now),
            _ => None,
        };
        GroupMessageState {
            group: state.key.group.to_string(),
            member: state.key.member.clone(),
            acked,
            attempts: pending.map_or(0, |p| p.attempt),
            in_flight: matches!(pending.map(|p| p.stage), Some(Stage::InFlight { .. })),
            next_delivery_ms,
        }
    }

    /// Every group's dead-letter topic (configured, or
    /// `<topic>.<group>.dlq`), whether or not it exists yet (it is created
    /// with the first dead letter), sorted by source topic and group.
    pub fn dead_letter_topics(&self) -> Vec<DeadLetterTopic> {
        self.group_configs
            .iter()
            .map(|((topic, group), config)| DeadLetterTopic {
                topic: config.dead_letter_topic_for(topic, group),
                source_topic: topic.clone(),
                group: group.clone(),
            })
            .collect()
    }

    /// True if the topic exists.
    pub fn topic_exists(&self, name: &str) -> bool {
        self.topics.contains_key(name)
    }

    // ----- groups and members --------------------------------------------

    /// Subscribes a group to a topic (idempotent; a new configuration
    /// replaces the old one but keeps the position).
    pub fn subscribe(&mut self, topic: &str, group: &str, config: GroupConfig) -> Result<()> {
        self.check_not_quarantined(topic, Some(group))?;
        self.topic(topic)?;
        names::check_group(topic, group, config.dead_letter_topic.as_deref())?;
        let key = (topic.to_string(), group.to_string());
        if self.group_configs.get(&key) == Some(&config) {
            return Ok(());
        }
        let entry = MetaEntry::Group {
            topic: topic.to_string(),
            group: group.to_string(),
            config: config.clone(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        for state in self
            .states
            .iter_mut()
            .filter(|s| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
        {
            state.config = config.clone();
        }
        if config.mode == DeliveryMode::Clustering {
            self.load_state(StateKey {
                topic: topic.into(),
                group: group.into(),
                member: None,
            })?;
        }
        Ok(())
    }

    /// Deletes a consumer group: its members are dropped (returned, so the
    /// caller can stop routing to them), its in-flight messages forgotten,
    /// its ack journals removed. A group of that name created later starts
    /// afresh. (Journals of broadcast members not connected since the
    /// broker started stay on disk.)
    /// A quarantined group may be deleted too (that clears it).
    pub fn delete_group(&mut self, topic: &str, group: &str) -> Result<Vec<MemberId>> {
        let quarantine_key = (topic.to_string(), Some(group.to_string()));
        let quarantined = self.quarantined.contains_key(&quarantine_key);
        if !quarantined {
            self.group_config(topic, group)?;
        }
        let entry = MetaEntry::GroupDeleted {
            topic: topic.to_string(),
            group: group.to_string(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        self.quarantined.remove(&quarantine_key);
        let dropped = self.retire_states(|key| *key.topic == *topic && *key.group == *group)?;
        if quarantined {
            // Never loaded, so not retired: its journal goes here (if its
            // name can be a file at all).
            let journal = names::group_journal(topic, group, None);
            match self.storage.remove_journal(&journal) {
                Err(StoreError::InvalidName(_)) | Ok(()) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(dropped)
    }

    /// Deletes a topic: its groups, its partitions' files, its tombstones.
    /// Returns the members that were dropped. Pending delayed messages for
    /// it are dropped when they fall due.
    ///
    /// A quarantined topic may be deleted too: that is how an operator
    /// clears it. Its files are removed only if its name is a valid file
    /// name (a `..` topic never names a directory).
    pub fn delete_topic(&mut self, name: &str) -> Result<Vec<MemberId>> {
        let quarantined = self.quarantined.contains_key(&(name.to_string(), None));
        if !quarantined {
            self.topic(name)?;
        }
        let entry = MetaEntry::TopicDeleted {
            name: name.to_string(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        self.quarantined.retain(|(topic, _), _| topic != name);
        let members = self.retire_states(|key| *key.topic == *name)?;
        match self.storage.remove_topic(name) {
            Err(StoreError::InvalidName(_)) if quarantined => {}
            other => other?,
        }
        Ok(members)
    }

    fn retire_states(&mut self, matches: impl Fn(&StateKey) -> bool) -> Result<Vec<MemberId>> {
        let mut dropped = Vec::new();
        for index in 0..self.states.len() {
            let state = &mut self.states[index];
            if state.retired || !matches(&state.key) {
                continue;
            }
            let (timers, members) = state.retire();
            let key = state.key.clone();
            for timer in timers {
                self.wheel.cancel(timer);
            }
            for member in members {
                self.members.remove(&member);
                dropped.push(member);
            }
            self.state_index.remove(&key);
            self.storage.remove_journal(&key.journal_name())?;
        }
        Ok(dropped)
    }

    /// Groups subscribed to `topic`.
    pub fn groups(&self, topic: &str) -> Vec<(String, GroupConfig)> {
        self.group_configs
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, g), c)| (g.clone(), c.clone()))
            .collect()
    }

    fn group_config(&self, topic: &str, group: &str) -> Result<GroupConfig> {
        self.group_configs
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
            .ok_or_else(|| DispatchError::UnknownGroup {
                topic: topic.into(),
                group: group.into(),
            })
    }

    fn load_state(&mut self, key: StateKey) -> Result<usize> {
        self.load_state_from(key, None)
    }

    /// Loads the state of a group journaled before this open. Its ack
    /// journal holds a snapshot of every partition (written when the group
    /// was made); a partition missing from it lost its frames (a damaged
    /// last frame is cut like a torn tail) and starts at the log's start,
    /// not at the group's start position: redelivery, never a skip.
    fn load_existing_state(&mut self, key: StateKey) -> Result<usize> {
        self.load_state_from(key, Some(StartPosition::Earliest))
    }

    fn load_state_from(&mut self, key: StateKey, missing: Option<StartPosition>) -> Result<usize> {
        if let Some(&index) = self.state_index.get(&key) {
            return Ok(index);
        }
        let config = self.group_config(&key.topic, &key.group)?;
        let now = self.now();
        let topic = self.topic(&key.topic)?;
        let partitions: Vec<Arc<dyn PartitionLog>> = topic.partitions.clone();
        let (journal, payloads) = self.storage.open_journal(&key.journal_name())?;
        let start = missing.unwrap_or(config.start);
        if missing.is_some() && payloads.is_empty() {
            tracing::warn!(
                journal = %key.journal_name(),
                "an existing group's ack journal is empty: it restarts at the log's start"
            );
        }
        let mut start_error = None;
        let (mut state, new) = GroupState::restore(
            key.clone(),
            config,
            partitions.len() as u32,
            journal,
            &payloads,
            now,
            |p| match resolve_start(partitions[p as usize].as_ref(), start) {
                Ok(offset) => offset,
                Err(error) => {
                    start_error = Some(error);
                    0
                }
            },
        )?;
        if let Some(error) = start_error {
            return Err(error.into());
        }
        // Offsets are used again after recovery cut a log back (a torn or
        // damaged tail, or a power loss under a lazy fsync policy): acks at
        // or above the log's end belong to records that are gone, and new
        // records will take those offsets. Forget them, durably, so that no
        // new record is skipped as "already acked".
        let mut clamped = false;
        for (partition, part) in state.partitions.iter_mut().enumerate() {
            let end = partitions[partition].end_offset();
            let floor = part.acks.floor();
            if part.acks.forget_from(end) {
                tracing::warn!(
                    journal = %key.journal_name(),
                    partition,
                    floor,
                    log_end = end,
                    "the group had acked past the end of the log (cut at recovery): \
                     acks at or above the end are forgotten"
                );
                part.cursor = part.acks.floor();
                clamped = true;
            }
        }
        if clamped {
            state.note_reset();
        }
        if new || clamped {
            state.sync(now, self.config.ack_journal_compact_bytes)?;
        }
        let index = self.states.len();
        self.states.push(state);
        self.state_index.insert(key, index);
        Ok(index)
    }

    /// A consumer joins a group; `member_name` identifies it across
    /// reconnects (broadcast groups keep a cursor per name).
    pub fn join(&mut self, topic: &str, group: &str, member_name: &str) -> Result<MemberId> {
        self.check_not_quarantined(topic, Some(group))?;
        let config = self.group_config(topic, group)?;
        let member = match config.mode {
            DeliveryMode::Clustering => None,
            DeliveryMode::Broadcast => {
                names::check_member(topic, group, member_name)?;
                Some(member_name.to_string())
            }
        };
        let state = self.load_state(StateKey {
            topic: topic.into(),
            group: group.into(),
            member,
        })?;
        let id = self.next_member_id;
        self.next_member_id += 1;
        self.states[state].members.push(id);
        self.members.insert(
            id,
            Member {
                state,
                name: member_name.to_string(),
                credit: 0,
            },
        );
        Ok(id)
    }

    /// The member's name (as given to `join`).
    pub fn member_name(&self, member: MemberId) -> Option<&str> {
        self.members.get(&member).map(|m| m.name.as_str())
    }

    /// A member leaves (or its connection died): its in-flight messages are
    /// redelivered to the other members at once.
    pub fn leave(&mut self, member: MemberId) -> Result<()> {
        let removed = self
            .members
            .remove(&member)
            .ok_or(DispatchError::UnknownMember(member))?;
        let state_index = removed.state;
        self.states[state_index].members.retain(|&m| m != member);
        let mut orphans = Vec::new();
        for (partition, state) in self.states[state_index].partitions.iter().enumerate() {
            for (&offset, pending) in &state.pending {
                if let Stage::InFlight {
                    member: holder,
                    timer,
                } = pending.stage
                {
                    if holder == member {
                        orphans.push((partition as u32, offset, timer));
                    }
                }
            }
        }
        for (partition, offset, timer) in orphans {
            self.wheel.cancel(timer);
            self.after_failed_attempt(
                state_index,
                partition,
                offset,
                Some(0),
                names::REASON_MEMBER_LEFT,
            )?;
        }
        Ok(())
    }

    /// Adds push credit: the member may receive `credit` more messages.
    pub fn add_credit(&mut self, member: MemberId, credit: u32) -> Result<()> {
        let member = self
            .members
            .get_mut(&member)
            .ok_or(DispatchError::UnknownMember(member))?;
        member.credit = member.credit.saturating_add(credit);
        Ok(())
    }

    /// Pull: up to `max` deliveries for this member now.
    pub fn fetch(&mut self, member: MemberId, max: u32) -> Result<Vec<Delivery>> {
        let state = self
            .members
            .get(&member)
            .ok_or(DispatchError::UnknownMember(member))?
            .state;
        let saved: Vec<(MemberId, u32)> = self.states[state]
            .members
            .iter()
            .filter_map(|m| self.members.get(m).map(|x| (*m, x.credit)))
            .collect();
        for (other, _) in &saved {
            if let Some(m) = self.members.get_mut(other) {
                m.credit = if *other == member { max } else { 0 };
            }
        }
        let now = self.now();
        self.fire_timers(now)?;
        self.fire_delays(now, FIRE_PER_POLL_MAX)?;
        let result = self.fill(state, now);
        // Pull does not consume push credit: everyone gets theirs back.
        for (other, credit) in saved {
            if let Some(m) = self.members.get_mut(&other) {
                m.credit = credit;
            }
        }
        result?;
        let (mine, others): (Vec<Delivery>, Vec<Delivery>) = std::mem::take(&mut self.outbox)
            .into_iter()
            .partition(|d| d.member == member);
        self.outbox = others;
        Ok(mine)
    }

    /// Gives back a message that [`fetch`](Self::fetch) handed to `member`
    /// and the caller did not send (it did not fit the answer frame): it is
    /// ready again at once, its ack deadline is dropped, and its next
    /// delivery carries the same attempt number (a delivery nobody
    /// received is not an attempt). Unlike a NACK, it never moves the
    /// message to the dead-letter topic. Returns false, changing nothing,
    /// if the message is not in flight to `member`.
    ///
    /// The `Delivered` event already emitted stays: the trace shows the
    /// same attempt delivered again.
    pub fn return_unsent(&mut self, member: MemberId, partition: u32, offset: u64) -> Result<bool> {
        let state_index = self.member_state(member)?;
        let state = &mut self.states[state_index];
        let Some(part) = state.partitions.get_mut(partition as usize) else {
            let topic = state.key.topic.to_string();
            return Err(DispatchError::UnknownPartition { topic, partition });
        };
        let Some(pending) = part.pending.get_mut(&offset) else {
            return Ok(false);
        };
        let Stage::InFlight {
            member: holder,
            timer,
        } = pending.stage
        else {
            return Ok(false);
        };
        if holder != member {
            return Ok(false);
        }
        self.wheel.cancel(timer);
        pending.attempt = pending.attempt.saturating_sub(1);
        pending.stage = Stage::Ready;
        part.ready.insert(offset);
        if let Some(rate) = &mut state.rate {
            rate.give_back();
        }
        Ok(true)
    }

    // ----- acks -------------------------------------------------------------

    fn member_state(&self, member: MemberId) -> Result<usize> {
        self.members
            .get(&member)
            .map(|m| m.state)
            .ok_or(DispatchError::UnknownMember(member))
    }

    /// Acknowledges one message for the member's group. Returns false if it
    /// was already acked. The ack is durable within `ack_sync_interval_ms`.
    pub fn ack(&mut self, member: MemberId, partition: u32, offset: u64) -> Result<bool> {
        let state = self.member_state(member)?;
        self.ack_in_state(state, partition, offset, None)
    }

    fn ack_in_state(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        silent_kind: Option<EventKind>,
    ) -> Result<bool> {
        let state = &mut self.states[state_index];
        let Some(part) = state.partitions.get_mut(partition as usize) else {
            let topic = state.key.topic.to_string();
            return Err(DispatchError::UnknownPartition { topic, partition });
        };
        if part.acks.is_acked(offset) {
            return Ok(false);
        }
        if offset >= part.cursor {
            return Err(DispatchError::NotDelivered { partition, offset });
        }
        let pending = part.pending.remove(&offset);
        part.ready.remove(&offset);
        part.acks.ack(offset);
        state.note_ack(partition, offset);
        let mut released = None;
        if let Some(pending) = &pending {
            match pending.stage {
                Stage::InFlight { timer, .. } | Stage::Waiting { timer } => {
                    self.wheel.cancel(timer);
                }
                Stage::Ready | Stage::Held => {}
            }
            if let Some(key) = &pending.key {
                released = Some(key.clone());
            }
        }
        if let Some(key) = released {
            release_key(
                &mut self.states[state_index].partitions[partition as usize],
                &key,
                offset,
            );
        }
        let id = pending.map(|p| p.id).unwrap_or_default();
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            silent_kind.unwrap_or(EventKind::Acked),
            None,
        );
        Ok(true)
    }

    /// Negatively acknowledges: the message is redelivered after `delay_ms`
    /// (default: the group's backoff), or dead-lettered after its last attempt.
    pub fn nack(
        &mut self,
        member: MemberId,
        partition: u32,
        offset: u64,
        delay_ms: Option<u64>,
    ) -> Result<()> {
        let state_index = self.member_state(member)?;
        let state = &self.states[state_index];
        let part = state.partitions.get(partition as usize).ok_or_else(|| {
            DispatchError::UnknownPartition {
                topic: state.key.topic.to_string(),
                partition,
            }
        })?;
        let Some(pending) = part.pending.get(&offset) else {
            return if part.acks.is_acked(offset) {
                Ok(())
            } else {
                Err(DispatchError::NotDelivered { partition, offset })
            };
        };
        let Stage::InFlight { timer, .. } = pending.stage else {
            return Ok(()); // already waiting for a retry
        };
        let retry_in_ms =
            delay_ms.unwrap_or_else(|| state.config.backoff.delay_ms(pending.attempt));
        let id = pending.id;
        self.wheel.cancel(timer);
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            EventKind::Nacked { retry_in_ms },
            None,
        );
        self.after_failed_attempt(
            state_index,
            partition,
            offset,
            Some(retry_in_ms),
            names::REASON_NACK,
        )
    }

    /// After a failed attempt (timeout, nack, member left): retry after
    /// `retry_in_ms` (default: backoff), or dead-letter after the last attempt.
    fn after_failed_attempt(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        retry_in_ms: Option<u64>,
        reason: &str,
    ) -> Result<()> {
        let now = self.now();
        let state = &mut self.states[state_index];
        let max_attempts = state.config.max_attempts.max(1);
        let backoff = state.config.backoff.clone();
        let part = &mut state.partitions[partition as usize];
        let Some(pending) = part.pending.get_mut(&offset) else {
            return Ok(());
        };
        if pending.attempt >= max_attempts {
            return self.dead_letter(state_index, partition, offset, reason);
        }
        let delay = retry_in_ms.unwrap_or_else(|| backoff.delay_ms(pending.attempt));
        let next_attempt = pending.attempt + 1;
        let id = pending.id;
        if delay == 0 {
            pending.stage = Stage::Ready;
            part.ready.insert(offset);
        } else {
            let timer = self.wheel.insert(
                now.saturating_add(delay as i64),
                TimerTask {
                    state: state_index as u32,
                    partition,
                    offset,
                    attempt: pending.attempt,
                    kind: TimerKind::Retry,
                },
            );
            pending.stage = Stage::Waiting { timer };
        }
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            EventKind::Redelivered { next_attempt },
            Some(reason),
        );
        Ok(())
    }

    fn dead_letter(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        reason: &str,
    ) -> Result<()> {
        self.dead_letter_many(&[(state_index, partition, offset)], reason)
            .map_err(|(_, error)| error)
    }

    /// Moves messages `(state, partition, offset)` to their groups'
    /// dead-letter topics, then acks them in their groups: one append (one
    /// durability wait) per dead-letter topic for the whole list. A message
    /// gone from its log (retention) is acked as expired instead. On
    /// failure returns the indexes (into `moves`) of the messages not moved,
    /// which stay pending, with the first error.
    fn dead_letter_many(
        &mut self,
        moves: &[(usize, u32, u64)],
        reason: &str,
    ) -> std::result::Result<(), (Vec<usize>, DispatchError)> {
        let mut failed = Vec::new();
        let mut first_error = None;
        let mut fail = |index: usize, error: DispatchError, failed: &mut Vec<usize>| {
            failed.push(index);
            if first_error.is_none() {
                first_error = Some(error);
            } else {
                tracing::error!(%error, "a dead-letter move failed");
            }
        };
        // (dead-letter topic, [(index into moves, copy)]), in first-move order.
        let mut copies: Vec<(String, Vec<(usize, RecordInput)>)> = Vec::new();
        for (index, &(state_index, partition, offset)) in moves.iter().enumerate() {
            match self.dead_letter_copy(state_index, partition, offset, reason) {
                Ok(Some((topic, copy))) => match copies.iter_mut().find(|(t, _)| *t == topic) {
                    Some((_, list)) => list.push((index, copy)),
                    None => copies.push((topic, vec![(index, copy)])),
                },
                Ok(None) => {}
                Err(error) => fail(index, error, &mut failed),
            }
        }
        for (dead_letter_topic, list) in copies {
            let (indexes, records): (Vec<usize>, Vec<RecordInput>) = list.into_iter().unzip();
            let written = self.topic(&dead_letter_topic).and_then(|state| {
                let log = Arc::clone(&state.partitions[0]);
                log.append(records)?;
                if log.durable_on_append() {
                    // The acks below may become durable before a lazy log
                    // writes the copies back: the copies must not be what a
                    // crash loses.
                    log.flush()?;
                }
                Ok(())
            });
            if let Err(error) = written {
                for index in indexes.iter().skip(1) {
                    failed.push(*index);
                }
                fail(indexes[0], error, &mut failed);
                continue;
            }
            for index in indexes {
                let (state_index, partition, offset) = moves[index];
                let kind = EventKind::DeadLettered {
                    dead_letter_topic: dead_letter_topic.clone(),
                };
                if let Err(error) = self.ack_in_state(state_index, partition, offset, Some(kind)) {
                    fail(index, error, &mut failed);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(error) => Err((failed, error)),
        }
    }

    /// The dead-letter copy of one pending message and the topic it goes
    /// to (created on first use), or `None` if the message is gone from its
    /// log (then acked as expired: nothing to move).
    fn dead_letter_copy(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        reason: &str,
    ) -> Result<Option<(String, RecordInput)>> {
        let (topic, group, dead_letter_topic) = {
            let state = &self.states[state_index];
            let dead_letter_topic = state
                .config
                .dead_letter_topic_for(&state.key.topic, &state.key.group);
            (
                state.key.topic.to_string(),
                state.key.group.to_string(),
                dead_letter_topic,
            )
        };
        let attempts = pending_attempt(&self.states[state_index], partition, offset);
        let log = Arc::clone(&self.topic(&topic)?.partitions[partition as usize]);
        let Some(record) = log
            .read(offset, 1)?
            .into_iter()
            .find(|r| r.offset == offset)
        else {
            // Gone from the log (retention): nothing to move; ack it.
            self.ack_in_state(state_index, partition, offset, Some(EventKind::Expired))?;
            return Ok(None);
        };
        if !self.topics.contains_key(&dead_letter_topic) {
            self.create_topic(
                &dead_letter_topic,
                TopicConfig {
                    partitions: 1,
                    ordered: false,
                },
            )?;
        }
        // A dead letter of a dead letter replaces the earlier move's
        // headers: a copy never grows past the frame headroom that the
        // six headers are counted in (PROTOCOL.md §8).
        let mut headers: Vec<(Bytes, Bytes)> = record
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with(names::DEAD_LETTER_HEADER_PREFIX.as_bytes()))
            .cloned()
            .collect();
        for (name, value) in [
            ("dmq.dlq.topic", topic.clone()),
            ("dmq.dlq.partition", partition.to_string()),
            ("dmq.dlq.offset", offset.to_string()),
            ("dmq.dlq.group", group.clone()),
            ("dmq.dlq.attempts", attempts.to_string()),
            ("dmq.dlq.reason", reason.to_string()),
        ] {
            headers.push((Bytes::from_static(name.as_bytes()), Bytes::from(value)));
        }
        let copy = RecordInput {
            id: Some(record.id),
            key: record.key.clone(),
            headers,
            value: record.value.clone(),
            deliver_at_ms: None,
            expire_at_ms: None,
        };
        Ok(Some((dead_letter_topic, copy)))
    }

    // ----- seek ---------------------------------------------------------------

    /// Moves a group (all partitions, or one) to `target`. With `dry_run` only
    /// reports what would change.
    pub fn seek(
        &mut self,
        topic: &str,
        group: &str,
        partition: Option<u32>,
        target: SeekTarget,
        dry_run: bool,
    ) -> Result<Vec<SeekPartition>> {
        let config = self.group_config(topic, group)?;
        let topic_state = self.topic(topic)?;
        let logs = topic_state.partitions.clone();
        if let Some(p) = partition {
            if p as usize >= logs.len() {
                return Err(DispatchError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: p,
                });
            }
        }
        let indexes: Vec<usize> = self
            .states
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
            .map(|(i, _)| i)
            .collect();
        let indexes = if indexes.is_empty() && config.mode == DeliveryMode::Clustering {
            vec![self.load_state(StateKey {
                topic: topic.into(),
                group: group.into(),
                member: None,
            })?]
        } else {
            indexes
        };
        let now = self.now();
        let mut report = Vec::new();
        for state_index in indexes {
            for (p, log) in logs.iter().enumerate() {
                if partition.is_some_and(|only| only as usize != p) {
                    continue;
                }
                let new_floor = resolve_start(log.as_ref(), target)?;
                let part = &self.states[state_index].partitions[p];
                let old_floor = part.acks.floor();
                let acked_above = |from: u64, to: u64| -> u64 {
                    let span = to.saturating_sub(from);
                    span - part.acks.unacked_in(from, to, usize::MAX).len() as u64
                };
                let end = log.end_offset();
                let (redelivered, skipped) = if new_floor < old_floor {
                    (old_floor - new_floor + acked_above(old_floor, end), 0)
                } else {
                    (
                        acked_above(new_floor, end),
                        part.acks.unacked_in(old_floor, new_floor, usize::MAX).len() as u64,
                    )
                };
                report.push(SeekPartition {
                    partition: p as u32,
                    old_floor,
                    new_floor,
                    redelivered,
                    skipped,
                });
                if dry_run {
                    continue;
                }
                let timers: Vec<_> = self.states[state_index].partitions[p]
                    .pending
                    .values()
                    .filter_map(|pending| match pending.stage {
                        Stage::InFlight { timer, .. } | Stage::Waiting { timer } => Some(timer),
                        _ => None,
                    })
                    .collect();
                for timer in timers {
                    self.wheel.cancel(timer);
                }
                self.states[state_index].partitions[p].reset(new_floor);
                self.states[state_index].note_reset();
            }
            if !dry_run {
                self.states[state_index].sync(now, self.config.ack_journal_compact_bytes)?;
            }
        }
        Ok(report)
    }

    /// Per-partition statistics of a group (for broadcast groups, summed over
    /// members' cursors is not meaningful: the first member's are shown).
    pub fn group_stats(&self, topic: &str, group: &str) -> Result<Vec<PartitionStats>> {
        self.group_config(topic, group)?;
        let logs = &self.topic(topic)?.partitions;
        let Some(state) = self
            .states
            .iter()
            .find(|s| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
        else {
            return Ok(Vec::new());
        };
        let now = self.now();
        // Pending delays by the partition they will be appended to (a
        // partition past the topic's end goes to its last one, as when it
        // fires), and those whose append failed and waits for the next poll.
        let last = logs.len().saturating_sub(1);
        let mut waiting = vec![0u64; logs.len()];
        let unfired = self
            .unfired
            .iter()
            .filter(|message| message.topic == topic)
            .map(|message| (message.partition, 1));
        for (partition, count) in self
            .delays
            .pending_in_topic(topic)
            .into_iter()
            .chain(unfired)
        {
            if let Some(slot) = waiting.get_mut((partition as usize).min(last)) {
                *slot += count;
            }
        }
        let mut stats = Vec::with_capacity(state.partitions.len());
        for (p, part) in state.partitions.iter().enumerate() {
            let end_offset = logs[p].end_offset();
            let floor = part.acks.floor();
            let acked = part.acks.acked_above_floor();
            let oldest_unacked_age_ms = if floor < end_offset {
                logs[p]
                    .read(floor, 1)?
                    .first()
                    .map(|record| now.saturating_sub(record.timestamp_ms).max(0) as u64)
            } else {
                None
            };
            let count = |wanted: fn(&Pending) -> bool| {
                part.pending.values().filter(|p| wanted(p)).count() as u64
            };
            stats.push(PartitionStats {
                partition: p as u32,
                ack_floor: floor,
                cursor: part.cursor,
                end_offset,
                lag: end_offset.saturating_sub(floor).saturating_sub(acked),
                unacked: part.pending.len() as u64,
                in_flight: count(|p| matches!(p.stage, Stage::InFlight { .. })),
                oldest_unacked_age_ms,
                delayed: count(|p| p.attempt == 0 && matches!(p.stage, Stage::Waiting { .. }))
                    + waiting.get(p).copied().unwrap_or(0),
            });
        }
        Ok(stats)
    }

    // ----- the pump -------------------------------------------------------------

    /// Does everything due by now: fires ack deadlines and retries, moves due
    /// delayed messages to their topics, hands messages to members within
    /// their credit and syncs acks. Returns the deliveries.
    pub fn poll(&mut self) -> Result<Vec<Delivery>> {
        let now = self.now();
        self.fire_timers(now)?;
        self.fire_delays(now, FIRE_PER_POLL_MAX)?;
        for state_index in 0..self.states.len() {
            self.fill(state_index, now)?;
        }
        self.sync_acks(now, false)?;
        Ok(std::mem::take(&mut self.outbox))
    }

    /// Makes every ack durable now (shutdown, tests).
    pub fn checkpoint(&mut self) -> Result<()> {
        let now = self.now();
        self.sync_acks(now, true)?;
        self.delays.checkpoint()?;
        Ok(())
    }

    /// When `poll` next has timed work to do (ack deadlines, retries, delays,
    /// ack syncs, rate limits), if ever.
    pub fn next_wakeup_ms(&self) -> Option<i64> {
        let mut next = [self.wheel.next_due_ms(), self.delays.next_due_ms()]
            .into_iter()
            .flatten()
            .min();
        for state in &self.states {
            if state.needs_sync() {
                let due = state.last_sync_ms + self.config.ack_sync_interval_ms as i64;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            if let Some(rate) = &state.rate {
                let due = rate.next_token_ms();
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    fn sync_acks(&mut self, now: i64, force: bool) -> Result<()> {
        let interval = self.config.ack_sync_interval_ms as i64;
        let compact = self.config.ack_journal_compact_bytes;
        for state in &mut self.states {
            if state.needs_sync() && (force || now - state.last_sync_ms >= interval) {
                state.sync(now, compact)?;
            }
        }
        Ok(())
    }

    fn fire_timers(&mut self, now: i64) -> Result<()> {
        let mut fired = Vec::new();
        self.wheel.advance(now, &mut fired);
        // Ack deadlines of messages on their last attempt: moved to their
        // dead-letter topics together, one append per topic, after the loop.
        let mut exhausted: Vec<(TimerTask, MemberId)> = Vec::new();
        for (_, task) in fired {
            let state_index = task.state as usize;
            let Some(state) = self.states.get_mut(state_index) else {
                continue;
            };
            let max_attempts = state.config.max_attempts.max(1);
            let Some(part) = state.partitions.get_mut(task.partition as usize) else {
                continue;
            };
            let Some(pending) = part.pending.get_mut(&task.offset) else {
                continue;
            };
            if pending.attempt != task.attempt {
                continue;
            }
            match (task.kind, pending.stage) {
                (TimerKind::AckDeadline, Stage::InFlight { member, .. }) => {
                    if pending.attempt >= max_attempts {
                        exhausted.push((task, member));
                        continue;
                    }
                    self.after_failed_attempt(
                        state_index,
                        task.partition,
                        task.offset,
                        None,
                        names::REASON_ACK_TIMEOUT,
                    )?;
                }
                (TimerKind::Retry, Stage::Waiting { .. }) => {
                    pending.stage = Stage::Ready;
                    part.ready.insert(task.offset);
                }
                _ => {}
            }
        }
        if exhausted.is_empty() {
            return Ok(());
        }
        let moves: Vec<(usize, u32, u64)> = exhausted
            .iter()
            .map(|(task, _)| (task.state as usize, task.partition, task.offset))
            .collect();
        if let Err((failed, error)) = self.dead_letter_many(&moves, names::REASON_ACK_TIMEOUT) {
            // A dead-letter move that failed (no room, a partition cap): the
            // messages stay in flight and are tried again later.
            tracing::error!(
                %error,
                messages = failed.len(),
                retry_in_ms = TIMER_RETRY_AFTER_ERROR_MS,
                "moving timed-out messages to their dead-letter topics failed"
            );
            for index in failed {
                let (task, member) = exhausted[index];
                let timer = self
                    .wheel
                    .insert(now.saturating_add(TIMER_RETRY_AFTER_ERROR_MS), task);
                let pending = self.states[task.state as usize].partitions[task.partition as usize]
                    .pending
                    .get_mut(&task.offset);
                match pending {
                    Some(pending) => pending.stage = Stage::InFlight { member, timer },
                    None => {
                        self.wheel.cancel(timer);
                    }
                }
            }
        }
        Ok(())
    }

    /// Fires due delayed messages, at most about `limit` of them (whole
    /// batches).
    fn fire_delays(&mut self, now: i64, limit: usize) -> Result<()> {
        let mut fired_this_poll = 0;
        while fired_this_poll < limit {
            // Messages whose append failed last time (a full disk) go
            // first, in due order, before any new one is polled.
            let due: Vec<DueMessage> = if self.unfired.is_empty() {
                self.delays.poll_due(now, FIRE_BATCH_MAX)?
            } else {
                self.unfired.drain(..).collect()
            };
            if due.is_empty() {
                return Ok(());
            }
            fired_this_poll += due.len();
            let (fired, failure) = self.fire_batch(due)?;
            self.delays.mark_fired(&fired)?;
            if let Some(error) = failure {
                tracing::error!(
                    %error,
                    waiting = self.unfired.len(),
                    "firing delayed messages failed; they are tried again at the next poll"
                );
                return Ok(());
            }
        }
        // More are due: `next_wakeup_ms` is already past, so the next poll
        // comes at once, after the groups had their turn.
        Ok(())
    }

    /// Appends due messages to their topics: one append (one durability
    /// wait) per partition, each partition's messages in due order. A
    /// message whose topic is gone is dropped; one whose copy is already in
    /// its log (fired before a crash lost its fired mark) is skipped.
    /// Returns the ids to mark fired, and the first append error: that
    /// partition's messages and every later partition's wait in `unfired`
    /// for the next poll (a delay never waits for a restart to fire).
    fn fire_batch(
        &mut self,
        due: Vec<DueMessage>,
    ) -> Result<(Vec<MessageId>, Option<DispatchError>)> {
        let mut fired = Vec::with_capacity(due.len());
        // (log, topic, partition, messages), in first-due order.
        let mut batches: Vec<(Arc<dyn PartitionLog>, u32, Vec<DueMessage>)> = Vec::new();
        for message in due {
            let Some(topic) = self.topics.get(&message.topic) else {
                tracing::warn!(topic = message.topic, id = %message.id, "delayed message for a deleted topic dropped");
                fired.push(message.id);
                continue;
            };
            let partition = message.partition.min(topic.config.partitions - 1);
            let log = &topic.partitions[partition as usize];
            // Due before this dispatcher opened: it may have fired before a
            // crash that lost its fired mark. A copy already in the log is
            // not appended again (a second copy would escape a deletion
            // that covered the first).
            if message.due_ms <= self.opened_at_ms && log.find_by_id(&message.id)?.is_some() {
                fired.push(message.id);
                continue;
            }
            match batches
                .iter_mut()
                .find(|(l, _, m)| Arc::ptr_eq(l, log) && m[0].topic == message.topic)
            {
                Some((_, _, messages)) => messages.push(message),
                None => batches.push((Arc::clone(log), partition, vec![message])),
            }
        }
        let mut batches = batches.into_iter();
        // Logs with a lazy fsync policy that got fired copies: flushed
        // before the fired marks, which may become durable at once (a
        // message durable in the timer log must not become a copy a power
        // loss can take back).
        let mut lazy_logs: Vec<Arc<dyn PartitionLog>> = Vec::new();
        let mut failure = None;
        while let Some((log, partition, messages)) = batches.next() {
            let records = messages.iter().map(|m| m.record.clone()).collect();
            match log.append(records) {
                Ok(appended) => {
                    if log.durable_on_append() {
                        lazy_logs.push(Arc::clone(&log));
                    }
                    for (message, (offset, id)) in messages.iter().zip(appended) {
                        self.emit(
                            id,
                            Place {
                                topic: Name::Plain(&message.topic),
                                partition: Some(partition),
                                offset: Some(offset),
                                group: None,
                            },
                            EventKind::DelayFired,
                            None,
                        );
                        fired.push(message.id);
                    }
                }
                Err(error) => {
                    self.unfired.extend(messages);
                    for (_, _, messages) in batches.by_ref() {
                        self.unfired.extend(messages);
                    }
                    failure = Some(error.into());
                }
            }
        }
        for log in lazy_logs {
            log.flush()?;
        }
        Ok((fired, failure))
    }

    /// Hands messages of one state to its members within their credit.
    fn fill(&mut self, state_index: usize, now: i64) -> Result<()> {
        loop {
            let Some(member) = self.next_member_with_credit(state_index) else {
                return Ok(());
            };
            if let Some(rate) = &mut self.states[state_index].rate {
                if !rate.try_take(now) {
                    return Ok(());
                }
            }
            let Some((partition, record, attempt)) = self.next_message(state_index, now)? else {
                if let Some(rate) = &mut self.states[state_index].rate {
                    rate.give_back();
                }
                return Ok(());
            };
            self.deliver(state_index, member, partition, record, attempt, now);
        }
    }

    fn next_member_with_credit(&mut self, state_index: usize) -> Option<MemberId> {
        let state = &mut self.states[state_index];
        let count = state.members.len();
        for i in 0..count {
            let index = (state.next_member + i) % count;
            let member = state.members[index];
            if self.members.get(&member).is_some_and(|m| m.credit > 0) {
                state.next_member = (index + 1) % count;
                return Some(member);
            }
        }
        None
    }

    fn deliver(
        &mut self,
        state_index: usize,
        member: MemberId,
        partition: u32,
        record: Record,
        attempt: u32,
        now: i64,
    ) {
        let state = &mut self.states[state_index];
        let deadline = now.saturating_add(state.config.ack_timeout_ms as i64);
        let timer = self.wheel.insert(
            deadline,
            TimerTask {
                state: state_index as u32,
                partition,
                offset: record.offset,
                attempt,
                kind: TimerKind::AckDeadline,
            },
        );
        if let Some(pending) = state.partitions[partition as usize]
            .pending
            .get_mut(&record.offset)
        {
            pending.attempt = attempt;
            pending.stage = Stage::InFlight { member, timer };
        }
        if let Some(m) = self.members.get_mut(&member) {
            m.credit = m.credit.saturating_sub(1);
        }
        let (topic, group) = (state.key.topic.clone(), state.key.group.clone());
        self.emit(
            record.id,
            Place {
                topic: Name::Shared(&topic),
                partition: Some(partition),
                offset: Some(record.offset),
                group: Some(Name::Shared(&group)),
            },
            EventKind::Delivered { attempt, member },
            None,
        );
        self.outbox.push(Delivery {
            member,
            topic,
            group,
            partition,
            attempt,
            record,
        });
    }

    /// The next message to deliver from any partition (round robin):
    /// redeliveries first, then the cursor. Returns (partition, record,
    /// attempt number of this delivery).
    fn next_message(&mut self, state_index: usize, now: i64) -> Result<Option<(u32, Record, u32)>> {
        let partitions = self.states[state_index].partitions.len();
        for i in 0..partitions {
            let partition = (self.states[state_index].next_partition + i) % partitions;
            if let Some((record, attempt)) =
                self.next_in_partition(state_index, partition as u32, now)?
            {
                self.states[state_index].next_partition = (partition + 1) % partitions;
                return Ok(Some((partition as u32, record, attempt)));
            }
        }
        Ok(None)
    }

    fn next_in_partition(
        &mut self,
        state_index: usize,
        partition: u32,
        now: i64,
    ) -> Result<Option<(Record, u32)>> {
        let topic_name = self.states[state_index].key.topic.clone();
        let topic = self.topic(&topic_name)?;
        let log = Arc::clone(&topic.partitions[partition as usize]);
        let ordered = topic.config.ordered;
        // Redeliveries (and released held messages) first.
        while let Some(offset) = self.states[state_index].partitions[partition as usize]
            .ready
            .pop_first()
        {
            let Some(record) = log
                .read(offset, 1)?
                .into_iter()
                .find(|r| r.offset == offset)
            else {
                self.ack_in_state(state_index, partition, offset, Some(EventKind::Expired))?;
                continue;
            };
            if let Some(kind) = self.skip_reason(&topic_name, partition, &record, now) {
                self.ack_in_state(state_index, partition, offset, Some(kind))?;
                continue;
            }
            let attempt = pending_attempt(&self.states[state_index], partition, offset) + 1;
            return Ok(Some((record, attempt)));
        }
        // Then the cursor.
        match self.advance_cursor(state_index, partition, &log, ordered, now)? {
            Next::Deliver(record) => Ok(Some((record, 1))),
            Next::Nothing => Ok(None),
        }
    }

    fn skip_reason(
        &self,
        topic: &str,
        partition: u32,
        record: &Record,
        now: i64,
    ) -> Option<EventKind> {
        if self
            .topics
            .get(topic)
            .is_some_and(|t| t.tombstones.covers(partition, record))
        {
            return Some(EventKind::Deleted);
        }
        if record.expire_at_ms.is_some_and(|expire| expire <= now) {
            return Some(EventKind::Expired);
        }
        None
    }

    fn advance_cursor(
        &mut self,
        state_index: usize,
        partition: u32,
        log: &Arc<dyn PartitionLog>,
        ordered: bool,
        now: i64,
    ) -> Result<Next> {
        let batch = self.config.read_batch_records.max(1);
        loop {
            let state = &mut self.states[state_index];
            let cap = state.config.max_unacked_per_partition.max(1) as usize;
            let part = &mut state.partitions[partition as usize];
            // The ack bitmap spans at most SPAN_OFFSETS_MAX offsets above the
            // floor: a message stuck at the floor stops the cursor there.
            // (The floor may be above the cursor: acks restored after a
            // restart, not yet passed by the cursor.)
            let span_full =
                part.cursor.saturating_sub(part.acks.floor()) >= AckBitmap::SPAN_OFFSETS_MAX - 1;
            if part.pending.len() >= cap || span_full {
                return Ok(Next::Nothing);
            }
            if part.lookahead.is_empty() {
                if part.cursor >= log.end_offset() {
                    return Ok(Next::Nothing);
                }
                let cursor = part.cursor.max(log.start_offset());
                part.lookahead
                    .extend(log.read_whole_batches(cursor, batch)?);
            }
            let Some(record) = part.lookahead.pop_front() else {
                return Ok(Next::Nothing);
            };
            let offset = record.offset;
            if offset < part.cursor {
                continue;
            }
            // Offsets skipped over were deleted by retention: nothing to deliver.
            if part.cursor < offset {
                part.acks.ack_below(offset);
                state.note_reset();
            }
            let part = &mut state.partitions[partition as usize];
            part.cursor = offset + 1;
            if part.acks.is_acked(offset) {
                continue;
            }
            let topic = state.key.topic.clone();
            if let Some(kind) = self.skip_reason(&topic, partition, &record, now) {
                let part = &mut self.states[state_index].partitions[partition as usize];
                part.pending.insert(
                    offset,
                    Pending {
                        id: record.id,
                        key: None,
                        attempt: 0,
                        stage: Stage::Ready,
                    },
                );
                self.ack_in_state(state_index, partition, offset, Some(kind))?;
                continue;
            }
            let part = &mut self.states[state_index].partitions[partition as usize];
            let key = if ordered { record.key.clone() } else { None };
            let mut pending = Pending {
                id: record.id,
                key: key.clone(),
                attempt: 0,
                stage: Stage::Ready,
            };
            if let Some(key) = &key {
                if part.key_owner.contains_key(key) {
                    pending.stage = Stage::Held;
                    part.held.entry(key.clone()).or_default().push_back(offset);
                    part.pending.insert(offset, pending);
                    continue;
                }
                part.key_owner.insert(key.clone(), offset);
            }
            if let Some(due) = record.deliver_at_ms.filter(|&due| due > now) {
                let task = TimerTask {
                    state: state_index as u32,
                    partition,
                    offset,
                    attempt: 0,
                    kind: TimerKind::Retry,
                };
                pending.stage = Stage::Waiting {
                    timer: self.wheel.insert(due, task),
                };
                self.states[state_index].partitions[partition as usize]
                    .pending
                    .insert(offset, pending);
                continue;
            }
            self.states[state_index].partitions[partition as usize]
                .pending
                .insert(offset, pending);
            return Ok(Next::Deliver(record));
        }
    }
}

fn pending_attempt(state: &GroupState, partition: u32, offset: u64) -> u32 {
    state.partitions[partition as usize]
        .pending
        .get(&offset)
        .map_or(0, |p| p.attempt)
}

/// The key's owner `offset` is done: its next held message becomes the owner
/// and is ready. A held `offset` acked out of turn (a consumer's ack from
/// before a seek) leaves the hold queue: it must never become the owner.
fn release_key(part: &mut PartitionState, key: &Bytes, offset: u64) {
    if part.key_owner.get(key) != Some(&offset) {
        if let Some(queue) = part.held.get_mut(key) {
            queue.retain(|&held| held != offset);
            if queue.is_empty() {
                part.held.remove(key);
            }
        }
        return;
    }
    let next = part.held.get_mut(key).and_then(|queue| queue.pop_front());
    match next {
        Some(next) => {
            part.key_owner.insert(key.clone(), next);
            if let Some(pending) = part.pending.get_mut(&next) {
                pending.stage = Stage::Ready;
                part.ready.insert(next);
            }
            if part.held.get(key).is_some_and(|q| q.is_empty()) {
                part.held.remove(key);
            }
        }
        None => {
            part.key_owner.remove(key);
        }
    }
}

/// A partition count any topic may have (the configured caps come on top
/// for new topics).
/// An ack timeout whose handling failed (a dead-letter move without room)
/// is tried again after this.
const TIMER_RETRY_AFTER_ERROR_MS: i64 = 1_000;

/// Most due delayed messages one batch of [`Dispatcher::poll`] appends
/// (one append per partition for the whole batch).
const FIRE_BATCH_MAX: usize = 4_096;

/// Most due delayed messages one [`Dispatcher::poll`] fires: a burst of
/// millions fires over several polls, and the groups are served between.
const FIRE_PER_POLL_MAX: usize = 32_768;

fn check_partition_count(partitions: u32) -> Result<(), String> {
    if partitions == 0 {
        Err("a topic needs at least one partition".to_string())
    } else {
        Ok(())
    }
}

fn resolve_start(log: &dyn PartitionLog, start: StartPosition) -> Result<u64, StoreError> {
    Ok(match start {
        StartPosition::Earliest => log.start_offset(),
        StartPosition::Latest => log.end_offset(),
        StartPosition::Timestamp(t) => log
            .offset_for_timestamp(t)?
            .unwrap_or_else(|| log.end_offset()),
        StartPosition::Offset(offset) => offset.clamp(log.start_offset(), log.end_offset()),
    })
}
