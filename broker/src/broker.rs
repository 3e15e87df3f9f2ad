//! [`Broker`]: a whole running `dmqd` — the engine, the topic registry, the
//! binary-protocol listener and the admin HTTP listener — started and
//! stopped as one. `dmqd` and the integration tests use it alike.
//!
//! At start the registry and the dispatcher are reconciled, because a crash
//! can fall between writing one and the other:
//! - a dispatcher topic with no registry entry (not a dead-letter or
//!   internal topic) is registered: approved in development mode, pending
//!   otherwise, so an administrator sees it;
//! - a registry entry with no dispatcher topic gets its topic created.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dmq_dispatcher::{Dispatcher, TopicConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::Credentials;
use crate::config::{BrokerConfig, ConfigError};
use crate::engine::{Engine, EngineError, StartError as EngineStartError};
use crate::registry::{Registry, RegistryError, TopicRecord, TopicStatus};

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

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineStartError),
    /// The registry could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry and the dispatcher could not be reconciled.
    #[error("reconciling the registry with the topics: {0}")]
    Reconcile(String),
    /// A listener could not be bound.
    #[error("listening on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running broker.
pub struct Broker {
    services: Services,
    stop: Option<oneshot::Sender<()>>,
    protocol: Option<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
}

impl Broker {
    /// Opens the data directory, reconciles the registry, binds
    /// `config.listen` and `config.admin_listen` (port 0 picks a free port)
    /// and serves both until [`shutdown`](Self::shutdown).
    pub async fn start(config: BrokerConfig) -> Result<Broker, StartError> {
        config.validate()?;
        crate::disk_reserve::prepare(&config.data_dir, config.disk_reserve_bytes).map_err(
            |source| StartError::Reconcile(format!("preparing the disk reserve: {source}")),
        )?;
        let engine_config = config.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::start(&engine_config))
            .await
            .map_err(|e| StartError::Reconcile(format!("the start task failed: {e}")))??;
        let registry = Registry::open(&config.data_dir)?;
        let registry = Arc::new(RwLock::new(registry));
        reconcile(&engine, &registry, config.development_mode()).await?;
        let protocol_listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    address: config.listen,
                    source,
                })?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                address: config.admin_listen,
                source,
            })?;
        let bound = |listener: &TcpListener, address| {
            listener
                .local_addr()
                .map_err(|source| StartError::Bind { address, source })
        };
        let protocol_addr = bound(&protocol_listener, config.listen)?;
        let admin_addr = bound(&admin_listener, config.admin_listen)?;
        if config.development_mode() {
            tracing::warn!(
                "development mode: anonymous local clients are admitted, topics are \
                 approved at once and the admin API needs no token (from 127.0.0.1 \
                 only); configure [clients] and admin_tokens (or mode = \"production\") \
                 for production"
            );
        }
        let services = Services {
            credentials: Arc::new(Credentials::new(
                config.clients.clone(),
                config.admin_tokens.clone(),
            )),
            engine,
            config: Arc::new(config),
            registry,
            started: Instant::now(),
            protocol_addr,
            admin_addr,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        let protocol = tokio::spawn(crate::server::run(
            protocol_listener,
            services.clone(),
            async move {
                let _ = stopped.await;
                let _ = stop_admin.send(true);
            },
        ));
        tokio::spawn(crate::admin::enforce_retention(
            services.clone(),
            admin_stopped.clone(),
        ));
        let admin = tokio::spawn(crate::admin::serve(
            admin_listener,
            services.clone(),
            async move {
                let mut admin_stopped = admin_stopped;
                let _ = admin_stopped.wait_for(|stop| *stop).await;
            },
        ));
        Ok(Broker {
            services,
            stop: Some(stop),
            protocol: Some(protocol),
            admin: Some(admin),
        })
    }

    /// Address of the binary protocol.
    pub fn protocol_addr(&self) -> SocketAddr {
        self.services.protocol_addr
    }

    /// Address of the admin HTTP API and console.
    pub fn admin_addr(&self) -> SocketAddr {
        self.services.admin_addr
    }

    /// What the broker's connections share (tests inspect it).
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Stops accepting, drains sessions, makes every ack durable, stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(protocol) = self.protocol.take() {
            let _ = protocol.await;
        }
        if let Some(mut admin) = self.admin.take() {
            // Open keep-alive connections may hold the server: it gets a
            // few seconds, then is stopped (it holds the engine's logs).
            if tokio::time::timeout(Duration::from_secs(5), &mut admin)
                .await
                .is_err()
            {
                admin.abort();
                let _ = admin.await;
            }
        }
    }
}

/// Dead-letter topics of every group, and internal topics: never registered.
pub(crate) fn unregistered_topics(dispatcher: &Dispatcher) -> BTreeSet<String> {
    let internal = dispatcher
        .topics()
        .into_iter()
        .map(|(topic, _)| topic)
        .filter(|topic| topic.starts_with("__"));
    let dead_letters = dispatcher
        .dead_letter_topics()
        .into_iter()
        .map(|dead_letter| dead_letter.topic);
    internal.chain(dead_letters).collect()
}

/// A registry entry for a topic that exists without one.
pub(crate) fn adopted_record(name: &str, config: &TopicConfig, status: TopicStatus) -> TopicRecord {
    let now = now_ms();
    let defaults = dmq_dispatcher::GroupConfig::default();
    TopicRecord {
        name: name.to_string(),
        environment: String::new(),
        department: String::new(),
        short_name: name.to_string(),
        owner: String::new(),
        description: String::new(),
        business_use: String::new(),
        status,
        partitions: config.partitions,
        ordered: config.ordered,
        retention_hours: None,
        default_ttl_ms: None,
        max_attempts: defaults.max_attempts,
        ack_timeout_ms: defaults.ack_timeout_ms,
        producers: Vec::new(),
        consumers: Vec::new(),
        created_ms: now,
        updated_ms: now,
    }
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn reconcile(
    engine: &Engine,
    registry: &SharedRegistry,
    development: bool,
) -> Result<(), StartError> {
    let failed = |e: EngineError| StartError::Reconcile(e.to_string());
    let (topics, skip) = engine
        .call(|dispatcher, _| (dispatcher.topics(), unregistered_topics(dispatcher)))
        .await
        .map_err(failed)?;
    let status = if development {
        TopicStatus::Approved
    } else {
        TopicStatus::Pending
    };
    let registered: Vec<TopicRecord> = {
        let mut registry = registry.write().unwrap_or_else(|p| p.into_inner());
        for (name, config) in &topics {
            if skip.contains(name) || registry.get(name).is_some() {
                continue;
            }
            tracing::warn!(
                topic = name,
                ?status,
                "registering a topic found without a registry entry"
            );
            registry.insert(adopted_record(name, config, status))?;
        }
        registry.list()
    };
    for record in registered {
        if topics.iter().any(|(name, _)| *name == record.name) {
            continue;
        }
        tracing::warn!(
            topic = record.name,
            "creating the topic of a registry entry"
        );
        // A registry entry whose topic cannot be made (quarantined, no room
        // on the disk) must not keep the broker from starting: it is
        // reported and retried at the next start.
        if let Err(error) =
            create_topic(engine, &record.name, record.partitions, record.ordered).await
        {
            tracing::error!(
                topic = record.name,
                %error,
                "the registry's topic could not be created; starting without it"
            );
        }
    }
    Ok(())
}

/// Creates a topic on the dispatcher and opens its logs for produce;
/// returns its configuration. A name that exists (whatever its settings)
/// is `DispatchError::TopicExists`: every caller (CREATE_TOPIC, the admin
/// API, the start-up reconciliation, which creates only missing topics)
/// learns that the topic was there.
pub(crate) async fn create_topic(
    engine: &Engine,
    name: &str,
    partitions: u32,
    ordered: bool,
) -> Result<TopicConfig, EngineError> {
    let config = TopicConfig {
        partitions,
        ordered,
    };
    let topic = name.to_string();
    let handle = engine
        .call(move |dispatcher, _| {
            dispatcher.create_topic(&topic, config)?;
            crate::engine::TopicHandle::of(dispatcher, &topic)
        })
        .await??;
    let config = handle.config.clone();
    engine.register_topic(name.to_string(), handle);
    Ok(config)
}
