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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmq_dispatcher::delay_store::{destination, settle_record, timer_record};
use dmq_dispatcher::storage::OpenedJournal;
use dmq_dispatcher::{
    DelayConfig, DelayLayout, DelayStore, DueMessage, Event, EventKind, EventSink, PartitionLog,
    SettleKind, Settled, Storage, StoreError,
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
/// How often the timer log's segments that no pending delay needs are
/// deleted (below the replica's purged rows only).
const RECLAIM_EVERY: Duration = Duration::from_secs(60);
/// Pause before reopening a store that failed.
const REOPEN_BACKOFF: Duration = Duration::from_millis(200);
/// Pause before firing again after a failed step: a destination write
/// whose answer was lost (its leader died) may yet be committed by the
/// partition's next leader, and the search for fired delays must see it.
const REFIRE_BACKOFF: Duration = Duration::from_secs(2);
/// Cancel outcomes kept for callers that ask after the marker was followed.
const OUTCOMES_KEPT: usize = 4096;
/// How long a cancel waits for its marker to be followed here.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// Destination records searched at most, per write, for delays another
/// leader may have fired already.
const FIRED_SCAN_MAX: usize = 65_536;

/// Pending delays per topic, as this node's store last counted them
/// (published after every change it follows or fires): what the
/// dispatcher's statistics add for cluster topics.
#[derive(Debug, Default)]
pub struct PendingCounts {
    by_topic: Mutex<CountsByTopic>,
}

/// topic -> (partition, pending delays) per partition with any.
type CountsByTopic = HashMap<Arc<str>, Vec<(u32, u64)>>;

impl PendingCounts {
    /// (partition, pending delays) of every partition of `topic` with any.
    pub fn in_topic(&self, topic: &str) -> Vec<(u32, u64)> {
        self.by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    fn publish(&self, store: Option<&DelayStore>) {
        let mut by_topic = CountsByTopic::new();
        for (topic, partition, count) in store
            .map(DelayStore::pending_everywhere)
            .unwrap_or_default()
        {
            by_topic.entry(topic).or_default().push((partition, count));
        }
        for counts in by_topic.values_mut() {
            counts.sort_unstable();
        }
        *self.by_topic.lock().unwrap_or_else(|p| p.into_inner()) = by_topic;
    }
}

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
    events: Arc<EventsSlot>,
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
        let counts = Arc::new(PendingCounts::default());
        storage.count_delays_from(Arc::clone(&counts));
        let events: Arc<EventsSlot> = Arc::default();
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
            events: Arc::clone(&events),
            at_risk_until: i64::MAX,
            led_term: None,
            fire_after: Instant::now(),
            counts,
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
            events,
            requests: Mutex::new(requests),
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Sends trace events (`delay_scheduled` and `delay_cancelled` on the
    /// node asked, `delay_fired` on the node that fired) to `sink`.
    pub fn trace_to(&self, sink: Arc<dyn EventSink>) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Proposes delayed records for `topic` (routed: partition and record)
    /// to the timer group now, so that one caller's schedules keep their
    /// order; the returned future answers their ids, in order, once
    /// committed.
    pub fn propose(
        &self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
        now_ms: i64,
    ) -> Result<
        impl Future<Output = Result<Vec<MessageId>, StoreError>> + Send + 'static,
        DelaysError,
    > {
        let mut places = Vec::with_capacity(records.len());
        let records = records
            .into_iter()
            .map(|(partition, record)| {
                places.push((partition, record.deliver_at_ms.unwrap_or(now_ms)));
                timer_record(topic, partition, record, now_ms)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DelaysError::Invalid(error.to_string()))?;
        let batch = BatchInput {
            producer_id: 0,
            producer_seq: 0,
            records,
        };
        let answer = self.timer.propose(&batch);
        let events = Arc::clone(&self.events);
        let topic: Arc<str> = Arc::from(topic);
        Ok(async move {
            let ids = answer.await?.info.ids;
            for (id, (partition, due_ms)) in ids.iter().zip(places) {
                emit(&events, || Event {
                    time_ms: SystemClock.now_ms(),
                    message_id: *id,
                    topic: Arc::clone(&topic),
                    partition: Some(partition),
                    offset: None,
                    group: None,
                    kind: EventKind::DelayScheduled { due_ms },
                    reason: None,
                });
            }
            Ok(ids)
        })
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
            Ok(Ok(Ok(true))) => {
                let topic = self.destination_of(&id).ok().flatten().unwrap_or_default();
                emit(&self.events, || Event {
                    time_ms: SystemClock.now_ms(),
                    message_id: id,
                    topic: Arc::from(topic),
                    partition: None,
                    offset: None,
                    group: None,
                    kind: EventKind::DelayCancelled,
                    reason: None,
                });
                Ok(true)
            }
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

/// Where trace events go, once the node's telemetry is up.
type EventsSlot = Mutex<Option<Arc<dyn EventSink>>>;

fn emit(slot: &EventsSlot, event: impl FnOnce() -> Event) {
    let sink = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(sink) = sink.filter(|sink| sink.enabled()) {
        sink.emit(event());
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
    /// Published after every step that changed the store.
    counts: Arc<PendingCounts>,
    events: Arc<EventsSlot>,
    /// Delays due at or before this may have been fired already, by
    /// another leader or by this node before its store was reopened (a
    /// write whose answer was lost): their destinations are searched for
    /// their ids before they are written. Set when the store opens and
    /// when this node starts a term as the leader.
    at_risk_until: i64,
    /// The term in which this node led the timer group at the last step.
    led_term: Option<u64>,
    /// No firing before this (see [`REFIRE_BACKOFF`]).
    fire_after: Instant,
    /// Recent cancel markers followed here: (offset, settled a delay).
    outcomes: VecDeque<(u64, bool)>,
    /// Callers waiting for a cancel marker to be followed, by offset.
    awaiting: HashMap<u64, tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    stop: Arc<AtomicBool>,
}

impl Follower {
    fn run(mut self, requests: Receiver<Request>) {
        let mut last_checkpoint = Instant::now();
        let mut last_reclaim = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let now = SystemClock.now_ms();
            // A new term of leadership (even one that follows this node's
            // own deposition between two loops): another leader may have
            // fired meanwhile.
            let term = self.timer.node().leading_term();
            if term.is_some() && term != self.led_term {
                self.at_risk_until = now;
            }
            self.led_term = term;
            let leads = term.is_some();
            match self.step(now, leads) {
                Ok(true) => self.counts.publish(self.store.as_ref()),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "cluster delays: reopening the store");
                    self.store = None;
                    self.fire_after = Instant::now() + REFIRE_BACKOFF;
                    self.answer_unknown();
                    std::thread::sleep(REOPEN_BACKOFF);
                    continue;
                }
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                last_checkpoint = Instant::now();
                if let Some(Err(error)) = self.store.as_mut().map(DelayStore::checkpoint) {
                    tracing::warn!(%error, "cluster delays: checkpoint failed; reopening");
                    self.store = None;
                }
            }
            if last_reclaim.elapsed() >= RECLAIM_EVERY {
                last_reclaim = Instant::now();
                match self.store.as_ref().map(DelayStore::reclaim) {
                    Some(Ok(segments @ 1..)) => {
                        tracing::info!(segments, "cluster delays: fired segments deleted");
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "cluster delays: deleting fired segments failed");
                    }
                    _ => {}
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
    /// fires what is due if this node leads. True if the store changed
    /// (opened, followed records, fired).
    fn step(&mut self, now: i64, leads: bool) -> Result<bool, String> {
        let mut changed = false;
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
                    self.at_risk_until = now;
                    changed = true;
                }
                // The replica has not applied what it committed yet.
                Err(dmq_dispatcher::delay_store::DelayError::TimerBehind { .. }) => {
                    return Ok(false)
                }
                Err(error) => return Err(error.to_string()),
            }
        }
        let Some(store) = self.store.as_mut() else {
            return Ok(false);
        };
        let report = store.follow(now).map_err(|e| e.to_string())?;
        changed |= report.records > 0;
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
        if leads && Instant::now() >= self.fire_after {
            changed |= self.fire(now)?;
        }
        Ok(changed)
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
    /// the fired marker and the store's marks for those whose write
    /// committed (and those whose topic is gone, dropped). True if any was
    /// due. A write that failed fails the step, so the store is reopened
    /// and its delays are pending again; only they fire again.
    fn fire(&mut self, now: i64) -> Result<bool, String> {
        let Some(store) = self.store.as_mut() else {
            return Ok(false);
        };
        if store.next_due_ms().is_none_or(|due| due > now) {
            return Ok(false);
        }
        // A fence, short of a real one: a quorum confirms this node still
        // leads (a node paused or cut off believes it leads until it hears
        // otherwise, and its writes to partitions led elsewhere would
        // commit). Nothing is polled unless it does.
        let timer = Arc::clone(&self.timer);
        let confirmed = self
            .runtime
            .block_on(async move { timer.node().raft().ensure_linearizable().await });
        if confirmed.is_err() {
            return Ok(false);
        }
        let due = store
            .poll_due(now, FIRE_BATCH_MAX)
            .map_err(|e| e.to_string())?;
        if due.is_empty() {
            return Ok(false);
        }
        let topics = self.metadata.topics_applied_here();
        let mut dropped = Vec::new();
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
                dropped.push(id);
                continue;
            }
            writes.entry((topic, partition)).or_default().push(record);
        }
        // Those another leader may have written already: not again.
        for ((topic, partition), records) in writes.iter_mut() {
            let at_risk: HashSet<MessageId> = records
                .iter()
                .filter(|r| r.deliver_at_ms.unwrap_or(i64::MIN) <= self.at_risk_until)
                .filter_map(|r| r.id)
                .collect();
            let since = records.iter().filter_map(|r| r.deliver_at_ms).min();
            let (Some(since), Some(replica)) = (since, self.cluster.replica(topic, *partition))
            else {
                continue;
            };
            if at_risk.is_empty() {
                continue;
            }
            let found = fired_already(&*replica, since, &at_risk).map_err(|e| e.to_string())?;
            if !found.is_empty() {
                tracing::info!(
                    topic,
                    partition,
                    count = found.len(),
                    "delays a previous leader fired: not written again"
                );
                records.retain(|r| r.id.is_none_or(|id| !found.contains(&id)));
                dropped.extend(found);
            }
        }
        writes.retain(|_, records| !records.is_empty());
        let fired: Vec<(MessageId, Arc<str>, u32)> = writes
            .iter()
            .flat_map(|((topic, partition), records)| {
                let topic: Arc<str> = Arc::from(topic.as_str());
                records
                    .iter()
                    .filter_map(move |r| Some((r.id?, Arc::clone(&topic), *partition)))
            })
            .collect();
        let cluster = Arc::clone(&self.cluster);
        let (mut done, failure) = self.runtime.block_on(async move {
            let mut answers = Vec::new();
            let mut failure = None;
            for ((topic, partition), records) in writes {
                let Some(replica) = cluster.replica(&topic, partition) else {
                    failure = Some(format!(
                        "partition {partition} of {topic} is not open on this node yet"
                    ));
                    continue;
                };
                for records in chunks_by_bytes(records) {
                    // Each fired record carries its id (`DueMessage`).
                    let ids: Vec<MessageId> = records.iter().filter_map(|r| r.id).collect();
                    let batch = BatchInput {
                        producer_id: 0,
                        producer_seq: 0,
                        records,
                    };
                    answers.push((ids, replica.propose(&batch)));
                }
            }
            let mut done = Vec::new();
            for (ids, answer) in answers {
                match answer.await {
                    Ok(_) => done.extend(ids),
                    Err(error) => failure = Some(error.to_string()),
                }
            }
            (done, failure)
        });
        done.extend(dropped);
        if !done.is_empty() {
            let marker = BatchInput {
                producer_id: 0,
                producer_seq: 0,
                records: vec![settle_record(SettleKind::Fired, &store.polled(&done))],
            };
            let timer = Arc::clone(&self.timer);
            self.runtime
                .block_on(async move { timer.write(&marker).await })
                .map_err(|e| format!("the fired marker: {e}"))?;
            store.mark_fired(&done).map_err(|e| e.to_string())?;
            let written: HashSet<MessageId> = done.iter().copied().collect();
            let time_ms = SystemClock.now_ms();
            for (id, topic, partition) in fired {
                if written.contains(&id) {
                    emit(&self.events, || Event {
                        time_ms,
                        message_id: id,
                        topic,
                        partition: Some(partition),
                        offset: None,
                        group: None,
                        kind: EventKind::DelayFired,
                        reason: None,
                    });
                }
            }
        }
        match failure {
            Some(error) => Err(format!("firing delays: {error}")),
            None => Ok(true),
        }
    }
}

/// Which of `wanted` are in `log` at or after the first record stamped
/// `since_ms` (a fired delay is appended no earlier than its due time);
/// searches at most [`FIRED_SCAN_MAX`] records.
fn fired_already(
    log: &dyn PartitionLog,
    since_ms: i64,
    wanted: &HashSet<MessageId>,
) -> Result<HashSet<MessageId>, StoreError> {
    let mut found = HashSet::new();
    let Some(mut offset) = log.offset_for_timestamp(since_ms)? else {
        return Ok(found);
    };
    let mut scanned = 0;
    while scanned < FIRED_SCAN_MAX && found.len() < wanted.len() {
        let records = log.read(offset, 4096)?;
        let Some(last) = records.last() else {
            break;
        };
        offset = last.offset + 1;
        scanned += records.len();
        found.extend(
            records
                .iter()
                .map(|record| record.id)
                .filter(|id| wanted.contains(id)),
        );
    }
    Ok(found)
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_fired_delay_is_found_in_its_destination_from_its_due_time() {
        use dmq_dispatcher::MemoryStorage;
        use dmq_log_store::ManualClock;
        let clock = Arc::new(ManualClock::new(10_000));
        let log = MemoryStorage::new(clock.clone())
            .partition("orders", 0)
            .unwrap();
        let fired = |n: u64| RecordInput {
            id: Some(MessageId::new(9_000, n)),
            ..RecordInput::new(format!("fired {n}"))
        };
        log.append(vec![RecordInput::new("before")]).unwrap();
        clock.advance_ms(1_000);
        log.append(vec![fired(1), RecordInput::new("other"), fired(2)])
            .unwrap();
        let wanted: HashSet<MessageId> = [1, 2, 3].map(|n| MessageId::new(9_000, n)).into();
        let found = fired_already(&*log, 10_500, &wanted).unwrap();
        assert_eq!(found, [1, 2].map(|n| MessageId::new(9_000, n)).into());
        // Nothing stamped since: nothing found.
        assert!(fired_already(&*log, 20_000, &wanted).unwrap().is_empty());
    }

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
