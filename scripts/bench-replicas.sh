#!/usr/bin/env bash
# Scale-out benchmark: release server replicas on one PostgreSQL and one NATS (STATE=postgres,
# BUS=nats), and several load generators holding the fleet between them (the open-file limit,
# 20,000 here, is per process). Prints the fleet's connect time, memory per idle agent summed
# over the replicas, cross-replica trigger-to-command latency, a burst, a reconnect storm, and
# the CPU and memory of the replicas, PostgreSQL and NATS per phase; first, for comparison, the
# same figures for one server on the embedded default with 10,000 agents.
#
#   scripts/bench-replicas.sh [agents=100000] [replicas=6] [loadgens=6] [storm_spread_ms=20000]
#
# `same-node` runs one server twice instead, side by side: the embedded default (SQLite, the
# in-process bus), then STATE=postgres with BUS=nats, each under the same load generator:
#
#   scripts/bench-replicas.sh same-node [agents=10000]
#
# BENCH_STORMS=N runs N storms one after the other (memory that grows with each is a leak);
# BENCH_AGENTS_PER_ADDRESS=0 makes the load generators connect without binding a source address.
# PostgreSQL and NATS are started here (engines/), on their own ports and in a temporary folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=fleet
if [[ ${1:-} == same-node ]]; then MODE=same-node; shift; fi
if [[ $MODE == same-node ]]; then
  AGENTS="${1:-10000}"; REPLICAS=1; LOADGENS=1; SPREAD="${2:-10000}"
else
  AGENTS="${1:-100000}"; REPLICAS="${2:-6}"; LOADGENS="${3:-6}"; SPREAD="${4:-20000}"
fi
API_PORT="${BENCH_API_PORT:-18680}"
S3_PORT="${BENCH_S3_PORT:-19680}"

cargo build --release --locked -p server -p loadgen --quiet
bin="$PWD/target/release"
ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d -t backhaul-replicas.XXXXXX)"
export ENGINES_HOME="$work/engines" PG_PORT="${BENCH_PG_PORT:-55632}" NATS_PORT="${BENCH_NATS_PORT:-54622}"
pids=()
# Stops every server and load generator started so far.
stop_servers() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
cleanup() {
  stop_servers
  engines/nats.sh stop || true
  engines/postgres.sh stop || true
  rm -rf "$work"
}
trap cleanup EXIT

export JWT_SECRET="replica-bench-secret-replica-bench-secret-0123"
S3_SECRET="replica-bench-s3-secret-0123456789"

wait_healthy() {
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the server on port $1 did not become healthy" >&2
  return 1
}

# Starts server number $1 with the engines when $2 is "engines", else on the embedded default;
# server 0 hosts the embedded store and the others use it, as replicas share one bucket.
# Sets $server_pid.
start_server() {
  local k=$1 engines=$2 port=$((API_PORT + $1))
  local -a env=(LISTEN_ADDR="127.0.0.1:$port" DATA_DIR="$work/r$k" RUST_LOG=warn
    MAX_AGENT_CONNECTIONS=19000)
  if [[ $k == 0 ]]; then
    env+=(STORAGE=embedded EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT"
      EMBEDDED_S3_ACCESS_KEY=backhaul EMBEDDED_S3_SECRET_KEY="$S3_SECRET")
  else
    env+=(STORAGE=s3 AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_REGION=us-east-1
      AWS_ACCESS_KEY_ID=backhaul AWS_SECRET_ACCESS_KEY="$S3_SECRET")
  fi
  if [[ $engines == engines ]]; then
    env+=(STATE=postgres DATABASE_URL="$(engines/postgres.sh url)" BUS=nats
      NATS_URL="$(engines/nats.sh url)" REPLICA_ID="replica-$k")
  fi
  env "${env[@]}" "$bin/server" >"$work/server-$k.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
}

engine_groups() {
  local pg_pid nats_pid
  pg_pid=$(head -1 "$(cat "$ENGINES_HOME/postgres.dir")/data/postmaster.pid")
  nats_pid=$(cat "$(cat "$ENGINES_HOME/nats.dir")/pid")
  echo "--group postgres=$pg_pid --group nats=$nats_pid"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), fd limit $(ulimit -n)"
engines/postgres.sh start
engines/nats.sh start

# One server under one load generator: the embedded default, or the engines.
single_node() {
  local setup=$1 agents=$2 groups=""
  echo "== one server, $([[ $setup == engines ]] && echo 'STATE=postgres BUS=nats' || echo 'SQLite and the in-process bus (the default)'), $agents agents"
  start_server 0 "$setup"
  wait_healthy "$API_PORT"
  [[ $setup == engines ]] && groups=$(engine_groups)
  # shellcheck disable=SC2086
  "$bin/loadgen" --server "127.0.0.1:$API_PORT" --server-pid "$server_pid" \
    --agents "$agents" --storm-spread-ms "$SPREAD" $groups
  echo "server errors logged: $(grep -c ' ERROR ' "$work/server-0.log" || true)"
  stop_servers
}

if [[ $MODE == same-node ]]; then
  single_node embedded "$AGENTS"
  single_node engines "$AGENTS"
  exit 0
fi
# The single-node figures beside the replicas': one process holds at most about 18,000 agents.
single_node embedded 10000

# The replicas: the first migrates the database, the others start together.
servers=() server_pids=()
start_server 0 engines
wait_healthy "$API_PORT"
servers+=("127.0.0.1:$API_PORT"); server_pids+=("$server_pid")
for k in $(seq 1 $((REPLICAS - 1))); do
  start_server "$k" engines
  servers+=("127.0.0.1:$((API_PORT + k))"); server_pids+=("$server_pid")
done
for k in $(seq 1 $((REPLICAS - 1))); do wait_healthy $((API_PORT + k)); done
server_list=$(IFS=,; echo "${servers[*]}")
pid_list=$(IFS=,; echo "${server_pids[*]}")
baseline=0
for p in "${server_pids[@]}"; do
  baseline=$((baseline + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
done

# The load generators: each its own range of agents and its own source addresses, spread over
# every replica; the last measures.
per=$(((AGENTS + LOADGENS - 1) / LOADGENS))
base=$((RANDOM % 200 + 1))
# BENCH_AGENTS_PER_ADDRESS=0 lets the kernel pick ports at connect instead of binding first
# (one run each, 2026-12-04, while storm drops were still graceful closes: connect 63.8 s
# against 50.6 s, storm 72.3 s against 79.6 s).
common=(--server "$server_list" --server-pid "$pid_list" --storm-spread-ms "$SPREAD"
  --connect-concurrency 128 --agents-per-address "${BENCH_AGENTS_PER_ADDRESS:-10000}")
holders=()
for g in $(seq 0 $((LOADGENS - 2))); do
  "$bin/loadgen" "${common[@]}" --hold --first-agent $((g * per)) --agents "$per" \
    --address-base $((base + g)) >"$work/loadgen-$g.log" 2>&1 &
  holders+=("$!"); pids+=("$!")
done
first=$(((LOADGENS - 1) * per))
peers=()
[[ ${#holders[@]} -gt 0 ]] && peers=(--peer-pid "$(IFS=,; echo "${holders[*]}")")
echo "== $REPLICAS replicas, $AGENTS agents from $LOADGENS load generators"
# shellcheck disable=SC2046
"$bin/loadgen" "${common[@]}" --first-agent "$first" --agents $((AGENTS - first)) \
  --fleet "$AGENTS" --address-base $((base + LOADGENS - 1)) --baseline-rss-kib "$baseline" \
  --storms "${BENCH_STORMS:-1}" "${peers[@]}" $(engine_groups)
for k in $(seq 0 $((REPLICAS - 1))); do
  echo "replica $k: $(grep -c ' ERROR ' "$work/server-$k.log" || true) errors logged, $(grep -c ' WARN ' "$work/server-$k.log" || true) warnings"
done
