//! The health-check node ports of `externalTrafficPolicy: Local` Services: load balancers ask each
//! node whether it has a local endpoint for the Service (200) or not (503), as kube-proxy answers.
//! One listener per port, opened and closed as Services come and go; counts are updated in place.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use svcplane_dataplane::desired::HealthCheck;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

type Shared = Arc<Mutex<HealthCheck>>;

#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, (Shared, CancellationToken)>,
}

impl HealthCheckServers {
    /// Makes the listeners match `wanted`.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some((_, stop)) = self.servers.remove(&port) {
                stop.cancel();
                info!(port, "health-check node port closed");
            }
        }
        for (port, hc) in wanted {
            if let Some((shared, _)) = self.servers.get(port) {
                *shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = hc.clone();
                continue;
            }
            // Dual-stack listener: answers on every node address of both families.
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, *port));
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    // Retried at the next sync; the rules do not depend on it.
                    warn!(port, service = %hc.service, error = %e, "cannot open the health-check node port");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(hc.clone()));
            let stop = CancellationToken::new();
            let router = Router::new().route("/", get(answer)).with_state(shared.clone());
            let s = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(s.cancelled_owned())
                    .await;
            });
            info!(port, service = %hc.service, "health-check node port open");
            self.servers.insert(*port, (shared, stop));
        }
    }
}

async fn answer(State(hc): State<Shared>) -> Response {
    let hc = hc
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let code = if hc.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": hc.service.namespace, "name": hc.service.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (code, [("X-Content-Type-Options", "nosniff")], Json(body)).into_response()
}
