# shellcheck shell=bash
# Debian's cloud kernel (it has IPVS; this machine's own kernel does not), unpacked from its
# package without installing it and cached by version under $SVCPLANE_CACHE/ipvs-vm/<version>.

# kernel_fetch: sets KV (the version) and K (the unpacked package: $K/boot/vmlinuz-$KV,
# $K/lib/modules/$KV), downloading it the first time.
kernel_fetch() {
  local pkg cache
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { echo "kernel: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; return 1; }
  KV=${pkg#linux-image-}
  cache=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}/ipvs-vm/$KV
  if [ ! -f "$cache/ok" ]; then
    rm -rf "$cache"; mkdir -p "$cache"
    (cd "$cache" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb k && depmod -b k "$KV" && rm -f ./*.deb) \
      || { echo "kernel: cannot fetch $pkg" >&2; return 1; }
    touch "$cache/ok"
  fi
  # shellcheck disable=SC2034 # for the caller
  K=$cache/k
}

# kernel_module_files DIR MODULE...: the .ko files (dependencies first) these modules need.
kernel_module_files() {
  local k=$1 m; shift
  for m in "$@"; do
    modprobe -d "$k" -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done
}
