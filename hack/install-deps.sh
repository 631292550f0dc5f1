#!/usr/bin/env bash
# Installs every system package svcplane's build, tests and local control plane use. Idempotent:
# does nothing (and needs no network) when everything is already there.
set -euo pipefail
PACKAGES=(
  etcd-server etcd-client          # the control plane's etcd, and etcdctl for tests
  protobuf-compiler libprotobuf-dev # etcd-client's build script compiles etcd's protos
  curl openssl ca-certificates      # readiness polls, the local PKI
  iproute2 procps                   # ip, pgrep/pkill in scripts
  nftables                          # nft: the tests' oracle for the tables svcplane writes
  busybox-static                    # httpd backends in the dataplane tests; the IPVS VM's userland
  qemu-system-x86 ipvsadm kmod cpio # the IPVS VM (hack/ipvs-vm.sh); ipvsadm only to inspect
  socat                             # carries the apiserver into a test's node namespace (unix socket)
  buildah                           # builds images from Containerfiles, offline (hack/image.sh)
  debootstrap e2fsprogs             # the real node's root filesystem and disk (hack/cluster/node-image.sh)
  openssh-client                    # commands on the real node
  gcc libc6-dev                     # the node's static pause binary
  shellcheck                        # lint gate for hack/
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Toolchains come with the machine; say clearly when one is absent rather than fail later.
command -v go >/dev/null || { echo "install-deps: Go is required to build kube-apiserver (go.dev/doc/install)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install-deps: Rust (cargo) is required (rustup.rs)" >&2; exit 1; }
