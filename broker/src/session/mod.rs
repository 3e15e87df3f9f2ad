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
//! On a cluster node, a connection subscribed to a cluster topic gets
//! `WrongNode` (id 0) and is closed when the node stops serving consumers
//! (`crate::consumer_lease`).
//!
//! # Rooms
//! This module holds the transport (reader loop, writer task, framing
//! limits) and dispatches each request; the handlers live by job:
//! `hello` (handshake and rights), `produce` (decode, hand to the produce
//! pipeline, reply), `consume` (subscribe, credit, fetch, ack, nack) and
//! `requests` (topics, groups and the other administrative requests).

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
use crate::config::BrokerConfig;
use crate::convert;
use crate::engine::{DeliverySink, Engine, Queued, WaitingFetch};
use crate::frame_limits;
use crate::produce::{Admitted, Origin, ProduceRequest};
use crate::registry::{Right, TopicStatus};
use crate::services::{Services, SharedRegistry};

mod consume;
mod hello;
mod produce;
mod requests;
mod transactions;

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
    /// Set once TXN_LISTEN made this connection a check-back listener.
    listener: Option<u64>,
    /// The transactional producers this connection registered (TXN_INIT):
    /// producer group → (producer id, epoch). Its transaction requests of
    /// those groups are refused once a newer instance registered.
    fences: std::collections::HashMap<String, (String, u32)>,
    /// Idempotent producer ids seen on this connection: the first batch of
    /// each may be a retry of one another connection (another node) took,
    /// and on a cluster topic is admitted once this node caught up
    /// (`crate::produce`).
    producers: std::collections::HashSet<u64>,
    /// Members subscribed to cluster topics: delivered to only while this
    /// node serves consumers (`crate::consumer_lease`).
    cluster_members: BTreeSet<MemberId>,
    /// Notified when this node stops serving consumers while the
    /// connection has cluster members: the connection is then closed with
    /// `WrongNode`.
    consumers_moved: Arc<tokio::sync::Notify>,
    /// The task watching the consumer lease for this connection.
    lease_watch: Option<tokio::task::JoinHandle<()>>,
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
        listener: None,
        fences: std::collections::HashMap::new(),
        producers: std::collections::HashSet::new(),
        cluster_members: BTreeSet::new(),
        consumers_moved: Arc::new(tokio::sync::Notify::new()),
        lease_watch: None,
    };
    let consumers_moved = Arc::clone(&session.consumers_moved);
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
            _ = consumers_moved.notified() => {
                if session.cluster_members.is_empty() {
                    continue;
                }
                let home = session.consumer_home_addr();
                session.send(Frame::error(0, ErrorCode::WrongNode, home)).await;
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
        if let Some(watch) = self.lease_watch.take() {
            watch.abort();
        }
        let members: Vec<MemberId> = std::mem::take(&mut self.members).into_iter().collect();
        let listener = self.listener.take();
        if members.is_empty() && listener.is_none() {
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
                if let Some(listener) = listener {
                    routes.unlisten(listener);
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
            Request::TxnListen(listen) => self.txn_listen(listen).await,
            Request::TxnInit(init) => self.txn_init(init).await,
            request @ (Request::TxnProduce(_)
            | Request::TxnProduceSeq(_)
            | Request::TxnEnd(_)
            | Request::TxnAck(_)) => {
                self.transaction(correlation_id, request).await;
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
