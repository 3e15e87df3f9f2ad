//! Bit flips in sealed segments: in the data (.log) files, reads return the
//! exact data or `LogError::Corrupt`, never wrong data, and undamaged batches
//! stay readable; in any index file, reopening rebuilds that segment's
//! indexes and every lookup stays right.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::{Expected, Rng};
use dmq_log_store::batch::verify_batch;
use dmq_log_store::{
    BatchInput, FsyncPolicy, IoBackend, Log, LogConfig, LogError, ManualClock, MessageId,
    RecordInput,
};

const DATA_FLIPS: usize = 200;
const INDEX_FLIPS_PER_KIND: usize = 40;
const INDEX_KINDS: [&str; 4] = ["index", "timeindex", "idindex", "keyindex"];
const KEYS: usize = 6;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// One batch of a sealed segment.
#[derive(Debug, Clone)]
struct Span {
    bytes: Range<u64>,
    offsets: Range<u64>,
}

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    expected: Vec<Expected>,
    /// Sealed segments: base offset -> their batches.
    sealed: BTreeMap<u64, Vec<Span>>,
}

impl Fixture {
    fn build(backend: IoBackend, rng: &mut Rng) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let mut expected = Vec::new();
        {
            let log = common::open(dir.path(), config(), backend, clock.clone()).expect("open");
            // Six segments, then a dozen batches more in the active one.
            let mut extra = 0;
            while log.segment_count() < 6 || extra < 12 {
                extra += usize::from(log.segment_count() >= 6);
                clock.advance_ms(rng.below(4) as i64);
                let records = (0..rng.range(1, 4))
                    .map(|_| {
                        let len = rng.range(20, 200) as usize;
                        let mut record = RecordInput::new(rng.bytes(len));
                        if !rng.one_in(4) {
                            record.key =
                                Some(Bytes::from(format!("key-{}", rng.below(KEYS as u64))));
                        }
                        if rng.one_in(5) {
                            let value = Bytes::from(rng.bytes(5));
                            record.headers.push((Bytes::from("h"), value));
                        }
                        record
                    })
                    .collect();
                expected.extend(common::append(&log, &BatchInput::new(records)));
            }
            log.flush().expect("flush");
        }
        let bases = common::segment_bases(dir.path());
        let mut sealed = BTreeMap::new();
        for &base in &bases[..bases.len() - 1] {
            let data = std::fs::read(common::log_path(dir.path(), base)).expect("read segment");
            let mut spans = Vec::new();
            let mut position = 0usize;
            while position < data.len() {
                let header = verify_batch(&data[position..]).expect("pristine batch");
                let end = position + header.batch_len as usize;
                spans.push(Span {
                    bytes: position as u64..end as u64,
                    offsets: header.base_offset..header.next_offset(),
                });
                position = end;
            }
            sealed.insert(base, spans);
        }
        assert!(sealed.len() >= 5);
        Fixture {
            dir,
            clock,
            expected,
            sealed,
        }
    }

    fn open(&self, backend: IoBackend) -> Log {
        common::open(self.dir.path(), config(), backend, self.clock.clone()).expect("reopen")
    }

    fn segment_offsets(&self, base: u64) -> Range<u64> {
        let spans = &self.sealed[&base];
        spans[0].offsets.start..spans[spans.len() - 1].offsets.end
    }

    fn keys(&self) -> Vec<Bytes> {
        (0..KEYS).map(|k| Bytes::from(format!("key-{k}"))).collect()
    }

    /// The oracle for `offset_for_timestamp`.
    fn first_at_or_after(&self, timestamp_ms: i64) -> Option<u64> {
        self.expected
            .iter()
            .find(|e| e.timestamp_ms >= timestamp_ms)
            .map(|e| e.offset)
    }
}

/// Flips one bit of a file in place; flipping it again restores it.
fn flip(path: &Path, byte: u64, bit: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for flip");
    let mut buf = [0u8; 1];
    file.read_exact_at(&mut buf, byte).expect("read byte");
    buf[0] ^= 1 << bit;
    file.write_all_at(&buf, byte).expect("write byte");
}

fn is_corrupt(error: &LogError) -> bool {
    matches!(error, LogError::Corrupt { .. })
}

/// Reads the whole log with `read`, stepping over damage, and checks that
/// every record returned is exactly the appended one and that only offsets
/// in `damaged` fail.
fn scan_tolerating(log: &Log, fixture: &Fixture, damaged: &Range<u64>, what: &str) {
    let end = log.end_offset();
    assert_eq!(end, fixture.expected.len() as u64, "{what}");
    let mut offset = 0;
    while offset < end {
        match log.read(offset, 8192) {
            Ok(batches) => {
                assert!(!batches.is_empty(), "{what}: nothing at {offset}");
                for batch in &batches {
                    for record in batch.records() {
                        let record = record.expect("a verified batch decodes");
                        if record.offset < offset {
                            continue;
                        }
                        assert_eq!(record.offset, offset, "{what}: offsets not dense");
                        fixture.expected[offset as usize].check(&record);
                        offset += 1;
                    }
                }
            }
            Err(error) => {
                assert!(is_corrupt(&error), "{what}: read {offset}: {error}");
                assert!(
                    damaged.contains(&offset),
                    "{what}: read {offset} outside the damaged batch {damaged:?}: {error}"
                );
                if let LogError::Corrupt {
                    next_readable_offset: Some(next),
                    ..
                } = error
                {
                    assert!(next > offset, "{what}: next readable {next} <= {offset}");
                    assert!(
                        next <= damaged.end,
                        "{what}: next readable {next} skips valid data after {damaged:?}"
                    );
                    offset = next;
                } else {
                    offset += 1;
                }
            }
        }
    }
}

#[test]
fn data_bit_flips_are_detected_and_contained() {
    let mut rng = Rng::new(common::seed("data_bit_flips", 11));
    for backend in common::backends() {
        let fixture = Fixture::build(backend, &mut rng);
        let bases: Vec<u64> = fixture.sealed.keys().copied().collect();
        for n in 0..DATA_FLIPS {
            let base = bases[rng.below(bases.len() as u64) as usize];
            let spans = &fixture.sealed[&base];
            let len = spans[spans.len() - 1].bytes.end;
            let byte = rng.below(len);
            let bit = rng.below(8) as u8;
            let span = spans
                .iter()
                .find(|s| s.bytes.contains(&byte))
                .expect("byte in a batch");
            let damaged = span.offsets.clone();
            let what = format!("{backend:?} flip {n}: segment {base} byte {byte} bit {bit}");
            let path = common::log_path(fixture.dir.path(), base);
            flip(&path, byte, bit);
            {
                let log = fixture.open(backend);
                // Every offset of the damaged segment, one by one.
                for offset in fixture.segment_offsets(base) {
                    match log.read_record(offset) {
                        Ok(Some(record)) => {
                            assert!(!damaged.contains(&offset), "{what}: damaged {offset} read");
                            fixture.expected[offset as usize].check(&record);
                        }
                        Ok(None) => panic!("{what}: {offset} missing"),
                        Err(error) => {
                            assert!(is_corrupt(&error), "{what}: {offset}: {error}");
                            assert!(damaged.contains(&offset), "{what}: {offset}: {error}");
                        }
                    }
                }
                scan_tolerating(&log, &fixture, &damaged, &what);
                // Lookups never return a wrong record.
                for expected in &fixture.expected[fixture.segment_offsets(base).start as usize
                    ..fixture.segment_offsets(base).end as usize]
                {
                    match log.find_by_id(&expected.id) {
                        Ok(Some(record)) => expected.check(&record),
                        Ok(None) => assert!(damaged.contains(&expected.offset), "{what}"),
                        Err(error) => assert!(is_corrupt(&error), "{what}: {error}"),
                    }
                }
                for _ in 0..5 {
                    let e = &fixture.expected[rng.below(fixture.expected.len() as u64) as usize];
                    let t = e.timestamp_ms + rng.below(3) as i64 - 1;
                    let oracle = fixture.first_at_or_after(t);
                    match log.offset_for_timestamp(t) {
                        Ok(found) => assert_eq!(found, oracle, "{what}: timestamp {t}"),
                        Err(error) => {
                            assert!(is_corrupt(&error), "{what}: {error}");
                            assert!(oracle.is_some_and(|o| o >= damaged.start), "{what}: {t}");
                        }
                    }
                }
                for key in fixture.keys() {
                    if let Ok(found) = log.find_by_key(&key, usize::MAX) {
                        for record in &found {
                            fixture.expected[record.offset as usize].check(record);
                        }
                    }
                }
            }
            flip(&path, byte, bit);
        }
        // Restored: everything reads cleanly again.
        let log = fixture.open(backend);
        common::check_log(&log, &fixture.expected);
    }
}

/// Every lookup, for the records of `base` and a sample of the others.
fn check_lookups(log: &Log, fixture: &Fixture, base: u64, rng: &mut Rng, what: &str) {
    let records = common::read_all(log, 8192);
    assert_eq!(records.len(), fixture.expected.len(), "{what}");
    for (record, expected) in records.iter().zip(&fixture.expected) {
        expected.check(record);
    }
    let segment = fixture.segment_offsets(base);
    let sample: BTreeSet<u64> = segment
        .clone()
        .chain((0..20).map(|_| rng.below(fixture.expected.len() as u64)))
        .collect();
    for &offset in &sample {
        let expected = &fixture.expected[offset as usize];
        let record = log
            .read_record(offset)
            .unwrap_or_else(|e| panic!("{what}: read {offset}: {e}"))
            .unwrap_or_else(|| panic!("{what}: {offset} missing"));
        expected.check(&record);
        let record = log
            .find_by_id(&expected.id)
            .unwrap_or_else(|e| panic!("{what}: find_by_id {offset}: {e}"))
            .unwrap_or_else(|| panic!("{what}: id of {offset} not found"));
        expected.check(&record);
    }
    let mut unknown = fixture.expected[segment.start as usize].id.0;
    unknown[15] ^= 0x5a;
    if !fixture.expected.iter().any(|e| e.id.0 == unknown) {
        assert_eq!(
            log.find_by_id(&MessageId(unknown)).expect("find"),
            None,
            "{what}"
        );
    }
    for key in fixture.keys() {
        let found = log.find_by_key(&key, usize::MAX).expect("find_by_key");
        let oracle: Vec<u64> = fixture
            .expected
            .iter()
            .filter(|e| e.key.as_ref() == Some(&key))
            .map(|e| e.offset)
            .collect();
        let offsets: Vec<u64> = found.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, oracle, "{what}: key {key:?}");
        let limited = log.find_by_key(&key, 3).expect("find_by_key");
        assert_eq!(limited.len(), oracle.len().min(3), "{what}");
    }
    let timestamps: Vec<i64> = fixture.expected[segment.start as usize..segment.end as usize]
        .iter()
        .map(|e| e.timestamp_ms)
        .collect();
    for _ in 0..12 {
        let t = timestamps[rng.below(timestamps.len() as u64) as usize] + rng.below(3) as i64 - 1;
        assert_eq!(
            log.offset_for_timestamp(t).expect("offset_for_timestamp"),
            fixture.first_at_or_after(t),
            "{what}: timestamp {t}"
        );
    }
    let last = fixture.expected.last().expect("records").timestamp_ms;
    assert_eq!(log.offset_for_timestamp(last + 1).expect("ts"), None);
    assert_eq!(log.offset_for_timestamp(i64::MIN).expect("ts"), Some(0));
}

fn index_path(dir: &Path, base: u64, kind: &str) -> PathBuf {
    dir.join(format!("{base:020}.{kind}"))
}

#[test]
fn index_bit_flips_rebuild_the_segment_indexes() {
    let mut rng = Rng::new(common::seed("index_bit_flips", 12));
    for backend in common::backends() {
        let fixture = Fixture::build(backend, &mut rng);
        let dir = fixture.dir.path();
        let bases: Vec<u64> = fixture.sealed.keys().copied().collect();
        let pristine: BTreeMap<(u64, &str), Vec<u8>> = bases
            .iter()
            .flat_map(|&base| INDEX_KINDS.iter().map(move |&kind| (base, kind)))
            .map(|(base, kind)| {
                let bytes = std::fs::read(index_path(dir, base, kind)).expect("read index");
                ((base, kind), bytes)
            })
            .collect();
        for kind in INDEX_KINDS {
            for n in 0..INDEX_FLIPS_PER_KIND {
                let base = bases[rng.below(bases.len() as u64) as usize];
                let path = index_path(dir, base, kind);
                let len = pristine[&(base, kind)].len() as u64;
                let byte = rng.below(len);
                let bit = rng.below(8) as u8;
                let what =
                    format!("{backend:?} {kind} flip {n}: segment {base} byte {byte} bit {bit}");
                flip(&path, byte, bit);
                {
                    let log = fixture.open(backend);
                    let report = log.recovery_report();
                    assert_eq!(report.indexes_rebuilt, vec![base], "{what}: {report:?}");
                    assert!(report.corrupt_regions.is_empty(), "{what}: {report:?}");
                    check_lookups(&log, &fixture, base, &mut rng, &what);
                }
                if n % 8 == 0 {
                    // The rebuilt indexes pass their checks next time.
                    let log = fixture.open(backend);
                    let report = log.recovery_report();
                    assert!(report.indexes_rebuilt.is_empty(), "{what}: {report:?}");
                    check_lookups(&log, &fixture, base, &mut rng, &what);
                }
                for other in INDEX_KINDS {
                    std::fs::write(index_path(dir, base, other), &pristine[&(base, other)])
                        .expect("restore index");
                }
            }
        }
        // A missing index file is rebuilt too.
        let base = bases[1];
        for kind in INDEX_KINDS {
            std::fs::remove_file(index_path(dir, base, kind)).expect("remove index");
            let log = fixture.open(backend);
            assert_eq!(
                log.recovery_report().indexes_rebuilt,
                vec![base],
                "missing {kind}"
            );
            check_lookups(&log, &fixture, base, &mut rng, &format!("missing {kind}"));
        }
    }
}

/// Flips in the active segment: a damaged last batch is a torn tail (cut and
/// reported); damage that valid batches follow is reported as a corrupt
/// region and reads of it fail, while everything else stays readable.
#[test]
fn active_segment_bit_flips_are_cut_or_reported() {
    let mut rng = Rng::new(common::seed("active_bit_flips", 13));
    for backend in common::backends() {
        let fixture = Fixture::build(backend, &mut rng);
        let active = *common::segment_bases(fixture.dir.path())
            .last()
            .expect("segments");
        let data = std::fs::read(common::log_path(fixture.dir.path(), active)).expect("read");
        let mut spans = Vec::new();
        let mut position = 0usize;
        while let Ok(header) = verify_batch(&data[position..]) {
            let end = position + header.batch_len as usize;
            spans.push(Span {
                bytes: position as u64..end as u64,
                offsets: header.base_offset..header.next_offset(),
            });
            position = end;
        }
        assert!(
            spans.len() >= 2,
            "active segment has {} batches",
            spans.len()
        );
        let work = common::scratch_dir();
        for n in 0..60 {
            let index = if n % 4 == 0 {
                spans.len() - 1
            } else {
                rng.below(spans.len() as u64) as usize
            };
            let span = &spans[index];
            let byte = rng.range(span.bytes.start, span.bytes.end);
            let bit = rng.below(8) as u8;
            let what = format!("{backend:?} active flip {n}: byte {byte} bit {bit}");
            common::clear_dir(work.path());
            common::copy_dir(fixture.dir.path(), work.path());
            flip(&common::log_path(work.path(), active), byte, bit);
            let log = common::open(work.path(), config(), backend, fixture.clock.clone())
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
            let report = log.recovery_report().clone();
            let last = index == spans.len() - 1;
            if last {
                assert!(report.corrupt_regions.is_empty(), "{what}: {report:?}");
                assert!(
                    report.bytes_truncated > 0
                        && report.bytes_truncated <= span.bytes.end - span.bytes.start,
                    "{what}: {report:?}"
                );
                assert_eq!(log.end_offset(), span.offsets.start, "{what}");
                common::check_log(&log, &fixture.expected[..span.offsets.start as usize]);
            } else {
                assert_eq!(report.bytes_truncated, 0, "{what}: {report:?}");
                assert_eq!(report.corrupt_regions.len(), 1, "{what}: {report:?}");
                let region = &report.corrupt_regions[0];
                assert_eq!(region.segment_base_offset, active, "{what}");
                assert_eq!(region.position, span.bytes.start, "{what}: {region:?}");
                assert_eq!(region.first_lost_offset, span.offsets.start, "{what}");
                assert_eq!(region.next_readable_offset, span.offsets.end, "{what}");
                scan_tolerating(&log, &fixture, &span.offsets, &what);
                for offset in spans[0].offsets.start..fixture.expected.len() as u64 {
                    match log.read_record(offset) {
                        Ok(Some(record)) => {
                            assert!(!span.offsets.contains(&offset), "{what}: {offset}");
                            fixture.expected[offset as usize].check(&record);
                        }
                        Ok(None) => panic!("{what}: {offset} missing"),
                        Err(error) => {
                            assert!(is_corrupt(&error), "{what}: {error}");
                            assert!(span.offsets.contains(&offset), "{what}: {offset}: {error}");
                        }
                    }
                }
            }
            // Appends go on after the damage.
            let batch = common::small_batch(n as u64, 2, 30);
            let info = log.append(&batch).expect("append after damage");
            assert_eq!(info.base_offset, log.end_offset() - 2, "{what}");
            let record = log
                .read_record(info.base_offset)
                .expect("read")
                .expect("some");
            assert_eq!(record.value, batch.records[0].value, "{what}");
        }
    }
}
