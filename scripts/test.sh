#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs and starts LocalStack (S3 only, with
# signature validation), then `cargo test --workspace`. LocalStack is stopped afterwards if this
# script started it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source localstack/env.sh

started_here=0
if ! curl -fsS --max-time 2 "$LOCALSTACK_ENDPOINT/_localstack/health" >/dev/null 2>&1; then
  started_here=1
fi
if [[ $started_here == 1 ]]; then
  trap 'localstack/stop.sh' EXIT
fi
localstack/start.sh

export LOCALSTACK_ENDPOINT
cargo test --workspace --locked "$@"
