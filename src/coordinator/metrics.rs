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
        lag: Option<&[crate::queue::ShardLag]>,
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
        if let Some(lag) = lag {
            render_lag(&mut e, lag);
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

/// The autoscaling signals (ARCHITECTURE.md, "Scaling workers"): per shard and in total.
fn render_lag(e: &mut Exposition, lag: &[crate::queue::ShardLag]) {
    let shards: Vec<String> = lag.iter().map(|l| l.shard.to_string()).collect();
    let per = |f: &dyn Fn(&crate::queue::ShardLag) -> f64| -> Vec<(&str, f64)> {
        shards
            .iter()
            .map(String::as_str)
            .zip(lag.iter().map(f))
            .collect()
    };
    e.labelled_gauge(
        "hyfhe_queue_shard_unread",
        "Jobs enqueued on the shard and not yet read by a worker.",
        "shard",
        &per(&|l| l.unread as f64),
    );
    e.labelled_gauge(
        "hyfhe_queue_shard_pending",
        "Jobs read by a worker and not finished (running, or awaiting a claim).",
        "shard",
        &per(&|l| l.pending as f64),
    );
    e.labelled_gauge(
        "hyfhe_queue_shard_oldest_age_seconds",
        "Age of the shard's oldest unfinished job (0 when it has none).",
        "shard",
        &per(&|l| l.oldest_ms as f64 / 1000.0),
    );
    e.gauge(
        "hyfhe_queue_shards",
        "Shards the queue routes over now (grows with the workers up to queue.max_shards).",
        lag.len() as u64,
    );
    e.gauge(
        "hyfhe_queue_lag",
        "Unread plus pending jobs over all shards: the backlog an autoscaler divides by capacity.",
        lag.iter().map(|l| l.unread + l.pending).sum(),
    );
    e.gauge_f64(
        "hyfhe_queue_oldest_age_seconds",
        "Age of the oldest unfinished job over all shards.",
        lag.iter().map(|l| l.oldest_ms).max().unwrap_or(0) as f64 / 1000.0,
    );
}
