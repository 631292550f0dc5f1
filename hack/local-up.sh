#!/usr/bin/env bash
# The main job: a local control plane (etcd + kube-apiserver v1.37) with svcplane on it.
# Installs and builds whatever is missing, starts the control plane, applies svcplane's
# ServiceAccount, RBAC and CRDs, runs two controller-manager replicas as local processes
# authenticated as that ServiceAccount (allocating ClusterIPs and NodePorts from bitmaps in etcd
# through their admission webhook, registered for namespace 'demo'), creates a demo Service with
# three Pods (there is no kubelet: the script writes the Pods' status itself), shows the ClusterIP
# svcplane allocated, the ServicePools, the EndpointSlices and Endpoints svcplane writes, and who
# holds the leader Lease; then runs the dataplane agent in a node network namespace and curls the
# demo Service's ClusterIP from a client namespace (the Pods are httpd processes in namespaces).
#
# usage: hack/local-up.sh [up|down|status]     (state in $SVCPLANE_LOCAL_DIR, default /tmp/svcplane-local)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SVCPLANE_LOCAL_DIR:-/tmp/svcplane-local}
CP=$STATE/control-plane
export APISERVER_PORT=${APISERVER_PORT:-16443} ETCD_PORT=${ETCD_PORT:-12379} ETCD_PEER_PORT=${ETCD_PEER_PORT:-12380}
REPLICAS=(svcplane-controller-manager-0 svcplane-controller-manager-1)
HTTP_PORTS=(10267 10268)
WEBHOOK_PORTS=(19443 19444)
LEASE_NS=kube-system LEASE=svcplane-controller-manager
LOG_TAG=local-up
# shellcheck source=hack/lib/proc.sh
. "$ROOT/hack/lib/proc.sh"

say() { printf '\n== %s\n' "$*"; }

# Everything this script started, by the pid it recorded.
stop_replicas() {
  for r in "${REPLICAS[@]}" dataplane bridge-host bridge-node; do
    pid_stop "$STATE/$r.pid"
  done
  if [ "$(id -u)" -eq 0 ]; then "$ROOT/hack/topology.sh" down lu "$STATE/topology"; fi
}

# The node agent on a "node" that is a network namespace: the demo Pods become httpd processes in
# namespaces of their own with the Pods' IPs, a client namespace curls the Service's ClusterIP
# through the rules svcplane programs in the node namespace. The agent reaches the apiserver at
# the node's own loopback through a unix socket (paths cross network namespaces).
dataplane_demo() {
  if [ "$(id -u)" -ne 0 ]; then say "dataplane demo skipped (needs root for network namespaces)"; return; fi
  say "dataplane: svcplane dataplane in node namespace lu-n (nftables mode), Pods as namespaces"
  local n=lu-n c=lu-c
  # The demo Pods' addresses and ports (see demo()), each answering with its name.
  "$ROOT/hack/topology.sh" up lu "$STATE/topology" 10.201.1 \
    10.244.0.10:8080:web-0 10.244.0.11:8081:web-1 10.244.0.12:8082:web-2
  # Background processes must not hold the script's stdout (a pipe to tee would never end).
  socat "UNIX-LISTEN:$STATE/apiserver.sock,fork" "TCP:127.0.0.1:$APISERVER_PORT" > "$STATE/bridge-host.log" 2>&1 < /dev/null &
  echo $! > "$STATE/bridge-host.pid"
  ip netns exec $n socat "TCP-LISTEN:$APISERVER_PORT,bind=127.0.0.1,fork,reuseaddr" \
    "UNIX-CONNECT:$STATE/apiserver.sock" > "$STATE/bridge-node.log" 2>&1 < /dev/null &
  echo $! > "$STATE/bridge-node.pid"
  kubectl apply --server-side --field-manager=svcplane-local-up \
    -f "$ROOT/manifests/dataplane/serviceaccount.yaml" -f "$ROOT/manifests/dataplane/rbac.yaml" >/dev/null
  local token; token=$(kubectl -n kube-system create token svcplane-dataplane --duration=24h)
  cp "$STATE/svcplane.kubeconfig" "$STATE/dataplane.kubeconfig"
  KUBECONFIG=$STATE/dataplane.kubeconfig kubectl config set-credentials svcplane --token="$token" >/dev/null
  ip netns exec $n "$1" dataplane --kubeconfig "$STATE/dataplane.kubeconfig" --node-name node-a \
    --http-bind-address 127.0.0.1:10256 > "$STATE/dataplane.log" 2>&1 < /dev/null &
  echo $! > "$STATE/dataplane.pid"
  echo "dataplane: pid $!, log $STATE/dataplane.log"
  local ip; ip=$(kubectl -n demo get service web -o jsonpath='{.spec.clusterIP}')
  for _ in $(seq 100); do
    ip netns exec $c curl -s --max-time 1 "http://$ip/" >/dev/null 2>&1 && break
    sleep 0.2
  done
  say "curl http://$ip/ (ClusterIP of demo/web) from client namespace $c, 10 times"
  for _ in $(seq 10); do ip netns exec $c curl -s --max-time 2 "http://$ip/" || echo FAILED; done | sort | uniq -c
  echo "(web-2 is not ready, so it gets no traffic)"
}

demo() {
  say "demo: Service 'web' in namespace 'demo' with three Pods on two Nodes"
  kubectl apply --server-side --field-manager=svcplane-local-up -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {svcplane.io/allocation: "true"}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: demo}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  type: NodePort
  ports: [{name: http, port: 80, targetPort: http}]
YAML
  local i node ready
  for i in 0 1 2; do
    node="node-a"; [ "$i" = 2 ] && node="node-b"
    kubectl apply --server-side --field-manager=svcplane-local-up -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: web-$i, namespace: demo, labels: {app: web}}
spec:
  nodeName: $node
  containers: [{name: web, image: registry.invalid/web:1, ports: [{name: http, containerPort: 808$i}]}]
YAML
    ready=True; [ "$i" = 2 ] && ready=False
    kubectl -n demo patch pod "web-$i" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"10.244.0.1$i\",\"podIPs\":[{\"ip\":\"10.244.0.1$i\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"$ready\"}]}}" >/dev/null
  done
  for _ in $(seq 100); do
    [ "$(kubectl -n demo get endpointslices -l kubernetes.io/service-name=web -o jsonpath='{range .items[*]}{range .endpoints[*]}x{end}{end}' 2>/dev/null)" = xxx ] && break
    sleep 0.2
  done
  say "Service demo/web: ClusterIP and NodePort allocated by svcplane's webhook from its etcd bitmaps"
  kubectl -n demo get service web
  sleep 1  # the leader refreshes pool status every --allocation-usage-period (1 s here)
  say "ServicePools (kubectl get servicepools)"
  kubectl get servicepools
  say "EndpointSlices of demo/web (named targetPort 'http' resolved per Pod; web-2 not ready)"
  kubectl -n demo get endpointslices -l kubernetes.io/service-name=web \
    -o custom-columns='NAME:.metadata.name,ADDRESSTYPE:.addressType,PORTS:.ports[*].port,ADDRESSES:.endpoints[*].addresses[0],READY:.endpoints[*].conditions.ready,ZONES:.endpoints[*].zone'
  say "Endpoints of demo/web"
  # kubectl warns that v1 Endpoints is deprecated: that warning is the only thing silenced here.
  kubectl -n demo get endpoints web 2> >(grep -v 'v1 Endpoints is deprecated' >&2)
}

status() {
  # shellcheck disable=SC1091
  . "$CP/env"
  say "Lease $LEASE_NS/$LEASE"
  kubectl -n "$LEASE_NS" get lease "$LEASE" \
    -o custom-columns=HOLDER:.spec.holderIdentity,DURATION:.spec.leaseDurationSeconds,TRANSITIONS:.spec.leaseTransitions,RENEWED:.spec.renewTime
  say "replicas"
  printf '%-32s %-8s %-22s %s\n' REPLICA PID METRICS leader_election_master_status
  for i in "${!REPLICAS[@]}"; do
    local r=${REPLICAS[$i]} port=${HTTP_PORTS[$i]} pid=- gauge=-
    [ -f "$STATE/$r.pid" ] && pid=$(cat "$STATE/$r.pid")
    gauge=$(curl -sf "http://127.0.0.1:$port/metrics" | awk -v l="leader_election_master_status{name=\"$LEASE\"}" '$1==l{print $2}') || gauge=unreachable
    printf '%-32s %-8s %-22s %s\n' "$r" "$pid" "127.0.0.1:$port" "${gauge:-?}"
  done
  say "Lease holder: $(kubectl -n "$LEASE_NS" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}')"
}

up() {
  say "installing system packages (if missing)"
  "$ROOT/hack/install-deps.sh"
  say "kube-apiserver and kubectl (built once, cached by version)"
  KUBE_BIN=$("$ROOT/hack/build-kube.sh"); echo "$KUBE_BIN"
  say "building svcplane"
  (cd "$ROOT" && cargo build --locked -p svcplane)
  local bin=$ROOT/target/debug/svcplane
  [ -n "${CARGO_TARGET_DIR:-}" ] && bin=$CARGO_TARGET_DIR/debug/svcplane

  stop_replicas
  "$ROOT/hack/control-plane.sh" down "$CP"
  mkdir -p "$STATE"
  say "starting etcd and kube-apiserver"
  KUBE_BIN=$KUBE_BIN "$ROOT/hack/control-plane.sh" up "$CP" >/dev/null
  # shellcheck disable=SC1091
  . "$CP/env"

  say "applying svcplane's ServiceAccount, RBAC and CRDs"
  kubectl apply --server-side --field-manager=svcplane-local-up \
    -f "$ROOT/manifests/controller-manager/serviceaccount.yaml" \
    -f "$ROOT/manifests/controller-manager/rbac.yaml" \
    -f "$ROOT/manifests/crds/crds.yaml"
  # Locally there is no kube-proxy to reach the webhook Service of manifests/, so the webhook is
  # registered by URL, at replica 0, for namespace 'demo' only (the cluster stays usable when
  # replica 0 is killed).
  kubectl apply --server-side --field-manager=svcplane-local-up -f - >/dev/null <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: svcplane}
webhooks:
- name: services.svcplane.io
  admissionReviewVersions: [v1]
  sideEffects: NoneOnDryRun
  failurePolicy: Fail
  timeoutSeconds: 10
  clientConfig: {url: "https://127.0.0.1:${WEBHOOK_PORTS[0]}/mutate-services"}
  namespaceSelector: {matchLabels: {svcplane.io/allocation: "true"}}
  rules:
  - {apiGroups: [""], apiVersions: [v1], resources: [services], operations: [CREATE, UPDATE], scope: Namespaced}
YAML
  # The replicas act with exactly the manifests' permissions, not as cluster admin.
  local token; token=$(kubectl -n kube-system create token svcplane-controller-manager --duration=24h)
  kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d > "$STATE/ca.crt"
  KUBECONFIG=$STATE/svcplane.kubeconfig kubectl config set-cluster local --server="$APISERVER_URL" \
    --certificate-authority="$STATE/ca.crt" --embed-certs >/dev/null
  KUBECONFIG=$STATE/svcplane.kubeconfig kubectl config set-credentials svcplane --token="$token" >/dev/null
  KUBECONFIG=$STATE/svcplane.kubeconfig kubectl config set-context local --cluster=local --user=svcplane >/dev/null
  KUBECONFIG=$STATE/svcplane.kubeconfig kubectl config use-context local >/dev/null

  say "starting ${#REPLICAS[@]} controller-manager replicas"
  for i in "${!REPLICAS[@]}"; do
    local r=${REPLICAS[$i]}
    nohup "$bin" controller-manager --kubeconfig "$STATE/svcplane.kubeconfig" \
      --http-bind-address "127.0.0.1:${HTTP_PORTS[$i]}" --leader-elect-identity "$r" \
      --service-cluster-ip-range 10.96.0.0/16,fd00:10:96::/112 --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
      --webhook-bind-address "127.0.0.1:${WEBHOOK_PORTS[$i]}" --webhook-cert-names 127.0.0.1 \
      --allocation-usage-period 1s \
      > "$STATE/$r.log" 2>&1 < /dev/null &
    echo $! > "$STATE/$r.pid"
    echo "$r: pid $!, log $STATE/$r.log"
  done
  for _ in $(seq 150); do
    [ -n "$(kubectl -n "$LEASE_NS" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)" ] && break
    sleep 0.2
  done
  sleep 1  # let the follower's first attempt see the holder, so both gauges are settled
  for _ in $(seq 150); do
    # Ready once the leader's first repair pass has initialized the ranges in etcd.
    curl -sf "http://127.0.0.1:${HTTP_PORTS[0]}/readyz" >/dev/null && break
    sleep 0.2
  done
  demo
  dataplane_demo "$bin"
  status
  cat <<EOF

Try: kill -9 the leader's pid and run 'hack/local-up.sh status' after ~17 s; or kill -TERM it for
a handover within ~2 s. kubectl: source $CP/env. Stop everything: hack/local-up.sh down
EOF
}

case ${1:-up} in
  up) up ;;
  status) status ;;
  down) stop_replicas; "$ROOT/hack/control-plane.sh" down "$CP"; rm -rf "$STATE"; echo "stopped" ;;
  *) usage ;;
esac
