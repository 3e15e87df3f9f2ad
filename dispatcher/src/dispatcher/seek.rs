//! Moving a group's cursor to an offset, a timestamp, the earliest or the
//! latest record (with a dry run).

use super::*;

impl Dispatcher {
    /// Moves a group (all partitions, or one) to `target`. With `dry_run` only
    /// reports what would change.
    pub fn seek(
        &mut self,
        topic: &str,
        group: &str,
        partition: Option<u32>,
        target: SeekTarget,
        dry_run: bool,
    ) -> Result<Vec<SeekPartition>> {
        let config = self.group_config(topic, group)?;
        let topic_state = self.topic(topic)?;
        let logs = topic_state.partitions.clone();
        if let Some(p) = partition {
            if p as usize >= logs.len() {
                return Err(DispatchError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: p,
                });
            }
        }
        let indexes: Vec<usize> = self
            .states
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
            .map(|(i, _)| i)
            .collect();
        let indexes = if indexes.is_empty() && config.mode == DeliveryMode::Clustering {
            vec![self.load_state(StateKey {
                topic: topic.into(),
                group: group.into(),
                member: None,
            })?]
        } else {
            indexes
        };
        let now = self.now();
        let mut report = Vec::new();
        for state_index in indexes {
            for (p, log) in logs.iter().enumerate() {
                if partition.is_some_and(|only| only as usize != p) {
                    continue;
                }
                let new_floor = resolve_start(log.as_ref(), target)?;
                let part = &self.states[state_index].partitions[p];
                let old_floor = part.acks.floor();
                let acked_above = |from: u64, to: u64| -> u64 {
                    let span = to.saturating_sub(from);
                    span - part.acks.unacked_in(from, to, usize::MAX).len() as u64
                };
                let end = log.end_offset();
                let (redelivered, skipped) = if new_floor < old_floor {
                    (old_floor - new_floor + acked_above(old_floor, end), 0)
                } else {
                    (
                        acked_above(new_floor, end),
                        part.acks.unacked_in(old_floor, new_floor, usize::MAX).len() as u64,
                    )
                };
                report.push(SeekPartition {
                    partition: p as u32,
                    old_floor,
                    new_floor,
                    redelivered,
                    skipped,
                });
                if dry_run {
                    continue;
                }
                let timers: Vec<_> = self.states[state_index].partitions[p]
                    .pending
                    .values()
                    .filter_map(|pending| match pending.stage {
                        Stage::InFlight { timer, .. } | Stage::Waiting { timer } => Some(timer),
                        _ => None,
                    })
                    .collect();
                for timer in timers {
                    self.wheel.cancel(timer);
                }
                self.states[state_index].partitions[p].reset(new_floor);
                self.states[state_index].note_seek();
            }
            if !dry_run {
                self.states[state_index].sync(now, self.config.ack_journal_compact_bytes)?;
            }
        }
        Ok(report)
    }
}
