//! `dmq-compare`: drives one workload against DMQ, NATS JetStream and Redis
//! Streams in the same run and prints the ratios.
//!
//! Workload, the same for every system: `--messages` messages of `--size`
//! bytes from `--producers` producers (each on its own connection,
//! pipelining/batching as its client allows), while one consumer receives
//! every message and acks each one explicitly. The first 8 bytes of each
//! payload carry the send time (ns since the Unix epoch), from which the
//! consumer records produce→deliver latency.
//!
//! Reported per system: produce msgs/s (first send → last produce ack),
//! end-to-end msgs/s (first send → last consumer ack sent and confirmed
//! or flushed), p50/p99 produce→deliver latency.
//!
//! Every server is started by this program on 127.0.0.1 with a random port
//! and a temp dir, and stopped when its measurement ends (a guard with
//! `Drop`, so also on error, timeout, panic or Ctrl-C). Every loop is
//! bounded by the message count and by `--timeout`.

mod dmq;
mod nats;
mod redis_streams;
mod server;
mod workload;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use workload::{Outcome, Workload};

/// The systems (and durability settings) this runner knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum System {
    /// DMQ, `dmqd --fsync always` (fdatasync before the produce ack, group commit).
    DmqAlways,
    /// DMQ, `dmqd --fsync never` (ack after the write to the page cache).
    DmqNever,
    /// NATS JetStream, file storage, default sync (ack before fsync; fsync every 2 min).
    NatsDefault,
    /// NATS JetStream, file storage, `sync_interval: always` (fsync before the ack).
    NatsAlways,
    /// Redis Streams, `appendonly yes`, `appendfsync always`.
    Redis,
    /// Three `dmqd` nodes, fsync `always`: acked once fdatasynced on two of three.
    DmqCluster,
    /// As `dmq-cluster`, but the producers send every batch through the
    /// node they connected to (`route_to_leaders` off), which forwards it
    /// to its partition's leader: the A of routing's A/B.
    DmqClusterForwarded,
    /// Three `nats-server`s, an R3 stream, default sync (acked once two hold it, before fsync).
    NatsR3Default,
    /// Three `nats-server`s, an R3 stream, `sync_interval: always`.
    NatsR3Always,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::DmqAlways => "DMQ fsync=always",
            System::DmqNever => "DMQ fsync=never",
            System::NatsDefault => "NATS JetStream sync=default",
            System::NatsAlways => "NATS JetStream sync=always",
            System::Redis => "Redis Streams appendfsync=always",
            System::DmqCluster => "DMQ 3 nodes fsync=always",
            System::DmqClusterForwarded => "DMQ 3 nodes fsync=always, forwarded",
            System::NatsR3Default => "NATS JetStream R3 sync=default",
            System::NatsR3Always => "NATS JetStream R3 sync=always",
        }
    }

    fn key(self) -> &'static str {
        match self {
            System::DmqAlways => "dmq-always",
            System::DmqNever => "dmq-never",
            System::NatsDefault => "nats-default",
            System::NatsAlways => "nats-always",
            System::Redis => "redis",
            System::DmqCluster => "dmq-cluster",
            System::DmqClusterForwarded => "dmq-cluster-forwarded",
            System::NatsR3Default => "nats-r3-default",
            System::NatsR3Always => "nats-r3-always",
        }
    }

    fn durability(self) -> &'static str {
        match self {
            System::DmqAlways => "fdatasync before ack",
            System::DmqNever => "ack before fsync",
            System::NatsDefault => "ack before fsync",
            System::NatsAlways => "fsync before ack",
            System::Redis => "fsync before reply",
            System::DmqCluster | System::DmqClusterForwarded => "quorum fdatasync",
            System::NatsR3Default => "quorum, before fsync",
            System::NatsR3Always => "quorum fsync",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Side-by-side benchmark: DMQ vs NATS JetStream vs Redis Streams.
#[derive(Debug, Parser)]
#[command(name = "dmq-compare", version)]
struct Args {
    /// Messages per system and run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Payload bytes per message (at least 8: the send timestamp).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per batch: DMQ producer batch, Redis XADD pipeline, NATS pull batch,
    /// XREADGROUP COUNT.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Unacknowledged produces per producer, at most.
    #[arg(long, default_value_t = 20_000)]
    window: usize,
    /// NATS producers publish `--batch` messages, then wait for all their
    /// acks, as `nats bench js pub async` does (its default batch is 500),
    /// instead of keeping `--window` in flight.
    #[arg(long)]
    lockstep: bool,
    /// DMQ topic partitions.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// DMQ clusters: spread the leaderships over the three nodes before the
    /// run (`transfer-leader --balance`), instead of leaving them where the
    /// elections put them.
    #[arg(long)]
    balance_leaders: bool,
    /// Systems to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dmq-always,dmq-never,nats-default,nats-always,redis"
    )]
    systems: Vec<System>,
    /// Runs of the whole set (interleaved); the table shows per-metric medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The dmqd binary.
    #[arg(long, default_value = "target/release/dmqd")]
    dmqd: String,
    /// The nats-server binary (`sync_interval: always` needs nats-server ≥ 2.10).
    #[arg(long, default_value = "nats-server")]
    nats_server: String,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// One system's measurement (server start to stop) fails after this long.
    #[arg(long, default_value = "300", value_parser = parse_secs)]
    timeout: Duration,
    /// Before each measurement, wait while `dmq bench` or `perf` runs; give up after this long.
    #[arg(long, default_value = "900", value_parser = parse_secs)]
    idle_wait: Duration,
    /// Also wait while a process matching this pgrep -f pattern runs (repeatable),
    /// e.g. "cargo test|cargo bench|rustc".
    #[arg(long, value_name = "PATTERN")]
    also_wait_for: Vec<String>,
    /// Do not wait for other load (`dmq bench`, `perf`) to finish.
    #[arg(long)]
    no_idle_wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let text = text.trim_end_matches('s');
    text.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|error| format!("seconds expected: {error}"))
}

/// Process ids (other than ours and our parents') whose command line matches.
fn others_matching(pattern: &str) -> Vec<String> {
    let Ok(output) = Command::new("pgrep").arg("-af").arg(pattern).output() else {
        return Vec::new();
    };
    let own = std::process::id();
    // SAFETY: getppid has no preconditions.
    #[allow(unsafe_code)]
    let parent = unsafe { libc::getppid() } as u32;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            let pid = line.split_whitespace().next().unwrap_or("");
            pid != own.to_string() && pid != parent.to_string()
        })
        .map(str::to_owned)
        .collect()
}

/// Other load that would skew the figures (or be skewed by ours).
fn busy(extra: &[String]) -> Vec<String> {
    let mut busy = others_matching("dmq bench");
    for pattern in extra {
        busy.extend(others_matching(pattern));
    }
    // `dmq --format json bench ...`: global flags before the subcommand.
    busy.extend(others_matching("(^|/)dmq( +[^ ]+)* +bench( |$)"));
    busy.extend(others_matching("perf"));
    busy.sort();
    busy.dedup();
    busy
}

/// Waits until neither `dmq bench` nor `perf` runs (polls every 10 s); the
/// machine counts as quiet after two clean looks 3 s apart (a script that
/// runs benches in a loop has short gaps).
async fn wait_for_quiet(limit: Duration, extra: &[String]) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut busy = busy(extra);
        if busy.is_empty() {
            tokio::time::sleep(Duration::from_secs(3)).await;
            busy = self::busy(extra);
            if busy.is_empty() {
                return Ok(());
            }
        }
        if started.elapsed() >= limit {
            bail!(
                "other load still running after {:?}, not measuring: {busy:?}",
                limit
            );
        }
        eprintln!(
            "waiting for other load to finish ({:.0} s so far): {}",
            started.elapsed().as_secs_f64(),
            busy.join(" | ")
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

async fn measure(system: System, args: &Args, workload: &Workload) -> Result<Outcome> {
    let run = async {
        match system {
            System::DmqAlways => dmq::run(&args.dmqd, "always", args.partitions, workload).await,
            System::DmqNever => dmq::run(&args.dmqd, "never", args.partitions, workload).await,
            System::NatsDefault => nats::run(&args.nats_server, false, 1, workload).await,
            System::NatsAlways => nats::run(&args.nats_server, true, 1, workload).await,
            System::Redis => redis_streams::run(&args.redis_server, workload).await,
            System::DmqCluster => {
                let route = dmq::Routing::ToLeaders;
                dmq::run_cluster(&args.dmqd, args.partitions, route, args.balance_leaders, workload)
                    .await
            }
            System::DmqClusterForwarded => {
                let route = dmq::Routing::Forwarded;
                dmq::run_cluster(&args.dmqd, args.partitions, route, args.balance_leaders, workload)
                    .await
            }
            System::NatsR3Default => nats::run(&args.nats_server, false, 3, workload).await,
            System::NatsR3Always => nats::run(&args.nats_server, true, 3, workload).await,
        }
    };
    // Dropping the future on timeout drops the server guard: the server stops.
    match tokio::time::timeout(args.timeout, run).await {
        Ok(outcome) => outcome,
        Err(_) => bail!(
            "{} did not finish within {:?}",
            system.label(),
            args.timeout
        ),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Per-metric medians over the successful runs of one system.
#[derive(Debug, Clone, Copy)]
struct Summary {
    produce_rate: f64,
    end_to_end_rate: f64,
    p50_us: f64,
    p99_us: f64,
    runs: usize,
}

fn summarize(outcomes: &[Outcome]) -> Option<Summary> {
    if outcomes.is_empty() {
        return None;
    }
    let pick = |f: fn(&Outcome) -> f64| median(&mut outcomes.iter().map(f).collect::<Vec<_>>());
    Some(Summary {
        produce_rate: pick(Outcome::produce_rate),
        end_to_end_rate: pick(Outcome::end_to_end_rate),
        p50_us: pick(|o| o.p50_us as f64),
        p99_us: pick(|o| o.p99_us as f64),
        runs: outcomes.len(),
    })
}

/// The comparisons printed: (DMQ setting, other system).
const RATIOS: &[(System, System)] = &[
    (System::DmqAlways, System::NatsAlways),
    (System::DmqAlways, System::NatsDefault),
    (System::DmqNever, System::NatsDefault),
    (System::DmqAlways, System::Redis),
    (System::DmqNever, System::Redis),
    (System::DmqCluster, System::NatsR3Always),
    (System::DmqCluster, System::NatsR3Default),
];

fn ratio_name(dmq: System, other: System) -> String {
    let short = |s: System| match s {
        System::DmqAlways | System::NatsAlways => "always",
        System::DmqNever => "never",
        System::NatsDefault => "default",
        System::Redis => "always",
        System::DmqCluster | System::DmqClusterForwarded | System::NatsR3Always => {
            "3 nodes, always"
        }
        System::NatsR3Default => "3 nodes, default",
    };
    let family = match other {
        System::Redis => "Redis",
        _ => "NATS",
    };
    format!("DMQ({}) ÷ {family}({})", short(dmq), short(other))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.size < 8 {
        bail!("--size must be at least 8 (the payload carries the send time)");
    }
    if args.producers == 0 || args.messages == 0 || args.runs == 0 {
        bail!("--producers, --messages and --runs must be at least 1");
    }
    let workload = Workload {
        messages: args.messages,
        producers: args.producers,
        size: args.size,
        batch: args.batch.max(1),
        window: args.window.max(1),
        lockstep: args.lockstep,
    };
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();

    let mut results: BTreeMap<System, Vec<Outcome>> = BTreeMap::new();
    let mut failures: BTreeMap<System, String> = BTreeMap::new();
    let work = async {
        for run in 1..=args.runs {
            for &system in &args.systems {
                if !args.no_idle_wait {
                    wait_for_quiet(args.idle_wait, &args.also_wait_for).await?;
                }
                eprintln!("run {run}/{}: {} ...", args.runs, system.label());
                match measure(system, &args, &workload).await {
                    Ok(outcome) => {
                        eprintln!(
                            "  produce {:.0} msgs/s, end to end {:.0} msgs/s, p50 {} µs, p99 {} µs ({} consumed)",
                            outcome.produce_rate(),
                            outcome.end_to_end_rate(),
                            outcome.p50_us,
                            outcome.p99_us,
                            outcome.consumed
                        );
                        results.entry(system).or_default().push(outcome);
                    }
                    Err(error) => {
                        eprintln!("  {} failed: {error:#}", system.label());
                        failures.insert(system, format!("{error:#}"));
                    }
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = work => result?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }

    let summaries: BTreeMap<System, Summary> = results
        .iter()
        .filter_map(|(system, outcomes)| summarize(outcomes).map(|s| (*system, s)))
        .collect();
    let ratios: Vec<(String, Summary, Summary)> = RATIOS
        .iter()
        .filter_map(|&(dmq, other)| {
            Some((
                ratio_name(dmq, other),
                *summaries.get(&dmq)?,
                *summaries.get(&other)?,
            ))
        })
        .collect();

    match args.format {
        Format::Json => {
            let systems: Vec<_> = args
                .systems
                .iter()
                .map(|system| {
                    let runs: Vec<_> = results
                        .get(system)
                        .map(|outcomes| outcomes.iter().map(Outcome::to_json).collect())
                        .unwrap_or_default();
                    let summary = summaries.get(system).map(|s| {
                        json!({
                            "produce_msgs_per_sec": s.produce_rate,
                            "end_to_end_msgs_per_sec": s.end_to_end_rate,
                            "deliver_p50_us": s.p50_us,
                            "deliver_p99_us": s.p99_us,
                            "runs": s.runs,
                        })
                    });
                    json!({
                        "system": system.key(),
                        "label": system.label(),
                        "durability": system.durability(),
                        "median": summary,
                        "runs": runs,
                        "error": failures.get(system),
                    })
                })
                .collect();
            let ratio_json: Vec<_> = ratios
                .iter()
                .map(|(name, dmq, other)| {
                    json!({
                        "name": name,
                        "produce": dmq.produce_rate / other.produce_rate,
                        "end_to_end": dmq.end_to_end_rate / other.end_to_end_rate,
                        "deliver_p99_other_over_dmq": other.p99_us / dmq.p99_us,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "date": date,
                    "messages": args.messages,
                    "producers": args.producers,
                    "consumers": 1,
                    "size": args.size,
                    "batch": args.batch,
                    "window": args.window,
                    "lockstep": args.lockstep,
                    "runs": args.runs,
                    "systems": systems,
                    "ratios": ratio_json,
                }))
                .context("encoding JSON")?
            );
        }
        Format::Table => {
            println!(
                "{} messages of {} B, {} producers, 1 consumer acking each message; medians of {} run(s); {date}",
                args.messages, args.size, args.producers, args.runs
            );
            println!();
            println!(
                "| {:<32} | {:<20} | {:>14} | {:>14} | {:>10} | {:>10} |",
                "system", "durability", "produce msg/s", "e2e msg/s", "p50 µs", "p99 µs"
            );
            println!(
                "|{:-<34}|{:-<22}|{:->16}|{:->16}|{:->12}|{:->12}|",
                "", "", "", "", "", ""
            );
            for system in &args.systems {
                match summaries.get(system) {
                    Some(s) => println!(
                        "| {:<32} | {:<20} | {:>14.0} | {:>14.0} | {:>10.0} | {:>10.0} |",
                        system.label(),
                        system.durability(),
                        s.produce_rate,
                        s.end_to_end_rate,
                        s.p50_us,
                        s.p99_us
                    ),
                    None => println!(
                        "| {:<32} | {:<20} | {:>14} | {:>14} | {:>10} | {:>10} |",
                        system.label(),
                        system.durability(),
                        "failed",
                        "failed",
                        "-",
                        "-"
                    ),
                }
            }
            if !ratios.is_empty() {
                println!();
                println!(
                    "| {:<28} | {:>8} | {:>8} | {:>22} |",
                    "ratio", "produce", "e2e", "p99 (other ÷ DMQ)"
                );
                println!("|{:-<30}|{:->10}|{:->10}|{:->24}|", "", "", "", "");
                for (name, dmq, other) in &ratios {
                    println!(
                        "| {:<28} | {:>7.2}× | {:>7.2}× | {:>21.2}× |",
                        name,
                        dmq.produce_rate / other.produce_rate,
                        dmq.end_to_end_rate / other.end_to_end_rate,
                        other.p99_us / dmq.p99_us
                    );
                }
            }
            for (system, error) in &failures {
                println!();
                println!("{} failed: {error}", system.label());
            }
        }
    }
    if summaries.is_empty() {
        bail!("no system could be measured");
    }
    Ok(())
}
