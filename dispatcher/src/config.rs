//! Configuration of topics, consumer groups and the dispatcher itself.

use serde::{Deserialize, Serialize};

/// How a topic behaves for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions (>= 1).
    pub partitions: u32,
    /// Messages with the same key are delivered to a group one at a time.
    pub ordered: bool,
}

/// How a group spreads messages over its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// Each message goes to one member of the group.
    Clustering,
    /// Every member gets every message (a cursor per member).
    Broadcast,
}

/// Where a new group (or a seek) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartPosition {
    /// The oldest stored message.
    Earliest,
    /// Only messages produced from now on.
    Latest,
    /// The first message at or after this time (ms since the epoch).
    Timestamp(i64),
    /// This offset in every partition (clamped to what is stored).
    Offset(u64),
}

/// Delay before redelivering a message after failed attempt `n`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backoff {
    /// Attempt n waits `delays_ms[min(n, len) - 1]`.
    Fixed {
        /// The delays, in order (at least one).
        delays_ms: Vec<u64>,
    },
    /// Attempt n waits `initial_ms * 2^(n-1)`, at most `max_ms`.
    Exponential {
        /// First delay.
        initial_ms: u64,
        /// Cap.
        max_ms: u64,
    },
}

impl Backoff {
    /// The delay after failed attempt `attempt` (from 1).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let attempt = attempt.max(1);
        match self {
            Backoff::Fixed { delays_ms } => {
                let index = (attempt as usize).min(delays_ms.len()).saturating_sub(1);
                delays_ms.get(index).copied().unwrap_or(0)
            }
            Backoff::Exponential { initial_ms, max_ms } => {
                let shift = (attempt - 1).min(62);
                initial_ms.saturating_mul(1u64 << shift).min(*max_ms)
            }
        }
    }
}

/// A consumer group's delivery rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Clustering or broadcast.
    pub mode: DeliveryMode,
    /// Where a new group starts.
    pub start: StartPosition,
    /// A delivered message not acked within this is redelivered.
    pub ack_timeout_ms: u64,
    /// Attempts before the message goes to the dead-letter topic.
    pub max_attempts: u32,
    /// Delay before a redelivery.
    pub backoff: Backoff,
    /// Cap on unacked messages per partition (delivered, waiting for a
    /// retry, or held back by ordering). Bounds memory whatever the backlog.
    pub max_unacked_per_partition: u32,
    /// Optional cap on deliveries per second for the whole group.
    pub rate_limit_per_second: Option<u32>,
    /// Dead-letter topic; default `<topic>.<group>.dlq`.
    pub dead_letter_topic: Option<String>,
}

impl GroupConfig {
    /// The group's dead-letter topic: the configured one, or
    /// `<topic>.<group>.dlq`.
    pub fn dead_letter_topic_for(&self, topic: &str, group: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| crate::names::default_dead_letter_topic(topic, group))
    }
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            mode: DeliveryMode::Clustering,
            start: StartPosition::Earliest,
            ack_timeout_ms: 30_000,
            max_attempts: 16,
            backoff: Backoff::Exponential {
                initial_ms: 1_000,
                max_ms: 300_000,
            },
            max_unacked_per_partition: 10_000,
            rate_limit_per_second: None,
            dead_letter_topic: None,
        }
    }
}

/// Settings of the dispatcher itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatcherConfig {
    /// Timing-wheel resolution.
    pub tick_ms: u64,
    /// Acks are made durable at least this often: the documented window in
    /// which a crash can lose acks (those messages are redelivered).
    pub ack_sync_interval_ms: u64,
    /// Records read from a partition at a time.
    pub read_batch_records: usize,
    /// Compact a group's ack journal once it is this large.
    pub ack_journal_compact_bytes: u64,
    /// A new topic has at most this many partitions.
    pub max_partitions_per_topic: u32,
    /// All topics together have at most this many partitions (each costs
    /// a directory, open files and a mapping).
    pub max_partitions_total: u32,
    /// Caps and timeout of transactions.
    pub transactions: crate::transactions::TransactionLimits,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            tick_ms: 1,
            ack_sync_interval_ms: 50,
            read_batch_records: 256,
            ack_journal_compact_bytes: 4 << 20,
            max_partitions_per_topic: 256,
            max_partitions_total: 4096,
            transactions: crate::transactions::TransactionLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedules() {
        let fixed = Backoff::Fixed {
            delays_ms: vec![10, 20, 30],
        };
        assert_eq!(
            (1..=5).map(|a| fixed.delay_ms(a)).collect::<Vec<_>>(),
            vec![10, 20, 30, 30, 30]
        );
        let exponential = Backoff::Exponential {
            initial_ms: 100,
            max_ms: 1_000,
        };
        assert_eq!(
            (1..=6).map(|a| exponential.delay_ms(a)).collect::<Vec<_>>(),
            vec![100, 200, 400, 800, 1_000, 1_000]
        );
        assert_eq!(exponential.delay_ms(500), 1_000);
    }
}
