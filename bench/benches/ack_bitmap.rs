//! Ack bitmap throughput (target: ≥ 20M random-order acks/s on one thread).
//!
//! - `ack_bitmap/ack_shuffled`: acks every offset of a shuffled range of
//!   `DMQ_BENCH_ACKS` offsets (default 1 000 000) into a fresh bitmap.
//! - `ack_bitmap/ack_in_order`: the same offsets in order (the floor moves
//!   on every ack, the ring stays empty).
//! - `ack_bitmap/encode_scattered`, `decode_scattered`: a bitmap holding
//!   `DMQ_BENCH_ACKS` acks scattered over twice as many offsets (a random
//!   half); prints the encoded size.
//!
//! Run: `cargo bench -p dmq-bench --bench ack_bitmap` (`-- --quick` for a
//! fast look).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_bench::{Rate, Spread};
use dmq_dispatcher::AckBitmap;

/// `0..count` in a reproducible random order (Fisher-Yates).
fn shuffled(count: u64, seed: u64) -> Vec<u64> {
    let mut offsets: Vec<u64> = (0..count).collect();
    let mut spread = Spread::new(seed);
    for i in (1..offsets.len()).rev() {
        let j = spread.below(i as u64 + 1) as usize;
        offsets.swap(i, j);
    }
    offsets
}

fn ack_bitmap(c: &mut Criterion) {
    let acks = dmq_bench::env_u64("DMQ_BENCH_ACKS", 1_000_000).max(1000);
    let shuffled_offsets = shuffled(acks, 11);
    let in_order: Vec<u64> = (0..acks).collect();

    let mut group = c.benchmark_group("ack_bitmap");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(acks));
    for (name, offsets) in [
        ("ack_shuffled", &shuffled_offsets),
        ("ack_in_order", &in_order),
    ] {
        let mut rate = Rate::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let mut bitmap = AckBitmap::new(0);
                    let started = Instant::now();
                    for &offset in offsets.iter() {
                        bitmap.ack(offset);
                    }
                    let taken = started.elapsed();
                    elapsed += taken;
                    rate.add(0, acks, taken);
                    assert_eq!(bitmap.floor(), acks, "every offset was acked");
                    black_box(bitmap);
                }
                elapsed
            });
        });
        println!(
            "ack_bitmap/{name}: {:.1} M acks/s",
            rate.items_per_s() / 1e6
        );
    }

    let mut scattered = AckBitmap::new(0);
    for &offset in shuffled(2 * acks, 12).iter().take(acks as usize) {
        scattered.ack(offset);
    }
    let mut encoded = Vec::new();
    scattered.encode(&mut encoded);
    println!(
        "ack_bitmap: {acks} acks scattered over {} offsets: floor {}, {} acked above it, \
         encoded {} bytes ({:.2} bits per offset), {} heap bytes",
        2 * acks,
        scattered.floor(),
        scattered.acked_above_floor(),
        encoded.len(),
        encoded.len() as f64 * 8.0 / (2 * acks) as f64,
        scattered.memory_bytes()
    );
    group.bench_function("encode_scattered", |b| {
        let mut out = Vec::with_capacity(encoded.len());
        b.iter(|| {
            out.clear();
            scattered.encode(&mut out);
            black_box(out.len())
        });
    });
    group.bench_function("decode_scattered", |b| {
        b.iter(|| black_box(AckBitmap::decode(&encoded).expect("decoding the bench bitmap")));
    });
    group.finish();
}

criterion_group!(benches, ack_bitmap);
criterion_main!(benches);
