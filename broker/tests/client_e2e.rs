//! End to end: a real broker on 127.0.0.1 (random port, temp data dir) and
//! the real Rust client. One test per delivery rule the broker promises.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use dmq_client::{
    Client, GroupSettings, Message, ReceivedMessage, StartPosition, SubscribeOptions, Subscription,
};

mod common;
use common::{client, next, options, Broker};

fn text(message: &ReceivedMessage) -> String {
    String::from_utf8(message.value.to_vec()).unwrap()
}

async fn send_all(client: &Client, topic: &str, values: &[&str]) {
    let producer = client.producer();
    let sends: Vec<_> = values
        .iter()
        .map(|v| producer.send(Message::new(topic, v.to_string()).partition(0)))
        .collect();
    for send in sends {
        send.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_ack_and_every_group_gets_every_message() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("orders", 1, false).await.unwrap();
    send_all(&client, "orders", &["a", "b", "c"]).await;
    for group in ["billing", "shipping", "audit"] {
        let mut subscription = client
            .consumer()
            .subscribe("orders", group, options("m"))
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let message = next(&mut subscription, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(message.attempt, 1);
            seen.push(text(&message));
            message.ack().await.unwrap();
        }
        assert_eq!(seen, vec!["a", "b", "c"], "group {group}");
        assert!(next(&mut subscription, Duration::from_millis(200))
            .await
            .is_none());
    }
    let group = client.describe_group("orders", "billing").await.unwrap();
    assert_eq!(
        (group.partitions[0].ack_floor, group.partitions[0].lag),
        (3, 0)
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("t", 1, false).await.unwrap();
    let producer = client.producer();
    producer
        .send(
            Message::new("t", "stale")
                .partition(0)
                .ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    producer
        .send(Message::new("t", "fresh").partition(0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut subscription = client
        .consumer()
        .subscribe("t", "g", options("m"))
        .await
        .unwrap();
    let message = next(&mut subscription, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(text(&message), "fresh");
    message.ack().await.unwrap();
    assert!(next(&mut subscription, Duration::from_millis(300))
        .await
        .is_none());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_moves_a_message_to_the_dead_letter_topic() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("t", 1, false).await.unwrap();
    send_all(&client, "t", &["poison"]).await;
    let subscribe = SubscribeOptions {
        settings: GroupSettings {
            max_attempts: Some(3),
            backoff: Some(dmq_client::Backoff::Fixed {
                delays_ms: vec![10],
            }),
            ..GroupSettings::default()
        },
        ..options("m")
    };
    let mut subscription = client
        .consumer()
        .subscribe("t", "g", subscribe)
        .await
        .unwrap();
    let mut id = None;
    for attempt in 1..=3 {
        let message = next(&mut subscription, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(message.attempt, attempt);
        id = Some(message.id);
        message.nack(None).await.unwrap();
    }
    assert!(next(&mut subscription, Duration::from_millis(300))
        .await
        .is_none());
    let mut dead = client
        .consumer()
        .subscribe("t.g.dlq", "inspect", options("m"))
        .await
        .unwrap();
    let message = next(&mut dead, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        Some(message.id),
        id,
        "same message id in the dead-letter topic"
    );
    assert_eq!(
        message.header(b"dmq.dlq.topic").map(|v| v.to_vec()),
        Some(b"t".to_vec())
    );
    assert_eq!(
        message.header(b"dmq.dlq.attempts").map(|v| v.to_vec()),
        Some(b"3".to_vec())
    );
    // The dispatcher created the dead-letter topic by itself; the broker
    // still knows it for DESCRIBE_TOPIC (it used to say "unknown topic").
    let description = client.describe_topic("t.g.dlq").await.unwrap();
    let stored: u64 = description
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    assert_eq!(stored, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_topic_keeps_per_key_order_with_acks() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("o", 2, true).await.unwrap();
    let producer = client.producer();
    let mut sends = Vec::new();
    for i in 0..30 {
        let key = format!("k{}", i % 3);
        sends.push(producer.send(Message::new("o", format!("{key}:{i}")).key(key)));
    }
    for send in sends {
        send.await.unwrap();
    }
    let mut a = client
        .consumer()
        .subscribe("o", "g", options("a"))
        .await
        .unwrap();
    let mut b = client
        .consumer()
        .subscribe("o", "g", options("b"))
        .await
        .unwrap();
    let mut seen: Vec<(String, u32)> = Vec::new();
    while seen.len() < 30 {
        let (message, _) = tokio::select! {
            Some(m) = next_some(&mut a) => (m, 'a'),
            Some(m) = next_some(&mut b) => (m, 'b'),
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("stalled after {}", seen.len()),
        };
        let value = text(&message);
        let (key, i) = value.split_once(':').unwrap();
        seen.push((key.to_string(), i.parse().unwrap()));
        message.ack().await.unwrap();
    }
    for key in ["k0", "k1", "k2"] {
        let order: Vec<u32> = seen
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, i)| *i)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "key {key} out of order");
    }
    broker.stop().await;
}

async fn next_some(subscription: &mut Subscription) -> Option<ReceivedMessage> {
    subscription.recv().await.map(|m| m.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_to_a_timestamp_replays() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("t", 1, false).await.unwrap();
    send_all(&client, "t", &["old"]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_all(&client, "t", &["new1", "new2"]).await;
    {
        let mut subscription = client
            .consumer()
            .subscribe("t", "g", options("m"))
            .await
            .unwrap();
        for _ in 0..3 {
            next(&mut subscription, Duration::from_secs(10))
                .await
                .unwrap()
                .ack()
                .await
                .unwrap();
        }
        subscription.unsubscribe().await.unwrap();
    }
    let millis = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let dry = client
        .seek("t", "g", None, StartPosition::Timestamp(millis), true)
        .await
        .unwrap();
    assert_eq!(
        (dry.partitions[0].new_floor, dry.partitions[0].redelivered),
        (1, 2)
    );
    client
        .seek("t", "g", None, StartPosition::Timestamp(millis), false)
        .await
        .unwrap();
    let mut subscription = client
        .consumer()
        .subscribe("t", "g", options("m"))
        .await
        .unwrap();
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let message = next(&mut subscription, Duration::from_secs(10))
            .await
            .unwrap();
        replayed.push(text(&message));
        message.ack().await.unwrap();
    }
    assert_eq!(replayed, vec!["new1", "new2"]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_group_and_a_topic() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("gone", 2, false).await.unwrap();
    send_all(&client, "gone", &["a", "b"]).await;
    {
        let mut subscription = client
            .consumer()
            .subscribe("gone", "g", options("m"))
            .await
            .unwrap();
        next(&mut subscription, Duration::from_secs(10))
            .await
            .unwrap();
    }
    client.delete_group("gone", "g").await.unwrap();
    assert!(client.list_groups("gone").await.unwrap().is_empty());
    client.delete_topic("gone").await.unwrap();
    assert!(client
        .list_topics()
        .await
        .unwrap()
        .iter()
        .all(|t| t.name != "gone"));
    let error = client
        .producer()
        .send(Message::new("gone", "x"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(dmq_client::ErrorCode::UnknownTopic));
    // Re-created, it starts empty.
    client.create_topic("gone", 1, false).await.unwrap();
    let described = client.describe_topic("gone").await.unwrap();
    assert_eq!(described.partitions[0].end_offset, 0);
    broker.stop().await;
}

/// `dmq_connections_accepted_total` from the broker's /metrics.
fn accepted(api: &common::Api) -> u64 {
    let (status, body) = api.get("/metrics");
    assert_eq!(status, 200);
    body.as_str()
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("dmq_connections_accepted_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .expect("dmq_connections_accepted_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_only_receives_keeps_its_connection() {
    let broker = Broker::start(|config| config.idle_timeout_ms = 300).await;
    let api = common::Api::new(broker.admin, None);
    let client_options = dmq_client::ClientOptions {
        keepalive: Some(Duration::from_millis(50)),
        ..dmq_client::ClientOptions::new("idle-consumer")
    };
    let client = Client::connect(broker.addr.to_string(), client_options)
        .await
        .unwrap();
    client.create_topic("quiet", 1, false).await.unwrap();
    let mut subscription = client
        .consumer()
        .subscribe("quiet", "g", options("m"))
        .await
        .unwrap();
    let before = common::http({
        let api = api.clone();
        move || accepted(&api)
    })
    .await;
    // Six idle timeouts with nothing to send but keepalives: the broker
    // used to close the connection (the client then reconnected and
    // subscribed again, each time).
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let after = common::http({
        let api = api.clone();
        move || accepted(&api)
    })
    .await;
    assert_eq!(after, before, "the connection was closed and reopened");
    send_all(&client, "quiet", &["still here"]).await;
    let message = next(&mut subscription, Duration::from_secs(5))
        .await
        .expect("a message");
    assert_eq!(message.value.as_ref(), b"still here");
    broker.stop().await;
}

/// Acks made before a member leaves are sent before it leaves: a message
/// acked and then unsubscribed (or dropped) from is never delivered to the
/// group again. Before the fix, UNSUBSCRIBE overtook acks still lingering
/// in the client's batch, and the group got those messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_made_before_leaving_are_not_redelivered() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("leave", 1, false).await.unwrap();
    let values: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    send_all(&client, "leave", &values).await;
    for (round, by_drop) in [(0, false), (1, true)] {
        let lingering = SubscribeOptions {
            // A long linger: acks wait in the client's batch.
            ack_linger: Duration::from_millis(300),
            ..options(&format!("first-{round}"))
        };
        let group = format!("g{round}");
        let mut first = client
            .consumer()
            .subscribe("leave", &group, lingering)
            .await
            .unwrap();
        for _ in 0..values.len() {
            let message = next(&mut first, Duration::from_secs(10)).await.unwrap();
            // Queued, not awaited: the member leaves right after.
            drop(message.ack());
        }
        if by_drop {
            drop(first);
        } else {
            first.unsubscribe().await.unwrap();
        }
        let mut second = client
            .consumer()
            .subscribe("leave", &group, options(&format!("second-{round}")))
            .await
            .unwrap();
        let again = next(&mut second, Duration::from_millis(800)).await;
        assert!(
            again.is_none(),
            "round {round} (drop: {by_drop}): an acked message was delivered again: {:?}",
            again.map(|m| text(&m))
        );
    }
    broker.stop().await;
}

/// A single broker answers PARTITION_LEADERS with one entry per partition
/// and no address (send everything here), refuses an unknown topic, and
/// puts a keyed record where `dmq_protocol::key_partition` says, the rule
/// a client routing to a cluster's leaders relies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_broker_names_no_leader_and_routes_keys_by_the_published_rule() {
    let broker = Broker::start(|_| {}).await;
    let client = client(&broker).await;
    client.create_topic("orders", 5, false).await.unwrap();
    let leaders = client.partition_leaders("orders").await.unwrap();
    let expected: Vec<_> = (0..5)
        .map(|partition| dmq_client::PartitionLeader {
            partition,
            node_id: 0,
            address: String::new(),
        })
        .collect();
    assert_eq!(leaders, expected);
    let unknown = client.partition_leaders("nope").await.unwrap_err();
    assert_eq!(unknown.code(), Some(dmq_client::ErrorCode::UnknownTopic));
    let producer = client.producer();
    for i in 0..200 {
        let key = format!("customer-{i}");
        let receipt = producer
            .send(Message::new("orders", "x").key(key.clone()))
            .await
            .unwrap();
        assert_eq!(
            receipt.partition,
            dmq_client::protocol::key_partition(key.as_bytes(), 5),
            "{key}"
        );
    }
    broker.stop().await;
}
