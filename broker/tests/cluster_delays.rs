//! Delayed messages on cluster topics, through three real `dmqd`
//! processes on 127.0.0.1: a delayed produce to a cluster topic is written
//! to the internal one-partition Raft group `__dmq_cluster_delay`, every
//! node indexes it, and only the node leading that group fires due delays
//! into their partitions (Raft writes, the id the producer was given
//! kept). A pending delay survives the loss of that leader and a
//! whole-cluster restart, fires once and never early, and CANCEL_DELAY
//! through any node stops it. (All the processes share one clock, so a
//! delivery is compared with the deliver-at the test set.)
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use dmq_client::time::{ms_to_system_time, system_time_to_ms};
use dmq_client::{Client, Message, MessageId, Subscription};

mod common;
use common::cluster::{connect, produce, started_cluster, wait_for_topic, Node};
use common::{http, next, options, Api};

/// The internal Raft group that holds the cluster's pending delays.
const TIMER_GROUP: &str = "__dmq_cluster_delay";
/// How much earlier than its deliver-at a delivery may be seen: the
/// broker's ms rounding and the test's clock reads.
const CLOCK_SLACK: Duration = Duration::from_millis(50);

/// A delayed message the test produced.
#[derive(Debug, Clone, Copy)]
struct Delayed {
    id: MessageId,
    /// The partition PRODUCE_OK named: where it must fire.
    partition: u32,
    /// The deliver-at the test set.
    due: SystemTime,
}

/// One delivery seen by the test's consumer.
#[derive(Debug, Clone, Copy)]
struct Seen {
    id: MessageId,
    partition: u32,
    offset: u64,
    attempt: u32,
    /// When the test received it (wall clock).
    at: SystemTime,
}

/// Produces one delayed message to `orders` through `client` per entry of
/// `dues` (ms since the epoch, set as each message's deliver-at), all
/// queued at once; returns them once every one is acknowledged, checking
/// that PRODUCE_OK says they wait (no offset) and when they are due.
async fn produce_delayed(client: &Client, tag: &str, dues: &[i64]) -> Vec<Delayed> {
    // Through `client`'s node, whoever leads the partitions: the trace
    // checks look for `delay_scheduled` on the node asked.
    let producer = client.producer_with(dmq_client::ProducerOptions {
        route_to_leaders: false,
        ..Default::default()
    });
    let sends: Vec<_> = dues
        .iter()
        .enumerate()
        .map(|(i, &due)| {
            producer.send(
                Message::new("orders", format!("{tag} {i}")).deliver_at(ms_to_system_time(due)),
            )
        })
        .collect();
    let mut delayed = Vec::with_capacity(dues.len());
    for (i, (send, &due)) in sends.into_iter().zip(dues).enumerate() {
        let receipt = send
            .await
            .unwrap_or_else(|e| panic!("delayed produce {i} to the cluster topic failed: {e}"));
        let due = ms_to_system_time(due);
        assert_eq!(
            receipt.offset, None,
            "delayed record {i} is pending, in no partition yet: {receipt:?}"
        );
        assert_eq!(
            receipt.deliver_at,
            Some(due),
            "delayed record {i}: PRODUCE_OK's deliver-at: {receipt:?}"
        );
        delayed.push(Delayed {
            id: receipt.id,
            partition: receipt.partition,
            due,
        });
    }
    delayed
}

/// `(topic, partition, raft.leader)` of every group `node` lists in
/// `GET /api/cluster`; None while it cannot be reached.
async fn cluster_groups(node: &Node) -> Option<Vec<(String, u64, Option<u64>)>> {
    let api = Api::new(node.admin, None);
    http(move || {
        let (status, body) = api.try_call("GET", "/api/cluster", None)?;
        if status != 200 {
            return None;
        }
        Some(
            body["partitions"]
                .as_array()?
                .iter()
                .map(|p| {
                    (
                        p["topic"].as_str().unwrap_or_default().to_string(),
                        p["partition"].as_u64().unwrap_or(u64::MAX),
                        p["raft"]["leader"].as_u64(),
                    )
                })
                .collect(),
        )
    })
    .await
}

/// The leader of `__dmq_cluster_delay` partition 0 as node `node` reports
/// it, if it knows one.
async fn timer_leader_seen_by(node: &Node) -> Option<u64> {
    cluster_groups(node)
        .await?
        .into_iter()
        .find(|(topic, partition, _)| topic == TIMER_GROUP && *partition == 0)?
        .2
}

/// The leader of `__dmq_cluster_delay/0` that every node of `alive`
/// (indexes in `nodes`) agrees on; waits up to 60 s.
async fn agreed_timer_leader(nodes: &[Node], alive: &[usize]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut views = Vec::new();
        for &via in alive {
            views.push(timer_leader_seen_by(&nodes[via]).await);
        }
        if let Some(Some(first)) = views.first() {
            if views.iter().all(|view| *view == Some(*first)) {
                return *first;
            }
        }
        if Instant::now() > deadline {
            let listed = cluster_groups(&nodes[alive[0]]).await;
            panic!(
                "no leader of {TIMER_GROUP}/0 that nodes {alive:?} (indexes) agree on: \
                 {views:?}; node {} lists (topic, partition, leader) {listed:?}",
                nodes[alive[0]].id
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The index in `nodes` of the node with id `id`.
fn index_of(nodes: &[Node], id: u64) -> usize {
    nodes
        .iter()
        .position(|node| node.id == id)
        .unwrap_or_else(|| panic!("no node {id}"))
}

/// Subscribes group `group` to `orders` through `client` from the
/// earliest message, retrying for up to 30 s (a cluster that just
/// restarted may still be electing the leader that makes the group's
/// dead-letter topic).
async fn subscribe(client: &Client, group: &str) -> Subscription {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .consumer()
            .subscribe("orders", group, options("m"))
            .await
        {
            Ok(subscription) => return subscription,
            Err(error) => {
                assert!(Instant::now() < deadline, "SUBSCRIBE {group}: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every delivery one subscription got, each acked at once.
#[derive(Default)]
struct Deliveries {
    seen: Vec<Seen>,
}

impl Deliveries {
    fn ids(&self) -> BTreeSet<MessageId> {
        self.seen.iter().map(|seen| seen.id).collect()
    }

    async fn read_one(&mut self, subscription: &mut Subscription, within: Duration) {
        if let Some(message) = next(subscription, within).await {
            self.seen.push(Seen {
                id: message.id,
                partition: message.partition,
                offset: message.offset,
                attempt: message.attempt,
                at: SystemTime::now(),
            });
            message.ack().await.unwrap();
        }
    }

    /// Reads until every id of `expected` was delivered; panics at
    /// `deadline` naming `what` and the missing ids.
    async fn until_all(
        &mut self,
        subscription: &mut Subscription,
        expected: &BTreeSet<MessageId>,
        deadline: Instant,
        what: &str,
    ) {
        loop {
            let seen = self.ids();
            let missing: Vec<&MessageId> = expected.difference(&seen).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {} never delivered: {missing:?}",
                missing.len(),
                expected.len()
            );
            let left = deadline.saturating_duration_since(Instant::now());
            self.read_one(subscription, left.min(Duration::from_millis(200)))
                .await;
        }
    }

    /// Keeps reading (and acking) for `span`, so that a late duplicate or
    /// a message that should never come would be seen.
    async fn linger(&mut self, subscription: &mut Subscription, span: Duration) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            self.read_one(subscription, left.min(Duration::from_millis(200)))
                .await;
        }
    }

    /// No id delivered more than once (a delay fired twice, or a message
    /// redelivered although acked).
    fn assert_no_duplicates(&self) {
        let mut by_id: BTreeMap<MessageId, Vec<Seen>> = BTreeMap::new();
        for seen in &self.seen {
            by_id.entry(seen.id).or_default().push(*seen);
        }
        let duplicates: Vec<_> = by_id
            .into_iter()
            .filter(|(_, seen)| seen.len() > 1)
            .map(|(id, seen)| {
                let copies: Vec<String> = seen
                    .iter()
                    .map(|s| format!("p{}@{} attempt {}", s.partition, s.offset, s.attempt))
                    .collect();
                format!("{id}: {}", copies.join(", "))
            })
            .collect();
        assert!(
            duplicates.is_empty(),
            "{} ids delivered more than once:\n{}",
            duplicates.len(),
            duplicates.join("\n")
        );
    }

    /// Only ids of `expected` delivered.
    fn assert_only(&self, expected: &BTreeSet<MessageId>) {
        let unexpected: Vec<Seen> = self
            .seen
            .iter()
            .filter(|seen| !expected.contains(&seen.id))
            .copied()
            .collect();
        assert!(
            unexpected.is_empty(),
            "delivered, but never produced (or cancelled): {unexpected:?}"
        );
    }

    /// Each of `delayed` delivered no earlier than its deliver-at (less
    /// [`CLOCK_SLACK`]) and in the partition PRODUCE_OK named.
    fn assert_on_time(&self, delayed: &[Delayed]) {
        let wanted: BTreeMap<MessageId, Delayed> = delayed.iter().map(|d| (d.id, *d)).collect();
        let mut early = Vec::new();
        let mut elsewhere = Vec::new();
        for seen in &self.seen {
            let Some(delay) = wanted.get(&seen.id) else {
                continue;
            };
            if seen.at + CLOCK_SLACK < delay.due {
                early.push(format!(
                    "{} {:?} before its deliver-at",
                    seen.id,
                    delay.due.duration_since(seen.at).unwrap()
                ));
            }
            if seen.partition != delay.partition {
                elsewhere.push(format!(
                    "{} in partition {} (PRODUCE_OK said {})",
                    seen.id, seen.partition, delay.partition
                ));
            }
        }
        assert!(
            early.is_empty(),
            "{} delayed messages delivered early:\n{}",
            early.len(),
            early.join("\n")
        );
        assert!(
            elsewhere.is_empty(),
            "delayed messages fired into another partition:\n{}",
            elsewhere.join("\n")
        );
    }
}

/// An `Instant` about when the wall clock reads `time` (now if past).
fn instant_at(time: SystemTime) -> Instant {
    Instant::now() + time.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Deliver-at times `base_ms`, `base_ms + step_ms`, ... cycling over
/// `spread` steps, for `count` messages.
fn dues(count: usize, base_ms: i64, step_ms: i64, spread: usize) -> Vec<i64> {
    (0..count)
        .map(|i| base_ms + step_ms * i64::try_from(i % spread).unwrap())
        .collect()
}

/// 40 delayed messages produced through one node; the node leading the
/// timer group is killed (SIGKILL) before any is due; a group consuming
/// through a survivor gets every one once, none early, while records
/// without a delay pass at once meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_on_a_cluster_topic_fires_once_after_the_timer_leader_is_killed() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, _configs) = started_cluster(root.path());
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Some(connect(node).await));
    }
    let first = clients[0].as_ref().unwrap();
    first.create_topic("orders", 2, false).await.unwrap();
    for client in clients.iter().flatten() {
        wait_for_topic(client, "orders").await;
    }

    // Due in about 6 s, spread over 180 ms.
    let base = system_time_to_ms(SystemTime::now()) + 6_000;
    let delayed = produce_delayed(first, "delayed", &dues(40, base, 20, 10)).await;
    let first_due = ms_to_system_time(base);
    let delayed_ids: BTreeSet<MessageId> = delayed.iter().map(|d| d.id).collect();
    assert_eq!(delayed_ids.len(), 40, "distinct ids");

    // The node leading the timer group, as every node sees it; the group
    // consumes through another.
    let leader = agreed_timer_leader(&nodes, &[0, 1, 2]).await;
    let dead = index_of(&nodes, leader);
    let survivor = (0..nodes.len()).find(|&i| i != dead).unwrap();
    let client = clients[survivor].take().unwrap();
    let mut subscription = subscribe(&client, "billing").await;
    let mut deliveries = Deliveries::default();

    // Records without a delay pass at once: the pending delays do not
    // hold the topic back.
    let immediate: BTreeSet<MessageId> = produce(&client, "now", 2).await.into_iter().collect();
    deliveries
        .until_all(
            &mut subscription,
            &immediate,
            instant_at(first_due),
            "records without a delay, before the delayed ones are due",
        )
        .await;

    // Every node counts the pending delays in the group's description
    // (each from its own index of the timer log).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let description = client.describe_group("orders", "billing").await.unwrap();
        let delayed: u64 = description.partitions.iter().map(|p| p.delayed).sum();
        if delayed == 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DESCRIBE_GROUP counts {delayed} pending delays, not 40"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The acks of the two replicated (their sync interval, 50 ms, and a
    // metadata commit), should the group move to another node (with
    // `consumer_lease` on it would be served by the metadata leader,
    // which may be the node killed below).
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The timer leader dies before anything is due.
    drop(clients);
    nodes[dead].kill();
    let killed_at = SystemTime::now();
    assert!(
        killed_at < first_due,
        "node {leader} (timer leader) was killed {:?} after the first delay was due: \
         the machine was too slow for this test to mean anything",
        killed_at.duration_since(first_due).unwrap()
    );

    // A survivor takes the timer group over: each delayed message comes
    // once, never early, into the partition it was produced to.
    deliveries
        .until_all(
            &mut subscription,
            &delayed_ids,
            Instant::now() + Duration::from_secs(60),
            &format!("delayed messages after timer leader {leader} was killed"),
        )
        .await;
    deliveries
        .linger(&mut subscription, Duration::from_secs(2))
        .await;
    let everything: BTreeSet<MessageId> = delayed_ids.union(&immediate).copied().collect();
    deliveries.assert_only(&everything);
    deliveries.assert_no_duplicates();
    deliveries.assert_on_time(&delayed);
    let immediate_late: Vec<&Seen> = deliveries
        .seen
        .iter()
        .filter(|seen| immediate.contains(&seen.id) && seen.at >= first_due)
        .collect();
    assert!(
        immediate_late.is_empty(),
        "records without a delay waited for the delayed ones: {immediate_late:?}"
    );

    // The trace: scheduled on the node asked, fired on the node that
    // fired it (each node keeps its own).
    let id = *delayed_ids.iter().next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut kinds = BTreeSet::new();
        for (i, node) in nodes.iter().enumerate() {
            if i == dead {
                continue;
            }
            let api = Api::new(node.admin, None);
            let path = format!("/api/trace/{id}");
            let traced = http(move || api.try_call("GET", &path, None)).await;
            if let Some((200, body)) = traced {
                for event in body["events"].as_array().into_iter().flatten() {
                    kinds.insert(event["kind"].as_str().unwrap_or_default().to_string());
                }
            }
        }
        let scheduled_seen = dead == 0 || kinds.contains("delay_scheduled");
        if scheduled_seen && kinds.contains("delay_fired") && kinds.contains("acked") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the surviving nodes' traces of {id}: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Delayed messages still pending when every node is killed (SIGKILL) and
/// restarted on its disk fire after the restart, each at or after its
/// deliver-at, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delays_survive_a_whole_cluster_restart() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, configs) = started_cluster(root.path());
    let first = connect(&nodes[0]).await;
    first.create_topic("orders", 2, false).await.unwrap();

    // Due in about 6 s, spread over 80 ms.
    let base = system_time_to_ms(SystemTime::now()) + 6_000;
    let delayed = produce_delayed(&first, "delayed", &dues(20, base, 20, 5)).await;
    let first_due = ms_to_system_time(base);
    let delayed_ids: BTreeSet<MessageId> = delayed.iter().map(|d| d.id).collect();
    assert_eq!(delayed_ids.len(), 20, "distinct ids");

    // Every node killed (no shutdown, no final fsync), then restarted on
    // its data directory.
    drop(first);
    for node in nodes.iter_mut() {
        node.kill();
    }
    let killed_at = SystemTime::now();
    assert!(
        killed_at < first_due,
        "the cluster was killed {:?} after the first delay was due: too slow a machine",
        killed_at.duration_since(first_due).unwrap()
    );
    for (node, config) in nodes.iter_mut().zip(&configs) {
        node.start(config);
    }
    let third = connect(&nodes[2]).await;
    wait_for_topic(&third, "orders").await;
    let mut subscription = subscribe(&third, "after-restart").await;
    let subscribed_at = SystemTime::now();
    // (A delay that fired early would be delivered at once now: the
    // check below sees it only if the group was there before they were
    // due.)
    assert!(
        subscribed_at < first_due,
        "the cluster served the group only {:?} after the first delay was due: \
         too slow a machine to tell an early firing",
        subscribed_at.duration_since(first_due).unwrap()
    );

    let mut deliveries = Deliveries::default();
    deliveries
        .until_all(
            &mut subscription,
            &delayed_ids,
            Instant::now() + Duration::from_secs(60),
            "delayed messages after a whole-cluster restart",
        )
        .await;
    deliveries
        .linger(&mut subscription, Duration::from_secs(1))
        .await;
    deliveries.assert_only(&delayed_ids);
    deliveries.assert_no_duplicates();
    deliveries.assert_on_time(&delayed);
}

/// Of two delayed messages, one is cancelled through a node that does
/// not lead the timer group: it never fires; the other does, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_delay_on_a_cluster_topic_never_fires() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, _configs) = started_cluster(root.path());
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(connect(node).await);
    }
    clients[0].create_topic("orders", 2, false).await.unwrap();
    for client in &clients {
        wait_for_topic(client, "orders").await;
    }

    // A record carrying a header the timer log reserves is refused, and
    // nothing of its batch is stored.
    let refused = clients[1]
        .producer()
        .send(
            Message::new("orders", "forged")
                .header("dmq.delay.topic", "elsewhere")
                .deliver_at(ms_to_system_time(
                    system_time_to_ms(SystemTime::now()) + 1_000,
                )),
        )
        .await;
    assert!(
        matches!(
            &refused,
            Err(dmq_client::ClientError::Broker {
                code: dmq_client::ErrorCode::InvalidRequest,
                ..
            })
        ),
        "a delayed record with a reserved header: {refused:?}"
    );

    // Both due in about 3 s.
    let base = system_time_to_ms(SystemTime::now()) + 3_000;
    let delayed = produce_delayed(&clients[0], "delayed", &dues(2, base, 0, 1)).await;
    let (kept, cancelled) = (delayed[0], delayed[1]);
    assert_ne!(kept.id, cancelled.id);

    // Cancelled through a node that neither leads the timer group nor
    // took the produce (node 1).
    let leader = agreed_timer_leader(&nodes, &[0, 1, 2]).await;
    let leading = index_of(&nodes, leader);
    let via = (1..nodes.len()).find(|&i| i != leading).unwrap();
    let answer = clients[via].cancel_delay(cancelled.id).await;
    let answered_at = SystemTime::now();
    assert!(
        matches!(answer, Ok(true)),
        "CANCEL_DELAY of a pending delay through node {} (timer leader: node {leader}): \
         {answer:?}",
        nodes[via].id
    );
    assert!(
        answered_at < cancelled.due,
        "the cancel was answered {:?} after the delay was due: too slow a machine",
        answered_at.duration_since(cancelled.due).unwrap()
    );
    // It is pending no more, for the timer leader either.
    let again = clients[leading].cancel_delay(cancelled.id).await;
    assert!(
        matches!(again, Ok(false)),
        "a second CANCEL_DELAY, through the timer leader (node {leader}): {again:?}"
    );

    // The other fires; the cancelled one has not come 2 s after its
    // deliver-at.
    let mut subscription = subscribe(&clients[via], "billing").await;
    let mut deliveries = Deliveries::default();
    deliveries
        .until_all(
            &mut subscription,
            &BTreeSet::from([kept.id]),
            Instant::now() + Duration::from_secs(60),
            "the delayed message that was not cancelled",
        )
        .await;
    let until = cancelled.due + Duration::from_secs(2);
    deliveries
        .linger(
            &mut subscription,
            until
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(500)),
        )
        .await;
    assert!(
        !deliveries.ids().contains(&cancelled.id),
        "the cancelled delay fired: {:?}",
        deliveries.seen
    );
    deliveries.assert_only(&BTreeSet::from([kept.id]));
    deliveries.assert_no_duplicates();
    deliveries.assert_on_time(&[kept]);

    // Once fired, a delay can no longer be cancelled.
    let late = clients[via].cancel_delay(kept.id).await;
    assert!(
        matches!(late, Ok(false)),
        "CANCEL_DELAY of a delay that fired: {late:?}"
    );
}
