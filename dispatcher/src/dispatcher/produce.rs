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
        names::check_headers(records.iter().map(|(_, r)| r.headers.as_slice()))
            .map_err(DispatchError::InvalidArgument)?;
        let now = self.now();
        let partitions = self.topic(topic)?.config.partitions;
        if let Some((partition, _)) = records.iter().find(|(p, _)| *p >= partitions) {
            return Err(DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition: *partition,
            });
        }
        let mut immediate: BTreeMap<u32, Vec<RecordInput>> = BTreeMap::new();
        let mut delayed = Vec::new();
        let mut order = Vec::with_capacity(records.len());
        for (partition, record) in records {
            match record.deliver_at_ms {
                Some(due) if due > now => {
                    order.push((true, due, partition));
                    delayed.push((topic.to_string(), partition, record));
                }
                _ => {
                    order.push((false, 0, partition));
                    immediate.entry(partition).or_default().push(record);
                }
            }
        }
        let mut appended = HashMap::new();
        for (partition, records) in immediate {
            let offsets = self.topic(topic)?.partitions[partition as usize].append(records)?;
            appended.insert(partition, offsets.into_iter());
        }
        let delayed_ids = if delayed.is_empty() {
            Vec::new()
        } else {
            self.delays.schedule(delayed, now)?
        };
        let mut delayed_ids = delayed_ids.into_iter();
        let mut produced = Vec::with_capacity(order.len());
        for (is_delayed, due, partition) in order {
            if is_delayed {
                let Some(id) = delayed_ids.next() else { break };
                self.emit(
                    id,
                    Place {
                        topic: Name::Plain(topic),
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
        self.delays.pending() + self.firing_messages as u64 + self.unfired.len() as u64
    }
}
