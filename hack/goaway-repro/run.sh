#!/usr/bin/env bash
# Reproduces "http2: server sent GOAWAY and closed the connection" (http2.GoAwayError, which
# kube-apiserver does not retry) against svcplane's webhook server without an apiserver:
# the ignored test webhook::server::tests::goaway_repro_server serves with a short max connection
# age, and a Go client using golang.org/x/net/http2 (the version kube-apiserver v1.37 vendors)
# sends requests to it concurrently and counts errors by kind.
#
#   hack/goaway-repro/run.sh [-n requests] [-c concurrency] [-body bytes] [-rcvbuf bytes]
#
# Before the fix (linger in src/webhook/server.rs), -n 100000 -c 32 failed ~70 requests with
# "http2: client connection force closed via ClientConn.Close" (the client's write hit the reset),
# and with -rcvbuf 4096 (responses queue in the server's kernel, as over a real network) ~400,
# most of them "http2: server sent GOAWAY and closed the connection" (GoAwayError), as seen from
# kube-apiserver. After it: none.
# Env: GOAWAY_REPRO_AGE_MS (200), RUST_LOG (e.g. h2=trace,hyper=trace; logs in $DIR/server.log),
#      CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${GOAWAY_REPRO_DIR:-$(mktemp -d /tmp/goaway-repro.XXXXXX)}
export GOAWAY_REPRO_DIR=$DIR
export PATH=$PATH:/usr/local/go/bin GOFLAGS=-mod=mod
(cd hack/goaway-repro && go build -o "$DIR/client" .)
cargo test -p svcplane --bin svcplane --no-run -q 2>/dev/null
cargo test -p svcplane --bin svcplane -q -- --ignored --exact \
  webhook::server::tests::goaway_repro_server --nocapture >"$DIR/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do [[ -s $DIR/addr ]] && break; sleep 0.2; done
[[ -s $DIR/addr ]] || { cat "$DIR/server.log"; exit 1; }
# Kernel counters (whole network namespace, so other traffic adds to them): TCPAbortOnData
# counts sockets reset because data arrived after the application closed them.
counters() { nstat -az 2>/dev/null | awk '/^(TcpExtTCPAbortOnData|TcpExtTCPAbortOnClose|TcpOutRsts) /{print $1, $2}'; }
before=$(counters || true)
rc=0
"$DIR/client" -addr "$(cat "$DIR/addr")" -ca "$DIR/ca.pem" "$@" || rc=$?
after=$(counters || true)
join <(echo "$before" | sort) <(echo "$after" | sort) | awk '{print "kernel " $1 " +" $3 - $2}'
touch "$DIR/stop"
wait "$server" || true
grep -E '^connections ' "$DIR/server.log" || true
echo "logs: $DIR"
exit $rc
