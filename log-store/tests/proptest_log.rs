//! Property test: random batches appended under random fsync policies, the
//! log closed and reopened at random points; after every reopen and at the
//! end, reads return exactly what was appended and the lookups agree with a
//! linear scan over the appended records.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Expected;
use dmq_log_store::{
    BatchInput, Clock, FsyncPolicy, IoBackend, Log, LogConfig, ManualClock, MessageId, RecordInput,
};
use proptest::prelude::*;

const KEYS: u8 = 4;

#[derive(Debug, Clone)]
struct RecordSpec {
    value_len: usize,
    value_seed: u64,
    key: Option<u8>,
    headers: Vec<(u8, usize)>,
    deliver_at_ms: Option<i64>,
    expire_at_ms: Option<i64>,
    /// Keep an id (a moved message) this many ms older than now.
    given_id_age_ms: Option<i64>,
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        clock_step_ms: i64,
        records: Vec<RecordSpec>,
    },
    Reopen {
        fsync: FsyncPolicy,
    },
}

fn fsync_policy() -> impl Strategy<Value = FsyncPolicy> {
    prop_oneof![
        Just(FsyncPolicy::Always),
        Just(FsyncPolicy::Never),
        (1u64..20).prop_map(|ms| FsyncPolicy::Interval(Duration::from_millis(ms))),
    ]
}

fn record_spec() -> impl Strategy<Value = RecordSpec> {
    (
        prop_oneof![0usize..16, 0usize..2048],
        any::<u64>(),
        proptest::option::of(0..KEYS),
        proptest::collection::vec((any::<u8>(), 0usize..40), 0..3),
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<i64>()),
        proptest::option::weighted(0.1, 0i64..10_000),
    )
        .prop_map(
            |(
                value_len,
                value_seed,
                key,
                headers,
                deliver_at_ms,
                expire_at_ms,
                given_id_age_ms,
            )| {
                RecordSpec {
                    value_len,
                    value_seed,
                    key,
                    headers,
                    deliver_at_ms,
                    expire_at_ms,
                    given_id_age_ms,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            prop_oneof![Just(0i64), 1i64..1000, -50i64..0],
            proptest::collection::vec(record_spec(), 1..5),
        )
            .prop_map(|(clock_step_ms, records)| Op::Append { clock_step_ms, records }),
        1 => fsync_policy().prop_map(|fsync| Op::Reopen { fsync }),
    ]
}

fn build_record(spec: &RecordSpec, now_ms: i64, unique: &mut u64) -> RecordInput {
    let mut rng = common::Rng::new(spec.value_seed);
    RecordInput {
        id: spec.given_id_age_ms.map(|age| {
            *unique += 1;
            MessageId::new(now_ms - age, 0xD00D_0000_0000_0000 + *unique)
        }),
        key: spec.key.map(|k| Bytes::from(format!("key-{k}"))),
        headers: spec
            .headers
            .iter()
            .map(|&(name, len)| (Bytes::from(format!("h{name}")), Bytes::from(rng.bytes(len))))
            .collect(),
        value: Bytes::from(rng.bytes(spec.value_len)),
        deliver_at_ms: spec.deliver_at_ms,
        expire_at_ms: spec.expire_at_ms,
    }
}

/// Reads, id, key and time lookups against a linear scan of `expected`.
fn check_everything(log: &Log, expected: &[Expected]) {
    common::check_log(log, expected);
    for e in expected {
        let found = log
            .find_by_id(&e.id)
            .expect("find_by_id")
            .unwrap_or_else(|| panic!("id of {} not found", e.offset));
        // Ids are unique, so the first with this id is this one.
        e.check(&found);
        assert_eq!(
            log.offset_of_id(&e.id).expect("offset_of_id"),
            Some(e.offset),
            "the id index alone places the record"
        );
    }
    let mut missing = MessageId::new(1, 0x0123_4567);
    missing.0[15] ^= 0xff;
    assert_eq!(log.find_by_id(&missing).expect("find_by_id"), None);
    assert_eq!(log.offset_of_id(&missing).expect("offset_of_id"), None);
    for k in 0..=KEYS {
        let key = Bytes::from(format!("key-{k}"));
        let oracle: Vec<&Expected> = expected
            .iter()
            .filter(|e| e.key.as_ref() == Some(&key))
            .collect();
        let found = log.find_by_key(&key, usize::MAX).expect("find_by_key");
        assert_eq!(found.len(), oracle.len(), "records with {key:?}");
        for (record, e) in found.iter().zip(&oracle) {
            e.check(record);
        }
        let first_two = log.find_by_key(&key, 2).expect("find_by_key");
        assert_eq!(first_two.len(), oracle.len().min(2));
        for (record, e) in first_two.iter().zip(&oracle) {
            e.check(record);
        }
    }
    let mut probes = BTreeSet::new();
    for e in expected {
        probes.extend([e.timestamp_ms - 1, e.timestamp_ms, e.timestamp_ms + 1]);
    }
    probes.extend([i64::MIN, 0, i64::MAX]);
    for t in probes {
        let oracle = expected
            .iter()
            .find(|e| e.timestamp_ms >= t)
            .map(|e| e.offset);
        assert_eq!(
            log.offset_for_timestamp(t).expect("offset_for_timestamp"),
            oracle,
            "timestamp {t}"
        );
    }
}

fn run_case(
    backend: IoBackend,
    segment_bytes_max: u32,
    index_interval_bytes: u32,
    first_fsync: FsyncPolicy,
    ops: &[Op],
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let config = |fsync| LogConfig {
        segment_bytes_max,
        index_interval_bytes,
        fsync,
        ..LogConfig::default()
    };
    let open =
        |fsync| common::open(dir.path(), config(fsync), backend, clock.clone()).expect("open");
    let mut log = open(first_fsync);
    let mut expected: Vec<Expected> = Vec::new();
    let mut last_timestamp_ms = i64::MIN;
    let mut unique = 0u64;
    for op in ops {
        match op {
            Op::Append {
                clock_step_ms,
                records,
            } => {
                clock.advance_ms(*clock_step_ms);
                let now_ms = clock.now_ms();
                let batch = BatchInput::new(
                    records
                        .iter()
                        .map(|spec| build_record(spec, now_ms, &mut unique))
                        .collect(),
                );
                let info = log.append(&batch).expect("append");
                assert_eq!(info.base_offset, expected.len() as u64);
                assert_eq!(info.timestamp_ms, now_ms.max(last_timestamp_ms));
                last_timestamp_ms = info.timestamp_ms;
                for (record, id) in batch.records.iter().zip(&info.ids) {
                    if let Some(given) = record.id {
                        assert_eq!(*id, given, "a given id is kept");
                    }
                }
                expected.extend(Expected::from_append(&batch, &info));
            }
            Op::Reopen { fsync } => {
                drop(log);
                log = open(*fsync);
                let report = log.recovery_report();
                assert_eq!(report.bytes_truncated, 0, "{report:?}");
                assert!(report.indexes_rebuilt.is_empty(), "{report:?}");
                assert!(report.corrupt_regions.is_empty(), "{report:?}");
                check_everything(&log, &expected);
            }
        }
    }
    check_everything(&log, &expected);
    drop(log);
    let log = open(FsyncPolicy::Always);
    check_everything(&log, &expected);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reads_and_lookups_match_what_was_appended(
        segment_bytes_max in prop_oneof![Just(12 * 1024u32), Just(16 * 1024u32), Just(64 * 1024u32)],
        index_interval_bytes in prop_oneof![Just(64u32), Just(512u32), Just(4096u32)],
        first_fsync in fsync_policy(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        for backend in common::backends() {
            run_case(backend, segment_bytes_max, index_interval_bytes, first_fsync, &ops);
        }
    }
}
