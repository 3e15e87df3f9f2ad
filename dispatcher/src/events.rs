//! Message events: every state change of a message in the dispatcher goes to
//! an [`EventSink`], with the message id, group, time and reason. The broker
//! stores them as the message trace and counts them as statistics.

use std::sync::{Arc, Mutex};

use dmq_log_store::MessageId;

/// What happened to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// Handed to a group member (attempt 1 is the first delivery).
    Delivered {
        /// Attempt number, from 1.
        attempt: u32,
        /// The member that got it.
        member: u64,
    },
    /// Acknowledged by the group.
    Acked,
    /// Negatively acknowledged; retried after `retry_in_ms`.
    Nacked {
        /// Delay before the retry.
        retry_in_ms: u64,
    },
    /// Scheduled for another delivery (ack timeout, member left).
    Redelivered {
        /// The next attempt number.
        next_attempt: u32,
    },
    /// Past its expire-at: skipped and acked for the group.
    Expired,
    /// Covered by a deletion (tombstone): skipped and acked for the group.
    Deleted,
    /// Moved to the group's dead-letter topic after its last attempt.
    DeadLettered {
        /// The dead-letter topic.
        dead_letter_topic: String,
    },
    /// Stored in the delay store until `due_ms`.
    DelayScheduled {
        /// When it becomes deliverable.
        due_ms: i64,
    },
    /// Moved from the delay store to its topic.
    DelayFired,
    /// A pending delay was cancelled.
    DelayCancelled,
    /// Stored as a half message of a transaction: delivered to no group
    /// until the transaction commits.
    TxnHalfStored {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction committed and it entered its topic (or, delayed,
    /// the delay store).
    TxnCommitted {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction rolled back: it is never delivered.
    TxnRolledBack {
        /// The transaction's handle.
        handle: u64,
    },
    /// Its transaction, open past its timeout, was checked back (the
    /// broker asked its producer group how it ended).
    TxnChecked {
        /// The transaction's handle.
        handle: u64,
        /// This was check number `checks` (from 1).
        checks: u32,
    },
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When (ms since the epoch, dispatcher clock).
    pub time_ms: i64,
    /// The message.
    pub message_id: MessageId,
    /// Its topic (shared with the group's state: no copy per event).
    pub topic: Arc<str>,
    /// Its partition, if known.
    pub partition: Option<u32>,
    /// Its offset, if it is in the topic's log.
    pub offset: Option<u64>,
    /// The consumer group, for group events.
    pub group: Option<Arc<str>>,
    /// What happened.
    pub kind: EventKind,
    /// Why, in words (e.g. "ack timeout", "member left", "max attempts").
    pub reason: Option<String>,
}

/// Receives every event. Must be cheap: it runs on the dispatch path.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Records one event.
    fn emit(&self, event: Event);

    /// False if every event is dropped: the dispatcher then does not build
    /// them (an event costs a few allocations per message).
    fn enabled(&self) -> bool {
        true
    }
}

/// Drops every event.
#[derive(Debug, Default)]
pub struct NullEventSink;

impl EventSink for NullEventSink {
    fn emit(&self, _event: Event) {}

    fn enabled(&self) -> bool {
        false
    }
}

/// Keeps every event in memory (tests, simulation).
#[derive(Debug, Default, Clone)]
pub struct MemoryEventSink {
    events: Arc<Mutex<Vec<Event>>>,
}

impl MemoryEventSink {
    /// Takes the events recorded so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl EventSink for MemoryEventSink {
    fn emit(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}
