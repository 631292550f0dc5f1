//! The plain-HTTP side of a component: `/metrics`, `/healthz` (liveness), `/readyz` (readiness).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::health::Checks;

struct AppState {
    registry: Registry,
    liveness: Checks,
    readiness: Checks,
}

pub struct Server {
    listener: TcpListener,
    router: Router,
}

impl Server {
    /// Binds now, so a port clash fails start-up instead of a background task.
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        liveness: Checks,
        readiness: Checks,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let state = Arc::new(AppState {
            registry,
            liveness,
            readiness,
        });
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/livez", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(state);
        Ok(Self { listener, router })
    }

    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(addr = %self.listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let families = state.registry.gather();
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    match encoder.encode(&families, &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], buf).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
            .into_response(),
    }
}

async fn healthz(State(state): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    report(&state.liveness, "healthz", q.contains_key("verbose"))
}

async fn readyz(State(state): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    report(&state.readiness, "readyz", q.contains_key("verbose"))
}

fn report(checks: &Checks, what: &str, verbose: bool) -> Response {
    let r = checks.report(what, verbose);
    // Kubernetes components answer failed checks with 500; probes treat any >= 400 as failure.
    let code = if r.healthy {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        r.body,
    )
        .into_response()
}
