//! `dmq cluster status`: a cluster node's view of its cluster (admin API
//! `GET /api/cluster`): the metadata group, then one row per replica the
//! node holds, with its leader, term, committed and log ends, and on a
//! leader the largest lag of its peers. `dmq cluster replace-node`: starts
//! the replacement of a node whose disk was lost
//! (`POST /api/cluster/nodes/{id}/replace`). `dmq cluster add-node`: adds
//! a node new to the cluster (`POST /api/cluster/nodes/{id}/add`).
//! `dmq cluster transfer-leader`: hands a group's leadership to a voter,
//! or every group a node leads to others
//! (`POST /api/cluster/transfer-leader`). `dmq cluster remove-node`:
//! removes a node from the cluster for good
//! (`POST /api/cluster/nodes/{id}/remove`).

use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

use crate::admin::Admin;
use crate::output::{cell, print_json, render_table, Format};
use crate::Cli;

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The node's view of the cluster: groups, leaders, terms, lag.
    Status,
    /// Starts replacing node ID, whose disk was lost (it must be down):
    /// it becomes a learner of every group; then start it with an empty
    /// data directory and it catches up and votes again.
    ReplaceNode {
        /// The node's id.
        id: u64,
    },
    /// Adds node ID, new to the cluster: every group takes it as a
    /// learner; then start it with an empty data directory and every node
    /// in its [[cluster.peers]], and it becomes a voter of each group once
    /// caught up.
    AddNode {
        /// The node's id (not one the cluster has or removed).
        id: u64,
        /// Its Raft address (host:port), as its peers reach it.
        #[arg(long)]
        raft: String,
        /// Its client address (host:port), as clients reach it.
        #[arg(long)]
        client: String,
    },
    /// Hands GROUP's leadership (as `status` names it: meta,
    /// topic/partition) to node TO; or, with --from ID alone, every group
    /// node ID leads to another voter (before stopping it for
    /// maintenance); or, with --balance alone, spreads the leaderships.
    TransferLeader {
        /// The group: `meta` or `<topic>/<partition>`.
        #[arg(required_unless_present_any = ["from", "balance"], requires = "to")]
        group: Option<String>,
        /// The voter to lead it.
        #[arg(conflicts_with_all = ["from", "balance"])]
        to: Option<u64>,
        /// Moves every group this node leads to another voter.
        #[arg(long, conflicts_with_all = ["group", "balance"])]
        from: Option<u64>,
        /// Spreads the leaderships over the voters (after a rolling
        /// restart every group is led by the nodes that stayed up).
        #[arg(long, conflicts_with = "group")]
        balance: bool,
    },
    /// Removes node ID from the cluster for good (up or down): every
    /// group takes it out of its members and it stops; then take it out
    /// of every node's [[cluster.peers]] and delete its data directory.
    RemoveNode {
        /// The node's id.
        id: u64,
    },
}

/// Runs a cluster command.
pub fn run(cli: &Cli, command: &ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Status => {
            let answer = Admin::new(cli).get("/api/cluster", &[])?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => print!("{}", render_status(&answer)),
            }
        }
        ClusterCommand::ReplaceNode { id } => node_change(
            cli,
            *id,
            "replace",
            &serde_json::json!({}),
            "is a learner of",
            "learner_of",
        )?,
        ClusterCommand::AddNode { id, raft, client } => node_change(
            cli,
            *id,
            "add",
            &serde_json::json!({"raft": raft, "client": client}),
            "is a learner of",
            "learner_of",
        )?,
        ClusterCommand::TransferLeader {
            group,
            to,
            from,
            balance,
        } => {
            let body = match (group, to, from, balance) {
                (Some(group), Some(to), None, false) => {
                    serde_json::json!({"group": raft_group(group), "to": to})
                }
                (None, None, Some(from), false) => serde_json::json!({ "from": from }),
                (None, None, None, true) => serde_json::json!({ "balance": true }),
                _ => anyhow::bail!("give GROUP and TO, --from ID alone, or --balance alone"),
            };
            let answer = Admin::new(cli).post("/api/cluster/transfer-leader", &body)?;
            match cli.format {
                Format::Json => print_json(&answer),
                Format::Table => {
                    let moved = answer["moved"].as_array().map_or(&[][..], Vec::as_slice);
                    if moved.is_empty() {
                        println!("no group moved");
                    }
                    for group in moved {
                        println!(
                            "{} is led by node {}",
                            cell(&group["group"]),
                            cell(&group["leader"])
                        );
                    }
                }
            }
        }
        ClusterCommand::RemoveNode { id } => node_change(
            cli,
            *id,
            "remove",
            &serde_json::json!({}),
            "removed from",
            "removed_from",
        )?,
    }
    Ok(())
}

/// `POST /api/cluster/nodes/{id}/{action}` with `body`, then says "node
/// ID `did` N groups" (N the length of the answer's `groups` field) and
/// what to do next.
fn node_change(
    cli: &Cli,
    id: u64,
    action: &str,
    body: &Value,
    did: &str,
    groups: &str,
) -> Result<()> {
    let answer = Admin::new(cli).post(&format!("/api/cluster/nodes/{id}/{action}"), body)?;
    match cli.format {
        Format::Json => print_json(&answer),
        Format::Table => println!(
            "node {id} {did} {} groups; {}",
            answer[groups].as_array().map_or(0, Vec::len),
            answer["next"].as_str().unwrap_or_default()
        ),
    }
    Ok(())
}

/// A group as the Raft port names it: `meta` stays, `<topic>/<partition>`
/// (as `status` shows it) becomes `p/<topic>/<partition>`.
fn raft_group(group: &str) -> String {
    if group == "meta" || group == "metadata" {
        "meta".to_string()
    } else if group.starts_with("p/") {
        group.to_string()
    } else {
        format!("p/{group}")
    }
}

/// The largest lag (entries) of a leader's peers; `-` on a follower.
fn max_lag(raft: &Value) -> String {
    let Some(matched) = raft["matched"].as_object() else {
        return "-".to_string();
    };
    let last = raft["last_log_index"].as_u64().unwrap_or(0);
    matched
        .values()
        .map(|index| last.saturating_sub(index.as_u64().unwrap_or(0)))
        .max()
        .unwrap_or(0)
        .to_string()
}

/// One row for the metadata group, one per replica.
pub fn render_status(answer: &Value) -> String {
    let row = |group: String, raft: &Value, committed: &Value, log_end: &Value| {
        // A change of voters half done: a quorum of the old voters is
        // still needed, so the group is more fragile than it looks.
        let group = if raft["joint"].as_bool() == Some(true) {
            format!("{group} (joint)")
        } else {
            group
        };
        vec![
            group,
            cell(&raft["leader"]),
            cell(&raft["term"]),
            cell(committed),
            cell(log_end),
            max_lag(raft),
        ]
    };
    let metadata = &answer["metadata"];
    let mut rows = vec![row(
        "metadata".to_string(),
        metadata,
        &metadata["last_applied_index"],
        &metadata["last_log_index"],
    )];
    for partition in answer["partitions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
    {
        rows.push(row(
            format!(
                "{}/{}",
                cell(&partition["topic"]),
                cell(&partition["partition"])
            ),
            &partition["raft"],
            &partition["committed_end"],
            &partition["log_end"],
        ));
    }
    let serves = if answer["serves_consumers"].as_bool() == Some(true) {
        " (serves consumers)"
    } else {
        ""
    };
    let peers_that = |flag: &str| -> String {
        let ids: Vec<String> = answer["peers"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter(|peer| peer[flag].as_bool() == Some(true))
            .map(|peer| cell(&peer["id"]))
            .collect();
        if ids.is_empty() {
            String::new()
        } else {
            format!(" ({flag}: node {})", ids.join(", node "))
        }
    };
    let removed = format!(
        "{}{}{}",
        peers_that("joining"),
        peers_that("replacing"),
        peers_that("removed")
    );
    format!(
        "node {}{serves}{removed}\n{}",
        cell(&answer["node_id"]),
        render_table(
            &["GROUP", "LEADER", "TERM", "COMMITTED", "LOG_END", "MAX_LAG"],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_named_as_the_raft_port_names_it() {
        assert_eq!(raft_group("metadata"), "meta");
        assert_eq!(raft_group("meta"), "meta");
        assert_eq!(raft_group("orders/0"), "p/orders/0");
        assert_eq!(raft_group("p/orders/0"), "p/orders/0");
    }

    #[test]
    fn a_status_renders_one_row_per_group() {
        let answer = serde_json::json!({
            "node_id": 2,
            "metadata": {"leader": 1, "term": 3, "last_log_index": 9,
                         "last_applied_index": 9, "matched": null},
            "partitions": [{
                "topic": "orders", "partition": 0, "committed_end": 120, "log_end": 121,
                "raft": {"leader": 2, "term": 4, "last_log_index": 50,
                         "matched": {"1": 50, "3": 47}}
            }]
        });
        let text = render_status(&answer);
        assert!(text.starts_with("node 2\n"), "{text}");
        assert!(text.contains("metadata"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("orders/0"))
            .expect(&text);
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["orders/0", "2", "4", "120", "121", "3"]);
        let mut changing = answer.clone();
        changing["partitions"][0]["raft"]["joint"] = serde_json::json!(true);
        let text = render_status(&changing);
        assert!(
            text.lines().any(|l| l.starts_with("orders/0 (joint)")),
            "{text}"
        );
        let mut serving = answer.clone();
        serving["serves_consumers"] = serde_json::json!(true);
        assert!(render_status(&serving).starts_with("node 2 (serves consumers)\n"));
        let mut removed = answer.clone();
        removed["peers"] = serde_json::json!([
            {"id": 1, "removed": false}, {"id": 3, "removed": true},
            {"id": 4, "joining": true}, {"id": 5, "replacing": true}
        ]);
        assert!(render_status(&removed)
            .starts_with("node 2 (joining: node 4) (replacing: node 5) (removed: node 3)\n"));
    }
}
