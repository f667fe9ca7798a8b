#!/usr/bin/env bash
# A share fetched again over a store's uplink: how many bytes and how much time the second
# fetch takes against the first, when storage copies the unchanged parts from the previous
# object. The agent runs in a network namespace whose egress is capped by `tbf`
# (scripts/uplink-ns.sh) and sends to the server's embedded store on the host side.
#
#   scripts/bench-refetch.sh [size_mib=1024] [rate_mbit=20] [runs=3]
#
# One full fetch of a random file (incompressible: `auto` sends it as it is), then `runs`
# re-fetches after 1 % of its parts (at least one) were changed in place (4 KiB of noise in
# each, at a random offset), then `runs` re-fetches after 10 MiB were appended. Each re-fetch
# follows the one before, so each sees the previous fetch's object. Bytes on the wire are
# what the qdisc sent (frames, headers, WebSocket and S3 alike); time is trigger to verified.
#
# Needs root (ip netns, tc). The first fetch takes size ÷ rate: about 7.5 minutes for 1 GiB at
# 20 Mbit/s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bench-lib.sh

SIZE_MIB="${1:-1024}"
RATE_MBIT="${2:-20}"
RUNS="${3:-3}"
API_PORT="${BENCH_API_PORT:-18495}"
S3_PORT="${BENCH_S3_PORT:-19495}"

source scripts/uplink-ns.sh
if [[ $(id -u) != 0 ]]; then
  echo "bench-refetch: needs root for ip netns and tc" >&2
  exit 2
fi

cargo build --release --locked --workspace --bins --quiet
bin="$PWD/target/release"

work="$(mktemp -d -t backhaul-refetch.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  uplink_down
  rm -rf "$work"
}
trap cleanup EXIT

uplink_up "$RATE_MBIT"

secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
file="$work/journal.bin"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$file"
export SERVER_URL="http://$HOST_IP:$API_PORT"

STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="$HOST_IP:$API_PORT" \
  EMBEDDED_S3_LISTEN_ADDR="$HOST_IP:$S3_PORT" EMBEDDED_S3_SECRET_KEY="$secret" \
  RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name bench --data-dir "$work/data")"
export API_TOKEN

# Not through in_ns: a shell function run in the background is a subshell of its own, and
# killing its pid would leave the agent running after the script.
ip netns exec "$NS" env AGENT_TOKEN="$("$bin/cli" token issue --client-id refetch-store)" \
  AGENT_SERVER_URL="ws://$HOST_IP:$API_PORT/ws/connect" FILE_PATH="$file" RUST_LOG=warn \
  "$bin/client" > "$work/agent.log" 2>&1 &
pids+=($!)
wait_connected refetch-store "$work/agent.log"

results="$work/results.jsonl"
: > "$results"
# fetch KIND RUN: one `cli download`, its time, and the bytes the uplink carried meanwhile.
fetch() {
  local sent0 sent1
  sent0="$(uplink_sent_bytes)"
  "$bin/cli" download --client-id=refetch-store --json > "$work/last.json"
  sent1="$(uplink_sent_bytes)"
  python3 - "$work/last.json" "$1" "$2" "$((sent1 - sent0))" >> "$results" <<'PY'
import json, sys
from datetime import datetime
s = json.load(open(sys.argv[1]))
assert s["state"] == "completed", s
t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))
print(json.dumps({"kind": sys.argv[2], "run": int(sys.argv[3]), "wire": int(sys.argv[4]),
    "ms": int((t(s["finished_at"]) - t(s["created_at"])).total_seconds() * 1000),
    "size": s["size"], "part_size": s["part_size"], "parts": s["parts_total"],
    "copied": s["parts_copied"], "bytes_copied": s["bytes_copied"],
    "describe_ms": s["phases"]["describe_ms"]}))
PY
}

fetch first 1
for run in $(seq 1 "$RUNS"); do
  # 1 % of the parts, at least one, each with 4 KiB rewritten in place.
  python3 - "$file" "$work/last.json" <<'PY'
import json, os, random, sys
s = json.load(open(sys.argv[2]))
parts, part_size, size = s["parts_total"], s["part_size"], s["size"]
with open(sys.argv[1], "r+b") as f:
    for index in random.sample(range(parts), max(1, parts // 100)):
        end = min(size, (index + 1) * part_size)
        f.seek(random.randrange(index * part_size, end - 4096))
        f.write(os.urandom(4096))
PY
  fetch in-place "$run"
done
for run in $(seq 1 "$RUNS"); do
  head -c $((10 * 1024 * 1024)) /dev/urandom >> "$file"
  fetch appended "$run"
done

python3 - "$results" "$SIZE_MIB" "$RATE_MBIT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
first = next(r for r in rows if r["kind"] == "first")
print(f"A {sys.argv[2]} MiB random file over a {sys.argv[3]} Mbit/s uplink (tbf), embedded store; "
      f"{first['parts']} parts of {first['part_size'] / 2**20:.0f} MiB. Re-fetches: medians of "
      f"{max(r['run'] for r in rows)} runs, each after the one before.\n")
print("| fetch | seconds | ÷ first | MiB on the wire | ÷ first | parts copied / total | describe ms |")
print("| --- | --- | --- | --- | --- | --- | --- |")
names = [("first", "first (nothing to copy)"), ("in-place", "1 % of parts changed in place"),
         ("appended", "10 MiB appended")]
for kind, name in names:
    mine = [r for r in rows if r["kind"] == kind]
    s, wire = med(r["ms"] for r in mine) / 1000, med(r["wire"] for r in mine)
    copied = med(r["copied"] for r in mine)
    total = med(r["parts"] for r in mine)
    print(f"| {name} | {s:.1f} | {s / (first['ms'] / 1000):.4f} | {wire / 2**20:.1f} | "
          f"{wire / first['wire']:.4f} | {copied:.0f} / {total:.0f} | {med(r['describe_ms'] for r in mine):.0f} |")
PY
