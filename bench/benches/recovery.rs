//! Recovery, with `DMQ_BENCH_SEGMENT_MB` MiB segments (default 1024):
//!
//! - `recovery/active_scan`: `Log::open` of a log whose last (active)
//!   segment holds the whole size: the open scans and CRC-checks every batch
//!   and rebuilds the segment's indexes. Target ≥ 1 GB/s.
//! - `recovery/sealed_index_rebuild`: `Log::open` of a log whose sealed
//!   first segment of that size lost its four index files (deleted before
//!   each open, outside the timing): the open rebuilds and seals them.
//!   Target ≤ 10 s per GiB.
//!
//! Both read a warm page cache (the data was just written): they measure the
//! CPU side of recovery, not the disk. Records are 1 KiB in batches of 64.
//! Each sample is one open (`iter_custom`, flat sampling, 10 samples).
//!
//! Run: `cargo bench -p dmq-bench --bench recovery`
//! (`DMQ_BENCH_SEGMENT_MB=64` for a quick one).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dmq_bench::{
    bench_dir, env_u64, fill_segment, index_file_paths, log_config, payload, segment_file_path,
    value_batch, Rate, KIB, MIB,
};
use dmq_log_store::{FsyncPolicy, IoBackend, Log, LogConfig};

fn config(segment_bytes_max: u64) -> LogConfig {
    let segment_bytes_max = u32::try_from(segment_bytes_max)
        .ok()
        .filter(|&bytes| bytes < u32::MAX)
        .expect("DMQ_BENCH_SEGMENT_MB must stay below 4096");
    log_config(FsyncPolicy::Never, IoBackend::Portable, segment_bytes_max)
}

fn recovery(c: &mut Criterion) {
    let segment_bytes = env_u64("DMQ_BENCH_SEGMENT_MB", 1024).max(1) * MIB as u64;
    let batch = value_batch(64, &payload(KIB, 4));
    let batch_bytes = batch.encoded_len() as u64;

    let mut group = c.benchmark_group("recovery");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));

    // Active segment: one segment, sized so the data fills it but for one
    // batch of slack (the open also walks the zeroed rest of the file).
    let active_dir = bench_dir("recovery-active");
    let active_config = config(segment_bytes + batch_bytes);
    let written = {
        let log = Log::open(active_dir.path(), active_config.clone()).expect("opening");
        let written = fill_segment(&log, &batch, segment_bytes);
        assert_eq!(log.segment_count(), 1, "the active-scan log rolled");
        written
    };
    let mut active = Rate::default();
    group.throughput(Throughput::Bytes(written));
    group.bench_function("active_scan", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let log = Log::open(active_dir.path(), active_config.clone()).expect("recovery");
                let took = started.elapsed();
                elapsed += took;
                assert_eq!(log.size_bytes(), written, "recovery lost data");
                active.add(written, 1, took);
                drop(log);
            }
            elapsed
        });
    });
    drop(active_dir);

    // Sealed segment: fill the first segment, roll with one more batch, then
    // open with a small segment size so the tiny active segment costs nothing.
    let sealed_dir = bench_dir("recovery-sealed");
    let sealed_bytes = {
        let log = Log::open(sealed_dir.path(), config(segment_bytes)).expect("opening");
        let written = fill_segment(&log, &batch, segment_bytes);
        let roll = log.append(&batch).expect("rolling append");
        assert_eq!(
            log.segment_count(),
            2,
            "the sealed-rebuild log did not roll"
        );
        drop(log);
        // The new active segment holds its first allocation (64 KiB); cut it
        // to its one batch so that reopening measures only the sealed
        // segment's rebuild.
        let active = std::fs::OpenOptions::new()
            .write(true)
            .open(segment_file_path(sealed_dir.path(), roll.base_offset))
            .expect("opening the active segment");
        active
            .set_len(batch_bytes)
            .expect("trimming the active segment");
        written
    };
    let reopen_config = config(MIB as u64);
    let mut rebuild = Rate::default();
    group.throughput(Throughput::Bytes(sealed_bytes));
    group.bench_function("sealed_index_rebuild", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                for path in index_file_paths(sealed_dir.path(), 0) {
                    std::fs::remove_file(&path).expect("deleting an index file");
                }
                let started = Instant::now();
                let log = Log::open(sealed_dir.path(), reopen_config.clone()).expect("recovery");
                let took = started.elapsed();
                elapsed += took;
                assert_eq!(
                    log.recovery_report().indexes_rebuilt,
                    vec![0],
                    "the index was not rebuilt"
                );
                rebuild.add(sealed_bytes, 1, took);
                drop(log);
            }
            elapsed
        });
    });
    group.finish();
    drop(sealed_dir);

    let gib = (1u64 << 30) as f64;
    println!(
        "recovery summary: active scan {:.2} GB/s over {} MiB (target >= 1 GB/s); \
         sealed index rebuild {:.2} s per GiB over {} MiB (target <= 10 s)",
        active.mb_per_s() / 1000.0,
        written / MIB as u64,
        rebuild.elapsed.as_secs_f64() / (rebuild.bytes as f64 / gib).max(1e-12),
        sealed_bytes / MIB as u64,
    );
}

criterion_group!(benches, recovery);
criterion_main!(benches);
