//! The idempotent producers' dedup window: per (topic, producer id), the
//! last sequence stored and the answer it got, so that a retried PRODUCE
//! gets its original offsets instead of being stored twice. The key has no
//! partition: a retried batch of unkeyed records may be routed to another
//! partition (round robin), and must still be found.
//!
//! Invariants: the window holds at most `max_entries` producers and about
//! `max_bytes` of answers (an answer is counted at 32 bytes per record plus
//! its key); past either bound the producer that was stored longest ago is
//! forgotten first. A producer forgotten by the window (or by a restart
//! beyond the rebuild range) that retries its last batch gets it stored
//! again: at least once, never lost. Producer ids are random per client
//! producer, so without a bound the window would grow with uptime.

use std::collections::{HashMap, VecDeque};

use dmq_protocol::ProduceOk;

/// (topic, producer id).
pub type DedupKey = (String, u64);

/// Bytes counted per record of a remembered answer.
const RECORD_BYTES: usize = 32;
/// Bytes counted per entry besides its records and topic name.
const ENTRY_BYTES: usize = 96;

#[derive(Debug)]
struct Entry {
    sequence: u64,
    response: ProduceOk,
    /// Matches the entry's newest slot in `order`.
    stamp: u64,
    bytes: usize,
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

    /// The last sequence of `key` and its answer.
    pub fn get(&self, key: &DedupKey) -> Option<(u64, &ProduceOk)> {
        self.entries
            .get(key)
            .map(|entry| (entry.sequence, &entry.response))
    }

    /// Remembers `sequence` and its answer as `key`'s last.
    pub fn insert(&mut self, key: DedupKey, sequence: u64, response: ProduceOk) {
        let bytes = ENTRY_BYTES + key.0.len() + response.records.len() * RECORD_BYTES;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.push_back((key.clone(), stamp));
        let entry = Entry {
            sequence,
            response,
            stamp,
            bytes,
        };
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
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

    #[test]
    fn the_window_is_bounded_by_producers_and_oldest_go_first() {
        let mut window = DedupWindow::new(1_000, usize::MAX);
        for producer in 0..100_000u64 {
            window.insert(("t".into(), producer), 1, answer(1));
            assert!(window.len() <= 1_000);
            assert!(window.order_len() <= 2 * 1_000 + 64);
        }
        assert_eq!(window.evicted(), 99_000);
        assert!(window.get(&("t".into(), 98_999)).is_none());
        assert_eq!(window.get(&("t".into(), 99_999)).map(|e| e.0), Some(1));
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
        assert!(window.get(&("t".into(), 1)).is_none());
        assert_eq!(window.get(&("t".into(), 0)).map(|e| e.0), Some(2));
        // Many re-stores of one producer leave few stale slots.
        for sequence in 3..10_000 {
            window.insert(("t".into(), 0), sequence, answer(1));
        }
        assert!(window.order_len() <= 2 * 3 + 64);
        assert_eq!(window.len(), 3);
    }

    #[test]
    fn the_window_is_bounded_by_bytes() {
        let mut window = DedupWindow::new(usize::MAX, 1 << 20);
        for producer in 0..1_000u64 {
            window.insert(("t".into(), producer), 1, answer(1_000));
        }
        // 32 KB per answer: about 32 fit in 1 MiB.
        assert!(window.len() <= 33, "{}", window.len());
        assert!(window.len() >= 30, "{}", window.len());
    }
}
