#!/usr/bin/env bash
# Builds the test node's boot files and disk, cached under $SVCPLANE_CACHE/node/<inputs hash>/
# (a second run with the same inputs only prints the path):
#   vmlinuz      Debian's cloud kernel (IPVS, cgroup v2), hack/lib/kernel.sh
#   initrd.gz    busybox + virtio drivers: mounts the disk and starts systemd
#   disk.img     ext4 root filesystem: Debian 12 (debootstrap) with systemd, containerd, runc, CNI
#                plugins, nftables, ipvsadm, sshd; the kubelet of $KUBE_VERSION; the node's
#                configuration (hack/cluster/node/rootfs) and preloaded images (images.sh)
# Booted by hack/cluster-up.sh with the disk as a throwaway snapshot, so every boot is fresh.
#
# usage: hack/cluster/node-image.sh     -> prints the directory
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=hack/versions.env
. "$ROOT/hack/versions.env"
# shellcheck source=hack/lib/kernel.sh
. "$ROOT/hack/lib/kernel.sh"
CACHE=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}
log() { echo "node-image: $*" >&2; }

PACKAGES=(systemd-sysv kmod iproute2 iptables nftables ipvsadm conntrack util-linux procps
  ca-certificates curl openssh-server containerd runc containernetworking-plugins)
DISK_SIZE=8G

for c in debootstrap mke2fs cpio depmod; do
  command -v "$c" >/dev/null || { log "$c missing (hack/install-deps.sh)"; exit 1; }
done
kernel_fetch
KUBE_BIN=$("$ROOT/hack/build-kube.sh")
IMAGES=$("$HERE/images.sh")

# 1. The Debian base, cached by its package list and the versions apt picks for it.
SUITE=bookworm VARIANT=minbase MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base_key=$( {
  echo "$SUITE $VARIANT $MIRROR"
  printf '%s\n' "${PACKAGES[@]}"
  apt-cache policy "${PACKAGES[@]}" | grep -E '^[a-z]|Candidate'
} | sha256sum | cut -c1-16)
BASE=$CACHE/node/base-$base_key
if [ ! -f "$BASE/ok" ]; then
  log "debootstrap Debian 12 with ${PACKAGES[*]} (once per package set)"
  rm -rf "$BASE"; mkdir -p "$BASE"
  debootstrap --variant="$VARIANT" --include="$(IFS=,; echo "${PACKAGES[*]}")" "$SUITE" "$BASE/root" \
    "$MIRROR" > "$BASE/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $BASE/debootstrap.log"; exit 1; }
  rm -rf "$BASE/root/var/cache/apt/archives"/*.deb "$BASE/root/var/lib/apt/lists"/*
  touch "$BASE/ok"
fi

# 2. The node, cached by everything it is made of.
key=$( {
  echo "$base_key $KV $KUBE_VERSION $DISK_SIZE"
  sha256sum "$KUBE_BIN/kubelet" "$IMAGES"/*.tar
  cat "$0" "$HERE/node/initramfs-init"
  (cd "$HERE/node/rootfs" && find . -type f | sort | xargs sha256sum)
} | sha256sum | cut -c1-16)
OUT=$CACHE/node/$key
if [ -f "$OUT/ok" ]; then echo "$OUT"; exit 0; fi
rm -rf "$OUT"; mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-node.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "assembling the node's root filesystem"
R=$WORK/root
cp -a "$BASE/root" "$R"
mkdir -p "$R/lib/modules"
cp -a "$K/lib/modules/$KV" "$R/lib/modules/"
depmod -b "$R" "$KV"
install -m 0755 "$KUBE_BIN/kubelet" "$R/usr/local/bin/kubelet"
cp -a "$HERE/node/rootfs/." "$R/"
mkdir -p "$R/var/lib/svcplane-node/images"
cp "$IMAGES"/*.tar "$R/var/lib/svcplane-node/images/"
# No udev here (devices come from devtmpfs): units that wait for device events, and periodic
# housekeeping a throwaway node never needs, are masked. Debian's ipvsadm service would load
# and save rules of its own.
for u in serial-getty@ttyS0.service getty@tty1.service getty-static.service \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer ipvsadm.service systemd-udevd.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
for u in node-setup.service node-images.service kubelet.service; do
  ln -sf "/etc/systemd/system/$u" "$R/etc/systemd/system/multi-user.target.wants/$u"
done

log "writing the disk image ($DISK_SIZE, sparse)"
mke2fs -q -t ext4 -L svcplane-node -d "$R" "$WORK/disk.img" "$DISK_SIZE"

log "writing the initramfs"
I=$WORK/initramfs
mkdir -p "$I"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$I/bin/"
for a in sh mount umount insmod sleep cat switch_root; do ln -s busybox "$I/bin/$a"; done
: > "$I/modules"
for f in $(kernel_module_files "$K" virtio_pci virtio_blk); do
  b=$(basename "$f")
  [ -f "$I/lib/modules/$b" ] && continue
  cp "$f" "$I/lib/modules/$b"
  echo "$b" >> "$I/modules"
done
install -m 0755 "$HERE/node/initramfs-init" "$I/init"
(cd "$I" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

cp "$K/boot/vmlinuz-$KV" "$OUT/vmlinuz"
mv "$WORK/initrd.gz" "$WORK/disk.img" "$OUT/"
touch "$OUT/ok"
log "node image $OUT ($(du -sh --apparent-size "$OUT/disk.img" | cut -f1) disk, $(du -sh "$OUT/disk.img" | cut -f1) used)"
echo "$OUT"
