#!/usr/bin/env bash
# The operator page's store list at fleet scale: one release server (embedded storage), the load
# generator's simulated agents (each with a `region` label), and `GET /stores` timed as the page
# asks for it (first page, a middle page, a search, a label filter, a glob, offline only).
#
#   scripts/bench-ui.sh [stores=10000] [requests_per_kind=50]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STORES="${1:-10000}"
REQUESTS="${2:-50}"
API_PORT="${BENCH_API_PORT:-18581}"
S3_PORT="${BENCH_S3_PORT:-19581}"

cargo build --release --locked -p server -p loadgen --quiet
bin="$PWD/target/release"
ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d -t backhaul-ui.XXXXXX)"
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export JWT_SECRET="ui-bench-secret-ui-bench-secret-0123456789"
LISTEN_ADDR="127.0.0.1:$API_PORT" EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" \
  STORAGE=embedded DATA_DIR="$work/data" MAX_AGENT_CONNECTIONS=$((STORES + 1000)) \
  RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
"$bin/loadgen" --server "127.0.0.1:$API_PORT" --server-pid "$server_pid" \
  --agents "$STORES" --list-stores "$REQUESTS"
