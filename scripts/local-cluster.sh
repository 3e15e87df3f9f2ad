#!/usr/bin/env bash
# Starts a three-node DMQ cluster on this machine, on 127.0.0.1, to try
# replication and failover:
#
#   scripts/local-cluster.sh [data dir]        (default: ./cluster-data)
#
# Node N (1 to 3) serves clients on port BASE+N, its admin API and console
# on BASE+10+N and Raft on BASE+20+N, with BASE = 7070 (set
# DMQ_CLUSTER_BASE_PORT to move them), and keeps its data in <dir>/nodeN
# (its configuration in <dir>/nodeN.toml, its log in <dir>/nodeN.log).
# The data stays across runs: run it again to restart the same cluster.
# Ctrl-C (or SIGTERM) stops the three nodes. Kill one (its pid is
# printed) and watch the other two go on; start it again with
#   target/release/dmqd --config <dir>/nodeN.toml
#
# It builds dmqd and dmq (release) first, unless DMQD names a dmqd binary.
set -euo pipefail

dir=${1:-./cluster-data}
base=${DMQ_CLUSTER_BASE_PORT:-7070}
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${DMQD:-}" ]]; then
  (cd "$root" && cargo build --release --bin dmqd --bin dmq)
  DMQD="$root/target/release/dmqd"
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

peers=""
for n in 1 2 3; do
  peers+=$'\n'"[[cluster.peers]]"$'\n'"id = $n"$'\n'"raft = \"127.0.0.1:$((base + 20 + n))\""$'\n'"client = \"127.0.0.1:$((base + n))\""$'\n'
done
for n in 1 2 3; do
  cat > "$dir/node$n.toml" <<TOML
data_dir = "$dir/node$n"
listen = "127.0.0.1:$((base + n))"
admin_listen = "127.0.0.1:$((base + 10 + n))"

[cluster]
node_id = $n
raft_listen = "127.0.0.1:$((base + 20 + n))"
$peers
TOML
done

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping the cluster"
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT
for n in 1 2 3; do
  "$DMQD" --config "$dir/node$n.toml" >> "$dir/node$n.log" 2>&1 &
  pids+=($!)
  echo "node $n: pid $!, clients 127.0.0.1:$((base + n)), console http://127.0.0.1:$((base + 10 + n)), log $dir/node$n.log"
done
addrs="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
echo
echo "try:  dmq --addr $addrs topic create orders --partitions 2"
echo "      dmq --admin http://127.0.0.1:$((base + 11)) cluster status"
echo "Ctrl-C stops the three nodes."
# Until stopped, or until every node has exited.
wait "${pids[@]}" || true
