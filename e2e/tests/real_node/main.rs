//! svcplane as its users run it: its image loaded into a real node's containerd, the shipped
//! manifests applied with `kubectl apply -k manifests/`, real Pods behind real Services, a
//! rolling update under load, and Prometheus scraping it with the shipped scrape configuration,
//! rules and dashboard.
//!
//! The cluster (`hack/cluster-up.sh`): kube-apiserver, kube-controller-manager (without its
//! endpoint controllers), kube-scheduler and etcd in a network namespace of this host; the node a
//! qemu VM on Debian's cloud kernel (IPVS) with systemd, containerd, runc and the kubelet; CoreDNS
//! as cluster DNS; no kube-proxy. One test, in steps that build on each other, each timed.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed assertion.

mod etcd;
mod ipvs;
mod prometheus;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Pod, Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use svcplane_e2e::{
    cluster::{Cluster, NODE_IP},
    eventually, repo_root,
};

const CM_SELECTOR: &str = "app.kubernetes.io/name=svcplane,app.kubernetes.io/component=controller-manager";
const DP_SELECTOR: &str = "app.kubernetes.io/name=svcplane,app.kubernetes.io/component=dataplane";
const LEASE: &str = "svcplane-controller-manager";
/// The test node is slow (TCG emulation): waits are generous, and each step prints its time.
const SLOW: Duration = Duration::from_secs(300);

struct Clock {
    start: Instant,
    step: Instant,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            step: now,
        }
    }

    fn done(&mut self, what: &str) {
        eprintln!(
            "real-node: {what} ({:.1}s; {:.0}s into the test)",
            self.step.elapsed().as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
        self.step = Instant::now();
    }
}

/// The image `hack/image.sh` wrote (hack/test.sh builds it before the tests).
fn image_archive() -> (PathBuf, String) {
    let version = env!("CARGO_PKG_VERSION");
    let path = std::env::var_os("SVCPLANE_IMAGE").map_or_else(
        || repo_root().join(format!("target/images/svcplane-{version}.tar")),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: build the image first (hack/image.sh)",
        path.display()
    );
    (path, version.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svcplane_runs_as_users_run_it() {
    let (image, version) = image_archive();
    let cluster = Cluster::start().unwrap();
    eprintln!(
        "real-node: cluster ready after {:.0}s (boot and readiness times above)",
        cluster.ready_after.as_secs_f64()
    );
    let mut clock = Clock::new();
    let client = cluster.client().await;

    install(&cluster, &image).await;
    clock.done("svcplane loaded and applied: controller-manager 2/2 Ready, dataplane Ready");
    let holder = one_leader(&cluster, &client).await;
    clock.done(&format!("exactly one Lease holder ({holder})"));
    controller_manager_is_unprivileged(&cluster);
    clock.done("controller-manager processes: user 65532, read-only root filesystem");
    dataplane_runs_ipvs(&cluster);
    clock.done("dataplane in IPVS mode");
    prometheus::deploy(&cluster).await;
    clock.done("Prometheus scraping with the shipped scrape configuration and rules");

    leader_handover(&cluster, &client, &holder).await;
    clock.done("leader Pod deleted: handed over, Deployment back at 2/2");

    let ns = "real-node";
    let web = services_get_svcplane_values(&cluster, &client, ns).await;
    clock.done("backend Deployment and Services: values from svcplane's webhook, ServicePools agree");
    client_reaches_every_backend(&cluster, &client, ns, &web).await;
    clock.done("client Pod: Service variables, DNS name and ClusterIP reach every backend");
    node_port_answers(&cluster, &client, ns, &web).await;
    clock.done("NodePort answers on the node's address, from outside and on the node");
    scaling_is_followed(&cluster, &client, ns, &web).await;
    clock.done("scaled to 1 and back to 3: traffic followed");
    unready_backend_gets_nothing(&cluster, &client, ns, &web).await;
    clock.done("a not-ready backend got no traffic");
    ipvs::table_matches_services(&cluster, &client).await;
    clock.done("ipvsadm -Ln on the node matches the Services");

    rolling_update_under_load(&cluster, &client, &version).await;
    clock.done("rolling update while creating Services: none failed, no value held twice");

    prometheus::check(&cluster, &client).await;
    clock.done("Prometheus: one leader, counters, every dashboard query, rules loaded");
    eprintln!(
        "real-node: test done in {:.0}s after a {:.0}s cluster start",
        clock.start.elapsed().as_secs_f64(),
        cluster.ready_after.as_secs_f64()
    );
}

/// The README's steps: load the image, `kubectl apply -k manifests/`.
async fn install(cluster: &Cluster, image: &std::path::Path) {
    cluster.load(image);
    let manifests = repo_root().join("manifests");
    cluster.kubectl_ok(&["apply", "-k", manifests.to_str().unwrap()]);
    for what in [
        "deployment/svcplane-controller-manager",
        "daemonset/svcplane-dataplane",
        "deployment/coredns",
    ] {
        cluster.kubectl_ok(&["-n", "kube-system", "rollout", "status", what, "--timeout=600s"]);
    }
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// The replica's own view, from its /metrics (reached from the control plane's namespace).
fn leads(cluster: &Cluster, pod_ip: &str) -> Option<bool> {
    let out = cluster
        .in_netns("curl")
        .args(["-sf", "-m", "5", &format!("http://{pod_ip}:10267/metrics")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("leader_election_master_status{name=\"svcplane-controller-manager\"}"))?;
    Some(line.ends_with(" 1"))
}

/// Two Ready replicas; the Lease names one of them and only that one says it leads.
async fn one_leader(cluster: &Cluster, client: &Client) -> String {
    eventually(SLOW, "two ready replicas, exactly one leading", || async {
        let replicas: Vec<Pod> = pods(client, "kube-system", CM_SELECTOR)
            .await
            .into_iter()
            .filter(|p| running(p) && pod_ready(p))
            .collect();
        if replicas.len() != 2 {
            return None;
        }
        let holder = lease_holder(client).await?;
        let mut leaders = Vec::new();
        for p in &replicas {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            if leads(cluster, &ip)? {
                leaders.push(p.metadata.name.clone()?);
            }
        }
        (leaders == [holder.clone()]).then_some(holder)
    })
    .await
}

/// As the node's kernel sees them: every controller-manager process runs as 65532 on a
/// read-only root filesystem.
fn controller_manager_is_unprivileged(cluster: &Cluster) {
    let out = cluster.ssh_ok(
        "for p in $(pgrep -f '^/usr/bin/svcplane controller-manager'); do \
           echo \"$p $(stat -c %u /proc/$p) $(awk '$2 == \"/\" {split($4, o, \",\"); print o[1]}' /proc/$p/mounts)\"; done",
    );
    let procs: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(procs.len(), 2, "controller-manager processes on the node: {out}");
    for p in &procs {
        assert_eq!(
            p.get(1),
            Some(&"65532"),
            "process {} runs as uid {:?}",
            p[0],
            p.get(1)
        );
        assert_eq!(
            p.get(2),
            Some(&"ro"),
            "process {}'s root filesystem is {:?}",
            p[0],
            p.get(2)
        );
    }
}

fn dataplane_runs_ipvs(cluster: &Cluster) {
    let logs = cluster.kubectl_ok(&[
        "-n",
        "kube-system",
        "logs",
        "daemonset/svcplane-dataplane",
        "-c",
        "dataplane",
    ]);
    assert!(
        logs.contains("\"message\":\"IPVS mode\""),
        "the dataplane did not choose IPVS:\n{logs}"
    );
    let init = cluster.kubectl_ok(&[
        "-n",
        "kube-system",
        "logs",
        "daemonset/svcplane-dataplane",
        "-c",
        "sysctls",
    ]);
    assert!(
        init.contains("\"message\":\"node settings in place\"") && init.contains("\"ipvs\":true"),
        "the init container did not prepare IPVS:\n{init}"
    );
    assert_eq!(cluster.ssh_ok("cat /proc/sys/net/ipv4/vs/conntrack").trim(), "1");
}

async fn leader_handover(cluster: &Cluster, client: &Client, holder: &str) {
    let before: BTreeSet<String> = pods(client, "kube-system", CM_SELECTOR)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let deleted = Instant::now();
    cluster.kubectl_ok(&["-n", "kube-system", "delete", "pod", holder, "--wait=false"]);
    let next = eventually(Duration::from_secs(60), "a new Lease holder", || async {
        lease_holder(client)
            .await
            .filter(|h| h != holder && before.contains(h))
    })
    .await;
    eprintln!(
        "real-node: leader {holder} deleted; {next} holds the Lease {:.1}s later",
        deleted.elapsed().as_secs_f64()
    );
    // The Deployment replaces the deleted Pod; the new one becomes Ready and follows.
    eventually(SLOW, "a replacement replica, Ready", || async {
        let ready: Vec<String> = pods(client, "kube-system", CM_SELECTOR)
            .await
            .into_iter()
            .filter(|p| running(p) && pod_ready(p))
            .filter_map(|p| p.metadata.name)
            .collect();
        (ready.len() == 2 && ready.iter().any(|n| !before.contains(n))).then_some(())
    })
    .await;
    assert_eq!(one_leader(cluster, client).await, next, "leadership moved again");
}

/// What the test knows of its backend Services.
struct Web {
    cluster_ip: String,
    node_port: u16,
}

fn cluster_ip(s: &Service) -> Option<String> {
    s.spec.as_ref()?.cluster_ip.clone().filter(|ip| ip != "None")
}

fn node_ports(s: &Service) -> Vec<u16> {
    s.spec
        .iter()
        .flat_map(|sp| sp.ports.iter().flatten())
        .filter_map(|p| p.node_port)
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

async fn backends(client: &Client, ns: &str) -> BTreeSet<String> {
    pods(client, ns, "app=web")
        .await
        .into_iter()
        .filter(|p| running(p) && pod_ready(p))
        .filter_map(|p| p.metadata.name)
        .collect()
}

async fn services_get_svcplane_values(cluster: &Cluster, client: &Client, ns: &str) -> Web {
    cluster.kubectl_ok(&["create", "namespace", ns]);
    let fixture = repo_root().join("e2e/tests/real_node/web.yaml");
    cluster.kubectl_ok(&["-n", ns, "apply", "-f", fixture.to_str().unwrap()]);
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let web = api.get("web").await.unwrap();
    let np = api.get("web-nodeport").await.unwrap();
    let (ip, np_ip, port) = (
        cluster_ip(&web).unwrap(),
        cluster_ip(&np).unwrap(),
        node_ports(&np)[0],
    );
    // svcplane's bitmaps hold them the moment the Services exist (repair runs every 3 minutes;
    // only the webhook marks a value this early).
    let (ips, ports) = etcd::bitmaps(cluster).await;
    for v in [&ip, &np_ip] {
        assert!(
            ips.contains(&v.parse().unwrap()),
            "{v} is not in svcplane's ClusterIP bitmap"
        );
    }
    assert!(
        ports.contains(&port),
        "{port} is not in svcplane's NodePort bitmap"
    );
    let logs = cluster.kubectl_ok(&["-n", "kube-system", "logs", "-l", CM_SELECTOR, "--tail=-1"]);
    assert!(
        logs.lines()
            .any(|l| l.contains("\"message\":\"allocated for Service\"")
                && l.contains("\"name\":\"web-nodeport\"")
                && l.contains(&port.to_string())),
        "no replica logged allocating node port {port} for web-nodeport"
    );
    pools_agree(cluster, client).await;
    eventually(SLOW, "3 Ready backends", || async {
        (backends(client, ns).await.len() == 3).then_some(())
    })
    .await;
    Web {
        cluster_ip: ip,
        node_port: port,
    }
}

/// `kubectl get servicepools` counts what the Services hold.
async fn pools_agree(cluster: &Cluster, client: &Client) {
    eventually(
        Duration::from_secs(60),
        "ServicePools counting every Service's values",
        || async {
            let svcs = Api::<Service>::all(client.clone())
                .list(&ListParams::default())
                .await
                .ok()?;
            let ips: BTreeSet<String> = svcs.items.iter().filter_map(cluster_ip).collect();
            let ports: BTreeSet<u16> = svcs.items.iter().flat_map(node_ports).collect();
            let out = cluster.kubectl_ok(&["get", "servicepools", "--no-headers"]);
            let mut counts = BTreeMap::new();
            for line in out.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                counts.insert(f.get(1)?.to_string(), f.get(4)?.parse::<usize>().ok()?);
            }
            (counts.get("ClusterIP") == Some(&ips.len()) && counts.get("NodePort") == Some(&ports.len()))
                .then_some(())
        },
    )
    .await;
}

/// Runs `curl` `n` times inside the client Pod; the answers (Pod names), one per line.
fn curl_in_client(cluster: &Cluster, ns: &str, url: &str, n: usize) -> Vec<String> {
    let script = format!("for i in $(seq {n}); do curl -s -m 3 {url} || echo FAILED; done");
    cluster
        .kubectl_ok(&["-n", ns, "exec", "client", "--", "sh", "-c", &script])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn answered(lines: &[String]) -> BTreeSet<String> {
    lines.iter().cloned().collect()
}

async fn client_reaches_every_backend(cluster: &Cluster, client: &Client, ns: &str, web: &Web) {
    let fixture = repo_root().join("e2e/tests/real_node/client.yaml");
    cluster.kubectl_ok(&["-n", ns, "apply", "-f", fixture.to_str().unwrap()]);
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=300s",
    ]);
    let env = cluster.kubectl_ok(&["-n", ns, "exec", "client", "--", "env"]);
    for expected in [
        format!("WEB_SERVICE_HOST={}", web.cluster_ip),
        "WEB_SERVICE_PORT=80".to_owned(),
        "WEB_SERVICE_PORT_HTTP=80".to_owned(),
        format!("WEB_PORT=tcp://{}:80", web.cluster_ip),
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "{expected} missing from the client's environment:\n{env}"
        );
    }
    let all = backends(client, ns).await;
    for url in [
        "http://web/".to_owned(),
        format!("http://web.{ns}.svc.cluster.local/"),
        format!("http://{}/", web.cluster_ip),
    ] {
        let got = curl_in_client(cluster, ns, &url, 12);
        assert_eq!(answered(&got), all, "{url} answered {got:?}");
    }
}

async fn node_port_answers(cluster: &Cluster, client: &Client, ns: &str, web: &Web) {
    let url = format!("http://{NODE_IP}:{}/", web.node_port);
    let all = backends(client, ns).await;
    // From the control plane's namespace: a host outside the node.
    let mut outside = Vec::new();
    for _ in 0..9 {
        let out = cluster
            .in_netns("curl")
            .args(["-s", "-m", "5", &url])
            .output()
            .unwrap();
        outside.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    assert_eq!(answered(&outside), all, "{url} from outside answered {outside:?}");
    let on_node = cluster.ssh_ok(&format!("for i in $(seq 9); do curl -s -m 3 {url}; done"));
    let on_node: Vec<String> = on_node.lines().map(str::to_owned).collect();
    assert_eq!(answered(&on_node), all, "{url} on the node answered {on_node:?}");
}

/// Ready endpoints of a Service, as its EndpointSlices say.
async fn ready_endpoints(client: &Client, ns: &str, service: &str) -> BTreeSet<String> {
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
        .collect()
}

async fn scale_to(cluster: &Cluster, client: &Client, ns: &str, replicas: usize) -> BTreeSet<String> {
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "scale",
        "deployment/web",
        &format!("--replicas={replicas}"),
    ]);
    eventually(
        SLOW,
        &format!("{replicas} ready backends in the EndpointSlices"),
        || async {
            let ready = backends(client, ns).await;
            let all = pods(client, ns, "app=web").await.len();
            (ready.len() == replicas && all == replicas && ready_endpoints(client, ns, "web").await == ready)
                .then_some(ready)
        },
    )
    .await
}

async fn scaling_is_followed(cluster: &Cluster, client: &Client, ns: &str, web: &Web) {
    let url = format!("http://{}/", web.cluster_ip);
    let one = scale_to(cluster, client, ns, 1).await;
    let got = curl_in_client(cluster, ns, &url, 9);
    assert_eq!(answered(&got), one, "after scaling to 1: {got:?}");
    let three = scale_to(cluster, client, ns, 3).await;
    let got = curl_in_client(cluster, ns, &url, 12);
    assert_eq!(answered(&got), three, "after scaling back to 3: {got:?}");
}

async fn unready_backend_gets_nothing(cluster: &Cluster, client: &Client, ns: &str, web: &Web) {
    let all = backends(client, ns).await;
    let victim = all.iter().next().unwrap().clone();
    cluster.kubectl_ok(&["-n", ns, "exec", &victim, "--", "rm", "/www/ready"]);
    let rest: BTreeSet<String> = all.iter().filter(|p| **p != victim).cloned().collect();
    eventually(SLOW, "the unready backend out of the ready endpoints", || async {
        (ready_endpoints(client, ns, "web").await == rest).then_some(())
    })
    .await;
    // The dataplane follows within its minimum sync period; a second is plenty.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = curl_in_client(cluster, ns, &format!("http://{}/", web.cluster_ip), 15);
    assert_eq!(answered(&got), rest, "with {victim} not ready: {got:?}");
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "exec",
        &victim,
        "--",
        "sh",
        "-c",
        "echo ready > /www/ready",
    ]);
    eventually(SLOW, "the backend ready again", || async {
        (ready_endpoints(client, ns, "web").await == all).then_some(())
    })
    .await;
}

/// Creates Services `<prefix>1`, `<prefix>2`, ... one after another until `stop`; returns how
/// many were created and the errors.
async fn create_services(
    client: Client,
    ns: String,
    prefix: &str,
    stop: Arc<AtomicBool>,
) -> (usize, Vec<String>) {
    let api: Api<Service> = Api::namespaced(client, &ns);
    let (mut created, mut errors) = (0, Vec::new());
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}{i}")),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(if i % 4 == 0 { "NodePort" } else { "ClusterIP" }.into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &svc).await {
            Ok(_) => created += 1,
            Err(e) => errors.push(format!(
                "{} {prefix}{i}: {e}",
                k8s_openapi::jiff::Timestamp::now()
            )),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (created, errors)
}

/// The last `n` lines of a replica's log, without the one-per-Service allocation lines.
fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("allocated for Service"))
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

async fn rolling_update_under_load(cluster: &Cluster, client: &Client, version: &str) {
    // A new tag of the same image: the Pods are replaced as for any upgrade.
    let next = format!("{version}-rollout");
    cluster.ssh_ok(&format!(
        "ctr -n k8s.io images tag docker.io/library/svcplane:{version} docker.io/library/svcplane:{next}"
    ));
    let ns = "rollout";
    cluster.kubectl_ok(&["create", "namespace", ns]);
    let stop = Arc::new(AtomicBool::new(false));
    // Two creators, so that requests are often in flight when a replica goes.
    let creators: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|prefix| {
            tokio::spawn(create_services(
                client.clone(),
                ns.to_owned(),
                prefix,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The replicas about to be replaced: their logs are gone with their Pods, so they are
    // followed from now on, to explain a failed create (the drain's steps are logged).
    let mut followers = Vec::new();
    for pod in pods(client, "kube-system", CM_SELECTOR).await {
        let name = pod.metadata.name.unwrap_or_default();
        let log = cluster.dir.join(format!("rollout-{name}.log"));
        if let Ok(file) = std::fs::File::create(&log)
            && let Ok(child) = cluster
                .kubectl()
                .args(["-n", "kube-system", "logs", "-f", &name])
                .stdout(file)
                .stderr(std::process::Stdio::null())
                .spawn()
        {
            followers.push((name, log, child));
        }
    }
    let started = Instant::now();
    cluster.kubectl_ok(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "deployment/svcplane-controller-manager",
        &format!("controller-manager=svcplane:{next}"),
    ]);
    cluster.kubectl_ok(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/svcplane-controller-manager",
        "--timeout=600s",
    ]);
    let rollout = started.elapsed();
    // The old Pods are gone only once they have drained; keep creating past that.
    eventually(SLOW, "the old replicas gone", || async {
        let all = pods(client, "kube-system", CM_SELECTOR).await;
        let images_new = all.iter().all(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.containers
                    .iter()
                    .all(|c| c.image.as_deref() == Some(&format!("svcplane:{next}")))
            })
        });
        (all.len() == 2 && images_new).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut created, mut errors) = (0, Vec::new());
    for c in creators {
        let (n, e) = c.await.unwrap();
        created += n;
        errors.extend(e);
    }
    eprintln!(
        "real-node: rollout took {:.0}s; {created} Services created meanwhile, {} failed",
        rollout.as_secs_f64(),
        errors.len()
    );
    for (name, log, mut child) in followers {
        let _ = child.kill();
        let _ = child.wait();
        if errors.is_empty() {
            continue;
        }
        // What the old replica did from SIGTERM on, beside each failure's time above.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in last_lines(&text, 40) {
            eprintln!("real-node: [{name}] {line}");
        }
    }
    if !errors.is_empty() {
        // The replicas that took over, and the node's dataplane (which routes the apiserver's
        // webhook calls to a replica): what they did around each failure's time.
        let mut names: Vec<String> = pods(client, "kube-system", CM_SELECTOR)
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        names.extend(
            pods(client, "kube-system", DP_SELECTOR)
                .await
                .into_iter()
                .filter_map(|p| p.metadata.name),
        );
        for name in names {
            let out = cluster
                .kubectl()
                .args([
                    "-n",
                    "kube-system",
                    "logs",
                    "--all-containers",
                    "--tail",
                    "200",
                    &name,
                ])
                .output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for line in last_lines(&text, 60) {
                eprintln!("real-node: [{name}, now] {line}");
            }
        }
    }
    assert!(
        errors.is_empty(),
        "Service creates failed during the rollout:\n{}",
        errors.join("\n")
    );
    assert!(
        created >= 20,
        "only {created} Services were created during the rollout"
    );
    let _ = one_leader(cluster, client).await;

    // A value svcplane handed out twice would have failed a create (the apiserver refuses a
    // taken ClusterIP or NodePort; none failed). And svcplane's bitmaps hold exactly what the
    // Services hold: nothing leaked by a request cut off mid-rollout, nothing released early.
    let svcs = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let held: BTreeSet<std::net::IpAddr> = svcs
        .items
        .iter()
        .filter_map(cluster_ip)
        .map(|ip| ip.parse().unwrap())
        .collect();
    let held_ports: BTreeSet<u16> = svcs.items.iter().flat_map(node_ports).collect();
    let (bitmap_ips, bitmap_ports) = etcd::bitmaps(cluster).await;
    assert_eq!(bitmap_ips, held, "ClusterIP bitmap vs Services");
    assert_eq!(bitmap_ports, held_ports, "NodePort bitmap vs Services");
    pools_agree(cluster, client).await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), "kube-system")
        .get("svcplane-controller-manager")
        .await
        .unwrap();
    assert_eq!(deployment.status.and_then(|s| s.available_replicas), Some(2));
}
