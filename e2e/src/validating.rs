//! A second admission webhook, as clusters run them (policy engines): a validating webhook that
//! refuses Services carrying the label `svcplane-e2e/deny`. Validating webhooks run after every
//! mutating one, so a Service it refuses was already given its values by svcplane's webhook.
//!
//! Served over TLS on loopback by this test process, with its own CA in the registration.

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, routing::post};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        RuleWithOperations, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

/// The label that has a Service refused.
pub const DENY_LABEL: &str = "svcplane-e2e/deny";

/// What the webhook says when it refuses.
pub const DENIED: &str = "refused by the e2e policy webhook";

/// The running webhook; it stops when dropped.
pub struct Validating {
    task: JoinHandle<()>,
}

impl Drop for Validating {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one review: allowed unless the Service carries [`DENY_LABEL`].
fn review(body: Value) -> Value {
    let request = &body["request"];
    let denied = request["object"]["metadata"]["labels"].get(DENY_LABEL).is_some();
    let mut response = json!({"uid": request["uid"], "allowed": !denied});
    if denied {
        response["status"] = json!({"code": 403, "message": DENIED});
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Starts the webhook on a loopback port and registers it for Service creates in the namespaces
/// `namespaces` selects, failing closed.
pub async fn start(client: &Client, name: &str, namespaces: LabelSelector) -> Validating {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "e2e policy webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let tls = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/validate",
        post(|Json(body): Json<Value>| async move { Json(review(body)) }),
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });

    let config = ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: "policy.e2e.svcplane.io".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            failure_policy: Some("Fail".into()),
            timeout_seconds: Some(10),
            client_config: WebhookClientConfig {
                url: Some(format!("https://127.0.0.1:{port}/validate")),
                ca_bundle: Some(ByteString(ca_cert.pem().into_bytes())),
                ..Default::default()
            },
            namespace_selector: Some(namespaces),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["services".into()]),
                operations: Some(vec!["CREATE".into()]),
                scope: Some("Namespaced".into()),
            }]),
            ..Default::default()
        }]),
    };
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    Validating { task }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_labelled_services() {
        let labelled = json!({"request": {"uid": "1", "object": {"metadata": {"labels": {DENY_LABEL: ""}}}}});
        let plain = json!({"request": {"uid": "2", "object": {"metadata": {"labels": {"app": "x"}}}}});
        let refused = review(labelled);
        assert_eq!(refused["response"]["allowed"], false);
        assert_eq!(refused["response"]["uid"], "1");
        assert_eq!(refused["response"]["status"]["message"], DENIED);
        assert_eq!(review(plain)["response"]["allowed"], true);
    }
}
