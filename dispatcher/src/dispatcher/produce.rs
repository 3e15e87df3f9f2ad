//! Records entering a topic through the dispatcher: routed or pre-routed
//! produce (immediate records appended, delayed ones to the delay store) and
//! delay cancellation.

use super::*;

impl Dispatcher {
    /// Stores records in `topic`, routed by the topic's [`Router`]: an
    /// explicit partition takes them all; else each keyed record goes to
    /// its key's hash partition (so a key never spans two partitions) and
    /// the keyless ones to one partition, round robin. See
    /// [`produce_routed`](Self::produce_routed).
    pub fn produce(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<RecordInput>,
    ) -> Result<Vec<Produced>> {
        let routes = self
            .topic(topic)?
            .router
            .route(partition, records.iter().map(|r| r.key.as_deref()))
            .map_err(|e| DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition: e.partition,
            })?;
        self.produce_routed(topic, routes.into_iter().zip(records).collect())
    }

    /// Stores records already routed to their partitions: those whose
    /// deliver-at is in the future go to the delay store, the rest are
    /// appended to their partition (one durable append per partition).
    /// The answer is in the records' order.
    pub fn produce_routed(
        &mut self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
    ) -> Result<Vec<Produced>> {
        self.check_routed(topic, &records)?;
        let now = self.now();
        let mut immediate: BTreeMap<u32, Vec<RecordInput>> = BTreeMap::new();
        let mut delayed = Vec::new();
        let mut order = Vec::with_capacity(records.len());
        for (partition, record) in records {
            match record.deliver_at_ms {
                Some(due) if due > now => {
                    order.push((true, partition));
                    delayed.push((partition, record));
                }
                _ => {
                    order.push((false, partition));
                    immediate.entry(partition).or_default().push(record);
                }
            }
        }
        let mut appended = HashMap::new();
        for (partition, records) in immediate {
            let offsets = self.topic(topic)?.partitions[partition as usize].append(records)?;
            appended.insert(partition, offsets.into_iter());
        }
        let mut delayed_produced = if delayed.is_empty() {
            Vec::new()
        } else {
            self.schedule_and_wait(topic, delayed)?
        }
        .into_iter();
        let mut produced = Vec::with_capacity(order.len());
        for (is_delayed, partition) in order {
            if is_delayed {
                let Some(scheduled) = delayed_produced.next() else {
                    break;
                };
                produced.push(scheduled);
            } else {
                let Some((offset, id)) = appended.get_mut(&partition).and_then(Iterator::next)
                else {
                    break;
                };
                produced.push(Produced {
                    partition,
                    offset: Some(offset),
                    id,
                    delayed_until_ms: None,
                });
            }
        }
        Ok(produced)
    }

    /// [`schedule_delayed`](Self::schedule_delayed), waiting for the
    /// answer (the inline writer has it at once; the background writer
    /// within its durability wait).
    fn schedule_and_wait(
        &mut self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
    ) -> Result<Vec<Produced>> {
        let slot: Arc<std::sync::Mutex<Option<Result<Vec<Produced>>>>> = Arc::default();
        let answer = Arc::clone(&slot);
        self.schedule_delayed(
            topic,
            records,
            Box::new(move |result| {
                *answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            }),
        );
        loop {
            if let Some(result) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return result;
            }
            match self.written.recv() {
                Ok(done) => {
                    self.record_written(done)?;
                }
                Err(_) => {
                    return Err(DispatchError::InvalidArgument(
                        "the durable writer stopped".into(),
                    ))
                }
            }
        }
    }

    /// Stores delayed records (already routed, every one checked against
    /// the topic) in the delay store without waiting on this thread: the
    /// timer-log append is made here, in call order, and the durable writer
    /// waits for its durability (sharing one fdatasync with every other
    /// batch of the round); then the next poll makes the messages pending
    /// and calls `reply` with one [`Produced`] per record, in order. A
    /// record whose deliver-at has passed meanwhile is scheduled anyway
    /// (it fires at the next poll). Nothing is answered before the append
    /// is durable; a failure is answered too.
    pub fn schedule_delayed(
        &mut self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
        reply: ScheduleReply,
    ) {
        let appended = self.schedule_append(topic, records);
        match appended {
            Err(error) => reply(Err(error)),
            Ok((pending, records)) => {
                let log = self.delays.timer_log();
                let info = pending.append_info().clone();
                self.submit_wait(
                    log,
                    info,
                    InFlightWrite::Schedule(Scheduling {
                        topic: topic.to_string(),
                        records,
                        pending,
                        reply,
                    }),
                );
                if let Err(error) = self.collect_written() {
                    tracing::error!(%error, "recording written batches failed");
                }
            }
        }
    }

    /// Refuses routed records with a reserved header or a partition past
    /// the topic's end, before anything is stored.
    pub(super) fn check_routed(&self, topic: &str, records: &[(u32, RecordInput)]) -> Result<()> {
        names::check_headers(records.iter().map(|(_, r)| r.headers.as_slice()))
            .map_err(DispatchError::InvalidArgument)?;
        let partitions = self.topic(topic)?.config.partitions;
        match records.iter().find(|(p, _)| *p >= partitions) {
            Some((partition, _)) => Err(DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition: *partition,
            }),
            None => Ok(()),
        }
    }

    /// Checks delayed records and appends them to the timer log; returns
    /// the append and (partition, due) per record.
    pub(super) fn schedule_append(
        &mut self,
        topic: &str,
        records: Vec<(u32, RecordInput)>,
    ) -> Result<(PendingSchedule, Vec<(u32, i64)>)> {
        self.check_routed(topic, &records)?;
        let now = self.now();
        let shape: Vec<(u32, i64)> = records
            .iter()
            .map(|(partition, record)| (*partition, record.deliver_at_ms.unwrap_or(now)))
            .collect();
        let entries = records
            .into_iter()
            .map(|(partition, record)| (topic.to_string(), partition, record))
            .collect();
        let pending = self.delays.schedule_append(entries, now)?;
        Ok((pending, shape))
    }

    /// Records the outcome of a delayed produce's durability wait: the
    /// messages become pending (event `DelayScheduled`) and the producer
    /// is answered; or the append is given up and the error answered.
    pub(super) fn record_scheduled(
        &mut self,
        scheduling: Scheduling,
        result: std::result::Result<Vec<(u64, MessageId)>, crate::writer::WriteFailure>,
    ) {
        let Scheduling {
            topic,
            records,
            pending,
            reply,
        } = scheduling;
        if let Err((error, _)) = result {
            self.delays.schedule_abort(pending);
            reply(Err(match error {
                WriteError::Store(error) => DispatchError::Store(error),
                WriteError::EarlierFailed => {
                    DispatchError::InvalidArgument(WriteError::EarlierFailed.to_string())
                }
            }));
            return;
        }
        let ids = match self.delays.schedule_commit(pending) {
            Ok(ids) => ids,
            Err(error) => {
                reply(Err(error.into()));
                return;
            }
        };
        let mut produced = Vec::with_capacity(ids.len());
        for (id, (partition, due)) in ids.into_iter().zip(records) {
            self.emit(
                id,
                Place {
                    topic: Name::Plain(&topic),
                    partition: Some(partition),
                    offset: None,
                    group: None,
                },
                EventKind::DelayScheduled { due_ms: due },
                None,
            );
            produced.push(Produced {
                partition,
                offset: None,
                id,
                delayed_until_ms: Some(due),
            });
        }
        reply(Ok(produced));
    }

    /// Cancels a pending delayed message; true if it was pending.
    pub fn cancel_delay(&mut self, id: &MessageId) -> Result<bool> {
        // A message due before this dispatcher opened may have fired before
        // a crash that lost its fired mark: its copy is already in its
        // topic. Those are handled first (appended, or found there), so a
        // cancel never returns true for a message that was delivered.
        self.fire_overdue_at_open()?;
        let cancelled = self.delays.cancel(id)?;
        if cancelled {
            self.emit(
                *id,
                Place {
                    topic: Name::Plain(""),
                    partition: None,
                    offset: None,
                    group: None,
                },
                EventKind::DelayCancelled,
                None,
            );
        }
        Ok(cancelled)
    }

    /// Delayed messages not yet fired: waiting in the delay store, being
    /// written to their topic, or waiting to be written again after a
    /// failed append.
    pub fn pending_delays(&self) -> u64 {
        self.delays.pending() + self.firing_messages() as u64 + self.unfired.len() as u64
    }
}
