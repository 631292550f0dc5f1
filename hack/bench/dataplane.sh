#!/usr/bin/env bash
# Benchmark of the node agent's nftables mode on this machine's kernel (in a network namespace of
# its own): full sync, and one-endpoint changes (p50/p99) for 1,000 and 10,000 Services x 10
# endpoints. Sizes: BENCH_DP_SIZES (1000,10000); changes: BENCH_DP_CHANGES (50). Needs root (a
# network namespace; the tables are written over netlink).
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
exec cargo bench --locked -p svcplane-e2e --bench dataplane
