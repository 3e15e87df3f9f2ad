//! Topics as the broker sees them: creating one (dispatcher first, then
//! the engine's handle for produce), the topics the registry never lists
//! (dead-letter and internal ones), and the start-up reconciliation of the
//! registry with the dispatcher, because a crash can fall between writing
//! one and the other:
//! - a dispatcher topic with no registry entry (not a dead-letter or
//!   internal topic) is registered: approved in development mode, pending
//!   otherwise, so an administrator sees it;
//! - a registry entry with no dispatcher topic gets its topic created.

use std::collections::BTreeSet;

use dmq_dispatcher::{DispatchError, Dispatcher, TopicConfig};

use crate::engine::{Engine, EngineError};
use crate::registry::{RegistryError, TopicRecord, TopicStatus};
use crate::services::{now_ms, SharedRegistry};

/// Why the registry and the dispatcher could not be reconciled.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The dispatcher could not be asked for its topics.
    #[error("reading the dispatcher's topics: {0}")]
    Engine(#[from] EngineError),
    /// The registry could not be written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
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

pub(crate) async fn reconcile(
    engine: &Engine,
    registry: &SharedRegistry,
    development: bool,
) -> Result<(), ReconcileError> {
    let (topics, skip) = engine
        .call(|dispatcher, _| (dispatcher.topics(), unregistered_topics(dispatcher)))
        .await?;
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
/// learns that the topic was there. On a cluster node the topic is created
/// in the cluster first (`crate::cluster`).
pub(crate) async fn create_topic(
    engine: &Engine,
    name: &str,
    partitions: u32,
    ordered: bool,
) -> Result<TopicConfig, EngineError> {
    match engine.cluster() {
        Some(cluster) => {
            cluster
                .create_topic(engine, name, partitions, ordered)
                .await
        }
        None => create_local_topic(engine, name, partitions, ordered).await,
    }
}

/// Deletes a topic from the dispatcher (its groups, its files) and from
/// the engine's produce paths; the registry is the caller's. On a cluster
/// node a cluster topic is deleted in the cluster first, and every node
/// removes its own replicas (`crate::cluster`).
pub(crate) async fn delete_topic(
    engine: &Engine,
    registry: &SharedRegistry,
    name: &str,
) -> Result<(), EngineError> {
    match engine.cluster() {
        Some(cluster) if cluster.storage().is_replicated(name) => {
            cluster.delete_topic(engine, registry, name).await
        }
        _ => delete_local_topic(engine, name).await,
    }
}

/// [`delete_topic`] on this node's dispatcher only.
pub(crate) async fn delete_local_topic(engine: &Engine, name: &str) -> Result<(), EngineError> {
    let topic = name.to_string();
    engine
        .call(move |dispatcher, routes| {
            for member in dispatcher.delete_topic(&topic)? {
                routes.remove(member);
            }
            Ok::<(), DispatchError>(())
        })
        .await??;
    engine.unregister_topic(name);
    Ok(())
}

/// [`create_topic`] on this node's dispatcher only.
pub(crate) async fn create_local_topic(
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
