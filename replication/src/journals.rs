//! Consumer groups' ack journals on cluster topics, replicated through the
//! metadata group: what one node's dispatcher acked, every node knows.
//!
//! The dispatcher keeps a group's acks in a journal (`dmq_dispatcher::
//! group`): it appends ack payloads, syncs them every
//! `ack_sync_interval_ms`, and rewrites the journal as snapshots when it
//! grows. On a cluster node, [`ReplicatedJournals::open`] gives it a
//! [`ReplicatedJournal`] instead of a file: a sync hands the payloads
//! appended since the last one to the node's journal writer, a rewrite
//! hands over the new payloads; the writer proposes them, in order, as
//! [`MetaCommand::Journals`] entries of the metadata group (forwarded to
//! its leader), and every node applies them to its copy
//! ([`crate::MetadataStateMachine::journal`]). A node that opens the
//! journal later (a consumer of the group connects to it after its node
//! was lost) reads every committed ack.
//!
//! # Invariants and what they cost
//!
//! - One writer task per node proposes one entry at a time, with
//!   everything queued since the last one: the journal's changes are
//!   applied in the order the dispatcher made them. A failed write is
//!   retried (re-applying acks or a rewrite changes nothing), so a change
//!   is never dropped while the node runs.
//! - A sync does not wait for the commit: like the single node's ack
//!   journal, whose acks are durable within `ack_sync_interval_ms`, what a
//!   group acked in the last interval plus one metadata commit may be
//!   delivered again after its node is lost (at least once, never lost).
//! - A compaction replaces only what its snapshot covers
//!   ([`JournalOp::Compact`]): every change up to the last log index the
//!   node's groups had taken ([`ReplicatedJournals::saw`], advanced in the
//!   dispatcher's order as it merges, loads or writes them). Another
//!   node's changes after it stay in the copy, after the snapshot, and a
//!   group restored from the copy holds the acks of every snapshot in it
//!   (a second one adds to the first). A compaction that replaced the
//!   whole copy erased the acks of another node it had not merged yet (a
//!   former serving node's compaction retried after a partition healed),
//!   and a node that later loaded the group delivered them again.
//! - A journal's size as the dispatcher sees it ([`Journal::size_bytes`])
//!   is what this node wrote since the journal's last rewrite, so that its
//!   compaction bounds what every node holds.
//! - A node's groups hold what it wrote itself, so the changes this
//!   process proposed are not merged back when applied
//!   ([`ReplicatedJournals::take_own`]). Changes a previous run of the
//!   node proposed that commit after it restarted (it was killed with a
//!   proposal in flight) are not in its groups: they are merged like
//!   another node's. Skipping them by origin left those acks out of the
//!   node's copy for good, and it delivered the messages again whenever
//!   it next served the group (seen 15 times, 13 to 31 s after the ack,
//!   in a 300-episode fault campaign).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dmq_dispatcher::storage::{Journal, OpenedJournal};
use dmq_dispatcher::StoreError;
use tokio::sync::mpsc;

use crate::metadata::{JournalOp, JournalWrite, MetaCommand};
use crate::node::MetadataNode;
use crate::partition::Payload;
use crate::{MetadataStateMachine, NodeId};

/// How long the writer waits before it proposes a failed write again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A node's replicated journals and the task that writes them (see the
/// module doc).
#[derive(Debug)]
pub struct ReplicatedJournals {
    node_id: NodeId,
    state: MetadataStateMachine,
    queue: mpsc::UnboundedSender<JournalWrite>,
    /// Writes queued and writes committed, for [`ReplicatedJournals::drain`].
    queued: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    /// The entries this process proposed and has not yet seen applied
    /// here, by [`fingerprint`] (a count: a retried proposal whose first
    /// answer was lost may be applied twice).
    own: Arc<OwnProposals>,
    /// By journal: the last log index whose changes to it this node's
    /// groups hold (merged, written here, or read when the group loaded):
    /// what a compaction's snapshot covers ([`JournalOp::Compact`]).
    seen: Mutex<HashMap<String, u64>>,
}

/// [`ReplicatedJournals::own`].
type OwnProposals = Mutex<HashMap<u64, u32>>;

/// A hash of an entry's changes: names, kinds and payload bytes.
fn fingerprint(writes: &[JournalWrite]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for write in writes {
        write.name.hash(&mut hasher);
        match &write.op {
            JournalOp::Append(payloads) => {
                0u8.hash(&mut hasher);
                payloads.iter().for_each(|p| p.0.hash(&mut hasher));
            }
            JournalOp::Rewrite(payloads) => {
                1u8.hash(&mut hasher);
                payloads.iter().for_each(|p| p.0.hash(&mut hasher));
            }
            JournalOp::Remove => 2u8.hash(&mut hasher),
            JournalOp::Compact { snapshot, covers } => {
                3u8.hash(&mut hasher);
                covers.hash(&mut hasher);
                snapshot.iter().for_each(|p| p.0.hash(&mut hasher));
            }
        }
    }
    hasher.finish()
}

impl ReplicatedJournals {
    /// The metadata state these journals are read from (as applied on
    /// this node).
    pub fn metadata(&self) -> &MetadataStateMachine {
        &self.state
    }

    /// Starts the node's journal writer, proposing through `node` (the
    /// node's member of the metadata group) on the current runtime.
    pub fn start(node: Arc<MetadataNode>) -> Arc<ReplicatedJournals> {
        let (queue, receiver) = mpsc::unbounded_channel();
        let written = Arc::new(AtomicU64::new(0));
        let journals = Arc::new(ReplicatedJournals {
            node_id: node.id(),
            state: node.state_machine().clone(),
            queue,
            queued: Arc::new(AtomicU64::new(0)),
            written: Arc::clone(&written),
            own: Arc::default(),
            seen: Mutex::default(),
        });
        tokio::spawn(write_journals(
            node,
            receiver,
            written,
            Arc::clone(&journals.own),
        ));
        journals
    }

    /// Whether `writes`, applied with this node as their origin, are an
    /// entry this process proposed (its groups hold them already): true
    /// once per proposal. False for one a previous run of the node
    /// proposed, which its groups must merge like another node's.
    pub fn take_own(&self, writes: &[JournalWrite]) -> bool {
        let key = fingerprint(writes);
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        match own.get_mut(&key) {
            Some(count) if *count > 1 => {
                *count -= 1;
                true
            }
            Some(_) => {
                own.remove(&key);
                true
            }
            None => false,
        }
    }

    /// The node's groups now hold every change to journal `name` up to
    /// log index `index` (called in the order the groups took them).
    pub fn saw(&self, name: &str, index: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let at = seen.entry(name.to_string()).or_default();
        *at = (*at).max(index);
    }

    /// [`ReplicatedJournals::saw`]'s last index for `name` (0: none).
    fn seen(&self, name: &str) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(name).copied().unwrap_or(0)
    }

    /// Opens `name`: its payloads as this node has applied them, and a
    /// journal whose changes are replicated.
    pub fn open(self: &Arc<Self>, name: &str) -> OpenedJournal {
        match self.open_or_seed::<std::convert::Infallible>(name, || Ok(Vec::new())) {
            Ok(opened) => opened,
            Err(never) => match never {},
        }
    }

    /// [`ReplicatedJournals::open`], except that a journal the cluster
    /// does not have yet starts from `local()`'s payloads (what this node
    /// kept on its own disk before its groups' journals were replicated),
    /// replicated at once as a rewrite. A node upgraded from a version
    /// that kept them locally does not deliver its groups' acked messages
    /// again.
    pub fn open_or_seed<E>(
        self: &Arc<Self>,
        name: &str,
        local: impl FnOnce() -> Result<Vec<Vec<u8>>, E>,
    ) -> Result<OpenedJournal, E> {
        let mut journal = ReplicatedJournal {
            name: name.to_string(),
            journals: Arc::clone(self),
            appended: Vec::new(),
            bytes: 0,
        };
        let (held, applied) = self.state.journal_at(name);
        // The group is loaded from every change applied so far.
        self.saw(name, applied);
        let payloads = match held {
            Some(payloads) => payloads,
            None => {
                let kept = local()?;
                if !kept.is_empty() {
                    tracing::info!(journal = name, "replicating a journal kept on this node");
                    // Only fails if the writer stopped, which it reports.
                    let _ = journal.rewrite(&kept);
                }
                kept
            }
        };
        journal.bytes = payloads.iter().map(|p| p.len() as u64 + 8).sum();
        Ok((Box::new(journal), payloads))
    }

    /// Drops `name` on every node.
    pub fn remove(&self, name: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.send(JournalWrite {
            name: name.to_string(),
            op: JournalOp::Remove,
        });
    }

    /// The replicated journals whose names start with `prefix`.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        self.state.journal_names(prefix)
    }

    /// Waits until every change queued so far is committed, for at most
    /// `timeout`; returns whether it was (a stopping node calls it before
    /// its metadata group stops).
    pub async fn drain(&self, timeout: Duration) -> bool {
        let target = self.queued.load(Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        while self.written.load(Ordering::SeqCst) < target {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// This node's id (the origin of what it writes).
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn send(&self, write: JournalWrite) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.queue.send(write).is_err() {
            tracing::warn!("the journal writer stopped: a journal change is not replicated");
        }
    }
}

/// One replicated journal, as the dispatcher holds it.
#[derive(Debug)]
pub struct ReplicatedJournal {
    name: String,
    journals: Arc<ReplicatedJournals>,
    /// Appended since the last sync.
    appended: Vec<Payload>,
    /// What this node wrote since the last rewrite (see the module doc).
    bytes: u64,
}

impl Journal for ReplicatedJournal {
    fn append(&mut self, payload: &[u8]) {
        self.bytes += payload.len() as u64 + 8;
        self.appended.push(Payload(Bytes::copy_from_slice(payload)));
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if !self.appended.is_empty() {
            let payloads = std::mem::take(&mut self.appended);
            self.journals.send(JournalWrite {
                name: self.name.clone(),
                op: JournalOp::Append(payloads),
            });
        }
        Ok(())
    }

    fn rewrite(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError> {
        // What another node wrote that this node's groups have not taken
        // yet stays in the replicated copy, after the snapshot.
        let covers = self.journals.seen(&self.name);
        self.send_snapshot(payloads, |snapshot| JournalOp::Compact { snapshot, covers });
        Ok(())
    }

    /// A seek's snapshot replaces everything before it, also this node's
    /// own payloads not yet taken in (a `Compact` would keep those after
    /// the snapshot, and a replay would come back acked).
    fn replace(&mut self, payloads: &[Vec<u8>]) -> Result<(), StoreError> {
        self.send_snapshot(payloads, JournalOp::Rewrite);
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.bytes
    }
}

impl ReplicatedJournal {
    /// Drops what was appended and sends `payloads` as the journal's new
    /// content, in the op `op` makes of them.
    fn send_snapshot(&mut self, payloads: &[Vec<u8>], op: impl FnOnce(Vec<Payload>) -> JournalOp) {
        self.appended.clear();
        self.bytes = payloads.iter().map(|p| p.len() as u64 + 8).sum();
        let snapshot = payloads
            .iter()
            .map(|p| Payload(Bytes::copy_from_slice(p)))
            .collect();
        self.journals.send(JournalWrite {
            name: self.name.clone(),
            op: op(snapshot),
        });
    }
}

/// Keeps only what still matters of `writes`, in order: a rewrite or a
/// removal of a journal makes its earlier changes moot, and consecutive
/// appends to one journal become one.
fn coalesce(writes: Vec<JournalWrite>) -> Vec<JournalWrite> {
    let mut kept: VecDeque<JournalWrite> = VecDeque::new();
    for write in writes {
        if matches!(
            write.op,
            JournalOp::Rewrite(_) | JournalOp::Compact { .. } | JournalOp::Remove
        ) {
            kept.retain(|earlier| earlier.name != write.name);
        }
        match (kept.back_mut(), write) {
            (
                Some(JournalWrite {
                    name,
                    op: JournalOp::Append(earlier),
                }),
                JournalWrite {
                    name: next_name,
                    op: JournalOp::Append(more),
                },
            ) if *name == next_name => earlier.extend(more),
            (_, write) => kept.push_back(write),
        }
    }
    kept.into()
}

/// The writer task: proposes what is queued, one entry at a time, until
/// the queue closes.
async fn write_journals(
    node: Arc<MetadataNode>,
    mut receiver: mpsc::UnboundedReceiver<JournalWrite>,
    written: Arc<AtomicU64>,
    own: Arc<OwnProposals>,
) {
    let origin = node.id();
    while let Some(first) = receiver.recv().await {
        let mut writes = vec![first];
        while let Ok(write) = receiver.try_recv() {
            writes.push(write);
        }
        let mut count = writes.len() as u64;
        let mut writes = coalesce(writes);
        loop {
            let command = MetaCommand::Journals {
                origin,
                writes: writes.clone(),
            };
            // Before proposing: it may be applied here before the write
            // returns. A proposal that never commits leaves its count
            // behind (a few words per failed write).
            *own.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(fingerprint(&writes))
                .or_default() += 1;
            match node.write(command).await {
                Ok(_) => break,
                Err(crate::NodeError::Stopped(why)) => {
                    // The metadata group stopped (the node is stopping, or
                    // its storage failed): nothing can be written any more.
                    tracing::warn!(%why, "the metadata group stopped: acks left unreplicated");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "replicating consumer groups' acks; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    while let Ok(write) = receiver.try_recv() {
                        writes.push(write);
                        count += 1;
                    }
                    writes = coalesce(writes);
                }
            }
        }
        written.fetch_add(count, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(name: &str, bytes: &[u8]) -> JournalWrite {
        JournalWrite {
            name: name.to_string(),
            op: JournalOp::Append(vec![Payload(Bytes::copy_from_slice(bytes))]),
        }
    }

    #[test]
    fn fingerprints_tell_changes_apart() {
        let a = [append("group.orders.billing", b"1")];
        let b = [append("group.orders.billing", b"2")];
        let c = [append("group.orders.audit", b"1")];
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let rewrite = [JournalWrite {
            name: "group.orders.billing".to_string(),
            op: JournalOp::Rewrite(vec![Payload(Bytes::from_static(b"1"))]),
        }];
        assert_ne!(fingerprint(&a), fingerprint(&rewrite));
    }

    #[test]
    fn coalescing_keeps_order_and_drops_what_a_rewrite_replaces() {
        let rewrite = JournalWrite {
            name: "a".to_string(),
            op: JournalOp::Compact {
                snapshot: vec![Payload(Bytes::from_static(b"s"))],
                covers: 7,
            },
        };
        let writes = vec![
            append("a", b"1"),
            append("a", b"2"),
            append("b", b"x"),
            rewrite.clone(),
            append("a", b"3"),
            append("a", b"4"),
        ];
        let kept = coalesce(writes);
        assert_eq!(
            kept,
            vec![
                append("b", b"x"),
                rewrite,
                JournalWrite {
                    name: "a".to_string(),
                    op: JournalOp::Append(vec![
                        Payload(Bytes::from_static(b"3")),
                        Payload(Bytes::from_static(b"4"))
                    ]),
                },
            ]
        );
        let removed = coalesce(vec![
            append("a", b"1"),
            JournalWrite {
                name: "a".to_string(),
                op: JournalOp::Remove,
            },
        ]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].op, JournalOp::Remove);
    }
}
