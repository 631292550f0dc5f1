//! Pods as a kubelet would leave them: created as objects, then given a status (IPs, phase,
//! conditions) through the status subresource. There is no kubelet in these tests.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

/// What a test wants a Pod to look like.
#[derive(Clone, Debug)]
pub struct PodFixture {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<String>,
    pub node: Option<String>,
    pub ready: bool,
    /// Named container ports (name, port).
    pub ports: Vec<(String, i32)>,
}

impl PodFixture {
    pub fn new(name: &str, ip: &str) -> Self {
        Self {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            ips: vec![ip.to_owned()],
            node: None,
            ready: true,
            ports: Vec::new(),
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_owned(), v.to_owned());
        self
    }

    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    pub fn port(mut self, name: &str, port: i32) -> Self {
        self.ports.push((name.to_owned(), port));
        self
    }

    fn object(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels.clone()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: self.node.clone(),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("registry.invalid/app:1".into()),
                    ports: Some(
                        self.ports
                            .iter()
                            .map(|(n, p)| ContainerPort {
                                name: Some(n.clone()),
                                container_port: *p,
                                ..Default::default()
                            })
                            .collect(),
                    )
                    .filter(|p: &Vec<_>| !p.is_empty()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn status(&self) -> PodStatus {
        let now = Time(Timestamp::now());
        let cond = |t: &str| PodCondition {
            type_: t.into(),
            status: if self.ready { "True" } else { "False" }.into(),
            last_transition_time: Some(now.clone()),
            ..Default::default()
        };
        PodStatus {
            phase: Some("Running".into()),
            pod_ip: self.ips.first().cloned(),
            pod_ips: Some(self.ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
            conditions: Some(vec![cond("Ready"), cond("ContainersReady")]),
            start_time: Some(now),
            ..Default::default()
        }
    }
}

/// Creates the Pod and sets its status; returns the stored Pod.
pub async fn create(client: &Client, namespace: &str, fixture: &PodFixture) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), &fixture.object())
        .await
        .unwrap();
    set_status(client, namespace, fixture).await
}

/// Rewrites the status of an existing Pod from `fixture` (readiness, IPs).
pub async fn set_status(client: &Client, namespace: &str, fixture: &PodFixture) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({ "status": fixture.status() });
    api.patch_status(&fixture.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap()
}
