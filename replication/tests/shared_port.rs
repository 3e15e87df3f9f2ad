//! One Raft port per node for every group it hosts: three nodes, each
//! serving the metadata group and two partitions' replicas on one
//! address. Groups elect and replicate independently; one node going
//! away leaves every group working; a request for a group a node does not
//! serve is answered, not a broken connection.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use dmq_log_store::{LogConfig, RecordInput};
use dmq_replication::{
    partition_group, MetaResponse, MetadataNode, NodeConfig, PartitionCommand, PartitionNode,
    RaftRouter, ReplicatedBatch, TopicSpec,
};

use common::agreed_leader;

/// One node: its port and the three groups on it.
struct Node {
    router: RaftRouter,
    meta: MetadataNode,
    partitions: Vec<PartitionNode>,
}

async fn start_node(id: u64, dir: &Path) -> Node {
    let router = RaftRouter::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let config =
        |sub: &str| NodeConfig::new(id, dir.join(sub), "0.0.0.0:0".parse().expect("unused"));
    let meta = MetadataNode::start_on(&router, config("meta"))
        .await
        .expect("meta");
    let mut partitions = Vec::new();
    for p in 0..2 {
        partitions.push(
            PartitionNode::start_on(
                &router,
                config(&format!("orders-{p}")),
                &partition_group("orders", p),
                LogConfig::default(),
            )
            .await
            .expect("partition"),
        );
    }
    Node {
        router,
        meta,
        partitions,
    }
}

/// Three nodes, 1 to 3, each on its own directory in `dirs`.
async fn start_nodes(dirs: &[tempfile::TempDir]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(start_node(i as u64 + 1, dir.path()).await);
    }
    nodes
}

/// Forms each group from the first node.
async fn form_every_group(nodes: &[Node]) {
    let members: BTreeMap<u64, String> = nodes
        .iter()
        .map(|n| (n.meta.id(), n.router.addr().to_string()))
        .collect();
    nodes[0]
        .meta
        .initialize(members.clone())
        .await
        .expect("meta");
    for p in 0..2 {
        nodes[0].partitions[p]
            .initialize(members.clone())
            .await
            .expect("partition");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_of_a_node_shares_one_port() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_nodes(&dirs).await;
    for node in &nodes {
        assert_eq!(
            node.router.groups(),
            vec![
                "meta",
                "p/orders/0",
                "p/orders/1",
                "records/p/orders/0",
                "records/p/orders/1"
            ],
            "one port: three groups, and each partition's record service"
        );
        assert_eq!(node.meta.addr(), node.router.addr());
    }
    form_every_group(&nodes).await;
    let meta_group: Vec<&MetadataNode> = nodes.iter().map(|n| &n.meta).collect();
    let leader = agreed_leader(&meta_group, Duration::from_secs(10)).await;
    let leading = meta_group
        .iter()
        .find(|m| m.id() == leader)
        .expect("leader");
    assert_eq!(
        leading
            .create_topic(
                "orders",
                TopicSpec {
                    partitions: 2,
                    ordered: false
                }
            )
            .await
            .expect("create"),
        MetaResponse::Applied
    );
    for p in 0..2 {
        let replicas: Vec<&PartitionNode> = nodes.iter().map(|n| &n.partitions[p]).collect();
        let leader = agreed_leader(&replicas, Duration::from_secs(10)).await;
        let leading = replicas.iter().find(|r| r.id() == leader).expect("leader");
        let appended = leading
            .produce(vec![RecordInput::new(format!("p{p}"))])
            .await
            .expect("produce");
        assert_eq!(appended.base_offset, 0);
    }

    // The metadata leader's node goes away, every group on it at once
    // (it leads the partitions too: they were formed from it).
    let index = nodes
        .iter()
        .position(|n| n.meta.id() == leader)
        .expect("leader's node");
    let gone = nodes.remove(index);
    gone.meta.shutdown().await;
    for partition in gone.partitions {
        partition.shutdown().await;
    }
    gone.router.shutdown().await;
    let meta_group: Vec<&MetadataNode> = nodes.iter().map(|n| &n.meta).collect();
    let new_leader = agreed_leader(&meta_group, Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    meta_group
        .iter()
        .find(|m| m.id() == new_leader)
        .expect("leader")
        .create_topic(
            "payments",
            TopicSpec {
                partitions: 1,
                ordered: true,
            },
        )
        .await
        .expect("metadata after the loss");
    for p in 0..2 {
        let replicas: Vec<&PartitionNode> = nodes.iter().map(|n| &n.partitions[p]).collect();
        let leader = agreed_leader(&replicas, Duration::from_secs(10)).await;
        replicas
            .iter()
            .find(|r| r.id() == leader)
            .expect("leader")
            .produce(vec![RecordInput::new("after")])
            .await
            .expect("produce after the loss");
    }
    for node in nodes {
        node.meta.shutdown().await;
        for partition in node.partitions {
            partition.shutdown().await;
        }
        node.router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_group_not_served_is_answered_and_the_connection_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let router = RaftRouter::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let mut stream = tokio::net::TcpStream::connect(router.addr())
        .await
        .expect("connect");
    for _ in 0..2 {
        let name = b"p/none/0";
        let mut frame = Vec::new();
        frame.extend_from_slice(&((2 + name.len() + 3) as u32).to_le_bytes());
        frame.extend_from_slice(&(name.len() as u16).to_le_bytes());
        frame.extend_from_slice(name);
        frame.extend_from_slice(b"xyz");
        stream.write_all(&frame).await.expect("send");
        let mut reply = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(reply, [1, 0, 0, 0, 1], "length 1, unknown group");
    }
    router.shutdown().await;
}

/// A node that stops the way a broker does (its port refuses new
/// requests, lets those in progress finish, its groups stop, then the port
/// lingers until no write is forwarded to it any more) fails no write
/// forwarded to it: 64 writers on the other nodes keep forwarding to it
/// until they elect a new leader, and each write is answered, never left
/// with an unknown outcome. With the port stopped at once, 2 runs in 10
/// failed ("outcome unknown: connection reset by peer"); with a fixed
/// linger of two election timeouts, 1 in about 150 (the writers forwarded
/// here for up to 0.9 s after the stop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_fails_no_write_forwarded_to_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_nodes(&dirs).await;
    form_every_group(&nodes).await;
    let replicas: Vec<&PartitionNode> = nodes.iter().map(|n| &n.partitions[0]).collect();
    let leader = agreed_leader(&replicas, Duration::from_secs(10)).await;
    let index = nodes
        .iter()
        .position(|n| n.partitions[0].id() == leader)
        .expect("leader's node");
    let gone = nodes.remove(index);
    let nodes = Arc::new(nodes);

    // Writers on the two other nodes: each write is forwarded to the
    // leader until they elect another.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..64 {
        let (nodes, stop) = (Arc::clone(&nodes), Arc::clone(&stop));
        writers.spawn(async move {
            let mut written = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let batch = ReplicatedBatch::propose(vec![RecordInput::new(format!("w{w}"))]);
                nodes[w % 2].partitions[0]
                    .write(PartitionCommand::Batch(batch))
                    .await
                    .unwrap_or_else(|e| panic!("writer {w}, write {written}: {e}"));
                written += 1;
            }
            written
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gone.router.close_and_drain(Duration::from_secs(5)).await;
    gone.meta.shutdown().await;
    for partition in gone.partitions {
        partition.shutdown().await;
    }
    let election_max =
        NodeConfig::new(0, dirs[0].path().into(), "0.0.0.0:0".parse().expect("addr"))
            .election_timeout_ms
            .1;
    gone.router
        .linger_then_shutdown(Duration::from_millis(election_max), Duration::from_secs(5))
        .await;
    // The writers carry on at the new leader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    while let Some(written) = writers.join_next().await {
        total += written.expect("no write failed");
    }
    assert!(total > 8, "{total} writes");
    let nodes = Arc::into_inner(nodes).expect("writers done");
    for node in nodes {
        node.meta.shutdown().await;
        for partition in node.partitions {
            partition.shutdown().await;
        }
        node.router.shutdown().await;
    }
}
