#!/usr/bin/env bash
# PostgreSQL for the tests and the benchmarks, on 127.0.0.1:$PG_PORT with its data in a new
# temporary folder: Debian's postgresql-15, installed first when missing (as root).
#
#   engines/postgres.sh start   start it (a running one is reused); prints nothing else
#   engines/postgres.sh stop    stop it and remove its data
#   engines/postgres.sh url     the admin URL (trust authentication, loopback only)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
bin="/usr/lib/postgresql/$PG_MAJOR/bin"

# PostgreSQL refuses to run as root: root runs it as the package's `postgres` user.
as_owner() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() {
  [[ -f "$PG_STATE" ]] && as_owner "$bin/pg_ctl" status -D "$(cat "$PG_STATE")/data" >/dev/null 2>&1
}

case "${1:-}" in
  start)
    if running; then exit 0; fi
    if [[ ! -x "$bin/postgres" ]]; then
      if [[ $(id -u) != 0 ]]; then
        echo "postgres.sh: PostgreSQL $PG_MAJOR is missing: sudo apt-get install postgresql-$PG_MAJOR" >&2
        exit 1
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$PG_MAJOR" >/dev/null ||
        { apt-get update -q >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$PG_MAJOR" >/dev/null; }
    fi
    mkdir -p "$ENGINES_HOME"
    dir=$(mktemp -d "${TMPDIR:-/tmp}/backhaul-postgres.XXXXXX")
    chmod 755 "$dir"
    [[ $(id -u) == 0 ]] && chown postgres: "$dir"
    echo "$dir" > "$PG_STATE"
    as_owner "$bin/initdb" -D "$dir/data" -U "$PG_USER" --auth=trust --encoding=UTF8 \
      --no-instructions >"$dir/initdb.log" 2>&1 ||
      { echo "postgres.sh: initdb failed:" >&2; cat "$dir/initdb.log" >&2; exit 1; }
    # Loopback TCP only, the socket in the data folder. fsync off: this instance holds test
    # data, and a crash of the machine loses nothing anyone keeps.
    as_owner "$bin/pg_ctl" start -D "$dir/data" -l "$dir/postgres.log" -w -t 60 -o \
      "-h 127.0.0.1 -p $PG_PORT -k $dir -c max_connections=400 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      >/dev/null ||
      { echo "postgres.sh: start failed; last lines of $dir/postgres.log:" >&2; tail -n 20 "$dir/postgres.log" >&2; exit 1; }
    ;;
  stop)
    if [[ -f "$PG_STATE" ]]; then
      dir=$(cat "$PG_STATE")
      as_owner "$bin/pg_ctl" stop -D "$dir/data" -m fast -w >/dev/null 2>&1 || true
      rm -rf "$dir" "$PG_STATE"
    fi
    ;;
  url) echo "$PG_URL" ;;
  *) echo "usage: engines/postgres.sh start|stop|url" >&2; exit 2 ;;
esac
