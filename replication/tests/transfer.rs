//! Leadership transfer (`dmq_replication::transfer`): a partition group's
//! leadership moves to the voter named, asked through any member, while
//! writes go on through every member; the old leader, led, keeps its
//! heartbeats and elections (the group stays stable afterwards).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmq_log_store::RecordInput;
use dmq_replication::{PartitionCommand, PartitionNode, ReplicatedBatch};

use common::{agreed_leader, applied, form_group, start_replica};

fn write(tag: String) -> PartitionCommand {
    PartitionCommand::Batch(ReplicatedBatch::propose(vec![RecordInput::new(tag)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leadership_moves_to_the_voter_named_while_writes_go_on() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(
            start_replica(
                i as u64 + 1,
                dir.path(),
                "127.0.0.1:0".parse().expect("addr"),
            )
            .await,
        );
    }
    form_group(&nodes).await;
    let nodes = Arc::new(nodes);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let first = agreed_leader(&all, Duration::from_secs(10)).await;

    // A writer through each member, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for index in 0..nodes.len() {
        let (nodes, stop) = (Arc::clone(&nodes), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut written = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let node = &nodes[index];
                node.write(write(format!("n{}-{written}", node.id())))
                    .await
                    .expect("a write through any member succeeds during transfers");
                written += 1;
            }
            written
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // To a follower, asked through the other follower (forwarded).
    let target = (1..=3).find(|id| *id != first).expect("a follower");
    let asked = nodes
        .iter()
        .find(|n| n.id() != first && n.id() != target)
        .expect("the other follower");
    asked.transfer_leader(target).await.expect("transfer");
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    assert_eq!(agreed_leader(&all, Duration::from_secs(5)).await, target);

    // And back, asked of the leader itself.
    let leading = nodes.iter().find(|n| n.id() == target).expect("leader");
    leading.transfer_leader(first).await.expect("transfer back");
    assert_eq!(agreed_leader(&all, Duration::from_secs(5)).await, first);
    // Asked again: nothing to do.
    leading.transfer_leader(first).await.expect("already there");

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for writer in writers {
        total += writer.await.expect("writer");
    }
    assert!(total > 0);

    // With no writes, the group stays led by it: its heartbeats are back
    // (without them the followers' election timers run out and they
    // elect again, at a higher term).
    let term = nodes[0].raft().metrics().borrow().current_term;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(agreed_leader(&all, Duration::from_secs(1)).await, first);
    assert_eq!(nodes[0].raft().metrics().borrow().current_term, term);
    // Every write answered is held once, in every replica.
    for node in nodes.iter() {
        applied(node, total, Duration::from_secs(10)).await;
        assert_eq!(node.log_end(), total, "node {}", node.id());
    }

    // A node that is no voter is refused.
    let refused = nodes[0].transfer_leader(9).await;
    assert!(refused.is_err(), "{refused:?}");
    for node in Arc::into_inner(nodes).expect("one owner") {
        node.shutdown().await;
    }
}
