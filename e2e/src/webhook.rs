//! Registering svcplane's Service webhook with the apiserver under test, at a URL (no kube-proxy
//! here, so not through a Service), optionally for some namespaces only.

use k8s_openapi::{
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Creates MutatingWebhookConfiguration `name` sending Service creates and updates to
/// `https://127.0.0.1:{port}/mutate-services`, failing closed as the shipped one does.
pub async fn register(client: &Client, name: &str, port: u16, namespaces: Option<LabelSelector>) {
    let webhook = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "services.svcplane.io".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "NoneOnDryRun".into(),
            failure_policy: Some("Fail".into()),
            timeout_seconds: Some(10),
            client_config: WebhookClientConfig {
                url: Some(format!("https://127.0.0.1:{port}/mutate-services")),
                ..Default::default()
            },
            namespace_selector: namespaces,
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["services".into()]),
                operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                scope: Some("Namespaced".into()),
            }]),
            ..Default::default()
        }]),
    };
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();
}
