//! The metadata group's state machine: topics and their settings, and the
//! replicated journals of consumer groups on cluster topics.
//!
//! Commands are applied in log order and each gets an answer
//! ([`MetaResponse`]); the same log gives the same state on every node.
//!
//! **Replicated journals.** A consumer group's ack journal on a cluster
//! topic (`crate::journals`) is kept here, as the list of its payloads,
//! each with the log index it was applied at: [`JournalOp::Append`] adds
//! payloads, [`JournalOp::Compact`] replaces those its writer's snapshot
//! covers (the dispatcher's compaction: every payload applied up to the
//! index it names; later ones, which the writer had not seen, stay after
//! the snapshot), [`JournalOp::Remove`] drops the journal. A compaction
//! that replaced everything lost the acks another node made that the
//! compacting node had not merged yet ([`JournalOp::Rewrite`], kept for
//! entries written before). Every node holds every journal, in memory
//! and in snapshots, so a node that takes over a group reads what the
//! others acked. After
//! applying journal changes, the state machine tells its
//! [`JournalListener`] (the node's dispatcher merges the acks into groups
//! it has loaded).
//! A snapshot is the whole state as JSON; the latest one is kept in a file
//! (written to a temporary file, fsynced, renamed) so that a restarted
//! node starts from it and openraft re-applies only the committed entries
//! after it.
//!
//! Invariant: `applied` is the log id of the last entry whose effect is in
//! `topics`; a snapshot's meta names exactly that log id.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::partition::Payload;
use crate::{MetaEntry, MetaTypes, NodeId, StorageError};

/// A topic as the cluster knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    /// Partitions (at least 1).
    pub partitions: u32,
    /// Per-key order (an ordered subscription holds a key's next message
    /// until the previous one is acked).
    pub ordered: bool,
}

/// A change to the cluster's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates a topic.
    CreateTopic {
        /// The topic's name.
        name: String,
        /// Its settings.
        spec: TopicSpec,
    },
    /// Deletes a topic. Its name stays taken until every node of the
    /// cluster has said it removed the topic ([`MetaCommand::TopicRemoved`]).
    DeleteTopic {
        /// The topic's name.
        name: String,
    },
    /// Node `node` removed deleted topic `name` (its replicas and their
    /// files): once every member of the group has, the name is free again.
    TopicRemoved {
        /// The topic's name.
        name: String,
        /// The node.
        node: NodeId,
    },
    /// Records that these nodes have held entries of the metadata group
    /// (a leader saw them match its log): one of them whose disk comes
    /// back empty must not rejoin under its id (`crate::rejoin`).
    HeldData {
        /// The nodes.
        nodes: Vec<NodeId>,
    },
    /// Changes replicated journals, in order.
    Journals {
        /// The node whose dispatcher wrote them.
        origin: NodeId,
        /// The changes.
        writes: Vec<JournalWrite>,
    },
    /// Sets a topic's registry entry: the broker's record of it (owner,
    /// approval, client rights, retention) as JSON, which every node
    /// applies to its own registry. Refused (`UnknownTopic`) for a topic
    /// that does not exist; dropped when the topic is deleted.
    RegistryPut {
        /// The topic's name.
        name: String,
        /// The entry, as the broker serializes it.
        entry: String,
    },
    /// Node `node` lost its disk and was made a learner of every group
    /// (it votes nowhere): it may start again with nothing, under its id,
    /// and is made a voter of each group once it caught up there
    /// (`crate::rejoin`).
    ReplaceNode {
        /// The node.
        node: NodeId,
    },
    /// Node `node` is a voter of every group again: its replacement is
    /// over (a later loss of its disk needs a replacement of its own).
    NodeReplaced {
        /// The node.
        node: NodeId,
    },
    /// Node `node` leaves the cluster for good (`dmq cluster
    /// remove-node`): every group's leader takes it out of its members,
    /// the node stops once it applies this, and its peers tell it not to
    /// start again (`crate::rejoin`). It counts for no topic's removal.
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Node `node`, new to the cluster, joins it (`dmq cluster
    /// add-node`): every group's leader takes it as a learner at `raft`
    /// and makes it a voter once it caught up; it forms no group of its
    /// own meanwhile (`crate::rejoin`). Refused (`NodeRemoved`) for a
    /// removed node.
    AddNode {
        /// The node.
        node: NodeId,
        /// Its Raft address.
        raft: String,
        /// Its binary-protocol address.
        client: String,
    },
    /// Node `node`, added, is a voter of every group: it joined.
    NodeJoined {
        /// The node.
        node: NodeId,
    },
}

/// The addresses of a node added to the cluster after it formed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedNode {
    /// Its Raft address.
    pub raft: String,
    /// Its binary-protocol address.
    pub client: String,
}

/// A change to one replicated journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalWrite {
    /// The journal's name (`group.<topic>.<group>[.<member>]`).
    pub name: String,
    /// What changes.
    pub op: JournalOp,
}

/// What a [`JournalWrite`] does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalOp {
    /// Adds payloads at the end (creating the journal).
    Append(Vec<Payload>),
    /// Replaces the journal's payloads (creating the journal). Written by
    /// earlier versions; [`JournalOp::Compact`] now.
    Rewrite(Vec<Payload>),
    /// Drops the journal.
    Remove,
    /// Replaces the payloads applied at or before log index `covers` (the
    /// last entry whose changes to this journal the writer's groups held
    /// when it took `snapshot`) with `snapshot`; the later ones stay,
    /// after it (creating the journal).
    Compact {
        /// The writer's snapshot of the journal.
        snapshot: Vec<Payload>,
        /// The last log index the snapshot covers.
        covers: u64,
    },
}

/// Told of journal changes: `(origin, index, writes)`, in log order,
/// after they are applied at log index `index`.
pub type JournalListener = Arc<dyn Fn(NodeId, u64, &[JournalWrite]) + Send + Sync>;

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// The command took effect (or the entry was a blank or membership
    /// entry).
    Applied,
    /// CreateTopic of a name that exists: nothing changed.
    TopicExists,
    /// CreateTopic with zero partitions: nothing changed.
    InvalidPartitions,
    /// DeleteTopic of a name that does not exist: nothing changed.
    UnknownTopic,
    /// CreateTopic of a name deleted that a node has yet to remove:
    /// nothing changed.
    TopicBeingDeleted,
    /// AddNode of a node removed from the cluster: nothing changed.
    NodeRemoved,
}

/// The state a snapshot holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MetaState {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    topics: BTreeMap<String, TopicSpec>,
    /// Replicated journals by name: their payloads, oldest first.
    #[serde(default)]
    journals: BTreeMap<String, Vec<Payload>>,
    /// The log index each journal's payload was applied at, in the order
    /// of `journals` (absent in snapshots taken before: taken as 0).
    #[serde(default)]
    journal_indexes: BTreeMap<String, Vec<u64>>,
    /// Nodes a leader saw hold entries of the group.
    #[serde(default)]
    held_data: std::collections::BTreeSet<NodeId>,
    /// Deleted topics whose name is still taken, with the nodes that have
    /// removed them so far.
    #[serde(default)]
    deleting: BTreeMap<String, std::collections::BTreeSet<NodeId>>,
    /// Topics' registry entries, each with the version it was set at.
    #[serde(default)]
    registry: BTreeMap<String, RegistryEntry>,
    /// Registry entries set so far: the next one's version.
    #[serde(default)]
    registry_version: u64,
    /// Nodes being replaced after losing their disk.
    #[serde(default)]
    replacing: std::collections::BTreeSet<NodeId>,
    /// Nodes removed from the cluster for good.
    #[serde(default)]
    removed: std::collections::BTreeSet<NodeId>,
    /// Nodes added after the cluster formed, with their addresses.
    #[serde(default)]
    added: BTreeMap<NodeId, AddedNode>,
    /// Added nodes not yet a voter of every group.
    #[serde(default)]
    joining: std::collections::BTreeSet<NodeId>,
    /// The voters each topic's partition groups form with: the metadata
    /// group's voters when its creation was applied (absent for topics
    /// created before this was kept).
    #[serde(default)]
    formed_with: BTreeMap<String, std::collections::BTreeSet<NodeId>>,
}

/// A topic's registry entry as the metadata group holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Counts the entries set across the group: a later set has a larger
    /// one (every node applies them in the same order).
    pub version: u64,
    /// The entry, as the broker serialized it.
    pub entry: String,
}

impl MetaState {
    /// Applies one journal change, at log index `index`.
    fn apply_journal(&mut self, write: &JournalWrite, index: u64) {
        let name = &write.name;
        match &write.op {
            JournalOp::Append(payloads) => {
                self.journals
                    .entry(name.clone())
                    .or_default()
                    .extend(payloads.iter().cloned());
                let held = self.journals.get(name).map_or(0, Vec::len);
                let indexes = self.journal_indexes.entry(name.clone()).or_default();
                indexes.resize(held - payloads.len(), 0);
                indexes.resize(held, index);
            }
            JournalOp::Rewrite(payloads) => {
                self.journals.insert(name.clone(), payloads.clone());
                self.journal_indexes
                    .insert(name.clone(), vec![index; payloads.len()]);
            }
            JournalOp::Compact { snapshot, covers } => {
                let held = self.journals.remove(name).unwrap_or_default();
                let indexes = self.journal_indexes.remove(name).unwrap_or_default();
                let mut payloads = snapshot.clone();
                let mut at = vec![index; snapshot.len()];
                for (i, payload) in held.into_iter().enumerate() {
                    let applied = indexes.get(i).copied().unwrap_or(0);
                    if applied > *covers {
                        payloads.push(payload);
                        at.push(applied);
                    }
                }
                self.journals.insert(name.clone(), payloads);
                self.journal_indexes.insert(name.clone(), at);
            }
            JournalOp::Remove => {
                self.journals.remove(name);
                self.journal_indexes.remove(name);
            }
        }
    }

    /// Applies `command`, the entry at log index `index`.
    fn apply(&mut self, command: &MetaCommand, index: u64) -> MetaResponse {
        match command {
            MetaCommand::HeldData { nodes } => {
                self.held_data.extend(nodes.iter().copied());
                MetaResponse::Applied
            }
            MetaCommand::Journals { writes, .. } => {
                for write in writes {
                    self.apply_journal(write, index);
                }
                MetaResponse::Applied
            }
            MetaCommand::CreateTopic { spec, .. } if spec.partitions == 0 => {
                MetaResponse::InvalidPartitions
            }
            MetaCommand::CreateTopic { name, spec } => {
                if self.topics.contains_key(name) {
                    return MetaResponse::TopicExists;
                }
                if self.deleting.contains_key(name) {
                    return MetaResponse::TopicBeingDeleted;
                }
                self.topics.insert(name.clone(), *spec);
                let voters = self
                    .membership
                    .membership()
                    .voter_ids()
                    .filter(|id| !self.removed.contains(id))
                    .collect();
                self.formed_with.insert(name.clone(), voters);
                MetaResponse::Applied
            }
            MetaCommand::ReplaceNode { node } => {
                self.replacing.insert(*node);
                MetaResponse::Applied
            }
            MetaCommand::NodeReplaced { node } => {
                self.replacing.remove(node);
                MetaResponse::Applied
            }
            MetaCommand::AddNode { node, .. } if self.removed.contains(node) => {
                MetaResponse::NodeRemoved
            }
            MetaCommand::AddNode { node, raft, client } => {
                self.added.insert(
                    *node,
                    AddedNode {
                        raft: raft.clone(),
                        client: client.clone(),
                    },
                );
                self.joining.insert(*node);
                MetaResponse::Applied
            }
            MetaCommand::NodeJoined { node } => {
                self.joining.remove(node);
                MetaResponse::Applied
            }
            MetaCommand::RemoveNode { node } => {
                self.removed.insert(*node);
                self.replacing.remove(node);
                self.joining.remove(node);
                // It removes no deleted topic's files any more: the names
                // it held up are freed by the others alone.
                let members = self.members();
                self.deleting.retain(|_, removed| {
                    removed.insert(*node);
                    !members.iter().all(|member| removed.contains(member))
                });
                MetaResponse::Applied
            }
            MetaCommand::RegistryPut { name, entry } => {
                if !self.topics.contains_key(name) {
                    return MetaResponse::UnknownTopic;
                }
                self.registry_version += 1;
                self.registry.insert(
                    name.clone(),
                    RegistryEntry {
                        version: self.registry_version,
                        entry: entry.clone(),
                    },
                );
                MetaResponse::Applied
            }
            MetaCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => {
                    self.registry.remove(name);
                    self.formed_with.remove(name);
                    self.deleting.insert(name.clone(), Default::default());
                    MetaResponse::Applied
                }
                None => MetaResponse::UnknownTopic,
            },
            MetaCommand::TopicRemoved { name, node } => {
                let members = self.members();
                if let Some(removed) = self.deleting.get_mut(name) {
                    removed.insert(*node);
                    if members.iter().all(|member| removed.contains(member)) {
                        self.deleting.remove(name);
                    }
                }
                MetaResponse::Applied
            }
        }
    }

    /// The group's members (voters and learners), less the nodes removed
    /// from the cluster: those whose removal of a deleted topic counts.
    fn members(&self) -> Vec<NodeId> {
        self.membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !self.removed.contains(id))
            .collect()
    }
}

/// A snapshot as stored in its file.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Shared {
    state: MetaState,
    snapshot: Option<StoredSnapshot>,
    snapshot_path: PathBuf,
    snapshots_built: u64,
}

/// The metadata state machine. Clones share the state (the snapshot
/// builder and readers use clones).
#[derive(Clone)]
pub struct MetadataStateMachine {
    shared: Arc<Mutex<Shared>>,
    /// Told of every journal change applied.
    listener: Arc<Mutex<Option<JournalListener>>>,
}

impl std::fmt::Debug for MetadataStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataStateMachine")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

fn snapshot_error(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

impl MetadataStateMachine {
    /// Opens the state machine whose latest snapshot is kept at
    /// `snapshot_path` (starting from it if it exists).
    pub fn open(snapshot_path: &Path) -> Result<MetadataStateMachine, Box<StorageError>> {
        fn read_error(e: &(dyn std::error::Error + 'static)) -> Box<StorageError> {
            Box::new(
                StorageIOError::read_snapshot(None, openraft::AnyError::from_dyn(e, None)).into(),
            )
        }
        let (state, snapshot) = match std::fs::read(snapshot_path) {
            Ok(bytes) => {
                let stored: StoredSnapshot =
                    serde_json::from_slice(&bytes).map_err(|e| read_error(&e))?;
                let state: MetaState =
                    serde_json::from_slice(&stored.data).map_err(|e| read_error(&e))?;
                (state, Some(stored))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (MetaState::default(), None),
            Err(e) => return Err(read_error(&e)),
        };
        Ok(MetadataStateMachine {
            shared: Arc::new(Mutex::new(Shared {
                state,
                snapshot,
                snapshot_path: snapshot_path.to_path_buf(),
                snapshots_built: 0,
            })),
            listener: Arc::default(),
        })
    }

    /// Tells `listener` of every journal change applied from now on,
    /// whichever node wrote it (one written here may be applied again
    /// after a restart, after the dispatcher loaded its group).
    pub fn set_journal_listener(&self, listener: JournalListener) {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    /// Whether a leader saw node `node` hold entries of the group (as
    /// applied on this node).
    pub fn held_data(&self, node: NodeId) -> bool {
        self.lock().state.held_data.contains(&node)
    }

    /// A replicated journal's payloads, as applied on this node.
    pub fn journal(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.journal_at(name).0
    }

    /// [`MetadataStateMachine::journal`], and the index of the last entry
    /// applied on this node (the payloads hold every change to the
    /// journal up to it), read together.
    pub fn journal_at(&self, name: &str) -> (Option<Vec<Vec<u8>>>, u64) {
        let shared = self.lock();
        let payloads = shared
            .state
            .journals
            .get(name)
            .map(|payloads| payloads.iter().map(|p| p.0.to_vec()).collect());
        (payloads, shared.state.applied.map_or(0, |id| id.index))
    }

    /// The bytes of a replicated journal's payloads (0: none).
    pub fn journal_bytes(&self, name: &str) -> u64 {
        self.lock().state.journals.get(name).map_or(0, |payloads| {
            payloads.iter().map(|p| p.0.len() as u64 + 8).sum()
        })
    }

    /// The names of the replicated journals that start with `prefix`.
    pub fn journal_names(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .state
            .journals
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether node `node` is being replaced (it lost its disk and votes
    /// nowhere until it caught up), as applied on this node.
    pub fn replacing(&self, node: NodeId) -> bool {
        self.lock().state.replacing.contains(&node)
    }

    /// The nodes being replaced, as applied on this node.
    pub fn nodes_replacing(&self) -> std::collections::BTreeSet<NodeId> {
        self.lock().state.replacing.clone()
    }

    /// Whether node `node` was removed from the cluster, as applied on
    /// this node.
    pub fn removed(&self, node: NodeId) -> bool {
        self.lock().state.removed.contains(&node)
    }

    /// The nodes removed from the cluster, as applied on this node.
    pub fn nodes_removed(&self) -> std::collections::BTreeSet<NodeId> {
        self.lock().state.removed.clone()
    }

    /// The nodes added to the cluster after it formed, with their
    /// addresses, as applied on this node.
    pub fn nodes_added(&self) -> BTreeMap<NodeId, AddedNode> {
        self.lock().state.added.clone()
    }

    /// Whether node `node` was added and is not yet a voter of every
    /// group, as applied on this node.
    pub fn joining(&self, node: NodeId) -> bool {
        self.lock().state.joining.contains(&node)
    }

    /// The nodes added and not yet voters of every group, as applied on
    /// this node.
    pub fn nodes_joining(&self) -> std::collections::BTreeSet<NodeId> {
        self.lock().state.joining.clone()
    }

    /// The voters topic `topic`'s partition groups form with, if its
    /// creation was applied with them kept.
    pub fn formed_with(&self, topic: &str) -> Option<std::collections::BTreeSet<NodeId>> {
        self.lock().state.formed_with.get(topic).cloned()
    }

    /// Whether node `node` is a member (voter or learner) of the metadata
    /// group, as applied on this node; `None` while no membership was
    /// applied here.
    pub fn is_member(&self, node: NodeId) -> Option<bool> {
        let shared = self.lock();
        let membership = shared.state.membership.membership();
        let member = if membership.nodes().next().is_none() {
            None
        } else {
            Some(membership.nodes().any(|(id, _)| *id == node))
        };
        member
    }

    /// How many registry entries were set so far, as applied on this
    /// node: unchanged, [`MetadataStateMachine::registry_entries`] holds
    /// nothing new.
    pub fn registry_version(&self) -> u64 {
        self.lock().state.registry_version
    }

    /// The topics' registry entries as applied on this node so far.
    pub fn registry_entries(&self) -> BTreeMap<String, RegistryEntry> {
        self.lock().state.registry.clone()
    }

    /// The topics as applied on this node so far.
    pub fn topics(&self) -> BTreeMap<String, TopicSpec> {
        self.lock().state.topics.clone()
    }

    /// Deleted topics some node has yet to remove, with the nodes that
    /// have removed them.
    pub fn topics_being_deleted(&self) -> BTreeMap<String, std::collections::BTreeSet<NodeId>> {
        self.lock().state.deleting.clone()
    }

    /// The log id of the last applied entry.
    pub fn applied(&self) -> Option<LogId<NodeId>> {
        self.lock().state.applied
    }
}

impl Shared {
    /// Makes `snapshot` the current one, durably.
    fn keep(&mut self, snapshot: StoredSnapshot) -> Result<(), std::io::Error> {
        let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
        let temporary = self.snapshot_path.with_extension("tmp");
        {
            let file = std::fs::File::create(&temporary)?;
            std::io::Write::write_all(&mut &file, &bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &self.snapshot_path)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.snapshot = Some(snapshot);
        Ok(())
    }
}

impl RaftSnapshotBuilder<MetaTypes> for MetadataStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes>, StorageError> {
        let mut shared = self.lock();
        let data = serde_json::to_vec(&shared.state).map_err(snapshot_error)?;
        shared.snapshots_built += 1;
        let snapshot_id = match shared.state.applied {
            Some(applied) => format!(
                "{}-{}-{}",
                applied.leader_id, applied.index, shared.snapshots_built
            ),
            None => format!("none-{}", shared.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: shared.state.applied,
            last_membership: shared.state.membership.clone(),
            snapshot_id,
        };
        shared
            .keep(StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })
            .map_err(snapshot_error)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<MetaTypes> for MetadataStateMachine {
    type SnapshotBuilder = MetadataStateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError,
    > {
        let shared = self.lock();
        Ok((shared.state.applied, shared.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, StorageError>
    where
        I: IntoIterator<Item = MetaEntry> + Send,
        I::IntoIter: Send,
    {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut told = Vec::new();
        let mut responses = Vec::new();
        {
            let mut shared = self.lock();
            for entry in entries {
                shared.state.applied = Some(entry.log_id);
                let response = match &entry.payload {
                    EntryPayload::Blank => MetaResponse::Applied,
                    EntryPayload::Normal(command) => {
                        if let (Some(_), MetaCommand::Journals { origin, writes }) =
                            (&listener, command)
                        {
                            told.push((*origin, entry.log_id.index, writes.clone()));
                        }
                        shared.state.apply(command, entry.log_id.index)
                    }
                    EntryPayload::Membership(membership) => {
                        shared.state.membership =
                            StoredMembership::new(Some(entry.log_id), membership.clone());
                        MetaResponse::Applied
                    }
                };
                responses.push(response);
            }
        }
        // Outside the state's lock: the listener may read journals.
        if let Some(listener) = listener {
            for (origin, index, writes) in told {
                listener(origin, index, &writes);
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: MetaState = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let writes: Vec<JournalWrite> = state
            .journals
            .iter()
            .map(|(name, payloads)| JournalWrite {
                name: name.clone(),
                op: JournalOp::Rewrite(payloads.clone()),
            })
            .collect();
        {
            let mut shared = self.lock();
            shared
                .keep(StoredSnapshot {
                    meta: meta.clone(),
                    data,
                })
                .map_err(snapshot_error)?;
            shared.state = state;
        }
        // A snapshot from the leader replaces every journal: the listener
        // hears each as a rewrite from no node in particular (0).
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(listener) = listener {
            if !writes.is_empty() {
                listener(0, meta.last_log_id.map_or(0, |id| id.index), &writes);
            }
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MetaTypes>>, StorageError> {
        let shared = self.lock();
        Ok(shared.snapshot.as_ref().map(|stored| Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(stored.data.clone())),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use openraft::{CommittedLeaderId, Entry};

    fn payload(bytes: &'static [u8]) -> Payload {
        Payload(Bytes::from_static(bytes))
    }

    fn entry(index: u64, origin: NodeId, name: &str, op: JournalOp) -> MetaEntry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(MetaCommand::Journals {
                origin,
                writes: vec![JournalWrite {
                    name: name.to_string(),
                    op,
                }],
            }),
        }
    }

    #[tokio::test]
    async fn journals_are_appended_rewritten_removed_and_carried_by_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let told: Arc<Mutex<Vec<(NodeId, String)>>> = Arc::default();
        let seen = Arc::clone(&told);
        state.set_journal_listener(Arc::new(move |origin, _index, writes| {
            let mut seen = seen.lock().unwrap();
            seen.extend(writes.iter().map(|w| (origin, w.name.clone())));
        }));
        let entries = vec![
            entry(1, 1, "group.t.g", JournalOp::Append(vec![payload(b"1")])),
            entry(2, 2, "group.t.g", JournalOp::Append(vec![payload(b"2")])),
            entry(3, 1, "group.t.h", JournalOp::Rewrite(vec![payload(b"s")])),
            entry(4, 1, "group.t.h", JournalOp::Append(vec![payload(b"3")])),
            entry(5, 1, "group.u.g", JournalOp::Append(vec![payload(b"x")])),
            entry(6, 3, "group.u.g", JournalOp::Remove),
        ];
        state.apply(entries).await.unwrap();
        assert_eq!(state.journal("group.t.g").unwrap(), [b"1", b"2"]);
        assert_eq!(state.journal("group.t.h").unwrap(), [b"s", b"3"]);
        assert_eq!(state.journal("group.u.g"), None);
        assert_eq!(state.journal_names("group.t."), ["group.t.g", "group.t.h"]);
        assert_eq!(state.journal_bytes("group.t.g"), 18);
        assert_eq!(told.lock().unwrap().len(), 6, "every change is told");
        assert_eq!(told.lock().unwrap()[1], (2, "group.t.g".to_string()));

        // A node that installs the snapshot has every journal, and hears
        // each as a rewrite.
        let snapshot = state.build_snapshot().await.unwrap();
        let mut other = MetadataStateMachine::open(&dir.path().join("b.snapshot")).unwrap();
        let rewrites: Arc<Mutex<Vec<JournalWrite>>> = Arc::default();
        let heard = Arc::clone(&rewrites);
        other.set_journal_listener(Arc::new(move |origin, index, writes| {
            assert_eq!(origin, 0);
            assert_eq!(index, 6, "the snapshot's last entry");
            heard.lock().unwrap().extend(writes.iter().cloned());
        }));
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(other.journal("group.t.h").unwrap(), [b"s", b"3"]);
        assert_eq!(
            rewrites.lock().unwrap()[0],
            JournalWrite {
                name: "group.t.g".to_string(),
                op: JournalOp::Rewrite(vec![payload(b"1"), payload(b"2")]),
            }
        );
        // And a restart from the snapshot file keeps them.
        let reopened = MetadataStateMachine::open(&dir.path().join("b.snapshot")).unwrap();
        assert_eq!(reopened.journal("group.t.g").unwrap(), [b"1", b"2"]);
    }

    /// A compaction replaces what its writer's snapshot covers and keeps
    /// what came after (another node's acks the writer had not merged),
    /// also across a snapshot of the state machine. Replacing everything
    /// (the old `Rewrite`) dropped those acks from the copy: a node that
    /// loaded the group from it later delivered the messages again.
    #[tokio::test]
    async fn a_compaction_keeps_what_its_snapshot_did_not_cover() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let compact = |snapshot: &'static [u8], covers: u64| JournalOp::Compact {
            snapshot: vec![payload(snapshot)],
            covers,
        };
        let entries = vec![
            entry(1, 1, "group.t.g", JournalOp::Append(vec![payload(b"a1")])),
            entry(2, 2, "group.t.g", JournalOp::Append(vec![payload(b"b2")])),
            entry(3, 2, "group.t.g", JournalOp::Append(vec![payload(b"b3")])),
            // Node 1 had merged node 2's first append, not its second.
            entry(4, 1, "group.t.g", compact(b"s1", 2)),
        ];
        state.apply(entries).await.unwrap();
        assert_eq!(state.journal("group.t.g").unwrap(), [&b"s1"[..], b"b3"]);
        // Node 2 compacts having merged up to node 1's compaction, not
        // its append after it.
        state
            .apply(vec![
                entry(5, 1, "group.t.g", JournalOp::Append(vec![payload(b"a5")])),
                entry(6, 2, "group.t.g", compact(b"s2", 4)),
            ])
            .await
            .unwrap();
        assert_eq!(state.journal("group.t.g").unwrap(), [&b"s2"[..], b"a5"]);
        let (payloads, applied) = state.journal_at("group.t.g");
        assert_eq!(payloads.unwrap().len(), 2);
        assert_eq!(applied, 6);
        // The indexes travel with a snapshot of the state machine.
        let mut other = copied_by_snapshot(&mut state, &dir.path().join("b.snapshot")).await;
        other
            .apply(vec![entry(7, 1, "group.t.g", compact(b"s3", 6))])
            .await
            .unwrap();
        assert_eq!(other.journal("group.t.g").unwrap(), [b"s3"]);
        // The old rewrite still replaces everything.
        other
            .apply(vec![
                entry(8, 2, "group.t.g", JournalOp::Append(vec![payload(b"b8")])),
                entry(9, 1, "group.t.g", JournalOp::Rewrite(vec![payload(b"r")])),
            ])
            .await
            .unwrap();
        assert_eq!(other.journal("group.t.g").unwrap(), [b"r"]);
    }

    /// A state machine (its snapshot file at `path`) that installed a
    /// snapshot of `state`.
    async fn copied_by_snapshot(
        state: &mut MetadataStateMachine,
        path: &Path,
    ) -> MetadataStateMachine {
        let snapshot = state.build_snapshot().await.unwrap();
        let mut other = MetadataStateMachine::open(path).unwrap();
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        other
    }

    fn command(index: u64, command: MetaCommand) -> MetaEntry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[tokio::test]
    async fn registry_entries_need_their_topic_carry_versions_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let put = |name: &str, entry: &str| MetaCommand::RegistryPut {
            name: name.to_string(),
            entry: entry.to_string(),
        };
        let spec = TopicSpec {
            partitions: 1,
            ordered: false,
        };
        let answers = state
            .apply(vec![
                command(1, put("orders", "early")),
                command(
                    2,
                    MetaCommand::CreateTopic {
                        name: "orders".to_string(),
                        spec,
                    },
                ),
                command(3, put("orders", "pending")),
                command(4, put("orders", "approved")),
            ])
            .await
            .unwrap();
        assert_eq!(answers[0], MetaResponse::UnknownTopic);
        let entries = state.registry_entries();
        assert_eq!(
            entries["orders"],
            RegistryEntry {
                version: 2,
                entry: "approved".to_string()
            }
        );
        // A snapshot carries them.
        let other = copied_by_snapshot(&mut state, &dir.path().join("b.snapshot")).await;
        assert_eq!(other.registry_entries(), entries);
        // Deleting the topic drops its entry.
        state
            .apply(vec![command(
                5,
                MetaCommand::DeleteTopic {
                    name: "orders".to_string(),
                },
            )])
            .await
            .unwrap();
        assert!(state.registry_entries().is_empty());
    }

    #[tokio::test]
    async fn a_deleted_topics_name_is_free_once_every_member_removed_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let members =
            openraft::Membership::new(vec![std::collections::BTreeSet::from([1, 2, 3])], None);
        let create = || MetaCommand::CreateTopic {
            name: "t".to_string(),
            spec: TopicSpec {
                partitions: 1,
                ordered: false,
            },
        };
        let removed = |node| MetaCommand::TopicRemoved {
            name: "t".to_string(),
            node,
        };
        let answers = state
            .apply(vec![
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                    payload: EntryPayload::Membership(members),
                },
                command(2, create()),
                command(
                    3,
                    MetaCommand::DeleteTopic {
                        name: "t".to_string(),
                    },
                ),
                command(4, create()),
                command(5, removed(1)),
                command(6, removed(2)),
                command(7, removed(2)),
                command(8, create()),
            ])
            .await
            .unwrap();
        use MetaResponse::*;
        assert_eq!(
            answers,
            [
                Applied,
                Applied,
                Applied,
                TopicBeingDeleted,
                Applied,
                Applied,
                Applied,
                TopicBeingDeleted
            ]
        );
        assert!(state.topics().is_empty());
        assert_eq!(
            state.topics_being_deleted()["t"],
            std::collections::BTreeSet::from([1, 2])
        );
        // A restart (from a snapshot) remembers who removed it.
        let mut other = copied_by_snapshot(&mut state, &dir.path().join("b.snapshot")).await;
        let answers = other
            .apply(vec![command(9, removed(3)), command(10, create())])
            .await
            .unwrap();
        assert_eq!(answers, [Applied, Applied]);
        assert!(other.topics_being_deleted().is_empty());
        assert!(other.topics().contains_key("t"));
    }
    /// A removed node is remembered (across a snapshot), ends a
    /// replacement of itself, and no deleted topic's name waits for it.
    #[tokio::test]
    async fn a_removed_node_is_remembered_and_frees_the_names_it_held_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let members =
            openraft::Membership::new(vec![std::collections::BTreeSet::from([1, 2, 3])], None);
        let topic = |name: &str| MetaCommand::CreateTopic {
            name: name.to_string(),
            spec: TopicSpec {
                partitions: 1,
                ordered: false,
            },
        };
        let delete = |name: &str| MetaCommand::DeleteTopic {
            name: name.to_string(),
        };
        let removed = |name: &str, node| MetaCommand::TopicRemoved {
            name: name.to_string(),
            node,
        };
        state
            .apply(vec![
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                    payload: EntryPayload::Membership(members),
                },
                command(2, topic("t")),
                command(3, topic("u")),
                command(4, delete("t")),
                command(5, delete("u")),
                command(6, removed("t", 1)),
                command(7, removed("t", 2)),
                command(8, removed("u", 1)),
                command(9, MetaCommand::ReplaceNode { node: 3 }),
            ])
            .await
            .unwrap();
        assert_eq!(state.topics_being_deleted().len(), 2, "node 3 holds both");
        assert!(!state.removed(3));
        state
            .apply(vec![command(10, MetaCommand::RemoveNode { node: 3 })])
            .await
            .unwrap();
        assert!(state.removed(3));
        assert!(!state.replacing(3), "a removed node is replaced no more");
        // `t` waited for node 3 only; `u` still waits for node 2.
        assert_eq!(
            state.topics_being_deleted().keys().collect::<Vec<_>>(),
            ["u"]
        );
        let mut other = copied_by_snapshot(&mut state, &dir.path().join("b.snapshot")).await;
        assert_eq!(other.nodes_removed(), std::collections::BTreeSet::from([3]));
        other
            .apply(vec![command(11, removed("u", 2))])
            .await
            .unwrap();
        assert!(other.topics_being_deleted().is_empty());
    }

    /// An added node is joining until it joined; a removed id cannot be
    /// added; each topic records the voters its groups form with (the
    /// membership's voters when its creation was applied, less removed
    /// nodes), across a snapshot too.
    #[tokio::test]
    async fn added_nodes_join_and_topics_record_the_voters_they_form_with() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = MetadataStateMachine::open(&dir.path().join("a.snapshot")).unwrap();
        let voters = |ids: &[NodeId]| -> std::collections::BTreeSet<NodeId> {
            ids.iter().copied().collect()
        };
        let membership = |index, ids: &[NodeId]| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Membership(openraft::Membership::new(vec![voters(ids)], None)),
        };
        let topic = |name: &str| MetaCommand::CreateTopic {
            name: name.to_string(),
            spec: TopicSpec {
                partitions: 1,
                ordered: false,
            },
        };
        let add = |node| MetaCommand::AddNode {
            node,
            raft: format!("127.0.0.1:{node}000"),
            client: format!("127.0.0.1:{node}001"),
        };
        assert_eq!(state.is_member(4), None, "no membership applied yet");
        let answers = state
            .apply(vec![
                membership(1, &[1, 2, 3]),
                command(2, topic("t")),
                command(3, add(4)),
                command(4, topic("u")),
                membership(5, &[1, 2, 3, 4]),
                command(6, MetaCommand::NodeJoined { node: 4 }),
                command(7, MetaCommand::RemoveNode { node: 3 }),
                command(8, topic("v")),
                command(9, add(3)),
            ])
            .await
            .unwrap();
        assert_eq!(answers[2], MetaResponse::Applied);
        assert_eq!(answers[8], MetaResponse::NodeRemoved);
        assert_eq!(state.formed_with("t"), Some(voters(&[1, 2, 3])));
        assert_eq!(
            state.formed_with("u"),
            Some(voters(&[1, 2, 3])),
            "4 joining"
        );
        assert_eq!(
            state.formed_with("v"),
            Some(voters(&[1, 2, 4])),
            "3 removed"
        );
        assert!(!state.joining(4));
        assert_eq!(state.is_member(4), Some(true));
        assert_eq!(state.is_member(5), Some(false));
        assert_eq!(state.nodes_added()[&4].client, "127.0.0.1:4001");
        assert!(!state.nodes_added().contains_key(&3));
        let mut other = copied_by_snapshot(&mut state, &dir.path().join("b.snapshot")).await;
        assert_eq!(other.formed_with("v"), Some(voters(&[1, 2, 4])));
        other.apply(vec![command(10, add(5))]).await.unwrap();
        assert!(other.joining(5));
        let delete = MetaCommand::DeleteTopic {
            name: "t".to_string(),
        };
        other.apply(vec![command(11, delete)]).await.unwrap();
        assert_eq!(other.formed_with("t"), None);
    }
}
