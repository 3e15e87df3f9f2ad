//! Broker configuration: defaults that run with no arguments, a TOML file,
//! and flags on top (see `dmqd --help`).
//!
//! ```toml
//! data_dir = "./data"
//! listen = "127.0.0.1:7070"
//! fsync = "always"            # "always" | "never" | "interval:10ms"
//! segment_bytes = 1073741824
//! max_connections = 1024
//! max_frame_bytes = 16777216
//! handshake_timeout_ms = 5000
//! idle_timeout_ms = 300000
//!
//! [clients]                   # no table: development mode, anyone may connect
//! orders-service = "secret"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dmq_log_store::{FsyncPolicy, LogConfig};
use serde::Deserialize;

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
    /// Segment size of partition logs.
    pub segment_bytes: u32,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Frames larger than this are rejected before their body is read.
    pub max_frame_bytes: u32,
    /// A connection must send HELLO within this.
    pub handshake_timeout_ms: u64,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Frames queued for one connection's writer before it stops reading.
    pub connection_queue_frames: usize,
    /// Largest credit one subscription may hold.
    pub max_credit: u32,
    /// Client id → secret. Empty: development mode (anyone may connect).
    pub clients: BTreeMap<String, String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            fsync: "always".to_string(),
            segment_bytes: 1 << 30,
            max_connections: 1024,
            max_frame_bytes: dmq_protocol::DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            connection_queue_frames: 4096,
            max_credit: 100_000,
            clients: BTreeMap::new(),
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
        config.fsync_policy()?;
        Ok(config)
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
            fsync: self.fsync_policy()?,
            ..LogConfig::default()
        };
        config.validate().map_err(|e| ConfigError(e.to_string()))?;
        Ok(config)
    }

    /// Whether anonymous clients are admitted.
    pub fn development_mode(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml() {
        let config = BrokerConfig::default();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(config.fsync_policy().ok(), Some(FsyncPolicy::Always));
        assert!(config.development_mode());
        let parsed = BrokerConfig::from_toml(
            "listen = \"127.0.0.1:9000\"\nfsync = \"interval:10ms\"\n[clients]\na = \"s\"\n",
        )
        .expect("valid");
        assert_eq!(parsed.listen.port(), 9000);
        assert_eq!(
            parsed.fsync_policy().ok(),
            Some(FsyncPolicy::Interval(Duration::from_millis(10)))
        );
        assert!(!parsed.development_mode());
        assert!(BrokerConfig::from_toml("fsync = \"sometimes\"").is_err());
        assert!(BrokerConfig::from_toml("unknown = 1").is_err());
    }
}
