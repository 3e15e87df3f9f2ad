//! Fault injection on a three-node cluster of real `dmqd` processes, with
//! a checker in the spirit of Jepsen (issue 12).
//!
//! Every node serves Raft on an address of its own (127.0.0.11, .12, .13)
//! and its peers reach it through a proxy on 127.0.0.1 that this test
//! owns; a node's Raft connections leave from its own address
//! (`raft_source_ip`), so the proxy knows which link a connection is and
//! can cut it (a network partition) or slow it. Client traffic goes to
//! each node directly.
//!
//! A seeded schedule (`DMQ_TEST_SEED`) of `DMQ_CLUSTER_FAULTS` episodes
//! (50 in CI) applies, one at a time, to one node (half the time the
//! metadata leader): SIGKILL and restart on its disk, SIGSTOP and
//! SIGCONT, cut off from both peers and healed, or its links slowed.
//! Meanwhile one producer sends keyed messages to an ordered topic one at
//! a time (moving to the next node when a send fails) and a consumer group
//! acks everything it gets (moved off a node when it is faulted); another
//! producer sends delayed messages (due 0.3 to 2.5 s later) to a second
//! topic, so that delays are scheduled, and fire, while nodes fail.
//!
//! After healing, the checker asserts: every acknowledged produce is
//! delivered to the running group and to a new group through every node;
//! per key, acknowledged messages are stored and delivered in the order
//! they were sent; stopped, the three replicas of each partition hold the
//! same records at the same offsets; the running group is not given again a message it acked
//! more than [`ACK_WINDOW`] before it left the node it acked through
//! (what it gets again within that window is printed: at least once);
//! every acknowledged delayed message fires and is delivered, none stored
//! in its topic before its due time (copies fired again by a new timer
//! leader are printed: at least once).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmq_client::{Client, ClientOptions, Message, MessageId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::cluster::{
    connect, damage_active_segment, metadata_leader, wait_for_topic, wait_for_topic_on,
    with_consumer_lease, Node,
};
use common::{env_count, free_port, http, next, options, Api};

/// The links between nodes, as the proxies apply them.
#[derive(Default)]
struct Links {
    /// Directed links (from, to) that drop every connection.
    cut: HashSet<(u64, u64)>,
    /// Nodes whose links wait this long before passing each chunk on.
    slow: HashMap<u64, Duration>,
    /// Open connections: (from, to) and the task relaying them.
    open: Vec<((u64, u64), tokio::task::AbortHandle)>,
}

#[derive(Clone, Default)]
struct Network {
    links: Arc<Mutex<Links>>,
}

impl Network {
    fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts `node` off from every other node, both ways, at once.
    fn isolate(&self, node: u64, nodes: &[u64]) {
        let mut links = self.lock();
        for &other in nodes.iter().filter(|&&n| n != node) {
            links.cut.insert((node, other));
            links.cut.insert((other, node));
        }
        links.open.retain(|((from, to), task)| {
            let cut = *from == node || *to == node;
            if cut {
                task.abort();
            }
            !cut
        });
    }

    fn slow(&self, node: u64, delay: Duration) {
        self.lock().slow.insert(node, delay);
    }

    fn heal(&self) {
        let mut links = self.lock();
        links.cut.clear();
        links.slow.clear();
    }

    fn delay(&self, from: u64, to: u64) -> Duration {
        let links = self.lock();
        let of = |node| links.slow.get(&node).copied().unwrap_or_default();
        of(from).max(of(to))
    }

    /// Serves node `to`'s proxy on `listener`, relaying to `target`.
    async fn proxy(self, listener: TcpListener, to: u64, target: SocketAddr) {
        loop {
            let Ok((inbound, peer)) = listener.accept().await else {
                continue;
            };
            let from = node_of(peer.ip());
            if self.lock().cut.contains(&(from, to)) {
                continue; // dropped: the peer sees the connection closed
            }
            let network = self.clone();
            let relay = tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let forth = network.clone();
                let one = async move {
                    relay(&mut in_read, &mut out_write, || forth.delay(from, to)).await
                };
                let back = network.clone();
                let other = async move {
                    relay(&mut out_read, &mut in_write, || back.delay(from, to)).await
                };
                tokio::select! {
                    _ = one => {}
                    _ = other => {}
                }
            });
            let mut links = self.lock();
            links.open.retain(|(_, task)| !task.is_finished());
            links.open.push(((from, to), relay.abort_handle()));
        }
    }
}

/// Copies `from` to `to`, each chunk after `delay()`, until either ends.
async fn relay(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    delay: impl Fn() -> Duration,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let wait = delay();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// Node `n` serves Raft on 127.0.0.(10 + n).
fn node_ip(node: u64) -> IpAddr {
    IpAddr::from([127, 0, 0, 10 + node as u8])
}

fn node_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(v4.octets()[3]).saturating_sub(10),
        IpAddr::V6(_) => 0,
    }
}

/// The test's directory, kept after the test when `DMQ_KEEP_DATA` is set
/// (to read the nodes' logs and data after a failure).
struct KeptOnFailure(Option<tempfile::TempDir>);

impl KeptOnFailure {
    fn path(&self) -> &std::path::Path {
        self.0
            .as_ref()
            .map(|dir| dir.path())
            .unwrap_or(std::path::Path::new("."))
    }
}

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if std::env::var_os("DMQ_KEEP_DATA").is_some() {
            if let Some(dir) = self.0.take() {
                let _ = dir.keep();
            }
        }
    }
}

/// A small seeded generator (xorshift64*), so a schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the producer and the consumer saw, shared with the checker.
#[derive(Default)]
struct History {
    /// Ids of acknowledged produces.
    acknowledged: Vec<MessageId>,
    /// The key and sequence number each acknowledged id was sent with.
    sent_as: HashMap<MessageId, (u64, u64)>,
    failed_sends: u64,
    /// Deliveries to the running group: (id, key, seq, partition, offset).
    delivered: Vec<(MessageId, u64, u64, u32, u64)>,
    /// Ids the running group acked: through which node, and when.
    acked_at: HashMap<MessageId, (usize, Instant)>,
    /// When the consumer last moved off each node.
    left_at: [Option<Instant>; 3],
    /// The node the consumer's connection is on (with the consumer lease,
    /// the serving node it was sent to, whichever node it asked).
    on: Option<usize>,
    /// The last ack through each node.
    last_ack: [Option<Instant>; 3],
    /// Deliveries of a message the group had acked, by how long before
    /// the consumer left the node it acked through (or before now, on
    /// the same node) the ack was made.
    redelivered_after_ack: Vec<Duration>,
}

impl History {
    /// The consumer left `node` at `at`, unless its leaving was seen
    /// earlier (by the fault schedule) since its last ack there.
    fn left(&mut self, node: usize, at: Instant) {
        if self.left_at[node] <= self.last_ack[node] {
            self.left_at[node] = Some(at);
        }
    }

    /// An ack of `id` through `node`.
    fn acked(&mut self, id: MessageId, node: usize) {
        let now = Instant::now();
        self.acked_at.insert(id, (node, now));
        self.last_ack[node] = Some(now);
    }
}

/// The delayed messages the second producer had acknowledged: id and due
/// time (ms since the epoch); sends that failed.
#[derive(Default)]
struct DelayedHistory {
    acknowledged: Vec<(MessageId, i64)>,
    failed_sends: u64,
}

/// Sends delayed messages to "reminders" one at a time until `stop`, each
/// due 0.3 to 2.5 s after it is sent, through the next node after a
/// failed send.
async fn produce_delayed(
    addrs: Vec<SocketAddr>,
    history: Arc<Mutex<DelayedHistory>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    send_one_at_a_time(
        addrs,
        stop,
        Duration::from_millis(20),
        |seq| {
            let due = dmq_client::time::system_time_to_ms(std::time::SystemTime::now())
                + 300
                + (seq * 7_919 % 2_200) as i64;
            let message = Message::new("reminders", format!("r:{seq}"))
                .deliver_at(dmq_client::time::ms_to_system_time(due));
            (message, due)
        },
        |due, receipt| {
            let mut history = history.lock().unwrap();
            match receipt {
                Some(receipt) => history.acknowledged.push((receipt.id, due)),
                None => history.failed_sends += 1,
            }
        },
    )
    .await;
}

/// Consumes "reminders" as a new group through `client` until every id of
/// `expected` came (or 60 s passed), acking each: (id, where and when it
/// was stored in its topic) per delivery.
/// Until when a checker's read of `expected` messages may take: one
/// message at a time, each ack awaited, runs at 80 to 200 a second, so a
/// long campaign's tens of thousands take many minutes (a fixed minute
/// cut the reminders' read of a 1,000-episode campaign short: 3,658 of
/// them "never fired").
fn read_deadline(expected: usize) -> Instant {
    Instant::now() + Duration::from_secs(60) + Duration::from_millis(25) * expected as u32
}

async fn read_reminders(
    client: &Client,
    expected: &BTreeSet<MessageId>,
) -> Vec<(MessageId, (u32, u64), std::time::SystemTime)> {
    let deadline = read_deadline(expected.len());
    let mut subscription =
        subscribe_retrying(client, "reminders", "final-reminders", deadline).await;
    let mut seen = Vec::new();
    let mut missing = expected.clone();
    // Past the last one, a little longer: copies fired twice show up.
    let mut quiet_until = None;
    while Instant::now() < deadline {
        if missing.is_empty() {
            let until = *quiet_until.get_or_insert(Instant::now() + Duration::from_secs(1));
            if Instant::now() >= until {
                break;
            }
        }
        if let Some(message) = next(&mut subscription, Duration::from_millis(300)).await {
            missing.remove(&message.id);
            seen.push((
                message.id,
                (message.partition, message.offset),
                message.timestamp,
            ));
            let _ = message.ack().await;
        }
    }
    seen
}

/// Acks made this long before the consumer left their node are expected
/// to be replicated: 50 ms of ack sync and a metadata commit, which may
/// wait for an election (2.6 s at p99, BENCHMARKS.md), or two when the
/// schedule faults the new metadata leader 0.3 s after the last (4.7 s
/// was seen in a 200-episode run).
const ACK_WINDOW: Duration = Duration::from_secs(10);

const KEYS: u64 = 8;

fn parse(value: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(value).unwrap();
    let (key, seq) = text.split_once(':').unwrap();
    (key.parse().unwrap(), seq.parse().unwrap())
}

/// The groups' settings: a message whose member vanished (its node cut
/// off, its connection not yet seen closed) comes back within seconds,
/// and is never dead-lettered, so that what the checker waits for is the
/// cluster, not a backoff grown over many faults.
fn group_options() -> dmq_client::SubscribeOptions {
    let mut subscribe = options("m");
    subscribe.settings.ack_timeout_ms = Some(3_000);
    subscribe.settings.max_attempts = Some(10_000);
    subscribe.settings.backoff = Some(dmq_client::Backoff::Fixed {
        delays_ms: vec![100],
    });
    subscribe
}

async fn client_of(addr: SocketAddr) -> Option<Client> {
    let connect = Client::connect(addr.to_string(), ClientOptions::new("faults"));
    tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .ok()?
        .ok()
}

/// Sends keyed messages one at a time until `stop`, through `via`'s node
/// (the next node after a failed send).
async fn produce(
    addrs: Vec<SocketAddr>,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let pause = Duration::from_millis(5);
    send_one_at_a_time(
        addrs,
        stop,
        pause,
        |seq| {
            let key = seq % KEYS;
            let message = Message::new("orders", format!("{key}:{seq}")).key(format!("k{key}"));
            (message, (key, seq))
        },
        |sent_as, receipt| {
            let mut history = history.lock().unwrap();
            match receipt {
                Some(receipt) => {
                    history.acknowledged.push(receipt.id);
                    history.sent_as.insert(receipt.id, sent_as);
                }
                None => history.failed_sends += 1,
            }
        },
    )
    .await;
}

/// Sends one message at a time until `stop`, `pause` apart, through the
/// next node after a send that failed (or got no answer in 15 s):
/// `message(seq)` makes each (with what `done` should know of it),
/// `done(what, receipt)` records its outcome (`None`: failed or unknown).
async fn send_one_at_a_time<T>(
    addrs: Vec<SocketAddr>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    pause: Duration,
    mut message: impl FnMut(u64) -> (Message, T),
    mut done: impl FnMut(T, Option<dmq_client::SendReceipt>),
) {
    let mut via = 0;
    let mut seq = 0u64;
    let mut client: Option<(Client, dmq_client::Producer)> = None;
    while !*stop.borrow() {
        if client.is_none() {
            client = client_of(addrs[via]).await.map(|client| {
                let producer = client.producer();
                (client, producer)
            });
            if client.is_none() {
                via = (via + 1) % addrs.len();
                continue;
            }
        }
        let Some((_, producer)) = &client else {
            continue;
        };
        let (message, what) = message(seq);
        match tokio::time::timeout(Duration::from_secs(15), producer.send(message)).await {
            Ok(Ok(receipt)) => done(what, Some(receipt)),
            _ => {
                done(what, None);
                client = None;
                via = (via + 1) % addrs.len();
            }
        }
        seq += 1;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Consumes as group "checker" through node `via` (changed by the
/// schedule) until `stop`, acking every message.
async fn consume(
    addrs: Vec<SocketAddr>,
    ids: Vec<u64>,
    history: Arc<Mutex<History>>,
    mut via: tokio::sync::watch::Receiver<usize>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let node = *via.borrow_and_update();
        let Some(client) = client_of(addrs[node]).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let consumer = client.consumer();
        let subscribed = consumer.subscribe("orders", "checker", group_options());
        let Ok(Ok(mut subscription)) =
            tokio::time::timeout(Duration::from_secs(5), subscribed).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if *stop.borrow() || via.has_changed().unwrap_or(true) {
                let mut history = history.lock().unwrap();
                if let Some(on) = history.on.take() {
                    history.left(on, Instant::now());
                }
                break;
            }
            let Some(message) = next(&mut subscription, Duration::from_millis(200)).await else {
                continue;
            };
            let (key, seq) = parse(&message.value);
            let on = serving_node(&client, &ids).await.unwrap_or(node);
            {
                let mut history = history.lock().unwrap();
                if let Some(left) = history.on.replace(on).filter(|&left| left != on) {
                    // Sent to another node: noticed now, unless the fault
                    // schedule saw it leave first.
                    history.left(left, Instant::now());
                }
                if let Some(&(acked_on, at)) = history.acked_at.get(&message.id) {
                    // Measured to when the consumer left the node it acked
                    // through, also when it is back there now: that node
                    // may have been killed moments after the ack, before
                    // syncing it (a seed-51 lease-on campaign saw an ack
                    // made 13 ms before a SIGKILL come back 16 s later at
                    // the restarted node, which the checker took for a
                    // 16 s late redelivery).
                    let reference = match history.left_at[acked_on] {
                        Some(left) if left > at => left,
                        _ => Instant::now(),
                    };
                    if reference - at > ACK_WINDOW {
                        // For a post-mortem (DMQ_KEEP_DATA=1 keeps the
                        // nodes' data): which message, where, when.
                        println!(
                            "late: {} (partition {} offset {} attempt {}) acked through node \
                             {} {:?} ago, delivered again through node {}; left that node \
                             {:?} ago",
                            message.id,
                            message.partition,
                            message.offset,
                            message.attempt,
                            ids[acked_on],
                            at.elapsed(),
                            ids[on],
                            history.left_at[acked_on].map(|left| left.elapsed()),
                        );
                    }
                    history.redelivered_after_ack.push(reference - at);
                }
                history
                    .delivered
                    .push((message.id, key, seq, message.partition, message.offset));
            }
            let id = message.id;
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), message.ack()).await {
                history.lock().unwrap().acked(id, on);
            }
        }
    }
}

/// The index (in `ids`) of the node `client` is connected to, as its
/// HELLO_OK said.
async fn serving_node(client: &Client, ids: &[u64]) -> Option<usize> {
    let info = tokio::time::timeout(Duration::from_secs(1), client.server_info())
        .await
        .ok()?
        .ok()?;
    let id: u64 = info.broker_id.parse().ok()?;
    ids.iter().position(|known| *known == id)
}

fn signal(node: &Node, signal: &str) {
    if let Some(process) = &node.process {
        std::process::Command::new("kill")
            .args([signal, &process.id().to_string()])
            .status()
            .unwrap();
    }
}

/// Consumes every message as a new group through `client` until the
/// `expected` ids arrived or 60 s (and 10 ms per id) passed; returns the
/// deliveries in order.
async fn read_all(
    client: &Client,
    group: &str,
    expected: &BTreeSet<MessageId>,
) -> Vec<(MessageId, u64, u64)> {
    let deadline = read_deadline(expected.len());
    let mut subscription = subscribe_retrying(client, "orders", group, deadline).await;
    let mut seen = Vec::new();
    let mut missing = expected.clone();
    while !missing.is_empty() && Instant::now() < deadline {
        if let Some(message) = next(&mut subscription, Duration::from_secs(1)).await {
            let (key, seq) = parse(&message.value);
            missing.remove(&message.id);
            seen.push((message.id, key, seq));
            // The serving node may change meanwhile (its connection is
            // then closed): an ack lost with it brings the message again.
            let _ = message.ack().await;
        }
    }
    seen
}

/// Subscribes a new group, retrying `Unavailable` until `deadline`: its
/// first SUBSCRIBE needs the metadata group (its dead-letter topic is made
/// a cluster topic), which right after the faults heal may be electing.
async fn subscribe_retrying(
    client: &Client,
    topic: &str,
    group: &str,
    deadline: Instant,
) -> dmq_client::Subscription {
    loop {
        match client
            .consumer()
            .subscribe(topic, group, group_options())
            .await
        {
            Ok(subscription) => return subscription,
            Err(dmq_client::ClientError::Broker {
                code: dmq_protocol::ErrorCode::Unavailable | dmq_protocol::ErrorCode::WrongNode,
                message,
            }) if Instant::now() < deadline => {
                println!("subscribe {group}: unavailable ({message}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("subscribe {group}: {error}"),
        }
    }
}

/// Per key, the acknowledged messages among `deliveries` (first
/// deliveries only) come in the order they were sent.
fn assert_key_order(what: &str, deliveries: &[(MessageId, u64, u64)], acked: &HashSet<MessageId>) {
    let mut first = HashSet::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    for (id, key, seq) in deliveries {
        if !acked.contains(id) || !first.insert(*id) {
            continue;
        }
        if let Some(before) = last_seq.insert(*key, *seq) {
            assert!(
                before < *seq,
                "{what}: key {key} delivered seq {seq} after seq {before}"
            );
        }
    }
}

/// Three nodes, each serving Raft behind a proxy of `network`, started;
/// and their configurations.
async fn proxied_cluster(
    root: &std::path::Path,
    network: &Network,
    edit: fn(&str) -> String,
) -> (Vec<Node>, Vec<String>) {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let raft = std::net::TcpListener::bind((node_ip(id), 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let advertised_raft = proxy.local_addr().unwrap();
        tokio::spawn(network.clone().proxy(proxy, id, raft));
        nodes.push(Node {
            id,
            client: free_port(),
            admin: free_port(),
            raft,
            advertised_raft,
            source_ip: Some(node_ip(id)),
            dir: root.join(format!("node{id}")),
            process: None,
        });
    }
    let configs: Vec<String> = nodes
        .iter()
        .map(|node| edit(&node.config(&nodes)))
        .collect();
    for (node, config) in nodes.iter_mut().zip(&configs) {
        node.start(config);
    }
    (nodes, configs)
}

/// The node serving consumers is cut off from its peers while a member
/// connected to it holds 20 messages unacked (1 s ack timeout). Another
/// node takes over and a second member gets and acks the 20 there. The
/// cut-off node believes it still leads (no higher term reaches it), but
/// its lease ran out: it never gives the 20 to the first member again
/// (without the lease it redelivers them after their ack timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_cut_off_stops_delivering_within_its_lease() {
    let root = tempfile::tempdir().unwrap();
    let network = Network::default();
    let (nodes, _configs) = proxied_cluster(root.path(), &network, with_consumer_lease).await;
    let setup = connect(&nodes[0]).await;
    setup.create_topic("orders", 1, false).await.unwrap();
    wait_for_topic_on(&nodes, "orders").await;
    let home = metadata_leader(&nodes, Duration::from_secs(30))
        .await
        .expect("no metadata leader within 30 s");
    let others = (0..nodes.len())
        .filter(|&i| i != home)
        .map(|i| nodes[i].client.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut settings = options("m");
    settings.settings.ack_timeout_ms = Some(1_000);
    settings.settings.max_attempts = Some(1_000);

    let at_home = Client::connect(nodes[home].client.to_string(), ClientOptions::new("cut"))
        .await
        .unwrap();
    let mut first = subscribe_retrying_with(&at_home, "held", settings.clone()).await;
    let sender = Client::connect(others.clone(), ClientOptions::new("cut"))
        .await
        .unwrap();
    let mut sent = BTreeSet::new();
    for i in 0..20 {
        let receipt = sender
            .producer()
            .send(Message::new("orders", format!("0:{i}")))
            .await
            .unwrap();
        sent.insert(receipt.id);
    }
    let mut held = Vec::new();
    while held.len() < sent.len() {
        let message = next(&mut first, Duration::from_secs(10))
            .await
            .expect("a delivery from the serving node");
        held.push(message);
    }

    network.isolate(nodes[home].id, &[1, 2, 3]);
    let elsewhere = Client::connect(others, ClientOptions::new("cut"))
        .await
        .unwrap();
    let mut second = subscribe_retrying_with(&elsewhere, "held", settings).await;
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < sent.len() && Instant::now() < deadline {
        if let Some(message) = next(&mut second, Duration::from_secs(1)).await {
            acked.insert(message.id);
            let _ = message.ack().await;
        }
    }
    assert_eq!(
        acked, sent,
        "the next serving node delivers the held messages"
    );

    // Past the held messages' ack timeout, twice over.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Some(message) = next(&mut first, Duration::from_millis(200)).await {
            panic!(
                "the cut-off node delivered {} (attempt {}) after its lease ran out",
                message.id, message.attempt
            );
        }
    }
    drop(held);
    network.heal();
}

/// [`subscribe_retrying`] with the given options.
async fn subscribe_retrying_with(
    client: &Client,
    group: &str,
    options: dmq_client::SubscribeOptions,
) -> dmq_client::Subscription {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client
            .consumer()
            .subscribe("orders", group, options.clone())
            .await
        {
            Ok(subscription) => return subscription,
            Err(error) if Instant::now() < deadline => {
                println!("subscribe {group}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("subscribe {group}: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kills_pauses_partitions_and_slow_links() {
    let episodes = env_count("DMQ_CLUSTER_FAULTS", 50);
    let seed = env_count("DMQ_TEST_SEED", 0x5eed_f00d).max(1);
    println!("fault schedule: {episodes} episodes, DMQ_TEST_SEED={seed}");
    let root = tempfile::tempdir().unwrap();
    if std::env::var_os("DMQ_KEEP_DATA").is_some() {
        println!("data kept in {}", root.path().display());
    }
    let root = KeptOnFailure(Some(root));
    let network = Network::default();
    // With the consumer lease on, as dmqd's default (one node serves every
    // consumer); by hand, `DMQ_CLUSTER_LEASE=0` runs it with the lease off.
    let lease = std::env::var("DMQ_CLUSTER_LEASE").map_or(true, |value| value != "0");
    println!("consumer lease: {}", if lease { "on" } else { "off" });
    // By hand, `DMQ_CLUSTER_BALANCE_S=<s>` has the metadata leader move
    // leaderships by itself that often (`leader_balance_interval_s`), so
    // that transfers meet the faults.
    let edit: fn(&str) -> String = if lease {
        |config| with_balance_from_env(&with_consumer_lease(config))
    } else {
        with_balance_from_env
    };
    let (mut nodes, configs) = proxied_cluster(root.path(), &network, edit).await;
    let setup = connect(&nodes[0]).await;
    setup.create_topic("orders", 2, true).await.unwrap();
    setup.create_topic("reminders", 2, false).await.unwrap();
    for node in &nodes {
        let client = connect(node).await;
        wait_for_topic(&client, "orders").await;
        wait_for_topic(&client, "reminders").await;
    }
    drop(setup);

    let addrs: Vec<SocketAddr> = nodes.iter().map(|node| node.client).collect();
    let ids: Vec<u64> = nodes.iter().map(|node| node.id).collect();
    let history = Arc::new(Mutex::new(History::default()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (via_tx, via) = tokio::sync::watch::channel(1usize);
    let producer = tokio::spawn(produce(addrs.clone(), Arc::clone(&history), stop.clone()));
    let delayed_history = Arc::new(Mutex::new(DelayedHistory::default()));
    let delayed_producer = tokio::spawn(produce_delayed(
        addrs.clone(),
        Arc::clone(&delayed_history),
        stop.clone(),
    ));
    let consumer = tokio::spawn(consume(
        addrs.clone(),
        ids.clone(),
        Arc::clone(&history),
        via,
        stop.clone(),
    ));

    let mut rng = Rng(seed);
    let mut applied: BTreeMap<&str, u64> = BTreeMap::new();
    let begun = Instant::now();
    // By hand, `DMQ_CLUSTER_DAMAGE=1` adds a fifth fault: SIGKILL, one
    // byte of one replica's active segment flipped, restart (the replica
    // cuts the damage and fetches the records from a peer).
    let mut kinds = vec!["kill", "pause", "partition", "slow"];
    if std::env::var_os("DMQ_CLUSTER_DAMAGE").is_some() {
        kinds.push("damage");
    }
    // By hand, `DMQ_CLUSTER_OPERATIONS=1` adds three operations: a random
    // group's leadership moved to the node (`transfer-leader`, asked
    // through a random node), a clean stop (SIGTERM: the node hands its
    // leaderships over first) and restart, and a lost disk: SIGKILL, the
    // data directory deleted, `replace` through another node, the node
    // started empty, and the next episode only once no node is shown
    // `replacing` (until then some groups have two voters: a second loss
    // would stop them, as Raft must).
    if std::env::var_os("DMQ_CLUSTER_OPERATIONS").is_some() {
        kinds.extend(["transfer", "stop", "replace"]);
    }
    for episode in 0..episodes {
        let target = match (rng.below(2), metadata_leader(&nodes, Duration::ZERO).await) {
            (0, Some(leader)) => leader,
            _ => rng.below(3) as usize,
        };
        // The consumer moves off the faulted node (with the consumer
        // lease, it is sent to the next serving node if it was there).
        if *via_tx.borrow() == target {
            via_tx.send((target + 1) % 3).unwrap();
        }
        let lasting = Duration::from_millis(300 + rng.below(1200));
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        *applied.entry(kind).or_default() += 1;
        {
            let mut history = history.lock().unwrap();
            if history.on == Some(target) && kind != "slow" {
                history.left(target, Instant::now());
            }
        }
        let id = nodes[target].id;
        println!(
            "episode {episode} at +{:.1} s: {kind} node {id} for {lasting:?}",
            begun.elapsed().as_secs_f64()
        );
        match kind {
            "kill" => {
                nodes[target].kill();
                tokio::time::sleep(lasting).await;
                nodes[target].start(&configs[target]);
                connect(&nodes[target]).await;
            }
            "damage" => {
                nodes[target].kill();
                let partitions = nodes[target].dir.join("data/cluster/partitions");
                let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(&partitions)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .flat_map(|topic| std::fs::read_dir(topic.path()).into_iter().flatten())
                    .flatten()
                    .map(|partition| partition.path().join("log"))
                    .collect();
                logs.sort();
                if !logs.is_empty() {
                    let log = &logs[rng.below(logs.len() as u64) as usize];
                    let at = rng.below(1000) as f64 / 1000.0;
                    if damage_active_segment(log, at) {
                        println!("damaged {} at {at}", log.display());
                    }
                }
                tokio::time::sleep(lasting).await;
                nodes[target].start(&configs[target]);
                connect(&nodes[target]).await;
            }
            "transfer" => {
                let api = Api::new(nodes[rng.below(3) as usize].admin, None);
                let pick = rng.below(1 << 16);
                let moved = http(move || {
                    let (code, status) = api.call("GET", "/api/cluster", None);
                    if code != 200 {
                        return format!("no status ({code})");
                    }
                    let mut groups = vec!["meta".to_string()];
                    for partition in status["partitions"].as_array().into_iter().flatten() {
                        if let Some(group) = partition["raft"]["group"].as_str() {
                            groups.push(group.to_string());
                        }
                    }
                    let group = &groups[pick as usize % groups.len()];
                    let body = serde_json::json!({"group": group, "to": id}).to_string();
                    let (code, answer) =
                        api.call("POST", "/api/cluster/transfer-leader", Some(&body));
                    format!("{group}: {code} {answer}")
                })
                .await;
                println!("transfer to node {id}: {moved}");
                tokio::time::sleep(lasting).await;
            }
            "replace" => {
                nodes[target].kill();
                std::fs::remove_dir_all(nodes[target].dir.join("data")).unwrap();
                let through = (target + 1 + rng.below(2) as usize) % 3;
                let api = Api::new(nodes[through].admin, None);
                let replaced = Instant::now();
                loop {
                    let asked = api.clone();
                    let path = format!("/api/cluster/nodes/{id}/replace");
                    let (code, answer) = http(move || asked.call("POST", &path, None)).await;
                    if code == 200 {
                        break;
                    }
                    assert!(
                        replaced.elapsed() < Duration::from_secs(60),
                        "replace node {id}: {code} {answer}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                tokio::time::sleep(lasting).await;
                nodes[target].start(&configs[target]);
                connect(&nodes[target]).await;
                loop {
                    let asked = api.clone();
                    let (code, status) =
                        http(move || asked.call("GET", "/api/cluster", None)).await;
                    let over = code == 200
                        && status["peers"]
                            .as_array()
                            .is_some_and(|peers| peers.iter().all(|p| p["replacing"] == false));
                    if over {
                        break;
                    }
                    assert!(
                        replaced.elapsed() < Duration::from_secs(120),
                        "node {id}'s replacement not over: {status}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                println!("node {id} replaced in {:?}", replaced.elapsed());
            }
            "stop" => {
                nodes[target].stop();
                tokio::time::sleep(lasting).await;
                nodes[target].start(&configs[target]);
                connect(&nodes[target]).await;
            }
            "pause" => {
                signal(&nodes[target], "-STOP");
                tokio::time::sleep(lasting).await;
                signal(&nodes[target], "-CONT");
            }
            "partition" => {
                network.isolate(id, &ids);
                tokio::time::sleep(lasting).await;
                network.heal();
            }
            _ => {
                network.slow(id, Duration::from_millis(20 + rng.below(80)));
                tokio::time::sleep(lasting).await;
                network.heal();
            }
        }
        if episode % 10 == 9 {
            let history = history.lock().unwrap();
            println!(
                "after {} episodes: {} produces acknowledged, {} failed, {} deliveries",
                episode + 1,
                history.acknowledged.len(),
                history.failed_sends,
                history.delivered.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("faults applied: {applied:?}");

    // Healed: a little more traffic, then everything stops.
    network.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    producer.await.unwrap();
    delayed_producer.await.unwrap();
    let acknowledged: Vec<MessageId> = history.lock().unwrap().acknowledged.clone();
    let acked_ids: BTreeSet<MessageId> = acknowledged.iter().copied().collect();
    let acked_set: HashSet<MessageId> = acked_ids.iter().copied().collect();
    assert!(
        acknowledged.len() > 100,
        "too few produces acknowledged: {}",
        acknowledged.len()
    );

    // The running group gets the rest through one node. The consumer is
    // stopped before its deliveries are read: it may be between taking a
    // message and acking it, and one it acks after the read would be
    // counted missing although its group has it acked (seed 918235039
    // failed so on the last message produced, delivered and acked 6 ms
    // after the producers stopped). Stopped at an await, it has either
    // recorded a message before acking it, or not acked it.
    consumer.abort();
    let _ = consumer.await;
    let mut restarted_consumer = None;
    {
        let delivered: HashSet<MessageId> = history
            .lock()
            .unwrap()
            .delivered
            .iter()
            .map(|d| d.0)
            .collect();
        let missing: BTreeSet<MessageId> = acked_ids
            .iter()
            .filter(|id| !delivered.contains(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            let client = connect(&nodes[0]).await;
            let rest = read_all(&client, "checker", &missing).await;
            let got: HashSet<MessageId> = rest.iter().map(|d| d.0).collect();
            let lost: Vec<MessageId> = missing
                .iter()
                .filter(|id| !got.contains(id))
                .copied()
                .collect();
            if !lost.is_empty() {
                let sent_as: Vec<_> = {
                    let history = history.lock().unwrap();
                    lost.iter()
                        .map(|id| (*id, history.sent_as.get(id).copied()))
                        .collect()
                };
                for node in nodes.iter_mut() {
                    node.stop();
                }
                let mut where_stored = Vec::new();
                for node in &nodes {
                    for partition in 0..2 {
                        for (offset, id, value) in replica_records(node, partition) {
                            if lost.contains(&id) {
                                where_stored.push((node.id, partition, offset, value));
                            }
                        }
                    }
                }
                panic!(
                    "{} acknowledged messages never reached the running group: {sent_as:?}; \
                     stored at (node, partition, offset, value): {where_stored:?}",
                    lost.len()
                );
            }
            restarted_consumer = Some(rest.len());
        }
    }

    // Every node delivers every acknowledged message to a new group, per
    // key in the order they were sent.
    for node in &nodes {
        let client = connect(node).await;
        let group = format!("final-{}", node.id);
        let deliveries = read_all(&client, &group, &acked_ids).await;
        let got: HashSet<MessageId> = deliveries.iter().map(|d| d.0).collect();
        let lost = acked_ids.iter().filter(|id| !got.contains(id)).count();
        if lost > 0 {
            let api = Api::new(node.admin, None);
            let status = http(move || api.try_call("GET", "/api/cluster", None)).await;
            let log = std::fs::read_to_string(node.dir.join("dmqd.log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|line| !line.starts_with(' '))
                .rev()
                .take(40)
                .collect();
            panic!(
                "node {}: {lost} acknowledged messages not delivered to a new group; \
                 its /api/cluster: {status:?}\nits log's end:\n{}",
                node.id,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        assert_key_order(&format!("node {}", node.id), &deliveries, &acked_set);
    }

    // Every acknowledged delayed message fired, into its topic no earlier
    // than its due time.
    {
        let (due, failed): (HashMap<MessageId, i64>, u64) = {
            let delayed = delayed_history.lock().unwrap();
            (
                delayed.acknowledged.iter().copied().collect(),
                delayed.failed_sends,
            )
        };
        let expected: BTreeSet<MessageId> = due.keys().copied().collect();
        assert!(
            expected.len() > 20,
            "too few delayed produces acknowledged: {}",
            expected.len()
        );
        let client = connect(&nodes[0]).await;
        let seen = read_reminders(&client, &expected).await;
        let got: HashSet<MessageId> = seen.iter().map(|(id, ..)| *id).collect();
        let stored: HashSet<(u32, u64)> = seen.iter().map(|(_, at, _)| *at).collect();
        let lost: Vec<&MessageId> = expected.iter().filter(|id| !got.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged delayed messages never fired: {lost:?}",
            lost.len()
        );
        let early: Vec<(MessageId, i64)> = seen
            .iter()
            .filter_map(|(id, _, stored)| {
                let stored = dmq_client::time::system_time_to_ms(*stored);
                let due = due.get(id)?;
                (stored < *due).then_some((*id, due - stored))
            })
            .collect();
        assert!(
            early.is_empty(),
            "delayed messages stored in their topic before their due time (id, ms early): \
             {early:?}"
        );
        println!(
            "delays: {} acknowledged ({failed} failed or unknown), all fired, none early; {} \
             copies fired again by a new timer leader, {} deliveries again of one copy",
            expected.len(),
            stored.len() - got.len(),
            seen.len() - stored.len()
        );
    }

    // Stored in send order per key: within a partition, offsets grow with
    // the sequence number (the running group saw partition and offset).
    let history = history.lock().unwrap();
    let mut by_key: BTreeMap<u64, BTreeMap<u64, (u32, u64)>> = BTreeMap::new();
    for (id, key, seq, partition, offset) in &history.delivered {
        if acked_set.contains(id) {
            by_key
                .entry(*key)
                .or_default()
                .insert(*seq, (*partition, *offset));
        }
    }
    for (key, stored) in &by_key {
        let positions: Vec<&(u32, u64)> = stored.values().collect();
        for pair in positions.windows(2) {
            assert_eq!(pair[0].0, pair[1].0, "key {key} moved partition");
            assert!(
                pair[0].1 < pair[1].1,
                "key {key} stored out of order: {pair:?}"
            );
        }
    }

    let mut again = history.redelivered_after_ack.clone();
    again.sort();
    println!(
        "checked: {} produces acknowledged ({} failed or unknown), {} deliveries to the running \
         group ({} more after healing), {} of a message it had acked (ack to leaving its node: \
         max {:?})",
        acknowledged.len(),
        history.failed_sends,
        history.delivered.len(),
        restarted_consumer.unwrap_or(0),
        again.len(),
        again.last()
    );
    let late: Vec<&Duration> = again.iter().filter(|d| **d > ACK_WINDOW).collect();
    assert!(
        late.is_empty(),
        "{} acked messages delivered again although acked over {ACK_WINDOW:?} before the \
         consumer left their node: {late:?}",
        late.len()
    );
    drop(history);

    // The replicas agree: stopped, each node's copy of each partition
    // holds the same records at the same offsets (up to the shortest, an
    // uncommitted tail aside), and every acknowledged record.
    for node in nodes.iter_mut() {
        node.stop();
    }
    for partition in 0..2 {
        let copies: Vec<Vec<(u64, MessageId, Vec<u8>)>> = nodes
            .iter()
            .map(|node| replica_records(node, partition))
            .collect();
        let shortest = copies.iter().map(Vec::len).min().unwrap_or(0);
        for (node, copy) in nodes.iter().zip(&copies).skip(1) {
            assert!(
                copy[..shortest] == copies[0][..shortest],
                "partition {partition}: node {} and node 1 hold different records",
                node.id
            );
        }
        // The acknowledged records of this partition: every copy has them.
        let acknowledged_here: HashSet<MessageId> = copies
            .iter()
            .flatten()
            .map(|record| record.1)
            .filter(|id| acked_set.contains(id))
            .collect();
        for (node, copy) in nodes.iter().zip(&copies) {
            let held: HashSet<MessageId> = copy.iter().map(|record| record.1).collect();
            let missing = acknowledged_here.difference(&held).count();
            assert_eq!(missing, 0, "node {} lacks acknowledged records", node.id);
        }
        println!("partition {partition}: replicas agree on {shortest} records");
    }
}

/// Every record of node `node`'s replica of partition `partition` of
/// "orders": offset, id and value (the node is stopped).
fn replica_records(node: &Node, partition: u32) -> Vec<(u64, MessageId, Vec<u8>)> {
    let dir = node
        .dir
        .join("data/cluster/partitions/orders")
        .join(partition.to_string())
        .join("log");
    let log = dmq_log_store::Log::open(&dir, dmq_log_store::LogConfig::default()).unwrap();
    let mut records = Vec::new();
    let mut offset = log.start_offset();
    loop {
        let batches = log.read(offset, 1 << 20).unwrap();
        if batches.is_empty() {
            return records;
        }
        for batch in batches {
            for record in batch.records() {
                let record = record.unwrap();
                if record.offset >= offset {
                    offset = record.offset + 1;
                    records.push((record.offset, MessageId(record.id.0), record.value.to_vec()));
                }
            }
        }
    }
}

/// By hand, on a run's kept data (`DMQ_KEEP_DATA=1`): compares the three
/// nodes' replicas of each partition record by record.
/// `DMQ_COMPARE_DIR=<dir> cargo test -p dmq-broker --test cluster_faults compare -- --ignored --nocapture`
#[test]
#[ignore = "by hand, on a kept data directory"]
fn compare_kept_replicas() {
    let dir = std::path::PathBuf::from(std::env::var("DMQ_COMPARE_DIR").unwrap());
    let nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            client: free_port(),
            admin: free_port(),
            raft: free_port(),
            advertised_raft: free_port(),
            source_ip: None,
            dir: dir.join(format!("node{id}")),
            process: None,
        })
        .collect();
    for partition in 0..2 {
        let copies: Vec<_> = nodes
            .iter()
            .map(|node| replica_records(node, partition))
            .collect();
        let lengths: Vec<usize> = copies.iter().map(Vec::len).collect();
        println!("partition {partition}: lengths {lengths:?}");
        let shortest = lengths.iter().copied().min().unwrap_or(0);
        for at in 0..shortest {
            let first = &copies[0][at];
            for (i, copy) in copies.iter().enumerate().skip(1) {
                if copy[at] != *first {
                    println!(
                        "partition {partition} offset {}: node 1 {:?} {:?}, node {} {:?} {:?}",
                        first.0,
                        first.1,
                        String::from_utf8_lossy(&first.2),
                        i + 1,
                        copy[at].1,
                        String::from_utf8_lossy(&copy[at].2)
                    );
                }
            }
        }
    }
}

/// `config` with `leader_balance_interval_s` from `DMQ_CLUSTER_BALANCE_S`,
/// if set (the default, 300 s, never comes in a campaign otherwise).
fn with_balance_from_env(config: &str) -> String {
    match std::env::var("DMQ_CLUSTER_BALANCE_S") {
        Ok(seconds) => {
            let seconds: u64 = seconds.parse().expect("DMQ_CLUSTER_BALANCE_S in seconds");
            let edited = config.replacen(
                "consumer_lease = ",
                &format!("leader_balance_interval_s = {seconds}\nconsumer_lease = "),
                1,
            );
            assert_ne!(edited, config, "the configuration sets consumer_lease");
            edited
        }
        Err(_) => config.to_string(),
    }
}
