//! Three metadata nodes on 127.0.0.1 in one process: election,
//! replication, the leader's loss, a restart that catches up (through a
//! snapshot when the log it missed was purged) and a whole-cluster
//! restart from disk.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dmq_replication::{MetaResponse, MetadataNode, NodeConfig, NodeError, TopicSpec};

use common::{agreed_leader, by_id, form_group};

const SPEC: TopicSpec = TopicSpec {
    partitions: 4,
    ordered: false,
};

fn config(id: u64, dir: PathBuf, listen: SocketAddr) -> NodeConfig {
    let mut config = NodeConfig::new(id, dir, listen);
    config.snapshot_after_logs = 50;
    config
}

async fn start_cluster(dirs: &[tempfile::TempDir]) -> Vec<MetadataNode> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let node = MetadataNode::start(config(i as u64 + 1, dir.path().to_path_buf(), listen))
            .await
            .expect("start");
        nodes.push(node);
    }
    form_group(&nodes).await;
    nodes
}

async fn applied_everywhere(nodes: &[&MetadataNode], topics: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = nodes.iter().all(|node| {
            let applied = node.topics_applied_here();
            topics.iter().all(|topic| applied.contains_key(*topic))
        });
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not applied everywhere: {topics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_and_catch_up() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_cluster(&dirs).await;
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;

    // Writes go through the leader and reach every node.
    let leading = by_id(&nodes, leader);
    assert_eq!(
        leading.create_topic("orders", SPEC).await.expect("create"),
        MetaResponse::Applied
    );
    assert_eq!(
        leading.create_topic("orders", SPEC).await.expect("again"),
        MetaResponse::TopicExists
    );
    let zero = TopicSpec {
        partitions: 0,
        ordered: true,
    };
    assert_eq!(
        leading.create_topic("empty", zero).await.expect("zero"),
        MetaResponse::InvalidPartitions
    );
    assert_eq!(leading.topics().await.expect("read").len(), 1);
    // A follower refuses and names the leader.
    let follower = nodes
        .iter()
        .find(|node| node.id() != leader)
        .expect("follower");
    match follower.create_topic("payments", SPEC).await {
        Err(NodeError::NotLeader {
            leader: Some(named),
            addr: Some(_),
        }) => assert_eq!(named, leader),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    applied_everywhere(&all, &["orders"], Duration::from_secs(5)).await;

    // The leader goes away: the other two elect a new one and go on.
    let index = nodes
        .iter()
        .position(|node| node.id() == leader)
        .expect("leader");
    let gone = nodes.remove(index);
    let (gone_id, gone_addr) = (gone.id(), gone.addr());
    assert_eq!(gone.raft().metrics().borrow().snapshot, None);
    gone.shutdown().await;
    let lost_at = Instant::now();
    let survivors: Vec<&MetadataNode> = nodes.iter().collect();
    let new_leader = agreed_leader(&survivors, Duration::from_secs(10)).await;
    assert_ne!(new_leader, gone_id);
    by_id(&nodes, new_leader)
        .create_topic("payments", SPEC)
        .await
        .expect("write after failover");
    let failover = lost_at.elapsed();
    eprintln!("leader lost: a write succeeded again after {failover:?}");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    // Enough writes while it is down that its missing entries are purged:
    // it can only catch up from a snapshot.
    for i in 0..120 {
        by_id(&nodes, new_leader)
            .create_topic(&format!("t{i}"), SPEC)
            .await
            .expect("write");
    }

    // It comes back on its address with its disk, and catches up.
    let back = MetadataNode::start(config(
        gone_id,
        dirs[gone_id as usize - 1].path().to_path_buf(),
        gone_addr,
    ))
    .await
    .expect("restart");
    nodes.push(back);
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    applied_everywhere(
        &all,
        &["orders", "payments", "t0", "t119"],
        Duration::from_secs(10),
    )
    .await;
    // The entries it missed were purged from the leader's log: it was
    // sent a snapshot, which it keeps.
    let purged = by_id(&nodes, new_leader).raft().metrics().borrow().purged;
    assert!(
        purged.is_some_and(|p| p.index > 10),
        "leader purged {purged:?}"
    );
    let returned = by_id(&nodes, gone_id);
    assert!(returned.raft().metrics().borrow().snapshot.is_some());
    assert!(dirs[gone_id as usize - 1]
        .path()
        .join("metadata.snapshot")
        .exists());
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let expected = by_id(&nodes, leader).topics().await.expect("read");
    assert_eq!(expected.len(), 122);
    for node in &nodes {
        let applied = node.topics_applied_here();
        assert_eq!(applied, expected, "node {}", node.id());
    }
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_keeps_every_committed_write() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let nodes = start_cluster(&dirs).await;
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    for i in 0..70 {
        by_id(&nodes, leader)
            .create_topic(&format!("t{i}"), SPEC)
            .await
            .expect("write");
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(MetadataNode::addr).collect();
    for node in nodes {
        node.shutdown().await;
    }
    // Every node stopped; all start again from their directories.
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let node = MetadataNode::start(config(i as u64 + 1, dir.path().to_path_buf(), addrs[i]))
            .await
            .expect("restart");
        nodes.push(node);
    }
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let topics = by_id(&nodes, leader).topics().await.expect("read");
    let missing: Vec<String> = (0..70)
        .map(|i| format!("t{i}"))
        .filter(|t| !topics.contains_key(t))
        .collect();
    assert!(
        missing.is_empty(),
        "lost after a whole-cluster restart: {missing:?}"
    );
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_raft_port_closes_that_connection_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let nodes = start_cluster(&dirs).await;
    let all: Vec<&MetadataNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    for node in &nodes {
        for hostile in [
            u32::MAX.to_le_bytes().to_vec(),
            [&5u32.to_le_bytes()[..], b"{{{{{"].concat(),
            [&2u32.to_le_bytes()[..], b"{}"].concat(),
        ] {
            let mut stream = tokio::net::TcpStream::connect(node.addr())
                .await
                .expect("connect");
            stream.write_all(&hostile).await.expect("send");
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("closed in time");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "connection closed: {read:?}"
            );
        }
    }
    // The cluster is unharmed.
    assert_eq!(
        by_id(&nodes, leader)
            .create_topic("after", SPEC)
            .await
            .expect("write"),
        MetaResponse::Applied
    );
    applied_everywhere(&all, &["after"], Duration::from_secs(5)).await;
    for node in nodes {
        node.shutdown().await;
    }
}
