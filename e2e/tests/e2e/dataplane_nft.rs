//! The node agent in nftables mode on this machine's kernel: it runs inside a node network
//! namespace, reads Services and EndpointSlices from the real apiserver, and real HTTP from a
//! client namespace reaches backends in their own namespaces through it.

use std::{collections::BTreeMap, io::Write, time::Duration};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use svcplane_dataplane::nft::Shards;
use svcplane_e2e::{
    control_plane, eventually,
    netns::{CLIENT_IP, NODE_IP, Topology},
    svcplane_bin, test_namespace,
};

const NODE: &str = "node-a";

/// The slice of Service `web`: backends `(index, node)`.
fn slice(ns: &str, backends: &[(usize, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = backends
        .iter()
        .map(|(i, node)| {
            json!({"addresses": [Topology::backend_ip(*i)], "nodeName": node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": ns, "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "e2e.svcplane.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn cluster_ip_of(svc: &Service) -> String {
    svc.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
}

/// Which backends answer `n` requests to `url` (by index), with counts.
async fn spread(topo: &Topology, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = topo.curl_outcome(url).await.unwrap_or_else(|failed| failed);
        *seen.entry(who).or_default() += 1;
    }
    seen
}

fn names(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

/// A test namespace (named from `prefix`), its directory, and client, node and three backend
/// network namespaces that reach the shared apiserver.
async fn node_with_backends(prefix: &str) -> (kube::Client, String, std::path::PathBuf, Topology) {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = test_namespace(&client, prefix).await;
    let dir = cp.dir.join(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let netns_prefix = format!("sp{:04x}", rand::random::<u16>());
    let mut topo = Topology::create(&netns_prefix, 3, &dir).await;
    topo.bridge_apiserver(cp.apiserver_port).await;
    topo.wait_for_backends().await;
    (client, ns, dir, topo)
}

/// Starts the agent in the node namespace as `node`, with the shipped RBAC's ServiceAccount
/// (applied by the caller) and `extra` flags; its pid and log.
async fn start_agent(
    topo: &mut Topology,
    client: &kube::Client,
    ns: &str,
    dir: &std::path::Path,
    node: &str,
    extra: &[&str],
) -> (u32, std::path::PathBuf) {
    let kubeconfig = control_plane()
        .service_account_kubeconfig(client, ns, "svcplane-dataplane", None, &dir.join("sa.kubeconfig"))
        .await;
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let log = dir.join("dataplane.log");
    let mut args = vec![
        "dataplane",
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        node,
        "--http-bind-address",
        "127.0.0.1:10256",
    ];
    args.extend_from_slice(extra);
    let pid = topo.spawn_in(
        "n",
        &svcplane_bin(),
        &args,
        &log,
        &[("RUST_LOG", "info,svcplane=debug")],
    );
    (pid, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_mode_balances_real_traffic_and_follows_changes() {
    let cp = control_plane();
    let (client, ns, dir, mut topo) = node_with_backends("dp").await;

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let web = services.create(&PostParams::default(), &web).await.unwrap();
    let spec = web.spec.unwrap();
    let cluster_ip = spec.cluster_ip.unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    slices
        .create(
            &PostParams::default(),
            &slice(&ns, &[(1, NODE), (2, NODE), (3, "node-b")]),
        )
        .await
        .unwrap();
    let empty: Service = serde_json::from_value(json!({
        "metadata": {"name": "empty"},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    let empty_ip = cluster_ip_of(&services.create(&PostParams::default(), &empty).await.unwrap());

    // The agent acts with exactly the shipped RBAC.
    cp.apply_dataplane_rbac(&ns);
    // A Service with 100 ports (and no endpoints): 100 reject entries, nothing else disturbed.
    let ports: Vec<_> = (0..100)
        .map(|i| json!({"name": format!("p{i}"), "port": 1000 + i, "protocol": "TCP"}))
        .collect();
    let many: Service =
        serde_json::from_value(json!({"metadata": {"name": "many"}, "spec": {"ports": ports}})).unwrap();
    let many_ip = cluster_ip_of(&services.create(&PostParams::default(), &many).await.unwrap());

    let (agent, log) = start_agent(&mut topo, &client, &ns, &dir, NODE, &["--sync-period", "2s"]).await;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // ClusterIP: every ready backend answers.
    let vip = format!("http://{cluster_ip}/");
    eventually(Duration::from_secs(30), "the cluster IP to answer", || async {
        topo.curl(&vip).await
    })
    .await;
    let seen = spread(&topo, &vip, 40).await;
    assert_eq!(names(&seen), ["backend-1", "backend-2", "backend-3"], "{seen:?}");
    // This kernel has no IPVS: auto mode says so and uses nftables.
    assert!(
        read_log().contains("nftables mode: no IPVS on this node"),
        "{}",
        read_log()
    );

    // Someone deletes the table holding the Service (its shard, at the default shard count):
    // the agent notices and rebuilds it.
    let shard = Shards::default().of_service(&ns, "web").to_string();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.ns("n"),
            "nft",
            "delete",
            "table",
            "ip",
            &shard,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(topo.curl(&vip).await, None, "traffic flowed without the table");
    eventually(Duration::from_secs(15), "the table to be rebuilt", || async {
        topo.curl(&vip).await
    })
    .await;
    // Either the periodic check found the table gone, or (in this busy shared cluster) a change
    // came first, its batch failed on the missing table, and the retry rebuilt it. The check
    // logs once it has read every table, which may be after the rebuilt one carries traffic.
    logged(&log, &[&["changed by someone else"], &["sync failed"]]).await;

    // Someone puts a rule of their own at the top of the Service's chain (nft's JSON: its
    // syntax cannot name svcplane's chains): the agent puts the chain back.
    let chain = format!("svc-{ns}/web/tcp/http");
    let edit = json!({"nftables": [{"insert": {"rule": {
        "family": "ip", "table": shard, "chain": chain, "expr": [{"drop": null}],
    }}}]});
    let mut nft = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.ns("n"), "nft", "-j", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(edit.to_string().as_bytes())
        .unwrap();
    let out = nft.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        topo.curl(&vip).await,
        None,
        "the rule added by hand dropped nothing"
    );
    // A sync commits after the edit and before the next check: the edit must still be found
    // (the generation after that commit is not "nothing else happened").
    let poke: Service = serde_json::from_value(json!({
        "metadata": {"name": "poke"},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &poke).await.unwrap();
    eventually(Duration::from_secs(15), "the chain to be put back", || async {
        topo.curl(&vip).await
    })
    .await;
    logged(&log, &[&["changed by someone else", &chain]]).await;

    // NodePort on the node's address, from the client: every backend (policy Cluster).
    let np = format!("http://{NODE_IP}:{node_port}/");
    let seen = spread(&topo, &np, 40).await;
    assert_eq!(names(&seen), ["backend-1", "backend-2", "backend-3"], "{seen:?}");

    // The load balancer's ingress IP (written into the status, as a cloud controller would).
    let lb_ip = "192.0.2.10";
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}});
    services
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let lb = format!("http://{lb_ip}/");
    eventually(
        Duration::from_secs(10),
        "the load-balancer IP to answer",
        || async { topo.curl(&lb).await },
    )
    .await;
    let seen = spread(&topo, &lb, 30).await;
    assert_eq!(names(&seen), ["backend-1", "backend-2", "backend-3"], "{seen:?}");

    // A Service without endpoints is refused, not left to time out.
    assert!(
        topo.refused(&format!("http://{empty_ip}/")).await,
        "no reject for {empty_ip}"
    );
    assert!(
        topo.refused(&format!("http://{many_ip}:1099/")).await,
        "no reject for {many_ip}:1099"
    );

    // Backend 3 leaves: within a second nothing reaches it.
    slices
        .replace("web-1", &PostParams::default(), &{
            let mut s = slice(&ns, &[(1, NODE), (2, NODE)]);
            s.metadata.resource_version = slices.get("web-1").await.unwrap().metadata.resource_version;
            s
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = spread(&topo, &vip, 30).await;
    assert_eq!(names(&seen), ["backend-1", "backend-2"], "{seen:?}");

    // ClientIP affinity pins the client to one backend.
    let patch = json!({"spec": {"sessionAffinity": "ClientIP"}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "affinity to be programmed", || async {
        topo.nft_list("ip")?.contains("update @aff-").then_some(())
    })
    .await;
    let seen = spread(&topo, &vip, 20).await;
    assert_eq!(
        seen.len(),
        1,
        "affinity did not pin the client: {seen:?}\n{}",
        read_log()
    );

    // externalTrafficPolicy: Local: node-port traffic reaches only this node's endpoints, while
    // the cluster IP still reaches every one.
    let patch = json!({"spec": {"sessionAffinity": "None", "externalTrafficPolicy": "Local"}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    slices
        .replace("web-1", &PostParams::default(), &{
            let mut s = slice(&ns, &[(1, NODE), (3, "node-b")]);
            s.metadata.resource_version = slices.get("web-1").await.unwrap().metadata.resource_version;
            s
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the cluster IP to reach backend 3 again",
        || async { (topo.curl(&vip).await.as_deref() == Some("backend-3")).then_some(()) },
    )
    .await;
    let seen = spread(&topo, &np, 30).await;
    assert_eq!(names(&seen), ["backend-1"], "Local policy leaked: {seen:?}");
    // The health-check node port the apiserver allocated says this node has one local endpoint.
    let hcnp = services
        .get("web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .health_check_node_port
        .unwrap();
    let health = eventually(Duration::from_secs(10), "the health-check node port", || async {
        topo.curl(&format!("http://{NODE_IP}:{hcnp}/")).await
    })
    .await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["localEndpoints"], 1, "{health}");
    assert_eq!(health["service"]["name"], "web");
    // Without a local endpoint the node says so (503, zero), so load balancers skip it.
    slices
        .replace("web-1", &PostParams::default(), &{
            let mut s = slice(&ns, &[(3, "node-b")]);
            s.metadata.resource_version = slices.get("web-1").await.unwrap().metadata.resource_version;
            s
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the health check to report no local endpoint",
        || async {
            let body = topo.curl(&format!("http://{NODE_IP}:{hcnp}/")).await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["localEndpoints"] == 0).then_some(())
        },
    )
    .await;

    // Stopping the agent leaves the rules; cleanup removes every one.
    topo.stop(agent);
    assert!(topo.nft_list("ip").is_some());
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.ns("n")])
        .arg(svcplane_bin())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(topo.nft_list("ip"), None);
    assert_eq!(topo.nft_list("ip6"), None);
}

/// A slice of `web` whose endpoints carry hints: `(backend, zones, nodes)`.
fn hinted_slice(ns: &str, node: &str, backends: &[(usize, &[&str], &[&str])]) -> EndpointSlice {
    let endpoints: Vec<_> = backends
        .iter()
        .map(|(i, zones, nodes)| {
            let mut hints = json!({});
            if !zones.is_empty() {
                hints["forZones"] = zones.iter().map(|z| json!({"name": z})).collect();
            }
            if !nodes.is_empty() {
                hints["forNodes"] = nodes.iter().map(|n| json!({"name": n})).collect();
            }
            json!({"addresses": [Topology::backend_ip(*i)], "nodeName": node, "hints": hints,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let mut s = slice(ns, &[]);
    s.endpoints = serde_json::from_value(json!(endpoints)).unwrap();
    s
}

/// Which backends answer when node `topo`'s client asks `vip`, when it is exactly `want`.
async fn only(topo: &Topology, vip: &str, want: &[&str]) -> Option<()> {
    let seen = spread(topo, vip, 24).await;
    (names(&seen) == want).then_some(())
}

/// Topology-aware routing as kube-proxy does it, on two nodes in two zones (a node namespace
/// each, with its own client and copies of the backends, and an agent at the default sync
/// period): each agent follows its Node's zone label and the hints on the endpoints, and
/// ignores hints that would leave it without a usable endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_keep_traffic_in_the_nodes_zone_or_on_the_node_and_fall_back_when_incomplete() {
    let cp = control_plane();
    let (client, ns, dir, mut topo_a) = node_with_backends("topo").await;
    let dir_b = dir.join("node-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut topo_b = Topology::create(&format!("sp{:04x}", rand::random::<u16>()), 3, &dir_b).await;
    topo_b.bridge_apiserver(cp.apiserver_port).await;
    topo_b.wait_for_backends().await;

    // The agents' Nodes, in zone-a and zone-b (Nodes are cluster-wide: names of this test's own).
    let (node_a, node_b) = (format!("{ns}-node-a"), format!("{ns}-node-b"));
    let nodes: Api<Node> = Api::all(client.clone());
    for (name, zone) in [(&node_a, "zone-a"), (&node_b, "zone-b")] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"topology.kubernetes.io/zone": zone}}}))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"trafficDistribution": "PreferSameZone",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let vip = format!(
        "http://{}/",
        cluster_ip_of(&services.create(&PostParams::default(), &web).await.unwrap())
    );
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    // Backend 1 in zone-a, backends 2 and 3 in zone-b.
    slices
        .create(
            &PostParams::default(),
            &hinted_slice(
                &ns,
                "elsewhere",
                &[
                    (1, &["zone-a"], &[]),
                    (2, &["zone-b"], &[]),
                    (3, &["zone-b"], &[]),
                ],
            ),
        )
        .await
        .unwrap();

    cp.apply_dataplane_rbac(&ns);
    // At the default sync period.
    let (agent_a, log_a) = start_agent(&mut topo_a, &client, &ns, &dir, &node_a, &[]).await;
    let (agent_b, log_b) = start_agent(&mut topo_b, &client, &ns, &dir_b, &node_b, &[]).await;
    let (a, b) = (&topo_a, &topo_b);

    // Zone hints: each node its zone's endpoints.
    eventually(
        Duration::from_secs(30),
        "zone-a's endpoint only on node a",
        || only(a, &vip, &["backend-1"]),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "zone-b's endpoints only on node b",
        || only(b, &vip, &["backend-2", "backend-3"]),
    )
    .await;
    // Node a moves to zone-b: its agent follows the label.
    nodes
        .patch(
            &node_a,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "zone-b's endpoints only on node a",
        || only(a, &vip, &["backend-2", "backend-3"]),
    )
    .await;
    // One ready endpoint without a hint: hints ignored, every endpoint, on both nodes.
    let replace = |s: EndpointSlice| {
        let slices = slices.clone();
        async move {
            slices.replace("web-1", &PostParams::default(), &s).await.unwrap();
        }
    };
    let mut s = slices.get("web-1").await.unwrap();
    let rv = s.metadata.resource_version.take();
    let mut next = hinted_slice(
        &ns,
        "elsewhere",
        &[(1, &["zone-a"], &[]), (2, &["zone-b"], &[]), (3, &[], &[])],
    );
    next.metadata.resource_version = rv;
    replace(next).await;
    let all = ["backend-1", "backend-2", "backend-3"];
    for (topo, what) in [(a, "every endpoint on node a"), (b, "every endpoint on node b")] {
        eventually(Duration::from_secs(15), what, || only(topo, &vip, &all)).await;
    }
    // Node hints on every endpoint (PreferSameNode): each node the endpoint hinted for it.
    let mut next = hinted_slice(
        &ns,
        "elsewhere",
        &[
            (1, &["zone-a"], &[node_b.as_str()]),
            (2, &["zone-b"], &[node_a.as_str()]),
            (3, &["zone-b"], &["node-y"]),
        ],
    );
    next.metadata.resource_version = slices.get("web-1").await.unwrap().metadata.resource_version;
    replace(next).await;
    eventually(Duration::from_secs(15), "node a's endpoint only", || {
        only(a, &vip, &["backend-2"])
    })
    .await;
    eventually(Duration::from_secs(15), "node b's endpoint only", || {
        only(b, &vip, &["backend-1"])
    })
    .await;
    for log in [&log_a, &log_b] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("sync failed"), "{text}");
    }

    topo_a.stop(agent_a);
    topo_b.stop(agent_b);
    for name in [&node_a, &node_b] {
        nodes.delete(name, &Default::default()).await.unwrap();
    }
}

/// kube-proxy's `--cluster-cidr`: a client outside the cluster's Pod range reaches a cluster IP
/// masqueraded (the endpoint sees the node, so its reply comes back through the node to be
/// un-DNATed), while a Pod inside the range keeps its own address. Without the flag nobody is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_from_outside_the_pod_range_is_masqueraded_and_pods_keep_their_address() {
    let cp = control_plane();
    let (client, ns, dir, mut topo) = node_with_backends("podrange").await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let vip = cluster_ip_of(&services.create(&PostParams::default(), &web).await.unwrap());
    // Backend 2 serves; backend 1 is a Pod calling the Service.
    Api::<EndpointSlice>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &slice(&ns, &[(2, "elsewhere")]))
        .await
        .unwrap();
    cp.apply_dataplane_rbac(&ns);
    let url = format!("http://{vip}/cgi-bin/client");
    // No range given: the client's own address reaches the endpoint.
    let (agent, _) = start_agent(&mut topo, &client, &ns, &dir, NODE, &[]).await;
    seen(&topo, "c", &url, CLIENT_IP).await;
    topo.stop(agent);

    // Backends 1 and 2 are inside the range, the client is not.
    let range = ["--cluster-cidr=10.200.2.0/23"];
    let (agent, log) = start_agent(&mut topo, &client, &ns, &dir, NODE, &range).await;
    seen(&topo, "c", &url, NODE_IP).await;
    seen(&topo, "b1", &url, &Topology::backend_ip(1)).await;
    let listed = topo.nft_list("ip").unwrap();
    assert!(
        listed.contains("ip saddr != 10.200.2.0/23 meta mark set meta mark | 0x00004000"),
        "{listed}"
    );

    // At the default sync period (30 s), a rule someone deletes by hand comes back within it:
    // here the masquerading rule, so the client is seen as itself until the check.
    let shard = Shards::default().of_service(&ns, "web").to_string();
    let chain = format!("svc-{ns}/web/tcp/http");
    // nft's JSON: its syntax cannot name every chain svcplane makes.
    let nft = |args: &[&str], input: Option<String>| {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &topo.ns("n"), "nft"]).args(args);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(text) = input {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed: serde_json::Value =
        serde_json::from_str(&nft(&["-j", "-a", "list", "table", "ip", &shard], None)).unwrap();
    let handle = listed["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["chain"] == chain.as_str() && r["expr"].to_string().contains("10.200.2.0"))
        .and_then(|r| r["handle"].as_u64())
        .unwrap_or_else(|| panic!("no masquerading rule in {listed}"));
    let delete = json!({"nftables": [{"delete": {"rule": {
        "family": "ip", "table": shard, "chain": chain, "handle": handle}}}]});
    nft(&["-j", "-f", "-"], Some(delete.to_string()));
    let deleted = std::time::Instant::now();
    assert_eq!(
        topo.curl_in("c", &url).await.as_deref(),
        Some(CLIENT_IP),
        "the rule was not deleted"
    );
    seen_within(&topo, "c", &url, NODE_IP, Duration::from_secs(45), Some(&log)).await;
    eprintln!(
        "the deleted rule was put back {:?} after the edit",
        deleted.elapsed()
    );
    logged(&log, &[&["changed by someone else", &chain]]).await;
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log.contains("sync failed"), "{log}");
    topo.stop(agent);
}

/// Waits until a request from namespace `from` to `url` reports `want` as its source address.
async fn seen(topo: &Topology, from: &str, url: &str, want: &str) {
    seen_within(topo, from, url, want, Duration::from_secs(30), None).await;
}

/// As [`seen`], within `limit`; on failure the agent's `log` and the node's ruleset are shown.
async fn seen_within(
    topo: &Topology,
    from: &str,
    url: &str,
    want: &str,
    limit: Duration,
    log: Option<&std::path::Path>,
) {
    let deadline = std::time::Instant::now() + limit;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = topo.curl_in(from, url).await;
        if last.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = log
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .unwrap_or_default();
    let rules = topo.nft_list("ip").unwrap_or_default();
    panic!(
        "{from}'s requests to {url} should be seen from {want} within {limit:?}; the last answer: {last:?}\n{log}\n{rules}"
    );
}

/// Waits until one line of the agent's `log` holds every part of one of `lines` (the agent
/// logs a repair once its whole check is done, which may be after traffic flows again);
/// panics with the log after 10 s.
async fn logged(log: &std::path::Path, lines: &[&[&str]]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .any(|l| lines.iter().any(|parts| parts.iter().all(|p| l.contains(p))))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing like {lines:?} logged within 10 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
