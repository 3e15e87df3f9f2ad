//! Replays the checked-in seed corpus of the log-store fuzz targets
//! (`../fuzz/corpus/batch_decode/` and `../fuzz/corpus/segment_recovery/`)
//! through the same entry points the targets call, so that CI on stable
//! catches a regression on any seed without libFuzzer.
//!
//! `write_seed_corpus` (ignored) regenerates the seeds from real batches and
//! segments written through the public API, plus damaged variants.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use dmq_log_store::fuzzing::{decode_batch, recover_segment, scan_segment};
use dmq_log_store::{BatchInput, FsyncPolicy, Log, LogConfig, ManualClock, MessageId, RecordInput};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name; fails on an empty or
/// missing corpus so that a moved directory cannot pass silently.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing the corpus").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let data = std::fs::read(&path).expect("reading a corpus file");
            (path, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files
}

#[test]
fn batch_decode_corpus_replays() {
    let files = corpus("batch_decode");
    for (path, data) in &files {
        eprintln!("batch_decode {}", path.display());
        decode_batch(data);
    }
    // The corpus holds valid seeds too, or it exercises only the errors.
    let valid = files
        .iter()
        .filter(|(_, data)| {
            dmq_log_store::RecordBatch::decode(Bytes::copy_from_slice(data)).is_ok()
        })
        .count();
    assert!(valid >= 2, "only {valid} valid batches in the corpus");
}

#[test]
fn segment_recovery_corpus_replays() {
    let files = corpus("segment_recovery");
    for (path, data) in &files {
        eprintln!("segment_recovery {}", path.display());
        scan_segment(data);
        recover_segment(data);
    }
}

fn seed_log(dir: &Path) -> Log {
    let config = LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    Log::open_with_clock(dir, config, Arc::new(ManualClock::new(1_700_000_000_000)))
        .expect("opening a seed log")
}

fn full_record() -> RecordInput {
    RecordInput {
        id: Some(MessageId::new(1_600_000_000_000, 42)),
        key: Some(Bytes::from_static(b"order-17")),
        headers: vec![
            (Bytes::from_static(b"trace"), Bytes::from_static(b"abc")),
            (Bytes::from_static(b"empty"), Bytes::new()),
        ],
        value: Bytes::from_static(b"{\"amount\":12}"),
        deliver_at_ms: Some(1_700_000_005_000),
        expire_at_ms: Some(1_700_000_900_000),
    }
}

fn write(target: &str, name: &str, data: &[u8]) {
    let path = corpus_dir(target).join(name);
    std::fs::write(&path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn flipped(data: &[u8], at: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    out[at] ^= 0x20;
    out
}

#[test]
#[ignore = "rewrites the seed corpus in ../fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    for target in ["batch_decode", "segment_recovery"] {
        std::fs::create_dir_all(corpus_dir(target)).expect("creating a corpus dir");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let log = seed_log(dir.path());
    let batches = [
        BatchInput::new(vec![RecordInput::new(&b"hello"[..])]),
        BatchInput {
            producer_id: 7,
            producer_seq: 100,
            records: vec![
                full_record(),
                RecordInput::new(&b"second"[..]).with_key(&b"k"[..]),
            ],
        },
        BatchInput::new(
            (0..10)
                .map(|i| RecordInput::new(vec![i as u8; 20]).with_key(format!("key-{}", i % 3)))
                .collect(),
        ),
        BatchInput::new(vec![RecordInput::new(Bytes::new())]),
    ];
    for batch in &batches {
        log.append(batch).expect("appending a seed batch");
    }
    let stored = log.read(0, 1 << 20).expect("reading the seed batches");
    assert_eq!(stored.len(), batches.len());
    let segment_len = log.size_bytes() as usize;
    drop(log);
    let segment_file = dir.path().join("00000000000000000000.log");
    let mut segment = std::fs::read(&segment_file).expect("reading the seed segment");
    segment.truncate(segment_len);

    // batch_decode: valid batches, then damaged ones.
    let one = stored[0].as_bytes();
    let full = stored[1].as_bytes();
    let many = stored[2].as_bytes();
    write("batch_decode", "valid_one_record", one);
    write("batch_decode", "valid_full_record", full);
    write("batch_decode", "valid_ten_records", many);
    write("batch_decode", "valid_empty_value", stored[3].as_bytes());
    write("batch_decode", "bad_crc", &flipped(full, full.len() - 3));
    write("batch_decode", "bad_magic", &flipped(one, 0));
    write("batch_decode", "bad_version", &flipped(one, 12));
    write("batch_decode", "truncated", &many[..many.len() - 9]);
    write("batch_decode", "header_only", &one[..64]);
    let mut trailing = one.to_vec();
    trailing.push(0);
    write("batch_decode", "trailing_byte", &trailing);
    write("batch_decode", "empty", &[]);

    // segment_recovery: a clean segment, then torn and damaged ones.
    let starts: Vec<usize> = stored
        .iter()
        .scan(0usize, |at, batch| {
            let start = *at;
            *at += batch.as_bytes().len();
            Some(start)
        })
        .collect();
    write("segment_recovery", "valid_four_batches", &segment);
    let mut zero_tail = segment.clone();
    zero_tail.resize(segment.len() + 512, 0);
    write("segment_recovery", "valid_zero_tail", &zero_tail);
    write(
        "segment_recovery",
        "torn_last_batch",
        &segment[..segment.len() - 5],
    );
    write(
        "segment_recovery",
        "corrupt_middle_batch",
        &flipped(&segment, starts[1] + 70),
    );
    let mut garbage_tail = segment.clone();
    garbage_tail.extend_from_slice(b"\x01garbage after the last batch");
    write("segment_recovery", "garbage_tail", &garbage_tail);
    write(
        "segment_recovery",
        "starts_at_wrong_offset",
        &segment[starts[2]..],
    );
    let mut lost_length = segment.clone();
    lost_length[starts[1] + 4..starts[1] + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    write("segment_recovery", "huge_batch_length", &lost_length);
    write("segment_recovery", "zeros", &[0u8; 300]);
    write("segment_recovery", "empty", &[]);
}
