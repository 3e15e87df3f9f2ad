//! Producing: [`Message`] (builder), [`Producer::send`] (resolves after the
//! broker's durable ack with a [`SendReceipt`]).
//!
//! A producer task collects messages into one batch per (topic, partition
//! or broker-routed): a batch is sent when it reaches `max_batch_messages`
//! or `max_batch_bytes`, or `linger` after its first message, or at once
//! when no PRODUCE of this producer is in flight (so a lone message does
//! not wait for the linger, and under load batches grow with the round
//! trip; the last answered PRODUCE also sends the open batches). Up to
//! `max_in_flight_batches` PRODUCE requests are in flight at once on the
//! client's connection (pipelining); `max_pending_messages` bounds the
//! messages accepted but not yet acknowledged, beyond which `send` waits.
//!
//! On a cluster, batches go to their partitions' leaders (`crate::routing`):
//! a keyed message joins its partition's batch once the topic's partition
//! count is known, and an unkeyed batch takes a partition round robin.
//!
//! With idempotence, each batch carries the producer id and a sequence
//! number; a batch that failed on a lost connection is retried with the
//! same sequence after the reconnect, and the broker answers a batch it
//! already stored with the original offsets.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dmq_protocol::{
    max_record_bytes, produce_record_size, DeliveryTime, ErrorCode, Header, MessageId, Produce,
    ProduceRecord, ProducedRecord, ProducerSequence, Request, Response,
};
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::client::Client;
use crate::connection::{await_reply, lock, ConnState};
use crate::error::{ClientError, Result};
use crate::options::ProducerOptions;
use crate::routing::{self, Counted, InFlightCount, Routing};
use crate::time::{duration_to_ms, ms_to_system_time, system_time_to_ms};

/// Bytes a record costs in a PRODUCE body beyond its key, value and
/// header bytes (lengths, tags, times), rounded up.
const RECORD_OVERHEAD_BYTES: usize = 48;
/// Room kept in a frame for the PRODUCE header fields.
const FRAME_HEADROOM_BYTES: usize = 4096;

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    partition: Option<u32>,
    record: ProduceRecord,
}

impl Message {
    /// A message for `topic` with this payload.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Message {
            topic: topic.into(),
            partition: None,
            record: ProduceRecord {
                value: value.into(),
                ..ProduceRecord::default()
            },
        }
    }

    /// Its topic, partition choice and wire record.
    pub(crate) fn into_parts(self) -> (String, Option<u32>, ProduceRecord) {
        (self.topic, self.partition, self.record)
    }

    /// The partition it was sent to explicitly, if any.
    pub(crate) fn partition_choice(&self) -> Option<u32> {
        self.partition
    }

    /// Sets the key (same key → same partition for ordered topics).
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.record.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        self.record.headers.push(Header::new(name, value));
        self
    }

    /// Sends to this partition instead of letting the broker pick.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Deliverable only `delay` after the broker receives it.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.record.delivery_time = DeliveryTime::DelayMs(duration_to_ms(delay));
        self
    }

    /// Deliverable only at `time` (a past time: at once).
    pub fn deliver_at(mut self, time: SystemTime) -> Self {
        self.record.delivery_time = DeliveryTime::AtMs(system_time_to_ms(time));
        self
    }

    /// Never delivered later than `ttl` after it becomes deliverable.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.record.ttl_ms = Some(duration_to_ms(ttl));
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The payload.
    pub fn value(&self) -> &Bytes {
        &self.record.value
    }

    fn estimated_bytes(&self) -> usize {
        let headers: usize = self
            .record
            .headers
            .iter()
            .map(|header| header.name.len() + header.value.len() + 8)
            .sum();
        let key = self.record.key.as_ref().map_or(0, Bytes::len);
        RECORD_OVERHEAD_BYTES + self.record.value.len() + key + headers
    }
}

/// Where an acknowledged message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// Partition.
    pub partition: u32,
    /// Offset; `None` while the message waits in the delay store.
    pub offset: Option<u64>,
    /// The message id.
    pub id: MessageId,
    /// For a delayed message: when it becomes deliverable.
    pub deliver_at: Option<SystemTime>,
}

/// Batches and sends messages; cheap to clone (clones share the batches).
///
/// `send` appends the message to its open batch under a short lock (no
/// channel hop, no task wakeup per message); a background task sends full
/// batches and batches whose linger expired. Every message of a batch
/// shares one completion slot, so a send costs no allocation of its own.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<ProducerHandle>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("max_pending", &self.inner.shared.max_pending)
            .finish()
    }
}

/// Closes the producer (its open batches are sent) when the last clone
/// of the [`Producer`] is dropped.
struct ProducerHandle {
    shared: Arc<ProducerShared>,
}

impl Drop for ProducerHandle {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
    }
}

/// State shared by the producer handles and the batching task.
struct ProducerShared {
    state: Mutex<BatchState>,
    /// Wakes the batching task: a batch is full, the first batch opened
    /// (its linger timer must start), a flush, or the producer closed.
    wake: Notify,
    /// Messages accepted but not yet acknowledged. A send takes one permit
    /// and forgets it; a batch's permits come back when it completes.
    permits: Semaphore,
    max_pending: u32,
    max_batch_messages: usize,
    linger: Duration,
    /// PRODUCE requests sent and not yet answered. While none is, a new
    /// batch goes out at once instead of lingering (Nagle's rule: batches
    /// grow with the round trip, and a lone message does not wait).
    in_flight: AtomicUsize,
    /// The broker's maximum record size (PROTOCOL.md §8), once known: a
    /// larger message fails alone at `send` instead of failing its batch.
    max_record_bytes: AtomicU32,
}

struct BatchState {
    /// At most one open batch per key. Few keys are open at once (topics
    /// × explicit partitions in use): a linear scan over a small vector
    /// beats hashing a cloned topic name per message.
    open: Vec<(BatchKey, Batch)>,
    /// Closed batches in the order they must go out. Bounded: every
    /// message in it holds one of `max_pending` permits.
    ready: VecDeque<(BatchKey, Batch)>,
    /// The batching task sleeps until an open batch's linger deadline.
    timer_armed: bool,
    /// No more sends: send what is open, then stop.
    closed: bool,
    max_batch_bytes: usize,
    /// On a cluster, the partition count of each topic whose leaders are
    /// known: a keyed message goes into its partition's batch (the
    /// broker's rule), so that the batch can go to that partition's
    /// leader. Empty on a single broker.
    partitions_of: HashMap<String, u32>,
}

impl Producer {
    /// A producer sending through `client`.
    pub fn new(client: &Client, options: ProducerOptions) -> Producer {
        let max_pending = u32::try_from(options.max_pending_messages.max(1))
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        // The broker's frame limit, if the connection is up already; the
        // batching task checks again once it is.
        let (frame_limit, max_record_bytes) = match &*client.shared().state.borrow() {
            ConnState::Connected(conn) => (
                (conn.hello.max_frame_bytes as usize).saturating_sub(FRAME_HEADROOM_BYTES),
                max_record_bytes(conn.hello.max_frame_bytes),
            ),
            _ => (options.max_batch_bytes, u32::MAX),
        };
        let shared = Arc::new(ProducerShared {
            state: Mutex::new(BatchState {
                open: Vec::new(),
                ready: VecDeque::new(),
                timer_armed: false,
                closed: false,
                partitions_of: HashMap::new(),
                max_batch_bytes: options.max_batch_bytes.min(frame_limit).max(1),
            }),
            wake: Notify::new(),
            permits: Semaphore::new(max_pending as usize),
            max_pending,
            max_batch_messages: options.max_batch_messages.max(1),
            linger: options.linger,
            in_flight: AtomicUsize::new(0),
            max_record_bytes: AtomicU32::new(max_record_bytes),
        });
        tokio::spawn(batch_loop(client.clone(), options, Arc::clone(&shared)));
        Producer {
            inner: Arc::new(ProducerHandle { shared }),
        }
    }

    /// Queues `message` and returns a future that resolves when the broker
    /// has durably stored it. The message is queued when `send` is called
    /// if there is room (messages sent one after the other keep their
    /// order); otherwise when the future is first polled and room frees up.
    pub fn send(
        &self,
        message: Message,
    ) -> impl Future<Output = Result<SendReceipt>> + Send + Unpin + 'static {
        if message.topic.is_empty() {
            return SendFuture::failed(ClientError::InvalidArgument("empty topic".into()));
        }
        let shared = &self.inner.shared;
        let max = shared.max_record_bytes.load(Ordering::Relaxed);
        let bytes = produce_record_size(&message.record);
        if bytes > u64::from(max) {
            return SendFuture::failed(ClientError::RecordTooLarge { bytes, max });
        }
        match shared.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                match shared.enqueue(message) {
                    Ok((outcome, index)) => SendFuture::queued(outcome, index),
                    Err(error) => SendFuture::failed(error),
                }
            }
            Err(TryAcquireError::Closed) => SendFuture::failed(ClientError::Closed),
            Err(TryAcquireError::NoPermits) => {
                let shared = Arc::clone(shared);
                SendFuture {
                    state: SendState::Waiting(Box::pin(async move {
                        let permit = shared
                            .permits
                            .acquire()
                            .await
                            .map_err(|_| ClientError::Closed)?;
                        permit.forget();
                        shared.enqueue(message)
                    })),
                }
            }
        }
    }

    /// Sends every open batch now and waits until every message sent so
    /// far is acknowledged (or failed).
    pub async fn flush(&self) -> Result<()> {
        let shared = &self.inner.shared;
        {
            let mut state = lock(&shared.state);
            let open = std::mem::take(&mut state.open);
            state.ready.extend(open);
        }
        shared.wake.notify_one();
        let all = shared
            .permits
            .acquire_many(shared.max_pending)
            .await
            .map_err(|_| ClientError::Closed)?;
        drop(all);
        Ok(())
    }
}

impl ProducerShared {
    /// Appends `message` (whose permit the caller holds) to its batch;
    /// returns the batch's completion slot and the message's index in it.
    fn enqueue(&self, message: Message) -> Result<(Arc<Outcome>, usize)> {
        let bytes = message.estimated_bytes();
        // Whether the batching task must look: a batch closed, or the
        // first batch opened and its linger timer must start.
        let mut wake = false;
        let result = {
            let mut state = lock(&self.state);
            if state.closed {
                None
            } else {
                Some(state.append(message, bytes, self, &mut wake))
            }
        };
        if wake {
            self.wake.notify_one();
        }
        match result {
            Some(slot) => Ok(slot),
            None => {
                self.permits.add_permits(1);
                Err(ClientError::Closed)
            }
        }
    }
}

impl BatchState {
    fn append(
        &mut self,
        message: Message,
        bytes: usize,
        shared: &ProducerShared,
        wake: &mut bool,
    ) -> (Arc<Outcome>, usize) {
        let Message {
            topic,
            mut partition,
            record,
        } = message;
        if partition.is_none() && !self.partitions_of.is_empty() {
            if let (Some(key), Some(&count)) = (&record.key, self.partitions_of.get(&topic)) {
                partition = Some(dmq_protocol::key_partition(key, count));
            }
        }
        let position = self
            .open
            .iter()
            .position(|((batch_topic, batch_partition), _)| {
                *batch_topic == topic && *batch_partition == partition
            });
        let position = match position {
            Some(index)
                if self.open[index].1.bytes + bytes > self.max_batch_bytes
                    && !self.open[index].1.records.is_empty() =>
            {
                let closed = self.open.swap_remove(index);
                self.ready.push_back(closed);
                *wake = true;
                None
            }
            other => other,
        };
        let index = match position {
            Some(index) => index,
            None => {
                let now = Instant::now();
                let deadline = if shared.in_flight.load(Ordering::Acquire) == 0 {
                    // Nothing in flight: no reason to wait. Messages
                    // appended before the task takes it still join it.
                    *wake = true;
                    now
                } else {
                    now + shared.linger
                };
                if !self.timer_armed {
                    // The task sleeps without a deadline: start the timer.
                    self.timer_armed = true;
                    *wake = true;
                }
                let capacity = shared.max_batch_messages.min(1024);
                self.open.push((
                    (topic, partition),
                    Batch {
                        records: Vec::with_capacity(capacity),
                        bytes: 0,
                        deadline,
                        outcome: Arc::new(Outcome::new()),
                    },
                ));
                self.open.len() - 1
            }
        };
        let batch = &mut self.open[index].1;
        batch.records.push(record);
        batch.bytes += bytes;
        let slot = (Arc::clone(&batch.outcome), batch.records.len() - 1);
        if batch.records.len() >= shared.max_batch_messages || batch.bytes >= self.max_batch_bytes {
            let full = self.open.swap_remove(index);
            self.ready.push_back(full);
            *wake = true;
        }
        slot
    }
}

/// The completion of one batch, shared by the futures of its messages.
struct Outcome {
    state: Mutex<OutcomeState>,
}

enum OutcomeState {
    /// Not answered yet: the wakers of the futures that polled.
    Waiting(Vec<Waker>),
    /// The broker's records, in batch order, or why the batch failed.
    Done(std::result::Result<Vec<ProducedRecord>, ClientError>),
}

impl Outcome {
    fn new() -> Self {
        Outcome {
            state: Mutex::new(OutcomeState::Waiting(Vec::new())),
        }
    }

    /// Records the batch's result and wakes every waiting future.
    fn complete(&self, result: std::result::Result<Vec<ProducedRecord>, ClientError>) {
        let previous = std::mem::replace(&mut *lock(&self.state), OutcomeState::Done(result));
        if let OutcomeState::Waiting(wakers) = previous {
            for waker in wakers {
                waker.wake();
            }
        }
    }
}

/// The future [`Producer::send`] returns.
struct SendFuture {
    state: SendState,
}

type Enqueue = Pin<Box<dyn Future<Output = Result<(Arc<Outcome>, usize)>> + Send>>;

enum SendState {
    /// Waiting for room (backpressure); queues the message once there is.
    Waiting(Enqueue),
    /// In a batch; `waker` is this future's slot in the outcome's wakers.
    Queued {
        outcome: Arc<Outcome>,
        index: usize,
        waker: Option<usize>,
    },
    Failed(Option<ClientError>),
}

impl SendFuture {
    fn queued(outcome: Arc<Outcome>, index: usize) -> Self {
        SendFuture {
            state: SendState::Queued {
                outcome,
                index,
                waker: None,
            },
        }
    }

    fn failed(error: ClientError) -> Self {
        SendFuture {
            state: SendState::Failed(Some(error)),
        }
    }
}

impl Future for SendFuture {
    type Output = Result<SendReceipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut self.state;
        if let SendState::Waiting(enqueue) = this {
            match enqueue.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((outcome, index))) => {
                    *this = SendState::Queued {
                        outcome,
                        index,
                        waker: None,
                    }
                }
                Poll::Ready(Err(error)) => *this = SendState::Failed(Some(error)),
            }
        }
        match this {
            SendState::Waiting(_) => Poll::Pending,
            SendState::Failed(error) => {
                Poll::Ready(Err(error.take().unwrap_or(ClientError::Closed)))
            }
            SendState::Queued {
                outcome,
                index,
                waker,
            } => {
                let mut state = lock(&outcome.state);
                match &mut *state {
                    OutcomeState::Done(Ok(records)) => {
                        Poll::Ready(records.get(*index).map(receipt).ok_or_else(|| {
                            ClientError::InvalidArgument("broker result missing".into())
                        }))
                    }
                    OutcomeState::Done(Err(error)) => Poll::Ready(Err(error.clone())),
                    OutcomeState::Waiting(wakers) => {
                        match waker.and_then(|slot| wakers.get_mut(slot)) {
                            Some(registered) => {
                                if !registered.will_wake(cx.waker()) {
                                    registered.clone_from(cx.waker());
                                }
                            }
                            None => {
                                *waker = Some(wakers.len());
                                wakers.push(cx.waker().clone());
                            }
                        }
                        Poll::Pending
                    }
                }
            }
        }
    }
}

pub(crate) fn receipt(record: &ProducedRecord) -> SendReceipt {
    SendReceipt {
        partition: record.partition,
        offset: record.offset,
        id: record.message_id,
        deliver_at: record.deliver_at_ms.map(ms_to_system_time),
    }
}

/// A random producer id (no dependency on a RNG crate: std's randomly
/// seeded hasher, mixed with the time and process id).
fn random_producer_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

struct Batch {
    records: Vec<ProduceRecord>,
    bytes: usize,
    deadline: Instant,
    outcome: Arc<Outcome>,
}

type BatchKey = (String, Option<u32>);

struct Batcher {
    client: Client,
    options: ProducerOptions,
    shared: Arc<ProducerShared>,
    in_flight: Arc<Semaphore>,
    producer_id: u64,
    next_sequence: u64,
    /// Serialises retries so that re-sent batches keep their order.
    retry_gate: Arc<tokio::sync::Mutex<()>>,
    /// Batches failed and waiting to be sent again: a new batch waits
    /// until there are none, so that it never overtakes them by more than
    /// the broker's dedup window tells apart.
    retrying: InFlightCount,
    /// On a cluster (and with `route_to_leaders`): where each batch goes.
    routing: Option<Routing>,
}

async fn batch_loop(client: Client, options: ProducerOptions, shared: Arc<ProducerShared>) {
    let mut routing = None;
    if let Ok(conn) = client.shared().conn().await {
        // A cluster node gives its node id; a single broker `dmqd`.
        if options.route_to_leaders && conn.hello.broker_id.parse::<u64>().is_ok() {
            routing = Some(Routing::new(client.clone()));
        }
        let frame_limit =
            (conn.hello.max_frame_bytes as usize).saturating_sub(FRAME_HEADROOM_BYTES);
        shared.max_record_bytes.store(
            max_record_bytes(conn.hello.max_frame_bytes),
            Ordering::Relaxed,
        );
        let mut state = lock(&shared.state);
        state.max_batch_bytes = state.max_batch_bytes.min(frame_limit).max(1);
    }
    let mut batcher = Batcher {
        in_flight: Arc::new(Semaphore::new(options.max_in_flight_batches.max(1))),
        producer_id: random_producer_id(),
        next_sequence: 0,
        retry_gate: Arc::new(tokio::sync::Mutex::new(())),
        retrying: routing::new_count(),
        routing,
        shared: Arc::clone(&shared),
        client,
        options,
    };
    let mut to_send = VecDeque::new();
    loop {
        let (deadline, closed) = {
            let mut state = lock(&shared.state);
            let now = Instant::now();
            let mut index = 0;
            while index < state.open.len() {
                if state.closed || state.open[index].1.deadline <= now {
                    // Linger expired: it goes out after the batches that
                    // closed before it (order within a key is kept, as a
                    // key has one open batch at a time).
                    let expired = state.open.remove(index);
                    state.ready.push_back(expired);
                } else {
                    index += 1;
                }
            }
            std::mem::swap(&mut to_send, &mut state.ready);
            let deadline = state.open.iter().map(|(_, batch)| batch.deadline).min();
            state.timer_armed = deadline.is_some();
            (deadline, state.closed)
        };
        if !to_send.is_empty() {
            while let Some((key, batch)) = to_send.pop_front() {
                batcher.send(key, batch).await;
            }
            // More may have closed while these went out.
            continue;
        }
        if closed {
            return;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = sleep_until(deadline), if deadline.is_some() => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Batcher {
    /// Queues one PRODUCE on the connection (in call order) and hands the
    /// wait for its answer to a task.
    async fn send(&mut self, key: BatchKey, batch: Batch) {
        let count = batch.records.len();
        let outcome = batch.outcome;
        let permits = Arc::clone(&self.shared);
        let Ok(permit) = Arc::clone(&self.in_flight).acquire_owned().await else {
            permits.permits.add_permits(count);
            outcome.complete(Err(ClientError::Closed));
            return;
        };
        let (topic, partition) = key;
        // In flight from here: a batch opened while this one waits for its
        // route lingers as it would behind a request on the wire.
        let in_flight = InFlight::start(Arc::clone(&self.shared));
        let (link, partition, order, stale) = match &mut self.routing {
            Some(routing) => {
                let route = routing.route(&topic, partition, &batch.records).await;
                if let Some(count) = route.partitions_learned {
                    let mut state = lock(&self.shared.state);
                    if state.partitions_of.get(&topic) != Some(&count) {
                        state.partitions_of.insert(topic.clone(), count);
                        // Keyed messages joined the topic's unplaced batch
                        // until now, and join their partition's from now
                        // on: the unplaced one goes out first, so that a
                        // key's later message cannot leave before it.
                        let unplaced = state.open.iter().position(|((open, partition), _)| {
                            *open == topic && partition.is_none()
                        });
                        if let Some(index) = unplaced {
                            let batch = state.open.remove(index);
                            state.ready.push_back(batch);
                        }
                    }
                }
                (
                    route.link,
                    route.partition,
                    Some(route.order),
                    Some(routing.stale_flag()),
                )
            }
            None => (None, partition, None, None),
        };
        let idempotence = self.options.idempotence.then(|| {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            ProducerSequence {
                producer_id: self.producer_id,
                sequence,
            }
        });
        let request = Produce {
            topic,
            partition,
            idempotence,
            records: batch.records,
        };
        let shared = Arc::clone(self.client.shared());
        let timeout = shared.options.request_timeout;
        let size_hint = batch.bytes + FRAME_HEADROOM_BYTES;
        let retry = idempotence.is_some().then(|| request.clone());
        // The first try goes to the partition's leader if routed; retries
        // go through the client's own node (which fails over to the next
        // address, and forwards).
        let first_via = link.as_ref().map_or(&shared, |link| link.shared());
        let first = match first_via.conn().await {
            Ok(conn) => {
                if retry.is_some() {
                    // After the reconnect: the batches that failed on the
                    // old connection have counted themselves by now.
                    let _ = self.retrying.subscribe().wait_for(|n| *n == 0).await;
                }
                conn.start_with_capacity(Request::Produce(request), None, size_hint)
                    .await
            }
            Err(error) => Err(error),
        };
        let max_retries = self.options.max_retries;
        let backoff = shared.options.reconnect_backoff_initial;
        let gate = Arc::clone(&self.retry_gate);
        let retrying = Arc::clone(&self.retrying);
        tokio::spawn(async move {
            let mut result = match first {
                Ok(receiver) => await_reply(receiver, timeout).await,
                Err(error) => Err(error),
            };
            drop(link);
            if let Some(stale) = stale.filter(|_| result.is_err()) {
                stale.store(true, Ordering::Release);
            }
            if let Some(request) = retry {
                let _counted = (max_retries > 0 && result.as_ref().is_err_and(retryable))
                    .then(|| Counted::start(&retrying));
                let mut attempt = 0;
                while attempt < max_retries && result.as_ref().is_err_and(retryable) {
                    attempt += 1;
                    let _order = gate.lock().await;
                    tokio::time::sleep(backoff * attempt).await;
                    result = match shared.conn().await {
                        Ok(conn) => match conn
                            .start_with_capacity(Request::Produce(request.clone()), None, size_hint)
                            .await
                        {
                            Ok(receiver) => await_reply(receiver, timeout).await,
                            Err(error) => Err(error),
                        },
                        Err(error) => Err(error),
                    };
                }
            }
            drop(permit);
            drop(in_flight);
            drop(order);
            // Room first: a caller that saw its send complete finds the
            // room it freed (and its next send is queued at once).
            permits.permits.add_permits(count);
            outcome.complete(check(result, count));
        });
    }
}

/// One PRODUCE in flight, counted in [`ProducerShared::in_flight`]. The
/// last one to finish sends the open batches at once.
struct InFlight(Arc<ProducerShared>);

impl InFlight {
    fn start(shared: Arc<ProducerShared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let shared = &self.0;
        if shared.in_flight.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let flush = {
            let mut state = lock(&shared.state);
            let now = Instant::now();
            for (_, batch) in &mut state.open {
                batch.deadline = batch.deadline.min(now);
            }
            !state.open.is_empty()
        };
        if flush {
            shared.wake.notify_one();
        }
    }
}

/// Whether an idempotent producer sends a failed batch again. Besides a
/// lost connection and the transient codes: `Unavailable`, which a cluster
/// node answers when no leader took the write in time or its answer was
/// lost (the batch may be stored: the retry is answered with it then).
fn retryable(error: &ClientError) -> bool {
    error.is_transient()
        || matches!(
            error.code(),
            Some(ErrorCode::OutOfOrderSequence | ErrorCode::Unavailable)
        )
}

/// The per-record results of a PRODUCE of `count` records, or why it failed.
fn check(
    result: Result<Response>,
    count: usize,
) -> std::result::Result<Vec<ProducedRecord>, ClientError> {
    match result {
        Ok(Response::ProduceOk(ok)) if ok.records.len() == count => Ok(ok.records),
        Ok(Response::ProduceOk(ok)) => Err(ClientError::InvalidArgument(format!(
            "broker returned {} results for {count} records",
            ok.records.len(),
        ))),
        Ok(other) => Err(ClientError::UnexpectedResponse {
            expected: "PRODUCE_OK",
            got: other.opcode(),
        }),
        Err(error) => Err(error),
    }
}
