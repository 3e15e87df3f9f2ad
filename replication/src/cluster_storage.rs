//! A node's storage for its dispatcher when it runs in a cluster: cluster
//! topics' partitions are replicas of their Raft groups, everything else
//! stays local.
//!
//! [`ClusterStorage`] implements the dispatcher's [`Storage`]: topics
//! that are not cluster topics (internal ones, and dead-letter topics of
//! local topics) and journals other than the replicated ones
//! ([`crate::journals`]) go to the node's [`FileStorage`]; a cluster topic's partition
//! (one whose directory [`ClusterStorage::mark_replicated`] made under
//! `cluster/partitions/<topic>/`) is a [`ReplicatedPartitionLog`]: this
//! node's replica of the partition's Raft group, started on the node's
//! shared Raft port when first opened.
//!
//! # Invariants
//!
//! - The dispatcher reads a replicated partition only below its committed
//!   end (fsynced on a quorum): it never delivers a record a new leader
//!   could cut.
//! - An append is a Raft write (forwarded to the leader if need be) and
//!   returns once committed: `wait_durable` has nothing left to wait for.
//! - A cluster topic's replicas and files are removed only once the
//!   metadata group deleted the topic (the broker does that first); every
//!   node then removes its own and says so, and the name is free again
//!   once all have.
//! - Retention (and the unlinking of deleted messages' segments) on a
//!   replica deletes only segments below the Raft rows it purged, which
//!   every member holds: a replica never drops records its peers may
//!   still ask it for. Each node applies its own registry's retention to
//!   its replicas (retention is not yet a replicated setting).
//! - Every node forms a partition group it opens pristine, with every
//!   node as a voter ([`form_group`]): all of them write the same first
//!   entry, so whichever nodes are up elect a leader. The voters are those
//!   the topic's creation recorded (the metadata group's voters then, as
//!   every node applied it at the same place in the log), less the nodes
//!   removed from the cluster; for a topic created before they were
//!   recorded, and for the timer log, the configured peers less the
//!   removed ([`ClusterStorage::follow_metadata`]). A node that is no
//!   such voter, or joins the cluster, forms nothing: the group's leader
//!   takes it in.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use dmq_dispatcher::storage::OpenedJournal;
use dmq_dispatcher::{
    FileStorage, PartitionLog, ProducerBatch, RecoveryDamage, Storage, StoreError,
};
use dmq_log_store::{AppendInfo, BatchInput, Log, LogConfig, MessageId, Record};
use tokio::runtime::Handle;

use crate::journals::ReplicatedJournals;
use crate::node::{partition_group, NodeConfig, NodeError, PartitionNode};
use crate::partition::{CommitListener, CommittedProducerBatch};
use crate::proposals::ProposalQueue;

/// What [`ClusterStorage::set_producer_batch_listener`] calls: topic,
/// partition, and the idempotent producers' batches a replica applied.
pub type ProducerBatchListener = Arc<dyn Fn(&str, u32, &[CommittedProducerBatch]) + Send + Sync>;
use crate::{NodeId, RaftRouter};

/// Where and with whom a node runs its cluster partitions.
#[derive(Debug, Clone)]
pub struct ClusterMembers {
    /// This node's id.
    pub node_id: NodeId,
    /// Every node's id and Raft address, this one included: the replicas
    /// (voters) of every cluster partition.
    pub members: BTreeMap<NodeId, String>,
    /// Raft timings for the partition groups (`listen` and `data_dir` are
    /// set per partition).
    pub timings: NodeConfig,
}

/// The dispatcher's storage on a cluster node (see the module doc).
pub struct ClusterStorage {
    local: FileStorage,
    /// `<data dir>/cluster/partitions`.
    root: PathBuf,
    members: ClusterMembers,
    router: RaftRouter,
    runtime: Handle,
    log_config: LogConfig,
    partitions: Mutex<HashMap<(String, u32), Arc<ReplicatedPartitionLog>>>,
    /// Cluster topics known so far (a cache of their directories).
    replicated: Mutex<std::collections::HashSet<String>>,
    on_commit: Arc<Mutex<Option<CommitListener>>>,
    on_producer_batches: Arc<Mutex<Option<ProducerBatchListener>>>,
    journals: Mutex<Option<Arc<ReplicatedJournals>>>,
    /// Pending cluster delays per topic ([`crate::delays`]).
    pending_delays: Mutex<Option<Arc<crate::delays::PendingCounts>>>,
    /// The metadata state the groups formed here follow
    /// ([`ClusterStorage::follow_metadata`]).
    metadata_state: Mutex<Option<crate::MetadataStateMachine>>,
    /// False while this node joins the cluster: it forms no group.
    forming: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ClusterStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStorage")
            .field("root", &self.root)
            .field("node_id", &self.members.node_id)
            .finish()
    }
}

/// `mutex` locked, poisoned or not.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `future` to completion from synchronous code: from a plain
/// thread (the dispatcher's, its writer's, a blocking task) directly,
/// from a runtime worker by moving the worker's tasks away first.
fn block_on<F: Future>(runtime: &Handle, future: F) -> F::Output {
    match Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| runtime.block_on(future)),
        Err(_) => runtime.block_on(future),
    }
}

/// `error` as the dispatcher sees a replica that cannot take or answer a
/// write now.
pub(crate) fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl ClusterStorage {
    /// Storage under `data_dir` (the node's `FileStorage` and
    /// `cluster/partitions/`), starting partition replicas on `router`
    /// and driving them on `runtime`.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        log_config: LogConfig,
        members: ClusterMembers,
        router: RaftRouter,
        runtime: Handle,
    ) -> Result<ClusterStorage, StoreError> {
        let data_dir = data_dir.into();
        let local = FileStorage::new(&data_dir, log_config.clone())?;
        let root = data_dir.join("cluster").join("partitions");
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Journal {
            name: root.display().to_string(),
            source,
        })?;
        Ok(ClusterStorage {
            local,
            root,
            members,
            router,
            runtime,
            log_config: LogConfig {
                // Each replica's log holds its own directory's lock: a
                // truncation cuts a closed log only (see `partition`).
                lock_directory: true,
                ..log_config
            },
            partitions: Mutex::new(HashMap::new()),
            replicated: Mutex::default(),
            on_commit: Arc::default(),
            on_producer_batches: Arc::default(),
            journals: Mutex::default(),
            pending_delays: Mutex::default(),
            metadata_state: Mutex::default(),
            forming: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Makes `topic` a cluster topic on this node: its partitions are
    /// opened as replicas from now on, and after a restart. Idempotent.
    pub fn mark_replicated(&self, topic: &str) -> Result<(), StoreError> {
        if dmq_dispatcher::names::check_topic(topic).is_err() {
            return Err(StoreError::InvalidName(topic.to_string()));
        }
        let dir = self.root.join(topic);
        let io = |source| StoreError::Journal {
            name: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::File::open(&self.root)
            .and_then(|parent| parent.sync_all())
            .map_err(io)?;
        lock(&self.replicated).insert(topic.to_string());
        Ok(())
    }

    /// Whether `topic` is a cluster topic on this node.
    pub fn is_replicated(&self, topic: &str) -> bool {
        if lock(&self.replicated).contains(topic) {
            return true;
        }
        let found =
            dmq_dispatcher::names::check_topic(topic).is_ok() && self.root.join(topic).is_dir();
        if found {
            lock(&self.replicated).insert(topic.to_string());
        }
        found
    }

    /// Replicates the ack journals of consumer groups on cluster topics
    /// through `journals` from now on (before the dispatcher opens).
    pub fn replicate_journals(&self, journals: Arc<ReplicatedJournals>) {
        *lock(&self.journals) = Some(journals);
    }

    /// The node's replicated journals if `name` is a group's ack journal
    /// on a cluster topic (`group.<topic>.<group>[.<member>]`; a topic
    /// name may hold dots, so every prefix is tried).
    fn replicated_journals(&self, name: &str) -> Option<Arc<ReplicatedJournals>> {
        let journals = lock(&self.journals).clone()?;
        let rest = name.strip_prefix(dmq_dispatcher::names::GROUP_JOURNAL_PREFIX)?;
        rest.match_indices('.')
            .any(|(at, _)| self.is_replicated(&rest[..at]))
            .then_some(journals)
    }

    /// Counts pending cluster delays from `counts` (kept by
    /// [`crate::delays::ReplicatedDelays`]) in the dispatcher's statistics.
    pub fn count_delays_from(&self, counts: Arc<crate::delays::PendingCounts>) {
        *lock(&self.pending_delays) = Some(counts);
    }

    /// Calls `listener` whenever committed records are applied on any of
    /// this node's replicas (the engine's wake-up).
    pub fn set_commit_listener(&self, listener: CommitListener) {
        *lock(&self.on_commit) = Some(listener);
    }

    /// Calls `listener` with the idempotent producers' batches each
    /// replica of this node applies (with its topic and partition), on
    /// Raft's task: it must not block.
    pub fn set_producer_batch_listener(&self, listener: ProducerBatchListener) {
        *lock(&self.on_producer_batches) = Some(listener);
    }

    /// This node's open replica of `topic`'s partition `partition`.
    pub fn replica(&self, topic: &str, partition: u32) -> Option<Arc<ReplicatedPartitionLog>> {
        lock(&self.partitions)
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// Every open replica, by topic and partition.
    pub fn replicas(&self) -> Vec<((String, u32), Arc<ReplicatedPartitionLog>)> {
        let mut all: Vec<_> = lock(&self.partitions)
            .iter()
            .map(|(key, log)| (key.clone(), Arc::clone(log)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Starts (or returns) this node's replica of internal cluster log
    /// `topic` (partition 0): a Raft group every node forms and hosts, as
    /// for a cluster topic's partition, that the dispatcher never sees as
    /// a topic (the timer log of cluster delays, [`crate::delays`]).
    pub async fn internal_replica(
        &self,
        topic: &str,
    ) -> Result<Arc<ReplicatedPartitionLog>, StoreError> {
        if !dmq_dispatcher::names::is_internal(topic) {
            return Err(StoreError::InvalidName(topic.to_string()));
        }
        if let Some(replica) = self.replica(topic, 0) {
            return Ok(replica);
        }
        let node = self.start_replica(topic, 0).await.map_err(unavailable)?;
        let replica = Arc::new(ReplicatedPartitionLog::new(node, &self.runtime));
        let mut partitions = lock(&self.partitions);
        Ok(Arc::clone(
            partitions.entry((topic.to_string(), 0)).or_insert(replica),
        ))
    }

    async fn start_replica(&self, topic: &str, partition: u32) -> Result<PartitionNode, NodeError> {
        let mut config = self.members.timings.clone();
        config.id = self.members.node_id;
        config.listen = self.router.addr();
        config.data_dir = self.root.join(topic).join(partition.to_string());
        let state = lock(&self.metadata_state).clone();
        // Every node's Raft address: configured, or recorded when it was
        // added.
        let mut addrs = self.members.members.clone();
        let mut removed = std::collections::BTreeSet::new();
        let mut voters: Option<std::collections::BTreeSet<NodeId>> = None;
        if let Some(state) = &state {
            for (id, added) in state.nodes_added() {
                addrs.entry(id).or_insert(added.raft);
            }
            removed = state.nodes_removed();
            // An empty set (no membership applied when it was created)
            // forms nothing: the configured peers then.
            voters = state.formed_with(topic).filter(|voters| !voters.is_empty());
        }
        addrs.retain(|id, _| !removed.contains(id));
        let voters = voters.unwrap_or_else(|| self.members.members.keys().copied().collect());
        let members: BTreeMap<NodeId, String> = voters
            .iter()
            .filter(|id| !removed.contains(id))
            .filter_map(|id| addrs.get(id).map(|addr| (*id, addr.clone())))
            .collect();
        config.peers = addrs
            .iter()
            .filter(|(id, _)| **id != self.members.node_id)
            .map(|(_, addr)| addr.clone())
            .collect();
        let group = partition_group(topic, partition);
        let node =
            PartitionNode::start_on(&self.router, config, &group, self.log_config.clone()).await?;
        // Formed only by its members, and not while this node joins the
        // cluster: each group it is to hold then takes it in.
        if self.forming.load(std::sync::atomic::Ordering::SeqCst)
            && members.contains_key(&self.members.node_id)
        {
            form_group(&node, &members).await?;
        }
        Ok(node)
    }

    /// Forms groups from `state` from now on: each topic's with the voters
    /// its creation recorded (`MetadataStateMachine::formed_with`), less
    /// the nodes removed from the cluster, at the addresses configured or
    /// recorded when a node was added (see the module doc).
    pub fn follow_metadata(&self, state: crate::MetadataStateMachine) {
        *lock(&self.metadata_state) = Some(state);
    }

    /// Whether this node forms the groups of replicas it starts pristine:
    /// not while it joins the cluster (its groups' leaders take it in).
    pub fn set_forming(&self, forming: bool) {
        self.forming
            .store(forming, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops every replica (their data stays).
    pub async fn shutdown(&self) {
        let replicas: Vec<_> = lock(&self.partitions).drain().collect();
        for (_, replica) in replicas {
            replica.node.raft().shutdown().await.ok();
        }
    }
}

/// Forms group `node` belongs to if its replica is pristine (never part of
/// a group), with `members` as voters. Every node may call it: openraft's
/// first entry is the same membership at the same log id on each, so the
/// nodes that call it simply elect a leader among themselves, and a node
/// that already heard from a leader is left as it is.
pub async fn form_group<C: crate::network::GroupTypes, S>(
    node: &crate::node::GroupNode<C, S>,
    members: &BTreeMap<NodeId, String>,
) -> Result<(), NodeError> {
    if node.is_initialized().await? {
        return Ok(());
    }
    match node.initialize(members.clone()).await {
        // Initialized meanwhile by a leader's first append: as wanted.
        Err(NodeError::Initialize(why)) if node.is_initialized().await? => {
            tracing::debug!(group = node.group(), %why, "already formed");
            Ok(())
        }
        other => other,
    }
}

impl Storage for ClusterStorage {
    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<dyn PartitionLog>, StoreError> {
        if !self.is_replicated(topic) {
            return self.local.partition(topic, partition);
        }
        if let Some(replica) = self.replica(topic, partition) {
            return Ok(replica);
        }
        let node =
            block_on(&self.runtime, self.start_replica(topic, partition)).map_err(unavailable)?;
        let slot = Arc::clone(&self.on_commit);
        let producers = Arc::clone(&self.on_producer_batches);
        let name = topic.to_string();
        node.on_commit(Arc::new(move |batches| {
            if !batches.is_empty() {
                if let Some(listener) = lock(&producers).clone() {
                    listener(&name, partition, batches);
                }
            }
            if let Some(listener) = lock(&slot).clone() {
                listener(&[]);
            }
        }));
        let replica = Arc::new(ReplicatedPartitionLog::new(node, &self.runtime));
        let mut partitions = lock(&self.partitions);
        let replica = partitions
            .entry((topic.to_string(), partition))
            .or_insert(replica);
        Ok(Arc::clone(replica) as Arc<dyn PartitionLog>)
    }

    fn open_journal(&self, name: &str) -> Result<OpenedJournal, StoreError> {
        match self.replicated_journals(name) {
            // A journal this node kept locally before its groups' journals
            // were replicated seeds the cluster's copy.
            Some(journals) => journals.open_or_seed(name, || {
                let kept = self.local.list_journals(name)?.iter().any(|n| n == name);
                if !kept {
                    return Ok(Vec::new());
                }
                self.local.open_journal(name).map(|(_, payloads)| payloads)
            }),
            None => self.local.open_journal(name),
        }
    }

    fn remove_journal(&self, name: &str) -> Result<(), StoreError> {
        match self.replicated_journals(name) {
            Some(journals) => {
                journals.remove(name);
                Ok(())
            }
            None => self.local.remove_journal(name),
        }
    }

    /// Refuses to remove a cluster topic the metadata group still has: it
    /// is deleted in the cluster first, never on one node alone.
    /// Without the metadata (no replicated journals set) none is removed.
    fn check_removable(&self, topic: &str) -> Result<(), StoreError> {
        if !self.is_replicated(topic) {
            return self.local.check_removable(topic);
        }
        let journals = lock(&self.journals).clone();
        let still_in_cluster =
            journals.is_none_or(|journals| journals.metadata().topics().contains_key(topic));
        if still_in_cluster {
            return Err(unavailable(format!(
                "cluster topic {topic:?} is deleted through the cluster first; it stays"
            )));
        }
        Ok(())
    }

    /// A cluster topic's replicas are stopped (their Raft groups leave
    /// the node's port) and their files deleted. Only for a topic the
    /// metadata group deleted: the broker deletes it there first.
    fn remove_topic(&self, topic: &str) -> Result<(), StoreError> {
        if !self.is_replicated(topic) {
            return self.local.remove_topic(topic);
        }
        self.check_removable(topic)?;
        let replicas: Vec<Arc<ReplicatedPartitionLog>> = {
            let mut partitions = lock(&self.partitions);
            let keys: Vec<(String, u32)> = partitions
                .keys()
                .filter(|(name, _)| name == topic)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|key| partitions.remove(key))
                .collect()
        };
        for replica in replicas {
            self.router.unregister(replica.node.group());
            if let Err(error) = block_on(&self.runtime, replica.node.raft().shutdown()) {
                tracing::warn!(topic, %error, "stopping a deleted topic's replica");
            }
            // A snapshot openraft is still building must not write into
            // the directory being deleted.
            block_on(&self.runtime, replica.node.close_snapshots());
        }
        lock(&self.replicated).remove(topic);
        let dir = self.root.join(topic);
        match std::fs::remove_dir_all(&dir) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::Journal {
                    name: dir.display().to_string(),
                    source,
                })
            }
            _ => {}
        }
        std::fs::File::open(&self.root)
            .and_then(|parent| parent.sync_all())
            .map_err(|source| StoreError::Journal {
                name: self.root.display().to_string(),
                source,
            })?;
        self.local.remove_topic(topic)
    }

    fn list_journals(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut names = self.local.list_journals(prefix)?;
        if let Some(journals) = lock(&self.journals).clone() {
            names.extend(journals.names(prefix));
            names.sort();
            names.dedup();
        }
        Ok(names)
    }

    fn journal_tail_cuts(&self) -> Vec<(String, u64)> {
        self.local.journal_tail_cuts()
    }

    fn shares_journals(&self, topic: &str) -> bool {
        self.is_replicated(topic) && lock(&self.journals).is_some()
    }

    fn delays_elsewhere(&self, topic: &str) -> Vec<(u32, u64)> {
        lock(&self.pending_delays)
            .as_ref()
            .map(|counts| counts.in_topic(topic))
            .unwrap_or_default()
    }

    fn check_room(&self, partitions: u32) -> Result<(), StoreError> {
        self.local.check_room(partitions)
    }
}

/// This node's replica of a cluster partition, as the dispatcher reads and
/// writes it (see the module doc).
pub struct ReplicatedPartitionLog {
    node: Arc<PartitionNode>,
    runtime: Handle,
    /// This node's produces to the partition, in order, merged when they
    /// come faster than the group commits them.
    proposals: ProposalQueue,
}

impl std::fmt::Debug for ReplicatedPartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedPartitionLog")
            .field("group", &self.node.group())
            .finish()
    }
}

/// A batch [`ReplicatedPartitionLog::propose`] got committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedAppend {
    /// Where its records are.
    pub info: AppendInfo,
    /// An earlier proposal of the same idempotent batch stored them (a
    /// producer's retry the partition's leader found in its log): the
    /// answer is the first's, and nothing new was stored.
    pub stored_before: bool,
}

impl ReplicatedPartitionLog {
    fn new(node: PartitionNode, runtime: &Handle) -> ReplicatedPartitionLog {
        let node = Arc::new(node);
        ReplicatedPartitionLog {
            proposals: ProposalQueue::start(&node, runtime),
            node,
            runtime: runtime.clone(),
        }
    }

    /// The replica's Raft node (leader, metrics, membership).
    pub fn node(&self) -> &PartitionNode {
        &self.node
    }

    /// Appends `batch` through the partition's Raft group (here if this
    /// node leads, else forwarded) and answers once it is committed, with
    /// where its records are.
    pub async fn write(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError> {
        self.propose(batch).await.map(|appended| appended.info)
    }

    /// [`ReplicatedPartitionLog::write`] in two steps: queues the batch
    /// now, at the call, behind this node's earlier proposals (a leader
    /// appends one caller's proposals in call order; [`ProposalQueue`] may
    /// merge them with others') and returns the answer's future, so a
    /// connection may have many batches in flight.
    pub fn propose(
        &self,
        batch: &BatchInput,
    ) -> impl Future<Output = Result<ReplicatedAppend, StoreError>> + Send + 'static {
        // A batch the log would refuse must not become a Raft entry: a
        // storage error stops the group's Raft on every replica.
        let queued = self
            .with_log(|log| Ok(log.check_batch(batch)?))
            .map(|()| self.proposals.propose(batch.clone()));
        async move { queued?.await }
    }

    fn committed_end(&self) -> u64 {
        self.node.committed_end()
    }

    fn with_log<T>(
        &self,
        read: impl FnOnce(&Log) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.node.raft_log().with_log(read).map_err(unavailable)?
    }

    /// `records` without those at or past the committed end.
    fn committed(&self, mut records: Vec<Record>) -> Vec<Record> {
        let end = self.committed_end();
        records.retain(|record| record.offset < end);
        records
    }
}

impl PartitionLog for ReplicatedPartitionLog {
    fn append_batch_deferred(&self, batch: &BatchInput) -> Result<AppendInfo, StoreError> {
        block_on(&self.runtime, self.write(batch))
    }

    fn wait_durable(&self, _info: &AppendInfo) -> Result<(), StoreError> {
        // `append_batch_deferred` returned once the batch was committed.
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn end_may_move_back(&self) -> bool {
        false
    }

    fn durable_on_append(&self) -> bool {
        true
    }

    fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        if from >= self.committed_end() {
            return Ok(Vec::new());
        }
        let records = self.with_log(|log| PartitionLog::read(log, from, max_records))?;
        Ok(self.committed(records))
    }

    fn read_whole_batches(&self, from: u64, max_records: usize) -> Result<Vec<Record>, StoreError> {
        if from >= self.committed_end() {
            return Ok(Vec::new());
        }
        let records =
            self.with_log(|log| PartitionLog::read_whole_batches(log, from, max_records))?;
        Ok(self.committed(records))
    }

    fn start_offset(&self) -> u64 {
        self.with_log(|log| Ok(PartitionLog::start_offset(log)))
            .unwrap_or(0)
    }

    fn end_offset(&self) -> u64 {
        let end = self.committed_end();
        self.with_log(|log| Ok(PartitionLog::end_offset(log).min(end)))
            .unwrap_or(0)
    }

    fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, StoreError> {
        let end = self.committed_end();
        let found = self.with_log(|log| PartitionLog::offset_for_timestamp(log, timestamp_ms))?;
        Ok(found.filter(|offset| *offset < end))
    }

    fn producer_batches(&self, from: u64) -> Result<Vec<ProducerBatch>, StoreError> {
        let end = self.committed_end();
        let mut batches = self.with_log(|log| PartitionLog::producer_batches(log, from))?;
        batches.retain(|batch| batch.base_offset < end);
        Ok(batches)
    }

    fn find_by_id(&self, id: &MessageId) -> Result<Option<Record>, StoreError> {
        let end = self.committed_end();
        let found = self.with_log(|log| PartitionLog::find_by_id(log, id))?;
        Ok(found.filter(|record| record.offset < end))
    }

    fn offset_of_id(&self, id: &MessageId) -> Result<Option<u64>, StoreError> {
        let end = self.committed_end();
        let found = self.with_log(|log| PartitionLog::offset_of_id(log, id))?;
        Ok(found.filter(|offset| *offset < end))
    }

    fn find_by_key_from(
        &self,
        key: &[u8],
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let records = self.with_log(|log| PartitionLog::find_by_key_from(log, key, from, limit))?;
        Ok(self.committed(records))
    }

    fn size_bytes(&self) -> u64 {
        self.with_log(|log| Ok(PartitionLog::size_bytes(log)))
            .unwrap_or(0)
    }

    fn disk_bytes(&self) -> u64 {
        self.with_log(|log| Ok(PartitionLog::disk_bytes(log)))
            .unwrap_or(0)
    }

    fn recovery_damage(&self) -> RecoveryDamage {
        self.with_log(|log| Ok(PartitionLog::recovery_damage(log)))
            .unwrap_or_default()
    }

    /// Retention on this replica, only below the Raft rows it purged
    /// (every member holds those entries; Raft never reads them again).
    fn apply_retention(
        &self,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.node
            .raft_log()
            .apply_retention(max_age_ms, max_bytes, now_ms)
            .map_err(unavailable)
    }

    /// Unlinks segments of deleted messages, only below the purged rows.
    fn delete_before(&self, offset: u64) -> Result<u64, StoreError> {
        self.node
            .raft_log()
            .delete_before(offset)
            .map_err(unavailable)
    }
}
