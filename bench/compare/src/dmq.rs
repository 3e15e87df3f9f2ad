//! DMQ through `dmq-client`, with the settings of `dmq bench`: each
//! producer batches up to `batch` messages (1 ms linger) with up to
//! `window` unacknowledged sends; the consumer subscribes (push, credit
//! 5000) before the producers start and acks each message (the client
//! batches acks into ACK frames; the last ack's confirmation is awaited).
//!
//! [`run_cluster`] starts three `dmqd` nodes with a `[cluster]` section
//! (fsync `always`: a produce is answered once fsynced on two of the
//! three); every client is given the three addresses and connects to the
//! first; each producer sends every partition's batches to its leader
//! (`route_to_leaders`), or with `route` off through that first node,
//! which forwards them. The consumer follows `WrongNode` to the node
//! serving consumers. The partitions' leaders are printed before the run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use dmq_client::{Client, ClientOptions, Message, ProducerOptions, Start, SubscribeOptions};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use crate::server::{free_port, Server};
use crate::workload::{
    histogram, measure, record_delivery, stamped, Outcome, Shared, Workload, DRAIN_TIMEOUT,
    READY_TIMEOUT,
};

const TOPIC: &str = "compare";
const CREDIT: u32 = 5000;

async fn connect(addr: &str) -> Result<Client> {
    Client::connect(addr.to_owned(), ClientOptions::new("dmq-compare"))
        .await
        .with_context(|| format!("connecting to dmqd at {addr}"))
}

pub async fn run(dmqd: &str, fsync: &str, partitions: u32, workload: &Workload) -> Result<Outcome> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut server = Server::start("dmqd", dmqd, |dir| {
        Ok(vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            addr.clone(),
            "--fsync".into(),
            fsync.into(),
        ])
    })?;
    server.wait_for_port(port).await?;
    let admin = connect_when_ready(&addr, std::slice::from_mut(&mut server)).await?;
    admin
        .create_topic(TOPIC, partitions.max(1), false)
        .await
        .context("creating the topic")?;
    let outcome = drive(&addr, Start::Earliest, true, workload).await;
    drop(server);
    outcome
}

/// Three `dmqd` nodes of one cluster (see the module doc).
/// Where a cluster's producers send their batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// To each partition's leader (`route_to_leaders`).
    ToLeaders,
    /// Through the node each client connected to, which forwards.
    Forwarded,
}

pub async fn run_cluster(
    dmqd: &str,
    partitions: u32,
    routing: Routing,
    balance: bool,
    workload: &Workload,
) -> Result<Outcome> {
    // (client, admin, raft) ports per node.
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let mut peers = String::new();
    for (index, (client, _, raft)) in ports.iter().enumerate() {
        peers.push_str(&format!(
            "\n[[cluster.peers]]\nid = {}\nraft = \"127.0.0.1:{raft}\"\nclient = \"127.0.0.1:{client}\"\n",
            index + 1
        ));
    }
    let mut servers = Vec::new();
    for (index, (client, admin, raft)) in ports.iter().enumerate() {
        let peers = peers.clone();
        servers.push(Server::start("dmqd", dmqd, |dir| {
            let config = format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:{client}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 fsync = \"always\"\n\n[cluster]\nnode_id = {}\nraft_listen = \"127.0.0.1:{raft}\"\n{peers}",
                dir.join("data").display().to_string(),
                index + 1
            );
            let path = dir.join("dmqd.toml");
            std::fs::write(&path, config).context("writing dmqd.toml")?;
            Ok(vec!["--config".into(), path.display().to_string()])
        })?);
    }
    for (server, (client, _, _)) in servers.iter_mut().zip(&ports) {
        server.wait_for_port(*client).await?;
    }
    let addrs = ports
        .iter()
        .map(|(client, _, _)| format!("127.0.0.1:{client}"))
        .collect::<Vec<_>>()
        .join(",");
    let admin = connect_when_ready(&addrs, &mut servers).await?;
    let started = Instant::now();
    loop {
        match admin.create_topic(TOPIC, partitions.max(1), false).await {
            Ok(()) => break,
            Err(error) if started.elapsed() > READY_TIMEOUT => {
                return Err(error).context("creating the topic")
            }
            // The metadata group is still electing its leader.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Until every partition's group has a leader a produce fails: one
    // probe per partition, retried; the group then starts after them.
    let probe = admin.producer();
    for partition in 0..partitions.max(1) {
        loop {
            let message = Message::new(TOPIC, Bytes::from_static(b"probe")).partition(partition);
            match probe.send(message).await {
                Ok(_) => break,
                Err(error) if started.elapsed() > READY_TIMEOUT * 2 => {
                    return Err(error).context("a probe produce")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    if balance {
        let (_, admin_port, _) = ports[0];
        balance_leaders(admin_port).await?;
    }
    if let Ok(leaders) = admin.partition_leaders(TOPIC).await {
        let ids: Vec<u64> = leaders.iter().map(|leader| leader.node_id).collect();
        eprintln!("partition leaders (node ids, by partition): {ids:?}");
    }
    let route = routing == Routing::ToLeaders;
    let outcome = drive(&addrs, Start::Latest, route, workload).await;
    drop(servers);
    outcome
}

/// `POST /api/cluster/transfer-leader {"balance": true}` to the node whose
/// admin API listens on `port` (development mode: no token), then a second
/// for the new leaders to settle.
async fn balance_leaders(port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"balance": true}"#;
    let request = format!(
        "POST /api/cluster/transfer-leader HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting to the admin API")?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    if !answer.starts_with("HTTP/1.1 200") {
        anyhow::bail!("balancing the leaderships: {answer}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// A client of `addr`, retried while the servers start.
async fn connect_when_ready(addr: &str, servers: &mut [Server]) -> Result<Client> {
    let ready = Instant::now();
    loop {
        match connect(addr).await {
            Ok(client) => return Ok(client),
            Err(error) if ready.elapsed() > READY_TIMEOUT => return Err(error),
            Err(_) => {
                for server in servers.iter_mut() {
                    server.check_running()?;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The measurement proper: the consumer subscribes (from `start`), then
/// the producers send.
async fn drive(addr: &str, start: Start, route: bool, workload: &Workload) -> Result<Outcome> {
    let addr = addr.to_owned();

    let shared = Shared::new(workload.producers);
    let consumer_client = connect(&addr).await?;
    let subscription = consumer_client
        .consumer()
        .subscribe(
            TOPIC,
            "compare",
            SubscribeOptions {
                member_name: "compare-consumer".into(),
                start,
                credit_window: CREDIT,
                ..SubscribeOptions::default()
            },
        )
        .await
        .context("subscribing")?;

    let mut producer_clients = Vec::new();
    for _ in 0..workload.producers {
        producer_clients.push(connect(&addr).await?);
    }

    let consumer = consume(subscription, workload.messages, Arc::clone(&shared));
    let template = workload.template();
    let producers = producer_clients
        .iter()
        .enumerate()
        .map(|(index, client)| {
            let producer = client.producer_with(ProducerOptions {
                linger: Duration::from_millis(1),
                max_batch_messages: workload.batch,
                max_pending_messages: workload.window,
                route_to_leaders: route,
                ..ProducerOptions::default()
            });
            produce(
                producer,
                template.clone(),
                workload.share(index),
                workload.window,
                Arc::clone(&shared),
            )
        })
        .collect();
    measure(&shared, consumer, producers).await
}

async fn produce(
    producer: dmq_client::Producer,
    template: Bytes,
    count: u64,
    window: usize,
    shared: Arc<Shared>,
) -> Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut first_error = None;
    let mut record = |result: dmq_client::Result<dmq_client::SendReceipt>| match result {
        Ok(_) => {
            shared.produced.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            first_error.get_or_insert(error);
        }
    };
    for sent in 0..count {
        while in_flight.len() >= window {
            if let Some(result) = in_flight.next().await {
                record(result);
            }
        }
        in_flight.push(producer.send(Message::new(TOPIC, stamped(&template))));
        if sent % 64 == 63 {
            while let Some(Some(result)) = in_flight.next().now_or_never() {
                record(result);
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        record(result);
    }
    shared.producer_done();
    match first_error {
        Some(error) => Err(error).context("producing to DMQ"),
        None => Ok(()),
    }
}

async fn consume(
    mut subscription: dmq_client::Subscription,
    messages: u64,
    shared: Arc<Shared>,
) -> Result<(u64, hdrhistogram::Histogram<u64>)> {
    let mut latency = histogram()?;
    let mut consumed = 0u64;
    let mut last_ack = None;
    let mut idle_since = Instant::now();
    while !shared.consumer_finished(consumed, messages) {
        let message =
            match tokio::time::timeout(Duration::from_millis(100), subscription.recv()).await {
                Ok(Some(message)) => message.context("DMQ subscription failed")?,
                Ok(None) => break,
                Err(_) => {
                    if shared.producers_done.load(Ordering::SeqCst)
                        && idle_since.elapsed() > DRAIN_TIMEOUT
                    {
                        break;
                    }
                    continue;
                }
            };
        idle_since = Instant::now();
        record_delivery(&mut latency, &message.value);
        consumed += 1;
        // Queued at once and batched into ACK frames; only the last
        // confirmation is awaited (acks are confirmed in order).
        last_ack = Some(message.ack());
    }
    if let Some(ack) = last_ack {
        ack.await.context("the last ack")?;
    }
    Ok((consumed, latency))
}
