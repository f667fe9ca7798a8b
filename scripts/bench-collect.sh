#!/usr/bin/env bash
# Collection benchmark: one release server (embedded storage) and the load generator on
# loopback. A fleet of simulated stores that really upload; one collection over all of them per
# max_concurrent. Prints, for each, the time until every store is verified and the server's CPU
# seconds and peak RSS over the collection, and the medians over the rounds (interleaved).
#
#   scripts/bench-collect.sh [stores=1000] [max_concurrent=50,200] [file_bytes=1048576] [rounds=3]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STORES="${1:-1000}"
MAX="${2:-50,200}"
BYTES="${3:-1048576}"
ROUNDS="${4:-3}"
API_PORT="${BENCH_API_PORT:-18581}"
S3_PORT="${BENCH_S3_PORT:-19581}"

cargo build --release --locked -p server -p loadgen --quiet
bin="$PWD/target/release"
ulimit -n "$(ulimit -Hn)"

# The server's data directory (database and embedded store) goes under BENCH_TMPDIR if set.
work="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/backhaul-collect.XXXXXX")"
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export JWT_SECRET="collect-bench-secret-collect-bench-secret-0123"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load generator on the same machine"
echo "data directory on: $(df -T "$work" | awk 'NR == 2 {print $2}')"

# A fresh server per max_concurrent, so that its peak RSS is that workload's alone (the
# allocator keeps what an earlier, larger one took).
for max in ${MAX//,/ }; do
  rm -rf "$work/data"
  LISTEN_ADDR="127.0.0.1:$API_PORT" EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" \
    STORAGE=embedded DATA_DIR="$work/data" MAX_AGENT_CONNECTIONS=$((STORES + 1000)) \
    RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$bin/loadgen" --server "127.0.0.1:$API_PORT" --server-pid "$server_pid" \
    --agents "$STORES" --collect "$max" --file-bytes "$BYTES" --rounds "$ROUNDS"
  echo "server errors logged: $(grep -c ' ERROR ' "$work/server.log" || true)"
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done
