//! Replays the checked-in seed corpus of the `index_open` fuzz target
//! (`../fuzz/corpus/index_open/`) through the entry point the target calls,
//! so that CI on stable catches a regression on any seed without libFuzzer.
//!
//! `write_seed_corpus` (ignored) regenerates the seeds: sealed files of
//! every kind written through the public API, plus damaged variants.

use std::path::{Path, PathBuf};

use dmq_index::fuzzing::open_index_files;
use dmq_index::{
    IdIndexBuilder, KeyIndexBuilder, OffsetIndex, SealedIdIndex, SealedKeyIndex, TimeIndex,
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/index_open")
}

#[test]
fn index_open_corpus_replays() {
    let dir = corpus_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing the corpus").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "the corpus {} is empty", dir.display());
    for path in &paths {
        eprintln!("index_open {}", path.display());
        open_index_files(&std::fs::read(path).expect("reading a corpus file"));
    }
}

/// The corpus must hold a file that opens as each kind, or the fuzzer
/// starts without a single valid example of it.
#[test]
fn index_open_corpus_has_a_valid_file_of_each_kind() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut opened = [false; 4];
    for entry in std::fs::read_dir(corpus_dir()).expect("reading the corpus") {
        let source = entry.expect("listing the corpus").path();
        let data = std::fs::read(&source).expect("reading a corpus file");
        let base = data
            .get(8..16)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let path = scratch.path().join("probe");
        std::fs::write(&path, &data).expect("writing a probe");
        opened[0] |= OffsetIndex::open_sealed(&path, base).is_ok();
        opened[1] |= TimeIndex::open_sealed(&path, base).is_ok();
        opened[2] |= SealedIdIndex::open(&path, base).is_ok();
        opened[3] |= SealedKeyIndex::open(&path, base).is_ok();
    }
    assert_eq!(opened, [true; 4], "[offset, time, id, key] seeds that open");
}

fn id(i: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(1_700_000_000_000u64 + u64::from(i)).to_be_bytes());
    id[12..].copy_from_slice(&i.to_be_bytes());
    id
}

fn flipped(data: &[u8], at: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    out[at] ^= 0x04;
    out
}

#[test]
#[ignore = "rewrites the seed corpus in ../fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let out = corpus_dir();
    std::fs::create_dir_all(&out).expect("creating the corpus dir");
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| dir.path().join(name);
    let write = |name: &str, data: &[u8]| {
        std::fs::write(out.join(name), data).expect("writing a corpus file");
    };
    let segment_bytes = 40_000;

    let mut offset = OffsetIndex::create(&at("offset"), 0, 16).expect("create");
    for i in 0..10u32 {
        offset.push(i * 7, i * 4000).expect("push");
    }
    // An unsealed (active) file, as a crash would leave it.
    write(
        "offset_active",
        &std::fs::read(at("offset")).expect("read active"),
    );
    offset.seal(segment_bytes).expect("seal");
    drop(offset);
    let offset_sealed = std::fs::read(at("offset")).expect("read");
    write("offset_sealed", &offset_sealed);
    write("offset_sealed_bit_flip", &flipped(&offset_sealed, 70));
    write(
        "offset_sealed_truncated",
        &offset_sealed[..offset_sealed.len() - 3],
    );

    let mut time = TimeIndex::create(&at("time"), 5_000, 16).expect("create");
    for i in 0..10u32 {
        time.push(1_700_000_000_000 + i64::from(i / 2) * 10, i * 7)
            .expect("push");
    }
    time.seal(segment_bytes).expect("seal");
    drop(time);
    let time_sealed = std::fs::read(at("time")).expect("read");
    write("time_sealed_base_5000", &time_sealed);
    write("time_sealed_header_flip", &flipped(&time_sealed, 20));

    let mut ids = IdIndexBuilder::new();
    for i in 0..12u32 {
        ids.insert(id(i * 37 % 12), i);
    }
    ids.write_sealed(&at("id"), 0, segment_bytes)
        .expect("write id");
    let id_sealed = std::fs::read(at("id")).expect("read");
    write("id_sealed", &id_sealed);
    write("id_sealed_truncated", &id_sealed[..id_sealed.len() - 20]);

    let mut keys = KeyIndexBuilder::new();
    for i in 0..12u32 {
        keys.insert(format!("customer-{}", i % 4).as_bytes(), i);
    }
    keys.write_sealed(&at("key"), 0, segment_bytes)
        .expect("write key");
    let key_sealed = std::fs::read(at("key")).expect("read");
    write("key_sealed_duplicates", &key_sealed);
    write("key_sealed_entry_flip", &flipped(&key_sealed, 80));

    IdIndexBuilder::new()
        .write_sealed(&at("empty"), 0, 0)
        .expect("write empty id");
    write(
        "id_sealed_empty",
        &std::fs::read(at("empty")).expect("read"),
    );
    write("garbage", b"DMDX not really an index file");
    write("empty", &[]);
}
