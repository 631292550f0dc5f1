//! The harness itself: a real kube-apiserver of the pinned version, and Pods written the way a
//! kubelet would leave them.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use svcplane_e2e::{control_plane, pods::PodFixture, test_namespace};

#[tokio::test]
async fn apiserver_is_the_pinned_release_on_real_etcd() {
    let cp = control_plane();
    let client = cp.client().await;
    let v = client.apiserver_version().await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "37"), "{v:?}");
    // The apiserver reports its etcd as healthy only when it can really reach it.
    let req = http::Request::get("/readyz/etcd").body(Vec::new()).unwrap();
    assert_eq!(client.request_text(req).await.unwrap(), "ok");
    let etcd = std::process::Command::new("etcdctl")
        .args([
            "--endpoints",
            &format!("http://127.0.0.1:{}", cp.etcd_port),
            "get",
            "/registry/namespaces/default",
            "--keys-only",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(etcd.status.success(), "{etcd:?}");
    assert_eq!(
        String::from_utf8_lossy(&etcd.stdout).trim(),
        "/registry/namespaces/default"
    );
}

#[tokio::test]
async fn pods_carry_the_status_the_test_writes() {
    let client = control_plane().client().await;
    let ns = test_namespace(&client, "harness").await;
    let ready = PodFixture::new("web-0", "10.244.1.5")
        .label("app", "web")
        .on_node("node-a")
        .port("http", 8080);
    let unready = PodFixture::new("web-1", "10.244.1.6")
        .label("app", "web")
        .not_ready();
    svcplane_e2e::pods::create(&client, &ns, &ready).await;
    svcplane_e2e::pods::create(&client, &ns, &unready).await;

    let api: Api<Pod> = Api::namespaced(client, &ns);
    let got = api.get("web-0").await.unwrap();
    let status = got.status.unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ready_cond = |s: &k8s_openapi::api::core::v1::PodStatus| {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(ready_cond(&status), "True");
    assert_eq!(got.spec.unwrap().node_name.as_deref(), Some("node-a"));
    assert_eq!(
        ready_cond(&api.get("web-1").await.unwrap().status.unwrap()),
        "False"
    );
}
