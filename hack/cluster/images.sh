#!/usr/bin/env bash
# Builds the test node's own images, offline, and caches them under
# $SVCPLANE_CACHE/images/<inputs hash>/ (a second run with the same inputs only prints the path):
#   pause.tar       svcplane.local/pause:1        the Pod sandbox (pause/pause.c, static)
#   coredns.tar     svcplane.local/coredns:1      CoreDNS $COREDNS_VERSION from its Go module
#   http.tar        svcplane.local/http:1         busybox httpd backend + curl client (Debian)
#   prometheus.tar  svcplane.local/prometheus:1   Prometheus $PROMETHEUS_VERSION (hack/build-prometheus.sh)
# These stand in for what a cluster pulls from registries; svcplane's own image is hack/image.sh.
#
# usage: hack/cluster/images.sh     -> prints the directory holding the archives
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=hack/versions.env
. "$ROOT/hack/versions.env"
# shellcheck source=hack/lib/debroot.sh
. "$ROOT/hack/lib/debroot.sh"
# shellcheck source=hack/lib/oci.sh
. "$ROOT/hack/lib/oci.sh"
# shellcheck source=hack/lib/gobuild.sh
. "$ROOT/hack/lib/gobuild.sh"
CACHE=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}
IMAGES=(pause coredns http prometheus)

# Everything the images are made of: this script, the image directories, the CoreDNS and
# Prometheus versions and the Debian package versions apt would pick.
HTTP_PKGS=(busybox-static curl)
mapfile -t HTTP_CLOSURE < <(deb_closure "${HTTP_PKGS[@]}")
[ ${#HTTP_CLOSURE[@]} -gt 0 ] || { echo "images: cannot resolve ${HTTP_PKGS[*]} (apt-get update?)" >&2; exit 1; }
key=$( {
  cat "$0" "$ROOT/hack/lib/debroot.sh" "$ROOT/hack/lib/oci.sh" "$ROOT/hack/lib/gobuild.sh" \
    "$ROOT/hack/build-prometheus.sh" "$ROOT/hack/versions.env"
  find "$HERE/images" -type f | sort | xargs cat
  apt-cache policy "${HTTP_CLOSURE[@]}" | grep -E '^[a-z]|Candidate'
} | sha256sum | cut -c1-16)
OUT=$CACHE/images/$key
have_all() { for i in "${IMAGES[@]}"; do [ -f "$OUT/$i.tar" ] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

log() { echo "images: $*" >&2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

build_pause() {
  local c=$WORK/pause
  mkdir -p "$c"
  gcc -Os -static -Wall -Werror -o "$c/pause" "$HERE/images/pause/pause.c"
  strip "$c/pause"
  oci_build "$c" "$HERE/images/pause/Containerfile" svcplane.local/pause:1 "$OUT/pause.tar"
}

# CoreDNS through the Go module proxy, cached by version.
coredns_binary() {
  local dir=$CACHE/coredns-$COREDNS_VERSION
  if [ ! -x "$dir/coredns" ]; then
    log "building CoreDNS $COREDNS_VERSION"
    go_build_module "$dir" github.com/coredns/coredns "$COREDNS_VERSION" "" "" github.com/coredns/coredns
  fi
  echo "$dir/coredns"
}

build_coredns() {
  local c=$WORK/coredns bin
  bin=$(coredns_binary)
  mkdir -p "$c/rootfs/etc"
  cp "$bin" "$c/coredns"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$c/rootfs/etc/passwd"
  oci_build "$c" "$HERE/images/coredns/Containerfile" svcplane.local/coredns:1 "$OUT/coredns.tar"
}

build_http() {
  local c=$WORK/http a
  debroot_unpack "$c/rootfs" "${HTTP_CLOSURE[@]}"
  debroot_users "$c/rootfs"
  for a in $("$c/rootfs/bin/busybox" --list); do
    [ -e "$c/rootfs/usr/bin/$a" ] || [ -e "$c/rootfs/usr/sbin/$a" ] || ln -s busybox "$c/rootfs/usr/bin/$a"
  done
  mkdir -p "$c/rootfs/www/cgi-bin"
  # The CGI answer is the Pod's name (its hostname).
  cat > "$c/rootfs/www/cgi-bin/index.cgi" <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$(hostname)"
CGI
  chmod 755 "$c/rootfs/www/cgi-bin/index.cgi"
  echo ready > "$c/rootfs/www/ready"
  oci_build "$c" "$HERE/images/http/Containerfile" svcplane.local/http:1 "$OUT/http.tar"
}

build_prometheus() {
  local c=$WORK/prometheus dir
  dir=$("$ROOT/hack/build-prometheus.sh")
  mkdir -p "$c/rootfs/etc" "$c/rootfs/prometheus"
  cp "$dir/prometheus" "$c/prometheus"
  printf 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' > "$c/rootfs/etc/passwd"
  chown 65534:65534 "$c/rootfs/prometheus"
  oci_build "$c" "$HERE/images/prometheus/Containerfile" svcplane.local/prometheus:1 "$OUT/prometheus.tar"
}

for i in "${IMAGES[@]}"; do
  [ -f "$OUT/$i.tar" ] && continue
  "build_$i"
  log "svcplane.local/$i:1 -> $OUT/$i.tar ($(oci_size_mib "$OUT/$i.tar") MiB)"
done
echo "$OUT"
