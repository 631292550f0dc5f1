//! Registering svcplane's Service webhook with the apiserver under test, at a URL (no kube-proxy
//! here, so not through a Service), optionally for some namespaces only, with the shipped
//! configuration's match conditions.

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

/// The shipped configuration's webhook (`manifests/allocation/webhook.yaml`).
pub fn shipped() -> MutatingWebhook {
    let path = crate::repo_root().join("manifests/allocation/webhook.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .find(|doc| doc["kind"] == "MutatingWebhookConfiguration")
        .and_then(|doc| serde_json::from_value::<MutatingWebhookConfiguration>(doc).ok())
        .and_then(|c| c.webhooks?.into_iter().next())
        .unwrap_or_else(|| panic!("{} holds no webhook configuration", path.display()))
}

/// Creates MutatingWebhookConfiguration `name` sending Service creates and updates to
/// `https://127.0.0.1:{port}/mutate-services`, failing closed and skipping what the shipped one
/// skips (its match conditions).
pub async fn register(client: &Client, name: &str, port: u16, namespaces: Option<LabelSelector>) {
    register_with_timeout(client, name, port, namespaces, 10).await;
}

/// [`register`], the apiserver giving up on a call after `timeout_seconds`.
pub async fn register_with_timeout(
    client: &Client,
    name: &str,
    port: u16,
    namespaces: Option<LabelSelector>,
    timeout_seconds: i32,
) {
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
            timeout_seconds: Some(timeout_seconds),
            client_config: WebhookClientConfig {
                url: Some(format!("https://127.0.0.1:{port}/mutate-services")),
                ..Default::default()
            },
            namespace_selector: namespaces,
            match_conditions: shipped().match_conditions,
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
