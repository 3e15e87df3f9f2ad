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
//! frames.
//!
//! After a reconnect the subscription is re-established with the same
//! group and member; messages delivered on the old connection can no longer
//! be acked (the broker redelivers them): their `ack` returns
//! [`ClientError::StaleDelivery`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dmq_protocol::{
    Ack, Credit, DeliveryMode, Fetch, GroupSettings, Header, MessageId, MessagePosition, Nack,
    Request, Response, StartPosition, Subscribe, Unsubscribe,
};
use futures_core::Stream;
use tokio::sync::{mpsc, oneshot};
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
        });
        let client_shared = self.client.shared();
        lock(&client_shared.subscriptions).push(Arc::downgrade(&shared));
        let result = async {
            let conn = client_shared.conn().await?;
            let reply = conn
                .start(
                    Request::Subscribe(shared.request.clone()),
                    Some(Arc::clone(&shared)),
                )
                .await?;
            match await_reply(reply, client_shared.options.request_timeout).await? {
                Response::Subscribed(subscribed) => Ok(subscribed.partitions),
                other => Err(ClientError::UnexpectedResponse {
                    expected: "SUBSCRIBED",
                    got: other.opcode(),
                }),
            }
        }
        .await;
        let partitions = match result {
            Ok(partitions) => partitions,
            Err(error) => {
                shared.closed.store(true, Ordering::Release);
                return Err(error);
            }
        };
        let (ack_sender, ack_receiver) = mpsc::unbounded_channel();
        tokio::spawn(ack_loop(
            self.client.clone(),
            Arc::clone(&shared),
            ack_receiver,
            options.ack_linger,
            options.max_ack_batch.max(1),
            options.credit_window > 0,
        ));
        Ok(Subscription {
            client: self.client.clone(),
            shared,
            receiver,
            acker: Arc::new(AckHandle { sender: ack_sender }),
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

    /// Ends the subscription with `error` (shown in its stream).
    pub(crate) fn fail(&self, error: ClientError) {
        self.closed.store(true, Ordering::Release);
        let _ = self.deliveries.try_send(Err(error));
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
    pub async fn unsubscribe(self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let shared = self.client.shared();
        let conn = shared.conn().await?;
        let subscription_id = self.shared.server_id();
        conn.remove_route(subscription_id);
        let reply = conn
            .start(Request::Unsubscribe(Unsubscribe { subscription_id }), None)
            .await?;
        await_reply(reply, shared.options.request_timeout).await?;
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
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Best effort: tell the broker at once rather than at disconnect.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let subscription_id = self.shared.server_id();
            runtime.spawn(async move {
                if let Ok(conn) = client.shared().conn().await {
                    conn.remove_route(subscription_id);
                    let _ = conn
                        .start(Request::Unsubscribe(Unsubscribe { subscription_id }), None)
                        .await;
                }
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

#[derive(Debug)]
struct Settle {
    acker: Arc<AckHandle>,
    generation: u64,
    pushed: bool,
    handled: AtomicBool,
}

impl ReceivedMessage {
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
        let (reply, receiver) = oneshot::channel();
        let queued = !already
            && self
                .settle
                .acker
                .sender
                .send(AckCommand::Settle {
                    position: MessagePosition {
                        partition: self.partition,
                        offset: self.offset,
                    },
                    generation: self.settle.generation,
                    credit: self.settle.pushed,
                    nack,
                    reply,
                })
                .is_ok();
        async move {
            if already {
                return Err(ClientError::InvalidArgument(
                    "message already acked or nacked".into(),
                ));
            }
            if !queued {
                return Err(ClientError::Closed);
            }
            receiver.await.unwrap_or(Err(ClientError::Closed))
        }
    }
}

impl Drop for ReceivedMessage {
    fn drop(&mut self) {
        if self.settle.pushed && !self.settle.handled.swap(true, Ordering::AcqRel) {
            let _ = self.settle.acker.sender.send(AckCommand::Credit {
                generation: self.settle.generation,
            });
        }
    }
}

#[derive(Debug)]
struct AckHandle {
    sender: mpsc::UnboundedSender<AckCommand>,
}

#[derive(Debug)]
enum AckCommand {
    Settle {
        position: MessagePosition,
        generation: u64,
        /// Give a credit back (pushed message).
        credit: bool,
        /// `None`: ack; `Some(delay)`: nack.
        nack: Option<Option<u64>>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A pushed message dropped unsettled: its credit only.
    Credit { generation: u64 },
}

type Replies = Vec<oneshot::Sender<Result<()>>>;

/// Batches acks, nacks and credits of one subscription into frames.
async fn ack_loop(
    client: Client,
    shared: Arc<SubShared>,
    mut commands: mpsc::UnboundedReceiver<AckCommand>,
    linger: Duration,
    max_batch: usize,
    credit_enabled: bool,
) {
    while let Some(first) = commands.recv().await {
        let mut batch = vec![first];
        // One timer per batch, not one per command: what is queued already
        // is taken without waiting, the timer only bounds the wait for more.
        let linger_end = tokio::time::sleep_until(Instant::now() + linger);
        tokio::pin!(linger_end);
        while batch.len() < max_batch {
            match commands.try_recv() {
                Ok(command) => {
                    batch.push(command);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(command) => batch.push(command),
                    None => break,
                },
                _ = &mut linger_end => break,
            }
        }
        flush_acks(&client, &shared, batch, credit_enabled).await;
    }
}

async fn flush_acks(
    client: &Client,
    shared: &SubShared,
    batch: Vec<AckCommand>,
    credit_enabled: bool,
) {
    let route = shared.current();
    let mut acks: (Vec<MessagePosition>, Replies) = (Vec::new(), Vec::new());
    let mut nacks: HashMap<Option<u64>, (Vec<MessagePosition>, Replies)> = HashMap::new();
    let mut credit: u32 = 0;
    for command in batch {
        match command {
            AckCommand::Settle {
                position,
                generation,
                credit: give_credit,
                nack,
                reply,
            } => {
                if generation != route.generation {
                    let _ = reply.send(Err(ClientError::StaleDelivery));
                    continue;
                }
                if give_credit {
                    credit = credit.saturating_add(1);
                }
                let (positions, replies) = match nack {
                    None => &mut acks,
                    Some(delay) => nacks.entry(delay).or_default(),
                };
                positions.push(position);
                replies.push(reply);
            }
            AckCommand::Credit { generation } => {
                if generation == route.generation {
                    credit = credit.saturating_add(1);
                }
            }
        }
    }
    let subscription_id = route.server_id;
    let mut requests: Vec<(Request, Replies)> = Vec::new();
    if !acks.0.is_empty() {
        let ack = Ack {
            subscription_id,
            messages: acks.0,
        };
        requests.push((Request::Ack(ack), acks.1));
    }
    for (delay_ms, (messages, replies)) in nacks {
        let nack = Nack {
            subscription_id,
            messages,
            delay_ms,
        };
        requests.push((Request::Nack(nack), replies));
    }
    if credit_enabled && credit > 0 && !shared.is_closed() {
        let request = Request::Credit(Credit {
            subscription_id,
            credit,
        });
        requests.push((request, Vec::new()));
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
    for (request, replies) in requests {
        match conn.start(request, None).await {
            Ok(receiver) => {
                tokio::spawn(async move {
                    let result = await_reply(receiver, timeout).await.map(|_| ());
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                });
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

fn fail_all(requests: Vec<(Request, Replies)>, error: &ClientError) {
    for (_, replies) in requests {
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
    }
}
