#!/usr/bin/env bash
# The main job end to end, on one machine, with nothing but Rust installed: builds the binaries,
# starts the server on embedded storage and an agent sharing a generated 100 MiB file, runs
# `cli download --client-id=restaurant-1`, reads the object back through the S3 API and compares
# SHA-256s, then stops everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bench-lib.sh

API_PORT="${DEMO_API_PORT:-18080}"
S3_PORT="${DEMO_S3_PORT:-19000}"
SIZE_MIB="${DEMO_SIZE_MIB:-100}"
CLIENT_ID="restaurant-1"

echo "==> building (a first build compiles 343 crates: about 6 minutes on 2 cores; then seconds)"
cargo build --locked --bins
bin="$PWD/target/debug"

work="$(mktemp -d -t backhaul-demo.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export EMBEDDED_S3_SECRET_KEY="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export EMBEDDED_S3_ACCESS_KEY="backhaul-demo"

echo "==> generating a ${SIZE_MIB} MiB file for the agent"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/transactions-export.csv"
local_sha="$(sha256sum "$work/transactions-export.csv" | cut -d' ' -f1)"

echo "==> starting the server (STORAGE=embedded, API :$API_PORT, S3 :$S3_PORT)"
STORAGE=embedded DATA_DIR="$work/data" LISTEN_ADDR="127.0.0.1:$API_PORT" \
  EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$S3_PORT" \
  "$bin/server" > "$work/server.log" 2>&1 &
pids+=($!)

export SERVER_URL="http://127.0.0.1:$API_PORT"
for _ in $(seq 1 100); do
  curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$SERVER_URL/healthz" >/dev/null || { cat "$work/server.log"; exit 1; }

# The first admin token comes from the server host (the server's own key, made on its first
# start); the cli then mints the store's token through the API.
API_TOKEN="$(RUST_LOG=warn "$bin/server" token issue --operator --admin --name demo --data-dir "$work/data")"
export API_TOKEN

echo "==> starting the agent $CLIENT_ID"
AGENT_TOKEN="$("$bin/cli" token issue --client-id "$CLIENT_ID")" \
  AGENT_SERVER_URL="ws://127.0.0.1:$API_PORT/ws/connect" \
  FILE_PATH="$work/transactions-export.csv" \
  "$bin/client" > "$work/agent.log" 2>&1 &
pids+=($!)

wait_connected "$CLIENT_ID" "$work/agent.log"
"$bin/cli" clients

echo "==> cli download --client-id=$CLIENT_ID"
start=$(date +%s%N)
"$bin/cli" download --client-id="$CLIENT_ID" | tee "$work/download.txt"
end=$(date +%s%N)
key="$(awk '/key:/ {print $2}' "$work/download.txt")"

echo "==> reading the object back through the S3 API"
remote_sha="$(curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
  --user "$EMBEDDED_S3_ACCESS_KEY:$EMBEDDED_S3_SECRET_KEY" \
  "http://127.0.0.1:$S3_PORT/pos-uploads/$key" | sha256sum | cut -d' ' -f1)"
echo "agent file sha256: $local_sha"
echo "S3 object sha256:  $remote_sha"
echo "cli download wall time: $(( (end - start) / 1000000 )) ms"
if [[ "$local_sha" != "$remote_sha" ]]; then
  echo "MISMATCH" >&2
  exit 1
fi
echo "==> verified: the object in S3 is byte-identical to the agent's file"

upload_id="$(awk '/upload:/ {print $2; exit}' "$work/download.txt")"
echo "==> cli fetch $upload_id -o $work/fetched.csv (through a presigned GET, checked by SHA-256)"
"$bin/cli" fetch "$upload_id" -o "$work/fetched.csv"
fetched_sha="$(sha256sum "$work/fetched.csv" | cut -d' ' -f1)"
if [[ "$local_sha" != "$fetched_sha" ]]; then
  echo "MISMATCH in the fetched file" >&2
  exit 1
fi
echo "==> the operator's copy is byte-identical too"
