//! Transactions: half messages, stored durably but delivered to no group
//! until their transaction commits (they then enter their topics with their
//! ids), and never once it rolls back.
//!
//! The [`TransactionLog`] owns what is durable and what is open; the
//! dispatcher (`dispatcher/transactions.rs`) decides when to append, waits
//! through the durable writer, and moves committed records into their
//! topics.
//!
//! # Layout
//!
//! - **Half log**: the internal partition `__dmq_txn/0`, appended to only by
//!   this store, on the dispatcher's thread. Two kinds of records, told apart
//!   by their headers (names start with `dmq.txn.`, reserved for the broker):
//!   - a *half record*: the producer's record (key, headers, value, times)
//!     plus `dmq.txn.group` (producer group, UTF-8), `dmq.txn.id`
//!     (transaction id, UTF-8), `dmq.txn.handle` (`u64` LE),
//!     `dmq.txn.topic` (destination topic, UTF-8), `dmq.txn.partition`
//!     (`u32` LE) and `dmq.txn.times` (`u8`: bit 0, the deliver-at time was
//!     given as a delay; bit 1, the expire-at time as a TTL: both are moved
//!     by the time between the produce and the commit, so that a delay
//!     starts at the commit); the first record of each TXN_PRODUCE also
//!     `dmq.txn.step`: its sequence number within the transaction, its
//!     record count and its digest (three `u32` LE; see *Sequences*);
//!   - an *ack record* (TXN_ACK): `dmq.txn.group`, `dmq.txn.id`,
//!     `dmq.txn.handle`, `dmq.txn.topic` (the consumed topic),
//!     `dmq.txn.ack-group` (the consumer group, UTF-8) and, for a member of
//!     a broadcast group, `dmq.txn.ack-member`; its value is the acked
//!     messages, `count × (u32 partition, u64 offset)` LE. Applied to the
//!     group when the transaction commits;
//!   - an *outcome record*: an empty value and `dmq.txn.group`,
//!     `dmq.txn.id`, `dmq.txn.handle` and `dmq.txn.outcome` (`u8`: 1
//!     commit, 2 rollback).
//! - **Meta journal** `txn.meta`: one payload, rewritten atomically: byte 0
//!   version `1`, bytes 1..9 the `u64` LE watermark.
//! - **Check journal** `txn.checks`: one payload per check-back sent,
//!   version `1`, `u64` LE handle, `u32` LE the check's number; the last
//!   payload of a handle wins. Synced before the checks are handed out, so
//!   a restart resumes each transaction's count (an unresolved one stays
//!   unresolved). Rewritten with the unsettled transactions' counts when
//!   it holds four times as many payloads (and at least 1,024).
//!
//! # Handles
//!
//! A transaction's handle is one more than the half-log offset of its first
//! record (the log's end offset when it begins: this store is the log's
//! only writer), so it is never 0 (0 asks for a new transaction).
//! Every record of the transaction carries it, and COMMIT and ROLLBACK must
//! name it: a late or repeated COMMIT of an earlier transaction with the same
//! producer group and id never applies to a later one.
//!
//! # Sequences
//!
//! Each TXN_PRODUCE of a transaction is a *step*, numbered from 0 in the
//! order they were appended, with the CRC-32 of its topic and records
//! (keys, headers, values; not partitions, which unkeyed records get
//! round robin, nor resolved times). A TXN_PRODUCE_SEQ names its number:
//! one the transaction has is a retry, answered from the step (the same
//! ids, read back from the half log) when the digest matches, and refused
//! as a conflict when it does not; the next number is stored; a larger
//! one is refused (a step between them was not stored). A transaction
//! replayed from records written without step headers (by an older
//! broker) has unknown steps: a numbered produce into it is refused.
//!
//! # Crash argument
//!
//! - A half record is answered only once durable (the caller waits through
//!   the durable writer); an outcome record too.
//! - A commit's records are moved into their topics only after its outcome
//!   record is durable, so a crash never leaves a moved record of a
//!   transaction that recovery would find open or rolled back.
//! - Watermark `W`: every half-log record below `W` belongs to a settled
//!   transaction: rolled back, or committed with every record durable in its
//!   topic (or the delay store). `W` is the handle of the oldest transaction
//!   not settled (the log's end if none), written lazily by
//!   [`TransactionLog::flush_watermark`]; the half log below it is deleted
//!   segment by segment.
//! - Opening replays the half log from `W` to its end: records whose handle
//!   is below `W` (of settled transactions) are skipped, unless their
//!   transaction was relocated (below); outcome records of unknown handles
//!   are skipped; a transaction with a commit record is *committed* (its
//!   records may or may not be in their topics: the dispatcher looks each up
//!   by id before moving it, so none is stored twice); one with a rollback
//!   record is settled; the rest are open again, with the age of their first
//!   record.
//! - A half append whose durability wait failed may still be in the log:
//!   the transaction is marked failed, so it can only be rolled back.
//!
//! # Relocation
//!
//! `W` is the first offset of the oldest unsettled transaction, so one
//! transaction left open (a crashed producer, an unresolved one) would keep
//! every later record of the half log on disk and make every restart replay
//! (and move again, with a by-id lookup per record) every transaction since:
//! the hanging-transaction failure of other brokers, in another form. So an
//! open transaction whose first record is `relocate_after_records` behind
//! the log's end is *relocated* when the watermark is flushed: all its
//! records (half records and ack records, with their ids, its opened time
//! and each record's stored time in headers) are appended again as one
//! batch, made durable, and the transaction's first offset moves to that
//! batch; `W` can then pass its old records. At replay the first record of a
//! relocation batch (`dmq.txn.relocated`) starts the transaction afresh
//! (dropping copies seen before it), and later records of a transaction
//! known from a relocation batch are kept although their handle is below
//! `W`.
//!
//! # Memory
//!
//! Per unsettled transaction: its key, handle and times, and 24 bytes per
//! half record (offset and id), not the records: a commit reads them back
//! from the half log. Settled outcomes are remembered for the last
//! `settled_window` transactions, to answer a repeated COMMIT or ROLLBACK.
//! The number of records and bytes per transaction is capped
//! ([`TransactionLimits`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{AppendInfo, BatchInput, MessageId, Record, RecordInput};

use crate::storage::{Journal, PartitionLog, Storage, StoreError};

/// The half log's internal topic.
pub const TXN_TOPIC: &str = "__dmq_txn";
/// The producer group of a half or outcome record.
pub const GROUP_HEADER: &str = "dmq.txn.group";
/// The transaction id of a half or outcome record.
pub const ID_HEADER: &str = "dmq.txn.id";
/// The transaction's handle, `u64` LE.
pub const HANDLE_HEADER: &str = "dmq.txn.handle";
/// A half record's destination topic.
pub const TOPIC_HEADER: &str = "dmq.txn.topic";
/// A half record's destination partition, `u32` LE.
pub const PARTITION_HEADER: &str = "dmq.txn.partition";
/// A half record's relative times, `u8` flags ([`RELATIVE_DELIVER_AT`],
/// [`RELATIVE_EXPIRE_AT`]).
pub const TIMES_HEADER: &str = "dmq.txn.times";
/// An ack record's consumer group.
pub const ACK_GROUP_HEADER: &str = "dmq.txn.ack-group";
/// An ack record's broadcast member (absent for a clustering group).
pub const ACK_MEMBER_HEADER: &str = "dmq.txn.ack-member";
/// On the first record of a relocation batch: the transaction's opened
/// time, `i64` LE; the batch replaces every record of the transaction
/// before it.
pub const RELOCATED_HEADER: &str = "dmq.txn.relocated";
/// On a relocated half record: when the original was stored, `i64` LE
/// (relative times are moved from then).
pub const STORED_HEADER: &str = "dmq.txn.stored";
/// An outcome record's outcome, `u8`: 1 commit, 2 rollback.
pub const OUTCOME_HEADER: &str = "dmq.txn.outcome";
/// On the first half record of each TXN_PRODUCE: its sequence number, its
/// record count and its digest, three `u32` LE (see *Sequences*).
pub const STEP_HEADER: &str = "dmq.txn.step";
/// The meta journal.
pub const META_JOURNAL: &str = "txn.meta";
/// The check-back counts journal.
pub const CHECKS_JOURNAL: &str = "txn.checks";
/// The producer epochs journal (see [`ProducerEpochs`]).
pub const EPOCHS_JOURNAL: &str = "txn.epochs";

/// `dmq.txn.times` bit: the deliver-at time was a delay from the produce.
pub const RELATIVE_DELIVER_AT: u8 = 1;
/// `dmq.txn.times` bit: the expire-at time was a TTL from the produce.
pub const RELATIVE_EXPIRE_AT: u8 = 2;

const META_VERSION: u8 = 1;
const META_LEN: usize = 9;
const READ_CHUNK_RECORDS: usize = 4096;
/// Most records one watermark flush relocates (the rest wait for the next).
const RELOCATE_PER_FLUSH_MAX: usize = 100_000;
/// Longest producer group or transaction id, in bytes.
pub const TXN_NAME_LEN_MAX: usize = 255;

/// Errors of the transaction store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxnError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No open transaction has this producer group, id and handle, and none
    /// ended recently.
    #[error("unknown transaction {0}")]
    Unknown(String),
    /// The request contradicts the transaction's state: a second begin of
    /// an open id, a produce into an ending transaction, a commit after a
    /// rollback (or the reverse), a commit of a failed transaction.
    #[error("transaction {key}: {reason}")]
    Conflict {
        /// `group/id`.
        key: String,
        /// What contradicts it.
        reason: String,
    },
    /// The transaction would exceed a configured limit (records, bytes,
    /// age): nothing of this request was stored.
    #[error("transaction {key}: {reason}")]
    Limit {
        /// `group/id`.
        key: String,
        /// Which limit.
        reason: String,
    },
    /// A producer group or transaction id that is empty or too long.
    #[error("invalid transaction name: {0}")]
    InvalidName(String),
    /// The meta journal holds a payload that does not decode.
    #[error("corrupt transaction metadata: {0}")]
    Corrupt(String),
    /// A numbered produce (TXN_PRODUCE_SEQ) whose number is past the
    /// transaction's next one, or into a transaction whose steps are not
    /// numbered: nothing was stored.
    #[error("transaction {key}: {reason}")]
    OutOfSequence {
        /// `group/id`.
        key: String,
        /// Which number was expected.
        reason: String,
    },
    /// A transactional producer whose epoch is older than its producer
    /// id's current one: another instance registered since (TXN_INIT).
    #[error(
        "producer {producer} of group {group} is fenced: epoch {epoch} is older than {current} \
         (another instance registered since)"
    )]
    Fenced {
        /// The producer group.
        group: String,
        /// The producer id.
        producer: String,
        /// The epoch the request carried.
        epoch: u32,
        /// The current epoch.
        current: u32,
    },
}

/// Result alias.
pub type Result<T, E = TxnError> = std::result::Result<T, E>;

/// Caps per transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionLimits {
    /// Most half records in one transaction.
    pub max_records: usize,
    /// Most bytes (keys, headers, values) in one transaction.
    pub max_bytes: u64,
    /// A transaction older than this takes no more records, is listed as
    /// overdue, and is checked back (its producer group is asked how it
    /// ended; see [`crate::txn_checks`]).
    pub timeout_ms: u64,
    /// The longest wait between two checks of one transaction.
    pub check_backoff_max_ms: u64,
    /// Checks of a transaction before it is left unresolved.
    pub max_checks: u32,
    /// Checks per second of one producer group, at most.
    pub checks_per_second: u32,
    /// Outcomes remembered after a transaction settled, to answer a
    /// repeated COMMIT or ROLLBACK.
    pub settled_window: usize,
    /// Bytes of half records kept in memory (all unsettled transactions
    /// together) so that a commit need not read them back; a transaction
    /// whose records do not fit is read back from the half log.
    pub cache_bytes: u64,
    /// An open transaction whose first record is this many half-log
    /// records behind the log's end (or 4 × its own records, if more) is
    /// *relocated*: its records are copied to the end, so that it no
    /// longer pins the watermark (the half log's deletion and the replay
    /// at a restart).
    pub relocate_after_records: u64,
}

impl Default for TransactionLimits {
    fn default() -> Self {
        TransactionLimits {
            max_records: 100_000,
            max_bytes: 64 << 20,
            timeout_ms: 60_000,
            check_backoff_max_ms: 300_000,
            max_checks: 15,
            checks_per_second: 100,
            settled_window: 100_000,
            cache_bytes: 16 << 20,
            relocate_after_records: 65_536,
        }
    }
}

/// A transaction's name: the producer group and the id the producer chose.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnKey {
    /// The producer group.
    pub group: String,
    /// The transaction id, unique among the group's open transactions.
    pub id: String,
}

impl TxnKey {
    /// A key, checked: both parts 1 to [`TXN_NAME_LEN_MAX`] bytes.
    pub fn new(group: impl Into<String>, id: impl Into<String>) -> Result<TxnKey> {
        let key = TxnKey {
            group: group.into(),
            id: id.into(),
        };
        for (what, name) in [("producer group", &key.group), ("transaction id", &key.id)] {
            if name.is_empty() || name.len() > TXN_NAME_LEN_MAX {
                return Err(TxnError::InvalidName(format!(
                    "a {what} has 1 to {TXN_NAME_LEN_MAX} bytes, not {}",
                    name.len()
                )));
            }
        }
        Ok(key)
    }
}

impl std::fmt::Display for TxnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            crate::names::shown(&self.group),
            crate::names::shown(&self.id)
        )
    }
}

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnOutcome {
    /// Its records enter their topics.
    Commit,
    /// Its records are discarded.
    Rollback,
}

impl TxnOutcome {
    fn byte(self) -> u8 {
        match self {
            TxnOutcome::Commit => 1,
            TxnOutcome::Rollback => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<TxnOutcome> {
        match byte {
            1 => Some(TxnOutcome::Commit),
            2 => Some(TxnOutcome::Rollback),
            _ => None,
        }
    }

    /// `"commit"` or `"rollback"`.
    pub fn name(self) -> &'static str {
        match self {
            TxnOutcome::Commit => "commit",
            TxnOutcome::Rollback => "rollback",
        }
    }
}

/// Where a transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStage {
    /// Takes records; may commit or roll back.
    Open,
    /// Its outcome record is appended, not yet durable.
    Ending(TxnOutcome),
    /// The commit is durable; its records are being moved into their
    /// topics.
    Committed,
}

/// One unsettled transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// Its name.
    pub key: TxnKey,
    /// One more than the half-log offset of its first record.
    pub handle: u64,
    /// Offset of its first record now: `handle - 1`, or where it was
    /// relocated to.
    pub first_offset: u64,
    /// When its first record was stored.
    pub opened_ms: i64,
    /// Where it stands.
    pub stage: TxnStage,
    /// Each record, in produce order.
    pub records: Vec<HalfRef>,
    /// The (topic, partition) destinations its records name.
    pub destinations: Vec<(Arc<str>, u32)>,
    /// Messages it acks for their consumer groups (TXN_ACK), one entry
    /// per request, applied at its commit.
    pub acks: Vec<TxnAcks>,
    /// Its TXN_PRODUCEs, by sequence number (see *Sequences*).
    pub steps: Vec<ProduceStep>,
    /// False when it was replayed from half records written without step
    /// headers: `steps` is then incomplete and numbered produces are
    /// refused.
    pub steps_known: bool,
    /// Bytes of its records (keys, headers, values) and acks.
    pub bytes: u64,
    /// Half and ack appends not yet durable.
    pub writing: u32,
    /// A half append failed: it may or may not be stored, so the
    /// transaction can only roll back.
    pub failed: bool,
    /// Copies of its records while they fit the store's cache budget
    /// (`None` once they do not, and after a restart): a commit then moves
    /// them without reading the half log back.
    cache: Option<Vec<CachedRecord>>,
    /// Bytes `cache` counts against the budget.
    cache_bytes: u64,
}

/// A copy of a half record, as the producer gave it (bytes owned, not
/// slices of a connection's read buffer).
#[derive(Debug, Clone)]
struct CachedRecord {
    /// The record, its id set.
    record: RecordInput,
    /// Index in [`Transaction::destinations`].
    destination: u32,
    /// [`RELATIVE_DELIVER_AT`] | [`RELATIVE_EXPIRE_AT`].
    relative: u8,
    /// When it was stored in the half log.
    stored_ms: i64,
}

/// One TXN_PRODUCE of a transaction (see *Sequences* in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceStep {
    /// Index of its first record in [`Transaction::records`].
    pub first: u32,
    /// How many records it stored.
    pub count: u32,
    /// [`step_digest`] of its topic and records.
    pub digest: u32,
    /// Whether its append is durable yet.
    pub state: StepState,
}

/// Where a [`ProduceStep`]'s append stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    /// Appended, its durability wait not over.
    Writing,
    /// Durable: answered.
    Durable,
    /// Its durability wait failed (the transaction can only roll back).
    Failed,
}

/// What a numbered produce is (see
/// [`TransactionLog::check_sequence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not stored yet: store it.
    New,
    /// A retry of step `sequence` of the transaction `handle`.
    Retry {
        /// The transaction.
        handle: u64,
        /// The step's number.
        sequence: u32,
        /// The step.
        step: ProduceStep,
    },
}

/// What a transaction keeps of one of its records (the record itself
/// stays in the half log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfRef {
    /// Offset in the half log.
    pub offset: u64,
    /// The message id, for life.
    pub id: MessageId,
    /// Index of its destination in [`Transaction::destinations`].
    pub destination: u32,
}

impl Transaction {
    fn new(key: TxnKey, handle: u64, opened_ms: i64) -> Transaction {
        Transaction {
            key,
            handle,
            first_offset: handle.saturating_sub(1),
            opened_ms,
            stage: TxnStage::Open,
            records: Vec::new(),
            destinations: Vec::new(),
            acks: Vec::new(),
            steps: Vec::new(),
            steps_known: true,
            bytes: 0,
            writing: 0,
            failed: false,
            cache: None,
            cache_bytes: 0,
        }
    }

    fn add(&mut self, offset: u64, id: MessageId, topic: &str, partition: u32) -> u32 {
        let destination = match self
            .destinations
            .iter()
            .position(|(t, p)| **t == *topic && *p == partition)
        {
            Some(index) => index,
            None => {
                self.destinations.push((Arc::from(topic), partition));
                self.destinations.len() - 1
            }
        };
        self.records.push(HalfRef {
            offset,
            id,
            destination: destination as u32,
        });
        destination as u32
    }

    /// Takes the step header (sequence, count, digest) of its replayed
    /// record number `index`, if it has one: a record without one must be
    /// covered by the last step, and steps must come in number order, or
    /// the steps are unknown from here on.
    fn replay_step(&mut self, index: u32, step: Option<(u32, u32, u32)>) {
        if !self.steps_known {
            return;
        }
        match step {
            Some((sequence, count, digest)) if sequence as usize == self.steps.len() => {
                self.steps.push(ProduceStep {
                    first: index,
                    count,
                    digest,
                    state: StepState::Durable,
                });
            }
            Some(_) => self.steps_known = false,
            None => {
                let covered = self
                    .steps
                    .last()
                    .is_some_and(|s| index < s.first.saturating_add(s.count));
                if !covered {
                    self.steps_known = false;
                }
            }
        }
    }

    /// The (topic, partition) of a record.
    pub fn destination(&self, record: &HalfRef) -> (&Arc<str>, u32) {
        let (topic, partition) = &self.destinations[record.destination as usize];
        (topic, *partition)
    }

    /// Records and acked messages: what the `max_records` cap counts.
    pub fn entries(&self) -> usize {
        self.records.len() + self.acked_messages()
    }

    /// Messages it acks.
    pub fn acked_messages(&self) -> usize {
        self.acks.iter().map(|a| a.positions.len()).sum()
    }
}

/// The delivery state a transactional ack is for: a consumer group of a
/// topic, or one member of a broadcast group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AckTarget {
    /// The consumed topic.
    pub topic: Arc<str>,
    /// The consumer group.
    pub group: Arc<str>,
    /// The member, for a broadcast group (each member has its own state).
    pub member: Option<String>,
}

/// The messages one TXN_ACK acks for one delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnAcks {
    /// Whose messages.
    pub target: AckTarget,
    /// (partition, offset) of each.
    pub positions: Vec<(u32, u64)>,
}

/// A half record to store: its destination and relative times.
#[derive(Debug, Clone)]
pub struct HalfInput {
    /// Destination topic.
    pub topic: String,
    /// Destination partition.
    pub partition: u32,
    /// The record, times resolved at the produce.
    pub record: RecordInput,
    /// [`RELATIVE_DELIVER_AT`] | [`RELATIVE_EXPIRE_AT`].
    pub relative: u8,
}

/// A committed record, ready for its topic: headers of the half log
/// removed, its id kept, relative times moved to the commit.
#[derive(Debug, Clone)]
pub struct CommittedRecord {
    /// Destination topic.
    pub topic: String,
    /// Destination partition.
    pub partition: u32,
    /// The record, with `id` set.
    pub record: RecordInput,
}

/// What opening found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TxnRecovery {
    /// The watermark replay started from.
    pub watermark: u64,
    /// Half-log records read.
    pub records_read: u64,
    /// Transactions open again.
    pub open: usize,
    /// Transactions committed whose records may not all be in their
    /// topics yet.
    pub committed: usize,
    /// Records without the headers of either kind (skipped).
    pub skipped: u64,
}

/// The durable store of half messages and outcomes (see the module doc).
#[derive(Debug)]
pub struct TransactionLog {
    log: Arc<dyn PartitionLog>,
    meta: Box<dyn Journal>,
    /// Check-backs sent per unsettled transaction (see the module doc).
    checks: Box<dyn Journal>,
    check_counts: HashMap<u64, u32>,
    check_payloads: usize,
    checks_dirty: bool,
    limits: TransactionLimits,
    /// Unsettled transactions by handle (the first is the watermark's).
    txns: BTreeMap<u64, Transaction>,
    by_key: HashMap<TxnKey, u64>,
    /// Recently settled: key -> (handle, outcome), oldest first in `order`.
    settled: HashMap<TxnKey, (u64, TxnOutcome)>,
    settled_order: VecDeque<(TxnKey, u64)>,
    watermark: u64,
    /// Bytes of every transaction's `cache`.
    cached_bytes: u64,
    /// The offset the next append gets. Not the log's `end_offset`, which
    /// is the *visible* end and lags appends still waiting for their
    /// fsync: two transactions begun within one group commit would
    /// otherwise get the same handle.
    appended_end: u64,
}

impl TransactionLog {
    /// Opens the half log and replays it from the watermark.
    pub fn open(
        storage: Arc<dyn Storage>,
        limits: TransactionLimits,
    ) -> Result<(TransactionLog, TxnRecovery)> {
        let log = storage.partition(TXN_TOPIC, 0)?;
        let (meta, payloads) = storage.open_journal(META_JOURNAL)?;
        let (checks, check_payloads) = storage.open_journal(CHECKS_JOURNAL)?;
        let mut check_counts = HashMap::new();
        for payload in &check_payloads {
            let (handle, count) = decode_check(payload)?;
            check_counts.insert(handle, count);
        }
        let mut watermark = match payloads.last() {
            Some(payload) => decode_meta(payload)?,
            None => 0,
        };
        let end = log.end_offset();
        if watermark > end {
            // A power loss under a lazy fsync policy cut the half log: what
            // was past its end is gone, and new records take its offsets.
            tracing::warn!(
                watermark,
                half_log_end = end,
                "the transaction half log was cut at recovery"
            );
            watermark = end;
        }
        let mut store = TransactionLog {
            log,
            meta,
            checks,
            check_counts,
            check_payloads: check_payloads.len(),
            checks_dirty: false,
            limits,
            txns: BTreeMap::new(),
            by_key: HashMap::new(),
            settled: HashMap::new(),
            settled_order: VecDeque::new(),
            watermark,
            appended_end: end,
            cached_bytes: 0,
        };
        let mut recovery = TxnRecovery {
            watermark,
            ..TxnRecovery::default()
        };
        let mut offset = watermark.max(store.log.start_offset());
        while offset < end {
            let records = store.log.read(offset, READ_CHUNK_RECORDS)?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            for record in records {
                recovery.records_read += 1;
                if !store.replay(record) {
                    recovery.skipped += 1;
                }
            }
        }
        recovery.open = store
            .txns
            .values()
            .filter(|t| t.stage == TxnStage::Open)
            .count();
        recovery.committed = store.txns.len() - recovery.open;
        let txns = &store.txns;
        store
            .check_counts
            .retain(|handle, _| txns.get(handle).is_some_and(|t| t.stage == TxnStage::Open));
        Ok((store, recovery))
    }

    /// Applies one half-log record at open; false if it is neither kind.
    fn replay(&mut self, record: Record) -> bool {
        let Some(parsed) = parse(&record) else {
            tracing::error!(
                offset = record.offset,
                "half-log record without transaction headers"
            );
            return false;
        };
        let relocated = find(&record, RELOCATED_HEADER)
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_le_bytes);
        // Handle h starts at offset h - 1: below the watermark it settled,
        // unless it was relocated past it.
        if parsed.handle <= self.watermark
            && relocated.is_none()
            && !self.txns.contains_key(&parsed.handle)
        {
            return true;
        }
        if let Some(opened_ms) = relocated {
            // A relocation batch: the transaction starts afresh here.
            let mut txn = Transaction::new(parsed.key.clone(), parsed.handle, opened_ms);
            txn.first_offset = record.offset;
            self.txns.insert(parsed.handle, txn);
        }
        if !matches!(parsed.kind, Kind::Outcome(_)) {
            if let Some(&handle) = self.by_key.get(&parsed.key) {
                if handle != parsed.handle {
                    tracing::warn!(
                        key = %parsed.key,
                        open = handle,
                        found = parsed.handle,
                        "record of a second open transaction with one id: the later one wins"
                    );
                    self.txns.remove(&handle);
                }
            }
            self.by_key.insert(parsed.key.clone(), parsed.handle);
        }
        let opened_ms = record.timestamp_ms;
        match parsed.kind {
            Kind::Half { topic, partition } => {
                let bytes = record_bytes(&record);
                let step = find(&record, STEP_HEADER).and_then(|v| decode_step(v));
                let txn = self.replayed(&parsed.key, parsed.handle, opened_ms);
                let index = txn.records.len() as u32;
                txn.add(record.offset, record.id, &topic, partition);
                txn.replay_step(index, step);
                txn.bytes += bytes;
            }
            Kind::Acks(acks) => {
                let txn = self.replayed(&parsed.key, parsed.handle, opened_ms);
                txn.bytes += ack_bytes(acks.positions.len());
                txn.acks.push(acks);
            }
            Kind::Outcome(outcome) => {
                let known = self
                    .txns
                    .get(&parsed.handle)
                    .is_some_and(|t| t.key == parsed.key && t.stage == TxnStage::Open);
                if !known {
                    return true;
                }
                match outcome {
                    TxnOutcome::Commit => self.committed_durably(parsed.handle),
                    TxnOutcome::Rollback => self.settle(parsed.handle, TxnOutcome::Rollback),
                }
            }
        }
        true
    }

    /// The transaction a replayed record of `handle` belongs to.
    fn replayed(&mut self, key: &TxnKey, handle: u64, opened_ms: i64) -> &mut Transaction {
        self.txns
            .entry(handle)
            .or_insert_with(|| Transaction::new(key.clone(), handle, opened_ms))
    }

    /// The half log (the durable writer waits on it).
    pub fn log(&self) -> Arc<dyn PartitionLog> {
        Arc::clone(&self.log)
    }

    /// The configured caps.
    pub fn limits(&self) -> &TransactionLimits {
        &self.limits
    }

    /// The unsettled transaction with this handle.
    pub fn get(&self, handle: u64) -> Option<&Transaction> {
        self.txns.get(&handle)
    }

    /// The handle of the unsettled transaction with this key.
    pub fn handle_of(&self, key: &TxnKey) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// How a recently settled transaction with this key ended.
    pub fn settled(&self, key: &TxnKey) -> Option<(u64, TxnOutcome)> {
        self.settled.get(key).copied()
    }

    /// Every unsettled transaction, oldest first.
    pub fn transactions(&self) -> impl Iterator<Item = &Transaction> {
        self.txns.values()
    }

    /// Committed transactions whose records are not all in their topics
    /// yet (after opening: those to move).
    pub fn committed(&self) -> Vec<u64> {
        self.txns
            .values()
            .filter(|t| t.stage == TxnStage::Committed)
            .map(|t| t.handle)
            .collect()
    }

    /// Appends half records to the transaction `key` (without waiting for
    /// durability: the caller waits for the returned append, then calls
    /// [`half_written`](Self::half_written)). `handle` 0 begins a
    /// transaction (refused while one with this key is unsettled); any
    /// other value must be the open transaction's handle. Returns the
    /// transaction's handle and the append.
    pub fn append_half(
        &mut self,
        key: &TxnKey,
        handle: u64,
        records: Vec<HalfInput>,
        now_ms: i64,
    ) -> Result<(u64, AppendInfo)> {
        let digest = step_digest(&records);
        self.append_produce(key, handle, records, digest, now_ms)
            .map(|(handle, info, _)| (handle, info))
    }

    /// [`append_half`](Self::append_half) of one TXN_PRODUCE whose
    /// [`step_digest`] is `digest`; also returns the step's sequence number
    /// (`None` in a transaction whose steps are not known).
    pub fn append_produce(
        &mut self,
        key: &TxnKey,
        handle: u64,
        records: Vec<HalfInput>,
        digest: u32,
        now_ms: i64,
    ) -> Result<(u64, AppendInfo, Option<u32>)> {
        let bytes: u64 = records.iter().map(|h| input_bytes(&h.record)).sum();
        let handle = self.admit(key, handle, records.len(), bytes, now_ms)?;
        let (sequence, first) = match self.txns.get(&handle) {
            Some(txn) => (
                txn.steps_known.then_some(txn.steps.len() as u32),
                txn.records.len() as u32,
            ),
            None => (Some(0), 0),
        };
        let count = records.len() as u32;
        let destinations: Vec<(String, u32)> = records
            .iter()
            .map(|h| (h.topic.clone(), h.partition))
            .collect();
        // Copies for the cache, if this transaction's records all fit.
        let caching =
            handle > self.appended_end || self.txns.get(&handle).is_some_and(|t| t.cache.is_some());
        let charge: u64 = records.iter().map(|h| cached_cost(&h.record)).sum();
        let copies: Option<Vec<(RecordInput, u8)>> =
            (caching && self.cached_bytes + charge <= self.limits.cache_bytes).then(|| {
                records
                    .iter()
                    .map(|h| (owned_copy(&h.record), h.relative))
                    .collect()
            });
        let mut inputs: Vec<RecordInput> = records
            .into_iter()
            .map(|half| encode_half(key, handle, half))
            .collect();
        if let (Some(sequence), Some(input)) = (sequence, inputs.first_mut()) {
            input
                .headers
                .push(header(STEP_HEADER, encode_step(sequence, count, digest)));
        }
        let info = self.append(inputs)?;
        let txn = self.txns.entry(handle).or_insert_with(|| {
            let mut txn = Transaction::new(key.clone(), handle, info.timestamp_ms);
            txn.cache = Some(Vec::new());
            txn
        });
        let mut placed = Vec::with_capacity(destinations.len());
        for ((offset, id), (topic, partition)) in (info.base_offset..=info.last_offset)
            .zip(info.ids.iter().copied())
            .zip(destinations)
        {
            placed.push((id, txn.add(offset, id, &topic, partition)));
        }
        match (copies, txn.cache.as_mut()) {
            (Some(copies), Some(cache)) => {
                for ((mut record, relative), (id, destination)) in copies.into_iter().zip(placed) {
                    record.id = Some(id);
                    cache.push(CachedRecord {
                        record,
                        destination,
                        relative,
                        stored_ms: info.timestamp_ms,
                    });
                }
                txn.cache_bytes += charge;
                self.cached_bytes += charge;
            }
            _ => {
                // Over the budget: this transaction is read back at its
                // commit.
                self.cached_bytes -= txn.cache_bytes;
                txn.cache = None;
                txn.cache_bytes = 0;
            }
        }
        if sequence.is_some() {
            txn.steps.push(ProduceStep {
                first,
                count,
                digest,
                state: StepState::Writing,
            });
        }
        txn.bytes += bytes;
        txn.writing += 1;
        self.by_key.insert(key.clone(), handle);
        Ok((handle, info, sequence))
    }

    /// What the TXN_PRODUCE_SEQ numbered `sequence`, of the transaction
    /// `key` (`handle` as in [`append_half`](Self::append_half)), whose
    /// records have the [`step_digest`] `digest`, is: a retry of a step of
    /// the transaction, or new. Refused: a number past the next one
    /// (`OutOfSequence`), a number already used by other records
    /// (`Conflict`), a retry of a step whose append failed, a begin
    /// (`handle` 0) with a number other than 0. A request this calls new
    /// may still be refused by the append (a second begin of an open id
    /// with other records, a handle that names no open transaction).
    pub fn check_sequence(
        &self,
        key: &TxnKey,
        handle: u64,
        sequence: u32,
        digest: u32,
    ) -> Result<SequenceCheck> {
        let out_of_sequence = |reason: String| TxnError::OutOfSequence {
            key: key.to_string(),
            reason,
        };
        let txn = if handle == 0 {
            if sequence != 0 {
                return Err(out_of_sequence(format!(
                    "a transaction begins with sequence 0, not {sequence}"
                )));
            }
            // A retried begin whose answer (the handle) was lost finds its
            // transaction by id; other records under an open id are the
            // append's conflict.
            match self.by_key.get(key).and_then(|h| self.txns.get(h)) {
                Some(txn) if txn.steps.first().is_some_and(|s| s.digest == digest) => txn,
                _ => return Ok(SequenceCheck::New),
            }
        } else {
            match self.txns.get(&handle) {
                Some(txn) if txn.key == *key => txn,
                _ => return Ok(SequenceCheck::New),
            }
        };
        if !txn.steps_known {
            return Err(out_of_sequence(
                "its records were stored by a broker that did not number them: \
                 roll it back"
                    .into(),
            ));
        }
        let next = txn.steps.len() as u32;
        if sequence > next {
            return Err(out_of_sequence(format!(
                "sequence {sequence} is past the next one, {next}: an earlier produce was not stored"
            )));
        }
        if sequence == next {
            return Ok(SequenceCheck::New);
        }
        let step = txn.steps[sequence as usize];
        if step.digest != digest {
            return Err(conflict(
                key,
                &format!("sequence {sequence} stored other records"),
            ));
        }
        if step.state == StepState::Failed {
            return Err(conflict(
                key,
                &format!("the produce numbered {sequence} failed: roll it back"),
            ));
        }
        Ok(SequenceCheck::Retry {
            handle: txn.handle,
            sequence,
            step,
        })
    }

    /// The records a durable step stored, read back from the half log:
    /// (id, partition, deliver-at) of each, in order.
    pub fn step_records(
        &self,
        handle: u64,
        step: &ProduceStep,
    ) -> Result<Vec<(MessageId, u32, Option<i64>)>> {
        let Some(txn) = self.txns.get(&handle) else {
            return Err(TxnError::Unknown(format!("handle {handle}")));
        };
        let range = step.first as usize..(step.first + step.count) as usize;
        let Some(refs) = txn.records.get(range) else {
            return Err(TxnError::Corrupt(format!(
                "transaction {}: step of records {}..{} past its {} records",
                txn.key,
                step.first,
                step.first + step.count,
                txn.records.len()
            )));
        };
        let mut out = Vec::with_capacity(refs.len());
        let mut missing = None;
        self.for_each_half(refs, |half, record| match record {
            Some(record) => {
                out.push((half.id, txn.destination(half).1, record.deliver_at_ms));
                true
            }
            None => {
                missing = Some(half.offset);
                false
            }
        })?;
        match missing {
            Some(offset) => Err(TxnError::Corrupt(format!(
                "transaction {}: half record {offset} is missing from the half log",
                txn.key
            ))),
            None => Ok(out),
        }
    }

    /// Appends an ack record to the transaction `key` (`handle` as in
    /// [`append_half`](Self::append_half)): `positions` of `target` are
    /// acked when it commits. The caller checked that they are delivered
    /// and unacked, waits for the returned append, then calls
    /// [`half_written`](Self::half_written).
    pub fn append_acks(
        &mut self,
        key: &TxnKey,
        handle: u64,
        acks: TxnAcks,
        now_ms: i64,
    ) -> Result<(u64, AppendInfo)> {
        let bytes = ack_bytes(acks.positions.len());
        let handle = self.admit(key, handle, acks.positions.len(), bytes, now_ms)?;
        let info = self.append(vec![encode_acks(key, handle, &acks)])?;
        let txn = self.txns.entry(handle).or_insert_with(|| {
            let mut txn = Transaction::new(key.clone(), handle, info.timestamp_ms);
            txn.cache = Some(Vec::new());
            txn
        });
        txn.acks.push(acks);
        txn.bytes += bytes;
        txn.writing += 1;
        self.by_key.insert(key.clone(), handle);
        Ok((handle, info))
    }

    /// The handle a request adding `count` entries of `bytes` to the
    /// transaction `key` goes to: a new one for `handle` 0, else `handle`
    /// if it names the open transaction of `key` and the limits allow.
    fn admit(
        &self,
        key: &TxnKey,
        handle: u64,
        count: usize,
        bytes: u64,
        now_ms: i64,
    ) -> Result<u64> {
        match (handle, self.by_key.get(key)) {
            (0, Some(_)) => Err(conflict(key, "a transaction with this id is still open")),
            (0, None) => {
                if count > self.limits.max_records || bytes > self.limits.max_bytes {
                    return Err(self.too_large(key, count, bytes));
                }
                Ok(self.appended_end + 1)
            }
            (given, Some(&open)) if given == open => {
                let Some(txn) = self.txns.get(&open) else {
                    return Err(TxnError::Unknown(key.to_string()));
                };
                match txn.stage {
                    TxnStage::Open => {}
                    TxnStage::Ending(outcome) => {
                        return Err(conflict(key, &format!("it is ending ({})", outcome.name())))
                    }
                    TxnStage::Committed => return Err(conflict(key, "it committed")),
                }
                if txn.failed {
                    return Err(conflict(
                        key,
                        "an earlier produce of it failed: roll it back",
                    ));
                }
                let age = now_ms.saturating_sub(txn.opened_ms);
                if age > self.limits.timeout_ms as i64 {
                    return Err(TxnError::Limit {
                        key: key.to_string(),
                        reason: format!(
                            "open for {age} ms, past the {} ms timeout: it takes no more records",
                            self.limits.timeout_ms
                        ),
                    });
                }
                let count = txn.entries() + count;
                if count > self.limits.max_records || txn.bytes + bytes > self.limits.max_bytes {
                    return Err(self.too_large(key, count, txn.bytes + bytes));
                }
                Ok(open)
            }
            (given, _) => Err(match self.settled.get(key) {
                Some((h, outcome)) if *h == given => {
                    conflict(key, &format!("it ended ({})", outcome.name()))
                }
                _ => TxnError::Unknown(format!("{key} (handle {given})")),
            }),
        }
    }

    /// Appends one batch (not waiting for durability) and moves
    /// `appended_end` past it.
    fn append(&mut self, records: Vec<RecordInput>) -> Result<AppendInfo> {
        let info = self.log.append_batch_deferred(&BatchInput::new(records))?;
        if info.base_offset != self.appended_end {
            // Only this store appends to the half log: a gap means the
            // handle written into the batch may be wrong. Loud, not fatal:
            // replay groups records by the handle they carry.
            tracing::error!(
                expected = self.appended_end,
                got = info.base_offset,
                "the half log's offsets moved under the transaction store"
            );
        }
        self.appended_end = info.last_offset + 1;
        Ok(info)
    }

    fn too_large(&self, key: &TxnKey, records: usize, bytes: u64) -> TxnError {
        TxnError::Limit {
            key: key.to_string(),
            reason: format!(
                "{records} records of {bytes} bytes would pass the limit of {} records or {} bytes",
                self.limits.max_records, self.limits.max_bytes
            ),
        }
    }

    /// A half append of `handle` (the produce numbered `step`, or an ack
    /// record) is durable (`ok`) or failed.
    pub fn half_written(&mut self, handle: u64, step: Option<u32>, ok: bool) {
        if let Some(txn) = self.txns.get_mut(&handle) {
            txn.writing = txn.writing.saturating_sub(1);
            if !ok {
                txn.failed = true;
            }
            if let Some(step) = step.and_then(|s| txn.steps.get_mut(s as usize)) {
                step.state = if ok {
                    StepState::Durable
                } else {
                    StepState::Failed
                };
            }
        }
    }

    /// Appends the outcome record of the open transaction `handle` (the
    /// caller checked key and stage) without waiting; it is `Ending` until
    /// [`outcome_written`](Self::outcome_written).
    pub fn append_outcome(&mut self, handle: u64, outcome: TxnOutcome) -> Result<AppendInfo> {
        let Some(txn) = self.txns.get(&handle) else {
            return Err(TxnError::Unknown(format!("handle {handle}")));
        };
        let record = encode_outcome(&txn.key, handle, outcome);
        let info = self.append(vec![record])?;
        if let Some(txn) = self.txns.get_mut(&handle) {
            txn.stage = TxnStage::Ending(outcome);
        }
        Ok(info)
    }

    /// The outcome record of `handle` is durable (`ok`): a rollback
    /// settles, a commit becomes `Committed` (the caller moves its
    /// records, then calls [`settle`](Self::settle)). Not durable: the
    /// transaction is open again (the record may still be in the log; a
    /// later outcome record of the same handle is then ignored at replay).
    pub fn outcome_written(&mut self, handle: u64, outcome: TxnOutcome, ok: bool) {
        let Some(txn) = self.txns.get_mut(&handle) else {
            return;
        };
        if !ok {
            txn.stage = TxnStage::Open;
            return;
        }
        match outcome {
            TxnOutcome::Commit => self.committed_durably(handle),
            TxnOutcome::Rollback => self.settle(handle, TxnOutcome::Rollback),
        }
    }

    /// The commit of `handle` is durable: its outcome is answerable at
    /// once, and its id free for a new transaction, while its records
    /// are still being moved.
    fn committed_durably(&mut self, handle: u64) {
        let Some(txn) = self.txns.get_mut(&handle) else {
            return;
        };
        txn.stage = TxnStage::Committed;
        let key = txn.key.clone();
        if self.by_key.get(&key) == Some(&handle) {
            self.by_key.remove(&key);
        }
        self.remember(key, handle, TxnOutcome::Commit);
    }

    /// Remembers how the transaction `handle` of `key` ended, unless a
    /// later transaction of the key is remembered already (an older
    /// commit whose move finished late must not hide it: handles grow).
    fn remember(&mut self, key: TxnKey, handle: u64, outcome: TxnOutcome) {
        if self
            .settled
            .get(&key)
            .is_some_and(|&(known, _)| known >= handle)
        {
            return;
        }
        self.settled.insert(key.clone(), (handle, outcome));
        self.settled_order.push_back((key, handle));
        while self.settled_order.len() > self.limits.settled_window {
            if let Some((key, handle)) = self.settled_order.pop_front() {
                if self.settled.get(&key).is_some_and(|(h, _)| *h == handle) {
                    self.settled.remove(&key);
                }
            }
        }
    }

    /// Reads a committed (or any unsettled) transaction's records back, in
    /// produce order, ready for their topics: half-log headers removed, ids
    /// kept, relative times moved by the time from the produce to `now_ms`.
    pub fn read_records(&self, handle: u64, now_ms: i64) -> Result<Vec<CommittedRecord>> {
        let Some(txn) = self.txns.get(&handle) else {
            return Err(TxnError::Unknown(format!("handle {handle}")));
        };
        if let Some(cache) = &txn.cache {
            return Ok(cache
                .iter()
                .map(|cached| {
                    let (topic, partition) = &txn.destinations[cached.destination as usize];
                    let mut record = cached.record.clone();
                    move_times(&mut record, cached.relative, cached.stored_ms, now_ms);
                    CommittedRecord {
                        topic: topic.to_string(),
                        partition: *partition,
                        record,
                    }
                })
                .collect());
        }
        let mut out = Vec::with_capacity(txn.records.len());
        self.for_each_half(&txn.records, |HalfRef { offset, id, .. }, record| {
            match record {
                // Gone from the log (damage skipped at recovery).
                None => tracing::error!(
                    key = %txn.key,
                    offset,
                    %id,
                    "a committed half record is missing from the half log"
                ),
                Some(record) => out.extend(decode_half(record, now_ms)),
            }
            true
        })?;
        Ok(out)
    }

    /// Reads the half records `refs` (in order) back from the log, one read
    /// per run of contiguous offsets, and gives each to `each` with its
    /// record (`None` if it is missing); stops when `each` returns false.
    fn for_each_half(
        &self,
        refs: &[HalfRef],
        mut each: impl FnMut(&HalfRef, Option<&Record>) -> bool,
    ) -> Result<()> {
        let mut index = 0;
        while index < refs.len() {
            let first = refs[index].offset;
            let mut run = 1;
            while index + run < refs.len()
                && refs[index + run].offset == first + run as u64
                && run < READ_CHUNK_RECORDS
            {
                run += 1;
            }
            let records = self.log.read(first, run)?;
            for half in &refs[index..index + run] {
                if !each(half, records.iter().find(|r| r.offset == half.offset)) {
                    return Ok(());
                }
            }
            index += run;
        }
        Ok(())
    }

    /// Forgets the transaction `handle`: rolled back, or committed with
    /// every record in its topic. Its outcome is remembered for the last
    /// `settled_window` transactions.
    pub fn settle(&mut self, handle: u64, outcome: TxnOutcome) {
        let Some(txn) = self.txns.remove(&handle) else {
            return;
        };
        self.cached_bytes -= txn.cache_bytes;
        if self.by_key.get(&txn.key) == Some(&handle) {
            self.by_key.remove(&txn.key);
        }
        self.remember(txn.key, handle, outcome);
    }

    /// Makes the watermark durable if it moved (the handle of the oldest
    /// unsettled transaction, or the half log's end) and deletes the half
    /// log's segments wholly below it. The caller makes sure every settled
    /// commit's records are durable in their topics first.
    pub fn flush_watermark(&mut self) -> Result<()> {
        if let Err(error) = self.relocate_stuck() {
            // Tried again at the next flush; meanwhile the transaction
            // pins the log as before.
            tracing::warn!(%error, "relocating an open transaction failed");
        }
        let watermark = self
            .txns
            .values()
            .map(|t| t.first_offset)
            .min()
            .unwrap_or(self.appended_end);
        if watermark <= self.watermark {
            return Ok(());
        }
        // Every half record below the new watermark must be durable
        // before a watermark past it is: the half log is flushed first
        // (nothing to do under the `always` policy).
        self.log.flush()?;
        self.meta.rewrite(&[encode_meta(watermark)])?;
        self.watermark = watermark;
        self.log.delete_before(watermark)?;
        Ok(())
    }

    /// Relocates every unsettled transaction that is open, idle (no
    /// append in flight, not failed) and far enough behind the log's end
    /// (see the module doc), at most [`RELOCATE_PER_FLUSH_MAX`] records per
    /// call, oldest first: one append, one fsync. The copies are durable
    /// when this returns.
    fn relocate_stuck(&mut self) -> Result<()> {
        let mut chosen: Vec<&Transaction> = self
            .txns
            .values()
            .filter(|txn| {
                let threshold = self
                    .limits
                    .relocate_after_records
                    .max(4 * txn.entries() as u64);
                txn.stage == TxnStage::Open
                    && txn.writing == 0
                    && !txn.failed
                    && self.appended_end.saturating_sub(txn.first_offset) >= threshold
            })
            .collect();
        if chosen.is_empty() {
            return Ok(());
        }
        chosen.sort_by_key(|txn| txn.first_offset);
        let mut copies: Vec<RecordInput> = Vec::new();
        // (handle, index of its first copy, half records copied)
        let mut moved: Vec<(u64, usize, usize)> = Vec::new();
        for txn in chosen {
            if !copies.is_empty() && copies.len() + txn.entries() > RELOCATE_PER_FLUSH_MAX {
                break;
            }
            let Some(mut own) = self.copies_of(txn)? else {
                continue;
            };
            let halves = own.len();
            own.extend(
                txn.acks
                    .iter()
                    .map(|acks| encode_acks(&txn.key, txn.handle, acks)),
            );
            if let Some(first) = own.first_mut() {
                first.headers.push(header(
                    RELOCATED_HEADER,
                    Bytes::copy_from_slice(&txn.opened_ms.to_le_bytes()),
                ));
            }
            moved.push((txn.handle, copies.len(), halves));
            copies.extend(own);
        }
        if copies.is_empty() {
            return Ok(());
        }
        let info = self.append(copies)?;
        self.log.flush()?;
        for (handle, at, halves) in moved {
            let base = info.base_offset + at as u64;
            if let Some(txn) = self.txns.get_mut(&handle) {
                tracing::info!(
                    key = %txn.key,
                    handle,
                    from = txn.first_offset,
                    to = base,
                    records = halves,
                    "an open transaction was relocated to the half log's end (it pinned the log)"
                );
                txn.first_offset = base;
                for (half, offset) in txn.records.iter_mut().zip(base..) {
                    half.offset = offset;
                }
            }
        }
        Ok(())
    }

    /// Copies of a transaction's half records for relocation, in order
    /// (`None` if one is missing from the log: it is not relocated).
    fn copies_of(&self, txn: &Transaction) -> Result<Option<Vec<RecordInput>>> {
        let mut copies = Vec::with_capacity(txn.entries());
        let mut complete = true;
        self.for_each_half(&txn.records, |half, record| match record {
            Some(record) => {
                copies.push(relocated_copy(record));
                true
            }
            None => {
                tracing::error!(
                    key = %txn.key,
                    offset = half.offset,
                    "a half record of an open transaction is missing: it is not relocated"
                );
                complete = false;
                false
            }
        })?;
        Ok(complete.then_some(copies))
    }

    /// The durable watermark.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Check-backs sent for the open transaction `handle` before this
    /// process (or since), as recorded.
    pub fn checks_sent(&self, handle: u64) -> u32 {
        self.check_counts.get(&handle).copied().unwrap_or(0)
    }

    /// Records that check number `checks` of `handle` was decided (durable
    /// at the next [`sync_checks`](Self::sync_checks)).
    pub fn note_check(&mut self, handle: u64, checks: u32) {
        self.checks.append(&encode_check(handle, checks));
        self.check_counts.insert(handle, checks);
        self.check_payloads += 1;
        self.checks_dirty = true;
    }

    /// Makes the recorded check counts durable (before the checks are
    /// sent); compacts the journal when it holds mostly dead payloads.
    pub fn sync_checks(&mut self) -> Result<()> {
        if !self.checks_dirty {
            return Ok(());
        }
        let txns = &self.txns;
        self.check_counts
            .retain(|handle, _| txns.contains_key(handle));
        if self.check_payloads > (4 * self.check_counts.len()).max(1_024) {
            let live: Vec<Vec<u8>> = self
                .check_counts
                .iter()
                .map(|(&handle, &checks)| encode_check(handle, checks))
                .collect();
            self.checks.rewrite(&live)?;
            self.check_payloads = live.len();
        } else {
            self.checks.sync()?;
        }
        self.checks_dirty = false;
        Ok(())
    }
}

fn encode_check(handle: u64, checks: u32) -> Vec<u8> {
    let mut payload = Vec::with_capacity(13);
    payload.push(META_VERSION);
    payload.extend_from_slice(&handle.to_le_bytes());
    payload.extend_from_slice(&checks.to_le_bytes());
    payload
}

fn decode_check(payload: &[u8]) -> Result<(u64, u32)> {
    match payload {
        [META_VERSION, rest @ ..] if rest.len() == 12 => {
            let (handle, checks) = rest.split_at(8);
            let handle = u64::from_le_bytes(handle.try_into().unwrap_or_default());
            let checks = u32::from_le_bytes(checks.try_into().unwrap_or_default());
            Ok((handle, checks))
        }
        _ => Err(TxnError::Corrupt(format!(
            "{CHECKS_JOURNAL}: a payload of {} bytes",
            payload.len()
        ))),
    }
}

/// The epochs of transactional producers: each TXN_INIT of a (producer
/// group, producer id) makes the next epoch current, durably, so that an
/// older instance still using the id (a zombie) is refused
/// ([`TxnError::Fenced`]).
///
/// Journal `txn.epochs`: one payload per registration, version `1`, then
/// `u8` group length, the group, `u8` producer length, the producer, `u32`
/// LE epoch; the last payload of a pair wins. Rewritten (one payload per
/// pair) when it holds four times as many payloads as pairs.
#[derive(Debug)]
pub struct ProducerEpochs {
    journal: Box<dyn Journal>,
    current: HashMap<(String, String), u32>,
    payloads: usize,
}

impl ProducerEpochs {
    /// Opens the journal and replays it.
    pub fn open(storage: &dyn Storage) -> Result<ProducerEpochs> {
        let (journal, payloads) = storage.open_journal(EPOCHS_JOURNAL)?;
        let mut current = HashMap::new();
        for payload in &payloads {
            let (group, producer, epoch) = decode_epoch(payload)?;
            current.insert((group, producer), epoch);
        }
        Ok(ProducerEpochs {
            journal,
            current,
            payloads: payloads.len(),
        })
    }

    /// Registers a new instance of `producer` in `group`: its epoch is one
    /// more than the last, durable before this returns.
    pub fn bump(&mut self, group: &str, producer: &str) -> Result<u32> {
        TxnKey::new(group, producer)?;
        let key = (group.to_string(), producer.to_string());
        let epoch = self.current.get(&key).map_or(1, |e| e.saturating_add(1));
        self.journal.append(&encode_epoch(group, producer, epoch));
        self.journal.sync()?;
        self.current.insert(key, epoch);
        self.payloads += 1;
        if self.payloads > 4 * self.current.len().max(64) {
            let all: Vec<Vec<u8>> = self
                .current
                .iter()
                .map(|((g, p), e)| encode_epoch(g, p, *e))
                .collect();
            self.journal.rewrite(&all)?;
            self.payloads = all.len();
        }
        Ok(epoch)
    }

    /// Refuses `epoch` if it is not the current one of `producer` in
    /// `group`.
    pub fn check(&self, group: &str, producer: &str, epoch: u32) -> Result<()> {
        let current = self
            .current
            .get(&(group.to_string(), producer.to_string()))
            .copied()
            .unwrap_or(0);
        if epoch == current {
            return Ok(());
        }
        Err(TxnError::Fenced {
            group: crate::names::shown(group),
            producer: crate::names::shown(producer),
            epoch,
            current,
        })
    }
}

fn encode_epoch(group: &str, producer: &str, epoch: u32) -> Vec<u8> {
    let mut payload = Vec::with_capacity(6 + group.len() + producer.len());
    payload.push(META_VERSION);
    for name in [group, producer] {
        payload.push(name.len() as u8);
        payload.extend_from_slice(name.as_bytes());
    }
    payload.extend_from_slice(&epoch.to_le_bytes());
    payload
}

fn decode_epoch(payload: &[u8]) -> Result<(String, String, u32)> {
    let corrupt = || {
        TxnError::Corrupt(format!(
            "{EPOCHS_JOURNAL}: a payload of {} bytes",
            payload.len()
        ))
    };
    let [META_VERSION, rest @ ..] = payload else {
        return Err(corrupt());
    };
    let mut rest = rest;
    let mut names = Vec::with_capacity(2);
    for _ in 0..2 {
        let (&len, tail) = rest.split_first().ok_or_else(corrupt)?;
        let len = usize::from(len);
        if tail.len() < len {
            return Err(corrupt());
        }
        names.push(String::from_utf8(tail[..len].to_vec()).map_err(|_| corrupt())?);
        rest = &tail[len..];
    }
    let epoch: [u8; 4] = rest.try_into().map_err(|_| corrupt())?;
    let producer = names.pop().ok_or_else(corrupt)?;
    let group = names.pop().ok_or_else(corrupt)?;
    Ok((group, producer, u32::from_le_bytes(epoch)))
}

fn conflict(key: &TxnKey, reason: &str) -> TxnError {
    TxnError::Conflict {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn input_bytes(record: &RecordInput) -> u64 {
    let headers: usize = record.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    (record.key.as_ref().map_or(0, Bytes::len) + headers + record.value.len()) as u64
}

fn record_bytes(record: &Record) -> u64 {
    let headers: usize = record
        .headers
        .iter()
        .filter(|(n, _)| !n.starts_with(crate::names::TXN_HEADER_PREFIX.as_bytes()))
        .map(|(n, v)| n.len() + v.len())
        .sum();
    (record.key.as_ref().map_or(0, Bytes::len) + headers + record.value.len()) as u64
}

fn header(name: &'static str, value: impl Into<Bytes>) -> (Bytes, Bytes) {
    (Bytes::from_static(name.as_bytes()), value.into())
}

fn key_headers(key: &TxnKey, handle: u64) -> [(Bytes, Bytes); 3] {
    [
        header(GROUP_HEADER, Bytes::copy_from_slice(key.group.as_bytes())),
        header(ID_HEADER, Bytes::copy_from_slice(key.id.as_bytes())),
        header(HANDLE_HEADER, Bytes::copy_from_slice(&handle.to_le_bytes())),
    ]
}

fn encode_half(key: &TxnKey, handle: u64, half: HalfInput) -> RecordInput {
    let mut record = half.record;
    record.headers.extend(key_headers(key, handle));
    record.headers.push(header(
        TOPIC_HEADER,
        Bytes::copy_from_slice(half.topic.as_bytes()),
    ));
    record.headers.push(header(
        PARTITION_HEADER,
        Bytes::copy_from_slice(&half.partition.to_le_bytes()),
    ));
    record.headers.push(header(
        TIMES_HEADER,
        Bytes::copy_from_slice(&[half.relative]),
    ));
    record
}

/// The digest a [`ProduceStep`] keeps of a TXN_PRODUCE: CRC-32 of each
/// record's topic, key, headers and value, each length-prefixed (not its
/// partition, which an unkeyed record gets round robin, nor its resolved
/// times, which a delay given as a duration makes differ on a retry).
pub fn step_digest(records: &[HalfInput]) -> u32 {
    fn field(hasher: &mut crc32fast::Hasher, bytes: &[u8]) {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut hasher = crc32fast::Hasher::new();
    for half in records {
        field(&mut hasher, half.topic.as_bytes());
        match &half.record.key {
            Some(key) => {
                hasher.update(&[1]);
                field(&mut hasher, key);
            }
            None => hasher.update(&[0]),
        }
        hasher.update(&(half.record.headers.len() as u64).to_le_bytes());
        for (name, value) in &half.record.headers {
            field(&mut hasher, name);
            field(&mut hasher, value);
        }
        field(&mut hasher, &half.record.value);
    }
    hasher.finalize()
}

fn encode_step(sequence: u32, count: u32, digest: u32) -> Bytes {
    let mut bytes = Vec::with_capacity(12);
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend_from_slice(&digest.to_le_bytes());
    Bytes::from(bytes)
}

fn decode_step(bytes: &[u8]) -> Option<(u32, u32, u32)> {
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            bytes.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    (bytes.len() == 12).then_some(())?;
    Some((word(0)?, word(1)?, word(2)?))
}

fn encode_outcome(key: &TxnKey, handle: u64, outcome: TxnOutcome) -> RecordInput {
    let mut record = RecordInput::default();
    record.headers.extend(key_headers(key, handle));
    record.headers.push(header(
        OUTCOME_HEADER,
        Bytes::copy_from_slice(&[outcome.byte()]),
    ));
    record
}

enum Kind {
    Half { topic: String, partition: u32 },
    Acks(TxnAcks),
    Outcome(TxnOutcome),
}

/// Bytes an ack record's positions count against `max_bytes`.
fn ack_bytes(positions: usize) -> u64 {
    (positions * ACK_POSITION_LEN) as u64
}

const ACK_POSITION_LEN: usize = 12;

fn encode_acks(key: &TxnKey, handle: u64, acks: &TxnAcks) -> RecordInput {
    let mut value = Vec::with_capacity(acks.positions.len() * ACK_POSITION_LEN);
    for (partition, offset) in &acks.positions {
        value.extend_from_slice(&partition.to_le_bytes());
        value.extend_from_slice(&offset.to_le_bytes());
    }
    let mut record = RecordInput {
        value: Bytes::from(value),
        ..RecordInput::default()
    };
    record.headers.extend(key_headers(key, handle));
    record.headers.push(header(
        TOPIC_HEADER,
        Bytes::copy_from_slice(acks.target.topic.as_bytes()),
    ));
    record.headers.push(header(
        ACK_GROUP_HEADER,
        Bytes::copy_from_slice(acks.target.group.as_bytes()),
    ));
    if let Some(member) = &acks.target.member {
        record.headers.push(header(
            ACK_MEMBER_HEADER,
            Bytes::copy_from_slice(member.as_bytes()),
        ));
    }
    record
}

fn decode_acks(record: &Record) -> Option<TxnAcks> {
    let target = AckTarget {
        topic: Arc::from(text(record, TOPIC_HEADER)?),
        group: Arc::from(text(record, ACK_GROUP_HEADER)?),
        member: match find(record, ACK_MEMBER_HEADER) {
            Some(_) => Some(text(record, ACK_MEMBER_HEADER)?),
            None => None,
        },
    };
    let value = record.value.as_ref();
    if value.len() % ACK_POSITION_LEN != 0 {
        return None;
    }
    let positions = value
        .chunks_exact(ACK_POSITION_LEN)
        .map(|chunk| {
            let (partition, offset) = chunk.split_at(4);
            Some((
                u32::from_le_bytes(partition.try_into().ok()?),
                u64::from_le_bytes(offset.try_into().ok()?),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(TxnAcks { target, positions })
}

struct Parsed {
    key: TxnKey,
    handle: u64,
    kind: Kind,
}

fn find<'a>(record: &'a Record, name: &str) -> Option<&'a Bytes> {
    record
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n.as_ref() == name.as_bytes())
        .map(|(_, v)| v)
}

fn text(record: &Record, name: &str) -> Option<String> {
    find(record, name).and_then(|v| String::from_utf8(v.to_vec()).ok())
}

fn parse(record: &Record) -> Option<Parsed> {
    let key = TxnKey::new(text(record, GROUP_HEADER)?, text(record, ID_HEADER)?).ok()?;
    let handle = u64::from_le_bytes(find(record, HANDLE_HEADER)?.as_ref().try_into().ok()?);
    let kind = match find(record, OUTCOME_HEADER) {
        Some(outcome) => match outcome.as_ref() {
            [byte] => Kind::Outcome(TxnOutcome::from_byte(*byte)?),
            _ => return None,
        },
        None if find(record, ACK_GROUP_HEADER).is_some() => Kind::Acks(decode_acks(record)?),
        None => Kind::Half {
            topic: text(record, TOPIC_HEADER)?,
            partition: u32::from_le_bytes(
                find(record, PARTITION_HEADER)?.as_ref().try_into().ok()?,
            ),
        },
    };
    Some(Parsed { key, handle, kind })
}

/// A half record as its committed record, or `None` if its headers are
/// damaged.
fn decode_half(record: &Record, now_ms: i64) -> Option<CommittedRecord> {
    let topic = text(record, TOPIC_HEADER)?;
    let partition = u32::from_le_bytes(find(record, PARTITION_HEADER)?.as_ref().try_into().ok()?);
    let relative = find(record, TIMES_HEADER)
        .and_then(|v| v.first().copied())
        .unwrap_or(0);
    let mut input = RecordInput {
        id: Some(record.id),
        key: record.key.clone(),
        headers: record
            .headers
            .iter()
            .filter(|(n, _)| !n.starts_with(crate::names::TXN_HEADER_PREFIX.as_bytes()))
            .cloned()
            .collect(),
        value: record.value.clone(),
        deliver_at_ms: record.deliver_at_ms,
        expire_at_ms: record.expire_at_ms,
    };
    let stored_ms = find(record, STORED_HEADER)
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(record.timestamp_ms, i64::from_le_bytes);
    move_times(&mut input, relative, stored_ms, now_ms);
    Some(CommittedRecord {
        topic,
        partition,
        record: input,
    })
}

/// A half record copied for relocation: the same id, key, value, times
/// and headers, plus its original stored time (kept from an earlier
/// relocation).
fn relocated_copy(record: &Record) -> RecordInput {
    let mut headers: Vec<(Bytes, Bytes)> = record
        .headers
        .iter()
        .filter(|(n, _)| n.as_ref() != RELOCATED_HEADER.as_bytes())
        .cloned()
        .collect();
    if find(record, STORED_HEADER).is_none() {
        headers.push(header(
            STORED_HEADER,
            Bytes::copy_from_slice(&record.timestamp_ms.to_le_bytes()),
        ));
    }
    RecordInput {
        id: Some(record.id),
        key: record.key.clone(),
        headers,
        value: record.value.clone(),
        deliver_at_ms: record.deliver_at_ms,
        expire_at_ms: record.expire_at_ms,
    }
}

/// Moves a record's relative times (`relative` bits) by the time from its
/// store (`stored_ms`) to the commit (`now_ms`).
fn move_times(record: &mut RecordInput, relative: u8, stored_ms: i64, now_ms: i64) {
    let shift = now_ms.saturating_sub(stored_ms).max(0);
    if relative & RELATIVE_DELIVER_AT != 0 {
        record.deliver_at_ms = record.deliver_at_ms.map(|t| t.saturating_add(shift));
    }
    if relative & RELATIVE_EXPIRE_AT != 0 {
        record.expire_at_ms = record.expire_at_ms.map(|t| t.saturating_add(shift));
    }
}

/// What a cached copy of `record` costs in memory: its bytes, plus the
/// record's own fields and one allocation per byte string (about 48 bytes
/// each with the allocator's rounding). Measured: with the bytes alone the
/// cache took about twice its budget.
fn cached_cost(record: &RecordInput) -> u64 {
    const ALLOCATION: usize = 48;
    let strings = 1 + usize::from(record.key.is_some()) + 2 * record.headers.len();
    let bytes = record.key.as_ref().map_or(0, Bytes::len)
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
    (bytes
        + strings * ALLOCATION
        + std::mem::size_of::<CachedRecord>()
        + record.headers.len() * std::mem::size_of::<(Bytes, Bytes)>()) as u64
}

/// A copy of `record` whose bytes own their memory: a cached record must
/// not keep a connection's whole read buffer alive.
fn owned_copy(record: &RecordInput) -> RecordInput {
    let own = |bytes: &Bytes| Bytes::copy_from_slice(bytes);
    RecordInput {
        id: record.id,
        key: record.key.as_ref().map(own),
        headers: record
            .headers
            .iter()
            .map(|(n, v)| (own(n), own(v)))
            .collect(),
        value: own(&record.value),
        deliver_at_ms: record.deliver_at_ms,
        expire_at_ms: record.expire_at_ms,
    }
}

fn encode_meta(watermark: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(META_LEN);
    payload.push(META_VERSION);
    payload.extend_from_slice(&watermark.to_le_bytes());
    payload
}

fn decode_meta(payload: &[u8]) -> Result<u64> {
    match payload {
        [META_VERSION, rest @ ..] if rest.len() == 8 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(rest);
            Ok(u64::from_le_bytes(bytes))
        }
        _ => Err(TxnError::Corrupt(format!(
            "{META_JOURNAL}: a watermark payload of {} bytes",
            payload.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use dmq_log_store::ManualClock;

    fn key(id: &str) -> TxnKey {
        TxnKey::new("orders", id).unwrap()
    }

    fn half(topic: &str, value: &str) -> HalfInput {
        HalfInput {
            topic: topic.to_string(),
            partition: 0,
            record: RecordInput::new(value.to_string()),
            relative: 0,
        }
    }

    fn open(storage: &Arc<MemoryStorage>) -> TransactionLog {
        TransactionLog::open(
            Arc::clone(storage) as Arc<dyn Storage>,
            TransactionLimits::default(),
        )
        .unwrap()
        .0
    }

    fn storage() -> Arc<MemoryStorage> {
        Arc::new(MemoryStorage::new(Arc::new(ManualClock::new(1_000))))
    }

    /// The answer a retry of a durable step gets: its records' ids.
    fn retried_ids(
        store: &TransactionLog,
        key: &TxnKey,
        handle: u64,
        records: &[HalfInput],
        sequence: u32,
    ) -> Vec<MessageId> {
        match store
            .check_sequence(key, handle, sequence, step_digest(records))
            .unwrap()
        {
            SequenceCheck::Retry {
                handle: h, step, ..
            } => {
                assert!(handle == 0 || h == handle, "{h} is not {handle}");
                store
                    .step_records(h, &step)
                    .unwrap()
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .collect()
            }
            other => panic!("sequence {sequence} is {other:?}, not a retry"),
        }
    }

    #[test]
    fn numbered_steps_are_recognised_across_a_reopen() {
        let storage = storage();
        let mut store = open(&storage);
        let first = vec![half("t", "1"), half("u", "2")];
        let second = vec![half("t", "3")];
        let (a, info, step) = store
            .append_produce(&key("a"), 0, first.clone(), step_digest(&first), 1_000)
            .unwrap();
        assert_eq!(step, Some(0));
        store.half_written(a, step, true);
        let first_ids = info.ids.clone();
        // A plain produce takes the next number too.
        let (_, info) = store
            .append_half(&key("a"), a, second.clone(), 1_000)
            .unwrap();
        store.half_written(a, Some(1), true);
        let second_ids = info.ids.clone();
        for store in [store, open(&storage)] {
            assert_eq!(retried_ids(&store, &key("a"), a, &first, 0), first_ids);
            assert_eq!(retried_ids(&store, &key("a"), a, &second, 1), second_ids);
            // A retried begin (its handle lost) finds the transaction.
            assert_eq!(retried_ids(&store, &key("a"), 0, &first, 0), first_ids);
            assert_eq!(
                store.check_sequence(&key("a"), a, 2, 7).unwrap(),
                SequenceCheck::New
            );
            assert!(matches!(
                store.check_sequence(&key("a"), a, 3, 7),
                Err(TxnError::OutOfSequence { .. })
            ));
            assert!(matches!(
                store.check_sequence(&key("a"), a, 1, step_digest(&first)),
                Err(TxnError::Conflict { .. })
            ));
            assert!(matches!(
                store.check_sequence(&key("a"), 0, 1, step_digest(&first)),
                Err(TxnError::OutOfSequence { .. })
            ));
            // Another transaction's begin with other records under an open
            // id is new here (the append refuses it).
            assert_eq!(
                store
                    .check_sequence(&key("a"), 0, 0, step_digest(&second))
                    .unwrap(),
                SequenceCheck::New
            );
        }
    }

    #[test]
    fn a_transaction_stored_without_numbers_refuses_numbered_produces() {
        let storage = storage();
        let mut store = open(&storage);
        // As an older broker wrote it: no step header.
        let record = encode_half(&key("old"), 1, half("t", "1"));
        store.append(vec![record]).unwrap();
        let store = open(&storage);
        assert_eq!(store.handle_of(&key("old")), Some(1));
        assert!(!store.get(1).unwrap().steps_known);
        assert!(matches!(
            store.check_sequence(&key("old"), 1, 1, 0),
            Err(TxnError::OutOfSequence { .. })
        ));
    }

    #[test]
    fn a_transaction_survives_reopening_in_its_stage() {
        let storage = storage();
        let mut store = open(&storage);
        let (a, _) = store
            .append_half(&key("a"), 0, vec![half("t", "1"), half("u", "2")], 1_000)
            .unwrap();
        store.half_written(a, None, true);
        let (b, _) = store
            .append_half(&key("b"), 0, vec![half("t", "3")], 1_000)
            .unwrap();
        let (c, _) = store
            .append_half(&key("c"), 0, vec![half("t", "4")], 1_000)
            .unwrap();
        assert_eq!((a, b, c), (1, 3, 4));
        // `a` takes a second record later, after `b` and `c` began.
        assert_eq!(
            store
                .append_half(&key("a"), a, vec![half("t", "5")], 1_000)
                .unwrap()
                .0,
            a
        );
        store.append_outcome(b, TxnOutcome::Commit).unwrap();
        store.outcome_written(b, TxnOutcome::Commit, true);
        store.append_outcome(c, TxnOutcome::Rollback).unwrap();
        store.outcome_written(c, TxnOutcome::Rollback, true);
        assert_eq!(store.settled(&key("c")), Some((c, TxnOutcome::Rollback)));

        let reopened = open(&storage);
        let a_txn = reopened.get(a).unwrap();
        assert_eq!(a_txn.stage, TxnStage::Open);
        assert_eq!(a_txn.records.len(), 3);
        assert_eq!(reopened.get(b).unwrap().stage, TxnStage::Committed);
        assert!(reopened.get(c).is_none());
        assert_eq!(reopened.committed(), vec![b]);
        let records = reopened.read_records(a, 1_000).unwrap();
        let values: Vec<_> = records.iter().map(|r| r.record.value.clone()).collect();
        assert_eq!(values, vec!["1", "2", "5"]);
        assert_eq!(records[1].topic, "u");
        assert!(records.iter().all(|r| r.record.headers.is_empty()));
        assert!(records.iter().all(|r| r.record.id.is_some()));
    }

    /// Regression: handles came from the log's visible end, which lags
    /// appends waiting for their fsync, so two transactions begun within
    /// one group commit (on a real log) shared a handle, and the second's
    /// COMMIT settled the first.
    #[test]
    fn transactions_begun_before_a_group_commit_get_their_own_handles() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(
            crate::storage::FileStorage::new(dir.path(), dmq_log_store::LogConfig::default())
                .unwrap(),
        );
        let (mut store, _) =
            TransactionLog::open(Arc::clone(&storage), TransactionLimits::default()).unwrap();
        let (a, info_a) = store
            .append_half(&key("a"), 0, vec![half("t", "1")], 1_000)
            .unwrap();
        let (b, info_b) = store
            .append_half(&key("b"), 0, vec![half("t", "2")], 1_000)
            .unwrap();
        assert_ne!(a, b);
        assert_eq!((a, b), (info_a.base_offset + 1, info_b.base_offset + 1));
        store.log().wait_durable(&info_b).unwrap();
        drop(store);
        let (reopened, _) = TransactionLog::open(storage, TransactionLimits::default()).unwrap();
        assert_eq!(reopened.get(a).unwrap().key, key("a"));
        assert_eq!(reopened.get(b).unwrap().key, key("b"));
    }

    #[test]
    fn a_handle_names_one_transaction_only() {
        let storage = storage();
        let mut store = open(&storage);
        let (first, _) = store
            .append_half(&key("a"), 0, vec![half("t", "1")], 1_000)
            .unwrap();
        // A second begin of an open id is refused.
        assert!(matches!(
            store.append_half(&key("a"), 0, vec![half("t", "x")], 1_000),
            Err(TxnError::Conflict { .. })
        ));
        store.append_outcome(first, TxnOutcome::Rollback).unwrap();
        store.outcome_written(first, TxnOutcome::Rollback, true);
        // The id is free again; the new transaction has another handle, and
        // the old handle reaches it no more.
        let (second, _) = store
            .append_half(&key("a"), 0, vec![half("t", "2")], 1_000)
            .unwrap();
        assert_ne!(first, second);
        assert!(store
            .append_half(&key("a"), first, vec![half("t", "3")], 1_000)
            .is_err());
    }

    #[test]
    fn the_watermark_skips_settled_transactions_and_frees_the_log() {
        let storage = storage();
        let mut store = open(&storage);
        let (a, _) = store
            .append_half(&key("a"), 0, vec![half("t", "1")], 1_000)
            .unwrap();
        let (b, _) = store
            .append_half(&key("b"), 0, vec![half("t", "2")], 1_000)
            .unwrap();
        store.append_outcome(a, TxnOutcome::Commit).unwrap();
        store.outcome_written(a, TxnOutcome::Commit, true);
        store.settle(a, TxnOutcome::Commit);
        store.flush_watermark().unwrap();
        assert_eq!(store.watermark(), b - 1);
        // `b` gets a record after `a`'s outcome; `a` stays settled.
        store
            .append_half(&key("b"), b, vec![half("t", "3")], 1_000)
            .unwrap();
        let reopened = open(&storage);
        assert!(reopened.get(a).is_none());
        assert_eq!(reopened.get(b).unwrap().records.len(), 2);
    }

    #[test]
    fn relative_times_move_to_the_commit() {
        let storage = storage();
        let mut store = open(&storage);
        let mut delayed = half("t", "1");
        delayed.record.deliver_at_ms = Some(1_000 + 600_000);
        delayed.record.expire_at_ms = Some(1_000 + 60_000);
        delayed.relative = RELATIVE_DELIVER_AT;
        let mut absolute = half("t", "2");
        absolute.record.deliver_at_ms = Some(5_000);
        let (a, _) = store
            .append_half(&key("a"), 0, vec![delayed, absolute], 1_000)
            .unwrap();
        let records = store.read_records(a, 31_000).unwrap();
        assert_eq!(records[0].record.deliver_at_ms, Some(631_000));
        assert_eq!(records[0].record.expire_at_ms, Some(61_000));
        assert_eq!(records[1].record.deliver_at_ms, Some(5_000));
    }

    /// A commit reads its records from the cache while they fit the
    /// budget, else back from the half log: both give the same records.
    #[test]
    fn cached_and_read_back_records_are_the_same() {
        let storage = storage();
        let open_with = |cache_bytes| {
            TransactionLog::open(
                Arc::clone(&storage) as Arc<dyn Storage>,
                TransactionLimits {
                    cache_bytes,
                    ..TransactionLimits::default()
                },
            )
            .unwrap()
            .0
        };
        let mut store = open_with(1 << 20);
        let mut delayed = half("t", "late");
        delayed.record.deliver_at_ms = Some(61_000);
        delayed.record.expire_at_ms = Some(90_000);
        delayed.record.key = Some(Bytes::from_static(b"k"));
        delayed.record.headers.push(("h".into(), "v".into()));
        delayed.relative = RELATIVE_DELIVER_AT | RELATIVE_EXPIRE_AT;
        let (a, _) = store
            .append_half(&key("a"), 0, vec![delayed, half("u", "now")], 1_000)
            .unwrap();
        assert!(store.cached_bytes > 0);
        let cached = store.read_records(a, 5_000).unwrap();
        let read_back = open_with(1 << 20).read_records(a, 5_000).unwrap();
        let shape = |records: &[CommittedRecord]| {
            records
                .iter()
                .map(|r| (r.topic.clone(), r.partition, format!("{:?}", r.record)))
                .collect::<Vec<_>>()
        };
        assert_eq!(shape(&cached), shape(&read_back));
        assert_eq!(cached[0].record.deliver_at_ms, Some(61_000 + 4_000));
        // Over the budget: nothing cached, and the same records.
        let mut small = open_with(2);
        let (b, _) = small
            .append_half(&key("b"), 0, vec![half("t", "big")], 1_000)
            .unwrap();
        assert_eq!(small.cached_bytes, 0);
        assert_eq!(small.read_records(b, 1_000).unwrap()[0].record.value, "big");
        small.settle(b, TxnOutcome::Rollback);
        store.settle(a, TxnOutcome::Rollback);
        assert_eq!(store.cached_bytes, 0);
    }

    #[test]
    fn check_counts_survive_a_reopen_for_open_transactions_only() {
        let storage = storage();
        let mut store = open(&storage);
        let now = 1_000;
        let (open_handle, _) = store
            .append_half(&key("open"), 0, vec![half("t", "a")], now)
            .unwrap();
        store.half_written(open_handle, None, true);
        let (ended, _) = store
            .append_half(&key("ended"), 0, vec![half("t", "b")], now)
            .unwrap();
        store.half_written(ended, None, true);
        for n in 1..=2_000 {
            store.note_check(open_handle, n % 7 + 1);
        }
        store.note_check(open_handle, 3);
        store.note_check(ended, 2);
        store.append_outcome(ended, TxnOutcome::Rollback).unwrap();
        store.outcome_written(ended, TxnOutcome::Rollback, true);
        // Compacted: only the open transaction's count is kept.
        store.sync_checks().unwrap();
        drop(store);
        let store = open(&storage);
        assert_eq!(store.checks_sent(open_handle), 3);
        assert_eq!(store.checks_sent(ended), 0);
        let (_, payloads) = storage.open_journal(CHECKS_JOURNAL).unwrap();
        assert_eq!(payloads.len(), 1);
    }

    /// One transaction left open does not pin the half log: past the
    /// threshold it is relocated to the log's end, the watermark passes its
    /// old records, and a reopen finds it whole (records, ids, acks, times).
    #[test]
    fn an_open_transaction_is_relocated_instead_of_pinning_the_log() {
        let clock = Arc::new(ManualClock::new(1_000));
        let storage = Arc::new(MemoryStorage::new(clock.clone()));
        let limits = TransactionLimits {
            relocate_after_records: 10,
            ..TransactionLimits::default()
        };
        let reopen = || {
            TransactionLog::open(Arc::clone(&storage) as Arc<dyn Storage>, limits.clone())
                .unwrap()
                .0
        };
        let mut store = reopen();
        let stuck = key("stuck");
        let mut delayed = half("t", "remind");
        delayed.record.deliver_at_ms = Some(1_000 + 60_000);
        delayed.relative = RELATIVE_DELIVER_AT;
        let (handle, info) = store
            .append_half(&stuck, 0, vec![half("t", "a"), delayed], 1_000)
            .unwrap();
        store.half_written(handle, None, true);
        let ids = info.ids.clone();
        let acks = TxnAcks {
            target: AckTarget {
                topic: Arc::from("in"),
                group: Arc::from("g"),
                member: None,
            },
            positions: vec![(0, 7)],
        };
        store
            .append_acks(&stuck, handle, acks.clone(), 1_000)
            .unwrap();
        store.half_written(handle, None, true);
        // Twenty other transactions come and settle.
        for n in 0..20 {
            let (other, _) = store
                .append_half(&key(&format!("o{n}")), 0, vec![half("t", "x")], 2_000)
                .unwrap();
            store.half_written(other, None, true);
            store.append_outcome(other, TxnOutcome::Commit).unwrap();
            store.outcome_written(other, TxnOutcome::Commit, true);
            store.settle(other, TxnOutcome::Commit);
        }
        // The relocation copies are stored 5 s later than the originals.
        clock.advance_ms(5_000);
        store.flush_watermark().unwrap();
        let txn = store.get(handle).unwrap();
        assert!(txn.first_offset > handle, "relocated: {}", txn.first_offset);
        assert_eq!(store.watermark(), txn.first_offset);
        assert!(store.log().start_offset() <= txn.first_offset);
        // More records after the relocation, then a restart.
        store
            .append_half(&stuck, handle, vec![half("u", "b")], 3_000)
            .unwrap();
        store.half_written(handle, None, true);
        drop(store);
        let mut store = reopen();
        let txn = store.get(handle).unwrap();
        assert_eq!(txn.stage, TxnStage::Open);
        assert_eq!(txn.opened_ms, 1_000, "the opened time survives");
        assert_eq!(txn.records.len(), 3);
        assert_eq!(txn.acks, vec![acks]);
        assert_eq!(
            &txn.records[..2].iter().map(|r| r.id).collect::<Vec<_>>(),
            &ids
        );
        assert_eq!(store.handle_of(&stuck), Some(handle));
        // Committed at 10,000: the delay runs from the commit, as if never
        // relocated (stored at 1,000, due 60 s after that, so 60 s after
        // the commit).
        let records = store.read_records(handle, 10_000).unwrap();
        let values: Vec<&[u8]> = records.iter().map(|r| r.record.value.as_ref()).collect();
        assert_eq!(values, vec![&b"a"[..], b"remind", b"b"]);
        assert_eq!(records[1].record.deliver_at_ms, Some(10_000 + 60_000));
        assert!(records.iter().all(|r| r
            .record
            .headers
            .iter()
            .all(|(n, _)| !n.starts_with(b"dmq.txn."))));
        // Relocated again later: still one copy of each record.
        for n in 0..20 {
            let (other, _) = store
                .append_half(&key(&format!("p{n}")), 0, vec![half("t", "x")], 4_000)
                .unwrap();
            store.half_written(other, None, true);
            store.append_outcome(other, TxnOutcome::Rollback).unwrap();
            store.outcome_written(other, TxnOutcome::Rollback, true);
        }
        store.flush_watermark().unwrap();
        drop(store);
        let store = reopen();
        let txn = store.get(handle).unwrap();
        assert_eq!((txn.records.len(), txn.acks.len()), (3, 1));
        assert_eq!(store.transactions().count(), 1);
    }

    #[test]
    fn epochs_fence_older_instances_across_a_reopen() {
        let storage = storage();
        let mut epochs = ProducerEpochs::open(storage.as_ref()).unwrap();
        assert!(epochs.check("shop", "p1", 0).is_ok(), "never registered");
        assert_eq!(epochs.bump("shop", "p1").unwrap(), 1);
        assert_eq!(epochs.bump("shop", "p1").unwrap(), 2);
        assert_eq!(epochs.bump("shop", "p2").unwrap(), 1);
        assert!(matches!(
            epochs.check("shop", "p1", 1),
            Err(TxnError::Fenced { current: 2, .. })
        ));
        for _ in 0..300 {
            epochs.bump("other", "p").unwrap();
        }
        drop(epochs);
        let epochs = ProducerEpochs::open(storage.as_ref()).unwrap();
        assert!(epochs.check("shop", "p1", 2).is_ok());
        assert!(epochs.check("shop", "p2", 1).is_ok());
        assert!(epochs.check("other", "p", 300).is_ok());
        assert!(
            epochs.payloads <= 4 * 64 + 1,
            "compacted: {}",
            epochs.payloads
        );
        assert!(decode_epoch(&[1, 3, b'a']).is_err());
    }

    #[test]
    fn limits_refuse_a_request_whole() {
        let storage = storage();
        let (mut store, _) = TransactionLog::open(
            Arc::clone(&storage) as Arc<dyn Storage>,
            TransactionLimits {
                max_records: 2,
                timeout_ms: 10,
                ..TransactionLimits::default()
            },
        )
        .unwrap();
        let (a, _) = store
            .append_half(&key("a"), 0, vec![half("t", "1")], 1_000)
            .unwrap();
        let end = store.log().end_offset();
        assert!(matches!(
            store.append_half(&key("a"), a, vec![half("t", "2"), half("t", "3")], 1_000),
            Err(TxnError::Limit { .. })
        ));
        assert!(matches!(
            store.append_half(&key("a"), a, vec![half("t", "2")], 1_011),
            Err(TxnError::Limit { .. })
        ));
        assert_eq!(store.log().end_offset(), end, "nothing was stored");
        assert!(TxnKey::new("", "x").is_err());
        assert!(TxnKey::new("g", "x".repeat(256)).is_err());
    }
}
