//! PRODUCE: decoding and replying only; routing, dedup, append and durability
//! are the produce pipeline's (`crate::produce`).

use super::*;

/// Idempotent producers a connection remembers having seen (see
/// `Session::producers`).
const MAX_PRODUCERS_PER_CONNECTION: usize = 1024;

impl Session {
    /// Appends in request order now; answers once durable, from a task.
    ///
    /// Each produce holds one of the connection's in-flight permits until
    /// its answer is queued for the writer: a client that sends produces
    /// but never reads the answers stops being read once
    /// `max_inflight_requests_per_connection` are waiting, so its memory
    /// is bounded by configuration, not by how much it sends.
    pub(super) async fn produce(&mut self, correlation_id: u32, produce: wire::Produce) {
        let Ok(permit) = Arc::clone(&self.inflight).acquire_owned().await else {
            return;
        };
        match self.start_produce(correlation_id, produce, permit).await {
            Ok(()) => {}
            Err(error) => self.send(error_frame(correlation_id, error)).await,
        }
    }

    pub(super) async fn start_produce(
        &mut self,
        correlation_id: u32,
        produce: wire::Produce,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), ErrorResponse> {
        // Rights first: a client without them learns nothing of the topic.
        let default_ttl_ms = match self.authorize(&produce.topic, Right::Produce).await? {
            Access::Granted { default_ttl_ms, .. } => default_ttl_ms,
            Access::Unregistered => None,
        };
        let now = self.clock.now_ms();
        let mut records: Vec<_> = produce
            .records
            .into_iter()
            .map(|record| convert::record_input(record, now))
            .collect();
        if let Some(ttl) = default_ttl_ms {
            for record in &mut records {
                if record.expire_at_ms.is_none() {
                    let from = record.deliver_at_ms.unwrap_or(now).max(now);
                    record.expire_at_ms = Some(from.saturating_add(ttl as i64));
                }
            }
        }
        let sequence = produce.idempotence.map(|s| (s.producer_id, s.sequence));
        let first_of_producer = sequence.is_some_and(|(producer, _)| {
            if self.producers.len() >= MAX_PRODUCERS_PER_CONNECTION {
                // Forgetting them costs only a catch-up each.
                self.producers.clear();
            }
            self.producers.insert(producer)
        });
        let request = ProduceRequest {
            topic: produce.topic,
            partition: produce.partition,
            records,
            sequence,
            first_of_producer,
            origin: Origin {
                client_id: self.client_id.clone(),
                peer: self.peer,
                received_ms: now,
            },
            max_frame_bytes: self.shared.config.max_frame_bytes,
        };
        match crate::produce::admit(&self.shared.engine, request).await? {
            Admitted::Answered(answer) => {
                self.send(Frame::response(correlation_id, Response::ProduceOk(answer)))
                    .await;
            }
            Admitted::Pending(pending) => {
                let outbound = self.outbound.clone();
                tokio::spawn(async move {
                    let frame = match pending.answer().await {
                        Ok(answer) => Frame::response(correlation_id, Response::ProduceOk(answer)),
                        Err(error) => error_frame(correlation_id, error),
                    };
                    let _ = outbound.send(frame.into()).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }
}
