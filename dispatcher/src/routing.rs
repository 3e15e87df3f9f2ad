//! Which partition a produced record goes to: one rule for every produce
//! path (client PRODUCE, delayed records, admin test messages, resends).
//!
//! - An explicit partition takes every record of the batch; it must exist.
//! - Otherwise a keyed record goes to `key_hash(key) % partitions`, so one
//!   key never spans two partitions (ordered topics rely on it).
//! - Otherwise every unkeyed record of the batch goes to one partition, the
//!   next of the topic's round-robin counter.
//!
//! Each topic has exactly one [`Router`], owned by the dispatcher's topic
//! state and shared (`Arc`) with whoever appends to the topic without going
//! through the dispatcher thread: one counter per topic, whatever the path.

use std::sync::atomic::{AtomicU32, Ordering};

/// The partition router of one topic.
#[derive(Debug)]
pub struct Router {
    partitions: u32,
    next: AtomicU32,
}

/// An explicit partition the topic does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("partition {partition} does not exist: the topic has {partitions}")]
pub struct UnknownPartition {
    /// The partition asked for.
    pub partition: u32,
    /// How many the topic has.
    pub partitions: u32,
}

impl Router {
    /// The router of a topic of `partitions` partitions (at least 1).
    pub fn new(partitions: u32) -> Router {
        Router {
            partitions: partitions.max(1),
            next: AtomicU32::new(0),
        }
    }

    /// How many partitions the topic has.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of each record of one batch, given the records' keys
    /// in batch order. Takes at most one round-robin step per batch.
    pub fn route<'a>(
        &self,
        explicit: Option<u32>,
        keys: impl IntoIterator<Item = Option<&'a [u8]>>,
    ) -> Result<Vec<u32>, UnknownPartition> {
        if let Some(partition) = explicit {
            if partition >= self.partitions {
                return Err(UnknownPartition {
                    partition,
                    partitions: self.partitions,
                });
            }
            return Ok(keys.into_iter().map(|_| partition).collect());
        }
        let partitions = u64::from(self.partitions);
        let mut unkeyed = None;
        Ok(keys
            .into_iter()
            .map(|key| match key {
                Some(key) => (dmq_log_store::key_hash(key) % partitions) as u32,
                None => *unkeyed.get_or_insert_with(|| {
                    self.next.fetch_add(1, Ordering::Relaxed) % self.partitions
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_explicit_partition_takes_the_whole_batch_and_must_exist() {
        let router = Router::new(4);
        let keys = [Some(&b"a"[..]), None, Some(&b"b"[..])];
        assert_eq!(router.route(Some(2), keys).unwrap(), vec![2, 2, 2]);
        assert_eq!(
            router.route(Some(4), keys),
            Err(UnknownPartition {
                partition: 4,
                partitions: 4
            })
        );
    }

    #[test]
    fn unkeyed_records_of_one_batch_share_one_round_robin_partition() {
        let router = Router::new(3);
        let batch = [None, None, None];
        let first = router.route(None, batch).unwrap();
        let second = router.route(None, batch).unwrap();
        let third = router.route(None, batch).unwrap();
        assert_eq!(first, vec![0, 0, 0]);
        assert_eq!(second, vec![1, 1, 1]);
        assert_eq!(third, vec![2, 2, 2]);
        assert_eq!(router.route(None, batch).unwrap(), vec![0, 0, 0]);
    }

    #[test]
    fn a_batch_of_keyed_records_takes_no_round_robin_step() {
        let router = Router::new(3);
        router.route(None, [Some(&b"k"[..])]).unwrap();
        assert_eq!(router.route(None, [None]).unwrap(), vec![0]);
    }

    proptest! {
        #[test]
        fn a_key_always_lands_on_its_hash_partition(
            partitions in 1u32..64,
            keys in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)), 1..20),
        ) {
            let router = Router::new(partitions);
            let routed = router
                .route(None, keys.iter().map(|k| k.as_deref()))
                .unwrap();
            let mut unkeyed = None;
            for (key, partition) in keys.iter().zip(&routed) {
                prop_assert!(*partition < partitions);
                match key {
                    Some(key) => prop_assert_eq!(
                        u64::from(*partition),
                        dmq_log_store::key_hash(key) % u64::from(partitions)
                    ),
                    None => prop_assert_eq!(*unkeyed.get_or_insert(*partition), *partition),
                }
            }
        }
    }
}
