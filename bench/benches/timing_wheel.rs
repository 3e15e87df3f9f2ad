//! Timing wheel throughput (target: ≥ 10M operations/s, an operation being
//! one insert or one fire).
//!
//! - `timing_wheel/insert_fire_steps`: inserts `DMQ_BENCH_TIMERS` timers
//!   (default 1 000 000) due at random times over 3 minutes, then advances
//!   in 10 ms steps until all have fired (a broker loop). Every iteration
//!   reuses one wheel, as a broker does (steady state: the slab's entries
//!   are recycled through its free list, nothing is allocated).
//! - `timing_wheel/insert_fire_jump`: the same timers fired by one advance
//!   past the last due time.
//! - `timing_wheel/insert_cancel`: inserts the timers, then cancels them all
//!   in a random order (acks arriving before their deadline).
//!
//! Prints bytes per pending timer (slab entry size and heap/pending).
//!
//! Run: `cargo bench -p dmq-bench --bench timing_wheel` (`-- --quick` for a
//! fast look).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_bench::{Rate, Spread};
use dmq_dispatcher::TimingWheel;

const START_MS: i64 = 1_700_000_000_000;
const SPAN_MS: u64 = 180_000;
const STEP_MS: i64 = 10;

/// A 16-byte item, like (partition, offset).
type Item = (u64, u64);

fn timing_wheel(c: &mut Criterion) {
    let timers = dmq_bench::env_u64("DMQ_BENCH_TIMERS", 1_000_000).max(1000);
    let dues: Vec<i64> = Spread::new(21)
        .sample(timers as usize, SPAN_MS)
        .into_iter()
        .map(|delta| START_MS + 1 + delta as i64)
        .collect();
    let mut cancel_order: Vec<usize> = (0..dues.len()).collect();
    let mut spread = Spread::new(22);
    for i in (1..cancel_order.len()).rev() {
        cancel_order.swap(i, spread.below(i as u64 + 1) as usize);
    }

    let mut wheel = TimingWheel::<Item>::new(1, START_MS);
    for (i, &due) in dues.iter().enumerate() {
        wheel.insert(due, (i as u64, due as u64));
    }
    println!(
        "timing_wheel: {} bytes per slab entry (16-byte item); {:.1} heap bytes per pending timer with {} pending",
        TimingWheel::<Item>::entry_bytes(),
        wheel.memory_bytes() as f64 / wheel.len() as f64,
        wheel.len()
    );
    drop(wheel);

    let mut group = c.benchmark_group("timing_wheel");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(2 * timers));
    for (name, step_ms) in [
        ("insert_fire_steps", STEP_MS),
        ("insert_fire_jump", SPAN_MS as i64 + 1),
    ] {
        let mut rate = Rate::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                let mut fired = Vec::with_capacity(timers as usize);
                // One wheel for every iteration, as in a broker: the slab is
                // reused through its free list (steady state, no allocation).
                let mut wheel = TimingWheel::<Item>::new(1, START_MS);
                for _ in 0..iters {
                    fired.clear();
                    let shift_ms = wheel.now_ms() - START_MS;
                    let started = Instant::now();
                    for (i, &due) in dues.iter().enumerate() {
                        wheel.insert(due + shift_ms, (i as u64, due as u64));
                    }
                    let mut now_ms = wheel.now_ms();
                    while !wheel.is_empty() {
                        now_ms += step_ms;
                        wheel.advance(now_ms, &mut fired);
                    }
                    let taken = started.elapsed();
                    elapsed += taken;
                    rate.add(0, 2 * timers, taken);
                    assert_eq!(fired.len() as u64, timers, "every timer fired");
                    black_box(&fired);
                }
                elapsed
            });
        });
        println!(
            "timing_wheel/{name}: {:.1} M operations/s",
            rate.items_per_s() / 1e6
        );
    }

    let mut rate = Rate::default();
    group.bench_function("insert_cancel", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut ids = Vec::with_capacity(timers as usize);
            let mut wheel = TimingWheel::<Item>::new(1, START_MS);
            for _ in 0..iters {
                ids.clear();
                let started = Instant::now();
                for (i, &due) in dues.iter().enumerate() {
                    ids.push(wheel.insert(due, (i as u64, due as u64)));
                }
                for &i in &cancel_order {
                    black_box(wheel.cancel(ids[i]));
                }
                let taken = started.elapsed();
                elapsed += taken;
                rate.add(0, 2 * timers, taken);
                assert!(wheel.is_empty(), "every timer was cancelled");
            }
            elapsed
        });
    });
    println!(
        "timing_wheel/insert_cancel: {:.1} M operations/s",
        rate.items_per_s() / 1e6
    );
    group.finish();
}

criterion_group!(benches, timing_wheel);
criterion_main!(benches);
