//! # dmq-client: the async Rust client for DMQ
//!
//! ```no_run
//! use dmq_client::{Client, ClientOptions, Message, Start, SubscribeOptions};
//!
//! # async fn demo() -> dmq_client::Result<()> {
//! let client = Client::connect("127.0.0.1:7070", ClientOptions::new("demo")).await?;
//! client.create_topic("orders", 4, false).await.ok();
//! let producer = client.producer();
//! let receipt = producer.send(Message::new("orders", "hello").key("customer-1")).await?;
//! println!("stored at {}:{:?} as {}", receipt.partition, receipt.offset, receipt.id);
//!
//! let options = SubscribeOptions { start: Start::Earliest, ..SubscribeOptions::default() };
//! let mut subscription = client.consumer().subscribe("orders", "billing", options).await?;
//! while let Some(message) = subscription.recv().await {
//!     let message = message?;
//!     println!("{}", String::from_utf8_lossy(&message.value));
//!     message.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`client`]: [`Client`] (connect, raw pipelined requests, admin calls).
//! - `connection` (private): the TCP connection, its reader and writer
//!   tasks, correlation ids, DELIVER routing, reconnect with backoff.
//! - [`producer`]: [`Producer`], [`Message`], [`SendReceipt`]; batching by
//!   linger and size, pipelining, idempotence.
//! - [`consumer`]: [`Consumer`], [`Subscription`] (a `Stream`),
//!   [`ReceivedMessage`] with `ack`/`nack`; credit flow control, batched acks.
//! - `routing` (private): on a cluster, which node a producer's batch goes
//!   to (its partition's leader) and the order kept when that changes.
//! - [`transaction`]: [`Transaction`], half messages committed or rolled
//!   back together.
//! - [`options`]: [`ClientOptions`], [`ProducerOptions`].
//! - [`error`]: the [`ClientError`] type.
//! - [`time`]: `SystemTime` ↔ wire milliseconds.
//!
//! The client depends only on `dmq-protocol`, re-exported as
//! [`protocol`] for the wire types that appear in this API.

#![forbid(unsafe_code)]

pub mod client;
mod connection;
pub mod consumer;
pub mod error;
pub mod options;
pub mod producer;
mod routing;
pub mod time;
pub mod transaction;

pub use client::Client;
pub use consumer::{Consumer, ReceivedMessage, Start, SubscribeOptions, Subscription};
pub use dmq_protocol as protocol;
pub use dmq_protocol::{
    Backoff, DeliveryMode, ErrorCode, GroupDescription, GroupPartition, GroupSettings,
    GroupSummary, Header, MessageId, PartitionInfo, PartitionLeader, SeekPartition, SeekReport,
    StartPosition, Tombstone, TopicDescription, TopicSummary,
};
pub use error::{ClientError, Result};
pub use options::{ClientOptions, ProducerOptions};
pub use producer::{Message, Producer, SendReceipt};
pub use transaction::{Transaction, TransactionCheck, TransactionChecks, TRANSACTION_RETRIES};
