#!/usr/bin/env bash
# Starts LocalStack (S3 only, signature validation on) on 127.0.0.1:$LOCALSTACK_PORT in the
# background, waits until S3 is available, and creates the bucket. Installs it first if needed.
# Idempotent: an already healthy LocalStack is reused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

health() { curl -fsS --max-time 2 "$LOCALSTACK_ENDPOINT/_localstack/health" 2>/dev/null; }

if health | grep -q '"s3": *"\(available\|running\)"'; then
  echo "localstack already running at $LOCALSTACK_ENDPOINT"
else
  "$here/install.sh"
  mkdir -p "$LOCALSTACK_HOME/volume"
  (
    cd "$LOCALSTACK_HOME"
    GATEWAY_LISTEN="127.0.0.1:$LOCALSTACK_PORT" SERVICES=s3 DNS_ADDRESS=0 \
      S3_SKIP_SIGNATURE_VALIDATION=0 LOCALSTACK_VOLUME_DIR="$LOCALSTACK_HOME/volume" \
      EAGER_SERVICE_LOADING=1 SKIP_SSL_CERT_DOWNLOAD=1 DISABLE_EVENTS=1 \
      nohup "$LOCALSTACK_VENV/bin/python" -m localstack.runtime.main > "$LOCALSTACK_LOG" 2>&1 &
    echo $! > "$LOCALSTACK_PIDFILE"
  )
  for _ in $(seq 1 120); do
    if health | grep -q '"s3": *"\(available\|running\)"'; then break; fi
    if ! kill -0 "$(cat "$LOCALSTACK_PIDFILE")" 2>/dev/null; then
      echo "localstack exited during start-up; last lines of $LOCALSTACK_LOG:" >&2
      tail -n 30 "$LOCALSTACK_LOG" >&2
      exit 1
    fi
    sleep 0.5
  done
  health | grep -q '"s3": *"\(available\|running\)"' || { echo "localstack not healthy after 60 s" >&2; exit 1; }
  echo "localstack running at $LOCALSTACK_ENDPOINT (pid $(cat "$LOCALSTACK_PIDFILE"))"
fi

# Create the bucket with a SigV4-signed request, using the AWS CLI-free path: LocalStack accepts
# the fixed test credentials. 409 (already exists / owned by you) is fine.
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT \
  --aws-sigv4 "aws:amz:us-east-1:s3" --user "test:test" \
  "$LOCALSTACK_ENDPOINT/$LOCALSTACK_BUCKET")
case "$code" in
  200|409) echo "bucket $LOCALSTACK_BUCKET ready" ;;
  *) echo "creating bucket $LOCALSTACK_BUCKET failed with HTTP $code" >&2; exit 1 ;;
esac
