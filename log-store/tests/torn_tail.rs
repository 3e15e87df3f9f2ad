//! Torn tails: the active segment cut at every byte of its last batches, and
//! garbage after the last valid batch. Recovery must keep exactly the whole
//! batches before the cut, report what it cut, and keep working.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::{Expected, Rng};
use dmq_log_store::batch::verify_batch;
use dmq_log_store::{FsyncPolicy, IoBackend, LogConfig, ManualClock};

const SEGMENT_BYTES: u32 = 4096;

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes_max: SEGMENT_BYTES,
        index_interval_bytes: 256,
        fsync,
        ..LogConfig::default()
    }
}

/// One batch of the active segment: byte range and offsets.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    next_offset: u64,
}

/// A closed log with two or more segments whose active one holds a dozen
/// small batches.
struct Fixture {
    dir: tempfile::TempDir,
    expected: Vec<Expected>,
    active_base: u64,
    /// The active segment's batches, in order.
    spans: Vec<Span>,
    /// The active segment file's bytes (data, then preallocated zeros).
    file: Vec<u8>,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn build(backend: IoBackend) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let mut expected = Vec::new();
        {
            let log = common::open(
                dir.path(),
                config(FsyncPolicy::Always),
                backend,
                clock.clone(),
            )
            .expect("open");
            let mut tag = 0u64;
            let mut extra = 0;
            while extra < 12 {
                clock.advance_ms(3);
                let batch =
                    common::small_batch(tag, 1 + (tag % 3) as usize, 10 + (tag % 7) as usize);
                expected.extend(common::append(&log, &batch));
                tag += 1;
                if log.segment_count() >= 2 {
                    extra += 1;
                }
            }
        }
        let active_base = *common::segment_bases(dir.path()).last().expect("segments");
        let file = std::fs::read(common::log_path(dir.path(), active_base)).expect("read segment");
        assert_eq!(file.len() as u64, u64::from(SEGMENT_BYTES), "preallocated");
        let mut spans = Vec::new();
        let mut position = 0usize;
        while let Ok(header) = verify_batch(&file[position..]) {
            let end = position + header.batch_len as usize;
            spans.push(Span {
                start: position as u64,
                end: end as u64,
                next_offset: header.next_offset(),
            });
            position = end;
        }
        assert!(
            spans.len() >= 12,
            "active segment has {} batches",
            spans.len()
        );
        assert_eq!(
            spans.last().map(|s| s.next_offset),
            Some(expected.len() as u64)
        );
        assert!(file[position..].iter().all(|&b| b == 0));
        Fixture {
            dir,
            expected,
            active_base,
            spans,
            file,
            clock,
        }
    }

    fn data_len(&self) -> u64 {
        self.spans.last().map_or(0, |s| s.end)
    }

    /// Offsets and data length left when the active segment is cut at `p`.
    fn cut_at(&self, p: u64) -> (u64, u64) {
        self.spans
            .iter()
            .rev()
            .find(|s| s.end <= p)
            .map_or((self.active_base, 0), |s| (s.next_offset, s.end))
    }
}

/// Bytes after `from` up to the last non-zero byte before `to`.
fn nonzero_extent(data: &[u8], from: u64, to: u64) -> u64 {
    let tail = &data[from as usize..to as usize];
    tail.iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// Opens the damaged copy in `work`, checks the recovered prefix, appends,
/// reopens and checks again.
fn recover_and_continue(
    fixture: &Fixture,
    work: &Path,
    backend: IoBackend,
    expected_next: u64,
    expected_truncated: u64,
    what: &str,
) {
    let expected = &fixture.expected[..expected_next as usize];
    let mut expected = expected.to_vec();
    {
        let log = common::open(
            work,
            config(FsyncPolicy::Never),
            backend,
            fixture.clock.clone(),
        )
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
        let report = log.recovery_report().clone();
        assert_eq!(
            report.bytes_truncated, expected_truncated,
            "{what}: {report:?}"
        );
        assert!(report.corrupt_regions.is_empty(), "{what}: {report:?}");
        assert_eq!(log.end_offset(), expected_next, "{what}");
        common::check_log(&log, &expected);
        for tag in 0..2 {
            let batch = common::small_batch(1000 + tag, 2, 9);
            let added = common::append(&log, &batch);
            assert_eq!(
                added[0].offset,
                expected.len() as u64,
                "{what}: append offset"
            );
            expected.extend(added);
        }
        common::check_log(&log, &expected);
    }
    let log = common::open(
        work,
        config(FsyncPolicy::Never),
        backend,
        fixture.clock.clone(),
    )
    .unwrap_or_else(|e| panic!("{what}: second reopen failed: {e}"));
    let report = log.recovery_report();
    assert_eq!(report.bytes_truncated, 0, "{what}: {report:?}");
    assert!(report.indexes_rebuilt.is_empty(), "{what}: {report:?}");
    common::check_log(&log, &expected);
}

#[test]
fn every_cut_in_the_last_three_batches_recovers_a_clean_prefix() {
    for backend in common::backends() {
        let fixture = Fixture::build(backend);
        let first = fixture.spans[fixture.spans.len() - 3].start;
        let last = fixture.data_len();
        let work = common::scratch_dir();
        let segment = common::log_path(work.path(), fixture.active_base);
        let mut cuts = 0;
        for p in first..=last {
            common::clear_dir(work.path());
            common::copy_dir(fixture.dir.path(), work.path());
            std::fs::File::options()
                .write(true)
                .open(&segment)
                .and_then(|f| f.set_len(p))
                .expect("truncate");
            let (next, valid_end) = fixture.cut_at(p);
            let truncated = nonzero_extent(&fixture.file, valid_end, p);
            recover_and_continue(
                &fixture,
                work.path(),
                backend,
                next,
                truncated,
                &format!("{backend:?} cut at byte {p} (valid end {valid_end})"),
            );
            cuts += 1;
        }
        eprintln!("{backend:?}: {cuts} cuts checked");
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut_and_reported() {
    let mut rng = Rng::new(common::seed("garbage_after_the_last_batch", 7));
    for backend in common::backends() {
        let fixture = Fixture::build(backend);
        let data_len = fixture.data_len();
        let room = u64::from(SEGMENT_BYTES) - data_len;
        let work = common::scratch_dir();
        let segment = common::log_path(work.path(), fixture.active_base);
        let last = fixture.spans[fixture.spans.len() - 1];
        // (where the garbage starts, how long it is)
        let mut cases: Vec<(u64, u64)> = [1u64, 2, 7, 63, 64, 65, 700, 2000, room]
            .iter()
            .map(|&len| (data_len, len.min(room)))
            .collect();
        // Garbage right after a torn batch, and over the tail of a batch.
        cases.push((last.start + 10, 100));
        cases.push((last.end - 1, 50));
        cases.push((last.start, 1));
        for (start, len) in cases {
            common::clear_dir(work.path());
            common::copy_dir(fixture.dir.path(), work.path());
            let garbage: Vec<u8> = (0..len).map(|_| 1 + rng.below(255) as u8).collect();
            let file = std::fs::File::options()
                .write(true)
                .open(&segment)
                .expect("open segment");
            file.write_all_at(&garbage, start).expect("write garbage");
            drop(file);
            let (next, valid_end) = fixture.cut_at(start);
            let mut damaged = fixture.file.clone();
            damaged[start as usize..(start + len) as usize].copy_from_slice(&garbage);
            let expected_truncated = nonzero_extent(&damaged, valid_end, damaged.len() as u64);
            assert!(expected_truncated >= start + len - valid_end);
            recover_and_continue(
                &fixture,
                work.path(),
                backend,
                next,
                expected_truncated,
                &format!("{backend:?} {len} garbage bytes at {start}"),
            );
            // The cut bytes are gone from the file, not just hidden: past the
            // last batch there are only zeros.
            let bytes = std::fs::read(&segment).expect("read segment");
            let mut end = 0usize;
            while let Ok(header) = verify_batch(&bytes[end..]) {
                end += header.batch_len as usize;
            }
            assert!(
                bytes[end..].iter().all(|&b| b == 0),
                "{backend:?}: garbage left after byte {end}"
            );
        }
    }
}
