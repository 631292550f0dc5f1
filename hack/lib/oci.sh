# shellcheck shell=bash
# Builds an image from a Containerfile and build context with buildah, offline (FROM scratch; no
# registry is contacted), and writes it as an OCI archive that `ctr images import` and other
# runtimes load. Storage is a throwaway directory, so nothing accumulates between builds.

# oci_build CONTEXT CONTAINERFILE NAME OUT [--build-arg K=V ...]
#   NAME is the full reference the archive carries (e.g. docker.io/library/svcplane:0.1.0).
oci_build() {
  local ctx=$1 file=$2 name=$3 out=$4; shift 4
  command -v buildah >/dev/null || { echo "oci: buildah missing (hack/install-deps.sh)" >&2; return 1; }
  local store
  store=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-buildah.XXXXXX")
  # Layers are written with timestamp 0 so that the same inputs give the same archive.
  if buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs build --quiet \
      --isolation chroot --timestamp 0 "$@" -f "$file" -t "$name" "$ctx" >/dev/null &&
    mkdir -p "$(dirname "$out")" && rm -f "$out.partial" &&
    buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs push --quiet \
      "$name" "oci-archive:$out.partial:$name" >&2; then
    mv "$out.partial" "$out"
    rm -rf "$store"
  else
    echo "oci: building $name from $file failed" >&2
    rm -rf "$store" "$out.partial"
    return 1
  fi
}

# Size of an archive in MiB, one decimal.
oci_size_mib() { du -b "$1" | awk '{printf "%.1f", $1 / 1048576}'; }
