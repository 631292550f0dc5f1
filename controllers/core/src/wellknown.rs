//! Labels, annotations and defaults whose names Kubernetes fixes: svcplane reads and writes them
//! exactly as upstream's components do.

/// Label on every EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming the controller that manages an EndpointSlice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Label on endpoint objects of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// KEP-4770: the Service label that hands its endpoints to a named controller.
pub const LABEL_ENDPOINT_CONTROLLER_NAME: &str = "service.kubernetes.io/endpoint-controller-name";
/// When the change that led to this endpoint object happened (kube-proxy's latency SLI).
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Topology Aware Hints switch, and its deprecated spelling that wins when both are set.
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// Endpoints objects carrying it are leader-election locks of old components: never mirrored,
/// never deleted.
pub const ANNOTATION_LEADER: &str = "control-plane.alpha.kubernetes.io/leader";
/// Node label carrying its zone.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// Protocol of a port whose protocol is unset (the apiserver defaults it to TCP).
pub const DEFAULT_PROTOCOL: &str = "TCP";
