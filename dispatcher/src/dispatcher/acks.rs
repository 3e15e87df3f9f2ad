//! Acknowledgements and failed attempts: ack, nack, redelivery after backoff,
//! and dead-letter moves (batched per dead-letter topic).

use super::*;

impl Dispatcher {
    /// Acknowledges one message for the member's group. Returns false if it
    /// was already acked. The ack is durable within `ack_sync_interval_ms`.
    pub fn ack(&mut self, member: MemberId, partition: u32, offset: u64) -> Result<bool> {
        let state = self.member_state(member)?;
        self.ack_in_state(state, partition, offset, None)
    }

    pub(super) fn ack_in_state(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        silent_kind: Option<EventKind>,
    ) -> Result<bool> {
        let state = &mut self.states[state_index];
        let Some(part) = state.partitions.get_mut(partition as usize) else {
            let topic = state.key.topic.to_string();
            return Err(DispatchError::UnknownPartition { topic, partition });
        };
        if part.acks.is_acked(offset) {
            return Ok(false);
        }
        if offset >= part.cursor {
            return Err(DispatchError::NotDelivered { partition, offset });
        }
        part.acks.ack(offset);
        state.note_ack(partition, offset);
        let pending = self.settle_pending(state_index, partition, offset);
        let id = pending.map(|p| p.id).unwrap_or_default();
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            silent_kind.unwrap_or(EventKind::Acked),
            None,
        );
        Ok(true)
    }

    /// Forgets pending message `offset` of a partition whose bitmap has
    /// just acked it: its timer is cancelled and the next message of its
    /// key (ordered topics) released. Returns it, if it was pending.
    fn settle_pending(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
    ) -> Option<Pending> {
        let part = &mut self.states[state_index].partitions[partition as usize];
        let pending = part.pending.remove(&offset);
        part.ready.remove(&offset);
        let pending = pending?;
        match pending.stage {
            Stage::InFlight { timer, .. } | Stage::Waiting { timer } => {
                self.wheel.cancel(timer);
            }
            Stage::Ready | Stage::Held | Stage::DeadLettering => {}
        }
        if let Some(key) = &pending.key {
            release_key(part, key, offset);
        }
        Some(pending)
    }

    /// Merges into this node's copy of a group the acks another node made
    /// (cluster mode: `journal` is the group's replicated ack journal,
    /// `payloads` what the other node wrote to it). Acks only add: an
    /// acked message leaves the group's pending set and is not delivered
    /// from here; nothing acked here is un-acked (a seek back on another
    /// node is not merged). Not journaled again (every node has it), no
    /// event (the node that took the ack recorded it). A group not loaded
    /// here is left alone: it reads the journal when it loads. Returns the
    /// offsets newly acked.
    pub fn merge_replicated_acks(&mut self, journal: &str, payloads: &[Vec<u8>]) -> Result<u64> {
        let Some(state_index) = self
            .states
            .iter()
            .position(|state| !state.retired && state.key.journal_name() == journal)
        else {
            return Ok(0);
        };
        let merges = crate::group::decode_merges(journal, payloads)?;
        let mut merged = 0;
        for (partition, merge) in merges {
            if partition as usize >= self.states[state_index].partitions.len() {
                continue;
            }
            let floor = match &merge {
                AckMerge::Floor(floor) => *floor,
                AckMerge::Bitmap(bitmap) => bitmap.floor(),
                AckMerge::Offsets(_) => 0,
                AckMerge::Failed(failed) => {
                    self.merge_failed_attempts(state_index, partition, failed);
                    continue;
                }
            };
            merged += self.merge_acks_below(state_index, partition, floor);
            let offsets: Vec<u64> = match merge {
                AckMerge::Floor(_) => Vec::new(),
                AckMerge::Bitmap(bitmap) => (bitmap.floor()..bitmap.end())
                    .filter(|offset| bitmap.is_acked(*offset))
                    .collect(),
                AckMerge::Offsets(offsets) => offsets,
                AckMerge::Failed(_) => Vec::new(),
            };
            for offset in offsets {
                let part = &mut self.states[state_index].partitions[partition as usize];
                if offset.saturating_sub(part.acks.floor()) >= AckBitmap::SPAN_OFFSETS_MAX {
                    // Too far ahead of this copy's floor to hold: left
                    // unacked here (delivered again, never lost).
                    continue;
                }
                if part.acks.ack(offset) {
                    merged += 1;
                    self.settle_pending(state_index, partition, offset);
                }
            }
        }
        Ok(merged)
    }

    /// Failed attempts another node counted (a merge): a message not
    /// reached yet, or waiting here with no timer, counts at least as
    /// many; one in flight or waiting for a timer here keeps its own count
    /// (its timer names it).
    fn merge_failed_attempts(&mut self, state_index: usize, partition: u32, failed: &[(u64, u32)]) {
        let state = &mut self.states[state_index];
        let most_failed = state.config.max_attempts.max(1) - 1;
        let part = &mut state.partitions[partition as usize];
        for &(offset, count) in failed {
            let count = count.min(most_failed);
            if part.acks.is_acked(offset) {
                continue;
            }
            match part.pending.get_mut(&offset) {
                Some(pending) if matches!(pending.stage, Stage::Ready | Stage::Held) => {
                    pending.attempt = pending.attempt.max(count);
                }
                Some(_) => {}
                None if offset >= part.cursor => {
                    let held = part.failed_before.entry(offset).or_default();
                    *held = (*held).max(count);
                }
                None => {}
            }
        }
    }

    /// Acks everything below `floor` in one partition of a group (a merge).
    fn merge_acks_below(&mut self, state_index: usize, partition: u32, floor: u64) -> u64 {
        let part = &mut self.states[state_index].partitions[partition as usize];
        if floor <= part.acks.floor() {
            return 0;
        }
        let before = part.acks.floor() + part.acks.acked_above_floor();
        let settled: Vec<u64> = part
            .pending
            .range(..floor)
            .map(|(offset, _)| *offset)
            .collect();
        part.acks.ack_below(floor);
        let after = part.acks.floor() + part.acks.acked_above_floor();
        for offset in settled {
            self.settle_pending(state_index, partition, offset);
        }
        after.saturating_sub(before)
    }

    /// Negatively acknowledges: the message is redelivered after `delay_ms`
    /// (default: the group's backoff), or dead-lettered after its last attempt.
    pub fn nack(
        &mut self,
        member: MemberId,
        partition: u32,
        offset: u64,
        delay_ms: Option<u64>,
    ) -> Result<()> {
        let state_index = self.member_state(member)?;
        let state = &self.states[state_index];
        let part = state.partitions.get(partition as usize).ok_or_else(|| {
            DispatchError::UnknownPartition {
                topic: state.key.topic.to_string(),
                partition,
            }
        })?;
        let Some(pending) = part.pending.get(&offset) else {
            return if part.acks.is_acked(offset) {
                Ok(())
            } else {
                Err(DispatchError::NotDelivered { partition, offset })
            };
        };
        let Stage::InFlight { timer, .. } = pending.stage else {
            return Ok(()); // already waiting for a retry
        };
        let retry_in_ms =
            delay_ms.unwrap_or_else(|| state.config.backoff.delay_ms(pending.attempt));
        let id = pending.id;
        self.wheel.cancel(timer);
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            EventKind::Nacked { retry_in_ms },
            None,
        );
        self.after_failed_attempt(
            state_index,
            partition,
            offset,
            Some(retry_in_ms),
            names::REASON_NACK,
        )
    }

    /// After a failed attempt (timeout, nack, member left): retry after
    /// `retry_in_ms` (default: backoff), or dead-letter after the last attempt.
    pub(super) fn after_failed_attempt(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        retry_in_ms: Option<u64>,
        reason: &str,
    ) -> Result<()> {
        let now = self.now();
        let state = &mut self.states[state_index];
        let max_attempts = state.config.max_attempts.max(1);
        let backoff = state.config.backoff.clone();
        let part = &mut state.partitions[partition as usize];
        let Some(pending) = part.pending.get_mut(&offset) else {
            return Ok(());
        };
        if pending.attempt >= max_attempts {
            return self.dead_letter(state_index, partition, offset, reason);
        }
        let delay = retry_in_ms.unwrap_or_else(|| backoff.delay_ms(pending.attempt));
        let next_attempt = pending.attempt + 1;
        let (id, failed) = (pending.id, pending.attempt);
        if delay == 0 {
            pending.stage = Stage::Ready;
            part.ready.insert(offset);
        } else {
            let timer = self.wheel.insert(
                now.saturating_add(delay as i64),
                TimerTask {
                    state: state_index as u32,
                    partition,
                    offset,
                    attempt: pending.attempt,
                    kind: TimerKind::Retry,
                },
            );
            pending.stage = Stage::Waiting { timer };
        }
        // Counted after a restart or a takeover too (the ack journal).
        state.note_failed_attempt(partition, offset, failed);
        self.emit_in_group(
            state_index,
            partition,
            offset,
            id,
            EventKind::Redelivered { next_attempt },
            Some(reason),
        );
        Ok(())
    }

    pub(super) fn dead_letter(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        reason: &str,
    ) -> Result<()> {
        self.dead_letter_many(&[(state_index, partition, offset)], reason)
            .map_err(|(_, error)| error)
    }

    /// Moves messages `(state, partition, offset)` to their groups'
    /// dead-letter topics, then acks them in their groups: one write (one
    /// durability wait) per dead-letter topic for the whole list, handed to
    /// the durable writer. Until the copies are durable the messages wait
    /// in [`Stage::DeadLettering`]; then they are acked (see
    /// [`record_dead_letters`](Self::record_dead_letters)). A message gone
    /// from its log (retention) is acked as expired instead. On failure to
    /// make a copy (its dead-letter topic cannot be created) returns the
    /// indexes (into `moves`) of the messages not moved, which stay pending
    /// as they were, with the first error.
    pub(super) fn dead_letter_many(
        &mut self,
        moves: &[(usize, u32, u64)],
        reason: &str,
    ) -> std::result::Result<(), (Vec<usize>, DispatchError)> {
        let mut failed = Vec::new();
        let mut first_error = None;
        let mut fail = |index: usize, error: DispatchError, failed: &mut Vec<usize>| {
            failed.push(index);
            if first_error.is_none() {
                first_error = Some(error);
            } else {
                tracing::error!(%error, "a dead-letter move failed");
            }
        };
        // (dead-letter topic, [(index into moves, copy)]), in first-move order.
        let mut copies: Vec<(String, Vec<(usize, RecordInput)>)> = Vec::new();
        for (index, &(state_index, partition, offset)) in moves.iter().enumerate() {
            match self.dead_letter_copy(state_index, partition, offset, reason) {
                Ok(Some((topic, copy))) => match copies.iter_mut().find(|(t, _)| *t == topic) {
                    Some((_, list)) => list.push((index, copy)),
                    None => copies.push((topic, vec![(index, copy)])),
                },
                Ok(None) => {}
                Err(error) => fail(index, error, &mut failed),
            }
        }
        for (dead_letter_topic, list) in copies {
            let log = match self.topic(&dead_letter_topic) {
                Ok(state) => Arc::clone(&state.partitions[0]),
                Err(error) => {
                    let mut indexes = list.iter().map(|(index, _)| *index);
                    if let Some(first) = indexes.next() {
                        failed.extend(indexes);
                        fail(first, error, &mut failed);
                    }
                    continue;
                }
            };
            let mut records = Vec::with_capacity(list.len());
            let mut batch = Vec::with_capacity(list.len());
            for (index, copy) in list {
                let (state_index, partition, offset) = moves[index];
                let Some(pending) = self.states[state_index].partitions[partition as usize]
                    .pending
                    .get_mut(&offset)
                else {
                    continue;
                };
                let member = match pending.stage {
                    Stage::InFlight { member, timer } => {
                        self.wheel.cancel(timer);
                        Some(member)
                    }
                    Stage::Waiting { timer } => {
                        self.wheel.cancel(timer);
                        None
                    }
                    Stage::Ready | Stage::Held => None,
                    // Already on its way.
                    Stage::DeadLettering => continue,
                };
                pending.stage = Stage::DeadLettering;
                let id = pending.id;
                self.states[state_index].partitions[partition as usize]
                    .ready
                    .remove(&offset);
                records.push(copy);
                batch.push(DeadLetterMove {
                    state: state_index,
                    partition,
                    offset,
                    id,
                    member,
                });
            }
            if records.is_empty() {
                continue;
            }
            self.submit_copies(
                log,
                records,
                // Dead letters keep no order of their own to protect: a
                // failed move is retried on its own timer.
                true,
                InFlightWrite::DeadLetters(DeadLetterBatch {
                    topic: dead_letter_topic,
                    moves: batch,
                }),
            );
        }
        // The inline writer has written them already: ack them now.
        if let Err(error) = self.collect_written() {
            tracing::error!(%error, "recording written dead letters failed");
        }
        match first_error {
            None => Ok(()),
            Some(error) => Err((failed, error)),
        }
    }

    /// Records a dead-letter write: each message still waiting for it is
    /// acked in its group (event `DeadLettered`); if the write failed, each
    /// goes back in flight with its deadline re-armed
    /// [`TIMER_RETRY_AFTER_ERROR_MS`] from now, so that the move is tried
    /// again. A message acked, seeked past or deleted with its group
    /// meanwhile is left alone.
    pub(super) fn record_dead_letters(
        &mut self,
        batch: DeadLetterBatch,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) -> Result<()> {
        let failure = match result {
            Ok(_) => None,
            Err((error, _)) => {
                tracing::error!(
                    %error,
                    dead_letter_topic = batch.topic,
                    messages = batch.moves.len(),
                    retry_in_ms = TIMER_RETRY_AFTER_ERROR_MS,
                    "writing dead letters failed"
                );
                Some(())
            }
        };
        let now = self.now();
        for moved in batch.moves {
            let Some(pending) = self
                .states
                .get_mut(moved.state)
                .and_then(|state| state.partitions.get_mut(moved.partition as usize))
                .and_then(|part| part.pending.get_mut(&moved.offset))
            else {
                continue;
            };
            if pending.stage != Stage::DeadLettering || pending.id != moved.id {
                continue;
            }
            if failure.is_some() {
                let timer = self.wheel.insert(
                    now.saturating_add(TIMER_RETRY_AFTER_ERROR_MS),
                    TimerTask {
                        state: moved.state as u32,
                        partition: moved.partition,
                        offset: moved.offset,
                        attempt: pending.attempt,
                        kind: TimerKind::AckDeadline,
                    },
                );
                // No member holds it: the re-armed deadline only retries
                // the move (member 0 is never given out).
                pending.stage = Stage::InFlight {
                    member: moved.member.unwrap_or(0),
                    timer,
                };
                continue;
            }
            let kind = EventKind::DeadLettered {
                dead_letter_topic: batch.topic.clone(),
            };
            self.ack_in_state(moved.state, moved.partition, moved.offset, Some(kind))?;
        }
        Ok(())
    }

    /// The dead-letter copy of one pending message and the topic it goes
    /// to (created on first use), or `None` if the message is gone from its
    /// log (then acked as expired: nothing to move).
    pub(super) fn dead_letter_copy(
        &mut self,
        state_index: usize,
        partition: u32,
        offset: u64,
        reason: &str,
    ) -> Result<Option<(String, RecordInput)>> {
        let (topic, group, dead_letter_topic) = {
            let state = &self.states[state_index];
            let dead_letter_topic = state
                .config
                .dead_letter_topic_for(&state.key.topic, &state.key.group);
            (
                state.key.topic.to_string(),
                state.key.group.to_string(),
                dead_letter_topic,
            )
        };
        let attempts = pending_attempt(&self.states[state_index], partition, offset);
        let log = Arc::clone(&self.topic(&topic)?.partitions[partition as usize]);
        let Some(record) = record_at(log.as_ref(), offset)? else {
            // Gone from the log (retention): nothing to move; ack it.
            self.ack_in_state(state_index, partition, offset, Some(EventKind::Expired))?;
            return Ok(None);
        };
        if !self.topics.contains_key(&dead_letter_topic) {
            self.create_topic(
                &dead_letter_topic,
                TopicConfig {
                    partitions: 1,
                    ordered: false,
                },
            )?;
        }
        // A dead letter of a dead letter replaces the earlier move's
        // headers: a copy never grows past the frame headroom that the
        // six headers are counted in (PROTOCOL.md §8).
        let mut headers: Vec<(Bytes, Bytes)> = record
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with(names::DEAD_LETTER_HEADER_PREFIX.as_bytes()))
            .cloned()
            .collect();
        for (name, value) in [
            ("dmq.dlq.topic", topic.clone()),
            ("dmq.dlq.partition", partition.to_string()),
            ("dmq.dlq.offset", offset.to_string()),
            ("dmq.dlq.group", group.clone()),
            ("dmq.dlq.attempts", attempts.to_string()),
            ("dmq.dlq.reason", reason.to_string()),
        ] {
            headers.push((Bytes::from_static(name.as_bytes()), Bytes::from(value)));
        }
        let copy = RecordInput {
            id: Some(record.id),
            key: record.key.clone(),
            headers,
            value: record.value.clone(),
            deliver_at_ms: None,
            expire_at_ms: None,
        };
        Ok(Some((dead_letter_topic, copy)))
    }
}
