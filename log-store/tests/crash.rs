//! Crash test: a child process (this test binary, re-executed) appends with
//! `FsyncPolicy::Always` from several threads and reports every acknowledged
//! record on its stdout; the parent SIGKILLs it at random moments, reopens
//! the log and checks that every acknowledged record reads back byte for
//! byte, offsets are dense, and nothing past the recovery point is half
//! visible.
//!
//! `DMQ_CRASH_CYCLES` raises the number of kill cycles (default 50) for
//! manual campaigns; `DMQ_TEST_SEED` picks the seed.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Rng;
use dmq_log_store::{
    BatchInput, FsyncPolicy, IoBackend, LogConfig, MessageId, RecordInput, SystemClock,
};

const CHILD_DIR: &str = "DMQ_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "DMQ_CRASH_CHILD_SEED";
const CHILD_BACKEND: &str = "DMQ_CRASH_CHILD_BACKEND";
const APPENDERS: u64 = 4;
/// A child that is never killed stops by itself after this long.
const CHILD_MAX_LIFETIME: Duration = Duration::from_secs(30);

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 * 1024,
        index_interval_bytes: 1024,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

/// The value every record with this key carries: `len` bytes derived from
/// the key, so the parent can check records that were never acknowledged.
fn value_for(key: &[u8], len: usize) -> Vec<u8> {
    Rng::new(common::fnv1a(key)).bytes(len)
}

fn backend_name(backend: IoBackend) -> &'static str {
    match backend {
        IoBackend::Portable => "portable",
        IoBackend::IoUring => "io_uring",
    }
}

fn parse_backend(name: &str) -> IoBackend {
    match name {
        "io_uring" => IoBackend::IoUring,
        _ => IoBackend::Portable,
    }
}

/// The child: appends forever (until killed) and acknowledges on stdout.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return; // not a child: nothing to do
    };
    let seed: u64 = std::env::var(CHILD_SEED)
        .expect("child seed")
        .parse()
        .expect("numeric seed");
    let backend = parse_backend(&std::env::var(CHILD_BACKEND).expect("child backend"));
    let log = common::open(Path::new(&dir), config(), backend, Arc::new(SystemClock))
        .expect("child: open");
    let log = Arc::new(log);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nREADY {}", log.end_offset()).expect("stdout");
        out.flush().expect("stdout");
    }
    let started = Instant::now();
    let threads: Vec<_> = (0..APPENDERS)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (thread << 56));
                let mut seq = 0u64;
                while started.elapsed() < CHILD_MAX_LIFETIME {
                    let count = rng.range(1, 6);
                    let records: Vec<RecordInput> = (0..count)
                        .map(|_| {
                            seq += 1;
                            let key = format!("s{seed}-t{thread}-{seq}");
                            let len = match rng.below(4) {
                                0 => rng.below(16) as usize,
                                _ => rng.below(2048) as usize,
                            };
                            let value = value_for(key.as_bytes(), len);
                            RecordInput::new(value).with_key(key)
                        })
                        .collect();
                    let batch = BatchInput::new(records);
                    let info = log.append(&batch).expect("child: append");
                    let mut lines = String::new();
                    for (i, record) in batch.records.iter().enumerate() {
                        let key = std::str::from_utf8(record.key.as_deref().expect("key"))
                            .expect("utf-8 key");
                        lines.push_str(&format!(
                            "ACK {} {} {} {} {}\n",
                            info.base_offset + i as u64,
                            info.ids[i],
                            key,
                            record.value.len(),
                            common::fnv1a(&record.value)
                        ));
                    }
                    let mut out = std::io::stdout().lock();
                    out.write_all(lines.as_bytes()).expect("stdout");
                    out.flush().expect("stdout");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("appender thread");
    }
}

/// One acknowledged record, as the child reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    id: MessageId,
    key: String,
    len: usize,
    hash: u64,
}

fn parse_ack(line: &str) -> Option<(u64, Ack)> {
    let rest = &line[line.find("ACK ")? + 4..];
    let mut fields = rest.split_whitespace();
    let offset = fields.next()?.parse().ok()?;
    let ack = Ack {
        id: fields.next()?.parse().ok()?,
        key: fields.next()?.to_string(),
        len: fields.next()?.parse().ok()?,
        hash: fields.next()?.parse().ok()?,
    };
    Some((offset, ack))
}

/// What one child run produced.
struct ChildRun {
    acks: Vec<(u64, Ack)>,
    killed_before_ready: bool,
}

fn run_child(dir: &Path, backend: IoBackend, seed: u64, rng: &mut Rng) -> ChildRun {
    let exe = std::env::current_exe().expect("current_exe");
    let stderr_path = dir.with_extension("child-stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_SEED, seed.to_string())
        .env(CHILD_BACKEND, backend_name(backend))
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut acks = Vec::new();
        let mut line = Vec::new();
        let mut ready = Some(ready_tx);
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                break; // a line cut by the kill: not an acknowledgement
            }
            let text = String::from_utf8_lossy(&line);
            if text.contains("READY ") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            } else if let Some(ack) = parse_ack(&text) {
                acks.push(ack);
            }
        }
        acks
    });

    let killed_before_ready = rng.one_in(6);
    if killed_before_ready {
        // Kill during startup: open, recovery, truncation, preallocation.
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
    } else {
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("child never became ready; its stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_micros(rng.range(500, 80_000)));
    }
    let exited_early = child.try_wait().expect("try_wait");
    child.kill().expect("kill child");
    let status = child.wait().expect("wait child");
    let acks = reader.join().expect("reader thread");
    if exited_early.is_some() || status.signal() != Some(libc::SIGKILL) {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        panic!("child ended by itself ({status:?}); its stderr:\n{stderr}");
    }
    ChildRun {
        acks,
        killed_before_ready,
    }
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    // Not when this binary runs as a crash child.
    if std::env::var_os(CHILD_DIR).is_some() {
        return;
    }
    let cycles: usize = std::env::var("DMQ_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50)
        .max(50);
    let seed = common::seed("crash", 0xC0FFEE);
    let mut rng = Rng::new(seed);
    for backend in common::backends() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("log");
        let started = Instant::now();
        // Every acknowledged record still stored, by offset.
        let mut acked: BTreeMap<u64, Ack> = BTreeMap::new();
        // Ids of every record seen at the last verification, by offset.
        let mut seen: BTreeMap<u64, MessageId> = BTreeMap::new();
        let (mut total_acks, mut early_kills, mut rebuilds, mut torn) = (0usize, 0, 0, 0);
        for cycle in 0..cycles {
            let child_seed = rng.next_u64();
            let run = run_child(&dir, backend, child_seed, &mut rng);
            early_kills += usize::from(run.killed_before_ready);
            total_acks += run.acks.len();
            for (offset, ack) in run.acks {
                if let Some(previous) = acked.insert(offset, ack.clone()) {
                    panic!(
                        "cycle {cycle}: offset {offset} acknowledged twice: {previous:?} then {ack:?} \
                         (an acknowledged record was lost)"
                    );
                }
            }

            let what = format!("{backend:?} cycle {cycle} (seed {seed})");
            let log = common::open(&dir, config(), backend, Arc::new(SystemClock))
                .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
            let report = log.recovery_report().clone();
            assert!(report.corrupt_regions.is_empty(), "{what}: {report:?}");
            rebuilds += report.indexes_rebuilt.len();
            torn += usize::from(report.bytes_truncated > 0);
            let start = log.start_offset();
            let end = log.end_offset();
            // Dense offsets, every batch decodes, nothing past the end.
            let records = common::read_all(&log, 64 * 1024);
            assert_eq!(records.len() as u64, end - start, "{what}");
            for record in &records {
                let key = record.key.as_ref().expect("every record has a key");
                assert_eq!(
                    record.value,
                    Bytes::from(value_for(key, record.value.len())),
                    "{what}: record {} holds bytes its writer never wrote",
                    record.offset
                );
                if let Some(id) = seen.get(&record.offset) {
                    assert_eq!(*id, record.id, "{what}: record {} changed", record.offset);
                }
            }
            if let Some((&last_seen, _)) = seen.last_key_value() {
                assert!(
                    end > last_seen,
                    "{what}: records seen before are gone (end {end})"
                );
            }
            if let Some((&last_acked, _)) = acked.last_key_value() {
                assert!(
                    end > last_acked,
                    "{what}: acknowledged offset {last_acked} lost (end {end})"
                );
            }
            for (&offset, ack) in acked.range(start..) {
                let record = &records[(offset - start) as usize];
                assert_eq!(record.offset, offset);
                assert_eq!(record.id, ack.id, "{what}: id at acknowledged {offset}");
                assert_eq!(record.key.as_deref(), Some(ack.key.as_bytes()), "{what}");
                assert_eq!(
                    record.value.len(),
                    ack.len,
                    "{what}: value length at {offset}"
                );
                assert_eq!(
                    common::fnv1a(&record.value),
                    ack.hash,
                    "{what}: value at {offset}"
                );
            }
            // Lookups agree for the newest acknowledged records.
            for (&offset, ack) in acked.range(start..).rev().take(16) {
                let found = log
                    .find_by_id(&ack.id)
                    .unwrap_or_else(|e| panic!("{what}: find_by_id: {e}"))
                    .unwrap_or_else(|| panic!("{what}: id of {offset} not found"));
                assert_eq!(found.offset, offset, "{what}");
                let by_key = log
                    .find_by_key(ack.key.as_bytes(), 10)
                    .expect("find_by_key");
                assert_eq!(by_key.len(), 1, "{what}: key {}", ack.key);
                assert_eq!(by_key[0].offset, offset, "{what}");
            }
            seen = records.iter().map(|r| (r.offset, r.id)).collect();

            // Keep the log (and this test's work per cycle) bounded.
            let bases = common::segment_bases(&dir);
            if bases.len() > 10 {
                log.delete_segments_before(bases[bases.len() - 6])
                    .expect("delete old segments");
                let start = log.start_offset();
                acked = acked.split_off(&start);
                seen = seen.split_off(&start);
            }
        }
        eprintln!(
            "{backend:?}: {cycles} kills ({early_kills} during startup), {total_acks} acknowledged \
             records, {torn} torn tails cut, {rebuilds} index rebuilds, {:?}",
            started.elapsed()
        );
        assert!(total_acks > 0, "no append was ever acknowledged");
    }
}
