//! How a terminating replica leaves the webhook Service without failing a request.
//!
//! The apiserver holds long-lived connections to the webhook Service's address, and a Service
//! proxy keeps existing connections on an endpoint that leaves (IPVS drains it at weight 0) while
//! it may still send new ones until it has applied the change, which takes a while on a busy
//! node. So a replica told to stop:
//! 1. keeps serving until its Pod is no longer a ready endpoint of that Service;
//! 2. then closes the connections it has gracefully (GOAWAY: the apiserver reconnects through
//!    the proxy) and keeps accepting, each new connection briefly, for as long as proxies still
//!    send any: until none has come for a quiet period;
//! 3. then closes every connection gracefully and finishes what is in flight; a connection that
//!    still arrives meanwhile is served its request and closed the same way (never reset by a
//!    closed listener, never dropped before its first request: `server`).
//!
//! All of it within a bound (`--webhook-shutdown-delay`). Stopping at SIGTERM instead fails the
//! Service writes routed here during a rollout.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration, discovery::v1::EndpointSlice,
};
use kube::{Api, Client, api::ListParams};
use tracing::{info, warn};

use super::server::Control;

/// Where a replica serves: which Service, and its own Pod IP.
pub struct Drain {
    pub client: Client,
    /// The MutatingWebhookConfiguration naming the Service.
    pub configuration: String,
    /// This Pod's IP (downward API); unknown means the full delay is waited.
    pub pod_ip: Option<IpAddr>,
    /// The longest a stopping replica keeps serving.
    pub max: Duration,
    /// Serving continues at least this long once the endpoint is gone from the slices ...
    pub settle: Duration,
    /// ... and until no connection has come for this long.
    pub quiet: Duration,
}

/// Whether proxies may still send new connections to `ip`, by the rule they pick endpoints with
/// (kube-proxy's, and svcplane's dataplane's): ready endpoints; when none is ready, serving ones
/// (terminating Pods that still pass readiness). A terminating Pod's endpoint is `ready: false`,
/// so it stops being routed as soon as another replica is ready.
pub fn still_routed(slices: &[EndpointSlice], ip: IpAddr) -> bool {
    let ip = ip.to_string();
    let endpoints: Vec<_> = slices.iter().flat_map(|s| s.endpoints.iter().flatten()).collect();
    let condition = |e: &&k8s_openapi::api::discovery::v1::Endpoint, serving: bool| {
        let c = e.conditions.as_ref();
        // Unset conditions mean ready (and so serving), as the API defines them.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        if serving {
            c.and_then(|c| c.serving).unwrap_or(ready)
        } else {
            ready
        }
    };
    let mine = |e: &&&k8s_openapi::api::discovery::v1::Endpoint| e.addresses.contains(&ip);
    if endpoints.iter().any(|e| condition(e, false)) {
        endpoints.iter().filter(mine).any(|e| condition(e, false))
    } else {
        endpoints.iter().filter(mine).any(|e| condition(e, true))
    }
}

/// The Services (namespace, name) the configuration's webhooks call.
pub fn services(config: &MutatingWebhookConfiguration) -> BTreeSet<(String, String)> {
    config
        .webhooks
        .iter()
        .flatten()
        .filter_map(|w| w.client_config.service.as_ref())
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect()
}

impl Drain {
    /// Runs the drain against the server `control` steers; returns once it has stopped
    /// accepting (the server then finishes in-flight requests).
    pub async fn run(&self, control: &Control) {
        let started = Instant::now();
        let deadline = started + self.max;
        if !self.until_out_of_endpoints(deadline).await {
            control.draining.cancel();
            control.stop.cancel();
            return;
        }
        let left = Instant::now();
        control.draining.cancel();
        loop {
            let now = Instant::now();
            if now >= deadline {
                warn!(quiet = ?control.quiet_for(), "connections still arriving at the end of the shutdown delay");
                break;
            }
            if now - left >= self.settle && control.quiet_for() >= self.quiet {
                info!(after = ?started.elapsed(), "no new webhook connections; stopping");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200).min(deadline - now)).await;
        }
        control.stop.cancel();
    }

    /// Waits until this replica's Pod is out of the webhook Service's ready endpoints (or the
    /// deadline, when that cannot be known). `false`: no Service routes here, nothing to wait for.
    async fn until_out_of_endpoints(&self, deadline: Instant) -> bool {
        let started = Instant::now();
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        let services = match tokio::time::timeout_at(deadline.into(), api.get_opt(&self.configuration)).await
        {
            Ok(Ok(Some(c))) => services(&c),
            Ok(Ok(None)) => BTreeSet::new(),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the webhook configuration; serving for the full shutdown delay");
                tokio::time::sleep_until(deadline.into()).await;
                return true;
            }
            Err(_) => {
                warn!("the webhook configuration could not be read within the shutdown delay");
                return true;
            }
        };
        if services.is_empty() {
            info!(configuration = %self.configuration, "no webhook Service routes here; stopping");
            return false;
        }
        let Some(ip) = self.pod_ip else {
            info!(delay = ?self.max, "no POD_IP: serving the webhook for the full shutdown delay");
            tokio::time::sleep_until(deadline.into()).await;
            return true;
        };
        while Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), self.routed_here(&services, ip)).await {
                Ok(Ok(false)) => {
                    info!(after = ?started.elapsed(), "out of the webhook Service's endpoints");
                    return true;
                }
                Ok(Ok(true)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot read the webhook Service's endpoints"),
                Err(_) => break,
            }
            let next = (Instant::now() + Duration::from_millis(500)).min(deadline);
            tokio::time::sleep_until(next.into()).await;
        }
        warn!(delay = ?self.max, "still an endpoint of the webhook Service at the end of the shutdown delay");
        true
    }

    async fn routed_here(
        &self,
        services: &BTreeSet<(String, String)>,
        ip: IpAddr,
    ) -> Result<bool, kube::Error> {
        for (namespace, name) in services {
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
            let slices = api
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
                .await?;
            if still_routed(&slices.items, ip) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    fn slice(endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![(*ip).into()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn an_endpoint_is_routed_until_unready_or_gone() {
        let me: IpAddr = "10.244.0.7".parse().unwrap();
        assert!(still_routed(&[slice(&[("10.244.0.7", Some(true))])], me));
        // No ready condition means ready (the API's rule).
        assert!(still_routed(
            &[slice(&[("10.244.0.8", Some(true)), ("10.244.0.7", None)])],
            me
        ));
        assert!(!still_routed(
            &[slice(&[("10.244.0.7", Some(false)), ("10.244.0.8", Some(true))])],
            me
        ));
        assert!(!still_routed(&[slice(&[("10.244.0.8", Some(true))])], me));
        assert!(!still_routed(&[], me));
    }

    fn serving(ip: &str, ready: bool, serving: bool) -> EndpointSlice {
        let mut s = slice(&[(ip, Some(ready))]);
        if let Some(e) = s.endpoints.as_mut().and_then(|e| e.first_mut())
            && let Some(c) = e.conditions.as_mut()
        {
            c.serving = Some(serving);
            c.terminating = Some(!ready);
        }
        s
    }

    #[test]
    fn with_no_ready_endpoint_a_serving_terminating_one_is_still_routed() {
        let me: IpAddr = "10.244.0.7".parse().unwrap();
        // Every replica terminating (scale to 0, a drain of the last node): proxies fall back
        // to serving endpoints, this one among them.
        assert!(still_routed(
            &[
                serving("10.244.0.7", false, true),
                serving("10.244.0.8", false, true)
            ],
            me
        ));
        // Once it stops passing readiness it is not.
        assert!(!still_routed(
            &[
                serving("10.244.0.7", false, false),
                serving("10.244.0.8", false, true)
            ],
            me
        ));
        // Another replica ready: not routed, serving or not.
        assert!(!still_routed(
            &[
                serving("10.244.0.7", false, true),
                serving("10.244.0.8", true, true)
            ],
            me
        ));
    }

    #[test]
    fn services_named_by_the_configuration() {
        let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "svcplane"},
            "webhooks": [
                {"name": "a.svcplane.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"namespace": "kube-system", "name": "svcplane-webhook"}}},
                {"name": "b.svcplane.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"url": "https://example.invalid/"}}
            ]
        }))
        .unwrap();
        assert_eq!(
            services(&config).into_iter().collect::<Vec<_>>(),
            [("kube-system".to_owned(), "svcplane-webhook".to_owned())]
        );
    }
}
