//! Reads jobs from the leased shards and drives each through module, key, evaluation and result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::evaluator::Evaluate;
use super::key_cache::GetKey;
use super::module_cache::GetModule;
use super::result_writer::WriteOutcome;
use super::{Evaluator, JobError, KeyCache, ModuleCache, ResultWriter, WorkerMetrics};
use crate::config::WorkerConfig;
use crate::fhe::{decode, encode, EncryptedRows};
use crate::protocol::{ErrorCode, MAX_PAYLOAD_BYTES};
use crate::queue::{now_unix_ms, Broker, Delivery, JobOutcome};

pub struct QueueReader {
    pub id: String,
    pub broker: Arc<dyn Broker>,
    pub settings: WorkerConfig,
    pub max_deliveries: u32,
    pub keys: Addr<KeyCache>,
    pub modules: Addr<ModuleCache>,
    pub evaluator: Addr<Evaluator>,
    pub writer: Addr<ResultWriter>,
    pub metrics: Arc<WorkerMetrics>,
}

/// What one job needs; shared by every job task.
struct Pipeline {
    broker: Arc<dyn Broker>,
    max_deliveries: u32,
    keys: Addr<KeyCache>,
    modules: Addr<ModuleCache>,
    evaluator: Addr<Evaluator>,
    writer: Addr<ResultWriter>,
    metrics: Arc<WorkerMetrics>,
    /// At most `max_pending` jobs between read and stored outcome.
    permits: Arc<Semaphore>,
}

impl Actor for QueueReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let pipeline = Arc::new(Pipeline {
            broker: self.broker.clone(),
            max_deliveries: self.max_deliveries,
            keys: self.keys.clone(),
            modules: self.modules.clone(),
            evaluator: self.evaluator.clone(),
            writer: self.writer.clone(),
            metrics: self.metrics.clone(),
            permits: Arc::new(Semaphore::new(self.settings.max_pending)),
        });
        let (shards_tx, shards_rx) = watch::channel(Vec::new());
        tracing::info!(worker = %self.id, "worker started");
        ctx.spawn(
            heartbeats(
                self.id.clone(),
                self.settings.clone(),
                pipeline.clone(),
                shards_tx,
            )
            .into_actor(self),
        );
        ctx.spawn(
            reads(self.id.clone(), self.settings.clone(), pipeline, shards_rx).into_actor(self),
        );
    }
}

/// Ask the reader to give back its leases and stop (graceful shutdown).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Leave;

impl actix::Handler<Leave> for QueueReader {
    type Result = actix::ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Leave, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let id = self.id.clone();
        Box::pin(
            async move {
                if let Err(e) = broker.leave(&id).await {
                    tracing::warn!(error = %e, "could not give back leases");
                }
            }
            .into_actor(self)
            .map(|_, _, ctx: &mut Context<Self>| ctx.stop()),
        )
    }
}

async fn heartbeats(
    id: String,
    settings: WorkerConfig,
    pipeline: Arc<Pipeline>,
    shards: watch::Sender<Vec<u32>>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(settings.heartbeat_ms));
    let mut last_idle_claim = Instant::now();
    loop {
        tick.tick().await;
        let leases = match pipeline.broker.heartbeat(&id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                continue;
            }
        };
        pipeline.metrics.shards_owned.set(leases.owned.len() as u64);
        if !leases.acquired.is_empty() {
            tracing::info!(worker = %id, shards = ?leases.acquired, "acquired shards");
        }
        shards.send_replace(leases.owned.clone());
        // A shard just taken may hold a dead worker's unacknowledged jobs: take them all now.
        // On shards held for a while, only entries idle past `claim_idle_ms` (a stuck reader).
        let idle_round = last_idle_claim.elapsed() >= Duration::from_millis(settings.claim_idle_ms);
        if idle_round {
            last_idle_claim = Instant::now();
        }
        for &shard in &leases.owned {
            let min_idle = if leases.acquired.contains(&shard) {
                0
            } else if idle_round {
                settings.claim_idle_ms
            } else {
                continue;
            };
            match pipeline.broker.claim(&id, shard, min_idle).await {
                Ok(claimed) => {
                    for delivery in claimed {
                        pipeline.metrics.jobs_claimed.inc();
                        let p = pipeline.clone();
                        actix::spawn(async move {
                            let Ok(permit) = p.permits.clone().acquire_owned().await else {
                                return;
                            };
                            process(p, delivery, permit).await;
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, shard, "claim failed"),
            }
        }
    }
}

async fn reads(
    id: String,
    settings: WorkerConfig,
    pipeline: Arc<Pipeline>,
    mut shards: watch::Receiver<Vec<u32>>,
) {
    loop {
        // Only read what we can start: jobs left unread stay for a worker with room.
        let Ok(permit) = pipeline.permits.clone().acquire_owned().await else {
            return;
        };
        let owned = shards.borrow_and_update().clone();
        if owned.is_empty() {
            drop(permit);
            let _ = tokio::time::timeout(
                Duration::from_millis(settings.read_block_ms),
                shards.changed(),
            )
            .await;
            continue;
        }
        let room = 1 + pipeline.permits.available_permits();
        let deliveries = match pipeline
            .broker
            .read(&id, &owned, room, settings.read_block_ms)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "queue read failed");
                tokio::time::sleep(Duration::from_millis(settings.read_block_ms)).await;
                continue;
            }
        };
        let mut first = Some(permit);
        for delivery in deliveries {
            let permit = match first.take() {
                Some(p) => p,
                None => match pipeline.permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            actix::spawn(process(pipeline.clone(), delivery, permit));
        }
    }
}

async fn process(p: Arc<Pipeline>, delivery: Delivery, _permit: OwnedSemaphorePermit) {
    let start = Instant::now();
    p.metrics.jobs_received.inc();
    p.metrics.jobs_in_progress.inc();
    let job = &delivery.job;
    let span =
        tracing::info_span!("job", job = %job.id, module = %job.module, shard = delivery.shard);
    crate::telemetry::set_parent(&span, job.traceparent.as_deref());
    async {
        if delivery.deliveries > p.max_deliveries {
            let reason = format!(
                "job {} failed {} deliveries (limit {}); moved to the dead-letter stream",
                job.id,
                delivery.deliveries - 1,
                p.max_deliveries
            );
            tracing::warn!(job = %job.id, "dead-lettered");
            match p.broker.dead_letter(&delivery, &reason).await {
                Ok(()) => p.metrics.jobs_dead_lettered.inc(),
                Err(e) => tracing::warn!(error = %e, "dead-letter failed"),
            }
            return;
        }
        let outcome = if now_unix_ms() > job.deadline_unix_ms {
            p.metrics.jobs_expired.inc();
            JobOutcome::failed(
                ErrorCode::DeadlineExceeded.as_str(),
                "the job's deadline passed before a worker took it",
            )
        } else {
            match p.broker.outcome(&job.id).await {
                // A redelivery of a job whose outcome is stored: acknowledge, do not recompute.
                Ok(Some(stored)) => stored,
                _ => match evaluate(&p, &delivery).await {
                    Ok(bytes) => JobOutcome::Done(bytes),
                    Err(e) => JobOutcome::failed(e.code().as_str(), e.to_string()),
                },
            }
        };
        let write = p.writer.send(WriteOutcome {
            delivery: delivery.clone(),
            outcome,
        });
        match write.instrument(tracing::info_span!("publish")).await {
            Ok(Ok(())) => {}
            // The entry stays pending and is claimed again later.
            Ok(Err(e)) => tracing::warn!(error = %e, "storing outcome failed"),
            Err(e) => tracing::warn!(error = %e, "result writer unavailable"),
        }
    }
    .instrument(span)
    .await;
    p.metrics.jobs_in_progress.dec();
    p.metrics.job_seconds.observe(start.elapsed().as_secs_f64());
}

async fn evaluate(p: &Pipeline, delivery: &Delivery) -> Result<Vec<u8>, JobError> {
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
            parent: tracing::Span::current(),
        })
        .await
        .map_err(mailbox)??;
    let outputs = p
        .evaluator
        .send(Evaluate {
            layer,
            key,
            rows,
            parent: tracing::Span::current(),
        })
        .await
        .map_err(mailbox)??;
    Ok(encode(&outputs))
}
