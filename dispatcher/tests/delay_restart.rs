//! The delay store on real files across a restart: every pending delay
//! survives and fires exactly once, in due order.
//!
//! 100k delays by default; 1M when `DMQ_LONG_TESTS` is set (slow in debug).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use dmq_dispatcher::storage::FileStorage;
use dmq_dispatcher::{DelayConfig, DelayStore, Storage};
use dmq_log_store::{FsyncPolicy, LogConfig, MessageId, RecordInput};

/// A tiny seeded generator (xorshift64*), to avoid a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn storage(dir: &std::path::Path) -> Arc<dyn Storage> {
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        segment_bytes_max: 64 << 20,
        ..LogConfig::default()
    };
    Arc::new(FileStorage::new(dir, config).unwrap())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn pending_delays_survive_a_restart_and_fire_once_in_due_order() {
    let count: usize = if std::env::var_os("DMQ_LONG_TESTS").is_some() {
        1_000_000
    } else {
        100_000
    };
    let dir = tempfile::tempdir().unwrap();
    let start = now_ms();
    let day_ms = 86_400_000;
    let mut rng = XorShift(0x5EED_1234_ABCD_0001);
    let mut due_of: HashMap<MessageId, i64> = HashMap::with_capacity(count);

    let began = Instant::now();
    {
        let (mut store, _) =
            DelayStore::open(storage(dir.path()), DelayConfig::default(), start).unwrap();
        let mut scheduled = 0;
        while scheduled < count {
            let batch = (count - scheduled).min(1_000);
            let entries: Vec<_> = (0..batch)
                .map(|i| {
                    let due = start + 60_000 + (rng.next() % day_ms as u64) as i64;
                    let record = RecordInput {
                        deliver_at_ms: Some(due),
                        ..RecordInput::new(format!("m{}", scheduled + i))
                    };
                    ("orders".to_string(), (i % 4) as u32, record)
                })
                .collect();
            let dues: Vec<i64> = entries
                .iter()
                .map(|(_, _, r)| r.deliver_at_ms.unwrap())
                .collect();
            let ids = store.schedule(entries, start).unwrap();
            due_of.extend(ids.into_iter().zip(dues));
            scheduled += batch;
        }
        assert_eq!(store.pending(), count as u64);
        assert!(
            store.loaded_len() < count / 100,
            "only the near window is in memory"
        );
        // Dropped without a checkpoint: the tail is re-indexed at open.
    }
    assert_eq!(due_of.len(), count);
    let scheduled_in = began.elapsed();

    let began = Instant::now();
    let (mut store, recovery) =
        DelayStore::open(storage(dir.path()), DelayConfig::default(), start).unwrap();
    let reopened_in = began.elapsed();
    assert_eq!(recovery.pending, count as u64);
    assert_eq!(store.pending(), count as u64);
    let earliest = due_of.values().min().copied();
    assert_eq!(store.next_due_ms(), earliest);

    let began = Instant::now();
    let mut now = start;
    let mut last_due = i64::MIN;
    let mut fired = 0usize;
    while now < start + day_ms + 60_000 {
        now += 2 * 3_600_000;
        loop {
            let due = store.poll_due(now, 20_000).unwrap();
            if due.is_empty() {
                break;
            }
            let ids: Vec<MessageId> = due.iter().map(|m| m.id).collect();
            for message in &due {
                assert!(message.due_ms <= now);
                assert!(message.due_ms >= last_due, "due order");
                last_due = message.due_ms;
                let expected = due_of.remove(&message.id).expect("fired exactly once");
                assert_eq!(expected, message.due_ms);
                assert_eq!(message.record.id, Some(message.id));
                assert_eq!(message.topic, "orders");
            }
            fired += due.len();
            store.mark_fired(&ids).unwrap();
        }
        store.checkpoint().unwrap();
    }
    assert_eq!(fired, count);
    assert!(due_of.is_empty());
    assert_eq!(store.pending(), 0);
    assert_eq!(store.bucket_count(), 0, "fired buckets are removed");
    eprintln!(
        "{count} delays: scheduled in {scheduled_in:?}, reopened in {reopened_in:?} ({recovery:?}), fired in {:?}",
        began.elapsed()
    );
}
