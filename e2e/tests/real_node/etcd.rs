//! svcplane's bitmaps in the cluster's etcd, read with the same client identity the cluster gave
//! svcplane (the Secret kube-system/svcplane-etcd-client).

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use svcplane_allocators::{
    IpRange, PortRange,
    etcd::{EtcdOptions, connect},
    stored::decode,
};
use svcplane_e2e::cluster::Cluster;

/// The values marked in the ClusterIP range 10.96.0.0/12 and the NodePort range.
pub async fn bitmaps(cluster: &Cluster) -> (BTreeSet<IpAddr>, BTreeSet<u16>) {
    let mut etcd = connect(&EtcdOptions {
        endpoints: vec![cluster.etcd_endpoint.clone()],
        prefix: "/svcplane".into(),
        ca_file: Some(cluster.pki("etcd-ca.crt")),
        cert_file: Some(cluster.pki("svcplane-etcd-client.crt")),
        key_file: Some(cluster.pki("svcplane-etcd-client.key")),
        timeout: Duration::from_secs(10),
    })
    .await
    .unwrap();
    let mut get = async |key: &str| {
        let resp = etcd.get(key, None).await.unwrap();
        resp.kvs()
            .first()
            .unwrap_or_else(|| panic!("{key} is not in etcd"))
            .value()
            .to_vec()
    };
    let ip_range: IpRange = "10.96.0.0/12".parse().unwrap();
    let port_range: PortRange = "30000-32767".parse().unwrap();
    let ips = decode(&get("/svcplane/ranges/clusterip/10.96.0.0-12").await, &ip_range).unwrap();
    let ports = decode(&get("/svcplane/ranges/nodeport").await, &port_range).unwrap();
    (ips.values().collect(), ports.values().collect())
}
