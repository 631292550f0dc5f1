//! The mutating admission handler for Services: plan, allocate through etcd, answer with a JSON
//! Patch, or refuse with a message that says why (range full, etcd unreachable, not yet
//! reconciled, invalid request).

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, RawQuery, State},
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

/// How long a request may take here when the apiserver does not say how long it waits.
const DEFAULT_ANSWER_WITHIN: Duration = Duration::from_secs(8);
/// Kept of the apiserver's wait for the answer to travel back: answering within it, this
/// webhook's reason reaches the client rather than the apiserver's timeout.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);
/// The webhook configuration's longest timeout (`timeoutSeconds` is at most 30).
const MAX_ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// How long this call may take: the apiserver's wait less the margin. The apiserver says how
/// long it waits in the query string (`?timeout=15s`, the configuration's `timeoutSeconds`).
fn answer_within(query: Option<&str>) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("timeout="))
        .and_then(go_seconds)
        .map_or(DEFAULT_ANSWER_WITHIN, |wait| {
            wait.min(MAX_ANSWER_WITHIN)
                .saturating_sub(ANSWER_MARGIN)
                .max(Duration::from_secs(1))
        })
}

/// A Go duration as the apiserver writes a whole number of seconds ("15s"); anything else is
/// not what it sends, and the default applies.
fn go_seconds(s: &str) -> Option<Duration> {
    s.strip_suffix('s')?.parse::<u64>().ok().map(Duration::from_secs)
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/mutate-services", post(mutate))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state)
}

async fn mutate(
    State(state): State<Arc<WebhookState>>,
    RawQuery(query): RawQuery,
    Json(review): Json<AdmissionReview<Service>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let within = answer_within(query.as_deref());
    let req: AdmissionRequest<Service> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "malformed admission review");
            return Json(AdmissionResponse::invalid(e.to_string()).into_review());
        }
    };
    let timer = state.metrics.duration.start_timer();
    let (op, outcome, resp) = answer(&state, &req, within).await;
    timer.observe_duration();
    state.metrics.requests.with_label_values(&[op, outcome]).inc();
    Json(resp.into_review())
}

async fn answer(
    state: &WebhookState,
    req: &AdmissionRequest<Service>,
    within: Duration,
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
    let got = match tokio::time::timeout(within, execution).await {
        Err(_) => {
            warn!(%service, "allocation did not finish in time");
            return (
                op,
                "failed",
                resp.deny(format!(
                    "allocation did not finish within {}s (etcd slow or unreachable); try again",
                    within.as_secs()
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

#[cfg(test)]
mod deadline_tests {
    use super::*;

    fn within(timeout: Option<&str>) -> Duration {
        answer_within(timeout.map(|t| format!("timeout={t}")).as_deref())
    }

    #[test]
    fn the_answer_is_due_before_the_apiserver_stops_waiting() {
        assert_eq!(within(Some("15s")), Duration::from_secs(13));
        assert_eq!(within(Some("10s")), Duration::from_secs(8));
        // Never less than a second, never past the longest timeout a configuration can have.
        assert_eq!(within(Some("1s")), Duration::from_secs(1));
        assert_eq!(within(Some("300s")), Duration::from_secs(28));
        // Not said, or not as the apiserver says it: the default.
        assert_eq!(within(None), DEFAULT_ANSWER_WITHIN);
        assert_eq!(within(Some("1m")), DEFAULT_ANSWER_WITHIN);
        assert_eq!(within(Some("-5s")), DEFAULT_ANSWER_WITHIN);
        assert_eq!(answer_within(Some("x=1&timeout=12s")), Duration::from_secs(10));
    }
}
