//! One node's member of a Raft group.
//!
//! A [`GroupNode`] owns its group's storage under a data directory, serves
//! the group's Raft RPCs on its address and runs an `openraft::Raft` over
//! them. Two kinds:
//!
//! - [`MetadataNode`]: the metadata group (`raft.journal`,
//!   `metadata.snapshot`); writes go through [`MetadataNode::submit`].
//! - [`PartitionNode`]: a partition's replica (`log/`, `raft.journal`,
//!   `partition.snapshot`); batches go through [`PartitionNode::produce`];
//!   its rows are purged by the `purge` module's task.
//!
//! On the leader the answer comes once the entry is fsynced on a quorum
//! and applied here. A follower answers [`NodeError::NotLeader`] with the
//! leader it knows, for the caller to follow.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{BasicNode, Raft, SnapshotPolicy};

use dmq_log_store::{LogConfig, Record, RecordInput};

use crate::forward_order::{ForwardStream, ForwardTicket};
use crate::network::{ForwardError, ForwardRefusal, GroupTypes, RaftRouter, TcpNetworkFactory};
use crate::partition::{
    AppendedBatch, PartitionCommand, PartitionRaftLog, PartitionStateMachine, PartitionTypes,
    ReplicatedBatch,
};
use crate::purge::PurgeTask;
use crate::repair::{fill_from_peers, RecordSource};
use crate::scrub::ScrubTask;
use crate::{
    MetaCommand, MetaResponse, MetaTypes, MetadataStateMachine, NodeId, RaftLogJournal,
    StorageError, TopicSpec,
};

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (unique in the cluster).
    pub id: NodeId,
    /// Where its Raft log and snapshot live.
    pub data_dir: PathBuf,
    /// The address a group started alone (`start`) serves Raft RPCs on
    /// (`127.0.0.1:0` picks a port); a group started on a node's shared
    /// [`RaftRouter`] (`start_on`) uses the router's.
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
    /// A partition group's rows are purged in steps of this many entries,
    /// below what every member holds (the `purge` module); 0: never.
    pub purge_after_entries: u64,
    /// The other members' Raft addresses: where a replica whose log lost
    /// records fetches them before it starts (`crate::repair`).
    pub peers: Vec<String>,
    /// How long such a replica keeps asking without progress before it
    /// gives up (and stays stopped).
    pub repair_patience: std::time::Duration,
    /// How a partition replica re-reads its records to find damage
    /// (`crate::scrub`); none: never.
    pub scrub: Option<crate::scrub::ScrubConfig>,
}

impl NodeConfig {
    /// A node with the default timings: heartbeats every 50 ms, an
    /// election after 200 to 400 ms without one. openraft adds its leader
    /// lease (the maximum, 400 ms) and, for a follower that knows of a
    /// longer log, twice the maximum. Measured with three processes on
    /// 127.0.0.1: a produce succeeds again 1.57 s (p50) and 2.53 s (p99)
    /// after the leader is killed; with 400 to 800 ms it was 3.55 and
    /// 5.06 s, over issue 12's 3 s (BENCHMARKS.md).
    pub fn new(id: NodeId, data_dir: PathBuf, listen: SocketAddr) -> NodeConfig {
        NodeConfig {
            id,
            data_dir,
            listen,
            heartbeat_ms: 50,
            election_timeout_ms: (200, 400),
            snapshot_after_logs: 1_000,
            purge_after_entries: 4_096,
            peers: Vec::new(),
            repair_patience: std::time::Duration::from_secs(30),
            scrub: Some(crate::scrub::ScrubConfig::default()),
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
    /// The replica lacks records and no peer sent them (`crate::repair`).
    #[error(transparent)]
    Repair(#[from] crate::repair::RepairError),
    /// A forwarded write reached the leader (or may have) but no answer
    /// came: it may or may not be committed.
    #[error("the write's outcome is unknown: {0}")]
    Indeterminate(String),
}

/// One node's member of a Raft group: its openraft handle, its state
/// machine, and the node's Raft port that serves the group under its
/// name. [`MetadataNode`] and [`PartitionNode`] are the two kinds.
pub struct GroupNode<C: GroupTypes, S> {
    id: NodeId,
    group: String,
    router: RaftRouter,
    /// The port was bound for this group alone (`start`), not shared
    /// (`start_on`): stopping the group stops the port.
    owns_router: bool,
    raft: Raft<C>,
    state: S,
    /// A partition replica's rows purge task (stopped with the node).
    purge: Option<PurgeTask>,
    /// A partition replica's re-reading task (stopped with the node).
    scrub: Option<ScrubTask>,
    /// Holds new writes while this node, leading, hands over
    /// (`crate::transfer`).
    gate: Arc<crate::transfer::WriteGate>,
    /// Numbers this node's writes, in the order they are proposed, so
    /// that the leader takes the ones forwarded to it in that order.
    forwards: Arc<ForwardStream>,
}

/// How long [`GroupNode::write`] looks for a leader before it answers
/// [`NodeError::NotLeader`]: longer than an election (the failover p99
/// measured is 2.53 s).
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The pause between two tries of [`GroupNode::write`] while no leader
/// takes the write.
const WRITE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// The metadata group's name on a node's Raft port.
pub const METADATA_GROUP: &str = "meta";

/// A partition group's name on a node's Raft port.
pub fn partition_group(topic: &str, partition: u32) -> String {
    format!("p/{topic}/{partition}")
}

/// A running member of the metadata group.
pub type MetadataNode = GroupNode<MetaTypes, MetadataStateMachine>;

/// A running replica of one partition: its segment log is its Raft log
/// (see [`crate::partition`]).
pub type PartitionNode = GroupNode<PartitionTypes, PartitionStateMachine>;

impl<C: GroupTypes, S> std::fmt::Debug for GroupNode<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNode")
            .field("id", &self.id)
            .field("group", &self.group)
            .field("addr", &self.router.addr())
            .finish()
    }
}

impl<C: GroupTypes, S: RaftStateMachine<C> + Clone> GroupNode<C, S> {
    /// Starts Raft over `log` and `state` as group `group`, served on
    /// `router` (or on a port of its own bound to `config.listen`).
    async fn start_group<LS: RaftLogStorage<C>>(
        config: &NodeConfig,
        router: Option<&RaftRouter>,
        group: &str,
        snapshot_policy: SnapshotPolicy,
        (log, state): (LS, S),
    ) -> Result<GroupNode<C, S>, NodeError> {
        let raft_config = openraft::Config {
            cluster_name: "dmq".to_string(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            // Without snapshots of its own openraft never purges; with them
            // it keeps a tenth of the interval behind the last one.
            max_in_snapshot_log_to_keep: match snapshot_policy {
                SnapshotPolicy::Never => u64::MAX,
                SnapshotPolicy::LogsSinceLast(_) => config.snapshot_after_logs / 10,
            },
            snapshot_policy,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))?;
        let (router, owns_router) = match router {
            Some(router) => (router.clone(), false),
            None => (RaftRouter::bind(config.listen).await?, true),
        };
        let started = Raft::new(
            config.id,
            Arc::new(raft_config),
            TcpNetworkFactory::new(config.id, group, router.source()),
            log,
            state.clone(),
        )
        .await;
        let raft = match started {
            Ok(raft) => raft,
            Err(error) => {
                if owns_router {
                    router.shutdown().await;
                }
                return Err(NodeError::Stopped(error.to_string()));
            }
        };
        let gate = Arc::new(crate::transfer::WriteGate::default());
        router.register(group, raft.clone(), Arc::clone(&gate));
        Ok(GroupNode {
            id: config.id,
            group: group.to_string(),
            router,
            owns_router,
            raft,
            gate,
            forwards: ForwardStream::new(),
            state,
            purge: None,
            scrub: None,
        })
    }
}

impl<C: GroupTypes, S> GroupNode<C, S> {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address this node serves the group's Raft RPCs on.
    pub fn addr(&self) -> SocketAddr {
        self.router.addr()
    }

    /// The group's name on the node's Raft port.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The openraft handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft<C> {
        &self.raft
    }

    /// The term in which this node leads the group, if it does, as its
    /// metrics say now (a deposed leader may believe it a little longer:
    /// not a fence).
    pub fn leading_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.current_leader == Some(self.id)).then_some(metrics.current_term)
    }

    /// The leader this node knows of now, from its metrics (no wait, so
    /// a hint: it may have moved).
    pub fn known_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// How many of this node's writes were forwarded to another node's
    /// Raft port because this node did not lead (each try counted).
    pub fn forwarded_writes(&self) -> u64 {
        self.forwards.forwarded()
    }

    /// Forms a new group of `members` (id -> Raft address). Call it on one
    /// node of a group that was never initialized.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), NodeError> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| NodeError::Initialize(e.to_string()))
    }

    /// Proposes `data` wherever the leader is: here if this node leads,
    /// otherwise forwarded to the leader over its Raft port. Answers once
    /// the write is committed (fsynced on a quorum) and applied on the
    /// leader. While no leader is known, or the one asked says it no
    /// longer leads (nothing was proposed then), it waits and tries again
    /// for up to [`WRITE_TIMEOUT`], then answers [`NodeError::NotLeader`].
    /// A write proposed but not answered within [`WRITE_TIMEOUT`] (a
    /// leader without a quorum, a forwarded write whose answer is lost) is
    /// [`NodeError::Indeterminate`], never retried here: it may yet be
    /// committed.
    pub async fn write(&self, data: C::D) -> Result<C::R, NodeError>
    where
        C::D: Clone,
    {
        self.propose(data).await.await
    }

    /// [`GroupNode::write`] in two steps: proposes `data` now, in call
    /// order with this node's other proposals (if it leads, openraft
    /// appends them in that order; if another node leads, it takes the
    /// ones forwarded to it in that order: `crate::forward_order`), and
    /// returns the answer's future, so a caller may have many writes in
    /// flight.
    pub async fn propose(
        &self,
        data: C::D,
    ) -> impl std::future::Future<Output = Result<C::R, NodeError>> + Send + 'static
    where
        C::D: Clone,
    {
        self.gate.pass().await;
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let ticket = self.forwards.issue();
        let proposed = self.raft.client_write_ff(data.clone()).await;
        let raft = self.raft.clone();
        let group = self.group.clone();
        let peers = self.router.peers().clone();
        async move {
            let first = proposed.map_err(|fatal| NodeError::Stopped(fatal.to_string()))?;
            write_until(raft, group, &peers, data, &ticket, deadline, Some(first)).await
        }
    }

    /// Whether this node's replica was ever part of a formed group.
    pub async fn is_initialized(&self) -> Result<bool, NodeError> {
        self.raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Stopped(e.to_string()))
    }

    /// The leader this node knows of.
    pub async fn leader(&self) -> Option<NodeId> {
        self.raft.current_leader().await
    }

    /// Adds node `id` (Raft address `addr`) as a learner: it receives
    /// every entry and applies it, but does not vote, so it counts for no
    /// quorum (a standby, for instance in another data centre). Answers
    /// once the learner has caught up with the log. Leader only.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<(), NodeError> {
        let node = BasicNode {
            addr: addr.to_string(),
        };
        self.raft
            .add_learner(id, node, true)
            .await
            .map(|_| ())
            .map_err(write_error)
    }

    /// Makes `voters` the group's voters (learners among them are
    /// promoted; voters left out become learners), through a joint
    /// configuration as Raft requires. Leader only.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), NodeError> {
        self.raft
            .change_membership(voters, true)
            .await
            .map(|_| ())
            .map_err(write_error)
    }

    /// Makes `voters` the group's voters, from any member: at the leader
    /// (forwarded over the Raft port if another node leads), retried while
    /// no leader takes it, for up to [`WRITE_TIMEOUT`]. Nothing to do if
    /// they are the voters already. A voter left out stays as a learner.
    pub async fn set_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), NodeError> {
        self.at_leader("the voters did not change", |leader| {
            let voters = voters.clone();
            async move {
                if self.voters() == voters {
                    return Ok(());
                }
                match leader {
                    Leader::Here => self.change_voters(voters).await,
                    Leader::At { addr, ttl } => crate::network::change_voters_at::<C>(
                        self.router.peers(),
                        &addr,
                        &self.group,
                        voters,
                        ttl,
                    )
                    .await
                    .map_err(|error| NodeError::Stopped(format!("{error:?}"))),
                }
            }
        })
        .await
    }

    /// Takes member `node`, whose disk was lost, back as a learner at Raft
    /// address `addr` with its replication progress started over (see
    /// `network::readmit`), from any member: at the leader (forwarded over
    /// the Raft port if another node leads), retried while no leader takes
    /// it, for up to [`WRITE_TIMEOUT`].
    pub async fn readmit(&self, node: NodeId, addr: &str) -> Result<(), NodeError> {
        self.at_leader("the member was not readmitted", |leader| async move {
            match leader {
                Leader::Here => crate::network::readmit(&self.raft, node, addr)
                    .await
                    .map_err(write_error),
                Leader::At { addr: at, ttl } => crate::network::readmit_at::<C>(
                    self.router.peers(),
                    &at,
                    &self.group,
                    node,
                    addr,
                    ttl,
                )
                .await
                .map_err(|error| NodeError::Stopped(format!("{error:?}"))),
            }
        })
        .await
    }

    /// Takes member `node` out of the group for good (see
    /// `network::remove_member`), from any member: at the leader
    /// (forwarded over the Raft port if another node leads), retried while
    /// no leader takes it, for up to [`WRITE_TIMEOUT`]. Nothing to do if it
    /// is no member.
    pub async fn remove_member(&self, node: NodeId) -> Result<(), NodeError> {
        self.at_leader("the member was not removed", |leader| async move {
            if !self.voters().contains(&node) && !self.learners().contains(&node) {
                return Ok(());
            }
            match leader {
                Leader::Here => crate::network::remove_member(&self.raft, node)
                    .await
                    .map_err(write_error),
                Leader::At { addr, ttl } => crate::network::remove_member_at::<C>(
                    self.router.peers(),
                    &addr,
                    &self.group,
                    node,
                    ttl,
                )
                .await
                .map_err(|error| NodeError::Stopped(format!("{error:?}"))),
            }
        })
        .await
    }

    /// Hands the group's leadership to voter `to` (see `crate::transfer`),
    /// from any member: asked of the leader (forwarded over the Raft port
    /// if another node leads), retried while no leader takes it, for up to
    /// [`WRITE_TIMEOUT`]. Answers once `to` leads, as the old leader sees
    /// it; nothing to do if it leads already.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        if !self.voters().contains(&to) {
            return Err(NodeError::Stopped(format!(
                "group {}: node {to} is no voter of the group",
                self.group
            )));
        }
        self.at_leader("the leadership did not move", |leader| async move {
            if self.raft.metrics().borrow().current_leader == Some(to) {
                return Ok(());
            }
            match leader {
                Leader::Here => crate::transfer::transfer_leader(
                    &self.raft,
                    &self.gate,
                    &self.group,
                    self.router.peers(),
                    to,
                )
                .await
                .map_err(|error| NodeError::Stopped(error.to_string())),
                Leader::At { addr, ttl } => crate::network::transfer_leader_at::<C>(
                    self.router.peers(),
                    &addr,
                    &self.group,
                    to,
                    ttl,
                )
                .await
                .map_err(|error| NodeError::Stopped(format!("{error:?}"))),
            }
        })
        .await
    }

    /// Waits until this member applied every entry its group had committed
    /// when this was called: asks the leader for its read index (the
    /// leader confirms with a quorum that it still leads; a new leader's
    /// index covers its own term's first entry, so every entry a former
    /// leader committed too), then waits for its own state machine to reach
    /// it. Within [`WRITE_TIMEOUT`] in all.
    pub async fn catch_up(&self) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let index = self
            .at_leader("no read index", |leader| async move {
                match leader {
                    Leader::Here => match self.raft.get_read_log_id().await {
                        Ok((read, _applied)) => Ok(read.map(|id| id.index)),
                        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(to))) => {
                            Err(NodeError::NotLeader {
                                leader: to.leader_id,
                                addr: to.leader_node.map(|node| node.addr),
                            })
                        }
                        Err(error) => Err(NodeError::Stopped(error.to_string())),
                    },
                    Leader::At { addr, ttl } => crate::network::read_index_at::<C>(
                        self.router.peers(),
                        &addr,
                        &self.group,
                        ttl,
                    )
                    .await
                    .map_err(|error| NodeError::Stopped(format!("{error:?}"))),
                }
            })
            .await?;
        let Some(index) = index else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "catch up")
            .await
            .map(|_| ())
            .map_err(|error| {
                NodeError::Stopped(format!(
                    "group {}: entry {index} not applied here: {error}",
                    self.group
                ))
            })
    }

    /// Runs `change` against the leader this member knows of, again every
    /// 100 ms while it fails, until it succeeds or [`WRITE_TIMEOUT`] passed
    /// (then the last failure, after `what`). Only for changes that may be
    /// made twice.
    async fn at_leader<'a, T, F, Fut>(&'a self, what: &str, change: F) -> Result<T, NodeError>
    where
        F: Fn(Leader) -> Fut,
        Fut: std::future::Future<Output = Result<T, NodeError>> + 'a,
    {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            let (leader, addr) = {
                let metrics = self.raft.metrics().borrow().clone();
                let leader = metrics.current_leader;
                let addr = leader.and_then(|id| {
                    metrics
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .map(|node| node.addr.clone())
                });
                (leader, addr)
            };
            let ttl = WRITE_TIMEOUT.min(deadline - tokio::time::Instant::now());
            let outcome = match (leader, addr) {
                (Some(leader), _) if leader == self.id => change(Leader::Here).await,
                (Some(_), Some(addr)) => change(Leader::At { addr, ttl }).await,
                _ => Err(NodeError::Stopped("no leader known".to_string())),
            };
            let last = match outcome {
                Ok(value) => return Ok(value),
                Err(error) => error.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::Stopped(format!(
                    "group {}: {what}: {last}",
                    self.group
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// What this member knows of its group now (from openraft's metrics).
    pub fn status(&self) -> GroupStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        GroupStatus {
            group: self.group.clone(),
            node_id: self.id,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|id| id.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
            membership_index: metrics.membership_config.log_id().map(|id| id.index),
            matched: metrics.replication.map(|replication| {
                replication
                    .into_iter()
                    .map(|(peer, matched)| (peer, matched.map(|id| id.index)))
                    .collect()
            }),
        }
    }

    /// The learners of the current membership.
    pub fn learners(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .learner_ids()
            .collect()
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

    /// Stops serving the group and stops Raft (the storage stays on
    /// disk); a port of its own is closed too.
    pub async fn shutdown(self) {
        self.router.unregister(&self.group);
        if self.owns_router {
            self.router.shutdown().await;
        }
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
    }
}

/// One member's view of its group ([`GroupNode::status`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    /// The group's name.
    pub group: String,
    /// This member's node.
    pub node_id: NodeId,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its current term.
    pub term: u64,
    /// Its last log entry's index.
    pub last_log_index: Option<u64>,
    /// The last entry it applied.
    pub last_applied_index: Option<u64>,
    /// The voters of its membership (of both configurations while
    /// `joint`).
    pub voters: BTreeSet<NodeId>,
    /// The learners of its membership.
    pub learners: BTreeSet<NodeId>,
    /// The membership is a joint one: a change of voters is half done,
    /// and a quorum of the old voters is needed as well as one of the new.
    pub joint: bool,
    /// The log index of the entry that set its membership (0: the one a
    /// pristine member formed the group with; a leader's later change
    /// has a higher one).
    pub membership_index: Option<u64>,
    /// On the leader only: each peer's last log index known to match the
    /// leader's (`None`: nothing yet). The leader's last log index minus
    /// this is the peer's lag, in entries.
    pub matched: Option<BTreeMap<NodeId, Option<u64>>>,
}

impl GroupStatus {
    /// Whether `node` votes in a settled membership as this member sees
    /// it: a voter, of a membership that is not joint and that this member
    /// applied (so it is committed). Only then does the group survive the
    /// loss of any minority of those voters: while a change from voters
    /// {1, 2} to {1, 2, 3} is joint, or its last step is on the leader
    /// alone, losing node 1 leaves nodes 2 and 3 without a quorum of the
    /// old voters, and the group without a leader until node 1 is back.
    pub fn settled_voter(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
            && !self.learners.contains(&node)
            && !self.joint
            && self.last_applied_index >= self.membership_index
    }
}

/// The rest of [`GroupNode::propose`]: waits for `first` (a proposal
/// already sent to this node's Raft), and while no leader takes the write
/// (nothing proposed), tries again here or at the leader until
/// `deadline`. A forward goes with `ticket`'s place in this node's
/// writes.
async fn write_until<C: GroupTypes>(
    raft: Raft<C>,
    group: String,
    peers: &crate::network::PeerConnections,
    data: C::D,
    ticket: &ForwardTicket,
    deadline: tokio::time::Instant,
    mut first: Option<<C::Responder as openraft::raft::responder::Responder<C>>::Receiver>,
) -> Result<C::R, NodeError>
where
    C::D: Clone,
{
    let not_committed = || {
        // Proposed here, as leader, and not committed in time (no quorum
        // reachable): a later commit may still take it.
        NodeError::Indeterminate(format!(
            "not committed within {} s (no quorum of replicas reachable?)",
            WRITE_TIMEOUT.as_secs()
        ))
    };
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let written = match first.take() {
            Some(receiver) => match tokio::time::timeout(left, receiver).await {
                Err(_) => return Err(not_committed()),
                Ok(Err(_)) => return Err(NodeError::Stopped("the Raft core stopped".to_string())),
                Ok(Ok(answer)) => answer.map_err(RaftError::APIError),
            },
            None => tokio::time::timeout(left, raft.client_write(data.clone()))
                .await
                .map_err(|_| not_committed())?,
        };
        let last = match written {
            Ok(written) => return Ok(written.data),
            Err(error) => match write_error(error) {
                NodeError::NotLeader {
                    addr: Some(addr), ..
                } => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    ticket.note_forwarded();
                    match crate::network::forward::<C>(
                        peers,
                        &addr,
                        &group,
                        &data,
                        ticket.place(),
                        left,
                    )
                    .await
                    {
                        Ok(response) => return Ok(response),
                        Err(ForwardError::Refused(ForwardRefusal::NotLeader { leader, addr })) => {
                            NodeError::NotLeader { leader, addr }
                        }
                        Err(ForwardError::Refused(ForwardRefusal::Failed(why))) => {
                            return Err(NodeError::Indeterminate(why))
                        }
                        Err(ForwardError::Lost(error)) => {
                            return Err(NodeError::Indeterminate(error.to_string()))
                        }
                        Err(ForwardError::NotSent(error)) => NodeError::NotLeader {
                            leader: None,
                            addr: Some(format!("{addr} (unreachable: {error})")),
                        },
                    }
                }
                NodeError::NotLeader { leader, addr } => NodeError::NotLeader { leader, addr },
                other => return Err(other),
            },
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(WRITE_RETRY_PAUSE).await;
    }
}

/// A refused or failed `client_write`, as a [`NodeError`].
/// Where [`GroupNode::at_leader`] found the group's leader.
enum Leader {
    /// This member leads.
    Here,
    /// Another member leads, at this Raft address; its answer is awaited
    /// for at most `ttl`.
    At {
        addr: String,
        ttl: std::time::Duration,
    },
}

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

impl MetadataNode {
    /// Opens the node's storage, binds its RPC address and starts Raft.
    /// A node that was a member before rejoins with its log and vote.
    pub async fn start(config: NodeConfig) -> Result<MetadataNode, NodeError> {
        Self::start_with(config, None).await
    }

    /// [`MetadataNode::start`] on the node's shared Raft port (`config.
    /// listen` is not used).
    pub async fn start_on(
        router: &RaftRouter,
        config: NodeConfig,
    ) -> Result<MetadataNode, NodeError> {
        Self::start_with(config, Some(router)).await
    }

    async fn start_with(
        config: NodeConfig,
        router: Option<&RaftRouter>,
    ) -> Result<MetadataNode, NodeError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let log = RaftLogJournal::open(&config.data_dir.join("raft.journal"))?;
        let state = MetadataStateMachine::open(&config.data_dir.join("metadata.snapshot"))?;
        let policy = SnapshotPolicy::LogsSinceLast(config.snapshot_after_logs);
        Self::start_group(&config, router, METADATA_GROUP, policy, (log, state)).await
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

    /// Sets topic `name`'s registry entry (`entry`, the broker's record
    /// as JSON) for every node, through the leader wherever it is:
    /// answered once committed.
    pub async fn put_registry_entry(
        &self,
        name: &str,
        entry: String,
    ) -> Result<MetaResponse, NodeError> {
        self.write(MetaCommand::RegistryPut {
            name: name.to_string(),
            entry,
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

    /// The node's copy of the metadata state (topics, replicated
    /// journals), as applied here.
    pub fn state_machine(&self) -> &MetadataStateMachine {
        &self.state
    }

    /// The topics applied on this node so far (may lag the leader).
    pub fn topics_applied_here(&self) -> BTreeMap<String, TopicSpec> {
        self.state.topics()
    }

    /// Deleted topics some node has yet to remove, as applied on this node
    /// (with the nodes that have removed them).
    pub fn topics_being_deleted_here(&self) -> BTreeMap<String, BTreeSet<NodeId>> {
        self.state.topics_being_deleted()
    }
}

impl PartitionNode {
    /// Opens the replica's log under `config.data_dir` and starts Raft. A
    /// replica that was a member before rejoins with its log and vote.
    pub async fn start(
        config: NodeConfig,
        log_config: LogConfig,
    ) -> Result<PartitionNode, NodeError> {
        // A port of its own: the one group on it needs no particular name.
        Self::start_with(config, None, "partition", log_config).await
    }

    /// [`PartitionNode::start`] on the node's shared Raft port as the
    /// group `group` (see [`partition_group`]; `config.listen` is not
    /// used).
    pub async fn start_on(
        router: &RaftRouter,
        config: NodeConfig,
        group: &str,
        log_config: LogConfig,
    ) -> Result<PartitionNode, NodeError> {
        Self::start_with(config, Some(router), group, log_config).await
    }

    async fn start_with(
        config: NodeConfig,
        router: Option<&RaftRouter>,
        group: &str,
        log_config: LogConfig,
    ) -> Result<PartitionNode, NodeError> {
        let log = PartitionRaftLog::open(&config.data_dir, log_config)?;
        if let Some(missing) = log.missing() {
            // Never vote or lead with a hole: the records come back first.
            let source = router.and_then(RaftRouter::source);
            let filled =
                fill_from_peers(&log, group, &config.peers, source, config.repair_patience).await?;
            tracing::warn!(
                group,
                from = missing.start,
                to = missing.end,
                records = filled.records,
                batches = filled.batches,
                "damaged or missing records fetched again from a peer"
            );
        }
        let state = PartitionStateMachine::open(
            log.clone(),
            &config.data_dir.join(crate::partition::SNAPSHOT_FILE),
        )?;
        state.fetch_records_with(crate::partition::RecordFetch {
            group: group.to_string(),
            node_id: config.id,
            source: router.and_then(RaftRouter::source),
            patience: config.repair_patience,
        });
        // openraft never snapshots or purges a partition group by itself:
        // its purge task does, below what every member holds.
        let mut node =
            Self::start_group(&config, router, group, SnapshotPolicy::Never, (log, state)).await?;
        RecordSource::serve(&node.router, group, node.state.clone());
        node.purge = PurgeTask::start(
            node.raft.clone(),
            node.state.clone(),
            config.purge_after_entries,
        );
        node.scrub = ScrubTask::start(
            node.raft.clone(),
            node.state.clone(),
            config.data_dir.clone(),
            group.to_string(),
            config.scrub,
        );
        Ok(node)
    }

    /// Appends `records` as one batch through the group: answers once the
    /// batch is fsynced on a quorum, with where it is.
    pub async fn produce(&self, records: Vec<RecordInput>) -> Result<AppendedBatch, NodeError> {
        self.raft
            .client_write(PartitionCommand::Batch(ReplicatedBatch::propose(records)))
            .await
            .map(|written| written.data)
            .map_err(write_error)
    }

    /// After its Raft stopped: waits for a snapshot openraft is still
    /// building and makes later builds write nothing
    /// ([`PartitionStateMachine::close_snapshots`]).
    pub async fn close_snapshots(&self) {
        self.state.close_snapshots().await;
    }

    /// The replica's Raft log (the partition log and its rows).
    pub fn raft_log(&self) -> &PartitionRaftLog {
        self.state.log()
    }

    /// Calls `listener` (on Raft's task: it must not block) each time
    /// committed records are applied on this replica.
    pub fn on_commit(&self, listener: crate::partition::CommitListener) {
        self.state.on_commit(listener);
    }

    /// Every record below this offset is committed (and applied here).
    pub fn committed_end(&self) -> u64 {
        self.state.committed_end()
    }

    /// The end of this replica's log, committed or not.
    pub fn log_end(&self) -> u64 {
        self.state.log().end_offset()
    }

    /// Records `[from, to)` of this replica's log.
    pub fn records(&self, from: u64, to: u64) -> Result<Vec<Record>, NodeError> {
        Ok(self.state.log().records(from, to)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(voters: &[NodeId], joint: bool, applied: u64, membership: u64) -> GroupStatus {
        GroupStatus {
            group: "p/orders/0".into(),
            node_id: 1,
            leader: Some(1),
            term: 3,
            last_log_index: Some(applied.max(membership)),
            last_applied_index: Some(applied),
            voters: voters.iter().copied().collect(),
            learners: BTreeSet::new(),
            joint,
            membership_index: Some(membership),
            matched: None,
        }
    }

    #[test]
    fn a_voter_is_settled_only_in_a_committed_membership_that_is_not_joint() {
        // {1, 2} to {1, 2, 3}: node 3 is listed from the joint step on.
        assert!(!status(&[1, 2, 3], true, 70, 65).settled_voter(3));
        // The last step appended, not applied (not known committed).
        assert!(!status(&[1, 2, 3], false, 65, 66).settled_voter(3));
        assert!(status(&[1, 2, 3], false, 66, 66).settled_voter(3));
        assert!(!status(&[1, 2], false, 66, 66).settled_voter(3));
        let mut learner = status(&[1, 2], false, 66, 66);
        learner.learners.insert(3);
        assert!(!learner.settled_voter(3));
    }
}
