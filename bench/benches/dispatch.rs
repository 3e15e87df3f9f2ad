//! In-process dispatch: a warm log delivered to one consumer group that acks
//! every message (fetch + ack, no sockets). Measures messages per second on
//! simulated storage (the dispatcher's own cost) and on a real log.
//!
//! `cargo bench -p dmq-bench --bench dispatch`; `DMQ_BENCH_DISPATCH` sets the
//! number of messages per iteration (default 100k).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_dispatcher::{
    Dispatcher, DispatcherConfig, FileStorage, GroupConfig, MemoryStorage, NullEventSink, Storage,
    TopicConfig,
};
use dmq_log_store::{FsyncPolicy, LogConfig, ManualClock, RecordInput};

fn messages() -> u64 {
    std::env::var("DMQ_BENCH_DISPATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Produces `count` 1 KiB messages, then times fetch + ack of all of them by
/// a fresh group.
fn run(storage: Arc<dyn Storage>, count: u64, iteration: u64) -> Duration {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut dispatcher = Dispatcher::open(
        storage,
        clock,
        Arc::new(NullEventSink),
        DispatcherConfig::default(),
    )
    .expect("open dispatcher");
    dispatcher
        .create_topic(
            "bench",
            TopicConfig {
                partitions: 1,
                ordered: false,
            },
        )
        .expect("topic");
    let value = vec![7u8; 1024];
    let mut produced = 0;
    while produced < count {
        let batch = (0..1000.min(count - produced))
            .map(|_| RecordInput::new(value.clone()))
            .collect();
        produced += dispatcher
            .produce("bench", Some(0), batch)
            .expect("produce")
            .len() as u64;
    }
    let group = format!("g{iteration}");
    let config = GroupConfig {
        max_unacked_per_partition: 10_000,
        ..GroupConfig::default()
    };
    dispatcher
        .subscribe("bench", &group, config)
        .expect("subscribe");
    let member = dispatcher.join("bench", &group, "m").expect("join");
    let started = Instant::now();
    let mut delivered = 0;
    while delivered < count {
        let deliveries = dispatcher.fetch(member, 1000).expect("fetch");
        assert!(!deliveries.is_empty(), "stalled at {delivered}");
        for delivery in &deliveries {
            dispatcher
                .ack(member, delivery.partition, delivery.record.offset)
                .expect("ack");
        }
        delivered += deliveries.len() as u64;
    }
    dispatcher.checkpoint().expect("checkpoint");
    started.elapsed()
}

fn dispatch(c: &mut Criterion) {
    let count = messages();
    let mut group = c.benchmark_group("dispatch_fetch_ack");
    group.throughput(Throughput::Elements(count));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("memory_storage", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|i| {
                    let clock = Arc::new(ManualClock::new(0));
                    run(Arc::new(MemoryStorage::new(clock)), count, i)
                })
                .sum()
        })
    });
    group.bench_function("file_storage", |b| {
        b.iter_custom(|iterations| {
            (0..iterations)
                .map(|i| {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let config = LogConfig {
                        fsync: FsyncPolicy::Never,
                        segment_bytes_max: 256 << 20,
                        ..LogConfig::default()
                    };
                    let storage = FileStorage::new(dir.path(), config).expect("storage");
                    run(Arc::new(storage), count, i)
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
