#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl and kube-proxy
# (the dataplane benchmark's yardstick) of one pinned Kubernetes release from the Go module
# k8s.io/kubernetes, through the Go module proxy, and caches them by version under
# $SVCPLANE_CACHE (default $HOME/.cache/svcplane). A second run with the same version only prints the path.
#
# k8s.io/kubernetes points its staging modules (k8s.io/api, k8s.io/client-go, ...) at ./staging
# directories that a module download does not carry, so a throwaway module requires the release
# and replaces every staging module with its published v0.<minor>.<patch> twin.
#
# usage: hack/build-kube.sh            -> prints the directory holding the binaries
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
. "$HERE/versions.env"
CACHE=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}
OUT="$CACHE/kubernetes-$KUBE_VERSION/bin"
BINARIES=(kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy)

have_all() { for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

command -v go >/dev/null || { echo "build-kube: go is not installed" >&2; exit 1; }
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-kube-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-local}

missing=(); for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || missing+=("$b"); done
echo "build-kube: building ${missing[*]} $KUBE_VERSION (staging $STAGING_VERSION) in $WORK" >&2
go mod init svcplane.local/kubebuild >/dev/null 2>&1
go mod edit -require="k8s.io/kubernetes@$KUBE_VERSION"
MODFILE=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$MODFILE" ] || { echo "build-kube: could not download k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
# Same go directive as kubernetes itself, so the build uses its language version.
go mod edit -go="$(awk '$1=="go"{print $2; exit}' "$MODFILE")"
staging=$(awk '$2=="=>" && $3 ~ /^\.\/staging\// {print $1}' "$MODFILE")
[ -n "$staging" ] || { echo "build-kube: found no staging replaces in $MODFILE" >&2; exit 1; }
for m in $staging; do go mod edit -replace="$m=$m@$STAGING_VERSION"; done
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
go mod tidy >&2
mkdir -p "$OUT"
for b in "${missing[@]}"; do
  echo "build-kube: go build $b" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
    -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION" \
    -o "$WORK/$b" "k8s.io/kubernetes/cmd/$b" >&2
  # Publish atomically: a half-finished build never looks cached.
  cp "$WORK/$b" "$OUT/.$b.partial" && mv "$OUT/.$b.partial" "$OUT/$b"
done
echo "$OUT"
