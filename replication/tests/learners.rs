//! Non-voting learners (issue 12): a learner follows a partition group,
//! holds every record, and counts for no quorum; promoted, it votes.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use dmq_log_store::RecordInput;
use dmq_replication::PartitionNode;

use common::{agreed_leader, applied, by_id, form_group, start_replica};

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_follows_without_voting_and_votes_once_promoted() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().take(3).enumerate() {
        nodes.push(start_replica(i as u64 + 1, dir.path(), any_addr()).await);
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
    let learner = start_replica(4, dirs[3].path(), any_addr()).await;
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
    let back = start_replica(back_id, dirs[back_id as usize - 1].path(), back_addr).await;
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

/// A follower's disk is lost: readmitted (removed and added back as a
/// learner), it starts empty under its id and address, is sent every
/// entry again and votes once promoted. Made a learner without the
/// removal, the leader kept how far its log had matched and took its empty
/// log for a log going back: openraft refuses that, and the leader's Raft
/// core panicked (CI, issue 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_was_lost_is_readmitted_and_sent_every_entry_again() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(start_replica(i as u64 + 1, dir.path(), any_addr()).await);
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
    for node in &nodes {
        applied(node, 5, Duration::from_secs(10)).await;
    }

    // A follower dies with its disk; the readmission is asked of the other
    // follower (forwarded to the leader).
    let lost_index = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("a follower");
    let lost = nodes.remove(lost_index);
    let (lost_id, lost_addr) = (lost.id(), lost.addr());
    lost.shutdown().await;
    // A new, empty directory stands for the new disk (deleting the old one
    // could race a file its Raft's background tasks still write).
    let new_disk = tempfile::tempdir().expect("dir");
    let lost_dir = new_disk.path();
    let other = nodes
        .iter()
        .find(|n| n.id() != leader)
        .expect("the other follower");
    other
        .readmit(lost_id, &lost_addr.to_string())
        .await
        .expect("readmit");
    let rest: BTreeSet<u64> = nodes.iter().map(|n| n.id()).collect();
    assert_eq!(by_id(&nodes, leader).voters(), rest);
    assert_eq!(by_id(&nodes, leader).learners(), BTreeSet::from([lost_id]));
    by_id(&nodes, leader)
        .produce(vec![RecordInput::new("while it is down")])
        .await
        .expect("produce without it");

    // Started empty, it is sent every entry; the leader goes on.
    let back = start_replica(lost_id, lost_dir, lost_addr).await;
    applied(&back, 6, Duration::from_secs(10)).await;
    let values: Vec<String> = back
        .records(0, 6)
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(values[0], "before-0");
    assert_eq!(values[5], "while it is down");
    nodes.push(back);
    let all = rest
        .iter()
        .copied()
        .chain([lost_id])
        .collect::<BTreeSet<u64>>();
    by_id(&nodes, leader)
        .change_voters(all.clone())
        .await
        .expect("promote it");
    by_id(&nodes, leader)
        .produce(vec![RecordInput::new("after")])
        .await
        .expect("the leader's Raft still runs");
    applied(by_id(&nodes, lost_id), 7, Duration::from_secs(10)).await;
    assert_eq!(by_id(&nodes, leader).voters(), all);
    for node in nodes {
        node.shutdown().await;
    }
}

/// `remove-node`'s step in each group: the leader itself is taken out,
/// asked through a follower (forwarded); the other two elect a leader of
/// their own and commit by their own quorum. A learner is taken out too,
/// and asking again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_taken_out_leaves_the_group_even_as_its_leader() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(start_replica(i as u64 + 1, dir.path(), any_addr()).await);
    }
    let learner = nodes.pop().expect("node 4");
    form_group(&nodes).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    by_id(&nodes, leader)
        .add_learner(4, &learner.addr().to_string())
        .await
        .expect("add learner");
    nodes.push(learner);
    by_id(&nodes, leader)
        .produce(vec![RecordInput::new("before")])
        .await
        .expect("produce");

    let follower = nodes
        .iter()
        .find(|n| n.id() != leader && n.id() != 4)
        .expect("a follower");
    follower
        .remove_member(leader)
        .await
        .expect("remove the leader");
    let rest: BTreeSet<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let removed = nodes.remove(index);
    let voters: Vec<&PartitionNode> = nodes.iter().filter(|n| rest.contains(&n.id())).collect();
    let next = agreed_leader(&voters, Duration::from_secs(10)).await;
    assert!(rest.contains(&next), "a remaining voter leads: {next}");
    assert_eq!(by_id(&nodes, next).voters(), rest);
    assert_eq!(by_id(&nodes, next).learners(), BTreeSet::from([4]));
    // The removed node is of no quorum: stopped, the others commit.
    removed.shutdown().await;
    let appended = by_id(&nodes, next)
        .produce(vec![RecordInput::new("after")])
        .await
        .expect("produce without the removed node");
    assert_eq!(appended.base_offset, 1);

    // A learner is taken out; asking again changes nothing.
    by_id(&nodes, next)
        .remove_member(4)
        .await
        .expect("remove learner");
    by_id(&nodes, next).remove_member(4).await.expect("again");
    by_id(&nodes, next)
        .remove_member(leader)
        .await
        .expect("a node no longer a member");
    assert!(by_id(&nodes, next).learners().is_empty());
    assert_eq!(by_id(&nodes, next).voters(), rest);
    for node in nodes {
        node.shutdown().await;
    }
}
