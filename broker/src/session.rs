//! One client connection: framing, the HELLO handshake, and one handler per
//! request.
//!
//! A reader loop decodes frames (an oversize length is refused as soon as its
//! 4-byte prefix arrives, before the body is read); a writer task encodes the
//! frames queued for the connection (a bounded queue: a slow client stops
//! the reader, it does not grow the heap). Each subscription has a forwarder
//! task passing the dispatcher's batches of deliveries to that queue whole;
//! the writer encodes them as DELIVER pushes straight into its buffer.
//! No frame over `max_frame_bytes` leaves the writer (`frame_limits`): a
//! record too large is refused at PRODUCE, a FETCH answer stops before the
//! limit, and anything still over it is replaced by an ERROR (an answer) or
//! withheld (a DELIVER).
//!
//! Rules: the first frame must be HELLO; a frame that cannot be decoded
//! (malformed, oversize, unknown opcode) gets an ERROR with correlation id 0
//! and the connection is closed, and so do the handshake's refusals; every
//! other ERROR (InvalidRequest included) answers one frame and the
//! connection stays open; requests may be pipelined and responses carry
//! their request's correlation id (produces complete in any order, but are
//! appended in request order). On disconnect the connection's members leave
//! their groups, so their in-flight messages go to other members at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dmq_dispatcher::{Delivery, MemberId};
use dmq_log_store::{Clock, SystemClock};
use dmq_protocol::{
    self as wire, decode_frame_bytes, frame_len, Body, ErrorCode, ErrorResponse, Frame, Request,
    Response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::auth::{Credentials, Verdict};
use crate::broker::{Services, SharedRegistry};
use crate::config::BrokerConfig;
use crate::convert;
use crate::engine::{DeliverySink, Engine, Queued, WaitingFetch};
use crate::frame_limits;
use crate::produce::{self, Admitted, Origin, ProduceRequest};
use crate::registry::{Right, TopicStatus};

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
    pub(crate) registry: SharedRegistry,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) development: bool,
}

impl Shared {
    pub(crate) fn new(services: Services) -> Shared {
        Shared {
            development: services.config.development_mode(),
            engine: services.engine,
            config: services.config,
            registry: services.registry,
            credentials: services.credentials,
        }
    }
}

/// The client id used in development mode when HELLO names none.
pub(crate) const ANONYMOUS_CLIENT: &str = "anonymous";

struct Session {
    shared: Shared,
    peer: SocketAddr,
    outbound: mpsc::Sender<Outbound>,
    authenticated: bool,
    /// The client id HELLO authenticated (rights are checked against it).
    client_id: String,
    members: BTreeSet<MemberId>,
    clock: SystemClock,
    /// Produces whose answer is not yet queued (see [`Session::produce`]).
    inflight: Arc<Semaphore>,
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
    let max_frame_bytes = shared.config.max_frame_bytes;
    let engine = shared.engine.clone();
    let writer_task = tokio::spawn(async move {
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        while let Some(item) = queue.recv().await {
            let mut next = Some(item);
            let mut items = 0;
            buffer.clear();
            while let Some(item) = next.take() {
                items += 1;
                match item {
                    Outbound::Frame(frame) => {
                        frame_limits::encode_within(&frame, &mut buffer, max_frame_bytes);
                    }
                    Outbound::Deliveries(deliveries, queued) => {
                        let count = deliveries.len();
                        let mut failed = false;
                        let mut withheld = Vec::new();
                        for delivery in deliveries {
                            let member = delivery.member;
                            let push =
                                Frame::push(wire::Push::Deliver(convert::delivery(delivery)));
                            if !frame_limits::encode_within(&push, &mut buffer, max_frame_bytes) {
                                withheld.push(member);
                            }
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
                        frame_limits::give_back_credit(&engine, withheld);
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
    let inflight = Arc::new(Semaphore::new(
        shared.config.max_inflight_requests_per_connection.max(1),
    ));
    let mut session = Session {
        shared,
        peer,
        outbound,
        authenticated: false,
        client_id: String::new(),
        members: BTreeSet::new(),
        clock: SystemClock,
        inflight,
    };
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // Before HELLO a peer is unknown: its frames are small and its whole
    // handshake must fit one deadline that bytes do not extend.
    let handshake_deadline = tokio::time::Instant::now()
        + Duration::from_millis(session.shared.config.handshake_timeout_ms);
    'connection: loop {
        let max_frame = if session.authenticated {
            session.shared.config.max_frame_bytes
        } else {
            session
                .shared
                .config
                .max_frame_bytes_before_hello
                .min(session.shared.config.max_frame_bytes)
        };
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
                        .shared
                        .engine
                        .telemetry()
                        .connection_rejected("bad_frame");
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
        let deadline = if session.authenticated {
            tokio::time::Instant::now()
                + Duration::from_millis(session.shared.config.idle_timeout_ms)
        } else {
            handshake_deadline
        };
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, reader.read_buf(&mut buffer)) => read,
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
                    session
                        .shared
                        .engine
                        .telemetry()
                        .connection_rejected("handshake_timeout");
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
    ///
    /// Only the handshake refusals close it (PROTOCOL.md §4, §7): an
    /// InvalidRequest answers a frame that was decoded and read whole, so
    /// the stream is still in step and the connection stays open.
    async fn handle(&mut self, frame: Frame) -> bool {
        let correlation_id = frame.correlation_id;
        let request = match frame.body {
            Body::Request(request) => request,
            // A response or push opcode from a client: before HELLO_OK
            // like any request but HELLO and PING (refused, closed), after
            // it refused alone.
            _ if !self.authenticated => {
                let error = ErrorResponse::new(
                    ErrorCode::NotAuthenticated,
                    "the first request must be HELLO",
                );
                self.send(error_frame(correlation_id, error)).await;
                return false;
            }
            _ => {
                let error =
                    ErrorResponse::new(ErrorCode::InvalidRequest, "clients send requests only");
                self.send(error_frame(correlation_id, error)).await;
                return true;
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
        if let Request::Ping = request {
            // Allowed before HELLO (PROTOCOL.md §4): a liveness probe.
            self.send(Frame::response(correlation_id, Response::Pong))
                .await;
            return true;
        }
        let Request::Hello(hello) = request else {
            let error = ErrorResponse::new(
                ErrorCode::NotAuthenticated,
                "the first request must be HELLO",
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        };
        let Some(version) = wire::negotiate_version(hello.min_version, hello.max_version) else {
            self.shared
                .engine
                .telemetry()
                .connection_rejected("unsupported_version");
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
        if self.shared.development && !crate::auth::admits_anonymous(self.peer.ip()) {
            tracing::warn!(peer = %self.peer, "development mode: remote client refused");
            self.shared
                .engine
                .telemetry()
                .connection_rejected("authentication_failed");
            let error = ErrorResponse::new(
                ErrorCode::AuthenticationFailed,
                "development mode admits local clients only; configure [clients]",
            );
            self.send(error_frame(correlation_id, error)).await;
            return false;
        }
        if !self.shared.development {
            let credentials = Arc::clone(&self.shared.credentials);
            let address = self.peer.ip();
            let client_id = hello.client_id.clone();
            let secret = hello.secret.clone();
            // argon2 takes tens of milliseconds: not on an async thread.
            let verdict = tokio::task::spawn_blocking(move || {
                credentials.verify_client(address, &client_id, &secret)
            })
            .await
            .unwrap_or(Verdict::Refused);
            let message = match verdict {
                Verdict::Admitted => None,
                Verdict::Refused => Some("unknown client id or wrong secret"),
                Verdict::RateLimited => {
                    Some("too many failed attempts from this address; try again in a minute")
                }
            };
            if let Some(message) = message {
                tracing::warn!(peer = %self.peer, client = hello.client_id, ?verdict, "authentication failed");
                self.shared
                    .engine
                    .telemetry()
                    .connection_rejected("authentication_failed");
                let error = ErrorResponse::new(ErrorCode::AuthenticationFailed, message);
                self.send(error_frame(correlation_id, error)).await;
                return false;
            }
        }
        self.client_id = if hello.client_id.is_empty() {
            ANONYMOUS_CLIENT.to_string()
        } else {
            hello.client_id.clone()
        };
        self.authenticated = true;
        let config = &self.shared.config;
        let response = Response::HelloOk(wire::HelloOk {
            version,
            max_frame_bytes: config.max_frame_bytes,
            broker_id: "dmqd".to_string(),
        });
        self.send(Frame::response(correlation_id, response)).await;
        true
    }

    /// Appends in request order now; answers once durable, from a task.
    ///
    /// Each produce holds one of the connection's in-flight permits until
    /// its answer is queued for the writer: a client that sends produces
    /// but never reads the answers stops being read once
    /// `max_inflight_requests_per_connection` are waiting, so its memory
    /// is bounded by configuration, not by how much it sends.
    async fn produce(&mut self, correlation_id: u32, produce: wire::Produce) {
        let Ok(permit) = Arc::clone(&self.inflight).acquire_owned().await else {
            return;
        };
        match self.start_produce(correlation_id, produce, permit).await {
            Ok(()) => {}
            Err(error) => self.send(error_frame(correlation_id, error)).await,
        }
    }

    async fn start_produce(
        &mut self,
        correlation_id: u32,
        produce: wire::Produce,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), ErrorResponse> {
        // Rights first: a client without them learns nothing of the topic.
        let default_ttl_ms = match self.authorize(&produce.topic, Right::Produce).await? {
            Access::Granted { default_ttl_ms, .. } => default_ttl_ms,
            Access::Unregistered => None,
        };
        let now = self.clock.now_ms();
        let mut records: Vec<_> = produce
            .records
            .into_iter()
            .map(|record| convert::record_input(record, now))
            .collect();
        if let Some(ttl) = default_ttl_ms {
            for record in &mut records {
                if record.expire_at_ms.is_none() {
                    let from = record.deliver_at_ms.unwrap_or(now).max(now);
                    record.expire_at_ms = Some(from.saturating_add(ttl as i64));
                }
            }
        }
        let request = ProduceRequest {
            topic: produce.topic,
            partition: produce.partition,
            records,
            sequence: produce.idempotence.map(|s| (s.producer_id, s.sequence)),
            origin: Origin {
                client_id: self.client_id.clone(),
                peer: self.peer,
                received_ms: now,
            },
            max_frame_bytes: self.shared.config.max_frame_bytes,
        };
        match produce::admit(&self.shared.engine, request).await? {
            Admitted::Answered(answer) => {
                self.send(Frame::response(correlation_id, Response::ProduceOk(answer)))
                    .await;
            }
            Admitted::Pending(pending) => {
                let outbound = self.outbound.clone();
                tokio::spawn(async move {
                    let frame = match pending.answer().await {
                        Ok(answer) => Frame::response(correlation_id, Response::ProduceOk(answer)),
                        Err(error) => error_frame(correlation_id, error),
                    };
                    let _ = outbound.send(frame.into()).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, subscribe: wire::Subscribe) -> Result<Response, ErrorResponse> {
        let mut config = convert::group_config(&subscribe);
        if let Access::Granted {
            max_attempts,
            ack_timeout_ms,
            ..
        } = self.authorize(&subscribe.topic, Right::Consume).await?
        {
            // The topic's defaults, unless the subscription sets its own.
            if subscribe.settings.max_attempts.is_none() {
                config.max_attempts = max_attempts.unwrap_or(config.max_attempts);
            }
            if subscribe.settings.ack_timeout_ms.is_none() {
                config.ack_timeout_ms = ack_timeout_ms.unwrap_or(config.ack_timeout_ms);
            }
        }
        // A group writes its dead letters: a client may name a dead-letter
        // topic only where it may produce, and a derived one that is a
        // registered topic needs that right too (internal names are refused
        // by the dispatcher's name rules).
        let dead_letter = config.dead_letter_topic_for(&subscribe.topic, &subscribe.group);
        let registered = self
            .shared
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dead_letter)
            .is_some();
        if config.dead_letter_topic.is_some() || registered {
            if let Err(refused) = self.authorize(&dead_letter, Right::Produce).await {
                return Err(ErrorResponse::new(
                    refused.code,
                    format!(
                        "the group's dead-letter topic {}: {}",
                        dmq_dispatcher::names::shown(&dead_letter),
                        refused.message
                    ),
                ));
            }
        }
        let max_credit = self.shared.config.max_credit;
        let credit = subscribe.credit.min(max_credit);
        let (sink, mut deliveries, queued) = DeliverySink::new(max_credit as usize + 16);
        let wire::Subscribe {
            topic,
            group,
            member_name,
            settings,
            ..
        } = subscribe;
        let result = self
            .shared
            .engine
            .call(
                move |dispatcher, routes| -> Result<(MemberId, u32), ErrorResponse> {
                    let dispatch = |error| convert::dispatch_error(&error);
                    let existing = dispatcher
                        .groups(&topic)
                        .into_iter()
                        .find(|(name, _)| *name == group);
                    match existing {
                        // Joining an existing group keeps its settings and
                        // position; a setting given that differs is refused.
                        Some((_, existing)) => {
                            if let Some(field) = conflicting_setting(&settings, &config, &existing)
                            {
                                return Err(ErrorResponse::new(
                                    ErrorCode::GroupConfigConflict,
                                    format!(
                                        "group {} exists with another {field}; leave it unset \
                                         to join with the group's settings",
                                        dmq_dispatcher::names::shown(&group)
                                    ),
                                ));
                            }
                        }
                        None => dispatcher
                            .subscribe(&topic, &group, config)
                            .map_err(dispatch)?,
                    }
                    let member = dispatcher
                        .join(&topic, &group, &member_name)
                        .map_err(dispatch)?;
                    dispatcher.add_credit(member, credit).map_err(dispatch)?;
                    routes.insert(member, sink);
                    let partitions = dispatcher.partitions(&topic).map_err(dispatch)?.len() as u32;
                    Ok((member, partitions))
                },
            )
            .await;
        let (member, partitions) = match result {
            Ok(Ok(ok)) => ok,
            Ok(Err(error)) => return Err(error),
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
        let member = fetch.subscription_id;
        let max = fetch.max_messages.min(self.shared.config.max_credit);
        let max_frame_bytes = self.shared.config.max_frame_bytes;
        let wait = Duration::from_millis(u64::from(fetch.max_wait_ms.min(60_000)));
        let (reply, mut answer) = oneshot::channel();
        // Fetched now, or parked on the dispatcher thread until the member
        // has something (woken by whatever woke the dispatcher). Either way
        // the answer stops before max_frame_bytes (PROTOCOL.md §6.8).
        let now = self
            .run(move |dispatcher, routes| {
                let deliveries =
                    frame_limits::fetch_within(dispatcher, member, max, max_frame_bytes)?;
                if deliveries.is_empty() && !wait.is_zero() {
                    let waiting = WaitingFetch {
                        max,
                        max_frame_bytes,
                        reply,
                    };
                    routes.wait_fetch(member, waiting);
                }
                Ok(deliveries)
            })
            .await?;
        let deliveries = if !now.is_empty() || wait.is_zero() {
            now
        } else {
            match tokio::time::timeout(wait, &mut answer).await {
                Ok(Ok(deliveries)) => deliveries,
                // Replaced or the member left: nothing for this FETCH.
                Ok(Err(_)) => Vec::new(),
                Err(_) => {
                    let _ = self
                        .shared
                        .engine
                        .call(move |_, routes| routes.cancel_fetch(member))
                        .await;
                    // Answered just before the cancel: those are ours.
                    answer.try_recv().unwrap_or_default()
                }
            }
        };
        Ok(Response::Deliveries(wire::Deliveries { deliveries }))
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

    /// What the registry says of `right` on `topic` for this client. In
    /// development mode only the topic's status counts; in production the
    /// client must also be listed.
    fn registry_access(&self, topic: &str, right: Right) -> Result<Access, ErrorResponse> {
        let registry = self
            .shared
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Some(record) = registry.get(topic) else {
            return Ok(if self.shared.development {
                Access::WITHOUT_DEFAULTS
            } else {
                Access::Unregistered
            });
        };
        // In development mode every client holds every right; the status
        // still counts.
        let allowed = if self.shared.development {
            record.check_in_use()
        } else {
            registry.allows(topic, &self.client_id, right)
        };
        allowed.map_err(|message| ErrorResponse::new(ErrorCode::NotAuthorized, message))?;
        Ok(Access::Granted {
            default_ttl_ms: record.default_ttl_ms,
            max_attempts: Some(record.max_attempts),
            ack_timeout_ms: Some(record.ack_timeout_ms),
        })
    }

    /// Checks `right` on `topic`. A dead-letter topic is not registered:
    /// whoever may consume its source topic may consume it.
    async fn authorize(&self, topic: &str, right: Right) -> Result<Access, ErrorResponse> {
        match self.registry_access(topic, right)? {
            granted @ Access::Granted { .. } => Ok(granted),
            Access::Unregistered => {
                let refused = || {
                    ErrorResponse::new(
                        ErrorCode::NotAuthorized,
                        crate::registry::Registry::refusal(topic, &self.client_id, right),
                    )
                };
                if right != Right::Consume {
                    return Err(refused());
                }
                let name = topic.to_string();
                let source = self
                    .shared
                    .engine
                    .call(move |dispatcher, _| dead_letter_source(dispatcher, &name))
                    .await
                    .map_err(|error| convert::engine_error(&error))?;
                match source {
                    Some(source) => match self.registry_access(&source, Right::Consume)? {
                        Access::Granted { .. } => Ok(Access::WITHOUT_DEFAULTS),
                        Access::Unregistered => Err(refused()),
                    },
                    None => Err(refused()),
                }
            }
        }
    }

    /// Refuses `what` outside development mode: it is done through the
    /// admin API there.
    fn development_only(&self, what: &str) -> Result<(), ErrorResponse> {
        if self.shared.development {
            Ok(())
        } else {
            Err(ErrorResponse::new(
                ErrorCode::NotAuthorized,
                format!("{what} is done through the admin API (clients may not)"),
            ))
        }
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
                self.development_only("registering a topic")?;
                let name = create.name;
                let topic_config = crate::broker::create_topic(
                    &self.shared.engine,
                    &name,
                    create.partitions,
                    create.ordered,
                )
                .await
                .map_err(|error| convert::engine_error(&error))?;
                {
                    // Development mode: registered and approved at once.
                    let mut registry = self
                        .shared
                        .registry
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    if registry.get(&name).is_none() {
                        let record = crate::broker::adopted_record(
                            &name,
                            &topic_config,
                            TopicStatus::Approved,
                        );
                        registry.insert(record).map_err(|error| {
                            ErrorResponse::new(ErrorCode::StorageError, error.to_string())
                        })?;
                    }
                }
                Ok(Response::Ok)
            }
            Request::ListTopics => {
                let topics = self.run(|dispatcher, _| Ok(dispatcher.topics())).await?;
                let visible: Vec<_> = topics
                    .into_iter()
                    .filter(|(name, _)| {
                        self.shared.development
                            || [Right::Produce, Right::Consume].iter().any(|right| {
                                matches!(
                                    self.registry_access(name, *right),
                                    Ok(Access::Granted { .. })
                                )
                            })
                    })
                    .collect();
                Ok(Response::Topics(wire::Topics {
                    topics: visible
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
                if self
                    .authorize(&describe.name, Right::Consume)
                    .await
                    .is_err()
                {
                    self.authorize(&describe.name, Right::Produce).await?;
                }
                let found = self.shared.engine.find_topic(&describe.name).await;
                let crate::engine::TopicHandle { config, logs, .. } = found.ok_or_else(|| {
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
                self.authorize(&list.topic, Right::Consume).await?;
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
                        .map(|(name, config)| convert::group_summary(&list.topic, name, &config))
                        .collect(),
                }))
            }
            Request::DescribeGroup(describe) => {
                self.authorize(&describe.topic, Right::Consume).await?;
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
                self.authorize(&seek.topic, Right::Consume).await?;
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
                if !self.shared.development {
                    // Whoever may produce to the message's topic may cancel
                    // it; the topic comes from the message's trace.
                    let telemetry = self.shared.engine.telemetry().clone();
                    let topic = tokio::task::spawn_blocking(move || telemetry.trace(&id))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|events| {
                            events
                                .into_iter()
                                .find(|event| event.kind == "produced")
                                .map(|event| event.topic)
                        });
                    match topic {
                        Some(topic) => {
                            self.authorize(&topic, Right::Produce).await?;
                        }
                        None => {
                            return Err(ErrorResponse::new(
                                ErrorCode::NotAuthorized,
                                "no trace of this message: cannot tell its topic",
                            ))
                        }
                    }
                }
                let cancelled = self
                    .run(move |dispatcher, _| dispatcher.cancel_delay(&id))
                    .await?;
                Ok(Response::CancelDelayOk(wire::CancelDelayOk { cancelled }))
            }
            Request::DeleteMessages(delete) => {
                self.development_only("deleting messages")?;
                let tombstone = convert::tombstone(delete.tombstone);
                self.run(move |dispatcher, _| dispatcher.delete(&delete.topic, tombstone))
                    .await?;
                Ok(Response::Ok)
            }
            Request::DeleteTopic(delete) => {
                self.development_only("deleting a topic")?;
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
                self.shared
                    .registry
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name)
                    .map_err(|error| {
                        ErrorResponse::new(ErrorCode::StorageError, error.to_string())
                    })?;
                Ok(Response::Ok)
            }
            Request::DeleteGroup(delete) => {
                self.authorize(&delete.topic, Right::Consume).await?;
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

/// The first group setting SUBSCRIBE gives (`settings`, converted into
/// `requested`) that differs from the existing group's (PROTOCOL.md §6.5:
/// absent settings mean "unchanged").
fn conflicting_setting(
    settings: &wire::GroupSettings,
    requested: &dmq_dispatcher::GroupConfig,
    existing: &dmq_dispatcher::GroupConfig,
) -> Option<&'static str> {
    let differs = [
        (
            settings.ack_timeout_ms.is_some()
                && requested.ack_timeout_ms != existing.ack_timeout_ms,
            "ack_timeout_ms",
        ),
        (
            settings.max_attempts.is_some() && requested.max_attempts != existing.max_attempts,
            "max_attempts",
        ),
        (
            settings.backoff.is_some() && requested.backoff != existing.backoff,
            "backoff",
        ),
        (
            settings.max_unacked_per_partition.is_some()
                && requested.max_unacked_per_partition != existing.max_unacked_per_partition,
            "max_unacked_per_partition",
        ),
        (
            settings.rate_limit_per_second.is_some()
                && requested.rate_limit_per_second != existing.rate_limit_per_second,
            "rate_limit_per_second",
        ),
        (
            settings.dead_letter_topic.is_some()
                && requested.dead_letter_topic != existing.dead_letter_topic,
            "dead_letter_topic",
        ),
    ];
    differs
        .into_iter()
        .find_map(|(differs, field)| differs.then_some(field))
}

/// What a client may do with a topic, and the topic's defaults.
enum Access {
    Granted {
        default_ttl_ms: Option<u64>,
        max_attempts: Option<u32>,
        ack_timeout_ms: Option<u64>,
    },
    /// Not in the registry (production mode).
    Unregistered,
}

impl Access {
    /// Granted on a topic with no registry defaults (development mode's
    /// unregistered topics, dead-letter topics).
    const WITHOUT_DEFAULTS: Access = Access::Granted {
        default_ttl_ms: None,
        max_attempts: None,
        ack_timeout_ms: None,
    };
}

/// The topic whose group dead-letters into `topic`, if any.
fn dead_letter_source(dispatcher: &dmq_dispatcher::Dispatcher, topic: &str) -> Option<String> {
    dispatcher
        .dead_letter_topics()
        .into_iter()
        .find(|dead_letter| dead_letter.topic == topic)
        .map(|dead_letter| dead_letter.source_topic)
}
