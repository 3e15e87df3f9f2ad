//! Per-minute statistics and the per-series metric counters: the ledger
//! every counted event goes through once.
//!
//! Owns [`Ledger`]: for each topic the minutes of `produced`, and for each
//! (topic, group) the minutes of delivered, acked, retried, expired and
//! dead-lettered, plus the Prometheus counters of the same series (created
//! on the series' first live event). Also owns the statistics file
//! `<data_dir>/stats/stats.bin` (format below).
//!
//! Invariants:
//! - Each event is counted exactly once, into both its minute and its
//!   counter ([`Ledger::count_event`], [`Ledger::count_produced`]).
//! - A retry is counted once: `Redelivered` is the retry (the dispatcher
//!   emits it for ack timeouts, departed members *and* after a `Nacked`, so
//!   `Nacked` itself is not counted; a nack of the last attempt is followed
//!   by `DeadLettered`, not by a retry).
//! - Memory is bounded by retention × series: [`Ledger::retain`] drops the
//!   minutes before the window, and series with neither minutes nor
//!   counters.
//! - The file is replaced atomically (temporary file, fsync, rename, fsync
//!   of the directory): a crash leaves the old or the new file, never a mix.
//!   A file that fails its checksum is ignored (with a warning).
//!
//! File format (`zz` = zigzag varint, other integers unsigned LEB128
//! varints, `str` = varint length + UTF-8):
//!
//! ```text
//! file    := magic "DMQSTAT1" body checksum:u64 LE (FNV-1a 64 of body)
//! body    := series_count series*
//! series  := topic:str has_group:u8 [group:str] minute_count minute*
//! minute  := minute_delta:zz produced delivered acked retried expired dead_lettered
//! ```
//!
//! `minute_delta` is the minute index (ms since the epoch / 60,000) for the
//! first minute of a series, then the difference to the previous one.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use dmq_dispatcher::{Event, EventKind};

use super::metrics::{GroupCounters, Metrics};
use super::{MinuteCounts, ProducedBatch, TelemetryError};

const MAGIC: &[u8; 8] = b"DMQSTAT1";
const FILE_NAME: &str = "stats.bin";
const TEMP_NAME: &str = "stats.bin.tmp";
const MINUTE_MS: i64 = 60_000;

/// Column indexes of [`Counts`].
const PRODUCED: usize = 0;
const DELIVERED: usize = 1;
const ACKED: usize = 2;
const RETRIED: usize = 3;
const EXPIRED: usize = 4;
const DEAD_LETTERED: usize = 5;
const COLUMNS: usize = 6;

type Counts = [u64; COLUMNS];

/// The counted minutes of one series, ascending by minute index.
#[derive(Debug, Default)]
struct Minutes(VecDeque<(i64, Counts)>);

impl Minutes {
    fn add(&mut self, minute: i64, column: usize, n: u64) {
        let slot = match self.0.back() {
            Some((last, _)) if *last == minute => self.0.len() - 1,
            Some((last, _)) if *last > minute => {
                let at = self.0.partition_point(|(m, _)| *m < minute);
                if self.0.get(at).is_none_or(|(m, _)| *m != minute) {
                    self.0.insert(at, (minute, [0; COLUMNS]));
                }
                at
            }
            _ => {
                self.0.push_back((minute, [0; COLUMNS]));
                self.0.len() - 1
            }
        };
        if let Some((_, counts)) = self.0.get_mut(slot) {
            counts[column] = counts[column].saturating_add(n);
        }
    }

    /// Adds the minutes in `first..first + window.len()` to `window`,
    /// the columns `columns` only.
    fn sum_into(&self, first: i64, window: &mut [Counts], columns: &[usize]) {
        let start = self.0.partition_point(|(m, _)| *m < first);
        for (minute, counts) in self.0.range(start..) {
            let Some(slot) = usize::try_from(minute - first)
                .ok()
                .and_then(|i| window.get_mut(i))
            else {
                break;
            };
            for &column in columns {
                slot[column] = slot[column].saturating_add(counts[column]);
            }
        }
    }

    fn retain_from(&mut self, first: i64) {
        while self.0.front().is_some_and(|(m, _)| *m < first) {
            self.0.pop_front();
        }
    }
}

#[derive(Debug, Default)]
struct GroupSeries {
    minutes: Minutes,
    counters: Option<GroupCounters>,
}

#[derive(Debug, Default)]
struct TopicSeries {
    /// `produced` only.
    minutes: Minutes,
    produced: Option<prometheus_client::metrics::counter::Counter>,
    groups: HashMap<String, GroupSeries>,
}

/// Every series' minutes and counters.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    topics: HashMap<String, TopicSeries>,
    /// Changed since the last [`Ledger::encode`].
    dirty: bool,
}

fn minute_of(time_ms: i64) -> i64 {
    time_ms.div_euclid(MINUTE_MS)
}

impl Ledger {
    /// Counts dispatcher events (kinds without a column are ignored).
    /// Consecutive events of one series, column and minute are counted
    /// together: one series lookup per run, not per event.
    pub(crate) fn count_events(&mut self, metrics: &Metrics, events: &[Event]) {
        let mut pending: Option<(&str, &str, usize, i64, u64)> = None;
        for event in events {
            let column = match event.kind {
                EventKind::Delivered { .. } => DELIVERED,
                EventKind::Acked => ACKED,
                EventKind::Redelivered { .. } => RETRIED,
                EventKind::Expired => EXPIRED,
                EventKind::DeadLettered { .. } => DEAD_LETTERED,
                // Nacked is followed by Redelivered (the retry) or
                // DeadLettered.
                _ => continue,
            };
            let Some(group) = event.group.as_deref() else {
                continue;
            };
            let minute = minute_of(event.time_ms);
            match &mut pending {
                Some((topic, pending_group, pending_column, pending_minute, n))
                    if *pending_column == column
                        && *pending_minute == minute
                        && *topic == &*event.topic
                        && *pending_group == group =>
                {
                    *n += 1;
                }
                _ => {
                    if let Some((topic, group, column, minute, n)) = pending.take() {
                        self.add_group(metrics, topic, group, column, minute, n);
                    }
                    pending = Some((&event.topic, group, column, minute, 1));
                }
            }
        }
        if let Some((topic, group, column, minute, n)) = pending {
            self.add_group(metrics, topic, group, column, minute, n);
        }
    }

    /// Adds `n` to a group series' column in `minute` and to its counter.
    fn add_group(
        &mut self,
        metrics: &Metrics,
        topic_name: &str,
        group: &str,
        column: usize,
        minute: i64,
        n: u64,
    ) {
        let Some(topic) = self.topic_series(topic_name) else {
            return;
        };
        let Some(series) = get_or_insert(&mut topic.groups, group) else {
            return;
        };
        series.minutes.add(minute, column, n);
        let counters = series
            .counters
            .get_or_insert_with(|| metrics.group_counters(topic_name, group));
        let counter = match column {
            DELIVERED => &counters.delivered,
            ACKED => &counters.acked,
            RETRIED => &counters.redelivered,
            EXPIRED => &counters.expired,
            _ => &counters.dead_lettered,
        };
        counter.inc_by(n);
        self.dirty = true;
    }

    /// Counts a produce batch (every message, delayed or not).
    pub(crate) fn count_produced(&mut self, metrics: &Metrics, batch: &ProducedBatch) {
        let n = batch.ids.len() as u64;
        if n == 0 {
            return;
        }
        let Some(topic) = self.topic_series(&batch.topic) else {
            return;
        };
        topic.minutes.add(minute_of(batch.received_ms), PRODUCED, n);
        topic
            .produced
            .get_or_insert_with(|| metrics.produced_counter(&batch.topic))
            .inc_by(n);
        self.dirty = true;
    }

    /// The series of `topic`, created if needed (always `Some`).
    fn topic_series(&mut self, topic: &str) -> Option<&mut TopicSeries> {
        get_or_insert(&mut self.topics, topic)
    }

    /// The last `minutes` minutes up to `now_ms`, oldest first, zeros
    /// included. `topic: None` sums every topic. `group: None` gives each
    /// topic's produced and the sum over its groups; `group: Some(g)` gives
    /// that group's counts and the produced of the topics it reads.
    pub(crate) fn query(
        &self,
        topic: Option<&str>,
        group: Option<&str>,
        minutes: usize,
        now_ms: i64,
    ) -> Vec<MinuteCounts> {
        let last = minute_of(now_ms);
        let first = last - minutes as i64 + 1;
        let mut window = vec![[0u64; COLUMNS]; minutes];
        const GROUP_COLUMNS: [usize; 5] = [DELIVERED, ACKED, RETRIED, EXPIRED, DEAD_LETTERED];
        let selected = self
            .topics
            .iter()
            .filter(|(name, _)| topic.is_none_or(|t| t == name.as_str()));
        for (_, series) in selected {
            match group {
                Some(group) => {
                    let Some(group_series) = series.groups.get(group) else {
                        continue;
                    };
                    group_series
                        .minutes
                        .sum_into(first, &mut window, &GROUP_COLUMNS);
                }
                None => {
                    for group_series in series.groups.values() {
                        group_series
                            .minutes
                            .sum_into(first, &mut window, &GROUP_COLUMNS);
                    }
                }
            }
            series.minutes.sum_into(first, &mut window, &[PRODUCED]);
        }
        window
            .iter()
            .enumerate()
            .map(|(i, counts)| MinuteCounts {
                minute_ms: (first + i as i64) * MINUTE_MS,
                produced: counts[PRODUCED],
                delivered: counts[DELIVERED],
                acked: counts[ACKED],
                retried: counts[RETRIED],
                expired: counts[EXPIRED],
                dead_lettered: counts[DEAD_LETTERED],
            })
            .collect()
    }

    /// Drops every minute before the last `retention_minutes` minutes up to
    /// `now_ms`, and the series left with nothing.
    pub(crate) fn retain(&mut self, now_ms: i64, retention_minutes: i64) {
        let first = minute_of(now_ms) - retention_minutes + 1;
        let before: usize = self.minute_count();
        self.topics.retain(|_, topic| {
            topic.minutes.retain_from(first);
            topic.groups.retain(|_, group| {
                group.minutes.retain_from(first);
                !group.minutes.0.is_empty() || group.counters.is_some()
            });
            !topic.minutes.0.is_empty() || topic.produced.is_some() || !topic.groups.is_empty()
        });
        if self.minute_count() != before {
            self.dirty = true;
        }
    }

    fn minute_count(&self) -> usize {
        self.topics
            .values()
            .map(|t| {
                t.minutes.0.len() + t.groups.values().map(|g| g.minutes.0.len()).sum::<usize>()
            })
            .sum()
    }

    /// Whether anything changed since the last [`Ledger::encode`].
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Marks the ledger as changed (a write of the file failed).
    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The statistics file's bytes; clears the dirty flag.
    pub(crate) fn encode(&mut self) -> Vec<u8> {
        self.dirty = false;
        let mut body = Vec::new();
        let mut series: Vec<(&str, Option<&str>, &Minutes)> = Vec::new();
        for (topic, topic_series) in &self.topics {
            if !topic_series.minutes.0.is_empty() {
                series.push((topic, None, &topic_series.minutes));
            }
            for (group, group_series) in &topic_series.groups {
                if !group_series.minutes.0.is_empty() {
                    series.push((topic, Some(group), &group_series.minutes));
                }
            }
        }
        put_varint(&mut body, series.len() as u64);
        for (topic, group, minutes) in series {
            put_str(&mut body, topic);
            match group {
                Some(group) => {
                    body.push(1);
                    put_str(&mut body, group);
                }
                None => body.push(0),
            }
            put_varint(&mut body, minutes.0.len() as u64);
            let mut previous = 0i64;
            for (minute, counts) in &minutes.0 {
                put_varint(&mut body, zigzag(minute.wrapping_sub(previous)));
                previous = *minute;
                for count in counts {
                    put_varint(&mut body, *count);
                }
            }
        }
        let mut file = Vec::with_capacity(body.len() + 16);
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&body);
        file.extend_from_slice(&dmq_log_store::key_hash(&body).to_le_bytes());
        file
    }

    /// Reads a statistics file's bytes.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Ledger, TelemetryError> {
        let corrupt =
            |what: &str| TelemetryError::Stats(format!("corrupt statistics file: {what}"));
        if bytes.len() < MAGIC.len() + 8 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let (body, checksum) = bytes[MAGIC.len()..].split_at(bytes.len() - MAGIC.len() - 8);
        let mut stored = [0u8; 8];
        stored.copy_from_slice(checksum);
        if dmq_log_store::key_hash(body) != u64::from_le_bytes(stored) {
            return Err(corrupt("checksum mismatch"));
        }
        let mut input = body;
        let mut ledger = Ledger::default();
        let series_count = take_varint(&mut input).ok_or_else(|| corrupt("series count"))?;
        for _ in 0..series_count {
            let topic = take_str(&mut input).ok_or_else(|| corrupt("topic"))?;
            let group = match take_byte(&mut input) {
                Some(0) => None,
                Some(1) => Some(take_str(&mut input).ok_or_else(|| corrupt("group"))?),
                _ => return Err(corrupt("group flag")),
            };
            let count = take_varint(&mut input).ok_or_else(|| corrupt("minute count"))?;
            let topic_series = ledger.topics.entry(topic).or_default();
            let minutes = match group {
                Some(group) => &mut topic_series.groups.entry(group).or_default().minutes,
                None => &mut topic_series.minutes,
            };
            let mut previous = 0i64;
            for _ in 0..count {
                let delta = take_varint(&mut input).ok_or_else(|| corrupt("minute"))?;
                let minute = previous.wrapping_add(unzigzag(delta));
                previous = minute;
                let mut counts = [0u64; COLUMNS];
                for count in &mut counts {
                    *count = take_varint(&mut input).ok_or_else(|| corrupt("count"))?;
                }
                for (column, n) in counts.iter().enumerate() {
                    if *n > 0 {
                        minutes.add(minute, column, *n);
                    }
                }
            }
        }
        if !input.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(ledger)
    }
}

/// The value of `key`, inserted as the default if absent (always `Some`);
/// looks up by `&str` so that a known key costs no allocation.
fn get_or_insert<'m, V: Default>(map: &'m mut HashMap<String, V>, key: &str) -> Option<&'m mut V> {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key)
}

/// Loads the statistics of `dir` (empty if there are none or the file is
/// damaged), removing a temporary file a crash left behind.
pub(crate) fn load(dir: &Path) -> Result<Ledger, TelemetryError> {
    std::fs::create_dir_all(dir)?;
    match std::fs::remove_file(dir.join(TEMP_NAME)) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error.into()),
    }
    let bytes = match std::fs::read(dir.join(FILE_NAME)) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
        Err(error) => return Err(error.into()),
    };
    match Ledger::decode(&bytes) {
        Ok(ledger) => Ok(ledger),
        Err(error) => {
            tracing::warn!(%error, dir = %dir.display(), "statistics file ignored; starting empty");
            Ok(Ledger::default())
        }
    }
}

/// Replaces the statistics file of `dir` with `bytes`, crash-safely.
pub(crate) fn store(dir: &Path, bytes: &[u8]) -> Result<(), TelemetryError> {
    let temp: PathBuf = dir.join(TEMP_NAME);
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(FILE_NAME))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn put_str(buf: &mut Vec<u8>, text: &str) {
    put_varint(buf, text.len() as u64);
    buf.extend_from_slice(text.as_bytes());
}

fn take_byte(input: &mut &[u8]) -> Option<u8> {
    let (&first, rest) = input.split_first()?;
    *input = rest;
    Some(first)
}

fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = take_byte(input)?;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn take_str(input: &mut &[u8]) -> Option<String> {
    let len = usize::try_from(take_varint(input)?).ok()?;
    if input.len() < len {
        return None;
    }
    let (text, rest) = input.split_at(len);
    *input = rest;
    String::from_utf8(text.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmq_log_store::MessageId;

    const NOW: i64 = 1_764_246_000_000 + 30_000; // half a minute in

    fn event(kind: EventKind, group: &str, time_ms: i64) -> Event {
        Event {
            time_ms,
            message_id: MessageId::new(time_ms, 1),
            topic: "t".into(),
            partition: Some(0),
            offset: Some(0),
            group: Some(group.into()),
            kind,
            reason: None,
        }
    }

    fn count_one(ledger: &mut Ledger, metrics: &Metrics, event: &Event) {
        ledger.count_events(metrics, std::slice::from_ref(event));
    }

    fn produced(topic: &str, n: usize, received_ms: i64) -> ProducedBatch {
        ProducedBatch {
            topic: topic.to_string(),
            partition: 0,
            base_offset: Some(0),
            ids: vec![MessageId::default(); n],
            client_id: "c".to_string(),
            peer: "127.0.0.1:1".parse().expect("addr"),
            received_ms,
            stored_ms: received_ms,
        }
    }

    #[test]
    fn windows_list_every_minute_and_filter() {
        let metrics = Metrics::new();
        let mut ledger = Ledger::default();
        ledger.count_produced(&metrics, &produced("t", 10, NOW));
        ledger.count_produced(&metrics, &produced("u", 5, NOW - 2 * MINUTE_MS));
        count_one(
            &mut ledger,
            &metrics,
            &event(
                EventKind::Delivered {
                    attempt: 1,
                    member: 1,
                },
                "g",
                NOW,
            ),
        );
        count_one(&mut ledger, &metrics, &event(EventKind::Acked, "h", NOW));
        let all = ledger.query(None, None, 3, NOW);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].minute_ms, NOW - 30_000);
        assert_eq!(
            (all[0].produced, all[1].produced, all[2].produced),
            (5, 0, 10)
        );
        assert_eq!((all[2].delivered, all[2].acked), (1, 1));
        let g = ledger.query(Some("t"), Some("g"), 3, NOW);
        assert_eq!((g[2].produced, g[2].delivered, g[2].acked), (10, 1, 0));
        assert!(ledger.query(Some("u"), Some("g"), 3, NOW).iter().all(|m| *m
            == MinuteCounts {
                minute_ms: m.minute_ms,
                ..MinuteCounts::default()
            }));
        assert!(ledger.query(None, None, 0, NOW).is_empty());
    }

    #[test]
    fn a_nack_is_one_retry() {
        // What the dispatcher emits for a nack that is retried, then for an
        // ack timeout, then for a nack of the last attempt.
        let metrics = Metrics::new();
        let mut ledger = Ledger::default();
        for kind in [
            EventKind::Delivered {
                attempt: 1,
                member: 1,
            },
            EventKind::Nacked { retry_in_ms: 10 },
            EventKind::Redelivered { next_attempt: 2 },
            EventKind::Delivered {
                attempt: 2,
                member: 1,
            },
            EventKind::Redelivered { next_attempt: 3 },
            EventKind::Delivered {
                attempt: 3,
                member: 1,
            },
            EventKind::Nacked { retry_in_ms: 10 },
            EventKind::DeadLettered {
                dead_letter_topic: "t.g.dlq".to_string(),
            },
        ] {
            count_one(&mut ledger, &metrics, &event(kind, "g", NOW));
        }
        let minute = ledger.query(Some("t"), Some("g"), 1, NOW)[0];
        assert_eq!(
            (minute.delivered, minute.retried, minute.dead_lettered),
            (3, 2, 1)
        );
    }

    #[test]
    fn runs_of_one_series_are_counted_together_and_exactly() {
        let metrics = Metrics::new();
        let mut ledger = Ledger::default();
        let mut events = Vec::new();
        for (group, minute) in [("g", 0), ("g", 0), ("h", 0), ("g", 0), ("g", 1), ("g", 1)] {
            events.push(event(EventKind::Acked, group, NOW + minute * MINUTE_MS));
        }
        events.push(event(EventKind::Nacked { retry_in_ms: 1 }, "g", NOW));
        ledger.count_events(&metrics, &events);
        let g = ledger.query(Some("t"), Some("g"), 2, NOW + MINUTE_MS);
        assert_eq!((g[0].acked, g[1].acked), (3, 2));
        let all = ledger.query(None, None, 2, NOW + MINUTE_MS);
        assert_eq!((all[0].acked, all[1].acked, all[0].retried), (4, 2, 0));
    }

    #[test]
    fn encode_decode_and_retention() {
        let metrics = Metrics::new();
        let mut ledger = Ledger::default();
        ledger.count_produced(&metrics, &produced("t", 3, NOW - 100 * MINUTE_MS));
        ledger.count_produced(&metrics, &produced("t", 4, NOW));
        count_one(
            &mut ledger,
            &metrics,
            &event(EventKind::Expired, "g", NOW - MINUTE_MS),
        );
        assert!(ledger.is_dirty());
        let bytes = ledger.encode();
        assert!(!ledger.is_dirty());
        let mut back = Ledger::decode(&bytes).expect("decode");
        for (topic, group) in [(None, None), (Some("t"), Some("g"))] {
            assert_eq!(
                back.query(topic, group, 200, NOW),
                ledger.query(topic, group, 200, NOW)
            );
        }
        back.retain(NOW, 60);
        let window = back.query(None, None, 200, NOW);
        assert_eq!(window.iter().map(|m| m.produced).sum::<u64>(), 4);
        assert_eq!(window.iter().map(|m| m.expired).sum::<u64>(), 1);
        back.retain(NOW + 24 * 60 * MINUTE_MS, 60);
        assert!(back.topics.is_empty(), "no counters, no minutes: forgotten");
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 1;
        assert!(Ledger::decode(&damaged).is_err());
        assert!(Ledger::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn store_and_load_replace_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let mut ledger = load(dir.path()).expect("empty");
        ledger.count_produced(&metrics, &produced("t", 2, NOW));
        store(dir.path(), &ledger.encode()).expect("store");
        std::fs::write(dir.path().join(TEMP_NAME), b"half-written").expect("write");
        let loaded = load(dir.path()).expect("load");
        assert_eq!(loaded.query(None, None, 1, NOW)[0].produced, 2);
        assert!(!dir.path().join(TEMP_NAME).exists());
        std::fs::write(dir.path().join(FILE_NAME), b"garbage").expect("write");
        assert!(load(dir.path()).expect("ignored").topics.is_empty());
    }
}
