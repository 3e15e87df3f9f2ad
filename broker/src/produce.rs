//! The produce pipeline: the one way records from outside the dispatcher
//! enter a topic (a client's PRODUCE, the admin test message, a dead-letter
//! resend).
//!
//! size check (every record fits the frames that will carry it) → route
//! (the topic's [`Router`](dmq_dispatcher::Router)) → dedup (the
//! idempotent producers' window and their batches in flight: a retry of
//! one waits for its answer; on a cluster topic a producer's first batch
//! on a connection waits for this node to catch up, see [`catch_up`]) →
//! append in request order → wait for durability → trace, wake the
//! dispatcher, answer.
//!
//! [`admit`] does the steps that must follow request order (route, dedup,
//! append) in the caller's task; the returned [`Pending`] does the rest, so
//! a connection may pipeline PRODUCEs while earlier ones wait for their
//! fsync, and appends from every connection share group commits. Immediate
//! records are appended here; delayed ones (deliver-at in the future) go to
//! the dispatcher's delay store.
//!
//! On a cluster node (`crate::cluster`), a cluster topic's parts are
//! proposed to their partitions' Raft groups instead (in request order, at
//! admission), and answered once committed on a quorum; its delayed
//! records are proposed to the cluster's timer group
//! (`dmq_replication::delays`), answered the same way.
//!
//! Invariants:
//! - nothing is answered before the fsync policy is met for every record of
//!   the batch;
//! - every path routes by the topic's one router (one round-robin counter
//!   per topic);
//! - a batch's `produced`/`stored` trace is recorded before the dispatcher
//!   is woken, so a trace never shows `delivered` before `stored`;
//! - the answer lists the records in request order.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use dmq_dispatcher::{names, PartitionLog};
use dmq_log_store::{AppendInfo, Clock, MessageId, RecordInput, SystemClock};
use dmq_protocol::{ErrorCode, ErrorResponse, ProduceOk, ProducedRecord};
use std::sync::Arc;

use crate::convert;
use crate::dedup::Seen;
use crate::engine::Engine;
use crate::telemetry::ProducedBatch;

/// One batch of records for one topic.
pub(crate) struct ProduceRequest {
    pub(crate) topic: String,
    /// An explicit partition for every record, or `None` to route.
    pub(crate) partition: Option<u32>,
    pub(crate) records: Vec<RecordInput>,
    /// An idempotent producer's (producer id, sequence).
    pub(crate) sequence: Option<(u64, u64)>,
    /// The first batch of this idempotent producer on its connection:
    /// maybe a retry of a batch another node took. On a cluster topic the
    /// node first catches up with every partition's commits
    /// ([`catch_up`]), so that the dedup window knows that batch.
    pub(crate) first_of_producer: bool,
    pub(crate) origin: Origin,
    /// The broker's frame limit, which bounds a record's size.
    pub(crate) max_frame_bytes: u32,
}

/// Who produced a batch, for its trace.
#[derive(Clone)]
pub(crate) struct Origin {
    pub(crate) client_id: String,
    pub(crate) peer: SocketAddr,
    pub(crate) received_ms: i64,
}

/// A batch past the ordered steps.
pub(crate) enum Admitted {
    /// A retried batch of an idempotent producer: its original answer.
    Answered(ProduceOk),
    /// Appended (delayed records not yet scheduled): await the answer.
    Pending(Pending),
}

type Answer = Result<ProduceOk, ErrorResponse>;

/// The rest of a batch's way: durability, the delay store, trace, answer.
pub(crate) struct Pending(Pin<Box<dyn Future<Output = Answer> + Send>>);

impl Pending {
    /// The batch's answer, once every record is durable (or scheduled).
    pub(crate) async fn answer(self) -> Answer {
        self.0.await
    }
}

/// Routes, deduplicates and appends `request` (see the module doc).
pub(crate) async fn admit(
    engine: &Engine,
    request: ProduceRequest,
) -> Result<Admitted, ErrorResponse> {
    let ProduceRequest {
        topic,
        partition,
        records,
        sequence,
        first_of_producer,
        origin,
        max_frame_bytes,
    } = request;
    // Every record fits the frames that will carry it (PROTOCOL.md §8; the
    // limit is no secret of the topic's).
    crate::frame_limits::check_record_inputs(&records, max_frame_bytes)?;
    let Some(handle) = engine.find_topic(&topic).await else {
        return Err(ErrorResponse::new(
            ErrorCode::UnknownTopic,
            format!("unknown topic {}", names::shown(&topic)),
        ));
    };
    if records.is_empty() {
        return Err(ErrorResponse::new(
            ErrorCode::InvalidRequest,
            "a produce needs at least one record",
        ));
    }
    names::check_headers(records.iter().map(|r| r.headers.as_slice()))
        .map_err(|refusal| ErrorResponse::new(ErrorCode::InvalidRequest, refusal))?;
    let routes = handle
        .router
        .route(partition, records.iter().map(|r| r.key.as_deref()))
        .map_err(|e| {
            ErrorResponse::new(
                ErrorCode::UnknownPartition,
                format!("topic {}: {e}", names::shown(&topic)),
            )
        })?;
    if first_of_producer && sequence.is_some() {
        if let Some(cluster) = engine.cluster() {
            if cluster.storage().is_replicated(&topic) {
                catch_up(cluster, &topic, handle.router.partitions()).await?;
            }
        }
    }
    let in_flight = match sequence {
        Some((producer, sequence)) => {
            match dedup(engine, &topic, producer, sequence, records.len()).await? {
                Dedup::Stored(answer) => return Ok(Admitted::Answered(answer)),
                Dedup::New(guard) => Some(guard),
            }
        }
        None => None,
    };
    let now = SystemClock.now_ms();
    let total = records.len();
    // Immediate records split by partition, each part in request order;
    // delayed ones with their place in the answer.
    let mut parts: Vec<(u32, Vec<usize>, Vec<RecordInput>)> = Vec::new();
    let mut delayed: Vec<(usize, u32, RecordInput)> = Vec::new();
    for (index, (record, route)) in records.into_iter().zip(routes).enumerate() {
        if record.deliver_at_ms.is_some_and(|due| due > now) {
            delayed.push((index, route, record));
            continue;
        }
        match parts.iter_mut().find(|(p, _, _)| *p == route) {
            Some((_, indexes, part)) => {
                indexes.push(index);
                part.push(record);
            }
            None => parts.push((route, vec![index], vec![record])),
        }
    }
    let (producer_id, producer_seq) = sequence.unwrap_or((0, 0));
    if let Some(cluster) = engine.cluster() {
        let storage = cluster.storage();
        if storage.is_replicated(&topic) {
            // The delayed records first: one that is refused fails the
            // batch before anything is proposed.
            let delayed = if delayed.is_empty() {
                None
            } else {
                // (place in the answer, partition, due) per record.
                let mut places = Vec::with_capacity(delayed.len());
                let mut routed = Vec::with_capacity(delayed.len());
                for (index, partition, record) in delayed {
                    places.push((index, partition, record.deliver_at_ms.unwrap_or(now)));
                    routed.push((partition, record));
                }
                let answer = cluster
                    .delays()
                    .propose(&topic, routed, now)
                    .map_err(|error| match error {
                        dmq_replication::delays::DelaysError::Invalid(why) => {
                            ErrorResponse::new(ErrorCode::InvalidRequest, why)
                        }
                        dmq_replication::delays::DelaysError::Store(error) => {
                            convert::store_error(&error)
                        }
                    })?;
                Some((places, answer))
            };
            // A Raft write per partition, proposed here (a leader appends
            // one connection's batches in request order), answered in the
            // pending part.
            let mut proposed = Vec::with_capacity(parts.len());
            for (partition, indexes, part) in parts {
                let replica = storage.replica(&topic, partition).ok_or_else(|| {
                    ErrorResponse::new(
                        ErrorCode::Unavailable,
                        format!(
                            "partition {partition} of cluster topic {} is not open on this node",
                            names::shown(&topic)
                        ),
                    )
                })?;
                let batch = dmq_log_store::BatchInput {
                    producer_id,
                    producer_seq,
                    records: part,
                };
                let proposed_at = std::time::Instant::now();
                let answer = replica.propose(&batch);
                proposed.push((partition, indexes, replica, proposed_at, answer));
            }
            let engine = engine.clone();
            return Ok(Admitted::Pending(Pending(Box::pin(async move {
                let mut appended: Appended = Vec::with_capacity(proposed.len());
                for (partition, indexes, replica, proposed_at, answer) in proposed {
                    let stored = answer.await.map_err(|error| convert::store_error(&error))?;
                    if let Some(cluster) = engine.cluster() {
                        cluster.note_commit_latency(proposed_at.elapsed());
                    }
                    appended.push(AppendedPart {
                        partition,
                        indexes,
                        log: replica as Arc<dyn PartitionLog>,
                        info: stored.info,
                        stored_before: stored.stored_before,
                    });
                }
                let mut scheduled = Vec::new();
                if let Some((places, answer)) = delayed {
                    let ids = answer.await.map_err(|error| convert::store_error(&error))?;
                    scheduled = places
                        .into_iter()
                        .zip(ids)
                        .map(|((index, partition, due), id)| Scheduled {
                            index,
                            partition,
                            due_ms: Some(due),
                            id,
                        })
                        .collect();
                }
                let answer = finish(
                    &engine,
                    &topic,
                    total,
                    appended,
                    DelayedPart::Scheduled(scheduled),
                    &origin,
                )
                .await;
                remember(&engine, topic, sequence, &answer);
                drop(in_flight);
                answer
            }))));
        }
    }
    // The writes themselves are short (the writer lock and a pwrite);
    // doing them in the caller's task keeps its appends in request order.
    let appended = blocking_in_place(|| {
        parts
            .into_iter()
            .map(|(partition, indexes, part)| {
                let log = Arc::clone(&handle.logs[partition as usize]);
                log.append_deferred(producer_id, producer_seq, part)
                    .map(|info| AppendedPart {
                        partition,
                        indexes,
                        log,
                        info,
                        stored_before: false,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|error| convert::store_error(&error))?;
    let engine = engine.clone();
    Ok(Admitted::Pending(Pending(Box::pin(async move {
        let answer = finish(
            &engine,
            &topic,
            total,
            appended,
            DelayedPart::Local(delayed),
            &origin,
        )
        .await;
        remember(&engine, topic, sequence, &answer);
        drop(in_flight);
        answer
    }))))
}

/// Waits until this node applied everything committed in each partition of
/// cluster topic `topic` (`GroupNode::catch_up`, all at once). Before the
/// first batch of an idempotent producer on a connection: it may be a
/// retry of a batch another node took (the producer's connection to it
/// dropped, or it died), which this node's dedup window knows once its
/// replicas applied it (`engine::learn_committed_producer_batches`). Once
/// per producer and connection, since a later batch on the same connection
/// is a retry only of batches this node took itself. Also before a
/// deletion of a cluster topic's messages: its bounds (each partition's
/// end) are then the cluster's, not a lagging replica's.
pub(crate) async fn catch_up(
    cluster: &crate::cluster::Cluster,
    topic: &str,
    partitions: u32,
) -> Result<(), ErrorResponse> {
    let mut waits = tokio::task::JoinSet::new();
    for partition in 0..partitions {
        if let Some(replica) = cluster.storage().replica(topic, partition) {
            waits.spawn(async move { replica.node().catch_up().await });
        }
    }
    while let Some(waited) = waits.join_next().await {
        let failed = match waited {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        return Err(ErrorResponse::new(
            ErrorCode::Unavailable,
            format!(
                "topic {}: this node could not catch up with its partitions' commits: \
                 {failed}; retry",
                names::shown(topic)
            ),
        ));
    }
    Ok(())
}

/// What the dedup step found of an idempotent batch.
enum Dedup {
    /// Stored before: its original answer.
    Stored(ProduceOk),
    /// New: admitted, and in flight until the guard drops.
    New(InFlightGuard),
}

/// The dedup step of `sequence` of `producer` on `topic`, a batch of
/// `records` records. The in-flight batches are looked at first, then the
/// window: an original that completes meanwhile is in the window before it
/// leaves them. A retry of a batch still in flight here (its connection
/// dropped while it waited for durability) waits for its answer.
async fn dedup(
    engine: &Engine,
    topic: &str,
    producer: u64,
    sequence: u64,
    records: usize,
) -> Result<Dedup, ErrorResponse> {
    let key = (topic.to_string(), producer, sequence);
    loop {
        let mut original = {
            let mut admitted = engine.in_flight().lock();
            match admitted.get(&key) {
                Some(original) => original.clone(),
                None => {
                    let window = engine.producers().lock().unwrap_or_else(|p| p.into_inner());
                    return match window.check(&(topic.to_string(), producer), sequence, records) {
                        Seen::Stored(answer) => Ok(Dedup::Stored(answer)),
                        Seen::New => Ok(Dedup::New(InFlightGuard::admit(
                            engine.in_flight(),
                            &mut admitted,
                            key,
                        ))),
                        Seen::TooOld { floor } => Err(ErrorResponse::new(
                            ErrorCode::OutOfOrderSequence,
                            format!(
                                "sequence {sequence} is older than the oldest this broker can \
                                 tell apart ({floor}): it may or may not be stored"
                            ),
                        )),
                    };
                }
            }
        };
        let _ = tokio::time::timeout(IN_FLIGHT_WAIT, original.changed()).await;
    }
}

/// How long a retry waits for the answer of its original, still in flight
/// on this node, before it looks again.
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Idempotent batches admitted on this node and not yet answered, by
/// (topic, producer id, sequence): a retry of one (its connection dropped
/// while it waited for durability or its quorum) waits for its answer and
/// is then answered from the dedup window, instead of being stored again.
#[derive(Default)]
pub(crate) struct InFlightSequences(
    std::sync::Mutex<
        std::collections::HashMap<(String, u64, u64), tokio::sync::watch::Receiver<()>>,
    >,
);

type InFlightMap = std::collections::HashMap<(String, u64, u64), tokio::sync::watch::Receiver<()>>;

impl InFlightSequences {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One admitted batch in [`InFlightSequences`]: dropped once its answer is
/// in the window (or it failed), it leaves them and wakes its retries.
struct InFlightGuard {
    sequences: Arc<InFlightSequences>,
    key: (String, u64, u64),
    _answered: tokio::sync::watch::Sender<()>,
}

impl InFlightGuard {
    fn admit(
        sequences: &Arc<InFlightSequences>,
        admitted: &mut InFlightMap,
        key: (String, u64, u64),
    ) -> InFlightGuard {
        let (answered, waiting) = tokio::sync::watch::channel(());
        admitted.insert(key.clone(), waiting);
        InFlightGuard {
            sequences: Arc::clone(sequences),
            key,
            _answered: answered,
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.sequences.lock().remove(&self.key);
    }
}

/// Puts an idempotent producer's answer in the dedup window.
fn remember(engine: &Engine, topic: String, sequence: Option<(u64, u64)>, answer: &Answer) {
    if let (Ok(answer), Some((producer, sequence))) = (answer, sequence) {
        engine
            .producers()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic, producer), sequence, answer.clone());
    }
}

/// Routes, deduplicates, appends and waits: [`admit`] and
/// [`Pending::answer`] in one call, for callers that produce one batch at
/// a time (the admin API).
pub(crate) async fn produce(engine: &Engine, request: ProduceRequest) -> Answer {
    match admit(engine, request).await? {
        Admitted::Answered(answer) => Ok(answer),
        Admitted::Pending(pending) => pending.answer().await,
    }
}

type Appended = Vec<AppendedPart>;

/// The part of a batch stored in one partition.
struct AppendedPart {
    partition: u32,
    /// The part's records' places in the batch.
    indexes: Vec<usize>,
    log: Arc<dyn PartitionLog>,
    info: AppendInfo,
    /// Stored by an earlier try of the same idempotent batch (a cluster
    /// partition's leader found it in its log): answered with it, but not
    /// traced or counted as produced again.
    stored_before: bool,
}

/// A batch's delayed records: for the node's dispatcher to schedule
/// (index in the batch, partition, record), or scheduled already (in a
/// cluster's timer group).
enum DelayedPart {
    Local(Vec<(usize, u32, RecordInput)>),
    Scheduled(Vec<Scheduled>),
}

/// A delayed record scheduled: its place in the answer.
struct Scheduled {
    index: usize,
    partition: u32,
    due_ms: Option<i64>,
    id: MessageId,
}

async fn finish(
    engine: &Engine,
    topic: &str,
    total: usize,
    appended: Appended,
    delayed: DelayedPart,
    origin: &Origin,
) -> Answer {
    let waits: Vec<_> = appended
        .iter()
        .map(|part| (Arc::clone(&part.log), part.info.clone()))
        .collect();
    // No fsync to wait for (policy `Never` or `Interval`): no hop to the
    // blocking pool.
    let durable = if waits.iter().all(|(log, _)| log.durable_on_append()) {
        waits
            .iter()
            .try_for_each(|(log, info)| log.wait_durable(info))
    } else {
        tokio::task::spawn_blocking(move || {
            waits
                .iter()
                .try_for_each(|(log, info)| log.wait_durable(info))
        })
        .await
        .map_err(|_| ErrorResponse::new(ErrorCode::InternalError, "the durability wait failed"))?
    };
    durable.map_err(|error| convert::store_error(&error))?;
    let mut answer: Vec<Option<ProducedRecord>> = vec![None; total];
    for AppendedPart {
        partition,
        indexes,
        info,
        stored_before,
        ..
    } in &appended
    {
        // Traced before the dispatcher hears of it: `stored` precedes
        // `delivered`.
        if !stored_before {
            trace(
                engine,
                topic,
                *partition,
                Some(info.base_offset),
                info.ids.clone(),
                origin,
            );
        }
        for (i, (index, id)) in indexes.iter().zip(&info.ids).enumerate() {
            answer[*index] = Some(ProducedRecord {
                partition: *partition,
                offset: Some(info.base_offset + i as u64),
                message_id: convert::message_id(*id),
                deliver_at_ms: None,
            });
        }
    }
    if !appended.is_empty() {
        engine.wake();
    }
    let scheduled = match delayed {
        DelayedPart::Local(delayed) => schedule_here(engine, topic, delayed).await?,
        DelayedPart::Scheduled(scheduled) => scheduled,
    };
    let mut by_partition: Vec<(u32, Vec<MessageId>)> = Vec::new();
    for Scheduled {
        index,
        partition,
        due_ms,
        id,
    } in scheduled
    {
        match by_partition.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, ids)) => ids.push(id),
            None => by_partition.push((partition, vec![id])),
        }
        answer[index] = Some(ProducedRecord {
            partition,
            offset: None,
            message_id: convert::message_id(id),
            deliver_at_ms: due_ms,
        });
    }
    for (partition, ids) in by_partition {
        trace(engine, topic, partition, None, ids, origin);
    }
    Ok(ProduceOk {
        records: answer.into_iter().flatten().collect(),
    })
}

/// Schedules delayed records in the node's dispatcher's delay store.
async fn schedule_here(
    engine: &Engine,
    topic: &str,
    delayed: Vec<(usize, u32, RecordInput)>,
) -> Result<Vec<Scheduled>, ErrorResponse> {
    if delayed.is_empty() {
        return Ok(Vec::new());
    }
    let (indexes, routed): (Vec<usize>, Vec<(u32, RecordInput)>) = delayed
        .into_iter()
        .map(|(index, partition, record)| (index, (partition, record)))
        .unzip();
    let name = topic.to_string();
    // The dispatcher appends to the timer log in call order and answers
    // once the append is durable, waited for by its writer thread: the
    // dispatcher's thread never waits for this fdatasync.
    let (reply, scheduled) = tokio::sync::oneshot::channel();
    engine
        .call(move |dispatcher, _| {
            dispatcher.schedule_delayed(
                &name,
                routed,
                Box::new(move |result| {
                    let _ = reply.send(result);
                }),
            )
        })
        .await
        .map_err(|error| convert::engine_error(&error))?;
    let scheduled = scheduled
        .await
        .map_err(|_| convert::engine_error(&crate::engine::EngineError::ShuttingDown))?
        .map_err(|error| convert::dispatch_error(&error))?;
    Ok(indexes
        .into_iter()
        .zip(scheduled)
        .map(|(index, produced)| Scheduled {
            index,
            partition: produced.partition,
            due_ms: produced.delayed_until_ms,
            id: produced.id,
        })
        .collect())
}

fn trace(
    engine: &Engine,
    topic: &str,
    partition: u32,
    base_offset: Option<u64>,
    ids: Vec<MessageId>,
    origin: &Origin,
) {
    engine.telemetry().produced(ProducedBatch {
        topic: topic.to_string(),
        partition,
        base_offset,
        ids,
        client_id: origin.client_id.clone(),
        peer: origin.peer,
        received_ms: origin.received_ms,
        stored_ms: SystemClock.now_ms(),
    });
}

/// Runs a short blocking step on this task's thread, telling a
/// multi-threaded runtime to move its other tasks away meanwhile.
fn blocking_in_place<T>(step: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(step),
        _ => step(),
    }
}
