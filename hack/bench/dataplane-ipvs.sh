#!/usr/bin/env bash
# Benchmark of the node agent's IPVS mode inside the qemu VM (hack/ipvs-vm.sh; TCG emulation, so
# absolute times are several times a real machine's), for BENCH_DP_SIZES (1000 10000) Services x
# 10 endpoints from fixture files, one agent process per size (`--objects` replays the files in
# order): a full sync, then BENCH_DP_CHANGES (20) one-endpoint changes as the running agent
# makes them (only the changed Service recomputed, read back and planned; p50/p99), then the
# same change as a fresh agent's first sync makes it (reading the whole table back).
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
CHANGES=${BENCH_DP_CHANGES:-20}
cat > "$W/scenario.sh" <<SCEN
for n in $SIZES; do
  files=/scenario/full-\$n.json
  i=0
  while [ \$i -lt $CHANGES ]; do
    if [ \$((i % 2)) = 0 ]; then files=\$files,/scenario/one-\$n.json; else files=\$files,/scenario/full-\$n.json; fi
    i=\$((i + 1))
  done
  svcplane dataplane --node-name vm --mode ipvs --objects "\$files" 2>/dev/null | sed "s/^/SYNC \$n /"
  echo "FRESH \$n \$(svcplane dataplane --node-name vm --mode ipvs --objects /scenario/one-\$n.json 2>/dev/null)"
  svcplane cleanup >/dev/null 2>&1
done
SCEN
SVCPLANE_BIN=$PWD/target/release/svcplane IPVS_VM_TIMEOUT=1800 hack/ipvs-vm.sh "$W"
echo
echo "IPVS mode in the VM (TCG), Services x 10 endpoints; $CHANGES one-endpoint changes"
printf '%-9s %10s %13s %13s %15s %11s\n' services "full ms" "one p50 ms" "one p99 ms" "fresh one ms" operations
tr -d '\r' < "$W/results.txt" | awk '
  function field(json, name,   v) {
    if (!match(json, "\"" name "\":[0-9.a-z]+")) return ""
    v = substr(json, RSTART, RLENGTH); sub(/^[^:]*:/, "", v); return v
  }
  /^SYNC / {
    n = $2; json = substr($0, index($0, "{"))
    if (field(json, "full") == "true") full[n] = field(json, "elapsed_ms")
    else { k = ++count[n]; one[n, k] = field(json, "elapsed_ms"); ops[n] = field(json, "operations") }
    sizes[n] = 1
  }
  /^FRESH / { n = $2; fresh[n] = field(substr($0, index($0, "{")), "elapsed_ms") }
  END {
    for (n in sizes) {
      c = count[n]
      for (i = 1; i <= c; i++) v[i] = one[n, i]
      # insertion sort: a handful of values
      for (i = 2; i <= c; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] + 0 > x + 0) { v[j + 1] = v[j]; j-- }; v[j + 1] = x }
      p50 = v[int((c + 1) / 2)]; p99 = v[c - int(c / 100)]
      printf "%-9s %10.1f %13.1f %13.1f %15.1f %11s\n", n, full[n], p50, p99, fresh[n], ops[n]
    }
  }' | sort -n