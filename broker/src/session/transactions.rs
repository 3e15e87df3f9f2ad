//! TXN_PRODUCE (and TXN_PRODUCE_SEQ), TXN_ACK and TXN_END: decoding, rights, routing and replying; the
//! transaction itself is the dispatcher's (`dmq_dispatcher::transactions`).
//!
//! Each request is queued for the dispatcher in request order without
//! waiting for it (its half-log append happens there, in queue order); the
//! answer comes through a channel once durable and is sent from a task
//! that holds one of the connection's in-flight permits, like a PRODUCE.
//! So a connection pipelines transactions with no dispatcher round trip
//! per request, and the dispatcher takes many requests per wake-up.

use dmq_dispatcher::transactions::{RELATIVE_DELIVER_AT, RELATIVE_EXPIRE_AT};
use dmq_dispatcher::{names, TxnKey, TxnOutcome};

use super::*;

type Answer = oneshot::Receiver<Result<Response, ErrorResponse>>;

impl Session {
    /// Starts a TXN_PRODUCE, TXN_ACK or TXN_END; answers from a task once
    /// durable.
    pub(super) async fn transaction(&mut self, correlation_id: u32, request: Request) {
        let Ok(permit) = Arc::clone(&self.inflight).acquire_owned().await else {
            return;
        };
        let started = match request {
            Request::TxnProduce(produce) => self.start_txn_produce(produce, None).await,
            Request::TxnProduceSeq(numbered) => {
                self.start_txn_produce(numbered.produce, Some(numbered.sequence))
                    .await
            }
            Request::TxnEnd(end) => self.start_txn_end(end).await,
            Request::TxnAck(ack) => self.start_txn_ack(ack),
            _ => return,
        };
        match started {
            Err(error) => self.send(error_frame(correlation_id, error)).await,
            Ok(answer) => {
                let outbound = self.outbound.clone();
                tokio::spawn(async move {
                    let frame = match answer.await {
                        Ok(Ok(response)) => Frame::response(correlation_id, response),
                        Ok(Err(error)) => error_frame(correlation_id, error),
                        Err(_) => error_frame(
                            correlation_id,
                            ErrorResponse::new(ErrorCode::ShuttingDown, "the broker is stopping"),
                        ),
                    };
                    let _ = outbound.send(frame.into()).await;
                    drop(permit);
                });
            }
        }
    }

    /// A TXN_PRODUCE, numbered `sequence` within its transaction for a
    /// TXN_PRODUCE_SEQ (a retry of a number the transaction has is answered
    /// with the first answer, by the dispatcher).
    async fn start_txn_produce(
        &mut self,
        produce: wire::TxnProduce,
        sequence: Option<u32>,
    ) -> Result<Answer, ErrorResponse> {
        // Rights first: a client without them learns nothing of the topic.
        let default_ttl_ms = match self.authorize(&produce.topic, Right::Produce).await? {
            Access::Granted { default_ttl_ms, .. } => default_ttl_ms,
            Access::Unregistered => None,
        };
        let key = txn_key(&produce.producer_group, &produce.transaction_id)?;
        if produce.records.is_empty() {
            return Err(ErrorResponse::new(
                ErrorCode::InvalidRequest,
                "a transactional produce needs at least one record",
            ));
        }
        let now = self.clock.now_ms();
        let mut records = Vec::with_capacity(produce.records.len());
        for record in produce.records {
            let mut relative = 0;
            if matches!(record.delivery_time, wire::DeliveryTime::DelayMs(_)) {
                relative |= RELATIVE_DELIVER_AT;
            }
            let mut input = convert::record_input(record, now);
            if input.expire_at_ms.is_some() {
                relative |= RELATIVE_EXPIRE_AT;
            } else if let Some(ttl) = default_ttl_ms {
                let from = input.deliver_at_ms.unwrap_or(now).max(now);
                input.expire_at_ms = Some(from.saturating_add(ttl as i64));
                relative |= RELATIVE_EXPIRE_AT;
            }
            records.push((input, relative));
        }
        frame_limits::check_record_inputs(
            &records.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
            self.shared.config.max_frame_bytes,
        )?;
        let Some(handle) = self.shared.engine.find_topic(&produce.topic).await else {
            return Err(ErrorResponse::new(
                ErrorCode::UnknownTopic,
                format!("unknown topic {}", names::shown(&produce.topic)),
            ));
        };
        if let Some(cluster) = self.shared.engine.cluster() {
            if cluster.storage().is_replicated(&produce.topic) {
                // Half messages and their outcome live in this node's
                // journals: not replicated yet (docs/replication.md).
                return Err(ErrorResponse::new(
                    ErrorCode::InvalidRequest,
                    "transactions on a cluster topic are not replicated yet; nothing was stored",
                ));
            }
        }
        let routes = handle
            .router
            .route(
                produce.partition,
                records.iter().map(|(r, _)| r.key.as_deref()),
            )
            .map_err(|e| {
                ErrorResponse::new(
                    ErrorCode::UnknownPartition,
                    format!("topic {}: {e}", names::shown(&produce.topic)),
                )
            })?;
        let routed: Vec<(u32, dmq_log_store::RecordInput, u8)> = routes
            .into_iter()
            .zip(records)
            .map(|(partition, (record, relative))| (partition, record, relative))
            .collect();
        let topic = produce.topic;
        let txn_handle = produce.handle;
        self.submit_fenced(&produce.producer_group, move |dispatcher, reply| {
            dispatcher.txn_produce(
                key,
                txn_handle,
                sequence,
                &topic,
                routed,
                answer_with(reply, |produced: dmq_dispatcher::TxnProduced| {
                    Response::TxnProduceOk(wire::TxnProduceOk {
                        handle: produced.handle,
                        records: produced
                            .records
                            .into_iter()
                            .map(|p| wire::ProducedRecord {
                                partition: p.partition,
                                offset: None,
                                message_id: convert::message_id(p.id),
                                deliver_at_ms: p.delayed_until_ms,
                            })
                            .collect(),
                    })
                }),
            )
        })
    }

    /// TXN_ACK: the subscription must be this connection's (its right to
    /// consume was checked when it subscribed).
    fn start_txn_ack(&mut self, ack: wire::TxnAck) -> Result<Answer, ErrorResponse> {
        self.owned(ack.subscription_id)?;
        let key = txn_key(&ack.producer_group, &ack.transaction_id)?;
        let positions: Vec<(u32, u64)> = ack
            .messages
            .iter()
            .map(|position| (position.partition, position.offset))
            .collect();
        let (handle, member) = (ack.handle, ack.subscription_id);
        self.submit_fenced(&ack.producer_group, move |dispatcher, reply| {
            dispatcher.txn_ack(
                key,
                handle,
                member,
                positions,
                answer_with(reply, |acked: dmq_dispatcher::TxnProduced| {
                    Response::TxnAcked(wire::TxnAcked {
                        handle: acked.handle,
                    })
                }),
            )
        })
    }

    async fn start_txn_end(&mut self, end: wire::TxnEnd) -> Result<Answer, ErrorResponse> {
        let key = txn_key(&end.producer_group, &end.transaction_id)?;
        let outcome = match end.outcome {
            wire::TxnOutcome::Commit => TxnOutcome::Commit,
            wire::TxnOutcome::Rollback => TxnOutcome::Rollback,
        };
        let handle = end.handle;
        let (registry, development, client_id) = (
            Arc::clone(&self.shared.registry),
            self.shared.development,
            self.client_id.clone(),
        );
        self.submit_fenced(&end.producer_group, move |dispatcher, reply| {
            // The right to produce to every topic the transaction holds
            // records for, and to consume from every topic it acks messages
            // of, checked where the transaction is (an unknown transaction
            // is answered by `txn_end`).
            let topics = dispatcher.transaction_topics(&key, handle);
            let produced = topics.produced.into_iter().map(|t| (t, Right::Produce));
            let acked = topics.acked.into_iter().map(|t| (t, Right::Consume));
            for (topic, right) in produced.chain(acked) {
                let access =
                    hello::registry_access(&registry, development, &client_id, &topic, right);
                let refusal = match access {
                    Ok(Access::Granted { .. }) => None,
                    Ok(Access::Unregistered) => Some(ErrorResponse::new(
                        ErrorCode::NotAuthorized,
                        crate::registry::Registry::refusal(&topic, &client_id, right),
                    )),
                    Err(error) => Some(error),
                };
                if let Some(error) = refusal {
                    let _ = reply.send(Err(error));
                    return;
                }
            }
            dispatcher.txn_end(
                key,
                handle,
                outcome,
                answer_with(reply, |outcome: TxnOutcome| {
                    Response::TxnEnded(wire::TxnEnded {
                        outcome: match outcome {
                            TxnOutcome::Commit => wire::TxnOutcome::Commit,
                            TxnOutcome::Rollback => wire::TxnOutcome::Rollback,
                        },
                    })
                }),
            )
        })
    }

    /// Queues `work` for the dispatcher behind this connection's fence for
    /// `group` (TXN_INIT): a fenced instance is answered ProducerFenced and
    /// `work` does not run. `work` answers through the sender it gets.
    fn submit_fenced(
        &self,
        group: &str,
        work: impl FnOnce(&mut dmq_dispatcher::Dispatcher, Reply) + Send + 'static,
    ) -> Result<Answer, ErrorResponse> {
        let (reply, answer) = oneshot::channel();
        let fence = self.fence(group);
        self.shared
            .engine
            .submit(move |dispatcher, _| match check_fence(dispatcher, fence) {
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
                Ok(()) => work(dispatcher, reply),
            })
            .map_err(|error| convert::engine_error(&error))?;
        Ok(answer)
    }
}

/// Where a transaction request's answer goes.
type Reply = oneshot::Sender<Result<Response, ErrorResponse>>;

/// The dispatcher's answer callback for `reply`: `to_response` on
/// success, the dispatcher's error as an ERROR otherwise.
fn answer_with<T: 'static>(
    reply: Reply,
    to_response: impl FnOnce(T) -> Response + Send + 'static,
) -> Box<dyn FnOnce(Result<T, dmq_dispatcher::DispatchError>) + Send> {
    Box::new(move |result| {
        let _ = reply.send(
            result
                .map(to_response)
                .map_err(|error| convert::dispatch_error(&error)),
        );
    })
}

/// Ids of check-back listeners (one per connection that sent TXN_LISTEN).
static NEXT_LISTENER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Session {
    /// TXN_LISTEN: this connection gets the TXN_CHECK pushes of a producer
    /// group (round robin among its listeners) until it closes. Any
    /// authenticated client may listen: a check names a transaction, and
    /// ending it still needs the producer right on its topics.
    pub(super) async fn txn_listen(
        &mut self,
        listen: wire::TxnListen,
    ) -> Result<Response, ErrorResponse> {
        // The same name rules as the transactions it hears about.
        txn_key(&listen.producer_group, "-")?;
        let id = *self.listener.get_or_insert_with(|| {
            NEXT_LISTENER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let outbound = self.outbound.clone();
        let sink: crate::engine::CheckSink = Box::new(move |check| {
            let push = Frame::push(wire::Push::TxnCheck(wire::TxnCheck {
                producer_group: check.group.clone(),
                transaction_id: check.id.clone(),
                handle: check.handle,
                opened_ms: check.opened_ms,
                checks: check.checks,
            }));
            outbound.try_send(push.into()).is_ok()
        });
        let group = listen.producer_group;
        self.shared
            .engine
            .call(move |_, routes| routes.listen(group, id, sink))
            .await
            .map_err(|error| convert::engine_error(&error))?;
        Ok(Response::Ok)
    }
}

impl Session {
    /// TXN_INIT: with epoch 0 this connection becomes the current instance
    /// of the transactional producer `producer_id` of the group (the next
    /// epoch, durable); with the epoch an instance was given, it resumes
    /// it on this connection (ProducerFenced if a newer one registered).
    /// The connection remembers the epoch, and its TXN_PRODUCE and TXN_END
    /// of the group are refused with ProducerFenced once a newer instance
    /// registered.
    pub(super) async fn txn_init(
        &mut self,
        init: wire::TxnInit,
    ) -> Result<Response, ErrorResponse> {
        txn_key(&init.producer_group, &init.producer_id)?;
        let (group, producer) = (init.producer_group.clone(), init.producer_id.clone());
        let resume = init.epoch;
        let result = self
            .run(move |dispatcher, _| {
                if resume == 0 {
                    dispatcher.txn_init(&group, &producer)
                } else {
                    dispatcher
                        .check_producer_epoch(&group, &producer, resume)
                        .map(|()| resume)
                }
            })
            .await;
        match result {
            Ok(epoch) => {
                self.fences
                    .insert(init.producer_group, (init.producer_id, epoch));
                Ok(Response::TxnInitOk(wire::TxnInitOk { epoch }))
            }
            Err(error) => {
                // A fenced instance that tries to resume stays fenced on
                // this connection too.
                if error.code == ErrorCode::ProducerFenced {
                    self.fences
                        .insert(init.producer_group, (init.producer_id, resume));
                }
                Err(error)
            }
        }
    }

    /// The producer id and epoch this connection registered for `group`.
    fn fence(&self, group: &str) -> Option<(String, String, u32)> {
        self.fences
            .get(group)
            .map(|(producer, epoch)| (group.to_string(), producer.clone(), *epoch))
    }
}

/// Refuses a request of a fenced producer instance.
fn check_fence(
    dispatcher: &dmq_dispatcher::Dispatcher,
    fence: Option<(String, String, u32)>,
) -> Result<(), ErrorResponse> {
    match fence {
        Some((group, producer, epoch)) => dispatcher
            .check_producer_epoch(&group, &producer, epoch)
            .map_err(|error| convert::dispatch_error(&error)),
        None => Ok(()),
    }
}

fn txn_key(group: &str, id: &str) -> Result<TxnKey, ErrorResponse> {
    TxnKey::new(group, id)
        .map_err(|error| ErrorResponse::new(ErrorCode::InvalidRequest, error.to_string()))
}
