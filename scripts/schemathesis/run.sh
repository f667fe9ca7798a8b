#!/usr/bin/env bash
# Fuzzes the REST API against its own OpenAPI document with Schemathesis: a live server (embedded
# storage, a fresh data directory, loopback ports), an admin token, and every operation checked
# for 5xx answers, undocumented statuses and content types, and bodies that do not match their
# schema. Two passes: one with the ids Schemathesis makes up (the error paths), one with the
# ids of a real store, upload, collection and schedule made first (the paths that find them).
# It fails if the server dies or panics, or if the token shows up in the server's log. Part of
# the README's test command; run it alone with `scripts/schemathesis/run.sh`.
#
# Schemathesis comes from PyPI at the versions in requirements.lock, in .schemathesis/venv.
#   SERVER_BIN      the server binary (default: target/debug/server, built if missing)
#   ST_MAX_EXAMPLES cases per operation in the fuzzing phase (default 60)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.schemathesis/venv"
lock="$here/requirements.lock"

if ! cmp -s "$lock" "$venv/.installed.lock" 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$lock"
  cp "$lock" "$venv/.installed.lock"
fi

bin="${BIN_DIR:-$root/target/debug}"
if [[ -z "${BIN_DIR:-}" ]]; then
  (cd "$root" && cargo build --quiet --locked -p server -p client)
fi
server="$bin/server"

work="$(mktemp -d)"
pid=""
agent_pid=""
cleanup() {
  [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  [[ -n "$pid" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api_port=$(free_port)
s3_port=$(free_port)
export DATA_DIR="$work/data" LISTEN_ADDR="127.0.0.1:$api_port" \
  EMBEDDED_S3_LISTEN_ADDR="127.0.0.1:$s3_port" STORAGE=embedded RUST_LOG=warn
"$server" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$api_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$("$server" token issue --operator --admin --name schemathesis)
tokens=("$token")
base="http://127.0.0.1:$api_port"

# Seed: a store with a completed upload, a collection that has settled, a schedule.
store=st-store
head -c 1048576 /dev/urandom >"$work/share.bin"
AGENT_TOKEN=$("$server" token issue --client-id "$store") \
  AGENT_SERVER_URL="ws://127.0.0.1:$api_port/ws/connect" FILE_PATH="$work/share.bin" \
  KEY_DIR="$work/agent-keys" HOME="$work" \
  "$bin/client" >"$work/agent.log" 2>&1 &
agent_pid=$!
seed=$(BASE="$base" TOKEN="$token" STORE="$store" /usr/bin/python3 "$here/seed.py")
read -r upload_id collection_id schedule_id <<<"$seed"

run_pass() {
  local name=$1
  shift
  echo "schemathesis: $name"
  local config=()
  if [[ $1 == --config-file ]]; then
    config=("$1" "$2")
    shift 2
  fi
  "$venv/bin/st" "${config[@]}" run "$base/openapi.json" "$@" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --phases examples,coverage,fuzzing \
    --max-examples "${ST_MAX_EXAMPLES:-60}" \
    --request-timeout 20 \
    --seed 1 \
    --no-color
}

# Admin routes go last, each pass with a token of its own: Schemathesis reads token ids and key
# ids from the answers and may revoke the token it runs with (`DELETE /tokens/{jti}`) or retire
# its key (`DELETE /keys/{kid}?force=true`), as an admin may.
status=0
run_pass "made-up ids" --exclude-tag tokens --exclude-tag keys || status=$?
sed -e "s/@UPLOAD@/$upload_id/" -e "s/@COLLECTION@/$collection_id/" \
  -e "s/@SCHEDULE@/$schedule_id/" -e "s/@STORE@/$store/" \
  "$here/known-ids.toml" >"$work/known-ids.toml"
token=$("$server" token issue --operator --admin --name schemathesis)
tokens+=("$token")
run_pass "known ids" --config-file "$work/known-ids.toml" --exclude-tag tokens --exclude-tag keys ||
  status=$?
token=$("$server" token issue --operator --admin --name schemathesis)
tokens+=("$token")
run_pass "tokens and keys" --include-tag tokens --include-tag keys || status=$?

if ! kill -0 "$pid" 2>/dev/null; then
  echo "schemathesis: the server died during the run" >&2
  status=1
fi
if grep -q "panicked" "$work/server.log"; then
  echo "schemathesis: the server panicked:" >&2
  grep -A5 "panicked" "$work/server.log" >&2
  status=1
fi
for t in "${tokens[@]}"; do
  if grep -qF "$t" "$work/server.log"; then
    echo "schemathesis: an operator token is in the server's log" >&2
    status=1
  fi
done
exit $status
