//! The Prometheus metrics (`prometheus-client`): the process-lifetime
//! registry of counters and gauges, and the text rendering of `/metrics`.
//!
//! Owns [`Metrics`]. Every name is prefixed `dmq_` and in base units
//! (seconds). Message counters are incremented only through the statistics
//! ledger (`stats.rs`), which holds a handle per series so that counting an
//! event costs no label allocation; values read at scrape time (group lag,
//! pending delays, the fsync histogram of `dmq-log-store`) are rendered from
//! a [`GaugeSnapshot`] and [`dmq_log_store::fsync_histogram`] on each call.
//!
//! Exposed:
//! - `dmq_messages_produced_total{topic}`
//! - `dmq_messages_{delivered,acked,redelivered,expired,dead_lettered}_total{topic,group}`
//! - `dmq_fsync_duration_seconds` (histogram)
//! - `dmq_connections`, `dmq_connections_accepted_total`,
//!   `dmq_connections_rejected_total{reason}`
//! - `dmq_group_lag_messages{topic,group}`, `dmq_group_lag_seconds{topic,group}`,
//!   `dmq_delays_pending`
//! - `dmq_transactions_open`, `dmq_transactions_overdue`,
//!   `dmq_transactions_unresolved`, `dmq_transaction_half_messages`,
//!   `dmq_transaction_checks_total`
//! - `dmq_quarantined_objects` (topics and groups set aside at start),
//!   `dmq_recovery_damaged_regions{topic,partition}`,
//!   `dmq_recovery_truncated_bytes{topic,partition}` (what recovery skipped
//!   and cut; see `GET /api/health`), `dmq_journal_tail_cut_bytes{journal}`
//! - `dmq_topic_stored_bytes{topic}`, `dmq_topic_disk_bytes{topic}` (what a
//!   topic holds and what it takes on disk), `dmq_open_files`,
//!   `dmq_mapped_segments`
//!   (journals whose last frame was cut as torn at start)
//! - `dmq_trace_events_dropped_total`
//! - `dmq_build_info{version}` (always 1)

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::GaugeSnapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JournalLabels {
    journal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    topic: String,
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// The counters of one (topic, group) series.
#[derive(Debug, Clone)]
pub(crate) struct GroupCounters {
    pub(crate) delivered: Counter,
    pub(crate) acked: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) expired: Counter,
    pub(crate) dead_lettered: Counter,
}

/// The broker's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    produced: Family<TopicLabels, Counter>,
    delivered: Family<GroupLabels, Counter>,
    acked: Family<GroupLabels, Counter>,
    redelivered: Family<GroupLabels, Counter>,
    expired: Family<GroupLabels, Counter>,
    dead_lettered: Family<GroupLabels, Counter>,
    connections: Gauge,
    accepted: Counter,
    rejected: Family<ReasonLabels, Counter>,
    trace_dropped: Counter,
}

/// Renders `dmq-log-store`'s fsync histogram at scrape time.
#[derive(Debug)]
struct FsyncCollector;

impl Collector for FsyncCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let histogram = dmq_log_store::fsync_histogram();
        // prometheus-client wants per-bucket counts, `f64::MAX` for +Inf.
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = histogram
            .buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let hits = cumulative.saturating_sub(previous);
                previous = cumulative;
                (if bound.is_finite() { bound } else { f64::MAX }, hits)
            })
            .collect();
        let mut metric = encoder.encode_descriptor(
            "fsync_duration",
            "Duration of the log's segment fdatasyncs.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            histogram.sum_seconds,
            histogram.count,
            &buckets,
            None,
        )
    }
}

impl Metrics {
    /// Registers every process-lifetime metric.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dmq");
        let produced = Family::<TopicLabels, Counter>::default();
        registry.register(
            "messages_produced",
            "Messages stored by produce requests",
            produced.clone(),
        );
        let group_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<GroupLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let delivered = group_family(
            &mut registry,
            "messages_delivered",
            "Deliveries to group members (every attempt)",
        );
        let acked = group_family(&mut registry, "messages_acked", "Messages acked by a group");
        let redelivered = group_family(
            &mut registry,
            "messages_redelivered",
            "Retries scheduled (nack, ack timeout, member left)",
        );
        let expired = group_family(
            &mut registry,
            "messages_expired",
            "Messages skipped by a group because they expired",
        );
        let dead_lettered = group_family(
            &mut registry,
            "messages_dead_lettered",
            "Messages moved to a group's dead-letter topic",
        );
        registry.register_collector(Box::new(FsyncCollector));
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            accepted.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_rejected",
            "Client connections or handshakes refused, by reason",
            rejected.clone(),
        );
        let trace_dropped = Counter::default();
        registry.register(
            "trace_events_dropped",
            "Trace events not recorded because the trace writer was behind or failed (counts are unaffected)",
            trace_dropped.clone(),
        );
        let build = Family::<VersionLabels, Gauge>::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "The broker's version (always 1)", build);
        Metrics {
            registry,
            produced,
            delivered,
            acked,
            redelivered,
            expired,
            dead_lettered,
            connections,
            accepted,
            rejected,
            trace_dropped,
        }
    }

    /// The produced counter of `topic`.
    pub(crate) fn produced_counter(&self, topic: &str) -> Counter {
        self.produced.get_or_create_owned(&TopicLabels {
            topic: topic.to_string(),
        })
    }

    /// The counters of (`topic`, `group`).
    pub(crate) fn group_counters(&self, topic: &str, group: &str) -> GroupCounters {
        let labels = GroupLabels {
            topic: topic.to_string(),
            group: group.to_string(),
        };
        GroupCounters {
            delivered: self.delivered.get_or_create_owned(&labels),
            acked: self.acked.get_or_create_owned(&labels),
            redelivered: self.redelivered.get_or_create_owned(&labels),
            expired: self.expired.get_or_create_owned(&labels),
            dead_lettered: self.dead_lettered.get_or_create_owned(&labels),
        }
    }

    /// A connection was accepted.
    pub(crate) fn connection_opened(&self) {
        self.accepted.inc();
        self.connections.inc();
    }

    /// An accepted connection ended.
    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    /// A connection or handshake was refused for `reason`.
    pub(crate) fn connection_rejected(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// `n` trace events were not recorded.
    pub(crate) fn trace_dropped(&self, n: u64) {
        self.trace_dropped.inc_by(n);
    }

    /// Trace events dropped so far.
    #[cfg(test)]
    pub(crate) fn trace_dropped_total(&self) -> u64 {
        self.trace_dropped.get()
    }

    /// The text exposition (OpenMetrics text format, `# EOF` at the end).
    pub(crate) fn render(&self, gauges: &GaugeSnapshot) -> String {
        let mut scrape = Registry::with_prefix("dmq");
        let lag_messages = Family::<GroupLabels, Gauge>::default();
        let lag_seconds = Family::<GroupLabels, Gauge<f64, AtomicU64>>::default();
        for (topic, group, messages, seconds) in &gauges.group_lag {
            let labels = GroupLabels {
                topic: topic.clone(),
                group: group.clone(),
            };
            lag_messages
                .get_or_create(&labels)
                .set(i64::try_from(*messages).unwrap_or(i64::MAX));
            lag_seconds.get_or_create(&labels).set(*seconds);
        }
        scrape.register(
            "group_lag_messages",
            "Messages of a group's partitions not yet acked",
            lag_messages,
        );
        scrape.register_with_unit(
            "group_lag",
            "Age of a group's oldest unacked message",
            Unit::Seconds,
            lag_seconds,
        );
        let pending = Gauge::<i64>::default();
        pending.set(i64::try_from(gauges.pending_delays).unwrap_or(i64::MAX));
        scrape.register(
            "delays_pending",
            "Delayed messages waiting in the delay store",
            pending,
        );
        let transactions = &gauges.transactions;
        for (name, help, value) in [
            (
                "transactions_open",
                "Unsettled transactions (open, ending, or committed and being moved)",
                transactions.unsettled,
            ),
            (
                "transactions_overdue",
                "Open transactions past their timeout",
                transactions.overdue,
            ),
            (
                "transactions_unresolved",
                "Open transactions whose check-backs ran out",
                transactions.unresolved,
            ),
            (
                "transaction_half_messages",
                "Half messages held by unsettled transactions",
                transactions.half_records,
            ),
        ] {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            scrape.register(name, help, gauge);
        }
        let checks = Counter::<u64>::default();
        checks.inc_by(transactions.checks_sent);
        scrape.register(
            "transaction_checks",
            "Check-backs sent to producer groups about open transactions",
            checks,
        );
        let quarantined = Gauge::<i64>::default();
        quarantined.set(i64::try_from(gauges.quarantined).unwrap_or(i64::MAX));
        scrape.register(
            "quarantined_objects",
            "Topics and groups the metadata replay set aside at start",
            quarantined,
        );
        let damaged_regions = Family::<PartitionLabels, Gauge>::default();
        let truncated = Family::<PartitionLabels, Gauge>::default();
        for (topic, partition, regions, bytes) in &gauges.damage {
            let labels = PartitionLabels {
                topic: topic.clone(),
                partition: *partition,
            };
            damaged_regions
                .get_or_create(&labels)
                .set(i64::try_from(*regions).unwrap_or(i64::MAX));
            truncated
                .get_or_create(&labels)
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        scrape.register(
            "recovery_damaged_regions",
            "Damaged regions of a partition's log that readers skip",
            damaged_regions,
        );
        scrape.register_with_unit(
            "recovery_truncated",
            "Torn-tail bytes recovery cut from a partition's log",
            Unit::Bytes,
            truncated,
        );
        let stored = Family::<TopicLabels, Gauge>::default();
        let disk = Family::<TopicLabels, Gauge>::default();
        for (topic, stored_bytes, disk_bytes) in &gauges.topic_bytes {
            let labels = TopicLabels {
                topic: topic.clone(),
            };
            stored
                .get_or_create(&labels)
                .set(i64::try_from(*stored_bytes).unwrap_or(i64::MAX));
            disk.get_or_create(&labels)
                .set(i64::try_from(*disk_bytes).unwrap_or(i64::MAX));
        }
        scrape.register_with_unit(
            "topic_stored",
            "Bytes of records a topic's partitions store",
            Unit::Bytes,
            stored,
        );
        scrape.register_with_unit(
            "topic_disk",
            "Bytes a topic's partitions take on disk: segment files as allocated (unused room \
             of active segments included) and index files",
            Unit::Bytes,
            disk,
        );
        let open_files = Gauge::<i64>::default();
        open_files.set(i64::try_from(gauges.open_files).unwrap_or(i64::MAX));
        scrape.register(
            "open_files",
            "Segment files and journals held open (at most max_open_files)",
            open_files,
        );
        let mapped = Gauge::<i64>::default();
        mapped.set(i64::try_from(gauges.mapped_segments).unwrap_or(i64::MAX));
        scrape.register(
            "mapped_segments",
            "Sealed segments mapped (at most max_mapped_segments)",
            mapped,
        );
        let tails_cut = Family::<JournalLabels, Gauge>::default();
        for (journal, bytes) in &gauges.journal_tails_cut {
            tails_cut
                .get_or_create(&JournalLabels {
                    journal: journal.clone(),
                })
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        scrape.register_with_unit(
            "journal_tail_cut",
            "Bytes of a journal's torn tail cut at start",
            Unit::Bytes,
            tails_cut,
        );
        let mut text = String::new();
        let encoded = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut text, &scrape))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut text));
        if let Err(error) = encoded {
            tracing::error!(%error, "rendering the metrics failed");
        }
        text
    }
}
