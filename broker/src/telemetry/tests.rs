//! Tests of the telemetry as a whole: trace lookups across a reopen, the
//! trace switched off, statistics persistence and retention, retries with a
//! real dispatcher, the metrics text, and drops under a full queue.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use dmq_dispatcher::{
    Dispatcher, DispatcherConfig, Event, EventKind, GroupConfig, MemoryStorage, TopicConfig,
};
use dmq_log_store::{ManualClock, MessageId, RecordInput};

use super::*;

/// 2025-11-27 12:20:30 UTC: half a minute into a minute.
const NOW: i64 = 1_764_246_030_000;
const HOUR_MS: i64 = 3_600_000;

fn config(trace_enabled: bool) -> TelemetryConfig {
    TelemetryConfig {
        trace_segment_bytes: TRACE_SEGMENT_BYTES,
        trace_max_bytes: None,
        min_free_bytes: 0,
        trace_enabled,
        trace_retention_hours: 72,
        stats_retention_hours: 24,
    }
}

fn open(dir: &Path, trace_enabled: bool, now_ms: i64) -> Telemetry {
    Telemetry::open_with_clock(
        dir,
        config(trace_enabled),
        Arc::new(ManualClock::new(now_ms)),
    )
    .unwrap()
}

fn batch(
    topic: &str,
    ids: &[MessageId],
    base_offset: Option<u64>,
    received_ms: i64,
) -> ProducedBatch {
    ProducedBatch {
        topic: topic.to_string(),
        partition: 0,
        base_offset,
        ids: ids.to_vec(),
        client_id: "orders-service".to_string(),
        peer: "127.0.0.1:50123".parse().unwrap(),
        received_ms,
        stored_ms: received_ms + 2,
    }
}

fn event(id: MessageId, kind: EventKind, time_ms: i64) -> Event {
    Event {
        time_ms,
        message_id: id,
        topic: "t".into(),
        partition: Some(0),
        offset: Some(10),
        group: Some("g".into()),
        kind,
        reason: None,
    }
}

fn kinds(events: &[TraceEvent]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

#[test]
fn a_trace_reads_back_in_order_and_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [MessageId::new(NOW, 1), MessageId::new(NOW, 2)];
    let before = {
        let telemetry = open(dir.path(), true, NOW);
        let sink = telemetry.event_sink();
        telemetry.produced(batch("t", &ids, Some(10), NOW));
        // Delivered before the session stamped `stored`: still listed after it.
        sink.emit(event(
            ids[0],
            EventKind::Delivered {
                attempt: 1,
                member: 7,
            },
            NOW + 1,
        ));
        sink.emit(event(ids[0], EventKind::Acked, NOW + 5));
        // No flush: the query hands the buffer on itself.
        let trace = telemetry.trace(&ids[0]).unwrap();
        assert_eq!(kinds(&trace), ["produced", "stored", "delivered", "acked"]);
        assert_eq!(
            trace[0].detail.as_deref(),
            Some("by client orders-service from 127.0.0.1:50123")
        );
        assert_eq!((trace[1].partition, trace[1].offset), (Some(0), Some(10)));
        assert_eq!(trace[1].time_ms, NOW + 2);
        assert_eq!(trace[2].detail.as_deref(), Some("attempt 1 to member 7"));
        assert_eq!(trace[2].group.as_deref(), Some("g"));
        let second = telemetry.trace(&ids[1]).unwrap();
        assert_eq!(kinds(&second), ["produced", "stored"]);
        assert_eq!(second[1].offset, Some(11));
        assert!(telemetry.trace(&MessageId::new(NOW, 3)).unwrap().is_empty());
        telemetry.shutdown();
        trace
    };
    assert!(dir.path().join("trace").is_dir());
    let telemetry = open(dir.path(), true, NOW);
    assert_eq!(telemetry.trace(&ids[0]).unwrap(), before);
}

#[test]
fn runs_and_single_records_cover_exactly_their_messages() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    // Ids 1..=3 are one run; 7 stands alone; 8 has another time prefix.
    let ids = [
        MessageId::new(NOW, 1),
        MessageId::new(NOW, 2),
        MessageId::new(NOW, 3),
        MessageId::new(NOW, 7),
        MessageId::new(NOW + 1, 8),
    ];
    telemetry.produced(batch("t", &ids, Some(100), NOW));
    let sink = telemetry.event_sink();
    // A poll's deliveries of 1..=3 (a run), then acks of 3 and 1 (singles).
    for (i, id) in ids[..3].iter().enumerate() {
        let mut delivered = event(
            *id,
            EventKind::Delivered {
                attempt: 1,
                member: 4,
            },
            NOW + 3,
        );
        delivered.offset = Some(100 + i as u64);
        sink.emit(delivered);
    }
    for (i, id) in [(2, ids[2]), (0, ids[0])] {
        let mut acked = event(id, EventKind::Acked, NOW + 4);
        acked.offset = Some(100 + i as u64);
        sink.emit(acked);
    }
    for (i, id) in ids.iter().enumerate() {
        let trace = telemetry.trace(id).unwrap();
        let offset = Some(100 + i as u64);
        assert_eq!(trace[1].kind, "stored");
        assert!(
            trace.iter().skip(1).all(|e| e.offset == offset),
            "{trace:?}"
        );
        let expected: &[&str] = match i {
            0 | 2 => &["produced", "stored", "delivered", "acked"],
            1 => &["produced", "stored", "delivered"],
            _ => &["produced", "stored"],
        };
        assert_eq!(kinds(&trace), expected, "message {i}");
    }
    assert!(telemetry.trace(&MessageId::new(NOW, 4)).unwrap().is_empty());
    assert!(telemetry.trace(&MessageId::new(NOW, 0)).unwrap().is_empty());
}

#[test]
fn an_event_joining_an_earlier_run_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    let (w, x) = (MessageId::new(NOW, 1), MessageId::new(NOW, 2));
    let at = |id, kind, offset, reason: Option<&str>| {
        let mut event = event(id, kind, NOW);
        event.offset = Some(offset);
        event.reason = reason.map(str::to_string);
        event
    };
    let sink = telemetry.event_sink();
    // Within one millisecond: W's retry opens a run that X's retry joins
    // after X's delivery and nack, which are records of their own.
    sink.emit(at(
        w,
        EventKind::Redelivered { next_attempt: 2 },
        10,
        Some("nack"),
    ));
    sink.emit(at(
        x,
        EventKind::Delivered {
            attempt: 1,
            member: 1,
        },
        11,
        None,
    ));
    sink.emit(at(x, EventKind::Nacked { retry_in_ms: 0 }, 11, None));
    sink.emit(at(
        x,
        EventKind::Redelivered { next_attempt: 2 },
        11,
        Some("nack"),
    ));
    let trace = telemetry.trace(&x).unwrap();
    assert_eq!(kinds(&trace), ["delivered", "nacked", "redelivered"]);
    assert_eq!(kinds(&telemetry.trace(&w).unwrap()), ["redelivered"]);
}

#[test]
fn a_delayed_produce_is_traced_without_stored() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    let id = MessageId::new(NOW, 9);
    telemetry.produced(batch("t", &[id], None, NOW));
    let mut scheduled = event(
        id,
        EventKind::DelayScheduled {
            due_ms: NOW + 60_000,
        },
        NOW,
    );
    (scheduled.offset, scheduled.group) = (None, None);
    telemetry.event_sink().emit(scheduled);
    let trace = telemetry.trace(&id).unwrap();
    assert_eq!(kinds(&trace), ["produced", "delay_scheduled"]);
    assert_eq!(trace[1].detail, Some(format!("due at {}", NOW + 60_000)));
    assert_eq!(telemetry.stats(Some("t"), None, 1, NOW)[0].produced, 1);
}

#[test]
fn with_the_trace_off_statistics_and_metrics_still_count() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), false, NOW);
    let id = MessageId::new(NOW, 1);
    telemetry.produced(batch("t", &[id], Some(0), NOW));
    let sink = telemetry.event_sink();
    assert!(sink.enabled());
    sink.emit(event(
        id,
        EventKind::Delivered {
            attempt: 1,
            member: 1,
        },
        NOW,
    ));
    telemetry.flush();
    let minute = telemetry.stats(None, None, 1, NOW)[0];
    assert_eq!((minute.produced, minute.delivered), (1, 1));
    assert!(telemetry.trace(&id).unwrap().is_empty());
    assert!(!dir.path().join("trace").exists());
    let text = telemetry.render_metrics(&GaugeSnapshot::default());
    assert!(
        text.contains("dmq_messages_delivered_total{topic=\"t\",group=\"g\"} 1"),
        "{text}"
    );
}

#[test]
fn statistics_survive_a_restart_and_old_minutes_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let telemetry = open(dir.path(), false, NOW);
        telemetry.produced(batch(
            "t",
            &[MessageId::default(); 5],
            Some(0),
            NOW - 30 * HOUR_MS,
        ));
        telemetry.produced(batch("t", &[MessageId::default(); 3], Some(5), NOW));
        let sink = telemetry.event_sink();
        sink.emit(event(MessageId::default(), EventKind::Acked, NOW - 60_000));
        let window = telemetry.stats(Some("t"), None, 2880, NOW);
        assert_eq!(window.len(), 2880);
        assert_eq!(window.iter().map(|m| m.produced).sum::<u64>(), 8);
        telemetry.shutdown();
    }
    assert!(dir.path().join("stats").join("stats.bin").is_file());
    // Reopened a minute later with 24 h of retention: the 30 h old minute
    // is gone, the rest is back.
    let telemetry = open(dir.path(), false, NOW + 60_000);
    let window = telemetry.stats(Some("t"), None, 2880, NOW + 60_000);
    assert_eq!(window.iter().map(|m| m.produced).sum::<u64>(), 3);
    assert_eq!(window[2878].produced, 3);
    assert_eq!(window[2877].acked, 1);
    assert_eq!(window[2879].minute_ms, (NOW + 60_000) / 60_000 * 60_000);
    assert!(telemetry
        .stats(Some("other"), None, 5, NOW)
        .iter()
        .all(|m| m.produced == 0));
}

#[test]
fn a_nack_with_a_real_dispatcher_is_one_retry() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    let clock = Arc::new(ManualClock::new(NOW));
    let storage = Arc::new(MemoryStorage::new(clock.clone()));
    let mut dispatcher = Dispatcher::open(
        storage,
        clock.clone(),
        telemetry.event_sink(),
        DispatcherConfig::default(),
    )
    .unwrap();
    let topic = TopicConfig {
        partitions: 1,
        ordered: false,
    };
    dispatcher.create_topic("t", topic).unwrap();
    let produced = dispatcher
        .produce(
            "t",
            Some(0),
            vec![RecordInput::new(&b"x"[..]), RecordInput::new(&b"y"[..])],
        )
        .unwrap();
    let (id, offset) = (produced[0].id, produced[0].offset.unwrap());
    dispatcher
        .subscribe("t", "g", GroupConfig::default())
        .unwrap();
    let member = dispatcher.join("t", "g", "m").unwrap();
    dispatcher.add_credit(member, 10).unwrap();
    assert_eq!(dispatcher.poll().unwrap().len(), 2);
    clock.advance_ms(1);
    dispatcher.nack(member, 0, offset, Some(0)).unwrap();
    clock.advance_ms(1);
    let again = dispatcher.poll().unwrap();
    assert_eq!(again[0].attempt, 2);
    clock.advance_ms(1);
    assert!(dispatcher.ack(member, 0, offset).unwrap());
    telemetry.flush();
    let minute = telemetry.stats(Some("t"), Some("g"), 1, NOW)[0];
    assert_eq!(
        (minute.delivered, minute.retried, minute.acked),
        (3, 1, 1),
        "{minute:?}"
    );
    let trace = telemetry.trace(&id).unwrap();
    assert_eq!(
        kinds(&trace),
        ["delivered", "nacked", "redelivered", "delivered", "acked"]
    );
    assert_eq!(trace[0].detail.as_deref(), Some("attempt 1 to member 1"));
    assert_eq!(trace[2].detail.as_deref(), Some("attempt 2 next (nack)"));
    // The second message shared the first poll (a run record, if the
    // storage gave the two consecutive ids): found either way.
    let second = telemetry.trace(&produced[1].id).unwrap();
    assert_eq!(kinds(&second), ["delivered"]);
    assert_eq!(second[0].offset, Some(offset + 1));
    let text = telemetry.render_metrics(&GaugeSnapshot::default());
    assert!(
        text.contains("dmq_messages_redelivered_total{topic=\"t\",group=\"g\"} 1"),
        "{text}"
    );
}

#[test]
fn the_metrics_text_names_every_series() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    let id = MessageId::new(NOW, 1);
    telemetry.produced(batch("t", &[id, id], Some(0), NOW));
    let sink = telemetry.event_sink();
    for kind in [
        EventKind::Delivered {
            attempt: 1,
            member: 1,
        },
        EventKind::Redelivered { next_attempt: 2 },
        EventKind::Acked,
        EventKind::Expired,
        EventKind::DeadLettered {
            dead_letter_topic: "t.g.dlq".to_string(),
        },
    ] {
        sink.emit(event(id, kind, NOW));
    }
    telemetry.connection_opened();
    telemetry.connection_opened();
    telemetry.connection_closed();
    telemetry.connection_rejected("too_many_connections");
    assert!(telemetry.inner.sync(TRACE_SYNC_TIMEOUT));
    let text = telemetry.render_metrics(&GaugeSnapshot {
        group_lag: vec![("t".to_string(), "g".to_string(), 5, 1.5)],
        pending_delays: 3,
        transactions: dmq_dispatcher::TransactionCounts {
            unsettled: 4,
            overdue: 1,
            unresolved: 1,
            half_records: 9,
            checks_sent: 12,
        },
        quarantined: 2,
        damage: vec![("t".to_string(), 1, 4, 100)],
        journal_tails_cut: vec![("meta".to_string(), 12)],
        topic_bytes: vec![("t".to_string(), 1000, 65536)],
        open_files: 7,
        mapped_segments: 3,
    });
    for line in [
        "dmq_messages_produced_total{topic=\"t\"} 2",
        "dmq_quarantined_objects 2",
        "dmq_recovery_damaged_regions{topic=\"t\",partition=\"1\"} 4",
        "dmq_recovery_truncated_bytes{topic=\"t\",partition=\"1\"} 100",
        "dmq_journal_tail_cut_bytes{journal=\"meta\"} 12",
        "dmq_topic_stored_bytes{topic=\"t\"} 1000",
        "dmq_topic_disk_bytes{topic=\"t\"} 65536",
        "dmq_open_files 7",
        "dmq_mapped_segments 3",
        "dmq_messages_delivered_total{topic=\"t\",group=\"g\"} 1",
        "dmq_messages_acked_total{topic=\"t\",group=\"g\"} 1",
        "dmq_messages_redelivered_total{topic=\"t\",group=\"g\"} 1",
        "dmq_messages_expired_total{topic=\"t\",group=\"g\"} 1",
        "dmq_messages_dead_lettered_total{topic=\"t\",group=\"g\"} 1",
        "# TYPE dmq_fsync_duration_seconds histogram",
        "dmq_fsync_duration_seconds_bucket{le=\"+Inf\"}",
        "dmq_fsync_duration_seconds_count",
        "dmq_connections 1",
        "dmq_connections_accepted_total 2",
        "dmq_connections_rejected_total{reason=\"too_many_connections\"} 1",
        "dmq_group_lag_messages{topic=\"t\",group=\"g\"} 5",
        "dmq_group_lag_seconds{topic=\"t\",group=\"g\"} 1.5",
        "dmq_delays_pending 3",
        "dmq_transactions_open 4",
        "dmq_transactions_overdue 1",
        "dmq_transaction_half_messages 9",
        "dmq_transactions_unresolved 1",
        "dmq_transaction_checks_total 12",
        "dmq_trace_events_dropped_total 0",
        &format!(
            "dmq_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "# EOF",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn a_batch_that_does_not_fit_the_queue_is_counted_but_not_traced() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), true, NOW);
    let n = MAX_QUEUED_EVENTS / 2 + 1;
    let ids: Vec<MessageId> = (0..n as u64).map(|i| MessageId::new(NOW, i)).collect();
    telemetry.produced(batch("t", &ids, Some(0), NOW));
    assert_eq!(
        telemetry.stats(Some("t"), None, 1, NOW)[0].produced,
        n as u64
    );
    assert_eq!(
        telemetry.inner.shared.metrics.trace_dropped_total(),
        2 * n as u64
    );
    assert!(telemetry.trace(&ids[0]).unwrap().is_empty());
}

#[test]
fn the_sink_hands_a_full_buffer_on_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = open(dir.path(), false, NOW);
    let sink = telemetry.event_sink();
    for _ in 0..FLUSH_AT {
        sink.emit(event(MessageId::default(), EventKind::Acked, NOW));
    }
    assert!(lock(&telemetry.inner.buffer).is_empty());
    assert_eq!(
        telemetry.stats(None, None, 1, NOW)[0].acked,
        FLUSH_AT as u64
    );
}
