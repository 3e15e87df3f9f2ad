//! A partition replicated on three nodes in one process, its segment log
//! as its Raft log: every replica holds the same records (offsets, ids,
//! timestamps); the leader's loss loses no acknowledged batch; a former
//! leader's uncommitted tail is cut when it rejoins.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dmq_log_store::{LogConfig, RecordInput};
use dmq_replication::{NodeConfig, PartitionNode};

use common::{agreed_leader, applied, by_id, form_group};

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        ..LogConfig::default()
    }
}

async fn start(id: u64, dir: &Path, listen: SocketAddr) -> PartitionNode {
    PartitionNode::start(NodeConfig::new(id, dir.to_path_buf(), listen), log_config())
        .await
        .expect("start")
}

async fn start_group(dirs: &[tempfile::TempDir]) -> Vec<PartitionNode> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(
            start(
                i as u64 + 1,
                dir.path(),
                "127.0.0.1:0".parse().expect("addr"),
            )
            .await,
        );
    }
    form_group(&nodes).await;
    nodes
}

fn batch(tag: &str, n: usize) -> Vec<RecordInput> {
    (0..n)
        .map(|i| RecordInput::new(format!("{tag}-{i}")).with_key(format!("k{i}")))
        .collect()
}

/// Waits until every node applied up to `end`, then checks that all
/// hold the same records below it.
async fn converged(nodes: &[&PartitionNode], end: u64, within: Duration) {
    converged_from(nodes, 0, end, within).await
}

/// [`converged`] for the records from `from` (retention deleted the rest).
async fn converged_from(nodes: &[&PartitionNode], from: u64, end: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while nodes.iter().any(|n| n.committed_end() < end) {
        let ends: Vec<u64> = nodes.iter().map(|n| n.committed_end()).collect();
        assert!(
            Instant::now() < deadline,
            "not applied everywhere: {ends:?} < {end}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reference = nodes[0].records(from, end).expect("read");
    assert_eq!(reference.len() as u64, end - from);
    for node in &nodes[1..] {
        let records = node.records(from, end).expect("read");
        assert_eq!(records.len(), reference.len(), "node {}", node.id());
        for (a, b) in records.iter().zip(&reference) {
            assert_eq!(
                (a.offset, a.id, a.timestamp_ms, &a.key, &a.value),
                (b.offset, b.id, b.timestamp_ms, &b.key, &b.value),
                "node {} differs at {}",
                node.id(),
                b.offset
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_hold_the_same_records_and_the_leaders_loss_loses_nothing_acknowledged() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_group(&dirs).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let mut acknowledged = 0u64;
    for i in 0..30 {
        let appended = by_id(&nodes, leader)
            .produce(batch(&format!("a{i}"), 1 + i % 4))
            .await
            .expect("produce");
        assert_eq!(appended.base_offset, acknowledged, "offsets are dense");
        acknowledged += u64::from(appended.count);
    }
    // A follower refuses to take a produce.
    let follower = nodes.iter().find(|n| n.id() != leader).expect("follower");
    assert!(follower.produce(batch("no", 1)).await.is_err());
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, acknowledged, Duration::from_secs(5)).await;

    // The leader dies: the two others go on, with every acknowledged batch.
    let index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let gone = nodes.remove(index);
    let (gone_id, gone_addr) = (gone.id(), gone.addr());
    gone.shutdown().await;
    let survivors: Vec<&PartitionNode> = nodes.iter().collect();
    let new_leader = agreed_leader(&survivors, Duration::from_secs(10)).await;
    for i in 0..10 {
        let appended = by_id(&nodes, new_leader)
            .produce(batch(&format!("b{i}"), 3))
            .await
            .expect("produce after failover");
        assert_eq!(appended.base_offset, acknowledged);
        acknowledged += u64::from(appended.count);
    }
    // It comes back and catches up.
    nodes.push(start(gone_id, dirs[gone_id as usize - 1].path(), gone_addr).await);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, acknowledged, Duration::from_secs(10)).await;
    let values: Vec<String> = nodes[0]
        .records(0, acknowledged)
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert!(values.contains(&"a0-0".to_string()) && values.contains(&"b9-2".to_string()));
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_leaders_uncommitted_tail_is_cut_when_it_rejoins() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_group(&dirs).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    for i in 0..5 {
        by_id(&nodes, leader)
            .produce(batch(&format!("c{i}"), 2))
            .await
            .expect("produce");
    }
    let committed = by_id(&nodes, leader).committed_end();
    assert_eq!(committed, 10);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, committed, Duration::from_secs(5)).await;

    // Both followers go away: the leader appends a batch it cannot commit.
    let addrs: BTreeMap<u64, SocketAddr> = nodes.iter().map(|n| (n.id(), n.addr())).collect();
    let index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let old_leader = nodes.remove(index);
    for follower in nodes.drain(..) {
        follower.shutdown().await;
    }
    let stranded = tokio::time::timeout(
        Duration::from_millis(500),
        old_leader.produce(batch("stranded", 3)),
    )
    .await;
    assert!(
        stranded.is_err(),
        "a lone leader cannot commit: {stranded:?}"
    );
    assert_eq!(
        old_leader.log_end(),
        committed + 3,
        "appended, not committed"
    );
    assert_eq!(old_leader.committed_end(), committed);
    old_leader.shutdown().await;

    // The followers come back without it and elect a new leader, whose
    // batches take the offsets the stranded batch had.
    for (&id, &addr) in &addrs {
        if id != leader {
            nodes.push(start(id, dirs[id as usize - 1].path(), addr).await);
        }
    }
    let pair: Vec<&PartitionNode> = nodes.iter().collect();
    let new_leader = agreed_leader(&pair, Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    let appended = by_id(&nodes, new_leader)
        .produce(batch("winner", 5))
        .await
        .expect("produce");
    assert_eq!(appended.base_offset, committed);
    let end = committed + 5;

    // The former leader rejoins: its stranded tail is cut, it takes the
    // new leader's records, and no replica ever delivers the stranded one.
    nodes.push(start(leader, dirs[leader as usize - 1].path(), addrs[&leader]).await);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, end, Duration::from_secs(10)).await;
    for node in &nodes {
        assert_eq!(node.log_end(), end, "node {}", node.id());
        let values: Vec<String> = node
            .records(0, end)
            .expect("read")
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        assert!(
            !values.iter().any(|v| v.starts_with("stranded")),
            "node {}: {values:?}",
            node.id()
        );
        assert_eq!(values[10], "winner-0");
    }
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_forwarded_and_answered_with_the_leaders_ids() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let nodes = start_group(&dirs).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let mut end = 0u64;
    for node in &nodes {
        let proposal = dmq_replication::PartitionCommand::Batch(
            dmq_replication::ReplicatedBatch::propose(batch(&format!("n{}", node.id()), 3)),
        );
        let appended = node.write(proposal).await.expect("write through any node");
        assert_eq!((appended.base_offset, appended.count), (end, 3));
        // The answer names the ids the leader's log gave the records.
        let stored: Vec<[u8; 16]> = by_id(&nodes, leader)
            .records(end, end + 3)
            .expect("read")
            .iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(appended.ids, stored, "through node {}", node.id());
        end += 3;
    }
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, end, Duration::from_secs(5)).await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A proposal of idempotent producer 42's batch `sequence`.
fn idempotent(tag: &str, sequence: u64) -> dmq_replication::PartitionCommand {
    let mut proposal = dmq_replication::ReplicatedBatch::propose(batch(tag, 3));
    proposal.producer_id = 42;
    proposal.producer_seq = sequence;
    dmq_replication::PartitionCommand::Batch(proposal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_batch_proposed_again_at_its_leader_is_stored_once() {
    // A producer's retry through another node reaches the partition's
    // leader as a second proposal of the same batch: after the first was
    // committed (the retrying node had not applied it yet), or while the
    // first still waits for its quorum. Before the leader's log looked
    // for it, each was stored twice.
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = start_group(&dirs).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let first = by_id(&nodes, leader)
        .write(idempotent("first", 0))
        .await
        .expect("write");
    let follower = nodes.iter().find(|n| n.id() != leader).expect("follower");
    let again = follower
        .write(idempotent("first", 0))
        .await
        .expect("write again through a follower");
    let place = |a: &dmq_replication::AppendedBatch| (a.base_offset, a.count, a.ids.clone());
    assert_eq!(
        place(&again),
        place(&first),
        "answered with the first's offsets and ids"
    );
    assert!(!first.stored_before && again.stored_before);
    assert_eq!(by_id(&nodes, leader).log_end(), 3, "stored once");

    // Both followers go: the first try of batch 1 waits for its quorum,
    // and so does its retry.
    let addrs: BTreeMap<u64, SocketAddr> = nodes.iter().map(|n| (n.id(), n.addr())).collect();
    let index = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let lone = nodes.remove(index);
    for follower in nodes.drain(..) {
        follower.shutdown().await;
    }
    let waiting = tokio::spawn(lone.propose(idempotent("second", 1)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = tokio::spawn(lone.propose(idempotent("second", 1)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished() && !retry.is_finished(),
        "no quorum yet"
    );
    assert_eq!(lone.log_end(), 6, "the retry appended no records");
    for (&id, &addr) in &addrs {
        if id != leader {
            nodes.push(start(id, dirs[id as usize - 1].path(), addr).await);
        }
    }
    let waiting = waiting.await.expect("join").expect("committed");
    let retry = retry.await.expect("join").expect("committed");
    assert_eq!((waiting.base_offset, waiting.count), (3, 3));
    assert_eq!(place(&retry), place(&waiting));
    assert!(!waiting.stored_before && retry.stored_before);
    nodes.push(lone);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, 6, Duration::from_secs(10)).await;
    for node in &nodes {
        assert_eq!(node.log_end(), 6, "node {}", node.id());
    }
    // Every replica reopens with the rows that name a first batch.
    let ids: Vec<u64> = nodes.iter().map(|n| n.id()).collect();
    for node in nodes.drain(..) {
        node.shutdown().await;
    }
    for id in ids {
        nodes.push(start(id, dirs[id as usize - 1].path(), addrs[&id]).await);
    }
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let third = by_id(&nodes, leader)
        .write(idempotent("third", 2))
        .await
        .expect("write after a restart");
    assert_eq!(third.base_offset, 6);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, 9, Duration::from_secs(10)).await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_in_pieces() {
    // 100 batches of 700 KiB while a follower is down: its backlog (70 MB)
    // is more than one Raft frame holds and far more than an
    // AppendEntries may take within a heartbeat interval.
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let large = LogConfig {
        segment_bytes_max: 4 << 20,
        ..LogConfig::default()
    };
    let start_large = |id: u64, dir: &Path, listen: SocketAddr| {
        PartitionNode::start(
            NodeConfig::new(id, dir.to_path_buf(), listen),
            large.clone(),
        )
    };
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let listen = "127.0.0.1:0".parse().expect("addr");
        nodes.push(
            start_large(i as u64 + 1, dir.path(), listen)
                .await
                .expect("start"),
        );
    }
    form_group(&nodes).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let index = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("follower");
    let behind = nodes.remove(index);
    let (behind_id, behind_addr) = (behind.id(), behind.addr());
    behind.shutdown().await;
    let value = bytes::Bytes::from(vec![7u8; 700 * 1024]);
    let mut end = 0u64;
    for _ in 0..100 {
        let appended = by_id(&nodes, leader)
            .produce(vec![RecordInput::new(value.clone())])
            .await
            .expect("produce");
        end = appended.base_offset + u64::from(appended.count);
    }
    nodes.push(
        start_large(behind_id, dirs[behind_id as usize - 1].path(), behind_addr)
            .await
            .expect("restart"),
    );
    let back = nodes.last().expect("back");
    applied(back, end, Duration::from_secs(60)).await;
    for node in nodes {
        node.shutdown().await;
    }
}

async fn start_purging(id: u64, dir: &Path, listen: SocketAddr, every: u64) -> PartitionNode {
    let mut config = NodeConfig::new(id, dir.to_path_buf(), listen);
    config.purge_after_entries = every;
    PartitionNode::start(config, log_config())
        .await
        .expect("start")
}

/// Three replicas in `dirs` purging every `every` entries, formed, and
/// their leader.
async fn start_purging_group(dirs: &[tempfile::TempDir], every: u64) -> (Vec<PartitionNode>, u64) {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let listen = "127.0.0.1:0".parse().expect("addr");
        nodes.push(start_purging(i as u64 + 1, dir.path(), listen, every).await);
    }
    form_group(&nodes).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    (nodes, leader)
}

/// Produces `count` batches, `records(i)` each, one at a time through
/// `leader`; returns the log end after the last.
async fn produce_each(
    nodes: &[PartitionNode],
    leader: u64,
    count: usize,
    records: impl Fn(usize) -> Vec<RecordInput>,
) -> u64 {
    let mut end = 0;
    for i in 0..count {
        let appended = by_id(nodes, leader)
            .produce(records(i))
            .await
            .expect("produce");
        end = appended.base_offset + u64::from(appended.count);
    }
    end
}

/// Waits until `node` keeps at most `rows` rows, its first one past index 0.
async fn purged_to(node: &PartitionNode, rows: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let log = node.raft_log();
        if log.row_count() <= rows && log.first_row_index().unwrap_or(0) > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} keeps {} rows from index {:?}",
            node.id(),
            log.row_count(),
            log.first_row_index()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_purged_below_what_every_member_holds() {
    const EVERY: u64 = 20;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (mut nodes, leader) = start_purging_group(&dirs, EVERY).await;
    let mut end = produce_each(&nodes, leader, 150, |i| batch(&format!("a{i}"), 1)).await;
    // Every replica drops the rows every member holds; the records stay.
    for node in &nodes {
        purged_to(node, 2 * EVERY as usize, Duration::from_secs(15)).await;
    }
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, end, Duration::from_secs(5)).await;

    // A member that is down holds purging back: when it returns, the
    // leader still has every entry after its last one, and it catches up
    // from entries (a snapshot, which holds no records, would be refused).
    let index = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("follower");
    let gone = nodes.remove(index);
    let (gone_id, gone_addr) = (gone.id(), gone.addr());
    let gone_last = gone
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .expect("has entries");
    gone.shutdown().await;
    end = produce_each(&nodes, leader, 150, |i| batch(&format!("b{i}"), 1)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        let first = node.raft_log().first_row_index().expect("rows");
        assert!(
            first <= gone_last + 1,
            "node {} purged to {first}, past the absent member's {gone_last}",
            node.id()
        );
    }
    nodes.push(start_purging(gone_id, dirs[gone_id as usize - 1].path(), gone_addr, EVERY).await);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, end, Duration::from_secs(15)).await;
    for node in &nodes {
        purged_to(node, 2 * EVERY as usize, Duration::from_secs(15)).await;
    }

    // Every replica restarts from its snapshot and purged rows, and the
    // group goes on.
    let mut addrs = Vec::new();
    for node in nodes.drain(..) {
        addrs.push((node.id(), node.addr()));
        node.shutdown().await;
    }
    for (id, addr) in addrs {
        nodes.push(start_purging(id, dirs[id as usize - 1].path(), addr, EVERY).await);
    }
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    let appended = by_id(&nodes, leader)
        .produce(batch("after", 2))
        .await
        .expect("produce after restart");
    assert_eq!(appended.base_offset, end);
    end += 2;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    converged(&all, end, Duration::from_secs(10)).await;
    for node in nodes {
        node.shutdown().await;
    }
}

fn start_offset(node: &PartitionNode) -> u64 {
    node.raft_log()
        .with_log(|log| log.start_offset())
        .expect("log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_a_replica_deletes_only_below_its_purged_rows() {
    const EVERY: u64 = 20;
    let big = |tag: String| vec![RecordInput::new(format!("{tag}-{}", "x".repeat(2048)))];
    let now = || dmq_log_store::Clock::now_ms(&dmq_log_store::SystemClock);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (mut nodes, leader) = start_purging_group(&dirs, EVERY).await;
    produce_each(&nodes, leader, 150, |i| big(format!("a{i}"))).await;
    for node in &nodes {
        purged_to(node, 2 * EVERY as usize, Duration::from_secs(15)).await;
    }
    // A size limit of one byte deletes every sealed segment, but only
    // those below the purged rows.
    for node in &nodes {
        let purged_end = node.raft_log().purged_end_offset();
        assert!(purged_end > 0);
        let deleted = node
            .raft_log()
            .apply_retention(None, Some(1), now())
            .expect("retention");
        let start = start_offset(node);
        assert!(deleted > 0, "node {}", node.id());
        assert!(start > 0 && start <= purged_end, "{start} {purged_end}");
    }

    // A member that is down holds the purge back, and so retention: when
    // it returns, the leader still has every record after its log's end.
    let index = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("follower");
    let gone = nodes.remove(index);
    let (gone_id, gone_addr, gone_end) = (gone.id(), gone.addr(), gone.log_end());
    gone.shutdown().await;
    let end = produce_each(&nodes, leader, 150, |i| big(format!("b{i}"))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        node.raft_log()
            .apply_retention(None, Some(1), now())
            .expect("retention");
        let start = start_offset(node);
        assert!(
            start <= gone_end,
            "node {} deleted up to {start}, past the absent member's end {gone_end}",
            node.id()
        );
    }
    nodes.push(start_purging(gone_id, dirs[gone_id as usize - 1].path(), gone_addr, EVERY).await);
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let from = all.iter().map(|n| start_offset(n)).max().expect("nodes");
    converged_from(&all, from, end, Duration::from_secs(15)).await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_after_purge_and_retention_fetches_the_records_of_its_snapshot() {
    const EVERY: u64 = 20;
    let big = |tag: String| vec![RecordInput::new(format!("{tag}-{}", "x".repeat(2048)))];
    let now = || dmq_log_store::Clock::now_ms(&dmq_log_store::SystemClock);
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (nodes, leader) = start_purging_group(&dirs[..3], EVERY).await;
    produce_each(&nodes, leader, 150, |i| big(format!("a{i}"))).await;
    // Every member purged its rows (so a new member can only be sent a
    // snapshot) and deleted its first segments by retention.
    for node in &nodes {
        purged_to(node, 2 * EVERY as usize, Duration::from_secs(15)).await;
        node.raft_log()
            .apply_retention(None, Some(1), now())
            .expect("retention");
        assert!(start_offset(node) > 0, "node {}", node.id());
    }

    // Node 4 joins as a learner with nothing: the snapshot it is sent
    // counts records it lacks, which it fetches from the members (its
    // log starting where theirs do), and then it follows.
    let listen = "127.0.0.1:0".parse().expect("addr");
    let learner = start_purging(4, dirs[3].path(), listen, EVERY).await;
    by_id(&nodes, leader)
        .add_learner(4, &learner.addr().to_string())
        .await
        .expect("add the learner");
    let end = produce_each(&nodes, leader, 10, |i| big(format!("b{i}"))).await;
    applied(&learner, end, Duration::from_secs(15)).await;
    let from = start_offset(&learner);
    assert!(from > 0, "the learner's log starts where a member's does");
    let same = |node: &PartitionNode| {
        let ours = learner.records(from, end).expect("read");
        let theirs = node.records(from, end).expect("read");
        assert_eq!(ours.len() as u64, end - from);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                (a.offset, a.id, a.timestamp_ms, &a.value),
                (b.offset, b.id, b.timestamp_ms, &b.value)
            );
        }
    };
    same(by_id(&nodes, leader));

    // Restarted, it keeps what it fetched (no row names those records:
    // its snapshot's committed end does).
    let (id, addr) = (learner.id(), learner.addr());
    learner.shutdown().await;
    let learner = start_purging(id, dirs[3].path(), addr, EVERY).await;
    assert_eq!(start_offset(&learner), from);
    assert!(learner.log_end() >= end);
    let more = produce_each(&nodes, leader, 5, |i| big(format!("c{i}"))).await;
    applied(&learner, more, Duration::from_secs(15)).await;
    for node in nodes {
        node.shutdown().await;
    }
    learner.shutdown().await;
}
