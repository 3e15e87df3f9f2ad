//! Consuming: SUBSCRIBE (with the group-setting conflict check), UNSUBSCRIBE,
//! CREDIT, FETCH (parked on the dispatcher thread until there is something),
//! ACK and NACK.

use super::*;
use crate::consumer_lease::ConsumerHome;

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        subscribe: wire::Subscribe,
    ) -> Result<Response, ErrorResponse> {
        // A cluster topic created through another node a moment ago is
        // waited for here (`Engine::find_topic`), not refused as unknown.
        let _ = self.shared.engine.find_topic(&subscribe.topic).await;
        let mut config = convert::group_config(&subscribe);
        if let Access::Granted {
            max_attempts,
            ack_timeout_ms,
            ..
        } = self.authorize(&subscribe.topic, Right::Consume).await?
        {
            // The topic's defaults, unless the subscription sets its own.
            if subscribe.settings.max_attempts.is_none() {
                config.max_attempts = max_attempts.unwrap_or(config.max_attempts);
            }
            if subscribe.settings.ack_timeout_ms.is_none() {
                config.ack_timeout_ms = ack_timeout_ms.unwrap_or(config.ack_timeout_ms);
            }
        }
        // A group writes its dead letters: a client may name a dead-letter
        // topic only where it may produce, and a derived one that is a
        // registered topic needs that right too (internal names are refused
        // by the dispatcher's name rules).
        let dead_letter = config.dead_letter_topic_for(&subscribe.topic, &subscribe.group);
        let registered = self
            .shared
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dead_letter)
            .is_some();
        if config.dead_letter_topic.is_some() || registered {
            if let Err(refused) = self.authorize(&dead_letter, Right::Produce).await {
                return Err(ErrorResponse::new(
                    refused.code,
                    format!(
                        "the group's dead-letter topic {}: {}",
                        dmq_dispatcher::names::shown(&dead_letter),
                        refused.message
                    ),
                ));
            }
        }
        // One node serves the consumers of cluster topics at a time: a
        // member here is delivered to only under this node's lease.
        let leased = self.consumer_home_check(&subscribe.topic).await?;
        // A group of a cluster topic dead-letters into a cluster topic:
        // its acks are replicated, so a dead letter kept on this node's
        // disk alone would be lost with it.
        if let Some(cluster) = self.shared.engine.cluster() {
            cluster
                .ensure_dead_letter_topic(&self.shared.engine, &subscribe.topic, &dead_letter)
                .await
                .map_err(|error| convert::engine_error(&error))?;
        }
        let max_credit = self.shared.config.max_credit;
        let credit = subscribe.credit.min(max_credit);
        let (sink, mut deliveries, queued) = DeliverySink::new(max_credit as usize + 16);
        let wire::Subscribe {
            topic,
            group,
            member_name,
            settings,
            ..
        } = subscribe;
        let result = self
            .shared
            .engine
            .call(
                move |dispatcher, routes| -> Result<(MemberId, u32), ErrorResponse> {
                    let dispatch = |error| convert::dispatch_error(&error);
                    let existing = dispatcher
                        .groups(&topic)
                        .into_iter()
                        .find(|(name, _)| *name == group);
                    match existing {
                        // Joining an existing group keeps its settings and
                        // position; a setting given that differs is refused.
                        Some((_, existing)) => {
                            if let Some(field) = conflicting_setting(&settings, &config, &existing)
                            {
                                return Err(ErrorResponse::new(
                                    ErrorCode::GroupConfigConflict,
                                    format!(
                                        "group {} exists with another {field}; leave it unset \
                                         to join with the group's settings",
                                        dmq_dispatcher::names::shown(&group)
                                    ),
                                ));
                            }
                        }
                        None => dispatcher
                            .subscribe(&topic, &group, config)
                            .map_err(dispatch)?,
                    }
                    let member = dispatcher
                        .join(&topic, &group, &member_name)
                        .map_err(dispatch)?;
                    dispatcher.add_credit(member, credit).map_err(dispatch)?;
                    routes.insert(member, sink);
                    let partitions = dispatcher.partitions(&topic).map_err(dispatch)?.len() as u32;
                    Ok((member, partitions))
                },
            )
            .await;
        let (member, partitions) = match result {
            Ok(Ok(ok)) => ok,
            Ok(Err(error)) => return Err(error),
            Err(error) => return Err(convert::engine_error(&error)),
        };
        self.members.insert(member);
        // A member of a cluster topic is delivered to only while this node
        // serves consumers: a batch the dispatcher handed over after the
        // lease ran out is withheld (its messages come back after their
        // ack timeout) and the connection is closed with WrongNode.
        let fence = match self.shared.engine.cluster().cloned() {
            Some(cluster) if leased => {
                self.cluster_members.insert(member);
                self.watch_consumer_lease();
                Some((cluster, Arc::clone(&self.consumers_moved)))
            }
            _ => None,
        };
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            while let Some(batch) = deliveries.recv().await {
                let count = batch.len();
                if let Some((cluster, moved)) = &fence {
                    if !cluster.serves_consumers() {
                        queued.release(count);
                        moved.notify_one();
                        continue;
                    }
                }
                let item = Outbound::Deliveries(batch, queued.clone());
                if outbound.send(item).await.is_err() {
                    queued.release(count);
                    return;
                }
            }
        });
        Ok(Response::Subscribed(wire::Subscribed {
            subscription_id: member,
            partitions: (0..partitions).collect(),
        }))
    }

    /// For a cluster topic under the consumer lease, `WrongNode` unless
    /// this node serves consumers (waiting up to a second while that is
    /// unknown: an election, a new leader's takeover wait). True if this
    /// node serves `topic`'s consumers under its lease (false: the lease
    /// is off, or not a cluster topic).
    pub(super) async fn consumer_home_check(&self, topic: &str) -> Result<bool, ErrorResponse> {
        let Some(cluster) = self.shared.engine.cluster() else {
            return Ok(false);
        };
        if !cluster.consumer_lease_enabled() || !cluster.is_cluster_topic(topic) {
            return Ok(false);
        }
        match cluster.wait_consumer_home(Duration::from_secs(1)).await {
            ConsumerHome::Here => Ok(true),
            ConsumerHome::At(addr) => Err(ErrorResponse::new(ErrorCode::WrongNode, addr)),
            ConsumerHome::Unknown => Err(ErrorResponse::new(ErrorCode::WrongNode, "")),
        }
    }

    /// The client address of the node serving consumers, or empty.
    pub(super) fn consumer_home_addr(&self) -> String {
        match self.shared.engine.cluster().map(|c| c.consumer_home()) {
            Some(ConsumerHome::At(addr)) => addr,
            _ => String::new(),
        }
    }

    /// Starts (once per connection, again if it ended) the task that
    /// wakes the connection when this node stops serving consumers.
    fn watch_consumer_lease(&mut self) {
        if self
            .lease_watch
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let Some(cluster) = self.shared.engine.cluster().cloned() else {
            return;
        };
        let Some(mut serving) = cluster.watch_consumer_lease() else {
            return;
        };
        let moved = Arc::clone(&self.consumers_moved);
        self.lease_watch = Some(tokio::spawn(async move {
            loop {
                // The watch follows the lease task's rounds; the clock
                // check also sees a lease that ran out between them.
                if !cluster.serves_consumers() {
                    moved.notify_one();
                    return;
                }
                tokio::select! {
                    changed = serving.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }));
    }

    pub(super) fn owned(&self, member: MemberId) -> Result<(), ErrorResponse> {
        if self.members.contains(&member) {
            Ok(())
        } else {
            Err(ErrorResponse::new(
                ErrorCode::UnknownSubscription,
                format!("no subscription {member} on this connection"),
            ))
        }
    }

    pub(super) async fn unsubscribe(
        &mut self,
        member: MemberId,
    ) -> Result<Response, ErrorResponse> {
        self.owned(member)?;
        self.members.remove(&member);
        self.cluster_members.remove(&member);
        self.run(move |dispatcher, routes| {
            routes.remove(member);
            dispatcher.leave(member)
        })
        .await?;
        Ok(Response::Ok)
    }

    pub(super) async fn credit(&mut self, credit: wire::Credit) -> Result<Response, ErrorResponse> {
        self.owned(credit.subscription_id)?;
        let amount = credit.credit.min(self.shared.config.max_credit);
        self.run(move |dispatcher, _| dispatcher.add_credit(credit.subscription_id, amount))
            .await?;
        Ok(Response::Ok)
    }

    pub(super) async fn fetch(&mut self, fetch: wire::Fetch) -> Result<Response, ErrorResponse> {
        self.owned(fetch.subscription_id)?;
        let member = fetch.subscription_id;
        let max = fetch.max_messages.min(self.shared.config.max_credit);
        let max_frame_bytes = self.shared.config.max_frame_bytes;
        let wait = Duration::from_millis(u64::from(fetch.max_wait_ms.min(60_000)));
        let (reply, mut answer) = oneshot::channel();
        // Fetched now, or parked on the dispatcher thread until the member
        // has something (woken by whatever woke the dispatcher). Either way
        // the answer stops before max_frame_bytes (PROTOCOL.md §6.8).
        self.fetch_fence(member)?;
        let now = self
            .run(move |dispatcher, routes| {
                let deliveries =
                    frame_limits::fetch_within(dispatcher, member, max, max_frame_bytes)?;
                if deliveries.is_empty() && !wait.is_zero() {
                    let waiting = WaitingFetch {
                        max,
                        max_frame_bytes,
                        reply,
                    };
                    routes.wait_fetch(member, waiting);
                }
                Ok(deliveries)
            })
            .await?;
        let deliveries = if !now.is_empty() || wait.is_zero() {
            now
        } else {
            match tokio::time::timeout(wait, &mut answer).await {
                Ok(Ok(deliveries)) => deliveries,
                // Replaced or the member left: nothing for this FETCH.
                Ok(Err(_)) => Vec::new(),
                Err(_) => {
                    let _ = self
                        .shared
                        .engine
                        .call(move |_, routes| routes.cancel_fetch(member))
                        .await;
                    // Answered just before the cancel: those are ours.
                    answer.try_recv().unwrap_or_default()
                }
            }
        };
        // Withheld if the lease ran out meanwhile (they come back after
        // their ack timeout).
        self.fetch_fence(member)?;
        Ok(Response::Deliveries(wire::Deliveries { deliveries }))
    }

    /// `WrongNode` for a member of a cluster topic while this node does
    /// not serve consumers.
    fn fetch_fence(&self, member: MemberId) -> Result<(), ErrorResponse> {
        match self.shared.engine.cluster() {
            Some(cluster)
                if self.cluster_members.contains(&member) && !cluster.serves_consumers() =>
            {
                Err(ErrorResponse::new(
                    ErrorCode::WrongNode,
                    self.consumer_home_addr(),
                ))
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn ack(&mut self, ack: wire::Ack) -> Result<Response, ErrorResponse> {
        self.owned(ack.subscription_id)?;
        self.run(move |dispatcher, _| {
            for position in &ack.messages {
                dispatcher.ack(ack.subscription_id, position.partition, position.offset)?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::Ok)
    }

    pub(super) async fn nack(&mut self, nack: wire::Nack) -> Result<Response, ErrorResponse> {
        self.owned(nack.subscription_id)?;
        self.run(move |dispatcher, _| {
            for position in &nack.messages {
                dispatcher.nack(
                    nack.subscription_id,
                    position.partition,
                    position.offset,
                    nack.delay_ms,
                )?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::Ok)
    }
}
