# Shared settings for the LocalStack scripts. Sourced, not run.
# LocalStack runs from its Python package on the host (no Docker engine needed).
LOCALSTACK_HOME="${LOCALSTACK_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.localstack}"
LOCALSTACK_VENV="$LOCALSTACK_HOME/venv"
LOCALSTACK_TOOLS="$LOCALSTACK_HOME/tools"
LOCALSTACK_PORT="${LOCALSTACK_PORT:-4566}"
LOCALSTACK_ENDPOINT="http://127.0.0.1:${LOCALSTACK_PORT}"
LOCALSTACK_BUCKET="${LOCALSTACK_BUCKET:-pos-uploads}"
LOCALSTACK_PIDFILE="$LOCALSTACK_HOME/localstack.pid"
LOCALSTACK_LOG="$LOCALSTACK_HOME/localstack.log"
# The pinned uv version that resolves and installs the locked set.
UV_VERSION="0.9.13"
