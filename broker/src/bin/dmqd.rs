//! `dmqd`: the DMQ broker. With no arguments: data in ./data, the binary
//! protocol on 127.0.0.1:7070, the admin API and console on
//! 127.0.0.1:7080, durable produces (fsync always), development mode.
//! `dmqd repair` sets damaged journal bytes aside (see docs/storage.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dmq_broker::{Broker, BrokerConfig, Stopped};

/// jemalloc returns freed memory to the system; glibc's per-thread arenas
/// kept it (see broker/Cargo.toml).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// DMQ broker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the binary protocol.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the admin HTTP API, the console and /metrics.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// "always" (default), "never" or "interval:<n>ms".
    #[arg(long)]
    fsync: Option<String>,
    /// Allow development mode (no credentials) on a non-loopback address.
    #[arg(long)]
    allow_remote_development: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Repairs the dispatcher's journals after `dmqd` refused to start
    /// because one is damaged: each damaged journal is copied to
    /// `<name>.journal.damaged`, then rewritten with every valid entry
    /// (what the damaged bytes held is lost, and listed). Run it with the
    /// broker stopped.
    Repair {
        /// Data directory (default: the configuration's, or ./data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn repair(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let repairs = dmq_dispatcher::storage::repair_journals(data_dir)
        .with_context(|| format!("repairing the journals under {}", data_dir.display()))?;
    if repairs.is_empty() {
        println!("no damaged journal under {}", data_dir.display());
    }
    for repair in repairs {
        println!(
            "{}: kept {} entries, set aside damaged bytes {:?}; original copied to {}",
            repair.path.display(),
            repair.kept_entries,
            repair.damaged,
            repair.copy.display()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Colours for a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            BrokerConfig::from_toml(&text)?
        }
        None => BrokerConfig::default(),
    };
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin_listen) = args.admin_listen {
        config.admin_listen = admin_listen;
    }
    if let Some(fsync) = args.fsync {
        config.fsync = fsync;
    }
    if let Some(Command::Repair { data_dir }) = &args.command {
        return repair(data_dir.as_ref().unwrap_or(&config.data_dir));
    }
    if args.allow_remote_development {
        config.allow_remote_development = true;
    }
    config.validate()?;
    if config.development_mode()
        && !(config.listen.ip().is_loopback() && config.admin_listen.ip().is_loopback())
    {
        tracing::warn!(
            listen = %config.listen,
            admin_listen = %config.admin_listen,
            "DEVELOPMENT MODE ON A NON-LOOPBACK ADDRESS: no credentials are checked; \
             anyone who reaches these ports can produce, consume and delete"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dmqd")
        .build()?;
    runtime.block_on(async move {
        let data_dir = config.data_dir.clone();
        let fsync = config.fsync.clone();
        let broker = Broker::start(config).await.context("starting dmqd")?;
        tracing::info!(
            listen = %broker.protocol_addr(),
            admin = %format!("http://{}", broker.admin_addr()),
            data_dir = %data_dir.display(),
            fsync,
            "dmqd ready"
        );
        match broker.run_until(shutdown_signal()).await {
            Stopped::Signal => Ok(()),
            Stopped::RemovedFromCluster => Err(anyhow::anyhow!(
                "this node was removed from its cluster (dmq cluster remove-node): delete its \
                 data directory and take it out of every node's [[cluster.peers]]"
            )),
        }
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("signal received");
}
