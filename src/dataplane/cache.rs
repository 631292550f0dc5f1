//! What the agent's informers keep: each Service and EndpointSlice already reduced (with what was
//! wrong in it), so a sync only assembles values.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use svcplane_controllers::runtime::informer::Versioned;
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
