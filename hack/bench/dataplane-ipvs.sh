#!/usr/bin/env bash
# Benchmark of the node agent's IPVS mode inside the qemu VM (hack/ipvs-vm.sh; TCG emulation, so
# absolute times are several times a real machine's): a full sync and a one-endpoint update for
# BENCH_DP_SIZES (1000 10000) Services x 10 endpoints, from fixture files.
set -euo pipefail
cd "$(dirname "$0")/../.."
hack/install-deps.sh
cargo build --release --locked -p svcplane
W=$(mktemp -d "${TMPDIR:-/tmp}/svcplane-ipvsbench.XXXXXX"); trap 'rm -rf "$W"' EXIT
SIZES=${BENCH_DP_SIZES:-1000 10000}
# fixture N CHANGED: N Services 10.96.x.y:80 with 10 endpoints each (backend 3 of Service 0 moved
# when CHANGED=1).
fixture() {
  awk -v n="$1" -v changed="$2" 'BEGIN {
    printf "{\"items\":["
    for (i = 0; i < n; i++) {
      ip = sprintf("10.96.%d.%d", int((i + 1) / 256), (i + 1) % 256)
      if (i) printf ","
      printf "{\"kind\":\"Service\",\"metadata\":{\"namespace\":\"b\",\"name\":\"s%d\"},\"spec\":{\"clusterIP\":\"%s\",\"clusterIPs\":[\"%s\"],\"ports\":[{\"name\":\"p\",\"port\":80,\"protocol\":\"TCP\"}]}},", i, ip, ip
      printf "{\"kind\":\"EndpointSlice\",\"metadata\":{\"namespace\":\"b\",\"name\":\"s%d-1\",\"labels\":{\"kubernetes.io/service-name\":\"s%d\"}},\"addressType\":\"IPv4\",\"ports\":[{\"name\":\"p\",\"port\":8080,\"protocol\":\"TCP\"}],\"endpoints\":[", i, i
      for (j = 0; j < 10; j++) {
        e = i * 10 + j; a = sprintf("10.%d.%d.%d", 100 + int(e / 65536), int(e / 256) % 256, e % 256)
        if (changed && i == 0 && j == 3) a = "10.250.0.1"
        printf "%s{\"addresses\":[\"%s\"],\"conditions\":{\"ready\":true}}", (j ? "," : ""), a
      }
      printf "]}"
    }
    printf "]}"
  }'
}
for n in $SIZES; do fixture "$n" 0 > "$W/full-$n.json"; fixture "$n" 1 > "$W/one-$n.json"; done
cat > "$W/scenario.sh" <<SCEN
for n in $SIZES; do
  echo "FULL \$n \$(svcplane dataplane --node-name vm --mode ipvs --objects /scenario/full-\$n.json 2>/dev/null)"
  echo "ONE \$n \$(svcplane dataplane --node-name vm --mode ipvs --objects /scenario/one-\$n.json 2>/dev/null)"
  svcplane cleanup >/dev/null 2>&1
done
SCEN
SVCPLANE_BIN=$PWD/target/release/svcplane IPVS_VM_TIMEOUT=1800 hack/ipvs-vm.sh "$W"
echo
echo "IPVS mode in the VM (TCG), Services x 10 endpoints"
printf '%-9s %-13s %10s %11s\n' services sync "sync ms" operations
tr -d '\r' < "$W/results.txt" | awk '/^(FULL|ONE) / {
  split($0, a, " "); json = substr($0, index($0, "{"))
  match(json, /"elapsed_ms":[0-9.]+/); ms = substr(json, RSTART + 13, RLENGTH - 13)
  match(json, /"operations":[0-9]+/); ops = substr(json, RSTART + 13, RLENGTH - 13)
  printf "%-9s %-13s %10.1f %11s\n", a[2], (a[1] == "FULL" ? "full" : "one endpoint"), ms, ops }'
