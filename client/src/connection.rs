//! One TCP connection to the broker and the task that keeps one open.
//!
//! [`Conn`] is a live, handshaken connection: a writer task drains a bounded
//! queue of encoded frames into the socket (coalescing them into large
//! writes), a reader task decodes frames and completes the waiting request
//! by correlation id (a map correlation id → oneshot) or routes a DELIVER
//! push to its subscription's channel. Any number of requests may be in
//! flight (pipelining).
//!
//! The supervisor task ([`supervise`]) owns the reconnect policy: when the
//! connection drops, every request in flight fails with
//! [`ClientError::ConnectionLost`], the supervisor reconnects with capped
//! exponential backoff, re-sends SUBSCRIBE for every open subscription, and
//! only then publishes the new connection to callers. A connection that
//! ends before it lived `reconnect_backoff_max` counts as a failed attempt
//! (the backoff keeps growing), so a broker that accepts and drops at once
//! is never retried in a tight loop.
//!
//! The reader accepts every frame up to the larger of
//! `ClientOptions::max_frame_bytes` and the `max_frame_bytes` the broker
//! announced in HELLO_OK (it sends nothing larger). A frame it still cannot
//! decode ends the connection **and every subscription**, whose stream
//! yields [`ClientError::Protocol`]: the broker would send the same frame
//! again after a reconnect (a redelivery), so retrying would only spin and
//! spend the message's delivery attempts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dmq_protocol::{
    decode_frame_bytes, encode_frame, frame_len, Body, Delivery, ErrorCode, Frame, Hello, HelloOk,
    Push, Request, Response, WireError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::consumer::SubShared;
use crate::error::{ClientError, Result};
use crate::options::ClientOptions;

/// Largest write the writer task assembles from queued frames.
const WRITE_COALESCE_BYTES: usize = 256 * 1024;
/// Frames at least this large are written without copying them into the
/// coalescing buffer.
const DIRECT_WRITE_BYTES: usize = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Locks a mutex, ignoring poisoning (the data stays consistent: every
/// critical section here is a map insert or remove).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The answer to one request, as the reader task hands it over.
pub(crate) type Reply = Result<Response>;

/// A request waiting for its response.
struct PendingRequest {
    reply: oneshot::Sender<Reply>,
    /// For SUBSCRIBE: the subscription to route DELIVERs to once SUBSCRIBED
    /// arrives (the route is installed before any push can be read).
    subscription: Option<Arc<SubShared>>,
}

struct PendingMap {
    /// False once the connection is dead: no new request may wait.
    open: bool,
    map: HashMap<u32, PendingRequest>,
}

/// A live connection after a successful HELLO.
pub(crate) struct Conn {
    writer: mpsc::Sender<Bytes>,
    pending: Mutex<PendingMap>,
    routes: Mutex<HashMap<u64, Arc<SubShared>>>,
    /// Where TXN_CHECK pushes go, by producer group (see
    /// [`crate::transaction::TransactionChecks`]).
    checks: Mutex<Vec<CheckListener>>,
    next_correlation: AtomicU32,
    /// The broker's HELLO_OK.
    pub(crate) hello: HelloOk,
    /// Set when the broker said consumers are served at another node
    /// (`WrongNode`): the address to connect to next.
    redirect: Mutex<Option<String>>,
    /// Notified to end this connection (the supervisor reconnects).
    reconnect: tokio::sync::Notify,
}

impl Conn {
    /// Encodes and queues `request`; the receiver yields its response.
    /// Returns once the frame is queued for the socket, so requests started
    /// one after the other go out in that order.
    pub(crate) async fn start(
        &self,
        request: Request,
        subscription: Option<Arc<SubShared>>,
    ) -> Result<oneshot::Receiver<Reply>> {
        self.start_with_capacity(request, subscription, 0).await
    }

    /// [`Conn::start`], encoding into a buffer of `capacity` bytes (an
    /// estimate of the frame's size saves regrowing a large one).
    pub(crate) async fn start_with_capacity(
        &self,
        request: Request,
        subscription: Option<Arc<SubShared>>,
        capacity: usize,
    ) -> Result<oneshot::Receiver<Reply>> {
        let correlation_id = self.next_correlation_id();
        let mut buf = BytesMut::with_capacity(capacity);
        let bytes = encode_frame(&Frame::request(correlation_id, request), &mut buf)?;
        if bytes > self.hello.max_frame_bytes as usize {
            return Err(ClientError::TooLarge {
                bytes,
                max: self.hello.max_frame_bytes,
            });
        }
        let (reply, receiver) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if !pending.open {
                return Err(ClientError::ConnectionLost("connection closed".into()));
            }
            pending.map.insert(
                correlation_id,
                PendingRequest {
                    reply,
                    subscription,
                },
            );
        }
        if self.writer.send(buf.freeze()).await.is_err() {
            lock(&self.pending).map.remove(&correlation_id);
            return Err(ClientError::ConnectionLost("writer stopped".into()));
        }
        Ok(receiver)
    }

    fn next_correlation_id(&self) -> u32 {
        loop {
            let id = self.next_correlation.fetch_add(1, Ordering::Relaxed);
            if id != 0 && id != KEEPALIVE_CORRELATION_ID {
                return id;
            }
        }
    }

    /// Fails every waiting request and refuses new ones.
    pub(crate) fn fail_all(&self, reason: &str) {
        let drained: Vec<PendingRequest> = {
            let mut pending = lock(&self.pending);
            pending.open = false;
            pending.map.drain().map(|(_, request)| request).collect()
        };
        for request in drained {
            let _ = request
                .reply
                .send(Err(ClientError::ConnectionLost(reason.to_owned())));
        }
        lock(&self.routes).clear();
    }

    /// Routes the TXN_CHECK pushes of `group` to `sender`.
    pub(crate) fn add_check_listener(&self, listener: CheckListener) {
        lock(&self.checks).push(listener);
    }

    /// Stops routing DELIVERs of a subscription id.
    pub(crate) fn remove_route(&self, subscription_id: u64) {
        lock(&self.routes).remove(&subscription_id);
    }

    /// Ends this connection so that the supervisor reconnects, to `addr`
    /// first if one is given: the broker answered `WrongNode` (consumers
    /// of cluster topics are served at that node).
    pub(crate) fn redirect_to(&self, addr: &str) {
        if !addr.is_empty() {
            *lock(&self.redirect) = Some(addr.to_owned());
        }
        self.reconnect.notify_one();
    }

    /// Handles one decoded frame from the broker.
    fn dispatch(&self, frame: Frame) {
        if frame.correlation_id == 0 {
            if let Body::Response(Response::Error(error)) = &frame.body {
                // The broker closes the connection after it: the next one
                // goes where consumers are served.
                if error.code == ErrorCode::WrongNode && !error.message.is_empty() {
                    *lock(&self.redirect) = Some(error.message.clone());
                }
                return;
            }
        }
        match frame.body {
            Body::Response(response) => {
                let Some(request) = lock(&self.pending).map.remove(&frame.correlation_id) else {
                    return; // answer to a request whose waiter is gone
                };
                let reply = match response {
                    Response::Error(error) => Err(ClientError::Broker {
                        code: error.code,
                        message: error.message,
                    }),
                    Response::Subscribed(subscribed) => {
                        if let Some(subscription) = request.subscription {
                            subscription.install(subscribed.subscription_id);
                            lock(&self.routes).insert(subscribed.subscription_id, subscription);
                        }
                        Ok(Response::Subscribed(subscribed))
                    }
                    other => Ok(other),
                };
                let _ = request.reply.send(reply);
            }
            Body::Push(Push::Deliver(delivery)) => self.route(delivery),
            Body::Push(Push::TxnCheck(check)) => {
                let mut listeners = lock(&self.checks);
                listeners.retain(|(_, sender)| !sender.is_closed());
                if let Some((_, sender)) = listeners
                    .iter()
                    .find(|(group, _)| *group == check.producer_group)
                {
                    let _ = sender.send(check);
                }
            }
            // A request from the broker is not part of the protocol: ignore.
            Body::Request(_) => {}
        }
    }

    fn route(&self, delivery: Delivery) {
        let subscription = lock(&self.routes).get(&delivery.subscription_id).cloned();
        if let Some(subscription) = subscription {
            if !subscription.push(delivery) {
                // The consumer is gone: stop routing to it.
                let id = subscription.server_id();
                self.remove_route(id);
            }
        }
    }
}

/// What callers see of the connection.
#[derive(Clone)]
pub(crate) enum ConnState {
    /// Not connected; the supervisor is trying.
    Connecting,
    /// Connected.
    Connected(Arc<Conn>),
    /// The client is closed for good.
    Closed,
}

/// State shared by every handle of one client and its supervisor.
pub(crate) struct Shared {
    /// The brokers to connect to (one, or a cluster's nodes), tried in
    /// turn from `current` until one answers.
    pub(crate) addrs: Brokers,
    pub(crate) options: ClientOptions,
    pub(crate) state: watch::Sender<ConnState>,
    /// Open subscriptions, re-established after a reconnect.
    pub(crate) subscriptions: Mutex<Vec<Weak<SubShared>>>,
    /// Held while subscriptions are re-established on a new connection,
    /// and by a new subscription from its SUBSCRIBE until it is in
    /// `subscriptions`: each is subscribed once per connection.
    pub(crate) subscribing: tokio::sync::Mutex<()>,
    /// Check-back listeners (TXN_LISTEN), re-established after a reconnect.
    pub(crate) check_listeners: Mutex<Vec<CheckListener>>,
    /// Transactional producer instances (TXN_INIT): (group, producer id,
    /// epoch), resumed after a reconnect.
    pub(crate) txn_producers: Mutex<Vec<(String, String, u32)>>,
}

/// The brokers a client connects to: the nodes of a cluster, any of which
/// takes every request, or one broker. A connection goes to the one that
/// answered last; when it drops, that one is tried first again, then the
/// next in turn.
#[derive(Debug)]
pub(crate) struct Brokers {
    addrs: Vec<String>,
    /// The index of the broker to try next.
    current: std::sync::atomic::AtomicUsize,
    /// A node a broker sent this client to (`WrongNode`), tried once
    /// before the list.
    redirect: Mutex<Option<String>>,
}

impl Brokers {
    /// Parses `list`: `host:port`, or several separated by commas.
    pub(crate) fn parse(list: &str) -> Result<Brokers> {
        let addrs: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|addr| !addr.is_empty())
            .map(str::to_owned)
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::InvalidArgument(format!(
                "no broker address in {list:?}"
            )));
        }
        Ok(Brokers {
            addrs,
            current: std::sync::atomic::AtomicUsize::new(0),
            redirect: Mutex::new(None),
        })
    }

    /// Every address, in the order given.
    pub(crate) fn all(&self) -> &[String] {
        &self.addrs
    }

    /// Makes `addr` the broker to try next: the current one if it is in
    /// the list, else tried once before it.
    pub(crate) fn redirect(&self, addr: String) {
        use std::sync::atomic::Ordering;
        match self.addrs.iter().position(|known| *known == addr) {
            Some(index) => self.current.store(index, Ordering::Release),
            None => *lock(&self.redirect) = Some(addr),
        }
    }

    /// Opens a session to the current broker (or the one a broker sent
    /// this client to); on failure the next one becomes current.
    pub(crate) async fn connect_next(&self, options: &ClientOptions) -> Result<Session> {
        use std::sync::atomic::Ordering;
        let redirect = lock(&self.redirect).take();
        if let Some(addr) = redirect {
            if let Ok(session) = connect(&addr, options).await {
                return Ok(session);
            }
        }
        let index = self.current.load(Ordering::Acquire) % self.addrs.len();
        let attempt = connect(&self.addrs[index], options).await;
        if attempt.is_err() {
            self.current
                .store((index + 1) % self.addrs.len(), Ordering::Release);
        }
        attempt
    }

    /// Opens a session to the first broker that answers, each tried once
    /// in turn; else the last failure.
    pub(crate) async fn connect_any(&self, options: &ClientOptions) -> Result<Session> {
        let mut last = None;
        for _ in 0..self.addrs.len() {
            match self.connect_next(options).await {
                Ok(session) => return Ok(session),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }
}

/// A producer group and where its TXN_CHECK pushes go.
pub(crate) type CheckListener = (String, mpsc::UnboundedSender<dmq_protocol::TxnCheck>);

impl Shared {
    /// The live connection, waiting for a reconnect at most the request
    /// timeout.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>> {
        let mut receiver = self.state.subscribe();
        let timeout = self.options.request_timeout;
        let wait = async {
            loop {
                let state = receiver.borrow_and_update().clone();
                match state {
                    ConnState::Connected(conn) => return Ok(conn),
                    ConnState::Closed => return Err(ClientError::Closed),
                    ConnState::Connecting => {}
                }
                if receiver.changed().await.is_err() {
                    return Err(ClientError::Closed);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It broke, the broker closed it, or the client is closing: reconnect
    /// (unless closing).
    Lost(String),
    /// The broker sent bytes this client cannot decode as a frame (one over
    /// the size limit, a malformed one): reconnecting would bring them
    /// again.
    Invalid(WireError),
}

impl Ended {
    fn reason(&self) -> String {
        match self {
            Ended::Lost(reason) => reason.clone(),
            Ended::Invalid(error) => format!("invalid frame from broker: {error}"),
        }
    }
}

/// A connection with its reader and writer tasks.
pub(crate) struct Session {
    pub(crate) conn: Arc<Conn>,
    reader: JoinHandle<Ended>,
    writer: JoinHandle<String>,
}

impl Session {
    /// Waits until the connection ends (or shutdown), stops both tasks and
    /// fails every request in flight. Returns why it ended.
    async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Ended {
        let ended = tokio::select! {
            ended = &mut self.reader => {
                ended.unwrap_or_else(|e| Ended::Lost(format!("reader task failed: {e}")))
            }
            reason = &mut self.writer => {
                Ended::Lost(reason.unwrap_or_else(|e| format!("writer task failed: {e}")))
            }
            _ = wait_shutdown(shutdown) => Ended::Lost("client closed".to_owned()),
            _ = self.conn.reconnect.notified() => {
                Ended::Lost("consumers are served at another node".to_owned())
            }
        };
        self.reader.abort();
        self.writer.abort();
        self.conn.fail_all(&ended.reason());
        ended
    }
}

async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Opens a TCP connection, exchanges HELLO/HELLO_OK and starts the reader
/// and writer tasks.
pub(crate) async fn connect(addr: &str, options: &ClientOptions) -> Result<Session> {
    let handshake = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_owned(),
                source: Arc::new(e),
            })?;
        let _ = stream.set_nodelay(true);
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_id: options.client_id.clone(),
            secret: options.secret.clone(),
        };
        let mut out = BytesMut::new();
        encode_frame(&Frame::request(1, hello), &mut out)?;
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        let frame = loop {
            if let Some(frame) = next_frame(&mut buf, options.max_frame_bytes)? {
                break frame;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(ClientError::ConnectionLost(
                    "broker closed the connection during HELLO".into(),
                ));
            }
        };
        let hello_ok = match frame.body {
            Body::Response(Response::HelloOk(hello_ok)) => hello_ok,
            Body::Response(Response::Error(error)) => {
                return Err(ClientError::Broker {
                    code: error.code,
                    message: error.message,
                })
            }
            other => {
                return Err(ClientError::UnexpectedResponse {
                    expected: "HELLO_OK",
                    got: other.opcode(),
                })
            }
        };
        Ok((stream, buf, hello_ok))
    };
    let (stream, buf, hello) = match tokio::time::timeout(options.connect_timeout, handshake).await
    {
        Ok(result) => result?,
        Err(_) => return Err(ClientError::Timeout(options.connect_timeout)),
    };
    let (read_half, write_half) = stream.into_split();
    let (writer_tx, writer_rx) = mpsc::channel(options.write_queue_frames.max(1));
    let conn = Arc::new(Conn {
        writer: writer_tx,
        pending: Mutex::new(PendingMap {
            open: true,
            map: HashMap::new(),
        }),
        routes: Mutex::new(HashMap::new()),
        checks: Mutex::new(Vec::new()),
        next_correlation: AtomicU32::new(2),
        hello,
        redirect: Mutex::new(None),
        reconnect: tokio::sync::Notify::new(),
    });
    // Every frame the broker may send: it announced its maximum.
    let max_frame_bytes = options.max_frame_bytes.max(conn.hello.max_frame_bytes);
    let reader = tokio::spawn(read_loop(
        Arc::clone(&conn),
        read_half,
        buf,
        max_frame_bytes,
    ));
    let writer = tokio::spawn(write_loop(writer_rx, write_half, options.keepalive));
    Ok(Session {
        conn,
        reader,
        writer,
    })
}

/// Cuts the next whole frame off `buf`, if there is one.
fn next_frame(buf: &mut BytesMut, max_frame_bytes: u32) -> Result<Option<Frame>> {
    let Some(total) = frame_len(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let bytes = buf.split_to(total).freeze();
    match decode_frame_bytes(&bytes, max_frame_bytes)? {
        Some((frame, _)) => Ok(Some(frame)),
        None => Err(ClientError::ConnectionLost("short frame".into())),
    }
}

async fn read_loop(
    conn: Arc<Conn>,
    mut read_half: OwnedReadHalf,
    mut buf: BytesMut,
    max_frame_bytes: u32,
) -> Ended {
    loop {
        loop {
            match next_frame(&mut buf, max_frame_bytes) {
                Ok(Some(frame)) => conn.dispatch(frame),
                Ok(None) => break,
                Err(ClientError::Protocol(error)) => return Ended::Invalid(error),
                Err(error) => return Ended::Lost(format!("invalid frame from broker: {error}")),
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        match read_half.read_buf(&mut buf).await {
            Ok(0) => return Ended::Lost("broker closed the connection".to_owned()),
            Ok(_) => {}
            Err(error) => return Ended::Lost(format!("read failed: {error}")),
        }
    }
}

/// The correlation id of the keepalive PING: never given to a request, so
/// its PONG, waited for by nobody, is dropped.
const KEEPALIVE_CORRELATION_ID: u32 = u32::MAX;

async fn write_loop(
    mut frames: mpsc::Receiver<Bytes>,
    mut write_half: OwnedWriteHalf,
    keepalive: Option<Duration>,
) -> String {
    let mut out = BytesMut::with_capacity(WRITE_COALESCE_BYTES);
    loop {
        let first = match keepalive {
            None => frames.recv().await,
            Some(every) => match tokio::time::timeout(every, frames.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    // Nothing sent for `every`: a PING keeps the broker from
                    // closing an idle connection (PROTOCOL.md section 4), e.g.
                    // a consumer that only receives pushes.
                    let mut ping = BytesMut::new();
                    if encode_frame(
                        &Frame::request(KEEPALIVE_CORRELATION_ID, Request::Ping),
                        &mut ping,
                    )
                    .is_ok()
                    {
                        if let Err(error) = write_half.write_all(&ping).await {
                            return format!("write failed: {error}");
                        }
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else {
            break;
        };
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            // A large frame (a PRODUCE batch) goes out as it is; small ones
            // are coalesced into one write.
            if frame.len() >= DIRECT_WRITE_BYTES || frames.is_empty() {
                if let Err(error) = write_half.write_all(&frame).await {
                    return format!("write failed: {error}");
                }
                next = frames.try_recv().ok();
                continue;
            }
            out.clear();
            out.extend_from_slice(&frame);
            while out.len() < WRITE_COALESCE_BYTES {
                match frames.try_recv() {
                    Ok(frame) if frame.len() >= DIRECT_WRITE_BYTES => {
                        next = Some(frame);
                        break;
                    }
                    Ok(frame) => out.extend_from_slice(&frame),
                    Err(_) => break,
                }
            }
            if let Err(error) = write_half.write_all(&out).await {
                return format!("write failed: {error}");
            }
            if next.is_none() {
                next = frames.try_recv().ok();
            }
        }
    }
    "client closed".to_owned()
}

/// Keeps the client connected until shutdown: runs `session`, then
/// reconnects with capped exponential backoff and re-subscribes.
///
/// The backoff is reset only by a connection that lived at least
/// `reconnect_backoff_max`; one that ended sooner waits the current delay
/// before the next attempt, like a failed connect. A connection ended by a
/// frame the client cannot decode ends every subscription with that error.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    mut session: Session,
    mut shutdown: watch::Receiver<bool>,
) {
    let initial = shared.options.reconnect_backoff_initial;
    let max = shared.options.reconnect_backoff_max;
    let mut delay = initial;
    loop {
        let started = tokio::time::Instant::now();
        let conn = Arc::clone(&session.conn);
        let ended = session.run(&mut shutdown).await;
        if *shutdown.borrow() {
            break;
        }
        shared.state.send_replace(ConnState::Connecting);
        if let Ended::Invalid(error) = ended {
            // A SUBSCRIBE answered just before is in the list once the
            // lock is free: it fails too.
            let _subscribing = shared.subscribing.lock().await;
            fail_subscriptions(&shared, &ClientError::Protocol(error));
        }
        // Sent to another node: go there at once.
        let redirect = lock(&conn.redirect).take();
        let redirected = redirect.is_some();
        if let Some(addr) = redirect {
            shared.addrs.redirect(addr);
        }
        drop(conn);
        // A connection that did not last is a failed attempt: wait first.
        let mut wait_first = started.elapsed() < max && !redirected;
        if !wait_first {
            delay = initial;
        }
        session = loop {
            if wait_first {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_shutdown(&mut shutdown) => {
                        shared.state.send_replace(ConnState::Closed);
                        close_subscriptions(&shared);
                        return;
                    }
                }
                delay = (delay * 2).min(max);
            }
            wait_first = true;
            let attempt = tokio::select! {
                result = shared.addrs.connect_next(&shared.options) => Some(result),
                _ = wait_shutdown(&mut shutdown) => None,
            };
            match attempt {
                None => {
                    shared.state.send_replace(ConnState::Closed);
                    close_subscriptions(&shared);
                    return;
                }
                Some(Ok(session)) => break session,
                Some(Err(_)) => {}
            }
        };
        {
            let _subscribing = shared.subscribing.lock().await;
            resubscribe(&shared, &session.conn).await;
        }
        relisten(&shared, &session.conn).await;
        shared
            .state
            .send_replace(ConnState::Connected(Arc::clone(&session.conn)));
    }
    shared.state.send_replace(ConnState::Closed);
    close_subscriptions(&shared);
}

/// Re-sends SUBSCRIBE for every open subscription on a new connection. A
/// subscription the broker now refuses gets the error in its stream.
async fn resubscribe(shared: &Shared, conn: &Arc<Conn>) {
    let subscriptions: Vec<Arc<SubShared>> = {
        let mut list = lock(&shared.subscriptions);
        list.retain(|weak| weak.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    let timeout = shared.options.request_timeout;
    for subscription in subscriptions {
        if subscription.is_closed() {
            continue;
        }
        let request = Request::Subscribe(subscription.request.clone());
        let result = match conn.start(request, Some(Arc::clone(&subscription))).await {
            Ok(receiver) => match tokio::time::timeout(timeout, receiver).await {
                Ok(Ok(reply)) => reply.map(|_| ()),
                Ok(Err(_)) => Err(ClientError::ConnectionLost("connection closed".into())),
                Err(_) => Err(ClientError::Timeout(timeout)),
            },
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => {}
            // Consumers are served at another node: go there.
            Err(ClientError::Broker {
                code: ErrorCode::WrongNode,
                message,
            }) => {
                conn.redirect_to(&message);
                return;
            }
            // The connection dropped again: the next round retries.
            Err(error) if error.is_transient() => return,
            Err(error) => subscription.fail(error),
        }
    }
}

/// Resumes every transactional producer instance (TXN_INIT with its
/// epoch: a fenced one stays fenced) and sends TXN_LISTEN again for every
/// check-back listener on a new connection (one whose receiver is gone is
/// dropped).
async fn relisten(shared: &Shared, conn: &Arc<Conn>) {
    let listeners: Vec<CheckListener> = {
        let mut list = lock(&shared.check_listeners);
        list.retain(|(_, sender)| !sender.is_closed());
        list.clone()
    };
    let producers = lock(&shared.txn_producers).clone();
    for (producer_group, producer_id, epoch) in producers {
        let request = Request::TxnInit(dmq_protocol::TxnInit {
            producer_group,
            producer_id,
            epoch,
        });
        if let Ok(receiver) = conn.start(request, None).await {
            let _ = tokio::time::timeout(shared.options.request_timeout, receiver).await;
        }
    }
    for (group, sender) in listeners {
        conn.add_check_listener((group.clone(), sender));
        let request = Request::TxnListen(dmq_protocol::TxnListen {
            producer_group: group,
        });
        if let Ok(receiver) = conn.start(request, None).await {
            let _ = tokio::time::timeout(shared.options.request_timeout, receiver).await;
        }
    }
}

fn close_subscriptions(shared: &Shared) {
    fail_subscriptions(shared, &ClientError::Closed);
}

/// Ends every open subscription with `error` (shown in its stream); they
/// are not re-established.
fn fail_subscriptions(shared: &Shared, error: &ClientError) {
    let subscriptions: Vec<Arc<SubShared>> = lock(&shared.subscriptions)
        .drain(..)
        .filter_map(|weak| weak.upgrade())
        .collect();
    for subscription in subscriptions {
        subscription.fail(error.clone());
    }
}

/// Waits for a reply with a timeout.
pub(crate) async fn await_reply(
    receiver: oneshot::Receiver<Reply>,
    timeout: Duration,
) -> Result<Response> {
    match tokio::time::timeout(timeout, receiver).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Err(ClientError::ConnectionLost("connection closed".into())),
        Err(_) => Err(ClientError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_list_is_split_on_commas_and_an_empty_one_is_refused() {
        let brokers =
            Brokers::parse(" 10.0.0.1:7070, 10.0.0.2:7070 ,,10.0.0.3:7070").expect("test");
        assert_eq!(
            brokers.all(),
            ["10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"]
        );
        assert_eq!(
            Brokers::parse("127.0.0.1:7070").expect("test").all().len(),
            1
        );
        for empty in ["", " , ,"] {
            assert!(matches!(
                Brokers::parse(empty),
                Err(ClientError::InvalidArgument(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_broker_that_does_not_answer_passes_the_turn_to_the_next() {
        // Two ports nothing listens on: each failed attempt moves on, and
        // connect_any tries each once from the current one (b, then a).
        let closed = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("test");
            listener.local_addr().expect("test").to_string()
        };
        let (a, b) = (closed(), closed());
        let brokers = Brokers::parse(&format!("{a},{b}")).expect("test");
        let options = ClientOptions::new("test");
        assert!(brokers.connect_next(&options).await.is_err());
        assert_eq!(
            brokers.current.load(std::sync::atomic::Ordering::Acquire),
            1
        );
        match brokers.connect_any(&options).await {
            Err(ClientError::Connect { addr, .. }) => assert_eq!(addr, a),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("connected to a closed port"),
        }
        assert_eq!(
            brokers.current.load(std::sync::atomic::Ordering::Acquire),
            1
        );
    }
}
