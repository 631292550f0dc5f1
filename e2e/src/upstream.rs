//! Upstream's kube-controller-manager, built from the same Kubernetes release as the apiserver,
//! running only its endpoint controllers: the reference svcplane is compared with.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use crate::ControlPlane;

pub struct UpstreamControllers {
    child: Option<Child>,
}

impl UpstreamControllers {
    pub fn start(cp: &ControlPlane, log: &Path) -> Self {
        Self::start_with(cp, log, &[])
    }

    pub fn start_with(cp: &ControlPlane, log: &Path, extra: &[&str]) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(cp.kube_bin.join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg("--controllers=endpointslice-controller,endpoints-controller,endpointslice-mirroring-controller")
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for UpstreamControllers {
    fn drop(&mut self) {
        self.stop();
    }
}
