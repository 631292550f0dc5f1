//! The tables as data: what a node's desired state means for one family's table, compared as a
//! whole to find what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use svcplane_core::{IpFamily, Protocol};

use super::{NO_ENDPOINTS, REJECT, SERVICES};
use crate::desired::{Backends, DesiredState, PortState};

/// One rule of a regular chain, as data (compared to find what changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `<daddr> . l4proto . th dport vmap @service-ips`, and node ports on local addresses.
    DispatchServices,
    /// The same lookups in the no-endpoint maps.
    DispatchNoEndpoints,
    Reject,
    Drop,
    /// Mark the packet for masquerading.
    MarkMasquerade,
    /// Mark it for masquerading when its source is outside the cluster's Pod range
    /// (`--cluster-cidr`): a client off the cluster, or the node itself, whose replies must come
    /// back through this node to be un-DNATed.
    MasqueradeFromOutside(ipnet::IpNet),
    /// `<saddr> @set goto chain`: the client has a live affinity entry for this endpoint.
    Affinity {
        set: String,
        chain: String,
    },
    /// Go to `chain` with probability 1/`one_in` (1: always); a Service's endpoints get
    /// `one_in` = n, n-1, …, 1 in turn, which picks each with probability 1/n.
    Pick {
        chain: String,
        one_in: u32,
    },
    /// A connection from the endpoint to itself through the service address needs masquerading.
    Hairpin(IpAddr),
    /// Remember the client for the endpoint's affinity set.
    RefreshAffinity(String),
    Dnat(SocketAddr, Protocol),
}

/// A family's whole table, as data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Affinity set name → timeout in seconds.
    pub affinity_sets: BTreeMap<String, u32>,
    pub service_ips: BTreeMap<(IpAddr, Protocol, u16), String>,
    pub node_ports: BTreeMap<(Protocol, u16), String>,
    pub no_endpoint_ips: BTreeSet<(IpAddr, Protocol, u16)>,
    pub no_endpoint_node_ports: BTreeSet<(Protocol, u16)>,
}

impl Ruleset {
    /// Rules in regular chains plus map elements: what the `rule count` metric reports.
    pub fn size(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>()
            + self.service_ips.len()
            + self.node_ports.len()
            + self.no_endpoint_ips.len()
            + self.no_endpoint_node_ports.len()
    }
}

fn port_id(p: &PortState) -> String {
    format!(
        "{}/{}/{}/{}",
        p.name.service.namespace,
        p.name.service.name,
        p.name.protocol.as_str(),
        if p.name.port.is_empty() {
            p.port.to_string()
        } else {
            p.name.port.clone()
        }
    )
}

/// The table for `family`.
pub fn ruleset(state: &DesiredState, family: IpFamily) -> Ruleset {
    let mut rs = skeleton();
    add_ports(&mut rs, state.ports.values(), family);
    rs
}

/// The regular chains every table has, whatever its Services.
pub fn skeleton() -> Ruleset {
    let mut rs = Ruleset::default();
    rs.chains.insert(SERVICES.into(), vec![Rule::DispatchServices]);
    rs.chains
        .insert(NO_ENDPOINTS.into(), vec![Rule::DispatchNoEndpoints]);
    rs.chains.insert(REJECT.into(), vec![Rule::Reject]);
    rs
}

/// What `ports` (typically one Service's) add to a table of `family`: their chains, sets and
/// map elements, without the skeleton.
pub fn fragment<'a>(ports: impl IntoIterator<Item = &'a PortState>, family: IpFamily) -> Ruleset {
    let mut rs = Ruleset::default();
    add_ports(&mut rs, ports, family);
    rs
}

fn add_ports<'a>(rs: &mut Ruleset, ports: impl IntoIterator<Item = &'a PortState>, family: IpFamily) {
    for p in ports.into_iter().filter(|p| p.family == family) {
        let id = port_id(p);
        let proto = p.name.protocol;
        let endpoint_chain = |rs: &mut Ruleset, addr: SocketAddr| -> (String, Option<String>) {
            let chain = format!("ep-{id}__{addr}");
            let set = p.affinity.map(|_| format!("aff-{id}__{addr}"));
            if !rs.chains.contains_key(&chain) {
                let mut rules = vec![Rule::Hairpin(addr.ip())];
                if let (Some(set), Some(timeout)) = (&set, p.affinity) {
                    rules.push(Rule::RefreshAffinity(set.clone()));
                    let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
                    rs.affinity_sets.insert(set.clone(), secs);
                }
                rules.push(Rule::Dnat(addr, proto));
                rs.chains.insert(chain.clone(), rules);
            }
            (chain, set)
        };
        let spread = |rs: &mut Ruleset, backends: &Backends, masquerade: Option<Rule>| -> Vec<Rule> {
            let mut rules = Vec::new();
            if let (Some(rule), Backends::To(_)) = (masquerade, backends) {
                rules.push(rule);
            }
            match backends {
                Backends::To(eps) => {
                    let chains: Vec<(String, Option<String>)> =
                        eps.iter().map(|a| endpoint_chain(rs, *a)).collect();
                    rules.extend(chains.iter().filter_map(|(chain, set)| {
                        set.as_ref().map(|set| Rule::Affinity {
                            set: set.clone(),
                            chain: chain.clone(),
                        })
                    }));
                    let n = chains.len();
                    rules.extend(chains.into_iter().enumerate().map(|(i, (chain, _))| Rule::Pick {
                        chain,
                        one_in: u32::try_from(n - i).unwrap_or(u32::MAX),
                    }));
                }
                Backends::Drop => rules.push(Rule::Drop),
                Backends::Reject => rules.push(Rule::Reject),
            }
            rules
        };

        let svc_chain = format!("svc-{id}");
        if p.internal == Backends::Reject {
            rs.no_endpoint_ips.insert((p.cluster_ip, proto, p.port));
        } else {
            let from_outside = p.cluster_cidr.map(Rule::MasqueradeFromOutside);
            let rules = spread(rs, &p.internal, from_outside);
            rs.chains.insert(svc_chain.clone(), rules);
            rs.service_ips.insert((p.cluster_ip, proto, p.port), svc_chain);
        }

        if p.node_port.is_none() && p.external_ips.is_empty() {
            continue;
        }
        let ext_chain = format!("ext-{id}");
        if p.external == Backends::Reject {
            rs.no_endpoint_ips
                .extend(p.external_ips.iter().map(|ip| (*ip, proto, p.port)));
            if let Some(np) = p.node_port {
                rs.no_endpoint_node_ports.insert((proto, np));
            }
        } else {
            let rules = spread(
                rs,
                &p.external,
                p.masquerade_external.then_some(Rule::MarkMasquerade),
            );
            rs.chains.insert(ext_chain.clone(), rules);
            for ip in &p.external_ips {
                rs.service_ips.insert((*ip, proto, p.port), ext_chain.clone());
            }
            if let Some(np) = p.node_port {
                rs.node_ports.insert((proto, np), ext_chain);
            }
        }
    }
}

/// What IPVS mode still needs from nftables (IPVS itself neither masquerades nor rejects):
/// addresses and ports whose traffic is masqueraded (node ports and external IPs of
/// `externalTrafficPolicy: Cluster` Services, which may be answered by an endpoint on another
/// node), cluster IPs reached from outside the cluster's Pod range, and Service addresses
/// without endpoints, which are rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsSupport {
    pub masquerade_node_ports: BTreeSet<(Protocol, u16)>,
    pub masquerade_ips: BTreeSet<(IpAddr, Protocol, u16)>,
    /// Cluster IPs whose traffic from outside `cluster_cidr` is masqueraded.
    pub cluster_ips: BTreeSet<(IpAddr, Protocol, u16)>,
    pub cluster_cidr: Option<ipnet::IpNet>,
    pub reject_ips: BTreeSet<(IpAddr, Protocol, u16)>,
}

pub fn ipvs_support(state: &DesiredState, family: IpFamily) -> IpvsSupport {
    let mut out = IpvsSupport::default();
    for p in state.ports.values().filter(|p| p.family == family) {
        let proto = p.name.protocol;
        if p.masquerade_external {
            if let Some(np) = p.node_port {
                out.masquerade_node_ports.insert((proto, np));
            }
            out.masquerade_ips
                .extend(p.external_ips.iter().map(|ip| (*ip, proto, p.port)));
        }
        if p.internal == Backends::Reject {
            out.reject_ips.insert((p.cluster_ip, proto, p.port));
        } else if let Some(cidr) = p.cluster_cidr {
            out.cluster_ips.insert((p.cluster_ip, proto, p.port));
            out.cluster_cidr = Some(cidr);
        }
        if p.external == Backends::Reject {
            out.reject_ips
                .extend(p.external_ips.iter().map(|ip| (*ip, proto, p.port)));
        }
    }
    out
}
