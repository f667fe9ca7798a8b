# Shared by the benchmark scripts and the demo, which start a server and agents; sourced, not
# run. It expects `bin` (the binaries), `API_PORT`, the array `pids`, and
# `API_TOKEN` and `SERVER_URL` exported.

# stop_all: stops every process in `pids` and waits for them.
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

# wait_connected CLIENT_ID LOG: returns once the server shows CLIENT_ID connected; an agent not
# connected within 10 s fails the script with the end of its LOG, rather than letting the
# script measure an agent that is not there.
wait_connected() {
  local tries
  for tries in $(seq 1 101); do
    "$bin/cli" status --client-id "$1" --json 2>/dev/null | grep -q '"connected": true' && return 0
    if ((tries == 101)); then
      echo "the agent $1 did not connect within 10 s; its log ($2):" >&2
      tail -20 "$2" >&2
      return 1
    fi
    sleep 0.1
  done
}

# start_agent AGENT CLIENT_ID FILE LOG: starts AGENT as CLIENT_ID sharing FILE, logging to LOG,
# and returns once the server shows it connected (and a second more, so it is idle), with its
# pid in AGENT_PID and in `pids`. An agent not connected within 10 s fails the script.
start_agent() {
  AGENT_TOKEN="$("$bin/cli" token issue --client-id "$2")" \
    AGENT_SERVER_URL="ws://127.0.0.1:$API_PORT/ws/connect" FILE_PATH="$3" RUST_LOG=warn \
    "$1" > "$4" 2>&1 &
  AGENT_PID=$!
  pids+=("$AGENT_PID")
  wait_connected "$2" "$4"
  sleep 1
}
