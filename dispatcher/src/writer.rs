//! The durable writer: appends the dispatcher decided on, written and made
//! durable off the dispatcher's thread.
//!
//! The dispatcher decides what to append (due delayed messages, dead-letter
//! copies) and hands each partition's batch to a [`DurableWriter`] as a
//! [`WriteJob`]; it learns the outcome from a [`WriteDone`] on a later poll,
//! and only then records what depends on the append (a delay's fired mark,
//! a dead letter's ack, their trace events). The
//! encoding, the CRC, the copy into the page cache and the fdatasync then
//! cost the dispatcher's thread nothing: it goes on delivering while the
//! disk works.
//!
//! Two writers:
//! - [`InlineWriter`]: appends and waits inside `submit`, on the caller's
//!   thread; the outcome is ready at once. The default, so that a
//!   simulation stays deterministic and a test sees the append done when
//!   the call that decided it returns.
//! - [`BackgroundWriter`]: one OS thread (`dmq-writer`) that takes every
//!   queued job, appends them all, then waits for each to be durable (jobs
//!   of one log share its group commit), sends the outcomes and calls the
//!   owner's wake-up.
//!
//! # Invariants
//! - Jobs are written in the order they were submitted (one writer,
//!   first in first out), so one partition's messages keep their order
//!   across jobs.
//! - A [`WriteDone`] reports success only once its batch meets its log's
//!   fsync policy and, for a job with `flush`, after an fdatasync whatever
//!   the policy: the caller may then make durable what depends on it.
//! - A failed job gives its records back unchanged, to be written again.
//! - After a job of a log fails, every later job of that log fails
//!   unwritten ([`WriteError::EarlierFailed`]) until a job marked `retry`
//!   arrives for it: a retry never lands behind messages submitted after
//!   the ones it retries, so a partition's order survives a full disk. The
//!   caller submits `retry` jobs only once nothing it submitted earlier is
//!   still in flight.

use std::sync::mpsc;
use std::sync::Arc;

use dmq_log_store::{AppendInfo, BatchInput, MessageId, RecordInput};

use crate::storage::{AppendedRecords, PartitionLog, StoreError};

/// At most this many queued jobs are written in one round of the
/// background writer (one durability wait per log per round).
const JOBS_PER_ROUND: usize = 1024;

/// What a [`WriteJob`] does to its log.
#[derive(Debug)]
pub enum WriteWork {
    /// Append these records (ids set), then wait for their durability.
    Append(BatchInput),
    /// The submitter appended already (`append_deferred`, on its own
    /// thread, to keep its order with other appends): only wait for that
    /// batch's durability.
    Wait(AppendInfo),
}

/// One batch for one partition log.
#[derive(Debug)]
pub struct WriteJob {
    /// Chosen by the submitter; comes back in the [`WriteDone`].
    pub ticket: u64,
    /// Where the batch goes.
    pub log: Arc<dyn PartitionLog>,
    /// Append and wait, or only wait.
    pub work: WriteWork,
    /// fdatasync after the append whatever the log's policy (the records
    /// were durable elsewhere and must not become a copy a power loss can
    /// take back).
    pub flush: bool,
    /// This job retries records of a failed job: it lifts the log's
    /// failed state (see the module's invariants).
    pub retry: bool,
}

/// Why a job was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The append or the durability wait failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not tried: an earlier job of the same log failed and no retry came
    /// since.
    #[error("not written: an earlier append to this partition failed")]
    EarlierFailed,
}

/// A job that was not written: why, and its records back.
pub type WriteFailure = (WriteError, Vec<RecordInput>);

/// The outcome of one [`WriteJob`].
#[derive(Debug)]
pub struct WriteDone {
    /// The job's ticket.
    pub ticket: u64,
    /// (offset, id) per record, or why not and the records back.
    pub result: Result<Vec<(u64, MessageId)>, WriteFailure>,
}

/// Takes jobs; their outcomes arrive on the channel given at creation.
pub trait DurableWriter: Send + std::fmt::Debug {
    /// Queues (or does) one job.
    fn submit(&mut self, job: WriteJob);
}

/// Writes each job on the caller's thread, in `submit`.
#[derive(Debug)]
pub struct InlineWriter {
    done: mpsc::Sender<WriteDone>,
    failed: FailedLogs,
}

impl InlineWriter {
    /// A writer whose outcomes go to `done`.
    pub fn new(done: mpsc::Sender<WriteDone>) -> InlineWriter {
        InlineWriter {
            done,
            failed: FailedLogs::default(),
        }
    }
}

impl DurableWriter for InlineWriter {
    fn submit(&mut self, job: WriteJob) {
        let mut round = Round::default();
        round.write(job, &mut self.failed);
        // The receiver lives in the same owner as this writer.
        for done in round.finish() {
            let _ = self.done.send(done);
        }
    }
}

/// Writes jobs on its own thread; see the module docs.
#[derive(Debug)]
pub struct BackgroundWriter {
    jobs: Option<mpsc::Sender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundWriter {
    /// Starts the `dmq-writer` thread. Outcomes go to `done`; `wake` is
    /// called after each round's outcomes were sent.
    pub fn start(
        done: mpsc::Sender<WriteDone>,
        wake: Box<dyn Fn() + Send>,
    ) -> std::io::Result<BackgroundWriter> {
        let (jobs, queue) = mpsc::channel::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name("dmq-writer".into())
            .spawn(move || {
                let mut failed = FailedLogs::default();
                while let Ok(first) = queue.recv() {
                    let mut round = Round::default();
                    round.write(first, &mut failed);
                    for job in queue.try_iter().take(JOBS_PER_ROUND - 1) {
                        round.write(job, &mut failed);
                    }
                    for outcome in round.finish() {
                        if done.send(outcome).is_err() {
                            return;
                        }
                    }
                    wake();
                }
            })?;
        Ok(BackgroundWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }
}

impl DurableWriter for BackgroundWriter {
    fn submit(&mut self, job: WriteJob) {
        if let Some(jobs) = &self.jobs {
            // The thread ends only when this sender is dropped (or the
            // outcome receiver is gone, with its owner).
            let _ = jobs.send(job);
        }
    }
}

impl Drop for BackgroundWriter {
    /// Lets the thread finish the queued jobs, then joins it.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Logs whose last job failed, until a retry job for them.
#[derive(Debug, Default)]
struct FailedLogs(Vec<Arc<dyn PartitionLog>>);

impl FailedLogs {
    fn contains(&self, log: &Arc<dyn PartitionLog>) -> bool {
        self.0.iter().any(|l| Arc::ptr_eq(l, log))
    }

    fn insert(&mut self, log: &Arc<dyn PartitionLog>) {
        if !self.contains(log) {
            self.0.push(Arc::clone(log));
        }
    }

    fn remove(&mut self, log: &Arc<dyn PartitionLog>) {
        self.0.retain(|l| !Arc::ptr_eq(l, log));
    }
}

/// Jobs appended in one round, waiting for their durability.
#[derive(Default)]
struct Round {
    written: Vec<(WriteJob, Result<dmq_log_store::AppendInfo, WriteError>)>,
}

impl Round {
    /// Appends one job (or fails it at once, see [`FailedLogs`]).
    fn write(&mut self, job: WriteJob, failed: &mut FailedLogs) {
        if job.retry {
            failed.remove(&job.log);
        }
        let appended = match &job.work {
            WriteWork::Wait(info) => Ok(info.clone()),
            WriteWork::Append(_) if failed.contains(&job.log) => Err(WriteError::EarlierFailed),
            WriteWork::Append(batch) => job.log.append_batch_deferred(batch).map_err(|error| {
                failed.insert(&job.log);
                WriteError::Store(error)
            }),
        };
        self.written.push((job, appended));
    }

    /// Waits for every appended job's durability (and flushes, once per
    /// log), in append order; returns the outcomes in that order.
    fn finish(self) -> Vec<WriteDone> {
        let mut flushed: Vec<Arc<dyn PartitionLog>> = Vec::new();
        let mut outcomes = Vec::with_capacity(self.written.len());
        for (job, appended) in self.written {
            let durable = appended.and_then(|info| {
                job.log.wait_durable(&info)?;
                if job.flush && !flushed.iter().any(|l| Arc::ptr_eq(l, &job.log)) {
                    job.log.flush()?;
                    flushed.push(Arc::clone(&job.log));
                }
                Ok(info.records())
            });
            outcomes.push(WriteDone {
                ticket: job.ticket,
                result: durable.map_err(|error| {
                    let records = match job.work {
                        WriteWork::Append(batch) => batch.records,
                        WriteWork::Wait(_) => Vec::new(),
                    };
                    (error, records)
                }),
            });
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStorage, Storage};
    use bytes::Bytes;
    use dmq_log_store::ManualClock;
    use std::time::Duration;

    fn job(
        ticket: u64,
        log: &Arc<dyn PartitionLog>,
        values: &[&'static str],
        retry: bool,
    ) -> WriteJob {
        WriteJob {
            ticket,
            log: Arc::clone(log),
            work: WriteWork::Append(BatchInput::new(
                values
                    .iter()
                    .map(|v| RecordInput::new(Bytes::from_static(v.as_bytes())))
                    .collect(),
            )),
            flush: false,
            retry,
        }
    }

    fn values(log: &Arc<dyn PartitionLog>) -> Vec<Bytes> {
        log.read(0, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.value)
            .collect()
    }

    fn memory_log() -> (Arc<MemoryStorage>, Arc<dyn PartitionLog>) {
        let storage = Arc::new(MemoryStorage::new(Arc::new(ManualClock::new(1_000))));
        let log = storage.partition("t", 0).unwrap();
        (storage, log)
    }

    #[test]
    fn background_writer_writes_in_submit_order_and_wakes() {
        let (_storage, log) = memory_log();
        let (done_tx, done_rx) = mpsc::channel();
        let (wake_tx, wake_rx) = mpsc::channel();
        let mut writer = BackgroundWriter::start(
            done_tx,
            Box::new(move || {
                let _ = wake_tx.send(());
            }),
        )
        .unwrap();
        writer.submit(job(1, &log, &["a", "b"], false));
        writer.submit(job(2, &log, &["c"], false));
        wake_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut outcomes: Vec<WriteDone> = Vec::new();
        while outcomes.len() < 2 {
            outcomes.push(done_rx.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        assert_eq!(outcomes[0].ticket, 1);
        assert_eq!(outcomes[1].ticket, 2);
        let offsets: Vec<u64> = outcomes
            .iter()
            .flat_map(|o| o.result.as_ref().unwrap().iter().map(|(offset, _)| *offset))
            .collect();
        assert_eq!(offsets, vec![0, 1, 2]);
        drop(writer);
        assert_eq!(values(&log), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_failed_log_refuses_later_jobs_until_a_retry() {
        let (storage, log) = memory_log();
        let (done_tx, done_rx) = mpsc::channel();
        let mut writer = InlineWriter::new(done_tx);
        storage.set_logs_full(true);
        writer.submit(job(1, &log, &["a"], false));
        storage.set_logs_full(false);
        // Room again, but job 2 must not land before job 1's retry.
        writer.submit(job(2, &log, &["b"], false));
        let first = done_rx.try_recv().unwrap();
        let second = done_rx.try_recv().unwrap();
        let Err((WriteError::Store(_), records)) = first.result else {
            panic!("job 1 should fail on the full disk");
        };
        assert_eq!(records.len(), 1);
        assert!(matches!(second.result, Err((WriteError::EarlierFailed, _))));
        assert!(values(&log).is_empty());
        writer.submit(job(3, &log, &["a", "b"], true));
        assert!(done_rx.try_recv().unwrap().result.is_ok());
        writer.submit(job(4, &log, &["c"], false));
        assert!(done_rx.try_recv().unwrap().result.is_ok());
        assert_eq!(values(&log), vec!["a", "b", "c"]);
    }
}
