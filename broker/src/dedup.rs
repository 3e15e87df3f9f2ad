//! The idempotent producers' dedup window: per (topic, producer id), the
//! answers of its [`SEQUENCES_PER_PRODUCER`] latest stored sequences, so
//! that a retried PRODUCE gets its original offsets instead of being stored
//! twice. The key has no partition: a retried batch of unkeyed records may
//! be routed to another partition (round robin), and must still be found.
//!
//! Several sequences, not only the last: a producer pipelines batches, and
//! when its connection drops it retries those in flight through its next
//! connection (on a cluster, maybe another node) while newer batches may
//! already have gone out there. A retried sequence below the newest is
//! answered if it was stored, and stored if it was not (a pipelined batch
//! whose first try failed while later ones were stored), as long as the
//! window can tell the two apart: it can for every sequence from the
//! entry's `floor` up (0, raised past any sequence it had to drop to keep
//! [`SEQUENCES_PER_PRODUCER`]); below the floor it refuses with
//! `OutOfOrderSequence`.
//!
//! Answers are stored compactly ([`CompactAnswer`]): a run of records with
//! consecutive offsets and ids in one partition (what one append of a batch
//! gives) is one run (56 bytes), whatever its length.
//!
//! Invariants: every sequence of a producer that this window gave or
//! learned since its entry was made, at or above the entry's floor, is
//! among the entry's answers;
//! the window holds at most `max_entries` producers and at most `max_bytes`
//! of entries, each counted at its real size (its runs, its key and a fixed
//! overhead for the maps and order slots); past either bound the producer
//! that was stored longest ago is forgotten first. A producer forgotten by
//! the window (or by a restart beyond the rebuild range) that retries a
//! batch gets it stored again: at least once, never lost. Producer ids are
//! random per client producer, so without a bound the window would grow
//! with uptime.

use std::collections::{BTreeMap, HashMap, VecDeque};

use dmq_protocol::{MessageId, ProduceOk, ProducedRecord};

/// (topic, producer id).
pub type DedupKey = (String, u64);

/// Bytes counted per entry besides its runs and topic name: the entry, its
/// map slot, its order slot and the key's string header.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>()
    + std::mem::size_of::<DedupKey>() * 2
    + std::mem::size_of::<u64>() * 2;

/// Records of an answer that follow each other: partition `partition`,
/// offsets `first_offset + k` (or all delayed), ids `first_id + k` (same
/// time prefix, unique part counting up), one deliver-at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    partition: u32,
    count: u32,
    first_offset: Option<u64>,
    deliver_at_ms: Option<i64>,
    first_id: [u8; 16],
}

/// A PRODUCE answer as runs of consecutive records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactAnswer(Box<[Run]>);

fn id_plus(id: &[u8; 16], k: u32) -> Option<[u8; 16]> {
    let mut unique = [0u8; 8];
    unique.copy_from_slice(&id[8..]);
    let unique = u64::from_be_bytes(unique).checked_add(u64::from(k))?;
    let mut next = *id;
    next[8..].copy_from_slice(&unique.to_be_bytes());
    Some(next)
}

impl CompactAnswer {
    /// The runs of `answer`.
    pub fn of(answer: &ProduceOk) -> CompactAnswer {
        let mut runs: Vec<Run> = Vec::new();
        for record in &answer.records {
            if let Some(run) = runs.last_mut() {
                let follows = run.partition == record.partition
                    && run.deliver_at_ms == record.deliver_at_ms
                    && run.count < u32::MAX
                    && match (run.first_offset, record.offset) {
                        (Some(first), Some(offset)) => {
                            first.checked_add(u64::from(run.count)) == Some(offset)
                        }
                        (None, None) => true,
                        _ => false,
                    }
                    && id_plus(&run.first_id, run.count) == Some(record.message_id.0);
                if follows {
                    run.count += 1;
                    continue;
                }
            }
            runs.push(Run {
                partition: record.partition,
                count: 1,
                first_offset: record.offset,
                deliver_at_ms: record.deliver_at_ms,
                first_id: record.message_id.0,
            });
        }
        CompactAnswer(runs.into_boxed_slice())
    }

    /// The answer again, record by record.
    pub fn expand(&self) -> ProduceOk {
        let mut records = Vec::with_capacity(self.0.iter().map(|r| r.count as usize).sum());
        for run in self.0.iter() {
            for k in 0..run.count {
                records.push(ProducedRecord {
                    partition: run.partition,
                    offset: run.first_offset.map(|first| first + u64::from(k)),
                    // `of` only extends a run while the ids count up.
                    message_id: MessageId(id_plus(&run.first_id, k).unwrap_or(run.first_id)),
                    deliver_at_ms: run.deliver_at_ms,
                });
            }
        }
        ProduceOk { records }
    }

    /// Heap bytes of the runs.
    fn bytes(&self) -> usize {
        self.0.len() * std::mem::size_of::<Run>()
    }
}

/// Sequences remembered per producer: twice the Rust client's default
/// `max_in_flight_batches` (16), so that every batch a default producer
/// may retry after a dropped connection is still told apart.
pub const SEQUENCES_PER_PRODUCER: usize = 32;

/// Bytes counted per remembered sequence besides its runs: its map slot.
const ANSWER_BYTES: usize = std::mem::size_of::<u64>() + std::mem::size_of::<CompactAnswer>() + 16;

#[derive(Debug)]
struct Entry {
    /// The latest stored sequences and their answers, at most
    /// [`SEQUENCES_PER_PRODUCER`].
    answers: BTreeMap<u64, CompactAnswer>,
    /// Every stored sequence at or above it is in `answers`.
    floor: u64,
    /// Matches the entry's newest slot in `order`.
    stamp: u64,
    bytes: usize,
}

/// What the window knows of a producer's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Stored: its original answer.
    Stored(ProduceOk),
    /// Not stored (as far as the window can tell): store it.
    New,
    /// Below what the window can tell apart (the producer's floor): it may
    /// or may not have been stored.
    TooOld {
        /// The lowest sequence the window can tell apart.
        floor: u64,
    },
}

/// A bounded map of producers' last sequences (see the module doc).
#[derive(Debug)]
pub struct DedupWindow {
    entries: HashMap<DedupKey, Entry>,
    /// Insertion order: (key, stamp); a slot whose stamp is not its entry's
    /// is stale and skipped.
    order: VecDeque<(DedupKey, u64)>,
    next_stamp: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    evicted: u64,
}

impl DedupWindow {
    /// An empty window of at most `max_entries` producers and `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> DedupWindow {
        DedupWindow {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            evicted: 0,
        }
    }

    /// Whether `sequence` of `key`, a batch of `records` records, was
    /// stored. A stored answer of another size (a part of a batch split
    /// over partitions, learned from one replica) is not its answer: such a
    /// batch counts as new (stored again: at least once).
    pub fn check(&self, key: &DedupKey, sequence: u64, records: usize) -> Seen {
        let Some(entry) = self.entries.get(key) else {
            return Seen::New;
        };
        if let Some(answer) = entry.answers.get(&sequence) {
            let answer = answer.expand();
            if answer.records.len() == records {
                return Seen::Stored(answer);
            }
            return Seen::New;
        }
        if sequence < entry.floor {
            return Seen::TooOld { floor: entry.floor };
        }
        Seen::New
    }

    /// The latest sequence of `key` and its answer, for tests.
    #[cfg(test)]
    fn latest(&self, key: &DedupKey) -> Option<(u64, ProduceOk)> {
        let entry = self.entries.get(key)?;
        let (sequence, answer) = entry.answers.last_key_value()?;
        Some((*sequence, answer.expand()))
    }

    /// Remembers that `sequence` of `key` was stored with this answer
    /// (the answer this node gave: it replaces a part learned before).
    pub fn insert(&mut self, key: DedupKey, sequence: u64, response: ProduceOk) {
        self.store(key, sequence, response, true);
    }

    /// Remembers a committed batch that a cluster replica applied
    /// (`sequence`, the answer of its part in one partition), unless the
    /// window holds `sequence` already: the whole answer this node gave
    /// stays, whichever came first.
    pub fn learn(&mut self, key: DedupKey, sequence: u64, response: ProduceOk) {
        self.store(key, sequence, response, false);
    }

    fn store(&mut self, key: DedupKey, sequence: u64, response: ProduceOk, replace: bool) {
        let response = CompactAnswer::of(&response);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let before = self.entries.get(&key).map_or(0, |entry| entry.bytes);
        let entry = self.entries.entry(key.clone()).or_insert_with(|| Entry {
            answers: BTreeMap::new(),
            floor: 0,
            stamp,
            bytes: ENTRY_BYTES + key.0.len(),
        });
        if entry.answers.contains_key(&sequence) && !replace {
            return;
        }
        let added = ANSWER_BYTES + response.bytes();
        if let Some(old) = entry.answers.insert(sequence, response) {
            entry.bytes -= ANSWER_BYTES + old.bytes();
        }
        entry.bytes += added;
        while entry.answers.len() > SEQUENCES_PER_PRODUCER {
            if let Some((dropped, answer)) = entry.answers.pop_first() {
                entry.bytes -= ANSWER_BYTES + answer.bytes();
                entry.floor = entry.floor.max(dropped + 1);
            }
        }
        entry.stamp = stamp;
        let after = entry.bytes;
        self.bytes = self.bytes + after - before;
        self.order.push_back((key, stamp));
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((oldest, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&oldest).is_some_and(|e| e.stamp == stamp) {
                if let Some(entry) = self.entries.remove(&oldest) {
                    self.bytes -= entry.bytes;
                    self.evicted += 1;
                }
            }
        }
        // Stale slots (producers that stored again) are dropped once they
        // outnumber the live ones, so `order` stays within twice the bound.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(key, stamp)| entries.get(key).is_some_and(|e| e.stamp == *stamp));
        }
        debug_assert!(self.entries.len() <= self.max_entries);
    }

    /// Producers remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Producers forgotten to keep the bounds, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Slots of the insertion order (live and stale), for tests.
    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmq_protocol::ProducedRecord;

    fn answer(records: usize) -> ProduceOk {
        ProduceOk {
            records: (0..records)
                .map(|i| ProducedRecord {
                    partition: 0,
                    offset: Some(i as u64),
                    message_id: dmq_protocol::MessageId([0; 16]),
                    deliver_at_ms: None,
                })
                .collect(),
        }
    }

    /// An answer as one append gives it: consecutive offsets and ids.
    fn appended(partition: u32, base: u64, records: u64) -> Vec<ProducedRecord> {
        (0..records)
            .map(|i| {
                let mut id = [7u8; 16];
                id[8..].copy_from_slice(&(1_000 + i).to_be_bytes());
                ProducedRecord {
                    partition,
                    offset: Some(base + i),
                    message_id: dmq_protocol::MessageId(id),
                    deliver_at_ms: None,
                }
            })
            .collect()
    }

    #[test]
    fn one_append_is_one_run_and_every_answer_expands_back() {
        let batch = ProduceOk {
            records: appended(2, 40, 1_000),
        };
        let compact = CompactAnswer::of(&batch);
        assert_eq!(compact.0.len(), 1);
        assert_eq!(compact.expand(), batch);
        // Keyed records spread over partitions, a delayed one, ids that do
        // not count up: several runs, the same answer back.
        let mut mixed = appended(0, 5, 3);
        mixed.extend(appended(1, 9, 2));
        mixed.push(ProducedRecord {
            partition: 1,
            offset: None,
            message_id: dmq_protocol::MessageId([9; 16]),
            deliver_at_ms: Some(77),
        });
        mixed.push(ProducedRecord {
            partition: 1,
            offset: None,
            message_id: dmq_protocol::MessageId([1; 16]),
            deliver_at_ms: Some(77),
        });
        mixed.extend(appended(0, 8, 1));
        let mixed = ProduceOk { records: mixed };
        let compact = CompactAnswer::of(&mixed);
        assert_eq!(compact.0.len(), 5);
        assert_eq!(compact.expand(), mixed);
        // An id at the top of its counter does not wrap into a run.
        let mut top = appended(0, 0, 2);
        top[0].message_id.0[8..].copy_from_slice(&u64::MAX.to_be_bytes());
        top[1].message_id.0[8..].copy_from_slice(&0u64.to_be_bytes());
        let top = ProduceOk { records: top };
        assert_eq!(CompactAnswer::of(&top).0.len(), 2);
        assert_eq!(CompactAnswer::of(&top).expand(), top);
    }

    #[test]
    fn the_window_is_bounded_by_producers_and_oldest_go_first() {
        let mut window = DedupWindow::new(1_000, usize::MAX);
        for producer in 0..100_000u64 {
            window.insert(("t".into(), producer), 1, answer(1));
            assert!(window.len() <= 1_000);
            assert!(window.order_len() <= 2 * 1_000 + 64);
        }
        assert_eq!(window.evicted(), 99_000);
        assert!(window.latest(&("t".into(), 98_999)).is_none());
        assert_eq!(window.latest(&("t".into(), 99_999)).map(|e| e.0), Some(1));
    }

    #[test]
    fn a_producer_that_stores_again_is_kept_as_the_newest() {
        let mut window = DedupWindow::new(3, usize::MAX);
        for producer in 0..3u64 {
            window.insert(("t".into(), producer), 1, answer(1));
        }
        // Producer 0 stores again: it is now the newest, 1 goes first.
        window.insert(("t".into(), 0), 2, answer(1));
        window.insert(("t".into(), 9), 1, answer(1));
        assert!(window.latest(&("t".into(), 1)).is_none());
        assert_eq!(window.latest(&("t".into(), 0)).map(|e| e.0), Some(2));
        // Many re-stores of one producer leave few stale slots.
        for sequence in 3..10_000 {
            window.insert(("t".into(), 0), sequence, answer(1));
        }
        assert!(window.order_len() <= 2 * 3 + 64);
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn a_retry_below_the_latest_is_told_apart_down_to_the_floor() {
        let mut window = DedupWindow::new(10, usize::MAX);
        let key: DedupKey = ("t".into(), 7);
        // Even sequences 0, 2, .., 80 stored: the latest 32 are kept (18 to
        // 80), and the floor rises past the last one dropped (16).
        for sequence in (0..=80).step_by(2) {
            window.insert(key.clone(), sequence, answer(1));
        }
        assert_eq!(window.check(&key, 20, 1), Seen::Stored(answer(1)));
        assert_eq!(window.check(&key, 19, 1), Seen::New, "never stored");
        assert_eq!(window.check(&key, 81, 1), Seen::New);
        assert_eq!(window.check(&key, 15, 1), Seen::TooOld { floor: 17 });
        // Stored below the latest (a retry of a batch that never arrived):
        // remembered, and the oldest kept goes.
        window.insert(key.clone(), 19, answer(2));
        assert_eq!(window.check(&key, 19, 2), Seen::Stored(answer(2)));
        assert_eq!(window.check(&key, 18, 1), Seen::TooOld { floor: 19 });
        // An answer of another size is no answer of this batch.
        assert_eq!(window.check(&key, 20, 3), Seen::New);
        // A producer the window never saw: new, and so is a sequence below
        // its first one (a pipelined batch whose first try failed).
        let other: DedupKey = ("t".into(), 8);
        assert_eq!(window.check(&other, 5, 1), Seen::New);
        window.insert(other.clone(), 5, answer(1));
        assert_eq!(window.check(&other, 4, 1), Seen::New);
    }

    #[test]
    fn a_whole_answer_outranks_a_learned_part() {
        let mut window = DedupWindow::new(10, usize::MAX);
        let key: DedupKey = ("t".into(), 7);
        // A replica applied sequence 6 (pipelined) before this node
        // answered 5: both are remembered.
        window.learn(key.clone(), 6, answer(1));
        window.insert(key.clone(), 5, answer(2));
        assert_eq!(window.check(&key, 5, 2), Seen::Stored(answer(2)));
        assert_eq!(window.check(&key, 6, 1), Seen::Stored(answer(1)));
        assert_eq!(window.latest(&key).map(|e| e.0), Some(6));
        // This node's whole answer of 7 (two partitions' parts) is kept
        // when a replica applies one part of it after.
        window.insert(key.clone(), 7, answer(3));
        window.learn(key.clone(), 7, answer(1));
        assert_eq!(window.check(&key, 7, 3), Seen::Stored(answer(3)));
        // A part applied first is replaced by the whole answer.
        window.learn(key.clone(), 8, answer(1));
        window.insert(key.clone(), 8, answer(3));
        assert_eq!(window.check(&key, 8, 3), Seen::Stored(answer(3)));
        // Learned from a replica alone (the first try went through another
        // node): the retry finds it.
        let other: DedupKey = ("t".into(), 8);
        window.learn(other.clone(), 1, answer(4));
        assert_eq!(window.check(&other, 1, 4), Seen::Stored(answer(4)));
    }

    #[test]
    fn the_window_is_bounded_by_bytes() {
        let mut window = DedupWindow::new(usize::MAX, 1 << 20);
        for producer in 0..1_000u64 {
            window.insert(("t".into(), producer), 1, answer(1_000));
        }
        // Ids that do not count up: one run per record.
        let per_answer = 1_000 * std::mem::size_of::<Run>();
        assert!(window.len() <= (1 << 20) / per_answer, "{}", window.len());
        assert!(
            window.len() + 2 >= (1 << 20) / per_answer,
            "{}",
            window.len()
        );
        // Answers as appends give them are one run each: thousands fit.
        let mut window = DedupWindow::new(usize::MAX, 1 << 20);
        for producer in 0..10_000u64 {
            window.insert(
                ("t".into(), producer),
                1,
                ProduceOk {
                    records: appended(0, producer * 1_000, 1_000),
                },
            );
        }
        assert!(window.len() >= 3_000, "{}", window.len());
    }
}
