//! [`Client`]: one supervised connection to a broker, shared by producers,
//! consumers and admin calls; [`Client::request`] is the raw pipelined
//! request path everything else is built on. Admin calls (topics, groups,
//! seek, cancel delay, delete messages) are methods of the client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmq_protocol::{
    CancelDelay, CreateTopic, DeleteGroup, DeleteMessages, DeleteTopic, DescribeGroup,
    DescribeTopic, GroupDescription, GroupSummary, HelloOk, ListGroups, MessageId, PartitionLeader,
    PartitionLeaders, Request, Response, Seek, SeekReport, StartPosition, Tombstone,
    TopicDescription, TopicSummary,
};
use tokio::sync::watch;

use crate::connection::{await_reply, supervise, Brokers, ConnState, Shared};
use crate::consumer::Consumer;
use crate::error::{ClientError, Result};
use crate::options::{ClientOptions, ProducerOptions};
use crate::producer::Producer;

/// A connection to a broker, cheap to clone. The connection is re-opened
/// with backoff when it drops; the client closes when the last clone (and
/// every producer, subscription and unsettled message using it) is dropped,
/// or on [`Client::close`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("brokers", &self.inner.shared.addrs.all())
            .field("client_id", &self.inner.shared.options.client_id)
            .finish()
    }
}

/// Expects one response variant, else [`ClientError::UnexpectedResponse`].
macro_rules! expect {
    ($response:expr, $variant:ident, $name:literal) => {
        match $response {
            Response::$variant(body) => Ok(body),
            other => Err(ClientError::UnexpectedResponse {
                expected: $name,
                got: other.opcode(),
            }),
        }
    };
}

impl Client {
    /// Connects to `addr` (`host:port`) and exchanges HELLO. Fails if the
    /// first connection cannot be made; later drops are reconnected.
    ///
    /// `addr` may list several brokers separated by commas (a cluster's
    /// nodes, any of which takes every request): the client connects to
    /// the first that answers, and when its connection drops it tries
    /// that one again, then the next in turn, so a node that dies does not
    /// stop the client. An idempotent producer's batches in flight then
    /// are retried through the next node, which answers a batch it already
    /// committed with its original offsets (docs/replication.md).
    pub async fn connect(addr: impl Into<String>, options: ClientOptions) -> Result<Client> {
        let addrs = Brokers::parse(&addr.into())?;
        let session = addrs.connect_any(&options).await?;
        let (state, _) = watch::channel(ConnState::Connected(Arc::clone(&session.conn)));
        let shared = Arc::new(Shared {
            addrs,
            options,
            state,
            subscriptions: std::sync::Mutex::new(Vec::new()),
            subscribing: tokio::sync::Mutex::new(()),
            check_listeners: std::sync::Mutex::new(Vec::new()),
            txn_producers: std::sync::Mutex::new(Vec::new()),
        });
        let (shutdown, shutdown_receiver) = watch::channel(false);
        tokio::spawn(supervise(Arc::clone(&shared), session, shutdown_receiver));
        Ok(Client {
            inner: Arc::new(ClientInner { shared, shutdown }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The options the client was opened with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.shared.options
    }

    /// The broker's HELLO_OK on the live connection (version, maximum frame
    /// size, broker id), waiting for a reconnect if needed.
    pub async fn server_info(&self) -> Result<HelloOk> {
        Ok(self.inner.shared.conn().await?.hello.clone())
    }

    /// Closes the connection; every pending and later request fails with
    /// [`ClientError::Closed`] or [`ClientError::ConnectionLost`].
    pub fn close(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// A producer with default options.
    pub fn producer(&self) -> Producer {
        Producer::new(self, ProducerOptions::default())
    }

    /// A producer with these options.
    pub fn producer_with(&self, options: ProducerOptions) -> Producer {
        Producer::new(self, options)
    }

    /// A consumer.
    pub fn consumer(&self) -> Consumer {
        Consumer::new(self)
    }

    /// Sends one request and waits for its response (an ERROR response is
    /// returned as [`ClientError::Broker`]). Requests from concurrent
    /// callers are pipelined on the one connection.
    pub async fn request(&self, request: Request) -> Result<Response> {
        self.request_with_timeout(request, self.options().request_timeout)
            .await
    }

    /// [`Client::request`] with its own timeout.
    pub async fn request_with_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response> {
        let conn = self.inner.shared.conn().await?;
        let receiver = conn.start(request, None).await?;
        await_reply(receiver, timeout).await
    }

    /// Sends `request`, one the node serving consumers of cluster topics
    /// must take (a SEEK): a node that does not serve them answers
    /// `WrongNode` with the one that does, and the connection moves there
    /// and sends it again, within the request timeout (an empty address,
    /// while no node serves, is asked again).
    async fn request_where_consumers_are_served(&self, request: Request) -> Result<Response> {
        let timeout = self.options().request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let conn = self.inner.shared.conn().await?;
            let receiver = conn.start(request.clone(), None).await?;
            match await_reply(receiver, timeout).await {
                Err(ClientError::Broker {
                    code: dmq_protocol::ErrorCode::WrongNode,
                    message,
                }) if tokio::time::Instant::now() < deadline => {
                    if !message.is_empty() {
                        conn.redirect_to(&message);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Round trip time of a PING.
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        match self.request(Request::Ping).await? {
            Response::Pong => Ok(started.elapsed()),
            other => Err(ClientError::UnexpectedResponse {
                expected: "PONG",
                got: other.opcode(),
            }),
        }
    }

    /// Creates a topic. A name that exists, whatever its settings, is an
    /// error whose [`code`](crate::ClientError::code) is
    /// [`ErrorCode::TopicExists`](crate::ErrorCode::TopicExists): match it
    /// to accept an existing topic.
    pub async fn create_topic(&self, name: &str, partitions: u32, ordered: bool) -> Result<()> {
        let request = CreateTopic {
            name: name.to_owned(),
            partitions,
            ordered,
        };
        self.request_ok(request.into()).await
    }

    /// Deletes a topic and its messages.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = DeleteTopic {
            name: name.to_owned(),
        };
        self.request_ok(request.into()).await
    }

    /// Every topic the client may see.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        let response = self.request(Request::ListTopics).await?;
        Ok(expect!(response, Topics, "TOPICS")?.topics)
    }

    /// One topic: partitions with their offsets, groups.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let request = DescribeTopic {
            name: name.to_owned(),
        };
        let response = self.request(request.into()).await?;
        expect!(response, TopicDescription, "TOPIC_DESCRIPTION")
    }

    /// Who leads each partition of `topic` (PARTITION_LEADERS, PROTOCOL.md
    /// §6.38), one entry per partition: on a cluster, the node a
    /// partition's produces are best sent to; an empty address (a single
    /// broker, no leader known) means the node asked.
    pub async fn partition_leaders(&self, topic: &str) -> Result<Vec<PartitionLeader>> {
        let request = PartitionLeaders {
            topic: topic.to_owned(),
        };
        let response = self.request(request.into()).await?;
        Ok(expect!(response, Leaders, "LEADERS")?.partitions)
    }

    /// A topic's consumer groups.
    pub async fn list_groups(&self, topic: &str) -> Result<Vec<GroupSummary>> {
        let request = ListGroups {
            topic: topic.to_owned(),
        };
        let response = self.request(request.into()).await?;
        Ok(expect!(response, Groups, "GROUPS")?.groups)
    }

    /// One group: per partition ack floor, end offset, lag, unacked, ...
    pub async fn describe_group(&self, topic: &str, group: &str) -> Result<GroupDescription> {
        let request = DescribeGroup {
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        let response = self.request(request.into()).await?;
        expect!(response, GroupDescription, "GROUP_DESCRIPTION")
    }

    /// Forgets a group and its positions.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        let request = DeleteGroup {
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        self.request_ok(request.into()).await
    }

    /// Moves a group (one partition, or all with `None`) to `target`; with
    /// `dry_run` only reports what would change.
    pub async fn seek(
        &self,
        topic: &str,
        group: &str,
        partition: Option<u32>,
        target: StartPosition,
        dry_run: bool,
    ) -> Result<SeekReport> {
        let request = Seek {
            topic: topic.to_owned(),
            group: group.to_owned(),
            partition,
            target,
            dry_run,
        };
        let response = self
            .request_where_consumers_are_served(request.into())
            .await?;
        expect!(response, SeekReport, "SEEK_REPORT")
    }

    /// Cancels a delayed message; false if it was not pending (unknown or
    /// already delivered).
    pub async fn cancel_delay(&self, message_id: MessageId) -> Result<bool> {
        let response = self.request(CancelDelay { message_id }.into()).await?;
        Ok(expect!(response, CancelDelayOk, "CANCEL_DELAY_OK")?.cancelled)
    }

    /// Deletes messages (tombstones) for every group.
    pub async fn delete_messages(&self, topic: &str, tombstone: Tombstone) -> Result<()> {
        let request = DeleteMessages {
            topic: topic.to_owned(),
            tombstone,
        };
        self.request_ok(request.into()).await
    }

    async fn request_ok(&self, request: Request) -> Result<()> {
        match self.request(request).await? {
            Response::Ok => Ok(()),
            other => Err(ClientError::UnexpectedResponse {
                expected: "OK",
                got: other.opcode(),
            }),
        }
    }
}
