//! A broker as one node of a cluster (`[cluster]` in the configuration;
//! docs/replication.md).
//!
//! [`Cluster`] owns the node's Raft port, its member of the metadata group
//! (the cluster's topics) and the [`ClusterStorage`] its dispatcher runs
//! on (cluster topics' partitions as replicas of their Raft groups).
//!
//! - **Topics.** Creating a topic on any node is a write to the metadata
//!   group (forwarded to its leader); every node then creates the topic
//!   locally, marked replicated: the node that took the request before it
//!   answers, the others when [`Cluster::follow_topics`] sees it applied.
//! - **Produce** to a cluster topic is a Raft write of the partition's
//!   group, forwarded to its leader if need be, answered once fsynced on a
//!   quorum (`crate::produce`).
//! - **Consume.** Every node's dispatcher delivers from its own replica,
//!   below the committed end. A group's acks on a cluster topic are
//!   replicated through the metadata group (`dmq_replication::journals`):
//!   every node's copy of the group merges them, and a node that takes
//!   the group over starts from them. Delivery attempts stay per node; with
//!   `consumer_lease` on (the default), one node at a time serves every
//!   consumer of cluster topics, the metadata leader under a lease
//!   (`crate::consumer_lease`); off, every node serves its own and a
//!   group consumes through one node at a time.
//! - **Delays** of cluster topics are records of the replicated timer log
//!   every node follows; the node leading it fires them
//!   (`dmq_replication::delays`, [`Cluster::delays`]).
//! - **Registry.** A cluster topic's registry record (owner, approval,
//!   rights, retention) is written through the metadata group
//!   ([`Cluster::publish_registry`]) and applied by every node's follow
//!   loop.
//! - **Replacement** of a node whose disk was lost: every group forgets it
//!   and takes it back as a learner ([`Cluster::replace_node`]); it may
//!   then start empty, and
//!   each group's leader makes it a voter again once it caught up (the
//!   follow loop).
//! - **Removal** of a node for good ([`Cluster::remove_node`]): recorded
//!   in the metadata group, then every group's leader takes it out of its
//!   members (the follow loop goes on doing so for groups formed later);
//!   the node stops once it learns of it ([`Cluster::removed`]) and its
//!   peers refuse its start from then on.
//!
//! Invariant: single-node brokers never reach this module; a cluster
//! node's local-only topics (internal ones) stay local; a cluster topic's
//! groups dead-letter into cluster topics
//! ([`Cluster::ensure_dead_letter_topic`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use dmq_replication::scrub::ScrubConfig;
use std::time::Duration;

use dmq_dispatcher::{DispatchError, Storage, StoreError, TopicConfig};
use dmq_replication::cluster_storage::form_group;
use dmq_replication::rejoin::{
    check_not_removed, check_rejoin, note_held_data, NodeViews, Rejoin, RejoinError,
};
use dmq_replication::{
    ClusterMembers, ClusterStorage, GroupStatus, MetaCommand, MetaResponse, MetadataNode,
    NodeConfig, NodeError, RaftRouter, ReplicatedDelays, ReplicatedJournals, TopicSpec,
};

use crate::config::{BrokerConfig, ClusterConfig};
use crate::consumer_lease::{ConsumerHome, ConsumerLease};
use crate::engine::{Engine, EngineError};
use crate::registry::{TopicRecord, TopicStatus};
use crate::services::SharedRegistry;

/// Why the cluster side of a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Raft port could not be bound.
    #[error("binding the Raft port {address}: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metadata group could not start.
    #[error("the metadata group: {0}")]
    Metadata(#[from] NodeError),
    /// The storage could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This node's disk lost data its peers know it held.
    #[error(transparent)]
    Rejoin(#[from] RejoinError),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The marker of a joining node could not be written.
    #[error("writing {path}: {source}")]
    Marker {
        /// The marker's path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Creates the empty file `path` (and its directory) durably: the file
/// and the directory entry are synced.
fn write_durably(path: &std::path::Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a marker needs a directory"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(path)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `path` durably (the directory entry is synced).
fn remove_durably(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A cluster operation that did not go through (no metadata leader in
/// time, a task that failed): retryable, as the client sees it.
fn unavailable(error: impl std::fmt::Display) -> DispatchError {
    DispatchError::Store(StoreError::Unavailable(error.to_string()))
}

/// [`Cluster::status`]: `GET /api/cluster` and `dmq cluster status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: u64,
    /// Every node, as configured.
    pub peers: Vec<PeerStatus>,
    /// This node's view of the metadata group.
    pub metadata: GroupStatus,
    /// Whether this node serves the consumers of cluster topics now (it
    /// holds the consumer lease).
    pub serves_consumers: bool,
    /// This node's replicas, by topic and partition.
    pub partitions: Vec<PartitionStatus>,
}

/// A configured node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    /// Its id.
    pub id: u64,
    /// Its Raft address.
    pub raft: String,
    /// Its client address.
    pub client: String,
    /// It was removed from the cluster (`dmq cluster remove-node`): it is
    /// no member of any group any more.
    pub removed: bool,
    /// It was added (`dmq cluster add-node`) and is not yet a voter of
    /// every group.
    pub joining: bool,
    /// It is being replaced (`dmq cluster replace-node`, its disk lost)
    /// and is not yet a voter of every group, in a settled membership:
    /// until then some groups have only the other voters, and the loss of
    /// one more node can stop them.
    pub replacing: bool,
}

/// One replica on this node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Records below this are committed (deliverable here).
    pub committed_end: u64,
    /// This replica's log end, committed or not.
    pub log_end: u64,
    /// Raft entries this replica keeps rows for: bounded by purging
    /// (`purge_after_entries`) while every member is up.
    pub raft_rows: u64,
    /// Produces through this node forwarded to the partition's leader
    /// (tries, since the replica opened): what clients routing to leaders
    /// (PARTITION_LEADERS) avoid.
    pub forwarded_writes: u64,
    /// Its Raft group, as this node sees it.
    pub raft: GroupStatus,
}

impl ClusterStatus {
    /// The status as OpenMetrics text (no `# EOF`): per group the leader
    /// (0: none known) and term, per partition the committed end, and on
    /// a leader each peer's lag in entries.
    pub fn metrics(&self) -> String {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        type Labels = Vec<(String, String)>;
        let mut registry = prometheus_client::registry::Registry::with_prefix("dmq_cluster");
        let leader = Family::<Labels, Gauge>::default();
        let term = Family::<Labels, Gauge>::default();
        let committed = Family::<Labels, Gauge>::default();
        let rows = Family::<Labels, Gauge>::default();
        let lag = Family::<Labels, Gauge>::default();
        let forwarded = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let groups = std::iter::once(&self.metadata).chain(self.partitions.iter().map(|p| &p.raft));
        for group in groups {
            let labels = vec![("group".to_string(), group.group.clone())];
            leader
                .get_or_create(&labels)
                .set(gauge(group.leader.unwrap_or(0)));
            term.get_or_create(&labels).set(gauge(group.term));
            let last = group.last_log_index.unwrap_or(0);
            for (peer, matched) in group.matched.iter().flatten() {
                let mut labels = labels.clone();
                labels.push(("peer".to_string(), peer.to_string()));
                lag.get_or_create(&labels)
                    .set(gauge(last.saturating_sub(matched.unwrap_or(0))));
            }
        }
        for partition in &self.partitions {
            let labels = vec![
                ("topic".to_string(), partition.topic.clone()),
                ("partition".to_string(), partition.partition.to_string()),
            ];
            committed
                .get_or_create(&labels)
                .set(gauge(partition.committed_end));
            rows.get_or_create(&labels).set(gauge(partition.raft_rows));
            forwarded
                .get_or_create(&labels)
                .inc_by(partition.forwarded_writes);
        }
        registry.register(
            "forwarded_writes",
            "Produces through this node sent on to the partition's leader, per partition (a \
             client that routes to leaders sends none)",
            forwarded,
        );
        registry.register(
            "leader",
            "The leader this node knows of, per Raft group (0: none)",
            leader,
        );
        registry.register("term", "This node's Raft term, per group", term);
        registry.register(
            "committed_end_offset",
            "Records below this offset are committed on a quorum, per partition",
            committed,
        );
        registry.register(
            "raft_rows",
            "Raft entries a partition replica keeps rows for (purged below what every member \
             holds)",
            rows,
        );
        registry.register(
            "replication_lag_entries",
            "On a group's leader: Raft entries a peer has yet to match",
            lag,
        );
        let peer_state = Family::<Labels, Gauge>::default();
        for peer in &self.peers {
            let state = if peer.removed {
                "removed"
            } else if peer.joining {
                "joining"
            } else if peer.replacing {
                "replacing"
            } else {
                "member"
            };
            let labels = vec![
                ("peer".to_string(), peer.id.to_string()),
                ("state".to_string(), state.to_string()),
            ];
            peer_state.get_or_create(&labels).set(1);
        }
        registry.register(
            "peer",
            "Each node of the cluster known here, 1 in its state: member, joining (added, not \
             yet a voter of every group), replacing (its disk lost, not yet a voter of every \
             group again) or removed",
            peer_state,
        );
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode_registry(&mut text, &registry)
        {
            tracing::error!(%error, "rendering the cluster metrics failed");
        }
        text
    }
}

/// How often a node looks for topics the metadata group applied that it
/// has not created yet.
const FOLLOW_TOPICS_EVERY: Duration = Duration::from_millis(100);

/// A node's cluster side (see the module doc).
pub struct Cluster {
    config: ClusterConfig,
    router: RaftRouter,
    metadata: Arc<MetadataNode>,
    storage: Arc<ClusterStorage>,
    journals: Arc<ReplicatedJournals>,
    delays: Arc<ReplicatedDelays>,
    /// Produces to cluster topics through this node: seconds from the
    /// proposal to the commit (fsynced on a quorum), per partition part.
    commit_latency: prometheus_client::metrics::histogram::Histogram,
    /// Leaderships this node moved by itself, as the metadata leader
    /// ([`Cluster::balance_leaders_periodically`]).
    balanced_by_itself: prometheus_client::metrics::counter::Counter,
    /// Which replicated registry entries this node's registry holds
    /// ([`Cluster::follow_topics`]).
    registry_applied: std::sync::Mutex<RegistryFollowed>,
    /// Whether this node serves the consumers of cluster topics
    /// (`crate::consumer_lease`); none with `[cluster] consumer_lease`
    /// off, when every node serves its own.
    consumer_lease: Option<ConsumerLease>,
    /// `<data dir>/cluster/joining`: present while this node joins the
    /// cluster (added with `dmq cluster add-node`, not yet a voter of
    /// every group): it forms no group meanwhile, across restarts too.
    joining_marker: std::path::PathBuf,
}

/// What [`Cluster::follow_topics`] applied of the replicated registry.
#[derive(Debug, Default)]
struct RegistryFollowed {
    /// The version of each entry this node's registry holds.
    entries: std::collections::HashMap<String, u64>,
    /// The registry version a pass applied whole (nothing left for
    /// later): until it moves, a pass has nothing to do.
    whole_at: Option<u64>,
}

/// A node being replaced is made a voter of a group once its log is
/// within this many entries of the leader's (it installed the snapshot and
/// fetched its records; the rest follows in moments).
const PROMOTE_WITHIN_ENTRIES: u64 = 64;

/// How long one try to hand a group to one voter may take
/// ([`Cluster::move_leaders_off`]): a transfer takes about a lease (half a
/// second), one to a voter that is down fails within about 3 s.
const TRANSFER_TRY_WITHIN: Duration = Duration::from_secs(4);

/// How long a stopping node spends handing its leaderships over.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(6);

/// What [`Cluster::move_leaders_off`] did.
#[derive(Debug, Default)]
pub struct LeadersMoved {
    /// Groups moved, with their new leaders.
    pub moved: Vec<(String, u64)>,
    /// Groups not moved, with why.
    pub not_moved: Vec<(String, String)>,
}

/// Hands each group of `plan` to the first of its candidates that takes
/// it, all groups at once, each try within [`TRANSFER_TRY_WITHIN`].
async fn run_transfers(plan: Vec<(String, GroupHandle, Vec<u64>)>) -> LeadersMoved {
    let mut transfers = tokio::task::JoinSet::new();
    for (name, group, candidates) in plan {
        transfers.spawn(async move {
            let mut why = "no other voter".to_string();
            for to in candidates {
                match tokio::time::timeout(TRANSFER_TRY_WITHIN, group.transfer_leader(to)).await {
                    Ok(Ok(())) => return Ok((name, to)),
                    Ok(Err(error)) => why = format!("to node {to}: {error}"),
                    Err(_) => why = format!("to node {to}: no answer in time"),
                }
            }
            Err((name, why))
        });
    }
    let mut moved = LeadersMoved::default();
    while let Some(done) = transfers.join_next().await {
        match done {
            Ok(Ok(group)) => moved.moved.push(group),
            Ok(Err(group)) => moved.not_moved.push(group),
            Err(error) => tracing::warn!(%error, "a leadership transfer task failed"),
        }
    }
    moved.moved.sort();
    moved.not_moved.sort();
    moved
}

/// One of the Raft groups this node hosts, of either kind.
enum GroupHandle {
    Metadata(Arc<MetadataNode>),
    Partition(Arc<dmq_replication::ReplicatedPartitionLog>),
}

impl GroupHandle {
    fn status(&self) -> dmq_replication::node::GroupStatus {
        match self {
            GroupHandle::Metadata(node) => node.status(),
            GroupHandle::Partition(replica) => replica.node().status(),
        }
    }

    /// Whether `node` is a voter or learner, in this member's view.
    fn is_member(&self, node: u64) -> bool {
        let status = self.status();
        status.voters.contains(&node) || status.learners.contains(&node)
    }

    async fn set_voters(&self, voters: std::collections::BTreeSet<u64>) -> Result<(), NodeError> {
        match self {
            GroupHandle::Metadata(node) => node.set_voters(voters).await,
            GroupHandle::Partition(replica) => replica.node().set_voters(voters).await,
        }
    }

    async fn readmit(&self, node: u64, addr: &str) -> Result<(), NodeError> {
        match self {
            GroupHandle::Metadata(group) => group.readmit(node, addr).await,
            GroupHandle::Partition(replica) => replica.node().readmit(node, addr).await,
        }
    }

    async fn transfer_leader(&self, to: u64) -> Result<(), NodeError> {
        match self {
            GroupHandle::Metadata(group) => group.transfer_leader(to).await,
            GroupHandle::Partition(replica) => replica.node().transfer_leader(to).await,
        }
    }

    async fn remove_member(&self, node: u64) -> Result<(), NodeError> {
        match self {
            GroupHandle::Metadata(group) => group.remove_member(node).await,
            GroupHandle::Partition(replica) => replica.node().remove_member(node).await,
        }
    }
}

/// `dmq_cluster_commit_latency_seconds` buckets: 0.25 ms to 8 s.
/// Before this node serves consumers in a new term: its idle copies of
/// cluster topics' groups are synced, its journal writes committed, and
/// the copies loaded again from their replicated journals (see
/// [`Cluster::keep_consumer_lease`]). False if that could not be done
/// (the lease tries again next round).
async fn load_idle_groups_again(
    engine: &Engine,
    storage: &Arc<ClusterStorage>,
    journals: &ReplicatedJournals,
) -> bool {
    let cluster_topic = {
        let storage = Arc::clone(storage);
        move |topic: &str| storage.is_replicated(topic)
    };
    let mut loaded = 0;
    for _ in 0..5 {
        let sync = cluster_topic.clone();
        let synced = engine
            .call(move |dispatcher, _| dispatcher.sync_idle_groups(sync))
            .await;
        if let Ok(Err(error)) = &synced {
            tracing::warn!(%error, "taking over consumers: syncing groups failed");
        }
        // A copy loaded before what this node synced of it (now, or at its
        // last periodic sync) is in its journal would miss it.
        if !matches!(synced, Ok(Ok(_))) || !journals.drain(Duration::from_secs(2)).await {
            return false;
        }
        let reload = cluster_topic.clone();
        let pass = engine
            .call(move |dispatcher, _| {
                let loaded = dispatcher.reload_idle_groups(&reload)?;
                // A copy changed meanwhile was left as it was: the next
                // pass syncs it and loads it again.
                let changed = dispatcher.sync_idle_groups(&reload)?;
                Ok::<_, DispatchError>((loaded, changed))
            })
            .await;
        match pass {
            Ok(Ok((again, changed))) => {
                loaded += again;
                if changed == 0 {
                    if loaded > 0 {
                        tracing::info!(
                            groups = loaded,
                            "taking over consumers: this node's idle copies of cluster topics' \
                             groups were loaded again from their replicated journals"
                        );
                    }
                    return true;
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "taking over consumers: loading groups again failed");
                return false;
            }
            Err(_) => return false,
        }
    }
    false
}

fn commit_latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 16),
    )
}

impl Cluster {
    /// Binds the Raft port, starts the metadata group's member (forming
    /// the group if this node's copy is pristine) and opens the storage.
    pub async fn start(broker: &BrokerConfig) -> Result<Arc<Cluster>, ClusterError> {
        let Some(config) = broker.cluster.clone() else {
            return Err(crate::config::ConfigError("no [cluster] section".to_string()).into());
        };
        let router = RaftRouter::bind(config.raft_listen)
            .await
            .map_err(|source| ClusterError::Bind {
                address: config.raft_listen,
                source,
            })?
            .with_source(config.raft_source_ip);
        let meta_dir = broker.data_dir.join("cluster").join("meta");
        let mut timings = NodeConfig::new(config.node_id, meta_dir.clone(), router.addr());
        timings.heartbeat_ms = config.heartbeat_ms;
        timings.election_timeout_ms = config.election_timeout_ms;
        timings.purge_after_entries = config.purge_after_entries;
        timings.scrub = (config.scrub_interval_s > 0).then(|| ScrubConfig {
            interval: Duration::from_secs(config.scrub_interval_s),
            bytes_per_second: config.scrub_bytes_per_second.max(1),
        });
        let members: BTreeMap<u64, String> = config
            .peers
            .iter()
            .map(|peer| (peer.id, peer.raft.clone()))
            .collect();
        // A node with no metadata state asks its peers whether it held
        // data before (a lost disk must not rejoin under its id).
        let pristine =
            std::fs::metadata(meta_dir.join("raft.journal")).map_or(true, |file| file.len() == 0);
        let joining_marker = broker.data_dir.join("cluster").join("joining");
        let mut joining = joining_marker.exists();
        let views = NodeViews::serve(&router, pristine);
        if pristine {
            match check_rejoin(config.node_id, &members, config.raft_source_ip).await {
                Ok(Rejoin::Member) => {}
                Ok(Rejoin::Joining) => {
                    if let Err(source) = write_durably(&joining_marker) {
                        router.shutdown().await;
                        return Err(ClusterError::Marker {
                            path: joining_marker,
                            source,
                        });
                    }
                    joining = true;
                }
                Err(error) => {
                    router.shutdown().await;
                    return Err(error.into());
                }
            }
            views.starting();
        } else if let Err(error) =
            check_not_removed(config.node_id, &members, config.raft_source_ip).await
        {
            router.shutdown().await;
            return Err(error.into());
        }
        let metadata = Arc::new(MetadataNode::start_on(&router, timings.clone()).await?);
        views.running(metadata.state_machine().clone());
        tokio::spawn(note_held_data(Arc::clone(&metadata)));
        if joining {
            tracing::warn!(
                "this node joins the cluster: it forms no group, each group's leader takes it in"
            );
        } else {
            form_group(&metadata, &members).await?;
        }
        let storage = ClusterStorage::new(
            &broker.data_dir,
            broker.log_config()?,
            ClusterMembers {
                node_id: config.node_id,
                members,
                timings,
            },
            router.clone(),
            tokio::runtime::Handle::current(),
        )?;
        storage.follow_metadata(metadata.state_machine().clone());
        storage.set_forming(!joining);
        let journals = ReplicatedJournals::start(Arc::clone(&metadata));
        storage.replicate_journals(Arc::clone(&journals));
        let storage = Arc::new(storage);
        let delays = ReplicatedDelays::start(
            Arc::clone(&storage),
            Arc::clone(&metadata),
            dmq_dispatcher::DelayConfig::default(),
        )
        .await?;
        let consumer_lease = config
            .consumer_lease
            .then(|| ConsumerLease::new(config.election_timeout_ms));
        Ok(Arc::new(Cluster {
            config,
            router,
            metadata,
            storage,
            journals,
            delays,
            commit_latency: commit_latency_histogram(),
            balanced_by_itself: Default::default(),
            registry_applied: Default::default(),
            consumer_lease,
            joining_marker,
        }))
    }

    /// The storage the node's dispatcher runs on.
    pub fn storage(&self) -> &Arc<ClusterStorage> {
        &self.storage
    }

    /// Waits (at most 10 s) until a deletion of messages of `topic` just
    /// made by this node's dispatcher is committed in the metadata group,
    /// so that every node applies it (a cluster topic's deletions live in
    /// its shared journal, `dmq_dispatcher::names::tombstone_journal`);
    /// nothing to wait for on a local topic.
    pub async fn deletion_replicated(&self, topic: &str) -> Result<(), DispatchError> {
        self.journal_change_replicated(topic, "deletion").await
    }

    /// Waits (at most 10 s) until a seek of a group of `topic` just made
    /// by this node's dispatcher (a rewrite of the group's replicated ack
    /// journal) is committed in the metadata group: a node that takes over
    /// consumers then goes on from it. Answered before, a seek could be
    /// lost with its node, and the replay it began never came. Nothing to
    /// wait for on a local topic.
    pub async fn seek_replicated(&self, topic: &str) -> Result<(), DispatchError> {
        self.journal_change_replicated(topic, "seek").await
    }

    /// Waits until every journal change this node queued so far (among
    /// them the `what` of `topic` just made) is committed, if `topic` is a
    /// cluster topic.
    async fn journal_change_replicated(
        &self,
        topic: &str,
        what: &str,
    ) -> Result<(), DispatchError> {
        if !self.storage.is_replicated(topic) {
            return Ok(());
        }
        if self.journals.drain(Duration::from_secs(10)).await {
            Ok(())
        } else {
            Err(DispatchError::Store(StoreError::Unavailable(format!(
                "the {what} is applied on this node and queued for the cluster, but was not \
                 committed within 10 s; it is applied on the other nodes once it is (should \
                 this node fail first, it may be lost: send it again)"
            ))))
        }
    }

    /// Consumer groups' replicated ack journals.
    pub fn journals(&self) -> &Arc<ReplicatedJournals> {
        &self.journals
    }

    /// Delayed messages of cluster topics.
    pub fn delays(&self) -> &Arc<ReplicatedDelays> {
        &self.delays
    }

    /// Records how long a produce's part waited from its proposal to its
    /// commit.
    pub fn note_commit_latency(&self, waited: Duration) {
        self.commit_latency.observe(waited.as_secs_f64());
    }

    /// The cluster's `/metrics` families (no `# EOF`): the status's, and
    /// `dmq_cluster_commit_latency_seconds`.
    pub fn metrics(&self) -> String {
        let mut text = self.status().metrics();
        let mut registry = prometheus_client::registry::Registry::with_prefix("dmq_cluster");
        let serves = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        serves.set(i64::from(self.serves_consumers()));
        registry.register(
            "serves_consumers",
            "1 while this node serves the consumers of cluster topics (it holds the consumer \
             lease), else 0",
            serves,
        );
        registry.register(
            "commit_latency_seconds",
            "Produces to cluster topics through this node: from the proposal to the commit \
             (fsynced on a quorum), per partition",
            self.commit_latency.clone(),
        );
        registry.register(
            "leaderships_balanced",
            "Leaderships this node moved by itself, as the metadata leader, to spread them \
             (`leader_balance_interval_s`)",
            self.balanced_by_itself.clone(),
        );
        let mut latency = String::new();
        match prometheus_client::encoding::text::encode_registry(&mut latency, &registry) {
            Ok(()) => text.push_str(&latency),
            Err(error) => tracing::error!(%error, "rendering the commit latency failed"),
        }
        text
    }

    /// The node's member of the metadata group.
    pub fn metadata(&self) -> &MetadataNode {
        &self.metadata
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// Keeps this node's consumer lease until `stop` (one round per
    /// heartbeat). Before it serves in a term, `engine`'s dispatcher loads
    /// its idle copies of cluster topics' groups again from their
    /// replicated journals (synced first, and this node's journal writes
    /// committed): a copy loaded when this node last served merged only
    /// acks since, not the seeks of the node that served in between (a
    /// replay it began would not go on here).
    pub async fn keep_consumer_lease(
        self: Arc<Self>,
        engine: Engine,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(lease) = &self.consumer_lease else {
            return;
        };
        let every = Duration::from_millis(self.config.heartbeat_ms);
        let refresh = || load_idle_groups_again(&engine, &self.storage, &self.journals);
        lease
            .keep(Arc::clone(&self.metadata), every, stop, refresh)
            .await;
    }

    /// Whether this node may hand deliveries of cluster topics to its
    /// connections now (the fence, checked per batch).
    pub fn serves_consumers(&self) -> bool {
        self.consumer_lease
            .as_ref()
            .is_none_or(ConsumerLease::serving_now)
    }

    /// Whether one node at a time serves consumers (`[cluster]
    /// consumer_lease`); if not, every node serves its own.
    pub fn consumer_lease_enabled(&self) -> bool {
        self.consumer_lease.is_some()
    }

    /// Changes to whether this node serves consumers (none without the
    /// lease: every node serves its own, always).
    pub fn watch_consumer_lease(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.consumer_lease.as_ref().map(ConsumerLease::watch)
    }

    /// Where the consumers of cluster topics are served, as this node
    /// knows it now.
    pub fn consumer_home(&self) -> ConsumerHome {
        match &self.consumer_lease {
            None => ConsumerHome::Here,
            Some(lease) => lease.home(&self.metadata, |id| self.client_addr(id)),
        }
    }

    /// [`Cluster::consumer_home`], waiting up to `within` while it is not
    /// known (an election, a new leader's takeover wait).
    pub async fn wait_consumer_home(&self, within: Duration) -> ConsumerHome {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let home = self.consumer_home();
            if home != ConsumerHome::Unknown || tokio::time::Instant::now() >= deadline {
                return home;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Who leads each partition of cluster topic `topic`, as this node
    /// knows it now: `(node id, client address)`, `(0, "")` where none is
    /// known. `None` if this node has no replica of the topic's
    /// partition 0 (not a cluster topic).
    pub fn partition_leaders(&self, topic: &str, partitions: u32) -> Option<Vec<(u64, String)>> {
        self.storage.replica(topic, 0)?;
        Some(
            (0..partitions)
                .map(|partition| {
                    let leader = self
                        .storage
                        .replica(topic, partition)
                        .and_then(|replica| replica.node().known_leader());
                    leader
                        .and_then(|id| Some((id, self.client_addr(id)?)))
                        .unwrap_or_default()
                })
                .collect(),
        )
    }

    /// The binary-protocol address of node `id`: as configured, or as
    /// given when it was added.
    pub fn client_addr(&self, id: u64) -> Option<String> {
        match self.config.peers.iter().find(|peer| peer.id == id) {
            Some(peer) => Some(peer.client.clone()),
            None => self
                .metadata
                .state_machine()
                .nodes_added()
                .remove(&id)
                .map(|added| added.client),
        }
    }

    /// The Raft address of node `id`: as configured, or as given when it
    /// was added.
    fn raft_addr(&self, id: u64) -> Option<String> {
        match self.config.peers.iter().find(|peer| peer.id == id) {
            Some(peer) => Some(peer.raft.clone()),
            None => self
                .metadata
                .state_machine()
                .nodes_added()
                .remove(&id)
                .map(|added| added.raft),
        }
    }

    /// Creates `name` in the cluster (a metadata write, forwarded to the
    /// metadata leader), then here. A name the cluster has is
    /// `TopicExists`, whatever its settings.
    pub async fn create_topic(
        &self,
        engine: &Engine,
        name: &str,
        partitions: u32,
        ordered: bool,
    ) -> Result<TopicConfig, EngineError> {
        dmq_dispatcher::names::check_topic(name).map_err(DispatchError::InvalidName)?;
        if partitions == 0 {
            return Err(DispatchError::InvalidArgument(
                "a topic needs at least 1 partition".to_string(),
            )
            .into());
        }
        let command = MetaCommand::CreateTopic {
            name: name.to_string(),
            spec: TopicSpec {
                partitions,
                ordered,
            },
        };
        let response = self.metadata.write(command).await.map_err(unavailable)?;
        match response {
            MetaResponse::Applied => {}
            MetaResponse::TopicExists => {
                return Err(DispatchError::TopicExists(name.to_string()).into())
            }
            MetaResponse::TopicBeingDeleted => {
                return Err(DispatchError::InvalidArgument(format!(
                    "topic {name:?} was deleted and a node has yet to remove it: its name is \
                     free again once every node is up and has"
                ))
                .into())
            }
            other => {
                return Err(DispatchError::InvalidArgument(format!(
                    "the cluster refused the topic: {other:?}"
                ))
                .into())
            }
        }
        // Formed here once applied here: the groups of a topic created
        // after a node's removal leave that node out on every node
        // (`ClusterStorage::exclude_removed_nodes`).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.metadata.topics_applied_here().contains_key(name)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.create_here(engine, name, partitions, ordered).await
    }

    /// Deletes cluster topic `name`: in the metadata group first (its name
    /// then stays taken until every node has removed it), then here. The
    /// other nodes remove their replicas as they learn of it
    /// ([`Cluster::follow_topics`]). A topic the cluster deleted already
    /// but this node has yet to remove is removed here.
    pub async fn delete_topic(
        &self,
        engine: &Engine,
        registry: &SharedRegistry,
        name: &str,
    ) -> Result<(), EngineError> {
        let command = MetaCommand::DeleteTopic {
            name: name.to_string(),
        };
        let response = self.metadata.write(command).await.map_err(unavailable)?;
        match response {
            MetaResponse::Applied => {}
            MetaResponse::UnknownTopic
                if self
                    .metadata
                    .topics_being_deleted_here()
                    .get(name)
                    .is_some_and(|removed| !removed.contains(&self.config.node_id)) => {}
            MetaResponse::UnknownTopic => {
                return Err(DispatchError::UnknownTopic(name.to_string()).into())
            }
            other => {
                return Err(DispatchError::InvalidArgument(format!(
                    "the cluster refused the deletion: {other:?}"
                ))
                .into())
            }
        }
        self.remove_here(engine, registry, name).await
    }

    /// Removes deleted cluster topic `name` from this node (the
    /// dispatcher's topic and groups, the replicas and their files, the
    /// registry entry), then tells the cluster so.
    async fn remove_here(
        &self,
        engine: &Engine,
        registry: &SharedRegistry,
        name: &str,
    ) -> Result<(), EngineError> {
        // A deletion committed through another node (the metadata leader)
        // is applied here a moment later; the storage removes nothing
        // before.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.metadata.topics_applied_here().contains_key(name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(DispatchError::Store(StoreError::Unavailable(format!(
                    "the deletion of {name:?} was not applied on this node in time"
                )))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match crate::topics::delete_local_topic(engine, name).await {
            Ok(()) | Err(EngineError::Dispatch(DispatchError::UnknownTopic(_))) => {}
            Err(error) => return Err(error),
        }
        // What the dispatcher no longer knew of (a crash in between) goes
        // too.
        let storage = Arc::clone(&self.storage);
        let topic = name.to_string();
        tokio::task::spawn_blocking(move || storage.remove_topic(&topic))
            .await
            .map_err(unavailable)?
            .map_err(DispatchError::Store)?;
        if let Err(error) = registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            tracing::error!(topic = name, %error, "unregistering a deleted cluster topic");
        }
        // The removal of its groups' replicated journals commits before
        // the name can be freed: a late one would wipe the journal of a
        // new group of the same name.
        if !self.journals.drain(Duration::from_secs(10)).await {
            return Err(DispatchError::Store(StoreError::Unavailable(
                "the deleted topic's group journals were not removed in time".to_string(),
            ))
            .into());
        }
        let removed = MetaCommand::TopicRemoved {
            name: name.to_string(),
            node: self.config.node_id,
        };
        self.metadata.write(removed).await.map_err(unavailable)?;
        tracing::info!(topic = name, "cluster topic removed from this node");
        Ok(())
    }

    /// Makes `dead_letter` (a group's dead-letter topic) a cluster topic
    /// if `topic` is one: the group's acks are replicated, so its dead
    /// letters must be too (a copy on this node's disk alone would be
    /// lost with it, acked and nowhere else). One partition, as the
    /// dispatcher makes dead-letter topics; nothing to do if the cluster
    /// has it already.
    pub async fn ensure_dead_letter_topic(
        &self,
        engine: &Engine,
        topic: &str,
        dead_letter: &str,
    ) -> Result<(), EngineError> {
        if !self.storage.is_replicated(topic) || self.storage.is_replicated(dead_letter) {
            return Ok(());
        }
        match self.create_topic(engine, dead_letter, 1, false).await {
            Ok(_) => Ok(()),
            // The cluster has it: made here too, as the dispatcher may
            // need it before `follow_topics` comes by.
            Err(EngineError::Dispatch(DispatchError::TopicExists(_))) => self
                .create_here(engine, dead_letter, 1, false)
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        }
    }

    /// Creates cluster topic `name` on this node (its partitions as
    /// replicas); one that exists here is left as it is.
    async fn create_here(
        &self,
        engine: &Engine,
        name: &str,
        partitions: u32,
        ordered: bool,
    ) -> Result<TopicConfig, EngineError> {
        self.storage
            .mark_replicated(name)
            .map_err(DispatchError::Store)?;
        match crate::topics::create_local_topic(engine, name, partitions, ordered).await {
            Ok(config) => Ok(config),
            Err(EngineError::Dispatch(DispatchError::TopicExists(_))) => Ok(TopicConfig {
                partitions,
                ordered,
            }),
            Err(error) => Err(error),
        }
    }

    /// Starts the replacement of node `node`, whose disk was lost (it is
    /// down): every group it is a member of (the metadata group, every
    /// partition, the timer log) forgets it and takes it back as a learner
    /// whose replication progress starts over (`GroupNode::readmit`), so
    /// that it votes nowhere and its empty log is not taken for a log gone
    /// back; then records in the metadata group that it may start again
    /// with nothing. Once started, it fetches what it lacks and each
    /// group's leader makes it a voter again when it has caught up
    /// ([`Cluster::follow_topics`]). Returns the groups changed. Run again
    /// after a failure: every step may be taken twice.
    pub async fn replace_node(&self, node: u64) -> Result<Vec<String>, EngineError> {
        if node == self.config.node_id {
            return Err(DispatchError::InvalidArgument(format!(
                "node {node} is this node: run the replacement on a live peer while node {node} \
                 is down"
            ))
            .into());
        }
        let Some(raft_addr) = self.raft_addr(node) else {
            return Err(DispatchError::InvalidArgument(format!(
                "node {node} is not a peer of this cluster"
            ))
            .into());
        };
        if self.metadata.state_machine().removed(node) {
            return Err(DispatchError::InvalidArgument(format!(
                "node {node} was removed from the cluster: it cannot be replaced"
            ))
            .into());
        }
        // Every group it is a member of forgets it (its progress too: its
        // log starts over empty) and takes it back as a learner.
        let mut changed = Vec::new();
        let metadata = &self.metadata;
        if metadata.voters().contains(&node) || metadata.learners().contains(&node) {
            metadata
                .readmit(node, &raft_addr)
                .await
                .map_err(unavailable)?;
            changed.push(metadata.group().to_string());
        }
        for (_, replica) in self.storage.replicas() {
            let group = replica.node();
            if group.voters().contains(&node) || group.learners().contains(&node) {
                group.readmit(node, &raft_addr).await.map_err(unavailable)?;
                changed.push(group.group().to_string());
            }
        }
        self.metadata
            .write(MetaCommand::ReplaceNode { node })
            .await
            .map_err(unavailable)?;
        tracing::warn!(
            node,
            groups = changed.len(),
            "node being replaced: a learner everywhere"
        );
        Ok(changed)
    }

    /// Removes node `node` from the cluster for good (it may be up or
    /// down): records it in the metadata group first (so that the node
    /// stops once it applies it, its peers refuse its start, and the
    /// follow loop takes it out of groups formed later), then every group
    /// it is a member of (the metadata group, every partition, the timer
    /// log) takes it out of its members through its leader. Returns the
    /// groups this node hosts, none of which lists it as a member any
    /// more. Run again after a failure: every step may be taken twice. The node's data directory is then of no use: delete it, and
    /// take it out of every node's `[[cluster.peers]]`.
    pub async fn remove_node(&self, node: u64) -> Result<Vec<String>, EngineError> {
        if node == self.config.node_id {
            return Err(DispatchError::InvalidArgument(format!(
                "node {node} is this node: run the removal on another node"
            ))
            .into());
        }
        if self.raft_addr(node).is_none() {
            return Err(DispatchError::InvalidArgument(format!(
                "node {node} is not a peer of this cluster"
            ))
            .into());
        }
        self.metadata
            .write(MetaCommand::RemoveNode { node })
            .await
            .map_err(unavailable)?;
        // The groups' leaders (this node's follow loop too) may take it
        // out meanwhile: done is done, whoever did it.
        let groups = self.groups();
        for (_, group) in &groups {
            if group.is_member(node) {
                group.remove_member(node).await.map_err(unavailable)?;
            }
        }
        // Committed at each leader; this node's view follows within moments.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Some((name, _)) = groups.iter().find(|(_, group)| group.is_member(node)) {
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "group {name} still lists node {node} as a member here: run the removal again"
                ))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(node, groups = groups.len(), "node removed from the cluster");
        Ok(groups.into_iter().map(|(name, _)| name).collect())
    }

    /// Adds node `node`, new to the cluster, at Raft address `raft` and
    /// client address `client`: records it in the metadata group (its
    /// peers then tell it, when it starts with nothing, to form no group
    /// of its own), then every group this node hosts takes it as a learner
    /// through its leader. Each group's leader makes it a voter once it
    /// caught up, and takes it into groups this node did not host yet
    /// ([`Cluster::follow_topics`]); once it votes everywhere the metadata
    /// leader records that it joined. Returns the groups this node hosts.
    /// Run again after a failure, with the same addresses.
    pub async fn add_node(
        &self,
        node: u64,
        raft: &str,
        client: &str,
    ) -> Result<Vec<String>, EngineError> {
        let invalid = |why: String| EngineError::from(DispatchError::InvalidArgument(why));
        for (name, addr) in [("raft", raft), ("client", client)] {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port != 0) {
                return Err(invalid(format!("{name} address {addr:?} is not host:port")));
            }
        }
        let state = self.metadata.state_machine();
        if state.removed(node) {
            return Err(invalid(format!(
                "node {node} was removed from the cluster: its id cannot join again"
            )));
        }
        let added = state.nodes_added().remove(&node);
        let again = added
            .as_ref()
            .is_some_and(|added| added.raft == raft && added.client == client);
        if !again && state.is_member(node) != Some(false) {
            return Err(invalid(format!(
                "node {node} is a member of this cluster already (replace-node puts back one \
                 whose disk was lost)"
            )));
        }
        let command = MetaCommand::AddNode {
            node,
            raft: raft.to_string(),
            client: client.to_string(),
        };
        match self.metadata.write(command).await.map_err(unavailable)? {
            MetaResponse::Applied => {}
            MetaResponse::NodeRemoved => {
                return Err(invalid(format!(
                    "node {node} was removed from the cluster: its id cannot join again"
                )))
            }
            other => {
                return Err(invalid(format!("the cluster refused the node: {other:?}")));
            }
        }
        let groups = self.groups();
        for (_, group) in &groups {
            if !group.is_member(node) {
                group.readmit(node, raft).await.map_err(unavailable)?;
            }
        }
        tracing::warn!(
            node,
            raft,
            client,
            groups = groups.len(),
            "node added: a learner of every group"
        );
        Ok(groups.into_iter().map(|(name, _)| name).collect())
    }

    /// On a node that joined the cluster: once the metadata group
    /// recorded that it votes in every group, it forms groups as every
    /// member does (its joining marker goes).
    fn note_joined(&self) {
        if !self.joining_marker.exists() {
            return;
        }
        let me = self.config.node_id;
        let state = self.metadata.state_machine();
        if !state.nodes_added().contains_key(&me) || state.joining(me) {
            return;
        }
        match remove_durably(&self.joining_marker) {
            Ok(()) => {
                self.storage.set_forming(true);
                tracing::warn!("this node joined the cluster: a voter of every group");
            }
            Err(error) => tracing::warn!(%error, "removing the joining marker"),
        }
    }

    /// Hands group `group`'s leadership (`meta`, `p/<topic>/<partition>`,
    /// as `GET /api/cluster` names them) to voter `to`: asked of its
    /// leader, which holds the group's writes, waits for `to` to catch up
    /// and lets it win an election (`dmq_replication::transfer`). Answers
    /// once `to` leads.
    pub async fn transfer_leader(&self, group: &str, to: u64) -> Result<(), EngineError> {
        let Some((_, handle)) = self.groups().into_iter().find(|(name, _)| name == group) else {
            return Err(DispatchError::InvalidArgument(format!(
                "this node hosts no group {group:?} (see GET /api/cluster)"
            ))
            .into());
        };
        if !handle.status().voters.contains(&to) {
            return Err(DispatchError::InvalidArgument(format!(
                "node {to} is no voter of group {group}"
            ))
            .into());
        }
        handle.transfer_leader(to).await.map_err(unavailable)?;
        tracing::info!(group, to, "leadership transferred");
        Ok(())
    }

    /// Hands every group node `from` leads (in this node's view) to
    /// another voter, all groups at once, each to the first voter that
    /// takes it: on the leader's view, the most caught-up first (a voter
    /// more than a purge step behind is not tried), otherwise the lowest
    /// id first; each
    /// try gets [`TRANSFER_TRY_WITHIN`]. For maintenance of `from`: stop
    /// it next, and no produce waits for an election. Returns the groups
    /// moved with their new leaders, and those that did not move with why.
    pub async fn move_leaders_off(&self, from: u64) -> LeadersMoved {
        let mut plan = Vec::new();
        for (name, group) in self.groups() {
            let status = group.status();
            if status.leader != Some(from) {
                continue;
            }
            let matched = |id: &u64| {
                status
                    .matched
                    .as_ref()
                    .and_then(|matched| matched.get(id).copied().flatten())
            };
            let mut candidates: Vec<u64> = status
                .voters
                .iter()
                .copied()
                .filter(|id| *id != from)
                .collect();
            // On the leader's view: only voters that follow closely (one
            // that is down would fail after seconds).
            if status.matched.is_some() {
                let last = status.last_log_index.unwrap_or(0);
                candidates.retain(|id| {
                    matched(id).is_some_and(|matched| matched + PROMOTE_WITHIN_ENTRIES >= last)
                });
            }
            candidates.sort_by_key(|id| (std::cmp::Reverse(matched(id)), *id));
            plan.push((name, group, candidates));
        }
        let moved = run_transfers(plan).await;
        tracing::info!(
            from,
            moved = moved.moved.len(),
            not_moved = moved.not_moved.len(),
            "leaderships moved off a node"
        );
        moved
    }

    /// Spreads the leaderships of the groups this node hosts over their
    /// voters, in this node's view: one pass over the groups by name, each
    /// moved from its leader to its voter that leads the fewest groups
    /// when that one leads at least two fewer (so a pass ends with the
    /// counts within about one of each other). After a rolling restart
    /// every group is led by the nodes that stayed up longest.
    pub async fn balance_leaders(&self) -> LeadersMoved {
        self.spread_leaders(true).await
    }

    /// [`Cluster::balance_leaders`] every `leader_balance_interval_s`
    /// until `stop`, by the metadata group's leader only (one balancer in
    /// the cluster), leaving the metadata group's own leadership (and so
    /// the consumers it serves) where it is.
    pub async fn balance_leaders_periodically(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let every = Duration::from_secs(self.config.leader_balance_interval_s);
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if self.metadata.leading_term().is_none() {
                continue;
            }
            let moved = self.spread_leaders(false).await;
            self.balanced_by_itself.inc_by(moved.moved.len() as u64);
            if !moved.moved.is_empty() || !moved.not_moved.is_empty() {
                tracing::info!(
                    moved = moved.moved.len(),
                    not_moved = moved.not_moved.len(),
                    "leaderships balanced automatically"
                );
            }
        }
    }

    /// The balance pass of [`Cluster::balance_leaders`]; the metadata
    /// group is counted but moved only with `metadata`. On the metadata
    /// leader, a node that does not follow the metadata group closely
    /// (down, cut off) is given nothing.
    async fn spread_leaders(&self, metadata: bool) -> LeadersMoved {
        let groups = self.groups();
        let removed = self.metadata.state_machine().nodes_removed();
        let meta = self.metadata.status();
        let following = |id: &u64| {
            let Some(matched) = &meta.matched else {
                return true; // not the leader's view: no judgement
            };
            *id == self.config.node_id
                || matched.get(id).copied().flatten().is_some_and(|matched| {
                    matched + PROMOTE_WITHIN_ENTRIES >= meta.last_log_index.unwrap_or(0)
                })
        };
        let mut led: BTreeMap<u64, usize> = BTreeMap::new();
        let statuses: Vec<_> = groups.iter().map(|(_, group)| group.status()).collect();
        for status in &statuses {
            for voter in status.voters.iter().filter(|id| !removed.contains(id)) {
                led.entry(*voter).or_insert(0);
            }
            if let Some(leader) = status.leader {
                *led.entry(leader).or_insert(0) += 1;
            }
        }
        let mut plan = Vec::new();
        for ((name, group), status) in groups.into_iter().zip(statuses) {
            let Some(leader) = status.leader else {
                continue;
            };
            if !metadata && matches!(group, GroupHandle::Metadata(_)) {
                continue;
            }
            let least = status
                .voters
                .iter()
                .copied()
                .filter(|id| *id != leader && !removed.contains(id) && following(id))
                .min_by_key(|id| (led.get(id).copied().unwrap_or(0), *id));
            let Some(to) = least else {
                continue;
            };
            let (from_count, to_count) = (led[&leader], led[&to]);
            if from_count < to_count + 2 {
                continue;
            }
            led.insert(leader, from_count - 1);
            led.insert(to, to_count + 1);
            plan.push((name, group, vec![to]));
        }
        let moved = run_transfers(plan).await;
        tracing::info!(
            moved = moved.moved.len(),
            not_moved = moved.not_moved.len(),
            "leaderships balanced"
        );
        moved
    }

    /// Before this node stops: hands every group it leads to another
    /// voter ([`Cluster::move_leaders_off`]), so that its peers need no
    /// election to go on.
    pub async fn hand_over_leaderships(&self) {
        if self.metadata.state_machine().removed(self.config.node_id) {
            return;
        }
        let handing = self.move_leaders_off(self.config.node_id);
        let Ok(moved) = tokio::time::timeout(HAND_OVER_WITHIN, handing).await else {
            tracing::warn!("stopping before every leadership was handed over");
            return;
        };
        for (group, why) in &moved.not_moved {
            tracing::warn!(group, why, "stopping while still leading this group");
        }
    }

    /// Every group this node is a member of: the metadata group, then
    /// each replica's (the timer log's included).
    fn groups(&self) -> Vec<(String, GroupHandle)> {
        self.groups_of(&self.storage.replicas())
    }

    /// The metadata group, then the groups of `replicas`.
    fn groups_of(
        &self,
        replicas: &[((String, u32), Arc<dmq_replication::ReplicatedPartitionLog>)],
    ) -> Vec<(String, GroupHandle)> {
        let mut groups = vec![(
            self.metadata.group().to_string(),
            GroupHandle::Metadata(Arc::clone(&self.metadata)),
        )];
        for (_, replica) in replicas {
            groups.push((
                replica.node().group().to_string(),
                GroupHandle::Partition(Arc::clone(replica)),
            ));
        }
        groups
    }

    /// For each group this node leads: takes every node removed from the
    /// cluster out of its members (groups formed after the removal start
    /// with every configured peer, as every node must form them alike).
    async fn drop_removed_members(&self) {
        let removed = self.metadata.state_machine().nodes_removed();
        if removed.is_empty() {
            return;
        }
        for (name, group) in self.groups() {
            let status = group.status();
            if status.leader != Some(self.config.node_id) {
                continue;
            }
            for &node in &removed {
                if !group.is_member(node) {
                    continue;
                }
                match group.remove_member(node).await {
                    Ok(()) => tracing::info!(group = name, node, "removed node taken out"),
                    Err(error) => {
                        tracing::warn!(group = name, node, %error, "taking a removed node out")
                    }
                }
            }
        }
    }

    /// Resolves once this node learns it was removed from the cluster
    /// (polled every [`FOLLOW_TOPICS_EVERY`]): the broker then stops.
    pub async fn removed(&self) {
        let state = self.metadata.state_machine();
        while !state.removed(self.config.node_id) {
            tokio::time::sleep(FOLLOW_TOPICS_EVERY).await;
        }
    }

    /// For each group this node leads: takes in every node being replaced
    /// or added. One the group lacks (a group formed while it was taken
    /// in, whose voters its creation recorded without it; every group, for
    /// an added node) is added as a learner; a learner that has caught up
    /// (its matched index within a purge step of the leader's last) is
    /// made a voter. On the metadata group's leader: once such a node is a
    /// voter of every group it hosts, records that its replacement is over
    /// or that it joined.
    async fn take_in_members(&self) {
        let state = self.metadata.state_machine();
        let replacing = state.nodes_replacing();
        let taking: std::collections::BTreeSet<u64> =
            replacing.union(&state.nodes_joining()).copied().collect();
        if taking.is_empty() {
            return;
        }
        let replicas = self.storage.replicas();
        let groups = self.groups_of(&replicas);
        for (name, group) in &groups {
            let status = group.status();
            if status.leader != Some(self.config.node_id) {
                continue;
            }
            for &node in &taking {
                if !status.voters.contains(&node) && !status.learners.contains(&node) {
                    let Some(addr) = self.raft_addr(node) else {
                        continue;
                    };
                    match group.readmit(node, &addr).await {
                        Ok(()) => tracing::info!(group = name, node, "taken in as a learner"),
                        Err(error) => {
                            tracing::warn!(group = name, node, %error, "taking a node in")
                        }
                    }
                    continue;
                }
                if !status.learners.contains(&node) {
                    continue;
                }
                let matched = status
                    .matched
                    .as_ref()
                    .and_then(|matched| matched.get(&node).copied().flatten());
                let last = status.last_log_index.unwrap_or(0);
                if matched.is_none_or(|matched| matched + PROMOTE_WITHIN_ENTRIES < last) {
                    continue;
                }
                let mut voters = status.voters.clone();
                voters.insert(node);
                match group.set_voters(voters).await {
                    Ok(()) => tracing::info!(group = name, node, "caught-up learner made a voter"),
                    Err(error) => {
                        tracing::warn!(group = name, node, %error, "making a learner a voter")
                    }
                }
            }
        }
        // The metadata group's leader ends a replacement once the node is
        // a voter of every group in its own view (a member that never lost
        // its disk: the replaced node's own view starts as the membership
        // it formed its empty replicas with). Only once this node hosts a
        // replica of every cluster topic's partitions.
        let me = self.config.node_id;
        if self.metadata.leading_term().is_none() {
            return;
        }
        let hosted: std::collections::BTreeSet<(String, u32)> =
            replicas.iter().map(|(key, _)| key.clone()).collect();
        let hosts_all = self
            .metadata
            .topics_applied_here()
            .iter()
            .all(|(name, spec)| (0..spec.partitions).all(|p| hosted.contains(&(name.clone(), p))));
        for &node in &taking {
            let everywhere = groups.iter().all(|(_, group)| {
                let status = group.status();
                // Settled, not only listed: a voter of a joint membership,
                // or of one the leader has not committed, would leave the
                // group without a quorum if an old voter were lost now.
                let voter = status.settled_voter(node);
                // On the replaced node itself (leading the metadata group
                // by now), a view it has from a leader: something applied,
                // and a membership a leader changed unless the group never
                // changed one.
                voter
                    && (node != me
                        || (status.leader.is_some()
                            && status.last_applied_index.unwrap_or(0) > 0
                            && status.last_applied_index >= status.membership_index))
            });
            if !(hosts_all && everywhere) {
                continue;
            }
            let (over, told) = if replacing.contains(&node) {
                (
                    MetaCommand::NodeReplaced { node },
                    "replacement over: a voter of every group",
                )
            } else {
                (
                    MetaCommand::NodeJoined { node },
                    "node joined: a voter of every group",
                )
            };
            match self.metadata.write(over).await {
                Ok(_) => tracing::warn!(node, "{told}"),
                Err(error) => {
                    tracing::warn!(node, %error, "recording that a node was taken in")
                }
            }
        }
    }

    /// Whether the metadata group holds cluster topic `topic` (not being
    /// deleted), as this node knows it once caught up with the group (a
    /// read index at its leader; false if that fails or takes over
    /// `TOPIC_ARRIVAL_WAIT`): a topic created
    /// through another node and not yet applied here is known.
    pub async fn topic_known_to_the_cluster(&self, topic: &str) -> bool {
        let known = |metadata: &dmq_replication::MetadataNode| {
            metadata.topics_applied_here().contains_key(topic)
                && !metadata.topics_being_deleted_here().contains_key(topic)
        };
        if known(&self.metadata) {
            return true;
        }
        // Bounded: an unknown topic during an election is answered as
        // unknown in seconds, not after a whole write timeout.
        let caught_up =
            tokio::time::timeout(crate::engine::TOPIC_ARRIVAL_WAIT, self.metadata.catch_up()).await;
        matches!(caught_up, Ok(Ok(()))) && known(&self.metadata)
    }

    /// Whether `topic` is a cluster topic (its partitions replicated).
    pub fn is_cluster_topic(&self, topic: &str) -> bool {
        self.storage.is_replicated(topic)
    }

    /// Sets cluster topic `record.name`'s registry entry for every node
    /// (owner, approval, rights, retention): answered once committed in
    /// the metadata group; each node then applies it to its registry
    /// ([`Cluster::follow_topics`]). The last entry set wins whole.
    pub async fn publish_registry(&self, record: &TopicRecord) -> Result<(), EngineError> {
        let entry = serde_json::to_string(record)
            .map_err(|e| DispatchError::InvalidArgument(e.to_string()))?;
        match self
            .metadata
            .put_registry_entry(&record.name, entry)
            .await
            .map_err(unavailable)?
        {
            MetaResponse::Applied => {
                // This node holds it already (its caller writes it here).
                self.note_registry_applied(&record.name);
                Ok(())
            }
            MetaResponse::UnknownTopic => {
                Err(DispatchError::UnknownTopic(record.name.clone()).into())
            }
            other => Err(DispatchError::InvalidArgument(format!(
                "the cluster refused the registry entry: {other:?}"
            ))
            .into()),
        }
    }

    /// Marks the replicated entry of `topic` applied here as of now.
    fn note_registry_applied(&self, topic: &str) {
        if let Some(entry) = self.metadata.state_machine().registry_entries().get(topic) {
            self.registry_applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entries
                .insert(topic.to_string(), entry.version);
        }
    }

    /// Writes into `registry` every replicated registry entry this node
    /// has not applied yet, for the topics this node has.
    fn apply_registry(&self, engine: &Engine, registry: &SharedRegistry) {
        let mut followed = self
            .registry_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Every 100 ms: copy the entries only when there is news.
        let version = self.metadata.state_machine().registry_version();
        if followed.whole_at == Some(version) {
            return;
        }
        let entries = self.metadata.state_machine().registry_entries();
        let applied = &mut followed.entries;
        applied.retain(|name, _| entries.contains_key(name));
        let mut whole = true;
        for (name, entry) in entries {
            if applied.get(&name) == Some(&entry.version) {
                continue;
            }
            if engine.topic(&name).is_none() {
                whole = false;
                continue;
            }
            let record: TopicRecord = match serde_json::from_str(&entry.entry) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(topic = name, %error, "a replicated registry entry does not parse");
                    applied.insert(name, entry.version);
                    continue;
                }
            };
            let mut registry = registry.write().unwrap_or_else(|p| p.into_inner());
            if registry.get(&name) != Some(&record) {
                if let Err(error) = registry.put(record) {
                    tracing::warn!(topic = name, %error, "applying a replicated registry entry; retrying");
                    whole = false;
                    continue;
                }
                tracing::info!(topic = name, "registry entry replicated here");
            }
            applied.insert(name, entry.version);
        }
        // Entries may have been set after `version` was read: the next
        // pass then sees a larger version.
        followed.whole_at = whole.then_some(version);
    }

    /// Until `stop` is set: removes from here every topic the metadata
    /// group deleted that this node still has, and creates here every
    /// topic it applied that this node lacks, and registers it (approved
    /// in development mode, pending otherwise, as a topic found at start).
    pub async fn follow_topics(
        self: Arc<Self>,
        engine: Engine,
        registry: SharedRegistry,
        development: bool,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let status = if development {
            TopicStatus::Approved
        } else {
            TopicStatus::Pending
        };
        loop {
            for (name, removed) in self.metadata.topics_being_deleted_here() {
                if removed.contains(&self.config.node_id) {
                    continue;
                }
                if let Err(error) = self.remove_here(&engine, &registry, &name).await {
                    tracing::warn!(topic = name, %error, "removing a deleted cluster topic here; retrying");
                }
            }
            for (name, spec) in self.metadata.topics_applied_here() {
                if engine.topic(&name).is_some() {
                    continue;
                }
                match self
                    .create_here(&engine, &name, spec.partitions, spec.ordered)
                    .await
                {
                    Ok(config) => {
                        tracing::info!(topic = name, "cluster topic created on this node");
                        let mut registry = registry.write().unwrap_or_else(|p| p.into_inner());
                        if registry.get(&name).is_none() {
                            let record = crate::topics::adopted_record(&name, &config, status);
                            if let Err(error) = registry.insert(record) {
                                tracing::error!(topic = name, %error, "registering a cluster topic");
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(topic = name, %error, "creating a cluster topic here; retrying");
                    }
                }
            }
            self.apply_registry(&engine, &registry);
            self.take_in_members().await;
            self.drop_removed_members().await;
            self.note_joined();
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_TOPICS_EVERY) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// What this node knows of the cluster: its peers, the metadata group
    /// and every replica it holds (leader, term, committed and log ends,
    /// and on a leader each peer's lag).
    pub fn status(&self) -> ClusterStatus {
        let partitions = self
            .storage
            .replicas()
            .into_iter()
            .map(|((topic, partition), replica)| {
                let node = replica.node();
                PartitionStatus {
                    topic,
                    partition,
                    committed_end: node.committed_end(),
                    log_end: node.log_end(),
                    raft_rows: node.raft_log().row_count() as u64,
                    forwarded_writes: node.forwarded_writes(),
                    raft: node.status(),
                }
            })
            .collect();
        let state = self.metadata.state_machine();
        let removed = state.nodes_removed();
        let joining = state.nodes_joining();
        let replacing = state.nodes_replacing();
        let mut peers: BTreeMap<u64, (String, String)> = state
            .nodes_added()
            .into_iter()
            .map(|(id, added)| (id, (added.raft, added.client)))
            .collect();
        for peer in &self.config.peers {
            peers.insert(peer.id, (peer.raft.clone(), peer.client.clone()));
        }
        ClusterStatus {
            node_id: self.config.node_id,
            peers: peers
                .into_iter()
                .map(|(id, (raft, client))| PeerStatus {
                    id,
                    raft,
                    client,
                    removed: removed.contains(&id),
                    joining: joining.contains(&id),
                    replacing: replacing.contains(&id),
                })
                .collect(),
            metadata: self.metadata.status(),
            serves_consumers: self.serves_consumers(),
            partitions,
        }
    }

    /// Stops the replicas, the metadata member and the Raft port (the
    /// data stays). The port first takes no new request and lets those in
    /// progress finish (up to 5 s): a write another node forwarded here is
    /// answered, not failed by a stopping Raft, and the forwarding node
    /// retries new ones at the next leader. Once the groups stopped, the
    /// port still answers until no peer forwards here any more
    /// ([`RaftRouter::linger_then_shutdown`]).
    pub async fn shutdown(&self) {
        // The dispatcher stopped and synced its acks: replicate them
        // before the metadata group stops.
        if !self.journals.drain(Duration::from_secs(2)).await {
            tracing::warn!("stopping with consumer groups' acks not yet replicated");
        }
        let delays = Arc::clone(&self.delays);
        if tokio::task::spawn_blocking(move || delays.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("stopping the cluster delays failed");
        }
        self.router.close_and_drain(Duration::from_secs(5)).await;
        self.storage.shutdown().await;
        if let Err(error) = self.metadata.raft().shutdown().await {
            tracing::warn!(%error, "stopping the metadata group");
        }
        // Peers still take this node for the leader of the groups it led
        // until they elect another: they keep forwarding writes here,
        // each answered "unknown group" and tried again. Once none came
        // for an election timeout, they have a new leader: the port stops.
        let quiet = Duration::from_millis(self.config.election_timeout_ms.1);
        self.router
            .linger_then_shutdown(quiet, Duration::from_secs(5))
            .await;
    }
}
