#!/usr/bin/env bash
# What compression costs the store machine: the agent's CPU seconds per GiB and peak RSS, with
# release binaries on loopback against the embedded store, for each file kind and encoding.
#
#   scripts/bench-encoding.sh [size_mib=100] [runs=3] [files="random csv"] [encodings="none zstd zstd+sealed"]
#
# Each (file, encoding) pair gets a fresh agent process, so its peak RSS (VmHWM) is its own; it
# runs `runs` downloads (`cli download --encoding`), and the CPU time of each is read from
# /proc/<agent>/stat. `random` is incompressible; `csv` is a generated point-of-sale export.
# An encoding ending in `+sealed` has the agent encrypt the share (ENCRYPT_TO, to an identity
# made with `cli key generate`), and the file is fetched and decrypted once to check it. Each
# run asks for the file under another share name, so no run copies parts from the one before.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bench-lib.sh

SIZE_MIB="${1:-100}"
RUNS="${2:-3}"
FILES="${3:-random csv}"
ENCODINGS="${4:-none zstd zstd+sealed}"
API_PORT="${BENCH_API_PORT:-18500}"
S3_PORT="${BENCH_S3_PORT:-19500}"

cargo build --release --locked --workspace --bins --quiet
bin="$PWD/target/release"

work="$(mktemp -d -t backhaul-encoding.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

size=$((SIZE_MIB * 1024 * 1024))
head -c "$size" /dev/urandom > "$work/random"
python3 scripts/pos-csv.py "$work/csv" "$size"

secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SERVER_URL="http://127.0.0.1:$API_PORT"
STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="127.0.0.1:$API_PORT" \
  EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" EMBEDDED_S3_SECRET_KEY="$secret" \
  RUST_LOG=warn "$bin/server" > "$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name bench --data-dir "$work/data")"
export API_TOKEN
agent_token="$("$bin/cli" token issue --client-id encoding-store)"
recipient="$("$bin/cli" key generate -o "$work/identity.key")"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck="$(getconf CLK_TCK)"
results="$work/results.jsonl"
: > "$results"
for kind in $FILES; do
  for encoding in $ENCODINGS; do
    asked="${encoding%+sealed}"
    encrypt_to=""
    [[ "$encoding" == *+sealed ]] && encrypt_to="$recipient"
    shares="$(seq 1 "$RUNS" | sed "s|.*|run&=$work/$kind|" | paste -sd, -)"
    AGENT_TOKEN="$agent_token" AGENT_SERVER_URL="ws://127.0.0.1:$API_PORT/ws/connect" \
      FILE_PATH="$work/$kind" SHARED_FILES="$shares" ENCRYPT_TO="$encrypt_to" KEY_DIR="$work/keys" \
      SPOOL_DIR="$work" RUST_LOG=warn "$bin/client" > "$work/agent.log" 2>&1 &
    agent=$!
    wait_connected encoding-store "$work/agent.log"
    for run in $(seq 1 "$RUNS"); do
      ticks0="$(cpu_ticks "$agent")"
      "$bin/cli" download --client-id=encoding-store --file="run$run" --encoding="$asked" --json > "$work/last.json"
      ticks1="$(cpu_ticks "$agent")"
      python3 - "$work/last.json" "$kind" "$encoding" "$(((ticks1 - ticks0)))" "$clk_tck" >> "$results" <<'PY'
import json, sys
from datetime import datetime
s = json.load(open(sys.argv[1]))
assert s["state"] == "completed", s
t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))
print(json.dumps({"file": sys.argv[2], "encoding": sys.argv[3], "size": s["size"],
    "stored": s["stored_size"], "cpu_s": int(sys.argv[4]) / int(sys.argv[5]),
    "ms": int((t(s["finished_at"]) - t(s["created_at"])).total_seconds() * 1000),
    "describe_ms": s["phases"]["describe_ms"]}))
PY
    done
    peak="$(awk '/^VmHWM:/ {print $2}' "/proc/$agent/status")"
    if [[ -n "$encrypt_to" ]]; then
      upload="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["upload_id"])' "$work/last.json")"
      "$bin/cli" fetch "$upload" -o "$work/opened" --identity "$work/identity.key" --json > /dev/null
      cmp -s "$work/opened" "$work/$kind" || { echo "bench-encoding: $kind $encoding did not open to the file" >&2; exit 1; }
      rm -f "$work/opened"
    fi
    echo "{\"file\": \"$kind\", \"encoding\": \"$encoding\", \"peak_rss_kib\": $peak}" >> "$results"
    kill "$agent"
    wait "$agent" 2>/dev/null || true
  done
done

python3 - "$results" "$SIZE_MIB" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
gib = int(sys.argv[2]) / 1024
med = statistics.median
print(f"{sys.argv[2]} MiB on loopback, embedded store, medians of the runs:\n")
print("| file | encoding | trigger to verified s | describe ms | stored MiB | ratio | agent CPU s/GiB | agent peak RSS KiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for kind in dict.fromkeys(r["file"] for r in rows):
    for enc in dict.fromkeys(r["encoding"] for r in rows):
        runs = [r for r in rows if r["file"] == kind and r["encoding"] == enc and "ms" in r]
        peak = next(r["peak_rss_kib"] for r in rows if r["file"] == kind and r["encoding"] == enc and "peak_rss_kib" in r)
        stored = med(r["stored"] for r in runs)
        print(f"| {kind} | {enc} | {med(r['ms'] for r in runs) / 1000:.2f} | {med(r['describe_ms'] for r in runs):.0f} | "
              f"{stored / 2**20:.1f} | {runs[0]['size'] / stored:.2f} | {med(r['cpu_s'] for r in runs) / gib:.2f} | {peak} |")
PY
