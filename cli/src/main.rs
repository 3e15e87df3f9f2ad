//! # dmq: the DMQ command line
//!
//! Noun-verb commands over the async client: `dmq topic ...`,
//! `dmq produce`, `dmq consume`, `dmq group ...`, `dmq bench`; and over
//! the admin HTTP API (docs/admin-api.md): `dmq message get|query|delete`,
//! `dmq trace`, `dmq stats`, `dmq dlq list|resend`. `dmq hash-secret`
//! prints the argon2id hash of a secret for dmqd's configuration. Every
//! command takes `--addr`, `--client-id`, `--secret`, `--admin`, `--token`
//! and `--format table|json`. Errors go to stderr with exit code 1 (2 for
//! usage errors).
//!
//! # Layout
//!
//! - `main.rs`: arguments (clap derive), the runtime, error reporting.
//! - [`output`]: table and JSON rendering, time and byte formatting.
//! - [`topic`], [`produce`], [`consume`], [`group`], [`bench`]: one
//!   module per noun, over the async client in a tokio runtime.
//! - [`admin`]: the blocking admin API client; [`message`], [`trace`],
//!   [`stats`], [`dlq`] use it, outside any runtime.
//! - [`hash_secret`]: `dmq hash-secret`.

#![forbid(unsafe_code)]

mod admin;
mod bench;
mod cluster;
mod consume;
mod dlq;
mod group;
mod hash_secret;
mod message;
mod output;
mod produce;
mod stats;
mod topic;
mod trace;
mod tx;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dmq_client::{Client, ClientOptions};

use crate::output::Format;

/// The allocator dmqd uses: `dmq bench` shares the cores with the broker
/// it measures, and glibc malloc cost it a fifth of its time.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command line for the DMQ message broker.
#[derive(Debug, Parser)]
#[command(name = "dmq", version, about, propagate_version = true)]
pub struct Cli {
    /// Broker address (host:port); a cluster's nodes may be listed
    /// separated by commas (the next is tried when one does not answer).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "127.0.0.1:7070"
    )]
    pub addr: String,
    /// Client id sent in HELLO.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "dmq-cli"
    )]
    pub client_id: String,
    /// Secret sent in HELLO (none when the broker runs in development
    /// mode); for `hash-secret`, the secret to hash.
    #[arg(long, global = true, help_heading = "Global options")]
    pub secret: Option<String>,
    /// Admin API base URL (message, trace, stats, dlq).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "DMQ_ADMIN",
        default_value = "http://127.0.0.1:7080"
    )]
    pub admin: String,
    /// Admin token, sent as `Authorization: Bearer` (not needed in
    /// development mode).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "DMQ_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Timeout of each request to the broker or the admin API (e.g. 10s,
    /// 500ms); message deletions and resends wait as long as they take.
    #[arg(long, global = true, help_heading = "Global options", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The nouns.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce messages from arguments or from stdin lines.
    Produce(produce::ProduceArgs),
    /// Consume messages as a member of a group.
    Consume(consume::ConsumeArgs),
    /// List, describe and seek consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// End-to-end load generator: produce, consume, report latencies.
    Bench(bench::BenchArgs),
    /// Find, show and delete stored messages (admin API).
    #[command(subcommand)]
    Message(message::MessageCommand),
    /// A message's timeline: produced, stored, delivered, acked... (admin API).
    Trace(trace::TraceArgs),
    /// Per-minute counts of produced, delivered, acked, retried, expired
    /// and dead-lettered messages (admin API).
    Stats(stats::StatsArgs),
    /// List dead-letter topics and resend their messages (admin API).
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// List unsettled transactions and resolve them (admin API).
    #[command(subcommand)]
    Tx(tx::TxCommand),
    /// A cluster node's view of its cluster (admin API).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Print the argon2id hash of a secret (--secret, or the first line of
    /// stdin) for dmqd's config: `[clients]` or `admin_tokens`.
    HashSecret,
}

/// Parses `10m`, `1h 30m`, `250ms`, ... (humantime).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("invalid duration `{text}`: {error}"))
}

impl Cli {
    /// Connects with the global options.
    pub async fn connect(&self) -> Result<Client> {
        let mut options = ClientOptions::new(self.client_id.clone())
            .secret(self.secret.clone().unwrap_or_default().into_bytes())
            .request_timeout(self.timeout);
        options.connect_timeout = self.timeout;
        Ok(Client::connect(self.addr.clone(), options).await?)
    }
}

/// Runs the command: the admin API commands (blocking HTTP) and
/// `hash-secret` directly, the others in a tokio runtime.
fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Topic(command) => block_on(topic::run(cli, command)),
        Command::Produce(args) => block_on(produce::run(cli, args)),
        Command::Consume(args) => block_on(consume::run(cli, args)),
        Command::Group(command) => block_on(group::run(cli, command)),
        Command::Bench(args) => block_on(bench::run(cli, args)),
        Command::Message(command) => message::run(cli, command),
        Command::Trace(args) => trace::run(cli, args),
        Command::Stats(args) => stats::run(cli, args),
        Command::Dlq(command) => dlq::run(cli, command),
        Command::Tx(command) => tx::run(cli, command),
        Command::Cluster(command) => cluster::run(cli, command),
        Command::HashSecret => hash_secret::run(cli),
    }
}

/// Runs a future to completion in a new multi-threaded runtime.
fn block_on(future: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
