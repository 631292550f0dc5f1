//! The mutating admission handler for Services: plan, allocate through etcd, answer with a JSON
//! Patch, or refuse with a message that says why (range full, etcd unreachable, not yet
//! reconciled, invalid request).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    routing::post,
};
use k8s_openapi::api::core::v1::Service;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry, exponential_buckets};
use svcplane_allocators::{
    admission::{ClusterFamilies, Limits, patch, plan_create, plan_update},
    ranges::{AllocationFailure, Ranges},
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

/// The largest AdmissionReview accepted: an UPDATE carries the object and the old object, each
/// up to etcd's 1.5 MiB, in JSON that may be larger than their stored form.
const MAX_REVIEW_BYTES: usize = 8 << 20;

/// How long a request may take here: less than the configuration's timeout (10 s), so the
/// apiserver relays this webhook's reason rather than a timeout.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(8);

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/mutate-services", post(mutate))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
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
    let service = format!("{}/{}", requester.namespace, requester.name);
    // In a task of its own: when the apiserver gives up on this call, hyper drops this future,
    // and an allocation cut off midway would keep what it took so far without a rollback. Run
    // to completion, it rolls back what a failure leaves, and what it allocated for a request
    // nobody waits for any more is reserved and returns to the pool when the reservation expires.
    let (allocators, plan_owned) = (state.allocators.clone(), plan.clone());
    let execution = tokio::spawn(async move { allocators.execute(&plan_owned, requester).await });
    let got = match tokio::time::timeout(ANSWER_WITHIN, execution).await {
        Err(_) => {
            warn!(%service, "allocation did not finish in time");
            return (
                op,
                "failed",
                resp.deny(format!(
                    "allocation did not finish within {}s (etcd slow or unreachable); try again",
                    ANSWER_WITHIN.as_secs()
                )),
            );
        }
        Ok(Ok(Ok(g))) => g,
        Ok(Ok(Err(e @ AllocationFailure::TooManyPending(_)))) => {
            warn!(%service, error = %e, "refusing Service");
            return (op, "throttled", resp.deny(e.to_string()));
        }
        Ok(Ok(Err(e))) => {
            warn!(%service, error = %e, "refusing Service");
            return (op, "failed", resp.deny(e.to_string()));
        }
        Ok(Err(e)) => {
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
