//! Replays the checked-in seed corpus of the `frame_decode` fuzz target
//! (`../fuzz/corpus/frame_decode/`) through the entry point the target
//! calls, so that CI on stable catches a regression on any seed without
//! libFuzzer.
//!
//! `write_seed_corpus` (ignored) regenerates the seeds from the sample
//! frames in `common/`, plus damaged variants.

mod common;

use std::path::{Path, PathBuf};

use dmq_protocol::fuzzing::{decode, FUZZ_MAX_FRAME_BYTES};
use dmq_protocol::{decode_frame, encode_frame_to_vec};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decode")
}

/// Every file of the corpus, sorted by name; fails on an empty or missing
/// corpus so that a moved directory cannot pass silently.
fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir();
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
fn frame_decode_corpus_replays() {
    let files = corpus();
    for (path, data) in &files {
        eprintln!("frame_decode {}", path.display());
        decode(data);
    }
    // The corpus holds valid seeds too, or it exercises only the errors.
    let valid = files
        .iter()
        .filter(|(_, data)| matches!(decode_frame(data, FUZZ_MAX_FRAME_BYTES), Ok(Some(_))))
        .count();
    assert!(valid >= 10, "only {valid} valid frames in the corpus");
    let invalid = files
        .iter()
        .filter(|(_, data)| decode_frame(data, FUZZ_MAX_FRAME_BYTES).is_err())
        .count();
    assert!(invalid >= 3, "only {invalid} invalid frames in the corpus");
}

#[test]
#[ignore = "rewrites the seed corpus in ../fuzz/corpus/frame_decode; run by hand"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes).expect("writing a seed");
    };
    let samples = common::sample_frames();
    let mut all = Vec::new();
    for (name, frame) in &samples {
        let bytes = encode_frame_to_vec(frame).expect("encodes");
        write(&format!("valid_{name}"), &bytes);
        all.extend_from_slice(&bytes);
    }
    // Several frames back to back, as on a pipelined connection.
    write("valid_pipelined", &all);

    let produce = encode_frame_to_vec(&samples[4].1).expect("encodes");
    assert_eq!(samples[4].0, "produce");
    write("incomplete_produce", &produce[..produce.len() - 3]);
    let mut trailing = produce.clone();
    trailing.push(0);
    let len = (trailing.len() - 4) as u32;
    trailing[..4].copy_from_slice(&len.to_le_bytes());
    write("invalid_trailing_byte", &trailing);
    let mut opcode = produce.clone();
    opcode[4..6].copy_from_slice(&0x7777u16.to_le_bytes());
    write("invalid_unknown_opcode", &opcode);
    write("invalid_oversize_length", &u32::MAX.to_le_bytes());
    write("invalid_short_length", &[3, 0, 0, 0, 1, 0, 0]);
    let mut bad_list = produce.clone();
    // The records count (after topic "orders", partition none, no
    // idempotence) claims a huge list.
    let count_at = 4 + 7 + 2 + 6 + 1 + 1;
    bad_list[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    write("invalid_huge_list_count", &bad_list);
}
