//! `dmq produce TOPIC [MESSAGE...]`: messages from the arguments, or one per
//! stdin line; prints one line per acknowledged message, in input order.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;
use dmq_client::{ClientError, Message, SendReceipt};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::output::{print_json, time, Format};
use crate::{parse_duration, Cli};

/// Sends accepted but not yet printed, at most (bounds memory on big stdin).
const MAX_OUTSTANDING: usize = 10_000;

/// `dmq produce` arguments.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic.
    pub topic: String,
    /// Messages; when none are given, each line of stdin is one message.
    pub messages: Vec<String>,
    /// Key of every message.
    #[arg(long)]
    pub key: Option<String>,
    /// Deliver only after this delay (e.g. 10m, 2s).
    #[arg(long, value_parser = parse_duration, conflicts_with = "deliver_at")]
    pub delay: Option<Duration>,
    /// Deliver only at this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub deliver_at: Option<SystemTime>,
    /// Never deliver later than this after it is deliverable (e.g. 1h).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Header `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Partition (default: by key, else round robin).
    #[arg(long)]
    pub partition: Option<u32>,
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text)
        .map_err(|error| format!("invalid RFC 3339 time `{text}`: {error}"))
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("invalid header `{text}`: expected name=value")),
    }
}

type Pending = Pin<Box<dyn Future<Output = Result<SendReceipt, ClientError>> + Send>>;

/// Runs `dmq produce`.
pub async fn run(cli: &Cli, args: &ProduceArgs) -> Result<()> {
    let client = cli.connect().await?;
    let producer = client.producer();
    let mut outstanding: VecDeque<Pending> = VecDeque::new();
    let mut count = 0usize;
    let mut send = |value: String, outstanding: &mut VecDeque<Pending>| {
        let mut message = Message::new(args.topic.clone(), value);
        if let Some(key) = &args.key {
            message = message.key(key.clone());
        }
        if let Some(delay) = args.delay {
            message = message.delay(delay);
        }
        if let Some(at) = args.deliver_at {
            message = message.deliver_at(at);
        }
        if let Some(ttl) = args.ttl {
            message = message.ttl(ttl);
        }
        for (name, value) in &args.headers {
            message = message.header(name.clone(), value.clone());
        }
        if let Some(partition) = args.partition {
            message = message.partition(partition);
        }
        count += 1;
        outstanding.push_back(Box::pin(producer.send(message)));
    };
    if args.messages.is_empty() {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            send(line, &mut outstanding);
            while outstanding.len() >= MAX_OUTSTANDING {
                print_next(cli.format, &mut outstanding).await?;
            }
        }
    } else {
        for message in &args.messages {
            send(message.clone(), &mut outstanding);
            while outstanding.len() >= MAX_OUTSTANDING {
                print_next(cli.format, &mut outstanding).await?;
            }
        }
    }
    while !outstanding.is_empty() {
        print_next(cli.format, &mut outstanding).await?;
    }
    if count == 0 {
        bail!("no message to produce (no arguments and empty stdin)");
    }
    Ok(())
}

async fn print_next(format: Format, outstanding: &mut VecDeque<Pending>) -> Result<()> {
    let Some(pending) = outstanding.pop_front() else {
        return Ok(());
    };
    let receipt = pending.await.context("produce failed")?;
    match format {
        Format::Json => print_json(&json!({
            "partition": receipt.partition,
            "offset": receipt.offset,
            "id": receipt.id.to_string(),
            "deliver_at": receipt.deliver_at.map(time),
        })),
        Format::Table => match (receipt.offset, receipt.deliver_at) {
            (Some(offset), _) => println!(
                "partition {} offset {} id {}",
                receipt.partition, offset, receipt.id
            ),
            (None, Some(at)) => println!(
                "partition {} delayed until {} id {}",
                receipt.partition,
                time(at),
                receipt.id
            ),
            (None, None) => println!("partition {} delayed id {}", receipt.partition, receipt.id),
        },
    }
    Ok(())
}
