//! Worker actors driven in process over the in-memory queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyfhe::config::Config;
use hyfhe::protocol::ErrorCode;
use hyfhe::queue::{Broker, Job, JobOutcome, JobQueue, MemoryQueue, SessionStore};
use hyfhe::worker::{self, GetKeyCacheStats, ModuleSet, Stats};

use crate::serving::MODELS;

/// A job for FCSmall's `seq.0` whose payload no worker should ever get to evaluate.
fn job(id: &str, deadline_unix_ms: u64) -> Job {
    Job {
        id: id.into(),
        client_job_id: id.into(),
        tenant: "demo".into(),
        session: "s".into(),
        model: "fc_small".into(),
        module: "seq.0".into(),
        key_id: "k".into(),
        request_sha256: "d".into(),
        rows: 1,
        deadline_unix_ms,
        traceparent: None,
        payload: vec![0; 8],
    }
}

/// The outcome the worker stores for `job_id`, waiting up to 10 s for it.
async fn outcome_of(queue: &MemoryQueue, job_id: &str) -> JobOutcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(o) = queue.outcome(job_id).await.unwrap() {
            return o.outcome;
        }
        assert!(Instant::now() < deadline, "no outcome for {job_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_job_past_max_deliveries_is_dead_lettered_with_a_clear_error() {
    let mut config = Config::load(None).unwrap();
    config.queue.shards = 1;
    config.queue.max_shards = 1;
    config.queue.max_deliveries = 2;
    config.worker.heartbeat_ms = 50;
    let queue = Arc::new(MemoryQueue::new(config.queue_settings()));
    let broker: Arc<dyn Broker> = queue.clone();
    let job = job("poison-0001", u64::MAX);
    let modules = Arc::new(ModuleSet::load(&MODELS.dir).unwrap());
    actix::System::new().block_on(async move {
        queue.enqueue(&job).await.unwrap();
        // Two deliveries to consumers that died before finishing (read, then a takeover).
        assert_eq!(queue.read("ghost", &[0], 1, 10).await.unwrap().len(), 1);
        assert_eq!(
            queue.claim("ghost", 0, 0, 1).await.unwrap()[0].deliveries,
            2
        );
        // The ghost died: by the time its lease could have expired its entry has been idle; a
        // takeover claims entries idle half a lease TTL (not those a live owner just read).
        tokio::time::sleep(Duration::from_millis(config.queue.lease_ttl_ms / 2 + 100)).await;
        // A real worker takes the shard over: the third delivery is past the limit.
        let handle = worker::start(&config, broker, modules);
        let outcome = outcome_of(&queue, &job.id).await;
        match outcome {
            JobOutcome::Failed { code, message } => {
                assert_eq!(code, ErrorCode::DeadLettered);
                assert!(
                    message.contains("poison-0001") && message.contains("dead-letter"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(queue.dead_letters().await.unwrap(), 1);
        assert_eq!(handle.metrics.jobs_dead_lettered.get(), 1);
        assert_eq!(handle.metrics.jobs_done.get(), 0, "never evaluated");
    });
}

/// An entry left pending on a shard an idle worker has held for a while (a delivery whose
/// consumer died, a completion that failed) is claimed within `claim_idle_ms` and a read: the
/// idle reader holds every permit while it blocks on a read, so the claim runs in the reader,
/// with those permits (the lease keeper used to try for spare permits at its heartbeat, and an
/// idle reader almost never left one: such an entry waited minutes).
#[test]
fn an_idle_worker_claims_an_entry_left_pending_on_its_own_shard() {
    let mut config = Config::load(None).unwrap();
    config.queue.shards = 1;
    config.queue.max_shards = 1;
    config.worker.max_pending = 1;
    config.worker.heartbeat_ms = 50;
    config.worker.read_block_ms = 1000;
    config.worker.claim_idle_ms = 1000;
    let queue = Arc::new(MemoryQueue::new(config.queue_settings()));
    let broker: Arc<dyn Broker> = queue.clone();
    let job = job("stranded-0001", u64::MAX);
    let modules = Arc::new(ModuleSet::load(&MODELS.dir).unwrap());
    actix::System::new().block_on(async move {
        queue.enqueue(&job).await.unwrap();
        // Delivered to a consumer that dies: pending, idle from now on. Not idle long enough for
        // the takeover claim (half a lease TTL) when the worker takes the shard just after.
        assert_eq!(queue.read("ghost", &[0], 1, 10).await.unwrap().len(), 1);
        let started = Instant::now();
        let handle = worker::start(&config, broker, modules);
        // Claimed in an idle round (after claim_idle_ms), at the reader's next read at most.
        outcome_of(&queue, &job.id).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(
                config.worker.claim_idle_ms + 2 * config.worker.read_block_ms + 1000
            ),
            "claimed after {took:?}"
        );
        assert_eq!(handle.metrics.jobs_claimed.get(), 1);
    });
}

#[test]
fn a_job_past_its_deadline_is_dropped_not_computed() {
    let mut config = Config::load(None).unwrap();
    config.queue.shards = 1;
    config.queue.max_shards = 1;
    config.worker.heartbeat_ms = 50;
    let queue = Arc::new(MemoryQueue::new(config.queue_settings()));
    let broker: Arc<dyn Broker> = queue.clone();
    let job = job("late-0001", 1);
    let modules = Arc::new(ModuleSet::load(&MODELS.dir).unwrap());
    actix::System::new().block_on(async move {
        queue.enqueue(&job).await.unwrap();
        let handle = worker::start(&config, broker, modules);
        let dropped = Instant::now();
        while handle.metrics.jobs_expired.get() == 0 {
            assert!(dropped.elapsed() < Duration::from_secs(10), "never taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Nobody waits for it: acknowledged without an outcome, so that a retry under the same
        // key (with a deadline of its own) runs the job instead of reading a stored failure.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(queue.outcome(&job.id).await.unwrap(), None);
        assert_eq!(queue.depth().await.unwrap(), 0, "the entry is gone");
        assert_eq!(handle.metrics.jobs_expired.get(), 1);
        assert_eq!(
            handle.metrics.key_cache_misses.get(),
            0,
            "no key was even looked up"
        );
        // The actors answer for what they hold.
        let reader = handle.reader.send(Stats).await.unwrap();
        assert_eq!(reader.jobs_in_flight, 0, "{reader:?}");
        assert_eq!(reader.shards_owned, vec![0], "{reader:?}");
        assert!(!reader.leaving);
        let keys = handle.keys.send(GetKeyCacheStats).await.unwrap();
        assert_eq!((keys.keys, keys.bytes, keys.loading), (0, 0, 0), "{keys:?}");
    });
}

#[test]
fn a_panicking_evaluation_is_answered_as_an_internal_error_dead_lettered_and_the_worker_lives_on() {
    let mut config = Config::load(None).unwrap();
    config.queue.shards = 1;
    config.queue.max_shards = 1;
    config.worker.heartbeat_ms = 50;
    let queue = Arc::new(MemoryQueue::new(config.queue_settings()));
    let broker: Arc<dyn Broker> = queue.clone();
    let modules = Arc::new(ModuleSet::load(&MODELS.dir).unwrap());
    let fc = hyfhe::hybrid::HybridModel::load(MODELS.dir.join("fc_small")).unwrap();
    let payload = crate::serving::encrypted_zero_row(&fc);
    let key = crate::serving::SESSION_KEYS.evaluation_key_blobs()[0].clone();
    let hooks = worker::TestHooks {
        panic_on_module: Some("seq.0".into()),
    };
    actix::System::new().block_on(async move {
        queue.put_key("k", &key, 600_000).await.unwrap();
        let poison = Job {
            payload: payload.clone(),
            ..job("panics-0001", u64::MAX)
        };
        queue.enqueue(&poison).await.unwrap();
        let handle = worker::start_with_hooks(&config, broker, modules, hooks);
        match outcome_of(&queue, &poison.id).await {
            JobOutcome::Failed { code, message } => {
                assert_eq!(code, ErrorCode::Internal);
                assert!(
                    message.contains("panic") && message.contains("not retried"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(handle.metrics.jobs_panicked.get(), 1);
        assert_eq!(
            queue.dead_letters().await.unwrap(),
            1,
            "dead-lettered at once"
        );
        assert_eq!(queue.depth().await.unwrap(), 0, "not left for redelivery");
        // The worker survived the panic and takes the next job as usual (a malformed payload:
        // its typed outcome).
        let next = job("after-0001", u64::MAX);
        queue.enqueue(&next).await.unwrap();
        match outcome_of(&queue, &next.id).await {
            JobOutcome::Failed { code, .. } => assert_eq!(code, ErrorCode::BadRequest),
            other => panic!("{other:?}"),
        }
        let reader = handle.reader.send(Stats).await.unwrap();
        assert_eq!(reader.jobs_in_flight, 0, "{reader:?}");
        assert_eq!(handle.metrics.jobs_received.get(), 2);
    });
}
