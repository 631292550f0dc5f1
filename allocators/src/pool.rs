//! `ServicePool`: one object per allocation range, so that `kubectl get servicepools` answers "how
//! full is it" without access to etcd or to metrics. The leader keeps them current; the CRD is
//! generated from these types (`svcplane crds`).
//!
//! The pure part: what a range's usage, as read from etcd, makes of its pool object.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label on every pool svcplane manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "svcplane");

/// One range ClusterIPs or NodePorts are allocated from.
// Each printcolumn(...) repeats `type_ = ...`: distinct columns, not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "svcplane.io",
    version = "v1alpha1",
    kind = "ServicePool",
    plural = "servicepools",
    shortname = "svcpool",
    status = "ServicePoolStatus",
    doc = "A range svcplane allocates ClusterIPs or NodePorts from, with its current usage",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Range", type_ = "string", json_path = ".spec.range"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.size"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.free"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = "1"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ServicePoolSpec {
    /// What the range holds.
    #[serde(rename = "type")]
    pub type_: PoolType,
    /// The CIDR (`--service-cluster-ip-range`) or port range (`--service-node-port-range`).
    pub range: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum PoolType {
    ClusterIP,
    NodePort,
}

impl PoolType {
    fn prefix(self) -> &'static str {
        match self {
            Self::ClusterIP => "clusterip",
            Self::NodePort => "nodeport",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePoolStatus {
    // i64: the apiserver knows format int64, not uint64 (and ranges hold at most 65,536 values).
    /// Values the range can hand out.
    pub size: i64,
    /// Values marked allocated in the bitmap.
    pub allocated: i64,
    /// `size - allocated`.
    pub free: i64,
    /// Why allocation from this range is not possible, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A range's state as last read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeUsage {
    pub type_: PoolType,
    pub range: String,
    pub size: u64,
    /// `Ok(allocated)`, or why the bitmap could not be read (not initialized, corrupt, etcd
    /// unreachable).
    pub allocated: Result<u64, String>,
}

/// The default NodePort range's usage (tests of the modules that read usages, all behind `etcd`).
#[cfg(all(test, feature = "etcd"))]
pub(crate) fn node_port_usage(allocated: Result<u64, String>) -> RangeUsage {
    RangeUsage {
        type_: PoolType::NodePort,
        range: "30000-32767".into(),
        size: 2768,
        allocated,
    }
}

/// The pool object's name for a range: a DNS subdomain made of the range itself.
pub fn pool_name(type_: PoolType, range: &str) -> String {
    let body: String = range
        .chars()
        .map(|c| match c {
            '0'..='9' | 'a'..='z' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    format!("{}-{body}", type_.prefix())
}

/// What a pool's status should say. `previous` is kept for counts while the bitmap cannot be read,
/// so a passing etcd outage does not show an empty range.
pub fn desired_status(usage: &RangeUsage, previous: Option<&ServicePoolStatus>) -> ServicePoolStatus {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let size = count(usage.size);
    match &usage.allocated {
        Ok(allocated) => ServicePoolStatus {
            size,
            allocated: count(*allocated),
            free: size - count(*allocated),
            message: None,
        },
        Err(why) => {
            let (allocated, free) = previous.map_or((0, size), |p| (p.allocated, p.free));
            ServicePoolStatus {
                size,
                allocated,
                free,
                message: Some(why.clone()),
            }
        }
    }
}

/// The pool object for a range (spec and labels; status is written separately).
pub fn desired_pool(usage: &RangeUsage) -> ServicePool {
    let mut pool = ServicePool::new(
        &pool_name(usage.type_, &usage.range),
        ServicePoolSpec {
            type_: usage.type_,
            range: usage.range.clone(),
        },
    );
    pool.metadata.labels = Some([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into());
    pool
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    fn usage(allocated: Result<u64, String>) -> RangeUsage {
        RangeUsage {
            type_: PoolType::ClusterIP,
            range: "10.96.0.0/16".into(),
            size: 65534,
            allocated,
        }
    }

    #[test]
    fn names_are_dns_subdomains_made_of_the_range() {
        assert_eq!(
            pool_name(PoolType::ClusterIP, "10.96.0.0/16"),
            "clusterip-10-96-0-0-16"
        );
        assert_eq!(
            pool_name(PoolType::ClusterIP, "FD00:10:96::/112"),
            "clusterip-fd00-10-96---112"
        );
        assert_eq!(
            pool_name(PoolType::NodePort, "30000-32767"),
            "nodeport-30000-32767"
        );
    }

    #[test]
    fn status_counts_free_from_size_and_allocated() {
        let s = desired_status(&usage(Ok(10)), None);
        assert_eq!((s.size, s.allocated, s.free, s.message), (65534, 10, 65524, None));
    }

    #[test]
    fn an_unreadable_bitmap_keeps_the_last_counts_and_says_why() {
        let before = desired_status(&usage(Ok(7)), None);
        let s = desired_status(&usage(Err("etcd is unreachable".into())), Some(&before));
        assert_eq!((s.allocated, s.free), (7, 65527));
        assert_eq!(s.message.as_deref(), Some("etcd is unreachable"));
        let fresh = desired_status(&usage(Err("not initialized".into())), None);
        assert_eq!((fresh.allocated, fresh.free), (0, 65534));
    }

    #[test]
    fn the_crd_is_cluster_scoped_with_status_and_columns() {
        let crd = ServicePool::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Type", "Range", "Size", "Allocated", "Free", "Message", "Age"]
        );
    }
}
