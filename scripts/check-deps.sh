#!/usr/bin/env bash
# The dependency guard that `.ci/run` runs first: the workspace must carry one generation of the
# HTTP and TLS stack and one crypto provider. It reads Cargo.lock (which `--locked` builds keep
# true to the manifests), so it needs neither the network nor a build, and it covers every target
# platform, the Windows agent's included.
#
# Usage: scripts/check-deps.sh [path/to/Cargo.lock]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock=${1:-Cargo.lock}

# Crates of which exactly one version may be in the lock file.
single=(
  hyper h2 http http-body hyper-util hyper-rustls
  rustls rustls-webpki tokio-rustls rustls-native-certs
  tungstenite tokio-tungstenite reqwest axum
)
# Crates that must not be in the lock file at all: the other crypto provider (and its C build),
# and OpenSSL-based TLS, which would be a second TLS stack.
banned=(aws-lc-rs aws-lc-sys aws-lc-fips-sys openssl openssl-sys native-tls hyper-tls)

# "name version" for every package in the lock file.
packages=$(awk '/^\[\[package\]\]/{name=""} /^name = /{name=$3} /^version = / && name != "" {gsub(/"/,"",name); v=$3; gsub(/"/,"",v); print name, v}' "$lock")

failed=0
for crate in "${single[@]}"; do
  versions=$(awk -v c="$crate" '$1 == c {print $2}' <<<"$packages" | sort -u | paste -sd' ' -)
  count=$(wc -w <<<"$versions")
  if ((count > 1)); then
    echo "check-deps: $crate is in Cargo.lock in $count versions ($versions); one HTTP/TLS generation only" >&2
    echo "  see which dependency brings each: cargo tree -i $crate@<version> --workspace -e all" >&2
    failed=1
  fi
done
for crate in "${banned[@]}"; do
  if awk -v c="$crate" '$1 == c {found=1} END {exit !found}' <<<"$packages"; then
    echo "check-deps: $crate is in Cargo.lock; Backhaul's one crypto provider is ring (MY_APPROACH.md)" >&2
    echo "  see which dependency brings it: cargo tree -i $crate --workspace -e all" >&2
    failed=1
  fi
done
if ! awk '$1 == "ring" {found=1} END {exit !found}' <<<"$packages"; then
  echo "check-deps: ring is not in Cargo.lock; what provides TLS now?" >&2
  failed=1
fi
if ((failed)); then
  exit 1
fi
echo "check-deps: one HTTP/TLS stack on ring ($(wc -l <<<"$packages") packages in $lock)"
