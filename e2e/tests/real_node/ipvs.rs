//! `ipvsadm -Ln` on the node against what the Services and their EndpointSlices say it should
//! hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, Client, api::ListParams};
use svcplane_e2e::cluster::{Cluster, NODE_IP};

/// Virtual server ("TCP 10.96.0.1:443") -> real servers with a non-zero weight. Weight-0 real
/// servers are leaving endpoints draining their connections (graceful termination).
type Table = BTreeMap<String, BTreeSet<String>>;

pub fn parse(ipvsadm: &str) -> Table {
    let mut table = Table::new();
    let mut current = None;
    for line in ipvsadm.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [proto @ ("TCP" | "UDP" | "SCTP"), addr, ..] => {
                let vs = format!("{proto} {addr}");
                table.entry(vs.clone()).or_default();
                current = Some(vs);
            }
            ["->", addr, _forward, weight, ..] if *addr != "RemoteAddress:Port" => {
                if let Some(vs) = &current
                    && *weight != "0"
                {
                    table.entry(vs.clone()).or_default().insert((*addr).to_owned());
                }
            }
            _ => {}
        }
    }
    table
}

/// What the node should hold: every ClusterIP and NodePort (on the node's address) of every
/// Service with a cluster IP, each with the ready endpoints of its slices.
async fn expected(client: &Client) -> Table {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut table = Table::new();
    for svc in &services.items {
        let (Some(ns), Some(name), Some(spec)) = (&svc.metadata.namespace, &svc.metadata.name, &svc.spec)
        else {
            continue;
        };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| *ip != "None") else {
            continue;
        };
        for port in spec.ports.iter().flatten() {
            let proto = port.protocol.as_deref().unwrap_or("TCP");
            let mut reals = BTreeSet::new();
            for s in slices.items.iter().filter(|s| {
                s.metadata.namespace.as_ref() == Some(ns)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(name)
            }) {
                let Some(target) = s
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name == port.name && p.protocol.as_deref().unwrap_or("TCP") == proto)
                    .and_then(|p| p.port)
                else {
                    continue;
                };
                for e in s.endpoints.iter().flatten() {
                    if e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                        reals.extend(e.addresses.iter().map(|a| format!("{a}:{target}")));
                    }
                }
            }
            table.insert(format!("{proto} {ip}:{}", port.port), reals.clone());
            if let Some(np) = port.node_port {
                table.insert(format!("{proto} {NODE_IP}:{np}"), reals);
            }
        }
    }
    table
}

pub async fn table_matches_services(cluster: &Cluster, client: &Client) {
    let mut last = (Table::new(), Table::new());
    let matched = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let want = expected(client).await;
            let got = parse(&cluster.ssh_ok("ipvsadm -Ln"));
            if got == want {
                return got;
            }
            last = (want, got);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let got = matched.unwrap_or_else(|_| {
        panic!(
            "ipvsadm -Ln never matched the Services:\nwanted {:#?}\ngot {:#?}",
            last.0, last.1
        )
    });
    assert!(got.len() >= 8, "suspiciously small IPVS table: {got:#?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipvsadm_and_leaves_out_draining_real_servers() {
        let out = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.1:443 rr
  -> 10.210.0.1:6443              Masq    1      24         0
TCP  10.96.0.10:53 rr
UDP  10.96.0.10:53 rr
  -> 10.244.0.2:53                Masq    1      0          0
  -> 10.244.0.9:53                Masq    0      0          3
";
        let t = parse(out);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t["TCP 10.96.0.1:443"],
            BTreeSet::from(["10.210.0.1:6443".to_owned()])
        );
        assert!(t["TCP 10.96.0.10:53"].is_empty());
        assert_eq!(
            t["UDP 10.96.0.10:53"],
            BTreeSet::from(["10.244.0.2:53".to_owned()])
        );
    }
}
