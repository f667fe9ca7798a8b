#!/usr/bin/env bash
# Transfer benchmark: Backhaul beside its two anchors, on both storage modes, in one run, with
# release binaries on loopback.
#
#   scripts/bench-transfer.sh [size_mib=100] [runs=5]
#   BENCH_TOOLS="bareput bareputcrc" scripts/bench-transfer.sh 1024 9   # some tools only
#   BENCH_PIN=1 scripts/bench-transfer.sh 1024 9   # the store PC and the cloud on a core each
#   BENCH_PART_SIZE=16777216 scripts/bench-transfer.sh 1024 9   # PART_SIZE for Backhaul and bareput
#
# For each storage mode (the embedded store, then LocalStack) it starts the server and one agent,
# then runs four transfers of the same random file per round, in an order that rotates from
# round to round:
#   - backhaul: `cli download`, trigger to verified. The server's own figure is
#     finished_at - created_at of the upload, with the time split into phases; the cli's wall time
#     is also kept (it polls every 250 ms).
#   - awscli:   `aws s3 cp` of the file to the same bucket (AWS CLI v1 from scripts/awscli.lock,
#     default multipart settings: 8 MiB parts, 10 in flight), wall time of the whole command.
#   - bareput:  the floor (loadgen/src/bin/bareput.rs): CreateMultipartUpload, presign, PUT the
#     parts with 4 in flight and complete, nothing else.
#   - bareputcrc: the same with `--checksums`: the upload created with a full-object CRC64NVME,
#     each part and the completion carrying theirs (computed before its clock starts), so that
#     what storage does for a checksummed object is in this floor too.
# Before each tool runs, `sync` writes back what the previous one stored (since 2026-12-04,
# third session). Every object is deleted after its round. It reads the agent's idle RSS, its
# peak RSS (VmHWM) and its CPU time per download from /proc; the AWS CLI's and bareput's CPU and
# peak RSS come from GNU time. Raw results go to $BENCH_RESULTS (default: a temporary file) as
# JSON lines, and the summary to stdout as Markdown tables.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source localstack/env.sh
source scripts/bench-lib.sh

SIZE_MIB="${1:-100}"
RUNS="${2:-5}"
API_PORT="${BENCH_API_PORT:-18480}"
S3_PORT="${BENCH_S3_PORT:-19480}"
# The server's PART_SIZE, and the same layout for bareput (the AWS CLI keeps its own 8 MiB).
PART_SIZE="${BENCH_PART_SIZE:-8388608}"
export PART_SIZE

cargo build --release --locked --workspace --bins --quiet
bin="$PWD/target/release"
aws="$(scripts/install-awscli.sh)"

started_ls=0
if ! curl -fsS --max-time 2 "$LOCALSTACK_ENDPOINT/_localstack/health" >/dev/null 2>&1; then
  started_ls=1
fi
localstack/start.sh >/dev/null

# BENCH_PIN=1 gives each side of the network a core of its own, as in production: the store's
# side (the agent, the AWS CLI, bareput) runs on CPU 1, the cloud's (the server with its
# embedded store, LocalStack, the operator's cli) on CPU 0. Without it they share both cores.
cloud=(); store_pc=()
if [[ ${BENCH_PIN:-0} == 1 ]]; then
  cloud=(taskset -c 0); store_pc=(taskset -c 1)
  for pid in $(pgrep -f localstack.runtime.main); do taskset -a -p -c 0 "$pid" >/dev/null; done
fi

work="$(mktemp -d -t backhaul-bench.XXXXXX)"
results="${BENCH_RESULTS:-$work/results.jsonl}"
: > "$results"
pids=()
cleanup() {
  stop_all
  rm -rf "$work"
  if [[ $started_ls == 1 ]]; then
    localstack/stop.sh >/dev/null
  elif [[ ${#cloud[@]} -gt 0 ]]; then
    for pid in $(pgrep -f localstack.runtime.main); do taskset -a -p -c 0-1 "$pid" >/dev/null; done
  fi
}
trap cleanup EXIT

embedded_secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
file="$work/export.bin"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$file"
export SERVER_URL="http://127.0.0.1:$API_PORT"
bucket="$LOCALSTACK_BUCKET"

status_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck="$(getconf CLK_TCK)"
# GNU time's output as JSON fields: wall, CPU seconds, peak RSS.
gnu_time_fields() {
  awk '{printf "\"wall_ms\": %d, \"cpu_s\": %s, \"peak_rss_kib\": %d", $1 * 1000, $2 + $3, $4}' "$1"
}

for mode in embedded s3; do
  if [[ $mode == embedded ]]; then
    STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="127.0.0.1:$API_PORT" \
      EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" EMBEDDED_S3_SECRET_KEY="$embedded_secret" \
      RUST_LOG=warn "${cloud[@]}" "$bin/server" > "$work/server-$mode.log" 2>&1 &
    s3_env=(AWS_ACCESS_KEY_ID=backhaul AWS_SECRET_ACCESS_KEY="$embedded_secret")
    endpoint="http://127.0.0.1:$S3_PORT"
  else
    STORAGE=s3 DATA_DIR="$work/data-s3" AWS_ENDPOINT_URL="$LOCALSTACK_ENDPOINT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
      S3_BUCKET_NAME="$bucket" LISTEN_ADDR="127.0.0.1:$API_PORT" ORPHAN_SWEEP_INTERVAL_SECS=0 \
      RUST_LOG=warn "${cloud[@]}" "$bin/server" > "$work/server-$mode.log" 2>&1 &
    s3_env=(AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test)
    endpoint="$LOCALSTACK_ENDPOINT"
  fi
  pids+=($!)
  s3_env+=(AWS_DEFAULT_REGION=us-east-1)
  for _ in $(seq 1 100); do curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

  data_dir="$work/data"; [[ $mode == s3 ]] && data_dir="$work/data-s3"
  API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name bench --data-dir "$data_dir")"
  export API_TOKEN
  start_agent "$bin/client" bench-store "$file" "$work/agent-$mode.log"
  agent_pid=$AGENT_PID
  if [[ ${#store_pc[@]} -gt 0 ]]; then taskset -a -p -c 1 "$agent_pid" >/dev/null; fi
  idle_rss="$(status_kib "$agent_pid" VmRSS)"

  read -ra tools <<< "${BENCH_TOOLS:-backhaul awscli bareput bareputcrc}"
  for run in $(seq 1 "$RUNS"); do
    for i in "${!tools[@]}"; do
      tool="${tools[$(((run + i) % ${#tools[@]}))]}"
      # The previous tool's object is still being written back to disk; each tool starts with
      # none of that in flight, outside its timing.
      sync
      case $tool in
        backhaul)
          ticks0="$(cpu_ticks "$agent_pid")"
          t0=$(date +%s%N)
          "${cloud[@]}" "$bin/cli" download --client-id=bench-store --json > "$work/last.json"
          t1=$(date +%s%N)
          ticks1="$(cpu_ticks "$agent_pid")"
          python3 - "$work/last.json" >> "$results" <<PY
import json, sys
from datetime import datetime
s = json.load(open(sys.argv[1]))
assert s["state"] == "completed", s
t = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))
print(json.dumps({"mode": "$mode", "tool": "backhaul", "run": $run, "bytes": s["size"],
    "wall_ms": ($t1 - $t0) // 1000000,
    "server_ms": int((t(s["finished_at"]) - t(s["created_at"])).total_seconds() * 1000),
    "cpu_s": ($ticks1 - $ticks0) / $clk_tck, **s["phases"], "key": s["key"]}))
PY
          key="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["key"])' "$work/last.json")"
          env "${s3_env[@]}" "$aws" --endpoint-url "$endpoint" s3 rm --only-show-errors "s3://$bucket/$key" >/dev/null
          ;;
        awscli)
          env "${s3_env[@]}" /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" \
            "${store_pc[@]}" "$aws" --endpoint-url "$endpoint" s3 cp --only-show-errors "$file" "s3://$bucket/bench/awscli-$run"
          echo "{\"mode\": \"$mode\", \"tool\": \"awscli\", \"run\": $run, $(gnu_time_fields "$work/time.txt")}" >> "$results"
          env "${s3_env[@]}" "$aws" --endpoint-url "$endpoint" s3 rm --only-show-errors "s3://$bucket/bench/awscli-$run" >/dev/null
          ;;
        bareput|bareputcrc)
          flags=(); [[ $tool == bareputcrc ]] && flags=(--checksums)
          out="$(env "${s3_env[@]}" /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" \
            "${store_pc[@]}" "$bin/bareput" --endpoint "$endpoint" --bucket "$bucket" --file "$file" --key "bench/$tool-$run" \
            --min-part-size "$PART_SIZE" "${flags[@]}")"
          echo "{\"mode\": \"$mode\", \"tool\": \"$tool\", \"run\": $run, ${out:1:-1}, $(gnu_time_fields "$work/time.txt")}" >> "$results"
          ;;
      esac
    done
  done
  peak_rss="$(status_kib "$agent_pid" VmHWM)"
  echo "{\"mode\": \"$mode\", \"tool\": \"agent\", \"idle_rss_kib\": $idle_rss, \"peak_rss_kib\": $peak_rss}" >> "$results"
  stop_all
done

python3 - "$results" "$SIZE_MIB" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size_mib = int(sys.argv[2])
gib = size_mib / 1024
med = statistics.median
def pick(mode, tool, field):
    return [r[field] for r in rows if r["mode"] == mode and r["tool"] == tool]
names = {"embedded": "embedded", "s3": "s3 (LocalStack)"}

# Each floor over the bare one within each round.
def paired_floor(m, tool):
    floors = {r["run"]: r["total_ms"] for r in rows if r["mode"] == m and r["tool"] == "bareput"}
    return [r["total_ms"] / floors[r["run"]] for r in rows
            if r["mode"] == m and r["tool"] == tool and r["run"] in floors]

modes = [m for m in names if pick(m, "backhaul", "server_ms")]
if not modes:
    # Floors only (BENCH_TOOLS without backhaul): what storage's own checksum work costs.
    modes = [m for m in names if pick(m, "bareput", "total_ms")]
    runs = len(pick(modes[0], "bareput", "total_ms"))
    print(f"Floors of {size_mib} MiB, medians of {runs} rounds:\n")
    print("| storage | bare PUT floor s | floor with checksums s | ÷ bare floor, medians | ÷ bare floor, median of rounds (range) | complete ms, with checksums / bare |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in modes:
        bare = med(pick(m, "bareput", "total_ms"))
        crc = med(pick(m, "bareputcrc", "total_ms"))
        ratios = paired_floor(m, "bareputcrc")
        print(f"| {names[m]} | {bare / 1000:.3f} | {crc / 1000:.3f} | {crc / bare:.2f} | {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {med(pick(m, 'bareputcrc', 'complete_ms')):.0f} / {med(pick(m, 'bareput', 'complete_ms')):.0f} |")
    sys.exit(0)
runs = len(pick(modes[0], "backhaul", "server_ms"))

# Backhaul over the floor within each round: the two ran a minute apart at most, so a shared
# machine's drift from round to round cancels out of it.
def paired(m, tool="bareput"):
    floors = {r["run"]: r["total_ms"] for r in rows if r["mode"] == m and r["tool"] == tool}
    return [r["server_ms"] / floors[r["run"]] for r in rows
            if r["mode"] == m and r["tool"] == "backhaul" and r["run"] in floors]

print(f"Transfer of {size_mib} MiB, medians of {runs} rounds (seconds):\n")
print("| storage | Backhaul trigger to verified | Backhaul `cli download` wall | `aws s3 cp` wall | bare PUT floor | Backhaul / AWS CLI | Backhaul / floor | Backhaul / floor, median of rounds (range) | Backhaul MiB/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
lines_crc = []
for m in modes:
    srv = med(pick(m, "backhaul", "server_ms")) / 1000
    cli = med(pick(m, "backhaul", "wall_ms")) / 1000
    awsw = med(pick(m, "awscli", "wall_ms")) / 1000
    floor = med(pick(m, "bareput", "total_ms")) / 1000
    ratios = paired(m)
    print(f"| {names[m]} | {srv:.3f} | {cli:.2f} | {awsw:.2f} | {floor:.3f} | {srv / awsw:.2f} | {srv / floor:.2f} | {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {size_mib / srv:.0f} |")
    crc = pick(m, "bareputcrc", "total_ms")
    if crc:
        ratios = paired(m, "bareputcrc")
        lines_crc.append(f"| {names[m]} | {floor:.3f} | {med(crc) / 1000:.3f} | {med(pick(m, 'bareputcrc', 'complete_ms')):.0f} / {med(pick(m, 'bareput', 'complete_ms')):.0f} | {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
if lines_crc:
    print("\nThe floor with storage's checksums (`bareput --checksums`), medians in seconds:\n")
    print("| storage | bare PUT floor | floor with checksums | its complete ms / the bare floor's | Backhaul / floor with checksums, median of rounds (range) |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(lines_crc))

print("\nWhere the time goes, medians in milliseconds:\n")
print("| storage | Backhaul describe (hashing) | presign | transfer | of which complete | verify | floor presign | floor PUTs | floor complete |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for m in modes:
    b = lambda f: med(pick(m, "backhaul", f))
    f = lambda f: med(pick(m, "bareput", f))
    print(f"| {names[m]} | {b('describe_ms'):.0f} | {b('presign_ms'):.0f} | {b('transfer_ms'):.0f} | {b('complete_ms'):.0f} | {b('verify_ms'):.0f} | {f('presign_ms'):.0f} | {f('put_ms'):.0f} | {f('complete_ms'):.0f} |")

print("\nFootprint (CPU seconds per GiB are medians of per-run figures):\n")
print("| storage | agent idle RSS KiB | agent peak RSS KiB | agent CPU s/GiB | `aws s3 cp` peak RSS KiB | `aws s3 cp` CPU s/GiB | bareput peak RSS KiB | bareput CPU s/GiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for m in modes:
    agent = next(r for r in rows if r["mode"] == m and r["tool"] == "agent")
    c = lambda t: med(pick(m, t, "cpu_s")) / gib
    r = lambda t: med(pick(m, t, "peak_rss_kib"))
    print(f"| {names[m]} | {agent['idle_rss_kib']} | {agent['peak_rss_kib']} | {c('backhaul'):.2f} | {r('awscli'):.0f} | {c('awscli'):.2f} | {r('bareput'):.0f} | {c('bareput'):.2f} |")
PY
