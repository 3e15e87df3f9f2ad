//! Telemetry: the message trace, per-minute statistics and Prometheus
//! metrics.
//!
//! Owns `<data_dir>/trace/` (an internal [`Log`], never under `topics/`,
//! which the dispatcher owns) and `<data_dir>/stats/`.
//!
//! # Flow
//! - The dispatcher emits every message event to [`Telemetry::event_sink`],
//!   which only pushes it into a buffer (`Mutex<Vec<Event>>`). The engine
//!   calls [`Telemetry::flush`] after each loop iteration: the buffer is
//!   swapped out and sent, as one batch, to the telemetry thread.
//! - Sessions call [`Telemetry::produced`] once per durable produce batch;
//!   the batch is sent to the telemetry thread as it is.
//! - The telemetry thread (`dmq-telemetry`) counts each batch into the
//!   statistics and the metric counters (`stats.rs`, `metrics.rs`), then, if
//!   the trace is on, encodes its events (`record.rs`: a record per message,
//!   or one per run of consecutive messages with the same event, e.g. a
//!   whole produce batch) and appends them to the trace log, one log batch
//!   for everything it took off the queue at once. Every minute it applies
//!   the trace log's age retention, drops statistics older than
//!   `stats_retention_hours` and rewrites the statistics file if anything
//!   changed; it writes the file once more when it stops.
//!
//! # Invariants
//! - Memory is bounded: the queue holds at most [`QUEUE_BATCHES`] batches
//!   and [`MAX_QUEUED_EVENTS`] events; the dispatcher-side buffer is handed
//!   on once it reaches [`FLUSH_AT`] events even without a `flush`. A batch
//!   that does not fit is **counted on the caller's thread** (statistics and
//!   counters stay exact) and its trace events are dropped, counted in
//!   `dmq_trace_events_dropped_total`.
//! - Every event is counted exactly once, before any trace drop.
//! - The trace log runs with `FsyncPolicy::Never`: the trace is diagnostic
//!   and may lose its last moments in a crash (whatever the OS had not
//!   written back). Segments are 64 MiB, roll at least hourly, and are
//!   deleted once older than `trace_retention_hours`.
//! - [`Telemetry::trace`] and [`Telemetry::stats`] first wait (at most
//!   10 s and 1 s) until the telemetry thread has handled everything
//!   submitted before the call, so a produce followed by a query sees its
//!   events. Both block: call them off async worker threads where possible.
//! - With `trace_enabled` false no trace log is opened or written;
//!   statistics and metrics work the same.

mod metrics;
mod record;
mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_dispatcher::{Event, EventSink};
use dmq_log_store::{
    BatchInput, Clock, FsyncPolicy, Log, LogConfig, MessageId, RecordInput, SystemClock,
};
use serde::Serialize;

use self::metrics::Metrics;
use self::record::{Entry, RecordWriter, What};
use self::stats::Ledger;

/// Batches the telemetry thread's queue holds at most.
pub const QUEUE_BATCHES: usize = 1024;
/// Events (a produced message counts as two) queued at most.
pub const MAX_QUEUED_EVENTS: usize = 256 * 1024;
/// The dispatcher-side buffer is handed on at this many events.
pub const FLUSH_AT: usize = 8192;
/// Segment size of the trace log.
pub const TRACE_SEGMENT_BYTES: u32 = 64 << 20;
/// Bytes of trace records per log batch at most (a lookup CRC-checks the
/// whole batch of each record it reads).
const MAX_APPEND_BYTES: usize = 1 << 20;
/// Jobs taken off the queue for one round of counting and appending.
const MAX_JOBS_PER_ROUND: usize = 256;
/// Retention and statistics persistence run this often.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a trace query waits for the telemetry thread to catch up.
const TRACE_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a statistics query waits for it (it may run on an async
/// worker thread).
const STATS_SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// Trace records read for one message at most.
const MAX_TRACE_RECORDS: usize = 10_000;
/// Statistics windows are clamped to at least this many minutes (2 days).
const MAX_QUERY_MINUTES: usize = 2880;

/// Settings of the trace and the statistics.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Record the message trace.
    pub trace_enabled: bool,
    /// Trace records older than this are deleted.
    pub trace_retention_hours: u64,
    /// Per-minute counts older than this are dropped.
    pub stats_retention_hours: u64,
    /// Size of a trace log segment (preallocated when created).
    pub trace_segment_bytes: u32,
    /// The oldest trace segments are deleted while the trace is larger.
    pub trace_max_bytes: Option<u64>,
    /// The trace creates no segment that would leave less free.
    pub min_free_bytes: u64,
}

/// Why telemetry could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The trace log failed.
    #[error("trace log: {0}")]
    Trace(String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The statistics file could not be read.
    #[error("statistics: {0}")]
    Stats(String),
}

/// One produce batch, as the session saw it.
#[derive(Debug, Clone)]
pub struct ProducedBatch {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset of the first record; `None` when the batch went to the delay store.
    pub base_offset: Option<u64>,
    /// The records' ids, in order.
    pub ids: Vec<MessageId>,
    /// The producing client's id.
    pub client_id: String,
    /// Its address.
    pub peer: SocketAddr,
    /// When the produce was received (ms since the epoch).
    pub received_ms: i64,
    /// When it was durable (ms since the epoch).
    pub stored_ms: i64,
}

impl ProducedBatch {
    /// Trace events the batch yields: `produced` and `stored` per message,
    /// only `produced` for a delayed batch.
    fn trace_events(&self) -> usize {
        let per_message = if self.base_offset.is_some() { 2 } else { 1 };
        self.ids.len().saturating_mul(per_message)
    }
}

/// One event of a message's trace (docs/admin-api.md, TraceEvent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// When.
    pub time_ms: i64,
    /// produced, stored, delivered, acked, …
    pub kind: String,
    /// Topic.
    pub topic: String,
    /// Partition, if known.
    pub partition: Option<u32>,
    /// Offset, if known.
    pub offset: Option<u64>,
    /// Group, for group events.
    pub group: Option<String>,
    /// Details in words.
    pub detail: Option<String>,
}

/// Counts of one minute (docs/admin-api.md, MinuteCounts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MinuteCounts {
    /// Start of the minute (ms since the epoch).
    pub minute_ms: i64,
    /// Messages produced.
    pub produced: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Expired.
    pub expired: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
}

/// Values read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GaugeSnapshot {
    /// (topic, group, lag in messages, lag in seconds).
    pub group_lag: Vec<(String, String, u64, f64)>,
    /// Delays waiting in the delay store.
    pub pending_delays: u64,
    /// Transactions: unsettled, overdue, unresolved, half messages,
    /// check-backs sent.
    pub transactions: dmq_dispatcher::TransactionCounts,
    /// Topics and groups quarantined at start.
    pub quarantined: u64,
    /// (topic, partition, damaged regions skipped, torn-tail bytes cut) of
    /// the partitions whose recovery found anything.
    pub damage: Vec<(String, u32, u64, u64)>,
    /// (journal, bytes) of the journals whose torn tail was cut at start.
    pub journal_tails_cut: Vec<(String, u64)>,
    /// (topic, bytes of records stored, bytes on disk) of every topic.
    pub topic_bytes: Vec<(String, u64, u64)>,
    /// Segment files and journals held open (`max_open_files` at most).
    pub open_files: u64,
    /// Sealed segments mapped (`max_mapped_segments` at most).
    pub mapped_segments: u64,
}

/// Trace, statistics and metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

/// Work for the telemetry thread.
enum Job {
    /// Dispatcher events, in emission order.
    Events(Vec<Event>),
    /// A durable produce.
    Produced(ProducedBatch),
    /// Reply once everything queued before is handled.
    Sync(SyncSender<()>),
    /// Persist and stop.
    Stop,
}

/// What the telemetry thread and the callers share.
struct Shared {
    /// `None` when the trace is off.
    trace: Option<Log>,
    metrics: Metrics,
    ledger: Mutex<Ledger>,
    stats_dir: PathBuf,
    stats_retention_minutes: i64,
    clock: Arc<dyn Clock>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Dispatcher events not yet handed on.
    buffer: Mutex<Vec<Event>>,
    sender: SyncSender<Job>,
    /// Events queued to the telemetry thread and not yet handled.
    queued: Arc<AtomicUsize>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("trace", &self.shared.trace.is_some())
            .field("stats_dir", &self.shared.stats_dir)
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The trace log's configuration.
fn trace_log_config(config: &TelemetryConfig) -> LogConfig {
    let retention = Duration::from_secs(config.trace_retention_hours.max(1).saturating_mul(3600));
    LogConfig {
        segment_bytes_max: config.trace_segment_bytes,
        // Roll at least hourly, so that age retention can delete old
        // records even when the trace is quiet.
        segment_age_max: Some(retention.min(Duration::from_secs(3600))),
        fsync: FsyncPolicy::Never,
        retention_age: Some(retention),
        retention_bytes: config.trace_max_bytes,
        min_free_bytes: config.min_free_bytes,
        ..LogConfig::default()
    }
}

impl Telemetry {
    /// Opens the trace log and the statistics under `data_dir`.
    pub fn open(data_dir: &Path, config: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        Telemetry::open_with_clock(data_dir, config, Arc::new(SystemClock))
    }

    /// [`Telemetry::open`] with the clock retention runs by.
    fn open_with_clock(
        data_dir: &Path,
        config: TelemetryConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Telemetry, TelemetryError> {
        let stats_dir = data_dir.join("stats");
        let stats_retention_minutes =
            i64::try_from(config.stats_retention_hours.max(1).saturating_mul(60))
                .unwrap_or(i64::MAX);
        let mut ledger = stats::load(&stats_dir)?;
        ledger.retain(clock.now_ms(), stats_retention_minutes);
        let trace = if config.trace_enabled {
            let log = Log::open(data_dir.join("trace"), trace_log_config(&config))
                .map_err(|e| TelemetryError::Trace(e.to_string()))?;
            if let Err(error) = log.apply_retention() {
                tracing::warn!(%error, "trace retention failed");
            }
            Some(log)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            trace,
            metrics: Metrics::new(),
            ledger: Mutex::new(ledger),
            stats_dir,
            stats_retention_minutes,
            clock,
        });
        let (sender, receiver) = mpsc::sync_channel(QUEUE_BATCHES);
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = {
            let shared = Arc::clone(&shared);
            let queued = Arc::clone(&queued);
            std::thread::Builder::new()
                .name("dmq-telemetry".into())
                .spawn(move || run_worker(&shared, &receiver, &queued))?
        };
        Ok(Telemetry {
            inner: Arc::new(Inner {
                shared,
                buffer: Mutex::new(Vec::new()),
                sender,
                queued,
                worker: Mutex::new(Some(worker)),
            }),
        })
    }

    /// The sink the dispatcher emits its events to: it only buffers them
    /// until the next [`Telemetry::flush`].
    pub fn event_sink(&self) -> Arc<dyn EventSink> {
        Arc::new(Sink(Arc::clone(&self.inner)))
    }

    /// Hands buffered dispatcher events on (the engine calls it after each
    /// round of work).
    pub fn flush(&self) {
        self.inner.flush();
    }

    /// Records a durable produce batch.
    pub fn produced(&self, batch: ProducedBatch) {
        let weight = batch.trace_events();
        if let Some(job) = self.inner.submit(Job::Produced(batch), weight) {
            self.inner.reject(job, weight);
        }
    }

    /// Counts an accepted connection.
    pub fn connection_opened(&self) {
        self.inner.shared.metrics.connection_opened();
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self) {
        self.inner.shared.metrics.connection_closed();
    }

    /// Counts a refused connection or handshake.
    pub fn connection_rejected(&self, reason: &'static str) {
        self.inner.shared.metrics.connection_rejected(reason);
    }

    /// The trace of one message, oldest first. Empty when the trace is off
    /// or nothing is known of the message.
    pub fn trace(&self, id: &MessageId) -> Result<Vec<TraceEvent>, TelemetryError> {
        let Some(log) = &self.inner.shared.trace else {
            return Ok(Vec::new());
        };
        self.inner.sync(TRACE_SYNC_TIMEOUT);
        let mut events = Vec::new();
        // The message's own records, then the runs under its time prefix.
        for key in [&id.as_bytes()[..], &id.as_bytes()[..8]] {
            let records = log
                .find_by_key(key, MAX_TRACE_RECORDS)
                .map_err(|e| TelemetryError::Trace(e.to_string()))?;
            for record in records {
                // The key index matches hashes: compare the key itself.
                if record.key.as_deref() != Some(key) {
                    continue;
                }
                match record::decode(&record.value) {
                    Ok(decoded) => events.extend(record::events_of(id, key, decoded)),
                    Err(error) => tracing::warn!(
                        %error,
                        offset = record.offset,
                        "unreadable trace record skipped"
                    ),
                }
            }
        }
        Ok(order_events(events))
    }

    /// The last `minutes` minutes up to `now_ms`, oldest first, zeros
    /// included, optionally for one topic and group. `topic: None` sums
    /// every topic; `group: None` gives the topic's produced and the other
    /// columns summed over its groups; with a group, `produced` is that of
    /// the topic(s) the group reads. At most `max(retention, 2880)`
    /// minutes are listed.
    pub fn stats(
        &self,
        topic: Option<&str>,
        group: Option<&str>,
        minutes: u32,
        now_ms: i64,
    ) -> Vec<MinuteCounts> {
        let shared = &self.inner.shared;
        let limit = usize::try_from(shared.stats_retention_minutes)
            .unwrap_or(usize::MAX)
            .max(MAX_QUERY_MINUTES);
        let minutes = usize::try_from(minutes).unwrap_or(usize::MAX).min(limit);
        if minutes == 0 {
            return Vec::new();
        }
        self.inner.sync(STATS_SYNC_TIMEOUT);
        lock(&shared.ledger).query(topic, group, minutes, now_ms)
    }

    /// The Prometheus text exposition.
    pub fn render_metrics(&self, gauges: &GaugeSnapshot) -> String {
        self.inner.shared.metrics.render(gauges)
    }

    /// Flushes the trace and persists the statistics (at shutdown). Events
    /// that arrive afterwards are still counted, but neither traced nor
    /// persisted.
    pub fn shutdown(&self) {
        self.inner.flush();
        self.inner.stop_worker();
    }
}

impl Inner {
    fn flush(&self) {
        let rejected = {
            let mut buffer = lock(&self.buffer);
            self.hand_on(&mut buffer)
        };
        if let Some((job, weight)) = rejected {
            self.reject(job, weight);
        }
    }

    /// Sends the buffered events on (under the buffer's lock, so batches
    /// keep their order); gives back a batch that did not fit.
    fn hand_on(&self, buffer: &mut Vec<Event>) -> Option<(Job, usize)> {
        if buffer.is_empty() {
            return None;
        }
        let capacity = buffer.len().min(FLUSH_AT);
        let events = std::mem::replace(buffer, Vec::with_capacity(capacity));
        let weight = events.len();
        self.submit(Job::Events(events), weight)
            .map(|job| (job, weight))
    }

    /// Queues `job` (`weight` events); gives it back if the queue is full
    /// or the telemetry thread stopped.
    fn submit(&self, job: Job, weight: usize) -> Option<Job> {
        let before = self.queued.fetch_add(weight, Ordering::AcqRel);
        if before.saturating_add(weight) > MAX_QUEUED_EVENTS {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            return Some(job);
        }
        match self.sender.try_send(job) {
            Ok(()) => None,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.queued.fetch_sub(weight, Ordering::AcqRel);
                Some(job)
            }
        }
    }

    /// Counts a batch the queue refused, here, and drops its trace events.
    fn reject(&self, job: Job, weight: usize) {
        let shared = &self.shared;
        match &job {
            Job::Events(events) => lock(&shared.ledger).count_events(&shared.metrics, events),
            Job::Produced(batch) => lock(&shared.ledger).count_produced(&shared.metrics, batch),
            Job::Sync(_) | Job::Stop => {}
        }
        if shared.trace.is_some() {
            shared.metrics.trace_dropped(weight as u64);
        }
    }

    /// Waits until the telemetry thread handled everything queued before
    /// (at most `timeout`); false if it did not answer.
    fn sync(&self, timeout: Duration) -> bool {
        self.flush();
        let deadline = Instant::now() + timeout;
        let (reply, replied) = mpsc::sync_channel(1);
        let mut job = Job::Sync(reply);
        loop {
            match self.sender.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    job = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        replied
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    /// Stops the telemetry thread after it handled the queue and persisted
    /// the statistics. Idempotent.
    fn stop_worker(&self) {
        let handle = lock(&self.worker).take();
        if let Some(handle) = handle {
            // Blocks only while the queue is full; the thread drains it.
            let _ = self.sender.send(Job::Stop);
            if handle.join().is_err() {
                tracing::error!("the telemetry thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The dispatcher's event sink: buffers, nothing more (see [`FLUSH_AT`]).
#[derive(Debug)]
struct Sink(Arc<Inner>);

impl EventSink for Sink {
    fn emit(&self, event: Event) {
        let rejected = {
            let mut buffer = lock(&self.0.buffer);
            buffer.push(event);
            if buffer.len() < FLUSH_AT {
                return;
            }
            self.0.hand_on(&mut buffer)
        };
        if let Some((job, weight)) = rejected {
            self.0.reject(job, weight);
        }
    }
}

/// Orders a message's events: by time; at equal times `produced` before
/// `stored` before the rest, and then by the telemetry thread's sequence
/// number (emission order) and the position in the record. No event of
/// the stored record (same topic, partition and offset) sorts before its
/// `stored`: the session stamps `stored` after the fsync returned, possibly
/// after the dispatcher delivered.
fn order_events(events: Vec<record::Sequenced>) -> Vec<TraceEvent> {
    let stored: Vec<(String, Option<u32>, Option<u64>, i64)> = events
        .iter()
        .filter(|s| s.event.kind == "stored")
        .map(|s| {
            let e = &s.event;
            (e.topic.clone(), e.partition, e.offset, e.time_ms)
        })
        .collect();
    let mut keyed: Vec<((i64, u8, u64, usize), TraceEvent)> = events
        .into_iter()
        .map(|sequenced| {
            let event = sequenced.event;
            let rank = match event.kind.as_str() {
                "produced" => 0u8,
                "stored" => 1,
                _ => 2,
            };
            let mut time = event.time_ms;
            if rank == 2 && event.offset.is_some() {
                for (topic, partition, offset, stored_ms) in &stored {
                    if *topic == event.topic
                        && *partition == event.partition
                        && *offset == event.offset
                    {
                        time = time.max(*stored_ms);
                    }
                }
            }
            ((time, rank, sequenced.seq, sequenced.position), event)
        })
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, event)| event).collect()
}

fn run_worker(shared: &Shared, jobs: &Receiver<Job>, queued: &AtomicUsize) {
    let mut writer = TraceWriter::default();
    let mut round = Vec::with_capacity(MAX_JOBS_PER_ROUND);
    let mut next_maintenance = Instant::now() + MAINTENANCE_INTERVAL;
    loop {
        let timeout = next_maintenance.saturating_duration_since(Instant::now());
        match jobs.recv_timeout(timeout) {
            Ok(job) => {
                round.push(job);
                while round.len() < MAX_JOBS_PER_ROUND {
                    match jobs.try_recv() {
                        Ok(job) => round.push(job),
                        Err(_) => break,
                    }
                }
                if shared.handle(&mut round, &mut writer, queued) {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_maintenance {
            shared.maintain();
            next_maintenance = Instant::now() + MAINTENANCE_INTERVAL;
        }
    }
    shared.persist();
}

impl Shared {
    /// Counts, traces and answers one round of jobs; true on `Stop`.
    fn handle(&self, round: &mut Vec<Job>, writer: &mut TraceWriter, queued: &AtomicUsize) -> bool {
        let mut weight = 0usize;
        let mut stop = false;
        {
            let mut ledger = lock(&self.ledger);
            for job in round.iter() {
                match job {
                    Job::Events(events) => {
                        ledger.count_events(&self.metrics, events);
                        weight += events.len();
                    }
                    Job::Produced(batch) => {
                        ledger.count_produced(&self.metrics, batch);
                        weight += batch.trace_events();
                    }
                    Job::Sync(_) => {}
                    Job::Stop => stop = true,
                }
            }
        }
        if let Some(log) = &self.trace {
            writer.write(log, round, &self.metrics);
        }
        queued.fetch_sub(weight, Ordering::AcqRel);
        for job in round.drain(..) {
            if let Job::Sync(reply) = job {
                let _ = reply.try_send(());
            }
        }
        stop
    }

    /// Retention of the trace and the statistics; persists the statistics.
    fn maintain(&self) {
        if let Some(log) = &self.trace {
            if let Err(error) = log.apply_retention() {
                tracing::warn!(%error, "trace retention failed");
            }
        }
        lock(&self.ledger).retain(self.clock.now_ms(), self.stats_retention_minutes);
        self.persist();
    }

    /// Rewrites the statistics file if anything changed.
    fn persist(&self) {
        let bytes = {
            let mut ledger = lock(&self.ledger);
            if !ledger.is_dirty() {
                return;
            }
            ledger.encode()
        };
        if let Err(error) = stats::store(&self.stats_dir, &bytes) {
            tracing::error!(%error, dir = %self.stats_dir.display(), "persisting the statistics failed");
            // Try again at the next round.
            lock(&self.ledger).mark_dirty();
        }
    }
}

/// Runs of events that may still grow, looked at per event (a poll
/// interleaves its partitions: one open run each).
const OPEN_RUNS: usize = 16;

/// One record-to-be of a round of events: the first and last event's
/// index in the round and the number of events (a run if more than one).
#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    last: usize,
    count: usize,
}

/// Encodes trace records into one buffer and appends them as log batches.
#[derive(Default)]
struct TraceWriter {
    buf: Vec<u8>,
    /// (key start, value start, end) of each record in `buf`.
    spans: Vec<(usize, usize, usize)>,
    /// Trace events in `spans` (one per message and event).
    events: usize,
    /// Sequence number of the next event (see `record.rs`).
    seq: u64,
    /// Scratch: the groups of a round of events, in order of their first
    /// event; the next event of the same group for each event; the groups
    /// still open; a run's sequence deltas.
    groups: Vec<Group>,
    next: Vec<usize>,
    open: Vec<usize>,
    deltas: Vec<u64>,
    /// When a failed append was last logged (one warning a minute).
    last_warning: Option<Instant>,
}

/// Whether `next` continues the run whose last event is `previous`: the
/// next id and offset, and otherwise the same event at the same time.
fn extends(previous: &Event, next: &Event) -> bool {
    record::follows(&previous.message_id, &next.message_id)
        && next.offset == previous.offset.map(|o| o.wrapping_add(1))
        && next.time_ms == previous.time_ms
        && next.partition == previous.partition
        && next.kind == previous.kind
        && next.group == previous.group
        && next.reason == previous.reason
        && next.topic == previous.topic
}

impl TraceWriter {
    fn write(&mut self, log: &Log, jobs: &[Job], metrics: &Metrics) {
        for job in jobs {
            match job {
                Job::Events(events) => self.events(log, events, metrics),
                Job::Produced(batch) => self.produced(log, batch, metrics),
                Job::Sync(_) | Job::Stop => {}
            }
        }
        self.append(log, metrics);
    }

    /// One run record for each run of at least two messages with the same
    /// event (one partition's deliveries of a poll, a batch of acks), one
    /// record per other event; records in the order of their first event.
    fn events(&mut self, log: &Log, events: &[Event], metrics: &Metrics) {
        self.groups.clear();
        self.open.clear();
        self.next.clear();
        self.next.resize(events.len(), usize::MAX);
        for (index, event) in events.iter().enumerate() {
            let joined = self.open.iter().rev().copied().find(|&g| {
                self.groups
                    .get(g)
                    .and_then(|group| events.get(group.last))
                    .is_some_and(|last| extends(last, event))
            });
            match joined.and_then(|g| self.groups.get_mut(g)) {
                Some(group) => {
                    self.next[group.last] = index;
                    group.last = index;
                    group.count += 1;
                }
                None => {
                    if self.open.len() == OPEN_RUNS {
                        self.open.remove(0);
                    }
                    self.open.push(self.groups.len());
                    self.groups.push(Group {
                        first: index,
                        last: index,
                        count: 1,
                    });
                }
            }
        }
        let base_seq = self.seq;
        self.seq = self.seq.wrapping_add(events.len() as u64);
        for g in 0..self.groups.len() {
            let group = self.groups[g];
            let first = &events[group.first];
            let Some(entry) = record::entry_of(first) else {
                continue;
            };
            let seq = base_seq.wrapping_add(group.first as u64);
            let key_start = self.buf.len();
            let mut record = if group.count >= 2 {
                self.deltas.clear();
                let mut at = group.first;
                while let Some(&after) = self.next.get(at).filter(|&&n| n != usize::MAX) {
                    self.deltas.push((after - at) as u64);
                    at = after;
                }
                self.buf
                    .extend_from_slice(&first.message_id.as_bytes()[..8]);
                let unique = record::unique_part(&first.message_id);
                let count = group.count as u64;
                RecordWriter::start_run(
                    &mut self.buf,
                    &first.topic,
                    unique,
                    count,
                    seq,
                    &self.deltas,
                )
            } else {
                self.buf.extend_from_slice(first.message_id.as_bytes());
                RecordWriter::start(&mut self.buf, &first.topic, seq)
            };
            record.entry(&entry);
            let value_start = key_start + if group.count >= 2 { 8 } else { 16 };
            self.spans.push((key_start, value_start, self.buf.len()));
            self.events += group.count;
            if self.buf.len() >= MAX_APPEND_BYTES {
                self.append(log, metrics);
            }
        }
    }

    /// `produced`, then `stored` unless delayed: one run record per run of
    /// consecutive ids (normally the whole batch), one record per message
    /// outside runs.
    fn produced(&mut self, log: &Log, batch: &ProducedBatch, metrics: &Metrics) {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut start = 0;
        while let Some(first) = batch.ids.get(start) {
            let run = 1 + batch.ids[start..]
                .windows(2)
                .take_while(|pair| record::follows(&pair[0], &pair[1]))
                .count();
            let key_start = self.buf.len();
            let mut record = if run >= 2 {
                self.buf.extend_from_slice(&first.as_bytes()[..8]);
                let unique = record::unique_part(first);
                RecordWriter::start_run(&mut self.buf, &batch.topic, unique, run as u64, seq, &[])
            } else {
                self.buf.extend_from_slice(first.as_bytes());
                RecordWriter::start(&mut self.buf, &batch.topic, seq)
            };
            let value_start = key_start + if run >= 2 { 8 } else { 16 };
            record.entry(&Entry {
                time_ms: batch.received_ms,
                partition: Some(batch.partition),
                offset: None,
                group: None,
                what: What::Produced {
                    client_id: batch.client_id.as_str(),
                    peer: batch.peer,
                },
                reason: None,
            });
            if let Some(base) = batch.base_offset {
                record.entry(&Entry::<&str> {
                    time_ms: batch.stored_ms,
                    partition: Some(batch.partition),
                    offset: Some(base + start as u64),
                    group: None,
                    what: What::Stored,
                    reason: None,
                });
            }
            self.spans.push((key_start, value_start, self.buf.len()));
            start += run;
            if self.buf.len() >= MAX_APPEND_BYTES {
                self.append(log, metrics);
            }
        }
        self.events += batch.trace_events();
    }

    /// Appends the encoded records as one log batch.
    fn append(&mut self, log: &Log, metrics: &Metrics) {
        if self.spans.is_empty() {
            return;
        }
        let capacity = self.buf.capacity();
        let bytes = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(capacity),
        ));
        let records = self
            .spans
            .drain(..)
            .map(|(key, value, end)| RecordInput {
                key: Some(bytes.slice(key..value)),
                value: bytes.slice(value..end),
                ..RecordInput::default()
            })
            .collect();
        let events = std::mem::take(&mut self.events);
        if let Err(error) = log.append(&BatchInput::new(records)) {
            metrics.trace_dropped(events as u64);
            if self
                .last_warning
                .is_none_or(|at| at.elapsed() >= MAINTENANCE_INTERVAL)
            {
                self.last_warning = Some(Instant::now());
                tracing::warn!(
                    %error,
                    events,
                    "trace events not recorded (see dmq_trace_events_dropped_total)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
