//! `dmq group list|describe|seek|delete`.

use std::time::Duration;

use anyhow::Result;
use clap::{ArgGroup, Subcommand};
use dmq_client::{Backoff, DeliveryMode, GroupSettings, StartPosition};
use serde_json::{json, Value};

use crate::output::{duration, print_json, print_table, Format};
use crate::produce::parse_time;
use crate::Cli;

/// Group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List a topic's groups and their settings.
    List {
        /// Topic.
        topic: String,
    },
    /// Per partition: ack floor, end offset, lag, unacked, oldest unacked age, delayed.
    Describe {
        /// Topic.
        topic: String,
        /// Group.
        group: String,
    },
    /// Move a group's position (dry run unless --execute).
    #[command(group(ArgGroup::new("target").required(true).args(["to_time", "to_offset", "earliest", "latest"])))]
    Seek {
        /// Topic.
        topic: String,
        /// Group.
        group: String,
        /// The first message at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        to_time: Option<std::time::SystemTime>,
        /// This offset.
        #[arg(long)]
        to_offset: Option<u64>,
        /// The oldest stored message.
        #[arg(long)]
        earliest: bool,
        /// The end (skip everything unacked).
        #[arg(long)]
        latest: bool,
        /// Only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// Apply the seek (without it, only report what would change).
        #[arg(long)]
        execute: bool,
    },
    /// Delete a group and its positions.
    Delete {
        /// Topic.
        topic: String,
        /// Group.
        group: String,
    },
}

fn mode_name(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::Clustering => "clustering",
        DeliveryMode::Broadcast => "broadcast",
    }
}

fn backoff_text(backoff: &Option<Backoff>) -> String {
    match backoff {
        None => "-".into(),
        Some(Backoff::Fixed { delays_ms }) => format!(
            "fixed {}",
            delays_ms
                .iter()
                .map(|ms| duration(Duration::from_millis(*ms)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(Backoff::Exponential { initial_ms, max_ms }) => format!(
            "exponential {}..{}",
            duration(Duration::from_millis(*initial_ms)),
            duration(Duration::from_millis(*max_ms))
        ),
    }
}

fn settings_json(settings: &GroupSettings) -> Value {
    json!({
        "ack_timeout_ms": settings.ack_timeout_ms,
        "max_attempts": settings.max_attempts,
        "backoff": backoff_text(&settings.backoff),
        "max_unacked_per_partition": settings.max_unacked_per_partition,
        "rate_limit_per_second": settings.rate_limit_per_second,
        "dead_letter_topic": settings.dead_letter_topic,
    })
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |value| value.to_string())
}

/// Runs a group command.
pub async fn run(cli: &Cli, command: &GroupCommand) -> Result<()> {
    let client = cli.connect().await?;
    match command {
        GroupCommand::List { topic } => {
            let groups = client.list_groups(topic).await?;
            match cli.format {
                Format::Json => print_json(&Value::Array(
                    groups
                        .iter()
                        .map(|group| {
                            json!({
                                "name": group.name,
                                "mode": mode_name(group.mode),
                                "settings": settings_json(&group.settings),
                            })
                        })
                        .collect(),
                )),
                Format::Table => {
                    let rows: Vec<Vec<String>> = groups
                        .iter()
                        .map(|group| {
                            let settings = &group.settings;
                            vec![
                                group.name.clone(),
                                mode_name(group.mode).into(),
                                opt(settings
                                    .ack_timeout_ms
                                    .map(|ms| duration(Duration::from_millis(ms)))),
                                opt(settings.max_attempts),
                                backoff_text(&settings.backoff),
                                opt(settings.dead_letter_topic.clone()),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "NAME",
                            "MODE",
                            "ACK_TIMEOUT",
                            "MAX_ATTEMPTS",
                            "BACKOFF",
                            "DEAD_LETTER",
                        ],
                        &rows,
                    );
                }
            }
        }
        GroupCommand::Describe { topic, group } => {
            let description = client.describe_group(topic, group).await?;
            match cli.format {
                Format::Json => print_json(&json!({
                    "topic": description.topic,
                    "group": description.group,
                    "mode": mode_name(description.mode),
                    "partitions": description.partitions.iter().map(|p| json!({
                        "partition": p.partition,
                        "ack_floor": p.ack_floor,
                        "end_offset": p.end_offset,
                        "lag": p.lag,
                        "unacked": p.unacked,
                        "in_flight": p.in_flight,
                        "oldest_unacked_age_ms": p.oldest_unacked_age_ms,
                        "delayed": p.delayed,
                    })).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    println!(
                        "group {} on {} ({})",
                        description.group,
                        description.topic,
                        mode_name(description.mode)
                    );
                    let rows: Vec<Vec<String>> = description
                        .partitions
                        .iter()
                        .map(|p| {
                            vec![
                                p.partition.to_string(),
                                p.ack_floor.to_string(),
                                p.end_offset.to_string(),
                                p.lag.to_string(),
                                p.unacked.to_string(),
                                p.in_flight.to_string(),
                                opt(p
                                    .oldest_unacked_age_ms
                                    .map(|ms| duration(Duration::from_millis(ms)))),
                                p.delayed.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "PARTITION",
                            "ACK_FLOOR",
                            "END_OFFSET",
                            "LAG",
                            "UNACKED",
                            "IN_FLIGHT",
                            "OLDEST_UNACKED",
                            "DELAYED",
                        ],
                        &rows,
                    );
                }
            }
        }
        GroupCommand::Seek {
            topic,
            group,
            to_time,
            to_offset,
            earliest,
            latest,
            partition,
            execute,
        } => {
            let target = match (to_time, to_offset, earliest, latest) {
                (Some(time), _, _, _) => {
                    StartPosition::Timestamp(dmq_client::time::system_time_to_ms(*time))
                }
                (_, Some(offset), _, _) => StartPosition::Offset(*offset),
                (_, _, true, _) => StartPosition::Earliest,
                _ => StartPosition::Latest,
            };
            let report = client
                .seek(topic, group, *partition, target, !execute)
                .await?;
            match cli.format {
                Format::Json => print_json(&json!({
                    "dry_run": report.dry_run,
                    "partitions": report.partitions.iter().map(|p| json!({
                        "partition": p.partition,
                        "old_floor": p.old_floor,
                        "new_floor": p.new_floor,
                        "redelivered": p.redelivered,
                        "skipped": p.skipped,
                    })).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    let rows: Vec<Vec<String>> = report
                        .partitions
                        .iter()
                        .map(|p| {
                            vec![
                                p.partition.to_string(),
                                p.old_floor.to_string(),
                                p.new_floor.to_string(),
                                p.redelivered.to_string(),
                                p.skipped.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "PARTITION",
                            "OLD_FLOOR",
                            "NEW_FLOOR",
                            "REDELIVERED",
                            "SKIPPED",
                        ],
                        &rows,
                    );
                    if report.dry_run {
                        println!("dry run: nothing changed; add --execute to apply");
                    } else {
                        println!("seek applied");
                    }
                }
            }
        }
        GroupCommand::Delete { topic, group } => {
            client.delete_group(topic, group).await?;
            match cli.format {
                Format::Json => print_json(&json!({ "deleted": group, "topic": topic })),
                Format::Table => println!("deleted group {group} of {topic}"),
            }
        }
    }
    Ok(())
}
