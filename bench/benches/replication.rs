//! Replicated produce (issue 12) against the same produce on one node,
//! in one run: batches of 100 records of 1 KiB, 16 producers at once.
//!
//! - `one_log_fsync_always`: [`Log::append`] on one segment log with
//!   fsync `always` (group commit), from 16 threads.
//! - `three_replicas`: [`PartitionNode::produce`] on the leader of a
//!   three-replica partition group in this process (the segment log is
//!   the Raft log; each replica fsyncs; the answer comes once a quorum
//!   has), from 16 tasks.
//!
//! Everything runs on this machine's cores, so the three replicas share
//! them: issue 12 asks for at least 40 % of the single-node figure.
//!
//! Run: `cargo bench -p dmq-bench --bench replication`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmq_bench::{bench_dir, KIB};
use dmq_log_store::{BatchInput, FsyncPolicy, Log, LogConfig, RecordInput};
use dmq_replication::{NodeConfig, PartitionNode};

const RECORDS_PER_BATCH: usize = 100;
const PRODUCERS: usize = 16;

fn records(value: &Bytes) -> Vec<RecordInput> {
    (0..RECORDS_PER_BATCH)
        .map(|_| RecordInput::new(value.clone()))
        .collect()
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 << 20,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn replication(c: &mut Criterion) {
    let value = Bytes::from(vec![b'x'; KIB]);
    let mut group = c.benchmark_group("replicated_produce");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements((RECORDS_PER_BATCH * PRODUCERS) as u64));

    let dir = bench_dir("replication-one");
    let log = Arc::new(Log::open(dir.path().join("log"), log_config()).expect("log"));
    group.bench_function("one_log_fsync_always", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..PRODUCERS {
                    let (log, value) = (Arc::clone(&log), value.clone());
                    scope.spawn(move || {
                        for _ in 0..iters {
                            log.append(&BatchInput::new(records(&value)))
                                .expect("append");
                        }
                    });
                }
            });
            started.elapsed()
        });
    });
    drop(log);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dirs: Vec<_> = (0..3)
        .map(|i| bench_dir(&format!("replication-{i}")))
        .collect();
    let nodes: Vec<Arc<PartitionNode>> = runtime.block_on(async {
        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let config = NodeConfig::new(
                i as u64 + 1,
                dir.path().to_path_buf(),
                "127.0.0.1:0".parse().expect("addr"),
            );
            nodes.push(Arc::new(
                PartitionNode::start(config, log_config())
                    .await
                    .expect("start"),
            ));
        }
        let members: BTreeMap<u64, String> = nodes
            .iter()
            .map(|n| (n.id(), n.addr().to_string()))
            .collect();
        nodes[0].initialize(members).await.expect("initialize");
        nodes
    });
    let leader = runtime.block_on(async {
        loop {
            if let Some(leader) = nodes[0].leader().await {
                let node = nodes.iter().find(|n| n.id() == leader).expect("leader");
                if node.produce(records(&value)).await.is_ok() {
                    return Arc::clone(node);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    group.bench_function("three_replicas", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..PRODUCERS {
                    let (leader, value) = (Arc::clone(&leader), value.clone());
                    tasks.spawn(async move {
                        for _ in 0..iters {
                            leader.produce(records(&value)).await.expect("produce");
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.expect("producer");
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    drop(leader);
    runtime.block_on(async {
        for node in nodes {
            if let Ok(node) = Arc::try_unwrap(node) {
                node.shutdown().await;
            }
        }
    });
}

criterion_group!(benches, replication);
criterion_main!(benches);
