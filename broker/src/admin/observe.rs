//! Looking at the broker: its info, a message's trace, per-minute
//! statistics, and the Prometheus exposition (counters from telemetry,
//! gauges read from the dispatcher at scrape time).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, Uri};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use dmq_log_store::MessageId;
use serde::Serialize;

use super::{
    blocking, query_map, query_param, shown, ApiError, ApiResult, ConnectionLimits, Refusal,
};
use crate::services::{now_ms, Services};
use crate::telemetry::{GaugeSnapshot, MinuteCounts, TraceEvent};

/// `development` or `production`.
pub(super) fn mode_name(services: &Services) -> &'static str {
    if services.config.development_mode() {
        "development"
    } else {
        "production"
    }
}

/// `GET /api/cluster`: this node's view of its cluster (404 on a single
/// node).
pub(super) async fn cluster(
    State(services): State<Services>,
) -> ApiResult<Json<crate::cluster::ClusterStatus>> {
    Ok(Json(cluster_of(&services)?.status()))
}

/// The cluster side of this broker; `404` on a single node.
fn cluster_of(services: &Services) -> ApiResult<&Arc<crate::cluster::Cluster>> {
    services.engine.cluster().ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "this broker runs as a single node (no [cluster] section)",
        )
    })
}

/// `POST /api/cluster/nodes/{node}/replace`: starts the replacement of a
/// node whose disk was lost (docs/replication.md).
pub(super) async fn replace_node(
    State(services): State<Services>,
    axum::extract::Path(node): axum::extract::Path<u64>,
) -> ApiResult<Json<serde_json::Value>> {
    let cluster = cluster_of(&services)?;
    let groups = cluster.replace_node(node).await?;
    Ok(Json(serde_json::json!({
        "node": node,
        "learner_of": groups,
        "next": format!(
            "start node {node} with an empty data directory: it fetches what it lacks and \
             becomes a voter of each group again once caught up"
        ),
    })))
}

/// The body of `POST /api/cluster/transfer-leader`: `group` and `to`,
/// `from` alone, or `balance` alone.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TransferLeader {
    /// The group (`meta`, `p/<topic>/<partition>`).
    group: Option<String>,
    /// The voter to lead it.
    to: Option<u64>,
    /// Every group this node leads moves to another voter.
    from: Option<u64>,
    /// The leaderships are spread over the voters.
    #[serde(default)]
    balance: bool,
}

/// `POST /api/cluster/transfer-leader`: hands one group's leadership to a
/// voter, every group one node leads to others, or spreads leaderships
/// over the voters (docs/replication.md).
pub(super) async fn transfer_leader(
    State(services): State<Services>,
    body: bytes::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let cluster = cluster_of(&services)?;
    let request: TransferLeader = super::parse_json(&body)?;
    let done = match request {
        TransferLeader {
            group: Some(group),
            to: Some(to),
            from: None,
            balance: false,
        } => {
            cluster.transfer_leader(&group, to).await?;
            crate::cluster::LeadersMoved {
                moved: vec![(group, to)],
                not_moved: Vec::new(),
            }
        }
        TransferLeader {
            group: None,
            to: None,
            from: Some(from),
            balance: false,
        } => cluster.move_leaders_off(from).await,
        TransferLeader {
            group: None,
            to: None,
            from: None,
            balance: true,
        } => cluster.balance_leaders().await,
        _ => {
            return Err(ApiError::bad_request(
                "give \"group\" and \"to\" (one group), \"from\" alone (every group it \
                 leads) or \"balance\": true alone",
            ))
        }
    };
    let moved: Vec<serde_json::Value> = done
        .moved
        .into_iter()
        .map(|(group, leader)| serde_json::json!({"group": group, "leader": leader}))
        .collect();
    if !done.not_moved.is_empty() {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not moved: {:?}; moved: {}",
                done.not_moved,
                serde_json::Value::from(moved)
            ),
        ));
    }
    Ok(Json(serde_json::json!({ "moved": moved })))
}

/// The body of `POST /api/cluster/nodes/{node}/add`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct AddNode {
    /// Its Raft address (host:port), as its peers reach it.
    raft: String,
    /// Its binary-protocol address (host:port), as clients reach it.
    client: String,
}

/// `POST /api/cluster/nodes/{node}/add`: adds a node new to the cluster
/// (docs/replication.md).
pub(super) async fn add_node(
    State(services): State<Services>,
    axum::extract::Path(node): axum::extract::Path<u64>,
    body: bytes::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let body: AddNode = super::parse_json(&body)?;
    let cluster = cluster_of(&services)?;
    let groups = cluster.add_node(node, &body.raft, &body.client).await?;
    Ok(Json(serde_json::json!({
        "node": node,
        "learner_of": groups,
        "next": format!(
            "start node {node} with an empty data directory and every node in its \
             [[cluster.peers]] (itself included): it fetches what the groups hold and becomes \
             a voter of each once caught up"
        ),
    })))
}

/// `POST /api/cluster/nodes/{node}/remove`: removes a node from the
/// cluster for good (docs/replication.md).
pub(super) async fn remove_node(
    State(services): State<Services>,
    axum::extract::Path(node): axum::extract::Path<u64>,
) -> ApiResult<Json<serde_json::Value>> {
    let cluster = cluster_of(&services)?;
    let groups = cluster.remove_node(node).await?;
    Ok(Json(serde_json::json!({
        "node": node,
        "removed_from": groups,
        "next": format!(
            "node {node} stops once it learns of its removal and may not start again: delete \
             its data directory and take it out of every node's [[cluster.peers]]"
        ),
    })))
}

pub(super) async fn info(State(services): State<Services>) -> ApiResult<Json<serde_json::Value>> {
    let pending_delays = services
        .engine
        .call(|dispatcher, _| dispatcher.pending_delays())
        .await?;
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": mode_name(&services),
        "listen": services.protocol_addr.to_string(),
        "admin_listen": services.admin_addr.to_string(),
        "uptime_ms": services.started.elapsed().as_millis() as u64,
        "pending_delays": pending_delays,
        "trace": services.config.trace,
    })))
}

/// Parses a message id from a path or query.
/// What the broker set aside or found damaged when it started: topics and
/// groups the metadata replay quarantined, and partitions whose recovery
/// skipped damaged regions or cut a torn tail, or whose reads met damage
/// since. Empty lists mean healthy. `journal_tails_cut` (journals whose
/// last frame was cut at start: a write a crash interrupted, or a damaged
/// last frame, which cannot be told apart) is listed for information and
/// does not make the broker unhealthy: every crash during a write leaves
/// one.
pub(super) async fn health(State(services): State<Services>) -> ApiResult<Json<serde_json::Value>> {
    let (quarantined, damaged, tails_cut) = services
        .engine
        .call(|dispatcher, _| {
            (
                dispatcher.quarantined(),
                dispatcher.recovery_damage(),
                dispatcher.journal_tail_cuts(),
            )
        })
        .await?;
    let tails_cut: Vec<serde_json::Value> = tails_cut
        .into_iter()
        .map(|(journal, bytes)| serde_json::json!({"journal": journal, "bytes": bytes}))
        .collect();
    let damaged: Vec<serde_json::Value> = damaged
        .into_iter()
        .map(|(topic, partition, damage)| {
            serde_json::json!({
                "topic": topic,
                "partition": partition,
                "tail_bytes_cut": damage.tail_bytes_cut,
                "corrupt_regions": damage.corrupt_regions.iter().map(|region| serde_json::json!({
                    "segment_base_offset": region.segment_base_offset,
                    "position": region.position,
                    "len": region.len,
                    "first_lost_offset": region.first_lost_offset,
                    "next_readable_offset": region.next_readable_offset,
                    "error": region.error.to_string(),
                })).collect::<Vec<_>>(),
                "read_damage": damage.read_damage.iter().map(|found| serde_json::json!({
                    "segment_base_offset": found.segment_base_offset,
                    "position": found.position,
                    "offset": found.offset,
                    "next_readable_offset": found.next_readable_offset,
                    "error": found.error.to_string(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "healthy": quarantined.is_empty() && damaged.is_empty(),
        "quarantined": quarantined,
        "damaged_partitions": damaged,
        "journal_tails_cut": tails_cut,
    })))
}

pub(super) fn parse_id(text: &str) -> ApiResult<MessageId> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{} is not a message id (32 hexadecimal digits)",
            shown(text)
        ))
    })
}

#[derive(Serialize)]
struct Trace {
    message_id: String,
    events: Vec<TraceEvent>,
}

pub(super) async fn trace(
    State(services): State<Services>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id)?;
    let telemetry = services.engine.telemetry().clone();
    let events = blocking(move || {
        telemetry
            .trace(&id)
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    if events.is_empty() {
        return Err(ApiError::not_found(format!(
            "no trace of message {id} (unknown, or older than the trace retention)"
        )));
    }
    Ok(Json(serde_json::json!(Trace {
        message_id: id.to_string(),
        events,
    })))
}

/// Longest statistics window.
const MAX_STATS_MINUTES: u32 = 2880;

pub(super) async fn stats(
    State(services): State<Services>,
    uri: Uri,
) -> ApiResult<Json<serde_json::Value>> {
    let query = query_map(&uri)?;
    let minutes: u32 = query_param(&query, "minutes")?.unwrap_or(60);
    if !(1..=MAX_STATS_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!(
            "minutes must be 1 to {MAX_STATS_MINUTES}"
        )));
    }
    let topic = query.get("topic").filter(|t| !t.is_empty()).cloned();
    let group = query.get("group").filter(|g| !g.is_empty()).cloned();
    if let Some(topic) = &topic {
        if services.engine.find_topic(topic).await.is_none() {
            return Err(ApiError::not_found(format!(
                "unknown topic {}",
                shown(topic)
            )));
        }
    }
    let telemetry = services.engine.telemetry().clone();
    // It may wait (briefly) for the telemetry thread: not on an async thread.
    let series = blocking(move || {
        Ok(telemetry.stats(topic.as_deref(), group.as_deref(), minutes, now_ms()))
    })
    .await?;
    let totals = series
        .iter()
        .fold(MinuteCounts::default(), |sum, m| MinuteCounts {
            minute_ms: 0,
            produced: sum.produced + m.produced,
            delivered: sum.delivered + m.delivered,
            acked: sum.acked + m.acked,
            retried: sum.retried + m.retried,
            expired: sum.expired + m.expired,
            dead_lettered: sum.dead_lettered + m.dead_lettered,
        });
    let mut totals = serde_json::to_value(totals).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(map) = totals.as_object_mut() {
        map.remove("minute_ms");
    }
    Ok(Json(
        serde_json::json!({ "minutes": series, "totals": totals }),
    ))
}

pub(super) async fn metrics(
    State(services): State<Services>,
    connections: Option<Extension<Arc<ConnectionLimits>>>,
) -> ApiResult<impl IntoResponse> {
    let gauges = services
        .engine
        .call(|dispatcher, _| {
            let transactions = dispatcher.transaction_counts();
            let mut snapshot = GaugeSnapshot {
                pending_delays: dispatcher.pending_delays(),
                transactions,
                quarantined: dispatcher.quarantined().len() as u64,
                journal_tails_cut: dispatcher.journal_tail_cuts(),
                open_files: dmq_log_store::resources::open_files() as u64,
                mapped_segments: dmq_log_store::resources::mapped_segments() as u64,
                ..GaugeSnapshot::default()
            };
            for (topic, partition, damage) in dispatcher.recovery_damage() {
                snapshot.damage.push((
                    topic,
                    partition,
                    (damage.corrupt_regions.len() + damage.read_damage.len()) as u64,
                    damage.tail_bytes_cut,
                ));
            }
            for (topic, _) in dispatcher.topics() {
                if let Ok(logs) = dispatcher.partitions(&topic) {
                    let stored = logs.iter().map(|log| log.size_bytes()).sum();
                    let disk = logs.iter().map(|log| log.disk_bytes()).sum();
                    snapshot.topic_bytes.push((topic.clone(), stored, disk));
                }
                for (group, _) in dispatcher.groups(&topic) {
                    let Ok(stats) = dispatcher.group_stats(&topic, &group) else {
                        continue;
                    };
                    let lag: u64 = stats.iter().map(|s| s.lag).sum();
                    let oldest_ms = stats
                        .iter()
                        .filter_map(|s| s.oldest_unacked_age_ms)
                        .max()
                        .unwrap_or(0);
                    snapshot
                        .group_lag
                        .push((topic.clone(), group, lag, oldest_ms as f64 / 1000.0));
                }
            }
            snapshot
        })
        .await?;
    let mut text = services.engine.telemetry().render_metrics(&gauges);
    if let Some(Extension(connections)) = connections {
        insert_before_eof(&mut text, &admin_listener_metrics(&connections));
    }
    if let Some(cluster) = services.engine.cluster() {
        insert_before_eof(&mut text, &cluster.metrics());
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

/// The admin listener's own metrics: open connections, and connections
/// refused by a limit (per reason).
fn admin_listener_metrics(connections: &ConnectionLimits) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let mut registry = prometheus_client::registry::Registry::with_prefix("dmq");
    let open = Gauge::<i64>::default();
    open.set(i64::try_from(connections.open()).unwrap_or(i64::MAX));
    registry.register(
        "admin_connections",
        "Open connections to the admin listener",
        open,
    );
    let refused = Family::<Vec<(String, String)>, Counter>::default();
    for refusal in [Refusal::TooManyConnections, Refusal::TooManyFromAddress] {
        refused
            .get_or_create(&vec![("reason".to_string(), refusal.reason().to_string())])
            .inc_by(connections.refused(refusal));
    }
    registry.register(
        "admin_connections_rejected",
        "Admin connections closed at once because a connection limit was reached",
        refused,
    );
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode_registry(&mut text, &registry) {
        tracing::error!(%error, "rendering the admin listener metrics failed");
    }
    text
}

/// Inserts `more` before the exposition's closing `# EOF` line.
fn insert_before_eof(text: &mut String, more: &str) {
    match text.rfind("# EOF") {
        Some(at) => text.insert_str(at, more),
        None => text.push_str(more),
    }
}
