//! The durable write path two ways, for 4 KiB, 64 KiB and 1 MiB writes:
//!
//! - `pwrite_fdatasync`: `pwrite` then `fdatasync` (what the portable append
//!   backend does),
//! - `mmap_msync`: copy into a read-write mapping, then `msync` of the written
//!   range (`MmapMut::flush_range`),
//!
//! both into the same preallocated (`fallocate`) file whose blocks were
//! already written once (pre-zeroed), so neither pays for extent conversion.
//! `pwrite_fdatasync_fresh` repeats the pwrite case into freshly fallocated
//! (unwritten) blocks, where every fdatasync must also commit the metadata
//! that marks the extent written: what the log's stepwise growth costs
//! (docs/storage.md §2). `pwrite_fdatasync_extend` writes past the end of
//! an unallocated file, as a log without any preallocation would: every
//! fdatasync commits the new size and block allocation.
//!
//! Run: `cargo bench -p dmq-bench --bench durable_write`.
#![allow(unsafe_code)]

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dmq_bench::{bench_dir, payload, KIB, MIB};
use memmap2::MmapMut;

/// Size of the file the writes cycle through.
const FILE_BYTES: u64 = 64 * MIB as u64;
const WRITE_SIZES: [(usize, &str); 3] = [(4 * KIB, "4KiB"), (64 * KIB, "64KiB"), (MIB, "1MiB")];

fn preallocated(path: &Path, len: u64) -> File {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating the bench file");
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len).expect("fallocate");
    file
}

/// A new fallocated file whose allocation is already durable, so the first
/// timed fdatasync pays only for its own write.
fn fresh_file(path: &Path) -> File {
    let file = preallocated(path, FILE_BYTES);
    file.sync_all().expect("syncing the fresh file");
    file
}

/// Writes zeros over the whole file and syncs it, so its blocks are written.
fn pre_zero(file: &File, len: u64) {
    let zeros = vec![0u8; MIB];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).expect("pre-zeroing");
        at += n as u64;
    }
    file.sync_all().expect("syncing the pre-zeroed file");
}

fn durable_write(c: &mut Criterion) {
    let dir = bench_dir("durable-write");
    let written_path = dir.path().join("written.dat");
    let written = preallocated(&written_path, FILE_BYTES);
    pre_zero(&written, FILE_BYTES);
    // SAFETY: the file is private to this bench (a fresh temp directory), is
    // never truncated while mapped, and is only written through this mapping
    // and through `pwrite` on the same file while no slice of the mapping is
    // borrowed; its length is FILE_BYTES for the mapping's whole life.
    let mut map = unsafe { MmapMut::map_mut(&written) }.expect("mapping the bench file");
    assert_eq!(map.len() as u64, FILE_BYTES);

    let mut group = c.benchmark_group("durable_write");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    for (size, label) in WRITE_SIZES {
        let data = payload(size, size as u64).to_vec();
        let slots = FILE_BYTES / size as u64;
        group.throughput(Throughput::Bytes(size as u64));

        group.bench_with_input(
            BenchmarkId::new("pwrite_fdatasync", label),
            &size,
            |b, _| {
                let mut slot = 0u64;
                b.iter(|| {
                    let at = slot * size as u64;
                    written.write_all_at(black_box(&data), at).expect("pwrite");
                    written.sync_data().expect("fdatasync");
                    slot = (slot + 1) % slots;
                });
            },
        );

        group.bench_with_input(BenchmarkId::new("mmap_msync", label), &size, |b, _| {
            let mut slot = 0usize;
            b.iter(|| {
                let at = slot * size;
                map[at..at + size].copy_from_slice(black_box(&data));
                map.flush_range(at, size).expect("msync");
                slot = (slot + 1) % slots as usize;
            });
        });

        // Fresh blocks: each write lands in never-written fallocated space;
        // the file is recreated (outside the timing) when it runs out.
        let fresh_path = dir.path().join("fresh.dat");
        group.bench_with_input(
            BenchmarkId::new("pwrite_fdatasync_fresh", label),
            &size,
            |b, _| {
                let mut fresh = fresh_file(&fresh_path);
                let mut slot = 0u64;
                b.iter_custom(|iters| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        if slot == slots {
                            drop(std::mem::replace(&mut fresh, fresh_file(&fresh_path)));
                            slot = 0;
                        }
                        let started = Instant::now();
                        fresh
                            .write_all_at(black_box(&data), slot * size as u64)
                            .expect("pwrite");
                        fresh.sync_data().expect("fdatasync");
                        elapsed += started.elapsed();
                        slot += 1;
                    }
                    elapsed
                });
            },
        );

        // No preallocation: each write extends the file, so every
        // fdatasync also commits the new size and a block allocation.
        let extend_path = dir.path().join("extend.dat");
        group.bench_with_input(
            BenchmarkId::new("pwrite_fdatasync_extend", label),
            &size,
            |b, _| {
                let mut file = empty_file(&extend_path);
                let mut slot = 0u64;
                b.iter_custom(|iters| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        if slot == slots {
                            drop(std::mem::replace(&mut file, empty_file(&extend_path)));
                            slot = 0;
                        }
                        let started = Instant::now();
                        file.write_all_at(black_box(&data), slot * size as u64)
                            .expect("pwrite");
                        file.sync_data().expect("fdatasync");
                        elapsed += started.elapsed();
                        slot += 1;
                    }
                    elapsed
                });
            },
        );
    }
    group.finish();
    drop(map);
    drop(written);
}

/// A new, empty, durable file.
fn empty_file(path: &Path) -> File {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating the bench file");
    file.sync_all().expect("syncing the empty file");
    file
}

criterion_group!(benches, durable_write);
criterion_main!(benches);
