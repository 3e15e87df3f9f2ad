//! Non-voting learners (issue 12): a learner follows a partition group,
//! holds every record, and counts for no quorum; promoted, it votes.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dmq_log_store::{LogConfig, RecordInput};
use dmq_replication::{NodeConfig, PartitionNode};

use common::{agreed_leader, applied, by_id, form_group};

async fn start(id: u64, dir: &Path, listen: SocketAddr) -> PartitionNode {
    PartitionNode::start(
        NodeConfig::new(id, dir.to_path_buf(), listen),
        LogConfig::default(),
    )
    .await
    .expect("start")
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_follows_without_voting_and_votes_once_promoted() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().take(3).enumerate() {
        nodes.push(start(i as u64 + 1, dir.path(), any_addr()).await);
    }
    form_group(&nodes).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    for i in 0..5 {
        by_id(&nodes, leader)
            .produce(vec![RecordInput::new(format!("before-{i}"))])
            .await
            .expect("produce");
    }

    // Node 4 joins as a learner: it catches up, then follows.
    let learner = start(4, dirs[3].path(), any_addr()).await;
    by_id(&nodes, leader)
        .add_learner(4, &learner.addr().to_string())
        .await
        .expect("add learner");
    assert_eq!(by_id(&nodes, leader).learners(), BTreeSet::from([4]));
    assert_eq!(by_id(&nodes, leader).voters(), BTreeSet::from([1, 2, 3]));
    by_id(&nodes, leader)
        .produce(vec![RecordInput::new("after")])
        .await
        .expect("produce");
    applied(&learner, 6, Duration::from_secs(10)).await;
    let values: Vec<String> = learner
        .records(0, 6)
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(values[0], "before-0");
    assert_eq!(values[5], "after");

    // Two voters go away: the leader and the learner alive are not a
    // quorum, because the learner does not vote.
    let leader_index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let leading = nodes.remove(leader_index);
    let mut stopped = Vec::new();
    for voter in nodes.drain(..) {
        stopped.push((voter.id(), voter.addr()));
        voter.shutdown().await;
    }
    let stuck = tokio::time::timeout(
        Duration::from_millis(1_500),
        leading.produce(vec![RecordInput::new("no quorum")]),
    )
    .await;
    assert!(
        stuck.is_err(),
        "committed without a quorum of voters: {stuck:?}"
    );
    assert_eq!(leading.committed_end(), 6);

    // One voter back: a quorum again; then the learner replaces the other
    // voter.
    let (back_id, back_addr) = stopped[0];
    let back = start(back_id, dirs[back_id as usize - 1].path(), back_addr).await;
    let (gone_id, _) = stopped[1];
    let mut nodes = vec![leading, back, learner];
    let live: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&live, Duration::from_secs(10)).await;
    applied(by_id(&nodes, leader), 7, Duration::from_secs(10)).await;
    let voters: BTreeSet<u64> = nodes.iter().map(|n| n.id()).collect();
    by_id(&nodes, leader)
        .change_voters(voters.clone())
        .await
        .expect("promote the learner");
    assert_eq!(by_id(&nodes, leader).voters(), voters);
    assert_eq!(by_id(&nodes, leader).learners(), BTreeSet::from([gone_id]));
    // The promoted learner's vote now counts: with it, the old leader
    // alone down leaves a quorum.
    let index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    nodes.remove(index).shutdown().await;
    let live: Vec<&PartitionNode> = nodes.iter().collect();
    let new_leader = agreed_leader(&live, Duration::from_secs(10)).await;
    let appended = by_id(&nodes, new_leader)
        .produce(vec![RecordInput::new("voted")])
        .await
        .expect("produce with the promoted learner's vote");
    assert_eq!(appended.base_offset, 7);
    for node in nodes {
        node.shutdown().await;
    }
}
