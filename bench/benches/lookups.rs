//! Lookups (target: median < 1 µs each).
//!
//! - `lookups/log/*`: on a log of `DMQ_BENCH_RECORDS` records (default
//!   10 000 000; 64-byte values keyed `key-NNNNNNNNNN`, batches of 1000,
//!   `FsyncPolicy::Never`, 1 GiB segments): `read_record` by offset,
//!   `offset_for_timestamp`, `find_by_id`, `offset_of_id` (the id index
//!   alone, no record read), `find_by_key` (limit 1), each at
//!   pseudo-random targets spread over the whole log.
//! - `lookups/index/*`: `dmq-index` alone on the sealed index files of one
//!   1 GiB segment of such records: `OffsetIndex::lookup`,
//!   `TimeIndex::last_before` (262 144 entries each: one per 4 KiB),
//!   `SealedIdIndex::get`, `SealedKeyIndex::get` (min(records, 8 000 000)
//!   entries).
//!
//! Run: `cargo bench -p dmq-bench --bench lookups`
//! (`DMQ_BENCH_RECORDS=200000` for a quick one).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dmq_bench::{build_lookup_log, build_sealed_indexes, key_for, synthetic_id, Spread};

const TARGETS: usize = 4096;
const SPARSE_ENTRIES: u32 = 262_144;
const RECORDS_PER_SEGMENT_MAX: u64 = 8_000_000;

fn log_lookups(c: &mut Criterion) {
    let records = dmq_bench::env_u64("DMQ_BENCH_RECORDS", 10_000_000).max(1000);
    let started = Instant::now();
    let built = build_lookup_log(records, 1000, 64, 1 << 30, TARGETS);
    println!(
        "lookups: built {records} records, {} MiB, {} segments in {:.1?}",
        built.log.size_bytes() >> 20,
        built.log.segment_count(),
        started.elapsed()
    );
    let log = &built.log;
    let mut spread = Spread::new(5);
    let offsets = spread.sample(TARGETS, records);
    let span_ms = (built.last_timestamp_ms - built.first_timestamp_ms).max(1) as u64;
    let timestamps: Vec<i64> = spread
        .sample(TARGETS, span_ms)
        .into_iter()
        .map(|delta| built.first_timestamp_ms + delta as i64)
        .collect();
    let keys: Vec<_> = offsets.iter().map(|&offset| key_for(offset)).collect();
    let ids = &built.sample_ids;
    assert!(!ids.is_empty(), "no id was sampled");

    let mut group = c.benchmark_group("lookups/log");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("read_record", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(log.read_record(offsets[i]).expect("read_record"))
        });
    });
    group.bench_function("offset_for_timestamp", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(
                log.offset_for_timestamp(timestamps[i])
                    .expect("offset_for_timestamp"),
            )
        });
    });
    group.bench_function("find_by_id", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(log.find_by_id(&ids[i].1).expect("find_by_id"))
        });
    });
    group.bench_function("offset_of_id", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ids.len();
            black_box(log.offset_of_id(&ids[i].1).expect("offset_of_id"))
        });
    });
    group.bench_function("find_by_key", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(log.find_by_key(&keys[i], 1).expect("find_by_key"))
        });
    });
    group.finish();

    // Spot-check that the lookups find what they should.
    let (offset, id) = ids[ids.len() / 2];
    let found = log.find_by_id(&id).expect("find_by_id");
    assert_eq!(found.map(|r| r.offset), Some(offset));
    assert_eq!(log.offset_of_id(&id).expect("offset_of_id"), Some(offset));
    let by_key = log.find_by_key(&keys[0], 1).expect("find_by_key");
    assert_eq!(by_key.first().map(|r| r.offset), Some(offsets[0]));
    drop(built);
}

fn index_lookups(c: &mut Criterion) {
    let records = dmq_bench::env_u64("DMQ_BENCH_RECORDS", 10_000_000)
        .clamp(1000, RECORDS_PER_SEGMENT_MAX) as u32;
    let sparse_entries = SPARSE_ENTRIES.min(records);
    let started = Instant::now();
    let indexes = build_sealed_indexes(records, sparse_entries);
    println!(
        "lookups: sealed indexes with {records} ids/keys and {sparse_entries} sparse entries in {:.1?}",
        started.elapsed()
    );
    let mut spread = Spread::new(9);
    let targets: Vec<u32> = spread
        .sample(TARGETS, u64::from(records))
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let ids: Vec<[u8; 16]> = targets.iter().map(|&i| synthetic_id(i)).collect();
    let keys: Vec<_> = targets.iter().map(|&i| key_for(u64::from(i))).collect();
    let timestamps: Vec<i64> = spread
        .sample(TARGETS, u64::from(sparse_entries))
        .into_iter()
        .map(|delta| indexes.first_timestamp_ms + delta as i64)
        .collect();

    let mut group = c.benchmark_group("lookups/index");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("offset_lookup", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(indexes.offset.lookup(targets[i]))
        });
    });
    group.bench_function("time_last_before", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(indexes.time.last_before(timestamps[i]))
        });
    });
    group.bench_function("id_get", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(indexes.ids.get(&ids[i]))
        });
    });
    group.bench_function("key_get", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % TARGETS;
            black_box(indexes.keys.get(&keys[i]))
        });
    });
    group.finish();
    assert_eq!(indexes.ids.get(&ids[0]), Some(targets[0]));
    assert!(indexes.keys.get(&keys[0]).contains(&targets[0]));
}

criterion_group!(benches, log_lookups, index_lookups);
criterion_main!(benches);
