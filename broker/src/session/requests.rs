//! Topic and group requests: create, describe, list and delete topics and
//! groups, seek, cancel a delay, and the other administrative requests of the
//! binary protocol.

use super::*;

impl Session {
    pub(super) async fn admin(&mut self, request: Request) -> Result<Response, ErrorResponse> {
        match request {
            Request::CreateTopic(create) => {
                self.development_only("registering a topic")?;
                let name = create.name;
                let topic_config = crate::topics::create_topic(
                    &self.shared.engine,
                    &name,
                    create.partitions,
                    create.ordered,
                )
                .await
                .map_err(|error| convert::engine_error(&error))?;
                {
                    // Development mode: registered and approved at once.
                    let mut registry = self
                        .shared
                        .registry
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    if registry.get(&name).is_none() {
                        let record = crate::topics::adopted_record(
                            &name,
                            &topic_config,
                            TopicStatus::Approved,
                        );
                        registry.insert(record).map_err(|error| {
                            ErrorResponse::new(ErrorCode::StorageError, error.to_string())
                        })?;
                    }
                }
                Ok(Response::Ok)
            }
            Request::ListTopics => {
                let topics = self.run(|dispatcher, _| Ok(dispatcher.topics())).await?;
                let visible: Vec<_> = topics
                    .into_iter()
                    .filter(|(name, _)| {
                        self.shared.development
                            || [Right::Produce, Right::Consume].iter().any(|right| {
                                matches!(
                                    self.registry_access(name, *right),
                                    Ok(Access::Granted { .. })
                                )
                            })
                    })
                    .collect();
                Ok(Response::Topics(wire::Topics {
                    topics: visible
                        .into_iter()
                        .map(|(name, config)| wire::TopicSummary {
                            name,
                            partitions: config.partitions,
                            ordered: config.ordered,
                        })
                        .collect(),
                }))
            }
            Request::DescribeTopic(describe) => {
                self.authorize_either(&describe.name).await?;
                let found = self.shared.engine.find_topic(&describe.name).await;
                let crate::engine::TopicHandle { config, logs, .. } = found.ok_or_else(|| {
                    ErrorResponse::new(
                        ErrorCode::UnknownTopic,
                        format!("unknown topic {:?}", describe.name),
                    )
                })?;
                let name = describe.name.clone();
                let groups = self
                    .run(move |dispatcher, _| Ok(dispatcher.groups(&name)))
                    .await?;
                Ok(Response::TopicDescription(wire::TopicDescription {
                    name: describe.name,
                    ordered: config.ordered,
                    partitions: logs
                        .iter()
                        .enumerate()
                        .map(|(p, log)| wire::PartitionInfo {
                            partition: p as u32,
                            start_offset: log.start_offset(),
                            end_offset: log.end_offset(),
                            size_bytes: log.size_bytes(),
                            disk_bytes: log.disk_bytes(),
                        })
                        .collect(),
                    groups: groups.into_iter().map(|(name, _)| name).collect(),
                }))
            }
            Request::PartitionLeaders(ask) => {
                self.authorize_either(&ask.topic).await?;
                let found = self.shared.engine.find_topic(&ask.topic).await;
                let config = found.map(|topic| topic.config).ok_or_else(|| {
                    ErrorResponse::new(
                        ErrorCode::UnknownTopic,
                        format!("unknown topic {:?}", ask.topic),
                    )
                })?;
                let leaders =
                    self.shared.engine.cluster().and_then(|cluster| {
                        cluster.partition_leaders(&ask.topic, config.partitions)
                    });
                Ok(Response::Leaders(wire::Leaders {
                    partitions: (0..config.partitions)
                        .map(|partition| {
                            let (node_id, address) = leaders
                                .as_ref()
                                .and_then(|leaders| leaders.get(partition as usize).cloned())
                                .unwrap_or_default();
                            wire::PartitionLeader {
                                partition,
                                node_id,
                                address,
                            }
                        })
                        .collect(),
                }))
            }
            Request::ListGroups(list) => {
                self.authorize(&list.topic, Right::Consume).await?;
                let topic = list.topic.clone();
                let groups = self
                    .run(move |dispatcher, _| {
                        dispatcher.partitions(&topic)?;
                        Ok(dispatcher.groups(&topic))
                    })
                    .await?;
                Ok(Response::Groups(wire::Groups {
                    groups: groups
                        .into_iter()
                        .map(|(name, config)| convert::group_summary(&list.topic, name, &config))
                        .collect(),
                }))
            }
            Request::DescribeGroup(describe) => {
                self.authorize(&describe.topic, Right::Consume).await?;
                let (topic, group) = (describe.topic.clone(), describe.group.clone());
                let (stats, mode) = self
                    .run(move |dispatcher, _| {
                        let mode = dispatcher
                            .groups(&topic)
                            .into_iter()
                            .find(|(name, _)| *name == group)
                            .map(|(_, config)| config.mode);
                        Ok((dispatcher.group_stats(&topic, &group)?, mode))
                    })
                    .await?;
                Ok(Response::GroupDescription(wire::GroupDescription {
                    topic: describe.topic,
                    group: describe.group,
                    mode: match mode {
                        Some(dmq_dispatcher::DeliveryMode::Broadcast) => {
                            wire::DeliveryMode::Broadcast
                        }
                        _ => wire::DeliveryMode::Clustering,
                    },
                    partitions: stats
                        .into_iter()
                        .map(|s| wire::GroupPartition {
                            partition: s.partition,
                            ack_floor: s.ack_floor,
                            end_offset: s.end_offset,
                            lag: s.lag,
                            unacked: s.unacked,
                            in_flight: s.in_flight,
                            oldest_unacked_age_ms: s.oldest_unacked_age_ms,
                            delayed: s.delayed,
                        })
                        .collect(),
                }))
            }
            Request::Seek(seek) => {
                self.authorize(&seek.topic, Right::Consume).await?;
                // A cluster topic's groups move where they are served:
                // another node's copy is not the one that delivers.
                self.consumer_home_check(&seek.topic).await?;
                let target = convert::start_position(seek.target);
                let dry_run = seek.dry_run;
                let topic = seek.topic.clone();
                let report = self
                    .run(move |dispatcher, _| {
                        dispatcher.seek(&seek.topic, &seek.group, seek.partition, target, dry_run)
                    })
                    .await?;
                if let (Some(cluster), false) = (self.shared.engine.cluster(), dry_run) {
                    cluster
                        .seek_replicated(&topic)
                        .await
                        .map_err(|error| convert::dispatch_error(&error))?;
                }
                Ok(Response::SeekReport(wire::SeekReport {
                    dry_run,
                    partitions: report
                        .into_iter()
                        .map(|p| wire::SeekPartition {
                            partition: p.partition,
                            old_floor: p.old_floor,
                            new_floor: p.new_floor,
                            redelivered: p.redelivered,
                            skipped: p.skipped,
                        })
                        .collect(),
                }))
            }
            Request::CancelDelay(cancel) => {
                let id = dmq_log_store::MessageId(cancel.message_id.0);
                if !self.shared.development {
                    // Whoever may produce to the message's topic may cancel
                    // it; the topic comes from the message's trace.
                    // A cluster delay produced through another node has
                    // its trace there: its topic is in the timer log.
                    let telemetry = self.shared.engine.telemetry().clone();
                    let delays = self.shared.engine.cluster().map(|c| Arc::clone(c.delays()));
                    let topic = tokio::task::spawn_blocking(move || {
                        let traced = telemetry.trace(&id).ok().and_then(|events| {
                            events
                                .into_iter()
                                .find(|event| event.kind == "produced")
                                .map(|event| event.topic)
                        });
                        traced.or_else(|| {
                            delays.and_then(|delays| delays.destination_of(&id).ok().flatten())
                        })
                    })
                    .await
                    .ok()
                    .flatten();
                    match topic {
                        Some(topic) => {
                            self.authorize(&topic, Right::Produce).await?;
                        }
                        None => {
                            return Err(ErrorResponse::new(
                                ErrorCode::NotAuthorized,
                                "no trace of this message: cannot tell its topic",
                            ))
                        }
                    }
                }
                let mut cancelled = self
                    .run(move |dispatcher, _| dispatcher.cancel_delay(&id))
                    .await?;
                if let (false, Some(cluster)) = (cancelled, self.shared.engine.cluster()) {
                    cancelled = cluster
                        .delays()
                        .cancel(id)
                        .await
                        .map_err(|error| convert::store_error(&error))?;
                }
                Ok(Response::CancelDelayOk(wire::CancelDelayOk { cancelled }))
            }
            Request::DeleteMessages(delete) => {
                self.development_only("deleting messages")?;
                let tombstone = convert::tombstone(delete.tombstone);
                let topic = delete.topic.clone();
                if let Some(cluster) = self.shared.engine.cluster() {
                    // Nothing to wait for on a local topic (no replica).
                    if let Some(handle) = self.shared.engine.find_topic(&topic).await {
                        crate::produce::catch_up(cluster, &topic, handle.router.partitions())
                            .await?;
                    }
                }
                self.run(move |dispatcher, _| dispatcher.delete(&delete.topic, tombstone))
                    .await?;
                if let Some(cluster) = self.shared.engine.cluster() {
                    cluster
                        .deletion_replicated(&topic)
                        .await
                        .map_err(|error| convert::dispatch_error(&error))?;
                }
                Ok(Response::Ok)
            }
            Request::DeleteTopic(delete) => {
                self.development_only("deleting a topic")?;
                let name = delete.name.clone();
                crate::topics::delete_topic(&self.shared.engine, &self.shared.registry, &name)
                    .await
                    .map_err(|error| convert::engine_error(&error))?;
                self.shared
                    .registry
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name)
                    .map_err(|error| {
                        ErrorResponse::new(ErrorCode::StorageError, error.to_string())
                    })?;
                Ok(Response::Ok)
            }
            Request::DeleteGroup(delete) => {
                self.authorize(&delete.topic, Right::Consume).await?;
                self.run(move |dispatcher, routes| {
                    let dropped = dispatcher.delete_group(&delete.topic, &delete.group)?;
                    for member in dropped {
                        routes.remove(member);
                    }
                    Ok(())
                })
                .await?;
                Ok(Response::Ok)
            }
            other => Err(ErrorResponse::new(
                ErrorCode::InvalidRequest,
                format!("unexpected request {:?}", other.opcode()),
            )),
        }
    }
}
