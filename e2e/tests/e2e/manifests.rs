//! The shipped manifests are accepted by the real apiserver as they are.

use svcplane_e2e::{control_plane, repo_root};

#[tokio::test]
async fn controller_manager_manifests_apply_server_side() {
    let cp = control_plane();
    let out = cp
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=svcplane-e2e",
            "-f",
        ])
        .arg(repo_root().join("manifests/controller-manager"))
        .arg("-f")
        .arg(repo_root().join("manifests/crds"))
        .arg("-f")
        .arg(repo_root().join("manifests/allocation/webhook.yaml"))
        .arg("-f")
        .arg(repo_root().join("manifests/dataplane"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for object in [
        "serviceaccount/svcplane-controller-manager",
        "role.rbac.authorization.k8s.io/svcplane-controller-manager:leader-election",
        "rolebinding.rbac.authorization.k8s.io/svcplane-controller-manager:leader-election",
        "clusterrole.rbac.authorization.k8s.io/svcplane:controller-manager",
        "clusterrolebinding.rbac.authorization.k8s.io/svcplane:controller-manager",
        "deployment.apps/svcplane-controller-manager",
        "service/svcplane-controller-manager-metrics",
        "poddisruptionbudget.policy/svcplane-controller-manager",
        "service/svcplane-webhook",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/svcplane",
        "role.rbac.authorization.k8s.io/svcplane-controller-manager:webhook-certificate",
        "customresourcedefinition.apiextensions.k8s.io/servicepools.svcplane.io",
        "serviceaccount/svcplane-dataplane",
        "clusterrole.rbac.authorization.k8s.io/svcplane:dataplane",
        "clusterrolebinding.rbac.authorization.k8s.io/svcplane:dataplane",
        "daemonset.apps/svcplane-dataplane",
    ] {
        assert!(
            stdout.contains(&format!("{object} serverside-applied (server dry run)")),
            "{object} missing from:\n{stdout}"
        );
    }
}
