//! A topic's deletions ([`Tombstone`]s): which records they cover, and how
//! many stored records a new one would cover that no earlier one does.
//!
//! # Coverage
//! Each deletion is recorded with `below`: every partition's end offset at
//! the time of the deletion. An offset range, a time range or a key covers
//! only records below that bound, so a record produced after the deletion
//! (with the same key, in the same time range, at an offset of the range)
//! is delivered normally. A message id has no bound: it also covers a
//! delayed message with that id that is appended later (the wire protocol
//! promises this). Deletions stored before bounds existed have none.
//!
//! # Counting
//! Broker timestamps never decrease within a partition, so a time range
//! covers one interval of offsets per partition, found with two
//! `offset_for_timestamp` lookups. Offset and time ranges are therefore
//! counted by interval arithmetic, without reading records. Only the
//! records an earlier key or id deletion may cover are looked at: through
//! the key and id indexes, or by reading the uncovered part of the range in
//! batches (bounded memory) when it is small or when there are too many
//! earlier key and id deletions for index lookups to pay.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::{MessageId, Record};

use crate::dispatcher::Tombstone;
use crate::storage::{PartitionLog, StoreError, LOOKUP_SCAN_BATCH};

/// When [`Tombstones::count_new`] reads records instead of looking them up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CountPlan {
    /// Uncovered ranges up to this many records are read rather than looked
    /// up through indexes (a few batches).
    pub(crate) scan_always_records: u64,
    /// More earlier key and id deletions than this: read the range instead
    /// of one index lookup per deletion and partition.
    pub(crate) index_lookups_max: usize,
}

impl Default for CountPlan {
    fn default() -> Self {
        CountPlan {
            scan_always_records: 64 * 1024,
            index_lookups_max: 1024,
        }
    }
}

/// A time-range deletion.
#[derive(Debug, Clone)]
struct TimeRange {
    start_ms: i64,
    end_ms: i64,
    /// Per partition: only offsets below are covered (`None`: all).
    below: Option<Vec<u64>>,
}

/// The deletions of one topic, in the form the delivery path checks.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// (partition, start, end, bounded); `end` is already cut at the
    /// deletion's bound (`bounded`: it had one; entries from before bounds
    /// existed did not, and recovery cuts never change them).
    ranges: Vec<(u32, u64, u64, bool)>,
    ids: HashSet<MessageId>,
    times: Vec<TimeRange>,
    /// Per key, per partition: records with the key below this offset are
    /// deleted (the largest bound of the key's deletions).
    keys: HashMap<Bytes, Vec<u64>>,
}

/// Partition `partition`'s bound in `below` (`u64::MAX` without bounds).
fn bound(below: Option<&[u64]>, partition: u32) -> u64 {
    below.map_or(u64::MAX, |below| {
        below.get(partition as usize).copied().unwrap_or(0)
    })
}

impl Tombstones {
    /// Adds a deletion made when the partitions ended at `below` (`None`
    /// for no bound) on a topic of `partitions` partitions.
    pub(crate) fn add(&mut self, tombstone: &Tombstone, below: Option<&[u64]>, partitions: u32) {
        match tombstone {
            Tombstone::OffsetRange {
                partition,
                start,
                end,
            } => {
                let end = (*end).min(bound(below, *partition));
                if *start < end {
                    self.ranges.push((*partition, *start, end, below.is_some()));
                }
            }
            Tombstone::MessageId(text) => {
                if let Ok(id) = text.parse() {
                    self.ids.insert(id);
                }
            }
            Tombstone::TimeRange { start_ms, end_ms } => {
                if start_ms < end_ms {
                    self.times.push(TimeRange {
                        start_ms: *start_ms,
                        end_ms: *end_ms,
                        below: below.map(<[u64]>::to_vec),
                    });
                }
            }
            Tombstone::Key(key) => {
                let bounds = self
                    .keys
                    .entry(Bytes::copy_from_slice(key))
                    .or_insert_with(|| vec![0; partitions as usize]);
                for (partition, slot) in bounds.iter_mut().enumerate() {
                    *slot = (*slot).max(bound(below, partition as u32));
                }
            }
        }
    }

    /// True if a bounded deletion reaches at or past `end` in `partition`:
    /// after recovery cut the log back to `end`, new records will take
    /// those offsets and such a deletion would cover them.
    pub(crate) fn bounded_past(&self, partition: u32, end: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(p, _, to, bounded)| bounded && p == partition && to > end)
            || self.times.iter().any(|t| {
                t.below
                    .as_deref()
                    .is_some_and(|below| bound(Some(below), partition) > end)
            })
            || self
                .keys
                .values()
                .any(|bounds| bound(Some(bounds), partition) > end)
    }

    /// The log of `partition` was cut back to `end` at recovery: every
    /// bounded deletion now stops at `end`, so records that later take the
    /// lost offsets are not covered. (Unbounded ones, message ids and
    /// entries from before bounds existed, stay as they are.)
    pub(crate) fn cut(&mut self, partition: u32, end: u64) {
        for range in &mut self.ranges {
            if range.0 == partition && range.3 {
                range.2 = range.2.min(end);
            }
        }
        self.ranges.retain(|&(_, from, to, _)| from < to);
        for time in &mut self.times {
            if let Some(slot) = time
                .below
                .as_mut()
                .and_then(|below| below.get_mut(partition as usize))
            {
                *slot = (*slot).min(end);
            }
        }
        for bounds in self.keys.values_mut() {
            if let Some(slot) = bounds.get_mut(partition as usize) {
                *slot = (*slot).min(end);
            }
        }
    }

    /// The end of the run of offsets, from `log`'s start offset, that
    /// offset-range and time-range deletions cover without a gap: every
    /// stored record of `partition` below it is deleted. (Key and id
    /// deletions are not counted: they rarely cover whole runs.)
    pub(crate) fn covered_prefix_end(
        &self,
        partition: u32,
        log: &dyn PartitionLog,
    ) -> Result<u64, StoreError> {
        let (start, end) = (log.start_offset(), log.end_offset());
        let mut intervals: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .filter(|(p, _, _, _)| *p == partition)
            .map(|&(_, from, to, _)| (from, to.min(end)))
            .collect();
        for time in &self.times {
            let to = bound(time.below.as_deref(), partition).min(end);
            if start < to {
                intervals.push(time_interval(log, time.start_ms, time.end_ms, start, to)?);
            }
        }
        intervals.sort_unstable();
        let mut covered = start;
        for (from, to) in intervals {
            if from > covered {
                break;
            }
            covered = covered.max(to);
        }
        Ok(covered)
    }

    /// True if a deletion covers `record` of `partition`.
    pub(crate) fn covers(&self, partition: u32, record: &Record) -> bool {
        self.ranges
            .iter()
            .any(|&(p, start, end, _)| p == partition && (start..end).contains(&record.offset))
            || self.covers_by_id_or_key(partition, record)
            || self.times.iter().any(|t| {
                (t.start_ms..t.end_ms).contains(&record.timestamp_ms)
                    && record.offset < bound(t.below.as_deref(), partition)
            })
    }

    fn covers_by_key(&self, partition: u32, record: &Record) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        record
            .key
            .as_ref()
            .and_then(|key| self.keys.get(key))
            .is_some_and(|bounds| record.offset < bound(Some(bounds), partition))
    }

    fn covers_by_id_or_key(&self, partition: u32, record: &Record) -> bool {
        self.ids.contains(&record.id) || self.covers_by_key(partition, record)
    }

    /// How many records stored in `logs` (partition `p` from its start
    /// offset to `ends[p]`) `tombstone` covers that no deletion here covers.
    /// The caller checked the tombstone (partition in range, id parses).
    pub(crate) fn count_new(
        &self,
        logs: &[Arc<dyn PartitionLog>],
        tombstone: &Tombstone,
        ends: &[u64],
        plan: CountPlan,
    ) -> Result<u64, StoreError> {
        let mut count = 0;
        for (p, (log, &end)) in logs.iter().zip(ends).enumerate() {
            let partition = p as u32;
            let log = log.as_ref();
            let start = log.start_offset();
            if start >= end {
                continue;
            }
            count += match tombstone {
                Tombstone::OffsetRange {
                    partition: only,
                    start: from,
                    end: to,
                } => {
                    if *only != partition {
                        continue;
                    }
                    let (from, to) = ((*from).max(start), (*to).min(end));
                    self.count_interval(log, partition, from, to, plan)?
                }
                Tombstone::TimeRange { start_ms, end_ms } => {
                    if start_ms >= end_ms {
                        continue;
                    }
                    let (from, to) = time_interval(log, *start_ms, *end_ms, start, end)?;
                    self.count_interval(log, partition, from, to, plan)?
                }
                Tombstone::MessageId(text) => {
                    let Ok(id) = text.parse::<MessageId>() else {
                        return Ok(0);
                    };
                    if self.ids.contains(&id) {
                        return Ok(0);
                    }
                    match log.find_by_id(&id)? {
                        Some(record)
                            if (start..end).contains(&record.offset)
                                && !self.covers(partition, &record) =>
                        {
                            1
                        }
                        _ => 0,
                    }
                }
                Tombstone::Key(key) => {
                    // Records below an earlier deletion of the key are covered.
                    let covered_below = self
                        .keys
                        .get(key.as_slice())
                        .map_or(0, |bounds| bound(Some(bounds), partition));
                    let mut found = 0;
                    for_each_with_key(log, key, start.max(covered_below), end, |record| {
                        if !self.covers(partition, record) {
                            found += 1;
                        }
                    })?;
                    found
                }
            };
        }
        Ok(count)
    }

    /// Records in `from..to` of `partition` that no deletion covers.
    fn count_interval(
        &self,
        log: &dyn PartitionLog,
        partition: u32,
        from: u64,
        to: u64,
        plan: CountPlan,
    ) -> Result<u64, StoreError> {
        if from >= to {
            return Ok(0);
        }
        let covered = self.covered_intervals(log, partition, from, to)?;
        let gaps = subtract(from, to, &covered);
        let uncovered: u64 = gaps.iter().map(|(a, b)| b - a).sum();
        if uncovered == 0 || (self.ids.is_empty() && self.keys.is_empty()) {
            return Ok(uncovered);
        }
        let lookups = self.ids.len() + self.keys.len();
        let by_id_or_key =
            if uncovered <= plan.scan_always_records || lookups > plan.index_lookups_max {
                self.read_covered_in(log, partition, &gaps)?
            } else {
                self.look_up_covered_in(log, partition, &gaps)?
            };
        Ok(uncovered - by_id_or_key)
    }

    /// Offsets of `from..to` that offset and time ranges cover: sorted,
    /// disjoint intervals.
    fn covered_intervals(
        &self,
        log: &dyn PartitionLog,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut intervals: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .filter(|&&(p, _, _, _)| p == partition)
            .map(|&(_, start, end, _)| (start.max(from), end.min(to)))
            .filter(|(start, end)| start < end)
            .collect();
        for time in &self.times {
            let (start, end) = time_interval(log, time.start_ms, time.end_ms, from, to)?;
            let end = end.min(bound(time.below.as_deref(), partition));
            if start < end {
                intervals.push((start, end));
            }
        }
        intervals.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
        for (start, end) in intervals {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(merged)
    }

    /// Records in `gaps` covered by an id or key deletion, by reading them.
    fn read_covered_in(
        &self,
        log: &dyn PartitionLog,
        partition: u32,
        gaps: &[(u64, u64)],
    ) -> Result<u64, StoreError> {
        let mut covered = 0;
        for &(from, to) in gaps {
            let mut next = from;
            while next < to {
                let records = log.read(next, LOOKUP_SCAN_BATCH)?;
                let Some(last) = records.last() else { break };
                let after = last.offset + 1;
                for record in records.iter().filter(|r| (next..to).contains(&r.offset)) {
                    if self.covers_by_id_or_key(partition, record) {
                        covered += 1;
                    }
                }
                next = after;
            }
        }
        Ok(covered)
    }

    /// Records in `gaps` covered by an id or key deletion, through the
    /// log's key and id lookups.
    fn look_up_covered_in(
        &self,
        log: &dyn PartitionLog,
        partition: u32,
        gaps: &[(u64, u64)],
    ) -> Result<u64, StoreError> {
        let (Some(&(from, _)), Some(&(_, to))) = (gaps.first(), gaps.last()) else {
            return Ok(0);
        };
        let in_gaps = |offset: u64| {
            let at = gaps.partition_point(|&(_, end)| end <= offset);
            gaps.get(at).is_some_and(|&(start, _)| start <= offset)
        };
        let mut covered = 0;
        // A record has one key: the keys' sets of records are disjoint.
        for (key, bounds) in &self.keys {
            let to = to.min(bound(Some(bounds), partition));
            for_each_with_key(log, key, from, to, |record| {
                if in_gaps(record.offset) {
                    covered += 1;
                }
            })?;
        }
        for id in &self.ids {
            if let Some(record) = log.find_by_id(id)? {
                if in_gaps(record.offset) && !self.covers_by_key(partition, &record) {
                    covered += 1;
                }
            }
        }
        Ok(covered)
    }
}

/// Offsets `from..to` of `log` whose timestamps are in `start_ms..end_ms`
/// (timestamps never decrease within a partition), cut to `from..to`.
fn time_interval(
    log: &dyn PartitionLog,
    start_ms: i64,
    end_ms: i64,
    from: u64,
    to: u64,
) -> Result<(u64, u64), StoreError> {
    let first = log.offset_for_timestamp(start_ms)?.unwrap_or(to);
    let after = log.offset_for_timestamp(end_ms)?.unwrap_or(to);
    Ok((first.clamp(from, to), after.clamp(from, to)))
}

/// `from..to` minus sorted, disjoint `covered` intervals.
fn subtract(from: u64, to: u64, covered: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut at = from;
    for &(start, end) in covered {
        if start > at {
            gaps.push((at, start.min(to)));
        }
        at = at.max(end);
        if at >= to {
            break;
        }
    }
    if at < to {
        gaps.push((at, to));
    }
    gaps
}

/// Calls `visit` for every record of `log` with `key` in `from..to`, in
/// offset order, a page of [`LOOKUP_SCAN_BATCH`] at a time.
fn for_each_with_key(
    log: &dyn PartitionLog,
    key: &[u8],
    from: u64,
    to: u64,
    mut visit: impl FnMut(&Record),
) -> Result<(), StoreError> {
    let mut next = from;
    while next < to {
        let page = log.find_by_key_from(key, next, LOOKUP_SCAN_BATCH)?;
        let full = page.len() >= LOOKUP_SCAN_BATCH;
        let Some(last) = page.last() else { break };
        let after = last.offset + 1;
        for record in page.iter().filter(|r| (next..to).contains(&r.offset)) {
            visit(record);
        }
        if !full {
            break;
        }
        next = after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryLog;
    use dmq_log_store::{ManualClock, RecordInput};

    /// xorshift64*: seeded, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// The model: does `tombstone`, bounded by `below`, cover `record`?
    fn model_covers(
        tombstone: &Tombstone,
        below: Option<&[u64]>,
        partition: u32,
        record: &Record,
    ) -> bool {
        let stored_then = below.is_none_or(|below| record.offset < below[partition as usize]);
        stored_then
            && match tombstone {
                Tombstone::OffsetRange {
                    partition: p,
                    start,
                    end,
                } => *p == partition && (*start..*end).contains(&record.offset),
                Tombstone::MessageId(text) => {
                    text.parse::<MessageId>().is_ok_and(|id| id == record.id)
                }
                Tombstone::TimeRange { start_ms, end_ms } => {
                    (*start_ms..*end_ms).contains(&record.timestamp_ms)
                }
                Tombstone::Key(key) => record.key.as_deref() == Some(key.as_slice()),
            }
    }

    const KEYS: [&str; 3] = ["a", "b", "c"];

    /// Three partitions of 0..400 records, timestamps 1000.. in steps of
    /// 0..3 ms (often equal), keys a/b/c/none.
    fn logs(rng: &mut Rng) -> (Vec<Arc<dyn PartitionLog>>, Vec<Vec<Record>>) {
        let clock = Arc::new(ManualClock::new(1_000));
        let logs: Vec<Arc<dyn PartitionLog>> = (0..3u64)
            .map(|p| Arc::new(MemoryLog::new(clock.clone(), p << 40)) as Arc<dyn PartitionLog>)
            .collect();
        for _ in 0..rng.below(400) {
            let log = &logs[rng.below(3) as usize];
            let mut input = RecordInput::new("v");
            if let Some(key) = KEYS.get(rng.below(4) as usize) {
                input = input.with_key(*key);
            }
            log.append(vec![input]).unwrap();
            clock.advance_ms(rng.below(3) as i64);
        }
        let records = logs
            .iter()
            .map(|log| log.read(0, usize::MAX).unwrap())
            .collect();
        (logs, records)
    }

    fn random_tombstone(rng: &mut Rng, records: &[Vec<Record>]) -> Tombstone {
        let all: Vec<&Record> = records.iter().flatten().collect();
        match rng.below(4) {
            0 => {
                let start = rng.below(200);
                Tombstone::OffsetRange {
                    partition: rng.below(3) as u32,
                    start,
                    end: start + rng.below(300),
                }
            }
            1 => match all.get(rng.below(all.len() as u64) as usize) {
                Some(record) => Tombstone::MessageId(record.id.to_string()),
                None => Tombstone::MessageId(MessageId::new(5, 5).to_string()),
            },
            2 => {
                let start_ms = 1_000 + rng.below(500) as i64;
                Tombstone::TimeRange {
                    start_ms,
                    end_ms: start_ms + rng.below(300) as i64 - 20,
                }
            }
            _ => Tombstone::Key(KEYS[rng.below(3) as usize].as_bytes().to_vec()),
        }
    }

    #[test]
    fn counts_match_a_brute_force_model_whichever_way_they_are_counted() {
        let plans = [
            CountPlan::default(),
            // Always read.
            CountPlan {
                scan_always_records: u64::MAX,
                index_lookups_max: 0,
            },
            // Always look up.
            CountPlan {
                scan_always_records: 0,
                index_lookups_max: usize::MAX,
            },
        ];
        let mut rng = Rng(0x5EED_0000_0000_0001);
        for round in 0..300 {
            let (logs, records) = logs(&mut rng);
            let mut tombstones = Tombstones::default();
            let mut model: Vec<(Tombstone, Option<Vec<u64>>)> = Vec::new();
            // Deletions made as the logs grow: bounds below the final ends.
            for _ in 0..rng.below(6) {
                let tombstone = random_tombstone(&mut rng, &records);
                let below = match (&tombstone, rng.below(5)) {
                    (Tombstone::MessageId(_), _) | (_, 0) => None, // legacy: unbounded
                    _ => Some(
                        records
                            .iter()
                            .map(|r| rng.below(r.len() as u64 + 1))
                            .collect::<Vec<u64>>(),
                    ),
                };
                tombstones.add(&tombstone, below.as_deref(), 3);
                model.push((tombstone, below));
            }
            let ends: Vec<u64> = logs.iter().map(|l| l.end_offset()).collect();
            for _ in 0..8 {
                let tombstone = random_tombstone(&mut rng, &records);
                let below = match tombstone {
                    Tombstone::MessageId(_) => None,
                    _ => Some(ends.clone()),
                };
                let expected = records
                    .iter()
                    .enumerate()
                    .flat_map(|(p, records)| records.iter().map(move |r| (p as u32, r)))
                    .filter(|(p, r)| {
                        model_covers(&tombstone, below.as_deref(), *p, r)
                            && !model
                                .iter()
                                .any(|(t, b)| model_covers(t, b.as_deref(), *p, r))
                    })
                    .count() as u64;
                for plan in plans {
                    let counted = tombstones
                        .count_new(&logs, &tombstone, &ends, plan)
                        .unwrap();
                    assert_eq!(
                        counted, expected,
                        "round {round}: {tombstone:?} after {model:?} with {plan:?}"
                    );
                }
                // Coverage agrees with the model too.
                for (p, records) in records.iter().enumerate() {
                    for record in records {
                        let modelled = model
                            .iter()
                            .any(|(t, b)| model_covers(t, b.as_deref(), p as u32, record));
                        assert_eq!(tombstones.covers(p as u32, record), modelled);
                    }
                }
            }
        }
    }

    #[test]
    fn bounded_deletions_spare_records_stored_later() {
        let clock = Arc::new(ManualClock::new(1_000));
        let log: Arc<dyn PartitionLog> = Arc::new(MemoryLog::new(clock.clone(), 0));
        let input = |key: &'static str| RecordInput::new("v").with_key(key);
        log.append(vec![input("k"), input("other"), input("k")])
            .unwrap();
        let below = [log.end_offset()];
        let mut tombstones = Tombstones::default();
        tombstones.add(&Tombstone::Key(b"k".to_vec()), Some(&below), 1);
        tombstones.add(
            &Tombstone::OffsetRange {
                partition: 0,
                start: 1,
                end: 100,
            },
            Some(&below),
            1,
        );
        tombstones.add(
            &Tombstone::TimeRange {
                start_ms: 0,
                end_ms: i64::MAX,
            },
            Some(&[1]),
            1,
        );
        log.append(vec![input("k"), input("other")]).unwrap();
        let records = log.read(0, 10).unwrap();
        let covered: Vec<bool> = records.iter().map(|r| tombstones.covers(0, r)).collect();
        assert_eq!(covered, vec![true, true, true, false, false]);
        // A later deletion of the key reaches further; the earlier bound
        // still spares nothing it did not spare.
        tombstones.add(&Tombstone::Key(b"k".to_vec()), Some(&[5]), 1);
        let covered: Vec<bool> = records.iter().map(|r| tombstones.covers(0, r)).collect();
        assert_eq!(covered, vec![true, true, true, true, false]);
        // Unbounded (entries written before bounds existed): covers later ones.
        tombstones.add(&Tombstone::Key(b"other".to_vec()), None, 1);
        assert!(tombstones.covers(0, &records[4]));
    }

    #[test]
    fn subtract_leaves_the_gaps() {
        assert_eq!(subtract(0, 10, &[]), vec![(0, 10)]);
        assert_eq!(subtract(0, 10, &[(0, 10)]), vec![]);
        assert_eq!(
            subtract(0, 10, &[(2, 3), (5, 7)]),
            vec![(0, 2), (3, 5), (7, 10)]
        );
        assert_eq!(subtract(4, 10, &[(4, 6), (9, 10)]), vec![(6, 9)]);
    }
}
