//! Transactions through the dispatcher: half records stored and answered
//! once durable, COMMIT and ROLLBACK answered once their outcome record is
//! durable, and a commit's records moved into their topics (immediate ones
//! appended, delayed ones scheduled, all with their ids) through the
//! durable writer, like fired delays.
//!
//! Invariants:
//! - nothing of a transaction reaches a topic before its commit record is
//!   durable;
//! - an outcome record is appended only once every half append of the
//!   transaction is durable (a COMMIT that arrives earlier waits), so a
//!   commit never covers a half record that failed;
//! - a committed record is moved at most once per topic: after a restart
//!   (or a failed move) each is first looked up by id in its topic and the
//!   delay store;
//! - a transaction settles (and the watermark may pass it) only once every
//!   moved record is durable, and its acks are synced to their groups'
//!   journals before the watermark passes it;
//! - a message is acked by at most one unsettled transaction (its
//!   *claim*); a COMMIT is refused while a message it acks was acked
//!   otherwise meanwhile (a plain ACK, a dead-letter move, a seek), so a
//!   committed transaction's acks are the acks that took effect.

use super::*;
use crate::transactions::{
    step_digest, AckTarget, CommittedRecord, HalfInput, ProduceStep, SequenceCheck, StepState,
    TxnAcks, TxnError, TxnKey, TxnOutcome, TxnStage,
};
use crate::txn_checks::{CheckDecision, TxnCheck};

/// Most check-back decisions one poll makes.
const CHECKS_PER_POLL_MAX: usize = 1_024;

/// Where the answer to [`Dispatcher::txn_produce`] goes, called on the
/// dispatcher's thread once the half records are durable (or failed).
pub type TxnProduceReply = Box<dyn FnOnce(Result<TxnProduced>) + Send>;

/// Where the answer to [`Dispatcher::txn_end`] goes, called once the
/// outcome is durable (or failed).
pub type TxnEndReply = Box<dyn FnOnce(Result<TxnOutcome>) + Send>;

/// What [`Dispatcher::txn_produce`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnProduced {
    /// The transaction's handle: every later produce, the COMMIT and the
    /// ROLLBACK of this transaction name it.
    pub handle: u64,
    /// One per record, in order (no offset: a half record is in no topic
    /// yet).
    pub records: Vec<Produced>,
}

/// An unsettled transaction, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionInfo {
    /// Producer group.
    pub group: String,
    /// Transaction id.
    pub id: String,
    /// Handle.
    pub handle: u64,
    /// When its first record was stored.
    pub opened_ms: i64,
    /// `open`, `committing`, `rolling back` or `committed` (being moved
    /// into its topics).
    pub stage: &'static str,
    /// Half records.
    pub records: usize,
    /// Messages it acks for their consumer groups (TXN_ACK).
    pub acks: usize,
    /// Open past the transaction timeout.
    pub overdue: bool,
    /// Check-backs sent so far (in this process).
    pub checks: u32,
    /// Its check-backs ran out: it waits for its producer or an operator.
    pub unresolved: bool,
}

/// The topics of an unsettled transaction (for the rights its end needs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionTopics {
    /// Topics it holds records for.
    pub produced: Vec<String>,
    /// Topics it acks messages of (TXN_ACK).
    pub acked: Vec<String>,
}

/// Counts of the transactions (for metrics), read without copying.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransactionCounts {
    /// Unsettled transactions (open, ending, committed and being moved).
    pub unsettled: u64,
    /// Open ones past their timeout.
    pub overdue: u64,
    /// Open ones whose check-backs ran out.
    pub unresolved: u64,
    /// Half records the unsettled ones hold.
    pub half_records: u64,
    /// Check-backs sent since the dispatcher opened.
    pub checks_sent: u64,
}

/// A transaction's end, asked for and not yet durable.
pub(super) struct Ending {
    outcome: TxnOutcome,
    replies: Vec<TxnEndReply>,
}

impl std::fmt::Debug for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ending")
            .field("outcome", &self.outcome)
            .field("replies", &self.replies.len())
            .finish()
    }
}

/// Retries of one numbered produce, waiting for its first try's answer.
#[derive(Default)]
pub(super) struct RetryWaiters(Vec<TxnProduceReply>);

impl std::fmt::Debug for RetryWaiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetryWaiters({})", self.0.len())
    }
}

/// A half append waiting for durability.
pub(super) struct HalfWrite {
    handle: u64,
    /// The produce's sequence number in its transaction (`None` for an
    /// ack record, or where steps are not known).
    step: Option<u32>,
    records: Vec<Produced>,
    reply: TxnProduceReply,
}

impl std::fmt::Debug for HalfWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfWrite")
            .field("handle", &self.handle)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// One piece of committed transactions' move into the topics: the
/// records of one partition (or, delayed, of one topic), with the handle of
/// each record's transaction (`owners`, in record order).
#[derive(Debug)]
pub(super) enum CommitMove {
    /// Immediate records appended to one partition.
    Append {
        topic: String,
        partition: u32,
        owners: Vec<u64>,
    },
    /// Delayed records scheduled in the delay store.
    Schedule {
        owners: Vec<u64>,
        scheduling: Scheduling,
    },
}

/// Records bound for one (topic, partition, delayed) place.
struct MoveGroup {
    place: (String, u32, bool),
    records: Vec<RecordInput>,
    owners: Vec<u64>,
}

/// Moves of one committed transaction still with the writer.
#[derive(Debug, Default)]
pub(super) struct Moving {
    outstanding: usize,
    failed: bool,
}

impl Dispatcher {
    /// Stores half records of the transaction `key` (`handle` 0 begins
    /// one; any other value must be the handle the first answer gave).
    /// Every record is routed already and checked against its topic. The
    /// half-log append happens here, in call order; the writer waits for
    /// its durability, and `reply` gets the answer on a later poll.
    /// `records` holds (partition, record, relative-time flags).
    /// `sequence` (TXN_PRODUCE_SEQ) numbers the produce within its
    /// transaction: a number it has already is a retry, answered with the
    /// first try's answer (once that is durable) and stored nothing.
    pub fn txn_produce(
        &mut self,
        key: TxnKey,
        handle: u64,
        sequence: Option<u32>,
        topic: &str,
        records: Vec<(u32, RecordInput, u8)>,
        reply: TxnProduceReply,
    ) {
        let routed: Vec<(u32, RecordInput)> = records
            .iter()
            .map(|(partition, record, _)| (*partition, record.clone()))
            .collect();
        if let Err(error) = self.check_routed(topic, &routed) {
            reply(Err(error));
            return;
        }
        drop(routed);
        if records.is_empty() {
            reply(Err(DispatchError::InvalidArgument(
                "a transactional produce needs at least one record".into(),
            )));
            return;
        }
        let now = self.now();
        let halves: Vec<HalfInput> = records
            .into_iter()
            .map(|(partition, record, relative)| HalfInput {
                topic: topic.to_string(),
                partition,
                record,
                relative,
            })
            .collect();
        let digest = step_digest(&halves);
        if let Some(sequence) = sequence {
            match self.txns.check_sequence(&key, handle, sequence, digest) {
                Ok(SequenceCheck::New) => {}
                Ok(SequenceCheck::Retry {
                    handle,
                    sequence,
                    step,
                }) => {
                    self.answer_retry(handle, sequence, step, reply);
                    return;
                }
                Err(error) => {
                    reply(Err(error.into()));
                    return;
                }
            }
        }
        let placed: Vec<(u32, Option<i64>)> = halves
            .iter()
            .map(|h| (h.partition, h.record.deliver_at_ms))
            .collect();
        let begins = handle == 0;
        let (handle, info, step) = match self.txns.append_produce(&key, handle, halves, digest, now)
        {
            Ok(appended) => appended,
            Err(error) => {
                reply(Err(error.into()));
                return;
            }
        };
        let produced = placed
            .into_iter()
            .zip(&info.ids)
            .map(|((partition, due), id)| Produced {
                partition,
                offset: None,
                id: *id,
                delayed_until_ms: due.filter(|&due| due > now),
            })
            .collect();
        self.wait_half(info, handle, step, begins, produced, reply);
    }

    /// Answers a retry of the produce numbered `sequence` of `handle`: at
    /// once from the half log if it is durable, else with its first try's
    /// answer when that comes.
    fn answer_retry(
        &mut self,
        handle: u64,
        sequence: u32,
        step: ProduceStep,
        reply: TxnProduceReply,
    ) {
        if step.state == StepState::Writing {
            self.txn_retries
                .entry((handle, sequence))
                .or_default()
                .0
                .push(reply);
            return;
        }
        let now = self.now();
        let answer = self
            .txns
            .step_records(handle, &step)
            .map(|records| TxnProduced {
                handle,
                records: records
                    .into_iter()
                    .map(|(id, partition, due)| Produced {
                        partition,
                        offset: None,
                        id,
                        delayed_until_ms: due.filter(|&due| due > now),
                    })
                    .collect(),
            })
            .map_err(DispatchError::from);
        reply(answer);
    }

    /// Hands a half-log append (half or ack records) of `handle` to the
    /// writer; `reply` gets `records` once it is durable. A transaction it
    /// `begins` is checked back from its timeout.
    fn wait_half(
        &mut self,
        info: AppendInfo,
        handle: u64,
        step: Option<u32>,
        begins: bool,
        records: Vec<Produced>,
        reply: TxnProduceReply,
    ) {
        if begins {
            self.checks.begin(handle, info.timestamp_ms);
        }
        let log = self.txns.log();
        self.submit_wait(
            log,
            info,
            InFlightWrite::Half(HalfWrite {
                handle,
                step,
                records,
                reply,
            }),
        );
        if let Err(error) = self.collect_written() {
            tracing::error!(%error, "recording written batches failed");
        }
    }

    /// Acks, in the transaction `key` (`handle` as in
    /// [`txn_produce`](Self::txn_produce)), messages delivered to the
    /// group of `member`: the acks take effect when the transaction
    /// commits, and not at all if it rolls back. Each message must be
    /// delivered and unacked, and acked by no other unsettled transaction
    /// (TransactionConflict otherwise, nothing stored). Meanwhile the
    /// message stays in flight as before (its ack timeout still runs).
    /// `reply` gets the handle (and no records) once the ack record is
    /// durable.
    ///
    /// Sent again after a lost answer, it is answered as the first time
    /// and stores nothing twice: messages this transaction acks already
    /// are skipped, and a begin (`handle` 0) naming exactly the acks of the
    /// open transaction of `key`, which holds nothing else, gets that
    /// transaction's handle ([`retried_ack_begin`](Self::retried_ack_begin)).
    /// Like the first answer, a repeated one may come before the ack
    /// record is durable; the COMMIT, written after it in the half log,
    /// is answered only once both are.
    pub fn txn_ack(
        &mut self,
        key: TxnKey,
        handle: u64,
        member: MemberId,
        positions: Vec<(u32, u64)>,
        reply: TxnProduceReply,
    ) {
        if let Some(open) = self.retried_ack_begin(&key, handle, member, &positions) {
            reply(Ok(TxnProduced {
                handle: open,
                records: Vec::new(),
            }));
            return;
        }
        let acks = match self.check_txn_acks(&key, handle, member, positions) {
            Ok(Some(acks)) => acks,
            Ok(None) => {
                // Every message is acked by this transaction already.
                reply(Ok(TxnProduced {
                    handle,
                    records: Vec::new(),
                }));
                return;
            }
            Err(error) => {
                reply(Err(error));
                return;
            }
        };
        let now = self.now();
        let claimed: Vec<(StateKey, u32, u64)> = acks
            .positions
            .iter()
            .map(|&(partition, offset)| (state_key(&acks.target), partition, offset))
            .collect();
        let begins = handle == 0;
        let (handle, info) = match self.txns.append_acks(&key, handle, acks, now) {
            Ok(appended) => appended,
            Err(error) => {
                reply(Err(error.into()));
                return;
            }
        };
        for claim in claimed {
            self.claims.insert(claim, handle);
        }
        self.wait_half(info, handle, None, begins, Vec::new(), reply);
    }

    /// The handle of the open transaction of `key` if this TXN_ACK is its
    /// begin sent again: `handle` 0, and the transaction holds one ack
    /// entry, of exactly `positions` in `member`'s delivery state, and no
    /// record. Any other begin of an open `key` is a second transaction
    /// and stays refused (TransactionConflict).
    fn retried_ack_begin(
        &self,
        key: &TxnKey,
        handle: u64,
        member: MemberId,
        positions: &[(u32, u64)],
    ) -> Option<u64> {
        if handle != 0 {
            return None;
        }
        let open = self.txns.handle_of(key)?;
        let txn = self.txns.get(open)?;
        let [acks] = txn.acks.as_slice() else {
            return None;
        };
        if txn.stage != TxnStage::Open || txn.failed || !txn.records.is_empty() {
            return None;
        }
        let state = &self.states[self.member_state(member).ok()?].key;
        let mut asked = positions.to_vec();
        asked.sort_unstable();
        asked.dedup();
        let same_state = acks.target.topic == state.topic
            && acks.target.group == state.group
            && acks.target.member == state.member;
        (same_state && acks.positions == asked).then_some(open)
    }

    /// The acks a TXN_ACK adds (`None`: none, the transaction has them
    /// all), or why it is refused.
    fn check_txn_acks(
        &self,
        key: &TxnKey,
        handle: u64,
        member: MemberId,
        mut positions: Vec<(u32, u64)>,
    ) -> Result<Option<TxnAcks>> {
        if positions.is_empty() {
            return Err(DispatchError::InvalidArgument(
                "a transactional ack needs at least one message".into(),
            ));
        }
        let state_index = self.member_state(member)?;
        let state = &self.states[state_index];
        positions.sort_unstable();
        positions.dedup();
        let mut fresh = Vec::with_capacity(positions.len());
        for (partition, offset) in positions {
            let Some(part) = state.partitions.get(partition as usize) else {
                let topic = state.key.topic.to_string();
                return Err(DispatchError::UnknownPartition { topic, partition });
            };
            let shown = || {
                format!(
                    "message {}/{partition}@{offset} of group {}",
                    names::shown(&state.key.topic),
                    names::shown(&state.key.group)
                )
            };
            if part.acks.is_acked(offset) {
                return Err(conflict(key, format!("{} is acked already", shown())));
            }
            if offset >= part.cursor {
                return Err(DispatchError::NotDelivered { partition, offset });
            }
            match self.claims.get(&(state.key.clone(), partition, offset)) {
                Some(&owner) if owner == handle => {}
                Some(_) => {
                    return Err(conflict(
                        key,
                        format!("{} is acked by another open transaction", shown()),
                    ))
                }
                None => fresh.push((partition, offset)),
            }
        }
        if fresh.is_empty() && handle != 0 {
            return Ok(None);
        }
        Ok(Some(TxnAcks {
            target: AckTarget {
                topic: Arc::clone(&state.key.topic),
                group: Arc::clone(&state.key.group),
                member: state.key.member.clone(),
            },
            positions: fresh,
        }))
    }

    /// (id, topic, partition) of each half record of the transaction
    /// `handle`, for its trace events.
    fn half_records(&self, handle: u64) -> Vec<(MessageId, Arc<str>, u32)> {
        self.txns
            .get(handle)
            .map(|txn| {
                txn.records
                    .iter()
                    .map(|r| {
                        let (topic, partition) = txn.destination(r);
                        (r.id, Arc::clone(topic), partition)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Emits `kind` for each of `records` (from
    /// [`half_records`](Self::half_records)).
    fn emit_for(&mut self, records: Vec<(MessageId, Arc<str>, u32)>, kind: &EventKind) {
        for (id, topic, partition) in records {
            self.emit(
                id,
                Place {
                    topic: Name::Shared(&topic),
                    partition: Some(partition),
                    offset: None,
                    group: None,
                },
                kind.clone(),
                None,
            );
        }
    }

    /// Applies the acks of the committed transaction `handle` to their
    /// groups (idempotent: a restart applies them again) and drops its
    /// claims.
    fn apply_txn_acks(&mut self, handle: u64) {
        self.release_claims(handle);
        let Some(acks) = self.txns.get(handle).map(|t| t.acks.clone()) else {
            return;
        };
        for TxnAcks { target, positions } in acks {
            let state_index = match self.load_state(state_key(&target)) {
                Ok(index) => index,
                Err(error) => {
                    tracing::warn!(
                        %error,
                        handle,
                        "a committed transaction acks messages of a group that is gone: skipped"
                    );
                    continue;
                }
            };
            for (partition, offset) in positions {
                match self.ack_in_state(state_index, partition, offset, None) {
                    Ok(_) => {}
                    // After a restart the group reads its log again from
                    // its ack floor: the ack goes into the bitmap, and the
                    // message is skipped when the cursor reaches it.
                    Err(DispatchError::NotDelivered { .. }) => {
                        self.ack_ahead_of_cursor(state_index, partition, offset)
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        handle,
                        partition,
                        offset,
                        "a committed transaction's ack could not be applied"
                    ),
                }
            }
            self.txn_acks_unsynced = true;
        }
    }

    /// Acks a message the group has not read since its restart (within
    /// the log, and within the bitmap's span: a damaged record could name
    /// any offset).
    fn ack_ahead_of_cursor(&mut self, state_index: usize, partition: u32, offset: u64) {
        let state = &self.states[state_index];
        let end = self
            .topics
            .get(&*state.key.topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map_or(0, |log| log.end_offset());
        let state = &mut self.states[state_index];
        let Some(part) = state.partitions.get_mut(partition as usize) else {
            return;
        };
        let span = offset.saturating_sub(part.acks.floor());
        if offset >= end || span >= AckBitmap::SPAN_OFFSETS_MAX {
            tracing::warn!(
                partition,
                offset,
                "a committed transaction acks a message past its log's end: skipped"
            );
            return;
        }
        if part.acks.ack(offset) {
            state.note_ack(partition, offset);
        }
    }

    /// Drops the claims of the transaction `handle` (it ended).
    fn release_claims(&mut self, handle: u64) {
        let Some(txn) = self.txns.get(handle) else {
            return;
        };
        for TxnAcks { target, positions } in &txn.acks {
            let key = state_key(target);
            for &(partition, offset) in positions {
                let claim = (key.clone(), partition, offset);
                if self.claims.get(&claim) == Some(&handle) {
                    self.claims.remove(&claim);
                }
            }
        }
    }

    /// Why the transaction `handle` may not commit: a message it acks was
    /// acked otherwise since (a plain ACK, a dead-letter move, a seek).
    fn acked_elsewhere(&self, handle: u64) -> Option<String> {
        let txn = self.txns.get(handle)?;
        for TxnAcks { target, positions } in &txn.acks {
            let Some(&index) = self.state_index.get(&state_key(target)) else {
                continue;
            };
            let state = &self.states[index];
            for &(partition, offset) in positions {
                let acked = state
                    .partitions
                    .get(partition as usize)
                    .is_some_and(|part| part.acks.is_acked(offset));
                if acked {
                    return Some(format!(
                        "message {}/{partition}@{offset} of group {} was acked outside the \
                         transaction (an ACK, a dead-letter move or a seek) since: roll it back",
                        names::shown(&target.topic),
                        names::shown(&target.group)
                    ));
                }
            }
        }
        None
    }

    /// At open: the acks of unsettled transactions claim their messages
    /// again.
    pub(super) fn claim_acks_at_open(&mut self) {
        let claims: Vec<((StateKey, u32, u64), u64)> = self
            .txns
            .transactions()
            .flat_map(|txn| {
                txn.acks.iter().flat_map(move |acks| {
                    acks.positions.iter().map(move |&(partition, offset)| {
                        ((state_key(&acks.target), partition, offset), txn.handle)
                    })
                })
            })
            .collect();
        self.claims.extend(claims);
    }

    /// Commits or rolls back the transaction `key` with `handle`; `reply`
    /// gets the outcome once it is durable. Repeating an end that
    /// happened (or is under way) gets the same answer; the other outcome
    /// gets a conflict.
    pub fn txn_end(&mut self, key: TxnKey, handle: u64, outcome: TxnOutcome, reply: TxnEndReply) {
        match self.check_end(&key, handle, outcome) {
            Err(error) => reply(Err(error)),
            Ok(EndCheck::Done) => reply(Ok(outcome)),
            Ok(EndCheck::Join) => {
                if let Some(ending) = self.endings.get_mut(&handle) {
                    ending.replies.push(reply);
                }
            }
            Ok(EndCheck::Start { writing }) => {
                self.endings.insert(
                    handle,
                    Ending {
                        outcome,
                        replies: vec![reply],
                    },
                );
                if !writing {
                    self.append_outcome(handle);
                }
            }
        }
        if let Err(error) = self.collect_written() {
            tracing::error!(%error, "recording written batches failed");
        }
    }

    fn check_end(&self, key: &TxnKey, handle: u64, outcome: TxnOutcome) -> Result<EndCheck> {
        if let Some((settled, ended)) = self.txns.settled(key) {
            if settled == handle {
                return if ended == outcome {
                    Ok(EndCheck::Done)
                } else {
                    Err(conflict(key, format!("it ended ({})", ended.name())))
                };
            }
        }
        let unknown = || TxnError::Unknown(format!("{key} (handle {handle})"));
        if self.txns.handle_of(key) != Some(handle) {
            return Err(unknown().into());
        }
        let txn = self.txns.get(handle).ok_or_else(unknown)?;
        let asked = self.endings.get(&handle).map(|e| e.outcome);
        match (txn.stage, asked) {
            (TxnStage::Committed, _) if outcome == TxnOutcome::Commit => Ok(EndCheck::Done),
            (TxnStage::Committed, _) => Err(conflict(key, "it committed".into())),
            (_, Some(asked)) if asked == outcome => Ok(EndCheck::Join),
            (_, Some(asked)) => Err(conflict(key, format!("it is ending ({})", asked.name()))),
            (TxnStage::Open, None) if outcome == TxnOutcome::Commit && txn.failed => Err(conflict(
                key,
                "a produce of it failed, so it may only roll back".into(),
            )),
            (_, None) => Ok(EndCheck::Start {
                writing: txn.writing > 0,
            }),
        }
    }

    /// Appends the outcome record asked for in `endings[handle]`.
    fn append_outcome(&mut self, handle: u64) {
        let Some(outcome) = self.endings.get(&handle).map(|e| e.outcome) else {
            return;
        };
        // A half append that failed while this COMMIT waited for it.
        let failed_key = self
            .txns
            .get(handle)
            .filter(|t| t.failed && outcome == TxnOutcome::Commit)
            .map(|t| t.key.clone());
        if let Some(key) = failed_key {
            let refusal = conflict(
                &key,
                "a produce of it failed, so it may only roll back".into(),
            );
            self.answer_end(handle, Err(refusal));
            return;
        }
        if outcome == TxnOutcome::Commit {
            if let Some(reason) = self.acked_elsewhere(handle) {
                let key = self.txns.get(handle).map(|t| t.key.clone());
                if let Some(key) = key {
                    self.answer_end(handle, Err(conflict(&key, reason)));
                    return;
                }
            }
        }
        match self.txns.append_outcome(handle, outcome) {
            Ok(info) => {
                let log = self.txns.log();
                self.submit_wait(log, info, InFlightWrite::Outcome { handle, outcome });
            }
            Err(error) => self.answer_end(handle, Err(error.into())),
        }
    }

    fn answer_end(&mut self, handle: u64, result: Result<TxnOutcome>) {
        let Some(ending) = self.endings.remove(&handle) else {
            return;
        };
        let mut replies = ending.replies.into_iter();
        let Some(first) = replies.next() else { return };
        match result {
            Ok(outcome) => {
                first(Ok(outcome));
                for reply in replies {
                    reply(Ok(outcome));
                }
            }
            Err(error) => {
                let text = error.to_string();
                first(Err(error));
                for reply in replies {
                    reply(Err(DispatchError::InvalidArgument(text.clone())));
                }
            }
        }
    }

    /// Records a half append's durability wait.
    pub(super) fn record_half(
        &mut self,
        write: HalfWrite,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) {
        let HalfWrite {
            handle,
            step,
            records,
            reply,
        } = write;
        let ok = result.is_ok();
        self.txns.half_written(handle, step, ok);
        let retries = step
            .and_then(|step| self.txn_retries.remove(&(handle, step)))
            .map(|waiters| waiters.0)
            .unwrap_or_default();
        match result {
            Ok(_) => {
                let topic = self
                    .txns
                    .get(handle)
                    .and_then(|t| t.records.last().map(|r| t.destination(r).0.clone()));
                if let Some(topic) = topic {
                    for record in &records {
                        self.emit(
                            record.id,
                            Place {
                                topic: Name::Shared(&topic),
                                partition: Some(record.partition),
                                offset: None,
                                group: None,
                            },
                            EventKind::TxnHalfStored { handle },
                            None,
                        );
                    }
                }
                let produced = TxnProduced { handle, records };
                for retry in retries {
                    retry(Ok(produced.clone()));
                }
                reply(Ok(produced));
            }
            Err((error, _)) => {
                for retry in retries {
                    retry(Err(DispatchError::Transaction(TxnError::Conflict {
                        key: self
                            .txns
                            .get(handle)
                            .map_or_else(|| format!("handle {handle}"), |t| t.key.to_string()),
                        reason: format!("the produce this retries failed ({error}): roll it back"),
                    })));
                }
                reply(Err(write_error(error)));
            }
        }
        // A COMMIT or ROLLBACK that came while this append was being
        // written goes on once none is.
        if self.txns.get(handle).is_some_and(|t| t.writing == 0)
            && self
                .txns
                .get(handle)
                .is_some_and(|t| t.stage == TxnStage::Open)
            && self.endings.contains_key(&handle)
        {
            self.append_outcome(handle);
        }
    }

    /// Records an outcome record's durability wait: the answer, then a
    /// commit's move into the topics.
    pub(super) fn record_outcome(
        &mut self,
        handle: u64,
        outcome: TxnOutcome,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) -> Result<()> {
        let ok = result.is_ok();
        let rolled_back = match (outcome, ok) {
            (TxnOutcome::Rollback, true) => self.half_records(handle),
            _ => Vec::new(),
        };
        if ok && outcome == TxnOutcome::Rollback {
            self.release_claims(handle);
        }
        self.txns.outcome_written(handle, outcome, ok);
        if ok {
            self.checks.forget(handle);
        } else {
            // Open again: checked back after another timeout.
            let timeout = self.txns.limits().timeout_ms as i64;
            self.checks
                .again(handle, self.now().saturating_add(timeout));
        }
        match result {
            Ok(_) => {
                self.answer_end(handle, Ok(outcome));
                self.emit_for(rolled_back, &EventKind::TxnRolledBack { handle });
                if outcome == TxnOutcome::Rollback {
                    self.txn_settled = true;
                } else {
                    // Its acks take effect now; its records are moved at
                    // the next poll, with every other commit of this
                    // round.
                    self.apply_txn_acks(handle);
                    self.to_move.push(handle);
                }
            }
            Err((error, _)) => self.answer_end(handle, Err(write_error(error))),
        }
        Ok(())
    }

    /// Moves committed transactions' records into their topics: one
    /// append per partition for the immediate records of all of them, one
    /// schedule per topic for delayed ones. `recheck`: some may be there
    /// already (a restart, a failed move), so each is looked up by id
    /// first.
    pub(super) fn move_committed(&mut self, handles: Vec<u64>, recheck: bool) -> Result<()> {
        let now = self.now();
        // (topic, partition, delayed) -> records and their transactions,
        // in first-seen order.
        let mut groups: Vec<MoveGroup> = Vec::new();
        let mut moved = Vec::with_capacity(handles.len());
        for handle in handles {
            let records = match self.txns.read_records(handle, now) {
                Ok(records) => records,
                Err(error) => {
                    tracing::error!(%error, handle, "reading a committed transaction back failed; tried again later");
                    self.unmoved.push_back(handle);
                    continue;
                }
            };
            moved.push(handle);
            if recheck {
                // A restart or a retried move: its acks were applied when
                // its commit became durable, maybe before a crash lost them
                // from the groups' journals.
                self.apply_txn_acks(handle);
            }
            for CommittedRecord {
                topic,
                partition,
                record,
            } in records
            {
                let Some(state) = self.topics.get(&topic) else {
                    tracing::warn!(
                        topic = %names::shown(&topic),
                        handle,
                        "a committed record's topic was deleted: dropped"
                    );
                    continue;
                };
                let partition = partition.min(state.config.partitions - 1);
                let delayed = record.deliver_at_ms.is_some_and(|due| due > now);
                if recheck {
                    let id = record.id.unwrap_or_default();
                    let present = state.partitions[partition as usize]
                        .offset_of_id(&id)?
                        .is_some()
                        || self.delays.holds_caller_id(&id);
                    if present {
                        continue;
                    }
                }
                let place = (topic, partition, delayed);
                match groups.iter_mut().find(|g| g.place == place) {
                    Some(group) => {
                        group.records.push(record);
                        group.owners.push(handle);
                    }
                    None => groups.push(MoveGroup {
                        place,
                        records: vec![record],
                        owners: vec![handle],
                    }),
                }
            }
        }
        for MoveGroup {
            place: (topic, partition, delayed),
            records,
            owners,
        } in groups
        {
            let mut involved = owners.clone();
            involved.dedup();
            if delayed {
                let routed = records.into_iter().map(|r| (partition, r)).collect();
                match self.schedule_append(&topic, routed) {
                    Ok((pending, shape)) => {
                        let info = pending.append_info().clone();
                        let log = self.delays.timer_log();
                        self.submit_wait(
                            log,
                            info,
                            InFlightWrite::Commit(CommitMove::Schedule {
                                owners,
                                scheduling: Scheduling {
                                    topic,
                                    records: shape,
                                    pending,
                                    reply: Box::new(|_| {}),
                                },
                            }),
                        );
                    }
                    Err(error) => {
                        tracing::error!(%error, "scheduling committed transactions' delayed records failed; tried again later");
                        for handle in involved {
                            self.moving.entry(handle).or_default().failed = true;
                        }
                        continue;
                    }
                }
            } else {
                let Some(log) = self
                    .topics
                    .get(&topic)
                    .map(|t| Arc::clone(&t.partitions[partition as usize]))
                else {
                    continue;
                };
                self.submit_copies(
                    log,
                    records,
                    recheck,
                    InFlightWrite::Commit(CommitMove::Append {
                        topic,
                        partition,
                        owners,
                    }),
                );
            }
            for handle in involved {
                self.moving.entry(handle).or_default().outstanding += 1;
            }
        }
        for handle in moved {
            self.moving.entry(handle).or_default();
            self.finish_move_if_done(handle);
        }
        Ok(())
    }

    /// Moves the transactions whose commit became durable since the last
    /// poll, all together (one append per partition).
    pub(super) fn move_new_commits(&mut self) -> Result<()> {
        if self.to_move.is_empty() {
            return Ok(());
        }
        let handles = std::mem::take(&mut self.to_move);
        self.move_committed(handles, false)?;
        // The inline writer has written them already: record it now.
        self.collect_written()?;
        Ok(())
    }

    /// Records one move of committed transactions' records.
    pub(super) fn record_commit_move(
        &mut self,
        commit_move: CommitMove,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) -> Result<()> {
        let (mut owners, ok) = match commit_move {
            CommitMove::Append {
                topic,
                partition,
                owners,
            } => match result {
                Ok(appended) => {
                    for ((offset, id), handle) in appended.into_iter().zip(&owners) {
                        self.emit(
                            id,
                            Place {
                                topic: Name::Plain(&topic),
                                partition: Some(partition),
                                offset: Some(offset),
                                group: None,
                            },
                            EventKind::TxnCommitted { handle: *handle },
                            None,
                        );
                    }
                    (owners, true)
                }
                Err((error, _)) => {
                    tracing::error!(%error, topic = %names::shown(&topic), partition, "moving committed records failed; tried again later");
                    (owners, false)
                }
            },
            CommitMove::Schedule { owners, scheduling } => {
                let Scheduling {
                    topic,
                    records,
                    pending,
                    ..
                } = scheduling;
                match result {
                    Ok(_) => {
                        let ids = self.delays.schedule_commit(pending)?;
                        for ((id, (partition, due)), handle) in
                            ids.into_iter().zip(records).zip(&owners)
                        {
                            let place = || Place {
                                topic: Name::Plain(&topic),
                                partition: Some(partition),
                                offset: None,
                                group: None,
                            };
                            self.emit(
                                id,
                                place(),
                                EventKind::TxnCommitted { handle: *handle },
                                None,
                            );
                            self.emit(id, place(), EventKind::DelayScheduled { due_ms: due }, None);
                        }
                        (owners, true)
                    }
                    Err((error, _)) => {
                        tracing::error!(%error, "scheduling committed delayed records failed; tried again later");
                        self.delays.schedule_abort(pending);
                        (owners, false)
                    }
                }
            }
        };
        owners.dedup();
        for handle in owners {
            let moving = self.moving.entry(handle).or_default();
            moving.outstanding = moving.outstanding.saturating_sub(1);
            moving.failed |= !ok;
            self.finish_move_if_done(handle);
        }
        Ok(())
    }

    fn finish_move_if_done(&mut self, handle: u64) {
        let Some(moving) = self.moving.get(&handle) else {
            return;
        };
        if moving.outstanding > 0 {
            return;
        }
        let failed = moving.failed;
        self.moving.remove(&handle);
        if failed {
            self.unmoved.push_back(handle);
        } else {
            self.txns.settle(handle, TxnOutcome::Commit);
            self.txn_settled = true;
        }
    }

    /// Moves again the committed transactions whose move failed, once no
    /// move is with the writer (so a retry never lands behind later
    /// appends of the same partition), and makes the watermark durable
    /// when a transaction settled (at most once per ack-sync interval).
    pub(super) fn pump_transactions(&mut self, now: i64, force: bool) -> Result<()> {
        if !self.unmoved.is_empty() && self.moving.is_empty() {
            let handles: Vec<u64> = self.unmoved.drain(..).collect();
            self.move_committed(handles, true)?;
        }
        let due = now - self.txn_flushed_ms >= self.config.ack_sync_interval_ms as i64;
        if self.txn_settled && (force || due) {
            if self.txn_acks_unsynced {
                // Settled transactions' acks are durable before the
                // watermark passes their ack records.
                self.sync_acks(now, true)?;
                self.txn_acks_unsynced = false;
            }
            self.txns.flush_watermark().map_err(DispatchError::from)?;
            self.txn_settled = false;
            self.txn_flushed_ms = now;
        }
        Ok(())
    }

    /// Decides the check-backs due by `now` (at most
    /// [`CHECKS_PER_POLL_MAX`] per poll): each open transaction past its
    /// timeout is checked, with backoff, rate limited per producer group,
    /// until its checks run out and it is left unresolved. A transaction
    /// ending (or ended) meanwhile is not checked.
    pub(super) fn check_transactions(&mut self, now: i64) {
        for handle in self.checks.due(now, CHECKS_PER_POLL_MAX) {
            let Some(txn) = self.txns.get(handle) else {
                self.checks.forget(handle);
                continue;
            };
            if txn.stage != TxnStage::Open || self.endings.contains_key(&handle) {
                continue;
            }
            let (group, id, opened_ms) = (txn.key.group.clone(), txn.key.id.clone(), txn.opened_ms);
            match self.checks.decide(handle, &group, now) {
                CheckDecision::Send { checks } => {
                    self.txns.note_check(handle, checks);
                    let records = self.half_records(handle);
                    self.emit_for(records, &EventKind::TxnChecked { handle, checks });
                    self.txn_checks.push(TxnCheck {
                        group,
                        id,
                        handle,
                        opened_ms,
                        checks,
                    });
                }
                CheckDecision::Throttled => {}
                CheckDecision::Unresolved => tracing::warn!(
                    key = %txn.key,
                    handle,
                    "transaction unresolved: its check-backs ran out; it stays open until its \
                     producer or an operator ends it (dmq tx resolve)"
                ),
            }
        }
    }

    /// Makes the counts of the checks decided this poll durable before
    /// they are handed out; a failure is logged (the counts are then lower
    /// after a restart: more checks, never fewer).
    fn sync_check_counts(&mut self) {
        if let Err(error) = self.txns.sync_checks() {
            tracing::error!(%error, "recording check-back counts failed");
        }
    }

    /// The check-backs decided since the last call, for the owner to send
    /// to a live member of each producer group (the broker's TXN_CHECK).
    /// The member answers with TXN_END; no answer counts as "unknown".
    pub fn take_txn_checks(&mut self) -> Vec<TxnCheck> {
        if !self.txn_checks.is_empty() {
            self.sync_check_counts();
        }
        std::mem::take(&mut self.txn_checks)
    }

    /// At open: every open transaction is checked back again, resuming
    /// its count of checks.
    pub(super) fn schedule_checks_at_open(&mut self) {
        let now = self.now();
        let open: Vec<(u64, i64, u32)> = self
            .txns
            .transactions()
            .filter(|t| t.stage == TxnStage::Open)
            .map(|t| (t.handle, t.opened_ms, self.txns.checks_sent(t.handle)))
            .collect();
        for (handle, opened_ms, sent) in open {
            self.checks.resume(handle, opened_ms, sent, now);
        }
    }

    /// At open: moves every transaction that committed before the restart
    /// (some of its records may be in their topics already) and waits.
    pub(super) fn move_committed_at_open(&mut self) -> Result<()> {
        let handles = self.txns.committed();
        self.move_committed(handles, true)?;
        self.wait_written()
    }

    /// Registers a new instance of the transactional producer `producer`
    /// of `group` (TXN_INIT): its epoch, one more than the last, durable
    /// before this returns. Requests of an older instance are refused from
    /// now on ([`check_producer_epoch`](Self::check_producer_epoch)).
    pub fn txn_init(&mut self, group: &str, producer: &str) -> Result<u32> {
        Ok(self.epochs.bump(group, producer)?)
    }

    /// Refuses a request of `producer` of `group` at `epoch` if a newer
    /// instance registered since.
    pub fn check_producer_epoch(&self, group: &str, producer: &str, epoch: u32) -> Result<()> {
        Ok(self.epochs.check(group, producer, epoch)?)
    }

    /// Every unsettled transaction, oldest first.
    pub fn transactions(&self) -> Vec<TransactionInfo> {
        let now = self.now();
        let timeout = self.txns.limits().timeout_ms as i64;
        self.txns
            .transactions()
            .map(|txn| TransactionInfo {
                group: txn.key.group.clone(),
                id: txn.key.id.clone(),
                handle: txn.handle,
                opened_ms: txn.opened_ms,
                stage: match (txn.stage, self.endings.get(&txn.handle).map(|e| e.outcome)) {
                    (TxnStage::Committed, _) => "committed",
                    (TxnStage::Ending(TxnOutcome::Commit), _)
                    | (TxnStage::Open, Some(TxnOutcome::Commit)) => "committing",
                    (TxnStage::Ending(TxnOutcome::Rollback), _)
                    | (TxnStage::Open, Some(TxnOutcome::Rollback)) => "rolling back",
                    (TxnStage::Open, None) => "open",
                },
                records: txn.records.len(),
                acks: txn.acked_messages(),
                overdue: txn.stage == TxnStage::Open && now - txn.opened_ms > timeout,
                checks: self.checks.sent(txn.handle),
                unresolved: self.checks.is_unresolved(txn.handle),
            })
            .collect()
    }

    /// The topics the unsettled transaction `key` with `handle` holds
    /// records for and acks messages of (both empty if there is no such
    /// transaction), sorted.
    pub fn transaction_topics(&self, key: &TxnKey, handle: u64) -> TransactionTopics {
        let Some(txn) = self.txns.get(handle).filter(|txn| txn.key == *key) else {
            return TransactionTopics::default();
        };
        let sorted = |topics: Vec<&Arc<str>>| {
            let mut topics: Vec<String> = topics.into_iter().map(|t| t.to_string()).collect();
            topics.sort();
            topics.dedup();
            topics
        };
        TransactionTopics {
            produced: sorted(txn.destinations.iter().map(|(topic, _)| topic).collect()),
            acked: sorted(txn.acks.iter().map(|a| &a.target.topic).collect()),
        }
    }

    /// The transactions counted, nothing copied.
    pub fn transaction_counts(&self) -> TransactionCounts {
        let now = self.now();
        let timeout = self.txns.limits().timeout_ms as i64;
        let mut counts = TransactionCounts {
            checks_sent: self.checks.sent_total(),
            ..TransactionCounts::default()
        };
        for txn in self.txns.transactions() {
            counts.unsettled += 1;
            counts.half_records += txn.records.len() as u64;
            if txn.stage == TxnStage::Open && now - txn.opened_ms > timeout {
                counts.overdue += 1;
            }
            if self.checks.is_unresolved(txn.handle) {
                counts.unresolved += 1;
            }
        }
        counts
    }
}

enum EndCheck {
    /// Ended that way already: answer at once.
    Done,
    /// The same end is under way: wait with it.
    Join,
    /// Start it (after the half appends still being written).
    Start { writing: bool },
}

fn state_key(target: &AckTarget) -> StateKey {
    StateKey {
        topic: Arc::clone(&target.topic),
        group: Arc::clone(&target.group),
        member: target.member.clone(),
    }
}

fn conflict(key: &TxnKey, reason: String) -> DispatchError {
    TxnError::Conflict {
        key: key.to_string(),
        reason,
    }
    .into()
}

fn write_error(error: WriteError) -> DispatchError {
    match error {
        WriteError::Store(error) => DispatchError::Store(error),
        WriteError::EarlierFailed => {
            DispatchError::InvalidArgument(WriteError::EarlierFailed.to_string())
        }
    }
}
