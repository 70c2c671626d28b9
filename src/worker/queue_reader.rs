//! The queue reader: reads new jobs from the leased shards and starts each on the job pipeline;
//! the lease keeper runs beside it. It answers [`Stats`], and [`Leave`] drains it: no new reads,
//! the jobs in flight finish, then the leases are given back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};
use tokio::sync::{watch, Semaphore};

use super::in_flight::InFlight;
use super::job_pipeline::Pipeline;
use super::{lease_keeper, Evaluator, KeyCache, ModuleCache, ResultWriter, WorkerMetrics};
use crate::config::WorkerConfig;
use crate::queue::{Broker, Leases};

/// How long [`Leave`] waits for jobs in flight before giving the leases back anyway (their
/// entries are then claimed and rerun by the next owner).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// How long [`Leave`] waits for the lease keeper's last heartbeat (short commands time out in
/// 2 s, a heartbeat makes a few).
const KEEPER_STOP_LIMIT: Duration = Duration::from_secs(10);

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
    pipeline: Option<Arc<Pipeline>>,
    shared: Arc<Shared>,
}

/// State the reader shares with its lease keeper.
#[derive(Default)]
pub struct Shared {
    /// Set by [`Leave`]: read nothing new, claim nothing.
    pub leaving: AtomicBool,
    /// Set once drained: the lease keeper stops (so it cannot retake what `leave` gives back).
    pub stopped: AtomicBool,
    /// Set by the lease keeper as it returns: no heartbeat of its can still be in flight.
    pub keeper_done: AtomicBool,
    /// The last heartbeat's leases.
    pub leases: Mutex<Leases>,
    /// Owned shards with entries to claim, and the idle time the claim asks for: set by the
    /// lease keeper, claimed by the reader with the permits it holds. (The keeper used to claim
    /// itself, with whatever permits were spare at its heartbeat; an idle reader holds every
    /// permit while it blocks on a read, so a pending entry could wait minutes for a claim.)
    pub claims: Mutex<BTreeMap<u32, u64>>,
}

impl QueueReader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        broker: Arc<dyn Broker>,
        settings: WorkerConfig,
        max_deliveries: u32,
        keys: Addr<KeyCache>,
        modules: Addr<ModuleCache>,
        evaluator: Addr<Evaluator>,
        writer: Addr<ResultWriter>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            id,
            broker,
            settings,
            max_deliveries,
            keys,
            modules,
            evaluator,
            writer,
            metrics,
            pipeline: None,
            shared: Arc::new(Shared::default()),
        }
    }
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
            in_flight: InFlight::default(),
        });
        self.pipeline = Some(pipeline.clone());
        let (shards_tx, shards_rx) = watch::channel(Vec::new());
        tracing::info!(worker = %self.id, "worker started");
        ctx.spawn(
            lease_keeper::run(
                self.id.clone(),
                self.settings.clone(),
                pipeline.clone(),
                self.shared.clone(),
                shards_tx,
            )
            .into_actor(self),
        );
        ctx.spawn(
            reads(
                self.id.clone(),
                self.settings.clone(),
                pipeline,
                self.shared.clone(),
                shards_rx,
            )
            .into_actor(self),
        );
    }
}

/// What the reader holds now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReaderStats {
    pub jobs_in_flight: usize,
    pub shards_owned: Vec<u32>,
    pub shards_draining: Vec<u32>,
    pub leaving: bool,
}

/// Ask an actor for its counters.
#[derive(actix::Message)]
#[rtype(result = "ReaderStats")]
pub struct Stats;

impl actix::Handler<Stats> for QueueReader {
    type Result = actix::MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        let leases = self.shared.leases.lock().unwrap_or_else(|p| p.into_inner());
        actix::MessageResult(ReaderStats {
            jobs_in_flight: self.pipeline.as_ref().map_or(0, |p| p.in_flight.len()),
            shards_owned: leases.owned.clone(),
            shards_draining: leases.draining.clone(),
            leaving: self.shared.leaving.load(Ordering::Acquire),
        })
    }
}

/// Stop reading, let the jobs in flight finish (up to [`DRAIN_LIMIT`]), give back the leases
/// and stop (graceful shutdown).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Leave;

impl actix::Handler<Leave> for QueueReader {
    type Result = actix::ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Leave, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let id = self.id.clone();
        let shared = self.shared.clone();
        let pipeline = self.pipeline.clone();
        shared.leaving.store(true, Ordering::Release);
        Box::pin(
            async move {
                let started = Instant::now();
                let running = || pipeline.as_ref().map_or(0, |p| p.in_flight.len());
                while running() > 0 && started.elapsed() < DRAIN_LIMIT {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if running() > 0 {
                    tracing::warn!(jobs = running(), "leaving with jobs still running");
                }
                shared.stopped.store(true, Ordering::Release);
                // A heartbeat already under way could take back a shard released below.
                let waited = Instant::now();
                while !shared.keeper_done.load(Ordering::Acquire)
                    && waited.elapsed() < KEEPER_STOP_LIMIT
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if let Err(e) = broker.leave(&id).await {
                    tracing::warn!(error = %e, "could not give back leases");
                }
            }
            .into_actor(self)
            .map(|_, _, ctx: &mut Context<Self>| ctx.stop()),
        )
    }
}

/// Ask for a claim of `shard`'s entries idle at least `min_idle` ms; asked twice, the shorter
/// idle time stands (it takes everything the longer one would).
pub fn ask_claim(claims: &mut BTreeMap<u32, u64>, shard: u32, min_idle: u64) {
    let asked = claims.entry(shard).or_insert(min_idle);
    *asked = (*asked).min(min_idle);
}

/// Claim the entries the lease keeper asked for, on shards still owned, with `permits` (each
/// claimed entry starts at once, in flight, with one of them); a shard with more left than there
/// were permits stays asked for.
async fn claim_due(
    id: &str,
    pipeline: &Arc<Pipeline>,
    shared: &Shared,
    owned: &[u32],
    permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>,
) {
    let due = std::mem::take(&mut *shared.claims.lock().unwrap_or_else(|p| p.into_inner()));
    let mut left = BTreeMap::new();
    for (shard, min_idle) in due {
        if !owned.contains(&shard) {
            continue;
        }
        if permits.is_empty() {
            left.insert(shard, min_idle);
            continue;
        }
        let asked = permits.len();
        match pipeline.broker.claim(id, shard, min_idle, asked).await {
            Ok(claimed) => {
                if claimed.len() >= asked {
                    left.insert(shard, min_idle);
                }
                pipeline.metrics.jobs_claimed.add(claimed.len() as u64);
                pipeline.start_all(claimed, permits).await;
            }
            Err(e) => {
                left.insert(shard, min_idle);
                tracing::warn!(error = %e, shard, "claim failed");
            }
        }
    }
    let mut claims = shared.claims.lock().unwrap_or_else(|p| p.into_inner());
    for (shard, min_idle) in left {
        ask_claim(&mut claims, shard, min_idle);
    }
}

async fn reads(
    id: String,
    settings: WorkerConfig,
    pipeline: Arc<Pipeline>,
    shared: Arc<Shared>,
    mut shards: watch::Receiver<Vec<u32>>,
) {
    while !shared.leaving.load(Ordering::Acquire) {
        // Only read what we can start: every entry holds a permit from the moment it is read, so
        // at most `max_pending` entries (and their payloads) are on this worker, every one of them
        // in flight (refreshed, and keeping its shard busy until it finishes).
        let Ok(first) = pipeline.permits.clone().acquire_owned().await else {
            return;
        };
        let owned = shards.borrow_and_update().clone();
        if owned.is_empty() || shared.leaving.load(Ordering::Acquire) {
            drop(first);
            let _ = tokio::time::timeout(
                Duration::from_millis(settings.read_block_ms),
                shards.changed(),
            )
            .await;
            continue;
        }
        let mut permits = vec![first];
        permits.extend(pipeline.spare_permits());
        claim_due(&id, &pipeline, &shared, &owned, &mut permits).await;
        if permits.is_empty() {
            continue;
        }
        let deliveries = match pipeline
            .broker
            .read(&id, &owned, permits.len(), settings.read_block_ms)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "queue read failed");
                tokio::time::sleep(Duration::from_millis(settings.read_block_ms)).await;
                continue;
            }
        };
        // Permits left over go back as `permits` drops.
        pipeline.start_all(deliveries, &mut permits).await;
    }
}
