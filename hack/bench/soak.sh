#!/usr/bin/env bash
# Soak of allocation under failures (e2e/src/soak.rs): two replicas, the leader killed three
# times and stopped past its lease once, the allocation etcd restarted twice, one create in ten
# refused after the webhook, while Services are created and deleted. Prints counts and times;
# exits non-zero if a value was ever held twice or etcd did not end equal to the Services.
# Sizes: SOAK_OPERATIONS (10000), SOAK_CONCURRENCY (16). The test suite runs a small one.
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
hack/build-kube.sh >/dev/null
cargo build --release --locked -p svcplane
export SVCPLANE_BIN=$PWD/target/release/svcplane SVCPLANE_LOG=${SVCPLANE_LOG:-info}
exec cargo bench --locked -p svcplane-e2e --bench soak
