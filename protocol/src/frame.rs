//! The frame and everything it can carry: [`Frame`] (correlation id, flags,
//! [`Body`]), the three body families [`Request`] (client → broker),
//! [`Response`] (broker → client, echoing the request's correlation id) and
//! [`Push`] (broker-initiated, correlation id 0), their [`Opcode`]s and one
//! struct per body.
//!
//! Opcode ranges: requests `0x0001..=0x7FFF`, responses `0x8000..=0xBFFF`,
//! pushes `0xC000..=0xFFFF`. Like error codes, opcode numbers are permanent.

use bytes::Bytes;

use crate::error::ErrorCode;
use crate::types::{
    DeliveryMode, DeliveryTime, GroupSettings, Header, MessageId, MessagePosition, StartPosition,
    Tombstone,
};

macro_rules! opcodes {
    ($( $(#[doc = $doc:literal])* $name:ident = $value:literal => $wire:literal, )*) => {
        /// A frame's u16 opcode. Numbers are permanent.
        #[repr(u16)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Opcode {
            $( $(#[doc = $doc])* $name = $value, )*
        }

        impl Opcode {
            /// Every opcode, in numeric order.
            pub const ALL: &'static [Opcode] = &[$(Opcode::$name,)*];

            /// The opcode for a number, if defined.
            pub fn from_u16(value: u16) -> Option<Opcode> {
                match value {
                    $( $value => Some(Opcode::$name), )*
                    _ => None,
                }
            }

            /// The number sent on the wire.
            pub fn as_u16(self) -> u16 {
                self as u16
            }

            /// The name used in PROTOCOL.md, e.g. `"PRODUCE_OK"`.
            pub fn name(self) -> &'static str {
                match self {
                    $( Opcode::$name => $wire, )*
                }
            }
        }
    };
}

opcodes! {
    /// Request: handshake.
    Hello = 0x0001 => "HELLO",
    /// Request: liveness check.
    Ping = 0x0002 => "PING",
    /// Request: append a batch of records to a topic.
    Produce = 0x0010 => "PRODUCE",
    /// Request: cancel a delayed message.
    CancelDelay = 0x0011 => "CANCEL_DELAY",
    /// Request: delete messages (tombstone).
    DeleteMessages = 0x0012 => "DELETE_MESSAGES",
    /// Store half records of a transaction.
    TxnProduce = 0x0013 => "TXN_PRODUCE",
    /// Commit or roll back a transaction.
    TxnEnd = 0x0014 => "TXN_END",
    /// Receive the check-backs of a producer group on this connection.
    TxnListen = 0x0015 => "TXN_LISTEN",
    /// Register a transactional producer instance: its epoch.
    TxnInit = 0x0016 => "TXN_INIT",
    /// Ack consumed messages inside a transaction (applied at its commit).
    TxnAck = 0x0017 => "TXN_ACK",
    /// Store half records of a transaction, numbered so that a retry is
    /// answered instead of stored again.
    TxnProduceSeq = 0x0018 => "TXN_PRODUCE_SEQ",
    /// Request: join a consumer group.
    Subscribe = 0x0020 => "SUBSCRIBE",
    /// Request: leave a consumer group.
    Unsubscribe = 0x0021 => "UNSUBSCRIBE",
    /// Request: allow more pushed deliveries.
    Credit = 0x0022 => "CREDIT",
    /// Request: pull deliveries.
    Fetch = 0x0023 => "FETCH",
    /// Request: acknowledge messages.
    Ack = 0x0024 => "ACK",
    /// Request: reject messages (redeliver later).
    Nack = 0x0025 => "NACK",
    /// Request: move a group's position.
    Seek = 0x0026 => "SEEK",
    /// Request: create a topic.
    CreateTopic = 0x0030 => "CREATE_TOPIC",
    /// Request: delete a topic.
    DeleteTopic = 0x0031 => "DELETE_TOPIC",
    /// Request: list topics.
    ListTopics = 0x0032 => "LIST_TOPICS",
    /// Request: describe a topic.
    DescribeTopic = 0x0033 => "DESCRIBE_TOPIC",
    /// Request: which node leads each partition of a topic.
    PartitionLeaders = 0x0034 => "PARTITION_LEADERS",
    /// Request: list a topic's groups.
    ListGroups = 0x0040 => "LIST_GROUPS",
    /// Request: describe a group.
    DescribeGroup = 0x0041 => "DESCRIBE_GROUP",
    /// Request: delete a group.
    DeleteGroup = 0x0042 => "DELETE_GROUP",
    /// Response: success without data.
    Ok = 0x8000 => "OK",
    /// Response to HELLO.
    HelloOk = 0x8001 => "HELLO_OK",
    /// Response to PING.
    Pong = 0x8002 => "PONG",
    /// Response to PRODUCE.
    ProduceOk = 0x8010 => "PRODUCE_OK",
    /// Response to CANCEL_DELAY.
    CancelDelayOk = 0x8011 => "CANCEL_DELAY_OK",
    /// Response to TXN_PRODUCE.
    TxnProduceOk = 0x8013 => "TXN_PRODUCE_OK",
    /// Response to TXN_END.
    TxnEnded = 0x8014 => "TXN_ENDED",
    /// Response to TXN_INIT.
    TxnInitOk = 0x8016 => "TXN_INIT_OK",
    /// Response to TXN_ACK.
    TxnAcked = 0x8017 => "TXN_ACKED",
    /// Response to SUBSCRIBE.
    Subscribed = 0x8020 => "SUBSCRIBED",
    /// Response to FETCH.
    Deliveries = 0x8023 => "DELIVERIES",
    /// Response to SEEK.
    SeekReport = 0x8026 => "SEEK_REPORT",
    /// Response to LIST_TOPICS.
    Topics = 0x8032 => "TOPICS",
    /// Response to DESCRIBE_TOPIC.
    TopicDescription = 0x8033 => "TOPIC_DESCRIPTION",
    /// Response to PARTITION_LEADERS.
    Leaders = 0x8034 => "LEADERS",
    /// Response to LIST_GROUPS.
    Groups = 0x8040 => "GROUPS",
    /// Response to DESCRIBE_GROUP.
    GroupDescription = 0x8041 => "GROUP_DESCRIPTION",
    /// Response: failure (code + message), to any request.
    Error = 0xBFFF => "ERROR",
    /// Push: one message for a subscription.
    Deliver = 0xC001 => "DELIVER",
    /// The broker asks how a transaction left open ended (check-back).
    TxnCheck = 0xC002 => "TXN_CHECK",
}

/// Bits of the header's flags byte. Version 1 defines none: senders send 0,
/// receivers ignore bits they do not know (and the decoder keeps them).
pub mod flags {
    /// No flags.
    pub const NONE: u8 = 0;
}

/// One frame: `u32 length | u16 opcode | u32 correlation id | u8 flags | body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the client per request (non-zero), echoed in the response;
    /// always 0 in pushes.
    pub correlation_id: u32,
    /// Header flags (see [`flags`]).
    pub flags: u8,
    /// The body; its variant determines the opcode.
    pub body: Body,
}

impl Frame {
    /// A request frame.
    pub fn request(correlation_id: u32, request: impl Into<Request>) -> Frame {
        Frame {
            correlation_id,
            flags: flags::NONE,
            body: Body::Request(request.into()),
        }
    }

    /// A response frame answering the request with `correlation_id`.
    pub fn response(correlation_id: u32, response: impl Into<Response>) -> Frame {
        Frame {
            correlation_id,
            flags: flags::NONE,
            body: Body::Response(response.into()),
        }
    }

    /// An ERROR response.
    pub fn error(correlation_id: u32, code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::response(correlation_id, ErrorResponse::new(code, message))
    }

    /// A push frame (correlation id 0).
    pub fn push(push: impl Into<Push>) -> Frame {
        Frame {
            correlation_id: 0,
            flags: flags::NONE,
            body: Body::Push(push.into()),
        }
    }

    /// The frame's opcode.
    pub fn opcode(&self) -> Opcode {
        self.body.opcode()
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Client → broker.
    Request(Request),
    /// Broker → client, answering one request.
    Response(Response),
    /// Broker → client, unsolicited.
    Push(Push),
}

impl Body {
    /// The body's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Body::Request(request) => request.opcode(),
            Body::Response(response) => response.opcode(),
            Body::Push(push) => push.opcode(),
        }
    }
}

impl From<Request> for Body {
    fn from(request: Request) -> Self {
        Body::Request(request)
    }
}

impl From<Response> for Body {
    fn from(response: Response) -> Self {
        Body::Response(response)
    }
}

impl From<Push> for Body {
    fn from(push: Push) -> Self {
        Body::Push(push)
    }
}

/// Generates `From<Struct> for Enum` for each `Variant(Struct)`.
macro_rules! from_structs {
    ($enum:ident: $($variant:ident),* $(,)?) => {
        $(
            impl From<$variant> for $enum {
                fn from(body: $variant) -> Self {
                    $enum::$variant(body)
                }
            }
        )*
    };
}

/// A client's request. Every request gets exactly one response frame with
/// its correlation id: the specific response, [`Response::Ok`] or
/// [`Response::Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// HELLO → HELLO_OK.
    Hello(Hello),
    /// PING → PONG.
    Ping,
    /// PRODUCE → PRODUCE_OK.
    Produce(Produce),
    /// CANCEL_DELAY → CANCEL_DELAY_OK.
    CancelDelay(CancelDelay),
    /// DELETE_MESSAGES → OK.
    DeleteMessages(DeleteMessages),
    /// TXN_PRODUCE → TXN_PRODUCE_OK.
    TxnProduce(TxnProduce),
    /// TXN_END → TXN_ENDED.
    TxnEnd(TxnEnd),
    /// TXN_LISTEN → OK.
    TxnListen(TxnListen),
    /// TXN_INIT → TXN_INIT_OK.
    TxnInit(TxnInit),
    /// TXN_ACK → TXN_ACKED.
    TxnAck(TxnAck),
    /// TXN_PRODUCE_SEQ → TXN_PRODUCE_OK.
    TxnProduceSeq(TxnProduceSeq),
    /// SUBSCRIBE → SUBSCRIBED.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE → OK.
    Unsubscribe(Unsubscribe),
    /// CREDIT → OK.
    Credit(Credit),
    /// FETCH → DELIVERIES.
    Fetch(Fetch),
    /// ACK → OK.
    Ack(Ack),
    /// NACK → OK.
    Nack(Nack),
    /// SEEK → SEEK_REPORT.
    Seek(Seek),
    /// CREATE_TOPIC → OK.
    CreateTopic(CreateTopic),
    /// DELETE_TOPIC → OK.
    DeleteTopic(DeleteTopic),
    /// LIST_TOPICS → TOPICS.
    ListTopics,
    /// DESCRIBE_TOPIC → TOPIC_DESCRIPTION.
    DescribeTopic(DescribeTopic),
    /// PARTITION_LEADERS → LEADERS.
    PartitionLeaders(PartitionLeaders),
    /// LIST_GROUPS → GROUPS.
    ListGroups(ListGroups),
    /// DESCRIBE_GROUP → GROUP_DESCRIPTION.
    DescribeGroup(DescribeGroup),
    /// DELETE_GROUP → OK.
    DeleteGroup(DeleteGroup),
}

from_structs!(Request: Hello, Produce, CancelDelay, DeleteMessages, TxnProduce, TxnEnd, TxnListen, TxnInit, TxnAck, TxnProduceSeq, Subscribe, Unsubscribe,
    Credit, Fetch, Ack, Nack, Seek, CreateTopic, DeleteTopic, DescribeTopic, PartitionLeaders, ListGroups,
    DescribeGroup, DeleteGroup);

impl Request {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Ping => Opcode::Ping,
            Request::Produce(_) => Opcode::Produce,
            Request::CancelDelay(_) => Opcode::CancelDelay,
            Request::DeleteMessages(_) => Opcode::DeleteMessages,
            Request::TxnProduce(_) => Opcode::TxnProduce,
            Request::TxnEnd(_) => Opcode::TxnEnd,
            Request::TxnListen(_) => Opcode::TxnListen,
            Request::TxnInit(_) => Opcode::TxnInit,
            Request::TxnAck(_) => Opcode::TxnAck,
            Request::TxnProduceSeq(_) => Opcode::TxnProduceSeq,
            Request::Subscribe(_) => Opcode::Subscribe,
            Request::Unsubscribe(_) => Opcode::Unsubscribe,
            Request::Credit(_) => Opcode::Credit,
            Request::Fetch(_) => Opcode::Fetch,
            Request::Ack(_) => Opcode::Ack,
            Request::Nack(_) => Opcode::Nack,
            Request::Seek(_) => Opcode::Seek,
            Request::CreateTopic(_) => Opcode::CreateTopic,
            Request::DeleteTopic(_) => Opcode::DeleteTopic,
            Request::ListTopics => Opcode::ListTopics,
            Request::DescribeTopic(_) => Opcode::DescribeTopic,
            Request::PartitionLeaders(_) => Opcode::PartitionLeaders,
            Request::ListGroups(_) => Opcode::ListGroups,
            Request::DescribeGroup(_) => Opcode::DescribeGroup,
            Request::DeleteGroup(_) => Opcode::DeleteGroup,
        }
    }
}

/// The broker's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Success without data.
    Ok,
    /// HELLO accepted.
    HelloOk(HelloOk),
    /// PING answered.
    Pong,
    /// Records stored (durably, per the broker's fsync policy).
    ProduceOk(ProduceOk),
    /// CANCEL_DELAY done.
    CancelDelayOk(CancelDelayOk),
    /// Half records stored (durably).
    TxnProduceOk(TxnProduceOk),
    /// A transaction's outcome is durable.
    TxnEnded(TxnEnded),
    /// A transactional producer's epoch.
    TxnInitOk(TxnInitOk),
    /// Transactional acks stored (durably).
    TxnAcked(TxnAcked),
    /// Subscription open.
    Subscribed(Subscribed),
    /// Pulled messages.
    Deliveries(Deliveries),
    /// What a seek did or would do.
    SeekReport(SeekReport),
    /// Topic list.
    Topics(Topics),
    /// One topic.
    TopicDescription(TopicDescription),
    /// Who leads each partition of a topic.
    Leaders(Leaders),
    /// Group list.
    Groups(Groups),
    /// One group.
    GroupDescription(GroupDescription),
    /// Failure.
    Error(ErrorResponse),
}

from_structs!(Response: HelloOk, ProduceOk, CancelDelayOk, TxnProduceOk, TxnEnded, TxnInitOk, TxnAcked, Subscribed, Deliveries, SeekReport,
    Topics, TopicDescription, Leaders, Groups, GroupDescription);

impl From<ErrorResponse> for Response {
    fn from(error: ErrorResponse) -> Self {
        Response::Error(error)
    }
}

impl Response {
    /// The response's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Ok => Opcode::Ok,
            Response::HelloOk(_) => Opcode::HelloOk,
            Response::Pong => Opcode::Pong,
            Response::ProduceOk(_) => Opcode::ProduceOk,
            Response::CancelDelayOk(_) => Opcode::CancelDelayOk,
            Response::TxnProduceOk(_) => Opcode::TxnProduceOk,
            Response::TxnEnded(_) => Opcode::TxnEnded,
            Response::TxnInitOk(_) => Opcode::TxnInitOk,
            Response::TxnAcked(_) => Opcode::TxnAcked,
            Response::Subscribed(_) => Opcode::Subscribed,
            Response::Deliveries(_) => Opcode::Deliveries,
            Response::SeekReport(_) => Opcode::SeekReport,
            Response::Topics(_) => Opcode::Topics,
            Response::TopicDescription(_) => Opcode::TopicDescription,
            Response::Leaders(_) => Opcode::Leaders,
            Response::Groups(_) => Opcode::Groups,
            Response::GroupDescription(_) => Opcode::GroupDescription,
            Response::Error(_) => Opcode::Error,
        }
    }
}

/// A broker-initiated frame (correlation id 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// One message for a subscription, sent while it has credit.
    Deliver(Delivery),
    /// A check-back: how did this transaction end?
    TxnCheck(TxnCheck),
}

impl From<Delivery> for Push {
    fn from(delivery: Delivery) -> Self {
        Push::Deliver(delivery)
    }
}

impl Push {
    /// The push's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Push::Deliver(_) => Opcode::Deliver,
            Push::TxnCheck(_) => Opcode::TxnCheck,
        }
    }
}

// ----- requests ---------------------------------------------------------------

/// HELLO: the first request on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// Who the client is (for auth, ACLs and logs).
    pub client_id: String,
    /// The client's secret; empty when the broker runs without auth.
    pub secret: Bytes,
}

/// PRODUCE: a batch of records for one topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Produce {
    /// Topic.
    pub topic: String,
    /// `Some(p)`: every record goes to partition p. `None`: the broker picks
    /// (key hash for keyed records, else round robin).
    pub partition: Option<u32>,
    /// Idempotence: a retried batch with the same producer id and sequence
    /// gets its original results back instead of being stored twice.
    pub idempotence: Option<ProducerSequence>,
    /// The records, in order.
    pub records: Vec<ProduceRecord>,
}

/// A producer's identity and the sequence number of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ProducerSequence {
    /// Chosen by the producer, stable across its reconnects.
    pub producer_id: u64,
    /// The batch's number; one more per new batch of this producer.
    pub sequence: u64,
}

/// One record of a PRODUCE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceRecord {
    /// Optional key (partitioning and ordering).
    pub key: Option<Bytes>,
    /// Application headers.
    pub headers: Vec<Header>,
    /// Payload.
    pub value: Bytes,
    /// When the record becomes deliverable.
    pub delivery_time: DeliveryTime,
    /// Never deliver the record later than this long after it is stored
    /// (after it becomes deliverable, for a delayed record).
    pub ttl_ms: Option<u64>,
}

/// CANCEL_DELAY: drop a delayed message before it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CancelDelay {
    /// The id PRODUCE_OK returned.
    pub message_id: MessageId,
}

/// How a transaction ends (TXN_END, TXN_ENDED): `1` commit, `2` rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TxnOutcome {
    /// The records enter their topics.
    #[default]
    Commit,
    /// The records are discarded.
    Rollback,
}

/// TXN_PRODUCE: half records of a transaction for one topic, stored
/// durably and delivered to no group until the transaction commits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnProduce {
    /// The producer group (1 to 255 bytes).
    pub producer_group: String,
    /// The transaction id the producer chose (1 to 255 bytes), unique
    /// among the group's open transactions.
    pub transaction_id: String,
    /// `0` begins the transaction; later produces name the handle
    /// TXN_PRODUCE_OK returned.
    pub handle: u64,
    /// Topic.
    pub topic: String,
    /// As in PRODUCE.
    pub partition: Option<u32>,
    /// The records, in order.
    pub records: Vec<ProduceRecord>,
}

/// TXN_PRODUCE_SEQ: a TXN_PRODUCE numbered within its transaction, so that
/// one retried after a lost answer gets the original answer instead of
/// storing its records again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnProduceSeq {
    /// The request, as TXN_PRODUCE (its fields come first on the wire).
    pub produce: TxnProduce,
    /// Its number within the transaction: 0 for the one that begins it,
    /// one more for each later TXN_PRODUCE or TXN_PRODUCE_SEQ of it.
    pub sequence: u32,
}

/// TXN_END: commit or roll back a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnEnd {
    /// The producer group.
    pub producer_group: String,
    /// The transaction id.
    pub transaction_id: String,
    /// The handle TXN_PRODUCE_OK returned.
    pub handle: u64,
    /// Commit or rollback.
    pub outcome: TxnOutcome,
}

/// TXN_LISTEN: this connection answers the check-backs of a producer
/// group (until it closes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnListen {
    /// The producer group.
    pub producer_group: String,
}

/// TXN_INIT: this connection is now the current instance of a
/// transactional producer; an older instance's transaction requests are
/// refused (ProducerFenced).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnInit {
    /// The producer group.
    pub producer_group: String,
    /// The producer's stable id (the same for every instance).
    pub producer_id: String,
    /// 0: a new instance (the next epoch); otherwise the epoch this
    /// instance was given, to resume it on a new connection (refused with
    /// ProducerFenced if a newer instance registered since).
    pub epoch: u32,
}

/// TXN_INIT_OK: the new instance's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnInitOk {
    /// One more than the previous instance's.
    pub epoch: u32,
}

/// TXN_ACK: acks of messages a subscription of this connection consumed,
/// made part of a transaction: applied to the subscription's group when
/// the transaction commits, dropped when it rolls back (atomic
/// consume-and-produce).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnAck {
    /// The producer group.
    pub producer_group: String,
    /// The transaction id.
    pub transaction_id: String,
    /// `0` begins the transaction; otherwise the handle an earlier answer
    /// returned.
    pub handle: u64,
    /// The subscription (of this connection) that received the messages.
    pub subscription_id: u64,
    /// The messages, as in ACK.
    pub messages: Vec<MessagePosition>,
}

/// TXN_ACKED: the transactional acks are stored (durably).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnAcked {
    /// The transaction's handle.
    pub handle: u64,
}

/// TXN_CHECK (push): the broker asks a live member of a producer group how
/// a transaction it left open ended. The member answers with TXN_END
/// (commit or rollback), or not at all when it does not know (the broker
/// asks again later).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnCheck {
    /// The producer group.
    pub producer_group: String,
    /// The transaction id.
    pub transaction_id: String,
    /// The transaction's handle (for TXN_END).
    pub handle: u64,
    /// When it began (ms since the epoch).
    pub opened_ms: i64,
    /// This is check number `checks` of the transaction (from 1).
    pub checks: u32,
}

/// DELETE_MESSAGES: tombstone messages of a topic for every group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteMessages {
    /// Topic.
    pub topic: String,
    /// What to delete.
    pub tombstone: Tombstone,
}

/// SUBSCRIBE: join a group (creating it if needed) as a member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Member name (for logs and broadcast cursors); unique in the group.
    pub member_name: String,
    /// Clustering or broadcast (used when the group is created).
    pub mode: DeliveryMode,
    /// Where a new group starts (ignored for an existing group).
    pub start: StartPosition,
    /// Initial push credit: the broker may push this many DELIVERs before
    /// the next CREDIT. 0: pull only (FETCH) until a CREDIT arrives.
    pub credit: u32,
    /// Group settings; `None` fields keep the default or existing value.
    pub settings: GroupSettings,
}

/// UNSUBSCRIBE: leave; in-flight messages of this member are redelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    /// From SUBSCRIBED.
    pub subscription_id: u64,
}

/// CREDIT: allow `credit` more pushed deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credit {
    /// From SUBSCRIBED.
    pub subscription_id: u64,
    /// Added to the subscription's credit.
    pub credit: u32,
}

/// FETCH: pull up to `max_messages`, waiting up to `max_wait_ms` for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fetch {
    /// From SUBSCRIBED.
    pub subscription_id: u64,
    /// At most this many deliveries.
    pub max_messages: u32,
    /// Wait at most this long when nothing is ready (0: answer at once).
    pub max_wait_ms: u32,
}

/// ACK: these messages are processed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// From SUBSCRIBED.
    pub subscription_id: u64,
    /// The messages.
    pub messages: Vec<MessagePosition>,
}

/// NACK: these messages failed; redeliver after a delay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nack {
    /// From SUBSCRIBED.
    pub subscription_id: u64,
    /// The messages.
    pub messages: Vec<MessagePosition>,
    /// Redelivery delay; `None`: the group's backoff.
    pub delay_ms: Option<u64>,
}

/// SEEK: move a group (one partition or all) to a position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seek {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// `None`: every partition.
    pub partition: Option<u32>,
    /// Target position.
    pub target: StartPosition,
    /// Only report what would change.
    pub dry_run: bool,
}

/// CREATE_TOPIC.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateTopic {
    /// Name.
    pub name: String,
    /// Number of partitions (>= 1).
    pub partitions: u32,
    /// Same-key messages are delivered to a group one at a time.
    pub ordered: bool,
}

/// DELETE_TOPIC.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTopic {
    /// Name.
    pub name: String,
}

/// DESCRIBE_TOPIC.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeTopic {
    /// Name.
    pub name: String,
}

/// PARTITION_LEADERS: where to send each partition's produces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionLeaders {
    /// Topic.
    pub topic: String,
}

/// LEADERS: one entry per partition of the topic, in partition order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leaders {
    /// One per partition, partition 0 first.
    pub partitions: Vec<PartitionLeader>,
}

/// One partition in LEADERS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionLeader {
    /// Partition.
    pub partition: u32,
    /// The cluster node leading the partition's writes; 0 when there is
    /// none (a single broker, a topic kept on one node, an election).
    pub node_id: u64,
    /// That node's client address (`host:port`); empty: send to the node
    /// asked (it stores the partition, or forwards to its leader).
    pub address: String,
}

/// LIST_GROUPS of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListGroups {
    /// Topic.
    pub topic: String,
}

/// DESCRIBE_GROUP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeGroup {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// DELETE_GROUP: forget a group and its positions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteGroup {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

// ----- responses --------------------------------------------------------------

/// HELLO_OK: the session is open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelloOk {
    /// The version both sides speak from now on.
    pub version: u16,
    /// Largest frame (length prefix included) the broker accepts.
    pub max_frame_bytes: u32,
    /// The broker's id.
    pub broker_id: String,
}

/// PRODUCE_OK: one result per record, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceOk {
    /// Results.
    pub records: Vec<ProducedRecord>,
}

/// Where one produced record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProducedRecord {
    /// Partition.
    pub partition: u32,
    /// Offset, or `None` while the record waits in the delay store.
    pub offset: Option<u64>,
    /// The message id.
    pub message_id: MessageId,
    /// For a delayed record: when it becomes deliverable (ms since epoch).
    pub deliver_at_ms: Option<i64>,
}

/// TXN_PRODUCE_OK: the transaction's handle and one result per record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnProduceOk {
    /// Names the transaction in later TXN_PRODUCEs and in TXN_END.
    pub handle: u64,
    /// Results, in request order; `offset` is absent (a half record is in
    /// no topic yet).
    pub records: Vec<ProducedRecord>,
}

/// TXN_ENDED: the transaction's outcome is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnEnded {
    /// How it ended.
    pub outcome: TxnOutcome,
}

/// CANCEL_DELAY_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CancelDelayOk {
    /// The message was pending and is now cancelled (false: unknown or
    /// already delivered).
    pub cancelled: bool,
}

/// SUBSCRIBED: the subscription is open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribed {
    /// Names the subscription in CREDIT, FETCH, ACK, NACK, UNSUBSCRIBE and
    /// DELIVER; unique per connection.
    pub subscription_id: u64,
    /// The topic's partitions.
    pub partitions: Vec<u32>,
}

/// DELIVERIES: the answer to FETCH (possibly empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Deliveries {
    /// The messages.
    pub deliveries: Vec<Delivery>,
}

/// One message delivered to a subscription (FETCH result or DELIVER push).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delivery {
    /// The subscription it is for.
    pub subscription_id: u64,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Message id.
    pub message_id: MessageId,
    /// Broker timestamp (ms since epoch).
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Payload.
    pub value: Bytes,
    /// The record's deliver-at time, if it was delayed.
    pub deliver_at_ms: Option<i64>,
    /// The record's expiry time, if it has a TTL.
    pub expire_at_ms: Option<i64>,
}

/// SEEK_REPORT: one entry per partition touched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeekReport {
    /// The seek was a dry run: nothing changed.
    pub dry_run: bool,
    /// Per partition.
    pub partitions: Vec<SeekPartition>,
}

/// What a seek did (or would do) to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeekPartition {
    /// Partition.
    pub partition: u32,
    /// Ack floor before.
    pub old_floor: u64,
    /// Ack floor after.
    pub new_floor: u64,
    /// Acked messages that will be delivered again.
    pub redelivered: u64,
    /// Unacked messages that are skipped (treated as acked).
    pub skipped: u64,
}

/// TOPICS: every topic the client may see.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topics {
    /// Topics, by name.
    pub topics: Vec<TopicSummary>,
}

/// A topic in TOPICS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicSummary {
    /// Name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Ordered topic.
    pub ordered: bool,
}

/// TOPIC_DESCRIPTION.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicDescription {
    /// Name.
    pub name: String,
    /// Ordered topic.
    pub ordered: bool,
    /// Partitions.
    pub partitions: Vec<PartitionInfo>,
    /// Names of the topic's groups.
    pub groups: Vec<String>,
}

/// One partition in TOPIC_DESCRIPTION.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionInfo {
    /// Partition.
    pub partition: u32,
    /// Oldest stored offset.
    pub start_offset: u64,
    /// Next offset to be written.
    pub end_offset: u64,
    /// Bytes of records the partition stores.
    pub size_bytes: u64,
    /// Bytes the partition takes on disk: its segment files as allocated
    /// (stored records plus the active segment's unused room) and its
    /// index files.
    pub disk_bytes: u64,
}

/// GROUPS: a topic's groups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Groups {
    /// Groups, by name.
    pub groups: Vec<GroupSummary>,
}

/// A group in GROUPS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupSummary {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: DeliveryMode,
    /// Its settings (the broker fills every field).
    pub settings: GroupSettings,
}

/// GROUP_DESCRIPTION.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupDescription {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Mode.
    pub mode: DeliveryMode,
    /// Per partition.
    pub partitions: Vec<GroupPartition>,
}

/// One partition of a group in GROUP_DESCRIPTION.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupPartition {
    /// Partition.
    pub partition: u32,
    /// Every offset below is acked.
    pub ack_floor: u64,
    /// The partition's end offset.
    pub end_offset: u64,
    /// Messages not yet acked.
    pub lag: u64,
    /// Unacked messages the group tracks (in flight, retrying, held).
    pub unacked: u64,
    /// Delivered and waiting for an ack.
    pub in_flight: u64,
    /// Age of the oldest unacked message, if any.
    pub oldest_unacked_age_ms: Option<u64>,
    /// Delayed messages for this partition still in the delay store.
    pub delayed: u64,
}

/// ERROR: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// The code.
    pub code: ErrorCode,
    /// For people; at most 65,535 bytes of UTF-8.
    pub message: String,
}

impl ErrorResponse {
    /// An error; a message longer than a short string allows is cut at a
    /// character boundary so that the frame always encodes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > usize::from(u16::MAX) {
            let mut end = usize::from(u16::MAX);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        ErrorResponse { code, message }
    }
}
