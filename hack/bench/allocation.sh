#!/usr/bin/env bash
# Benchmark of ClusterIP allocation on a fresh local control plane: allocations per second through
# etcd (one and two replicas), Service creates per second with and without svcplane's webhook,
# and the webhook's p50/p99. Prints tables; asserts only that nothing was handed out twice.
# Sizes: BENCH_ALLOCS (10000), BENCH_SERVICES (1000).
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
hack/build-kube.sh >/dev/null
cargo build --release --locked -p svcplane
export SVCPLANE_BIN=$PWD/target/release/svcplane SVCPLANE_LOG=${SVCPLANE_LOG:-info}
exec cargo bench --locked -p svcplane-e2e --bench allocation
