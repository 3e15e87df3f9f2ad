//! The engine: the dispatcher on its own thread, and the topics' handles.
//!
//! The [`Dispatcher`] is a single-threaded state machine; it lives on one OS
//! thread (`dmq-dispatcher`) and every session talks to it with closures sent
//! over a channel ([`Engine::call`]). After every batch of calls, and at the
//! dispatcher's next wake-up time, the thread polls the dispatcher, routes
//! the deliveries to the sessions' channels, and answers the FETCHes parked
//! on it ([`Routes::wait_fetch`]) whose members now have deliveries: a FETCH
//! is woken by what woke the dispatcher, never by polling.
//!
//! On a cluster node ([`Engine::start_with`]) the dispatcher runs on the
//! cluster's storage (cluster topics' partitions are Raft replicas) and is
//! woken when a replica commits records.
//!
//! Produce does **not** go through that thread: the produce pipeline
//! (`crate::produce`) appends to the partition logs through each topic's
//! [`TopicHandle`] (router and logs shared with the dispatcher), so appends
//! from every connection share group commits, and only then wakes the
//! dispatcher. Delayed records go to the dispatcher's delay store.
//!
//! Nor do fired delays: the dispatcher hands each partition's batch of due
//! messages to its background writer (`dmq-writer`, see
//! [`dmq_dispatcher::writer`]), which appends and waits for durability off
//! this thread and then wakes it ([`Command::Wake`]) so that the next poll
//! records the outcome. The writer holds only a `Weak` of the command
//! sender: dropping every [`Engine`] still ends the thread.
//!
//! Every message event of the dispatcher goes to the [`Telemetry`] sink,
//! which only buffers it; the thread calls [`Telemetry::flush`] after each
//! loop iteration, handing the iteration's events to the telemetry thread
//! (trace, statistics, metrics) in one batch. The telemetry stops after the
//! dispatcher, so the final checkpoint's events are counted too.
//!
//! Deliveries leave the thread in batches: one `Vec` per member per poll,
//! so a burst costs one channel send and one task wake-up, not one per
//! message.
//!
//! Invariant: a delivery is routed only to the session that joined its
//! member; if that session is gone or its queue is full (more than
//! [`DeliverySink`]'s bound of deliveries not yet written to the socket),
//! the message is handed back to the group at once (member left / nack
//! without delay).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use dmq_dispatcher::{
    Delivery, DispatchError, Dispatcher, FileStorage, MemberId, PartitionLog, Router, Storage,
    TopicConfig,
};
use dmq_log_store::{Clock, SystemClock};
use dmq_protocol::{ProduceOk, ProducedRecord};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::cluster::Cluster;
use crate::config::BrokerConfig;
use crate::dedup::{DedupKey, DedupWindow};
use crate::telemetry::{Telemetry, TelemetryError};

type Job = Box<dyn FnOnce(&mut Dispatcher, &mut Routes) + Send>;

enum Command {
    Call(Job),
    Wake,
    Shutdown,
}

/// Where one member's deliveries go: batches on a channel, with a bound on
/// the deliveries queued in total (sent, not yet written to the socket).
pub struct DeliverySink {
    sender: async_mpsc::Sender<Vec<Delivery>>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl DeliverySink {
    /// A sink of at most `max_queued` queued deliveries; the receiver
    /// releases them with [`Queued::release`] once they are written.
    pub fn new(max_queued: usize) -> (DeliverySink, async_mpsc::Receiver<Vec<Delivery>>, Queued) {
        let max_queued = max_queued.max(1);
        // Every batch holds at least one delivery: the channel is never the
        // tighter bound.
        let (sender, receiver) = async_mpsc::channel(max_queued);
        let queued = Arc::new(AtomicUsize::new(0));
        let sink = DeliverySink {
            sender,
            queued: Arc::clone(&queued),
            max_queued,
        };
        (sink, receiver, Queued(queued))
    }
}

/// The count of a [`DeliverySink`]'s queued deliveries, held by the side
/// that writes them out.
#[derive(Debug, Clone)]
pub struct Queued(Arc<AtomicUsize>);

impl Queued {
    /// `count` deliveries left the queue (written, or dropped with the
    /// connection).
    pub fn release(&self, count: usize) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(count))
            });
    }
}

/// Where each member's deliveries go, and the FETCHes waiting for one.
#[derive(Default)]
pub struct Routes {
    sinks: HashMap<MemberId, DeliverySink>,
    fetches: HashMap<MemberId, WaitingFetch>,
    /// Connections that answer check-backs, by producer group, each with
    /// its listener id; the next check of a group goes to the next one.
    listeners: HashMap<String, (usize, Vec<(u64, CheckSink)>)>,
}

/// Where a check-back goes: a connection's push queue. False if the
/// connection is gone or its queue is full (the check is then "unknown").
pub type CheckSink = Box<dyn Fn(&dmq_dispatcher::TxnCheck) -> bool + Send>;

/// A FETCH that found nothing and waits: answered by the dispatcher
/// thread after the first poll that has something for its member.
pub struct WaitingFetch {
    /// Most deliveries the FETCH takes.
    pub max: u32,
    /// The answer's frame limit.
    pub max_frame_bytes: u32,
    /// Where its deliveries go.
    pub reply: oneshot::Sender<Vec<dmq_protocol::Delivery>>,
}

impl Routes {
    /// Sends `member`'s deliveries to `sink`.
    pub fn insert(&mut self, member: MemberId, sink: DeliverySink) {
        self.sinks.insert(member, sink);
    }

    /// Stops routing to `member` (its waiting FETCH ends empty).
    pub fn remove(&mut self, member: MemberId) {
        self.sinks.remove(&member);
        self.fetches.remove(&member);
    }

    /// Parks a FETCH of `member` until it has deliveries; a FETCH already
    /// waiting for the member ends empty.
    pub fn wait_fetch(&mut self, member: MemberId, fetch: WaitingFetch) {
        self.fetches.insert(member, fetch);
    }

    /// Ends `member`'s waiting FETCH (its deadline passed).
    pub fn cancel_fetch(&mut self, member: MemberId) {
        self.fetches.remove(&member);
    }

    /// Listener `id` answers the check-backs of `group` (TXN_LISTEN).
    pub fn listen(&mut self, group: String, id: u64, sink: CheckSink) {
        let (_, listeners) = self.listeners.entry(group).or_default();
        listeners.retain(|(listener, _)| *listener != id);
        listeners.push((id, sink));
    }

    /// Listener `id` is gone (its connection closed).
    pub fn unlisten(&mut self, id: u64) {
        for (_, listeners) in self.listeners.values_mut() {
            listeners.retain(|(listener, _)| *listener != id);
        }
        self.listeners
            .retain(|_, (_, listeners)| !listeners.is_empty());
    }

    /// Sends `check` to one listener of its group, round robin; a listener
    /// whose connection is gone is dropped and the next one tried. False
    /// if no listener took it.
    fn send_check(&mut self, check: &dmq_dispatcher::TxnCheck) -> bool {
        let Some((next, listeners)) = self.listeners.get_mut(&check.group) else {
            return false;
        };
        for _ in 0..listeners.len() {
            let index = *next % listeners.len();
            *next = next.wrapping_add(1);
            if (listeners[index].1)(check) {
                return true;
            }
        }
        false
    }
}

/// Errors of engine calls.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The dispatcher refused or failed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The engine is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be opened.
    #[error(transparent)]
    Store(#[from] dmq_dispatcher::StoreError),
    /// The dispatcher state could not be restored.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The dispatcher thread could not start.
    #[error("starting the dispatcher thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The trace log or the statistics could not be opened.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// The topics' partition logs, shared with every session for produce.
pub type PartitionMap = HashMap<String, TopicHandle>;

/// What a producer needs of a topic without a hop to the dispatcher thread:
/// its configuration, its router (shared with the dispatcher: one
/// round-robin counter per topic) and its partition logs.
#[derive(Clone)]
pub struct TopicHandle {
    /// The topic's settings.
    pub config: TopicConfig,
    /// The topic's one partition router.
    pub router: Arc<Router>,
    /// The partition logs, by partition number.
    pub logs: Vec<Arc<dyn PartitionLog>>,
}

impl TopicHandle {
    /// The handle of an existing topic of `dispatcher`.
    pub fn of(dispatcher: &Dispatcher, name: &str) -> Result<TopicHandle, DispatchError> {
        Ok(TopicHandle {
            config: dispatcher.topic_config(name)?,
            router: dispatcher.router(name)?,
            logs: dispatcher.partitions(name)?,
        })
    }
}

/// Handle to the dispatcher thread. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    /// Shared so that the dispatcher's writer can wake the thread without
    /// keeping it alive (it holds a `Weak`): dropping every `Engine` still
    /// ends the thread.
    commands: Arc<mpsc::Sender<Command>>,
    partitions: Arc<RwLock<PartitionMap>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    producers: ProducerWindow,
    /// Idempotent batches admitted and not yet answered.
    in_flight: Arc<crate::produce::InFlightSequences>,
    telemetry: Telemetry,
    /// The node's cluster side (`None`: a single node).
    cluster: Option<Arc<Cluster>>,
}

/// Dedup window of idempotent producers (bounded, see [`DedupWindow`]).
/// Rebuilt from the logs at start.
pub type ProducerWindow = Arc<Mutex<DedupWindow>>;

/// How many offsets at the end of each partition are searched for producer
/// sequences when the broker starts: a producer that retries a batch after a
/// restart gets its original offsets back if the batch is in this window.
pub const PRODUCER_WINDOW_OFFSETS: u64 = 100_000;

/// How long [`Engine::find_topic`] waits for a cluster topic the metadata
/// group holds to be opened on this node (its follow loop opens new
/// topics every 100 ms).
pub const TOPIC_ARRIVAL_WAIT: Duration = Duration::from_secs(3);

/// The PRODUCE answer of a batch stored in `partition` from `base_offset`
/// with these ids, as the dedup window keeps it.
fn stored_answer(partition: u32, base_offset: u64, ids: &[dmq_log_store::MessageId]) -> ProduceOk {
    ProduceOk {
        records: ids
            .iter()
            .enumerate()
            .map(|(i, id)| ProducedRecord {
                partition,
                offset: Some(base_offset + i as u64),
                message_id: dmq_protocol::MessageId(id.0),
                deliver_at_ms: None,
            })
            .collect(),
    }
}

fn rebuild_producer_window(
    partitions: &PartitionMap,
    config: &BrokerConfig,
) -> Result<DedupWindow, StartError> {
    // Per (topic, producer), per sequence: its answer parts (partition,
    // answer), one per partition the batch was stored in.
    let mut found: HashMap<DedupKey, std::collections::BTreeMap<u64, Vec<ProduceOk>>> =
        HashMap::new();
    for (topic, handle) in partitions {
        for (partition, log) in handle.logs.iter().enumerate() {
            let from = log.end_offset().saturating_sub(PRODUCER_WINDOW_OFFSETS);
            for batch in log.producer_batches(from)? {
                let response = stored_answer(partition as u32, batch.base_offset, &batch.ids);
                found
                    .entry((topic.clone(), batch.producer_id))
                    .or_default()
                    .entry(batch.producer_seq)
                    .or_default()
                    .push(response);
            }
        }
    }
    // A batch whose keys spread it over several partitions was stored in
    // parts; the window cannot rebuild its whole answer in request order, so
    // it forgets it: a retry of such a batch after a restart is stored again
    // (at least once), never answered with a partial result.
    let mut bounded =
        DedupWindow::new(config.producer_window_max, config.producer_window_bytes_max);
    // In order: the window keeps the latest and raises the floor past
    // those it drops.
    for (key, sequences) in found {
        for (sequence, mut parts) in sequences {
            if parts.len() == 1 {
                bounded.insert(key.clone(), sequence, parts.remove(0));
            }
        }
    }
    Ok(bounded)
}

/// Feeds `window` with every idempotent producer's batch this node's
/// cluster replicas apply (committed on a quorum), whichever node took it:
/// a producer that retries a batch through another node (its connection
/// lost, its node down) gets its original offsets and ids there instead of
/// a second copy. A batch that spans partitions is learned one part at a
/// time, and a part is not a whole answer: `produce::admit` answers a retry
/// from the window only when the answer holds as many records as the
/// retry.
fn learn_committed_producer_batches(cluster: &Cluster, window: &ProducerWindow) {
    let window = Arc::downgrade(window);
    cluster
        .storage()
        .set_producer_batch_listener(Arc::new(move |topic, partition, batches| {
            let Some(window) = window.upgrade() else {
                return;
            };
            let mut window = window.lock().unwrap_or_else(|p| p.into_inner());
            for batch in batches {
                let answer = stored_answer(partition, batch.base_offset, &batch.ids);
                window.learn(
                    (topic.to_string(), batch.producer_id),
                    batch.producer_seq,
                    answer,
                );
            }
        }));
}

impl Engine {
    /// Opens the data directory and starts the dispatcher thread.
    pub fn start(config: &BrokerConfig) -> Result<Engine, StartError> {
        Engine::start_with(config, None)
    }

    /// [`Engine::start`] of a cluster node: the dispatcher runs on the
    /// cluster's storage (cluster topics' partitions are replicas), and
    /// is woken when a replica commits records.
    pub fn start_with(
        config: &BrokerConfig,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Engine, StartError> {
        let log_config = config.log_config()?;
        dmq_log_store::resources::set_max_open_files(config.max_open_files);
        dmq_log_store::resources::set_max_mapped_segments(config.max_mapped_segments);
        let storage: Arc<dyn Storage> = match &cluster {
            Some(cluster) => Arc::clone(cluster.storage()) as Arc<dyn Storage>,
            None => Arc::new(FileStorage::new(&config.data_dir, log_config)?),
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let telemetry = Telemetry::open(&config.data_dir, config.telemetry_config())?;
        let (commands, receiver) = mpsc::channel();
        let commands = Arc::new(commands);
        if let Some(cluster) = &cluster {
            // Before the dispatcher loads its groups: a journal change is
            // either applied before a group reads its journal, or merged
            // into the loaded group after (the jobs wait in the channel
            // until the dispatcher thread runs).
            merge_replicated_acks(cluster, &commands);
        }
        let mut dispatcher = Dispatcher::open(
            storage,
            clock.clone(),
            telemetry.event_sink(),
            config.dispatcher_config(),
        )?;
        let mut map = PartitionMap::new();
        for (name, _) in dispatcher.topics() {
            let handle = TopicHandle::of(&dispatcher, &name)?;
            map.insert(name, handle);
        }
        let producers: ProducerWindow =
            Arc::new(Mutex::new(rebuild_producer_window(&map, config)?));
        let partitions = Arc::new(RwLock::new(map));
        let wake_commands = Arc::downgrade(&commands);
        // Fired delays are written on the `dmq-writer` thread; its outcomes
        // wake this one.
        dispatcher.write_in_background(Box::new(move || {
            if let Some(commands) = wake_commands.upgrade() {
                let _ = commands.send(Command::Wake);
            }
        }))?;
        let thread_telemetry = telemetry.clone();
        let thread = std::thread::Builder::new()
            .name("dmq-dispatcher".into())
            .spawn(move || run(dispatcher, clock, receiver, thread_telemetry))?;
        if let Some(cluster) = &cluster {
            cluster.delays().trace_to(telemetry.event_sink());
            let wake_commands = Arc::downgrade(&commands);
            cluster.storage().set_commit_listener(Arc::new(move |_| {
                if let Some(commands) = wake_commands.upgrade() {
                    let _ = commands.send(Command::Wake);
                }
            }));
            learn_committed_producer_batches(cluster, &producers);
        }
        Ok(Engine {
            commands,
            partitions,
            producers,
            in_flight: Arc::default(),
            thread: Arc::new(Mutex::new(Some(thread))),
            telemetry,
            cluster,
        })
    }

    /// The trace, statistics and metrics.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The node's cluster side, if it runs in a cluster.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Runs `job` on the dispatcher thread and returns its result.
    pub async fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Dispatcher, &mut Routes) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |dispatcher, routes| {
            let _ = reply.send(job(dispatcher, routes));
        });
        self.commands
            .send(Command::Call(job))
            .map_err(|_| EngineError::ShuttingDown)?;
        result.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Queues `job` for the dispatcher thread without waiting for it: jobs
    /// run in the order they were queued, so a caller that answers through
    /// the job (a reply channel) keeps its requests in order without a
    /// round trip per request.
    pub fn submit(
        &self,
        job: impl FnOnce(&mut Dispatcher, &mut Routes) + Send + 'static,
    ) -> Result<(), EngineError> {
        self.commands
            .send(Command::Call(Box::new(job)))
            .map_err(|_| EngineError::ShuttingDown)
    }

    /// Tells the dispatcher that something changed (new records).
    pub fn wake(&self) {
        let _ = self.commands.send(Command::Wake);
    }

    /// The partition logs of `topic`, its router and its configuration.
    pub fn topic(&self, topic: &str) -> Option<TopicHandle> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// Like [`topic`](Self::topic), but a topic the dispatcher created by
    /// itself (a dead-letter topic, on its first dead letter) and the
    /// engine has not seen yet is looked up on the dispatcher thread and
    /// remembered. `None` only if the topic does not exist. On a cluster,
    /// a topic this node does not have open yet is asked of the metadata
    /// group (a read index: [`Cluster::topic_known_to_the_cluster`]); if
    /// the cluster has it, this waits up to [`TOPIC_ARRIVAL_WAIT`] for
    /// this node to open it.
    pub async fn find_topic(&self, name: &str) -> Option<TopicHandle> {
        if let Some(found) = self.find_topic_here(name).await {
            return Some(found);
        }
        // On a cluster, a topic created through another node is answered
        // there once the metadata group committed it, and this node creates
        // its replicas a moment later: a client told "created" must not be
        // told "unknown" by the next node it asks.
        let cluster = self.cluster()?;
        if !cluster.topic_known_to_the_cluster(name).await {
            return None;
        }
        let deadline = tokio::time::Instant::now() + TOPIC_ARRIVAL_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(found) = self.find_topic_here(name).await {
                return Some(found);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    topic = name,
                    "a cluster topic the metadata group holds is not open here yet"
                );
                return None;
            }
        }
    }

    /// [`Engine::find_topic`] without asking the cluster: the topics this
    /// node has open.
    async fn find_topic_here(&self, name: &str) -> Option<TopicHandle> {
        if let Some(found) = self.topic(name) {
            return Some(found);
        }
        let topic = name.to_string();
        let handle = self
            .call(move |dispatcher, _| TopicHandle::of(dispatcher, &topic).ok())
            .await
            .ok()??;
        self.register_topic(name.to_string(), handle.clone());
        Some(handle)
    }

    /// Records a topic's logs after it was created on the dispatcher thread.
    pub fn register_topic(&self, name: String, handle: TopicHandle) {
        self.partitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, handle);
    }

    /// Forgets a deleted topic.
    pub fn unregister_topic(&self, name: &str) {
        self.partitions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Idempotent batches admitted on this node and not yet answered
    /// (`crate::produce`).
    pub(crate) fn in_flight(&self) -> &Arc<crate::produce::InFlightSequences> {
        &self.in_flight
    }

    /// The idempotent producers' dedup window.
    pub fn producers(&self) -> &ProducerWindow {
        &self.producers
    }

    /// Stops the dispatcher thread after it made every ack durable, then
    /// the telemetry (trace written, statistics persisted).
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.telemetry.shutdown();
    }
}

fn run(
    mut dispatcher: Dispatcher,
    clock: Arc<dyn Clock>,
    commands: mpsc::Receiver<Command>,
    telemetry: Telemetry,
) {
    let mut routes = Routes::default();
    loop {
        let now = clock.now_ms();
        let wait_ms = dispatcher
            .next_wakeup_ms()
            .map_or(100, |due| (due - now).clamp(0, 100)) as u64;
        let first = match commands.recv_timeout(Duration::from_millis(wait_ms)) {
            Ok(command) => Some(command),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        dispatcher.begin_round();
        let mut shutdown = false;
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| commands.try_recv().ok()).take(1024))
        {
            match command {
                Command::Call(job) => job(&mut dispatcher, &mut routes),
                Command::Wake => {}
                Command::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            break;
        }
        match dispatcher.poll() {
            Ok(deliveries) => route(&mut dispatcher, &mut routes, deliveries),
            Err(error) => tracing::error!(%error, "dispatcher poll failed"),
        }
        for check in dispatcher.take_txn_checks() {
            if !routes.send_check(&check) {
                tracing::debug!(
                    group = %dmq_dispatcher::names::shown(&check.group),
                    handle = check.handle,
                    checks = check.checks,
                    "no live member of the producer group took a check-back"
                );
            }
        }
        answer_fetches(&mut dispatcher, &mut routes);
        telemetry.flush();
    }
    if let Err(error) = dispatcher.checkpoint() {
        tracing::error!(%error, "final checkpoint failed");
    }
    telemetry.flush();
    tracing::info!("dispatcher stopped");
}

/// Merges the acks of every replicated journal change another node made
/// into this node's copy of the group, and the deletions (tombstones) of
/// a cluster topic into this node's copy of the topic (cluster mode; see
/// `dmq_replication::journals`). The changes this process made are not
/// merged back: its groups already hold them, and merging them late could
/// undo a seek back made since. Those an earlier run of this node made are
/// merged: committed before the restart, they are re-applied while the
/// metadata group starts, before the dispatcher reads its journals;
/// committed after it (the node was killed with them in flight), its
/// groups lack them.
fn merge_replicated_acks(cluster: &Cluster, commands: &Arc<mpsc::Sender<Command>>) {
    let commands = Arc::downgrade(commands);
    let node_id = cluster.node_id();
    let journals = Arc::clone(cluster.journals());
    let listener: dmq_replication::JournalListener = Arc::new(move |origin, index, writes| {
        let Some(commands) = commands.upgrade() else {
            return;
        };
        // What this process proposed its groups hold; what an earlier run
        // of this node proposed and committed only after the restart
        // (killed with a proposal in flight) they do not.
        let own = origin == node_id && journals.take_own(writes);
        for write in writes {
            let payloads: Vec<Vec<u8>> = match &write.op {
                dmq_replication::JournalOp::Remove => continue,
                _ if own => Vec::new(),
                dmq_replication::JournalOp::Append(payloads)
                | dmq_replication::JournalOp::Rewrite(payloads)
                | dmq_replication::JournalOp::Compact {
                    snapshot: payloads, ..
                } => payloads.iter().map(|p| p.0.to_vec()).collect(),
            };
            let name = write.name.clone();
            let journals = Arc::clone(&journals);
            // In the dispatcher's order: once merged (or, for this
            // process's own, at once), the groups hold the journal up to
            // this entry, which the next compaction's snapshot covers.
            let job: Job = Box::new(move |dispatcher, _| {
                if !payloads.is_empty() {
                    if dmq_dispatcher::names::tombstone_journal_topic(&name).is_some() {
                        // A cluster topic's deletions made at another node.
                        dispatcher.merge_replicated_tombstones(&name, &payloads);
                    } else if let Err(error) = dispatcher.merge_replicated_acks(&name, &payloads) {
                        tracing::warn!(journal = %name, %error, "merging replicated acks");
                    }
                }
                journals.saw(&name, index);
            });
            let _ = commands.send(Command::Call(job));
        }
    });
    cluster
        .metadata()
        .state_machine()
        .set_journal_listener(listener);
}

/// Answers every waiting FETCH whose member has deliveries now. Runs after
/// each poll, so a FETCH is woken by what woke the dispatcher (a produce, a
/// nack, a timer), not by polling.
fn answer_fetches(dispatcher: &mut Dispatcher, routes: &mut Routes) {
    if routes.fetches.is_empty() {
        return;
    }
    let members: Vec<MemberId> = routes.fetches.keys().copied().collect();
    for member in members {
        let Some((max, max_frame_bytes)) = routes
            .fetches
            .get(&member)
            .map(|f| (f.max, f.max_frame_bytes))
        else {
            continue;
        };
        let deliveries =
            match crate::frame_limits::fetch_within(dispatcher, member, max, max_frame_bytes) {
                Ok(deliveries) if deliveries.is_empty() => continue,
                Ok(deliveries) => deliveries,
                Err(_) => {
                    // The member is gone: its FETCH ends empty.
                    routes.fetches.remove(&member);
                    continue;
                }
            };
        let Some(fetch) = routes.fetches.remove(&member) else {
            continue;
        };
        if let Err(deliveries) = fetch.reply.send(deliveries) {
            // The FETCH gave up meanwhile: the messages go back at once,
            // as the same attempt (nobody received them).
            for delivery in deliveries {
                let _ = dispatcher.return_unsent(member, delivery.partition, delivery.offset);
            }
        }
    }
}

fn route(dispatcher: &mut Dispatcher, routes: &mut Routes, deliveries: Vec<Delivery>) {
    // One batch per member, in delivery order (few members per poll: a
    // linear search beats a map).
    let mut batches: Vec<(MemberId, Vec<Delivery>)> = Vec::new();
    for delivery in deliveries {
        match batches
            .iter_mut()
            .find(|(member, _)| *member == delivery.member)
        {
            Some((_, batch)) => batch.push(delivery),
            None => batches.push((delivery.member, vec![delivery])),
        }
    }
    for (member, mut batch) in batches {
        let Some(sink) = routes.sinks.get(&member) else {
            let _ = dispatcher.leave(member);
            continue;
        };
        // Reserve room for the batch; what does not fit goes back.
        let queued = sink.queued.load(Ordering::Acquire);
        let room = sink.max_queued.saturating_sub(queued);
        let overflow = if batch.len() > room {
            batch.split_off(room)
        } else {
            Vec::new()
        };
        let mut refused = overflow;
        if !batch.is_empty() {
            let count = batch.len();
            sink.queued.fetch_add(count, Ordering::AcqRel);
            match sink.sender.try_send(batch) {
                Ok(()) => {}
                Err(async_mpsc::error::TrySendError::Full(batch)) => {
                    sink.queued.fetch_sub(count, Ordering::AcqRel);
                    refused.extend(batch);
                }
                Err(async_mpsc::error::TrySendError::Closed(_)) => {
                    routes.sinks.remove(&member);
                    let _ = dispatcher.leave(member);
                    continue;
                }
            }
        }
        // More deliveries than the session can queue: give them back.
        for delivery in refused {
            let _ = dispatcher.nack(member, delivery.partition, delivery.record.offset, Some(0));
        }
    }
}
