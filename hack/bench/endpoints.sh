#!/usr/bin/env bash
# Benchmark of the endpoint controllers, svcplane against upstream's kube-controller-manager of
# the same release, on fresh local control planes. Prints a table; asserts nothing.
# Sizes: BENCH_SERVICES (2000) x BENCH_PODS (10), BENCH_BIG (10000), BENCH_ROLL (1000).
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
hack/build-kube.sh >/dev/null
cargo build --release --locked -p svcplane
export SVCPLANE_BIN=$PWD/target/release/svcplane SVCPLANE_LOG=${SVCPLANE_LOG:-info}
exec cargo bench --locked -p svcplane-e2e --bench endpoints
