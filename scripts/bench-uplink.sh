#!/usr/bin/env bash
# A store's uplink, emulated: the agent (and the two anchors) run in a network namespace whose
# egress is capped by a `tbf` qdisc, and send the same file to the server's embedded store on the
# host side of a veth pair. Backhaul (`--encoding auto`, then `none`), `aws s3 cp` and the
# bare-PUT floor move it in turn, and each is set against the physical limit, size ÷ rate.
#
#   scripts/bench-uplink.sh [size_mib=100] [rate_mbit=20] [runs=1] [files="random csv"]
#
# `random` is incompressible (`auto` must cost nothing over `none`); `csv` is a generated
# point-of-sale export (transaction id, time, store, SKU, quantity, price, card last four, auth
# code), which zstd shrinks severalfold. Every Backhaul transfer asks for the file under a share
# name of its own, so that none copies parts inside storage from the one before.
#
# BENCH_PART_SIZE sets the server's PART_SIZE and bareput's layout (default 8 MiB).
#
# Needs root (ip netns, tc); the namespace (scripts/uplink-ns.sh) is created here and removed
# on exit.
#
# tbf counts whole Ethernet frames, so with a 1500-byte MTU about 4.5 % of the rate goes to
# headers (1514-byte frames carry 1448 bytes of TCP payload with timestamps); the script prints
# that framing limit too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bench-lib.sh

SIZE_MIB="${1:-100}"
RATE_MBIT="${2:-20}"
RUNS="${3:-1}"
FILES="${4:-random csv}"
API_PORT="${BENCH_API_PORT:-18490}"
S3_PORT="${BENCH_S3_PORT:-19490}"
PART_SIZE="${BENCH_PART_SIZE:-8388608}"
export PART_SIZE

source scripts/uplink-ns.sh
if [[ $(id -u) != 0 ]]; then
  echo "bench-uplink: needs root for ip netns and tc" >&2
  exit 2
fi

cargo build --release --locked --workspace --bins --quiet
bin="$PWD/target/release"
aws="$(scripts/install-awscli.sh)"

work="$(mktemp -d -t backhaul-uplink.XXXXXX)"
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
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/random"
python3 scripts/pos-csv.py "$work/csv" $((SIZE_MIB * 1024 * 1024))
export SERVER_URL="http://$HOST_IP:$API_PORT"
endpoint="http://$HOST_IP:$S3_PORT"
bucket=pos-uploads

STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="$HOST_IP:$API_PORT" \
  EMBEDDED_S3_LISTEN_ADDR="$HOST_IP:$S3_PORT" EMBEDDED_S3_SECRET_KEY="$secret" \
  RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name bench --data-dir "$work/data")"
export API_TOKEN

shares="$(for kind in $FILES; do for run in $(seq 1 "$RUNS"); do for encoding in auto none; do
  echo "$kind-$encoding-$run=$work/$kind"; done; done; done | paste -sd, -)"
# Not through in_ns: a shell function run in the background is a subshell of its own, and
# killing its pid would leave the agent running after the script.
ip netns exec "$NS" env AGENT_TOKEN="$("$bin/cli" token issue --client-id uplink-store)" \
  AGENT_SERVER_URL="ws://$HOST_IP:$API_PORT/ws/connect" FILE_PATH="$work/random" \
  SHARED_FILES="$shares" RUST_LOG=warn \
  "$bin/client" > "$work/agent.log" 2>&1 &
pids+=($!)
wait_connected uplink-store "$work/agent.log"

s3_env=(AWS_ACCESS_KEY_ID=backhaul AWS_SECRET_ACCESS_KEY="$secret" AWS_DEFAULT_REGION=us-east-1)
results="$work/results.jsonl"
: > "$results"
for kind in $FILES; do
  file="$work/$kind"
  for run in $(seq 1 "$RUNS"); do
    for encoding in auto none; do
      "$bin/cli" download --client-id=uplink-store --file="$kind-$encoding-$run" --encoding="$encoding" --json > "$work/last.json"
      python3 - "$work/last.json" "$run" "$kind" "$encoding" >> "$results" <<'PY'
import json, sys
from datetime import datetime
s = json.load(open(sys.argv[1]))
assert s["state"] == "completed", s
t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))
print(json.dumps({"file": sys.argv[3], "tool": "backhaul-" + sys.argv[4], "run": int(sys.argv[2]),
    "ms": int((t(s["finished_at"]) - t(s["created_at"])).total_seconds() * 1000),
    "wire": s["stored_size"], "encoding": s["encoding"]}))
PY
    done

    t0=$(date +%s%N)
    in_ns env "${s3_env[@]}" "$aws" --endpoint-url "$endpoint" s3 cp --only-show-errors "$file" "s3://$bucket/bench/awscli-$kind-$run"
    t1=$(date +%s%N)
    echo "{\"file\": \"$kind\", \"tool\": \"awscli\", \"run\": $run, \"ms\": $(((t1 - t0) / 1000000))}" >> "$results"

    out="$(in_ns env "${s3_env[@]}" "$bin/bareput" --endpoint "$endpoint" --bucket "$bucket" --file "$file" --key "bench/bareput-$kind-$run" \
      --min-part-size "$PART_SIZE")"
    echo "{\"file\": \"$kind\", \"tool\": \"bareput\", \"run\": $run, \"ms\": $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["total_ms"])' "$out")}" >> "$results"
  done
done

python3 - "$results" "$SIZE_MIB" "$RATE_MBIT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size = int(sys.argv[2]) * 1024 * 1024
rate = int(sys.argv[3]) * 1e6
limit = size * 8 / rate
framing = limit * 1514 / 1448
runs = max(r["run"] for r in rows)
print(f"{sys.argv[2]} MiB over a {sys.argv[3]} Mbit/s uplink (tbf), medians of {runs} run(s).")
print(f"Physical limit size ÷ rate: {limit:.1f} s; with Ethernet, IP and TCP headers at MTU 1500: {framing:.1f} s.\n")
print("| file | tool | seconds | ÷ limit | ÷ framing limit | MiB on the wire | Mbit/s of file |")
print("| --- | --- | --- | --- | --- | --- | --- |")
names = [("backhaul-auto", "Backhaul `auto`"), ("backhaul-none", "Backhaul `none`"),
         ("awscli", "`aws s3 cp`"), ("bareput", "bare-PUT floor")]
for kind in dict.fromkeys(r["file"] for r in rows):
    for tool, name in names:
        mine = [r for r in rows if r["file"] == kind and r["tool"] == tool]
        s = statistics.median(r["ms"] for r in mine) / 1000
        wire = statistics.median(r.get("wire", size) for r in mine) / 2**20
        enc = {r.get("encoding") for r in mine} - {None}
        label = name + (f" ({', '.join(sorted(enc))})" if enc else "")
        print(f"| {kind} | {label} | {s:.1f} | {s / limit:.3f} | {s / framing:.3f} | {wire:.1f} | {size * 8 / s / 1e6:.2f} |")
    auto = statistics.median(r["ms"] for r in rows if r["file"] == kind and r["tool"] == "backhaul-auto")
    none = statistics.median(r["ms"] for r in rows if r["file"] == kind and r["tool"] == "backhaul-none")
    print(f"| {kind} | `auto` ÷ `none` | {auto / none:.3f} | | | | |")
PY
