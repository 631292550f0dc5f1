#!/usr/bin/env bash
# Gives svcplane its own etcd user whose one role covers its key prefix and nothing else (README,
# "Least-privilege etcd"). Run it with etcdctl pointed at the cluster's etcd as its root user:
#   ETCDCTL_ENDPOINTS=https://<etcd>:2379 ETCDCTL_CACERT=ca.crt ETCDCTL_CERT=root.crt \
#   ETCDCTL_KEY=root.key hack/etcd-user.sh [PREFIX] [USER]
# PREFIX is svcplane's --etcd-prefix (default /svcplane), USER the common name of its client
# certificate (default svcplane): with --client-cert-auth etcd takes the user from it, so the user
# has no password. Safe to run again. It does not turn authentication on (`etcdctl auth enable`).
set -euo pipefail
prefix=${1:-/svcplane}
user=${2:-svcplane}
# svcplane writes <prefix>/ranges/..., <prefix>/reservations/... and <prefix>/leader-epoch: the
# trailing slash keeps a neighbour such as /svcplane-other out of reach.
prefix=${prefix%/}/
etcdctl role get "$user" >/dev/null 2>&1 || etcdctl role add "$user"
etcdctl role grant-permission --prefix=true "$user" readwrite "$prefix"
etcdctl user get "$user" >/dev/null 2>&1 || etcdctl user add "$user" --no-password
etcdctl user grant-role "$user" "$user"
