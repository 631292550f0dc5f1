//! The shipped manifests are accepted by the real apiserver as they are, and the monitoring
//! files agree with each other and with the Pods they describe.

use svcplane_e2e::{control_plane, repo_root};

#[tokio::test]
async fn the_kustomization_applies_server_side() {
    let cp = control_plane();
    // Exactly what users apply: the kustomization (allocation patch included).
    let out = cp
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=svcplane-e2e",
            "-k",
        ])
        .arg(repo_root().join("manifests"))
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

fn yaml_documents(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn yaml(path: &str) -> serde_json::Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{path} holds one document");
    docs.remove(0)
}

#[test]
fn prometheus_rule_holds_the_rules_file() {
    let rules = yaml("manifests/monitoring/prometheus/svcplane.rules.yaml");
    let crd = yaml("manifests/monitoring/prometheusrule.yaml");
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(
        crd["spec"]["groups"], rules["groups"],
        "regenerate: {{ head -10 manifests/monitoring/prometheusrule.yaml; sed -n '/^groups:/,$p' \
         manifests/monitoring/prometheus/svcplane.rules.yaml | sed 's/^/  /'; }}"
    );
    assert!(rules["groups"].as_array().unwrap().len() >= 3);
}

/// The PodMonitor and the plain scrape job find both components' Pods and their metrics port.
#[test]
fn monitoring_selects_both_components_and_their_metrics_port() {
    let monitor = yaml("manifests/monitoring/podmonitor.yaml");
    let scrape = yaml("manifests/monitoring/prometheus/scrape-configs.yaml");
    let job = &scrape["scrape_configs"][0];
    let keep = |label: &str| {
        job["relabel_configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["action"] == "keep" && r["source_labels"][0] == label)
            .map(|r| r["regex"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no keep rule on {label}"))
    };
    let name_regex = keep("__meta_kubernetes_pod_label_app_kubernetes_io_name");
    let port_regex = keep("__meta_kubernetes_pod_container_port_name");
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert_eq!(port, port_regex);
    for (path, component) in [
        (
            "manifests/controller-manager/deployment.yaml",
            "controller-manager",
        ),
        ("manifests/dataplane/daemonset.yaml", "dataplane"),
    ] {
        let workload = yaml(path);
        let template = &workload["spec"]["template"];
        let labels = template["metadata"]["labels"].as_object().unwrap();
        for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{path}: PodMonitor selector {k}");
        }
        assert_eq!(labels["app.kubernetes.io/name"], name_regex.as_str(), "{path}");
        assert_eq!(labels["app.kubernetes.io/component"], component, "{path}");
        let ports: Vec<&str> = template["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(ports.contains(&port), "{path}: no port named {port} in {ports:?}");
    }
}

#[test]
fn dashboard_panels_query_prometheus_through_the_datasource_variable() {
    let text =
        std::fs::read_to_string(repo_root().join("manifests/monitoring/grafana/svcplane-dashboard.json"))
            .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels: Vec<&serde_json::Value> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 12);
    let mut ids = std::collections::BTreeSet::new();
    for p in &dash["panels"].as_array().unwrap()[..] {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
    }
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
            assert!(!t["expr"].as_str().unwrap().is_empty(), "panel {}", p["title"]);
        }
    }
}

/// The dataplane's mode is set in one place: both of its containers read the ConfigMap, and
/// neither passes `--mode` (the agent and its sysctl step must agree).
#[test]
fn the_dataplane_mode_is_set_once_for_both_containers() {
    let config = yaml("manifests/dataplane/configmap.yaml");
    assert_eq!(config["data"]["SVCPLANE_DATAPLANE_MODE"], "auto");
    let name = config["metadata"]["name"].as_str().unwrap();
    let ds = yaml("manifests/dataplane/daemonset.yaml");
    let spec = &ds["spec"]["template"]["spec"];
    let containers: Vec<&serde_json::Value> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["containers"].as_array().unwrap())
        .collect();
    assert_eq!(containers.len(), 2);
    for c in containers {
        let cname = c["name"].as_str().unwrap();
        let from_config = c["envFrom"]
            .as_array()
            .is_some_and(|e| e.iter().any(|r| r["configMapRef"]["name"] == name));
        assert!(from_config, "{cname} does not read ConfigMap {name}");
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            !args.iter().any(|a| a.starts_with("--mode")),
            "{cname} sets --mode itself: {args:?}"
        );
    }
}
