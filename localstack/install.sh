#!/usr/bin/env bash
# Installs LocalStack (S3 only) into .localstack/venv from the committed lock file.
# Idempotent: a second run with the same lock does nothing.
#
#   localstack/install.sh           install from requirements.lock
#   localstack/install.sh --relock  resolve again (pinned LocalStack, dependencies frozen
#                                   to its era) and rewrite requirements.lock
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
lock="$here/requirements.lock"
python=/usr/bin/python3

mkdir -p "$LOCALSTACK_HOME"
if [[ ! -x "$LOCALSTACK_TOOLS/bin/uv" ]]; then
  "$python" -m venv "$LOCALSTACK_TOOLS"
  "$LOCALSTACK_TOOLS/bin/pip" install --quiet "uv==$UV_VERSION"
fi
uv="$LOCALSTACK_TOOLS/bin/uv"

if [[ "${1:-}" == "--relock" ]]; then
  rm -rf "$LOCALSTACK_VENV"
  "$uv" venv --quiet -p "$python" "$LOCALSTACK_VENV"
  VIRTUAL_ENV="$LOCALSTACK_VENV" "$uv" pip install --quiet --exclude-newer 2025-12-15 \
    'localstack-core[runtime]==4.11.1'
  VIRTUAL_ENV="$LOCALSTACK_VENV" "$uv" pip freeze > "$lock"
  cp "$lock" "$LOCALSTACK_VENV/.installed.lock"
  echo "relocked: $(wc -l < "$lock") packages"
  exit 0
fi

if [[ -f "$LOCALSTACK_VENV/.installed.lock" ]] && cmp -s "$lock" "$LOCALSTACK_VENV/.installed.lock"; then
  exit 0
fi
[[ -d "$LOCALSTACK_VENV" ]] || "$uv" venv --quiet -p "$python" "$LOCALSTACK_VENV"
VIRTUAL_ENV="$LOCALSTACK_VENV" "$uv" pip sync --quiet "$lock"
cp "$lock" "$LOCALSTACK_VENV/.installed.lock"
echo "localstack installed into $LOCALSTACK_VENV"
