#!/usr/bin/env bash
# Runs a scenario inside a qemu VM booting Debian's cloud kernel (which has IPVS; this machine's
# kernel does not), with svcplane, iproute2, ipvsadm and busybox in an initramfs. TCG only: the
# machine's /dev/kvm cannot run a guest.
#
# usage: hack/ipvs-vm.sh DIR
#   DIR/scenario.sh runs as PID 1's payload inside the VM (files in DIR are copied to /scenario);
#   whatever it writes to /dev/ttyS1 ends up in DIR/results.txt; the console log in DIR/console.log.
# The kernel package is downloaded once and cached under $HOME/.cache/svcplane/ipvs-vm.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(cd "${1:?usage: hack/ipvs-vm.sh DIR}" && pwd)
BIN=${SVCPLANE_BIN:-$ROOT/target/debug/svcplane}
[ -x "$BIN" ] || { echo "ipvs-vm: $BIN missing (cargo build)" >&2; exit 1; }
for c in qemu-system-x86_64 ipvsadm cpio depmod; do
  command -v "$c" >/dev/null || { echo "ipvs-vm: $c missing (hack/install-deps.sh)" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "ipvs-vm: busybox missing" >&2; exit 1; }

# 1. The kernel: the ABI package behind linux-image-cloud-amd64, unpacked (no dpkg -i), cached.
# shellcheck source=hack/lib/kernel.sh
. "$ROOT/hack/lib/kernel.sh"
kernel_fetch

# 2. The root filesystem, fresh each run (it carries the svcplane under test).
W=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-ipvsvm.XXXXXX")
trap 'rm -rf "$W"' EXIT
R=$W/root
mkdir -p "$R"/{bin,sbin,usr/sbin,usr/bin,etc,proc,sys,dev,tmp,run,var/run/netns,lib/modules/"$KV",scenario}
cp /bin/busybox "$R/bin/"
for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
strip -o "$R/usr/bin/svcplane" "$BIN"
# ipvsadm and nft only let the scenario show what svcplane wrote.
for b in /usr/sbin/ipvsadm /usr/sbin/ip /usr/sbin/nft "$R/usr/bin/svcplane"; do
  [ "$b" = "$R/usr/bin/svcplane" ] || cp "$b" "$R/usr/sbin/"
  for l in $(ldd "$b" | grep -o '/[^ ]*'); do mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; done
done
# IPVS, links, and the nftables pieces IPVS mode's masquerade and reject rules use.
MODS="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh veth dummy nfnetlink nf_tables nft_chain_nat nft_nat
  nft_masq nft_fib_ipv4 nft_fib_ipv6 nft_reject_ipv4 nft_reject_ipv6 nft_ct nft_numgen"
for m in $MODS; do
  for f in $(kernel_module_files "$K" "$m"); do
    rel=${f#"$K"}; mkdir -p "$R$(dirname "$rel")"; cp "$f" "$R$rel"
  done
done
cp "$K/lib/modules/$KV"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KV/"
depmod -b "$R" "$KV"
ln -sf ../bin/busybox "$R/sbin/modprobe"   # where the kernel's request_module() looks
cp -r "$DIR"/. "$R/scenario/"
cat > "$R/init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /var/run/netns
/usr/sbin/ip link set lo up
sh /scenario/scenario.sh > /dev/ttyS1 2>&1
echo SCENARIO-DONE > /dev/ttyS1
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$W/initrd.gz"

# 3. Boot.
rm -f "$DIR/results.txt"
timeout "${IPVS_VM_TIMEOUT:-300}" qemu-system-x86_64 -accel tcg -m 1024 -nographic -nic none -no-reboot \
  -serial mon:stdio -serial "file:$DIR/results.txt" \
  -kernel "$K/boot/vmlinuz-$KV" -initrd "$W/initrd.gz" -append 'console=ttyS0 panic=-1 quiet' \
  > "$DIR/console.log" 2>&1 || true
grep -q SCENARIO-DONE "$DIR/results.txt" 2>/dev/null || { echo "ipvs-vm: the scenario did not finish; see $DIR/console.log" >&2; exit 1; }
