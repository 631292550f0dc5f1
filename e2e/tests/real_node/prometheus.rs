//! A real Prometheus (built from its Go module: Debian's has no Kubernetes discovery) in the cluster, configured with svcplane's shipped scrape job
//! (manifests/monitoring/prometheus/scrape-configs.yaml) and rules, queried for what users'
//! dashboards and alerts rely on.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use serde_json::Value;
use svcplane_e2e::{cluster::Cluster, eventually, repo_root};

fn monitoring(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("manifests/monitoring").join(file)).unwrap()
}

/// Prometheus's configuration: a scrape and evaluation interval for a test, the shipped rules
/// file, and the shipped scrape job verbatim.
fn config() -> String {
    format!(
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nrule_files:\n- /etc/prometheus/svcplane.rules.yaml\n{}",
        monitoring("prometheus/scrape-configs.yaml")
    )
}

pub async fn deploy(cluster: &Cluster) {
    let fixture = repo_root().join("e2e/tests/real_node/prometheus.yaml");
    cluster.kubectl_ok(&["apply", "-f", fixture.to_str().unwrap()]);
    let client = cluster.client().await;
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("prometheus".into()),
            ..Default::default()
        },
        data: Some(
            [
                ("prometheus.yml".to_owned(), config()),
                (
                    "svcplane.rules.yaml".to_owned(),
                    monitoring("prometheus/svcplane.rules.yaml"),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client, "monitoring")
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    cluster.kubectl_ok(&[
        "-n",
        "monitoring",
        "rollout",
        "status",
        "deployment/prometheus",
        "--timeout=600s",
    ]);
}

/// GET on Prometheus's HTTP API (from the control plane's namespace, which routes to Pods);
/// `params` are URL-encoded by curl. Returns `data`.
fn api(cluster: &Cluster, path: &str, params: &[(&str, &str)]) -> Option<Value> {
    let ip = cluster.kubectl_ok(&[
        "-n",
        "monitoring",
        "get",
        "pods",
        "-l",
        "app=prometheus",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]);
    let mut curl = cluster.in_netns("curl");
    curl.args(["-sf", "-m", "10", "-G"]);
    for (k, v) in params {
        curl.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = curl
        .arg(format!("http://{}:9090{path}", ip.trim()))
        .output()
        .ok()?;
    let body: Value = serde_json::from_slice(&out.stdout).ok()?;
    (body["status"] == "success").then(|| body["data"].clone())
}

/// An instant query's samples: (labels, value).
fn query(cluster: &Cluster, promql: &str) -> Option<Vec<(Value, f64)>> {
    let data = api(cluster, "/api/v1/query", &[("query", promql)])?;
    let result = data["result"].as_array()?;
    Some(
        result
            .iter()
            .map(|s| {
                let v = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), v)
            })
            .collect(),
    )
}

fn scalar(cluster: &Cluster, promql: &str) -> Option<f64> {
    match query(cluster, promql)?.as_slice() {
        [(_, v)] => Some(*v),
        _ => None,
    }
}

/// Every PromQL expression of the shipped Grafana dashboard, with its variables set to "all".
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&monitoring("grafana/svcplane-dashboard.json")).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let promql = expr.replace("$__rate_interval", "1m").replace("$node", ".*");
            out.push((panel["title"].as_str().unwrap().to_owned(), promql));
        }
    }
    out
}

pub async fn check(cluster: &Cluster, _client: &Client) {
    // Every svcplane Pod is a healthy target: two controller-manager replicas and the agent.
    eventually(Duration::from_secs(120), "3 svcplane targets up", || async {
        let data = api(cluster, "/api/v1/targets", &[("state", "active")])?;
        let ours: Vec<&Value> = data["activeTargets"]
            .as_array()?
            .iter()
            .filter(|t| t["labels"]["job"] == "svcplane")
            .collect();
        let components: BTreeSet<&str> = ours
            .iter()
            .filter_map(|t| t["labels"]["component"].as_str())
            .collect();
        (ours.len() == 3
            && ours.iter().all(|t| t["health"] == "up")
            && components == BTreeSet::from(["controller-manager", "dataplane"]))
        .then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "exactly one leader in Prometheus",
        || async {
            (scalar(
                cluster,
                r#"sum(leader_election_master_status{name="svcplane-controller-manager"})"#,
            )? == 1.0)
                .then_some(())
        },
    )
    .await;
    for (what, promql) in [
        ("EndpointSlice changes", "sum(endpoint_slice_controller_changes)"),
        (
            "dataplane syncs",
            "sum(kubeproxy_sync_proxy_rules_duration_seconds_count)",
        ),
        (
            "webhook requests",
            "sum(svcplane_allocation_webhook_requests_total)",
        ),
        (
            "webhook allocations",
            r#"sum(svcplane_allocation_webhook_requests_total{outcome="allocated"})"#,
        ),
    ] {
        let v = eventually(Duration::from_secs(60), what, || async {
            scalar(cluster, promql)
        })
        .await;
        assert!(v > 0.0, "{what}: {promql} = {v}");
    }
    for (panel, promql) in dashboard_queries() {
        eventually(
            Duration::from_secs(60),
            &format!("data for panel '{panel}': {promql}"),
            || async { query(cluster, &promql).filter(|r| !r.is_empty()).map(|_| ()) },
        )
        .await;
    }
    // The rules load and evaluate.
    let files: BTreeSet<String> = monitoring("prometheus/svcplane.rules.yaml")
        .lines()
        .filter_map(|l| l.strip_prefix("- name: "))
        .map(str::to_owned)
        .collect();
    eventually(
        Duration::from_secs(60),
        "every rule loaded and evaluated",
        || async {
            let data = api(cluster, "/api/v1/rules", &[])?;
            let groups = data["groups"].as_array()?;
            let names: BTreeSet<String> = groups
                .iter()
                .filter_map(|g| g["name"].as_str().map(str::to_owned))
                .collect();
            let rules: Vec<&Value> = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            (names == files && rules.len() >= 10 && rules.iter().all(|r| r["health"] == "ok")).then_some(())
        },
    )
    .await;
    // On a healthy cluster the conditions of the alerts about state are false right now (most
    // alerts wait minutes before firing, so their expressions are evaluated directly). The
    // latency alerts measure speed, which on this emulated node says more about the emulation,
    // and this test moves leadership on purpose (three times), which the flapping alert counts.
    let rules: Value = serde_saphyr::from_str(&monitoring("prometheus/svcplane.rules.yaml")).unwrap();
    let mut checked = 0;
    for rule in rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        let name = rule["alert"].as_str().unwrap();
        if matches!(
            name,
            "SvcplaneWebhookSlow" | "SvcplaneNetworkProgrammingLatencyHigh" | "SvcplaneLeaderFlapping"
        ) {
            continue;
        }
        let expr = rule["expr"].as_str().unwrap();
        let samples = query(cluster, expr).unwrap_or_else(|| panic!("{name}: {expr} did not evaluate"));
        assert!(
            samples.is_empty(),
            "{name} holds on a healthy cluster: {samples:?}"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} alert conditions checked");
}
