//! Messages: find them (by id, key, time range or offset range, paged),
//! show one with its state in every group, delete them (one durable
//! tombstone per call, with a dry run), send a test message, and list and
//! resend dead letters.
//!
//! Queries read the partition logs directly (zero-copy mmap reads on the
//! blocking pool); only the "deleted?" flags and per-group states come from
//! the dispatcher thread. A page holds at most [`MAX_LIMIT`] messages and a
//! query scans at most [`MAX_SCANNED`] records per page, so a query over a
//! huge range costs a bounded amount of memory and time per call; the
//! cursor continues where the scan stopped.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::Uri;
use axum::routing::{get, post};
use axum::{Json, Router};
use dmq_dispatcher::{PartitionLog, Tombstone};
use dmq_log_store::{MessageId, Record, RecordInput};
use serde::{Deserialize, Serialize};

use super::observe::parse_id;
use super::{blocking, parse_json, query_map, query_param, shown, ApiError, ApiResult};
use crate::services::{now_ms, Services};

pub(super) fn routes() -> Router<Services> {
    Router::new()
        .route("/api/messages/{id}", get(get_message))
        .route("/api/topics/{topic}/messages", get(query))
        .route("/api/topics/{topic}/messages/delete", post(delete))
        .route("/api/topics/{topic}/test-message", post(test_message))
        .route("/api/dlq", get(dead_letters))
        .route("/api/dlq/{topic}/resend", post(resend))
}

/// Most messages per page.
pub const MAX_LIMIT: usize = 1000;
/// Most records one page may scan past (a time range scan stops here and
/// hands back a cursor).
pub const MAX_SCANNED: usize = 100_000;
/// Most payload bytes in a preview.
pub const PREVIEW_BYTES: usize = 4096;
/// Most messages one resend call moves.
pub const MAX_RESEND: usize = 10_000;

/// How a payload is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreviewFormat {
    Auto,
    Json,
    Text,
    Hex,
}

#[derive(Debug, Serialize)]
struct Preview {
    format: &'static str,
    text: String,
    truncated: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn preview(value: &[u8], format: PreviewFormat) -> Preview {
    let cut = value.len().min(PREVIEW_BYTES);
    let truncated = cut < value.len();
    let text_of = |bytes: &[u8]| {
        // A cut may split a UTF-8 character: show what decodes.
        match std::str::from_utf8(bytes) {
            Ok(text) => Some(text.to_string()),
            Err(error) if truncated && error.error_len().is_none() => {
                std::str::from_utf8(&bytes[..error.valid_up_to()])
                    .ok()
                    .map(str::to_string)
            }
            Err(_) => None,
        }
    };
    let hex_preview = || Preview {
        format: "hex",
        text: hex(&value[..cut]),
        truncated,
    };
    match format {
        PreviewFormat::Hex => hex_preview(),
        PreviewFormat::Text | PreviewFormat::Json | PreviewFormat::Auto => {
            let Some(text) = text_of(&value[..cut]) else {
                return hex_preview();
            };
            let json = format == PreviewFormat::Json
                || (format == PreviewFormat::Auto
                    && serde_json::from_slice::<serde::de::IgnoredAny>(value).is_ok());
            Preview {
                format: if json { "json" } else { "text" },
                text,
                truncated,
            }
        }
    }
}

/// A message as the API shows it (docs/admin-api.md, Message).
#[derive(Debug, Serialize)]
struct MessageView {
    message_id: String,
    topic: String,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    key: Option<String>,
    key_hex: Option<String>,
    headers: BTreeMap<String, String>,
    size_bytes: usize,
    deliver_at_ms: Option<i64>,
    expires_at_ms: Option<i64>,
    deleted: bool,
    preview: Preview,
}

fn view(
    topic: &str,
    partition: u32,
    record: &Record,
    deleted: bool,
    format: PreviewFormat,
) -> MessageView {
    let headers = record
        .headers
        .iter()
        .map(|(name, value)| {
            (
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect();
    MessageView {
        message_id: record.id.to_string(),
        topic: topic.to_string(),
        partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record
            .key
            .as_ref()
            .and_then(|key| std::str::from_utf8(key).ok().map(str::to_string)),
        key_hex: record.key.as_ref().map(|key| hex(key)),
        headers,
        size_bytes: record.value.len(),
        deliver_at_ms: record.deliver_at_ms,
        expires_at_ms: record.expire_at_ms,
        deleted,
        preview: preview(&record.value, format),
    }
}

fn preview_format(query: &std::collections::HashMap<String, String>) -> ApiResult<PreviewFormat> {
    match query.get("format").map(String::as_str) {
        None | Some("") | Some("auto") => Ok(PreviewFormat::Auto),
        Some("json") => Ok(PreviewFormat::Json),
        Some("text") => Ok(PreviewFormat::Text),
        Some("hex") => Ok(PreviewFormat::Hex),
        Some(other) => Err(ApiError::bad_request(format!(
            "format must be json, text or hex, not {}",
            shown(other)
        ))),
    }
}

async fn topic_logs(services: &Services, topic: &str) -> ApiResult<Vec<Arc<dyn PartitionLog>>> {
    services
        .engine
        .find_topic(topic)
        .await
        .map(|handle| handle.logs)
        .ok_or_else(|| ApiError::not_found(format!("unknown topic {}", shown(topic))))
}

fn store_error(error: dmq_dispatcher::StoreError) -> ApiError {
    ApiError::internal(format!("reading the log: {error}"))
}

/// Which messages a query or deletion means.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Id(MessageId),
    Key(Vec<u8>),
    Time { from_ms: i64, to_ms: i64 },
    Offsets { partition: u32, from: u64, to: u64 },
}

impl Selector {
    fn from_parts(
        id: Option<String>,
        key: Option<String>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        partition: Option<u32>,
        from_offset: Option<u64>,
        to_offset: Option<u64>,
    ) -> ApiResult<Selector> {
        let time = from_ms.is_some() || to_ms.is_some();
        let offsets = partition.is_some() || from_offset.is_some() || to_offset.is_some();
        let given = [id.is_some(), key.is_some(), time, offsets]
            .iter()
            .filter(|given| **given)
            .count();
        if given != 1 {
            return Err(ApiError::bad_request(
                "give exactly one selector: id, key, from_ms+to_ms, or partition+from_offset+to_offset",
            ));
        }
        if let Some(id) = id {
            return Ok(Selector::Id(parse_id(&id)?));
        }
        if let Some(key) = key {
            return Ok(Selector::Key(key.into_bytes()));
        }
        if time {
            let (Some(from_ms), Some(to_ms)) = (from_ms, to_ms) else {
                return Err(ApiError::bad_request(
                    "a time range needs both from_ms and to_ms",
                ));
            };
            if from_ms >= to_ms {
                return Err(ApiError::bad_request(format!(
                    "from_ms ({from_ms}) must be before to_ms ({to_ms})"
                )));
            }
            return Ok(Selector::Time { from_ms, to_ms });
        }
        let (Some(partition), Some(from), Some(to)) = (partition, from_offset, to_offset) else {
            return Err(ApiError::bad_request(
                "an offset range needs partition, from_offset and to_offset",
            ));
        };
        if from >= to {
            return Err(ApiError::bad_request(format!(
                "from_offset ({from}) must be below to_offset ({to})"
            )));
        }
        Ok(Selector::Offsets {
            partition,
            from,
            to,
        })
    }

    fn tombstone(&self) -> Tombstone {
        match self {
            Selector::Id(id) => Tombstone::MessageId(id.to_string()),
            Selector::Key(key) => Tombstone::Key(key.clone()),
            Selector::Time { from_ms, to_ms } => Tombstone::TimeRange {
                start_ms: *from_ms,
                end_ms: *to_ms,
            },
            Selector::Offsets {
                partition,
                from,
                to,
            } => Tombstone::OffsetRange {
                partition: *partition,
                start: *from,
                end: *to,
            },
        }
    }
}

/// Where a page starts: (partition, offset), as `"<p>:<o>"`.
fn parse_cursor(text: Option<&String>) -> ApiResult<(u32, u64)> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok((0, 0));
    };
    text.split_once(':')
        .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)))
        .ok_or_else(|| ApiError::bad_request(format!("invalid cursor {}", shown(text))))
}

/// One page of records (with their partitions) and where the next starts.
type Page = (Vec<(u32, Record)>, Option<(u32, u64)>);

/// Reads one page of `selector` from `logs`, starting at `cursor`; returns
/// the records and the next cursor.
fn scan(
    logs: &[Arc<dyn PartitionLog>],
    selector: &Selector,
    cursor: (u32, u64),
    limit: usize,
) -> ApiResult<Page> {
    let mut found = Vec::new();
    match selector {
        Selector::Id(id) => {
            for (partition, log) in logs.iter().enumerate() {
                if let Some(record) = log.find_by_id(id).map_err(store_error)? {
                    found.push((partition as u32, record));
                }
            }
            Ok((found, None))
        }
        Selector::Key(key) => {
            for (partition, log) in logs.iter().enumerate().skip(cursor.0 as usize) {
                let partition = partition as u32;
                // From the cursor on, one more than fits: the index gives
                // them oldest first.
                let from = if partition == cursor.0 { cursor.1 } else { 0 };
                let records = log
                    .find_by_key_from(key, from, limit - found.len() + 1)
                    .map_err(store_error)?;
                for record in records {
                    if found.len() == limit {
                        return Ok((found, Some((partition, record.offset))));
                    }
                    found.push((partition, record));
                }
            }
            Ok((found, None))
        }
        Selector::Time { from_ms, to_ms } => {
            let mut scanned = 0;
            for (partition, log) in logs.iter().enumerate().skip(cursor.0 as usize) {
                let partition = partition as u32;
                let start = log
                    .offset_for_timestamp(*from_ms)
                    .map_err(store_error)?
                    .unwrap_or_else(|| log.end_offset());
                let mut next = if partition == cursor.0 {
                    start.max(cursor.1)
                } else {
                    start
                };
                'partition: while next < log.end_offset() {
                    let records = log.read(next, 512).map_err(store_error)?;
                    if records.is_empty() {
                        break;
                    }
                    for record in records {
                        next = record.offset + 1;
                        scanned += 1;
                        if record.timestamp_ms >= *to_ms {
                            break 'partition;
                        }
                        if record.timestamp_ms >= *from_ms {
                            if found.len() == limit {
                                return Ok((found, Some((partition, record.offset))));
                            }
                            found.push((partition, record));
                        }
                        if scanned >= MAX_SCANNED {
                            return Ok((found, Some((partition, next))));
                        }
                    }
                }
            }
            Ok((found, None))
        }
        Selector::Offsets {
            partition,
            from,
            to,
        } => {
            let log = logs.get(*partition as usize).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "the topic has {} partitions, not {partition}",
                    logs.len()
                ))
            })?;
            let mut next = (*from).max(log.start_offset());
            if cursor.0 == *partition {
                next = next.max(cursor.1);
            }
            while next < (*to).min(log.end_offset()) {
                let records = log.read(next, 512).map_err(store_error)?;
                if records.is_empty() {
                    break;
                }
                for record in records {
                    if record.offset >= *to {
                        return Ok((found, None));
                    }
                    next = record.offset + 1;
                    if found.len() == limit {
                        return Ok((found, Some((*partition, record.offset))));
                    }
                    found.push((*partition, record));
                }
            }
            Ok((found, None))
        }
    }
}

/// The first `max` stored records of `logs`, partition by partition.
fn first_records(logs: &[Arc<dyn PartitionLog>], max: usize) -> ApiResult<Vec<(u32, Record)>> {
    let mut records = Vec::new();
    for (partition, log) in logs.iter().enumerate() {
        let mut next = log.start_offset();
        while next < log.end_offset() && records.len() < max {
            let batch = log.read(next, 512).map_err(store_error)?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            records.extend(batch.into_iter().map(|r| (partition as u32, r)));
        }
    }
    records.truncate(max);
    Ok(records)
}

/// The "deleted?" flag of each record, from the dispatcher's tombstones.
async fn deleted_flags(
    services: &Services,
    topic: &str,
    records: &[(u32, Record)],
) -> ApiResult<Vec<bool>> {
    let topic = topic.to_string();
    let records = records.to_vec();
    Ok(services
        .engine
        .call(move |dispatcher, _| {
            records
                .iter()
                .map(|(partition, record)| dispatcher.is_deleted(&topic, *partition, record))
                .collect()
        })
        .await?)
}

async fn query(
    State(services): State<Services>,
    Path(topic): Path<String>,
    uri: Uri,
) -> ApiResult<Json<serde_json::Value>> {
    let params = query_map(&uri)?;
    let selector = Selector::from_parts(
        params.get("id").cloned(),
        params.get("key").cloned(),
        query_param(&params, "from_ms")?,
        query_param(&params, "to_ms")?,
        query_param(&params, "partition")?,
        query_param(&params, "from_offset")?,
        query_param(&params, "to_offset")?,
    )?;
    let limit: usize = query_param(&params, "limit")?.unwrap_or(50);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let cursor = parse_cursor(params.get("cursor"))?;
    let format = preview_format(&params)?;
    let logs = topic_logs(&services, &topic).await?;
    let scan_selector = selector.clone();
    let (records, next) = blocking(move || scan(&logs, &scan_selector, cursor, limit)).await?;
    let deleted = deleted_flags(&services, &topic, &records).await?;
    let messages: Vec<MessageView> = records
        .iter()
        .zip(deleted)
        .map(|((partition, record), deleted)| view(&topic, *partition, record, deleted, format))
        .collect();
    Ok(Json(serde_json::json!({
        "messages": messages,
        "next_cursor": next.map(|(p, o)| format!("{p}:{o}")),
    })))
}

#[derive(Debug, Serialize)]
struct GroupStateView {
    group: String,
    member: Option<String>,
    acked: bool,
    attempts: u32,
    in_flight: bool,
    next_delivery_ms: Option<i64>,
    dead_lettered: bool,
}

async fn get_message(
    State(services): State<Services>,
    Path(id): Path<String>,
    uri: Uri,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    let format = preview_format(&query_map(&uri)?)?;
    // Registered topics first: a dead-lettered message has the same id in
    // its dead-letter topic.
    let mut topics = services
        .engine
        .call(|dispatcher, _| dispatcher.topics())
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !name.starts_with("__"))
        .collect::<Vec<_>>();
    {
        let registry = services.registry.read().unwrap_or_else(|p| p.into_inner());
        topics.sort_by_key(|name| registry.get(name).is_none());
    }
    let mut searched = Vec::with_capacity(topics.len());
    for topic in topics {
        if let Ok(logs) = topic_logs(&services, &topic).await {
            searched.push((topic, logs));
        }
    }
    // One trip to the blocking pool for every topic's id lookups.
    let found = blocking(move || {
        for (topic, logs) in searched {
            let (hits, _) = scan(&logs, &Selector::Id(id), (0, 0), 1)?;
            if let Some((partition, record)) = hits.into_iter().next() {
                return Ok(Some((topic, partition, record)));
            }
        }
        Ok(None)
    })
    .await?;
    let Some((topic, partition, record)) = found else {
        return Err(ApiError::not_found(format!(
            "no stored message has id {id}"
        )));
    };
    let (states, deleted) = {
        let topic = topic.clone();
        let record = record.clone();
        services
            .engine
            .call(move |dispatcher, _| {
                let deleted = dispatcher.is_deleted(&topic, partition, &record);
                dispatcher
                    .message_states(&topic, partition, &record)
                    .map(|states| (states, deleted))
            })
            .await??
    };
    let telemetry = services.engine.telemetry().clone();
    let trace = blocking(move || Ok(telemetry.trace(&id).unwrap_or_default())).await?;
    let groups: Vec<GroupStateView> = states
        .into_iter()
        .map(|state| GroupStateView {
            dead_lettered: trace.iter().any(|event| {
                event.kind == "dead_lettered" && event.group.as_deref() == Some(&state.group)
            }),
            group: state.group,
            member: state.member,
            acked: state.acked,
            attempts: state.attempts,
            in_flight: state.in_flight,
            next_delivery_ms: state.next_delivery_ms,
        })
        .collect();
    Ok(Json(serde_json::json!({
        "message": view(&topic, partition, &record, deleted, format),
        "groups": groups,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    id: Option<String>,
    key: Option<String>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    partition: Option<u32>,
    from_offset: Option<u64>,
    to_offset: Option<u64>,
    /// Absent: a dry run. Deleting takes `"dry_run": false`.
    #[serde(default = "dry_run_unless_told")]
    dry_run: bool,
}

fn dry_run_unless_told() -> bool {
    true
}

async fn delete(
    State(services): State<Services>,
    Path(topic): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let request: DeleteRequest = parse_json(&body)?;
    let selector = Selector::from_parts(
        request.id,
        request.key,
        request.from_ms,
        request.to_ms,
        request.partition,
        request.from_offset,
        request.to_offset,
    )?;
    let logs = topic_logs(&services, &topic).await?;
    if let Selector::Offsets { partition, .. } = selector {
        if partition as usize >= logs.len() {
            return Err(ApiError::bad_request(format!(
                "the topic has {} partitions, not {partition}",
                logs.len()
            )));
        }
    }
    let dry_run = request.dry_run;
    if let Some(cluster) = services.engine.cluster() {
        // Nothing to wait for on a local topic (no replica).
        crate::produce::catch_up(cluster, &topic, logs.len() as u32).await?;
    }
    let tombstone = selector.tombstone();
    let name = topic.clone();
    // Counted against the same end offsets the tombstone is bounded by.
    // Written even when nothing stored matches: an id may name a delayed
    // message that is not in the topic yet.
    let (matched, segments_freed) = services
        .engine
        .call(move |dispatcher, _| {
            if dry_run {
                return dispatcher.count_covered(&name, &tombstone).map(|n| (n, 0));
            }
            let matched = dispatcher.delete_counted(&name, tombstone)?;
            // Durable already: freeing disk is a bonus, retried every
            // minute by the retention task if it fails now.
            let freed = dispatcher.reclaim_deleted(&name).unwrap_or_else(|error| {
                tracing::warn!(topic = name, %error, "unlinking deleted segments failed");
                0
            });
            Ok::<(u64, u64), dmq_dispatcher::DispatchError>((matched, freed))
        })
        .await??;
    if let (false, Some(cluster)) = (dry_run, services.engine.cluster()) {
        // A cluster topic's deletion holds on every node before the answer.
        cluster.deletion_replicated(&topic).await?;
    }
    if !dry_run {
        tracing::info!(
            topic,
            ?selector,
            matched,
            segments_freed,
            "messages deleted"
        );
    }
    Ok(Json(serde_json::json!({
        "dry_run": dry_run,
        "matched": matched,
        "segments_freed": segments_freed,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestMessage {
    value: String,
    key: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    delay_ms: Option<u64>,
}

async fn test_message(
    State(services): State<Services>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(topic): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let request: TestMessage = parse_json(&body)?;
    topic_logs(&services, &topic).await?;
    let now = now_ms();
    let mut record = RecordInput::new(Bytes::from(request.value.into_bytes()));
    record.key = request.key.map(|key| Bytes::from(key.into_bytes()));
    record.headers = request
        .headers
        .into_iter()
        .map(|(name, value)| {
            (
                Bytes::from(name.into_bytes()),
                Bytes::from(value.into_bytes()),
            )
        })
        .collect();
    record.deliver_at_ms = request
        .delay_ms
        .map(|delay| deliver_at(now, delay))
        .transpose()?;
    let answer = crate::produce::produce(
        &services.engine,
        crate::produce::ProduceRequest {
            topic: topic.clone(),
            partition: None,
            records: vec![record],
            sequence: None,
            first_of_producer: false,
            origin: crate::produce::Origin {
                client_id: "admin".to_string(),
                peer,
                received_ms: now,
            },
            max_frame_bytes: services.config.max_frame_bytes,
        },
    )
    .await?;
    let produced = answer
        .records
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the produce returned no record"))?;
    Ok(Json(serde_json::json!({
        "partition": produced.partition,
        "offset": produced.offset,
        "message_id": MessageId(produced.message_id.0).to_string(),
        "deliver_at_ms": produced.deliver_at_ms,
    })))
}

/// When a message delayed by `delay_ms` from `now` is due; a time that
/// does not fit an i64 of milliseconds is refused (it must not wrap into
/// the past and deliver at once).
fn deliver_at(now: i64, delay_ms: u64) -> ApiResult<i64> {
    i64::try_from(delay_ms)
        .ok()
        .and_then(|delay| now.checked_add(delay))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "delay_ms {delay_ms} is too large: the delivery time would be past the \
                 largest timestamp (i64 milliseconds)"
            ))
        })
}

#[derive(Serialize)]
struct DeadLetterView {
    topic: String,
    source_topic: String,
    group: String,
    messages: u64,
}

async fn dead_letters(State(services): State<Services>) -> ApiResult<Json<Vec<DeadLetterView>>> {
    let topics = services
        .engine
        .call(|dispatcher, _| dispatcher.dead_letter_topics())
        .await?;
    let mut views = Vec::with_capacity(topics.len());
    for dlq in topics {
        let messages = match services.engine.find_topic(&dlq.topic).await {
            Some(handle) => live_messages(&services, &dlq.topic, handle.logs).await?,
            None => 0,
        };
        views.push(DeadLetterView {
            topic: dlq.topic,
            source_topic: dlq.source_topic,
            group: dlq.group,
            messages,
        });
    }
    Ok(Json(views))
}

/// Dead-letter topics counted record by record at most this far; beyond,
/// the rest counts as stored (resent messages are tombstoned, not removed).
const MAX_COUNTED: usize = 10_000;

/// Messages of `topic` not deleted: exact up to [`MAX_COUNTED`] records.
async fn live_messages(
    services: &Services,
    topic: &str,
    logs: Vec<Arc<dyn PartitionLog>>,
) -> ApiResult<u64> {
    let stored: u64 = logs
        .iter()
        .map(|log| log.end_offset() - log.start_offset())
        .sum();
    let records = blocking(move || first_records(&logs, MAX_COUNTED)).await?;
    let deleted = deleted_flags(services, topic, &records)
        .await?
        .into_iter()
        .filter(|deleted| *deleted)
        .count() as u64;
    Ok(stored.saturating_sub(deleted))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resend {
    #[serde(default)]
    message_ids: Option<Vec<String>>,
}

/// Dead letters resent in one produce (one append per partition).
const RESEND_BATCH: usize = 1_000;

async fn resend(
    State(services): State<Services>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(dlq): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let request: Resend = if body.is_empty() {
        Resend { message_ids: None }
    } else {
        parse_json(&body)?
    };
    let source = services
        .engine
        .call({
            let dlq = dlq.clone();
            move |dispatcher, _| {
                dispatcher
                    .dead_letter_topics()
                    .into_iter()
                    .find(|d| d.topic == dlq)
                    .map(|d| d.source_topic)
            }
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("{} is not a dead-letter topic", shown(&dlq)))
        })?;
    let logs = topic_logs(&services, &dlq).await?;
    let wanted: Option<Vec<MessageId>> = request
        .message_ids
        .map(|ids| ids.iter().map(|id| parse_id(id)).collect::<ApiResult<_>>())
        .transpose()?;
    let records = blocking(move || {
        let mut records = Vec::new();
        match wanted {
            Some(ids) => {
                for id in ids {
                    let (hits, _) = scan(&logs, &Selector::Id(id), (0, 0), 1)?;
                    if hits.is_empty() {
                        return Err(ApiError::not_found(format!(
                            "message {id} is not in the dead-letter topic"
                        )));
                    }
                    records.extend(hits);
                }
            }
            None => records = first_records(&logs, MAX_RESEND)?,
        }
        Ok(records)
    })
    .await?;
    // Dead letters already deleted (resent before) are skipped.
    let records = services
        .engine
        .call({
            let dlq = dlq.clone();
            move |dispatcher, _| {
                records
                    .into_iter()
                    .filter(|(partition, record)| !dispatcher.is_deleted(&dlq, *partition, record))
                    .collect::<Vec<_>>()
            }
        })
        .await?;
    let mut resent = 0u64;
    for chunk in records.chunks(RESEND_BATCH) {
        let inputs = chunk
            .iter()
            .map(|(_, record)| RecordInput {
                // The same id: a message keeps its id for its whole life,
                // so a consumer that deduplicates by id still can.
                id: Some(record.id),
                key: record.key.clone(),
                headers: record
                    .headers
                    .iter()
                    .filter(|(name, _)| {
                        !name.starts_with(
                            dmq_dispatcher::names::DEAD_LETTER_HEADER_PREFIX.as_bytes(),
                        )
                    })
                    .cloned()
                    .collect(),
                value: record.value.clone(),
                deliver_at_ms: None,
                expire_at_ms: None,
            })
            .collect();
        // Produced durably first (the produce pipeline: routed, traced,
        // counted), then deleted from the dead-letter topic: a crash
        // between resends them twice, never loses one.
        crate::produce::produce(
            &services.engine,
            crate::produce::ProduceRequest {
                topic: source.clone(),
                partition: None,
                records: inputs,
                sequence: None,
                first_of_producer: false,
                origin: crate::produce::Origin {
                    client_id: "admin".to_string(),
                    peer,
                    received_ms: now_ms(),
                },
                max_frame_bytes: services.config.max_frame_bytes,
            },
        )
        .await?;
        let offsets: Vec<(u32, u64)> = chunk.iter().map(|(p, r)| (*p, r.offset)).collect();
        let dead_letter_topic = dlq.clone();
        services
            .engine
            .call(move |dispatcher, _| {
                for (partition, offset) in offsets {
                    // By offset, not by id: if the message fails again,
                    // its new dead letter (same id) must stay visible.
                    dispatcher.delete(
                        &dead_letter_topic,
                        Tombstone::OffsetRange {
                            partition,
                            start: offset,
                            end: offset + 1,
                        },
                    )?;
                }
                Ok::<(), dmq_dispatcher::DispatchError>(())
            })
            .await??;
        if let Some(cluster) = services.engine.cluster() {
            cluster.deletion_replicated(&dlq).await?;
        }
        resent += chunk.len() as u64;
    }
    Ok(Json(serde_json::json!({ "resent": resent })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_pick_json_text_or_hex() {
        assert_eq!(preview(b"{\"a\":1}", PreviewFormat::Auto).format, "json");
        assert_eq!(preview(b"hello", PreviewFormat::Auto).format, "text");
        let binary = preview(&[0xff, 0x00], PreviewFormat::Auto);
        assert_eq!((binary.format, binary.text.as_str()), ("hex", "ff00"));
        assert_eq!(preview(b"hi", PreviewFormat::Hex).text, "6869");
        let long = vec![b'a'; PREVIEW_BYTES + 10];
        let cut = preview(&long, PreviewFormat::Auto);
        assert!(cut.truncated);
        assert_eq!(cut.text.len(), PREVIEW_BYTES);
        // A cut inside a multi-byte character keeps the text readable.
        let mut accented = vec![b'a'; PREVIEW_BYTES - 1];
        accented.extend_from_slice("é".as_bytes());
        let cut = preview(&accented, PreviewFormat::Auto);
        assert_eq!(cut.format, "text");
        assert_eq!(cut.text.len(), PREVIEW_BYTES - 1);
    }

    #[test]
    fn selectors_need_exactly_one_and_ordered_ranges() {
        let none = Selector::from_parts(None, None, None, None, None, None, None);
        assert!(none.is_err());
        let two = Selector::from_parts(
            Some("x".into()),
            Some("k".into()),
            None,
            None,
            None,
            None,
            None,
        );
        assert!(two.is_err());
        let inverted = Selector::from_parts(None, None, Some(10), Some(5), None, None, None);
        assert!(inverted.is_err());
        let half = Selector::from_parts(None, None, Some(10), None, None, None, None);
        assert!(half.is_err());
        let time = Selector::from_parts(None, None, Some(5), Some(10), None, None, None).unwrap();
        assert_eq!(
            time,
            Selector::Time {
                from_ms: 5,
                to_ms: 10
            }
        );
        let offsets = Selector::from_parts(None, None, None, None, Some(1), Some(3), Some(3));
        assert!(offsets.is_err(), "an empty offset range");
        assert!(
            Selector::from_parts(Some("nope".into()), None, None, None, None, None, None).is_err()
        );
    }

    #[test]
    fn delays_that_overflow_are_refused() {
        let now = 1_764_246_000_000;
        assert_eq!(deliver_at(now, 1000).unwrap(), now + 1000);
        assert_eq!(deliver_at(0, i64::MAX as u64).unwrap(), i64::MAX);
        for delay in [
            1u64 << 63,
            u64::MAX,
            i64::MAX as u64,
            (i64::MAX - now + 1) as u64,
        ] {
            assert!(deliver_at(now, delay).is_err(), "{delay}");
        }
    }

    #[test]
    fn deletions_default_to_a_dry_run() {
        let request: DeleteRequest = serde_json::from_str("{\"key\": \"k\"}").unwrap();
        assert!(request.dry_run);
        let request: DeleteRequest =
            serde_json::from_str("{\"key\": \"k\", \"dry_run\": false}").unwrap();
        assert!(!request.dry_run);
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor(None).unwrap(), (0, 0));
        assert_eq!(parse_cursor(Some(&"3:42".to_string())).unwrap(), (3, 42));
        assert!(parse_cursor(Some(&"3-42".to_string())).is_err());
    }
}
