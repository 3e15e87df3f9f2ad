//! What the dispatcher needs from storage, behind traits so that the whole
//! dispatcher also runs on simulated storage.
//!
//! - [`PartitionLog`]: one partition's commit log (append, read, ends, time,
//!   id and key lookups, size and retention). Implemented by
//!   [`dmq_log_store::Log`] (lookups through its indexes) and by
//!   [`MemoryLog`] (the default methods: linear scans through `read`).
//! - [`Journal`]: a small append-only, CRC-framed record file for the
//!   dispatcher's own state (ack deltas, tombstones, delay buckets), with
//!   atomic rewrite for compaction. Implemented by [`FileJournal`] and
//!   [`MemoryJournal`].
//! - [`Storage`]: opens partitions and journals by name. [`FileStorage`] lays
//!   them out under a data directory; [`MemoryStorage`] keeps them in memory
//!   and models a crash: whatever a journal had not synced is lost.
//!
//! Invariants: `Journal::sync` returns only when every appended payload is
//! durable; replay returns exactly the synced payloads, in order (a torn tail
//! is cut); `rewrite` replaces the contents atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use dmq_log_store::resources::{CachedFile, OpenMode};
use dmq_log_store::{
    AppendInfo, BatchInput, Log, LogConfig, LogError, MessageId, Record, RecordInput,
};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The partition log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A journal file failed.
    #[error("journal {name}: {source}")]
    Journal {
        /// The journal.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A name that cannot be a file name.
    #[error("invalid name {}", crate::names::shown(.0))]
    InvalidName(String),
    /// A journal holds damaged bytes followed by valid entries: not a torn
    /// tail (which is cut) but corruption. Nothing is cut or skipped
    /// silently; `dmqd repair` sets the damaged bytes aside.
    #[error(
        "journal {name} is damaged at byte {at} and has valid entries after it (from byte \
         {resumes_at}); nothing was changed. Stop the broker and run `dmqd repair \
         --data-dir <dir>` (it keeps a copy) or restore the file"
    )]
    CorruptJournal {
        /// The journal.
        name: String,
        /// First damaged byte.
        at: u64,
        /// Where the next valid entry starts.
        resumes_at: u64,
    },
    /// Not enough free disk for what a call would allocate.
    #[error("not enough free disk: {need} bytes needed, {free} free")]
    NoRoom {
        /// Bytes the call would reserve.
        need: u64,
        /// Bytes free for this process.
        free: u64,
    },
    /// A replicated partition took no write: no leader was reachable in
    /// time, or the leader's answer was lost (then it may be stored).
    #[error("the partition's replicas took no write: {0}")]
    Unavailable(String),
}

/// One partition's log, as the dispatcher uses it.
pub trait PartitionLog: Send + Sync + std::fmt::Debug {
    /// Appends records durably; returns (offset, id) per record.
    fn append(&self, records: Vec<RecordInput>) -> Result<Vec<(u64, MessageId)>, StoreError> {
        let info = self.append_deferred(0, 0, records)?;
        self.wait_durable(&info)?;
        Ok(info.records())
    }

    /// Writes a batch (with the producer's id and sequence, 0 for none)
    /// without waiting for durability: not acknowledged until
    /// [`PartitionLog::wait_durable`] returns. Batches keep their call order.
    fn append_deferred(
        &self,
        producer_id: u64,
        producer_seq: u64,
        records: Vec<RecordInput>,
    ) -> Result<AppendInfo, StoreError> {
        self.append_batch_deferred(&BatchInput {
            producer_id,
            producer_seq,
            records,
        })
    }

    /// [`append_deferred`](Self::append_deferred) of a batch the caller
    /// keeps: a writer that must retry the records after a failed append
    /// (a full disk) needs no copy of them.
    fn append_batch_deferred(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError>;

    /// Returns once the batch is durable per the log's fsync policy.
    fn wait_durable(&self, info: &AppendInfo) -> Result<(), StoreError>;
    /// Makes everything appended so far durable, whatever the policy (an
    /// fdatasync): for a write that must not be lost although the policy is
    /// lazy, such as a delayed message moved from the durable timer log.
    fn flush(&self) -> Result<(), StoreError>;
    /// True if [`wait_durable`](Self::wait_durable) returns at once for
    /// every batch (the policy does not wait for an fsync): callers may
    /// skip handing the wait to a blocking thread.
    fn durable_on_append(&self) -> bool {
        false
    }
    /// True if a record a group may have seen can be gone after a restart
    /// (a torn tail, a lazy fsync policy), its offset to be taken by a new
    /// record: a group's acks at or above the end are then forgotten when
    /// it loads. False for a replica that shows only committed records
    /// (cluster mode), which Raft never cuts: its end may lag what the
    /// group acked on another node, and those acks hold.
    fn end_may_move_back(&self) -> bool {
        true
    }
    /// Records from `from` (inclusive), at most `max_records`, in order.
    /// Empty at the end of the log.
    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError>;
    /// Like [`read`](Self::read), but may return more than `max_records`:
    /// the rest of the stored batch that holds the last of them. A log that
    /// checks and decodes whole batches returns what it decoded anyway,
    /// instead of doing it again on the next read. The extra is bounded by
    /// one batch (a producer's batch, at most a frame).
    fn read_whole_batches(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        self.read(from, max_records)
    }
    /// First offset still stored.
    fn start_offset(&self) -> u64;
    /// Offset after the last readable record.
    fn end_offset(&self) -> u64;
    /// First offset whose timestamp is at least `timestamp_ms`.
    fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StoreError>;

    /// Batches from `from` to the end that carry a producer id, oldest
    /// first: what an idempotent-producer window is rebuilt from after a
    /// restart. Logs that do not store producer ids return none.
    fn producer_batches(&self, _from: u64) -> Result<Vec<ProducerBatch>, StoreError> {
        Ok(Vec::new())
    }

    /// The oldest stored record with this message id. The default reads
    /// the whole log ([`LOOKUP_SCAN_BATCH`] records at a time); an indexed
    /// log overrides it.
    fn find_by_id(&self, id: &MessageId) -> Result<Option<Record>, StoreError> {
        let mut found = None;
        scan(self, self.start_offset(), |record| {
            if record.id == *id {
                found = Some(record);
                false
            } else {
                true
            }
        })?;
        Ok(found)
    }

    /// The offset of the oldest stored record with this message id:
    /// whether the message is stored. The default reads the record
    /// ([`find_by_id`](Self::find_by_id)); a log whose id index is exact
    /// answers from the index and reads nothing.
    fn offset_of_id(&self, id: &MessageId) -> Result<Option<u64>, StoreError> {
        Ok(self.find_by_id(id)?.map(|record| record.offset))
    }

    /// Stored records whose key is `key`, oldest first, at most `limit`.
    fn find_by_key(&self, key: &[u8], limit: usize) -> Result<Vec<Record>, StoreError> {
        self.find_by_key_from(key, 0, limit)
    }

    /// Stored records whose key is `key` at offset `from` or later, oldest
    /// first, at most `limit`: pages through a key (pass the last offset + 1
    /// as the next `from`). The default reads the log from `from`; an
    /// indexed log overrides it.
    fn find_by_key_from(
        &self,
        key: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mut found = Vec::new();
        if limit == 0 {
            return Ok(found);
        }
        scan(self, from.max(self.start_offset()), |record| {
            if record.key.as_deref() == Some(key) {
                found.push(record);
            }
            found.len() < limit
        })?;
        Ok(found)
    }

    /// Bytes the log stores; 0 if the log does not know.
    fn size_bytes(&self) -> u64 {
        0
    }

    /// Bytes the log takes on disk (allocated room and index files
    /// included); what it stores if the log does not know better.
    fn disk_bytes(&self) -> u64 {
        self.size_bytes()
    }

    /// Retention: deletes whole sealed segments, oldest first, while the
    /// log is over `max_bytes` or while the segment's newest record is
    /// older than `now_ms - max_age_ms` (`None` disables a limit). Returns
    /// the number of segments deleted. Logs without segments delete nothing.
    fn apply_retention(
        &self,
        _max_age_ms: Option<u64>,
        _max_bytes: Option<u64>,
        _now_ms: i64,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// What is known to be damaged: what recovery found when the log was
    /// opened (damaged regions that reads skip, the bytes of a torn tail it
    /// cut) and damaged batches reads met since. Empty for a sound log.
    fn recovery_damage(&self) -> RecoveryDamage {
        RecoveryDamage::default()
    }
    /// Deletes every sealed segment all of whose offsets are below
    /// `offset` (never the active one); returns how many. The caller
    /// guarantees nothing below `offset` is needed any more. Logs without
    /// segments delete nothing.
    fn delete_before(&self, _offset: u64) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Records the default lookups of [`PartitionLog`] read at a time.
pub const LOOKUP_SCAN_BATCH: usize = 1024;

/// Feeds `visit` every record from `from` to the end, in order, reading
/// [`LOOKUP_SCAN_BATCH`] at a time, until it returns false.
fn scan<L: PartitionLog + ?Sized>(
    log: &L,
    from: u64,
    mut visit: impl FnMut(Record) -> bool,
) -> Result<(), StoreError> {
    let mut from = from;
    loop {
        let records = log.read(from, LOOKUP_SCAN_BATCH)?;
        let Some(last) = records.last() else {
            return Ok(());
        };
        let next = last.offset + 1;
        for record in records {
            if record.offset >= from && !visit(record) {
                return Ok(());
            }
        }
        from = next;
    }
}

/// What recovery found wrong in one partition log (see
/// [`PartitionLog::recovery_damage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryDamage {
    /// Damaged regions of sealed segments: their records are unreadable
    /// and skipped by every reader.
    pub corrupt_regions: Vec<dmq_log_store::CorruptRegion>,
    /// Bytes cut from the end of the log as a torn tail.
    pub tail_bytes_cut: u64,
    /// Damaged batches that reads met and skipped since the log opened
    /// (in sealed segments recovery did not scan).
    pub read_damage: Vec<dmq_log_store::ReadDamage>,
}

/// One stored batch of an idempotent producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerBatch {
    /// The producer.
    pub producer_id: u64,
    /// Its sequence number for this batch.
    pub producer_seq: u64,
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// The records' ids, in order.
    pub ids: Vec<MessageId>,
}

/// (offset, id) of every record of an append.
pub trait AppendedRecords {
    /// One (offset, id) per record, in order.
    fn records(&self) -> Vec<(u64, MessageId)>;
}

impl AppendedRecords for AppendInfo {
    fn records(&self) -> Vec<(u64, MessageId)> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, id)| (self.base_offset + i as u64, *id))
            .collect()
    }
}

impl PartitionLog for Log {
    fn append_batch_deferred(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError> {
        Ok(Log::append_deferred(self, batch)?)
    }

    fn wait_durable(&self, info: &AppendInfo) -> Result<(), StoreError> {
        Ok(Log::wait_durable(self, info)?)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(Log::flush(self)?)
    }

    fn durable_on_append(&self) -> bool {
        // Mirrors `Log::wait_durable`: only `Always` waits.
        !matches!(self.config().fsync, dmq_log_store::FsyncPolicy::Always)
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        read_log(self, from, max_records, false)
    }

    fn read_whole_batches(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        read_log(self, from, max_records, true)
    }

    fn start_offset(&self) -> u64 {
        Log::start_offset(self)
    }

    fn end_offset(&self) -> u64 {
        Log::end_offset(self)
    }

    fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StoreError> {
        Ok(Log::offset_for_timestamp(self, timestamp_ms)?)
    }

    fn find_by_id(&self, id: &MessageId) -> Result<Option<Record>, StoreError> {
        Ok(Log::find_by_id(self, id)?)
    }

    fn offset_of_id(&self, id: &MessageId) -> Result<Option<u64>, StoreError> {
        Ok(Log::offset_of_id(self, id)?)
    }

    fn find_by_key(&self, key: &[u8], limit: usize) -> Result<Vec<Record>, StoreError> {
        Ok(Log::find_by_key(self, key, limit)?)
    }

    fn find_by_key_from(
        &self,
        key: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        Ok(Log::find_by_key_from(self, key, from, limit)?)
    }

    fn size_bytes(&self) -> u64 {
        Log::size_bytes(self)
    }

    fn disk_bytes(&self) -> u64 {
        Log::disk_bytes(self)
    }

    fn apply_retention(
        &self,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let deleted = Log::apply_retention_limits(self, max_age_ms, max_bytes, now_ms)?;
        Ok(deleted.segments as u64)
    }

    fn delete_before(&self, offset: u64) -> Result<u64, StoreError> {
        Ok(Log::delete_segments_before(self, offset)?.segments as u64)
    }

    fn recovery_damage(&self) -> RecoveryDamage {
        let report = Log::recovery_report(self);
        RecoveryDamage {
            corrupt_regions: report.corrupt_regions.clone(),
            tail_bytes_cut: report.bytes_truncated,
            read_damage: Log::read_damage(self),
        }
    }

    fn producer_batches(&self, from: u64) -> Result<Vec<ProducerBatch>, StoreError> {
        let mut found = Vec::new();
        let mut offset = from.max(Log::start_offset(self));
        while offset < Log::end_offset(self) {
            let batches = match Log::read(self, offset, 1 << 20) {
                Ok(batches) => batches,
                Err(LogError::Corrupt {
                    next_readable_offset: Some(next),
                    ..
                }) if next > offset => {
                    offset = next;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let Some(last) = batches.last() else { break };
            offset = last.header().next_offset();
            for batch in batches {
                let header = *batch.header();
                if header.producer_id == 0 {
                    continue;
                }
                let ids = batch
                    .records()
                    .map(|record| record.map(|r| r.id))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Log(LogError::InvalidBatch(e.to_string())))?;
                found.push(ProducerBatch {
                    producer_id: header.producer_id,
                    producer_seq: header.producer_seq,
                    base_offset: header.base_offset,
                    ids,
                });
            }
        }
        Ok(found)
    }
}

/// An append-only record file for the dispatcher's own state.
pub trait Journal: Send + std::fmt::Debug {
    /// Buffers one payload; durable after the next [`Journal::sync`].
    fn append(&mut self, payload: &[u8]);
    /// Makes every appended payload durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Atomically replaces the whole journal with `payloads` (compaction),
    /// durably. Pending appends are dropped.
    fn rewrite(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError>;
    /// Replaces the whole journal with `payloads` like
    /// [`Journal::rewrite`], and also drops what other writers of a shared
    /// journal added that this one has not taken in yet (a seek: nothing
    /// before it counts any more). The same as `rewrite` for a journal
    /// with one writer.
    fn replace(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError> {
        self.rewrite(payloads)
    }
    /// Bytes of durable and pending payloads (framing included).
    fn size_bytes(&self) -> u64;
}

/// A journal and the payloads it held when opened.
pub type OpenedJournal = (Box<dyn Journal>, Vec<Vec<u8>>);

/// Opens partitions and journals by name.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Opens (creating if needed) partition `partition` of `topic`.
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError>;
    /// Opens (creating if needed) a journal; returns it and its durable
    /// payloads, in order.
    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError>;
    /// Deletes a journal (no error if absent).
    fn remove_journal(&self, name: &str) -> Result<(), StoreError>;
    /// Deletes every partition of `topic` and its files. Handles already
    /// open keep reading what they had until dropped (the files are
    /// unlinked, not truncated); a later `partition` call starts empty.
    fn remove_topic(&self, topic: &str) -> Result<(), StoreError>;
    /// Refuses, before anything of the topic is touched, a
    /// [`Storage::remove_topic`] that would fail (a topic this storage
    /// cannot delete alone).
    fn check_removable(&self, _topic: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Names of the journals starting with `prefix`, sorted.
    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Journals whose tail was cut as torn when they were opened, and how
    /// many bytes: a write a crash interrupted, or (indistinguishable) a
    /// damaged last frame. Reported so that no cut is silent.
    fn journal_tail_cuts(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// Refuses ([`StoreError::NoRoom`]) when the disk cannot hold
    /// `partitions` new partitions (the first allocation of each one's
    /// segment, plus the reserve).
    fn check_room(&self, _partitions: u32) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether `topic`'s journals opened here are shared with other nodes
    /// (a cluster topic): its deletions then go to its
    /// [`tombstone journal`](crate::names::tombstone_journal), so that
    /// every node applies them, not to this node's metadata journal.
    fn shares_journals(&self, _topic: &str) -> bool {
        false
    }

    /// Pending delayed messages of `topic` that the dispatcher's own delay
    /// store does not hold (a cluster's replicated timer log), as
    /// (partition, count) per partition with any.
    fn delays_elsewhere(&self, _topic: &str) -> Vec<(u32, u64)> {
        Vec::new()
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if crate::names::is_plain(name, crate::names::JOURNAL_NAME_LEN_MAX) {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_string()))
    }
}

/// Frame: `u32 payload length | u32 CRC-32 of the payload | payload`.
const FRAME_HEADER_LEN: usize = 8;

fn encode_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The frame starting at `at`, if it is a whole, valid one: its payload's
/// range.
fn frame_at(bytes: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    let header = bytes.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let start = at + FRAME_HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = bytes.get(start..end)?;
    (crc32fast::hash(payload) == crc).then_some(start..end)
}

/// What [`decode_frames`] found.
#[derive(Debug, Default)]
struct Decoded {
    /// The payloads of the valid prefix.
    payloads: Vec<Vec<u8>>,
    /// Length of the valid prefix.
    valid_len: usize,
    /// The first later valid, non-empty frame after an invalid one: the
    /// bytes between are damage, not a torn tail.
    resumes_at: Option<usize>,
}

/// Decodes frames until the first invalid one, then looks for any valid
/// non-empty frame after it (an empty one is 8 zero bytes: what a torn,
/// zero-filled tail looks like).
fn decode_frames(bytes: &[u8]) -> Decoded {
    let mut decoded = Decoded::default();
    let mut at = 0;
    while let Some(range) = frame_at(bytes, at) {
        decoded.payloads.push(bytes[range.clone()].to_vec());
        at = range.end;
    }
    decoded.valid_len = at;
    if at < bytes.len() {
        decoded.resumes_at = (at + 1..bytes.len())
            .find(|&candidate| frame_at(bytes, candidate).is_some_and(|r| !r.is_empty()));
    }
    decoded
}

/// What [`repair_journal`] did to one journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRepair {
    /// The journal file.
    pub path: PathBuf,
    /// Valid entries kept.
    pub kept_entries: usize,
    /// Damaged byte ranges set aside (`start..end` in the old file).
    pub damaged: Vec<std::ops::Range<u64>>,
    /// Where the original file was copied.
    pub copy: PathBuf,
}

/// Repairs a journal holding damage followed by valid entries: copies the
/// file to `<file>.damaged`, then rewrites it atomically with every valid
/// entry, before and after each damaged region. A journal without such
/// damage is left alone (`None`). What the dropped entries held is lost:
/// the caller reports it.
pub fn repair_journal(path: &Path) -> std::io::Result<Option<JournalRepair>> {
    let bytes = std::fs::read(path)?;
    let mut kept = Vec::new();
    let mut damaged = Vec::new();
    let mut at = 0;
    loop {
        let decoded = decode_frames(&bytes[at..]);
        kept.extend(decoded.payloads);
        let Some(resumes_at) = decoded.resumes_at else {
            break;
        };
        damaged.push((at + decoded.valid_len) as u64..(at + resumes_at) as u64);
        at += resumes_at;
    }
    if damaged.is_empty() {
        return Ok(None);
    }
    let copy = path.with_extension("journal.damaged");
    std::fs::copy(path, &copy)?;
    File::open(&copy)?.sync_all()?;
    let mut framed = Vec::new();
    for payload in &kept {
        encode_frame(&mut framed, payload);
    }
    let temporary = path.with_extension("journal.tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(&framed)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    sync_parent(path)?;
    Ok(Some(JournalRepair {
        path: path.to_path_buf(),
        kept_entries: kept.len(),
        damaged,
        copy,
    }))
}

/// Repairs every journal under `data_dir/dispatcher` (see
/// [`repair_journal`]).
pub fn repair_journals(data_dir: &Path) -> std::io::Result<Vec<JournalRepair>> {
    let mut repairs = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(data_dir.join("dispatcher"))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "journal"))
        .collect();
    paths.sort();
    for path in paths {
        repairs.extend(repair_journal(&path)?);
    }
    Ok(repairs)
}

/// A journal in one file: CRC-framed payloads; a torn tail is cut on open.
/// An invalid frame followed by a valid one is corruption, not a torn tail:
/// the open fails with [`StoreError::CorruptJournal`] and changes nothing.
///
/// A failed [`Journal::sync`] keeps the pending payloads (the next sync
/// writes them again) and cuts whatever part of them reached the file, so
/// that a later frame never follows a torn one (replay stops at the first
/// invalid frame: everything after it would be lost). If even that cut
/// fails, the journal refuses every later sync until it is reopened.
#[derive(Debug)]
pub struct FileJournal {
    name: String,
    path: PathBuf,
    /// Holds a descriptor only while in use (`dmq_log_store::resources`):
    /// a quiet group's journal costs none.
    file: CachedFile,
    pending: Vec<u8>,
    durable_bytes: u64,
    /// Why the journal refuses syncs (a failed cut after a failed write).
    failed: Option<String>,
    /// Bytes of a torn tail cut when it was opened.
    cut_at_open: u64,
}

impl FileJournal {
    fn error(&self, source: std::io::Error) -> StoreError {
        StoreError::Journal {
            name: self.name.clone(),
            source,
        }
    }

    /// Opens or creates the journal at `path`, returning its payloads.
    pub fn open(name: &str, path: &Path) -> Result<(FileJournal, Vec<Vec<u8>>), StoreError> {
        let io_error = |source| StoreError::Journal {
            name: name.to_string(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(e)),
        };
        let Decoded {
            payloads,
            valid_len,
            resumes_at,
        } = decode_frames(&bytes);
        if let Some(resumes_at) = resumes_at {
            return Err(StoreError::CorruptJournal {
                name: name.to_string(),
                at: valid_len as u64,
                resumes_at: resumes_at as u64,
            });
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error)?;
        if valid_len < bytes.len() {
            tracing::warn!(
                journal = name,
                cut = bytes.len() - valid_len,
                "cutting a torn journal tail"
            );
            file.set_len(valid_len as u64).map_err(io_error)?;
            file.sync_all().map_err(io_error)?;
        }
        Ok((
            FileJournal {
                name: name.to_string(),
                path: path.to_path_buf(),
                file: CachedFile::new(file, path.to_path_buf(), OpenMode::Append),
                pending: Vec::new(),
                durable_bytes: valid_len as u64,
                failed: None,
                cut_at_open: (bytes.len() - valid_len) as u64,
            },
            payloads,
        ))
    }

    /// Cuts the file back to its durable frames (after a failed write or
    /// fsync, part of the pending frames may be in it) and makes the cut
    /// durable.
    fn cut_to_durable(&mut self) -> std::io::Result<()> {
        let file = self.file.get()?;
        file.set_len(self.durable_bytes)?;
        file.sync_all()
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Journal for FileJournal {
    fn append(&mut self, payload: &[u8]) {
        encode_frame(&mut self.pending, payload);
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if let Some(reason) = &self.failed {
            let reason = reason.clone();
            return Err(self.error(std::io::Error::other(reason)));
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self.file.get().and_then(|file| {
            (&*file).write_all(&self.pending)?;
            file.sync_data()
        });
        if let Err(error) = written {
            if let Err(cut) = self.cut_to_durable() {
                self.failed = Some(format!(
                    "cutting a failed write failed ({cut}) after: {error}; reopen the journal"
                ));
            }
            return Err(self.error(error));
        }
        self.durable_bytes += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn rewrite(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for payload in payloads {
            encode_frame(&mut bytes, payload);
        }
        let temporary = self.path.with_extension("journal.tmp");
        let write = || -> std::io::Result<File> {
            let mut file = File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)?;
            sync_parent(&self.path)?;
            File::options().append(true).open(&self.path)
        };
        let file = write().map_err(|e| self.error(e))?;
        self.file.replace(file);
        self.pending.clear();
        self.durable_bytes = bytes.len() as u64;
        self.failed = None;
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.durable_bytes + self.pending.len() as u64
    }
}

/// Files under one data directory: `topics/<topic>/<partition>/` for
/// partition logs, `dispatcher/<name>.journal` for journals.
#[derive(Debug)]
pub struct FileStorage {
    root: PathBuf,
    log_config: LogConfig,
    partitions: Mutex<HashMap<(String, u32), Arc<Log>>>,
    /// Journals whose torn tail was cut at open, with the bytes cut.
    tail_cuts: Mutex<Vec<(String, u64)>>,
    /// The lock of the whole data directory, held while open: its logs do
    /// not each hold their own (one descriptor per partition saved).
    _lock: File,
}

impl FileStorage {
    /// Storage under `root`, opening partitions with `log_config`.
    pub fn new(root: impl Into<PathBuf>, log_config: LogConfig) -> Result<FileStorage, StoreError> {
        let root = root.into();
        let journals = root.join("dispatcher");
        std::fs::create_dir_all(&journals).map_err(|source| StoreError::Journal {
            name: journals.display().to_string(),
            source,
        })?;
        let lock = dmq_log_store::lock_exclusive(&root)?;
        Ok(FileStorage {
            root,
            log_config: LogConfig {
                lock_directory: false,
                ..log_config
            },
            partitions: Mutex::new(HashMap::new()),
            tail_cuts: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    fn journal_path(&self, name: &str) -> PathBuf {
        self.root.join("dispatcher").join(format!("{name}.journal"))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Storage for FileStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError> {
        check_name(topic)?;
        let mut partitions = lock(&self.partitions);
        if let Some(log) = partitions.get(&(topic.to_string(), partition)) {
            return Ok(Arc::clone(log) as Arc<dyn PartitionLog>);
        }
        let dir = self
            .root
            .join("topics")
            .join(topic)
            .join(partition.to_string());
        let log = Arc::new(Log::open(dir, self.log_config.clone())?);
        partitions.insert((topic.to_string(), partition), Arc::clone(&log));
        Ok(log)
    }

    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError> {
        check_name(name)?;
        let (journal, payloads) = FileJournal::open(name, &self.journal_path(name))?;
        if journal.cut_at_open > 0 {
            lock(&self.tail_cuts).push((name.to_string(), journal.cut_at_open));
        }
        Ok((Box::new(journal), payloads))
    }

    fn journal_tail_cuts(&self) -> Vec<(String, u64)> {
        lock(&self.tail_cuts).clone()
    }

    fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        match std::fs::remove_file(self.journal_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Journal {
                name: name.to_string(),
                source,
            }),
        }
    }

    fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        check_name(topic)?;
        lock(&self.partitions).retain(|(name, _), _| name != topic);
        let dir = self.root.join("topics").join(topic);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Journal {
                    name: dir.display().to_string(),
                    source,
                })
            }
        }
        sync_parent(&dir).map_err(|source| StoreError::Journal {
            name: dir.display().to_string(),
            source,
        })
    }

    fn check_room(&self, partitions: u32) -> Result<(), StoreError> {
        let need = (u64::from(partitions) * self.log_config.initial_allocation_bytes())
            .saturating_add(self.log_config.min_free_bytes);
        let free =
            dmq_log_store::available_bytes(&self.root).map_err(|source| StoreError::Journal {
                name: self.root.display().to_string(),
                source,
            })?;
        if need > free {
            return Err(StoreError::NoRoom { need, free });
        }
        Ok(())
    }

    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("dispatcher");
        let entries = std::fs::read_dir(&dir).map_err(|source| StoreError::Journal {
            name: dir.display().to_string(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".journal")) {
                if name.starts_with(prefix) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// An in-memory partition log, timestamps from the caller's clock.
///
/// Durability models the fsync policies: an eager log (`Always`) makes a
/// batch durable in [`PartitionLog::wait_durable`]; a lazy one (`Never`,
/// `Interval`) only when [`MemoryStorage::sync_logs`] says so (the OS
/// writing back). [`MemoryStorage::power_loss`] cuts each log to some
/// length between its durable end and its end, as recovery after a power
/// loss would.
#[derive(Debug)]
pub struct MemoryLog {
    clock: Arc<dyn dmq_log_store::Clock>,
    lazy: bool,
    /// Shared with its storage: appends fail with `DiskFull` while set.
    full: Arc<std::sync::atomic::AtomicBool>,
    /// This log's own full disk (see [`MemoryStorage::set_topic_full`]).
    own_full: std::sync::atomic::AtomicBool,
    /// Appends (record batches) so far: tests count durable writes.
    appends: std::sync::atomic::AtomicU64,
    state: Mutex<MemoryLogState>,
}

#[derive(Debug, Default)]
struct MemoryLogState {
    records: Vec<Record>,
    /// Records below this survive a power loss.
    durable_len: usize,
    next_unique: u64,
    last_timestamp_ms: i64,
}

impl MemoryLog {
    /// An empty log stamped by `clock`.
    pub fn new(clock: Arc<dyn dmq_log_store::Clock>, id_seed: u64) -> MemoryLog {
        MemoryLog::with_durability(clock, id_seed, false, Arc::default())
    }

    fn with_durability(
        clock: Arc<dyn dmq_log_store::Clock>,
        id_seed: u64,
        lazy: bool,
        full: Arc<std::sync::atomic::AtomicBool>,
    ) -> MemoryLog {
        MemoryLog {
            clock,
            lazy,
            full,
            own_full: std::sync::atomic::AtomicBool::new(false),
            appends: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(MemoryLogState {
                next_unique: id_seed,
                ..MemoryLogState::default()
            }),
        }
    }

    /// How many batches were appended (each one durability wait under an
    /// eager policy).
    pub fn appends(&self) -> u64 {
        self.appends.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PartitionLog for MemoryLog {
    fn append_batch_deferred(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError> {
        self.append_deferred(batch.producer_id, batch.producer_seq, batch.records.clone())
    }

    fn append_deferred(
        &self,
        _producer_id: u64,
        _producer_seq: u64,
        records: Vec<RecordInput>,
    ) -> Result<AppendInfo, StoreError> {
        if records.is_empty() {
            return Err(StoreError::Log(LogError::InvalidBatch(
                "a batch needs at least one record".into(),
            )));
        }
        if self.full.load(std::sync::atomic::Ordering::Relaxed)
            || self.own_full.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StoreError::Log(LogError::DiskFull {
                context: "appending (simulated full disk)",
            }));
        }
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut state = lock(&self.state);
        let timestamp_ms = self.clock.now_ms().max(state.last_timestamp_ms);
        state.last_timestamp_ms = timestamp_ms;
        let mut out = Vec::with_capacity(records.len());
        for input in records {
            let id = input.id.unwrap_or_else(|| {
                state.next_unique += 1;
                MessageId::new(timestamp_ms, state.next_unique)
            });
            let offset = state.records.len() as u64;
            state.records.push(Record {
                offset,
                timestamp_ms,
                id,
                key: input.key,
                headers: input.headers,
                value: input.value,
                deliver_at_ms: input.deliver_at_ms,
                expire_at_ms: input.expire_at_ms,
            });
            out.push((offset, id));
        }
        let base_offset = out.first().map_or(0, |(offset, _)| *offset);
        Ok(AppendInfo {
            base_offset,
            last_offset: base_offset + out.len() as u64 - 1,
            timestamp_ms,
            ids: out.into_iter().map(|(_, id)| id).collect(),
        })
    }

    fn wait_durable(&self, info: &AppendInfo) -> Result<(), StoreError> {
        if !self.lazy {
            let mut state = lock(&self.state);
            let end = (info.last_offset + 1) as usize;
            state.durable_len = state.durable_len.max(end.min(state.records.len()));
        }
        Ok(())
    }

    fn durable_on_append(&self) -> bool {
        self.lazy
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        state.durable_len = state.records.len();
        Ok(())
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        let state = lock(&self.state);
        let start = (from as usize).min(state.records.len());
        Ok(state.records[start..]
            .iter()
            .take(max_records)
            .cloned()
            .collect())
    }

    fn start_offset(&self) -> u64 {
        0
    }

    fn end_offset(&self) -> u64 {
        lock(&self.state).records.len() as u64
    }

    fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StoreError> {
        let state = lock(&self.state);
        let index = state
            .records
            .partition_point(|r| r.timestamp_ms < timestamp_ms);
        Ok((index < state.records.len()).then_some(index as u64))
    }
}

/// A journal whose "disk" is shared with its [`MemoryStorage`].
#[derive(Debug)]
pub struct MemoryJournal {
    disk: Arc<Mutex<Vec<Vec<u8>>>>,
    pending: Vec<Vec<u8>>,
}

impl Journal for MemoryJournal {
    fn append(&mut self, payload: &[u8]) {
        self.pending.push(payload.to_vec());
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        lock(&self.disk).append(&mut self.pending);
        Ok(())
    }

    fn rewrite(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError> {
        *lock(&self.disk) = payloads.to_vec();
        self.pending.clear();
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let frame = |p: &Vec<u8>| (p.len() + FRAME_HEADER_LEN) as u64;
        lock(&self.disk).iter().map(frame).sum::<u64>()
            + self.pending.iter().map(frame).sum::<u64>()
    }
}

type MemoryPartitions = BTreeMap<(String, u32), Arc<MemoryLog>>;
type MemoryJournals = BTreeMap<String, Arc<Mutex<Vec<Vec<u8>>>>>;

/// Simulated storage: partitions and synced journal contents survive a
/// "crash" (dropping the dispatcher); unsynced journal appends do not. With
/// lazy logs, [`MemoryStorage::power_loss`] also cuts what the logs had
/// not made durable.
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    clock: Arc<dyn dmq_log_store::Clock>,
    partitions: Arc<Mutex<MemoryPartitions>>,
    journals: Arc<Mutex<MemoryJournals>>,
    lazy_logs: bool,
    /// While set, every log append fails with `DiskFull`.
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryStorage {
    /// Empty storage whose logs are stamped by `clock`; appends are
    /// durable once acknowledged (fsync `Always`).
    pub fn new(clock: Arc<dyn dmq_log_store::Clock>) -> MemoryStorage {
        MemoryStorage {
            clock,
            partitions: Arc::default(),
            journals: Arc::default(),
            lazy_logs: false,
            full: Arc::default(),
        }
    }

    /// Like [`MemoryStorage::new`], but appends are durable only at
    /// [`MemoryStorage::sync_logs`] (fsync `Never` or `Interval`).
    pub fn with_lazy_logs(clock: Arc<dyn dmq_log_store::Clock>) -> MemoryStorage {
        MemoryStorage {
            lazy_logs: true,
            ..MemoryStorage::new(clock)
        }
    }

    /// Simulates a full disk: while `full`, every log append fails with
    /// `LogError::DiskFull` (journals keep working, as on a disk with the
    /// broker's reserve).
    pub fn set_logs_full(&self, full: bool) {
        self.full.store(full, std::sync::atomic::Ordering::Relaxed);
    }

    /// Simulates a full disk for one topic's logs only (those opened so
    /// far): while `full`, their appends fail with `LogError::DiskFull`.
    pub fn set_topic_full(&self, topic: &str, full: bool) {
        for ((name, _), log) in lock(&self.partitions).iter() {
            if name == topic {
                log.own_full
                    .store(full, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Every log's appends so far become durable (a background writeback).
    pub fn sync_logs(&self) {
        for log in lock(&self.partitions).values() {
            let mut state = lock(&log.state);
            state.durable_len = state.records.len();
        }
    }

    /// A power loss, as recovery finds it: each log keeps its durable
    /// records and `keep(topic, partition, lost)` of the `lost` ones that
    /// were not durable (the OS may have written some back). Returns the
    /// records cut, in all. The dispatcher must be dropped first (journal
    /// appends not synced are lost with it).
    pub fn power_loss(&self, mut keep: impl FnMut(&str, u32, usize) -> usize) -> usize {
        let mut cut = 0;
        for ((topic, partition), log) in lock(&self.partitions).iter() {
            let mut state = lock(&log.state);
            let lost = state.records.len() - state.durable_len;
            let kept = keep(topic, *partition, lost).min(lost);
            let len = state.durable_len + kept;
            cut += state.records.len() - len;
            state.records.truncate(len);
            state.durable_len = len;
        }
        cut
    }

    /// The in-memory log of a partition, if it was opened.
    pub fn memory_log(&self, topic: &str, partition: u32) -> Option<Arc<MemoryLog>> {
        lock(&self.partitions)
            .get(&(topic.to_string(), partition))
            .cloned()
    }
}

impl Storage for MemoryStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError> {
        check_name(topic)?;
        let mut partitions = lock(&self.partitions);
        let seed = (partitions.len() as u64 + 1) << 40;
        let log = partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                Arc::new(MemoryLog::with_durability(
                    Arc::clone(&self.clock),
                    seed,
                    self.lazy_logs,
                    Arc::clone(&self.full),
                ))
            });
        Ok(Arc::clone(log) as Arc<dyn PartitionLog>)
    }

    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError> {
        check_name(name)?;
        let disk = Arc::clone(lock(&self.journals).entry(name.to_string()).or_default());
        let payloads = lock(&disk).clone();
        Ok((
            Box::new(MemoryJournal {
                disk,
                pending: Vec::new(),
            }),
            payloads,
        ))
    }

    fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
        lock(&self.journals).remove(name);
        Ok(())
    }

    fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        lock(&self.partitions).retain(|(name, _), _| name != topic);
        Ok(())
    }

    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(lock(&self.journals)
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// Records of `log` from `from`, at most `max_records` (or, with
/// `whole_batches`, up to the end of the batch that holds the last one).
fn read_log(
    log: &Log,
    from: u64,
    max_records: usize,
    whole_batches: bool,
) -> Result<Vec<Record>, StoreError> {
    let mut out = Vec::new();
    let mut offset = from.max(Log::start_offset(log));
    let end = Log::end_offset(log);
    while out.len() < max_records && offset < end {
        let batches = match Log::read(log, offset, 256 * 1024) {
            Ok(batches) => batches,
            // Damaged bytes: the caller sees a gap; the log reported it.
            Err(LogError::Corrupt {
                next_readable_offset: Some(next),
                ..
            }) if next > offset => {
                tracing::error!(offset, next, "skipping a damaged region of a partition");
                offset = next;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if batches.is_empty() {
            break;
        }
        for batch in &batches {
            if out.len() >= max_records {
                break;
            }
            for record in batch.records() {
                let record =
                    record.map_err(|e| StoreError::Log(LogError::InvalidBatch(e.to_string())))?;
                if record.offset < offset {
                    continue;
                }
                if out.len() >= max_records && !whole_batches {
                    break;
                }
                out.push(record);
            }
            offset = batch.header().next_offset();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmq_log_store::{Clock, ManualClock};

    #[test]
    fn file_journal_round_trip_torn_tail_and_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::new(dir.path(), LogConfig::default()).unwrap();
        let (mut journal, payloads) = storage.open_journal("acks.g1").unwrap();
        assert!(payloads.is_empty());
        journal.append(b"one");
        journal.append(b"two");
        journal.sync().unwrap();
        journal.append(b"never synced");
        drop(journal);
        // A torn frame at the end is cut.
        let path = dir.path().join("dispatcher/acks.g1.journal");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        let (mut journal, payloads) = storage.open_journal("acks.g1").unwrap();
        assert_eq!(payloads, vec![b"one".to_vec(), b"two".to_vec()]);
        journal.append(b"three");
        journal.sync().unwrap();
        let (_, payloads) = storage.open_journal("acks.g1").unwrap();
        assert_eq!(payloads.len(), 3);
        journal.rewrite(&[b"snapshot".to_vec()]).unwrap();
        journal.append(b"after");
        journal.sync().unwrap();
        let (_, payloads) = storage.open_journal("acks.g1").unwrap();
        assert_eq!(payloads, vec![b"snapshot".to_vec(), b"after".to_vec()]);
        assert_eq!(
            storage.list_journals("acks.").unwrap(),
            vec!["acks.g1".to_string()]
        );
        storage.remove_journal("acks.g1").unwrap();
        assert!(storage.list_journals("acks.").unwrap().is_empty());
        assert!(storage.open_journal("../escape").is_err());
    }

    #[test]
    fn a_failed_sync_is_cut_so_that_later_frames_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.journal");
        let (mut journal, _) = FileJournal::open("meta", &path).unwrap();
        journal.append(b"one");
        journal.sync().unwrap();
        // A write that failed half way: part of a frame reached the file.
        journal.append(b"failed");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&journal.pending[..5])
            .unwrap();
        journal.cut_to_durable().unwrap();
        // The retry writes the pending frame whole, then the next one.
        journal.append(b"two");
        journal.sync().unwrap();
        let (_, payloads) = FileJournal::open("meta", &path).unwrap();
        assert_eq!(
            payloads,
            vec![b"one".to_vec(), b"failed".to_vec(), b"two".to_vec()]
        );
        // A journal whose cut failed refuses syncs until reopened.
        let (mut journal, _) = FileJournal::open("meta", &path).unwrap();
        journal.failed = Some("cut failed".into());
        journal.append(b"three");
        assert!(journal.sync().is_err());
        let (_, payloads) = FileJournal::open("meta", &path).unwrap();
        assert_eq!(payloads.len(), 3);
    }

    #[test]
    fn memory_journal_loses_only_unsynced_payloads() {
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        let (mut journal, _) = storage.open_journal("j").unwrap();
        journal.append(b"a");
        journal.sync().unwrap();
        journal.append(b"b");
        drop(journal); // crash
        let (_, payloads) = storage.open_journal("j").unwrap();
        assert_eq!(payloads, vec![b"a".to_vec()]);
    }

    #[test]
    fn log_and_memory_log_agree() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_000));
        let log = Log::open_with_clock(dir.path(), LogConfig::default(), clock.clone()).unwrap();
        let memory = MemoryLog::new(clock.clone(), 0);
        for (i, partition) in [&log as &dyn PartitionLog, &memory].into_iter().enumerate() {
            let appended = partition
                .append(
                    (0..10)
                        .map(|n| RecordInput::new(format!("{i}-{n}")))
                        .collect(),
                )
                .unwrap();
            assert_eq!(appended.len(), 10);
            clock.advance_ms(5);
            partition.append(vec![RecordInput::new("late")]).unwrap();
            let read = partition.read(3, 4).unwrap();
            assert_eq!(
                read.iter().map(|r| r.offset).collect::<Vec<_>>(),
                vec![3, 4, 5, 6]
            );
            assert_eq!(partition.end_offset(), 11);
            assert_eq!(
                partition.offset_for_timestamp(clock.now_ms()).unwrap(),
                Some(10)
            );
            assert!(partition.read(11, 10).unwrap().is_empty());
            clock.advance_ms(5);
        }
    }

    #[test]
    fn indexed_lookups_agree_with_the_default_scans() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_000));
        let config = LogConfig {
            segment_bytes_max: 16 * 1024,
            index_interval_bytes: 256,
            fsync: dmq_log_store::FsyncPolicy::Never,
            ..LogConfig::default()
        };
        let log = Log::open_with_clock(dir.path(), config, clock.clone()).unwrap();
        let memory = MemoryLog::new(clock.clone(), 0);
        let logs = [&log as &dyn PartitionLog, &memory];
        // The same records in both (same ids), several segments in `log`.
        for i in 0..3_000u64 {
            let key = ["hot", "warm", "cold"][(i % 7).min(2) as usize];
            let input = RecordInput::new(format!("{i}-{}", "x".repeat(40))).with_key(key);
            let appended = PartitionLog::append(&log, vec![input.clone()]).unwrap();
            let same_id = RecordInput {
                id: Some(appended[0].1),
                ..input
            };
            memory.append(vec![same_id]).unwrap();
            if i % 10 == 0 {
                clock.advance_ms(1);
            }
        }
        assert!(Log::segment_count(&log) > 3);
        let records = memory.read(0, usize::MAX).unwrap();
        for index in [0, 1, 1_500, 2_999] {
            let wanted = &records[index];
            for partition in logs {
                let found = partition.find_by_id(&wanted.id).unwrap().unwrap();
                assert_eq!(found.offset, wanted.offset);
            }
        }
        for partition in logs {
            assert!(partition
                .find_by_id(&MessageId::new(1_000, 99))
                .unwrap()
                .is_none());
        }
        let offsets = |found: Vec<Record>| found.iter().map(|r| r.offset).collect::<Vec<_>>();
        for key in [&b"hot"[..], b"warm", b"cold", b"none"] {
            let expected: Vec<u64> = records
                .iter()
                .filter(|r| r.key.as_deref() == Some(key))
                .map(|r| r.offset)
                .collect();
            for partition in logs {
                assert_eq!(
                    offsets(partition.find_by_key(key, usize::MAX).unwrap()),
                    expected
                );
                assert_eq!(
                    offsets(partition.find_by_key(key, 3).unwrap()),
                    expected.iter().copied().take(3).collect::<Vec<_>>()
                );
                let from = 1_234;
                assert_eq!(
                    offsets(partition.find_by_key_from(key, from, 5).unwrap()),
                    expected
                        .iter()
                        .copied()
                        .filter(|&o| o >= from)
                        .take(5)
                        .collect::<Vec<_>>()
                );
                assert!(partition.find_by_key_from(key, 0, 0).unwrap().is_empty());
            }
        }
        // Size and retention: the file log knows them; the memory log keeps all.
        let size = PartitionLog::size_bytes(&log);
        assert!(size > 100_000, "{size}");
        assert_eq!(PartitionLog::size_bytes(&memory), 0);
        assert_eq!(
            PartitionLog::apply_retention(&memory, Some(0), Some(0), i64::MAX).unwrap(),
            0
        );
        assert_eq!(
            PartitionLog::apply_retention(&log, None, None, i64::MAX).unwrap(),
            0
        );
        let deleted = PartitionLog::apply_retention(&log, None, Some(size / 2), 0).unwrap();
        assert!(deleted > 0);
        assert!(PartitionLog::size_bytes(&log) < size);
        let start = PartitionLog::start_offset(&log);
        assert!(start > 0);
        // Age: everything is older than a day after the last record.
        let deleted =
            PartitionLog::apply_retention(&log, Some(1), None, 1_000 + 86_400_000).unwrap();
        assert!(deleted > 0);
        assert_eq!(Log::segment_count(&log), 1);
        assert_eq!(PartitionLog::end_offset(&log), 3_000);
        // Lookups skip what retention deleted.
        assert!(log.find_by_id(&records[0].id).unwrap().is_none());
    }
}
