//! One job from delivery to stored outcome: module, key, evaluation, result.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::evaluator::Evaluate;
use super::in_flight::InFlight;
use super::key_cache::GetKey;
use super::module_cache::GetModule;
use super::result_writer::WriteOutcome;
use super::{Evaluator, JobError, KeyCache, ModuleCache, ResultWriter, WorkerMetrics};
use crate::fhe::{decode, encode, EncryptedRows};
use crate::protocol::{ErrorCode, MAX_PAYLOAD_BYTES};
use crate::queue::{now_unix_ms, Broker, Delivery, JobOutcome, StoredOutcome};

/// What every job needs; shared by the reader, the lease keeper and every job task.
pub struct Pipeline {
    pub broker: Arc<dyn Broker>,
    pub max_deliveries: u32,
    pub keys: Addr<KeyCache>,
    pub modules: Addr<ModuleCache>,
    pub evaluator: Addr<Evaluator>,
    pub writer: Addr<ResultWriter>,
    pub metrics: Arc<WorkerMetrics>,
    /// At most `max_pending` jobs between read and stored outcome.
    pub permits: Arc<Semaphore>,
    pub in_flight: InFlight,
}

impl Pipeline {
    /// Every permit free now, without waiting.
    pub fn spare_permits(&self) -> impl Iterator<Item = OwnedSemaphorePermit> + '_ {
        std::iter::from_fn(|| self.permits.clone().try_acquire_owned().ok())
    }

    /// Start each delivery with one of `permits`. The queue returns at most as many entries as
    /// it was asked for (one per permit); should it ever return more, the surplus waits for a
    /// permit, registered as running all the same (refreshed, its shard kept busy).
    pub async fn start_all(
        self: &Arc<Self>,
        deliveries: Vec<Delivery>,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) {
        for delivery in deliveries {
            let permit = match permits.pop() {
                Some(p) => p,
                None => {
                    tracing::error!(entry = %delivery.entry_id, "queue returned more entries than asked for");
                    match self.permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            };
            self.start(delivery, permit);
        }
    }

    /// Run `delivery` on its own task unless it is already running here (a claim can return an
    /// entry this worker still runs, if it lost and retook the shard).
    pub fn start(self: &Arc<Self>, delivery: Delivery, permit: OwnedSemaphorePermit) {
        if !self.in_flight.start(delivery.shard, &delivery.entry_id) {
            tracing::debug!(entry = %delivery.entry_id, "already running here; not started twice");
            return;
        }
        actix::spawn(process(self.clone(), delivery, permit));
    }
}

async fn process(p: Arc<Pipeline>, delivery: Delivery, _permit: OwnedSemaphorePermit) {
    let start = Instant::now();
    p.metrics.jobs_received.inc();
    p.metrics.jobs_in_progress.inc();
    let job = &delivery.job;
    let span = tracing::info_span!("job", job = %job.client_job_id, module = %job.module, shard = delivery.shard);
    crate::telemetry::set_parent(&span, job.traceparent.as_deref());
    // A panic in the job's own steps (not only the evaluator's) must not leave its entry marked
    // running here forever (refreshed, never claimed, its shard never drained).
    let finished = std::panic::AssertUnwindSafe(run(&p, &delivery).instrument(span))
        .catch_unwind()
        .await;
    if finished.is_err() {
        p.metrics.jobs_panicked.inc();
        let reason = format!(
            "internal error processing job {} (the worker caught a panic); not retried",
            job.client_job_id
        );
        dead_letter(&p, &delivery, ErrorCode::Internal, &reason).await;
    }
    p.in_flight.finish(delivery.shard, &delivery.entry_id);
    p.metrics.jobs_in_progress.dec();
    p.metrics.job_seconds.observe(start.elapsed().as_secs_f64());
}

async fn run(p: &Pipeline, delivery: &Delivery) {
    let job = &delivery.job;
    // Past its deadline nobody waits for the job: drop it without an outcome, so that a retry
    // under the same key (which has a deadline of its own) runs it rather than being answered
    // `deadline_exceeded` from the store.
    if now_unix_ms() > job.deadline_unix_ms {
        p.metrics.jobs_expired.inc();
        if let Err(e) = p.broker.discard(delivery).await {
            tracing::warn!(error = %e, "dropping an expired job failed; it stays pending");
        }
        return;
    }
    let stored = |fhe_seconds: f64, outcome: JobOutcome| StoredOutcome {
        request_sha256: job.request_sha256.clone(),
        fhe_seconds,
        outcome,
    };
    let (outcome, evaluated) = match p.broker.outcome(&job.id).await {
        // A redelivery of a job whose outcome is stored (whatever its delivery count):
        // acknowledge, do not recompute and do not dead-letter.
        Ok(Some(done)) => (done, false),
        Ok(None) if delivery.deliveries > p.max_deliveries => {
            let reason = format!(
                "job {} failed {} deliveries (limit {}); moved to the dead-letter stream",
                job.client_job_id,
                delivery.deliveries - 1,
                p.max_deliveries
            );
            return dead_letter(p, delivery, ErrorCode::DeadLettered, &reason).await;
        }
        Ok(None) => match evaluate(p, delivery).await {
            Ok((bytes, seconds)) => (stored(seconds, JobOutcome::Done(bytes)), true),
            // A panic is a bug, not a transient fault: redelivering the job would only take
            // down the next evaluation too. Answer now and dead-letter it.
            Err(JobError::Panicked(message)) => {
                p.metrics.jobs_panicked.inc();
                let reason = format!(
                    "internal error evaluating job {} (the worker caught a panic: {message}); not retried",
                    job.client_job_id
                );
                tracing::error!(job = %job.client_job_id, module = %job.module, panic = %message, "evaluation panicked");
                return dead_letter(p, delivery, ErrorCode::Internal, &reason).await;
            }
            Err(e) => match e.code() {
                Some(code) => (stored(0.0, JobOutcome::failed(code, e.to_string())), true),
                None => return leave_pending(p, delivery, &e),
            },
        },
        Err(e) => return leave_pending(p, delivery, &JobError::Transient(e.to_string())),
    };
    let write = p.writer.send(WriteOutcome {
        delivery: delivery.clone(),
        outcome,
        evaluated,
    });
    match write.instrument(tracing::info_span!("publish")).await {
        Ok(Ok(())) => {}
        // The entry stays pending and is claimed again later.
        Ok(Err(e)) => tracing::warn!(error = %e, "storing outcome failed"),
        Err(e) => tracing::warn!(error = %e, "result writer unavailable"),
    }
}

async fn dead_letter(p: &Pipeline, delivery: &Delivery, code: ErrorCode, reason: &str) {
    tracing::warn!(job = %delivery.job.client_job_id, "dead-lettered");
    match p.broker.dead_letter(delivery, code, reason).await {
        Ok(()) => p.metrics.jobs_dead_lettered.inc(),
        Err(e) => tracing::warn!(error = %e, "dead-letter failed"),
    }
}

/// A transient failure is not the job's outcome: the entry stays pending, an idle claim
/// redelivers it (counting a delivery, so a failure that never clears ends in the dead letter).
fn leave_pending(p: &Pipeline, delivery: &Delivery, e: &JobError) {
    p.metrics.jobs_left_pending.inc();
    tracing::warn!(job = %delivery.job.client_job_id, error = %e, "transient failure; job left pending for redelivery");
}

async fn evaluate(p: &Pipeline, delivery: &Delivery) -> Result<(Vec<u8>, f64), JobError> {
    let job = &delivery.job;
    let mailbox = |e: actix::MailboxError| JobError::Internal(e.to_string());
    let layer = p
        .modules
        .send(GetModule {
            model: job.model.clone(),
            module: job.module.clone(),
        })
        .await
        .map_err(mailbox)??;
    let rows: EncryptedRows =
        decode(&job.payload, MAX_PAYLOAD_BYTES).map_err(|e| JobError::BadRequest(e.to_string()))?;
    let key = p
        .keys
        .send(GetKey {
            key_id: job.key_id.clone(),
            tenant: job.tenant.clone(),
            parent: tracing::Span::current(),
        })
        .await
        .map_err(mailbox)??;
    let evaluated = p
        .evaluator
        .send(Evaluate {
            module: job.module.clone(),
            layer,
            key,
            rows,
            parent: tracing::Span::current(),
        })
        .await
        .map_err(mailbox)??;
    Ok((encode(&evaluated.outputs), evaluated.seconds))
}
