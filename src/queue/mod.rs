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
//!   the job id (`SET NX`) *before* the entry is acknowledged, so a redelivered or retried job id
//!   finds the stored outcome instead of being computed twice for different answers.
//! - After `max_deliveries` a job goes to the dead-letter stream with a failed outcome naming why.

mod memory;
mod redis;

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use self::redis::RedisQueue;
pub use memory::MemoryQueue;

pub type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
/// Ids of jobs whose outcome was just stored.
pub type CompletionStream = Pin<Box<dyn Stream<Item = String> + Send>>;

/// One encrypted layer request on its way to a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Chosen by the client and reused on retries: the idempotency key.
    pub id: String,
    pub session: String,
    pub model: String,
    pub module: String,
    /// Content id of the session's evaluation key for this module's precision.
    pub key_id: String,
    /// Past this instant the job is dropped, not computed.
    pub deadline_unix_ms: u64,
    /// W3C trace context of the request that enqueued it.
    pub traceparent: Option<String>,
    /// The encoded `EncryptedRows`.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
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

/// The failed outcome's code of a dead-lettered job (`protocol::ErrorCode::DeadLettered`).
pub const DEAD_LETTERED: &str = "dead_lettered";

/// What a job ended as, stored under its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// The encoded `EncryptedOutputs`.
    Done(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A stable error code (`bad_request`, `not_found`, `deadline_exceeded`, `dead_lettered`,
    /// `internal`) and a message for the client.
    Failed { code: String, message: String },
}

impl JobOutcome {
    pub fn failed(code: &str, message: impl Into<String>) -> Self {
        Self::Failed {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// A client session: one tenant's evaluation keys for one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub token_sha256: String,
    /// Precision name → content id of the evaluation key stored for it.
    pub keys: BTreeMap<String, String>,
    pub expires_unix_ms: u64,
}

/// Shards a worker holds after a heartbeat.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leases {
    pub owned: Vec<u32>,
    /// Taken in this heartbeat: their pending entries are to be claimed.
    pub acquired: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct QueueSettings {
    pub shards: u32,
    /// Entries waiting or in progress per shard beyond which enqueue is refused.
    pub max_depth: usize,
    pub max_deliveries: u32,
    pub lease_ttl_ms: u64,
    pub result_ttl_ms: u64,
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

    /// Append `job` to its session's shard; refuses with [`QueueError::Full`] past the cap.
    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>>;
    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobOutcome>, QueueError>>;
    /// Every job id completed from now on (one subscription per coordinator).
    fn completions(&self) -> BoxFuture<'_, Result<CompletionStream, QueueError>>;
    /// Workers whose heartbeat is younger than the lease TTL.
    fn live_workers(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Jobs waiting or in progress over all shards.
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>>;

    /// Register `worker` as alive, renew its leases and take free shards up to a fair share
    /// (giving back any beyond it, so a new worker gets some).
    fn heartbeat<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<Leases, QueueError>>;
    /// New jobs of `shards`, waiting up to `block_ms` for the first.
    fn read<'a>(
        &'a self,
        worker: &'a str,
        shards: &'a [u32],
        count: usize,
        block_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>>;
    /// Take over entries of `shard` delivered to anyone and unacknowledged for `min_idle_ms`.
    fn claim<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        min_idle_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>>;
    /// Store the outcome unless one exists (`SET NX`), announce it, then acknowledge the entry.
    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Record the job on the dead-letter stream and complete it as failed.
    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Entries on the dead-letter stream.
    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Give back `worker`'s leases (graceful shutdown).
    fn leave<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
}

/// Sessions and their evaluation keys, with TTLs refreshed on use.
pub trait SessionStore: Send + Sync {
    /// Store an evaluation key blob under its content id.
    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    fn get_key<'a>(&'a self, key_id: &'a str)
        -> BoxFuture<'a, Result<Option<Vec<u8>>, QueueError>>;
    fn put_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, QueueError>>;
    /// Whether a session was there to delete.
    fn delete_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>>;
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
}
