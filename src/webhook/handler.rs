//! The mutating admission handler for Services: plan, allocate through etcd, answer with a JSON
//! Patch, or refuse with a message that says why (range full, etcd unreachable, not yet
//! reconciled, invalid request).

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::api::core::v1::Service;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry, exponential_buckets};
use svcplane_allocators::{
    admission::{ClusterFamilies, Limits, patch, plan_create, plan_update},
    ranges::Ranges,
    reservation::Requester,
};
use svcplane_core::metrics::registered;
use tracing::{debug, info, warn};

pub struct WebhookState {
    pub allocators: Arc<Ranges>,
    pub families: ClusterFamilies,
    pub limits: Limits,
    pub metrics: WebhookMetrics,
}

#[derive(Clone)]
pub struct WebhookMetrics {
    requests: IntCounterVec,
    duration: Histogram,
}

impl WebhookMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "svcplane_allocation_webhook_requests_total",
                    "Admission requests for Services by operation and outcome",
                ),
                &["operation", "outcome"],
            )?,
        )?;
        // Fine buckets (x1.25 from 0.25 ms to ~10 s): the apiserver waits on every answer, so the
        // percentiles that matter are in the low milliseconds.
        let duration = registered(
            registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "svcplane_allocation_webhook_duration_seconds",
                    "Time to answer an admission request for a Service, allocation in etcd included",
                )
                .buckets(exponential_buckets(0.000_25, 1.25, 48)?),
            )?,
        )?;
        Ok(Self { requests, duration })
    }
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/mutate-services", post(mutate))
        .with_state(state)
}

async fn mutate(
    State(state): State<Arc<WebhookState>>,
    Json(review): Json<AdmissionReview<Service>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Service> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "malformed admission review");
            return Json(AdmissionResponse::invalid(e.to_string()).into_review());
        }
    };
    let timer = state.metrics.duration.start_timer();
    let (op, outcome, resp) = answer(&state, &req).await;
    timer.observe_duration();
    state.metrics.requests.with_label_values(&[op, outcome]).inc();
    Json(resp.into_review())
}

async fn answer(
    state: &WebhookState,
    req: &AdmissionRequest<Service>,
) -> (&'static str, &'static str, AdmissionResponse) {
    let resp = AdmissionResponse::from(req);
    let (op, plan) = match (&req.operation, &req.object, &req.old_object) {
        (Operation::Create, Some(new), _) => ("create", plan_create(new, &state.families)),
        (Operation::Update, Some(new), Some(old)) => ("update", plan_update(old, new, &state.families)),
        _ => return ("other", "allowed", resp),
    };
    let plan = match plan.and_then(|p| p.within(&state.limits).map(|()| p)) {
        Ok(p) => p,
        Err(refusal) => return (op, "refused", resp.deny(refusal.to_string())),
    };
    if plan.is_empty() {
        return (op, "allowed", resp);
    }
    if req.dry_run {
        // sideEffects: NoneOnDryRun. The apiserver's own dry-run allocation fills the fields
        // without reserving anything.
        return (op, "dry-run", resp);
    }
    let Some(object) = &req.object else {
        return (op, "allowed", resp);
    };
    let requester = Requester {
        namespace: req.namespace.clone().unwrap_or_default(),
        name: req.name.clone(),
    };
    // In a task of its own: when the apiserver gives up on this call, hyper drops this future,
    // and an allocation cut off midway would keep what it took so far without a rollback. Run
    // to completion, it rolls back what a failure leaves, and what it allocated for a request
    // nobody waits for any more is reserved and returns to the pool when the reservation expires.
    let (allocators, plan_owned) = (state.allocators.clone(), plan.clone());
    let execution = tokio::spawn(async move { allocators.execute(&plan_owned, requester).await });
    let got = match execution.await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            warn!(service = %format_args!("{}/{}", req.namespace.as_deref().unwrap_or_default(), req.name), error = %e, "refusing Service");
            return (op, "failed", resp.deny(e.to_string()));
        }
        Err(e) => {
            warn!(error = %e, "the allocation task failed");
            return (op, "failed", resp.deny(format!("internal error allocating: {e}")));
        }
    };
    let patch = patch(object, &plan, &got);
    debug!(name = %req.name, %patch, "allocated");
    match resp.clone().with_patch(patch) {
        Ok(r) => {
            info!(name = %req.name, cluster_ips = ?got.cluster_ips, node_ports = ?got.node_ports, "allocated for Service");
            (op, "allocated", r)
        }
        Err(e) => (
            op,
            "failed",
            resp.deny(format!("internal error serializing the patch: {e}")),
        ),
    }
}
