//! # dmq-replication: DMQ on openraft
//!
//! The building blocks of a replicated DMQ (issue 12), on the `openraft`
//! consensus engine; no consensus code of our own. This crate owns:
//!
//! - [`RaftLogJournal`]: a Raft log and vote kept in one CRC-framed,
//!   fsynced journal (the dispatcher's [`FileJournal`]): an entry or a vote
//!   is durable before openraft is told so, which is what makes "committed"
//!   mean "fdatasync'd on a quorum".
//! - [`MetadataStateMachine`]: the metadata group's state (topics and their
//!   settings), its snapshots, and their file.
//! - [`network`]: the Raft RPCs between nodes over TCP: [`RaftRouter`],
//!   one port per node serving every group it hosts, and the client side.
//! - [`MetadataNode`]: one member of the metadata group: storage, state
//!   machine, transport and the `openraft::Raft` that drives them.
//! - [`partition`]: a partition's Raft group whose Raft log is the
//!   partition's segment log (no second copy of a message), and
//!   [`PartitionNode`], one replica of it.
//!
//! - [`cluster_storage`]: the dispatcher's storage on a cluster node
//!   (`dmqd` with a `[cluster]` section): cluster topics' partitions are
//!   replicas, read below their committed end.
//! - [`proposals`]: a replica's produces, merged into fewer Raft entries
//!   when they come faster than its group commits them.
//!
//! - [`journals`]: consumer groups' ack journals on cluster topics,
//!   replicated through the metadata group.
//! - [`delays`]: delayed messages of cluster topics: a replicated timer
//!   log every node follows, fired by the node leading it.
//! - [`rejoin`]: a node whose disk came back empty does not rejoin under
//!   its old id.
//! - [`repair`]: a replica whose partition log lost records (a batch
//!   whose CRC fails) gets them back from a peer before it starts.
//!
//! What is not here yet (see issue 12's notes and docs/replication.md):
//! the rest of the dispatcher's state (delivery attempts, dead letters,
//! tombstones) and snapshots of partition data.
//!
//! # Invariants
//!
//! - A log entry, a truncation, a purge and a vote are in the journal and
//!   fsynced before openraft learns they are done.
//! - The state machine is a function of the snapshot file and the log:
//!   on restart openraft re-applies the committed entries after the
//!   snapshot (the journal keeps the committed log id).
//! - Nothing read from a socket or a file panics: frames are bounded and
//!   decoded into typed errors.
//!
//! [`FileJournal`]: dmq_dispatcher::storage::FileJournal

use std::io::Cursor;

pub mod cluster_storage;
pub mod delays;
pub mod forward_order;
pub mod journals;
pub mod log_store;
pub mod metadata;
pub mod network;
pub mod node;
pub mod partition;
pub mod proposals;
mod purge;
pub mod rejoin;
pub mod repair;
pub mod scrub;
pub mod transfer;

pub use cluster_storage::{
    ClusterMembers, ClusterStorage, ReplicatedAppend, ReplicatedPartitionLog,
};
pub use delays::ReplicatedDelays;
pub use journals::{ReplicatedJournal, ReplicatedJournals};
pub use log_store::RaftLogJournal;
pub use metadata::{
    AddedNode, JournalListener, JournalOp, JournalWrite, MetaCommand, MetaResponse,
    MetadataStateMachine, RegistryEntry, TopicSpec,
};
pub use network::RaftRouter;
pub use node::{
    partition_group, GroupNode, GroupStatus, MetadataNode, NodeConfig, NodeError, PartitionNode,
    METADATA_GROUP,
};
pub use partition::{
    AppendedBatch, CommittedProducerBatch, PartitionCommand, PartitionRaftLog,
    PartitionStateMachine, PartitionTypes, ReplicatedBatch,
};

/// A node's id in a cluster.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The metadata group's types: commands are [`MetaCommand`], nodes
    /// are known by their Raft RPC address.
    pub MetaTypes:
        D = MetaCommand,
        R = MetaResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<MetaTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of the metadata group.
pub type MetaEntry = openraft::Entry<MetaTypes>;
/// A storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;
