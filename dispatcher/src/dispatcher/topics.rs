//! Topics: creation (validated, capped, journaled), lookup, routers, deletion
//! of a whole topic, and the dead-letter topics' registry view.

use super::*;

impl Dispatcher {
    /// Creates a topic. A name that exists is [`DispatchError::TopicExists`],
    /// even with the same configuration: creation is not idempotent, so a
    /// caller learns that the topic (and its messages and groups) was there
    /// before it.
    ///
    /// Validate, then create, then journal: the name and partition count
    /// are checked ([`crate::names`], [`DispatcherConfig`]'s caps), the
    /// disk must have room for every partition's first allocation, the
    /// partitions are opened, and only then is the topic journaled. A
    /// failure at any step leaves no files and no journal entry behind.
    pub fn create_topic(&mut self, name: &str, config: TopicConfig) -> Result<()> {
        names::check_topic(name)?;
        check_partition_count(config.partitions).map_err(DispatchError::InvalidArgument)?;
        self.check_not_quarantined(name, None)?;
        if self.topics.contains_key(name) {
            return Err(DispatchError::TopicExists(name.to_string()));
        }
        if config.partitions > self.config.max_partitions_per_topic {
            return Err(DispatchError::InvalidArgument(format!(
                "{} partitions: at most {} per topic",
                config.partitions, self.config.max_partitions_per_topic
            )));
        }
        let total: u64 = self
            .topics
            .values()
            .map(|t| u64::from(t.config.partitions))
            .sum();
        if total + u64::from(config.partitions) > u64::from(self.config.max_partitions_total) {
            return Err(DispatchError::InvalidArgument(format!(
                "{} more partitions would make {} in total: at most {} (max_partitions_total)",
                config.partitions,
                total + u64::from(config.partitions),
                self.config.max_partitions_total
            )));
        }
        if let Some(reason) = &self.meta_failed {
            return Err(DispatchError::MetadataFailed(reason.clone()));
        }
        self.storage.check_room(config.partitions)?;
        let opened = (0..config.partitions)
            .map(|p| self.storage.partition(name, p))
            .collect::<Result<Vec<_>, _>>();
        let entry = MetaEntry::Topic {
            name: name.to_string(),
            config: config.clone(),
        };
        let created = match opened {
            Ok(partitions) => self.persist_meta(&entry).map(|()| partitions),
            Err(error) => Err(error.into()),
        };
        match created {
            Ok(partitions) => self.install_topic(name.to_string(), config, partitions),
            Err(error) => {
                if let Err(cleanup) = self.storage.remove_topic(name) {
                    tracing::error!(topic = name, %cleanup, "removing a failed topic's files failed");
                }
                Err(error)
            }
        }
    }

    /// Topic names and configurations.
    pub fn topics(&self) -> Vec<(String, TopicConfig)> {
        self.topics
            .iter()
            .map(|(name, state)| (name.clone(), state.config.clone()))
            .collect()
    }

    /// The partition logs of a topic, so that a caller can append to them
    /// without going through the dispatcher (the broker appends from many
    /// connections at once to share group commits, then calls `poll`).
    pub fn partitions(&self, topic: &str) -> Result<Vec<Arc<dyn PartitionLog>>> {
        Ok(self.topic(topic)?.partitions.clone())
    }

    /// One topic's configuration.
    pub fn topic_config(&self, topic: &str) -> Result<TopicConfig> {
        Ok(self.topic(topic)?.config.clone())
    }

    pub(super) fn topic(&self, name: &str) -> Result<&TopicState> {
        self.topics
            .get(name)
            .ok_or_else(|| DispatchError::UnknownTopic(name.to_string()))
    }

    /// The partition router of a topic: shared with whoever appends to it
    /// without going through the dispatcher, so that every produce path
    /// follows one rule and one round-robin counter.
    pub fn router(&self, topic: &str) -> Result<Arc<Router>> {
        Ok(Arc::clone(&self.topic(topic)?.router))
    }

    /// Every group's dead-letter topic (configured, or
    /// `<topic>.<group>.dlq`), whether or not it exists yet (it is created
    /// with the first dead letter), sorted by source topic and group.
    pub fn dead_letter_topics(&self) -> Vec<DeadLetterTopic> {
        self.group_configs
            .iter()
            .map(|((topic, group), config)| DeadLetterTopic {
                topic: config.dead_letter_topic_for(topic, group),
                source_topic: topic.clone(),
                group: group.clone(),
            })
            .collect()
    }

    /// True if the topic exists.
    pub fn topic_exists(&self, name: &str) -> bool {
        self.topics.contains_key(name)
    }

    /// Deletes a topic: its groups, its partitions' files, its tombstones.
    /// Returns the members that were dropped. Pending delayed messages for
    /// it are dropped when they fall due.
    ///
    /// A quarantined topic may be deleted too: that is how an operator
    /// clears it. Its files are removed only if its name is a valid file
    /// name (a `..` topic never names a directory).
    pub fn delete_topic(&mut self, name: &str) -> Result<Vec<MemberId>> {
        let quarantined = self.quarantined.contains_key(&(name.to_string(), None));
        if !quarantined {
            self.topic(name)?;
        }
        // Nothing is changed (no journal, no group) unless the files can go.
        self.storage.check_removable(name)?;
        let entry = MetaEntry::TopicDeleted {
            name: name.to_string(),
        };
        self.persist_meta(&entry)?;
        self.apply_meta(entry)?;
        self.quarantined.retain(|(topic, _), _| topic != name);
        let members = self.retire_states(|key| *key.topic == *name)?;
        // A cluster topic's deletions (none on a single node: no error).
        match self.storage.remove_journal(&names::tombstone_journal(name)) {
            Err(StoreError::InvalidName(_)) | Ok(()) => {}
            Err(error) => return Err(error.into()),
        }
        match self.storage.remove_topic(name) {
            Err(StoreError::InvalidName(_)) if quarantined => {}
            other => other?,
        }
        Ok(members)
    }
}
