#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, with the sizes used there, one after the other:
# transfer at 100 MiB (5 rounds) and 1 GiB (3 rounds), both storage modes beside the AWS CLI and
# the bare-PUT floor, then the fleet at 10,000 agents, then a collection from 1,000 stores, then
# what compression costs the agent (100 MiB and 1 GiB, random and CSV), then (as root) a store's
# 20 Mbit/s uplink emulated in a network namespace, with a random file and a CSV export, and a
# 1 GiB file fetched again over it after small changes; the agent's memory over twelve uploads
# comes after the transfers. Each script installs what it needs
# (LocalStack, the AWS CLI) and prints Markdown tables. Took 4 min 13 s on 2 cores before the
# collection, encoding, uplink and re-fetch benchmarks, which add about 3, 3, 6.5 and 9.5 min;
# the agent's memory adds about 1 min.
#
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./bench-transfer.sh 100 5
echo
./bench-transfer.sh 1024 3
echo
./bench-agent-memory.sh 100 12
echo
./bench-fleet.sh 10000 10000
echo
./bench-collect.sh 1000 50,200
echo
./bench-encoding.sh 100 3
echo
./bench-encoding.sh 1024 1
echo
if [[ $(id -u) == 0 ]]; then
  ./bench-uplink.sh 100 20 1
  echo
  ./bench-refetch.sh 1024 20 3
else
  echo "bench-uplink.sh skipped: it needs root for ip netns and tc"
fi
