//! A partition's Raft group, whose Raft log is the partition's segment log.
//!
//! A normal Raft entry is one record batch. Its records are stored once,
//! in the partition's [`Log`]; a small row journal
//! ([`crate::log_store`]) keeps, per Raft entry, its log id and where its
//! batch is (`base_offset`, `count`), or the entry itself for the rare
//! blank and membership entries, plus the vote and the committed id. No
//! message is written twice.
//!
//! # The life of a batch
//!
//! 1. The leader proposes a [`ReplicatedBatch`] without a base offset.
//!    Its log assigns offsets, ids and the timestamp on append.
//! 2. openraft reads entries back from the leader's storage to replicate
//!    them: a batch read back carries its base offset, ids and timestamp,
//!    as the bytes the leader stored (their CRC checked at the first read;
//!    a later reader of the entry takes it from `RecentEntries`).
//!    A follower appends exactly those bytes
//!    ([`Log::append_stored_deferred`]) and
//!    refuses a batch whose base offset is not its log's end (a diverged
//!    replica is an error, never a silent second numbering).
//! 3. Before openraft hears an append is done, the batch is fsynced; its
//!    row is written after, and synced with the journal's next synced
//!    write (`RowJournal::write_unsynced`). A row therefore never names
//!    missing data. A crash may take rows of batches: the next open
//!    rebuilds them from the batches past the last row kept, one entry
//!    per batch, indexes following that row, under the leader id the
//!    journal's `RebuildTail` names. Exact because a batch goes to the
//!    log only once the journal durably names its leader id and every row
//!    before it is kept or names a batch of its own (`ready_for_batch`).
//!    A truncation clears the name: a batch left past the rows then (a
//!    crash between the journal's truncation and the log's) is cut.
//! 4. Truncation (a tail the new leader does not have) writes the row
//!    journal's truncation first, then cuts the closed log back
//!    ([`dmq_log_store::truncate_closed_log`]) and reopens it.
//! 5. Committed entries are applied by [`PartitionStateMachine`], which
//!    moves the committed end: what a dispatcher may deliver from.
//!
//! 6. Rows are purged only below what every member holds: the leader
//!    proposes [`PartitionCommand::PurgeAllowed`] with the lowest index
//!    every member has matched (and that is committed); once applied,
//!    each replica snapshots its state machine (kept in a file) and
//!    purges its rows up to there. No member ever needs a purged entry,
//!    so no snapshot is ever sent to one.
//!
//! 7. A batch whose CRC fails at open is cut with everything after it; a
//!    log shorter than its rows takes no entry and its group does not
//!    start until a peer's committed batches fill it ([`crate::repair`]).
//!
//! 8. Snapshots hold the state machine only, never records: a replica
//!    sent one beyond its records (a learner added after a purge) fetches
//!    them from the other members first ([`crate::repair`]); the kept
//!    snapshot's committed end then stands for the rows it lacks, and no
//!    record below it is ever cut.
//!
//! 9. A leader's proposal of an idempotent producer's batch its log
//!    already holds (same producer id, sequence and size: a retry) is
//!    appended as a row with no records naming the first batch
//!    ([`PartitionCommand::Duplicate`]) and answered with the first's
//!    offsets and ids (`ProducerBatches`).
//!
//! A member that stays down holds purging back (rows grow until it
//! returns or is removed).

use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use bytes::Bytes;
use dmq_log_store::{
    truncate_closed_log, AppendInfo, BatchInput, Log, LogConfig, MessageId, RecordInput,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, Membership, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::log_store::{blocking, report_append, LogOp, Row, RowJournal};
use crate::{NodeId, StorageError};

openraft::declare_raft_types!(
    /// A partition group's types: a normal entry is one record batch.
    pub PartitionTypes:
        D = PartitionCommand,
        R = AppendedBatch,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<PartitionTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of a partition group.
pub type PartitionEntry = Entry<PartitionTypes>;

/// Record bytes: raw in a binary encoding (the Raft RPC frames), base64
/// in a human-readable one (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload(pub Bytes);

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

struct PayloadVisitor;

impl<'de> serde::de::Visitor<'de> for PayloadVisitor {
    type Value = Payload;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes, or a base64 string")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Payload, E> {
        Ok(Payload(Bytes::copy_from_slice(bytes)))
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, bytes: &'de [u8]) -> Result<Payload, E> {
        let view = VIEWED.with(|viewed| {
            let viewed = viewed.borrow();
            let frame = viewed.as_ref()?;
            let inside = frame.as_ptr() as usize <= bytes.as_ptr() as usize
                && bytes.as_ptr() as usize + bytes.len() <= frame.as_ptr() as usize + frame.len();
            inside.then(|| frame.slice_ref(bytes))
        });
        Ok(Payload(
            view.unwrap_or_else(|| Bytes::copy_from_slice(bytes)),
        ))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Payload, E> {
        Ok(Payload(Bytes::from(bytes)))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Payload, E> {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(|bytes| Payload(Bytes::from(bytes)))
            .map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(PayloadVisitor)
        } else {
            deserializer.deserialize_bytes(PayloadVisitor)
        }
    }
}

thread_local! {
    /// The bytes [`with_payloads_viewing`] is decoding from, if any.
    static VIEWED: std::cell::RefCell<Option<Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Runs `decode` (a synchronous decoding of `bytes`) so that every
/// [`Payload`] it decodes from within `bytes` is a view of them, not a
/// copy: a replicated batch's records and a forwarded produce's values
/// were each copied out of their frame (3 % of a three-node cluster's
/// CPU, and an allocation per record). A view keeps all of `bytes`
/// alive: only for what is dropped once handled
/// ([`crate::network::GroupTypes::PAYLOADS_VIEW_FRAMES`]).
pub(crate) fn with_payloads_viewing<T>(bytes: &Bytes, decode: impl FnOnce() -> T) -> T {
    /// Puts back what was viewed before, also when `decode` panics.
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let earlier = self.0.take();
            VIEWED.with(|viewed| *viewed.borrow_mut() = earlier);
        }
    }
    let _restore = Restore(VIEWED.with(|viewed| viewed.borrow_mut().replace(bytes.clone())));
    decode()
}

/// One record of a replicated batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedRecord {
    /// The message id's 16 bytes: set once the leader's log assigned it.
    pub id: Option<[u8; 16]>,
    /// The key.
    pub key: Option<Payload>,
    /// Application headers.
    pub headers: Vec<(Payload, Payload)>,
    /// The payload.
    pub value: Payload,
    /// Deliver no earlier than this (ms since the epoch).
    pub deliver_at_ms: Option<i64>,
    /// Never deliver after this (ms since the epoch).
    pub expire_at_ms: Option<i64>,
}

/// A record batch as a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedBatch {
    /// Where the batch starts in the partition log: `None` when proposed
    /// (the leader's log assigns it), `Some` once appended and read back.
    pub base_offset: Option<u64>,
    /// The broker timestamp: `None` when proposed.
    pub timestamp_ms: Option<i64>,
    /// Idempotent producer id (0: none).
    pub producer_id: u64,
    /// The producer's sequence of the first record.
    pub producer_seq: u64,
    /// The records, at least one, as proposed (empty when `stored` holds
    /// them).
    pub records: Vec<ReplicatedRecord>,
    /// The batch exactly as the leader's log stored it (header, CRC and
    /// records), when read back to be sent to a follower: one buffer to
    /// send instead of a structure per record. A follower verifies its
    /// CRC and appends its records.
    #[serde(default)]
    pub stored: Option<Payload>,
}

impl ReplicatedBatch {
    /// A batch to propose, from records as a producer sends them.
    pub fn propose(records: Vec<RecordInput>) -> ReplicatedBatch {
        ReplicatedBatch {
            base_offset: None,
            timestamp_ms: None,
            producer_id: 0,
            producer_seq: 0,
            stored: None,
            records: records
                .into_iter()
                .map(|record| ReplicatedRecord {
                    id: record.id.map(|id| id.0),
                    key: record.key.map(Payload),
                    headers: record
                        .headers
                        .into_iter()
                        .map(|(name, value)| (Payload(name), Payload(value)))
                        .collect(),
                    value: Payload(record.value),
                    deliver_at_ms: record.deliver_at_ms,
                    expire_at_ms: record.expire_at_ms,
                })
                .collect(),
        }
    }

    /// The stored batch this carries, verified (CRC and every record) and
    /// holding the base offset and timestamp it claims.
    fn stored_batch(&self) -> Result<dmq_log_store::RecordBatch, String> {
        let stored = self
            .stored
            .as_ref()
            .ok_or_else(|| "a replicated batch carries no stored bytes".to_string())?;
        let batch = dmq_log_store::RecordBatch::decode(stored.0.clone())
            .map_err(|e| format!("a replicated batch is damaged: {e}"))?;
        let header = batch.header();
        if Some(header.base_offset) != self.base_offset {
            return Err(format!(
                "a replicated batch says offset {:?} but holds {}",
                self.base_offset, header.base_offset
            ));
        }
        if let Some(timestamp) = self.timestamp_ms.filter(|&t| t != header.max_timestamp_ms) {
            return Err(format!(
                "a replicated batch says time {timestamp} but holds {}",
                header.max_timestamp_ms
            ));
        }
        Ok(batch)
    }

    fn to_input(&self) -> Result<BatchInput, String> {
        if self.stored.is_some() {
            let batch = self.stored_batch()?;
            let header = batch.header();
            let mut records = Vec::with_capacity(header.record_count as usize);
            for record in batch.records() {
                let record = record.map_err(|e| e.to_string())?;
                records.push(RecordInput {
                    id: Some(record.id),
                    key: record.key,
                    headers: record.headers,
                    value: record.value,
                    deliver_at_ms: record.deliver_at_ms,
                    expire_at_ms: record.expire_at_ms,
                });
            }
            return Ok(BatchInput {
                producer_id: header.producer_id,
                producer_seq: header.producer_seq,
                records,
            });
        }
        let mut records = Vec::with_capacity(self.records.len());
        for record in &self.records {
            records.push(RecordInput {
                id: record.id.map(MessageId),
                key: record.key.as_ref().map(|k| k.0.clone()),
                headers: record
                    .headers
                    .iter()
                    .map(|(n, v)| (n.0.clone(), v.0.clone()))
                    .collect(),
                value: record.value.0.clone(),
                deliver_at_ms: record.deliver_at_ms,
                expire_at_ms: record.expire_at_ms,
            });
        }
        Ok(BatchInput {
            producer_id: self.producer_id,
            producer_seq: self.producer_seq,
            records,
        })
    }
}

/// A partition group's command: what a normal Raft entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionCommand {
    /// A record batch, stored in the partition log.
    Batch(ReplicatedBatch),
    /// Every member of the group held the entries up to index `upto` (and
    /// they were committed) when the leader proposed this: each replica
    /// may purge its rows up to there, since no member will ever need
    /// them again (see the `purge` module).
    PurgeAllowed {
        /// The last Raft index that may be purged.
        upto: u64,
    },
    /// An idempotent producer's batch that the leader's log already held
    /// when the producer proposed it again (a retry through another node
    /// while the first was waiting for its quorum, or committed after the
    /// retrying node last caught up): stored as a row only, naming the
    /// first, and answered with the first's offsets and ids. Only a
    /// leader's log makes one, from a [`PartitionCommand::Batch`].
    Duplicate {
        /// Where the first batch starts.
        base_offset: u64,
        /// Its records.
        count: u32,
    },
}

/// What applying a committed batch answers: where its records are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedBatch {
    /// Offset of the first record (for blank and membership entries: the
    /// log end at that point, with `count` 0).
    pub base_offset: u64,
    /// Records in the batch.
    pub count: u32,
    /// The records' ids, in order, when the answering node's log assigned
    /// them (the leader that took the proposal); empty otherwise.
    pub ids: Vec<[u8; 16]>,
    /// The batch was stored by an earlier proposal of it (an idempotent
    /// producer's retry: [`PartitionCommand::Duplicate`]); this answer
    /// names the first's records.
    pub stored_before: bool,
}

/// What the row journal keeps of an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum RowKind {
    Records {
        base_offset: u64,
        count: u32,
    },
    Blank,
    Membership(Membership<NodeId, BasicNode>),
    PurgeAllowed {
        upto: u64,
    },
    /// An idempotent producer's retry of the batch at `base_offset`
    /// (`count` records), which this log already held: no records of its
    /// own ([`PartitionCommand::Duplicate`]).
    Duplicate {
        base_offset: u64,
        count: u32,
    },
}

/// A Raft entry's row: its log id, where its data is, and the partition
/// log's end once it is appended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EntryRow {
    log_id: LogId<NodeId>,
    kind: RowKind,
    end_offset: u64,
}

impl Row for EntryRow {
    fn log_id(&self) -> LogId<NodeId> {
        self.log_id
    }
}

impl EntryRow {
    /// Whether the row names a batch of its own in the partition log.
    fn names_records(&self) -> bool {
        matches!(self.kind, RowKind::Records { .. })
    }
}

#[derive(Debug)]
struct Inner {
    rows: RowJournal<EntryRow>,
    /// `None` only while a truncation has it closed.
    log: Option<Log>,
    log_dir: PathBuf,
    log_config: LogConfig,
    /// The end of the log including appends not yet durable.
    next_offset: u64,
    /// Ids this log assigned to proposals it took as leader, by Raft log
    /// index, until the entry is applied (and answered with them) or
    /// truncated.
    assigned_ids: std::collections::BTreeMap<u64, Vec<MessageId>>,
    /// While the log lacks records its rows name (found damaged or short
    /// at open) or a snapshot counts (installed from a peer): the end
    /// wanted, and each unpurged row's batch (`base_offset` → `count`),
    /// which a batch filled in must match.
    repair: Option<Repair>,
    /// The committed end of the replica's latest snapshot (its file,
    /// `partition.snapshot`): records below it are committed and never
    /// cut, whatever the rows name (a snapshot installed from a peer
    /// comes with records no row names).
    snapshot_end: u64,
    /// Entries lately read back, for their next reader.
    recent: RecentEntries,
    /// Idempotent producers' batches lately appended, to find a retry.
    producer_batches: ProducerBatches,
    /// Tests: the next append stops (as a crash would) once its batches
    /// are written, before its last rows are.
    #[cfg(test)]
    crash_before_rows: bool,
}

/// The idempotent producers' batches lately appended to a replica's log,
/// by producer id and sequence, so that a leader appends a proposal it
/// already holds as a [`RowKind::Duplicate`] naming the first, not as a
/// second copy.
///
/// A node's dedup window answers a retry only with batches its replicas
/// applied (and a retry's first batch on a connection waits for them to
/// catch up with the leader's read index), so a retry through another
/// node while the first was still waiting for its quorum at the leader,
/// or committed just after the retrying node caught up, used to be stored
/// twice. The leader's log is where every proposal of a partition meets:
/// Kafka's partition leaders check producer sequences at append for the
/// same reason. Every replica keeps one (a follower may lead next, with
/// its predecessor's tail not yet applied). Bounded by [`Self::MAX`]
/// batches, the oldest going first. At open it holds the batches of the
/// rows past the committed entry; one that fell out, or was committed
/// before the replica opened, is left to the nodes' windows, which hold
/// committed batches.
#[derive(Debug, Default)]
struct ProducerBatches {
    by_sequence: std::collections::HashMap<(u64, u64), ProducerBatch>,
    /// Raft index → (producer id, sequence), oldest first.
    by_index: std::collections::BTreeMap<u64, (u64, u64)>,
}

/// Where an idempotent producer's batch is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProducerBatch {
    index: u64,
    base_offset: u64,
    count: u32,
}

impl ProducerBatches {
    /// Batches kept at most (about 80 bytes each).
    const MAX: usize = 4096;

    fn note(&mut self, producer: (u64, u64), batch: ProducerBatch) {
        if producer.0 == 0 {
            return;
        }
        if let Some(old) = self.by_sequence.insert(producer, batch) {
            self.by_index.remove(&old.index);
        }
        self.by_index.insert(batch.index, producer);
        while self.by_index.len() > Self::MAX {
            let Some((_, oldest)) = self.by_index.pop_first() else {
                break;
            };
            self.by_sequence.remove(&oldest);
        }
    }

    /// The batch of `count` records this producer appended as `sequence`.
    fn find(&self, producer: (u64, u64), count: usize) -> Option<ProducerBatch> {
        self.by_sequence
            .get(&producer)
            .filter(|batch| batch.count as usize == count)
            .copied()
    }

    /// Forgets the batches of entries at `index` and after (truncated).
    fn forget_from(&mut self, index: u64) {
        for (_, producer) in self.by_index.split_off(&index) {
            self.by_sequence.remove(&producer);
        }
    }

    fn clear(&mut self) {
        self.by_sequence.clear();
        self.by_index.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_index.len()
    }
}

/// Record entries lately read back from the log, by Raft log index, so
/// that the next reader of one (a leader reads each entry once per
/// follower, then once more to apply it) takes it without locating and
/// CRC-checking its batch again: that re-check was a tenth of a
/// three-node cluster's CPU (BENCHMARKS.md). An entry is kept only as
/// read, verified, and matched on its whole log id, so a truncated and
/// rewritten index is never served stale.
///
/// Entries are views of the log's mapping, not copies: they are bounded
/// by the bytes they name, and dropped before anything shrinks or
/// reopens the log (a view must not outlive its segment's length: the
/// mapping contract of `dmq_log_store`'s `mmap` module) and when their
/// rows are purged.
#[derive(Debug, Default)]
struct RecentEntries {
    by_index: std::collections::BTreeMap<u64, PartitionEntry>,
    bytes: usize,
}

impl RecentEntries {
    /// Bytes of batches kept at most; the oldest index goes first.
    const MAX_BYTES: usize = 16 << 20;

    fn get(&self, log_id: &LogId<NodeId>) -> Option<PartitionEntry> {
        self.by_index
            .get(&log_id.index)
            .filter(|entry| entry.log_id == *log_id)
            .cloned()
    }

    fn batch_bytes(entry: &PartitionEntry) -> Option<usize> {
        match &entry.payload {
            EntryPayload::Normal(PartitionCommand::Batch(ReplicatedBatch {
                stored: Some(stored),
                ..
            })) => Some(stored.0.len()),
            _ => None,
        }
    }

    /// Keeps a record entry just read (any other is cheap to build again).
    fn keep(&mut self, entry: &PartitionEntry) {
        let Some(bytes) = Self::batch_bytes(entry) else {
            return;
        };
        if let Some(old) = self.by_index.insert(entry.log_id.index, entry.clone()) {
            self.bytes -= Self::batch_bytes(&old).unwrap_or(0);
        }
        self.bytes += bytes;
        while self.bytes > Self::MAX_BYTES {
            let Some((_, oldest)) = self.by_index.pop_first() else {
                break;
            };
            self.bytes -= Self::batch_bytes(&oldest).unwrap_or(0);
        }
    }

    /// Drops the entries at or below `index` (purged rows).
    fn forget_through(&mut self, index: u64) {
        let kept = self.by_index.split_off(&index.saturating_add(1));
        for entry in std::mem::replace(&mut self.by_index, kept).values() {
            self.bytes -= Self::batch_bytes(entry).unwrap_or(0);
        }
    }

    fn clear(&mut self) {
        self.by_index.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_index.len()
    }
}

/// The file a partition replica keeps its state machine's snapshot in,
/// beside its `log/` and `raft.journal`.
pub const SNAPSHOT_FILE: &str = "partition.snapshot";

/// What a log found short at open still needs ([`PartitionRaftLog::missing`]).
#[derive(Debug)]
struct Repair {
    /// The end the rows name.
    to: u64,
    /// Below it a record belongs to a purged entry: any batch boundaries.
    purged_end: u64,
    /// Each unpurged row's batch: `base_offset` → `count`.
    batches: std::collections::BTreeMap<u64, u32>,
}

fn io_error(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl Inner {
    fn log(&self) -> Result<&Log, std::io::Error> {
        self.log
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the partition log is closed"))
    }

    /// The log end the last purged row names: Raft never reads a record
    /// below it again (0 while nothing is purged).
    fn purged_end_offset(&self) -> u64 {
        self.rows
            .last_purged_row
            .as_ref()
            .map_or(0, |row| row.end_offset)
    }

    /// The log end the rows name, or the snapshot's committed end if
    /// further (what a crash may have left beyond is an append that was
    /// never acknowledged).
    fn row_end(&self) -> u64 {
        self.rows_end().max(self.snapshot_end)
    }

    /// The log end the last row (or the last purged one) names.
    fn rows_end(&self) -> u64 {
        self.rows
            .rows
            .values()
            .next_back()
            .or(self.rows.last_purged_row.as_ref())
            .map_or(0, |row| row.end_offset)
    }

    /// Waits until the append's last batch so far, if any, is durable.
    fn wait_durable(&self, last: &Option<AppendInfo>) -> Result<(), std::io::Error> {
        match last {
            Some(info) => self
                .log()?
                .wait_durable(info)
                .map_err(std::io::Error::other),
            None => Ok(()),
        }
    }

    /// Closes the log, cuts it back to `end`, and opens it again.
    fn cut_log(&mut self, end: u64) -> Result<(), std::io::Error> {
        self.recent.clear();
        self.producer_batches.clear();
        drop(self.log.take());
        truncate_closed_log(&self.log_dir, end).map_err(std::io::Error::other)?;
        let log =
            Log::open(&self.log_dir, self.log_config.clone()).map_err(std::io::Error::other)?;
        self.next_offset = log.end_offset();
        self.log = Some(log);
        Ok(())
    }

    fn append(&mut self, entries: Vec<PartitionEntry>) -> Result<(), std::io::Error> {
        if let Some(repair) = &self.repair {
            return Err(io_error(format!(
                "the log lacks records [{}, {}) its rows name: it takes no entry until they \
                 are fetched again",
                self.next_offset, repair.to
            )));
        }
        let mut rows: Vec<EntryRow> = Vec::with_capacity(entries.len());
        let mut last: Option<AppendInfo> = None;
        for entry in entries {
            let kind = match entry.payload {
                EntryPayload::Normal(PartitionCommand::PurgeAllowed { upto }) => {
                    RowKind::PurgeAllowed { upto }
                }
                EntryPayload::Normal(PartitionCommand::Duplicate { base_offset, count }) => {
                    // As the leader's log made it: the batch it names is
                    // here too, below this log's end.
                    if base_offset + u64::from(count) > self.next_offset {
                        return Err(io_error(format!(
                            "entry {} names a first batch [{base_offset}, {}) beyond the log's \
                             end {}: diverged",
                            entry.log_id,
                            base_offset + u64::from(count),
                            self.next_offset
                        )));
                    }
                    RowKind::Duplicate { base_offset, count }
                }
                EntryPayload::Normal(PartitionCommand::Batch(batch)) => {
                    if let Some(base) = batch.base_offset {
                        if base != self.next_offset {
                            return Err(io_error(format!(
                                "entry {} starts at offset {base}, the log ends at {}: diverged",
                                entry.log_id, self.next_offset
                            )));
                        }
                    }
                    if let Some(kind) = self.duplicate(entry.log_id.index, &batch) {
                        kind
                    } else {
                        self.ready_for_batch(entry.log_id.leader_id, &mut rows, &last)?;
                        let (info, producer) = match (&batch.stored, batch.timestamp_ms) {
                            // A batch as the leader stored it: the same
                            // bytes here, checked once (by its decode).
                            (Some(_), _) => {
                                let stored = batch.stored_batch().map_err(io_error)?;
                                let header = stored.header();
                                let producer = (header.producer_id, header.producer_seq);
                                (self.log()?.append_stored_deferred(&stored), producer)
                            }
                            (None, Some(timestamp)) => {
                                let input = batch.to_input().map_err(io_error)?;
                                let producer = (input.producer_id, input.producer_seq);
                                (self.log()?.append_deferred_at(&input, timestamp), producer)
                            }
                            (None, None) => {
                                let input = batch.to_input().map_err(io_error)?;
                                let producer = (input.producer_id, input.producer_seq);
                                (self.log()?.append_deferred(&input), producer)
                            }
                        };
                        let info = info.map_err(std::io::Error::other)?;
                        if batch.base_offset.is_none() {
                            self.assigned_ids
                                .insert(entry.log_id.index, info.ids.clone());
                        }
                        self.next_offset = info.last_offset + 1;
                        let count = (info.last_offset + 1 - info.base_offset) as u32;
                        self.producer_batches.note(
                            producer,
                            ProducerBatch {
                                index: entry.log_id.index,
                                base_offset: info.base_offset,
                                count,
                            },
                        );
                        let kind = RowKind::Records {
                            base_offset: info.base_offset,
                            count,
                        };
                        last = Some(info);
                        kind
                    }
                }
                EntryPayload::Blank => RowKind::Blank,
                EntryPayload::Membership(membership) => RowKind::Membership(membership),
            };
            rows.push(EntryRow {
                log_id: entry.log_id,
                kind,
                end_offset: self.next_offset,
            });
        }
        #[cfg(test)]
        if self.crash_before_rows {
            return Err(io_error("a crash (test)".to_string()));
        }
        self.wait_durable(&last)?;
        if rows.iter().all(EntryRow::names_records) {
            // Each under the leader id `rebuild_tail` names
            // (`ready_for_batch`): a crash may lose them.
            self.rows.write_unsynced(rows)
        } else {
            self.rows
                .write(rows.into_iter().map(LogOp::Entry).collect())
        }
    }

    /// Called before a batch of an entry of leader `leader` goes to the
    /// log, `rows` being the rows of this append not yet in the journal
    /// and `last` its last batch appended so far. Upholds what
    /// `rebuild_lost_rows` relies on: every batch past the rows the
    /// journal keeps was appended while `rebuild_tail` named its leader,
    /// and every row before it is kept or names one of those batches.
    /// Nothing to do while that holds already (the usual case: one more
    /// batch of the same leader); otherwise the append's batches so far
    /// are made durable, then its rows and the new leader id, with one
    /// journal sync.
    fn ready_for_batch(
        &mut self,
        leader: openraft::CommittedLeaderId<NodeId>,
        rows: &mut Vec<EntryRow>,
        last: &Option<AppendInfo>,
    ) -> Result<(), std::io::Error> {
        let same_leader = self.rows.rebuild_tail == Some(leader);
        if same_leader && rows.iter().all(EntryRow::names_records) {
            return Ok(());
        }
        self.wait_durable(last)?;
        let mut ops: Vec<LogOp<EntryRow>> = rows.drain(..).map(LogOp::Entry).collect();
        if !same_leader {
            ops.push(LogOp::RebuildTail(Some(leader)));
        }
        self.rows.write(ops)
    }

    /// At open: gives the batches past the last row kept the rows a crash
    /// took from them ([`RowJournal::write_unsynced`] leaves a batch's row
    /// unsynced once the batch is durable), if the journal says they can
    /// be rebuilt (`rebuild_tail`): one entry per batch, the indexes
    /// following the last row, under the leader id it names. They are
    /// written durably; batches past a gap in them, or past one that
    /// cannot be read, are left to be cut. Returns how many rows came
    /// back.
    fn rebuild_lost_rows(&mut self) -> Result<usize, std::io::Error> {
        let Some(leader) = self.rows.rebuild_tail else {
            return Ok(0);
        };
        let rows_end = self.rows_end();
        let last = self.rows.log_state::<PartitionTypes>().last_log_id;
        let Some(last) = last.filter(|_| rows_end >= self.snapshot_end) else {
            return Ok(0);
        };
        let mut rebuilt = Vec::new();
        let mut offset = rows_end;
        let log = self.log()?;
        'scan: while offset < self.next_offset {
            // A batch that cannot be read ends the rows rebuilt: it and
            // what follows are cut below, as a batch without a row was.
            let batches = match log.read(offset, 1 << 20) {
                Ok(batches) if !batches.is_empty() => batches,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(offset, %error, "a batch past the rows cannot be read");
                    break;
                }
            };
            for batch in batches {
                let header = batch.header();
                if header.base_offset != offset {
                    break 'scan;
                }
                rebuilt.push(EntryRow {
                    log_id: LogId::new(leader, last.index + 1 + rebuilt.len() as u64),
                    kind: RowKind::Records {
                        base_offset: header.base_offset,
                        count: header.record_count,
                    },
                    end_offset: header.next_offset(),
                });
                offset = header.next_offset();
            }
        }
        let count = rebuilt.len();
        if count > 0 {
            tracing::info!(
                count,
                from = rows_end,
                to = offset,
                "rebuilt the Raft rows of partition records a crash left without them"
            );
            self.rows
                .write(rebuilt.into_iter().map(LogOp::Entry).collect())?;
        }
        Ok(count)
    }

    /// At open: the idempotent batches of the rows past the committed
    /// entry (at most [`ProducerBatches::MAX`]), which this replica may
    /// lead with before they are applied. Their headers are read (and
    /// their CRCs checked): usually none, a crash's uncommitted tail.
    fn note_uncommitted_producer_batches(&mut self) {
        if self.repair.is_some() {
            return;
        }
        let committed = self.rows.committed.map_or(0, |id| id.index);
        let tail: Vec<(u64, u64, u32)> = self
            .rows
            .rows
            .range(committed.saturating_add(1)..)
            .rev()
            .filter_map(|(&index, row)| match row.kind {
                RowKind::Records { base_offset, count } => Some((index, base_offset, count)),
                _ => None,
            })
            .take(ProducerBatches::MAX)
            .collect();
        for (index, base_offset, count) in tail.into_iter().rev() {
            let Some(producer) = self.log().ok().and_then(|log| {
                let batches = log.read(base_offset, 1).ok()?;
                let batch = batches.iter().find(|b| b.base_offset() == base_offset)?;
                Some((batch.header().producer_id, batch.header().producer_seq))
            }) else {
                continue;
            };
            self.producer_batches.note(
                producer,
                ProducerBatch {
                    index,
                    base_offset,
                    count,
                },
            );
        }
    }

    /// A leader's proposal `batch` (entry `index`) of an idempotent
    /// producer whose batch of that sequence and size this log already
    /// holds: its row, naming the first, with the first's ids kept to
    /// answer it. `None` (append it) for any other batch, and when the
    /// first's ids cannot be read (then stored twice: at least once).
    fn duplicate(&mut self, index: u64, batch: &ReplicatedBatch) -> Option<RowKind> {
        if batch.base_offset.is_some() || batch.producer_id == 0 {
            return None;
        }
        let first = self
            .producer_batches
            .find((batch.producer_id, batch.producer_seq), batch.records.len())?;
        let ids = match self.assigned_ids.get(&first.index) {
            Some(ids) => ids.clone(),
            None => {
                let stored = self.log().ok()?.read(first.base_offset, 1).ok()?;
                let stored = stored
                    .into_iter()
                    .find(|b| b.base_offset() == first.base_offset)?;
                stored
                    .records()
                    .map(|record| record.map(|r| r.id))
                    .collect::<Result<Vec<MessageId>, _>>()
                    .ok()?
            }
        };
        if ids.len() != first.count as usize {
            return None;
        }
        self.assigned_ids.insert(index, ids);
        Some(RowKind::Duplicate {
            base_offset: first.base_offset,
            count: first.count,
        })
    }

    fn entry(&self, row: &EntryRow) -> Result<PartitionEntry, std::io::Error> {
        let payload = match &row.kind {
            RowKind::Duplicate { base_offset, count } => {
                EntryPayload::Normal(PartitionCommand::Duplicate {
                    base_offset: *base_offset,
                    count: *count,
                })
            }
            RowKind::Blank => EntryPayload::Blank,
            RowKind::Membership(membership) => EntryPayload::Membership(membership.clone()),
            RowKind::PurgeAllowed { upto } => {
                EntryPayload::Normal(PartitionCommand::PurgeAllowed { upto: *upto })
            }
            RowKind::Records { base_offset, count } => {
                let batches = self
                    .log()?
                    .read(*base_offset, 1)
                    .map_err(std::io::Error::other)?;
                let batch = batches
                    .into_iter()
                    .find(|b| b.base_offset() == *base_offset)
                    .ok_or_else(|| {
                        io_error(format!(
                            "entry {} names a batch at {base_offset} that is not in the log",
                            row.log_id
                        ))
                    })?;
                let header = batch.header();
                if header.record_count != *count {
                    return Err(io_error(format!(
                        "entry {} names {count} records at {base_offset}, the batch there holds {}",
                        row.log_id, header.record_count
                    )));
                }
                EntryPayload::Normal(PartitionCommand::Batch(ReplicatedBatch {
                    base_offset: Some(*base_offset),
                    // Every record of a batch carries its broker time.
                    timestamp_ms: Some(header.max_timestamp_ms),
                    producer_id: header.producer_id,
                    producer_seq: header.producer_seq,
                    records: Vec::new(),
                    stored: Some(Payload(batch.as_bytes().clone())),
                }))
            }
        };
        Ok(Entry {
            log_id: row.log_id,
            payload,
        })
    }
}

/// A partition group's Raft log: the partition's segment log plus its row
/// journal, under `dir` (`log/` and `raft.journal`). Clones share it.
#[derive(Debug, Clone)]
pub struct PartitionRaftLog {
    inner: Arc<Mutex<Inner>>,
}

impl PartitionRaftLog {
    /// Opens (creating if needed) the partition's Raft log under `dir`. A
    /// batch appended but never given its row (a crash in between) is cut.
    pub fn open(
        dir: &Path,
        mut log_config: LogConfig,
    ) -> Result<PartitionRaftLog, Box<StorageError>> {
        let fail = |e: &dyn std::fmt::Display| -> Box<StorageError> {
            Box::new(StorageIOError::read_logs(&io_error(e.to_string())).into())
        };
        // Raft acknowledges only what is on disk.
        log_config.fsync = dmq_log_store::FsyncPolicy::Always;
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let rows = RowJournal::open(&dir.join("raft.journal"))?;
        let log_dir = dir.join("log");
        let snapshot_end = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => {
                let kept: PersistedSnapshot =
                    serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
                let state: PartitionState =
                    serde_json::from_slice(&kept.data).map_err(|e| fail(&e))?;
                state.committed_end
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(fail(&e)),
        };
        let log = Log::open(&log_dir, log_config.clone()).map_err(|e| fail(&e))?;
        // A damaged batch (its CRC fails) and everything after it go: they
        // are fetched again from a peer (`crate::repair`), never served.
        // So does damage a re-read found while the replica ran
        // (`crate::scrub`): its marker names where.
        let marked = crate::scrub::marked_damage(dir).map_err(|e| fail(&e))?;
        let damaged_from = log
            .recovery_report()
            .corrupt_regions
            .iter()
            .map(|region| region.first_lost_offset)
            .chain(marked)
            .min();
        let mut inner = Inner {
            rows,
            next_offset: log.end_offset(),
            log: Some(log),
            log_dir,
            log_config,
            assigned_ids: Default::default(),
            repair: None,
            snapshot_end,
            recent: RecentEntries::default(),
            producer_batches: ProducerBatches::default(),
            #[cfg(test)]
            crash_before_rows: false,
        };
        if let Some(from) = damaged_from.filter(|&from| from < inner.next_offset) {
            tracing::warn!(
                from,
                to = inner.next_offset,
                "cutting damaged partition records: they are fetched again from a peer"
            );
            inner.cut_log(from).map_err(|e| fail(&e))?;
        }
        if marked.is_some() {
            crate::scrub::clear_marked_damage(dir).map_err(|e| fail(&e))?;
        }
        inner.rebuild_lost_rows().map_err(|e| fail(&e))?;
        let expected = inner.row_end();
        if inner.next_offset > expected {
            tracing::warn!(
                from = expected,
                to = inner.next_offset,
                "cutting partition records that never got their Raft row"
            );
            inner.cut_log(expected).map_err(|e| fail(&e))?;
        } else if inner.next_offset < expected {
            tracing::warn!(
                from = inner.next_offset,
                to = expected,
                "the partition log lacks records its Raft rows name: they must be \
                 fetched from a peer before this replica starts"
            );
            let batches = inner
                .rows
                .rows
                .values()
                .filter_map(|row| match row.kind {
                    RowKind::Records { base_offset, count } => Some((base_offset, count)),
                    _ => None,
                })
                .collect();
            inner.repair = Some(Repair {
                to: expected,
                purged_end: inner.purged_end_offset(),
                batches,
            });
        }
        inner.note_uncommitted_producer_batches();
        Ok(PartitionRaftLog {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// The records this replica's rows name but its log lacks (damaged
    /// and cut at open, or lost): none once the log is whole. A replica
    /// must not start its Raft group while some are missing (it would
    /// vote and serve with a hole): [`crate::repair`] fills them in.
    pub fn missing(&self) -> Option<std::ops::Range<u64>> {
        let inner = self.lock();
        inner
            .repair
            .as_ref()
            .map(|repair| inner.next_offset..repair.to)
            .filter(|range| !range.is_empty())
    }

    /// Gives up the missing records from `from` (the log's end) on: the
    /// rows that name them are cut, as Raft cuts an uncommitted tail.
    /// Only for records fewer than a quorum of members can hold, which
    /// were therefore never committed, so never acknowledged
    /// ([`crate::repair`] decides). Refused for records known committed:
    /// below the purged rows, the snapshot's end, or the committed entry.
    pub fn drop_missing_from(&self, from: u64) -> Result<(), std::io::Error> {
        let mut inner = self.lock();
        let Some(repair) = inner.repair.as_ref() else {
            return Ok(());
        };
        let purged_end = repair.purged_end;
        let first = inner
            .rows
            .rows
            .iter()
            .find(|(_, row)| row.end_offset > from)
            .map(|(index, _)| *index);
        let committed = inner.rows.committed.map(|id| id.index);
        let known_committed = from != inner.next_offset
            || from < purged_end
            || from < inner.snapshot_end
            || first.is_none()
            || committed >= first;
        if known_committed {
            return Err(io_error(format!(
                "records from {from} are committed (or not where the log ends): they cannot \
                 be given up"
            )));
        }
        let index = first.unwrap_or_default();
        inner.rows.write(vec![LogOp::Truncate(index)])?;
        inner.assigned_ids.retain(|&i, _| i < index);
        inner.producer_batches.forget_from(index);
        let row_end = inner.row_end();
        if row_end <= inner.next_offset {
            inner.repair = None;
        } else if let Some(repair) = inner.repair.as_mut() {
            repair.to = row_end;
        }
        Ok(())
    }

    /// Wants every record below `to` (a snapshot's committed end, all of
    /// them committed): until [`PartitionRaftLog::fill_missing`] brings
    /// them, [`PartitionRaftLog::missing`] names them and no entry is
    /// taken. Nothing to do if the log reaches `to`.
    pub fn want_committed_until(&self, to: u64) {
        let mut inner = self.lock();
        if inner.next_offset < to {
            let batches = inner.repair.take().map(|r| r.batches).unwrap_or_default();
            inner.repair = Some(Repair {
                to,
                // Committed everywhere: any batch boundaries will do.
                purged_end: to,
                batches,
            });
        }
    }

    /// Makes this empty log begin at `offset` (its peers deleted the
    /// records before it by retention). Refused if it holds a record.
    pub fn restart_empty_at(&self, offset: u64) -> Result<(), std::io::Error> {
        let mut inner = self.lock();
        let log = inner.log()?;
        if log.end_offset() != log.start_offset() {
            return Err(io_error(format!(
                "the log holds records [{}, {}): it cannot start again at {offset}",
                log.start_offset(),
                log.end_offset()
            )));
        }
        inner.recent.clear();
        inner.producer_batches.clear();
        drop(inner.log.take());
        let restarted =
            dmq_log_store::restart_empty_log_at(&inner.log_dir, &inner.log_config, offset);
        let log =
            Log::open(&inner.log_dir, inner.log_config.clone()).map_err(std::io::Error::other)?;
        inner.next_offset = log.end_offset();
        inner.log = Some(log);
        restarted.map_err(std::io::Error::other)
    }

    /// Records below `end` are committed (a snapshot counting them was
    /// kept): they are never cut.
    fn keep_below(&self, end: u64) {
        let mut inner = self.lock();
        inner.snapshot_end = inner.snapshot_end.max(end);
    }

    /// Appends `stored` (batches exactly as a peer's log holds them, in
    /// order, from [`PartitionRaftLog::missing`]'s start) to fill the
    /// missing records, and waits until they are durable. Each batch must
    /// pass its CRC, start at the log's end, end within the missing
    /// range, and (above the purged rows) be the batch a row names (same
    /// base offset and count). Returns the log's new end.
    pub fn fill_missing(&self, stored: Vec<Bytes>) -> Result<u64, std::io::Error> {
        let mut inner = self.lock();
        let Some(repair) = inner.repair.as_ref() else {
            return Ok(inner.next_offset);
        };
        let (to, purged_end) = (repair.to, repair.purged_end);
        let mut last = None;
        for bytes in stored {
            // A peer may send more than is missing (its committed end
            // moved on): what follows is not this log's to take here.
            if inner.next_offset >= to {
                break;
            }
            let batch = dmq_log_store::RecordBatch::decode(bytes)
                .map_err(|e| io_error(format!("a peer's batch is damaged: {e}")))?;
            let header = *batch.header();
            let (base, count) = (header.base_offset, header.record_count);
            if base != inner.next_offset || base + u64::from(count) > to {
                return Err(io_error(format!(
                    "a peer's batch holds [{base}, {}) but [{}, {to}) is missing",
                    base + u64::from(count),
                    inner.next_offset
                )));
            }
            let named = inner
                .repair
                .as_ref()
                .and_then(|repair| repair.batches.get(&base).copied());
            if base >= purged_end && named != Some(count) {
                return Err(io_error(format!(
                    "a peer's batch at {base} holds {count} records; this replica's rows name \
                     {named:?} there: the logs diverged"
                )));
            }
            let info = inner
                .log()?
                .append_stored_deferred(&batch)
                .map_err(std::io::Error::other)?;
            inner.next_offset = info.last_offset + 1;
            last = Some(info);
        }
        if let Some(info) = &last {
            inner
                .log()?
                .wait_durable(info)
                .map_err(std::io::Error::other)?;
        }
        if inner.next_offset >= to {
            inner.repair = None;
        }
        Ok(inner.next_offset)
    }

    /// This replica's committed records from `from` on, as its log stores
    /// them, about `max_bytes` (at least one batch if any), never at or
    /// past `committed_end`: what a peer missing them is sent
    /// ([`crate::repair`]). Whole batches only.
    pub fn committed_batches(
        &self,
        from: u64,
        committed_end: u64,
        max_bytes: usize,
    ) -> Result<Vec<Bytes>, std::io::Error> {
        let inner = self.lock();
        let log = inner.log()?;
        let mut out = Vec::new();
        for batch in log.read(from, max_bytes).map_err(std::io::Error::other)? {
            if batch.header().next_offset() > committed_end {
                break;
            }
            out.push(batch.as_bytes().clone());
        }
        Ok(out)
    }

    /// The first offset this replica's log still stores.
    pub fn start_offset(&self) -> Result<u64, std::io::Error> {
        Ok(self.lock().log()?.start_offset())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partition log's end (every record durable, committed or not).
    pub fn end_offset(&self) -> u64 {
        self.lock().next_offset
    }

    /// The records of `[from, to)`, read from the partition log.
    pub fn records(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<dmq_log_store::Record>, std::io::Error> {
        let inner = self.lock();
        let log = inner.log()?;
        let mut out = Vec::new();
        let mut offset = from;
        while offset < to {
            let batches = log.read(offset, 1 << 20).map_err(std::io::Error::other)?;
            if batches.is_empty() {
                break;
            }
            for batch in batches {
                for record in batch.records() {
                    let record = record.map_err(std::io::Error::other)?;
                    if record.offset >= offset && record.offset < to {
                        offset = record.offset + 1;
                        out.push(record);
                    }
                }
            }
        }
        Ok(out)
    }

    /// How many Raft entries this replica keeps rows for (purging bounds
    /// it; the records stay in the partition log, which retention owns).
    pub fn row_count(&self) -> usize {
        self.lock().rows.rows.len()
    }

    /// The Raft index of the first row kept (none: no rows).
    pub fn first_row_index(&self) -> Option<u64> {
        self.lock().rows.rows.keys().next().copied()
    }

    /// Every record below this offset belongs to a purged entry: Raft
    /// will never read it again on this replica, so retention may delete
    /// it (0 while nothing is purged).
    pub fn purged_end_offset(&self) -> u64 {
        self.lock().purged_end_offset()
    }

    /// Retention on this replica ([`Log::apply_retention_limits`]), never
    /// past [`PartitionRaftLog::purged_end_offset`]: a segment an
    /// unpurged entry names stays, whatever its age or size. Returns the
    /// segments deleted.
    pub fn apply_retention(
        &self,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
        now_ms: i64,
    ) -> Result<u64, std::io::Error> {
        let inner = self.lock();
        let below = inner.purged_end_offset();
        let deleted = inner
            .log()?
            .apply_retention_limits_below(max_age_ms, max_bytes, now_ms, below)
            .map_err(std::io::Error::other)?;
        Ok(deleted.segments as u64)
    }

    /// Deletes the sealed segments wholly below `offset` and below
    /// [`PartitionRaftLog::purged_end_offset`]; returns how many.
    pub fn delete_before(&self, offset: u64) -> Result<u64, std::io::Error> {
        let inner = self.lock();
        let below = inner.purged_end_offset();
        let deleted = inner
            .log()?
            .delete_segments_before(offset.min(below))
            .map_err(std::io::Error::other)?;
        Ok(deleted.segments as u64)
    }

    fn row(&self, index: u64) -> Option<EntryRow> {
        self.lock().rows.rows.get(&index).cloned()
    }

    /// Takes the ids this log assigned to the proposal at Raft index
    /// `index` (none if it was appended as a follower).
    fn take_assigned_ids(&self, index: u64) -> Vec<MessageId> {
        self.lock().assigned_ids.remove(&index).unwrap_or_default()
    }

    /// Runs `read` on the partition log (a reader such as the
    /// dispatcher's; it must stay below the committed end itself).
    pub fn with_log<T>(&self, read: impl FnOnce(&Log) -> T) -> Result<T, std::io::Error> {
        let inner = self.lock();
        Ok(read(inner.log()?))
    }
}

fn storage_io(e: std::io::Error) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<PartitionTypes> for PartitionRaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<PartitionEntry>, StorageError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut entries = Vec::new();
        for row in inner.rows.rows.range(range).map(|(_, row)| row) {
            if let Some(entry) = inner.recent.get(&row.log_id) {
                entries.push(entry);
                continue;
            }
            let entry = inner
                .entry(row)
                .map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?;
            inner.recent.keep(&entry);
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<PartitionTypes> for PartitionRaftLog {
    type LogReader = PartitionRaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionTypes>, StorageError> {
        Ok(self.lock().rows.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        blocking(|| self.lock().rows.write(vec![LogOp::Vote(*vote)]))
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock().rows.vote)
    }

    /// Durable before it returns, as for the metadata log (see
    /// `RaftLogJournal::save_committed`).
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        blocking(|| self.lock().rows.write(vec![LogOp::Committed(committed)])).map_err(storage_io)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.lock().rows.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<PartitionTypes>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = PartitionEntry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<PartitionEntry> = entries.into_iter().collect();
        let written = blocking(|| self.lock().append(entries));
        report_append(written, callback)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        blocking(|| {
            let mut inner = self.lock();
            inner.rows.write(vec![LogOp::Truncate(log_id.index)])?;
            inner.assigned_ids.retain(|&index, _| index < log_id.index);
            inner.producer_batches.forget_from(log_id.index);
            inner.recent.clear();
            let end = inner.row_end();
            if end < inner.next_offset {
                inner.cut_log(end)?;
            }
            Ok(())
        })
        .map_err(storage_io)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // The records stay: retention owns the partition log's data (and
        // deletes only below the purged rows: `apply_retention`).
        blocking(|| {
            let mut inner = self.lock();
            inner.recent.forget_through(log_id.index);
            inner.rows.purge(log_id)
        })
        .map_err(storage_io)
    }
}

/// The state a partition's state machine holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PartitionState {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// Every record below is committed (fsynced on a quorum).
    committed_end: u64,
    /// Rows up to this Raft index may be purged (the last
    /// [`PartitionCommand::PurgeAllowed`] applied; 0: none).
    #[serde(default)]
    purge_allowed: u64,
}

/// A partition group's state machine: the committed end of the log.
/// (Replicated dispatcher state is a later step of issue 12.)
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    log: PartitionRaftLog,
    state: Arc<Mutex<PartitionState>>,
    snapshot: Arc<Mutex<Option<KeptSnapshot>>>,
    /// Where the latest snapshot is kept (none: in memory only).
    snapshot_path: Option<PathBuf>,
    /// Called after the committed end moves (a dispatcher to wake).
    on_commit: Arc<CommitSlot>,
    /// Where a snapshot's records are fetched from (none: a snapshot
    /// beyond this replica's records is refused).
    fetch: Arc<Mutex<Option<RecordFetch>>>,
    /// Held while a snapshot is built and kept; true once the replica is
    /// closed for snapshots ([`PartitionStateMachine::close_snapshots`]).
    snapshots_closed: Arc<tokio::sync::Mutex<bool>>,
}

/// How a replica sent a snapshot beyond its records fetches them
/// ([`crate::repair`]): from the snapshot membership's other members.
#[derive(Debug, Clone)]
pub struct RecordFetch {
    /// The group's name on the Raft ports.
    pub group: String,
    /// This replica's node (not asked).
    pub node_id: NodeId,
    /// Where its connections leave from, if set.
    pub source: Option<std::net::IpAddr>,
    /// How long to keep asking without progress.
    pub patience: std::time::Duration,
}

/// What [`PartitionStateMachine::on_commit`] calls, with the idempotent
/// producers' batches among the records just applied (often none).
pub type CommitListener = Arc<dyn Fn(&[CommittedProducerBatch]) + Send + Sync>;

/// A committed batch of an idempotent producer, as every replica applies
/// it: what a node needs to answer the producer's retry of it with its
/// original offsets and ids, whichever node took the first try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedProducerBatch {
    /// The producer's id (never 0).
    pub producer_id: u64,
    /// The producer's sequence of the batch.
    pub producer_seq: u64,
    /// The offset of its first record.
    pub base_offset: u64,
    /// Its records' ids, in order.
    pub ids: Vec<MessageId>,
}

/// The idempotent producer's part of entry `payload`, applied at
/// `base_offset` with `assigned` ids (those the leader gave its own
/// proposal; empty elsewhere: then read from the stored batch).
fn committed_producer_batch(
    payload: &EntryPayload<PartitionTypes>,
    base_offset: u64,
    assigned: &[MessageId],
) -> Option<CommittedProducerBatch> {
    let EntryPayload::Normal(PartitionCommand::Batch(batch)) = payload else {
        return None;
    };
    let (producer_id, producer_seq) = match &batch.stored {
        Some(stored) => {
            let header = dmq_log_store::batch::decode_header(&stored.0).ok()?;
            (header.producer_id, header.producer_seq)
        }
        None => (batch.producer_id, batch.producer_seq),
    };
    if producer_id == 0 {
        return None;
    }
    let ids = if assigned.is_empty() {
        let input = batch.to_input().ok()?;
        input
            .records
            .iter()
            .map(|record| record.id)
            .collect::<Option<Vec<MessageId>>>()?
    } else {
        assigned.to_vec()
    };
    Some(CommittedProducerBatch {
        producer_id,
        producer_seq,
        base_offset,
        ids,
    })
}

/// The state machine's commit listener, if one is set.
#[derive(Default)]
struct CommitSlot(Mutex<Option<CommitListener>>);

impl std::fmt::Debug for CommitSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitSlot")
    }
}

/// The latest snapshot: its meta and its bytes.
type KeptSnapshot = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

/// A snapshot as its file holds it.
#[derive(Serialize, Deserialize)]
struct PersistedSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// Writes `bytes` to `path` through a fsynced temporary file and a
/// rename, then fsyncs the directory: `path` holds the old bytes or the
/// new ones, whatever the crash.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), std::io::Error> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl PartitionStateMachine {
    /// The state machine over `log` (which it reads to answer appends),
    /// with its snapshots in memory only: it starts from nothing, and
    /// openraft applies every entry again (so its log must never be
    /// purged).
    pub fn new(log: PartitionRaftLog) -> PartitionStateMachine {
        PartitionStateMachine {
            log,
            state: Arc::default(),
            snapshot: Arc::default(),
            snapshot_path: None,
            on_commit: Arc::default(),
            fetch: Arc::default(),
            snapshots_closed: Arc::default(),
        }
    }

    /// Lets this replica fetch the records of a snapshot it is sent but
    /// lacks (a learner added after a purge), as `fetch` says.
    pub fn fetch_records_with(&self, fetch: RecordFetch) {
        *self.fetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(fetch);
    }

    /// The state machine over `log`, its snapshots kept in the file at
    /// `path` (written to a temporary file, fsynced, renamed): it starts
    /// from the last one, so a log purged up to it opens again.
    pub fn open(
        log: PartitionRaftLog,
        path: &Path,
    ) -> Result<PartitionStateMachine, Box<StorageError>> {
        let mut machine = PartitionStateMachine::new(log);
        machine.snapshot_path = Some(path.to_path_buf());
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(machine),
            Err(e) => return Err(Box::new(StorageIOError::read_snapshot(None, &e).into())),
        };
        let kept: PersistedSnapshot = serde_json::from_slice(&bytes)
            .map_err(|e| Box::new(StorageIOError::read_snapshot(None, &e).into()))?;
        let state: PartitionState = serde_json::from_slice(&kept.data)
            .map_err(|e| Box::new(StorageIOError::read_snapshot(None, &e).into()))?;
        let end = machine.log.end_offset();
        if end < state.committed_end {
            return Err(Box::new(
                StorageIOError::read_snapshot(
                    Some(kept.meta.signature()),
                    &io_error(format!(
                        "the snapshot counts records up to {} committed but the log ends at {end}",
                        state.committed_end
                    )),
                )
                .into(),
            ));
        }
        *machine.lock() = state;
        *machine.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some((kept.meta, kept.data));
        Ok(machine)
    }

    /// Keeps `meta` and `data` as the latest snapshot, in its file first.
    fn keep_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: &[u8],
    ) -> Result<(), Box<StorageError>> {
        if let Some(path) = &self.snapshot_path {
            let kept = PersistedSnapshot {
                meta: meta.clone(),
                data: data.to_vec(),
            };
            let fail = |e: &std::io::Error| -> Box<StorageError> {
                Box::new(StorageIOError::write_snapshot(Some(meta.signature()), e).into())
            };
            let bytes = serde_json::to_vec(&kept).map_err(|e| fail(&std::io::Error::other(e)))?;
            blocking(|| write_atomically(path, &bytes)).map_err(|e| fail(&e))?;
            if let Ok(state) = serde_json::from_slice::<PartitionState>(data) {
                self.log.keep_below(state.committed_end);
            }
        }
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((meta.clone(), data.to_vec()));
        Ok(())
    }

    /// Waits for a snapshot being built to be kept, and makes every later
    /// build fail without writing: after its Raft stopped, so that nothing
    /// writes into the replica's directory any more (openraft builds
    /// snapshots in a task of its own, which its shutdown does not wait
    /// for).
    pub async fn close_snapshots(&self) {
        *self.snapshots_closed.lock().await = true;
    }

    /// Rows up to this Raft index may be purged on this replica (0: none):
    /// every member held them when the leader said so.
    pub fn purge_allowed(&self) -> u64 {
        self.lock().purge_allowed
    }

    /// Calls `listener` (on Raft's task: it must not block) each time
    /// committed records are applied here, with the idempotent producers'
    /// batches among them.
    pub fn on_commit(&self, listener: CommitListener) {
        *self.on_commit.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    fn lock(&self) -> MutexGuard<'_, PartitionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partition log it answers from.
    pub fn log(&self) -> &PartitionRaftLog {
        &self.log
    }

    /// Every record below this offset is committed and applied here.
    pub fn committed_end(&self) -> u64 {
        self.lock().committed_end
    }
}

impl RaftSnapshotBuilder<PartitionTypes> for PartitionStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionTypes>, StorageError> {
        // openraft builds in a task of its own that outlives its shutdown:
        // a replica closed for snapshots writes none.
        let closed = Arc::clone(&self.snapshots_closed);
        let closed = closed.lock().await;
        if *closed {
            return Err(StorageIOError::write_snapshot(
                None,
                &io_error("the replica is closed for snapshots".to_string()),
            )
            .into());
        }
        let state = self.lock().clone();
        let data = serde_json::to_vec(&state)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        let meta = SnapshotMeta {
            last_log_id: state.applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{:?}", state.applied),
        };
        self.keep_snapshot(&meta, &data).map_err(|e| *e)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<PartitionTypes> for PartitionStateMachine {
    type SnapshotBuilder = PartitionStateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.lock();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<AppendedBatch>, StorageError>
    where
        I: IntoIterator<Item = PartitionEntry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut records_applied = false;
        let mut producer_batches = Vec::new();
        for entry in entries {
            let row = self.log.row(entry.log_id.index);
            let ids = self.log.take_assigned_ids(entry.log_id.index);
            let mut state = self.lock();
            state.applied = Some(entry.log_id);
            if let EntryPayload::Membership(membership) = &entry.payload {
                state.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            }
            let end = row.as_ref().map_or(state.committed_end, |r| r.end_offset);
            state.committed_end = state.committed_end.max(end);
            if let Some(RowKind::PurgeAllowed { upto }) = row.as_ref().map(|r| &r.kind) {
                state.purge_allowed = state.purge_allowed.max(*upto);
            }
            responses.push(match row.map(|r| r.kind) {
                Some(RowKind::Records { base_offset, count }) => {
                    records_applied = true;
                    producer_batches.extend(committed_producer_batch(
                        &entry.payload,
                        base_offset,
                        &ids,
                    ));
                    AppendedBatch {
                        base_offset,
                        count,
                        ids: ids.into_iter().map(|id| id.0).collect(),
                        stored_before: false,
                    }
                }
                // Answered as the first was: it was committed before.
                Some(RowKind::Duplicate { base_offset, count }) => AppendedBatch {
                    base_offset,
                    count,
                    ids: ids.into_iter().map(|id| id.0).collect(),
                    stored_before: true,
                },
                _ => AppendedBatch {
                    base_offset: end,
                    count: 0,
                    ids: Vec::new(),
                    stored_before: false,
                },
            });
        }
        if records_applied {
            let listener = self
                .on_commit
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(listener) = listener {
                listener(&producer_batches);
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: PartitionState = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        // A snapshot holds no records: a replica that lacks any below its
        // committed end (a learner added after a purge) fetches them from
        // the other members first, exactly as they store them; it never
        // takes a snapshot with a hole under it.
        let end = self.log.end_offset();
        if end < state.committed_end {
            let refuse = |why: String| -> StorageError {
                StorageIOError::read_snapshot(Some(meta.signature()), &io_error(why)).into()
            };
            let fetch = self
                .fetch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or_else(|| {
                    refuse(format!(
                        "a snapshot up to offset {} cannot be installed on a replica whose log \
                         ends at {end}: the records are not in it and it has no peer to fetch \
                         them from",
                        state.committed_end
                    ))
                })?;
            let peers: Vec<String> = meta
                .last_membership
                .membership()
                .nodes()
                .filter(|(id, _)| **id != fetch.node_id)
                .map(|(_, node)| node.addr.clone())
                .collect();
            self.log.want_committed_until(state.committed_end);
            let filled = crate::repair::fill_from_peers(
                &self.log,
                &fetch.group,
                &peers,
                fetch.source,
                fetch.patience,
            )
            .await
            .map_err(|e| refuse(e.to_string()))?;
            tracing::info!(
                group = fetch.group,
                from = end,
                to = state.committed_end,
                records = filled.records,
                "a snapshot's records fetched from a peer"
            );
        }
        self.keep_snapshot(meta, &data).map_err(|e| *e)?;
        *self.lock() = state;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionTypes>>, StorageError> {
        Ok(self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn normal(index: u64, values: &[&str]) -> PartitionEntry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(PartitionCommand::Batch(ReplicatedBatch::propose(
                values
                    .iter()
                    .map(|v| RecordInput::new(v.to_string()))
                    .collect(),
            ))),
        }
    }

    #[test]
    fn a_batch_appended_without_its_row_is_cut_at_open() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
            log.lock()
                .append(vec![
                    normal(1, &["a", "b"]),
                    normal(2, &["c"]),
                    normal(3, &["x"]),
                ])
                .expect("append");
            // A new leader's log has no entry 3: the tail is truncated, and
            // until an entry comes no row may be rebuilt.
            let leader = CommittedLeaderId::new(1, 1);
            rt().block_on(log.truncate(LogId::new(leader, 3)))
                .expect("truncate");
            assert_eq!(log.end_offset(), 3);
            assert_eq!(log.lock().rows.rebuild_tail, None);
        }
        // A crash after a batch reached the log, before its row did.
        {
            let raw = Log::open(dir.path().join("log"), LogConfig::default()).expect("raw");
            raw.append(&BatchInput::new(vec![RecordInput::new("orphan")]))
                .expect("append");
            assert_eq!(raw.end_offset(), 4);
        }
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(log.end_offset(), 3);
        assert_eq!(
            values_stored(&log),
            vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
        );
        // The next entry continues at the cut.
        log.lock().append(vec![normal(3, &["d"])]).expect("append");
        assert_eq!(log.end_offset(), 4);
    }

    /// The values of the log's first ten records.
    fn values_stored(log: &PartitionRaftLog) -> Vec<Bytes> {
        log.records(0, 10)
            .expect("read")
            .into_iter()
            .map(|r| r.value)
            .collect()
    }

    /// An entry of `term`'s leader (node 1) carrying `values`.
    fn batch_of(term: u64, index: u64, values: &[&str]) -> PartitionEntry {
        let mut entry = normal(index, values);
        entry.log_id = LogId::new(CommittedLeaderId::new(term, 1), index);
        entry
    }

    fn blank_of(term: u64, index: u64) -> PartitionEntry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    type RowsSeen = (Vec<(LogId<NodeId>, String, u64)>, u64);

    /// Every row, as (log id, kind, log end), and the log's end.
    fn rows_of(log: &PartitionRaftLog) -> RowsSeen {
        let inner = log.lock();
        let rows = inner
            .rows
            .rows
            .values()
            .map(|row| (row.log_id, format!("{:?}", row.kind), row.end_offset))
            .collect();
        (rows, inner.next_offset)
    }

    #[test]
    fn rows_a_crash_took_are_rebuilt_from_their_batches() {
        let dir = tempfile::tempdir().expect("dir");
        let before = {
            let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
            let mut inner = log.lock();
            inner.append(vec![blank_of(1, 1)]).expect("append");
            inner
                .append(vec![batch_of(1, 2, &["a", "b"]), batch_of(1, 3, &["c"])])
                .expect("append");
            // A row of no records among batches, then a new leader's.
            inner
                .append(vec![
                    batch_of(1, 4, &["d"]),
                    blank_of(2, 5),
                    batch_of(2, 6, &["e", "f"]),
                ])
                .expect("append");
            inner.append(vec![batch_of(2, 7, &["g"])]).expect("append");
            drop(inner);
            rows_of(&log)
            // Dropped with rows unsynced: a crash.
        };
        assert_eq!(before.0.len(), 7);
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(rows_of(&log), before);
        assert_eq!(log.missing(), None);
        assert_eq!(values_stored(&log).len(), 7);
        // Rebuilt rows are kept: another crash finds them.
        log.lock()
            .append(vec![batch_of(2, 8, &["h"])])
            .expect("append");
        let after = rows_of(&log);
        drop(log);
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(rows_of(&log), after);
    }

    /// One step of [`a_crash_after_any_appends_loses_no_row`]'s history.
    #[derive(Debug, Clone)]
    enum Step {
        /// Entries appended in one call: each a batch of this many records
        /// (0: a blank), all of the current leader or the first of a new
        /// one.
        Append { sizes: Vec<u8>, new_leader: bool },
        /// The tail from `back` entries before the end is truncated, and a
        /// new leader follows.
        Truncate { back: u8 },
        /// The rows made durable (a committed id or a vote saved).
        Sync,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (proptest::collection::vec(0u8..4, 1..5), proptest::bool::weighted(0.2))
                .prop_map(|(sizes, new_leader)| Step::Append { sizes, new_leader }),
            1 => (1u8..4).prop_map(|back| Step::Truncate { back }),
            1 => Just(Step::Sync),
        ]
    }

    /// Runs `steps` on a new log in `dir`; with `crash_in_last`, the last
    /// append stops as a crash would once its batches are written. Returns
    /// the rows after the last step that returned, and the log.
    fn run_steps(dir: &Path, steps: &[Step], crash_in_last: bool) -> (RowsSeen, PartitionRaftLog) {
        let mut log = PartitionRaftLog::open(dir, LogConfig::default()).expect("open");
        let (mut term, mut next) = (1u64, 1u64);
        // A group's first entry: no records.
        log.lock()
            .append(vec![blank_of(term, next)])
            .expect("append");
        next += 1;
        let mut returned = rows_of(&log);
        let last_append = steps
            .iter()
            .rposition(|step| matches!(step, Step::Append { .. }));
        for (i, step) in steps.iter().cloned().enumerate() {
            match step {
                Step::Append { sizes, new_leader } => {
                    if new_leader {
                        term += 1;
                    }
                    let entries = sizes
                        .iter()
                        .map(|&size| {
                            let index = next;
                            next += 1;
                            if size == 0 {
                                blank_of(term, index)
                            } else {
                                let values: Vec<String> =
                                    (0..size).map(|i| format!("{index}.{i}")).collect();
                                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                                batch_of(term, index, &values)
                            }
                        })
                        .collect();
                    if crash_in_last && Some(i) == last_append {
                        log.lock().crash_before_rows = true;
                        log.lock().append(entries).expect_err("crashed");
                        return (returned, log);
                    }
                    log.lock().append(entries).expect("append");
                }
                Step::Truncate { back } => {
                    let from = next.saturating_sub(u64::from(back)).max(2);
                    if from < next {
                        rt().block_on(
                            log.truncate(LogId::new(CommittedLeaderId::new(term, 1), from)),
                        )
                        .expect("truncate");
                        next = from;
                        term += 1;
                    }
                }
                Step::Sync => sync_rows(&log),
            }
            returned = rows_of(&log);
        }
        (returned, log)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever appends, truncations and syncs came before, a crash
        /// after the last append returned loses no row and no record.
        #[test]
        fn a_crash_after_any_appends_loses_no_row(
            steps in proptest::collection::vec(step(), 1..12)
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let (before, log) = run_steps(dir.path(), &steps, false);
            drop(log);
            let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
            proptest::prop_assert_eq!(rows_of(&log), before);
            proptest::prop_assert_eq!(log.missing(), None);
        }

        /// A crash in the middle of an append (its batches written, its
        /// last rows not) keeps every row of the appends before it, and
        /// rows of its own entries only as they are (log id, kind, log
        /// end), as a twin log that ran the same steps without the crash
        /// has them: never a batch under another entry's log id.
        #[test]
        fn a_crash_in_an_append_gives_no_batch_another_entrys_log_id(
            steps in proptest::collection::vec(step(), 1..12)
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let twin_dir = tempfile::tempdir().expect("dir");
            let (before, log) = run_steps(dir.path(), &steps, true);
            drop(log);
            // The twin stops where the crash did: after the last append.
            let upto = steps
                .iter()
                .rposition(|step| matches!(step, Step::Append { .. }))
                .map_or(steps.len(), |last| last + 1);
            let (whole, _twin) = run_steps(twin_dir.path(), &steps[..upto], false);
            let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
            let (rows, end) = rows_of(&log);
            proptest::prop_assert!(rows.len() >= before.0.len());
            proptest::prop_assert_eq!(&rows[..before.0.len()], &before.0[..]);
            proptest::prop_assert!(rows.len() <= whole.0.len());
            proptest::prop_assert_eq!(&rows[..], &whole.0[..rows.len()]);
            proptest::prop_assert_eq!(end, rows.last().map_or(0, |row| row.2));
            proptest::prop_assert_eq!(log.missing(), None);
        }
    }

    /// The values of the records an entry read back carries.
    fn values_of(entry: &PartitionEntry) -> Vec<Bytes> {
        let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &entry.payload else {
            panic!("not a batch: {entry:?}");
        };
        batch
            .to_input()
            .expect("decode")
            .records
            .into_iter()
            .map(|r| r.value)
            .collect()
    }

    #[test]
    fn entries_read_again_come_from_memory_until_truncated_or_purged() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        log.lock()
            .append(vec![
                normal(1, &["a"]),
                normal(2, &["b"]),
                normal(3, &["c"]),
            ])
            .expect("append");
        let runtime = rt();
        let first = runtime
            .block_on(log.try_get_log_entries(1..4))
            .expect("read");
        assert_eq!(log.lock().recent.len(), 3);
        let again = runtime
            .block_on(log.try_get_log_entries(1..4))
            .expect("read");
        assert_eq!(first, again);
        // A new leader's entry replaces index 2: never the old batch again.
        runtime
            .block_on(log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 2)))
            .expect("truncate");
        assert_eq!(log.lock().recent.len(), 0);
        let mut rewritten = normal(2, &["B"]);
        rewritten.log_id = LogId::new(CommittedLeaderId::new(2, 2), 2);
        log.lock().append(vec![rewritten]).expect("append");
        let read = runtime
            .block_on(log.try_get_log_entries(1..3))
            .expect("read");
        assert_eq!(read[1].log_id.leader_id.term, 2);
        assert_eq!(values_of(&read[0]), vec![Bytes::from("a")]);
        assert_eq!(values_of(&read[1]), vec![Bytes::from("B")]);
        // Purged rows are forgotten.
        runtime
            .block_on(log.purge(LogId::new(CommittedLeaderId::new(1, 1), 1)))
            .expect("purge");
        assert_eq!(log.lock().recent.len(), 1);
    }

    #[test]
    fn recent_entries_are_bounded_by_the_bytes_they_name() {
        let mut recent = RecentEntries::default();
        let big = Bytes::from(vec![7u8; RecentEntries::MAX_BYTES / 3 + 1]);
        for index in 1..=4 {
            let mut entry = normal(index, &[]);
            if let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &mut entry.payload {
                batch.stored = Some(Payload(big.clone()));
            }
            recent.keep(&entry);
        }
        // Three would be over the bound: the two oldest went.
        assert_eq!(recent.len(), 2);
        assert!(recent.bytes <= RecentEntries::MAX_BYTES);
        assert!(recent
            .get(&LogId::new(CommittedLeaderId::new(1, 1), 2))
            .is_none());
        assert!(recent
            .get(&LogId::new(CommittedLeaderId::new(1, 1), 4))
            .is_some());
        recent.forget_through(4);
        assert_eq!((recent.len(), recent.bytes), (0, 0));
    }

    /// [`normal`], of idempotent producer `producer` (id, sequence).
    fn idempotent(index: u64, values: &[&str], producer: (u64, u64)) -> PartitionEntry {
        let mut entry = normal(index, values);
        if let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &mut entry.payload {
            (batch.producer_id, batch.producer_seq) = producer;
        }
        entry
    }

    fn row_kind(log: &PartitionRaftLog, index: u64) -> RowKind {
        log.row(index).expect("row").kind
    }

    #[test]
    fn a_batch_the_log_holds_proposed_again_is_a_row_naming_the_first() {
        let dir = tempfile::tempdir().expect("dir");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        log.lock()
            .append(vec![idempotent(1, &["a", "b"], (9, 0)), normal(2, &["c"])])
            .expect("append");
        // The producer's retry while the first waits for its quorum: no
        // records, answered with the first's ids.
        log.lock()
            .append(vec![idempotent(3, &["a", "b"], (9, 0))])
            .expect("append");
        assert_eq!(log.end_offset(), 3, "stored once");
        assert!(matches!(
            row_kind(&log, 3),
            RowKind::Duplicate {
                base_offset: 0,
                count: 2
            }
        ));
        let first = log.take_assigned_ids(1);
        assert_eq!(first.len(), 2);
        assert_eq!(log.take_assigned_ids(3), first);
        // Once the first was applied (its ids taken): read from the log.
        log.lock()
            .append(vec![idempotent(4, &["a", "b"], (9, 0))])
            .expect("append");
        assert_eq!(log.take_assigned_ids(4), first);
        // Another size, another producer, no producer: appended.
        log.lock()
            .append(vec![
                idempotent(5, &["x"], (9, 0)),
                idempotent(6, &["d", "e"], (8, 0)),
                normal(7, &["a", "b"]),
            ])
            .expect("append");
        assert_eq!(log.end_offset(), 8);

        // A follower appends the entries as read back: the same rows, the
        // same records.
        let follower_dir = tempfile::tempdir().expect("dir");
        let mut follower =
            PartitionRaftLog::open(follower_dir.path(), LogConfig::default()).expect("open");
        for index in 1..=7 {
            let sent = {
                let inner = log.lock();
                let row = inner.rows.rows.get(&index).expect("row").clone();
                inner.entry(&row).expect("read back")
            };
            follower.lock().append(vec![sent]).expect("append");
        }
        assert_eq!(follower.end_offset(), 8);
        assert!(matches!(
            row_kind(&follower, 4),
            RowKind::Duplicate {
                base_offset: 0,
                count: 2
            }
        ));
        assert_same_records(&follower, &log, 8);
        // It knows the batches it was sent: leading next, it takes a retry
        // of one as a row too, with the ids its leader gave.
        follower
            .lock()
            .append(vec![idempotent(8, &["d", "e"], (8, 0))])
            .expect("append");
        assert_eq!(follower.end_offset(), 8);
        let stored: Vec<MessageId> = log
            .records(4, 6)
            .expect("read")
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(follower.take_assigned_ids(8), stored);

        // A truncated batch is no longer found: its retry is appended.
        let runtime = rt();
        runtime
            .block_on(follower.truncate(LogId::new(CommittedLeaderId::new(1, 1), 6)))
            .expect("truncate");
        assert_eq!(follower.end_offset(), 4);
        follower
            .lock()
            .append(vec![idempotent(6, &["d", "e"], (8, 0))])
            .expect("append");
        assert_eq!(follower.end_offset(), 6);
        // A first batch beyond the log's end is refused as diverged.
        let beyond = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 7),
            payload: EntryPayload::Normal(PartitionCommand::Duplicate {
                base_offset: 7,
                count: 2,
            }),
        };
        let error = follower.lock().append(vec![beyond]).expect_err("refused");
        assert!(error.to_string().contains("diverged"), "{error}");

        // Reopened, the leader knows the batches of its rows past the
        // committed entry (here none was committed): a retry of one is a
        // row too.
        drop(log);
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(log.lock().producer_batches.len(), 2);
        log.lock()
            .append(vec![idempotent(8, &["d", "e"], (8, 0))])
            .expect("append");
        assert_eq!(log.end_offset(), 8);
        assert!(matches!(
            row_kind(&log, 8),
            RowKind::Duplicate {
                base_offset: 4,
                count: 2
            }
        ));
    }

    #[test]
    fn producer_batches_are_bounded_oldest_first() {
        let mut batches = ProducerBatches::default();
        for index in 0..=ProducerBatches::MAX as u64 {
            let batch = ProducerBatch {
                index,
                base_offset: index,
                count: 1,
            };
            batches.note((1, index), batch);
        }
        assert_eq!(batches.len(), ProducerBatches::MAX);
        assert_eq!(batches.find((1, 0), 1), None, "the oldest went");
        assert!(batches.find((1, 1), 1).is_some());
        // Not an idempotent producer: not kept.
        batches.note(
            (0, 5),
            ProducerBatch {
                index: 9999,
                base_offset: 0,
                count: 1,
            },
        );
        assert_eq!(batches.len(), ProducerBatches::MAX);
    }

    #[test]
    fn a_replicated_batch_at_the_wrong_offset_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        log.lock().append(vec![normal(1, &["a"])]).expect("append");
        let mut diverged = normal(2, &["b"]);
        if let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &mut diverged.payload {
            batch.base_offset = Some(7);
            batch.timestamp_ms = Some(i64::MAX / 2);
        }
        let error = log.lock().append(vec![diverged]).expect_err("refused");
        assert!(error.to_string().contains("diverged"), "{error}");
        assert_eq!(log.end_offset(), 1);
    }

    /// A leader's log holding `batches`, one entry each (indices from 1),
    /// and a follower that appended the same entries as it was sent them.
    fn leader_and_follower(
        batches: &[&[&str]],
    ) -> (tempfile::TempDir, PartitionRaftLog, tempfile::TempDir) {
        let leader_dir = tempfile::tempdir().expect("dir");
        let leader = PartitionRaftLog::open(leader_dir.path(), LogConfig::default()).expect("open");
        for (i, values) in batches.iter().enumerate() {
            leader
                .lock()
                .append(vec![normal(i as u64 + 1, values)])
                .expect("append");
        }
        let follower_dir = tempfile::tempdir().expect("dir");
        let follower =
            PartitionRaftLog::open(follower_dir.path(), LogConfig::default()).expect("open");
        for i in 1..=batches.len() as u64 {
            let sent = {
                let inner = leader.lock();
                let row = inner.rows.rows.get(&i).expect("row").clone();
                inner.entry(&row).expect("read back")
            };
            follower.lock().append(vec![sent]).expect("append");
        }
        // Their rows made durable, as the next synced write (the
        // committed id, the vote) does.
        sync_rows(&leader);
        sync_rows(&follower);
        (leader_dir, leader, follower_dir)
    }

    /// Makes every row appended so far durable.
    fn sync_rows(log: &PartitionRaftLog) {
        log.lock().rows.write(Vec::new()).expect("sync");
    }

    /// Removes the active segment's checkpoints, as a crash leaves it (the
    /// next open then scans every byte of it).
    fn remove_checkpoints(dir: &Path) {
        for entry in std::fs::read_dir(dir.join("log")).expect("list") {
            let path = entry.expect("entry").path();
            if path.to_string_lossy().contains("ckpt") {
                std::fs::remove_file(path).expect("remove");
            }
        }
    }

    fn assert_same_records(ours: &PartitionRaftLog, theirs: &PartitionRaftLog, to: u64) {
        let ours = ours.records(0, to).expect("read");
        let theirs = theirs.records(0, to).expect("read");
        assert_eq!(ours.len() as u64, to);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                (a.offset, a.id, a.timestamp_ms, &a.value),
                (b.offset, b.id, b.timestamp_ms, &b.value)
            );
        }
    }

    #[test]
    fn rows_that_name_missing_records_keep_the_log_closed_until_a_peer_fills_it() {
        let (_leader_dir, leader, dir) = leader_and_follower(&[&["a", "b"], &["c"], &["d", "e"]]);
        // The records vanish (a lost disk, a wrong directory): the rows
        // name 5, the log has none.
        std::fs::remove_dir_all(dir.path().join("log")).expect("remove");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        assert_eq!(log.missing(), Some(0..5));
        // No entry is taken meanwhile.
        let error = log
            .lock()
            .append(vec![normal(4, &["f"])])
            .expect_err("refused");
        assert!(error.to_string().contains("fetched again"), "{error}");
        // A state machine that counts them committed does not open.
        let snapshot = dir.path().join("partition.snapshot");
        {
            let machine = PartitionStateMachine::open(leader.clone(), &snapshot).expect("sm");
            machine.lock().committed_end = 5;
            let mut builder = machine.clone();
            rt().block_on(builder.build_snapshot()).expect("snapshot");
        }
        assert!(PartitionStateMachine::open(log.clone(), &snapshot).is_err());

        let batches = leader.committed_batches(0, 5, 1 << 20).expect("read");
        assert_eq!(batches.len(), 3);
        assert_eq!(log.fill_missing(batches).expect("fill"), 5);
        assert_eq!(log.missing(), None);
        assert_same_records(&log, &leader, 5);
        PartitionStateMachine::open(log.clone(), &snapshot).expect("opens once whole");
        drop(log);
        let reopened = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!((reopened.missing(), reopened.end_offset()), (None, 5));
    }

    #[test]
    fn a_damaged_batch_is_cut_at_open_and_only_the_batches_the_rows_name_fill_it() {
        let (_leader_dir, leader, dir) =
            leader_and_follower(&[&["a", "b"], &["c", "d"], &["e"], &["f", "g"]]);
        let batches = leader.committed_batches(0, 7, 1 << 20).expect("read");
        assert_eq!(batches.len(), 4);
        // One bit of the second batch flips on the follower's disk.
        {
            use std::io::{Read, Seek, SeekFrom, Write};
            let segment = std::fs::read_dir(dir.path().join("log"))
                .expect("list")
                .map(|e| e.expect("entry").path())
                .find(|p| p.extension().is_some_and(|e| e == "log"))
                .expect("segment");
            let at = (batches[0].len() + batches[1].len() - 2) as u64;
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment)
                .expect("open");
            let mut byte = [0u8];
            file.seek(SeekFrom::Start(at)).expect("seek");
            file.read_exact(&mut byte).expect("read");
            file.seek(SeekFrom::Start(at)).expect("seek");
            file.write_all(&[byte[0] ^ 0x10]).expect("write");
            file.sync_all().expect("sync");
        }
        remove_checkpoints(dir.path());
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        // Cut back to the damaged batch: nothing after it is trusted.
        assert_eq!(log.missing(), Some(2..7));
        assert_eq!(log.records(0, 7).expect("read").len(), 2);

        // A batch that does not start at the log's end is refused.
        let error = log.fill_missing(vec![batches[2].clone()]).expect_err("gap");
        assert!(error.to_string().contains("missing"), "{error}");
        // So is a damaged one.
        let mut flipped = batches[1].to_vec();
        flipped[batches[1].len() - 1] ^= 1;
        let error = log
            .fill_missing(vec![Bytes::from(flipped)])
            .expect_err("damaged");
        assert!(error.to_string().contains("damaged"), "{error}");
        assert_eq!(log.missing(), Some(2..7));

        // The rows name these records and this replica knows them
        // committed (its snapshot counts them): never given up.
        log.keep_below(7);
        assert!(log.drop_missing_from(2).is_err());
        // In pieces, from a peer's batches: whole again, the same records.
        assert_eq!(log.fill_missing(vec![batches[1].clone()]).expect("fill"), 4);
        assert_eq!(log.missing(), Some(4..7));
        // A peer that sends more than is missing (its committed end moved
        // on): the rest is left for Raft.
        let mut more = batches[2..].to_vec();
        more.push(batches[0].clone());
        assert_eq!(log.fill_missing(more).expect("fill"), 7);
        assert_eq!(log.missing(), None);
        assert_same_records(&log, &leader, 7);
    }

    #[test]
    fn a_replica_no_peer_can_fill_gives_up_naming_what_it_lacks() {
        let (_leader_dir, _leader, dir) = leader_and_follower(&[&["a", "b"]]);
        std::fs::remove_dir_all(dir.path().join("log")).expect("remove");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        // One peer that is not there.
        let nobody = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = nobody.local_addr().expect("addr").to_string();
        drop(nobody);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let error = runtime
            .block_on(crate::repair::fill_from_peers(
                &log,
                "p/orders/0",
                &[peer],
                None,
                std::time::Duration::from_millis(300),
            ))
            .expect_err("no peer");
        let message = error.to_string();
        assert!(
            message.contains("[0, 2)") && message.contains("p/orders/0"),
            "{message}"
        );
        assert_eq!(log.missing(), Some(0..2));
    }

    #[test]
    fn a_damaged_tail_no_quorum_ever_held_is_given_up_not_waited_for() {
        // This replica acknowledged three entries; the third reached no
        // peer (its leader died), and its bytes are damaged here.
        let (_dir, ours_then, dir) = leader_and_follower(&[&["a"], &["b"], &["c"]]);
        drop(ours_then);
        {
            let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
            let batches = log.committed_batches(0, 3, 1 << 20).expect("read");
            drop(log);
            use std::io::{Seek, SeekFrom, Write};
            let segment = std::fs::read_dir(dir.path().join("log"))
                .expect("list")
                .map(|e| e.expect("entry").path())
                .find(|p| p.extension().is_some_and(|e| e == "log"))
                .expect("segment");
            let at = (batches[0].len() + batches[1].len() + batches[2].len() - 2) as u64;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(segment)
                .expect("open");
            file.seek(SeekFrom::Start(at)).expect("seek");
            file.write_all(&[0xff, 0xff]).expect("write");
        }
        remove_checkpoints(dir.path());
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        assert_eq!(log.missing(), Some(2..3));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // Two peers that hold (and committed) the first two entries only.
        let mut keep = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (peer_dir, peer, _) = leader_and_follower(&[&["a"], &["b"]]);
            let machine = PartitionStateMachine::new(peer);
            machine.lock().committed_end = 2;
            let router = runtime
                .block_on(crate::network::RaftRouter::bind(
                    "127.0.0.1:0".parse().expect("addr"),
                ))
                .expect("bind");
            crate::repair::RecordSource::serve(&router, "p/orders/0", machine);
            peers.push(router.addr().to_string());
            keep.push((peer_dir, router));
        }
        // Until both answer, nothing is given up.
        let alone = runtime.block_on(crate::repair::fill_from_peers(
            &log,
            "p/orders/0",
            &[peers[0].clone(), "127.0.0.1:9".to_string()],
            None,
            std::time::Duration::from_millis(300),
        ));
        assert!(alone.is_err(), "{alone:?}");
        assert_eq!(log.missing(), Some(2..3));
        // Both answer, neither reaches offset 2: never committed, cut.
        runtime
            .block_on(crate::repair::fill_from_peers(
                &log,
                "p/orders/0",
                &peers,
                None,
                std::time::Duration::from_secs(5),
            ))
            .expect("given up");
        assert_eq!((log.missing(), log.end_offset()), (None, 2));
        assert_eq!(log.lock().rows.rows.keys().copied().max(), Some(2));
        drop(log);
        let reopened = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!((reopened.missing(), reopened.end_offset()), (None, 2));
        for (_, router) in keep {
            runtime.block_on(router.shutdown());
        }
    }

    #[test]
    fn a_peer_batch_other_than_the_one_the_rows_name_is_refused_as_diverged() {
        // Same offsets, another history: the follower's rows name a batch
        // of two at offset 2, the peer holds three there.
        let (_a, _follower_leader, dir) = leader_and_follower(&[&["a", "b"], &["c", "d"], &["e"]]);
        let (_b, peer, _c) = leader_and_follower(&[&["a", "b"], &["x", "y", "z"]]);
        std::fs::remove_dir_all(dir.path().join("log")).expect("remove");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        let batches = peer.committed_batches(0, 5, 1 << 20).expect("read");
        let error = log.fill_missing(batches.clone()).expect_err("diverged");
        assert!(error.to_string().contains("diverged"), "{error}");
        // The first batch went in; the second did not.
        assert_eq!(log.missing(), Some(2..5));
        // A peer's batches are read only below its committed end.
        assert_eq!(
            peer.committed_batches(0, 4, 1 << 20).expect("read").len(),
            1
        );
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_replica_closed_for_snapshots_writes_none() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("partition.snapshot");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        log.lock().append(vec![normal(1, &["a"])]).expect("append");
        let mut machine = PartitionStateMachine::open(log, &path).expect("machine");
        rt().block_on(async {
            machine.apply(vec![normal(1, &["a"])]).await.expect("apply");
            // A build openraft left running after its shutdown.
            let mut builder = machine.clone();
            machine.close_snapshots().await;
            assert!(builder.build_snapshot().await.is_err());
        });
        assert!(!path.exists(), "nothing written after the close");
    }

    #[test]
    fn a_snapshot_is_kept_in_its_file_and_one_beyond_the_records_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("partition.snapshot");
        let log = PartitionRaftLog::open(dir.path(), LogConfig::default()).expect("open");
        log.lock()
            .append(vec![normal(1, &["a", "b"]), normal(2, &["c"])])
            .expect("append");
        let mut machine = PartitionStateMachine::open(log.clone(), &path).expect("machine");
        rt().block_on(async {
            machine
                .apply(vec![normal(1, &["a", "b"]), normal(2, &["c"])])
                .await
                .expect("apply");
            machine.build_snapshot().await.expect("snapshot");
        });
        // Reopened, it starts where the snapshot was taken.
        let mut reopened = PartitionStateMachine::open(log.clone(), &path).expect("reopen");
        assert_eq!(reopened.committed_end(), 3);
        let (applied, _) = rt().block_on(reopened.applied_state()).expect("state");
        assert_eq!(applied.map(|a| a.index), Some(2));

        // A snapshot counting records this replica does not have is refused,
        // and the kept one stays.
        let (meta, data) = reopened
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("kept");
        let mut ahead: PartitionState = serde_json::from_slice(&data).expect("state");
        ahead.committed_end = 10;
        let ahead = serde_json::to_vec(&ahead).expect("encode");
        let refused = rt().block_on(reopened.install_snapshot(&meta, Box::new(Cursor::new(ahead))));
        assert!(refused.is_err());
        assert_eq!(reopened.committed_end(), 3);
        drop(reopened);
        assert_eq!(
            PartitionStateMachine::open(log, &path)
                .expect("reopen")
                .committed_end(),
            3
        );
    }

    #[test]
    fn a_follower_appends_the_stored_batch_it_is_sent_and_refuses_a_damaged_one() {
        let leader_dir = tempfile::tempdir().expect("dir");
        let leader = PartitionRaftLog::open(leader_dir.path(), LogConfig::default()).expect("open");
        leader
            .lock()
            .append(vec![normal(1, &["a", "b"])])
            .expect("append");
        let sent = {
            let inner = leader.lock();
            let row = inner.rows.rows.get(&1).expect("row").clone();
            inner.entry(&row).expect("read back")
        };
        let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &sent.payload else {
            panic!("a batch");
        };
        assert!(batch.records.is_empty() && batch.stored.is_some());

        // A flipped bit in the stored batch: refused, nothing appended.
        let mut damaged = sent.clone();
        if let EntryPayload::Normal(PartitionCommand::Batch(batch)) = &mut damaged.payload {
            let mut bytes = batch.stored.as_ref().expect("stored").0.to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            batch.stored = Some(Payload(Bytes::from(bytes)));
        }
        let follower_dir = tempfile::tempdir().expect("dir");
        let follower =
            PartitionRaftLog::open(follower_dir.path(), LogConfig::default()).expect("open");
        let error = follower.lock().append(vec![damaged]).expect_err("refused");
        assert!(error.to_string().contains("damaged"), "{error}");
        assert_eq!(follower.end_offset(), 0);

        // The batch as sent: the same records, ids and timestamps.
        follower.lock().append(vec![sent]).expect("append");
        let ours = follower.records(0, 2).expect("read");
        let theirs = leader.records(0, 2).expect("read");
        assert_eq!(ours.len(), 2);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                (a.offset, a.id, a.timestamp_ms, &a.value),
                (b.offset, b.id, b.timestamp_ms, &b.value)
            );
        }
    }
}
