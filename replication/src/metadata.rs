//! The metadata group's state machine: topics and their settings.
//!
//! Commands are applied in log order and each gets an answer
//! ([`MetaResponse`]); the same log gives the same state on every node.
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
    /// Deletes a topic.
    DeleteTopic {
        /// The topic's name.
        name: String,
    },
}

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
}

/// The state a snapshot holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MetaState {
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    topics: BTreeMap<String, TopicSpec>,
}

impl MetaState {
    fn apply(&mut self, command: &MetaCommand) -> MetaResponse {
        match command {
            MetaCommand::CreateTopic { spec, .. } if spec.partitions == 0 => {
                MetaResponse::InvalidPartitions
            }
            MetaCommand::CreateTopic { name, spec } => {
                if self.topics.contains_key(name) {
                    return MetaResponse::TopicExists;
                }
                self.topics.insert(name.clone(), *spec);
                MetaResponse::Applied
            }
            MetaCommand::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => MetaResponse::Applied,
                None => MetaResponse::UnknownTopic,
            },
        }
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
#[derive(Debug, Clone)]
pub struct MetadataStateMachine {
    shared: Arc<Mutex<Shared>>,
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
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topics as applied on this node so far.
    pub fn topics(&self) -> BTreeMap<String, TopicSpec> {
        self.lock().state.topics.clone()
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
        let mut shared = self.lock();
        let mut responses = Vec::new();
        for entry in entries {
            shared.state.applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Blank => MetaResponse::Applied,
                EntryPayload::Normal(command) => shared.state.apply(command),
                EntryPayload::Membership(membership) => {
                    shared.state.membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    MetaResponse::Applied
                }
            };
            responses.push(response);
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
        let mut shared = self.lock();
        shared
            .keep(StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .map_err(snapshot_error)?;
        shared.state = state;
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
