//! The lease keeper: one heartbeat per `heartbeat_ms` renews this worker's shard leases, keeps
//! the shards whose jobs are still running (draining, not read), refreshes those jobs' entries so
//! that no idle claim takes them, and asks the reader to claim pending entries (of shards just
//! taken over, and idle ones).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::job_pipeline::Pipeline;
use super::queue_reader::{ask_claim, Shared};
use crate::config::WorkerConfig;
use crate::queue::Leases;

pub async fn run(
    id: String,
    settings: WorkerConfig,
    pipeline: Arc<Pipeline>,
    shared: Arc<Shared>,
    shards: watch::Sender<Vec<u32>>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(settings.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_idle_claim = Instant::now();
    while !shared.stopped.load(Ordering::Acquire) {
        tick.tick().await;
        if shared.stopped.load(Ordering::Acquire) {
            break;
        }
        let busy = pipeline.in_flight.busy_shards();
        let leases = match pipeline.broker.heartbeat(&id, &busy).await {
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
        let readable = if shared.leaving.load(Ordering::Acquire) {
            Vec::new()
        } else {
            leases.owned.clone()
        };
        shards.send_replace(readable);
        *shared.leases.lock().unwrap_or_else(|p| p.into_inner()) = leases.clone();
        refresh_running(&id, &pipeline, &leases).await;
        let idle_round = last_idle_claim.elapsed() >= Duration::from_millis(settings.claim_idle_ms);
        if idle_round {
            last_idle_claim = Instant::now();
        }
        if !shared.leaving.load(Ordering::Acquire) {
            ask_claims(&settings, &pipeline, &shared, &leases, idle_round);
        }
    }
    shared.keeper_done.store(true, Ordering::Release);
}

/// Reset the idle time of every job running here, on the shards still held: a long evaluation
/// must not look abandoned to an idle claim (ours or another worker's).
async fn refresh_running(id: &str, pipeline: &Pipeline, leases: &Leases) {
    for (shard, entries) in pipeline.in_flight.by_shard() {
        if !leases.owned.contains(&shard) && !leases.draining.contains(&shard) {
            continue;
        }
        if let Err(e) = pipeline.broker.refresh(id, shard, &entries).await {
            tracing::warn!(error = %e, shard, "refreshing running entries failed");
        }
    }
}

/// A shard just taken may hold a dead worker's unacknowledged jobs: ask the reader to claim them
/// now. On shards held for a while, only entries idle past `claim_idle_ms` (jobs left pending
/// after a transient failure; running ones were refreshed just before), every `claim_idle_ms`.
/// The reader claims with the permits it holds (`queue_reader::claim_due`), before its next read.
fn ask_claims(
    settings: &WorkerConfig,
    pipeline: &Pipeline,
    shared: &Shared,
    leases: &Leases,
    idle_round: bool,
) {
    let mut claims = shared.claims.lock().unwrap_or_else(|p| p.into_inner());
    claims.retain(|shard, _| leases.owned.contains(shard));
    for &shard in &leases.owned {
        let min_idle = if leases.acquired.contains(&shard) {
            // Not 0: a shard handed over by a live worker (a rebalance) can still hold entries
            // that worker read just before giving it up and is about to run; taking them would
            // evaluate them twice (seen under `--scale`). A dead owner's entries have been idle
            // at least the lease TTL less a heartbeat by now, so half the TTL still takes them all.
            pipeline.broker.settings().lease_ttl_ms / 2
        } else if idle_round {
            settings.claim_idle_ms
        } else {
            continue;
        };
        ask_claim(&mut claims, shard, min_idle);
    }
}
