//! One member of the metadata group.
//!
//! A [`MetadataNode`] owns its Raft log journal and state machine under
//! its data directory (`raft.journal`, `metadata.snapshot`), serves Raft
//! RPCs on its address and runs an `openraft::Raft` over them. Writes go
//! through [`MetadataNode::submit`] on the leader: the answer comes once
//! the entry is fsynced on a quorum and applied here. A follower answers
//! [`NodeError::NotLeader`] with the leader it knows, for the caller to
//! follow.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, Raft, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use dmq_log_store::{LogConfig, Record, RecordInput};

use crate::network::{serve, GroupTypes, TcpNetworkFactory};
use crate::partition::{
    AppendedBatch, PartitionRaftLog, PartitionStateMachine, PartitionTypes, ReplicatedBatch,
};
use crate::{
    MetaCommand, MetaResponse, MetaTypes, MetadataStateMachine, NodeId, RaftLogJournal,
    StorageError, TopicSpec,
};

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (unique in the cluster, not 0).
    pub id: NodeId,
    /// Where its Raft log and snapshot live.
    pub data_dir: PathBuf,
    /// The address to serve Raft RPCs on (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `election_timeout_ms` starts an election.
    pub election_timeout_ms: (u64, u64),
    /// A snapshot is taken after this many entries since the last one;
    /// the log is then purged up to a tenth of that behind it (a peer
    /// further behind is sent the snapshot).
    pub snapshot_after_logs: u64,
}

impl NodeConfig {
    /// A node with the default timings: heartbeats every 100 ms, an
    /// election after 400 to 800 ms without one (failover well within the
    /// 3 s issue 12 asks for).
    pub fn new(id: NodeId, data_dir: PathBuf, listen: SocketAddr) -> NodeConfig {
        NodeConfig {
            id,
            data_dir,
            listen,
            heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            snapshot_after_logs: 1_000,
        }
    }
}

/// What can go wrong running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The Raft log or the state machine could not be read or written.
    #[error("storage: {0}")]
    Storage(#[from] Box<StorageError>),
    /// The data directory or the RPC address.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Invalid Raft timings.
    #[error("configuration: {0}")]
    Config(String),
    /// This node is not the leader; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?} at {addr:?})")]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        addr: Option<String>,
    },
    /// The cluster could not be initialized (already initialized, or an
    /// invalid membership).
    #[error("initialize: {0}")]
    Initialize(String),
    /// The Raft node stopped (a storage failure or a shutdown).
    #[error("raft stopped: {0}")]
    Stopped(String),
}

/// A Raft group started on a node: its handle, its RPC address and the
/// task serving it.
pub(crate) struct RunningGroup<C: GroupTypes> {
    pub(crate) raft: Raft<C>,
    pub(crate) addr: SocketAddr,
    pub(crate) server: JoinHandle<()>,
}

impl<C: GroupTypes> RunningGroup<C> {
    /// Binds `config.listen` and starts Raft over `log` and `state`.
    pub(crate) async fn start<LS, SM>(
        config: &NodeConfig,
        snapshot_policy: SnapshotPolicy,
        log: LS,
        state: SM,
    ) -> Result<RunningGroup<C>, NodeError>
    where
        LS: RaftLogStorage<C>,
        SM: RaftStateMachine<C>,
    {
        let raft_config = openraft::Config {
            cluster_name: "dmq".to_string(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            snapshot_policy,
            max_in_snapshot_log_to_keep: config.snapshot_after_logs / 10,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            TcpNetworkFactory::new(config.id),
            log,
            state,
        )
        .await
        .map_err(|e| NodeError::Stopped(e.to_string()))?;
        let server = tokio::spawn(serve(listener, raft.clone()));
        Ok(RunningGroup { raft, addr, server })
    }

    /// Stops the RPC server and Raft (the storage stays on disk).
    pub(crate) async fn shutdown(raft: Raft<C>, server: JoinHandle<()>) {
        server.abort();
        let _ = server.await;
        if let Err(error) = raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
    }
}

/// Forms a new cluster of `members` (id -> Raft address) with `raft`.
pub(crate) async fn initialize<C: GroupTypes>(
    raft: &Raft<C>,
    members: BTreeMap<NodeId, String>,
) -> Result<(), NodeError> {
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    raft.initialize(nodes)
        .await
        .map_err(|e| NodeError::Initialize(e.to_string()))
}

/// A refused or failed `client_write`, as a [`NodeError`].
fn write_error(error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> NodeError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => NodeError::NotLeader {
            leader: forward.leader_id,
            addr: forward.leader_node.map(|node| node.addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            NodeError::Stopped(error.to_string())
        }
        RaftError::Fatal(fatal) => NodeError::Stopped(fatal.to_string()),
    }
}

/// A running member of the metadata group.
pub struct MetadataNode {
    id: NodeId,
    addr: SocketAddr,
    raft: Raft<MetaTypes>,
    state: MetadataStateMachine,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for MetadataNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataNode")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetadataNode {
    /// Opens the node's storage, binds its RPC address and starts Raft.
    /// A node that was a member before rejoins with its log and vote.
    pub async fn start(config: NodeConfig) -> Result<MetadataNode, NodeError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let log = RaftLogJournal::open(&config.data_dir.join("raft.journal"))?;
        let state = MetadataStateMachine::open(&config.data_dir.join("metadata.snapshot"))?;
        let policy = SnapshotPolicy::LogsSinceLast(config.snapshot_after_logs);
        let running = RunningGroup::start(&config, policy, log, state.clone()).await?;
        Ok(MetadataNode {
            id: config.id,
            addr: running.addr,
            raft: running.raft,
            state,
            server: running.server,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address this node serves Raft RPCs on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The openraft handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft<MetaTypes> {
        &self.raft
    }

    /// Forms a new cluster of `members` (id → Raft address). Call it on
    /// one node of a cluster that was never initialized.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), NodeError> {
        initialize(&self.raft, members).await
    }

    /// The leader this node knows of.
    pub async fn leader(&self) -> Option<NodeId> {
        self.raft.current_leader().await
    }

    /// Proposes `command`; answers once it is committed (fsynced on a
    /// quorum) and applied on this node.
    pub async fn submit(&self, command: MetaCommand) -> Result<MetaResponse, NodeError> {
        self.raft
            .client_write(command)
            .await
            .map(|written| written.data)
            .map_err(write_error)
    }

    /// Creates a topic through the group.
    pub async fn create_topic(
        &self,
        name: &str,
        spec: TopicSpec,
    ) -> Result<MetaResponse, NodeError> {
        self.submit(MetaCommand::CreateTopic {
            name: name.to_string(),
            spec,
        })
        .await
    }

    /// The topics, as of a read that no earlier committed write can be
    /// missing from (the leader confirms it still leads first).
    pub async fn topics(&self) -> Result<BTreeMap<String, TopicSpec>, NodeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.state.topics()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                forward,
            ))) => Err(NodeError::NotLeader {
                leader: forward.leader_id,
                addr: forward.leader_node.map(|node| node.addr),
            }),
            Err(RaftError::APIError(other)) => Err(NodeError::Stopped(other.to_string())),
            Err(RaftError::Fatal(fatal)) => Err(NodeError::Stopped(fatal.to_string())),
        }
    }

    /// The topics applied on this node so far (may lag the leader).
    pub fn topics_applied_here(&self) -> BTreeMap<String, TopicSpec> {
        self.state.topics()
    }

    /// The voters of the current membership.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Stops Raft and the RPC server (the storage stays on disk).
    pub async fn shutdown(self) {
        RunningGroup::shutdown(self.raft, self.server).await;
    }
}

/// A running replica of one partition: its segment log is its Raft log
/// (see [`crate::partition`]).
pub struct PartitionNode {
    id: NodeId,
    addr: SocketAddr,
    raft: Raft<PartitionTypes>,
    log: PartitionRaftLog,
    state: PartitionStateMachine,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for PartitionNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionNode")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl PartitionNode {
    /// Opens the replica's log under `config.data_dir` and starts Raft. A
    /// replica that was a member before rejoins with its log and vote.
    pub async fn start(
        config: NodeConfig,
        log_config: LogConfig,
    ) -> Result<PartitionNode, NodeError> {
        let log = PartitionRaftLog::open(&config.data_dir, log_config)?;
        let state = PartitionStateMachine::new(log.clone());
        let running =
            RunningGroup::start(&config, SnapshotPolicy::Never, log.clone(), state.clone()).await?;
        Ok(PartitionNode {
            id: config.id,
            addr: running.addr,
            raft: running.raft,
            log,
            state,
            server: running.server,
        })
    }

    /// This replica's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Its Raft RPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The openraft handle.
    pub fn raft(&self) -> &Raft<PartitionTypes> {
        &self.raft
    }

    /// Forms the group of `members` (id -> Raft address).
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), NodeError> {
        initialize(&self.raft, members).await
    }

    /// The leader this replica knows of.
    pub async fn leader(&self) -> Option<NodeId> {
        self.raft.current_leader().await
    }

    /// Appends `records` as one batch through the group: answers once the
    /// batch is fsynced on a quorum, with where it is.
    pub async fn produce(&self, records: Vec<RecordInput>) -> Result<AppendedBatch, NodeError> {
        self.raft
            .client_write(ReplicatedBatch::propose(records))
            .await
            .map(|written| written.data)
            .map_err(write_error)
    }

    /// Every record below this offset is committed (and applied here).
    pub fn committed_end(&self) -> u64 {
        self.state.committed_end()
    }

    /// The end of this replica's log, committed or not.
    pub fn log_end(&self) -> u64 {
        self.log.end_offset()
    }

    /// Records `[from, to)` of this replica's log.
    pub fn records(&self, from: u64, to: u64) -> Result<Vec<Record>, NodeError> {
        Ok(self.log.records(from, to)?)
    }

    /// Stops the RPC server and Raft (the log stays on disk).
    pub async fn shutdown(self) {
        RunningGroup::shutdown(self.raft, self.server).await;
    }
}
