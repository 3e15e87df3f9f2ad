//! `dmq tx list|resolve`: transactions (admin API `/api/transactions`).
//!
//! `list` shows the unsettled transactions (open, ending, committed and
//! being moved), oldest first, with those open past the broker's timeout
//! marked overdue. `resolve` commits or rolls one back as an operator:
//! the way out for a transaction whose producer is gone.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::admin::{segment, Admin};
use crate::output::{cell, print_json, render_table, Format};
use crate::Cli;

/// Transaction commands.
#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// List unsettled transactions.
    List,
    /// Commit or roll back a transaction, named by its producer group, id
    /// and handle (as `dmq tx list` shows them).
    Resolve {
        /// Producer group.
        producer_group: String,
        /// Transaction id.
        transaction_id: String,
        /// The transaction's handle.
        handle: u64,
        /// What to do.
        outcome: Outcome,
    },
}

/// How to end a transaction.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Outcome {
    /// Its messages are delivered.
    Commit,
    /// Its messages are discarded.
    Rollback,
}

/// Runs a transaction command.
pub fn run(cli: &Cli, command: &TxCommand) -> Result<()> {
    let admin = Admin::new(cli);
    match command {
        TxCommand::List => {
            let answer = admin.get("/api/transactions", &[])?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => print!("{}", render_tx_list(&answer)),
            }
        }
        TxCommand::Resolve {
            producer_group,
            transaction_id,
            handle,
            outcome,
        } => {
            let action = match outcome {
                Outcome::Commit => "commit",
                Outcome::Rollback => "rollback",
            };
            let answer = admin.post(
                &format!(
                    "/api/transactions/{}/{}/{action}",
                    segment(producer_group),
                    segment(transaction_id)
                ),
                &json!({ "handle": handle }),
            )?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => println!(
                    "{producer_group}/{transaction_id} ({handle}): {}",
                    answer["outcome"].as_str().unwrap_or(action)
                ),
            }
        }
    }
    Ok(())
}

/// The table of `dmq tx list`.
pub fn render_tx_list(answer: &Value) -> String {
    let transactions = answer["transactions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if transactions.is_empty() {
        return "no open transactions\n".to_string();
    }
    let rows: Vec<Vec<String>> = transactions
        .iter()
        .map(|t| {
            let mut stage = cell(&t["stage"]);
            if t["unresolved"].as_bool() == Some(true) {
                stage.push_str(" (unresolved)");
            } else if t["overdue"].as_bool() == Some(true) {
                stage.push_str(" (overdue)");
            }
            vec![
                cell(&t["producer_group"]),
                cell(&t["transaction_id"]),
                cell(&t["handle"]),
                stage,
                cell(&t["records"]),
                cell(&t["checks"]),
                cell(&t["opened_ms"]),
            ]
        })
        .collect();
    render_table(
        &[
            "GROUP",
            "ID",
            "HANDLE",
            "STAGE",
            "RECORDS",
            "CHECKS",
            "OPENED_MS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list() {
        assert_eq!(
            render_tx_list(&json!({"transactions": []})),
            "no open transactions\n"
        );
        let table = render_tx_list(&json!({"transactions": [
            {"producer_group": "shop", "transaction_id": "o17", "handle": 42,
             "stage": "open", "records": 3, "opened_ms": 1700000000000_i64, "overdue": true}
        ]}));
        assert!(table.contains("open (overdue)"), "{table}");
        assert!(table.contains("o17"), "{table}");
    }
}
