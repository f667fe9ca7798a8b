#!/usr/bin/env bash
# Runs inside the LocalStack container once S3 is ready (docker-compose only).
set -euo pipefail
awslocal s3 mb "s3://${S3_BUCKET_NAME:-pos-uploads}" || true
