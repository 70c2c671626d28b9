//! The job queue between coordinators and workers, and the session store beside it.
//!
//! Two implementations with the same semantics: [`RedisQueue`] (Redis Streams, for clusters) and
//! [`MemoryQueue`] (one process, the embedded default).
//!
//! - A job goes to shard `hash(session) % shards`; each shard is a stream read by consumer group
//!   `workers`. Workers hold TTL leases on shards ([`JobQueue::heartbeat`] renews them and takes a
//!   fair share of free ones), so a session's keys are loaded by one worker only.
//! - Delivery is at least once: a dead worker's lease expires, the next owner claims its pending
//!   entries ([`JobQueue::claim`]). Evaluation is deterministic and the outcome is stored under
//!   the job's *scoped* id (tenant, session, module, client job id: [`scoped_job_id`]) with
//!   `SET NX` *before* the entry is acknowledged, so a redelivered or retried job finds the stored
//!   outcome instead of being computed again. The outcome remembers the digest of the request
//!   body, so the same id with another body is told apart (an idempotency conflict).
//! - A job is enqueued once: [`JobQueue::begin`] sets an in-flight marker (`SET NX`, the deadline
//!   as TTL) and a retry that finds it waits for the running job instead of enqueueing it again.
//! - Entries in flight on a worker are refreshed ([`JobQueue::refresh`]) so that no idle claim
//!   takes them; an entry that cannot be decoded is dead-lettered on its own, never failing the
//!   batch it came in.
//! - After `max_deliveries` a job goes to the dead-letter stream with a failed outcome naming why.

mod memory;
mod redis;

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::ErrorCode;

pub use self::redis::{job_stream, RedisQueue, StoreAudit, CONSUMER_GROUP};
pub use memory::{MemoryQueue, MemoryQueueSizes, DEAD_LETTER_CAP as MEMORY_DEAD_LETTER_CAP};

pub type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
/// Ids of jobs whose outcome was just stored.
pub type CompletionStream = Pin<Box<dyn Stream<Item = String> + Send>>;

/// One encrypted layer request on its way to a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// [`scoped_job_id`] of the client's idempotency key: what outcomes are stored under.
    pub id: String,
    /// The idempotency key as the client sent it (logs and traces).
    pub client_job_id: String,
    pub tenant: String,
    pub session: String,
    pub model: String,
    pub module: String,
    /// Content id of the session's evaluation key for this module's precision.
    pub key_id: String,
    /// Hex SHA-256 of the request body: a retry must send the same bytes.
    pub request_sha256: String,
    /// Rows in the request (metering).
    pub rows: u32,
    /// Past this instant the job is dropped, not computed.
    pub deadline_unix_ms: u64,
    /// W3C trace context of the request that enqueued it.
    pub traceparent: Option<String>,
    /// The encoded `EncryptedRows`.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The id a job's outcome and in-flight marker are stored under: a client's idempotency key
/// means something only within its tenant, session and module.
pub fn scoped_job_id(tenant: &str, session: &str, module: &str, client_job_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [tenant, session, module, client_job_id] {
        // Length-prefixed, so that no two tuples hash the same bytes.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A job handed to one worker.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub shard: u32,
    pub entry_id: String,
    /// 1 on first delivery.
    pub deliveries: u32,
    pub job: Job,
}

/// What a job ended as.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// The encoded `EncryptedOutputs`.
    Done(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The job's own fault, final: a stable code and a message for the client.
    Failed { code: ErrorCode, message: String },
}

impl JobOutcome {
    pub fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Failed {
            code,
            message: message.into(),
        }
    }

    /// Whether storing this outcome bills the tenant a job: every outcome but a session the
    /// store no longer holds whole (its key blob lost or expired), which the client answers by
    /// opening a new session and sending the request again, billed then.
    pub fn billable(&self) -> bool {
        !matches!(
            self,
            JobOutcome::Failed {
                code: ErrorCode::SessionNotFound,
                ..
            }
        )
    }
}

/// What [`Broker::complete`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// This outcome is the job's.
    Stored,
    /// This outcome is the job's, but fewer replicas than `replica_acks` acknowledged it within
    /// `replica_ack_timeout_ms`: it was announced anyway (availability first), and a failover
    /// before replication would lose it and its bill. Counted, never silent.
    StoredUnreplicated,
    /// Another evaluation's outcome was there first and is kept; this one is dropped.
    Duplicate,
}

/// An outcome as stored under its job id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredOutcome {
    /// Digest of the request body that produced it.
    pub request_sha256: String,
    /// Worker time spent in FHE evaluation (what a tenant is metered on).
    pub fhe_seconds: f64,
    pub outcome: JobOutcome,
}

/// What a tenant is billed for: jobs whose outcome was stored, counted once per job where it is
/// stored (whichever request enqueued it, and whether or not anyone was still waiting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantBill {
    pub jobs: u64,
    /// Rows of the jobs that were evaluated (failed jobs bill none).
    pub rows: u64,
    /// Worker FHE time, in microseconds.
    pub fhe_micros: u64,
}

/// One shard's backlog: what an autoscaler reads (ARCHITECTURE.md, "Scaling workers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardLag {
    pub shard: u32,
    /// Enqueued and not yet delivered to any worker.
    pub unread: u64,
    /// Delivered to a worker and not finished (running, or held by a worker that died until it
    /// is claimed).
    pub pending: u64,
    /// Milliseconds since the oldest unfinished job of the shard was enqueued (0 when none).
    pub oldest_ms: u64,
}

/// What [`JobQueue::charge_rows`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charged; this many rows are used in the window now.
    Charged { used: u64 },
    /// Not charged: this many rows were used already.
    Refused { used: u64 },
}

/// What [`JobQueue::begin`] found under a job id.
#[derive(Clone, Debug, PartialEq)]
pub enum Begin {
    /// No outcome and no run: the marker is now ours, enqueue the job.
    Started,
    /// Another request with this id is running (or about to enqueue it); its body had this
    /// digest.
    Running { request_sha256: String },
    /// The job already ended.
    Done(StoredOutcome),
}

/// A client session: one tenant's evaluation keys for one model.
/// The value of an in-flight marker: the request's digest and the token of the request that
/// set it.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    pub request_sha256: String,
    pub owner: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub token_sha256: String,
    /// Precision name → content id of the evaluation key stored for it.
    pub keys: BTreeMap<String, String>,
    /// Bytes of evaluation keys uploaded with it (the tenant's key-bytes quota).
    pub key_bytes: u64,
    pub expires_unix_ms: u64,
}

/// What a tenant holds now (its quotas are checked against this).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantUsage {
    pub sessions: usize,
    pub key_bytes: u64,
}

/// Shards a worker holds after a heartbeat.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leases {
    /// Shards to read new jobs from.
    pub owned: Vec<u32>,
    /// Taken in this heartbeat: their pending entries are to be claimed.
    pub acquired: Vec<u32>,
    /// Beyond the fair share but kept (renewed, not read) until their jobs in flight finish.
    pub draining: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// The shard count a new cluster starts with (a running cluster's count lives in the queue
    /// and is only ever grown: [`grown_shards`]).
    pub shards: u32,
    /// The most shards the count may grow to as workers join; equal to `shards`: fixed.
    pub max_shards: u32,
    /// Entries waiting or in progress per shard beyond which enqueue is refused.
    pub max_depth: usize,
    pub max_deliveries: u32,
    pub lease_ttl_ms: u64,
    pub result_ttl_ms: u64,
    /// Longest blocking read: a read that has not answered by then plus some slack is a dead
    /// connection, not a slow one.
    pub read_block_ms: u64,
    /// Replicas that must acknowledge a job's outcome (`WAIT`) before it is announced; 0: none.
    pub replica_acks: u32,
    /// The longest that `WAIT` may take.
    pub replica_ack_timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("shard {shard} holds {depth} jobs (cap {cap})")]
    Full {
        shard: u32,
        depth: usize,
        cap: usize,
    },
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt queue entry: {0}")]
    Corrupt(String),
}

/// Coordinator and worker sides of the queue.
pub trait JobQueue: Send + Sync {
    fn settings(&self) -> &QueueSettings;
    fn ping(&self) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Claim `job.id` for one run: the stored outcome if it ended, the running request's digest
    /// if it runs, or an in-flight marker set for `ttl_ms` and owned by `owner` (a token unique
    /// to the request that begins it; [`Begin::Started`]).
    fn begin<'a>(
        &'a self,
        job: &'a Job,
        ttl_ms: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Begin, QueueError>>;
    /// Drop the in-flight marker of a job that could not be enqueued, if `owner` still owns it
    /// (never a marker another request set since).
    fn abandon<'a>(
        &'a self,
        job_id: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Append `job` to its session's shard; refuses with [`QueueError::Full`] past the cap.
    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>>;
    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredOutcome>, QueueError>>;
    /// Whether `begin`'s in-flight marker of `job_id` exists: with no outcome either, the job is
    /// gone (the store lost it, e.g. Redis restarted without persistence) and nobody will answer.
    fn is_running<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>>;
    /// Every job id completed from now on (one subscription per coordinator).
    fn completions(&self) -> BoxFuture<'_, Result<CompletionStream, QueueError>>;
    /// Workers whose heartbeat is younger than the lease TTL.
    fn live_workers(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Jobs waiting or in progress over all shards.
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Per shard: jobs not yet read, jobs read and not finished, and the age of the oldest of
    /// either (the autoscaling signals `/metrics` exports).
    fn shard_lag(&self) -> BoxFuture<'_, Result<Vec<ShardLag>, QueueError>>;

    /// Register `worker` as alive, renew its leases and take free shards up to a fair share,
    /// giving back any beyond it (so a new worker gets some) except the `busy` ones, which are
    /// kept as [`Leases::draining`] until their jobs in flight finish.
    fn heartbeat<'a>(
        &'a self,
        worker: &'a str,
        busy: &'a [u32],
    ) -> BoxFuture<'a, Result<Leases, QueueError>>;
    /// At most `count` new jobs *in total* over `shards` (what the worker has room to start),
    /// waiting up to `block_ms` for the first; successive reads start at different shards, so a
    /// busy shard cannot starve the others. Entries that cannot be decoded are dead-lettered on
    /// the spot and not returned.
    fn read<'a>(
        &'a self,
        worker: &'a str,
        shards: &'a [u32],
        count: usize,
        block_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>>;
    /// Take over at most `count` entries of `shard` delivered to anyone and unacknowledged for
    /// `min_idle_ms` (oldest first); fewer than `count` means none is left to take.
    fn claim<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        min_idle_ms: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>>;
    /// Reset the idle time of `entries` of `shard` (in flight on `worker`) without counting a
    /// delivery, so that no idle claim takes a job that is still running.
    fn refresh<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        entries: &'a [String],
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Store the outcome unless one exists (`SET NX`) and, only then, bill the job's tenant
    /// ([`TenantBill`]); clear the in-flight marker, announce it, acknowledge the entry: one
    /// atomic step. [`Completion::Duplicate`] when an outcome was already stored:
    /// the job was evaluated twice (a worker that lost its lease finished it anyway).
    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a StoredOutcome,
    ) -> BoxFuture<'a, Result<Completion, QueueError>>;
    /// What `tenant` has been billed, over the whole cluster.
    fn bill<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<TenantBill, QueueError>>;
    /// Add `rows` to `tenant`'s use of `module` in the window of `window_ms` that holds now,
    /// unless that would pass `limit` (then nothing is added). Counted in the store, so the
    /// budget holds over every coordinator. A negative `rows` gives rows back (no limit).
    fn charge_rows<'a>(
        &'a self,
        tenant: &'a str,
        module: &'a str,
        rows: i64,
        limit: u64,
        window_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, QueueError>>;
    /// Count a second evaluation of a job where the count outlives the worker (Redis:
    /// `hyfhe:stats:duplicate-outcomes`); the in-process queue keeps no such count.
    fn count_duplicate(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async { Ok(()) })
    }
    /// Record the job on the dead-letter stream and complete it as failed with `code`
    /// ([`ErrorCode::DeadLettered`] past `max_deliveries`, [`ErrorCode::Internal`] for a panic).
    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        code: ErrorCode,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Acknowledge and delete the entry without storing an outcome (a job past its deadline:
    /// nobody waits for it, and a retry under the same key must run it, not find a failure).
    fn discard<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Entries on the dead-letter stream.
    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Give back `worker`'s leases (graceful shutdown, once its jobs in flight are done).
    fn leave<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
}

/// What one tenant may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionQuota {
    pub sessions: usize,
    pub key_bytes: u64,
}

/// What [`SessionStore::create_session`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Reserved {
    /// The session is stored and counted against its tenant.
    Created,
    /// Nothing was stored: the tenant holds this much already.
    OverQuota(TenantUsage),
}

/// The id a session's evaluation key blob is stored under: its content digest *within its
/// tenant*, so that sessions of one tenant that uploaded the same keys share one blob (and the
/// workers' transformed copy), while no tenant can keep, drop or evict another tenant's blob.
pub fn scoped_key_id(tenant: &str, blob: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((tenant.len() as u64).to_le_bytes());
    h.update(tenant.as_bytes());
    h.update(Sha256::digest(blob));
    hex::encode(h.finalize())
}

/// Sessions and their evaluation keys, with TTLs refreshed on use.
///
/// A key blob is referenced by the sessions that uploaded it: it lives as long as the longest of
/// them (its TTL follows theirs) and is deleted with the last one closed.
pub trait SessionStore: Send + Sync {
    /// Store a new session if its tenant's live sessions and key bytes stay within `quota`, in
    /// one atomic step (concurrent creations cannot pass the quota together), and reference its
    /// key blobs from it. The blobs are stored afterwards with [`SessionStore::put_key`].
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
        quota: SessionQuota,
    ) -> BoxFuture<'a, Result<Reserved, QueueError>>;
    /// Store an evaluation key blob under its id ([`scoped_key_id`]).
    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    fn get_key<'a>(&'a self, key_id: &'a str)
        -> BoxFuture<'a, Result<Option<Vec<u8>>, QueueError>>;
    /// Renew a session created by [`SessionStore::create_session`] (and its blobs' TTL), in one
    /// step; a session deleted or expired since it was read stays gone.
    fn put_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, QueueError>>;
    /// Delete a session, and each of its key blobs that no other live session references.
    /// Whether a session was there to delete.
    fn delete_session<'a>(
        &'a self,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;
    /// The live sessions of `tenant` and the key bytes they hold.
    fn tenant_usage<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<TenantUsage, QueueError>>;
    /// Take one of `tenant`'s `limit` in-flight request slots, as `slot` (unique per request),
    /// counted across every coordinator sharing this store, so a tenant's quota holds however
    /// many front doors it comes through. The slot is leased for `lease_ms`: a coordinator that
    /// dies mid-request frees it when the lease runs out. Whether a slot was free.
    fn acquire_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
        limit: usize,
        lease_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;
    /// Give back a slot taken by [`SessionStore::acquire_slot`] (nothing if its lease ran out).
    fn release_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
}

/// Both sides of a broker: what services hold.
pub trait Broker: JobQueue + SessionStore {}
impl<T: JobQueue + SessionStore> Broker for T {}

/// The shard of a session: stable across processes and restarts.
pub fn shard_of(session: &str, shards: u32) -> u32 {
    let digest = Sha256::digest(session.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % shards
}

/// How many shards each of `workers` live workers should hold.
pub fn fair_share(shards: u32, workers: usize) -> usize {
    (shards as usize).div_ceil(workers.max(1))
}

/// The shard count a heartbeat seeing `live` workers grows `current` to: the next power of two
/// at least twice the workers (so every worker keeps two or more shards and a joining one finds
/// some to take), at most `max`, and never below `current` (shrinking moves sessions while
/// entries may still wait in the streams they leave; it needs a drain, ARCHITECTURE.md).
pub fn grown_shards(current: u32, live: usize, max: u32) -> u32 {
    let wanted = (2 * live.max(1)).next_power_of_two().min(max as usize) as u32;
    current.max(wanted)
}

/// `url` with any password replaced by `***`: what may appear in a log line or an error.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_spread_and_stable() {
        let mut hits = [0usize; 8];
        for i in 0..800 {
            hits[shard_of(&format!("session-{i}"), 8) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (60..=140).contains(&h)), "{hits:?}");
        assert_eq!(shard_of("abc", 16), shard_of("abc", 16));
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 0), 16);
    }

    #[test]
    fn shards_grow_to_twice_the_workers_in_powers_of_two_and_never_shrink() {
        assert_eq!(grown_shards(16, 1, 1024), 16);
        assert_eq!(grown_shards(16, 8, 1024), 16);
        assert_eq!(grown_shards(16, 9, 1024), 32);
        assert_eq!(grown_shards(16, 100, 1024), 256);
        assert_eq!(grown_shards(16, 100, 128), 128);
        assert_eq!(grown_shards(16, 900, 1024), 1024);
        // Fixed when the cap is the start, and never below what the cluster already has.
        assert_eq!(grown_shards(16, 100, 16), 16);
        assert_eq!(grown_shards(64, 1, 1024), 64);
        assert_eq!(grown_shards(12, 7, 1024), 16);
        assert_eq!(grown_shards(1, 0, 1024), 2);
    }

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:pw@host:1"),
            "rediss://user:***@host:1"
        );
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
    }

    #[test]
    fn scoped_ids_differ_by_every_part() {
        let a = scoped_job_id("t", "s", "m", "job-0001");
        assert_ne!(a, scoped_job_id("t2", "s", "m", "job-0001"));
        assert_ne!(a, scoped_job_id("t", "s2", "m", "job-0001"));
        assert_ne!(a, scoped_job_id("t", "s", "m2", "job-0001"));
        assert_ne!(
            scoped_job_id("ab", "c", "m", "j"),
            scoped_job_id("a", "bc", "m", "j")
        );
        assert_eq!(a, scoped_job_id("t", "s", "m", "job-0001"));
    }
}
