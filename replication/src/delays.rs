//! Delayed messages of cluster topics: one replicated timer log that every
//! node follows and the node leading it fires (docs/replication.md,
//! "Delayed messages").
//!
//! - **Schedule.** A delayed record for a cluster topic is appended, laid
//!   out as the dispatcher's delay store lays out its timer log
//!   ([`timer_record`]: the record plus its destination's headers), to the
//!   internal one-partition Raft group [`TIMER_TOPIC`], and answered once
//!   committed there (fsynced on a quorum). Nothing lives on one node's
//!   disk only.
//! - **Index.** Every node runs a [`DelayStore`] following its replica of
//!   that log ([`LAYOUT`], `followed`): its bucket journals and watermark
//!   are the node's own index of the replicated log, rebuilt from the log
//!   above the watermark after a restart.
//! - **Fire.** Only the node whose replica leads the timer group polls due
//!   delays. It writes each to its destination partition through that
//!   partition's Raft group (same id, `deliver_at` kept, so the record is
//!   delivered at once), then appends a *fired* settle marker to the timer
//!   log, then marks them fired. Every other node settles them when it
//!   follows the marker; a node that becomes leader fires what no marker
//!   settled.
//! - **Cancel.** A cancel is a *cancel-by-id* marker appended through any
//!   node: every store settles it where the log puts it, and the node
//!   asked answers whether the delay was still pending there.
//!
//! # Promises
//!
//! - A delayed produce to a cluster topic is answered once its record is
//!   committed in the timer group: the loss of any one node loses no
//!   pending delay; every node, and the cluster after a whole restart,
//!   fires it.
//! - At least once: a leader deposed after its destination writes and
//!   before its marker committed (or one that still believes it leads)
//!   fires again what the next leader fires. The copies share the
//!   message's id.
//! - A cancel racing with its delay's firing (milliseconds around the due
//!   time) may answer `true` on a node that has not yet followed the fired
//!   marker, although the message was delivered.
//!
//! # Invariants
//!
//! - Only this module writes the timer log, and only timer records and
//!   settle markers.
//! - A store that fails (a destination write, a marker, its journals) is
//!   dropped and reopened from disk: what it polled and did not mark fired
//!   is pending again, so nothing polled is forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmq_dispatcher::delay_store::{destination, settle_record, timer_record};
use dmq_dispatcher::storage::OpenedJournal;
use dmq_dispatcher::{
    DelayConfig, DelayLayout, DelayStore, DueMessage, PartitionLog, SettleKind, Settled, Storage,
    StoreError,
};
use dmq_log_store::{BatchInput, Clock, MessageId, RecordInput, SystemClock};
use tokio::runtime::Handle;

use crate::cluster_storage::ReplicatedPartitionLog;
use crate::{ClusterStorage, MetadataNode};

/// The timer log's internal topic (one partition, a Raft group of every
/// node).
pub const TIMER_TOPIC: &str = "__dmq_cluster_delay";

/// How a node's store of cluster delays is laid out: it follows
/// [`TIMER_TOPIC`], its journals apart from the node's own delay store's.
pub const LAYOUT: DelayLayout = DelayLayout {
    timer_topic: TIMER_TOPIC,
    bucket_prefix: "cluster-delay.bucket.",
    meta_journal: "cluster-delay.meta",
    followed: true,
};

/// Due delays polled at once by the leader.
const FIRE_BATCH_MAX: usize = 4096;
/// A destination write holds at most this many bytes of records.
const FIRE_WRITE_BYTES_MAX: usize = 1 << 20;
/// How long the leader sleeps at most between polls, and a follower
/// between follows.
const LEADER_POLL: Duration = Duration::from_millis(5);
const FOLLOWER_POLL: Duration = Duration::from_millis(20);
/// How often lazy index writes are made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Pause before reopening a store that failed.
const REOPEN_BACKOFF: Duration = Duration::from_millis(200);
/// Cancel outcomes kept for callers that ask after the marker was followed.
const OUTCOMES_KEPT: usize = 4096;
/// How long a cancel waits for its marker to be followed here.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Errors of cluster delays (all retryable as the client sees them,
/// except a refused record).
#[derive(Debug, thiserror::Error)]
pub enum DelaysError {
    /// The record cannot be scheduled (a reserved header, a bad topic
    /// name); nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// The timer group did not take the write, or the answer is unknown.
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Request {
    /// A cancel marker committed at `offset`: answer whether it settled a
    /// pending delay here, once followed.
    Cancelled {
        offset: u64,
        reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
    },
}

/// A node's side of cluster delays (see the module doc).
pub struct ReplicatedDelays {
    timer: Arc<ReplicatedPartitionLog>,
    requests: Mutex<Sender<Request>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for ReplicatedDelays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDelays").finish_non_exhaustive()
    }
}

impl ReplicatedDelays {
    /// Starts this node's replica of the timer group and the thread that
    /// follows it (and fires, while this node leads it).
    pub async fn start(
        storage: Arc<ClusterStorage>,
        metadata: Arc<MetadataNode>,
        config: DelayConfig,
    ) -> Result<Arc<ReplicatedDelays>, StoreError> {
        let timer = storage.internal_replica(TIMER_TOPIC).await?;
        let (requests, received) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let follower = Follower {
            storage: Arc::new(TimerStorage {
                timer: Arc::clone(&timer),
                cluster: Arc::clone(&storage),
            }),
            cluster: storage,
            metadata,
            timer: Arc::clone(&timer),
            config,
            runtime: Handle::current(),
            store: None,
            outcomes: VecDeque::new(),
            awaiting: HashMap::new(),
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new()
            .name("dmq-cluster-delays".into())
            .spawn(move || follower.run(received))
            .map_err(|error| {
                StoreError::Unavailable(format!("starting the delay thread: {error}"))
            })?;
        Ok(Arc::new(ReplicatedDelays {
            timer,
            requests: Mutex::new(requests),
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Proposes delayed records for `topic` (routed: partition and record)
    /// to the timer group now, so that one caller's schedules keep their
    /// order; the returned future answers their ids, in order, once
    /// committed.
    pub async fn propose(
        &self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
        now_ms: i64,
    ) -> Result<
        impl Future<Output = Result<Vec<MessageId>, StoreError>> + Send + 'static,
        DelaysError,
    > {
        let records = records
            .into_iter()
            .map(|(partition, record)| timer_record(topic, partition, record, now_ms))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DelaysError::Invalid(error.to_string()))?;
        let batch = BatchInput {
            producer_id: 0,
            producer_seq: 0,
            records,
        };
        let answer = self.timer.propose(&batch).await;
        Ok(async move { Ok(answer.await?.ids) })
    }

    /// Cancels delay `id` if it is a cluster delay still pending: true if
    /// it was (as this node's store saw it where the cancel landed in the
    /// timer log).
    pub async fn cancel(&self, id: MessageId) -> Result<bool, StoreError> {
        let marker = settle_record(SettleKind::Cancelled, &[Settled::by_id(id)]);
        let batch = BatchInput {
            producer_id: 0,
            producer_seq: 0,
            records: vec![marker],
        };
        let info = self.timer.write(&batch).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request::Cancelled {
                offset: info.base_offset,
                reply,
            });
        if sent.is_err() {
            return Err(StoreError::Unavailable("the delay thread stopped".into()));
        }
        match tokio::time::timeout(CANCEL_WAIT, answer).await {
            Ok(Ok(outcome)) => outcome,
            _ => Err(StoreError::Unavailable(
                "the cancel was written but not yet applied on this node: its outcome is unknown"
                    .into(),
            )),
        }
    }

    /// The topic delay `id` was scheduled for, from this node's replica of
    /// the timer log (blocking: a read). `None` if it holds no such delay.
    pub fn destination_of(&self, id: &MessageId) -> Result<Option<String>, StoreError> {
        Ok(self
            .timer
            .find_by_id(id)?
            .and_then(|record| destination(&record))
            .map(|(topic, _)| topic))
    }

    /// This node's replica of the timer group.
    pub fn timer(&self) -> &Arc<ReplicatedPartitionLog> {
        &self.timer
    }

    /// Stops the thread (its index made durable first). Blocking: call it
    /// from a blocking context.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the cluster delay thread panicked");
            }
        }
    }
}

/// The store's storage: the timer group's replica as its timer log, every
/// journal on the node's local storage (through the cluster storage).
#[derive(Debug)]
struct TimerStorage {
    timer: Arc<ReplicatedPartitionLog>,
    cluster: Arc<ClusterStorage>,
}

impl Storage for TimerStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError> {
        if (topic, partition) != (TIMER_TOPIC, 0) {
            return Err(StoreError::InvalidName(format!("{topic}/{partition}")));
        }
        Ok(Arc::clone(&self.timer) as Arc<dyn PartitionLog>)
    }

    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError> {
        self.cluster.open_journal(name)
    }

    fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
        self.cluster.remove_journal(name)
    }

    fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        Err(StoreError::InvalidName(topic.to_string()))
    }

    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.cluster.list_journals(prefix)
    }
}

/// The thread's state.
struct Follower {
    storage: Arc<TimerStorage>,
    cluster: Arc<ClusterStorage>,
    metadata: Arc<MetadataNode>,
    timer: Arc<ReplicatedPartitionLog>,
    config: DelayConfig,
    runtime: Handle,
    /// `None` until opened, and after a failure until reopened.
    store: Option<DelayStore>,
    /// Recent cancel markers followed here: (offset, settled a delay).
    outcomes: VecDeque<(u64, bool)>,
    /// Callers waiting for a cancel marker to be followed, by offset.
    awaiting: HashMap<u64, tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    stop: Arc<AtomicBool>,
}

impl Follower {
    fn run(mut self, requests: Receiver<Request>) {
        let mut last_checkpoint = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let now = SystemClock.now_ms();
            let leads = self.timer.node().leads();
            if let Err(error) = self.step(now, leads) {
                tracing::warn!(%error, "cluster delays: reopening the store");
                self.store = None;
                self.answer_unknown();
                std::thread::sleep(REOPEN_BACKOFF);
                continue;
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                last_checkpoint = Instant::now();
                if let Some(Err(error)) = self.store.as_mut().map(DelayStore::checkpoint) {
                    tracing::warn!(%error, "cluster delays: checkpoint failed; reopening");
                    self.store = None;
                }
            }
            let wait = match (&self.store, leads) {
                (Some(store), true) => store
                    .next_due_ms()
                    .map(|due| Duration::from_millis(due.saturating_sub(now).max(1) as u64))
                    .unwrap_or(LEADER_POLL)
                    .min(LEADER_POLL),
                _ => FOLLOWER_POLL,
            };
            match requests.recv_timeout(wait) {
                Ok(request) => self.take(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(request) = requests.try_recv() {
                self.take(request);
            }
        }
        if let Some(Err(error)) = self.store.as_mut().map(DelayStore::checkpoint) {
            tracing::warn!(%error, "cluster delays: the last checkpoint failed");
        }
    }

    /// Opens the store if need be, follows the log, answers cancels, and
    /// fires what is due if this node leads.
    fn step(&mut self, now: i64, leads: bool) -> Result<(), String> {
        if self.store.is_none() {
            match DelayStore::open_at(
                Arc::clone(&self.storage) as Arc<dyn Storage>,
                LAYOUT,
                self.config.clone(),
                now,
            ) {
                Ok((store, recovery)) => {
                    tracing::info!(?recovery, "cluster delays opened");
                    self.store = Some(store);
                }
                // The replica has not applied what it committed yet.
                Err(dmq_dispatcher::delay_store::DelayError::TimerBehind { .. }) => return Ok(()),
                Err(error) => return Err(error.to_string()),
            }
        }
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        let report = store.follow(now).map_err(|e| e.to_string())?;
        for (offset, settled) in report.cancels {
            match self.awaiting.remove(&offset) {
                Some(reply) => {
                    let _ = reply.send(Ok(settled));
                }
                None => {
                    if self.outcomes.len() == OUTCOMES_KEPT {
                        self.outcomes.pop_front();
                    }
                    self.outcomes.push_back((offset, settled));
                }
            }
        }
        if leads {
            self.fire(now)?;
        }
        Ok(())
    }

    fn take(&mut self, request: Request) {
        match request {
            Request::Cancelled { offset, reply } => {
                if let Some(at) = self.outcomes.iter().position(|(o, _)| *o == offset) {
                    let (_, settled) = self.outcomes.remove(at).unwrap_or((offset, false));
                    let _ = reply.send(Ok(settled));
                    return;
                }
                let followed = self
                    .store
                    .as_ref()
                    .is_some_and(|store| store.indexed_end() > offset);
                if followed {
                    // Followed by a store since reopened (its outcome was
                    // not reported), or long ago.
                    let _ = reply.send(Err(StoreError::Unavailable(
                        "the cancel was applied, but its outcome is not known here".into(),
                    )));
                    return;
                }
                self.awaiting.insert(offset, reply);
            }
        }
    }

    /// A store was dropped: the cancels waiting for it may have been
    /// followed by it without their outcome reaching them.
    fn answer_unknown(&mut self) {
        for (_, reply) in self.awaiting.drain() {
            let _ = reply.send(Err(StoreError::Unavailable(
                "the delay index was reopened: the cancel's outcome is unknown".into(),
            )));
        }
        self.outcomes.clear();
    }

    /// Fires up to [`FIRE_BATCH_MAX`] due delays: destination writes, then
    /// the fired marker, then the store's marks.
    fn fire(&mut self, now: i64) -> Result<(), String> {
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        let due = store
            .poll_due(now, FIRE_BATCH_MAX)
            .map_err(|e| e.to_string())?;
        if due.is_empty() {
            return Ok(());
        }
        let ids: Vec<MessageId> = due.iter().map(|message| message.id).collect();
        let settled = store.polled(&ids);
        let topics = self.metadata.topics_applied_here();
        let mut writes: BTreeMap<(String, u32), Vec<RecordInput>> = BTreeMap::new();
        for DueMessage {
            id,
            topic,
            partition,
            record,
            ..
        } in due
        {
            let exists = topics
                .get(&topic)
                .is_some_and(|spec| partition < spec.partitions);
            if !exists {
                tracing::warn!(topic, partition, %id, "delayed message for a deleted topic dropped");
                continue;
            }
            writes.entry((topic, partition)).or_default().push(record);
        }
        let cluster = Arc::clone(&self.cluster);
        let timer = Arc::clone(&self.timer);
        let written = self.runtime.block_on(async move {
            let mut answers = Vec::new();
            for ((topic, partition), records) in writes {
                let Some(replica) = cluster.replica(&topic, partition) else {
                    return Err(format!(
                        "partition {partition} of {topic} is not open on this node yet"
                    ));
                };
                for records in chunks_by_bytes(records) {
                    let batch = BatchInput {
                        producer_id: 0,
                        producer_seq: 0,
                        records,
                    };
                    answers.push(replica.propose(&batch).await);
                }
            }
            for answer in answers {
                answer.await.map_err(|e| e.to_string())?;
            }
            let marker = BatchInput {
                producer_id: 0,
                producer_seq: 0,
                records: vec![settle_record(SettleKind::Fired, &settled)],
            };
            timer.write(&marker).await.map_err(|e| e.to_string())?;
            Ok(())
        });
        written?;
        store.mark_fired(&ids).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// `records` split into writes of at most [`FIRE_WRITE_BYTES_MAX`] bytes
/// of keys, values and headers (at least one record each).
fn chunks_by_bytes(records: Vec<RecordInput>) -> Vec<Vec<RecordInput>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for record in records {
        let size = record.value.len()
            + record.key.as_ref().map_or(0, |key| key.len())
            + record
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        if !chunk.is_empty() && bytes + size > FIRE_WRITE_BYTES_MAX {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(record);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_split_by_bytes_and_keep_every_record_in_order() {
        let record = |n: usize| RecordInput::new(vec![n as u8; 300 * 1024]);
        let chunks = chunks_by_bytes((0..7).map(record).collect());
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let values: Vec<u8> = chunks.iter().flatten().map(|r| r.value[0]).collect();
        assert_eq!(values, (0..7).collect::<Vec<u8>>());
        // A record larger than the limit goes alone.
        let chunks = chunks_by_bytes(vec![RecordInput::new(vec![0u8; 2 << 20]), record(1)]);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1]);
        assert!(chunks_by_bytes(Vec::new()).is_empty());
    }
}
