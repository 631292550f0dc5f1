#!/usr/bin/env bash
# Builds Prometheus and promtool of a pinned release from the Go module
# github.com/prometheus/prometheus, with Kubernetes service discovery only (Debian's package has
# none: it was removed for client-go's dependencies), cached by version under
# $SVCPLANE_CACHE/prometheus-<version>. A second run only prints the directory.
#
# usage: hack/build-prometheus.sh      -> prints the directory holding prometheus and promtool
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
. "$HERE/versions.env"
# shellcheck source=hack/lib/gobuild.sh
. "$HERE/lib/gobuild.sh"
TAGS=remove_all_sd,enable_kubernetes_sd
# Keyed by everything the build depends on, not only the release name.
key=$(echo "$PROMETHEUS_MODULE_VERSION $TAGS $(sha256sum < "$HERE/lib/gobuild.sh")" | sha256sum | cut -c1-12)
OUT=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}/prometheus-$PROMETHEUS_VERSION-$key
if [ ! -x "$OUT/prometheus" ] || [ ! -x "$OUT/promtool" ]; then
  echo "build-prometheus: building Prometheus $PROMETHEUS_VERSION (module $PROMETHEUS_MODULE_VERSION)" >&2
  go_build_module "$OUT" github.com/prometheus/prometheus "$PROMETHEUS_MODULE_VERSION" \
    "$TAGS" "-X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
fi
echo "$OUT"
