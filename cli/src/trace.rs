//! `dmq trace MESSAGE_ID`: what happened to one message, oldest first —
//! produced, stored, delivered, acked, retried, dead-lettered, deleted —
//! from the broker's trace (admin API `GET /api/trace/{id}`).

use anyhow::Result;
use clap::Args;
use serde_json::Value;

use crate::admin::{segment, Admin};
use crate::output::{cell, print_json, render_table, time_cell, Format};
use crate::Cli;

/// `dmq trace` arguments.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Message id (32 hex digits, as `dmq produce` prints it).
    pub message_id: String,
}

/// Runs `dmq trace`.
pub fn run(cli: &Cli, args: &TraceArgs) -> Result<()> {
    let answer = Admin::new(cli).get(&format!("/api/trace/{}", segment(&args.message_id)), &[])?;
    match cli.format {
        Format::Json => print_json(&answer),
        Format::Table => print!("{}", render_trace(&answer)),
    }
    Ok(())
}

/// The timeline table of a trace answer.
pub fn render_trace(answer: &Value) -> String {
    let events = answer["events"].as_array().map_or(&[][..], Vec::as_slice);
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|event| {
            vec![
                time_cell(&event["time_ms"]),
                cell(&event["kind"]),
                cell(&event["topic"]),
                cell(&event["partition"]),
                cell(&event["offset"]),
                cell(&event["group"]),
                cell(&event["detail"]),
            ]
        })
        .collect();
    format!(
        "message {}\n{}",
        cell(&answer["message_id"]),
        render_table(
            &[
                "TIME",
                "KIND",
                "TOPIC",
                "PARTITION",
                "OFFSET",
                "GROUP",
                "DETAIL"
            ],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timeline() {
        let answer = json!({
            "message_id": "0000019ac3d1e2f0000000000000002a",
            "events": [
                {"time_ms": 1_451_606_400_000_u64, "kind": "produced", "topic": "t",
                 "partition": 0, "offset": null, "group": null, "detail": "client dmq-cli from 127.0.0.1:5000"},
                {"time_ms": 1_451_606_400_001_u64, "kind": "stored", "topic": "t",
                 "partition": 0, "offset": 42, "group": null, "detail": ""},
                {"time_ms": 1_451_606_400_010_u64, "kind": "delivered", "topic": "t",
                 "partition": 0, "offset": 42, "group": "shipping", "detail": "attempt 1 to member 7"}
            ]
        });
        assert_eq!(
            render_trace(&answer),
            "message 0000019ac3d1e2f0000000000000002a\n\
             TIME                      KIND       TOPIC  PARTITION  OFFSET  GROUP     DETAIL\n\
             2016-01-01T00:00:00.000Z  produced   t      0          -       -         client dmq-cli from 127.0.0.1:5000\n\
             2016-01-01T00:00:00.001Z  stored     t      0          42      -\n\
             2016-01-01T00:00:00.010Z  delivered  t      0          42      shipping  attempt 1 to member 7\n"
        );
    }
}
