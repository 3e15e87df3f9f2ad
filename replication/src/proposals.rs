//! [`ProposalQueue`]: one partition replica's proposals, in the order they
//! came, merged into fewer Raft entries when they come faster than the
//! group commits them.
//!
//! openraft 0.9 appends each client write as an entry of its own, and its
//! core waits for that append's fsync before it takes the next: a leader
//! flushes once per entry, one flush after another. Sixty-four producers
//! of one message each, each its own entry, held a partition's leader to
//! about a third of what one `dmqd`'s group commit sustains
//! (BENCHMARKS.md, "produces merged into fewer Raft entries"). The queue
//! keeps at most [`IN_FLIGHT`] of this node's small proposals in its Raft
//! group at a time; small batches that come meanwhile wait, and the next
//! proposal takes all of them, as one batch of the partition log. A batch
//! proposed while the group is idle waits for nothing; the merged batches
//! grow with the load, as a group commit's flushes do. A large or
//! idempotent batch goes at once: it gains nothing by waiting.
//!
//! # Invariants
//!
//! - One task submits the proposals, in the order
//!   [`ProposalQueue::propose`] was called; a merged batch holds its parts'
//!   records in that order. On the leader, Raft appends them in that
//!   order. On another node they are forwarded (small ones one merged
//!   proposal at a time, large and idempotent ones at once, several in
//!   flight), and the leader takes the forwards in the order they were
//!   proposed here (`crate::forward_order`).
//! - An idempotent batch (producer id not 0) is proposed alone: its
//!   producer id and sequence name one stored batch, which a retry is
//!   found by ([`crate::partition::PartitionCommand::Duplicate`]).
//! - A merged batch is at most [`MERGED_BYTES_MAX`] bytes (and no longer
//!   than a segment) and [`MERGED_RECORDS_MAX`] records, and passes the
//!   log's own check of a batch; one that would not is proposed as its
//!   parts, one by one.
//! - Each caller is answered with its own records' offsets and ids (the
//!   merged batch's, from the caller's place in it); a merged proposal
//!   that fails fails each of its parts with the same error, and its
//!   outcome is unknown to each as it would be alone.

use std::future::Future;
use std::sync::{Arc, Weak};

use dmq_dispatcher::StoreError;
use dmq_log_store::{AppendInfo, BatchInput, Log, MessageId};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::cluster_storage::{unavailable, ReplicatedAppend};
use crate::node::{NodeError, PartitionNode};
use crate::partition::{AppendedBatch, PartitionCommand, ReplicatedBatch};

/// How many of one replica's small proposals may be in its Raft group at
/// once. One measured best (BENCHMARKS.md, "produces merged into fewer
/// Raft entries"): openraft's core appends one entry at a time anyway, so
/// more in flight only splits the waiting batches into more entries.
pub const IN_FLIGHT: usize = 1;

/// A batch at least this long (encoded) is proposed without waiting for
/// a slot: its entry's fixed cost is small beside its bytes.
pub const SMALL_BYTES: usize = 64 << 10;

/// The largest merged batch, in encoded bytes: half of what one
/// AppendEntries carries (`network.rs`), so a follower is sent two at a
/// time.
pub const MERGED_BYTES_MAX: usize = 1 << 20;

/// The most records a merged batch holds.
pub const MERGED_RECORDS_MAX: usize = 4096;

/// A queued batch's answer.
pub type Committed = Result<ReplicatedAppend, StoreError>;

/// A batch waiting for its proposal.
struct Waiting {
    batch: BatchInput,
    answer: oneshot::Sender<Committed>,
}

/// One replica's queue of proposals (see the module docs). Dropping it
/// ends its task once the proposals already queued are submitted.
#[derive(Debug)]
pub struct ProposalQueue {
    waiting: mpsc::UnboundedSender<Waiting>,
}

impl ProposalQueue {
    /// A queue proposing through `node`, its task spawned on `runtime`.
    /// The task holds `node` weakly: it stops proposing once the replica
    /// is dropped.
    pub fn start(node: &Arc<PartitionNode>, runtime: &Handle) -> ProposalQueue {
        let (waiting, queued) = mpsc::unbounded_channel();
        runtime.spawn(submit(Arc::downgrade(node), queued));
        ProposalQueue { waiting }
    }

    /// Queues `batch` (checked already, as the log checks a batch) behind
    /// this node's earlier proposals and returns its answer's future.
    pub fn propose(&self, batch: BatchInput) -> impl Future<Output = Committed> + Send + 'static {
        let (answer, answered) = oneshot::channel();
        let queued = self.waiting.send(Waiting { batch, answer }).is_ok();
        async move {
            if !queued {
                return Err(unavailable("the replica is closed"));
            }
            answered
                .await
                .unwrap_or_else(|_| Err(unavailable("the replica closed before its answer")))
        }
    }
}

/// Whether `batch` may share a proposal with others.
fn mergeable(batch: &BatchInput) -> bool {
    batch.producer_id == 0
}

/// The task of a [`ProposalQueue`]: takes the batches waiting, in order,
/// as few proposals as the limits allow. A small mergeable batch waits for
/// one of [`IN_FLIGHT`] slots (and what comes meanwhile joins it); an
/// idempotent or large batch gains nothing by waiting and goes at once
/// (forwarded by a node that does not lead, it is still taken in order:
/// `crate::forward_order`).
async fn submit(node: Weak<PartitionNode>, mut queued: mpsc::UnboundedReceiver<Waiting>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut next: Option<Waiting> = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match queued.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let Some(replica) = node.upgrade() else {
            let _ = first.answer.send(Err(unavailable("the replica is closed")));
            return;
        };
        // A merged batch is no longer than a segment (the log's check):
        // the sum of its parts' lengths bounds its own.
        let bytes_max = replica
            .raft_log()
            .with_log(|log: &Log| log.config().segment_bytes_max as usize)
            .map_or(0, |segment| segment.min(MERGED_BYTES_MAX));
        let mut parts = vec![first];
        let mut slot = None;
        let small = mergeable(&parts[0].batch) && parts[0].batch.encoded_len() < SMALL_BYTES;
        if small {
            // The semaphore is never closed.
            let Ok(taken) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            slot = Some(taken);
            // What came while the slot was awaited joins the first.
            let mut bytes = parts[0].batch.encoded_len();
            let mut records = parts[0].batch.records.len();
            while let Ok(more) = queued.try_recv() {
                let room = bytes + more.batch.encoded_len() <= bytes_max
                    && records + more.batch.records.len() <= MERGED_RECORDS_MAX;
                if !mergeable(&more.batch) || !room {
                    next = Some(more);
                    break;
                }
                bytes += more.batch.encoded_len();
                records += more.batch.records.len();
                parts.push(more);
            }
        }
        let merged = Merged::of(parts);
        if merged.counts.len() > 1 && !fits(&replica, &merged.batch) {
            // Not expected (the bound above): each alone passed the check,
            // each in a slot of its own.
            for part in merged.split() {
                let slot = match slot.take() {
                    Some(slot) => slot,
                    None => match Arc::clone(&slots).acquire_owned().await {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                };
                propose(&replica, part, Some(slot)).await;
            }
        } else {
            propose(&replica, merged, slot).await;
        }
    }
}

/// Batches proposed as one: their records in order, how many each had,
/// and where each is answered.
struct Merged {
    batch: BatchInput,
    counts: Vec<usize>,
    answers: Vec<oneshot::Sender<Committed>>,
}

impl Merged {
    /// `parts` as one batch (their records moved, in order). Only a batch
    /// alone may be idempotent (`mergeable`): its producer id and
    /// sequence are kept.
    fn of(parts: Vec<Waiting>) -> Merged {
        let mut merged = Merged {
            batch: BatchInput::new(Vec::new()),
            counts: Vec::with_capacity(parts.len()),
            answers: Vec::with_capacity(parts.len()),
        };
        for Waiting { batch, answer } in parts {
            merged.counts.push(batch.records.len());
            merged.answers.push(answer);
            merged.batch.records.extend(batch.records);
            merged.batch.producer_id = batch.producer_id;
            merged.batch.producer_seq = batch.producer_seq;
        }
        merged
    }

    /// Each part alone again.
    fn split(self) -> Vec<Merged> {
        let mut records = self.batch.records.into_iter();
        self.counts
            .into_iter()
            .zip(self.answers)
            .map(|(count, answer)| Merged {
                batch: BatchInput::new(records.by_ref().take(count).collect()),
                counts: vec![count],
                answers: vec![answer],
            })
            .collect()
    }
}

/// Proposes `merged` and answers each of its parts once the proposal is
/// committed (or failed), then frees `slot`.
async fn propose(
    replica: &PartitionNode,
    merged: Merged,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let Merged {
        batch,
        counts,
        answers,
    } = merged;
    let mut proposal = ReplicatedBatch::propose(batch.records);
    (proposal.producer_id, proposal.producer_seq) = (batch.producer_id, batch.producer_seq);
    let proposed = replica.propose(PartitionCommand::Batch(proposal)).await;
    tokio::spawn(async move {
        let committed = proposed.await;
        drop(slot);
        answer(committed, &counts, answers);
    });
}

/// Whether the log's check passes `batch` (a batch the log refuses must
/// never become a Raft entry).
fn fits(replica: &PartitionNode, batch: &BatchInput) -> bool {
    replica
        .raft_log()
        .with_log(|log: &Log| log.check_batch(batch).is_ok())
        .unwrap_or(false)
}

/// Answers each part of a proposal of `counts` records each with its own
/// records' place in `committed`.
fn answer(
    committed: Result<AppendedBatch, NodeError>,
    counts: &[usize],
    answers: Vec<oneshot::Sender<Committed>>,
) {
    let total: usize = counts.iter().sum();
    match committed.map_err(unavailable).and_then(|appended| {
        let count = u64::from(appended.count);
        if count == 0 || appended.ids.len() as u64 != count || count != total as u64 {
            return Err(unavailable(format!(
                "the leader answered {} records with {} ids for a batch of {total}",
                appended.count,
                appended.ids.len(),
            )));
        }
        Ok(appended)
    }) {
        Ok(appended) => {
            let mut start = 0;
            for (count, answer) in counts.iter().zip(answers) {
                let ids: Vec<MessageId> = appended.ids[start..start + count]
                    .iter()
                    .copied()
                    .map(MessageId)
                    .collect();
                let base_offset = appended.base_offset + start as u64;
                let info = AppendInfo {
                    base_offset,
                    last_offset: base_offset + *count as u64 - 1,
                    // An id's time prefix is its first append's broker time.
                    timestamp_ms: ids[0].timestamp_ms(),
                    ids,
                };
                let _ = answer.send(Ok(ReplicatedAppend {
                    info,
                    stored_before: appended.stored_before,
                }));
                start += count;
            }
        }
        Err(error) => {
            let error = error.to_string();
            for answer in answers {
                let _ = answer.send(Err(StoreError::Unavailable(error.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmq_log_store::RecordInput;

    fn batch(values: &[&str], producer_id: u64) -> BatchInput {
        BatchInput {
            producer_id,
            producer_seq: if producer_id == 0 { 0 } else { 7 },
            records: values
                .iter()
                .map(|value| RecordInput::new(value.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn waiting(batch: BatchInput) -> Waiting {
        Waiting {
            batch,
            answer: oneshot::channel().0,
        }
    }

    fn values(batch: &BatchInput) -> Vec<&[u8]> {
        batch.records.iter().map(|r| &r.value[..]).collect()
    }

    #[test]
    fn merged_batches_keep_their_order_and_split_back_into_their_parts() {
        let merged = Merged::of(vec![
            waiting(batch(&["a", "b"], 0)),
            waiting(batch(&["c"], 0)),
        ]);
        assert_eq!(merged.counts, vec![2, 1]);
        assert_eq!(values(&merged.batch), vec![&b"a"[..], b"b", b"c"]);
        assert_eq!(merged.batch.producer_id, 0);
        let parts = merged.split();
        assert_eq!(parts.len(), 2);
        assert_eq!(values(&parts[0].batch), vec![&b"a"[..], b"b"]);
        assert_eq!(values(&parts[1].batch), vec![&b"c"[..]]);
        assert_eq!((parts[1].counts.len(), parts[1].answers.len()), (1, 1));
    }

    #[test]
    fn an_idempotent_batch_is_never_merged_and_keeps_its_producer() {
        assert!(!mergeable(&batch(&["x"], 5)));
        let alone = Merged::of(vec![waiting(batch(&["x"], 5))]);
        assert_eq!((alone.batch.producer_id, alone.batch.producer_seq), (5, 7));
    }

    fn appended(base_offset: u64, count: u32) -> AppendedBatch {
        AppendedBatch {
            base_offset,
            count,
            ids: (0..count)
                .map(|i| MessageId::new(1_000, u64::from(i)).0)
                .collect(),
            stored_before: false,
        }
    }

    #[test]
    fn each_part_is_answered_with_its_own_records() {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        answer(Ok(appended(10, 6)), &[1, 3, 2], senders);
        let got: Vec<(u64, u64, usize)> = receivers
            .iter_mut()
            .map(|r| {
                let ReplicatedAppend {
                    info,
                    stored_before,
                } = r.try_recv().expect("answered").expect("committed");
                assert!(!stored_before);
                (info.base_offset, info.last_offset, info.ids.len())
            })
            .collect();
        assert_eq!(got, vec![(10, 10, 1), (11, 13, 3), (14, 15, 2)]);
    }

    #[test]
    fn an_answer_that_does_not_match_the_parts_fails_each_of_them() {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..2).map(|_| oneshot::channel()).unzip();
        answer(Ok(appended(0, 2)), &[1, 2], senders);
        for r in &mut receivers {
            assert!(r.try_recv().expect("answered").is_err());
        }
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..2).map(|_| oneshot::channel()).unzip();
        answer(
            Err(NodeError::NotLeader {
                leader: None,
                addr: None,
            }),
            &[1, 1],
            senders,
        );
        for r in &mut receivers {
            assert!(matches!(
                r.try_recv().expect("answered"),
                Err(StoreError::Unavailable(_))
            ));
        }
    }
}
