#!/usr/bin/env bash
# Installs the AWS CLI (version 1, the pip package `awscli`) into .localstack/awscli from the
# committed scripts/awscli.lock, for the transfer benchmark's anchor. Idempotent. Prints the
# path of the `aws` executable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source localstack/env.sh
localstack/install.sh >/dev/null # brings the pinned uv
venv="$LOCALSTACK_HOME/awscli"
lock=scripts/awscli.lock
if ! { [[ -f "$venv/.installed.lock" ]] && cmp -s "$lock" "$venv/.installed.lock"; }; then
  [[ -d "$venv" ]] || "$LOCALSTACK_TOOLS/bin/uv" venv --quiet -p /usr/bin/python3 "$venv"
  VIRTUAL_ENV="$venv" "$LOCALSTACK_TOOLS/bin/uv" pip sync --quiet "$lock"
  cp "$lock" "$venv/.installed.lock"
fi
echo "$venv/bin/aws"
