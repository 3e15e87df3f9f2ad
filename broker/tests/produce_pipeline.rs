//! The produce pipeline on a real broker: one routing rule and one
//! round-robin counter per topic whatever the path, and idempotent retries
//! found whatever partition the retry is routed to.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use dmq_protocol::{Produce, ProduceOk, ProduceRecord, ProducerSequence, Request, Response};
use serde_json::json;

mod common;
use common::{http, Api, Broker, Connection};

async fn create(connection: &mut Connection, name: &str, partitions: u32) {
    let created = connection
        .request(Request::CreateTopic(dmq_protocol::CreateTopic {
            name: name.into(),
            partitions,
            ordered: false,
        }))
        .await;
    assert_eq!(created, Response::Ok);
}

fn unkeyed(values: &[&str]) -> Vec<ProduceRecord> {
    values
        .iter()
        .map(|v| ProduceRecord {
            value: Bytes::from(v.to_string()),
            ..Default::default()
        })
        .collect()
}

async fn produce(connection: &mut Connection, produce: Produce) -> ProduceOk {
    match connection.request(Request::Produce(produce)).await {
        Response::ProduceOk(ok) => ok,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_unkeyed_batch_gets_its_first_answer_on_any_partition() {
    let broker = Broker::start(|_| {}).await;
    let mut connection = Connection::hello(broker.addr).await;
    create(&mut connection, "orders", 2).await;
    let batch = |sequence| Produce {
        topic: "orders".into(),
        partition: None,
        idempotence: Some(ProducerSequence {
            producer_id: 7,
            sequence,
        }),
        records: unkeyed(&["a", "b"]),
    };
    let first = produce(&mut connection, batch(0)).await;
    let second = produce(&mut connection, batch(1)).await;
    assert_ne!(
        first.records[0].partition, second.records[0].partition,
        "round robin"
    );
    // The answer to the second batch was lost; the producer retries it.
    // The round-robin counter moved on, so the retry routes elsewhere:
    // it must still be recognised (it used to be stored a second time).
    let retry = produce(&mut connection, batch(1)).await;
    assert_eq!(retry, second);
    let described = connection
        .request(Request::DescribeTopic(dmq_protocol::DescribeTopic {
            name: "orders".into(),
        }))
        .await;
    let Response::TopicDescription(described) = described else {
        panic!("{described:?}")
    };
    let ends: Vec<u64> = described.partitions.iter().map(|p| p.end_offset).collect();
    assert_eq!(ends.iter().sum::<u64>(), 4, "stored once each: {ends:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_produce_path_shares_the_topics_round_robin() {
    let broker = Broker::start(|_| {}).await;
    let api = Api::new(broker.admin, None);
    let mut connection = Connection::hello(broker.addr).await;
    create(&mut connection, "orders", 3).await;
    let mut partitions = Vec::new();
    for round in 0..2 {
        let ok = produce(
            &mut connection,
            Produce {
                topic: "orders".into(),
                records: unkeyed(&["x"]),
                ..Default::default()
            },
        )
        .await;
        partitions.push(ok.records[0].partition);
        let sent = http({
            let api = api.clone();
            move || api.ok_post("/api/topics/orders/test-message", json!({"value": "t"}))
        })
        .await;
        partitions.push(sent["partition"].as_u64().unwrap() as u32);
        // A delayed unkeyed record takes the same counter's next step.
        let delayed = produce(
            &mut connection,
            Produce {
                topic: "orders".into(),
                records: vec![ProduceRecord {
                    value: Bytes::from(format!("later-{round}")),
                    delivery_time: dmq_protocol::DeliveryTime::DelayMs(60_000),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await;
        partitions.push(delayed.records[0].partition);
    }
    // One counter per topic: 0, 1, 2, 0, 1, 2. (The admin path used the
    // dispatcher's own counter and the session a global one.)
    assert_eq!(partitions, vec![0, 1, 2, 0, 1, 2]);
    broker.stop().await;
}

async fn fetch(
    connection: &mut Connection,
    id: u64,
    max_wait_ms: u32,
) -> Vec<dmq_protocol::Delivery> {
    match connection
        .request(Request::Fetch(dmq_protocol::Fetch {
            subscription_id: id,
            max_messages: 10,
            max_wait_ms,
        }))
        .await
    {
        Response::Deliveries(answer) => answer.deliveries,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_fetch_is_woken_by_a_produce_and_a_timed_out_one_loses_nothing() {
    let broker = Broker::start(|_| {}).await;
    let mut producer = Connection::hello(broker.addr).await;
    create(&mut producer, "orders", 1).await;
    let mut consumer = Connection::hello(broker.addr).await;
    let subscribed = consumer
        .request(Request::Subscribe(dmq_protocol::Subscribe {
            topic: "orders".into(),
            group: "pull".into(),
            member_name: "m".into(),
            credit: 0,
            ..Default::default()
        }))
        .await;
    let Response::Subscribed(subscribed) = subscribed else {
        panic!("{subscribed:?}")
    };
    let id = subscribed.subscription_id;
    // Nothing yet: a short FETCH times out empty.
    let started = std::time::Instant::now();
    assert!(fetch(&mut consumer, id, 200).await.is_empty());
    assert!(started.elapsed() >= std::time::Duration::from_millis(190));
    // A produce after the timed-out FETCH is not lost to it.
    produce(
        &mut producer,
        Produce {
            topic: "orders".into(),
            records: unkeyed(&["first"]),
            ..Default::default()
        },
    )
    .await;
    let got = fetch(&mut consumer, id, 5_000).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value.as_ref(), b"first");
    assert_eq!(got[0].attempt, 1);
    // A FETCH parked for 10 s answers as soon as a record arrives.
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let got = fetch(&mut consumer, id, 10_000).await;
        (got, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    produce(
        &mut producer,
        Produce {
            topic: "orders".into(),
            records: unkeyed(&["second"]),
            ..Default::default()
        },
    )
    .await;
    let (got, waited) = waiting.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value.as_ref(), b"second");
    assert!(
        waited < std::time::Duration::from_secs(5),
        "woken {waited:?} after the FETCH, not at its deadline"
    );
    broker.stop().await;
}
