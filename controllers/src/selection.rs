//! Which Services svcplane's endpoint controllers act on, and under which managed-by values.
//!
//! Drop-in mode (the default) writes upstream's managed-by values, so replacing
//! kube-controller-manager's controllers with svcplane's churns nothing. Coexistence mode
//! implements KEP-4770, which upstream has not: svcplane handles only Services labelled
//! `service.kubernetes.io/endpoint-controller-name=<its name>` and writes managed-by values of
//! its own, so a cluster can move Service by Service while upstream keeps the rest.

use crate::model::{LABEL_ENDPOINT_CONTROLLER_NAME, ServiceView};

pub const UPSTREAM_SLICE_MANAGER: &str = "endpointslice-controller.k8s.io";
pub const UPSTREAM_MIRRORING_MANAGER: &str = "endpointslicemirroring-controller.k8s.io";
pub const DEFAULT_CONTROLLER_NAME: &str = "svcplane";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSelection {
    pub coexistence: bool,
    /// The value of `service.kubernetes.io/endpoint-controller-name` that names svcplane.
    pub controller_name: String,
}

impl Default for ServiceSelection {
    fn default() -> Self {
        Self {
            coexistence: false,
            controller_name: DEFAULT_CONTROLLER_NAME.to_owned(),
        }
    }
}

impl ServiceSelection {
    /// In drop-in mode every Service not handed to another controller by the label; in
    /// coexistence mode only those handed to svcplane.
    pub fn handles(&self, svc: &ServiceView) -> bool {
        match svc.labels.get(LABEL_ENDPOINT_CONTROLLER_NAME) {
            Some(name) => *name == self.controller_name,
            None => !self.coexistence,
        }
    }

    pub fn slice_manager(&self) -> String {
        if self.coexistence {
            format!("endpointslice-controller.{}.io", self.controller_name)
        } else {
            UPSTREAM_SLICE_MANAGER.to_owned()
        }
    }

    pub fn mirroring_manager(&self) -> String {
        if self.coexistence {
            format!("endpointslicemirroring-controller.{}.io", self.controller_name)
        } else {
            UPSTREAM_MIRRORING_MANAGER.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(label: Option<&str>) -> ServiceView {
        let mut s = ServiceView::default();
        if let Some(l) = label {
            s.labels.insert(LABEL_ENDPOINT_CONTROLLER_NAME.into(), l.into());
        }
        s
    }

    #[test]
    fn drop_in_handles_all_but_services_handed_elsewhere() {
        let sel = ServiceSelection::default();
        assert!(sel.handles(&svc(None)));
        assert!(sel.handles(&svc(Some("svcplane"))));
        assert!(!sel.handles(&svc(Some("cilium"))));
        assert_eq!(sel.slice_manager(), "endpointslice-controller.k8s.io");
        assert_eq!(
            sel.mirroring_manager(),
            "endpointslicemirroring-controller.k8s.io"
        );
    }

    #[test]
    fn coexistence_handles_only_labelled_services() {
        let sel = ServiceSelection {
            coexistence: true,
            ..Default::default()
        };
        assert!(!sel.handles(&svc(None)));
        assert!(sel.handles(&svc(Some("svcplane"))));
        assert!(!sel.handles(&svc(Some("other"))));
        assert_eq!(sel.slice_manager(), "endpointslice-controller.svcplane.io");
    }
}
