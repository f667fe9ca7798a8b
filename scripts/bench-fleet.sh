#!/usr/bin/env bash
# Fleet benchmark: one release server (embedded storage) and the load generator on loopback.
# Prints server memory per idle agent, trigger-to-command latency, a burst and a reconnect storm.
# With LIST_STORES=N it times N requests of each kind to `GET /stores` (the operator page's store
# list: first page, a middle page, a search, a label filter, a glob, offline only) instead.
#
#   scripts/bench-fleet.sh [agents=10000] [storm_spread_ms=10000]
#   LIST_STORES=50 scripts/bench-fleet.sh 10000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

AGENTS="${1:-10000}"
SPREAD="${2:-10000}"
API_PORT="${BENCH_API_PORT:-18580}"
S3_PORT="${BENCH_S3_PORT:-19580}"

cargo build --release --locked -p server -p loadgen --quiet
bin="$PWD/target/release"

# Both processes hold one descriptor per agent; the load generator raises its own limit.
ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d -t backhaul-fleet.XXXXXX)"
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export JWT_SECRET="fleet-bench-secret-fleet-bench-secret-0123"
LISTEN_ADDR="127.0.0.1:$API_PORT" EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" \
  STORAGE=embedded DATA_DIR="$work/data" MAX_AGENT_CONNECTIONS=$((AGENTS + 1000)) \
  RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), fd limit $(ulimit -n)"
"$bin/loadgen" --server "127.0.0.1:$API_PORT" --server-pid "$server_pid" \
  --agents "$AGENTS" --storm-spread-ms "$SPREAD" --list-stores "${LIST_STORES:-0}"
echo "server errors logged: $(grep -c ' ERROR ' "$work/server.log" || true)"
