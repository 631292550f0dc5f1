#!/usr/bin/env bash
# A real one-node Kubernetes cluster for svcplane: the control plane (etcd, kube-apiserver,
# kube-controller-manager without its endpoint controllers, kube-scheduler, all of $KUBE_VERSION)
# runs natively in a network namespace of its own; the node is a qemu VM booting Debian's cloud
# kernel (IPVS, cgroup v2) with systemd, containerd, runc, Debian's CNI plugins and the kubelet,
# joined over a tap link. There is no kube-proxy: svcplane's dataplane is the node's Service
# proxy once applied, and the apiserver reaches Services (svcplane's webhook among them) by
# routing the Service range to the node, as a control-plane host does through its own proxy.
#
#   control-plane netns ── tap 10.210.0.1/24 ── node VM eth0 10.210.0.2 (Pods 10.244.0.0/24)
#        └ veth 10.211.<index>.2/30 ── this host 10.211.<index>.1 (kubectl, tests)
#
# The cluster is what kubeadm would give: CoreDNS (kube-dns 10.96.0.10), Service range
# 10.96.0.0/12, NodePorts 30000-32767, and the two things a cluster without kube-proxy provides
# for svcplane (README, "Running in a cluster"): the Secret kube-system/svcplane-etcd-client and
# the ConfigMap kube-system/svcplane-apiserver-endpoint.
#
# usage:
#   hack/cluster-up.sh up   [DIR]           start, wait until the node is Ready, print DIR/env
#   hack/cluster-up.sh run  DIR             start, print READY, supervise: everything is torn down
#                                           when WATCH_PID exits, when a component dies, or on TERM
#   hack/cluster-up.sh load ARCHIVE...      import OCI archives into the node's containerd
#   hack/cluster-up.sh ssh  CMD...          run a command on the node (as root)
#   hack/cluster-up.sh status [DIR] | down [DIR]
# DIR defaults to $SVCPLANE_CLUSTER_DIR or /tmp/svcplane-cluster (load and ssh use that too); `up`
# and `run` want it absent or empty. environment: CLUSTER_INDEX (0-63) picks the host link's
# subnet (default: the first one no interface uses, so clusters can run side by side);
# NODE_MEMORY (MiB, default 6144), NODE_CPUS (default 2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
. "$HERE/versions.env"
# shellcheck source=hack/lib/kubeconfig.sh
. "$HERE/lib/kubeconfig.sh"
# shellcheck source=hack/lib/pki.sh
. "$HERE/lib/pki.sh"
LOG_TAG=cluster LOG_TIMESTAMPS=1
# shellcheck source=hack/lib/proc.sh
. "$HERE/lib/proc.sh"

cmd=${1:-}; [ -n "$cmd" ] || usage; shift
DIR=${SVCPLANE_CLUSTER_DIR:-/tmp/svcplane-cluster}
case $cmd in up|run|status|down) [ $# -gt 0 ] && { DIR=$1; shift; } ;; esac
mkdir -p "$(dirname "$DIR")"
DIR=$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")
# Keys of the cluster (its CA, an admin certificate) live in DIR: readable by root only.
umask 077
ID=$(printf '%s' "$DIR" | sha256sum | cut -c1-6)
# The e2e suite's clusters are named for it, so that its leftover check can tell them apart.
case $(basename "$DIR") in svcplane-e2e-*) NS=svcplane-e2e-cluster-$ID ;; *) NS=svcplane-cluster-$ID ;; esac
VETH=spc-$ID
TAP=sptap0
CP_IP=10.210.0.1 NODE_IP=10.210.0.2
# The host link's subnet: CLUSTER_INDEX, or the one a running cluster in DIR chose, or the first
# free one.
if [ -f "$DIR/index" ]; then
  INDEX=$(cat "$DIR/index")
elif [ -n "${CLUSTER_INDEX:-}" ]; then
  INDEX=$CLUSTER_INDEX
else
  INDEX=0
  while [ "$INDEX" -lt 63 ] && ip -4 addr show | grep -q "inet 10\.211\.$((INDEX * 4))\.1/"; do INDEX=$((INDEX + 1)); done
fi
if ! [[ $INDEX =~ ^[0-9]+$ ]] || [ "$INDEX" -gt 63 ]; then echo "cluster: CLUSTER_INDEX must be 0-63" >&2; exit 2; fi
HOST_IP=10.211.$((INDEX * 4)).1 HOST_NS_IP=10.211.$((INDEX * 4)).2
SERVICE_RANGE=10.96.0.0/12 POD_RANGE=10.244.0.0/24 NODEPORT_RANGE=30000-32767
NODE_NAME=svcplane-node

in_ns() { ip netns exec "$NS" "$@"; }
ssh_opts() {
  printf '%s\n' -i "$DIR/ssh/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o ConnectTimeout=5 -o ServerAliveInterval=5 -o BatchMode=yes
}
node_ssh() {
  local opts; mapfile -t opts < <(ssh_opts)
  in_ns ssh "${opts[@]}" "root@$NODE_IP" "$@"
}

gen_pki() {
  PKI_DIR=$DIR/pki
  pki_ca ca svcplane-cluster-ca
  pki_ca etcd-ca svcplane-etcd-ca
  pki_cert apiserver /CN=kube-apiserver serverAuth \
    "IP:$CP_IP,IP:$HOST_NS_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  pki_cert admin "/O=system:masters/CN=svcplane-cluster-admin" clientAuth
  pki_cert controller-manager /CN=system:kube-controller-manager clientAuth
  pki_cert scheduler /CN=system:kube-scheduler clientAuth
  pki_cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  pki_cert kubelet /CN="$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  # etcd's gRPC gateway dials etcd itself with the server certificate: it needs clientAuth too.
  pki_cert etcd-server /CN=etcd serverAuth,clientAuth "IP:$CP_IP,IP:$HOST_NS_IP,IP:127.0.0.1,DNS:localhost" etcd-ca
  pki_cert apiserver-etcd-client /CN=kube-apiserver-etcd-client clientAuth "" etcd-ca
  # svcplane's own etcd identity (kubeadm clusters: see README, "Running in a cluster").
  pki_cert svcplane-etcd-client /CN=svcplane clientAuth "" etcd-ca
  pki_sa_keys
}

# kubeconfig FILE SERVER USER CERT: signed by the cluster CA, certificate pki/CERT.{crt,key}
kubeconfig() {
  kubeconfig_write "$1" "$2" "$3" "$DIR/pki/ca.crt" "$DIR/pki/$4.crt" "$DIR/pki/$4.key"
}

# --- processes ----------------------------------------------------------------------------------
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler qemu)
# spawn NAME CMD...: runs CMD in the control plane's namespace, log in DIR/logs/NAME.log. `ip
# netns exec` execs CMD, so the recorded pid is CMD's own (a shell function here would record a
# subshell's, and killing it would leave CMD running).
spawn() {
  local name=$1; shift
  ip netns exec "$NS" "$@" > "$DIR/logs/$name.log" 2>&1 &
  echo $! > "$DIR/$name.pid"
}
alive() { pid_alive "$DIR/$1.pid"; }

start_control_plane() {
  local P=$DIR/pki
  spawn etcd etcd --name node --data-dir "$DIR/etcd" \
    --listen-client-urls "https://0.0.0.0:2379" --advertise-client-urls "https://$CP_IP:2379" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster node=http://127.0.0.1:2380 --initial-cluster-state new \
    --cert-file "$P/etcd-server.crt" --key-file "$P/etcd-server.key" \
    --client-cert-auth --trusted-ca-file "$P/etcd-ca.crt" --logger zap --log-level warn
  spawn kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --advertise-address="$CP_IP" --bind-address=0.0.0.0 --secure-port=6443 \
    --etcd-servers=https://127.0.0.1:2379 --etcd-cafile="$P/etcd-ca.crt" \
    --etcd-certfile="$P/apiserver-etcd-client.crt" --etcd-keyfile="$P/apiserver-etcd-client.key" \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$P/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range="$SERVICE_RANGE" --service-node-port-range="$NODEPORT_RANGE" \
    --allow-privileged=true --profiling=false
  wait_for kube-apiserver 120 curl -sf --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" \
    "https://$HOST_NS_IP:6443/readyz"
  # svcplane replaces these three; everything else kube-controller-manager does stays.
  spawn kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig="$DIR/controller-manager.conf" --authentication-kubeconfig="$DIR/controller-manager.conf" \
    --authorization-kubeconfig="$DIR/controller-manager.conf" \
    --controllers='*,-endpointslice-controller,-endpoints-controller,-endpointslice-mirroring-controller' \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false \
    --bind-address=127.0.0.1 --secure-port=10257
  spawn kube-scheduler "$KUBE_BIN/kube-scheduler" --kubeconfig="$DIR/scheduler.conf" \
    --authentication-kubeconfig="$DIR/scheduler.conf" --authorization-kubeconfig="$DIR/scheduler.conf" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=10259
}

# The node's credentials travel on a small second disk (node-setup reads it at boot).
write_payload() {
  local p=$DIR/payload P=$DIR/pki
  mkdir -p "$p/pki" "$DIR/ssh"
  cp "$P/ca.crt" "$P/kubelet.crt" "$P/kubelet.key" "$p/pki/"
  kubeconfig "$p/kubelet.conf" "https://$CP_IP:6443" "system:node:$NODE_NAME" kubelet-client
  ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/id_ed25519"
  cp "$DIR/ssh/id_ed25519.pub" "$p/authorized_keys"
  mke2fs -q -t ext4 -L payload -d "$p" "$DIR/payload.img" 16M
  rm -rf "$p"
}

boot_node() {
  # qemu keeps the disk's writes in a temporary file next to the cluster's state.
  TMPDIR=$DIR spawn qemu qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
    -smp "${NODE_CPUS:-2}" -m "${NODE_MEMORY:-6144}" -nographic -no-reboot -monitor none \
    -serial "file:$DIR/logs/console.log" \
    -drive "file=$NODE/disk.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$DIR/payload.img,if=virtio,format=raw,readonly=on" \
    -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" -device virtio-net-pci,netdev=n0 \
    -kernel "$NODE/vmlinuz" -initrd "$NODE/initrd.gz" \
    -append "console=ttyS0 root=/dev/vda panic=-1 quiet systemd.show_status=0"
}

node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

apply_addons() {
  local P=$DIR/pki
  kubectl apply -f "$HERE/cluster/addons/" >/dev/null
  # What a cluster without kube-proxy provides for svcplane (README, "Running in a cluster").
  kubectl -n kube-system create secret generic svcplane-etcd-client \
    --from-file=ca.crt="$P/etcd-ca.crt" --from-file=tls.crt="$P/svcplane-etcd-client.crt" \
    --from-file=tls.key="$P/svcplane-etcd-client.key" --from-literal=endpoints="https://$CP_IP:2379" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n kube-system create configmap svcplane-apiserver-endpoint \
    --from-literal=KUBERNETES_SERVICE_HOST="$CP_IP" --from-literal=KUBERNETES_SERVICE_PORT=6443 \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}

kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

up() {
  local t0=$SECONDS
  if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    log "$DIR is not empty (a cluster? hack/cluster-up.sh down $DIR)"; return 1
  fi
  "$HERE/install-deps.sh"
  KUBE_BIN=$("$HERE/build-kube.sh")
  NODE=$("$HERE/cluster/node-image.sh")
  local t_built=$SECONDS
  mkdir -p "$DIR/logs"
  echo "$INDEX" > "$DIR/index"
  gen_pki
  kubeconfig "$DIR/kubeconfig" "https://$HOST_NS_IP:6443" admin admin
  kubeconfig "$DIR/controller-manager.conf" "https://127.0.0.1:6443" system:kube-controller-manager controller-manager
  kubeconfig "$DIR/scheduler.conf" "https://127.0.0.1:6443" system:kube-scheduler scheduler
  write_payload

  ip netns add "$NS"
  echo "$NS" > "$DIR/netns"
  in_ns ip link set lo up
  ip link add "$VETH" type veth peer name host0 netns "$NS"
  ip addr add "$HOST_IP/30" dev "$VETH"; ip link set "$VETH" up
  in_ns ip addr add "$HOST_NS_IP/30" dev host0; in_ns ip link set host0 up
  in_ns ip tuntap add dev "$TAP" mode tap
  in_ns ip addr add "$CP_IP/24" dev "$TAP"; in_ns ip link set "$TAP" up
  # Services and Pods live on the node.
  in_ns ip route add "$SERVICE_RANGE" via "$NODE_IP"
  in_ns ip route add "$POD_RANGE" via "$NODE_IP"

  start_control_plane
  local t_cp=$SECONDS
  boot_node
  local t_boot_start=$SECONDS
  wait_for "node $NODE_NAME registered" 600 kubectl get node "$NODE_NAME"
  local t_registered=$SECONDS
  wait_for "node $NODE_NAME Ready" 300 node_ready
  local t_ready=$SECONDS
  wait_for "ssh to the node" 120 node_ssh true
  apply_addons
  cat > "$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export KUBE_BIN=$KUBE_BIN
export PATH=$KUBE_BIN:\$PATH
export SVCPLANE_CLUSTER_DIR=$DIR
export ETCD_ENDPOINT=https://$HOST_NS_IP:2379
EOF
  log "times: build/cache $((t_built - t0))s, control plane $((t_cp - t_built))s," \
    "node boot to registered $((t_registered - t_boot_start))s, to Ready $((t_ready - t_boot_start))s," \
    "cluster ready $((SECONDS - t0))s in all"
  log "ready: kubectl --kubeconfig $DIR/kubeconfig (source $DIR/env); node $NODE_NAME at $NODE_IP"
}

down() {
  local c pid
  # Only a directory this script made a cluster in (it writes `index` first) is torn down.
  [ -f "$DIR/index" ] || { [ ! -e "$DIR" ] || log "$DIR holds no cluster; left alone"; return 0; }
  for c in qemu kube-scheduler kube-controller-manager kube-apiserver etcd; do pid_stop "$DIR/$c.pid"; done
  # Anything else still running in the namespace (nothing should be) would keep it alive.
  if [ -e "/run/netns/$NS" ]; then
    for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  fi
  # Deleting the namespace removes the tap, the veth pair and the routes with it.
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VETH" 2>/dev/null || true
  rm -rf "$DIR"
}

load() {
  [ -f "$DIR/env" ] || { log "no cluster in $DIR (hack/cluster-up.sh up)"; return 1; }
  local f
  for f in "$@"; do
    [ -f "$f" ] || { log "no such archive: $f"; return 1; }
    log "loading $f into the node's containerd"
    node_ssh ctr -n k8s.io images import - < "$f" >&2
  done
}

up_failed() { [ "$1" -eq 0 ] || log "failed; logs in $DIR/logs (hack/cluster-up.sh down $DIR to clean up)"; }
# For `run`: a failure's logs are printed before everything is removed.
run_exit() {
  local f
  if [ "$1" -ne 0 ] && [ -d "$DIR/logs" ]; then
    for f in "$DIR"/logs/*.log; do
      [ -f "$f" ] || continue
      log "--- last lines of $(basename "$f")"
      tail -n 15 "$f" >&2 || true
    done
  fi
  down
}

case $cmd in
  up)
    trap 'up_failed $?' EXIT
    up
    cat "$DIR/env"
    ;;
  run)
    trap 'run_exit $?' EXIT
    trap 'exit 0' TERM INT
    # If the owner is gone before READY, writing it fails (and the EXIT trap cleans up) instead
    # of SIGPIPE killing this shell before its trap runs.
    trap '' PIPE
    up
    echo READY
    while sleep 0.5; do
      [ -n "${WATCH_PID:-}" ] && ! kill -0 "$WATCH_PID" 2>/dev/null && { log "owner $WATCH_PID exited"; break; }
      for c in "${COMPONENTS[@]}"; do
        alive "$c" || { log "$c exited; its log:"; tail -20 "$DIR/logs/$c.log" >&2; exit 1; }
      done
    done
    ;;
  load) [ $# -gt 0 ] || usage; load "$@" ;;
  ssh) [ -f "$DIR/env" ] || { log "no cluster in $DIR"; exit 1; }; node_ssh "$@" ;;
  status)
    [ -f "$DIR/env" ] || { echo "no cluster in $DIR"; exit 1; }
    for c in "${COMPONENTS[@]}"; do printf '%-24s %s\n' "$c" "$(alive "$c" && echo running || echo stopped)"; done
    # shellcheck disable=SC1091
    . "$DIR/env"; kubectl get nodes -o wide
    ;;
  down) down ;;
  *) usage ;;
esac
