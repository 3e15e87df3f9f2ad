//! Three-node clusters of real `dmqd` processes on 127.0.0.1 for the
//! cluster tests (`tests/cluster.rs`, `tests/cluster_faults.rs`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use dmq_client::{Client, ClientOptions, Message, MessageId};

use super::{free_port, http, next, options, Api};

/// Every test cluster purges its partitions' Raft rows in small steps, so
/// that kills, restarts and faults all meet purged logs.
pub const PURGE_AFTER_ENTRIES: u64 = 16;

pub struct Node {
    pub id: u64,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    /// Where it serves Raft.
    pub raft: SocketAddr,
    /// Where its peers reach its Raft port (`raft`, or a proxy).
    pub advertised_raft: SocketAddr,
    /// Where its Raft connections leave from, if set.
    pub source_ip: Option<IpAddr>,
    pub dir: PathBuf,
    pub process: Option<Child>,
}

impl Node {
    pub fn config(&self, peers: &[Node]) -> String {
        let mut text = format!(
            "data_dir = {:?}\nlisten = \"{}\"\nadmin_listen = \"{}\"\n\n\
             [cluster]\nnode_id = {}\nraft_listen = \"{}\"\n\
             purge_after_entries = {PURGE_AFTER_ENTRIES}\nconsumer_lease = false\n",
            self.dir.join("data"),
            self.client,
            self.admin,
            self.id,
            self.raft
        );
        if let Some(source) = self.source_ip {
            text.push_str(&format!("raft_source_ip = \"{source}\"\n"));
        }
        for peer in peers {
            text.push_str(&format!(
                "\n[[cluster.peers]]\nid = {}\nraft = \"{}\"\nclient = \"{}\"\n",
                peer.id, peer.advertised_raft, peer.client
            ));
        }
        text
    }

    pub fn start(&mut self, config: &str) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let path = self.dir.join("dmqd.toml");
        std::fs::write(&path, config).unwrap();
        // Appended to across restarts, so a post-mortem sees every run;
        // `DMQ_NODE_LOG` sets the nodes' filter (`warn` by default).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dmqd.log"))
            .unwrap();
        let filter = std::env::var("DMQ_NODE_LOG").unwrap_or_else(|_| "warn".into());
        self.process = Some(
            std::process::Command::new(env!("CARGO_BIN_EXE_dmqd"))
                .args(["--config", path.to_str().unwrap()])
                .env("RUST_LOG", filter)
                // dmqd logs to stdout; a panic goes to stderr.
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// SIGTERM, and waits for the process to end (a clean stop).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // The `kill` command: SIGTERM to this one process.
            let _ = std::process::Command::new("kill")
                .arg(process.id().to_string())
                .status();
            process.wait().unwrap();
        }
    }

    /// Waits up to `within` for the process to end by itself; its exit
    /// status if it did (the process is then gone).
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let process = self.process.as_mut()?;
            if let Some(status) = process.try_wait().unwrap() {
                self.process = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown, no final fsync.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().unwrap();
            process.wait().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Node `id` under `root`, on ports of its own, not started.
pub fn new_node(root: &Path, id: u64) -> Node {
    let raft = free_port();
    Node {
        id,
        client: free_port(),
        admin: free_port(),
        raft,
        advertised_raft: raft,
        source_ip: None,
        dir: root.join(format!("node{id}")),
        process: None,
    }
}

pub fn cluster(root: &Path) -> (Vec<Node>, Vec<String>) {
    let nodes: Vec<Node> = (1..=3).map(|id| new_node(root, id)).collect();
    let configs = nodes.iter().map(|node| node.config(&nodes)).collect();
    (nodes, configs)
}

/// `config` with `[cluster] consumer_lease = true` (dmqd's default): one
/// node at a time serves consumers. [`Node::config`] turns it off, so that
/// the tests of storage, replication and failover can consume through the
/// node they choose.
pub fn with_consumer_lease(config: &str) -> String {
    let lease = config.replacen("consumer_lease = false\n", "consumer_lease = true\n", 1);
    assert_ne!(lease, config, "the configuration sets consumer_lease");
    lease
}

/// [`cluster`], every node started with `edit` applied to its
/// configuration.
pub fn started_cluster_with(root: &Path, edit: fn(&str) -> String) -> (Vec<Node>, Vec<String>) {
    let (mut nodes, configs) = cluster(root);
    let configs: Vec<String> = configs.iter().map(|config| edit(config)).collect();
    for (node, config) in nodes.iter_mut().zip(&configs) {
        node.start(config);
    }
    (nodes, configs)
}

/// [`cluster`], every node started.
pub fn started_cluster(root: &Path) -> (Vec<Node>, Vec<String>) {
    let (mut nodes, configs) = cluster(root);
    for (node, config) in nodes.iter_mut().zip(&configs) {
        node.start(config);
    }
    (nodes, configs)
}

/// A client of `node`, once it listens (its log is shown if it never does).
pub async fn connect(node: &Node) -> Client {
    let addr = node.client;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Client::connect(addr.to_string(), ClientOptions::new("cluster-test"))
                .await
                .unwrap();
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(node.dir.join("dmqd.log")).unwrap_or_default();
            panic!("node {} at {addr} did not start; its log:\n{log}", node.id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until topic `topic` exists on the node `client` talks to.
pub async fn wait_for_topic(client: &Client, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let topics = client.list_topics().await.unwrap();
        if topics.iter().any(|t| t.name == topic) {
            return;
        }
        assert!(Instant::now() < deadline, "topic {topic} never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Produces `count` messages through `client`, one send at a time, each
/// acknowledged; returns their ids.
/// Waits until each of `nodes` has `topic` (a client of each asks).
pub async fn wait_for_topic_on(nodes: &[Node], topic: &str) {
    for node in nodes {
        wait_for_topic(&connect(node).await, topic).await;
    }
}

pub async fn produce(client: &Client, tag: &str, count: usize) -> Vec<MessageId> {
    let producer = client.producer();
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let receipt = producer
            .send(Message::new("orders", format!("{tag} {i}")))
            .await
            .unwrap();
        ids.push(receipt.id);
    }
    ids
}

/// Consumes (and acks) through `client` as a new group until `expected`
/// ids arrived or 30 s passed; returns what arrived.
pub async fn consume(client: &Client, group: &str, expected: usize) -> BTreeSet<MessageId> {
    let mut subscription = client
        .consumer()
        .subscribe("orders", group, options("m"))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < expected && Instant::now() < deadline {
        if let Some(message) = next(&mut subscription, Duration::from_secs(1)).await {
            seen.insert(message.id);
            message.ack().await.unwrap();
        }
    }
    seen
}

/// Flips one byte of the last (active) segment of a partition replica's
/// `log_dir`, `at` of the way into its data (0.0 to 1.0), and drops its
/// checkpoints, as a bad sector and a crash would leave it. Returns
/// whether it found data to damage.
pub fn damage_active_segment(log_dir: &Path, at: f64) -> bool {
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return false;
    };
    let mut segments = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("ckpt") {
            std::fs::remove_file(&path).unwrap();
        } else if name.ends_with(".log") {
            segments.push(path);
        }
    }
    segments.sort();
    let Some(active) = segments.last() else {
        return false;
    };
    let mut bytes = std::fs::read(active).unwrap();
    // Segments are allocated ahead: the data ends at the last byte that
    // is not zero.
    let end = bytes.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end == 0 {
        return false;
    }
    let position = ((end as f64) * at.clamp(0.0, 1.0)) as usize;
    bytes[position.min(end)] ^= 0x20;
    std::fs::write(active, &bytes).unwrap();
    true
}

/// The index of the metadata leader (with the consumer lease, the node
/// serving consumers), as the first running node that answers names it
/// (a paused node is given 500 ms), asking again until `within` passed
/// (zero: one round).
pub async fn metadata_leader(nodes: &[Node], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    loop {
        for node in nodes.iter().filter(|node| node.process.is_some()) {
            let api = Api::new(node.admin, None);
            let asked = tokio::time::timeout(
                Duration::from_millis(500),
                http(move || match api.try_call("GET", "/api/cluster", None) {
                    Some((200, body)) => body["metadata"]["leader"].as_u64(),
                    _ => None,
                }),
            )
            .await;
            if let Ok(Some(leader)) = asked {
                let running = |node: &Node| node.id == leader && node.process.is_some();
                if let Some(index) = nodes.iter().position(running) {
                    return Some(index);
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
