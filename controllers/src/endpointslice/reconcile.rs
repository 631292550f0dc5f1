//! The EndpointSlice reconciler as a pure function: from a Service, the Pods it selects, the Nodes
//! they run on and the slices that exist, to the creates, updates and deletes that make the
//! slices right with as few writes as upstream's controller makes (and no write when nothing
//! changed).
//!
//! The packing follows upstream's reconciler so that both controllers, given the same objects,
//! make the same writes: per address family and per port set, endpoints that changed are updated
//! in place; removed endpoints leave their slice (deleted when empty); new endpoints first fill the
//! slices that are being written anyway, fullest first, then one untouched slice that they fit
//! into exactly or most tightly, then new slices. Slices are never rebalanced. Where upstream
//! picks at random (map iteration), this picks deterministically: new endpoints in address
//! order, candidate slices by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::{
    api::discovery::v1::{Endpoint, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::Timestamp,
};

use svcplane_core::IpFamily;

use super::endpoint::{
    EndpointKey, PortKey, address_types, endpoint_key, endpoint_ports, endpoints_equal_beyond_key,
    pod_has_endpoint, pod_to_endpoint, port_key,
};
use crate::model::{
    ANNOTATION_LAST_CHANGE_TRIGGER_TIME, LABEL_HEADLESS, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, PodView,
    ServiceView,
};

/// Upstream's default and maximum for `--max-endpoints-per-slice` (the API allows 1000).
pub const DEFAULT_MAX_ENDPOINTS_PER_SLICE: usize = 100;
pub const MAX_MAX_ENDPOINTS_PER_SLICE: usize = 1000;

#[derive(Clone, Debug)]
pub struct SliceOptions {
    pub max_endpoints_per_slice: usize,
    /// Value of the `endpointslice.kubernetes.io/managed-by` label this controller writes.
    pub managed_by: String,
}

/// The zone of each known Node. A Pod whose Node is unknown is left out until the Node shows up
/// (unless its Service publishes not-ready addresses), as upstream does, so that an endpoint
/// never appears without its topology.
pub trait NodeZones {
    /// `None` when the Node is unknown, `Some(None)` when it has no zone label.
    fn zone_of(&self, node: &str) -> Option<Option<&str>>;
}

impl NodeZones for HashMap<String, Option<String>> {
    fn zone_of(&self, node: &str) -> Option<Option<&str>> {
        self.get(node).map(|z| z.as_deref())
    }
}

/// What to write for one Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlicePlan {
    /// New slices, named by `generateName`.
    pub create: Vec<EndpointSlice>,
    /// Whole-object replacements, each carrying the resourceVersion it was computed from.
    pub update: Vec<EndpointSlice>,
    /// Existing slices to delete.
    pub delete: Vec<EndpointSlice>,
    /// Pods left out because their Node is not known; the Service should be synced again.
    pub pods_without_node: Vec<String>,
    pub stats: PlanStats,
}

impl SlicePlan {
    pub fn writes(&self) -> usize {
        self.create.len() + self.update.len() + self.delete.len()
    }
}

/// Figures for upstream's `endpoint_slice_controller_*` metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub endpoints_added: usize,
    pub endpoints_removed: usize,
    pub endpoints_desired: usize,
    /// Slices an ideal packing needs: per port set `ceil(endpoints / max)`, and a placeholder.
    pub slices_desired: usize,
    /// Slices that exist once the plan is written.
    pub slices_after: usize,
}

/// Computes the writes that make `existing` (this controller's slices of `svc`, none pending
/// deletion) match `pods` (the Pods `svc` selects). `trigger_time` goes into the
/// last-change-trigger-time annotation of every slice written.
pub fn plan_slices(
    svc: &ServiceView,
    pods: &[&PodView],
    nodes: &dyn NodeZones,
    existing: &[EndpointSlice],
    trigger_time: Option<Timestamp>,
    opts: &SliceOptions,
) -> SlicePlan {
    let families = address_types(svc);
    let mut plan = SlicePlan::default();
    let mut by_family: BTreeMap<IpFamily, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        match IpFamily::parse(&slice.address_type).filter(|t| families.contains(t)) {
            Some(t) => by_family.entry(t).or_default().push(slice),
            None => plan.delete.push(slice.clone()),
        }
    }
    for family in families {
        let slices = by_family.remove(&family).unwrap_or_default();
        plan_family(svc, pods, nodes, &slices, family, opts, &mut plan);
    }
    for s in plan.create.iter_mut().chain(plan.update.iter_mut()) {
        set_trigger_time(s, trigger_time);
    }
    // The garbage collector deletes the slices of a Service being deleted; creating more would
    // race with it.
    if svc.deleting {
        plan.create.clear();
    }
    plan.stats.slices_after = (existing.len() + plan.create.len()).saturating_sub(plan.delete.len());
    plan
}

#[allow(clippy::too_many_arguments)]
fn plan_family(
    svc: &ServiceView,
    pods: &[&PodView],
    nodes: &dyn NodeZones,
    existing: &[&EndpointSlice],
    family: IpFamily,
    opts: &SliceOptions,
    plan: &mut SlicePlan,
) {
    let max = opts.max_endpoints_per_slice.clamp(1, MAX_MAX_ENDPOINTS_PER_SLICE);
    let mut create = Vec::new();
    let mut update = Vec::new();
    let mut delete = Vec::new();

    let mut existing_by_ports: BTreeMap<PortKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        if owned_by(slice, svc) {
            existing_by_ports
                .entry(port_key(slice.ports.as_deref().unwrap_or_default()))
                .or_default()
                .push(slice);
        } else {
            // Left over from an earlier Service of the same name.
            delete.push((*slice).clone());
        }
    }

    let mut desired: BTreeMap<PortKey, (Vec<EndpointPort>, BTreeMap<EndpointKey, Endpoint>)> =
        BTreeMap::new();
    for pod in pods.iter().filter(|p| pod_has_endpoint(p)) {
        let ports = endpoint_ports(svc, pod);
        let group = desired
            .entry(port_key(&ports))
            .or_insert_with(|| (ports, BTreeMap::new()));
        let zone = match pod.node_name.as_deref().map(|n| nodes.zone_of(n)) {
            Some(Some(zone)) => zone,
            _ if svc.publish_not_ready_addresses => None,
            _ => {
                plan.pods_without_node.push(pod.name.clone());
                continue;
            }
        };
        let ep = pod_to_endpoint(pod, zone, svc, family);
        if !ep.addresses.is_empty() {
            group.1.insert(endpoint_key(&ep), ep);
        }
    }

    for (key, (ports, endpoints)) in desired.iter_mut() {
        let slices = existing_by_ports.remove(key).unwrap_or_default();
        plan.stats.endpoints_desired += endpoints.len();
        plan.stats.slices_desired += endpoints.len().div_ceil(max);
        let out = plan_port_set(svc, &slices, endpoints, ports, family, max, opts);
        plan.stats.endpoints_added += out.added;
        plan.stats.endpoints_removed += out.removed;
        create.extend(out.create);
        update.extend(out.update);
        delete.extend(out.delete);
    }
    // Port sets no Pod serves any more.
    for slices in existing_by_ports.into_values() {
        plan.stats.endpoints_removed += slices.iter().map(|s| endpoint_count(s)).sum::<usize>();
        delete.extend(slices.into_iter().cloned());
    }

    // Every Service keeps at least one slice per family, even without endpoints, so consumers
    // can tell "no endpoints" from "not synced yet".
    if existing.len() == delete.len() && create.is_empty() {
        let placeholder = new_slice(svc, Vec::new(), family, opts);
        if delete.len() == 1 && same_placeholder(&delete[0], &placeholder) {
            delete.clear();
        } else {
            create.push(placeholder);
        }
        plan.stats.slices_desired += 1;
    }

    let unchanged: Vec<&EndpointSlice> = existing
        .iter()
        .copied()
        .filter(|s| {
            let name = s.metadata.name.as_deref();
            !update
                .iter()
                .chain(delete.iter())
                .any(|c: &EndpointSlice| c.metadata.name.as_deref() == name)
        })
        .collect();
    reconcile_hints(svc, &mut create, &mut update, &unchanged);

    recycle(svc, &mut create, &mut update, &mut delete);
    plan.create.extend(create);
    plan.update.extend(update);
    plan.delete.extend(delete);
}

struct PortSetPlan {
    create: Vec<EndpointSlice>,
    update: Vec<EndpointSlice>,
    delete: Vec<EndpointSlice>,
    added: usize,
    removed: usize,
}

enum SliceState {
    Unchanged,
    Update,
    Delete,
}

fn plan_port_set(
    svc: &ServiceView,
    existing: &[&EndpointSlice],
    desired: &mut BTreeMap<EndpointKey, Endpoint>,
    ports: &[EndpointPort],
    family: IpFamily,
    max: usize,
    opts: &SliceOptions,
) -> PortSetPlan {
    // Slices by name, in name order: the deterministic stand-in for upstream's map order.
    let mut slices: BTreeMap<String, (EndpointSlice, SliceState)> = BTreeMap::new();
    let mut removed = 0;

    // 1. Keep what is still desired (in its desired form), drop the rest.
    for slice in existing {
        let old = slice.endpoints.as_deref().unwrap_or_default();
        let mut kept = Vec::with_capacity(old.len());
        let mut changed = false;
        for ep in old {
            if let Some(want) = desired.remove(&endpoint_key(ep)) {
                changed |= !endpoints_equal_beyond_key(&want, ep);
                kept.push(want);
            }
        }
        let (labels, labels_changed) = slice_labels(slice.metadata.labels.as_ref(), svc, &opts.managed_by);
        let name = slice.metadata.name.clone().unwrap_or_default();
        let state = if changed || kept.len() != old.len() {
            removed += old.len() - kept.len();
            if kept.is_empty() {
                ((*slice).clone(), SliceState::Delete)
            } else {
                let mut s = (*slice).clone();
                s.endpoints = Some(kept);
                s.metadata.labels = Some(labels);
                (s, SliceState::Update)
            }
        } else if labels_changed {
            let mut s = (*slice).clone();
            s.metadata.labels = Some(labels);
            (s, SliceState::Update)
        } else {
            ((*slice).clone(), SliceState::Unchanged)
        };
        slices.insert(name, state);
    }
    let added = desired.len();

    // 2. Top up the slices that are written anyway, fullest first.
    if !desired.is_empty() {
        let mut updating: Vec<&mut EndpointSlice> = slices
            .values_mut()
            .filter(|(_, st)| matches!(st, SliceState::Update))
            .map(|(s, _)| s)
            .collect();
        updating.sort_by_key(|s| std::cmp::Reverse(endpoint_count(s)));
        for s in updating {
            fill(s, desired, max);
        }
    }

    // 3. Place the rest: into one untouched slice if all of it fits, else into new slices.
    let mut create = Vec::new();
    while !desired.is_empty() {
        let target = if desired.len() < max {
            slice_to_fill(&slices, desired.len(), max)
        } else {
            None
        };
        match target {
            Some(name) => {
                if let Some((s, st)) = slices.get_mut(&name) {
                    fill(s, desired, max);
                    *st = SliceState::Update;
                }
            }
            None => {
                let mut s = new_slice(svc, ports.to_vec(), family, opts);
                fill(&mut s, desired, max);
                create.push(s);
            }
        }
    }

    let mut update = Vec::new();
    let mut delete = Vec::new();
    for (s, st) in slices.into_values() {
        match st {
            SliceState::Update => update.push(s),
            SliceState::Delete => delete.push(s),
            SliceState::Unchanged => {}
        }
    }
    PortSetPlan {
        create,
        update,
        delete,
        added,
        removed,
    }
}

/// The untouched slice that the remaining `n` endpoints fit into most tightly.
fn slice_to_fill(
    slices: &BTreeMap<String, (EndpointSlice, SliceState)>,
    n: usize,
    max: usize,
) -> Option<String> {
    let mut best: Option<(usize, &String)> = None;
    for (name, (s, st)) in slices {
        if !matches!(st, SliceState::Unchanged) {
            continue;
        }
        let Some(room) = max.checked_sub(endpoint_count(s) + n) else {
            continue;
        };
        if best.is_none_or(|(r, _)| room < r) {
            best = Some((room, name));
            if room == 0 {
                break;
            }
        }
    }
    best.map(|(_, name)| name.clone())
}

fn fill(slice: &mut EndpointSlice, desired: &mut BTreeMap<EndpointKey, Endpoint>, max: usize) {
    let eps = slice.endpoints.get_or_insert_with(Vec::new);
    while eps.len() < max {
        let Some((_, ep)) = desired.pop_first() else { break };
        eps.push(ep);
    }
}

fn endpoint_count(slice: &EndpointSlice) -> usize {
    slice.endpoints.as_ref().map_or(0, Vec::len)
}

/// Turns creates into updates of slices that would otherwise be deleted (same family, same
/// Service): one write instead of two, and slice names stay stable.
fn recycle(
    svc: &ServiceView,
    create: &mut Vec<EndpointSlice>,
    update: &mut Vec<EndpointSlice>,
    delete: &mut Vec<EndpointSlice>,
) {
    let mut i = 0;
    while i < delete.len() && !create.is_empty() {
        let reusable = create
            .last()
            .is_some_and(|c| c.address_type == delete[i].address_type)
            && owned_by(&delete[i], svc);
        if reusable && let Some(mut slice) = create.pop() {
            let old = delete.remove(i);
            slice.metadata.name = old.metadata.name;
            slice.metadata.generate_name = None;
            // Conditional on what we computed from: a concurrent writer makes this fail, not vanish.
            slice.metadata.resource_version = old.metadata.resource_version;
            update.push(slice);
        } else {
            i += 1;
        }
    }
}

/// `trafficDistribution` zone (and node) hints on ready endpoints, upstream's `trafficdist`
/// rules; without a close-traffic preference all hints are removed. Untouched slices are
/// rewritten only when their hints are wrong.
fn reconcile_hints(
    svc: &ServiceView,
    create: &mut [EndpointSlice],
    update: &mut Vec<EndpointSlice>,
    unchanged: &[&EndpointSlice],
) {
    // The Topology Aware Hints annotation takes precedence over the field.
    let annotation_hints = matches!(svc.topology_mode.as_deref(), Some("Auto" | "auto"));
    let mode = match svc.traffic_distribution.as_deref() {
        _ if annotation_hints => HintMode::None,
        Some("PreferClose" | "PreferSameZone") => HintMode::Zone,
        Some("PreferSameNode") => HintMode::ZoneAndNode,
        _ => HintMode::None,
    };
    for s in unchanged {
        let eps = s.endpoints.as_deref().unwrap_or_default();
        if eps.iter().any(|ep| desired_hints(ep, mode) != ep.hints) {
            update.push((*s).clone());
        }
    }
    for s in create.iter_mut().chain(update.iter_mut()) {
        for ep in s.endpoints.iter_mut().flatten() {
            ep.hints = desired_hints(ep, mode);
        }
    }
}

#[derive(Clone, Copy)]
enum HintMode {
    None,
    Zone,
    ZoneAndNode,
}

fn desired_hints(ep: &Endpoint, mode: HintMode) -> Option<EndpointHints> {
    let ready = ep.conditions.as_ref().and_then(|c| c.ready) == Some(true);
    let (zones, nodes) = match mode {
        HintMode::None => return None,
        // Hints are only given to ready endpoints; others keep what they have.
        _ if !ready => return ep.hints.clone(),
        HintMode::Zone => (ep.zone.as_ref(), None),
        HintMode::ZoneAndNode => (ep.zone.as_ref(), ep.node_name.as_ref()),
    };
    if zones.is_none() && nodes.is_none() {
        return None;
    }
    Some(EndpointHints {
        for_zones: zones.map(|z| vec![ForZone { name: z.clone() }]),
        for_nodes: nodes.map(|n| vec![ForNode { name: n.clone() }]),
    })
}

/// Labels of a slice of `svc`: the Service's labels (minus the reserved keys), the service-name,
/// managed-by and headless labels. `true` when the non-reserved labels differ from `current`.
pub fn slice_labels(
    current: Option<&BTreeMap<String, String>>,
    svc: &ServiceView,
    managed_by: &str,
) -> (BTreeMap<String, String>, bool) {
    let reserved = |k: &String| k == LABEL_SERVICE_NAME || k == LABEL_MANAGED_BY || k == LABEL_HEADLESS;
    let mut labels: BTreeMap<String, String> = svc
        .labels
        .iter()
        .filter(|(k, _)| !reserved(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let current_user: BTreeMap<&String, &String> = current
        .into_iter()
        .flatten()
        .filter(|(k, _)| !reserved(k))
        .collect();
    let changed =
        current_user.len() != labels.len() || labels.iter().any(|(k, v)| current_user.get(k) != Some(&v));
    if svc.is_headless() {
        labels.insert(LABEL_HEADLESS.to_owned(), String::new());
    }
    labels.insert(LABEL_SERVICE_NAME.to_owned(), svc.name.clone());
    labels.insert(LABEL_MANAGED_BY.to_owned(), managed_by.to_owned());
    (labels, changed)
}

pub fn owner_reference(svc: &ServiceView) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.name.clone(),
        uid: svc.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn owned_by(slice: &EndpointSlice, svc: &ServiceView) -> bool {
    slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == svc.uid && o.kind == "Service" && o.api_version == "v1")
}

fn new_slice(
    svc: &ServiceView,
    ports: Vec<EndpointPort>,
    family: IpFamily,
    opts: &SliceOptions,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", svc.name)),
            namespace: Some(svc.namespace.clone()),
            owner_references: Some(vec![owner_reference(svc)]),
            labels: Some(slice_labels(None, svc, &opts.managed_by).0),
            ..Default::default()
        },
        address_type: family.as_str().to_owned(),
        endpoints: Some(Vec::new()),
        ports: Some(ports),
    }
}

/// Upstream's placeholder comparison: an existing empty slice stands in for a new placeholder
/// when namespace, labels, owners, family, ports and endpoints agree (absent and empty lists
/// being the same).
fn same_placeholder(existing: &EndpointSlice, want: &EndpointSlice) -> bool {
    existing.metadata.namespace == want.metadata.namespace
        && existing.metadata.labels.clone().unwrap_or_default()
            == want.metadata.labels.clone().unwrap_or_default()
        && existing.metadata.owner_references.clone().unwrap_or_default()
            == want.metadata.owner_references.clone().unwrap_or_default()
        && existing.address_type == want.address_type
        && existing.endpoints.as_deref().unwrap_or_default().is_empty()
        && existing.ports.as_deref().unwrap_or_default().is_empty()
}

fn set_trigger_time(slice: &mut EndpointSlice, trigger_time: Option<Timestamp>) {
    let annotations = slice.metadata.annotations.get_or_insert_with(BTreeMap::new);
    match trigger_time {
        Some(t) => {
            annotations.insert(
                ANNOTATION_LAST_CHANGE_TRIGGER_TIME.to_owned(),
                format_trigger_time(t),
            );
        }
        None => {
            annotations.remove(ANNOTATION_LAST_CHANGE_TRIGGER_TIME);
        }
    }
}

/// RFC 3339 with nanoseconds and no trailing zeros, in UTC, as Go's `time.RFC3339Nano` prints.
pub fn format_trigger_time(t: Timestamp) -> String {
    // jiff prints the shortest exact fraction and a `Z` suffix, which is the same text.
    t.to_string()
}

/// Names of slices in a plan, for logs.
pub fn names(slices: &[EndpointSlice]) -> BTreeSet<String> {
    slices.iter().filter_map(|s| s.metadata.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NamedPort, ServicePortView, TargetPort};
    use std::collections::HashSet;

    const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

    fn opts(max: usize) -> SliceOptions {
        SliceOptions {
            max_endpoints_per_slice: max,
            managed_by: MANAGED_BY.into(),
        }
    }

    use crate::fixtures::{web_pod, web_service as svc};

    /// Pod `web-<i>` with its own address, spread over three nodes.
    fn pod(i: usize) -> PodView {
        PodView {
            uid: format!("uid-{i}"),
            node_name: Some(format!("node-{}", i % 3)),
            ..web_pod(
                &format!("web-{i}"),
                &[&format!("10.1.{}.{}", i / 250, i % 250 + 1)],
            )
        }
    }

    fn pods(n: usize) -> Vec<PodView> {
        (0..n).map(pod).collect()
    }

    fn nodes() -> HashMap<String, Option<String>> {
        (0..3)
            .map(|i| (format!("node-{i}"), Some(format!("zone-{i}"))))
            .collect()
    }

    /// The apiserver's side of a plan: creates get names and UIDs, every write a new
    /// resourceVersion and generation.
    struct World {
        slices: BTreeMap<String, EndpointSlice>,
        next: usize,
    }

    impl World {
        fn new() -> Self {
            Self {
                slices: BTreeMap::new(),
                next: 0,
            }
        }

        fn existing(&self) -> Vec<EndpointSlice> {
            self.slices.values().cloned().collect()
        }

        fn plan(&self, s: &ServiceView, pods: &[PodView], max: usize) -> SlicePlan {
            let refs: Vec<&PodView> = pods
                .iter()
                .filter(|p| s.selects(&p.labels) || p.labels.is_empty())
                .collect();
            plan_slices(s, &refs, &nodes(), &self.existing(), None, &opts(max))
        }

        fn apply(&mut self, plan: &SlicePlan) {
            for s in &plan.create {
                assert!(s.metadata.name.is_none(), "creates are named by the server");
                self.next += 1;
                let mut s = s.clone();
                let name = format!("{}{}", s.metadata.generate_name.clone().unwrap(), self.next);
                s.metadata.name = Some(name.clone());
                s.metadata.uid = Some(format!("slice-uid-{}", self.next));
                s.metadata.resource_version = Some(self.next.to_string());
                s.metadata.generation = Some(1);
                self.slices.insert(name, s);
            }
            for s in &plan.update {
                let name = s.metadata.name.clone().unwrap();
                let old = self
                    .slices
                    .get(&name)
                    .expect("update of a slice that does not exist");
                assert_eq!(
                    s.metadata.resource_version, old.metadata.resource_version,
                    "update must be conditional"
                );
                self.next += 1;
                let mut s = s.clone();
                s.metadata.resource_version = Some(self.next.to_string());
                s.metadata.generation = Some(old.metadata.generation.unwrap_or(1) + 1);
                self.slices.insert(name, s);
            }
            for s in &plan.delete {
                assert!(self.slices.remove(s.metadata.name.as_deref().unwrap()).is_some());
            }
        }

        fn converge(&mut self, s: &ServiceView, pods: &[PodView], max: usize) -> SlicePlan {
            let plan = self.plan(s, pods, max);
            self.apply(&plan);
            plan
        }

        /// Names of the Pods in the `i`-th slice (by name).
        fn members(&self, i: usize) -> Vec<String> {
            let s = self.slices.values().nth(i).unwrap();
            s.endpoints
                .iter()
                .flatten()
                .map(|e| e.target_ref.as_ref().unwrap().name.clone().unwrap())
                .collect()
        }

        fn sizes(&self) -> Vec<usize> {
            let mut v: Vec<usize> = self.slices.values().map(endpoint_count).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v
        }

        /// Every endpoint's target name, across all slices; asserts none appears twice.
        fn pod_names(&self) -> HashSet<String> {
            let mut seen = HashSet::new();
            for s in self.slices.values() {
                for ep in s.endpoints.iter().flatten() {
                    let name = ep.target_ref.as_ref().unwrap().name.clone().unwrap();
                    assert!(seen.insert(name.clone()), "{name} appears twice");
                }
            }
            seen
        }
    }

    fn counts(p: &SlicePlan) -> (usize, usize, usize) {
        (p.create.len(), p.update.len(), p.delete.len())
    }

    #[test]
    fn service_without_pods_gets_one_placeholder_and_keeps_it() {
        let mut w = World::new();
        let p = w.converge(&svc(), &[], 100);
        assert_eq!(counts(&p), (1, 0, 0));
        let s = &p.create[0];
        assert_eq!(s.endpoints.as_deref(), Some(&[][..]));
        assert_eq!(s.ports.as_deref(), Some(&[][..]));
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(p.stats.slices_desired, 1);
        assert_eq!(
            counts(&w.plan(&svc(), &[], 100)),
            (0, 0, 0),
            "the placeholder is not rewritten on resync"
        );
    }

    #[test]
    fn slices_carry_upstreams_labels_owner_and_name_prefix() {
        let mut w = World::new();
        let mut s = svc();
        s.labels.insert(LABEL_MANAGED_BY.into(), "someone-else".into());
        let p = w.converge(&s, &pods(1), 100);
        let m = &p.create[0].metadata;
        assert_eq!(m.generate_name.as_deref(), Some("web-"));
        let labels = m.labels.clone().unwrap();
        assert_eq!(labels.get(LABEL_SERVICE_NAME).map(String::as_str), Some("web"));
        assert_eq!(
            labels.get(LABEL_MANAGED_BY).map(String::as_str),
            Some(MANAGED_BY),
            "reserved keys are ours"
        );
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert!(!labels.contains_key(LABEL_HEADLESS));
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("v1", "Service", "svc-uid", Some(true), Some(true))
        );
        let ports = p.create[0].ports.clone().unwrap();
        assert_eq!(
            (
                ports[0].name.as_deref(),
                ports[0].port,
                ports[0].protocol.as_deref()
            ),
            (Some("http"), Some(8080), Some("TCP"))
        );

        let mut headless = svc();
        headless.cluster_ip = Some("None".into());
        let p = World::new().plan(&headless, &pods(1), 100);
        assert_eq!(
            p.create[0]
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .get(LABEL_HEADLESS)
                .map(String::as_str),
            Some("")
        );
    }

    #[test]
    fn packs_full_slices_and_resync_writes_nothing() {
        for (n, max, want) in [
            (250, 100, vec![100, 100, 50]),
            (1500, 100, vec![100; 15]),
            (1000, 1000, vec![1000]),
            (1001, 1000, vec![1000, 1]),
            (3, 1, vec![1, 1, 1]),
        ] {
            let mut w = World::new();
            let all = pods(n);
            let p = w.converge(&svc(), &all, max);
            assert_eq!(p.create.len(), want.len(), "n={n} max={max}");
            assert_eq!(w.sizes(), want, "n={n} max={max}");
            assert_eq!(w.pod_names().len(), n);
            assert_eq!(p.stats.endpoints_added, n);
            assert_eq!(p.stats.slices_desired, want.len());
            assert_eq!(
                counts(&w.plan(&svc(), &all, max)),
                (0, 0, 0),
                "resync of n={n} writes nothing"
            );
        }
    }

    #[test]
    fn one_pod_change_is_one_slice_write() {
        let mut w = World::new();
        let mut all = pods(250);
        w.converge(&svc(), &all, 100);

        // Readiness flips: the one slice holding the Pod is updated in place.
        all[7].ready = false;
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        let ep = p.update[0]
            .endpoints
            .iter()
            .flatten()
            .find(|e| e.addresses == [all[7].ips[0].clone()])
            .unwrap();
        let c = ep.conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(false), Some(false))
        );

        // Terminating (still serving): ready goes false, terminating true; one write.
        all[7].ready = true;
        all[7].terminating = true;
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        let ep = p.update[0]
            .endpoints
            .iter()
            .flatten()
            .find(|e| e.addresses == [all[7].ips[0].clone()])
            .unwrap();
        let c = ep.conditions.clone().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );

        // The Pod goes away: one update, the endpoint removed.
        all.remove(7);
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        assert_eq!(p.stats.endpoints_removed, 1);
        assert_eq!(w.pod_names().len(), 249);

        // A new Pod goes into the slice with room for it.
        all.push(pod(900));
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        assert_eq!(
            w.sizes(),
            [100, 100, 50],
            "filled the hole left by the removed Pod"
        );
        assert_eq!(counts(&w.plan(&svc(), &all, 100)), (0, 0, 0));
    }

    #[test]
    fn new_endpoints_go_to_the_tightest_untouched_slice_or_a_new_one() {
        // Two slices with room for 5 each; 10 new endpoints fit in neither: upstream creates a
        // new slice rather than writing two.
        let mut w = World::new();
        let mut all = pods(200);
        w.converge(&svc(), &all, 100);
        let gone: Vec<String> = [w.members(0)[..5].to_vec(), w.members(1)[..5].to_vec()].concat();
        all.retain(|p| !gone.contains(&p.name));
        w.converge(&svc(), &all, 100);
        assert_eq!(w.sizes(), [95, 95]);
        all.extend((1000..1010).map(pod));
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (1, 0, 0));
        assert_eq!(w.sizes(), [95, 95, 10]);

        // Four new endpoints fit in any 95-slice; exactly one is written.
        all.extend((2000..2004).map(pod));
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        assert_eq!(w.sizes(), [99, 95, 10]);
        w.pod_names();
    }

    #[test]
    fn changed_slices_are_topped_up_fullest_first() {
        let mut w = World::new();
        let mut all = pods(200);
        w.converge(&svc(), &all, 100);
        let gone = w.members(0)[..3].to_vec();
        all.retain(|p| !gone.contains(&p.name)); // three removals from one slice: it is written anyway
        all.extend((500..502).map(pod)); // two additions ride along in that write
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 1, 0));
        assert_eq!(w.sizes(), [100, 99]);
    }

    #[test]
    fn all_pods_gone_leaves_a_placeholder_recycled_from_a_slice() {
        let mut w = World::new();
        w.converge(&svc(), &pods(250), 100);
        let names: Vec<String> = w.slices.keys().cloned().collect();
        let p = w.converge(&svc(), &[], 100);
        // One slice is rewritten as the placeholder, the other two deleted: no create.
        assert_eq!(counts(&p), (0, 1, 2));
        assert!(names.contains(p.update[0].metadata.name.as_ref().unwrap()));
        assert_eq!(w.slices.len(), 1);
        assert_eq!(w.sizes(), [0]);
        assert_eq!(counts(&w.plan(&svc(), &[], 100)), (0, 0, 0));
    }

    #[test]
    fn dual_stack_services_get_slices_per_family() {
        let mut s = svc();
        s.ip_families = vec!["IPv4".into(), "IPv6".into()];
        let mut all = pods(3);
        for (i, p) in all.iter_mut().enumerate() {
            p.ips.push(format!("fd00::{}", i + 1));
        }
        all.push(PodView {
            ips: vec!["fd00::99".into()],
            ..pod(50)
        }); // single-stack IPv6 Pod
        let mut w = World::new();
        let p = w.converge(&s, &all, 100);
        let families: Vec<(String, usize)> = p
            .create
            .iter()
            .map(|s| (s.address_type.clone(), endpoint_count(s)))
            .collect();
        assert_eq!(families, [("IPv4".to_owned(), 3), ("IPv6".to_owned(), 4)]);
        assert_eq!(counts(&w.plan(&s, &all, 100)), (0, 0, 0));

        // Back to single-stack: the IPv6 slices go.
        s.ip_families = vec!["IPv4".into()];
        let p = w.converge(&s, &all, 100);
        assert_eq!(counts(&p), (0, 0, 1));
        assert_eq!(p.delete[0].address_type, "IPv6");
    }

    #[test]
    fn pods_resolving_named_ports_differently_get_separate_slices() {
        let mut s = svc();
        s.ports[0].target_port = TargetPort::Name("web".into());
        let mut all = pods(4);
        all[0].named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 8080,
        }];
        all[1].named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 8080,
        }];
        all[2].named_ports = vec![NamedPort {
            name: "web".into(),
            protocol: "TCP".into(),
            port: 9090,
        }];
        // all[3] declares no such port: it is an endpoint with no ports.
        let mut w = World::new();
        let p = w.converge(&s, &all, 100);
        let mut groups: Vec<(Vec<i32>, usize)> = p
            .create
            .iter()
            .map(|s| {
                (
                    s.ports.iter().flatten().filter_map(|p| p.port).collect(),
                    endpoint_count(s),
                )
            })
            .collect();
        groups.sort();
        assert_eq!(groups, [(vec![], 1), (vec![8080], 2), (vec![9090], 1)]);

        // One Pod changes its container port: it moves between slices (two writes).
        all[2].named_ports[0].port = 8080;
        let p = w.converge(&s, &all, 100);
        assert_eq!(p.writes(), 2, "{p:?}");
        assert_eq!(w.pod_names().len(), 4);
    }

    #[test]
    fn label_changes_on_the_service_rewrite_labels_only() {
        let mut w = World::new();
        let all = pods(150);
        w.converge(&svc(), &all, 100);
        let mut s = svc();
        s.labels.insert("team".into(), "a".into());
        let p = w.converge(&s, &all, 100);
        assert_eq!(counts(&p), (0, 2, 0));
        for u in &p.update {
            assert_eq!(
                u.metadata
                    .labels
                    .as_ref()
                    .unwrap()
                    .get("team")
                    .map(String::as_str),
                Some("a")
            );
        }
        assert_eq!(counts(&w.plan(&s, &all, 100)), (0, 0, 0));
    }

    #[test]
    fn slices_of_another_service_incarnation_are_replaced() {
        let mut w = World::new();
        w.converge(&svc(), &pods(10), 100);
        let mut recreated = svc();
        recreated.uid = "svc-uid-2".into();
        let p = w.converge(&recreated, &pods(10), 100);
        // The old slice cannot be reused (wrong owner): a create and a delete.
        assert_eq!(counts(&p), (1, 0, 1));
        assert_eq!(
            p.create[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid-2"
        );
    }

    #[test]
    fn slices_of_an_unsupported_family_are_deleted() {
        let mut w = World::new();
        w.converge(&svc(), &pods(1), 100);
        let mut stray = w.existing()[0].clone();
        stray.address_type = "FQDN".into();
        stray.metadata.name = Some("web-fqdn".into());
        w.slices.insert("web-fqdn".into(), stray);
        let p = w.converge(&svc(), &pods(1), 100);
        assert_eq!(counts(&p), (0, 0, 1));
        assert_eq!(p.delete[0].metadata.name.as_deref(), Some("web-fqdn"));
    }

    #[test]
    fn pods_on_unknown_nodes_wait_unless_not_ready_addresses_are_published() {
        let mut all = pods(3);
        all[1].node_name = Some("node-gone".into());
        all[2].node_name = None;
        let refs: Vec<&PodView> = all.iter().collect();
        let p = plan_slices(&svc(), &refs, &nodes(), &[], None, &opts(100));
        assert_eq!(p.pods_without_node, ["web-1", "web-2"]);
        assert_eq!(endpoint_count(&p.create[0]), 1);

        let mut s = svc();
        s.publish_not_ready_addresses = true;
        let p = plan_slices(&s, &refs, &nodes(), &[], None, &opts(100));
        assert!(p.pods_without_node.is_empty());
        assert_eq!(endpoint_count(&p.create[0]), 3);
        assert_eq!(p.create[0].endpoints.as_ref().unwrap()[1].zone, None);
    }

    #[test]
    fn malformed_pods_never_break_the_plan() {
        let mut all = pods(4);
        all[0].ips = vec!["garbage".into()];
        all[1].ips.clear();
        all[2].terminal = true;
        all[3].ips = vec!["10.9.9.9".into(), "10.9.9.9".into()];
        let mut s = svc();
        s.ports.push(s.ports[0].clone()); // duplicate port
        s.ports.push(ServicePortView {
            target_port: TargetPort::Name("nope".into()),
            ..s.ports[0].clone()
        });
        let refs: Vec<&PodView> = all.iter().collect();
        let p = plan_slices(&s, &refs, &nodes(), &[], None, &opts(100));
        assert_eq!(p.create.len(), 1);
        assert_eq!(endpoint_count(&p.create[0]), 1);
    }

    #[test]
    fn prefer_close_adds_zone_hints_to_ready_endpoints_and_removal_strips_them() {
        let mut w = World::new();
        let mut all = pods(4);
        all[3].ready = false;
        w.converge(&svc(), &all, 100);

        let mut s = svc();
        s.traffic_distribution = Some("PreferClose".into());
        let p = w.converge(&s, &all, 100);
        assert_eq!(counts(&p), (0, 1, 0), "existing slice gets hints");
        for ep in p.update[0].endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().unwrap().ready == Some(true);
            let zones = ep.hints.as_ref().and_then(|h| h.for_zones.clone());
            if ready {
                assert_eq!(
                    zones,
                    Some(vec![ForZone {
                        name: ep.zone.clone().unwrap()
                    }])
                );
                assert_eq!(ep.hints.as_ref().unwrap().for_nodes, None);
            } else {
                assert_eq!(zones, None);
            }
        }
        assert_eq!(counts(&w.plan(&s, &all, 100)), (0, 0, 0));

        s.traffic_distribution = Some("PreferSameNode".into());
        let p = w.converge(&s, &all, 100);
        let ep = &p.update[0].endpoints.as_ref().unwrap()[0];
        assert_eq!(
            ep.hints.as_ref().unwrap().for_nodes,
            Some(vec![ForNode {
                name: ep.node_name.clone().unwrap()
            }])
        );

        s.topology_mode = Some("Auto".into());
        let p = w.converge(&s, &all, 100);
        assert_eq!(
            counts(&p),
            (0, 1, 0),
            "the annotation takes precedence; field hints are removed"
        );
        assert!(p.update[0].endpoints.iter().flatten().all(|e| e.hints.is_none()));
    }

    #[test]
    fn slices_written_by_upstream_are_adopted_without_writes() {
        // Upstream packs the same endpoints in another order, under other names.
        let all = pods(150);
        let mut w = World::new();
        w.converge(&svc(), &all, 100);
        let mut adopted = World::new();
        for (i, mut s) in w.existing().into_iter().enumerate() {
            s.endpoints.as_mut().unwrap().reverse();
            for ep in s.endpoints.iter_mut().flatten() {
                if let Some(t) = ep.target_ref.as_mut() {
                    t.resource_version = Some("123".into());
                }
            }
            let name = format!("web-upstream{i}");
            s.metadata.name = Some(name.clone());
            adopted.slices.insert(name, s);
        }
        assert_eq!(counts(&adopted.plan(&svc(), &all, 100)), (0, 0, 0));
    }

    #[test]
    fn duplicate_endpoints_across_slices_are_removed() {
        let mut w = World::new();
        let all = pods(2);
        w.converge(&svc(), &all, 100);
        let mut dup = w.existing()[0].clone();
        dup.metadata.name = Some("web-dup".into());
        w.slices.insert("web-dup".into(), dup);
        let p = w.converge(&svc(), &all, 100);
        assert_eq!(counts(&p), (0, 0, 1));
        assert_eq!(w.pod_names().len(), 2);
    }

    #[test]
    fn a_service_being_deleted_gets_no_new_slices() {
        let mut s = svc();
        s.deleting = true;
        let p = World::new().plan(&s, &pods(3), 100);
        assert_eq!(counts(&p), (0, 0, 0));
    }

    #[test]
    fn writes_carry_the_trigger_time() {
        let t = Timestamp::from_second(1_700_000_000).unwrap()
            + k8s_openapi::jiff::SignedDuration::from_millis(120);
        let all = pods(1);
        let refs: Vec<&PodView> = all.iter().collect();
        let p = plan_slices(&svc(), &refs, &nodes(), &[], Some(t), &opts(100));
        let annotations = p.create[0].metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations
                .get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)
                .map(String::as_str),
            Some("2023-11-14T22:13:20.12Z")
        );
        let p = plan_slices(&svc(), &refs, &nodes(), &[], None, &opts(100));
        assert_eq!(
            p.create[0]
                .metadata
                .annotations
                .clone()
                .unwrap()
                .get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME),
            None
        );
    }
}
