//! Topics and groups: the registry (create, approve, update, disable,
//! delete) and each group's per-partition state and seek. Approve and
//! disable follow the registry's status transitions
//! ([`TopicStatus::after`]); a forbidden one is a `409`.
//!
//! A topic is registered first and created on the dispatcher second; a
//! crash between the two is repaired at start (see `crate::topics`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dmq_dispatcher::{DeliveryMode, GroupConfig, PartitionStats, StartPosition};
use serde::{Deserialize, Serialize};

use super::{parse_json, shown, ApiError, ApiResult};
use crate::registry::{check_name_part, StatusAction, TopicRecord, TopicStatus};
use crate::services::{now_ms, Services};
use crate::topics::create_topic;

pub(super) fn routes() -> Router<Services> {
    Router::new()
        .route("/api/topics", get(list).post(create))
        .route(
            "/api/topics/{topic}",
            get(describe).patch(update).delete(delete),
        )
        .route("/api/topics/{topic}/approve", post(approve))
        .route("/api/topics/{topic}/disable", post(disable))
        .route("/api/topics/{topic}/groups", get(groups))
        .route("/api/topics/{topic}/groups/{group}/seek", post(seek))
}

/// The topic name `<environment>.<department>.<name>`, checked part by
/// part and whole against the dispatcher's rules before anything is
/// registered, so that a bad name is a 400, never a failed creation.
fn topic_name(environment: &str, department: &str, name: &str) -> ApiResult<String> {
    for (what, part) in [
        ("environment", environment),
        ("department", department),
        ("name", name),
    ] {
        check_name_part(what, part).map_err(|_| {
            ApiError::bad_request(format!(
                "{what} must be 1 to 40 of a-z 0-9 _ -, not {}",
                shown(part)
            ))
        })?;
    }
    let full = format!("{environment}.{department}.{name}");
    dmq_dispatcher::names::check_topic(&full).map_err(|error| {
        ApiError::bad_request(format!(
            "the topic name would be {} characters: {error}",
            full.len()
        ))
    })?;
    Ok(full)
}

async fn list(State(services): State<Services>) -> Json<Vec<TopicRecord>> {
    Json(
        services
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    environment: String,
    department: String,
    name: String,
    owner: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    business_use: String,
    partitions: Option<u32>,
    #[serde(default)]
    ordered: bool,
    retention_hours: Option<u64>,
    default_ttl_ms: Option<u64>,
    max_attempts: Option<u32>,
    ack_timeout_ms: Option<u64>,
    #[serde(default)]
    producers: Vec<String>,
    #[serde(default)]
    consumers: Vec<String>,
}

fn check_settings(
    retention_hours: Option<u64>,
    default_ttl_ms: Option<u64>,
    max_attempts: Option<u32>,
    ack_timeout_ms: Option<u64>,
    clients: &[&[String]],
) -> ApiResult<()> {
    if retention_hours == Some(0) {
        return Err(ApiError::bad_request(
            "retention_hours must be at least 1 (or null: keep forever)",
        ));
    }
    if default_ttl_ms == Some(0) {
        return Err(ApiError::bad_request(
            "default_ttl_ms must be at least 1 (or null: no TTL)",
        ));
    }
    if max_attempts == Some(0) {
        return Err(ApiError::bad_request("max_attempts must be at least 1"));
    }
    if ack_timeout_ms.is_some_and(|ms| ms < 100) {
        return Err(ApiError::bad_request("ack_timeout_ms must be at least 100"));
    }
    for id in clients.iter().flat_map(|list| list.iter()) {
        if id.is_empty() || id.len() > 100 || id.chars().any(char::is_whitespace) {
            return Err(ApiError::bad_request(format!(
                "client id {} must be 1 to 100 characters without spaces",
                shown(id)
            )));
        }
    }
    Ok(())
}

async fn create(
    State(services): State<Services>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TopicRecord>)> {
    let request: CreateTopic = parse_json(&body)?;
    let name = topic_name(&request.environment, &request.department, &request.name)?;
    if request.owner.trim().is_empty() {
        return Err(ApiError::bad_request("owner is required"));
    }
    // Its limits (1 to max_partitions_per_topic, the total, the disk) are
    // the dispatcher's: checked when the topic is created below.
    let partitions = request.partitions.unwrap_or(1);
    check_settings(
        request.retention_hours,
        request.default_ttl_ms,
        request.max_attempts,
        request.ack_timeout_ms,
        &[&request.producers, &request.consumers],
    )?;
    if services.engine.topic(&name).is_some() {
        return Err(ApiError::conflict(format!("topic {} exists", shown(&name))));
    }
    let defaults = GroupConfig::default();
    let now = now_ms();
    let record = TopicRecord {
        name: name.clone(),
        environment: request.environment,
        department: request.department,
        short_name: request.name,
        owner: request.owner,
        description: request.description,
        business_use: request.business_use,
        status: if services.config.development_mode() {
            TopicStatus::Approved
        } else {
            TopicStatus::Pending
        },
        partitions,
        ordered: request.ordered,
        retention_hours: request.retention_hours,
        default_ttl_ms: request.default_ttl_ms,
        max_attempts: request.max_attempts.unwrap_or(defaults.max_attempts),
        ack_timeout_ms: request.ack_timeout_ms.unwrap_or(defaults.ack_timeout_ms),
        producers: request.producers,
        consumers: request.consumers,
        created_ms: now,
        updated_ms: now,
    };
    services
        .registry
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(record.clone())?;
    if let Err(error) = create_topic(&services.engine, &name, partitions, record.ordered).await {
        // Undo the registration; if even that fails, the start-up
        // reconciliation creates the topic.
        let _ = services
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        return Err(ApiError::from(error));
    }
    // On a cluster node every node learns the whole record (the others
    // created the topic as pending, with no rights, until they do).
    if let Some(cluster) = services.engine.cluster() {
        if cluster.is_cluster_topic(&name) {
            if let Err(error) = cluster.publish_registry(&record).await {
                tracing::warn!(
                    topic = name,
                    %error,
                    "the topic's record did not reach the cluster: the other nodes hold it \
                     pending until the next change to it"
                );
            }
        }
    }
    tracing::info!(topic = name, status = ?record.status, "topic registered");
    Ok((StatusCode::CREATED, Json(record)))
}

#[derive(Serialize)]
struct PartitionInfo {
    partition: u32,
    start_offset: u64,
    end_offset: u64,
    size_bytes: u64,
    disk_bytes: u64,
}

#[derive(Serialize)]
struct GroupPartition {
    partition: u32,
    ack_floor: u64,
    cursor: u64,
    end_offset: u64,
    lag: u64,
    unacked: u64,
    in_flight: u64,
    oldest_unacked_age_ms: Option<u64>,
    delayed: u64,
}

impl From<PartitionStats> for GroupPartition {
    fn from(stats: PartitionStats) -> Self {
        GroupPartition {
            partition: stats.partition,
            ack_floor: stats.ack_floor,
            cursor: stats.cursor,
            end_offset: stats.end_offset,
            lag: stats.lag,
            unacked: stats.unacked,
            in_flight: stats.in_flight,
            oldest_unacked_age_ms: stats.oldest_unacked_age_ms,
            delayed: stats.delayed,
        }
    }
}

#[derive(Serialize)]
struct GroupInfo {
    name: String,
    mode: &'static str,
    dead_letter_topic: String,
    partitions: Vec<GroupPartition>,
}

#[derive(Serialize)]
struct TopicDetail {
    topic: Option<TopicRecord>,
    partitions: Vec<PartitionInfo>,
    groups: Vec<GroupInfo>,
}

/// Every group of `topic` with its per-partition state.
async fn group_infos(services: &Services, topic: &str) -> ApiResult<Vec<GroupInfo>> {
    let topic = topic.to_string();
    let infos = services
        .engine
        .call(move |dispatcher, _| {
            dispatcher.partitions(&topic)?;
            dispatcher
                .groups(&topic)
                .into_iter()
                .map(|(group, config)| {
                    let stats = dispatcher.group_stats(&topic, &group)?;
                    Ok(GroupInfo {
                        mode: match config.mode {
                            DeliveryMode::Clustering => "clustering",
                            DeliveryMode::Broadcast => "broadcast",
                        },
                        dead_letter_topic: config.dead_letter_topic_for(&topic, &group),
                        partitions: stats.into_iter().map(GroupPartition::from).collect(),
                        name: group,
                    })
                })
                .collect::<Result<Vec<_>, dmq_dispatcher::DispatchError>>()
        })
        .await??;
    Ok(infos)
}

async fn describe(
    State(services): State<Services>,
    Path(topic): Path<String>,
) -> ApiResult<Json<TopicDetail>> {
    let record = services
        .registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&topic)
        .cloned();
    let Some(crate::engine::TopicHandle { logs, .. }) = services.engine.find_topic(&topic).await
    else {
        return Err(ApiError::not_found(format!(
            "unknown topic {}",
            shown(&topic)
        )));
    };
    let partitions = logs
        .iter()
        .enumerate()
        .map(|(partition, log)| PartitionInfo {
            partition: partition as u32,
            start_offset: log.start_offset(),
            end_offset: log.end_offset(),
            size_bytes: log.size_bytes(),
            disk_bytes: log.disk_bytes(),
        })
        .collect();
    let groups = group_infos(&services, &topic).await?;
    Ok(Json(TopicDetail {
        topic: record,
        partitions,
        groups,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateTopic {
    owner: Option<String>,
    description: Option<String>,
    business_use: Option<String>,
    #[serde(default, deserialize_with = "some")]
    retention_hours: Option<Option<u64>>,
    #[serde(default, deserialize_with = "some")]
    default_ttl_ms: Option<Option<u64>>,
    max_attempts: Option<u32>,
    ack_timeout_ms: Option<u64>,
    producers: Option<Vec<String>>,
    consumers: Option<Vec<String>>,
}

/// A present field (even `null`) is `Some`: distinguishes "set to null"
/// from "not given".
fn some<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn registered(services: &Services, topic: &str) -> ApiResult<TopicRecord> {
    services
        .registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(topic)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("topic {} is not registered", shown(topic))))
}

async fn update(
    State(services): State<Services>,
    Path(topic): Path<String>,
    body: Bytes,
) -> ApiResult<Json<TopicRecord>> {
    registered(&services, &topic)?;
    let change: UpdateTopic = parse_json(&body)?;
    if change.owner.as_deref().is_some_and(|o| o.trim().is_empty()) {
        return Err(ApiError::bad_request("owner cannot be empty"));
    }
    check_settings(
        change.retention_hours.flatten(),
        change.default_ttl_ms.flatten(),
        change.max_attempts,
        change.ack_timeout_ms,
        &[
            change.producers.as_deref().unwrap_or_default(),
            change.consumers.as_deref().unwrap_or_default(),
        ],
    )?;
    let record = services
        .registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .preview_update(&topic, |record| {
            if let Some(owner) = change.owner {
                record.owner = owner;
            }
            if let Some(description) = change.description {
                record.description = description;
            }
            if let Some(business_use) = change.business_use {
                record.business_use = business_use;
            }
            if let Some(retention_hours) = change.retention_hours {
                record.retention_hours = retention_hours;
            }
            if let Some(default_ttl_ms) = change.default_ttl_ms {
                record.default_ttl_ms = default_ttl_ms;
            }
            if let Some(max_attempts) = change.max_attempts {
                record.max_attempts = max_attempts;
            }
            if let Some(ack_timeout_ms) = change.ack_timeout_ms {
                record.ack_timeout_ms = ack_timeout_ms;
            }
            if let Some(producers) = change.producers {
                record.producers = producers;
            }
            if let Some(consumers) = change.consumers {
                record.consumers = consumers;
            }
            record.updated_ms = now_ms();
        })?;
    save(&services, record).await.map(Json)
}

/// Writes `record` into the registry. A cluster topic's record is
/// replicated first (through the metadata group, answered once
/// committed), so every node applies it; if that fails nothing changes.
async fn save(services: &Services, record: TopicRecord) -> ApiResult<TopicRecord> {
    if let Some(cluster) = services.engine.cluster() {
        if cluster.is_cluster_topic(&record.name) {
            cluster.publish_registry(&record).await?;
        }
    }
    services
        .registry
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .put(record.clone())?;
    Ok(record)
}

/// Approve or disable: `404` for an unregistered topic, `409` when its
/// status forbids the action (the table of [`TopicStatus::after`]).
async fn change_status(
    services: &Services,
    topic: &str,
    action: StatusAction,
) -> ApiResult<TopicRecord> {
    let record = services
        .registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .preview_status(topic, action, now_ms())?;
    let record = save(services, record).await?;
    tracing::info!(topic, status = ?record.status, "topic status changed");
    Ok(record)
}

async fn approve(
    State(services): State<Services>,
    Path(topic): Path<String>,
) -> ApiResult<Json<TopicRecord>> {
    change_status(&services, &topic, StatusAction::Approve)
        .await
        .map(Json)
}

async fn disable(
    State(services): State<Services>,
    Path(topic): Path<String>,
) -> ApiResult<Json<TopicRecord>> {
    change_status(&services, &topic, StatusAction::Disable)
        .await
        .map(Json)
}

async fn delete(
    State(services): State<Services>,
    Path(topic): Path<String>,
) -> ApiResult<StatusCode> {
    let registered = services
        .registry
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&topic)
        .is_some();
    let exists = services.engine.find_topic(&topic).await.is_some();
    if !registered && !exists {
        return Err(ApiError::not_found(format!(
            "unknown topic {}",
            shown(&topic)
        )));
    }
    if exists {
        crate::topics::delete_topic(&services.engine, &services.registry, &topic).await?;
    }
    services
        .registry
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&topic)?;
    tracing::info!(topic, "topic deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn groups(
    State(services): State<Services>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Vec<GroupInfo>>> {
    if services.engine.find_topic(&topic).await.is_none() {
        return Err(ApiError::not_found(format!(
            "unknown topic {}",
            shown(&topic)
        )));
    }
    group_infos(&services, &topic).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Seek {
    to: String,
    value: Option<i64>,
    partition: Option<u32>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Serialize)]
struct SeekPartition {
    partition: u32,
    old_floor: u64,
    new_floor: u64,
    redelivered: u64,
    skipped: u64,
}

/// A cluster topic's groups are sought at the node serving consumers
/// (`crate::consumer_lease`): another node's copy of a group delivers
/// nothing, and a seek back there would never reach the one that does.
/// 409 elsewhere, naming that node's client address.
async fn served_here(services: &Services, topic: &str) -> ApiResult<()> {
    use crate::consumer_lease::ConsumerHome;
    let Some(cluster) = services.engine.cluster() else {
        return Ok(());
    };
    if !cluster.consumer_lease_enabled() || !cluster.is_cluster_topic(topic) {
        return Ok(());
    }
    match cluster
        .wait_consumer_home(std::time::Duration::from_secs(1))
        .await
    {
        ConsumerHome::Here => Ok(()),
        ConsumerHome::At(addr) => Err(ApiError::conflict(format!(
            "this node does not serve the consumers of cluster topics: seek through the node \
             that does (client address {addr})"
        ))),
        ConsumerHome::Unknown => Err(ApiError::conflict(
            "no node serves the consumers of cluster topics right now (an election): try again",
        )),
    }
}

async fn seek(
    State(services): State<Services>,
    Path((topic, group)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let seek: Seek = parse_json(&body)?;
    let value = || {
        seek.value.ok_or_else(|| {
            ApiError::bad_request(format!("\"to\": {} needs a value", shown(&seek.to)))
        })
    };
    let target = match seek.to.as_str() {
        "earliest" => StartPosition::Earliest,
        "latest" => StartPosition::Latest,
        "timestamp" => StartPosition::Timestamp(value()?),
        "offset" => StartPosition::Offset(
            u64::try_from(value()?).map_err(|_| ApiError::bad_request("offset must be >= 0"))?,
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "\"to\" must be earliest, latest, timestamp or offset, not {}",
                shown(other)
            )))
        }
    };
    let dry_run = seek.dry_run;
    let partition = seek.partition;
    served_here(&services, &topic).await?;
    let seeked = topic.clone();
    let report = services
        .engine
        .call(move |dispatcher, _| dispatcher.seek(&topic, &group, partition, target, dry_run))
        .await??;
    if let (Some(cluster), false) = (services.engine.cluster(), dry_run) {
        cluster.seek_replicated(&seeked).await?;
    }
    let partitions: Vec<SeekPartition> = report
        .into_iter()
        .map(|p| SeekPartition {
            partition: p.partition,
            old_floor: p.old_floor,
            new_floor: p.new_floor,
            redelivered: p.redelivered,
            skipped: p.skipped,
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "dry_run": dry_run, "partitions": partitions }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_fit_the_dispatcher() {
        assert_eq!(topic_name("prod", "pay", "paid").unwrap(), "prod.pay.paid");
        let forty = "a".repeat(40);
        let error = topic_name(&forty, &forty, &forty).unwrap_err();
        assert!(
            error.message.contains("122 characters"),
            "{}",
            error.message
        );
        let eighteen = "b".repeat(18);
        assert_eq!(topic_name(&forty, &forty, &eighteen).unwrap().len(), 100);
        assert!(topic_name("__x", "d", "n").is_err(), "reserved");
        assert!(topic_name("_x", "d", "n").is_ok());
        let error = topic_name(&"E".repeat(1000), "d", "n").unwrap_err();
        assert!(error.message.len() < 250, "{}", error.message);
    }
}
