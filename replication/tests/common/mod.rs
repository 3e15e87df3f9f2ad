//! Helpers shared by the multi-node tests: forming a group, finding its
//! leader, finding a node.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dmq_replication::network::GroupTypes;
use dmq_replication::{GroupNode, NodeConfig, PartitionNode};

/// Forms a group of `nodes` (initialized from the first one).
pub async fn form_group<C: GroupTypes, S>(nodes: &[GroupNode<C, S>]) {
    let members: BTreeMap<u64, String> = nodes
        .iter()
        .map(|node| (node.id(), node.addr().to_string()))
        .collect();
    nodes[0].initialize(members).await.expect("initialize");
}

/// The node that all of `nodes` agree leads, within `within`.
pub async fn agreed_leader<C: GroupTypes, S>(nodes: &[&GroupNode<C, S>], within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for node in nodes {
            leaders.push(node.leader().await);
        }
        if let Some(Some(leader)) = leaders.first() {
            let known = nodes.iter().any(|node| node.id() == *leader);
            if known && leaders.iter().all(|l| *l == Some(*leader)) {
                return *leader;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node with id `id`.
pub fn by_id<C: GroupTypes, S>(nodes: &[GroupNode<C, S>], id: u64) -> &GroupNode<C, S> {
    nodes.iter().find(|node| node.id() == id).expect("node")
}

/// Waits until `node` applied every record below `end` (committed).
pub async fn applied(node: &PartitionNode, end: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while node.committed_end() < end {
        assert!(
            Instant::now() < deadline,
            "node {} applied {} of {end}",
            node.id(),
            node.committed_end()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A partition replica `id` with its files in `dir`, serving Raft on
/// `listen`, with the default log settings.
pub async fn start_replica(
    id: u64,
    dir: &std::path::Path,
    listen: std::net::SocketAddr,
) -> PartitionNode {
    PartitionNode::start(
        NodeConfig::new(id, dir.to_path_buf(), listen),
        dmq_log_store::LogConfig::default(),
    )
    .await
    .expect("start")
}
