//! Append throughput: 1 KiB records in batches of 64 (one 64 KiB batch per
//! iteration) under each fsync policy and each compiled-in backend, group
//! commit with 4 appender threads under `Always`, and a memcpy baseline.
//!
//! Prints, besides criterion's bytes/s, records/s per case and the ratio
//! append(portable, never) MB/s ÷ memcpy MB/s (target ≥ 0.5).
//!
//! Run: `cargo bench -p dmq-bench --bench append` (add `--features io-uring`
//! for the io_uring backend; `-- --quick` for a fast look).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_bench::{backends, bench_dir, log_config, payload, value_batch, Rate, KIB, MIB};
use dmq_log_store::{FsyncPolicy, Log};

const RECORD_BYTES: usize = KIB;
const BATCH_RECORDS: usize = 64;
/// Rolls every 4096 batches: frequent enough to be in the numbers, rare
/// enough not to dominate them.
const SEGMENT_BYTES_MAX: u32 = 256 * MIB as u32;
const GROUP_COMMIT_THREADS: usize = 4;

/// Rates measured in this run, by bench id, for the summary lines.
static RATES: Mutex<BTreeMap<String, Rate>> = Mutex::new(BTreeMap::new());

fn record_rate(id: &str, bytes: u64, items: u64, elapsed: Duration) {
    let mut rates = RATES.lock().unwrap_or_else(|p| p.into_inner());
    rates
        .entry(id.to_string())
        .or_default()
        .add(bytes, items, elapsed);
}

fn policies() -> [(&'static str, FsyncPolicy); 3] {
    [
        ("never", FsyncPolicy::Never),
        (
            "interval_10ms",
            FsyncPolicy::Interval(Duration::from_millis(10)),
        ),
        ("always", FsyncPolicy::Always),
    ]
}

fn append(c: &mut Criterion) {
    let value = payload(RECORD_BYTES, 1);
    let batch = value_batch(BATCH_RECORDS, &value);
    let batch_bytes = batch.encoded_len() as u64;
    let payload_bytes = (RECORD_BYTES * BATCH_RECORDS) as u64;

    let mut group = c.benchmark_group("append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(payload_bytes));

    for (backend_name, backend) in backends() {
        for (policy_name, policy) in policies() {
            let dir = bench_dir("append");
            let log = Log::open(dir.path(), log_config(policy, backend, SEGMENT_BYTES_MAX))
                .expect("opening the append log");
            if log.io_backend() != backend {
                println!(
                    "note: {backend_name} unavailable, measured {:?}",
                    log.io_backend()
                );
            }
            let id = format!("append/{backend_name}/{policy_name}");
            group.bench_function(format!("{backend_name}/{policy_name}"), |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(log.append(&batch).expect("append"));
                    }
                    let elapsed = started.elapsed();
                    record_rate(
                        &id,
                        iters * payload_bytes,
                        iters * BATCH_RECORDS as u64,
                        elapsed,
                    );
                    // Keep the disk footprint to the active segment.
                    log.delete_segments_before(log.end_offset())
                        .expect("deleting old segments");
                    elapsed
                });
            });
            drop(log);
            drop(dir);
        }

        // Group commit: 4 threads append under `Always` at once; one
        // iteration is one batch from each thread.
        let dir = bench_dir("append-group");
        let log = Log::open(
            dir.path(),
            log_config(FsyncPolicy::Always, backend, SEGMENT_BYTES_MAX),
        )
        .expect("opening the group-commit log");
        let threads = GROUP_COMMIT_THREADS as u64;
        let id = format!("append/{backend_name}/always_{GROUP_COMMIT_THREADS}_threads");
        group.throughput(Throughput::Bytes(payload_bytes * threads));
        group.bench_function(
            format!("{backend_name}/always_{GROUP_COMMIT_THREADS}_threads"),
            |b| {
                b.iter_custom(|iters| {
                    let start = Barrier::new(GROUP_COMMIT_THREADS + 1);
                    let elapsed = std::thread::scope(|scope| {
                        for _ in 0..GROUP_COMMIT_THREADS {
                            scope.spawn(|| {
                                start.wait();
                                for _ in 0..iters {
                                    black_box(log.append(&batch).expect("append"));
                                }
                            });
                        }
                        start.wait();
                        let started = Instant::now();
                        // Leaving the scope joins every appender.
                        started
                    })
                    .elapsed();
                    record_rate(
                        &id,
                        iters * threads * payload_bytes,
                        iters * threads * BATCH_RECORDS as u64,
                        elapsed,
                    );
                    log.delete_segments_before(log.end_offset())
                        .expect("deleting old segments");
                    elapsed
                });
            },
        );
        group.throughput(Throughput::Bytes(payload_bytes));
        drop(log);
        drop(dir);
    }

    // Baseline: copy a 64 KiB buffer into a 64 MiB ring of destinations
    // (larger than any cache, like page-cache writes).
    let source = payload(RECORD_BYTES * BATCH_RECORDS, 2).to_vec();
    let mut ring = vec![0u8; 64 * MIB];
    let slots = ring.len() / source.len();
    group.bench_function("memcpy_64KiB", |b| {
        let mut slot = 0usize;
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                let at = slot * source.len();
                ring[at..at + source.len()].copy_from_slice(black_box(&source));
                black_box(&mut ring[at]);
                slot = (slot + 1) % slots;
            }
            let elapsed = started.elapsed();
            record_rate(
                "memcpy_64KiB",
                iters * payload_bytes,
                iters * BATCH_RECORDS as u64,
                elapsed,
            );
            elapsed
        });
    });
    group.finish();

    let rates = RATES.lock().unwrap_or_else(|p| p.into_inner());
    println!("\nappend summary (payload bytes; each batch is {batch_bytes} bytes on disk):");
    for (id, rate) in rates.iter() {
        println!(
            "  {id:<40} {:>9.1} MB/s {:>12.0} records/s",
            rate.mb_per_s(),
            rate.items_per_s()
        );
    }
    if let (Some(never), Some(memcpy)) = (
        rates.get("append/portable/never"),
        rates.get("memcpy_64KiB"),
    ) {
        println!(
            "  ratio append(never) / memcpy = {:.3} (target >= 0.5)",
            never.mb_per_s() / memcpy.mb_per_s()
        );
    }
}

criterion_group!(benches, append);
criterion_main!(benches);
