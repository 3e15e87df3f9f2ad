//! `dmq stats [--topic T] [--group G] [--minutes N]`: per-minute counts of
//! produced, delivered, acked, retried, expired and dead-lettered
//! messages, oldest first, then the totals (admin API `GET /api/stats`).

use anyhow::Result;
use clap::Args;
use serde_json::Value;

use crate::admin::Admin;
use crate::output::{cell, print_json, render_table, time_cell, Format};
use crate::Cli;

/// The counters, in column order.
const COUNTERS: [&str; 6] = [
    "produced",
    "delivered",
    "acked",
    "retried",
    "expired",
    "dead_lettered",
];

/// `dmq stats` arguments.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this group.
    #[arg(long)]
    pub group: Option<String>,
    /// Minutes to show, ending now (1 to 2880).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=2880))]
    pub minutes: u32,
}

/// Runs `dmq stats`.
pub fn run(cli: &Cli, args: &StatsArgs) -> Result<()> {
    let mut params = vec![("minutes", args.minutes.to_string())];
    if let Some(topic) = &args.topic {
        params.push(("topic", topic.clone()));
    }
    if let Some(group) = &args.group {
        params.push(("group", group.clone()));
    }
    let answer = Admin::new(cli).get("/api/stats", &params)?;
    match cli.format {
        Format::Json => print_json(&answer),
        Format::Table => print!("{}", render_stats(&answer)),
    }
    Ok(())
}

/// One row per minute, then a `total` row.
pub fn render_stats(answer: &Value) -> String {
    let minutes = answer["minutes"].as_array().map_or(&[][..], Vec::as_slice);
    let row = |label: String, counts: &Value| {
        let mut row = vec![label];
        row.extend(COUNTERS.iter().map(|name| cell(&counts[*name])));
        row
    };
    let mut rows: Vec<Vec<String>> = minutes
        .iter()
        .map(|minute| row(time_cell(&minute["minute_ms"]), minute))
        .collect();
    rows.push(row("total".to_string(), &answer["totals"]));
    render_table(
        &[
            "MINUTE",
            "PRODUCED",
            "DELIVERED",
            "ACKED",
            "RETRIED",
            "EXPIRED",
            "DEAD_LETTERED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn minutes_then_totals() {
        let answer = json!({
            "minutes": [
                {"minute_ms": 1_451_606_400_000_u64, "produced": 10, "delivered": 10, "acked": 9,
                 "retried": 1, "expired": 0, "dead_lettered": 0},
                {"minute_ms": 1_451_606_460_000_u64, "produced": 0, "delivered": 0, "acked": 0,
                 "retried": 0, "expired": 0, "dead_lettered": 0}
            ],
            "totals": {"produced": 10, "delivered": 10, "acked": 9, "retried": 1, "expired": 0, "dead_lettered": 0}
        });
        assert_eq!(
            render_stats(&answer),
            "MINUTE                    PRODUCED  DELIVERED  ACKED  RETRIED  EXPIRED  DEAD_LETTERED\n\
             2016-01-01T00:00:00.000Z  10        10         9      1        0        0\n\
             2016-01-01T00:01:00.000Z  0         0          0      0        0        0\n\
             total                     10        10         9      1        0        0\n"
        );
    }
}
