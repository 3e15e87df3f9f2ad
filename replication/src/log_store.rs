//! A Raft group's rows, vote and committed id in one journal.
//!
//! `RowJournal` keeps one row per Raft entry: the whole entry for the
//! metadata group ([`RaftLogJournal`]), or where the entry's records are
//! for a partition group ([`crate::partition`]). Every change is an
//! operation appended to a CRC-framed journal and fsynced before openraft
//! is told it is done: a row, a truncation of the uncommitted tail, a
//! purge of the applied head, the vote and the committed log id; except
//! a partition's rows of record batches, which an open can rebuild from
//! the batches (`RowJournal::write_unsynced`, `LogOp::RebuildTail`),
//! and which the next synced operation makes durable. Opening
//! replays the operations; a torn tail (a crash in the middle of a write)
//! is cut by the journal, and whatever was cut was never reported
//! durable. When dead operations outnumber live ones the journal is
//! rewritten (atomically: a temporary file, fsync, rename).
//!
//! Rows are also kept in memory: the metadata group's log is small and
//! purged after each snapshot; a partition's rows are small (its records
//! are in the segment log), but not yet bounded (issue 12).
//!
//! The journal's fsync runs on the calling task's thread under a mutex:
//! fine for metadata writes and for this first partition step, to be
//! moved off the runtime for the message path.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use dmq_dispatcher::storage::{FileJournal, Journal};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{CommittedLeaderId, LogId, LogState, RaftLogReader, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{MetaEntry, MetaTypes, NodeId, StorageError};

/// What the journal keeps per Raft entry: the whole entry (the metadata
/// group), or a reference to where its data lives (a partition group).
pub(crate) trait Row:
    Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    /// The entry's log id.
    fn log_id(&self) -> LogId<NodeId>;
}

impl Row for MetaEntry {
    fn log_id(&self) -> LogId<NodeId> {
        self.log_id
    }
}

/// One durable change to the log, as the journal stores it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "R: Row")]
pub(crate) enum LogOp<R> {
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    Entry(R),
    /// Entries at this index and after are gone (a conflicting tail).
    Truncate(u64),
    /// Entries up to this log id are gone (applied and in a snapshot); the
    /// last of them is kept aside.
    Purge(LogId<NodeId>, Option<R>),
    /// Whether rows lost in a crash may be rebuilt from what they name,
    /// and the leader id they carry: see [`RowJournal::rebuild_tail`].
    RebuildTail(Option<CommittedLeaderId<NodeId>>),
}

/// A group's rows, vote and committed id, durable in one journal.
#[derive(Debug)]
pub(crate) struct RowJournal<R> {
    journal: Box<dyn Journal>,
    pub(crate) rows: BTreeMap<u64, R>,
    pub(crate) vote: Option<Vote<NodeId>>,
    pub(crate) committed: Option<LogId<NodeId>>,
    pub(crate) last_purged: Option<LogId<NodeId>>,
    /// The last row purged (a partition needs the log end it names).
    pub(crate) last_purged_row: Option<R>,
    /// `Some(leader)`: rows appended without a sync
    /// ([`RowJournal::write_unsynced`]) and lost in a crash may be rebuilt
    /// from the partition log at open, each under this leader id, their
    /// indexes following the last row kept (`crate::partition` upholds
    /// it). `None`: records past the last row are cut at open. Changed
    /// only by synced operations (set, or cleared by a truncation), so the
    /// value in memory is always the durable one.
    pub(crate) rebuild_tail: Option<CommittedLeaderId<NodeId>>,
    /// Operations in the journal since it was last rewritten.
    ops: usize,
    /// Operations appended since the last sync.
    unsynced: usize,
}

/// Rewrite the journal when it holds more than this many operations
/// beyond twice the live rows.
const REWRITE_SLACK: usize = 1_024;

/// Rows [`RowJournal::write_unsynced`] lets wait for a sync, at most.
const UNSYNCED_MAX: usize = 4_096;

impl<R: Row> RowJournal<R> {
    /// Opens (creating if needed) the journal file at `path`.
    pub(crate) fn open(path: &Path) -> Result<RowJournal<R>, Box<StorageError>> {
        let (journal, payloads) = FileJournal::open("raft-log", path)
            .map_err(|e| Box::new(StorageIOError::read_logs(&e).into()))?;
        Self::from_journal(Box::new(journal), payloads)
    }

    /// Builds the rows from a journal and the payloads it held when opened.
    pub(crate) fn from_journal(
        journal: Box<dyn Journal>,
        payloads: Vec<Vec<u8>>,
    ) -> Result<RowJournal<R>, Box<StorageError>> {
        let mut state = RowJournal {
            journal,
            rows: BTreeMap::new(),
            vote: None,
            committed: None,
            last_purged: None,
            last_purged_row: None,
            rebuild_tail: None,
            ops: payloads.len(),
            unsynced: 0,
        };
        for payload in payloads {
            let op: LogOp<R> = serde_json::from_slice(&payload)
                .map_err(|e| Box::new(StorageIOError::read_logs(&e).into()))?;
            state.apply(op);
        }
        Ok(state)
    }

    fn apply(&mut self, op: LogOp<R>) {
        match op {
            LogOp::Vote(vote) => self.vote = Some(vote),
            LogOp::Committed(committed) => self.committed = committed,
            LogOp::Entry(row) => {
                self.rows.insert(row.log_id().index, row);
            }
            LogOp::Truncate(index) => {
                self.rows.split_off(&index);
                self.rebuild_tail = None;
            }
            LogOp::RebuildTail(leader) => self.rebuild_tail = leader,
            LogOp::Purge(log_id, last) => {
                let kept = self.rows.split_off(&(log_id.index + 1));
                let purged = std::mem::replace(&mut self.rows, kept);
                if self.last_purged.is_none_or(|l| l < log_id) {
                    self.last_purged = Some(log_id);
                    if let Some(row) = purged.into_values().next_back().or(last) {
                        self.last_purged_row = Some(row);
                    }
                }
            }
        }
    }

    /// Appends `ops` to the journal and makes them durable, then applies
    /// them in memory.
    pub(crate) fn write(&mut self, ops: Vec<LogOp<R>>) -> Result<(), std::io::Error> {
        self.append_ops(&ops)?;
        self.sync()?;
        self.apply_all(ops);
        Ok(())
    }

    /// Appends rows to the journal without a sync (the next synced write
    /// makes them durable; every [`UNSYNCED_MAX`] a sync comes anyway)
    /// and applies them in memory. Only for rows a crash may lose because
    /// they can be rebuilt ([`RowJournal::rebuild_tail`]).
    pub(crate) fn write_unsynced(&mut self, rows: Vec<R>) -> Result<(), std::io::Error> {
        let ops: Vec<LogOp<R>> = rows.into_iter().map(LogOp::Entry).collect();
        self.append_ops(&ops)?;
        self.unsynced += ops.len();
        self.apply_all(ops);
        if self.unsynced >= UNSYNCED_MAX {
            self.sync()?;
        }
        Ok(())
    }

    /// Appends `ops` to the journal's pending bytes (durable at the next
    /// sync).
    fn append_ops(&mut self, ops: &[LogOp<R>]) -> Result<(), std::io::Error> {
        for op in ops {
            let payload = serde_json::to_vec(op).map_err(std::io::Error::other)?;
            self.journal.append(&payload);
        }
        Ok(())
    }

    /// Makes every operation appended so far durable.
    fn sync(&mut self) -> Result<(), std::io::Error> {
        self.journal.sync().map_err(std::io::Error::other)?;
        self.unsynced = 0;
        Ok(())
    }

    /// Applies operations now in the journal to the state in memory.
    fn apply_all(&mut self, ops: Vec<LogOp<R>>) {
        self.ops += ops.len();
        for op in ops {
            self.apply(op);
        }
    }

    /// Purges rows up to `log_id`, durably, and rewrites the journal with
    /// only the live state once dead operations dominate it.
    pub(crate) fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), std::io::Error> {
        let last = self
            .rows
            .range(..=log_id.index)
            .next_back()
            .map(|(_, r)| r.clone());
        self.write(vec![LogOp::Purge(log_id, last)])?;
        if self.ops <= 2 * self.rows.len() + REWRITE_SLACK {
            return Ok(());
        }
        let mut ops = Vec::with_capacity(self.rows.len() + 3);
        let mut push = |op: &LogOp<R>| serde_json::to_vec(op).map(|payload| ops.push(payload));
        if let Some(vote) = self.vote {
            push(&LogOp::Vote(vote)).map_err(std::io::Error::other)?;
        }
        push(&LogOp::Committed(self.committed)).map_err(std::io::Error::other)?;
        if let Some(purged) = self.last_purged {
            push(&LogOp::Purge(purged, self.last_purged_row.clone()))
                .map_err(std::io::Error::other)?;
        }
        for row in self.rows.values() {
            push(&LogOp::Entry(row.clone())).map_err(std::io::Error::other)?;
        }
        if self.rebuild_tail.is_some() {
            push(&LogOp::RebuildTail(self.rebuild_tail)).map_err(std::io::Error::other)?;
        }
        self.journal.rewrite(&ops).map_err(std::io::Error::other)?;
        self.ops = ops.len();
        Ok(())
    }

    /// openraft's view of the log.
    pub(crate) fn log_state<C>(&self) -> LogState<C>
    where
        C: openraft::RaftTypeConfig<NodeId = NodeId>,
    {
        let last = self.rows.values().next_back().map(Row::log_id);
        LogState {
            last_purged_log_id: self.last_purged,
            last_log_id: last.or(self.last_purged),
        }
    }
}

/// Tells openraft how an append ended (its callback fires either way) and
/// returns the error it expects from the storage call.
#[allow(clippy::result_large_err)] // openraft's storage calls return it by value
pub(crate) fn report_append<C>(
    written: Result<(), std::io::Error>,
    callback: LogFlushed<C>,
) -> Result<(), StorageError>
where
    C: openraft::RaftTypeConfig<NodeId = NodeId>,
{
    match written {
        Ok(()) => {
            callback.log_io_completed(Ok(()));
            Ok(())
        }
        Err(error) => {
            let reported = StorageIOError::write_logs(&error).into();
            callback.log_io_completed(Err(error));
            Err(reported)
        }
    }
}

/// The metadata group's Raft log: whole entries in a row journal.
/// Clones share the same log (openraft reads through a clone while it
/// writes).
#[derive(Debug, Clone)]
pub struct RaftLogJournal {
    state: Arc<Mutex<RowJournal<MetaEntry>>>,
}

impl RaftLogJournal {
    /// Opens (creating if needed) the log in the journal file at `path`.
    pub fn open(path: &Path) -> Result<RaftLogJournal, Box<StorageError>> {
        Ok(RaftLogJournal {
            state: Arc::new(Mutex::new(RowJournal::open(path)?)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RowJournal<MetaEntry>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of entries held (after purges).
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// True if the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RaftLogReader<MetaTypes> for RaftLogJournal {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<MetaEntry>, StorageError> {
        Ok(self
            .lock()
            .rows
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<MetaTypes> for RaftLogJournal {
    type LogReader = RaftLogJournal;

    async fn get_log_state(&mut self) -> Result<LogState<MetaTypes>, StorageError> {
        Ok(self.lock().log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        blocking(|| self.lock().write(vec![LogOp::Vote(*vote)]))
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock().vote)
    }

    /// Durable before it returns. Writing it lazily (with the next entry)
    /// was tried, for one fsync less per round: a leader that restarts
    /// keeps its leadership from its committed vote without a new term, so
    /// until replication resumes its commit index is what was persisted,
    /// and a linearizable read right after a whole-cluster restart missed
    /// the last acknowledged write (`a_whole_cluster_restart_keeps_every_
    /// committed_write` failed 3 times in 3).
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        blocking(|| self.lock().write(vec![LogOp::Committed(committed)]))
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<MetaTypes>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = MetaEntry> + Send,
        I::IntoIter: Send,
    {
        let ops: Vec<LogOp<MetaEntry>> = entries.into_iter().map(LogOp::Entry).collect();
        let written = blocking(|| self.lock().write(ops));
        report_append(written, callback)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        blocking(|| self.lock().write(vec![LogOp::Truncate(log_id.index)]))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        blocking(|| self.lock().purge(log_id)).map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// Runs a step that writes and fsyncs (a Raft storage call) on this task's
/// thread, first telling a multi-threaded runtime to move its other tasks
/// (heartbeats, RPCs, other groups) to another thread: an fdatasync must
/// not hold up a worker of a 2-core machine. The step stays synchronous,
/// so storage calls keep the order openraft made them in.
pub(crate) fn blocking<T>(step: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(step),
        _ => step(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> MetaEntry {
        MetaEntry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn entries_vote_truncation_and_purge_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.journal");
        rt().block_on(async {
            let mut log = RaftLogJournal::open(&path).expect("open");
            {
                let mut state = log.lock();
                let ops = (1..=10).map(|i| LogOp::Entry(entry(1, i))).collect();
                state.write(ops).expect("write");
            }
            log.save_vote(&Vote::new(3, 2)).await.expect("vote");
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 8))
                .await
                .expect("truncate");
            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
                .await
                .expect("purge");
            drop(log);
            let mut reopened = RaftLogJournal::open(&path).expect("reopen");
            let entries = reopened.try_get_log_entries(0..100).await.expect("read");
            let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
            assert_eq!(indexes, vec![4, 5, 6, 7]);
            assert_eq!(
                reopened.read_vote().await.expect("vote"),
                Some(Vote::new(3, 2))
            );
            let state = reopened.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(7));
        });
    }

    #[test]
    fn a_purged_log_is_rewritten_and_still_reads_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.journal");
        rt().block_on(async {
            let mut log = RaftLogJournal::open(&path).expect("open");
            for i in 1..=3_000 {
                log.lock()
                    .write(vec![LogOp::Entry(entry(2, i))])
                    .expect("write");
            }
            let before = std::fs::metadata(&path).expect("meta").len();
            log.purge(LogId::new(CommittedLeaderId::new(2, 1), 2_990))
                .await
                .expect("purge");
            let after = std::fs::metadata(&path).expect("meta").len();
            assert!(after * 10 < before, "rewritten: {before} -> {after} bytes");
            drop(log);
            let mut reopened = RaftLogJournal::open(&path).expect("reopen");
            let state = reopened.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2_990));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(3_000));
            assert_eq!(reopened.len(), 10);
        });
    }

    #[test]
    fn a_torn_tail_loses_only_the_unacknowledged_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.journal");
        rt().block_on(async {
            let log = RaftLogJournal::open(&path).expect("open");
            log.lock()
                .write((1..=5).map(|i| LogOp::Entry(entry(1, i))).collect())
                .expect("write");
            drop(log);
            // A crash in the middle of the sixth entry's write.
            let mut bytes = std::fs::read(&path).expect("read");
            let whole = bytes.len();
            let head = bytes[..20].to_vec();
            bytes.extend_from_slice(&head);
            std::fs::write(&path, &bytes).expect("write");
            let mut reopened = RaftLogJournal::open(&path).expect("reopen");
            let state = reopened.get_log_state().await.expect("state");
            assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
            assert_eq!(
                std::fs::metadata(&path).expect("meta").len() as usize,
                whole
            );
        });
    }

    #[test]
    fn a_corrupt_journal_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.journal");
        // Valid frames of garbage payloads.
        let (mut journal, _) = FileJournal::open("raft-log", &path).expect("open");
        journal.append(b"not json");
        journal.sync().expect("sync");
        drop(journal);
        assert!(RaftLogJournal::open(&path).is_err());
    }
}
