//! Releases allocations that stored Services no longer hold: everything of a deleted Service, and
//! what an update dropped (a type change to ExternalName or ClusterIP, removed ports, a
//! downgrade to single-stack). Releases follow the stored objects, never the admission request,
//! so a request the apiserver rejected after admission cannot free a value still in use.

use std::{collections::BTreeSet, net::IpAddr};

/// The cluster IPs and node ports a stored Service holds (`admission::held`).
pub type Held = (Vec<IpAddr>, Vec<u16>);

/// Values held by `old` and not by `new` (all of `old`'s when the Service is gone).
pub fn dropped(old: Held, new: Option<Held>) -> Held {
    let (old_ips, old_ports) = old;
    let (new_ips, new_ports): (BTreeSet<IpAddr>, BTreeSet<u16>) = match new {
        Some((i, p)) => (i.into_iter().collect(), p.into_iter().collect()),
        None => Default::default(),
    };
    (
        old_ips.into_iter().filter(|ip| !new_ips.contains(ip)).collect(),
        old_ports.into_iter().filter(|p| !new_ports.contains(p)).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::held_values;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn svc(type_: &str, ips: &[&str], node_ports: &[i32]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ips: Some(ips.iter().map(|s| (*s).to_owned()).collect()),
                ports: Some(
                    node_ports
                        .iter()
                        .enumerate()
                        .map(|(i, np)| ServicePort {
                            port: 80 + i as i32,
                            node_port: Some(*np),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn deletion_releases_everything_updates_what_was_dropped() {
        let np = svc("NodePort", &["10.96.0.9", "fd00::9"], &[30001, 30002]);
        let (ips, ports) = dropped(held_values(&np), None);
        assert_eq!((ips.len(), ports), (2, vec![30001, 30002]));

        let fewer = svc("NodePort", &["10.96.0.9"], &[30001]);
        let (ips, ports) = dropped(held_values(&np), Some(held_values(&fewer)));
        assert_eq!(ips, ["fd00::9".parse::<IpAddr>().unwrap()]);
        assert_eq!(ports, [30002]);

        let ext = svc("ExternalName", &[], &[]);
        let (ips, ports) = dropped(held_values(&fewer), Some(held_values(&ext)));
        assert_eq!((ips.len(), ports), (1, vec![30001]));

        assert_eq!(
            dropped(held_values(&np), Some(held_values(&np))),
            (vec![], vec![])
        );
    }
}
