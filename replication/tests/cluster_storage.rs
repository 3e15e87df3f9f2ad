//! The dispatcher's storage on cluster nodes (three in one process): a
//! cluster topic's partition is a replica that reads only below the
//! committed end; other topics stay local; deleting a cluster topic is
//! refused while it is not a replicated operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmq_dispatcher::{PartitionLog, Storage, StoreError};
use dmq_log_store::{BatchInput, LogConfig, RecordInput};
use dmq_replication::cluster_storage::{ReplicatedAppend, ReplicatedPartitionLog};
use dmq_replication::{ClusterMembers, ClusterStorage, NodeConfig, RaftRouter};

struct Member {
    storage: Arc<ClusterStorage>,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Vec<Member> {
    cluster_with(LogConfig::default()).await
}

async fn cluster_with(log_config: LogConfig) -> Vec<Member> {
    let mut routers = Vec::new();
    for _ in 0..3 {
        routers.push(
            RaftRouter::bind("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind"),
        );
    }
    let members: BTreeMap<u64, String> = routers
        .iter()
        .enumerate()
        .map(|(i, router)| (i as u64 + 1, router.addr().to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, router) in routers.into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("dir");
        let id = i as u64 + 1;
        let storage = ClusterStorage::new(
            dir.path(),
            log_config.clone(),
            ClusterMembers {
                node_id: id,
                members: members.clone(),
                timings: NodeConfig::new(id, dir.path().to_path_buf(), router.addr()),
            },
            router,
            tokio::runtime::Handle::current(),
        )
        .expect("storage");
        nodes.push(Member {
            storage: Arc::new(storage),
            _dir: dir,
        });
    }
    nodes
}

/// Three nodes whose segments hold 64 KiB.
async fn cluster_of_small_segments() -> Vec<Member> {
    cluster_with(LogConfig {
        segment_bytes_max: 64 * 1024,
        ..LogConfig::default()
    })
    .await
}

/// Each node's replica of cluster topic `t`'s partition 0, opened.
async fn replicas_of(nodes: &[Member]) -> Vec<Arc<ReplicatedPartitionLog>> {
    let mut replicas = Vec::new();
    for node in nodes {
        node.storage.mark_replicated("t").expect("mark");
        let storage = Arc::clone(&node.storage);
        // `partition` blocks (it starts the replica): off the runtime.
        tokio::task::spawn_blocking(move || storage.partition("t", 0).expect("open"))
            .await
            .expect("join");
        replicas.push(node.storage.replica("t", 0).expect("replica"));
    }
    replicas
}

/// Writes one record (at offset 0) and returns the id of the node that
/// leads the partition.
async fn leader_after_a_first_write(replicas: &[Arc<ReplicatedPartitionLog>]) -> u64 {
    replicas[0]
        .write(&BatchInput::new(records(1)))
        .await
        .expect("a first write");
    replicas[0].node().leader().await.expect("leader")
}

/// The replicas, the leader's id after a first write, and a replica of a
/// node that does not lead (every write it is given is forwarded).
async fn a_follower(
    nodes: &[Member],
) -> (
    Vec<Arc<ReplicatedPartitionLog>>,
    u64,
    Arc<ReplicatedPartitionLog>,
) {
    let replicas = replicas_of(nodes).await;
    let leader_id = leader_after_a_first_write(&replicas).await;
    let follower = Arc::clone(&replicas[leader_id as usize % 3]);
    assert!(follower.node().leading_term().is_none());
    (replicas, leader_id, follower)
}

/// Stops every node's storage.
async fn shut_down(nodes: &[Member]) {
    for node in nodes {
        node.storage.shutdown().await;
    }
}

/// Awaits each answer, in the order proposed: every batch committed, and
/// each stored after the one proposed before it.
async fn assert_stored_in_order(
    answers: Vec<impl std::future::Future<Output = Result<ReplicatedAppend, StoreError>>>,
) {
    let mut last_offset = 0;
    for (i, answer) in answers.into_iter().enumerate() {
        let appended = answer.await.expect("committed").info;
        assert!(
            appended.base_offset > last_offset,
            "batch {i} stored at {} after a later one (at {last_offset})",
            appended.base_offset
        );
        last_offset = appended.base_offset;
    }
}

fn records(n: usize) -> Vec<RecordInput> {
    (0..n).map(|i| RecordInput::new(format!("r{i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_only_below_the_committed_end() {
    let nodes = cluster().await;
    let replicas = replicas_of(&nodes).await;
    assert!(nodes.iter().all(|node| node.storage.is_replicated("t")));
    // Written through the dispatcher's interface (forwarded as needed).
    let writer = Arc::clone(&replicas[2]);
    let appended = tokio::task::spawn_blocking(move || writer.append(records(5)))
        .await
        .expect("join")
        .expect("append");
    assert_eq!(appended.len(), 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.end_offset() < 5) {
        assert!(Instant::now() < deadline, "not committed everywhere");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for replica in &replicas {
        let read = replica.read(0, 100).expect("read");
        let ids: Vec<_> = read.iter().map(|r| (r.offset, r.id)).collect();
        assert_eq!(
            ids, appended,
            "every replica holds the acknowledged records"
        );
    }

    // The followers stop: the leader appends what it can no longer commit.
    let leader_id = replicas[0].node().leader().await.expect("leader");
    let leader = Arc::clone(&replicas[leader_id as usize - 1]);
    for (i, node) in nodes.iter().enumerate() {
        if i as u64 + 1 != leader_id {
            node.storage.shutdown().await;
        }
    }
    let stuck = Arc::clone(&leader);
    let write = tokio::spawn(async move {
        stuck
            .write(&BatchInput {
                producer_id: 0,
                producer_seq: 0,
                records: records(3),
            })
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader.node().log_end() <= 5 {
        assert!(Instant::now() < deadline, "the leader never appended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(leader.node().log_end(), 8, "appended, uncommitted");
    assert_eq!(
        leader.end_offset(),
        5,
        "the dispatcher sees the committed end"
    );
    assert_eq!(leader.read(0, 100).expect("read").len(), 5);
    assert!(leader.read(5, 100).expect("read").is_empty());
    let answer = write.await.expect("join");
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "no quorum: {answer:?}"
    );
    nodes[leader_id as usize - 1].storage.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_topics_stay_local_and_a_cluster_topic_is_not_deleted_alone() {
    let nodes = cluster().await;
    let storage = Arc::clone(&nodes[0].storage);
    tokio::task::spawn_blocking(move || {
        // A dead-letter topic: local, readable at once (no quorum needed).
        let local = storage.partition("t.g.dlq", 0).expect("local");
        local.append(records(2)).expect("local append");
        assert_eq!(local.end_offset(), 2);
        assert!(storage.replica("t.g.dlq", 0).is_none());
        assert!(!storage.is_replicated("t.g.dlq"));
        storage
            .remove_topic("t.g.dlq")
            .expect("a local topic is deleted");

        storage.mark_replicated("t").expect("mark");
        assert!(matches!(
            storage.remove_topic("t"),
            Err(StoreError::Unavailable(_))
        ));
        assert!(storage.is_replicated("t"), "still a cluster topic");
        assert!(
            storage.mark_replicated("../x").is_err(),
            "names are checked"
        );
    })
    .await
    .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_log_would_refuse_is_refused_before_it_becomes_an_entry() {
    let nodes = cluster_of_small_segments().await;
    let replicas = replicas_of(&nodes).await;
    let too_large = BatchInput::new(vec![RecordInput::new(vec![0u8; 100 * 1024])]);
    let refused = replicas[0].write(&too_large).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Log(dmq_log_store::LogError::InvalidBatch(_)))
        ),
        "{refused:?}"
    );
    // The group was not stopped by it: it still takes writes.
    let taken = replicas[1]
        .write(&BatchInput::new(records(2)))
        .await
        .expect("the group still takes writes");
    assert_eq!(taken.base_offset, 0);
    shut_down(&nodes).await;
}

/// A group's ack journal that a node kept on its own disk (before its
/// groups' journals were replicated) seeds the cluster's copy when it is
/// first opened: the node does not deliver its acked messages again, and
/// the other nodes read the same journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_kept_locally_seeds_the_replicated_one() {
    use dmq_replication::{MetadataNode, ReplicatedJournals};
    let dir = tempfile::tempdir().expect("dir");
    let name = "group.orders.billing";
    {
        let local = dmq_dispatcher::FileStorage::new(dir.path(), LogConfig::default())
            .expect("local storage");
        let (mut journal, _) = local.open_journal(name).expect("open");
        journal.append(b"\x03kept");
        journal.sync().expect("sync");
    }
    let router = RaftRouter::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let members: BTreeMap<u64, String> = [(1, router.addr().to_string())].into();
    let config = NodeConfig::new(1, dir.path().join("meta"), router.addr());
    let metadata = Arc::new(
        MetadataNode::start_on(&router, config.clone())
            .await
            .expect("metadata"),
    );
    metadata.initialize(members.clone()).await.expect("form");
    let storage = ClusterStorage::new(
        dir.path(),
        LogConfig::default(),
        ClusterMembers {
            node_id: 1,
            members,
            timings: config,
        },
        router.clone(),
        tokio::runtime::Handle::current(),
    )
    .expect("storage");
    let journals = ReplicatedJournals::start(Arc::clone(&metadata));
    storage.replicate_journals(Arc::clone(&journals));
    storage.mark_replicated("orders").expect("mark");

    let (_, payloads) = storage.open_journal(name).expect("open");
    assert_eq!(payloads, vec![b"\x03kept".to_vec()]);
    assert!(journals.drain(Duration::from_secs(10)).await, "replicated");
    assert_eq!(
        metadata.state_machine().journal(name),
        Some(vec![b"\x03kept".to_vec()])
    );
    // Opened again, it reads the cluster's copy (the same).
    let (_, again) = storage.open_journal(name).expect("open again");
    assert_eq!(again, payloads);
    storage.shutdown().await;
    router.shutdown().await;
}

/// Writes that come faster than the group commits them are merged into
/// fewer Raft entries (`ProposalQueue`); each writer is still answered
/// with its own records, in the order it proposed them, and no merged
/// batch is longer than a segment (which takes two of the 20 KiB batches
/// here, not three).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_each_gets_its_own_records() {
    let nodes = cluster_of_small_segments().await;
    let replicas = replicas_of(&nodes).await;
    let leader_id = leader_after_a_first_write(&replicas).await;
    let leader = Arc::clone(&replicas[leader_id as usize - 1]);
    let entries_before = leader.node().raft().metrics().borrow().last_log_index;

    // Writers of small batches on two nodes (a follower's are forwarded),
    // each proposing its batches one after another without waiting; and
    // batches of 20 KiB, three of which the segment would not take.
    let mut proposed = Vec::new();
    for writer in 0..40u32 {
        let replica = Arc::clone(&replicas[writer as usize % 2]);
        let mut answers = Vec::new();
        for batch in 0..5u32 {
            let values: Vec<String> = (0..1 + (writer + batch) % 3)
                .map(|i| format!("w{writer}-b{batch}-r{i}"))
                .collect();
            let input = BatchInput::new(values.iter().cloned().map(RecordInput::new).collect());
            answers.push((values, replica.propose(&input)));
        }
        proposed.push(answers);
    }
    let large: Vec<_> = {
        let mut large = Vec::new();
        for i in 0..6u8 {
            let value = vec![i; 20 * 1024];
            let input = BatchInput::new(vec![RecordInput::new(value.clone())]);
            large.push((value, leader.propose(&input)));
        }
        large
    };
    let mut written = 0u64;
    let mut expected = Vec::new();
    for answers in proposed {
        let mut last_offset = None;
        for (values, answer) in answers {
            let appended = answer.await.expect("committed").info;
            assert_eq!(appended.ids.len(), values.len());
            assert_eq!(
                appended.last_offset - appended.base_offset + 1,
                values.len() as u64
            );
            assert!(
                last_offset < Some(appended.base_offset),
                "one writer's batches are stored in the order it proposed them"
            );
            last_offset = Some(appended.last_offset);
            written += values.len() as u64;
            for (i, value) in values.into_iter().enumerate() {
                expected.push((
                    appended.base_offset + i as u64,
                    appended.ids[i],
                    value.into_bytes(),
                ));
            }
        }
    }
    for (value, answer) in large {
        let appended = answer.await.expect("a large batch is taken").info;
        written += 1;
        expected.push((appended.base_offset, appended.ids[0], value));
    }
    let entries = leader.node().raft().metrics().borrow().last_log_index;
    let entries = entries.unwrap_or(0) - entries_before.unwrap_or(0);
    assert!(
        entries < 200 + 6,
        "206 writes took {entries} entries: none were merged"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.end_offset() < 1 + written) {
        assert!(Instant::now() < deadline, "not committed everywhere");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for replica in &replicas {
        let read = replica.read(1, 10_000).expect("read");
        assert_eq!(read.len() as u64, written);
        for (offset, id, value) in &expected {
            let record = &read[(*offset - 1) as usize];
            assert_eq!((record.offset, &record.id), (*offset, id));
            assert_eq!(&record.value[..], &value[..], "offset {offset}");
        }
    }
    shut_down(&nodes).await;
}

/// A follower's small proposals are forwarded one proposal at a time
/// (merged while one is in flight): a writer's batches through a follower
/// are stored in the order it proposed them. (Before, each was a forward
/// of its own, and two in flight at once reached the leader in either
/// order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_through_a_follower_keeps_its_order() {
    let nodes = cluster().await;
    let (_, _, follower) = a_follower(&nodes).await;
    let mut answers = Vec::new();
    for i in 0..200u32 {
        let batch = BatchInput::new(vec![RecordInput::new(vec![i as u8; 1 + i as usize * 100])]);
        answers.push(follower.propose(&batch));
    }
    assert_stored_in_order(answers).await;
    shut_down(&nodes).await;
}

/// A follower's pipelined large batches keep their order while the
/// leadership moves to the third node: forwards the old leader refuses
/// are retried at the new one with their numbers, which it takes in
/// order from the floor each carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_its_order_while_the_leadership_moves() {
    let nodes = cluster().await;
    let (replicas, leader_id, follower) = a_follower(&nodes).await;
    let third = Arc::clone(&replicas[(leader_id as usize + 1) % 3]);
    let old_leader = Arc::clone(&replicas[leader_id as usize - 1]);
    let third_id = third.node().id();
    assert!(third.node().leading_term().is_none());
    let mut answers = Vec::new();
    let mut transfer = None;
    for i in 0..150u32 {
        if i == 30 {
            let old_leader = Arc::clone(&old_leader);
            transfer = Some(tokio::spawn(async move {
                old_leader.node().transfer_leader(third_id).await
            }));
        }
        let batch = BatchInput::new(vec![RecordInput::new(vec![i as u8; 70 << 10])]);
        answers.push(follower.propose(&batch));
        if i % 10 == 9 {
            // A producer's pace: the transfer lands among batches in flight.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    transfer
        .expect("started")
        .await
        .expect("join")
        .expect("the leadership moved");
    assert_stored_in_order(answers).await;
    assert_eq!(third.node().leader().await, Some(third_id));
    shut_down(&nodes).await;
}

/// The same for batches that are never merged, and so were each a forward
/// of their own: large ones (64 KiB and more) and idempotent ones. The
/// leader takes a follower's forwards in the order the follower proposed
/// them. (Before, two in flight at once reached the leader in either
/// order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_idempotent_batches_through_a_follower_keep_their_order() {
    let nodes = cluster().await;
    let (_, _, follower) = a_follower(&nodes).await;
    let mut answers = Vec::new();
    for i in 0..120u32 {
        let batch = if i % 2 == 0 {
            BatchInput::new(vec![RecordInput::new(vec![i as u8; 70 << 10])])
        } else {
            BatchInput {
                producer_id: 0xFEED,
                producer_seq: u64::from(i),
                ..BatchInput::new(vec![RecordInput::new(vec![i as u8; 100])])
            }
        };
        answers.push(follower.propose(&batch));
    }
    assert_stored_in_order(answers).await;
    shut_down(&nodes).await;
}
