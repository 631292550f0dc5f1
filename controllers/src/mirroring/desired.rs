//! From a user-written Endpoints object to the EndpointSlices that mirror it, and the writes
//! that get there. Upstream's rules: one slice per address family and port set (each capped at
//! the per-subset maximum), the first existing slice of a set rewritten in place, the others
//! deleted, creates recycled into deletes of the same family.
//!
//! Beyond upstream, addresses that no endpoint may have are skipped and reported: loopback,
//! link-local, link-local multicast, unspecified, and any Service's cluster IP (which would
//! loop traffic for that Service back into the proxy).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, Endpoints},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use svcplane_core::IpFamily;

use crate::{
    endpoints::subsets::repack,
    endpointslice::endpoint::{
        EndpointKey, PortKey, endpoint_key, endpoints_equal_beyond_key, parse_ip, port_key,
    },
    model::{ANNOTATION_LAST_CHANGE_TRIGGER_TIME, LABEL_MANAGED_BY, LABEL_SERVICE_NAME},
};

/// Label that keeps an Endpoints object from being mirrored.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
const ANNOTATION_LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Upstream's default and maximum for `--mirroring-max-endpoints-per-subset`.
pub const MAX_ENDPOINTS_PER_SUBSET: usize = 1000;

#[derive(Clone, Debug)]
pub struct MirrorOptions {
    pub max_endpoints_per_subset: usize,
    pub managed_by: String,
}

/// Why an address was not mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forbidden {
    Unspecified,
    Loopback,
    LinkLocal,
    LinkLocalMulticast,
    ClusterIp,
}

impl Forbidden {
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::LinkLocalMulticast => "link-local-multicast",
            Self::ClusterIp => "cluster-ip",
        }
    }
}

/// Whether an endpoint may not have `ip`: the ranges the apiserver refuses in Endpoints and
/// EndpointSlices (127.0.0.0/8, ::1, 169.254.0.0/16, fe80::/10 (which holds fe80::/64),
/// 224.0.0.0/24, ff02::/16, unspecified), and the cluster IPs of Services.
pub fn forbidden(ip: &IpAddr, cluster_ips: &HashSet<IpAddr>) -> Option<Forbidden> {
    let kind = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Forbidden::Unspecified,
        IpAddr::V4(v4) if v4.is_loopback() => Forbidden::Loopback,
        IpAddr::V4(v4) if v4.is_link_local() => Forbidden::LinkLocal,
        IpAddr::V4(v4) if v4.octets()[..3] == [224, 0, 0] => Forbidden::LinkLocalMulticast,
        IpAddr::V6(v6) if v6.is_unspecified() => Forbidden::Unspecified,
        IpAddr::V6(v6) if v6.is_loopback() => Forbidden::Loopback,
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Forbidden::LinkLocal,
        IpAddr::V6(v6) if v6.segments()[0] & 0xff0f == 0xff02 => Forbidden::LinkLocalMulticast,
        _ if cluster_ips.contains(ip) => Forbidden::ClusterIp,
        _ => return None,
    };
    Some(kind)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MirrorPlan {
    pub create: Vec<EndpointSlice>,
    pub update: Vec<EndpointSlice>,
    pub delete: Vec<EndpointSlice>,
    /// Addresses that are not IPs.
    pub invalid: usize,
    /// Addresses no endpoint may have, with the reason.
    pub forbidden: Vec<(String, Forbidden)>,
    /// Addresses beyond the per-subset maximum.
    pub over_capacity: usize,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub desired_endpoints: usize,
    /// One slice per family and port set with endpoints.
    pub desired_slices: usize,
}

impl MirrorPlan {
    pub fn writes(&self) -> usize {
        self.create.len() + self.update.len() + self.delete.len()
    }
}

type GroupKey = (IpFamily, PortKey);

/// Plans the mirrored slices of `endpoints` given the slices that exist (this controller's, for
/// this Endpoints object).
pub fn plan_mirror(
    endpoints: &Endpoints,
    existing: &[EndpointSlice],
    cluster_ips: &HashSet<IpAddr>,
    opts: &MirrorOptions,
) -> MirrorPlan {
    let max = opts.max_endpoints_per_subset.clamp(1, MAX_ENDPOINTS_PER_SUBSET);
    let mut plan = MirrorPlan::default();
    let mut desired: BTreeMap<GroupKey, (Vec<EndpointPort>, BTreeMap<EndpointKey, Endpoint>)> =
        BTreeMap::new();

    for subset in repack(endpoints.subsets.as_deref().unwrap_or_default()) {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(p.port),
                protocol: Some(
                    p.protocol
                        .clone()
                        .unwrap_or_else(|| crate::model::DEFAULT_PROTOCOL.to_owned()),
                ),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let pk = port_key(&ports);
        for family in [IpFamily::IPv4, IpFamily::IPv6] {
            desired
                .entry((family, pk.clone()))
                .or_insert_with(|| (ports.clone(), BTreeMap::new()));
        }
        let all = subset
            .addresses
            .iter()
            .flatten()
            .map(|a| (a, true))
            .chain(subset.not_ready_addresses.iter().flatten().map(|a| (a, false)));
        let mut added = 0;
        for (address, ready) in all {
            if added >= max {
                plan.over_capacity += 1;
                continue;
            }
            let Some(ip) = parse_ip(&address.ip) else {
                plan.invalid += 1;
                continue;
            };
            if let Some(reason) = forbidden(&ip, cluster_ips) {
                plan.forbidden.push((ip.to_string(), reason));
                continue;
            }
            let family = if ip.is_ipv6() {
                IpFamily::IPv6
            } else {
                IpFamily::IPv4
            };
            let ep = to_endpoint(address, ip, ready);
            if let Some((_, group)) = desired.get_mut(&(family, pk.clone())) {
                group.insert(endpoint_key(&ep), ep);
            }
            added += 1;
        }
    }

    let mut existing_by_key: BTreeMap<GroupKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        let Some(family) = IpFamily::parse(&slice.address_type) else {
            plan.delete.push(slice.clone());
            continue;
        };
        existing_by_key
            .entry((family, port_key(slice.ports.as_deref().unwrap_or_default())))
            .or_default()
            .push(slice);
    }
    for slices in existing_by_key.values_mut() {
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }

    for (key, (ports, mut want)) in desired {
        let slices = existing_by_key.remove(&key).unwrap_or_default();
        plan.desired_endpoints += want.len();
        plan.desired_slices += usize::from(!want.is_empty());
        if want.is_empty() {
            plan.removed += slices
                .iter()
                .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
            plan.delete.extend(slices.into_iter().cloned());
            continue;
        }
        let first = slices.first().copied();
        plan.delete.extend(slices.iter().skip(1).map(|s| (*s).clone()));
        let mut new = new_slice(endpoints, ports, key.0, opts);
        match first {
            None => plan.added += want.len(),
            Some(cur) => {
                let (added, updated, removed) = changes(cur, &want);
                plan.added += added;
                plan.updated += updated;
                plan.removed += removed;
                let unchanged = added == 0
                    && updated == 0
                    && removed == 0
                    && user_labels(cur) == endpoints.metadata.labels.clone().unwrap_or_default()
                    && cur.metadata.annotations.clone().unwrap_or_default()
                        == mirrored_annotations(endpoints)
                    && owned_by_this_endpoints(cur, endpoints);
                if unchanged {
                    continue;
                }
                new.metadata.name = cur.metadata.name.clone();
                new.metadata.generate_name = None;
                new.metadata.resource_version = cur.metadata.resource_version.clone();
            }
        }
        let eps = new.endpoints.get_or_insert_with(Vec::new);
        while eps.len() < max {
            let Some((_, ep)) = want.pop_first() else { break };
            eps.push(ep);
        }
        if new.metadata.name.is_some() {
            plan.update.push(new)
        } else {
            plan.create.push(new)
        }
    }
    for slices in existing_by_key.into_values() {
        plan.removed += slices
            .iter()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
        plan.delete.extend(slices.into_iter().cloned());
    }
    recycle(&mut plan);
    plan
}

fn to_endpoint(address: &EndpointAddress, ip: IpAddr, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..Default::default()
        }),
        target_ref: address.target_ref.clone(),
        node_name: address.node_name.clone().filter(|n| !n.is_empty()),
        hostname: address.hostname.clone().filter(|h| !h.is_empty()),
        ..Default::default()
    }
}

/// (added, updated, removed) between an existing slice and the desired endpoints.
fn changes(cur: &EndpointSlice, want: &BTreeMap<EndpointKey, Endpoint>) -> (usize, usize, usize) {
    let (mut matched, mut updated, mut removed) = (0, 0, 0);
    let mut seen = HashSet::new();
    for ep in cur.endpoints.iter().flatten() {
        let key = endpoint_key(ep);
        match want.get(&key) {
            Some(w) if seen.insert(key) => {
                matched += 1;
                if !endpoints_equal_beyond_key(w, ep) {
                    updated += 1;
                }
            }
            // Absent, or a duplicate in the slice: either way it goes.
            _ => removed += 1,
        }
    }
    (want.len() - matched, updated, removed)
}

fn user_labels(slice: &EndpointSlice) -> BTreeMap<String, String> {
    let mut labels = slice.metadata.labels.clone().unwrap_or_default();
    labels.remove(LABEL_MANAGED_BY);
    labels.remove(LABEL_SERVICE_NAME);
    labels
}

fn mirrored_annotations(endpoints: &Endpoints) -> BTreeMap<String, String> {
    let mut a = endpoints.metadata.annotations.clone().unwrap_or_default();
    a.remove(ANNOTATION_LAST_CHANGE_TRIGGER_TIME);
    a.remove(ANNOTATION_LAST_APPLIED);
    a
}

/// A slice whose owner is an earlier Endpoints object of the same name must be rebuilt.
fn owned_by_this_endpoints(slice: &EndpointSlice, endpoints: &Endpoints) -> bool {
    let uid = endpoints.metadata.uid.clone().unwrap_or_default();
    !slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Endpoints" && Some(&o.name) == endpoints.metadata.name.as_ref() && o.uid != uid)
}

fn new_slice(
    endpoints: &Endpoints,
    ports: Vec<EndpointPort>,
    family: IpFamily,
    opts: &MirrorOptions,
) -> EndpointSlice {
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    let mut labels = endpoints.metadata.labels.clone().unwrap_or_default();
    labels.insert(LABEL_SERVICE_NAME.to_owned(), name.clone());
    labels.insert(LABEL_MANAGED_BY.to_owned(), opts.managed_by.clone());
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: endpoints.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(mirrored_annotations(endpoints)),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Endpoints".into(),
                name,
                uid: endpoints.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        address_type: family.as_str().to_owned(),
        endpoints: Some(Vec::new()),
        ports: Some(ports),
    }
}

/// Turns creates into updates of deleted slices of the same family.
fn recycle(plan: &mut MirrorPlan) {
    let mut i = 0;
    while i < plan.create.len() {
        let family = plan.create[i].address_type.clone();
        match plan.delete.iter().position(|d| d.address_type == family) {
            Some(j) => {
                let old = plan.delete.remove(j);
                let mut slice = plan.create.remove(i);
                slice.metadata.name = old.metadata.name;
                slice.metadata.generate_name = None;
                slice.metadata.resource_version = old.metadata.resource_version;
                plan.update.push(slice);
            }
            None => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointPort as CorePort, EndpointSubset, ObjectReference};

    fn opts() -> MirrorOptions {
        MirrorOptions {
            max_endpoints_per_subset: 1000,
            managed_by: "endpointslicemirroring-controller.k8s.io".into(),
        }
    }

    fn endpoints(subsets: Vec<EndpointSubset>) -> Endpoints {
        Endpoints {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("ext".into()),
                uid: Some("ep-uid".into()),
                labels: Some([("team".to_owned(), "a".to_owned())].into()),
                annotations: Some(
                    [
                        ("note".to_owned(), "x".to_owned()),
                        (ANNOTATION_LAST_APPLIED.to_owned(), "{}".to_owned()),
                        (ANNOTATION_LAST_CHANGE_TRIGGER_TIME.to_owned(), "t".to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            subsets: Some(subsets),
        }
    }

    fn subset(ready: &[&str], not_ready: &[&str], port: i32) -> EndpointSubset {
        let addr = |ip: &&str| EndpointAddress {
            ip: (*ip).into(),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(format!("p-{ip}")),
                ..Default::default()
            }),
            ..Default::default()
        };
        EndpointSubset {
            addresses: Some(ready.iter().map(addr).collect()),
            not_ready_addresses: Some(not_ready.iter().map(addr).collect()),
            ports: Some(vec![CorePort {
                name: Some("http".into()),
                port,
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        }
    }

    /// Applies a plan as the apiserver would.
    fn apply(existing: &mut Vec<EndpointSlice>, plan: &MirrorPlan, n: &mut usize) {
        for d in &plan.delete {
            existing.retain(|s| s.metadata.name != d.metadata.name);
        }
        for u in &plan.update {
            let i = existing
                .iter()
                .position(|s| s.metadata.name == u.metadata.name)
                .unwrap();
            assert_eq!(existing[i].metadata.resource_version, u.metadata.resource_version);
            *n += 1;
            existing[i] = u.clone();
            existing[i].metadata.resource_version = Some(n.to_string());
        }
        for c in &plan.create {
            *n += 1;
            let mut c = c.clone();
            c.metadata.name = Some(format!("ext-{n}"));
            c.metadata.resource_version = Some(n.to_string());
            existing.push(c);
        }
    }

    #[test]
    fn mirrors_per_family_and_port_set_and_resyncs_quietly() {
        let ep = endpoints(vec![
            subset(&["10.0.0.1", "fd00::1"], &["10.0.0.2"], 80),
            subset(&["10.0.0.3"], &[], 81),
        ]);
        let plan = plan_mirror(&ep, &[], &HashSet::new(), &opts());
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (3, 0, 0)
        );
        let v4_80 = plan
            .create
            .iter()
            .find(|s| s.address_type == "IPv4" && s.ports.as_ref().unwrap()[0].port == Some(80))
            .unwrap();
        let eps = v4_80.endpoints.as_ref().unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[1].conditions.as_ref().unwrap().ready,
            Some(false),
            "not-ready mirrored as ready=false"
        );
        assert_eq!(
            eps[0].conditions.as_ref().unwrap().serving,
            None,
            "only ready is mirrored"
        );
        let labels = v4_80.metadata.labels.clone().unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(labels.get(LABEL_SERVICE_NAME).map(String::as_str), Some("ext"));
        let annotations = v4_80.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["note"],
            "trigger time and last-applied are not copied"
        );
        assert_eq!(
            v4_80.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Endpoints"
        );

        let mut existing = Vec::new();
        let mut n = 0;
        apply(&mut existing, &plan, &mut n);
        assert_eq!(plan_mirror(&ep, &existing, &HashSet::new(), &opts()).writes(), 0);
    }

    #[test]
    fn each_forbidden_kind_is_skipped_and_reported() {
        let cluster_ips: HashSet<IpAddr> = ["10.96.0.10".parse().unwrap()].into();
        let bad = [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "169.254.1.1",
            "224.0.0.5",
            "fe80::1",
            "fe80::abcd:1",
            "0.0.0.0",
            "::",
            "ff02::1",
            "10.96.0.10",
        ];
        let mut all: Vec<&str> = bad.to_vec();
        all.push("10.0.0.1");
        let ep = endpoints(vec![subset(&all, &[], 80)]);
        let plan = plan_mirror(&ep, &[], &cluster_ips, &opts());
        let mut kinds: Vec<Forbidden> = plan.forbidden.iter().map(|(_, k)| *k).collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(
            kinds,
            [
                Forbidden::Unspecified,
                Forbidden::Loopback,
                Forbidden::LinkLocal,
                Forbidden::LinkLocalMulticast,
                Forbidden::ClusterIp
            ]
        );
        assert_eq!(plan.forbidden.len(), bad.len());
        let mirrored: Vec<String> = plan
            .create
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .flat_map(|e| e.addresses.clone())
            .collect();
        assert_eq!(mirrored, ["10.0.0.1"]);
        for ok in ["10.0.0.1", "224.0.1.1", "fec0::1", "2001:db8::1", "ff05::2"] {
            assert_eq!(forbidden(&ok.parse().unwrap(), &cluster_ips), None, "{ok}");
        }
    }

    #[test]
    fn invalid_and_over_capacity_addresses_are_counted() {
        let many: Vec<String> = (0..1200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let mut refs: Vec<&str> = many.iter().map(String::as_str).collect();
        refs.push("not-an-ip");
        let ep = endpoints(vec![subset(&refs, &[], 80)]);
        let plan = plan_mirror(
            &ep,
            &[],
            &HashSet::new(),
            &MirrorOptions {
                max_endpoints_per_subset: 1000,
                ..opts()
            },
        );
        assert_eq!(plan.create.len(), 1);
        assert_eq!(plan.create[0].endpoints.as_ref().unwrap().len(), 1000);
        assert_eq!(plan.over_capacity + plan.invalid, 201);
    }

    #[test]
    fn changes_rewrite_the_first_slice_and_drop_extras() {
        let ep = endpoints(vec![subset(&["10.0.0.1", "10.0.0.2"], &[], 80)]);
        let mut existing = Vec::new();
        let mut n = 0;
        apply(
            &mut existing,
            &plan_mirror(&ep, &[], &HashSet::new(), &opts()),
            &mut n,
        );
        // A duplicate slice of the same set (e.g. left by another writer) is removed.
        let mut extra = existing[0].clone();
        extra.metadata.name = Some("ext-zzz".into());
        existing.push(extra);
        let ep2 = endpoints(vec![subset(&["10.0.0.1"], &["10.0.0.2"], 80)]);
        let plan = plan_mirror(&ep2, &existing, &HashSet::new(), &opts());
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 1)
        );
        assert_eq!(plan.updated, 1);
        assert_eq!(plan.delete[0].metadata.name.as_deref(), Some("ext-zzz"));
        apply(&mut existing, &plan, &mut n);
        assert_eq!(plan_mirror(&ep2, &existing, &HashSet::new(), &opts()).writes(), 0);

        // A port change: the old set's slice is recycled for the new set (one update).
        let ep3 = endpoints(vec![subset(&["10.0.0.1"], &["10.0.0.2"], 8080)]);
        let plan = plan_mirror(&ep3, &existing, &HashSet::new(), &opts());
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );

        // Label changes on the Endpoints propagate.
        let mut relabelled = ep2.clone();
        relabelled.metadata.labels = Some([("team".to_owned(), "b".to_owned())].into());
        assert_eq!(
            plan_mirror(&relabelled, &existing, &HashSet::new(), &opts())
                .update
                .len(),
            1
        );

        // Nothing left to mirror: the slices go.
        let empty = endpoints(vec![]);
        let plan = plan_mirror(&empty, &existing, &HashSet::new(), &opts());
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 0, 1)
        );
    }

    #[test]
    fn a_recreated_endpoints_object_rebuilds_its_slices() {
        let ep = endpoints(vec![subset(&["10.0.0.1"], &[], 80)]);
        let mut existing = Vec::new();
        let mut n = 0;
        apply(
            &mut existing,
            &plan_mirror(&ep, &[], &HashSet::new(), &opts()),
            &mut n,
        );
        let mut recreated = ep.clone();
        recreated.metadata.uid = Some("ep-uid-2".into());
        let plan = plan_mirror(&recreated, &existing, &HashSet::new(), &opts());
        assert_eq!(plan.update.len(), 1);
        assert_eq!(
            plan.update[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            "ep-uid-2"
        );
    }
}
