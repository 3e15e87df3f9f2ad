//! The dispatcher's storage on cluster nodes (three in one process): a
//! cluster topic's partition is a replica that reads only below the
//! committed end; other topics stay local; deleting a cluster topic is
//! refused while it is not a replicated operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmq_dispatcher::{PartitionLog, Storage, StoreError};
use dmq_log_store::{BatchInput, LogConfig, RecordInput};
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

fn records(n: usize) -> Vec<RecordInput> {
    (0..n).map(|i| RecordInput::new(format!("r{i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_only_below_the_committed_end() {
    let nodes = cluster().await;
    let mut replicas = Vec::new();
    for node in &nodes {
        node.storage.mark_replicated("t").expect("mark");
        assert!(node.storage.is_replicated("t"));
        let storage = Arc::clone(&node.storage);
        // `partition` blocks (it starts the replica): off the runtime.
        tokio::task::spawn_blocking(move || storage.partition("t", 0).expect("open"))
            .await
            .expect("join");
        replicas.push(node.storage.replica("t", 0).expect("replica"));
    }
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
    let nodes = cluster_with(LogConfig {
        segment_bytes_max: 64 * 1024,
        ..LogConfig::default()
    })
    .await;
    let mut replicas = Vec::new();
    for node in &nodes {
        node.storage.mark_replicated("t").expect("mark");
        let storage = Arc::clone(&node.storage);
        tokio::task::spawn_blocking(move || storage.partition("t", 0).expect("open"))
            .await
            .expect("join");
        replicas.push(node.storage.replica("t", 0).expect("replica"));
    }
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
    for node in &nodes {
        node.storage.shutdown().await;
    }
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
