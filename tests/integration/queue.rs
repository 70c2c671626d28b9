//! The JobQueue contract, run against both implementations: Redis Streams on a redis-server the
//! test starts, and the in-memory queue of the embedded mode.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hyfhe::protocol::ErrorCode;
use hyfhe::queue::{
    shard_of, Begin, Broker, Completion, Job, JobOutcome, JobQueue, MemoryQueue, QueueError,
    QueueSettings, RedisQueue, Reserved, SessionQuota, SessionRecord, SessionStore, StoredOutcome,
    TenantUsage,
};

use crate::cluster::{
    redis_cli, sentinel_url, wait_until_replicated, wait_until_sentinels_converge, RedisServer,
    Sentinel,
};

pub fn settings() -> QueueSettings {
    QueueSettings {
        shards: 4,
        // Fixed here; `the_shard_count_grows…` lets it grow.
        max_shards: 4,
        max_depth: 3,
        max_deliveries: 2,
        lease_ttl_ms: 1500,
        result_ttl_ms: 60_000,
        read_block_ms: 1000,
        replica_acks: 0,
        replica_ack_timeout_ms: 1000,
    }
}

pub fn job(id: &str, session: &str) -> Job {
    Job {
        id: id.into(),
        client_job_id: id.into(),
        tenant: "t".into(),
        session: session.into(),
        model: "m".into(),
        module: "seq.0".into(),
        key_id: "k".into(),
        request_sha256: "digest-of-body".into(),
        rows: 1,
        deadline_unix_ms: u64::MAX,
        traceparent: None,
        payload: vec![1, 2, 3],
    }
}

fn stored(outcome: JobOutcome) -> StoredOutcome {
    StoredOutcome {
        request_sha256: "digest-of-body".into(),
        fhe_seconds: 0.5,
        outcome,
    }
}

/// A session id that lands on `shard`.
fn session_on(shard: u32) -> String {
    session_on_of(shard, settings().shards)
}

/// A session id that lands on `shard` of `shards`.
fn session_on_of(shard: u32, shards: u32) -> String {
    (0..)
        .map(|i| format!("session-{i}"))
        .find(|s| shard_of(s, shards) == shard)
        .unwrap()
}

async fn contract(q: Arc<dyn Broker>) {
    // Leases: one worker takes every shard; a second gets half once the first hands them back.
    let a = q.heartbeat("worker-a", &[]).await.unwrap();
    assert_eq!(a.owned, vec![0, 1, 2, 3]);
    assert_eq!(a.acquired.len(), 4);
    let b = q.heartbeat("worker-b", &[]).await.unwrap();
    assert!(b.owned.is_empty(), "all shards are held: {b:?}");
    // worker-a has a job running on shard 3: it keeps that shard (draining) beyond its share.
    let a = q.heartbeat("worker-a", &[3]).await.unwrap();
    assert_eq!(a.owned.len(), 2, "fair share of 4 shards over 2 workers");
    assert!(a.owned.contains(&3), "the busy shard is kept first: {a:?}");
    let a = q.heartbeat("worker-a", &[0, 1, 2, 3]).await.unwrap();
    assert_eq!(
        a.owned.len() + a.draining.len(),
        2,
        "nothing more retaken: {a:?}"
    );
    let a = q.heartbeat("worker-a", &[]).await.unwrap();
    assert_eq!((a.owned.len(), a.draining.len()), (2, 0));
    let b = q.heartbeat("worker-b", &[]).await.unwrap();
    assert_eq!(b.owned.len(), 2);
    assert_eq!(q.live_workers().await.unwrap(), 2);

    // Enqueue, read by the shard's owner, complete: the outcome is stored and announced.
    let mut completions = q.completions().await.unwrap();
    let shard = a.owned[0];
    let session = session_on(shard);
    // The in-flight marker: the first begin starts the job, a second finds it running.
    assert_eq!(
        q.begin(&job("job-1", &session), 60_000, "owner-1")
            .await
            .unwrap(),
        Begin::Started
    );
    assert_eq!(
        q.begin(&job("job-1", &session), 60_000, "owner-1")
            .await
            .unwrap(),
        Begin::Running {
            request_sha256: "digest-of-body".into()
        }
    );
    // What a waiting coordinator checks to tell a running job from one the store lost.
    assert!(q.is_running("job-1").await.unwrap());
    assert!(!q.is_running("job-never-begun").await.unwrap());
    q.enqueue(&job("job-1", &session)).await.unwrap();
    // The autoscaling signals: one unread job on its shard, aging; nothing elsewhere.
    tokio::time::sleep(Duration::from_millis(40)).await;
    let lag = q.shard_lag().await.unwrap();
    assert_eq!(lag.len(), 4);
    for l in &lag {
        if l.shard == shard {
            assert_eq!((l.unread, l.pending), (1, 0), "{l:?}");
            assert!((30..60_000).contains(&l.oldest_ms), "{l:?}");
        } else {
            assert_eq!((l.unread, l.pending, l.oldest_ms), (0, 0, 0), "{l:?}");
        }
    }
    assert!(q
        .read("worker-b", &b.owned, 10, 50)
        .await
        .unwrap()
        .is_empty());
    let got = q.read("worker-a", &a.owned, 10, 1000).await.unwrap();
    assert_eq!(got.len(), 1);
    let l = q.shard_lag().await.unwrap()[shard as usize];
    assert_eq!((l.unread, l.pending), (0, 1), "read, not finished: {l:?}");
    assert!(l.oldest_ms >= 30, "{l:?}");
    assert_eq!((got[0].shard, got[0].deliveries), (shard, 1));
    assert_eq!(got[0].job, job("job-1", &session));
    let done = stored(JobOutcome::Done(vec![9, 9]));
    assert_eq!(
        q.complete(&got[0], &done).await.unwrap(),
        Completion::Stored
    );
    let announced = tokio::time::timeout(Duration::from_secs(5), completions.next())
        .await
        .unwrap();
    assert_eq!(announced.as_deref(), Some("job-1"));
    let l = q.shard_lag().await.unwrap()[shard as usize];
    assert_eq!(
        (l.unread, l.pending, l.oldest_ms),
        (0, 0, 0),
        "finished: {l:?}"
    );
    assert!(!q.is_running("job-1").await.unwrap(), "done, not running");
    assert_eq!(q.outcome("job-1").await.unwrap(), Some(done.clone()));
    assert_eq!(
        q.begin(&job("job-1", &session), 60_000, "owner-1")
            .await
            .unwrap(),
        Begin::Done(done.clone()),
        "a finished job is not started again"
    );
    // SET NX: a second completion of the same job id keeps the first outcome.
    let late = stored(JobOutcome::failed(ErrorCode::Internal, "late duplicate"));
    assert_eq!(
        q.complete(&got[0], &late).await.unwrap(),
        Completion::Duplicate
    );
    assert_eq!(q.outcome("job-1").await.unwrap(), Some(done));
    // A job that could not be enqueued gives its marker back.
    let orphan = job("job-orphan", &session);
    assert_eq!(
        q.begin(&orphan, 60_000, "owner-1").await.unwrap(),
        Begin::Started
    );
    // Only the request that set the marker gives it back: not one that joined it, nor an
    // earlier owner whose marker expired and was set again by another request.
    q.abandon(&orphan.id, "someone-else").await.unwrap();
    assert!(q.is_running(&orphan.id).await.unwrap());
    q.abandon(&orphan.id, "owner-1").await.unwrap();
    assert!(!q.is_running(&orphan.id).await.unwrap());
    assert_eq!(
        q.begin(&orphan, 60_000, "owner-2").await.unwrap(),
        Begin::Started
    );
    assert_eq!(q.depth().await.unwrap(), 0);

    // Cap per shard.
    for i in 0..3 {
        q.enqueue(&job(&format!("fill-{i}"), &session))
            .await
            .unwrap();
    }
    let full = q.enqueue(&job("one-too-many", &session)).await.unwrap_err();
    assert!(matches!(full, QueueError::Full { cap: 3, .. }), "{full}");

    // worker-a reads and dies: its lease lapses, worker-b takes the shard and claims the entries
    // with a second delivery count.
    let taken = q.read("worker-a", &[shard], 10, 1000).await.unwrap();
    assert_eq!(taken.len(), 3);
    // Entries refreshed by the worker running them are not idle: no claim takes them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let running: Vec<String> = taken.iter().map(|d| d.entry_id.clone()).collect();
    q.refresh("worker-a", shard, &running).await.unwrap();
    assert!(q
        .claim("worker-a", shard, 300, 10)
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let b = q.heartbeat("worker-b", &[]).await.unwrap();
    assert_eq!(b.owned, vec![0, 1, 2, 3], "the dead worker's shards move");
    assert!(b.acquired.contains(&shard));
    // A claim takes no more than it is asked for (the worker's free permits), oldest first.
    let first = q.claim("worker-b", shard, 0, 2).await.unwrap();
    assert_eq!(first.len(), 2, "{first:?}");
    let claimed = q.claim("worker-b", shard, 0, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let counts: Vec<u32> = claimed.iter().map(|d| d.deliveries).collect();
    assert_eq!(counts.iter().filter(|&&c| c == 3).count(), 2, "{claimed:?}");
    assert_eq!(counts.iter().filter(|&&c| c == 2).count(), 1, "{claimed:?}");

    // Past max_deliveries: dead letter, with a failed outcome the client can read.
    let poisoned = claimed.iter().find(|d| d.deliveries == 3).unwrap();
    q.dead_letter(poisoned, ErrorCode::DeadLettered, "failed 2 deliveries")
        .await
        .unwrap();
    assert_eq!(q.dead_letters().await.unwrap(), 1);
    match q
        .outcome(&poisoned.job.id)
        .await
        .unwrap()
        .map(|s| s.outcome)
    {
        Some(JobOutcome::Failed { code, .. }) => assert_eq!(code, ErrorCode::DeadLettered),
        other => panic!("{other:?}"),
    }

    // A job dropped past its deadline leaves no outcome: a retry under its key runs it.
    let expired = claimed
        .iter()
        .find(|d| d.entry_id != poisoned.entry_id)
        .unwrap();
    q.discard(expired).await.unwrap();
    assert_eq!(q.outcome(&expired.job.id).await.unwrap(), None);
    assert!(
        q.claim("worker-b", shard, 0, 10)
            .await
            .unwrap()
            .iter()
            .all(|d| d.entry_id != expired.entry_id),
        "a discarded entry is gone from the pending list"
    );

    // Leaving gives the leases back at once.
    q.leave("worker-b").await.unwrap();
    let c = q.heartbeat("worker-c", &[]).await.unwrap();
    assert_eq!(c.owned.len(), 4);
}

/// Reads over many shards that all hold entries: the count bounds the total, not each stream;
/// successive reads start at different shards; every entry is read once.
async fn bounded_reads(q: Arc<dyn Broker>) {
    let shards = q.settings().shards;
    let leases = q.heartbeat("worker-a", &[]).await.unwrap();
    assert_eq!(leases.owned.len(), shards as usize);
    let per_shard = 6;
    for shard in 0..shards {
        let session = session_on_of(shard, shards);
        for i in 0..per_shard {
            q.enqueue(&job(&format!("s{shard}-{i}"), &session))
                .await
                .unwrap();
        }
    }
    let total = (shards * per_shard) as usize;
    let mut seen = std::collections::BTreeSet::new();
    let mut first_shards = std::collections::BTreeSet::new();
    while seen.len() < total {
        let got = q.read("worker-a", &leases.owned, 3, 200).await.unwrap();
        assert!(
            (1..=3).contains(&got.len()),
            "a read of 3 over {shards} full shards returned {}",
            got.len()
        );
        first_shards.insert(got[0].shard);
        for d in got {
            assert!(seen.insert(d.job.id.clone()), "{} read twice", d.job.id);
        }
    }
    assert_eq!(seen.len(), total);
    assert!(
        first_shards.len() > 1,
        "every read started at the same shard: {first_shards:?}"
    );
    assert!(q
        .read("worker-a", &leases.owned, 3, 50)
        .await
        .unwrap()
        .is_empty());
    // A read of one over every shard, woken by an entry enqueued while it waits.
    let waiting = {
        let q = q.clone();
        let owned = leases.owned.clone();
        tokio::spawn(async move { q.read("worker-a", &owned, 1, 5000).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for shard in 0..shards {
        q.enqueue(&job(
            &format!("late-{shard}"),
            &session_on_of(shard, shards),
        ))
        .await
        .unwrap();
    }
    let woken = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("an enqueued entry wakes a blocked read")
        .unwrap();
    assert_eq!(woken.len(), 1, "{woken:?}");
}

/// Enqueue `job` until the queue has followed the failover under way: calls fail (503 to
/// clients, who retry) until the sentinels promote the replica; then the same queue object
/// works against the new primary without being rebuilt.
pub async fn enqueue_through_failover(q: &RedisQueue, job: &Job) {
    let started = std::time::Instant::now();
    loop {
        match q.enqueue(job).await {
            Ok(()) => break,
            Err(QueueError::Unavailable(e)) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no failover in 30 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!(
        "failover followed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn wide_settings() -> QueueSettings {
    QueueSettings {
        shards: 8,
        max_shards: 8,
        max_depth: 100,
        ..settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_queue_keeps_the_job_queue_contract() {
    let redis = RedisServer::start();
    let q = RedisQueue::connect(&redis.url(), settings(), Duration::from_secs(5))
        .await
        .unwrap();
    contract(Arc::new(q)).await;
    let wide = RedisServer::start();
    let q = RedisQueue::connect(&wide.url(), wide_settings(), Duration::from_secs(5))
        .await
        .unwrap();
    bounded_reads(Arc::new(q)).await;
}

/// Two shards, allowed to grow to sixteen, with room for every job the growth test queues.
fn growing_settings() -> QueueSettings {
    QueueSettings {
        shards: 2,
        max_shards: 16,
        max_depth: 100,
        lease_ttl_ms: 60_000,
        ..settings()
    }
}

/// A cluster that grows from 2 to 8 shards as workers join, with jobs queued on the old streams:
/// `coordinator` routes, `workers[i]` is worker i's connection (the same object in memory).
async fn shard_growth(coordinator: Arc<dyn Broker>, workers: [Arc<dyn Broker>; 3]) {
    let names = ["worker-a", "worker-b", "worker-c"];
    let sessions: Vec<String> = (0..24).map(|i| format!("growth-{i}")).collect();
    let a = workers[0].heartbeat(names[0], &[]).await.unwrap();
    assert_eq!(
        a.owned,
        vec![0, 1],
        "one worker: the two shards it starts with"
    );
    for (i, s) in sessions.iter().enumerate() {
        coordinator
            .enqueue(&job(&format!("before-{i}"), s))
            .await
            .unwrap();
    }
    // A second worker grows the count to 4 (2 × 2), a third to 8 (next power of two ≥ 2 × 3).
    let b = workers[1].heartbeat(names[1], &[]).await.unwrap();
    assert!(
        !b.owned.is_empty() && b.owned.iter().all(|&s| (2..4).contains(&s)),
        "{b:?}"
    );
    let c = workers[2].heartbeat(names[2], &[]).await.unwrap();
    assert_eq!(c.owned.len(), 3, "a fair share of 8 over 3: {c:?}");
    assert!(c.owned.iter().all(|&s| (4..8).contains(&s)), "{c:?}");
    // The coordinator routes over the new count within its refresh (a second on Redis).
    let started = std::time::Instant::now();
    while coordinator.shard_lag().await.unwrap().len() != 8 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the coordinator kept 2 shards"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, s) in sessions.iter().enumerate() {
        coordinator
            .enqueue(&job(&format!("after-{i}"), s))
            .await
            .unwrap();
    }
    // Old jobs stay on their old stream, new ones go to the session's new shard.
    let lag = coordinator.shard_lag().await.unwrap();
    for l in &lag {
        let before = sessions
            .iter()
            .filter(|s| shard_of(s, 2) == l.shard)
            .count();
        let after = sessions
            .iter()
            .filter(|s| shard_of(s, 8) == l.shard)
            .count();
        assert_eq!(l.unread as usize, before + after, "{l:?}");
    }
    // Leases settle over all eight shards, each held by one worker.
    let mut owned = Vec::new();
    for _round in 0..3 {
        owned.clear();
        for (w, name) in workers.iter().zip(names) {
            owned.push(w.heartbeat(name, &[]).await.unwrap().owned);
        }
    }
    let mut all: Vec<u32> = owned.concat();
    all.sort_unstable();
    assert_eq!(all, (0..8).collect::<Vec<_>>(), "{owned:?}");
    // Every job, queued before the growth or after, is read once by its shard's owner.
    let mut seen = std::collections::BTreeSet::new();
    for ((w, name), shards) in workers.iter().zip(names).zip(&owned) {
        loop {
            let got = w.read(name, shards, 10, 50).await.unwrap();
            if got.is_empty() {
                break;
            }
            for d in got {
                assert!(shards.contains(&d.shard));
                assert!(seen.insert(d.job.id.clone()), "{} read twice", d.job.id);
                let done = stored(JobOutcome::Done(vec![1; 8]));
                assert_eq!(w.complete(&d, &done).await.unwrap(), Completion::Stored);
            }
        }
    }
    assert_eq!(seen.len(), 2 * sessions.len());
    assert_eq!(coordinator.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_count_grows_with_the_workers_and_jobs_on_the_old_streams_are_still_served() {
    let memory: Arc<dyn Broker> = Arc::new(MemoryQueue::new(growing_settings()));
    shard_growth(memory.clone(), [memory.clone(), memory.clone(), memory]).await;

    let redis = RedisServer::start();
    let connect = |settings: QueueSettings| {
        let url = redis.url();
        async move {
            Arc::new(
                RedisQueue::connect(&url, settings, Duration::from_secs(5))
                    .await
                    .unwrap(),
            )
        }
    };
    let coordinator = connect(growing_settings()).await;
    let workers = [
        connect(growing_settings()).await as Arc<dyn Broker>,
        connect(growing_settings()).await,
        connect(growing_settings()).await,
    ];
    shard_growth(coordinator, workers.clone()).await;
    assert_eq!(
        redis_cli(redis.port(), &["GET", "hyfhe:shards"]).trim(),
        "8"
    );
    // A process configured with the old count joins at the cluster's count: it never shrinks.
    let late = connect(growing_settings()).await;
    assert_eq!(late.shard_lag().await.unwrap().len(), 8);
    // A store that lost the count (a failover before it was replicated) gets it back from the
    // processes that knew it, at their next heartbeat.
    redis_cli(redis.port(), &["DEL", "hyfhe:shards"]);
    workers[0].heartbeat("worker-a", &[]).await.unwrap();
    assert_eq!(
        redis_cli(redis.port(), &["GET", "hyfhe:shards"]).trim(),
        "8"
    );
    // A process configured with more shards grows the running cluster to its count.
    let bigger = connect(QueueSettings {
        shards: 16,
        ..growing_settings()
    })
    .await;
    assert_eq!(bigger.shard_lag().await.unwrap().len(), 16);
    assert_eq!(
        redis_cli(redis.port(), &["GET", "hyfhe:shards"]).trim(),
        "16"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_dead_lettered_alone_and_the_rest_of_its_batch_is_read() {
    let redis = RedisServer::start();
    let q = RedisQueue::connect(&redis.url(), settings(), Duration::from_secs(5))
        .await
        .unwrap();
    let a = q.heartbeat("worker-a", &[]).await.unwrap();
    let session = session_on(2);
    q.enqueue(&job("before-poison", &session)).await.unwrap();
    // Something that is not a job lands on the shard's stream (a bug, or a hand-made XADD).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg("hyfhe:jobs:2")
        .arg("*")
        .arg("job")
        .arg(&b"\xc1 not msgpack"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    q.enqueue(&job("after-poison", &session)).await.unwrap();
    let got = q.read("worker-a", &a.owned, 10, 1000).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.job.id.as_str()).collect();
    assert_eq!(ids, ["before-poison", "after-poison"]);
    assert_eq!(
        q.dead_letters().await.unwrap(),
        1,
        "the poison entry, alone"
    );
    assert_eq!(
        q.depth().await.unwrap(),
        2,
        "the poison entry left the stream"
    );
    let letters: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("hyfhe:dead-letter")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reason: String = letters.ids[0].get("reason").unwrap();
    assert!(reason.contains("is not a job"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_queue_keeps_the_job_queue_contract() {
    contract(Arc::new(MemoryQueue::new(settings()))).await;
    bounded_reads(Arc::new(MemoryQueue::new(wide_settings()))).await;
}

/// The in-memory store and one over `redis`, for checks both must pass.
async fn both_stores(redis: &RedisServer) -> Vec<Arc<dyn Broker>> {
    vec![
        Arc::new(MemoryQueue::new(settings())),
        Arc::new(
            RedisQueue::connect(&redis.url(), settings(), Duration::from_secs(5))
                .await
                .unwrap(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_slots_are_bounded_per_tenant_given_back_and_leased_in_both_stores() {
    let redis = RedisServer::start();
    let stores = both_stores(&redis).await;
    for store in stores {
        // Two slots for tenant t; u is counted apart.
        assert!(store.acquire_slot("t", "a", 2, 60_000).await.unwrap());
        assert!(store.acquire_slot("t", "b", 2, 60_000).await.unwrap());
        assert!(!store.acquire_slot("t", "c", 2, 60_000).await.unwrap());
        assert!(store.acquire_slot("u", "a", 2, 60_000).await.unwrap());
        // Giving one back admits the next; giving back twice or an unknown slot is harmless.
        store.release_slot("t", "a").await.unwrap();
        store.release_slot("t", "a").await.unwrap();
        store.release_slot("t", "zz").await.unwrap();
        assert!(store.acquire_slot("t", "c", 2, 60_000).await.unwrap());
        assert!(!store.acquire_slot("t", "d", 2, 60_000).await.unwrap());
        // A slot nobody gives back (its coordinator died) ends with its lease.
        assert!(store.acquire_slot("v", "lost", 1, 300).await.unwrap());
        assert!(!store.acquire_slot("v", "next", 1, 300).await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(store.acquire_slot("v", "next", 1, 300).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_keys_expire_in_both_stores() {
    let redis = RedisServer::start();
    let stores = both_stores(&redis).await;
    for store in stores {
        let record = SessionRecord {
            id: "s1".into(),
            tenant: "t".into(),
            model: "m".into(),
            token_sha256: "x".into(),
            keys: [("exact".to_string(), "key-1".to_string())].into(),
            key_bytes: 4,
            expires_unix_ms: hyfhe::queue::now_unix_ms() + 1000,
        };
        let quota = SessionQuota {
            sessions: 4,
            key_bytes: 100,
        };
        assert_eq!(
            store.create_session(&record, 1000, quota).await.unwrap(),
            Reserved::Created
        );
        store.put_key("key-1", b"blob", 1000).await.unwrap();
        assert_eq!(store.get_session("s1").await.unwrap(), Some(record.clone()));
        let usage = store.tenant_usage("t").await.unwrap();
        assert_eq!((usage.sessions, usage.key_bytes), (1, 4));
        assert_eq!(store.tenant_usage("other").await.unwrap().sessions, 0);
        assert_eq!(
            store.get_key("key-1").await.unwrap().as_deref(),
            Some(&b"blob"[..])
        );
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(store.get_session("s1").await.unwrap(), None);
        assert_eq!(store.get_key("key-1").await.unwrap(), None);
        assert_eq!(
            store.tenant_usage("t").await.unwrap().sessions,
            0,
            "expired"
        );
        let renewed = SessionRecord {
            expires_unix_ms: hyfhe::queue::now_unix_ms() + 10_000,
            ..record.clone()
        };
        store.create_session(&renewed, 10_000, quota).await.unwrap();
        assert_eq!(store.tenant_usage("t").await.unwrap().sessions, 1);
        assert!(store.delete_session(&renewed).await.unwrap());
        assert!(!store.delete_session(&renewed).await.unwrap());
        assert_eq!(store.tenant_usage("t").await.unwrap().key_bytes, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_queue_prunes_expired_outcomes_and_bounds_its_dead_letters() {
    let q = MemoryQueue::new(QueueSettings {
        result_ttl_ms: 200,
        max_depth: 10_000,
        ..settings()
    });
    let leases = q.heartbeat("worker-a", &[]).await.unwrap();
    let total = hyfhe::queue::MEMORY_DEAD_LETTER_CAP + 100;
    for i in 0..total {
        let job = job(&format!("job-{i:05}"), &session_on(i as u32 % 4));
        assert_eq!(
            q.begin(&job, 60_000, "owner").await.unwrap(),
            Begin::Started
        );
        q.enqueue(&job).await.unwrap();
        let got = q.read("worker-a", &leases.owned, 1, 100).await.unwrap();
        if i % 2 == 0 {
            q.complete(&got[0], &stored(JobOutcome::Done(vec![0; 64])))
                .await
                .unwrap();
        } else {
            q.dead_letter(&got[0], ErrorCode::DeadLettered, "poison")
                .await
                .unwrap();
        }
    }
    let sizes = q.sizes();
    assert_eq!((sizes.jobs, sizes.running), (0, 0), "{sizes:?}");
    assert!(
        sizes.dead_letters <= hyfhe::queue::MEMORY_DEAD_LETTER_CAP,
        "{sizes:?}"
    );
    assert_eq!(q.dead_letters().await.unwrap(), total / 2, "all counted");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(q.sizes().outcomes, 0, "expired outcomes are pruned");
}

fn session(id: &str, tenant: &str, key_id: &str, key_bytes: u64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        tenant: tenant.into(),
        model: "m".into(),
        token_sha256: "x".into(),
        keys: [("exact".to_string(), key_id.to_string())].into(),
        key_bytes,
        expires_unix_ms: hyfhe::queue::now_unix_ms() + 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_blob_goes_with_the_last_session_that_uses_it_and_quotas_hold_under_concurrent_creations(
) {
    let redis = RedisServer::start();
    let stores = both_stores(&redis).await;
    for store in stores {
        let roomy = SessionQuota {
            sessions: 10,
            key_bytes: 1 << 30,
        };
        // Two sessions of one tenant share a blob (the same keys uploaded twice).
        let blob = hyfhe::queue::scoped_key_id("t", b"blob");
        for id in ["s1", "s2"] {
            let record = session(id, "t", &blob, 4);
            assert_eq!(
                store.create_session(&record, 60_000, roomy).await.unwrap(),
                Reserved::Created
            );
            store.put_key(&blob, b"blob", 60_000).await.unwrap();
        }
        // Another tenant with byte-identical keys gets a blob of its own.
        let theirs = hyfhe::queue::scoped_key_id("u", b"blob");
        assert_ne!(theirs, blob, "blob ids are scoped by tenant");
        let other = session("s3", "u", &theirs, 4);
        store.create_session(&other, 60_000, roomy).await.unwrap();
        store.put_key(&theirs, b"blob", 60_000).await.unwrap();
        // Closing one session keeps the blob the other still uses; closing the last drops it.
        assert!(store
            .delete_session(&session("s1", "t", &blob, 4))
            .await
            .unwrap());
        assert!(store.get_key(&blob).await.unwrap().is_some(), "s2 uses it");
        assert!(store
            .delete_session(&session("s2", "t", &blob, 4))
            .await
            .unwrap());
        assert_eq!(
            store.get_key(&blob).await.unwrap(),
            None,
            "no session uses it"
        );
        assert!(
            store.get_key(&theirs).await.unwrap().is_some(),
            "another tenant's blob is not touched"
        );
        assert!(store.delete_session(&other).await.unwrap());
        assert_eq!(store.get_key(&theirs).await.unwrap(), None);
        // A renewal racing the delete (read before it, written after) does not bring the
        // session back outside its blob's references.
        store.put_session(&other, 60_000).await.unwrap();
        assert_eq!(store.get_session("s3").await.unwrap(), None);

        // Sixteen creations at once against a quota of three: exactly three pass.
        let tight = SessionQuota {
            sessions: 3,
            key_bytes: 1 << 30,
        };
        let tries: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let record = session(&format!("c{i}"), "busy", "k", 10);
                    store.create_session(&record, 60_000, tight).await.unwrap()
                })
            })
            .collect();
        let mut created = 0;
        for t in tries {
            match t.await.unwrap() {
                Reserved::Created => created += 1,
                Reserved::OverQuota(usage) => assert_eq!(usage.sessions, 3, "{usage:?}"),
            }
        }
        assert_eq!(created, 3);
        // Key bytes likewise: 25 bytes allowed, 10 per session.
        let bytes = SessionQuota {
            sessions: 100,
            key_bytes: 25,
        };
        let mut passed = 0;
        for i in 0..4 {
            let record = session(&format!("b{i}"), "bytes", "k", 10);
            if store.create_session(&record, 60_000, bytes).await.unwrap() == Reserved::Created {
                passed += 1;
            }
        }
        assert_eq!(passed, 2);
        assert_eq!(
            store.tenant_usage("bytes").await.unwrap(),
            TenantUsage {
                sessions: 2,
                key_bytes: 20
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_queue_follows_a_sentinel_failover_and_keeps_what_was_replicated() {
    // Outcomes are announced only once the replica holds them (`WAIT 1`).
    let settings = QueueSettings {
        replica_acks: 1,
        replica_ack_timeout_ms: 2000,
        ..settings()
    };
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start("hyfhe", &primary, 2))
        .collect();
    wait_until_sentinels_converge(&sentinels, redis_cli);
    let url = sentinel_url("redis+sentinel", "127.0.0.1", &sentinels);
    let q = RedisQueue::connect(&url, settings.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    let shards: Vec<u32> = (0..settings.shards).collect();
    let session = session_on(1);
    let done = stored(JobOutcome::Done(vec![7; 64]));
    // A completion the replica acknowledged in time...
    q.enqueue(&job("answered", &session)).await.unwrap();
    let got = q.read("worker-a", &shards, 10, 1000).await.unwrap();
    assert_eq!(
        q.complete(&got[0], &done).await.unwrap(),
        Completion::Stored
    );
    // ... and one it could not (stopped past the 2 s `WAIT`): announced anyway, and said so.
    q.enqueue(&job("answered-late", &session)).await.unwrap();
    let got = q.read("worker-a", &shards, 10, 1000).await.unwrap();
    replica.signal("STOP");
    let completion = q.complete(&got[0], &done).await;
    replica.signal("CONT");
    assert_eq!(completion.unwrap(), Completion::StoredUnreplicated);
    q.enqueue(&job("before-failover", &session)).await.unwrap();
    // Two sessions sharing a key blob, one closed again: the blob's references must come
    // through the failover with the survivor in them.
    let roomy = SessionQuota {
        sessions: 10,
        key_bytes: 1 << 30,
    };
    let blob = hyfhe::queue::scoped_key_id("t", b"blob");
    for id in ["s1", "s2"] {
        let record = self::session(id, "t", &blob, 4);
        assert_eq!(
            q.create_session(&record, 60_000, roomy).await.unwrap(),
            Reserved::Created
        );
        q.put_key(&blob, b"blob", 60_000).await.unwrap();
    }
    assert!(q
        .delete_session(&self::session("s1", "t", &blob, 4))
        .await
        .unwrap());
    // Applied by the replica before the primary dies: it must survive the failover.
    wait_until_replicated(primary.port(), replica.port(), redis_cli);
    drop(primary); // SIGKILL

    enqueue_through_failover(&q, &job("after-failover", &session)).await;
    assert!(redis_cli(replica.port(), &["ROLE"]).starts_with("master"));
    let mut ids = Vec::new();
    for _ in 0..20 {
        for d in q
            .read("worker-a", &shards, 10, 200)
            .await
            .unwrap_or_default()
        {
            ids.push(d.job.id.clone());
        }
        if ids.len() >= 2 {
            break;
        }
    }
    ids.sort();
    assert_eq!(ids, ["after-failover", "before-failover"]);
    assert_eq!(q.depth().await.unwrap(), 2);
    // The new primary has no replica: nothing could acknowledge, so nothing is waited for (a
    // `WAIT` would only time out), and the completion says it is unreplicated.
    let got = q.read("worker-a", &shards, 10, 200).await.unwrap();
    assert!(got.is_empty(), "both were read above");
    let pending = q.claim("worker-a", 1, 0, 10).await.unwrap();
    let alone = pending
        .iter()
        .find(|d| d.job.id == "after-failover")
        .expect("pending after the read");
    let asked = std::time::Instant::now();
    assert_eq!(
        q.complete(alone, &done).await.unwrap(),
        Completion::StoredUnreplicated
    );
    assert!(
        asked.elapsed() < Duration::from_millis(1000),
        "waited {:?} for replicas that are not there",
        asked.elapsed()
    );
    // What was answered survived, billed once each: nothing billed twice or lost.
    for id in ["answered", "answered-late"] {
        assert_eq!(q.outcome(id).await.unwrap(), Some(done.clone()), "{id}");
    }
    let bill = q.bill("t").await.unwrap();
    assert_eq!(bill.jobs, 3, "{bill:?}");
    // And the references: the surviving session, its blob, its reference, its bill.
    let audit = q.audit().await.unwrap();
    assert!(audit.is_consistent(), "{audit:?}");
    assert_eq!(
        (audit.sessions, audit.key_blobs, audit.sessions_without_blob),
        (1, 1, 0),
        "{audit:?}"
    );
    assert_eq!(
        (
            audit.stale_references,
            audit.unreferenced_blobs,
            audit.stale_quota_entries
        ),
        (0, 0, 0),
        "{audit:?}"
    );
    assert_eq!(audit.bills["t"]["jobs"], 3, "{audit:?}");
    // The operator's command says the same, through the sentinels.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["store", "audit", "--json"])
        .env("HYFHE__QUEUE__BACKEND", "redis")
        .env("HYFHE__QUEUE__REDIS_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // It only read: its config's 16 shards did not grow the cluster's 4.
    assert_eq!(
        redis_cli(replica.port(), &["GET", "hyfhe:shards"]).trim(),
        settings.shards.to_string()
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sessions"], 1, "{json}");
    assert_eq!(json["bills"]["t"]["jobs"], 3, "{json}");
    // A session whose reference was lost would be named, and the command would fail.
    redis_cli(replica.port(), &["DEL", &format!("hyfhe:key-refs:{blob}")]);
    let audit = q.audit().await.unwrap();
    assert_eq!(audit.unreferenced_uses, [format!("s2 → {blob}")]);
    assert_eq!(audit.unreferenced_blobs, 1);
}
