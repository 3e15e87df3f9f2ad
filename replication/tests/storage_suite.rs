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
