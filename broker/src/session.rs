//! One client connection: framing, the HELLO handshake, and one handler per
//! request.
//!
//! A reader loop decodes frames (an oversize length is refused as soon as its
//! 4-byte prefix arrives, before the body is read); a writer task encodes the
//! frames queued for the connection (a bounded queue: a slow client stops
//! the reader, it does not grow the heap). Each subscription has a forwarder
//! task passing the dispatcher's batches of deliveries to that queue whole;
//! the writer encodes them as DELIVER pushes straight into its buffer.
//!
//! Rules: the first frame must be HELLO; a malformed frame gets an ERROR and
//! the connection is closed; requests may be pipelined and responses carry
//! their request's correlation id (produces complete in any order, but are
//! appended in request order). On disconnect the connection's members leave
//! their groups, so their in-flight messages go to other members at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dmq_dispatcher::{Delivery, MemberId, TopicConfig};
use dmq_log_store::{Clock, SystemClock};
use dmq_protocol::{
    self as wire, decode_frame_bytes, encode_frame, frame_len, Body, ErrorCode, ErrorResponse,
    Frame, Request, Response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::config::BrokerConfig;
use crate::convert;
use crate::engine::{DeliverySink, Engine, ProducerWindow, Queued};

/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Below this much free room the read buffer grows by a chunk first (a
/// full buffer would otherwise be read into 64 bytes at a time).
const READ_MIN_SPARE_BYTES: usize = 4096;
/// The writer writes out once its buffer holds this much.
const WRITE_COALESCE_BYTES: usize = 256 * 1024;

/// What the writer task sends: a frame, or a batch of one subscription's
/// deliveries (one DELIVER push each).
pub(crate) enum Outbound {
    Frame(Frame),
    Deliveries(Vec<Delivery>, Queued),
}

impl From<Frame> for Outbound {
    fn from(frame: Frame) -> Self {
        Outbound::Frame(frame)
    }
}

/// What every session shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) config: Arc<BrokerConfig>,
    pub(crate) producers: ProducerWindow,
}

struct Session {
    shared: Shared,
    peer: SocketAddr,
    outbound: mpsc::Sender<Outbound>,
    authenticated: bool,
    members: BTreeSet<MemberId>,
    clock: SystemClock,
}

/// Serves one connection until it closes, fails or the broker shuts down.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (outbound, mut queue) =
        mpsc::channel::<Outbound>(shared.config.connection_queue_frames.max(16));
    let writer_task = tokio::spawn(async move {
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        while let Some(item) = queue.recv().await {
            let mut next = Some(item);
            let mut items = 0;
            buffer.clear();
            while let Some(item) = next.take() {
                items += 1;
                match item {
                    Outbound::Frame(frame) => encode_into(&frame, &mut buffer),
                    Outbound::Deliveries(deliveries, queued) => {
                        let count = deliveries.len();
                        let mut failed = false;
                        for delivery in deliveries {
                            let push =
                                Frame::push(wire::Push::Deliver(convert::delivery(delivery)));
                            encode_into(&push, &mut buffer);
                            // A big batch goes out in pieces: the buffer
                            // stays about WRITE_COALESCE_BYTES.
                            if buffer.len() >= WRITE_COALESCE_BYTES {
                                failed = writer.write_all(&buffer).await.is_err();
                                buffer.clear();
                                if failed {
                                    break;
                                }
                            }
                        }
                        // Encoded: the batch no longer counts against the
                        // subscription's queue bound.
                        queued.release(count);
                        if failed {
                            return;
                        }
                    }
                }
                if items < 256 && buffer.len() < WRITE_COALESCE_BYTES {
                    next = queue.try_recv().ok();
                }
            }
            if writer.write_all(&buffer).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut session = Session {
        shared,
        peer,
        outbound,
        authenticated: false,
        members: BTreeSet::new(),
        clock: SystemClock,
    };
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let max_frame = session.shared.config.max_frame_bytes;
    'connection: loop {
        // Decode every whole frame in the buffer. A whole frame is cut off
        // the buffer and decoded without copying: record keys, values and
        // headers are slices of it all the way to the log append.
        loop {
            let decoded = match frame_len(&buffer, max_frame) {
                Ok(Some(total)) if buffer.len() >= total => {
                    let bytes = buffer.split_to(total).freeze();
                    decode_frame_bytes(&bytes, max_frame)
                }
                Ok(Some(total)) => {
                    // Room for the rest of this frame, read in large chunks.
                    buffer.reserve(total - buffer.len());
                    Ok(None)
                }
                Ok(None) => Ok(None),
                Err(error) => Err(error),
            };
            match decoded {
                Ok(Some((frame, _))) => {
                    if !session.handle(frame).await {
                        break 'connection;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(peer = %session.peer, %error, "bad frame; closing");
                    session
                        .send(Frame::error(0, error.code(), error.to_string()))
                        .await;
                    break 'connection;
                }
            }
        }
        if buffer.capacity() - buffer.len() < READ_MIN_SPARE_BYTES {
            buffer.reserve(READ_CHUNK_BYTES);
        }
        let timeout = if session.authenticated {
            session.shared.config.idle_timeout_ms
        } else {
            session.shared.config.handshake_timeout_ms
        };
        let read = tokio::select! {
            read = tokio::time::timeout(Duration::from_millis(timeout), reader.read_buf(&mut buffer)) => read,
            _ = shutdown.changed() => {
                session.send(Frame::error(0, ErrorCode::ShuttingDown, "the broker is shutting down")).await;
                break;
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => {
                let what = if session.authenticated {
                    "idle timeout"
                } else {
                    "no HELLO in time"
                };
                session
                    .send(Frame::error(0, ErrorCode::Timeout, what))
                    .await;
                break;
            }
        }
    }
    session.close().await;
    drop(session);
    let _ = writer_task.await;
}

fn encode_into(frame: &Frame, buffer: &mut BytesMut) {
    if let Err(error) = encode_frame(frame, buffer) {
        tracing::error!(%error, "cannot encode a frame");
    }
}

fn error_frame(correlation_id: u32, error: ErrorResponse) -> Frame {
    Frame::response(correlation_id, Response::Error(error))
}

impl Session {
    async fn send(&self, frame: Frame) {
        let _ = self.outbound.send(frame.into()).await;
    }

    async fn reply(&self, correlation_id: u32, response: Result<Response, ErrorResponse>) {
        let frame = match response {
            Ok(response) => Frame::response(correlation_id, response),
            Err(error) => error_frame(correlation_id, error),
        };
        self.send(frame).await;
    }

    /// The members of this connection leave their groups.
    async fn close(&mut self) {
        let members: Vec<MemberId> = std::mem::take(&mut self.members).into_iter().collect();
        if members.is_empty() {
            return;
        }
        let _ = self
            .shared
            .engine
            .call(move |dispatcher, routes| {
                for member in members {
                    routes.remove(member);
                    let _ = dispatcher.leave(member);
                }
            })
            .await;
    }

    /// Handles one frame; false closes the connection.
    async fn handle(&mut self, frame: Frame) -> bool {
        let correlation_id = frame.correlation_id;
        let request = match frame.body {
            Body::Request(request) => request,
            _ => {
                let error =
                    ErrorResponse::new(ErrorCode::InvalidRequest, "clients send requests only");
                self.send(error_frame(correlation_id, error)).await;
                return false;
            }
        };
        if !self.authenticated {
            return self.hello(correlation_id, request).await;
        }
        let result = match request {
            Request::Hello(_) => Err(ErrorResponse::new(
                ErrorCode::InvalidRequest,
                "HELLO was already sent",
            )),
            Request::Ping => Ok(Response::Pong),
            Request::Produce(produce) => {
                self.produce(correlation_id, produce).await;
                return true;
            }
            Request::Subscribe(subscribe) => self.subscribe(subscribe).await,
            Request::Unsubscribe(unsubscribe) => {
                self.unsubscribe(unsubscribe.subscription_id).await
            }
            Request::Credit(credit) => self.credit(credit).await,
            Request::Fetch(fetch) => self.fetch(fetch).await,
            Request::Ack(ack) => self.ack(ack).await,
            Request::Nack(nack) => self.nack(nack).await,
            request => self.admin(request).await,
        };
        self.reply(correlation_id, result).await;
        true
    }

    async fn hello(&mut self, correlation_id: u32, request: Request) -> bool {
        let Request::Hello(hello) = request else {
            let error = ErrorResponse::new(
                ErrorCode::NotAuthenticated,
                "the first request must be HELLO",
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        };
        let Some(version) = wire::negotiate_version(hello.min_version, hello.max_version) else {
            let error = ErrorResponse::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this broker speaks protocol versions {}..={}",
                    wire::MIN_PROTOCOL_VERSION,
                    wire::PROTOCOL_VERSION
                ),
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        };
        let config = &self.shared.config;
        if !config.development_mode() {
            let admitted = config
                .clients
                .get(&hello.client_id)
                .is_some_and(|secret| constant_time_eq(secret.as_bytes(), &hello.secret));
            if !admitted {
                tracing::warn!(peer = %self.peer, client = hello.client_id, "authentication failed");
                let error = ErrorResponse::new(
                    ErrorCode::AuthenticationFailed,
                    "unknown client id or wrong secret",
                );
                self.send(error_frame(correlation_id, error)).await;
                return false;
            }
        }
        self.authenticated = true;
        let response = Response::HelloOk(wire::HelloOk {
            version,
            max_frame_bytes: config.max_frame_bytes,
            broker_id: "dmqd".to_string(),
        });
        self.send(Frame::response(correlation_id, response)).await;
        true
    }

    /// Appends in request order now; answers once durable, from a task.
    async fn produce(&mut self, correlation_id: u32, produce: wire::Produce) {
        match self.start_produce(correlation_id, produce).await {
            Ok(()) => {}
            Err(error) => self.send(error_frame(correlation_id, error)).await,
        }
    }

    async fn start_produce(
        &mut self,
        correlation_id: u32,
        produce: wire::Produce,
    ) -> Result<(), ErrorResponse> {
        let engine = self.shared.engine.clone();
        let Some((topic_config, logs)) = engine.topic(&produce.topic) else {
            return Err(ErrorResponse::new(
                ErrorCode::UnknownTopic,
                format!("unknown topic {:?}", produce.topic),
            ));
        };
        if produce.records.is_empty() {
            return Err(ErrorResponse::new(
                ErrorCode::InvalidRequest,
                "a produce needs at least one record",
            ));
        }
        let partition = pick_partition(&engine, &topic_config, &produce)?;
        let dedup_key = produce
            .idempotence
            .map(|sequence| (produce.topic.clone(), partition, sequence.producer_id));
        if let (Some(key), Some(sequence)) = (&dedup_key, produce.idempotence) {
            let previous = {
                let window = self
                    .shared
                    .producers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                window.get(key).cloned()
            };
            if let Some((last, response)) = previous {
                if sequence.sequence == last {
                    let response = Response::ProduceOk(response);
                    self.send(Frame::response(correlation_id, response)).await;
                    return Ok(());
                }
                if sequence.sequence < last {
                    return Err(ErrorResponse::new(
                        ErrorCode::OutOfOrderSequence,
                        format!(
                            "sequence {} is older than the last one ({last})",
                            sequence.sequence
                        ),
                    ));
                }
            }
        }
        let now = self.clock.now_ms();
        let records: Vec<_> = produce
            .records
            .into_iter()
            .map(|record| convert::record_input(record, now))
            .collect();
        let topic = produce.topic;
        let outbound = self.outbound.clone();
        let producers = self.shared.producers.clone();
        let sequence = produce.idempotence.map(|s| (s.producer_id, s.sequence));
        if records
            .iter()
            .any(|r| r.deliver_at_ms.is_some_and(|due| due > now))
        {
            // Delayed records go to the delay store, on the dispatcher thread.
            let topic_for_job = topic.clone();
            let engine = engine.clone();
            tokio::spawn(async move {
                let result = engine
                    .call(move |dispatcher, _| {
                        dispatcher.produce(&topic_for_job, Some(partition), records)
                    })
                    .await;
                let response = match result {
                    Ok(Ok(produced)) => Ok(wire::ProduceOk {
                        records: produced
                            .into_iter()
                            .map(|p| wire::ProducedRecord {
                                partition: p.partition,
                                offset: p.offset,
                                message_id: convert::message_id(p.id),
                                deliver_at_ms: p.delayed_until_ms,
                            })
                            .collect(),
                    }),
                    Ok(Err(error)) => Err(convert::dispatch_error(&error)),
                    Err(error) => Err(convert::engine_error(&error)),
                };
                finish_produce(
                    correlation_id,
                    response,
                    &outbound,
                    &producers,
                    dedup_key,
                    sequence,
                )
                .await;
            });
            return Ok(());
        }
        let log = logs[partition as usize].clone();
        let (producer_id, producer_seq) = sequence.unwrap_or((0, 0));
        // The write itself is short (the writer lock and a pwrite); doing it
        // here keeps a connection's appends in request order.
        let appended =
            tokio::task::block_in_place(|| log.append_deferred(producer_id, producer_seq, records))
                .map_err(|error| convert::store_error(&error))?;
        tokio::spawn(async move {
            let log_for_wait = log.clone();
            let info = appended.clone();
            // No fsync to wait for (policy `Never` or `Interval`): no hop
            // to the blocking pool.
            let durable = if log_for_wait.durable_on_append() {
                Ok(log_for_wait.wait_durable(&info))
            } else {
                tokio::task::spawn_blocking(move || log_for_wait.wait_durable(&info)).await
            };
            let response = match durable {
                Ok(Ok(())) => {
                    engine.wake();
                    Ok(wire::ProduceOk {
                        records: appended
                            .ids
                            .iter()
                            .enumerate()
                            .map(|(i, id)| wire::ProducedRecord {
                                partition,
                                offset: Some(appended.base_offset + i as u64),
                                message_id: convert::message_id(*id),
                                deliver_at_ms: None,
                            })
                            .collect(),
                    })
                }
                Ok(Err(error)) => Err(convert::store_error(&error)),
                Err(_) => Err(ErrorResponse::new(
                    ErrorCode::InternalError,
                    "the append task failed",
                )),
            };
            finish_produce(
                correlation_id,
                response,
                &outbound,
                &producers,
                dedup_key,
                sequence,
            )
            .await;
        });
        Ok(())
    }

    async fn subscribe(&mut self, subscribe: wire::Subscribe) -> Result<Response, ErrorResponse> {
        let config = convert::group_config(&subscribe);
        let max_credit = self.shared.config.max_credit;
        let credit = subscribe.credit.min(max_credit);
        let (sink, mut deliveries, queued) = DeliverySink::new(max_credit as usize + 16);
        let wire::Subscribe {
            topic,
            group,
            member_name,
            ..
        } = subscribe;
        let result = self
            .shared
            .engine
            .call(
                move |dispatcher,
                      routes|
                      -> Result<(MemberId, u32), dmq_dispatcher::DispatchError> {
                    let existing = dispatcher
                        .groups(&topic)
                        .into_iter()
                        .find(|(name, _)| *name == group);
                    match existing {
                        // Joining an existing group keeps its settings and position.
                        Some(_) => {}
                        None => dispatcher.subscribe(&topic, &group, config)?,
                    }
                    let member = dispatcher.join(&topic, &group, &member_name)?;
                    dispatcher.add_credit(member, credit)?;
                    routes.insert(member, sink);
                    let partitions = dispatcher.partitions(&topic)?.len() as u32;
                    Ok((member, partitions))
                },
            )
            .await;
        let (member, partitions) = match result {
            Ok(Ok(ok)) => ok,
            Ok(Err(error)) => return Err(convert::dispatch_error(&error)),
            Err(error) => return Err(convert::engine_error(&error)),
        };
        self.members.insert(member);
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            while let Some(batch) = deliveries.recv().await {
                let count = batch.len();
                let item = Outbound::Deliveries(batch, queued.clone());
                if outbound.send(item).await.is_err() {
                    queued.release(count);
                    return;
                }
            }
        });
        Ok(Response::Subscribed(wire::Subscribed {
            subscription_id: member,
            partitions: (0..partitions).collect(),
        }))
    }

    fn owned(&self, member: MemberId) -> Result<(), ErrorResponse> {
        if self.members.contains(&member) {
            Ok(())
        } else {
            Err(ErrorResponse::new(
                ErrorCode::UnknownSubscription,
                format!("no subscription {member} on this connection"),
            ))
        }
    }

    async fn unsubscribe(&mut self, member: MemberId) -> Result<Response, ErrorResponse> {
        self.owned(member)?;
        self.members.remove(&member);
        self.run(move |dispatcher, routes| {
            routes.remove(member);
            dispatcher.leave(member)
        })
        .await?;
        Ok(Response::Ok)
    }

    async fn credit(&mut self, credit: wire::Credit) -> Result<Response, ErrorResponse> {
        self.owned(credit.subscription_id)?;
        let amount = credit.credit.min(self.shared.config.max_credit);
        self.run(move |dispatcher, _| dispatcher.add_credit(credit.subscription_id, amount))
            .await?;
        Ok(Response::Ok)
    }

    async fn fetch(&mut self, fetch: wire::Fetch) -> Result<Response, ErrorResponse> {
        self.owned(fetch.subscription_id)?;
        let max = fetch.max_messages.min(self.shared.config.max_credit);
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(fetch.max_wait_ms.min(60_000)));
        loop {
            let deliveries = self
                .run(move |dispatcher, _| dispatcher.fetch(fetch.subscription_id, max))
                .await?;
            if !deliveries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Response::Deliveries(wire::Deliveries {
                    deliveries: deliveries.into_iter().map(convert::delivery).collect(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn ack(&mut self, ack: wire::Ack) -> Result<Response, ErrorResponse> {
        self.owned(ack.subscription_id)?;
        self.run(move |dispatcher, _| {
            for position in &ack.messages {
                dispatcher.ack(ack.subscription_id, position.partition, position.offset)?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::Ok)
    }

    async fn nack(&mut self, nack: wire::Nack) -> Result<Response, ErrorResponse> {
        self.owned(nack.subscription_id)?;
        self.run(move |dispatcher, _| {
            for position in &nack.messages {
                dispatcher.nack(
                    nack.subscription_id,
                    position.partition,
                    position.offset,
                    nack.delay_ms,
                )?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::Ok)
    }

    /// Runs a fallible dispatcher call and maps its errors to the wire.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(
                &mut dmq_dispatcher::Dispatcher,
                &mut crate::engine::Routes,
            ) -> Result<T, dmq_dispatcher::DispatchError>
            + Send
            + 'static,
    ) -> Result<T, ErrorResponse> {
        match self.shared.engine.call(job).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(convert::dispatch_error(&error)),
            Err(error) => Err(convert::engine_error(&error)),
        }
    }

    async fn admin(&mut self, request: Request) -> Result<Response, ErrorResponse> {
        match request {
            Request::CreateTopic(create) => {
                let config = TopicConfig {
                    partitions: create.partitions.max(1),
                    ordered: create.ordered,
                };
                let name = create.name.clone();
                let logs = self
                    .run(move |dispatcher, _| {
                        dispatcher.create_topic(&create.name, config.clone())?;
                        dispatcher.partitions(&create.name)
                    })
                    .await?;
                self.shared.engine.register_topic(
                    name,
                    TopicConfig {
                        partitions: logs.len() as u32,
                        ordered: create.ordered,
                    },
                    logs,
                );
                Ok(Response::Ok)
            }
            Request::ListTopics => {
                let topics = self.run(|dispatcher, _| Ok(dispatcher.topics())).await?;
                Ok(Response::Topics(wire::Topics {
                    topics: topics
                        .into_iter()
                        .map(|(name, config)| wire::TopicSummary {
                            name,
                            partitions: config.partitions,
                            ordered: config.ordered,
                        })
                        .collect(),
                }))
            }
            Request::DescribeTopic(describe) => {
                let (config, logs) = self.shared.engine.topic(&describe.name).ok_or_else(|| {
                    ErrorResponse::new(
                        ErrorCode::UnknownTopic,
                        format!("unknown topic {:?}", describe.name),
                    )
                })?;
                let name = describe.name.clone();
                let groups = self
                    .run(move |dispatcher, _| Ok(dispatcher.groups(&name)))
                    .await?;
                Ok(Response::TopicDescription(wire::TopicDescription {
                    name: describe.name,
                    ordered: config.ordered,
                    partitions: logs
                        .iter()
                        .enumerate()
                        .map(|(p, log)| wire::PartitionInfo {
                            partition: p as u32,
                            start_offset: log.start_offset(),
                            end_offset: log.end_offset(),
                        })
                        .collect(),
                    groups: groups.into_iter().map(|(name, _)| name).collect(),
                }))
            }
            Request::ListGroups(list) => {
                let topic = list.topic.clone();
                let groups = self
                    .run(move |dispatcher, _| {
                        dispatcher.partitions(&topic)?;
                        Ok(dispatcher.groups(&topic))
                    })
                    .await?;
                Ok(Response::Groups(wire::Groups {
                    groups: groups
                        .into_iter()
                        .map(|(name, config)| convert::group_summary(name, &config))
                        .collect(),
                }))
            }
            Request::DescribeGroup(describe) => {
                let (topic, group) = (describe.topic.clone(), describe.group.clone());
                let (stats, mode) = self
                    .run(move |dispatcher, _| {
                        let mode = dispatcher
                            .groups(&topic)
                            .into_iter()
                            .find(|(name, _)| *name == group)
                            .map(|(_, config)| config.mode);
                        Ok((dispatcher.group_stats(&topic, &group)?, mode))
                    })
                    .await?;
                Ok(Response::GroupDescription(wire::GroupDescription {
                    topic: describe.topic,
                    group: describe.group,
                    mode: match mode {
                        Some(dmq_dispatcher::DeliveryMode::Broadcast) => {
                            wire::DeliveryMode::Broadcast
                        }
                        _ => wire::DeliveryMode::Clustering,
                    },
                    partitions: stats
                        .into_iter()
                        .map(|s| wire::GroupPartition {
                            partition: s.partition,
                            ack_floor: s.ack_floor,
                            end_offset: s.end_offset,
                            lag: s.lag,
                            unacked: s.unacked,
                            in_flight: s.in_flight,
                            oldest_unacked_age_ms: s.oldest_unacked_age_ms,
                            delayed: s.delayed,
                        })
                        .collect(),
                }))
            }
            Request::Seek(seek) => {
                let target = convert::start_position(seek.target);
                let dry_run = seek.dry_run;
                let report = self
                    .run(move |dispatcher, _| {
                        dispatcher.seek(&seek.topic, &seek.group, seek.partition, target, dry_run)
                    })
                    .await?;
                Ok(Response::SeekReport(wire::SeekReport {
                    dry_run,
                    partitions: report
                        .into_iter()
                        .map(|p| wire::SeekPartition {
                            partition: p.partition,
                            old_floor: p.old_floor,
                            new_floor: p.new_floor,
                            redelivered: p.redelivered,
                            skipped: p.skipped,
                        })
                        .collect(),
                }))
            }
            Request::CancelDelay(cancel) => {
                let id = dmq_log_store::MessageId(cancel.message_id.0);
                let cancelled = self
                    .run(move |dispatcher, _| dispatcher.cancel_delay(&id))
                    .await?;
                Ok(Response::CancelDelayOk(wire::CancelDelayOk { cancelled }))
            }
            Request::DeleteMessages(delete) => {
                let tombstone = convert::tombstone(delete.tombstone);
                self.run(move |dispatcher, _| dispatcher.delete(&delete.topic, tombstone))
                    .await?;
                Ok(Response::Ok)
            }
            Request::DeleteTopic(delete) => {
                let name = delete.name.clone();
                self.run(move |dispatcher, routes| {
                    let dropped = dispatcher.delete_topic(&delete.name)?;
                    for member in dropped {
                        routes.remove(member);
                    }
                    Ok(())
                })
                .await?;
                self.shared.engine.unregister_topic(&name);
                Ok(Response::Ok)
            }
            Request::DeleteGroup(delete) => {
                self.run(move |dispatcher, routes| {
                    let dropped = dispatcher.delete_group(&delete.topic, &delete.group)?;
                    for member in dropped {
                        routes.remove(member);
                    }
                    Ok(())
                })
                .await?;
                Ok(Response::Ok)
            }
            other => Err(ErrorResponse::new(
                ErrorCode::InvalidRequest,
                format!("unexpected request {:?}", other.opcode()),
            )),
        }
    }
}

async fn finish_produce(
    correlation_id: u32,
    response: Result<wire::ProduceOk, ErrorResponse>,
    outbound: &mpsc::Sender<Outbound>,
    producers: &ProducerWindow,
    dedup_key: Option<(String, u32, u64)>,
    sequence: Option<(u64, u64)>,
) {
    if let (Ok(ok), Some(key), Some((_, sequence))) = (&response, dedup_key, sequence) {
        producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (sequence, ok.clone()));
    }
    let frame = match response {
        Ok(ok) => Frame::response(correlation_id, Response::ProduceOk(ok)),
        Err(error) => error_frame(correlation_id, error),
    };
    let _ = outbound.send(frame.into()).await;
}

fn pick_partition(
    engine: &Engine,
    config: &TopicConfig,
    produce: &wire::Produce,
) -> Result<u32, ErrorResponse> {
    match produce.partition {
        Some(partition) if partition < config.partitions => Ok(partition),
        Some(partition) => Err(ErrorResponse::new(
            ErrorCode::UnknownPartition,
            format!(
                "topic {:?} has {} partitions, not {partition}",
                produce.topic, config.partitions
            ),
        )),
        None => match produce.records.first().and_then(|r| r.key.as_ref()) {
            Some(key) => Ok((dmq_log_store::key_hash(key) % u64::from(config.partitions)) as u32),
            None => Ok(engine.next_round_robin() % config.partitions),
        },
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
