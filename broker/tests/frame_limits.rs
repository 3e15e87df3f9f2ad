//! Records and frames at the size limits (PROTOCOL.md §8, issue 9), on a
//! real broker with `max_frame_bytes` = 1 MiB: a record exactly at the
//! maximum record size reaches its consumers by push, by FETCH and, once
//! dead-lettered, from the dead-letter topic, every frame within the limit
//! (read with the broker's limit: a larger frame fails the test), and so
//! does a delayed one, without the delay store's headers; one byte more is
//! refused and nothing is stored; FETCH answers over records of a
//! third of the frame stay within it and lose no record and no attempt.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use dmq_protocol::limits::{DEAD_LETTER_HEADERS, NAME_BYTES_MAX};
use dmq_protocol::{
    max_record_bytes, produce_record_size, Body, Delivery, ErrorCode, GroupSettings, Header,
    ProduceRecord, Push, Request, Response,
};

mod common;
use common::{http, Api, Broker, Connection};

const MAX_FRAME: u32 = 1 << 20;

fn configure(config: &mut dmq_broker::BrokerConfig) {
    config.max_frame_bytes = MAX_FRAME;
    // A batch must fit a segment: room for a record of almost 1 MiB.
    config.segment_bytes = 4 << 20;
}

/// A record of exactly `bytes` as PROTOCOL.md §8 measures it.
fn record_of(bytes: usize) -> ProduceRecord {
    let mut record = ProduceRecord {
        key: Some(Bytes::from_static(b"key")),
        headers: vec![Header::new("app", "1")],
        ..ProduceRecord::default()
    };
    let fixed = produce_record_size(&record) as usize;
    record.value = Bytes::from(vec![b'v'; bytes - fixed]);
    assert_eq!(produce_record_size(&record), bytes as u64);
    record
}

fn produce(topic: &str, records: Vec<ProduceRecord>) -> Request {
    Request::Produce(dmq_protocol::Produce {
        topic: topic.into(),
        partition: Some(0),
        idempotence: None,
        records,
    })
}

fn subscribe(topic: &str, group: &str, credit: u32, settings: GroupSettings) -> Request {
    Request::Subscribe(dmq_protocol::Subscribe {
        topic: topic.into(),
        group: group.into(),
        member_name: "m".into(),
        credit,
        settings,
        ..Default::default()
    })
}

async fn create(admin: &mut Connection, name: &str) {
    let created = admin
        .request(Request::CreateTopic(dmq_protocol::CreateTopic {
            name: name.into(),
            partitions: 1,
            ordered: false,
        }))
        .await;
    assert_eq!(created, Response::Ok);
}

async fn end_offset(admin: &mut Connection, topic: &str) -> u64 {
    let described = admin
        .request(Request::DescribeTopic(dmq_protocol::DescribeTopic {
            name: topic.into(),
        }))
        .await;
    let Response::TopicDescription(described) = described else {
        panic!("{described:?}")
    };
    described.partitions[0].end_offset
}

/// The answer to `request`, every frame read within the limit.
async fn request(connection: &mut Connection, request: Request) -> Response {
    let id = connection.send(request).await;
    loop {
        let (frame, _) = connection.sized_frame(MAX_FRAME).await.expect("an answer");
        if let Body::Response(response) = frame.body {
            assert_eq!(frame.correlation_id, id);
            return response;
        }
    }
}

/// Settings naming a dead-letter topic: with 100-byte topic names the
/// derived `<topic>.<group>.dlq` would be too long.
fn elsewhere() -> GroupSettings {
    GroupSettings {
        dead_letter_topic: Some("elsewhere".into()),
        ..GroupSettings::default()
    }
}

fn subscription_id(response: Response) -> u64 {
    match response {
        Response::Subscribed(subscribed) => subscribed.subscription_id,
        other => panic!("{other:?}"),
    }
}

/// The next DELIVER push and its frame size.
async fn push(connection: &mut Connection) -> (Delivery, usize) {
    loop {
        let (frame, bytes) = connection.sized_frame(MAX_FRAME).await.expect("a push");
        if let Body::Push(Push::Deliver(delivery)) = frame.body {
            return (delivery, bytes);
        }
    }
}

async fn ack(connection: &mut Connection, subscription_id: u64, delivery: &Delivery) {
    let acked = request(
        connection,
        Request::Ack(dmq_protocol::Ack {
            subscription_id,
            messages: vec![dmq_protocol::MessagePosition {
                partition: delivery.partition,
                offset: delivery.offset,
            }],
        }),
    )
    .await;
    assert_eq!(acked, Response::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_at_the_maximum_is_delivered_by_push_fetch_and_dead_letter() {
    let broker = Broker::start(configure).await;
    let mut admin = Connection::hello(broker.addr).await;
    // The longest names: the delivery's topic and the dead-letter headers
    // at their largest.
    let topic = "t".repeat(NAME_BYTES_MAX);
    let dead_letters = "d".repeat(NAME_BYTES_MAX);
    let group = "g".repeat(NAME_BYTES_MAX);
    create(&mut admin, &topic).await;
    let max = max_record_bytes(MAX_FRAME) as usize;
    assert_eq!(max, MAX_FRAME as usize - 1024);

    // One byte over: refused with its own code, naming size and limit, and
    // nothing of the batch is stored.
    let refused = admin
        .request(produce(&topic, vec![record_of(100), record_of(max + 1)]))
        .await;
    let Response::Error(error) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(error.code, ErrorCode::RecordTooLarge);
    assert!(error.message.contains(&(max + 1).to_string()), "{error:?}");
    assert!(error.message.contains(&max.to_string()), "{error:?}");
    assert_eq!(end_offset(&mut admin, &topic).await, 0);
    assert_eq!(admin.request(Request::Ping).await, Response::Pong);

    // Exactly at the maximum: stored.
    let record = record_of(max);
    let produced = admin.request(produce(&topic, vec![record.clone()])).await;
    assert!(matches!(produced, Response::ProduceOk(_)), "{produced:?}");

    // By push.
    let mut pushed = Connection::hello(broker.addr).await;
    let id = subscription_id(request(&mut pushed, subscribe(&topic, "push", 1, elsewhere())).await);
    let (delivery, bytes) = push(&mut pushed).await;
    assert!(bytes <= MAX_FRAME as usize);
    assert_eq!(
        (
            delivery.key.clone(),
            delivery.headers.clone(),
            delivery.value.clone()
        ),
        (
            record.key.clone(),
            record.headers.clone(),
            record.value.clone()
        )
    );
    ack(&mut pushed, id, &delivery).await;

    // By FETCH, asking for more than one.
    let mut fetched = Connection::hello(broker.addr).await;
    let id =
        subscription_id(request(&mut fetched, subscribe(&topic, "pull", 0, elsewhere())).await);
    let answer = request(
        &mut fetched,
        Request::Fetch(dmq_protocol::Fetch {
            subscription_id: id,
            max_messages: 4,
            max_wait_ms: 1_000,
        }),
    )
    .await;
    let Response::Deliveries(answer) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(answer.deliveries.len(), 1);
    assert_eq!(answer.deliveries[0].value, record.value);
    ack(&mut fetched, id, &answer.deliveries[0]).await;

    // Dead-lettered after its one attempt: the copy, with its dmq.dlq.*
    // headers, still fits a DELIVER.
    let mut failing = Connection::hello(broker.addr).await;
    let settings = GroupSettings {
        ack_timeout_ms: Some(200),
        max_attempts: Some(1),
        dead_letter_topic: Some(dead_letters.clone()),
        ..GroupSettings::default()
    };
    subscription_id(request(&mut failing, subscribe(&topic, &group, 1, settings)).await);
    let (first, _) = push(&mut failing).await;
    assert_eq!(first.attempt, 1);
    // Not acked: after 200 ms it moves to the dead-letter topic.
    let mut reader = Connection::hello(broker.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let answer = request(
            &mut reader,
            subscribe(&dead_letters, &group, 1, elsewhere()),
        )
        .await;
        match answer {
            Response::Subscribed(subscribed) => break subscribed.subscription_id,
            Response::Error(error) if error.code == ErrorCode::UnknownTopic => {
                assert!(tokio::time::Instant::now() < deadline, "no dead letter");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    };
    let (copy, bytes) = push(&mut reader).await;
    assert!(bytes <= MAX_FRAME as usize, "{bytes}");
    assert_eq!(copy.topic, dead_letters);
    assert_eq!(copy.message_id, first.message_id);
    assert_eq!(copy.value, record.value);
    let added: Vec<&Header> = copy
        .headers
        .iter()
        .filter(|header| header.name.starts_with(b"dmq.dlq."))
        .collect();
    assert_eq!(added.len(), DEAD_LETTER_HEADERS.len(), "{added:?}");
    for header in added {
        // Every header the broker adds is one the headroom counts, within
        // the length it counts.
        let (_, value_max) = DEAD_LETTER_HEADERS
            .iter()
            .find(|(name, _)| name.as_bytes() == header.name.as_ref())
            .unwrap_or_else(|| panic!("{header:?} is not in the headroom"));
        assert!(header.value.len() <= *value_max, "{header:?}");
    }
    ack(&mut reader, id, &copy).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_record_at_the_maximum_arrives_without_its_delay_headers() {
    let broker = Broker::start(configure).await;
    let mut admin = Connection::hello(broker.addr).await;
    let topic = "t".repeat(NAME_BYTES_MAX);
    create(&mut admin, &topic).await;
    // Delayed and with a TTL: the delivery's two optional times present.
    let mut record = record_of(max_record_bytes(MAX_FRAME) as usize);
    record.delivery_time = dmq_protocol::DeliveryTime::DelayMs(200);
    record.ttl_ms = Some(60_000);
    let produced = admin.request(produce(&topic, vec![record.clone()])).await;
    assert!(matches!(produced, Response::ProduceOk(_)), "{produced:?}");
    let mut consumer = Connection::hello(broker.addr).await;
    subscription_id(request(&mut consumer, subscribe(&topic, "g", 1, elsewhere())).await);
    let (delivery, bytes) = push(&mut consumer).await;
    assert!(bytes <= MAX_FRAME as usize, "{bytes}");
    assert!(delivery.deliver_at_ms.is_some() && delivery.expire_at_ms.is_some());
    // The delay store's own headers stayed in the delay store.
    assert_eq!(delivery.headers, record.headers);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_answers_stay_within_the_frame_and_lose_nothing() {
    let broker = Broker::start(configure).await;
    let mut admin = Connection::hello(broker.addr).await;
    create(&mut admin, "f").await;
    // About a third of the frame each, with small ones in between: four
    // never fit one answer, and one answer overflows after a small record.
    let third = MAX_FRAME as usize / 3 + 10_000;
    let sizes = [100_000, third, third, third, 100_000, third, third];
    for size in sizes {
        let produced = admin.request(produce("f", vec![record_of(size)])).await;
        assert!(matches!(produced, Response::ProduceOk(_)), "{produced:?}");
    }
    let mut consumer = Connection::hello(broker.addr).await;
    // One attempt only: a record handed back as a spent attempt would be
    // dead-lettered instead of fetched.
    let settings = GroupSettings {
        max_attempts: Some(1),
        ..GroupSettings::default()
    };
    let id = subscription_id(request(&mut consumer, subscribe("f", "g", 0, settings)).await);
    let mut seen = Vec::new();
    let mut answers = 0;
    while seen.len() < sizes.len() {
        answers += 1;
        assert!(answers <= 10, "only {seen:?} after {answers} answers");
        let fetch = Request::Fetch(dmq_protocol::Fetch {
            subscription_id: id,
            max_messages: 4,
            max_wait_ms: 1_000,
        });
        let sent = consumer.send(fetch).await;
        let (frame, bytes) = consumer.sized_frame(MAX_FRAME).await.expect("DELIVERIES");
        assert!(bytes <= MAX_FRAME as usize);
        assert_eq!(frame.correlation_id, sent);
        let Body::Response(Response::Deliveries(answer)) = frame.body else {
            panic!("{frame:?}")
        };
        assert!(!answer.deliveries.is_empty(), "records are waiting");
        assert!(answer.deliveries.len() <= 4);
        for delivery in &answer.deliveries {
            assert_eq!(delivery.attempt, 1, "{}", delivery.offset);
            seen.push(delivery.offset);
            ack(&mut consumer, id, delivery).await;
        }
    }
    assert_eq!(seen, (0..sizes.len() as u64).collect::<Vec<_>>());
    assert!(
        answers >= 3,
        "{answers} answers for {} records",
        sizes.len()
    );
    let topics = admin.request(Request::ListTopics).await;
    let Response::Topics(topics) = topics else {
        panic!("{topics:?}")
    };
    assert!(
        topics.topics.iter().all(|topic| topic.name == "f"),
        "nothing was dead-lettered: {topics:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_test_message_has_the_same_maximum() {
    let broker = Broker::start(configure).await;
    let mut admin = Connection::hello(broker.addr).await;
    create(&mut admin, "a").await;
    let api = Api::new(broker.admin, None);
    // No key, no headers: 9 bytes of lengths and tags besides the value.
    let max = max_record_bytes(MAX_FRAME) as usize;
    let (status, body) = http({
        let api = api.clone();
        move || {
            api.post(
                "/api/topics/a/test-message",
                serde_json::json!({ "value": "x".repeat(max - 9 + 1) }),
            )
        }
    })
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.to_string().contains(&max.to_string()), "{body}");
    assert_eq!(end_offset(&mut admin, "a").await, 0, "nothing stored");
    let (status, body) = http(move || {
        api.post(
            "/api/topics/a/test-message",
            serde_json::json!({ "value": "x".repeat(max - 9) }),
        )
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(end_offset(&mut admin, "a").await, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_limit_below_the_minimum_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dmq_broker::BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        max_frame_bytes: 1024,
        ..dmq_broker::BrokerConfig::default()
    };
    assert!(dmq_broker::Broker::start(config).await.is_err());
}
