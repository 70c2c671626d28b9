//! What a worker counts; rendered on its `GET /metrics`.

use crate::telemetry::metrics::{Counter, Exposition, Gauge, Histogram};

#[derive(Default)]
pub struct WorkerMetrics {
    pub shards_owned: Gauge,
    pub jobs_received: Counter,
    pub jobs_done: Counter,
    pub duplicate_outcomes: Counter,
    /// Outcomes announced before `queue.replica_acks` replicas held them.
    pub outcomes_unreplicated: Counter,
    pub jobs_failed: Counter,
    pub jobs_expired: Counter,
    pub jobs_dead_lettered: Counter,
    pub jobs_panicked: Counter,
    pub jobs_claimed: Counter,
    pub jobs_left_pending: Counter,
    pub jobs_in_progress: Gauge,
    pub key_cache_hits: Counter,
    pub key_cache_misses: Counter,
    pub key_loads: Counter,
    pub key_cache_evictions: Counter,
    pub key_cache_bytes: Gauge,
    pub fhe_seconds: Histogram,
    pub job_seconds: Histogram,
}

impl WorkerMetrics {
    pub fn render(&self) -> String {
        let mut e = Exposition::default();
        e.gauge(
            "hyfhe_worker_shards_owned",
            "Queue shards this worker leases.",
            self.shards_owned.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_received_total",
            "Jobs delivered to this worker.",
            self.jobs_received.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_done_total",
            "Jobs evaluated and stored.",
            self.jobs_done.get(),
        );
        e.counter(
            "hyfhe_worker_duplicate_outcomes_total",
            "Jobs finished here after another evaluation had stored their outcome.",
            self.duplicate_outcomes.get(),
        );
        e.counter(
            "hyfhe_worker_outcomes_unreplicated_total",
            "Outcomes announced before queue.replica_acks replicas acknowledged them (a failover then would lose them and their bills).",
            self.outcomes_unreplicated.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_failed_total",
            "Jobs completed with an error outcome.",
            self.jobs_failed.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_expired_total",
            "Jobs dropped past their deadline.",
            self.jobs_expired.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_panicked_total",
            "Evaluations that panicked (a bug): answered as internal errors and dead-lettered.",
            self.jobs_panicked.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_dead_lettered_total",
            "Jobs moved to the dead-letter stream.",
            self.jobs_dead_lettered.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_claimed_total",
            "Pending jobs taken over from another consumer.",
            self.jobs_claimed.get(),
        );
        e.counter(
            "hyfhe_worker_jobs_left_pending_total",
            "Jobs left pending for redelivery after a transient failure.",
            self.jobs_left_pending.get(),
        );
        e.gauge(
            "hyfhe_worker_jobs_in_progress",
            "Jobs read and not yet finished.",
            self.jobs_in_progress.get(),
        );
        e.counter(
            "hyfhe_worker_key_cache_hits_total",
            "Evaluation-key lookups served from memory.",
            self.key_cache_hits.get(),
        );
        e.counter(
            "hyfhe_worker_key_cache_misses_total",
            "Evaluation-key lookups that had to wait for a load.",
            self.key_cache_misses.get(),
        );
        e.counter(
            "hyfhe_worker_key_loads_total",
            "Evaluation keys fetched and Fourier-transformed.",
            self.key_loads.get(),
        );
        e.counter(
            "hyfhe_worker_key_cache_evictions_total",
            "Keys evicted to stay under the byte bound.",
            self.key_cache_evictions.get(),
        );
        e.gauge(
            "hyfhe_worker_key_cache_bytes",
            "Bytes of Fourier packing keys in the cache.",
            self.key_cache_bytes.get(),
        );
        e.histogram(
            "hyfhe_worker_fhe_seconds",
            "FHE evaluation time per job.",
            &self.fhe_seconds,
        );
        e.histogram(
            "hyfhe_worker_job_seconds",
            "Time from delivery to stored outcome.",
            &self.job_seconds,
        );
        e.finish()
    }
}
