//! `dmq-broker`: the DMQ server.
//!
//! # Layout
//! - [`server`]: [`server::run`], the accept loop (bounded connections,
//!   graceful shutdown).
//! - `session`: one connection: framing, HELLO, one handler per request.
//! - [`engine`]: the dispatcher on its own thread, and the produce path
//!   (appends from every connection share group commits).
//! - `convert`: wire types ↔ dispatcher and log types, errors → wire codes.
//! - [`config`]: [`BrokerConfig`], defaults, TOML, flags.
//!
//! The binary `dmqd` (src/bin/dmqd.rs) is thin: it parses flags, starts the
//! engine, binds the listener and calls [`server::run`].

pub mod config;
mod convert;
pub mod engine;
pub mod server;
mod session;

pub use config::BrokerConfig;
pub use engine::Engine;
