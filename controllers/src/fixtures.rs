//! The objects the endpoint controllers' tests start from, in one place: a Service `ns/web` and
//! its Pods, as the caches hold them. Tests change what they test on a copy.

use crate::model::{PodView, ServicePortView, ServiceView, TargetPort};

/// `ns/web`: selects `app=web`, ClusterIP 10.96.0.10 (IPv4), port `http` 80 to target 8080/TCP.
pub fn web_service() -> ServiceView {
    let app = || [("app".to_owned(), "web".to_owned())].into();
    ServiceView {
        namespace: "ns".into(),
        name: "web".into(),
        uid: "svc-uid".into(),
        labels: app(),
        selector: Some(app()),
        type_: "ClusterIP".into(),
        cluster_ip: Some("10.96.0.10".into()),
        cluster_ips: vec!["10.96.0.10".into()],
        ip_families: vec!["IPv4".into()],
        ports: vec![ServicePortView {
            name: "http".into(),
            protocol: "TCP".into(),
            app_protocol: None,
            port: 80,
            target_port: TargetPort::Number(8080),
        }],
        ..Default::default()
    }
}

/// A ready Pod of `ns/web` named `name` (uid `<name>-uid`) with `ips`, on node `node-a`.
pub fn web_pod(name: &str, ips: &[&str]) -> PodView {
    PodView {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("{name}-uid"),
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ips: ips.iter().map(|s| (*s).to_owned()).collect(),
        ready: true,
        node_name: Some("node-a".into()),
        ..Default::default()
    }
}
