//! `dmq consume TOPIC --group G`: prints each message, then acks it (unless
//! `--no-ack`); stops after `--count` messages, after `--idle` without a
//! message, or on Ctrl-C.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use dmq_client::{ClientError, ReceivedMessage, Start, SubscribeOptions};
use serde_json::{json, Map, Value};

use crate::output::{print_json, text, time, Format};
use crate::produce::parse_time;
use crate::{parse_duration, Cli};

/// Acks queued but not yet confirmed, at most.
const MAX_PENDING_ACKS: usize = 1000;

/// `dmq consume` arguments.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic.
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Where a new group starts: earliest, latest, an RFC 3339 time, or an offset.
    #[arg(long = "from", default_value = "earliest", value_parser = parse_start)]
    pub start: Start,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Print without acking (the messages are redelivered later).
    #[arg(long)]
    pub no_ack: bool,
    /// Stop after this long without a message (e.g. 5s).
    #[arg(long, value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Member name in the group (default: dmq-cli-<pid>).
    #[arg(long)]
    pub member: Option<String>,
    /// Credit window: messages the broker may push ahead.
    #[arg(long, default_value_t = 1000)]
    pub credit: u32,
}

/// Parses `--from`.
pub fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ => {
            if let Ok(offset) = text.parse::<u64>() {
                return Ok(Start::Offset(offset));
            }
            parse_time(text).map(Start::Timestamp).map_err(|_| {
                format!("invalid --from `{text}`: expected earliest, latest, an RFC 3339 time or an offset")
            })
        }
    }
}

type PendingAck = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

/// Runs `dmq consume`.
pub async fn run(cli: &Cli, args: &ConsumeArgs) -> Result<()> {
    let client = cli.connect().await?;
    let mut credit = args.credit.max(1);
    if let Some(count) = args.count {
        credit = credit.min(u32::try_from(count.max(1)).unwrap_or(u32::MAX));
    }
    let options = SubscribeOptions {
        member_name: args
            .member
            .clone()
            .unwrap_or_else(|| format!("dmq-cli-{}", std::process::id())),
        start: args.start,
        credit_window: credit,
        ..SubscribeOptions::default()
    };
    let mut subscription = client
        .consumer()
        .subscribe(&args.topic, &args.group, options)
        .await
        .with_context(|| format!("cannot subscribe to {} as group {}", args.topic, args.group))?;
    let mut acks: VecDeque<PendingAck> = VecDeque::new();
    let mut received = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while args.count.is_none_or(|count| received < count) {
        let next = async {
            match args.idle {
                Some(idle) => tokio::time::timeout(idle, subscription.recv())
                    .await
                    .unwrap_or(None),
                None => subscription.recv().await,
            }
        };
        let message = tokio::select! {
            message = next => message,
            _ = &mut ctrl_c => None,
        };
        let Some(message) = message else {
            break;
        };
        let message = message.context("subscription failed")?;
        received += 1;
        print_message(cli.format, &message);
        if !args.no_ack {
            acks.push_back(Box::pin(message.ack()));
            while acks.len() >= MAX_PENDING_ACKS {
                if let Some(ack) = acks.pop_front() {
                    ack.await.context("ack failed")?;
                }
            }
        }
    }
    while let Some(ack) = acks.pop_front() {
        ack.await.context("ack failed")?;
    }
    Ok(())
}

fn print_message(format: Format, message: &ReceivedMessage) {
    match format {
        Format::Json => {
            let headers: Map<String, Value> = message
                .headers
                .iter()
                .map(|header| (text(&header.name), Value::String(text(&header.value))))
                .collect();
            print_json(&json!({
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
                "attempt": message.attempt,
                "id": message.id.to_string(),
                "timestamp": time(message.timestamp),
                "key": message.key.as_deref().map(text),
                "headers": headers,
                "value": text(&message.value),
                "deliver_at": message.deliver_at.map(time),
                "expire_at": message.expire_at.map(time),
            }));
        }
        Format::Table => {
            let mut line = format!(
                "{}:{} attempt={} id={} time={}",
                message.partition,
                message.offset,
                message.attempt,
                message.id,
                time(message.timestamp)
            );
            if let Some(key) = &message.key {
                line.push_str(&format!(" key={}", text(key)));
            }
            for header in &message.headers {
                line.push_str(&format!(" {}={}", text(&header.name), text(&header.value)));
            }
            line.push_str(&format!(" | {}", text(&message.value)));
            println!("{line}");
        }
    }
}
