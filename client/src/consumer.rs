//! Consuming: [`Consumer::subscribe`] joins a group and returns a
//! [`Subscription`], a `Stream` of [`ReceivedMessage`]s pushed by the broker
//! within a credit window; each message is settled with
//! [`ReceivedMessage::ack`] or [`ReceivedMessage::nack`].
//!
//! Flow control: the subscription starts with `credit_window` credits; a
//! credit is given back to the broker when a pushed message is handled
//! (acked, nacked or dropped), so at most `credit_window` messages are ever
//! buffered or being processed. Acks, nacks and credits are batched by a
//! per-subscription task over a short linger into ACK, NACK and CREDIT
//! frames. An ack costs a push onto the subscription's queue under a short
//! lock: the acks of one batch share one completion (the broker's answer to
//! their ACK frame), no channel message or oneshot per ack.
//!
//! After a reconnect the subscription is re-established with the same
//! group and member; messages delivered on the old connection can no longer
//! be acked (the broker redelivers them): their `ack` returns
//! [`ClientError::StaleDelivery`]. A frame the client cannot decode is not
//! a reason to reconnect (the broker would send it again, spending the
//! message's attempts): the stream yields [`ClientError::Protocol`], after
//! the messages already queued, and ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dmq_protocol::{
    Ack, Credit, DeliveryMode, ErrorCode, Fetch, GroupSettings, Header, MessageId, MessagePosition,
    Nack, Request, Response, StartPosition, Subscribe, Unsubscribe,
};
use futures_core::Stream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::client::Client;
use crate::connection::{await_reply, lock};
use crate::error::{ClientError, Result};
use crate::time::{ms_to_system_time, system_time_to_ms};

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// The oldest stored message.
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
    /// The first message stored at or after this time.
    Timestamp(SystemTime),
    /// This offset in every partition.
    Offset(u64),
}

impl Start {
    /// The wire form.
    pub fn to_wire(self) -> StartPosition {
        match self {
            Start::Earliest => StartPosition::Earliest,
            Start::Latest => StartPosition::Latest,
            Start::Timestamp(time) => StartPosition::Timestamp(system_time_to_ms(time)),
            Start::Offset(offset) => StartPosition::Offset(offset),
        }
    }
}

/// How to join a group.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// This member's name, unique in the group.
    pub member_name: String,
    /// Clustering (each message to one member) or broadcast.
    pub mode: DeliveryMode,
    /// Where a new group starts (ignored for an existing group).
    pub start: Start,
    /// Messages the broker may push before they are handled. 0: pull only
    /// ([`Subscription::fetch`]).
    pub credit_window: u32,
    /// Group settings; `None` fields keep the broker's default.
    pub settings: GroupSettings,
    /// Acks and nacks are collected this long into one frame.
    pub ack_linger: Duration,
    /// At most this many positions per ACK or NACK frame.
    pub max_ack_batch: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            member_name: format!("member-{}", std::process::id()),
            mode: DeliveryMode::Clustering,
            start: Start::Earliest,
            credit_window: 1000,
            settings: GroupSettings::default(),
            ack_linger: Duration::from_millis(1),
            max_ack_batch: 1000,
        }
    }
}

/// A consumer: subscribes to topics through one client.
#[derive(Clone)]
pub struct Consumer {
    client: Client,
}

impl Consumer {
    /// A consumer using `client`'s connection.
    pub fn new(client: &Client) -> Self {
        Consumer {
            client: client.clone(),
        }
    }

    /// Joins `group` on `topic` (creating the group if needed).
    pub async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        if topic.is_empty() || group.is_empty() {
            return Err(ClientError::InvalidArgument(
                "topic and group must not be empty".into(),
            ));
        }
        let request = Subscribe {
            topic: topic.to_owned(),
            group: group.to_owned(),
            member_name: options.member_name.clone(),
            mode: options.mode,
            start: options.start.to_wire(),
            credit: options.credit_window,
            settings: options.settings.clone(),
        };
        let capacity = options.credit_window as usize + 16;
        let (sender, receiver) = mpsc::channel(capacity);
        let shared = Arc::new(SubShared {
            request,
            route: Mutex::new(Route::default()),
            deliveries: sender,
            closed: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let client_shared = self.client.shared();
        // A cluster node that does not serve consumers answers WrongNode
        // with the one that does: the connection moves there and the
        // SUBSCRIBE is sent again, within the request timeout.
        let deadline = tokio::time::Instant::now() + client_shared.options.request_timeout;
        let mut redirected = false;
        let result = loop {
            // The connection first: a reconnect holds the lock until the
            // new connection is up.
            let conn = client_shared.conn().await;
            let subscribing = client_shared.subscribing.lock().await;
            let attempt = async {
                let conn = conn?;
                let reply = conn
                    .start(
                        Request::Subscribe(shared.request.clone()),
                        Some(Arc::clone(&shared)),
                    )
                    .await?;
                match await_reply(reply, client_shared.options.request_timeout).await {
                    Ok(Response::Subscribed(subscribed)) => Ok(subscribed.partitions),
                    Ok(other) => Err(ClientError::UnexpectedResponse {
                        expected: "SUBSCRIBED",
                        got: other.opcode(),
                    }),
                    Err(ClientError::Broker {
                        code: ErrorCode::WrongNode,
                        message,
                    }) => {
                        // Empty while no node serves (an election): the
                        // same connection asks again.
                        if !message.is_empty() {
                            conn.redirect_to(&message);
                        }
                        Err(ClientError::Broker {
                            code: ErrorCode::WrongNode,
                            message,
                        })
                    }
                    Err(error) => Err(error),
                }
            }
            .await;
            match attempt {
                Ok(partitions) => {
                    // Before the lock is let go: a reconnect from now on
                    // subscribes it again.
                    lock(&client_shared.subscriptions).push(Arc::downgrade(&shared));
                    break Ok(partitions);
                }
                Err(error) => {
                    drop(subscribing);
                    let wrong_node = matches!(
                        error,
                        ClientError::Broker {
                            code: ErrorCode::WrongNode,
                            ..
                        }
                    );
                    redirected |= wrong_node;
                    let retry = wrong_node || (redirected && error.is_transient());
                    if !retry || tokio::time::Instant::now() >= deadline {
                        break Err(error);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(if wrong_node {
                        50
                    } else {
                        200
                    }))
                    .await;
                }
            }
        };
        let partitions = match result {
            Ok(partitions) => partitions,
            Err(error) => {
                shared.closed.store(true, Ordering::Release);
                return Err(error);
            }
        };
        let acks = Arc::new(AckInner {
            queue: Mutex::new(AckQueue::default()),
            wake: Notify::new(),
            max_batch: options.max_ack_batch.max(1),
            sending: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(ack_loop(
            self.client.clone(),
            Arc::clone(&shared),
            Arc::clone(&acks),
            options.ack_linger,
            options.credit_window > 0,
        ));
        Ok(Subscription {
            client: self.client.clone(),
            shared,
            receiver,
            acker: Arc::new(AckHandle { inner: acks }),
            partitions,
            done: false,
        })
    }
}

/// The subscription's current identity on the live connection.
#[derive(Debug, Default, Clone, Copy)]
struct Route {
    server_id: u64,
    /// Incremented by every (re)subscribe.
    generation: u64,
}

type Item = Result<(u64, dmq_protocol::Delivery)>;

/// State of one subscription shared with the connection's reader (which
/// routes DELIVERs to it) and the supervisor (which re-subscribes it).
pub(crate) struct SubShared {
    pub(crate) request: Subscribe,
    route: Mutex<Route>,
    deliveries: mpsc::Sender<Item>,
    closed: AtomicBool,
    /// Why the subscription ended, when its queue was full at the time:
    /// the stream yields it once the queued messages are taken.
    failure: Mutex<Option<ClientError>>,
}

impl SubShared {
    /// Records the id SUBSCRIBED gave; returns the new generation.
    pub(crate) fn install(&self, server_id: u64) -> u64 {
        let mut route = lock(&self.route);
        route.server_id = server_id;
        route.generation += 1;
        route.generation
    }

    /// The subscription id on the live connection.
    pub(crate) fn server_id(&self) -> u64 {
        lock(&self.route).server_id
    }

    fn current(&self) -> Route {
        *lock(&self.route)
    }

    /// True once the subscription is dropped or failed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Hands a pushed delivery to the stream. False if nobody listens any
    /// more (the route should be removed).
    pub(crate) fn push(&self, delivery: dmq_protocol::Delivery) -> bool {
        if self.is_closed() {
            return false;
        }
        let generation = lock(&self.route).generation;
        match self.deliveries.try_send(Ok((generation, delivery))) {
            Ok(()) => true,
            // More than the credit window: the broker overran it. Dropping
            // is safe: the message is redelivered after its ack timeout.
            Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ends the subscription with `error` (shown in its stream, after the
    /// messages already queued).
    pub(crate) fn fail(&self, error: ClientError) {
        self.closed.store(true, Ordering::Release);
        if let Err(mpsc::error::TrySendError::Full(Err(error))) =
            self.deliveries.try_send(Err(error))
        {
            lock(&self.failure).get_or_insert(error);
        }
    }
}

/// An open subscription: a `Stream` of messages (also [`Subscription::recv`]).
pub struct Subscription {
    client: Client,
    shared: Arc<SubShared>,
    receiver: mpsc::Receiver<Item>,
    acker: Arc<AckHandle>,
    partitions: Vec<u32>,
    done: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.shared.request.topic)
            .field("group", &self.shared.request.group)
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl Subscription {
    /// The topic's partitions (from SUBSCRIBED).
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.shared.request.topic
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.shared.request.group
    }

    /// The next pushed message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Result<ReceivedMessage>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Pulls up to `max` messages, waiting up to `wait` for the first.
    pub async fn fetch(&self, max: u32, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let shared = self.client.shared();
        let conn = shared.conn().await?;
        let route = self.shared.current();
        let request = Fetch {
            subscription_id: route.server_id,
            max_messages: max,
            max_wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        let reply = conn.start(Request::Fetch(request), None).await?;
        match await_reply(reply, shared.options.request_timeout + wait).await? {
            Response::Deliveries(deliveries) => Ok(deliveries
                .deliveries
                .into_iter()
                .map(|delivery| self.message(route.generation, delivery, false))
                .collect()),
            other => Err(ClientError::UnexpectedResponse {
                expected: "DELIVERIES",
                got: other.opcode(),
            }),
        }
    }

    /// Leaves the group; this member's unacked messages are redelivered.
    /// Acks and nacks already made are sent first: a message acked before
    /// `unsubscribe` is never redelivered.
    pub async fn unsubscribe(self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let reply = flush_then_unsubscribe(&self.client, &self.shared, &self.acker.inner).await?;
        await_reply(reply, self.client.shared().options.request_timeout).await?;
        Ok(())
    }

    fn message(
        &self,
        generation: u64,
        delivery: dmq_protocol::Delivery,
        pushed: bool,
    ) -> ReceivedMessage {
        ReceivedMessage {
            topic: delivery.topic,
            partition: delivery.partition,
            offset: delivery.offset,
            attempt: delivery.attempt,
            id: delivery.message_id,
            timestamp: ms_to_system_time(delivery.timestamp_ms),
            key: delivery.key,
            headers: delivery.headers,
            value: delivery.value,
            deliver_at: delivery.deliver_at_ms.map(ms_to_system_time),
            expire_at: delivery.expire_at_ms.map(ms_to_system_time),
            settle: Settle {
                acker: Arc::clone(&self.acker),
                route: Arc::clone(&self.shared),
                generation,
                pushed,
                handled: AtomicBool::new(false),
            },
        }
    }
}

impl Stream for Subscription {
    type Item = Result<ReceivedMessage>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok((generation, delivery)))) => {
                Poll::Ready(Some(Ok(self.message(generation, delivery, true))))
            }
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let failure = lock(&self.shared.failure).take();
                match failure {
                    Some(error) => {
                        self.done = true;
                        Poll::Ready(Some(Err(error)))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Best effort: tell the broker at once rather than at disconnect,
        // after the acks already made (they are not redelivered).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let shared = Arc::clone(&self.shared);
            let acks = Arc::clone(&self.acker.inner);
            runtime.spawn(async move {
                let _ = flush_then_unsubscribe(&client, &shared, &acks).await;
            });
        }
    }
}

/// One delivered message. Settle it with [`ack`](Self::ack) or
/// [`nack`](Self::nack); dropping it unsettled gives its credit back and
/// leaves it to the broker's ack timeout.
#[derive(Debug)]
pub struct ReceivedMessage {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Message id, stable across delay, retry and dead-letter moves.
    pub id: MessageId,
    /// Broker timestamp.
    pub timestamp: SystemTime,
    /// Key.
    pub key: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Payload.
    pub value: Bytes,
    /// When it became deliverable, if it was delayed.
    pub deliver_at: Option<SystemTime>,
    /// When it expires, if it has a TTL.
    pub expire_at: Option<SystemTime>,
    settle: Settle,
}

struct Settle {
    acker: Arc<AckHandle>,
    /// The subscription (its id on the live connection, for TXN_ACK).
    route: Arc<SubShared>,
    generation: u64,
    pushed: bool,
    handled: AtomicBool,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle")
            .field("generation", &self.generation)
            .field("pushed", &self.pushed)
            .field("handled", &self.handled)
            .finish_non_exhaustive()
    }
}

impl ReceivedMessage {
    /// The subscription (whose id on the live connection a TXN_ACK names)
    /// and position to ack this message with in a transaction, if it is
    /// not settled yet and its subscription was not re-made since it was
    /// delivered.
    pub(crate) fn transaction_position(&self) -> Result<(Arc<SubShared>, MessagePosition)> {
        if self.settle.handled.load(Ordering::Acquire) {
            return Err(ClientError::InvalidArgument(
                "message already acked or nacked".into(),
            ));
        }
        let route = self.settle.route.current();
        if route.generation != self.settle.generation {
            return Err(ClientError::StaleDelivery);
        }
        let position = MessagePosition {
            partition: self.partition,
            offset: self.offset,
        };
        Ok((Arc::clone(&self.settle.route), position))
    }

    /// Acked in a transaction: settled here (its push credit given back).
    pub(crate) fn settled_in_transaction(&self) {
        if !self.settle.handled.swap(true, Ordering::AcqRel) && self.settle.pushed {
            self.settle.acker.inner.credit(self.settle.generation);
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &[u8]) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|header| header.name.as_ref() == name)
            .map(|header| &header.value)
    }

    /// Acknowledges the message. The ack is queued at once (batched into an
    /// ACK frame after a short linger); the future resolves when the broker
    /// confirms it, and may be dropped if the confirmation is not needed.
    pub fn ack(&self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        self.settle_with(None)
    }

    /// Rejects the message: redeliver after `delay` (`None`: the group's
    /// backoff). Queued at once like [`ack`](Self::ack).
    pub fn nack(
        &self,
        delay: Option<Duration>,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let delay_ms = delay.map(|delay| u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self.settle_with(Some(delay_ms))
    }

    fn settle_with(
        &self,
        nack: Option<Option<u64>>,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let already = self.settle.handled.swap(true, Ordering::AcqRel);
        let position = MessagePosition {
            partition: self.partition,
            offset: self.offset,
        };
        let (generation, credit) = (self.settle.generation, self.settle.pushed);
        let waiting = if already {
            None
        } else {
            self.settle
                .acker
                .inner
                .settle(position, generation, credit, nack)
        };
        async move {
            if already {
                return Err(ClientError::InvalidArgument(
                    "message already acked or nacked".into(),
                ));
            }
            match waiting {
                Some(Waiting::Batch(mut done)) => match done.wait_for(Option::is_some).await {
                    Ok(result) => result.clone().unwrap_or(Err(ClientError::Closed)),
                    Err(_) => Err(ClientError::Closed),
                },
                Some(Waiting::One(receiver)) => receiver.await.unwrap_or(Err(ClientError::Closed)),
                None => Err(ClientError::Closed),
            }
        }
    }
}

impl Drop for ReceivedMessage {
    fn drop(&mut self) {
        if self.settle.pushed && !self.settle.handled.swap(true, Ordering::AcqRel) {
            self.settle.acker.inner.credit(self.settle.generation);
        }
    }
}

/// The subscription's side of the ack queue; the last one dropped (by
/// the subscription and its messages) ends the ack task.
#[derive(Debug)]
struct AckHandle {
    inner: Arc<AckInner>,
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        lock(&self.inner.queue).closed = true;
        self.inner.wake.notify_one();
    }
}

/// The queue of settlements waiting for the ack task.
#[derive(Debug)]
struct AckInner {
    queue: Mutex<AckQueue>,
    /// Wakes the ack task: the queue became non-empty, full, or closed.
    wake: Notify,
    /// Positions per ACK or NACK frame, at most.
    max_batch: usize,
    /// Held while a batch is taken and its frames queued on the
    /// connection, so that an UNSUBSCRIBE queued after a flush follows
    /// every ack made before it.
    sending: tokio::sync::Mutex<()>,
}

/// The result of a batch of acks, shared by their futures.
type BatchResult = Option<Result<()>>;

#[derive(Debug, Default)]
struct AckQueue {
    /// Acks in runs of one generation, each run with one completion.
    acks: Vec<AckRun>,
    /// Nacks (rare): one reply each.
    nacks: Vec<NackCommand>,
    /// Credits to give back, per generation.
    credits: Vec<(u64, u32)>,
    /// Settlements queued (acks and nacks).
    len: usize,
    closed: bool,
}

#[derive(Debug)]
struct AckRun {
    generation: u64,
    positions: Vec<MessagePosition>,
    done: watch::Sender<BatchResult>,
}

#[derive(Debug)]
struct NackCommand {
    position: MessagePosition,
    generation: u64,
    delay_ms: Option<u64>,
    reply: oneshot::Sender<Result<()>>,
}

/// What a settlement's future waits for.
enum Waiting {
    Batch(watch::Receiver<BatchResult>),
    One(oneshot::Receiver<Result<()>>),
}

impl AckQueue {
    fn is_empty(&self) -> bool {
        self.len == 0 && self.credits.is_empty()
    }

    fn add_credit(&mut self, generation: u64) {
        match self.credits.last_mut() {
            Some((last, count)) if *last == generation => *count = count.saturating_add(1),
            _ => self.credits.push((generation, 1)),
        }
    }
}

impl AckInner {
    /// Queues an ack (`nack` None) or a nack; None if the subscription is
    /// closed.
    fn settle(
        &self,
        position: MessagePosition,
        generation: u64,
        credit: bool,
        nack: Option<Option<u64>>,
    ) -> Option<Waiting> {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return None;
        }
        let was_empty = queue.is_empty();
        let waiting = match nack {
            None => {
                // A run is one ACK frame: at most `max_batch` positions.
                let max_batch = self.max_batch;
                let run = match queue.acks.last_mut() {
                    Some(run)
                        if run.generation == generation && run.positions.len() < max_batch =>
                    {
                        run
                    }
                    _ => {
                        queue.acks.push(AckRun {
                            generation,
                            positions: Vec::new(),
                            done: watch::Sender::new(None),
                        });
                        queue.acks.last_mut()?
                    }
                };
                run.positions.push(position);
                Waiting::Batch(run.done.subscribe())
            }
            Some(delay_ms) => {
                let (reply, receiver) = oneshot::channel();
                queue.nacks.push(NackCommand {
                    position,
                    generation,
                    delay_ms,
                    reply,
                });
                Waiting::One(receiver)
            }
        };
        if credit {
            queue.add_credit(generation);
        }
        queue.len += 1;
        let full = queue.len >= self.max_batch;
        drop(queue);
        if was_empty || full {
            self.wake.notify_one();
        }
        Some(waiting)
    }

    /// A pushed message dropped unsettled: its credit only.
    fn credit(&self, generation: u64) {
        let mut queue = lock(&self.queue);
        let was_empty = queue.is_empty();
        queue.add_credit(generation);
        drop(queue);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Takes up to `max_batch` settlements and the credits queued so far.
    fn take(&self) -> AckQueue {
        let mut queue = lock(&self.queue);
        let closed = queue.closed;
        let mut taken = std::mem::take(&mut *queue);
        queue.closed = closed;
        taken.closed = closed;
        taken
    }
}

/// Batches acks, nacks and credits of one subscription into frames.
async fn ack_loop(
    client: Client,
    shared: Arc<SubShared>,
    acks: Arc<AckInner>,
    linger: Duration,
    credit_enabled: bool,
) {
    loop {
        acks.wake.notified().await;
        {
            let queue = lock(&acks.queue);
            if queue.is_empty() {
                if queue.closed {
                    return;
                }
                continue;
            }
        }
        // One timer per batch: it bounds the wait for more settlements; a
        // full batch or the last handle dropped ends the wait early.
        let linger_end = tokio::time::sleep_until(Instant::now() + linger);
        tokio::pin!(linger_end);
        loop {
            {
                let queue = lock(&acks.queue);
                if queue.len >= acks.max_batch || queue.closed {
                    break;
                }
            }
            tokio::select! {
                biased;
                _ = acks.wake.notified() => {}
                _ = &mut linger_end => break,
            }
        }
        let closed = {
            let _sending = acks.sending.lock().await;
            let batch = acks.take();
            let closed = batch.closed;
            flush_acks(&client, &shared, batch, credit_enabled).await;
            closed
        };
        if closed {
            return;
        }
    }
}

/// Queues this subscription's pending acks and nacks, then UNSUBSCRIBE,
/// on the connection, in that order; returns the UNSUBSCRIBE's reply.
async fn flush_then_unsubscribe(
    client: &Client,
    shared: &SubShared,
    acks: &AckInner,
) -> Result<oneshot::Receiver<Result<Response>>> {
    let _sending = acks.sending.lock().await;
    let batch = acks.take();
    flush_acks(client, shared, batch, false).await;
    let conn = client.shared().conn().await?;
    let subscription_id = shared.server_id();
    conn.remove_route(subscription_id);
    conn.start(Request::Unsubscribe(Unsubscribe { subscription_id }), None)
        .await
}

type Replies = Vec<oneshot::Sender<Result<()>>>;

/// Who hears how a request went.
enum Completion {
    /// The acks of one run.
    Batch(watch::Sender<BatchResult>),
    /// One reply per nacked message.
    Each(Replies),
    /// Nobody (CREDIT).
    Nobody,
}

impl Completion {
    fn complete(self, result: &Result<()>) {
        match self {
            Completion::Batch(done) => {
                done.send_replace(Some(result.clone()));
            }
            Completion::Each(replies) => {
                for reply in replies {
                    let _ = reply.send(result.clone());
                }
            }
            Completion::Nobody => {}
        }
    }
}

async fn flush_acks(client: &Client, shared: &SubShared, batch: AckQueue, credit_enabled: bool) {
    let route = shared.current();
    let subscription_id = route.server_id;
    let mut requests: Vec<(Request, Completion)> = Vec::new();
    for run in batch.acks {
        if run.generation != route.generation {
            Completion::Batch(run.done).complete(&Err(ClientError::StaleDelivery));
            continue;
        }
        let ack = Ack {
            subscription_id,
            messages: run.positions,
        };
        requests.push((Request::Ack(ack), Completion::Batch(run.done)));
    }
    let mut nacks: HashMap<Option<u64>, (Vec<MessagePosition>, Replies)> = HashMap::new();
    for nack in batch.nacks {
        if nack.generation != route.generation {
            let _ = nack.reply.send(Err(ClientError::StaleDelivery));
            continue;
        }
        let (positions, replies) = nacks.entry(nack.delay_ms).or_default();
        positions.push(nack.position);
        replies.push(nack.reply);
    }
    for (delay_ms, (messages, replies)) in nacks {
        let nack = Nack {
            subscription_id,
            messages,
            delay_ms,
        };
        requests.push((Request::Nack(nack), Completion::Each(replies)));
    }
    let credit: u32 = batch
        .credits
        .iter()
        .filter(|(generation, _)| *generation == route.generation)
        .fold(0u32, |sum, (_, count)| sum.saturating_add(*count));
    if credit_enabled && credit > 0 && !shared.is_closed() {
        let request = Request::Credit(Credit {
            subscription_id,
            credit,
        });
        requests.push((request, Completion::Nobody));
    }
    if requests.is_empty() {
        return;
    }
    let client_shared = client.shared();
    let conn = match client_shared.conn().await {
        Ok(conn) if shared.current().generation == route.generation => conn,
        Ok(_) => {
            fail_all(requests, &ClientError::StaleDelivery);
            return;
        }
        Err(error) => {
            fail_all(requests, &error);
            return;
        }
    };
    let timeout = client_shared.options.request_timeout;
    for (request, completion) in requests {
        match conn.start(request, None).await {
            Ok(receiver) => {
                tokio::spawn(async move {
                    let result = await_reply(receiver, timeout).await.map(|_| ());
                    completion.complete(&result);
                });
            }
            Err(error) => completion.complete(&Err(error)),
        }
    }
}

fn fail_all(requests: Vec<(Request, Completion)>, error: &ClientError) {
    for (_, completion) in requests {
        completion.complete(&Err(error.clone()));
    }
}
