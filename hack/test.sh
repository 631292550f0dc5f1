#!/usr/bin/env bash
# Runs every test: formatting and lint gates, unit tests, and the e2e suite against a real
# kube-apiserver and etcd (started and torn down by the suite itself). Sets up what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
KUBE_BIN=$(hack/build-kube.sh)
echo "test: kube-apiserver $("$KUBE_BIN/kube-apiserver" --version), $(etcd --version | head -1)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The pure allocation core builds (and its tests pass) without etcd or a Kubernetes client.
cargo test --locked -p svcplane-allocators --no-default-features --lib
shellcheck -x hack/*.sh hack/lib/*.sh hack/cluster/*.sh hack/bench/*.sh .ci/run
# The shipped alert rules load and behave as their unit tests say.
PROM_BIN=$(hack/build-prometheus.sh)
"$PROM_BIN/promtool" check rules manifests/monitoring/prometheus/svcplane.rules.yaml
(cd manifests/monitoring/prometheus && "$PROM_BIN/promtool" test rules svcplane.rules.test.yaml)

# The e2e suite runs the svcplane binary as separate processes; the real-node test runs the
# image of the release build on a node booted from cached parts.
cargo build --locked -p svcplane
cargo build --locked --release -p svcplane
SVCPLANE_IMAGE=$(hack/image.sh --binary target/release/svcplane)
export SVCPLANE_IMAGE
hack/cluster/node-image.sh >/dev/null
log=$(mktemp); trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --skip svcplane_runs_as_users_run_it 2>&1 | tee "$log"
# Alone, so that nothing else competes with the emulated node; its step times are printed.
cargo test --locked -p svcplane-e2e --test real_node -- --nocapture svcplane_runs_as_users_run_it 2>&1 | tee -a "$log"

# The suite's control plane must not outlive it: its supervisor tears it down within seconds of
# the test process exiting.
leftovers() {
  # The suite's processes all carry its directories (svcplane-e2e-*) in their arguments, the
  # real-node test's VM included; svcplane processes of the local demo (hack/local-up.sh) or of
  # a user's cluster are not the suite's and do not count.
  pgrep -af "svcplane-e2e-" | grep -v pgrep || true
  ip netns list 2>/dev/null | grep -E '^sp[0-9a-f]{4}-|^svcplane-e2e-' || true   # the e2e tests' namespaces
}
for _ in $(seq 100); do
  [ -z "$(leftovers)" ] && ! compgen -G "${TMPDIR:-/tmp}/svcplane-e2e-*" >/dev/null && break
  sleep 0.2
done
if [ -n "$(leftovers)" ]; then
  echo "test: processes left behind by the e2e suite:" >&2; leftovers >&2; exit 1
fi
if compgen -G "${TMPDIR:-/tmp}/svcplane-e2e-*" >/dev/null; then
  echo "test: temporary directories left behind: $(echo "${TMPDIR:-/tmp}"/svcplane-e2e-*)" >&2; exit 1
fi
# One closing line for the whole run (cargo prints one per test binary, the last often doc-tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
