#!/usr/bin/env bash
# A local Kubernetes control plane for svcplane: one etcd and one kube-apiserver on loopback,
# with generated certificates, service-account keys and an admin kubeconfig. No kubelet, no
# kube-controller-manager: svcplane's controllers are the ones under test.
#
# usage:
#   hack/control-plane.sh up   DIR   start in the background, wait until ready, print DIR/env
#   hack/control-plane.sh run  DIR   start in the foreground and supervise; stops everything and
#                                    removes DIR when WATCH_PID (if set) exits, when etcd or the
#                                    apiserver dies, or on SIGTERM/SIGINT
#   hack/control-plane.sh down DIR   stop what `up` started and remove DIR
#
# environment (all optional):
#   ETCD_PORT ETCD_PEER_PORT APISERVER_PORT   loopback ports (defaults 2379, 2380, 6443)
#   SERVICE_CLUSTER_IP_RANGE                  default 10.96.0.0/16,fd00:10:96::/112 (dual-stack)
#   SERVICE_NODE_PORT_RANGE                   default 30000-32767
#   WATCH_PID                                 with `run`: tear down when this process exits
#   KUBE_BIN                                  directory with kube-apiserver (default: hack/build-kube.sh)
#
# DIR/env afterwards holds KUBECONFIG, APISERVER_URL, ETCD_ENDPOINT, KUBE_BIN for `source`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/lib/kubeconfig.sh
. "$HERE/lib/kubeconfig.sh"
# shellcheck source=hack/lib/pki.sh
. "$HERE/lib/pki.sh"
LOG_TAG=control-plane
# shellcheck source=hack/lib/proc.sh
. "$HERE/lib/proc.sh"
cmd=${1:-}; DIR=${2:-}
if [ -z "$cmd" ] || [ -z "$DIR" ]; then usage; fi

ETCD_PORT=${ETCD_PORT:-2379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-2380}
APISERVER_PORT=${APISERVER_PORT:-6443}
SERVICE_CLUSTER_IP_RANGE=${SERVICE_CLUSTER_IP_RANGE:-10.96.0.0/16,fd00:10:96::/112}
SERVICE_NODE_PORT_RANGE=${SERVICE_NODE_PORT_RANGE:-30000-32767}
# The apiserver's own `kubernetes` Service takes the first address of the first range.
FIRST_SERVICE_IP=${FIRST_SERVICE_IP:-10.96.0.1}

gen_certs() {
  PKI_DIR=$DIR/pki
  [ -f "$PKI_DIR/admin.crt" ] && return 0
  pki_ca ca svcplane-local-ca
  pki_cert apiserver /CN=kube-apiserver serverAuth \
    "IP:127.0.0.1,IP:$FIRST_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  pki_cert admin /O=system:masters/CN=svcplane-admin clientAuth
  # What the apiserver presents to admission webhooks (AdmissionConfiguration below), from a CA
  # of its own: a webhook verifying client certificates trusts that CA and nothing else.
  pki_ca webhook-client-ca svcplane-webhook-client-ca
  pki_cert webhook-client /CN=kube-apiserver-webhook-client clientAuth "" webhook-client-ca
  pki_sa_keys
}

# The apiserver authenticates to every webhook with the webhook-client certificate (user `*` of
# the webhooks' kubeconfig); webhooks that do not ask for one never see it.
write_admission_config() {
  cat > "$DIR/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: '*'
  user:
    client-certificate: $DIR/pki/webhook-client.crt
    client-key: $DIR/pki/webhook-client.key
EOF
  cat > "$DIR/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $DIR/webhook-client.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $DIR/webhook-client.kubeconfig
EOF
}

write_kubeconfig() {
  kubeconfig_write "$DIR/kubeconfig" "https://127.0.0.1:$APISERVER_PORT" admin \
    "$DIR/pki/ca.crt" "$DIR/pki/admin.crt" "$DIR/pki/admin.key"
}

start_etcd() {
  mkdir -p "$DIR/etcd"
  etcd --name svcplane --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "svcplane=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
    --heartbeat-interval 50 --election-timeout 500 --logger zap --log-level warn \
    > "$DIR/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    pid_alive "$DIR/etcd.pid" || break
    sleep 0.05
  done
  log "etcd did not become healthy; its log:"; tail -20 "$DIR/etcd.log" >&2; return 1
}

start_apiserver() {
  local d=$DIR/pki
  "$KUBE_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$d/apiserver.crt" --tls-private-key-file="$d/apiserver.key" \
    --client-ca-file="$d/ca.crt" \
    --service-account-key-file="$d/sa.pub" --service-account-signing-key-file="$d/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=RBAC \
    --service-cluster-ip-range="$SERVICE_CLUSTER_IP_RANGE" \
    --service-node-port-range="$SERVICE_NODE_PORT_RANGE" \
    --endpoint-reconciler-type=none \
    --allow-privileged=true --profiling=false --enable-priority-and-fairness=false \
    --admission-control-config-file="$DIR/admission.yaml" \
    --cert-dir="$DIR/apiserver-certs" \
    > "$DIR/apiserver.log" 2>&1 &
  echo $! > "$DIR/apiserver.pid"
  for _ in $(seq 1200); do
    curl -sf --cacert "$d/ca.crt" "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1 && return 0
    pid_alive "$DIR/apiserver.pid" || break
    sleep 0.1
  done
  log "kube-apiserver did not become ready; its log:"; tail -30 "$DIR/apiserver.log" >&2; return 1
}

stop_all() {
  # The apiserver drains for a while on SIGTERM; nothing here needs a graceful drain, so it gets
  # two seconds before SIGKILL. etcd stops at once.
  for p in apiserver etcd; do pid_stop "$DIR/$p.pid"; done
}

start() {
  KUBE_BIN=${KUBE_BIN:-$("$HERE/build-kube.sh")}
  command -v etcd >/dev/null || { log "etcd is not installed (hack/install-deps.sh)"; return 1; }
  mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
  gen_certs; write_kubeconfig; write_admission_config
  start_etcd
  start_apiserver
  cat > "$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
export ETCD_ENDPOINT=http://127.0.0.1:$ETCD_PORT
export KUBE_BIN=$KUBE_BIN
export PATH=$KUBE_BIN:\$PATH
EOF
  log "ready: apiserver https://127.0.0.1:$APISERVER_PORT, etcd http://127.0.0.1:$ETCD_PORT ($DIR)"
}

case $cmd in
  up)
    start
    cat "$DIR/env"
    ;;
  run)
    # Supervisor for tests: whatever happens to the process that asked for this control plane,
    # nothing it started outlives it.
    trap 'stop_all; rm -rf "$DIR"' EXIT
    trap 'exit 0' TERM INT
    start
    echo READY
    while sleep 0.2; do
      [ -n "${WATCH_PID:-}" ] && ! kill -0 "$WATCH_PID" 2>/dev/null && { log "owner $WATCH_PID exited"; break; }
      pid_alive "$DIR/etcd.pid" || { log "etcd exited"; tail -20 "$DIR/etcd.log" >&2; break; }
      pid_alive "$DIR/apiserver.pid" || { log "kube-apiserver exited"; tail -20 "$DIR/apiserver.log" >&2; break; }
    done
    ;;
  down)
    [ -d "$DIR" ] || exit 0
    DIR=$(cd "$DIR" && pwd)
    stop_all
    rm -rf "$DIR"
    ;;
  *) usage ;;
esac
