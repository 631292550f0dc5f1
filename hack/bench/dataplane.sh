#!/usr/bin/env bash
# Benchmarks of the node agent's nftables mode on this machine's kernel (root: network
# namespaces, tables written over netlink; nft is not needed by the agent, only by kube-proxy).
#
# 1. In-process, in a namespace of its own: full sync, and one-endpoint changes (p50/p99) for
#    BENCH_DP_SIZES (1000,10000) Services x 10 endpoints, in one table and in shards
#    (BENCH_DP_SHARDS, 1,16).
# 2. Side by side with upstream kube-proxy (nftables mode, the pinned release, built by
#    hack/build-kube.sh), each agent alone in a namespace of its own against one real control
#    plane: full sync, one-endpoint changes (BENCH_DP_CHANGES, 50) and network programming
#    latency under 100 changes/s (BENCH_VS_CHURN_SECS, 10) at BENCH_VS_SIZES (1000,10000,30000).
#
# BENCH_DP_PARTS (micro,vs) picks the parts.
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
parts=${BENCH_DP_PARTS:-micro,vs}
if [[ $parts == *micro* ]]; then
  cargo bench --locked -p svcplane-e2e --bench dataplane
fi
if [[ $parts == *vs* ]]; then
  hack/build-kube.sh >/dev/null
  # The agent as users run it: an optimized build.
  cargo build --locked --release -p svcplane
  SVCPLANE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/svcplane" \
    cargo bench --locked -p svcplane-e2e --bench dataplane_vs
fi
