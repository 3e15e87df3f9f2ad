//! Read-only queries for the admin API: a message by id, its state in every
//! group, and per-partition group statistics.

use super::*;

impl Dispatcher {
    /// The stored record with message id `id` in `topic`, and its
    /// partition: one id-index lookup per partition, in partition order.
    /// Deleted records are found too (see [`Dispatcher::is_deleted`]).
    pub fn find_message(&self, topic: &str, id: &MessageId) -> Result<Option<(u32, Record)>> {
        for (partition, log) in self.topic(topic)?.partitions.iter().enumerate() {
            if let Some(record) = log.find_by_id(id)? {
                return Ok(Some((partition as u32, record)));
            }
        }
        Ok(None)
    }

    /// The state of `record` (stored at `partition` of `topic`) in every
    /// group subscribed to the topic, sorted by group: one entry per
    /// clustering group; for a broadcast group one per member name whose
    /// state is loaded (members that joined since the dispatcher opened),
    /// sorted by name, or a single entry with `member: None` that reports
    /// nothing acked when there is none. What the group's state says is
    /// reported as is: a deleted, expired or dead-lettered record is acked
    /// once the group's cursor has passed it.
    pub fn message_states(
        &self,
        topic: &str,
        partition: u32,
        record: &Record,
    ) -> Result<Vec<GroupMessageState>> {
        let topic_state = self.topic(topic)?;
        if partition >= topic_state.config.partitions {
            return Err(DispatchError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            });
        }
        let now = self.now();
        let mut found = Vec::new();
        for ((_, group), config) in self
            .group_configs
            .range((topic.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == topic)
        {
            let mut states: Vec<&GroupState> = self
                .states
                .iter()
                .filter(|s| {
                    !s.retired
                        && *s.key.topic == *topic
                        && *s.key.group == **group
                        && (s.key.member.is_some() == (config.mode == DeliveryMode::Broadcast))
                })
                .collect();
            states.sort_by(|a, b| a.key.member.cmp(&b.key.member));
            if states.is_empty() {
                found.push(GroupMessageState {
                    group: group.clone(),
                    member: None,
                    acked: false,
                    attempts: 0,
                    in_flight: false,
                    next_delivery_ms: record.deliver_at_ms.filter(|&due| due > now),
                });
            }
            for state in states {
                found.push(self.message_state(state, partition, record, now));
            }
        }
        Ok(found)
    }

    pub(super) fn message_state(
        &self,
        state: &GroupState,
        partition: u32,
        record: &Record,
        now: i64,
    ) -> GroupMessageState {
        let offset = record.offset;
        let part = state.partitions.get(partition as usize);
        let acked = part.is_some_and(|part| part.acks.is_acked(offset));
        let pending = part.and_then(|part| part.pending.get(&offset));
        let not_read = part.is_none_or(|part| offset >= part.cursor);
        let next_delivery_ms = match pending.map(|p| p.stage) {
            Some(Stage::Waiting { timer }) => self.wheel.due_ms(timer),
            None if !acked && not_read => record.deliver_at_ms.filter(|&due| due > now),
            _ => None,
        };
        GroupMessageState {
            group: state.key.group.to_string(),
            member: state.key.member.clone(),
            acked,
            attempts: pending.map_or(0, |p| p.attempt),
            in_flight: matches!(pending.map(|p| p.stage), Some(Stage::InFlight { .. })),
            next_delivery_ms,
        }
    }

    /// Per-partition statistics of a group (for broadcast groups, summed over
    /// members' cursors is not meaningful: the first member's are shown).
    pub fn group_stats(&self, topic: &str, group: &str) -> Result<Vec<PartitionStats>> {
        self.group_config(topic, group)?;
        let logs = &self.topic(topic)?.partitions;
        let Some(state) = self
            .states
            .iter()
            .find(|s| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
        else {
            return Ok(Vec::new());
        };
        let now = self.now();
        // Pending delays by the partition they will be appended to (a
        // partition past the topic's end goes to its last one, as when it
        // fires), those being written to it, and those whose append failed
        // and waits for a later poll.
        let last = logs.len().saturating_sub(1);
        let mut waiting = vec![0u64; logs.len()];
        let unfired = self
            .unfired
            .iter()
            .filter(|message| message.topic == topic)
            .map(|message| (message.partition, 1));
        let firing = self.writes.values().filter_map(|write| match write {
            InFlightWrite::Fire(batch) if batch.topic == topic => {
                Some((batch.partition, batch.messages.len() as u64))
            }
            _ => None,
        });
        for (partition, count) in self
            .delays
            .pending_in_topic(topic)
            .into_iter()
            .chain(self.storage.delays_elsewhere(topic))
            .chain(unfired)
            .chain(firing)
        {
            if let Some(slot) = waiting.get_mut((partition as usize).min(last)) {
                *slot += count;
            }
        }
        let mut stats = Vec::with_capacity(state.partitions.len());
        for (p, part) in state.partitions.iter().enumerate() {
            let end_offset = logs[p].end_offset();
            let floor = part.acks.floor();
            let acked = part.acks.acked_above_floor();
            let oldest_unacked_age_ms = if floor < end_offset {
                logs[p]
                    .read(floor, 1)?
                    .first()
                    .map(|record| now.saturating_sub(record.timestamp_ms).max(0) as u64)
            } else {
                None
            };
            let count = |wanted: fn(&Pending) -> bool| {
                part.pending.values().filter(|p| wanted(p)).count() as u64
            };
            stats.push(PartitionStats {
                partition: p as u32,
                ack_floor: floor,
                cursor: part.cursor,
                end_offset,
                lag: end_offset.saturating_sub(floor).saturating_sub(acked),
                unacked: part.pending.len() as u64,
                in_flight: count(|p| matches!(p.stage, Stage::InFlight { .. })),
                oldest_unacked_age_ms,
                delayed: count(|p| p.attempt == 0 && matches!(p.stage, Stage::Waiting { .. }))
                    + waiting.get(p).copied().unwrap_or(0),
            });
        }
        Ok(stats)
    }
}
