//! openraft's own storage test suite, run against the journal-backed Raft
//! log and the metadata state machine (issue 12: the storage traits are
//! tested with the engine's suite).

use dmq_replication::{MetaTypes, MetadataStateMachine, RaftLogJournal};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct JournalStoreBuilder;

impl StoreBuilder<MetaTypes, RaftLogJournal, MetadataStateMachine, tempfile::TempDir>
    for JournalStoreBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RaftLogJournal, MetadataStateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RaftLogJournal::open(&dir.path().join("raft.journal")).map_err(|e| *e)?;
        let state =
            MetadataStateMachine::open(&dir.path().join("metadata.snapshot")).map_err(|e| *e)?;
        Ok((dir, log, state))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(JournalStoreBuilder).expect("openraft storage suite");
}

struct PartitionStoreBuilder;

impl
    StoreBuilder<
        dmq_replication::PartitionTypes,
        dmq_replication::PartitionRaftLog,
        dmq_replication::PartitionStateMachine,
        tempfile::TempDir,
    > for PartitionStoreBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            tempfile::TempDir,
            dmq_replication::PartitionRaftLog,
            dmq_replication::PartitionStateMachine,
        ),
        StorageError<u64>,
    > {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dmq_replication::PartitionRaftLog::open(
            dir.path(),
            dmq_log_store::LogConfig::default(),
        )
        .map_err(|e| *e)?;
        let state = dmq_replication::PartitionStateMachine::new(log.clone());
        Ok((dir, log, state))
    }
}

#[test]
fn openraft_storage_suite_passes_over_a_partition_log() {
    Suite::test_all(PartitionStoreBuilder).expect("openraft storage suite");
}
