//! Deletion by tombstone (offset range, time range, key, message id): bounded
//! at the time it is made, journaled before it returns, counted exactly, and
//! reclaimed.

use super::*;

impl Dispatcher {
    /// Deletes messages: honoured by every later delivery (messages already
    /// in flight may still be acked). The deletion is one metadata journal
    /// entry, fsynced before this returns `Ok`: a crash after the return
    /// never loses it, a crash before leaves it whole or absent.
    ///
    /// Offset ranges, time ranges and keys cover only records stored now
    /// (below each partition's current end offset; see [`Tombstone`]); a
    /// message id also covers a delayed message with that id appended
    /// later. Errors: unknown topic, an offset range's partition outside
    /// the topic, a message id that does not parse
    /// ([`DispatchError::InvalidName`]).
    pub fn delete(&mut self, topic: &str, tombstone: Tombstone) -> Result<()> {
        let below = self.deletion_bound(topic, &tombstone)?;
        self.persist_tombstone(topic, tombstone, below)
    }

    /// [`Dispatcher::delete`], returning what [`Dispatcher::count_covered`]
    /// would have returned just before: the stored records the deletion
    /// covers that no earlier one did. Exact even while other threads
    /// append to the partitions: the count and the deletion use the same
    /// end offsets. Costs what `count_covered` costs.
    pub fn delete_counted(&mut self, topic: &str, tombstone: Tombstone) -> Result<u64> {
        let below = self.deletion_bound(topic, &tombstone)?;
        let state = self.topic(topic)?;
        let ends = match &below {
            Some(ends) => ends.clone(),
            None => state
                .partitions
                .iter()
                .map(|log| log.end_offset())
                .collect(),
        };
        let count = state.tombstones.count_new(
            &state.partitions,
            &tombstone,
            &ends,
            CountPlan::default(),
        )?;
        self.persist_tombstone(topic, tombstone, below)?;
        Ok(count)
    }

    /// Frees the disk of deleted messages: unlinks the sealed segments of
    /// `topic` all of whose records are covered by offset- or time-range
    /// deletions and are below the ack floor of every group state loaded
    /// for the topic (so each group has passed them, recording their
    /// `Deleted` events). Returns the number of segments unlinked. The
    /// active segment is never unlinked; a member of a broadcast group that
    /// has not joined since the dispatcher opened is not waited for (it
    /// would skip those records anyway, without their events).
    pub fn reclaim_deleted(&mut self, topic: &str) -> Result<u64> {
        let state = self.topic(topic)?;
        let mut unlinked = 0;
        for (p, log) in state.partitions.iter().enumerate() {
            let partition = p as u32;
            let mut upto = state
                .tombstones
                .covered_prefix_end(partition, log.as_ref())?;
            for group in self
                .states
                .iter()
                .filter(|s| !s.retired && *s.key.topic == *topic)
            {
                if let Some(part) = group.partitions.get(p) {
                    upto = upto.min(part.acks.floor());
                }
            }
            if upto > log.start_offset() {
                unlinked += log.delete_before(upto)?;
            }
        }
        Ok(unlinked)
    }

    /// Deletes the sealed segments of the delay store's timer log that no
    /// pending delay needs any more ([`DelayStore::reclaim`]); returns how
    /// many.
    ///
    /// [`DelayStore::reclaim`]: crate::DelayStore::reclaim
    pub fn reclaim_delay_log(&mut self) -> Result<u64> {
        Ok(self.delays.reclaim()?)
    }

    /// How many stored records (from each partition's start offset to its
    /// end offset now) `tombstone` would cover that no earlier deletion of
    /// the topic covers: the dry run of a deletion. Exact (one caveat:
    /// the id index finds one record per id and partition, so a `MessageId`
    /// stored more than once in a partition, which only a dead-letter topic
    /// can hold, counts once).
    ///
    /// Cost: offset and time ranges are counted by interval arithmetic on
    /// offsets (a time range becomes an offset interval through two
    /// timestamp lookups per partition, as broker timestamps never decrease
    /// within a partition) without reading records, unless earlier `Key` or
    /// `MessageId` deletions exist: then the records of the range no
    /// earlier range covers are either looked up through the key and id
    /// indexes (one lookup per earlier deletion and partition, reading only
    /// the records those keys and ids have in the range) or, when that part
    /// of the range holds at most 65 536 records or there are more than
    /// 1 024 earlier key and id deletions, read in batches of 1 024 records
    /// (memory stays bounded; time grows with the range). A `Key` reads the
    /// key's records through the key index, a page at a time; a
    /// `MessageId` is one id lookup per partition. A log without indexes
    /// ([`crate::storage::MemoryLog`]) scans instead.
    pub fn count_covered(&self, topic: &str, tombstone: &Tombstone) -> Result<u64> {
        self.check_tombstone(topic, tombstone)?;
        let state = self.topic(topic)?;
        let ends: Vec<u64> = state
            .partitions
            .iter()
            .map(|log| log.end_offset())
            .collect();
        Ok(state
            .tombstones
            .count_new(&state.partitions, tombstone, &ends, CountPlan::default())?)
    }

    /// True if a deletion of `topic` covers `record` of `partition` (false
    /// for an unknown topic).
    pub fn is_deleted(&self, topic: &str, partition: u32, record: &Record) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|state| state.tombstones.covers(partition, record))
    }

    /// Checks a tombstone against its topic.
    pub(super) fn check_tombstone(&self, topic: &str, tombstone: &Tombstone) -> Result<()> {
        let state = self.topic(topic)?;
        match tombstone {
            Tombstone::OffsetRange { partition, .. } if *partition >= state.config.partitions => {
                Err(DispatchError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: *partition,
                })
            }
            Tombstone::MessageId(text) if text.parse::<MessageId>().is_err() => {
                Err(DispatchError::InvalidArgument(format!(
                    "message id {}: 32 hex digits expected",
                    names::shown(text)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Checks a tombstone and returns the bound it is stored with: every
    /// partition's end offset now (`None` for a message id: unbounded).
    pub(super) fn deletion_bound(
        &self,
        topic: &str,
        tombstone: &Tombstone,
    ) -> Result<Option<Vec<u64>>> {
        self.check_tombstone(topic, tombstone)?;
        if let Tombstone::MessageId(_) = tombstone {
            return Ok(None);
        }
        let state = self.topic(topic)?;
        Ok(Some(
            state
                .partitions
                .iter()
                .map(|log| log.end_offset())
                .collect(),
        ))
    }

    pub(super) fn persist_tombstone(
        &mut self,
        topic: &str,
        tombstone: Tombstone,
        below: Option<Vec<u64>>,
    ) -> Result<()> {
        let entry = MetaEntry::Tombstone {
            topic: topic.to_string(),
            tombstone,
            below,
        };
        let shared = self
            .topics
            .get_mut(topic)
            .and_then(|state| state.shared_tombstones.as_mut());
        match shared {
            // A cluster topic: queued for every node (the caller waits for
            // the cluster to commit it before answering).
            Some(journal) => {
                let payload = serde_json::to_vec(&entry)
                    .map_err(|e| DispatchError::CorruptMetadata(e.to_string()))?;
                journal.append(&payload);
                journal.sync()?;
            }
            None => self.persist_meta(&entry)?,
        }
        self.apply_meta(entry)
    }

    /// Applies the deletions of a cluster topic's shared journal
    /// ([`names::tombstone_journal`]) that another node made (cluster
    /// mode: the broker calls this with each change it learns of); a
    /// payload that does not decode, or names another topic, is skipped
    /// loudly. Returns how many were applied.
    pub fn merge_replicated_tombstones(&mut self, journal: &str, payloads: &[Vec<u8>]) -> usize {
        match names::tombstone_journal_topic(journal) {
            Some(topic) if self.topics.contains_key(topic) => {
                self.apply_shared_tombstones(topic, payloads)
            }
            _ => 0,
        }
    }

    /// Applies the tombstone payloads of `topic`'s shared journal.
    pub(super) fn apply_shared_tombstones(&mut self, topic: &str, payloads: &[Vec<u8>]) -> usize {
        let mut applied = 0;
        for payload in payloads {
            match serde_json::from_slice::<MetaEntry>(payload) {
                Ok(MetaEntry::Tombstone {
                    topic: named,
                    tombstone,
                    below,
                }) if named == topic => {
                    let entry = MetaEntry::Tombstone {
                        topic: named,
                        tombstone,
                        below,
                    };
                    if self.apply_meta(entry).is_ok() {
                        applied += 1;
                    }
                }
                other => tracing::error!(
                    topic = %names::shown(topic),
                    entry = ?other,
                    "a shared deletions journal holds something that is not one of its \
                     topic's deletions: skipped"
                ),
            }
        }
        applied
    }
}
