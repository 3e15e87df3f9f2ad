//! Transactions: [`Transaction`] stores messages as half messages (durable,
//! delivered to no group) and then commits them all or rolls them all back
//! (PROTOCOL.md §6.27 to §6.30, docs/transactions.md).
//!
//! ```no_run
//! use dmq_client::{Client, ClientOptions, Message};
//!
//! # async fn demo(client: Client) -> dmq_client::Result<()> {
//! let mut txn = client.transaction("order-service", "order-17");
//! txn.send(vec![Message::new("orders", "created")]).await?;
//! txn.send(vec![Message::new("audit", "order 17 created")]).await?;
//! // ... the order service commits its database transaction ...
//! txn.commit().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Atomic consume-and-produce: [`Transaction::ack`] acks messages a
//! [`Subscription`](crate::Subscription) of the same client received, as
//! part of the transaction: they count as acked when it commits, and are
//! delivered again (after their ack timeout) if it rolls back.
//!
//! ```no_run
//! use dmq_client::{Client, Consumer, Message, SubscribeOptions};
//!
//! # async fn demo(client: Client) -> dmq_client::Result<()> {
//! let mut payments = Consumer::new(&client)
//!     .subscribe("payments", "shipping", SubscribeOptions::default())
//!     .await?;
//! while let Some(paid) = payments.recv().await {
//!     let paid = paid?;
//!     let mut txn = client.transaction("shipping", format!("ship-{}", paid.id));
//!     txn.send(vec![Message::new("shipments", paid.value.clone())]).await?;
//!     txn.ack(&[&paid]).await?;
//!     txn.commit().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! A transaction is one producer group's transaction id; its handle (from
//! the first answer) names it in every later request, so a late COMMIT
//! never reaches a later transaction that reuses the id. Sends of one
//! transaction go one request at a time, in order.
//!
//! Each send is numbered within its transaction (TXN_PRODUCE_SEQ), so a
//! send whose answer was lost (the connection dropped, the request timed
//! out) is sent again, up to [`TRANSACTION_RETRIES`] times: the broker
//! answers a number it has with the first answer and stores nothing
//! twice. COMMIT and ROLLBACK are retried the same way (a repeated end
//! gets the first answer), and so is TXN_ACK (the broker skips messages
//! the transaction acks already; see [`Transaction::ack`]).

use std::sync::Arc;
use std::time::SystemTime;

use dmq_protocol::{
    MessagePosition, Request, Response, TxnAck, TxnEnd, TxnListen, TxnOutcome, TxnProduce,
    TxnProduceSeq,
};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::connection::await_reply;
use crate::consumer::{ReceivedMessage, SubShared};
use crate::error::{ClientError, Result};
use crate::producer::{Message, SendReceipt};

/// One transaction of a producer group; see the module doc.
#[derive(Debug)]
pub struct Transaction {
    client: Client,
    producer_group: String,
    transaction_id: String,
    /// 0 until the first send is answered.
    handle: u64,
    /// The number of the next send (TXN_PRODUCE_SEQ).
    sequence: u32,
}

/// How many times a transaction's send, commit or rollback is sent again
/// after a transient failure (a lost connection, a timeout, a broker
/// that is overloaded or stopping), with the client's reconnect backoff
/// growing between attempts.
pub const TRANSACTION_RETRIES: u32 = 5;

/// Sends `request`, again on a transient failure: only for requests the
/// broker answers the same when they arrive twice.
async fn request_retrying(client: &Client, request: Request) -> Result<Response> {
    retrying(client, || client.request(request.clone())).await
}

/// Runs `try_once` again after each transient failure, up to
/// [`TRANSACTION_RETRIES`] times, with the client's reconnect backoff
/// growing between tries.
async fn retrying<F, Fut>(client: &Client, mut try_once: F) -> Result<Response>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Response>>,
{
    let backoff = client.options().reconnect_backoff_initial;
    let mut attempt = 0;
    loop {
        match try_once().await {
            Err(error) if error.is_transient() && attempt < TRANSACTION_RETRIES => {
                attempt += 1;
                tokio::time::sleep(backoff * attempt).await;
            }
            result => return result,
        }
    }
}

impl Client {
    /// A new transaction `transaction_id` of `producer_group` (nothing is
    /// sent until the first [`Transaction::send`]).
    pub fn transaction(
        &self,
        producer_group: impl Into<String>,
        transaction_id: impl Into<String>,
    ) -> Transaction {
        Transaction {
            client: self.clone(),
            producer_group: producer_group.into(),
            transaction_id: transaction_id.into(),
            handle: 0,
            sequence: 0,
        }
    }
}

impl Transaction {
    /// Stores `messages` in the transaction (one TXN_PRODUCE_SEQ per topic
    /// and partition choice, in order) and returns a receipt per message,
    /// in order: their ids, and no offset (they are in no topic yet). A
    /// request that fails transiently is sent again with its number (see
    /// the module doc). An error after that leaves the requests before the
    /// failing one stored: roll the transaction back (or, for a call that
    /// sent one request, call it again with the same messages).
    pub async fn send(&mut self, messages: Vec<Message>) -> Result<Vec<SendReceipt>> {
        let mut receipts = Vec::with_capacity(messages.len());
        let mut pending = messages.into_iter().peekable();
        while let Some(first) = pending.next() {
            let (topic, partition, record) = first.into_parts();
            let mut records = vec![record];
            while let Some(next) = pending.peek() {
                if next.topic() != topic || next.partition_choice() != partition {
                    break;
                }
                if let Some(next) = pending.next() {
                    records.push(next.into_parts().2);
                }
            }
            let request = TxnProduceSeq {
                produce: TxnProduce {
                    producer_group: self.producer_group.clone(),
                    transaction_id: self.transaction_id.clone(),
                    handle: self.handle,
                    topic,
                    partition,
                    records,
                },
                sequence: self.sequence,
            };
            let response = request_retrying(&self.client, Request::TxnProduceSeq(request)).await?;
            let ok = match response {
                Response::TxnProduceOk(ok) => ok,
                other => {
                    return Err(ClientError::UnexpectedResponse {
                        expected: "TXN_PRODUCE_OK",
                        got: other.opcode(),
                    })
                }
            };
            self.handle = ok.handle;
            self.sequence += 1;
            receipts.extend(ok.records.iter().map(crate::producer::receipt));
        }
        Ok(receipts)
    }

    /// Acks `messages` in this transaction (TXN_ACK, one request per
    /// subscription): each counts as acked for its group when the
    /// transaction commits, and not at all if it rolls back (it is then
    /// delivered again after its ack timeout). They must have been
    /// received by subscriptions of this transaction's client, since its
    /// last reconnect ([`ClientError::StaleDelivery`] otherwise), and not
    /// acked or nacked. A message another open transaction acks, or one
    /// acked already, gets a conflict (`TransactionConflict`): roll back.
    /// Once this returns, the messages are settled here (their credit is
    /// given back); do not ack them again.
    ///
    /// A TXN_ACK whose answer is lost (the connection dropped, the request
    /// timed out) is sent again, up to [`TRANSACTION_RETRIES`] times, under
    /// the subscription's id on the new connection: the broker skips
    /// messages the transaction acks already, and answers a repeated begin
    /// with the transaction it began.
    pub async fn ack(&mut self, messages: &[&ReceivedMessage]) -> Result<()> {
        let mut by_subscription: Vec<(Arc<SubShared>, Vec<MessagePosition>)> = Vec::new();
        for message in messages {
            let (subscription, position) = message.transaction_position()?;
            match by_subscription
                .iter_mut()
                .find(|(known, _)| Arc::ptr_eq(known, &subscription))
            {
                Some((_, positions)) => positions.push(position),
                None => by_subscription.push((subscription, vec![position])),
            }
        }
        for (subscription, positions) in by_subscription {
            match self.txn_ack_retrying(&subscription, positions).await? {
                Response::TxnAcked(acked) => self.handle = acked.handle,
                other => {
                    return Err(ClientError::UnexpectedResponse {
                        expected: "TXN_ACKED",
                        got: other.opcode(),
                    })
                }
            }
        }
        for message in messages {
            message.settled_in_transaction();
        }
        Ok(())
    }

    /// One TXN_ACK of `messages` received by `subscription`, sent again
    /// after a transient failure ([`retrying`]).
    async fn txn_ack_retrying(
        &self,
        subscription: &SubShared,
        messages: Vec<MessagePosition>,
    ) -> Result<Response> {
        retrying(&self.client, || self.txn_ack_once(subscription, &messages)).await
    }

    /// One try of a TXN_ACK, naming the subscription's id on the
    /// connection it goes over: a reconnect re-subscribes before it hands
    /// the new connection out.
    async fn txn_ack_once(
        &self,
        subscription: &SubShared,
        messages: &[MessagePosition],
    ) -> Result<Response> {
        let shared = self.client.shared();
        let conn = shared.conn().await?;
        let request = TxnAck {
            producer_group: self.producer_group.clone(),
            transaction_id: self.transaction_id.clone(),
            handle: self.handle,
            subscription_id: subscription.server_id(),
            messages: messages.to_vec(),
        };
        let receiver = conn.start(Request::TxnAck(request), None).await?;
        await_reply(receiver, shared.options.request_timeout).await
    }

    /// The handle the broker gave this transaction (0 before the first
    /// send).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Commits: once this returns, every message sent in the transaction
    /// is delivered to every group of its topic. Retrying a commit whose
    /// answer was lost is safe.
    pub async fn commit(&self) -> Result<()> {
        self.end(TxnOutcome::Commit).await
    }

    /// Rolls back: no message sent in the transaction is ever delivered.
    pub async fn rollback(&self) -> Result<()> {
        self.end(TxnOutcome::Rollback).await
    }

    async fn end(&self, outcome: TxnOutcome) -> Result<()> {
        if self.handle == 0 {
            // Nothing was stored: there is nothing to end.
            return Ok(());
        }
        end(
            &self.client,
            &self.producer_group,
            &self.transaction_id,
            self.handle,
            outcome,
        )
        .await
    }
}

async fn end(
    client: &Client,
    producer_group: &str,
    transaction_id: &str,
    handle: u64,
    outcome: TxnOutcome,
) -> Result<()> {
    let request = TxnEnd {
        producer_group: producer_group.to_string(),
        transaction_id: transaction_id.to_string(),
        handle,
        outcome,
    };
    match request_retrying(client, Request::TxnEnd(request)).await? {
        Response::TxnEnded(_) => Ok(()),
        other => Err(ClientError::UnexpectedResponse {
            expected: "TXN_ENDED",
            got: other.opcode(),
        }),
    }
}

/// The check-backs of a producer group (see [`Client::transaction_checks`]).
#[derive(Debug)]
pub struct TransactionChecks {
    client: Client,
    receiver: mpsc::UnboundedReceiver<dmq_protocol::TxnCheck>,
}

/// The broker asks how a transaction left open ended: answer with
/// [`commit`](Self::commit) or [`rollback`](Self::rollback), or drop it
/// when the answer is not known yet (the broker asks again later, with
/// backoff, until its checks run out and the transaction is left
/// unresolved for an operator).
#[derive(Debug, Clone)]
pub struct TransactionCheck {
    client: Client,
    /// The producer group.
    pub producer_group: String,
    /// The transaction id (the producer's own, e.g. a database
    /// transaction's).
    pub transaction_id: String,
    /// The transaction's handle.
    pub handle: u64,
    /// When the transaction began.
    pub opened_at: SystemTime,
    /// This is the transaction's check number `checks` (from 1).
    pub checks: u32,
}

impl Client {
    /// Answers the check-backs of `producer_group` on this client's
    /// connection (TXN_LISTEN; sent again after a reconnect). With several
    /// listeners of one group, each check goes to one of them.
    pub async fn transaction_checks(
        &self,
        producer_group: impl Into<String>,
    ) -> Result<TransactionChecks> {
        let producer_group = producer_group.into();
        let (sender, receiver) = mpsc::unbounded_channel();
        crate::connection::lock(&self.shared().check_listeners)
            .push((producer_group.clone(), sender.clone()));
        let conn = self.shared().conn().await?;
        conn.add_check_listener((producer_group.clone(), sender));
        match self
            .request(Request::TxnListen(TxnListen { producer_group }))
            .await?
        {
            Response::Ok => Ok(TransactionChecks {
                client: self.clone(),
                receiver,
            }),
            other => Err(ClientError::UnexpectedResponse {
                expected: "OK",
                got: other.opcode(),
            }),
        }
    }
}

impl Client {
    /// Registers this client as the current instance of the transactional
    /// producer `producer_id` of `producer_group` (TXN_INIT) and returns its
    /// epoch: from now on an older instance's transactions of the group
    /// are refused (`ProducerFenced`), and so are this one's once a newer
    /// instance registers. The epoch is resumed after a reconnect.
    pub async fn init_transactions(
        &self,
        producer_group: impl Into<String>,
        producer_id: impl Into<String>,
    ) -> Result<u32> {
        let (producer_group, producer_id) = (producer_group.into(), producer_id.into());
        let request = Request::TxnInit(dmq_protocol::TxnInit {
            producer_group: producer_group.clone(),
            producer_id: producer_id.clone(),
            epoch: 0,
        });
        match self.request(request).await? {
            Response::TxnInitOk(ok) => {
                let mut producers = crate::connection::lock(&self.shared().txn_producers);
                producers.retain(|(g, p, _)| *g != producer_group || *p != producer_id);
                producers.push((producer_group, producer_id, ok.epoch));
                Ok(ok.epoch)
            }
            other => Err(ClientError::UnexpectedResponse {
                expected: "TXN_INIT_OK",
                got: other.opcode(),
            }),
        }
    }
}

impl TransactionChecks {
    /// The next check-back; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<TransactionCheck> {
        let check = self.receiver.recv().await?;
        Some(TransactionCheck {
            client: self.client.clone(),
            producer_group: check.producer_group,
            transaction_id: check.transaction_id,
            handle: check.handle,
            opened_at: crate::time::ms_to_system_time(check.opened_ms),
            checks: check.checks,
        })
    }
}

impl TransactionCheck {
    /// The transaction committed on the producer's side: commit it.
    pub async fn commit(&self) -> Result<()> {
        self.end(TxnOutcome::Commit).await
    }

    /// The transaction did not happen: roll it back.
    pub async fn rollback(&self) -> Result<()> {
        self.end(TxnOutcome::Rollback).await
    }

    async fn end(&self, outcome: TxnOutcome) -> Result<()> {
        end(
            &self.client,
            &self.producer_group,
            &self.transaction_id,
            self.handle,
            outcome,
        )
        .await
    }
}
