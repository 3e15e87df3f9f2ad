//! What every connection and admin request shares ([`Services`]), and the
//! broker's wall clock ([`now_ms`]).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::auth::Credentials;
use crate::config::BrokerConfig;
use crate::engine::Engine;
use crate::registry::Registry;

/// The registry, shared by sessions and the admin API.
pub type SharedRegistry = Arc<RwLock<Registry>>;

/// Everything a connection or an admin request may use. Cheap to clone.
#[derive(Clone)]
pub struct Services {
    /// The dispatcher thread and the produce path.
    pub engine: Engine,
    /// The configuration the broker runs with.
    pub config: Arc<BrokerConfig>,
    /// The topic registry.
    pub registry: SharedRegistry,
    /// Client secrets and admin tokens.
    pub credentials: Arc<Credentials>,
    /// When the broker started.
    pub started: Instant,
    /// Addresses actually bound (port 0 resolved).
    pub protocol_addr: SocketAddr,
    /// Address of the admin HTTP listener.
    pub admin_addr: SocketAddr,
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
