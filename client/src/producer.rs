//! Producing: [`Message`] (builder), [`Producer::send`] (resolves after the
//! broker's durable ack with a [`SendReceipt`]).
//!
//! A producer task collects messages into one batch per (topic, partition
//! or broker-routed): a batch is sent when it reaches `max_batch_messages`
//! or `max_batch_bytes`, or `linger` after its first message. Up to
//! `max_in_flight_batches` PRODUCE requests are in flight at once on the
//! client's connection (pipelining); `max_pending_messages` bounds the
//! messages accepted but not yet acknowledged, beyond which `send` waits.
//!
//! With idempotence, each batch carries the producer id and a sequence
//! number; a batch that failed on a lost connection is retried with the
//! same sequence after the reconnect, and the broker answers a batch it
//! already stored with the original offsets.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dmq_protocol::{
    DeliveryTime, ErrorCode, Header, MessageId, Produce, ProduceRecord, ProducerSequence, Request,
    Response,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::Client;
use crate::connection::await_reply;
use crate::error::{ClientError, Result};
use crate::options::ProducerOptions;
use crate::time::{duration_to_ms, ms_to_system_time, system_time_to_ms};

/// Bytes a record costs in a PRODUCE body beyond its key, value and
/// header bytes (lengths, tags, times), rounded up.
const RECORD_OVERHEAD_BYTES: usize = 48;
/// Commands handled per wakeup of the batching task before it checks
/// its linger timers again.
const MAX_COMMANDS_PER_WAKEUP: usize = 4096;
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
#[derive(Clone)]
pub struct Producer {
    commands: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    max_pending: u32,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

enum Command {
    Send(Queued),
    /// Send every open batch now.
    Flush,
}

struct Queued {
    message: Message,
    bytes: usize,
    waiter: Waiter,
}

struct Waiter {
    reply: oneshot::Sender<Result<SendReceipt>>,
    _permit: OwnedSemaphorePermit,
}

impl Producer {
    /// A producer sending through `client`.
    pub fn new(client: &Client, options: ProducerOptions) -> Producer {
        let max_pending = u32::try_from(options.max_pending_messages.max(1))
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(client.clone(), options, receiver));
        Producer {
            commands,
            permits: Arc::new(Semaphore::new(max_pending as usize)),
            max_pending,
        }
    }

    /// Queues `message` and returns a future that resolves when the broker
    /// has durably stored it. The message is queued when `send` is called
    /// if there is room (messages sent one after the other keep their
    /// order); otherwise when the future is first polled and room frees up.
    pub fn send(
        &self,
        message: Message,
    ) -> impl Future<Output = Result<SendReceipt>> + Send + 'static {
        let (reply, receiver) = oneshot::channel();
        let invalid = message.topic.is_empty();
        let bytes = message.estimated_bytes();
        let commands = self.commands.clone();
        let permits = Arc::clone(&self.permits);
        let mut waiting = None;
        let mut queued = false;
        if !invalid {
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => {
                    let waiter = Waiter {
                        reply,
                        _permit: permit,
                    };
                    let command = Command::Send(Queued {
                        message,
                        bytes,
                        waiter,
                    });
                    queued = commands.send(command).is_ok();
                }
                Err(_) => waiting = Some((message, reply)),
            }
        }
        async move {
            if invalid {
                return Err(ClientError::InvalidArgument("empty topic".into()));
            }
            if let Some((message, reply)) = waiting {
                let permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|_| ClientError::Closed)?;
                let waiter = Waiter {
                    reply,
                    _permit: permit,
                };
                let command = Command::Send(Queued {
                    message,
                    bytes,
                    waiter,
                });
                commands.send(command).map_err(|_| ClientError::Closed)?;
            } else if !queued {
                return Err(ClientError::Closed);
            }
            receiver.await.unwrap_or(Err(ClientError::Closed))
        }
    }

    /// Sends every open batch now and waits until every message sent so
    /// far is acknowledged (or failed).
    pub async fn flush(&self) -> Result<()> {
        self.commands
            .send(Command::Flush)
            .map_err(|_| ClientError::Closed)?;
        let all = self
            .permits
            .acquire_many(self.max_pending)
            .await
            .map_err(|_| ClientError::Closed)?;
        drop(all);
        Ok(())
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
    waiters: Vec<Waiter>,
    bytes: usize,
    deadline: Instant,
}

type BatchKey = (String, Option<u32>);

struct Batcher {
    client: Client,
    options: ProducerOptions,
    max_batch_bytes: usize,
    in_flight: Arc<Semaphore>,
    producer_id: u64,
    next_sequence: u64,
    /// Serialises retries so that re-sent batches keep their order.
    retry_gate: Arc<tokio::sync::Mutex<()>>,
}

async fn batch_loop(
    client: Client,
    options: ProducerOptions,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let frame_limit = match client.shared().conn().await {
        Ok(conn) => (conn.hello.max_frame_bytes as usize).saturating_sub(FRAME_HEADROOM_BYTES),
        Err(_) => options.max_batch_bytes,
    };
    let mut batcher = Batcher {
        max_batch_bytes: options.max_batch_bytes.min(frame_limit).max(1),
        in_flight: Arc::new(Semaphore::new(options.max_in_flight_batches.max(1))),
        producer_id: random_producer_id(),
        next_sequence: 0,
        retry_gate: Arc::new(tokio::sync::Mutex::new(())),
        client,
        options,
    };
    // Few keys are open at once (topics × explicit partitions in use): a
    // linear scan over a small vector beats hashing a cloned topic name
    // per message.
    let mut batches: Vec<(BatchKey, Batch)> = Vec::new();
    loop {
        let deadline = batches.iter().map(|(_, batch)| batch.deadline).min();
        let command = tokio::select! {
            command = commands.recv() => command,
            _ = sleep_until(deadline), if deadline.is_some() => {
                let now = Instant::now();
                let mut index = 0;
                while index < batches.len() {
                    if batches[index].1.deadline <= now {
                        let (key, batch) = batches.swap_remove(index);
                        batcher.send(key, batch).await;
                    } else {
                        index += 1;
                    }
                }
                continue;
            }
        };
        let mut command = command;
        // Handle what is already queued (a bounded number) before waiting
        // on the timers again.
        let mut handled = 0;
        loop {
            match command {
                Some(Command::Send(queued)) => batcher.add(&mut batches, queued).await,
                Some(Command::Flush) => {
                    for (key, batch) in std::mem::take(&mut batches) {
                        batcher.send(key, batch).await;
                    }
                }
                None => {
                    for (key, batch) in std::mem::take(&mut batches) {
                        batcher.send(key, batch).await;
                    }
                    return;
                }
            }
            handled += 1;
            if handled >= MAX_COMMANDS_PER_WAKEUP {
                break;
            }
            command = match commands.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
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
    /// Adds a message to its batch, sending batches that are full.
    async fn add(&mut self, batches: &mut Vec<(BatchKey, Batch)>, queued: Queued) {
        let topic = queued.message.topic.as_str();
        let partition = queued.message.partition;
        let position = batches
            .iter()
            .position(|((batch_topic, batch_partition), _)| {
                batch_topic == topic && *batch_partition == partition
            });
        let index = match position {
            Some(index)
                if batches[index].1.bytes + queued.bytes > self.max_batch_bytes
                    && !batches[index].1.records.is_empty() =>
            {
                let (key, batch) = batches.swap_remove(index);
                self.send(key, batch).await;
                None
            }
            other => other,
        };
        let index = match index {
            Some(index) => index,
            None => {
                batches.push((
                    (queued.message.topic.clone(), partition),
                    Batch {
                        records: Vec::with_capacity(self.options.max_batch_messages.min(1024)),
                        waiters: Vec::with_capacity(self.options.max_batch_messages.min(1024)),
                        bytes: 0,
                        deadline: Instant::now() + self.options.linger,
                    },
                ));
                batches.len() - 1
            }
        };
        let batch = &mut batches[index].1;
        batch.records.push(queued.message.record);
        batch.waiters.push(queued.waiter);
        batch.bytes += queued.bytes;
        if batch.records.len() >= self.options.max_batch_messages.max(1)
            || batch.bytes >= self.max_batch_bytes
        {
            let (key, batch) = batches.swap_remove(index);
            self.send(key, batch).await;
        }
    }

    /// Queues one PRODUCE on the connection (in call order) and hands the
    /// wait for its answer to a task.
    async fn send(&mut self, key: BatchKey, batch: Batch) {
        let Ok(permit) = Arc::clone(&self.in_flight).acquire_owned().await else {
            return;
        };
        let (topic, partition) = key;
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
        let retry = idempotence.is_some().then(|| request.clone());
        let first = match shared.conn().await {
            Ok(conn) => conn.start(Request::Produce(request), None).await,
            Err(error) => Err(error),
        };
        let max_retries = self.options.max_retries;
        let backoff = shared.options.reconnect_backoff_initial;
        let gate = Arc::clone(&self.retry_gate);
        let waiters = batch.waiters;
        tokio::spawn(async move {
            let mut result = match first {
                Ok(receiver) => await_reply(receiver, timeout).await,
                Err(error) => Err(error),
            };
            if let Some(request) = retry {
                let mut attempt = 0;
                while attempt < max_retries && result.as_ref().is_err_and(retryable) {
                    attempt += 1;
                    let _order = gate.lock().await;
                    tokio::time::sleep(backoff * attempt).await;
                    result = match shared.conn().await {
                        Ok(conn) => match conn.start(Request::Produce(request.clone()), None).await
                        {
                            Ok(receiver) => await_reply(receiver, timeout).await,
                            Err(error) => Err(error),
                        },
                        Err(error) => Err(error),
                    };
                }
            }
            complete(result, waiters);
            drop(permit);
        });
    }
}

fn retryable(error: &ClientError) -> bool {
    error.is_transient() || error.code() == Some(ErrorCode::OutOfOrderSequence)
}

fn complete(result: Result<Response>, waiters: Vec<Waiter>) {
    let records = match result {
        Ok(Response::ProduceOk(ok)) if ok.records.len() == waiters.len() => ok.records,
        Ok(Response::ProduceOk(ok)) => {
            let error = ClientError::InvalidArgument(format!(
                "broker returned {} results for {} records",
                ok.records.len(),
                waiters.len()
            ));
            return fail(waiters, &error);
        }
        Ok(other) => {
            let error = ClientError::UnexpectedResponse {
                expected: "PRODUCE_OK",
                got: other.opcode(),
            };
            return fail(waiters, &error);
        }
        Err(error) => return fail(waiters, &error),
    };
    for (waiter, record) in waiters.into_iter().zip(records) {
        let receipt = SendReceipt {
            partition: record.partition,
            offset: record.offset,
            id: record.message_id,
            deliver_at: record.deliver_at_ms.map(ms_to_system_time),
        };
        let _ = waiter.reply.send(Ok(receipt));
    }
}

fn fail(waiters: Vec<Waiter>, error: &ClientError) {
    for waiter in waiters {
        let _ = waiter.reply.send(Err(error.clone()));
    }
}
