#!/usr/bin/env bash
# Compares two dmqd builds as three-node clusters on this machine, A and
# B alternating, each round a fresh cluster (scripts/local-cluster.sh on
# ports 7400+, data under a temporary directory, removed afterwards):
#
#   scripts/cluster-ab.sh <dmqd A> <dmqd B> [rounds] [-- dmq bench options]
#
# Each round makes a one-partition topic `ab`, moves its leadership and
# the metadata group's to node 1, then runs `dmq bench` through node 2 (a
# follower: every write is forwarded) and through node 1 (the leader),
# and prints one line per run: build, round, node, rate, p50 and p99
# produce→ack. The default load is 64 producers of one 256-byte message
# each, one in flight per producer (small writes, bound by fsync rounds);
# options after `--` replace it. DMQ names the dmq binary (default
# target/release/dmq).
set -euo pipefail

a=$1
b=$2
rounds=${3:-2}
shift $(($# < 3 ? $# : 3))
[[ "${1:-}" == "--" ]] && shift
load=("$@")
if [[ ${#load[@]} -eq 0 ]]; then
  load=(--producers 64 --consumers 0 --batch 1 --linger 0ms --window 1 --count 20000 --size 256)
fi
root=$(cd "$(dirname "$0")/.." && pwd)
dmq=${DMQ:-$root/target/release/dmq}
base=7400
work=$(mktemp -d /tmp/dmq-cluster-ab.XXXX)
trap 'rm -rf "$work"' EXIT

run() {
  local label=$1 dmqd=$2 round=$3
  local dir="$work/$label-$round"
  DMQ_CLUSTER_BASE_PORT=$base DMQD=$dmqd bash "$root/scripts/local-cluster.sh" "$dir" \
    > "$work/cluster.out" 2>&1 &
  local cluster=$!
  sleep 4
  "$dmq" --addr 127.0.0.1:$((base + 1)) topic create ab --partitions 1 > /dev/null
  sleep 2
  "$dmq" --admin http://127.0.0.1:$((base + 11)) cluster transfer-leader ab/0 1 > /dev/null
  "$dmq" --admin http://127.0.0.1:$((base + 11)) cluster transfer-leader meta 1 > /dev/null
  sleep 1
  for node in 2 1; do
    local out
    out=$("$dmq" --addr 127.0.0.1:$((base + node)) bench --topic ab --partitions 1 "${load[@]}" 2>&1)
    local rate latency
    rate=$(grep -o "[0-9]* msgs/s" <<< "$out" | head -1)
    latency=$(grep -o "p50 *[0-9]* µs  p99 *[0-9]* µs" <<< "$out" | head -1 | tr -s ' ')
    echo "$label round $round node $node$([[ $node == 1 ]] && echo ' (leader)' || echo ' (follower)'): $rate, $latency"
  done
  kill "$cluster"
  wait "$cluster" 2> /dev/null || true
  rm -rf "$dir"
}

for round in $(seq 1 "$rounds"); do
  run A "$a" "$round"
  run B "$b" "$round"
done
