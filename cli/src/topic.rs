//! `dmq topic create|list|describe|leaders|delete`.
//!
//! `create` of a name that exists fails (the broker answers TopicExists,
//! PROTOCOL.md §6.12) unless `--if-not-exists` is given: then a topic of
//! that name with the same partitions and ordering is fine, and one with
//! other settings is an error.

use anyhow::{bail, Result};
use clap::Subcommand;
use dmq_client::ErrorCode;
use serde_json::json;

use crate::output::{print_json, print_table, Format};
use crate::Cli;

/// Topic commands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Same-key messages are delivered to a group one at a time, in order.
        #[arg(long)]
        ordered: bool,
        /// Succeed if the topic exists with these partitions and ordering
        /// (without it, an existing topic is an error).
        #[arg(long)]
        if_not_exists: bool,
    },
    /// List topics.
    List,
    /// Show a topic's partitions (offsets) and groups.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Show which cluster node leads each partition (where a producer
    /// sends that partition's batches); on a single broker, none.
    Leaders {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its messages.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// `create --if-not-exists` of a topic that exists: fine if its settings
/// are the ones asked for.
async fn existing(
    cli: &Cli,
    client: &dmq_client::Client,
    name: &str,
    partitions: u32,
    ordered: bool,
) -> Result<()> {
    let topic = client.describe_topic(name).await?;
    let found = topic.partitions.len() as u32;
    if found != partitions || topic.ordered != ordered {
        bail!(
            "topic {name:?} exists with {found} partition(s), ordered: {}; \
             asked for {partitions}, ordered: {ordered}",
            topic.ordered
        );
    }
    match cli.format {
        Format::Json => print_json(&json!({
            "exists": name, "partitions": partitions, "ordered": ordered
        })),
        Format::Table => println!("topic {name} already exists with these settings"),
    }
    Ok(())
}

/// Runs a topic command.
pub async fn run(cli: &Cli, command: &TopicCommand) -> Result<()> {
    let client = cli.connect().await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            ordered,
            if_not_exists,
        } => {
            match client.create_topic(name, *partitions, *ordered).await {
                Ok(()) => {}
                Err(error) if error.code() == Some(ErrorCode::TopicExists) => {
                    if !*if_not_exists {
                        bail!(
                            "topic {name:?} already exists (TopicExists); \
                             `dmq topic describe {name}` shows it, and \
                             --if-not-exists accepts it if its settings match"
                        );
                    }
                    return existing(cli, &client, name, *partitions, *ordered).await;
                }
                Err(error) => return Err(error.into()),
            }
            match cli.format {
                Format::Json => print_json(&json!({
                    "created": name, "partitions": partitions, "ordered": ordered
                })),
                Format::Table => println!(
                    "created topic {name} ({partitions} partition{}{})",
                    if *partitions == 1 { "" } else { "s" },
                    if *ordered { ", ordered" } else { "" }
                ),
            }
        }
        TopicCommand::List => {
            let topics = client.list_topics().await?;
            match cli.format {
                Format::Json => print_json(&json!(topics
                    .iter()
                    .map(|topic| json!({
                        "name": topic.name, "partitions": topic.partitions, "ordered": topic.ordered
                    }))
                    .collect::<Vec<_>>())),
                Format::Table => {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|topic| {
                            vec![
                                topic.name.clone(),
                                topic.partitions.to_string(),
                                topic.ordered.to_string(),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "PARTITIONS", "ORDERED"], &rows);
                }
            }
        }
        TopicCommand::Describe { name } => {
            let topic = client.describe_topic(name).await?;
            match cli.format {
                Format::Json => print_json(&json!({
                    "name": topic.name,
                    "ordered": topic.ordered,
                    "partitions": topic.partitions.iter().map(|partition| json!({
                        "partition": partition.partition,
                        "start_offset": partition.start_offset,
                        "end_offset": partition.end_offset,
                        "size_bytes": partition.size_bytes,
                        "disk_bytes": partition.disk_bytes,
                    })).collect::<Vec<_>>(),
                    "size_bytes": topic.partitions.iter().map(|p| p.size_bytes).sum::<u64>(),
                    "disk_bytes": topic.partitions.iter().map(|p| p.disk_bytes).sum::<u64>(),
                    "groups": topic.groups,
                })),
                Format::Table => {
                    println!(
                        "topic {}{}",
                        topic.name,
                        if topic.ordered { " (ordered)" } else { "" }
                    );
                    let rows: Vec<Vec<String>> = topic
                        .partitions
                        .iter()
                        .map(|partition| {
                            vec![
                                partition.partition.to_string(),
                                partition.start_offset.to_string(),
                                partition.end_offset.to_string(),
                                partition
                                    .end_offset
                                    .saturating_sub(partition.start_offset)
                                    .to_string(),
                                partition.size_bytes.to_string(),
                                partition.disk_bytes.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "PARTITION",
                            "START_OFFSET",
                            "END_OFFSET",
                            "MESSAGES",
                            "STORED_BYTES",
                            "DISK_BYTES",
                        ],
                        &rows,
                    );
                    let disk: u64 = topic.partitions.iter().map(|p| p.disk_bytes).sum();
                    println!("disk use: {disk} bytes");
                    if topic.groups.is_empty() {
                        println!("groups: (none)");
                    } else {
                        println!("groups: {}", topic.groups.join(", "));
                    }
                }
            }
        }
        TopicCommand::Leaders { name } => {
            let leaders = client.partition_leaders(name).await?;
            match cli.format {
                Format::Json => print_json(&json!(leaders
                    .iter()
                    .map(|leader| json!({
                        "partition": leader.partition,
                        "node_id": (leader.node_id != 0).then_some(leader.node_id),
                        "address": (!leader.address.is_empty()).then_some(&leader.address),
                    }))
                    .collect::<Vec<_>>())),
                Format::Table => {
                    let rows: Vec<Vec<String>> = leaders
                        .iter()
                        .map(|leader| {
                            vec![
                                leader.partition.to_string(),
                                match leader.node_id {
                                    0 => "-".to_string(),
                                    id => id.to_string(),
                                },
                                match leader.address.as_str() {
                                    "" => "(the node asked)".to_string(),
                                    address => address.to_string(),
                                },
                            ]
                        })
                        .collect();
                    print_table(&["PARTITION", "LEADER", "ADDRESS"], &rows);
                }
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(name).await?;
            match cli.format {
                Format::Json => print_json(&json!({ "deleted": name })),
                Format::Table => println!("deleted topic {name}"),
            }
        }
    }
    Ok(())
}
