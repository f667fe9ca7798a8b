#!/usr/bin/env bash
# Measures one file size on both storage modes, side by side in one run, with release binaries:
# the wall time of `cli download` (which polls every 250 ms, so it is quantised to that), and the
# server's own trigger-to-verified time (finished_at - created_at of the upload, in ms). Also reads the agent's idle RSS and its
# peak RSS (VmHWM) over the run. Results go to stdout as a Markdown table.
#
#   scripts/bench-transfer.sh [size_mib=100] [runs=5]
#
# Needs LocalStack for the s3 mode: it is installed and started like in scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source localstack/env.sh

SIZE_MIB="${1:-100}"
RUNS="${2:-5}"
API_PORT="${BENCH_API_PORT:-18480}"
S3_PORT="${BENCH_S3_PORT:-19480}"

cargo build --release --locked --bins --quiet
bin="$PWD/target/release"

started_ls=0
if ! curl -fsS --max-time 2 "$LOCALSTACK_ENDPOINT/_localstack/health" >/dev/null 2>&1; then
  started_ls=1
fi
localstack/start.sh >/dev/null

work="$(mktemp -d -t backhaul-bench.XXXXXX)"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
cleanup() {
  stop_all
  rm -rf "$work"
  if [[ $started_ls == 1 ]]; then localstack/stop.sh >/dev/null; fi
}
trap cleanup EXIT

export JWT_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/export.bin"
export SERVER_URL="http://127.0.0.1:$API_PORT"
export API_TOKEN="$("$bin/cli" token issue --operator --name bench)"

rss_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }

echo "| storage | size | runs | cli wall median s | server trigger-to-verified median s (min-max) | MiB/s at that median | agent idle RSS KiB | agent peak RSS KiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for mode in embedded s3; do
  if [[ $mode == embedded ]]; then
    STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="127.0.0.1:$API_PORT" \
      EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" RUST_LOG=warn \
      "$bin/server" > "$work/server-$mode.log" 2>&1 &
  else
    STORAGE=s3 AWS_ENDPOINT_URL="$LOCALSTACK_ENDPOINT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
      S3_BUCKET_NAME="$LOCALSTACK_BUCKET" LISTEN_ADDR="127.0.0.1:$API_PORT" RUST_LOG=warn \
      "$bin/server" > "$work/server-$mode.log" 2>&1 &
  fi
  pids+=($!)
  for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

  AGENT_TOKEN="$("$bin/cli" token issue --client-id bench-store)" \
    AGENT_SERVER_URL="ws://127.0.0.1:$API_PORT/ws/connect" FILE_PATH="$work/export.bin" RUST_LOG=warn \
    "$bin/client" > "$work/agent-$mode.log" 2>&1 &
  agent_pid=$!
  pids+=($agent_pid)
  for _ in $(seq 1 100); do
    "$bin/cli" status --client-id bench-store --json 2>/dev/null | grep -q '"connected": true' && break
    sleep 0.1
  done
  sleep 1
  idle_rss="$(rss_kib "$agent_pid" VmRSS)"

  times=()
  server_times=()
  for _ in $(seq 1 "$RUNS"); do
    t0=$(date +%s%N)
    "$bin/cli" download --client-id=bench-store --json > "$work/last.json"
    t1=$(date +%s%N)
    grep -q '"state": "completed"' "$work/last.json"
    times+=("$(( (t1 - t0) / 1000000 ))")
    server_times+=("$(python3 -c "
import json, sys
from datetime import datetime
s = json.load(open('$work/last.json'))
f = lambda t: datetime.fromisoformat(t.replace('Z', '+00:00'))
print(int((f(s['finished_at']) - f(s['created_at'])).total_seconds() * 1000))
")")
  done
  peak_rss="$(rss_kib "$agent_pid" VmHWM)"
  stop_all

  python3 -c "
import statistics
cli = [int(x) for x in '${times[*]}'.split()]
srv = [int(x) for x in '${server_times[*]}'.split()]
c, s = statistics.median(cli) / 1000, statistics.median(srv) / 1000
print(f'| $mode | $SIZE_MIB MiB | {len(cli)} | {c:.2f} | {s:.3f} ({min(srv)/1000:.3f}-{max(srv)/1000:.3f}) | {$SIZE_MIB/s:.0f} | $idle_rss | $peak_rss |')
"
done
