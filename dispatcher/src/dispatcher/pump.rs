//! The pump: timers (ack deadlines, retries), due delays fired in batches
//! through the durable writer (and its outcomes recorded),
//! filling members within their credit, and the ack syncs; `poll` runs them
//! in that order.

use super::*;

impl Dispatcher {
    /// Does everything due by now: fires ack deadlines and retries, moves due
    /// delayed messages to their topics, hands messages to members within
    /// their credit and syncs acks. Returns the deliveries.
    pub fn poll(&mut self) -> Result<Vec<Delivery>> {
        let now = self.now();
        self.fire_timers(now)?;
        self.fire_delays(now, FIRE_PER_POLL_MAX)?;
        self.move_new_commits()?;
        self.check_transactions(now);
        for state_index in 0..self.states.len() {
            // Most groups of a large registry have no member connected:
            // they cost one check per poll, not a fill.
            if self.states[state_index].members.is_empty() {
                continue;
            }
            self.fill(state_index, now)?;
        }
        self.sync_acks(now, false)?;
        self.pump_transactions(now, false)?;
        Ok(std::mem::take(&mut self.outbox))
    }

    /// Makes every ack durable now (shutdown, tests), after the writer
    /// finished what it was given.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.wait_written()?;
        let now = self.now();
        self.sync_acks(now, true)?;
        self.delays.checkpoint()?;
        self.pump_transactions(now, true)?;
        Ok(())
    }

    /// Hands the appends the dispatcher decides on (fired delays) to a
    /// [`BackgroundWriter`] thread instead of doing them inline: `wake` is
    /// called when outcomes are ready, and the owner then calls
    /// [`poll`](Self::poll), which records them. Without it (simulations,
    /// tests) every append is done and recorded inside the call that
    /// decided it.
    pub fn write_in_background(&mut self, wake: Box<dyn Fn() + Send>) -> std::io::Result<()> {
        let writer = BackgroundWriter::start(self.written_tx.clone(), wake)?;
        self.writer = Box::new(writer);
        Ok(())
    }

    /// When `poll` next has timed work to do (ack deadlines, retries, delays,
    /// ack syncs, rate limits), if ever.
    pub fn next_wakeup_ms(&self) -> Option<i64> {
        let mut next = [
            self.wheel.next_due_ms(),
            self.delays.next_due_ms(),
            self.checks.next_due_ms(),
        ]
        .into_iter()
        .flatten()
        .min();
        for state in &self.states {
            if state.needs_sync() {
                let due = state.last_sync_ms + self.config.ack_sync_interval_ms as i64;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            if let Some(rate) = &state.rate {
                let due = rate.next_token_ms();
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    pub(super) fn sync_acks(&mut self, now: i64, force: bool) -> Result<()> {
        let interval = self.config.ack_sync_interval_ms as i64;
        let compact = self.config.ack_journal_compact_bytes;
        for state in &mut self.states {
            if state.needs_sync() && (force || now - state.last_sync_ms >= interval) {
                state.sync(now, compact)?;
            }
        }
        Ok(())
    }

    pub(super) fn fire_timers(&mut self, now: i64) -> Result<()> {
        let mut fired = Vec::new();
        self.wheel.advance(now, &mut fired);
        // Ack deadlines of messages on their last attempt: moved to their
        // dead-letter topics together, one append per topic, after the loop.
        let mut exhausted: Vec<(TimerTask, MemberId)> = Vec::new();
        for (_, task) in fired {
            let state_index = task.state as usize;
            let Some(state) = self.states.get_mut(state_index) else {
                continue;
            };
            let max_attempts = state.config.max_attempts.max(1);
            let Some(part) = state.partitions.get_mut(task.partition as usize) else {
                continue;
            };
            let Some(pending) = part.pending.get_mut(&task.offset) else {
                continue;
            };
            if pending.attempt != task.attempt {
                continue;
            }
            match (task.kind, pending.stage) {
                (TimerKind::AckDeadline, Stage::InFlight { member, .. }) => {
                    if pending.attempt >= max_attempts {
                        exhausted.push((task, member));
                        continue;
                    }
                    self.after_failed_attempt(
                        state_index,
                        task.partition,
                        task.offset,
                        None,
                        names::REASON_ACK_TIMEOUT,
                    )?;
                }
                (TimerKind::Retry, Stage::Waiting { .. }) => {
                    pending.stage = Stage::Ready;
                    part.ready.insert(task.offset);
                }
                _ => {}
            }
        }
        if exhausted.is_empty() {
            return Ok(());
        }
        let moves: Vec<(usize, u32, u64)> = exhausted
            .iter()
            .map(|(task, _)| (task.state as usize, task.partition, task.offset))
            .collect();
        if let Err((failed, error)) = self.dead_letter_many(&moves, names::REASON_ACK_TIMEOUT) {
            // A dead-letter move that failed (no room, a partition cap): the
            // messages stay in flight and are tried again later.
            tracing::error!(
                %error,
                messages = failed.len(),
                retry_in_ms = TIMER_RETRY_AFTER_ERROR_MS,
                "moving timed-out messages to their dead-letter topics failed"
            );
            for index in failed {
                let (task, member) = exhausted[index];
                let timer = self
                    .wheel
                    .insert(now.saturating_add(TIMER_RETRY_AFTER_ERROR_MS), task);
                let pending = self.states[task.state as usize].partitions[task.partition as usize]
                    .pending
                    .get_mut(&task.offset);
                match pending {
                    Some(pending) => pending.stage = Stage::InFlight { member, timer },
                    None => {
                        self.wheel.cancel(timer);
                    }
                }
            }
        }
        Ok(())
    }

    /// Fires due delayed messages, at most about `limit` of them (whole
    /// batches): hands each partition's batch to the durable writer and
    /// records the outcomes of earlier batches. With the background writer
    /// at most [`FIRE_IN_FLIGHT_MAX`] messages are being written at once.
    pub(super) fn fire_delays(&mut self, now: i64, limit: usize) -> Result<()> {
        if self.collect_written()? {
            return Ok(());
        }
        let mut fired_this_poll = 0;
        while fired_this_poll < limit {
            // Messages whose append failed (a full disk) go first, in due
            // order, before any new one is polled, and only once nothing
            // submitted before them is still being written (see
            // `crate::writer`: a retry lifts the log's failed state).
            let retry = !self.unfired.is_empty();
            let due: Vec<DueMessage> = if retry {
                if self.firing_messages() > 0 {
                    return Ok(());
                }
                self.unfired.drain(..).collect()
            } else {
                if self.firing_messages() >= FIRE_IN_FLIGHT_MAX {
                    return Ok(());
                }
                self.delays.poll_due(now, FIRE_BATCH_MAX)?
            };
            if due.is_empty() {
                return Ok(());
            }
            fired_this_poll += due.len();
            self.submit_fired(due, retry)?;
            if self.collect_written()? {
                return Ok(());
            }
        }
        // More are due: `next_wakeup_ms` is already past, so the next poll
        // comes at once, after the groups had their turn.
        Ok(())
    }

    /// Fires every delay due before this dispatcher opened and waits until
    /// each is in its topic (or its append failed): afterwards no message
    /// that may have fired before a crash is still pending in the delay
    /// store.
    pub(super) fn fire_overdue_at_open(&mut self) -> Result<()> {
        loop {
            self.fire_delays(self.opened_at_ms, usize::MAX)?;
            self.wait_written()?;
            let more_due = self
                .delays
                .next_due_ms()
                .is_some_and(|due| due <= self.opened_at_ms);
            if !more_due || !self.unfired.is_empty() {
                return Ok(());
            }
        }
    }

    /// Blocks until every batch handed to the writer is written (or
    /// failed) and recorded (shutdown, checkpoints).
    pub(super) fn wait_written(&mut self) -> Result<()> {
        while !self.writes.is_empty() {
            match self.written.recv() {
                Ok(done) => {
                    self.record_written(done)?;
                }
                // The writer is gone with its queue: what it had not
                // written fires again after a restart (and a dead letter
                // is moved again).
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Records every outcome the writer has sent so far. True if a batch
    /// of fired delays failed (its messages wait in `unfired`).
    pub(super) fn collect_written(&mut self) -> Result<bool> {
        let mut failed = false;
        while let Ok(done) = self.written.try_recv() {
            failed |= self.record_written(done)?;
        }
        Ok(failed)
    }

    /// Records one outcome of the writer. True if it was a batch of fired
    /// delays that failed.
    pub(super) fn record_written(&mut self, done: WriteDone) -> Result<bool> {
        match self.writes.remove(&done.ticket) {
            Some(InFlightWrite::Fire(batch)) => self.record_fired(batch, done.result),
            Some(InFlightWrite::DeadLetters(batch)) => {
                self.record_dead_letters(batch, done.result)?;
                Ok(false)
            }
            Some(InFlightWrite::Schedule(scheduling)) => {
                self.record_scheduled(scheduling, done.result);
                Ok(false)
            }
            Some(InFlightWrite::Half(write)) => {
                self.record_half(write, done.result);
                Ok(false)
            }
            Some(InFlightWrite::Outcome { handle, outcome }) => {
                self.record_outcome(handle, outcome, done.result)?;
                Ok(false)
            }
            Some(InFlightWrite::Commit(commit_move)) => {
                self.record_commit_move(commit_move, done.result)?;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// Hands one write to the writer under a new ticket, remembering what
    /// it is for until its outcome comes back.
    pub(super) fn submit_write(
        &mut self,
        log: Arc<dyn PartitionLog>,
        work: WriteWork,
        flush: bool,
        retry: bool,
        what: InFlightWrite,
    ) {
        let ticket = self.next_write_ticket;
        self.next_write_ticket += 1;
        self.writes.insert(ticket, what);
        self.writer.submit(WriteJob {
            ticket,
            log,
            work,
            flush,
            retry,
        });
    }

    /// Hands the durability wait of an append the dispatcher made itself
    /// (`append_deferred`, in call order) to the writer. A wait has no
    /// order of its own to protect, so it is never held behind a failed
    /// append of its log.
    pub(super) fn submit_wait(
        &mut self,
        log: Arc<dyn PartitionLog>,
        info: AppendInfo,
        what: InFlightWrite,
    ) {
        self.submit_write(log, WriteWork::Wait(info), false, true, what);
    }

    /// Hands records that are durable elsewhere (fired delays from the
    /// timer log, dead-letter copies, a committed transaction's records
    /// from the half log) to the writer for `log`. Under a lazy fsync
    /// policy the copy is flushed before its outcome is recorded: what
    /// depends on it (a fired mark, an ack, a settled transaction whose half
    /// records may then be deleted) may become durable at once, and a
    /// record durable elsewhere must not become a copy a power loss can
    /// take back.
    pub(super) fn submit_copies(
        &mut self,
        log: Arc<dyn PartitionLog>,
        records: Vec<RecordInput>,
        retry: bool,
        what: InFlightWrite,
    ) {
        let flush = log.durable_on_append();
        self.submit_write(
            log,
            WriteWork::Append(BatchInput::new(records)),
            flush,
            retry,
            what,
        );
    }

    /// Fired messages with the writer now.
    pub(super) fn firing_messages(&self) -> usize {
        self.writes
            .values()
            .map(|write| match write {
                InFlightWrite::Fire(batch) => batch.messages.len(),
                _ => 0,
            })
            .sum()
    }

    /// Groups due messages by partition, in first-due order, and submits
    /// one write per partition. A message whose topic is gone is dropped;
    /// one whose copy is already in its log (fired before a crash lost its
    /// fired mark) is skipped. Both are marked fired at once.
    pub(super) fn submit_fired(&mut self, due: Vec<DueMessage>, retry: bool) -> Result<()> {
        let mut done_already = Vec::new();
        // First pass: each message's batch (one per log, in first-due
        // order) and each batch's size, so that the second pass moves every
        // record once into a vector of its final size. Growing the batches
        // by pushes copied a burst's records several times into freshly
        // faulted pages (7 % of the dispatcher while a million delays fire).
        let mut batches: Vec<(Arc<dyn PartitionLog>, u32, usize)> = Vec::new();
        let mut batch_of: Vec<Option<usize>> = Vec::with_capacity(due.len());
        for message in &due {
            let Some(topic) = self.topics.get(&message.topic) else {
                tracing::warn!(topic = message.topic, id = %message.id, "delayed message for a deleted topic dropped");
                done_already.push(message.id);
                batch_of.push(None);
                continue;
            };
            let partition = message.partition.min(topic.config.partitions - 1);
            let log = &topic.partitions[partition as usize];
            // Due before this dispatcher opened: it may have fired before a
            // crash that lost its fired mark. A copy already in the log is
            // not appended again (a second copy would escape a deletion
            // that covered the first).
            // The id index answers without reading the copy: reading it
            // checks the CRC of its whole batch, and a burst fired before a
            // crash is one batch of thousands per partition (seconds of
            // dispatcher time at a restart, every other call waiting).
            if message.due_ms <= self.opened_at_ms && log.offset_of_id(&message.id)?.is_some() {
                done_already.push(message.id);
                batch_of.push(None);
                continue;
            }
            // Logs are per topic partition: the same log is the same batch.
            let index = match batches.iter().position(|(l, _, _)| Arc::ptr_eq(l, log)) {
                Some(index) => index,
                None => {
                    batches.push((Arc::clone(log), partition, 0));
                    batches.len() - 1
                }
            };
            batches[index].2 += 1;
            batch_of.push(Some(index));
        }
        if !done_already.is_empty() {
            self.delays.mark_fired(&done_already)?;
        }
        let mut filled: Vec<(Option<String>, Vec<RecordInput>, Vec<FiredMessage>)> = batches
            .iter()
            .map(|&(_, _, size)| (None, Vec::with_capacity(size), Vec::with_capacity(size)))
            .collect();
        for (message, index) in due.into_iter().zip(batch_of) {
            let Some(index) = index else { continue };
            let (topic, records, fired) = &mut filled[index];
            topic.get_or_insert(message.topic);
            records.push(message.record);
            fired.push(FiredMessage {
                id: message.id,
                partition: message.partition,
                due_ms: message.due_ms,
            });
        }
        for ((log, partition, _), (topic, records, fired)) in batches.into_iter().zip(filled) {
            let Some(topic) = topic else { continue };
            self.submit_copies(
                log,
                records,
                retry,
                InFlightWrite::Fire(FiringBatch {
                    topic,
                    partition,
                    messages: fired,
                }),
            );
        }
        Ok(())
    }

    /// Records one outcome of the writer: the fired marks and trace events
    /// of a written batch, or its messages back in `unfired`. True if it
    /// failed.
    fn record_fired(
        &mut self,
        batch: FiringBatch,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) -> Result<bool> {
        match result {
            Ok(appended) => {
                let mut ids = Vec::with_capacity(batch.messages.len());
                for (message, (offset, id)) in batch.messages.iter().zip(appended) {
                    self.emit(
                        id,
                        Place {
                            topic: Name::Plain(&batch.topic),
                            partition: Some(batch.partition),
                            offset: Some(offset),
                            group: None,
                        },
                        EventKind::DelayFired,
                        None,
                    );
                    ids.push(message.id);
                }
                self.delays.mark_fired(&ids)?;
                Ok(false)
            }
            Err((error, records)) => {
                if !matches!(error, WriteError::EarlierFailed) {
                    tracing::error!(
                        %error,
                        topic = batch.topic,
                        partition = batch.partition,
                        messages = records.len(),
                        "firing delayed messages failed; they are tried again at the next poll"
                    );
                }
                for (message, record) in batch.messages.into_iter().zip(records) {
                    self.unfired.push_back(DueMessage {
                        id: message.id,
                        topic: batch.topic.clone(),
                        partition: message.partition,
                        due_ms: message.due_ms,
                        record,
                    });
                }
                Ok(true)
            }
        }
    }

    /// Hands messages of one state to its members within their credit.
    ///
    /// Members take turns, and so do partitions, but a turn is a chunk: a
    /// member goes on with the partition it was given, up to
    /// [`FILL_CHUNK`] messages, while it has credit. Consecutive messages
    /// of one partition then reach one member together (one DELIVER
    /// batch, one trace run) instead of alternating member by member.
    pub(super) fn fill(&mut self, state_index: usize, now: i64) -> Result<()> {
        loop {
            let Some(member) = self.next_member_with_credit(state_index) else {
                return Ok(());
            };
            if !self.take_rate_token(state_index, now) {
                return Ok(());
            }
            let Some((partition, record, attempt)) = self.next_message(state_index, now)? else {
                self.give_back_rate_token(state_index);
                return Ok(());
            };
            self.deliver(state_index, member, partition, record, attempt, now);
            for _ in 1..FILL_CHUNK {
                if self.members.get(&member).is_none_or(|m| m.credit == 0)
                    || !self.take_rate_token(state_index, now)
                {
                    break;
                }
                let Some((record, attempt)) =
                    self.next_in_partition(state_index, partition, now)?
                else {
                    self.give_back_rate_token(state_index);
                    break;
                };
                self.deliver(state_index, member, partition, record, attempt, now);
            }
        }
    }

    /// Takes one delivery from the group's rate limit, if it has one.
    fn take_rate_token(&mut self, state_index: usize, now: i64) -> bool {
        match &mut self.states[state_index].rate {
            Some(rate) => rate.try_take(now),
            None => true,
        }
    }

    /// Returns a token taken for a delivery that did not happen.
    fn give_back_rate_token(&mut self, state_index: usize) {
        if let Some(rate) = &mut self.states[state_index].rate {
            rate.give_back();
        }
    }

    pub(super) fn next_member_with_credit(&mut self, state_index: usize) -> Option<MemberId> {
        let state = &mut self.states[state_index];
        let count = state.members.len();
        for i in 0..count {
            let index = (state.next_member + i) % count;
            let member = state.members[index];
            if self.members.get(&member).is_some_and(|m| m.credit > 0) {
                state.next_member = (index + 1) % count;
                return Some(member);
            }
        }
        None
    }

    pub(super) fn deliver(
        &mut self,
        state_index: usize,
        member: MemberId,
        partition: u32,
        record: Record,
        attempt: u32,
        now: i64,
    ) {
        let state = &mut self.states[state_index];
        let deadline = now.saturating_add(state.config.ack_timeout_ms as i64);
        let timer = self.wheel.insert(
            deadline,
            TimerTask {
                state: state_index as u32,
                partition,
                offset: record.offset,
                attempt,
                kind: TimerKind::AckDeadline,
            },
        );
        if let Some(pending) = state.partitions[partition as usize]
            .pending
            .get_mut(&record.offset)
        {
            pending.attempt = attempt;
            pending.stage = Stage::InFlight { member, timer };
        }
        if let Some(m) = self.members.get_mut(&member) {
            m.credit = m.credit.saturating_sub(1);
        }
        let (topic, group) = (state.key.topic.clone(), state.key.group.clone());
        self.emit(
            record.id,
            Place {
                topic: Name::Shared(&topic),
                partition: Some(partition),
                offset: Some(record.offset),
                group: Some(Name::Shared(&group)),
            },
            EventKind::Delivered { attempt, member },
            None,
        );
        self.outbox.push(Delivery {
            member,
            topic,
            group,
            partition,
            attempt,
            record,
        });
    }

    /// The next message to deliver from any partition (round robin):
    /// redeliveries first, then the cursor. Returns (partition, record,
    /// attempt number of this delivery).
    pub(super) fn next_message(
        &mut self,
        state_index: usize,
        now: i64,
    ) -> Result<Option<(u32, Record, u32)>> {
        let partitions = self.states[state_index].partitions.len();
        for i in 0..partitions {
            let partition = (self.states[state_index].next_partition + i) % partitions;
            if let Some((record, attempt)) =
                self.next_in_partition(state_index, partition as u32, now)?
            {
                self.states[state_index].next_partition = (partition + 1) % partitions;
                return Ok(Some((partition as u32, record, attempt)));
            }
        }
        Ok(None)
    }

    pub(super) fn next_in_partition(
        &mut self,
        state_index: usize,
        partition: u32,
        now: i64,
    ) -> Result<Option<(Record, u32)>> {
        let topic_name = self.states[state_index].key.topic.clone();
        let topic = self.topic(&topic_name)?;
        let log = Arc::clone(&topic.partitions[partition as usize]);
        let ordered = topic.config.ordered;
        // Redeliveries (and released held messages) first.
        while let Some(offset) = self.states[state_index].partitions[partition as usize]
            .ready
            .pop_first()
        {
            let Some(record) = record_at(log.as_ref(), offset)? else {
                self.ack_in_state(state_index, partition, offset, Some(EventKind::Expired))?;
                continue;
            };
            if let Some(kind) = self.skip_reason(&topic_name, partition, &record, now) {
                self.ack_in_state(state_index, partition, offset, Some(kind))?;
                continue;
            }
            let attempt = pending_attempt(&self.states[state_index], partition, offset) + 1;
            return Ok(Some((record, attempt)));
        }
        // Then the cursor (a message may have failed attempts from
        // before a restart or a takeover).
        match self.advance_cursor(state_index, partition, &log, ordered, now)? {
            Next::Deliver(record) => {
                let attempt = pending_attempt(&self.states[state_index], partition, record.offset);
                Ok(Some((record, attempt + 1)))
            }
            Next::Nothing => Ok(None),
        }
    }

    pub(super) fn skip_reason(
        &self,
        topic: &str,
        partition: u32,
        record: &Record,
        now: i64,
    ) -> Option<EventKind> {
        if self
            .topics
            .get(topic)
            .is_some_and(|t| t.tombstones.covers(partition, record))
        {
            return Some(EventKind::Deleted);
        }
        if record.expire_at_ms.is_some_and(|expire| expire <= now) {
            return Some(EventKind::Expired);
        }
        None
    }

    pub(super) fn advance_cursor(
        &mut self,
        state_index: usize,
        partition: u32,
        log: &Arc<dyn PartitionLog>,
        ordered: bool,
        now: i64,
    ) -> Result<Next> {
        let batch = self.config.read_batch_records.max(1);
        loop {
            let state = &mut self.states[state_index];
            let cap = state.config.max_unacked_per_partition.max(1) as usize;
            let part = &mut state.partitions[partition as usize];
            // The ack bitmap spans at most SPAN_OFFSETS_MAX offsets above the
            // floor: a message stuck at the floor stops the cursor there.
            // (The floor may be above the cursor: acks restored after a
            // restart, not yet passed by the cursor.)
            let span_full =
                part.cursor.saturating_sub(part.acks.floor()) >= AckBitmap::SPAN_OFFSETS_MAX - 1;
            if part.pending.len() >= cap || span_full {
                return Ok(Next::Nothing);
            }
            if part.lookahead.is_empty() {
                if part.cursor >= log.end_offset() {
                    return Ok(Next::Nothing);
                }
                let cursor = part.cursor.max(log.start_offset());
                part.lookahead
                    .extend(log.read_whole_batches(cursor, batch)?);
            }
            let Some(record) = part.lookahead.pop_front() else {
                return Ok(Next::Nothing);
            };
            let offset = record.offset;
            if offset < part.cursor {
                continue;
            }
            // Offsets skipped over were deleted by retention: nothing to deliver.
            if part.cursor < offset {
                part.acks.ack_below(offset);
                state.note_reset();
            }
            let part = &mut state.partitions[partition as usize];
            part.cursor = offset + 1;
            let failed = part.take_failed_before(offset);
            if part.acks.is_acked(offset) {
                continue;
            }
            let topic = state.key.topic.clone();
            if let Some(kind) = self.skip_reason(&topic, partition, &record, now) {
                let part = &mut self.states[state_index].partitions[partition as usize];
                part.pending.insert(
                    offset,
                    Pending {
                        id: record.id,
                        key: None,
                        attempt: failed,
                        stage: Stage::Ready,
                    },
                );
                self.ack_in_state(state_index, partition, offset, Some(kind))?;
                continue;
            }
            let part = &mut self.states[state_index].partitions[partition as usize];
            let key = if ordered { record.key.clone() } else { None };
            let mut pending = Pending {
                id: record.id,
                key: key.clone(),
                attempt: failed,
                stage: Stage::Ready,
            };
            if let Some(key) = &key {
                if part.key_owner.contains_key(key) {
                    pending.stage = Stage::Held;
                    part.held.entry(key.clone()).or_default().push_back(offset);
                    part.pending.insert(offset, pending);
                    continue;
                }
                part.key_owner.insert(key.clone(), offset);
            }
            if let Some(due) = record.deliver_at_ms.filter(|&due| due > now) {
                let task = TimerTask {
                    state: state_index as u32,
                    partition,
                    offset,
                    attempt: failed,
                    kind: TimerKind::Retry,
                };
                pending.stage = Stage::Waiting {
                    timer: self.wheel.insert(due, task),
                };
                self.states[state_index].partitions[partition as usize]
                    .pending
                    .insert(offset, pending);
                continue;
            }
            self.states[state_index].partitions[partition as usize]
                .pending
                .insert(offset, pending);
            return Ok(Next::Deliver(record));
        }
    }
}
