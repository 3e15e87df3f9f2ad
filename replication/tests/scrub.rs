//! Damage a running replica meets in a sealed segment (which no open
//! re-reads): its background re-read finds it, the replica stops its Raft
//! group (never voting or leading with it) and marks where; restarted, it
//! cuts its log there and fetches the records again from its peers.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dmq_log_store::{LogConfig, RecordInput};
use dmq_replication::scrub::{ScrubConfig, DAMAGE_MARKER};
use dmq_replication::{NodeConfig, PartitionNode};

use common::{agreed_leader, applied, by_id, form_group};

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        ..LogConfig::default()
    }
}

fn config(
    id: u64,
    dir: &Path,
    listen: SocketAddr,
    peers: Vec<String>,
    interval: Duration,
) -> NodeConfig {
    let mut config = NodeConfig::new(id, dir.to_path_buf(), listen);
    config.scrub = Some(ScrubConfig {
        interval,
        bytes_per_second: 1 << 30,
    });
    config.peers = peers;
    config
}

/// Flips one byte in the middle of the oldest (sealed) segment of the
/// replica in `dir`, as a bad sector would, while it runs.
fn damage_oldest_segment(dir: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("log"))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() > 2, "a sealed segment: {segments:?}");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segments[0])
        .expect("open");
    let at = file.metadata().expect("len").len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.write_all(&[byte[0] ^ 0x10]).expect("write");
    file.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_damaged_while_it_runs_stops_and_is_repaired_from_its_peers_at_restart() {
    // Re-read every 100 ms: the pass finds it.
    damaged_while_running(Duration::from_millis(100), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_read_met_damage_stops_without_waiting_for_its_pass() {
    // No pass within the test: a read through the replica meets it.
    damaged_while_running(Duration::from_secs(3600), true).await;
}

async fn damaged_while_running(interval: Duration, read_it: bool) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let listen = "127.0.0.1:0".parse().expect("addr");
        let node = PartitionNode::start(
            config(i as u64 + 1, dir.path(), listen, Vec::new(), interval),
            log_config(),
        )
        .await
        .expect("start");
        nodes.push(node);
    }
    form_group(&nodes).await;
    let all: Vec<&PartitionNode> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(10)).await;
    for i in 0..60 {
        let records = (0..5)
            .map(|j| RecordInput::new(format!("{i}-{j} {}", "x".repeat(200))))
            .collect();
        by_id(&nodes, leader)
            .produce(records)
            .await
            .expect("produce");
    }
    for node in &nodes {
        applied(node, 300, Duration::from_secs(10)).await;
    }

    // A follower's oldest segment goes bad: its re-read finds it and the
    // replica stops, with a marker.
    let index = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("a follower");
    let damaged = nodes.remove(index);
    let (id, addr) = (damaged.id(), damaged.addr());
    let dir = dirs[id as usize - 1].path();
    damage_oldest_segment(dir);
    if read_it {
        assert!(
            damaged.records(0, 300).is_err(),
            "the read meets the damage"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join(DAMAGE_MARKER).exists() {
        assert!(Instant::now() < deadline, "the damage was never found");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marked: u64 = std::fs::read_to_string(dir.join(DAMAGE_MARKER))
        .expect("marker")
        .trim()
        .parse()
        .expect("an offset");
    assert!(marked < 300, "{marked}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while damaged
        .produce(vec![RecordInput::new("refused")])
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "its Raft group never stopped");
    }
    // The others carry on without it.
    by_id(&nodes, leader)
        .produce(vec![RecordInput::new("without it")])
        .await
        .expect("produce");

    // Restarted: cut at the marker, fetched again, whole.
    damaged.shutdown().await;
    let peers = nodes.iter().map(|n| n.addr().to_string()).collect();
    let repaired = PartitionNode::start(config(id, dir, addr, peers, interval), log_config())
        .await
        .expect("restart");
    assert!(!dir.join(DAMAGE_MARKER).exists(), "the marker is cleared");
    applied(&repaired, 301, Duration::from_secs(10)).await;
    let reference = by_id(&nodes, leader).records(0, 301).expect("read");
    let records = repaired.records(0, 301).expect("every record reads again");
    assert_eq!(records.len(), reference.len());
    for (a, b) in records.iter().zip(&reference) {
        assert_eq!((a.offset, a.id, &a.value), (b.offset, b.id, &b.value));
    }
    for node in nodes {
        node.shutdown().await;
    }
    repaired.shutdown().await;
}
