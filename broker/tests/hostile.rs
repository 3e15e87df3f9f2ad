//! Hostile requests against a real broker: names at and past every limit,
//! internal names, huge counts, dead-letter topics chosen to write where
//! the client may not, forged internal headers. After each, the broker
//! must restart on the same data and serve.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use dmq_protocol::{ErrorCode, GroupSettings, ProduceRecord, Request, Response};
use serde_json::json;

mod common;
use common::{http, Api, Broker, Connection};

fn create(name: &str, partitions: u32) -> Request {
    Request::CreateTopic(dmq_protocol::CreateTopic {
        name: name.into(),
        partitions,
        ordered: false,
    })
}

fn produce(topic: &str, headers: Vec<(&str, &str)>) -> Request {
    Request::Produce(dmq_protocol::Produce {
        topic: topic.into(),
        partition: None,
        idempotence: None,
        records: vec![ProduceRecord {
            value: Bytes::from_static(b"v"),
            headers: headers
                .into_iter()
                .map(|(name, value)| dmq_protocol::Header {
                    name: Bytes::from(name.to_string()),
                    value: Bytes::from(value.to_string()),
                })
                .collect(),
            ..Default::default()
        }],
    })
}

fn subscribe(topic: &str, group: &str, dead_letter: Option<&str>) -> Request {
    Request::Subscribe(dmq_protocol::Subscribe {
        topic: topic.into(),
        group: group.into(),
        member_name: "m".into(),
        credit: 10,
        settings: GroupSettings {
            dead_letter_topic: dead_letter.map(str::to_string),
            ..GroupSettings::default()
        },
        ..Default::default()
    })
}

fn error_code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error(error) => Some(error.code),
        _ => None,
    }
}

/// The broker serves: a fresh topic takes a produce and hands it out.
async fn serves(broker: &Broker, topic: &str) {
    let mut connection = Connection::hello(broker.addr).await;
    let response = connection.request(create(topic, 1)).await;
    assert!(matches!(response, Response::Ok), "{response:?}");
    let response = connection.request(produce(topic, vec![])).await;
    assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
    let response = connection.request(subscribe(topic, "probe", None)).await;
    assert!(matches!(response, Response::Subscribed(_)), "{response:?}");
    let delivery = connection.push().await;
    assert_eq!(&delivery.value[..], b"v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_protocol_request_bricks_the_broker() {
    let mut broker = Broker::start(|_| {}).await;
    let long_topic = "t".repeat(94);
    {
        let mut connection = Connection::hello(broker.addr).await;
        let response = connection.request(create(&long_topic, 1)).await;
        assert!(matches!(response, Response::Ok), "{response:?}");
    }
    let huge = "a".repeat(60_000);
    let cases: Vec<(String, Request, ErrorCode)> = vec![
        ("`..`".into(), create("..", 1), ErrorCode::InvalidRequest),
        ("`.`".into(), create(".", 1), ErrorCode::InvalidRequest),
        ("empty".into(), create("", 1), ErrorCode::InvalidRequest),
        ("slash".into(), create("a/b", 1), ErrorCode::InvalidRequest),
        (
            "101 bytes".into(),
            create(&"n".repeat(101), 1),
            ErrorCode::InvalidRequest,
        ),
        ("60 KB".into(), create(&huge, 1), ErrorCode::InvalidRequest),
        (
            "internal".into(),
            create("__dmq_delay", 1),
            ErrorCode::InvalidRequest,
        ),
        (
            "internal 2".into(),
            create("__x", 1),
            ErrorCode::InvalidRequest,
        ),
        (
            "0 partitions".into(),
            create("zero", 0),
            ErrorCode::InvalidRequest,
        ),
        (
            "6000 partitions".into(),
            create("wide", 6000),
            ErrorCode::InvalidRequest,
        ),
        (
            "u32::MAX partitions".into(),
            create("wider", u32::MAX),
            ErrorCode::InvalidRequest,
        ),
        (
            "derived dead-letter name too long".into(),
            subscribe(&long_topic, "gg", None),
            ErrorCode::InvalidRequest,
        ),
        (
            "dead-letter `..`".into(),
            subscribe(&long_topic, "g", Some("..")),
            ErrorCode::InvalidRequest,
        ),
        (
            "dead-letter internal".into(),
            subscribe(&long_topic, "g", Some("__dmq_delay")),
            ErrorCode::InvalidRequest,
        ),
        (
            "group `..`".into(),
            subscribe(&long_topic, "..", None),
            ErrorCode::InvalidRequest,
        ),
        (
            "forged delay headers".into(),
            produce(
                &long_topic,
                vec![
                    ("dmq.delay.topic", "victim"),
                    ("dmq.delay.partition", "\0\0\0\0"),
                ],
            ),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (index, (what, request, code)) in cases.into_iter().enumerate() {
        let mut connection = Connection::hello(broker.addr).await;
        let response = connection.request(request).await;
        assert_eq!(error_code(&response), Some(code), "{what}: {response:?}");
        if let Response::Error(error) = &response {
            assert!(error.message.len() < 400, "{what}: echoes too much");
        }
        drop(connection);
        broker = broker.restart(|_| {}).await;
        serves(&broker, &format!("after-{index}")).await;
    }
    // Nothing refused left a file behind.
    let names: Vec<String> = std::fs::read_dir(broker.data_dir().join("topics"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for refused in ["zero", "wide", "wider", "__x"] {
        assert!(
            !names.contains(&refused.to_string()),
            "{refused}: {names:?}"
        );
    }
    broker.stop().await;
}

const TOKEN: &str = "root-token-0123456789";

fn production(config: &mut dmq_broker::BrokerConfig) {
    let hash = |secret: &str| dmq_broker::auth::hash_secret(secret).unwrap();
    config.clients.insert("mal".into(), hash("mal-secret"));
    config.clients.insert("pay".into(), hash("pay-secret"));
    config.admin_tokens = vec![hash(TOKEN)];
}

/// Regression: a client with rights only on `prod.mal.src` wrote into
/// `prod.pay.orders` by naming it as its group's dead-letter topic and
/// NACKing one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_needs_the_right_to_produce_there() {
    let broker = Broker::start(production).await;
    let api = Api::new(broker.admin, Some(TOKEN));
    http(move || {
        for (department, name, client) in [("mal", "src", "mal"), ("pay", "orders", "pay")] {
            api.ok_post(
                "/api/topics",
                json!({"environment": "prod", "department": department, "name": name,
                       "owner": "o", "producers": [client], "consumers": [client]}),
            );
            api.ok_post(
                &format!("/api/topics/prod.{department}.{name}/approve"),
                json!({}),
            );
        }
    })
    .await;
    let (mut mal, response) = Connection::hello_as(broker.addr, "mal", "mal-secret").await;
    assert!(matches!(response, Response::HelloOk(_)), "{response:?}");
    for dead_letter in [
        "prod.pay.orders",
        "prod.nobody.unregistered",
        "__dmq_delay",
        "..",
    ] {
        let response = mal
            .request(subscribe("prod.mal.src", "g", Some(dead_letter)))
            .await;
        assert!(
            matches!(
                error_code(&response),
                Some(ErrorCode::NotAuthorized | ErrorCode::InvalidRequest)
            ),
            "{dead_letter}: {response:?}"
        );
    }
    // Its own topic as dead-letter topic is fine.
    let response = mal
        .request(subscribe("prod.mal.src", "g", Some("prod.mal.src")))
        .await;
    assert!(matches!(response, Response::Subscribed(_)), "{response:?}");
    let broker = broker.restart(production).await;
    broker.stop().await;
}

/// Topics and groups the replay cannot restore are quarantined and
/// reported; damaged log regions are counted and listed; a damaged
/// metadata journal stops the start with a message naming `dmqd repair`,
/// which fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_damage_and_repair_are_reported() {
    let broker = Broker::start(|_| {}).await;
    {
        let mut connection = Connection::hello(broker.addr).await;
        let response = connection.request(create("big", 1)).await;
        assert!(matches!(response, Response::Ok), "{response:?}");
        // Over 1 MiB in 64 KiB batches: the first segment is sealed.
        let value = Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..24 {
            let request = Request::Produce(dmq_protocol::Produce {
                topic: "big".into(),
                partition: Some(0),
                idempotence: None,
                records: vec![ProduceRecord {
                    value: value.clone(),
                    ..Default::default()
                }],
            });
            let response = connection.request(request).await;
            assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
        }
    }
    let data = broker.data_dir().to_path_buf();
    let broker = broker.restart(|_| {}).await;
    broker_is_healthy(&broker, true).await;
    // Stop; damage a batch in the middle of the sealed segment; append
    // what an older broker journaled for `CREATE_TOPIC ".."`.
    let segment = data.join("topics/big/0/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let meta = data.join("dispatcher/meta.journal");
    let mut journal = std::fs::read(&meta).unwrap();
    let entry = br#"{"Topic":{"name":"..","config":{"partitions":1,"ordered":false}}}"#;
    journal.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    journal.extend_from_slice(&crc32fast::hash(entry).to_le_bytes());
    journal.extend_from_slice(entry);
    std::fs::write(&meta, &journal).unwrap();

    let broker = broker.restart(|_| {}).await;
    // A group reads the whole topic: it meets the damage and skips it.
    let mut connection = Connection::hello(broker.addr).await;
    let mut reader = subscribe("big", "reader", None);
    if let Request::Subscribe(subscribe) = &mut reader {
        subscribe.credit = 100;
    }
    let response = connection.request(reader).await;
    assert!(matches!(response, Response::Subscribed(_)), "{response:?}");
    let mut delivered = 0;
    while tokio::time::timeout(std::time::Duration::from_secs(2), connection.push())
        .await
        .is_ok()
    {
        delivered += 1;
    }
    assert!((20..24).contains(&delivered), "{delivered} delivered");
    drop(connection);
    let health = broker_is_healthy(&broker, false).await;
    assert_eq!(health["quarantined"][0]["topic"], "..", "{health}");
    assert_eq!(health["damaged_partitions"][0]["topic"], "big", "{health}");
    assert_eq!(
        health["damaged_partitions"][0]["read_damage"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{health}"
    );
    let api = Api::new(broker.admin, None);
    let metrics = http(move || api.call("GET", "/metrics", None)).await;
    let text = metrics.1.as_str().unwrap_or_default().to_string();
    assert!(text.contains("dmq_quarantined_objects 1"), "{text}");
    assert!(
        text.contains(r#"dmq_recovery_damaged_regions{topic="big",partition="0"} 1"#),
        "{text}"
    );
    // Deleting the quarantined topic clears it.
    let mut connection = Connection::hello(broker.addr).await;
    let response = connection
        .request(Request::DeleteTopic(dmq_protocol::DeleteTopic {
            name: "..".into(),
        }))
        .await;
    assert!(matches!(response, Response::Ok), "{response:?}");
    drop(connection);

    // A flipped byte inside an earlier metadata entry: refused, untouched.
    let broker_dir = broker.data_dir().to_path_buf();
    let _dir = broker.stop_keeping_data().await;
    let mut journal = std::fs::read(&meta).unwrap();
    journal[12] ^= 0x01;
    std::fs::write(&meta, &journal).unwrap();
    let config = dmq_broker::BrokerConfig {
        data_dir: broker_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        segment_bytes: 1 << 20,
        ..dmq_broker::BrokerConfig::default()
    };
    let Err(error) = dmq_broker::Broker::start(config).await else {
        panic!("a damaged metadata journal must stop the start");
    };
    assert!(format!("{error:#}").contains("dmqd repair"), "{error:#}");
    assert_eq!(std::fs::read(&meta).unwrap(), journal);
    let repaired = std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
        .args(["repair", "--data-dir", broker_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(repaired.status.success());
    let report = String::from_utf8_lossy(&repaired.stdout);
    assert!(report.contains("meta.journal"), "{report}");
    assert!(data.join("dispatcher/meta.journal.damaged").exists());
}

async fn broker_is_healthy(broker: &Broker, healthy: bool) -> serde_json::Value {
    let api = Api::new(broker.admin, None);
    let health = http(move || api.ok("/api/health")).await;
    assert_eq!(health["healthy"], healthy, "{health}");
    health
}

/// Boundary and wrapping values for every request type: each gets an
/// answer (an error is fine), the connection stays usable unless the spec
/// says it closes, and the broker restarts on the same data and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundary_values_of_every_request_never_stop_the_broker() {
    use dmq_protocol::{Backoff, DeliveryTime, StartPosition, Tombstone};
    let mut broker = Broker::start(|_| {}).await;
    let long = "x".repeat(100);
    let with_settings = |settings: GroupSettings| {
        Request::Subscribe(dmq_protocol::Subscribe {
            topic: "b".into(),
            group: "edge".into(),
            member_name: "m".into(),
            credit: u32::MAX,
            settings,
            ..Default::default()
        })
    };
    let timed = |delivery_time: DeliveryTime, ttl_ms: Option<u64>| {
        Request::Produce(dmq_protocol::Produce {
            topic: "b".into(),
            partition: None,
            idempotence: Some(dmq_protocol::ProducerSequence {
                producer_id: u64::MAX,
                sequence: u64::MAX,
            }),
            records: vec![ProduceRecord {
                value: Bytes::from_static(b"v"),
                delivery_time,
                ttl_ms,
                ..Default::default()
            }],
        })
    };
    // Each case: a request that needs (or not) a subscription first.
    type Case = (&'static str, Box<dyn Fn(u64) -> Request + Send>);
    let seek =
        |partition: Option<u32>, target: StartPosition| -> Box<dyn Fn(u64) -> Request + Send> {
            Box::new(move |_| {
                Request::Seek(dmq_protocol::Seek {
                    topic: "b".into(),
                    group: "probe-b".into(),
                    partition,
                    target,
                    dry_run: false,
                })
            })
        };
    let cases: Vec<Case> = vec![
        (
            "delay u64::MAX",
            Box::new(move |_| timed(DeliveryTime::DelayMs(u64::MAX), None)),
        ),
        (
            "at i64::MAX",
            Box::new(move |_| timed(DeliveryTime::AtMs(i64::MAX), None)),
        ),
        (
            "at i64::MIN",
            Box::new(move |_| timed(DeliveryTime::AtMs(i64::MIN), None)),
        ),
        (
            "ttl u64::MAX",
            Box::new(move |_| timed(DeliveryTime::Immediate, Some(u64::MAX))),
        ),
        (
            "ttl 0",
            Box::new(move |_| timed(DeliveryTime::DelayMs(10), Some(0))),
        ),
        (
            "partition u32::MAX",
            Box::new(|_| {
                Request::Produce(dmq_protocol::Produce {
                    topic: "b".into(),
                    partition: Some(u32::MAX),
                    idempotence: None,
                    records: vec![ProduceRecord::default()],
                })
            }),
        ),
        (
            "no records",
            Box::new(|_| {
                Request::Produce(dmq_protocol::Produce {
                    topic: "b".into(),
                    partition: None,
                    idempotence: None,
                    records: vec![],
                })
            }),
        ),
        (
            "settings at their maximum",
            Box::new(move |_| {
                with_settings(GroupSettings {
                    ack_timeout_ms: Some(u64::MAX),
                    max_attempts: Some(u32::MAX),
                    backoff: Some(Backoff::Exponential {
                        initial_ms: u64::MAX,
                        max_ms: u64::MAX,
                    }),
                    max_unacked_per_partition: Some(u32::MAX),
                    rate_limit_per_second: Some(u32::MAX),
                    dead_letter_topic: None,
                })
            }),
        ),
        (
            "settings at zero",
            Box::new(move |_| {
                with_settings(GroupSettings {
                    ack_timeout_ms: Some(0),
                    max_attempts: Some(0),
                    backoff: Some(Backoff::Fixed { delays_ms: vec![] }),
                    max_unacked_per_partition: Some(0),
                    rate_limit_per_second: Some(0),
                    dead_letter_topic: None,
                })
            }),
        ),
        (
            "broadcast member `..`",
            Box::new(|_| {
                Request::Subscribe(dmq_protocol::Subscribe {
                    topic: "b".into(),
                    group: "bc".into(),
                    member_name: "..".into(),
                    mode: dmq_protocol::DeliveryMode::Broadcast,
                    credit: 1,
                    ..Default::default()
                })
            }),
        ),
        (
            "broadcast member too long for its journal",
            Box::new(move |_| {
                Request::Subscribe(dmq_protocol::Subscribe {
                    topic: "b".into(),
                    group: long.clone(),
                    member_name: "m".repeat(100),
                    mode: dmq_protocol::DeliveryMode::Broadcast,
                    credit: 1,
                    settings: GroupSettings {
                        dead_letter_topic: Some("dead".into()),
                        ..GroupSettings::default()
                    },
                    ..Default::default()
                })
            }),
        ),
        (
            "seek offset u64::MAX",
            seek(None, StartPosition::Offset(u64::MAX)),
        ),
        (
            "seek time i64::MIN",
            seek(None, StartPosition::Timestamp(i64::MIN)),
        ),
        (
            "seek time i64::MAX",
            seek(Some(0), StartPosition::Timestamp(i64::MAX)),
        ),
        (
            "seek partition u32::MAX",
            seek(Some(u32::MAX), StartPosition::Earliest),
        ),
        (
            "credit u32::MAX",
            Box::new(|id| {
                Request::Credit(dmq_protocol::Credit {
                    subscription_id: id,
                    credit: u32::MAX,
                })
            }),
        ),
        (
            "fetch u32::MAX",
            Box::new(|id| {
                Request::Fetch(dmq_protocol::Fetch {
                    subscription_id: id,
                    max_messages: u32::MAX,
                    max_wait_ms: 10,
                })
            }),
        ),
        (
            "ack far positions",
            Box::new(|id| {
                Request::Ack(dmq_protocol::Ack {
                    subscription_id: id,
                    messages: vec![
                        dmq_protocol::MessagePosition {
                            partition: u32::MAX,
                            offset: u64::MAX,
                        },
                        dmq_protocol::MessagePosition {
                            partition: 0,
                            offset: u64::MAX,
                        },
                    ],
                })
            }),
        ),
        (
            "nack u64::MAX delay",
            Box::new(|id| {
                Request::Nack(dmq_protocol::Nack {
                    subscription_id: id,
                    messages: vec![dmq_protocol::MessagePosition {
                        partition: 0,
                        offset: 0,
                    }],
                    delay_ms: Some(u64::MAX),
                })
            }),
        ),
        (
            "delete a reversed range",
            Box::new(|_| {
                Request::DeleteMessages(dmq_protocol::DeleteMessages {
                    topic: "b".into(),
                    tombstone: Tombstone::OffsetRange {
                        partition: 1,
                        start: u64::MAX,
                        end: 0,
                    },
                })
            }),
        ),
        (
            "delete partition u32::MAX",
            Box::new(|_| {
                Request::DeleteMessages(dmq_protocol::DeleteMessages {
                    topic: "b".into(),
                    tombstone: Tombstone::OffsetRange {
                        partition: u32::MAX,
                        start: 0,
                        end: u64::MAX,
                    },
                })
            }),
        ),
        (
            "delete all time",
            Box::new(|_| {
                Request::DeleteMessages(dmq_protocol::DeleteMessages {
                    topic: "b".into(),
                    tombstone: Tombstone::TimeRange {
                        start_ms: i64::MIN,
                        end_ms: i64::MAX,
                    },
                })
            }),
        ),
        (
            "cancel an unknown delay",
            Box::new(|_| {
                Request::CancelDelay(dmq_protocol::CancelDelay {
                    message_id: dmq_protocol::MessageId([0xff; 16]),
                })
            }),
        ),
        (
            "describe `..`",
            Box::new(|_| Request::DescribeTopic(dmq_protocol::DescribeTopic { name: "..".into() })),
        ),
        (
            "list groups of `__dmq_delay`",
            Box::new(|_| {
                Request::ListGroups(dmq_protocol::ListGroups {
                    topic: "__dmq_delay".into(),
                })
            }),
        ),
        (
            "describe group `..`",
            Box::new(|_| {
                Request::DescribeGroup(dmq_protocol::DescribeGroup {
                    topic: "b".into(),
                    group: "..".into(),
                })
            }),
        ),
        (
            "delete group `..`",
            Box::new(|_| {
                Request::DeleteGroup(dmq_protocol::DeleteGroup {
                    topic: "..".into(),
                    group: "..".into(),
                })
            }),
        ),
        (
            "delete topic `__dmq_delay`",
            Box::new(|_| {
                Request::DeleteTopic(dmq_protocol::DeleteTopic {
                    name: "__dmq_delay".into(),
                })
            }),
        ),
        (
            "unsubscribe u64::MAX",
            Box::new(|_| {
                Request::Unsubscribe(dmq_protocol::Unsubscribe {
                    subscription_id: u64::MAX,
                })
            }),
        ),
    ];
    {
        let mut connection = Connection::hello(broker.addr).await;
        assert_eq!(connection.request(create("b", 2)).await, Response::Ok);
        for _ in 0..3 {
            let response = connection.request(produce("b", vec![])).await;
            assert!(matches!(response, Response::ProduceOk(_)), "{response:?}");
        }
    }
    for (index, (what, request)) in cases.iter().enumerate() {
        let mut connection = Connection::hello(broker.addr).await;
        let group = format!("probe-{}", index % 3);
        let Response::Subscribed(subscribed) =
            connection.request(subscribe("b", &group, None)).await
        else {
            panic!("{what}: subscribe")
        };
        let response = connection
            .request(request(subscribed.subscription_id))
            .await;
        if let Response::Error(error) = &response {
            assert!(error.code != ErrorCode::InternalError, "{what}: {error:?}");
        }
        // Still usable: a PING is answered (pushes may come first).
        connection.send(Request::Ping).await;
        let mut ponged = false;
        while let Some(frame) = connection.frame().await {
            if matches!(frame.body, dmq_protocol::Body::Response(Response::Pong)) {
                ponged = true;
                break;
            }
        }
        assert!(ponged, "{what}: the connection closed after {response:?}");
        drop(connection);
        broker = broker.restart(|_| {}).await;
        serves(&broker, &format!("after-boundary-{index}")).await;
    }
    broker.stop().await;
}

/// Boundary and invalid values for every admin endpoint (development
/// mode): each gets an answer that is not a 500, and the broker restarts
/// on the same data and serves, over the protocol and the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundary_values_of_every_admin_endpoint_never_stop_the_broker() {
    let mut broker = Broker::start(|_| {}).await;
    let topic = "dev.web.orders";
    let api = Api::new(broker.admin, None);
    http(move || {
        api.ok_post(
            "/api/topics",
            json!({"environment": "dev", "department": "web", "name": "orders", "owner": "o"}),
        );
        api.ok_post(
            &format!("/api/topics/{topic}/test-message"),
            json!({"value": "v", "key": "k"}),
        );
    })
    .await;
    let part = |n: usize| "p".repeat(n);
    let topic_body = |extra: serde_json::Value| {
        let mut body =
            json!({"environment": "dev", "department": "web", "name": "edge", "owner": "o"});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body.to_string()
    };
    let max = u64::MAX;
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("POST", "/api/topics".into(), Some(topic_body(json!({"partitions": 0})))),
        ("POST", "/api/topics".into(), Some(topic_body(json!({"partitions": 257})))),
        ("POST", "/api/topics".into(), Some(topic_body(json!({"partitions": u32::MAX})))),
        ("POST", "/api/topics".into(), Some(topic_body(json!({"partitions": -1})))),
        ("POST", "/api/topics".into(), Some(topic_body(json!({"name": ".."})))),
        ("POST", "/api/topics".into(), Some(topic_body(json!({"environment": "__x"})))),
        (
            "POST",
            "/api/topics".into(),
            Some(topic_body(json!({"environment": part(40), "department": part(40), "name": part(40)}))),
        ),
        (
            "POST",
            "/api/topics".into(),
            Some(topic_body(json!({"retention_hours": max, "default_ttl_ms": max,
                                   "max_attempts": u32::MAX, "ack_timeout_ms": max}))),
        ),
        (
            "POST",
            "/api/topics".into(),
            Some(topic_body(json!({"name": "zeroes", "max_attempts": 0, "ack_timeout_ms": 0,
                                   "retention_hours": 0, "default_ttl_ms": 0}))),
        ),
        (
            "PATCH",
            format!("/api/topics/{topic}"),
            Some(json!({"retention_hours": max, "max_attempts": 0, "ack_timeout_ms": max}).to_string()),
        ),
        ("PATCH", "/api/topics/..".into(), Some("{}".into())),
        ("DELETE", "/api/topics/__dmq_delay".into(), None),
        ("POST", "/api/topics/__dmq_delay/approve".into(), None),
        ("GET", format!("/api/topics/{topic}/messages?limit={max}"), None),
        ("GET", format!("/api/topics/{topic}/messages?partition=0&from_offset={max}&to_offset=0"), None),
        ("GET", format!("/api/topics/{topic}/messages?from_ms={}&to_ms={}", i64::MIN, i64::MAX), None),
        ("GET", format!("/api/topics/{topic}/messages?key=k&cursor=%FF%FF&format=binary"), None),
        (
            "POST",
            format!("/api/topics/{topic}/messages/delete"),
            Some(json!({"partition": u32::MAX, "from_offset": 0, "to_offset": max, "dry_run": false}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/messages/delete"),
            Some(json!({"partition": 0, "from_offset": max, "to_offset": 0, "dry_run": false}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/messages/delete"),
            Some(json!({"from_ms": i64::MIN, "to_ms": i64::MAX, "dry_run": true}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/messages/delete"),
            Some(json!({"id": "zz", "dry_run": false}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/test-message"),
            Some(json!({"value": "v", "delay_ms": max}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/test-message"),
            Some(json!({"value": "v", "headers": {"dmq.delay.topic": "victim"}}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/groups/g/seek"),
            Some(json!({"to": "offset", "value": i64::MAX, "partition": u32::MAX, "dry_run": false}).to_string()),
        ),
        (
            "POST",
            format!("/api/topics/{topic}/groups/g/seek"),
            Some(json!({"to": "time", "value": i64::MIN, "dry_run": false}).to_string()),
        ),
        (
            "POST",
            "/api/dlq/__dmq_delay/resend".into(),
            Some(json!({"message_ids": ["zz", ""]}).to_string()),
        ),
        ("GET", "/api/messages/ffffffffffffffffffffffffffffffff".into(), None),
        ("GET", "/api/trace/zz".into(), None),
        ("GET", format!("/api/stats?minutes={max}"), None),
        ("GET", format!("/api/topics/{topic}/groups"), None),
    ];
    for (index, (method, path, body)) in cases.into_iter().enumerate() {
        let api = Api::new(broker.admin, None);
        let (method_shown, path_shown) = (method, path.clone());
        let forged = body.as_deref().is_some_and(|b| b.contains("dmq.delay."));
        let (status, answer) = http(move || api.call(method, &path, body.as_deref())).await;
        if forged {
            assert_eq!(status, 400, "reserved headers: {answer}");
        }
        assert!(
            status != 500 && status < 600,
            "{method_shown} {path_shown}: {status} {answer}"
        );
        broker = broker.restart(|_| {}).await;
        let api = Api::new(broker.admin, None);
        let info = http(move || api.call("GET", "/api/info", None)).await;
        assert_eq!(info.0, 200, "after {method_shown} {path_shown}");
        serves(&broker, &format!("after-admin-{index}")).await;
    }
    broker.stop().await;
}
