//! The delay store's timer log is reclaimed below its lowest needed record
//! (`DelayStore::reclaim`), on real files with small segments: seeded
//! rounds of schedules (near and far), firings, cancels, checkpoints,
//! reclaims, clean reopens and crashes (a drop without a checkpoint); at
//! the end every delay still pending fires once, none that was cancelled
//! comes back, none that fired comes back but after a crash (fired marks
//! are lazy: at least once, see `delay_store`), none is lost, and the
//! reclaims did delete segments.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use dmq_dispatcher::delay_store::TIMER_TOPIC;
use dmq_dispatcher::storage::FileStorage;
use dmq_dispatcher::{DelayConfig, DelayStore, Storage};
use dmq_log_store::{FsyncPolicy, LogConfig, MessageId, RecordInput};

mod common;
use common::Rng;

fn storage(dir: &std::path::Path) -> Arc<dyn Storage> {
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        // About 40 records of 100 bytes per segment.
        segment_bytes_max: 4096,
        ..LogConfig::default()
    };
    Arc::new(FileStorage::new(dir, config).unwrap())
}

fn config() -> DelayConfig {
    DelayConfig {
        bucket_width_ms: 1_000,
        window_ms: 5_000,
        tick_ms: 1,
        // Small, so that buckets stay unloaded and entries buffered.
        loaded_entries_max: 64,
        buffered_entries_max: 32,
        ..DelayConfig::default()
    }
}

#[test]
fn reclaiming_the_timer_log_loses_and_revives_no_delay() {
    for seed in 1..=4u64 {
        run(seed);
    }
}

fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5EED_0000_0000_0000 | seed);
    let mut now: i64 = 1_000_000;
    let mut pending: BTreeMap<MessageId, i64> = BTreeMap::new();
    let mut settled: HashSet<MessageId> = HashSet::new();
    // Fired since the last checkpoint, and what a crash may bring back.
    let mut fired_unsynced: BTreeMap<MessageId, i64> = BTreeMap::new();
    let mut revivable: BTreeMap<MessageId, i64> = BTreeMap::new();
    let mut reclaimed = 0;
    let (mut store, _) = DelayStore::open(storage(dir.path()), config(), now).unwrap();
    for round in 0..300 {
        // Schedule a few: most near, some past the window (unloaded
        // buckets), some already due.
        let batch: Vec<(String, u32, RecordInput)> = (0..1 + rng.below(6))
            .map(|i| {
                let due = match rng.below(10) {
                    0 => now,
                    1..=2 => now + 10_000 + rng.below(50_000) as i64,
                    _ => now + 1 + rng.below(3_000) as i64,
                };
                let record = RecordInput {
                    deliver_at_ms: Some(due),
                    ..RecordInput::new(format!("{seed}/{round}/{i}:{}", "x".repeat(60)))
                };
                ("orders".to_string(), 0, record)
            })
            .collect();
        let dues: Vec<i64> = batch
            .iter()
            .map(|(_, _, r)| r.deliver_at_ms.unwrap())
            .collect();
        for (id, due) in store.schedule(batch, now).unwrap().into_iter().zip(dues) {
            pending.insert(id, due);
        }
        now += rng.below(400) as i64;
        // Fire what is due.
        loop {
            let due = store.poll_due(now, 16).unwrap();
            if due.is_empty() {
                break;
            }
            let ids: Vec<MessageId> = due.iter().map(|m| m.id).collect();
            for message in &due {
                assert!(message.due_ms <= now, "fired before its due time");
                let was = pending
                    .remove(&message.id)
                    .or_else(|| revivable.remove(&message.id));
                assert_eq!(
                    was,
                    Some(message.due_ms),
                    "seed {seed}: fired a delay that was not pending"
                );
                settled.insert(message.id);
                fired_unsynced.insert(message.id, message.due_ms);
            }
            // Polled, not yet marked (a write in flight): kept.
            if rng.below(3) == 0 {
                reclaimed += store.reclaim().unwrap();
            }
            store.mark_fired(&ids).unwrap();
        }
        // Cancel one now and then.
        if rng.below(5) == 0 && !pending.is_empty() {
            let nth = rng.below(pending.len() as u64) as usize;
            let id = *pending.keys().nth(nth).unwrap();
            assert!(store.cancel(&id).unwrap(), "seed {seed}: a pending delay");
            pending.remove(&id);
            settled.insert(id);
        }
        match rng.below(12) {
            0..=2 => {
                store.checkpoint().unwrap();
                fired_unsynced.clear();
                reclaimed += store.reclaim().unwrap();
            }
            3 => {
                // A reclaim without a checkpoint: the watermark holds it.
                reclaimed += store.reclaim().unwrap();
            }
            4 => {
                // A clean restart.
                store.checkpoint().unwrap();
                fired_unsynced.clear();
                drop(store);
                store = DelayStore::open(storage(dir.path()), config(), now)
                    .unwrap()
                    .0;
                assert_eq!(store.pending(), pending.len() as u64, "seed {seed}");
            }
            5 => {
                // A crash: what fired since the last flush may fire again.
                drop(store);
                revivable.append(&mut fired_unsynced);
                store = DelayStore::open(storage(dir.path()), config(), now)
                    .unwrap()
                    .0;
                let most = (pending.len() + revivable.len()) as u64;
                assert!(store.pending() >= pending.len() as u64, "seed {seed}");
                assert!(store.pending() <= most, "seed {seed}");
            }
            _ => {}
        }
    }
    assert!(reclaimed > 0, "seed {seed}: nothing was reclaimed");
    // Everything still pending fires, once.
    store.checkpoint().unwrap();
    drop(store);
    let files = storage(dir.path());
    let start = files.partition(TIMER_TOPIC, 0).unwrap().start_offset();
    assert!(start > 0, "seed {seed}: the timer log kept its start");
    let (mut store, _) = DelayStore::open(files, config(), now).unwrap();
    now += 120_000;
    let mut fired = 0;
    loop {
        let due = store.poll_due(now, 64).unwrap();
        if due.is_empty() {
            break;
        }
        for message in &due {
            assert!(
                pending.remove(&message.id).is_some() || revivable.remove(&message.id).is_some(),
                "seed {seed}: {} fired again or after its cancel (settled before: {})",
                message.id,
                settled.contains(&message.id)
            );
            fired += 1;
        }
        store
            .mark_fired(&due.iter().map(|m| m.id).collect::<Vec<_>>())
            .unwrap();
    }
    assert!(
        pending.is_empty(),
        "seed {seed}: {} never fired",
        pending.len()
    );
    assert_eq!(
        store.lost_count(),
        0,
        "seed {seed}: records reclaimed too early"
    );
    assert!(fired > 0);
}
