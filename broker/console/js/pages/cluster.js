// pages/cluster.js: a cluster node's view of its cluster (GET
// /api/cluster): the nodes as configured, then one row per Raft group this
// node serves (the metadata group and every replica it holds) with the
// leader it knows of, its term, the committed and log ends, and, on a
// group this node leads, the largest lag of its peers. A single node
// (404) says so.

import { get } from "../api.js";
import { busy, fill, h, showError, table } from "../dom.js";

/** The largest lag (entries) of a leader's peers; "-" elsewhere. */
function maxLag(raft) {
  if (!raft.matched) {
    return "-";
  }
  const last = raft.last_log_index ?? 0;
  return String(Math.max(0, ...Object.values(raft.matched).map((index) => last - (index ?? 0))));
}

/** Renders the page into `root`. */
export async function render(root) {
  const errors = h("div", { id: "cluster-error-slot" });
  const body = h("div", { id: "cluster-body" }, h("p", { class: "muted", text: "Loading…" }));
  const refresh = h("button", { type: "button", id: "cluster-refresh", class: "secondary", text: "Refresh" });
  root.append(
    h("div", { class: "row" }, h("h1", { text: "Cluster" }), refresh),
    h("p", {
      class: "hint",
      text: "Every cluster topic's partition is a Raft group with a replica on each node; a produce is acknowledged once a quorum has it on disk. "
        + "This is what the node you are connected to knows.",
    }),
    errors,
    body,
  );

  const reload = async () => {
    let status;
    try {
      status = await get("/api/cluster");
    } catch (error) {
      if (error.status === 404) {
        fill(body, h("p", { testid: "cluster-single", text: "This broker runs as a single node (its configuration has no [cluster] section)." }));
        return;
      }
      fill(body);
      showError(errors, error);
      return;
    }
    const nodes = status.peers.map((peer) => [
      String(peer.id) + (peer.id === status.node_id ? (status.serves_consumers ? " (this node, serves consumers)" : " (this node)") : "")
        + (peer.removed ? " (removed)" : "") + (peer.joining ? " (joining)" : ""),
      peer.client,
      peer.raft,
    ]);
    const group = (name, raft, committed, logEnd) => h("tr", { testid: `cluster-group-${name}` },
      h("td", { class: "mono", text: name }),
      h("td", { class: "num", testid: `cluster-leader-${name}`, text: raft.leader ?? "none" }),
      h("td", { class: "num", text: raft.term }),
      h("td", { class: "num", text: committed ?? "-" }),
      h("td", { class: "num", text: logEnd ?? "-" }),
      h("td", { class: "num", text: maxLag(raft) }));
    const groups = [group("metadata", status.metadata, status.metadata.last_applied_index, status.metadata.last_log_index)]
      .concat(status.partitions.map((p) => group(`${p.topic}/${p.partition}`, p.raft, p.committed_end, p.log_end)));
    fill(body,
      h("h2", { text: "Nodes" }),
      table("cluster-nodes", ["Node", "Client address", "Raft address"], nodes),
      h("h2", { text: "Raft groups" }),
      table("cluster-groups", ["Group", ["Leader", "num"], ["Term", "num"], ["Committed", "num"], ["Log end", "num"], ["Max lag", "num"]], groups));
  };
  refresh.addEventListener("click", () => busy(refresh, errors, reload));
  await reload();
}
