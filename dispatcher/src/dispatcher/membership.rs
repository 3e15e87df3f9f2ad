//! Groups and members: subscribe, join, leave, credit, pull (fetch,
//! return_unsent), and loading a group's persisted state.

use super::*;

impl Dispatcher {
    /// Subscribes a group to a topic (idempotent; a new configuration
    /// replaces the old one but keeps the position).
    pub fn subscribe(&mut self, topic: &str, group: &str, config: GroupConfig) -> Result<()> {
        self.check_not_quarantined(topic, Some(group))?;
        self.topic(topic)?;
        names::check_group(topic, group, config.dead_letter_topic.as_deref())?;
        let key = (topic.to_string(), group.to_string());
        if self.group_configs.get(&key) == Some(&config) {
            return Ok(());
        }
        let entry = MetaEntry::Group {
            topic: topic.to_string(),
            group: group.to_string(),
            config: config.clone(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        for state in self
            .states
            .iter_mut()
            .filter(|s| !s.retired && *s.key.topic == *topic && *s.key.group == *group)
        {
            state.config = config.clone();
        }
        if config.mode == DeliveryMode::Clustering {
            self.load_state(StateKey {
                topic: topic.into(),
                group: group.into(),
                member: None,
            })?;
        }
        Ok(())
    }

    /// Deletes a consumer group: its members are dropped (returned, so the
    /// caller can stop routing to them), its in-flight messages forgotten,
    /// its ack journals removed. A group of that name created later starts
    /// afresh. (Journals of broadcast members not connected since the
    /// broker started stay on disk.)
    /// A quarantined group may be deleted too (that clears it).
    pub fn delete_group(&mut self, topic: &str, group: &str) -> Result<Vec<MemberId>> {
        let quarantine_key = (topic.to_string(), Some(group.to_string()));
        let quarantined = self.quarantined.contains_key(&quarantine_key);
        if !quarantined {
            self.group_config(topic, group)?;
        }
        let entry = MetaEntry::GroupDeleted {
            topic: topic.to_string(),
            group: group.to_string(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        self.quarantined.remove(&quarantine_key);
        let dropped = self.retire_states(|key| *key.topic == *topic && *key.group == *group)?;
        if quarantined {
            // Never loaded, so not retired: its journal goes here (if its
            // name can be a file at all).
            let journal = names::group_journal(topic, group, None);
            match self.storage.remove_journal(&journal) {
                Err(StoreError::InvalidName(_)) | Ok(()) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(dropped)
    }

    pub(super) fn retire_states(
        &mut self,
        matches: impl Fn(&StateKey) -> bool,
    ) -> Result<Vec<MemberId>> {
        let mut dropped = Vec::new();
        for index in 0..self.states.len() {
            let state = &mut self.states[index];
            if state.retired || !matches(&state.key) {
                continue;
            }
            let (timers, members) = state.retire();
            let key = state.key.clone();
            for timer in timers {
                self.wheel.cancel(timer);
            }
            for member in members {
                self.members.remove(&member);
                dropped.push(member);
            }
            self.state_index.remove(&key);
            self.storage.remove_journal(&key.journal_name())?;
        }
        Ok(dropped)
    }

    /// Syncs this node's copies of the idle consumer groups (see
    /// [`Dispatcher::reload_idle_groups`]) of the topics `matches` names
    /// that have changes to sync; returns how many had.
    pub fn sync_idle_groups(&mut self, matches: impl Fn(&str) -> bool) -> Result<usize> {
        let now = self.now();
        let compact_bytes = self.config.ack_journal_compact_bytes;
        let mut synced = 0;
        for index in self.idle_states(&matches) {
            let state = &mut self.states[index];
            if state.needs_sync() {
                state.sync(now, compact_bytes)?;
                synced += 1;
            }
        }
        Ok(synced)
    }

    /// Loads this node's copies of the idle consumer groups (no member
    /// joined, no dead-letter move in progress) of the topics `matches`
    /// names again from their ack journals; returns how many. A copy with
    /// changes not yet synced is left as it is: sync first
    /// ([`Dispatcher::sync_idle_groups`]), and with a replicated journal
    /// wait until what was synced is in it, since a copy loaded before
    /// would miss it.
    ///
    /// For a cluster node that takes over the consumers of cluster topics:
    /// a copy it loaded when it last served them holds only what it merged
    /// since from the node that served in between, which is acks (merging
    /// only adds them), not what that node's seeks rewound; the replicated
    /// journal holds both, so a copy loaded from it goes on with a replay
    /// where the other node stopped.
    pub fn reload_idle_groups(&mut self, matches: impl Fn(&str) -> bool) -> Result<usize> {
        let mut reloaded = 0;
        for index in self.idle_states(&matches) {
            let state = &mut self.states[index];
            if state.needs_sync() {
                continue;
            }
            let key = state.key.clone();
            // As at open: the group exists, so a partition its journal
            // lacks starts at the log's start (redelivery, never a skip).
            let fresh = self.restore_state(&key, Some(StartPosition::Earliest))?;
            // In the same slot: no member or timer names it by then.
            let (timers, _) = self.states[index].retire();
            for timer in timers {
                self.wheel.cancel(timer);
            }
            self.states[index] = fresh;
            reloaded += 1;
        }
        Ok(reloaded)
    }

    /// The loaded group states of the topics `matches` names with no
    /// member and no dead-letter move in progress.
    fn idle_states(&self, matches: &impl Fn(&str) -> bool) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&index| {
                let state = &self.states[index];
                let dead_lettering = state.partitions.iter().any(|part| {
                    part.pending
                        .values()
                        .any(|pending| pending.stage == Stage::DeadLettering)
                });
                !state.retired
                    && state.members.is_empty()
                    && !dead_lettering
                    && matches(&state.key.topic)
            })
            .collect()
    }

    /// Groups subscribed to `topic`.
    pub fn groups(&self, topic: &str) -> Vec<(String, GroupConfig)> {
        self.group_configs
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, g), c)| (g.clone(), c.clone()))
            .collect()
    }

    pub(super) fn group_config(&self, topic: &str, group: &str) -> Result<GroupConfig> {
        self.group_configs
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
            .ok_or_else(|| DispatchError::UnknownGroup {
                topic: topic.into(),
                group: group.into(),
            })
    }

    pub(super) fn load_state(&mut self, key: StateKey) -> Result<usize> {
        self.load_state_from(key, None)
    }

    /// Loads the state of a group journaled before this open. Its ack
    /// journal holds a snapshot of every partition (written when the group
    /// was made); a partition missing from it lost its frames (a damaged
    /// last frame is cut like a torn tail) and starts at the log's start,
    /// not at the group's start position: redelivery, never a skip.
    pub(super) fn load_existing_state(&mut self, key: StateKey) -> Result<usize> {
        self.load_state_from(key, Some(StartPosition::Earliest))
    }

    pub(super) fn load_state_from(
        &mut self,
        key: StateKey,
        missing: Option<StartPosition>,
    ) -> Result<usize> {
        if let Some(&index) = self.state_index.get(&key) {
            return Ok(index);
        }
        let state = self.restore_state(&key, missing)?;
        let index = self.states.len();
        self.states.push(state);
        self.state_index.insert(key, index);
        Ok(index)
    }

    /// A group's state as its journal holds it (see
    /// [`Dispatcher::load_state_from`]), not yet among the loaded ones.
    fn restore_state(
        &mut self,
        key: &StateKey,
        missing: Option<StartPosition>,
    ) -> Result<GroupState> {
        let key = key.clone();
        let config = self.group_config(&key.topic, &key.group)?;
        let now = self.now();
        let topic = self.topic(&key.topic)?;
        let partitions: Vec<Arc<dyn PartitionLog>> = topic.partitions.clone();
        let (journal, payloads) = self.storage.open_journal(&key.journal_name())?;
        let start = missing.unwrap_or(config.start);
        if missing.is_some() && payloads.is_empty() {
            tracing::warn!(
                journal = %key.journal_name(),
                "an existing group's ack journal is empty: it restarts at the log's start"
            );
        }
        let mut start_error = None;
        let (mut state, new) = GroupState::restore(
            key.clone(),
            config,
            partitions.len() as u32,
            journal,
            &payloads,
            now,
            |p| match resolve_start(partitions[p as usize].as_ref(), start) {
                Ok(offset) => offset,
                Err(error) => {
                    start_error = Some(error);
                    0
                }
            },
        )?;
        if let Some(error) = start_error {
            return Err(error.into());
        }
        // Offsets are used again after recovery cut a log back (a torn or
        // damaged tail, or a power loss under a lazy fsync policy): acks at
        // or above the log's end belong to records that are gone, and new
        // records will take those offsets. Forget them, durably, so that no
        // new record is skipped as "already acked".
        let mut clamped = false;
        for (partition, part) in state.partitions.iter_mut().enumerate() {
            if !partitions[partition].end_may_move_back() {
                continue;
            }
            let end = partitions[partition].end_offset();
            let floor = part.acks.floor();
            if part.acks.forget_from(end) {
                tracing::warn!(
                    journal = %key.journal_name(),
                    partition,
                    floor,
                    log_end = end,
                    "the group had acked past the end of the log (cut at recovery): \
                     acks at or above the end are forgotten"
                );
                part.cursor = part.acks.floor();
                clamped = true;
            }
        }
        if clamped {
            state.note_reset();
        }
        if new || clamped {
            state.sync(now, self.config.ack_journal_compact_bytes)?;
        }
        Ok(state)
    }

    /// A consumer joins a group; `member_name` identifies it across
    /// reconnects (broadcast groups keep a cursor per name).
    pub fn join(&mut self, topic: &str, group: &str, member_name: &str) -> Result<MemberId> {
        self.check_not_quarantined(topic, Some(group))?;
        let config = self.group_config(topic, group)?;
        let member = match config.mode {
            DeliveryMode::Clustering => None,
            DeliveryMode::Broadcast => {
                names::check_member(topic, group, member_name)?;
                Some(member_name.to_string())
            }
        };
        let state = self.load_state(StateKey {
            topic: topic.into(),
            group: group.into(),
            member,
        })?;
        let id = self.next_member_id;
        self.next_member_id += 1;
        self.states[state].members.push(id);
        self.members.insert(
            id,
            Member {
                state,
                name: member_name.to_string(),
                credit: 0,
            },
        );
        Ok(id)
    }

    /// The member's name (as given to `join`).
    pub fn member_name(&self, member: MemberId) -> Option<&str> {
        self.members.get(&member).map(|m| m.name.as_str())
    }

    /// A member leaves (or its connection died): its in-flight messages are
    /// redelivered to the other members at once.
    pub fn leave(&mut self, member: MemberId) -> Result<()> {
        let removed = self
            .members
            .remove(&member)
            .ok_or(DispatchError::UnknownMember(member))?;
        let state_index = removed.state;
        self.states[state_index].members.retain(|&m| m != member);
        let mut orphans = Vec::new();
        for (partition, state) in self.states[state_index].partitions.iter().enumerate() {
            for (&offset, pending) in &state.pending {
                if let Stage::InFlight {
                    member: holder,
                    timer,
                } = pending.stage
                {
                    if holder == member {
                        orphans.push((partition as u32, offset, timer));
                    }
                }
            }
        }
        for (partition, offset, timer) in orphans {
            self.wheel.cancel(timer);
            self.after_failed_attempt(
                state_index,
                partition,
                offset,
                Some(0),
                names::REASON_MEMBER_LEFT,
            )?;
        }
        Ok(())
    }

    /// Adds push credit: the member may receive `credit` more messages.
    pub fn add_credit(&mut self, member: MemberId, credit: u32) -> Result<()> {
        let member = self
            .members
            .get_mut(&member)
            .ok_or(DispatchError::UnknownMember(member))?;
        member.credit = member.credit.saturating_add(credit);
        Ok(())
    }

    /// Pull: up to `max` deliveries for this member now.
    pub fn fetch(&mut self, member: MemberId, max: u32) -> Result<Vec<Delivery>> {
        let state = self
            .members
            .get(&member)
            .ok_or(DispatchError::UnknownMember(member))?
            .state;
        let saved: Vec<(MemberId, u32)> = self.states[state]
            .members
            .iter()
            .filter_map(|m| self.members.get(m).map(|x| (*m, x.credit)))
            .collect();
        for (other, _) in &saved {
            if let Some(m) = self.members.get_mut(other) {
                m.credit = if *other == member { max } else { 0 };
            }
        }
        let now = self.now();
        self.fire_timers(now)?;
        self.fire_delays(now, FIRE_PER_POLL_MAX)?;
        let result = self.fill(state, now);
        // Pull does not consume push credit: everyone gets theirs back.
        for (other, credit) in saved {
            if let Some(m) = self.members.get_mut(&other) {
                m.credit = credit;
            }
        }
        result?;
        let (mine, others): (Vec<Delivery>, Vec<Delivery>) = std::mem::take(&mut self.outbox)
            .into_iter()
            .partition(|d| d.member == member);
        self.outbox = others;
        Ok(mine)
    }

    /// Gives back a message that [`fetch`](Self::fetch) handed to `member`
    /// and the caller did not send (it did not fit the answer frame): it is
    /// ready again at once, its ack deadline is dropped, and its next
    /// delivery carries the same attempt number (a delivery nobody
    /// received is not an attempt). Unlike a NACK, it never moves the
    /// message to the dead-letter topic. Returns false, changing nothing,
    /// if the message is not in flight to `member`.
    ///
    /// The `Delivered` event already emitted stays: the trace shows the
    /// same attempt delivered again.
    pub fn return_unsent(&mut self, member: MemberId, partition: u32, offset: u64) -> Result<bool> {
        let state_index = self.member_state(member)?;
        let state = &mut self.states[state_index];
        let Some(part) = state.partitions.get_mut(partition as usize) else {
            let topic = state.key.topic.to_string();
            return Err(DispatchError::UnknownPartition { topic, partition });
        };
        let Some(pending) = part.pending.get_mut(&offset) else {
            return Ok(false);
        };
        let Stage::InFlight {
            member: holder,
            timer,
        } = pending.stage
        else {
            return Ok(false);
        };
        if holder != member {
            return Ok(false);
        }
        self.wheel.cancel(timer);
        pending.attempt = pending.attempt.saturating_sub(1);
        pending.stage = Stage::Ready;
        part.ready.insert(offset);
        if let Some(rate) = &mut state.rate {
            rate.give_back();
        }
        Ok(true)
    }

    pub(super) fn member_state(&self, member: MemberId) -> Result<usize> {
        self.members
            .get(&member)
            .map(|m| m.state)
            .ok_or(DispatchError::UnknownMember(member))
    }
}
