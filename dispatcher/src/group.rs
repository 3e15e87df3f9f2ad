//! The delivery state of one consumer group over one topic (or, in broadcast
//! mode, of one member): per partition an [`AckBitmap`], a read cursor and the
//! unacked messages the group knows about; plus the group's ack journal.
//!
//! Invariants (per partition):
//! - every offset below `cursor` is acked or in `pending`;
//! - `pending` holds at most `max_unacked_per_partition` entries;
//! - `ready` is exactly the set of pending offsets in [`Stage::Ready`];
//! - on an ordered topic, each key has at most one pending message that is
//!   not [`Stage::Held`] (its owner), and held messages of a key are released
//!   in offset order.
//!
//! # Ack journal (`group.<topic>.<group>[.<member>]`)
//! Payloads, little-endian: `1 | u32 partition | AckBitmap encoding` (a
//! snapshot), `2 | u32 count | count × (u32 partition, u64 offset)` (acks),
//! `3 | u32 partition | u64 floor` (a seek: everything below acked, nothing
//! above), `4 | u32 count | count × (u32 partition, u64 offset, u32
//! failed)` (failed attempts: deliveries of an unacked message that ended
//! without an ack, the highest count of a message wins; a seek of its
//! partition clears them). Replaying them in order gives the bitmaps and the
//! failed attempts, so that a restart (or, in a cluster, the node taking a
//! group over) goes on counting attempts towards `max_attempts` instead of
//! starting again at 1; an attempt in flight at the crash is not counted.
//! Acks and failed attempts are synced at least every
//! `ack_sync_interval_ms`; the journal is rewritten as snapshots (and the
//! failed attempts of unacked messages) when it grows past
//! `ack_journal_compact_bytes`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::MessageId;

use crate::ack_bitmap::AckBitmap;
use crate::config::GroupConfig;
use crate::storage::{Journal, StoreError};
use crate::timing_wheel::TimerId;

/// Identifies a consumer, assigned by [`crate::Dispatcher::join`].
pub type MemberId = u64;

/// Where an unacked message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Delivered to a member; its ack deadline is a timer.
    InFlight { member: MemberId, timer: TimerId },
    /// Waiting for a retry backoff or its deliver-at time.
    Waiting { timer: TimerId },
    /// Ready to be delivered (again) now.
    Ready,
    /// Held back behind an earlier message with the same key.
    Held,
    /// On its last attempt, its dead-letter copy is with the writer: not
    /// delivered, no timer; acked when the copy is durable, back in flight
    /// (its deadline re-armed) if the copy could not be written.
    DeadLettering,
}

/// An unacked message known to the group.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) id: MessageId,
    pub(crate) key: Option<Bytes>,
    /// Deliveries so far.
    pub(crate) attempt: u32,
    pub(crate) stage: Stage,
}

impl Pending {
    /// Deliveries of this message that ended without an ack (one in
    /// flight has not ended).
    pub(crate) fn failed_attempts(&self) -> u32 {
        match self.stage {
            Stage::InFlight { .. } | Stage::DeadLettering => self.attempt.saturating_sub(1),
            Stage::Waiting { .. } | Stage::Ready | Stage::Held => self.attempt,
        }
    }
}

/// One partition's delivery state within a group.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub(crate) acks: AckBitmap,
    /// Next offset to read from the log.
    pub(crate) cursor: u64,
    pub(crate) pending: BTreeMap<u64, Pending>,
    pub(crate) ready: BTreeSet<u64>,
    /// Ordered topics: the pending offset that owns each key.
    pub(crate) key_owner: HashMap<Bytes, u64>,
    /// Ordered topics: offsets held behind their key's owner, in order.
    pub(crate) held: HashMap<Bytes, VecDeque<u64>>,
    /// Records read past the cursor, not yet looked at (one read batch).
    pub(crate) lookahead: VecDeque<dmq_log_store::Record>,
    /// Failed attempts of unacked offsets at or past the cursor, from the
    /// journal: taken by each message's [`Pending`] when the cursor
    /// reaches it.
    pub(crate) failed_before: BTreeMap<u64, u32>,
}

impl PartitionState {
    pub(crate) fn new(floor: u64) -> Self {
        PartitionState {
            acks: AckBitmap::new(floor),
            cursor: floor,
            pending: BTreeMap::new(),
            ready: BTreeSet::new(),
            key_owner: HashMap::new(),
            held: HashMap::new(),
            lookahead: VecDeque::new(),
            failed_before: BTreeMap::new(),
        }
    }

    /// The failed attempts the journal holds for `offset`, which the
    /// cursor reaches now (earlier ones are dropped: passed, or deleted).
    pub(crate) fn take_failed_before(&mut self, offset: u64) -> u32 {
        while let Some(entry) = self.failed_before.first_entry() {
            match (*entry.key()).cmp(&offset) {
                std::cmp::Ordering::Less => {
                    entry.remove();
                }
                std::cmp::Ordering::Equal => return entry.remove(),
                std::cmp::Ordering::Greater => break,
            }
        }
        0
    }

    /// Forgets everything unacked and restarts at `floor`.
    pub(crate) fn reset(&mut self, floor: u64) {
        self.acks.reset(floor);
        self.cursor = floor;
        self.pending.clear();
        self.ready.clear();
        self.key_owner.clear();
        self.held.clear();
        self.lookahead.clear();
        self.failed_before.clear();
    }
}

/// Identity of a delivery state: a group, or one member of a broadcast group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StateKey {
    /// Shared with every [`crate::Delivery`] of the state: no copy per message.
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) member: Option<String>,
}

impl StateKey {
    pub(crate) fn journal_name(&self) -> String {
        crate::names::group_journal(&self.topic, &self.group, self.member.as_deref())
    }
}

/// A token bucket in milli-tokens: `rate` per second, one second of burst.
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    rate_per_second: u64,
    milli_tokens: u64,
    last_refill_ms: i64,
}

impl RateLimiter {
    pub(crate) fn new(rate_per_second: u32, now_ms: i64) -> Self {
        let rate_per_second = u64::from(rate_per_second.max(1));
        RateLimiter {
            rate_per_second,
            milli_tokens: rate_per_second * 1000,
            last_refill_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_refill_ms).max(0) as u64;
        if elapsed_ms > 0 {
            let capacity = self.rate_per_second * 1000;
            self.milli_tokens =
                (self.milli_tokens + elapsed_ms * self.rate_per_second).min(capacity);
            self.last_refill_ms = now_ms;
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now_ms: i64) -> bool {
        self.refill(now_ms);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Returns a token taken for a delivery that did not happen.
    pub(crate) fn give_back(&mut self) {
        let capacity = self.rate_per_second * 1000;
        self.milli_tokens = (self.milli_tokens + 1000).min(capacity);
    }

    /// When the next token will be there.
    pub(crate) fn next_token_ms(&self) -> i64 {
        if self.milli_tokens >= 1000 {
            return self.last_refill_ms;
        }
        let missing = 1000 - self.milli_tokens;
        self.last_refill_ms + missing.div_ceil(self.rate_per_second) as i64
    }
}

/// The delivery state of a group (or broadcast member) over one topic.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub(crate) key: StateKey,
    pub(crate) config: GroupConfig,
    pub(crate) partitions: Vec<PartitionState>,
    pub(crate) members: Vec<MemberId>,
    pub(crate) next_member: usize,
    pub(crate) next_partition: usize,
    pub(crate) rate: Option<RateLimiter>,
    journal: Box<dyn Journal>,
    pending_acks: Vec<(u32, u64)>,
    /// Failed attempts to journal: (partition, offset, failed so far).
    pending_failures: Vec<(u32, u64, u32)>,
    /// A seek or snapshot must be written before the next sync.
    journal_dirty: bool,
    /// That write is a seek's: it replaces the whole journal
    /// ([`Journal::replace`]).
    journal_replace: bool,
    pub(crate) last_sync_ms: i64,
    /// The group was deleted. The slot stays (timers may still name its
    /// index) but holds nothing and matches no lookup.
    pub(crate) retired: bool,
}

/// A failed-attempts payload (tag 4).
fn encode_failures(failures: &[(u32, u64, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(5 + failures.len() * 16);
    payload.push(TAG_FAILED);
    payload.extend_from_slice(&(failures.len() as u32).to_le_bytes());
    for (partition, offset, failed) in failures {
        payload.extend_from_slice(&partition.to_le_bytes());
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&failed.to_le_bytes());
    }
    payload
}

/// Why a journal payload could not be replayed.
#[derive(Debug, thiserror::Error)]
#[error("corrupt ack journal {journal}: {reason}")]
pub struct AckJournalError {
    journal: String,
    reason: String,
}

const TAG_SNAPSHOT: u8 = 1;
const TAG_ACKS: u8 = 2;
const TAG_SEEK: u8 = 3;
const TAG_FAILED: u8 = 4;

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let slice = bytes.get(at..at + 8)?;
    let mut array = [0u8; 8];
    array.copy_from_slice(slice);
    Some(u64::from_le_bytes(array))
}

/// What one ack-journal payload says: replayed in order by
/// [`GroupState::restore`], merged as acks only by
/// `Dispatcher::merge_replicated_acks`.
#[derive(Debug)]
pub(crate) enum AckMerge {
    /// A seek: everything below this offset acked, nothing above.
    Floor(u64),
    /// A partition's whole bitmap (a snapshot).
    Bitmap(AckBitmap),
    /// These offsets are acked.
    Offsets(Vec<u64>),
    /// Failed attempts of these offsets, so far.
    Failed(Vec<(u64, u32)>),
}

/// Decodes ack-journal payloads into what each adds, by partition, in
/// order.
pub(crate) fn decode_merges(
    journal: &str,
    payloads: &[Vec<u8>],
) -> Result<Vec<(u32, AckMerge)>, AckJournalError> {
    let corrupt = |reason: &str| AckJournalError {
        journal: journal.to_string(),
        reason: reason.to_string(),
    };
    let mut merges = Vec::new();
    for payload in payloads {
        let Some((&tag, body)) = payload.split_first() else {
            return Err(corrupt("empty payload"));
        };
        match tag {
            TAG_SNAPSHOT => {
                let partition = read_u32(body, 0).ok_or_else(|| corrupt("short snapshot"))?;
                let bitmap = AckBitmap::decode(&body[4..])
                    .map_err(|e| corrupt(&format!("snapshot: {e}")))?;
                merges.push((partition, AckMerge::Bitmap(bitmap)));
            }
            TAG_ACKS => {
                let count = read_u32(body, 0).ok_or_else(|| corrupt("short acks"))? as usize;
                if body.len() != 4 + count * 12 {
                    return Err(corrupt("acks length"));
                }
                let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
                for i in 0..count {
                    let at = 4 + i * 12;
                    let partition = read_u32(body, at).ok_or_else(|| corrupt("ack"))?;
                    let offset = read_u64(body, at + 4).ok_or_else(|| corrupt("ack"))?;
                    by_partition.entry(partition).or_default().push(offset);
                }
                merges.extend(
                    by_partition
                        .into_iter()
                        .map(|(partition, offsets)| (partition, AckMerge::Offsets(offsets))),
                );
            }
            TAG_SEEK => {
                let partition = read_u32(body, 0).ok_or_else(|| corrupt("short seek"))?;
                let floor = read_u64(body, 4).ok_or_else(|| corrupt("short seek"))?;
                if body.len() != 12 {
                    return Err(corrupt("seek length"));
                }
                merges.push((partition, AckMerge::Floor(floor)));
            }
            TAG_FAILED => {
                let count = read_u32(body, 0).ok_or_else(|| corrupt("short attempts"))? as usize;
                if body.len() != 4 + count * 16 {
                    return Err(corrupt("attempts length"));
                }
                let mut by_partition: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
                for i in 0..count {
                    let at = 4 + i * 16;
                    let (Some(partition), Some(offset), Some(failed)) = (
                        read_u32(body, at),
                        read_u64(body, at + 4),
                        read_u32(body, at + 12),
                    ) else {
                        return Err(corrupt("attempt"));
                    };
                    by_partition
                        .entry(partition)
                        .or_default()
                        .push((offset, failed));
                }
                merges.extend(
                    by_partition
                        .into_iter()
                        .map(|(partition, failed)| (partition, AckMerge::Failed(failed))),
                );
            }
            _ => return Err(corrupt("unknown payload tag")),
        }
    }
    Ok(merges)
}

impl GroupState {
    /// Restores a state from its journal payloads; partitions the journal
    /// does not mention start at `initial_floor(partition)`. Returns the state
    /// and whether any partition was new (its start must be made durable).
    pub(crate) fn restore(
        key: StateKey,
        config: GroupConfig,
        partitions: u32,
        journal: Box<dyn Journal>,
        payloads: &[Vec<u8>],
        now_ms: i64,
        mut initial_floor: impl FnMut(u32) -> u64,
    ) -> Result<(GroupState, bool), AckJournalError> {
        let mut bitmaps: BTreeMap<u32, AckBitmap> = BTreeMap::new();
        let mut failures: BTreeMap<u32, BTreeMap<u64, u32>> = BTreeMap::new();
        for (partition, merge) in decode_merges(&key.journal_name(), payloads)? {
            match merge {
                // A second snapshot of a partition: in a replicated
                // journal, another node's, kept after a compaction that
                // had not seen it (`dmq_replication::journals`). Both hold
                // acks: neither undoes the other's.
                AckMerge::Bitmap(bitmap) => match bitmaps.get_mut(&partition) {
                    Some(held) => held.union(&bitmap),
                    None => {
                        bitmaps.insert(partition, bitmap);
                    }
                },
                AckMerge::Offsets(offsets) => {
                    if let Some(bitmap) = bitmaps.get_mut(&partition) {
                        for offset in offsets {
                            bitmap.ack(offset);
                        }
                    }
                }
                // A seek: everything below acked, nothing above, and
                // every message after it delivered afresh.
                AckMerge::Floor(floor) => {
                    bitmaps.insert(partition, AckBitmap::new(floor));
                    failures.remove(&partition);
                }
                AckMerge::Failed(failed) => {
                    let known = failures.entry(partition).or_default();
                    for (offset, count) in failed {
                        let held = known.entry(offset).or_default();
                        *held = (*held).max(count);
                    }
                }
            }
        }
        // Never more than a retry short of the dead-letter topic (the
        // last attempt's failure moves the message rather than noting it).
        let most_failed = config.max_attempts.max(1) - 1;
        let mut new_partitions = false;
        let states = (0..partitions)
            .map(|partition| {
                let bitmap = bitmaps.remove(&partition).unwrap_or_else(|| {
                    new_partitions = true;
                    AckBitmap::new(initial_floor(partition))
                });
                let mut state = PartitionState::new(bitmap.floor());
                state.failed_before = failures
                    .remove(&partition)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|&(offset, failed)| failed > 0 && !bitmap.is_acked(offset))
                    .map(|(offset, failed)| (offset, failed.min(most_failed)))
                    .collect();
                state.acks = bitmap;
                state
            })
            .collect();
        let rate = config
            .rate_limit_per_second
            .map(|rate| RateLimiter::new(rate, now_ms));
        let group = GroupState {
            key,
            config,
            partitions: states,
            members: Vec::new(),
            next_member: 0,
            next_partition: 0,
            rate,
            journal,
            pending_acks: Vec::new(),
            pending_failures: Vec::new(),
            journal_dirty: new_partitions,
            journal_replace: false,
            last_sync_ms: now_ms,
            retired: false,
        };
        Ok((group, new_partitions))
    }

    /// Empties a deleted group's slot; returns the timers to cancel and the
    /// members to drop.
    pub(crate) fn retire(&mut self) -> (Vec<TimerId>, Vec<MemberId>) {
        let timers = self
            .partitions
            .iter()
            .flat_map(|part| part.pending.values())
            .filter_map(|pending| match pending.stage {
                Stage::InFlight { timer, .. } | Stage::Waiting { timer } => Some(timer),
                Stage::Ready | Stage::Held | Stage::DeadLettering => None,
            })
            .collect();
        self.partitions.clear();
        self.pending_acks.clear();
        self.pending_failures.clear();
        self.journal_dirty = false;
        self.journal_replace = false;
        self.rate = None;
        self.retired = true;
        (timers, std::mem::take(&mut self.members))
    }

    /// Records an ack for the journal (durable at the next sync).
    pub(crate) fn note_ack(&mut self, partition: u32, offset: u64) {
        self.pending_acks.push((partition, offset));
    }

    /// Records that a delivery of `offset` ended without an ack, its
    /// `failed`-th such (durable at the next sync).
    pub(crate) fn note_failed_attempt(&mut self, partition: u32, offset: u64, failed: u32) {
        self.pending_failures.push((partition, offset, failed));
    }

    /// Marks that the bitmaps changed in a way deltas cannot express.
    pub(crate) fn note_reset(&mut self) {
        self.journal_dirty = true;
        self.pending_acks.clear();
        self.pending_failures.clear();
    }

    /// Notes a seek: as [`note_reset`](Self::note_reset), and the next
    /// sync replaces the whole journal ([`Journal::replace`]), so that no
    /// ack made before the seek is applied after it.
    pub(crate) fn note_seek(&mut self) {
        self.note_reset();
        self.journal_replace = true;
    }

    /// Whether there is anything to sync.
    pub(crate) fn needs_sync(&self) -> bool {
        self.journal_dirty || !self.pending_acks.is_empty() || !self.pending_failures.is_empty()
    }

    /// Makes every noted ack durable; compacts the journal when it is large.
    pub(crate) fn sync(&mut self, now_ms: i64, compact_bytes: u64) -> Result<(), StoreError> {
        self.last_sync_ms = now_ms;
        if self.journal_dirty || self.journal.size_bytes() > compact_bytes {
            let snapshots = self.snapshots();
            if self.journal_replace {
                self.journal.replace(&snapshots)?;
            } else {
                self.journal.rewrite(&snapshots)?;
            }
            self.journal_dirty = false;
            self.journal_replace = false;
            self.pending_acks.clear();
            self.pending_failures.clear();
            return Ok(());
        }
        if self.pending_acks.is_empty() && self.pending_failures.is_empty() {
            return Ok(());
        }
        if !self.pending_acks.is_empty() {
            let mut payload = Vec::with_capacity(5 + self.pending_acks.len() * 12);
            payload.push(TAG_ACKS);
            payload.extend_from_slice(&(self.pending_acks.len() as u32).to_le_bytes());
            for (partition, offset) in &self.pending_acks {
                payload.extend_from_slice(&partition.to_le_bytes());
                payload.extend_from_slice(&offset.to_le_bytes());
            }
            self.journal.append(&payload);
        }
        if !self.pending_failures.is_empty() {
            self.journal
                .append(&encode_failures(&self.pending_failures));
        }
        self.journal.sync()?;
        self.pending_acks.clear();
        self.pending_failures.clear();
        Ok(())
    }

    /// One snapshot per partition, then the failed attempts of the
    /// messages still unacked (pending, or not reached since a restart).
    fn snapshots(&self) -> Vec<Vec<u8>> {
        let mut payloads: Vec<Vec<u8>> = self
            .partitions
            .iter()
            .enumerate()
            .map(|(partition, state)| {
                let mut payload = vec![TAG_SNAPSHOT];
                payload.extend_from_slice(&(partition as u32).to_le_bytes());
                state.acks.encode(&mut payload);
                payload
            })
            .collect();
        let mut failures = Vec::new();
        for (partition, state) in self.partitions.iter().enumerate() {
            let pending = state
                .pending
                .iter()
                .map(|(&offset, pending)| (offset, pending.failed_attempts()));
            let unread = state
                .failed_before
                .iter()
                .map(|(&offset, &failed)| (offset, failed));
            failures.extend(
                pending
                    .chain(unread)
                    .filter(|&(offset, failed)| failed > 0 && !state.acks.is_acked(offset))
                    .map(|(offset, failed)| (partition as u32, offset, failed)),
            );
        }
        if !failures.is_empty() {
            payloads.push(encode_failures(&failures));
        }
        payloads
    }

    /// Bytes of the ack journal.
    #[cfg(test)]
    pub(crate) fn journal_bytes(&self) -> u64 {
        self.journal.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, Storage};
    use dmq_log_store::ManualClock;
    use std::sync::Arc;

    fn key() -> StateKey {
        StateKey {
            topic: "t".into(),
            group: "g".into(),
            member: None,
        }
    }

    /// A group of one partition, starting at 0, restored from `payloads`.
    fn one_partition_group(journal: Box<dyn Journal>, payloads: &[Vec<u8>]) -> GroupState {
        GroupState::restore(
            key(),
            GroupConfig::default(),
            1,
            journal,
            payloads,
            0,
            |_| 0,
        )
        .unwrap()
        .0
    }

    #[test]
    fn acks_survive_a_restart_once_synced() {
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        let (journal, payloads) = storage.open_journal(&key().journal_name()).unwrap();
        let (mut group, new) = GroupState::restore(
            key(),
            GroupConfig::default(),
            2,
            journal,
            &payloads,
            0,
            |p| u64::from(p) * 100,
        )
        .unwrap();
        assert!(new);
        group.sync(0, u64::MAX).unwrap();
        for offset in [0, 2, 3, 7] {
            group.partitions[0].acks.ack(offset);
            group.note_ack(0, offset);
        }
        group.partitions[1].acks.ack(100);
        group.note_ack(1, 100);
        group.sync(1, u64::MAX).unwrap();
        group.partitions[0].acks.ack(1);
        group.note_ack(0, 1); // never synced: lost in the crash
        drop(group);
        let (journal, payloads) = storage.open_journal(&key().journal_name()).unwrap();
        let (group, new) = GroupState::restore(
            key(),
            GroupConfig::default(),
            2,
            journal,
            &payloads,
            0,
            |_| 999,
        )
        .unwrap();
        assert!(!new);
        let acks = &group.partitions[0].acks;
        assert_eq!(acks.floor(), 1);
        assert!(acks.is_acked(2) && acks.is_acked(3) && acks.is_acked(7));
        assert!(!acks.is_acked(1) && !acks.is_acked(4));
        assert_eq!(group.partitions[1].acks.floor(), 101);
    }

    #[test]
    fn compaction_keeps_the_same_bitmaps() {
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        let (journal, payloads) = storage.open_journal("j").unwrap();
        let mut group = one_partition_group(journal, &payloads);
        for offset in (0..10_000).filter(|o| o % 3 != 1) {
            group.partitions[0].acks.ack(offset);
            group.note_ack(0, offset);
            if offset % 100 == 0 {
                group.sync(0, 4096).unwrap();
            }
        }
        group.sync(0, 4096).unwrap();
        assert!(
            group.journal_bytes() < 64 * 1024,
            "{}",
            group.journal_bytes()
        );
        let (journal, payloads) = storage.open_journal("j").unwrap();
        let restored = one_partition_group(journal, &payloads);
        for offset in 0..10_000 {
            assert_eq!(
                restored.partitions[0].acks.is_acked(offset),
                offset % 3 != 1,
                "{offset}"
            );
        }
    }

    /// A replicated journal may hold a second snapshot of a partition
    /// (another node's, kept after a compaction that had not seen it):
    /// the restored group holds the acks of both. Replayed as a
    /// replacement, the second undid the first's acks.
    #[test]
    fn a_second_snapshot_of_a_partition_adds_its_acks() {
        let snapshot = |acked: &[u64]| {
            let mut bitmap = AckBitmap::new(0);
            for offset in acked {
                bitmap.ack(*offset);
            }
            let mut payload = vec![TAG_SNAPSHOT];
            payload.extend_from_slice(&0u32.to_le_bytes());
            bitmap.encode(&mut payload);
            payload
        };
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        let (journal, _) = storage.open_journal("j").unwrap();
        let payloads = [snapshot(&[0, 1, 5, 9]), snapshot(&[0, 3, 7])];
        let restored = one_partition_group(journal, &payloads);
        let acked: Vec<u64> = (0..12)
            .filter(|offset| restored.partitions[0].acks.is_acked(*offset))
            .collect();
        assert_eq!(acked, [0, 1, 3, 5, 7, 9]);
    }

    /// Failed attempts replay to the highest count per message, skip
    /// acked messages, stop at `max_attempts - 1`, and a seek of the
    /// partition clears the ones before it.
    #[test]
    fn failed_attempts_replay_to_the_highest_count_until_a_seek() {
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        let (journal, _) = storage.open_journal("j").unwrap();
        let config = GroupConfig {
            max_attempts: 5,
            ..GroupConfig::default()
        };
        let acks = |offsets: &[u64]| {
            let mut payload = vec![TAG_ACKS];
            payload.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
            for offset in offsets {
                payload.extend_from_slice(&0u32.to_le_bytes());
                payload.extend_from_slice(&offset.to_le_bytes());
            }
            payload
        };
        let seek = |floor: u64| {
            let mut payload = vec![TAG_SEEK];
            payload.extend_from_slice(&0u32.to_le_bytes());
            payload.extend_from_slice(&floor.to_le_bytes());
            payload
        };
        let restore = |payloads: &[Vec<u8>]| {
            let (journal, _) = storage.open_journal("j").unwrap();
            let (group, _) =
                GroupState::restore(key(), config.clone(), 1, journal, payloads, 0, |_| 0).unwrap();
            group.partitions[0].failed_before.clone()
        };
        drop(journal);
        let mut start = vec![TAG_SNAPSHOT];
        start.extend_from_slice(&0u32.to_le_bytes());
        AckBitmap::new(0).encode(&mut start);
        let payloads = vec![
            start,
            encode_failures(&[(0, 3, 2), (0, 4, 1), (0, 6, 9)]),
            encode_failures(&[(0, 3, 1), (0, 4, 3)]),
            acks(&[6]),
            encode_failures(&[(0, 8, 9)]),
        ];
        assert_eq!(
            restore(&payloads).into_iter().collect::<Vec<_>>(),
            [(3, 2), (4, 3), (8, 4)]
        );
        let mut sought = payloads.clone();
        sought.push(seek(2));
        sought.push(encode_failures(&[(0, 5, 1)]));
        assert_eq!(restore(&sought).into_iter().collect::<Vec<_>>(), [(5, 1)]);
    }

    #[test]
    fn rate_limiter_allows_the_rate() {
        let mut limiter = RateLimiter::new(10, 0);
        let taken = (0..100).filter(|_| limiter.try_take(0)).count();
        assert_eq!(taken, 10);
        assert!(!limiter.try_take(50));
        assert_eq!(limiter.next_token_ms(), 100);
        assert!(limiter.try_take(100));
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let storage = MemoryStorage::new(Arc::new(ManualClock::new(0)));
        for bad in [
            vec![],
            vec![9],
            vec![2, 1, 0, 0, 0],
            vec![3, 0, 0],
            vec![4, 1, 0, 0, 0],
            encode_failures(&[(0, 1, 1)])[..20].to_vec(),
        ] {
            let (journal, _) = storage.open_journal("bad").unwrap();
            let result =
                GroupState::restore(key(), GroupConfig::default(), 1, journal, &[bad], 0, |_| 0);
            assert!(result.is_err());
        }
    }
}
