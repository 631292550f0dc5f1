//! The canonical layout of `Endpoints.subsets` and the 1000-address cap.
//!
//! Canonical layout, as upstream's `RepackSubsets` defines it: each address (IP + target UID)
//! once; for one address and port, not-ready wins over ready; addresses that serve exactly the
//! same ports with the same readiness share a subset, which lists all those ports. Addresses are
//! ordered by IP bytes then UID, as upstream orders them. Ports and subsets are ordered by
//! content rather than by upstream's hash of Go's memory dump; equality is checked on the
//! canonical form, so either order reads as "unchanged".

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

/// Upstream's `maxCapacity`: the most addresses one Endpoints object carries.
pub const MAX_ADDRESSES: usize = 1000;

/// A port in an orderable form. `None` stands for "no ports" (headless Services without ports).
type PortKey = Option<(String, i32, String, Option<String>)>;

fn port_key(p: &EndpointPort) -> PortKey {
    Some((
        p.name.clone().unwrap_or_default(),
        p.port,
        p.protocol
            .clone()
            .unwrap_or_else(|| crate::model::DEFAULT_PROTOCOL.to_owned()),
        p.app_protocol.clone(),
    ))
}

fn port_from_key(k: &PortKey) -> Option<EndpointPort> {
    k.as_ref()
        .map(|(name, port, protocol, app_protocol)| EndpointPort {
            name: Some(name.clone()).filter(|n| !n.is_empty()),
            port: *port,
            protocol: Some(protocol.clone()),
            app_protocol: app_protocol.clone(),
        })
}

/// Identity of an address across subsets: IP and target UID.
type AddressKey = (String, String);

/// The addresses serving one port, with their readiness.
type AddressSet = Vec<(AddressKey, bool)>;

/// Identity of an address across subsets.
fn address_key(a: &EndpointAddress) -> AddressKey {
    (
        a.ip.clone(),
        a.target_ref
            .as_ref()
            .and_then(|t| t.uid.clone())
            .unwrap_or_default(),
    )
}

/// Upstream's address order: IP bytes, then target UID (an address without target first).
fn address_order(a: &EndpointAddress, b: &EndpointAddress) -> std::cmp::Ordering {
    a.ip.as_bytes().cmp(b.ip.as_bytes()).then_with(|| {
        let uid = |x: &EndpointAddress| x.target_ref.as_ref().map(|t| t.uid.clone().unwrap_or_default());
        uid(a).cmp(&uid(b))
    })
}

/// Rewrites `subsets` in canonical layout.
pub fn repack(subsets: &[EndpointSubset]) -> Vec<EndpointSubset> {
    let mut addresses: BTreeMap<(String, String), EndpointAddress> = BTreeMap::new();
    // port -> address -> ready
    let mut by_port: BTreeMap<PortKey, BTreeMap<(String, String), bool>> = BTreeMap::new();
    for subset in subsets {
        let ports: Vec<PortKey> = match subset.ports.as_deref() {
            Some(ps) if !ps.is_empty() => ps.iter().map(port_key).collect(),
            _ => vec![None],
        };
        let all = subset
            .addresses
            .iter()
            .flatten()
            .map(|a| (a, true))
            .chain(subset.not_ready_addresses.iter().flatten().map(|a| (a, false)));
        for (addr, ready) in all {
            let key = address_key(addr);
            addresses.entry(key.clone()).or_insert_with(|| addr.clone());
            for port in &ports {
                let slot = by_port
                    .entry(port.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_insert(ready);
                // Not ready trumps ready.
                *slot = *slot && ready;
            }
        }
    }
    // Ports that serve the same addresses with the same readiness share one subset.
    let mut groups: BTreeMap<AddressSet, BTreeSet<PortKey>> = BTreeMap::new();
    for (port, addrs) in by_port {
        groups
            .entry(addrs.into_iter().collect())
            .or_default()
            .insert(port);
    }
    let mut out: Vec<EndpointSubset> = groups
        .into_iter()
        .map(|(addrs, ports)| {
            let mut ready: Vec<EndpointAddress> = Vec::new();
            let mut not_ready: Vec<EndpointAddress> = Vec::new();
            for (key, is_ready) in addrs {
                if let Some(a) = addresses.get(&key) {
                    if is_ready {
                        ready.push(a.clone())
                    } else {
                        not_ready.push(a.clone())
                    }
                }
            }
            ready.sort_by(address_order);
            not_ready.sort_by(address_order);
            let ports: Vec<EndpointPort> = ports.iter().filter_map(port_from_key).collect();
            EndpointSubset {
                addresses: Some(ready).filter(|v| !v.is_empty()),
                not_ready_addresses: Some(not_ready).filter(|v| !v.is_empty()),
                ports: Some(ports).filter(|v| !v.is_empty()),
            }
        })
        .collect();
    out.sort_by_key(subset_sort_key);
    out
}

fn subset_sort_key(s: &EndpointSubset) -> (Option<AddressKey>, Option<AddressKey>, Vec<PortKey>) {
    (
        s.addresses.as_ref().and_then(|a| a.first()).map(address_key),
        s.not_ready_addresses
            .as_ref()
            .and_then(|a| a.first())
            .map(address_key),
        s.ports.iter().flatten().map(port_key).collect(),
    )
}

/// Whether two subset lists say the same thing: equal in canonical layout, ignoring the
/// resourceVersion of address targets.
pub fn same_subsets(a: &[EndpointSubset], b: &[EndpointSubset]) -> bool {
    let strip = |subsets: Vec<EndpointSubset>| {
        subsets
            .into_iter()
            .map(|mut s| {
                for addr in s
                    .addresses
                    .iter_mut()
                    .flatten()
                    .chain(s.not_ready_addresses.iter_mut().flatten())
                {
                    if let Some(t) = addr.target_ref.as_mut() {
                        t.resource_version = None;
                    }
                }
                s
            })
            .collect::<Vec<_>>()
    };
    strip(repack(a)) == strip(repack(b))
}

pub fn address_count(subsets: &[EndpointSubset]) -> (usize, usize) {
    subsets.iter().fold((0, 0), |(r, n), s| {
        (
            r + s.addresses.as_ref().map_or(0, Vec::len),
            n + s.not_ready_addresses.as_ref().map_or(0, Vec::len),
        )
    })
}

/// Caps canonical `subsets` at [`MAX_ADDRESSES`], as upstream does: ready addresses are kept
/// first; whatever is cut (not-ready ones, or ready ones beyond the cap) is cut from every
/// subset in proportion to its share, rounding up, the first addresses of each subset (in
/// address order) surviving. Returns whether anything was cut.
pub fn truncate(subsets: &mut [EndpointSubset]) -> bool {
    let (ready, not_ready) = address_count(subsets);
    if ready + not_ready <= MAX_ADDRESSES {
        return false;
    }
    let truncate_ready = ready > MAX_ADDRESSES;
    let (budget, total) = if truncate_ready {
        (MAX_ADDRESSES, ready)
    } else {
        (MAX_ADDRESSES - ready, not_ready)
    };
    let mut left = budget;
    for s in subsets.iter_mut() {
        if truncate_ready {
            s.not_ready_addresses = None;
        }
        let list = if truncate_ready {
            &mut s.addresses
        } else {
            &mut s.not_ready_addresses
        };
        let n = list.as_ref().map_or(0, Vec::len);
        // ceil(n / total * budget), in integers.
        let share = (n * budget).div_ceil(total).min(left);
        if let Some(v) = list.as_mut() {
            v.truncate(share);
        }
        left -= list.as_ref().map_or(0, Vec::len);
        if list.as_ref().is_some_and(Vec::is_empty) {
            *list = None;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;

    fn addr(ip: &str) -> EndpointAddress {
        EndpointAddress {
            ip: ip.into(),
            target_ref: Some(ObjectReference {
                uid: Some(format!("uid-{ip}")),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(name: &str, p: i32) -> EndpointPort {
        EndpointPort {
            name: Some(name.into()),
            port: p,
            protocol: Some("TCP".into()),
            app_protocol: None,
        }
    }

    fn subset(ready: &[&str], not_ready: &[&str], ports: &[EndpointPort]) -> EndpointSubset {
        EndpointSubset {
            addresses: Some(ready.iter().map(|i| addr(i)).collect()).filter(|v: &Vec<_>| !v.is_empty()),
            not_ready_addresses: Some(not_ready.iter().map(|i| addr(i)).collect())
                .filter(|v: &Vec<_>| !v.is_empty()),
            ports: Some(ports.to_vec()).filter(|v| !v.is_empty()),
        }
    }

    fn ips(v: &Option<Vec<EndpointAddress>>) -> Vec<String> {
        v.iter().flatten().map(|a| a.ip.clone()).collect()
    }

    #[test]
    fn repack_merges_ports_and_addresses() {
        // One subset per (address, port), as the controller builds them.
        let input = vec![
            subset(&["10.0.0.2"], &[], &[port("http", 80)]),
            subset(&["10.0.0.2"], &[], &[port("https", 443)]),
            subset(&["10.0.0.10"], &[], &[port("http", 80)]),
            subset(&["10.0.0.10"], &[], &[port("https", 443)]),
            subset(&["10.0.0.1"], &[], &[port("http", 80)]),
        ];
        let out = repack(&input);
        // Ports are grouped by the exact set of addresses serving them: http is served by all
        // three, https by two, so they stay apart.
        assert_eq!(out.len(), 2);
        let by_port = |name: &str| {
            out.iter()
                .find(|s| s.ports.as_ref().unwrap()[0].name.as_deref() == Some(name))
                .unwrap()
        };
        assert_eq!(
            ips(&by_port("http").addresses),
            ["10.0.0.1", "10.0.0.10", "10.0.0.2"],
            "IP byte order, as upstream"
        );
        assert_eq!(ips(&by_port("https").addresses), ["10.0.0.10", "10.0.0.2"]);
        // Once .1 serves https too, both ports share one subset.
        let mut all = input.clone();
        all.push(subset(&["10.0.0.1"], &[], &[port("https", 443)]));
        let merged = repack(&all);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].ports.as_ref().unwrap().len(), 2);
        assert_eq!(repack(&out), out, "canonical form is a fixed point");
    }

    #[test]
    fn not_ready_trumps_ready_and_duplicates_collapse() {
        let input = vec![
            subset(&["10.0.0.1", "10.0.0.1"], &[], &[port("p", 1)]),
            subset(&[], &["10.0.0.1"], &[port("p", 1)]),
        ];
        let out = repack(&input);
        assert_eq!(out.len(), 1);
        assert_eq!(ips(&out[0].addresses), Vec::<String>::new());
        assert_eq!(ips(&out[0].not_ready_addresses), ["10.0.0.1"]);
    }

    #[test]
    fn portless_subsets_survive() {
        let out = repack(&[subset(&["10.0.0.1"], &[], &[])]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].ports, None);
        assert_eq!(ips(&out[0].addresses), ["10.0.0.1"]);
    }

    #[test]
    fn equality_ignores_order_and_target_resource_versions() {
        let a = vec![subset(
            &["10.0.0.1", "10.0.0.2"],
            &[],
            &[port("a", 1), port("b", 2)],
        )];
        let mut b = vec![subset(
            &["10.0.0.2", "10.0.0.1"],
            &[],
            &[port("b", 2), port("a", 1)],
        )];
        assert!(same_subsets(&a, &b));
        if let Some(t) = b[0].addresses.as_mut().unwrap()[0].target_ref.as_mut() {
            t.resource_version = Some("9".into());
        }
        assert!(same_subsets(&a, &b));
        let c = vec![subset(
            &["10.0.0.1"],
            &["10.0.0.2"],
            &[port("a", 1), port("b", 2)],
        )];
        assert!(!same_subsets(&a, &c));
    }

    fn many(prefix: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{prefix}.{}.{}", i / 250, i % 250))
            .collect()
    }

    fn truncated(ready: usize, not_ready: usize) -> (bool, usize, usize) {
        let r = many("10.1", ready);
        let nr = many("10.2", not_ready);
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        let nr: Vec<&str> = nr.iter().map(String::as_str).collect();
        let mut subsets = repack(&[subset(&r, &nr, &[port("http", 80)])]);
        let cut = truncate(&mut subsets);
        let (a, b) = address_count(&subsets);
        (cut, a, b)
    }

    #[test]
    fn truncation_at_the_boundaries_with_mixed_readiness() {
        assert_eq!(truncated(999, 0), (false, 999, 0));
        assert_eq!(truncated(1000, 0), (false, 1000, 0));
        assert_eq!(truncated(1001, 0), (true, 1000, 0));
        assert_eq!(truncated(2500, 0), (true, 1000, 0));
        assert_eq!(truncated(600, 399), (false, 600, 399));
        assert_eq!(truncated(600, 400), (false, 600, 400));
        assert_eq!(
            truncated(600, 401),
            (true, 600, 400),
            "ready kept, not-ready cut to the budget"
        );
        assert_eq!(truncated(900, 1600), (true, 900, 100));
        assert_eq!(
            truncated(1001, 1499),
            (true, 1000, 0),
            "over the cap in ready alone: not-ready all go"
        );
        assert_eq!(truncated(0, 2500), (true, 0, 1000));
    }

    #[test]
    fn truncation_is_proportional_across_subsets_and_keeps_the_first_addresses() {
        // Two subsets (different ports) of 1200 and 300 ready addresses: 800 + 200 survive.
        let a = many("10.1", 1200);
        let b = many("10.2", 300);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        let mut subsets = repack(&[subset(&a, &[], &[port("a", 1)]), subset(&b, &[], &[port("b", 2)])]);
        let first_of_a = subsets
            .iter()
            .find(|s| s.addresses.as_ref().unwrap().len() == 1200)
            .unwrap()
            .addresses
            .as_ref()
            .unwrap()[..800]
            .to_vec();
        assert!(truncate(&mut subsets));
        let mut counts: Vec<usize> = subsets
            .iter()
            .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, [200, 800]);
        let kept_a = subsets
            .iter()
            .find(|s| s.addresses.as_ref().unwrap().len() == 800)
            .unwrap()
            .addresses
            .clone()
            .unwrap();
        assert_eq!(kept_a, first_of_a);
        // Truncated output, truncated again, is unchanged (idempotent: no rewrite on resync).
        let before = subsets.clone();
        assert!(!truncate(&mut subsets));
        assert_eq!(subsets, before);
    }
}
