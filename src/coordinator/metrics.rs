//! What a coordinator counts; rendered on `GET /metrics`.

use super::usage::UsageMeters;
use crate::telemetry::metrics::{Counter, Exposition, Gauge, Histogram};

#[derive(Default)]
pub struct CoordinatorMetrics {
    pub compute_requests: Counter,
    pub compute_ok: Counter,
    pub compute_errors: Counter,
    pub rejected_too_many: Counter,
    pub rejected_queue_full: Counter,
    pub rejected_quota: Counter,
    pub retries_joined: Counter,
    pub outcome_checks: Counter,
    pub in_flight: Gauge,
    pub sessions_created: Counter,
    pub sessions_deleted: Counter,
    pub compute_seconds: Histogram,
}

impl CoordinatorMetrics {
    pub fn render(
        &self,
        queue_depth: Option<usize>,
        live_workers: Option<usize>,
        usage: &UsageMeters,
        bills: &[(String, crate::queue::TenantBill)],
    ) -> String {
        let mut e = Exposition::default();
        e.counter(
            "hyfhe_coordinator_compute_requests_total",
            "Compute requests received.",
            self.compute_requests.get(),
        );
        e.counter(
            "hyfhe_coordinator_compute_ok_total",
            "Compute requests answered with a result.",
            self.compute_ok.get(),
        );
        e.counter(
            "hyfhe_coordinator_compute_errors_total",
            "Compute requests answered with an error.",
            self.compute_errors.get(),
        );
        e.counter(
            "hyfhe_coordinator_rejected_in_flight_total",
            "Compute requests refused with 429 (in-flight bounds, global or per tenant).",
            self.rejected_too_many.get(),
        );
        e.counter(
            "hyfhe_coordinator_rejected_queue_full_total",
            "Requests refused with 503 (shard over max_depth).",
            self.rejected_queue_full.get(),
        );
        e.counter(
            "hyfhe_coordinator_rejected_quota_total",
            "Session requests refused with 429 (tenant quota or concurrent creations).",
            self.rejected_quota.get(),
        );
        e.counter(
            "hyfhe_coordinator_retries_joined_total",
            "Retries of a running job that waited for it instead of enqueueing it again.",
            self.retries_joined.get(),
        );
        e.counter(
            "hyfhe_coordinator_outcome_checks_total",
            "Reads of a job's stored outcome by requests waiting for it (woken or every 2 s).",
            self.outcome_checks.get(),
        );
        e.gauge(
            "hyfhe_coordinator_in_flight",
            "Compute requests admitted and not answered.",
            self.in_flight.get(),
        );
        e.counter(
            "hyfhe_coordinator_sessions_created_total",
            "Sessions opened.",
            self.sessions_created.get(),
        );
        e.counter(
            "hyfhe_coordinator_sessions_deleted_total",
            "Sessions closed by their client.",
            self.sessions_deleted.get(),
        );
        e.histogram(
            "hyfhe_coordinator_compute_seconds",
            "Compute request latency (admit to answer).",
            &self.compute_seconds,
        );
        if let Some(d) = queue_depth {
            e.gauge(
                "hyfhe_queue_depth",
                "Jobs waiting or running over all shards.",
                d as u64,
            );
        }
        if let Some(w) = live_workers {
            e.gauge(
                "hyfhe_live_workers",
                "Workers with a fresh heartbeat.",
                w as u64,
            );
        }
        usage.render(&mut e, bills);
        e.finish()
    }
}
