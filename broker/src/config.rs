//! Broker configuration: defaults that run with no arguments, a TOML file,
//! and flags on top (see `dmqd --help`).
//!
//! ```toml
//! data_dir = "./data"
//! listen = "127.0.0.1:7070"
//! fsync = "always"            # "always" | "never" | "interval:10ms"
//! segment_bytes = 1073741824       # a segment rolls at this size
//! segment_preallocate_min_bytes = 65536         # its file grows from this,
//! segment_preallocate_step_max_bytes = 67108864 # doubling, by at most this
//! max_open_files = 4096        # segment files and journals held open (LRU)
//! max_mapped_segments = 8192   # sealed segments kept mapped (LRU)
//! disk_reserve_bytes = 67108864     # kept free for acks, deletions, metadata
//! max_connections = 1024
//! max_frame_bytes = 16777216      # at least 65536; records up to this - 1024
//! handshake_timeout_ms = 5000        # the whole HELLO exchange, from connect
//! idle_timeout_ms = 300000
//! max_connections_per_address = 256
//! max_partitions_per_topic = 256
//! max_partitions_total = 4096
//! max_frame_bytes_before_hello = 65536
//! max_inflight_requests_per_connection = 1024
//! producer_window_max = 100000        # idempotent producers remembered
//! producer_window_bytes_max = 67108864
//! transaction_timeout_ms = 60000   # then no more records, and checked back
//! transaction_max_checks = 15       # then left unresolved (dmq tx resolve)
//! transaction_check_backoff_max_ms = 300000
//! transaction_checks_per_second = 100   # per producer group
//! allow_remote_development = false   # dev mode (no credentials) off loopback
//!
//! admin_listen = "127.0.0.1:7080"
//! # argon2id hashes of admin tokens (`dmq hash-secret` prints one)
//! admin_tokens = ["$argon2id$v=19$m=19456,t=2,p=1$..."]
//! trace = true
//! trace_retention_hours = 72
//! # trace_segment_bytes = 67108864  # default: min(64 MiB, segment_bytes)
//! # trace_max_bytes = 1073741824     # default: bounded by age only
//! stats_retention_hours = 48
//! # the admin listener: extra Host names it answers to (a proxy's), limits
//! admin_allowed_hosts = ["dmq.example.com"]
//! admin_max_connections = 256
//! admin_max_connections_per_address = 32
//! admin_header_timeout_ms = 10000
//! admin_body_timeout_ms = 30000
//!
//! [clients]                   # client id = argon2id hash of its secret
//! orders-service = "$argon2id$v=19$m=19456,t=2,p=1$..."
//!
//! [cluster]                   # optional: one node of a cluster (docs/replication.md)
//! node_id = 1
//! raft_listen = "127.0.0.1:7090"
//! # raft_source_ip = "10.0.0.1"  # where Raft connections leave from (default: the OS's choice)
//! # heartbeat_ms = 50
//! # election_timeout_ms = [200, 400]
//! # purge_after_entries = 4096  # a partition's Raft rows are purged in steps of this many
//! # scrub_interval_s = 86400     # each replica re-reads its records this often (0: never)
//! # scrub_bytes_per_second = 16777216
//! # consumer_lease = true     # one node (the metadata leader) serves every consumer
//! # leader_balance_interval_s = 300  # the metadata leader spreads partition leaderships this often (0: never)
//! [[cluster.peers]]           # every node, this one included; same list on each
//! id = 1
//! raft = "127.0.0.1:7090"
//! client = "127.0.0.1:7070"
//! ```
//!
//! **Development mode** is on when neither `[clients]` nor `admin_tokens`
//! is configured (or `mode = "development"`): any client may connect
//! anonymously, topics are approved at once, the admin API needs no token.
//! Otherwise (or with `mode = "production"`) every client and every admin
//! call must present a configured credential.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dmq_log_store::{FsyncPolicy, LogConfig};
use serde::Deserialize;

/// The smallest `max_frame_bytes` a broker runs with: room for every
/// answer's fixed part and for records of 63 KiB (a record may be
/// `max_frame_bytes - 1024`, PROTOCOL.md §8).
pub const MAX_FRAME_BYTES_MIN: u32 = 64 * 1024;

/// Everything `dmqd` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where topics, group state and delays live.
    pub data_dir: PathBuf,
    /// TCP address of the binary protocol.
    pub listen: SocketAddr,
    /// Durability of produces: "always" (default: fdatasync before the ack,
    /// group commit), "interval:<n>ms", or "never".
    pub fsync: String,
    /// Segment size of partition logs: a segment is rolled before it would
    /// grow past this. Its file is not reserved at this size: it grows in
    /// steps (the two settings below), so a quiet partition costs little.
    pub segment_bytes: u32,
    /// First allocation of a segment file, made by its first append; each
    /// later growth doubles the file (docs/storage.md §2).
    pub segment_preallocate_min_bytes: u32,
    /// Largest single growth of a segment file.
    pub segment_preallocate_step_max_bytes: u32,
    /// Segment files being appended to and group and delay journals held
    /// open at most: the least recently used are closed and opened again
    /// when next used, so quiet partitions and groups cost no descriptor.
    /// Busy files beyond this are reopened for their writes (slower).
    /// Sealed segments hold none (they are read through their mapping).
    pub max_open_files: usize,
    /// Sealed segments kept mapped at most (each maps its data and up to
    /// four index files): the least recently read are unmapped and mapped
    /// again by their next read. Keeps the process under Linux's
    /// `vm.max_map_count` (65,530 by default) with many partitions.
    pub max_mapped_segments: usize,
    /// Room kept on the data disk for acks, deletions and metadata: no
    /// segment grows if that would leave less free, and a reserve file
    /// of this size is released at start when the disk is full (see
    /// `disk_reserve`). 0 turns both off.
    pub disk_reserve_bytes: u64,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Frames larger than this are rejected before their body is read, and
    /// none is sent; records larger than this minus 1,024 bytes are refused
    /// (PROTOCOL.md §8). At least [`MAX_FRAME_BYTES_MIN`].
    pub max_frame_bytes: u32,
    /// A connection must send HELLO within this.
    pub handshake_timeout_ms: u64,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Frames queued for one connection's writer before it stops reading.
    pub connection_queue_frames: usize,
    /// Largest credit one subscription may hold.
    pub max_credit: u32,
    /// Connections from one IP address beyond this are refused.
    pub max_connections_per_address: usize,
    /// A new topic has at most this many partitions.
    pub max_partitions_per_topic: u32,
    /// A transaction open this long takes no more records and is checked
    /// back (docs/transactions.md).
    pub transaction_timeout_ms: u64,
    /// Check-backs of a transaction before it is left unresolved.
    pub transaction_max_checks: u32,
    /// The longest wait between two check-backs of a transaction.
    pub transaction_check_backoff_max_ms: u64,
    /// Check-backs per second of one producer group, at most.
    pub transaction_checks_per_second: u32,
    /// All topics together have at most this many partitions (each costs
    /// a directory, open files and a mapping; docs/storage.md).
    pub max_partitions_total: u32,
    /// Frames before HELLO larger than this are refused (HELLO is small;
    /// an unauthenticated peer may not make the broker buffer more).
    pub max_frame_bytes_before_hello: u32,
    /// Produces of one connection whose answers are not yet queued; past
    /// this the connection is not read until answers drain (backpressure
    /// for a client that does not read its answers).
    pub max_inflight_requests_per_connection: usize,
    /// Idempotent producers remembered by the dedup window.
    pub producer_window_max: usize,
    /// Bytes of answers the dedup window keeps at most. A producer's
    /// entry holds its latest 32 answers (about 100 bytes each for a batch
    /// stored in one partition, so about 3 KiB for a producer that sent 32
    /// or more): the default 64 MiB holds about 20,000 such producers, and
    /// the one that stored longest ago is forgotten first.
    pub producer_window_bytes_max: usize,
    /// Development mode listening on a non-loopback address: refused at
    /// start unless this is set (anyone who reaches the port could use the
    /// broker with no credentials).
    pub allow_remote_development: bool,
    /// Client id → argon2id hash of its secret.
    pub clients: BTreeMap<String, String>,
    /// Address of the admin HTTP API, the console and `/metrics`.
    pub admin_listen: SocketAddr,
    /// Argon2id hashes of the admin tokens.
    pub admin_tokens: Vec<String>,
    /// `"development"` or `"production"`; unset: development exactly when
    /// no clients and no admin tokens are configured.
    pub mode: Option<Mode>,
    /// Record the message trace.
    pub trace: bool,
    /// Trace records are kept this long.
    pub trace_retention_hours: u64,
    /// Size of a trace log segment; default: the smaller of 64 MiB and
    /// `segment_bytes` (a broker configured for a small disk gets a small
    /// trace).
    pub trace_segment_bytes: Option<u32>,
    /// The trace keeps at most about this many bytes (oldest segments go
    /// first); default: no bound but its age.
    pub trace_max_bytes: Option<u64>,
    /// Per-minute statistics are kept this long (at least 24).
    pub stats_retention_hours: u64,

    // ----- Admin listener hardening (docs/admin-api.md, "Who may call"
    // and "Limits"). Kept together, after everything else.
    /// Host names (`name` or `name:port`) the admin listener answers to
    /// besides its own address, `localhost`, `127.0.0.1` and `[::1]`: the
    /// names a reverse proxy or a remote browser uses. Any other `Host`
    /// is refused (DNS rebinding).
    pub admin_allowed_hosts: Vec<String>,
    /// Admin connections open at once; more are closed at once.
    pub admin_max_connections: usize,
    /// Admin connections open at once from one IP address.
    pub admin_max_connections_per_address: usize,
    /// A request's head (line and headers) must arrive within this; an
    /// idle keep-alive connection is closed after it too.
    pub admin_header_timeout_ms: u64,
    /// A request's body must arrive within this after its head.
    pub admin_body_timeout_ms: u64,

    /// Run as one node of a cluster (docs/replication.md); unset: a
    /// single node, as always.
    pub cluster: Option<ClusterConfig>,
}

/// The `[cluster]` section: this node and its peers. Every node of a
/// cluster is given the same list of `[[cluster.peers]]`.
///
/// ```toml
/// [cluster]
/// node_id = 1
/// raft_listen = "127.0.0.1:7090"
/// [[cluster.peers]]
/// id = 1
/// raft = "127.0.0.1:7090"
/// client = "127.0.0.1:7070"
/// [[cluster.peers]]
/// id = 2
/// raft = "127.0.0.1:7091"
/// client = "127.0.0.1:7071"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: one of the peers'.
    pub node_id: u64,
    /// Where this node serves Raft RPCs (its peer entry's `raft`, or an
    /// address that reaches it, e.g. `0.0.0.0:7090`).
    pub raft_listen: SocketAddr,
    /// The address this node's Raft connections to its peers leave from
    /// (unset: the one the OS picks): on a host with several addresses,
    /// the one the peers expect.
    #[serde(default)]
    pub raft_source_ip: Option<std::net::IpAddr>,
    /// Every node of the cluster, this one included.
    pub peers: Vec<ClusterPeer>,
    /// Raft heartbeat interval.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in this range
    /// starts an election.
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: (u64, u64),
    /// A partition replica's Raft rows (one per batch; the records are in
    /// its segment log) are purged in steps of this many entries, below
    /// what every member holds (docs/replication.md); 0: never.
    #[serde(default = "default_purge_after_entries")]
    pub purge_after_entries: u64,
    /// Each partition replica re-reads its records (checking every
    /// batch's CRC) once per this many seconds, to find damage no open
    /// re-reads; a damaged replica stops and is repaired from its peers at
    /// the node's next start (docs/replication.md); 0: never.
    #[serde(default = "default_scrub_interval_s")]
    pub scrub_interval_s: u64,
    /// How fast a replica re-reads, at most.
    #[serde(default = "default_scrub_bytes_per_second")]
    pub scrub_bytes_per_second: u64,
    /// One node at a time serves every consumer of cluster topics: the
    /// metadata leader, under a lease; the others answer `WrongNode`
    /// (docs/replication.md). On by default. Off, every node delivers
    /// from its own replica with its own cursor, so a group must consume
    /// through one node at a time (two nodes would each deliver the same
    /// messages).
    #[serde(default = "default_consumer_lease")]
    pub consumer_lease: bool,
    /// The metadata group's leader spreads the partitions' leaderships
    /// over the nodes this often, when one node leads at least two more
    /// groups than another ([`crate::cluster::Cluster::balance_leaders`],
    /// the metadata group itself left where it is, so consumers are not
    /// moved); 0: never (by hand only). Elections often put every
    /// partition on the node that started first.
    #[serde(default = "default_leader_balance_interval_s")]
    pub leader_balance_interval_s: u64,
}

fn default_leader_balance_interval_s() -> u64 {
    300
}

fn default_scrub_interval_s() -> u64 {
    24 * 60 * 60
}

fn default_scrub_bytes_per_second() -> u64 {
    16 << 20
}

fn default_purge_after_entries() -> u64 {
    4_096
}

fn default_consumer_lease() -> bool {
    true
}

fn default_heartbeat_ms() -> u64 {
    50
}

fn default_election_timeout_ms() -> (u64, u64) {
    (200, 400)
}

/// One node of a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPeer {
    /// Its id (unique, not 0).
    pub id: u64,
    /// Its Raft address, as the other nodes reach it.
    pub raft: String,
    /// Its binary-protocol address, as clients reach it.
    pub client: String,
}

impl ClusterConfig {
    /// Checks the node list: unique ids, this node among them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if peer.id == 0 || !ids.insert(peer.id) {
                return Err(ConfigError(format!(
                    "cluster.peers: id {} is 0 or listed twice",
                    peer.id
                )));
            }
        }
        if !ids.contains(&self.node_id) {
            return Err(ConfigError(format!(
                "cluster.node_id = {} is not one of cluster.peers",
                self.node_id
            )));
        }
        let (low, high) = self.election_timeout_ms;
        if self.heartbeat_ms == 0 || low <= self.heartbeat_ms || high <= low {
            return Err(ConfigError(
                "cluster: need 0 < heartbeat_ms < election_timeout_ms.0 < election_timeout_ms.1"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// Whether credentials are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Anonymous clients, auto-approved topics, an open admin API.
    Development,
    /// Every client and admin call is authenticated.
    Production,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            fsync: "always".to_string(),
            segment_bytes: 1 << 30,
            segment_preallocate_min_bytes: 64 << 10,
            segment_preallocate_step_max_bytes: 64 << 20,
            max_open_files: dmq_log_store::resources::DEFAULT_MAX_OPEN_FILES,
            max_mapped_segments: dmq_log_store::resources::DEFAULT_MAX_MAPPED_SEGMENTS,
            disk_reserve_bytes: 64 << 20,
            max_connections: 1024,
            max_frame_bytes: dmq_protocol::DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            connection_queue_frames: 4096,
            max_credit: 100_000,
            max_connections_per_address: 256,
            max_partitions_per_topic: 256,
            transaction_timeout_ms: 60_000,
            transaction_max_checks: 15,
            transaction_check_backoff_max_ms: 300_000,
            transaction_checks_per_second: 100,
            max_partitions_total: 4096,
            max_frame_bytes_before_hello: 64 * 1024,
            max_inflight_requests_per_connection: 1024,
            producer_window_max: 100_000,
            producer_window_bytes_max: 64 << 20,
            allow_remote_development: false,
            clients: BTreeMap::new(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            admin_tokens: Vec::new(),
            mode: None,
            trace: true,
            trace_retention_hours: 72,
            trace_segment_bytes: None,
            trace_max_bytes: None,
            stats_retention_hours: 48,

            // Admin listener hardening.
            admin_allowed_hosts: Vec::new(),
            admin_max_connections: 256,
            admin_max_connections_per_address: 32,
            admin_header_timeout_ms: 10_000,
            admin_body_timeout_ms: 30_000,

            cluster: None,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl BrokerConfig {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<BrokerConfig, ConfigError> {
        let config: BrokerConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what TOML alone cannot: the fsync policy, that credentials
    /// are argon2id hashes, the statistics window.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.log_config()?;
        for (client, hash) in &self.clients {
            crate::auth::check_hash(hash).map_err(|e| {
                ConfigError(format!(
                    "client {client:?}: {e} (generate one with `dmq hash-secret`)"
                ))
            })?;
        }
        for hash in &self.admin_tokens {
            crate::auth::check_hash(hash).map_err(|e| {
                ConfigError(format!(
                    "admin token: {e} (generate one with `dmq hash-secret`)"
                ))
            })?;
        }
        if self.max_frame_bytes < MAX_FRAME_BYTES_MIN {
            return Err(ConfigError(format!(
                "max_frame_bytes must be at least {MAX_FRAME_BYTES_MIN} (the largest record is \
                 max_frame_bytes - {}, see PROTOCOL.md §8)",
                dmq_protocol::RECORD_HEADROOM_BYTES
            )));
        }
        if self.transaction_timeout_ms == 0 || self.transaction_checks_per_second == 0 {
            return Err(ConfigError(
                "transaction_timeout_ms and transaction_checks_per_second must be positive"
                    .to_string(),
            ));
        }
        if self.stats_retention_hours < 24 {
            return Err(ConfigError(
                "stats_retention_hours must be at least 24".to_string(),
            ));
        }
        if self.development_mode() && !self.allow_remote_development {
            for (what, address) in [("listen", self.listen), ("admin_listen", self.admin_listen)] {
                if !address.ip().is_loopback() {
                    return Err(ConfigError(format!(
                        "development mode (no credentials) on {what} = {address}: anyone who \
                         reaches it could use the broker. Listen on 127.0.0.1, configure \
                         [clients] and admin_tokens, or set allow_remote_development = true \
                         (--allow-remote-development)"
                    )));
                }
            }
        }
        if self.trace_retention_hours == 0 {
            return Err(ConfigError(
                "trace_retention_hours must be at least 1".to_string(),
            ));
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        self.validate_admin_listener()
    }

    /// Checks the admin listener's hardening settings.
    fn validate_admin_listener(&self) -> Result<(), ConfigError> {
        for host in &self.admin_allowed_hosts {
            crate::admin::AllowedHost::parse(host)
                .map_err(|e| ConfigError(format!("admin_allowed_hosts: {host:?}: {e}")))?;
        }
        let positive = [
            ("admin_max_connections", self.admin_max_connections as u64),
            (
                "admin_max_connections_per_address",
                self.admin_max_connections_per_address as u64,
            ),
            ("admin_header_timeout_ms", self.admin_header_timeout_ms),
            ("admin_body_timeout_ms", self.admin_body_timeout_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The fsync setting as a policy.
    pub fn fsync_policy(&self) -> Result<FsyncPolicy, ConfigError> {
        match self.fsync.as_str() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let millis = other
                    .strip_prefix("interval:")
                    .and_then(|rest| rest.strip_suffix("ms"))
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "fsync must be \"always\", \"never\" or \"interval:<n>ms\", not {other:?}"
                        ))
                    })?;
                Ok(FsyncPolicy::Interval(Duration::from_millis(millis)))
            }
        }
    }

    /// The log configuration every partition gets.
    pub fn log_config(&self) -> Result<LogConfig, ConfigError> {
        let config = LogConfig {
            segment_bytes_max: self.segment_bytes,
            preallocate_min_bytes: self.segment_preallocate_min_bytes,
            preallocate_step_max_bytes: self.segment_preallocate_step_max_bytes,
            fsync: self.fsync_policy()?,
            min_free_bytes: self.disk_reserve_bytes,
            ..LogConfig::default()
        };
        config.validate().map_err(|e| ConfigError(e.to_string()))?;
        Ok(config)
    }

    /// Whether anonymous clients are admitted, topics approved at once and
    /// the admin API open.
    pub fn development_mode(&self) -> bool {
        match self.mode {
            Some(mode) => mode == Mode::Development,
            None => self.clients.is_empty() && self.admin_tokens.is_empty(),
        }
    }

    /// The dispatcher's settings.
    pub fn dispatcher_config(&self) -> dmq_dispatcher::DispatcherConfig {
        dmq_dispatcher::DispatcherConfig {
            max_partitions_per_topic: self.max_partitions_per_topic,
            transactions: dmq_dispatcher::TransactionLimits {
                timeout_ms: self.transaction_timeout_ms,
                max_checks: self.transaction_max_checks,
                check_backoff_max_ms: self.transaction_check_backoff_max_ms,
                checks_per_second: self.transaction_checks_per_second,
                ..dmq_dispatcher::TransactionLimits::default()
            },
            max_partitions_total: self.max_partitions_total,
            ..dmq_dispatcher::DispatcherConfig::default()
        }
    }

    /// Settings of the trace and statistics.
    pub fn telemetry_config(&self) -> crate::telemetry::TelemetryConfig {
        crate::telemetry::TelemetryConfig {
            trace_enabled: self.trace,
            trace_retention_hours: self.trace_retention_hours,
            trace_segment_bytes: self
                .trace_segment_bytes
                .unwrap_or(crate::telemetry::TRACE_SEGMENT_BYTES.min(self.segment_bytes)),
            trace_max_bytes: self.trace_max_bytes,
            min_free_bytes: self.disk_reserve_bytes,
            stats_retention_hours: self.stats_retention_hours,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml() {
        let config = BrokerConfig::default();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:7080");
        assert_eq!(config.fsync_policy().ok(), Some(FsyncPolicy::Always));
        assert!(config.development_mode());
        let hash = crate::auth::hash_secret("s").unwrap();
        let parsed = BrokerConfig::from_toml(&format!(
            "listen = \"127.0.0.1:9000\"\nfsync = \"interval:10ms\"\n[clients]\na = \"{hash}\"\n"
        ))
        .expect("valid");
        assert_eq!(parsed.listen.port(), 9000);
        assert_eq!(
            parsed.fsync_policy().ok(),
            Some(FsyncPolicy::Interval(Duration::from_millis(10)))
        );
        assert!(!parsed.development_mode());
        assert!(BrokerConfig::from_toml("fsync = \"sometimes\"").is_err());
        assert!(BrokerConfig::from_toml("unknown = 1").is_err());
        assert!(BrokerConfig::from_toml("stats_retention_hours = 2").is_err());
        assert!(BrokerConfig::from_toml("max_frame_bytes = 65536").is_ok());
        let error = BrokerConfig::from_toml("max_frame_bytes = 65535").expect_err("too small");
        assert!(error.to_string().contains("65536"), "{error}");
    }

    #[test]
    fn a_cluster_serves_consumers_from_one_node_unless_told() {
        let section = "[cluster]\nnode_id = 1\nraft_listen = \"127.0.0.1:7090\"\n\
                       [[cluster.peers]]\nid = 1\nraft = \"127.0.0.1:7090\"\n\
                       client = \"127.0.0.1:7070\"\n";
        let cluster = |text: &str| BrokerConfig::from_toml(text).expect("valid").cluster;
        let default = cluster(section).expect("a cluster");
        assert!(
            default.consumer_lease,
            "the consumer lease is on by default"
        );
        let off = section.replace("[cluster]\n", "[cluster]\nconsumer_lease = false\n");
        assert!(!cluster(&off).expect("a cluster").consumer_lease);
        // The metadata leader balances leaderships every 5 minutes unless told.
        assert_eq!(default.leader_balance_interval_s, 300);
        let never = section.replace("[cluster]\n", "[cluster]\nleader_balance_interval_s = 0\n");
        assert_eq!(
            cluster(&never)
                .expect("a cluster")
                .leader_balance_interval_s,
            0
        );
    }

    #[test]
    fn development_mode_stays_on_loopback_unless_told() {
        let error = BrokerConfig::from_toml("listen = \"0.0.0.0:7070\"")
            .expect_err("dev mode on every interface");
        assert!(
            error.to_string().contains("allow_remote_development"),
            "{error}"
        );
        assert!(BrokerConfig::from_toml("admin_listen = \"0.0.0.0:7080\"").is_err());
        assert!(BrokerConfig::from_toml(
            "listen = \"0.0.0.0:7070\"\nallow_remote_development = true"
        )
        .is_ok());
        let hash = crate::auth::hash_secret("t").unwrap();
        assert!(BrokerConfig::from_toml(&format!(
            "listen = \"0.0.0.0:7070\"\nadmin_tokens = [\"{hash}\"]"
        ))
        .is_ok());
    }

    #[test]
    fn credentials_must_be_hashes_and_decide_the_mode() {
        let error = BrokerConfig::from_toml("[clients]\norders = \"plain-secret\"\n")
            .expect_err("plaintext secrets are refused");
        assert!(error.to_string().contains("orders"), "{error}");
        assert!(BrokerConfig::from_toml("admin_tokens = [\"token\"]").is_err());
        let hash = crate::auth::hash_secret("t").unwrap();
        let admin_only =
            BrokerConfig::from_toml(&format!("admin_tokens = [\"{hash}\"]")).expect("valid");
        assert!(
            !admin_only.development_mode(),
            "any credential means production"
        );
        let forced = BrokerConfig::from_toml("mode = \"production\"").expect("valid");
        assert!(
            !forced.development_mode(),
            "production with nothing configured"
        );
        let dev = BrokerConfig::from_toml(&format!(
            "mode = \"development\"\nadmin_tokens = [\"{hash}\"]"
        ))
        .expect("valid");
        assert!(dev.development_mode());
    }

    #[test]
    fn admin_listener_settings_are_checked() {
        let config = BrokerConfig::from_toml(
            "admin_allowed_hosts = [\"dmq.example.com\", \"proxy:8443\", \"[::1]\"]\n\
             admin_max_connections = 10\nadmin_max_connections_per_address = 2\n\
             admin_header_timeout_ms = 500\nadmin_body_timeout_ms = 700\n",
        )
        .expect("valid");
        assert_eq!(config.admin_allowed_hosts.len(), 3);
        assert_eq!(config.admin_max_connections_per_address, 2);
        for bad in [
            "admin_allowed_hosts = [\"http://dmq.example.com\"]",
            "admin_allowed_hosts = [\"a/b\"]",
            "admin_allowed_hosts = [\"\"]",
            "admin_max_connections = 0",
            "admin_max_connections_per_address = 0",
            "admin_header_timeout_ms = 0",
            "admin_body_timeout_ms = 0",
        ] {
            assert!(BrokerConfig::from_toml(bad).is_err(), "{bad}");
        }
        let defaults = BrokerConfig::default();
        assert!(defaults.admin_allowed_hosts.is_empty());
        assert!(defaults.admin_max_connections_per_address <= defaults.admin_max_connections);
    }
}
