#!/usr/bin/env bash
# Stops the LocalStack started by start.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
if [[ -f "$LOCALSTACK_PIDFILE" ]]; then
  pid="$(cat "$LOCALSTACK_PIDFILE")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$LOCALSTACK_PIDFILE"
  echo "localstack stopped"
fi
