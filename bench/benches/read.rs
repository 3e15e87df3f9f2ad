//! Read throughput from a warm log: sequential `Log::read` of 1 MiB chunks
//! (CRC-verified, zero-copy batches; bytes/s), and `Log::read_record` of one
//! record at a pseudo-random offset.
//!
//! The log holds `DMQ_BENCH_READ_MB` MiB (default 512) of 1 KiB records in
//! batches of 64, in 256 MiB segments, written with `FsyncPolicy::Never` and
//! read while still in the page cache.
//!
//! Run: `cargo bench -p dmq-bench --bench read`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_bench::{
    bench_dir, env_u64, fill_segment, log_config, payload, value_batch, Rate, Spread, KIB, MIB,
};
use dmq_log_store::{FsyncPolicy, IoBackend, Log};

const CHUNK_BYTES: usize = MIB;

fn read(c: &mut Criterion) {
    let total_bytes = env_u64("DMQ_BENCH_READ_MB", 512) * MIB as u64;
    let dir = bench_dir("read");
    let log = Log::open(
        dir.path(),
        log_config(FsyncPolicy::Never, IoBackend::Portable, 256 * MIB as u32),
    )
    .expect("opening the read log");
    let batch = value_batch(64, &payload(KIB, 3));
    // Rolls happen inside: fill_segment only bounds the total.
    fill_segment(&log, &batch, total_bytes);
    let end_offset = log.end_offset();
    println!(
        "read: log of {} MiB, {end_offset} records, {} segments",
        log.size_bytes() / MIB as u64,
        log.segment_count()
    );

    let mut group = c.benchmark_group("read");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let mut sequential = Rate::default();
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    group.bench_function("sequential_1MiB", |b| {
        let mut offset = 0u64;
        b.iter_custom(|iters| {
            let mut bytes = 0u64;
            let started = Instant::now();
            for _ in 0..iters {
                if offset >= end_offset {
                    offset = 0;
                }
                let batches = log.read(offset, CHUNK_BYTES).expect("read");
                for batch in &batches {
                    bytes += batch.as_bytes().len() as u64;
                }
                offset = batches
                    .last()
                    .map_or(end_offset, |batch| batch.last_offset() + 1);
                black_box(batches);
            }
            let elapsed = started.elapsed();
            sequential.add(bytes, iters, elapsed);
            elapsed
        });
    });

    group.throughput(Throughput::Elements(1));
    let offsets = Spread::new(11).sample(4096, end_offset);
    group.bench_function("read_record", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let offset = offsets[i % offsets.len()];
            i += 1;
            black_box(log.read_record(offset).expect("read_record"))
        });
    });
    group.finish();
    println!(
        "read summary: sequential {:.1} MB/s of batches actually returned ({:.2} MB per read)",
        sequential.mb_per_s(),
        sequential.bytes as f64 / 1e6 / sequential.items.max(1) as f64
    );
    drop(log);
    drop(dir);
}

criterion_group!(benches, read);
criterion_main!(benches);
