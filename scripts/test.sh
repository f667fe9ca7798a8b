#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs and starts LocalStack (S3 only, with
# signature validation), PostgreSQL and NATS (engines/, loopback ports, data in temporary
# folders), installs Debian's Chromium and the browser test's playwright-core
# (ui-tests/package-lock.json), runs `cargo test --workspace`, then fuzzes the REST API with
# Schemathesis (scripts/schemathesis/run.sh). LocalStack is stopped afterwards if this script
# started it; PostgreSQL and NATS always are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source localstack/env.sh

started_here=0
if ! curl -fsS --max-time 2 "$LOCALSTACK_ENDPOINT/_localstack/health" >/dev/null 2>&1; then
  started_here=1
fi
stop_all() {
  engines/postgres.sh stop || true
  engines/nats.sh stop || true
  if [[ $started_here == 1 ]]; then localstack/stop.sh; fi
}
trap stop_all EXIT
localstack/start.sh
engines/postgres.sh start
engines/nats.sh start
# The stores' tests run on both engines, the multi-replica tests on PostgreSQL and NATS.
BACKHAUL_TEST_DATABASE_URL=$(engines/postgres.sh url)
BACKHAUL_TEST_NATS_URL=$(engines/nats.sh url)
# A test starts a NATS server of its own that asks for a password.
BACKHAUL_TEST_NATS_SERVER=$(engines/nats.sh bin)
export BACKHAUL_TEST_DATABASE_URL BACKHAUL_TEST_NATS_URL BACKHAUL_TEST_NATS_SERVER

# The operator page's browser test: Debian's Chromium (playwright cannot download browsers
# here) and playwright-core at the locked version.
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "test.sh: the browser test needs Chromium: sudo apt-get install chromium" >&2
    exit 1
  fi
fi
if ! cmp -s ui-tests/package-lock.json ui-tests/node_modules/.installed.lock 2>/dev/null; then
  npm ci --prefix ui-tests --no-audit --no-fund --silent
  cp ui-tests/package-lock.json ui-tests/node_modules/.installed.lock
fi

export LOCALSTACK_ENDPOINT
cargo test --workspace --locked "$@"
# The server and client binaries were built for their own tests (server/tests/binary.rs,
# client/tests/binary.rs); Schemathesis runs them as they are.
BIN_DIR="$PWD/target/debug" bash scripts/schemathesis/run.sh
