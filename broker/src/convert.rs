//! Conversions between wire types (`dmq-protocol`) and the dispatcher's and
//! log's types, and the mapping of internal errors to wire error codes.

use bytes::Bytes;
use dmq_dispatcher::{self as dispatcher, DispatchError, GroupConfig, StoreError};
use dmq_log_store::{LogError, MessageId, RecordInput};
use dmq_protocol::{self as wire, ErrorCode, ErrorResponse};

use crate::engine::EngineError;

/// The wire error for an engine error.
pub(crate) fn engine_error(error: &EngineError) -> ErrorResponse {
    match error {
        EngineError::Dispatch(error) => dispatch_error(error),
        EngineError::ShuttingDown => ErrorResponse::new(ErrorCode::ShuttingDown, error.to_string()),
    }
}

/// The wire error for a dispatcher error.
pub(crate) fn dispatch_error(error: &DispatchError) -> ErrorResponse {
    let code = match error {
        DispatchError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        DispatchError::UnknownGroup { .. } => ErrorCode::UnknownGroup,
        DispatchError::UnknownMember(_) => ErrorCode::UnknownSubscription,
        DispatchError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        DispatchError::InvalidName(_) | DispatchError::InvalidArgument(_) => {
            ErrorCode::InvalidRequest
        }
        DispatchError::TopicExists(_) => ErrorCode::TopicExists,
        DispatchError::NotDelivered { .. } => ErrorCode::NotDelivered,
        DispatchError::Store(store) => return store_error(store),
        DispatchError::Transaction(txn) => match txn {
            dispatcher::TxnError::Unknown(_) => ErrorCode::UnknownTransaction,
            dispatcher::TxnError::Conflict { .. } => ErrorCode::TransactionConflict,
            dispatcher::TxnError::Limit { .. } => ErrorCode::TransactionLimit,
            dispatcher::TxnError::OutOfSequence { .. } => ErrorCode::OutOfOrderSequence,
            dispatcher::TxnError::Fenced { .. } => ErrorCode::ProducerFenced,
            dispatcher::TxnError::InvalidName(_) => ErrorCode::InvalidRequest,
            dispatcher::TxnError::Store(store) => return store_error(store),
            _ => ErrorCode::StorageError,
        },
        _ => ErrorCode::StorageError,
    };
    ErrorResponse::new(code, error.to_string())
}

/// The wire error for a storage error.
pub(crate) fn store_error(error: &StoreError) -> ErrorResponse {
    let code = match error {
        StoreError::Log(LogError::DiskFull { .. }) | StoreError::NoRoom { .. } => {
            ErrorCode::DiskFull
        }
        StoreError::Log(LogError::InvalidBatch(_)) => ErrorCode::InvalidRequest,
        StoreError::Unavailable(_) => ErrorCode::Unavailable,
        _ => ErrorCode::StorageError,
    };
    ErrorResponse::new(code, error.to_string())
}

/// The HTTP status the admin API answers for a wire error code. Every
/// internal error is mapped once, to a wire code ([`dispatch_error`],
/// [`store_error`], [`engine_error`]); the admin API derives its status from
/// that code, so the two listeners never disagree on what an error is (a
/// full disk is 507 on one and `DiskFull` on the other, never a 500).
pub(crate) fn http_status(code: ErrorCode) -> axum::http::StatusCode {
    use axum::http::StatusCode as S;
    match code {
        ErrorCode::UnknownTopic
        | ErrorCode::UnknownGroup
        | ErrorCode::UnknownSubscription
        | ErrorCode::UnknownTransaction => S::NOT_FOUND,
        ErrorCode::MalformedFrame
        | ErrorCode::UnsupportedVersion
        | ErrorCode::UnknownPartition
        | ErrorCode::InvalidRequest
        | ErrorCode::NotDelivered
        | ErrorCode::UnknownOpcode
        | ErrorCode::OutOfOrderSequence => S::BAD_REQUEST,
        ErrorCode::FrameTooLarge | ErrorCode::RecordTooLarge => S::PAYLOAD_TOO_LARGE,
        ErrorCode::NotAuthenticated | ErrorCode::AuthenticationFailed => S::UNAUTHORIZED,
        ErrorCode::NotAuthorized => S::FORBIDDEN,
        ErrorCode::TopicExists
        | ErrorCode::GroupConfigConflict
        | ErrorCode::TransactionConflict
        | ErrorCode::ProducerFenced => S::CONFLICT,
        ErrorCode::TransactionLimit => S::UNPROCESSABLE_ENTITY,
        ErrorCode::DiskFull => S::INSUFFICIENT_STORAGE,
        ErrorCode::Overloaded => S::TOO_MANY_REQUESTS,
        // Consumers are served elsewhere (the admin API never answers it).
        ErrorCode::ShuttingDown | ErrorCode::WrongNode => S::SERVICE_UNAVAILABLE,
        // No leader within the write timeout: the request timed out inside
        // the cluster.
        ErrorCode::Unavailable => S::GATEWAY_TIMEOUT,
        ErrorCode::Timeout => S::GATEWAY_TIMEOUT,
        ErrorCode::StorageError | ErrorCode::InternalError | ErrorCode::Unknown(_) => {
            S::INTERNAL_SERVER_ERROR
        }
    }
}

/// A produce record as a log record, with times resolved against `now_ms`.
pub(crate) fn record_input(record: wire::ProduceRecord, now_ms: i64) -> RecordInput {
    let deliver_at_ms = match record.delivery_time {
        wire::DeliveryTime::Immediate => None,
        wire::DeliveryTime::DelayMs(delay) => {
            Some(now_ms.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)))
        }
        wire::DeliveryTime::AtMs(at) => Some(at),
    };
    let expire_at_ms = record
        .ttl_ms
        .map(|ttl| now_ms.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)));
    RecordInput {
        id: None,
        key: record.key,
        headers: record
            .headers
            .into_iter()
            .map(|header| (header.name, header.value))
            .collect(),
        value: record.value,
        deliver_at_ms,
        expire_at_ms,
    }
}

/// The wire message id.
pub(crate) fn message_id(id: MessageId) -> wire::MessageId {
    wire::MessageId(id.0)
}

/// A dispatcher delivery as a DELIVER push.
pub(crate) fn delivery(delivery: dispatcher::Delivery) -> wire::Delivery {
    let record = delivery.record;
    wire::Delivery {
        subscription_id: delivery.member,
        topic: delivery.topic.to_string(),
        partition: delivery.partition,
        offset: record.offset,
        attempt: delivery.attempt,
        message_id: message_id(record.id),
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        headers: record
            .headers
            .into_iter()
            .map(|(name, value): (Bytes, Bytes)| wire::Header { name, value })
            .collect(),
        value: record.value,
        deliver_at_ms: record.deliver_at_ms,
        expire_at_ms: record.expire_at_ms,
    }
}

/// A start position on the wire as the dispatcher's.
pub(crate) fn start_position(start: wire::StartPosition) -> dispatcher::StartPosition {
    match start {
        wire::StartPosition::Earliest => dispatcher::StartPosition::Earliest,
        wire::StartPosition::Latest => dispatcher::StartPosition::Latest,
        wire::StartPosition::Timestamp(t) => dispatcher::StartPosition::Timestamp(t),
        wire::StartPosition::Offset(o) => dispatcher::StartPosition::Offset(o),
    }
}

/// A subscription's settings on top of the defaults.
pub(crate) fn group_config(subscribe: &wire::Subscribe) -> GroupConfig {
    let defaults = GroupConfig::default();
    let settings = &subscribe.settings;
    GroupConfig {
        mode: match subscribe.mode {
            wire::DeliveryMode::Clustering => dispatcher::DeliveryMode::Clustering,
            wire::DeliveryMode::Broadcast => dispatcher::DeliveryMode::Broadcast,
        },
        start: start_position(subscribe.start),
        ack_timeout_ms: settings.ack_timeout_ms.unwrap_or(defaults.ack_timeout_ms),
        max_attempts: settings.max_attempts.unwrap_or(defaults.max_attempts),
        backoff: match &settings.backoff {
            Some(wire::Backoff::Fixed { delays_ms }) if !delays_ms.is_empty() => {
                dispatcher::Backoff::Fixed {
                    delays_ms: delays_ms.clone(),
                }
            }
            Some(wire::Backoff::Exponential { initial_ms, max_ms }) => {
                dispatcher::Backoff::Exponential {
                    initial_ms: *initial_ms,
                    max_ms: *max_ms,
                }
            }
            _ => defaults.backoff,
        },
        max_unacked_per_partition: settings
            .max_unacked_per_partition
            .unwrap_or(defaults.max_unacked_per_partition),
        rate_limit_per_second: settings.rate_limit_per_second,
        dead_letter_topic: settings.dead_letter_topic.clone(),
    }
}

/// The wire form of a group's mode and settings.
/// A group of `topic` as GROUPS lists it: every setting present (the
/// dead-letter topic as the group uses it, named or derived), except a rate
/// limit the group does not have.
pub(crate) fn group_summary(topic: &str, name: String, config: &GroupConfig) -> wire::GroupSummary {
    let dead_letter_topic = config.dead_letter_topic_for(topic, &name);
    wire::GroupSummary {
        name,
        mode: match config.mode {
            dispatcher::DeliveryMode::Clustering => wire::DeliveryMode::Clustering,
            dispatcher::DeliveryMode::Broadcast => wire::DeliveryMode::Broadcast,
        },
        settings: wire::GroupSettings {
            ack_timeout_ms: Some(config.ack_timeout_ms),
            max_attempts: Some(config.max_attempts),
            backoff: Some(match &config.backoff {
                dispatcher::Backoff::Fixed { delays_ms } => wire::Backoff::Fixed {
                    delays_ms: delays_ms.clone(),
                },
                dispatcher::Backoff::Exponential { initial_ms, max_ms } => {
                    wire::Backoff::Exponential {
                        initial_ms: *initial_ms,
                        max_ms: *max_ms,
                    }
                }
            }),
            max_unacked_per_partition: Some(config.max_unacked_per_partition),
            rate_limit_per_second: config.rate_limit_per_second,
            dead_letter_topic: Some(dead_letter_topic),
        },
    }
}

/// A wire tombstone as the dispatcher's.
pub(crate) fn tombstone(tombstone: wire::Tombstone) -> dispatcher::Tombstone {
    match tombstone {
        wire::Tombstone::OffsetRange {
            partition,
            start,
            end,
        } => dispatcher::Tombstone::OffsetRange {
            partition,
            start,
            end,
        },
        wire::Tombstone::MessageId(id) => {
            dispatcher::Tombstone::MessageId(MessageId(id.0).to_string())
        }
        wire::Tombstone::TimeRange { start_ms, end_ms } => {
            dispatcher::Tombstone::TimeRange { start_ms, end_ms }
        }
    }
}
