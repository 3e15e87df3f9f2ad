//! `dmq dlq list|resend`: dead-letter topics (admin API `/api/dlq`).
//!
//! `resend` produces the dead letters again to their source topic (same
//! key, value and headers, minus the `dmq.dlq.*` ones) and deletes them
//! from the dead-letter topic: all of them, or those named with `--id`.

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::admin::{segment, Admin};
use crate::output::{cell, print_json, render_table, Format};
use crate::Cli;

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead-letter topics: source topic, group, message count.
    List,
    /// Produce dead letters again to their source topic.
    Resend {
        /// Dead-letter topic (as `dmq dlq list` shows it).
        dlq_topic: String,
        /// Only this message (repeatable; default: every message).
        #[arg(long = "id")]
        ids: Vec<String>,
    },
}

/// Runs a dead-letter command.
pub fn run(cli: &Cli, command: &DlqCommand) -> Result<()> {
    let admin = Admin::new(cli);
    match command {
        DlqCommand::List => {
            let answer = admin.get("/api/dlq", &[])?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => print!("{}", render_dlq_list(&answer)),
            }
        }
        DlqCommand::Resend { dlq_topic, ids } => {
            let body = if ids.is_empty() {
                json!({})
            } else {
                json!({ "message_ids": ids })
            };
            let answer = admin.post(&format!("/api/dlq/{}/resend", segment(dlq_topic)), &body)?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => {
                    let resent = answer["resent"].as_u64().unwrap_or(0);
                    println!(
                        "resent {resent} message{} from {dlq_topic}",
                        if resent == 1 { "" } else { "s" }
                    );
                }
            }
        }
    }
    Ok(())
}

/// The `dmq dlq list` table (a note when there is no dead-letter topic).
pub fn render_dlq_list(answer: &Value) -> String {
    let topics = answer.as_array().map_or(&[][..], Vec::as_slice);
    if topics.is_empty() {
        return "no dead-letter topics\n".to_string();
    }
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|topic| {
            vec![
                cell(&topic["topic"]),
                cell(&topic["source_topic"]),
                cell(&topic["group"]),
                cell(&topic["messages"]),
            ]
        })
        .collect();
    render_table(&["DLQ_TOPIC", "SOURCE_TOPIC", "GROUP", "MESSAGES"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list() {
        assert_eq!(render_dlq_list(&json!([])), "no dead-letter topics\n");
        assert_eq!(
            render_dlq_list(&json!([
                {"topic": "orders.billing.dlq", "source_topic": "orders", "group": "billing", "messages": 3}
            ])),
            "DLQ_TOPIC           SOURCE_TOPIC  GROUP    MESSAGES\n\
             orders.billing.dlq  orders        billing  3\n"
        );
    }
}
