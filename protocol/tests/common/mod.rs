//! Shared by the integration tests: proptest strategies for every body, and
//! a set of fixed sample frames (the PROTOCOL.md examples and the fuzz seed
//! corpus are built from them).

#![allow(dead_code)]

use bytes::Bytes;
use dmq_protocol::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

pub fn short_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9._-]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(40).collect()),
    ]
}

pub fn byte_string() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

pub fn message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

pub fn header() -> impl Strategy<Value = Header> {
    (byte_string(), byte_string()).prop_map(|(name, value)| Header { name, value })
}

pub fn headers() -> impl Strategy<Value = Vec<Header>> {
    vec(header(), 0..4)
}

pub fn mode() -> impl Strategy<Value = DeliveryMode> {
    prop_oneof![
        Just(DeliveryMode::Clustering),
        Just(DeliveryMode::Broadcast)
    ]
}

pub fn position() -> impl Strategy<Value = StartPosition> {
    prop_oneof![
        Just(StartPosition::Earliest),
        Just(StartPosition::Latest),
        any::<i64>().prop_map(StartPosition::Timestamp),
        any::<u64>().prop_map(StartPosition::Offset),
    ]
}

pub fn delivery_time() -> impl Strategy<Value = DeliveryTime> {
    prop_oneof![
        Just(DeliveryTime::Immediate),
        any::<u64>().prop_map(DeliveryTime::DelayMs),
        any::<i64>().prop_map(DeliveryTime::AtMs),
    ]
}

pub fn backoff() -> impl Strategy<Value = Backoff> {
    prop_oneof![
        vec(any::<u64>(), 0..5).prop_map(|delays_ms| Backoff::Fixed { delays_ms }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(initial_ms, max_ms)| Backoff::Exponential { initial_ms, max_ms }),
    ]
}

pub fn settings() -> impl Strategy<Value = GroupSettings> {
    (
        option::of(any::<u64>()),
        option::of(any::<u32>()),
        option::of(backoff()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        option::of(short_string()),
    )
        .prop_map(
            |(
                ack_timeout_ms,
                max_attempts,
                backoff,
                max_unacked_per_partition,
                rate_limit_per_second,
                dead_letter_topic,
            )| GroupSettings {
                ack_timeout_ms,
                max_attempts,
                backoff,
                max_unacked_per_partition,
                rate_limit_per_second,
                dead_letter_topic,
            },
        )
}

pub fn positions() -> impl Strategy<Value = Vec<MessagePosition>> {
    vec(
        (any::<u32>(), any::<u64>())
            .prop_map(|(partition, offset)| MessagePosition { partition, offset }),
        0..6,
    )
}

pub fn tombstone() -> impl Strategy<Value = Tombstone> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(partition, start, end)| {
            Tombstone::OffsetRange {
                partition,
                start,
                end,
            }
        }),
        message_id().prop_map(Tombstone::MessageId),
        (any::<i64>(), any::<i64>())
            .prop_map(|(start_ms, end_ms)| Tombstone::TimeRange { start_ms, end_ms }),
    ]
}

pub fn produce_record() -> impl Strategy<Value = ProduceRecord> {
    (
        option::of(byte_string()),
        headers(),
        byte_string(),
        delivery_time(),
        option::of(any::<u64>()),
    )
        .prop_map(
            |(key, headers, value, delivery_time, ttl_ms)| ProduceRecord {
                key,
                headers,
                value,
                delivery_time,
                ttl_ms,
            },
        )
}

pub fn delivery() -> impl Strategy<Value = Delivery> {
    (
        (
            any::<u64>(),
            short_string(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            message_id(),
        ),
        (
            any::<i64>(),
            option::of(byte_string()),
            headers(),
            byte_string(),
            option::of(any::<i64>()),
            option::of(any::<i64>()),
        ),
    )
        .prop_map(
            |(
                (subscription_id, topic, partition, offset, attempt, message_id),
                (timestamp_ms, key, headers, value, deliver_at_ms, expire_at_ms),
            )| Delivery {
                subscription_id,
                topic,
                partition,
                offset,
                attempt,
                message_id,
                timestamp_ms,
                key,
                headers,
                value,
                deliver_at_ms,
                expire_at_ms,
            },
        )
}

pub fn hello() -> impl Strategy<Value = Request> {
    (any::<u16>(), any::<u16>(), short_string(), byte_string()).prop_map(
        |(min_version, max_version, client_id, secret)| {
            Request::Hello(Hello {
                min_version,
                max_version,
                client_id,
                secret,
            })
        },
    )
}

pub fn produce() -> impl Strategy<Value = Request> {
    (
        short_string(),
        option::of(any::<u32>()),
        option::of(
            (any::<u64>(), any::<u64>()).prop_map(|(producer_id, sequence)| ProducerSequence {
                producer_id,
                sequence,
            }),
        ),
        vec(produce_record(), 0..4),
    )
        .prop_map(|(topic, partition, idempotence, records)| {
            Request::Produce(Produce {
                topic,
                partition,
                idempotence,
                records,
            })
        })
}

pub fn subscribe() -> impl Strategy<Value = Request> {
    (
        short_string(),
        short_string(),
        short_string(),
        mode(),
        position(),
        any::<u32>(),
        settings(),
    )
        .prop_map(
            |(topic, group, member_name, mode, start, credit, settings)| {
                Request::Subscribe(Subscribe {
                    topic,
                    group,
                    member_name,
                    mode,
                    start,
                    credit,
                    settings,
                })
            },
        )
}

pub fn seek() -> impl Strategy<Value = Request> {
    (
        short_string(),
        short_string(),
        option::of(any::<u32>()),
        position(),
        any::<bool>(),
    )
        .prop_map(|(topic, group, partition, target, dry_run)| {
            Request::Seek(Seek {
                topic,
                group,
                partition,
                target,
                dry_run,
            })
        })
}

pub fn txn_outcome() -> impl Strategy<Value = TxnOutcome> {
    prop_oneof![Just(TxnOutcome::Commit), Just(TxnOutcome::Rollback)]
}

pub fn produced_record() -> impl Strategy<Value = ProducedRecord> {
    (
        any::<u32>(),
        option::of(any::<u64>()),
        message_id(),
        option::of(any::<i64>()),
    )
        .prop_map(
            |(partition, offset, message_id, deliver_at_ms)| ProducedRecord {
                partition,
                offset,
                message_id,
                deliver_at_ms,
            },
        )
}

pub fn txn_produce() -> impl Strategy<Value = TxnProduce> {
    (
        short_string(),
        short_string(),
        any::<u64>(),
        short_string(),
        option::of(any::<u32>()),
        vec(produce_record(), 0..4),
    )
        .prop_map(
            |(producer_group, transaction_id, handle, topic, partition, records)| TxnProduce {
                producer_group,
                transaction_id,
                handle,
                topic,
                partition,
                records,
            },
        )
}

/// One strategy per request opcode.
pub fn requests() -> Vec<(Opcode, BoxedStrategy<Request>)> {
    vec![
        (Opcode::Hello, hello().boxed()),
        (Opcode::Ping, Just(Request::Ping).boxed()),
        (Opcode::Produce, produce().boxed()),
        (
            Opcode::TxnProduce,
            txn_produce().prop_map(Request::TxnProduce).boxed(),
        ),
        (
            Opcode::TxnProduceSeq,
            (txn_produce(), any::<u32>())
                .prop_map(|(produce, sequence)| {
                    Request::TxnProduceSeq(TxnProduceSeq { produce, sequence })
                })
                .boxed(),
        ),
        (
            Opcode::TxnInit,
            (short_string(), short_string(), any::<u32>())
                .prop_map(|(producer_group, producer_id, epoch)| {
                    Request::TxnInit(TxnInit {
                        producer_group,
                        producer_id,
                        epoch,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::TxnAck,
            (
                short_string(),
                short_string(),
                any::<u64>(),
                any::<u64>(),
                positions(),
            )
                .prop_map(
                    |(producer_group, transaction_id, handle, subscription_id, messages)| {
                        Request::TxnAck(TxnAck {
                            producer_group,
                            transaction_id,
                            handle,
                            subscription_id,
                            messages,
                        })
                    },
                )
                .boxed(),
        ),
        (
            Opcode::TxnListen,
            short_string()
                .prop_map(|producer_group| Request::TxnListen(TxnListen { producer_group }))
                .boxed(),
        ),
        (
            Opcode::TxnEnd,
            (short_string(), short_string(), any::<u64>(), txn_outcome())
                .prop_map(|(producer_group, transaction_id, handle, outcome)| {
                    Request::TxnEnd(TxnEnd {
                        producer_group,
                        transaction_id,
                        handle,
                        outcome,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::CancelDelay,
            message_id()
                .prop_map(|message_id| Request::CancelDelay(CancelDelay { message_id }))
                .boxed(),
        ),
        (
            Opcode::DeleteMessages,
            (short_string(), tombstone())
                .prop_map(|(topic, tombstone)| {
                    Request::DeleteMessages(DeleteMessages { topic, tombstone })
                })
                .boxed(),
        ),
        (Opcode::Subscribe, subscribe().boxed()),
        (
            Opcode::Unsubscribe,
            any::<u64>()
                .prop_map(|subscription_id| Request::Unsubscribe(Unsubscribe { subscription_id }))
                .boxed(),
        ),
        (
            Opcode::Credit,
            (any::<u64>(), any::<u32>())
                .prop_map(|(subscription_id, credit)| {
                    Request::Credit(Credit {
                        subscription_id,
                        credit,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Fetch,
            (any::<u64>(), any::<u32>(), any::<u32>())
                .prop_map(|(subscription_id, max_messages, max_wait_ms)| {
                    Request::Fetch(Fetch {
                        subscription_id,
                        max_messages,
                        max_wait_ms,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Ack,
            (any::<u64>(), positions())
                .prop_map(|(subscription_id, messages)| {
                    Request::Ack(Ack {
                        subscription_id,
                        messages,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Nack,
            (any::<u64>(), positions(), option::of(any::<u64>()))
                .prop_map(|(subscription_id, messages, delay_ms)| {
                    Request::Nack(Nack {
                        subscription_id,
                        messages,
                        delay_ms,
                    })
                })
                .boxed(),
        ),
        (Opcode::Seek, seek().boxed()),
        (
            Opcode::CreateTopic,
            (short_string(), any::<u32>(), any::<bool>())
                .prop_map(|(name, partitions, ordered)| {
                    Request::CreateTopic(CreateTopic {
                        name,
                        partitions,
                        ordered,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::DeleteTopic,
            short_string()
                .prop_map(|name| Request::DeleteTopic(DeleteTopic { name }))
                .boxed(),
        ),
        (Opcode::ListTopics, Just(Request::ListTopics).boxed()),
        (
            Opcode::DescribeTopic,
            short_string()
                .prop_map(|name| Request::DescribeTopic(DescribeTopic { name }))
                .boxed(),
        ),
        (
            Opcode::PartitionLeaders,
            short_string()
                .prop_map(|topic| Request::PartitionLeaders(PartitionLeaders { topic }))
                .boxed(),
        ),
        (
            Opcode::ListGroups,
            short_string()
                .prop_map(|topic| Request::ListGroups(ListGroups { topic }))
                .boxed(),
        ),
        (
            Opcode::DescribeGroup,
            (short_string(), short_string())
                .prop_map(|(topic, group)| Request::DescribeGroup(DescribeGroup { topic, group }))
                .boxed(),
        ),
        (
            Opcode::DeleteGroup,
            (short_string(), short_string())
                .prop_map(|(topic, group)| Request::DeleteGroup(DeleteGroup { topic, group }))
                .boxed(),
        ),
    ]
}

/// One strategy per response opcode.
pub fn responses() -> Vec<(Opcode, BoxedStrategy<Response>)> {
    vec![
        (Opcode::Ok, Just(Response::Ok).boxed()),
        (
            Opcode::HelloOk,
            (any::<u16>(), any::<u32>(), short_string())
                .prop_map(|(version, max_frame_bytes, broker_id)| {
                    Response::HelloOk(HelloOk {
                        version,
                        max_frame_bytes,
                        broker_id,
                    })
                })
                .boxed(),
        ),
        (Opcode::Pong, Just(Response::Pong).boxed()),
        (
            Opcode::ProduceOk,
            vec(
                (
                    any::<u32>(),
                    option::of(any::<u64>()),
                    message_id(),
                    option::of(any::<i64>()),
                )
                    .prop_map(|(partition, offset, message_id, deliver_at_ms)| {
                        ProducedRecord {
                            partition,
                            offset,
                            message_id,
                            deliver_at_ms,
                        }
                    }),
                0..5,
            )
            .prop_map(|records| Response::ProduceOk(ProduceOk { records }))
            .boxed(),
        ),
        (
            Opcode::TxnProduceOk,
            (any::<u64>(), vec(produced_record(), 0..5))
                .prop_map(|(handle, records)| {
                    Response::TxnProduceOk(TxnProduceOk { handle, records })
                })
                .boxed(),
        ),
        (
            Opcode::TxnAcked,
            any::<u64>()
                .prop_map(|handle| Response::TxnAcked(TxnAcked { handle }))
                .boxed(),
        ),
        (
            Opcode::TxnInitOk,
            any::<u32>()
                .prop_map(|epoch| Response::TxnInitOk(TxnInitOk { epoch }))
                .boxed(),
        ),
        (
            Opcode::TxnEnded,
            txn_outcome()
                .prop_map(|outcome| Response::TxnEnded(TxnEnded { outcome }))
                .boxed(),
        ),
        (
            Opcode::CancelDelayOk,
            any::<bool>()
                .prop_map(|cancelled| Response::CancelDelayOk(CancelDelayOk { cancelled }))
                .boxed(),
        ),
        (
            Opcode::Subscribed,
            (any::<u64>(), vec(any::<u32>(), 0..8))
                .prop_map(|(subscription_id, partitions)| {
                    Response::Subscribed(Subscribed {
                        subscription_id,
                        partitions,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Deliveries,
            vec(delivery(), 0..3)
                .prop_map(|deliveries| Response::Deliveries(Deliveries { deliveries }))
                .boxed(),
        ),
        (
            Opcode::SeekReport,
            (
                any::<bool>(),
                vec(
                    any::<(u32, u64, u64, u64, u64)>().prop_map(
                        |(partition, old_floor, new_floor, redelivered, skipped)| SeekPartition {
                            partition,
                            old_floor,
                            new_floor,
                            redelivered,
                            skipped,
                        },
                    ),
                    0..4,
                ),
            )
                .prop_map(|(dry_run, partitions)| {
                    Response::SeekReport(SeekReport {
                        dry_run,
                        partitions,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Topics,
            vec(
                (short_string(), any::<u32>(), any::<bool>()).prop_map(
                    |(name, partitions, ordered)| TopicSummary {
                        name,
                        partitions,
                        ordered,
                    },
                ),
                0..4,
            )
            .prop_map(|topics| Response::Topics(Topics { topics }))
            .boxed(),
        ),
        (
            Opcode::TopicDescription,
            (
                short_string(),
                any::<bool>(),
                vec(
                    any::<(u32, u64, u64, u64, u64)>().prop_map(
                        |(partition, start_offset, end_offset, size_bytes, disk_bytes)| {
                            PartitionInfo {
                                partition,
                                start_offset,
                                end_offset,
                                size_bytes,
                                disk_bytes,
                            }
                        },
                    ),
                    0..4,
                ),
                vec(short_string(), 0..4),
            )
                .prop_map(|(name, ordered, partitions, groups)| {
                    Response::TopicDescription(TopicDescription {
                        name,
                        ordered,
                        partitions,
                        groups,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Leaders,
            vec(
                (any::<u32>(), any::<u64>(), short_string()).prop_map(
                    |(partition, node_id, address)| PartitionLeader {
                        partition,
                        node_id,
                        address,
                    },
                ),
                0..4,
            )
            .prop_map(|partitions| Response::Leaders(Leaders { partitions }))
            .boxed(),
        ),
        (
            Opcode::Groups,
            vec(
                (short_string(), mode(), settings()).prop_map(|(name, mode, settings)| {
                    GroupSummary {
                        name,
                        mode,
                        settings,
                    }
                }),
                0..3,
            )
            .prop_map(|groups| Response::Groups(Groups { groups }))
            .boxed(),
        ),
        (
            Opcode::GroupDescription,
            (
                short_string(),
                short_string(),
                mode(),
                vec(
                    (
                        any::<(u32, u64, u64, u64, u64, u64)>(),
                        option::of(any::<u64>()),
                        any::<u64>(),
                    )
                        .prop_map(
                            |(
                                (partition, ack_floor, end_offset, lag, unacked, in_flight),
                                oldest_unacked_age_ms,
                                delayed,
                            )| GroupPartition {
                                partition,
                                ack_floor,
                                end_offset,
                                lag,
                                unacked,
                                in_flight,
                                oldest_unacked_age_ms,
                                delayed,
                            },
                        ),
                    0..4,
                ),
            )
                .prop_map(|(topic, group, mode, partitions)| {
                    Response::GroupDescription(GroupDescription {
                        topic,
                        group,
                        mode,
                        partitions,
                    })
                })
                .boxed(),
        ),
        (
            Opcode::Error,
            (any::<u32>(), short_string())
                .prop_map(|(code, message)| {
                    Response::Error(ErrorResponse {
                        code: ErrorCode::from_u32(code),
                        message,
                    })
                })
                .boxed(),
        ),
    ]
}

/// One strategy per push opcode.
pub fn pushes() -> Vec<(Opcode, BoxedStrategy<Push>)> {
    vec![
        (Opcode::Deliver, delivery().prop_map(Push::Deliver).boxed()),
        (
            Opcode::TxnCheck,
            (
                short_string(),
                short_string(),
                any::<u64>(),
                any::<i64>(),
                any::<u32>(),
            )
                .prop_map(
                    |(producer_group, transaction_id, handle, opened_ms, checks)| {
                        Push::TxnCheck(TxnCheck {
                            producer_group,
                            transaction_id,
                            handle,
                            opened_ms,
                            checks,
                        })
                    },
                )
                .boxed(),
        ),
    ]
}

/// A frame of any opcode.
pub fn any_frame() -> impl Strategy<Value = Frame> {
    let requests: Vec<_> = requests().into_iter().map(|(_, s)| s).collect();
    let responses: Vec<_> = responses().into_iter().map(|(_, s)| s).collect();
    let pushes: Vec<_> = pushes().into_iter().map(|(_, s)| s).collect();
    prop_oneof![
        (
            any::<u32>(),
            any::<u8>(),
            proptest::strategy::Union::new(requests)
        )
            .prop_map(|(correlation_id, flags, request)| Frame {
                correlation_id,
                flags,
                body: Body::Request(request),
            }),
        (
            any::<u32>(),
            any::<u8>(),
            proptest::strategy::Union::new(responses)
        )
            .prop_map(|(correlation_id, flags, response)| Frame {
                correlation_id,
                flags,
                body: Body::Response(response),
            }),
        (any::<u8>(), proptest::strategy::Union::new(pushes)).prop_map(|(flags, push)| Frame {
            correlation_id: 0,
            flags,
            body: Body::Push(push),
        }),
    ]
}

pub fn id(last: u8) -> MessageId {
    let mut bytes = [0u8; 16];
    bytes[15] = last;
    MessageId(bytes)
}

/// Fixed frames with names: the PROTOCOL.md examples and the valid seeds
/// of the fuzz corpus.
pub fn sample_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::request(
                1,
                Hello {
                    min_version: 1,
                    max_version: 1,
                    client_id: "app".into(),
                    secret: Bytes::from_static(b"pw"),
                },
            ),
        ),
        (
            "hello_ok",
            Frame::response(
                1,
                HelloOk {
                    version: 1,
                    max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                    broker_id: "b1".into(),
                },
            ),
        ),
        ("ping", Frame::request(2, Request::Ping)),
        ("pong", Frame::response(2, Response::Pong)),
        (
            "produce",
            Frame::request(
                3,
                Produce {
                    topic: "orders".into(),
                    partition: None,
                    idempotence: None,
                    records: vec![ProduceRecord {
                        key: Some(Bytes::from_static(b"k1")),
                        headers: vec![],
                        value: Bytes::from_static(b"hi"),
                        delivery_time: DeliveryTime::Immediate,
                        ttl_ms: None,
                    }],
                },
            ),
        ),
        (
            "produce_ok",
            Frame::response(
                3,
                ProduceOk {
                    records: vec![ProducedRecord {
                        partition: 0,
                        offset: Some(42),
                        message_id: id(1),
                        deliver_at_ms: None,
                    }],
                },
            ),
        ),
        (
            "subscribe",
            Frame::request(
                4,
                Subscribe {
                    topic: "orders".into(),
                    group: "billing".into(),
                    member_name: "w1".into(),
                    mode: DeliveryMode::Clustering,
                    start: StartPosition::Earliest,
                    credit: 100,
                    settings: GroupSettings {
                        max_attempts: Some(5),
                        ..GroupSettings::default()
                    },
                },
            ),
        ),
        (
            "subscribed",
            Frame::response(
                4,
                Subscribed {
                    subscription_id: 1,
                    partitions: vec![0, 1],
                },
            ),
        ),
        (
            "deliver",
            Frame::push(Delivery {
                subscription_id: 1,
                topic: "orders".into(),
                partition: 0,
                offset: 42,
                attempt: 1,
                message_id: id(1),
                timestamp_ms: 1_700_000_000_000,
                key: Some(Bytes::from_static(b"k1")),
                headers: vec![Header::new(&b"h"[..], &b"v"[..])],
                value: Bytes::from_static(b"hi"),
                deliver_at_ms: None,
                expire_at_ms: None,
            }),
        ),
        (
            "ack",
            Frame::request(
                5,
                Ack {
                    subscription_id: 1,
                    messages: vec![MessagePosition {
                        partition: 0,
                        offset: 42,
                    }],
                },
            ),
        ),
        ("ok", Frame::response(5, Response::Ok)),
        (
            "nack",
            Frame::request(
                6,
                Nack {
                    subscription_id: 1,
                    messages: vec![MessagePosition {
                        partition: 0,
                        offset: 43,
                    }],
                    delay_ms: Some(1000),
                },
            ),
        ),
        (
            "error",
            Frame::error(7, ErrorCode::UnknownTopic, "no such topic: orders"),
        ),
        (
            "seek",
            Frame::request(
                8,
                Seek {
                    topic: "orders".into(),
                    group: "billing".into(),
                    partition: None,
                    target: StartPosition::Timestamp(1_700_000_000_000),
                    dry_run: true,
                },
            ),
        ),
        (
            "create_topic",
            Frame::request(
                9,
                CreateTopic {
                    name: "orders".into(),
                    partitions: 4,
                    ordered: false,
                },
            ),
        ),
        (
            "txn_produce",
            Frame::request(
                7,
                TxnProduce {
                    producer_group: "shop".into(),
                    transaction_id: "o17".into(),
                    handle: 0,
                    topic: "orders".into(),
                    partition: None,
                    records: vec![ProduceRecord {
                        key: None,
                        headers: vec![],
                        value: Bytes::from_static(b"paid"),
                        delivery_time: DeliveryTime::Immediate,
                        ttl_ms: None,
                    }],
                },
            ),
        ),
        (
            "txn_produce_ok",
            Frame::response(
                7,
                TxnProduceOk {
                    handle: 42,
                    records: vec![ProducedRecord {
                        partition: 0,
                        offset: None,
                        message_id: MessageId([0x11; 16]),
                        deliver_at_ms: None,
                    }],
                },
            ),
        ),
        (
            "txn_end",
            Frame::request(
                8,
                TxnEnd {
                    producer_group: "shop".into(),
                    transaction_id: "o17".into(),
                    handle: 42,
                    outcome: TxnOutcome::Commit,
                },
            ),
        ),
        (
            "txn_ended",
            Frame::response(
                8,
                TxnEnded {
                    outcome: TxnOutcome::Commit,
                },
            ),
        ),
        (
            "txn_ack",
            Frame::request(
                9,
                TxnAck {
                    producer_group: "shop".into(),
                    transaction_id: "o17".into(),
                    handle: 42,
                    subscription_id: 1,
                    messages: vec![MessagePosition {
                        partition: 0,
                        offset: 7,
                    }],
                },
            ),
        ),
        ("txn_acked", Frame::response(9, TxnAcked { handle: 42 })),
        (
            "partition_leaders",
            Frame::request(
                11,
                PartitionLeaders {
                    topic: "orders".into(),
                },
            ),
        ),
        (
            "leaders",
            Frame::response(
                11,
                Leaders {
                    partitions: vec![
                        PartitionLeader {
                            partition: 0,
                            node_id: 2,
                            address: "10.0.0.2:6380".into(),
                        },
                        PartitionLeader {
                            partition: 1,
                            node_id: 0,
                            address: String::new(),
                        },
                    ],
                },
            ),
        ),
        (
            "txn_produce_seq",
            Frame::request(
                10,
                TxnProduceSeq {
                    produce: TxnProduce {
                        producer_group: "shop".into(),
                        transaction_id: "o17".into(),
                        handle: 42,
                        topic: "audit".into(),
                        partition: None,
                        records: vec![ProduceRecord {
                            key: None,
                            headers: vec![],
                            value: Bytes::from_static(b"o17 paid"),
                            delivery_time: DeliveryTime::Immediate,
                            ttl_ms: None,
                        }],
                    },
                    sequence: 1,
                },
            ),
        ),
    ]
}
