#!/usr/bin/env bash
# Builds svcplane's container image offline: the release binary on a root filesystem unpacked
# from Debian packages (hack/lib/debroot.sh), built by buildah from hack/image/Containerfile, and
# written as an OCI archive tagged svcplane:<version> (the crate version unless --tag says).
#
# usage: hack/image.sh [--binary FILE] [--tag TAG] [--out FILE] [--context DIR]
#   --binary   an already built svcplane (default: cargo build --release)
#   --tag      image tag (default: the workspace version, e.g. 0.1.0)
#   --out      archive path (default: target/images/svcplane-<tag>.tar)
#   --context  only prepare the build context in DIR (for another builder) and stop
# Prints the archive's path on stdout; sizes on stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=hack/lib/debroot.sh
. "$ROOT/hack/lib/debroot.sh"
# shellcheck source=hack/lib/oci.sh
. "$ROOT/hack/lib/oci.sh"
LOG_TAG=image
# shellcheck source=hack/lib/proc.sh
. "$ROOT/hack/lib/proc.sh"

BIN='' TAG='' OUT='' CONTEXT=''
while [ $# -gt 0 ]; do
  case $1 in
    --binary) BIN=${2:?}; shift 2 ;;
    --tag) TAG=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --context) CONTEXT=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
VERSION=$(awk -F'"' '/^\[workspace.package\]/ {w=1} w && $1 ~ /^version *= */ {print $2; exit}' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || { log "no workspace version in Cargo.toml"; exit 1; }
TAG=${TAG:-$VERSION}
OUT=${OUT:-$ROOT/target/images/svcplane-$TAG.tar}
# What kubelet asks for when a manifest says `image: svcplane:<tag>`.
NAME=docker.io/library/svcplane:$TAG

if [ -z "$BIN" ]; then
  (cd "$ROOT" && cargo build --release --locked -p svcplane >&2)
  BIN=$ROOT/target/release/svcplane
fi
[ -x "$BIN" ] || { log "$BIN is not an executable"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
CTX=${CONTEXT:-$WORK/context}
mkdir -p "$CTX"
# libgcc-s1 and libc6 for svcplane itself: it programs nf_tables and IPVS over netlink, so the
# image carries no nft, ipvsadm or iptables.
mapfile -t packages < <(deb_closure libgcc-s1)
debroot_unpack "$CTX/rootfs" "${packages[@]}"
debroot_users "$CTX/rootfs"
strip -o "$CTX/svcplane" "$BIN"
cp "$ROOT/hack/image/Containerfile" "$CTX/Containerfile"
if [ -n "$CONTEXT" ]; then
  log "build context in $CTX (Containerfile included)"
  exit 0
fi

oci_build "$CTX" "$CTX/Containerfile" "$NAME" "$OUT" --build-arg "VERSION=$TAG"
unpacked=$(du -sb --apparent-size "$CTX/rootfs" "$CTX/svcplane" | awk '{s += $1} END {printf "%.1f", s / 1048576}')
log "$NAME -> $OUT ($(oci_size_mib "$OUT") MiB archive, $unpacked MiB unpacked)"
echo "$OUT"
