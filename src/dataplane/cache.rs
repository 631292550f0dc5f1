//! What the agent's informers keep: each Service and EndpointSlice already reduced (with what was
//! wrong in it), so a sync only assembles values.

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use svcplane_controllers::runtime::informer::Versioned;
use svcplane_core::wellknown::LABEL_TOPOLOGY_ZONE;
use svcplane_dataplane::input::{Problem, ServiceInfo, SliceInfo, service_info, slice_info};

/// A reduced object, the resourceVersion it came from, and the problems found in it.
#[derive(Clone, Debug)]
pub struct Cached<T> {
    pub resource_version: String,
    pub value: Option<T>,
    pub problems: Vec<Problem>,
}

impl<T: Send + Sync + 'static> Versioned for Cached<T> {
    fn resource_version(&self) -> &str {
        &self.resource_version
    }
}

pub fn cache_service(svc: Service) -> Cached<ServiceInfo> {
    let mut problems = Vec::new();
    let value = service_info(&svc, &mut problems);
    Cached {
        resource_version: svc.metadata.resource_version.unwrap_or_default(),
        value,
        problems,
    }
}

pub fn cache_slice(slice: EndpointSlice) -> Cached<SliceInfo> {
    let mut problems = Vec::new();
    let value = slice_info(&slice, &mut problems);
    Cached {
        resource_version: slice.metadata.resource_version.unwrap_or_default(),
        value,
        problems,
    }
}

/// A Node, reduced to its `topology.kubernetes.io/zone` label (an empty label is no zone).
pub fn cache_node(node: Node) -> Cached<String> {
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    Cached {
        resource_version: node.metadata.resource_version.unwrap_or_default(),
        value: zone,
        problems: Vec::new(),
    }
}
