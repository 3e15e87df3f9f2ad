//! `dmqd`: the DMQ broker. With no arguments: data in ./data, the binary
//! protocol on 127.0.0.1:7070, the admin API and console on
//! 127.0.0.1:7080, durable produces (fsync always), development mode.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dmq_broker::{Broker, BrokerConfig};

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
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
    config.validate()?;
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
        broker.run_until(shutdown_signal()).await;
        Ok(())
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
