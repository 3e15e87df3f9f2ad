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
//! 2. It is delivered to a member with credit (round robin, a turn being a
//!    chunk of one partition's consecutive messages), with an ack deadline
//!    in the timing wheel.
//! 3. An ACK sets its bit in the group's [`crate::AckBitmap`]. A NACK, a
//!    missed deadline or the member leaving schedules a redelivery after the
//!    group's backoff (the member leaving: at once); after `max_attempts` it
//!    goes to the dead-letter topic and is acked.
//!
//! Memory is bounded by configuration: per partition at most
//! `max_unacked_per_partition` pending messages and one read batch.
//!
//! # Rooms
//! This module holds the state ([`Dispatcher`]'s fields), opening and
//! replaying the metadata journal, quarantine and the event helpers; each
//! job lives in its own file, as an `impl Dispatcher` block:
//! `topics` (create, look up, route, delete), `produce` (records and
//! delays entering a topic), `deletion` (tombstones), `queries` (the admin
//! API's reads and group statistics), `membership` (groups, members,
//! credit, pull), `acks` (acks, nacks, redelivery, dead letters), `seek`,
//! and `pump` (timers, fired delays, filling members, ack syncs).
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
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use dmq_log_store::{AppendInfo, BatchInput, Clock, MessageId, Record, RecordInput};
use serde::{Deserialize, Serialize};

use crate::ack_bitmap::AckBitmap;
use crate::config::{DeliveryMode, DispatcherConfig, GroupConfig, StartPosition, TopicConfig};
use crate::delay_store::{DelayConfig, DelayError, DelayStore, DueMessage, PendingSchedule};
use crate::events::{Event, EventKind, EventSink};
use crate::group::{
    AckJournalError, AckMerge, GroupState, MemberId, PartitionState, Pending, Stage, StateKey,
};
use crate::names::{self, NameError};
use crate::routing::Router;
use crate::storage::{Journal, PartitionLog, RecoveryDamage, Storage, StoreError};
use crate::timing_wheel::TimingWheel;
use crate::tombstones::{CountPlan, Tombstones};
use crate::transactions::{ProducerEpochs, TransactionLog, TxnError, TxnOutcome};
use crate::txn_checks::{CheckLimits, CheckSchedule, TxnCheck};
use crate::writer::{
    BackgroundWriter, DurableWriter, InlineWriter, WriteDone, WriteError, WriteJob, WriteWork,
};

mod acks;
mod deletion;
mod membership;
mod produce;
mod pump;
mod queries;
mod seek;
mod topics;
mod transactions;

use transactions::{CommitMove, Ending, HalfWrite, Moving, RetryWaiters};
pub use transactions::{
    TransactionCounts, TransactionInfo, TransactionTopics, TxnEndReply, TxnProduceReply,
    TxnProduced,
};

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
    /// A transaction request was refused, or the transaction store failed.
    #[error(transparent)]
    Transaction(#[from] TxnError),
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
    /// A cluster topic's shared deletions journal
    /// ([`names::tombstone_journal`]): its deletions go there, not to the
    /// metadata journal, so that every node applies them.
    shared_tombstones: Option<Box<dyn Journal>>,
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
    /// The clock read at the start of the caller's current round (see
    /// [`Dispatcher::begin_round`]): the time of the round's trace events.
    round_ms: Option<i64>,
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
    /// Due messages whose append failed: fired first at a later poll,
    /// once nothing else is being written.
    unfired: VecDeque<DueMessage>,
    /// Appends the dispatcher decided on (fired delays); see
    /// [`crate::writer`]. Inline unless [`Dispatcher::write_in_background`].
    writer: Box<dyn DurableWriter>,
    /// The writer's outcomes, and the sender a new writer gets.
    written: mpsc::Receiver<WriteDone>,
    written_tx: mpsc::Sender<WriteDone>,
    /// What each write handed to the writer is for, by ticket.
    writes: HashMap<u64, InFlightWrite>,
    next_write_ticket: u64,
    /// Transactions: half records and outcomes (see
    /// [`crate::transactions`]).
    txns: TransactionLog,
    /// COMMITs and ROLLBACKs asked for and not yet durable, by handle.
    endings: HashMap<u64, Ending>,
    /// Retries of numbered produces (TXN_PRODUCE_SEQ) whose first try is
    /// still being written, by (handle, sequence): answered with it.
    txn_retries: HashMap<(u64, u32), RetryWaiters>,
    /// Committed transactions whose records are with the writer.
    moving: HashMap<u64, Moving>,
    /// Committed transactions whose move failed: moved again later.
    unmoved: VecDeque<u64>,
    /// Transactions whose commit became durable since the last poll:
    /// moved together at the next.
    to_move: Vec<u64>,
    /// When to check back on open transactions.
    checks: CheckSchedule,
    /// Transactional producers' epochs (fencing).
    epochs: ProducerEpochs,
    /// Checks decided and not yet taken by the owner
    /// ([`Dispatcher::take_txn_checks`]).
    txn_checks: Vec<TxnCheck>,
    /// Messages acked by an unsettled transaction (TXN_ACK), by delivery
    /// state and position: the handle that claims each. A second
    /// transaction acking one of them is refused.
    claims: HashMap<(StateKey, u32, u64), u64>,
    /// A committed transaction's acks were applied since the group
    /// journals were last synced: they are synced before the watermark
    /// passes it.
    txn_acks_unsynced: bool,
    /// A transaction settled since the watermark was last made durable.
    txn_settled: bool,
    txn_flushed_ms: i64,
}

/// What a write handed to the writer was for (see
/// [`Dispatcher::submit_write`]).
#[derive(Debug)]
enum InFlightWrite {
    /// Fired delayed messages, to one partition.
    Fire(FiringBatch),
    /// Dead-letter copies, to one dead-letter topic.
    DeadLetters(DeadLetterBatch),
    /// A delayed produce's timer-log append, waited for.
    Schedule(Scheduling),
    /// A transaction's half append, waited for.
    Half(HalfWrite),
    /// A transaction's outcome record, waited for.
    Outcome { handle: u64, outcome: TxnOutcome },
    /// A committed transaction's records entering a topic.
    Commit(CommitMove),
}

/// Where the answer to [`Dispatcher::schedule_delayed`] goes, called on
/// the dispatcher's thread once the messages are pending (or failed).
pub type ScheduleReply = Box<dyn FnOnce(Result<Vec<Produced>>) + Send>;

/// A delayed produce appended to the timer log, waiting for its
/// durability.
pub(super) struct Scheduling {
    topic: String,
    /// (partition, due) per record, in request order.
    records: Vec<(u32, i64)>,
    pending: PendingSchedule,
    reply: ScheduleReply,
}

impl std::fmt::Debug for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduling")
            .field("topic", &self.topic)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// Dead-letter copies being written to one dead-letter topic.
#[derive(Debug)]
struct DeadLetterBatch {
    topic: String,
    moves: Vec<DeadLetterMove>,
}

/// A message in [`Stage::DeadLettering`], and who held it before.
#[derive(Debug)]
struct DeadLetterMove {
    state: usize,
    partition: u32,
    offset: u64,
    id: MessageId,
    member: Option<MemberId>,
}

/// A batch of fired delayed messages being written to one partition.
#[derive(Debug)]
struct FiringBatch {
    topic: String,
    partition: u32,
    messages: Vec<FiredMessage>,
}

/// What the dispatcher keeps of a fired message while the writer has its
/// record.
#[derive(Debug)]
struct FiredMessage {
    id: MessageId,
    /// The partition the delay store named (before clamping to the topic).
    partition: u32,
    due_ms: i64,
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
        let (txns, txn_recovery) =
            TransactionLog::open(Arc::clone(&storage), config.transactions.clone())?;
        if txn_recovery.records_read > 0 {
            tracing::info!(?txn_recovery, "transactions recovered");
        }
        let (written_tx, written) = mpsc::channel();
        let epochs = ProducerEpochs::open(storage.as_ref())?;
        let check_limits = CheckLimits {
            timeout_ms: config.transactions.timeout_ms,
            backoff_max_ms: config.transactions.check_backoff_max_ms,
            max_checks: config.transactions.max_checks,
            per_second: config.transactions.checks_per_second,
        };
        let mut dispatcher = Dispatcher {
            wheel: TimingWheel::new(config.tick_ms, now),
            storage,
            clock,
            round_ms: None,
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
            writer: Box::new(InlineWriter::new(written_tx.clone())),
            written,
            written_tx,
            writes: HashMap::new(),
            next_write_ticket: 0,
            txns,
            endings: HashMap::new(),
            txn_retries: HashMap::new(),
            moving: HashMap::new(),
            unmoved: VecDeque::new(),
            to_move: Vec::new(),
            claims: HashMap::new(),
            txn_acks_unsynced: false,
            txn_settled: false,
            txn_flushed_ms: now,
            checks: CheckSchedule::new(check_limits),
            epochs,
            txn_checks: Vec::new(),
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
        // Transactions that committed before the restart enter their
        // topics before anything else happens; the open ones are checked
        // back again from their timeout.
        dispatcher.claim_acks_at_open();
        dispatcher.move_committed_at_open()?;
        dispatcher.schedule_checks_at_open();
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
                self.install_topic(name, config, partitions)?;
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

    /// Serves a topic whose partitions are open; a cluster topic's
    /// deletions are read from its shared journal (and go there).
    fn install_topic(
        &mut self,
        name: String,
        config: TopicConfig,
        partitions: Vec<Arc<dyn PartitionLog>>,
    ) -> Result<()> {
        let shared = if self.storage.shares_journals(&name) {
            Some(
                self.storage
                    .open_journal(&names::tombstone_journal(&name))?,
            )
        } else {
            None
        };
        self.topics.insert(
            name.clone(),
            TopicState {
                router: Arc::new(Router::new(config.partitions)),
                config,
                partitions,
                tombstones: Tombstones::default(),
                shared_tombstones: None,
            },
        );
        if let Some((journal, payloads)) = shared {
            self.apply_shared_tombstones(&name, &payloads);
            if let Some(state) = self.topics.get_mut(&name) {
                state.shared_tombstones = Some(journal);
            }
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

    /// Starts a round of work (a batch of commands and a poll): the trace
    /// events of the round are stamped with the clock read now, instead of
    /// one clock read per event (two per delivered message, 7 % of the
    /// dispatcher's time in a burst of fired delays). Decisions still read
    /// the clock themselves. Without a round (tests, the simulation) each
    /// event reads the clock.
    pub fn begin_round(&mut self) {
        self.round_ms = Some(self.clock.now_ms());
    }

    fn emit(&self, message_id: MessageId, place: Place<'_>, kind: EventKind, reason: Option<&str>) {
        if !self.events.enabled() {
            return;
        }
        self.events.emit(Event {
            time_ms: self.round_ms.unwrap_or_else(|| self.now()),
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
}

/// The record at `offset`, or `None` if it is gone from the log
/// (retention, a deletion reclaimed, a cut).
pub(super) fn record_at(log: &dyn PartitionLog, offset: u64) -> Result<Option<Record>, StoreError> {
    Ok(log
        .read(offset, 1)?
        .into_iter()
        .find(|r| r.offset == offset))
}

pub(super) fn pending_attempt(state: &GroupState, partition: u32, offset: u64) -> u32 {
    state.partitions[partition as usize]
        .pending
        .get(&offset)
        .map_or(0, |p| p.attempt)
}

/// The key's owner `offset` is done: its next held message becomes the owner
/// and is ready. A held `offset` acked out of turn (a consumer's ack from
/// before a seek) leaves the hold queue: it must never become the owner.
pub(super) fn release_key(part: &mut PartitionState, key: &Bytes, offset: u64) {
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

/// An ack timeout whose handling failed (a dead-letter move without room)
/// is tried again after this.
pub(super) const TIMER_RETRY_AFTER_ERROR_MS: i64 = 1_000;

/// Most due delayed messages one batch of [`Dispatcher::poll`] appends
/// (one append per partition for the whole batch).
pub(super) const FIRE_BATCH_MAX: usize = 4_096;

/// Most due delayed messages one [`Dispatcher::poll`] fires: a burst of
/// millions fires over several polls, and the groups are served between.
pub(super) const FIRE_PER_POLL_MAX: usize = 32_768;

/// At most this many fired messages are being written by the background
/// writer at once: the memory a burst of due delays holds outside the
/// delay store, and how far firing runs ahead of the disk.
pub(super) const FIRE_IN_FLIGHT_MAX: usize = 4 * FIRE_BATCH_MAX;
/// Messages of one partition a member takes in one turn of a fill.
pub(super) const FILL_CHUNK: usize = 64;

/// A partition count any topic may have (the configured caps come on top
/// for new topics).
pub(super) fn check_partition_count(partitions: u32) -> Result<(), String> {
    if partitions == 0 {
        Err("a topic needs at least one partition".to_string())
    } else {
        Ok(())
    }
}

pub(super) fn resolve_start(
    log: &dyn PartitionLog,
    start: StartPosition,
) -> Result<u64, StoreError> {
    Ok(match start {
        StartPosition::Earliest => log.start_offset(),
        StartPosition::Latest => log.end_offset(),
        StartPosition::Timestamp(t) => log
            .offset_for_timestamp(t)?
            .unwrap_or_else(|| log.end_offset()),
        StartPosition::Offset(offset) => offset.clamp(log.start_offset(), log.end_offset()),
    })
}
