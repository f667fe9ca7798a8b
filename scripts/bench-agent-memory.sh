#!/usr/bin/env bash
# The agent's memory over many uploads, for one or more agent builds side by side: what an
# agent that runs for months holds between uploads, not only its peak.
#
#   scripts/bench-agent-memory.sh [size_mib=100] [rounds=12] [agent binaries...]
#
# With no binaries it measures target/release/client (built here). For each binary in turn it
# starts a release server on the embedded store and the agent, reads the agent's VmRSS once
# connected, then downloads the same random file `rounds` times and after each reads VmRSS,
# VmHWM, RssAnon and the describe phase. glibc's malloc keeps freed memory in per-thread
# arenas, so VmRSS after the rounds is what the idle agent holds from then on. Prints one
# Markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bench-lib.sh

SIZE_MIB="${1:-100}"
ROUNDS="${2:-12}"
shift 2 2>/dev/null || shift $#
API_PORT="${BENCH_API_PORT:-18580}"
S3_PORT="${BENCH_S3_PORT:-19580}"

cargo build --release --locked --workspace --bins --quiet
bin="$PWD/target/release"
agents=("$@")
((${#agents[@]})) || agents=("$bin/client")

work="$(mktemp -d -t backhaul-memory.XXXXXX)"
pids=()
trap 'stop_all; rm -rf "$work"' EXIT

file="$work/export.bin"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$file"
export SERVER_URL="http://127.0.0.1:$API_PORT"
status_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }

echo "| agent | idle once connected KiB | after round 1: VmRSS / RssAnon KiB | after round $ROUNDS: VmRSS / RssAnon KiB | VmHWM KiB | describe ms, median |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in "${!agents[@]}"; do
  agent="${agents[$n]}"
  data="$work/data-$n"
  STORAGE=embedded DATA_DIR="$data" LISTEN_ADDR="127.0.0.1:$API_PORT" \
    EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" \
    EMBEDDED_S3_SECRET_KEY="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    RUST_LOG=warn "$bin/server" > "$work/server-$n.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name bench --data-dir "$data")"
  export API_TOKEN
  start_agent "$agent" memory-store "$file" "$work/agent-$n.log"
  agent_pid=$AGENT_PID
  idle="$(status_kib "$agent_pid" VmRSS)"
  describes=()
  for round in $(seq 1 "$ROUNDS"); do
    "$bin/cli" download --client-id=memory-store --json > "$work/last.json"
    describes+=("$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); assert s["state"] == "completed", s; print(s["phases"]["describe_ms"])' "$work/last.json")")
    if ((round == 1)); then
      first="$(status_kib "$agent_pid" VmRSS) / $(status_kib "$agent_pid" RssAnon)"
    fi
  done
  last="$(status_kib "$agent_pid" VmRSS) / $(status_kib "$agent_pid" RssAnon)"
  hwm="$(status_kib "$agent_pid" VmHWM)"
  describe="$(printf '%s\n' "${describes[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
  echo "| $agent | $idle | $first | $last | $hwm | $describe |"
  stop_all
done
