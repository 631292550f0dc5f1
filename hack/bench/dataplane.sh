#!/usr/bin/env bash
# Benchmark of the node agent's nftables mode on this machine's kernel (in a network namespace of
# its own): full sync and single-endpoint update for 1,000 and 10,000 Services x 10 endpoints.
# Sizes: BENCH_DP_SIZES (1000,10000). Needs root (network namespaces, nft).
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
exec cargo bench --locked -p svcplane-e2e --bench dataplane
