#!/usr/bin/env bash
# Fuzzes the REST API against its own OpenAPI document with Schemathesis: a live server (embedded
# storage, a fresh data directory, loopback ports), an admin token, and every operation checked
# for 5xx answers, undocumented statuses and content types, and bodies that do not match their
# schema. Part of the README's test command; run it alone with `scripts/schemathesis/run.sh`.
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

server="${SERVER_BIN:-$root/target/debug/server}"
if [[ -z "${SERVER_BIN:-}" ]]; then
  (cd "$root" && cargo build --quiet --locked -p server)
fi

work="$(mktemp -d)"
pid=""
cleanup() {
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

status=0
"$venv/bin/st" run "http://127.0.0.1:$api_port/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${ST_MAX_EXAMPLES:-60}" \
  --request-timeout 20 \
  --seed 1 \
  --no-color || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "schemathesis: the server died during the run" >&2
  status=1
fi
if grep -q "panicked" "$work/server.log"; then
  echo "schemathesis: the server panicked:" >&2
  grep -A5 "panicked" "$work/server.log" >&2
  status=1
fi
exit $status
