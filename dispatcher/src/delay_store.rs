//! The durable delayed-message store: messages whose deliver-at time is in
//! the future wait here, not in their topic (where they would pin every
//! group's ack floor), and are handed back when due.
//!
//! # Layout
//!
//! - **Timer log**: the internal partition `__dmq_delay/0` (a real commit log
//!   under [`crate::storage::FileStorage`]). [`DelayStore::schedule`] appends
//!   the whole call's messages as one batch (group commit). Each record is the
//!   caller's record plus two or three headers appended at the end:
//!   - `dmq.delay.topic`: the destination topic, UTF-8 bytes;
//!   - `dmq.delay.partition`: the destination partition, `u32` little-endian
//!     (4 bytes);
//!   - `dmq.delay.caller-id` (empty), when the id came from the caller (a
//!     message moved in with its id). Records written before this header
//!     existed are told by their id's time, which is not the record's.
//!
//!   `deliver_at_ms` holds the due time (`None` on input means "now"). The id
//!   that append assigns (or the caller's id, for a message moved in with one)
//!   is the message's id for life.
//! - **Bucket journals** `delay.bucket.<start>` (`<start>`: the bucket's first
//!   millisecond, 20 decimal digits, zero-padded, so names sort by time;
//!   due times before the epoch go to bucket 0). A bucket covers
//!   `[start, start + bucket_width_ms)`. Each journal payload (CRC-framed by
//!   the [`crate::storage::Journal`]) is little-endian:
//!   - byte 0: format version, `1`;
//!   - byte 1: kind: `1` schedule entries, `2` cancel tombstones, `3` fired
//!     tombstones, `4` schedule entries of one destination;
//!   - bytes 2..6: `u32` entry count `n`;
//!   - kind `4` only: the destination, `u32` partition, `u8` topic length
//!     `L` (1 to 255), `L` bytes of topic (UTF-8);
//!   - then `n` entries. A schedule entry is 33 bytes: `i64` due ms, `u64`
//!     timer-log offset, 16 bytes message id, `u8` flags (bit 0: the id came
//!     from the caller, not from the timer log; other bits zero). A tombstone
//!     is 8 bytes: the `u64` timer-log offset it kills.
//!
//!   Schedule entries are written as kind `4`, so the journals alone say
//!   how many delays are pending per destination (see "Counts per
//!   destination"). Kind `1` (no destination) is what versions before it
//!   wrote; opening resolves such live entries from their timer-log records
//!   once and rewrites their bucket as kind `4`. A journal holding kind `4`
//!   cannot be read by those older versions.
//!
//!   Entries are keyed by timer-log offset (unique forever). A tombstone wins
//!   over a schedule entry whatever their order, and a schedule entry may
//!   appear twice (re-indexing); the live set of a bucket is
//!   `{schedule offsets} - {tombstone offsets}`.
//! - **Meta journal** `delay.meta`: one payload, rewritten atomically:
//!   byte 0 version `1`, byte 1 kind `1`, bytes 2..10 `u64` watermark,
//!   bytes 10..18 `u64` bucket width in ms (the width the buckets on disk were
//!   written with; it wins over the configuration).
//!
//! # Crash argument (WAL + index)
//!
//! `schedule` returns once the timer-log append returned (durable under the
//! log's fsync policy). Bucket entries are written lazily: they are buffered
//! in memory (or in an open journal's unsynced tail) and synced by
//! [`DelayStore::checkpoint`] or when `buffered_entries_max` is reached
//! (a "flush"). A flush syncs every dirty bucket journal, then rewrites the
//! meta journal with watermark `W` = the timer log's end offset. Invariant:
//! every timer-log record below `W` has its schedule entry durable in its
//! bucket journal, or its bucket was removed because all its entries were
//! tombstoned (removal happens only after a flush covered them). Opening
//! re-indexes the timer log from `W` to its end, so a crash anywhere loses no
//! schedule: records above `W` are indexed again (a duplicate schedule entry
//! is harmless: offsets dedupe).
//!
//! - A schedule may be split ([`DelayStore::schedule_append`], the
//!   durability wait on another thread, [`DelayStore::schedule_commit`]):
//!   while appended records wait for their commit, a flush sets `W` no
//!   higher than the first of them, so the invariant holds for them too
//!   once they are committed. An aborted schedule gets synced cancel
//!   tombstones, so re-indexing never revives it.
//! - Cancels are synced before `cancel` returns (the bucket journal is synced;
//!   tombstones are sticky, so a re-indexed schedule entry stays dead).
//! - Fired marks ([`DelayStore::mark_fired`]) are lazy: a crash between the
//!   caller's append to the topic and the next flush fires the message again
//!   after restart (at-least-once; the id is the same, so consumers can
//!   dedupe). A crash between `poll_due` and the append loses nothing either.
//! - A fully fired (or cancelled) bucket's journal is removed at a flush,
//!   after the watermark passed all its entries.
//! - The store must be the only writer of `__dmq_delay`.
//!
//! # Timer log cut
//!
//! Entries are keyed by timer-log offset, "unique forever" only while the
//! timer log never loses an appended record. Under a lazy fsync policy a
//! power loss can cut it (below the watermark, or below a cancel tombstone,
//! which is synced at once), and new records then take the lost offsets.
//! Opening drops every bucket entry and tombstone at or above the timer
//! log's end (rewriting those buckets), then writes a watermark past the
//! end down to it. A crash in between finds the same cut again.
//!
//! # Memory
//!
//! In memory: one small summary per bucket (count, earliest due), the
//! entries of the near window (buckets starting before `now + window_ms`) in
//! a [`TimingWheel`], the unflushed index entries (at most
//! `buffered_entries_max`), polled-but-unmarked ids, the ids of pending
//! delays whose id came from the caller (for cancellation, see below), and
//! one count per destination partition that had a delay in this process
//! (see "Counts per destination").
//! Loading from disk stops at `loaded_entries_max` entries (after a long
//! downtime the overdue backlog is loaded bucket by bucket as it drains, so
//! due order holds).
//!
//! # Counts per destination
//!
//! [`DelayStore::pending_in_topic`] says how many pending delays each
//! partition of a topic has, without reading anything: the store keeps a
//! count per destination (topic, partition), interned once per process
//! (memory grows with the destinations that ever had a delay, not with the
//! delays). The counts follow `pending` exactly: up at `schedule`, down when
//! an entry is polled (fired or found lost) or cancelled, and rebuilt at open
//! from the bucket journals (each schedule entry names its destination) and
//! the re-indexed timer-log tail.
//!
//! # Cancellation
//!
//! Loaded entries are keyed by timer-log offset (a burst fires in offset
//! order, which keeps the map's removals cache-friendly), so a cancel first
//! finds the offset, loaded or not. Ids assigned by the timer log carry the
//! append time, so the record is found with `offset_for_timestamp(id time)`
//! and a short forward scan (at most `cancel_scan_records_max` records); a
//! loaded entry at that offset is cancelled in memory, otherwise its due
//! time names the bucket, whose journal is read to see whether the delay is
//! still live. Ids that came from the caller are kept in a map id ->
//! (bucket, offset), bounded by the number of such pending delays.
//!
//! # Firing
//!
//! A fired message is handed back as a [`RecordInput`] with the same id, the
//! two delay headers removed, `deliver_at_ms` kept (it is now in the past, so
//! dispatch delivers it at once, and consumers can see when it was due), the
//! key, value, other headers and `expire_at_ms` unchanged.
//!
//! # Followed timer logs
//!
//! A store opened with a [`DelayLayout`] whose `followed` is set does not
//! write its timer log: others append to it (in a cluster, the timer log is
//! a Raft group's replicated partition, and every node runs a store that
//! follows it). Such a store
//! - indexes records as [`DelayStore::follow`] finds them (from
//!   `indexed_end` to the log's end, a replica's committed end); the
//!   watermark never passes `indexed_end`, so a crash re-indexes what was
//!   not flushed, as above;
//! - learns that delays fired or were cancelled from **settle markers** in
//!   the same log: a record with the header [`SETTLED_HEADER`] (empty
//!   value) whose value is a `u8` kind (`1` fired, `2` cancelled) and per
//!   delay its `u64` timer-log offset, `i64` due ms and 16-byte id
//!   ([`settle_record`]). A marker settles its delays as `mark_fired` or
//!   `cancel` would (tombstones, counts); one naming a delay already
//!   settled, or never indexed, changes nothing. Due times are carried so
//!   that stores with different bucket widths find the bucket;
//! - refuses [`DelayStore::schedule`] and [`DelayStore::cancel`]: a
//!   schedule is an append of [`timer_record`]s to the log, a cancel an
//!   append of a marker for what [`DelayStore::locate`] found;
//! - fires like any store ([`DelayStore::poll_due`],
//!   [`DelayStore::mark_fired`]), but only where its owner decides (in a
//!   cluster, the node leading the timer log's group, which appends the
//!   fired marker before it calls `mark_fired`);
//! - opens with [`DelayError::TimerBehind`] when the log ends below the
//!   watermark: a replica that has not applied every committed record yet
//!   (never a cut, which only a lazily fsynced local log can suffer).
//!
//! # Limitations
//!
//! - The timer log is reclaimed by [`DelayStore::reclaim`] (the broker
//!   calls it every minute): sealed segments wholly below
//!   [`DelayStore::reclaimable_below`] are deleted, the lowest of the
//!   watermark, an uncommitted append, a loaded or polled entry and each
//!   unloaded bucket's lowest entry (a lower bound, kept until the bucket
//!   is removed: a far bucket with an old entry holds the log back until
//!   it fires). Re-indexing starts at the log's start offset if the
//!   watermark is below it.
//! - Bucket journals are not compacted: a bucket is removed when all of its
//!   entries are dead; a far bucket with many cancels keeps its tombstones.
//! - `next_due_ms` may be early (never late) after far cancels.

use std::cmp::Reverse;
use std::collections::btree_map::Entry as BTreeEntry;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_log_store::{AppendInfo, MessageId, Record, RecordInput};

use crate::storage::{AppendedRecords, Journal, PartitionLog, Storage, StoreError};
use crate::timing_wheel::{TimerId, TimingWheel};

/// Topic of the timer log.
pub const TIMER_TOPIC: &str = "__dmq_delay";
/// Header naming the destination topic in the timer log.
pub const TOPIC_HEADER: &str = "dmq.delay.topic";
/// Header naming the destination partition (`u32` LE) in the timer log.
pub const PARTITION_HEADER: &str = "dmq.delay.partition";
/// Header (empty value) marking a timer-log record whose id came from the
/// caller (a message moved in with its id), so that re-indexing knows it
/// without guessing from the id's time.
pub const CALLER_ID_HEADER: &str = "dmq.delay.caller-id";
/// Prefix of the bucket journals.
pub const BUCKET_PREFIX: &str = "delay.bucket.";
/// Name of the meta journal.
pub const META_JOURNAL: &str = "delay.meta";
/// Header of a settle marker in a followed timer log (see "Followed timer
/// logs"): its value says which delays fired or were cancelled.
pub const SETTLED_HEADER: &str = "dmq.delay.settled";

/// Where a store keeps its timer log and journals, and who writes the
/// timer log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayLayout {
    /// The timer log's topic (partition 0).
    pub timer_topic: &'static str,
    /// Prefix of the bucket journals.
    pub bucket_prefix: &'static str,
    /// The meta journal.
    pub meta_journal: &'static str,
    /// The timer log is written by others (a replicated log every node
    /// follows, see "Followed timer logs"), not by
    /// [`DelayStore::schedule`].
    pub followed: bool,
}

impl DelayLayout {
    /// A node's own store: [`TIMER_TOPIC`], [`BUCKET_PREFIX`],
    /// [`META_JOURNAL`], written by [`DelayStore::schedule`].
    pub const LOCAL: DelayLayout = DelayLayout {
        timer_topic: TIMER_TOPIC,
        bucket_prefix: BUCKET_PREFIX,
        meta_journal: META_JOURNAL,
        followed: false,
    };
}

/// What a settle marker says of its delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleKind {
    /// Appended to their topics.
    Fired,
    /// Cancelled before they fired.
    Cancelled,
}

/// One delay a settle marker names: its timer-log offset, due time and id,
/// or its id alone ([`Settled::by_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Offset of its record in the timer log.
    pub offset: u64,
    /// When it is (was) due.
    pub due_ms: i64,
    /// Its id.
    pub id: MessageId,
}

impl Settled {
    /// Delay `id`, wherever it is: each store that applies the marker
    /// looks it up ([`DelayStore::locate`]) when it gets there, so the
    /// log's order decides whether it was still pending.
    pub fn by_id(id: MessageId) -> Settled {
        Settled {
            offset: u64::MAX,
            due_ms: i64::MIN,
            id,
        }
    }

    fn is_by_id(&self) -> bool {
        self.offset == u64::MAX
    }
}

/// A timer-log record, read: see [`DelayStore::read_timer_record`].
enum TimerRecord {
    Settle(SettleKind, Vec<Settled>),
    Schedule(Entry),
}

/// What one [`DelayStore::follow`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowReport {
    /// Timer-log records read.
    pub records: usize,
    /// Each cancel marker applied, by its offset: whether it settled a
    /// pending delay.
    pub cancels: Vec<(u64, bool)>,
}

const FORMAT_VERSION: u8 = 1;
const KIND_SCHEDULE: u8 = 1;
const KIND_CANCEL: u8 = 2;
const KIND_FIRED: u8 = 3;
const KIND_SCHEDULE_TO: u8 = 4;
const KIND_WATERMARK: u8 = 1;
const PAYLOAD_HEADER_LEN: usize = 6;
const SCHEDULE_ENTRY_LEN: usize = 33;
const TOMBSTONE_ENTRY_LEN: usize = 8;
/// A kind-4 payload's destination before its topic bytes: `u32` partition,
/// `u8` topic length.
const DESTINATION_HEADER_LEN: usize = 5;
const META_LEN: usize = 18;
const FLAG_FOREIGN_ID: u8 = 1;
/// A settle marker's value: `u8` kind, then per delay `u64` offset, `i64`
/// due ms, 16 bytes of id.
const SETTLE_FIRED: u8 = 1;
const SETTLE_CANCELLED: u8 = 2;
const SETTLE_ENTRY_LEN: usize = 32;
/// Entries per journal payload (keeps payloads a few hundred KiB at most).
const ENTRIES_PER_PAYLOAD_MAX: usize = 8192;
/// Due entries whose records are read in one sweep of the timer log (and
/// held in memory until polled).
const FETCH_RECORDS_MAX: usize = 65_536;
/// Records per timer-log read.
const READ_CHUNK_RECORDS: usize = 4096;
/// Needed offsets closer than this share one timer-log read when firing.
const FETCH_GAP_RECORDS: u64 = 1024;
const TOPIC_LEN_MAX: usize = 255;

/// Errors of the delay store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DelayError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A journal payload passed its CRC but does not decode.
    #[error("corrupt delay journal {journal}: {reason}")]
    CorruptJournal {
        /// The journal.
        journal: String,
        /// What is wrong.
        reason: String,
    },
    /// A caller's input was refused; nothing was written.
    #[error("invalid delay input: {0}")]
    InvalidInput(String),
    /// The configuration is unusable.
    #[error("invalid delay configuration: {0}")]
    InvalidConfig(String),
    /// A followed timer log ends below the store's watermark: its replica
    /// has not applied every committed record yet (after a restart). Open
    /// again later.
    #[error(
        "the followed timer log ends at {end}, below the watermark {watermark}: not caught up yet"
    )]
    TimerBehind {
        /// The store's watermark.
        watermark: u64,
        /// The timer log's end.
        end: u64,
    },
}

/// Result of the delay store.
pub type Result<T, E = DelayError> = std::result::Result<T, E>;

/// Tuning of the delay store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayConfig {
    /// Width of an on-disk bucket (default 60 s). Fixed once buckets exist.
    pub bucket_width_ms: u64,
    /// Buckets starting before `now + window_ms` are in memory (default 5 min).
    pub window_ms: u64,
    /// Tick of the in-memory timing wheel (default 10 ms).
    pub tick_ms: u64,
    /// Loading buckets from disk stops at this many in-memory entries
    /// (default 1 Mi); the near window may exceed it through live schedules.
    pub loaded_entries_max: usize,
    /// Unflushed index entries that trigger a flush (default 256 Ki).
    pub buffered_entries_max: usize,
    /// Timer-log records scanned to find an unloaded delay by id (default 64 Ki).
    pub cancel_scan_records_max: usize,
}

impl Default for DelayConfig {
    fn default() -> Self {
        DelayConfig {
            bucket_width_ms: 60_000,
            window_ms: 300_000,
            tick_ms: 10,
            loaded_entries_max: 1 << 20,
            buffered_entries_max: 1 << 18,
            cancel_scan_records_max: 1 << 16,
        }
    }
}

impl DelayConfig {
    fn validate(&self) -> Result<()> {
        let fail = |reason: &str| Err(DelayError::InvalidConfig(reason.to_string()));
        if self.bucket_width_ms == 0 || self.bucket_width_ms > i64::MAX as u64 / 4 {
            return fail("bucket_width_ms must be positive and reasonable");
        }
        if self.window_ms > i64::MAX as u64 / 4 {
            return fail("window_ms too large");
        }
        if self.tick_ms == 0 {
            return fail("tick_ms must be positive");
        }
        if self.loaded_entries_max == 0 || self.buffered_entries_max == 0 {
            return fail("entry limits must be positive");
        }
        Ok(())
    }
}

/// A message that is due: append `record` to `topic`/`partition`, then call
/// [`DelayStore::mark_fired`] with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueMessage {
    /// The message's id (also set in `record.id`).
    pub id: MessageId,
    /// Destination topic.
    pub topic: String,
    /// Destination partition.
    pub partition: u32,
    /// When it was due.
    pub due_ms: i64,
    /// Ready to append: same id, delay headers removed, `deliver_at_ms` kept.
    pub record: RecordInput,
}

/// What [`DelayStore::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelayRecovery {
    /// Pending delays (loaded or not).
    pub pending: u64,
    /// Bucket journals (and re-indexed buckets) found.
    pub buckets: usize,
    /// Buckets loaded into memory.
    pub loaded_buckets: usize,
    /// Timer-log records re-indexed from the watermark.
    pub reindexed_records: u64,
    /// Timer-log records without valid delay headers (skipped).
    pub skipped_records: u64,
    /// The watermark found in the meta journal.
    pub watermark: u64,
    /// Bucket entries (schedules and tombstones) dropped because they
    /// name timer-log offsets that recovery cut (see "Timer log cut").
    pub stale_entries_dropped: u64,
    /// Live schedule entries written without their destination (kind `1`,
    /// by an older version) whose destination was read from the timer log
    /// (their buckets are rewritten with it).
    pub destinations_resolved: u64,
    /// Wall time of the open.
    pub elapsed: Duration,
}

/// A destination (topic, partition), interned in [`Destinations`].
type Dest = u32;

/// Every destination a delay of this process named, interned, with how
/// many delays are pending for it (see "Counts per destination").
#[derive(Debug, Default)]
struct Destinations {
    /// topic -> partition -> its [`Dest`].
    index: HashMap<Arc<str>, HashMap<u32, Dest>>,
    /// Indexed by [`Dest`]: the destination.
    names: Vec<(Arc<str>, u32)>,
    /// Indexed by [`Dest`]: pending delays.
    pending: Vec<u64>,
}

impl Destinations {
    fn intern(&mut self, topic: &str, partition: u32) -> Dest {
        if let Some(&dest) = self.index.get(topic).and_then(|p| p.get(&partition)) {
            return dest;
        }
        let topic: Arc<str> = match self.index.get_key_value(topic) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(topic),
        };
        let dest = self.names.len() as Dest;
        self.names.push((Arc::clone(&topic), partition));
        self.pending.push(0);
        self.index.entry(topic).or_default().insert(partition, dest);
        dest
    }

    fn name(&self, dest: Dest) -> Option<(&str, u32)> {
        self.names
            .get(dest as usize)
            .map(|(topic, partition)| (&**topic, *partition))
    }

    /// One more pending delay for `dest` (`None`: a destination unknown).
    fn add(&mut self, dest: Option<Dest>) {
        if let Some(count) = dest.and_then(|dest| self.pending.get_mut(dest as usize)) {
            *count += 1;
        }
    }

    /// One pending delay less for `dest`.
    fn remove(&mut self, dest: Option<Dest>) {
        if let Some(count) = dest.and_then(|dest| self.pending.get_mut(dest as usize)) {
            *count = count.saturating_sub(1);
        }
    }

    /// (partition, pending delays) of every partition of `topic` with any.
    /// (topic, partition, pending delays) of every destination with any.
    fn pending_everywhere(&self) -> Vec<(Arc<str>, u32, u64)> {
        self.names
            .iter()
            .zip(&self.pending)
            .filter(|(_, &count)| count > 0)
            .map(|((topic, partition), &count)| (Arc::clone(topic), *partition, count))
            .collect()
    }

    fn pending_in_topic(&self, topic: &str) -> Vec<(u32, u64)> {
        let mut counts: Vec<(u32, u64)> = self
            .index
            .get(topic)
            .into_iter()
            .flatten()
            .filter_map(|(&partition, &dest)| {
                let count = self.pending.get(dest as usize).copied().unwrap_or(0);
                (count > 0).then_some((partition, count))
            })
            .collect();
        counts.sort_unstable();
        counts
    }
}

/// A due entry waiting to be staged: (due, seq, offset, id, destination);
/// ordered by due time, then by when it became ready.
type ReadyEntry = (i64, u64, u64, MessageId, Option<Dest>);

/// Timer-log records read by one `fetch`, in offset order: taken by
/// offset (a binary search, no hashing of each of a burst's records).
#[derive(Debug, Default)]
struct FetchedRecords {
    offsets: Vec<u64>,
    records: Vec<Option<Record>>,
}

impl FetchedRecords {
    /// Adds a record past every earlier one.
    fn push(&mut self, record: Record) {
        if self
            .offsets
            .last()
            .is_some_and(|last| *last >= record.offset)
        {
            // Out of order (never, from one sweep): keep the first.
            return;
        }
        self.offsets.push(record.offset);
        self.records.push(Some(record));
    }

    /// The record at `offset`, unless taken.
    fn get(&self, offset: &u64) -> Option<&Record> {
        self.slot(offset)
            .and_then(|index| self.records[index].as_ref())
    }

    /// The record at `offset`, once.
    fn take(&mut self, offset: u64) -> Option<Record> {
        self.slot(&offset)
            .and_then(|index| self.records[index].take())
    }

    fn slot(&self, offset: &u64) -> Option<usize> {
        self.offsets.binary_search(offset).ok()
    }
}

/// Due entries in (due, seq) order. The wheel fires its entries already
/// in that order, so most pushes land at the back of a plain queue (O(1));
/// only an entry that sorts before the back (an overdue one loaded from
/// disk) goes to a heap. A burst of a million due together thus costs no
/// heap sift per entry (it used to: 8 % of the dispatcher's thread).
#[derive(Debug, Default)]
struct ReadyQueue {
    in_order: VecDeque<ReadyEntry>,
    out_of_order: BinaryHeap<Reverse<ReadyEntry>>,
}

impl ReadyQueue {
    fn push(&mut self, entry: ReadyEntry) {
        match self.in_order.back() {
            Some(back) if entry < *back => self.out_of_order.push(Reverse(entry)),
            _ => self.in_order.push_back(entry),
        }
    }

    fn peek(&self) -> Option<&ReadyEntry> {
        match (self.in_order.front(), self.out_of_order.peek()) {
            (Some(a), Some(Reverse(b))) => Some(if b < a { b } else { a }),
            (a, b) => a.or(b.map(|Reverse(b)| b)),
        }
    }

    fn pop(&mut self) -> Option<ReadyEntry> {
        let from_heap = match (self.in_order.front(), self.out_of_order.peek()) {
            (Some(a), Some(Reverse(b))) => b < a,
            (None, Some(_)) => true,
            _ => false,
        };
        if from_heap {
            self.out_of_order.pop().map(|Reverse(entry)| entry)
        } else {
            self.in_order.pop_front()
        }
    }

    fn len(&self) -> usize {
        self.in_order.len() + self.out_of_order.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A schedule entry of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    due_ms: i64,
    offset: u64,
    id: MessageId,
    flags: u8,
    /// Where it goes; `None` for an entry written without it (kind `1`)
    /// whose timer-log record could not be read.
    dest: Option<Dest>,
}

/// What the wheel holds per timer.
#[derive(Debug, Clone, Copy)]
struct WheelItem {
    offset: u64,
    id: MessageId,
    seq: u64,
    dest: Option<Dest>,
}

/// A loaded pending entry: in the wheel (`timer` set) or fired into `ready`.
/// Keyed by its timer-log offset in `DelayStore::loaded`.
#[derive(Debug, Clone, Copy)]
struct LoadedSlot {
    id: MessageId,
    due_ms: i64,
    timer: Option<TimerId>,
    dest: Option<Dest>,
}

#[derive(Debug)]
struct Bucket {
    /// Pending (not polled, not cancelled) entries, loaded or not.
    pending: u64,
    /// Polled, not yet marked fired.
    inflight: u64,
    /// Lower bound of the pending due times.
    min_due_ms: i64,
    /// Lower bound of the pending entries' timer-log offsets (what
    /// [`DelayStore::reclaimable_below`] keeps of an unloaded bucket).
    min_offset: u64,
    loaded: bool,
    /// Open while loaded (or briefly while written).
    journal: Option<Box<dyn Journal>>,
    /// The open journal has appends not yet synced.
    unsynced: bool,
    /// Schedule entries not yet in the journal (unloaded buckets only).
    buffered: Vec<Entry>,
}

impl Bucket {
    fn new(loaded: bool) -> Bucket {
        Bucket {
            pending: 0,
            inflight: 0,
            min_due_ms: i64::MAX,
            min_offset: u64::MAX,
            loaded,
            journal: None,
            unsynced: false,
            buffered: Vec::new(),
        }
    }
}

/// The live contents of one bucket journal.
#[derive(Debug, Default)]
struct BucketContents {
    scheduled: HashMap<u64, Entry>,
    dead: HashSet<u64>,
}

impl BucketContents {
    fn is_live(&self, offset: u64) -> bool {
        self.scheduled.contains_key(&offset) && !self.dead.contains(&offset)
    }

    fn live(&self) -> impl Iterator<Item = &Entry> {
        self.scheduled
            .values()
            .filter(|entry| !self.dead.contains(&entry.offset))
    }
}

/// The durable delayed-message store. See the module documentation.
#[derive(Debug)]
pub struct DelayStore {
    storage: Arc<dyn Storage>,
    layout: DelayLayout,
    config: DelayConfig,
    timer: Arc<dyn PartitionLog>,
    meta: Box<dyn Journal>,
    buckets: BTreeMap<i64, Bucket>,
    /// Every bucket starting below is loaded; every one at or above is not.
    /// A multiple of the bucket width.
    horizon_ms: i64,
    wheel: TimingWheel<WheelItem>,
    ready: ReadyQueue,
    /// Due entries with their records read, in due order: (offset,
    /// destination, message).
    staged: VecDeque<(u64, Option<Dest>, DueMessage)>,
    cancelled_ready: HashSet<u64>,
    /// Loaded pending entries by timer-log offset: a burst fires in
    /// nearly offset order, so its removals walk the tree's nodes in
    /// order instead of missing the cache once per message (as probes of
    /// a million-entry map keyed by id did).
    loaded: BTreeMap<u64, LoadedSlot>,
    inflight: HashMap<MessageId, (i64, u64)>,
    foreign: HashMap<MessageId, (i64, u64)>,
    pending_total: u64,
    /// Pending delays per destination (their sum is `pending_total` less
    /// the entries whose destination is unknown).
    destinations: Destinations,
    buffered_total: usize,
    next_seq: u64,
    fired_lost: u64,
    /// Timer-log batches appended by `schedule_append` and not yet
    /// committed or aborted, by base offset (a count: offsets are unique,
    /// but a cut log could reuse one).
    uncommitted: BTreeMap<u64, u32>,
    /// Followed timer logs: every record below is indexed (or applied).
    indexed_end: u64,
    /// The watermark on disk: a reopen re-indexes the timer log from it.
    watermark: u64,
}

/// Delayed messages appended to the timer log, not yet pending: see
/// [`DelayStore::schedule_append`].
#[derive(Debug)]
pub struct PendingSchedule {
    info: AppendInfo,
    /// (due, id given by the caller, destination) per record.
    dues: Vec<(i64, bool, Dest)>,
}

impl PendingSchedule {
    /// The timer-log append to wait for.
    pub fn append_info(&self) -> &AppendInfo {
        &self.info
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.dues.len()
    }

    /// True if it holds no message (never: `schedule_append` refuses that).
    pub fn is_empty(&self) -> bool {
        self.dues.is_empty()
    }
}

fn bucket_name(prefix: &str, start: i64) -> String {
    format!("{prefix}{start:020}")
}

fn corrupt(journal: &str, reason: impl Into<String>) -> DelayError {
    DelayError::CorruptJournal {
        journal: journal.to_string(),
        reason: reason.into(),
    }
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let slice = bytes.get(at..at + 8)?;
    let mut array = [0u8; 8];
    array.copy_from_slice(slice);
    Some(u64::from_le_bytes(array))
}

/// Payloads of `kind` holding `count` entries, each payload's header
/// followed by `prefix` (a kind-4 destination; empty otherwise).
fn encode_payloads(
    kind: u8,
    count: usize,
    prefix: &[u8],
    mut entry: impl FnMut(usize, &mut Vec<u8>),
) -> Vec<Vec<u8>> {
    let entry_len = if matches!(kind, KIND_SCHEDULE | KIND_SCHEDULE_TO) {
        SCHEDULE_ENTRY_LEN
    } else {
        TOMBSTONE_ENTRY_LEN
    };
    let mut payloads = Vec::new();
    let mut first = 0;
    while first < count {
        let n = (count - first).min(ENTRIES_PER_PAYLOAD_MAX);
        let mut payload = Vec::with_capacity(PAYLOAD_HEADER_LEN + prefix.len() + n * entry_len);
        payload.push(FORMAT_VERSION);
        payload.push(kind);
        payload.extend_from_slice(&(n as u32).to_le_bytes());
        payload.extend_from_slice(prefix);
        for i in first..first + n {
            entry(i, &mut payload);
        }
        payloads.push(payload);
        first += n;
    }
    payloads
}

/// Schedule payloads for `entries`: one kind-4 run per destination, and
/// kind 1 for entries whose destination is unknown (or a topic name that
/// does not fit the format: resolved again at the next open).
fn encode_schedule(entries: &[Entry], destinations: &Destinations) -> Vec<Vec<u8>> {
    let mut runs: Vec<(Option<Dest>, Vec<&Entry>)> = Vec::new();
    let mut run_of: HashMap<Option<Dest>, usize> = HashMap::new();
    for entry in entries {
        let run = *run_of.entry(entry.dest).or_insert_with(|| {
            runs.push((entry.dest, Vec::new()));
            runs.len() - 1
        });
        runs[run].1.push(entry);
    }
    let mut payloads = Vec::new();
    for (dest, entries) in runs {
        let prefix = dest
            .and_then(|dest| destinations.name(dest))
            .filter(|(topic, _)| (1..=TOPIC_LEN_MAX).contains(&topic.len()))
            .map(|(topic, partition)| {
                let mut prefix = Vec::with_capacity(DESTINATION_HEADER_LEN + topic.len());
                prefix.extend_from_slice(&partition.to_le_bytes());
                prefix.push(topic.len() as u8);
                prefix.extend_from_slice(topic.as_bytes());
                prefix
            });
        let kind = if prefix.is_some() {
            KIND_SCHEDULE_TO
        } else {
            KIND_SCHEDULE
        };
        let prefix = prefix.unwrap_or_default();
        payloads.extend(encode_payloads(kind, entries.len(), &prefix, |i, out| {
            let entry = entries[i];
            out.extend_from_slice(&entry.due_ms.to_le_bytes());
            out.extend_from_slice(&entry.offset.to_le_bytes());
            out.extend_from_slice(entry.id.as_bytes());
            out.push(entry.flags);
        }));
    }
    payloads
}

fn encode_tombstones(kind: u8, offsets: &[u64]) -> Vec<Vec<u8>> {
    encode_payloads(kind, offsets.len(), &[], |i, out| {
        out.extend_from_slice(&offsets[i].to_le_bytes());
    })
}

/// The destination at the start of a kind-4 payload's body, interned, and
/// the entries after it.
fn decode_destination<'a>(
    journal: &str,
    body: &'a [u8],
    destinations: &mut Destinations,
) -> Result<(Dest, &'a [u8])> {
    let (Some(partition), Some(&len)) = (body.get(0..4), body.get(4)) else {
        return Err(corrupt(journal, "payload shorter than its destination"));
    };
    let partition = u32::from_le_bytes([partition[0], partition[1], partition[2], partition[3]]);
    let end = DESTINATION_HEADER_LEN + usize::from(len);
    let (Some(topic), Some(rest)) = (body.get(DESTINATION_HEADER_LEN..end), body.get(end..)) else {
        return Err(corrupt(journal, "destination topic past the payload"));
    };
    let topic = std::str::from_utf8(topic)
        .ok()
        .filter(|topic| !topic.is_empty())
        .ok_or_else(|| corrupt(journal, "destination topic empty or not UTF-8"))?;
    Ok((destinations.intern(topic, partition), rest))
}

/// Decodes one bucket journal's payloads, interning the destinations they
/// name. Never panics on any bytes.
fn decode_bucket(
    journal: &str,
    payloads: &[Vec<u8>],
    destinations: &mut Destinations,
) -> Result<BucketContents> {
    let mut contents = BucketContents::default();
    for payload in payloads {
        let (Some(&version), Some(&kind), Some(count)) = (
            payload.first(),
            payload.get(1),
            payload.get(2..PAYLOAD_HEADER_LEN),
        ) else {
            return Err(corrupt(journal, "payload shorter than its header"));
        };
        if version != FORMAT_VERSION {
            return Err(corrupt(
                journal,
                format!("unknown format version {version}"),
            ));
        }
        let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let entry_len = match kind {
            KIND_SCHEDULE | KIND_SCHEDULE_TO => SCHEDULE_ENTRY_LEN,
            KIND_CANCEL | KIND_FIRED => TOMBSTONE_ENTRY_LEN,
            other => return Err(corrupt(journal, format!("unknown entry kind {other}"))),
        };
        let mut body = &payload[PAYLOAD_HEADER_LEN..];
        let mut dest = None;
        if kind == KIND_SCHEDULE_TO {
            let (found, rest) = decode_destination(journal, body, destinations)?;
            dest = Some(found);
            body = rest;
        }
        if Some(body.len()) != count.checked_mul(entry_len) {
            return Err(corrupt(
                journal,
                format!("{count} entries of kind {kind} in {} bytes", body.len()),
            ));
        }
        for raw in body.chunks_exact(entry_len) {
            if matches!(kind, KIND_SCHEDULE | KIND_SCHEDULE_TO) {
                let (Some(due), Some(offset), Some(id), Some(&flags)) =
                    (u64_at(raw, 0), u64_at(raw, 8), raw.get(16..32), raw.get(32))
                else {
                    return Err(corrupt(journal, "short schedule entry"));
                };
                if flags & !FLAG_FOREIGN_ID != 0 {
                    return Err(corrupt(journal, format!("unknown entry flags {flags:#x}")));
                }
                let mut id_bytes = [0u8; 16];
                id_bytes.copy_from_slice(id);
                // A duplicate entry (re-indexing) never forgets a known
                // destination.
                let dest = dest.or_else(|| contents.scheduled.get(&offset).and_then(|e| e.dest));
                contents.scheduled.insert(
                    offset,
                    Entry {
                        due_ms: due as i64,
                        offset,
                        id: MessageId(id_bytes),
                        flags,
                        dest,
                    },
                );
            } else {
                let Some(offset) = u64_at(raw, 0) else {
                    return Err(corrupt(journal, "short tombstone"));
                };
                contents.dead.insert(offset);
            }
        }
    }
    Ok(contents)
}

fn encode_meta(watermark: u64, bucket_width_ms: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(META_LEN);
    payload.push(FORMAT_VERSION);
    payload.push(KIND_WATERMARK);
    payload.extend_from_slice(&watermark.to_le_bytes());
    payload.extend_from_slice(&bucket_width_ms.to_le_bytes());
    payload
}

fn decode_meta(name: &str, payload: &[u8]) -> Result<(u64, u64)> {
    if payload.len() != META_LEN || payload[0] != FORMAT_VERSION || payload[1] != KIND_WATERMARK {
        return Err(corrupt(name, "bad watermark payload"));
    }
    let (Some(watermark), Some(width)) = (u64_at(payload, 2), u64_at(payload, 10)) else {
        return Err(corrupt(name, "short watermark payload"));
    };
    if width == 0 || width > i64::MAX as u64 / 4 {
        return Err(corrupt(name, format!("bucket width {width}")));
    }
    Ok((watermark, width))
}

/// The destination named by a timer-log record, if its headers are valid.
pub fn destination(record: &Record) -> Option<(String, u32)> {
    let mut topic = None;
    let mut partition = None;
    for (name, value) in &record.headers {
        if name.as_ref() == TOPIC_HEADER.as_bytes() {
            topic = std::str::from_utf8(value).ok().map(str::to_string);
        } else if name.as_ref() == PARTITION_HEADER.as_bytes() {
            let bytes: [u8; 4] = value.as_ref().try_into().ok()?;
            partition = Some(u32::from_le_bytes(bytes));
        }
    }
    Some((topic?, partition?))
}

fn is_delay_header(name: &[u8]) -> bool {
    name == TOPIC_HEADER.as_bytes()
        || name == PARTITION_HEADER.as_bytes()
        || name == CALLER_ID_HEADER.as_bytes()
        || name == SETTLED_HEADER.as_bytes()
}

/// The timer-log record of a delayed message for `topic`/`partition`: the
/// caller's record with the delay headers added and `deliver_at_ms` set
/// (`None` on input: `now_ms`). Refuses a bad topic name and records that
/// carry a reserved header.
pub fn timer_record(
    topic: &str,
    partition: u32,
    mut record: RecordInput,
    now_ms: i64,
) -> Result<RecordInput> {
    check_delayed(topic, &record)?;
    record.deliver_at_ms = Some(record.deliver_at_ms.unwrap_or(now_ms));
    record.headers.push((
        Bytes::from_static(TOPIC_HEADER.as_bytes()),
        Bytes::copy_from_slice(topic.as_bytes()),
    ));
    record.headers.push((
        Bytes::from_static(PARTITION_HEADER.as_bytes()),
        Bytes::copy_from_slice(&partition.to_le_bytes()),
    ));
    if record.id.is_some() {
        record.headers.push((
            Bytes::from_static(CALLER_ID_HEADER.as_bytes()),
            Bytes::new(),
        ));
    }
    Ok(record)
}

fn check_delayed(topic: &str, record: &RecordInput) -> Result<()> {
    if topic.is_empty() || topic.len() > TOPIC_LEN_MAX {
        return Err(DelayError::InvalidInput(format!("topic name {topic:?}")));
    }
    if record.headers.iter().any(|(name, _)| is_delay_header(name)) {
        return Err(DelayError::InvalidInput(format!(
            "headers {TOPIC_HEADER}, {PARTITION_HEADER}, {CALLER_ID_HEADER} and \
             {SETTLED_HEADER} are reserved"
        )));
    }
    Ok(())
}

/// The settle marker saying `settled` delays fired or were cancelled, to
/// append to a followed timer log (see "Followed timer logs").
pub fn settle_record(kind: SettleKind, settled: &[Settled]) -> RecordInput {
    let mut value = Vec::with_capacity(1 + settled.len() * SETTLE_ENTRY_LEN);
    value.push(match kind {
        SettleKind::Fired => SETTLE_FIRED,
        SettleKind::Cancelled => SETTLE_CANCELLED,
    });
    for entry in settled {
        value.extend_from_slice(&entry.offset.to_le_bytes());
        value.extend_from_slice(&entry.due_ms.to_le_bytes());
        value.extend_from_slice(&entry.id.0);
    }
    RecordInput {
        headers: vec![(Bytes::from_static(SETTLED_HEADER.as_bytes()), Bytes::new())],
        ..RecordInput::new(value)
    }
}

/// A settle marker's contents: `None` if `record` is not one, `Some(Err)`
/// if it is one that does not decode.
fn decode_settle(record: &Record) -> Option<Result<(SettleKind, Vec<Settled>), String>> {
    if !record
        .headers
        .iter()
        .any(|(name, _)| name.as_ref() == SETTLED_HEADER.as_bytes())
    {
        return None;
    }
    let value = record.value.as_ref();
    let kind = match value.first() {
        Some(&SETTLE_FIRED) => SettleKind::Fired,
        Some(&SETTLE_CANCELLED) => SettleKind::Cancelled,
        other => return Some(Err(format!("settle kind {other:?}"))),
    };
    let entries = &value[1..];
    if entries.len() % SETTLE_ENTRY_LEN != 0 {
        return Some(Err(format!("settle entries of {} bytes", entries.len())));
    }
    let settled = entries
        .chunks_exact(SETTLE_ENTRY_LEN)
        .map(|entry| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&entry[16..32]);
            Settled {
                offset: u64_at(entry, 0).unwrap_or_default(),
                due_ms: u64_at(entry, 8).unwrap_or_default() as i64,
                id: MessageId(id),
            }
        })
        .collect();
    Some(Ok((kind, settled)))
}

impl DelayStore {
    /// Opens the store ([`DelayLayout::LOCAL`]), restoring every pending
    /// delay from `storage`.
    pub fn open(
        storage: Arc<dyn Storage>,
        config: DelayConfig,
        now_ms: i64,
    ) -> Result<(DelayStore, DelayRecovery)> {
        DelayStore::open_at(storage, DelayLayout::LOCAL, config, now_ms)
    }

    /// Opens the store laid out as `layout`, restoring every pending delay
    /// from `storage`. A followed timer log that ends below the watermark
    /// is [`DelayError::TimerBehind`] (never a cut: a replicated log keeps
    /// what it committed).
    pub fn open_at(
        storage: Arc<dyn Storage>,
        layout: DelayLayout,
        config: DelayConfig,
        now_ms: i64,
    ) -> Result<(DelayStore, DelayRecovery)> {
        let started = Instant::now();
        config.validate()?;
        let mut config = config;
        let timer = storage.partition(layout.timer_topic, 0)?;
        let (meta, meta_payloads) = storage.open_journal(layout.meta_journal)?;
        let mut watermark = 0;
        if let Some(last) = meta_payloads.last() {
            let (stored_watermark, width) = decode_meta(layout.meta_journal, last)?;
            if width != config.bucket_width_ms {
                tracing::warn!(
                    configured = config.bucket_width_ms,
                    on_disk = width,
                    "delay buckets keep the width they were written with"
                );
                config.bucket_width_ms = width;
            }
            watermark = stored_watermark;
        }
        let end = timer.end_offset();
        if layout.followed && watermark > end {
            return Err(DelayError::TimerBehind { watermark, end });
        }
        let mut store = DelayStore {
            storage,
            layout,
            wheel: TimingWheel::new(config.tick_ms, now_ms),
            config,
            timer,
            meta,
            buckets: BTreeMap::new(),
            horizon_ms: 0,
            ready: ReadyQueue::default(),
            staged: VecDeque::new(),
            cancelled_ready: HashSet::new(),
            loaded: BTreeMap::new(),
            inflight: HashMap::new(),
            foreign: HashMap::new(),
            pending_total: 0,
            destinations: Destinations::default(),
            buffered_total: 0,
            next_seq: 0,
            fired_lost: 0,
            uncommitted: BTreeMap::new(),
            indexed_end: end,
            watermark,
        };
        let mut recovery = DelayRecovery {
            watermark,
            ..DelayRecovery::default()
        };

        // 0. Recovery may have cut the timer log (a power loss under a lazy
        //    fsync policy): bucket entries and tombstones at or above its end
        //    name lost records, and new records will take those offsets.
        //    They are dropped from the buckets (step 2; cancel tombstones are
        //    synced without a watermark, so any bucket may hold some), and a
        //    watermark past the end moves down to it (durably, after the
        //    buckets).
        let timer_cut = watermark > end;
        if timer_cut {
            tracing::warn!(
                watermark,
                timer_log_end = end,
                "the delay timer log was cut at recovery: entries past its end are dropped"
            );
            watermark = end;
        }

        // 1. Re-index the timer log above the watermark (a followed log's
        //    settle markers are applied once the buckets are read, step 3).
        let mut reindexed: BTreeMap<i64, Vec<Entry>> = BTreeMap::new();
        let mut settles = Vec::new();
        let mut offset = watermark.max(store.timer.start_offset());
        while offset < end {
            let records = store.timer.read(offset, READ_CHUNK_RECORDS)?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            for record in &records {
                match store.read_timer_record(record) {
                    Some(TimerRecord::Settle(kind, settled)) => settles.push((kind, settled)),
                    Some(TimerRecord::Schedule(entry)) => {
                        reindexed
                            .entry(store.bucket_start(entry.due_ms))
                            .or_default()
                            .push(entry);
                        recovery.reindexed_records += 1;
                    }
                    None => recovery.skipped_records += 1,
                }
            }
        }

        // 2. Read every bucket, in time order, merging the re-indexed tail.
        let mut starts: BTreeSet<i64> = reindexed.keys().copied().collect();
        for name in store.storage.list_journals(store.layout.bucket_prefix)? {
            match name
                .strip_prefix(store.layout.bucket_prefix)
                .and_then(|start| start.parse::<i64>().ok())
            {
                Some(start) if start >= 0 => {
                    starts.insert(start);
                }
                _ => tracing::warn!(journal = name, "ignoring a journal with a foreign name"),
            }
        }
        let target = store.target_horizon(now_ms);
        let mut loading = true;
        store.horizon_ms = target;
        for start in starts {
            let name = bucket_name(store.layout.bucket_prefix, start);
            let (mut journal, payloads) = store.storage.open_journal(&name)?;
            let mut contents = decode_bucket(&name, &payloads, &mut store.destinations)?;
            drop(payloads);
            {
                let before = contents.scheduled.len() + contents.dead.len();
                contents.scheduled.retain(|offset, _| *offset < end);
                contents.dead.retain(|offset| *offset < end);
                let dropped = before - contents.scheduled.len() - contents.dead.len();
                let resolved = store.resolve_destinations(&mut contents)?;
                if dropped > 0 || resolved > 0 {
                    let scheduled: Vec<Entry> = contents.scheduled.values().copied().collect();
                    let dead: Vec<u64> = contents.dead.iter().copied().collect();
                    let mut payloads = encode_schedule(&scheduled, &store.destinations);
                    payloads.extend(encode_tombstones(KIND_FIRED, &dead));
                    journal.rewrite(&payloads)?;
                    recovery.stale_entries_dropped += dropped as u64;
                    recovery.destinations_resolved += resolved;
                }
            }
            let mut fresh = reindexed.remove(&start).unwrap_or_default();
            fresh.retain(|entry| {
                !contents.scheduled.contains_key(&entry.offset)
                    && !contents.dead.contains(&entry.offset)
            });
            let pending = contents.live().count() + fresh.len();
            if pending == 0 && start >= target {
                // Nothing live and not in the window: leave it for removal.
                let mut bucket = Bucket::new(false);
                bucket.journal = None;
                store.buckets.insert(start, bucket);
                continue;
            }
            let load = loading
                && start < target
                && (store.loaded_len() == 0
                    || store.loaded_len() + pending <= store.config.loaded_entries_max);
            if loading && start < target && !load {
                loading = false;
                store.horizon_ms = start;
            }
            let mut bucket = Bucket::new(load);
            let live: Vec<Entry> = contents
                .live()
                .copied()
                .chain(fresh.iter().copied())
                .collect();
            for entry in &live {
                bucket.pending += 1;
                bucket.min_due_ms = bucket.min_due_ms.min(entry.due_ms);
                bucket.min_offset = bucket.min_offset.min(entry.offset);
                store.destinations.add(entry.dest);
                if entry.flags & FLAG_FOREIGN_ID != 0 {
                    store.foreign.insert(entry.id, (start, entry.offset));
                }
            }
            store.pending_total += bucket.pending;
            store.buffered_total += fresh.len();
            if load {
                let mut journal = journal;
                for payload in encode_schedule(&fresh, &store.destinations) {
                    journal.append(&payload);
                }
                bucket.unsynced = !fresh.is_empty();
                bucket.journal = Some(journal);
                recovery.loaded_buckets += 1;
                for entry in &live {
                    store.insert_loaded(entry);
                }
            } else {
                bucket.buffered = fresh;
            }
            store.buckets.insert(start, bucket);
        }
        if timer_cut {
            store
                .meta
                .rewrite(&[encode_meta(watermark, store.config.bucket_width_ms)])?;
        }
        // 3. Settle markers above the watermark (their tombstones may not
        //    have been synced).
        for (kind, settled) in settles {
            store.apply_settle(kind, settled)?;
        }
        recovery.buckets = store.buckets.len();
        recovery.pending = store.pending_total;
        if store.buffered_total >= store.config.buffered_entries_max {
            store.flush()?;
        }
        recovery.elapsed = started.elapsed();
        tracing::info!(?recovery, "delay store opened");
        Ok((store, recovery))
    }

    /// Schedules messages: `(topic, partition, record)`, due at
    /// `record.deliver_at_ms` (`None`: now). Returns once the timer-log append
    /// is durable, with the id of each message, in order:
    /// [`schedule_append`](Self::schedule_append), the durability wait and
    /// [`schedule_commit`](Self::schedule_commit) in one call.
    pub fn schedule(
        &mut self,
        entries: Vec<(String, u32, RecordInput)>,
        now_ms: i64,
    ) -> Result<Vec<MessageId>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let pending = self.schedule_append(entries, now_ms)?;
        if let Err(error) = self.timer.wait_durable(&pending.info) {
            self.schedule_abort(pending);
            return Err(error.into());
        }
        self.schedule_commit(pending)
    }

    /// The first half of [`schedule`](Self::schedule): checks the entries
    /// and appends them to the timer log without waiting for durability.
    /// The messages are not pending yet: the caller waits for
    /// [`PendingSchedule::append_info`]'s durability on the
    /// [`timer_log`](Self::timer_log) (on any thread), then calls
    /// [`schedule_commit`](Self::schedule_commit), or
    /// [`schedule_abort`](Self::schedule_abort) if the wait failed. Until
    /// then the watermark stays below them, so that a crash after the
    /// commit and before the next flush still finds them by re-indexing.
    pub fn schedule_append(
        &mut self,
        entries: Vec<(String, u32, RecordInput)>,
        now_ms: i64,
    ) -> Result<PendingSchedule> {
        if entries.is_empty() {
            return Err(DelayError::InvalidInput("nothing to schedule".into()));
        }
        if self.layout.followed {
            return Err(DelayError::InvalidInput(
                "this store follows a timer log others write: schedule by appending to it".into(),
            ));
        }
        let mut records = Vec::with_capacity(entries.len());
        // Every entry checked before any destination is interned.
        for (topic, _, record) in &entries {
            check_delayed(topic, record)?;
        }
        let mut dues = Vec::with_capacity(entries.len());
        for (topic, partition, record) in entries {
            let dest = self.destinations.intern(&topic, partition);
            let record = timer_record(&topic, partition, record, now_ms)?;
            dues.push((
                record.deliver_at_ms.unwrap_or(now_ms),
                record.id.is_some(),
                dest,
            ));
            records.push(record);
        }
        let info = self.timer.append_deferred(0, 0, records)?;
        if info.ids.len() != dues.len() {
            return Err(DelayError::Store(StoreError::Log(
                dmq_log_store::LogError::InvalidBatch(format!(
                    "timer log returned {} ids for {} records",
                    info.ids.len(),
                    dues.len()
                )),
            )));
        }
        *self.uncommitted.entry(info.base_offset).or_default() += 1;
        Ok(PendingSchedule { info, dues })
    }

    /// The timer log, for the durability wait between
    /// [`schedule_append`](Self::schedule_append) and
    /// [`schedule_commit`](Self::schedule_commit).
    pub fn timer_log(&self) -> Arc<dyn PartitionLog> {
        Arc::clone(&self.timer)
    }

    /// Makes appended messages pending, once their timer-log append is
    /// durable; returns their ids, in order.
    pub fn schedule_commit(&mut self, pending: PendingSchedule) -> Result<Vec<MessageId>> {
        self.forget_uncommitted(pending.info.base_offset);
        let mut ids = Vec::with_capacity(pending.dues.len());
        let mut by_bucket: BTreeMap<i64, Vec<Entry>> = BTreeMap::new();
        for ((offset, id), (due_ms, foreign, dest)) in
            pending.info.records().into_iter().zip(pending.dues)
        {
            ids.push(id);
            let entry = Entry {
                due_ms,
                offset,
                id,
                flags: if foreign { FLAG_FOREIGN_ID } else { 0 },
                dest: Some(dest),
            };
            by_bucket
                .entry(self.bucket_start(due_ms))
                .or_default()
                .push(entry);
        }
        for (start, entries) in by_bucket {
            self.add_entries(start, entries)?;
        }
        if self.buffered_total >= self.config.buffered_entries_max {
            self.flush()?;
        }
        Ok(ids)
    }

    /// Gives up appended messages whose durability wait failed: they never
    /// fire in this process, and a cancel tombstone (synced, best effort)
    /// keeps a restart that re-indexes the timer log from firing them.
    pub fn schedule_abort(&mut self, pending: PendingSchedule) {
        self.forget_uncommitted(pending.info.base_offset);
        let mut by_bucket: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
        for ((offset, _), (due_ms, _, _)) in pending.info.records().into_iter().zip(pending.dues) {
            by_bucket
                .entry(self.bucket_start(due_ms))
                .or_default()
                .push(offset);
        }
        for (start, offsets) in by_bucket {
            if let Err(error) = self.append_tombstones(start, KIND_CANCEL, &offsets, true) {
                tracing::error!(%error, "cancelling delayed messages whose append failed");
            }
        }
    }

    fn forget_uncommitted(&mut self, base_offset: u64) {
        if let Some(count) = self.uncommitted.get_mut(&base_offset) {
            *count -= 1;
            if *count == 0 {
                self.uncommitted.remove(&base_offset);
            }
        }
    }

    /// Up to `max` messages due at or before `now_ms`, in due order. Append
    /// each to its topic, then call [`DelayStore::mark_fired`].
    pub fn poll_due(&mut self, now_ms: i64, max: usize) -> Result<Vec<DueMessage>> {
        self.load_window(now_ms)?;
        let mut fired = Vec::new();
        self.wheel.advance(now_ms, &mut fired);
        // The fired entries' `loaded` slots keep their (now stale) timer
        // ids: `cancel` tells a fired timer by its generation, so a burst
        // of a million costs no probe of that map here.
        for (due_ms, item) in fired {
            self.ready
                .push((due_ms, item.seq, item.offset, item.id, item.dest));
        }
        let mut out = Vec::new();
        while out.len() < max {
            if self.staged.is_empty() && !self.stage(now_ms)? {
                break;
            }
            let Some((offset, dest, message)) = self.staged.pop_front() else {
                continue;
            };
            if self.cancelled_ready.remove(&offset) {
                continue;
            }
            if message.due_ms > now_ms {
                // The caller's clock went backwards.
                self.staged.push_front((offset, dest, message));
                break;
            }
            let start = self.bucket_start(message.due_ms);
            self.unload(offset, &message.id);
            self.forget_pending(start, &message.id, dest);
            if let Some(bucket) = self.buckets.get_mut(&start) {
                bucket.inflight += 1;
            }
            self.inflight.insert(message.id, (message.due_ms, offset));
            out.push(message);
        }
        Ok(out)
    }

    /// Moves up to `FETCH_RECORDS_MAX` due entries from `ready` to `staged`,
    /// reading their records in one sweep of the timer log. False if
    /// nothing is due.
    fn stage(&mut self, now_ms: i64) -> Result<bool> {
        let mut selected = Vec::new();
        let mut dests = Vec::new();
        while selected.len() < FETCH_RECORDS_MAX {
            let Some((due_ms, _, offset, id, dest)) = self.ready.peek().copied() else {
                break;
            };
            if due_ms > now_ms {
                break;
            }
            self.ready.pop();
            if self.cancelled_ready.remove(&offset) {
                continue;
            }
            selected.push((due_ms, offset, id));
            dests.push(dest);
        }
        if selected.is_empty() {
            return Ok(false);
        }
        let mut records = self.fetch(&selected)?;
        let mut lost: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
        for ((due_ms, offset, id), dest) in selected.into_iter().zip(dests) {
            // Taken, not cloned: the fields move into the message (an offset
            // is in `ready` once, see `insert_loaded`).
            let message = records
                .take(offset)
                .filter(|record| record.id == id)
                .and_then(|record| {
                    let destination = destination(&record)?;
                    Some((record, destination))
                });
            let Some((record, (topic, partition))) = message else {
                tracing::error!(
                    offset,
                    %id,
                    "a due delay's timer-log record is missing or damaged; dropping it"
                );
                self.fired_lost += 1;
                self.unload(offset, &id);
                let start = self.bucket_start(due_ms);
                self.forget_pending(start, &id, dest);
                lost.entry(start).or_default().push(offset);
                continue;
            };
            let mut headers = record.headers;
            headers.retain(|(name, _)| !is_delay_header(name));
            let message = DueMessage {
                id,
                topic,
                partition,
                due_ms,
                record: RecordInput {
                    id: Some(id),
                    key: record.key,
                    headers,
                    value: record.value,
                    deliver_at_ms: Some(due_ms),
                    expire_at_ms: record.expire_at_ms,
                },
            };
            self.staged.push_back((offset, dest, message));
        }
        for (start, offsets) in lost {
            self.append_tombstones(start, KIND_FIRED, &offsets, false)?;
        }
        Ok(true)
    }

    /// Records that these polled messages were appended to their topics.
    /// Lazy: durable at the next flush (a crash before it refires them).
    /// Unknown ids are ignored; returns how many were marked.
    pub fn mark_fired(&mut self, ids: &[MessageId]) -> Result<usize> {
        let mut by_bucket: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
        for id in ids {
            if let Some((due_ms, offset)) = self.inflight.remove(id) {
                by_bucket
                    .entry(self.bucket_start(due_ms))
                    .or_default()
                    .push(offset);
            }
        }
        let mut marked = 0;
        for (start, offsets) in by_bucket {
            marked += offsets.len();
            if let Some(bucket) = self.buckets.get_mut(&start) {
                bucket.inflight = bucket.inflight.saturating_sub(offsets.len() as u64);
            }
            self.append_tombstones(start, KIND_FIRED, &offsets, false)?;
        }
        if self.buffered_total >= self.config.buffered_entries_max {
            self.flush()?;
        }
        Ok(marked)
    }

    /// Cancels a pending delay, durably. True if it was pending (not yet
    /// polled); false if unknown, fired or already cancelled. A followed
    /// store cancels only through a settle marker in its timer log
    /// ([`locate`](Self::locate), [`settle_record`]).
    pub fn cancel(&mut self, id: &MessageId) -> Result<bool> {
        if self.layout.followed {
            return Err(DelayError::InvalidInput(
                "this store follows a timer log others write: cancel with a settle marker".into(),
            ));
        }
        let Some((start, offset)) = self.position_of(id)? else {
            return Ok(false);
        };
        self.settle_at(start, SettleKind::Cancelled, offset, *id, true)
    }

    /// Where delay `id` would be if pending: its bucket and timer-log
    /// offset (from the ids that came from callers, or the timer log).
    /// `None` if it is unknown or polled.
    fn position_of(&mut self, id: &MessageId) -> Result<Option<(i64, u64)>> {
        if self.inflight.contains_key(id) {
            return Ok(None);
        }
        Ok(match self.foreign.get(id) {
            Some(&(start, offset)) => Some((start, offset)),
            None => self
                .find_in_timer_log(id)?
                .map(|(due_ms, offset)| (self.bucket_start(due_ms), offset)),
        })
    }

    /// Pending delay `id` (not yet polled): where it is in the timer log
    /// and when it is due. `None` if unknown, polled, fired or cancelled.
    pub fn locate(&mut self, id: &MessageId) -> Result<Option<Settled>> {
        let Some((start, offset)) = self.position_of(id)? else {
            return Ok(None);
        };
        let found = |due_ms| Settled {
            offset,
            due_ms,
            id: *id,
        };
        if let Some(slot) = self.loaded.get(&offset) {
            return Ok((slot.id == *id).then(|| found(slot.due_ms)));
        }
        let Some(bucket) = self.buckets.get(&start) else {
            return Ok(None);
        };
        if bucket.loaded {
            // Every live entry of a loaded bucket is in `loaded`.
            return Ok(None);
        }
        if let Some(entry) = bucket.buffered.iter().find(|e| e.offset == offset) {
            return Ok(Some(found(entry.due_ms)));
        }
        let name = bucket_name(self.layout.bucket_prefix, start);
        let (_, payloads) = self.storage.open_journal(&name)?;
        let contents = decode_bucket(&name, &payloads, &mut self.destinations)?;
        Ok(contents
            .is_live(offset)
            .then(|| {
                contents
                    .scheduled
                    .get(&offset)
                    .map(|entry| found(entry.due_ms))
            })
            .flatten())
    }

    /// Settles pending delay `entry` (fired or cancelled): it is pending
    /// no more and its bucket gets a tombstone (synced if `durable`). True
    /// if it was pending; false if unknown, polled or settled already.
    fn settle(&mut self, kind: SettleKind, entry: Settled, durable: bool) -> Result<bool> {
        let start = self.bucket_start(entry.due_ms);
        self.settle_at(start, kind, entry.offset, entry.id, durable)
    }

    /// [`settle`](Self::settle) of the delay at timer-log `offset` with id
    /// `id`, in bucket `start` unless loaded (one journal read at most).
    fn settle_at(
        &mut self,
        start: i64,
        kind: SettleKind,
        offset: u64,
        id: MessageId,
        durable: bool,
    ) -> Result<bool> {
        let tombstone = match kind {
            SettleKind::Fired => KIND_FIRED,
            SettleKind::Cancelled => KIND_CANCEL,
        };
        if let BTreeEntry::Occupied(slot) = self.loaded.entry(offset) {
            if slot.get().id != id {
                return Ok(false);
            }
            let slot = slot.remove();
            // No timer, or one that already fired (the slot keeps its
            // stale id): the entry waits in `ready` (or `staged`).
            match slot.timer.and_then(|timer| self.wheel.cancel(timer)) {
                Some(_) => {}
                None => {
                    self.cancelled_ready.insert(offset);
                }
            }
            let start = self.bucket_start(slot.due_ms);
            self.forget_pending(start, &id, slot.dest);
            self.append_tombstones(start, tombstone, &[offset], durable)?;
            return Ok(true);
        }
        let Some(bucket) = self.buckets.get_mut(&start) else {
            return Ok(false);
        };
        if bucket.loaded {
            // Every live entry of a loaded bucket is in `loaded`.
            return Ok(false);
        }
        // Live: Some(its destination).
        let live = if let Some(position) = bucket
            .buffered
            .iter()
            .position(|e| e.offset == offset && e.id == id)
        {
            let buffered = bucket.buffered.swap_remove(position);
            self.buffered_total = self.buffered_total.saturating_sub(1);
            Some(buffered.dest)
        } else {
            let name = bucket_name(self.layout.bucket_prefix, start);
            let (_, payloads) = self.storage.open_journal(&name)?;
            let contents = decode_bucket(&name, &payloads, &mut self.destinations)?;
            contents
                .scheduled
                .get(&offset)
                .filter(|scheduled| scheduled.id == id && contents.is_live(offset))
                .map(|scheduled| scheduled.dest)
        };
        let Some(dest) = live else {
            return Ok(false);
        };
        self.forget_pending(start, &id, dest);
        self.append_tombstones(start, tombstone, &[offset], durable)?;
        Ok(true)
    }

    /// Followed timer logs: indexes the records appended since the last
    /// call (up to the log's end, a replica's committed end) and applies
    /// their settle markers, after loading the buckets that entered the
    /// window. Returns how many records it read.
    pub fn follow(&mut self, now_ms: i64) -> Result<FollowReport> {
        self.load_window(now_ms)?;
        let end = self.timer.end_offset();
        let mut report = FollowReport::default();
        while self.indexed_end < end {
            let from = self.indexed_end.max(self.timer.start_offset());
            let records = self.timer.read(from, READ_CHUNK_RECORDS)?;
            let Some(next) = records.last().map(|last| last.offset + 1) else {
                break;
            };
            let mut by_bucket: BTreeMap<i64, Vec<Entry>> = BTreeMap::new();
            for record in records.iter().filter(|r| r.offset >= from) {
                report.records += 1;
                match self.read_timer_record(record) {
                    Some(TimerRecord::Settle(kind, settled)) => {
                        // What came before the marker first: it may name it.
                        for (start, entries) in std::mem::take(&mut by_bucket) {
                            self.add_entries(start, entries)?;
                        }
                        let any = self.apply_settle(kind, settled)?;
                        if kind == SettleKind::Cancelled {
                            report.cancels.push((record.offset, any));
                        }
                    }
                    Some(TimerRecord::Schedule(entry)) => by_bucket
                        .entry(self.bucket_start(entry.due_ms))
                        .or_default()
                        .push(entry),
                    None => {}
                }
            }
            for (start, entries) in by_bucket {
                self.add_entries(start, entries)?;
            }
            self.indexed_end = next;
        }
        // A store that does not poll (a follower) keeps no settled entry
        // at the head of its ready queue: the leader settles in due order.
        while let Some(&(_, _, offset, ..)) = self.ready.peek() {
            if !self.cancelled_ready.remove(&offset) {
                break;
            }
            self.ready.pop();
        }
        if self.buffered_total >= self.config.buffered_entries_max {
            self.flush()?;
        }
        Ok(report)
    }

    /// Applies one settle marker's entries; true if any was pending.
    fn apply_settle(&mut self, kind: SettleKind, settled: Vec<Settled>) -> Result<bool> {
        let mut any = false;
        for entry in settled {
            any |= if entry.is_by_id() {
                match self.position_of(&entry.id)? {
                    Some((start, offset)) => {
                        self.settle_at(start, kind, offset, entry.id, false)?
                    }
                    None => false,
                }
            } else {
                self.settle(kind, entry, false)?
            };
        }
        Ok(any)
    }

    /// What timer-log record `record` is: a settle marker or a delay's
    /// schedule; `None` (logged) if it is neither (an undecodable marker,
    /// a record without valid delay headers).
    fn read_timer_record(&mut self, record: &Record) -> Option<TimerRecord> {
        match decode_settle(record) {
            Some(Ok((kind, settled))) => return Some(TimerRecord::Settle(kind, settled)),
            Some(Err(why)) => {
                tracing::error!(offset = record.offset, why, "undecodable settle marker");
                return None;
            }
            None => {}
        }
        let entry = self.entry_of(record);
        if entry.is_none() {
            tracing::error!(
                offset = record.offset,
                "timer-log record without delay headers"
            );
        }
        entry.map(TimerRecord::Schedule)
    }

    /// The schedule entry of timer-log record `record`; `None` without
    /// valid delay headers.
    fn entry_of(&mut self, record: &Record) -> Option<Entry> {
        let (topic, partition) = destination(record)?;
        let dest = self.destinations.intern(&topic, partition);
        let due_ms = record.deliver_at_ms.unwrap_or(record.timestamp_ms);
        // Records written before the caller-id header: an id whose time is
        // not the record's came from the caller (one that happens to share
        // the millisecond is taken for the log's).
        let marked = record
            .headers
            .iter()
            .any(|(name, _)| name.as_ref() == CALLER_ID_HEADER.as_bytes());
        let flags = if marked || record.id.timestamp_ms() != record.timestamp_ms {
            FLAG_FOREIGN_ID
        } else {
            0
        };
        Some(Entry {
            due_ms,
            offset: record.offset,
            id: record.id,
            flags,
            dest: Some(dest),
        })
    }

    /// The timer-log offset below which no record is needed any more:
    /// every pending or polled delay's record is at or above it, and so is
    /// everything a reopen re-indexes (the watermark) or an append not yet
    /// committed wrote. Segments wholly below may be deleted.
    pub fn reclaimable_below(&self) -> u64 {
        let mut floor = self.watermark;
        if self.layout.followed {
            floor = floor.min(self.indexed_end);
        }
        if let Some(&first) = self.uncommitted.keys().next() {
            floor = floor.min(first);
        }
        // Loaded entries (in the wheel, ready or staged) keep their slot
        // until polled; polled ones are in `inflight` until marked.
        if let Some((&first, _)) = self.loaded.first_key_value() {
            floor = floor.min(first);
        }
        for &(_, offset) in self.inflight.values() {
            floor = floor.min(offset);
        }
        // Every live entry of a loaded bucket is in `loaded`; an unloaded
        // one's are bounded below by its `min_offset`.
        for bucket in self.buckets.values() {
            if !bucket.loaded && (bucket.pending > 0 || !bucket.buffered.is_empty()) {
                floor = floor.min(bucket.min_offset);
            }
        }
        floor
    }

    /// Deletes the timer log's sealed segments wholly below
    /// [`reclaimable_below`](Self::reclaimable_below); returns how many.
    pub fn reclaim(&self) -> Result<u64> {
        let floor = self.reclaimable_below();
        if floor <= self.timer.start_offset() {
            return Ok(0);
        }
        Ok(self.timer.delete_before(floor)?)
    }

    /// Followed timer logs: every record below is indexed or applied.
    pub fn indexed_end(&self) -> u64 {
        self.indexed_end
    }

    /// The polled delays `ids` (unknown ones skipped), as a fired settle
    /// marker names them.
    pub fn polled(&self, ids: &[MessageId]) -> Vec<Settled> {
        ids.iter()
            .filter_map(|id| {
                self.inflight.get(id).map(|&(due_ms, offset)| Settled {
                    offset,
                    due_ms,
                    id: *id,
                })
            })
            .collect()
    }

    /// True if a delay scheduled with the caller's id `id` (a message
    /// moved in, such as a committed transaction's) is pending or being
    /// fired. (After a restart, a record written before the
    /// `dmq.delay.caller-id` header existed whose id carries the append's
    /// own millisecond is taken for a timer-log id and reads false.)
    pub fn holds_caller_id(&self, id: &MessageId) -> bool {
        self.foreign.contains_key(id) || self.inflight.contains_key(id)
    }

    /// Pending delays, loaded or not (polled ones are no longer pending).
    pub fn pending(&self) -> u64 {
        self.pending_total
    }

    /// Pending delays of `topic` per partition (those with any), by
    /// partition: counted as delays are scheduled, polled and cancelled,
    /// nothing read (see "Counts per destination"). A delay whose
    /// destination could not be learnt (an unreadable record of an older
    /// version's bucket) is in [`pending`](Self::pending) only.
    pub fn pending_in_topic(&self, topic: &str) -> Vec<(u32, u64)> {
        self.destinations.pending_in_topic(topic)
    }

    /// [`pending_in_topic`](Self::pending_in_topic) of every topic at once:
    /// (topic, partition, pending delays) per destination with any.
    pub fn pending_everywhere(&self) -> Vec<(Arc<str>, u32, u64)> {
        self.destinations.pending_everywhere()
    }

    /// Earliest pending due time, on disk included (may be early after far
    /// cancels, never late). `None` when nothing is pending.
    pub fn next_due_ms(&self) -> Option<i64> {
        let staged = self.staged.front().map(|(_, _, message)| message.due_ms);
        let ready = self.ready.peek().map(|(due, ..)| *due);
        let wheel = self.wheel.next_due_ms();
        let disk = self
            .buckets
            .range(self.horizon_ms..)
            .find(|(_, bucket)| bucket.pending > 0)
            .map(|(_, bucket)| bucket.min_due_ms);
        [staged, ready, wheel, disk].into_iter().flatten().min()
    }

    /// Makes every lazy write durable (index entries, fired marks), advances
    /// the watermark and removes the journals of fully fired buckets.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.flush()
    }

    /// Polled messages not yet marked fired.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Entries held in memory (wheel and ready queue).
    pub fn loaded_len(&self) -> usize {
        self.wheel.len() + self.ready.len() + self.staged.len()
    }

    /// Buckets known (on disk or about to be).
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Due delays dropped because their timer-log record was unreadable.
    pub fn lost_count(&self) -> u64 {
        self.fired_lost
    }

    fn bucket_start(&self, due_ms: i64) -> i64 {
        let width = self.config.bucket_width_ms as i64;
        due_ms.max(0).div_euclid(width) * width
    }

    /// The horizon that loads every bucket starting before `now + window`.
    fn target_horizon(&self, now_ms: i64) -> i64 {
        let width = self.config.bucket_width_ms as i64;
        let edge = now_ms.saturating_add(self.config.window_ms as i64).max(0);
        self.bucket_start(edge.saturating_sub(1))
            .saturating_add(width)
    }

    /// A pending entry of bucket `start` is pending no more (polled or
    /// cancelled).
    fn forget_pending(&mut self, start: i64, id: &MessageId, dest: Option<Dest>) {
        if let Some(bucket) = self.buckets.get_mut(&start) {
            bucket.pending = bucket.pending.saturating_sub(1);
        }
        self.pending_total = self.pending_total.saturating_sub(1);
        self.destinations.remove(dest);
        self.foreign.remove(id);
    }

    /// Gives the live entries of `contents` written without a destination
    /// (kind `1`, an older version) the one their timer-log record names,
    /// reading the records in batches; returns how many were resolved. An
    /// unreadable record leaves its entry without one (it is counted in
    /// `pending` only, and dropped as lost when due).
    fn resolve_destinations(&mut self, contents: &mut BucketContents) -> Result<u64> {
        let unknown: Vec<(i64, u64, MessageId)> = contents
            .live()
            .filter(|entry| entry.dest.is_none())
            .map(|entry| (entry.due_ms, entry.offset, entry.id))
            .collect();
        let mut resolved = 0;
        for batch in unknown.chunks(FETCH_RECORDS_MAX) {
            let records = self.fetch(batch)?;
            for (_, offset, id) in batch {
                let Some((topic, partition)) = records
                    .get(offset)
                    .filter(|record| record.id == *id)
                    .and_then(destination)
                else {
                    continue;
                };
                let dest = self.destinations.intern(&topic, partition);
                if let Some(entry) = contents.scheduled.get_mut(offset) {
                    entry.dest = Some(dest);
                    resolved += 1;
                }
            }
        }
        Ok(resolved)
    }

    /// Drops the loaded entry at `offset` if it is message `id`'s (one
    /// lookup).
    fn unload(&mut self, offset: u64, id: &MessageId) {
        if let BTreeEntry::Occupied(slot) = self.loaded.entry(offset) {
            if slot.get().id == *id {
                slot.remove();
            }
        }
    }

    fn insert_loaded(&mut self, entry: &Entry) {
        if self.loaded.contains_key(&entry.offset) {
            // Loaded already: one wheel or ready entry per offset.
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if entry.due_ms <= self.wheel.now_ms() {
            // Already due: straight to the ready queue.
            self.ready
                .push((entry.due_ms, seq, entry.offset, entry.id, entry.dest));
            self.loaded.insert(
                entry.offset,
                LoadedSlot {
                    id: entry.id,
                    due_ms: entry.due_ms,
                    timer: None,
                    dest: entry.dest,
                },
            );
            return;
        }
        let timer = self.wheel.insert(
            entry.due_ms,
            WheelItem {
                offset: entry.offset,
                id: entry.id,
                seq,
                dest: entry.dest,
            },
        );
        self.loaded.insert(
            entry.offset,
            LoadedSlot {
                id: entry.id,
                due_ms: entry.due_ms,
                timer: Some(timer),
                dest: entry.dest,
            },
        );
    }

    /// Adds freshly scheduled entries of one bucket.
    fn add_entries(&mut self, start: i64, entries: Vec<Entry>) -> Result<()> {
        if start < self.horizon_ms && !self.buckets.contains_key(&start) {
            let (journal, payloads) = self
                .storage
                .open_journal(&bucket_name(self.layout.bucket_prefix, start))?;
            let mut bucket = Bucket::new(true);
            if !payloads.is_empty() {
                // A journal left over (all dead); keep its tombstones.
                let contents = decode_bucket(
                    &bucket_name(self.layout.bucket_prefix, start),
                    &payloads,
                    &mut self.destinations,
                )?;
                if contents.live().next().is_some() {
                    return Err(corrupt(
                        &bucket_name(self.layout.bucket_prefix, start),
                        "live entries in a bucket not loaded",
                    ));
                }
            }
            bucket.journal = Some(journal);
            self.buckets.insert(start, bucket);
        }
        let bucket = self
            .buckets
            .entry(start)
            .or_insert_with(|| Bucket::new(false));
        bucket.pending += entries.len() as u64;
        self.pending_total += entries.len() as u64;
        self.buffered_total += entries.len();
        for entry in &entries {
            bucket.min_due_ms = bucket.min_due_ms.min(entry.due_ms);
            bucket.min_offset = bucket.min_offset.min(entry.offset);
            self.destinations.add(entry.dest);
        }
        for entry in &entries {
            if entry.flags & FLAG_FOREIGN_ID != 0 {
                self.foreign.insert(entry.id, (start, entry.offset));
            }
        }
        let Some(bucket) = self.buckets.get_mut(&start) else {
            return Ok(());
        };
        if bucket.loaded {
            if let Some(journal) = bucket.journal.as_mut() {
                for payload in encode_schedule(&entries, &self.destinations) {
                    journal.append(&payload);
                }
            }
            bucket.unsynced = true;
            for entry in &entries {
                self.insert_loaded(entry);
            }
        } else {
            bucket.buffered.extend(entries);
        }
        Ok(())
    }

    /// Appends tombstones to a bucket's journal (opening it if needed);
    /// syncs if `durable`.
    fn append_tombstones(
        &mut self,
        start: i64,
        kind: u8,
        offsets: &[u64],
        durable: bool,
    ) -> Result<()> {
        let name = bucket_name(self.layout.bucket_prefix, start);
        let bucket = self
            .buckets
            .entry(start)
            .or_insert_with(|| Bucket::new(false));
        let was_open = bucket.journal.is_some();
        let mut opened = None;
        let journal = match bucket.journal.as_mut() {
            Some(journal) => journal,
            None => {
                let (journal, _) = self.storage.open_journal(&name)?;
                opened.insert(journal)
            }
        };
        for payload in encode_tombstones(kind, offsets) {
            journal.append(&payload);
        }
        if durable || !was_open {
            journal.sync()?;
            if was_open {
                bucket.unsynced = false;
            }
        } else {
            bucket.unsynced = true;
            self.buffered_total += offsets.len();
        }
        Ok(())
    }

    /// Loads buckets that entered the window (bounded by `loaded_entries_max`).
    fn load_window(&mut self, now_ms: i64) -> Result<()> {
        let target = self.target_horizon(now_ms);
        while self.horizon_ms < target {
            let next = self
                .buckets
                .range(self.horizon_ms..target)
                .next()
                .map(|(start, bucket)| (*start, bucket.pending));
            let Some((start, pending)) = next else {
                self.horizon_ms = target;
                break;
            };
            let in_memory = self.loaded_len();
            if in_memory > 0 && in_memory + pending as usize > self.config.loaded_entries_max {
                self.horizon_ms = start;
                break;
            }
            self.load_bucket(start)?;
            self.horizon_ms = start + self.config.bucket_width_ms as i64;
        }
        Ok(())
    }

    fn load_bucket(&mut self, start: i64) -> Result<()> {
        let name = bucket_name(self.layout.bucket_prefix, start);
        let (mut journal, payloads) = self.storage.open_journal(&name)?;
        let contents = decode_bucket(&name, &payloads, &mut self.destinations)?;
        drop(payloads);
        let Some(bucket) = self.buckets.get_mut(&start) else {
            return Ok(());
        };
        let fresh = std::mem::take(&mut bucket.buffered);
        for payload in encode_schedule(&fresh, &self.destinations) {
            journal.append(&payload);
        }
        bucket.unsynced = !fresh.is_empty();
        bucket.journal = Some(journal);
        bucket.loaded = true;
        let live: Vec<Entry> = contents
            .live()
            .copied()
            .chain(
                fresh
                    .into_iter()
                    .filter(|e| !contents.dead.contains(&e.offset)),
            )
            .collect();
        for entry in &live {
            self.insert_loaded(entry);
        }
        Ok(())
    }

    /// Reads the timer-log records at `selected` offsets, coalescing reads.
    fn fetch(&self, selected: &[(i64, u64, MessageId)]) -> Result<FetchedRecords> {
        let mut offsets: Vec<u64> = selected.iter().map(|(_, offset, _)| *offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        let mut out = FetchedRecords::default();
        let mut i = 0;
        while i < offsets.len() {
            let first = offsets[i];
            let mut j = i;
            while j + 1 < offsets.len()
                && offsets[j + 1] - offsets[j] <= FETCH_GAP_RECORDS
                && offsets[j + 1] - first < READ_CHUNK_RECORDS as u64 * 4
            {
                j += 1;
            }
            let span = (offsets[j] - first + 1) as usize;
            let records = self.timer.read(first, span)?;
            let wanted = &offsets[i..=j];
            for record in records {
                if wanted.binary_search(&record.offset).is_ok() {
                    out.push(record);
                }
            }
            i = j + 1;
        }
        Ok(out)
    }

    /// Finds a record of the timer log by an id it assigned: (due, offset).
    fn find_in_timer_log(&self, id: &MessageId) -> Result<Option<(i64, u64)>> {
        let id_ms = id.timestamp_ms();
        let Some(mut offset) = self.timer.offset_for_timestamp(id_ms)? else {
            return Ok(None);
        };
        let mut scanned = 0;
        while scanned < self.config.cancel_scan_records_max {
            let records = self.timer.read(offset, READ_CHUNK_RECORDS)?;
            let Some(last) = records.last() else {
                return Ok(None);
            };
            offset = last.offset + 1;
            for record in &records {
                if record.timestamp_ms > id_ms {
                    return Ok(None);
                }
                if record.id == *id {
                    let due_ms = record.deliver_at_ms.unwrap_or(record.timestamp_ms);
                    return Ok(Some((due_ms, record.offset)));
                }
            }
            scanned += records.len();
        }
        tracing::warn!(%id, "gave up looking for a delay in the timer log");
        Ok(None)
    }

    /// Syncs every dirty bucket, advances the watermark, removes dead buckets.
    fn flush(&mut self) -> Result<()> {
        // Not past a record whose schedule is not committed yet: its entry
        // is in no bucket, and only re-indexing would find it again.
        let mut watermark = match self.uncommitted.keys().next() {
            Some(&first) => self.timer.end_offset().min(first),
            None => self.timer.end_offset(),
        };
        if self.layout.followed {
            // Not past what `follow` has not indexed yet.
            watermark = watermark.min(self.indexed_end);
        }
        for (&start, bucket) in self.buckets.iter_mut() {
            if bucket.pending == 0 && bucket.inflight == 0 {
                // Dead: removed below, after the watermark; no need to sync
                // its last fired marks (a crash before the removal refires
                // them at worst; its cancels were synced when made).
                continue;
            }
            if !bucket.buffered.is_empty() {
                let name = bucket_name(self.layout.bucket_prefix, start);
                let mut opened = None;
                let journal = match bucket.journal.as_mut() {
                    Some(journal) => journal,
                    None => {
                        let (journal, _) = self.storage.open_journal(&name)?;
                        opened.insert(journal)
                    }
                };
                for payload in encode_schedule(&bucket.buffered, &self.destinations) {
                    journal.append(&payload);
                }
                journal.sync()?;
                bucket.buffered = Vec::new();
                bucket.unsynced = false;
            } else if bucket.unsynced {
                if let Some(journal) = bucket.journal.as_mut() {
                    journal.sync()?;
                }
                bucket.unsynced = false;
            }
        }
        self.meta
            .rewrite(&[encode_meta(watermark, self.config.bucket_width_ms)])?;
        self.watermark = watermark;
        self.buffered_total = 0;
        // Every entry is now covered by the watermark: dead buckets can go.
        let dead: Vec<i64> = self
            .buckets
            .iter()
            .filter(|(_, b)| b.pending == 0 && b.inflight == 0 && b.buffered.is_empty())
            .map(|(start, _)| *start)
            .collect();
        for start in dead {
            self.storage
                .remove_journal(&bucket_name(self.layout.bucket_prefix, start))?;
            self.buckets.remove(&start);
        }
        if self.ready.is_empty() && self.staged.is_empty() {
            self.cancelled_ready.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use dmq_log_store::{Clock, ManualClock};

    fn config() -> DelayConfig {
        DelayConfig {
            bucket_width_ms: 1_000,
            window_ms: 5_000,
            tick_ms: 1,
            ..DelayConfig::default()
        }
    }

    struct Fixture {
        clock: Arc<ManualClock>,
        storage: MemoryStorage,
    }

    impl Fixture {
        fn new(now_ms: i64) -> Fixture {
            let clock = Arc::new(ManualClock::new(now_ms));
            let storage = MemoryStorage::new(clock.clone());
            Fixture { clock, storage }
        }

        fn open(&self, config: DelayConfig) -> (DelayStore, DelayRecovery) {
            DelayStore::open(Arc::new(self.storage.clone()), config, self.clock.now_ms()).unwrap()
        }

        fn now(&self) -> i64 {
            self.clock.now_ms()
        }
    }

    fn delayed(value: &str, due_ms: i64) -> RecordInput {
        RecordInput {
            deliver_at_ms: Some(due_ms),
            headers: vec![(Bytes::from_static(b"app"), Bytes::from_static(b"x"))],
            ..RecordInput::new(value.to_string())
        }
    }

    fn schedule(store: &mut DelayStore, now: i64, dues: &[i64]) -> Vec<MessageId> {
        let entries = dues
            .iter()
            .map(|due| ("orders".to_string(), 3, delayed(&format!("v{due}"), *due)))
            .collect();
        store.schedule(entries, now).unwrap()
    }

    /// Polls everything due at `now`, marks it fired, returns (due, id).
    fn drain(store: &mut DelayStore, now: i64) -> Vec<(i64, MessageId)> {
        let mut out = Vec::new();
        loop {
            let due = store.poll_due(now, 7).unwrap();
            if due.is_empty() {
                return out;
            }
            let ids: Vec<MessageId> = due.iter().map(|m| m.id).collect();
            assert_eq!(store.mark_fired(&ids).unwrap(), ids.len());
            out.extend(due.iter().map(|m| (m.due_ms, m.id)));
        }
    }

    #[test]
    fn fires_in_due_order_and_not_before_due() {
        let fixture = Fixture::new(100_000);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 0);
        let now = fixture.now();
        let dues = [
            now + 2_500,
            now + 10,
            now + 9_000,
            now + 10,
            now + 700,
            now + 60_000,
        ];
        let ids = schedule(&mut store, now, &dues);
        assert_eq!(store.pending(), 6);
        assert_eq!(store.next_due_ms(), Some(now + 10));
        assert!(store.poll_due(now + 9, 100).unwrap().is_empty());
        let first = store.poll_due(now + 10, 100).unwrap();
        assert_eq!(
            first.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![ids[1], ids[3]]
        );
        let message = &first[0];
        assert_eq!((message.topic.as_str(), message.partition), ("orders", 3));
        assert_eq!(message.record.id, Some(ids[1]));
        assert_eq!(message.record.deliver_at_ms, Some(now + 10));
        assert_eq!(
            message.record.headers,
            vec![(Bytes::from_static(b"app"), Bytes::from_static(b"x"))]
        );
        assert_eq!(message.record.value, Bytes::from(format!("v{}", now + 10)));
        store.mark_fired(&[ids[1], ids[3]]).unwrap();
        assert_eq!(store.pending(), 4);
        assert_eq!(store.next_due_ms(), Some(now + 700));
        let rest = drain(&mut store, now + 60_000);
        let expected: Vec<i64> = vec![now + 700, now + 2_500, now + 9_000, now + 60_000];
        assert_eq!(
            rest.iter().map(|(due, _)| *due).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(store.pending(), 0);
        assert_eq!(store.next_due_ms(), None);
        // A due time in the past is accepted and fires at the next poll.
        let late = schedule(&mut store, now + 60_000, &[now - 5]);
        assert_eq!(drain(&mut store, now + 60_000), vec![(now - 5, late[0])]);
        // `max` is honoured and order kept across polls.
        schedule(
            &mut store,
            now + 60_000,
            &[now + 61_000, now + 60_500, now + 60_900],
        );
        let one = store.poll_due(now + 61_000, 1).unwrap();
        assert_eq!(one[0].due_ms, now + 60_500);
        let two = store.poll_due(now + 61_000, 5).unwrap();
        assert_eq!(
            two.iter().map(|m| m.due_ms).collect::<Vec<_>>(),
            vec![now + 60_900, now + 61_000]
        );
    }

    #[test]
    fn reserved_headers_and_empty_topics_are_refused() {
        let fixture = Fixture::new(0);
        let (mut store, _) = fixture.open(config());
        let mut record = delayed("x", 10);
        record
            .headers
            .push((Bytes::from_static(TOPIC_HEADER.as_bytes()), Bytes::new()));
        assert!(matches!(
            store.schedule(vec![("t".into(), 0, record)], 0),
            Err(DelayError::InvalidInput(_))
        ));
        assert!(store
            .schedule(vec![(String::new(), 0, delayed("x", 10))], 0)
            .is_err());
        assert_eq!(store.pending(), 0);
        assert_eq!(
            fixture
                .storage
                .memory_log(TIMER_TOPIC, 0)
                .unwrap()
                .end_offset(),
            0
        );
    }

    #[test]
    fn cancel_near_far_and_after_restart() {
        let fixture = Fixture::new(1_000_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let year_ms = 365 * 24 * 3_600_000;
        let ids = schedule(
            &mut store,
            now,
            &[now + 100, now + 200, now + year_ms, now + 2 * year_ms],
        );
        // Near (loaded) and far (on disk only) cancels.
        assert!(store.cancel(&ids[0]).unwrap());
        assert!(!store.cancel(&ids[0]).unwrap());
        assert!(store.cancel(&ids[2]).unwrap());
        assert!(!store.cancel(&ids[2]).unwrap());
        assert!(!store.cancel(&MessageId::new(now, 42)).unwrap());
        assert_eq!(store.pending(), 2);
        // Cancels are durable without a checkpoint.
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 2);
        assert!(!store.cancel(&ids[2]).unwrap());
        // Far cancel after restart, through a flushed bucket journal.
        store.checkpoint().unwrap();
        assert!(store.cancel(&ids[3]).unwrap());
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 1);
        assert_eq!(
            drain(&mut store, now + 3 * year_ms),
            vec![(now + 200, ids[1])]
        );
        // A polled (in-flight) message cannot be cancelled.
        let late = schedule(&mut store, now + 3 * year_ms, &[now]);
        assert_eq!(store.poll_due(now + 3 * year_ms, 10).unwrap().len(), 1);
        assert!(!store.cancel(&late[0]).unwrap());
    }

    #[test]
    fn cancel_after_the_timer_fired_but_before_the_poll_handed_it_out() {
        let fixture = Fixture::new(1_000_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let ids = schedule(&mut store, now, &[now + 100, now + 100, now + 100]);
        // The poll fires all three timers but hands out one: the others
        // wait, due, with their timers spent.
        let first = store.poll_due(now + 200, 1).unwrap();
        assert_eq!(first.len(), 1);
        let waiting: Vec<MessageId> = ids
            .iter()
            .copied()
            .filter(|id| *id != first[0].id)
            .collect();
        // New timers may take the fired ones' slab entries: cancelling a
        // waiting message must not cancel them.
        let later = schedule(&mut store, now + 200, &[now + 300, now + 300]);
        assert!(store.cancel(&waiting[0]).unwrap());
        assert!(!store.cancel(&waiting[0]).unwrap());
        assert_eq!(store.pending(), 3);
        let rest: Vec<MessageId> = drain(&mut store, now + 400)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(rest, vec![waiting[1], later[0], later[1]]);
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn cancel_near_delays_with_a_caller_id_and_a_timer_log_id() {
        let fixture = Fixture::new(500_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let caller = MessageId::new(1_234, 99);
        let record = RecordInput {
            id: Some(caller),
            ..delayed("moved", now + 100)
        };
        store.schedule(vec![("t".into(), 0, record)], now).unwrap();
        let own = schedule(&mut store, now, &[now + 100, now + 100]);
        // Loaded (near) entries are found by offset, whoever chose the id.
        assert!(store.cancel(&caller).unwrap());
        assert!(store.cancel(&own[1]).unwrap());
        assert!(!store.cancel(&own[1]).unwrap());
        assert_eq!(drain(&mut store, now + 200), vec![(now + 100, own[0])]);
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn cancel_far_delay_with_a_caller_id() {
        let fixture = Fixture::new(500_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let id = MessageId::new(1_234, 99);
        let record = RecordInput {
            id: Some(id),
            ..delayed("moved", now + 3_600_000)
        };
        assert_eq!(
            store.schedule(vec![("t".into(), 0, record)], now).unwrap(),
            vec![id]
        );
        store.checkpoint().unwrap();
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 1);
        assert!(store.cancel(&id).unwrap());
        assert_eq!(store.pending(), 0);
        drop(store);
        let (store, recovery) = fixture.open(config());
        assert_eq!((recovery.pending, store.next_due_ms()), (0, None));
    }

    #[test]
    fn crash_loses_nothing_and_marked_ones_do_not_refire() {
        let fixture = Fixture::new(10_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let mut dues: Vec<i64> = (0..40).map(|i| now + 100 + (i * 7_919) % 20_000).collect();
        let ids = schedule(&mut store, now, &dues);
        let due_of: HashMap<MessageId, i64> =
            ids.iter().copied().zip(dues.iter().copied()).collect();
        // Fire and mark the first ones, checkpoint: they never come back.
        let fired_early = drain(&mut store, now + 5_000);
        assert!(!fired_early.is_empty());
        store.checkpoint().unwrap();
        // Fire and mark more without a checkpoint: they may come back.
        let fired_late = drain(&mut store, now + 8_000);
        // Polled but not marked: must come back.
        let unmarked = store.poll_due(now + 9_000, 100).unwrap();
        drop(store); // crash
        let restart = now + 30_000;
        fixture.clock.set_ms(restart);
        let (mut store, recovery) = fixture.open(config());
        let survivors = 40 - fired_early.len() as u64;
        assert_eq!(recovery.pending, survivors);
        // Everything overdue fires at once, in due order.
        let refired = drain(&mut store, restart);
        assert_eq!(refired.len() as u64, survivors);
        assert!(refired.windows(2).all(|w| w[0].0 <= w[1].0));
        let early: HashSet<MessageId> = fired_early.iter().map(|(_, id)| *id).collect();
        assert!(refired.iter().all(|(_, id)| !early.contains(id)));
        for pair in fired_late
            .iter()
            .copied()
            .chain(unmarked.iter().map(|m| (m.due_ms, m.id)))
        {
            assert!(refired.contains(&pair));
        }
        for (due, id) in &refired {
            assert_eq!(due_of[id], *due);
        }
        dues.sort_unstable();
        store.checkpoint().unwrap();
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 0);
        assert!(drain(&mut store, restart + 100_000).is_empty());
        store.checkpoint().unwrap();
        assert!(fixture
            .storage
            .list_journals(BUCKET_PREFIX)
            .unwrap()
            .is_empty());
    }

    proptest::proptest! {
        /// The ready queue pops in exactly the order a binary heap would,
        /// whatever mix of in-order and out-of-order pushes and pops.
        #[test]
        fn ready_queue_pops_like_a_heap(ops in proptest::collection::vec((0u8..4, 0i64..50), 0..300)) {
            let mut queue = ReadyQueue::default();
            let mut heap = BinaryHeap::new();
            for (seq, (op, due)) in ops.into_iter().enumerate() {
                if op == 0 {
                    proptest::prop_assert_eq!(queue.pop(), heap.pop().map(|Reverse(e)| e));
                } else {
                    let entry = (due, seq as u64, seq as u64, MessageId::default(), None);
                    queue.push(entry);
                    heap.push(Reverse(entry));
                }
                proptest::prop_assert_eq!(queue.peek().copied(), heap.peek().map(|Reverse(e)| *e));
                proptest::prop_assert_eq!(queue.len(), heap.len());
            }
            while let Some(Reverse(entry)) = heap.pop() {
                proptest::prop_assert_eq!(queue.pop(), Some(entry));
            }
            proptest::prop_assert!(queue.is_empty());
        }
    }

    /// A schedule split in two (append, then commit after the durability
    /// wait elsewhere) must not let a flush in between move the watermark
    /// past its records: the commit's entries are unflushed, and a crash
    /// before the next flush finds them only by re-indexing from the
    /// watermark. Aborted ones never fire, even after a restart.
    #[test]
    fn a_flush_between_append_and_commit_keeps_the_schedule_across_a_crash() {
        let fixture = Fixture::new(0);
        let (mut store, _) = fixture.open(config());
        let entry = |value: &str, due: i64| ("orders".to_string(), 3, delayed(value, due));
        let kept = store
            .schedule_append(vec![entry("kept", 50_000)], 0)
            .unwrap();
        let dropped = store
            .schedule_append(vec![entry("dropped", 60_000)], 0)
            .unwrap();
        assert_eq!(store.pending(), 0, "not pending before the commit");
        // Another producer's schedule and a flush (a checkpoint) meanwhile.
        schedule(&mut store, 0, &[70_000]);
        store.checkpoint().unwrap();
        let ids = store.schedule_commit(kept).unwrap();
        store.schedule_abort(dropped);
        assert_eq!(store.pending(), 2);
        // A crash before any further flush.
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.pending, 2, "{recovery:?}");
        let fired = drain(&mut store, 1_000_000);
        assert_eq!(fired.len(), 2);
        assert_eq!(fired[0], (50_000, ids[0]));
        assert_eq!(fired[1].0, 70_000);
    }

    #[test]
    fn unflushed_index_is_rebuilt_from_the_timer_log() {
        let fixture = Fixture::new(0);
        let small = DelayConfig {
            buffered_entries_max: 10,
            ..config()
        };
        let (mut store, _) = fixture.open(small.clone());
        let dues: Vec<i64> = (0..32).map(|i| 100_000 + i * 1_000).collect();
        for chunk in dues.chunks(3) {
            schedule(&mut store, 0, chunk);
        }
        drop(store);
        let (mut store, recovery) = fixture.open(small);
        assert_eq!(recovery.pending, 32);
        // Flushes at 12 and 24 entries; the last 8 come from the timer log.
        assert_eq!((recovery.watermark, recovery.reindexed_records), (24, 8));
        let fired = drain(&mut store, 1_000_000);
        assert_eq!(fired.iter().map(|(due, _)| *due).collect::<Vec<_>>(), dues);
    }

    /// Regression: re-indexing told a caller's id by its time differing
    /// from the record's, so a caller id minted in the same millisecond as
    /// the timer-log append (a transaction committed in the millisecond it
    /// was produced) was taken for the log's own, and after a crash the
    /// store no longer knew it held it (a committed transaction's delayed
    /// record would be scheduled a second time).
    #[test]
    fn a_caller_id_of_the_appends_own_millisecond_is_known_after_a_crash() {
        let fixture = Fixture::new(5_000);
        let (mut store, _) = fixture.open(config());
        let id = MessageId::new(fixture.now(), 42);
        let mut record = delayed("moved", 60_000);
        record.id = Some(id);
        store
            .schedule(vec![("orders".to_string(), 0, record)], fixture.now())
            .unwrap();
        assert!(store.holds_caller_id(&id));
        // A crash before any flush: the entry comes back from the timer log.
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.reindexed_records, 1);
        assert!(store.holds_caller_id(&id));
        assert!(store.cancel(&id).unwrap(), "found by its caller id");
        // The header never reaches the destination.
        let mut record = delayed("again", 6_000);
        record.id = Some(MessageId::new(fixture.now(), 43));
        store
            .schedule(vec![("orders".to_string(), 0, record)], fixture.now())
            .unwrap();
        let due = store.poll_due(6_000, 10).unwrap();
        assert!(due[0]
            .record
            .headers
            .iter()
            .all(|(name, _)| !name.starts_with(b"dmq.delay.")));
    }

    #[test]
    fn far_future_buckets_load_as_time_jumps() {
        let fixture = Fixture::new(0);
        let (mut store, _) = fixture.open(config());
        // 2000 delays over 500 s (500 buckets), a few years away ones too.
        let mut dues: Vec<i64> = (0..2_000).map(|i| 1 + (i * 104_729) % 500_000).collect();
        dues.extend([5 * 365 * 86_400_000, 10 * 365 * 86_400_000]);
        for chunk in dues.chunks(64) {
            schedule(&mut store, 0, chunk);
        }
        assert!(store.loaded_len() < 50, "only the near window is in memory");
        assert_eq!(store.next_due_ms(), dues.iter().min().copied());
        let mut now = 0;
        let mut fired = Vec::new();
        while now < 500_000 {
            now += 37_123;
            fired.extend(drain(&mut store, now));
            assert!(store.loaded_len() <= 2_000 * 50 / 500 + 50);
            if now % 3 == 0 {
                store.checkpoint().unwrap();
            }
        }
        assert_eq!(fired.len(), 2_000);
        assert!(fired.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(store.pending(), 2);
        assert_eq!(store.next_due_ms(), Some(5 * 365 * 86_400_000));
        let years = drain(&mut store, 20 * 365 * 86_400_000);
        assert_eq!(years.len(), 2);
        store.checkpoint().unwrap();
        assert!(fixture
            .storage
            .list_journals(BUCKET_PREFIX)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn downtime_backlog_loads_in_order_under_the_memory_cap() {
        let fixture = Fixture::new(0);
        let capped = DelayConfig {
            loaded_entries_max: 50,
            ..config()
        };
        let (mut store, _) = fixture.open(capped.clone());
        let dues: Vec<i64> = (0..1_000).map(|i| 10_000 + (i * 7_901) % 100_000).collect();
        for chunk in dues.chunks(100) {
            schedule(&mut store, 0, chunk);
        }
        store.checkpoint().unwrap();
        drop(store);
        let (mut store, recovery) = fixture.open(capped);
        assert_eq!(recovery.pending, 1_000);
        let later = 1_000_000;
        let mut fired = Vec::new();
        loop {
            assert!(store.loaded_len() <= 60);
            let due = store.poll_due(later, 10).unwrap();
            if due.is_empty() {
                break;
            }
            let ids: Vec<MessageId> = due.iter().map(|m| m.id).collect();
            store.mark_fired(&ids).unwrap();
            fired.extend(due.iter().map(|m| m.due_ms));
        }
        let mut sorted = dues.clone();
        sorted.sort_unstable();
        assert_eq!(fired, sorted);
    }

    /// "Counts per destination": exact through schedule, cancel (near and
    /// far), fire, a crash before any flush (the timer-log tail re-indexed)
    /// and a clean restart; nothing read to answer.
    #[test]
    fn pending_counts_per_destination_survive_fire_cancel_and_restart() {
        let fixture = Fixture::new(1_000_000);
        let (mut store, _) = fixture.open(config());
        let now = fixture.now();
        let year_ms = 365 * 24 * 3_600_000;
        let to = |topic: &str, partition: u32, due: i64| {
            (topic.to_string(), partition, delayed("v", due))
        };
        let ids = store
            .schedule(
                vec![
                    to("a", 0, now + 100),
                    to("a", 0, now + 200),
                    to("a", 0, now + year_ms),
                    to("a", 1, now + 300),
                    to("a", 1, now + 2 * year_ms),
                    to("b", 0, now + 100),
                ],
                now,
            )
            .unwrap();
        assert_eq!(store.pending_in_topic("a"), [(0, 3), (1, 2)]);
        assert_eq!(store.pending_in_topic("b"), [(0, 1)]);
        assert!(store.pending_in_topic("c").is_empty());
        // A near (loaded) and a far (on disk only) cancel.
        assert!(store.cancel(&ids[1]).unwrap());
        assert!(store.cancel(&ids[4]).unwrap());
        assert!(!store.cancel(&ids[4]).unwrap());
        assert_eq!(store.pending_in_topic("a"), [(0, 2), (1, 1)]);
        // A crash before any flush: the counts come back from the timer log.
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert!(recovery.reindexed_records > 0);
        assert_eq!(store.pending_in_topic("a"), [(0, 2), (1, 1)]);
        assert_eq!(store.pending_in_topic("b"), [(0, 1)]);
        // Firing takes them off when they are polled.
        let fired = drain(&mut store, now + 300);
        assert_eq!(fired.len(), 3);
        assert_eq!(store.pending_in_topic("a"), [(0, 1)]);
        assert!(store.pending_in_topic("b").is_empty());
        // After a checkpoint, from the bucket journals alone.
        store.checkpoint().unwrap();
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.reindexed_records, 0);
        assert_eq!(store.pending_in_topic("a"), [(0, 1)]);
        assert!(store.cancel(&ids[2]).unwrap());
        assert!(store.pending_in_topic("a").is_empty());
        assert_eq!(store.pending(), 0);
    }

    /// Buckets written by a version without destinations (kind 1): the
    /// open reads each live entry's destination from the timer log once and
    /// rewrites the bucket, so the counts are exact and the next open reads
    /// nothing.
    #[test]
    fn entries_without_a_destination_are_resolved_once_at_open() {
        let fixture = Fixture::new(0);
        let (mut store, _) = fixture.open(config());
        let mut entries: Vec<_> = (0..5)
            .map(|i| ("old".to_string(), 2, delayed("v", 100_000 + i * 100)))
            .collect();
        entries.push(("old".to_string(), 0, delayed("v", 50_000_000)));
        let ids = store.schedule(entries, 0).unwrap();
        assert!(store.cancel(&ids[0]).unwrap());
        store.checkpoint().unwrap();
        drop(store);
        // What an older version wrote: the same entries, as kind 1.
        let storage = fixture.storage.clone();
        let mut rewritten = 0;
        for name in storage.list_journals(BUCKET_PREFIX).unwrap() {
            let (mut journal, payloads) = storage.open_journal(&name).unwrap();
            let contents = decode_bucket(&name, &payloads, &mut Destinations::default()).unwrap();
            let legacy: Vec<Entry> = contents
                .scheduled
                .values()
                .map(|entry| Entry {
                    dest: None,
                    ..*entry
                })
                .collect();
            let dead: Vec<u64> = contents.dead.iter().copied().collect();
            let mut payloads = encode_schedule(&legacy, &Destinations::default());
            payloads.extend(encode_tombstones(KIND_CANCEL, &dead));
            assert!(payloads.iter().all(|p| p[1] != KIND_SCHEDULE_TO));
            journal.rewrite(&payloads).unwrap();
            rewritten += legacy.len();
        }
        // The cancelled one was never written (cancelled while buffered).
        assert_eq!(rewritten, 5);
        let (store, recovery) = fixture.open(config());
        assert_eq!(recovery.destinations_resolved, 5);
        assert_eq!(store.pending_in_topic("old"), [(0, 1), (2, 4)]);
        drop(store);
        let (mut store, recovery) = fixture.open(config());
        assert_eq!(recovery.destinations_resolved, 0, "rewritten with them");
        assert_eq!(store.pending_in_topic("old"), [(0, 1), (2, 4)]);
        assert_eq!(drain(&mut store, 200_000).len(), 4);
        assert_eq!(store.pending_in_topic("old"), [(0, 1)]);
    }

    #[test]
    fn journal_bytes_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let mut payload: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
            if round % 2 == 0 && payload.len() > 2 {
                payload[0] = FORMAT_VERSION;
                payload[1] = (round % 5) as u8;
            }
            let _ = decode_bucket("fuzz", &[payload.clone()], &mut Destinations::default());
            let _ = decode_meta(META_JOURNAL, &payload);
        }
        let mut destinations = Destinations::default();
        let orders = destinations.intern("orders", 3);
        let entry = Entry {
            due_ms: -5,
            offset: 7,
            id: MessageId::new(1, 2),
            flags: 0,
            dest: Some(orders),
        };
        let legacy = Entry {
            offset: 8,
            dest: None,
            ..entry
        };
        let good = encode_schedule(&[entry, legacy], &destinations);
        assert_eq!(
            good.iter().map(|payload| payload[1]).collect::<Vec<_>>(),
            [KIND_SCHEDULE_TO, KIND_SCHEDULE]
        );
        // Read back by another process: the same destination, interned anew.
        let mut fresh = Destinations::default();
        let contents = decode_bucket("ok", &good, &mut fresh).unwrap();
        assert!(contents.is_live(7) && contents.is_live(8));
        let dest = contents.scheduled[&7].dest.unwrap();
        assert_eq!(fresh.name(dest), Some(("orders", 3)));
        assert_eq!(contents.scheduled[&8].dest, None);
        for (what, mut bad) in [
            ("version", good[0].clone()),
            ("short", good[0].clone()),
            ("topic length", good[0].clone()),
            ("topic UTF-8", good[0].clone()),
            ("legacy short", good[1].clone()),
        ] {
            match what {
                "version" => bad[0] = 9,
                "short" | "legacy short" => {
                    bad.pop();
                }
                "topic length" => bad[PAYLOAD_HEADER_LEN + 4] = 200,
                _ => bad[PAYLOAD_HEADER_LEN + DESTINATION_HEADER_LEN] = 0xff,
            }
            assert!(
                matches!(
                    decode_bucket("bad", &[bad], &mut fresh),
                    Err(DelayError::CorruptJournal { .. })
                ),
                "{what}"
            );
        }
        assert_eq!(
            decode_meta(META_JOURNAL, &encode_meta(5, 60_000)).unwrap(),
            (5, 60_000)
        );
    }

    /// A store's journals on its own storage, its timer log shared with
    /// others: the shape of a cluster, where every node follows one
    /// replicated timer log.
    #[derive(Debug)]
    struct SharedTimer {
        timer: Arc<dyn PartitionLog>,
        journals: MemoryStorage,
    }

    impl Storage for SharedTimer {
        fn partition(
            &self,
            topic: &str,
            partition: u32,
        ) -> Result<Arc<dyn PartitionLog>, StoreError> {
            assert_eq!((topic, partition), (FOLLOWED.timer_topic, 0));
            Ok(Arc::clone(&self.timer))
        }
        fn open_journal(&self, name: &str) -> Result<crate::storage::OpenedJournal, StoreError> {
            self.journals.open_journal(name)
        }
        fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
            self.journals.remove_journal(name)
        }
        fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
            self.journals.remove_topic(topic)
        }
        fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.journals.list_journals(prefix)
        }
    }

    const FOLLOWED: DelayLayout = DelayLayout {
        timer_topic: "__timer",
        bucket_prefix: "f.bucket.",
        meta_journal: "f.meta",
        followed: true,
    };

    /// One shared timer log and a node's journals per store.
    struct Followers {
        clock: Arc<ManualClock>,
        timer: Arc<dyn PartitionLog>,
        journals: Vec<MemoryStorage>,
    }

    impl Followers {
        fn new(nodes: usize, now_ms: i64) -> Followers {
            let clock = Arc::new(ManualClock::new(now_ms));
            let timer = MemoryStorage::new(clock.clone())
                .partition(FOLLOWED.timer_topic, 0)
                .unwrap();
            let journals = (0..nodes)
                .map(|_| MemoryStorage::new(clock.clone()))
                .collect();
            Followers {
                clock,
                timer,
                journals,
            }
        }

        fn open(&self, node: usize) -> Result<DelayStore> {
            let storage = SharedTimer {
                timer: Arc::clone(&self.timer),
                journals: self.journals[node].clone(),
            };
            DelayStore::open_at(Arc::new(storage), FOLLOWED, config(), self.clock.now_ms())
                .map(|(store, _)| store)
        }

        /// Schedules as a produce on any node does: appends timer records.
        fn schedule(&self, dues: &[i64]) -> Vec<MessageId> {
            let now = self.clock.now_ms();
            let records = dues
                .iter()
                .map(|due| {
                    timer_record("orders", 3, delayed(&format!("v{due}"), *due), now).unwrap()
                })
                .collect();
            self.timer
                .append(records)
                .unwrap()
                .into_iter()
                .map(|(_, id)| id)
                .collect()
        }

        fn settle(&self, kind: SettleKind, settled: &[Settled]) {
            self.timer
                .append(vec![settle_record(kind, settled)])
                .unwrap();
        }

        /// What a leader does: polls what is due, "appends" it, writes the
        /// fired marker, marks it fired. Returns the fired ids.
        fn fire(&self, leader: &mut DelayStore) -> Vec<MessageId> {
            leader.follow(self.clock.now_ms()).unwrap();
            let due = leader.poll_due(self.clock.now_ms(), 1_000).unwrap();
            let ids: Vec<MessageId> = due.iter().map(|m| m.id).collect();
            if !ids.is_empty() {
                self.settle(SettleKind::Fired, &leader.polled(&ids));
                assert_eq!(leader.mark_fired(&ids).unwrap(), ids.len());
            }
            ids
        }
    }

    #[test]
    fn a_follower_indexes_what_others_append_and_settles_what_a_leader_fired() {
        let cluster = Followers::new(2, 100_000);
        let mut leader = cluster.open(0).unwrap();
        let mut follower = cluster.open(1).unwrap();
        let now = cluster.clock.now_ms();
        let ids = cluster.schedule(&[now + 100, now + 200, now + 30_000]);
        assert_eq!(leader.pending(), 0, "nothing before it follows");
        for store in [&mut leader, &mut follower] {
            assert_eq!(store.follow(now).unwrap().records, 3);
            assert_eq!(store.pending(), 3);
            assert_eq!(store.pending_in_topic("orders"), vec![(3, 3)]);
            assert_eq!(store.next_due_ms(), Some(now + 100));
            assert_eq!(
                store.follow(now).unwrap().records,
                0,
                "each record is indexed once"
            );
        }
        assert!(
            cluster.fire(&mut leader).is_empty(),
            "nothing fires before it is due"
        );
        cluster.clock.advance_ms(150);
        assert_eq!(cluster.fire(&mut leader), vec![ids[0]]);
        // The follower hears of it through the marker.
        follower.follow(cluster.clock.now_ms()).unwrap();
        assert_eq!(follower.pending(), 2);
        assert_eq!(follower.pending_in_topic("orders"), vec![(3, 2)]);
        // The leader reads its own marker back: nothing changes.
        leader.follow(cluster.clock.now_ms()).unwrap();
        assert_eq!(leader.pending(), 2);
        // The leader is lost; the follower takes over and fires only what
        // the old leader did not.
        drop(leader);
        cluster.clock.advance_ms(100);
        assert_eq!(cluster.fire(&mut follower), vec![ids[1]]);
        cluster.clock.advance_ms(30_000);
        assert_eq!(cluster.fire(&mut follower), vec![ids[2]]);
        assert_eq!(follower.pending(), 0);
        // The first node comes back: every marker settles what its
        // journals still held.
        let mut back = cluster.open(0).unwrap();
        back.follow(cluster.clock.now_ms()).unwrap();
        assert_eq!(back.pending(), 0);
        assert!(back
            .poll_due(cluster.clock.now_ms(), 100)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_cancel_marker_settles_a_delay_on_every_store_and_it_never_fires() {
        let cluster = Followers::new(2, 100_000);
        let mut leader = cluster.open(0).unwrap();
        let mut follower = cluster.open(1).unwrap();
        let now = cluster.clock.now_ms();
        // One near (loaded), one far past the window (on disk only).
        let ids = cluster.schedule(&[now + 500, now + 3_600_000, now + 600]);
        leader.follow(now).unwrap();
        follower.follow(now).unwrap();
        assert!(
            follower.cancel(&ids[0]).is_err(),
            "a followed store cancels by marker"
        );
        let near = follower.locate(&ids[0]).unwrap().unwrap();
        let far = follower.locate(&ids[1]).unwrap().unwrap();
        assert_eq!((near.due_ms, far.due_ms), (now + 500, now + 3_600_000));
        cluster.settle(SettleKind::Cancelled, &[near, far]);
        for store in [&mut leader, &mut follower] {
            store.follow(now).unwrap();
            assert_eq!(store.pending(), 1);
            assert_eq!(store.locate(&ids[0]).unwrap(), None);
            assert_eq!(store.locate(&ids[1]).unwrap(), None);
        }
        cluster.clock.advance_ms(3_700_000);
        assert_eq!(cluster.fire(&mut leader), vec![ids[2]]);
        // A marker applied twice (re-read after a restart) changes nothing.
        cluster.settle(SettleKind::Cancelled, &[near]);
        let report = follower.follow(cluster.clock.now_ms()).unwrap();
        assert_eq!(report.cancels.len(), 1);
        assert!(!report.cancels[0].1, "settled already");
        assert_eq!(follower.pending(), 0);
    }

    #[test]
    fn a_follower_drops_what_markers_settled_from_its_ready_queue() {
        let cluster = Followers::new(2, 100_000);
        let now = cluster.clock.now_ms();
        let ids = cluster.schedule(&[now + 100, now + 200, now + 300]);
        cluster.clock.advance_ms(1_000);
        // Opened with all three overdue: they wait in its ready queue.
        let mut follower = cluster.open(1).unwrap();
        assert_eq!(follower.loaded_len(), 3);
        let mut leader = cluster.open(0).unwrap();
        assert_eq!(cluster.fire(&mut leader), ids);
        follower.follow(cluster.clock.now_ms()).unwrap();
        assert_eq!((follower.pending(), follower.loaded_len()), (0, 0));
    }

    #[test]
    fn a_cancel_by_id_is_decided_by_the_logs_order() {
        let cluster = Followers::new(2, 100_000);
        let mut leader = cluster.open(0).unwrap();
        let mut follower = cluster.open(1).unwrap();
        let now = cluster.clock.now_ms();
        // Appended but not followed yet by either store: a cancel by id
        // after it in the log still finds it.
        let ids = cluster.schedule(&[now + 100, now + 200]);
        cluster.settle(SettleKind::Cancelled, &[Settled::by_id(ids[1])]);
        for store in [&mut leader, &mut follower] {
            let report = store.follow(now).unwrap();
            assert_eq!(report.cancels, vec![(2, true)]);
            assert_eq!(store.pending(), 1);
        }
        // A cancel by id of a delay that already fired settles nothing.
        cluster.clock.advance_ms(100);
        assert_eq!(cluster.fire(&mut leader), vec![ids[0]]);
        cluster.settle(SettleKind::Cancelled, &[Settled::by_id(ids[0])]);
        for store in [&mut leader, &mut follower] {
            let report = store.follow(cluster.clock.now_ms()).unwrap();
            assert_eq!(report.cancels, vec![(4, false)]);
            assert_eq!(store.pending(), 0);
        }
        cluster.clock.advance_ms(1_000);
        assert!(cluster.fire(&mut follower).is_empty());
    }

    #[test]
    fn a_followed_store_reopens_without_losing_or_reviving_a_delay() {
        let cluster = Followers::new(1, 100_000);
        let now = cluster.clock.now_ms();
        let mut store = cluster.open(0).unwrap();
        let ids = cluster.schedule(&[now + 100, now + 200, now + 300]);
        store.follow(now).unwrap();
        cluster.clock.advance_ms(150);
        assert_eq!(cluster.fire(&mut store), vec![ids[0]]);
        store.checkpoint().unwrap();
        // Fired after the checkpoint (its tombstone not synced), and
        // appended after it without being followed: the watermark stays
        // below both, so a reopen finds them again.
        cluster.clock.advance_ms(100);
        assert_eq!(cluster.fire(&mut store), vec![ids[1]]);
        let later = cluster.schedule(&[now + 400]);
        drop(store);
        let mut store = cluster.open(0).unwrap();
        assert_eq!(store.pending(), 2, "ids[2] and the later one");
        assert_eq!(store.follow(cluster.clock.now_ms()).unwrap().records, 0);
        cluster.clock.advance_ms(1_000);
        assert_eq!(cluster.fire(&mut store), vec![ids[2], later[0]]);
    }

    #[test]
    fn a_followed_store_waits_for_a_timer_log_behind_its_watermark() {
        let cluster = Followers::new(1, 100_000);
        let now = cluster.clock.now_ms();
        let mut store = cluster.open(0).unwrap();
        cluster.schedule(&[now + 100, now + 200]);
        store.follow(now).unwrap();
        store.checkpoint().unwrap();
        drop(store);
        // The same node's journals over a replica that has not applied
        // those records yet.
        let behind = Followers {
            clock: cluster.clock.clone(),
            timer: MemoryStorage::new(cluster.clock.clone())
                .partition(FOLLOWED.timer_topic, 0)
                .unwrap(),
            journals: cluster.journals.clone(),
        };
        match behind.open(0) {
            Err(DelayError::TimerBehind {
                watermark: 2,
                end: 0,
            }) => {}
            other => panic!("expected TimerBehind, got {other:?}"),
        }
        assert_eq!(cluster.open(0).unwrap().pending(), 2);
    }
}
