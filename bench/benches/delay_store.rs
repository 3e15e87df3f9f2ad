//! The delayed-message store (`dmq_dispatcher::DelayStore`) on real files:
//!
//! - `delay_store/schedule`: schedule throughput, batches of 100 delays of
//!   100 B with due times spread over a week, timer log under
//!   `FsyncPolicy::Always` (each `schedule` call is durable on return) and
//!   under `Never` (the CPU side).
//! - restart (printed, not a criterion measurement): `DMQ_BENCH_DELAYS`
//!   pending delays (default 1M; the target is 10M opening in ≤ 5 s with a
//!   peak RSS ≤ 256 MiB) spread over a week, half of the index left
//!   unflushed so the open also re-indexes the timer log. Each open runs in a
//!   child process (this bench re-executed) so that its `VmHWM` (peak RSS,
//!   from `/proc/self/status`) is the open's alone.
//! - lateness (printed): a steady schedule rate (1k/s) on a simulated clock polled
//!   every 10 ms; prints p50/p99/max of (poll time − due time) in simulated
//!   ms (the store itself adds nothing beyond the poll interval) and the wall
//!   time per poll.
//!
//! Run: `cargo bench -p dmq-bench --bench delay_store`
//! (`DMQ_BENCH_DELAYS=100000` for a quick one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use dmq_bench::{bench_dir, env_u64, payload, Spread};
use dmq_dispatcher::storage::FileStorage;
use dmq_dispatcher::{DelayConfig, DelayStore, Storage};
use dmq_log_store::{FsyncPolicy, LogConfig, RecordInput};

const WEEK_MS: u64 = 7 * 86_400_000;
const CHILD_ENV: &str = "DMQ_DELAY_BENCH_CHILD";

fn storage(dir: &std::path::Path, fsync: FsyncPolicy) -> Arc<dyn Storage> {
    let config = LogConfig {
        fsync,
        segment_bytes_max: 256 << 20,
        ..LogConfig::default()
    };
    Arc::new(FileStorage::new(dir, config).expect("file storage"))
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn batch(
    spread: &mut Spread,
    now: i64,
    count: usize,
    value: &bytes::Bytes,
) -> Vec<(String, u32, RecordInput)> {
    (0..count)
        .map(|i| {
            let record = RecordInput {
                deliver_at_ms: Some(now + 60_000 + spread.below(WEEK_MS) as i64),
                ..RecordInput::new(value.clone())
            };
            ("orders".to_string(), (i % 8) as u32, record)
        })
        .collect()
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// In the child: open the store under `dir`, print the figures, exit.
fn restart_child(dir: &str, now: i64) {
    let storage = storage(dir.as_ref(), FsyncPolicy::Never);
    let log_started = Instant::now();
    storage.partition("__dmq_delay", 0).expect("timer log");
    println!(
        "delay_store/restart: timer-log open alone {:.3} s, VmHWM {} MiB (mapped segment pages count)",
        log_started.elapsed().as_secs_f64(),
        vm_hwm_kib().unwrap_or(0) / 1024
    );
    let started = Instant::now();
    let (store, recovery) =
        DelayStore::open(storage, DelayConfig::default(), now).expect("reopening the delay store");
    let elapsed = started.elapsed();
    println!(
        "delay_store/restart: {} pending, {} buckets, {} re-indexed, open {:.3} s, loaded {} entries, VmHWM {} MiB",
        store.pending(),
        recovery.buckets,
        recovery.reindexed_records,
        elapsed.as_secs_f64(),
        store.loaded_len(),
        vm_hwm_kib().unwrap_or(0) / 1024
    );
}

fn schedule_throughput(c: &mut Criterion) {
    let value = payload(100, 7);
    let mut group = c.benchmark_group("delay_store");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(100));
    for (label, fsync) in [
        ("schedule_fsync_always", FsyncPolicy::Always),
        ("schedule_fsync_never", FsyncPolicy::Never),
    ] {
        let dir = bench_dir("delay-schedule");
        let now = wall_ms();
        let (mut store, _) =
            DelayStore::open(storage(dir.path(), fsync), DelayConfig::default(), now)
                .expect("open");
        let mut spread = Spread::new(11);
        group.bench_function(label, |b| {
            b.iter(|| {
                store
                    .schedule(batch(&mut spread, now, 100, &value), now)
                    .expect("schedule")
            });
        });
        let flush = Instant::now();
        store.checkpoint().expect("checkpoint");
        println!(
            "delay_store/{label}: {} pending in {} buckets, checkpoint {:.3} s",
            store.pending(),
            store.bucket_count(),
            flush.elapsed().as_secs_f64()
        );
    }
    group.finish();
}

fn restart(count: u64) {
    let dir = bench_dir("delay-restart");
    let now = wall_ms();
    let value = payload(100, 9);
    let started = Instant::now();
    {
        let (mut store, _) = DelayStore::open(
            storage(dir.path(), FsyncPolicy::Never),
            DelayConfig::default(),
            now,
        )
        .expect("open");
        let mut spread = Spread::new(5);
        let mut scheduled = 0;
        while scheduled < count {
            let n = (count - scheduled).min(1_000) as usize;
            store
                .schedule(batch(&mut spread, now, n, &value), now)
                .expect("schedule");
            scheduled += n as u64;
            if scheduled == count / 2 {
                store.checkpoint().expect("checkpoint");
            }
        }
        // Dropped without a final checkpoint: the open re-indexes a tail.
    }
    println!(
        "delay_store/restart: built {count} pending in {:.1} s (parent VmHWM {} MiB)",
        started.elapsed().as_secs_f64(),
        vm_hwm_kib().unwrap_or(0) / 1024
    );
    for _ in 0..2 {
        let exe = std::env::current_exe().expect("current exe");
        let status = std::process::Command::new(exe)
            .env(CHILD_ENV, format!("{}|{now}", dir.path().display()))
            .status()
            .expect("spawning the restart child");
        assert!(status.success(), "restart child failed");
    }
}

fn lateness() {
    let dir = bench_dir("delay-lateness");
    let mut now: i64 = 1_700_000_000_000;
    let (mut store, _) = DelayStore::open(
        storage(dir.path(), FsyncPolicy::Never),
        DelayConfig::default(),
        now,
    )
    .expect("open");
    let value = payload(100, 3);
    let mut spread = Spread::new(17);
    let mut lateness_ms = Vec::new();
    let mut poll_wall = Vec::new();
    // 10 simulated minutes: 10 delays (0..5 min) scheduled every 10 ms
    // (1k/s), a poll every 10 ms, a checkpoint every simulated second.
    let end = now + 600_000;
    while now < end {
        now += 10;
        let entries = (0..10)
            .map(|_| {
                let record = RecordInput {
                    deliver_at_ms: Some(now + spread.below(300_000) as i64),
                    ..RecordInput::new(value.clone())
                };
                ("orders".to_string(), 0, record)
            })
            .collect();
        store.schedule(entries, now).expect("schedule");
        let started = Instant::now();
        let due = store.poll_due(now, usize::MAX).expect("poll");
        let ids: Vec<_> = due.iter().map(|m| m.id).collect();
        store.mark_fired(&ids).expect("mark");
        poll_wall.push(started.elapsed());
        lateness_ms.extend(due.iter().map(|m| now - m.due_ms));
        if now % 1_000 == 0 {
            store.checkpoint().expect("checkpoint");
        }
    }
    lateness_ms.sort_unstable();
    poll_wall.sort_unstable();
    let pick = |q: f64| lateness_ms[((lateness_ms.len() - 1) as f64 * q) as usize];
    let wall = |q: f64| poll_wall[((poll_wall.len() - 1) as f64 * q) as usize];
    println!(
        "delay_store/lateness: {} fired, lateness p50 {} ms p99 {} ms max {} ms (simulated, 10 ms polls); poll+mark wall p50 {:?} p99 {:?} max {:?}",
        lateness_ms.len(),
        pick(0.5),
        pick(0.99),
        lateness_ms.last().copied().unwrap_or(0),
        wall(0.5),
        wall(0.99),
        poll_wall.last().copied().unwrap_or_default()
    );
}

fn main() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        let (dir, now) = arg.rsplit_once('|').expect("child argument");
        restart_child(dir, now.parse().expect("child now"));
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    schedule_throughput(&mut criterion);
    criterion.final_summary();
    restart(env_u64("DMQ_BENCH_DELAYS", 1_000_000));
    lateness();
}
