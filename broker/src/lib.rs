//! `dmq-broker`: the DMQ server.
//!
//! # Layout
//! - [`broker`]: [`Broker`], the whole server started and stopped as one
//!   (engine, registry, both listeners).
//! - [`services`]: [`Services`], what every connection and admin request
//!   shares; the broker's wall clock.
//! - [`topics`]: creating a topic, the topics the registry never lists, the
//!   start-up reconciliation of registry and dispatcher.
//! - [`server`]: [`server::run`], the accept loop (bounded connections,
//!   graceful shutdown).
//! - `session`: one connection: framing, HELLO, one handler per request.
//! - [`engine`]: the dispatcher on its own thread, the topics' handles
//!   (router and logs), parked FETCHes.
//! - `produce`: the produce pipeline (route, dedup, append, wait for
//!   durability, trace, wake), shared by PRODUCE, test messages and resend.
//! - `convert`: wire types ↔ dispatcher and log types, errors → wire codes.
//! - `frame_limits`: no frame over `max_frame_bytes` is sent: records over
//!   the maximum record size refused, FETCH answers filled to the limit.
//! - [`dedup`]: the idempotent producers' bounded dedup window.
//! - [`disk_reserve`]: room kept for acks, deletions and metadata when the
//!   disk is full.
//! - [`config`]: [`BrokerConfig`], defaults, TOML, flags, development mode.
//! - [`consumer_lease`]: which node of a cluster serves the consumers of
//!   cluster topics (the metadata leader, under a lease).
//! - [`connection_limits`]: per-listener and per-address connection caps,
//!   refusals logged once per interval (both listeners).
//! - [`auth`]: argon2id credentials, the failed-attempt rate limit.
//! - [`registry`]: the topic registry (status, owner, rights), crash-safe.
//! - [`admin`]: the admin HTTP API (axum) and `/metrics`.
//! - `console`: the web console's embedded assets.
//! - [`telemetry`]: the message trace, per-minute statistics, metrics.
//!
//! The binary `dmqd` (src/bin/dmqd.rs) is thin: it parses flags, calls
//! [`Broker::start`] and waits for a signal.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod connection_limits;
mod console;
pub mod consumer_lease;
mod convert;
pub mod dedup;
pub mod disk_reserve;
pub mod engine;
mod frame_limits;
mod produce;
pub mod registry;
pub mod server;
pub mod services;
mod session;
pub mod telemetry;
pub mod topics;

pub use broker::{Broker, StartError, Stopped};
pub use config::BrokerConfig;
pub use engine::Engine;
pub use services::Services;
