//! [`Broker`]: a whole running `dmqd` — the engine, the topic registry, the
//! binary-protocol listener and the admin HTTP listener — started and
//! stopped as one. `dmqd` and the integration tests use it alike.
//!
//! At start the registry and the dispatcher are reconciled
//! ([`crate::topics::reconcile`]). This module only starts and stops: what
//! the parts share is in [`crate::services`], topic creation in
//! [`crate::topics`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::Credentials;
use crate::cluster::Cluster;
use crate::config::{BrokerConfig, ConfigError};
use crate::engine::{Engine, StartError as EngineStartError};
use crate::registry::{Registry, RegistryError};
use crate::services::Services;

/// Why [`Broker::run_until`] stopped the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The signal it was given completed.
    Signal,
    /// This cluster node was removed from its cluster.
    RemovedFromCluster,
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
    /// The node's cluster side could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
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
    /// A cluster node's Raft side, stopped after the engine.
    cluster: Option<Arc<Cluster>>,
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
        let cluster = match &config.cluster {
            Some(_) => Some(Cluster::start(&config).await?),
            None => None,
        };
        let engine_config = config.clone();
        let engine_cluster = cluster.clone();
        let engine =
            tokio::task::spawn_blocking(move || Engine::start_with(&engine_config, engine_cluster))
                .await
                .map_err(|e| StartError::Reconcile(format!("the start task failed: {e}")))??;
        let registry = Registry::open(&config.data_dir)?;
        let registry = Arc::new(RwLock::new(registry));
        crate::topics::reconcile(&engine, &registry, config.development_mode())
            .await
            .map_err(|error| match error {
                crate::topics::ReconcileError::Registry(error) => StartError::Registry(error),
                error => StartError::Reconcile(error.to_string()),
            })?;
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
        if let Some(cluster) = &cluster {
            tokio::spawn(
                Arc::clone(cluster)
                    .keep_consumer_lease(services.engine.clone(), admin_stopped.clone()),
            );
            tokio::spawn(Arc::clone(cluster).balance_leaders_periodically(admin_stopped.clone()));
            tokio::spawn(Arc::clone(cluster).follow_topics(
                services.engine.clone(),
                services.registry.clone(),
                services.config.development_mode(),
                admin_stopped.clone(),
            ));
        }
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
            cluster,
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

    /// Serves until `signal` completes (or, on a cluster node, until the
    /// node learns it was removed from the cluster), then shuts down.
    /// Says which.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Stopped {
        let removed = async {
            match &self.cluster {
                Some(cluster) => cluster.removed().await,
                None => std::future::pending().await,
            }
        };
        let stopped = tokio::select! {
            () = signal => Stopped::Signal,
            () = removed => Stopped::RemovedFromCluster,
        };
        if stopped == Stopped::RemovedFromCluster {
            tracing::error!(
                "this node was removed from the cluster (dmq cluster remove-node): stopping; \
                 delete its data directory and take it out of every node's [[cluster.peers]]"
            );
        }
        self.shutdown().await;
        stopped
    }

    /// Stops accepting, drains sessions, makes every ack durable, stops.
    /// A cluster node first hands the groups it leads to its peers, so
    /// they go on without waiting for an election.
    pub async fn shutdown(mut self) {
        if let Some(cluster) = &self.cluster {
            cluster.hand_over_leaderships().await;
        }
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
        // The engine has stopped (the protocol task stops it): nothing
        // writes to a replica any more.
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await;
        }
    }
}
