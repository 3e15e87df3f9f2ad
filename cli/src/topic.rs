//! `dmq topic create|list|describe|delete`.

use anyhow::Result;
use clap::Subcommand;
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
    },
    /// List topics.
    List,
    /// Show a topic's partitions (offsets) and groups.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its messages.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Runs a topic command.
pub async fn run(cli: &Cli, command: &TopicCommand) -> Result<()> {
    let client = cli.connect().await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            ordered,
        } => {
            client.create_topic(name, *partitions, *ordered).await?;
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
                    })).collect::<Vec<_>>(),
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
                            ]
                        })
                        .collect();
                    print_table(
                        &["PARTITION", "START_OFFSET", "END_OFFSET", "MESSAGES"],
                        &rows,
                    );
                    if topic.groups.is_empty() {
                        println!("groups: (none)");
                    } else {
                        println!("groups: {}", topic.groups.join(", "));
                    }
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
