#!/usr/bin/env bash
# A node, a client and backends as network namespaces on this machine's kernel: the one
# definition of the topology the local demo (hack/local-up.sh) and the e2e tests
# (e2e/src/netns.rs) run svcplane's node agent in. Every address lives inside the namespaces.
#
#   PREFIX-c (NET.2/24) ── PREFIX-n (NET.1/24; forwards; the Service range routed to lo)
#                              └─ PREFIX-b<i> (its IP/32, reached by proxy ARP), one per BACKEND
#
# usage:
#   hack/topology.sh up   PREFIX DIR NET BACKEND...   BACKEND is IP:PORT:TEXT, a busybox httpd on
#                                                     PORT answering TEXT (and at /cgi-bin/client
#                                                     the client's address); NET e.g. 10.200.1
#   hack/topology.sh down PREFIX DIR                  stops the httpds, deletes the namespaces
# The httpds' pid files and logs are in DIR (backend-<i>.pid, backend-<i>.log).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOG_TAG=topology
# shellcheck source=hack/lib/proc.sh
. "$HERE/lib/proc.sh"

SERVICE_RANGE=10.96.0.0/12

up() {
  local prefix=$1 dir=$2 net=$3; shift 3
  local c=$prefix-c n=$prefix-n i=0 spec ip port text b
  mkdir -p "$dir"
  ip netns add "$c"; ip netns add "$n"
  ip -n "$c" link set lo up; ip -n "$n" link set lo up
  ip link add c0 netns "$c" type veth peer name n-c netns "$n"
  ip -n "$c" addr add "$net.2/24" dev c0; ip -n "$c" link set c0 up
  ip -n "$c" route add default via "$net.1"
  ip -n "$n" addr add "$net.1/24" dev n-c; ip -n "$n" link set n-c up
  # Service addresses are routed into the node (this kernel has no dummy links), where DNAT
  # takes them, or the filter hooks reject them.
  ip -n "$n" route add "$SERVICE_RANGE" dev lo
  ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1
  for spec in "$@"; do
    i=$((i + 1))
    IFS=: read -r ip port text <<< "$spec"
    b=$prefix-b$i
    ip netns add "$b"; ip -n "$b" link set lo up
    ip link add b0 netns "$b" type veth peer name "n-b$i" netns "$n"
    ip -n "$b" addr add "$ip/32" dev b0; ip -n "$b" link set b0 up
    ip -n "$b" route add default dev b0
    ip -n "$n" link set "n-b$i" up; ip -n "$n" route add "$ip/32" dev "n-b$i"
    ip netns exec "$n" sysctl -qw "net.ipv4.conf.n-b$i.proxy_arp=1"
    mkdir -p "$dir/www-$i/cgi-bin"; echo "$text" > "$dir/www-$i/index.html"
    # /cgi-bin/client answers the address the connection came from (is it masqueraded?).
    cat > "$dir/www-$i/cgi-bin/client" <<'CGI'
#!/bin/sh
# httpd listens on IPv6 and sees IPv4 clients as [::ffff:a.b.c.d].
a=${REMOTE_ADDR#\[::ffff:}
printf 'Content-Type: text/plain\r\n\r\n%s\n' "${a%]}"
CGI
    chmod +x "$dir/www-$i/cgi-bin/client"
    # `ip netns exec` execs httpd: $! is httpd's own pid.
    ip netns exec "$b" busybox httpd -f -p "$port" -h "$dir/www-$i" > "$dir/backend-$i.log" 2>&1 < /dev/null &
    echo $! > "$dir/backend-$i.pid"
  done
}

down() {
  local prefix=$1 dir=$2 f ns
  for f in "$dir"/backend-*.pid; do
    [ -e "$f" ] && pid_stop "$f"
  done
  for ns in $(ip netns list | awk '{print $1}'); do
    case $ns in "$prefix"-c|"$prefix"-n|"$prefix"-b[0-9]*) ip netns del "$ns" ;; esac
  done
}

case ${1:-} in
  up) [ $# -ge 4 ] || usage; shift; up "$@" ;;
  down) [ $# -eq 3 ] || usage; shift; down "$@" ;;
  *) usage ;;
esac
