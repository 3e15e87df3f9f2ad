//! `dmq-dispatcher`: every delivery rule of DMQ, as a library with no sockets.
//!
//! # Layout
//! - [`dispatcher`]: [`Dispatcher`], the state machine: topics, groups,
//!   members, credit, acks, redelivery, dead letters, TTL, deletion,
//!   ordering, seek, rate limits, the pump ([`Dispatcher::poll`]), and the
//!   queries of the admin API (find a message, its state per group, the
//!   dead-letter topics, exact deletion counts).
//! - `tombstones`: a topic's deletions: coverage and exact counting.
//! - `group`: one group's per-partition state (ack bitmap, cursor, pending
//!   messages) and its ack journal.
//! - [`ack_bitmap`]: [`AckBitmap`], the ack floor plus a bitmap above it.
//! - [`timing_wheel`]: [`TimingWheel`], ack deadlines, retries, near delays.
//! - [`delay_store`]: [`DelayStore`], durable delayed messages (timer log +
//!   on-disk buckets by due time).
//! - [`storage`]: the traits the dispatcher reads and persists through, with
//!   file-backed and simulated implementations.
//! - [`events`]: [`EventSink`], every state change of a message.
//! - [`config`]: topic, group and dispatcher settings.
//! - [`names`]: valid topic, group and member names, the names derived from
//!   them, the internal prefix and the reserved header names.
//! - [`routing`]: [`Router`], the one rule that picks a produced record's
//!   partition, with one round-robin counter per topic.
//! - [`transactions`]: [`TransactionLog`], half messages and outcomes of
//!   transactions (the half log), durable until commit or rollback.
//! - [`txn_checks`]: [`CheckSchedule`], when to ask a producer group
//!   about a transaction left open (check-back).
//! - [`writer`]: [`DurableWriter`], the appends the dispatcher decides on
//!   (fired delays, dead-letter copies), written inline or on a background
//!   thread ([`BackgroundWriter`]).
//!
//! The dispatcher takes time only from an injected [`dmq_log_store::Clock`]
//! and touches storage only through [`Storage`], so it runs unchanged in a
//! deterministic simulation (`tests/simulation.rs`, with the inline
//! writer).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod ack_bitmap;
pub mod config;
pub mod delay_store;
pub mod dispatcher;
pub mod events;
mod group;
pub mod names;
pub mod routing;
pub mod storage;
pub mod timing_wheel;
mod tombstones;
pub mod transactions;
pub mod txn_checks;
pub mod writer;

pub use ack_bitmap::AckBitmap;
pub use config::{
    Backoff, DeliveryMode, DispatcherConfig, GroupConfig, StartPosition, TopicConfig,
};
pub use delay_store::{
    DelayConfig, DelayLayout, DelayRecovery, DelayStore, DueMessage, FollowReport, PendingSchedule,
    SettleKind, Settled,
};
pub use dispatcher::{
    DeadLetterTopic, Delivery, DispatchError, Dispatcher, GroupMessageState, PartitionStats,
    Produced, Quarantined, ScheduleReply, SeekPartition, SeekTarget, Tombstone, TransactionCounts,
    TransactionInfo, TransactionTopics, TxnEndReply, TxnProduceReply, TxnProduced,
};
pub use events::{Event, EventKind, EventSink, MemoryEventSink, NullEventSink};
pub use group::MemberId;
pub use routing::{Router, UnknownPartition};
pub use storage::{
    FileStorage, MemoryStorage, PartitionLog, ProducerBatch, RecoveryDamage, Storage, StoreError,
    LOOKUP_SCAN_BATCH,
};
pub use timing_wheel::{TimerId, TimingWheel};
pub use transactions::{
    HalfInput, TransactionLimits, TransactionLog, TxnError, TxnKey, TxnOutcome, TxnRecovery,
    TxnStage,
};
pub use txn_checks::{CheckSchedule, TxnCheck};
pub use writer::{
    BackgroundWriter, DurableWriter, InlineWriter, WriteDone, WriteError, WriteJob, WriteWork,
};
