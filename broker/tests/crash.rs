//! Crash test: a real `dmqd` process is killed with SIGKILL while a producer
//! and a consumer run (20 cycles by default, `DMQ_BROKER_CRASH_CYCLES` for
//! more), then restarted on the same data directory. At the end every
//! acknowledged produce must have been delivered, and no message whose ack
//! was confirmed well before a kill (outside the ack persistence window) may
//! be delivered again.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmq_protocol::{Body, MessageId, Push, Request, Response};

mod common;
use common::{free_port, spawn_dmqd, Connection};

/// Acks confirmed less than this before a kill may be lost (the documented
/// window is 50 ms plus the dispatcher's poll; the margin absorbs CI noise).
const ACK_WINDOW: Duration = Duration::from_secs(2);

fn start(data_dir: &std::path::Path, addr: SocketAddr) -> Child {
    spawn_dmqd(data_dir, addr, None)
}

fn subscribe() -> Request {
    Request::Subscribe(dmq_protocol::Subscribe {
        topic: "crash".into(),
        group: "g".into(),
        member_name: "c".into(),
        credit: 1000,
        settings: dmq_protocol::GroupSettings {
            ack_timeout_ms: Some(60_000),
            ..Default::default()
        },
        ..Default::default()
    })
}

#[derive(Default)]
struct Ledger {
    /// Produces the broker acknowledged: id → value.
    produced: HashMap<MessageId, Bytes>,
    /// Every message ever delivered.
    delivered: HashSet<MessageId>,
    /// Acks the broker confirmed, with when.
    acked: HashMap<MessageId, Instant>,
    /// Deliveries of a message after its ack was confirmed, with when.
    redelivered_after_ack: Vec<(MessageId, Instant)>,
}

/// Produces and consumes until `until`, recording everything confirmed.
async fn run_cycle(addr: SocketAddr, ledger: &mut Ledger, until: Instant, cycle: u64) {
    let mut producer = Connection::hello_when_up(addr).await;
    let mut consumer = Connection::hello_when_up(addr).await;
    let Response::Subscribed(subscription) = consumer.request(subscribe()).await else {
        panic!("subscribe failed")
    };
    let mut pending_acks: HashMap<u32, MessageId> = HashMap::new();
    let mut sequence = 0u64;
    while Instant::now() < until {
        sequence += 1;
        let values: Vec<Bytes> = (0..10)
            .map(|i| Bytes::from(format!("cycle {cycle} batch {sequence} record {i}")))
            .collect();
        let produce = Request::Produce(dmq_protocol::Produce {
            topic: "crash".into(),
            partition: Some(0),
            idempotence: None,
            records: values
                .iter()
                .map(|value| dmq_protocol::ProduceRecord {
                    value: value.clone(),
                    ..Default::default()
                })
                .collect(),
        });
        let id = producer.send(produce).await;
        let frame = producer
            .frame_within(Duration::from_secs(10))
            .await
            .expect("PRODUCE_OK");
        assert_eq!(frame.correlation_id, id);
        let Body::Response(Response::ProduceOk(ok)) = frame.body else {
            panic!("produce failed: {frame:?}")
        };
        for (record, value) in ok.records.iter().zip(values) {
            ledger.produced.insert(record.message_id, value);
        }
        // Drain pushes (ack each) and ack confirmations.
        while let Some(frame) = consumer.frame_within(Duration::from_millis(5)).await {
            match frame.body {
                Body::Push(Push::Deliver(delivery)) => {
                    if ledger.acked.contains_key(&delivery.message_id) {
                        ledger
                            .redelivered_after_ack
                            .push((delivery.message_id, Instant::now()));
                    }
                    ledger.delivered.insert(delivery.message_id);
                    let ack_id = consumer
                        .send_ack(
                            subscription.subscription_id,
                            delivery.partition,
                            delivery.offset,
                        )
                        .await;
                    pending_acks.insert(ack_id, delivery.message_id);
                }
                Body::Response(Response::Ok) => {
                    if let Some(id) = pending_acks.remove(&frame.correlation_id) {
                        ledger.acked.entry(id).or_insert_with(Instant::now);
                    }
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_produces_survive_sigkill_and_acks_stay_acked() {
    let cycles = common::env_count("DMQ_BROKER_CRASH_CYCLES", 20);
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::default();
    let mut kills = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for cycle in 0..cycles {
        let addr = free_port();
        let mut child = start(dir.path(), addr);
        if cycle == 0 {
            let mut admin = Connection::hello_when_up(addr).await;
            let created = admin
                .request(Request::CreateTopic(dmq_protocol::CreateTopic {
                    name: "crash".into(),
                    partitions: 1,
                    ordered: false,
                }))
                .await;
            assert_eq!(created, Response::Ok);
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(100 + seed % 300);
        run_cycle(addr, &mut ledger, Instant::now() + run_for, cycle).await;
        child.kill().unwrap(); // SIGKILL
        kills.push(Instant::now());
        child.wait().unwrap();
    }
    // Final run: drain everything.
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut consumer = Connection::hello_when_up(addr).await;
    let Response::Subscribed(subscription) = consumer.request(subscribe()).await else {
        panic!("subscribe failed")
    };
    while let Some(frame) = consumer.frame_within(Duration::from_secs(2)).await {
        let Body::Push(Push::Deliver(delivery)) = frame.body else {
            continue;
        };
        if ledger.acked.contains_key(&delivery.message_id) {
            ledger
                .redelivered_after_ack
                .push((delivery.message_id, Instant::now()));
        }
        ledger.delivered.insert(delivery.message_id);
        if let Some(value) = ledger.produced.get(&delivery.message_id) {
            assert_eq!(value, &delivery.value, "a delivered message changed");
        }
        consumer
            .send_ack(
                subscription.subscription_id,
                delivery.partition,
                delivery.offset,
            )
            .await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(
        ledger.produced.len() > 100,
        "the test produced too little: {}",
        ledger.produced.len()
    );
    let lost: Vec<_> = ledger
        .produced
        .keys()
        .filter(|id| !ledger.delivered.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged produces never delivered",
        lost.len()
    );
    // A redelivery of an acked message is allowed only if its ack was
    // confirmed within the window before the kill that preceded it.
    for (id, when) in &ledger.redelivered_after_ack {
        let acked_at = ledger.acked[id];
        let kill = kills
            .iter()
            .find(|kill| **kill >= acked_at && **kill <= *when);
        let allowed = kill.is_some_and(|kill| kill.duration_since(acked_at) <= ACK_WINDOW);
        assert!(
            allowed,
            "message {id} redelivered after an ack confirmed outside the window: acked {:?} before the next kill, redelivered {:?} after the ack; kills at {:?} after the first",
            kill.map(|k| k.duration_since(acked_at)),
            when.duration_since(acked_at),
            kills.iter().map(|k| k.duration_since(kills[0])).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "{cycles} kills: {} produced, {} delivered, {} acked, {} redelivered after ack (all within the window)",
        ledger.produced.len(),
        ledger.delivered.len(),
        ledger.acked.len(),
        ledger.redelivered_after_ack.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_keeps_every_ack() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut admin = Connection::hello_when_up(addr).await;
    admin
        .request(Request::CreateTopic(dmq_protocol::CreateTopic {
            name: "crash".into(),
            partitions: 1,
            ordered: false,
        }))
        .await;
    let records = (0..50)
        .map(|i| dmq_protocol::ProduceRecord {
            value: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
        .collect();
    let produced = admin
        .request(Request::Produce(dmq_protocol::Produce {
            topic: "crash".into(),
            partition: Some(0),
            idempotence: None,
            records,
        }))
        .await;
    assert!(matches!(produced, Response::ProduceOk(_)));
    let mut consumer = Connection::hello_when_up(addr).await;
    let Response::Subscribed(subscription) = consumer.request(subscribe()).await else {
        panic!("subscribe failed")
    };
    let mut positions = Vec::new();
    for _ in 0..50 {
        let delivery = consumer.push().await;
        positions.push(dmq_protocol::MessagePosition {
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    let acked = consumer
        .request(Request::Ack(dmq_protocol::Ack {
            subscription_id: subscription.subscription_id,
            messages: positions,
        }))
        .await;
    assert_eq!(acked, Response::Ok);
    // SIGTERM right after the last ack: a graceful shutdown makes it durable.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "dmqd exited with {exit:?}");
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut consumer = Connection::hello_when_up(addr).await;
    consumer.request(subscribe()).await;
    let redelivered = consumer.frame_within(Duration::from_secs(1)).await;
    assert!(
        redelivered.is_none(),
        "acked before SIGTERM, delivered again: {redelivered:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_a_crash_gets_its_original_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let produce = |sequence: u64| {
        Request::Produce(dmq_protocol::Produce {
            topic: "crash".into(),
            partition: Some(0),
            idempotence: Some(dmq_protocol::ProducerSequence {
                producer_id: 7,
                sequence,
            }),
            records: vec![dmq_protocol::ProduceRecord {
                value: Bytes::from(format!("batch {sequence}")),
                ..Default::default()
            }],
        })
    };
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut connection = Connection::hello_when_up(addr).await;
    connection
        .request(Request::CreateTopic(dmq_protocol::CreateTopic {
            name: "crash".into(),
            partitions: 1,
            ordered: false,
        }))
        .await;
    let first = connection.request(produce(1)).await;
    let second = connection.request(produce(2)).await;
    child.kill().unwrap(); // the producer never saw... or did: it retries anyway
    child.wait().unwrap();
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut connection = Connection::hello_when_up(addr).await;
    assert_eq!(
        connection.request(produce(2)).await,
        second,
        "retry after restart"
    );
    let Response::ProduceOk(next) = connection.request(produce(3)).await else {
        panic!("produce failed")
    };
    assert_eq!(
        next.records[0].offset,
        Some(2),
        "nothing was appended twice"
    );
    assert!(matches!(first, Response::ProduceOk(_)));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Delayed messages due together are fired by the `dmq-writer` thread while
/// the dispatcher goes on: a SIGKILL before, during or after the firing
/// must neither lose one nor leave two copies in the topic (a refire after
/// the restart finds the copy a lost fired mark left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_fired_when_killed_are_in_their_topic_once_after_restart() {
    const MESSAGES: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut expected: HashSet<MessageId> = HashSet::new();
    // Kill points relative to the due time: before it, while the burst
    // fires, and just after.
    for (cycle, kill_after_due_ms) in [-200i64, 0, 40, 150].into_iter().enumerate() {
        let addr = free_port();
        let mut child = start(dir.path(), addr);
        let mut producer = Connection::hello_when_up(addr).await;
        if cycle == 0 {
            producer
                .request(Request::CreateTopic(dmq_protocol::CreateTopic {
                    name: "burst".into(),
                    partitions: 2,
                    ordered: false,
                }))
                .await;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let due_ms = now_ms + 1_500;
        for batch in 0..MESSAGES / 1_000 {
            let records = (0..1_000)
                .map(|i| dmq_protocol::ProduceRecord {
                    value: Bytes::from(format!("cycle {cycle} batch {batch} record {i}")),
                    delivery_time: dmq_protocol::DeliveryTime::AtMs(due_ms),
                    ..Default::default()
                })
                .collect();
            let Response::ProduceOk(ok) = producer
                .request(Request::Produce(dmq_protocol::Produce {
                    topic: "burst".into(),
                    partition: None,
                    idempotence: None,
                    records,
                }))
                .await
            else {
                panic!("delayed produce failed")
            };
            expected.extend(ok.records.iter().map(|r| r.message_id));
        }
        let kill_at = due_ms + kill_after_due_ms;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        if kill_at > now_ms {
            tokio::time::sleep(Duration::from_millis((kill_at - now_ms) as u64)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // A last start fires whatever is overdue; a new group reads the topic
    // from its start.
    let addr = free_port();
    let mut child = start(dir.path(), addr);
    let mut consumer = Connection::hello_when_up(addr).await;
    let Response::Subscribed(subscription) = consumer
        .request(Request::Subscribe(dmq_protocol::Subscribe {
            topic: "burst".into(),
            group: "after".into(),
            member_name: "c".into(),
            credit: 1_000_000,
            settings: dmq_protocol::GroupSettings {
                ack_timeout_ms: Some(120_000),
                ..Default::default()
            },
            ..Default::default()
        }))
        .await
    else {
        panic!("subscribe failed")
    };
    let mut seen: HashMap<MessageId, u32> = HashMap::new();
    // Until everything arrived and then half a second more: anything
    // delivered twice would arrive right behind the rest.
    let mut quiet = Duration::from_secs(30);
    loop {
        if seen.len() >= expected.len() {
            quiet = Duration::from_millis(500);
        }
        let Some(frame) = consumer.frame_within(quiet).await else {
            break;
        };
        if let Body::Push(Push::Deliver(delivery)) = frame.body {
            *seen.entry(delivery.message_id).or_default() += 1;
            consumer
                .send_ack(
                    subscription.subscription_id,
                    delivery.partition,
                    delivery.offset,
                )
                .await;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let missing = expected.iter().filter(|id| !seen.contains_key(id)).count();
    let twice = seen.values().filter(|&&n| n > 1).count();
    let unknown = seen.keys().filter(|id| !expected.contains(id)).count();
    assert_eq!(
        (missing, twice, unknown),
        (0, 0, 0),
        "of {} delayed messages: missing, delivered twice (two copies in the topic), unknown",
        expected.len()
    );
}
