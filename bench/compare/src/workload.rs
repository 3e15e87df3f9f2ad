//! What every system's driver shares: the workload, the timestamped
//! payload, latency recording, the outcome and the stop conditions.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinHandle;

/// Latencies above this (µs) are clamped into the histogram's top bucket.
const MAX_LATENCY_US: u64 = 600_000_000;
/// The consumer gives up after this long without a message once every
/// producer is done.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to a freshly started server is retried for this long.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The workload, the same for every system.
#[derive(Debug, Clone)]
pub struct Workload {
    pub messages: u64,
    pub producers: usize,
    pub size: usize,
    pub batch: usize,
    pub window: usize,
    /// NATS producers publish `batch` messages, then wait for all their
    /// acks (`nats bench js pub async`), instead of a sliding window.
    pub lockstep: bool,
}

impl Workload {
    /// Messages for producer `index`.
    pub fn share(&self, index: usize) -> u64 {
        let producers = self.producers as u64;
        self.messages / producers + u64::from((index as u64) < self.messages % producers)
    }

    /// A payload template (`size` bytes of 'x').
    pub fn template(&self) -> Bytes {
        Bytes::from(vec![b'x'; self.size])
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// The template with the current time in its first 8 bytes.
pub fn stamped(template: &Bytes) -> Bytes {
    let mut payload = BytesMut::from(template.as_ref());
    payload[..8].copy_from_slice(&now_ns().to_le_bytes());
    payload.freeze()
}

/// A latency histogram in µs.
pub fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")
}

/// Records produce→deliver latency from a payload's first 8 bytes.
pub fn record_delivery(histogram: &mut Histogram<u64>, payload: &[u8]) {
    if let Some(bytes) = payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        let sent = u64::from_le_bytes(bytes);
        let micros = (now_ns().saturating_sub(sent) / 1000).clamp(1, MAX_LATENCY_US);
        let _ = histogram.record(micros);
    }
}

/// Counters shared by the producers and the consumer of one measurement.
#[derive(Default)]
pub struct Shared {
    /// Messages whose produce was acknowledged.
    pub produced: AtomicU64,
    /// Produces that failed.
    pub errors: AtomicU64,
    /// Producers still running.
    pub producers_running: AtomicU64,
    /// Set once every producer is done.
    pub producers_done: AtomicBool,
}

impl Shared {
    pub fn new(producers: usize) -> Arc<Shared> {
        let shared = Shared::default();
        shared
            .producers_running
            .store(producers as u64, Ordering::SeqCst);
        Arc::new(shared)
    }

    /// The consumer is finished when it has every acknowledged message
    /// after every producer is done, or every message of the workload.
    pub fn consumer_finished(&self, consumed: u64, messages: u64) -> bool {
        consumed >= messages
            || (self.producers_done.load(Ordering::SeqCst)
                && consumed >= self.produced.load(Ordering::SeqCst))
    }

    /// A producer finished (successfully or not).
    pub fn producer_done(&self) {
        if self.producers_running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.producers_done.store(true, Ordering::SeqCst);
        }
    }
}

/// Aborts the tasks it holds when dropped (on error or timeout).
pub struct Tasks<T>(pub Vec<JoinHandle<T>>);

impl<T> Drop for Tasks<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl<T> Tasks<T> {
    /// Waits for every task, in order.
    pub async fn join(mut self) -> Result<Vec<T>> {
        let mut results = Vec::new();
        for task in std::mem::take(&mut self.0) {
            results.push(task.await.context("task panicked or was cancelled")?);
        }
        Ok(results)
    }
}

/// Runs one measurement: starts the clock, spawns `consumer` and one task
/// per future of `producers`, waits for the producers (the produce time),
/// then for the consumer (the total time). Every system's runner connects
/// and subscribes first, then hands its tasks here, so all are timed alike.
pub async fn measure<C, P>(shared: &Shared, consumer: C, producers: Vec<P>) -> Result<Outcome>
where
    C: Future<Output = Result<(u64, Histogram<u64>)>> + Send + 'static,
    P: Future<Output = Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let consumer = Tasks(vec![tokio::spawn(consumer)]);
    let producers = Tasks(producers.into_iter().map(tokio::spawn).collect());
    for result in producers.join().await? {
        result?;
    }
    let produce_elapsed = started.elapsed();
    let (consumed, latency) = consumer
        .join()
        .await?
        .pop()
        .context("no consumer result")??;
    let total_elapsed = started.elapsed();
    Outcome::new(shared, consumed, produce_elapsed, total_elapsed, &latency)
}

/// The result of one measurement.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub produced: u64,
    pub consumed: u64,
    pub errors: u64,
    pub produce_secs: f64,
    pub total_secs: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Outcome {
    /// Builds the outcome of a measurement that started at `started`.
    pub fn new(
        shared: &Shared,
        consumed: u64,
        produce_elapsed: Duration,
        total_elapsed: Duration,
        latency: &Histogram<u64>,
    ) -> Result<Outcome> {
        let produced = shared.produced.load(Ordering::SeqCst);
        let errors = shared.errors.load(Ordering::SeqCst);
        if produced == 0 {
            anyhow::bail!("no produce was acknowledged ({errors} errors)");
        }
        if consumed < produced {
            anyhow::bail!(
                "the consumer received {consumed} of {produced} acknowledged messages before giving up"
            );
        }
        Ok(Outcome {
            produced,
            consumed,
            errors,
            produce_secs: produce_elapsed.as_secs_f64(),
            total_secs: total_elapsed.as_secs_f64(),
            p50_us: latency.value_at_quantile(0.50),
            p99_us: latency.value_at_quantile(0.99),
            p999_us: latency.value_at_quantile(0.999),
            max_us: latency.max(),
        })
    }

    pub fn produce_rate(&self) -> f64 {
        self.produced as f64 / self.produce_secs.max(1e-9)
    }

    pub fn end_to_end_rate(&self) -> f64 {
        self.consumed as f64 / self.total_secs.max(1e-9)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "produced": self.produced,
            "consumed": self.consumed,
            "produce_errors": self.errors,
            "produce_seconds": self.produce_secs,
            "total_seconds": self.total_secs,
            "produce_msgs_per_sec": self.produce_rate(),
            "end_to_end_msgs_per_sec": self.end_to_end_rate(),
            "deliver_p50_us": self.p50_us,
            "deliver_p99_us": self.p99_us,
            "deliver_p999_us": self.p999_us,
            "deliver_max_us": self.max_us,
        })
    }
}
