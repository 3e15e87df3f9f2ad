//! Process-wide fsync statistics: a fixed-bucket histogram of how long every
//! fdatasync of a log's segment file took, whichever log and backend issued
//! it.
//!
//! Owns the global recorder ([`fsync_histogram`] reads it). The append
//! backends are wrapped at selection time (`io::select_backend`), so every
//! `sync_data` a [`crate::Log`] makes (group commits, interval flushes,
//! seals) is timed; directory syncs and the `sync_all` after trimming a sealed
//! segment are not (they are rare and not on the produce path).
//!
//! Invariants: recording is lock-free (relaxed atomics: one `fetch_add` per
//! bucket hit, plus the sum and the count), so a reader may see a count that
//! is one ahead of the sum or of a bucket, never a decreasing value. Bucket
//! bounds are fixed ([`FSYNC_BUCKETS_SECONDS`]); the last bucket of a
//! snapshot is `+Inf` and equals `count` when no update is in progress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the finite buckets, in seconds (50 µs to 10 s).
pub const FSYNC_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

const BUCKETS: usize = FSYNC_BUCKETS_SECONDS.len();

/// A snapshot of the fsync-duration histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct FsyncHistogram {
    /// `(upper bound in seconds, cumulative count)`, ascending; the last
    /// bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of every recorded duration, in seconds.
    pub sum_seconds: f64,
    /// Number of fsyncs recorded.
    pub count: u64,
}

/// A fixed-bucket duration histogram of atomics.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Non-cumulative hits per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Recorder {
    pub(crate) const fn new() -> Recorder {
        Recorder {
            buckets: [const { AtomicU64::new(0) }; BUCKETS + 1],
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = FSYNC_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> FsyncHistogram {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS + 1);
        for (index, hits) in self.buckets.iter().enumerate() {
            cumulative += hits.load(Ordering::Relaxed);
            let bound = FSYNC_BUCKETS_SECONDS
                .get(index)
                .copied()
                .unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        FsyncHistogram {
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

static GLOBAL: Recorder = Recorder::new();

/// Runs `sync` (an fsync or fdatasync) and records how long it took.
pub(crate) fn timed<T>(sync: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = sync();
    GLOBAL.record(started.elapsed());
    result
}

/// The durations of every segment fdatasync of this process so far.
pub fn fsync_histogram() -> FsyncHistogram {
    GLOBAL.snapshot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_infinity() {
        let recorder = Recorder::new();
        recorder.record(Duration::from_micros(10)); // ≤ 50 µs
        recorder.record(Duration::from_micros(50)); // exactly on a bound
        recorder.record(Duration::from_millis(3)); // ≤ 5 ms
        recorder.record(Duration::from_secs(60)); // +Inf
        let snapshot = recorder.snapshot();
        assert_eq!(snapshot.count, 4);
        assert!((snapshot.sum_seconds - 60.003_06).abs() < 1e-9);
        assert_eq!(snapshot.buckets.len(), FSYNC_BUCKETS_SECONDS.len() + 1);
        assert_eq!(snapshot.buckets[0], (0.000_05, 2));
        let at = |bound: f64| {
            snapshot
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, c)| *c)
        };
        assert_eq!(at(0.002_5), Some(2));
        assert_eq!(at(0.005), Some(3));
        assert_eq!(at(10.0), Some(3));
        assert_eq!(snapshot.buckets.last(), Some(&(f64::INFINITY, 4)));
        assert!(snapshot.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn every_log_fdatasync_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = fsync_histogram().count;
        let log = crate::Log::open(dir.path(), crate::LogConfig::default()).expect("open");
        log.append(&crate::BatchInput::new(vec![crate::RecordInput::new(
            &b"x"[..],
        )]))
        .expect("append");
        // Other tests sync concurrently: at least this append's fsync.
        let after = fsync_histogram();
        assert!(after.count > before);
        assert_eq!(after.buckets.last().map(|b| b.0), Some(f64::INFINITY));
    }
}
