//! # dmq: the DMQ command line
//!
//! Noun-verb commands over the async client: `dmq topic ...`,
//! `dmq produce`, `dmq consume`, `dmq group ...`, `dmq bench`. Every
//! command takes `--addr`, `--client-id`, `--secret` and `--format
//! table|json`. Errors go to stderr with a non-zero exit code.
//!
//! # Layout
//!
//! - `main.rs`: arguments (clap derive), the runtime, error reporting.
//! - [`output`]: table and JSON rendering, time and byte formatting.
//! - [`topic`], [`produce`], [`consume`], [`group`], [`bench`]: one
//!   module per noun.

#![forbid(unsafe_code)]

mod bench;
mod consume;
mod group;
mod output;
mod produce;
mod topic;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dmq_client::{Client, ClientOptions};

use crate::output::Format;

/// Command line for the DMQ message broker.
#[derive(Debug, Parser)]
#[command(name = "dmq", version, about, propagate_version = true)]
pub struct Cli {
    /// Broker address (host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// Client id sent in HELLO.
    #[arg(long, global = true, default_value = "dmq-cli")]
    pub client_id: String,
    /// Secret sent in HELLO (empty when the broker runs without auth).
    #[arg(long, global = true, default_value = "")]
    pub secret: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Timeout of each request to the broker (e.g. 10s, 500ms).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
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
}

/// Parses `10m`, `1h 30m`, `250ms`, ... (humantime).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("invalid duration `{text}`: {error}"))
}

impl Cli {
    /// Connects with the global options.
    pub async fn connect(&self) -> Result<Client> {
        let mut options = ClientOptions::new(self.client_id.clone())
            .secret(self.secret.clone().into_bytes())
            .request_timeout(self.timeout);
        options.connect_timeout = self.timeout;
        Ok(Client::connect(self.addr.clone(), options).await?)
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Topic(command) => topic::run(&cli, command).await,
        Command::Produce(args) => produce::run(&cli, args).await,
        Command::Consume(args) => consume::run(&cli, args).await,
        Command::Group(command) => group::run(&cli, command).await,
        Command::Bench(args) => bench::run(&cli, args).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
